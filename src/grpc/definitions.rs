//! `sked.v1.DefinitionService`.

use tonic::{Request, Response, Status};

use super::authz::{Grant, grant};
use super::convert::{
    definition_to, handler_from, misfire_policy_from, overlap_from, params_from, retry_policy_from,
    schedule_from, tenant_scope_from, time_from, time_to, timeout_from,
};
use super::{Ctx, check_etag, db_status, invalid, page, page_size, record, update_paths};
use crate::db;
use crate::db::definitions as q;
use crate::domain::RunReason;
use crate::domain::{
    Definition, FieldViolation, RunPolicy, TenantScope, effective_schedule, merge_params,
    validate_definition_name, validate_max_output_bytes, validate_merged_params,
};
use crate::proto::v1 as pb;
use crate::proto::v1::definition_service_server::DefinitionService;
use crate::usecase::audit;

/// Most fire times one PreviewSchedule returns.
pub const MAX_PREVIEW: i32 = 1000;

/// Implements `DefinitionService`.
#[derive(Debug, Clone)]
pub struct Definitions(pub Ctx);

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
        let now = self.0.core.clock.now();
        let def = Definition {
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
            create_time: now,
            update_time: now,
            version: 1,
        };
        let what = format!("definition {:?}", def.name);
        let mut tx = self
            .0
            .core
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        q::definition_insert(&mut *tx, &def)
            .await
            .map_err(|e| db_status(e, &what))?;
        let event = caller.audit(
            now,
            None,
            method,
            format!("definition/{}", def.name),
            None,
            Some(audit::definition(&def)),
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        tracing::info!(definition = %def.name, "definition created");
        Ok(Response::new(definition_to(&def)))
    }

    async fn get_definition(
        &self,
        req: Request<pb::GetDefinitionRequest>,
    ) -> Result<Response<pb::TaskDefinition>, Status> {
        let caller = grant(&req)?.caller;
        let name = req.into_inner().name;
        validate_definition_name("name", &name).map_err(invalid)?;
        let d = q::definition_get(&self.0.core.pool, &name, caller.tenant.as_deref())
            .await
            .map_err(|e| {
                db_status(
                    e,
                    format_args!("definition {}", crate::domain::quote(&name)),
                )
            })?;
        Ok(Response::new(definition_to(&d)))
    }

    async fn list_definitions(
        &self,
        req: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        let caller = grant(&req)?.caller;
        let r = req.into_inner();
        let limit = page_size(r.page_size, 50)?;
        // The token is the last name of the previous page.
        if !r.page_token.is_empty() {
            validate_definition_name("page_token", &r.page_token).map_err(invalid)?;
        }
        let defs = q::definition_list(
            &self.0.core.pool,
            &r.page_token,
            caller.tenant.as_deref(),
            limit + 1,
        )
        .await
        .map_err(|e| db_status(e, "definitions"))?;
        let (defs, next_page_token) = page(defs, limit, |d| d.name.clone());
        Ok(Response::new(pb::ListDefinitionsResponse {
            definitions: defs.iter().map(definition_to).collect(),
            next_page_token,
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
            ],
            implied,
        )?;
        let what = format!("definition {:?}", d.name);
        let mut tx = self
            .0
            .core
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        let mut cur = q::definition_get_for_update(&mut *tx, &d.name)
            .await
            .map_err(|e| db_status(e, &what))?;
        check_etag(&what, &d.etag, cur.version)?;
        let before = audit::definition(&cur);
        let old_version = cur.version;
        let mut schedule_changed = false;
        for path in paths.iter().copied() {
            match path {
                "display_name" => cur.display_name = d.display_name.clone(),
                "description" => cur.description = d.description.clone(),
                "labels" => cur.labels = d.labels.clone().into_iter().collect(),
                "command" => {
                    cur.handler = handler_from("definition", d.handler.as_ref()).map_err(invalid)?
                }
                "schedule" => {
                    let s = schedule_from("definition.schedule", d.schedule.as_ref())
                        .map_err(invalid)?
                        .ok_or_else(|| {
                            invalid(FieldViolation::new("definition.schedule", "is required"))
                        })?;
                    schedule_changed |= s != cur.schedule;
                    cur.schedule = s;
                }
                "params" => {
                    cur.params = params_from(d.params.as_ref());
                    validate_merged_params("definition.params", &cur.params).map_err(invalid)?;
                }
                "misfire_policy" => {
                    cur.misfire_policy =
                        misfire_policy_from("definition.misfire_policy", d.misfire_policy.as_ref())
                            .map_err(invalid)?
                }
                "retry_policy" => {
                    cur.policy.retry =
                        retry_policy_from("definition.retry_policy", d.retry_policy.as_ref())
                            .map_err(invalid)?
                }
                "timeout" => {
                    cur.policy.timeout_secs =
                        timeout_from("definition.timeout", d.timeout.as_ref()).map_err(invalid)?
                }
                "overlap_policy" => {
                    cur.policy.overlap = overlap_from("definition.overlap_policy", d.overlap_policy)
                        .map_err(invalid)?
                }
                "priority" => cur.policy.priority = d.priority,
                "enabled" => cur.enabled = d.enabled.unwrap_or(true),
                "deletion_protection" => cur.protected = d.deletion_protection,
                "max_output_bytes" => {
                    if let Some(m) = d.max_output_bytes {
                        validate_max_output_bytes("definition.max_output_bytes", m)
                            .map_err(invalid)?;
                    }
                    cur.max_output_bytes = d.max_output_bytes;
                }
                "tenant_scope" => {
                    let scope =
                        tenant_scope_from("definition.tenant_scope", d.tenant_scope.as_ref())
                            .map_err(invalid)?;
                    if let TenantScope::AllowList(allow) = &scope {
                        let stranded = q::definition_bound_outside(&mut *tx, &cur.name, allow)
                            .await
                            .map_err(|e| db_status(e, &what))?;
                        if !stranded.is_empty() {
                            return Err(Status::failed_precondition(format!(
                                "tenants outside the new tenant_scope still bind {what}: {}; delete their bindings first",
                                stranded.join(", ")
                            )));
                        }
                    }
                    cur.tenant_scope = scope;
                }
                _ => {}
            }
        }
        if paths.contains(&"params") {
            // Runs receive the merge: it must stay within the limit for
            // every binding that overrides some params.
            let overrides = db::bindings::binding_list_param_overrides(&mut *tx, &cur.name)
                .await
                .map_err(|e| db_status(e, &what))?;
            for (id, p) in overrides {
                validate_merged_params(
                    &format!("definition.params (binding {id})"),
                    &merge_params(&cur.params, &p),
                )
                .map_err(invalid)?;
            }
        }
        let now = self.0.core.clock.now();
        cur.version += 1;
        cur.update_time = now;
        q::definition_update(&mut *tx, &cur, old_version)
            .await
            .map_err(|e| db_status(e, &what))?;
        if !cur.enabled {
            // A scheduler pass firing one of its bindings ends first.
            db::bindings::binding_lock_by_definition(&mut *tx, &cur.name)
                .await
                .map_err(|e| db_status(e, &what))?;
        }
        super::bindings::hold_or_release(&mut tx, !cur.enabled, &what).await?;
        if schedule_changed {
            // Bindings that inherit the schedule follow it at once; an
            // interval without anchor is anchored at the change.
            let bindings = db::bindings::binding_list_inheriting_schedule(&mut *tx, &cur.name)
                .await
                .map_err(|e| db_status(e, &what))?;
            let ids: Vec<_> = bindings.iter().map(|b| b.0).collect();
            let schedules: Vec<_> = bindings
                .iter()
                .map(|(_, from, until)| effective_schedule(&cur.schedule, now, *from, *until))
                .collect();
            let nexts: Vec<_> = schedules.iter().map(|s| s.next_after(now)).collect();
            db::bindings::binding_set_effective_schedules(&mut *tx, &ids, &schedules, &nexts, now)
                .await
                .map_err(|e| db_status(e, &what))?;
        }
        let event = caller.audit(
            now,
            None,
            method,
            format!("definition/{}", cur.name),
            Some(before),
            Some(audit::definition(&cur)),
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        tracing::info!(definition = %cur.name, version = cur.version, schedule_changed, "definition updated");
        Ok(Response::new(definition_to(&cur)))
    }

    async fn delete_definition(
        &self,
        req: Request<pb::DeleteDefinitionRequest>,
    ) -> Result<Response<pb::DeleteDefinitionResponse>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let r = req.into_inner();
        let name = r.name;
        validate_definition_name("name", &name).map_err(invalid)?;
        let what = format!("definition {}", crate::domain::quote(&name));
        let mut tx = self
            .0
            .core
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        // A definition whose stored data cannot be read can still be
        // deleted (the row is locked all the same; the audit records why
        // its content is missing).
        let mut before = match q::definition_get_for_update(&mut *tx, &name).await {
            Ok(cur) => audit::definition(&cur),
            Err(e @ db::Error::Corrupt { .. }) => {
                tracing::warn!(definition = %name, error = %e, "deleting a definition that cannot be read");
                serde_json::json!({ "name": name, "unreadable": e.to_string() })
            }
            Err(e) => return Err(db_status(e, &what)),
        };
        let bindings = q::definition_delete(&mut tx, &name, r.force)
            .await
            .map_err(|e| db_status(e, &what))?;
        // As DeleteBinding for each deleted binding.
        let now = self.0.core.clock.now();
        let cancelled = db::runs::run_cancel_bindings(
            &mut tx,
            &self.0.core.node_id,
            &bindings,
            RunReason::BindingDeleted.as_str(),
            now,
        )
        .await
        .map_err(|e| db_status(e, &what))?;
        if let Some(o) = before.as_object_mut()
            && !bindings.is_empty()
        {
            o.insert("deleted_bindings".into(), serde_json::json!(bindings));
        }
        let event = caller.audit(
            now,
            None,
            method,
            format!("definition/{name}"),
            Some(before),
            None,
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        self.0.core.bus.publish(cancelled);
        tracing::info!(definition = %name, deleted_bindings = bindings.len(), "definition deleted");
        Ok(Response::new(pb::DeleteDefinitionResponse {}))
    }

    async fn preview_schedule(
        &self,
        req: Request<pb::PreviewScheduleRequest>,
    ) -> Result<Response<pb::PreviewScheduleResponse>, Status> {
        let caller = grant(&req)?.caller;
        let who = super::limit::caller_keys(&caller, &req);
        let r = req.into_inner();
        let count = match r.count {
            0 => 10,
            1..=MAX_PREVIEW => r.count,
            n => {
                return Err(invalid(FieldViolation::new(
                    "count",
                    format!("{n} is out of range 0-{MAX_PREVIEW}"),
                )));
            }
        };
        let after = match &r.after {
            Some(t) => time_from("after", t).map_err(invalid)?,
            None => self.0.core.clock.now(),
        };
        let schedule = schedule_from("schedule", r.schedule.as_ref())
            .map_err(invalid)?
            .ok_or_else(|| invalid(FieldViolation::new("schedule", "is required")))?
            .resolve_anchor(after);
        if matches!(schedule.kind, crate::domain::ScheduleKind::Cron { .. })
            && chrono::Datelike::year(&after) > crate::domain::schedule::CRON_LAST_YEAR
        {
            return Err(invalid(FieldViolation::new(
                "after",
                format!(
                    "cron schedules compute fire times up to year {}",
                    crate::domain::schedule::CRON_LAST_YEAR
                ),
            )));
        }
        let fire_times = self
            .0
            .costly
            .run(who, "PreviewSchedule", move || {
                let mut fire_times = Vec::new();
                let mut t = after;
                while fire_times.len() < count as usize {
                    let Some(fire) = schedule.next_fire_after(t) else {
                        break;
                    };
                    let next = fire.time;
                    fire_times.push(pb::FireTime {
                        time: Some(time_to(next)),
                        local_time: schedule.describe_local(next),
                        dst_shifted: fire.dst_shifted,
                    });
                    t = next;
                }
                fire_times
            })
            .await?;
        Ok(Response::new(pb::PreviewScheduleResponse { fire_times }))
    }
}
