//! The LISTEN/NOTIFY bridge: one connection per node listening on every
//! channel of [`db::notify`] (events, runs, bindings, cancel). It wakes
//! the local scheduler and executor, hands cancel requests to the runs
//! executing here, and republishes other nodes' events on the local bus.
//! After a lost connection it wakes everything, since notifications sent
//! meanwhile are gone (a cancel request lost that way reaches its run through
//! the executor's heartbeat instead).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::EventBus;
use crate::db;

/// The runs executing on this node (or held by a worker connected to it),
/// as far as the bridge needs them: a cancel request names a run, and only
/// the node executing it acts. The
/// executor's registry implements it, so the engine depends on the events
/// module and never the other way round.
pub trait LocalRuns: std::fmt::Debug + Send + Sync {
    /// Asks run `id` to stop and end `CANCELLED` with `reason`, if it
    /// executes on this node; returns whether it does.
    fn cancel(&self, id: Uuid, reason: &str) -> bool;
}

/// Whom the bridge wakes.
#[derive(Debug, Clone)]
pub struct Wakers {
    /// The scheduler (bindings changed).
    pub scheduler: Arc<Notify>,
    /// The executor (runs queued, or a slot freed up): it claims.
    pub executor: Arc<Notify>,
    /// The executor's timer (`SCHEDULED` runs written): it moves its next
    /// promotion earlier if they are due sooner, without claiming.
    pub executor_timer: Arc<DueTimer>,
    /// The worker dispatch (runs queued, for worker queues).
    pub workers: Arc<Notify>,
    /// The executor's event claim loops (`event` runs queued).
    pub events: WakeAll,
    /// Runs executing on this node (cancel requests).
    pub running: Arc<dyn LocalRuns>,
}

/// A wake-up for several loops at once: each [`WakeAll::waiter`] sees every
/// [`WakeAll::wake`] made since it last woke, also one made while it was
/// busy (so none is lost between a loop's look and its wait).
#[derive(Debug, Clone)]
pub struct WakeAll(Arc<tokio::sync::watch::Sender<u64>>);

impl Default for WakeAll {
    fn default() -> Self {
        WakeAll(Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl WakeAll {
    /// Wakes every waiter (or has it wake at its next wait).
    pub fn wake(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A new waiter: `changed().await` returns at the next wake.
    pub fn waiter(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The wake-up of the executor's promotion timer: [`DueTimer::due`] when
/// `SCHEDULED` runs were written, with the earliest due time their writer
/// named, so the executor moves its sleep without reading the database
/// (one read per TriggerRun of a future run time, before).
#[derive(Debug, Default)]
pub struct DueTimer {
    notify: Notify,
    pending: std::sync::Mutex<Due>,
}

/// What a [`DueTimer`] heard since it was last taken ([`DueTimer::take`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Due {
    /// Nothing.
    #[default]
    Nothing,
    /// Runs were written; the first is due at this instant.
    At(DateTime<Utc>),
    /// Runs were written whose due time a writer did not name (a node of
    /// the version before, a workflow's SQL): read it.
    Unknown,
}

impl DueTimer {
    /// Runs were written, the first due at `at` (`None`: not named); wakes
    /// the waiter, or has it wake at its next wait.
    pub fn due(&self, at: Option<DateTime<Utc>>) {
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            *p = match (*p, at) {
                (Due::Unknown, _) | (_, None) => Due::Unknown,
                (Due::Nothing, Some(t)) => Due::At(t),
                (Due::At(a), Some(t)) => Due::At(a.min(t)),
            };
        }
        self.notify.notify_one();
    }

    /// What was heard since the last take, and forget it.
    pub fn take(&self) -> Due {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits for the next [`DueTimer::due`] (at once for one made since
    /// the last wait returned).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

impl Wakers {
    /// Fresh wake-ups for the scheduler and executor, cancel requests going
    /// to `running`.
    pub fn new(running: Arc<dyn LocalRuns>) -> Self {
        Wakers {
            scheduler: Arc::default(),
            executor: Arc::default(),
            executor_timer: Arc::default(),
            workers: Arc::default(),
            events: WakeAll::default(),
            running,
        }
    }

    fn all(&self) {
        self.scheduler.notify_one();
        self.executor.notify_one();
        self.workers.notify_one();
        self.events.wake();
    }
}

/// An announced seq range of one run: `(run_id, from_seq, to_seq)`, inclusive.
pub type SeqRange = (Uuid, i64, i64);

/// Parses `<node>|<run>:<from>:<to>,...`; `None` for a malformed payload.
pub fn parse_events_payload(payload: &str) -> Option<(&str, Vec<SeqRange>)> {
    let (node, rest) = payload.split_once('|')?;
    let mut ranges = Vec::new();
    for item in rest.split(',') {
        let mut parts = item.split(':');
        let id = parts.next()?.parse().ok()?;
        let from = parts.next()?.parse().ok()?;
        let to = parts.next()?.parse().ok()?;
        ranges.push((id, from, to));
    }
    Some((node, ranges))
}

/// Runs the bridge until `shutdown`. Reconnects (with a 1 s pause) on errors.
pub async fn run(
    pool: PgPool,
    node_id: String,
    bus: EventBus,
    wakers: Wakers,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Err(e) = listen(&pool, &node_id, &bus, &wakers, &shutdown).await {
            tracing::warn!(error = %e, "event bridge connection lost; reconnecting");
            wakers.all();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

async fn listen(
    pool: &PgPool,
    node_id: &str,
    bus: &EventBus,
    wakers: &Wakers,
    shutdown: &CancellationToken,
) -> Result<(), db::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(db::notify::ALL).await?;
    // Anything announced before we listened is missed: look once.
    wakers.all();
    loop {
        let first = tokio::select! {
            n = listener.try_recv() => n?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(first) = first else {
            // Connection dropped; try_recv reconnects on the next call.
            tracing::warn!("event bridge reconnecting");
            wakers.all();
            continue;
        };
        // Coalesce everything already buffered into one database read.
        let mut ranges = Vec::new();
        let mut pending = Some(first);
        while let Some(n) = pending.take().or_else(|| listener.next_buffered()) {
            match n.channel() {
                // Only the loops that can act on the runs named.
                // The sender woke its own loops for these (a promotion).
                db::notify::RUNS if db::runs::Waiting::sender(n.payload()) == Some(node_id) => {}
                db::notify::RUNS => match db::runs::Waiting::parse(n.payload()) {
                    Some(w) => {
                        if w.local {
                            wakers.executor.notify_one();
                        }
                        if w.scheduled {
                            wakers.executor_timer.due(w.scheduled_at);
                        }
                        if w.worker {
                            wakers.workers.notify_one();
                        }
                        if w.event {
                            wakers.events.wake();
                        }
                    }
                    None => {
                        wakers.executor.notify_one();
                        wakers.workers.notify_one();
                        wakers.events.wake();
                    }
                },
                db::notify::BINDINGS => wakers.scheduler.notify_one(),
                db::notify::CANCEL => match n.payload().split_once('|') {
                    Some((id, reason)) => {
                        if let Ok(id) = id.parse::<Uuid>()
                            && wakers.running.cancel(id, reason)
                        {
                            tracing::info!(run = %id, reason, "cancel requested; stopping the run");
                        }
                    }
                    None => tracing::warn!(payload = n.payload(), "malformed sked_cancel payload"),
                },
                db::notify::EVENTS => match parse_events_payload(n.payload()) {
                    Some((from_node, r)) if from_node != node_id => ranges.extend(r),
                    Some(_) => {}
                    None => tracing::warn!(payload = n.payload(), "malformed sked_events payload"),
                },
                _ => {}
            }
        }
        if !ranges.is_empty() && bus.has_subscribers() {
            bus.republish(db::events::event_fetch_ranges(pool, &ranges).await?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let id = Uuid::now_v7();
        let payload = format!("n1|{id}:3:5,{id}:6:6");
        let (node, r) = parse_events_payload(&payload).unwrap();
        assert_eq!(node, "n1");
        assert_eq!(r, vec![(id, 3, 5), (id, 6, 6)]);
        assert!(parse_events_payload("garbage").is_none());
    }

    #[tokio::test]
    async fn the_timer_keeps_the_earliest_named_time_until_one_is_unknown() {
        let t = |s| DateTime::from_timestamp(s, 0).expect("in range");
        let timer = DueTimer::default();
        assert_eq!(timer.take(), Due::Nothing);
        timer.due(Some(t(30)));
        timer.due(Some(t(10)));
        timer.due(Some(t(20)));
        // Woken once for all of them, at its next wait.
        tokio::time::timeout(Duration::from_secs(5), timer.notified())
            .await
            .expect("a wake-up was kept");
        assert_eq!(timer.take(), Due::At(t(10)));
        assert_eq!(timer.take(), Due::Nothing, "taken once");
        timer.due(Some(t(10)));
        timer.due(None);
        timer.due(Some(t(5)));
        assert_eq!(timer.take(), Due::Unknown);
    }
}
