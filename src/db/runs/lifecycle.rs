//! A run after its creation: [`run_finish`] with an [`Outcome`], [`run_reap`]
//! of runs whose lease expired, [`run_promote_due`] of `SCHEDULED` runs,
//! cancellation ([`run_cancel_waiting`], [`run_request_cancel`],
//! [`run_cancel_bindings`]) and the lease's [`run_heartbeat`].

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{
    NextDue, RunRow, Waiting, announce, corrupt_state, notify_runs, notify_runs_for,
    run_claim_lock, state_event,
};
use crate::db::{Error, encode};
use crate::domain::RunReason;
use crate::domain::{EventBody, OverlapPolicy, Run, RunEvent, RunState};

/// Ends every run of `bindings` that has not ended (their bindings are being
/// deleted): waiting ones (`SCHEDULED`, `QUEUED`) `CANCELLED` at once with
/// `reason`, running ones through a cancel request to their node (as
/// CancelRun), so they end `CANCELLED` with `reason` and are not retried.
/// Call in the deleting transaction: it takes [`run_claim_lock`] first, so
/// no claim starts a run of these bindings once that commits. Returns the
/// events of the runs cancelled at once (announced on commit).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_cancel_bindings(
    conn: &mut PgConnection,
    node_id: &str,
    bindings: &[Uuid],
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Vec<RunEvent>, Error> {
    if bindings.is_empty() {
        return Ok(Vec::new());
    }
    run_claim_lock(&mut *conn).await?;
    let ids = sqlx::query_scalar!(
        "SELECT id FROM runs WHERE binding_id = ANY($1) AND state IN ('SCHEDULED', 'QUEUED', 'RUNNING')",
        bindings
    )
    .fetch_all(&mut *conn)
    .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let events = run_cancel_waiting(&mut *conn, node_id, &ids, reason, now).await?;
    run_request_cancel(&mut *conn, &ids, reason).await?;
    Ok(events)
}

/// How a run ended.
#[derive(Debug, Clone)]
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
    /// Whether a failure may be retried (per the retry policy).
    pub retryable: bool,
}

impl Default for Outcome {
    fn default() -> Self {
        Self {
            result: None,
            error_message: None,
            error_summary: None,
            exit_code: None,
            reason: String::new(),
            retryable: true,
        }
    }
}

/// Moves a `RUNNING` run of `attempt` to the terminal state `to` with its
/// outcome, writes the `state_changed` event and announces it. Conditional on
/// the run still being `RUNNING` at that attempt: returns `None` (and changes
/// nothing) when it is not, so a late writer never overwrites a terminal run.
/// The end time is `now`, or the start time if that is later (a start
/// floored by [`run_claim`](super::run_claim) on a node whose clock lags). Returns the run as
/// it now is, with its event. The caller writes its retry, if any, then
/// records the end with [`run_end_record`](super::run_end_record) in the
/// same transaction.
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
) -> Result<Option<(Run, RunEvent)>, Error> {
    let body = EventBody::StateChanged {
        from: Some(RunState::Running),
        to,
        reason: outcome.reason.clone(),
    };
    let row = sqlx::query_as!(
        RunRow,
        r#"WITH f AS (
             UPDATE runs SET state = $3, end_time = GREATEST($4, start_time), result = $5, error_message = $6,
                             error_summary = $7, exit_code = $8, reason = NULLIF($9, ''),
                             lease_expires_at = NULL, last_seq = last_seq + 1
             WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'
             RETURNING *),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, f.end_time, f.tenant_id, f.binding_id, f.definition, 'state_changed', $10 FROM f
             RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress FROM f"#,
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
    let seq = r.last_seq;
    let run = Run::try_from(r)?;
    let ev = state_event(&run, seq, run.end_time.unwrap_or(now), body);
    announce(&mut *conn, node_id, [&ev]).await?;
    if run.policy.overlap != OverlapPolicy::Allow {
        // A run of this binding may have been waiting for this one to end:
        // one of its handler kind (the binding's), so only the loops that
        // claim that kind look. Named as any runs, every node's executor,
        // event loops and worker dispatch claimed after every command run.
        let mut waiting = Waiting::default();
        waiting.add(RunState::Queued, run.handler.kind());
        notify_runs_for(&mut *conn, waiting).await?;
    }
    Ok(Some((run, ev)))
}

/// Ends up to `limit` `RUNNING` runs whose lease expired before `now` (their
/// node stopped heartbeating): `FAILED` with reason
/// [`RunReason::NodeLost`] ([`RunReason::WorkerLost`] for a worker run), or
/// `CANCELLED` with the pending cancel reason when a cancel was requested.
/// `FOR UPDATE SKIP LOCKED`, so reapers on several nodes never collide.
/// Returns the ended runs with their events (announced); the caller writes
/// their retries, then records the ends with
/// [`run_end_record`](super::run_end_record) in the same transaction.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_reap(
    conn: &mut PgConnection,
    node_id: &str,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Run, RunEvent)>, Error> {
    let rows = sqlx::query_as!(
        RunRow,
        r#"WITH x AS (
             SELECT id FROM runs WHERE state = 'RUNNING' AND lease_expires_at < $1
             ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED),
           f AS (
             UPDATE runs r SET state = CASE WHEN r.cancel_reason IS NULL THEN 'FAILED' ELSE 'CANCELLED' END,
                    end_time = GREATEST($1, r.start_time),
                    reason = coalesce(r.cancel_reason,
                                      CASE WHEN r.handler->>'kind' = 'worker' THEN $4::text ELSE $3::text END),
                    error_message = CASE WHEN r.cancel_reason IS NOT NULL THEN NULL
                                         WHEN r.handler->>'kind' = 'worker'
                                         THEN 'worker ' || coalesce(r.worker_name, '?') || ' stopped renewing the run''s lease'
                                         ELSE 'node ' || coalesce(r.node_id, '?') || ' stopped renewing the run''s lease' END,
                    lease_expires_at = NULL, last_seq = r.last_seq + 1
             FROM x WHERE r.id = x.id
             RETURNING r.*),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, f.end_time, f.tenant_id, f.binding_id, f.definition, 'state_changed',
                    jsonb_build_object('kind', 'state_changed', 'from', 'RUNNING', 'to', f.state,
                                       'reason', f.reason)
             FROM f RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress FROM f"#,
        now,
        limit,
        RunReason::NodeLost.as_str(),
        RunReason::WorkerLost.as_str(),
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for r in rows {
        let seq = r.last_seq;
        let id = r.id;
        // Already ended by the statement; one that does not decode is not
        // retried (its policy cannot be read) and never stops the reaper.
        let run = match Run::try_from(r) {
            Ok(run) => run,
            Err(e) => {
                tracing::error!(run = %id, error = %e,
                    "reaped run's stored data cannot be read; ended without retry");
                unreadable.push((id, false));
                continue;
            }
        };
        let body = EventBody::StateChanged {
            from: Some(RunState::Running),
            to: run.state,
            reason: run.reason.clone().unwrap_or_default(),
        };
        let ev = state_event(&run, seq, run.end_time.unwrap_or(now), body);
        out.push((run, ev));
    }
    // Those the caller never sees are recorded here (no retry follows).
    super::run_end_record(&mut *conn, &unreadable).await?;
    if !out.is_empty() {
        announce(&mut *conn, node_id, out.iter().map(|(_, e)| e)).await?;
        notify_runs(&mut *conn).await?;
    }
    Ok(out)
}

/// Moves up to `limit` `SCHEDULED` runs whose `not_before` has come to
/// `QUEUED` (with their events, announced). `FOR UPDATE SKIP LOCKED`. A due
/// run whose binding no longer exists (a retry written by a reaper racing a
/// DeleteBinding) ends `CANCELLED` with reason `binding_deleted` instead:
/// it could never be claimed.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_promote_due(
    conn: &mut PgConnection,
    node_id: &str,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Promoted, Error> {
    let body = EventBody::StateChanged {
        from: Some(RunState::Scheduled),
        to: RunState::Queued,
        reason: String::new(),
    };
    let gone_body = EventBody::StateChanged {
        from: Some(RunState::Scheduled),
        to: RunState::Cancelled,
        reason: RunReason::BindingDeleted.to_string(),
    };
    // One transaction (a savepoint when the caller has one): the runs
    // ended here are recorded with their end.
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let rows = sqlx::query!(
        r#"WITH x AS (
             SELECT r.id, NOT EXISTS (SELECT 1 FROM bindings b WHERE b.id = r.binding_id) AS gone
             FROM runs r WHERE r.state = 'SCHEDULED' AND r.not_before <= $1
             ORDER BY r.not_before LIMIT $2 FOR UPDATE OF r SKIP LOCKED),
           f AS (
             UPDATE runs r SET state = CASE WHEN x.gone THEN 'CANCELLED' ELSE 'QUEUED' END,
                               end_time = CASE WHEN x.gone THEN $1::timestamptz END,
                               reason = CASE WHEN x.gone THEN $5 ELSE r.reason END,
                               last_seq = r.last_seq + 1
             FROM x WHERE r.id = x.id
             RETURNING r.id, r.tenant_id, r.binding_id, r.definition, r.last_seq, x.gone,
                       r.handler->>'kind' AS kind),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, $1, f.tenant_id, f.binding_id, f.definition, 'state_changed',
                    CASE WHEN f.gone THEN $4::jsonb ELSE $3::jsonb END FROM f
             RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, last_seq, gone AS "gone!",
                  coalesce(kind, '') AS "kind!" FROM f"#,
        now,
        limit,
        encode(&body),
        encode(&gone_body),
        RunReason::BindingDeleted.as_str(),
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut waiting = Waiting::default();
    for r in rows.iter().filter(|r| !r.gone) {
        waiting.add(RunState::Queued, &r.kind);
    }
    let gone: Vec<(Uuid, bool)> = rows
        .iter()
        .filter(|r| r.gone)
        .map(|r| (r.id, false))
        .collect();
    super::run_end_record(&mut tx, &gone).await?;
    let events: Vec<RunEvent> = rows
        .into_iter()
        .map(|r| RunEvent {
            run_id: r.id,
            seq: r.last_seq,
            time: now,
            tenant_id: r.tenant_id,
            binding_id: r.binding_id,
            definition: r.definition,
            body: if r.gone {
                gone_body.clone()
            } else {
                body.clone()
            },
        })
        .collect();
    // One statement for both NOTIFYs and the next due time: the caller
    // wakes this node's loops for the queued runs (`Promoted::waiting`),
    // the others hear it; the caller sleeps until `Promoted::next` (read
    // here, after this transaction's own promotions, a round trip less
    // per pass than a read of its own).
    let (channels, payloads) = super::Announce {
        waiting,
        ranges: super::ranges(&events),
    }
    .notifications(node_id, true);
    let next =
        super::read::run_next_due_time_notifying(&mut *tx, now, &channels, &payloads).await?;
    tx.commit().await?;
    Ok(Promoted {
        events,
        waiting,
        next,
    })
}

/// What [`run_promote_due`] did.
#[derive(Debug, Clone, Default)]
pub struct Promoted {
    /// The events of the runs it moved (announced).
    pub events: Vec<RunEvent>,
    /// Which kinds of runs it queued: the caller must wake this node's
    /// loops for them at once (the NOTIFY names this node, whose bridge
    /// leaves them alone; other nodes hear it).
    pub waiting: Waiting,
    /// When waiting runs next need a hand, read after the promotions
    /// ([`super::run_next_due_time`] as of then).
    pub next: NextDue,
}

/// Cancels those of `ids` that are still waiting (`SCHEDULED` or `QUEUED`):
/// `CANCELLED` at once with `reason`, events written and announced, ends
/// recorded ([`run_end_record`](super::run_end_record)). Runs in any other
/// state are left alone. The caller has checked access.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_cancel_waiting(
    conn: &mut PgConnection,
    node_id: &str,
    ids: &[Uuid],
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Vec<RunEvent>, Error> {
    let rows = sqlx::query!(
        r#"WITH x AS (
             SELECT id, state AS old FROM runs WHERE id = ANY($1) AND state IN ('SCHEDULED', 'QUEUED')
             FOR UPDATE),
           f AS (
             UPDATE runs r SET state = 'CANCELLED', end_time = $2, reason = $3, last_seq = r.last_seq + 1
             FROM x WHERE r.id = x.id
             RETURNING r.id, r.tenant_id, r.binding_id, r.definition, r.last_seq, x.old),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, $2, f.tenant_id, f.binding_id, f.definition, 'state_changed',
                    jsonb_build_object('kind', 'state_changed', 'from', f.old, 'to', 'CANCELLED', 'reason', $3::text)
             FROM f RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, last_seq, old FROM f"#,
        ids,
        now,
        reason,
    )
    .fetch_all(&mut *conn)
    .await?;
    let events: Vec<RunEvent> = rows
        .into_iter()
        .map(|r| {
            Ok(RunEvent {
                run_id: r.id,
                seq: r.last_seq,
                time: now,
                tenant_id: r.tenant_id,
                binding_id: r.binding_id,
                definition: r.definition,
                body: EventBody::StateChanged {
                    from: Some(RunState::parse(&r.old).ok_or_else(|| corrupt_state(&r.old))?),
                    to: RunState::Cancelled,
                    reason: reason.to_string(),
                },
            })
        })
        .collect::<Result<_, Error>>()?;
    let ended: Vec<(Uuid, bool)> = events.iter().map(|e| (e.run_id, false)).collect();
    super::run_end_record(&mut *conn, &ended).await?;
    announce(&mut *conn, node_id, &events).await?;
    Ok(events)
}

/// Requests the cancel of those of `ids` that are `RUNNING` (and have no
/// cancel pending): records `reason` and tells every node on
/// [`notify::CANCEL`](crate::db::notify::CANCEL) (payload: `<run id>|<reason>`). The node executing the
/// run terminates it and ends it `CANCELLED`; its heartbeat also picks the
/// request up, should the notification be lost. Returns the ids requested.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_request_cancel(
    conn: &mut PgConnection,
    ids: &[Uuid],
    reason: &str,
) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar!(
        r#"WITH f AS (
             UPDATE runs SET cancel_reason = $2
             WHERE id = ANY($1) AND state = 'RUNNING' AND cancel_reason IS NULL RETURNING id)
           SELECT id AS "id!" FROM f, pg_notify($3::text, f.id::text || '|' || $2)"#,
        ids,
        reason,
        crate::db::notify::CANCEL,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Renews the lease of those of `ids` still `RUNNING` on `node_id` until
/// `until`. Returns, per renewed run, its pending cancel reason; a run
/// missing from the answer is no longer this node's (reaped, or ended).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_heartbeat(
    db: impl PgExecutor<'_>,
    node_id: &str,
    ids: &[Uuid],
    until: DateTime<Utc>,
) -> Result<Vec<(Uuid, Option<String>)>, Error> {
    Ok(sqlx::query!(
        "UPDATE runs SET lease_expires_at = $3
         WHERE id = ANY($1) AND node_id = $2 AND state = 'RUNNING'
         RETURNING id, cancel_reason",
        ids,
        node_id,
        until,
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| (r.id, r.cancel_reason))
    .collect())
}
