//! Retention's SQL: the day partitions of `run_events` (created ahead,
//! detached, read for the archive, dropped — through the SQL functions of
//! migration `20261203000400_run_events_partitions`, which serialise all
//! partition DDL on one advisory lock), and the batched deletes of old runs
//! and audit events. The rules are in [`crate::domain::retention`]; the
//! leader's task that calls these is `crate::retention`.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::Error;
use crate::domain::retention::StoredEvent;

/// One day table of `run_events`: an attached partition, or a table
/// retention detached and has not dropped yet (its archive is pending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayTable {
    /// The UTC day of the run ids it holds.
    pub day: NaiveDate,
    /// Attached to `run_events` (readable through it).
    pub attached: bool,
    /// Size on disk with its indexes, bytes.
    pub bytes: i64,
}

/// Every day table, oldest first.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_event_days(db: impl PgExecutor<'_>) -> Result<Vec<DayTable>, Error> {
    Ok(sqlx::query!(
        r#"SELECT day AS "day!", attached AS "attached!", bytes AS "bytes!"
           FROM sked_run_events_days()"#
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| DayTable {
        day: r.day,
        attached: r.attached,
        bytes: r.bytes,
    })
    .collect())
}

/// Sets the transaction's lock timeout (DDL on `run_events` waits at most
/// this long for a lock, and so never keeps writers queued behind it for
/// longer).
async fn lock_timeout(conn: &mut PgConnection, t: Duration) -> Result<(), Error> {
    let ms = format!("{}ms", t.as_millis().max(1));
    sqlx::query_scalar!("SELECT set_config('lock_timeout', $1, true)", ms)
        .fetch_one(conn)
        .await?;
    Ok(())
}

/// Creates the partition of `day` unless a table of that name exists (rows
/// of that day the default partition holds move into it); returns whether
/// it created one. Waits at most `lock` for a lock.
///
/// # Errors
/// [`Error::Sqlx`] on database failure, including a lock timeout.
pub async fn run_event_partition_create(
    pool: &PgPool,
    day: NaiveDate,
    lock: Duration,
) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    lock_timeout(&mut tx, lock).await?;
    let created = sqlx::query_scalar!(
        r#"SELECT sked_run_events_create_partition($1) AS "created!""#,
        day
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(created)
}

/// Detaches the partition of `day`, moving the events of its runs that
/// keep their history at `cutoff` ([`crate::domain::retention::keeps_history`])
/// into the default partition, in one transaction that waits at most
/// `lock` for its locks. Returns the events moved, `None` when the day has
/// no attached partition.
///
/// # Errors
/// [`Error::Sqlx`] on database failure, including a lock timeout (nothing
/// changed; try again later).
pub async fn run_event_partition_detach(
    pool: &PgPool,
    day: NaiveDate,
    cutoff: DateTime<Utc>,
    lock: Duration,
) -> Result<Option<i64>, Error> {
    let mut tx = pool.begin().await?;
    lock_timeout(&mut tx, lock).await?;
    let moved = sqlx::query_scalar!("SELECT sked_run_events_detach($1, $2)", day, cutoff)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved)
}

/// The events of up to `limit` rows of the detached day table of `day`
/// after `after` (run id, seq), in (run id, seq) order: one per event, a
/// batch row ([`super::events::BATCH_KIND`]) given as the events it holds.
/// The last event's (run id, seq) is the last row's, so it pages on.
///
/// # Errors
/// [`Error::Sqlx`] on database failure (also when no such table exists).
/// A batch row that does not decode is given as stored.
pub async fn run_event_detached_page(
    db: impl PgExecutor<'_>,
    day: NaiveDate,
    after: (Uuid, i64),
    limit: i32,
) -> Result<Vec<StoredEvent>, Error> {
    let rows = sqlx::query_as!(
        StoredEvent,
        r#"SELECT tenant_id AS "tenant_id!", run_id AS "run_id!", seq AS "seq!", time AS "time!",
                  binding_id AS "binding_id!", definition AS "definition!", kind AS "kind!",
                  payload AS "payload!"
           FROM sked_run_events_detached_page($1, $2, $3, $4)"#,
        day,
        after.0,
        after.1,
        limit,
    )
    .fetch_all(db)
    .await?;
    Ok(unbatch_stored(rows))
}

/// `rows` as events, one per event: a batch row
/// ([`super::events::BATCH_KIND`]) as the events it holds, in seq order.
/// A batch row that does not decode is kept as stored, so an archive
/// loses nothing and its day can still be dropped.
fn unbatch_stored(rows: Vec<StoredEvent>) -> Vec<StoredEvent> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        if row.kind != super::events::BATCH_KIND {
            events.push(row);
            continue;
        }
        let Ok(held) = super::events::unbatch(row.seq, row.kind.clone(), row.payload.clone())
        else {
            events.push(row);
            continue;
        };
        for (seq, kind, payload) in held {
            events.push(StoredEvent {
                tenant_id: row.tenant_id.clone(),
                run_id: row.run_id,
                seq,
                time: row.time,
                binding_id: row.binding_id,
                definition: row.definition.clone(),
                kind,
                payload,
            });
        }
    }
    events
}

/// Drops the detached day table of `day`; `false` when there is none.
/// Touches no lock of `run_events` itself.
///
/// # Errors
/// [`Error::Sqlx`] on database failure, or when the day is still attached.
pub async fn run_event_detached_drop(
    pool: &PgPool,
    day: NaiveDate,
    lock: Duration,
) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    lock_timeout(&mut tx, lock).await?;
    let dropped = sqlx::query_scalar!(
        r#"SELECT sked_run_events_drop_detached($1) AS "dropped!""#,
        day
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(dropped)
}

/// One batch of [`run_delete_old`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunDeleteBatch {
    /// The highest run id the batch looked at (`None`: none left in the
    /// range); the next batch starts after it.
    pub last_scanned: Option<Uuid>,
    /// The runs it deleted.
    pub deleted: Vec<Uuid>,
}

/// Looks at up to `limit` runs with `after < id < before`, in id order, and
/// deletes those that ended (or, without an end time, were created) before
/// `cutoff` in a final state; runs that keep their history are left. One
/// statement, using the primary key.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_delete_old(
    conn: &mut PgConnection,
    after: Uuid,
    before: Uuid,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<RunDeleteBatch, Error> {
    let r = sqlx::query!(
        r#"WITH c AS (
               SELECT id, state IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')
                          AND COALESCE(end_time, create_time) < $3 AS old
               FROM runs WHERE id > $1 AND id < $2 ORDER BY id LIMIT $4),
           d AS (DELETE FROM runs r USING c WHERE r.id = c.id AND c.old RETURNING r.id)
           SELECT (SELECT id FROM c ORDER BY id DESC LIMIT 1) AS last,
                  ARRAY(SELECT id FROM d) AS "deleted!""#,
        after,
        before,
        cutoff,
        limit,
    )
    .fetch_one(conn)
    .await?;
    Ok(RunDeleteBatch {
        last_scanned: r.last,
        deleted: r.deleted,
    })
}

/// Deletes the events of `runs` that the default partition holds (events
/// of runs whose day was dropped while they kept their history, or with
/// ids outside every day), returning them when `returning` (to archive
/// them; a batch row as the events it holds), else only their number.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_event_default_delete(
    conn: &mut PgConnection,
    runs: &[Uuid],
    returning: bool,
) -> Result<(u64, Vec<StoredEvent>), Error> {
    if runs.is_empty() {
        return Ok((0, Vec::new()));
    }
    if !returning {
        // Events, not rows: a batch row counts the events it holds.
        let n = sqlx::query_scalar!(
            r#"WITH d AS (DELETE FROM run_events_default WHERE run_id = ANY($1) RETURNING kind, payload)
               SELECT COALESCE(sum(CASE WHEN kind = 'batch' AND jsonb_typeof(payload) = 'array'
                                        THEN jsonb_array_length(payload) ELSE 1 END), 0)::bigint AS "n!"
               FROM d"#,
            runs
        )
        .fetch_one(conn)
        .await?;
        return Ok((n as u64, Vec::new()));
    }
    let events = unbatch_stored(
        sqlx::query_as!(
            StoredEvent,
            "DELETE FROM run_events_default WHERE run_id = ANY($1)
             RETURNING tenant_id, run_id, seq, time, binding_id, definition, kind, payload",
            runs
        )
        .fetch_all(conn)
        .await?,
    );
    Ok((events.len() as u64, events))
}

/// Deletes up to `limit` audit events with an id below `before` (UUIDv7:
/// made before that time), oldest first; returns how many.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn audit_delete_old(
    db: impl PgExecutor<'_>,
    before: Uuid,
    limit: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query!(
        "DELETE FROM audit_events
         WHERE id IN (SELECT id FROM audit_events WHERE id < $1 ORDER BY id LIMIT $2)",
        before,
        limit,
    )
    .execute(db)
    .await?
    .rows_affected())
}
