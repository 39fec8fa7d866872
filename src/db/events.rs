//! `run_events`: the persisted log of every run. Seqs are allocated from
//! `runs.last_seq` in the statement that inserts the events, so they are
//! dense per run; NOTIFY on [`super::notify::EVENTS`] tells other nodes which
//! seq range to read.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Error, decode, encode, notify_payloads};
use crate::domain::{EventBody, Progress, RunEvent};

/// Announces new events `(run_id, from_seq, to_seq)` written by `node_id`, on
/// [`super::notify::EVENTS`] (delivered when the transaction commits).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notify_events(
    conn: &mut PgConnection,
    node_id: &str,
    ranges: impl IntoIterator<Item = (Uuid, i64, i64)>,
) -> Result<(), Error> {
    let payloads = event_payloads(node_id, ranges);
    sqlx::query!(
        "SELECT pg_notify($2::text, p) FROM UNNEST($1::text[]) AS p",
        &payloads,
        super::notify::EVENTS,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The [`super::notify::EVENTS`] payloads announcing `ranges` (`run_id,
/// from_seq, to_seq`) written by `node_id`: `<node>|<run>:<from>:<to>,...`,
/// split to fit PostgreSQL's payload limit.
pub(crate) fn event_payloads(
    node_id: &str,
    ranges: impl IntoIterator<Item = (Uuid, i64, i64)>,
) -> Vec<String> {
    notify_payloads(
        &format!("{node_id}|"),
        ranges
            .into_iter()
            .map(|(id, from, to)| format!("{id}:{from}:{to}")),
    )
}

/// Appends `bodies` to the run's log at `now`, allocating the next seqs, and
/// announces them. When `bodies` hold progress events, the last of them
/// becomes the run's `progress` in the same statement (a batch of log lines
/// costs nothing more). Returns the persisted events in seq order.
///
/// # Errors
/// [`Error::NotFound`] when the run does not exist; [`Error::Sqlx`] otherwise.
pub async fn event_append(
    conn: &mut PgConnection,
    node_id: &str,
    run_id: Uuid,
    bodies: &[EventBody],
    now: DateTime<Utc>,
) -> Result<Vec<RunEvent>, Error> {
    if bodies.is_empty() {
        return Ok(Vec::new());
    }
    let kinds: Vec<&str> = bodies.iter().map(EventBody::kind).collect();
    let payloads: Vec<serde_json::Value> = bodies.iter().map(encode).collect();
    let n = bodies.len() as i64;
    let latest = bodies.iter().rev().find_map(|b| match b {
        EventBody::Progress(p) => Some(encode(p)),
        _ => None,
    });
    let r = sqlx::query!(
        r#"WITH s AS (
             UPDATE runs SET last_seq = last_seq + $2, progress = COALESCE($6::jsonb, progress)
             WHERE id = $1
             RETURNING last_seq - $2 AS base, tenant_id, binding_id, definition),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT $1, s.base + u.ord, $3, s.tenant_id, s.binding_id, s.definition, u.kind, u.payload
             FROM s, UNNEST($4::text[], $5::jsonb[]) WITH ORDINALITY AS u(kind, payload, ord)
             RETURNING seq)
           SELECT base AS "base!", tenant_id, binding_id, definition FROM s"#,
        run_id,
        n,
        now,
        &kinds as &[&str],
        &payloads,
        latest,
    )
    .fetch_one(&mut *conn)
    .await?;
    notify_events(&mut *conn, node_id, [(run_id, r.base + 1, r.base + n)]).await?;
    Ok(bodies
        .iter()
        .enumerate()
        .map(|(i, b)| RunEvent {
            run_id,
            seq: r.base + 1 + i as i64,
            time: now,
            tenant_id: r.tenant_id.clone(),
            binding_id: r.binding_id,
            definition: r.definition.clone(),
            body: b.clone(),
        })
        .collect())
}

/// Records progress reported by a run (e.g. a worker's ReportProgress) while
/// it is `RUNNING` at `attempt`: one `progress` event at the next seq and the
/// run's `progress` set to `progress`, in one statement, announced on commit
/// like any event. The caller validates `progress` first
/// ([`Progress::validate`]) and checks anything else that fences the report
/// (e.g. a lease token) in the same transaction. Publish the returned event
/// on the bus after the commit.
///
/// Returns `None`, and changes nothing, when the run is not `RUNNING` at
/// `attempt` (it ended, was retried, or does not exist): a late report never
/// touches a run it no longer holds.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn progress_append(
    conn: &mut PgConnection,
    node_id: &str,
    run_id: Uuid,
    attempt: i32,
    progress: &Progress,
    now: DateTime<Utc>,
) -> Result<Option<RunEvent>, Error> {
    let body = EventBody::Progress(progress.clone());
    let payload = encode(&body);
    let Some(r) = sqlx::query!(
        r#"WITH s AS (
             UPDATE runs SET last_seq = last_seq + 1, progress = $3
             WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
             RETURNING last_seq, tenant_id, binding_id, definition),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT $1, s.last_seq, $4, s.tenant_id, s.binding_id, s.definition, 'progress', $5 FROM s
             RETURNING seq)
           SELECT last_seq AS "seq!", tenant_id, binding_id, definition FROM s"#,
        run_id,
        attempt,
        encode(progress),
        now,
        payload,
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    notify_events(&mut *conn, node_id, [(run_id, r.seq, r.seq)]).await?;
    Ok(Some(RunEvent {
        run_id,
        seq: r.seq,
        time: now,
        tenant_id: r.tenant_id,
        binding_id: r.binding_id,
        definition: r.definition,
        body,
    }))
}

struct Row {
    run_id: Uuid,
    seq: i64,
    time: DateTime<Utc>,
    tenant_id: String,
    binding_id: Uuid,
    definition: String,
    payload: serde_json::Value,
}

impl TryFrom<Row> for RunEvent {
    type Error = Error;
    fn try_from(r: Row) -> Result<Self, Error> {
        Ok(RunEvent {
            run_id: r.run_id,
            seq: r.seq,
            time: r.time,
            tenant_id: r.tenant_id,
            binding_id: r.binding_id,
            definition: r.definition,
            body: decode("run event payload", r.payload)?,
        })
    }
}

/// Up to `limit` events of the tenant's run with seq > `after_seq`, in seq
/// order. (Existence of the run is the caller's check.)
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn event_list(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    run_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<RunEvent>, Error> {
    sqlx::query_as!(
        Row,
        "SELECT run_id, seq, time, tenant_id, binding_id, definition, payload
         FROM run_events WHERE tenant_id = $1 AND run_id = $2 AND seq > $3
         ORDER BY seq LIMIT $4",
        tenant_id,
        run_id,
        after_seq,
        limit
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(RunEvent::try_from)
    .collect()
}

/// The events in the announced ranges `(run_id, from_seq, to_seq)`, ordered by
/// run then seq (the cross-node bridge reads these after a NOTIFY).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn event_fetch_ranges(
    db: impl PgExecutor<'_>,
    ranges: &[(Uuid, i64, i64)],
) -> Result<Vec<RunEvent>, Error> {
    let ids: Vec<Uuid> = ranges.iter().map(|r| r.0).collect();
    let from: Vec<i64> = ranges.iter().map(|r| r.1).collect();
    let to: Vec<i64> = ranges.iter().map(|r| r.2).collect();
    sqlx::query_as!(
        Row,
        "SELECT e.run_id, e.seq, e.time, e.tenant_id, e.binding_id, e.definition, e.payload
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS r(run_id, from_seq, to_seq, ord)
         JOIN run_events e ON e.run_id = r.run_id AND e.seq BETWEEN r.from_seq AND r.to_seq
         ORDER BY r.ord, e.seq",
        &ids,
        &from,
        &to
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(RunEvent::try_from)
    .collect()
}
