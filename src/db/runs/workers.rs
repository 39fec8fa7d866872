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

use super::{RunRow, Waiting, announce, notify_runs, state_event};
use crate::db::{Error, encode};
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
           FROM runs WHERE lease_token = $1 AND end_time IS NULL AND state IS NOT DISTINCT FROM 'RUNNING'"#,
        token
    )
    .fetch_optional(db)
    .await?;
    row.map(Run::try_from).transpose()
}

/// One worker run ended by [`run_complete_by_leases`].
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// The lease token the worker named.
    pub token: Uuid,
    /// The run's `RUNNING → SUCCEEDED` event.
    pub event: RunEvent,
    /// When the run started (its duration ends at the event's time).
    pub start_time: Option<DateTime<Utc>>,
}

/// Ends `SUCCEEDED`, with their results, the `RUNNING` worker runs whose
/// lease tokens are `tokens` (of `tenant` only, when given; `results[i]` is
/// the JSON text of `tokens[i]`'s result, `None` for none): one statement
/// for the whole batch, rows locked in id order. Writes their
/// `state_changed` events. Returns with them their announcement, for the
/// caller to hand to the node's [`crate::db::notify::Announcer`] once the
/// transaction committed: the events' NOTIFYs and, when one of the runs
/// had an overlap policy other than `ALLOW` or a tenant with a
/// `max_concurrent_runs` quota (a run of its binding or of its tenant may
/// have waited), the worker dispatches' wake-up. A token missing from the answer named no `RUNNING`
/// worker run (of that tenant): its lease is no longer valid and nothing of
/// it changed. The end time is `now`, or the start time if later.
///
/// A `SUCCEEDED` run gets no retry, so no binding lock is needed. Call it
/// in a transaction begun by [`crate::db::begin_generic`] (or after
/// [`crate::db::generic_plans`]).
///
/// # Errors
/// [`Error::Sqlx`] on database failure (nothing changed, the caller rolls
/// back).
pub async fn run_complete_by_leases(
    conn: &mut PgConnection,
    tokens: &[Uuid],
    results: &[Option<String>],
    tenant: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(Vec<Completed>, super::Announce), Error> {
    if tokens.is_empty() {
        return Ok((Vec::new(), super::Announce::default()));
    }
    // Planned generically by the caller's transaction
    // ([`crate::db::begin_generic`]): a few completions at a time would
    // otherwise be planned on most calls. The tokens are also tested as an array (`lease_token = ANY`), so that
    // each is one probe of `runs_lease_token`: joined only to the UNNEST,
    // the generic plan read every RUNNING run and compared it with every
    // token (measured at 400 running: 2.5 of a 35-run batch's 7.5 ms, and
    // growing with the runs the workers hold). `end_time IS NULL` is that
    // index's predicate, and the state is tested so that no other partial
    // index's predicate is implied (migration 20261211000200): with
    // statistics taken while nothing ran, `runs_running_tenant` looked as
    // cheap and was read whole instead.
    let body = EventBody::StateChanged {
        from: Some(RunState::Running),
        to: RunState::Succeeded,
        reason: String::new(),
    };
    let rows = sqlx::query!(
        r#"WITH l AS (
             SELECT r.id, i.result FROM runs r
             JOIN UNNEST($1::uuid[], $2::text[]) AS i(token, result) ON r.lease_token = i.token
             WHERE r.lease_token = ANY($1::uuid[]) AND r.end_time IS NULL
               AND r.state IS NOT DISTINCT FROM 'RUNNING' AND (r.handler->>'kind') = 'worker'
               AND ($3::text IS NULL OR r.tenant_id = $3)
             ORDER BY r.id FOR UPDATE OF r),
           f AS (
             UPDATE runs r SET state = 'SUCCEEDED', end_time = GREATEST($4, r.start_time),
                               result = l.result::jsonb, error_message = NULL, error_summary = NULL,
                               exit_code = NULL, reason = NULL, lease_expires_at = NULL,
                               last_seq = r.last_seq + 1
             FROM l WHERE r.id = l.id
             RETURNING r.id, r.lease_token, r.tenant_id, r.binding_id, r.definition, r.last_seq,
                       r.end_time, r.overlap_policy, r.state, r.scheduled_time, r.start_time),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, f.end_time, f.tenant_id, f.binding_id, f.definition, 'state_changed', $5
             FROM f RETURNING run_id),
           ended AS (
             SELECT f.id, f.tenant_id, f.binding_id, f.definition, f.state, f.scheduled_time, f.start_time,
                    f.end_time, false AS final_failure
             FROM f),
           -- run-end bookkeeping {
           -- The same text in every statement that ends runs (a test
           -- compares them); `ended` holds the runs this statement ended,
           -- with `final_failure` (FAILED or TIMED_OUT and not retried).
           -- The binding's status (binding_status): its last ended run,
           -- SKIPPED ones aside; its latest success and final failure; its
           -- final failures since the last success (a success among these
           -- runs restarts the count from the failures that ended after it).
           -- One sort (window w) gives each binding's latest run (rn 1)
           -- and its latest success; aggregates without ORDER BY then
           -- (an ordered aggregate sorts every group on its own).
           ended_w AS (
             SELECT e.*, max(e.end_time) FILTER (WHERE e.state = 'SUCCEEDED') OVER w AS ok_time,
                    row_number() OVER w AS rn
             FROM ended e WHERE e.state <> 'SKIPPED'
             WINDOW w AS (PARTITION BY e.binding_id ORDER BY e.end_time DESC, e.id DESC
                          ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)),
           status_up AS (
             INSERT INTO binding_status AS s (binding_id, last_run_id, last_run_state, last_run_scheduled_time,
                                              last_run_end_time, last_success_time, last_failure_time,
                                              consecutive_failures)
             SELECT w.binding_id, (array_agg(w.id) FILTER (WHERE w.rn = 1))[1],
                    (array_agg(w.state) FILTER (WHERE w.rn = 1))[1],
                    (array_agg(w.scheduled_time) FILTER (WHERE w.rn = 1))[1],
                    max(w.end_time), max(w.ok_time), max(w.end_time) FILTER (WHERE w.final_failure),
                    count(*) FILTER (WHERE w.final_failure AND (w.ok_time IS NULL OR w.end_time > w.ok_time))
             FROM ended_w w GROUP BY w.binding_id ORDER BY w.binding_id
             ON CONFLICT (binding_id) DO UPDATE SET
               last_run_id = CASE WHEN s.last_run_end_time > EXCLUDED.last_run_end_time
                                  THEN s.last_run_id ELSE EXCLUDED.last_run_id END,
               last_run_state = CASE WHEN s.last_run_end_time > EXCLUDED.last_run_end_time
                                     THEN s.last_run_state ELSE EXCLUDED.last_run_state END,
               last_run_scheduled_time = CASE WHEN s.last_run_end_time > EXCLUDED.last_run_end_time
                                              THEN s.last_run_scheduled_time
                                              ELSE EXCLUDED.last_run_scheduled_time END,
               last_run_end_time = GREATEST(s.last_run_end_time, EXCLUDED.last_run_end_time),
               last_success_time = GREATEST(s.last_success_time, EXCLUDED.last_success_time),
               last_failure_time = GREATEST(s.last_failure_time, EXCLUDED.last_failure_time),
               consecutive_failures = CASE WHEN EXCLUDED.last_success_time IS NULL
                                           THEN s.consecutive_failures + EXCLUDED.consecutive_failures
                                           ELSE EXCLUDED.consecutive_failures END),
           -- The hourly statistics of their bindings: one row per ended run
           -- appended to run_stats_delta (no index, no aggregation, no row
           -- update here: migration 20261205000300), added to run_stats by
           -- run_stats_delta_fold. Lag and duration only of runs that started;
           -- microseconds capped at 100 years, infinite instants (planted data)
           -- left out.
           ended_b AS (
             SELECT e.binding_id, date_trunc('hour', e.scheduled_time, 'UTC') AS hour, e.tenant_id,
                    e.definition, e.state, sked_stats_bucket(x.lag) AS lag_b, sked_stats_bucket(x.dur) AS dur_b,
                    least(extract(epoch FROM x.lag) * 1000000, 3155760000000000)::bigint AS lag_us,
                    least(extract(epoch FROM x.dur) * 1000000, 3155760000000000)::bigint AS dur_us
             FROM ended e CROSS JOIN LATERAL (
               SELECT CASE WHEN isfinite(e.start_time) AND isfinite(e.scheduled_time)
                           THEN greatest(e.start_time - e.scheduled_time, interval '0') END AS lag,
                      CASE WHEN isfinite(e.start_time) AND isfinite(e.end_time)
                           THEN greatest(e.end_time - e.start_time, interval '0') END AS dur) x),
           stats_up AS (
             INSERT INTO run_stats_delta (binding_id, hour, tenant_id, definition, state, lag_b, dur_b, lag_us, dur_us)
             SELECT b.binding_id, b.hour, b.tenant_id, b.definition, b.state, b.lag_b, b.dur_b, b.lag_us, b.dur_us
             FROM ended_b b WHERE b.hour IS NOT NULL)
           -- } run-end bookkeeping
           SELECT id AS "id!", lease_token AS "lease_token!", tenant_id AS "tenant_id!",
                  binding_id AS "binding_id!", definition AS "definition!", last_seq AS "last_seq!",
                  start_time, end_time AS "end_time!", overlap_policy AS "overlap_policy!",
                  EXISTS (SELECT 1 FROM tenant_quotas tq
                          WHERE tq.tenant_id = f.tenant_id AND tq.max_concurrent_runs IS NOT NULL)
                    AS "quota!"
           FROM f"#,
        tokens,
        results as &[Option<String>],
        tenant,
        now,
        encode(&body),
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut wake = false;
    let out: Vec<Completed> = rows
        .into_iter()
        .map(|r| {
            // A run of its binding, or of its tenant held back by the
            // tenant's concurrency quota, may have waited for it to end.
            wake |= r.quota || r.overlap_policy != crate::domain::OverlapPolicy::Allow.as_str();
            Completed {
                token: r.lease_token,
                start_time: r.start_time,
                event: RunEvent {
                    run_id: r.id,
                    seq: r.last_seq,
                    time: r.end_time,
                    tenant_id: r.tenant_id,
                    binding_id: r.binding_id,
                    definition: r.definition,
                    body: body.clone(),
                },
            }
        })
        .collect();
    // The events' NOTIFYs and, when a worker run may have waited for
    // these (only the worker dispatch looks), the wake.
    let announce = super::Announce {
        waiting: Waiting {
            worker: wake,
            ..Waiting::default()
        },
        ranges: super::ranges(out.iter().map(|c| &c.event)),
    };
    Ok((out, announce))
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
    // Rows are locked in id order, as every statement that writes several
    // leased runs does ([`run_complete_by_leases`]): two of them never wait
    // on each other in opposite orders (no deadlock).
    Ok(sqlx::query!(
        r#"WITH l AS (
             SELECT id FROM runs
             WHERE lease_token = ANY($1) AND end_time IS NULL AND state IS NOT DISTINCT FROM 'RUNNING'
               AND ($3::text IS NULL OR tenant_id = $3)
             ORDER BY id FOR UPDATE)
           UPDATE runs r SET lease_expires_at = $2 FROM l WHERE r.id = l.id
           RETURNING r.lease_token AS "lease_token!", r.id, r.tenant_id, r.attempt, r.start_time,
                     r.timeout_secs, r.cancel_reason"#,
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
/// schedule-to-start timeout: `FAILED` with reason [`RunReason::NoWorker`],
/// events written and announced, `FOR UPDATE SKIP LOCKED`. The timeout is
/// the handler's `schedule_to_start_secs` (default
/// [`crate::domain::DEFAULT_SCHEDULE_TO_START_SECS`]), counted from
/// `not_before`, or from `create_time` for a run created after it (a
/// backfill of past fire times, a catch-up after an outage).
///
/// Reads only runs past their deadline, earliest first: `runs_queued_worker`
/// is keyed by `sked_start_deadline(not_before, create_time, handler)`
/// (migration 20261212000200, which holds the default in SQL), so a backlog
/// waiting for workers costs a reap nothing. Returns the runs with their
/// events; the caller schedules retries, then records the ends with
/// [`run_end_record`](super::run_end_record) in the same transaction.
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
               AND sked_start_deadline(not_before, create_time, handler) < $1
             ORDER BY sked_start_deadline(not_before, create_time, handler) LIMIT $2 FOR UPDATE SKIP LOCKED),
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
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for r in rows {
        let seq = r.last_seq;
        let id = r.id;
        let run = match Run::try_from(r) {
            Ok(run) => run,
            Err(e) => {
                tracing::error!(run = %id, error = %e,
                    "run ended no_worker has unreadable stored data; not retried");
                unreadable.push((id, false));
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
    // Those the caller never sees are recorded here (no retry follows).
    super::run_end_record(&mut *conn, &unreadable).await?;
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
