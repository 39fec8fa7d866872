//! Tenancy: tenant quotas and their usage, API keys, the audit log.
//!
//! Who may call what is decided before (the gRPC gate, or holding the
//! database URL for the CLI); what is left here is scoping: a tenant
//! caller (`Caller::tenant` set) sees and revokes only its own tenant's
//! keys and audit events.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Actor, Core, Error, Page, Result, Target, audit, begin, commit, record};
use crate::db;
use crate::domain::tenancy::{
    ApiKey, AuditEvent, Caller, MAX_KEY_NAME, Quota, QuotaUsage, generate_key,
};
use crate::domain::{FieldViolation, Role};

/// Quota of `tenant_id` (all `None` when none was set: unlimited).
///
/// # Errors
/// Database errors.
pub async fn get_quota(core: &Core, tenant_id: &str) -> Result<Quota> {
    db::tenancy::quota_get(&core.pool, tenant_id)
        .await
        .map_err(Error::on(&Target::new("quota", tenant_id)))
}

/// Sets the quota of `tenant_id` (SetTenantQuota), replacing every limit;
/// audited as `quota/<tenant>` with the limits before and after. `quota`
/// is checked by the caller ([`Quota::validate`]). Returns the quota set.
///
/// # Errors
/// Database errors.
pub async fn set_quota(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    quota: Quota,
) -> Result<Quota> {
    let target = Target::new("quota", tenant_id);
    let now = core.clock.now();
    let mut tx = begin(core, &target).await?;
    let before = db::tenancy::quota_set(&mut tx, tenant_id, &quota, now)
        .await
        .map_err(Error::on(&target))?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(tenant_id),
        format!("quota/{tenant_id}"),
        Some(audit::quota(&before)),
        Some(audit::quota(&quota)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    tracing::info!(tenant = %tenant_id, ?quota, "tenant quota set");
    Ok(quota)
}

/// `tenant_id`'s quota and its current use of it (GetQuotaUsage).
///
/// # Errors
/// Database errors.
pub async fn quota_usage(core: &Core, tenant_id: &str) -> Result<QuotaUsage> {
    let target = Target::new("quota", tenant_id);
    let mut conn = core
        .pool
        .acquire()
        .await
        .map_err(|e| Error::db(e.into(), &target))?;
    db::tenancy::quota_usage(&mut conn, tenant_id, core.clock.now())
        .await
        .map_err(Error::on(&target))
}

/// Checks an API key's name: at most [`MAX_KEY_NAME`] characters.
///
/// # Errors
/// `Invalid` on `name` otherwise.
pub fn validate_key_name(name: &str) -> Result<()> {
    if name.chars().count() > MAX_KEY_NAME {
        return Err(FieldViolation::new(
            "name",
            format!("must be at most {MAX_KEY_NAME} characters"),
        )
        .into());
    }
    Ok(())
}

/// What CreateApiKey and `sked admin bootstrap-key` ask for.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// For people; at most [`MAX_KEY_NAME`] characters.
    pub name: String,
    /// What the key may do.
    pub role: Role,
    /// Its tenant; `None` for a platform key. Whether the actor may create
    /// a key for this tenant is checked by the caller (a tenant admin only
    /// for its own).
    pub tenant_id: Option<String>,
}

/// Creates an API key (CreateApiKey, `sked admin bootstrap-key`): a new id
/// and secret, only the secret's Argon2id hash stored, `created_by` the
/// actor's key. Audited as `api_key/<id>` (after: the key without its
/// hash). Returns the key and its token `sked_<id>_<secret>` — the only
/// time the secret exists outside the caller's hands.
///
/// # Errors
/// `Invalid` (name), `Precondition` when key generation fails, database
/// errors.
pub async fn create_api_key(
    core: &Core,
    actor: Actor<'_>,
    new: NewApiKey,
) -> Result<(ApiKey, String)> {
    validate_key_name(&new.name)?;
    let target = Target::all("api_key");
    // Argon2 hashing takes tens of milliseconds of CPU: off the executor.
    let secret = {
        let id = core.clock.new_id();
        tokio::task::spawn_blocking(move || generate_key(id))
    }
    .await
    .map_err(|e| Error::Precondition(format!("key generation failed: {e}")))?
    .map_err(|e| Error::Precondition(e.to_string()))?;
    let now = core.clock.now();
    let key = ApiKey {
        id: secret.id,
        name: new.name,
        role: new.role,
        tenant_id: new.tenant_id,
        secret_hash: secret.secret_hash,
        create_time: now,
        created_by: actor.caller.key_id,
        revoke_time: None,
    };
    let mut tx = begin(core, &target).await?;
    db::tenancy::api_key_insert(&mut *tx, &key)
        .await
        .map_err(Error::on(&target))?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        key.tenant_id.as_deref(),
        format!("api_key/{}", key.id),
        None,
        Some(audit::api_key(&key)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    tracing::info!(key_id = %key.id, role = key.role.as_str(), tenant = ?key.tenant_id, "API key created");
    Ok((key, secret.token))
}

/// Revokes API key `key_id` (RevokeApiKey); a tenant actor reaches only
/// its own tenant's keys. Revoking a revoked key keeps its first revoke
/// time. Audited as `api_key/<id>` before and after. Returns the key as
/// revoked.
///
/// # Errors
/// `NotFound` (also for another tenant's key), database errors.
pub async fn revoke_api_key(core: &Core, actor: Actor<'_>, key_id: Uuid) -> Result<ApiKey> {
    let target = Target::new("api_key", key_id);
    let now = core.clock.now();
    let mut tx = begin(core, &target).await?;
    let before = db::tenancy::api_key_revoke(&mut tx, key_id, actor.caller.tenant.as_deref(), now)
        .await
        .map_err(Error::on(&target))?;
    let after = ApiKey {
        revoke_time: before.revoke_time.or(Some(now)),
        ..before.clone()
    };
    let event = actor.audit(
        core.clock.new_id(),
        now,
        before.tenant_id.as_deref(),
        format!("api_key/{key_id}"),
        Some(audit::api_key(&before)),
        Some(audit::api_key(&after)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    tracing::info!(key_id = %key_id, "API key revoked");
    Ok(after)
}

/// One page of API keys, oldest first; the cursor is the last key's id.
/// `tenant_id` filters a platform caller's list (`None`: every key); a
/// tenant caller always gets its own tenant's keys only.
///
/// # Errors
/// Database errors.
pub async fn list_api_keys(
    core: &Core,
    caller: &Caller,
    tenant_id: Option<&str>,
    page: Page<Uuid>,
) -> Result<(Vec<ApiKey>, Option<Uuid>)> {
    let tenant = caller.tenant.as_deref().or(tenant_id);
    let rows = db::tenancy::api_key_list(
        &core.pool,
        tenant,
        page.after.unwrap_or(Uuid::nil()),
        page.size + 1,
    )
    .await
    .map_err(Error::on(&Target::all("api_key")))?;
    Ok(super::page(rows, page.size, |k| k.id))
}

/// The stored API key `key_id`, any tenant, revoked or not: what
/// authentication checks a token against. Takes the pool, as the gate runs
/// before any service (and its `Core`) is reached.
///
/// # Errors
/// `NotFound` for an unknown id, database errors.
pub async fn find_api_key(pool: &PgPool, key_id: Uuid) -> Result<ApiKey> {
    db::tenancy::api_key_get(pool, key_id, None)
        .await
        .map_err(Error::on(&Target::new("api_key", key_id)))
}

/// Which events [`list_audit_events`] returns; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this tenant's events; ignored for a tenant caller, which sees
    /// only its own tenant's.
    pub tenant_id: Option<String>,
    /// Only calls made with this key.
    pub key_id: Option<Uuid>,
    /// Only this method (full name, or its last part, e.g. `CreateBinding`).
    pub method: Option<String>,
    /// Only targets starting with this, e.g. `binding/` or `run/<id>`.
    pub target_prefix: Option<String>,
    /// Only events at or after this time.
    pub start_time: Option<DateTime<Utc>>,
    /// Only events before this time.
    pub end_time: Option<DateTime<Utc>>,
}

/// One page of audit events matching `filter`, newest first; the cursor is
/// the last event's id.
///
/// # Errors
/// Database errors.
pub async fn list_audit_events(
    core: &Core,
    caller: &Caller,
    filter: &AuditFilter,
    page: Page<Uuid>,
) -> Result<(Vec<AuditEvent>, Option<Uuid>)> {
    let f = db::tenancy::AuditFilter {
        tenant_id: caller.tenant.as_deref().or(filter.tenant_id.as_deref()),
        key_id: filter.key_id,
        method: filter.method.as_deref(),
        target_prefix: filter.target_prefix.as_deref(),
        start_time: filter.start_time,
        end_time: filter.end_time,
    };
    let rows = db::tenancy::audit_list(
        &core.pool,
        &f,
        page.after.unwrap_or(Uuid::max()),
        page.size + 1,
    )
    .await
    .map_err(Error::on(&Target::all("audit_event")))?;
    Ok(super::page(rows, page.size, |e| e.id))
}
