//! The subscriptions behind `LogService.TailRun` and `WatchEvents`. Each runs
//! as a task feeding a bounded channel and stops as soon as the receiver
//! (the client's stream) is dropped.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Batch, EventBus, Published};
use crate::db;
use crate::domain::{EventBody, RunEvent};

/// Rows read per database page while replaying or resyncing.
const PAGE: i64 = 1000;
/// How long a follower waits for a live event before checking the database
/// (covers NOTIFYs lost while a bridge reconnects).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// What a tail subscriber is sent: consecutive events of the run (shared
/// with the bus, never copied per subscriber, each encoded once for all
/// subscribers: [`Published::wire`]), or the error that ended it.
pub type TailItem = Result<Vec<Arc<Published>>, db::Error>;

/// Streams the tenant's run `run_id` into `out`: persisted events with
/// `seq > after_seq`, then (if `follow`) live ones, with no gap and no
/// duplicate, until the terminal `state_changed` event was sent. Returns when
/// done, on a database error (sent to `out` first), when `out` is closed, or
/// when `stop` is cancelled (node shutdown; the client reconnects elsewhere
/// with its last seq).
#[allow(clippy::too_many_arguments)]
pub async fn tail_run(
    pool: PgPool,
    bus: EventBus,
    tenant_id: String,
    run_id: Uuid,
    after_seq: i64,
    follow: bool,
    out: mpsc::Sender<TailItem>,
    stop: CancellationToken,
) {
    // Subscribe before replaying, so nothing falls between the two.
    let mut rx = bus.subscribe();
    let mut tail = Tail {
        pool,
        tenant_id,
        run_id,
        last: after_seq,
        out,
    };
    match tail.resync().await {
        Ok(true) => return,
        Ok(false) if !follow => return,
        Ok(false) => {}
        Err(()) => return,
    }
    loop {
        let done = tokio::select! {
            r = rx.recv() => match r {
                Ok(batch) => tail.offer(&batch).await,
                Err(broadcast::error::RecvError::Lagged(_)) => tail.replay().await,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(IDLE_POLL) => tail.resync().await,
            _ = tail.out.closed() => return,
            _ = stop.cancelled() => return,
        };
        match done {
            Ok(false) => {}
            Ok(true) | Err(()) => return,
        }
    }
}

struct Tail {
    pool: PgPool,
    tenant_id: String,
    run_id: Uuid,
    /// Highest seq sent.
    last: i64,
    out: mpsc::Sender<TailItem>,
}

impl Tail {
    /// Sends this run's events of `batch` that come next, as one item;
    /// re-reads the database on a gap. `Ok(true)` once the terminal event
    /// was sent; `Err` when the client is gone.
    async fn offer(&mut self, batch: &Batch) -> Result<bool, ()> {
        let mut out = Vec::new();
        let mut terminal = false;
        let run_id = self.run_id;
        for e in batch.events.iter().filter(|e| e.run_id == run_id) {
            if e.seq <= self.last {
                continue;
            }
            if e.seq > self.last + 1 {
                // Missed some (e.g. announced by another node first): what
                // we have goes out, the database fills the gap.
                self.send(out).await?;
                return self.replay().await;
            }
            terminal = self.take(Arc::clone(e), &mut out);
            if terminal {
                break;
            }
        }
        self.send(out).await?;
        Ok(terminal)
    }

    /// Appends `e`, the next event, to `out` and moves `last` to it; true
    /// when it is the run's terminal event (nothing follows it).
    fn take(&mut self, e: Arc<Published>, out: &mut Vec<Arc<Published>>) -> bool {
        self.last = e.seq;
        let terminal = e.body.is_terminal();
        out.push(e);
        terminal
    }

    async fn send(&mut self, events: Vec<Arc<Published>>) -> Result<(), ()> {
        if events.is_empty() {
            return Ok(());
        }
        self.out.send(Ok(events)).await.map_err(|_| ())
    }

    /// Resyncs this subscriber from the database: sends every persisted
    /// event after `last` (what a lagging bus or a lost NOTIFY dropped).
    /// `Ok(true)` when the run is over for this subscriber: the terminal
    /// event was among them, or it had been sent before (a reconnect with
    /// `after_seq` at the run's end).
    async fn resync(&mut self) -> Result<bool, ()> {
        if self.replay().await? {
            return Ok(true);
        }
        match db::runs::run_progress(&self.pool, self.run_id).await {
            Ok((state, last_seq)) => Ok(state.is_terminal() && self.last >= last_seq),
            Err(e) => {
                let _ = self.out.send(Err(e)).await;
                Err(())
            }
        }
    }

    /// Sends every persisted event after `last`; `Ok(true)` if the terminal
    /// event was among them.
    async fn replay(&mut self) -> Result<bool, ()> {
        loop {
            let page = match db::events::event_list(
                &self.pool,
                &self.tenant_id,
                self.run_id,
                self.last,
                PAGE,
            )
            .await
            {
                Ok(p) => p,
                Err(e) => {
                    let _ = self.out.send(Err(e)).await;
                    return Err(());
                }
            };
            let full = page.len() as i64 == PAGE;
            let mut out = Vec::with_capacity(page.len());
            let mut terminal = false;
            for e in page {
                terminal = self.take(Arc::new(Published::new(e)), &mut out);
                if terminal {
                    break;
                }
            }
            self.send(out).await?;
            if terminal {
                return Ok(true);
            }
            if !full {
                return Ok(false);
            }
        }
    }
}

/// What a workflow tail subscriber is sent: events, each with the name of
/// the step whose run it belongs to (empty for the workflow run's own), or
/// the error that ended it.
pub type WorkflowTailItem = Result<Vec<(Arc<str>, Arc<RunEvent>)>, db::Error>;

/// Least time between two reads of a followed workflow's logs (a bus batch
/// of any run wakes the tail; the reads cost one query per step).
const WORKFLOW_POLL_MIN: Duration = Duration::from_millis(50);

/// Streams the tenant's workflow run `run_id` into `out`: its steps' events
/// (each with its step's name) and its own, with `seq > after_seq` for its
/// own and every event of every step (the cursor of a workflow tail is the
/// workflow run's own seq; a client that reconnects gets the steps' events
/// again and drops the `(run_id, seq)` pairs it has). Each run's events
/// come in seq order, runs interleaved by event time; the workflow run's
/// terminal event comes last, after its steps' final events. Then (if
/// `follow`) live ones until that terminal event was sent. Returns when
/// done, on a database error (sent to `out` first), when `out` is closed,
/// or when `stop` is cancelled.
#[allow(clippy::too_many_arguments)]
pub async fn tail_workflow(
    pool: PgPool,
    bus: EventBus,
    tenant_id: String,
    run_id: Uuid,
    after_seq: i64,
    follow: bool,
    out: mpsc::Sender<WorkflowTailItem>,
    stop: CancellationToken,
) {
    let mut rx = bus.subscribe();
    let mut cursors: std::collections::HashMap<Uuid, i64> = std::collections::HashMap::new();
    let mut own_last = after_seq;
    let own_name: Arc<str> = Arc::from("");
    loop {
        let started = tokio::time::Instant::now();
        // Steps first, then the workflow's own events: a terminal event of
        // the workflow was committed with its steps' last ones, so one more
        // pass over the steps after it finds them all.
        let mut batch = match workflow_steps_events(&pool, &tenant_id, run_id, &mut cursors).await {
            Ok(b) => b,
            Err(e) => {
                let _ = out.send(Err(e)).await;
                return;
            }
        };
        let mut own = Vec::new();
        let mut terminal = None;
        loop {
            match db::events::event_list(&pool, &tenant_id, run_id, own_last, PAGE).await {
                Ok(page) => {
                    let full = page.len() as i64 == PAGE;
                    for e in page {
                        own_last = e.seq;
                        if e.body.is_terminal() {
                            terminal = Some(e);
                            break;
                        }
                        own.push((Arc::clone(&own_name), Arc::new(e)));
                    }
                    if terminal.is_some() || !full {
                        break;
                    }
                }
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            }
        }
        if terminal.is_some() {
            match workflow_steps_events(&pool, &tenant_id, run_id, &mut cursors).await {
                Ok(more) => batch.extend(more),
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            }
        }
        batch.extend(own);
        // Stable: each run's events keep their seq order.
        batch.sort_by_key(|(_, e)| e.time);
        if let Some(t) = terminal {
            batch.push((Arc::clone(&own_name), Arc::new(t)));
        }
        if !batch.is_empty() && out.send(Ok(batch)).await.is_err() {
            return;
        }
        if !follow || own_last_is_terminal(&pool, run_id, own_last, &out).await {
            return;
        }
        // Wait for news (any run's batch on the bus) or the poll.
        tokio::select! {
            r = rx.recv() => if let Err(broadcast::error::RecvError::Closed) = r { return },
            _ = tokio::time::sleep(IDLE_POLL) => {}
            _ = out.closed() => return,
            _ = stop.cancelled() => return,
        }
        tokio::time::sleep_until(started + WORKFLOW_POLL_MIN).await;
    }
}

/// Whether the workflow run is over for a tail at `last`: terminal, and
/// its last event sent. On a database error (sent to `out`), true.
async fn own_last_is_terminal(
    pool: &PgPool,
    run_id: Uuid,
    last: i64,
    out: &mpsc::Sender<WorkflowTailItem>,
) -> bool {
    match db::runs::run_progress(pool, run_id).await {
        Ok((state, last_seq)) => state.is_terminal() && last >= last_seq,
        Err(e) => {
            let _ = out.send(Err(e)).await;
            true
        }
    }
}

/// The events of workflow run `run_id`'s steps after each step run's
/// cursor (moved past them), with the step names.
async fn workflow_steps_events(
    pool: &PgPool,
    tenant_id: &str,
    run_id: Uuid,
    cursors: &mut std::collections::HashMap<Uuid, i64>,
) -> Result<Vec<(Arc<str>, Arc<RunEvent>)>, db::Error> {
    let mut out = Vec::new();
    for (id, name) in db::runs::run_step_ids(pool, tenant_id, run_id).await? {
        let name: Arc<str> = Arc::from(name.as_str());
        loop {
            let last = cursors.entry(id).or_insert(0);
            let page = db::events::event_list(pool, tenant_id, id, *last, PAGE).await?;
            let full = page.len() as i64 == PAGE;
            if let Some(e) = page.last() {
                *last = e.seq;
            }
            out.extend(page.into_iter().map(|e| (Arc::clone(&name), Arc::new(e))));
            if !full {
                break;
            }
        }
    }
    Ok(out)
}

/// Which live events a watcher wants (all given filters must match).
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    /// Tenant (always set: from the request's tenant).
    pub tenant_id: String,
    /// Only this binding.
    pub binding_id: Option<Uuid>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Only these event kinds (`state_changed`, `log`, `fired`, `progress`); empty = all.
    pub kinds: Vec<&'static str>,
}

impl WatchFilter {
    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &RunEvent) -> bool {
        e.tenant_id == self.tenant_id
            && self.binding_id.is_none_or(|b| b == e.binding_id)
            && self.definition.as_ref().is_none_or(|d| *d == e.definition)
            && (self.kinds.is_empty() || self.kinds.contains(&EventBody::kind(&e.body)))
    }
}

/// What a watcher is sent: an event, or how many it missed by reading slowly.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A live event.
    Event(Arc<Published>),
    /// This many of the watcher's tenant's events (of any kind, before the
    /// watcher's other filters) were dropped for it.
    Missed(u64),
}

/// Streams live events matching `filter` into `out`, one vector of items
/// per bus batch that holds any (so a burst costs the stream one wake-up
/// per batch, not one per event), until `out` is closed or `stop` is
/// cancelled.
///
/// A watcher that reads too slowly loses the bus's oldest batches; it
/// counts what it lost by its tenant's event indexes
/// ([`Published::tenant_index`]), told with the next event of its tenant
/// that reaches it: other tenants' events it skipped are neither counted
/// nor revealed.
pub async fn watch_events(
    bus: EventBus,
    filter: WatchFilter,
    out: mpsc::Sender<Vec<WatchItem>>,
    stop: CancellationToken,
) {
    // Index of the tenant's next event expected.
    let (mut rx, mut expected) = bus.subscribe_tenant(&filter.tenant_id);
    loop {
        let batch = tokio::select! {
            r = rx.recv() => match r {
                Ok(b) => b,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = out.closed() => return,
            _ = stop.cancelled() => return,
        };
        let mut items = Vec::new();
        for e in batch
            .events
            .iter()
            .filter(|e| e.tenant_id == filter.tenant_id)
        {
            let missed = e.tenant_index.saturating_sub(expected);
            expected = e.tenant_index + 1;
            if missed > 0 {
                crate::telemetry::metrics::events_dropped(missed);
                items.push(WatchItem::Missed(missed));
            }
            if filter.matches(e) {
                items.push(WatchItem::Event(Arc::clone(e)));
            }
        }
        if !items.is_empty() && out.send(items).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::LogStream;

    fn event(tenant: &str, seq: i64) -> RunEvent {
        RunEvent {
            run_id: Uuid::nil(),
            seq,
            time: chrono::Utc::now(),
            tenant_id: tenant.into(),
            binding_id: Uuid::nil(),
            definition: "d".into(),
            body: EventBody::Log {
                stream: LogStream::Stdout,
                message: "x".into(),
            },
        }
    }

    #[tokio::test]
    async fn watch_task_stops_when_the_client_goes_away() {
        let bus = EventBus::new();
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(watch_events(
            bus.clone(),
            WatchFilter {
                tenant_id: "a".into(),
                ..Default::default()
            },
            tx,
            CancellationToken::new(),
        ));
        tokio::task::yield_now().await;
        assert_eq!(bus.subscribers(), 1);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("task ends")
            .unwrap();
        assert_eq!(bus.subscribers(), 0, "the subscription is released");
    }

    /// The items of a watcher's batches, one at a time, read from its
    /// channel only when the buffered batch is used up (so the watcher
    /// still waits on a full channel as a slow client makes it).
    struct Items {
        rx: mpsc::Receiver<Vec<WatchItem>>,
        buf: std::collections::VecDeque<WatchItem>,
    }

    impl Items {
        async fn recv(&mut self) -> Option<WatchItem> {
            loop {
                if let Some(item) = self.buf.pop_front() {
                    return Some(item);
                }
                self.buf = self.rx.recv().await?.into();
            }
        }
    }

    /// A bus with tenant `a`'s watcher running on it, reading into a
    /// channel of one batch; the watcher stops with the token.
    async fn watching_a() -> (EventBus, Items, CancellationToken) {
        let bus = EventBus::new();
        let (tx, rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        tokio::spawn(watch_events(
            bus.clone(),
            WatchFilter {
                tenant_id: "a".into(),
                ..Default::default()
            },
            tx,
            stop.clone(),
        ));
        while bus.subscribers() == 0 {
            tokio::task::yield_now().await;
        }
        (
            bus,
            Items {
                rx,
                buf: Default::default(),
            },
            stop,
        )
    }

    #[tokio::test]
    async fn watch_filters_by_tenant_and_reports_missed_events() {
        let (bus, mut rx, stop) = watching_a().await;
        bus.publish([event("b", 1), event("a", 2)]);
        match rx.recv().await.unwrap() {
            WatchItem::Event(e) => assert_eq!((e.tenant_id.as_str(), e.seq), ("a", 2)),
            WatchItem::Missed(n) => panic!("missed {n}"),
        }
        // Overflow the bus for this slow watcher: it is told, not blocked.
        // One batch per publish: BUS_CAPACITY + 10 batches of one event.
        for i in 0..(crate::events::BUS_CAPACITY as i64 + 10) {
            bus.publish([event("a", i)]);
        }
        let mut missed = 0;
        while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        {
            if let WatchItem::Missed(n) = item {
                missed += n;
            }
        }
        assert!(missed >= 10, "missed {missed}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_watcher_lagging_behind_another_tenants_flood_is_told_nothing_of_it() {
        let (bus, mut rx, stop) = watching_a().await;
        bus.publish([event("a", 1)]);
        let mut got = Vec::new();
        if let Some(WatchItem::Event(e)) = rx.recv().await {
            got.push(e.seq);
        }
        // b's flood, published without yielding to the watcher (one
        // thread): the bus overflows for it.
        for i in 0..(crate::events::BUS_CAPACITY as i64 + 10) {
            bus.publish([event("b", i)]);
        }
        bus.publish([event("a", 2)]);
        while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        {
            match item {
                WatchItem::Event(e) => got.push(e.seq),
                WatchItem::Missed(n) => panic!("told of {n} missed events: b's, not a's"),
            }
        }
        // Every one of a's events arrived: only b's were dropped for it.
        assert_eq!(got, vec![1, 2]);
        stop.cancel();
    }
}
