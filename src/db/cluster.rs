//! `nodes`, `leader_leases` and the cluster-wide run figures of
//! GetSchedulerStatus and the metrics gauges. Times that nodes compare
//! (heartbeats, lease expiry) are the database's clock
//! (`clock_timestamp()`), so nodes whose clocks disagree still agree on who
//! leads and who is stale.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::Error;
use crate::domain::cluster::{
    FIRE_LAG_SAMPLE_ROWS, FireLag, LeaderLease, Node, NodeLoad, RunCounts,
};

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Writes node `node_id`'s heartbeat: its version, start time and `load`,
/// `heartbeat_time` = the database's now.
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn node_heartbeat(
    db: impl PgExecutor<'_>,
    node_id: &str,
    version: &str,
    start_time: DateTime<Utc>,
    load: NodeLoad,
) -> Result<(), Error> {
    sqlx::query!(
        r#"INSERT INTO nodes (node_id, version, start_time, heartbeat_time, running_runs, stream_subscribers, draining)
           VALUES ($1, $2, $3, clock_timestamp(), $4, $5, $6)
           ON CONFLICT (node_id) DO UPDATE
              SET version = EXCLUDED.version, start_time = EXCLUDED.start_time,
                  heartbeat_time = EXCLUDED.heartbeat_time, running_runs = EXCLUDED.running_runs,
                  stream_subscribers = EXCLUDED.stream_subscribers, draining = EXCLUDED.draining"#,
        node_id,
        version,
        start_time,
        int(load.running_runs),
        int(load.stream_subscribers),
        load.draining,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Deletes node `node_id`'s row (it stops cleanly).
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn node_delete(db: impl PgExecutor<'_>, node_id: &str) -> Result<(), Error> {
    sqlx::query!("DELETE FROM nodes WHERE node_id = $1", node_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Every node (at most 1000, by id), marked stale when its heartbeat is
/// older than `stale_after`.
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn node_list(db: impl PgExecutor<'_>, stale_after: Duration) -> Result<Vec<Node>, Error> {
    let rows = sqlx::query!(
        r#"SELECT node_id, version, start_time, heartbeat_time, running_runs, stream_subscribers, draining,
                  heartbeat_time < clock_timestamp() - make_interval(secs => $1) AS "stale!"
           FROM nodes ORDER BY node_id LIMIT 1000"#,
        secs(stale_after),
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Node {
            node_id: r.node_id,
            version: r.version,
            start_time: r.start_time,
            heartbeat_time: r.heartbeat_time,
            load: NodeLoad {
                running_runs: u32::try_from(r.running_runs).unwrap_or(0),
                stream_subscribers: u32::try_from(r.stream_subscribers).unwrap_or(0),
                draining: r.draining,
            },
            stale: r.stale,
        })
        .collect())
}

/// Deletes the rows of nodes whose heartbeat is older than `older_than`;
/// returns their ids. Leader-only upkeep.
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn node_prune(
    db: impl PgExecutor<'_>,
    older_than: Duration,
) -> Result<Vec<String>, Error> {
    Ok(sqlx::query_scalar!(
        "DELETE FROM nodes WHERE heartbeat_time < clock_timestamp() - make_interval(secs => $1) RETURNING node_id",
        secs(older_than),
    )
    .fetch_all(db)
    .await?)
}

/// Takes or renews lease `name` for `node_id` for `lease` (from the
/// database's now): succeeds when the node holds it already or it has
/// lapsed. The term stays while the same holder renews an unexpired lease
/// and grows by one otherwise. Returns the lease when this node holds it
/// now, `None` when another node does. Two nodes racing for a lapsed lease
/// serialise on its row: exactly one gets it.
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn leader_acquire(
    db: impl PgExecutor<'_>,
    name: &str,
    node_id: &str,
    lease: Duration,
) -> Result<Option<LeaderLease>, Error> {
    let row = sqlx::query!(
        r#"INSERT INTO leader_leases AS l (name, node_id, term, acquire_time, expire_time)
           VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => $3))
           ON CONFLICT (name) DO UPDATE
              SET node_id = EXCLUDED.node_id,
                  term = CASE WHEN l.node_id = EXCLUDED.node_id AND l.expire_time > clock_timestamp()
                              THEN l.term ELSE l.term + 1 END,
                  acquire_time = CASE WHEN l.node_id = EXCLUDED.node_id AND l.expire_time > clock_timestamp()
                                      THEN l.acquire_time ELSE EXCLUDED.acquire_time END,
                  expire_time = EXCLUDED.expire_time
              WHERE l.node_id = EXCLUDED.node_id OR l.expire_time <= clock_timestamp()
           RETURNING node_id, term, acquire_time, expire_time"#,
        name,
        node_id,
        secs(lease),
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| LeaderLease {
        node_id: r.node_id,
        term: r.term,
        acquire_time: r.acquire_time,
        expire_time: r.expire_time,
        expired: false,
    }))
}

/// Lease `name` as stored, and how long until it lapses by the database's
/// clock (zero once it has).
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn leader_get(
    db: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<(LeaderLease, Duration)>, Error> {
    let row = sqlx::query!(
        r#"SELECT node_id, term, acquire_time, expire_time,
                  GREATEST(extract(epoch FROM expire_time - clock_timestamp()), 0)::float8 AS "remaining!"
           FROM leader_leases WHERE name = $1"#,
        name,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| {
        (
            LeaderLease {
                node_id: r.node_id,
                term: r.term,
                acquire_time: r.acquire_time,
                expire_time: r.expire_time,
                expired: r.remaining <= 0.0,
            },
            Duration::from_secs_f64(r.remaining.clamp(0.0, 1e9)),
        )
    }))
}

/// Lets lease `name` lapse now if `node_id` holds it (a clean stop: another
/// node takes over at its next try instead of after the lease).
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn leader_release(
    db: impl PgExecutor<'_>,
    name: &str,
    node_id: &str,
) -> Result<(), Error> {
    sqlx::query!(
        "UPDATE leader_leases SET expire_time = clock_timestamp() WHERE name = $1 AND node_id = $2 AND expire_time > clock_timestamp()",
        name,
        node_id,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Whether `node_id` still holds lease `name` in `term`, unexpired: the
/// fence of a leader-only write, checked in the write's own transaction
/// (a node paused past its lease then finds it lost and writes nothing).
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn leader_holds(
    db: impl PgExecutor<'_>,
    name: &str,
    node_id: &str,
    term: i64,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM leader_leases
                          WHERE name = $1 AND node_id = $2 AND term = $3
                            AND expire_time > clock_timestamp()) AS "held!""#,
        name,
        node_id,
        term,
    )
    .fetch_one(db)
    .await?)
}

/// `SCHEDULED`, `QUEUED` and `RUNNING` runs over all tenants (each count an
/// index-only scan of its state's partial index), and the earliest due time
/// of a due `QUEUED` run at `now`.
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn run_counts(db: impl PgExecutor<'_>, now: DateTime<Utc>) -> Result<RunCounts, Error> {
    let r = sqlx::query!(
        r#"SELECT (SELECT count(*) FROM runs WHERE state = 'SCHEDULED') AS "scheduled!",
                  (SELECT count(*) FROM runs WHERE state = 'QUEUED') AS "queued!",
                  (SELECT count(*) FROM runs WHERE state = 'RUNNING') AS "running!",
                  (SELECT min(not_before) FROM runs WHERE state = 'QUEUED' AND not_before <= $1) AS oldest"#,
        now,
    )
    .fetch_one(db)
    .await?;
    Ok(RunCounts {
        scheduled: r.scheduled,
        queued: r.queued,
        running: r.running,
        oldest_queued_due: r.oldest,
    })
}

/// Fire lag of the `SCHEDULE` runs that started in `[since, until]`,
/// sampled from the newest [`FIRE_LAG_SAMPLE_ROWS`] runs with an id at or
/// after `created_floor` (a UUIDv7 floor: the primary key bounds the read).
///
/// # Errors
/// [`Error::Sqlx`] when the database fails.
pub async fn run_fire_lag(
    db: impl PgExecutor<'_>,
    created_floor: uuid::Uuid,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<FireLag, Error> {
    let r = sqlx::query!(
        r#"SELECT count(*) AS "runs!",
                  percentile_disc(0.5) WITHIN GROUP (ORDER BY lag) AS p50,
                  percentile_disc(0.99) WITHIN GROUP (ORDER BY lag) AS p99,
                  max(lag) AS max
           FROM (SELECT GREATEST(extract(epoch FROM r.start_time - r.scheduled_time), 0)::float8 AS lag
                 FROM (SELECT trigger, start_time, scheduled_time FROM runs
                       WHERE id >= $1 ORDER BY id DESC LIMIT $4) r
                 WHERE r.trigger = 'SCHEDULE' AND r.start_time >= $2 AND r.start_time <= $3) s"#,
        created_floor,
        since,
        until,
        FIRE_LAG_SAMPLE_ROWS,
    )
    .fetch_one(db)
    .await?;
    Ok(FireLag {
        runs: r.runs,
        p50_secs: r.p50,
        p99_secs: r.p99,
        max_secs: r.max,
    })
}
