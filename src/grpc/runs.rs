//! `sked.v1.RunService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{run_to, state_from, struct_to_json, time_from, time_to};
use super::{Ctx, db_status, invalid, page_size, parse_uuid, tenant};
use crate::db::{self, runs::NewRun};
use crate::domain::{FieldViolation, RunState, RunTrigger, merge_params};
use crate::proto::v1 as pb;
use crate::proto::v1::run_service_server::RunService;

/// Most runs one BackfillRuns creates.
pub const MAX_BACKFILL: usize = 10_000;

/// Implements `RunService`.
#[derive(Debug, Clone)]
pub struct Runs(pub Ctx);

#[tonic::async_trait]
impl RunService for Runs {
    async fn trigger_run(
        &self,
        req: Request<pb::TriggerRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let tenant_id = tenant(&req)?;
        let r = req.into_inner();
        let binding_id = parse_uuid("binding_id", &r.binding_id)?;
        let b = db::bindings::binding_get(&self.0.pool, &tenant_id, binding_id)
            .await
            .map_err(|e| db_status(e, format_args!("binding {binding_id}")))?;
        let def = db::definitions::definition_get(&self.0.pool, &b.definition)
            .await
            .map_err(|e| db_status(e, format_args!("definition {:?}", b.definition)))?;
        let params = match &r.params {
            Some(p) => merge_params(&b.effective_params, &struct_to_json(p)),
            None => b.effective_params.clone(),
        };
        let now = self.0.clock.now();
        let new = NewRun {
            id: Uuid::now_v7(),
            tenant_id: tenant_id.clone(),
            binding_id,
            definition: b.definition.clone(),
            trigger: RunTrigger::Manual,
            scheduled_time: now,
            not_before: now,
            handler: def.handler,
            params,
            state: RunState::Queued,
            reason: String::new(),
        };
        let id = new.id;
        let mut conn = self
            .0
            .pool
            .acquire()
            .await
            .map_err(|e| db_status(e.into(), "run"))?;
        let events = db::runs::run_insert(&mut conn, &self.0.node_id, &[new], now)
            .await
            .map_err(|e| db_status(e, "run"))?;
        drop(conn);
        self.0.bus.publish(events);
        self.0.executor_wake.notify_one();
        let run = db::runs::run_get(&self.0.pool, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, format_args!("run {id}")))?;
        tracing::info!(run = %id, binding = %binding_id, "run triggered");
        Ok(Response::new(run_to(&run)))
    }

    async fn backfill_runs(
        &self,
        req: Request<pb::BackfillRunsRequest>,
    ) -> Result<Response<pb::BackfillRunsResponse>, Status> {
        let tenant_id = tenant(&req)?;
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
        let mut times = Vec::new();
        let mut t = b
            .effective_schedule
            .next_after(start - chrono::Duration::microseconds(1));
        while let Some(x) = t.filter(|x| *x < end) {
            if times.len() == MAX_BACKFILL {
                return Err(invalid(FieldViolation::new(
                    "end_time",
                    format!("the range holds more than {MAX_BACKFILL} fire times; narrow it"),
                )));
            }
            times.push(x);
            t = b.effective_schedule.next_after(x);
        }
        let scheduled_times = times.iter().map(|t| time_to(*t)).collect();
        if r.dry_run || times.is_empty() {
            return Ok(Response::new(pb::BackfillRunsResponse {
                scheduled_times,
                run_ids: Vec::new(),
            }));
        }
        let def = db::definitions::definition_get(&self.0.pool, &b.definition)
            .await
            .map_err(|e| db_status(e, format_args!("definition {:?}", b.definition)))?;
        let runs: Vec<NewRun> = times
            .iter()
            .map(|t| NewRun {
                id: Uuid::now_v7(),
                tenant_id: tenant_id.clone(),
                binding_id,
                definition: b.definition.clone(),
                trigger: RunTrigger::Backfill,
                scheduled_time: *t,
                not_before: *t,
                handler: def.handler.clone(),
                params: b.effective_params.clone(),
                state: RunState::Queued,
                reason: String::new(),
            })
            .collect();
        // All or nothing: one transaction, in chunks.
        let mut tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), "runs"))?;
        let mut events = Vec::with_capacity(runs.len());
        for chunk in runs.chunks(1000) {
            events.extend(
                db::runs::run_insert(&mut tx, &self.0.node_id, chunk, now)
                    .await
                    .map_err(|e| db_status(e, "runs"))?,
            );
        }
        tx.commit().await.map_err(|e| db_status(e.into(), "runs"))?;
        self.0.bus.publish(events);
        self.0.executor_wake.notify_one();
        tracing::info!(binding = %binding_id, runs = runs.len(), "backfill created");
        Ok(Response::new(pb::BackfillRunsResponse {
            scheduled_times,
            run_ids: runs.iter().map(|r| r.id.to_string()).collect(),
        }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let tenant_id = tenant(&req)?;
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
        let tenant_id = tenant(&req)?;
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
        let more = list.len() as i64 > limit;
        let list: Vec<_> = list.into_iter().take(limit as usize).collect();
        let next_page_token = if more {
            list.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRunsResponse {
            runs: list.iter().map(run_to).collect(),
            next_page_token,
        }))
    }
}
