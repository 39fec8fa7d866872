//! The one source of "now", and of the time-ordered ids made from it.
//! Production reads the system clock; tests can shift it (e.g. to pretend a
//! node was down, or that runs are a month old) instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SubsecRound, Utc};
use uuid::{ContextV7, Timestamp, Uuid};

/// System time plus a shared, adjustable offset (milliseconds). Cloning
/// shares the offset and the id sequence.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
    /// Keeps the ids of one clock strictly increasing within a millisecond
    /// (and when the clock is moved back: they keep the latest time seen).
    ids: Arc<Mutex<ContextV7>>,
}

impl Clock {
    /// A clock reading the system time.
    pub fn system() -> Self {
        Self::default()
    }

    fn raw_now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    /// The current instant, UTC, truncated to microseconds (PostgreSQL's
    /// `timestamptz` precision), so times round-trip through the database
    /// unchanged (fire times are compared for equality).
    pub fn now(&self) -> DateTime<Utc> {
        self.raw_now().trunc_subsecs(6)
    }

    /// A new UUIDv7 whose 48-bit time prefix is this clock's now (unix
    /// milliseconds): runs, bindings, audit events and keys take their ids
    /// here, so an id says when it was made by the same clock that stamps
    /// `create_time`, and `run_events` partitions (by the run id's day)
    /// follow the clock tests move. Ids of one clock increase strictly
    /// (RFC 9562 method 1 counter within a millisecond).
    pub fn new_id(&self) -> Uuid {
        let t = self.raw_now();
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        let ctx = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        Uuid::new_v7(Timestamp::from_unix(
            &*ctx,
            secs,
            t.timestamp_subsec_nanos(),
        ))
    }

    /// Moves this clock (and its clones) forward by `by` (negative: back).
    pub fn advance(&self, by: chrono::Duration) {
        self.offset_ms
            .fetch_add(by.num_milliseconds(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_clocks_time_and_increase() {
        let clock = Clock::system();
        clock.advance(chrono::Duration::days(40));
        let ids: Vec<Uuid> = (0..1000).map(|_| clock.new_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        let (secs, _) = ids[0].get_timestamp().expect("v7").to_unix();
        let at = DateTime::<Utc>::from_timestamp(secs as i64, 0).unwrap();
        assert_eq!(ids[0].get_version_num(), 7);
        let ahead = at - Utc::now();
        assert!(
            ahead > chrono::Duration::days(39) && ahead < chrono::Duration::days(41),
            "{ahead}"
        );
        // A clone shares the offset and the sequence.
        let c2 = clock.clone();
        assert!(c2.new_id() > ids[999]);
    }
}
