//! The interval kind: fire times on the absolute time line.
//!
//! [`ScheduleKind::Interval`](super::ScheduleKind::Interval) fires at
//! `anchor + k * every_secs` for every integer `k` (negative too), on the
//! absolute time line; the time zone is ignored. Computed with 128-bit
//! integer arithmetic, no loops.

use chrono::{DateTime, Utc};

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// Smallest `anchor + k * every_secs > after` over integer `k`, in i128
/// nanoseconds (no overflow for any chrono instant and any i64 period).
pub(super) fn interval_next_after(
    every_secs: i64,
    anchor: DateTime<Utc>,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if every_secs < 1 {
        return None;
    }
    let period = i128::from(every_secs).checked_mul(NANOS_PER_SEC)?;
    let a = epoch_nanos(anchor)?;
    let x = epoch_nanos(after)?;
    let k = x.checked_sub(a)?.div_euclid(period).checked_add(1)?;
    let next = a.checked_add(k.checked_mul(period)?)?;
    let secs = i64::try_from(next.div_euclid(NANOS_PER_SEC)).ok()?;
    let nanos = u32::try_from(next.rem_euclid(NANOS_PER_SEC)).ok()?;
    DateTime::from_timestamp(secs, nanos)
}

fn epoch_nanos(t: DateTime<Utc>) -> Option<i128> {
    i128::from(t.timestamp())
        .checked_mul(NANOS_PER_SEC)?
        .checked_add(i128::from(t.timestamp_subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use super::*;

    #[test]
    fn interval_next_after_table() {
        let table: &[(&str, i64, &str, &str, &str)] = &[
            (
                "daily grid anchored years in the past",
                86_400,
                "2020-01-01T00:00:00Z",
                "2025-06-15T12:34:56Z",
                "2025-06-16T00:00:00Z",
            ),
            (
                "weekly grid keeps the anchor's weekday (Wednesday)",
                7 * 86_400,
                "2020-01-01T00:00:00Z",
                "2025-06-15T12:00:00Z",
                "2025-06-18T00:00:00Z",
            ),
            (
                "90 minutes divides a day: 00:00, 01:30, ..., 10:30",
                5_400,
                "2020-01-01T00:00:00Z",
                "2025-06-15T10:00:00Z",
                "2025-06-15T10:30:00Z",
            ),
            (
                "hourly at :00:17",
                3_600,
                "2019-03-10T00:00:17Z",
                "2025-06-15T12:00:00Z",
                "2025-06-15T12:00:17Z",
            ),
            (
                "every second, anchor 54 years back, sub-second after",
                1,
                "1971-01-01T00:00:00Z",
                "2025-06-15T12:34:56.5Z",
                "2025-06-15T12:34:57Z",
            ),
            (
                "exact boundary: after == fire time gives the next one",
                3_600,
                "2020-01-01T00:00:00Z",
                "2025-06-15T12:00:00Z",
                "2025-06-15T13:00:00Z",
            ),
            (
                "one nanosecond before a fire time gives that fire",
                3_600,
                "2020-01-01T00:00:00Z",
                "2025-06-15T11:59:59.999999999Z",
                "2025-06-15T12:00:00Z",
            ),
            (
                "anchor in the future: first fire is the anchor itself",
                86_400,
                "2025-01-01T00:00:00Z",
                "2024-12-31T12:00:00Z",
                "2025-01-01T00:00:00Z",
            ),
            (
                "anchor far in the future: negative k",
                86_400,
                "2030-01-01T00:00:00Z",
                "2024-12-01T06:00:00Z",
                "2024-12-02T00:00:00Z",
            ),
            (
                "anchor with sub-second part",
                10,
                "2025-01-01T00:00:00.25Z",
                "2025-01-01T00:00:00.25Z",
                "2025-01-01T00:00:10.25Z",
            ),
        ];
        for (name, every, anchor, after, want) in table {
            let s = interval(*every, Some(anchor));
            assert_eq!(s.validate("binding.schedule"), Ok(()), "{name}");
            assert_eq!(s.next_after(utc(after)), Some(utc(want)), "{name}");
        }
    }

    #[test]
    fn interval_edge_cases_never_panic() {
        assert_eq!(
            interval(60, None).next_after(utc("2025-01-01T00:00:00Z")),
            None
        );
        assert_eq!(
            interval(0, Some("2025-01-01T00:00:00Z")).next_after(utc("2025-01-01T00:00:00Z")),
            None
        );
        let huge = interval(i64::MAX, Some("2025-01-01T00:00:00Z"));
        assert_eq!(
            huge.next_after(utc("2024-01-01T00:00:00Z")),
            Some(utc("2025-01-01T00:00:00Z"))
        );
        assert_eq!(huge.next_after(utc("2025-01-01T00:00:00Z")), None);
        let extreme = Schedule::new(
            ScheduleKind::Interval {
                every_secs: 1,
                anchor_time: Some(DateTime::<Utc>::MIN_UTC),
            },
            "UTC".to_string(),
        );
        assert_eq!(extreme.next_after(DateTime::<Utc>::MAX_UTC), None);
        assert!(extreme.next_after(utc("2025-01-01T00:00:00Z")).is_some());
    }
}
