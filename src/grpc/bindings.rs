//! `sked.v1.BindingService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::auth::Caller;
use super::authz::{Grant, tenant_grant};
use super::convert::{binding_to, schedule_from, struct_to_json, time_from};
use super::{
    Ctx, check_etag, db_status, invalid, page, page_size, parse_uuid, record, require_healthy,
    update_paths,
};
use crate::db;
use crate::domain::RunReason;
use crate::domain::{
    Binding, FieldViolation, effective_schedule, merge_params, validate_definition_name,
    validate_effective_window, validate_merged_params,
};
use crate::proto::v1 as pb;
use crate::proto::v1::binding_service_server::BindingService;
use crate::usecase::audit;

/// Implements `BindingService`.
#[derive(Debug, Clone)]
pub struct Bindings(pub Ctx);

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
        let def = db::definitions::definition_get(
            &self.0.core.pool,
            &b.definition,
            caller.tenant.as_deref(),
        )
        .await
        .map_err(|e| match e {
            db::Error::NotFound => Status::not_found(format!(
                "binding.definition: definition {:?} not found",
                b.definition
            )),
            e => db_status(e, "definition"),
        })?;
        if !def.tenant_scope.allows(&tenant_id) {
            return Err(Status::failed_precondition(format!(
                "definition {:?} may not be bound by tenant {tenant_id:?}: its tenant_scope excludes it",
                def.name
            )));
        }
        let now = self.0.core.clock.now();
        let effective = effective_schedule(
            schedule.as_ref().unwrap_or(&def.schedule),
            now,
            effective_from,
            effective_until,
        );
        if let Some(p) = &params {
            validate_merged_params("binding.params", &merge_params(&def.params, p))
                .map_err(invalid)?;
        }
        let binding = Binding {
            id: Uuid::now_v7(),
            tenant_id,
            definition: def.name.clone(),
            next_run_time: effective.next_after(now),
            effective_from,
            effective_until,
            schedule,
            effective_params: params
                .as_ref()
                .map_or_else(|| def.params.clone(), |p| merge_params(&def.params, p)),
            params,
            effective_schedule: effective,
            create_time: now,
            update_time: now,
            version: 1,
            enabled: b.enabled.unwrap_or(true),
            paused: false,
            pause_note: String::new(),
            pause_expire_time: None,
            effective_policy: def.policy,
            broken_reason: None,
        };
        let mut tx = self
            .0
            .core
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), "binding"))?;
        db::tenancy::quota_check_new_binding(&mut tx, &binding.tenant_id)
            .await
            .map_err(|e| db_status(e, "binding"))?;
        db::bindings::binding_insert(&mut *tx, &binding)
            .await
            .map_err(|e| match e {
                db::Error::NotFound => Status::not_found(format!(
                    "binding.definition: definition {:?} not found",
                    def.name
                )),
                db::Error::Duplicate(_) => Status::already_exists(format!(
                    "tenant {:?} already has a binding of definition {:?}",
                    binding.tenant_id, binding.definition
                )),
                e => db_status(e, "binding"),
            })?;
        let event = caller.audit(
            now,
            Some(&binding.tenant_id),
            method,
            format!("binding/{}", binding.id),
            None,
            Some(audit::binding(&binding)),
        );
        record(&mut tx, &event, "binding").await?;
        tx.commit()
            .await
            .map_err(|e| db_status(e.into(), "binding"))?;
        tracing::info!(binding = %binding.id, tenant = %binding.tenant_id, definition = %binding.definition,
            next_run_time = ?binding.next_run_time, "binding created");
        Ok(Response::new(binding_to(&binding)))
    }

    async fn get_binding(
        &self,
        req: Request<pb::GetBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("binding_id", &req.get_ref().binding_id)?;
        let b = db::bindings::binding_get(&self.0.core.pool, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, format_args!("binding {id}")))?;
        Ok(Response::new(shown(b, self.0.core.clock.now())))
    }

    async fn list_bindings(
        &self,
        req: Request<pb::ListBindingsRequest>,
    ) -> Result<Response<pb::ListBindingsResponse>, Status> {
        let (_, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let limit = page_size(r.page_size, 50)?;
        let after = if r.page_token.is_empty() {
            Uuid::nil()
        } else {
            parse_uuid("page_token", &r.page_token)?
        };
        let definition = (!r.definition.is_empty()).then_some(r.definition.as_str());
        let list =
            db::bindings::binding_list(&self.0.core.pool, &tenant_id, after, definition, limit + 1)
                .await
                .map_err(|e| db_status(e, "bindings"))?;
        let (list, next_page_token) = page(list, limit, |b| b.id.to_string());
        let now = self.0.core.clock.now();
        Ok(Response::new(pb::ListBindingsResponse {
            bindings: list.into_iter().map(|b| shown(b, now)).collect(),
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
        let paths = update_paths(
            r.update_mask.as_ref(),
            &[
                "schedule",
                "params",
                "effective_from",
                "effective_until",
                "enabled",
            ],
            implied,
        )?;
        let (new_from, new_until) = window_from(&b)?;
        let what = format!("binding {id}");
        let mut tx = self
            .0
            .core
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        let mut cur = db::bindings::binding_get_for_update(&mut *tx, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        require_healthy(&cur)?;
        check_etag(&what, &b.etag, cur.version)?;
        let before = audit::binding(&cur);
        let old_version = cur.version;
        let now = self.0.core.clock.now();
        let mut schedule_changed = false;
        let mut re_enabled = false;
        for path in paths {
            match path {
                "schedule" => {
                    let s =
                        schedule_from("binding.schedule", b.schedule.as_ref()).map_err(invalid)?;
                    schedule_changed |= s != cur.schedule;
                    cur.schedule = s;
                }
                "params" => cur.params = b.params.as_ref().map(struct_to_json),
                "effective_from" => {
                    schedule_changed |= new_from != cur.effective_from;
                    cur.effective_from = new_from;
                }
                "effective_until" => {
                    schedule_changed |= new_until != cur.effective_until;
                    cur.effective_until = new_until;
                }
                "enabled" => {
                    let on = b.enabled.unwrap_or(true);
                    // Re-enabled: from the next fire after now, no catch-up.
                    re_enabled = on && !cur.enabled;
                    cur.enabled = on;
                }
                _ => {}
            }
        }
        let def = db::definitions::definition_get(&mut *tx, &cur.definition, None)
            .await
            .map_err(|e| db_status(e, format_args!("definition {:?}", cur.definition)))?;
        validate_effective_window(cur.effective_from, cur.effective_until).map_err(invalid)?;
        if schedule_changed {
            cur.effective_schedule = effective_schedule(
                cur.schedule.as_ref().unwrap_or(&def.schedule),
                now,
                cur.effective_from,
                cur.effective_until,
            );
            cur.next_run_time = cur.effective_schedule.next_after(now);
        } else if re_enabled {
            // Same schedule and anchor; only what passed while disabled is dropped.
            cur.next_run_time = cur.effective_schedule.next_after(now);
        }
        cur.effective_params = cur
            .params
            .as_ref()
            .map_or_else(|| def.params.clone(), |p| merge_params(&def.params, p));
        validate_merged_params("binding.params", &cur.effective_params).map_err(invalid)?;
        cur.version += 1;
        cur.update_time = now;
        db::bindings::binding_update(&mut *tx, &cur, old_version)
            .await
            .map_err(|e| db_status(e, &what))?;
        hold_or_release(&mut tx, !cur.enabled, &what).await?;
        let event = caller.audit(
            now,
            Some(&tenant_id),
            method,
            format!("binding/{id}"),
            Some(before),
            Some(audit::binding(&cur)),
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        tracing::info!(binding = %id, version = cur.version, schedule_changed, next_run_time = ?cur.next_run_time, "binding updated");
        Ok(Response::new(shown(cur, now)))
    }

    async fn pause_binding(
        &self,
        req: Request<pb::PauseBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let r = req.into_inner();
        let id = parse_uuid("binding_id", &r.binding_id)?;
        if r.note.chars().count() > MAX_NOTE {
            return Err(invalid(FieldViolation::new(
                "note",
                format!("must be at most {MAX_NOTE} characters"),
            )));
        }
        let now = self.0.core.clock.now();
        let expire = r
            .expire_time
            .as_ref()
            .map(|t| time_from("expire_time", t))
            .transpose()
            .map_err(invalid)?;
        if expire.is_some_and(|e| e <= now) {
            return Err(invalid(FieldViolation::new(
                "expire_time",
                "must be in the future",
            )));
        }
        let b = self
            .set_pause(&caller, method, &tenant_id, id, now, |b| {
                b.paused = true;
                b.pause_note = r.note.clone();
                b.pause_expire_time = expire;
            })
            .await?;
        tracing::info!(binding = %id, expire_time = ?expire, note = %r.note, "binding paused");
        Ok(Response::new(shown(b, now)))
    }

    async fn resume_binding(
        &self,
        req: Request<pb::ResumeBindingRequest>,
    ) -> Result<Response<pb::Binding>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("binding_id", &req.get_ref().binding_id)?;
        let now = self.0.core.clock.now();
        let b = self
            .set_pause(&caller, method, &tenant_id, id, now, |b| {
                if b.paused {
                    // From the next fire after now: no catch-up of the pause.
                    b.next_run_time = b.effective_schedule.next_after(now);
                }
                b.end_pause();
            })
            .await?;
        tracing::info!(binding = %id, next_run_time = ?b.next_run_time, "binding resumed");
        Ok(Response::new(shown(b, now)))
    }

    async fn delete_binding(
        &self,
        req: Request<pb::DeleteBindingRequest>,
    ) -> Result<Response<pb::DeleteBindingResponse>, Status> {
        let (Grant { caller, method, .. }, tenant_id) = tenant_grant(&req)?;
        let id = parse_uuid("binding_id", &req.get_ref().binding_id)?;
        let what = format!("binding {id}");
        let mut tx = self
            .0
            .core
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        let before = db::bindings::binding_get_for_update(&mut *tx, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        db::bindings::binding_delete(&mut *tx, &tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        // Stopped means stopped: under the claim lock, no run of it starts
        // after this commits; its runs end CANCELLED/binding_deleted.
        let now = self.0.core.clock.now();
        let cancelled = db::runs::run_cancel_bindings(
            &mut tx,
            &self.0.core.node_id,
            &[id],
            RunReason::BindingDeleted.as_str(),
            now,
        )
        .await
        .map_err(|e| db_status(e, &what))?;
        let event = caller.audit(
            now,
            Some(&tenant_id),
            method,
            format!("binding/{id}"),
            Some(audit::binding(&before)),
            None,
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        self.0.core.bus.publish(cancelled);
        tracing::info!(binding = %id, tenant = %tenant_id, "binding deleted");
        Ok(Response::new(pb::DeleteBindingResponse {}))
    }
}

/// Longest pause note, in characters.
const MAX_NOTE: usize = 1000;

impl Bindings {
    /// Applies `change` to the tenant's binding `id` under its row lock and
    /// writes it (new version), waking the schedulers.
    async fn set_pause(
        &self,
        caller: &Caller,
        method: &str,
        tenant_id: &str,
        id: Uuid,
        now: chrono::DateTime<chrono::Utc>,
        change: impl FnOnce(&mut Binding),
    ) -> Result<Binding, Status> {
        let what = format!("binding {id}");
        let mut tx = self
            .0
            .core
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        let mut cur = db::bindings::binding_get_for_update(&mut *tx, tenant_id, id)
            .await
            .map_err(|e| db_status(e, &what))?;
        require_healthy(&cur)?;
        let before = audit::binding(&cur);
        let old_version = cur.version;
        change(&mut cur);
        cur.version += 1;
        cur.update_time = now;
        db::bindings::binding_update(&mut *tx, &cur, old_version)
            .await
            .map_err(|e| db_status(e, &what))?;
        hold_or_release(&mut tx, cur.paused, &what).await?;
        let event = caller.audit(
            now,
            Some(tenant_id),
            method,
            format!("binding/{id}"),
            Some(before),
            Some(audit::binding(&cur)),
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        Ok(cur)
    }
}

/// In a transaction that writes a binding's (or definition's) paused or
/// enabled flag: when `stopped`, takes the claim lock so no run of it starts
/// once the transaction commits ([`db::runs::run_claim_lock`]); otherwise
/// wakes every node's executor on commit, as its held runs may start now.
pub(super) async fn hold_or_release(
    tx: &mut sqlx::PgConnection,
    stopped: bool,
    what: &str,
) -> Result<(), Status> {
    if stopped {
        db::runs::run_claim_lock(tx).await
    } else {
        db::runs::notify_runs(tx).await
    }
    .map_err(|e| db_status(e, what))
}

/// A binding as the API shows it at `now`: a pause whose expiry has passed
/// is over, even before the scheduler has cleared it.
fn shown(mut b: Binding, now: chrono::DateTime<chrono::Utc>) -> pb::Binding {
    if b.pause_expired(now) {
        b.end_pause();
    }
    binding_to(&b)
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
