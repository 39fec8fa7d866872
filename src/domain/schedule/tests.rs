//! Shared test helpers, the fire-time table across all kinds, and the tests
//! of the public entry points (serde shape, window, extreme instants).

use super::*;

pub(super) fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad test instant {s}: {e}"))
        .with_timezone(&Utc)
}

pub(super) fn cron(expression: &str, timezone: &str) -> Schedule {
    Schedule::new(
        ScheduleKind::Cron {
            expression: expression.to_string(),
        },
        timezone.to_string(),
    )
}

pub(super) fn interval(every_secs: i64, anchor: Option<&str>) -> Schedule {
    Schedule::new(
        ScheduleKind::Interval {
            every_secs,
            anchor_time: anchor.map(utc),
        },
        "UTC".to_string(),
    )
}

/// The next `n` fires after `after`, each strictly after the previous.
pub(super) fn fires(s: &Schedule, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
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
pub(super) fn fires_between(
    s: &Schedule,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
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

pub(super) struct Case {
    pub(super) name: &'static str,
    pub(super) expr: &'static str,
    pub(super) tz: &'static str,
    pub(super) after: &'static str,
    pub(super) expected: &'static [&'static str],
}

pub(super) fn run_cases(cases: &[Case]) {
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
        let back: Schedule = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
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
        serde_json::from_str::<Schedule>(r#"{"kind":"once","at":"yesterday","timezone":"UTC"}"#)
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
        let back: Schedule = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
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

pub(super) const NY: &str = "America/New_York";
pub(super) const BERLIN: &str = "Europe/Berlin";
pub(super) const LORD_HOWE: &str = "Australia/Lord_Howe";
pub(super) const SYDNEY: &str = "Australia/Sydney";

pub(super) fn tod(text: &str) -> TimeOfDay {
    TimeOfDay::parse(text).unwrap_or_else(|e| panic!("bad test time {text}: {e}"))
}

pub(super) fn daily(time: &str, tz: &str) -> Schedule {
    Schedule::new(
        ScheduleKind::Daily {
            time_of_day: tod(time),
        },
        tz,
    )
}

pub(super) fn weekly(days: &[u8], time: &str, tz: &str) -> Schedule {
    Schedule::new(
        ScheduleKind::Weekly {
            days_of_week: days.to_vec(),
            time_of_day: tod(time),
        },
        tz,
    )
}

pub(super) fn monthly(day_of_month: i8, time: &str, tz: &str) -> Schedule {
    Schedule::new(
        ScheduleKind::Monthly {
            day_of_month,
            time_of_day: tod(time),
        },
        tz,
    )
}

pub(super) fn yearly(month: u8, day: u8, time: &str, tz: &str) -> Schedule {
    Schedule::new(
        ScheduleKind::Yearly {
            month,
            day,
            time_of_day: tod(time),
        },
        tz,
    )
}

pub(super) fn once(at: &str) -> Schedule {
    Schedule::new(ScheduleKind::Once { at: utc(at) }, "UTC")
}

pub(super) fn window(mut s: Schedule, start: Option<&str>, end: Option<&str>) -> Schedule {
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
