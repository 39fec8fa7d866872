//! The console's page frame and its drawings: the layout every page shares
//! (navigation, tenant, the development-mode banner), status badges, the
//! 30-day history strip and the duration/lag chart, both SVG drawn here.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::Who;
use crate::domain::stats::StateCounts;
use crate::domain::{BindingStatus, RunState};

/// A time as the console shows it: UTC, to the second.
pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An optional time, `—` when absent.
pub fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "—".into())
}

/// A duration in microseconds, short (`850 ms`, `12.3 s`, `4 min`).
pub fn micros(us: i64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 120_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{:.0} min", ms / 60_000.0)
    }
}

/// The page frame: header with navigation and tenant, the development-mode
/// banner when auth is off, then `body`.
pub fn layout(who: Option<&Who>, dev: bool, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sked console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                @if dev {
                    div class="banner" role="alert" {
                        strong { "Development mode: authentication is OFF." }
                        " Anyone who can reach this address acts as a platform admin. "
                        "Set DATABASE_URL (or --require-auth) to run with API keys."
                    }
                }
                header class="top" {
                    nav aria-label="Main" {
                        a class="brand" href="/bindings" { "sked" }
                        @if let Some(w) = who {
                            a href="/bindings" { "Bindings" }
                            a href="/definitions" { "Definitions" }
                            @if w.can("/sked.v1.AdminService/GetSchedulerStatus") {
                                a href="/status" { "Scheduler status" }
                            }
                        }
                    }
                    @if let Some(w) = who {
                        div class="who" {
                            @if w.caller.tenant.is_none() {
                                form method="post" action="/tenant" class="inline" {
                                    (csrf(w))
                                    label for="tenant-switch" { "Tenant" }
                                    input id="tenant-switch" name="tenant" type="text" size="12"
                                        value=(w.tenant.clone().unwrap_or_default()) required;
                                    button type="submit" { "Switch" }
                                }
                            } @else {
                                span { "Tenant " strong { (w.tenant.clone().unwrap_or_default()) } }
                            }
                            span class="role" { "Role " strong { (w.caller.role.as_str()) } }
                            form method="post" action="/sign-out" class="inline" {
                                (csrf(w))
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field of a form.
pub fn csrf(w: &Who) -> Markup {
    html! { input type="hidden" name="csrf" value=(w.session.csrf_token); }
}

/// The page of a refused or failed request.
pub fn failure(status: StatusCode, message: &str, dev: bool) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    layout(
        None,
        dev,
        title,
        html! {
            p class="error" role="alert" { (message) }
            p { a href="/bindings" { "Back to the bindings" } " · " a href="/sign-in" { "Sign in" } }
        },
    )
}

/// A binding status badge.
pub fn status_badge(s: BindingStatus) -> Markup {
    let class = match s {
        BindingStatus::Active | BindingStatus::Completed => "ok",
        BindingStatus::Failing | BindingStatus::Broken => "bad",
        BindingStatus::Paused | BindingStatus::Disabled => "warn",
    };
    html! { span class={"badge " (class)} data-status=(s.as_str()) { (s.as_str()) } }
}

/// A run state badge.
pub fn state_badge(s: RunState) -> Markup {
    let class = match s {
        RunState::Succeeded => "ok",
        RunState::Failed | RunState::TimedOut => "bad",
        RunState::Cancelled | RunState::Skipped => "warn",
        RunState::Running | RunState::Queued | RunState::Scheduled => "info",
    };
    html! { span class={"badge " (class)} data-state=(s.as_str()) { (s.as_str()) } }
}

/// The outcome class of one day's counts: `fail` when any run failed or
/// timed out, else `ok` when any succeeded, `other` when runs only were
/// cancelled or skipped, `none` without runs.
pub fn day_outcome(c: &StateCounts) -> &'static str {
    if c.failed + c.timed_out > 0 {
        "fail"
    } else if c.succeeded > 0 {
        "ok"
    } else if c.total() > 0 {
        "other"
    } else {
        "none"
    }
}

/// The history strip: one square per day, oldest left, coloured by
/// [`day_outcome`], each with a tooltip of its counts; `label` names it for
/// screen readers.
pub fn history_strip(series: &[(DateTime<Utc>, StateCounts)], label: &str) -> Markup {
    const SIZE: usize = 13;
    const GAP: usize = 3;
    let width = series.len() * (SIZE + GAP);
    let fails = series
        .iter()
        .filter(|(_, c)| day_outcome(c) == "fail")
        .count();
    let aria = format!("{label}: {} days, {fails} with failures", series.len());
    html! {
        svg class="strip" width=(width) height=(SIZE) viewBox={"0 0 " (width) " " (SIZE)}
            role="img" aria-label=(aria) xmlns="http://www.w3.org/2000/svg" {
            @for (i, (day, c)) in series.iter().enumerate() {
                rect class={"day " (day_outcome(c))} data-outcome=(day_outcome(c))
                    x=(i * (SIZE + GAP)) y="0" width=(SIZE) height=(SIZE) rx="2" {
                    title {
                        (day.format("%Y-%m-%d")) ": "
                        (c.succeeded) " succeeded, " (c.failed) " failed, "
                        (c.timed_out) " timed out, " (c.cancelled) " cancelled, "
                        (c.skipped) " skipped"
                    }
                }
            }
        }
    }
}

/// One point of the duration/lag chart: a run's fire time, its duration
/// and its fire lag, microseconds.
#[derive(Debug, Clone, Copy)]
pub struct ChartPoint {
    /// Fire time.
    pub at: DateTime<Utc>,
    /// Start to end.
    pub duration_us: i64,
    /// Fire time to start.
    pub lag_us: i64,
}

/// Duration and lag of runs as two lines over their fire times (oldest
/// left), with the maximum on the axis; a table with the same figures
/// follows for screen readers.
pub fn duration_chart(points: &[ChartPoint]) -> Markup {
    const W: f64 = 640.0;
    const H: f64 = 160.0;
    const PAD: f64 = 36.0;
    if points.len() < 2 {
        return html! { p class="muted" { "Too few ended runs for a chart yet." } };
    }
    let max = points
        .iter()
        .map(|p| p.duration_us.max(p.lag_us))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let n = points.len() as f64;
    let x = |i: usize| PAD + (W - 2.0 * PAD) * i as f64 / (n - 1.0);
    let y = |v: i64| H - PAD / 2.0 - (H - PAD) * v as f64 / max;
    let line = |f: &dyn Fn(&ChartPoint) -> i64| {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(f(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let dur = line(&|p| p.duration_us);
    let lag = line(&|p| p.lag_us);
    html! {
        figure class="chart" {
            svg width=(W) height=(H) viewBox={"0 0 " (W) " " (H)} role="img"
                aria-label={"Duration and fire lag of the last " (points.len()) " ended runs"}
                xmlns="http://www.w3.org/2000/svg" {
                line class="axis" x1=(PAD) y1=(H - PAD / 2.0) x2=(W - PAD) y2=(H - PAD / 2.0) {}
                line class="axis" x1=(PAD) y1=(PAD / 2.0) x2=(PAD) y2=(H - PAD / 2.0) {}
                text class="tick" x="2" y=(PAD / 2.0 + 4.0) { (micros(max as i64)) }
                text class="tick" x="2" y=(H - PAD / 2.0) { "0" }
                polyline class="duration" points=(dur) fill="none" {}
                polyline class="lag" points=(lag) fill="none" {}
            }
            figcaption {
                span class="key duration" { "■ duration" } " "
                span class="key lag" { "■ fire lag" }
                " — oldest left, " (points.first().map(|p| time(p.at)).unwrap_or_default())
                " to " (points.last().map(|p| time(p.at)).unwrap_or_default())
            }
        }
    }
}

/// Pretty-printed JSON in a `<pre>`.
pub fn json(v: &serde_json::Value) -> Markup {
    let s = serde_json::to_string_pretty(v).unwrap_or_default();
    html! { pre class="json" { (s) } }
}

/// Nothing: an empty fragment.
pub fn nothing() -> Markup {
    PreEscaped(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(succeeded: u64, failed: u64, skipped: u64) -> StateCounts {
        StateCounts {
            succeeded,
            failed,
            skipped,
            ..StateCounts::default()
        }
    }

    #[test]
    fn a_day_with_a_failure_is_red_whatever_else_ran() {
        assert_eq!(day_outcome(&counts(5, 1, 0)), "fail");
        assert_eq!(day_outcome(&counts(5, 0, 1)), "ok");
        assert_eq!(day_outcome(&counts(0, 0, 2)), "other");
        assert_eq!(day_outcome(&StateCounts::default()), "none");
    }

    #[test]
    fn the_strip_has_one_named_square_per_day_and_escapes_labels() {
        let day = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let series = vec![(day, counts(1, 0, 0)), (day, counts(0, 2, 0))];
        let svg = history_strip(&series, "History of <b>").into_string();
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("data-outcome=\"fail\""));
        assert!(svg.contains("aria-label=\"History of &lt;b&gt;: 2 days, 1 with failures\""));
    }

    #[test]
    fn the_chart_draws_two_lines_scaled_to_the_maximum() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let p = |d, l| ChartPoint {
            at,
            duration_us: d,
            lag_us: l,
        };
        assert!(duration_chart(&[p(1, 1)]).into_string().contains("Too few"));
        let svg = duration_chart(&[p(2_000_000, 0), p(1_000_000, 500_000)]).into_string();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("2.0 s"), "the axis names the maximum: {svg}");
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(micros(850_000), "850 ms");
        assert_eq!(micros(12_300_000), "12.3 s");
        assert_eq!(micros(240_000_000), "4 min");
    }
}
