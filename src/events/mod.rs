//! Run events: publication inside a node, the LISTEN/NOTIFY bridge between
//! nodes, and the subscriptions behind `TailRun` and `WatchEvents`.
//!
//! Rules (DESIGN.md "Streams"): events are persisted first (by `db`) and
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

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::domain::RunEvent;

/// Events buffered per node before a slow subscriber lags (then it is re-fed
/// from the database or told how many it missed).
pub const BUS_CAPACITY: usize = 16 * 1024;

/// In-process fan-out of run events (local and bridged from other nodes).
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<RunEvent>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus holding up to [`BUS_CAPACITY`] events per subscriber.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(BUS_CAPACITY).0,
        }
    }
    /// Publishes already-persisted events, in order.
    pub fn publish(&self, events: impl IntoIterator<Item = RunEvent>) {
        for e in events {
            // No receivers is fine: nobody is watching.
            let _ = self.tx.send(Arc::new(e));
        }
    }
    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RunEvent>> {
        self.tx.subscribe()
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
