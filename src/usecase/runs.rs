//! Runs a caller asks for: trigger, cancel, retry, backfill; and reading
//! them. Runs the scheduler creates from fire times are the engine's
//! (`scheduler`), retries after a failed attempt the executor's.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Actor, Core, Error, Result, Target, audit, begin, begin_generic, commit, record};
use crate::db;
use crate::domain::{
    Binding, FieldViolation, Handler, NewRun, OverlapPolicy, Progress, Run, RunEvent, RunReason,
    RunSpec, RunState, RunTrigger, merge_params, stats, validate_merged_params,
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
/// event and wakes the executor; returns the run. `tx` was begun by
/// [`begin_generic`] and holds a lock on the binding of `new` (at least
/// `FOR KEY SHARE`, so a DeleteBinding waits for it or has committed before
/// and the binding was not found).
async fn create(core: &Core, actor: Actor<'_>, mut tx: super::Tx, new: NewRun) -> Result<Run> {
    let (id, tenant_id) = (new.id, new.tenant_id.clone());
    let target = Target::new("run", id);
    let now = core.clock.now();
    let (events, run, announce) = db::runs::run_insert_one(&mut tx, &core.node_id, new, now)
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
    core.announcer
        .send(announce.into_notifications(&core.node_id))
        .await;
    // A run this node's executor may claim: wake it at once. The NOTIFY
    // wakes the others (and the worker dispatch, and the executor's timer
    // for a SCHEDULED run) once sent.
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
    // Every statement planned once per connection (the insert's custom
    // plans cost more than its execution); the hourly budget's count reads
    // by run id, which its generic plan does too
    // (`quotas::the_hourly_budget_reads_only_the_runs_of_its_hour`).
    let mut tx = begin_generic(core, &target).await?;
    // With a key, the binding's row lock orders concurrent triggers so
    // the second one finds the first one's run. Either lock keeps a
    // DeleteBinding from landing before the run is written.
    let b = match key {
        Some(_) => db::bindings::binding_get_for_update(&mut *tx, tenant_id, t.binding_id).await,
        None => db::bindings::binding_get_key_share(&mut *tx, tenant_id, t.binding_id).await,
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
        // The binding's overrides over the definition as it is now.
        policy: b.overrides.apply(def.policy),
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
/// characters, not a reason sked records itself ([`RunReason::ALL`] but
/// `cancelled`); blank means [`RunReason::Cancelled`].
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
    // A caller's reason must not pass for one sked records itself: a
    // workflow run cancelled with "timeout" would end TIMED_OUT and be
    // retried, and "node_lost" or "overlap" would misstate what happened.
    if RunReason::parse(reason).is_some_and(|r| r != RunReason::Cancelled) {
        return Err(Error::Invalid(FieldViolation::new(
            "reason",
            format!(
                "{reason:?} is a reason sked records itself (one of {}); write the caller's own",
                RunReason::ALL
                    .iter()
                    .filter(|r| **r != RunReason::Cancelled)
                    .map(|r| format!("{:?}", r.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
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
    let workflow = matches!(run.handler, crate::domain::Handler::Workflow(_));
    // A workflow's steps first (the order a step's end takes the rows in:
    // the step, then its workflow run), then the run; then once more for
    // a step another node created in between. The run's cancel reason
    // stops the DAG: its steps' ends end it CANCELLED.
    let mut step_events = Vec::new();
    if workflow {
        step_events.extend(
            db::runs::run_stop_steps(&mut tx, &core.node_id, &[run_id], reason, now)
                .await
                .map_err(Error::on(&target))?,
        );
    }
    let mut events = db::runs::run_cancel_waiting(&mut tx, &core.node_id, &[run_id], reason, now)
        .await
        .map_err(Error::on(&target))?;
    if events.is_empty() {
        db::runs::run_request_cancel(&mut tx, &[run_id], reason)
            .await
            .map_err(Error::on(&target))?;
    }
    if workflow {
        step_events.extend(
            db::runs::run_stop_steps(&mut tx, &core.node_id, &[run_id], reason, now)
                .await
                .map_err(Error::on(&target))?,
        );
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
    events.extend(step_events);
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
    let mut tx = begin_generic(core, &Target::all("run")).await?;
    bound(&mut tx, new.binding_id).await?;
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
/// The runs of an `event` handler with overlap policy `ALLOW` are written
/// `SUCCEEDED` at once (started and ended now, with their `fired` events)
/// when they may start now: binding and definition enabled, binding not
/// paused, tenant without a `max_concurrent_runs` quota.
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
    let mut runs: Vec<NewRun> = times
        .iter()
        .map(|t| {
            let spec = RunSpec {
                tenant_id: tenant_id.to_string(),
                binding_id: binding.id,
                definition: binding.definition.clone(),
                handler: def.run_handler(),
                params: binding.effective_params.clone(),
                policy: binding.overrides.apply(def.policy),
            };
            NewRun::backfill(core.clock.new_id(), spec, *t)
        })
        .collect();
    let now = core.clock.now();
    // All or nothing: one transaction, in chunks.
    let mut tx = begin(core, &target).await?;
    bound(&mut tx, binding.id).await?;
    check_hourly_budget(&mut tx, tenant_id, runs.len() as u64, now).await?;
    // Event runs of an ALLOW binding that may start now complete in this
    // transaction, as the scheduler's fires do, instead of each being
    // written twice more by a claim. Only ALLOW: the others start one at a
    // time after the binding's earlier runs, which the claim orders. The
    // stop locks of the binding and its definition (taken after the row
    // locks of `bound` and the budget, which a stop may hold while it
    // waits for them) keep a pause or disable from landing between the
    // check and the commit; `bound` does the same for a delete.
    if runs
        .first()
        .is_some_and(|r| r.handler == Handler::Event && r.policy.overlap == OverlapPolicy::Allow)
    {
        let b = Target::new("binding", binding.id);
        db::runs::run_stop_lock_shared(&mut tx, binding.id, &binding.definition)
            .await
            .map_err(Error::on(&b))?;
        let startable = db::bindings::binding_startable(&mut *tx, binding.id, now)
            .await
            .map_err(Error::on(&b))?;
        if startable {
            let limited = db::tenancy::quota_kinds(&mut *tx, &[tenant_id.to_string()])
                .await
                .map_err(Error::on(&Target::new("quota", tenant_id)))?
                .concurrency;
            NewRun::complete_inline(&mut runs, &limited, now);
        }
    }
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

/// Most runs one ListRuns call reads to fill a page when filters other
/// than the binding narrow the list: a page may then come back short (even
/// empty) with a next page token, and the next call goes on from there.
pub const MAX_LIST_SCAN: i64 = 10_000;

/// Most states in a ListRuns filter (there are eight).
pub const MAX_FILTER_STATES: usize = 8;

/// Longest node id in a ListRuns filter, characters.
pub const MAX_NODE_ID: usize = 128;

/// Which runs [`list`] returns: all of the given filters hold.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs of this binding.
    pub binding_id: Option<Uuid>,
    /// Only runs in one of these states (empty: any); at most
    /// [`MAX_FILTER_STATES`].
    pub states: Vec<RunState>,
    /// Only runs of this trigger.
    pub trigger: Option<RunTrigger>,
    /// Only runs of this definition (a definition name).
    pub definition: Option<String>,
    /// Only runs executed by this node (1-[`MAX_NODE_ID`] characters).
    pub node: Option<String>,
    /// Only runs scheduled at or after this instant.
    pub scheduled_from: Option<DateTime<Utc>>,
    /// Only runs scheduled before this instant (after `scheduled_from`).
    pub scheduled_until: Option<DateTime<Utc>>,
    /// Oldest first (ascending id) instead of newest first.
    pub oldest_first: bool,
    /// Only the steps of this workflow run: every attempt of each, oldest
    /// first, in one page (the other filters apply to them).
    pub parent_run_id: Option<Uuid>,
}

impl RunFilter {
    /// Checks the filters beyond their shape.
    ///
    /// # Errors
    /// `Invalid` naming the field (`states`, `definition`, `node`,
    /// `scheduled_end_time`) and the limit.
    pub fn validate(&self) -> Result<()> {
        if self.states.len() > MAX_FILTER_STATES {
            return Err(FieldViolation::new(
                "states",
                format!(
                    "has {} items; at most {MAX_FILTER_STATES}",
                    self.states.len()
                ),
            )
            .into());
        }
        if let Some(d) = &self.definition {
            crate::domain::validate_definition_name("definition", d)?;
        }
        if let Some(n) = &self.node
            && (n.is_empty() || n.chars().count() > MAX_NODE_ID)
        {
            return Err(
                FieldViolation::new("node", format!("must be 1-{MAX_NODE_ID} characters")).into(),
            );
        }
        if let (Some(from), Some(until)) = (self.scheduled_from, self.scheduled_until)
            && until <= from
        {
            return Err(FieldViolation::new(
                "scheduled_end_time",
                "must be after scheduled_start_time",
            )
            .into());
        }
        Ok(())
    }

    /// The filters as one canonical string, for page tokens.
    fn key(&self) -> String {
        let mut states: Vec<&str> = self.states.iter().map(|s| s.as_str()).collect();
        states.sort_unstable();
        states.dedup();
        let t = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros().to_string());
        format!(
            "runs|{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
            self.binding_id,
            states.join(","),
            self.trigger.map(RunTrigger::as_str),
            self.definition,
            self.node,
            t(self.scheduled_from),
            t(self.scheduled_until),
            self.oldest_first
        )
    }
}

/// One page of `tenant_id`'s runs matching `filter` in its order (newest
/// first unless `oldest_first`), after `page_token`, with the token of the
/// next page (empty on the last). With filters other than the binding, one
/// call reads at most [`MAX_LIST_SCAN`] runs: a page may then be short, even
/// empty, and still have a next page token.
///
/// # Errors
/// `Invalid` for bad filters ([`RunFilter::validate`]) or a page token
/// that is malformed or was issued for other filters ([`super::page_cursor`]);
/// database errors.
pub async fn list(
    core: &Core,
    tenant_id: &str,
    filter: &RunFilter,
    page_size: i64,
    page_token: &str,
) -> Result<(Vec<Run>, String)> {
    filter.validate()?;
    if let Some(parent) = filter.parent_run_id {
        return list_steps(core, tenant_id, parent, filter).await;
    }
    let key = filter.key();
    let after = super::page_cursor(page_token, &key)?;
    let q = db::runs::RunQuery {
        binding_id: filter.binding_id,
        states: &filter.states,
        trigger: filter.trigger,
        definition: filter.definition.as_deref(),
        node: filter.node.as_deref(),
        scheduled_from: filter.scheduled_from,
        scheduled_until: filter.scheduled_until,
        oldest_first: filter.oldest_first,
    };
    let target = Target::all("run");
    let mut conn = core
        .pool
        .acquire()
        .await
        .map_err(|e| Error::db(e.into(), &target))?;
    let listed = db::runs::run_list(
        &mut conn,
        tenant_id,
        &q,
        after,
        MAX_LIST_SCAN,
        page_size + 1,
    )
    .await
    .map_err(Error::on(&target))?;
    let (runs, next) = super::page(listed.runs, page_size, |r| r.id);
    let next = next.or(listed.scanned_to);
    Ok((
        runs,
        next.map(|c| super::page_token(c, &key)).unwrap_or_default(),
    ))
}

/// [`list`] of a workflow run's steps: all of them (at most 100 steps with
/// their attempts), oldest first, no next page.
async fn list_steps(
    core: &Core,
    tenant_id: &str,
    parent: Uuid,
    f: &RunFilter,
) -> Result<(Vec<Run>, String)> {
    let target = Target::new("run", parent);
    // The parent first: another tenant's run is NOT_FOUND.
    db::runs::run_get(&core.pool, tenant_id, parent)
        .await
        .map_err(Error::on(&target))?;
    let steps = db::runs::run_steps(&core.pool, tenant_id, parent)
        .await
        .map_err(Error::on(&target))?;
    let mut runs: Vec<Run> = steps
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r| f.states.is_empty() || f.states.contains(&r.state))
        .filter(|r| f.binding_id.is_none_or(|b| b == r.binding_id))
        .filter(|r| f.trigger.is_none_or(|t| t == r.trigger))
        .filter(|r| f.definition.as_deref().is_none_or(|d| d == r.definition))
        .filter(|r| f.node.is_none() || f.node == r.node_id)
        .filter(|r| f.scheduled_from.is_none_or(|t| r.scheduled_time >= t))
        .filter(|r| f.scheduled_until.is_none_or(|t| r.scheduled_time < t))
        .collect();
    if !f.oldest_first {
        runs.reverse();
    }
    Ok((runs, String::new()))
}

/// A run's place in a workflow, for the API: the workflow run and step
/// name of a step; the steps of a workflow run (when asked).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkflowView {
    /// For a step: its workflow run.
    pub parent_run_id: Option<Uuid>,
    /// For a step: its name.
    pub step: Option<String>,
    /// For a workflow run: every step in definition order with its latest
    /// attempt (`None` when not created yet).
    pub steps: Vec<(String, Option<Run>)>,
}

/// The [`WorkflowView`] of each of `runs` (by position); with `steps`, a
/// workflow run's steps too (GetRun).
///
/// # Errors
/// Database errors.
pub async fn workflow_views(
    core: &Core,
    tenant_id: &str,
    runs: &[Run],
    steps: bool,
) -> Result<Vec<WorkflowView>> {
    let target = Target::all("run");
    let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
    let of = db::runs::run_steps_of(&core.pool, &ids)
        .await
        .map_err(Error::on(&target))?;
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        let mut v = WorkflowView::default();
        if let Some(s) = of.iter().find(|s| s.run_id == r.id) {
            v.parent_run_id = Some(s.parent_run_id);
            v.step = Some(s.step.clone());
        }
        if steps && let crate::domain::Handler::Workflow(w) = &r.handler {
            let all = db::runs::run_steps(&core.pool, tenant_id, r.id)
                .await
                .map_err(Error::on(&target))?;
            for st in &w.steps {
                // Latest attempt: highest attempt, then latest created.
                let latest = all
                    .iter()
                    .filter(|(_, n)| *n == st.name)
                    .map(|(run, _)| run)
                    .max_by_key(|run| (run.attempt, run.create_time, run.id))
                    .cloned();
                v.steps.push((st.name.clone(), latest));
            }
        }
        out.push(v);
    }
    Ok(out)
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

/// Longest GetRunStats window, days.
pub const MAX_STATS_DAYS: i64 = 400;
/// Longest window of an hourly series, days (744 points).
pub const MAX_HOURLY_DAYS: i64 = 31;
/// Most hourly statistics rows one GetRunStats call reads: one per hour of
/// the window once folded, plus the rows not folded yet (about one per
/// binding with runs ending this hour; `db::runs::run_stats_hours`).
pub const MAX_STATS_ROWS: usize = 250_000;

/// Whose runs GetRunStats sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsSubject {
    /// Every binding of the tenant, deleted ones included.
    Tenant(String),
    /// One binding of the tenant.
    Binding {
        /// The tenant.
        tenant: String,
        /// The binding.
        id: Uuid,
    },
    /// Every binding of a definition (platform callers), of every tenant or
    /// of one.
    Definition {
        /// The definition's name.
        name: String,
        /// Only this tenant's bindings, when set.
        tenant: Option<String>,
    },
}

/// What GetRunStats asks for.
#[derive(Debug, Clone)]
pub struct StatsQuery {
    /// Whose runs.
    pub subject: StatsSubject,
    /// Window start (inclusive), on `scheduled_time`; rounded down to a
    /// whole hour (UTC).
    pub start: DateTime<Utc>,
    /// Window end (exclusive); rounded up to a whole hour.
    pub end: DateTime<Utc>,
    /// Series buckets; `None`: hours for a window of up to 2 days, else
    /// days.
    pub interval: Option<stats::StatsInterval>,
}

/// Statistics of the runs of `q.subject` scheduled in the window (widened
/// to whole hours, UTC) that have ended: counts per state, success rate,
/// duration and fire lag percentiles, and a series for a chart, summed from
/// the hourly rows the run-end statements keep and the leader folds per
/// tenant and definition ([`db::runs::run_stats_hours`]; percentiles within
/// the bucket resolution of [`stats`]).
///
/// # Errors
/// `Invalid` on `end_time` for an empty window or one longer than
/// [`MAX_STATS_DAYS`] days, or holding more than [`MAX_STATS_ROWS`] hourly
/// rows; on `interval` for an hourly series over more than
/// [`MAX_HOURLY_DAYS`] days; on `definition` for a bad name. `NotFound`
/// for a binding the tenant does not have. Database errors.
pub async fn stats(core: &Core, q: &StatsQuery) -> Result<stats::RunStats> {
    let (start, end) = (stats::floor_hour(q.start), stats::ceil_hour(q.end));
    if q.end <= q.start {
        return Err(FieldViolation::new("end_time", "must be after start_time").into());
    }
    if end - start > chrono::Duration::days(MAX_STATS_DAYS) {
        return Err(FieldViolation::new(
            "end_time",
            format!("the window is longer than {MAX_STATS_DAYS} days; narrow it"),
        )
        .into());
    }
    let interval = q
        .interval
        .unwrap_or(if end - start <= chrono::Duration::days(2) {
            stats::StatsInterval::Hour
        } else {
            stats::StatsInterval::Day
        });
    if interval == stats::StatsInterval::Hour
        && end - start > chrono::Duration::days(MAX_HOURLY_DAYS)
    {
        return Err(FieldViolation::new(
            "interval",
            format!("an hourly series covers at most {MAX_HOURLY_DAYS} days; ask for DAY"),
        )
        .into());
    }
    let scope = match &q.subject {
        StatsSubject::Tenant(t) => db::runs::StatsScope::Tenant(t),
        StatsSubject::Binding { tenant, id } => {
            // Another tenant's binding (or none) is NOT_FOUND, not zeros.
            db::bindings::binding_get(&core.pool, tenant, *id)
                .await
                .map_err(Error::on(&Target::new("binding", id)))?;
            db::runs::StatsScope::Binding { tenant, id: *id }
        }
        StatsSubject::Definition { name, tenant } => {
            crate::domain::validate_definition_name("definition", name)?;
            db::runs::StatsScope::Definition {
                name,
                tenant: tenant.as_deref(),
            }
        }
    };
    let rows = db::runs::run_stats_hours(&core.pool, scope, start, end, MAX_STATS_ROWS as i64 + 1)
        .await
        .map_err(Error::on(&Target::all("run")))?;
    if rows.len() > MAX_STATS_ROWS {
        return Err(FieldViolation::new(
            "end_time",
            format!(
                "the window holds more than {MAX_STATS_ROWS} hourly statistics rows; narrow it, \
                 or ask for one binding or definition"
            ),
        )
        .into());
    }
    Ok(stats::summarize(&rows, start, end, interval))
}
