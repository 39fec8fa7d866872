//! The calendar kinds: daily, weekly, monthly and yearly fire times.
//!
//! All four fire once on each selected local calendar date at
//! [`TimeOfDay`] (whole seconds) on the wall clock of the time zone, with
//! exactly the fixed-time DST rules of [`wall_clock`](super::wall_clock): a
//! time of day inside a gap fires at the first instant after the gap
//! (`dst_shifted`), a repeated time of day fires at its first occurrence. They are evaluated by a direct calendar
//! walk (no croner), because two of their rules are not cron semantics.
//!
//! * [`ScheduleKind::Daily`](super::ScheduleKind::Daily) – every local
//!   date. Same as the cron job `S M H * * *`.
//! * [`ScheduleKind::Weekly`](super::ScheduleKind::Weekly) – every local
//!   date whose weekday is listed in `days_of_week` (0 = Sunday .. 6 =
//!   Saturday; non-empty, no duplicates).
//! * [`ScheduleKind::Monthly`](super::ScheduleKind::Monthly) – day
//!   `day_of_month` (1-31) of every month, or its last day for `-1`. A day the month lacks fires on that month's
//!   last day, once: day 31 fires on 30 April and on 28/29 February (not on
//!   1 May / 1 March, and never twice in one month). Day 29, 30 or 31 in
//!   February all fire on 28 February in common years and 29 February in leap
//!   years.
//! * [`ScheduleKind::Yearly`](super::ScheduleKind::Yearly) – `month`/`day`
//!   every year. 29 February fires on 28 February in common years. A date
//!   that never exists (31 April, 30 February) is rejected by
//!   [`Schedule::validate`](super::Schedule::validate).
//!
//! Fire times are produced for the years 1 to 9999; beyond that the answer
//! is `None`.

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

use super::wall_clock::{next_fixed_time, parse_zone, search_start};
use super::{Fire, MAX_MONTH_DAYS, TimeOfDay};

/// Last year in which calendar kinds produce fire times.
const MAX_CALENDAR_YEAR: i32 = 9999;

/// Which local dates a calendar kind selects (parameters already checked).
#[derive(Debug, Clone, Copy)]
pub(super) enum Calendar {
    Daily,
    /// Bit `d` set = weekday `d` (0 = Sunday) selected; non-zero.
    Weekly(u8),
    /// Day 1-31, clamped to the month's length (31 = last day).
    Monthly(u8),
    /// Month 1-12 and day, clamped to the month's length (29 February → 28
    /// in common years).
    Yearly(u8, u8),
}

impl Calendar {
    /// The first selected date on or after `date`, `None` past year 9999.
    fn first_on_or_after(self, date: NaiveDate) -> Option<NaiveDate> {
        let found = match self {
            Calendar::Daily => Some(date),
            Calendar::Weekly(mask) => {
                let mut d = date;
                let mut found = None;
                for _ in 0..7 {
                    if mask & (1 << d.weekday().num_days_from_sunday()) != 0 {
                        found = Some(d);
                        break;
                    }
                    d = d.succ_opt()?;
                }
                found
            }
            Calendar::Monthly(day) => {
                let (mut year, mut month) = (date.year(), date.month());
                let mut found = None;
                for _ in 0..2 {
                    let d = clamped_date(year, month, day)?;
                    if d >= date {
                        found = Some(d);
                        break;
                    }
                    (year, month) = if month == 12 {
                        (year.checked_add(1)?, 1)
                    } else {
                        (year, month + 1)
                    };
                }
                found
            }
            Calendar::Yearly(month, day) => {
                let mut found = None;
                for year in [date.year(), date.year().checked_add(1)?] {
                    let d = clamped_date(year, u32::from(month), day)?;
                    if d >= date {
                        found = Some(d);
                        break;
                    }
                }
                found
            }
        }?;
        (found.year() <= MAX_CALENDAR_YEAR).then_some(found)
    }

    /// The first selected wall time strictly after `wall`, at `time` on a
    /// selected date.
    fn next_wall(self, time: NaiveTime, wall: NaiveDateTime) -> Option<NaiveDateTime> {
        let date = self.first_on_or_after(wall.date())?;
        let candidate = date.and_time(time);
        if candidate > wall {
            return Some(candidate);
        }
        Some(self.first_on_or_after(date.succ_opt()?)?.and_time(time))
    }
}

/// `year-month-day`, with `day` clamped to the month's length.
fn clamped_date(year: i32, month: u32, day: u8) -> Option<NaiveDate> {
    let len = days_in_month(year, month)?;
    NaiveDate::from_ymd_opt(year, month, u32::from(day).min(len))
}

/// Days in `month` of `year` (proleptic Gregorian, as chrono).
fn days_in_month(year: i32, month: u32) -> Option<u32> {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    match month {
        2 => Some(if leap { 29 } else { 28 }),
        1..=12 => MAX_MONTH_DAYS.get(month as usize - 1).copied(),
        _ => None,
    }
}

pub(super) fn calendar_next_after(
    calendar: Calendar,
    time_of_day: TimeOfDay,
    zone: &str,
    after: DateTime<Utc>,
) -> Option<Fire> {
    let tz = parse_zone(zone)?;
    let time = time_of_day.to_naive_time()?;
    if after.year() > MAX_CALENDAR_YEAR {
        return None;
    }
    let start = search_start(after)?;
    let (wall, fire) = next_fixed_time(tz, start, |w| calendar.next_wall(time, w))?;
    Some(Fire {
        time: fire,
        // The asked-for time of day is the only one of its date: if it does
        // not exist, the gap's end is never an asked-for time too.
        dst_shifted: matches!(tz.from_local_datetime(&wall), LocalResult::None),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use chrono_tz::Tz;

    /// Daily fixed-time jobs over three years of New York: one fire per local
    /// date, strictly increasing, at the wall time (or 03:00 on gap days).
    #[test]
    fn daily_new_york_three_years_one_fire_per_local_date() {
        let tz: Tz = "America/New_York".parse().unwrap_or(Tz::UTC);
        let first = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap_or_default();
        let last = chrono::NaiveDate::from_ymd_opt(2026, 12, 31).unwrap_or_default();
        for (expr, hour, minute) in [("30 2 * * *", 2, 30), ("30 1 * * *", 1, 30)] {
            let s = cron(expr, "America/New_York");
            let all = fires_between(&s, utc("2024-01-01T05:00:00Z"), utc("2027-01-01T05:00:00Z"));
            let mut date = first;
            let mut gap_days = 0;
            for (t, prev) in all
                .iter()
                .zip(std::iter::once(None).chain(all.iter().map(Some)))
            {
                if let Some(prev) = prev {
                    assert!(t > prev);
                }
                let local = t.with_timezone(&tz).naive_local();
                assert_eq!(local.date(), date, "{expr}: {}", s.describe_local(*t));
                use chrono::Timelike;
                if (local.hour(), local.minute()) != (hour, minute) {
                    // Only 02:30 on spring-forward days may move, to 03:00.
                    assert_eq!((local.hour(), local.minute()), (3, 0), "{expr} {local}");
                    gap_days += 1;
                }
                date = date.succ_opt().unwrap_or(date);
            }
            assert_eq!(
                date,
                last.succ_opt().unwrap_or(last),
                "{expr}: a local date is missing"
            );
            assert_eq!(all.len(), 366 + 365 + 365, "{expr}");
            assert_eq!(gap_days, if hour == 2 { 3 } else { 0 }, "{expr}");
        }
    }

    /// Monthly and yearly over several years: exactly one fire per month
    /// (resp. year), on the clamped day.
    #[test]
    fn monthly_and_yearly_fire_once_per_period() {
        for (day, want_days) in [
            (31i8, [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]),
            (-1, [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]),
            (30, [30, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30]),
            (29, [29, 28, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29]),
            (1, [1; 12]),
        ] {
            let s = monthly(day, "10:00", "UTC");
            let all = fires_between(&s, utc("2025-01-01T00:00:00Z"), utc("2029-01-01T00:00:00Z"));
            assert_eq!(all.len(), 48, "day {day}");
            for (i, t) in all.iter().enumerate() {
                let year = 2025 + i32::try_from(i / 12).unwrap_or(0);
                let month = u32::try_from(i % 12 + 1).unwrap_or(1);
                let leap_feb = year == 2028 && month == 2 && day != 1;
                let want_day = if leap_feb { 29 } else { want_days[i % 12] };
                let want = NaiveDate::from_ymd_opt(year, month, want_day)
                    .and_then(|d| d.and_hms_opt(10, 0, 0))
                    .map(|d| d.and_utc());
                assert_eq!(Some(*t), want, "day {day}");
            }
        }
        let s = yearly(2, 29, "06:00", "UTC");
        assert_eq!(
            fires(&s, utc("2023-06-01T00:00:00Z"), 6),
            vec![
                utc("2024-02-29T06:00:00Z"),
                utc("2025-02-28T06:00:00Z"),
                utc("2026-02-28T06:00:00Z"),
                utc("2027-02-28T06:00:00Z"),
                utc("2028-02-29T06:00:00Z"),
                utc("2029-02-28T06:00:00Z"),
            ]
        );
        // 2100 is not a leap year, 2000 was.
        assert_eq!(
            s.next_after(utc("2099-03-01T00:00:00Z")),
            Some(utc("2100-02-28T06:00:00Z"))
        );
        assert_eq!(
            s.next_after(utc("1999-03-01T00:00:00Z")),
            Some(utc("2000-02-29T06:00:00Z"))
        );
        let s = yearly(12, 31, "23:59:59", "UTC");
        assert_eq!(
            fires(&s, utc("2025-12-31T23:59:59Z"), 2),
            vec![utc("2026-12-31T23:59:59Z"), utc("2027-12-31T23:59:59Z")]
        );
        // Weekly with several days, unordered: Wed, Sat, Mon, ...
        let s = weekly(&[6, 1, 3], "07:00:30", "UTC");
        assert_eq!(
            fires(&s, utc("2025-01-01T00:00:00Z"), 4),
            vec![
                utc("2025-01-01T07:00:30Z"), // Wed
                utc("2025-01-04T07:00:30Z"), // Sat
                utc("2025-01-06T07:00:30Z"), // Mon
                utc("2025-01-08T07:00:30Z"), // Wed
            ]
        );
    }
}
