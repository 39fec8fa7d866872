//! `definitions`: task definitions.

use std::collections::BTreeMap;

use sqlx::PgExecutor;

use super::{DbTime, Error, decode, encode, policy_from_cols};
use crate::domain::{Definition, TenantScope};

struct Row {
    name: String,
    display_name: String,
    description: String,
    labels: serde_json::Value,
    handler: serde_json::Value,
    schedule: serde_json::Value,
    params: serde_json::Value,
    misfire_policy: serde_json::Value,
    overlap_policy: String,
    retry_policy: serde_json::Value,
    timeout_secs: Option<i32>,
    priority: i32,
    enabled: bool,
    protected: bool,
    tenant_scope: Option<Vec<String>>,
    max_output_bytes: Option<i64>,
    max_active_runs: Option<i32>,
    create_time: DbTime,
    update_time: DbTime,
    version: i64,
}

impl TryFrom<Row> for Definition {
    type Error = Error;
    fn try_from(r: Row) -> Result<Self, Error> {
        Ok(Definition {
            name: r.name,
            display_name: r.display_name,
            description: r.description,
            labels: decode::<BTreeMap<String, String>>("definition labels", r.labels)?,
            handler: decode("definition handler", r.handler)?,
            schedule: decode("definition schedule", r.schedule)?,
            params: r.params,
            misfire_policy: decode("definition misfire policy", r.misfire_policy)?,
            policy: policy_from_cols(
                &r.overlap_policy,
                r.retry_policy,
                r.timeout_secs,
                r.priority,
            )?,
            enabled: r.enabled,
            protected: r.protected,
            tenant_scope: match r.tenant_scope {
                None => TenantScope::AllTenants,
                Some(l) => TenantScope::AllowList(l),
            },
            max_output_bytes: r.max_output_bytes.and_then(|m| u64::try_from(m).ok()),
            max_active_runs: r
                .max_active_runs
                .and_then(|m| u32::try_from(m).ok())
                .filter(|&m| m > 0),
            create_time: r.create_time.get("definition create_time")?,
            update_time: r.update_time.get("definition update_time")?,
            version: r.version,
        })
    }
}

/// Inserts `d` (its times and version are taken as given).
///
/// # Errors
/// [`Error::Duplicate`] when the name is taken.
pub async fn definition_insert(db: impl PgExecutor<'_>, d: &Definition) -> Result<(), Error> {
    sqlx::query!(
        "INSERT INTO definitions (name, display_name, description, labels, handler, schedule, params,
                                  create_time, update_time, version, misfire_policy, overlap_policy,
                                  retry_policy, timeout_secs, priority, enabled, protected, tenant_scope,
                                  max_output_bytes, max_active_runs)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
        d.name,
        d.display_name,
        d.description,
        encode(&d.labels),
        encode(&d.handler),
        encode(&d.schedule),
        d.params,
        d.create_time,
        d.update_time,
        d.version,
        encode(&d.misfire_policy),
        d.policy.overlap.as_str(),
        encode(&d.policy.retry),
        d.policy.timeout_secs.map(|t| t as i32),
        d.policy.priority,
        d.enabled,
        d.protected,
        d.tenant_scope.as_list(),
        d.max_output_bytes.and_then(|m| i64::try_from(m).ok()),
        d.max_active_runs.map(|m| m as i32),
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Gets the definition `name`, if `visible_to` (a tenant; `None` = the
/// platform, which sees all) is in its tenant scope.
///
/// # Errors
/// [`Error::NotFound`] when there is none, or the tenant may not see it.
pub async fn definition_get(
    db: impl PgExecutor<'_>,
    name: &str,
    visible_to: Option<&str>,
) -> Result<Definition, Error> {
    sqlx::query_as!(
        Row,
        r#"SELECT name, display_name, description, labels, handler, schedule, params, misfire_policy,
                overlap_policy, retry_policy, timeout_secs, priority, enabled, protected, tenant_scope,
                max_output_bytes, max_active_runs, create_time AS "create_time: DbTime",
                update_time AS "update_time: DbTime", version
         FROM definitions
         WHERE name = $1 AND ($2::text IS NULL OR tenant_scope IS NULL OR $2 = ANY (tenant_scope))"#,
        name,
        visible_to
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Lists up to `limit` definitions with name > `after`, in name order; for
/// a tenant (`visible_to`), only those in its tenant scope.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn definition_list(
    db: impl PgExecutor<'_>,
    after: &str,
    visible_to: Option<&str>,
    limit: i64,
) -> Result<Vec<Definition>, Error> {
    Ok(sqlx::query_as!(
        Row,
        r#"SELECT name, display_name, description, labels, handler, schedule, params, misfire_policy,
                overlap_policy, retry_policy, timeout_secs, priority, enabled, protected, tenant_scope,
                max_output_bytes, max_active_runs, create_time AS "create_time: DbTime",
                update_time AS "update_time: DbTime", version
         FROM definitions
         WHERE name > $1 AND ($3::text IS NULL OR tenant_scope IS NULL OR $3 = ANY (tenant_scope))
         ORDER BY name LIMIT $2"#,
        after,
        limit,
        visible_to
    )
    .fetch_all(db)
    .await?
    .into_iter()
    // One definition whose stored data does not decode must not hide the
    // others: it is left out of the page and logged (Get names it).
    .filter_map(|r| {
        let name = r.name.clone();
        Definition::try_from(r)
            .inspect_err(|e| {
                tracing::error!(definition = %name, error = %e,
                    "stored definition cannot be read; left out of the list");
            })
            .ok()
    })
    .collect())
}

/// Deletes the definition `name` (locked by the caller with
/// [`definition_get_for_update`]). Without `force`, only while no binding
/// uses it; with `force`, its bindings are deleted first (their runs stay as
/// history, like DeleteBinding's). Returns the deleted bindings' ids.
///
/// # Errors
/// [`Error::Refused`] when it is protected, or bound and not
/// forced (a concurrent bind then fails on the foreign key instead);
/// [`Error::NotFound`].
pub async fn definition_delete(
    db: &mut sqlx::PgConnection,
    name: &str,
    force: bool,
) -> Result<Vec<uuid::Uuid>, Error> {
    let r = sqlx::query!(
        r#"SELECT protected, (SELECT count(*) FROM bindings WHERE definition = $1) AS "bindings!"
           FROM definitions WHERE name = $1"#,
        name
    )
    .fetch_optional(&mut *db)
    .await?
    .ok_or(Error::NotFound)?;
    if r.protected {
        return Err(Error::Refused(format!(
            "definition {name:?} is protected: it can be disabled, not deleted"
        )));
    }
    if r.bindings > 0 && !force {
        return Err(Error::Refused(format!(
            "definition {name:?} still has {} binding(s); delete them first or pass force",
            r.bindings
        )));
    }
    let bindings = sqlx::query_scalar!(
        "DELETE FROM bindings WHERE definition = $1 RETURNING id",
        name
    )
    .fetch_all(&mut *db)
    .await?;
    let r = sqlx::query!(
        r#"WITH d AS (DELETE FROM definitions WHERE name = $1 RETURNING name)
           SELECT count(*) AS "n!", pg_notify($2::text, '') AS "x" FROM d"#,
        name,
        super::notify::BINDINGS,
    )
    .fetch_one(&mut *db)
    .await;
    match r {
        Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => Err(Error::Refused(
            format!("definition {name:?} was bound concurrently"),
        )),
        Err(e) => Err(e.into()),
        Ok(r) if r.n == 0 => Err(Error::NotFound),
        Ok(_) => Ok(bindings),
    }
}

/// Gets the definition `name` and locks it for this transaction.
///
/// # Errors
/// [`Error::NotFound`] when there is none.
pub async fn definition_get_for_update(
    db: impl PgExecutor<'_>,
    name: &str,
) -> Result<Definition, Error> {
    sqlx::query_as!(
        Row,
        r#"SELECT name, display_name, description, labels, handler, schedule, params, misfire_policy,
                overlap_policy, retry_policy, timeout_secs, priority, enabled, protected, tenant_scope,
                max_output_bytes, max_active_runs, create_time AS "create_time: DbTime",
                update_time AS "update_time: DbTime", version
         FROM definitions WHERE name = $1 FOR UPDATE"#,
        name
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Writes `d` over the stored definition if its version is still
/// `expected_version`; `d.version` must be the new version.
///
/// # Errors
/// [`Error::Conflict`] when the version moved on; [`Error::Sqlx`] otherwise.
pub async fn definition_update(
    db: impl PgExecutor<'_>,
    d: &Definition,
    expected_version: i64,
) -> Result<(), Error> {
    let r = sqlx::query!(
        "UPDATE definitions SET display_name = $2, description = $3, labels = $4, handler = $5, schedule = $6,
                params = $7, misfire_policy = $8, update_time = $9, version = $10, overlap_policy = $12,
                retry_policy = $13, timeout_secs = $14, priority = $15, enabled = $16, protected = $17,
                tenant_scope = $18, max_output_bytes = $19, max_active_runs = $20
         WHERE name = $1 AND version = $11",
        d.name,
        d.display_name,
        d.description,
        encode(&d.labels),
        encode(&d.handler),
        encode(&d.schedule),
        d.params,
        encode(&d.misfire_policy),
        d.update_time,
        d.version,
        expected_version,
        d.policy.overlap.as_str(),
        encode(&d.policy.retry),
        d.policy.timeout_secs.map(|t| t as i32),
        d.policy.priority,
        d.enabled,
        d.protected,
        d.tenant_scope.as_list(),
        d.max_output_bytes.and_then(|m| i64::try_from(m).ok()),
        d.max_active_runs.map(|m| m as i32),
    )
    .execute(db)
    .await?;
    if r.rows_affected() == 0 {
        Err(Error::Conflict)
    } else {
        Ok(())
    }
}

/// Tenants (up to 10) that have a binding of definition `name` but are not
/// in `allow`: a tenant scope narrowed to `allow` would strand them.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn definition_bound_outside(
    db: impl PgExecutor<'_>,
    name: &str,
    allow: &[String],
) -> Result<Vec<String>, Error> {
    Ok(sqlx::query_scalar!(
        "SELECT DISTINCT tenant_id FROM bindings
         WHERE definition = $1 AND NOT (tenant_id = ANY ($2))
         ORDER BY tenant_id LIMIT 10",
        name,
        allow
    )
    .fetch_all(db)
    .await?)
}
