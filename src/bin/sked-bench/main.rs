//! `sked-bench`: the load scenarios behind sked's performance targets
//! (`docs/operations.md`, "Measuring").
//!
//! ```sh
//! cargo run --release --bin sked-bench -- <scenario> [flags]
//! ```
//!
//! Every scenario prints a table (metric, value, unit, target, verdict) and,
//! as the **last line of stdout**, one JSON object with every figure:
//! `{"scenario":..,"machine":{..},"params":{..},"figures":{..},"targets":{..}}`.
//! Progress goes to stderr.
//!
//! `--baseline FILE` (any scenario) compares with a previous run: FILE is
//! that run's JSON line or its whole saved output (the last line that is a
//! JSON object counts), of the same scenario; each numeric figure present
//! in both is printed with its ratio, new ÷ old, before the JSON line
//! ([`baseline`]).
//!
//! # Common mechanics ([`env`])
//!
//! * **Database.** `--database-url` (or `DATABASE_URL`) names a PostgreSQL
//!   server: the bench creates a fresh database `sked_bench_<uuid>` on it and
//!   drops it at the end (also on error and on Ctrl-C). Without a URL it starts
//!   an embedded PostgreSQL ([`sked::embedded_pg::EmbeddedPg::start`], durable
//!   default options, as `sked serve` does) in a temporary directory and removes
//!   it at the end.
//! * **Nodes.** `--nodes K` sked nodes run as child processes (this binary
//!   re-executed with the hidden `node` subcommand, which calls
//!   [`sked::app::serve`] with authentication off on loopback), so that their
//!   CPU time and resident memory can be read from `/proc`. The bench waits for
//!   the gRPC health check to answer SERVING and stops them with SIGTERM.
//! * **Setup** goes through the generated gRPC clients, as users call them,
//!   with `--concurrency` calls in flight, spread over `--tenants` tenants (the
//!   `x-tenant-id` header). A tenant can bind a definition only once, so N
//!   bindings use ⌈N ÷ tenants⌉ definitions of the same shape: binding `i`
//!   belongs to tenant `i mod T` and binds definition `<prefix>.<i div T>`.
//! * **Measurements** read the database directly (sqlx): the `runs` and
//!   `run_events` tables. CPU is utime+stime from `/proc/<pid>/stat` over the
//!   measured window, in % of one core, for the sked children and for the
//!   PostgreSQL server's processes ([`env::ProcSet`]); memory is VmRSS.
//!
//! # Scenarios
//!
//! * [`fire`] — N bindings of an `event` handler every 1 s, phases spread over
//!   the second (or `--aligned`): fraction of due fires that ran, duplicates,
//!   fire lag (run start − scheduled time) p50/p99/max, CPU; with
//!   `--retention-drop E`, while the leader's retention drops a day of E
//!   events 40 days old.
//! * [`burst`] — N bindings on one per-minute cron: time from the fire instant
//!   until the last of the N runs started, lag p50/p99.
//! * [`throughput`] — offered load via BackfillRuns doubling per step until
//!   completions stop keeping up; the highest completed runs/s against the
//!   machine's batched row-insert ceiling measured in the same run.
//! * [`stream`] — a command printing N lines followed live by S TailRun
//!   subscribers: order, completeness, end-to-end latency, lines/s.
//! * [`idle`] — N idle bindings: node start-up time, CPU and RSS per binding.
//! * [`workers`] — `worker { queue }` runs executed by W no-op workers over
//!   `WorkerService.Work`: a backlog drained (completed runs/s), dispatch
//!   latency (Assigned received − run due) p50/p99/max at a steady offered
//!   rate, and the ratio to the batched row-insert ceiling.
//! * [`run_stats`] (`stats`) — GetRunStats over a month of one tenant's
//!   runs (1 000 000 by default, written into the database and recorded by
//!   sked's run-end bookkeeping): latency p50/p99 per scope, exact counts.
//! * [`workflow`] — N bindings of a 10-step DAG of `event` steps fired every
//!   second: step-to-step latency (a step's start − its dependencies' last
//!   end) p50/p99/max, workflows succeeded/failed, steps/s.

mod api;
mod baseline;
mod burst;
mod env;
mod fire;
mod idle;
mod report;
mod run_stats;
mod stats;
mod stream;
mod throughput;
mod workers;
mod workflow;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "sked-bench",
    about = "Load scenarios for sked: prints a table and a final JSON line",
    after_help = "Compare with an earlier run: `sked-bench stream > before.txt`, change something, \
then `sked-bench stream --baseline before.txt` prints each figure as \
`latency_p99_ms: 43.2 (baseline 87.7, ×0.49)` (new ÷ old) before the JSON line."
)]
struct Cli {
    /// A previous run of the same scenario to compare with: its JSON line,
    /// or its whole saved output (the last line that is a JSON object).
    /// Each numeric figure present in both runs is printed with its ratio,
    /// new ÷ old (nested figures by dotted path), before the JSON line; a
    /// baseline of another scenario is an error.
    #[arg(long, global = true, value_name = "FILE")]
    baseline: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Scenarios (and the hidden node runner).
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Fire accuracy: N bindings every 1 s (event handler).
    Fire(fire::FireArgs),
    /// A cron burst: N bindings due at the same instant.
    Burst(burst::BurstArgs),
    /// Sustained completed runs/s against the PostgreSQL row-insert ceiling.
    Throughput(throughput::ThroughputArgs),
    /// One run printing many lines, followed by many TailRun subscribers.
    Stream(stream::StreamArgs),
    /// Idle cost: start-up time, CPU and memory with N idle bindings.
    Idle(idle::IdleArgs),
    /// Worker runs: a backlog drained by W workers, and dispatch latency.
    Workers(workers::WorkersArgs),
    /// GetRunStats over a month of one tenant's runs.
    Stats(run_stats::StatsArgs),
    /// A 10-step DAG workflow fired every second by N bindings:
    /// step-to-step latency.
    Workflow(workflow::WorkflowArgs),
    /// Runs one sked node (used by the bench for its child processes).
    #[command(hide = true)]
    Node(NodeArgs),
}

/// Flags every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// PostgreSQL server to create the bench database on; without it an
    /// embedded PostgreSQL is started in a temporary directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// sked nodes (child processes) sharing the database.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Tenants the bindings are spread over.
    #[arg(long, default_value_t = 10)]
    pub tenants: usize,
    /// `max_concurrent_runs` of each node (sked's default when unset).
    #[arg(long)]
    pub max_concurrent_runs: Option<usize>,
    /// Setup calls (CreateDefinition, CreateBinding, ...) in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Keep sked's default per-tenant rate limits (changes and API-created
    /// runs per second) on the nodes; off by default, the scenarios measure
    /// the engine.
    #[arg(long)]
    pub rate_limits: bool,
    /// Seconds between the maintenance leader's retention passes on the
    /// nodes (sked's default, 60 s, when unset; `fire --retention-drop`
    /// sets 1).
    #[arg(long)]
    pub retention_every_secs: Option<u64>,
    /// Seconds between the maintenance leader's folds of run statistics
    /// (`run_stats` into the tables GetRunStats reads; sked's default,
    /// 10 s, when unset; 0: never, as before the fold existed).
    #[arg(long)]
    pub stats_fold_secs: Option<u64>,
}

impl Common {
    /// The flags as JSON `params` (the database URL is left out: it may
    /// carry a password).
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("nodes".into(), self.nodes.into());
        m.insert("tenants".into(), self.tenants.into());
        m.insert(
            "max_concurrent_runs".into(),
            self.max_concurrent_runs.into(),
        );
        m.insert("concurrency".into(), self.concurrency.into());
        m.insert("rate_limits".into(), self.rate_limits.into());
        m.insert(
            "retention_every_secs".into(),
            self.retention_every_secs.into(),
        );
        m.insert("stats_fold_secs".into(), self.stats_fold_secs.into());
        m
    }
}

/// Flags of the hidden `node` subcommand.
#[derive(Debug, Args)]
struct NodeArgs {
    /// Database of the node.
    #[arg(long)]
    database_url: String,
    /// Address to serve on.
    #[arg(long)]
    listen: SocketAddr,
    /// Runs executing at once.
    #[arg(long)]
    max_concurrent_runs: Option<usize>,
    /// Node id (default `<hostname>-<pid>`).
    #[arg(long)]
    node_id: Option<String>,
    /// Keep sked's default per-tenant rate limits (else off).
    #[arg(long)]
    rate_limits: bool,
    /// Seconds between retention passes (sked's default when unset).
    #[arg(long)]
    retention_every_secs: Option<u64>,
    /// Seconds between folds of run statistics (sked's default when unset;
    /// 0: never).
    #[arg(long)]
    stats_fold_secs: Option<u64>,
}

/// The allocator `sked` runs with (src/main.rs): the bench's nodes are
/// this binary, so they measure sked as it ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Read before anything starts: a bad file fails fast, not after the run.
    let baseline = match cli.baseline.as_deref().map(baseline::Baseline::load) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            eprintln!("sked-bench: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let baseline = baseline.as_ref();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sked-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.cmd {
        Cmd::Node(a) => rt.block_on(run_node(a)),
        Cmd::Fire(mut a) => {
            // The drop must come within the window: passes every second.
            if a.retention_drop > 0 && a.common.retention_every_secs.is_none() {
                a.common.retention_every_secs = Some(1);
            }
            rt.block_on(env::run_scenario(
                "fire",
                a.common.clone(),
                a,
                fire::run,
                baseline,
            ))
        }
        Cmd::Burst(a) => rt.block_on(env::run_scenario(
            "burst",
            a.common.clone(),
            a,
            burst::run,
            baseline,
        )),
        Cmd::Throughput(a) => rt.block_on(env::run_scenario(
            "throughput",
            a.common.clone(),
            a,
            throughput::run,
            baseline,
        )),
        Cmd::Stream(a) => rt.block_on(env::run_scenario(
            "stream",
            a.common.clone(),
            a,
            stream::run,
            baseline,
        )),
        Cmd::Idle(a) => rt.block_on(env::run_scenario(
            "idle",
            a.common.clone(),
            a,
            idle::run,
            baseline,
        )),
        Cmd::Workers(a) => rt.block_on(env::run_scenario(
            "workers",
            a.common.clone(),
            a,
            workers::run,
            baseline,
        )),
        Cmd::Stats(a) => rt.block_on(env::run_scenario(
            "stats",
            a.common.clone(),
            a,
            run_stats::run,
            baseline,
        )),
        Cmd::Workflow(a) => rt.block_on(env::run_scenario(
            "workflow",
            a.common.clone(),
            a,
            workflow::run,
            baseline,
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sked-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The child process: one sked node with authentication off (loopback,
/// benchmark), serving until SIGTERM/SIGINT.
async fn run_node(a: NodeArgs) -> anyhow::Result<()> {
    sked::telemetry::init(sked::config::LogFormat::Pretty);
    let mut settings = sked::app::Settings::new(a.database_url);
    settings.auth = false;
    if !a.rate_limits {
        settings.tenant_changes_per_sec = 0;
        settings.tenant_api_runs_per_sec = 0;
    }
    if let Some(n) = a.max_concurrent_runs {
        settings.max_concurrent_runs = n;
    }
    if let Some(id) = a.node_id {
        settings.node_id = id;
    }
    if let Some(s) = a.retention_every_secs {
        settings.retention.every = std::time::Duration::from_secs(s.max(1));
    }
    if let Some(s) = a.stats_fold_secs {
        settings.stats_fold = (s > 0).then(|| std::time::Duration::from_secs(s));
    }
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    sked::app::serve(settings, listener, sked::app::shutdown_signal()).await?;
    Ok(())
}
