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
//! # Cron syntax
//!
//! Five or six whitespace-separated fields, with the field semantics of
//! Vixie cron (crontab(5) of Vixie/ISC cron 4.1, which OCPS 1.0, the Open Cron
//! Pattern Specification, codifies). Five fields are minute-first; six fields
//! add a leading seconds field (OCPS 1.1 / croner's optional seconds):
//!
//! | # (5 fields) | # (6 fields) | field        | values                                 |
//! |--------------|--------------|--------------|----------------------------------------|
//! |              | 1            | second       | 0-59                                   |
//! | 1            | 2            | minute       | 0-59                                   |
//! | 2            | 3            | hour         | 0-23                                   |
//! | 3            | 4            | day-of-month | 1-31, or `L`                           |
//! | 4            | 5            | month        | 1-12 or `JAN`-`DEC`                    |
//! | 5            | 6            | day-of-week  | 0-7 or `SUN`-`SAT` (0 and 7 are Sunday)|
//!
//! Each field is a comma-separated list of items; an item is `*`, a value
//! `a`, a range `a-b` (`a <= b`), or a stepped `*/n` or `a-b/n` (`n` from 1
//! to the field's maximum). Names are three letters, case-insensitive; `SUN`
//! at the end of a range means 7, so `FRI-SUN` is Friday to Sunday. `?` is
//! accepted as an alias of `*` in the day-of-month and day-of-week fields only
//! (OCPS 1.4 §4.2). Everything else is rejected with a reason naming the
//! field *as the user numbered it*: `field 2 (hour): 25 is out of range 0-23`
//! for five fields, `field 1 (second): 60 is out of range 0-59` or
//! `field 3 (hour): 25 is out of range 0-23` for six. Deliberately rejected:
//!
//! * `a/n` without a range (croner 4 and OCPS reject it too; write `a-59/n`);
//! * a step larger than the field's maximum (`*/90` in the minute field
//!   selects only minute 0, which is never what "every 90 minutes" meant);
//! * croner's extensions `W`, `#`, `L` in the day-of-week field (`5L`,
//!   `5#L`), `LW`, and the `+` modifier;
//! * seven fields (a year field), and any other count;
//! * day-of-month/month combinations that can never occur when the
//!   day-of-month has to match (`0 0 30 2 *`, `0 0 31 4,6,9,11 *`): such a
//!   binding would never fire.
//!
//! ## `L`: the last day of the month
//!
//! `L` (case-insensitive) as a whole item of the day-of-month field means the
//! last day of each month (28, 29, 30 or 31): `0 0 L * *` fires at midnight
//! on 31 January, 28/29 February, 31 March, 30 April, ... This is croner 4's
//! native `L` (croner's README, "Pattern": "the last day of the month"); croner
//! parses it as a list item, so it combines with other items: `0 0 1,L * *`
//! fires on the first and the last day of every month, `0 0 15,L 2 *` on
//! 15 February and on 28/29 February. `L` takes no step or range (`L/2`,
//! `L-3`, `20-L` are rejected), and an `L` field counts as restricted for the
//! Vixie day rule below (`0 0 L * 5`: the last day *or* any Friday).
//!
//! ## Macros
//!
//! The Vixie cron macros `@yearly`, `@annually`, `@monthly`, `@weekly`,
//! `@daily`, `@midnight` and `@hourly` are accepted (case-insensitive) and are
//! expanded here to their 5-field forms (`0 0 1 1 *`, `0 0 1 * *`,
//! `0 0 * * 0`, `0 0 * * *`, `0 * * * *`); croner does not know `@midnight`.
//! `@reboot` and anything else starting with `@` is rejected.
//!
//! ## Day-of-month and day-of-week
//!
//! Following Vixie cron's source (`entry.c` sets `DOM_STAR` / `DOW_STAR` when
//! the field's first character is `*`; `cron.c` `find_jobs` then ANDs the two
//! day fields if either flag is set and ORs them otherwise): when neither day
//! field starts with `*` (or `?`), a day matches if **either** field matches,
//! so `0 0 13 * 5` fires on every 13th and on every Friday. When either field
//! starts with `*`, both must match, so `0 0 */2 * 1` fires on Mondays that
//! fall on an odd day of the month. (croner 4 and OCPS only treat a field that
//! is exactly `*` as unrestricted and would OR the `*/2` case; this module
//! passes croner an explicit AND/OR mode so the Vixie rule holds.)
//!
//! # Time zones and daylight saving time
//!
//! Cron and the calendar kinds are evaluated on the local wall clock of
//! [`Schedule::timezone`]. Cron jobs are classified as in Vixie cron
//! (`entry.c` sets `MIN_STAR` / `HR_STAR` when the minute / hour field starts
//! with `*`; for six fields the seconds field counts too, as in croner 4's
//! job classification):
//!
//! * **Wildcard jobs** – the second (6 fields), minute or hour field starts
//!   with `*` (`0 * * * *`, `*/15 * * * *`, `*/5 9 * * *`, `0 */2 * * *`,
//!   `*/10 * * * * *`, `*/10 30 2 * * *`). They fire at every real instant
//!   whose wall clock matches: wall times inside a spring-forward gap are
//!   skipped, and wall times repeated by a fall-back fire on both passes. So
//!   `0 * * * *` fires every real hour through both transitions (on
//!   2025-11-02 in America/New_York at 01:00 EDT **and** 01:00 EST, 25 fires
//!   that day; 23 on 2025-03-09) and `*/15 * * * *` every 15 real minutes
//!   (100 fires on the 25-hour day). Where a zone shifts by 30 minutes
//!   (Australia/Lord_Howe), `0 * * * *` has one 90-minute step at each
//!   transition, because one `HH:00` wall time is skipped (spring) or the
//!   repeated half hour holds no `HH:00` (autumn).
//! * **Fixed-time jobs** – every other cron job (`30 2 * * *`,
//!   `30 1,13 * * *`, `0,30 2 * * 1-5`, `0 30 2 * * *`) and every calendar
//!   kind. A fixed-time job fires when the wall clock *first reaches or
//!   passes* a matching wall time:
//!   * a wall time that does not exist (spring-forward gap) fires once, at the
//!     first instant after the gap: `30 2 * * *` in America/New_York fires on
//!     2025-03-09 at 03:00 EDT = 07:00 UTC. Several matching wall times in
//!     one gap (`0,30 2 * * *`) collapse into that single fire. Such a fire is
//!     reported with [`Fire::dst_shifted`] = `true`.
//!   * a wall time that occurs twice (fall-back) fires once, at its first
//!     occurrence: `30 1 * * *` in America/New_York fires on 2025-11-02 only
//!     at 01:30 EDT = 05:30 UTC. This fire is *not* flagged
//!     `dst_shifted`: it happens at the wall time asked for.
//!
//! These are the DST rules of Vixie cron's main loop (`cron.c` `main`, kept
//! in cronie: for a clock change of up to three hours, wildcard jobs run for
//! the current minute only, fixed-time jobs skipped by a forward jump run
//! right after it, and fixed-time jobs "have already run, and should not be
//! repeated" when the clock goes back) and of croner 4, whose README
//! ("Daylight Saving Time (DST) Handling") presents them as the OCPS / Vixie
//! behaviour: fixed-time jobs "execute at the first valid second/minute
//! immediately following the gap" and "only once, at its first occurrence";
//! interval/wildcard jobs skip occurrences within the gap and "execute for
//! each occurrence" in a repeated hour. For the calendar kinds the same rules
//! are sked's product contract (`docs/semantics.md`, "Schedules"). Notes:
//!
//! * Vixie cron starts one catch-up run per skipped matching minute; here a
//!   fire time is an instant, so all matches inside one gap are one fire.
//! * Other schedulers differ on the gap, and we chose *fire after the gap*:
//!   Quartz's `CronTrigger` skips a fire time that falls into a gap (its
//!   CronTrigger tutorial: a trigger firing "every day at 2:15 am" is
//!   skipped on the day DST begins "since 2:15 am never occurs that day"),
//!   and so does the OCPS 1.4 draft (`increments/OCPS-increment-1.4.md`,
//!   §4.3.1, dated 2025-07-03, recommends skipping); JavaScript's Temporal
//!   (`disambiguation: "compatible"`, the default, as in RFC 5545) moves a
//!   nonexistent wall time *forward by the gap's length* (02:30 → 03:30 in
//!   New York) rather than to the gap's end (03:00). sked fires at the
//!   first instant after the gap (Vixie cron, croner 4), so a
//!   daily job never loses a day and never runs later than necessary.
//!   Temporal and sked agree on the fold (the earlier occurrence); Quartz
//!   may fire twice there.
//!
//! ## What croner 4 does natively and what this module adds
//!
//! * croner parses the (normalised) cron expression and walks the calendar;
//!   it is always the cron matcher. The calendar kinds do not use croner.
//! * croner classifies a job as fixed-time only when the second, minute
//!   **and** hour fields are each a single plain value. Jobs such as
//!   `30 1,13 * * *` or `0,30 2 * * *` are "interval" jobs for croner, so it
//!   would fire them twice on fall-back and skip them on spring-forward,
//!   contradicting the rules above. Therefore fixed-time jobs (Vixie
//!   classification) are evaluated here: croner enumerates matching
//!   wall-clock times on a zone-less `NaiveDateTime`, and each wall time `w`
//!   is mapped to the first instant at which the zone's wall clock reaches
//!   `w` (the earlier instant of an ambiguous time, the end of the gap for a
//!   missing one). That mapping is monotonic, so "first fire after `after`"
//!   is "first matching wall time whose instant is after `after`"; wall
//!   times already reached in the first pass of a fall-back are stepped over
//!   in one jump. For single-value jobs this agrees with croner's own answer
//!   (checked by a test).
//! * Wildcard jobs use croner's zoned search (`find_next_occurrence` on a
//!   `chrono_tz` date-time) unchanged: its interval/wildcard rules are the
//!   ones above.
//! * The Vixie day-of-month/day-of-week rule (see above), macro expansion,
//!   the per-field error messages and the never-fires check are done here.
//! * `after` is truncated to whole seconds before asking croner (croner
//!   ignores sub-second parts); the answer is always strictly after `after`.
//!
//! Cron search covers the years croner supports (1 to 4999; croner may
//! still return a match at the very start of year 5000, e.g.
//! 5000-01-01T00:00:00); for an `after` in year 5000 or later
//! [`Schedule::next_after`] answers `None`.
//!
//! # Calendar kinds
//!
//! All four fire once on each selected local calendar date at
//! [`TimeOfDay`] (whole seconds) on the wall clock of the time zone, with
//! exactly the fixed-time DST rules above: a time of day inside a gap fires
//! at the first instant after the gap (`dst_shifted`), a repeated time of day
//! fires at its first occurrence. They are evaluated by a direct calendar
//! walk (no croner), because two of their rules are not cron semantics.
//!
//! * [`ScheduleKind::Daily`] – every local date. Same as the cron job
//!   `S M H * * *`.
//! * [`ScheduleKind::Weekly`] – every local date whose weekday is listed in
//!   `days_of_week` (0 = Sunday .. 6 = Saturday; non-empty, no duplicates).
//! * [`ScheduleKind::Monthly`] – day `day_of_month` (1-31) of every month,
//!   or its last day for `-1`. A day the month lacks fires on that month's
//!   last day, once: day 31 fires on 30 April and on 28/29 February (not on
//!   1 May / 1 March, and never twice in one month). Day 29, 30 or 31 in
//!   February all fire on 28 February in common years and 29 February in leap
//!   years.
//! * [`ScheduleKind::Yearly`] – `month`/`day` every year. 29 February fires
//!   on 28 February in common years. A date that never exists (31 April,
//!   30 February) is rejected by [`Schedule::validate`].
//!
//! Fire times are produced for the years 1 to 9999; beyond that the answer
//! is `None`.
//!
//! # Other kinds
//!
//! * [`ScheduleKind::Interval`] fires at `anchor + k * every_secs` for every
//!   integer `k` (negative too), on the absolute time line; the time zone is
//!   ignored. Computed with 128-bit integer arithmetic, no loops.
//! * [`ScheduleKind::Once`] fires at `at` only.
//! * [`ScheduleKind::Manual`] never fires by itself.
//!
//! # Common fields: active window and jitter
//!
//! * [`Schedule::start_time`]: no fire before it; the first fire is the first
//!   schedule time `>= start_time`. It clips, it does not move anything: an
//!   interval keeps its anchor grid, a cron or calendar job its wall times.
//! * [`Schedule::end_time`]: no fire after it (a fire exactly at `end_time`
//!   still happens). Must be after `start_time` when both are given.
//! * [`Schedule::jitter_secs`]: each run starts at `fire + jitter`, with
//!   `jitter = `[`Schedule::jitter_for`]`(binding id, fire)` in
//!   `[0, jitter_secs]` seconds, millisecond resolution, derived from a fixed
//!   hash (FNV-1a 64 followed by the SplitMix64 finaliser, spelled out on
//!   `jitter_for`) so that every replica and every build agrees. The fire
//!   time itself (what [`Schedule::next_after`] returns, what is recorded as
//!   the scheduled time) is not moved by jitter.

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, SecondsFormat,
    TimeDelta, TimeZone, Utc,
};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// Evaluated on the wall clock of [`Schedule::timezone`]; see the module
    /// docs for the accepted syntax and the DST rules.
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
    /// DST rules, see the module docs).
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

const YEAR_RANGE_REASON: &str = "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z";
/// Last year in which calendar kinds produce fire times.
const MAX_CALENDAR_YEAR: i32 = 9999;

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
    /// * cron: see the module docs (wall clock of the time zone, DST rules);
    ///   results are whole seconds of wall-clock time (whole minutes for 5
    ///   fields), or the end of a DST gap. `None` beyond croner's year range
    ///   (4999).
    /// * daily / weekly / monthly / yearly: the time of day on the next
    ///   selected local date (module docs); `None` after year 9999.
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

/// `days_of_week` is non-empty, each 0-6, no duplicates.
fn check_days_of_week(days: &[u8]) -> Result<(), String> {
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

// ---------------------------------------------------------------------------
// TimeOfDay
// ---------------------------------------------------------------------------

impl TimeOfDay {
    /// `hour:minute:second`, each checked (`hour` 0-23, `minute` and `second`
    /// 0-59).
    ///
    /// # Errors
    ///
    /// The reason, e.g. `hour 24 is out of range 0-23`.
    pub fn new(hour: u8, minute: u8, second: u8) -> Result<TimeOfDay, String> {
        let t = TimeOfDay {
            hour,
            minute,
            second,
        };
        t.check()?;
        Ok(t)
    }

    /// Parses `"HH:MM"` or `"HH:MM:SS"` (exactly two digits each, 24-hour
    /// clock, `00:00` to `23:59:59`), e.g. `"02:30"` → 02:30:00,
    /// `"02:30:15"` → 02:30:15.
    ///
    /// # Errors
    ///
    /// The reason, e.g. `expected "HH:MM" or "HH:MM:SS", got "2:30"` or
    /// `minute 60 is out of range 0-59`.
    pub fn parse(text: &str) -> Result<TimeOfDay, String> {
        let bad = || format!("expected \"HH:MM\" or \"HH:MM:SS\" (24-hour clock), got \"{text}\"");
        let parts: Vec<&str> = text.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(bad());
        }
        let mut values = [0u8; 3];
        for (slot, part) in values.iter_mut().zip(&parts) {
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            *slot = part.parse::<u8>().map_err(|_| bad())?;
        }
        let [hour, minute, second] = values;
        TimeOfDay::new(hour, minute, second)
    }

    /// Why this value is out of range, if it is.
    fn check(&self) -> Result<(), String> {
        for (name, value, max) in [
            ("hour", self.hour, 23),
            ("minute", self.minute, 59),
            ("second", self.second, 59),
        ] {
            if value > max {
                return Err(format!("{name} {value} is out of range 0-{max}"));
            }
        }
        Ok(())
    }

    /// As a chrono time, `None` if out of range.
    fn to_naive_time(self) -> Option<NaiveTime> {
        NaiveTime::from_hms_opt(
            u32::from(self.hour),
            u32::from(self.minute),
            u32::from(self.second),
        )
    }
}

impl std::fmt::Display for TimeOfDay {
    /// `"HH:MM:SS"`, zero-padded.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;

    /// Same as [`TimeOfDay::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TimeOfDay::parse(s)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        TimeOfDay::parse(&text).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// Jitter hash
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Time zones
// ---------------------------------------------------------------------------

/// Looks up an IANA zone name in chrono-tz (exact, case-sensitive).
fn parse_zone(name: &str) -> Option<Tz> {
    name.parse::<Tz>().ok()
}

/// The wall-clock time of `t` in `tz`, or `None` where it would fall outside
/// chrono's range (`DateTime::naive_local` panics there).
fn local_wall_time(t: DateTime<Utc>, tz: Tz) -> Option<NaiveDateTime> {
    let offset = tz.offset_from_utc_datetime(&t.naive_utc()).fix();
    t.naive_utc().checked_add_offset(offset)
}

// ---------------------------------------------------------------------------
// Cron parsing (pre-check with field-named messages)
// ---------------------------------------------------------------------------

/// The Vixie cron macros accepted, with their 5-field expansions.
const MACROS: [(&str, &str); 7] = [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

const FIELD_COUNT_HINT: &str = "expected 5 fields (minute hour day-of-month month day-of-week) \
     or 6 (second minute hour day-of-month month day-of-week)";
const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DOW_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
/// Longest each month can be (February in a leap year).
const MAX_MONTH_DAYS: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/// One of the six cron fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Second,
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Second => "second",
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        }
    }

    fn min(self) -> u32 {
        match self {
            Field::DayOfMonth | Field::Month => 1,
            _ => 0,
        }
    }

    fn max(self) -> u32 {
        match self {
            Field::Second | Field::Minute => 59,
            Field::Hour => 23,
            Field::DayOfMonth => 31,
            Field::Month => 12,
            Field::DayOfWeek => 7,
        }
    }

    /// Value of a three-letter name in this field, if any (case-insensitive).
    fn name_value(self, text: &str) -> Option<u32> {
        let (names, first): (&[&str], u32) = match self {
            Field::Month => (&MONTH_NAMES, 1),
            Field::DayOfWeek => (&DOW_NAMES, 0),
            _ => return None,
        };
        let index = names.iter().position(|n| n.eq_ignore_ascii_case(text))?;
        u32::try_from(index).ok().map(|i| i + first)
    }
}

/// A field and its 1-based position in the expression as the user wrote it
/// (the minute is field 1 of five, field 2 of six).
#[derive(Debug, Clone, Copy)]
struct Slot {
    field: Field,
    number: usize,
}

impl Slot {
    /// `"field 2 (hour): {msg}"`.
    fn error(self, msg: impl std::fmt::Display) -> String {
        format!("field {} ({}): {msg}", self.number, self.field.name())
    }

    /// `"field 4 (month)"`.
    fn label(self) -> String {
        format!("field {} ({})", self.number, self.field.name())
    }
}

/// One parsed field.
#[derive(Debug, Clone)]
struct ParsedField {
    /// Bit `v` set = value `v` matches (day-of-week 7 folded into 0).
    mask: u64,
    /// Day-of-month only: `L` (the last day of the month) is listed.
    last: bool,
    /// The field starts with `*` (or `?`): Vixie's `*_STAR` flags.
    star: bool,
    /// Numeric form handed to croner (names replaced, `?` as `*`).
    normalized: String,
}

/// A pre-checked 5- or 6-field cron expression.
#[derive(Debug, Clone)]
struct CronSpec {
    /// `Some` for six fields.
    second: Option<ParsedField>,
    minute: ParsedField,
    hour: ParsedField,
    dom: ParsedField,
    month: ParsedField,
    dow: ParsedField,
}

impl CronSpec {
    /// Parses and range-checks `expression`; the error is the reason text.
    fn parse(expression: &str) -> Result<CronSpec, String> {
        let trimmed = expression.trim();
        let expanded = if trimmed.starts_with('@') {
            MACROS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(trimmed))
                .map(|(_, body)| *body)
                .ok_or_else(|| {
                    let names: Vec<&str> = MACROS.iter().map(|(name, _)| *name).collect();
                    format!(
                        "unsupported macro \"{trimmed}\" (supported: {})",
                        names.join(", ")
                    )
                })?
        } else {
            trimmed
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        let (second, rest) = match parts[..] {
            [_, _, _, _, _] => (None, &parts[..]),
            [s, ref rest @ ..] if parts.len() == 6 => (Some(s), rest),
            _ => {
                let hint = if parts.len() == 7 {
                    " (a year field is not supported)"
                } else {
                    ""
                };
                return Err(format!("{FIELD_COUNT_HINT}, got {}{hint}", parts.len()));
            }
        };
        let [minute, hour, dom, month, dow] = rest[..] else {
            return Err(format!("{FIELD_COUNT_HINT}, got {}", parts.len()));
        };
        let first = usize::from(second.is_some()) + 1;
        let slot = |field: Field, index: usize| Slot {
            field,
            number: first + index,
        };
        Ok(CronSpec {
            second: second
                .map(|s| {
                    parse_field(
                        Slot {
                            field: Field::Second,
                            number: 1,
                        },
                        s,
                    )
                })
                .transpose()?,
            minute: parse_field(slot(Field::Minute, 0), minute)?,
            hour: parse_field(slot(Field::Hour, 1), hour)?,
            dom: parse_field(slot(Field::DayOfMonth, 2), dom)?,
            month: parse_field(slot(Field::Month, 3), month)?,
            dow: parse_field(slot(Field::DayOfWeek, 4), dow)?,
        })
    }

    /// The slot of `field` in this expression (for messages).
    fn slot(&self, field: Field) -> Slot {
        let offset = usize::from(self.second.is_some());
        let number = match field {
            Field::Second => 1,
            Field::Minute => 1 + offset,
            Field::Hour => 2 + offset,
            Field::DayOfMonth => 3 + offset,
            Field::Month => 4 + offset,
            Field::DayOfWeek => 5 + offset,
        };
        Slot { field, number }
    }

    /// Vixie cron's wildcard job: the minute or hour field (or, with six
    /// fields, the second field) starts with `*`.
    fn is_wildcard_job(&self) -> bool {
        self.second.as_ref().is_some_and(|s| s.star) || self.minute.star || self.hour.star
    }

    /// Vixie cron ANDs the day fields when either starts with `*`.
    fn dom_and_dow(&self) -> bool {
        self.dom.star || self.dow.star
    }

    /// Why the expression can never fire, if it can't: only possible when
    /// the day-of-month must match (AND mode) and none of its days exists in
    /// any of the months. In OR mode the day-of-week always matches some day,
    /// and every (month, day) pair recurs on every weekday within 28 years.
    /// `L` exists in every month.
    fn never_fires_reason(&self) -> Option<String> {
        if self.dom.star || !self.dow.star || self.dom.last {
            return None;
        }
        let possible = (1u32..=12).any(|month| {
            self.month.mask & (1 << month) != 0
                && MAX_MONTH_DAYS
                    .get(month as usize - 1)
                    .is_some_and(|&len| (1..=len).any(|day| self.dom.mask & (1 << day) != 0))
        });
        (!possible).then(|| {
            format!(
                "never fires: no month in {} has a day listed in {}",
                self.slot(Field::Month).label(),
                self.slot(Field::DayOfMonth).label()
            )
        })
    }

    /// Parses the normalised expression with croner (5 fields without
    /// seconds, or 6 with; no years; AND/OR mode per Vixie).
    fn to_croner(&self) -> Result<Cron, croner::errors::CronError> {
        let body = format!(
            "{} {} {} {} {}",
            self.minute.normalized,
            self.hour.normalized,
            self.dom.normalized,
            self.month.normalized,
            self.dow.normalized
        );
        let (normalized, seconds) = match &self.second {
            Some(s) => (format!("{} {body}", s.normalized), Seconds::Required),
            None => (body, Seconds::Disallowed),
        };
        CronParser::builder()
            .seconds(seconds)
            .year(Year::Disallowed)
            .dom_and_dow(self.dom_and_dow())
            .build()
            .parse(&normalized)
    }

    /// The whole spec as a cron matcher, with the fixed-time / wildcard
    /// classification.
    fn compile(&self) -> Option<CompiledCron> {
        Some(CompiledCron {
            cron: self.to_croner().ok()?,
            wildcard: self.is_wildcard_job(),
        })
    }
}

/// A parsed, croner-compiled cron expression.
struct CompiledCron {
    cron: Cron,
    wildcard: bool,
}

/// Parses one field: a comma-separated list of `*`, `?`, `a`, `a-b`, `*/n`,
/// `a-b/n`, and (day-of-month only) `L`.
fn parse_field(slot: Slot, text: &str) -> Result<ParsedField, String> {
    let field = slot.field;
    let mut mask = 0u64;
    let mut last = false;
    let mut items = Vec::new();
    if text.split(',').count() > MAX_CRON_ITEMS {
        return Err(slot.error(format_args!(
            "has {} list items; at most {MAX_CRON_ITEMS}",
            text.split(',').count()
        )));
    }
    for item in text.split(',') {
        if item.is_empty() {
            return Err(slot.error(format_args!("empty list element in \"{text}\"")));
        }
        if field == Field::DayOfMonth && item.eq_ignore_ascii_case("L") {
            last = true;
            items.push("L".to_string());
            continue;
        }
        let (range_text, step_text) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let step = step_text.map(|s| parse_step(slot, item, s)).transpose()?;

        let (lo, hi, range_norm) = if range_text == "*" || (range_text == "?" && step.is_none()) {
            if range_text == "?" && !matches!(field, Field::DayOfMonth | Field::DayOfWeek) {
                return Err(slot.error("\"?\" is only allowed in day-of-month and day-of-week"));
            }
            (field.min(), field.max(), "*".to_string())
        } else if let Some((a, b)) = range_text.split_once('-') {
            if a.is_empty() || b.is_empty() {
                return Err(slot.error(format_args!("invalid range \"{range_text}\"")));
            }
            let lo = parse_value(slot, a)?;
            let mut hi = parse_value(slot, b)?;
            // `SUN` ends a range as 7 (FRI-SUN), but SUN-SUN stays Sunday only.
            if field == Field::DayOfWeek && hi == 0 && lo > 0 && b.eq_ignore_ascii_case("SUN") {
                hi = 7;
            }
            if lo > hi {
                let hint = if field == Field::DayOfWeek && hi == 0 {
                    "; use 7 for Sunday at the end of a range"
                } else {
                    ""
                };
                return Err(slot.error(format_args!(
                    "range {range_text} is reversed (start must not be greater than end{hint})"
                )));
            }
            (lo, hi, format!("{lo}-{hi}"))
        } else if range_text.is_empty() && step.is_some() {
            return Err(slot.error(format_args!(
                "\"{item}\" needs \"*\" or a range before \"/\""
            )));
        } else {
            let value = parse_value(slot, range_text)?;
            if let Some(step) = step {
                return Err(slot.error(format_args!(
                    "\"{item}\" needs \"*\" or a range before \"/\" (write \"{value}-{}/{step}\")",
                    field.max()
                )));
            }
            (value, value, value.to_string())
        };

        let step_by = step.unwrap_or(1);
        let mut value = lo;
        while value <= hi {
            mask |= 1 << value;
            value += step_by;
        }
        items.push(match step {
            Some(step) => format!("{range_norm}/{step}"),
            None => range_norm,
        });
    }
    if field == Field::DayOfWeek && mask & (1 << 7) != 0 {
        mask = (mask & !(1 << 7)) | 1;
    }
    Ok(ParsedField {
        mask,
        last,
        star: text.starts_with('*') || text.starts_with('?'),
        normalized: items.join(","),
    })
}

/// Parses the step after `/`: digits, from 1 to the field's maximum.
fn parse_step(slot: Slot, item: &str, text: &str) -> Result<u32, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(slot.error(format_args!("invalid step \"{text}\" in \"{item}\"")));
    }
    let step = text.parse::<u32>().unwrap_or(u32::MAX);
    if step == 0 {
        return Err(slot.error(format_args!(
            "step 0 in \"{item}\" is invalid (must be at least 1)"
        )));
    }
    if step > slot.field.max() {
        return Err(slot.error(format_args!(
            "step {text} is out of range 1-{}",
            slot.field.max()
        )));
    }
    Ok(step)
}

/// Parses a number or a three-letter name and checks the field's range.
fn parse_value(slot: Slot, text: &str) -> Result<u32, String> {
    let field = slot.field;
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let value = text.parse::<u32>().unwrap_or(u32::MAX);
        if value < field.min() || value > field.max() {
            return Err(slot.error(format_args!(
                "{text} is out of range {}-{}",
                field.min(),
                field.max()
            )));
        }
        return Ok(value);
    }
    if let Some(value) = field.name_value(text) {
        return Ok(value);
    }
    let extension = text
        .chars()
        .any(|c| matches!(c.to_ascii_uppercase(), 'L' | 'W' | '#' | '+'));
    if extension && field == Field::DayOfMonth {
        return Err(slot.error(format_args!(
            "invalid value \"{text}\" (of the L, W, # and + extensions only a plain \"L\", \
             the last day of the month, is supported, as a list item without range or step)"
        )));
    }
    if extension && field == Field::DayOfWeek {
        return Err(slot.error(format_args!(
            "invalid value \"{text}\" (the L, W, # and + extensions are not supported)"
        )));
    }
    Err(slot.error(format_args!("invalid value \"{text}\"")))
}

// ---------------------------------------------------------------------------
// Cron evaluation
// ---------------------------------------------------------------------------

/// How many wall times a fixed-time search may try before giving up; each
/// fall-back is stepped over in one jump, so a handful suffices.
const MAX_FIXED_STEPS: usize = 64;
/// Half-width, in seconds, of the window searched for the end of a DST gap:
/// larger than any UTC offset (so the window always brackets the gap).
const GAP_SEARCH_SECS: i64 = 2 * 86_400;

/// The earliest instant searched: 0001-01-03T00:00:00Z (croner cannot search
/// before year 1 and local times there may be outside chrono's range).
fn search_floor() -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(-62_135_596_800 + 2 * 86_400, 0)
}

/// `after` raised to the search floor and truncated to whole seconds (all
/// cron and calendar fire times are whole seconds, so "> that second" and
/// "> after" agree).
fn search_start(after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let floor = search_floor()?;
    let start = if after < floor { floor } else { after };
    DateTime::from_timestamp(start.timestamp(), 0)
}

fn cron_next_after(expression: &str, zone: &str, after: DateTime<Utc>) -> Option<Fire> {
    let tz = parse_zone(zone)?;
    let spec = CronSpec::parse(expression).ok()?;
    let compiled = spec.compile()?;
    let cron = &compiled.cron;

    if after.year() >= croner::YEAR_UPPER_LIMIT {
        return None;
    }
    let start = search_start(after)?;

    if compiled.wildcard {
        let mut from = start.with_timezone(&tz);
        // croner answers strictly after `from`; the loop is only a guard.
        for _ in 0..4 {
            let next = cron.find_next_occurrence(&from, false).ok()?;
            let next_utc = next.with_timezone(&Utc);
            if next_utc > after {
                return Some(Fire {
                    time: next_utc,
                    dst_shifted: false,
                });
            }
            from = next;
        }
        None
    } else {
        let (wall, time) =
            next_fixed_time(tz, start, |w| cron.find_next_occurrence(&w, false).ok())?;
        // Shifted: the wall time did not exist, and the gap's end is not
        // itself a wall time the expression asks for.
        let dst_shifted = matches!(tz.from_local_datetime(&wall), LocalResult::None)
            && !local_wall_time(time, tz)
                .is_some_and(|w| cron.is_time_matching(&w).unwrap_or(false));
        Some(Fire { time, dst_shifted })
    }
}

/// Fixed-time jobs (cron and calendar kinds): the first wall time `w`
/// produced by `next_wall` (which answers the first schedule wall time
/// strictly after its argument) whose first instant
/// ([`first_instant_reaching`]) is after `start` (a whole second). Returns
/// that wall time and its instant.
///
/// That instant is monotonic in `w`, so wall times are tried in order from
/// `start`'s wall clock. Only the second pass of a fall-back can make one of
/// them already passed (reached in the first pass); then every wall time up
/// to the last one of the first pass is stepped over at once.
fn next_fixed_time(
    tz: Tz,
    start: DateTime<Utc>,
    mut next_wall: impl FnMut(NaiveDateTime) -> Option<NaiveDateTime>,
) -> Option<(NaiveDateTime, DateTime<Utc>)> {
    let mut wall = local_wall_time(start, tz)?;
    for _ in 0..MAX_FIXED_STEPS {
        let w = next_wall(wall)?;
        let fire = first_instant_reaching(tz, w)?;
        if fire > start {
            return Some((w, fire));
        }
        // `w` was reached before `start` although the wall clock at `start`
        // is before `w`: `start` is in the second pass of a fall-back. Jump
        // to the last wall time of the first pass.
        let jumped = last_wall_before_fold(tz, fire, start)?;
        wall = if jumped > w { jumped } else { w };
    }
    None
}

/// For `earlier` (offset `o1`) and `later` with a different offset after a
/// fall-back: the wall time of the last whole second with offset `o1`
/// (binary search, no transition table needed).
fn last_wall_before_fold(
    tz: Tz,
    earlier: DateTime<Utc>,
    later: DateTime<Utc>,
) -> Option<NaiveDateTime> {
    let offset_at = |secs: i64| -> Option<chrono::FixedOffset> {
        Some(
            tz.offset_from_utc_datetime(&DateTime::from_timestamp(secs, 0)?.naive_utc())
                .fix(),
        )
    };
    let o1 = offset_at(earlier.timestamp())?;
    let mut lo = earlier.timestamp();
    let mut hi = later.timestamp();
    if offset_at(hi)? == o1 {
        // No transition in between (cannot happen for a consistent zone):
        // step past `later`'s wall time, which the caller already had.
        return local_wall_time(later, tz);
    }
    // Invariant: offset(lo) == o1 != offset(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if offset_at(mid)? == o1 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    local_wall_time(DateTime::from_timestamp(lo, 0)?, tz)
}

/// The first instant at which the wall clock of `tz` reaches or passes
/// `wall`: its only instant, the earlier of two (fall-back), or the first
/// instant after the gap when `wall` does not exist (spring-forward).
fn first_instant_reaching(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earlier, _) => Some(earlier.with_timezone(&Utc)),
        LocalResult::None => gap_end(tz, wall),
    }
}

/// The smallest whole-second instant whose local time is `>= wall`, for a
/// `wall` inside a gap: binary search on the UTC offset, no table of
/// transitions needed.
fn gap_end(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    let local_at = |secs: i64| -> Option<NaiveDateTime> {
        local_wall_time(DateTime::from_timestamp(secs, 0)?, tz)
    };
    let w = wall.and_utc().timestamp();
    let mut lo = w.checked_sub(GAP_SEARCH_SECS)?;
    let mut hi = w.checked_add(GAP_SEARCH_SECS)?;
    if local_at(lo)? >= wall || local_at(hi)? < wall {
        return None;
    }
    // Invariant: local(lo) < wall <= local(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if local_at(mid)? >= wall {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp(hi, 0)
}

// ---------------------------------------------------------------------------
// Calendar kinds
// ---------------------------------------------------------------------------

/// Which local dates a calendar kind selects (parameters already checked).
#[derive(Debug, Clone, Copy)]
enum Calendar {
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

fn calendar_next_after(
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

// ---------------------------------------------------------------------------
// Interval evaluation
// ---------------------------------------------------------------------------

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// Smallest `anchor + k * every_secs > after` over integer `k`, in i128
/// nanoseconds (no overflow for any chrono instant and any i64 period).
fn interval_next_after(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("bad test instant {s}: {e}"))
            .with_timezone(&Utc)
    }

    fn cron(expression: &str, timezone: &str) -> Schedule {
        Schedule::new(
            ScheduleKind::Cron {
                expression: expression.to_string(),
            },
            timezone.to_string(),
        )
    }

    fn interval(every_secs: i64, anchor: Option<&str>) -> Schedule {
        Schedule::new(
            ScheduleKind::Interval {
                every_secs,
                anchor_time: anchor.map(utc),
            },
            "UTC".to_string(),
        )
    }

    /// The next `n` fires after `after`, each strictly after the previous.
    fn fires(s: &Schedule, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = after;
        for _ in 0..n {
            match s.next_after(t) {
                Some(next) => {
                    assert!(next > t, "{s:?}: {next} is not after {t}");
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    /// Every fire in `[from, to)`.
    fn fires_between(s: &Schedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = from - chrono::TimeDelta::nanoseconds(1);
        while let Some(next) = s.next_after(t) {
            assert!(next > t);
            if next >= to {
                break;
            }
            out.push(next);
            t = next;
        }
        out
    }

    struct Case {
        name: &'static str,
        expr: &'static str,
        tz: &'static str,
        after: &'static str,
        expected: &'static [&'static str],
    }

    fn run_cases(cases: &[Case]) {
        for c in cases {
            let s = cron(c.expr, c.tz);
            assert_eq!(s.validate("schedule"), Ok(()), "{}", c.name);
            let got = fires(&s, utc(c.after), c.expected.len());
            let want: Vec<DateTime<Utc>> = c.expected.iter().map(|e| utc(e)).collect();
            assert_eq!(
                got,
                want,
                "case {} ({} in {}): got {:?}",
                c.name,
                c.expr,
                c.tz,
                got.iter().map(|t| s.describe_local(*t)).collect::<Vec<_>>()
            );
        }
    }

    // New York 2025: DST starts Sun 2025-03-09 02:00 EST (07:00Z) -> 03:00 EDT,
    // ends Sun 2025-11-02 02:00 EDT (06:00Z) -> 01:00 EST.
    #[test]
    fn new_york_fixed_time_jobs() {
        run_cases(&[
            Case {
                name: "02:30 on spring-forward day fires at 03:00 EDT",
                expr: "30 2 * * *",
                tz: "America/New_York",
                after: "2025-03-08T00:00:00Z",
                expected: &[
                    "2025-03-08T07:30:00Z", // 02:30 EST
                    "2025-03-09T07:00:00Z", // 02:30 missing -> 03:00 EDT
                    "2025-03-10T06:30:00Z", // 02:30 EDT
                ],
            },
            Case {
                name: "02:30 on fall-back day is unambiguous",
                expr: "30 2 * * *",
                tz: "America/New_York",
                after: "2025-11-01T00:00:00Z",
                expected: &[
                    "2025-11-01T06:30:00Z", // 02:30 EDT
                    "2025-11-02T07:30:00Z", // 02:30 EST
                    "2025-11-03T07:30:00Z", // 02:30 EST
                ],
            },
            Case {
                name: "01:30 on fall-back day fires once, at 01:30 EDT",
                expr: "30 1 * * *",
                tz: "America/New_York",
                after: "2025-11-01T00:00:00Z",
                expected: &[
                    "2025-11-01T05:30:00Z", // 01:30 EDT
                    "2025-11-02T05:30:00Z", // 01:30 EDT (not 06:30Z = 01:30 EST)
                    "2025-11-03T06:30:00Z", // 01:30 EST
                ],
            },
            Case {
                name: "01:30 on spring-forward day is before the gap",
                expr: "30 1 * * *",
                tz: "America/New_York",
                after: "2025-03-08T00:00:00Z",
                expected: &[
                    "2025-03-08T06:30:00Z", // 01:30 EST
                    "2025-03-09T06:30:00Z", // 01:30 EST
                    "2025-03-10T05:30:00Z", // 01:30 EDT
                ],
            },
        ]);
    }

    #[test]
    fn new_york_hourly_spring_forward_day_lists_every_real_hour() {
        run_cases(&[Case {
            name: "0 * * * * on 2025-03-09 New York: 23 fires",
            expr: "0 * * * *",
            tz: "America/New_York",
            after: "2025-03-09T04:59:59Z",
            expected: &[
                "2025-03-09T05:00:00Z", // 00:00 EST
                "2025-03-09T06:00:00Z", // 01:00 EST
                "2025-03-09T07:00:00Z", // 03:00 EDT (02:00 does not exist)
                "2025-03-09T08:00:00Z", // 04:00 EDT
                "2025-03-09T09:00:00Z",
                "2025-03-09T10:00:00Z",
                "2025-03-09T11:00:00Z",
                "2025-03-09T12:00:00Z",
                "2025-03-09T13:00:00Z",
                "2025-03-09T14:00:00Z",
                "2025-03-09T15:00:00Z",
                "2025-03-09T16:00:00Z",
                "2025-03-09T17:00:00Z",
                "2025-03-09T18:00:00Z",
                "2025-03-09T19:00:00Z",
                "2025-03-09T20:00:00Z",
                "2025-03-09T21:00:00Z",
                "2025-03-09T22:00:00Z",
                "2025-03-09T23:00:00Z", // 19:00 EDT
                "2025-03-10T00:00:00Z", // 20:00 EDT
                "2025-03-10T01:00:00Z",
                "2025-03-10T02:00:00Z",
                "2025-03-10T03:00:00Z", // 23:00 EDT, the 23rd fire of the day
                "2025-03-10T04:00:00Z", // 00:00 EDT of the next day
            ],
        }]);
    }

    #[test]
    fn new_york_hourly_fall_back_day_lists_every_real_hour() {
        run_cases(&[Case {
            name: "0 * * * * on 2025-11-02 New York: 25 fires",
            expr: "0 * * * *",
            tz: "America/New_York",
            after: "2025-11-02T03:59:59Z",
            expected: &[
                "2025-11-02T04:00:00Z", // 00:00 EDT
                "2025-11-02T05:00:00Z", // 01:00 EDT
                "2025-11-02T06:00:00Z", // 01:00 EST (same wall time, next real hour)
                "2025-11-02T07:00:00Z", // 02:00 EST
                "2025-11-02T08:00:00Z",
                "2025-11-02T09:00:00Z",
                "2025-11-02T10:00:00Z",
                "2025-11-02T11:00:00Z",
                "2025-11-02T12:00:00Z",
                "2025-11-02T13:00:00Z",
                "2025-11-02T14:00:00Z",
                "2025-11-02T15:00:00Z",
                "2025-11-02T16:00:00Z",
                "2025-11-02T17:00:00Z",
                "2025-11-02T18:00:00Z",
                "2025-11-02T19:00:00Z",
                "2025-11-02T20:00:00Z",
                "2025-11-02T21:00:00Z",
                "2025-11-02T22:00:00Z",
                "2025-11-02T23:00:00Z", // 18:00 EST
                "2025-11-03T00:00:00Z", // 19:00 EST
                "2025-11-03T01:00:00Z",
                "2025-11-03T02:00:00Z",
                "2025-11-03T03:00:00Z",
                "2025-11-03T04:00:00Z", // 23:00 EST, the 25th fire of the day
                "2025-11-03T05:00:00Z", // 00:00 EST of the next day
            ],
        }]);
    }

    #[test]
    fn fifteen_minutely_counts_real_quarter_hours_on_transition_days() {
        let s = cron("*/15 * * * *", "America/New_York");
        // Local 2025-11-02 00:00 EDT .. 2025-11-03 00:00 EST: 25 real hours.
        let fall = fires_between(&s, utc("2025-11-02T04:00:00Z"), utc("2025-11-03T05:00:00Z"));
        assert_eq!(fall.len(), 100);
        // Local 2025-03-09 00:00 EST .. 2025-03-10 00:00 EDT: 23 real hours.
        let spring = fires_between(&s, utc("2025-03-09T05:00:00Z"), utc("2025-03-10T04:00:00Z"));
        assert_eq!(spring.len(), 92);
        for day in [&fall, &spring] {
            for pair in day.windows(2) {
                assert_eq!((pair[1] - pair[0]).num_seconds(), 900, "{pair:?}");
            }
        }
        assert_eq!(fall[4], utc("2025-11-02T05:00:00Z")); // 01:00 EDT
        assert_eq!(fall[8], utc("2025-11-02T06:00:00Z")); // 01:00 EST
        assert_eq!(spring[7], utc("2025-03-09T06:45:00Z")); // 01:45 EST
        assert_eq!(spring[8], utc("2025-03-09T07:00:00Z")); // 03:00 EDT
    }

    // Berlin 2025: CET->CEST Sun 2025-03-30 02:00 CET (01:00Z) -> 03:00 CEST;
    // CEST->CET Sun 2025-10-26 03:00 CEST (01:00Z) -> 02:00 CET.
    #[test]
    fn berlin_both_transitions() {
        run_cases(&[
            Case {
                name: "Berlin 02:30 spring",
                expr: "30 2 * * *",
                tz: "Europe/Berlin",
                after: "2025-03-29T00:00:00Z",
                expected: &[
                    "2025-03-29T01:30:00Z", // 02:30 CET
                    "2025-03-30T01:00:00Z", // 02:30 missing -> 03:00 CEST
                    "2025-03-31T00:30:00Z", // 02:30 CEST
                ],
            },
            Case {
                name: "Berlin 02:30 fall",
                expr: "30 2 * * *",
                tz: "Europe/Berlin",
                after: "2025-10-25T00:00:00Z",
                expected: &[
                    "2025-10-25T00:30:00Z", // 02:30 CEST
                    "2025-10-26T00:30:00Z", // 02:30 CEST only (not 01:30Z = 02:30 CET)
                    "2025-10-27T01:30:00Z", // 02:30 CET
                ],
            },
            Case {
                name: "Berlin hourly spring",
                expr: "0 * * * *",
                tz: "Europe/Berlin",
                after: "2025-03-29T22:30:00Z",
                expected: &[
                    "2025-03-29T23:00:00Z", // 00:00 CET
                    "2025-03-30T00:00:00Z", // 01:00 CET
                    "2025-03-30T01:00:00Z", // 03:00 CEST
                    "2025-03-30T02:00:00Z", // 04:00 CEST
                ],
            },
            Case {
                name: "Berlin hourly fall",
                expr: "0 * * * *",
                tz: "Europe/Berlin",
                after: "2025-10-25T22:30:00Z",
                expected: &[
                    "2025-10-25T23:00:00Z", // 01:00 CEST
                    "2025-10-26T00:00:00Z", // 02:00 CEST
                    "2025-10-26T01:00:00Z", // 02:00 CET
                    "2025-10-26T02:00:00Z", // 03:00 CET
                ],
            },
            Case {
                name: "Berlin half-hourly fall",
                expr: "*/30 * * * *",
                tz: "Europe/Berlin",
                after: "2025-10-25T23:59:59Z",
                expected: &[
                    "2025-10-26T00:00:00Z", // 02:00 CEST
                    "2025-10-26T00:30:00Z", // 02:30 CEST
                    "2025-10-26T01:00:00Z", // 02:00 CET
                    "2025-10-26T01:30:00Z", // 02:30 CET
                    "2025-10-26T02:00:00Z", // 03:00 CET
                ],
            },
        ]);
    }

    #[test]
    fn non_dst_zone_tokyo() {
        run_cases(&[
            Case {
                name: "Tokyo 02:30 across the US/EU transition dates",
                expr: "30 2 * * *",
                tz: "Asia/Tokyo",
                after: "2025-03-08T00:00:00Z",
                expected: &[
                    "2025-03-08T17:30:00Z", // 2025-03-09 02:30 JST
                    "2025-03-09T17:30:00Z",
                    "2025-03-10T17:30:00Z",
                ],
            },
            Case {
                name: "Tokyo hourly around 2025-10-26",
                expr: "0 * * * *",
                tz: "Asia/Tokyo",
                after: "2025-10-26T00:30:00Z",
                expected: &[
                    "2025-10-26T01:00:00Z",
                    "2025-10-26T02:00:00Z",
                    "2025-10-26T03:00:00Z",
                ],
            },
        ]);
    }

    #[test]
    fn other_transition_shapes() {
        run_cases(&[
            // Havana springs forward at midnight: 2025-03-09 00:00 CST -> 01:00 CDT.
            Case {
                name: "Havana gap at midnight",
                expr: "30 0 * * *",
                tz: "America/Havana",
                after: "2025-03-08T00:00:00Z",
                expected: &[
                    "2025-03-08T05:30:00Z", // 00:30 CST
                    "2025-03-09T05:00:00Z", // 00:30 missing -> 01:00 CDT
                    "2025-03-10T04:30:00Z", // 00:30 CDT
                ],
            },
            // Lord Howe shifts by 30 minutes: 2025-10-05 02:00 -> 02:30 (+10:30 -> +11).
            Case {
                name: "Lord Howe half-hour gap",
                expr: "15 2 * * *",
                tz: "Australia/Lord_Howe",
                after: "2025-10-03T00:00:00Z",
                expected: &[
                    "2025-10-03T15:45:00Z", // 10-04 02:15 +10:30
                    "2025-10-04T15:30:00Z", // 10-05 02:15 missing -> 02:30 +11
                    "2025-10-05T15:15:00Z", // 10-06 02:15 +11
                ],
            },
            // ... and back on 2025-04-06 02:00 +11 -> 01:30 +10:30.
            Case {
                name: "Lord Howe half-hour fold",
                expr: "45 1 * * *",
                tz: "Australia/Lord_Howe",
                after: "2025-04-05T00:00:00Z",
                expected: &[
                    "2025-04-05T14:45:00Z", // 04-06 01:45 +11 (first of two)
                    "2025-04-06T15:15:00Z", // 04-07 01:45 +10:30
                ],
            },
        ]);
    }

    /// Jobs croner 4 calls "interval" (multi-value hour/minute) but Vixie calls
    /// fixed-time: this module applies the fixed-time DST rules to them.
    #[test]
    fn multi_value_fixed_time_jobs_follow_fixed_time_rules() {
        run_cases(&[
            Case {
                name: "01:30 and 13:30 fire once on fall-back day",
                expr: "30 1,13 * * *",
                tz: "America/New_York",
                after: "2025-11-02T00:00:00Z",
                expected: &[
                    "2025-11-02T05:30:00Z", // 01:30 EDT only
                    "2025-11-02T18:30:00Z", // 13:30 EST
                ],
            },
            Case {
                name: "02:30 and 14:30 on spring-forward day",
                expr: "30 2,14 * * *",
                tz: "America/New_York",
                after: "2025-03-09T00:00:00Z",
                expected: &[
                    "2025-03-09T07:00:00Z", // 02:30 missing -> 03:00 EDT
                    "2025-03-09T18:30:00Z", // 14:30 EDT
                ],
            },
            Case {
                name: "two missing wall times collapse into one fire",
                expr: "0,30 2 * * *",
                tz: "America/New_York",
                after: "2025-03-09T00:00:00Z",
                expected: &[
                    "2025-03-09T07:00:00Z", // 02:00 and 02:30 missing -> 03:00 EDT
                    "2025-03-10T06:00:00Z", // 02:00 EDT
                ],
            },
            Case {
                name: "stepped range without * is fixed-time",
                expr: "0-59/30 1 * * *",
                tz: "America/New_York",
                after: "2025-11-02T00:00:00Z",
                expected: &[
                    "2025-11-02T05:00:00Z", // 01:00 EDT
                    "2025-11-02T05:30:00Z", // 01:30 EDT (no 01:00/01:30 EST)
                    "2025-11-03T06:00:00Z", // 01:00 EST next day
                ],
            },
            Case {
                name: "wildcard minute in the missing hour is skipped",
                expr: "*/30 2 * * *",
                tz: "America/New_York",
                after: "2025-03-09T00:00:00Z",
                expected: &["2025-03-10T06:00:00Z"], // 2025-03-10 02:00 EDT
            },
            Case {
                name: "wildcard minute in the repeated hour fires on both passes",
                expr: "*/30 1 * * *",
                tz: "America/New_York",
                after: "2025-11-02T00:00:00Z",
                expected: &[
                    "2025-11-02T05:00:00Z", // 01:00 EDT
                    "2025-11-02T05:30:00Z", // 01:30 EDT
                    "2025-11-02T06:00:00Z", // 01:00 EST
                    "2025-11-02T06:30:00Z", // 01:30 EST
                    "2025-11-03T06:00:00Z", // 01:00 EST next day
                ],
            },
        ]);
    }

    /// Pins what croner 4 does natively where it disagrees with the product
    /// rules, so a croner upgrade that changes it is noticed.
    #[test]
    fn croner_native_behaviour_this_module_overrides() {
        let tz: Tz = "America/New_York".parse().unwrap_or(Tz::UTC);
        let native = |expr: &str, after: &str| {
            CronParser::builder()
                .seconds(Seconds::Disallowed)
                .build()
                .parse(expr)
                .and_then(|c| c.find_next_occurrence(&utc(after).with_timezone(&tz), false))
                .map(|t| t.with_timezone(&Utc))
                .ok()
        };
        // Multi-value hour: croner fires the repeated 01:30 twice ...
        assert_eq!(
            native("30 1,13 * * *", "2025-11-02T05:30:00Z"),
            Some(utc("2025-11-02T06:30:00Z"))
        );
        let ours = cron("30 1,13 * * *", "America/New_York");
        assert_eq!(
            ours.next_after(utc("2025-11-02T05:30:00Z")),
            Some(utc("2025-11-02T18:30:00Z"))
        );
        // ... and skips the missing 02:30.
        assert_eq!(
            native("30 2,14 * * *", "2025-03-09T00:00:00Z"),
            Some(utc("2025-03-09T18:30:00Z"))
        );
        let ours = cron("30 2,14 * * *", "America/New_York");
        assert_eq!(
            ours.next_after(utc("2025-03-09T00:00:00Z")),
            Some(utc("2025-03-09T07:00:00Z"))
        );
        // croner ORs a `*/2` day-of-month with a day-of-week (here: New York
        // midnight of Wed 2025-01-01, an odd day); Vixie ANDs it.
        assert_eq!(
            native("0 0 */2 * 1", "2024-12-31T12:00:00Z"),
            Some(utc("2025-01-01T05:00:00Z"))
        );
        let ours = cron("0 0 */2 * 1", "UTC");
        assert_eq!(
            ours.next_after(utc("2024-12-31T12:00:00Z")),
            Some(utc("2025-01-13T00:00:00Z"))
        );
        // croner accepts a plain `L` in day-of-week but it never matches
        // (the search runs to its year limit); this module rejects it.
        let plain = |expr: &str| {
            CronParser::builder()
                .seconds(Seconds::Disallowed)
                .build()
                .parse(expr)
        };
        let start = utc("2025-04-01T00:00:00Z").naive_utc();
        assert!(matches!(
            plain("0 0 * * L").map(|c| c.find_next_occurrence(&start, false)),
            Ok(Err(_))
        ));
        assert!(cron("0 0 * * L", "UTC").validate("s").is_err());
        // croner takes `L` as a day-of-month list item and `LW`; its errors
        // do not name the field (hence this module's own pre-check).
        assert_eq!(
            plain("0 0 1,L * *")
                .and_then(|c| c.find_next_occurrence(&start, false))
                .ok(),
            Some(utc("2025-04-30T00:00:00Z").naive_utc())
        );
        assert!(plain("0 0 LW * *").is_ok());
        assert!(
            CronParser::builder()
                .seconds(Seconds::Required)
                .build()
                .parse("60 * * * * *")
                .is_err_and(|e| !e.to_string().contains("second"))
        );
    }

    #[test]
    fn starting_inside_the_repeated_hour() {
        run_cases(&[
            Case {
                name: "hourly from 01:30 EDT",
                expr: "0 * * * *",
                tz: "America/New_York",
                after: "2025-11-02T05:30:00Z",
                expected: &["2025-11-02T06:00:00Z", "2025-11-02T07:00:00Z"],
            },
            Case {
                name: "hourly from 01:30 EST",
                expr: "0 * * * *",
                tz: "America/New_York",
                after: "2025-11-02T06:30:00Z",
                expected: &["2025-11-02T07:00:00Z"],
            },
            Case {
                name: "quarter-hourly from 01:10 EST",
                expr: "*/15 * * * *",
                tz: "America/New_York",
                after: "2025-11-02T06:10:00Z",
                expected: &["2025-11-02T06:15:00Z"],
            },
            Case {
                name: "01:30 from 01:45 EDT: already fired today",
                expr: "30 1 * * *",
                tz: "America/New_York",
                after: "2025-11-02T05:45:00Z",
                expected: &["2025-11-03T06:30:00Z"],
            },
            Case {
                name: "01:30 from 01:10 EST (second pass): already fired today",
                expr: "30 1 * * *",
                tz: "America/New_York",
                after: "2025-11-02T06:10:00Z",
                expected: &["2025-11-03T06:30:00Z"],
            },
            Case {
                name: "01:00,01:30 from 01:10 EST: second pass never fires",
                expr: "0-59/30 1 * * *",
                tz: "America/New_York",
                after: "2025-11-02T06:10:00Z",
                expected: &["2025-11-03T06:00:00Z"],
            },
            Case {
                name: "02:30 exactly at the gap fire time goes to the next day",
                expr: "30 2 * * *",
                tz: "America/New_York",
                after: "2025-03-09T07:00:00Z",
                expected: &["2025-03-10T06:30:00Z"],
            },
            Case {
                name: "02:30 one second before the gap",
                expr: "30 2 * * *",
                tz: "America/New_York",
                after: "2025-03-09T06:59:59Z",
                expected: &["2025-03-09T07:00:00Z"],
            },
        ]);
    }

    #[test]
    fn day_of_month_and_day_of_week() {
        run_cases(&[
            // 2025-01-01 is a Wednesday; 2025-01-13 a Monday; 2025-02-13 a Thursday.
            Case {
                name: "Vixie OR: the 13th or any Friday",
                expr: "0 0 13 * 5",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &[
                    "2025-01-03T00:00:00Z", // Fri
                    "2025-01-10T00:00:00Z", // Fri
                    "2025-01-13T00:00:00Z", // 13th (Mon)
                    "2025-01-17T00:00:00Z", // Fri
                    "2025-01-24T00:00:00Z", // Fri
                    "2025-01-31T00:00:00Z", // Fri
                    "2025-02-07T00:00:00Z", // Fri
                    "2025-02-13T00:00:00Z", // 13th (Thu)
                    "2025-02-14T00:00:00Z", // Fri
                ],
            },
            Case {
                name: "day-of-month starting with * ANDs (Vixie DOM_STAR)",
                expr: "0 0 */2 * 1",
                tz: "UTC",
                after: "2024-12-31T12:00:00Z",
                expected: &[
                    "2025-01-13T00:00:00Z", // odd Monday
                    "2025-01-27T00:00:00Z",
                    "2025-02-03T00:00:00Z",
                    "2025-02-17T00:00:00Z",
                ],
            },
            Case {
                name: "the same days written as a range OR",
                expr: "0 0 1-31/2 * MON",
                tz: "UTC",
                after: "2024-12-31T12:00:00Z",
                expected: &[
                    "2025-01-01T00:00:00Z", // odd day (Wed)
                    "2025-01-03T00:00:00Z", // odd day
                    "2025-01-05T00:00:00Z", // odd day
                    "2025-01-06T00:00:00Z", // Monday
                ],
            },
            Case {
                name: "? as day-of-month",
                expr: "0 12 ? * sun",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2025-01-05T12:00:00Z", "2025-01-12T12:00:00Z"],
            },
            Case {
                name: "names, SUN as 7, FRI-SUN",
                expr: "0 9 * jan-Feb FRI-SUN",
                tz: "UTC",
                after: "2025-01-30T00:00:00Z",
                expected: &[
                    "2025-01-31T09:00:00Z", // Fri
                    "2025-02-01T09:00:00Z", // Sat
                    "2025-02-02T09:00:00Z", // Sun
                    "2025-02-07T09:00:00Z", // Fri
                ],
            },
            Case {
                name: "7 is Sunday",
                expr: "0 0 * * 7",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2025-01-05T00:00:00Z"],
            },
        ]);
    }

    #[test]
    fn macros() {
        run_cases(&[
            Case {
                name: "@daily",
                expr: "@daily",
                tz: "Europe/Berlin",
                after: "2025-06-01T12:00:00Z",
                expected: &["2025-06-01T22:00:00Z"],
            },
            Case {
                name: "@MIDNIGHT",
                expr: " @MIDNIGHT ",
                tz: "UTC",
                after: "2025-06-01T12:00:00Z",
                expected: &["2025-06-02T00:00:00Z"],
            },
            Case {
                name: "@weekly is Sunday midnight",
                expr: "@weekly",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2025-01-05T00:00:00Z"],
            },
            Case {
                name: "@yearly",
                expr: "@yearly",
                tz: "UTC",
                after: "2025-01-01T00:00:00Z",
                expected: &["2026-01-01T00:00:00Z"],
            },
            Case {
                name: "@hourly is a wildcard job",
                expr: "@hourly",
                tz: "America/New_York",
                after: "2025-11-02T04:30:00Z",
                expected: &["2025-11-02T05:00:00Z", "2025-11-02T06:00:00Z"],
            },
        ]);
    }

    #[test]
    fn sub_second_and_exact_boundaries() {
        let hourly = cron("0 * * * *", "UTC");
        let daily = cron("30 2 * * *", "UTC");
        let table = [
            (
                &hourly,
                "2025-01-01T00:59:59.999999999Z",
                "2025-01-01T01:00:00Z",
            ),
            (&hourly, "2025-01-01T01:00:00Z", "2025-01-01T02:00:00Z"),
            (&hourly, "2025-01-01T01:00:00.5Z", "2025-01-01T02:00:00Z"),
            (&daily, "2025-01-01T02:29:59.5Z", "2025-01-01T02:30:00Z"),
            (&daily, "2025-01-01T02:30:00Z", "2025-01-02T02:30:00Z"),
            (
                &daily,
                "2025-01-01T02:30:00.000000001Z",
                "2025-01-02T02:30:00Z",
            ),
        ];
        for (s, after, want) in table {
            assert_eq!(
                s.next_after(utc(after)),
                Some(utc(want)),
                "{s:?} after {after}"
            );
        }
    }

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

    /// For single-value jobs croner itself applies the fixed-time rules;
    /// this module's own fixed-time evaluation must agree with it.
    #[test]
    fn fixed_time_evaluation_agrees_with_croner_for_single_value_jobs() {
        let zones = [
            "America/New_York",
            "Europe/Berlin",
            "America/Havana",
            "Australia/Lord_Howe",
            "America/Santiago",
            "Asia/Tokyo",
        ];
        let exprs = [
            "30 2 * * *",
            "30 1 * * *",
            "0 0 * * *",
            "15 2 * * 0",
            "45 23 * * *",
        ];
        for zone in zones {
            let tz: Tz = zone.parse().unwrap_or(Tz::UTC);
            for expr in exprs {
                let s = cron(expr, zone);
                let native = CronParser::builder()
                    .seconds(Seconds::Disallowed)
                    .build()
                    .parse(expr)
                    .unwrap_or_else(|e| panic!("{expr}: {e}"));
                let mut t = utc("2024-01-01T00:00:00Z");
                while t < utc("2026-01-01T00:00:00Z") {
                    let ours = s
                        .next_after(t)
                        .unwrap_or_else(|| panic!("{expr} {zone} {t}"));
                    let theirs = native
                        .find_next_occurrence(&t.with_timezone(&tz), false)
                        .map(|x| x.with_timezone(&Utc))
                        .unwrap_or_else(|e| panic!("{expr} {zone}: {e}"));
                    assert_eq!(ours, theirs, "{expr} in {zone} after {t}");
                    t = ours;
                }
            }
        }
    }

    /// Wildcard jobs fire every real hour / quarter hour through transitions.
    #[test]
    fn wildcard_jobs_keep_real_time_spacing_around_transitions() {
        let windows = [
            (
                "America/New_York",
                "2025-03-08T00:00:00Z",
                "2025-03-11T00:00:00Z",
            ),
            (
                "America/New_York",
                "2025-11-01T00:00:00Z",
                "2025-11-04T00:00:00Z",
            ),
            (
                "Europe/Berlin",
                "2025-03-29T00:00:00Z",
                "2025-04-01T00:00:00Z",
            ),
            (
                "Europe/Berlin",
                "2025-10-25T00:00:00Z",
                "2025-10-28T00:00:00Z",
            ),
            (
                "America/Havana",
                "2025-11-01T00:00:00Z",
                "2025-11-04T00:00:00Z",
            ),
        ];
        for (zone, from, to) in windows {
            for (expr, step) in [("0 * * * *", 3600), ("*/15 * * * *", 900)] {
                let s = cron(expr, zone);
                let all = fires_between(&s, utc(from), utc(to));
                assert_eq!(all.len() as i64, (utc(to) - utc(from)).num_seconds() / step);
                for pair in all.windows(2) {
                    assert_eq!(
                        (pair[1] - pair[0]).num_seconds(),
                        step,
                        "{expr} {zone} {pair:?}"
                    );
                }
            }
        }
    }

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

    #[test]
    fn once_and_manual() {
        let once = Schedule::new(
            ScheduleKind::Once {
                at: utc("2025-06-01T12:00:00Z"),
            },
            "Europe/Berlin".to_string(),
        );
        assert_eq!(
            once.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2025-06-01T12:00:00Z"))
        );
        assert_eq!(
            once.next_after(utc("2025-06-01T11:59:59.999Z")),
            Some(utc("2025-06-01T12:00:00Z"))
        );
        assert_eq!(once.next_after(utc("2025-06-01T12:00:00Z")), None);
        assert_eq!(once.next_after(utc("2026-01-01T00:00:00Z")), None);

        let manual = Schedule::new(ScheduleKind::Manual, "UTC".to_string());
        assert_eq!(manual.validate("schedule"), Ok(()));
        for t in [
            DateTime::<Utc>::MIN_UTC,
            utc("2025-01-01T00:00:00Z"),
            DateTime::<Utc>::MAX_UTC,
        ] {
            assert_eq!(manual.next_after(t), None);
        }
    }

    #[test]
    fn resolve_anchor_fills_only_missing_interval_anchors() {
        let created = utc("2025-05-05T05:05:05Z");
        assert_eq!(
            interval(60, None).resolve_anchor(created),
            interval(60, Some("2025-05-05T05:05:05Z"))
        );
        let anchored = interval(60, Some("2020-01-01T00:00:00Z"));
        assert_eq!(anchored.clone().resolve_anchor(created), anchored);
        let c = cron("0 * * * *", "UTC");
        assert_eq!(c.clone().resolve_anchor(created), c);
        // The common fields are kept.
        let mut windowed = window(
            interval(60, None),
            Some("2025-06-01T00:00:00Z"),
            Some("2026-06-01T00:00:00Z"),
        );
        windowed.jitter_secs = 5;
        let resolved = windowed.clone().resolve_anchor(created);
        assert_eq!(
            resolved.kind,
            ScheduleKind::Interval {
                every_secs: 60,
                anchor_time: Some(created)
            }
        );
        assert_eq!(
            (resolved.jitter_secs, resolved.start_time, resolved.end_time),
            (5, windowed.start_time, windowed.end_time)
        );
    }

    #[test]
    fn cron_validation_errors_name_the_field() {
        let fields = "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (second minute hour day-of-month month day-of-week)";
        let dom_ext = "(of the L, W, # and + extensions only a plain \"L\", the last day of the month, is supported, as a list item without range or step)";
        let table: Vec<(&str, String)> = vec![
            ("0 25 * * *", "field 2 (hour): 25 is out of range 0-23".into()),
            ("1 2 3", format!("{fields}, got 3")),
            ("", format!("{fields}, got 0")),
            ("0 0 0 * * * 2025", format!("{fields}, got 7 (a year field is not supported)")),
            ("0 0 0 0 * * * 2025", format!("{fields}, got 8")),
            ("x * * * *", "field 1 (minute): invalid value \"x\"".into()),
            ("60 * * * *", "field 1 (minute): 60 is out of range 0-59".into()),
            ("0 0 0 * *", "field 3 (day-of-month): 0 is out of range 1-31".into()),
            ("0 0 32 * *", "field 3 (day-of-month): 32 is out of range 1-31".into()),
            ("0 0 * 13 *", "field 4 (month): 13 is out of range 1-12".into()),
            ("0 0 * 0 *", "field 4 (month): 0 is out of range 1-12".into()),
            ("0 0 * * 8", "field 5 (day-of-week): 8 is out of range 0-7".into()),
            ("99999999999 * * * *", "field 1 (minute): 99999999999 is out of range 0-59".into()),
            ("-1 * * * *", "field 1 (minute): invalid range \"-1\"".into()),
            ("+5 * * * *", "field 1 (minute): invalid value \"+5\"".into()),
            ("1,,2 * * * *", "field 1 (minute): empty list element in \"1,,2\"".into()),
            ("0 0 * * 5-0", "field 5 (day-of-week): range 5-0 is reversed (start must not be greater than end; use 7 for Sunday at the end of a range)".into()),
            ("0 17-9 * * *", "field 2 (hour): range 17-9 is reversed (start must not be greater than end)".into()),
            ("*/0 * * * *", "field 1 (minute): step 0 in \"*/0\" is invalid (must be at least 1)".into()),
            ("*/x * * * *", "field 1 (minute): invalid step \"x\" in \"*/x\"".into()),
            ("*/ * * * *", "field 1 (minute): invalid step \"\" in \"*/\"".into()),
            ("*/90 * * * *", "field 1 (minute): step 90 is out of range 1-59".into()),
            ("5/15 * * * *", "field 1 (minute): \"5/15\" needs \"*\" or a range before \"/\" (write \"5-59/15\")".into()),
            ("/15 * * * *", "field 1 (minute): \"/15\" needs \"*\" or a range before \"/\"".into()),
            ("? * * * *", "field 1 (minute): \"?\" is only allowed in day-of-month and day-of-week".into()),
            ("0 0 * MON *", "field 4 (month): invalid value \"MON\"".into()),
            ("0 0 * * JAN", "field 5 (day-of-week): invalid value \"JAN\"".into()),
            ("0 0 * * MONDAY", "field 5 (day-of-week): invalid value \"MONDAY\"".into()),
            ("0 0 15W * *", format!("field 3 (day-of-month): invalid value \"15W\" {dom_ext}")),
            ("0 0 LW * *", format!("field 3 (day-of-month): invalid value \"LW\" {dom_ext}")),
            ("0 0 L-3 * *", format!("field 3 (day-of-month): invalid value \"L\" {dom_ext}")),
            ("0 0 20-L * *", format!("field 3 (day-of-month): invalid value \"L\" {dom_ext}")),
            ("0 0 L/2 * *", format!("field 3 (day-of-month): invalid value \"L\" {dom_ext}")),
            ("0 0 * * 5L", "field 5 (day-of-week): invalid value \"5L\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 * * 5#L", "field 5 (day-of-week): invalid value \"5#L\" (the L, W, # and + extensions are not supported)".into()),
            ("L 0 * * *", "field 1 (minute): invalid value \"L\"".into()),
            ("0 0 * * 5#2", "field 5 (day-of-week): invalid value \"5#2\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 1 * +MON", "field 5 (day-of-week): invalid value \"+MON\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 30 2 *", "never fires: no month in field 4 (month) has a day listed in field 3 (day-of-month)".into()),
            ("0 0 31 4,6,9,11 ?", "never fires: no month in field 4 (month) has a day listed in field 3 (day-of-month)".into()),
            ("@reboot", "unsupported macro \"@reboot\" (supported: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)".into()),
            ("@daily 5", "unsupported macro \"@daily 5\" (supported: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)".into()),
        ];
        for (expr, reason) in table {
            let s = cron(expr, "UTC");
            assert_eq!(
                s.validate("definition.schedule"),
                Err(ScheduleError {
                    field: "definition.schedule.cron.expression".to_string(),
                    reason,
                }),
                "{expr:?}"
            );
            // Invalid schedules never fire and never panic.
            assert_eq!(s.next_after(utc("2025-01-01T00:00:00Z")), None, "{expr:?}");
        }
    }

    #[test]
    fn cron_accepts_valid_syntax() {
        for expr in [
            "* * * * *",
            "0 0 29 2 *", // leap days only
            "0 0 30 2 1", // OR: Mondays in February
            "0 0 31 * *",
            "0-59/5 9-17 * * 1-5",
            "5,10-20/5,*/30 */6 1,15 */3 *",
            "0 0 ? * ?",
            "0 0 * * SUN-SAT",
            "0 0 * * sun,Sat",
            "\t0  0\t* *   *  ",
            "0 0 * JAN-DEC 0-7",
            "*/59 */23 */31 */12 */7",
            "@annually",
            "@Monthly",
        ] {
            assert_eq!(cron(expr, "UTC").validate("s"), Ok(()), "{expr:?}");
            assert!(
                cron(expr, "UTC")
                    .next_after(utc("2025-01-01T00:00:00Z"))
                    .is_some(),
                "{expr:?}"
            );
        }
        // SUN-SUN is Sunday only (not the whole week).
        let s = cron("0 0 * * SUN-SUN", "UTC");
        assert_eq!(
            s.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2025-01-05T00:00:00Z"))
        );
        // Leap day: next after 2025 is 2028-02-29.
        let s = cron("0 0 29 2 *", "UTC");
        assert_eq!(
            s.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2028-02-29T00:00:00Z"))
        );
    }

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
    fn describe_local_formats_in_zone() {
        let ny = cron("30 2 * * *", "America/New_York");
        assert_eq!(
            ny.describe_local(utc("2025-03-09T07:00:00Z")),
            "2025-03-09T03:00:00-04:00"
        );
        assert_eq!(
            ny.describe_local(utc("2025-11-02T06:30:00Z")),
            "2025-11-02T01:30:00-05:00"
        );
        let kolkata = cron("0 * * * *", "Asia/Kolkata");
        assert_eq!(
            kolkata.describe_local(utc("2025-01-01T00:00:00.5Z")),
            "2025-01-01T05:30:00.500+05:30"
        );
        let bad = cron("0 * * * *", "Mars/Base");
        assert_eq!(
            bad.describe_local(utc("2025-03-09T07:00:00Z")),
            "2025-03-09T07:00:00+00:00"
        );
    }

    #[test]
    fn serde_shape_is_stable() {
        let table = [
            (
                cron("*/15 * * * *", "Europe/Berlin"),
                r#"{"kind":"cron","expression":"*/15 * * * *","timezone":"Europe/Berlin"}"#,
            ),
            (
                interval(90, Some("2025-01-01T00:00:00Z")),
                r#"{"kind":"interval","every_secs":90,"anchor_time":"2025-01-01T00:00:00Z","timezone":"UTC"}"#,
            ),
            (
                interval(90, None),
                r#"{"kind":"interval","every_secs":90,"anchor_time":null,"timezone":"UTC"}"#,
            ),
            (
                Schedule::new(
                    ScheduleKind::Once {
                        at: utc("2025-06-01T12:00:00.25Z"),
                    },
                    "UTC".to_string(),
                ),
                r#"{"kind":"once","at":"2025-06-01T12:00:00.250Z","timezone":"UTC"}"#,
            ),
            (
                Schedule::new(ScheduleKind::Manual, "UTC".to_string()),
                r#"{"kind":"manual","timezone":"UTC"}"#,
            ),
        ];
        for (schedule, json) in table {
            assert_eq!(serde_json::to_string(&schedule).ok().as_deref(), Some(json));
            let back: Schedule =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, schedule);
        }
        // anchor_time may be absent; instants may carry any offset.
        let absent: Schedule =
            serde_json::from_str(r#"{"kind":"interval","every_secs":5,"timezone":"UTC"}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(absent, interval(5, None));
        let offset: Schedule = serde_json::from_str(
            r#"{"kind":"once","at":"2025-03-09T03:00:00-04:00","timezone":"UTC"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            offset.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2025-03-09T07:00:00Z"))
        );
        assert!(
            serde_json::from_str::<Schedule>(
                r#"{"kind":"once","at":"yesterday","timezone":"UTC"}"#
            )
            .is_err()
        );

        // Stored JSON from before the calendar kinds and common fields
        // decodes with their defaults.
        let legacy: Schedule =
            serde_json::from_str(r#"{"kind":"cron","expression":"30 2 * * *","timezone":"UTC"}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(legacy, cron("30 2 * * *", "UTC"));
        assert_eq!(
            (legacy.jitter_secs, legacy.start_time, legacy.end_time),
            (0, None, None)
        );

        // New kinds and the common fields (left out when unset).
        let mut full = weekly(&[1, 5], "09:00", "Europe/Berlin");
        full.jitter_secs = 30;
        full.start_time = Some(utc("2025-01-01T00:00:00Z"));
        full.end_time = Some(utc("2026-01-01T00:00:00.5Z"));
        let table = [
            (
                daily("02:30", "America/New_York"),
                r#"{"kind":"daily","time_of_day":"02:30:00","timezone":"America/New_York"}"#,
            ),
            (
                full,
                r#"{"kind":"weekly","days_of_week":[1,5],"time_of_day":"09:00:00","timezone":"Europe/Berlin","jitter_secs":30,"start_time":"2025-01-01T00:00:00Z","end_time":"2026-01-01T00:00:00.500Z"}"#,
            ),
            (
                monthly(-1, "23:00:15", "UTC"),
                r#"{"kind":"monthly","day_of_month":-1,"time_of_day":"23:00:15","timezone":"UTC"}"#,
            ),
            (
                yearly(2, 29, "12:00", "UTC"),
                r#"{"kind":"yearly","month":2,"day":29,"time_of_day":"12:00:00","timezone":"UTC"}"#,
            ),
            (
                window(
                    cron("*/10 * * * * *", "UTC"),
                    None,
                    Some("2030-01-01T00:00:00Z"),
                ),
                r#"{"kind":"cron","expression":"*/10 * * * * *","timezone":"UTC","end_time":"2030-01-01T00:00:00Z"}"#,
            ),
        ];
        for (schedule, json) in table {
            assert_eq!(serde_json::to_string(&schedule).ok().as_deref(), Some(json));
            let back: Schedule =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, schedule);
        }
        // Reading: "HH:MM", explicit nulls/zero for the common fields, offsets.
        let read: Schedule = serde_json::from_str(
            r#"{"kind":"daily","time_of_day":"07:05","timezone":"UTC","jitter_secs":0,"start_time":null,"end_time":"2026-01-01T01:00:00+01:00"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read,
            window(daily("07:05", "UTC"), None, Some("2026-01-01T00:00:00Z"))
        );
        for bad in [
            r#"{"kind":"daily","time_of_day":"7:05","timezone":"UTC"}"#,
            r#"{"kind":"daily","time_of_day":"24:00","timezone":"UTC"}"#,
            r#"{"kind":"daily","timezone":"UTC"}"#,
            r#"{"kind":"weekly","days_of_week":[256],"time_of_day":"09:00","timezone":"UTC"}"#,
            r#"{"kind":"monthly","day_of_month":200,"time_of_day":"09:00","timezone":"UTC"}"#,
            r#"{"kind":"daily","time_of_day":"09:00","timezone":"UTC","jitter_secs":-1}"#,
            r#"{"kind":"daily","time_of_day":"09:00","timezone":"UTC","start_time":"soon"}"#,
            r#"{"kind":"fortnightly","timezone":"UTC"}"#,
        ] {
            assert!(serde_json::from_str::<Schedule>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn extreme_instants_never_panic() {
        let schedules = [
            cron("30 2 * * *", "America/New_York"),
            cron("*/15 * * * *", "Pacific/Kiritimati"),
            cron("0 0 * * *", "Etc/GMT+12"),
            interval(7, Some("2025-01-01T00:00:00Z")),
        ];
        for s in &schedules {
            for t in [
                DateTime::<Utc>::MIN_UTC,
                DateTime::<Utc>::MAX_UTC,
                utc("4999-12-31T23:00:00Z"),
            ] {
                let _ = s.next_after(t);
                let _ = s.describe_local(t);
            }
        }
        // Far past: the cron search starts at year 1.
        let s = cron("0 0 1 1 *", "UTC");
        assert_eq!(
            s.next_after(DateTime::<Utc>::MIN_UTC),
            Some(utc("0002-01-01T00:00:00Z"))
        );
    }

    // -----------------------------------------------------------------------
    // Calendar kinds, 6-field cron, L, window, jitter, dst_shifted
    // -----------------------------------------------------------------------

    const NY: &str = "America/New_York";
    const BERLIN: &str = "Europe/Berlin";
    const LORD_HOWE: &str = "Australia/Lord_Howe";
    const SYDNEY: &str = "Australia/Sydney";

    fn tod(text: &str) -> TimeOfDay {
        TimeOfDay::parse(text).unwrap_or_else(|e| panic!("bad test time {text}: {e}"))
    }

    fn daily(time: &str, tz: &str) -> Schedule {
        Schedule::new(
            ScheduleKind::Daily {
                time_of_day: tod(time),
            },
            tz,
        )
    }

    fn weekly(days: &[u8], time: &str, tz: &str) -> Schedule {
        Schedule::new(
            ScheduleKind::Weekly {
                days_of_week: days.to_vec(),
                time_of_day: tod(time),
            },
            tz,
        )
    }

    fn monthly(day_of_month: i8, time: &str, tz: &str) -> Schedule {
        Schedule::new(
            ScheduleKind::Monthly {
                day_of_month,
                time_of_day: tod(time),
            },
            tz,
        )
    }

    fn yearly(month: u8, day: u8, time: &str, tz: &str) -> Schedule {
        Schedule::new(
            ScheduleKind::Yearly {
                month,
                day,
                time_of_day: tod(time),
            },
            tz,
        )
    }

    fn once(at: &str) -> Schedule {
        Schedule::new(ScheduleKind::Once { at: utc(at) }, "UTC")
    }

    fn window(mut s: Schedule, start: Option<&str>, end: Option<&str>) -> Schedule {
        s.start_time = start.map(utc);
        s.end_time = end.map(utc);
        s
    }

    /// One row of `fire_time_table`: the expected next fire is written out by
    /// hand (UTC), with the local wall time in the comment.
    struct Row {
        name: &'static str,
        schedule: Schedule,
        after: &'static str,
        /// `None`: no further fire. `Some((instant, dst_shifted))`.
        want: Option<(&'static str, bool)>,
    }

    fn row(
        name: &'static str,
        schedule: Schedule,
        after: &'static str,
        want: Option<(&'static str, bool)>,
    ) -> Row {
        Row {
            name,
            schedule,
            after,
            want,
        }
    }

    const SHIFTED: bool = true;
    const EXACT: bool = false;

    // Transitions used below (all from the tz database, written out by hand):
    // New York   2025-03-09 02:00 EST -> 03:00 EDT at 07:00Z;
    //            2025-11-02 02:00 EDT -> 01:00 EST at 06:00Z. EST = -5, EDT = -4.
    // Berlin     2025-03-30 02:00 CET -> 03:00 CEST at 01:00Z;
    //            2025-10-26 03:00 CEST -> 02:00 CET at 01:00Z. CET = +1, CEST = +2.
    // Lord Howe  2025-04-06 02:00 +11 -> 01:30 +10:30 at 2025-04-05T15:00Z;
    //            2025-10-05 02:00 +10:30 -> 02:30 +11 at 2025-10-04T15:30Z.
    // Sydney     AEDT (+11) from the first Sunday of October to the first
    //            Sunday of April, so all of December/January is +11.
    // Chatham    2025-09-28 02:45 +12:45 -> 03:45 +13:45 at 2025-09-27T14:00Z.
    // Kolkata    +05:30 and Tokyo +09:00, no DST.
    #[test]
    fn fire_time_table() {
        let table = vec![
            // --- New York: calendar kinds and fixed-time cron ---------------
            row(
                "NY daily 02:30 on spring-forward day -> 03:00 EDT, shifted",
                daily("02:30", NY),
                "2025-03-08T12:00:00Z",
                Some(("2025-03-09T07:00:00Z", SHIFTED)),
            ),
            row(
                "NY daily 02:30 the day after spring-forward (02:30 EDT)",
                daily("02:30", NY),
                "2025-03-09T07:00:00Z",
                Some(("2025-03-10T06:30:00Z", EXACT)),
            ),
            row(
                "NY daily 01:30 on fall-back day: first occurrence (EDT)",
                daily("01:30", NY),
                "2025-11-01T12:00:00Z",
                Some(("2025-11-02T05:30:00Z", EXACT)),
            ),
            row(
                "NY daily 01:30 right after its first occurrence: next day 01:30 EST",
                daily("01:30", NY),
                "2025-11-02T05:30:00Z",
                Some(("2025-11-03T06:30:00Z", EXACT)),
            ),
            row(
                "NY daily 01:30 from inside the second pass (01:10 EST): next day",
                daily("01:30:00", NY),
                "2025-11-02T06:10:00Z",
                Some(("2025-11-03T06:30:00Z", EXACT)),
            ),
            row(
                "NY hourly cron across the gap: 01:00 EST -> 03:00 EDT, not shifted",
                cron("0 * * * *", NY),
                "2025-03-09T06:00:00Z",
                Some(("2025-03-09T07:00:00Z", EXACT)),
            ),
            row(
                "NY cron 30 2 * * * in the gap: 03:00 EDT, shifted",
                cron("30 2 * * *", NY),
                "2025-03-09T00:00:00Z",
                Some(("2025-03-09T07:00:00Z", SHIFTED)),
            ),
            row(
                "NY cron 0,30 2,3: 02:00/02:30 missing, 03:00 asked for anyway: not shifted",
                cron("0,30 2,3 * * *", NY),
                "2025-03-09T05:00:00Z",
                Some(("2025-03-09T07:00:00Z", EXACT)),
            ),
            row(
                "NY 6-field fixed cron 0 30 2 * * * in the gap: 03:00:00 EDT, shifted",
                cron("0 30 2 * * *", NY),
                "2025-03-09T00:00:00Z",
                Some(("2025-03-09T07:00:00Z", SHIFTED)),
            ),
            row(
                "NY 6-field fixed cron 15 30 1 after its first pass: next day 01:30:15 EST",
                cron("15 30 1 * * *", NY),
                "2025-11-02T05:31:00Z",
                Some(("2025-11-03T06:30:15Z", EXACT)),
            ),
            row(
                "NY 6-field every 10 s across the gap: 01:59:50 EST -> 03:00:00 EDT",
                cron("*/10 * * * * *", NY),
                "2025-03-09T06:59:55Z",
                Some(("2025-03-09T07:00:00Z", EXACT)),
            ),
            row(
                "NY daily 02:30 with start_time exactly at the shifted fire",
                window(daily("02:30", NY), Some("2025-03-09T07:00:00Z"), None),
                "2025-01-01T00:00:00Z",
                Some(("2025-03-09T07:00:00Z", SHIFTED)),
            ),
            // --- Berlin ------------------------------------------------------
            row(
                "Berlin weekly SUN 02:30 on spring-forward Sunday -> 03:00 CEST, shifted",
                weekly(&[0], "02:30", BERLIN),
                "2025-03-29T00:00:00Z",
                Some(("2025-03-30T01:00:00Z", SHIFTED)),
            ),
            row(
                "Berlin monthly 26th 02:30 on fall-back day: first occurrence (CEST)",
                monthly(26, "02:30", BERLIN),
                "2025-10-01T00:00:00Z",
                Some(("2025-10-26T00:30:00Z", EXACT)),
            ),
            row(
                "Berlin daily 02:30 after its first fall-back occurrence: next day CET",
                daily("02:30", BERLIN),
                "2025-10-26T00:30:00Z",
                Some(("2025-10-27T01:30:00Z", EXACT)),
            ),
            row(
                "Berlin */30 cron in the repeated hour: 02:30 CEST -> 02:00 CET",
                cron("*/30 * * * *", BERLIN),
                "2025-10-26T00:30:00Z",
                Some(("2025-10-26T01:00:00Z", EXACT)),
            ),
            row(
                "Berlin yearly 30 March 02:15 in the gap -> 03:00 CEST, shifted",
                yearly(3, 30, "02:15", BERLIN),
                "2025-01-01T00:00:00Z",
                Some(("2025-03-30T01:00:00Z", SHIFTED)),
            ),
            row(
                "Berlin 6-field */20 0 2 (seconds wildcard) fires on both passes",
                cron("*/20 0 2 * * *", BERLIN),
                "2025-10-26T00:00:40Z",
                Some(("2025-10-26T01:00:00Z", EXACT)),
            ),
            // --- Lord Howe (30-minute DST) -----------------------------------
            row(
                "Lord Howe daily 02:15 in the 30-min gap -> 02:30 +11, shifted",
                daily("02:15", LORD_HOWE),
                "2025-10-04T00:00:00Z",
                Some(("2025-10-04T15:30:00Z", SHIFTED)),
            ),
            row(
                "Lord Howe daily 02:30 is the gap's end and exists: not shifted",
                daily("02:30", LORD_HOWE),
                "2025-10-04T00:00:00Z",
                Some(("2025-10-04T15:30:00Z", EXACT)),
            ),
            row(
                "Lord Howe daily 01:45 in the repeated half hour: first (+11)",
                daily("01:45", LORD_HOWE),
                "2025-04-05T00:00:00Z",
                Some(("2025-04-05T14:45:00Z", EXACT)),
            ),
            row(
                "Lord Howe daily 01:45 from the second pass: next day 01:45 +10:30",
                daily("01:45", LORD_HOWE),
                "2025-04-05T15:10:00Z",
                Some(("2025-04-06T15:15:00Z", EXACT)),
            ),
            row(
                "Lord Howe hourly over fall-back: 01:00 +11 -> 02:00 +10:30 (90 min)",
                cron("0 * * * *", LORD_HOWE),
                "2025-04-05T14:00:00Z",
                Some(("2025-04-05T15:30:00Z", EXACT)),
            ),
            row(
                "Lord Howe hourly over spring-forward: 01:00 +10:30 -> 03:00 +11",
                cron("0 * * * *", LORD_HOWE),
                "2025-10-04T15:00:00Z",
                Some(("2025-10-04T16:00:00Z", EXACT)),
            ),
            row(
                "Lord Howe */15 over spring-forward: 01:45 +10:30 -> 02:30 +11",
                cron("*/15 * * * *", LORD_HOWE),
                "2025-10-04T15:15:00Z",
                Some(("2025-10-04T15:30:00Z", EXACT)),
            ),
            // --- Chatham (+12:45 / +13:45) -------------------------------------
            row(
                "Chatham daily 03:00 in the 02:45-03:45 gap -> 03:45 +13:45, shifted",
                daily("03:00", "Pacific/Chatham"),
                "2025-09-27T00:00:00Z",
                Some(("2025-09-27T14:00:00Z", SHIFTED)),
            ),
            // --- No DST: Kolkata, Tokyo --------------------------------------
            row(
                "Kolkata daily 02:30 IST (+05:30) on a US transition date",
                daily("02:30", "Asia/Kolkata"),
                "2025-03-08T00:00:00Z",
                Some(("2025-03-08T21:00:00Z", EXACT)),
            ),
            row(
                "Kolkata cron L: 28 Feb 2025 00:00 IST",
                cron("0 0 L * *", "Asia/Kolkata"),
                "2025-02-01T00:00:00Z",
                Some(("2025-02-27T18:30:00Z", EXACT)),
            ),
            row(
                "Tokyo monthly 31 in April -> 30 April 09:00 JST",
                monthly(31, "09:00", "Asia/Tokyo"),
                "2025-04-01T00:00:00Z",
                Some(("2025-04-30T00:00:00Z", EXACT)),
            ),
            // --- L and short months ------------------------------------------
            row(
                "cron L in April -> 30 April",
                cron("0 0 L * *", "UTC"),
                "2025-04-15T00:00:00Z",
                Some(("2025-04-30T00:00:00Z", EXACT)),
            ),
            row(
                "cron L in February only -> next leap day 2028",
                cron("0 0 L 2 *", "UTC"),
                "2027-03-01T00:00:00Z",
                Some(("2028-02-29T00:00:00Z", EXACT)),
            ),
            row(
                "cron 1,L in February 2025 -> 28 Feb",
                cron("0 0 1,L * *", "UTC"),
                "2025-02-01T00:00:00Z",
                Some(("2025-02-28T00:00:00Z", EXACT)),
            ),
            row(
                "cron L in New York from 28 Feb 00:00 EST -> 31 Mar 00:00 EDT",
                cron("0 0 L * *", NY),
                "2025-02-28T05:00:00Z",
                Some(("2025-03-31T04:00:00Z", EXACT)),
            ),
            row(
                "monthly -1 in leap February -> 29 Feb 2024",
                monthly(-1, "12:00", "UTC"),
                "2024-02-01T00:00:00Z",
                Some(("2024-02-29T12:00:00Z", EXACT)),
            ),
            row(
                "monthly -1 in common February -> 28 Feb 2025",
                monthly(-1, "12:00", "UTC"),
                "2025-02-01T00:00:00Z",
                Some(("2025-02-28T12:00:00Z", EXACT)),
            ),
            row(
                "monthly 31 in April -> 30 April",
                monthly(31, "12:00", "UTC"),
                "2025-04-01T00:00:00Z",
                Some(("2025-04-30T12:00:00Z", EXACT)),
            ),
            row(
                "monthly 31 after its April fire -> 31 May (not 1 May)",
                monthly(31, "12:00", "UTC"),
                "2025-04-30T12:00:00Z",
                Some(("2025-05-31T12:00:00Z", EXACT)),
            ),
            row(
                "monthly 30 in February 2025 -> 28 Feb",
                monthly(30, "08:00", "UTC"),
                "2025-02-01T00:00:00Z",
                Some(("2025-02-28T08:00:00Z", EXACT)),
            ),
            row(
                "monthly 30 after the February fire -> 30 March (once per month)",
                monthly(30, "08:00", "UTC"),
                "2025-02-28T08:00:00Z",
                Some(("2025-03-30T08:00:00Z", EXACT)),
            ),
            // --- Yearly 29 February ------------------------------------------
            row(
                "yearly 29 Feb in common year 2025 -> 28 Feb",
                yearly(2, 29, "12:00", "UTC"),
                "2025-01-01T00:00:00Z",
                Some(("2025-02-28T12:00:00Z", EXACT)),
            ),
            row(
                "yearly 29 Feb from March 2027 -> 29 Feb 2028",
                yearly(2, 29, "12:00", "UTC"),
                "2027-03-01T00:00:00Z",
                Some(("2028-02-29T12:00:00Z", EXACT)),
            ),
            row(
                "yearly 29 Feb in leap 2028 fires on the 29th, not the 28th",
                yearly(2, 29, "12:00", "UTC"),
                "2028-02-28T12:00:00Z",
                Some(("2028-02-29T12:00:00Z", EXACT)),
            ),
            row(
                "yearly 29 Feb 00:00 New York in 2029 -> 28 Feb 00:00 EST",
                yearly(2, 29, "00:00", NY),
                "2028-03-01T00:00:00Z",
                Some(("2029-02-28T05:00:00Z", EXACT)),
            ),
            // --- Weekly across a year boundary -------------------------------
            row(
                "NY weekly MON 09:00 from Fri 2026-12-25 -> Mon 2026-12-28 09:00 EST",
                weekly(&[1], "09:00", NY),
                "2026-12-25T17:00:00Z",
                Some(("2026-12-28T14:00:00Z", EXACT)),
            ),
            row(
                "NY weekly MON 09:00 from Thu 2027-12-30 -> Mon 2028-01-03 09:00 EST",
                weekly(&[1], "09:00", NY),
                "2027-12-30T12:00:00Z",
                Some(("2028-01-03T14:00:00Z", EXACT)),
            ),
            row(
                "Sydney weekly MON 09:00 from Fri 2026-12-25 -> Mon 28th 09:00 AEDT (27th UTC)",
                weekly(&[1], "09:00", SYDNEY),
                "2026-12-25T00:00:00Z",
                Some(("2026-12-27T22:00:00Z", EXACT)),
            ),
            row(
                "Sydney weekly MON 09:00 from Thu 2027-12-30 -> Mon 2028-01-03 09:00 AEDT",
                weekly(&[1], "09:00", SYDNEY),
                "2027-12-30T00:00:00Z",
                Some(("2028-01-02T22:00:00Z", EXACT)),
            ),
            row(
                "weekly [SAT, WED] 18:00 UTC from Thu 2026-12-31 -> Sat 2027-01-02",
                weekly(&[6, 3], "18:00", "UTC"),
                "2026-12-31T00:00:00Z",
                Some(("2027-01-02T18:00:00Z", EXACT)),
            ),
            // --- 6-field cron --------------------------------------------------
            row(
                "every 10 seconds",
                cron("*/10 * * * * *", "UTC"),
                "2025-01-01T00:00:05Z",
                Some(("2025-01-01T00:00:10Z", EXACT)),
            ),
            row(
                "second 30 of every minute, from a sub-second instant",
                cron("30 * * * * *", "UTC"),
                "2025-01-01T00:00:30.5Z",
                Some(("2025-01-01T00:01:30Z", EXACT)),
            ),
            // --- Interval ------------------------------------------------------
            row(
                "interval hourly anchored in 2020 at :00:17",
                interval(3_600, Some("2020-01-01T00:00:17Z")),
                "2025-06-15T12:00:00Z",
                Some(("2025-06-15T12:00:17Z", EXACT)),
            ),
            row(
                "interval daily: start_time off the grid does not move the grid",
                window(
                    interval(86_400, Some("2020-01-01T00:00:00Z")),
                    Some("2025-06-15T06:00:00Z"),
                    None,
                ),
                "2025-01-01T00:00:00Z",
                Some(("2025-06-16T00:00:00Z", EXACT)),
            ),
            row(
                "interval hourly: start_time on the grid is the first fire",
                window(
                    interval(3_600, Some("2020-01-01T00:00:00Z")),
                    Some("2025-06-15T06:00:00Z"),
                    None,
                ),
                "2025-01-01T00:00:00Z",
                Some(("2025-06-15T06:00:00Z", EXACT)),
            ),
            // --- start_time / end_time clipping -------------------------------
            row(
                "daily 09:00 with start_time at 09:00: that fire counts",
                window(daily("09:00", "UTC"), Some("2025-05-10T09:00:00Z"), None),
                "2025-01-01T00:00:00Z",
                Some(("2025-05-10T09:00:00Z", EXACT)),
            ),
            row(
                "daily 09:00 with start_time one second later: next day",
                window(daily("09:00", "UTC"), Some("2025-05-10T09:00:01Z"), None),
                "2025-01-01T00:00:00Z",
                Some(("2025-05-11T09:00:00Z", EXACT)),
            ),
            row(
                "daily 09:00 with end_time at 09:00: inclusive",
                window(daily("09:00", "UTC"), None, Some("2025-05-10T09:00:00Z")),
                "2025-05-09T10:00:00Z",
                Some(("2025-05-10T09:00:00Z", EXACT)),
            ),
            row(
                "daily 09:00 with end_time one second earlier: none",
                window(daily("09:00", "UTC"), None, Some("2025-05-10T08:59:59Z")),
                "2025-05-09T10:00:00Z",
                None,
            ),
            row(
                "once before start_time: none",
                window(
                    once("2025-06-01T12:00:00Z"),
                    Some("2025-07-01T00:00:00Z"),
                    None,
                ),
                "2025-01-01T00:00:00Z",
                None,
            ),
            row(
                "hourly within a window, last fire at end_time",
                window(
                    cron("0 * * * *", "UTC"),
                    Some("2025-05-10T09:30:00Z"),
                    Some("2025-05-10T12:00:00Z"),
                ),
                "2025-05-10T11:00:00Z",
                Some(("2025-05-10T12:00:00Z", EXACT)),
            ),
            row(
                "hourly after the window: none",
                window(
                    cron("0 * * * *", "UTC"),
                    Some("2025-05-10T09:30:00Z"),
                    Some("2025-05-10T12:00:00Z"),
                ),
                "2025-05-10T12:00:00Z",
                None,
            ),
            row(
                "hourly before the window: first hour >= start_time",
                window(
                    cron("0 * * * *", "UTC"),
                    Some("2025-05-10T09:30:00Z"),
                    Some("2025-05-10T12:00:00Z"),
                ),
                "2025-01-01T00:00:00Z",
                Some(("2025-05-10T10:00:00Z", EXACT)),
            ),
        ];
        assert!(table.len() >= 40, "only {} rows", table.len());
        for r in &table {
            assert_eq!(r.schedule.validate("s"), Ok(()), "{}", r.name);
            let got = r.schedule.next_fire_after(utc(r.after));
            let want = r.want.map(|(t, dst_shifted)| Fire {
                time: utc(t),
                dst_shifted,
            });
            assert_eq!(
                got,
                want,
                "row {:?}: got {:?}",
                r.name,
                got.map(|f| r.schedule.describe_local(f.time))
            );
            assert_eq!(
                r.schedule.next_after(utc(r.after)),
                want.map(|f| f.time),
                "{}",
                r.name
            );
        }
    }

    /// The seven DST zones of the property test.
    const DST_ZONES: [&str; 7] = [
        "America/New_York",
        "Europe/Berlin",
        "Australia/Lord_Howe",
        "Australia/Sydney",
        "America/Santiago",
        "Europe/London",
        "Pacific/Chatham",
    ];

    fn offset_secs(tz: Tz, secs: i64) -> i32 {
        let t = DateTime::from_timestamp(secs, 0).unwrap_or_else(|| panic!("bad instant {secs}"));
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    }

    /// Every UTC offset change of `tz` in `[from, to)` (Unix seconds), as
    /// (first second with the new offset, old offset, new offset), from
    /// chrono-tz alone: sample every 6 hours, then bisect to the second.
    fn transitions(tz: Tz, from: i64, to: i64) -> Vec<(i64, i32, i32)> {
        const STEP: i64 = 6 * 3_600;
        let mut out = Vec::new();
        let mut t = from;
        let mut off = offset_secs(tz, t);
        while t < to {
            let next = t + STEP;
            let next_off = offset_secs(tz, next);
            if next_off != off {
                let (mut lo, mut hi) = (t, next);
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if offset_secs(tz, mid) == off {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                out.push((hi, off, next_off));
            }
            t = next;
            off = next_off;
        }
        out
    }

    /// Property test over 2025-01-01 .. 2035-01-01 in seven DST zones.
    ///
    /// Daily 01:30 and daily 02:30 (every local date, full decade): the fires
    /// are *exactly* one per local calendar date, strictly increasing, and
    /// each equals an oracle built from chrono-tz and an independently
    /// computed transition list: the wall time's only instant; for a repeated
    /// wall time its earlier instant (not flagged); for a missing wall time
    /// the transition instant that ends the gap (flagged `dst_shifted`).
    ///
    /// `0 * * * *` and `*/15 * * * *` (too slow in debug builds for the whole
    /// decade through croner, so: a 52-hour window around every transition of
    /// every zone, plus a 24-hour sample window on the 15th of January, April,
    /// July and October of every year): within each window the fires are
    /// exactly the real instants whose local wall clock reads `HH:00:00`
    /// (resp. `HH:MM:00` with `MM % 15 == 0`); hence strictly increasing, no
    /// duplicates, and no matching instant is missed. Spacing: `*/15` fires
    /// are always exactly 900 s apart (all seven zones' offsets are multiples
    /// of 15 minutes, checked); hourly fires are exactly 3600 s apart, except
    /// across a Lord Howe transition (30-minute shift), where exactly one
    /// step is 5400 s (the gap skips `02:00`; the repeated half hour holds no
    /// `HH:00`).
    #[test]
    fn property_dst_zones_decade() {
        let from = utc("2025-01-01T00:00:00Z").timestamp();
        let to = utc("2035-01-01T00:00:00Z").timestamp();
        let first_date = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap_or_default();
        let end_date = NaiveDate::from_ymd_opt(2035, 1, 1).unwrap_or_default();
        for zone in DST_ZONES {
            let tz: Tz = zone.parse().unwrap_or_else(|e| panic!("{zone}: {e}"));
            let trans = transitions(tz, from - 2 * 86_400, to + 2 * 86_400);
            assert!(
                trans.len() >= 18,
                "{zone} has only {} transitions in the decade",
                trans.len()
            );
            for &(_, o1, o2) in &trans {
                assert!(o1 % 900 == 0 && o2 % 900 == 0, "{zone}: {o1} {o2}");
            }

            // --- daily 01:30 and 02:30: the whole decade ---------------------
            for time in ["01:30", "02:30"] {
                let t = tod(time).to_naive_time().unwrap_or_default();
                let s = daily(time, zone);
                let mut expected = Vec::new();
                let mut date = first_date;
                while date < end_date {
                    let wall = date.and_time(t);
                    let fire = match tz.from_local_datetime(&wall) {
                        LocalResult::Single(x) => (x.with_timezone(&Utc), false),
                        LocalResult::Ambiguous(earlier, later) => {
                            assert!(earlier < later);
                            (earlier.with_timezone(&Utc), false)
                        }
                        LocalResult::None => {
                            // The gap containing `wall`: walls T+o1 .. T+o2.
                            let w = wall.and_utc().timestamp();
                            let &(at, _, _) = trans
                                .iter()
                                .find(|&&(at, o1, o2)| {
                                    o2 > o1 && at + i64::from(o1) <= w && w < at + i64::from(o2)
                                })
                                .unwrap_or_else(|| panic!("{zone} {wall}: no gap found"));
                            (DateTime::from_timestamp(at, 0).unwrap_or_default(), true)
                        }
                    };
                    expected.push(fire);
                    date = date.succ_opt().unwrap_or(end_date);
                }
                let local_midnight = |d: NaiveDate| {
                    tz.from_local_datetime(&d.and_time(NaiveTime::MIN))
                        .earliest()
                        .unwrap_or_else(|| panic!("{zone} {d}: no midnight"))
                        .with_timezone(&Utc)
                };
                let stop = local_midnight(end_date);
                let mut got = Vec::new();
                let mut at = local_midnight(first_date) - TimeDelta::nanoseconds(1);
                while let Some(f) = s.next_fire_after(at) {
                    assert!(f.time > at, "{zone} {time}: not increasing at {at}");
                    if f.time >= stop {
                        break;
                    }
                    got.push((f.time, f.dst_shifted));
                    at = f.time;
                }
                assert_eq!(got.len(), expected.len(), "{zone} daily {time}: fire count");
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert_eq!(
                        g,
                        e,
                        "{zone} daily {time}, local date #{i}: got {}",
                        s.describe_local(g.0)
                    );
                }
                let shifted = got.iter().filter(|(_, f)| *f).count();
                // Gaps 02:00-03:00 (New York, Berlin, Sydney), 01:00-02:00
                // (London); 02:00-02:30 (Lord Howe), 02:45-03:45 (Chatham)
                // and 00:00-01:00 (Santiago) contain neither time.
                let want_shifted = match (zone, time) {
                    ("America/New_York" | "Europe/Berlin" | "Australia/Sydney", "02:30")
                    | ("Europe/London", "01:30") => 10,
                    _ => 0,
                };
                assert_eq!(shifted, want_shifted, "{zone} daily {time}: shifted days");
            }

            // --- hourly and every 15 minutes: windows ------------------------
            let mut windows: Vec<(i64, i64)> = trans
                .iter()
                .filter(|&&(at, _, _)| (from..to).contains(&at))
                .map(|&(at, _, _)| (at - 26 * 3_600, at + 26 * 3_600))
                .collect();
            for year in 2025..2035 {
                for month in [1, 4, 7, 10] {
                    let day = NaiveDate::from_ymd_opt(year, month, 15).unwrap_or_default();
                    let start = day.and_time(NaiveTime::MIN).and_utc().timestamp();
                    windows.push((start, start + 86_400));
                }
            }
            for (expr, step_minutes) in [("0 * * * *", 60), ("*/15 * * * *", 15)] {
                let s = cron(expr, zone);
                let mut long_steps = 0;
                for &(ws, we) in &windows {
                    let mut expected = Vec::new();
                    let mut t = ws - ws.rem_euclid(900) + 900;
                    while t <= we {
                        let local = t + i64::from(offset_secs(tz, t));
                        if local.rem_euclid(step_minutes * 60) == 0 {
                            expected.push(t);
                        }
                        t += 900;
                    }
                    let mut got = Vec::new();
                    let mut at = DateTime::from_timestamp(ws, 0).unwrap_or_default();
                    while let Some(f) = s.next_fire_after(at) {
                        assert!(f.time > at && !f.dst_shifted, "{zone} {expr} at {at}");
                        if f.time.timestamp() > we {
                            break;
                        }
                        got.push(f.time.timestamp());
                        at = f.time;
                    }
                    assert_eq!(got, expected, "{zone} {expr} window from {ws}");
                    for pair in got.windows(2) {
                        let diff = pair[1] - pair[0];
                        if diff == step_minutes * 60 {
                            continue;
                        }
                        let across = trans
                            .iter()
                            .any(|&(at, _, _)| pair[0] < at && at <= pair[1]);
                        assert!(
                            zone == LORD_HOWE && step_minutes == 60 && diff == 5_400 && across,
                            "{zone} {expr}: {diff} s between {} and {}",
                            pair[0],
                            pair[1]
                        );
                        long_steps += 1;
                    }
                }
                if zone == LORD_HOWE && step_minutes == 60 {
                    // Each transition window holds exactly one 90-minute step.
                    let in_range = trans
                        .iter()
                        .filter(|&&(at, _, _)| (from..to).contains(&at))
                        .count();
                    assert_eq!(long_steps, in_range, "{zone} {expr}");
                } else {
                    assert_eq!(long_steps, 0, "{zone} {expr}");
                }
            }
        }
    }

    #[test]
    fn six_field_cron_numbers_fields_as_written() {
        let table: Vec<(&str, String)> = vec![
            ("60 * * * * *", "field 1 (second): 60 is out of range 0-59".into()),
            ("*/60 * * * * *", "field 1 (second): step 60 is out of range 1-59".into()),
            ("x * * * * *", "field 1 (second): invalid value \"x\"".into()),
            ("? * * * * *", "field 1 (second): \"?\" is only allowed in day-of-month and day-of-week".into()),
            ("0 60 * * * *", "field 2 (minute): 60 is out of range 0-59".into()),
            ("0 0 25 * * *", "field 3 (hour): 25 is out of range 0-23".into()),
            ("0 0 0 32 * *", "field 4 (day-of-month): 32 is out of range 1-31".into()),
            ("0 0 0 * 13 *", "field 5 (month): 13 is out of range 1-12".into()),
            ("0 0 0 * * 8", "field 6 (day-of-week): 8 is out of range 0-7".into()),
            ("0 0 0 * * 5#2", "field 6 (day-of-week): invalid value \"5#2\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 0 30 2 *", "never fires: no month in field 5 (month) has a day listed in field 4 (day-of-month)".into()),
            // 5-field messages are unchanged.
            ("60 * * * *", "field 1 (minute): 60 is out of range 0-59".into()),
            ("0 0 30 2 *", "never fires: no month in field 4 (month) has a day listed in field 3 (day-of-month)".into()),
        ];
        for (expr, reason) in table {
            assert_eq!(
                cron(expr, "UTC").validate("p"),
                Err(ScheduleError {
                    field: "p.cron.expression".to_string(),
                    reason,
                }),
                "{expr:?}"
            );
        }
        for expr in [
            "*/10 * * * * *",
            "0 */5 * * * *",
            "0-59/15 30 2 * * MON-FRI",
            "59 59 23 31 12 *",
            "0 0 0 L * ?",
            "0 0 0 1,L,15 * *",
            "0 0 0 l 2 *",
            "0 0 L * 5",
            "0 0 31,L 4 *",
        ] {
            assert_eq!(cron(expr, "UTC").validate("p"), Ok(()), "{expr:?}");
            assert!(
                cron(expr, "UTC")
                    .next_after(utc("2025-01-01T00:00:00Z"))
                    .is_some(),
                "{expr:?}"
            );
        }
        // L in OR mode with a day-of-week: the last day or any Friday
        // (2025-04-25 is a Friday, 30 April a Wednesday).
        let s = cron("0 0 L * 5", "UTC");
        assert_eq!(
            fires(&s, utc("2025-04-24T00:00:00Z"), 3),
            vec![
                utc("2025-04-25T00:00:00Z"),
                utc("2025-04-30T00:00:00Z"),
                utc("2025-05-02T00:00:00Z"),
            ]
        );
        // L with a dow starting with `*`: AND. `*/5` in day-of-week is
        // Sunday and Friday, so: last days that are a Sunday or a Friday.
        let s = cron("0 0 L * */5", "UTC");
        assert_eq!(
            fires(&s, utc("2025-01-01T00:00:00Z"), 4),
            vec![
                utc("2025-01-31T00:00:00Z"), // Fri
                utc("2025-02-28T00:00:00Z"), // Fri
                utc("2025-08-31T00:00:00Z"), // Sun
                utc("2025-10-31T00:00:00Z"), // Fri
            ]
        );
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

    #[test]
    fn time_of_day_parse_display_serde() {
        assert_eq!(
            TimeOfDay::parse("02:30"),
            Ok(TimeOfDay {
                hour: 2,
                minute: 30,
                second: 0
            })
        );
        assert_eq!(
            TimeOfDay::parse("02:30:15"),
            Ok(TimeOfDay {
                hour: 2,
                minute: 30,
                second: 15
            })
        );
        assert_eq!(
            TimeOfDay::parse("23:59:59").map(|t| t.to_string()),
            Ok("23:59:59".to_string())
        );
        assert_eq!(
            "00:00".parse::<TimeOfDay>().map(|t| t.to_string()),
            Ok("00:00:00".to_string())
        );
        let shape = |text: &str| {
            format!("expected \"HH:MM\" or \"HH:MM:SS\" (24-hour clock), got \"{text}\"")
        };
        for bad in [
            "2:30",
            "02:3",
            "0230",
            "",
            ":",
            "02:30:",
            "02:30:15:00",
            "+2:30",
            "02:3x",
            " 02:30",
            "٠٢:30",
        ] {
            assert_eq!(TimeOfDay::parse(bad), Err(shape(bad)), "{bad:?}");
        }
        assert_eq!(
            TimeOfDay::parse("24:00"),
            Err("hour 24 is out of range 0-23".to_string())
        );
        assert_eq!(
            TimeOfDay::parse("12:60"),
            Err("minute 60 is out of range 0-59".to_string())
        );
        assert_eq!(
            TimeOfDay::parse("12:00:60"),
            Err("second 60 is out of range 0-59".to_string())
        );
        assert_eq!(
            TimeOfDay::new(99, 0, 0),
            Err("hour 99 is out of range 0-23".to_string())
        );
        assert_eq!(
            serde_json::to_string(&tod("07:05")).ok().as_deref(),
            Some("\"07:05:00\"")
        );
        assert_eq!(
            serde_json::from_str::<TimeOfDay>("\"07:05\"").ok(),
            Some(tod("07:05:00"))
        );
        assert!(serde_json::from_str::<TimeOfDay>("\"25:00\"").is_err());
        assert!(serde_json::from_str::<TimeOfDay>("725").is_err());
        // An out-of-range value built in code serializes without panicking
        // and never fires.
        let wild = TimeOfDay {
            hour: 255,
            minute: 255,
            second: 255,
        };
        assert_eq!(wild.to_string(), "255:255:255");
        let s = Schedule::new(ScheduleKind::Daily { time_of_day: wild }, "UTC");
        assert_eq!(s.next_after(utc("2025-01-01T00:00:00Z")), None);
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

    #[test]
    fn new_kinds_at_extreme_instants_never_panic() {
        let mut schedules = vec![
            daily("02:30", "America/New_York"),
            daily("00:00", "Pacific/Kiritimati"),
            weekly(&[0, 6], "23:59:59", "Etc/GMT+12"),
            monthly(-1, "12:00", "Australia/Lord_Howe"),
            monthly(31, "00:30", "America/Santiago"),
            yearly(2, 29, "02:30", "Europe/Berlin"),
            yearly(12, 31, "23:59:59", "Etc/GMT-14"),
            cron("*/10 * * * * *", "America/New_York"),
            cron("0 0 L * *", "Asia/Kolkata"),
            cron("59 59 23 L 12 *", "UTC"),
            once("9999-12-31T23:59:59Z"),
        ];
        let mut windowed = window(
            daily("02:30", "Europe/Berlin"),
            Some("0001-01-01T00:00:00Z"),
            Some("9999-12-31T23:59:59Z"),
        );
        windowed.jitter_secs = 86_400;
        schedules.push(windowed);
        let mut extreme_window = daily("02:30", "UTC");
        extreme_window.start_time = Some(DateTime::<Utc>::MAX_UTC);
        extreme_window.end_time = Some(DateTime::<Utc>::MIN_UTC);
        schedules.push(extreme_window);
        for s in &schedules {
            for t in [
                DateTime::<Utc>::MIN_UTC,
                utc("0001-01-01T00:00:00Z"),
                utc("4999-12-31T23:00:00Z"),
                utc("9999-12-30T00:00:00Z"),
                utc("9999-12-31T23:59:59Z"),
                DateTime::<Utc>::MAX_UTC,
            ] {
                let _ = s.next_fire_after(t);
                let _ = s.describe_local(t);
                let _ = s.jitter_for(&[0xab; 16], t);
            }
        }
        // Calendar kinds stop after year 9999; cron after 4999.
        let s = daily("12:00", "UTC");
        assert_eq!(
            s.next_after(utc("9999-12-30T13:00:00Z")),
            Some(utc("9999-12-31T12:00:00Z"))
        );
        assert_eq!(s.next_after(utc("9999-12-31T12:00:00Z")), None);
        assert_eq!(s.next_after(DateTime::<Utc>::MAX_UTC), None);
        // Far past: the search starts at 0001-01-03.
        assert_eq!(
            s.next_after(DateTime::<Utc>::MIN_UTC),
            Some(utc("0001-01-03T12:00:00Z"))
        );
        let s = cron("*/10 * * * * *", "UTC");
        assert_eq!(
            s.next_after(utc("4999-12-31T23:59:55Z")),
            Some(utc("5000-01-01T00:00:00Z"))
        );
        assert_eq!(s.next_after(utc("5000-01-01T00:00:00Z")), None);
    }

    /// A fixed-time job whose matching wall times fill a whole repeated hour:
    /// from the second pass, every first-pass time is stepped over in one
    /// jump (no per-second loop), and the answer is the next day.
    #[test]
    fn fold_is_stepped_over_in_one_jump() {
        let s = cron("0-59 0-59 1 * * *", NY);
        // 01:00:00 EST (second pass) on 2025-11-02.
        assert_eq!(
            s.next_after(utc("2025-11-02T06:00:00Z")),
            Some(utc("2025-11-03T06:00:00Z"))
        );
        // Still inside the first pass: the next second.
        assert_eq!(
            s.next_after(utc("2025-11-02T05:59:58Z")),
            Some(utc("2025-11-02T05:59:59Z"))
        );
        let s = weekly(&[0], "01:59:59", NY);
        assert_eq!(
            s.next_after(utc("2025-11-02T06:00:00Z")),
            Some(utc("2025-11-09T06:59:59Z"))
        );
    }
}

#[cfg(test)]
mod cost_tests {
    use super::*;

    /// The most expensive expressions the limits allow still compute a fire
    /// time in well under a millisecond (debug build: allow 5 ms on a loaded
    /// machine; the point is "not 10 ms per fire").
    #[test]
    fn a_fire_time_of_any_accepted_cron_is_cheap() {
        let minutes: Vec<String> = (0..60).map(|m| m.to_string()).collect();
        let list = minutes[..MAX_CRON_ITEMS.min(60)].join(",");
        let exprs = [
            format!("{list} 0 29 2 *"),
            format!("0 {list} 29 2 1"),
            "0 0 31 2,4,6,9,11,12 *".to_string(),
            format!(
                "59 23 {} 2 *",
                (1..=29)
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ];
        for e in exprs {
            let s = Schedule::new(
                ScheduleKind::Cron {
                    expression: e.chars().take(MAX_CRON_LEN).collect(),
                },
                "America/New_York",
            );
            if s.validate("s").is_err() {
                continue;
            }
            let start = std::time::Instant::now();
            let mut t = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
            for _ in 0..100 {
                match s.next_after(t) {
                    Some(n) => t = n,
                    None => break,
                }
            }
            let per = start.elapsed() / 100;
            eprintln!("{e}: {per:?} per fire");
            assert!(per < std::time::Duration::from_millis(5), "{e}: {per:?}");
        }
    }
}
