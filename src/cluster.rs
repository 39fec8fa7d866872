//! The nodes sharing one database: each node's heartbeat row
//! ([`Heartbeat`]) and the election of the one node that leads maintenance
//! ([`Election`], read through a [`Leadership`] handle).
//!
//! # Heartbeats
//!
//! Every node upserts its row in `nodes` every [`NODE_HEARTBEAT`] (2 s by
//! default): version, start time, the runs it executes or its workers hold,
//! its stream subscribers, and whether it drains. The row's
//! `heartbeat_time` is the database's clock. A row older than
//! [`NODE_STALE_AFTER`] is reported `stale` (the node is probably dead);
//! the leader deletes rows older than [`NODE_PRUNE_AFTER`]; a node that
//! stops cleanly deletes its own.
//!
//! # Leadership
//!
//! One row of `leader_leases` (`maintenance`) says which node leads and in
//! which term, until when (the database's clock). Every node tries to take
//! or renew it every third of the lease ([`Election::run`]): the holder
//! renews it, anyone takes it once it lapsed, and the row lock makes
//! exactly one of two racing nodes win. The term grows by one each time the
//! lease changes hands or is taken again after it lapsed.
//!
//! - **Takeover:** a leader that dies stops renewing; its lease lapses at
//!   most one lease after its last renewal, and the other nodes, which
//!   sleep until the lease they saw lapses, take it within milliseconds of
//!   that.
//! - **Stepping down before the lease can lapse:** a node counts its lease
//!   from the moment it *sent* the renewal (the database starts it later,
//!   never earlier), and stops acting as leader a fifth of a lease (at
//!   least 50 ms) before that count runs out unless a renewal succeeded
//!   meanwhile — also while a renewal hangs on a database that does not
//!   answer. So two nodes never both act as leader, whatever the database
//!   does, as long as their clocks tick at about the same rate.
//! - **Clean stop:** a leader that stops lets its lease lapse at once, so
//!   another node takes over at its next try (a third of a lease) rather
//!   than after a whole lease.
//! - **Fencing:** a leader-only write may check
//!   [`db::cluster::leader_holds`] with the term of
//!   [`Leadership::current`] in its own transaction, so that a node paused
//!   past its lease (a stopped VM) writes nothing once it wakes up.
//!
//! # What only the leader does
//!
//! Leader-only tasks read [`Leadership::is_leader`] before each batch of
//! work (and may fence on the term, above):
//!
//! | task | where |
//! |---|---|
//! | pruning rows of nodes gone for [`NODE_PRUNE_AFTER`] | [`Heartbeat::run`] |
//! | retention and partition upkeep | `crate::retention::Retention` |
//! | folding run statistics of past hours ([`db::runs::run_stats_fold`]) | [`StatsFold::run`] |
//!
//! Everything else runs on every node, because doing it twice is harmless
//! and doing it everywhere survives any node: firing (bindings are locked
//! `SKIP LOCKED`), claiming, promoting due `SCHEDULED` runs, moving run
//! ends into the statistics ([`StatsFold::fold_delta_part`]), and the reaper
//! (each reaped run is one conditional update).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::domain::cluster::{MAINTENANCE_LEASE, NODE_HEARTBEAT, NODE_PRUNE_AFTER, NodeLoad};
use crate::telemetry::metrics;

/// Whether this node leads maintenance, and in which term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lead {
    /// This node holds the maintenance lease and acts as leader.
    pub leader: bool,
    /// The lease's term while `leader` (0 otherwise).
    pub term: i64,
}

/// A read-only handle on this node's leadership, for maintenance code:
/// cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<Lead>);

impl Leadership {
    /// A handle that never leads (a node without an election, tests).
    pub fn never() -> Leadership {
        Leadership(watch::channel(Lead::default()).1)
    }

    /// Whether this node leads maintenance now.
    pub fn is_leader(&self) -> bool {
        self.0.borrow().leader
    }

    /// Leadership and term now.
    pub fn current(&self) -> Lead {
        *self.0.borrow()
    }

    /// A receiver that sees every change (`changed().await`), for a task
    /// that waits to become leader.
    pub fn watch(&self) -> watch::Receiver<Lead> {
        self.0.clone()
    }
}

/// The maintenance election of one node (module docs).
#[derive(Debug)]
pub struct Election {
    pool: PgPool,
    node_id: String,
    lease: Duration,
    tx: watch::Sender<Lead>,
}

impl Election {
    /// The election of `node_id` with leases of `lease`, and the handle
    /// maintenance code reads.
    pub fn new(pool: PgPool, node_id: String, lease: Duration) -> (Election, Leadership) {
        let (tx, rx) = watch::channel(Lead::default());
        let lease = lease.max(Duration::from_millis(300));
        (
            Election {
                pool,
                node_id,
                lease,
                tx,
            },
            Leadership(rx),
        )
    }

    /// How long before its lease could lapse a leader that cannot renew
    /// stops acting as one.
    fn margin(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(50))
    }

    fn step_up(&self, term: i64) {
        let was = *self.tx.borrow();
        if !was.leader || was.term != term {
            tracing::info!(term, node_id = %self.node_id, "this node leads maintenance now");
        }
        self.tx.send_replace(Lead { leader: true, term });
        ::metrics::gauge!(metrics::LEADER).set(1.0);
        ::metrics::gauge!(metrics::LEADER_TERM).set(term as f64);
    }

    fn step_down(&self, why: &str) {
        let was = self.tx.send_replace(Lead::default());
        if was.leader {
            tracing::warn!(
                term = was.term,
                why,
                "this node no longer leads maintenance"
            );
        }
        ::metrics::gauge!(metrics::LEADER).set(0.0);
        ::metrics::gauge!(metrics::LEADER_TERM).set(0.0);
    }

    /// Takes or renews the lease every third of it until `stop` (module
    /// docs); on `stop`, steps down and lets a held lease lapse. Restartable:
    /// a new run starts as a follower and resumes the term if the lease is
    /// still this node's.
    pub async fn run(&self, stop: CancellationToken) {
        let every = self.lease / 3;
        // While leading: when to stop acting as leader unless renewed.
        let mut acting_until: Option<Instant> = None;
        self.step_down("election (re)started");
        loop {
            if acting_until.is_some_and(|d| Instant::now() >= d) {
                self.step_down("the lease could not be renewed in time");
                acting_until = None;
            }
            let sent = Instant::now();
            let attempt = tokio::time::timeout(
                every,
                db::cluster::leader_acquire(
                    &self.pool,
                    MAINTENANCE_LEASE,
                    &self.node_id,
                    self.lease,
                ),
            );
            let outcome = tokio::select! {
                r = attempt => Some(r),
                _ = until(acting_until) => None,
                _ = stop.cancelled() => break,
            };
            let mut next = sent + every;
            match outcome {
                // The acting deadline passed while the attempt hung: the
                // loop's first check steps down.
                None => next = Instant::now(),
                Some(Ok(Ok(Some(lease)))) => {
                    acting_until = Some(sent + self.lease.saturating_sub(self.margin()));
                    self.step_up(lease.term);
                }
                Some(Ok(Ok(None))) => {
                    if acting_until.take().is_some() {
                        self.step_down("another node holds the lease");
                    }
                    // Try again just after the holder's lease lapses.
                    if let Ok(Some((_, remaining))) =
                        db::cluster::leader_get(&self.pool, MAINTENANCE_LEASE).await
                    {
                        let wait = (remaining + Duration::from_millis(20))
                            .clamp(Duration::from_millis(20), every);
                        next = Instant::now() + wait;
                    }
                }
                Some(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "taking or renewing the maintenance lease failed");
                    next = Instant::now() + every.min(Duration::from_secs(1));
                }
                Some(Err(_)) => {
                    tracing::warn!(timeout = ?every, "taking or renewing the maintenance lease timed out");
                    next = Instant::now();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = until(acting_until) => {}
                _ = stop.cancelled() => break,
            }
        }
        if self.tx.borrow().leader {
            self.step_down("the node stops");
            let release = db::cluster::leader_release(&self.pool, MAINTENANCE_LEASE, &self.node_id);
            match tokio::time::timeout(Duration::from_secs(2), release).await {
                Ok(Ok(())) => tracing::info!("maintenance lease released"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "releasing the maintenance lease failed; it lapses by itself")
                }
                Err(_) => {
                    tracing::warn!("releasing the maintenance lease timed out; it lapses by itself")
                }
            }
        }
    }
}

/// Resolves at `d`, never when `None`.
async fn until(d: Option<Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The heartbeat of one node (module docs).
#[derive(Clone)]
pub struct Heartbeat {
    /// Database (the engine's pool).
    pub pool: PgPool,
    /// This node's id.
    pub node_id: String,
    /// The sked version it runs.
    pub version: String,
    /// When it started.
    pub start_time: DateTime<Utc>,
    /// How often to write the row ([`NODE_HEARTBEAT`] by default).
    pub every: Duration,
    /// What the node reports each time (runs, subscribers, draining).
    pub load: Arc<dyn Fn() -> NodeLoad + Send + Sync>,
    /// Whether this node leads (it then prunes rows of long-gone nodes).
    pub leadership: Leadership,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("node_id", &self.node_id)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

impl Heartbeat {
    /// [`NODE_HEARTBEAT`], the default interval.
    pub const DEFAULT_EVERY: Duration = NODE_HEARTBEAT;

    /// Writes the row every [`Heartbeat::every`] until `stop`, then deletes
    /// it (a clean stop is not a stale node). While leading, prunes rows of
    /// nodes gone for [`NODE_PRUNE_AFTER`] once a minute. Errors are logged
    /// and the next beat tries again.
    pub async fn run(&self, stop: CancellationToken) {
        let mut last_prune: Option<Instant> = None;
        loop {
            let load = (self.load)();
            ::metrics::gauge!(metrics::NODE_RUNNING_RUNS).set(f64::from(load.running_runs));
            ::metrics::gauge!(metrics::STREAM_SUBSCRIBERS).set(f64::from(load.stream_subscribers));
            let beat = db::cluster::node_heartbeat(
                &self.pool,
                &self.node_id,
                &self.version,
                self.start_time,
                load,
            );
            match tokio::time::timeout(self.every.max(Duration::from_secs(1)), beat).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "node heartbeat failed"),
                Err(_) => tracing::warn!("node heartbeat timed out"),
            }
            if self.leadership.is_leader()
                && last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                last_prune = Some(Instant::now());
                match db::cluster::node_prune(&self.pool, NODE_PRUNE_AFTER).await {
                    Ok(gone) if !gone.is_empty() => {
                        tracing::info!(nodes = ?gone, "pruned nodes without a heartbeat for 15 minutes")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning stale nodes failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.cancelled() => break,
            }
        }
        let delete = db::cluster::node_delete(&self.pool, &self.node_id);
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), delete).await {
            tracing::warn!(error = %e, "deleting this node's row failed; it turns stale");
        }
    }
}

/// Samples the gauges that need the database or the pools
/// (`--metrics-listen` only): cluster-wide run counts and the oldest
/// queued run's wait, every [`GaugeSampler::every`], from one cheap
/// statement ([`db::cluster::run_counts`]: index-only counts), and the
/// pools' connections.
#[derive(Debug, Clone)]
pub struct GaugeSampler {
    /// The engine's pool (the statement runs on it).
    pub engine_pool: PgPool,
    /// The API's pool (only its size is read).
    pub api_pool: PgPool,
    /// Source of now (a run is due when `not_before <= now`).
    pub clock: crate::domain::Clock,
    /// Sampling interval.
    pub every: Duration,
}

impl GaugeSampler {
    /// Samples until `stop`; a failed sample is logged and skipped.
    pub async fn run(&self, stop: CancellationToken) {
        loop {
            for (name, pool) in [("engine", &self.engine_pool), ("api", &self.api_pool)] {
                let size = pool.size();
                let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
                let max = pool.options().get_max_connections();
                ::metrics::gauge!(metrics::DB_POOL_CONNECTIONS, "pool" => name, "state" => "idle")
                    .set(f64::from(idle));
                ::metrics::gauge!(metrics::DB_POOL_CONNECTIONS, "pool" => name, "state" => "in_use")
                    .set(f64::from(size - idle));
                ::metrics::gauge!(metrics::DB_POOL_MAX, "pool" => name).set(f64::from(max));
            }
            let now = self.clock.now();
            let sample = db::cluster::run_counts(&self.engine_pool, now);
            match tokio::time::timeout(self.every, sample).await {
                Ok(Ok(c)) => {
                    for (state, n) in [
                        ("scheduled", c.scheduled),
                        ("queued", c.queued),
                        ("running", c.running),
                    ] {
                        ::metrics::gauge!(metrics::CLUSTER_RUNS, "state" => state).set(n as f64);
                    }
                    let age = c
                        .oldest_queued_due
                        .and_then(|t| (now - t).to_std().ok())
                        .unwrap_or_default();
                    ::metrics::gauge!(metrics::QUEUE_OLDEST_AGE).set(age.as_secs_f64());
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "sampling run counts for metrics failed"),
                Err(_) => tracing::warn!("sampling run counts for metrics timed out"),
            }
            let failing = db::bindings::binding_failing_counts(
                &self.engine_pool,
                now,
                crate::domain::stats::FAILING_AFTER,
            );
            match tokio::time::timeout(self.every, failing).await {
                Ok(Ok(by_tenant)) => metrics::failing_bindings(&by_tenant),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "sampling failing bindings for metrics failed")
                }
                Err(_) => tracing::warn!("sampling failing bindings for metrics timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Keeps the run statistics cheap to write and to read, in two steps:
/// on every node, moves the run ends the run-end statements append to
/// `run_stats_delta` into `run_stats` ([`db::runs::run_stats_delta_fold`],
/// every [`StatsFold::DELTA_EVERY`]); while this node leads, folds the rows
/// of past hours of `run_stats` into the folded tables
/// ([`db::runs::run_stats_fold`], in batches of [`StatsFold::BATCH`], every
/// [`StatsFold::every`]). Neither is needed for exact statistics (reads add
/// the unfolded rows), only for fast ones: a failed or skipped fold is
/// tried again next time.
#[derive(Debug, Clone)]
pub struct StatsFold {
    /// The engine's pool.
    pub pool: PgPool,
    /// Source of now: rows of hours before the current one are folded.
    pub clock: crate::domain::Clock,
    /// This node's leadership (only the leader folds).
    pub leadership: Leadership,
    /// Interval between folds.
    pub every: Duration,
}

impl StatsFold {
    /// Rows folded per statement.
    pub const BATCH: i64 = 5_000;
    /// Delta rows (run ends) moved per statement, from one partition.
    pub const DELTA_BATCH: i64 = 10_000;
    /// The default interval.
    pub const DEFAULT_EVERY: Duration = Duration::from_secs(10);
    /// Interval between moves of run ends from `run_stats_delta` into
    /// `run_stats`, on every node: each binding's hourly row is then
    /// updated at most once per interval however often it fires, and the
    /// delta that reads scan holds a few seconds of run ends.
    pub const DELTA_EVERY: Duration = Duration::from_secs(5);

    /// Moves run ends into `run_stats` every [`StatsFold::DELTA_EVERY`] on
    /// every node (one partition after another, spread over the interval:
    /// [`StatsFold::fold_delta_part`]), and folds past hours every `every`
    /// while leading, until `stop`; errors are logged.
    pub async fn run(&self, stop: CancellationToken) {
        let mut last_fold: Option<Instant> = None;
        // Each partition at its own slot of the interval: moving all eight
        // back to back (at 10 000 run ends a second, eight statements of
        // ~50 ms of a PostgreSQL core) took most of a core for ~0.8 s
        // every 5 s, and the fires due then were late (`sked-bench fire`:
        // the worst seconds of the window were those of the moves).
        let interval = Self::DELTA_EVERY.min(self.every);
        let slot = interval / db::runs::RUN_STATS_DELTA_PARTS;
        loop {
            for part in 0..db::runs::RUN_STATS_DELTA_PARTS {
                let started = Instant::now();
                self.fold_delta_part(part, &stop).await;
                tokio::select! {
                    _ = tokio::time::sleep(slot.saturating_sub(started.elapsed())) => {}
                    _ = stop.cancelled() => return,
                }
            }
            if self.leadership.is_leader() && last_fold.is_none_or(|t| t.elapsed() >= self.every) {
                last_fold = Some(Instant::now());
                self.fold(&stop).await;
            }
        }
    }

    /// Moves the run ends of partition `part` of `run_stats_delta`, in
    /// batches of [`StatsFold::DELTA_BATCH`], until fewer than a batch are
    /// left (or `stop`, or an error, which is logged). After each statement
    /// it pauses as long as the statement took, so the move never holds a
    /// PostgreSQL core for long: in one statement, 50 000 run ends (10 000
    /// one-second bindings) took 0.4-0.9 s of a core, during which firing
    /// fell behind.
    pub async fn fold_delta_part(&self, part: u32, stop: &CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let moved = db::runs::run_stats_delta_fold(&self.pool, part, Self::DELTA_BATCH).await;
            let took = started.elapsed();
            match moved {
                Ok(n) => {
                    if n >= Self::DELTA_BATCH {
                        tokio::select! {
                            _ = tokio::time::sleep(took) => {}
                            _ = stop.cancelled() => return,
                        }
                    } else {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "moving run ends into the run statistics failed; trying again later");
                    return;
                }
            }
        }
    }

    /// One fold: batches until the inbox holds no past hour (or leadership
    /// or `stop` ends it).
    pub async fn fold(&self, stop: &CancellationToken) {
        let before = crate::domain::stats::floor_hour(self.clock.now());
        while self.leadership.is_leader() && !stop.is_cancelled() {
            match db::runs::run_stats_fold(&self.pool, before, Self::BATCH).await {
                Ok(n) if n < Self::BATCH => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "folding run statistics failed; trying again later");
                    return;
                }
            }
        }
    }
}
