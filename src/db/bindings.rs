//! `bindings`: a tenant's use of a definition. Every function takes the
//! tenant and filters by it, so isolation holds in SQL, not only in handlers.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Error, decode, encode, policy_from_cols};
use crate::domain::{Binding, Handler, MisfirePolicy, RunPolicy, Schedule, merge_params};

struct Row {
    id: Uuid,
    tenant_id: String,
    definition: String,
    schedule: Option<serde_json::Value>,
    params: Option<serde_json::Value>,
    effective_from: Option<DateTime<Utc>>,
    effective_until: Option<DateTime<Utc>>,
    effective_schedule: serde_json::Value,
    next_run_time: Option<DateTime<Utc>>,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
    version: i64,
    enabled: bool,
    paused: bool,
    pause_note: String,
    pause_expire_time: Option<DateTime<Utc>>,
    def_params: serde_json::Value,
    overlap_policy: String,
    retry_policy: serde_json::Value,
    timeout_secs: Option<i32>,
    priority: i32,
}

impl TryFrom<Row> for Binding {
    type Error = Error;
    fn try_from(r: Row) -> Result<Self, Error> {
        let effective_params = match &r.params {
            Some(p) => merge_params(&r.def_params, p),
            None => r.def_params.clone(),
        };
        Ok(Binding {
            id: r.id,
            tenant_id: r.tenant_id,
            definition: r.definition,
            schedule: r
                .schedule
                .map(|s| decode("binding schedule", s))
                .transpose()?,
            params: r.params,
            effective_from: r.effective_from,
            effective_until: r.effective_until,
            effective_schedule: decode("binding effective schedule", r.effective_schedule)?,
            effective_params,
            next_run_time: r.next_run_time,
            create_time: r.create_time,
            update_time: r.update_time,
            version: r.version,
            enabled: r.enabled,
            paused: r.paused,
            pause_note: r.pause_note,
            pause_expire_time: r.pause_expire_time,
            effective_policy: policy_from_cols(
                &r.overlap_policy,
                r.retry_policy,
                r.timeout_secs,
                r.priority,
            )?,
        })
    }
}

/// Inserts `b` and announces the change to every node's scheduler
/// ([`super::CHANNEL_BINDINGS`]).
///
/// # Errors
/// [`Error::AlreadyExists`] when the tenant already binds the definition;
/// [`Error::NotFound`] when the definition does not exist (any more).
pub async fn binding_insert(db: impl PgExecutor<'_>, b: &Binding) -> Result<(), Error> {
    let r = sqlx::query!(
        r#"WITH ins AS (
             INSERT INTO bindings (id, tenant_id, definition, schedule, params, effective_schedule,
                                   next_run_time, create_time, update_time, version, effective_from,
                                   effective_until, enabled)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id)
           SELECT pg_notify('sked_bindings', '') AS "n" FROM ins"#,
        b.id,
        b.tenant_id,
        b.definition,
        b.schedule.as_ref().map(encode),
        b.params,
        encode(&b.effective_schedule),
        b.next_run_time,
        b.create_time,
        b.update_time,
        b.version,
        b.effective_from,
        b.effective_until,
        b.enabled,
    )
    .execute(db)
    .await;
    match r {
        Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => Err(Error::NotFound),
        r => r.map(|_| ()).map_err(Error::from),
    }
}

/// Gets the tenant's binding `id`.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such binding.
pub async fn binding_get(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    id: Uuid,
) -> Result<Binding, Error> {
    sqlx::query_as!(
        Row,
        "SELECT b.id, b.tenant_id, b.definition, b.schedule, b.params, b.effective_from, b.effective_until,
                b.effective_schedule,
                b.next_run_time, b.create_time, b.update_time, b.version, b.enabled, b.paused, b.pause_note,
                b.pause_expire_time, d.params AS def_params, d.overlap_policy, d.retry_policy, d.timeout_secs,
                d.priority
         FROM bindings b JOIN definitions d ON d.name = b.definition
         WHERE b.tenant_id = $1 AND b.id = $2",
        tenant_id,
        id
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Lists up to `limit` of the tenant's bindings with id > `after`, in id
/// (creation) order, optionally only those of `definition`.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_list(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    after: Uuid,
    definition: Option<&str>,
    limit: i64,
) -> Result<Vec<Binding>, Error> {
    sqlx::query_as!(
        Row,
        "SELECT b.id, b.tenant_id, b.definition, b.schedule, b.params, b.effective_from, b.effective_until,
                b.effective_schedule,
                b.next_run_time, b.create_time, b.update_time, b.version, b.enabled, b.paused, b.pause_note,
                b.pause_expire_time, d.params AS def_params, d.overlap_policy, d.retry_policy, d.timeout_secs,
                d.priority
         FROM bindings b JOIN definitions d ON d.name = b.definition
         WHERE b.tenant_id = $1 AND b.id > $2 AND ($3::text IS NULL OR b.definition = $3)
         ORDER BY b.id LIMIT $4",
        tenant_id,
        after,
        definition,
        limit
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Binding::try_from)
    .collect()
}

/// Deletes the tenant's binding `id`; its runs stay.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such binding.
pub async fn binding_delete(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    id: Uuid,
) -> Result<(), Error> {
    let r = sqlx::query!(
        r#"WITH del AS (DELETE FROM bindings WHERE tenant_id = $1 AND id = $2 RETURNING id)
           SELECT count(*) AS "n!", pg_notify('sked_bindings', '') AS "x" FROM del"#,
        tenant_id,
        id
    )
    .fetch_one(db)
    .await?;
    if r.n == 0 {
        Err(Error::NotFound)
    } else {
        Ok(())
    }
}

/// Whether binding `id` exists, taking a `FOR KEY SHARE` lock on it for the
/// caller's transaction: a DeleteBinding then waits for that transaction
/// (and sees what it wrote), or has committed before and the binding is gone.
/// Used before writing a retry, so a deleted binding gets none.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_lock_shared(db: impl PgExecutor<'_>, id: Uuid) -> Result<bool, Error> {
    Ok(sqlx::query_scalar!(
        "SELECT 1 AS x FROM bindings WHERE id = $1 FOR KEY SHARE",
        id
    )
    .fetch_optional(db)
    .await?
    .is_some())
}

/// Locks the bindings of definition `name` (`FOR UPDATE`) for the caller's
/// transaction, so a scheduler pass firing one of them (which holds its row
/// lock) finishes first, and later passes see what the caller writes (a
/// disabled definition).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_lock_by_definition(db: impl PgExecutor<'_>, name: &str) -> Result<(), Error> {
    sqlx::query!(
        "SELECT id FROM bindings WHERE definition = $1 FOR UPDATE",
        name
    )
    .fetch_all(db)
    .await?;
    Ok(())
}

/// A binding whose next fire time has come, locked for this transaction.
#[derive(Debug, Clone)]
pub struct DueBinding {
    /// Binding id.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// Definition name.
    pub definition: String,
    /// Schedule in force.
    pub schedule: Schedule,
    /// The due fire time (≤ now).
    pub next_run_time: DateTime<Utc>,
    /// Effective params (definition's merged with the binding's).
    pub params: serde_json::Value,
    /// Handler to snapshot into the run.
    pub handler: Handler,
    /// The definition's misfire policy.
    pub misfire_policy: MisfirePolicy,
    /// The definition's run policy, snapshotted into runs.
    pub policy: RunPolicy,
    /// Binding and definition both enabled.
    pub enabled: bool,
    /// Paused (possibly with an expiry that has passed).
    pub paused: bool,
    /// When the pause ends by itself.
    pub pause_expire_time: Option<DateTime<Utc>>,
}

/// Locks up to `limit` bindings due at `now` (`next_run_time <= now`),
/// skipping rows another node has locked (`FOR UPDATE SKIP LOCKED`): each due
/// binding is handled by exactly one node at a time. Call inside a
/// transaction and advance them with [`binding_set_next_run_times`].
///
/// # Errors
/// [`Error::Sqlx`] on database failure; [`Error::Corrupt`] for bad JSON.
pub async fn binding_lock_due(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<DueBinding>, Error> {
    let rows = sqlx::query!(
        r#"SELECT b.id, b.tenant_id, b.definition, b.effective_schedule, b.next_run_time AS "next_run_time!",
                  b.params, d.params AS def_params, d.handler, d.misfire_policy, d.overlap_policy,
                  d.retry_policy, d.timeout_secs, d.priority, b.enabled AND d.enabled AS "enabled!",
                  b.paused, b.pause_expire_time
           FROM bindings b JOIN definitions d ON d.name = b.definition
           WHERE b.next_run_time <= $1
           ORDER BY b.next_run_time
           LIMIT $2
           FOR UPDATE OF b SKIP LOCKED"#,
        now,
        limit
    )
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(DueBinding {
                id: r.id,
                tenant_id: r.tenant_id,
                definition: r.definition,
                schedule: decode("binding effective schedule", r.effective_schedule)?,
                next_run_time: r.next_run_time,
                params: match &r.params {
                    Some(p) => merge_params(&r.def_params, p),
                    None => r.def_params,
                },
                handler: decode("definition handler", r.handler)?,
                misfire_policy: decode("definition misfire policy", r.misfire_policy)?,
                policy: policy_from_cols(
                    &r.overlap_policy,
                    r.retry_policy,
                    r.timeout_secs,
                    r.priority,
                )?,
                enabled: r.enabled,
                paused: r.paused,
                pause_expire_time: r.pause_expire_time,
            })
        })
        .collect()
}

/// Sets each binding's next fire time (`None` = never again), and ends the
/// pauses whose expiry is at or before `now` (auto-resume).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_set_next_run_times(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    next: &[Option<DateTime<Utc>>],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    sqlx::query!(
        "UPDATE bindings b SET next_run_time = u.next,
                paused = b.paused AND NOT coalesce(b.pause_expire_time <= $3, false),
                pause_note = CASE WHEN b.pause_expire_time <= $3 THEN '' ELSE b.pause_note END,
                pause_expire_time = CASE WHEN b.pause_expire_time <= $3 THEN NULL ELSE b.pause_expire_time END
         FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, next)
         WHERE b.id = u.id",
        ids,
        next as &[Option<DateTime<Utc>>],
        now,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The earliest next fire time over all bindings, if any binding will fire.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_next_due_time(
    db: impl PgExecutor<'_>,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(
        sqlx::query_scalar!("SELECT min(next_run_time) FROM bindings")
            .fetch_one(db)
            .await?,
    )
}

/// Gets the tenant's binding `id` and locks it for this transaction.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such binding.
pub async fn binding_get_for_update(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    id: Uuid,
) -> Result<Binding, Error> {
    sqlx::query_as!(
        Row,
        "SELECT b.id, b.tenant_id, b.definition, b.schedule, b.params, b.effective_from, b.effective_until,
                b.effective_schedule,
                b.next_run_time, b.create_time, b.update_time, b.version, b.enabled, b.paused, b.pause_note,
                b.pause_expire_time, d.params AS def_params, d.overlap_policy, d.retry_policy, d.timeout_secs,
                d.priority
         FROM bindings b JOIN definitions d ON d.name = b.definition
         WHERE b.tenant_id = $1 AND b.id = $2
         FOR UPDATE OF b",
        tenant_id,
        id
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Writes `b`'s overrides, effective schedule, next fire time, enabled and
/// pause state if its
/// version is still `expected_version` (`b.version` is the new one), and
/// wakes every node's scheduler.
///
/// # Errors
/// [`Error::Conflict`] when the version moved on.
pub async fn binding_update(
    db: impl PgExecutor<'_>,
    b: &Binding,
    expected_version: i64,
) -> Result<(), Error> {
    let r = sqlx::query!(
        r#"WITH u AS (
             UPDATE bindings SET schedule = $3, params = $4, effective_schedule = $5, next_run_time = $6,
                                 update_time = $7, version = $8, effective_from = $10, effective_until = $11,
                                 enabled = $12, paused = $13, pause_note = $14, pause_expire_time = $15
             WHERE tenant_id = $1 AND id = $2 AND version = $9 RETURNING id)
           SELECT count(*) AS "n!", pg_notify('sked_bindings', '') AS "x" FROM u"#,
        b.tenant_id,
        b.id,
        b.schedule.as_ref().map(encode),
        b.params,
        encode(&b.effective_schedule),
        b.next_run_time,
        b.update_time,
        b.version,
        expected_version,
        b.effective_from,
        b.effective_until,
        b.enabled,
        b.paused,
        b.pause_note,
        b.pause_expire_time,
    )
    .fetch_one(db)
    .await?;
    if r.n == 0 {
        Err(Error::Conflict)
    } else {
        Ok(())
    }
}

/// A binding that inherits its definition's schedule: id and effective window.
pub type InheritingBinding = (Uuid, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Bindings of `definition` that inherit its schedule (no override), locked.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_list_inheriting_schedule(
    db: impl PgExecutor<'_>,
    definition: &str,
) -> Result<Vec<InheritingBinding>, Error> {
    Ok(sqlx::query!(
        "SELECT id, effective_from, effective_until FROM bindings
         WHERE definition = $1 AND schedule IS NULL ORDER BY id FOR UPDATE",
        definition
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| (r.id, r.effective_from, r.effective_until))
    .collect())
}

/// Sets each binding's effective schedule and next fire time and wakes every
/// node's scheduler (a definition's schedule changed).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_set_effective_schedules(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    schedules: &[Schedule],
    next: &[Option<DateTime<Utc>>],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let schedules: Vec<serde_json::Value> = schedules.iter().map(encode).collect();
    sqlx::query!(
        r#"WITH u AS (
             UPDATE bindings b SET effective_schedule = u.schedule, next_run_time = u.next, update_time = $4,
                                   version = version + 1
             FROM UNNEST($1::uuid[], $2::jsonb[], $3::timestamptz[]) AS u(id, schedule, next)
             WHERE b.id = u.id RETURNING b.id)
           SELECT count(*) AS "n!", pg_notify('sked_bindings', '') AS "x" FROM u"#,
        ids,
        &schedules,
        next as &[Option<DateTime<Utc>>],
        now,
    )
    .fetch_one(db)
    .await?;
    Ok(())
}
