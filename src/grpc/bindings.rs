//! `sked.v1.BindingService`: parses requests, calls
//! [`usecase::bindings`], converts the results.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::authz::{Grant, tenant_grant};
use super::convert::{
    binding_status_from, binding_to, overrides_from, retry_policy_from, schedule_from,
    struct_to_json, time_from, timeout_from,
};
use super::notifications::rule_to;
use super::{Ctx, invalid, page_size, parse_uuid, update_paths};
use crate::domain::{FieldViolation, validate_definition_name, validate_effective_window};
use crate::proto::v1 as pb;
use crate::proto::v1::binding_service_server::BindingService;
use crate::usecase::Actor;
use crate::usecase::bindings::{self as uc, BindingChange};
use crate::usecase::notifications as notify_uc;

/// Implements `BindingService`.
#[derive(Debug, Clone)]
pub struct Bindings(pub Ctx);

impl Bindings {
    /// Fills in each binding's `effective.notification_rules` (and
    /// "notification_rules" in `effective.overridden` when the binding has
    /// its own): one query for all of them.
    async fn with_rules(&self, tenant: &str, list: &mut [pb::Binding]) -> Result<(), Status> {
        let ids: Vec<Uuid> = list.iter().filter_map(|b| b.id.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut rules = notify_uc::effective_rules_many(&self.0.core, tenant, &ids).await?;
        for b in list {
            let Some(e) = b.id.parse().ok().and_then(|id: Uuid| rules.remove(&id)) else {
                continue;
            };
            let effective = b.effective.get_or_insert_with(Default::default);
            effective.notification_rules = e.rules.iter().map(|r| rule_to(r, None)).collect();
            if e.overrides {
                effective.overridden.push("notification_rules".into());
            }
        }
        Ok(())
    }

    /// One binding as answered: with its notification rules in force.
    async fn respond(&self, tenant: &str, b: pb::Binding) -> Result<Response<pb::Binding>, Status> {
        let mut one = [b];
        self.with_rules(tenant, &mut one).await?;
        let [b] = one;
        Ok(Response::new(b))
    }
}

#[tonic::async_trait]
impl BindingService for Bindings {
    async fn create_binding(
        &self,
        req: Request<pb::CreateBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let b = req
            .into_inner()
            .binding
            .ok_or_else(|| invalid(FieldViolation::new("binding", "is required")))?;
        validate_definition_name("binding.definition", &b.definition).map_err(invalid)?;
        let schedule = schedule_from("binding.schedule", b.schedule.as_ref()).map_err(invalid)?;
        let params = b.params.as_ref().map(struct_to_json);
        let (effective_from, effective_until) = window_from(&b)?;
        let overrides = overrides_from(&b).map_err(invalid)?;
        let new = uc::NewBinding {
            overrides,
            definition: b.definition,
            schedule,
            params,
            effective_from,
            effective_until,
            enabled: b.enabled.unwrap_or(true),
        };
        let actor = Actor::new(&caller, method);
        let binding = uc::create(&self.0.core, actor, &tenant_id, new).await?;
        self.respond(&tenant_id, binding_to(&binding, self.0.core.clock.now()))
            .await
    }

    async fn get_binding(
        &self,
        req: Request<pb::GetBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("binding_id", &req.get_ref().binding_id)?;
        let b = uc::view(&self.0.core, &tenant_id, id).await?;
        self.respond(&tenant_id, binding_to(&b, self.0.core.clock.now()))
            .await
    }

    async fn list_bindings(
        &self,
        req: Request<pb::ListBindingsRequest>,
    ) -> Result<Response<pb::ListBindingsResponse>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let size = page_size(r.page_size, 50)?;
        let filter = uc::BindingFilter {
            definition: (!r.definition.is_empty()).then_some(r.definition),
            labels: r.labels.into_iter().collect(),
            statuses: r
                .statuses
                .iter()
                .enumerate()
                .map(|(i, n)| binding_status_from(&format!("statuses[{i}]"), *n))
                .collect::<Result<_, _>>()
                .map_err(invalid)?,
        };
        let (list, next_page_token) =
            uc::list(&self.0.core, &tenant_id, &filter, size, &r.page_token).await?;
        let now = self.0.core.clock.now();
        let mut bindings: Vec<pb::Binding> = list.iter().map(|b| binding_to(b, now)).collect();
        self.with_rules(&tenant_id, &mut bindings).await?;
        Ok(Response::new(pb::ListBindingsResponse {
            bindings,
            next_page_token,
        }))
    }

    async fn update_binding(
        &self,
        req: Request<pb::UpdateBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let b = r
            .binding
            .ok_or_else(|| invalid(FieldViolation::new("binding", "is required")))?;
        let id = parse_uuid("binding.id", &b.id)?;
        let mut implied = Vec::new();
        if b.schedule.is_some() {
            implied.push("schedule");
        }
        if b.params.is_some() {
            implied.push("params");
        }
        if b.effective_from.is_some() {
            implied.push("effective_from");
        }
        if b.effective_until.is_some() {
            implied.push("effective_until");
        }
        if b.enabled.is_some() {
            implied.push("enabled");
        }
        for (set, path) in [
            (b.timeout.is_some(), "timeout"),
            (b.retry_policy.is_some(), "retry_policy"),
            (b.priority.is_some(), "priority"),
            (b.max_active_runs.is_some(), "max_active_runs"),
        ] {
            if set {
                implied.push(path);
            }
        }
        let paths = update_paths(
            r.update_mask.as_ref(),
            &[
                "schedule",
                "params",
                "effective_from",
                "effective_until",
                "enabled",
                "timeout",
                "retry_policy",
                "priority",
                "max_active_runs",
            ],
            implied,
        )?;
        let (new_from, new_until) = window_from(&b)?;
        let mut changes = Vec::with_capacity(paths.len());
        for path in paths {
            changes.push(match path {
                "schedule" => BindingChange::Schedule(
                    schedule_from("binding.schedule", b.schedule.as_ref()).map_err(invalid)?,
                ),
                "params" => BindingChange::Params(b.params.as_ref().map(struct_to_json)),
                "effective_from" => BindingChange::EffectiveFrom(new_from),
                "effective_until" => BindingChange::EffectiveUntil(new_until),
                "enabled" => BindingChange::Enabled(b.enabled.unwrap_or(true)),
                // Unset in `binding`: the override is cleared (inherit).
                "timeout" => BindingChange::Timeout(
                    timeout_from("binding.timeout", b.timeout.as_ref()).map_err(invalid)?,
                ),
                "retry_policy" => BindingChange::RetryPolicy(
                    b.retry_policy
                        .as_ref()
                        .map(|p| retry_policy_from("binding.retry_policy", Some(p)))
                        .transpose()
                        .map_err(invalid)?,
                ),
                "priority" => BindingChange::Priority(b.priority),
                "max_active_runs" => BindingChange::MaxActiveRuns(
                    overrides_from(&pb::Binding {
                        max_active_runs: b.max_active_runs,
                        ..Default::default()
                    })
                    .map_err(invalid)?
                    .max_active_runs,
                ),
                _ => continue,
            });
        }
        let update = uc::BindingUpdate {
            binding_id: id,
            etag: b.etag,
            changes,
        };
        let actor = Actor::new(&caller, method);
        let b = uc::update(&self.0.core, actor, &tenant_id, update).await?;
        self.respond(&tenant_id, binding_to(&b, self.0.core.clock.now()))
            .await
    }

    async fn pause_binding(
        &self,
        req: Request<pb::PauseBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let id = parse_uuid("binding_id", &r.binding_id)?;
        let expire = r
            .expire_time
            .as_ref()
            .map(|t| time_from("expire_time", t))
            .transpose()
            .map_err(invalid)?;
        let actor = Actor::new(&caller, method);
        let b = uc::pause(&self.0.core, actor, &tenant_id, id, &r.note, expire).await?;
        self.respond(&tenant_id, binding_to(&b, self.0.core.clock.now()))
            .await
    }

    async fn resume_binding(
        &self,
        req: Request<pb::ResumeBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("binding_id", &req.get_ref().binding_id)?;
        let actor = Actor::new(&caller, method);
        let b = uc::resume(&self.0.core, actor, &tenant_id, id).await?;
        self.respond(&tenant_id, binding_to(&b, self.0.core.clock.now()))
            .await
    }

    async fn delete_binding(
        &self,
        req: Request<pb::DeleteBindingRequest>,
    ) -> Result<Response<pb::DeleteBindingResponse>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("binding_id", &req.get_ref().binding_id)?;
        let actor = Actor::new(&caller, method);
        uc::delete(&self.0.core, actor, &tenant_id, id).await?;
        Ok(Response::new(pb::DeleteBindingResponse {}))
    }
}

/// A binding's effective window: (from, until).
type Window = (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// The effective window of an API binding, validated.
fn window_from(b: &pb::Binding) -> Result<Window, Status> {
    let from = b
        .effective_from
        .as_ref()
        .map(|t| time_from("binding.effective_from", t))
        .transpose()
        .map_err(invalid)?;
    let until = b
        .effective_until
        .as_ref()
        .map(|t| time_from("binding.effective_until", t))
        .transpose()
        .map_err(invalid)?;
    validate_effective_window(from, until).map_err(invalid)?;
    Ok((from, until))
}
