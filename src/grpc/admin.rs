//! `sked.v1.AdminService`: tenant quotas and their usage, API keys, the
//! audit log.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::audit;
use super::auth::{Caller, call_tenant};
use super::authz::{Grant, grant};
use super::convert::{json_to_struct, time_from, time_to};
use super::{Ctx, db_status, invalid, page, page_size, parse_uuid, record};
use crate::db;
use crate::db::tenancy::AuditFilter;
use crate::domain::tenancy::{
    ApiKey, AuditEvent, MAX_KEY_NAME, Quota, QuotaHealth, QuotaUsage, generate_key,
};
use crate::domain::{FieldViolation, Role, validate_tenant_id};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_service_server::AdminService;

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
    }
}

fn role_from(v: i32) -> Result<Role, FieldViolation> {
    match pb::Role::try_from(v) {
        Ok(pb::Role::Viewer) => Ok(Role::Viewer),
        Ok(pb::Role::Operator) => Ok(Role::Operator),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        _ => Err(FieldViolation::new(
            "role",
            "is required: ROLE_VIEWER, ROLE_OPERATOR or ROLE_ADMIN",
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

/// Creates an API key as `created_by` and returns it with its token (the
/// only time the secret exists outside the caller's hands). Used by
/// CreateApiKey and by `sked admin bootstrap-key`.
///
/// # Errors
/// [`db::Error`] when storing fails.
pub async fn create_key(
    tx: &mut sqlx::PgConnection,
    name: String,
    role: Role,
    tenant_id: Option<String>,
    created_by: Option<Uuid>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(ApiKey, String), db::Error> {
    let secret = tokio::task::spawn_blocking(generate_key)
        .await
        .map_err(|e| db::Error::Refused(format!("key generation failed: {e}")))?
        .map_err(|e| db::Error::Refused(e.to_string()))?;
    let key = ApiKey {
        id: secret.id,
        name,
        role,
        tenant_id,
        secret_hash: secret.secret_hash,
        create_time: now,
        created_by,
        revoke_time: None,
    };
    db::tenancy::api_key_insert(&mut *tx, &key).await?;
    Ok((key, secret.token))
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_tenant_quota(
        &self,
        req: Request<pb::GetTenantQuotaRequest>,
    ) -> Result<Response<pb::TenantQuota>, Status> {
        let caller = grant(&req)?.caller;
        let tenant = quota_tenant(&caller, &req, &req.get_ref().tenant_id)?;
        let q = db::tenancy::quota_get(&self.0.pool, &tenant)
            .await
            .map_err(|e| db_status(e, "quota"))?;
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
        let now = self.0.clock.now();
        let mut tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), "quota"))?;
        let before = db::tenancy::quota_set(&mut tx, &q.tenant_id, &quota, now)
            .await
            .map_err(|e| db_status(e, "quota"))?;
        let event = caller.audit(
            now,
            Some(&q.tenant_id),
            method,
            format!("quota/{}", q.tenant_id),
            Some(audit::quota(&before)),
            Some(audit::quota(&quota)),
        );
        record(&mut tx, &event, "quota").await?;
        tx.commit()
            .await
            .map_err(|e| db_status(e.into(), "quota"))?;
        tracing::info!(tenant = %q.tenant_id, ?quota, "tenant quota set");
        Ok(Response::new(quota_to(&q.tenant_id, &quota)))
    }

    async fn get_quota_usage(
        &self,
        req: Request<pb::GetQuotaUsageRequest>,
    ) -> Result<Response<pb::QuotaUsage>, Status> {
        let caller = grant(&req)?.caller;
        let tenant = quota_tenant(&caller, &req, &req.get_ref().tenant_id)?;
        let mut conn = self
            .0
            .pool
            .acquire()
            .await
            .map_err(|e| db_status(e.into(), "quota usage"))?;
        let usage = db::tenancy::quota_usage(&mut conn, &tenant, self.0.clock.now())
            .await
            .map_err(|e| db_status(e, "quota usage"))?;
        Ok(Response::new(usage_to(&tenant, &usage)))
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let Grant { caller, method, .. } = grant(&req)?;
        let r = req.into_inner();
        if r.name.chars().count() > MAX_KEY_NAME {
            return Err(invalid(FieldViolation::new(
                "name",
                format!("must be at most {MAX_KEY_NAME} characters"),
            )));
        }
        let role = role_from(r.role).map_err(invalid)?;
        let tenant = match (&caller.tenant, r.tenant_id.as_str()) {
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
        let now = self.0.clock.now();
        let mut tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), "API key"))?;
        let (key, token) = create_key(&mut tx, r.name, role, tenant, caller.key_id, now)
            .await
            .map_err(|e| db_status(e, "API key"))?;
        let event = caller.audit(
            now,
            key.tenant_id.as_deref(),
            method,
            format!("api_key/{}", key.id),
            None,
            Some(audit::api_key(&key)),
        );
        record(&mut tx, &event, "API key").await?;
        tx.commit()
            .await
            .map_err(|e| db_status(e.into(), "API key"))?;
        tracing::info!(key_id = %key.id, role = key.role.as_str(), tenant = ?key.tenant_id, "API key created");
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
        let id = parse_uuid("id", &req.get_ref().id)?;
        let what = format!("API key {id}");
        let now = self.0.clock.now();
        let mut tx = self
            .0
            .pool
            .begin()
            .await
            .map_err(|e| db_status(e.into(), &what))?;
        let before = db::tenancy::api_key_revoke(&mut tx, id, caller.tenant.as_deref(), now)
            .await
            .map_err(|e| db_status(e, &what))?;
        let after = ApiKey {
            revoke_time: before.revoke_time.or(Some(now)),
            ..before.clone()
        };
        let event = caller.audit(
            now,
            before.tenant_id.as_deref(),
            method,
            format!("api_key/{id}"),
            Some(audit::api_key(&before)),
            Some(audit::api_key(&after)),
        );
        record(&mut tx, &event, &what).await?;
        tx.commit().await.map_err(|e| db_status(e.into(), &what))?;
        tracing::info!(key_id = %id, "API key revoked");
        Ok(Response::new(key_to(&after)))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = grant(&req)?.caller;
        let r = req.into_inner();
        let limit = page_size(r.page_size, 50)?;
        let after = if r.page_token.is_empty() {
            Uuid::nil()
        } else {
            parse_uuid("page_token", &r.page_token)?
        };
        let tenant = match &caller.tenant {
            Some(own) => Some(own.as_str()),
            None if r.tenant_id.is_empty() => None,
            None => Some(r.tenant_id.as_str()),
        };
        let keys = db::tenancy::api_key_list(&self.0.pool, tenant, after, limit + 1)
            .await
            .map_err(|e| db_status(e, "API keys"))?;
        let (keys, next_page_token) = page(keys, limit, |k| k.id.to_string());
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.iter().map(key_to).collect(),
            next_page_token,
        }))
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = grant(&req)?.caller;
        let r = req.into_inner();
        let limit = page_size(r.page_size, 50)?;
        let before = if r.page_token.is_empty() {
            Uuid::max()
        } else {
            parse_uuid("page_token", &r.page_token)?
        };
        let key_id = if r.key_id.is_empty() {
            None
        } else {
            Some(parse_uuid("key_id", &r.key_id)?)
        };
        let time = |field: &str, t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .map(|t| time_from(field, t))
                .transpose()
                .map_err(invalid)
        };
        let filter = AuditFilter {
            tenant_id: match &caller.tenant {
                Some(own) => Some(own.as_str()),
                None => (!r.tenant_id.is_empty()).then_some(r.tenant_id.as_str()),
            },
            key_id,
            method: (!r.method.is_empty()).then_some(r.method.as_str()),
            target_prefix: (!r.target_prefix.is_empty()).then_some(r.target_prefix.as_str()),
            start_time: time("start_time", &r.start_time)?,
            end_time: time("end_time", &r.end_time)?,
        };
        let events = db::tenancy::audit_list(&self.0.pool, &filter, before, limit + 1)
            .await
            .map_err(|e| db_status(e, "audit events"))?;
        let (events, next_page_token) = page(events, limit, |e| e.id.to_string());
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.iter().map(audit_to).collect(),
            next_page_token,
        }))
    }
}
