//! The nodes sharing a database, the maintenance leader and what
//! `AdminService.GetSchedulerStatus` reports about them (`src/cluster.rs`
//! keeps the rows up to date).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// How often a node writes its heartbeat row by default.
pub const NODE_HEARTBEAT: Duration = Duration::from_secs(2);
/// A node whose last heartbeat is older than this is reported `stale`
/// (probably dead: five heartbeats missed at the default rate).
pub const NODE_STALE_AFTER: Duration = Duration::from_secs(10);
/// The leader deletes the row of a node whose last heartbeat is older than
/// this (a stale node stays visible this long for people to notice).
pub const NODE_PRUNE_AFTER: Duration = Duration::from_secs(15 * 60);
/// The name of the maintenance leadership's lease row.
pub const MAINTENANCE_LEASE: &str = "maintenance";
/// Most recent runs the fire-lag sample reads ([`FireLag`]).
pub const FIRE_LAG_SAMPLE_ROWS: i64 = 20_000;
/// Window of [`FireLag`]: runs started within this much of now.
pub const FIRE_LAG_WINDOW: Duration = Duration::from_secs(60);
/// Only runs created within this much of now are sampled for [`FireLag`]
/// (their UUIDv7 ids bound the index range read).
pub const FIRE_LAG_CREATED_WITHIN: Duration = Duration::from_secs(15 * 60);

/// What a node says about itself in each heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// Runs it executes plus runs its connected workers hold.
    pub running_runs: u32,
    /// Its open TailRun / WatchEvents subscriptions (event-bus receivers).
    pub stream_subscribers: u32,
    /// It is shutting down: no more claims, running runs finish.
    pub draining: bool,
}

/// One node's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its `--node-id`.
    pub node_id: String,
    /// The sked version it runs.
    pub version: String,
    /// When it started (its own clock).
    pub start_time: DateTime<Utc>,
    /// Its last heartbeat (the database's clock).
    pub heartbeat_time: DateTime<Utc>,
    /// What it reported then.
    pub load: NodeLoad,
    /// No heartbeat for more than [`NODE_STALE_AFTER`].
    pub stale: bool,
}

/// Who holds a leadership lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderLease {
    /// The holder.
    pub node_id: String,
    /// Grows by one each time the lease changes hands or is taken again
    /// after it lapsed; a leader-only write may be fenced on it.
    pub term: i64,
    /// When the holder took it (this term).
    pub acquire_time: DateTime<Utc>,
    /// When it lapses unless renewed (the database's clock).
    pub expire_time: DateTime<Utc>,
    /// Whether it had lapsed when read.
    pub expired: bool,
}

/// Runs waiting and running, over all tenants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// `SCHEDULED` runs (waiting for a later time: backoff, delayed triggers).
    pub scheduled: i64,
    /// `QUEUED` runs (due or soon due, waiting for a slot).
    pub queued: i64,
    /// `RUNNING` runs.
    pub running: i64,
    /// The earliest due time (`not_before`) of a `QUEUED` run that is due.
    pub oldest_queued_due: Option<DateTime<Utc>>,
}

/// Fire lag (start time − fire time of `SCHEDULE` runs) of the runs started
/// in the last [`FIRE_LAG_WINDOW`], from a bounded sample: the newest
/// [`FIRE_LAG_SAMPLE_ROWS`] runs created within [`FIRE_LAG_CREATED_WITHIN`].
/// A run that waited queued longer than that, or behind more newer runs, is
/// not in the sample (`oldest queued age` tells of such a backlog).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FireLag {
    /// Runs in the sample.
    pub runs: i64,
    /// Median lag, seconds (`None` without runs).
    pub p50_secs: Option<f64>,
    /// 99th percentile, seconds.
    pub p99_secs: Option<f64>,
    /// Largest, seconds.
    pub max_secs: Option<f64>,
}

/// What GetSchedulerStatus reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerStatus {
    /// The answering node.
    pub node_id: String,
    /// When it answered (its clock).
    pub time: DateTime<Utc>,
    /// Every node with a row, by id.
    pub nodes: Vec<Node>,
    /// The maintenance lease, if any node ever held it.
    pub leader: Option<LeaderLease>,
    /// Runs waiting and running.
    pub counts: RunCounts,
    /// Fire lag over the last minute.
    pub fire_lag: FireLag,
    /// Event-stream subscribers of the answering node, now.
    pub stream_subscribers: u32,
}

/// The smallest UUIDv7 of millisecond `unix_ms` (random bits zero): every
/// UUIDv7 minted at or after that millisecond sorts at or after it, so it
/// bounds an index range of time-ordered ids.
pub fn uuid_v7_floor(unix_ms: i64) -> uuid::Uuid {
    let ms = unix_ms.clamp(0, (1 << 48) - 1) as u64;
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70; // version 7
    b[8] = 0x80; // RFC 4122 variant
    uuid::Uuid::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_v7_floor_sorts_before_ids_of_its_millisecond() {
        let now = Utc::now().timestamp_millis();
        let floor = uuid_v7_floor(now - 1);
        let id = uuid::Uuid::now_v7();
        assert!(floor < id, "{floor} < {id}");
        assert_eq!(floor.get_version_num(), 7);
        assert!(uuid_v7_floor(now + 60_000) > id);
    }
}
