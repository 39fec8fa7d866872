//! `sked.v1.RunService`: parses requests, calls [`usecase::runs`],
//! converts the results.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::TENANT_HEADER;
use super::auth::{call_tenant, require_platform};
use super::authz::{Grant, grant, tenant_grant};
use super::convert::{
    run_stats_to, run_to, state_from, struct_to_json, time_from, time_to, trigger_from,
};
use super::{Ctx, invalid, page_size, parse_uuid};
use crate::domain::FieldViolation;
use crate::domain::stats::StatsInterval;
use crate::proto::v1 as pb;
use crate::proto::v1::run_service_server::RunService;
use crate::usecase::{self, Actor, runs};

/// Implements `RunService`.
#[derive(Debug, Clone)]
pub struct Runs(pub Ctx);

/// A required timestamp field.
fn required_time(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<chrono::DateTime<chrono::Utc>, Status> {
    let t = t.ok_or_else(|| invalid(FieldViolation::new(field, "is required")))?;
    time_from(field, t).map_err(invalid)
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
        let trigger = runs::Trigger {
            binding_id: parse_uuid("binding_id", &r.binding_id)?,
            idempotency_key: r.idempotency_key,
            run_time: r
                .run_time
                .as_ref()
                .map(|t| time_from("run_time", t))
                .transpose()
                .map_err(invalid)?,
            params: r.params.as_ref().map(struct_to_json),
        };
        let actor = Actor::new(&caller, method);
        let run = runs::trigger(&self.0.core, actor, &tenant_id, trigger).await?;
        Ok(Response::new(run_to(&run)))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let run_id = parse_uuid("run_id", &r.run_id)?;
        let actor = Actor::new(&caller, method);
        let run = runs::cancel(&self.0.core, actor, &tenant_id, run_id, &r.reason).await?;
        Ok(Response::new(run_to(&run)))
    }

    async fn retry_run(
        &self,
        req: Request<pb::RetryRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        self.0.rates.runs(&tenant_id, 1)?;
        let run_id = parse_uuid("run_id", &req.get_ref().run_id)?;
        let actor = Actor::new(&caller, method);
        let run = runs::retry(&self.0.core, actor, &tenant_id, run_id).await?;
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
        let start = required_time("start_time", r.start_time.as_ref())?;
        let end = required_time("end_time", r.end_time.as_ref())?;
        let core = &self.0.core;
        let now = core.clock.now();
        // The range's own errors before any read.
        runs::check_backfill_range(start, end, now)?;
        let binding = usecase::bindings::get(core, &tenant_id, binding_id).await?;
        usecase::require_healthy(&binding)?;
        // Enumerating up to MAX_BACKFILL fire times is CPU work: bounded per
        // tenant and connection.
        let b = binding.clone();
        let times = self
            .0
            .costly
            .run(who, "BackfillRuns", move || {
                runs::backfill_times(&b, start, end, now).map_err(Status::from)
            })
            .await??;
        let scheduled_times = times.iter().map(|t| time_to(*t)).collect();
        if r.dry_run {
            return Ok(Response::new(pb::BackfillRunsResponse {
                scheduled_times,
                run_ids: Vec::new(),
            }));
        }
        self.0.rates.runs(&tenant_id, times.len())?;
        let actor = Actor::new(&caller, method);
        // A real backfill is audited even when the range holds no fire time.
        let ids = runs::backfill(core, actor, &binding, (start, end), &times).await?;
        Ok(Response::new(pb::BackfillRunsResponse {
            scheduled_times,
            run_ids: ids.iter().map(Uuid::to_string).collect(),
        }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("run_id", &req.get_ref().run_id)?;
        let run = runs::get(&self.0.core, &tenant_id, id).await?;
        let views =
            runs::workflow_views(&self.0.core, &tenant_id, std::slice::from_ref(&run), true)
                .await?;
        Ok(Response::new(run_with_view(&run, views.first())))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let size = page_size(r.page_size, 50)?;
        let mut states = Vec::with_capacity(r.states.len() + 1);
        for (i, n) in r.states.iter().enumerate() {
            let field = format!("states[{i}]");
            let s = state_from(&field, *n).map_err(invalid)?.ok_or_else(|| {
                invalid(FieldViolation::new(
                    field,
                    "UNSPECIFIED is not a filter value",
                ))
            })?;
            states.push(s);
        }
        states.extend(state_from("state", r.state).map_err(invalid)?);
        let optional_time = |field: &str, t: Option<&prost_types::Timestamp>| {
            t.map(|t| time_from(field, t)).transpose().map_err(invalid)
        };
        let filter = runs::RunFilter {
            binding_id: if r.binding_id.is_empty() {
                None
            } else {
                Some(parse_uuid("binding_id", &r.binding_id)?)
            },
            states,
            trigger: trigger_from("trigger", r.trigger).map_err(invalid)?,
            definition: (!r.definition.is_empty()).then_some(r.definition),
            node: (!r.node.is_empty()).then_some(r.node),
            scheduled_from: optional_time("scheduled_start_time", r.scheduled_start_time.as_ref())?,
            scheduled_until: optional_time("scheduled_end_time", r.scheduled_end_time.as_ref())?,
            parent_run_id: if r.parent_run_id.is_empty() {
                None
            } else {
                Some(parse_uuid("parent_run_id", &r.parent_run_id)?)
            },
            oldest_first: match pb::ListRunsOrder::try_from(r.order) {
                Ok(pb::ListRunsOrder::Unspecified | pb::ListRunsOrder::NewestFirst) => false,
                Ok(pb::ListRunsOrder::OldestFirst) => true,
                Err(_) => {
                    return Err(invalid(FieldViolation::new(
                        "order",
                        format!("{} is not a ListRunsOrder", r.order),
                    )));
                }
            },
        };
        let (list, next_page_token) =
            runs::list(&self.0.core, &tenant_id, &filter, size, &r.page_token).await?;
        let views = runs::workflow_views(&self.0.core, &tenant_id, &list, false).await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: list
                .iter()
                .zip(&views)
                .map(|(r, v)| run_with_view(r, Some(v)))
                .collect(),
            next_page_token,
        }))
    }

    async fn get_run_stats(
        &self,
        req: Request<pb::GetRunStatsRequest>,
    ) -> Result<Response<pb::RunStats>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let r = req.get_ref();
        let subject = match (r.binding_id.is_empty(), r.definition.is_empty()) {
            (false, false) => {
                return Err(invalid(FieldViolation::new(
                    "definition",
                    "give at most one of binding_id and definition",
                )));
            }
            (false, true) => runs::StatsSubject::Binding {
                tenant: call_tenant(&caller, req.metadata())?,
                id: parse_uuid("binding_id", &r.binding_id)?,
            },
            (true, false) => {
                // Across tenants: the platform's view of a definition.
                require_platform(&caller, method)?;
                let tenant = match req.metadata().get(TENANT_HEADER) {
                    Some(_) => Some(call_tenant(&caller, req.metadata())?),
                    None => None,
                };
                runs::StatsSubject::Definition {
                    name: r.definition.clone(),
                    tenant,
                }
            }
            (true, true) => runs::StatsSubject::Tenant(call_tenant(&caller, req.metadata())?),
        };
        let q = runs::StatsQuery {
            subject,
            start: required_time("start_time", r.start_time.as_ref())?,
            end: required_time("end_time", r.end_time.as_ref())?,
            interval: match pb::StatsInterval::try_from(r.interval) {
                Ok(pb::StatsInterval::Unspecified) => None,
                Ok(pb::StatsInterval::Hour) => Some(StatsInterval::Hour),
                Ok(pb::StatsInterval::Day) => Some(StatsInterval::Day),
                Err(_) => {
                    return Err(invalid(FieldViolation::new(
                        "interval",
                        format!("{} is not a StatsInterval", r.interval),
                    )));
                }
            },
        };
        let stats = runs::stats(&self.0.core, &q).await?;
        Ok(Response::new(run_stats_to(&stats)))
    }
}

/// Run → API with its place in a workflow (its parent and step name, a
/// workflow run's steps).
fn run_with_view(r: &crate::domain::Run, v: Option<&runs::WorkflowView>) -> pb::Run {
    let mut out = run_to(r);
    if let Some(v) = v {
        out.parent_run_id = v.parent_run_id.map(|u| u.to_string()).unwrap_or_default();
        out.step = v.step.clone().unwrap_or_default();
        out.steps = v
            .steps
            .iter()
            .map(|(name, run)| pb::WorkflowStepState {
                name: name.clone(),
                state: run.as_ref().map_or(pb::RunState::Unspecified, |r| {
                    crate::grpc::convert::state_to(r.state)
                }) as i32,
                run_id: run.as_ref().map(|r| r.id.to_string()).unwrap_or_default(),
                attempt: run.as_ref().map_or(0, |r| r.attempt),
                reason: run
                    .as_ref()
                    .and_then(|r| r.reason.clone())
                    .unwrap_or_default(),
            })
            .collect();
    }
    out
}
