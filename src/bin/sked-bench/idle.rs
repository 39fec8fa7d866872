//! `idle`: what idle bindings cost (target, `docs/operations.md`: 100 000 idle bindings, < 1 % of
//! a core when nothing is due, < 1 KiB resident memory per binding, node
//! start-up < 2 s).
//!
//! 1. Baseline: the node(s) on the empty database: start-up time (spawn →
//!    health SERVING, including migrating the empty database) and RSS 5 s
//!    later.
//! 2. N bindings of definitions `bench.idle.<j>` with a yearly cron
//!    (`0 0 1 1 *`, never due in the window).
//! 3. The nodes are stopped and fresh ones started: start-up time with N
//!    bindings. After 5 s their CPU (and PostgreSQL's) is measured over
//!    `--measure` seconds, then their RSS.
//!
//! Per binding: (RSS with N − baseline RSS) ÷ N (the target line) and total
//! RSS ÷ N. With `--nodes K` the figures are for the K nodes together
//! (CPU, RSS summed; start-up the slowest node's).

use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::Common;
use crate::api::{self, Layout};
use crate::env::{Env, progress};
use crate::report::{Report, Target};
use crate::stats::round;

/// Flags of `idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Idle bindings.
    #[arg(long, default_value_t = 100_000)]
    pub bindings: usize,
    /// Length of the CPU measurement, seconds.
    #[arg(long, default_value_t = 30)]
    pub measure: u64,
    /// Cron of the idle bindings (UTC); must not be due during the bench.
    #[arg(long, default_value = "0 0 1 1 *")]
    pub cron: String,
    #[command(flatten)]
    pub common: Common,
}

/// Settling time before RSS and CPU are read.
const SETTLE: Duration = Duration::from_secs(5);

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls, node restarts or measurement queries failing.
pub async fn run(env: &mut Env, a: IdleArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.bindings >= 1, "--bindings must be at least 1");
    let n = a.bindings;
    let k = env.nodes.len();
    let startup_base = max_startup_ms(env);
    tokio::time::sleep(SETTLE).await;
    let rss_base = env.sked_rss_mib();
    progress!(
        "baseline: start-up {startup_base:.0} ms, RSS {}",
        rss_base.map_or("n/a".into(), |v| format!("{v:.1} MiB"))
    );

    let layout = Layout::new("bench.idle", n, env.common.tenants);
    progress!(
        "idle: {n} bindings on cron {:?}, {} definitions over {} tenants",
        a.cron,
        layout.definitions(),
        layout.tenants
    );
    let cron = a.cron.clone();
    api::create_definitions(env, &layout, |name| api::event_def(name, api::cron(&cron))).await?;
    api::create_bindings(env, &layout, |_| None).await?;

    progress!("restarting the node(s)");
    env.stop_nodes().await;
    env.start_nodes(k).await?;
    let startup_n = max_startup_ms(env);
    tokio::time::sleep(SETTLE).await;
    let cpu0 = env.cpu_snapshot().await;
    progress!("measuring idle CPU for {} s", a.measure);
    tokio::time::sleep(Duration::from_secs(a.measure)).await;
    let cpu1 = env.cpu_snapshot().await;
    let cpu = cpu0.percent_until(&cpu1);
    let rss_n = env.sked_rss_mib();
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&env.pool)
        .await?;

    let kib_per = |mib: f64| mib * 1024.0 / n as f64;
    let mut params = env.common.params();
    params.insert("bindings".into(), json!(a.bindings));
    params.insert("measure".into(), json!(a.measure));
    params.insert("cron".into(), json!(a.cron));
    let mut r = Report::new(params);
    r.num(
        "startup_empty_ms",
        "start-up, empty database",
        Some(round(startup_base, 1)),
        "ms",
        Target::Info,
    );
    r.num(
        "startup_ms",
        "start-up with the bindings",
        Some(round(startup_n, 1)),
        "ms",
        Target::Below(2000.0),
    );
    r.num(
        "rss_baseline_mib",
        "RSS, empty database",
        rss_base.map(|v| round(v, 1)),
        "MiB",
        Target::Info,
    );
    r.num(
        "rss_mib",
        "RSS with the bindings",
        rss_n.map(|v| round(v, 1)),
        "MiB",
        Target::Info,
    );
    r.num(
        "rss_per_binding_kib",
        "RSS per binding (over baseline)",
        rss_n.zip(rss_base).map(|(x, b)| round(kib_per(x - b), 3)),
        "KiB",
        Target::Below(1.0),
    );
    r.num(
        "rss_total_per_binding_kib",
        "RSS per binding (total ÷ N)",
        rss_n.map(|x| round(kib_per(x), 3)),
        "KiB",
        Target::Info,
    );
    r.num(
        "sked_cpu_percent",
        "sked CPU, idle",
        Some(round(cpu.sked, 2)),
        "% of a core",
        Target::Below(1.0),
    );
    r.num(
        "postgres_cpu_percent",
        "PostgreSQL CPU, idle",
        cpu.pg.map(|v| round(v, 2)),
        "% of a core",
        Target::Info,
    );
    r.count("runs", "runs created (should be 0)", runs, Target::Info);
    Ok(r)
}

/// The slowest node's start-up, ms.
fn max_startup_ms(env: &Env) -> f64 {
    env.nodes
        .iter()
        .map(|n| n.startup.as_secs_f64() * 1e3)
        .fold(0.0, f64::max)
}
