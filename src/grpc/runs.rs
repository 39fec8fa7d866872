//! `sked.v1.RunService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::audit;
use super::authz::{Grant, tenant_grant};
use super::convert::{run_to, state_from, struct_to_json, time_from, time_to};
use super::{Ctx, db_status, invalid, page, page_size, parse_uuid, record, require_healthy};
use crate::db;
use crate::domain::{FieldViolation, NewRun, RunSpec, merge_params, validate_merged_params};
use crate::proto::v1 as pb;
use crate::proto::v1::run_service_server::RunService;

/// Most runs one BackfillRuns creates.
pub const MAX_BACKFILL: usize = 10_000;
/// A backfill of at least this many runs refreshes the statistics of the
/// runs table ([`db::runs::run_analyze_after_burst`]).
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
/// A violation on `idempotency_key` otherwise.
fn validate_idempotency_key(key: &str) -> Result<Option<&str>, FieldViolation> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(FieldViolation::new(
            "idempotency_key",
            format!("must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters without spaces"),
        ));
    }
    Ok(Some(key))
}

/// FAILED_PRECONDITION for a run that already ended.
fn ended(run: &crate::domain::Run) -> Status {
    Status::failed_precondition(format!(
        "run {} already ended {}; nothing to cancel",
        run.id,
        run.state.as_str()
    ))
}

/// `RESOURCE_EXHAUSTED` unless `n` more runs fit in what is left of the
/// tenant's hourly budget; locks the tenant's quota row for the rest of the
/// transaction, so concurrent triggers are counted one after the other.
async fn check_hourly_budget(
    tx: &mut sqlx::PgConnection,
    tenant_id: &str,
    n: u64,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Status> {
    let remaining = db::tenancy::quota_hourly_remaining(tx, &[tenant_id.to_string()], now)
        .await
        .map_err(|e| db_status(e, "quota"))?;
    match remaining.get(tenant_id) {
        Some(&left) if left < n => Err(Status::resource_exhausted(format!(
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
async fn bound(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<(), Status> {
    let what = format!("binding {id}");
    match db::bindings::binding_lock_shared(tx, id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Status::failed_precondition(format!(
            "{what} was deleted; no run of it can start"
        ))),
        Err(e) => Err(db_status(e, &what)),
    }
}

/// Implements `RunService`.
#[derive(Debug, Clone)]
pub struct Runs(pub Ctx);

impl Runs {
    /// Inserts `new` in `tx` with the audit event of `method`, commits,
    /// publishes its first event and wakes the executor; returns the run.
    async fn create_run(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        caller: &super::auth::Caller,
        method: &str,
        new: NewRun,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<crate::domain::Run, Status> {
        let (id, tenant_id) = (new.id, new.tenant_id.clone());
        bound(&mut tx, new.binding_id).await?;
        let events = db::runs::run_insert(&mut tx, &self.0.node_id, &[new], now)
            .await
            .map_err(|e| db_status(e, "run"))?;
        let run = db::runs::run_get(&mut *tx, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, format_args!("run {id}")))?;
        let event = caller.audit(
            now,
            Some(&tenant_id),
            method,
            format!("run/{id}"),
            None,
            Some(audit::run(&run)),
        );
        record(&mut tx, &event, "run").await?;
        tx.commit().await.map_err(|e| db_status(e.into(), "run"))?;
        self.0.bus.publish(events);
        self.0.executor_wake.notify_one();
        Ok(run)
    }
}

#[tonic::async_trait]
impl RunService for Runs {
    async fn trigger_run(
        &self,
        req: Request<pb::TriggerRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        self.0.rates.runs(&tenant_id, 1)?;
        let r = req.into_inner();
        let binding_id = parse_uuid("binding_id", &r.binding_id)?;
        let key = validate_idempotency_key(&r.idempotency_key).map_err(invalid)?;
        let run_time = r
            .run_time
            .as_ref()
            .map(|t| time_from("run_time", t))
            .transpose()
            .map_err(invalid)?;
        let what = format!("binding {binding_id}");
        let mut tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        // With a key, the binding's row lock orders concurrent triggers so
        // the second one finds the first one's run.
        let b = match key {
            Some(_) => db::bindings::binding_get_for_update(&mut *tx, &tenant_id, binding_id).await,
            None => db::bindings::binding_get(&mut *tx, &tenant_id, binding_id).await,
        }
        .map_err(|e| db_status(e, &what))?;
        require_healthy(&b)?;
        let now = self.0.clock.now();
        if let Some(key) = key {
            let since = now - chrono::Duration::hours(IDEMPOTENCY_HOURS);
            let found = db::runs::run_find_by_idempotency_key(&mut *tx, binding_id, key, since)
                .await
                .map_err(|e| db_status(e, "run"))?;
            if let Some(id) = found {
                let run = db::runs::run_get(&mut *tx, &tenant_id, id)
                    .await
                    .map_err(|e| db_status(e, format_args!("run {id}")))?;
                let summary = audit::run(&run);
                let event = caller.audit(
                    now,
                    Some(&tenant_id),
                    method,
                    format!("run/{id}"),
                    Some(summary.clone()),
                    Some(summary),
                );
                record(&mut tx, &event, "run").await?;
                tx.commit().await.map_err(|e| db_status(e.into(), "run"))?;
                tracing::info!(run = %id, binding = %binding_id, "idempotency key seen; returning the first run");
                return Ok(Response::new(run_to(&run)));
            }
        }
        let def = db::definitions::definition_get(&mut *tx, &b.definition, None)
            .await
            .map_err(|e| db_status(e, format_args!("definition {:?}", b.definition)))?;
        check_hourly_budget(&mut tx, &tenant_id, 1, now).await?;
        let params = match &r.params {
            Some(p) => merge_params(&b.effective_params, &struct_to_json(p)),
            None => b.effective_params.clone(),
        };
        validate_merged_params("params", &params).map_err(invalid)?;
        let spec = RunSpec {
            tenant_id: tenant_id.clone(),
            binding_id,
            definition: b.definition.clone(),
            handler: def.run_handler(),
            params,
            policy: def.policy,
        };
        let new = NewRun::trigger(spec, now, run_time, key.map(str::to_string));
        let (id, state) = (new.id, new.state);
        let run = self.create_run(tx, &caller, method, new, now).await?;
        tracing::info!(run = %id, binding = %binding_id, state = state.as_str(), "run triggered");
        Ok(Response::new(run_to(&run)))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let id = parse_uuid("run_id", &r.run_id)?;
        if r.reason.chars().count() > MAX_REASON {
            return Err(invalid(FieldViolation::new(
                "reason",
                format!("must be at most {MAX_REASON} characters"),
            )));
        }
        let reason = if r.reason.trim().is_empty() {
            crate::domain::RunReason::Cancelled.to_string()
        } else {
            r.reason.clone()
        };
        let what = format!("run {id}");
        // Access check first: another tenant's run is NOT_FOUND.
        let run = db::runs::run_get(&self.0.pool, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        if run.state.is_terminal() {
            return Err(ended(&run));
        }
        let mut tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        let now = self.0.clock.now();
        let events = db::runs::run_cancel_waiting(&mut tx, &self.0.node_id, &[id], &reason, now)
            .await
            .map_err(|e| db_status(e, &what))?;
        if events.is_empty() {
            db::runs::run_request_cancel(&mut tx, &[id], &reason)
                .await
                .map_err(|e| db_status(e, &what))?;
        }
        let after = db::runs::run_get(&mut *tx, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        let event = caller.audit(
            now,
            Some(&tenant_id),
            method,
            format!("run/{id}"),
            Some(audit::run(&run)),
            Some(audit::run(&after)),
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        let cancelled_at_once = !events.is_empty();
        self.0.bus.publish(events);
        let run = db::runs::run_get(&self.0.pool, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        if !cancelled_at_once && run.state.is_terminal() && run.cancel_reason.is_none() {
            // It ended on its own before the request landed.
            return Err(ended(&run));
        }
        tracing::info!(run = %id, reason = %reason, state = run.state.as_str(), "run cancel requested");
        Ok(Response::new(run_to(&run)))
    }

    async fn retry_run(
        &self,
        req: Request<pb::RetryRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        self.0.rates.runs(&tenant_id, 1)?;
        let id = parse_uuid("run_id", &req.get_ref().run_id)?;
        let what = format!("run {id}");
        let prev = db::runs::run_get(&self.0.pool, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        if !prev.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "{what} is {} and has not ended; only an ended run can be retried",
                prev.state.as_str()
            )));
        }
        let now = self.0.clock.now();
        let new = NewRun::manual_retry(&prev, now);
        let new_id = new.id;
        let tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), "run"))?;
        let run = self.create_run(tx, &caller, method, new, now).await?;
        tracing::info!(run = %new_id, retry_of = %id, "run retried by request");
        Ok(Response::new(run_to(&run)))
    }

    async fn backfill_runs(
        &self,
        req: Request<pb::BackfillRunsRequest>,
    ) -> Result<Response<pb::BackfillRunsResponse>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let mut who = vec![format!("tenant:{tenant_id}")];
        who.extend(req.remote_addr().map(|a| format!("peer:{a}")));
        let r = req.into_inner();
        let binding_id = parse_uuid("binding_id", &r.binding_id)?;
        let start = r
            .start_time
            .as_ref()
            .ok_or_else(|| invalid(FieldViolation::new("start_time", "is required")))
            .and_then(|t| time_from("start_time", t).map_err(invalid))?;
        let end = r
            .end_time
            .as_ref()
            .ok_or_else(|| invalid(FieldViolation::new("end_time", "is required")))
            .and_then(|t| time_from("end_time", t).map_err(invalid))?;
        let now = self.0.clock.now();
        if end <= start {
            return Err(invalid(FieldViolation::new(
                "end_time",
                "must be after start_time",
            )));
        }
        if end > now {
            return Err(invalid(FieldViolation::new(
                "end_time",
                "must not be in the future",
            )));
        }
        let b = db::bindings::binding_get(&self.0.pool, &tenant_id, binding_id)
            .await
            .map_err(|e| db_status(e, format_args!("binding {binding_id}")))?;
        require_healthy(&b)?;
        let schedule = b.effective_schedule.clone();
        let times = self
            .0
            .costly
            .run(who, "BackfillRuns", move || {
                let mut times = Vec::new();
                let mut t = start
                    .checked_sub_signed(chrono::Duration::microseconds(1))
                    .and_then(|s| schedule.next_after(s));
                while let Some(x) = t.filter(|x| *x < end) {
                    if times.len() == MAX_BACKFILL {
                        return Err(invalid(FieldViolation::new(
                            "end_time",
                            format!(
                                "the range holds more than {MAX_BACKFILL} fire times; narrow it"
                            ),
                        )));
                    }
                    times.push(x);
                    t = schedule.next_after(x);
                }
                Ok(times)
            })
            .await??;
        let scheduled_times = times.iter().map(|t| time_to(*t)).collect();
        // A real backfill is audited even when the range holds no fire time.
        if r.dry_run {
            return Ok(Response::new(pb::BackfillRunsResponse {
                scheduled_times,
                run_ids: Vec::new(),
            }));
        }
        self.0.rates.runs(&tenant_id, times.len())?;
        let def = db::definitions::definition_get(&self.0.pool, &b.definition, None)
            .await
            .map_err(|e| db_status(e, format_args!("definition {:?}", b.definition)))?;
        let runs: Vec<NewRun> = times
            .iter()
            .map(|t| {
                let spec = RunSpec {
                    tenant_id: tenant_id.clone(),
                    binding_id,
                    definition: b.definition.clone(),
                    handler: def.run_handler(),
                    params: b.effective_params.clone(),
                    policy: def.policy,
                };
                NewRun::backfill(spec, *t)
            })
            .collect();
        // All or nothing: one transaction, in chunks.
        let mut tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), "runs"))?;
        bound(&mut tx, binding_id).await?;
        check_hourly_budget(&mut tx, &tenant_id, runs.len() as u64, now).await?;
        let mut events = Vec::with_capacity(runs.len());
        for chunk in runs.chunks(1000) {
            events.extend(
                db::runs::run_insert(&mut tx, &self.0.node_id, chunk, now)
                    .await
                    .map_err(|e| db_status(e, "runs"))?,
            );
        }
        let event = caller.audit(
            now,
            Some(&tenant_id),
            method,
            format!("binding/{binding_id}"),
            None,
            Some(serde_json::json!({
                "start_time": start,
                "end_time": end,
                "runs": runs.len(),
                "first_run_id": runs.first().map(|r| r.id),
            })),
        );
        record(&mut tx, &event, "runs").await?;
        tx.commit().await.map_err(|e| db_status(e.into(), "runs"))?;
        self.0.bus.publish(events);
        self.0.executor_wake.notify_one();
        tracing::info!(binding = %binding_id, runs = runs.len(), "backfill created");
        if runs.len() >= ANALYZE_AFTER {
            let pool = self.0.pool.clone();
            tokio::spawn(async move { db::runs::run_analyze_after_burst(&pool).await });
        }
        Ok(Response::new(pb::BackfillRunsResponse {
            scheduled_times,
            run_ids: runs.iter().map(|r| r.id.to_string()).collect(),
        }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("id", &req.get_ref().id)?;
        let run = db::runs::run_get(&self.0.pool, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, format_args!("run {id}")))?;
        Ok(Response::new(run_to(&run)))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let limit = page_size(r.page_size, 50)?;
        let before = if r.page_token.is_empty() {
            Uuid::max()
        } else {
            parse_uuid("page_token", &r.page_token)?
        };
        let binding_id = if r.binding_id.is_empty() {
            None
        } else {
            Some(parse_uuid("binding_id", &r.binding_id)?)
        };
        let state = state_from("state", r.state).map_err(invalid)?;
        let list = db::runs::run_list(
            &self.0.pool,
            &tenant_id,
            before,
            binding_id,
            state,
            limit + 1,
        )
        .await
        .map_err(|e| db_status(e, "runs"))?;
        let (list, next_page_token) = page(list, limit, |r| r.id.to_string());
        Ok(Response::new(pb::ListRunsResponse {
            runs: list.iter().map(run_to).collect(),
            next_page_token,
        }))
    }
}
