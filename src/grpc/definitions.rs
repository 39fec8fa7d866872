//! `sked.v1.DefinitionService`: parses requests, calls
//! [`usecase::definitions`], converts the results.

use tonic::{Request, Response, Status};

use super::authz::{Grant, grant};
use super::convert::{
    definition_to, handler_from, misfire_policy_from, overlap_from, params_from, retry_policy_from,
    schedule_from, tenant_scope_from, time_from, time_to, timeout_from,
};
use super::{Ctx, invalid, page_size, update_paths};
use crate::domain::{
    Definition, FieldViolation, RunPolicy, validate_definition_name, validate_max_output_bytes,
    validate_merged_params,
};
use crate::proto::v1 as pb;
use crate::proto::v1::definition_service_server::DefinitionService;
use crate::usecase::definitions::{self as uc, DefinitionChange};
use crate::usecase::{Actor, Page};

/// Implements `DefinitionService`.
#[derive(Debug, Clone)]
pub struct Definitions(pub Ctx);

/// The change UpdateDefinition's `path` asks for, parsed from `d`.
fn change_from(path: &str, d: &pb::TaskDefinition) -> Result<Option<DefinitionChange>, Status> {
    Ok(Some(match path {
        "display_name" => DefinitionChange::DisplayName(d.display_name.clone()),
        "description" => DefinitionChange::Description(d.description.clone()),
        "labels" => DefinitionChange::Labels(d.labels.clone().into_iter().collect()),
        "command" | "http" => DefinitionChange::Handler(
            handler_from("definition", d.handler.as_ref()).map_err(invalid)?,
        ),
        "schedule" => DefinitionChange::Schedule(
            schedule_from("definition.schedule", d.schedule.as_ref())
                .map_err(invalid)?
                .ok_or_else(|| {
                    invalid(FieldViolation::new("definition.schedule", "is required"))
                })?,
        ),
        "params" => {
            let params = params_from(d.params.as_ref());
            validate_merged_params("definition.params", &params).map_err(invalid)?;
            DefinitionChange::Params(params)
        }
        "misfire_policy" => DefinitionChange::MisfirePolicy(
            misfire_policy_from("definition.misfire_policy", d.misfire_policy.as_ref())
                .map_err(invalid)?,
        ),
        "retry_policy" => DefinitionChange::RetryPolicy(
            retry_policy_from("definition.retry_policy", d.retry_policy.as_ref())
                .map_err(invalid)?,
        ),
        "timeout" => DefinitionChange::Timeout(
            timeout_from("definition.timeout", d.timeout.as_ref()).map_err(invalid)?,
        ),
        "overlap_policy" => DefinitionChange::OverlapPolicy(
            overlap_from("definition.overlap_policy", d.overlap_policy).map_err(invalid)?,
        ),
        "priority" => DefinitionChange::Priority(d.priority),
        "enabled" => DefinitionChange::Enabled(d.enabled.unwrap_or(true)),
        "deletion_protection" => DefinitionChange::DeletionProtection(d.deletion_protection),
        "max_output_bytes" => {
            if let Some(m) = d.max_output_bytes {
                validate_max_output_bytes("definition.max_output_bytes", m).map_err(invalid)?;
            }
            DefinitionChange::MaxOutputBytes(d.max_output_bytes)
        }
        "max_active_runs" => DefinitionChange::MaxActiveRuns(max_active_runs_from(d)?),
        "tenant_scope" => DefinitionChange::TenantScope(
            tenant_scope_from("definition.tenant_scope", d.tenant_scope.as_ref())
                .map_err(invalid)?,
        ),
        _ => return Ok(None),
    }))
}

/// A definition's `max_active_runs`: unset or 0 = no cap, else 1 to
/// [`MAX_ACTIVE_RUNS`](crate::domain::policy::MAX_ACTIVE_RUNS).
fn max_active_runs_from(d: &pb::TaskDefinition) -> Result<Option<u32>, Status> {
    let n = d.max_active_runs.unwrap_or(0);
    crate::domain::policy::validate_max_active_runs("definition.max_active_runs", n, true)
        .map_err(invalid)?;
    Ok((n > 0).then_some(n))
}

#[tonic::async_trait]
impl DefinitionService for Definitions {
    async fn create_definition(
        &self,
        req: Request<pb::CreateDefinitionRequest>,
    ) -> Result<Response<pb::TaskDefinition>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let d = req
            .into_inner()
            .definition
            .ok_or_else(|| invalid(FieldViolation::new("definition", "is required")))?;
        validate_definition_name("definition.name", &d.name).map_err(invalid)?;
        let handler = handler_from("definition", d.handler.as_ref()).map_err(invalid)?;
        let schedule = schedule_from("definition.schedule", d.schedule.as_ref())
            .map_err(invalid)?
            .ok_or_else(|| {
                invalid(FieldViolation::new(
                    "definition.schedule",
                    "is required (use manual {} for trigger-only)",
                ))
            })?;
        let misfire_policy =
            misfire_policy_from("definition.misfire_policy", d.misfire_policy.as_ref())
                .map_err(invalid)?;
        let policy = RunPolicy {
            overlap: overlap_from("definition.overlap_policy", d.overlap_policy)
                .map_err(invalid)?,
            retry: retry_policy_from("definition.retry_policy", d.retry_policy.as_ref())
                .map_err(invalid)?,
            timeout_secs: timeout_from("definition.timeout", d.timeout.as_ref())
                .map_err(invalid)?,
            priority: d.priority,
        };
        let tenant_scope = tenant_scope_from("definition.tenant_scope", d.tenant_scope.as_ref())
            .map_err(invalid)?;
        if let Some(m) = d.max_output_bytes {
            validate_max_output_bytes("definition.max_output_bytes", m).map_err(invalid)?;
        }
        let params = params_from(d.params.as_ref());
        validate_merged_params("definition.params", &params).map_err(invalid)?;
        let max_active_runs = max_active_runs_from(&d)?;
        let def = Definition {
            max_active_runs,
            max_output_bytes: d.max_output_bytes,
            protected: d.deletion_protection,
            tenant_scope,
            misfire_policy,
            policy,
            enabled: d.enabled.unwrap_or(true),
            name: d.name,
            display_name: d.display_name,
            description: d.description,
            labels: d.labels.into_iter().collect(),
            handler,
            schedule,
            params,
            // Times and version are the use case's to set.
            create_time: Default::default(),
            update_time: Default::default(),
            version: 0,
        };
        let actor = Actor::new(&caller, method);
        let def = uc::create(&self.0.core, actor, def).await?;
        Ok(Response::new(definition_to(&def)))
    }

    async fn get_definition(
        &self,
        req: Request<pb::GetDefinitionRequest>,
    ) -> Result<Response<pb::TaskDefinition>, Status> {
        let caller = grant(&req)?.caller;
        let name = req.into_inner().name;
        validate_definition_name("name", &name).map_err(invalid)?;
        let d = uc::get(&self.0.core, caller.tenant.as_deref(), &name).await?;
        Ok(Response::new(definition_to(&d)))
    }

    async fn list_definitions(
        &self,
        req: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        let caller = grant(&req)?.caller;
        let r = req.into_inner();
        let size = page_size(r.page_size, 50)?;
        // The token is the last name of the previous page.
        if !r.page_token.is_empty() {
            validate_definition_name("page_token", &r.page_token).map_err(invalid)?;
        }
        let page = Page {
            size,
            after: (!r.page_token.is_empty()).then_some(r.page_token),
        };
        let (defs, next) = uc::list(&self.0.core, caller.tenant.as_deref(), page).await?;
        Ok(Response::new(pb::ListDefinitionsResponse {
            definitions: defs.iter().map(definition_to).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn update_definition(
        &self,
        req: Request<pb::UpdateDefinitionRequest>,
    ) -> Result<Response<pb::TaskDefinition>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let r = req.into_inner();
        let d = r
            .definition
            .ok_or_else(|| invalid(FieldViolation::new("definition", "is required")))?;
        validate_definition_name("definition.name", &d.name).map_err(invalid)?;
        let mut implied = Vec::new();
        for (set, path) in [
            (!d.display_name.is_empty(), "display_name"),
            (!d.description.is_empty(), "description"),
            (!d.labels.is_empty(), "labels"),
            (d.handler.is_some(), "command"),
            (d.schedule.is_some(), "schedule"),
            (d.params.is_some(), "params"),
            (d.misfire_policy.is_some(), "misfire_policy"),
            (d.retry_policy.is_some(), "retry_policy"),
            (d.timeout.is_some(), "timeout"),
            (d.overlap_policy != 0, "overlap_policy"),
            (d.priority != 0, "priority"),
            (d.enabled.is_some(), "enabled"),
            (d.deletion_protection, "deletion_protection"),
            (d.tenant_scope.is_some(), "tenant_scope"),
            (d.max_output_bytes.is_some(), "max_output_bytes"),
            (d.max_active_runs.is_some(), "max_active_runs"),
        ] {
            if set {
                implied.push(path);
            }
        }
        let paths = update_paths(
            r.update_mask.as_ref(),
            &[
                "display_name",
                "description",
                "labels",
                "command",
                "http",
                "schedule",
                "params",
                "misfire_policy",
                "retry_policy",
                "timeout",
                "overlap_policy",
                "priority",
                "enabled",
                "deletion_protection",
                "tenant_scope",
                "max_output_bytes",
                "max_active_runs",
            ],
            implied,
        )?;
        let mut changes = Vec::with_capacity(paths.len());
        for path in paths {
            changes.extend(change_from(path, &d)?);
        }
        let update = uc::DefinitionUpdate {
            name: d.name,
            etag: d.etag,
            changes,
        };
        let actor = Actor::new(&caller, method);
        let def = uc::update(&self.0.core, actor, update).await?;
        Ok(Response::new(definition_to(&def)))
    }

    async fn delete_definition(
        &self,
        req: Request<pb::DeleteDefinitionRequest>,
    ) -> Result<Response<pb::DeleteDefinitionResponse>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let r = req.into_inner();
        validate_definition_name("name", &r.name).map_err(invalid)?;
        let actor = Actor::new(&caller, method);
        uc::delete(&self.0.core, actor, &r.name, r.force).await?;
        Ok(Response::new(pb::DeleteDefinitionResponse {}))
    }

    async fn preview_schedule(
        &self,
        req: Request<pb::PreviewScheduleRequest>,
    ) -> Result<Response<pb::PreviewScheduleResponse>, Status> {
        let caller = grant(&req)?.caller;
        let who = super::limit::caller_keys(&caller, &req);
        let r = req.into_inner();
        let count = uc::preview_count(r.count)?;
        let after = match &r.after {
            Some(t) => time_from("after", t).map_err(invalid)?,
            None => self.0.core.clock.now(),
        };
        let schedule = schedule_from("schedule", r.schedule.as_ref())
            .map_err(invalid)?
            .ok_or_else(|| invalid(FieldViolation::new("schedule", "is required")))?;
        let preview = uc::preview(schedule, after, count)?;
        // Up to MAX_PREVIEW schedule steps are CPU work: bounded per
        // tenant and connection.
        let fires = self
            .0
            .costly
            .run(who, "PreviewSchedule", move || preview.fire_times())
            .await?;
        Ok(Response::new(pb::PreviewScheduleResponse {
            fire_times: fires
                .into_iter()
                .map(|f| pb::FireTime {
                    time: Some(time_to(f.time)),
                    local_time: f.local_time,
                    dst_shifted: f.dst_shifted,
                })
                .collect(),
        }))
    }
}
