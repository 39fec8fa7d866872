//! The PostgreSQL `LISTEN/NOTIFY` channels nodes use to wake each other
//! (`docs/architecture.md`): every statement that notifies binds one of
//! these names, and the bridge (`events::bridge`) listens on all of them.

/// New run events: payload `<node_id>|<run_id>:<from_seq>:<to_seq>[,...]`.
pub const EVENTS: &str = "sked_events";
/// "Runs are waiting" (queued, or a slot freed up), for the executors and
/// the worker dispatch. Payload: which runs, a comma-separated subset of
/// [`RUNS_SCHEDULED`], [`RUNS_WORKER`], [`RUNS_LOCAL`] and [`RUNS_EVENT`];
/// empty means any
/// (every listener looks), so a node wakes only the loop that can act.
/// A sender that has woken its own loops appends `@<its node id>`, and its
/// own bridge ignores the notification (`db::runs::Waiting::payload_from`).
pub const RUNS: &str = "sked_runs";
/// [`RUNS`] payload item: `SCHEDULED` runs were written; executors
/// recompute when to promote them (no claim). As
/// `scheduled:<microseconds since the Unix epoch>` it names when the first
/// is due, and executors need not read it (`db::runs::Waiting::parse`).
pub const RUNS_SCHEDULED: &str = "scheduled";
/// [`RUNS`] payload item: `QUEUED` runs of `worker` handlers; the worker
/// dispatch claims.
pub const RUNS_WORKER: &str = "worker";
/// [`RUNS`] payload item: `QUEUED` runs a node executes itself (every
/// other handler but `event`); the executors claim.
pub const RUNS_LOCAL: &str = "local";
/// [`RUNS`] payload item: `QUEUED` runs of `event` handlers; the
/// executors' event claim loops complete them.
pub const RUNS_EVENT: &str = "event";
/// Cancel requests for running runs (payload: `<run id>|<reason>`), so the
/// node executing the run stops it.
pub const CANCEL: &str = "sked_cancel";
/// Binding changes (empty payload), so schedulers recompute their next
/// wake-up.
pub const BINDINGS: &str = "sked_bindings";

/// Every channel, in the order the bridge listens on them.
pub const ALL: [&str; 4] = [EVENTS, RUNS, BINDINGS, CANCEL];

/// Sends `channels[i]`/`payloads[i]` as NOTIFYs in one statement: inside
/// `db`'s transaction when it is one (delivered on commit), else in a
/// transaction of its own (one that writes no WAL, so it commits without
/// waiting for a flush).
///
/// # Errors
/// [`super::Error::Sqlx`] on database failure.
pub(crate) async fn notify_all(
    db: impl sqlx::PgExecutor<'_>,
    channels: &[&str],
    payloads: &[String],
) -> Result<(), super::Error> {
    sqlx::query!(
        "SELECT pg_notify(c, p) FROM UNNEST($1::text[], $2::text[]) AS x(c, p)",
        channels as &[&str],
        payloads,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// NOTIFYs sent after their changes committed, many transactions' in one
/// statement, for the hot paths whose commits they would otherwise
/// serialise: PostgreSQL takes one database-wide lock from a notifying
/// transaction's commit to its end, WAL flush included, so notifying
/// commits never share a flush (measured: worker completions waited on it
/// and on each other's row locks held meanwhile). The order of the
/// notifications handed over is kept. What another node misses if this
/// node stops before they are sent is what a lost notification misses
/// (`docs/architecture.md`, "Failure handling"): tails resync from the
/// database, loops wake on their timers.
///
/// Cheap to clone. Nothing is sent until its [`AnnouncerTask`] runs.
#[derive(Debug, Clone)]
pub struct Announcer {
    tx: tokio::sync::mpsc::Sender<Vec<(&'static str, String)>>,
}

/// The sending side of an [`Announcer`]: [`AnnouncerTask::run`] it on a
/// task of its own (`app.rs` spawns the node's).
#[derive(Debug)]
pub struct AnnouncerTask {
    pool: sqlx::PgPool,
    rx: tokio::sync::mpsc::Receiver<Vec<(&'static str, String)>>,
}

/// Hand-overs queued at most before [`Announcer::send`] waits: the
/// senders slow down to the pace of the database, memory stays bounded.
const ANNOUNCER_QUEUE: usize = 1024;

/// Notifications sent at most per statement.
const ANNOUNCER_BATCH: usize = 4096;

impl Announcer {
    /// An announcer sending on `pool`, and the task that sends.
    pub fn new(pool: sqlx::PgPool) -> (Announcer, AnnouncerTask) {
        let (tx, rx) = tokio::sync::mpsc::channel(ANNOUNCER_QUEUE);
        (Announcer { tx }, AnnouncerTask { pool, rx })
    }

    /// Hands over `notifications` (channel, payload), to be sent after
    /// those handed over before; waits while [`ANNOUNCER_QUEUE`] hand-overs
    /// are queued. Nothing when empty.
    pub async fn send(&self, notifications: Vec<(&'static str, String)>) {
        if notifications.is_empty() {
            return;
        }
        // Fails only once the task is gone (its runtime shutting down):
        // nothing is left to announce to.
        let _ = self.tx.send(notifications).await;
    }
}

impl AnnouncerTask {
    /// Sends what is handed over, in order: whatever queued while the last
    /// statement ran goes out in the next (at most [`ANNOUNCER_BATCH`] a
    /// statement), so the batching needs no timer. Returns once every
    /// [`Announcer`] clone is dropped and what they handed over is sent.
    pub async fn run(mut self) {
        let mut handed = Vec::new();
        while self.rx.recv_many(&mut handed, ANNOUNCER_QUEUE).await > 0 {
            let all: Vec<(&str, String)> = handed.drain(..).flatten().collect();
            for batch in all.chunks(ANNOUNCER_BATCH) {
                let (channels, payloads): (Vec<&str>, Vec<String>) = batch.iter().cloned().unzip();
                send_retried(&self.pool, &channels, &payloads).await;
            }
        }
    }
}

/// [`notify_all`], tried three times; then dropped with a warning, as a
/// lost notification (see [`Announcer`]).
async fn send_retried(pool: &sqlx::PgPool, channels: &[&str], payloads: &[String]) {
    for attempt in 1..=3 {
        match notify_all(pool, channels, payloads).await {
            Ok(()) => return,
            Err(e) if attempt < 3 => {
                tracing::debug!(error = %e, "sending notifications failed; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => tracing::warn!(error = %e, notifications = channels.len(),
                "notifications not sent; other nodes resync from the database"),
        }
    }
}
