//! `sked.v1.AdminService`: tenant quotas and their usage, API keys, the
//! audit log, the scheduler's status. Parses requests, calls
//! [`usecase::tenancy`](tenancy) or [`usecase::status`](status), converts
//! the results.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::auth::{Caller, call_tenant};
use super::authz::{Grant, grant};
use super::convert::{json_to_struct, time_from, time_to};
use super::{Ctx, invalid, page_size, parse_uuid};
use crate::domain::cluster::SchedulerStatus;
use crate::domain::tenancy::{ApiKey, AuditEvent, Quota, QuotaHealth, QuotaUsage};
use crate::domain::{FieldViolation, Role, validate_tenant_id};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_service_server::AdminService;
use crate::usecase::{Actor, Page, status, tenancy};

/// Implements `AdminService`.
#[derive(Debug, Clone)]
pub struct Admin(pub Ctx);

/// The tenant a quota call is about: `field` when set (a tenant key may only
/// name its own), else the call's tenant ([`call_tenant`]).
fn quota_tenant<T>(caller: &Caller, req: &Request<T>, field: &str) -> Result<String, Status> {
    if field.is_empty() {
        return call_tenant(caller, req.metadata());
    }
    validate_tenant_id("tenant_id", field).map_err(invalid)?;
    match &caller.tenant {
        Some(own) if own != field => Err(Status::permission_denied(
            "a tenant key may only read its own tenant's quota",
        )),
        _ => Ok(field.to_string()),
    }
}

/// An optional UUID field: empty is `None`.
fn optional_uuid(field: &str, s: &str) -> Result<Option<Uuid>, Status> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_uuid(field, s).map(Some)
    }
}

fn quota_to(tenant: &str, q: &Quota) -> pb::TenantQuota {
    let n = |v: Option<u32>| v.map(|v| v as i32);
    pb::TenantQuota {
        tenant_id: tenant.to_string(),
        max_concurrent_runs: n(q.max_concurrent_runs),
        max_runs_per_hour: n(q.max_runs_per_hour),
        max_bindings: n(q.max_bindings),
    }
}

/// API quota → domain (validated: each set limit 1..=1e9).
fn quota_from(q: &pb::TenantQuota) -> Result<Quota, FieldViolation> {
    let field = |name: &str, v: Option<i32>| -> Result<Option<u32>, FieldViolation> {
        v.map(|v| {
            u32::try_from(v).map_err(|_| {
                FieldViolation::new(format!("quota.{name}"), format!("{v} must not be negative"))
            })
        })
        .transpose()
    };
    let quota = Quota {
        max_concurrent_runs: field("max_concurrent_runs", q.max_concurrent_runs)?,
        max_runs_per_hour: field("max_runs_per_hour", q.max_runs_per_hour)?,
        max_bindings: field("max_bindings", q.max_bindings)?,
    };
    quota.validate("quota")?;
    Ok(quota)
}

fn role_to(r: Role) -> pb::Role {
    match r {
        Role::Viewer => pb::Role::Viewer,
        Role::Operator => pb::Role::Operator,
        Role::Admin => pb::Role::Admin,
        Role::Worker => pb::Role::Worker,
    }
}

fn role_from(v: i32) -> Result<Role, FieldViolation> {
    match pb::Role::try_from(v) {
        Ok(pb::Role::Viewer) => Ok(Role::Viewer),
        Ok(pb::Role::Operator) => Ok(Role::Operator),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Worker) => Ok(Role::Worker),
        _ => Err(FieldViolation::new(
            "role",
            "is required: ROLE_VIEWER, ROLE_OPERATOR, ROLE_ADMIN or ROLE_WORKER",
        )),
    }
}

fn key_to(k: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.to_string(),
        name: k.name.clone(),
        role: role_to(k.role) as i32,
        tenant_id: k.tenant_id.clone().unwrap_or_default(),
        create_time: Some(time_to(k.create_time)),
        revoke_time: k.revoke_time.map(time_to),
        created_by: k.created_by.map(|i| i.to_string()).unwrap_or_default(),
    }
}

fn audit_to(e: &AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id.to_string(),
        time: Some(time_to(e.time)),
        key_id: e.key_id.map(|i| i.to_string()).unwrap_or_default(),
        actor: e.actor.clone(),
        tenant_id: e.tenant_id.clone().unwrap_or_default(),
        method: e.method.clone(),
        target: e.target.clone(),
        before: e.before.as_ref().and_then(json_to_struct),
        after: e.after.as_ref().and_then(json_to_struct),
    }
}

fn usage_to(tenant: &str, u: &QuotaUsage) -> pb::QuotaUsage {
    pb::QuotaUsage {
        tenant_id: tenant.to_string(),
        quota: Some(quota_to(tenant, &u.quota)),
        running_runs: u.running_runs as i64,
        queued_runs: u.queued_runs as i64,
        throttled_runs: u.throttled_now as i64,
        runs_last_hour: u.runs_last_hour as i64,
        throttled_last_hour: u.throttled_last_hour as i64,
        skipped_last_hour: u.skipped_last_hour as i64,
        bindings: u.bindings as i64,
        health: match u.health() {
            QuotaHealth::Ok => pb::QuotaHealth::Ok,
            QuotaHealth::NearLimit => pb::QuotaHealth::NearLimit,
            QuotaHealth::Throttled => pb::QuotaHealth::Throttled,
        } as i32,
    }
}

/// Seconds (≥ 0) → Duration, at microsecond precision.
fn secs_to_duration(secs: f64) -> prost_types::Duration {
    let micros = (secs.max(0.0) * 1e6).round().min(i64::MAX as f64) as i64;
    prost_types::Duration {
        seconds: micros / 1_000_000,
        nanos: ((micros % 1_000_000) * 1000) as i32,
    }
}

fn status_to(s: &SchedulerStatus) -> pb::SchedulerStatus {
    let leader = s.leader.as_ref();
    let leading = leader.filter(|l| !l.expired).map(|l| l.node_id.as_str());
    pb::SchedulerStatus {
        node_id: s.node_id.clone(),
        time: Some(time_to(s.time)),
        nodes: s
            .nodes
            .iter()
            .map(|n| pb::SchedulerNode {
                node_id: n.node_id.clone(),
                version: n.version.clone(),
                start_time: Some(time_to(n.start_time)),
                heartbeat_time: Some(time_to(n.heartbeat_time)),
                running_runs: i64::from(n.load.running_runs),
                draining: n.load.draining,
                stale: n.stale,
                leader: leading == Some(n.node_id.as_str()),
                stream_subscribers: i64::from(n.load.stream_subscribers),
            })
            .collect(),
        leader_node_id: leading.unwrap_or_default().to_string(),
        leader_term: leader.map_or(0, |l| l.term),
        leader_lease_expire_time: leader
            .filter(|l| !l.expired)
            .map(|l| time_to(l.expire_time)),
        scheduled_runs: s.counts.scheduled,
        queued_runs: s.counts.queued,
        running_runs: s.counts.running,
        oldest_queued_age: s
            .counts
            .oldest_queued_due
            .map(|t| secs_to_duration((s.time - t).num_microseconds().unwrap_or(0) as f64 / 1e6)),
        fire_lag: Some(pb::FireLag {
            runs: s.fire_lag.runs,
            p50: s.fire_lag.p50_secs.map(secs_to_duration),
            p99: s.fire_lag.p99_secs.map(secs_to_duration),
            max: s.fire_lag.max_secs.map(secs_to_duration),
        }),
        stream_subscribers: i64::from(s.stream_subscribers),
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_scheduler_status(
        &self,
        req: Request<pb::GetSchedulerStatusRequest>,
    ) -> Result<Response<pb::SchedulerStatus>, Status> {
        grant(&req)?;
        let s = status::scheduler_status(&self.0.core).await?;
        Ok(Response::new(status_to(&s)))
    }

    async fn get_tenant_quota(
        &self,
        req: Request<pb::GetTenantQuotaRequest>,
    ) -> Result<Response<pb::TenantQuota>, Status> {
        let caller = grant(&req)?.caller;
        let tenant = quota_tenant(&caller, &req, &req.get_ref().tenant_id)?;
        let q = tenancy::get_quota(&self.0.core, &tenant).await?;
        Ok(Response::new(quota_to(&tenant, &q)))
    }

    async fn set_tenant_quota(
        &self,
        req: Request<pb::SetTenantQuotaRequest>,
    ) -> Result<Response<pb::TenantQuota>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let q = req
            .into_inner()
            .quota
            .ok_or_else(|| invalid(FieldViolation::new("quota", "is required")))?;
        validate_tenant_id("quota.tenant_id", &q.tenant_id).map_err(invalid)?;
        let quota = quota_from(&q).map_err(invalid)?;
        let actor = Actor::new(&caller, method);
        let quota = tenancy::set_quota(&self.0.core, actor, &q.tenant_id, quota).await?;
        Ok(Response::new(quota_to(&q.tenant_id, &quota)))
    }

    async fn get_quota_usage(
        &self,
        req: Request<pb::GetQuotaUsageRequest>,
    ) -> Result<Response<pb::QuotaUsage>, Status> {
        let caller = grant(&req)?.caller;
        let tenant = quota_tenant(&caller, &req, &req.get_ref().tenant_id)?;
        let usage = tenancy::quota_usage(&self.0.core, &tenant).await?;
        Ok(Response::new(usage_to(&tenant, &usage)))
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let r = req.into_inner();
        tenancy::validate_key_name(&r.name)?;
        let role = role_from(r.role).map_err(invalid)?;
        let tenant_id = match (&caller.tenant, r.tenant_id.as_str()) {
            (Some(own), "") => Some(own.clone()),
            (Some(own), t) if t == own => Some(own.clone()),
            (Some(_), _) => {
                return Err(Status::permission_denied(
                    "a tenant admin may create keys only for its own tenant",
                ));
            }
            (None, "") => None,
            (None, t) => {
                validate_tenant_id("tenant_id", t).map_err(invalid)?;
                Some(t.to_string())
            }
        };
        let actor = Actor::new(&caller, method);
        let new = tenancy::NewApiKey {
            name: r.name,
            role,
            tenant_id,
        };
        let (key, token) = tenancy::create_api_key(&self.0.core, actor, new).await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(key_to(&key)),
            token,
        }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let id = parse_uuid("key_id", &req.get_ref().key_id)?;
        let actor = Actor::new(&caller, method);
        let key = tenancy::revoke_api_key(&self.0.core, actor, id).await?;
        Ok(Response::new(key_to(&key)))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = grant(&req)?.caller;
        let r = req.into_inner();
        let page = Page {
            size: page_size(r.page_size, 50)?,
            after: optional_uuid("page_token", &r.page_token)?,
        };
        let tenant_id = (!r.tenant_id.is_empty()).then_some(r.tenant_id.as_str());
        let (keys, next) = tenancy::list_api_keys(&self.0.core, &caller, tenant_id, page).await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.iter().map(key_to).collect(),
            next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = grant(&req)?.caller;
        let r = req.into_inner();
        let page = Page {
            size: page_size(r.page_size, 50)?,
            after: optional_uuid("page_token", &r.page_token)?,
        };
        let key_id = optional_uuid("key_id", &r.key_id)?;
        let time = |field: &str, t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .map(|t| time_from(field, t))
                .transpose()
                .map_err(invalid)
        };
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let filter = tenancy::AuditFilter {
            key_id,
            start_time: time("start_time", &r.start_time)?,
            end_time: time("end_time", &r.end_time)?,
            tenant_id: nonempty(r.tenant_id),
            method: nonempty(r.method),
            target_prefix: nonempty(r.target_prefix),
        };
        let (events, next) =
            tenancy::list_audit_events(&self.0.core, &caller, &filter, page).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.iter().map(audit_to).collect(),
            next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }
}
