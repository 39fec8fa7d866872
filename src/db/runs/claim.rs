//! Claiming runs: [`run_claim`], the one statement that picks due `QUEUED`
//! runs in fair-share order and starts them; [`run_claim_lock`], which orders
//! claims with the calls that stop bindings; [`run_stop_lock`] and
//! [`run_stop_lock_shared`], which order other starts with them; [`ClaimKind`]; and
//! [`run_analyze_after_burst`], which keeps the claim's plans right after a
//! large backfill.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{RunRow, announce, state_event};
use crate::db::{Error, clip, encode};
use crate::domain::RunReason;
use crate::domain::{EventBody, Run, RunEvent, RunState};

/// Claims up to `limit` due `QUEUED` runs (`not_before <= now`) for
/// `node_id`, in fair-share order: highest priority first; then round-robin
/// across tenants (each tenant's claimable runs are ranked by priority,
/// `not_before` and id, and rank 1 of every tenant goes before rank 2 of any, ties
/// going to the tenant served least recently per `tenant_claims`, never
/// served first), so a tenant with thousands of queued runs cannot starve
/// one with a single run; then earliest `not_before`, then id. A run whose
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
/// announces them (a [`ClaimKind::Worker`] claim leaves that to its
/// caller, after the commit: [`super::Announce::events`]). Returns each
/// claimed run with that event. The start time
/// is `now` (read from `clock` once the claim lock is held), but never
/// before the end time of a run whose slot it takes: any run of its tenant
/// when the tenant has a concurrency quota, else any run of its binding.
/// Only runs that ended after `now` can matter (a finish that committed
/// between the clock read and the statement's snapshot, or a node whose
/// clock is ahead); they are read through the `runs_ended_tenant` index. So start
/// times follow the slot's previous end whatever the nodes' clocks say.
/// Nor before the run's own `create_time` (a run created after the clock
/// read and committed before the statement's snapshot).
///
/// Cost: a claim reads O(tenants with queued runs × `limit`) runs at most,
/// however long the queue, and none of another kind or worker queue (a
/// claim of commands reads no worker run, a claim of queue `a` no run of
/// queue `b`: the claim indexes split by both). Per tenant, its first k due `ALLOW` runs, k =
/// ⌈`limit` / tenants⌉ + 1 (all `limit` for a tenant with a concurrency
/// quota, or when k would not be less): a fair pick takes about `limit` /
/// tenants of each, and reading `limit` of each was more than half of a
/// worker claim's time at 10 tenants (`EXPLAIN ANALYZE`, 200 picked of
/// 2 000 read: 17 ms against 7 ms for one tenant). The pick from that read
/// is the pick from a full one unless it took the k-th run of a tenant
/// with more: every unread run of that tenant ranks after its k-th (lower
/// priority, or equal and a later turn), so if the k-th was not picked none
/// of them would be, and what ranks before it is the same in both reads.
/// When it was, those tenants are read to `limit` and the pick made again
/// in the same statement (a second read of more tenants cannot make an
/// unpicked run picked: it only adds runs ahead of it). And for
/// the other policies the first due run of each of its bindings with queued
/// non-`ALLOW` runs when it has at most 100 such bindings, else its first
/// 2 × `limit` due non-`ALLOW` runs, falling back to every such binding's
/// first run when those hold fewer than `limit` claimable ones (a few
/// bindings' deep backlog).
///
/// `kind` splits the queue: [`ClaimKind::ToExecute`] claims runs that need a
/// task on this node (commands), up to its free slots;
/// [`ClaimKind::Worker`] the runs of one worker queue, for a worker stream's
/// free slots (fair share, priority, quotas and overlap rules alike);
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
/// [`Error::Duplicate`] (`runs_one_running`) when another node claimed a
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
) -> Result<Vec<Claimed>, Error> {
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
    // Event claims take their shard's lock instead (EVENT_SHARDS): their
    // runs hold no slot, so they need not wait for the others, and shards
    // share no tenant (nor, so, a workflow run their steps advance).
    // Bitmap scans are off for the claim: the per-tenant reads below must
    // walk an index in claim order and stop after `limit` rows, and the
    // planner, estimating every tenant at the average size, would
    // otherwise read a large tenant's whole backlog and sort it. JIT is
    // off too: the statement runs in milliseconds, and JIT compiles anew on
    // every execution whose estimated cost passes jit_above_cost (about 1 s
    // of the former claim's 1.6 s at 130 000 queued runs). Sequential
    // scans are off as well: the claim's plan is generic (cached per
    // connection), and one made while `runs` was small (a new installation,
    // the first minute before autovacuum's first ANALYZE) locked the picked
    // runs by reading the whole table, for as long as the connection lived
    // (measured: 0.4 ms at 2 000 runs, 2.3 ms at 30 000, half of each
    // claim; the pick is at most `limit` ids, found by primary key).
    // And every statement of the claim's transaction is planned once per
    // connection: the worker claim's read of the lease tokens it minted
    // was otherwise planned anew on every call (`pg_stat_statements`:
    // plans = calls), and so was the claim itself on each connection's
    // first five calls.
    let (lock, shard) = match kind {
        ClaimKind::Event { shard } => {
            debug_assert!(shard < EVENT_SHARDS, "event shard out of range");
            (EVENT_LOCK + i64::from(shard), Some(shard as i32))
        }
        _ => (CLAIM_LOCK, None),
    };
    // All of it sent with the BEGIN, one simple query: a round trip less
    // per claim, and the claims' round trips are the dispatch latency.
    // `lock` is one of this module's constants, never input.
    let mut tx =
        sqlx::Connection::begin_with(&mut *conn, sqlx::AssertSqlSafe(claim_begin(lock))).await?;
    // Read after the lock. This alone would not keep a start after the end
    // of the run whose slot it takes: a finish may read its clock after
    // this and commit before the statement below takes its snapshot, and
    // another node's clock may be ahead. So the statement floors each start
    // time at those runs' end times (`late`, `starts`).
    let now = clock.now();
    // Worker claims take only their queue's runs (and only one tenant's
    // when asked); the others take no worker run (a NULL queue).
    let (queue, only_tenant, worker_names) = match &kind {
        ClaimKind::Worker {
            queue,
            tenant,
            worker_names,
        } => (
            Some(queue.as_str()),
            tenant.as_deref(),
            worker_names.as_slice(),
        ),
        _ => (None, None, &[][..]),
    };
    let is_event = matches!(kind, ClaimKind::Event { .. });
    let limit = match queue {
        Some(_) => limit.min(worker_names.len() as i64),
        None => limit,
    };
    let rows = sqlx::query_as!(
        RunRow,
        r#"WITH RECURSIVE
           -- Candidates, per tenant: at most $4 of its runs can be claimed
           -- and they are its first $4 claimable ones in (priority DESC,
           -- not_before, id) order, so only those are read (indexes in
           -- migrations 20261121000006 and 20261211000100: by tenant or
           -- binding, handler kind and worker queue), never the whole
           -- backlog, nor another queue's.
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
           -- An event claim takes only its shard's tenants ($12 of $13).
           open_tenants AS (
             SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL AND tenant_id <> ALL($8::text[])
                                           AND ($10::text IS NULL OR tenant_id = $10)
                                           AND ($12::int4 IS NULL
                                                OR mod(abs(hashtext(tenant_id)::int8), $13::int8) = $12)),
           -- ALLOW runs: each tenant's first k due ones of the kind, k =
           -- ceil($4 / tenants) + 1 (a fair pick takes about $4 / tenants
           -- of each), one more read to know whether there were more; all
           -- $4 of a tenant with a concurrency quota (its `over` marks) or
           -- when k would not be less. A tenant read short whose k-th run
           -- the pick then takes (`edge`, `short`) is read again to $4 and
           -- the pick made again (`more`, `pick2`): exact either way, see
           -- run_claim's docs.
           depth AS MATERIALIZED (
             SELECT least($4::int8, ceil($4::int8::numeric / greatest(count(*), 1))::int8 + 1) AS k FROM open_tenants),
           read_to AS MATERIALIZED (
             SELECT t.tenant_id,
                    (d.k >= $4 OR EXISTS (SELECT 1 FROM tenant_quotas tq
                                          WHERE tq.tenant_id = t.tenant_id
                                            AND tq.max_concurrent_runs IS NOT NULL)) AS whole,
                    d.k
             FROM open_tenants t CROSS JOIN depth d),
           allowed_read AS (
             SELECT a.*, row_number() OVER (PARTITION BY a.tenant_id
                                            ORDER BY a.priority DESC, a.not_before, a.id) AS rn, t.whole, t.k
             FROM read_to t CROSS JOIN LATERAL (
               SELECT q.id, q.tenant_id, q.priority, q.not_before, q.throttled
               FROM runs q
               WHERE q.tenant_id = t.tenant_id AND q.state = 'QUEUED'
                 AND (q.handler->>'kind' = 'event')::int = $6::boolean::int
                 AND coalesce(q.handler->>'queue', '') = coalesce($9::text, '')
                 AND (q.overlap_policy = 'ALLOW')::int = 1 AND q.not_before <= $1
                 AND (q.manual OR q.binding_id NOT IN (SELECT id FROM held_back))
                 AND q.definition NOT IN (SELECT name FROM off_defs)
               ORDER BY q.priority DESC, q.not_before, q.id
               LIMIT CASE WHEN t.whole THEN $4 ELSE t.k + 1 END) a),
           allowed AS (
             SELECT id, tenant_id, priority, not_before, throttled FROM allowed_read WHERE whole OR rn <= k),
           edge AS (
             SELECT a.id, a.tenant_id, a.k FROM allowed_read a
             WHERE NOT a.whole AND a.rn = a.k
               AND EXISTS (SELECT 1 FROM allowed_read b WHERE b.tenant_id = a.tenant_id AND b.rn = a.k + 1)),
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
                 AND coalesce(q.handler->>'queue', '') = coalesce($9::text, '')
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
                             AND (y.handler->>'kind' = 'event')::int = $6::boolean::int
                             AND coalesce(y.handler->>'queue', '') = coalesce($9::text, '') AND y.not_before <= $1
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
                 AND (y.handler->>'kind' = 'event')::int = $6::boolean::int
                             AND coalesce(y.handler->>'queue', '') = coalesce($9::text, '') AND y.not_before <= $1
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
           -- A RUNNING workflow run executes nothing (its steps count), so
           -- a quota of 1 cannot deadlock it (migration 20261205000200).
           room AS MATERIALIZED (
             SELECT tq.tenant_id,
                    tq.max_concurrent_runs - (SELECT count(*) FROM runs r
                                              WHERE r.tenant_id = tq.tenant_id AND r.state = 'RUNNING'
                                                AND (r.handler->>'kind') IS DISTINCT FROM 'workflow') AS room
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
           -- A short-read tenant whose k-th run was picked: its runs past
           -- the k-th could rank before others picked. Read to $4 and pick
           -- again (only then: an uncorrelated test gates the branch).
           short AS MATERIALIZED (
             SELECT e.tenant_id, e.k FROM edge e WHERE e.id IN (SELECT id FROM pick)),
           more AS (
             SELECT a.* FROM short t CROSS JOIN LATERAL (
               SELECT q.id, q.tenant_id, q.priority, q.not_before, q.throttled
               FROM runs q
               WHERE q.tenant_id = t.tenant_id AND q.state = 'QUEUED'
                 AND (q.handler->>'kind' = 'event')::int = $6::boolean::int
                 AND coalesce(q.handler->>'queue', '') = coalesce($9::text, '')
                 AND (q.overlap_policy = 'ALLOW')::int = 1 AND q.not_before <= $1
                 AND (q.manual OR q.binding_id NOT IN (SELECT id FROM held_back))
                 AND q.definition NOT IN (SELECT name FROM off_defs)
               ORDER BY q.priority DESC, q.not_before, q.id
               OFFSET t.k LIMIT $4 - t.k) a),
           ranked2 AS (
             SELECT p.id, p.tenant_id, p.priority, p.tn, p.not_before,
                    (rm.room IS NOT NULL AND p.tn > rm.room) AS over
             FROM (SELECT c.*, row_number() OVER (PARTITION BY c.tenant_id
                                                  ORDER BY c.priority DESC, c.not_before, c.id) AS tn
                   FROM (SELECT * FROM cand UNION ALL SELECT * FROM more) c) p
             LEFT JOIN room rm ON rm.tenant_id = p.tenant_id),
           pick2 AS (
             SELECT r.id FROM ranked2 r LEFT JOIN tenant_claims tc ON tc.tenant_id = r.tenant_id
             WHERE NOT r.over
             ORDER BY r.priority DESC, r.tn, tc.last_claim_time NULLS FIRST, r.not_before, r.id
             LIMIT $4),
           picked AS (
             SELECT id FROM pick WHERE NOT EXISTS (SELECT 1 FROM short)
             UNION ALL
             SELECT id FROM pick2 WHERE EXISTS (SELECT 1 FROM short)),
           -- By primary key, one probe per picked run. Written so that no
           -- plan can do otherwise, even one made from statistics gone
           -- stale after a large backfill (which once read the whole queue
           -- here): an array, not a join, and the state test in a form no
           -- partial index on QUEUED runs matches.
           locked AS (
             SELECT id, tenant_id, binding_id FROM runs
             WHERE id = ANY(ARRAY(SELECT id FROM picked)) AND state IS NOT DISTINCT FROM 'QUEUED'
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
             SELECT l.id, row_number() OVER () AS k, GREATEST($1, (SELECT x.end_time FROM runs x
                                        WHERE x.tenant_id = l.tenant_id AND x.end_time > $1
                                          AND x.start_time IS NOT NULL AND x.end_time IS NOT NULL
                                          AND (x.binding_id = l.binding_id
                                               OR l.tenant_id IN (SELECT tenant_id FROM room))
                                        ORDER BY x.tenant_id, x.end_time DESC LIMIT 1)) AS t
             FROM locked l),
           throttle AS (
             UPDATE runs SET throttled = true
             WHERE id IN (SELECT id FROM ranked WHERE over AND NOT throttled)),
           -- Never before the run was created either: the clock was read
           -- before this statement's snapshot, which may hold a run
           -- created (and committed) after that.
           c AS (
             UPDATE runs SET state = CASE WHEN $6 THEN 'SUCCEEDED' ELSE 'RUNNING' END,
                             start_time = GREATEST(s.t, runs.create_time),
                             end_time = CASE WHEN $6 THEN GREATEST(s.t, runs.create_time) END,
                             node_id = $2,
                             lease_token = CASE WHEN $9::text IS NULL THEN NULL ELSE gen_random_uuid() END,
                             worker_name = ($11::text[])[s.k],
                             lease_expires_at = CASE WHEN $6 THEN NULL ELSE s.t + ($3::timestamptz - $1) END,
                             last_seq = last_seq + CASE WHEN $6 THEN 3 ELSE 1 END
             FROM starts s WHERE runs.id = s.id
             RETURNING runs.*),
           -- When each tenant was served last, for the round robin. A hint,
           -- so a row another claim holds (an event shard's and the slot
           -- claim may serve one tenant at once, and each holds its rows
           -- until its commit) is left to that claim: no claim waits here.
           served AS (
             UPDATE tenant_claims SET last_claim_time = $1
             WHERE tenant_id IN (SELECT t.tenant_id FROM tenant_claims t
                                 WHERE t.tenant_id IN (SELECT tenant_id FROM c)
                                 FOR UPDATE SKIP LOCKED)),
           -- Tenants first, then one probe each (a probe per claimed run
           -- was 600 buffer reads of a 300-run claim).
           served_first AS (
             INSERT INTO tenant_claims (tenant_id, last_claim_time)
             SELECT n.tenant_id, $1::timestamptz FROM (SELECT DISTINCT c.tenant_id FROM c) n
             WHERE NOT EXISTS (SELECT 1 FROM tenant_claims t WHERE t.tenant_id = n.tenant_id)
             ON CONFLICT (tenant_id) DO NOTHING),
           -- An event run's three events (RUNNING, fired, SUCCEEDED) take
           -- one batch row keyed by the last seq (db::events::BATCH_KIND).
           e AS (
             INSERT INTO run_events (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
             SELECT c.id, c.last_seq, c.start_time, c.tenant_id, c.binding_id, c.definition,
                    CASE WHEN $6 THEN 'batch' ELSE 'state_changed' END,
                    CASE WHEN $6 THEN jsonb_build_array($5::jsonb,
                                                        jsonb_build_object('kind', 'fired', 'params', c.params),
                                                        $7::jsonb)
                         ELSE $5::jsonb END
             FROM c
             RETURNING run_id),
           -- Event runs end here, SUCCEEDED (other claims end none).
           ended AS (
             SELECT c.id, c.tenant_id, c.binding_id, c.definition, c.state, c.scheduled_time, c.start_time,
                    c.end_time, false AS final_failure
             FROM c WHERE c.end_time IS NOT NULL),
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
           SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
           FROM c"#,
        now,
        node_id,
        now + lease,
        limit,
        encode(&body),
        is_event,
        encode(&done),
        excluded,
        queue,
        only_tenant,
        worker_names,
        shard,
        i64::from(EVENT_SHARDS),
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
                if !is_event {
                    run_fail_unreadable(&mut tx, id, now, &e.to_string()).await?;
                }
                continue;
            }
        };
        let now = run.start_time.unwrap_or(now);
        let events = match kind {
            ClaimKind::ToExecute | ClaimKind::Worker { .. } => {
                vec![state_event(&run, seq, now, body.clone())]
            }
            ClaimKind::Event { .. } => vec![
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
    // A worker's runs carry the lease token minted above, and the name of
    // the worker they were claimed for. Their events are announced by the
    // caller after the commit (`Announce::events`, an `Announcer`): a
    // notifying commit holds PostgreSQL's notification lock through its
    // WAL flush, and worker completions commit behind it.
    let mut tokens = std::collections::HashMap::new();
    if queue.is_some() {
        if !out.is_empty() {
            let ids: Vec<Uuid> = out.iter().map(|(r, _)| r.id).collect();
            for r in sqlx::query!(
                r#"SELECT id, lease_token AS "lease_token!", worker_name FROM runs
                   WHERE id = ANY($1) AND lease_token IS NOT NULL"#,
                &ids,
            )
            .fetch_all(&mut *tx)
            .await?
            {
                tokens.insert(r.id, (r.lease_token, r.worker_name));
            }
        }
    } else {
        announce(&mut tx, node_id, out.iter().flat_map(|(_, e)| e)).await?;
    }
    tx.commit().await?;
    Ok(out
        .into_iter()
        .map(|(run, events)| {
            let (lease_token, worker_name) = tokens.remove(&run.id).unzip();
            Claimed {
                lease_token,
                worker_name: worker_name.flatten(),
                run,
                events,
            }
        })
        .collect())
}

/// The `BEGIN` of a claim's transaction: takes advisory lock `lock` and
/// sets the planner settings the claim needs (see [`run_claim`]).
fn claim_begin(lock: i64) -> String {
    format!(
        "BEGIN; SELECT pg_advisory_xact_lock({lock}); SET LOCAL enable_bitmapscan = off; \
         SET LOCAL enable_seqscan = off; SET LOCAL jit = off; \
         SET LOCAL plan_cache_mode = force_generic_plan"
    )
}

/// One run a claim took ([`run_claim`]).
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The run, now `RUNNING` (or `SUCCEEDED` for an `event` handler).
    pub run: Run,
    /// Its events, announced on commit.
    pub events: Vec<RunEvent>,
    /// The lease's fencing token, for [`ClaimKind::Worker`] claims only.
    pub lease_token: Option<Uuid>,
    /// The worker it was claimed for (one of the claim's `worker_names`),
    /// for [`ClaimKind::Worker`] claims only.
    pub worker_name: Option<String>,
}

/// Ends `RUNNING` run `id`, whose stored data cannot be read, `FAILED` with
/// reason [`RunReason::Corrupt`] and `error` (clipped), with its event.
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
        RunReason::Corrupt.as_str(),
    )
    .execute(&mut *conn)
    .await?;
    super::run_end_record(&mut *conn, &[(id, false)]).await
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
    // Every claim's lock, in one order (a claim holds one of them at most,
    // so no two transactions wait on each other here).
    let keys: Vec<i64> = std::iter::once(CLAIM_LOCK)
        .chain((0..EVENT_SHARDS).map(|s| EVENT_LOCK + i64::from(s)))
        .collect();
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) WITH ORDINALITY AS l(k, i) ORDER BY i",
        &keys
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Takes the stop lock of `stopped` (exclusive) for the rest of the
/// caller's transaction, which pauses or disables it: it waits for the
/// transactions that decided to start runs of it outside a claim
/// ([`run_stop_lock_shared`]), and later ones wait for its commit and then
/// see the stop. Take it before [`run_claim_lock`], so that claims are not
/// held up while it waits. (Deletes need none: they lock the binding's row,
/// which those transactions hold `FOR KEY SHARE`.)
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_stop_lock(conn: &mut PgConnection, stopped: Stopped<'_>) -> Result<(), Error> {
    let (space, key) = match stopped {
        Stopped::Binding(id) => (STOP_BINDING_LOCK, id.to_string()),
        Stopped::Definition(name) => (STOP_DEFINITION_LOCK, name.to_string()),
    };
    sqlx::query!("SELECT pg_advisory_xact_lock($1, hashtext($2))", space, key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes the stop locks of binding `binding` and of its definition
/// `definition` shared, for the rest of the caller's transaction, which
/// starts runs of the binding without a claim (BackfillRuns completing
/// event runs): take them before reading whether the binding may start
/// runs. A pause or disable ([`run_stop_lock`]) then either committed
/// before the read and is seen, or waits for the caller's commit: no run
/// of a stopped binding starts after the stop returned. Shared holders do
/// not wait for each other, and the lock queue is fair, so a stream of
/// them does not starve a stop; a stop of one binding or definition waits
/// only for the starts of its own runs. Take them after the binding's row
/// lock (a definition's stop holds the row locks of its bindings while it
/// waits here).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_stop_lock_shared(
    conn: &mut PgConnection,
    binding: Uuid,
    definition: &str,
) -> Result<(), Error> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock_shared($1, hashtext($2)), pg_advisory_xact_lock_shared($3, hashtext($4))",
        STOP_DEFINITION_LOCK,
        definition,
        STOP_BINDING_LOCK,
        binding.to_string()
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Which runs a claim takes (see [`run_claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimKind {
    /// Runs this node still has to execute in a task of its own (commands):
    /// one slot each. Never a worker run.
    ToExecute,
    /// Runs of `worker` handlers of `queue` (of `tenant` only, when set),
    /// for the free slots of worker streams on this node: each gets a fresh
    /// lease token ([`Claimed::lease_token`]) and the name of the worker it
    /// is for ([`Claimed::worker_name`]).
    Worker {
        /// The handler's queue.
        queue: String,
        /// Only this tenant's runs (a tenant key's worker).
        tenant: Option<String>,
        /// Whom the runs are claimed for: one worker name per slot, in the
        /// order slots are filled (the claim's k-th run is stored with the
        /// k-th name, and [`Claimed::worker_name`] says which). The claim
        /// takes at most `limit` runs, and `limit` is at most this many.
        worker_names: Vec<String>,
    },
    /// Runs of `event` handlers, completed by the claim statement: those
    /// of the tenants of `shard` (0 ≤ shard < [`EVENT_SHARDS`]; taken
    /// modulo it).
    Event {
        /// Which tenants: those whose `hashtext(tenant_id)` is `shard`
        /// modulo [`EVENT_SHARDS`].
        shard: u32,
    },
}

/// Advisory lock key serialising claims across nodes ("skedclai").
const CLAIM_LOCK: i64 = 0x736b_6564_636c_6169;

/// Event claims run in this many shards at once, on every node: shard `i`
/// completes the event runs of the tenants whose `hashtext(tenant_id)` is
/// `i` modulo this, under a lock of its own (key [`EVENT_LOCK`] + `i`)
/// instead of [`CLAIM_LOCK`]. Event runs hold no slot (they end in their
/// claim), so they need not wait for the claims that count slots, and two
/// shards share no tenant, hence no workflow run whose steps both end: the
/// workflows they advance at commit are disjoint. Stops take every lock
/// ([`run_claim_lock`]).
///
/// Two: a workflow's next event step waits for one claim round of its
/// shard only. Two claims of 1 000 event runs back to back on a two-core
/// machine once delayed the scheduler's firing passes past the 5 s
/// misfire grace during a backfill drain
/// (`probe::backfills_of_one_tenant_do_not_starve_another_tenants_schedule`),
/// so a loop whose claim was full pauses as long as it took
/// (`crate::executor`): a backlog drains at about one core's worth.
pub const EVENT_SHARDS: u32 = 2;

/// First advisory lock key of the event claim shards ("skedclai" + 1 + shard).
const EVENT_LOCK: i64 = CLAIM_LOCK + 1;

/// First key (the namespace) of the two-key advisory locks that order the
/// stop of one binding with the writers that start its runs outside a
/// claim ("skb1"); the second key is `hashtext` of the binding id. A hash
/// collision only makes two bindings' stops and starts wait for each other.
const STOP_BINDING_LOCK: i32 = 0x736b_6231;

/// As [`STOP_BINDING_LOCK`], for the stop of a definition ("skd1"; the
/// second key is `hashtext` of its name).
const STOP_DEFINITION_LOCK: i32 = 0x736b_6431;

/// What a stop stops, for [`run_stop_lock`].
#[derive(Debug, Clone, Copy)]
pub enum Stopped<'a> {
    /// A binding paused or disabled (its id).
    Binding(Uuid),
    /// A definition disabled (its name).
    Definition(&'a str),
}

/// Least time between two [`run_analyze_after_burst`] of one process.
const ANALYZE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Refreshes the planner's statistics of `runs` (`ANALYZE`, a sample of the
/// table, no lock that blocks reads or writes) after a burst of inserts — a
/// large backfill — at most once per `ANALYZE_EVERY` (10 s) in this process.
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
