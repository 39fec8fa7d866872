//! The one source of "now". Production reads the system clock; tests can
//! shift it (e.g. to pretend a node was down) instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, SubsecRound, Utc};

/// System time plus a shared, adjustable offset (milliseconds). Cloning
/// shares the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// A clock reading the system time.
    pub fn system() -> Self {
        Self::default()
    }
    /// The current instant, UTC, truncated to microseconds (PostgreSQL's
    /// `timestamptz` precision), so times round-trip through the database
    /// unchanged (fire times are compared for equality).
    pub fn now(&self) -> DateTime<Utc> {
        let t = Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed));
        t.trunc_subsecs(6)
    }
    /// Moves this clock (and its clones) forward by `by` (negative: back).
    pub fn advance(&self, by: chrono::Duration) {
        self.offset_ms
            .fetch_add(by.num_milliseconds(), Ordering::Relaxed);
    }
}
