//! `api_keys`, `audit_events`, `tenant_quotas`: keys (hashes only), the
//! audit log, per-tenant limits and their usage.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::Error;
use crate::domain::Role;
use crate::domain::RunReason;
use crate::domain::tenancy::{ApiKey, AuditEvent, Quota, QuotaUsage};

struct KeyRow {
    id: Uuid,
    name: String,
    role: String,
    tenant_id: Option<String>,
    secret_hash: String,
    create_time: DateTime<Utc>,
    created_by: Option<Uuid>,
    revoke_time: Option<DateTime<Utc>>,
}

impl TryFrom<KeyRow> for ApiKey {
    type Error = Error;
    fn try_from(r: KeyRow) -> Result<Self, Error> {
        Ok(ApiKey {
            id: r.id,
            name: r.name,
            role: Role::parse(&r.role).ok_or_else(|| Error::Corrupt {
                what: "api key role",
                source: <serde_json::Error as serde::de::Error>::custom(format!(
                    "unknown role {:?}",
                    r.role
                )),
            })?,
            tenant_id: r.tenant_id,
            secret_hash: r.secret_hash,
            create_time: r.create_time,
            created_by: r.created_by,
            revoke_time: r.revoke_time,
        })
    }
}

/// Stores `k` (its hash, never a secret).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn api_key_insert(db: impl PgExecutor<'_>, k: &ApiKey) -> Result<(), Error> {
    sqlx::query!(
        "INSERT INTO api_keys (id, name, role, tenant_id, secret_hash, create_time, created_by, revoke_time)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        k.id,
        k.name,
        k.role.as_str(),
        k.tenant_id,
        k.secret_hash,
        k.create_time,
        k.created_by,
        k.revoke_time,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The key `id`; with `tenant` set, only if it is that tenant's key (a
/// tenant admin never sees platform keys or other tenants' keys).
///
/// # Errors
/// [`Error::NotFound`] when there is none (for that tenant).
pub async fn api_key_get(
    db: impl PgExecutor<'_>,
    id: Uuid,
    tenant: Option<&str>,
) -> Result<ApiKey, Error> {
    sqlx::query_as!(
        KeyRow,
        "SELECT id, name, role, tenant_id, secret_hash, create_time, created_by, revoke_time
         FROM api_keys WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
        id,
        tenant
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Revokes key `id` at `now` (with `tenant` set, only that tenant's key);
/// revoking a revoked key keeps its first revoke time. Returns the key
/// before the change.
///
/// # Errors
/// [`Error::NotFound`] when there is none (for that tenant).
pub async fn api_key_revoke(
    db: &mut PgConnection,
    id: Uuid,
    tenant: Option<&str>,
    now: DateTime<Utc>,
) -> Result<ApiKey, Error> {
    let before = sqlx::query_as!(
        KeyRow,
        "SELECT id, name, role, tenant_id, secret_hash, create_time, created_by, revoke_time
         FROM api_keys WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2) FOR UPDATE",
        id,
        tenant
    )
    .fetch_one(&mut *db)
    .await?;
    sqlx::query!(
        "UPDATE api_keys SET revoke_time = coalesce(revoke_time, $2) WHERE id = $1",
        id,
        now
    )
    .execute(&mut *db)
    .await?;
    before.try_into()
}

/// Keys in id order after `after`, up to `limit`: with `tenant` set only
/// that tenant's, otherwise all (platform keys and every tenant's).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn api_key_list(
    db: impl PgExecutor<'_>,
    tenant: Option<&str>,
    after: Uuid,
    limit: i64,
) -> Result<Vec<ApiKey>, Error> {
    sqlx::query_as!(
        KeyRow,
        "SELECT id, name, role, tenant_id, secret_hash, create_time, created_by, revoke_time
         FROM api_keys WHERE id > $1 AND ($2::text IS NULL OR tenant_id = $2)
         ORDER BY id LIMIT $3",
        after,
        tenant,
        limit
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(ApiKey::try_from)
    .collect()
}

/// How many keys are not revoked (start-up tells an operator with none how
/// to create the first).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn api_key_count_active(db: impl PgExecutor<'_>) -> Result<i64, Error> {
    Ok(
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM api_keys WHERE revoke_time IS NULL"#)
            .fetch_one(db)
            .await?,
    )
}

/// Appends an audit event.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn audit_insert(db: impl PgExecutor<'_>, e: &AuditEvent) -> Result<(), Error> {
    sqlx::query!(
        "INSERT INTO audit_events (id, time, key_id, actor, tenant_id, method, target, before, after)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        e.id,
        e.time,
        e.key_id,
        e.actor,
        e.tenant_id,
        e.method,
        e.target,
        e.before,
        e.after,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Filters of [`audit_list`]; `None` = any.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter<'a> {
    /// Only this tenant's events (tenant admins are pinned to theirs).
    pub tenant_id: Option<&'a str>,
    /// Only calls made with this key.
    pub key_id: Option<Uuid>,
    /// Only this method (full name, or its last part, e.g. `CreateBinding`).
    pub method: Option<&'a str>,
    /// Only targets starting with this, e.g. `binding/` or `run/<id>`.
    pub target_prefix: Option<&'a str>,
    /// Only events at or after.
    pub start_time: Option<DateTime<Utc>>,
    /// Only events before.
    pub end_time: Option<DateTime<Utc>>,
}

struct AuditRow {
    id: Uuid,
    time: DateTime<Utc>,
    key_id: Option<Uuid>,
    actor: String,
    tenant_id: Option<String>,
    method: String,
    target: String,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
}

/// Audit events newest first, with id < `before`, up to `limit`.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn audit_list(
    db: impl PgExecutor<'_>,
    f: &AuditFilter<'_>,
    before: Uuid,
    limit: i64,
) -> Result<Vec<AuditEvent>, Error> {
    let rows = sqlx::query_as!(
        AuditRow,
        "SELECT id, time, key_id, actor, tenant_id, method, target, before, after
         FROM audit_events
         WHERE id < $1
           AND ($2::text IS NULL OR tenant_id = $2)
           AND ($3::uuid IS NULL OR key_id = $3)
           AND ($4::text IS NULL OR method = $4 OR right(method, length($4) + 1) = '/' || $4)
           AND ($5::text IS NULL OR starts_with(target, $5))
           AND ($6::timestamptz IS NULL OR time >= $6)
           AND ($7::timestamptz IS NULL OR time < $7)
         ORDER BY id DESC LIMIT $8",
        before,
        f.tenant_id,
        f.key_id,
        f.method,
        f.target_prefix,
        f.start_time,
        f.end_time,
        limit
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| AuditEvent {
            id: r.id,
            time: r.time,
            key_id: r.key_id,
            actor: r.actor,
            tenant_id: r.tenant_id,
            method: r.method,
            target: r.target,
            before: r.before,
            after: r.after,
        })
        .collect())
}

fn to_u32(v: Option<i32>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn to_i32(v: Option<u32>) -> Option<i32> {
    v.and_then(|v| i32::try_from(v).ok())
}

/// The tenant's quota (all unlimited when none was set).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn quota_get(db: impl PgExecutor<'_>, tenant: &str) -> Result<Quota, Error> {
    let r = sqlx::query!(
        "SELECT max_concurrent_runs, max_runs_per_hour, max_bindings FROM tenant_quotas WHERE tenant_id = $1",
        tenant
    )
    .fetch_optional(db)
    .await?;
    Ok(r.map(|r| Quota {
        max_concurrent_runs: to_u32(r.max_concurrent_runs),
        max_runs_per_hour: to_u32(r.max_runs_per_hour),
        max_bindings: to_u32(r.max_bindings),
    })
    .unwrap_or_default())
}

/// Replaces the tenant's quota; returns the previous one. Wakes the
/// executors ([`super::notify::RUNS`]): a raised concurrency limit frees waiting runs.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn quota_set(
    db: &mut PgConnection,
    tenant: &str,
    q: &Quota,
    now: DateTime<Utc>,
) -> Result<Quota, Error> {
    let before = sqlx::query!(
        "SELECT max_concurrent_runs, max_runs_per_hour, max_bindings FROM tenant_quotas
         WHERE tenant_id = $1 FOR UPDATE",
        tenant
    )
    .fetch_optional(&mut *db)
    .await?
    .map(|r| Quota {
        max_concurrent_runs: to_u32(r.max_concurrent_runs),
        max_runs_per_hour: to_u32(r.max_runs_per_hour),
        max_bindings: to_u32(r.max_bindings),
    })
    .unwrap_or_default();
    sqlx::query!(
        "INSERT INTO tenant_quotas (tenant_id, max_concurrent_runs, max_runs_per_hour, max_bindings, update_time)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id) DO UPDATE SET max_concurrent_runs = $2, max_runs_per_hour = $3,
                                               max_bindings = $4, update_time = $5",
        tenant,
        to_i32(q.max_concurrent_runs),
        to_i32(q.max_runs_per_hour),
        to_i32(q.max_bindings),
        now
    )
    .execute(&mut *db)
    .await?;
    sqlx::query!("SELECT pg_notify($1::text, '')", super::notify::RUNS)
        .execute(&mut *db)
        .await?;
    Ok(before)
}

/// Refuses a new binding of `tenant` when it has `max_bindings` already.
/// Locks the tenant's quota row, so concurrent creates are counted one after
/// the other; call inside the transaction that inserts the binding.
///
/// # Errors
/// [`Error::OverQuota`] over the limit; [`Error::Sqlx`].
pub async fn quota_check_new_binding(db: &mut PgConnection, tenant: &str) -> Result<(), Error> {
    let max = sqlx::query_scalar!(
        "SELECT max_bindings FROM tenant_quotas WHERE tenant_id = $1 FOR UPDATE",
        tenant
    )
    .fetch_optional(&mut *db)
    .await?
    .flatten();
    let Some(max) = max else { return Ok(()) };
    let n = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM bindings WHERE tenant_id = $1"#,
        tenant
    )
    .fetch_one(&mut *db)
    .await?;
    if n >= i64::from(max) {
        return Err(Error::OverQuota(format!(
            "tenant {tenant:?} has {n} binding(s), its quota max_bindings is {max}"
        )));
    }
    Ok(())
}

/// How long before its `create_time` a run's id may have been minted, at
/// most: the id comes from the same clock ([`crate::domain::Clock::new_id`])
/// when the run is built, and the row is written within the same pass or
/// call (a firing pass prepared ahead of its instant: seconds).
const ID_MINTED_BEFORE_CREATE: chrono::Duration = chrono::Duration::minutes(5);

/// A run id below every id of the runs created after `since`: the reads of
/// runs "created in the last hour" bound themselves by it on
/// `runs_tenant_id` (tenant, id), then test `create_time` exactly. Run ids
/// are UUIDv7, minted at most [`ID_MINTED_BEFORE_CREATE`] before the row's
/// `create_time`; so `runs` needs no index of its own on `create_time`,
/// whose entries every write of a run would pay for.
fn created_floor(since: DateTime<Utc>) -> Uuid {
    crate::domain::cluster::uuid_v7_floor((since - ID_MINTED_BEFORE_CREATE).timestamp_millis())
}

/// What is left of each tenant's hourly budget (first attempts created in
/// the hour before `now`, skipped ones not counted), for those of `tenants`
/// that have one; tenants without a budget are absent. Locks those tenants'
/// quota rows (in tenant order, so passes never deadlock): schedulers and
/// triggers on other nodes count after this transaction commits.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn quota_hourly_remaining(
    db: &mut PgConnection,
    tenants: &[String],
    now: DateTime<Utc>,
) -> Result<HashMap<String, u64>, Error> {
    // One tenant (TriggerRun, BackfillRuns, a retry) by equality: PostgreSQL
    // plans `= ANY ($1)` anew on every call (its plan for a one-element array
    // looks cheaper than the generic one, which assumes ten), 60-70 µs of
    // planning for 6 µs of execution per TriggerRun in `pg_stat_statements`
    // (`plans` = `calls`); by `= $1` both plans cost the same, and the
    // generic one is kept from the sixth call on.
    let budgets: Vec<(String, i32)> = match tenants {
        [tenant] => sqlx::query!(
            r#"SELECT tenant_id, max_runs_per_hour AS "max!" FROM tenant_quotas
               WHERE tenant_id = $1 AND max_runs_per_hour IS NOT NULL
               FOR UPDATE"#,
            tenant
        )
        .fetch_all(&mut *db)
        .await?
        .into_iter()
        .map(|b| (b.tenant_id, b.max))
        .collect(),
        _ => sqlx::query!(
            r#"SELECT tenant_id, max_runs_per_hour AS "max!" FROM tenant_quotas
               WHERE tenant_id = ANY ($1) AND max_runs_per_hour IS NOT NULL
               ORDER BY tenant_id FOR UPDATE"#,
            tenants
        )
        .fetch_all(&mut *db)
        .await?
        .into_iter()
        .map(|b| (b.tenant_id, b.max))
        .collect(),
    };
    if budgets.is_empty() {
        return Ok(HashMap::new());
    }
    let limited: Vec<String> = budgets.iter().map(|(t, _)| t.clone()).collect();
    // A separate statement: under READ COMMITTED it sees what the previous
    // lock holder committed.
    let since = now - chrono::Duration::hours(1);
    let used = sqlx::query!(
        r#"SELECT tenant_id, count(*) AS "n!" FROM runs
           WHERE tenant_id = ANY ($1) AND id > $3 AND create_time > $2 AND attempt = 1 AND state <> 'SKIPPED'
           GROUP BY tenant_id"#,
        &limited,
        since,
        created_floor(since)
    )
    .fetch_all(&mut *db)
    .await?;
    let used: HashMap<String, i64> = used.into_iter().map(|u| (u.tenant_id, u.n)).collect();
    Ok(budgets
        .into_iter()
        .map(|(tenant_id, max)| {
            let u = used.get(&tenant_id).copied().unwrap_or(0);
            let left = (i64::from(max) - u).max(0) as u64;
            (tenant_id, left)
        })
        .collect())
}

/// Which of a set of tenants have which quotas ([`quota_kinds`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaKinds {
    /// Tenants with an hourly budget (`max_runs_per_hour`).
    pub hourly: Vec<String>,
    /// Tenants with a concurrency quota (`max_concurrent_runs`): their runs
    /// wait for a slot in the claim, so they are never completed inline.
    pub concurrency: Vec<String>,
}

/// Which of `tenants` have an hourly budget and which a concurrency quota,
/// read without a lock: a fire prepared ahead of its instant leaves the
/// bindings of budgeted tenants to the pass at the instant, which counts
/// under the lock of [`quota_hourly_remaining`]. Tenants without a quota
/// row are in neither list.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn quota_kinds(
    db: impl sqlx::PgExecutor<'_>,
    tenants: &[String],
) -> Result<QuotaKinds, Error> {
    let rows = sqlx::query!(
        r#"SELECT tenant_id, max_runs_per_hour IS NOT NULL AS "hourly!",
                  max_concurrent_runs IS NOT NULL AS "concurrency!"
           FROM tenant_quotas
           WHERE tenant_id = ANY ($1) AND (max_runs_per_hour IS NOT NULL OR max_concurrent_runs IS NOT NULL)"#,
        tenants
    )
    .fetch_all(db)
    .await?;
    let mut kinds = QuotaKinds::default();
    for r in rows {
        if r.hourly {
            kinds.hourly.push(r.tenant_id.clone());
        }
        if r.concurrency {
            kinds.concurrency.push(r.tenant_id);
        }
    }
    Ok(kinds)
}

/// The tenant's quota and its use at `now` (see [`QuotaUsage`]).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn quota_usage(
    db: &mut PgConnection,
    tenant: &str,
    now: DateTime<Utc>,
) -> Result<QuotaUsage, Error> {
    let quota = quota_get(&mut *db, tenant).await?;
    let hour_ago = now - chrono::Duration::hours(1);
    let r = sqlx::query!(
        r#"SELECT
             (SELECT count(*) FROM runs WHERE tenant_id = $1 AND state = 'RUNNING') AS "running!",
             (SELECT count(*) FROM runs WHERE tenant_id = $1 AND state = 'QUEUED' AND not_before <= $2) AS "queued!",
             (SELECT count(*) FILTER (WHERE attempt = 1 AND state <> 'SKIPPED') FROM runs
                WHERE tenant_id = $1 AND id > $5 AND create_time > $3) AS "last_hour!",
             (SELECT count(*) FILTER (WHERE throttled) FROM runs
                WHERE tenant_id = $1 AND id > $5 AND create_time > $3) AS "throttled!",
             (SELECT count(*) FILTER (WHERE state = 'SKIPPED' AND reason = $4) FROM runs
                WHERE tenant_id = $1 AND id > $5 AND create_time > $3) AS "skipped!",
             (SELECT count(*) FROM bindings WHERE tenant_id = $1) AS "bindings!""#,
        tenant,
        now,
        hour_ago,
        RunReason::Quota.as_str(),
        created_floor(hour_ago)
    )
    .fetch_one(&mut *db)
    .await?;
    let running = r.running as u64;
    let queued = r.queued as u64;
    let throttled_now = match quota.max_concurrent_runs {
        Some(m) if running >= u64::from(m) => queued,
        _ => 0,
    };
    Ok(QuotaUsage {
        quota,
        running_runs: running,
        queued_runs: queued,
        throttled_now,
        runs_last_hour: r.last_hour as u64,
        throttled_last_hour: r.throttled as u64,
        skipped_last_hour: r.skipped as u64,
        bindings: r.bindings as u64,
    })
}
