//! Run events: publication inside a node, the LISTEN/NOTIFY bridge between
//! nodes, and the subscriptions behind `TailRun` and `WatchEvents`.
//!
//! Rules (`docs/architecture.md`, "How a log line reaches a subscriber"): events are persisted first (by `db`) and
//! published second; a subscriber subscribes to the bus *before* replaying
//! from the database and de-duplicates by `seq`; a subscriber that lags
//! behind the bus is re-fed from the database, so a slow client never blocks
//! execution or other clients.
//!
//! Cross-node delivery: the writer NOTIFYs `sked_events` with
//! `<node>|<run>:<from>:<to>` in the writing transaction; every other node's
//! [`bridge`] reads that seq range and publishes it on its own bus. NOTIFYs
//! can be lost while a listener reconnects, so tails also poll the database
//! when idle.

pub mod bridge;
pub mod tail;

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::domain::RunEvent;
use crate::telemetry::metrics;

/// Batches buffered per node before a slow subscriber lags (then it is
/// re-fed from the database or told how many events it missed). With
/// batches of at most [`MAX_BATCH`] events, a lagging subscriber holds at
/// most `BUS_CAPACITY × MAX_BATCH` events in memory, shared by all. Sized
/// for a burst: 100 000 `event` bindings due at one instant, prepared
/// ahead, publish 400 000 events at once (four per run) when their passes
/// commit; measured with 512, every `WatchEvents` subscriber of that burst
/// missed a fifth of its `fired` events.
pub const BUS_CAPACITY: usize = 1024;
/// Most events per published batch (larger publications are split).
pub const MAX_BATCH: usize = 512;

/// A published event and, once a stream has sent it, its encoding on the
/// wire: the first `TailRun` subscriber to send it encodes it, every other
/// subscriber sends the same bytes (one encoding per event, not one per
/// subscriber). Dereferences to the event.
#[derive(Debug)]
pub struct Published {
    event: RunEvent,
    wire: OnceLock<Bytes>,
    /// Index of this event among its tenant's on the bus that published
    /// it (0, 1, 2... over the node's life; 0 when not from a bus): a
    /// watcher that lagged learns how many of its tenant's events it
    /// missed, and nothing about other tenants'.
    pub tenant_index: u64,
}

impl Published {
    /// `event`, not encoded yet.
    pub fn new(event: RunEvent) -> Self {
        Self {
            event,
            wire: OnceLock::new(),
            tenant_index: 0,
        }
    }

    /// The event's wire encoding: `encode`'s result, computed on the first
    /// call only (callers must always pass the same encoding).
    pub fn wire(&self, encode: impl FnOnce(&RunEvent) -> Bytes) -> &Bytes {
        self.wire.get_or_init(|| encode(&self.event))
    }
}

impl std::ops::Deref for Published {
    type Target = RunEvent;
    fn deref(&self) -> &RunEvent {
        &self.event
    }
}

/// Events persisted together, in order, published as one message: a
/// subscriber wakes once per batch, not once per event (a log flush, a
/// scheduler pass).
#[derive(Debug)]
pub struct Batch {
    /// Bus-wide index of the first event (0, 1, 2... over the node's life):
    /// a subscriber that lagged learns exactly how many events it missed.
    pub first: u64,
    /// The events.
    pub events: Vec<Arc<Published>>,
}

impl Batch {
    /// Index of the event after this batch's last.
    pub fn end(&self) -> u64 {
        self.first + self.events.len() as u64
    }
}

/// In-process fan-out of run events (local and bridged from other nodes).
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Batch>>,
    /// Index of the next event, and of each tenant's next event; held
    /// while sending, so batches reach every subscriber in index order.
    next: Arc<Mutex<Next>>,
}

/// [`EventBus`]'s counters.
#[derive(Debug, Default)]
struct Next {
    /// Bus-wide index of the next event.
    event: u64,
    /// Per tenant, the index of its next event (one entry per tenant that
    /// published on this node).
    tenant: std::collections::HashMap<String, u64>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus holding up to [`BUS_CAPACITY`] batches per subscriber.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(BUS_CAPACITY).0,
            next: Arc::default(),
        }
    }
    /// Publishes already-persisted events this node wrote, in order, in
    /// batches of at most [`MAX_BATCH`]. They are counted in the metrics
    /// (published, and runs by final state: [`metrics::published`]).
    pub fn publish(&self, events: impl IntoIterator<Item = RunEvent>) {
        self.publish_from(events, true);
    }

    /// [`EventBus::publish`] for events another node wrote (the bridge):
    /// counted as published, not as this node's runs.
    pub fn republish(&self, events: impl IntoIterator<Item = RunEvent>) {
        self.publish_from(events, false);
    }

    fn publish_from(&self, events: impl IntoIterator<Item = RunEvent>, local: bool) {
        let mut events = events.into_iter().map(Published::new).peekable();
        while events.peek().is_some() {
            let mut chunk: Vec<Published> = events.by_ref().take(MAX_BATCH).collect();
            metrics::published(chunk.iter().map(|e| -> &RunEvent { e }), local);
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            for e in &mut chunk {
                // A tenant's events come in runs: one lookup per run of them.
                let slot = match next.tenant.get_mut(&e.event.tenant_id) {
                    Some(slot) => slot,
                    None => next.tenant.entry(e.event.tenant_id.clone()).or_default(),
                };
                e.tenant_index = *slot;
                *slot += 1;
            }
            let batch = Batch {
                first: next.event,
                events: chunk.into_iter().map(Arc::new).collect(),
            };
            next.event = batch.end();
            // No receivers is fine: nobody is watching.
            let _ = self.tx.send(Arc::new(batch));
        }
    }
    /// A receiver of every batch published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.tx.subscribe()
    }
    /// [`EventBus::subscribe`], with the index of the first event it will
    /// receive (to count events missed by lagging).
    pub fn subscribe_at(&self) -> (broadcast::Receiver<Arc<Batch>>, u64) {
        let next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        (self.tx.subscribe(), next.event)
    }
    /// [`EventBus::subscribe`], with the index of `tenant`'s first event it
    /// will receive ([`Published::tenant_index`]).
    pub fn subscribe_tenant(&self, tenant: &str) -> (broadcast::Receiver<Arc<Batch>>, u64) {
        let next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        (
            self.tx.subscribe(),
            next.tenant.get(tenant).copied().unwrap_or(0),
        )
    }
    /// Whether anyone is subscribed (the bridge skips reads otherwise).
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }
    /// Current number of subscribers.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}
