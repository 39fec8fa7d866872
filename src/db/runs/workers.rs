//! Runs held by remote workers (handler kind `worker`): finding a run by its
//! lease token, renewing worker leases, and ending the worker runs nobody
//! took ([`RunReason::NoWorker`]). The claim is [`run_claim`](super::run_claim)
//! with [`ClaimKind::Worker`](super::ClaimKind::Worker); the final state is
//! written by [`run_finish`](super::run_finish), conditional on the run's id
//! and attempt still `RUNNING`, which is exactly the lease the token named
//! (a run row is claimed once; its retry is another row).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{RunRow, announce, notify_runs, state_event};
use crate::db::Error;
use crate::domain::{EventBody, Run, RunEvent, RunReason, RunState};

/// The `RUNNING` run whose lease token is `token`, if any (`None`: the lease
/// is no longer valid — ended, reaped, or never issued).
///
/// # Errors
/// [`Error::Sqlx`] on database failure; [`Error::Corrupt`] for bad JSON.
pub async fn run_by_lease(db: impl PgExecutor<'_>, token: Uuid) -> Result<Option<Run>, Error> {
    let row = sqlx::query_as!(
        RunRow,
        r#"SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
           FROM runs WHERE lease_token = $1 AND state = 'RUNNING'"#,
        token
    )
    .fetch_optional(db)
    .await?;
    row.map(Run::try_from).transpose()
}

/// One renewed worker lease ([`run_worker_heartbeat`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    /// The lease token.
    pub token: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// Its tenant.
    pub tenant_id: String,
    /// Its attempt.
    pub attempt: i32,
    /// When it started.
    pub start_time: Option<DateTime<Utc>>,
    /// Its timeout in seconds, if any.
    pub timeout_secs: Option<i32>,
    /// A pending cancel request's reason.
    pub cancel_reason: Option<String>,
}

/// Renews until `until` the leases of those `tokens` whose runs are still
/// `RUNNING` (of `tenant` only, when given); the others are not valid
/// any more. Returns the renewed ones with their pending cancel reasons.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_worker_heartbeat(
    db: impl PgExecutor<'_>,
    tokens: &[Uuid],
    tenant: Option<&str>,
    until: DateTime<Utc>,
) -> Result<Vec<Renewed>, Error> {
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query!(
        r#"UPDATE runs SET lease_expires_at = $2
           WHERE lease_token = ANY($1) AND state = 'RUNNING' AND ($3::text IS NULL OR tenant_id = $3)
           RETURNING lease_token AS "lease_token!", id, tenant_id, attempt, start_time, timeout_secs, cancel_reason"#,
        tokens,
        until,
        tenant,
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| Renewed {
        token: r.lease_token,
        run_id: r.id,
        tenant_id: r.tenant_id,
        attempt: r.attempt,
        start_time: r.start_time,
        timeout_secs: r.timeout_secs,
        cancel_reason: r.cancel_reason,
    })
    .collect())
}

/// Ends up to `limit` `QUEUED` worker runs that waited longer than their
/// schedule-to-start timeout (the handler's `schedule_to_start_secs`,
/// default [`crate::domain::DEFAULT_SCHEDULE_TO_START_SECS`], counted from
/// `not_before`): `FAILED` with reason [`RunReason::NoWorker`], events
/// written and announced. `FOR UPDATE SKIP LOCKED`. Returns them with their
/// events; the caller schedules retries.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_fail_no_worker(
    conn: &mut PgConnection,
    node_id: &str,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Run, RunEvent)>, Error> {
    let rows = sqlx::query_as!(
        RunRow,
        r#"WITH x AS (
             SELECT id FROM runs
             WHERE state = 'QUEUED' AND (handler->>'kind') = 'worker'
               AND not_before + make_interval(secs => coalesce((handler->>'schedule_to_start_secs')::int, $4))
                   < $1
             ORDER BY not_before LIMIT $2 FOR UPDATE SKIP LOCKED),
           f AS (
             UPDATE runs r SET state = 'FAILED', end_time = $1, reason = $3,
                    error_message = 'no worker took the run of queue ' || coalesce(r.handler->>'queue', '?')
                                    || ' within its schedule-to-start timeout',
                    last_seq = r.last_seq + 1
             FROM x WHERE r.id = x.id
             RETURNING r.*),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, f.end_time, f.tenant_id, f.binding_id, f.definition, 'state_changed',
                    jsonb_build_object('kind', 'state_changed', 'from', 'QUEUED', 'to', 'FAILED', 'reason', $3::text)
             FROM f RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress FROM f"#,
        now,
        limit,
        RunReason::NoWorker.as_str(),
        crate::domain::DEFAULT_SCHEDULE_TO_START_SECS as i32,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let seq = r.last_seq;
        let id = r.id;
        let run = match Run::try_from(r) {
            Ok(run) => run,
            Err(e) => {
                tracing::error!(run = %id, error = %e,
                    "run ended no_worker has unreadable stored data; not retried");
                continue;
            }
        };
        let body = EventBody::StateChanged {
            from: Some(RunState::Queued),
            to: RunState::Failed,
            reason: RunReason::NoWorker.to_string(),
        };
        let ev = state_event(&run, seq, now, body);
        out.push((run, ev));
    }
    if !out.is_empty() {
        announce(&mut *conn, node_id, out.iter().map(|(_, e)| e)).await?;
        // A binding's next run may have waited behind this one.
        notify_runs(&mut *conn).await?;
    }
    Ok(out)
}

/// The binding of run `id`, if the run exists.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_binding_of(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Uuid>, Error> {
    Ok(
        sqlx::query_scalar!("SELECT binding_id FROM runs WHERE id = $1", id)
            .fetch_optional(db)
            .await?,
    )
}
