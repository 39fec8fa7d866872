//! [`Schedule::validate`]: every check of a schedule and its error messages.

use chrono::{Datelike, SecondsFormat};

use super::cron::CronSpec;
use super::wall_clock::parse_zone;
use super::{
    CRON_LAST_YEAR, MAX_CRON_LEN, MAX_INTERVAL_SECS, MAX_JITTER_SECS, MAX_MONTH_DAYS, Schedule,
    ScheduleError, ScheduleKind,
};

impl Schedule {
    /// Validates everything: the cron expression (5 or 6 fields, every field
    /// in range, at least one possible day), `every_secs >= 1`, `at` within
    /// years 1 to 9999, the calendar kinds' parameters, the time zone
    /// (non-empty and known to `chrono-tz`, for every kind), then
    /// `jitter_secs <= 86400`, `start_time` / `end_time` within years 1 to
    /// 9999 and `end_time > start_time`.
    ///
    /// `field_prefix` is the API path of the schedule, e.g.
    /// `"definition.schedule"` or `"binding.schedule"`.
    ///
    /// # Errors
    ///
    /// The first problem found, in the order above, as a [`ScheduleError`]
    /// whose `field` is `field_prefix` + one of the suffixes listed on
    /// [`ScheduleError::field`]. Examples of reasons:
    /// `expected 5 fields (minute hour day-of-month month day-of-week) or 6
    /// (second minute hour day-of-month month day-of-week), got 3`,
    /// `field 1 (minute): invalid value "x"`,
    /// `must be at least 1 second`, `unknown IANA time zone "Mars/Base"`,
    /// `hour 24 is out of range 0-23`, `duplicate day 1 (Monday)`,
    /// `April has 30 days, so day 31 never occurs`.
    pub fn validate(&self, field_prefix: &str) -> Result<(), ScheduleError> {
        let fail = |suffix: &str, reason: String| ScheduleError {
            field: format!("{field_prefix}{suffix}"),
            reason,
        };
        match &self.kind {
            ScheduleKind::Cron { expression } => {
                if expression.len() > MAX_CRON_LEN {
                    return Err(fail(
                        ".cron.expression",
                        format!(
                            "is {} bytes; at most {MAX_CRON_LEN} bytes",
                            expression.len()
                        ),
                    ));
                }
                let spec = CronSpec::parse(expression)
                    .map_err(|reason| fail(".cron.expression", reason))?;
                if let Some(reason) = spec.never_fires_reason() {
                    return Err(fail(".cron.expression", reason));
                }
                spec.to_croner()
                    .map_err(|e| fail(".cron.expression", e.to_string()))?;
                if let Some(start) = self.start_time
                    && start.year() > CRON_LAST_YEAR
                {
                    return Err(fail(
                        ".start_time",
                        format!("cron schedules compute fire times up to year {CRON_LAST_YEAR}"),
                    ));
                }
            }
            ScheduleKind::Interval { every_secs, .. } => {
                if *every_secs < 1 {
                    return Err(fail(
                        ".interval.every",
                        "must be at least 1 second".to_string(),
                    ));
                }
                if *every_secs > MAX_INTERVAL_SECS {
                    return Err(fail(
                        ".interval.every",
                        format!(
                            "{every_secs}s is over the limit of {MAX_INTERVAL_SECS}s (100 years)"
                        ),
                    ));
                }
            }
            ScheduleKind::Once { at } => {
                if !(1..=9999).contains(&at.year()) {
                    return Err(fail(".once.at", YEAR_RANGE_REASON.to_string()));
                }
            }
            ScheduleKind::Manual => {}
            ScheduleKind::Daily { time_of_day } => {
                time_of_day
                    .check()
                    .map_err(|r| fail(".daily.time_of_day", r))?;
            }
            ScheduleKind::Weekly {
                days_of_week,
                time_of_day,
            } => {
                check_days_of_week(days_of_week).map_err(|r| fail(".weekly.days_of_week", r))?;
                time_of_day
                    .check()
                    .map_err(|r| fail(".weekly.time_of_day", r))?;
            }
            ScheduleKind::Monthly {
                day_of_month,
                time_of_day,
            } => {
                if !(*day_of_month == -1 || (1..=31).contains(day_of_month)) {
                    return Err(fail(
                        ".monthly.day_of_month",
                        format!(
                            "must be 1-31, or -1 for the last day of the month; got {day_of_month}"
                        ),
                    ));
                }
                time_of_day
                    .check()
                    .map_err(|r| fail(".monthly.time_of_day", r))?;
            }
            ScheduleKind::Yearly {
                month,
                day,
                time_of_day,
            } => {
                let Some(&max_day) = usize::from(*month)
                    .checked_sub(1)
                    .and_then(|i| MAX_MONTH_DAYS.get(i))
                else {
                    return Err(fail(
                        ".yearly.month",
                        format!("must be 1-12 (1 = January); got {month}"),
                    ));
                };
                if *day < 1 || u32::from(*day) > max_day {
                    let reason = if *day < 1 || *day > 31 {
                        format!("must be 1-31; got {day}")
                    } else {
                        let name = FULL_MONTH_NAMES
                            .get(usize::from(*month) - 1)
                            .copied()
                            .unwrap_or("this month");
                        if *month == 2 {
                            format!(
                                "February has at most 29 days, so day {day} never occurs (29 fires on 28 February in common years)"
                            )
                        } else {
                            format!("{name} has {max_day} days, so day {day} never occurs")
                        }
                    };
                    return Err(fail(".yearly.day", reason));
                }
                time_of_day
                    .check()
                    .map_err(|r| fail(".yearly.time_of_day", r))?;
            }
        }
        if self.timezone.is_empty() {
            return Err(fail(
                ".timezone",
                "must not be empty (give an IANA time zone name such as \"UTC\")".to_string(),
            ));
        }
        if parse_zone(&self.timezone).is_none() {
            return Err(fail(
                ".timezone",
                format!("unknown IANA time zone \"{}\"", self.timezone),
            ));
        }
        if self.jitter_secs > MAX_JITTER_SECS {
            return Err(fail(
                ".jitter_secs",
                format!(
                    "must be at most {MAX_JITTER_SECS} seconds (one day); got {}",
                    self.jitter_secs
                ),
            ));
        }
        for (suffix, t) in [
            (".start_time", self.start_time),
            (".end_time", self.end_time),
        ] {
            if let Some(t) = t
                && !(1..=9999).contains(&t.year())
            {
                return Err(fail(suffix, YEAR_RANGE_REASON.to_string()));
            }
        }
        if let (Some(start), Some(end)) = (self.start_time, self.end_time)
            && end <= start
        {
            return Err(fail(
                ".end_time",
                format!(
                    "must be after start_time ({})",
                    start.to_rfc3339_opts(SecondsFormat::AutoSi, true)
                ),
            ));
        }
        Ok(())
    }
}

const YEAR_RANGE_REASON: &str = "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z";

/// `days_of_week` is non-empty, each 0-6, no duplicates.
pub(super) fn check_days_of_week(days: &[u8]) -> Result<(), String> {
    if days.is_empty() {
        return Err("must list at least one day (0 = Sunday .. 6 = Saturday)".to_string());
    }
    let mut seen = 0u8;
    for &day in days {
        let Some(name) = FULL_DAY_NAMES.get(usize::from(day)) else {
            return Err(format!(
                "{day} is out of range 0-6 (0 = Sunday .. 6 = Saturday)"
            ));
        };
        if seen & (1 << day) != 0 {
            return Err(format!("duplicate day {day} ({name})"));
        }
        seen |= 1 << day;
    }
    Ok(())
}

const FULL_DAY_NAMES: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const FULL_MONTH_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use super::*;

    #[test]
    fn other_validation_errors() {
        let table = [
            (
                Schedule::new(ScheduleKind::Manual, "Mars/Base".to_string()),
                "binding.schedule.timezone",
                "unknown IANA time zone \"Mars/Base\"",
            ),
            (
                cron("0 * * * *", "utc"),
                "binding.schedule.timezone",
                "unknown IANA time zone \"utc\"",
            ),
            (
                cron("0 * * * *", ""),
                "binding.schedule.timezone",
                "must not be empty (give an IANA time zone name such as \"UTC\")",
            ),
            (
                interval(0, None),
                "binding.schedule.interval.every",
                "must be at least 1 second",
            ),
            (
                interval(-60, Some("2025-01-01T00:00:00Z")),
                "binding.schedule.interval.every",
                "must be at least 1 second",
            ),
            (
                Schedule::new(
                    ScheduleKind::Once {
                        at: DateTime::<Utc>::MAX_UTC,
                    },
                    "UTC".to_string(),
                ),
                "binding.schedule.once.at",
                "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
            ),
        ];
        for (s, field, reason) in table {
            let err = s.validate("binding.schedule");
            assert_eq!(
                err,
                Err(ScheduleError {
                    field: field.to_string(),
                    reason: reason.to_string(),
                }),
                "{s:?}"
            );
        }
        let err = interval(0, None).validate("p").err();
        assert_eq!(
            err.map(|e| e.to_string()),
            Some("p.interval.every: must be at least 1 second".to_string())
        );
        // A bad zone makes cron evaluation return None, not panic.
        assert_eq!(
            cron("0 * * * *", "Mars/Base").next_after(utc("2025-01-01T00:00:00Z")),
            None
        );
        // Zone names with links are fine.
        assert_eq!(cron("0 * * * *", "US/Eastern").validate("p"), Ok(()));
    }

    #[test]
    fn new_field_validation_errors() {
        let with = |mut s: Schedule, f: &dyn Fn(&mut Schedule)| {
            f(&mut s);
            s
        };
        let t = |h: u8, m: u8, sec: u8| TimeOfDay {
            hour: h,
            minute: m,
            second: sec,
        };
        let table: Vec<(Schedule, &str, String)> = vec![
            (
                Schedule::new(ScheduleKind::Daily { time_of_day: t(24, 0, 0) }, "UTC"),
                ".daily.time_of_day",
                "hour 24 is out of range 0-23".into(),
            ),
            (
                Schedule::new(ScheduleKind::Daily { time_of_day: t(0, 0, 60) }, "UTC"),
                ".daily.time_of_day",
                "second 60 is out of range 0-59".into(),
            ),
            (
                weekly(&[], "09:00", "UTC"),
                ".weekly.days_of_week",
                "must list at least one day (0 = Sunday .. 6 = Saturday)".into(),
            ),
            (
                weekly(&[1, 7], "09:00", "UTC"),
                ".weekly.days_of_week",
                "7 is out of range 0-6 (0 = Sunday .. 6 = Saturday)".into(),
            ),
            (
                weekly(&[1, 3, 1], "09:00", "UTC"),
                ".weekly.days_of_week",
                "duplicate day 1 (Monday)".into(),
            ),
            (
                Schedule::new(
                    ScheduleKind::Weekly {
                        days_of_week: vec![2],
                        time_of_day: t(9, 60, 0),
                    },
                    "UTC",
                ),
                ".weekly.time_of_day",
                "minute 60 is out of range 0-59".into(),
            ),
            (
                monthly(0, "09:00", "UTC"),
                ".monthly.day_of_month",
                "must be 1-31, or -1 for the last day of the month; got 0".into(),
            ),
            (
                monthly(32, "09:00", "UTC"),
                ".monthly.day_of_month",
                "must be 1-31, or -1 for the last day of the month; got 32".into(),
            ),
            (
                monthly(-2, "09:00", "UTC"),
                ".monthly.day_of_month",
                "must be 1-31, or -1 for the last day of the month; got -2".into(),
            ),
            (
                Schedule::new(
                    ScheduleKind::Monthly {
                        day_of_month: 5,
                        time_of_day: t(30, 0, 0),
                    },
                    "UTC",
                ),
                ".monthly.time_of_day",
                "hour 30 is out of range 0-23".into(),
            ),
            (
                yearly(0, 1, "09:00", "UTC"),
                ".yearly.month",
                "must be 1-12 (1 = January); got 0".into(),
            ),
            (
                yearly(13, 1, "09:00", "UTC"),
                ".yearly.month",
                "must be 1-12 (1 = January); got 13".into(),
            ),
            (
                yearly(4, 31, "09:00", "UTC"),
                ".yearly.day",
                "April has 30 days, so day 31 never occurs".into(),
            ),
            (
                yearly(11, 31, "09:00", "UTC"),
                ".yearly.day",
                "November has 30 days, so day 31 never occurs".into(),
            ),
            (
                yearly(2, 30, "09:00", "UTC"),
                ".yearly.day",
                "February has at most 29 days, so day 30 never occurs (29 fires on 28 February in common years)".into(),
            ),
            (
                yearly(1, 0, "09:00", "UTC"),
                ".yearly.day",
                "must be 1-31; got 0".into(),
            ),
            (
                yearly(1, 32, "09:00", "UTC"),
                ".yearly.day",
                "must be 1-31; got 32".into(),
            ),
            (
                Schedule::new(
                    ScheduleKind::Yearly {
                        month: 2,
                        day: 29,
                        time_of_day: t(0, 61, 0),
                    },
                    "UTC",
                ),
                ".yearly.time_of_day",
                "minute 61 is out of range 0-59".into(),
            ),
            (
                daily("09:00", "Mars/Base"),
                ".timezone",
                "unknown IANA time zone \"Mars/Base\"".into(),
            ),
            (
                with(daily("09:00", "UTC"), &|s| s.jitter_secs = 86_401),
                ".jitter_secs",
                "must be at most 86400 seconds (one day); got 86401".into(),
            ),
            (
                with(daily("09:00", "UTC"), &|s| s.jitter_secs = u32::MAX),
                ".jitter_secs",
                "must be at most 86400 seconds (one day); got 4294967295".into(),
            ),
            (
                window(
                    daily("09:00", "UTC"),
                    Some("2025-06-01T00:00:00Z"),
                    Some("2025-06-01T00:00:00Z"),
                ),
                ".end_time",
                "must be after start_time (2025-06-01T00:00:00Z)".into(),
            ),
            (
                window(
                    interval(60, Some("2025-01-01T00:00:00Z")),
                    Some("2025-06-01T00:00:00.5Z"),
                    Some("2025-05-01T00:00:00Z"),
                ),
                ".end_time",
                "must be after start_time (2025-06-01T00:00:00.500Z)".into(),
            ),
            (
                with(cron("0 * * * *", "UTC"), &|s| {
                    s.start_time = Some(DateTime::<Utc>::MIN_UTC);
                }),
                ".start_time",
                YEAR_RANGE_REASON.into(),
            ),
            (
                with(Schedule::new(ScheduleKind::Manual, "UTC"), &|s| {
                    s.end_time = Some(DateTime::<Utc>::MAX_UTC);
                }),
                ".end_time",
                YEAR_RANGE_REASON.into(),
            ),
        ];
        for (s, suffix, reason) in table {
            assert_eq!(
                s.validate("binding.schedule"),
                Err(ScheduleError {
                    field: format!("binding.schedule{suffix}"),
                    reason,
                }),
                "{s:?}"
            );
            // Invalid schedules never panic; invalid kinds never fire.
            let _ = s.next_fire_after(utc("2025-01-01T00:00:00Z"));
        }
        // Valid edge values.
        for s in [
            with(daily("23:59:59", "UTC"), &|s| {
                s.jitter_secs = MAX_JITTER_SECS
            }),
            weekly(&[0, 1, 2, 3, 4, 5, 6], "00:00", "UTC"),
            monthly(-1, "00:00", "UTC"),
            monthly(31, "00:00", "UTC"),
            yearly(2, 29, "00:00", "UTC"),
            yearly(12, 31, "00:00", "UTC"),
            window(
                daily("09:00", "UTC"),
                Some("2025-06-01T00:00:00Z"),
                Some("2025-06-01T00:00:00.001Z"),
            ),
            window(daily("09:00", "UTC"), None, Some("2025-06-01T00:00:00Z")),
        ] {
            assert_eq!(s.validate("p"), Ok(()), "{s:?}");
        }
    }
}
