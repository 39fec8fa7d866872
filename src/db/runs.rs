//! `runs`: one attempt of one execution. Creation, claim and finish each
//! write the run row, its `state_changed` event and the NOTIFYs in one
//! transaction, so an event is persisted before anyone can see it.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Error, decode, encode, events::notify_events};
use crate::domain::{EventBody, Handler, Run, RunEvent, RunState, RunTrigger};

/// A run to create, `QUEUED` (to execute) or `SKIPPED` (a fire that
/// deliberately does not run, with a reason).
#[derive(Debug, Clone)]
pub struct NewRun {
    /// UUIDv7.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// Producing binding.
    pub binding_id: Uuid,
    /// Definition name.
    pub definition: String,
    /// What created it.
    pub trigger: RunTrigger,
    /// Fire time (manual: trigger time).
    pub scheduled_time: DateTime<Utc>,
    /// Claimed no earlier than this (fire time + jitter).
    pub not_before: DateTime<Utc>,
    /// Handler snapshot.
    pub handler: Handler,
    /// Params snapshot.
    pub params: serde_json::Value,
    /// `Queued` or `Skipped`.
    pub state: RunState,
    /// Why it is skipped (empty for queued runs).
    pub reason: String,
}

/// Inserts `runs` with their first event (seq 1, `→ QUEUED` or `→ SKIPPED`
/// with the reason), announces them to executors and subscribers, and
/// returns the events of the runs actually inserted. A schedule fire whose
/// `(binding_id, scheduled_time)` already has a run is left alone: that
/// unique index is what makes firing exactly-once across nodes.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_insert(
    conn: &mut PgConnection,
    node_id: &str,
    runs: &[NewRun],
    now: DateTime<Utc>,
) -> Result<Vec<RunEvent>, Error> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let bodies: Vec<EventBody> = runs
        .iter()
        .map(|r| EventBody::StateChanged {
            from: None,
            to: r.state,
            reason: r.reason.clone(),
        })
        .collect();
    let payloads: Vec<serde_json::Value> = bodies.iter().map(encode).collect();
    let states: Vec<&str> = runs.iter().map(|r| r.state.as_str()).collect();
    let reasons: Vec<&str> = runs.iter().map(|r| r.reason.as_str()).collect();
    let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
    let tenants: Vec<String> = runs.iter().map(|r| r.tenant_id.clone()).collect();
    let bindings: Vec<Uuid> = runs.iter().map(|r| r.binding_id).collect();
    let defs: Vec<String> = runs.iter().map(|r| r.definition.clone()).collect();
    let triggers: Vec<String> = runs
        .iter()
        .map(|r| r.trigger.as_str().to_string())
        .collect();
    let times: Vec<DateTime<Utc>> = runs.iter().map(|r| r.scheduled_time).collect();
    let not_before: Vec<DateTime<Utc>> = runs.iter().map(|r| r.not_before).collect();
    let handlers: Vec<serde_json::Value> = runs.iter().map(|r| encode(&r.handler)).collect();
    let params: Vec<serde_json::Value> = runs.iter().map(|r| r.params.clone()).collect();
    let rows = sqlx::query!(
        r#"WITH u AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[],
                                  $7::jsonb[], $8::jsonb[], $10::text[], $11::text[], $12::jsonb[],
                                  $13::timestamptz[])
                  AS u(id, tenant_id, binding_id, definition, trigger, scheduled_time, handler, params,
                       state, reason, payload, not_before)),
           r AS (
             INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time,
                               not_before, create_time, end_time, handler, params, reason, last_seq)
             SELECT u.id, u.tenant_id, u.binding_id, u.definition, u.trigger, u.state, u.scheduled_time,
                    u.not_before,
                    $9, CASE WHEN u.state = 'SKIPPED' THEN $9::timestamptz END, u.handler, u.params,
                    NULLIF(u.reason, ''), 1
             FROM u
             ON CONFLICT (binding_id, scheduled_time) WHERE trigger = 'SCHEDULE' DO NOTHING
             RETURNING id, tenant_id, binding_id, definition),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT r.id, 1, $9, r.tenant_id, r.binding_id, r.definition, 'state_changed', u.payload
             FROM r JOIN u ON u.id = r.id
             RETURNING run_id)
           SELECT r.id, r.tenant_id, r.binding_id, r.definition, u.payload FROM r JOIN u ON u.id = r.id"#,
        &ids,
        &tenants,
        &bindings,
        &defs,
        &triggers,
        &times,
        &handlers,
        &params,
        now,
        &states as &[&str],
        &reasons as &[&str],
        &payloads,
        &not_before,
    )
    .fetch_all(&mut *conn)
    .await?;
    let events: Vec<RunEvent> = rows
        .into_iter()
        .map(|r| {
            Ok(RunEvent {
                run_id: r.id,
                seq: 1,
                time: now,
                tenant_id: r.tenant_id,
                binding_id: r.binding_id,
                definition: r.definition,
                body: decode("run event payload", r.payload.unwrap_or_default())?,
            })
        })
        .collect::<Result<_, Error>>()?;
    let queued = events.iter().any(|e| {
        matches!(
            e.body,
            EventBody::StateChanged {
                to: RunState::Queued,
                ..
            }
        )
    });
    if queued {
        sqlx::query!("SELECT pg_notify('sked_runs', '')")
            .execute(&mut *conn)
            .await?;
    }
    if !events.is_empty() {
        notify_events(&mut *conn, node_id, events.iter().map(|e| (e.run_id, 1, 1))).await?;
    }
    Ok(events)
}

/// Claims up to `limit` due `QUEUED` runs (`not_before <= now`) for
/// `node_id` (oldest first, `FOR UPDATE SKIP LOCKED` so nodes never claim the same run), sets
/// them `RUNNING` with a lease until `now + lease`, writes their `→ RUNNING`
/// events and announces them. Returns each claimed run with that event.
///
/// # Errors
/// [`Error::Sqlx`] on database failure; [`Error::Corrupt`] for bad JSON.
pub async fn run_claim(
    conn: &mut PgConnection,
    node_id: &str,
    now: DateTime<Utc>,
    lease: chrono::Duration,
    limit: i64,
) -> Result<Vec<(Run, RunEvent)>, Error> {
    let body = EventBody::StateChanged {
        from: Some(RunState::Queued),
        to: RunState::Running,
        reason: String::new(),
    };
    let rows = sqlx::query_as!(
        RunRow,
        r#"WITH c AS (
             UPDATE runs SET state = 'RUNNING', start_time = $1, node_id = $2, lease_expires_at = $3,
                             last_seq = last_seq + 1
             WHERE id IN (SELECT id FROM runs WHERE state = 'QUEUED' AND not_before <= $1
                          ORDER BY not_before LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING *),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT c.id, c.last_seq, $1, c.tenant_id, c.binding_id, c.definition, 'state_changed', $5 FROM c
             RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq
           FROM c"#,
        now,
        node_id,
        now + lease,
        limit,
        encode(&body),
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let seq = r.last_seq;
        let run = Run::try_from(r)?;
        let ev = RunEvent {
            run_id: run.id,
            seq,
            time: now,
            tenant_id: run.tenant_id.clone(),
            binding_id: run.binding_id,
            definition: run.definition.clone(),
            body: body.clone(),
        };
        out.push((run, ev));
    }
    if !out.is_empty() {
        notify_events(
            &mut *conn,
            node_id,
            out.iter().map(|(_, e)| (e.run_id, e.seq, e.seq)),
        )
        .await?;
    }
    Ok(out)
}

/// How a run ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Result object (command's last stdout JSON line).
    pub result: Option<serde_json::Value>,
    /// Failure message.
    pub error_message: Option<String>,
    /// First 500 chars of stderr.
    pub error_summary: Option<String>,
    /// Process exit code.
    pub exit_code: Option<i32>,
    /// Reason, also carried by the state_changed event.
    pub reason: String,
}

/// Moves a `RUNNING` run of `attempt` to the terminal state `to` with its
/// outcome, writes the `state_changed` event and announces it. Conditional on
/// the run still being `RUNNING` at that attempt: returns `None` (and changes
/// nothing) when it is not, so a late writer never overwrites a terminal run.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_finish(
    conn: &mut PgConnection,
    node_id: &str,
    id: Uuid,
    attempt: i32,
    to: RunState,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> Result<Option<RunEvent>, Error> {
    let body = EventBody::StateChanged {
        from: Some(RunState::Running),
        to,
        reason: outcome.reason.clone(),
    };
    let row = sqlx::query!(
        r#"WITH f AS (
             UPDATE runs SET state = $3, end_time = $4, result = $5, error_message = $6,
                             error_summary = $7, exit_code = $8, reason = NULLIF($9, ''),
                             lease_expires_at = NULL, last_seq = last_seq + 1
             WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
             RETURNING id, tenant_id, binding_id, definition, last_seq),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, $4, f.tenant_id, f.binding_id, f.definition, 'state_changed', $10 FROM f
             RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, last_seq FROM f"#,
        id,
        attempt,
        to.as_str(),
        now,
        outcome.result,
        outcome.error_message,
        outcome.error_summary,
        outcome.exit_code,
        outcome.reason,
        encode(&body),
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    notify_events(&mut *conn, node_id, [(r.id, r.last_seq, r.last_seq)]).await?;
    Ok(Some(RunEvent {
        run_id: r.id,
        seq: r.last_seq,
        time: now,
        tenant_id: r.tenant_id,
        binding_id: r.binding_id,
        definition: r.definition,
        body,
    }))
}

struct RunRow {
    id: Uuid,
    tenant_id: String,
    binding_id: Uuid,
    definition: String,
    trigger: String,
    state: String,
    attempt: i32,
    scheduled_time: DateTime<Utc>,
    create_time: DateTime<Utc>,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    handler: serde_json::Value,
    params: serde_json::Value,
    result: Option<serde_json::Value>,
    error_message: Option<String>,
    error_summary: Option<String>,
    exit_code: Option<i32>,
    node_id: Option<String>,
    reason: Option<String>,
    last_seq: i64,
}

impl TryFrom<RunRow> for Run {
    type Error = Error;
    fn try_from(r: RunRow) -> Result<Self, Error> {
        let bad = |what: &'static str, v: &str| Error::Corrupt {
            what,
            source: <serde_json::Error as serde::de::Error>::custom(format!("unknown value {v:?}")),
        };
        Ok(Run {
            id: r.id,
            tenant_id: r.tenant_id,
            binding_id: r.binding_id,
            definition: r.definition,
            trigger: RunTrigger::parse(&r.trigger).ok_or_else(|| bad("run trigger", &r.trigger))?,
            state: RunState::parse(&r.state).ok_or_else(|| bad("run state", &r.state))?,
            attempt: r.attempt,
            scheduled_time: r.scheduled_time,
            create_time: r.create_time,
            start_time: r.start_time,
            end_time: r.end_time,
            handler: decode("run handler", r.handler)?,
            params: r.params,
            result: r.result,
            error_message: r.error_message,
            error_summary: r.error_summary,
            exit_code: r.exit_code,
            node_id: r.node_id,
            reason: r.reason,
        })
    }
}

/// Gets the tenant's run `id`.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such run.
pub async fn run_get(db: impl PgExecutor<'_>, tenant_id: &str, id: Uuid) -> Result<Run, Error> {
    sqlx::query_as!(
        RunRow,
        "SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                create_time, start_time, end_time, handler, params, result, error_message,
                error_summary, exit_code, node_id, reason, last_seq
         FROM runs WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        id
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Lists up to `limit` of the tenant's runs with id < `before` (newest
/// first), optionally filtered by binding and state.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_list(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    before: Uuid,
    binding_id: Option<Uuid>,
    state: Option<RunState>,
    limit: i64,
) -> Result<Vec<Run>, Error> {
    sqlx::query_as!(
        RunRow,
        "SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                create_time, start_time, end_time, handler, params, result, error_message,
                error_summary, exit_code, node_id, reason, last_seq
         FROM runs
         WHERE tenant_id = $1 AND id < $2 AND ($3::uuid IS NULL OR binding_id = $3)
           AND ($4::text IS NULL OR state = $4)
         ORDER BY id DESC LIMIT $5",
        tenant_id,
        before,
        binding_id,
        state.map(|s| s.as_str()),
        limit
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Run::try_from)
    .collect()
}

/// The run's current state and highest event seq (any tenant; for stream
/// bookkeeping after the caller's access was checked).
///
/// # Errors
/// [`Error::NotFound`] when there is no such run.
pub async fn run_progress(db: impl PgExecutor<'_>, id: Uuid) -> Result<(RunState, i64), Error> {
    let r = sqlx::query!("SELECT state, last_seq FROM runs WHERE id = $1", id)
        .fetch_one(db)
        .await?;
    let state = RunState::parse(&r.state).ok_or_else(|| Error::Corrupt {
        what: "run state",
        source: <serde_json::Error as serde::de::Error>::custom(r.state.clone()),
    })?;
    Ok((state, r.last_seq))
}
