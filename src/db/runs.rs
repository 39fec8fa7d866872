//! `runs`: one attempt of one execution. Creation, claim and finish each
//! write the run row, its `state_changed` event and the NOTIFYs in one
//! transaction, so an event is persisted before anyone can see it.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{Error, clip, decode, encode, events::notify_events, policy_from_cols};
use crate::domain::policy::{REASON_BINDING_DELETED, REASON_CORRUPT};
use crate::domain::{
    EventBody, Handler, OverlapPolicy, Run, RunEvent, RunPolicy, RunState, RunTrigger,
};

/// A run to create: `QUEUED` (due), `SCHEDULED` (for a future time) or
/// `SKIPPED` (a fire that deliberately does not run, with a reason).
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
    /// Fire time (manual: trigger or run time; retry: its due time).
    pub scheduled_time: DateTime<Utc>,
    /// Claimed no earlier than this (fire time + jitter, retry backoff, run_time).
    pub not_before: DateTime<Utc>,
    /// Handler snapshot.
    pub handler: Handler,
    /// Params snapshot.
    pub params: serde_json::Value,
    /// `Queued`, `Scheduled` or `Skipped`.
    pub state: RunState,
    /// Why it is skipped (empty otherwise).
    pub reason: String,
    /// 1-based attempt.
    pub attempt: i32,
    /// Previous attempt, for retries.
    pub retry_of: Option<Uuid>,
    /// Policy snapshot.
    pub policy: RunPolicy,
    /// TriggerRun's idempotency key.
    pub idempotency_key: Option<String>,
    /// An explicit request (TriggerRun, RetryRun): it may start while its
    /// binding is paused or disabled (see [`run_claim`]). A retry is manual
    /// also when the attempt it retries (`retry_of`) was.
    pub manual: bool,
}

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
/// One statement for the whole batch (arrays through `UNNEST`), whatever
/// its size.
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
    let bodies: Vec<Vec<EventBody>> = runs.iter().map(initial_events).collect();
    let n_events: usize = bodies.iter().map(Vec::len).sum();
    let mut ev_run = Vec::with_capacity(n_events);
    let mut ev_seq = Vec::with_capacity(n_events);
    let mut ev_kind = Vec::with_capacity(n_events);
    let mut ev_payload = Vec::with_capacity(n_events);
    for (r, evs) in runs.iter().zip(&bodies) {
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
             RETURNING id, tenant_id, binding_id, definition),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT r.id, ev.seq, $9, r.tenant_id, r.binding_id, r.definition, ev.kind, ev.payload
             FROM UNNEST($23::uuid[], $24::bigint[], $25::text[], $26::jsonb[]) AS ev(run_id, seq, kind, payload)
             JOIN r ON r.id = ev.run_id
             RETURNING run_id)
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
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    let mut events = Vec::with_capacity(n_events);
    let mut waiting = false;
    for (r, evs) in runs.iter().zip(bodies) {
        if !inserted.contains(&r.id) {
            continue;
        }
        waiting |= matches!(r.state, RunState::Queued | RunState::Scheduled);
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
    if waiting {
        notify_runs(&mut *conn).await?;
    }
    announce(&mut *conn, node_id, &events).await?;
    Ok(events)
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
/// [`super::CHANNEL_EVENTS`]; nothing when there are none.
async fn announce<'a>(
    conn: &mut PgConnection,
    node_id: &str,
    events: impl IntoIterator<Item = &'a RunEvent>,
) -> Result<(), Error> {
    // Consecutive events of one run make one range.
    let mut ranges: Vec<(Uuid, i64, i64)> = Vec::new();
    for e in events {
        match ranges.last_mut() {
            Some((run, _, to)) if *run == e.run_id && *to + 1 == e.seq => *to = e.seq,
            _ => ranges.push((e.run_id, e.seq, e.seq)),
        }
    }
    if ranges.is_empty() {
        return Ok(());
    }
    notify_events(conn, node_id, ranges).await
}

/// Tells every node's executor that runs are waiting (or a slot freed up):
/// [`super::CHANNEL_RUNS`], delivered on commit.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notify_runs(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query!("SELECT pg_notify('sked_runs', '')")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Claims up to `limit` due `QUEUED` runs (`not_before <= now`) for
/// `node_id`, in fair-share order: highest priority first; then round-robin
/// across tenants (each tenant's claimable runs are ranked by priority, due
/// time and id, and rank 1 of every tenant goes before rank 2 of any, ties
/// going to the tenant served least recently per `tenant_claims`, never
/// served first), so a tenant with thousands of queued runs cannot starve
/// one with a single run; then oldest due time, then id. A run whose
/// overlap policy is not `ALLOW` is claimable only while its binding has no
/// `RUNNING` run of a non-`ALLOW` policy, and only if it is its binding's
/// first due run of the kind (of any policy), so at most one such run per
/// binding is claimed at once (the unique index `runs_one_running` backs
/// this up across nodes). A tenant with a `max_concurrent_runs` quota gets
/// at most that many minus its `RUNNING` runs; its claimable runs ranked
/// past that wait `QUEUED` and are marked `throttled` for usage reports:
/// only those among its first `limit` claimable runs (the ones a claim
/// reads), so a deeper backlog is marked as it moves up. `FOR UPDATE SKIP
/// LOCKED`, so nodes never claim the same run.
///
/// Only runs that may start are taken: their binding exists, and either the
/// run is `manual` (a TriggerRun or RetryRun, or a retry of one) or the
/// binding is enabled and not paused (a pause whose `pause_expire_time` has
/// passed is over); and their definition is enabled. The others wait where
/// they are (stopped means stopped; [`run_claim_lock`] orders the stopping
/// calls with claims). The paused or disabled bindings and the disabled
/// definitions are read once per claim (partial indexes: O(stopped ones))
/// and tested per candidate as hashed sets, inside the per-tenant reads, so
/// a paused binding's runs never hide the tenant's others; a paused
/// binding's backlog of `ALLOW` runs is read through on every claim of its
/// tenant, though. Existence is checked on the picked runs only (a deleted
/// binding's runs were cancelled with it).
///
/// Sets them `RUNNING` with a lease, writes their `→ RUNNING` events and
/// announces them. Returns each claimed run with that event. The start time
/// is `now` (read from `clock` once the claim lock is held), but never
/// before the end time of a run whose slot it takes: any run of its tenant
/// when the tenant has a concurrency quota, else any run of its binding.
/// Only runs that ended after `now` can matter (a finish that committed
/// between the clock read and the statement's snapshot, or a node whose
/// clock is ahead); they are read through the `runs_ended_tenant` index. So start
/// times follow the slot's previous end whatever the nodes' clocks say.
///
/// Cost: a claim reads O(tenants with queued runs × `limit`) runs, however
/// long the queue. Per tenant, its first `limit` due `ALLOW` runs; and for
/// the other policies the first due run of each of its bindings with queued
/// non-`ALLOW` runs when it has at most 100 such bindings, else its first
/// 2 × `limit` due non-`ALLOW` runs, falling back to every such binding's
/// first run when those hold fewer than `limit` claimable ones (a few
/// bindings' deep backlog).
///
/// `kind` splits the queue: [`ClaimKind::Executed`] claims runs that need a
/// task on this node (commands), up to its free slots;
/// [`ClaimKind::Event`] claims runs of `event` handlers, which complete in
/// the claim statement itself: the row goes `QUEUED` → `SUCCEEDED` in one
/// write (started and ended at `now`), with its `→ RUNNING`, `fired` and
/// `→ SUCCEEDED` events, and is returned so.
///
/// No run of a tenant in `excluded` is taken (the executor passes the
/// tenants holding their share of its slots, see [`crate::executor`]; empty
/// for [`ClaimKind::Event`]). They are dropped where the tenants are
/// enumerated, so their backlogs are not read: an excluded tenant costs one
/// index probe.
///
/// # Errors
/// [`Error::AlreadyExists`] (`runs_one_running`) when another node claimed a
/// run of the same overlap-free binding at the same instant: claim again.
/// [`Error::Sqlx`] on database failure; [`Error::Corrupt`] for bad JSON.
pub async fn run_claim(
    conn: &mut PgConnection,
    node_id: &str,
    clock: &crate::domain::Clock,
    lease: chrono::Duration,
    limit: i64,
    kind: ClaimKind,
    excluded: &[String],
) -> Result<Vec<(Run, Vec<RunEvent>)>, Error> {
    let body = EventBody::StateChanged {
        from: Some(RunState::Queued),
        to: RunState::Running,
        reason: String::new(),
    };
    let done = EventBody::StateChanged {
        from: Some(RunState::Running),
        to: RunState::Succeeded,
        reason: String::new(),
    };
    // Claims are serialised across nodes (a transaction-scoped advisory
    // lock), so the tenants' running counts below are exact and a
    // concurrency quota is never exceeded by two nodes claiming at once.
    // Bitmap scans are off for the claim: the per-tenant reads below must
    // walk an index in claim order and stop after `limit` rows, and the
    // planner, estimating every tenant at the average size, would
    // otherwise read a large tenant's whole backlog and sort it. JIT is
    // off too: the statement runs in milliseconds, and JIT compiles anew on
    // every execution whose estimated cost passes jit_above_cost (about 1 s
    // of the former claim's 1.6 s at 130 000 queued runs).
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1), set_config('enable_bitmapscan', 'off', true) AS bitmapscan,
                set_config('jit', 'off', true) AS jit",
        CLAIM_LOCK
    )
    .fetch_one(&mut *tx)
    .await?;
    // Read after the lock. This alone would not keep a start after the end
    // of the run whose slot it takes: a finish may read its clock after
    // this and commit before the statement below takes its snapshot, and
    // another node's clock may be ahead. So the statement floors each start
    // time at those runs' end times (`late`, `starts`).
    let now = clock.now();
    let rows = sqlx::query_as!(
        RunRow,
        r#"WITH RECURSIVE
           -- Candidates, per tenant: at most $4 of its runs can be claimed
           -- and they are its first $4 claimable ones in (priority DESC,
           -- not_before, id) order, so only those are read (indexes in
           -- migration 20261121000006), never the whole backlog.
           -- Stopped means stopped: the bindings paused or disabled now
           -- hold their runs except manual ones, disabled definitions all
           -- theirs (hashed sets, from partial indexes in migration
           -- 20261201000001; a deleted binding's runs are checked in
           -- `locked`).
           held_back AS MATERIALIZED (
             SELECT b.id FROM bindings b
             WHERE (b.paused OR NOT b.enabled)
               AND (NOT b.enabled OR coalesce(b.pause_expire_time > $1, true))),
           off_defs AS MATERIALIZED (SELECT d.name FROM definitions d WHERE NOT d.enabled),
           -- Tenants with QUEUED runs: a loose index scan of
           -- runs_claim_tenant. Its second column is in the ORDER BY only
           -- so that no other index serves: from statistics where most rows
           -- are queued, the planner once walked (tenant_id, create_time)
           -- through every finished run instead.
           tenants AS (
             (SELECT tenant_id FROM runs WHERE state = 'QUEUED'
              ORDER BY tenant_id, ((handler->>'kind') = 'event')::int LIMIT 1)
             UNION ALL
             SELECT (SELECT r.tenant_id FROM runs r WHERE r.state = 'QUEUED' AND r.tenant_id > t.tenant_id
                     ORDER BY r.tenant_id, ((r.handler->>'kind') = 'event')::int LIMIT 1)
             FROM tenants t WHERE t.tenant_id IS NOT NULL),
           -- Those the caller did not exclude ($8: tenants at their share
           -- of the node's slots); an excluded tenant's backlog is not read.
           open_tenants AS (
             SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL AND tenant_id <> ALL($8::text[])),
           -- ALLOW runs: each tenant's first $4 due ones of the kind.
           allowed AS (
             SELECT a.* FROM open_tenants t CROSS JOIN LATERAL (
               SELECT q.id, q.tenant_id, q.priority, q.not_before, q.throttled
               FROM runs q
               WHERE q.tenant_id = t.tenant_id AND q.state = 'QUEUED'
                 AND (q.handler->>'kind' = 'event')::int = $6::boolean::int
                 AND (q.overlap_policy = 'ALLOW')::int = 1 AND q.not_before <= $1
                 AND (q.manual OR q.binding_id NOT IN (SELECT id FROM held_back))
                 AND q.definition NOT IN (SELECT name FROM off_defs)
               ORDER BY q.priority DESC, q.not_before, q.id LIMIT $4) a),
           -- Other runs: only a binding's first due run of the kind (of any
           -- policy) may be claimed, and not while the binding has a
           -- RUNNING non-ALLOW run; the first such runs ("heads") are found
           -- per tenant by one of three means. First, the tenant's bindings
           -- with QUEUED non-ALLOW runs (loose index scan), up to 101.
           held_bindings AS (
             SELECT t.tenant_id, 1 AS n,
                    (SELECT r.binding_id FROM runs r
                     WHERE r.tenant_id = t.tenant_id AND r.state = 'QUEUED' AND r.overlap_policy <> 'ALLOW'
                     ORDER BY r.binding_id LIMIT 1) AS binding_id
             FROM open_tenants t
             UNION ALL
             SELECT b.tenant_id, b.n + 1,
                    (SELECT r.binding_id FROM runs r
                     WHERE r.tenant_id = b.tenant_id AND r.state = 'QUEUED' AND r.overlap_policy <> 'ALLOW'
                       AND r.binding_id > b.binding_id
                     ORDER BY r.binding_id LIMIT 1)
             FROM held_bindings b WHERE b.binding_id IS NOT NULL AND b.n <= 100),
           -- Tenants with more than 100: instead read their first 2 * $4 due
           -- non-ALLOW runs of the kind in claim order; a binding's first
           -- run among them is its head if no earlier due run of it (ALLOW)
           -- comes before.
           busy AS (
             SELECT tenant_id, binding_id FROM held_bindings WHERE n = 101 AND binding_id IS NOT NULL),
           held AS (
             SELECT h.*, row_number() OVER (PARTITION BY h.binding_id ORDER BY h.priority DESC, h.not_before, h.id) AS bn
             FROM busy t CROSS JOIN LATERAL (
               SELECT q.id, q.tenant_id, q.binding_id, q.priority, q.not_before, q.throttled
               FROM runs q
               WHERE q.tenant_id = t.tenant_id AND q.state = 'QUEUED'
                 AND (q.handler->>'kind' = 'event')::int = $6::boolean::int
                 AND (q.overlap_policy = 'ALLOW')::int = 0 AND q.not_before <= $1
                 AND (q.manual OR q.binding_id NOT IN (SELECT id FROM held_back))
                 AND q.definition NOT IN (SELECT name FROM off_defs)
               ORDER BY q.priority DESC, q.not_before, q.id LIMIT 2 * $4) h),
           held_ok AS (
             SELECT h.id, h.tenant_id, h.priority, h.not_before, h.throttled
             FROM held h
             WHERE h.bn = 1
               AND NOT EXISTS (SELECT 1 FROM runs x WHERE x.binding_id = h.binding_id AND x.state = 'RUNNING'
                                                      AND x.overlap_policy <> 'ALLOW')
               AND h.id = (SELECT y.id FROM runs y
                           WHERE y.binding_id = h.binding_id AND y.state = 'QUEUED'
                             AND (y.handler->>'kind' = 'event')::int = $6::boolean::int AND y.not_before <= $1
                             AND (y.manual OR y.binding_id NOT IN (SELECT id FROM held_back))
                             AND y.definition NOT IN (SELECT name FROM off_defs)
                           ORDER BY y.priority DESC, y.not_before, y.id LIMIT 1)),
           -- Those runs hold the tenant's first $4 heads unless there were
           -- 2 * $4 of them with fewer heads (a few bindings' backlog): then
           -- the rest of its bindings are enumerated after all.
           deep AS (
             SELECT h.tenant_id FROM held h GROUP BY h.tenant_id
             HAVING count(*) = 2 * $4 AND (SELECT count(*) FROM held_ok o WHERE o.tenant_id = h.tenant_id) < $4),
           more_bindings AS (
             SELECT b.tenant_id, b.binding_id FROM busy b WHERE b.tenant_id IN (SELECT tenant_id FROM deep)
             UNION ALL
             SELECT m.tenant_id,
                    (SELECT r.binding_id FROM runs r
                     WHERE r.tenant_id = m.tenant_id AND r.state = 'QUEUED' AND r.overlap_policy <> 'ALLOW'
                       AND r.binding_id > m.binding_id
                     ORDER BY r.binding_id LIMIT 1)
             FROM more_bindings m WHERE m.binding_id IS NOT NULL),
           enumerated AS (
             SELECT tenant_id, binding_id FROM held_bindings
             WHERE binding_id IS NOT NULL AND n <= 100
               AND (tenant_id NOT IN (SELECT tenant_id FROM busy) OR tenant_id IN (SELECT tenant_id FROM deep))
             UNION ALL
             SELECT tenant_id, binding_id FROM more_bindings WHERE binding_id IS NOT NULL),
           -- An enumerated binding's head: its first due run of the kind.
           heads AS (
             SELECT f.id, f.tenant_id, f.priority, f.not_before, f.throttled
             FROM enumerated b CROSS JOIN LATERAL (
               SELECT y.id, y.tenant_id, y.binding_id, y.overlap_policy, y.priority, y.not_before, y.throttled
               FROM runs y
               WHERE y.binding_id = b.binding_id AND y.state = 'QUEUED'
                 AND (y.handler->>'kind' = 'event')::int = $6::boolean::int AND y.not_before <= $1
                 AND (y.manual OR y.binding_id NOT IN (SELECT id FROM held_back))
                 AND y.definition NOT IN (SELECT name FROM off_defs)
               ORDER BY y.priority DESC, y.not_before, y.id LIMIT 1) f
             WHERE f.overlap_policy <> 'ALLOW'
               AND NOT EXISTS (SELECT 1 FROM runs x WHERE x.binding_id = f.binding_id AND x.state = 'RUNNING'
                                                      AND x.overlap_policy <> 'ALLOW')),
           cand AS (
             SELECT * FROM allowed
             UNION ALL
             SELECT * FROM held_ok WHERE tenant_id NOT IN (SELECT tenant_id FROM deep)
             UNION ALL
             SELECT * FROM heads),
           -- Rank the candidates as the whole queue would be ranked.
           per_tenant AS (
             SELECT c.*, row_number() OVER (PARTITION BY c.tenant_id ORDER BY c.priority DESC, c.not_before, c.id) AS tn
             FROM cand c),
           room AS MATERIALIZED (
             SELECT tq.tenant_id,
                    tq.max_concurrent_runs - (SELECT count(*) FROM runs r
                                              WHERE r.tenant_id = tq.tenant_id AND r.state = 'RUNNING') AS room
             FROM tenant_quotas tq
             WHERE tq.max_concurrent_runs IS NOT NULL
               AND tq.tenant_id IN (SELECT DISTINCT tenant_id FROM cand)),
           ranked AS (
             SELECT p.id, p.tenant_id, p.priority, p.tn, p.not_before, p.throttled,
                    (rm.room IS NOT NULL AND p.tn > rm.room) AS over
             FROM per_tenant p LEFT JOIN room rm ON rm.tenant_id = p.tenant_id),
           pick AS (
             SELECT r.id FROM ranked r LEFT JOIN tenant_claims tc ON tc.tenant_id = r.tenant_id
             WHERE NOT r.over
             ORDER BY r.priority DESC, r.tn, tc.last_claim_time NULLS FIRST, r.not_before, r.id
             LIMIT $4),
           -- By primary key, one probe per picked run. Written so that no
           -- plan can do otherwise, even one made from statistics gone
           -- stale after a large backfill (which once read the whole queue
           -- here): an array, not a join, and the state test in a form no
           -- partial index on QUEUED runs matches.
           locked AS (
             SELECT id, tenant_id, binding_id FROM runs
             WHERE id = ANY(ARRAY(SELECT id FROM pick)) AND state IS NOT DISTINCT FROM 'QUEUED'
               AND EXISTS (SELECT 1 FROM bindings b WHERE b.id = runs.binding_id)
             FOR UPDATE OF runs SKIP LOCKED),
           -- A run starts no earlier than the end of any run whose slot it
           -- may take: its tenant's when the tenant has a concurrency quota,
           -- its binding's otherwise. Only runs that ended after $1 matter
           -- (a finish that committed after this claim read its clock, or a
           -- node whose clock is ahead): per claimed run, the latest such
           -- end of its tenant, read backwards down the short top of the
           -- tenant's range of runs_ended_tenant (equality, range and order
           -- all the index's, so no statistics make another plan cheaper).
           starts AS (
             SELECT l.id, GREATEST($1, (SELECT x.end_time FROM runs x
                                        WHERE x.tenant_id = l.tenant_id AND x.end_time > $1
                                          AND x.start_time IS NOT NULL AND x.end_time IS NOT NULL
                                          AND (x.binding_id = l.binding_id
                                               OR l.tenant_id IN (SELECT tenant_id FROM room))
                                        ORDER BY x.tenant_id, x.end_time DESC LIMIT 1)) AS t
             FROM locked l),
           throttle AS (
             UPDATE runs SET throttled = true
             WHERE id IN (SELECT id FROM ranked WHERE over AND NOT throttled)),
           c AS (
             UPDATE runs SET state = CASE WHEN $6 THEN 'SUCCEEDED' ELSE 'RUNNING' END,
                             start_time = s.t, end_time = CASE WHEN $6 THEN s.t END,
                             node_id = $2,
                             lease_expires_at = CASE WHEN $6 THEN NULL ELSE s.t + ($3::timestamptz - $1) END,
                             last_seq = last_seq + CASE WHEN $6 THEN 3 ELSE 1 END
             FROM starts s WHERE runs.id = s.id
             RETURNING runs.*),
           served AS (
             INSERT INTO tenant_claims (tenant_id, last_claim_time)
             SELECT DISTINCT tenant_id, $1::timestamptz FROM c
             ON CONFLICT (tenant_id) DO UPDATE SET last_claim_time = EXCLUDED.last_claim_time),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT c.id, c.last_seq - x.back, c.start_time, c.tenant_id, c.binding_id, c.definition, x.kind,
                    coalesce(x.payload, jsonb_build_object('kind', 'fired', 'params', c.params))
             FROM c CROSS JOIN LATERAL (VALUES (2, 'state_changed', $5::jsonb), (1, 'fired', NULL),
                                               (0, 'state_changed', CASE WHEN $6 THEN $7 ELSE $5 END))
                                       AS x(back, kind, payload)
             WHERE $6 OR x.back = 0
             RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason
           FROM c"#,
        now,
        node_id,
        now + lease,
        limit,
        encode(&body),
        kind == ClaimKind::Event,
        encode(&done),
        excluded,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let seq = r.last_seq;
        let (id, tenant) = (r.id, r.tenant_id.clone());
        // A row that does not decode takes out only itself: a command run
        // that cannot be executed ends FAILED here (an event run has
        // already ended, in the statement); the claim goes on for the rest.
        let run = match Run::try_from(r) {
            Ok(run) => run,
            Err(e) => {
                tracing::error!(run = %id, tenant = %tenant, error = %e,
                    "claimed run's stored data cannot be read; it ends FAILED (reason \"corrupt\")");
                if kind == ClaimKind::Executed {
                    run_fail_unreadable(&mut tx, id, now, &e.to_string()).await?;
                }
                continue;
            }
        };
        let now = run.start_time.unwrap_or(now);
        let events = match kind {
            ClaimKind::Executed => vec![state_event(&run, seq, now, body.clone())],
            ClaimKind::Event => vec![
                state_event(&run, seq - 2, now, body.clone()),
                state_event(
                    &run,
                    seq - 1,
                    now,
                    EventBody::Fired {
                        params: run.params.clone(),
                    },
                ),
                state_event(&run, seq, now, done.clone()),
            ],
        };
        out.push((run, events));
    }
    announce(&mut tx, node_id, out.iter().flat_map(|(_, e)| e)).await?;
    tx.commit().await?;
    Ok(out)
}

/// Ends `RUNNING` run `id`, whose stored data cannot be read, `FAILED` with
/// reason [`REASON_CORRUPT`] and `error` (clipped), with its event.
async fn run_fail_unreadable(
    conn: &mut PgConnection,
    id: Uuid,
    now: DateTime<Utc>,
    error: &str,
) -> Result<(), Error> {
    let message = clip(&format!("stored run data cannot be read: {error}"), 500);
    sqlx::query!(
        r#"WITH f AS (
             UPDATE runs SET state = 'FAILED', end_time = GREATEST($2, start_time), reason = $4,
                             error_message = $3, lease_expires_at = NULL, last_seq = last_seq + 1
             WHERE id = $1 AND state = 'RUNNING'
             RETURNING id, last_seq, end_time, tenant_id, binding_id, definition)
           INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
           SELECT f.id, f.last_seq, f.end_time, f.tenant_id, f.binding_id, f.definition, 'state_changed',
                  jsonb_build_object('kind', 'state_changed', 'from', 'RUNNING', 'to', 'FAILED', 'reason', $4::text)
           FROM f"#,
        id,
        now,
        message,
        REASON_CORRUPT,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Least time between two [`run_analyze_after_burst`] of one process.
const ANALYZE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Refreshes the planner's statistics of `runs` (`ANALYZE`, a sample of the
/// table, no lock that blocks reads or writes) after a burst of inserts — a
/// large backfill — at most once per [`ANALYZE_EVERY`] in this process.
/// PostgreSQL advises it after bulk loads: until autovacuum gets to it
/// (its naptime is a minute), plans made from the old statistics take the
/// new QUEUED backlog for a handful of rows. Failures are logged.
pub async fn run_analyze_after_burst(pool: &sqlx::PgPool) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < ANALYZE_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
    }
    if let Err(e) = sqlx::raw_sql("ANALYZE runs").execute(pool).await {
        tracing::warn!(error = %e, "refreshing the statistics of runs failed");
    }
}

/// Takes the lock that serialises claims ([`run_claim`]) for the rest of the
/// caller's transaction. A transaction that stops a binding (pause, disable,
/// delete) holds it while it writes, so a claim either committed before
/// (its runs started before the stop returned) or takes its snapshot after
/// the stop committed and sees it: no run of a stopped binding starts after
/// the stop returned. Waits for a claim in progress (milliseconds).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_claim_lock(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query!("SELECT pg_advisory_xact_lock($1)", CLAIM_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

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

/// Which runs a claim takes (see [`run_claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// Runs executed by a task on the node (commands): one slot each.
    Executed,
    /// Runs of `event` handlers, completed by the claim statement.
    Event,
}

/// Advisory lock key serialising claims across nodes ("skedclai").
const CLAIM_LOCK: i64 = 0x736b_6564_636c_6169;

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
/// floored by [`run_claim`] on a node whose clock lags). Returns the run as
/// it now is, with its event.
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
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason FROM f"#,
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
        // A run of this binding may have been waiting for this one to end.
        notify_runs(&mut *conn).await?;
    }
    Ok(Some((run, ev)))
}

/// Ends up to `limit` `RUNNING` runs whose lease expired before `now` (their
/// node stopped heartbeating): `FAILED` with reason `node_lost`, or
/// `CANCELLED` with the pending cancel reason when a cancel was requested.
/// `FOR UPDATE SKIP LOCKED`, so reapers on several nodes never collide.
/// Returns the ended runs with their events (announced).
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
                    end_time = GREATEST($1, r.start_time), reason = coalesce(r.cancel_reason, 'node_lost'),
                    error_message = CASE WHEN r.cancel_reason IS NULL
                                         THEN 'node ' || coalesce(r.node_id, '?') || ' stopped renewing the run''s lease' END,
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
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason FROM f"#,
        now,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
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
) -> Result<Vec<RunEvent>, Error> {
    let body = EventBody::StateChanged {
        from: Some(RunState::Scheduled),
        to: RunState::Queued,
        reason: String::new(),
    };
    let gone = EventBody::StateChanged {
        from: Some(RunState::Scheduled),
        to: RunState::Cancelled,
        reason: REASON_BINDING_DELETED.to_string(),
    };
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
             RETURNING r.id, r.tenant_id, r.binding_id, r.definition, r.last_seq, x.gone),
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT f.id, f.last_seq, $1, f.tenant_id, f.binding_id, f.definition, 'state_changed',
                    CASE WHEN f.gone THEN $4::jsonb ELSE $3::jsonb END FROM f
             RETURNING run_id)
           SELECT id, tenant_id, binding_id, definition, last_seq, gone AS "gone!" FROM f"#,
        now,
        limit,
        encode(&body),
        encode(&gone),
        REASON_BINDING_DELETED,
    )
    .fetch_all(&mut *conn)
    .await?;
    let promoted = rows.iter().any(|r| !r.gone);
    let events: Vec<RunEvent> = rows
        .into_iter()
        .map(|r| RunEvent {
            run_id: r.id,
            seq: r.last_seq,
            time: now,
            tenant_id: r.tenant_id,
            binding_id: r.binding_id,
            definition: r.definition,
            body: if r.gone { gone.clone() } else { body.clone() },
        })
        .collect();
    if !events.is_empty() {
        announce(&mut *conn, node_id, &events).await?;
    }
    if promoted {
        notify_runs(&mut *conn).await?;
    }
    Ok(events)
}

/// Cancels those of `ids` that are still waiting (`SCHEDULED` or `QUEUED`):
/// `CANCELLED` at once with `reason`, events written and announced. Runs in
/// any other state are left alone. The caller has checked access.
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
    announce(&mut *conn, node_id, &events).await?;
    Ok(events)
}

/// Requests the cancel of those of `ids` that are `RUNNING` (and have no
/// cancel pending): records `reason` and tells every node on
/// [`super::CHANNEL_CANCEL`] (payload: `<run id>|<reason>`). The node executing the
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
           SELECT id AS "id!" FROM f, pg_notify('sked_cancel', f.id::text || '|' || $2)"#,
        ids,
        reason,
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

/// An active run of a binding, for overlap decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRun {
    /// Binding.
    pub binding_id: Uuid,
    /// Run.
    pub id: Uuid,
    /// `SCHEDULED` (retries only), `QUEUED` or `RUNNING`.
    pub state: RunState,
}

/// Whether a binding has active runs, for overlap decisions: a `RUNNING`
/// one, and a waiting one (`QUEUED`, or a `SCHEDULED` retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveState {
    /// Binding.
    pub binding_id: Uuid,
    /// It has a `RUNNING` run.
    pub running: bool,
    /// It has a `QUEUED` run or a `SCHEDULED` retry.
    pub waiting: bool,
}

/// [`ActiveState`] of each of `bindings` (one row each, in no order): two
/// index probes per binding (`runs_active_state`), so the cost does not grow
/// with a binding's backlog (a backfill of thousands of queued runs).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_active_state(
    db: impl PgExecutor<'_>,
    bindings: &[Uuid],
) -> Result<Vec<ActiveState>, Error> {
    Ok(sqlx::query!(
        // One probe per binding for the usual answer (nothing active), two
        // or three more only for a binding that has active runs. Scalar
        // LIMIT 1 subqueries, not EXISTS: the planner may run an EXISTS as
        // one hashed scan of every QUEUED run, which statistics gone stale
        // after a backfill make look cheap (measured: 35 000 rows a pass).
        r#"SELECT b AS "binding_id!",
                  CASE WHEN a.state IS NULL THEN false
                       ELSE (SELECT 1 FROM runs WHERE binding_id = b AND state = 'RUNNING' LIMIT 1) IS NOT NULL
                  END AS "running!",
                  CASE WHEN a.state IS NULL THEN false
                       ELSE (SELECT 1 FROM runs WHERE binding_id = b AND state = 'QUEUED' LIMIT 1) IS NOT NULL
                            OR (SELECT 1 FROM runs WHERE binding_id = b AND state = 'SCHEDULED'
                                                     AND trigger = 'RETRY' LIMIT 1) IS NOT NULL
                  END AS "waiting!"
           FROM unnest($1::uuid[]) AS b
           LEFT JOIN LATERAL (SELECT state FROM runs
                              WHERE binding_id = b AND state IN ('SCHEDULED', 'QUEUED', 'RUNNING')
                              LIMIT 1) a ON true"#,
        bindings
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| ActiveState {
        binding_id: r.binding_id,
        running: r.running,
        waiting: r.waiting,
    })
    .collect())
}

/// The active runs of `bindings`: `QUEUED`, `RUNNING`, and `SCHEDULED`
/// retries (a retry waiting out its backoff is still the same execution; a
/// delayed manual trigger is not counted).
/// Reads every one of them: for `CANCEL_PREVIOUS`, which cancels them all
/// (elsewhere [`run_active_state`] is enough).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_list_active(
    db: impl PgExecutor<'_>,
    bindings: &[Uuid],
) -> Result<Vec<ActiveRun>, Error> {
    sqlx::query!(
        "SELECT binding_id, id, state FROM runs
         WHERE binding_id = ANY($1) AND state IN ('SCHEDULED', 'QUEUED', 'RUNNING')
           AND (state <> 'SCHEDULED' OR trigger = 'RETRY')
         ORDER BY id",
        bindings
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| {
        Ok(ActiveRun {
            binding_id: r.binding_id,
            id: r.id,
            state: RunState::parse(&r.state).ok_or_else(|| corrupt_state(&r.state))?,
        })
    })
    .collect()
}

/// The earliest instant a waiting run becomes claimable after `now`: the
/// first `SCHEDULED` run's `not_before`, or a jittered `QUEUED` run's.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_next_due_time(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(sqlx::query_scalar!(
        "SELECT least((SELECT min(not_before) FROM runs WHERE state = 'SCHEDULED'),
                      (SELECT min(not_before) FROM runs WHERE state = 'QUEUED' AND not_before > $1))",
        now
    )
    .fetch_one(db)
    .await?)
}

/// The run a TriggerRun with `key` for `binding_id` created at or after
/// `since`, if any (the first one).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_find_by_idempotency_key(
    db: impl PgExecutor<'_>,
    binding_id: Uuid,
    key: &str,
    since: DateTime<Utc>,
) -> Result<Option<Uuid>, Error> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM runs WHERE binding_id = $1 AND idempotency_key = $2 AND create_time >= $3
         ORDER BY create_time, id LIMIT 1",
        binding_id,
        key,
        since
    )
    .fetch_optional(db)
    .await?)
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
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason
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
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason
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
