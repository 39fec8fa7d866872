//! `throughput`: sustained completed runs/s against the machine's batched
//! PostgreSQL row-insert ceiling (target, `docs/operations.md`: ≥ 50 % of the ceiling).
//!
//! Setup: definitions `bench.load.<j>` with the `event` handler, an interval
//! schedule of 1 s and overlap policy ALLOW (backfilled fire times of one
//! binding are independent runs, so none waits for another of its binding);
//! B bindings, each created with its effective window already ended
//! (`effective_until` = the start of their creation) so that it never
//! fires by itself. BackfillRuns
//! creates runs for past fire times inside the window, so the
//! bindings are pure load generators through the public API. (Not paused:
//! a paused binding's backfilled runs wait for its resume.)
//!
//! Offered load: steps of `--step-secs`, starting at `--start-rate` runs/s
//! and doubling up to `--max-rate`. Within a step, every `--tick-ms` the bench
//! issues the runs due so far (rate × elapsed, so the rate is smooth) as
//! BackfillRuns calls of at most `--max-runs-per-call` fire times each, on
//! the bindings in turn; each call covers the next disjoint range of k past
//! seconds of its binding (k runs, all QUEUED at once). The load stops
//! rising after a step in which completions did not keep up: completed
//! < 90 % of offered, or a QUEUED backlog at the step's end larger than one
//! step's offer (or when the max rate's step has run).
//!
//! A completed run is one that reached SUCCEEDED with its state changes and
//! its `fired` event persisted (the event handler's one line of output).
//! BackfillRuns writes these runs SUCCEEDED itself (they may start at once
//! and hold no slot), so by default this measures run creation through the
//! API with the full history written; with `--tenant-max-concurrent-runs`
//! every tenant has a concurrency quota, the runs are queued and claimed,
//! and this measures the queue.
//! After the steps the backlog drains (up to 60 s); then per step, from the
//! database: runs completed (`end_time` inside the step) per second. The
//! figure is the highest of these. The nodes are then stopped, so that the
//! ceiling is measured on a quiet database.
//!
//! Ceiling, same run, same database: a scratch table shaped like
//! `run_events` (uuid, bigint, timestamptz, text, uuid, text, text, jsonb;
//! primary key (uuid, bigint)), filled in 100-row batches — one multi-row
//! `INSERT ... SELECT FROM UNNEST(...)` per batch, one statement per
//! transaction — from 2 connections for 5 s: rows/s. Ratios: completed
//! runs/s ÷ ceiling rows/s (the target line), and "row-equivalent":
//! (runs/s × rows sked writes per run) ÷ ceiling, where rows per run =
//! (runs rows + run_events rows of the completed runs) ÷ completed runs,
//! measured. (Row *updates* — with a quota, a run row is written twice:
//! inserted QUEUED, then rewritten SUCCEEDED by the claim — and the audit
//! row per BackfillRuns call are not counted.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, TimeDelta, Utc};
use clap::Args;
use serde_json::json;
use sked::proto::v1 as pb;

use crate::Common;
use crate::api::{self, Layout, RunServiceClient};
use crate::env::{CpuUse, Env, progress};
use crate::report::{Report, Target};
use crate::stats::round;

/// Flags of `throughput`.
#[derive(Debug, Clone, Args)]
pub struct ThroughputArgs {
    /// Bindings the load is spread over.
    #[arg(long, default_value_t = 100)]
    pub bindings: usize,
    /// Length of each load step, seconds.
    #[arg(long, default_value_t = 5)]
    pub step_secs: u64,
    /// Offered runs/s of the first step.
    #[arg(long, default_value_t = 500)]
    pub start_rate: u64,
    /// Highest offered runs/s (the rate doubles per step up to this).
    #[arg(long, default_value_t = 200_000)]
    pub max_rate: u64,
    /// Period at which BackfillRuns calls are issued within a step, ms.
    #[arg(long, default_value_t = 50)]
    pub tick_ms: u64,
    /// Most fire times per BackfillRuns call (the API allows 10 000).
    #[arg(long, default_value_t = 1000)]
    pub max_runs_per_call: u64,
    /// BackfillRuns calls in flight at most.
    #[arg(long, default_value_t = 64)]
    pub calls_in_flight: usize,
    /// Length of the ceiling measurement, seconds.
    #[arg(long, default_value_t = 5)]
    pub ceiling_secs: u64,
    /// Connections inserting concurrently in the ceiling measurement.
    #[arg(long, default_value_t = 2)]
    pub ceiling_connections: usize,
    /// Give every tenant a `max_concurrent_runs` quota of this many runs
    /// (SetTenantQuota, 1-1e9) before the load: its backfilled event runs
    /// are then queued and claimed, as runs that wait for a slot are,
    /// instead of completed by BackfillRuns itself. Measures the queue
    /// (claim) path. Unset: no quota.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1_000_000_000))]
    pub tenant_max_concurrent_runs: Option<i32>,
    #[command(flatten)]
    pub common: Common,
}

/// Longest wait for the backlog to drain after the last step.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Rows per INSERT in the ceiling measurement.
const CEILING_BATCH: usize = 100;

/// One load step as it ran.
#[derive(Debug, Clone)]
struct Step {
    /// Offered runs/s.
    rate: u64,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// Runs the step meant to offer (rate × step length).
    offered: u64,
    /// Runs the BackfillRuns calls created.
    created: u64,
    /// Calls that failed (their runs are not in `created`).
    failed_calls: u64,
    /// QUEUED runs at the step's end.
    backlog: i64,
    /// Runs completed inside the step (set after the drain, from end_time).
    completed: i64,
    cpu: CpuUse,
}

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls or measurement queries failing.
pub async fn run(env: &mut Env, a: ThroughputArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.bindings >= 1, "--bindings must be at least 1");
    anyhow::ensure!(a.step_secs >= 1, "--step-secs must be at least 1");
    anyhow::ensure!(a.start_rate >= 1, "--start-rate must be at least 1");
    anyhow::ensure!(a.tick_ms >= 1, "--tick-ms must be at least 1");
    anyhow::ensure!(
        (1..=10_000).contains(&a.max_runs_per_call),
        "--max-runs-per-call must be 1..=10000"
    );
    let layout = Layout::new("bench.load", a.bindings, env.common.tenants);
    progress!(
        "throughput: {} bindings (window ended), {} definitions over {} tenants",
        a.bindings,
        layout.definitions(),
        layout.tenants
    );
    api::create_definitions(env, &layout, |name| pb::TaskDefinition {
        overlap_policy: pb::OverlapPolicy::Allow as i32,
        ..api::event_def(name, api::interval(1, None))
    })
    .await?;
    let bound = api::create_ended_bindings(env, &layout, |_| None).await?;
    if let Some(n) = a.tenant_max_concurrent_runs {
        let mut tenants: Vec<&str> = bound.iter().map(|b| b.tenant.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        progress!(
            "throughput: max_concurrent_runs {n} for each of {} tenants",
            tenants.len()
        );
        let mut admin =
            pb::admin_service_client::AdminServiceClient::new(env.channels()[0].clone());
        for t in tenants {
            admin
                .set_tenant_quota(api::req(
                    "",
                    pb::SetTenantQuotaRequest {
                        quota: Some(pb::TenantQuota {
                            tenant_id: t.to_string(),
                            max_concurrent_runs: Some(n),
                            ..Default::default()
                        }),
                    },
                ))
                .await
                .with_context(|| format!("SetTenantQuota of {t}"))?;
        }
    }

    // Each binding's next backfill range starts at its cursor and moves
    // forward; the cursors start a week back (well inside retention) on
    // whole seconds, so every k-second range holds exactly k fire times.
    let base = Utc::now() - TimeDelta::days(7);
    let mut cursors: Vec<DateTime<Utc>> = vec![base; bound.len()];
    let mut next_binding = 0usize;
    let channels = env.channels();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.calls_in_flight.max(1)));
    let mut steps: Vec<Step> = Vec::new();
    let mut first_error: Option<String> = None;
    let mut rate = a.start_rate.min(a.max_rate.max(1));
    loop {
        let offered = rate * a.step_secs;
        progress!(
            "step {}: offering {rate} runs/s for {} s",
            steps.len() + 1,
            a.step_secs
        );
        let created = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut calls = tokio::task::JoinSet::new();
        let errors = Arc::new(std::sync::Mutex::new(None::<String>));
        let cpu0 = env.cpu_snapshot().await;
        let start = Utc::now();
        let t0 = Instant::now();
        let step_len = Duration::from_secs(a.step_secs);
        let mut ticker = tokio::time::interval(Duration::from_millis(a.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut issued = 0u64;
        loop {
            ticker.tick().await;
            let elapsed = t0.elapsed().min(step_len);
            let due = ((rate as f64) * elapsed.as_secs_f64()).floor() as u64;
            let mut emit = due.saturating_sub(issued);
            while emit > 0 {
                let k = emit.min(a.max_runs_per_call);
                emit -= k;
                issued += k;
                let b = next_binding % bound.len();
                next_binding += 1;
                let from = cursors[b];
                let to = from + TimeDelta::seconds(k as i64);
                cursors[b] = to;
                let (id, tenant) = (bound[b].id.clone(), bound[b].tenant.clone());
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
                    let r = RunServiceClient::new(ch)
                        .backfill_runs(api::req(
                            &tenant,
                            pb::BackfillRunsRequest {
                                binding_id: id,
                                start_time: Some(api::ts(from)),
                                end_time: Some(api::ts(to)),
                                dry_run: false,
                            },
                        ))
                        .await;
                    match r {
                        Ok(resp) => {
                            created.fetch_add(
                                resp.into_inner().run_ids.len() as u64,
                                Ordering::Relaxed,
                            );
                        }
                        Err(s) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut e = errors.lock().expect("not poisoned");
                            e.get_or_insert_with(|| format!("BackfillRuns: {s}"));
                        }
                    }
                });
            }
            while calls.try_join_next().is_some() {}
            if elapsed >= step_len {
                break;
            }
        }
        let end = Utc::now();
        let cpu1 = env.cpu_snapshot().await;
        // Runs still being created belong to this step's offer: let the
        // calls finish before judging the step (bounded).
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while calls.join_next().await.is_some() {}
        })
        .await;
        calls.abort_all();
        let backlog = queued(env).await?;
        let step = Step {
            rate,
            start,
            end,
            offered,
            created: created.load(Ordering::Relaxed),
            failed_calls: failed.load(Ordering::Relaxed),
            backlog,
            completed: completed_between(env, start, end).await?,
            cpu: cpu0.percent_until(&cpu1),
        };
        if let Some(e) = errors.lock().expect("not poisoned").take() {
            progress!("{e}");
            first_error.get_or_insert(e);
        }
        let secs = (end - start).num_microseconds().unwrap_or(1) as f64 / 1e6;
        progress!(
            "step {}: offered {rate}/s, created {:.0}/s, completed {:.0}/s, backlog {backlog}, sked CPU {:.0} %, PostgreSQL CPU {}",
            steps.len() + 1,
            step.created as f64 / secs,
            step.completed as f64 / secs,
            step.cpu.sked,
            step.cpu.pg.map_or("n/a".into(), |v| format!("{v:.0} %")),
        );
        let kept_up = (step.completed as f64) >= 0.9 * offered as f64 && backlog <= offered as i64;
        steps.push(step);
        if !kept_up || rate >= a.max_rate {
            break;
        }
        rate = (rate * 2).min(a.max_rate);
    }

    // Drain, then the exact per-step completions.
    let drain_started = Instant::now();
    while queued(env).await? > 0 && drain_started.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = queued(env).await?;
    progress!(
        "drained in {:.1} s ({left} still QUEUED)",
        drain_started.elapsed().as_secs_f64()
    );
    for s in &mut steps {
        s.completed = completed_between(env, s.start, s.end).await?;
    }
    let step_rate = |s: &Step| {
        let secs = (s.end - s.start).num_microseconds().unwrap_or(1) as f64 / 1e6;
        s.completed as f64 / secs
    };
    let best = steps
        .iter()
        .max_by(|x, y| step_rate(x).total_cmp(&step_rate(y)))
        .cloned();
    let best_rate = best.as_ref().map(step_rate).unwrap_or(0.0);
    let kept_up_rate = steps
        .iter()
        .filter(|s| s.completed as f64 >= 0.9 * s.offered as f64 && s.backlog <= s.offered as i64)
        .map(|s| s.rate)
        .max();

    let (runs_done, events_done): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM runs WHERE trigger = 'BACKFILL' AND state = 'SUCCEEDED'),
                (SELECT count(*) FROM run_events e JOIN runs r ON r.id = e.run_id
                 WHERE r.trigger = 'BACKFILL' AND r.state = 'SUCCEEDED')",
    )
    .fetch_one(&env.pool)
    .await?;
    let rows_per_run = (runs_done > 0).then(|| (runs_done + events_done) as f64 / runs_done as f64);

    // The ceiling is measured on a quiet database: a node still working
    // off a backlog would compete with it.
    if left > 0 {
        progress!("stopping the node(s) before the ceiling measurement ({left} runs still QUEUED)");
    }
    env.stop_nodes().await;
    progress!(
        "ceiling: {} connections × {CEILING_BATCH}-row batches for {} s",
        a.ceiling_connections,
        a.ceiling_secs
    );
    let ceiling = ceiling(env, a.ceiling_secs, a.ceiling_connections).await?;
    progress!("ceiling: {ceiling:.0} rows/s");

    let ratio = (ceiling > 0.0).then(|| best_rate / ceiling * 100.0);
    let row_ratio =
        rows_per_run.and_then(|r| (ceiling > 0.0).then(|| best_rate * r / ceiling * 100.0));

    let mut params = env.common.params();
    for (k, v) in [
        ("bindings", json!(a.bindings)),
        ("step_secs", json!(a.step_secs)),
        ("start_rate", json!(a.start_rate)),
        ("max_rate", json!(a.max_rate)),
        ("tick_ms", json!(a.tick_ms)),
        ("max_runs_per_call", json!(a.max_runs_per_call)),
        ("calls_in_flight", json!(a.calls_in_flight)),
        ("ceiling_secs", json!(a.ceiling_secs)),
        ("ceiling_connections", json!(a.ceiling_connections)),
        (
            "tenant_max_concurrent_runs",
            json!(a.tenant_max_concurrent_runs),
        ),
    ] {
        params.insert(k.into(), v);
    }
    let mut r = Report::new(params);
    r.num(
        "completed_runs_per_s",
        "completed runs/s (best step)",
        Some(round(best_rate, 1)),
        "runs/s",
        Target::Info,
    );
    r.num(
        "kept_up_offered_per_s",
        "highest offered rate kept up with",
        kept_up_rate.map(|v| v as f64),
        "runs/s",
        Target::Info,
    );
    r.num(
        "ceiling_rows_per_s",
        "PostgreSQL batched insert ceiling",
        Some(round(ceiling, 1)),
        "rows/s",
        Target::Info,
    );
    r.num(
        "ratio_percent",
        "runs/s ÷ ceiling rows/s",
        ratio.map(|v| round(v, 2)),
        "%",
        Target::AtLeast(50.0),
    );
    r.num(
        "rows_per_run",
        "rows sked writes per run",
        rows_per_run.map(|v| round(v, 2)),
        "rows",
        Target::Info,
    );
    r.num(
        "row_equivalent_ratio_percent",
        "row-equivalent: runs/s × rows/run ÷ ceiling",
        row_ratio.map(|v| round(v, 2)),
        "%",
        Target::Info,
    );
    if let Some(b) = &best {
        r.num(
            "best_step_sked_cpu_percent",
            "sked CPU in the best step",
            Some(round(b.cpu.sked, 1)),
            "% of a core",
            Target::Info,
        );
        r.num(
            "best_step_postgres_cpu_percent",
            "PostgreSQL CPU in the best step",
            b.cpu.pg.map(|v| round(v, 1)),
            "% of a core",
            Target::Info,
        );
    }
    r.count("steps", "load steps run", steps.len() as i64, Target::Info);
    r.count(
        "queued_after_drain",
        "runs still QUEUED after the drain",
        left,
        Target::Info,
    );
    let failed: u64 = steps.iter().map(|s| s.failed_calls).sum();
    r.count(
        "failed_calls",
        "BackfillRuns calls failed",
        failed as i64,
        Target::Info,
    );
    r.extra(
        "step_list",
        json!(
            steps
                .iter()
                .map(|s| {
                    let secs = (s.end - s.start).num_microseconds().unwrap_or(1) as f64 / 1e6;
                    json!({
                        "offered_per_s": s.rate,
                        "created_per_s": round(s.created as f64 / secs, 1),
                        "completed_per_s": round(s.completed as f64 / secs, 1),
                        "backlog_end": s.backlog,
                        "failed_calls": s.failed_calls,
                        "sked_cpu_percent": round(s.cpu.sked, 1),
                        "postgres_cpu_percent": s.cpu.pg.map(|v| round(v, 1)),
                    })
                })
                .collect::<Vec<_>>()
        ),
    );
    for (i, s) in steps.iter().enumerate() {
        let secs = (s.end - s.start).num_microseconds().unwrap_or(1) as f64 / 1e6;
        r.note(format!(
            "step {}: offered {}/s, created {:.0}/s, completed {:.0}/s, backlog at end {}",
            i + 1,
            s.rate,
            s.created as f64 / secs,
            s.completed as f64 / secs,
            s.backlog
        ));
    }
    if let Some(e) = first_error {
        r.note(format!("first failed call: {e}"));
    }
    Ok(r)
}

/// Scheduled runs made so far (not SKIPPED): none is expected of bindings
/// made by [`api::create_ended_bindings`]; counted so that one would not
/// pass for a backlog run.
pub(crate) async fn scheduled_fires(env: &Env) -> anyhow::Result<u64> {
    let fired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE trigger = 'SCHEDULE' AND state <> 'SKIPPED'",
    )
    .fetch_one(&env.pool)
    .await?;
    Ok(fired as u64)
}

/// QUEUED runs now.
async fn queued(env: &Env) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE state = 'QUEUED'")
            .fetch_one(&env.pool)
            .await?,
    )
}

/// Backfilled runs that reached SUCCEEDED inside `[a, b)`.
async fn completed_between(env: &Env, a: DateTime<Utc>, b: DateTime<Utc>) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM runs
         WHERE trigger = 'BACKFILL' AND state = 'SUCCEEDED' AND end_time >= $1 AND end_time < $2",
    )
    .bind(a)
    .bind(b)
    .fetch_one(&env.pool)
    .await?)
}

/// The batched insert ceiling, rows/s: `conns` connections each inserting
/// [`CEILING_BATCH`]-row batches into a scratch copy of the `run_events`
/// shape for `secs` seconds (one statement per transaction, autocommit).
/// The scratch table is dropped afterwards.
pub(crate) async fn ceiling(env: &Env, secs: u64, conns: usize) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE bench_ceiling (
            run_id uuid NOT NULL, seq bigint NOT NULL, time timestamptz NOT NULL,
            tenant_id text NOT NULL, binding_id uuid NOT NULL, definition text NOT NULL,
            kind text NOT NULL, payload jsonb NOT NULL, PRIMARY KEY (run_id, seq))",
    )
    .execute(&env.pool)
    .await?;
    let deadline = Instant::now() + Duration::from_secs(secs.max(1));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..conns.max(1) {
        let pool = env.pool.clone();
        set.spawn(async move {
            let mut conn = pool.acquire().await?;
            let binding = uuid::Uuid::new_v4();
            let tenant = vec![api::tenant(c); CEILING_BATCH];
            let definition = vec!["bench.load.0".to_string(); CEILING_BATCH];
            let kind = vec!["state_changed".to_string(); CEILING_BATCH];
            let payload = vec![
                r#"{"kind": "state_changed", "from": "QUEUED", "to": "RUNNING", "reason": ""}"#.to_string();
                CEILING_BATCH
            ];
            let bindings = vec![binding; CEILING_BATCH];
            let mut rows = 0u64;
            while Instant::now() < deadline {
                // 25 runs × 4 events per batch, like a run's event log.
                let runs: Vec<uuid::Uuid> = (0..CEILING_BATCH / 4).map(|_| uuid::Uuid::now_v7()).collect();
                let ids: Vec<uuid::Uuid> = (0..CEILING_BATCH).map(|i| runs[i / 4]).collect();
                let seqs: Vec<i64> = (0..CEILING_BATCH).map(|i| (i % 4) as i64 + 1).collect();
                let times = vec![Utc::now(); CEILING_BATCH];
                sqlx::query(
                    "INSERT INTO bench_ceiling (run_id, seq, time, tenant_id, binding_id, definition, kind, payload)
                     SELECT r, s, t, te, b, d, k, p::jsonb
                     FROM UNNEST($1::uuid[], $2::int8[], $3::timestamptz[], $4::text[], $5::uuid[],
                                 $6::text[], $7::text[], $8::text[]) AS u(r, s, t, te, b, d, k, p)",
                )
                .bind(&ids)
                .bind(&seqs)
                .bind(&times)
                .bind(&tenant)
                .bind(&bindings)
                .bind(&definition)
                .bind(&kind)
                .bind(&payload)
                .execute(&mut *conn)
                .await?;
                rows += CEILING_BATCH as u64;
            }
            anyhow::Ok(rows)
        });
    }
    let mut rows = 0u64;
    let mut err = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(n)) => rows += n,
            Ok(Err(e)) => err = Some(e),
            Err(e) => err = Some(e.into()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = sqlx::query("DROP TABLE IF EXISTS bench_ceiling")
        .execute(&env.pool)
        .await;
    if let Some(e) = err {
        return Err(e);
    }
    Ok(rows as f64 / elapsed)
}
