//! Schedules: *when* a binding fires.
//!
//! A [`Schedule`] is one of four kinds ([`ScheduleKind`]): a 5-field cron
//! expression evaluated on the wall clock of an IANA time zone, a fixed
//! interval on the absolute time line, a single instant, or manual (never
//! fires by itself). It is stored as JSON (serde) in PostgreSQL; the JSON
//! shape is pinned by the `serde_shape_is_stable` test.
//!
//! The one question the scheduler asks is [`Schedule::next_after`]: the first
//! fire time strictly after a given instant. It is pure and deterministic (no
//! clock is read), never panics, and answers `None` when the schedule never
//! fires again.
//!
//! # Cron syntax
//!
//! Exactly five whitespace-separated fields, with the field semantics of
//! Vixie cron (crontab(5) of Vixie/ISC cron 4.1, which OCPS 1.0, the Open Cron
//! Pattern Specification, codifies):
//!
//! | # | field        | values                                 |
//! |---|--------------|----------------------------------------|
//! | 1 | minute       | 0-59                                   |
//! | 2 | hour         | 0-23                                   |
//! | 3 | day-of-month | 1-31                                   |
//! | 4 | month        | 1-12 or `JAN`-`DEC`                    |
//! | 5 | day-of-week  | 0-7 or `SUN`-`SAT` (0 and 7 are Sunday)|
//!
//! Each field is a comma-separated list of items; an item is `*`, a value
//! `a`, a range `a-b` (`a <= b`), or a stepped `*/n` or `a-b/n` (`n` from 1
//! to the field's maximum). Names are three letters, case-insensitive; `SUN`
//! at the end of a range means 7, so `FRI-SUN` is Friday to Sunday. `?` is
//! accepted as an alias of `*` in the day-of-month and day-of-week fields only
//! (OCPS 1.4 §4.2). Everything else is rejected with a reason naming the
//! field, e.g. `field 2 (hour): 25 is out of range 0-23`. Deliberately
//! rejected:
//!
//! * `a/n` without a range (croner 4 and OCPS reject it too; write `a-59/n`);
//! * a step larger than the field's maximum (`*/90` in the minute field
//!   selects only minute 0, which is never what "every 90 minutes" meant);
//! * croner's extensions `L`, `W`, `#` and the `+` modifier;
//! * six or seven fields (seconds and years come in a later version);
//! * day-of-month/month combinations that can never occur when the
//!   day-of-month has to match (`0 0 30 2 *`, `0 0 31 4,6,9,11 *`): such a
//!   binding would never fire.
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
//! Cron is evaluated on the local wall clock of [`Schedule::timezone`]. Jobs
//! are classified as in Vixie cron (`entry.c` sets `MIN_STAR` / `HR_STAR` when
//! the minute / hour field starts with `*`):
//!
//! * **Wildcard jobs** – the minute or the hour field starts with `*`
//!   (`0 * * * *`, `*/15 * * * *`, `*/5 9 * * *`, `0 */2 * * *`). They fire at
//!   every real instant whose wall clock matches: wall times inside a
//!   spring-forward gap are skipped, and wall times repeated by a fall-back
//!   fire on both passes. So `0 * * * *` fires every real hour through both
//!   transitions (on 2025-11-02 in America/New_York at 01:00 EDT **and**
//!   01:00 EST, 25 fires that day; 23 on 2025-03-09) and `*/15 * * * *` every
//!   15 real minutes (100 fires on the 25-hour day).
//! * **Fixed-time jobs** – every other job (`30 2 * * *`, `30 1,13 * * *`,
//!   `0,30 2 * * 1-5`). A fixed-time job fires when the wall clock *first
//!   reaches or passes* a matching wall time:
//!   * a wall time that does not exist (spring-forward gap) fires once, at the
//!     first instant after the gap: `30 2 * * *` in America/New_York fires on
//!     2025-03-09 at 03:00 EDT = 07:00 UTC. Several matching wall times in
//!     one gap (`0,30 2 * * *`) collapse into that single fire.
//!   * a wall time that occurs twice (fall-back) fires once, at its first
//!     occurrence: `30 1 * * *` in America/New_York fires on 2025-11-02 only
//!     at 01:30 EDT = 05:30 UTC.
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
//! each occurrence" in a repeated hour. Two notes:
//!
//! * Vixie cron starts one catch-up run per skipped matching minute; here a
//!   fire time is an instant, so all matches inside one gap are one fire.
//! * The OCPS 1.4 draft (`increments/OCPS-increment-1.4.md`, §4.3.1, dated
//!   2025-07-03) recommends *skipping* a scheduled time that falls into a
//!   gap; croner and this module follow Vixie cron instead (the product
//!   rule).
//!
//! ## What croner 4 does natively and what this module adds
//!
//! * croner parses the (normalised) expression and walks the calendar; it is
//!   always the matcher.
//! * croner classifies a job as fixed-time only when the minute **and** hour
//!   fields are each a single plain value. Jobs such as `30 1,13 * * *` or
//!   `0,30 2 * * *` are "interval" jobs for croner, so it would fire them twice
//!   on fall-back and skip them on spring-forward, contradicting the rules
//!   above. Therefore fixed-time jobs (Vixie classification) are evaluated
//!   here: croner enumerates matching wall-clock times on a zone-less
//!   `NaiveDateTime`, and each wall time `w` is mapped to the first instant at
//!   which the zone's wall clock reaches `w` (the earlier instant of an
//!   ambiguous time, the end of the gap for a missing one). That mapping is
//!   monotonic, so "first fire after `after`" is "first matching wall time
//!   whose instant is after `after`". For single-value jobs this agrees with
//!   croner's own answer (checked by a test).
//! * Wildcard jobs use croner's zoned search (`find_next_occurrence` on a
//!   `chrono_tz` date-time) unchanged: its interval/wildcard rules are the
//!   ones above.
//! * The Vixie day-of-month/day-of-week rule (see above), macro expansion,
//!   the per-field error messages and the never-fires check are done here.
//! * `after` is truncated to whole seconds before asking croner (croner
//!   ignores sub-second parts); the answer is always strictly after `after`.
//!
//! Cron search covers the years croner supports (1 to 4999); beyond that
//! [`Schedule::next_after`] answers `None`.
//!
//! # Other kinds
//!
//! * [`ScheduleKind::Interval`] fires at `anchor + k * every_secs` for every
//!   integer `k` (negative too), on the absolute time line; the time zone is
//!   ignored. Computed with 128-bit integer arithmetic, no loops.
//! * [`ScheduleKind::Once`] fires at `at` only.
//! * [`ScheduleKind::Manual`] never fires by itself.

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDateTime, Offset, SecondsFormat, TimeZone, Utc,
};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};

/// A schedule: when a binding fires.
///
/// Stored as JSON in PostgreSQL; the shape is
/// `{"kind": "cron", "expression": "30 2 * * *", "timezone": "UTC"}`
/// (see [`ScheduleKind`] for the other kinds). Build it from API input, call
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
    /// `"utc"`); the empty string is invalid at this layer. Only cron
    /// schedules use it for evaluation; it is validated for every kind.
    pub timezone: String,
}

/// The kind of a [`Schedule`] and its parameters.
///
/// Serialized internally tagged with `"kind"` in snake_case:
/// `{"kind":"cron","expression":"0 * * * *"}`,
/// `{"kind":"interval","every_secs":60,"anchor_time":"2025-01-01T00:00:00Z"}`
/// (`anchor_time` may be `null` or absent),
/// `{"kind":"once","at":"2025-01-01T00:00:00Z"}`, `{"kind":"manual"}`.
/// Instants are RFC 3339 strings in UTC (`Z`); any RFC 3339 offset is accepted
/// when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleKind {
    /// 5-field cron: minute hour day-of-month month day-of-week (Vixie cron
    /// semantics: when both dom and dow are restricted, either matches).
    ///
    /// Evaluated on the wall clock of [`Schedule::timezone`]; see the module
    /// docs for the accepted syntax and the DST rules.
    Cron {
        /// The expression as the user wrote it, e.g. `"*/15 9-17 * * MON-FRI"`.
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
    /// `.interval.every` or `.once.at`.
    pub field: String,
    /// Human-readable reason, suitable for an API error body.
    pub reason: String,
}

impl Schedule {
    /// Validates everything: the cron expression (exactly 5 fields, every
    /// field in range, at least one possible day), `every_secs >= 1`, `at`
    /// within years 1 to 9999, and the time zone (non-empty and known to
    /// `chrono-tz`, for every kind).
    ///
    /// `field_prefix` is the API path of the schedule, e.g.
    /// `"definition.schedule"` or `"binding.schedule"`.
    ///
    /// # Errors
    ///
    /// The first problem found, as a [`ScheduleError`] whose `field` is
    /// `field_prefix` + `".cron.expression"`, `".interval.every"`,
    /// `".once.at"` or `".timezone"` (the kind's parameters are checked
    /// before the time zone). Examples of reasons:
    /// `expected 5 fields (minute hour day-of-month month day-of-week), got 3`,
    /// `field 1 (minute): invalid value "x"`,
    /// `must be at least 1 second`, `unknown IANA time zone "Mars/Base"`.
    pub fn validate(&self, field_prefix: &str) -> Result<(), ScheduleError> {
        let fail = |suffix: &str, reason: String| ScheduleError {
            field: format!("{field_prefix}{suffix}"),
            reason,
        };
        match &self.kind {
            ScheduleKind::Cron { expression } => {
                let spec = CronSpec::parse(expression)
                    .map_err(|reason| fail(".cron.expression", reason))?;
                if let Some(reason) = spec.never_fires_reason() {
                    return Err(fail(".cron.expression", reason));
                }
                spec.to_croner()
                    .map_err(|e| fail(".cron.expression", e.to_string()))?;
            }
            ScheduleKind::Interval { every_secs, .. } => {
                if *every_secs < 1 {
                    return Err(fail(
                        ".interval.every",
                        "must be at least 1 second".to_string(),
                    ));
                }
            }
            ScheduleKind::Once { at } => {
                if !(1..=9999).contains(&at.year()) {
                    return Err(fail(
                        ".once.at",
                        "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z".to_string(),
                    ));
                }
            }
            ScheduleKind::Manual => {}
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
                timezone: self.timezone,
            },
            _ => self,
        }
    }

    /// The first fire time strictly after `after` (UTC instant, any
    /// sub-second precision), or `None` if the schedule never fires again.
    ///
    /// * cron: see the module docs (wall clock of the time zone, DST rules);
    ///   results are whole minutes of wall-clock time, or the end of a DST
    ///   gap. `None` beyond croner's year range (4999).
    /// * interval: the smallest `anchor_time + k * every_secs > after`
    ///   (integer `k`, possibly negative); `None` if the anchor is unresolved
    ///   or the result is outside chrono's range.
    /// * once: `Some(at)` if `at > after`, else `None`.
    /// * manual: always `None`.
    ///
    /// Pure and deterministic. It assumes [`Schedule::validate`] passed; an
    /// invalid schedule yields `None`, never a panic.
    #[must_use]
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            ScheduleKind::Cron { expression } => cron_next_after(expression, &self.timezone, after),
            ScheduleKind::Interval {
                every_secs,
                anchor_time,
            } => interval_next_after(*every_secs, (*anchor_time)?, after),
            ScheduleKind::Once { at } => (*at > after).then_some(*at),
            ScheduleKind::Manual => None,
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

const FIELD_LIST: &str = "minute hour day-of-month month day-of-week";
const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DOW_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
/// Longest each month can be (February in a leap year).
const MAX_MONTH_DAYS: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/// One of the five cron fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl Field {
    const ALL: [Field; 5] = [
        Field::Minute,
        Field::Hour,
        Field::DayOfMonth,
        Field::Month,
        Field::DayOfWeek,
    ];

    /// 1-based position in the expression.
    fn number(self) -> usize {
        match self {
            Field::Minute => 1,
            Field::Hour => 2,
            Field::DayOfMonth => 3,
            Field::Month => 4,
            Field::DayOfWeek => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
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
            Field::Minute => 59,
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

    /// `"field 2 (hour): {msg}"`.
    fn error(self, msg: impl std::fmt::Display) -> String {
        format!("field {} ({}): {msg}", self.number(), self.name())
    }
}

/// One parsed field.
#[derive(Debug, Clone)]
struct ParsedField {
    /// Bit `v` set = value `v` matches (day-of-week 7 folded into 0).
    mask: u64,
    /// The field starts with `*` (or `?`): Vixie's `*_STAR` flags.
    star: bool,
    /// Numeric form handed to croner (names replaced, `?` as `*`).
    normalized: String,
}

/// A pre-checked 5-field cron expression.
#[derive(Debug, Clone)]
struct CronSpec {
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
        let [minute, hour, dom, month, dow] = parts[..] else {
            let hint = match parts.len() {
                6 => " (a seconds field is not supported yet)",
                7 => " (seconds and year fields are not supported)",
                _ => "",
            };
            return Err(format!(
                "expected 5 fields ({FIELD_LIST}), got {}{hint}",
                parts.len()
            ));
        };
        let [f_min, f_hour, f_dom, f_month, f_dow] = Field::ALL;
        Ok(CronSpec {
            minute: parse_field(f_min, minute)?,
            hour: parse_field(f_hour, hour)?,
            dom: parse_field(f_dom, dom)?,
            month: parse_field(f_month, month)?,
            dow: parse_field(f_dow, dow)?,
        })
    }

    /// Vixie cron's wildcard job: the minute or hour field starts with `*`.
    fn is_wildcard_job(&self) -> bool {
        self.minute.star || self.hour.star
    }

    /// Vixie cron ANDs the day fields when either starts with `*`.
    fn dom_and_dow(&self) -> bool {
        self.dom.star || self.dow.star
    }

    /// Why the expression can never fire, if it can't: only possible when
    /// the day-of-month must match (AND mode) and none of its days exists in
    /// any of the months. In OR mode the day-of-week always matches some day,
    /// and every (month, day) pair recurs on every weekday within 28 years.
    fn never_fires_reason(&self) -> Option<String> {
        if self.dom.star || !self.dow.star {
            return None;
        }
        let possible = (1u32..=12).any(|month| {
            self.month.mask & (1 << month) != 0
                && MAX_MONTH_DAYS
                    .get(month as usize - 1)
                    .is_some_and(|&len| (1..=len).any(|day| self.dom.mask & (1 << day) != 0))
        });
        (!possible).then(|| {
            "never fires: no month in field 4 (month) has a day listed in field 3 (day-of-month)"
                .to_string()
        })
    }

    /// Parses the normalised expression with croner (5 fields, no seconds or
    /// years, AND/OR mode per Vixie).
    fn to_croner(&self) -> Result<Cron, croner::errors::CronError> {
        let normalized = format!(
            "{} {} {} {} {}",
            self.minute.normalized,
            self.hour.normalized,
            self.dom.normalized,
            self.month.normalized,
            self.dow.normalized
        );
        CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .dom_and_dow(self.dom_and_dow())
            .build()
            .parse(&normalized)
    }
}

/// Parses one field: a comma-separated list of `*`, `?`, `a`, `a-b`, `*/n`,
/// `a-b/n`.
fn parse_field(field: Field, text: &str) -> Result<ParsedField, String> {
    let mut mask = 0u64;
    let mut items = Vec::new();
    for item in text.split(',') {
        if item.is_empty() {
            return Err(field.error(format_args!("empty list element in \"{text}\"")));
        }
        let (range_text, step_text) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let step = step_text.map(|s| parse_step(field, item, s)).transpose()?;

        let (lo, hi, range_norm) = if range_text == "*" || (range_text == "?" && step.is_none()) {
            if range_text == "?" && !matches!(field, Field::DayOfMonth | Field::DayOfWeek) {
                return Err(field.error("\"?\" is only allowed in day-of-month and day-of-week"));
            }
            (field.min(), field.max(), "*".to_string())
        } else if let Some((a, b)) = range_text.split_once('-') {
            if a.is_empty() || b.is_empty() {
                return Err(field.error(format_args!("invalid range \"{range_text}\"")));
            }
            let lo = parse_value(field, a)?;
            let mut hi = parse_value(field, b)?;
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
                return Err(field.error(format_args!(
                    "range {range_text} is reversed (start must not be greater than end{hint})"
                )));
            }
            (lo, hi, format!("{lo}-{hi}"))
        } else if range_text.is_empty() && step.is_some() {
            return Err(field.error(format_args!(
                "\"{item}\" needs \"*\" or a range before \"/\""
            )));
        } else {
            let value = parse_value(field, range_text)?;
            if let Some(step) = step {
                return Err(field.error(format_args!(
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
        star: text.starts_with('*') || text.starts_with('?'),
        normalized: items.join(","),
    })
}

/// Parses the step after `/`: digits, from 1 to the field's maximum.
fn parse_step(field: Field, item: &str, text: &str) -> Result<u32, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(field.error(format_args!("invalid step \"{text}\" in \"{item}\"")));
    }
    let step = text.parse::<u32>().unwrap_or(u32::MAX);
    if step == 0 {
        return Err(field.error(format_args!(
            "step 0 in \"{item}\" is invalid (must be at least 1)"
        )));
    }
    if step > field.max() {
        return Err(field.error(format_args!(
            "step {text} is out of range 1-{}",
            field.max()
        )));
    }
    Ok(step)
}

/// Parses a number or a three-letter name and checks the field's range.
fn parse_value(field: Field, text: &str) -> Result<u32, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let value = text.parse::<u32>().unwrap_or(u32::MAX);
        if value < field.min() || value > field.max() {
            return Err(field.error(format_args!(
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
    if extension && matches!(field, Field::DayOfMonth | Field::DayOfWeek) {
        return Err(field.error(format_args!(
            "invalid value \"{text}\" (the L, W, # and + extensions are not supported)"
        )));
    }
    Err(field.error(format_args!("invalid value \"{text}\"")))
}

// ---------------------------------------------------------------------------
// Cron evaluation
// ---------------------------------------------------------------------------

/// How many already-passed wall times (the second pass of a fall-back) a
/// fixed-time search may step over. A fold of even 24 hours holds at most
/// 1440 matching minutes.
const MAX_FOLD_SKIPS: usize = 10_000;
/// Half-width, in seconds, of the window searched for the end of a DST gap:
/// larger than any UTC offset (so the window always brackets the gap).
const GAP_SEARCH_SECS: i64 = 2 * 86_400;

fn cron_next_after(expression: &str, zone: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let tz = parse_zone(zone)?;
    let spec = CronSpec::parse(expression).ok()?;
    let cron = spec.to_croner().ok()?;

    if after.year() >= croner::YEAR_UPPER_LIMIT {
        return None;
    }
    // croner cannot search before year 1; nothing fires there anyway.
    let floor_limit = DateTime::from_timestamp(-62_135_596_800 + 2 * 86_400, 0)?; // 0001-01-03
    let start = if after < floor_limit {
        floor_limit
    } else {
        after
    };
    // croner ignores sub-second parts: search from the whole second, and the
    // answer (> that second, a whole second) is then > `after` too.
    let start = DateTime::from_timestamp(start.timestamp(), 0)?;

    if spec.is_wildcard_job() {
        let mut from = start.with_timezone(&tz);
        // croner answers strictly after `from`; the loop is only a guard.
        for _ in 0..4 {
            let next = cron.find_next_occurrence(&from, false).ok()?;
            let next_utc = next.with_timezone(&Utc);
            if next_utc > after {
                return Some(next_utc);
            }
            from = next;
        }
        None
    } else {
        next_fixed_time(&cron, tz, start, after)
    }
}

/// Fixed-time jobs: the first matching wall time `w` whose first instant
/// (`first_instant_reaching`) is after `after`. That instant is monotonic in
/// `w`, so matching wall times are tried in order from `start`'s wall clock;
/// only the second pass of a fall-back can make any of them already passed.
fn next_fixed_time(
    cron: &Cron,
    tz: Tz,
    start: DateTime<Utc>,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut wall = local_wall_time(start, tz)?;
    for _ in 0..MAX_FOLD_SKIPS {
        wall = cron.find_next_occurrence(&wall, false).ok()?;
        let fire = first_instant_reaching(tz, wall)?;
        if fire > after {
            return Some(fire);
        }
    }
    None
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
        Schedule {
            kind: ScheduleKind::Cron {
                expression: expression.to_string(),
            },
            timezone: timezone.to_string(),
        }
    }

    fn interval(every_secs: i64, anchor: Option<&str>) -> Schedule {
        Schedule {
            kind: ScheduleKind::Interval {
                every_secs,
                anchor_time: anchor.map(utc),
            },
            timezone: "UTC".to_string(),
        }
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
        let extreme = Schedule {
            kind: ScheduleKind::Interval {
                every_secs: 1,
                anchor_time: Some(DateTime::<Utc>::MIN_UTC),
            },
            timezone: "UTC".to_string(),
        };
        assert_eq!(extreme.next_after(DateTime::<Utc>::MAX_UTC), None);
        assert!(extreme.next_after(utc("2025-01-01T00:00:00Z")).is_some());
    }

    #[test]
    fn once_and_manual() {
        let once = Schedule {
            kind: ScheduleKind::Once {
                at: utc("2025-06-01T12:00:00Z"),
            },
            timezone: "Europe/Berlin".to_string(),
        };
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

        let manual = Schedule {
            kind: ScheduleKind::Manual,
            timezone: "UTC".to_string(),
        };
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
    }

    #[test]
    fn cron_validation_errors_name_the_field() {
        let fields = "expected 5 fields (minute hour day-of-month month day-of-week)";
        let table: Vec<(&str, String)> = vec![
            ("0 25 * * *", "field 2 (hour): 25 is out of range 0-23".into()),
            ("1 2 3", format!("{fields}, got 3")),
            ("", format!("{fields}, got 0")),
            ("0 0 * * * *", format!("{fields}, got 6 (a seconds field is not supported yet)")),
            ("0 0 0 * * * 2025", format!("{fields}, got 7 (seconds and year fields are not supported)")),
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
            ("0 0 L * *", "field 3 (day-of-month): invalid value \"L\" (the L, W, # and + extensions are not supported)".into()),
            ("0 0 15W * *", "field 3 (day-of-month): invalid value \"15W\" (the L, W, # and + extensions are not supported)".into()),
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
                Schedule {
                    kind: ScheduleKind::Manual,
                    timezone: "Mars/Base".to_string(),
                },
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
                Schedule {
                    kind: ScheduleKind::Once {
                        at: DateTime::<Utc>::MAX_UTC,
                    },
                    timezone: "UTC".to_string(),
                },
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
                Schedule {
                    kind: ScheduleKind::Once {
                        at: utc("2025-06-01T12:00:00.25Z"),
                    },
                    timezone: "UTC".to_string(),
                },
                r#"{"kind":"once","at":"2025-06-01T12:00:00.250Z","timezone":"UTC"}"#,
            ),
            (
                Schedule {
                    kind: ScheduleKind::Manual,
                    timezone: "UTC".to_string(),
                },
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
}
