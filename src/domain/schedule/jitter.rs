//! Jitter: the per-run start delay of [`Schedule::jitter_for`] and its
//! fixed hash.
//!
//! With [`Schedule::jitter_secs`] set, each run starts at `fire + jitter`,
//! with `jitter = `[`Schedule::jitter_for`]`(binding id, fire)` in
//! `[0, jitter_secs]` seconds, millisecond resolution, derived from a fixed
//! hash (FNV-1a 64 followed by the SplitMix64 finaliser, spelled out on
//! `jitter_for`) so that every replica and every build agrees. The fire time
//! itself (what [`Schedule::next_after`] returns, stored as the run's
//! `scheduled_time`) is not moved by jitter.

use chrono::{DateTime, TimeDelta, Utc};

use super::{MAX_JITTER_SECS, Schedule};

impl Schedule {
    /// The start delay of the run for `fire` of the binding `binding_id` (its
    /// UUID's 16 bytes): a duration in `[0, jitter_secs]` seconds with
    /// millisecond resolution, zero when `jitter_secs` is 0. The run starts
    /// at `fire + jitter_for(..)`; the fire time itself is unchanged.
    ///
    /// Deterministic in (`binding_id`, `fire`) and identical on every machine,
    /// platform and Rust version (no `std` hasher): with
    /// `ms = fire.timestamp_millis()` (milliseconds since the Unix epoch,
    /// floor, as `i64`),
    ///
    /// 1. `h` = FNV-1a 64 (offset basis `0xcbf29ce484222325`, prime
    ///    `0x100000001b3`) over the 16 bytes of `binding_id` followed by the
    ///    8 bytes of `ms` in little-endian order;
    /// 2. `z` = SplitMix64's output for state `h`: `z = h + 0x9e3779b97f4a7c15`,
    ///    `z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9`,
    ///    `z = (z ^ (z >> 27)) * 0x94d049bb133111eb`, `z ^= z >> 31`
    ///    (wrapping 64-bit arithmetic);
    /// 3. jitter = `z % (jitter_secs * 1000 + 1)` milliseconds.
    ///
    /// The modulo bias is below 1e-11. A `jitter_secs` above
    /// [`MAX_JITTER_SECS`] (invalid) is treated as `MAX_JITTER_SECS`.
    #[must_use]
    pub fn jitter_for(&self, binding_id: &[u8; 16], fire: DateTime<Utc>) -> TimeDelta {
        let max_secs = self.jitter_secs.min(MAX_JITTER_SECS);
        if max_secs == 0 {
            return TimeDelta::zero();
        }
        let millis = fire.timestamp_millis();
        let h = fnv1a64(
            binding_id
                .iter()
                .chain(millis.to_le_bytes().iter())
                .copied(),
        );
        let range = u64::from(max_secs) * 1000 + 1;
        let jitter_ms = splitmix64(h) % range;
        // jitter_ms <= 86_400_000: always representable.
        i64::try_from(jitter_ms)
            .ok()
            .and_then(TimeDelta::try_milliseconds)
            .unwrap_or_else(TimeDelta::zero)
    }
}

/// FNV-1a, 64 bits.
fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's output for state `x` (Steele, Lea, Flood 2014; the
/// `splitmix64.c` reference of Vigna).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    #[test]
    fn jitter_is_a_fixed_hash() {
        // Known-answer vectors of the two building blocks.
        assert_eq!(fnv1a64(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64([]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);

        let mut ids: Vec<[u8; 16]> = Vec::new();
        let mut counting = [0u8; 16];
        for (i, b) in counting.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap_or(0);
        }
        ids.push(counting);
        ids.push([0xff; 16]);
        ids.push([0; 16]);
        // Values computed independently (a 15-line Python implementation of
        // the algorithm documented on `jitter_for`).
        let table: [(usize, &str, u32, i64); 12] = [
            (0, "2025-01-01T00:00:00Z", 60, 47_898),
            (0, "2025-01-01T00:00:00Z", 86_400, 78_982_732),
            (0, "2025-01-01T01:00:00Z", 60, 42_208),
            (0, "0001-01-01T00:00:00Z", 3_600, 3_077_146),
            (1, "2025-01-01T00:00:00Z", 60, 57_725),
            (1, "2025-01-01T00:00:00Z", 86_400, 70_589_751),
            (1, "2025-01-01T01:00:00Z", 60, 20_914),
            (1, "0001-01-01T00:00:00Z", 3_600, 954_235),
            (2, "2025-01-01T00:00:00Z", 60, 55_280),
            (2, "2025-01-01T00:00:00Z", 86_400, 69_536_280),
            (2, "2025-01-01T01:00:00Z", 60, 17_047),
            (2, "0001-01-01T00:00:00Z", 3_600, 2_033_361),
        ];
        for (id, fire, jitter_secs, want_ms) in table {
            let mut s = daily("09:00", "UTC");
            s.jitter_secs = jitter_secs;
            assert_eq!(
                s.jitter_for(&ids[id], utc(fire)),
                TimeDelta::milliseconds(want_ms),
                "{id} {fire} {jitter_secs}"
            );
        }

        // Zero jitter: always zero. Sub-millisecond parts of the fire time
        // do not matter.
        let mut s = daily("09:00", "UTC");
        assert_eq!(
            s.jitter_for(&counting, utc("2025-01-01T00:00:00Z")),
            TimeDelta::zero()
        );
        s.jitter_secs = 10;
        assert_eq!(
            s.jitter_for(&counting, utc("2025-01-01T00:00:00.0004Z")),
            s.jitter_for(&counting, utc("2025-01-01T00:00:00Z"))
        );

        // Range and rough uniformity over 20 000 hourly fires of one binding:
        // all in [0, 10 s], mean near 5 s, every 1-second bucket used.
        let mut sum = 0i64;
        let mut buckets = [0u32; 11];
        let start = utc("2025-01-01T00:00:00Z");
        for k in 0..20_000 {
            let fire = start + TimeDelta::hours(k);
            let j = s.jitter_for(&counting, fire).num_milliseconds();
            assert!((0..=10_000).contains(&j), "{j}");
            sum += j;
            buckets[usize::try_from(j / 1_000).unwrap_or(0)] += 1;
        }
        let mean = sum / 20_000;
        assert!((4_800..=5_200).contains(&mean), "mean {mean} ms");
        for (i, &n) in buckets.iter().take(10).enumerate() {
            assert!((1_700..=2_300).contains(&n), "bucket {i}: {n}");
        }
        // Different bindings firing at the same time are spread too.
        let spread: std::collections::BTreeSet<i64> = (0u8..=255)
            .map(|b| {
                let mut id = [0u8; 16];
                id[15] = b;
                s.jitter_for(&id, start).num_milliseconds()
            })
            .collect();
        assert!(spread.len() > 240, "{}", spread.len());

        // Out-of-range jitter_secs and extreme instants never panic.
        s.jitter_secs = u32::MAX;
        for t in [DateTime::<Utc>::MIN_UTC, start, DateTime::<Utc>::MAX_UTC] {
            let j = s.jitter_for(&[7; 16], t);
            assert!(j >= TimeDelta::zero() && j <= TimeDelta::seconds(86_400));
        }
    }
}
