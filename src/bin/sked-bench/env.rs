//! The bench environment: the database (a fresh one on a given server, or an
//! embedded PostgreSQL), the sked node child processes, and `/proc` readings
//! (CPU ticks, resident memory) of the nodes and of PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
use tonic::transport::Channel;

use crate::Common;
use crate::baseline::Baseline;
use crate::report::{Machine, Report};

/// How long a node may take from spawn to SERVING before the bench gives up.
const NODE_START_LIMIT: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM before it is killed.
const NODE_STOP_LIMIT: Duration = Duration::from_secs(60);

/// Prints a progress line to stderr, prefixed with the seconds since start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[{:>7.1}s] {}", $crate::env::since_start().as_secs_f64(), format_args!($($arg)*))
    };
}
pub(crate) use progress;

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Time since the bench started (for progress lines).
pub fn since_start() -> Duration {
    START.get_or_init(Instant::now).elapsed()
}

/// Sets up the environment, runs `scenario`, tears the environment down
/// (whether the scenario succeeded, failed or was interrupted with Ctrl-C)
/// and prints the report: the table, then the JSON line last. With a
/// `baseline` (`--baseline`), it must be a run of this scenario (checked
/// before anything starts) and each figure's ratio to it is printed between
/// the table and the JSON line.
///
/// # Errors
/// A baseline of another scenario, setup failures, scenario failures, or an
/// interrupt.
pub async fn run_scenario<A>(
    name: &'static str,
    common: Common,
    args: A,
    scenario: impl AsyncFnOnce(&mut Env, A) -> anyhow::Result<Report>,
    baseline: Option<&Baseline>,
) -> anyhow::Result<()> {
    // A baseline of another scenario is refused before anything starts.
    if let Some(b) = baseline {
        b.check_scenario(name)?;
    }
    since_start();
    // The bench's own logs (embedded PostgreSQL, sqlx) only when asked.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut env = Env::setup(common).await?;
    let result = tokio::select! {
        r = scenario(&mut env, args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let machine = env.machine.clone();
    env.teardown().await;
    let report = result?;
    report.print(name, &machine, baseline);
    Ok(())
}

/// Everything a scenario works with.
pub struct Env {
    /// Flags common to all scenarios.
    pub common: Common,
    /// The bench database.
    pub db: Database,
    /// A small pool on the bench database, for measurements.
    pub pool: PgPool,
    /// Running sked nodes.
    pub nodes: Vec<Node>,
    /// Machine description for the report.
    pub machine: Machine,
    /// The PostgreSQL server's processes, when the server runs on this
    /// machine (else its CPU is not reported).
    pub pg_procs: Option<ProcSet>,
}

impl Env {
    /// Creates the database, reads the machine description and starts
    /// `common.nodes` nodes. Drops the database again if anything fails.
    async fn setup(common: Common) -> anyhow::Result<Env> {
        anyhow::ensure!(common.nodes >= 1, "--nodes must be at least 1");
        anyhow::ensure!(common.tenants >= 1, "--tenants must be at least 1");
        anyhow::ensure!(common.concurrency >= 1, "--concurrency must be at least 1");
        let mut db = Database::open(common.database_url.as_deref()).await?;
        let pool = match sked::db::connect(&db.url, 6).await {
            Ok(p) => p,
            Err(e) => {
                db.close().await;
                return Err(e).context("connecting to the bench database");
            }
        };
        let machine = Machine::read(&pool, db.kind()).await;
        let pg_procs = ProcSet::postgres(&pool).await;
        if pg_procs.is_none() {
            progress!(
                "PostgreSQL does not run on this machine (or is not visible): its CPU is not reported"
            );
        }
        let mut env = Env {
            common,
            db,
            pool,
            nodes: Vec::new(),
            machine,
            pg_procs,
        };
        let k = env.common.nodes;
        if let Err(e) = env.start_nodes(k).await {
            env.teardown().await;
            return Err(e);
        }
        Ok(env)
    }

    /// Starts `k` more nodes, one after the other; each is SERVING when this
    /// returns.
    ///
    /// # Errors
    /// A node that exits or does not answer SERVING within 60 s.
    pub async fn start_nodes(&mut self, k: usize) -> anyhow::Result<()> {
        for _ in 0..k {
            let n = Node::spawn(
                &self.db.url,
                self.common.max_concurrent_runs,
                self.common.rate_limits,
                self.common.retention_every_secs,
                self.common.stats_fold_secs,
            )
            .await?;
            progress!(
                "node pid {} serving on {} (start-up {:.0} ms)",
                n.pid,
                n.addr,
                n.startup.as_secs_f64() * 1e3
            );
            self.nodes.push(n);
        }
        Ok(())
    }

    /// Stops every node (SIGTERM, then waits).
    pub async fn stop_nodes(&mut self) {
        for n in self.nodes.drain(..) {
            n.stop().await;
        }
    }

    /// A channel to node `i mod K` (round-robin over the nodes).
    pub fn channel(&self, i: usize) -> Channel {
        self.nodes[i % self.nodes.len()].channel.clone()
    }

    /// Every node's channel, in node order.
    pub fn channels(&self) -> Vec<Channel> {
        self.nodes.iter().map(|n| n.channel.clone()).collect()
    }

    /// Process ids of the running nodes.
    pub fn node_pids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.pid).collect()
    }

    /// A CPU snapshot of the nodes and of PostgreSQL, to diff later with
    /// [`CpuSnapshot::percent_since`].
    pub async fn cpu_snapshot(&self) -> CpuSnapshot {
        let sked = ProcTicks::of(&self.node_pids());
        let pg = match &self.pg_procs {
            Some(p) => Some(p.ticks(&self.pool).await),
            None => None,
        };
        CpuSnapshot {
            at: Instant::now(),
            sked,
            pg,
            bench: stat_ticks(std::process::id() as i32).map_or(0, |(_, t)| t),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| machine_ticks(&s)),
        }
    }

    /// Sum of the nodes' resident memory, MiB.
    pub fn sked_rss_mib(&self) -> Option<f64> {
        let mut sum = 0u64;
        for pid in self.node_pids() {
            sum += rss_kib(pid)?;
        }
        Some(sum as f64 / 1024.0)
    }

    /// Stops the nodes, closes the pool, drops the database. Errors are
    /// printed, not returned.
    pub async fn teardown(&mut self) {
        self.stop_nodes().await;
        self.pool.close().await;
        self.db.close().await;
    }
}

/// The bench database and where it lives.
pub struct Database {
    /// URL of the bench database.
    pub url: String,
    /// Its name, `sked_bench_<uuid>`.
    pub name: String,
    /// URL of the server's `postgres` database (to create and drop it).
    admin_url: String,
    /// The embedded server, when no URL was given.
    embedded: Option<(sked::embedded_pg::EmbeddedPg, PathBuf)>,
    closed: bool,
}

impl Database {
    /// Creates `sked_bench_<uuid>` on the server at `server_url`, or starts
    /// an embedded PostgreSQL in a temporary directory and creates it there.
    ///
    /// # Errors
    /// The server is unreachable or refuses; the embedded server cannot start.
    pub async fn open(server_url: Option<&str>) -> anyhow::Result<Database> {
        let name = format!("sked_bench_{}", uuid::Uuid::new_v4().simple());
        let (admin_url, url, embedded) = match server_url {
            Some(u) => (with_database(u, "postgres"), with_database(u, &name), None),
            None => {
                let dir = std::env::temp_dir()
                    .join(format!("sked-bench-{}", uuid::Uuid::new_v4().simple()));
                progress!(
                    "no --database-url: starting an embedded PostgreSQL in {}",
                    dir.display()
                );
                // Durable default options: the same as `sked serve`'s embedded default.
                let pg = match sked::embedded_pg::EmbeddedPg::start(&dir.join("pg")).await {
                    Ok(pg) => pg,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e).context("starting the embedded PostgreSQL");
                    }
                };
                (pg.url("postgres"), pg.url(&name), Some((pg, dir)))
            }
        };
        let mut db = Database {
            url,
            name,
            admin_url,
            embedded,
            closed: false,
        };
        if let Err(e) = sked::db::ensure_database(&db.admin_url, &db.name).await {
            db.close().await;
            return Err(e).context("creating the bench database");
        }
        progress!("bench database {}", db.name);
        Ok(db)
    }

    /// `"embedded"` or `"url"`.
    pub fn kind(&self) -> &'static str {
        if self.embedded.is_some() {
            "embedded"
        } else {
            "url"
        }
    }

    /// Drops the bench database and stops/removes the embedded server.
    /// Safe to call twice.
    pub async fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        if let Err(e) = sked::db::drop_database(&self.admin_url, &self.name).await {
            progress!("could not drop database {}: {e}", self.name);
        }
        if let Some((pg, dir)) = self.embedded.take() {
            if let Err(e) = pg.stop().await {
                progress!("could not stop the embedded PostgreSQL: {e}");
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Replaces the database name in a `postgres://` URL (query kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

/// A sked node running as a child process (`sked-bench node ...`).
pub struct Node {
    /// Process id.
    pub pid: i32,
    /// Address it serves on.
    pub addr: std::net::SocketAddr,
    /// A channel to it.
    pub channel: Channel,
    /// Time from spawn until the health check answered SERVING.
    pub startup: Duration,
    child: tokio::process::Child,
}

impl Node {
    /// Spawns a node on a free loopback port and waits until its health
    /// check answers SERVING. Its stderr is the bench's; `RUST_LOG`
    /// defaults to `warn`.
    ///
    /// # Errors
    /// Spawn failures, the child exiting, or no SERVING within 60 s.
    ///
    /// `rate_limits`: the node keeps sked's default per-tenant rates of
    /// changes and API-created runs; otherwise they are off (the scenarios
    /// measure the engine, and their setup makes thousands of changes).
    /// `retention_every_secs`: the leader's retention pass interval (sked's
    /// default when `None`). `stats_fold_secs`: the leader's run statistics
    /// fold interval (sked's default when `None`, never when 0).
    pub async fn spawn(
        database_url: &str,
        max_concurrent_runs: Option<usize>,
        rate_limits: bool,
        retention_every_secs: Option<u64>,
        stats_fold_secs: Option<u64>,
    ) -> anyhow::Result<Node> {
        // A free port: bind :0, read it, let go (the child binds it again).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let exe = std::env::current_exe().context("locating the sked-bench binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("node")
            .arg("--database-url")
            .arg(database_url)
            .arg("--listen")
            .arg(addr.to_string());
        if let Some(n) = max_concurrent_runs {
            cmd.arg("--max-concurrent-runs").arg(n.to_string());
        }
        if rate_limits {
            cmd.arg("--rate-limits");
        }
        if let Some(s) = retention_every_secs {
            cmd.arg("--retention-every-secs").arg(s.to_string());
        }
        if let Some(s) = stats_fold_secs {
            cmd.arg("--stats-fold-secs").arg(s.to_string());
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().context("spawning a sked node")?;
        let pid = child.id().context("node pid")? as i32;
        let uri = format!("http://{addr}");
        let deadline = started + NODE_START_LIMIT;
        let channel = loop {
            if let Some(status) = child.try_wait()? {
                bail!("sked node exited before serving: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                bail!("sked node did not answer SERVING within {NODE_START_LIMIT:?}");
            }
            if let Ok(ch) = Channel::from_shared(uri.clone())?.connect().await {
                let serving = tonic_health::pb::health_client::HealthClient::new(ch.clone())
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok_and(|r| {
                        r.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32
                    });
                if serving {
                    break ch;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Ok(Node {
            pid,
            addr,
            channel,
            startup: started.elapsed(),
            child,
        })
    }

    /// SIGTERM, then waits up to 60 s for the exit (SIGKILL after that).
    pub async fn stop(mut self) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        match tokio::time::timeout(NODE_STOP_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) if !status.success() => {
                progress!("node pid {} exited with {status}", self.pid)
            }
            Ok(_) => {}
            Err(_) => {
                progress!(
                    "node pid {} did not stop within {NODE_STOP_LIMIT:?}: killing it",
                    self.pid
                );
                let _ = self.child.kill().await;
            }
        }
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of `/proc/<pid>/stat` times.
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `(ppid, utime + stime in clock ticks)` of a process, from `/proc/<pid>/stat`.
pub fn stat_ticks(pid: i32) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields after
    // the last ')' start with field 3 (state).
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// Resident memory of a process (VmRSS), KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU ticks per process at one instant.
#[derive(Debug, Clone, Default)]
pub struct ProcTicks(HashMap<i32, u64>);

impl ProcTicks {
    /// Ticks of `pids` now (processes that are gone are left out).
    pub fn of(pids: &[i32]) -> ProcTicks {
        ProcTicks(
            pids.iter()
                .filter_map(|&p| stat_ticks(p).map(|(_, t)| (p, t)))
                .collect(),
        )
    }

    /// Ticks spent from `earlier` to `self`: per process present now, its
    /// ticks minus its earlier ticks (0 if it did not exist then: it started
    /// inside the window). A process that exited inside the window is
    /// missing from `self`, so its ticks in the window are lost.
    pub fn since(&self, earlier: &ProcTicks) -> u64 {
        self.0
            .iter()
            .map(|(p, t)| t.saturating_sub(earlier.0.get(p).copied().unwrap_or(0)))
            .sum()
    }
}

/// `(busy, total)` clock ticks of the whole machine, all CPUs together,
/// from the aggregate `cpu` line of `/proc/stat` (`proc(5)`): total is
/// user + nice + system + idle + iowait + irq + softirq + steal (guest time
/// is already inside user and nice), busy is total − idle − iowait. `None`
/// when the text has no such line.
pub fn machine_ticks(proc_stat: &str) -> Option<(u64, u64)> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if f.len() < 5 {
        return None;
    }
    let total: u64 = f.iter().sum();
    Some((total.saturating_sub(f[3] + f[4]), total))
}

/// CPU readings of the nodes, of PostgreSQL, of the bench itself and of
/// the whole machine at one instant.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    at: Instant,
    sked: ProcTicks,
    pg: Option<ProcTicks>,
    /// The bench process's own ticks (its workers and API clients).
    bench: u64,
    /// The machine's `(busy, total)` ticks ([`machine_ticks`]).
    machine: Option<(u64, u64)>,
}

/// CPU used over a window, in % of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// The sked nodes together.
    pub sked: f64,
    /// The PostgreSQL server (see [`ProcSet`]); `None` when not local.
    pub pg: Option<f64>,
    /// The bench process itself (the load it generates: API calls,
    /// subscribers, workers).
    pub bench: f64,
    /// The whole machine busy, in % of all its cores (100 = every core
    /// busy the whole window); `None` without `/proc/stat`.
    pub machine_busy: Option<f64>,
}

impl CpuSnapshot {
    /// CPU used from `self` to `later`, in % of one core.
    pub fn percent_until(&self, later: &CpuSnapshot) -> CpuUse {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let hz = clock_ticks_per_sec();
        let pct = |ticks: u64| ticks as f64 / hz / secs * 100.0;
        CpuUse {
            sked: pct(later.sked.since(&self.sked)),
            pg: match (&self.pg, &later.pg) {
                (Some(a), Some(b)) => Some(pct(b.since(a))),
                _ => None,
            },
            bench: pct(later.bench.saturating_sub(self.bench)),
            machine_busy: match (self.machine, later.machine) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                    Some(b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * 100.0)
                }
                _ => None,
            },
        }
    }
}

/// The processes of the PostgreSQL server the bench database lives on: the
/// postmaster and its children (found through `/proc`, as the parent of our
/// own backend), minus the client backends of *other* databases (read from
/// `pg_stat_activity` at each reading), so that other users of a shared
/// server are not counted. Background processes (WAL writer, checkpointer,
/// autovacuum) are shared by all databases and always counted.
///
/// Caveat: backends that exit inside a measured window lose their ticks (a
/// process's CPU time disappears from `/proc` with it); sked keeps pooled
/// connections open, so this is small. Connections opened inside the window
/// count in full.
pub struct ProcSet {
    postmaster: i32,
}

impl ProcSet {
    /// The server's postmaster, if the server runs on this machine.
    pub async fn postgres(pool: &PgPool) -> Option<ProcSet> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await
            .ok()?;
        let (ppid, _) = stat_ticks(backend)?;
        let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
        (comm.trim() == "postgres").then_some(ProcSet { postmaster: ppid })
    }

    /// Ticks of the server's processes now.
    pub async fn ticks(&self, pool: &PgPool) -> ProcTicks {
        let foreign: HashSet<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND datname IS DISTINCT FROM current_database()",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
        let mut out = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if foreign.contains(&pid) {
                    continue;
                }
                if let Some((ppid, t)) = stat_ticks(pid)
                    && (pid == self.postmaster || ppid == self.postmaster)
                {
                    out.insert(pid, t);
                }
            }
        }
        ProcTicks(out)
    }
}

#[cfg(test)]
mod tests {
    use super::machine_ticks;

    #[test]
    fn machine_ticks_read_the_aggregate_cpu_line_of_proc_stat() {
        // proc(5): user nice system idle iowait irq softirq steal guest guest_nice
        let text = "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 3 0\nintr 1 2\n";
        // total = 100+5+50+800+20+3+2+10 (guest is inside user); busy = total - idle - iowait
        assert_eq!(machine_ticks(text), Some((170, 990)));
        // A kernel with fewer columns still has idle and iowait.
        assert_eq!(machine_ticks("cpu  1 2 3 4 5\n"), Some((6, 15)));
        assert_eq!(machine_ticks("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(machine_ticks("cpu  1 2 x 4 5\n"), None);
        assert_eq!(machine_ticks("cpu  1 2 3\n"), None);
    }
}
