//! Run vocabulary shared by the scheduler, the executor, the API and the
//! database layer: why sked itself skipped, cancelled or ended a run
//! ([`RunReason`]), and the runs to create ([`NewRun`]) with the rules each
//! kind of creation follows (state, attempt, backoff).

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use super::policy::jitter_from_id;
use super::{Handler, Run, RunPolicy, RunState, RunTrigger};

/// Why sked skipped, cancelled or ended a run, as stored in `runs.reason`,
/// `runs.cancel_reason` and `state_changed` events (glossary: "reason").
///
/// The stored text ([`RunReason::as_str`]) is fixed: rows written by older
/// nodes keep parsing. A reason column may also hold free text that is not
/// one of these (a failed attempt's message, a CancelRun caller's reason);
/// [`RunReason::parse`] answers `None` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunReason {
    /// A fire skipped, or a run cancelled, by the binding's overlap policy.
    Overlap,
    /// A fire time that passed while no node could fire it, outside the
    /// catch-up window (a summary row starts with `misfire:` too).
    Misfire,
    /// A fire skipped because its tenant's hourly budget was spent.
    Quota,
    /// Runs a DeleteBinding (or a forced DeleteDefinition) ended: waiting
    /// ones `CANCELLED` at once, running ones cancelled on their node. Not
    /// retried.
    BindingDeleted,
    /// Runs cancelled by their node's shutdown (retried per policy).
    Shutdown,
    /// Runs whose node stopped renewing their lease, ended `FAILED` by a
    /// reaper (retried per policy).
    NodeLost,
    /// A run ended `FAILED` because its stored data cannot be read (not
    /// retried: its policy cannot be read either).
    Corrupt,
    /// A run that outlived its timeout (`TIMED_OUT`).
    Timeout,
    /// A CancelRun that gave no reason of its own.
    Cancelled,
    /// A run this node stopped because another node's reaper took it; the
    /// reaper's state stands, so this text is never stored.
    LeaseLost,
    /// An `http` run whose target resolved only to addresses the node's
    /// SSRF guard refuses (`FAILED`, no connection made, not retried).
    SsrfBlocked,
    /// A worker run whose lease expired (its worker stopped heartbeating or
    /// its stream dropped and did not come back), ended `FAILED` by a
    /// reaper (retried per policy).
    WorkerLost,
    /// A worker run that waited `QUEUED` longer than its schedule-to-start
    /// timeout because no worker took it; ended `FAILED` (retried per
    /// policy).
    NoWorker,
}

impl RunReason {
    /// Every reason, for tests and exhaustive lookups.
    pub const ALL: [RunReason; 13] = [
        RunReason::Overlap,
        RunReason::Misfire,
        RunReason::Quota,
        RunReason::BindingDeleted,
        RunReason::Shutdown,
        RunReason::NodeLost,
        RunReason::Corrupt,
        RunReason::Timeout,
        RunReason::Cancelled,
        RunReason::LeaseLost,
        RunReason::SsrfBlocked,
        RunReason::WorkerLost,
        RunReason::NoWorker,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            RunReason::Overlap => "overlap",
            RunReason::Misfire => "misfire",
            RunReason::Quota => "quota",
            RunReason::BindingDeleted => "binding_deleted",
            RunReason::Shutdown => "shutdown",
            RunReason::NodeLost => "node_lost",
            RunReason::Corrupt => "corrupt",
            RunReason::Timeout => "timeout",
            RunReason::Cancelled => "cancelled",
            RunReason::LeaseLost => "lease lost",
            RunReason::SsrfBlocked => "ssrf_blocked",
            RunReason::WorkerLost => "worker_lost",
            RunReason::NoWorker => "no_worker",
        }
    }

    /// Parses the stored text; `None` for free text (a failure message, a
    /// caller's cancel reason).
    pub fn parse(s: &str) -> Option<RunReason> {
        RunReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for RunReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a new run snapshots from its binding and definition.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Owner.
    pub tenant_id: String,
    /// Producing binding.
    pub binding_id: Uuid,
    /// Definition name.
    pub definition: String,
    /// Handler snapshot.
    pub handler: Handler,
    /// Params snapshot (already merged).
    pub params: serde_json::Value,
    /// Policy snapshot.
    pub policy: RunPolicy,
}

/// A run to create: `QUEUED` (due), `SCHEDULED` (for a future time) or
/// `SKIPPED` (a fire that deliberately does not run, with a reason). The
/// constructors own the rules of each kind; the database layer inserts it
/// (`db::runs::run_insert`).
#[derive(Debug, Clone)]
pub struct NewRun {
    /// UUIDv7.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// Producing binding.
    pub binding_id: Uuid,
    /// Definition name.
    pub definition: String,
    /// What created it.
    pub trigger: RunTrigger,
    /// Fire time (manual: trigger or run time; retry: the end of its backoff).
    pub scheduled_time: DateTime<Utc>,
    /// Claimed no earlier than this (fire time + jitter, retry backoff, run_time).
    pub not_before: DateTime<Utc>,
    /// Handler snapshot.
    pub handler: Handler,
    /// Params snapshot.
    pub params: serde_json::Value,
    /// `Queued`, `Scheduled` or `Skipped`.
    pub state: RunState,
    /// Why it is skipped (empty otherwise).
    pub reason: String,
    /// 1-based attempt.
    pub attempt: i32,
    /// Previous attempt, for retries.
    pub retry_of: Option<Uuid>,
    /// Policy snapshot.
    pub policy: RunPolicy,
    /// TriggerRun's idempotency key.
    pub idempotency_key: Option<String>,
    /// An explicit request (TriggerRun, RetryRun): it may start while its
    /// binding is paused or disabled (see `db::runs::run_claim`). A retry
    /// is manual also when the attempt it retries (`retry_of`) was.
    pub manual: bool,
}

impl NewRun {
    /// A first attempt of `spec` with id `id`, `QUEUED` at `time`, not
    /// manual.
    fn first(id: Uuid, spec: RunSpec, trigger: RunTrigger, time: DateTime<Utc>) -> NewRun {
        NewRun {
            id,
            tenant_id: spec.tenant_id,
            binding_id: spec.binding_id,
            definition: spec.definition,
            trigger,
            scheduled_time: time,
            not_before: time,
            handler: spec.handler,
            params: spec.params,
            state: RunState::Queued,
            reason: String::new(),
            attempt: 1,
            retry_of: None,
            policy: spec.policy,
            idempotency_key: None,
            manual: false,
        }
    }

    /// The scheduler's run `id` for fire time `fire_time`: `QUEUED`,
    /// claimable from `fire_time + jitter` (the schedule's jitter for this
    /// binding and fire time, so every node agrees).
    ///
    /// Every constructor takes the new run's `id`: a UUIDv7 from the node's
    /// clock ([`super::Clock::new_id`]), made when the run is created (its
    /// day is the `run_events` partition of the run's events).
    pub fn fire(id: Uuid, spec: RunSpec, fire_time: DateTime<Utc>, jitter: TimeDelta) -> NewRun {
        let mut run = NewRun::first(id, spec, RunTrigger::Schedule, fire_time);
        run.not_before = fire_time + jitter;
        run
    }

    /// This fire recorded as `SKIPPED` with `reason` (a [`RunReason`], or
    /// a misfire summary row) instead of running.
    pub fn skipped(mut self, reason: impl Into<String>) -> NewRun {
        self.state = RunState::Skipped;
        self.reason = reason.into();
        self
    }

    /// TriggerRun's run: manual, `SCHEDULED` for `run_time` when that lies
    /// after `now`, else `QUEUED` at `now`.
    pub fn trigger(
        id: Uuid,
        spec: RunSpec,
        now: DateTime<Utc>,
        run_time: Option<DateTime<Utc>>,
        idempotency_key: Option<String>,
    ) -> NewRun {
        let (state, at) = match run_time {
            Some(t) if t > now => (RunState::Scheduled, t),
            _ => (RunState::Queued, now),
        };
        let mut run = NewRun::first(id, spec, RunTrigger::Manual, at);
        run.state = state;
        run.idempotency_key = idempotency_key;
        run.manual = true;
        run
    }

    /// BackfillRuns' run for the past fire time `fire_time`: `QUEUED`, not
    /// manual (a paused binding holds it back like a scheduled fire).
    pub fn backfill(id: Uuid, spec: RunSpec, fire_time: DateTime<Utc>) -> NewRun {
        NewRun::first(id, spec, RunTrigger::Backfill, fire_time)
    }

    /// The automatic retry of `ended` (a run that just reached its terminal
    /// state), if its policy allows one (`docs/semantics.md`, "Run
    /// lifecycle"): `FAILED` or `TIMED_OUT` (including `node_lost`), or
    /// `CANCELLED` by a shutdown, with `attempt < max_attempts` and a
    /// `retryable` failure. The retry is a new run, `trigger = RETRY`,
    /// `attempt + 1`, `retry_of` = `ended`, `SCHEDULED` at `now` + backoff
    /// (±10 % jitter drawn from the new run's id `id`); its `scheduled_time`
    /// (fire time) is that same instant, the end of its backoff. Runs
    /// cancelled by CancelRun, an overlap policy or a deleted binding (or
    /// with such a cancel pending when they ended) are not retried.
    pub fn retry_of(id: Uuid, ended: &Run, retryable: bool, now: DateTime<Utc>) -> Option<NewRun> {
        let retry_state = match ended.state {
            RunState::Failed | RunState::TimedOut => true,
            RunState::Cancelled => ended.reason.as_deref() == Some(RunReason::Shutdown.as_str()),
            _ => false,
        };
        let max = ended.policy.retry.max_attempts as i32;
        // A cancel was asked for (CancelRun, overlap, binding deleted) while it
        // ran: whatever it ended with, the caller wanted it stopped.
        if !retry_state || !retryable || ended.attempt >= max || ended.cancel_reason.is_some() {
            return None;
        }
        let delay = ended
            .policy
            .retry
            .backoff(ended.attempt as u32, jitter_from_id(&id));
        let backoff_end = now + TimeDelta::from_std(delay).unwrap_or(TimeDelta::zero());
        let mut run = NewRun::next_attempt(id, ended, backoff_end);
        run.state = RunState::Scheduled;
        run.manual = false;
        Some(run)
    }

    /// RetryRun's run `id`: the next attempt of the ended run `prev`, `QUEUED`
    /// at `now`, manual; its max attempts raised to fit when `prev` was the
    /// last one its policy allowed.
    pub fn manual_retry(id: Uuid, prev: &Run, now: DateTime<Utc>) -> NewRun {
        let mut run = NewRun::next_attempt(id, prev, now);
        run.policy.retry.max_attempts = run.policy.retry.max_attempts.max(prev.attempt as u32 + 1);
        run.manual = true;
        run
    }

    /// Attempt `prev.attempt + 1` of `prev`, `QUEUED` at `at`.
    fn next_attempt(id: Uuid, prev: &Run, at: DateTime<Utc>) -> NewRun {
        NewRun {
            id,
            tenant_id: prev.tenant_id.clone(),
            binding_id: prev.binding_id,
            definition: prev.definition.clone(),
            trigger: RunTrigger::Retry,
            scheduled_time: at,
            not_before: at,
            handler: prev.handler.clone(),
            params: prev.params.clone(),
            state: RunState::Queued,
            reason: String::new(),
            attempt: prev.attempt + 1,
            retry_of: Some(prev.id),
            policy: prev.policy,
            idempotency_key: None,
            manual: false,
        }
    }

    /// Marks the `QUEUED` runs of `event` handlers in `runs` that can start
    /// at once (`not_before <= now`) and whose tenant is not in `limited`
    /// (tenants with a `max_concurrent_runs` quota, whose runs must wait for
    /// a slot) as completed: `db::runs::run_insert` then writes them
    /// `SUCCEEDED` with their `fired` event, in the inserting transaction.
    /// Such a run does nothing but publish, so claiming it separately would
    /// only cost two more writes of its row. The caller decides that the
    /// runs may start at all (binding and definition enabled, binding not
    /// paused) and holds that true until its commit.
    pub fn complete_inline(runs: &mut [NewRun], limited: &[String], now: DateTime<Utc>) {
        for r in runs.iter_mut() {
            if r.state == RunState::Queued
                && r.handler == Handler::Event
                && r.not_before <= now
                && !limited.contains(&r.tenant_id)
            {
                r.state = RunState::Succeeded;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_round_trips_and_is_unchanged() {
        for r in RunReason::ALL {
            assert_eq!(RunReason::parse(r.as_str()), Some(r));
        }
        // Existing rows hold these spellings; they must never change.
        assert_eq!(RunReason::NodeLost.as_str(), "node_lost");
        assert_eq!(RunReason::BindingDeleted.as_str(), "binding_deleted");
        assert_eq!(RunReason::parse("exit code 1"), None);
    }

    fn spec() -> RunSpec {
        RunSpec {
            tenant_id: "t".into(),
            binding_id: Uuid::now_v7(),
            definition: "d".into(),
            handler: Handler::Command(crate::domain::CommandHandler {
                program: "true".into(),
                args: vec![],
                env: Default::default(),
                working_dir: String::new(),
                max_output_bytes: None,
                non_retryable_exit_codes: vec![],
            }),
            params: serde_json::json!({"a": 1}),
            policy: RunPolicy::default(),
        }
    }

    #[test]
    fn constructors_own_state_trigger_and_times() {
        let now = Utc::now();
        let later = now + TimeDelta::seconds(60);

        let f = NewRun::fire(Uuid::now_v7(), spec(), now, TimeDelta::milliseconds(250));
        assert_eq!(
            (f.state, f.trigger, f.attempt),
            (RunState::Queued, RunTrigger::Schedule, 1)
        );
        assert_eq!(f.scheduled_time, now);
        assert_eq!(f.not_before, now + TimeDelta::milliseconds(250));
        assert!(!f.manual);
        let s = f.skipped(RunReason::Overlap.as_str());
        assert_eq!((s.state, s.reason.as_str()), (RunState::Skipped, "overlap"));

        let t = NewRun::trigger(Uuid::now_v7(), spec(), now, Some(later), Some("k".into()));
        assert_eq!(
            (t.state, t.trigger),
            (RunState::Scheduled, RunTrigger::Manual)
        );
        assert_eq!((t.scheduled_time, t.not_before), (later, later));
        assert!(t.manual);
        assert_eq!(t.idempotency_key.as_deref(), Some("k"));
        let t = NewRun::trigger(Uuid::now_v7(), spec(), later, Some(now), None);
        assert_eq!(
            (t.state, t.not_before),
            (RunState::Queued, later),
            "a past run_time runs now"
        );

        let b = NewRun::backfill(Uuid::now_v7(), spec(), now);
        assert_eq!(
            (b.state, b.trigger, b.not_before),
            (RunState::Queued, RunTrigger::Backfill, now)
        );
        assert!(!b.manual);
    }

    #[test]
    fn only_due_event_runs_of_unlimited_tenants_complete_inline() {
        let now = Utc::now();
        let event = |tenant: &str, at: DateTime<Utc>| {
            let mut s = spec();
            s.handler = Handler::Event;
            s.tenant_id = tenant.into();
            NewRun::backfill(Uuid::now_v7(), s, at)
        };
        let mut runs = vec![
            event("t", now),
            event("t", now + TimeDelta::milliseconds(1)),
            event("limited", now),
            NewRun::backfill(Uuid::now_v7(), spec(), now),
            event("t", now).skipped(RunReason::Quota.as_str()),
        ];
        NewRun::complete_inline(&mut runs, &["limited".to_string()], now);
        let states: Vec<RunState> = runs.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [
                RunState::Succeeded,
                RunState::Queued,
                RunState::Queued,
                RunState::Queued,
                RunState::Skipped
            ]
        );
    }
}
