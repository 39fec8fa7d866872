//! `definitions`: task definitions.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::{Error, decode, encode, policy_from_cols};
use crate::domain::Definition;

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
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
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
            create_time: r.create_time,
            update_time: r.update_time,
            version: r.version,
        })
    }
}

/// Inserts `d` (its times and version are taken as given).
///
/// # Errors
/// [`Error::AlreadyExists`] when the name is taken.
pub async fn definition_insert(db: impl PgExecutor<'_>, d: &Definition) -> Result<(), Error> {
    sqlx::query!(
        "INSERT INTO definitions (name, display_name, description, labels, handler, schedule, params,
                                  create_time, update_time, version, misfire_policy, overlap_policy,
                                  retry_policy, timeout_secs, priority, enabled)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
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
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Gets the definition `name`.
///
/// # Errors
/// [`Error::NotFound`] when there is none.
pub async fn definition_get(db: impl PgExecutor<'_>, name: &str) -> Result<Definition, Error> {
    sqlx::query_as!(
        Row,
        "SELECT name, display_name, description, labels, handler, schedule, params, misfire_policy,
                overlap_policy, retry_policy, timeout_secs, priority, enabled, create_time, update_time, version
         FROM definitions WHERE name = $1",
        name
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Lists up to `limit` definitions with name > `after`, in name order.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn definition_list(
    db: impl PgExecutor<'_>,
    after: &str,
    limit: i64,
) -> Result<Vec<Definition>, Error> {
    sqlx::query_as!(
        Row,
        "SELECT name, display_name, description, labels, handler, schedule, params, misfire_policy,
                overlap_policy, retry_policy, timeout_secs, priority, enabled, create_time, update_time, version
         FROM definitions WHERE name > $1 ORDER BY name LIMIT $2",
        after,
        limit
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Definition::try_from)
    .collect()
}

/// Deletes the definition `name` unless a binding still uses it (checked in
/// the same statement, so a concurrent bind fails on the foreign key instead).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::FailedPrecondition`] with the binding count.
pub async fn definition_delete(db: impl PgExecutor<'_>, name: &str) -> Result<(), Error> {
    let r = sqlx::query!(
        r#"WITH b AS (SELECT count(*) AS n FROM bindings WHERE definition = $1),
                d AS (DELETE FROM definitions WHERE name = $1 AND (SELECT n FROM b) = 0 RETURNING name)
           SELECT (SELECT n FROM b) AS "bindings!", (SELECT count(*) FROM d) AS "deleted!",
                  EXISTS (SELECT 1 FROM definitions WHERE name = $1) AS "exists!""#,
        name
    )
    .fetch_one(db)
    .await;
    let r = match r {
        Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => {
            return Err(Error::FailedPrecondition(
                "definition is still bound".into(),
            ));
        }
        r => r?,
    };
    if r.deleted > 0 {
        Ok(())
    } else if r.exists {
        Err(Error::FailedPrecondition(format!(
            "definition {name:?} still has {} binding(s); delete them first",
            r.bindings
        )))
    } else {
        Err(Error::NotFound)
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
        "SELECT name, display_name, description, labels, handler, schedule, params, misfire_policy,
                overlap_policy, retry_policy, timeout_secs, priority, enabled, create_time, update_time, version
         FROM definitions WHERE name = $1 FOR UPDATE",
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
                retry_policy = $13, timeout_secs = $14, priority = $15, enabled = $16
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
    )
    .execute(db)
    .await?;
    if r.rows_affected() == 0 {
        Err(Error::Conflict)
    } else {
        Ok(())
    }
}
