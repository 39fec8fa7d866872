//! `workflow`: N bindings of a 10-step DAG workflow, fired every second
//! (target, issue "Workflows": step-to-step latency p99 ≤ 50 ms).
//!
//! Setup: definitions `bench.workflow.<j>`, each a workflow of 10 `event`
//! steps (`s0`; `s1`–`s3` after `s0`; `s4` after `s1`, `s2`; `s5` after
//! `s3`; `s6` after `s4`, `s5`; `s7`, `s8` after `s6`; `s9` after `s7`,
//! `s8`) on a 1 s interval; N bindings that inherit it. The workflows run
//! for `--duration` seconds; the first 2 s are warm-up. Measured from the
//! rows, over the steps created after warm-up: step-to-step latency = a
//! step's start − the latest end of its dependencies (the time the DAG
//! takes to notice an end, create the next step and have it claimed),
//! p50/p99/max; workflow runs succeeded, failed, skipped (overlap) and
//! still running; steps per second; CPU.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use clap::Args;
use serde_json::json;
use sked::proto::v1 as pb;

use crate::Common;
use crate::api::{self, Layout};
use crate::env::{Env, progress};
use crate::report::{Report, Target};
use crate::stats::{ms1o, round};

/// Flags of `workflow`.
#[derive(Debug, Clone, Args)]
pub struct WorkflowArgs {
    /// Bindings, each firing its workflow every second.
    #[arg(long, default_value_t = 100)]
    pub bindings: usize,
    /// Seconds the workflows run (the first 2 are warm-up).
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    #[command(flatten)]
    pub common: Common,
}

/// Warm-up left out of the measurement.
const WARMUP: TimeDelta = TimeDelta::seconds(2);

/// The 10-step DAG (see the module docs).
pub fn dag() -> pb::WorkflowHandler {
    let deps: [&[usize]; 10] = [
        &[],
        &[0],
        &[0],
        &[0],
        &[1, 2],
        &[3],
        &[4, 5],
        &[6],
        &[6],
        &[7, 8],
    ];
    pb::WorkflowHandler {
        steps: deps
            .iter()
            .enumerate()
            .map(|(i, d)| pb::WorkflowStep {
                name: format!("s{i}"),
                handler: Some(pb::workflow_step::Handler::Event(pb::EventHandler {})),
                depends_on: d.iter().map(|j| format!("s{j}")).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls or measurement queries failing.
pub async fn run(env: &mut Env, a: WorkflowArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.bindings >= 1, "--bindings must be at least 1");
    anyhow::ensure!(a.duration >= 3, "--duration must be at least 3 s");
    let layout = Layout::new("bench.workflow", a.bindings, env.common.tenants);
    progress!(
        "workflow: {} bindings of a 10-step DAG every 1 s, {} definitions over {} tenants",
        a.bindings,
        layout.definitions(),
        layout.tenants
    );
    api::create_definitions(env, &layout, |name| pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Workflow(dag())),
        schedule: Some(api::interval(1, None)),
        ..Default::default()
    })
    .await?;
    api::create_bindings(env, &layout, |_| None).await?;
    let t0 = Utc::now();
    let from = t0 + WARMUP;
    let cpu0 = env.cpu_snapshot().await;
    progress!("running for {} s", a.duration);
    tokio::time::sleep(Duration::from_secs(a.duration)).await;
    let to = Utc::now();
    let cpu1 = env.cpu_snapshot().await;
    let cpu = cpu0.percent_until(&cpu1);
    // Let the workflows in flight end before reading (nothing is measured
    // after `to`).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (n, p50, p99, max): (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "WITH s AS (
           SELECT r.id, r.parent_run_id, r.step, r.start_time FROM runs r
           WHERE r.trigger = 'STEP' AND r.start_time IS NOT NULL
             AND r.create_time >= $1 AND r.create_time < $2),
         d AS (
           SELECT s.id, s.start_time, s.parent_run_id, dep.name AS dep
           FROM s JOIN runs p ON p.id = s.parent_run_id
           CROSS JOIN LATERAL jsonb_array_elements(p.handler -> 'steps') st
           CROSS JOIN LATERAL jsonb_array_elements_text(st -> 'depends_on') dep(name)
           WHERE st ->> 'name' = s.step),
         l AS (
           SELECT d.id, extract(epoch FROM min(d.start_time) - max(x.end_time))::float8 * 1000 AS ms
           FROM d JOIN runs x ON x.parent_run_id = d.parent_run_id AND x.step = d.dep
           GROUP BY d.id)
         SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms)
         FROM l",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&env.pool)
    .await?;
    let (ok, failed, skipped, active, steps): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'SUCCEEDED' AND parent_run_id IS NULL),
                count(*) FILTER (WHERE state = 'FAILED' AND parent_run_id IS NULL),
                count(*) FILTER (WHERE state = 'SKIPPED' AND parent_run_id IS NULL),
                count(*) FILTER (WHERE state IN ('QUEUED', 'RUNNING') AND parent_run_id IS NULL),
                count(*) FILTER (WHERE parent_run_id IS NOT NULL)
         FROM runs WHERE create_time >= $1 AND create_time < $2",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&env.pool)
    .await?;
    let window = (to - from).num_milliseconds().max(1) as f64 / 1000.0;

    let mut params = env.common.params();
    params.insert("bindings".into(), json!(a.bindings));
    params.insert("duration".into(), json!(a.duration));
    let mut r = Report::new(params);
    r.count("step_latencies", "step starts measured", n, Target::Info);
    r.num(
        "step_latency_p50_ms",
        "step-to-step latency p50",
        ms1o(p50),
        "ms",
        Target::Info,
    );
    r.num(
        "step_latency_p99_ms",
        "step-to-step latency p99",
        ms1o(p99),
        "ms",
        Target::AtMost(50.0),
    );
    r.num(
        "step_latency_max_ms",
        "step-to-step latency max",
        ms1o(max),
        "ms",
        Target::Info,
    );
    r.count(
        "workflows_succeeded",
        "workflow runs SUCCEEDED",
        ok,
        Target::Info,
    );
    r.count(
        "workflows_failed",
        "workflow runs FAILED",
        failed,
        Target::Equal(0.0),
    );
    r.count(
        "workflows_skipped",
        "fires SKIPPED (overlap: the previous run still going)",
        skipped,
        Target::Info,
    );
    r.count(
        "workflows_active",
        "workflow runs still going",
        active,
        Target::Info,
    );
    r.num(
        "steps_per_sec",
        "steps created per second",
        Some(round(steps as f64 / window, 1)),
        "/s",
        Target::Info,
    );
    r.num(
        "sked_cpu_percent",
        "sked CPU",
        Some(round(cpu.sked, 1)),
        "% of a core",
        Target::Info,
    );
    r.num(
        "postgres_cpu_percent",
        "PostgreSQL CPU",
        cpu.pg.map(|v| round(v, 1)),
        "% of a core",
        Target::Info,
    );
    Ok(r)
}
