//! Evaluation on the wall clock of a time zone: the daylight saving time
//! rules, cron evaluation with croner, and the fixed-time search that the
//! calendar kinds share.
//!
//! Cron and the calendar kinds are evaluated on the local wall clock of
//! [`Schedule::timezone`](super::Schedule::timezone). Cron jobs are
//! classified as in Vixie cron (`entry.c` sets `MIN_STAR` / `HR_STAR` when
//! the minute / hour field starts with `*`; for six fields the seconds field
//! counts too, as in croner 4's job classification):
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
//! * Vixie cron starts one run per skipped matching minute; here a
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
//! # What croner 4 does natively and what this module adds
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
//! * The Vixie day-of-month/day-of-week rule, macro expansion, the
//!   per-field error messages and the never-fires check are done in
//!   [`cron`](super::cron).
//! * `after` is truncated to whole seconds before asking croner (croner
//!   ignores sub-second parts); the answer is always strictly after `after`.
//!
//! Cron search covers the years croner supports (1 to 4999; croner may
//! still return a match at the very start of year 5000, e.g.
//! 5000-01-01T00:00:00); for an `after` in year 5000 or later
//! [`Schedule::next_after`](super::Schedule::next_after) answers `None`.

use chrono::{DateTime, Datelike, LocalResult, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

use super::Fire;
use super::cron::{CompiledCron, CronSpec};

/// Looks up an IANA zone name in chrono-tz (exact, case-sensitive).
pub(super) fn parse_zone(name: &str) -> Option<Tz> {
    name.parse::<Tz>().ok()
}

/// The wall-clock time of `t` in `tz`, or `None` where it would fall outside
/// chrono's range (`DateTime::naive_local` panics there).
pub(super) fn local_wall_time(t: DateTime<Utc>, tz: Tz) -> Option<NaiveDateTime> {
    let offset = tz.offset_from_utc_datetime(&t.naive_utc()).fix();
    t.naive_utc().checked_add_offset(offset)
}

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
pub(super) fn search_start(after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let floor = search_floor()?;
    let start = if after < floor { floor } else { after };
    DateTime::from_timestamp(start.timestamp(), 0)
}

/// Expressions compiled on this thread, so that firing thousands of
/// bindings that share an expression parses it once, not once per fire
/// (parsing and compiling took ~20 µs, most of a fire's planning). Bounded:
/// emptied when it holds [`COMPILED_CRONS`] expressions, and keeps none
/// longer than [`super::MAX_CRON_LEN`] bytes, so many distinct expressions
/// cost what they cost without it.
fn compiled_cron(expression: &str) -> Option<std::rc::Rc<CompiledCron>> {
    thread_local! {
        static COMPILED: std::cell::RefCell<
            std::collections::HashMap<Box<str>, Option<std::rc::Rc<CompiledCron>>>,
        > = std::cell::RefCell::default();
    }
    COMPILED.with(|cache| {
        if let Some(hit) = cache.borrow().get(expression) {
            return hit.clone();
        }
        let compiled = CronSpec::parse(expression)
            .ok()
            .and_then(|spec| spec.compile())
            .map(std::rc::Rc::new);
        // Stored data longer than input allows (corrupt) is not kept.
        if expression.len() > super::MAX_CRON_LEN {
            return compiled;
        }
        let mut cache = cache.borrow_mut();
        if cache.len() >= COMPILED_CRONS {
            cache.clear();
        }
        cache.insert(expression.into(), compiled.clone());
        compiled
    })
}

/// Expressions [`compiled_cron`] keeps per thread at most.
const COMPILED_CRONS: usize = 1024;

/// The first fire of cron `expression` in `zone` strictly after `after`:
/// wildcard jobs through croner's zoned search, fixed-time jobs through
/// [`next_fixed_time`] (see the module docs).
pub(super) fn cron_next_after(expression: &str, zone: &str, after: DateTime<Utc>) -> Option<Fire> {
    let tz = parse_zone(zone)?;
    let compiled = compiled_cron(expression)?;
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
pub(super) fn next_fixed_time(
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

#[cfg(test)]
mod tests {
    use super::super::tests::*;

    #[test]
    fn compiled_expressions_answer_as_freshly_parsed_ones_across_the_cache_limit() {
        let after = Utc.with_ymd_and_hms(2025, 11, 2, 4, 59, 30).unwrap();
        // More distinct expressions than the cache keeps, twice round: every
        // answer, cached, evicted or fresh, is the one a fresh parse gives.
        for round in 0..2 {
            for i in 0..(COMPILED_CRONS + 100) {
                let expr = format!("{} {} * * *", i % 60, (i / 60) % 24);
                let fresh = CronSpec::parse(&expr)
                    .ok()
                    .and_then(|s| s.compile())
                    .map(|c| {
                        c.cron
                            .find_next_occurrence(
                                &after.with_timezone(&parse_zone("UTC").unwrap()),
                                false,
                            )
                            .unwrap()
                            .with_timezone(&Utc)
                    });
                let cached = cron_next_after(&expr, "UTC", after).map(|f| f.time);
                assert_eq!(cached, fresh, "{expr} (round {round})");
            }
        }
        // An expression that does not parse is remembered as such.
        assert!(cron_next_after("61 * * * *", "UTC", after).is_none());
        assert!(cron_next_after("61 * * * *", "UTC", after).is_none());
    }
    use super::super::*;
    use super::*;
    use chrono::{NaiveDate, NaiveTime};
    use croner::parser::{CronParser, Seconds};

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
