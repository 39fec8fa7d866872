//! `runs`: one attempt of one execution. Creation, claim and finish each
//! write the run row, its `state_changed` event and the NOTIFYs in one
//! transaction, so an event is persisted before anyone can see it.
//!
//! | file           | inside                                                              |
//! |----------------|---------------------------------------------------------------------|
//! | `mod.rs`       | [`run_insert`] (of a [`NewRun`]), the NOTIFYs, the row every read decodes |
//! | `claim.rs`     | [`run_claim`] (the fair-share claim statement), [`run_claim_lock`], [`run_stop_lock`], [`run_stop_lock_shared`], [`ClaimKind`], [`run_analyze_after_burst`] |
//! | `lifecycle.rs` | after the claim: finish, reap, promote, cancel, heartbeat           |
//! | `read.rs`      | reads: one run, lists, the scheduler's active state, due times      |
//! | `workers.rs`   | worker runs: by lease token, worker heartbeats, `no_worker`         |
//! | `outcomes.rs`  | run-end bookkeeping: binding status and hourly statistics, their reads |
//! | `steps.rs`     | workflow steps: a workflow run's step runs, which runs are steps   |

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Error, decode, encode, events::notify_events, policy_from_cols};
use crate::domain::{EventBody, NewRun, Run, RunEvent, RunState, RunTrigger};

mod claim;
mod lifecycle;
mod outcomes;
mod read;
mod steps;
mod workers;

pub use claim::{
    ClaimKind, Claimed, EVENT_SHARDS, Stopped, run_analyze_after_burst, run_claim, run_claim_lock,
    run_stop_lock, run_stop_lock_shared,
};
pub use lifecycle::{
    Outcome, Promoted, run_cancel_bindings, run_cancel_waiting, run_finish, run_heartbeat,
    run_promote_due, run_reap, run_request_cancel,
};
pub use outcomes::{
    RUN_STATS_DELTA_PARTS, STATS_FOLD_LOCK, StatsScope, run_end_record, run_stats_delta_fold,
    run_stats_fold, run_stats_hours,
};
pub use read::{
    ActiveRun, ActiveState, NextDue, RunListed, RunQuery, run_active_counts, run_active_state,
    run_find_by_idempotency_key, run_get, run_list, run_list_active, run_next_due_time,
    run_progress,
};
pub use steps::{
    StepOf, run_active_steps_of, run_step_ids, run_steps, run_steps_of, run_stop_steps,
    run_workflow_advance, run_workflows_past_timeout,
};
pub use workers::{
    Completed, Renewed, run_binding_of, run_by_lease, run_complete_by_leases, run_fail_no_worker,
    run_worker_heartbeat,
};

/// Batches smaller than this are inserted under [`super::generic_plans`].
const GENERIC_PLANS_BELOW: usize = 16;

/// Inserts `runs` with their events, announces them to executors and
/// subscribers, and returns the events of the runs actually inserted. A
/// waiting run (`QUEUED`, `SCHEDULED`) or a `SKIPPED` one gets its first
/// event (seq 1, `→ state`, with the reason). A `SUCCEEDED` run is an `event`
/// handler's run completed in the inserting transaction (by the scheduler):
/// it is written in its final state with all four events (`→ QUEUED`,
/// `QUEUED → RUNNING`, `fired`, `RUNNING → SUCCEEDED`), started and ended at
/// `now` on `node_id`. A schedule fire whose `(binding_id, scheduled_time)`
/// already has a run is left alone: that unique index is what makes firing
/// exactly-once across nodes.
///
/// One statement (arrays through `UNNEST`) per [`INSERT_CHUNK`] runs.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_insert(
    conn: &mut PgConnection,
    node_id: &str,
    runs: &[NewRun],
    now: DateTime<Utc>,
) -> Result<Vec<RunEvent>, Error> {
    let (events, announce) = run_insert_unannounced(conn, node_id, runs, now).await?;
    announce.send(conn, node_id).await?;
    Ok(events)
}

/// [`run_insert`] without its NOTIFYs: they are returned, for the caller
/// to [`Announce::send`] after its transaction commits.
///
/// Why: a transaction that NOTIFYs holds PostgreSQL's notification lock
/// (one per database) from its commit's start until the commit is flushed,
/// so every notifying transaction of every node commits one after the
/// other. The scheduler's firing transaction writes megabytes of WAL; had
/// it notified, the next pass's commit would queue behind that flush, and
/// parallel passes would run one at a time (measured: most of a pass's
/// wall time was that wait at 10 000 fires/s). Sent after commit, the
/// notification's own transaction is tiny. A node that dies in between
/// loses only the wake-ups, which executors and tails recover by polling.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_insert_unannounced(
    conn: &mut PgConnection,
    node_id: &str,
    runs: &[NewRun],
    now: DateTime<Utc>,
) -> Result<(Vec<RunEvent>, Announce), Error> {
    if runs.is_empty() {
        return Ok((Vec::new(), Announce::default()));
    }
    // A few runs at a time (TriggerRun, a retry) would otherwise be
    // planned on every call. Larger batches get the generic plan by
    // PostgreSQL's own choice, and the firing pass (whose round trips are
    // the fire lag) is spared the extra one.
    if runs.len() < GENERIC_PLANS_BELOW {
        super::generic_plans(&mut *conn).await?;
    }
    insert_runs(conn, node_id, runs, now).await
}

/// [`run_insert`] of one run (TriggerRun, RetryRun) in a transaction begun
/// by [`super::begin_generic`], returning its events, the run as written
/// and its NOTIFYs, for the caller to hand to the node's
/// [`crate::db::notify::Announcer`] once the transaction committed (see
/// [`run_insert_unannounced`] for why not in it). Two round trips where the
/// plan setting, the insert, the NOTIFYs and the read took four (at 1 000
/// TriggerRun/s the round trips are most of the node's and much of
/// PostgreSQL's CPU).
///
/// # Errors
/// [`Error::NotFound`] when the run was not written (a schedule fire that
/// already had one); [`Error::Sqlx`] on database failure;
/// [`Error::Corrupt`] for bad JSON.
pub async fn run_insert_one(
    conn: &mut PgConnection,
    node_id: &str,
    new: NewRun,
    now: DateTime<Utc>,
) -> Result<(Vec<RunEvent>, Run, Announce), Error> {
    let (tenant_id, id) = (new.tenant_id.clone(), new.id);
    let (events, announce) = insert_runs(conn, node_id, std::slice::from_ref(&new), now).await?;
    let row = sqlx::query_as!(
        RunRow,
        "SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
         FROM runs WHERE id = $1",
        id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) if r.tenant_id == tenant_id => Ok((events, r.try_into()?, announce)),
        _ => Err(Error::NotFound),
    }
}

/// Writes `runs` and their first events (chunked statements); returns the
/// events of those written and their NOTIFYs, unsent.
async fn insert_runs(
    conn: &mut PgConnection,
    node_id: &str,
    runs: &[NewRun],
    now: DateTime<Utc>,
) -> Result<(Vec<RunEvent>, Announce), Error> {
    let bodies: Vec<Vec<EventBody>> = runs.iter().map(initial_events).collect();
    let n_events: usize = bodies.iter().map(Vec::len).sum();
    let mut inserted = std::collections::HashSet::with_capacity(runs.len());
    let keys: Vec<Uuid> = runs.iter().map(|r| r.binding_id).collect();
    let mut from = 0;
    while from < runs.len() {
        let to = chunk_end(&keys, from, INSERT_CHUNK);
        inserted
            .extend(insert_chunk(conn, node_id, &runs[from..to], &bodies[from..to], now).await?);
        from = to;
    }
    let mut events = Vec::with_capacity(n_events);
    let mut waiting = Waiting::default();
    for (r, evs) in runs.iter().zip(bodies) {
        if !inserted.contains(&r.id) {
            continue;
        }
        if r.state == RunState::Scheduled {
            waiting.add_scheduled(r.not_before);
        } else {
            waiting.add(r.state, r.handler.kind());
        }
        events.extend(evs.into_iter().enumerate().map(|(i, body)| RunEvent {
            run_id: r.id,
            seq: i as i64 + 1,
            time: now,
            tenant_id: r.tenant_id.clone(),
            binding_id: r.binding_id,
            definition: r.definition.clone(),
            body,
        }));
    }
    let announce = Announce {
        waiting,
        ranges: ranges(&events),
    };
    Ok((events, announce))
}

/// Most runs written by one statement of [`run_insert_unannounced`]: a
/// larger batch is written by several, in the same transaction. Measured
/// (2026-12-06, 2 cores): a pass prepared ahead wrote 43 000 runs in one
/// statement at 130–160 µs a run, against 40–60 µs in statements of 1 000
/// (its sorts and joins outgrow `work_mem`).
const INSERT_CHUNK: usize = 1000;

/// Where the chunk of runs starting at `from` ends, given their bindings
/// `keys`: after `size` runs (at least one), extended to keep a binding's
/// consecutive runs together (its status row takes the latest of them in
/// one statement).
fn chunk_end<K: PartialEq>(keys: &[K], from: usize, size: usize) -> usize {
    let mut to = from.saturating_add(size.max(1)).min(keys.len());
    while to > 0 && to < keys.len() && keys[to] == keys[to - 1] {
        to += 1;
    }
    to
}

/// One statement of [`run_insert_unannounced`]: writes `runs` with their
/// initial events `bodies`; returns the ids of the runs written.
async fn insert_chunk(
    conn: &mut PgConnection,
    node_id: &str,
    runs: &[NewRun],
    bodies: &[Vec<EventBody>],
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, Error> {
    let t0 = std::time::Instant::now();
    let n_events: usize = bodies.iter().map(Vec::len).sum();
    let mut ev_run = Vec::with_capacity(n_events);
    let mut ev_seq = Vec::with_capacity(n_events);
    let mut ev_kind = Vec::with_capacity(n_events);
    let mut ev_payload = Vec::with_capacity(n_events);
    for (r, evs) in runs.iter().zip(bodies) {
        // A run written with its whole history (an event run created
        // SUCCEEDED) takes one batch row keyed by its last seq.
        if evs.len() > 1 {
            ev_run.push(r.id);
            ev_seq.push(evs.len() as i64);
            ev_kind.push(super::events::BATCH_KIND);
            ev_payload.push(super::events::batch_payload(evs));
            continue;
        }
        for (i, b) in evs.iter().enumerate() {
            ev_run.push(r.id);
            ev_seq.push(i as i64 + 1);
            ev_kind.push(b.kind());
            ev_payload.push(encode(b));
        }
    }
    let states: Vec<&str> = runs.iter().map(|r| r.state.as_str()).collect();
    let reasons: Vec<&str> = runs.iter().map(|r| r.reason.as_str()).collect();
    let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
    let tenants: Vec<&str> = runs.iter().map(|r| r.tenant_id.as_str()).collect();
    let bindings: Vec<Uuid> = runs.iter().map(|r| r.binding_id).collect();
    let defs: Vec<&str> = runs.iter().map(|r| r.definition.as_str()).collect();
    let triggers: Vec<&str> = runs.iter().map(|r| r.trigger.as_str()).collect();
    let times: Vec<DateTime<Utc>> = runs.iter().map(|r| r.scheduled_time).collect();
    let not_before: Vec<DateTime<Utc>> = runs.iter().map(|r| r.not_before).collect();
    let handlers: Vec<serde_json::Value> = runs.iter().map(|r| encode(&r.handler)).collect();
    let params: Vec<serde_json::Value> = runs.iter().map(|r| r.params.clone()).collect();
    let attempts: Vec<i32> = runs.iter().map(|r| r.attempt).collect();
    let retry_of: Vec<Option<Uuid>> = runs.iter().map(|r| r.retry_of).collect();
    let max_attempts: Vec<i32> = runs
        .iter()
        .map(|r| r.policy.retry.max_attempts as i32)
        .collect();
    let retry_policies: Vec<serde_json::Value> =
        runs.iter().map(|r| encode(&r.policy.retry)).collect();
    let timeouts: Vec<Option<i32>> = runs
        .iter()
        .map(|r| r.policy.timeout_secs.map(|t| t as i32))
        .collect();
    let overlaps: Vec<&str> = runs.iter().map(|r| r.policy.overlap.as_str()).collect();
    let priorities: Vec<i32> = runs.iter().map(|r| r.policy.priority).collect();
    let keys: Vec<Option<&str>> = runs.iter().map(|r| r.idempotency_key.as_deref()).collect();
    let last_seqs: Vec<i64> = bodies.iter().map(|b| b.len() as i64).collect();
    let manual: Vec<bool> = runs.iter().map(|r| r.manual).collect();
    let built_ms = t0.elapsed().as_secs_f64() * 1e3;
    let inserted = sqlx::query_scalar!(
        r#"WITH u AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[],
                                  $7::jsonb[], $8::jsonb[], $10::text[], $11::text[], $12::bigint[],
                                  $13::timestamptz[], $14::int[], $15::uuid[], $16::int[], $17::jsonb[],
                                  $18::int[], $19::text[], $20::int[], $21::text[], $27::bool[])
                  AS u(id, tenant_id, binding_id, definition, trigger, scheduled_time, handler, params,
                       state, reason, last_seq, not_before, attempt, retry_of, max_attempts, retry_policy,
                       timeout_secs, overlap_policy, priority, idempotency_key, manual)),
           r AS (
             INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time,
                               not_before, create_time, start_time, end_time, node_id, handler, params,
                               reason, last_seq, attempt, retry_of, max_attempts, retry_policy,
                               timeout_secs, overlap_policy, priority, idempotency_key, manual)
             SELECT u.id, u.tenant_id, u.binding_id, u.definition, u.trigger, u.state, u.scheduled_time,
                    u.not_before, $9,
                    CASE WHEN u.state = 'SUCCEEDED' THEN $9::timestamptz END,
                    CASE WHEN u.state IN ('SKIPPED', 'SUCCEEDED') THEN $9::timestamptz END,
                    CASE WHEN u.state = 'SUCCEEDED' THEN $22 END,
                    u.handler, u.params, NULLIF(u.reason, ''), u.last_seq, u.attempt, u.retry_of,
                    u.max_attempts, u.retry_policy, u.timeout_secs, u.overlap_policy, u.priority,
                    u.idempotency_key,
                    u.manual OR coalesce((SELECT p.manual FROM runs p WHERE p.id = u.retry_of), false)
             FROM u
             ON CONFLICT (binding_id, scheduled_time) WHERE trigger = 'SCHEDULE' DO NOTHING
             RETURNING id, tenant_id, binding_id, definition, state, scheduled_time, start_time, end_time),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT r.id, ev.seq, $9, r.tenant_id, r.binding_id, r.definition, ev.kind, ev.payload
             FROM UNNEST($23::uuid[], $24::bigint[], $25::text[], $26::jsonb[]) AS ev(run_id, seq, kind, payload)
             JOIN r ON r.id = ev.run_id
             RETURNING run_id),
           -- Runs written ended (SKIPPED, an event run SUCCEEDED): no retry
           -- can follow them.
           ended AS (
             SELECT r.id, r.tenant_id, r.binding_id, r.definition, r.state, r.scheduled_time, r.start_time,
                    r.end_time, r.state IN ('FAILED', 'TIMED_OUT') AS final_failure
             FROM r WHERE r.end_time IS NOT NULL),
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
           SELECT id AS "id!" FROM r"#,
        &ids,
        &tenants as &[&str],
        &bindings,
        &defs as &[&str],
        &triggers as &[&str],
        &times,
        &handlers,
        &params,
        now,
        &states as &[&str],
        &reasons as &[&str],
        &last_seqs,
        &not_before,
        &attempts,
        &retry_of as &[Option<Uuid>],
        &max_attempts,
        &retry_policies,
        &timeouts as &[Option<i32>],
        &overlaps as &[&str],
        &priorities,
        &keys as &[Option<&str>],
        node_id,
        &ev_run,
        &ev_seq,
        &ev_kind as &[&str],
        &ev_payload,
        &manual,
    )
    .fetch_all(&mut *conn)
    .await?;
    tracing::debug!(
        runs = runs.len(),
        events = ev_run.len(),
        built_ms,
        executed_ms = t0.elapsed().as_secs_f64() * 1e3 - built_ms,
        "runs inserted"
    );
    Ok(inserted)
}

/// The NOTIFYs of written runs and events, sent by [`Announce::send`]:
/// which runs wait (channel [`super::notify::RUNS`]) and the events' seq
/// ranges per run (channel [`super::notify::EVENTS`]).
#[derive(Debug, Default)]
#[must_use = "the announcement must be sent"]
pub struct Announce {
    waiting: Waiting,
    ranges: Vec<(Uuid, i64, i64)>,
}

impl Announce {
    /// Sends them in one statement: inside the caller's transaction when
    /// `db` is one (delivered on commit), else in a transaction of its own.
    /// Nothing when there is nothing to announce.
    ///
    /// # Errors
    /// [`Error::Sqlx`] on database failure.
    pub async fn send(self, db: impl PgExecutor<'_>, node_id: &str) -> Result<(), Error> {
        let (channels, payloads) = self.notifications(node_id, false);
        if channels.is_empty() {
            return Ok(());
        }
        super::notify::notify_all(db, &channels, &payloads).await
    }

    /// The NOTIFYs (channel, payload), in order, for an
    /// [`crate::db::notify::Announcer`] to send after the commit.
    pub fn into_notifications(self, node_id: &str) -> Vec<(&'static str, String)> {
        let (channels, payloads) = self.notifications(node_id, false);
        channels.into_iter().zip(payloads).collect()
    }

    /// The NOTIFYs of `events` (in seq order per run), for an
    /// [`crate::db::notify::Announcer`] to send after the commit.
    pub fn events<'a>(events: impl IntoIterator<Item = &'a RunEvent>) -> Announce {
        Announce {
            waiting: Waiting::default(),
            ranges: ranges(events),
        }
    }

    /// The channels and payloads of the NOTIFYs, in order. `woken_here`:
    /// the caller wakes this node's loops for the waiting runs itself, so
    /// the [`super::notify::RUNS`] payload names `node_id`
    /// ([`Waiting::payload_from`]) and that node's bridge leaves its loops
    /// alone (a second wake-up of the worker dispatch was a claim that
    /// found nothing, under the lock every claim waits for).
    fn notifications(self, node_id: &str, woken_here: bool) -> (Vec<&'static str>, Vec<String>) {
        let mut channels = Vec::new();
        let mut payloads = Vec::new();
        if self.waiting.any() {
            channels.push(super::notify::RUNS);
            payloads.push(if woken_here {
                self.waiting.payload_from(node_id)
            } else {
                self.waiting.payload()
            });
        }
        for p in super::events::event_payloads(node_id, self.ranges) {
            channels.push(super::notify::EVENTS);
            payloads.push(p);
        }
        (channels, payloads)
    }
}

/// The events a new run is written with (see [`run_insert`]).
fn initial_events(r: &NewRun) -> Vec<EventBody> {
    let state = |from, to, reason: &str| EventBody::StateChanged {
        from,
        to,
        reason: reason.to_string(),
    };
    if r.state == RunState::Succeeded {
        vec![
            state(None, RunState::Queued, ""),
            state(Some(RunState::Queued), RunState::Running, ""),
            EventBody::Fired {
                params: r.params.clone(),
            },
            state(Some(RunState::Running), RunState::Succeeded, ""),
        ]
    } else {
        vec![state(None, r.state, &r.reason)]
    }
}

/// Announces `events` (in seq order per run) on
/// [`super::notify::EVENTS`]; nothing when there are none.
async fn announce<'a>(
    conn: &mut PgConnection,
    node_id: &str,
    events: impl IntoIterator<Item = &'a RunEvent>,
) -> Result<(), Error> {
    let ranges = ranges(events);
    if ranges.is_empty() {
        return Ok(());
    }
    notify_events(conn, node_id, ranges).await
}

/// The seq ranges of `events` (in seq order per run): consecutive events
/// of one run make one range.
pub(super) fn ranges<'a>(events: impl IntoIterator<Item = &'a RunEvent>) -> Vec<(Uuid, i64, i64)> {
    let mut ranges: Vec<(Uuid, i64, i64)> = Vec::new();
    for e in events {
        match ranges.last_mut() {
            Some((run, _, to)) if *run == e.run_id && *to + 1 == e.seq => *to = e.seq,
            _ => ranges.push((e.run_id, e.seq, e.seq)),
        }
    }
    ranges
}

/// Tells every node's executor that runs are waiting (or a slot freed up):
/// [`super::notify::RUNS`], delivered on commit.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notify_runs(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query!("SELECT pg_notify($1::text, '')", super::notify::RUNS)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Which waiting runs a statement wrote, for the [`super::notify::RUNS`]
/// payload: listeners wake only the loop that can act on them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waiting {
    /// `SCHEDULED` runs (executors recompute when to promote).
    pub scheduled: bool,
    /// When the first of those is due (its `not_before`), if every one was
    /// counted with its due time ([`Waiting::add_scheduled`]); `None` when
    /// unknown. A listener that knows it moves its promotion timer without
    /// reading the database.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// `QUEUED` runs of `worker` handlers (the worker dispatch claims).
    pub worker: bool,
    /// `QUEUED` runs of other handlers (executors claim).
    pub local: bool,
    /// `QUEUED` runs of `event` handlers (the executors' event claim
    /// loops complete them).
    pub event: bool,
}

impl Waiting {
    /// Counts a run now in `state`, of a handler of `kind` (as stored,
    /// `handler->>'kind'`: `worker`, `event`, or another).
    /// A `SCHEDULED` run counted here has no due time: the payload says
    /// none ([`Waiting::add_scheduled`] for one that has).
    pub fn add(&mut self, state: RunState, kind: &str) {
        match (state, kind) {
            (RunState::Scheduled, _) => {
                self.scheduled = true;
                self.scheduled_at = None;
            }
            (RunState::Queued, "worker") => self.worker = true,
            (RunState::Queued, "event") => self.event = true,
            (RunState::Queued, _) => self.local = true,
            _ => {}
        }
    }

    /// Counts a `SCHEDULED` run due at `not_before`. The payload names the
    /// earliest due time of such runs, unless one was counted without
    /// ([`Waiting::add`]).
    pub fn add_scheduled(&mut self, not_before: DateTime<Utc>) {
        self.scheduled_at = match (self.scheduled, self.scheduled_at) {
            (false, _) => Some(not_before),
            (true, Some(t)) => Some(t.min(not_before)),
            (true, None) => None,
        };
        self.scheduled = true;
    }

    /// Whether any waiting run was counted.
    pub fn any(self) -> bool {
        self.scheduled || self.worker || self.local || self.event
    }

    /// The NOTIFY payload naming them; `SCHEDULED` runs of a known due
    /// time as `scheduled:<microseconds since the Unix epoch>`.
    pub fn payload(self) -> String {
        let scheduled = match self.scheduled_at {
            Some(t) => format!("{}:{}", super::notify::RUNS_SCHEDULED, t.timestamp_micros()),
            None => super::notify::RUNS_SCHEDULED.to_string(),
        };
        let items = [
            (self.scheduled, scheduled.as_str()),
            (self.worker, super::notify::RUNS_WORKER),
            (self.local, super::notify::RUNS_LOCAL),
            (self.event, super::notify::RUNS_EVENT),
        ];
        items
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// [`Waiting::payload`] of a node that has woken its own loops for
    /// these runs: `<items>@<node_id>` ([`Waiting::sender`]). Nodes that
    /// predate the form read it as unknown, so they wake every loop.
    pub fn payload_from(self, node_id: &str) -> String {
        format!("{}@{node_id}", self.payload())
    }

    /// The node a [`Waiting::payload_from`] payload names (everything after
    /// its first `@`; node ids may hold any character); `None` for others.
    pub fn sender(payload: &str) -> Option<&str> {
        payload.split_once('@').map(|(_, node)| node)
    }

    /// Parses a payload, with or without its sender; `None` for an empty
    /// or unknown one (any runs). Nodes of the version before the due
    /// time read `scheduled:<µs>` as unknown, so they wake every loop.
    pub fn parse(payload: &str) -> Option<Waiting> {
        let items = payload.split_once('@').map_or(payload, |(items, _)| items);
        let mut w = Waiting::default();
        for item in items.split(',') {
            if let Some(micros) = item
                .strip_prefix(super::notify::RUNS_SCHEDULED)
                .and_then(|rest| rest.strip_prefix(':'))
            {
                let at = micros
                    .parse::<i64>()
                    .ok()
                    .and_then(DateTime::<Utc>::from_timestamp_micros)?;
                w.add_scheduled(at);
                continue;
            }
            match item {
                super::notify::RUNS_SCHEDULED => {
                    w.scheduled = true;
                    w.scheduled_at = None;
                }
                super::notify::RUNS_WORKER => w.worker = true,
                super::notify::RUNS_LOCAL => w.local = true,
                super::notify::RUNS_EVENT => w.event = true,
                _ => return None,
            }
        }
        Some(w)
    }
}

/// [`notify_runs`] naming which runs wait ([`Waiting::payload`]).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notify_runs_for(conn: &mut PgConnection, waiting: Waiting) -> Result<(), Error> {
    sqlx::query!(
        "SELECT pg_notify($1::text, $2::text)",
        super::notify::RUNS,
        waiting.payload()
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn state_event(run: &Run, seq: i64, now: DateTime<Utc>, body: EventBody) -> RunEvent {
    RunEvent {
        run_id: run.id,
        seq,
        time: now,
        tenant_id: run.tenant_id.clone(),
        binding_id: run.binding_id,
        definition: run.definition.clone(),
        body,
    }
}

fn corrupt_state(s: &str) -> Error {
    Error::Corrupt {
        what: "run state",
        source: <serde_json::Error as serde::de::Error>::custom(format!("unknown value {s:?}")),
    }
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
    not_before: DateTime<Utc>,
    retry_of: Option<Uuid>,
    retry_policy: serde_json::Value,
    timeout_secs: Option<i32>,
    overlap_policy: String,
    priority: i32,
    idempotency_key: Option<String>,
    cancel_reason: Option<String>,
    progress: Option<serde_json::Value>,
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
            not_before: r.not_before,
            retry_of: r.retry_of,
            policy: policy_from_cols(
                &r.overlap_policy,
                r.retry_policy,
                r.timeout_secs,
                r.priority,
            )?,
            idempotency_key: r.idempotency_key,
            cancel_reason: r.cancel_reason,
            // Informational only: an unreadable progress must not make
            // the run unreadable (and so fail it as corrupt); it reads as none.
            progress: r.progress.and_then(|p| serde_json::from_value(p).ok()),
        })
    }
}

#[cfg(test)]
mod waiting_tests {
    use super::*;

    #[test]
    fn chunks_cover_every_run_once_and_never_split_a_binding() {
        // Every prefix/size mix over runs of bindings in runs of 1–5.
        for seed in 0u64..200 {
            let mut keys = Vec::new();
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            for b in 0..(seed % 40) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                keys.extend(std::iter::repeat_n(b, (x >> 60) as usize % 5 + 1));
            }
            let size = (seed % 7) as usize;
            let mut from = 0;
            let mut chunks = Vec::new();
            while from < keys.len() {
                let to = chunk_end(&keys, from, size);
                assert!(to > from, "progress at {from} of {keys:?}");
                chunks.push(&keys[from..to]);
                from = to;
            }
            assert_eq!(chunks.concat(), keys, "every run once, in order");
            for pair in chunks.windows(2) {
                assert_ne!(
                    pair[0].last(),
                    pair[1].first(),
                    "a binding split: {chunks:?}"
                );
            }
            for c in &chunks {
                let distinct = c.windows(2).filter(|w| w[0] != w[1]).count() + 1;
                assert!(
                    c.len() <= size.max(1) || distinct == 1 || c.len() - size.max(1) < 5,
                    "a chunk past its size only to finish a binding: {c:?}"
                );
            }
        }
    }

    #[test]
    fn waiting_payloads_round_trip_and_unknown_ones_mean_any() {
        for bits in 0..16 {
            for at in [None, Some(due(1_765_000_000_123_456)), Some(due(-5))] {
                let w = Waiting {
                    scheduled: bits & 1 != 0,
                    scheduled_at: at.filter(|_| bits & 1 != 0),
                    worker: bits & 2 != 0,
                    local: bits & 4 != 0,
                    event: bits & 8 != 0,
                };
                let p = w.payload();
                if w.any() {
                    assert_eq!(Waiting::parse(&p), Some(w), "{p}");
                } else {
                    assert_eq!(Waiting::parse(&p), None);
                }
            }
        }
        // With the sender named: the same runs, and the sender, whatever
        // its id holds.
        for node in ["n1", "a@b,c", ""] {
            let w = Waiting {
                worker: true,
                event: true,
                ..Waiting::default()
            };
            let p = w.payload_from(node);
            assert_eq!(Waiting::parse(&p), Some(w), "{p}");
            assert_eq!(Waiting::sender(&p), Some(node), "{p}");
        }
        assert_eq!(Waiting::sender("worker,local"), None);
        assert_eq!(Waiting::parse("@n1"), None);
        // Empty (older nodes, maintenance) or unknown: every loop looks.
        assert_eq!(Waiting::parse(""), None);
        assert_eq!(Waiting::parse("worker,later"), None);
        // A due time that is not one: unknown, every loop looks.
        for p in [
            "scheduled:",
            "scheduled:x",
            "scheduled:1.5",
            "scheduled:99999999999999999999",
            "scheduled:9223372036854775807",
            "scheduledx",
        ] {
            assert_eq!(Waiting::parse(p), None, "{p}");
        }
        let mut w = Waiting::default();
        w.add(RunState::Queued, "worker");
        w.add(RunState::Scheduled, "command");
        w.add(RunState::Running, "command");
        assert_eq!(w.payload(), "scheduled,worker");
        w.add(RunState::Queued, "event");
        assert_eq!(w.payload(), "scheduled,worker,event");
        w.add(RunState::Queued, "http");
        assert_eq!(w.payload(), "scheduled,worker,local,event");
    }

    fn due(micros: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(micros).expect("in range")
    }

    #[test]
    fn the_payload_names_the_earliest_due_time_only_when_every_run_had_one() {
        let mut w = Waiting::default();
        w.add_scheduled(due(3_000_000));
        w.add_scheduled(due(1_000_007));
        w.add_scheduled(due(2_000_000));
        w.add(RunState::Queued, "worker");
        assert_eq!(w.payload(), "scheduled:1000007,worker");
        assert_eq!(
            Waiting::parse(&w.payload()).and_then(|w| w.scheduled_at),
            Some(due(1_000_007))
        );
        // One run counted without: unknown, whichever comes first.
        let mut a = w;
        a.add(RunState::Scheduled, "command");
        assert_eq!(a.payload(), "scheduled,worker");
        let mut b = Waiting::default();
        b.add(RunState::Scheduled, "command");
        b.add_scheduled(due(5));
        assert_eq!(b.scheduled_at, None);
        assert_eq!(Waiting::parse("scheduled,scheduled:5"), Some(b));
        assert_eq!(Waiting::parse("scheduled:5,scheduled"), Some(b));
        // Two named times: the earlier.
        assert_eq!(
            Waiting::parse("scheduled:9,scheduled:5@n1").and_then(|w| w.scheduled_at),
            Some(due(5))
        );
    }
}
