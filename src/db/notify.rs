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
/// Cheap to clone. The sending task ends when every clone is dropped,
/// after sending what was handed over.
#[derive(Debug, Clone)]
pub struct Announcer {
    tx: tokio::sync::mpsc::Sender<Vec<(&'static str, String)>>,
}

/// Hand-overs queued at most before [`Announcer::send`] waits: the
/// senders slow down to the pace of the database, memory stays bounded.
const ANNOUNCER_QUEUE: usize = 1024;

/// Notifications sent at most per statement.
const ANNOUNCER_BATCH: usize = 4096;

impl Announcer {
    /// Starts the sending task (it needs a tokio runtime) on `pool`.
    pub fn start(pool: sqlx::PgPool) -> Announcer {
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<Vec<(&'static str, String)>>(ANNOUNCER_QUEUE);
        tokio::spawn(async move {
            let mut handed = Vec::new();
            let mut pending: std::collections::VecDeque<(&'static str, String)> =
                std::collections::VecDeque::new();
            loop {
                if pending.is_empty() {
                    // Whatever queued while the last statement ran goes
                    // out in the next: the batching needs no timer.
                    if rx.recv_many(&mut handed, ANNOUNCER_QUEUE).await == 0 {
                        return;
                    }
                    pending.extend(handed.drain(..).flatten());
                }
                let n = pending.len().min(ANNOUNCER_BATCH);
                let (channels, payloads): (Vec<&str>, Vec<String>) = pending.drain(..n).unzip();
                send_all(&pool, &channels, &payloads).await;
                // Take what queued meanwhile before sending the rest.
                while let Ok(more) = rx.try_recv() {
                    pending.extend(more);
                }
            }
        });
        Announcer { tx }
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

/// One statement of NOTIFYs, tried three times; then dropped with a
/// warning, as a lost notification (see [`Announcer`]).
async fn send_all(pool: &sqlx::PgPool, channels: &[&str], payloads: &[String]) {
    let mut tries = 0;
    loop {
        let sent = sqlx::query!(
            "SELECT pg_notify(c, p) FROM UNNEST($1::text[], $2::text[]) AS x(c, p)",
            channels as &[&str],
            payloads,
        )
        .execute(pool)
        .await;
        match sent {
            Ok(_) => return,
            Err(e) if tries < 2 => {
                tries += 1;
                tracing::debug!(error = %e, "sending notifications failed; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, notifications = channels.len(),
                    "notifications not sent; other nodes resync from the database");
                return;
            }
        }
    }
}
