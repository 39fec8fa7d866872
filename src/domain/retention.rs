//! Retention rules (`docs/operations.md`, "Retention and archive"): how
//! long run history and the audit log are kept, the retention flags'
//! syntax, and the UTC days that `run_events` is partitioned by.
//!
//! A run's events live in the partition of the run's creation day, read
//! from its UUIDv7 id (the 48-bit unix-millisecond prefix). A day's
//! partition is dropped once the whole day lies before the cutoff
//! (`now - retention`): every run in it was created before the cutoff. A
//! run that is *younger* than the retention — not ended, or ended at or
//! after the cutoff — keeps every event: its events move to the default
//! partition before the day goes ([`keeps_history`]).

use chrono::{DateTime, NaiveDate, NaiveTime, TimeDelta, Utc};
use uuid::Uuid;

use super::RunState;

/// Run history kept by default (`--retention`).
pub const DEFAULT_RETENTION_DAYS: i64 = 30;
/// Audit events kept by default (`--audit-retention`).
pub const DEFAULT_AUDIT_RETENTION_DAYS: i64 = 365;
/// The shortest retention accepted: one day (a day partition is the unit
/// dropped).
pub const MIN_RETENTION: TimeDelta = TimeDelta::days(1);
/// The longest retention accepted, in days (100 years).
pub const MAX_RETENTION_DAYS: i64 = 36_525;

/// Parses a retention period: a whole number and a unit, `d` (days), `h`
/// (hours) or `w` (weeks), e.g. `30d`, `36h`, `52w`; at least 1 day, at
/// most [`MAX_RETENTION_DAYS`] days.
///
/// # Errors
/// A sentence naming the accepted form or the bound that was crossed (the
/// flag's name is added by the caller).
pub fn parse_retention(s: &str) -> Result<TimeDelta, String> {
    let t = s.trim();
    let form = "expected a whole number of days, hours or weeks, e.g. 30d, 36h or 52w";
    let Some(unit) = t.chars().last() else {
        return Err(format!("empty; {form}"));
    };
    let digits = &t[..t.len() - unit.len_utf8()];
    let shown: String = t.chars().take(32).collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("`{shown}`: {form}"));
    }
    let per_unit = match unit {
        'd' => 24,
        'h' => 1,
        'w' => 7 * 24,
        _ => return Err(format!("`{shown}`: {form}")),
    };
    let max_hours = MAX_RETENTION_DAYS * 24;
    let hours = digits
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(per_unit))
        .filter(|h| *h <= max_hours)
        .ok_or_else(|| format!("`{shown}` is longer than the maximum of {MAX_RETENTION_DAYS}d"))?;
    let d = TimeDelta::hours(hours);
    if d < MIN_RETENTION {
        return Err(format!("`{shown}` is shorter than the minimum of 1d (24h)"));
    }
    Ok(d)
}

/// Shows a retention period the way [`parse_retention`] reads it (`30d`,
/// `36h`).
pub fn show_retention(d: TimeDelta) -> String {
    if d.num_hours() % 24 == 0 {
        format!("{}d", d.num_days())
    } else {
        format!("{}h", d.num_hours())
    }
}

/// The UTC day of `t`.
pub fn utc_day(t: DateTime<Utc>) -> NaiveDate {
    t.date_naive()
}

/// 00:00 UTC of `day`.
pub fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// The smallest UUID of `day`: the unix milliseconds of 00:00 UTC in the
/// first 48 bits, the rest zero (`sked_run_events_day_floor` in SQL, the
/// bound of the day's partition). Every UUIDv7 made during `day` sorts at
/// or after it, and before the next day's.
pub fn day_floor_id(day: NaiveDate) -> Uuid {
    id_floor(day_start(day))
}

/// The smallest UUID of the millisecond of `t` (the same shape as
/// [`day_floor_id`]): every UUIDv7 made at or after that millisecond sorts
/// at or after it, every one made before sorts before.
pub fn id_floor(t: DateTime<Utc>) -> Uuid {
    let ms = t.timestamp_millis().clamp(0, (1 << 48) - 1) as u64;
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Uuid::from_bytes(b)
}

/// The creation day of a UUIDv7 id (`None` for another version).
pub fn id_day(id: Uuid) -> Option<NaiveDate> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    if id.get_version_num() != 7 {
        return None;
    }
    DateTime::<Utc>::from_timestamp(i64::try_from(secs).ok()?, nanos).map(utc_day)
}

/// Whether every run created on `day` was created before `cutoff`: the
/// day's partition may go.
pub fn day_expired(day: NaiveDate, cutoff: DateTime<Utc>) -> bool {
    day.succ_opt().is_some_and(|next| day_start(next) <= cutoff)
}

/// Today (UTC, at `now`) and the `ahead` days after it: the partitions that
/// must exist so that new runs' events land in their own day.
pub fn days_ahead(now: DateTime<Utc>, ahead: u32) -> Vec<NaiveDate> {
    utc_day(now).iter_days().take(ahead as usize + 1).collect()
}

/// Whether a run keeps its history (its row and every event) at `cutoff`:
/// it has not ended, or it ended (or, without an end time, was created) at
/// or after the cutoff. Retention deletes exactly the runs that do not.
pub fn keeps_history(
    state: RunState,
    end_time: Option<DateTime<Utc>>,
    create_time: DateTime<Utc>,
    cutoff: DateTime<Utc>,
) -> bool {
    !state.is_terminal() || end_time.unwrap_or(create_time) >= cutoff
}

/// A run event as stored (`run_events` row), and one line of an archive
/// file: JSON with the fields in this order, `time` in RFC 3339 (UTC,
/// microseconds), `payload` the stored JSON of the event (`kind` says which
/// shape: `state_changed`, `log`, `progress`, `fired`; docs/semantics.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredEvent {
    /// The run's tenant.
    pub tenant_id: String,
    /// The run.
    pub run_id: Uuid,
    /// Dense per run, from 1.
    pub seq: i64,
    /// When it was written.
    pub time: DateTime<Utc>,
    /// The run's binding.
    pub binding_id: Uuid,
    /// The run's definition.
    pub definition: String,
    /// `state_changed`, `log`, `progress` or `fired`.
    pub kind: String,
    /// The event's body as stored.
    pub payload: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_periods_parse_within_bounds() {
        assert_eq!(parse_retention("30d"), Ok(TimeDelta::days(30)));
        assert_eq!(parse_retention("36h"), Ok(TimeDelta::hours(36)));
        assert_eq!(parse_retention("2w"), Ok(TimeDelta::days(14)));
        assert_eq!(parse_retention(" 1d "), Ok(TimeDelta::days(1)));
        assert_eq!(parse_retention("24h"), Ok(TimeDelta::days(1)));
        for bad in ["", "d", "30", "30m", "-1d", "1.5d", "30 d", "thirty"] {
            let e = parse_retention(bad).unwrap_err();
            assert!(e.contains("e.g. 30d"), "{bad:?}: {e}");
        }
        for short in ["0d", "23h", "0w"] {
            let e = parse_retention(short).unwrap_err();
            assert!(e.contains("minimum of 1d"), "{short}: {e}");
        }
        for long in ["36526d", "99999999999999999999d", "6000w"] {
            let e = parse_retention(long).unwrap_err();
            assert!(e.contains("maximum of 36525d"), "{long}: {e}");
        }
        assert_eq!(show_retention(TimeDelta::days(30)), "30d");
        assert_eq!(show_retention(TimeDelta::hours(36)), "36h");
    }

    #[test]
    fn day_floor_matches_the_partition_bounds() {
        // Bound of run_events_20261202 as PostgreSQL computed it.
        let day = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        assert_eq!(
            day_floor_id(day).to_string(),
            "01a2340d-0c00-0000-0000-000000000000"
        );
        let t = day_start(day) + TimeDelta::hours(23);
        let id = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            t.timestamp() as u64,
            0,
        ));
        assert_eq!(id_day(id), Some(day));
        assert!(day_floor_id(day) <= id && id < day_floor_id(day.succ_opt().unwrap()));
        assert_eq!(id_day(Uuid::new_v4()), None);
    }

    #[test]
    fn a_day_expires_once_all_of_it_is_before_the_cutoff() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        let next = day_start(day.succ_opt().unwrap());
        assert!(day_expired(day, next));
        assert!(!day_expired(day, next - TimeDelta::microseconds(1)));
        let now = day_start(day) + TimeDelta::hours(5);
        let days = days_ahead(now, 7);
        assert_eq!(days.len(), 8);
        assert_eq!(days[0], day);
        assert_eq!(days[7], NaiveDate::from_ymd_opt(2026, 12, 9).unwrap());
    }

    #[test]
    fn runs_keep_history_until_ended_before_the_cutoff() {
        let cutoff = Utc::now();
        let old = cutoff - TimeDelta::days(3);
        assert!(keeps_history(RunState::Queued, None, old, cutoff));
        assert!(keeps_history(RunState::Running, Some(old), old, cutoff));
        assert!(keeps_history(
            RunState::Succeeded,
            Some(cutoff),
            old,
            cutoff
        ));
        assert!(!keeps_history(RunState::Failed, Some(old), old, cutoff));
        assert!(!keeps_history(RunState::Skipped, None, old, cutoff));
        assert!(keeps_history(RunState::Skipped, None, cutoff, cutoff));
    }
}
