//! Run-end bookkeeping: each binding's status (`binding_status`: last
//! run, last success and final failure, final failures in a row) and its
//! hourly run statistics (`run_stats`: one row per binding and hour of
//! `scheduled_time`), migration `20261203000100_run_outcomes.sql`; kept by
//! the statements that end runs and read by GetBinding, ListBindings and
//! GetRunStats. The statistics are fed through `run_stats_delta` (one
//! appended row per ended run, migration `20261205000300`), which every
//! node moves into `run_stats` every 5 s ([`run_stats_delta_fold`]).
//!
//! Every statement that ends runs carries the same CTEs (between the
//! markers `-- run-end bookkeeping {` and `-- } run-end bookkeeping`; a test
//! keeps the copies equal): set-based, one upsert per table per statement,
//! rows locked in key order. The statements that end event runs by the
//! thousand carry it inline: [`run_insert`](super::run_insert) (runs written
//! `SUCCEEDED` or `SKIPPED`), [`run_claim`](super::run_claim) of event runs
//! and [`run_complete_by_leases`](super::run_complete_by_leases). The others
//! ([`run_finish`](super::run_finish), [`run_reap`](super::run_reap),
//! [`run_fail_no_worker`](super::run_fail_no_worker)) leave it to their
//! caller, which calls [`run_end_record`] in the same transaction once it
//! has written the retries: only then is it known whether a failure is
//! final. [`run_cancel_waiting`](super::run_cancel_waiting),
//! [`run_promote_due`](super::run_promote_due) and the claim's unreadable
//! runs call it themselves.
//!
//! Cost: the status upsert is one row update per binding per statement;
//! the statistics cost one narrow unindexed insert per run here, and one
//! row update per binding and hour per delta fold (not per run end). The
//! statistics used to be upserted here too, which cost about a quarter of
//! the scheduler's firing statement (the fire benchmark fell behind at
//! 10 000 fires/s). Keeping the newest hour's statistics in
//! the status row (one row update per run end instead of two) was tried
//! and measured slower than two narrow upserts.
//!
//! `run_stats` is the statistics' inbox: the maintenance leader folds rows
//! of past hours into `run_stats_binding` and `run_stats_rollup`
//! ([`run_stats_fold`], migration `20261204000300_run_stats_daily.sql`),
//! which GetRunStats reads together with the inbox ([`run_stats_hours`]),
//! so a tenant's month is a few hundred rows however many bindings it has.
//! The fold leaves the delta fold as it was; it only turns the first delta
//! fold of a binding in an hour after a fold into an insert.
//!
//! A deleted binding's status row stays (a run may still end after the
//! delete); the status is only read through `bindings`, and the statistics
//! are history, as the runs are.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::db::Error;
use crate::domain::stats::{HourlyStats, StateCounts};

/// Records the end of runs `ended` (run id, and whether a retry of it was
/// written): their bindings' status and hourly statistics. Call once per
/// ended run, in the transaction that ended it, after its retry (if any)
/// was written; runs that have not ended are ignored. One statement.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_end_record(conn: &mut PgConnection, ended: &[(Uuid, bool)]) -> Result<(), Error> {
    if ended.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = ended.iter().map(|(id, _)| *id).collect();
    let retried: Vec<bool> = ended.iter().map(|(_, r)| *r).collect();
    sqlx::query!(
        r#"WITH ended AS (
             SELECT r.id, r.tenant_id, r.binding_id, r.definition, r.state, r.scheduled_time, r.start_time,
                    r.end_time, r.state IN ('FAILED', 'TIMED_OUT') AND NOT i.retried AS final_failure
             FROM UNNEST($1::uuid[], $2::bool[]) AS i(id, retried) JOIN runs r ON r.id = i.id
             WHERE r.end_time IS NOT NULL
               AND r.state IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')),
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
           SELECT count(*) AS "n!" FROM ended"#,
        &ids,
        &retried,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(())
}

/// Whose runs [`run_stats_hours`] reads.
#[derive(Debug, Clone, Copy)]
pub enum StatsScope<'a> {
    /// One binding of one tenant.
    Binding {
        /// The tenant (a binding of another reads as empty).
        tenant: &'a str,
        /// The binding.
        id: Uuid,
    },
    /// Every binding of a tenant (deleted ones included).
    Tenant(&'a str),
    /// Every binding of a definition, of one tenant or of all.
    Definition {
        /// The definition.
        name: &'a str,
        /// Only this tenant's, when set.
        tenant: Option<&'a str>,
    },
}

struct HourRow {
    hour: DateTime<Utc>,
    succeeded: i32,
    failed: i32,
    timed_out: i32,
    cancelled: i32,
    skipped: i32,
    started: i32,
    duration_sum_us: f64,
    duration_max_us: i64,
    lag_max_us: i64,
    lag_hist: Vec<i32>,
    duration_hist: Vec<i32>,
}

impl From<HourRow> for HourlyStats {
    fn from(r: HourRow) -> Self {
        let n = |v: i32| u64::try_from(v).unwrap_or(0);
        HourlyStats {
            hour: r.hour,
            counts: StateCounts {
                succeeded: n(r.succeeded),
                failed: n(r.failed),
                timed_out: n(r.timed_out),
                cancelled: n(r.cancelled),
                skipped: n(r.skipped),
            },
            started: n(r.started),
            duration_sum_us: r.duration_sum_us,
            duration_max_us: r.duration_max_us,
            lag_max_us: r.lag_max_us,
            lag_hist: r.lag_hist,
            duration_hist: r.duration_hist,
        }
    }
}

/// The hourly statistics rows of `scope` with `start <= hour < end`, in no
/// particular order, at most `limit`: the folded rows of the scope
/// (`run_stats_rollup` for a tenant or a definition, one per hour;
/// `run_stats_binding` for a binding) and its inbox rows not folded yet
/// (`run_stats`, one per binding and hour; migration
/// `20261204000300_run_stats_daily.sql`). One statement, so a fold
/// committing meanwhile is seen wholly or not at all. An hour may appear in
/// several rows; their sum is the hour's. Cost: two index ranges, O(hours +
/// inbox rows of the scope).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_stats_hours(
    db: impl PgExecutor<'_>,
    scope: StatsScope<'_>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<HourlyStats>, Error> {
    // One statement per scope, so each is planned on its own indexes.
    let rows = match scope {
        StatsScope::Binding { tenant, id } => {
            sqlx::query_as!(
                HourRow,
                r#"SELECT hour AS "hour!", succeeded AS "succeeded!", failed AS "failed!",
                          timed_out AS "timed_out!", cancelled AS "cancelled!", skipped AS "skipped!",
                          started AS "started!", duration_sum_us AS "duration_sum_us!",
                          duration_max_us AS "duration_max_us!", lag_max_us AS "lag_max_us!",
                          lag_hist AS "lag_hist!", duration_hist AS "duration_hist!"
                   FROM (SELECT hour, succeeded, failed, timed_out, cancelled, skipped, started, duration_sum_us,
                                duration_max_us, lag_max_us, lag_hist, duration_hist
                         FROM run_stats_binding
                         WHERE binding_id = $1 AND tenant_id = $2 AND hour >= $3 AND hour < $4
                         UNION ALL
                         SELECT hour, succeeded, failed, timed_out, cancelled, skipped, started, duration_sum_us,
                                duration_max_us, lag_max_us, lag_hist, duration_hist
                         FROM run_stats
                         WHERE binding_id = $1 AND tenant_id = $2 AND hour >= $3 AND hour < $4
                         UNION ALL
                         SELECT hour, count(*) FILTER (WHERE state = 'SUCCEEDED')::int,
                                count(*) FILTER (WHERE state = 'FAILED')::int,
                                count(*) FILTER (WHERE state = 'TIMED_OUT')::int,
                                count(*) FILTER (WHERE state = 'CANCELLED')::int,
                                count(*) FILTER (WHERE state = 'SKIPPED')::int, count(dur_b)::int,
                                coalesce(sum(dur_us), 0)::float8, coalesce(max(dur_us), 0)::bigint,
                                coalesce(max(lag_us), 0)::bigint, sked_hist_of(array_agg(lag_b)),
                                sked_hist_of(array_agg(dur_b))
                         FROM run_stats_delta
                         WHERE binding_id = $1 AND tenant_id = $2 AND hour >= $3 AND hour < $4
                         GROUP BY hour) s
                   LIMIT $5"#,
                id,
                tenant,
                start,
                end,
                limit
            )
            .fetch_all(db)
            .await?
        }
        StatsScope::Tenant(tenant) => {
            sqlx::query_as!(
                HourRow,
                r#"SELECT hour AS "hour!", succeeded AS "succeeded!", failed AS "failed!",
                          timed_out AS "timed_out!", cancelled AS "cancelled!", skipped AS "skipped!",
                          started AS "started!", duration_sum_us AS "duration_sum_us!",
                          duration_max_us AS "duration_max_us!", lag_max_us AS "lag_max_us!",
                          lag_hist AS "lag_hist!", duration_hist AS "duration_hist!"
                   FROM (SELECT hour, succeeded, failed, timed_out, cancelled, skipped, started, duration_sum_us,
                                duration_max_us, lag_max_us, lag_hist, duration_hist
                         FROM run_stats_rollup
                         WHERE tenant_id = $1 AND definition = '' AND hour >= $2 AND hour < $3
                         UNION ALL
                         SELECT hour, succeeded, failed, timed_out, cancelled, skipped, started, duration_sum_us,
                                duration_max_us, lag_max_us, lag_hist, duration_hist
                         FROM run_stats WHERE tenant_id = $1 AND hour >= $2 AND hour < $3
                         UNION ALL
                         SELECT hour, count(*) FILTER (WHERE state = 'SUCCEEDED')::int,
                                count(*) FILTER (WHERE state = 'FAILED')::int,
                                count(*) FILTER (WHERE state = 'TIMED_OUT')::int,
                                count(*) FILTER (WHERE state = 'CANCELLED')::int,
                                count(*) FILTER (WHERE state = 'SKIPPED')::int, count(dur_b)::int,
                                coalesce(sum(dur_us), 0)::float8, coalesce(max(dur_us), 0)::bigint,
                                coalesce(max(lag_us), 0)::bigint, sked_hist_of(array_agg(lag_b)),
                                sked_hist_of(array_agg(dur_b))
                         FROM run_stats_delta
                         WHERE tenant_id = $1 AND hour >= $2 AND hour < $3
                         GROUP BY hour) s
                   LIMIT $4"#,
                tenant,
                start,
                end,
                limit
            )
            .fetch_all(db)
            .await?
        }
        StatsScope::Definition { name, tenant } => {
            sqlx::query_as!(
                HourRow,
                r#"SELECT hour AS "hour!", succeeded AS "succeeded!", failed AS "failed!",
                          timed_out AS "timed_out!", cancelled AS "cancelled!", skipped AS "skipped!",
                          started AS "started!", duration_sum_us AS "duration_sum_us!",
                          duration_max_us AS "duration_max_us!", lag_max_us AS "lag_max_us!",
                          lag_hist AS "lag_hist!", duration_hist AS "duration_hist!"
                   FROM (SELECT hour, succeeded, failed, timed_out, cancelled, skipped, started, duration_sum_us,
                                duration_max_us, lag_max_us, lag_hist, duration_hist
                         FROM run_stats_rollup
                         WHERE tenant_id = coalesce($4, '') AND definition = $1 AND hour >= $2 AND hour < $3
                         UNION ALL
                         SELECT hour, succeeded, failed, timed_out, cancelled, skipped, started, duration_sum_us,
                                duration_max_us, lag_max_us, lag_hist, duration_hist
                         FROM run_stats
                         WHERE definition = $1 AND hour >= $2 AND hour < $3
                           AND ($4::text IS NULL OR tenant_id = $4)
                         UNION ALL
                         SELECT hour, count(*) FILTER (WHERE state = 'SUCCEEDED')::int,
                                count(*) FILTER (WHERE state = 'FAILED')::int,
                                count(*) FILTER (WHERE state = 'TIMED_OUT')::int,
                                count(*) FILTER (WHERE state = 'CANCELLED')::int,
                                count(*) FILTER (WHERE state = 'SKIPPED')::int, count(dur_b)::int,
                                coalesce(sum(dur_us), 0)::float8, coalesce(max(dur_us), 0)::bigint,
                                coalesce(max(lag_us), 0)::bigint, sked_hist_of(array_agg(lag_b)),
                                sked_hist_of(array_agg(dur_b))
                         FROM run_stats_delta
                         WHERE definition = $1 AND hour >= $2 AND hour < $3
                           AND ($4::text IS NULL OR tenant_id = $4)
                         GROUP BY hour) s
                   LIMIT $5"#,
                name,
                start,
                end,
                tenant,
                limit
            )
            .fetch_all(db)
            .await?
        }
    };
    Ok(rows.into_iter().map(HourlyStats::from).collect())
}

/// The advisory lock space (the first key of PostgreSQL's two-key form;
/// the second is the partition) of [`run_stats_delta_fold`]: one mover of a
/// partition's rows at a time. "sksf".
pub const STATS_FOLD_LOCK: i32 = 0x736b_7366;

/// Partitions of `run_stats_delta` (hash of the binding id; migration
/// `20261208000100_run_stats_delta_parts.sql`, whose modulus this is).
pub const RUN_STATS_DELTA_PARTS: u32 = 8;

/// Moves up to `limit` rows of partition `part` (taken modulo
/// [`RUN_STATS_DELTA_PARTS`]) of `run_stats_delta` (one row per ended run,
/// appended by the run-end statements; migrations
/// `20261205000300_run_stats_delta.sql` and
/// `20261208000100_run_stats_delta_parts.sql`) into `run_stats`, in one
/// statement: deletes them and adds them, aggregated per binding and hour,
/// to the binding's hourly row. A binding's rows all lie in one partition,
/// so one move updates its row once. A reader sees each run end either in
/// the delta or in `run_stats`, never both. Returns the rows moved (0 when
/// another transaction is moving this partition's rows: the partition's
/// advisory lock, [`STATS_FOLD_LOCK`], is taken without waiting); call
/// again while it returns `limit`. Every node calls it, one partition at a
/// time ([`crate::cluster::StatsFold`]).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_stats_delta_fold(
    db: impl PgExecutor<'_>,
    part: u32,
    limit: i64,
) -> Result<i64, Error> {
    // The partition is named in the text (a table name cannot be a
    // parameter; `part` is a number below 8), so the statement reads only
    // its rows: a ctid is only unique within one partition.
    //
    // One mover per partition at a time, by an advisory lock taken without
    // waiting, rather than `FOR UPDATE SKIP LOCKED` on the rows: locking a
    // row writes a WAL record of its own before the delete writes another
    // (measured with `pg_waldump` during `sked-bench fire`: one 54-byte
    // lock record per run end, on top of its delete). A mover that read a
    // row another mover deleted and committed meanwhile skips it when it
    // deletes (READ COMMITTED), so no run end is counted twice either way.
    // As a sub-select the lock is tried once (a one-time filter before the
    // rows are read), not once per row.
    let part = part % RUN_STATS_DELTA_PARTS;
    let sql = format!(
        r#"WITH moved AS (
             DELETE FROM run_stats_delta_{part}
             WHERE (SELECT pg_try_advisory_xact_lock({STATS_FOLD_LOCK}, {part}))
               AND ctid = ANY (ARRAY(SELECT ctid FROM run_stats_delta_{part} LIMIT $1))
             RETURNING *),
           up AS (
             INSERT INTO run_stats AS t (binding_id, hour, tenant_id, definition, succeeded, failed, timed_out,
                                         cancelled, skipped, started, duration_sum_us, duration_max_us,
                                         lag_max_us, lag_hist, duration_hist)
             SELECT b.binding_id, b.hour, min(b.tenant_id), min(b.definition),
                    count(*) FILTER (WHERE b.state = 'SUCCEEDED'), count(*) FILTER (WHERE b.state = 'FAILED'),
                    count(*) FILTER (WHERE b.state = 'TIMED_OUT'), count(*) FILTER (WHERE b.state = 'CANCELLED'),
                    count(*) FILTER (WHERE b.state = 'SKIPPED'), count(b.dur_b),
                    coalesce(sum(b.dur_us), 0), coalesce(max(b.dur_us), 0), coalesce(max(b.lag_us), 0),
                    CASE WHEN count(b.lag_b) = 0 THEN '{{}}'::int[]
                         WHEN min(b.lag_b) = max(b.lag_b)
                         THEN array_fill(0, ARRAY[min(b.lag_b)]) || count(b.lag_b)::int
                         ELSE sked_hist_of(array_agg(b.lag_b)) END,
                    CASE WHEN count(b.dur_b) = 0 THEN '{{}}'::int[]
                         WHEN min(b.dur_b) = max(b.dur_b)
                         THEN array_fill(0, ARRAY[min(b.dur_b)]) || count(b.dur_b)::int
                         ELSE sked_hist_of(array_agg(b.dur_b)) END
             -- Sorted first (OFFSET 0 keeps the subquery): the planner then
             -- aggregates group after group, not in a hash table whose
             -- per-group array_agg states spill to disk; rows are then
             -- locked in key order.
             FROM (SELECT * FROM moved ORDER BY binding_id, hour OFFSET 0) b
             GROUP BY b.binding_id, b.hour ORDER BY b.binding_id, b.hour
             ON CONFLICT (binding_id, hour) DO UPDATE SET
               succeeded = t.succeeded + EXCLUDED.succeeded, failed = t.failed + EXCLUDED.failed,
               timed_out = t.timed_out + EXCLUDED.timed_out, cancelled = t.cancelled + EXCLUDED.cancelled,
               skipped = t.skipped + EXCLUDED.skipped, started = t.started + EXCLUDED.started,
               duration_sum_us = t.duration_sum_us + EXCLUDED.duration_sum_us,
               duration_max_us = GREATEST(t.duration_max_us, EXCLUDED.duration_max_us),
               lag_max_us = GREATEST(t.lag_max_us, EXCLUDED.lag_max_us),
               lag_hist = sked_hist_acc(t.lag_hist, EXCLUDED.lag_hist),
               duration_hist = sked_hist_acc(t.duration_hist, EXCLUDED.duration_hist))
           SELECT count(*) FROM moved"#
    );
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(limit)
        .fetch_one(db)
        .await?;
    Ok(n)
}

/// Folds up to `limit` inbox rows of hours before `before` (`run_stats`)
/// into the folded tables (`run_stats_binding`, `run_stats_rollup`;
/// migration `20261204000300_run_stats_daily.sql`), in one statement:
/// deletes them and adds them to the folded rows of their binding, tenant,
/// definition, and tenant and definition. Rows a run-end statement holds
/// locked are skipped (`SKIP LOCKED`; the next fold takes them), so a fold
/// never waits on the hot path and no row is added twice. Returns the rows
/// folded; call again while it returns `limit`. Any node may call it (the
/// maintenance leader does, [`crate::cluster::StatsFold`]).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_stats_fold(
    db: impl PgExecutor<'_>,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<i64, Error> {
    let n = sqlx::query_scalar!(
        r#"WITH picked AS (
             SELECT binding_id, hour FROM run_stats WHERE hour < $1
             ORDER BY binding_id, hour LIMIT $2 FOR UPDATE SKIP LOCKED),
           moved AS (
             DELETE FROM run_stats s USING picked p WHERE s.binding_id = p.binding_id AND s.hour = p.hour
             RETURNING s.*),
           to_binding AS (
             INSERT INTO run_stats_binding AS t
             SELECT binding_id, hour, tenant_id, definition, succeeded, failed, timed_out, cancelled, skipped,
                    started, duration_sum_us, duration_max_us, lag_max_us, lag_hist, duration_hist
             FROM moved ORDER BY binding_id, hour
             ON CONFLICT (binding_id, hour) DO UPDATE SET
               succeeded = t.succeeded + EXCLUDED.succeeded, failed = t.failed + EXCLUDED.failed,
               timed_out = t.timed_out + EXCLUDED.timed_out, cancelled = t.cancelled + EXCLUDED.cancelled,
               skipped = t.skipped + EXCLUDED.skipped, started = t.started + EXCLUDED.started,
               duration_sum_us = t.duration_sum_us + EXCLUDED.duration_sum_us,
               duration_max_us = GREATEST(t.duration_max_us, EXCLUDED.duration_max_us),
               lag_max_us = GREATEST(t.lag_max_us, EXCLUDED.lag_max_us),
               lag_hist = sked_hist_acc(t.lag_hist, EXCLUDED.lag_hist),
               duration_hist = sked_hist_acc(t.duration_hist, EXCLUDED.duration_hist)),
           -- per tenant, per definition (all tenants), per tenant and
           -- definition; '' stands for "all" (migration 20261204000300)
           grouped AS (
             SELECT coalesce(tenant_id, '') AS tenant_id, coalesce(definition, '') AS definition, hour,
                    sum(succeeded)::int AS succeeded, sum(failed)::int AS failed,
                    sum(timed_out)::int AS timed_out, sum(cancelled)::int AS cancelled,
                    sum(skipped)::int AS skipped, sum(started)::int AS started,
                    sum(duration_sum_us) AS duration_sum_us, max(duration_max_us) AS duration_max_us,
                    max(lag_max_us) AS lag_max_us, sked_hist_sum(lag_hist) AS lag_hist,
                    sked_hist_sum(duration_hist) AS duration_hist
             FROM moved
             GROUP BY GROUPING SETS ((tenant_id, hour), (definition, hour), (tenant_id, definition, hour))),
           to_rollup AS (
             INSERT INTO run_stats_rollup AS t
             SELECT * FROM grouped ORDER BY tenant_id, definition, hour
             ON CONFLICT (tenant_id, definition, hour) DO UPDATE SET
               succeeded = t.succeeded + EXCLUDED.succeeded, failed = t.failed + EXCLUDED.failed,
               timed_out = t.timed_out + EXCLUDED.timed_out, cancelled = t.cancelled + EXCLUDED.cancelled,
               skipped = t.skipped + EXCLUDED.skipped, started = t.started + EXCLUDED.started,
               duration_sum_us = t.duration_sum_us + EXCLUDED.duration_sum_us,
               duration_max_us = GREATEST(t.duration_max_us, EXCLUDED.duration_max_us),
               lag_max_us = GREATEST(t.lag_max_us, EXCLUDED.lag_max_us),
               lag_hist = sked_hist_acc(t.lag_hist, EXCLUDED.lag_hist),
               duration_hist = sked_hist_acc(t.duration_hist, EXCLUDED.duration_hist))
           SELECT count(*) AS "n!" FROM moved"#,
        before,
        limit,
    )
    .fetch_one(db)
    .await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    /// The bookkeeping CTEs between the markers in `text`, one per query.
    fn fragments(text: &str) -> Vec<String> {
        let (open, close) = ("-- run-end bookkeeping {", "-- } run-end bookkeeping");
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find(open) {
            let tail = &rest[i..];
            let j = tail.find(close).expect("every opening marker is closed");
            out.push(
                tail[..j]
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
            rest = &tail[j..];
        }
        out
    }

    /// Every statement that ends runs keeps the status and statistics the
    /// same way: the copies of the bookkeeping are identical.
    #[test]
    fn run_end_bookkeeping_copies_are_identical() {
        let files = [
            ("mod.rs", include_str!("mod.rs")),
            ("claim.rs", include_str!("claim.rs")),
            ("workers.rs", include_str!("workers.rs")),
            ("outcomes.rs", include_str!("outcomes.rs")),
        ];
        let mut all = Vec::new();
        for (name, text) in files {
            let f = fragments(text);
            // outcomes.rs names the markers in its own docs and this test.
            assert!(!f.is_empty(), "{name} has no run-end bookkeeping");
            all.extend(
                f.into_iter()
                    .filter(|f| f.contains("INSERT INTO binding_status"))
                    .map(|f| (name, f)),
            );
        }
        assert_eq!(all.len(), 4, "one copy per statement that ends runs");
        for (name, f) in &all[1..] {
            assert_eq!(f, &all[0].1, "{name}'s copy differs from {}'s", all[0].0);
        }
    }
}
