//! `workers`: runs executed by remote workers over `WorkerService.Work`
//! (targets, `docs/operations.md`: ≥ 10 000 completed worker runs/s, and
//! dispatch p99 ≤ 20 ms at 1 000 runs/s offered).
//!
//! Workers: W tokio tasks in the bench process (`--workers`), each with one
//! `Work` stream to node `w mod K`, `Hello { queue: "bench", worker_name,
//! slots: S }` (`--slots`). Their handler is a no-op: every `Assigned` is
//! completed at once on its stream, and completions are batched — a writer
//! task takes what has arrived since its last send (up to 1000) and sends
//! one `WorkerRequest` with that many `completes`. Authentication is off on
//! the nodes, so a worker takes every tenant's runs of the queue.
//!
//! Definitions have the handler `worker { queue: "bench" }` and overlap
//! policy ALLOW (a binding's runs are independent). Two phases, each with
//! its own W workers (connected at its start, closed at its end):
//!
//! 1. **Dispatch latency** at a steady offered `--rate` runs/s for `--secs`
//!    seconds. B bindings (`--bindings`, over T tenants) of a manual
//!    schedule; every 10 ms the bench issues the TriggerRun calls due so far
//!    (rate × elapsed), on the bindings in turn, each with `run_time` =
//!    now + `--lead-ms`, so that every run is created SCHEDULED before it is
//!    due and its dispatch is the engine's (promotion when due, claim, push
//!    on the stream), not the API call's. Dispatch latency = the instant
//!    the worker received `Assigned` − the run's `run_time` (same clock),
//!    p50/p99/max. A run whose TriggerRun answered after its `run_time` was
//!    not created ahead: such runs are counted (`created_late`) and still
//!    measured.
//!    After the phase the latency is split in its stages, from the
//!    database (node and bench read one clock): *promotion* = the run's
//!    `QUEUED` event time − `run_time`; *claim* = its `start_time` − that;
//!    *delivery* = received − `start_time` (the claim's statement and
//!    commit, the stream and the worker's read), p50 and p99 of each.
//! 2. **Throughput: a backlog drained.** B bindings of an interval schedule
//!    of 1 s with their effective window ended (as `throughput` does), and
//!    `--backlog` runs created by BackfillRuns of past fire times (at most
//!    1000 per call, fire times within the last 2 h, schedule-to-start
//!    timeout 24 h) *before* any worker is connected, so they all wait
//!    QUEUED. Then the W workers connect; completed runs/s = runs acked OK
//!    ÷ (last OK ack − workers started). The runs SUCCEEDED in the database
//!    are counted as a check. This is a saturation figure: the workers
//!    always have a queue to take from, and nothing else loads the machine.
//!
//! Then the nodes are stopped and, unless `--ceiling-secs 0`, the machine's
//! batched row-insert ceiling is measured as in `throughput` (the same
//! code): the ratio of worker runs/s to it is reported for information.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use clap::Args;
use serde_json::json;
use sked::proto::v1::{self as pb, worker_response::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::Common;
use crate::api::{self, Bound, Layout, RunServiceClient};
use crate::env::{CpuUse, Env, progress};
use crate::report::{Report, Target};
use crate::stats::{Histogram, ms1o, round};
use crate::throughput;

/// Flags of `workers`.
#[derive(Debug, Clone, Args)]
pub struct WorkersArgs {
    /// Worker streams (tokio tasks in the bench process).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Slots per worker (`Hello.slots`, 1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub slots: u32,
    /// Offered runs/s of the dispatch latency phase (TriggerRun calls).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Length of the dispatch latency phase, seconds.
    #[arg(long, default_value_t = 20)]
    pub secs: u64,
    /// How far ahead of its TriggerRun call each run is due, ms.
    #[arg(long, default_value_t = 200)]
    pub lead_ms: u64,
    /// Bindings of each phase (spread over the tenants).
    #[arg(long, default_value_t = 100)]
    pub bindings: usize,
    /// Runs of the throughput phase's backlog.
    #[arg(long, default_value_t = 50_000)]
    pub backlog: u64,
    /// TriggerRun / BackfillRuns calls in flight at most.
    #[arg(long, default_value_t = 64)]
    pub calls_in_flight: usize,
    /// Length of the ceiling measurement, seconds (0: not measured).
    #[arg(long, default_value_t = 5)]
    pub ceiling_secs: u64,
    /// Connections inserting concurrently in the ceiling measurement.
    #[arg(long, default_value_t = 2)]
    pub ceiling_connections: usize,
    #[command(flatten)]
    pub common: Common,
}

/// The queue every bench definition names.
const QUEUE: &str = "bench";
/// Most fire times per BackfillRuns call.
const PER_CALL: u64 = 1000;
/// Most completions per WorkerRequest (the API's limit).
const MAX_BATCH: usize = 1000;

/// What the workers of one phase saw, shared by their tasks.
#[derive(Default)]
struct Seen {
    /// Assigned messages received.
    assigned: AtomicU64,
    /// Completions acked OK.
    ok: AtomicU64,
    /// Completions acked with another code.
    rejected: AtomicU64,
    /// Cancel messages received (none expected with overlap ALLOW).
    cancels: AtomicU64,
    /// Completion batches sent.
    batches: AtomicU64,
    /// Whether to record `(run id, receipt time)` per Assigned.
    record: AtomicBool,
    /// `(run id, when the Assigned arrived)`, when recording.
    received: Mutex<Vec<(String, DateTime<Utc>)>>,
    /// When the last OK ack arrived.
    last_ok: Mutex<Option<Instant>>,
    /// The first stream or ack error.
    error: Mutex<Option<String>>,
}

impl Seen {
    fn note_error(&self, e: String) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(e);
    }
}

/// W worker tasks of one phase.
struct Workers {
    seen: Arc<Seen>,
    tasks: tokio::task::JoinSet<()>,
    started: Instant,
}

impl Workers {
    /// Connects `n` workers with `slots` slots each, round-robin over the
    /// nodes.
    fn start(env: &Env, n: usize, slots: u32, record: bool) -> Workers {
        let seen = Arc::new(Seen::default());
        seen.record.store(record, Ordering::Relaxed);
        let mut tasks = tokio::task::JoinSet::new();
        let channels = env.channels();
        for w in 0..n {
            let ch = channels[w % channels.len()].clone();
            let seen2 = Arc::clone(&seen);
            tasks.spawn(async move {
                if let Err(e) = worker(ch, w, slots, Arc::clone(&seen2)).await {
                    seen2.note_error(format!("worker {w}: {e:#}"));
                }
            });
        }
        Workers {
            seen,
            tasks,
            started: Instant::now(),
        }
    }

    /// Closes every stream.
    async fn stop(mut self) -> Arc<Seen> {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.seen
    }
}

/// One worker: a Work stream whose Assigned runs are completed at once, in
/// batches (a writer task sends what has arrived since its last send).
async fn worker(ch: Channel, w: usize, slots: u32, seen: Arc<Seen>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<pb::WorkerRequest>(64);
    tx.send(pb::WorkerRequest {
        hello: Some(pb::Hello {
            queue: QUEUE.into(),
            worker_name: format!("bench-{w}"),
            slots,
            lease_tokens: vec![],
        }),
        ..Default::default()
    })
    .await?;
    let mut stream = pb::worker_service_client::WorkerServiceClient::new(ch)
        .work(tonic::Request::new(ReceiverStream::new(rx)))
        .await?
        .into_inner();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let writer_seen = Arc::clone(&seen);
    // The writer ends when `done_tx` is dropped (this function returning,
    // or its task aborted), and its end closes the request stream.
    let writer = tokio::spawn(async move {
        while let Some(t) = done_rx.recv().await {
            let mut completes = vec![pb::Complete {
                lease_token: t,
                result: None,
            }];
            while completes.len() < MAX_BATCH {
                match done_rx.try_recv() {
                    Ok(t) => completes.push(pb::Complete {
                        lease_token: t,
                        result: None,
                    }),
                    Err(_) => break,
                }
            }
            writer_seen.batches.fetch_add(1, Ordering::Relaxed);
            let req = pb::WorkerRequest {
                completes,
                ..Default::default()
            };
            if tx.send(req).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        while let Some(msg) = stream.message().await? {
            match msg.kind {
                Some(Kind::Assigned(a)) => {
                    let now = Utc::now();
                    seen.assigned.fetch_add(1, Ordering::Relaxed);
                    if seen.record.load(Ordering::Relaxed) {
                        seen.received
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((a.run_id, now));
                    }
                    if done_tx.send(a.lease_token).is_err() {
                        break;
                    }
                }
                Some(Kind::Ack(a)) => {
                    if a.code == 0 {
                        seen.ok.fetch_add(1, Ordering::Relaxed);
                        *seen.last_ok.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Instant::now());
                    } else {
                        seen.rejected.fetch_add(1, Ordering::Relaxed);
                        seen.note_error(format!("ack code {}: {}", a.code, a.message));
                    }
                }
                Some(Kind::Cancel(_)) => {
                    seen.cancels.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(done_tx);
    writer.abort();
    result
}

/// A triggered run: its id, its `run_time`, and whether the TriggerRun
/// call answered after that instant (the run was not created ahead).
type Triggered = (String, DateTime<Utc>, bool);

/// Results of the dispatch latency phase.
struct Latency {
    triggered: u64,
    failed_calls: u64,
    created_late: u64,
    matched: u64,
    hist: Histogram,
    offered_secs: f64,
    cpu: CpuUse,
    rejected: u64,
    error: Option<String>,
    /// The stages of dispatch latency, from the database (module docs).
    stages: Stages,
}

/// Dispatch latency in its stages, per received run: *promotion* = its
/// `QUEUED` event's time − `run_time`; *claim* = `start_time` − that;
/// *delivery* = received − `start_time` (node and bench read one clock).
#[derive(Default)]
struct Stages {
    promote: Histogram,
    claim: Histogram,
    deliver: Histogram,
}

/// Results of the throughput phase.
struct Drain {
    created: u64,
    ok: u64,
    secs: f64,
    succeeded_db: i64,
    batches: u64,
    rejected: u64,
    cpu: CpuUse,
    error: Option<String>,
}

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls or measurement queries failing.
pub async fn run(env: &mut Env, a: WorkersArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!((1..=1000).contains(&a.slots), "--slots must be 1..=1000");
    anyhow::ensure!(a.bindings >= 1, "--bindings must be at least 1");
    anyhow::ensure!(a.rate >= 1, "--rate must be at least 1");
    anyhow::ensure!(a.secs >= 1, "--secs must be at least 1");
    let latency = latency_phase(env, &a).await?;
    let drain = drain_phase(env, &a).await?;

    env.stop_nodes().await;
    let ceiling = if a.ceiling_secs > 0 {
        progress!(
            "ceiling: {} connections for {} s",
            a.ceiling_connections,
            a.ceiling_secs
        );
        let c = throughput::ceiling(env, a.ceiling_secs, a.ceiling_connections).await?;
        progress!("ceiling: {c:.0} rows/s");
        Some(c)
    } else {
        None
    };

    let rate = (drain.secs > 0.0).then(|| drain.ok as f64 / drain.secs);
    let ratio = match (rate, ceiling) {
        (Some(r), Some(c)) if c > 0.0 => Some(r / c * 100.0),
        _ => None,
    };
    let mut params = env.common.params();
    for (k, v) in [
        ("workers", json!(a.workers)),
        ("slots", json!(a.slots)),
        ("rate", json!(a.rate)),
        ("secs", json!(a.secs)),
        ("lead_ms", json!(a.lead_ms)),
        ("bindings", json!(a.bindings)),
        ("backlog", json!(a.backlog)),
        ("calls_in_flight", json!(a.calls_in_flight)),
        ("ceiling_secs", json!(a.ceiling_secs)),
        ("ceiling_connections", json!(a.ceiling_connections)),
    ] {
        params.insert(k.into(), v);
    }
    let mut r = Report::new(params);
    r.num(
        "completed_runs_per_s",
        "worker runs completed/s (backlog drained)",
        rate.map(|v| round(v, 1)),
        "runs/s",
        Target::AtLeast(10_000.0),
    );
    r.count(
        "backlog_created",
        "backlog runs created",
        drain.created as i64,
        Target::Info,
    );
    r.count(
        "backlog_completed",
        "backlog runs acked OK",
        drain.ok as i64,
        Target::Info,
    );
    r.count(
        "backlog_succeeded_db",
        "backlog runs SUCCEEDED (database)",
        drain.succeeded_db,
        Target::Info,
    );
    r.num(
        "drain_secs",
        "drain time",
        Some(round(drain.secs, 2)),
        "s",
        Target::Info,
    );
    r.num(
        "runs_per_batch",
        "completions per WorkerRequest (mean)",
        (drain.batches > 0).then(|| round(drain.ok as f64 / drain.batches as f64, 1)),
        "runs",
        Target::Info,
    );
    r.num(
        "drain_sked_cpu_percent",
        "sked CPU while draining",
        Some(round(drain.cpu.sked, 1)),
        "% of a core",
        Target::Info,
    );
    r.num(
        "drain_postgres_cpu_percent",
        "PostgreSQL CPU while draining",
        drain.cpu.pg.map(|v| round(v, 1)),
        "% of a core",
        Target::Info,
    );
    r.machine_cpu("drain", "while draining", &drain.cpu);
    let offered = latency.triggered as f64 / latency.offered_secs.max(1e-9);
    r.num(
        "offered_per_s",
        "offered runs/s (latency phase, created)",
        Some(round(offered, 1)),
        "runs/s",
        Target::Info,
    );
    r.count(
        "runs_triggered",
        "runs triggered",
        latency.triggered as i64,
        Target::Info,
    );
    r.count(
        "runs_received",
        "of them received by a worker",
        latency.matched as i64,
        Target::Equal(latency.triggered as f64),
    );
    r.count(
        "created_late",
        "of them created after their run_time",
        latency.created_late as i64,
        Target::Info,
    );
    r.num(
        "dispatch_p50_ms",
        "dispatch latency p50",
        ms1o(latency.hist.quantile_ms(0.5)),
        "ms",
        Target::Info,
    );
    r.num(
        "dispatch_p99_ms",
        "dispatch latency p99",
        ms1o(latency.hist.quantile_ms(0.99)),
        "ms",
        Target::AtMost(20.0),
    );
    for (key, label, h) in [
        ("promote", "promotion", &latency.stages.promote),
        ("claim", "claim", &latency.stages.claim),
        ("deliver", "delivery", &latency.stages.deliver),
    ] {
        for (q, qs) in [(0.5, "p50"), (0.99, "p99")] {
            r.num(
                &format!("dispatch_{key}_{qs}_ms"),
                &format!("  of it {label} {qs} (database times)"),
                ms1o(h.quantile_ms(q)),
                "ms",
                Target::Info,
            );
        }
    }
    r.num(
        "dispatch_max_ms",
        "dispatch latency max",
        ms1o(latency.hist.max_ms()),
        "ms",
        Target::Info,
    );
    r.num(
        "latency_sked_cpu_percent",
        "sked CPU at the steady rate",
        Some(round(latency.cpu.sked, 1)),
        "% of a core",
        Target::Info,
    );
    r.num(
        "latency_postgres_cpu_percent",
        "PostgreSQL CPU at the steady rate",
        latency.cpu.pg.map(|v| round(v, 1)),
        "% of a core",
        Target::Info,
    );
    r.machine_cpu("latency", "at the steady rate", &latency.cpu);
    r.num(
        "ceiling_rows_per_s",
        "PostgreSQL batched insert ceiling",
        ceiling.map(|v| round(v, 1)),
        "rows/s",
        Target::Info,
    );
    r.num(
        "ratio_percent",
        "worker runs/s ÷ ceiling rows/s",
        ratio.map(|v| round(v, 2)),
        "%",
        Target::Info,
    );
    r.count(
        "failed_calls",
        "TriggerRun calls failed",
        latency.failed_calls as i64,
        Target::Info,
    );
    r.count(
        "rejected_acks",
        "completions not acked OK",
        (latency.rejected + drain.rejected) as i64,
        Target::Equal(0.0),
    );
    for e in [latency.error, drain.error].into_iter().flatten() {
        r.note(format!("first error: {e}"));
    }
    Ok(r)
}

/// Phase 1: TriggerRun at a steady rate, runs due `lead_ms` after the call;
/// dispatch latency as the workers see it.
async fn latency_phase(env: &mut Env, a: &WorkersArgs) -> anyhow::Result<Latency> {
    let layout = Layout::new("bench.wlat", a.bindings, env.common.tenants);
    progress!(
        "latency: {} bindings (manual schedule), {} definitions over {} tenants",
        a.bindings,
        layout.definitions(),
        layout.tenants
    );
    api::create_definitions(env, &layout, |name| worker_def(name, api::manual())).await?;
    let bound = api::create_bindings(env, &layout, |_| None).await?;
    let workers = Workers::start(env, a.workers, a.slots, true);
    // Let the streams open before the first run is due.
    tokio::time::sleep(Duration::from_millis(500)).await;
    progress!(
        "latency: {} workers × {} slots; offering {} runs/s for {} s, each due {} ms after its call",
        a.workers,
        a.slots,
        a.rate,
        a.secs,
        a.lead_ms
    );
    let created: Arc<Mutex<Vec<Triggered>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<Option<String>>> = Arc::default();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.calls_in_flight.max(1)));
    let channels = env.channels();
    let mut calls = tokio::task::JoinSet::new();
    let lead = TimeDelta::milliseconds(a.lead_ms as i64);
    let cpu0 = env.cpu_snapshot().await;
    let t0 = Instant::now();
    let len = Duration::from_secs(a.secs);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut issued = 0u64;
    loop {
        ticker.tick().await;
        let elapsed = t0.elapsed().min(len);
        let due = ((a.rate as f64) * elapsed.as_secs_f64()).floor() as u64;
        while issued < due {
            let b = (issued as usize) % bound.len();
            issued += 1;
            let Bound { id, tenant } = bound[b].clone();
            let ch = channels[b % channels.len()].clone();
            let (sem, created, failed, errors) = (
                Arc::clone(&sem),
                Arc::clone(&created),
                Arc::clone(&failed),
                Arc::clone(&errors),
            );
            calls.spawn(async move {
                let Ok(_permit) = sem.acquire_owned().await else {
                    return;
                };
                let run_time = api::now_us() + lead;
                let r = RunServiceClient::new(ch)
                    .trigger_run(api::req(
                        &tenant,
                        pb::TriggerRunRequest {
                            binding_id: id,
                            run_time: Some(api::ts(run_time)),
                            ..Default::default()
                        },
                    ))
                    .await;
                let late = Utc::now() > run_time;
                match r {
                    Ok(run) => created.lock().unwrap_or_else(|p| p.into_inner()).push((
                        run.into_inner().id,
                        run_time,
                        late,
                    )),
                    Err(s) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut e = errors.lock().unwrap_or_else(|p| p.into_inner());
                        e.get_or_insert_with(|| format!("TriggerRun: {s}"));
                    }
                }
            });
        }
        while calls.try_join_next().is_some() {}
        if elapsed >= len {
            break;
        }
    }
    let offered_secs = t0.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while calls.join_next().await.is_some() {}
    })
    .await;
    calls.abort_all();
    let cpu1 = env.cpu_snapshot().await;
    let triggered = created.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
    // Wait for the last runs to be due and reach the workers.
    let wait_until = Instant::now() + Duration::from_millis(a.lead_ms) + Duration::from_secs(30);
    while workers.seen.assigned.load(Ordering::Relaxed) < triggered && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And for their completions to be acked.
    let ack_until = Instant::now() + Duration::from_secs(10);
    while workers.seen.ok.load(Ordering::Relaxed) + workers.seen.rejected.load(Ordering::Relaxed)
        < workers.seen.assigned.load(Ordering::Relaxed)
        && Instant::now() < ack_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = workers.stop().await;
    let received: std::collections::HashMap<String, DateTime<Utc>> =
        std::mem::take(&mut *seen.received.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect();
    let created = std::mem::take(&mut *created.lock().unwrap_or_else(|p| p.into_inner()));
    let mut hist = Histogram::default();
    let mut matched = 0u64;
    let mut created_late = 0u64;
    for (id, due, late) in &created {
        created_late += u64::from(*late);
        if let Some(at) = received.get(id) {
            matched += 1;
            let us = (*at - *due).num_microseconds().unwrap_or(0).max(0) as u64;
            hist.record(us);
        }
    }
    let error = errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .or_else(|| seen.error.lock().unwrap_or_else(|p| p.into_inner()).take());
    progress!(
        "latency: {triggered} runs triggered, {matched} received; p50 {} ms, p99 {} ms, max {} ms",
        hist.quantile_ms(0.5).unwrap_or(f64::NAN),
        hist.quantile_ms(0.99).unwrap_or(f64::NAN),
        hist.max_ms().unwrap_or(f64::NAN),
    );
    let stages = stages(env, &created, &received).await?;
    for (name, h) in [
        ("promotion", &stages.promote),
        ("claim", &stages.claim),
        ("delivery", &stages.deliver),
    ] {
        progress!(
            "latency: {name} p50 {} ms, p99 {} ms",
            h.quantile_ms(0.5).unwrap_or(f64::NAN),
            h.quantile_ms(0.99).unwrap_or(f64::NAN),
        );
    }
    Ok(Latency {
        triggered,
        failed_calls: failed.load(Ordering::Relaxed),
        created_late,
        matched,
        hist,
        offered_secs,
        cpu: cpu0.percent_until(&cpu1),
        rejected: seen.rejected.load(Ordering::Relaxed),
        error,
        stages,
    })
}

/// The stages of each received run's dispatch ([`Stages`]), read from its
/// `QUEUED` event and its `start_time`.
async fn stages(
    env: &Env,
    created: &[Triggered],
    received: &std::collections::HashMap<String, DateTime<Utc>>,
) -> anyhow::Result<Stages> {
    let mut out = Stages::default();
    let us = |d: TimeDelta| d.num_microseconds().unwrap_or(0).max(0) as u64;
    for chunk in created.chunks(5000) {
        let ids: Vec<uuid::Uuid> = chunk
            .iter()
            .filter_map(|(id, ..)| id.parse().ok())
            .collect();
        let rows: Vec<(uuid::Uuid, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT r.id, e.time, r.start_time FROM runs r \
             JOIN run_events e ON e.run_id = r.id AND e.kind = 'state_changed' \
                              AND e.payload->>'to' = 'QUEUED' \
             WHERE r.id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&env.pool)
        .await?;
        let queued: std::collections::HashMap<uuid::Uuid, (DateTime<Utc>, Option<DateTime<Utc>>)> =
            rows.into_iter().map(|(id, q, s)| (id, (q, s))).collect();
        for (id, due, _) in chunk {
            let (Ok(uid), Some(at)) = (id.parse::<uuid::Uuid>(), received.get(id)) else {
                continue;
            };
            let Some(&(q, Some(start))) = queued.get(&uid) else {
                continue;
            };
            out.promote.record(us(q - *due));
            out.claim.record(us(start - q));
            out.deliver.record(us(*at - start));
        }
    }
    Ok(out)
}

/// Phase 2: a backlog of QUEUED worker runs, then W workers drain it.
async fn drain_phase(env: &mut Env, a: &WorkersArgs) -> anyhow::Result<Drain> {
    let layout = Layout::new("bench.wload", a.bindings, env.common.tenants);
    progress!(
        "throughput: {} bindings (window ended), {} definitions; backlog of {} runs",
        a.bindings,
        layout.definitions(),
        a.backlog
    );
    api::create_definitions(env, &layout, |name| {
        worker_def(name, api::interval(1, None))
    })
    .await?;
    let bound = api::create_ended_bindings(env, &layout, |_| None).await?;
    // A scheduled run (none expected) would be a worker run too: the
    // workers take it with the backlog, and it is not counted in it.
    let fired = throughput::scheduled_fires(env).await?;
    // Call i covers PER_CALL past seconds of binding i mod B, the (i div B)th
    // range of it, starting 2 h back on whole seconds. Not further: a worker
    // run's schedule-to-start timeout counts from its fire time, and the
    // definitions set the longest one (24 h), so no backlog run ends
    // `no_worker` while it waits.
    let base = Utc::now() - TimeDelta::hours(2);
    let base = base - TimeDelta::nanoseconds(i64::from(base.timestamp_subsec_nanos()));
    let n_calls = a.backlog.div_ceil(PER_CALL) as usize;
    let channels = env.channels();
    let backlog = a.backlog;
    let in_flight = a.calls_in_flight.min(2 * layout.tenants * channels.len());
    let counts = api::bulk("BackfillRuns", n_calls, in_flight, |i| {
        let b = i % bound.len();
        let Bound { id, tenant } = bound[b].clone();
        let ch = channels[b % channels.len()].clone();
        let k = PER_CALL.min(backlog - i as u64 * PER_CALL);
        let from = base + TimeDelta::seconds(((i / bound.len()) as u64 * PER_CALL) as i64);
        let to = from + TimeDelta::seconds(k as i64);
        async move {
            // sked allows 2 BackfillRuns calls at once per tenant and
            // connection: a refused call is retried once another answered.
            loop {
                let r = RunServiceClient::new(ch.clone())
                    .backfill_runs(api::req(
                        &tenant,
                        pb::BackfillRunsRequest {
                            binding_id: id.clone(),
                            start_time: Some(api::ts(from)),
                            end_time: Some(api::ts(to)),
                            dry_run: false,
                        },
                    ))
                    .await;
                match r {
                    Ok(r) => return Ok(r.into_inner().run_ids.len() as u64),
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(s) => return Err(s.into()),
                }
            }
        }
    })
    .await?;
    let created: u64 = counts.iter().sum();
    progress!("throughput: {created} runs QUEUED; connecting the workers");
    let cpu0 = env.cpu_snapshot().await;
    let workers = Workers::start(env, a.workers, a.slots, false);
    let started = workers.started;
    let limit = Duration::from_secs(60u64.max(created / 500));
    let mut last_note = Instant::now();
    while workers.seen.ok.load(Ordering::Relaxed) + workers.seen.rejected.load(Ordering::Relaxed)
        < created + fired
        && started.elapsed() < limit
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if last_note.elapsed() >= Duration::from_secs(5) {
            last_note = Instant::now();
            progress!(
                "throughput: {} of {created} completed",
                workers.seen.ok.load(Ordering::Relaxed)
            );
        }
    }
    let cpu1 = env.cpu_snapshot().await;
    let seen = workers.stop().await;
    let ok = seen.ok.load(Ordering::Relaxed).saturating_sub(fired);
    let last = *seen.last_ok.lock().unwrap_or_else(|p| p.into_inner());
    let secs = last.map_or(0.0, |l| l.duration_since(started).as_secs_f64());
    let succeeded_db: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE trigger = 'BACKFILL' AND state = 'SUCCEEDED'",
    )
    .fetch_one(&env.pool)
    .await?;
    progress!(
        "throughput: {ok} completed in {secs:.2} s ({:.0} runs/s), {succeeded_db} SUCCEEDED in the database",
        ok as f64 / secs.max(1e-9)
    );
    let error = seen.error.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(Drain {
        created,
        ok,
        secs,
        succeeded_db,
        batches: seen.batches.load(Ordering::Relaxed),
        rejected: seen.rejected.load(Ordering::Relaxed),
        cpu: cpu0.percent_until(&cpu1),
        error,
    })
}

/// A definition of the `worker { queue: "bench" }` handler, overlap ALLOW,
/// schedule-to-start timeout 24 h (the longest).
fn worker_def(name: &str, schedule: pb::Schedule) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Worker(pb::WorkerHandler {
            queue: QUEUE.into(),
            schedule_to_start_timeout: Some(api::secs(24 * 3600)),
        })),
        schedule: Some(schedule),
        overlap_policy: pb::OverlapPolicy::Allow as i32,
        ..Default::default()
    }
}
