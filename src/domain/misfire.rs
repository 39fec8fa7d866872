//! Misfire handling (`docs/semantics.md`, "Run lifecycle"): what happens to fire times that passed while
//! no node could fire them (downtime, overload).
//!
//! A fire time late by at most [`MISFIRE_TOLERANCE`] is on time (that is fire
//! lag, not a misfire). Among later fire times, those inside the definition's
//! `catchup_window` (measured back from now) run according to the mode:
//!
//! | mode       | inside the window                     | older             |
//! |------------|---------------------------------------|-------------------|
//! | `RunOnce`  | one run, for the latest; rest skipped | skipped           |
//! | `RunAll`   | one run each                          | skipped           |
//! | `Skip`     | skipped (an on-time fire still runs)  | skipped           |
//!
//! "Skipped" fires are recorded as `SKIPPED` runs with reason `misfire`, at
//! most [`MAX_SKIPPED_ROWS`] per binding per pass plus one summary row for
//! the rest, so the history shows every fire that did not run and nothing is
//! silently lost. The binding's next fire time is always computed from the
//! last planned fire time, never from now, and a binding never stops firing
//! however many fires it missed (unlike Kubernetes CronJob's 100-miss limit).
//! `RunOnce` is Quartz's "fire once now" / Temporal's catch-up with
//! `SCHEDULE_OVERLAP_POLICY_SKIP`, `RunAll` Quartz's "ignore misfire policy"
//! bounded by the window, `Skip` Quartz's "do nothing".

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{RunReason, Schedule};

/// Lateness that is still "on time", not a misfire.
pub const MISFIRE_TOLERANCE: Duration = Duration::seconds(5);
/// SKIPPED rows written per binding per pass before one summary row.
pub const MAX_SKIPPED_ROWS: usize = 100;
/// Runs `RunAll` creates per binding per pass; the rest follow next pass.
pub const MAX_RUNS_PER_PASS: usize = 1000;
/// Fire times walked one by one before jumping to the window's start.
const MAX_WALK: usize = 20_000;
/// Longest accepted catch-up window.
pub const MAX_CATCHUP_WINDOW_SECS: i64 = 366 * 24 * 3600;

/// How missed fire times are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MisfireMode {
    /// One run for the latest missed time inside the window (default).
    RunOnce,
    /// One run per missed time inside the window.
    RunAll,
    /// No catch-up runs.
    Skip,
}

/// A definition's misfire policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MisfirePolicy {
    /// How far back from now missed fires are caught up, whole seconds,
    /// 0..=[`MAX_CATCHUP_WINDOW_SECS`] (default 60).
    pub catchup_window_secs: i64,
    /// What to do with missed fires inside the window.
    pub mode: MisfireMode,
}

impl Default for MisfirePolicy {
    fn default() -> Self {
        Self {
            catchup_window_secs: 60,
            mode: MisfireMode::RunOnce,
        }
    }
}

/// What one pass does with a due binding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirePlan {
    /// Fire times to run, oldest first.
    pub run: Vec<DateTime<Utc>>,
    /// Fire times to record as `SKIPPED`, with their reason.
    pub skipped: Vec<(DateTime<Utc>, String)>,
    /// The binding's next fire time (may still be ≤ now when a cap was hit:
    /// the next pass continues from there).
    pub next: Option<DateTime<Utc>>,
}

/// Plans the fires of a binding whose fire time `due` has come (`due` ≤
/// `now`), per `policy` (module docs).
pub fn plan_fires(
    schedule: &Schedule,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: &MisfirePolicy,
) -> FirePlan {
    let window = Duration::seconds(policy.catchup_window_secs.clamp(0, MAX_CATCHUP_WINDOW_SECS))
        .max(MISFIRE_TOLERANCE);
    let window_start = now - window;
    let mut outside = Vec::new();
    let mut inside = Vec::new();
    let mut t = Some(due);
    let mut walked = 0usize;
    let mut jumped = false;
    while let Some(x) = t {
        if x > now {
            break;
        }
        if x < window_start {
            outside.push(x);
            walked += 1;
            if walked >= MAX_WALK && !jumped {
                // Long outage: stop walking fire by fire, resume at the window.
                jumped = true;
                t = schedule.next_after(window_start - Duration::microseconds(1));
                continue;
            }
        } else {
            inside.push(x);
            if policy.mode == MisfireMode::RunAll && inside.len() >= MAX_RUNS_PER_PASS {
                t = schedule.next_after(x);
                break;
            }
        }
        t = schedule.next_after(x);
    }
    let mut run = Vec::new();
    let mut skip_times = outside;
    match policy.mode {
        MisfireMode::RunAll => run = inside,
        MisfireMode::RunOnce => {
            if let Some(last) = inside.pop() {
                run.push(last);
            }
            skip_times.extend(inside);
        }
        MisfireMode::Skip => {
            if let Some(&last) = inside.last()
                && now - last <= MISFIRE_TOLERANCE
            {
                inside.pop();
                run.push(last);
            }
            skip_times.extend(inside);
        }
    }
    FirePlan {
        run,
        skipped: skipped_rows(&skip_times, jumped),
        next: t,
    }
}

/// At most [`MAX_SKIPPED_ROWS`] rows, then one summary row at the latest
/// remaining time.
fn skipped_rows(times: &[DateTime<Utc>], jumped: bool) -> Vec<(DateTime<Utc>, String)> {
    let mut rows: Vec<(DateTime<Utc>, String)> = times
        .iter()
        .take(MAX_SKIPPED_ROWS)
        .map(|t| (*t, RunReason::Misfire.to_string()))
        .collect();
    if times.len() > MAX_SKIPPED_ROWS || jumped {
        let rest = &times[MAX_SKIPPED_ROWS.min(times.len())..];
        if let (Some(first), Some(last)) = (rest.first(), rest.last()) {
            let count = if jumped {
                format!("at least {}", rest.len())
            } else {
                rest.len().to_string()
            };
            rows.push((
                *last,
                format!(
                    "{}: {count} further missed fire times from {first} to {last} (summary row)",
                    RunReason::Misfire
                ),
            ));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every(secs: i64, anchor: DateTime<Utc>) -> Schedule {
        // Through serde, so new optional schedule fields keep their defaults.
        serde_json::from_value(serde_json::json!(
            {"kind": "interval", "every_secs": secs, "anchor_time": anchor, "timezone": "UTC"}))
        .unwrap()
    }
    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }
    fn policy(window: i64, mode: MisfireMode) -> MisfirePolicy {
        MisfirePolicy {
            catchup_window_secs: window,
            mode,
        }
    }

    #[test]
    fn on_time_fire_runs_in_every_mode() {
        let s = every(10, t("2026-01-01T00:00:00Z"));
        let now = t("2026-01-01T00:00:10.030Z");
        for mode in [MisfireMode::RunOnce, MisfireMode::RunAll, MisfireMode::Skip] {
            let p = plan_fires(&s, t("2026-01-01T00:00:10Z"), now, &policy(0, mode));
            assert_eq!(p.run, vec![t("2026-01-01T00:00:10Z")], "{mode:?}");
            assert!(p.skipped.is_empty());
            assert_eq!(p.next, Some(t("2026-01-01T00:00:20Z")));
        }
    }

    #[test]
    fn run_once_runs_latest_in_window_and_records_the_rest() {
        // Down from 00:00:10 to 00:05:00; window 60 s; every 10 s.
        let s = every(10, t("2026-01-01T00:00:00Z"));
        let now = t("2026-01-01T00:05:00.5Z");
        let p = plan_fires(
            &s,
            t("2026-01-01T00:00:10Z"),
            now,
            &policy(60, MisfireMode::RunOnce),
        );
        assert_eq!(p.run, vec![t("2026-01-01T00:05:00Z")]);
        // 00:00:10 .. 00:04:50 = 29 skipped.
        assert_eq!(p.skipped.len(), 29);
        assert!(p.skipped.iter().all(|(_, r)| r == "misfire"));
        assert_eq!(p.next, Some(t("2026-01-01T00:05:10Z")));
    }

    #[test]
    fn run_all_runs_each_in_window() {
        let s = every(10, t("2026-01-01T00:00:00Z"));
        let now = t("2026-01-01T00:05:00.5Z");
        let p = plan_fires(
            &s,
            t("2026-01-01T00:00:10Z"),
            now,
            &policy(60, MisfireMode::RunAll),
        );
        // 00:04:00.5 .. 00:05:00.5 → 00:04:10 .. 00:05:00 = 6 runs.
        assert_eq!(p.run.len(), 6);
        assert_eq!(p.run[0], t("2026-01-01T00:04:10Z"));
        assert_eq!(p.skipped.len(), 24);
    }

    #[test]
    fn skip_mode_runs_nothing_late() {
        let s = every(10, t("2026-01-01T00:00:00Z"));
        let now = t("2026-01-01T00:05:07Z");
        let p = plan_fires(
            &s,
            t("2026-01-01T00:00:10Z"),
            now,
            &policy(60, MisfireMode::Skip),
        );
        assert!(p.run.is_empty());
        assert_eq!(p.skipped.len(), 30);
    }

    #[test]
    fn long_outage_is_capped_with_a_summary_row_and_keeps_firing() {
        let s = every(1, t("2026-01-01T00:00:00Z"));
        let now = t("2026-01-08T00:00:00.2Z"); // a week of 1 s fires
        let p = plan_fires(
            &s,
            t("2026-01-01T00:00:01Z"),
            now,
            &policy(60, MisfireMode::RunOnce),
        );
        assert_eq!(p.run, vec![t("2026-01-08T00:00:00Z")]);
        assert_eq!(p.skipped.len(), MAX_SKIPPED_ROWS + 1);
        assert!(
            p.skipped.last().unwrap().1.contains("summary row"),
            "{:?}",
            p.skipped.last()
        );
        assert_eq!(p.next, Some(t("2026-01-08T00:00:01Z")));
    }
}
