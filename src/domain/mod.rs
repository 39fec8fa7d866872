//! Pure types and rules of sked: definitions, bindings, runs, run events,
//! schedules, and the params merge. No I/O here: no sqlx, tonic or tokio, so
//! every rule can be unit-tested in isolation.

pub mod clock;
pub mod cluster;
pub mod http;
pub mod misfire;
pub mod notify;
pub mod policy;
pub mod progress;
pub mod retention;
pub mod run;
pub mod schedule;
pub mod stats;
pub mod tenancy;
pub mod workflow;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use clock::Clock;
pub use http::{HttpAllow, HttpHandler, HttpMethod};
pub use misfire::{FirePlan, MisfireMode, MisfirePolicy, plan_fires};
pub use policy::{OverlapPolicy, RetryPolicy, RunPolicy};
pub use progress::{MAX_PROGRESS_MESSAGE, Progress, parse_progress_line};
pub use run::{NewRun, RunReason, RunSpec};
pub use schedule::{Schedule, ScheduleError, ScheduleKind};
pub use stats::{BindingStatus, LastRun, RunOutcomes};
pub use tenancy::{Role, TenantScope};
pub use workflow::{OnFailure, WorkflowHandler, WorkflowStep};

/// A request value that breaks a rule: `field` is the API path (e.g.
/// `definition.name`), `reason` a sentence a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldViolation {
    /// API field path, e.g. `binding.schedule.cron.expression`.
    pub field: String,
    /// Why the value is rejected.
    pub reason: String,
}

impl FieldViolation {
    /// Builds a violation for `field` with `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<ScheduleError> for FieldViolation {
    fn from(e: ScheduleError) -> Self {
        Self {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// Longest prefix of an offending value quoted in an error message, in chars.
pub const QUOTE_CHARS: usize = 40;

/// `s` for an error message: whole when short, else its first
/// [`QUOTE_CHARS`] characters and its length, e.g. `"aaaa…" (1048576 bytes)`.
pub fn quote(s: &str) -> String {
    if s.chars().count() <= QUOTE_CHARS {
        format!("{s:?}")
    } else {
        let prefix: String = s.chars().take(QUOTE_CHARS).collect();
        format!("{:?} ({} bytes)", format!("{prefix}…"), s.len())
    }
}

/// Checks a definition name: `[a-z0-9][a-z0-9._-]{0,127}`.
///
/// # Errors
/// A [`FieldViolation`] on `field` saying which rule failed.
pub fn validate_definition_name(field: &str, name: &str) -> Result<(), FieldViolation> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'));
    if name.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if !(ok_first && ok_rest) || name.len() > 128 {
        return Err(FieldViolation::new(
            field,
            format!("{} must match [a-z0-9][a-z0-9._-]{{0,127}}", quote(name)),
        ));
    }
    Ok(())
}

/// Longest name of a worker (`Hello.worker_name`) or of a node
/// (`--node-id`), in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// Whether `name` is a worker's or a node's name: 1 to
/// [`MAX_NAME_CHARS`] characters of `[A-Za-z0-9._:-]`. A node's name
/// prefixes its event announcements (`<node>|<run>:...`), so it never
/// holds their separators `|` and `,`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_CHARS && name.chars().all(is_name_char)
}

/// Whether `c` may appear in a worker's or a node's name
/// (`[A-Za-z0-9._:-]`, see [`is_valid_name`]).
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Checks a tenant id: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
///
/// # Errors
/// A [`FieldViolation`] on `field` saying which rule failed.
pub fn validate_tenant_id(field: &str, tenant: &str) -> Result<(), FieldViolation> {
    let ok_first = tenant
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = tenant
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if tenant.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if !(ok_first && ok_rest) || tenant.len() > 64 {
        return Err(FieldViolation::new(
            field,
            format!(
                "{} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}",
                quote(tenant)
            ),
        ));
    }
    Ok(())
}

/// How a run executes (`docs/semantics.md`, "Handlers"). Stored as JSON, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Handler {
    /// Run a program as a child process.
    Command(CommandHandler),
    /// Publish a `fired` event with the run's params and succeed at once
    /// sked as a tick source. Completed in batches without a task
    /// per run: in the firing transaction ([`crate::scheduler`]) or in the
    /// claim statement ([`crate::executor`]).
    Event,
    /// Call an HTTP(S) endpoint with the run's params ([`http`]).
    Http(HttpHandler),
    /// Hand the run to a worker process connected to WorkerService for the
    /// queue (`crate::usecase::workers`).
    Worker(WorkerHandler),
    /// A DAG of steps, each run as a child run ([`workflow`]); the run
    /// itself executes nothing and ends when its steps have.
    Workflow(WorkflowHandler),
}

/// A run executed by a worker of `queue` (`docs/semantics.md`, "Workers").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHandler {
    /// Queue name: 1-128 characters of `[A-Za-z0-9._-]`.
    pub queue: String,
    /// Seconds a run may wait `QUEUED` for a worker before it ends `FAILED`
    /// with reason `no_worker` ([`MIN_SCHEDULE_TO_START_SECS`] ..=
    /// [`MAX_SCHEDULE_TO_START_SECS`]); `None` =
    /// [`DEFAULT_SCHEDULE_TO_START_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_to_start_secs: Option<u32>,
}

/// Default schedule-to-start timeout of a worker run: 10 minutes. Held in
/// SQL too, by `sked_start_deadline` (migration 20261212000200), which the
/// reaper's index is keyed by; a test compares the two.
pub const DEFAULT_SCHEDULE_TO_START_SECS: u32 = 600;
/// Shortest schedule-to-start timeout: 1 s.
pub const MIN_SCHEDULE_TO_START_SECS: u32 = 1;
/// Longest schedule-to-start timeout: 24 h.
pub const MAX_SCHEDULE_TO_START_SECS: u32 = 86_400;

/// Checks a worker queue name: 1-128 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// A violation on `field`.
pub fn validate_queue(field: &str, queue: &str) -> Result<(), FieldViolation> {
    if queue.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if queue.len() > 128
        || !queue
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(FieldViolation::new(
            field,
            format!("{} must match [A-Za-z0-9._-]{{1,128}}", quote(queue)),
        ));
    }
    Ok(())
}

/// A child process: `program` with `args`, no shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandHandler {
    /// Path or name looked up in PATH; never empty.
    pub program: String,
    /// Arguments, passed verbatim.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; empty = the node's.
    #[serde(default)]
    pub working_dir: String,
    /// Bytes of log lines stored per run at most ([`MIN_OUTPUT_BYTES`] ..=
    /// [`MAX_OUTPUT_BYTES`]); `None` = [`DEFAULT_MAX_OUTPUT_BYTES`]. Set only
    /// in a run's snapshot of the handler, from its definition's
    /// [`Definition::max_output_bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
    /// Exit codes after which a failed run is not retried (at most
    /// [`MAX_NON_RETRYABLE_EXIT_CODES`], each 1..=255), as given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_retryable_exit_codes: Vec<i32>,
}

impl CommandHandler {
    /// Whether a process that exited with `code` must not be retried.
    pub fn is_non_retryable(&self, code: i32) -> bool {
        self.non_retryable_exit_codes.contains(&code)
    }
}

/// Most exit codes a command may list as non-retryable.
pub const MAX_NON_RETRYABLE_EXIT_CODES: usize = 32;

/// Most bytes of a command's program, args and env together (each with its
/// terminator): 256 KiB, well inside Linux's argument space (2 MiB with the
/// default 8 MiB stack), leaving room for the node's own environment and
/// `SKED_PARAMS` (≤ 32 KiB).
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;

/// Default per-run cap on stored output: 64 MiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 64 << 20;
/// Smallest accepted per-run output cap: 1 KiB.
pub const MIN_OUTPUT_BYTES: u64 = 1 << 10;
/// Largest accepted per-run output cap: 1 GiB.
pub const MAX_OUTPUT_BYTES: u64 = 1 << 30;

/// Checks a per-run output cap given for `field`.
///
/// # Errors
/// A [`FieldViolation`] on `field` outside [`MIN_OUTPUT_BYTES`] ..=
/// [`MAX_OUTPUT_BYTES`].
pub fn validate_max_output_bytes(field: &str, bytes: u64) -> Result<(), FieldViolation> {
    if (MIN_OUTPUT_BYTES..=MAX_OUTPUT_BYTES).contains(&bytes) {
        Ok(())
    } else {
        Err(FieldViolation::new(
            field,
            format!(
                "must be between {MIN_OUTPUT_BYTES} and {MAX_OUTPUT_BYTES} bytes (1 KiB to 1 GiB)"
            ),
        ))
    }
}

impl Handler {
    /// Its stored tag (`handler->>'kind'`): `command`, `event`, `http`,
    /// `worker` or `workflow`.
    pub fn kind(&self) -> &'static str {
        match self {
            Handler::Command(_) => "command",
            Handler::Event => "event",
            Handler::Http(_) => "http",
            Handler::Worker(_) => "worker",
            Handler::Workflow(_) => "workflow",
        }
    }

    /// Sets the per-run output cap of a command (and of a workflow's
    /// command steps), as a run snapshots it from its definition.
    pub fn set_output_cap(&mut self, cap: Option<u64>) {
        match self {
            Handler::Command(c) => c.max_output_bytes = cap,
            Handler::Workflow(w) => {
                for h in w.steps.iter_mut().filter_map(|s| s.handler.as_mut()) {
                    h.set_output_cap(cap);
                }
            }
            _ => {}
        }
    }

    /// Checks the handler; `prefix` is the API path of the handler's parent
    /// (e.g. `definition`).
    ///
    /// # Errors
    /// A [`FieldViolation`], e.g. `definition.command.program: is required`.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldViolation> {
        match self {
            Handler::Event => Ok(()),
            Handler::Workflow(w) => w.validate(&format!("{prefix}.workflow")),
            Handler::Http(h) => h.validate(&format!("{prefix}.http")),
            Handler::Worker(w) => {
                validate_queue(&format!("{prefix}.worker.queue"), &w.queue)?;
                if let Some(t) = w.schedule_to_start_secs
                    && !(MIN_SCHEDULE_TO_START_SECS..=MAX_SCHEDULE_TO_START_SECS).contains(&t)
                {
                    return Err(FieldViolation::new(
                        format!("{prefix}.worker.schedule_to_start_timeout"),
                        format!("{t} s is outside 1 s ..= 24 h"),
                    ));
                }
                Ok(())
            }
            Handler::Command(c) => {
                if c.program.trim().is_empty() {
                    return Err(FieldViolation::new(
                        format!("{prefix}.command.program"),
                        "is required",
                    ));
                }
                if c.program.contains('\0') || c.args.iter().any(|a| a.contains('\0')) {
                    return Err(FieldViolation::new(
                        format!("{prefix}.command"),
                        "must not contain NUL bytes",
                    ));
                }
                for k in c.env.keys() {
                    if k.is_empty() || k.contains('=') || k.contains('\0') {
                        return Err(FieldViolation::new(
                            format!("{prefix}.command.env"),
                            format!("{} is not a valid environment variable name", quote(k)),
                        ));
                    }
                }
                // What exec(2) takes: every argument and variable with its
                // terminator (and `=`) must fit the kernel's argument space
                // with room for sked's own variables and SKED_PARAMS.
                let total: usize = c.program.len()
                    + 1
                    + c.args.iter().map(|a| a.len() + 1).sum::<usize>()
                    + c.env
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 2)
                        .sum::<usize>();
                if total > MAX_COMMAND_BYTES {
                    return Err(FieldViolation::new(
                        format!("{prefix}.command"),
                        format!(
                            "program, args and env take {total} bytes; at most {MAX_COMMAND_BYTES} (256 KiB) in all, so the process can start"
                        ),
                    ));
                }
                let codes = &c.non_retryable_exit_codes;
                let field = format!("{prefix}.command.non_retryable_exit_codes");
                if codes.len() > MAX_NON_RETRYABLE_EXIT_CODES {
                    return Err(FieldViolation::new(
                        field,
                        format!(
                            "has {} codes; at most {MAX_NON_RETRYABLE_EXIT_CODES}",
                            codes.len()
                        ),
                    ));
                }
                if let Some((i, code)) = codes
                    .iter()
                    .enumerate()
                    .find(|(_, c)| !(1..=255).contains(*c))
                {
                    return Err(FieldViolation::new(
                        format!("{field}[{i}]"),
                        format!("{code} is not an exit code a process can fail with (1 to 255)"),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Merges `patch` over `target` with JSON Merge Patch (RFC 7396): objects merge
/// key by key, `null` removes a key, anything else replaces.
pub fn merge_params(target: &serde_json::Value, patch: &serde_json::Value) -> serde_json::Value {
    let mut out = target.clone();
    json_patch::merge(&mut out, patch);
    out
}

/// Largest params a run receives (the merge of definition, binding and
/// trigger params), in bytes of compact JSON: 64 KiB.
pub const MAX_MERGED_PARAMS_BYTES: usize = 64 * 1024;

/// Checks that merged `params` stay within [`MAX_MERGED_PARAMS_BYTES`].
///
/// # Errors
/// A violation on `field` giving the merged size and the limit.
pub fn validate_merged_params(
    field: &str,
    params: &serde_json::Value,
) -> Result<(), FieldViolation> {
    let len = serde_json::to_vec(params).map_or(usize::MAX, |v| v.len());
    if len > MAX_MERGED_PARAMS_BYTES {
        return Err(FieldViolation::new(
            field,
            format!(
                "as the JSON a run receives (merged with the params it overrides) is {len} bytes; at most {MAX_MERGED_PARAMS_BYTES} bytes (64 KiB)"
            ),
        ));
    }
    Ok(())
}

/// A task definition (platform-level): what to run and its default schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    /// Unique, immutable key.
    pub name: String,
    /// For people.
    pub display_name: String,
    /// For people.
    pub description: String,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// How runs execute.
    pub handler: Handler,
    /// Default schedule of bindings.
    pub schedule: Schedule,
    /// Default params, a JSON object.
    pub params: serde_json::Value,
    /// What happens to fire times missed while sked was down or behind.
    pub misfire_policy: MisfirePolicy,
    /// Overlap, retry, timeout and priority of its runs.
    pub policy: RunPolicy,
    /// A disabled definition fires for no tenant (manual triggers still work).
    pub enabled: bool,
    /// A protected definition cannot be deleted, only disabled.
    pub protected: bool,
    /// Which tenants may bind it (checked on bind; tenant keys see only
    /// definitions in scope).
    pub tenant_scope: TenantScope,
    /// Most active runs (`QUEUED`, `RUNNING`, `SCHEDULED` retries) of one
    /// binding under overlap policy `ALLOW`, 1 to
    /// [`policy::MAX_ACTIVE_RUNS`]; `None` = no cap. Fires beyond it are
    /// `SKIPPED` with reason `overlap`.
    pub max_active_runs: Option<u32>,
    /// Bytes of log output stored per run at most ([`MIN_OUTPUT_BYTES`]
    /// ..= [`MAX_OUTPUT_BYTES`]); `None` = [`DEFAULT_MAX_OUTPUT_BYTES`].
    pub max_output_bytes: Option<u64>,
    /// Set by the database layer.
    pub create_time: DateTime<Utc>,
    /// Set by the database layer.
    pub update_time: DateTime<Utc>,
    /// Bumped on each update; rendered as the etag.
    pub version: i64,
}

impl Definition {
    /// The handler as a run snapshots it: a command (a workflow's command
    /// steps too) carries the definition's output cap.
    pub fn run_handler(&self) -> Handler {
        let mut h = self.handler.clone();
        h.set_output_cap(self.max_output_bytes);
        h
    }
}

/// A tenant's use of a definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// Binding id.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// Definition name.
    pub definition: String,
    /// Schedule override, as given.
    pub schedule: Option<Schedule>,
    /// Params patch, as given (a JSON object).
    pub params: Option<serde_json::Value>,
    /// Fires only at or after this instant.
    pub effective_from: Option<DateTime<Utc>>,
    /// Fires only at or before this instant.
    pub effective_until: Option<DateTime<Utc>>,
    /// The schedule in force: override or definition's, anchor resolved, and
    /// clipped to the effective window (see [`effective_schedule`]).
    pub effective_schedule: Schedule,
    /// Definition params merged with `params` (RFC 7396).
    pub effective_params: serde_json::Value,
    /// A disabled binding does not fire (manual triggers still work).
    pub enabled: bool,
    /// A paused binding does not fire; fires that fall in the pause are
    /// neither caught up nor recorded.
    pub paused: bool,
    /// Why it was paused (free text).
    pub pause_note: String,
    /// When a pause ends by itself; `None` = until ResumeBinding.
    pub pause_expire_time: Option<DateTime<Utc>>,
    /// The binding's own policy values (`None` fields inherit).
    pub overrides: policy::PolicyOverrides,
    /// The run policy in force: the definition's with `overrides` applied.
    pub effective_policy: RunPolicy,
    /// The active-run cap in force (`None` = no cap): the override's, else
    /// the definition's.
    pub effective_max_active_runs: Option<u32>,
    /// Next fire time; `None` = will not fire again.
    pub next_run_time: Option<DateTime<Utc>>,
    /// Creation instant.
    pub create_time: DateTime<Utc>,
    /// Last update instant.
    pub update_time: DateTime<Utc>,
    /// Bumped on each update; rendered as the etag.
    pub version: i64,
    /// Why the binding's stored data cannot be read or computed (it is out
    /// of scheduling then, and only Get, List and Delete work on it); `None`
    /// for a healthy binding. At most 500 characters.
    pub broken_reason: Option<String>,
    /// Whether its definition is enabled (a disabled one fires for no
    /// tenant).
    pub definition_enabled: bool,
    /// What its runs came to (kept as they end).
    pub outcomes: RunOutcomes,
}

impl Binding {
    /// Whether a pause with an expiry at or before `now` is still recorded
    /// (it is over; the scheduler clears it at the next fire).
    pub fn pause_expired(&self, now: DateTime<Utc>) -> bool {
        self.paused && self.pause_expire_time.is_some_and(|e| e <= now)
    }
    /// Ends the pause: not paused, no note, no expiry.
    pub fn end_pause(&mut self) {
        self.paused = false;
        self.pause_note.clear();
        self.pause_expire_time = None;
    }

    /// Its status at `now` ([`stats::binding_status`]; precedence in
    /// [`BindingStatus`]).
    pub fn status(&self, now: DateTime<Utc>) -> BindingStatus {
        stats::binding_status(stats::StatusInputs {
            broken: self.broken_reason.is_some(),
            enabled: self.enabled,
            definition_enabled: self.definition_enabled,
            paused: self.paused && !self.pause_expired(now),
            past_window: self.effective_until.is_some_and(|u| u <= now),
            has_next_run_time: self.next_run_time.is_some(),
            manual: self.effective_schedule.kind == ScheduleKind::Manual,
            consecutive_failures: self.outcomes.consecutive_failures,
        })
    }
}

/// The schedule a binding actually fires on: `base` (its override or the
/// definition's) with an unanchored interval anchored at `anchor`, and its
/// `start_time`/`end_time` narrowed to the binding's effective window, so a
/// binding outside its window simply has no next fire time.
pub fn effective_schedule(
    base: &Schedule,
    anchor: DateTime<Utc>,
    from: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Schedule {
    let mut s = base.clone().resolve_anchor(anchor);
    s.start_time = match (s.start_time, from) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    s.end_time = match (s.end_time, until) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    s
}

/// Checks a binding's effective window.
///
/// # Errors
/// A violation on `binding.effective_until` when it is not after
/// `effective_from`.
pub fn validate_effective_window(
    from: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<(), FieldViolation> {
    match (from, until) {
        (Some(f), Some(u)) if u <= f => Err(FieldViolation::new(
            "binding.effective_until",
            "must be after binding.effective_from",
        )),
        _ => Ok(()),
    }
}

/// Run lifecycle state (`docs/semantics.md`, "Run lifecycle"):
///
/// ```text
/// SCHEDULED ──► QUEUED ──► RUNNING ──► SUCCEEDED | FAILED | TIMED_OUT | CANCELLED
///     │            │                                               ▲
///     └────────────┴──────────── CancelRun ────────────────────────┘
/// SKIPPED: a fire that deliberately did not run (always with a reason)
/// ```
///
/// Terminal states are never overwritten: every transition is a conditional
/// update on the expected state and attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    /// Created for a future time (retry backoff, delayed trigger).
    Scheduled,
    /// Due, waiting for an executor slot.
    Queued,
    /// Executing on a node.
    Running,
    /// Ended well.
    Succeeded,
    /// Ended with an error.
    Failed,
    /// Ran past its timeout and was terminated.
    TimedOut,
    /// Cancelled (CancelRun, overlap policy, shutdown), with the reason.
    Cancelled,
    /// A fire that deliberately did not run (reason: `misfire`, ...).
    Skipped,
}

impl RunState {
    /// The database spelling (`QUEUED`...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Scheduled => "SCHEDULED",
            RunState::Queued => "QUEUED",
            RunState::Running => "RUNNING",
            RunState::Succeeded => "SUCCEEDED",
            RunState::Failed => "FAILED",
            RunState::TimedOut => "TIMED_OUT",
            RunState::Cancelled => "CANCELLED",
            RunState::Skipped => "SKIPPED",
        }
    }
    /// Parses the database spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<RunState> {
        Some(match s {
            "SCHEDULED" => RunState::Scheduled,
            "QUEUED" => RunState::Queued,
            "RUNNING" => RunState::Running,
            "SUCCEEDED" => RunState::Succeeded,
            "FAILED" => RunState::Failed,
            "TIMED_OUT" => RunState::TimedOut,
            "CANCELLED" => RunState::Cancelled,
            "SKIPPED" => RunState::Skipped,
            _ => return None,
        })
    }
    /// True for states a run never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded
                | RunState::Failed
                | RunState::TimedOut
                | RunState::Cancelled
                | RunState::Skipped
        )
    }
}

/// What created a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunTrigger {
    /// The schedule fired.
    Schedule,
    /// TriggerRun.
    Manual,
    /// A retry of a failed attempt (automatic, or RetryRun).
    Retry,
    /// BackfillRuns.
    Backfill,
    /// A workflow step, created when its dependencies succeeded (its first
    /// attempt; retries are `Retry`).
    Step,
}

impl RunTrigger {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunTrigger::Schedule => "SCHEDULE",
            RunTrigger::Manual => "MANUAL",
            RunTrigger::Retry => "RETRY",
            RunTrigger::Backfill => "BACKFILL",
            RunTrigger::Step => "STEP",
        }
    }
    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<RunTrigger> {
        match s {
            "SCHEDULE" => Some(RunTrigger::Schedule),
            "MANUAL" => Some(RunTrigger::Manual),
            "RETRY" => Some(RunTrigger::Retry),
            "BACKFILL" => Some(RunTrigger::Backfill),
            "STEP" => Some(RunTrigger::Step),
            _ => None,
        }
    }
}

/// One attempt of one execution of a binding.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
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
    /// Current state.
    pub state: RunState,
    /// 1-based attempt.
    pub attempt: i32,
    /// The fire time it is for.
    pub scheduled_time: DateTime<Utc>,
    /// Row creation.
    pub create_time: DateTime<Utc>,
    /// RUNNING since.
    pub start_time: Option<DateTime<Utc>>,
    /// Terminal since.
    pub end_time: Option<DateTime<Utc>>,
    /// Handler snapshot.
    pub handler: Handler,
    /// Params snapshot.
    pub params: serde_json::Value,
    /// Result object, if any.
    pub result: Option<serde_json::Value>,
    /// Failure message.
    pub error_message: Option<String>,
    /// First 500 chars of stderr.
    pub error_summary: Option<String>,
    /// Exit code of the process.
    pub exit_code: Option<i32>,
    /// Executing node.
    pub node_id: Option<String>,
    /// Why it ended so.
    pub reason: Option<String>,
    /// Not claimed before this instant (jitter, retry backoff, delayed trigger).
    pub not_before: DateTime<Utc>,
    /// The previous attempt, for retries.
    pub retry_of: Option<Uuid>,
    /// Policies snapshotted at creation (`policy.retry.max_attempts` is the
    /// run's max_attempts).
    pub policy: RunPolicy,
    /// TriggerRun's idempotency key, if one was given.
    pub idempotency_key: Option<String>,
    /// Set while a cancel of this RUNNING run is pending.
    pub cancel_reason: Option<String>,
    /// The latest progress the run reported, if any.
    pub progress: Option<Progress>,
}

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// sked itself.
    System,
}

/// What happened to a run. Stored as the `payload` JSON of `run_events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A transition; `from` is `None` for the first event.
    StateChanged {
        /// Previous state.
        from: Option<RunState>,
        /// New state.
        to: RunState,
        /// Why, if there is a reason to give.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// A line of output, at most [`MAX_LOG_LINE`] bytes plus the cut marker.
    Log {
        /// Source stream.
        stream: LogStream,
        /// The line without its newline.
        message: String,
    },
    /// A run of the `event` handler fired, carrying its params.
    Fired {
        /// The run's params snapshot (a JSON object).
        params: serde_json::Value,
    },
    /// The run reported progress (a command's `::progress` line, a
    /// worker's report); the latest is also the run's `progress`.
    Progress(Progress),
    /// A failure notification about the run was delivered (a 2xx answer).
    NotificationDelivered(NotificationOutcome),
    /// A failure notification about the run could not be delivered: its
    /// last attempt failed (or its rule was deleted).
    NotificationFailed(NotificationOutcome),
}

/// What became of one notification ([`EventBody::NotificationDelivered`],
/// [`EventBody::NotificationFailed`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationOutcome {
    /// The notification's id.
    pub notification_id: Uuid,
    /// The rule that fired.
    pub rule: String,
    /// `failure`, `consecutive_failures` or `recovery`.
    pub event: String,
    /// Delivery attempts made.
    pub attempts: i32,
    /// HTTP status of the last attempt, 0 when none came.
    #[serde(default)]
    pub status_code: i32,
    /// Why the last attempt failed; empty when delivered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl EventBody {
    /// The `kind` column value.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::StateChanged { .. } => "state_changed",
            EventBody::Log { .. } => "log",
            EventBody::Fired { .. } => "fired",
            EventBody::Progress(_) => "progress",
            EventBody::NotificationDelivered(_) => "notification_delivered",
            EventBody::NotificationFailed(_) => "notification_failed",
        }
    }
    /// True for a transition into a terminal state: the run's last event.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventBody::StateChanged { to, .. } if to.is_terminal())
    }
}

/// Longest log line kept whole, in bytes (16 KiB; longer lines are cut with a marker).
pub const MAX_LOG_LINE: usize = 16 * 1024;

/// A persisted run event.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    /// Run.
    pub run_id: Uuid,
    /// Dense per-run position, from 1.
    pub seq: i64,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Owner.
    pub tenant_id: String,
    /// Producing binding.
    pub binding_id: Uuid,
    /// Definition name.
    pub definition: String,
    /// What happened.
    pub body: EventBody,
}

/// `s` with every NUL character replaced by U+FFFD: PostgreSQL text and
/// jsonb cannot hold NUL, and a command's output may contain it.
pub fn storable_text(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

/// `v` with NUL replaced by U+FFFD in every string and key (see
/// [`storable_text`]); a command's JSON result may spell it `\u0000`.
pub fn storable_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        J::String(s) => J::String(storable_text(s)),
        J::Array(a) => J::Array(a.into_iter().map(storable_json).collect()),
        J::Object(o) => J::Object(
            o.into_iter()
                .map(|(k, v)| (storable_text(k), storable_json(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Cuts `line` to [`MAX_LOG_LINE`] bytes (at a char boundary) and appends the
/// marker `…[truncated N bytes]` when it was longer.
pub fn cap_log_line(mut line: String, dropped_extra: usize) -> String {
    let total = line.len() + dropped_extra;
    if total <= MAX_LOG_LINE {
        return line;
    }
    let mut cut = MAX_LOG_LINE.min(line.len());
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line.truncate(cut);
    line.push_str(&format!("…[truncated {} bytes]", total - cut));
    line
}

/// A xorshift64 generator for the property tests: the same `seed` (not 0)
/// gives the same sequence on every machine, so a failing case replays.
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_follows_rfc7396() {
        let def = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]});
        let patch = json!({"b": {"c": null, "x": 9}, "e": [3], "f": "new"});
        assert_eq!(
            merge_params(&def, &patch),
            json!({"a": 1, "b": {"d": 3, "x": 9}, "e": [3], "f": "new"})
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_definition_name("definition.name", "billing.invoice-sweep").is_ok());
        let e = validate_definition_name("definition.name", "Bad Name").unwrap_err();
        assert_eq!(e.field, "definition.name");
        assert!(validate_definition_name("definition.name", "").is_err());
        assert!(validate_definition_name("definition.name", &"a".repeat(129)).is_err());
        assert!(validate_tenant_id("x-tenant-id", "acme").is_ok());
        assert!(validate_tenant_id("x-tenant-id", "a:b").is_err());
    }

    #[test]
    fn long_lines_are_cut_with_marker() {
        let s = "é".repeat(MAX_LOG_LINE); // 2 bytes each
        let out = cap_log_line(s, 0);
        assert!(out.ends_with(&format!("…[truncated {} bytes]", MAX_LOG_LINE)));
        assert!(out.len() < MAX_LOG_LINE + 40);
        assert_eq!(cap_log_line("short".into(), 0), "short");
    }

    #[test]
    fn empty_program_is_rejected() {
        let h = Handler::Command(CommandHandler {
            program: " ".into(),
            args: vec![],
            env: BTreeMap::new(),
            working_dir: String::new(),
            max_output_bytes: None,
            non_retryable_exit_codes: vec![],
        });
        assert_eq!(
            h.validate("definition").unwrap_err().field,
            "definition.command.program"
        );
    }

    #[test]
    fn a_handlers_kind_is_its_stored_tag() {
        let command = Handler::Command(CommandHandler {
            program: "sh".into(),
            args: vec![],
            env: BTreeMap::new(),
            working_dir: String::new(),
            max_output_bytes: None,
            non_retryable_exit_codes: vec![],
        });
        let worker = Handler::Worker(WorkerHandler {
            queue: "q".into(),
            schedule_to_start_secs: None,
        });
        let workflow: Handler = serde_json::from_value(serde_json::json!({
            "kind": "workflow",
            "steps": [{"name": "a", "handler": {"kind": "event"}}],
        }))
        .unwrap();
        for h in [command, Handler::Event, worker, workflow] {
            let stored = serde_json::to_value(&h).unwrap();
            assert_eq!(stored["kind"], h.kind(), "{stored}");
        }
    }

    #[test]
    fn non_retryable_exit_codes_are_bounded() {
        let h = |codes: Vec<i32>| {
            Handler::Command(CommandHandler {
                program: "sh".into(),
                args: vec![],
                env: BTreeMap::new(),
                working_dir: String::new(),
                max_output_bytes: None,
                non_retryable_exit_codes: codes,
            })
        };
        assert!(h(vec![1, 2, 255]).validate("definition").is_ok());
        assert!(h((1..=32).collect()).validate("definition").is_ok());
        assert_eq!(
            h((1..=33).collect())
                .validate("definition")
                .unwrap_err()
                .field,
            "definition.command.non_retryable_exit_codes"
        );
        for bad in [0, 256, -1, i32::MAX, i32::MIN] {
            assert_eq!(
                h(vec![2, bad]).validate("definition").unwrap_err().field,
                "definition.command.non_retryable_exit_codes[1]",
                "{bad}"
            );
        }
        let Handler::Command(c) = h(vec![2, 7]) else {
            unreachable!()
        };
        assert!(c.is_non_retryable(2) && c.is_non_retryable(7));
        assert!(!c.is_non_retryable(1));
    }
}
