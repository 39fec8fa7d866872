//! Runs a caller asks for: trigger, cancel, retry, backfill; and reading
//! them. Runs the scheduler creates from fire times are the engine's
//! (`scheduler`), retries after a failed attempt the executor's.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Actor, Core, Error, Page, Result, Target, audit, begin, commit, record};
use crate::db;
use crate::domain::{
    Binding, FieldViolation, Handler, NewRun, Progress, Run, RunEvent, RunReason, RunSpec,
    RunState, merge_params, validate_merged_params,
};

/// Most runs one backfill creates.
pub const MAX_BACKFILL: usize = 10_000;
/// A backfill of at least this many runs refreshes the statistics of the
/// runs table ([`db::runs::run_analyze_after_burst`]), so the claim's plans
/// fit the grown queue at once rather than after autovacuum.
const ANALYZE_AFTER: usize = 1000;
/// How long an idempotency key is remembered per binding, hours.
pub const IDEMPOTENCY_HOURS: i64 = 24;
/// Longest idempotency key, bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;
/// Longest cancel reason, characters.
pub const MAX_REASON: usize = 1000;

/// Checks an idempotency key: empty (none) or 1-200 printable ASCII
/// characters.
///
/// # Errors
/// `Invalid` on `idempotency_key` otherwise.
pub fn validate_idempotency_key(key: &str) -> Result<Option<&str>> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(Error::Invalid(FieldViolation::new(
            "idempotency_key",
            format!("must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters without spaces"),
        )));
    }
    Ok(Some(key))
}

/// `Precondition` for a run that already ended.
fn ended(run: &Run) -> Error {
    Error::Precondition(format!(
        "run {} already ended {}; nothing to cancel",
        run.id,
        run.state.as_str()
    ))
}

/// `QuotaExceeded` unless `n` more runs fit in what is left of the tenant's
/// hourly budget; locks the tenant's quota row for the rest of the
/// transaction, so concurrent triggers are counted one after the other.
async fn check_hourly_budget(
    tx: &mut sqlx::PgConnection,
    tenant_id: &str,
    n: u64,
    now: DateTime<Utc>,
) -> Result<()> {
    let remaining = db::tenancy::quota_hourly_remaining(tx, &[tenant_id.to_string()], now)
        .await
        .map_err(Error::on(&Target::new("quota", tenant_id)))?;
    match remaining.get(tenant_id) {
        Some(&left) if left < n => Err(Error::QuotaExceeded(format!(
            "tenant {tenant_id:?} has {left} run(s) left of its hourly budget (max_runs_per_hour); \
             this call needs {n}"
        ))),
        _ => Ok(()),
    }
}

/// Checks that binding `id` still exists and keeps it so until `tx` ends
/// (a `FOR KEY SHARE` lock): a run created for it is then either seen and
/// cancelled by a concurrent DeleteBinding, or refused here because the
/// delete committed first. A deleted binding's runs cannot be retried.
async fn bound(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<()> {
    let target = Target::new("binding", id);
    match db::bindings::binding_lock_shared(tx, id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Precondition(format!(
            "{target} was deleted; no run of it can start"
        ))),
        Err(e) => Err(Error::db(e, &target)),
    }
}

/// Inserts `new` in `tx` with its audit event, commits, publishes its first
/// event and wakes the executor; returns the run.
async fn create(core: &Core, actor: Actor<'_>, mut tx: super::Tx, new: NewRun) -> Result<Run> {
    let (id, tenant_id) = (new.id, new.tenant_id.clone());
    let target = Target::new("run", id);
    let now = core.clock.now();
    bound(&mut tx, new.binding_id).await?;
    let events = db::runs::run_insert(&mut tx, &core.node_id, &[new], now)
        .await
        .map_err(Error::on(&target))?;
    let run = db::runs::run_get(&mut *tx, &tenant_id, id)
        .await
        .map_err(Error::on(&target))?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(&tenant_id),
        format!("run/{id}"),
        None,
        Some(audit::run(&run)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    core.bus.publish(events);
    // A run this node's executor may claim: wake it at once. The NOTIFY
    // wakes the others (and the worker dispatch, and the executor's timer
    // for a SCHEDULED run) on commit.
    if run.state == RunState::Queued && !matches!(run.handler, Handler::Worker(_)) {
        core.executor_wake.notify_one();
    }
    Ok(run)
}

/// What TriggerRun asks for.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// The binding to run.
    pub binding_id: Uuid,
    /// Deduplicates triggers of one binding for [`IDEMPOTENCY_HOURS`]; empty
    /// for none. 1-200 printable ASCII characters.
    pub idempotency_key: String,
    /// When to run: `None` or a past time is now (QUEUED); a future time
    /// makes a SCHEDULED run.
    pub run_time: Option<DateTime<Utc>>,
    /// Merged over the binding's effective params (RFC 7396).
    pub params: Option<Value>,
}

/// Starts a manual run of a binding of `tenant_id` (TriggerRun). With an
/// idempotency key seen in the last [`IDEMPOTENCY_HOURS`], returns that
/// run instead (and audits the call).
///
/// # Errors
/// `Invalid` (idempotency key, params), `NotFound` (binding),
/// `Precondition` (broken or deleted binding), `QuotaExceeded` (hourly
/// budget), database errors.
pub async fn trigger(core: &Core, actor: Actor<'_>, tenant_id: &str, t: Trigger) -> Result<Run> {
    let key = validate_idempotency_key(&t.idempotency_key)?;
    let target = Target::new("binding", t.binding_id);
    let mut tx = begin(core, &target).await?;
    // With a key, the binding's row lock orders concurrent triggers so
    // the second one finds the first one's run.
    let b = match key {
        Some(_) => db::bindings::binding_get_for_update(&mut *tx, tenant_id, t.binding_id).await,
        None => db::bindings::binding_get(&mut *tx, tenant_id, t.binding_id).await,
    }
    .map_err(Error::on(&target))?;
    super::require_healthy(&b)?;
    let now = core.clock.now();
    if let Some(key) = key {
        let since = now - chrono::Duration::hours(IDEMPOTENCY_HOURS);
        let found = db::runs::run_find_by_idempotency_key(&mut *tx, t.binding_id, key, since)
            .await
            .map_err(Error::on(&Target::all("run")))?;
        if let Some(id) = found {
            let run_target = Target::new("run", id);
            let run = db::runs::run_get(&mut *tx, tenant_id, id)
                .await
                .map_err(Error::on(&run_target))?;
            let summary = audit::run(&run);
            let event = actor.audit(
                core.clock.new_id(),
                now,
                Some(tenant_id),
                format!("run/{id}"),
                Some(summary.clone()),
                Some(summary),
            );
            record(&mut tx, &event, &run_target).await?;
            commit(tx, &run_target).await?;
            tracing::info!(run = %id, binding = %t.binding_id, "idempotency key seen; returning the first run");
            return Ok(run);
        }
    }
    let def = db::definitions::definition_get(&mut *tx, &b.definition, None)
        .await
        .map_err(Error::on(&Target::new("definition", &b.definition)))?;
    check_hourly_budget(&mut tx, tenant_id, 1, now).await?;
    let params = match &t.params {
        Some(p) => merge_params(&b.effective_params, p),
        None => b.effective_params.clone(),
    };
    validate_merged_params("params", &params)?;
    let spec = RunSpec {
        tenant_id: tenant_id.to_string(),
        binding_id: t.binding_id,
        definition: b.definition.clone(),
        handler: def.run_handler(),
        params,
        policy: def.policy,
    };
    let new = NewRun::trigger(
        core.clock.new_id(),
        spec,
        now,
        t.run_time,
        key.map(str::to_string),
    );
    let state = new.state;
    let run = create(core, actor, tx, new).await?;
    tracing::info!(run = %run.id, binding = %t.binding_id, state = state.as_str(), "run triggered");
    Ok(run)
}

/// Cancels run `run_id` of `tenant_id` (CancelRun): a run not yet started
/// ends CANCELLED at once; a running one is asked to stop (its node kills
/// it, then it ends CANCELLED). `reason` — at most [`MAX_REASON`]
/// characters; blank means [`RunReason::Cancelled`].
///
/// # Errors
/// `Invalid` (reason), `NotFound`, `Precondition` when the run already
/// ended, database errors.
pub async fn cancel(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    run_id: Uuid,
    reason: &str,
) -> Result<Run> {
    if reason.chars().count() > MAX_REASON {
        return Err(Error::Invalid(FieldViolation::new(
            "reason",
            format!("must be at most {MAX_REASON} characters"),
        )));
    }
    let reason = if reason.trim().is_empty() {
        RunReason::Cancelled.as_str()
    } else {
        reason
    };
    let target = Target::new("run", run_id);
    // Access check first: another tenant's run is NOT_FOUND.
    let run = db::runs::run_get(&core.pool, tenant_id, run_id)
        .await
        .map_err(Error::on(&target))?;
    if run.state.is_terminal() {
        return Err(ended(&run));
    }
    let mut tx = begin(core, &target).await?;
    let now = core.clock.now();
    let events = db::runs::run_cancel_waiting(&mut tx, &core.node_id, &[run_id], reason, now)
        .await
        .map_err(Error::on(&target))?;
    if events.is_empty() {
        db::runs::run_request_cancel(&mut tx, &[run_id], reason)
            .await
            .map_err(Error::on(&target))?;
    }
    let after = db::runs::run_get(&mut *tx, tenant_id, run_id)
        .await
        .map_err(Error::on(&target))?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(tenant_id),
        format!("run/{run_id}"),
        Some(audit::run(&run)),
        Some(audit::run(&after)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    let cancelled_at_once = !events.is_empty();
    core.bus.publish(events);
    let run = db::runs::run_get(&core.pool, tenant_id, run_id)
        .await
        .map_err(Error::on(&target))?;
    if !cancelled_at_once && run.state.is_terminal() && run.cancel_reason.is_none() {
        // It ended on its own before the request landed.
        return Err(ended(&run));
    }
    tracing::info!(run = %run_id, reason = %reason, state = run.state.as_str(), "run cancel requested");
    Ok(run)
}

/// Runs an ended run again as a new attempt (RetryRun): same binding,
/// handler, params and policy, attempt + 1, queued now.
///
/// # Errors
/// `NotFound`, `Precondition` when the run has not ended or its binding
/// was deleted, database errors.
pub async fn retry(core: &Core, actor: Actor<'_>, tenant_id: &str, run_id: Uuid) -> Result<Run> {
    let target = Target::new("run", run_id);
    let prev = db::runs::run_get(&core.pool, tenant_id, run_id)
        .await
        .map_err(Error::on(&target))?;
    if !prev.state.is_terminal() {
        return Err(Error::Precondition(format!(
            "{target} is {} and has not ended; only an ended run can be retried",
            prev.state.as_str()
        )));
    }
    let now = core.clock.now();
    let new = NewRun::manual_retry(core.clock.new_id(), &prev, now);
    let tx = begin(core, &Target::all("run")).await?;
    let run = create(core, actor, tx, new).await?;
    tracing::info!(run = %run.id, retry_of = %run_id, "run retried by request");
    Ok(run)
}

/// Checks a backfill range: `start < end <= now`.
///
/// # Errors
/// `Invalid` on `end_time` otherwise.
pub fn check_backfill_range(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<()> {
    if end <= start {
        return Err(FieldViolation::new("end_time", "must be after start_time").into());
    }
    if end > now {
        return Err(FieldViolation::new("end_time", "must not be in the future").into());
    }
    Ok(())
}

/// The fire times of `binding`'s effective schedule in `[start, end)`: what
/// a backfill of that range creates. Pure but possibly long (up to
/// [`MAX_BACKFILL`] schedule steps): callers bound how many run at once.
///
/// # Errors
/// As [`check_backfill_range`]; `Invalid` on `end_time` when the range
/// holds more than [`MAX_BACKFILL`] fire times.
pub fn backfill_times(
    binding: &Binding,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>> {
    check_backfill_range(start, end, now)?;
    binding
        .effective_schedule
        .fire_times_in(start, end, MAX_BACKFILL)
        .map_err(|max| {
            FieldViolation::new(
                "end_time",
                format!("the range holds more than {max} fire times; narrow it"),
            )
            .into()
        })
}

/// Creates one queued run per fire time of `times` for `binding`
/// (BackfillRuns), all or nothing, audited as one event on the binding with
/// the range `start`..`end`. Returns the new runs' ids, in `times` order.
///
/// # Errors
/// `Precondition` (broken or deleted binding), `QuotaExceeded` (hourly
/// budget), database errors.
pub async fn backfill(
    core: &Core,
    actor: Actor<'_>,
    binding: &Binding,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    times: &[DateTime<Utc>],
) -> Result<Vec<Uuid>> {
    super::require_healthy(binding)?;
    let tenant_id = binding.tenant_id.as_str();
    let target = Target::all("run");
    let def = db::definitions::definition_get(&core.pool, &binding.definition, None)
        .await
        .map_err(Error::on(&Target::new("definition", &binding.definition)))?;
    let runs: Vec<NewRun> = times
        .iter()
        .map(|t| {
            let spec = RunSpec {
                tenant_id: tenant_id.to_string(),
                binding_id: binding.id,
                definition: binding.definition.clone(),
                handler: def.run_handler(),
                params: binding.effective_params.clone(),
                policy: def.policy,
            };
            NewRun::backfill(core.clock.new_id(), spec, *t)
        })
        .collect();
    let now = core.clock.now();
    // All or nothing: one transaction, in chunks.
    let mut tx = begin(core, &target).await?;
    bound(&mut tx, binding.id).await?;
    check_hourly_budget(&mut tx, tenant_id, runs.len() as u64, now).await?;
    let mut events = Vec::with_capacity(runs.len());
    for chunk in runs.chunks(1000) {
        events.extend(
            db::runs::run_insert(&mut tx, &core.node_id, chunk, now)
                .await
                .map_err(Error::on(&target))?,
        );
    }
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(tenant_id),
        format!("binding/{}", binding.id),
        None,
        Some(serde_json::json!({
            "start_time": start,
            "end_time": end,
            "runs": runs.len(),
            "first_run_id": runs.first().map(|r| r.id),
        })),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    core.bus.publish(events);
    core.executor_wake.notify_one();
    tracing::info!(binding = %binding.id, runs = runs.len(), "backfill created");
    if runs.len() >= ANALYZE_AFTER {
        let pool = core.pool.clone();
        tokio::spawn(async move { db::runs::run_analyze_after_burst(&pool).await });
    }
    Ok(runs.iter().map(|r| r.id).collect())
}

/// Run `run_id` of `tenant_id`.
///
/// # Errors
/// `NotFound` (also for another tenant's run), database errors.
pub async fn get(core: &Core, tenant_id: &str, run_id: Uuid) -> Result<Run> {
    db::runs::run_get(&core.pool, tenant_id, run_id)
        .await
        .map_err(Error::on(&Target::new("run", run_id)))
}

/// Which runs [`list`] returns.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs of this binding.
    pub binding_id: Option<Uuid>,
    /// Only runs in this state.
    pub state: Option<RunState>,
}

/// One page of `tenant_id`'s runs matching `filter`, newest first; the
/// cursor is the last run's id.
///
/// # Errors
/// Database errors.
pub async fn list(
    core: &Core,
    tenant_id: &str,
    filter: &RunFilter,
    page: Page<Uuid>,
) -> Result<(Vec<Run>, Option<Uuid>)> {
    let rows = db::runs::run_list(
        &core.pool,
        tenant_id,
        page.after.unwrap_or(Uuid::max()),
        filter.binding_id,
        filter.state,
        page.size + 1,
    )
    .await
    .map_err(Error::on(&Target::all("run")))?;
    Ok(super::page(rows, page.size, |r| r.id))
}

/// Events of run `run_id` of `tenant_id` with `seq > after_seq`, oldest
/// first, at most `limit` (ListRunEvents).
///
/// # Errors
/// `NotFound` (also for another tenant's run), database errors.
pub async fn list_events(
    core: &Core,
    tenant_id: &str,
    run_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<crate::domain::RunEvent>> {
    // Existence and ownership first: another tenant's run is NOT_FOUND,
    // not an empty list.
    get(core, tenant_id, run_id).await?;
    db::events::event_list(&core.pool, tenant_id, run_id, after_seq, limit)
        .await
        .map_err(Error::on(&Target::all("run_event")))
}

/// Records `progress` reported for run `run_id` while it runs `attempt`
/// (a worker's ReportProgress): a `progress` event, visible in TailRun and
/// WatchEvents, and the run's `progress`; committed, then published.
/// Callers that fence the report further (a lease token) call
/// [`db::events::progress_append`] inside their own transaction instead.
///
/// # Errors
/// `Invalid` naming `progress.percent`, `progress.current_step` or
/// `progress.message` when `progress` breaks its bounds
/// ([`Progress::validate`]); `Precondition` when the run is not `RUNNING`
/// at `attempt` (it ended, was retried elsewhere, or does not exist);
/// database errors.
pub async fn report_progress(
    core: &Core,
    run_id: Uuid,
    attempt: i32,
    progress: &Progress,
) -> Result<RunEvent> {
    progress.validate("progress")?;
    let target = Target::new("run", run_id);
    let mut tx = super::begin(core, &target).await?;
    let event = db::events::progress_append(
        &mut tx,
        &core.node_id,
        run_id,
        attempt,
        progress,
        core.clock.now(),
    )
    .await
    .map_err(Error::on(&target))?;
    let Some(event) = event else {
        return Err(Error::Precondition(format!(
            "{target} is not running attempt {attempt}; its progress is not recorded"
        )));
    };
    super::commit(tx, &target).await?;
    core.bus.publish([event.clone()]);
    Ok(event)
}
