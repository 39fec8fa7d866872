//! Run policies (`docs/semantics.md`, "Run lifecycle"): what happens when a fire meets an active run
//! ([`OverlapPolicy`]), when an attempt fails ([`RetryPolicy`]), and how long
//! an attempt may take (timeout, whole seconds).
//!
//! Backoff follows the exponential-backoff-with-jitter scheme of Temporal's
//! retry policy and AWS's "Exponential Backoff And Jitter": the delay before
//! attempt `n + 1` is `min(initial × coefficient^(n−1), max)`, then moved by
//! up to ±10 % so that many runs failing together do not retry together.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::FieldViolation;

/// What a fire does while the binding's previous run is still active
/// (`SCHEDULED` retry, `QUEUED` or `RUNNING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OverlapPolicy {
    /// Record the fire as a `SKIPPED` run with reason `overlap`. The default.
    #[default]
    Skip,
    /// Run both, concurrently.
    Allow,
    /// Keep at most one run waiting behind the active one; further fires are
    /// `SKIPPED`/`overlap`. The waiting run starts when the active one ends.
    BufferOne,
    /// Cancel the active run (reason `overlap`), then start the new one once
    /// the old one has stopped.
    CancelPrevious,
}

impl OverlapPolicy {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OverlapPolicy::Skip => "SKIP",
            OverlapPolicy::Allow => "ALLOW",
            OverlapPolicy::BufferOne => "BUFFER_ONE",
            OverlapPolicy::CancelPrevious => "CANCEL_PREVIOUS",
        }
    }
    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<OverlapPolicy> {
        Some(match s {
            "SKIP" => OverlapPolicy::Skip,
            "ALLOW" => OverlapPolicy::Allow,
            "BUFFER_ONE" => OverlapPolicy::BufferOne,
            "CANCEL_PREVIOUS" => OverlapPolicy::CancelPrevious,
            _ => return None,
        })
    }
}

/// What one scheduler pass does with a binding's due fire times, given its
/// active runs, as Temporal Schedules' overlap policies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverlapPlan<T> {
    /// Fire times that get a run.
    pub run: Vec<T>,
    /// Fire times recorded as `SKIPPED` with reason [`RunReason::Overlap`](super::RunReason::Overlap).
    pub skipped: Vec<T>,
    /// Cancel the binding's active runs first (`CANCEL_PREVIOUS`).
    pub cancel_active: bool,
}

/// Applies `policy` to due `fires` (oldest first) of a binding that has
/// `running` runs executing and `waiting` runs queued or waiting out a retry
/// backoff. New runs count as active for the fires after them, so several
/// fires caught up in one pass also obey the policy:
/// - `ALLOW`: every fire runs.
/// - `SKIP`: the first fire runs only when nothing is active.
/// - `BUFFER_ONE`: one fire runs when nothing is waiting (it starts now or
///   waits behind the running one); never more than one waiting.
/// - `CANCEL_PREVIOUS`: the active runs are cancelled and the latest fire
///   runs; earlier fires of the same pass are skipped.
pub fn plan_overlap<T>(
    policy: OverlapPolicy,
    fires: Vec<T>,
    running: usize,
    waiting: usize,
) -> OverlapPlan<T> {
    plan_overlap_capped(policy, fires, running, waiting, None)
}

/// [`plan_overlap`] with a cap on the binding's active runs under `ALLOW`
/// (`max_active_runs`, APScheduler's `max_instances`): with `running +
/// waiting` active already, only `cap - active` fires run, the rest are
/// skipped (reason `overlap`). `None` = no cap; ignored under the other
/// policies (they allow one active run at most anyway).
pub fn plan_overlap_capped<T>(
    policy: OverlapPolicy,
    fires: Vec<T>,
    running: usize,
    waiting: usize,
    cap: Option<u32>,
) -> OverlapPlan<T> {
    let mut plan = OverlapPlan {
        run: Vec::new(),
        skipped: Vec::new(),
        cancel_active: false,
    };
    let room = match policy {
        OverlapPolicy::Allow => match cap {
            Some(c) => (c as usize).saturating_sub(running + waiting),
            None => usize::MAX,
        },
        OverlapPolicy::Skip => usize::from(running + waiting == 0),
        OverlapPolicy::BufferOne => usize::from(waiting == 0),
        OverlapPolicy::CancelPrevious => {
            plan.cancel_active = running + waiting > 0 && !fires.is_empty();
            let n = fires.len();
            for (i, t) in fires.into_iter().enumerate() {
                if i + 1 == n {
                    plan.run.push(t);
                } else {
                    plan.skipped.push(t);
                }
            }
            return plan;
        }
    };
    for t in fires {
        if plan.run.len() < room {
            plan.run.push(t);
        } else {
            plan.skipped.push(t);
        }
    }
    plan
}

/// Most attempts a retry policy may allow.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest backoff, and longest timeout: one day.
pub const MAX_DELAY: Duration = Duration::from_secs(86_400);

/// How failed attempts are retried. A `FAILED` or `TIMED_OUT` attempt (or one
/// cancelled by a node shutdown, or lost with its node) with attempts left
/// gets a new run, `trigger = RETRY`, `SCHEDULED` after [`RetryPolicy::backoff`].
/// Cancelled runs are never retried.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Attempts in all, 1 (no retry) to 100.
    pub max_attempts: u32,
    /// Delay before the first retry, milliseconds, 1 ms to 1 day; default 1 s.
    pub initial_backoff_ms: u64,
    /// Factor applied per further attempt, 1.0 to 100.0; default 2.0.
    pub backoff_coefficient: f64,
    /// Cap on the delay, milliseconds, ≥ `initial_backoff_ms`, ≤ 1 day;
    /// default 100 × the initial backoff (as Temporal).
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            initial_backoff_ms: 1_000,
            backoff_coefficient: 2.0,
            max_backoff_ms: 100_000,
        }
    }
}

impl RetryPolicy {
    /// Checks the ranges documented on each field; `prefix` is the API path
    /// of the policy (e.g. `definition.retry_policy`).
    ///
    /// # Errors
    /// A [`FieldViolation`] naming the first field out of range.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldViolation> {
        let max_ms = MAX_DELAY.as_millis() as u64;
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(FieldViolation::new(
                format!("{prefix}.max_attempts"),
                format!("must be 1 to {MAX_ATTEMPTS} (1 = no retry)"),
            ));
        }
        if !(1..=max_ms).contains(&self.initial_backoff_ms) {
            return Err(FieldViolation::new(
                format!("{prefix}.initial_backoff"),
                "must be 1 ms to 1 day",
            ));
        }
        if !(1.0..=100.0).contains(&self.backoff_coefficient) {
            return Err(FieldViolation::new(
                format!("{prefix}.backoff_coefficient"),
                "must be 1.0 to 100.0",
            ));
        }
        if self.max_backoff_ms < self.initial_backoff_ms || self.max_backoff_ms > max_ms {
            return Err(FieldViolation::new(
                format!("{prefix}.max_backoff"),
                "must be at least initial_backoff and at most 1 day",
            ));
        }
        Ok(())
    }

    /// Delay before the attempt after `attempt` (1-based):
    /// `min(initial × coefficient^(attempt−1), max)` scaled by
    /// `1 + jitter × 0.1`, where `jitter` ∈ [−1, 1] (clamped) is the caller's
    /// random draw.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .backoff_coefficient
            .powi(attempt.saturating_sub(1).min(1000) as i32);
        let base = (self.initial_backoff_ms as f64 * exp).min(self.max_backoff_ms as f64);
        let ms = base * (1.0 + jitter.clamp(-1.0, 1.0) * 0.1);
        Duration::from_millis(ms.max(0.0).round() as u64)
    }
}

/// A jitter draw in [−1, 1] from the random bits of a UUIDv4/v7 (its last
/// 8 bytes), so retries need no extra random source and are reproducible
/// from the new run's id.
pub fn jitter_from_id(id: &uuid::Uuid) -> f64 {
    let b = id.as_bytes();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[8..16]);
    let v = u64::from_be_bytes(x) >> 11; // 53 bits
    (v as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

/// The policies a run is created with, snapshotted on the run so that a
/// later definition change never alters a run in flight.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunPolicy {
    /// Fire meets active run.
    pub overlap: OverlapPolicy,
    /// Failed attempts.
    pub retry: RetryPolicy,
    /// Wall-clock limit per attempt, whole seconds; `None` = no limit.
    pub timeout_secs: Option<u32>,
    /// Claim order among waiting runs: higher first; default 0.
    pub priority: i32,
}

/// Most active runs `max_active_runs` may allow.
pub const MAX_ACTIVE_RUNS: u32 = 1000;

/// Checks a `max_active_runs`: 1 to [`MAX_ACTIVE_RUNS`], or 0 (no cap)
/// where `zero_ok`.
///
/// # Errors
/// A [`FieldViolation`] on `field` otherwise.
pub fn validate_max_active_runs(field: &str, n: u32, zero_ok: bool) -> Result<(), FieldViolation> {
    if n > MAX_ACTIVE_RUNS || (n == 0 && !zero_ok) {
        let lo = if zero_ok { "0 (no cap)" } else { "1" };
        return Err(FieldViolation::new(
            field,
            format!("{n} is out of range: must be {lo} to {MAX_ACTIVE_RUNS}"),
        ));
    }
    Ok(())
}

/// A binding's own values for its definition's run policy; `None` inherits
/// the definition's, as it is when a run is created (the database resolves
/// them in the statements that read a binding with its definition).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyOverrides {
    /// Retry policy of the binding's runs.
    pub retry: Option<RetryPolicy>,
    /// Timeout per attempt, whole seconds (1 s to 1 day).
    pub timeout_secs: Option<u32>,
    /// Claim order among waiting runs.
    pub priority: Option<i32>,
    /// Cap on active runs under `ALLOW`; `Some(0)` = no cap even when the
    /// definition has one.
    pub max_active_runs: Option<u32>,
}

impl PolicyOverrides {
    /// `def` with these overrides applied.
    pub fn apply(&self, def: RunPolicy) -> RunPolicy {
        RunPolicy {
            overlap: def.overlap,
            retry: self.retry.unwrap_or(def.retry),
            timeout_secs: self.timeout_secs.or(def.timeout_secs),
            priority: self.priority.unwrap_or(def.priority),
        }
    }

    /// The active-run cap in force given the definition's (`None` = no cap).
    pub fn max_active_runs(&self, def: Option<u32>) -> Option<u32> {
        self.max_active_runs.or(def).filter(|&n| n > 0)
    }
}

/// Checks a timeout: whole seconds, 1 s to 1 day.
///
/// # Errors
/// A [`FieldViolation`] on `field` otherwise.
pub fn validate_timeout(field: &str, secs: u64) -> Result<(), FieldViolation> {
    if secs == 0 || secs > MAX_DELAY.as_secs() {
        return Err(FieldViolation::new(
            field,
            "must be 1 s to 1 day, whole seconds",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 1_000,
            backoff_coefficient: 2.0,
            max_backoff_ms: 5_000,
        };
        let ms = |a| p.backoff(a, 0.0).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(20)],
            [1000, 2000, 4000, 5000, 5000]
        );
        assert_eq!(p.backoff(1, 1.0).as_millis(), 1100);
        assert_eq!(p.backoff(1, -1.0).as_millis(), 900);
        assert_eq!(p.backoff(1, 7.0).as_millis(), 1100, "jitter is clamped");
    }

    #[test]
    fn jitter_draw_is_in_range() {
        for _ in 0..1000 {
            let j = jitter_from_id(&uuid::Uuid::now_v7());
            assert!((-1.0..=1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = RetryPolicy::default();
        assert!(ok.validate("p").is_ok());
        let e = RetryPolicy {
            max_attempts: 0,
            ..ok
        }
        .validate("p")
        .unwrap_err();
        assert_eq!(e.field, "p.max_attempts");
        let e = RetryPolicy {
            backoff_coefficient: 0.5,
            ..ok
        }
        .validate("p")
        .unwrap_err();
        assert_eq!(e.field, "p.backoff_coefficient");
        let e = RetryPolicy {
            max_backoff_ms: 10,
            ..ok
        }
        .validate("p")
        .unwrap_err();
        assert_eq!(e.field, "p.max_backoff");
        assert!(validate_timeout("t", 0).is_err());
        assert!(validate_timeout("t", 1).is_ok());
    }

    #[test]
    fn overlap_plans() {
        use OverlapPolicy::*;
        let p = |pol, fires: Vec<u8>, r, w| {
            let x = plan_overlap(pol, fires, r, w);
            (x.run, x.skipped, x.cancel_active)
        };
        assert_eq!(p(Allow, vec![1, 2], 1, 1), (vec![1, 2], vec![], false));
        assert_eq!(p(Skip, vec![1], 0, 0), (vec![1], vec![], false));
        assert_eq!(p(Skip, vec![1], 1, 0), (vec![], vec![1], false));
        assert_eq!(p(Skip, vec![1, 2], 0, 0), (vec![1], vec![2], false));
        assert_eq!(p(BufferOne, vec![1], 1, 0), (vec![1], vec![], false));
        assert_eq!(p(BufferOne, vec![1], 1, 1), (vec![], vec![1], false));
        assert_eq!(p(BufferOne, vec![1, 2], 0, 0), (vec![1], vec![2], false));
        assert_eq!(
            p(CancelPrevious, vec![1, 2], 1, 0),
            (vec![2], vec![1], true)
        );
        assert_eq!(p(CancelPrevious, vec![1], 0, 0), (vec![1], vec![], false));
    }

    #[test]
    fn allow_with_a_cap_runs_up_to_it() {
        use OverlapPolicy::*;
        let p = |fires: Vec<u8>, r, w, cap| {
            let x = plan_overlap_capped(Allow, fires, r, w, cap);
            (x.run, x.skipped)
        };
        assert_eq!(p(vec![1, 2], 2, 0, Some(3)), (vec![1], vec![2]));
        assert_eq!(p(vec![1], 2, 1, Some(3)), (vec![], vec![1]));
        assert_eq!(p(vec![1, 2, 3], 0, 0, Some(3)), (vec![1, 2, 3], vec![]));
        assert_eq!(p(vec![1, 2], 9, 9, None), (vec![1, 2], vec![]));
        assert!(validate_max_active_runs("m", 0, false).is_err());
        assert!(validate_max_active_runs("m", 0, true).is_ok());
        assert!(validate_max_active_runs("m", 1001, true).is_err());
        let o = PolicyOverrides {
            max_active_runs: Some(0),
            priority: Some(7),
            ..Default::default()
        };
        assert_eq!(o.max_active_runs(Some(3)), None);
        assert_eq!(PolicyOverrides::default().max_active_runs(Some(3)), Some(3));
        assert_eq!(o.apply(RunPolicy::default()).priority, 7);
    }

    #[test]
    fn overlap_round_trips() {
        for p in [
            OverlapPolicy::Skip,
            OverlapPolicy::Allow,
            OverlapPolicy::BufferOne,
            OverlapPolicy::CancelPrevious,
        ] {
            assert_eq!(OverlapPolicy::parse(p.as_str()), Some(p));
        }
    }
}
