//! Schedules: *when* a binding fires.
//!
//! A [`Schedule`] is one of eight kinds ([`ScheduleKind`]): a 5- or 6-field
//! cron expression evaluated on the wall clock of an IANA time zone, four
//! calendar kinds (daily, weekly, monthly, yearly at a [`TimeOfDay`]) on the
//! same wall clock, a fixed interval on the absolute time line, a single
//! instant, or manual (never fires by itself). Every kind may carry a
//! jitter ([`Schedule::jitter_secs`]) and an active window
//! ([`Schedule::start_time`], [`Schedule::end_time`]). A schedule is stored as
//! JSON (serde) in PostgreSQL; the JSON shape is pinned by the
//! `serde_shape_is_stable` test.
//!
//! The one question the scheduler asks is [`Schedule::next_after`]: the first
//! fire time strictly after a given instant ([`Schedule::next_fire_after`]
//! answers the same question and also says whether a DST gap moved the fire).
//! It is pure and deterministic (no clock is read), never panics, and answers
//! `None` when the schedule never fires again.
//!
//! Where the rules live (each file's module docs state its rules in full;
//! `docs/semantics.md`, "Schedules", is the product-level summary):
//!
//! | file             | inside                                                               |
//! |------------------|----------------------------------------------------------------------|
//! | `mod.rs`         | the public types, [`Schedule::next_fire_after`] dispatch, the window |
//! | `cron.rs`        | cron syntax, macros, `L`, the Vixie day rule; parsing and messages  |
//! | `wall_clock.rs`  | time zones and DST: wildcard vs fixed-time jobs, cron evaluation     |
//! | `calendar.rs`    | the daily, weekly, monthly and yearly kinds                          |
//! | `interval.rs`    | the interval kind                                                    |
//! | `jitter.rs`      | [`Schedule::jitter_for`] and its fixed hash                          |
//! | `validate.rs`    | [`Schedule::validate`] and its error messages                        |
//! | `time_of_day.rs` | [`TimeOfDay`] parsing, display and serde                             |
//! | `tests.rs`       | shared test helpers, the fire-time table, the serde shape            |
//!
//! # Once, manual and the active window
//!
//! * [`ScheduleKind::Once`] fires at `at` only.
//! * [`ScheduleKind::Manual`] never fires by itself.
//! * [`Schedule::start_time`]: no fire before it; the first fire is the first
//!   schedule time `>= start_time`. It clips, it does not move anything: an
//!   interval keeps its anchor grid, a cron or calendar job its wall times.
//! * [`Schedule::end_time`]: no fire after it (a fire exactly at `end_time`
//!   still happens). Must be after `start_time` when both are given.

mod calendar;
mod cron;
mod interval;
mod jitter;
#[cfg(test)]
mod tests;
mod time_of_day;
mod validate;
mod wall_clock;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use calendar::{Calendar, calendar_next_after};
use interval::interval_next_after;
use validate::check_days_of_week;
use wall_clock::{cron_next_after, local_wall_time, parse_zone};

/// Largest accepted [`Schedule::jitter_secs`]: one day, in seconds.
pub const MAX_JITTER_SECS: u32 = 86_400;
/// Last year a cron schedule computes fire times in (croner's search ends
/// before its `YEAR_UPPER_LIMIT`); a cron schedule starting later is refused.
pub const CRON_LAST_YEAR: i32 = croner::YEAR_UPPER_LIMIT - 1;

/// The latest fire time of any schedule: 9999-12-31T23:59:59.999999Z, the
/// end of the protobuf Timestamp range (at microsecond precision).
pub fn latest_fire_time() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 999_999_000).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Longest cron expression, in bytes. With [`MAX_CRON_ITEMS`] this keeps one
/// fire-time computation cheap (microseconds), whatever the expression.
pub const MAX_CRON_LEN: usize = 256;
/// Most comma-separated items in one cron field.
pub const MAX_CRON_ITEMS: usize = 64;
/// Longest interval: 100 years of 365.25 days, in seconds.
pub const MAX_INTERVAL_SECS: i64 = 3_155_760_000;

/// A schedule: when a binding fires.
///
/// Stored as JSON in PostgreSQL; the shape is
/// `{"kind": "cron", "expression": "30 2 * * *", "timezone": "UTC"}`
/// (see [`ScheduleKind`] for the other kinds), plus the optional
/// `"jitter_secs"`, `"start_time"` and `"end_time"`, which are left out when
/// unset so that older stored JSON and newer JSON without them are the same.
/// Build it from API input (or with [`Schedule::new`]), call
/// [`Schedule::validate`], then [`Schedule::resolve_anchor`] with the creation
/// time before storing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// What kind of schedule this is, with its parameters.
    #[serde(flatten)]
    pub kind: ScheduleKind,
    /// IANA zone name, e.g. `"Europe/Berlin"`; `"UTC"` when the user gave none.
    ///
    /// Must be a name known to `chrono-tz` (case-sensitive, e.g. `"UTC"`, not
    /// `"utc"`); the empty string is invalid at this layer. Cron and the
    /// calendar kinds use it for evaluation; it is validated for every kind.
    pub timezone: String,
    /// Upper bound of the per-run start delay, in whole seconds: each run
    /// starts at `fire + `[`Schedule::jitter_for`]`(..)`, a delay in
    /// `[0, jitter_secs]` s. `0` (the default) means no jitter; at most
    /// [`MAX_JITTER_SECS`] (86 400 s). Does not change fire times.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub jitter_secs: u32,
    /// No fire earlier than this instant (UTC): the first fire is the first
    /// schedule time `>= start_time`. `None` (the default): no lower bound.
    /// Does not move an interval's anchor grid. Years 1 to 9999.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_rfc3339")]
    pub start_time: Option<DateTime<Utc>>,
    /// No fire later than this instant (UTC); a fire exactly at `end_time`
    /// still happens. `None` (the default): no upper bound. Must be after
    /// `start_time` when both are set. Years 1 to 9999.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_rfc3339")]
    pub end_time: Option<DateTime<Utc>>,
}

/// The kind of a [`Schedule`] and its parameters.
///
/// Serialized internally tagged with `"kind"` in snake_case:
/// `{"kind":"cron","expression":"0 * * * *"}`,
/// `{"kind":"interval","every_secs":60,"anchor_time":"2025-01-01T00:00:00Z"}`
/// (`anchor_time` may be `null` or absent),
/// `{"kind":"once","at":"2025-01-01T00:00:00Z"}`, `{"kind":"manual"}`,
/// `{"kind":"daily","time_of_day":"02:30:00"}`,
/// `{"kind":"weekly","days_of_week":[1,5],"time_of_day":"09:00:00"}`,
/// `{"kind":"monthly","day_of_month":-1,"time_of_day":"23:00:00"}`,
/// `{"kind":"yearly","month":2,"day":29,"time_of_day":"12:00:00"}`.
/// Instants are RFC 3339 strings in UTC (`Z`); any RFC 3339 offset is accepted
/// when reading. A [`TimeOfDay`] is the string `"HH:MM:SS"` (`"HH:MM"` is
/// accepted when reading).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Cron with 5 fields (minute hour day-of-month month day-of-week) or 6
    /// fields (a leading second), Vixie cron semantics (when both dom and dow
    /// are restricted, either matches); `L` in day-of-month is the month's
    /// last day.
    ///
    /// Evaluated on the wall clock of [`Schedule::timezone`]. The accepted
    /// syntax is documented in `cron.rs`, the DST rules in `wall_clock.rs`
    /// (both in `src/domain/schedule/`).
    Cron {
        /// The expression as the user wrote it, e.g. `"*/15 9-17 * * MON-FRI"`
        /// or `"*/10 * * * * *"`.
        expression: String,
    },
    /// Fires at `anchor_time + k * every_secs` for every integer `k`;
    /// `every_secs >= 1`.
    ///
    /// `anchor_time` `None` means "not yet resolved": the caller fills it with
    /// the creation time via [`Schedule::resolve_anchor`]. The time zone is
    /// ignored (absolute time).
    Interval {
        /// Period in seconds; at least 1.
        every_secs: i64,
        /// Any instant on the grid of fire times (past or future); `None`
        /// until resolved.
        #[serde(default, with = "opt_rfc3339")]
        anchor_time: Option<DateTime<Utc>>,
    },
    /// Fires once at `at`.
    Once {
        /// The single fire time (years 1 to 9999).
        #[serde(with = "rfc3339")]
        at: DateTime<Utc>,
    },
    /// Never fires by itself (only when triggered explicitly).
    Manual,
    /// Every local day at `time_of_day` in [`Schedule::timezone`] (fixed-time
    /// DST rules, documented in `src/domain/schedule/wall_clock.rs`).
    Daily {
        /// Local wall-clock time of the fire.
        time_of_day: TimeOfDay,
    },
    /// Every local day whose weekday is listed, at `time_of_day`.
    Weekly {
        /// Weekdays, `0` = Sunday, `1` = Monday, .. `6` = Saturday; non-empty,
        /// no duplicates, any order.
        days_of_week: Vec<u8>,
        /// Local wall-clock time of the fire.
        time_of_day: TimeOfDay,
    },
    /// Day `day_of_month` of every month at `time_of_day`; a day the month
    /// lacks fires on its last day (31 → 30 April, 28/29 February).
    Monthly {
        /// `1..=31`, or `-1` for the last day of the month.
        day_of_month: i8,
        /// Local wall-clock time of the fire.
        time_of_day: TimeOfDay,
    },
    /// `month`/`day` every year at `time_of_day`; 29 February fires on
    /// 28 February in common years.
    Yearly {
        /// `1` = January .. `12` = December.
        month: u8,
        /// `1..=31`, and a day that month has in a leap year (so not 31 April
        /// or 30 February).
        day: u8,
        /// Local wall-clock time of the fire.
        time_of_day: TimeOfDay,
    },
}

/// A local wall-clock time of day, whole seconds: `hour` 0-23, `minute`
/// 0-59, `second` 0-59 (no leap second).
///
/// Serialized as the string `"HH:MM:SS"` (always with seconds); read from
/// `"HH:MM:SS"` or `"HH:MM"` (two digits each). The fields are public, so an
/// out-of-range value can be built in code; [`Schedule::validate`] rejects it
/// and evaluation treats it as never firing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    /// Hour of the day, 0-23.
    pub hour: u8,
    /// Minute of the hour, 0-59.
    pub minute: u8,
    /// Second of the minute, 0-59.
    pub second: u8,
}

/// One fire of a schedule: the scheduled instant and whether a DST gap moved
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fire {
    /// The fire (scheduled) time, a UTC instant. Jitter is not included.
    pub time: DateTime<Utc>,
    /// `true` when the local wall-clock time the schedule asked for did not
    /// exist that day (spring-forward gap) and the fire moved to the first
    /// instant after the gap. Always `false` for wildcard cron jobs (they skip
    /// the gap), interval, once and manual. A fall-back fire at the first of
    /// two occurrences is *not* flagged: it is at the wall time asked for.
    /// When a gap's end is itself a wall time the schedule asks for (cron
    /// `0,30 2,3 * * *` in New York: 02:00 and 02:30 are missing, 03:00 is
    /// asked for), the fire is not flagged either.
    pub dst_shifted: bool,
}

/// A validation failure naming the API field and the reason, e.g.
/// field `"schedule.cron.expression"`, reason
/// `"field 2 (hour): 25 is out of range 0-23"`.
///
/// `Display` renders `"{field}: {reason}"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ScheduleError {
    /// API path of the offending value: the prefix given to
    /// [`Schedule::validate`] followed by `.cron.expression`, `.timezone`,
    /// `.interval.every`, `.once.at`, `.daily.time_of_day`,
    /// `.weekly.days_of_week`, `.weekly.time_of_day`,
    /// `.monthly.day_of_month`, `.monthly.time_of_day`, `.yearly.month`,
    /// `.yearly.day`, `.yearly.time_of_day`, `.jitter_secs`, `.start_time`
    /// or `.end_time`.
    pub field: String,
    /// Human-readable reason, suitable for an API error body.
    pub reason: String,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Longest each month can be (February in a leap year).
const MAX_MONTH_DAYS: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl Schedule {
    /// A schedule of `kind` in `timezone` with no jitter and no active
    /// window (`jitter_secs` 0, `start_time` and `end_time` `None`).
    #[must_use]
    pub fn new(kind: ScheduleKind, timezone: impl Into<String>) -> Schedule {
        Schedule {
            kind,
            timezone: timezone.into(),
            jitter_secs: 0,
            start_time: None,
            end_time: None,
        }
    }

    /// Returns the schedule with an unresolved interval anchor filled in:
    /// an [`ScheduleKind::Interval`] whose `anchor_time` is `None` gets
    /// `Some(created)`. Every other schedule (including an interval that
    /// already has an anchor) is returned unchanged.
    #[must_use]
    pub fn resolve_anchor(self, created: DateTime<Utc>) -> Schedule {
        match self.kind {
            ScheduleKind::Interval {
                every_secs,
                anchor_time: None,
            } => Schedule {
                kind: ScheduleKind::Interval {
                    every_secs,
                    anchor_time: Some(created),
                },
                ..self
            },
            _ => self,
        }
    }

    /// The first fire time strictly after `after` (UTC instant, any
    /// sub-second precision), or `None` if the schedule never fires again.
    ///
    /// Same as [`Schedule::next_fire_after`] without the DST flag:
    ///
    /// * cron: see `cron.rs` and `wall_clock.rs` (wall clock of the time zone,
    ///   DST rules);
    ///   results are whole seconds of wall-clock time (whole minutes for 5
    ///   fields), or the end of a DST gap. `None` beyond croner's year range
    ///   (4999).
    /// * daily / weekly / monthly / yearly: the time of day on the next
    ///   selected local date (`calendar.rs`); `None` after year 9999.
    /// * interval: the smallest `anchor_time + k * every_secs > after`
    ///   (integer `k`, possibly negative); `None` if the anchor is unresolved
    ///   or the result is outside chrono's range.
    /// * once: `Some(at)` if `at > after`, else `None`.
    /// * manual: always `None`.
    ///
    /// Then the active window applies: never a time before `start_time`
    /// (the search starts just before it), `None` if the next fire is after
    /// `end_time`.
    ///
    /// Pure and deterministic. It assumes [`Schedule::validate`] passed; an
    /// invalid schedule yields `None`, never a panic.
    #[must_use]
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.next_fire_after(after).map(|fire| fire.time)
    }

    /// The fire times in `[start, end)`, in order, at most `max` of them.
    ///
    /// # Errors
    /// `Err(max)` when the range holds more than `max` fire times.
    pub fn fire_times_in(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<DateTime<Utc>>, usize> {
        let mut times = Vec::new();
        let mut t = start
            .checked_sub_signed(TimeDelta::microseconds(1))
            .and_then(|s| self.next_after(s));
        while let Some(x) = t.filter(|x| *x < end) {
            if times.len() == max {
                return Err(max);
            }
            times.push(x);
            t = self.next_after(x);
        }
        Ok(times)
    }

    /// The first fire strictly after `after` (and `>= start_time`,
    /// `<= end_time`), with [`Fire::dst_shifted`] telling whether the wall
    /// time asked for did not exist and the fire moved to the end of the gap.
    /// See [`Schedule::next_after`] for the rules; `next_after(t)` is
    /// `next_fire_after(t).map(|f| f.time)`.
    #[must_use]
    pub fn next_fire_after(&self, after: DateTime<Utc>) -> Option<Fire> {
        let after = match self.start_time {
            // Strictly after "just before start_time": a fire exactly at
            // start_time counts.
            Some(start) if start > after => start
                .checked_sub_signed(TimeDelta::nanoseconds(1))
                .unwrap_or(after),
            _ => after,
        };
        let plain = |time: DateTime<Utc>| Fire {
            time,
            dst_shifted: false,
        };
        let fire = match &self.kind {
            ScheduleKind::Cron { expression } => cron_next_after(expression, &self.timezone, after),
            ScheduleKind::Interval {
                every_secs,
                anchor_time,
            } => interval_next_after(*every_secs, (*anchor_time)?, after).map(plain),
            ScheduleKind::Once { at } => (*at > after).then_some(plain(*at)),
            ScheduleKind::Manual => None,
            ScheduleKind::Daily { time_of_day } => {
                calendar_next_after(Calendar::Daily, *time_of_day, &self.timezone, after)
            }
            ScheduleKind::Weekly {
                days_of_week,
                time_of_day,
            } => {
                check_days_of_week(days_of_week).ok()?;
                let mask = days_of_week.iter().fold(0u8, |m, &d| m | (1 << d));
                calendar_next_after(Calendar::Weekly(mask), *time_of_day, &self.timezone, after)
            }
            ScheduleKind::Monthly {
                day_of_month,
                time_of_day,
            } => {
                let day = match *day_of_month {
                    -1 => 31,
                    d @ 1..=31 => d.unsigned_abs(),
                    _ => return None,
                };
                calendar_next_after(Calendar::Monthly(day), *time_of_day, &self.timezone, after)
            }
            ScheduleKind::Yearly {
                month,
                day,
                time_of_day,
            } => {
                let max_day = usize::from(*month)
                    .checked_sub(1)
                    .and_then(|i| MAX_MONTH_DAYS.get(i))?;
                if *day < 1 || u32::from(*day) > *max_day {
                    return None;
                }
                calendar_next_after(
                    Calendar::Yearly(*month, *day),
                    *time_of_day,
                    &self.timezone,
                    after,
                )
            }
        }?;
        match self.end_time {
            Some(end) if fire.time > end => None,
            // Nothing past the protobuf Timestamp range: every fire time can
            // be answered and stored.
            _ if fire.time > latest_fire_time() => None,
            _ => Some(fire),
        }
    }

    /// Formats `t` in the schedule's time zone as RFC 3339 with its offset,
    /// e.g. `"2025-03-09T03:00:00-04:00"` (fractional seconds only when
    /// non-zero). Uses UTC (`"+00:00"`) if the zone is unknown.
    #[must_use]
    pub fn describe_local(&self, t: DateTime<Utc>) -> String {
        match parse_zone(&self.timezone) {
            // chrono panics formatting a local time outside its range.
            Some(tz) if local_wall_time(t, tz).is_some() => t
                .with_timezone(&tz)
                .to_rfc3339_opts(SecondsFormat::AutoSi, false),
            _ => t.to_rfc3339_opts(SecondsFormat::AutoSi, false),
        }
    }
}

// ---------------------------------------------------------------------------
// Serde helpers (chrono is built without its `serde` feature)
// ---------------------------------------------------------------------------

/// `DateTime<Utc>` as an RFC 3339 string (`2025-03-09T07:00:00Z`).
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| D::Error::custom(format!("invalid RFC 3339 time \"{text}\": {e}")))
    }
}

/// `Option<DateTime<Utc>>` as an RFC 3339 string or `null`.
mod opt_rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        t: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::rfc3339")] DateTime<Utc>);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(t)| t))
    }
}
