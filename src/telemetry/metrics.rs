//! sked's Prometheus metrics: every name, and the few recording helpers the
//! engine calls (`docs/operations.md`, "Metrics", lists them for people).
//!
//! Recording goes through the `metrics` facade: without `--metrics-listen`
//! no recorder is installed and every call is a no-op. Helpers take whole
//! batches (a scheduler pass, a claim, a published batch of events) and
//! look each handle up once per batch, so a hot loop pays an atomic add per
//! run, never a database round trip or an allocation.
//!
//! Labels have bounded values only: states, outcomes, kinds, pool names.
//! No run, binding or definition id ever becomes a label; the tenant
//! becomes one only when the operator opts in (`--metrics-tenant-label`,
//! [`set_tenant_label`]), since tenants can be many.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, histogram};
use chrono::{DateTime, Utc};

use crate::domain::EventBody;
use crate::domain::{NewRun, Run, RunEvent, RunState, RunTrigger};

/// Counter `{outcome, [tenant]}`: fires the scheduler made. `outcome` is
/// `run` (a run was created) or why the fire was skipped: `misfire`,
/// `overlap`, `quota`, `other`.
pub const FIRES: &str = "sked_fires_total";
/// Counter `{state, [tenant]}`: runs that reached a final state on this
/// node (`succeeded`, `failed`, `timed_out`, `cancelled`, `skipped`),
/// counted by the node that wrote it.
pub const RUNS_FINISHED: &str = "sked_runs_finished_total";
/// Histogram `{[tenant]}`, seconds: start time − fire time of `SCHEDULE`
/// runs, observed by the node that started them (includes a schedule's
/// jitter).
pub const FIRE_LAG: &str = "sked_fire_lag_seconds";
/// Histogram `{state, [tenant]}`, seconds: end − start of runs that
/// executed (command, http and worker handlers; `event` runs take no time).
pub const RUN_DURATION: &str = "sked_run_duration_seconds";
/// Histogram `{kind}`, seconds: one claim statement (`execute`, `event`,
/// `worker`), including its wait for a connection.
pub const CLAIM_DURATION: &str = "sked_claim_duration_seconds";
/// Histogram, seconds: one scheduler pass (lock due bindings, plan, insert,
/// commit), including passes that found nothing due.
pub const SCHEDULER_PASS_DURATION: &str = "sked_scheduler_pass_duration_seconds";
/// Counter `{origin}`: run events published on this node's bus, `local`
/// (written here) or `bridge` (written by another node, read here for a
/// subscriber).
pub const EVENTS_PUBLISHED: &str = "sked_events_published_total";
/// Counter: events a `WatchEvents` subscriber of this node missed because
/// it read too slowly (it is told how many; `TailRun` never drops, it
/// resyncs from the database).
pub const EVENTS_DROPPED: &str = "sked_events_dropped_total";
/// Gauge: event-bus subscribers of this node (TailRun and WatchEvents
/// streams).
pub const STREAM_SUBSCRIBERS: &str = "sked_stream_subscribers";
/// Gauge: runs this node executes plus runs its connected workers hold.
pub const NODE_RUNNING_RUNS: &str = "sked_node_running_runs";
/// Gauge `{state}`: runs `scheduled`, `queued` and `running` over the whole
/// cluster (the same on every node: aggregate with `max`), sampled.
pub const CLUSTER_RUNS: &str = "sked_cluster_runs";
/// Gauge, seconds: how long the oldest due `QUEUED` run has waited past its
/// due time, cluster-wide (0 when none waits), sampled.
pub const QUEUE_OLDEST_AGE: &str = "sked_queue_oldest_age_seconds";
/// Gauge `{pool, state}`: database connections of the `engine` and `api`
/// pools, `idle` or `in_use`.
pub const DB_POOL_CONNECTIONS: &str = "sked_db_pool_connections";
/// Gauge `{pool}`: the pools' size limit.
pub const DB_POOL_MAX: &str = "sked_db_pool_max_connections";
/// Gauge: 1 while this node holds the maintenance lease, else 0.
pub const LEADER: &str = "sked_leader";
/// Gauge: the maintenance lease's term while this node holds it.
pub const LEADER_TERM: &str = "sked_leader_term";
/// Gauge: 1 while health answers `SERVING`, else 0.
pub const HEALTH_SERVING: &str = "sked_health_serving";
/// Counter `{task}`: engine tasks (scheduler, executor, worker_hub,
/// event_bridge, node_heartbeat, leader_election) restarted after they died.
pub const ENGINE_RESTARTS: &str = "sked_engine_task_restarts_total";
/// Gauge `{version}`: 1, naming the sked version the node runs.
pub const BUILD_INFO: &str = "sked_build_info";
/// Counter: day partitions of `run_events` retention dropped (after
/// archiving them with `--archive-dir`), counted by the leader that did.
pub const RETENTION_PARTITIONS_DROPPED: &str = "sked_retention_partitions_dropped_total";
/// Counter, bytes: disk space of those partitions, indexes included.
pub const RETENTION_DROPPED_BYTES: &str = "sked_retention_dropped_bytes_total";
/// Counter: events of runs still within the retention moved out of a day
/// that was dropped (into the default partition), so they were kept.
pub const RETENTION_EVENTS_KEPT: &str = "sked_retention_events_kept_total";
/// Counter: runs retention deleted (final, ended before the cutoff).
pub const RETENTION_RUNS_DELETED: &str = "sked_retention_runs_deleted_total";
/// Counter: audit events retention deleted (`--audit-retention`).
pub const RETENTION_AUDIT_DELETED: &str = "sked_retention_audit_events_deleted_total";
/// Counter `{step}`: retention steps that failed and are retried at the next
/// pass (`partition_create`, `run_delete`, `partition_detach`,
/// `partition_drop`, `audit_delete`; a lock timeout counts).
pub const RETENTION_ERRORS: &str = "sked_retention_errors_total";
/// Gauge, seconds since the epoch: when the last complete retention pass
/// ended (the leader's clock); 0 until one did on this node.
pub const RETENTION_LAST_PASS: &str = "sked_retention_last_pass_timestamp_seconds";
/// Gauge `{state}`: day tables of `run_events`, `attached` (partitions) and
/// `detached` (dropped from the table, archive pending), at the last pass.
pub const RUN_EVENT_PARTITIONS: &str = "sked_run_event_partitions";
/// Counter: events written to archive files (`--archive-dir`).
pub const ARCHIVE_EVENTS: &str = "sked_archive_events_total";
/// Counter: archive files written (complete, synced and renamed).
pub const ARCHIVE_FILES: &str = "sked_archive_files_total";
/// Counter: archive writes that failed; the day stays (detached) and is
/// tried again at the next pass.
pub const ARCHIVE_FAILURES: &str = "sked_archive_failures_total";

/// Gauge `{[tenant]}`: bindings whose status is `FAILING` (their last 3
/// final outcomes failed, and they are neither broken, disabled, paused nor
/// completed), cluster-wide, sampled every 10 s (the same on every node:
/// aggregate with `max`).
pub const FAILING_BINDINGS: &str = "sked_failing_bindings";

/// Buckets of [`FIRE_LAG`], seconds.
pub const FIRE_LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets of [`RUN_DURATION`], seconds.
pub const RUN_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];
/// Buckets of [`CLAIM_DURATION`] and [`SCHEDULER_PASS_DURATION`], seconds.
pub const PASS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

static TENANT_LABEL: AtomicBool = AtomicBool::new(false);

/// Adds a `tenant` label to the per-run metrics ([`FIRES`],
/// [`RUNS_FINISHED`], [`FIRE_LAG`], [`RUN_DURATION`]) from now on
/// (`--metrics-tenant-label`: one series per tenant, so only where tenants
/// are few).
pub fn set_tenant_label(on: bool) {
    TENANT_LABEL.store(on, Ordering::Relaxed);
}

fn tenant_label() -> bool {
    TENANT_LABEL.load(Ordering::Relaxed)
}

/// Registers the description and unit of every metric (shown as `# HELP`).
pub fn describe() {
    describe_gauge!(
        FAILING_BINDINGS,
        Unit::Count,
        "Bindings whose status is FAILING (last 3 final outcomes failed), cluster-wide, sampled"
    );
    describe_counter!(
        FIRES,
        Unit::Count,
        "Fires the scheduler made, by outcome: run, or why skipped (misfire, overlap, quota, other)"
    );
    describe_counter!(
        RUNS_FINISHED,
        Unit::Count,
        "Runs that reached a final state on this node, by state"
    );
    describe_histogram!(
        FIRE_LAG,
        Unit::Seconds,
        "Start time minus fire time of SCHEDULE runs started on this node"
    );
    describe_histogram!(
        RUN_DURATION,
        Unit::Seconds,
        "End minus start of runs that executed (command, http, worker), by final state"
    );
    describe_histogram!(
        CLAIM_DURATION,
        Unit::Seconds,
        "Duration of one claim statement, by kind (execute, event, worker)"
    );
    describe_histogram!(
        SCHEDULER_PASS_DURATION,
        Unit::Seconds,
        "Duration of one scheduler pass"
    );
    describe_counter!(
        EVENTS_PUBLISHED,
        Unit::Count,
        "Run events published on this node's bus, by origin (local, bridge)"
    );
    describe_counter!(
        EVENTS_DROPPED,
        Unit::Count,
        "Events WatchEvents subscribers of this node missed by reading too slowly"
    );
    describe_gauge!(
        STREAM_SUBSCRIBERS,
        Unit::Count,
        "Event-bus subscribers (TailRun, WatchEvents) of this node"
    );
    describe_gauge!(
        NODE_RUNNING_RUNS,
        Unit::Count,
        "Runs this node executes plus runs its connected workers hold"
    );
    describe_gauge!(
        CLUSTER_RUNS,
        Unit::Count,
        "Runs scheduled, queued and running over the whole cluster (sampled; same on every node)"
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "How long the oldest due QUEUED run has waited, cluster-wide (sampled)"
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        Unit::Count,
        "Database connections by pool (engine, api) and state (idle, in_use)"
    );
    describe_gauge!(DB_POOL_MAX, Unit::Count, "Database pool size limit by pool");
    describe_gauge!(LEADER, Unit::Count, "1 while this node leads maintenance");
    describe_gauge!(
        LEADER_TERM,
        Unit::Count,
        "Term of the maintenance lease while this node holds it"
    );
    describe_gauge!(
        HEALTH_SERVING,
        Unit::Count,
        "1 while gRPC health answers SERVING"
    );
    describe_counter!(
        ENGINE_RESTARTS,
        Unit::Count,
        "Engine tasks restarted after they died, by task"
    );
    describe_gauge!(BUILD_INFO, Unit::Count, "1, labelled with the sked version");
    describe_counter!(
        RETENTION_PARTITIONS_DROPPED,
        Unit::Count,
        "Day partitions of run_events dropped by retention"
    );
    describe_counter!(
        RETENTION_DROPPED_BYTES,
        Unit::Bytes,
        "Disk space of the run_events partitions retention dropped"
    );
    describe_counter!(
        RETENTION_EVENTS_KEPT,
        Unit::Count,
        "Events of runs within the retention moved out of a dropped day"
    );
    describe_counter!(
        RETENTION_RUNS_DELETED,
        Unit::Count,
        "Runs deleted by retention"
    );
    describe_counter!(
        RETENTION_AUDIT_DELETED,
        Unit::Count,
        "Audit events deleted by retention"
    );
    describe_counter!(
        RETENTION_ERRORS,
        Unit::Count,
        "Retention steps that failed (retried next pass), by step"
    );
    describe_gauge!(
        RETENTION_LAST_PASS,
        Unit::Seconds,
        "Unix time the last complete retention pass ended"
    );
    describe_gauge!(
        RUN_EVENT_PARTITIONS,
        Unit::Count,
        "Day tables of run_events by state (attached, detached)"
    );
    describe_counter!(
        ARCHIVE_EVENTS,
        Unit::Count,
        "Run events written to archive files"
    );
    describe_counter!(ARCHIVE_FILES, Unit::Count, "Archive files written");
    describe_counter!(
        ARCHIVE_FAILURES,
        Unit::Count,
        "Archive writes that failed (the day is kept and retried)"
    );
}

/// The `outcome` label of a fire created in `state` with `reason`.
fn fire_outcome(state: RunState, reason: &str) -> usize {
    match state {
        RunState::Skipped if reason.starts_with("misfire") => 1,
        RunState::Skipped if reason == "overlap" => 2,
        RunState::Skipped if reason == "quota" => 3,
        RunState::Skipped => 4,
        _ => 0,
    }
}

const FIRE_OUTCOMES: [&str; 5] = ["run", "misfire", "overlap", "quota", "other"];

/// Records a committed scheduler pass: its duration, its fires (the runs
/// it inserted) by outcome and the fire lag of the `event` fires it
/// completed inline (started at `now`).
pub fn scheduler_pass<'a>(
    elapsed: Duration,
    runs: impl IntoIterator<Item = &'a NewRun>,
    now: DateTime<Utc>,
) {
    histogram!(SCHEDULER_PASS_DURATION).record(elapsed.as_secs_f64());
    let mut runs = runs.into_iter().peekable();
    if runs.peek().is_none() {
        return;
    }
    if tenant_label() {
        for r in runs {
            let o = FIRE_OUTCOMES[fire_outcome(r.state, &r.reason)];
            counter!(FIRES, "outcome" => o, "tenant" => r.tenant_id.clone()).increment(1);
            if r.state == RunState::Succeeded && r.trigger == RunTrigger::Schedule {
                histogram!(FIRE_LAG, "tenant" => r.tenant_id.clone())
                    .record(lag_secs(r.scheduled_time, now));
            }
        }
        return;
    }
    let mut n = [0u64; 5];
    let lag = histogram!(FIRE_LAG);
    for r in runs {
        n[fire_outcome(r.state, &r.reason)] += 1;
        if r.state == RunState::Succeeded && r.trigger == RunTrigger::Schedule {
            lag.record(lag_secs(r.scheduled_time, now));
        }
    }
    for (outcome, n) in FIRE_OUTCOMES.iter().zip(n) {
        if n > 0 {
            counter!(FIRES, "outcome" => *outcome).increment(n);
        }
    }
}

fn lag_secs(scheduled: DateTime<Utc>, start: DateTime<Utc>) -> f64 {
    ((start - scheduled).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
}

/// Records a claim of `kind` (`execute`, `event`, `worker`) that took
/// `elapsed`, and the fire lag of the `SCHEDULE` runs it started.
pub fn claimed<'a>(kind: &'static str, elapsed: Duration, runs: impl IntoIterator<Item = &'a Run>) {
    histogram!(CLAIM_DURATION, "kind" => kind).record(elapsed.as_secs_f64());
    let by_tenant = tenant_label();
    let lag = histogram!(FIRE_LAG);
    for r in runs {
        if r.trigger != RunTrigger::Schedule {
            continue;
        }
        let Some(start) = r.start_time else { continue };
        let secs = lag_secs(r.scheduled_time, start);
        if by_tenant {
            histogram!(FIRE_LAG, "tenant" => r.tenant_id.clone()).record(secs);
        } else {
            lag.record(secs);
        }
    }
}

/// Records the durations of runs that executed and ended (as written:
/// `start_time` and `end_time` set).
pub fn run_durations<'a>(runs: impl IntoIterator<Item = &'a Run>) {
    for r in runs {
        run_duration(r.state, &r.tenant_id, r.start_time, r.end_time);
    }
}

/// Records the duration of one run of `tenant` that ended in `state`
/// (nothing unless both times are known).
pub fn run_duration(
    state: RunState,
    tenant: &str,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
) {
    let (Some(start), Some(end)) = (start, end) else {
        return;
    };
    let secs = lag_secs(start, end);
    let state = state_label(state);
    if tenant_label() {
        histogram!(RUN_DURATION, "state" => state, "tenant" => tenant.to_string()).record(secs);
    } else {
        histogram!(RUN_DURATION, "state" => state).record(secs);
    }
}

/// The label spelling of a state (`timed_out`, ...).
pub fn state_label(s: RunState) -> &'static str {
    match s {
        RunState::Scheduled => "scheduled",
        RunState::Queued => "queued",
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::TimedOut => "timed_out",
        RunState::Cancelled => "cancelled",
        RunState::Skipped => "skipped",
    }
}

const FINAL: [RunState; 5] = [
    RunState::Succeeded,
    RunState::Failed,
    RunState::TimedOut,
    RunState::Cancelled,
    RunState::Skipped,
];

/// Records a batch of run events published on the bus: counted as
/// published (`local` or not), and, for events this node wrote, its final
/// state changes as [`RUNS_FINISHED`]. Every state change is an event
/// published by the node that wrote it (persist first, publish second), so
/// this one place counts every way a run ends: executor, reaper, worker
/// completions, cancels, skipped fires.
pub fn published<'a>(events: impl ExactSizeIterator<Item = &'a RunEvent>, local: bool) {
    if events.len() == 0 {
        return;
    }
    let origin = if local { "local" } else { "bridge" };
    counter!(EVENTS_PUBLISHED, "origin" => origin).increment(events.len() as u64);
    if !local {
        return;
    }
    let by_tenant = tenant_label();
    let mut n = [0u64; 5];
    for e in events {
        if let EventBody::StateChanged { to, .. } = &e.body
            && let Some(i) = FINAL.iter().position(|s| s == to)
        {
            if by_tenant {
                counter!(RUNS_FINISHED, "state" => state_label(*to), "tenant" => e.tenant_id.clone())
                    .increment(1);
            } else {
                n[i] += 1;
            }
        }
    }
    for (s, n) in FINAL.iter().zip(n) {
        if n > 0 {
            counter!(RUNS_FINISHED, "state" => state_label(*s)).increment(n);
        }
    }
}

/// Records events a WatchEvents subscriber missed.
pub fn events_dropped(n: u64) {
    counter!(EVENTS_DROPPED).increment(n);
}

/// Tenants the last [`failing_bindings`] sample labelled, so that one whose
/// bindings recovered reads 0 rather than its old count.
static FAILING_TENANTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Sets [`FAILING_BINDINGS`] from a sample of `(tenant, failing bindings)`
/// (tenants with none left out): the total, or one series per tenant with
/// the tenant label (tenants seen before and absent now read 0).
pub fn failing_bindings(by_tenant: &[(String, i64)]) {
    if !tenant_label() {
        let total: i64 = by_tenant.iter().map(|(_, n)| n).sum();
        ::metrics::gauge!(FAILING_BINDINGS).set(total as f64);
        return;
    }
    let mut seen = FAILING_TENANTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for t in seen.iter() {
        if !by_tenant.iter().any(|(x, _)| x == t) {
            ::metrics::gauge!(FAILING_BINDINGS, "tenant" => t.clone()).set(0.0);
        }
    }
    seen.clear();
    for (t, n) in by_tenant {
        ::metrics::gauge!(FAILING_BINDINGS, "tenant" => t.clone()).set(*n as f64);
        seen.push(t.clone());
    }
}
