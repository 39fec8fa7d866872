//! Wiring: pool, migrations, services, health, reflection, background tasks
//! and the shutdown order. The only place that spawns long-lived tasks.
//!
//! Shutdown order (`docs/operations.md`, "Health and shutdown"): health
//! reports NOT_SERVING → the scheduler and the executor stop claiming, the
//! node lets its maintenance lease go → running runs get `shutdown_grace` to
//! finish (the node's heartbeat says it drains) → the node deletes its
//! heartbeat row → open streams end → the gRPC server stops → the bridge
//! stops.
//!
//! **Engine tasks are supervised** ([`supervise`]): the scheduler, the
//! executor, the worker hub, the event bridge, the node heartbeat and the
//! leader election each run in a task of their own; when one ends while
//! the node is not stopping, or panics, health answers `NOT_SERVING`, the
//! task is started again after a short pause, and health is `SERVING` again
//! once it runs. A task that dies more than [`Restarts::max`] times within
//! [`Restarts::window`] stops the node with [`Error::EngineTask`], and `sked
//! serve` exits non-zero: a node never answers while it no longer fires.
//! Health is `SERVING` only while the database answers, every engine task
//! runs and the node does not drain ([`Health`]).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Election, GaugeSampler, Heartbeat};
use crate::config::{ListenSecurity, ServeArgs};
use crate::db;
use crate::domain::Clock;
use crate::domain::cluster::NodeLoad;
use crate::domain::tenancy::Caller;
use crate::embedded_pg::{self, EmbeddedPg};
use crate::events::{EventBus, bridge};
use crate::executor::http::{HttpClient, HttpSettings};
use crate::executor::{Executor, RunningRuns};
use crate::grpc::{self, Ctx};
use crate::proto::{self, v1 as pb};
use crate::scheduler::Scheduler;
use crate::transport::{self, TlsSettings, codec};
use crate::usecase::{Actor, tenancy};

/// Errors that stop a node from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached.
    #[error("database: {0}")]
    Db(#[from] db::Error),
    /// A use case (e.g. creating the bootstrap key) refused or failed.
    #[error(transparent)]
    UseCase(#[from] crate::usecase::Error),
    /// Migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The embedded PostgreSQL could not start.
    #[error("embedded PostgreSQL: {0}")]
    EmbeddedPg(#[from] embedded_pg::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Listening failed.
    #[error("listen: {0}")]
    Io(#[from] std::io::Error),
    /// Building reflection failed.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The HTTP client of `http` runs could not be built.
    #[error("http client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// `--http-allow` is not a list of CIDR ranges.
    #[error("--http-allow: {0}")]
    HttpAllow(String),
    /// The `--definitions` file cannot be read or parsed (file, line and
    /// field named), or sked refused one of its objects.
    #[error("--definitions: {0}")]
    Definitions(String),
    /// The TLS certificate, key or client CA cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] transport::TlsError),
    /// A non-loopback listener without TLS and without `--insecure-listen`.
    #[error(transparent)]
    InsecureListen(#[from] crate::config::InsecureListen),
    /// `--archive-dir` cannot hold archive files.
    #[error("--archive-dir {path}: {source}")]
    ArchiveDir {
        /// The directory.
        path: String,
        /// Why it cannot be used.
        source: std::io::Error,
    },
    /// An engine task died more often than [`Restarts`] allows.
    #[error(
        "engine task {task} died {deaths} times within {window:?} (last: {why}); stopping the node"
    )]
    EngineTask {
        /// Which task (`scheduler`, `executor`, ...).
        task: &'static str,
        /// How it died last (its panic message, or that it returned).
        why: String,
        /// Deaths counted.
        deaths: usize,
        /// Within this window.
        window: Duration,
    },
    /// `SKED_NOTIFY_KEY` is not a key.
    #[error("{0}")]
    NotifyKey(String),
    /// The metrics listener (`--metrics-listen`) could not start.
    #[error("--metrics-listen: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

/// Everything a node needs once its database URL is known.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Unique node id.
    pub node_id: String,
    /// Runs executing at once on this node (0 = none: API, scheduler and
    /// maintenance only). One tenant holds at most all but a quarter of them
    /// (at least one fewer when ≥ 2: 64 → 48, 4 → 3, 2 → 1, 1 → 1; see
    /// [`crate::executor::tenant_slot_cap`]), so one tenant's long runs never
    /// take every slot from the others.
    pub max_concurrent_runs: usize,
    /// How long running runs may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Lease a running run holds, renewed every third of it; a dead node's
    /// runs are reaped within 2 × lease.
    pub lease: Duration,
    /// After SIGTERM, how long a run's process group has before SIGKILL.
    pub kill_grace: Duration,
    /// Executor claim poll fallback.
    pub claim_poll: Duration,
    /// Longest scheduler sleep (poll fallback).
    pub scheduler_max_sleep: Duration,
    /// How far ahead of their instant the scheduler prepares fires at most,
    /// so that at the instant only a commit remains (`docs/architecture.md`,
    /// "Firing ahead"; the lead is sized to the bindings due at the
    /// instant); zero turns it off.
    pub fire_ahead: Duration,
    /// Database connections of the node at most, split between its engine
    /// and its API ([`split_connections`]).
    pub db_max_connections: u32,
    /// Changes one tenant may make per second on this node (0: no limit);
    /// see [`crate::grpc::limit::RateLimits`].
    pub tenant_changes_per_sec: u32,
    /// Runs one tenant may create per second through the API on this node
    /// (0: no limit).
    pub tenant_api_runs_per_sec: u32,
    /// Whether calls must carry an API key (`docs/semantics.md`, "Tenancy"). Off only for the
    /// development mode: embedded database, loopback listener.
    pub auth: bool,
    /// Source of now.
    pub clock: Clock,
    /// TLS of the gRPC listener; `None`: plaintext (h2c). Whether plaintext
    /// is allowed on the listener's address is decided before [`serve`]
    /// ([`crate::config::listen_security`]).
    pub tls: Option<TlsSettings>,
    /// `http` runs: the SSRF guard's allow list (`--http-allow`) and, for
    /// tests, a host table instead of DNS.
    pub http: HttpSettings,
    /// The maintenance leader's lease (`--leader-lease-secs`): renewed
    /// every third of it; a dead leader is replaced within it.
    pub leader_lease: Duration,
    /// How often the node writes its heartbeat row.
    pub node_heartbeat: Duration,
    /// How often health checks that the database answers.
    pub health_check: Duration,
    /// Sample the database- and pool-backed gauges (a metrics recorder is
    /// installed: `--metrics-listen`), every `metrics_sample`.
    pub metrics: bool,
    /// Interval of those samples.
    pub metrics_sample: Duration,
    /// How engine tasks that die are restarted ([`supervise`]).
    pub restarts: Restarts,
    /// What the maintenance leader keeps (`--retention`,
    /// `--audit-retention`, `--archive-dir`) and how it paces itself.
    pub retention: crate::retention::Settings,
    /// Definitions (and bindings) applied at start-up, before the node
    /// serves (`--definitions FILE`; see [`apply_definitions`]).
    pub definitions: Option<DefinitionsFile>,
    /// Seals the failure notification rules' signing secrets
    /// (`SKED_NOTIFY_KEY`); `None`: rules cannot be set and this node
    /// delivers no notifications (`docs/operations.md`).
    pub notify_key: Option<crate::domain::notify::NotifyKey>,
    /// How often an idle node looks for due notifications.
    pub notify_poll: Duration,
    /// How often the maintenance leader folds run statistics of past hours
    /// ([`crate::cluster::StatsFold`], which also moves run ends into the
    /// statistics every 5 s on every node); `None`: neither (GetRunStats
    /// stays exact, only slower as the unfolded rows grow).
    pub stats_fold: Option<Duration>,
    /// The web console's listener (`--console-listen`; `src/console`),
    /// already bound; `None`: no console. Shared so `Settings` stays
    /// `Clone` (the node serves on a duplicate of the socket).
    pub console: Option<Arc<std::net::TcpListener>>,
}

/// A parsed `--definitions` file.
#[derive(Debug, Clone)]
pub struct DefinitionsFile {
    /// Its path, for messages.
    pub origin: String,
    /// Its content.
    pub file: crate::cli::apply::File,
}

impl DefinitionsFile {
    /// Reads and parses `path` (the format of `sked apply -f`).
    ///
    /// # Errors
    /// [`Error::Definitions`] naming the file, and for a bad content the
    /// line and field.
    pub fn read(path: &Path) -> Result<DefinitionsFile, Error> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Definitions(format!("{origin}: {e}")))?;
        let file = crate::cli::apply::parse(&origin, &text)
            .map_err(|e| Error::Definitions(e.to_string()))?;
        Ok(DefinitionsFile { origin, file })
    }
}

/// Advisory lock key of `--definitions`: nodes starting at once apply
/// their files one after another (the second finds nothing to change).
const DEFINITIONS_LOCK: i64 = 0x736b_6564_6465_6673; // "skeddefs"

/// The node's own DefinitionService and BindingService called in-process
/// by [`apply_definitions`], as the CLI ([`crate::domain::tenancy::Caller::cli`],
/// a platform admin): the same validation, use cases and audit as a call
/// over the network.
struct Local {
    defs: grpc::definitions::Definitions,
    bindings: grpc::bindings::Bindings,
}

/// The method recorded in audit events of `--definitions`.
const DEFINITIONS_METHOD: &str = "sked serve --definitions";

fn local_req<T>(tenant: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(grpc::authz::Grant {
        caller: Caller::cli(),
        tenant: tenant.map(str::to_string),
        method: DEFINITIONS_METHOD,
    });
    r
}

impl crate::cli::apply::Api for Local {
    async fn list_definitions(
        &self,
        r: pb::ListDefinitionsRequest,
    ) -> crate::cli::Result<pb::ListDefinitionsResponse> {
        use pb::definition_service_server::DefinitionService;
        Ok(self
            .defs
            .list_definitions(local_req(None, r))
            .await?
            .into_inner())
    }
    async fn create_definition(&self, r: pb::CreateDefinitionRequest) -> crate::cli::Result<()> {
        use pb::definition_service_server::DefinitionService;
        self.defs.create_definition(local_req(None, r)).await?;
        Ok(())
    }
    async fn update_definition(&self, r: pb::UpdateDefinitionRequest) -> crate::cli::Result<()> {
        use pb::definition_service_server::DefinitionService;
        self.defs.update_definition(local_req(None, r)).await?;
        Ok(())
    }
    async fn delete_definition(&self, r: pb::DeleteDefinitionRequest) -> crate::cli::Result<()> {
        use pb::definition_service_server::DefinitionService;
        self.defs.delete_definition(local_req(None, r)).await?;
        Ok(())
    }
    async fn list_bindings(
        &self,
        tenant: &str,
        r: pb::ListBindingsRequest,
    ) -> crate::cli::Result<pb::ListBindingsResponse> {
        use pb::binding_service_server::BindingService;
        Ok(self
            .bindings
            .list_bindings(local_req(Some(tenant), r))
            .await?
            .into_inner())
    }
    async fn create_binding(
        &self,
        tenant: &str,
        r: pb::CreateBindingRequest,
    ) -> crate::cli::Result<()> {
        use pb::binding_service_server::BindingService;
        self.bindings
            .create_binding(local_req(Some(tenant), r))
            .await?;
        Ok(())
    }
    async fn update_binding(
        &self,
        tenant: &str,
        r: pb::UpdateBindingRequest,
    ) -> crate::cli::Result<()> {
        use pb::binding_service_server::BindingService;
        self.bindings
            .update_binding(local_req(Some(tenant), r))
            .await?;
        Ok(())
    }
    async fn delete_binding(
        &self,
        tenant: &str,
        r: pb::DeleteBindingRequest,
    ) -> crate::cli::Result<()> {
        use pb::binding_service_server::BindingService;
        self.bindings
            .delete_binding(local_req(Some(tenant), r))
            .await?;
        Ok(())
    }
}

/// Applies a `--definitions` file at start-up, as `sked apply -f` does
/// (upsert by name, only changed fields, `deletion_protection` as the file
/// says; no pruning) but through this node's own services in-process.
/// Nodes starting at once take turns under a PostgreSQL advisory lock, so
/// the file is applied once and the others find it unchanged: idempotent
/// across restarts and nodes.
///
/// # Errors
/// [`Error::Definitions`] naming the file and the object sked refused
/// (with the status, field and reason); database errors.
pub async fn apply_definitions(ctx: &Ctx, defs: &DefinitionsFile) -> Result<(), Error> {
    let mut lock = ctx.core.pool.acquire().await.map_err(db::Error::from)?;
    db::advisory_lock(&mut lock, DEFINITIONS_LOCK).await?;
    let local = Local {
        defs: grpc::definitions::Definitions(ctx.clone()),
        bindings: grpc::bindings::Bindings(ctx.clone()),
    };
    let mut report = crate::cli::apply::Report::default();
    let result = crate::cli::apply::apply(&local, &defs.file, false, false, &mut report).await;
    // Released with the connection should the unlock fail.
    if db::advisory_unlock(&mut lock, DEFINITIONS_LOCK)
        .await
        .is_err()
    {
        lock.close_on_drop();
    }
    for l in &report.lines {
        tracing::info!(file = %defs.origin, "{l}");
    }
    result.map_err(|e| {
        let at = report.lines.len();
        Error::Definitions(format!(
            "{}: applying it failed after {at} object(s): {}",
            defs.origin,
            crate::cli::connect::one_line(&e.to_string())
        ))
    })?;
    tracing::info!(file = %defs.origin, created = report.created, updated = report.updated,
        unchanged = report.unchanged, "definitions file applied");
    Ok(())
}

impl Settings {
    /// Defaults for `database_url` (what `sked serve` uses unless told otherwise).
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            node_id: default_node_id(),
            max_concurrent_runs: 64,
            shutdown_grace: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            kill_grace: Duration::from_secs(10),
            claim_poll: Duration::from_secs(1),
            scheduler_max_sleep: Duration::from_secs(5),
            fire_ahead: Duration::from_secs(10),
            db_max_connections: 20,
            tenant_changes_per_sec: 200,
            tenant_api_runs_per_sec: 1000,
            auth: true,
            clock: Clock::system(),
            tls: None,
            http: HttpSettings::default(),
            leader_lease: Duration::from_secs(15),
            node_heartbeat: crate::cluster::Heartbeat::DEFAULT_EVERY,
            health_check: Duration::from_secs(5),
            metrics: false,
            metrics_sample: Duration::from_secs(10),
            restarts: Restarts::default(),
            retention: crate::retention::Settings::default(),
            definitions: None,
            notify_key: None,
            notify_poll: Duration::from_millis(500),
            stats_fold: Some(crate::cluster::StatsFold::DEFAULT_EVERY),
            console: None,
        }
    }
}

/// How a dead engine task is restarted ([`supervise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restarts {
    /// Deaths of one task tolerated within `window`; one more stops the
    /// node ([`Error::EngineTask`]).
    pub max: usize,
    /// The window deaths are counted in.
    pub window: Duration,
    /// Pause before the first restart; doubled for each death in the
    /// window, at most 10 s.
    pub backoff: Duration,
}

impl Default for Restarts {
    fn default() -> Self {
        Restarts {
            max: 5,
            window: Duration::from_secs(300),
            backoff: Duration::from_millis(500),
        }
    }
}

/// `<hostname>-<pid>`, within `--node-id`'s rule ([`crate::config::node_id`]).
pub fn default_node_id() -> String {
    // Held to `--node-id`'s rule (crate::config::node_id): a character
    // outside it becomes `-`, and the host part keeps 100 of them.
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
        .chars()
        .map(|c| {
            if crate::domain::is_name_char(c) {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    format!("{host}-{}", std::process::id())
}

/// Runs one node on `listener` until `shutdown` resolves, then shuts down in
/// order (module docs). Tests and `sked serve` both start nodes this way.
///
/// # Errors
/// [`Error`] when the TLS settings are unusable ([`Error::Tls`]), the
/// database is unreachable (including a TLS failure its `sslmode` asks to
/// fail on), migrations fail, or the server fails.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    // Bad TLS material fails before anything starts.
    let tls = settings
        .tls
        .as_ref()
        .map(TlsSettings::server_config)
        .transpose()?;
    // Two pools: the engine's (scheduler, executor, reaper, event bridge,
    // health) and the API's, so no amount of API traffic — a burst of
    // backfills, slow streams — can keep the scheduler or a claim waiting
    // for a connection. They share the node's budget.
    if let Some(dir) = &settings.retention.archive_dir {
        crate::retention::check_archive_dir(dir).map_err(|source| Error::ArchiveDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let (engine_size, api_size) = split_connections(settings.db_max_connections, machine_cores());
    let engine_pool = db::connect(&settings.database_url, engine_size).await?;
    db::migrate(&engine_pool).await?;
    // Today's and the next days' run_events partitions, by this node's
    // clock (the leader keeps them ahead; the default partition catches
    // anything meanwhile).
    if let Err(e) = crate::retention::ensure_partitions(
        &engine_pool,
        settings.clock.now(),
        settings.retention.ahead,
        settings.retention.lock_timeout * 10,
    )
    .await
    {
        tracing::warn!(error = %e, "creating the run_events partitions ahead failed; the leader tries again");
    }
    let pool = db::connect(&settings.database_url, api_size).await?;
    let addr = listener.local_addr()?;
    if settings.auth {
        if db::tenancy::api_key_count_active(&pool).await? == 0 {
            tracing::warn!(
                "authentication is on and no API key exists yet: create the first platform admin key with `sked admin bootstrap-key` (DATABASE_URL set)"
            );
        }
    } else {
        tracing::warn!(
            "authentication is OFF (development mode: embedded database on loopback); every caller acts as a platform admin"
        );
    }
    tracing::info!(%addr, node_id = %settings.node_id, auth = settings.auth, tls = settings.tls.is_some(), "sked node serving");
    serve_with_pool(settings, tls, engine_pool, pool, listener, shutdown).await
}

/// API connections per core of this machine at most (see
/// [`split_connections`]).
pub const API_CONNECTIONS_PER_CORE: u32 = 2;

/// How a node's `db_max_connections` is split on a machine of `cores`
/// cores: (engine pool, API pool). The engine gets half (at least 2); the
/// API the rest, but at most [`API_CONNECTIONS_PER_CORE`] × `cores` (and
/// at least 4, or the rest when fewer remain; at least 2).
///
/// Why the cap: an API transaction (TriggerRun: about ten short
/// statements) keeps its backend busy, so more of them at once than a few
/// per core do not go faster; they only queue for the CPU beside the
/// engine's claims and fires, which then wait their turn. Calls past the
/// cap wait for a connection in the node instead. Measured with
/// `sked-bench workers` (embedded PostgreSQL, 2 cores, 1 000 TriggerRun/s):
/// worker dispatch p99 26.2 / 26.0 ms with 4 API connections against
/// 43.5 / 49.5 ms with 10; `stream` unchanged (p99 7.3 ms both).
pub fn split_connections(total: u32, cores: u32) -> (u32, u32) {
    let engine = (total / 2).max(2);
    let rest = total.saturating_sub(engine);
    let cap = cores.saturating_mul(API_CONNECTIONS_PER_CORE).max(4);
    (engine, rest.min(cap).max(2))
}

/// This machine's cores as the standard library sees them (1 when unknown).
fn machine_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

async fn serve_with_pool(
    settings: Settings,
    tls: Option<tonic::transport::ServerTlsConfig>,
    engine_pool: PgPool,
    pool: PgPool,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let bus = EventBus::new();
    let running = RunningRuns::default();
    let http = HttpClient::new(&settings.http)?;
    let notify_http = http.clone();
    // Remote workers' runs are held by the hub; a cancel request reaches
    // whichever of the two has the run.
    // One per node: its notifications go out in the order handed over.
    // Its task ends once every clone is dropped, after sending the rest.
    let (announcer, announcing) = db::notify::Announcer::new(engine_pool.clone());
    tokio::spawn(announcing.run());
    let hub = crate::usecase::workers::Hub::new(
        crate::usecase::Core {
            pool: engine_pool.clone(),
            clock: settings.clock.clone(),
            node_id: settings.node_id.clone(),
            bus: bus.clone(),
            executor_wake: Arc::default(),
            announcer: announcer.clone(),
        },
        settings.lease,
        settings.kill_grace,
    );
    let mut wakers = bridge::Wakers::new(Arc::new(LocalHeld {
        executor: running.clone(),
        workers: hub.clone(),
    }));
    wakers.workers = hub.wake();
    let engine_stop = CancellationToken::new();
    let streams_stop = CancellationToken::new();
    let bridge_stop = CancellationToken::new();
    // The election stops when draining begins (another node takes over
    // maintenance at once); the heartbeat once running runs are done.
    let election_stop = CancellationToken::new();
    let heartbeat_stop = CancellationToken::new();
    // A supervisor that gave up on a task: the node stops with its error.
    let fatal = CancellationToken::new();
    let fatal_error: Arc<std::sync::Mutex<Option<Error>>> = Arc::default();
    let draining = Arc::new(AtomicBool::new(false));
    let ctx = Ctx {
        core: crate::usecase::Core {
            pool: pool.clone(),
            clock: settings.clock.clone(),
            node_id: settings.node_id.clone(),
            bus: bus.clone(),
            executor_wake: Arc::clone(&wakers.executor),
            announcer: announcer.clone(),
        },
        streams_stop: streams_stop.clone(),
        auth: Arc::new(grpc::auth::Auth::new(settings.auth)),
        costly: Arc::default(),
        rates: Arc::new(grpc::limit::RateLimits::new(
            settings.tenant_changes_per_sec,
            settings.tenant_api_runs_per_sec,
        )),
        notify_key: settings.notify_key.clone(),
    };

    if let Some(defs) = &settings.definitions {
        apply_definitions(&ctx, defs).await?;
    }

    // The web console, on its own listener, over the same context: set up
    // here (bad TLS material fails now), served beside the gRPC server.
    let console_stop = CancellationToken::new();
    let console_setup = match &settings.console {
        Some(l) => {
            let l = l.try_clone()?;
            l.set_nonblocking(true)?;
            let l = TcpListener::from_std(l)?;
            // With TLS the console serves HTTPS with the same certificate.
            let tls = settings
                .tls
                .as_ref()
                .map(crate::console::tls_config)
                .transpose()
                .map_err(|m| Error::Tls(crate::transport::TlsError::Invalid(m)))?;
            let console = crate::console::Console {
                ctx: ctx.clone(),
                secure: settings.tls.is_some(),
            };
            Some((console, l, tls, console_stop.clone()))
        }
        None => None,
    };

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Arc::new(Health::new(reporter));
    health.update(|_| {}).await;
    // Supervises `task` (module docs); a supervisor that gives up stops
    // the node.
    let supervised = |task: &'static str, stop: CancellationToken, start: TaskStart| {
        let health = Arc::clone(&health);
        let fatal = fatal.clone();
        let fatal_error = Arc::clone(&fatal_error);
        let restarts = settings.restarts;
        tokio::spawn(async move {
            if let Err(e) = supervise(task, &health, &stop, restarts, start).await {
                tracing::error!(error = %e, "stopping the node: an engine task keeps dying");
                fatal_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                fatal.cancel();
            }
        })
    };

    let bridge_task = {
        let (pool, node_id, bus, wakers, stop) = (
            engine_pool.clone(),
            settings.node_id.clone(),
            bus.clone(),
            wakers.clone(),
            bridge_stop.clone(),
        );
        supervised(
            "event_bridge",
            bridge_stop.clone(),
            Box::new(move || {
                Box::pin(bridge::run(
                    pool.clone(),
                    node_id.clone(),
                    bus.clone(),
                    wakers.clone(),
                    stop.clone(),
                ))
            }),
        )
    };
    let scheduler_task = {
        let scheduler = Scheduler {
            pool: engine_pool.clone(),
            clock: settings.clock.clone(),
            node_id: settings.node_id.clone(),
            bus: bus.clone(),
            wake: Arc::clone(&wakers.scheduler),
            executor_wake: Arc::clone(&wakers.executor),
            announcer: announcer.clone(),
            batch: 1000,
            max_sleep: settings.scheduler_max_sleep,
            coalesce: Duration::from_millis(10),
            // Two. Measured 2026-12-04 (`sked-bench fire`, 10 000 bindings,
            // 2 cores): on the bench's embedded PostgreSQL four loops gave
            // the same spread p99 (87–108 against 78–86 ms) for 28 % more
            // PostgreSQL CPU, and aligned fires fell out of preparing
            // ahead (p99 1 054 against 65 ms); only against a server whose
            // round trips are slow (TLS, no autovacuum) did four help.
            workers: 2,
            ahead: settings.fire_ahead,
            ahead_batch: 50_000,
            // Each slot holds an engine connection for up to a band's lead
            // (seconds for the largest): a small engine pool keeps one
            // slot, so most of it stays free for the executor and reaper.
            ahead_slots: Arc::new(tokio::sync::Semaphore::new(
                if engine_pool.options().get_max_connections() >= 6 {
                    crate::scheduler::AHEAD_SLOTS
                } else {
                    1
                },
            )),
            ahead_frontier: Arc::default(),
            ahead_cost_ns: Arc::default(),
            ahead_writing: Arc::default(),
        };
        let stop = engine_stop.clone();
        supervised(
            "scheduler",
            engine_stop.clone(),
            Box::new(move || Box::pin(scheduler.clone().run(stop.clone()))),
        )
    };
    let hub_task = {
        let (hub, stop) = (hub.clone(), engine_stop.clone());
        supervised(
            "worker_hub",
            engine_stop.clone(),
            Box::new(move || Box::pin(hub.clone().run(stop.clone()))),
        )
    };
    let executor_task = {
        let executor = Executor {
            pool: engine_pool.clone(),
            clock: settings.clock.clone(),
            node_id: settings.node_id.clone(),
            bus: bus.clone(),
            wake: Arc::clone(&wakers.executor),
            timer: Arc::clone(&wakers.executor_timer),
            workers_wake: Arc::clone(&wakers.workers),
            events_wake: wakers.events.clone(),
            running: running.clone(),
            max_concurrent_runs: settings.max_concurrent_runs,
            lease: settings.lease,
            kill_grace: settings.kill_grace,
            http,
            poll: settings.claim_poll,
            shutdown_grace: settings.shutdown_grace,
        };
        let stop = engine_stop.clone();
        supervised(
            "executor",
            engine_stop.clone(),
            Box::new(move || {
                // Runs of a dead executor died with its task: let their
                // leases lapse (reaped node_lost, retried per policy)
                // rather than renew them for nothing.
                let abandoned = executor.running.abandon_all();
                if abandoned > 0 {
                    tracing::warn!(
                        abandoned,
                        "runs of the dead executor are left to the reaper"
                    );
                }
                Box::pin(executor.clone().run(stop.clone()))
            }),
        )
    };
    // Failure notifications: only a node that can open the rules' secrets
    // delivers them.
    let notifier_task = settings.notify_key.clone().map(|key| {
        let notifier = crate::executor::notify::Notifier {
            pool: engine_pool.clone(),
            clock: settings.clock.clone(),
            node_id: settings.node_id.clone(),
            bus: bus.clone(),
            http: notify_http,
            key,
            poll: settings.notify_poll,
            lease: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            batch: 32,
            per_tenant: crate::executor::notify::PER_TENANT_IN_FLIGHT,
        };
        let stop = engine_stop.clone();
        supervised(
            "notifier",
            engine_stop.clone(),
            Box::new(move || Box::pin(notifier.clone().run(stop.clone()))),
        )
    });
    let (election, leadership) = Election::new(
        engine_pool.clone(),
        settings.node_id.clone(),
        settings.leader_lease,
    );
    let election_task = {
        let (election, stop) = (Arc::new(election), election_stop.clone());
        supervised(
            "leader_election",
            election_stop.clone(),
            Box::new(move || {
                let (election, stop) = (Arc::clone(&election), stop.clone());
                Box::pin(async move { election.run(stop).await })
            }),
        )
    };
    // Leader-only: it stops with the election, when draining begins.
    let retention_task = {
        let retention = crate::retention::Retention {
            pool: engine_pool.clone(),
            clock: settings.clock.clone(),
            leadership: leadership.clone(),
            settings: settings.retention.clone(),
        };
        let stop = election_stop.clone();
        supervised(
            "retention",
            election_stop.clone(),
            Box::new(move || {
                let (retention, stop) = (retention.clone(), stop.clone());
                Box::pin(async move { retention.run(stop).await })
            }),
        )
    };
    // Moves run ends into the statistics on every node; folds past hours
    // while leading, like retention.
    let stats_fold_task = settings.stats_fold.map(|every| {
        let fold = crate::cluster::StatsFold {
            pool: engine_pool.clone(),
            clock: settings.clock.clone(),
            leadership: leadership.clone(),
            every,
        };
        let stop = election_stop.clone();
        supervised(
            "stats_fold",
            election_stop.clone(),
            Box::new(move || {
                let (fold, stop) = (fold.clone(), stop.clone());
                Box::pin(async move { fold.run(stop).await })
            }),
        )
    });
    let heartbeat_task = {
        let load = {
            let (running, hub, bus, draining) = (
                running.clone(),
                hub.clone(),
                bus.clone(),
                Arc::clone(&draining),
            );
            Arc::new(move || NodeLoad {
                running_runs: u32::try_from(running.len() + hub.held_runs()).unwrap_or(u32::MAX),
                stream_subscribers: u32::try_from(bus.subscribers()).unwrap_or(u32::MAX),
                draining: draining.load(Ordering::Relaxed),
            })
        };
        let heartbeat = Arc::new(Heartbeat {
            pool: engine_pool.clone(),
            node_id: settings.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            start_time: settings.clock.now(),
            every: settings.node_heartbeat,
            load,
            leadership: leadership.clone(),
        });
        let stop = heartbeat_stop.clone();
        supervised(
            "node_heartbeat",
            heartbeat_stop.clone(),
            Box::new(move || {
                let (heartbeat, stop) = (Arc::clone(&heartbeat), stop.clone());
                Box::pin(async move { heartbeat.run(stop).await })
            }),
        )
    };
    // Gauges that need the database or the pools; only with a recorder.
    let sampler_task = settings.metrics.then(|| {
        let sampler = GaugeSampler {
            engine_pool: engine_pool.clone(),
            api_pool: pool.clone(),
            clock: settings.clock.clone(),
            every: settings.metrics_sample,
        };
        let stop = engine_stop.clone();
        tokio::spawn(async move { sampler.run(stop).await })
    });
    let health_task = tokio::spawn(watch_database(
        engine_pool.clone(),
        Arc::clone(&health),
        engine_stop.clone(),
        settings.health_check,
    ));

    let reflection_v1 = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;

    let drain = {
        let health = Arc::clone(&health);
        let engine_stop = engine_stop.clone();
        let streams_stop = streams_stop.clone();
        let fatal = fatal.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = fatal.cancelled() => {}
            }
            tracing::info!("shutting down: NOT_SERVING, draining runs");
            console_stop.cancel();
            draining.store(true, Ordering::Relaxed);
            health.update(|s| s.draining = true).await;
            engine_stop.cancel();
            election_stop.cancel();
            let _ = scheduler_task.await;
            let _ = executor_task.await;
            let _ = hub_task.await;
            let _ = health_task.await;
            let _ = election_task.await;
            let _ = retention_task.await;
            if let Some(t) = notifier_task {
                let _ = t.await;
            }
            if let Some(t) = stats_fold_task {
                let _ = t.await;
            }
            if let Some(t) = sampler_task {
                let _ = t.await;
            }
            heartbeat_stop.cancel();
            let _ = heartbeat_task.await;
            streams_stop.cancel();
        }
    };

    // No Nagle: streams write small frames, and Nagle with the client's
    // delayed ACK held each one back ~40 ms (a custom incoming stream does
    // not get tonic's own `tcp_nodelay`). With TLS, tonic runs the
    // handshake on these same sockets.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY");
            }
        })
    });
    let console_task = console_setup.map(|(console, l, tls, stop)| {
        tokio::spawn(async move {
            let served = match tls {
                Some(tls) => crate::console::serve_tls(console, l, tls, stop).await,
                None => crate::console::serve(console, l, stop).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "the console listener stopped");
            }
        })
    });
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    // Every service, health and reflection included, takes gzip and zstd
    // and caps decoded messages (`transport::codec!`); a request that does
    // not decompress is INVALID_ARGUMENT, not tonic's INTERNAL.
    //
    // Inside that, the authorization gate (`grpc::authz`, one table of role
    // and scope per method): before a request is decoded, a path without a
    // rule is UNIMPLEMENTED, the key, role and tenant are checked and a
    // change is counted; health and reflection pass without a key.
    let result = server
        .layer(tower::util::MapResponseLayer::new(
            transport::request_decode_status,
        ))
        .layer(grpc::authz::AuthzLayer::new(&ctx))
        .add_service(codec!(health_service))
        .add_service(codec!(reflection_v1))
        .add_service(codec!(reflection_v1alpha))
        .add_service(codec!(
            pb::definition_service_server::DefinitionServiceServer::new(
                grpc::definitions::Definitions(ctx.clone()),
            )
        ))
        .add_service(codec!(
            pb::binding_service_server::BindingServiceServer::new(grpc::bindings::Bindings(
                ctx.clone()
            ),)
        ))
        .add_service(codec!(pb::run_service_server::RunServiceServer::new(
            grpc::runs::Runs(ctx.clone()),
        )))
        // TailRun encodes each event once for all subscribers; the rest of
        // LogService is the generated server (with `codec!` inside).
        .add_service(grpc::logs::LogRoutes::new(
            grpc::logs::Logs(ctx.clone()),
            codec!(pb::log_service_server::LogServiceServer::new(
                grpc::logs::Logs(ctx.clone())
            )),
            transport::MAX_DECODED_MESSAGE_BYTES,
        ))
        .add_service(codec!(pb::admin_service_server::AdminServiceServer::new(
            grpc::admin::Admin(ctx.clone()),
        )))
        .add_service(codec!(
            pb::notification_service_server::NotificationServiceServer::new(
                grpc::notifications::Notifications(ctx.clone()),
            )
        ))
        .add_service(codec!(pb::worker_service_server::WorkerServiceServer::new(
            grpc::workers::Workers {
                ctx: ctx.clone(),
                hub,
            }
        )))
        .serve_with_incoming_shutdown(incoming, drain)
        .await;
    // If the server failed on its own, stop everything else too.
    engine_stop.cancel();
    streams_stop.cancel();
    if let Some(t) = console_task {
        // Its live tails ended with `streams_stop`; an idle browser
        // connection does not hold the node up.
        let abort = t.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    bridge_stop.cancel();
    let _ = bridge_task.await;
    pool.close().await;
    engine_pool.close().await;
    tracing::info!("node stopped");
    let died = fatal_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match died {
        Some(e) => Err(e),
        None => Ok(result?),
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Service names reported by health (besides the overall "").
const SERVICES: [&str; 5] = [
    "sked.v1.DefinitionService",
    "sked.v1.BindingService",
    "sked.v1.RunService",
    "sked.v1.LogService",
    "sked.v1.AdminService",
];

async fn set_health(h: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    h.set_service_status("", status).await;
    for s in SERVICES {
        h.set_service_status(s, status).await;
    }
}

/// What health depends on: `SERVING` only while the database answers,
/// every engine task runs and the node does not drain.
#[derive(Debug, Default)]
pub struct HealthState {
    /// The last database check failed.
    pub database_down: bool,
    /// Engine tasks that died and are not running again yet.
    pub dead: std::collections::BTreeSet<&'static str>,
    /// The node shuts down.
    pub draining: bool,
    /// What was reported last (`None`: nothing yet).
    reported: Option<bool>,
}

impl HealthState {
    /// Whether the node serves.
    pub fn serving(&self) -> bool {
        !self.database_down && self.dead.is_empty() && !self.draining
    }
}

/// The node's health: one state, reported to tonic-health whenever the
/// verdict changes (updates are serialised, so reports never go out of
/// order).
#[derive(Debug)]
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
    state: tokio::sync::Mutex<HealthState>,
}

impl Health {
    /// Health reported through `reporter`.
    pub fn new(reporter: tonic_health::server::HealthReporter) -> Health {
        Health {
            reporter,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// Changes the state with `f` and reports the verdict if it changed.
    pub async fn update(&self, f: impl FnOnce(&mut HealthState)) {
        let mut s = self.state.lock().await;
        f(&mut s);
        let serving = s.serving();
        if s.reported != Some(serving) {
            if s.reported.is_some() {
                tracing::warn!(
                    serving,
                    database_down = s.database_down,
                    dead = ?s.dead,
                    draining = s.draining,
                    "health changed"
                );
            }
            s.reported = Some(serving);
            set_health(&self.reporter, serving).await;
            ::metrics::gauge!(crate::telemetry::metrics::HEALTH_SERVING).set(if serving {
                1.0
            } else {
                0.0
            });
        }
    }

    /// Whether the node serves now.
    pub async fn serving(&self) -> bool {
        self.state.lock().await.serving()
    }
}

/// Reports NOT_SERVING while the database does not answer (checked every
/// `every`, each check given at most 3 s).
async fn watch_database(
    pool: PgPool,
    health: Arc<Health>,
    stop: CancellationToken,
    every: Duration,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let ok = tokio::time::timeout(Duration::from_secs(3), db::ping(&pool))
            .await
            .is_ok_and(|r| r.is_ok());
        if stop.is_cancelled() {
            return;
        }
        health.update(|s| s.database_down = !ok).await;
    }
}

/// Starts one incarnation of an engine task.
pub type TaskStart = Box<dyn FnMut() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Runs the engine task `task` (a new incarnation from `start` each time)
/// until `stop`: when it ends before `stop`, or panics, health turns
/// `NOT_SERVING` ([`HealthState::dead`]), and after a pause (`restarts`)
/// it is started again and health recovers. Returns once the task ended
/// after `stop`.
///
/// # Errors
/// [`Error::EngineTask`] when the task died more than `restarts.max` times
/// within `restarts.window` (the caller stops the node).
pub async fn supervise(
    task: &'static str,
    health: &Health,
    stop: &CancellationToken,
    restarts: Restarts,
    mut start: TaskStart,
) -> Result<(), Error> {
    let mut deaths: std::collections::VecDeque<tokio::time::Instant> = Default::default();
    loop {
        let ended = tokio::spawn(start()).await;
        if stop.is_cancelled() {
            if let Err(e) = ended
                && e.is_panic()
            {
                tracing::error!(task, error = %e, "engine task panicked while stopping");
            }
            return Ok(());
        }
        let why = match ended {
            Ok(()) => "it returned".to_string(),
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                let text = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                format!("panicked: {text}")
            }
            Err(e) => e.to_string(),
        };
        tracing::error!(task, %why, "engine task died; NOT_SERVING until it runs again");
        ::metrics::counter!(crate::telemetry::metrics::ENGINE_RESTARTS, "task" => task)
            .increment(1);
        health
            .update(|s| {
                s.dead.insert(task);
            })
            .await;
        let now = tokio::time::Instant::now();
        deaths.push_back(now);
        while deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > restarts.window)
        {
            deaths.pop_front();
        }
        if deaths.len() > restarts.max {
            return Err(Error::EngineTask {
                task,
                why,
                deaths: deaths.len(),
                window: restarts.window,
            });
        }
        let pause = restarts
            .backoff
            .saturating_mul(1 << (deaths.len() - 1).min(5))
            .min(Duration::from_secs(10));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return Ok(()),
        }
        tracing::warn!(task, "restarting engine task");
        health
            .update(|s| {
                s.dead.remove(task);
            })
            .await;
    }
}

/// `sked serve`: reads the TLS files and checks the listener may start
/// ([`crate::config::listen_security`]), resolves the database (starting the
/// embedded PostgreSQL under `--data-dir` when no `DATABASE_URL` is set),
/// then serves until SIGINT or SIGTERM and stops the embedded PostgreSQL.
///
/// # Errors
/// [`Error::InsecureListen`] for a non-loopback plaintext listener without
/// `--insecure-listen`, [`Error::Tls`] for unusable TLS files, else
/// [`Error`] from start-up or serving.
pub async fn run_serve(args: ServeArgs) -> Result<(), Error> {
    // A bad definitions file stops the node before anything starts.
    let definitions = args
        .definitions
        .as_deref()
        .map(DefinitionsFile::read)
        .transpose()?;
    // Refuse an unprotected public listener before starting anything.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsSettings::from_files(
            cert,
            key,
            args.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    match crate::config::listen_security(args.listen, tls.is_some(), args.insecure_listen)? {
        ListenSecurity::Tls => {
            tracing::info!(
                client_certificates = tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()),
                "gRPC listener uses TLS"
            );
        }
        ListenSecurity::LoopbackPlaintext => {}
        ListenSecurity::InsecureOptOut => tracing::warn!(
            listen = %args.listen,
            "serving plaintext gRPC on a non-loopback address (--insecure-listen): API keys and data cross the network in clear unless a TLS-terminating proxy sits in front of this node"
        ),
    }
    let mut embedded = None;
    let url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            let pg = start_embedded(&args.data_dir).await?;
            let url = pg.url("sked");
            embedded = Some(pg);
            url
        }
    };
    let mut settings = Settings::new(url);
    if let Some(id) = args.node_id.clone() {
        settings.node_id = id;
    }
    settings.max_concurrent_runs = args.max_concurrent_runs as usize;
    settings.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    settings.lease = Duration::from_secs(args.lease_secs);
    settings.kill_grace = Duration::from_secs(args.kill_grace_secs);
    settings.fire_ahead = Duration::from_millis(args.fire_ahead_ms);
    settings.db_max_connections = args.db_max_connections;
    settings.tenant_changes_per_sec = args.tenant_changes_per_sec;
    settings.tenant_api_runs_per_sec = args.tenant_api_runs_per_sec;
    settings.tls = tls;
    settings.leader_lease = Duration::from_secs(args.leader_lease_secs);
    settings.retention.runs = args.retention;
    settings.retention.audit = args.audit_retention;
    settings.retention.archive_dir = args.archive_dir.clone();
    settings.definitions = definitions;
    // The notify key comes from the environment only (never a flag, which
    // `ps` would show).
    settings.notify_key = match std::env::var("SKED_NOTIFY_KEY") {
        Ok(k) if !k.is_empty() => {
            Some(crate::domain::notify::NotifyKey::parse(&k).map_err(Error::NotifyKey)?)
        }
        _ => {
            tracing::info!(
                "no SKED_NOTIFY_KEY: failure notification rules cannot be set, and this node delivers none"
            );
            None
        }
    };
    tracing::info!(
        retention = %crate::domain::retention::show_retention(args.retention),
        audit_retention = %crate::domain::retention::show_retention(args.audit_retention),
        archive_dir = ?args.archive_dir,
        "retention"
    );
    settings.http.allow =
        crate::domain::HttpAllow::parse(&args.http_allow).map_err(Error::HttpAllow)?;
    if !settings.http.allow.0.is_empty() {
        tracing::info!(allow = %args.http_allow, "http runs may call these internal ranges (--http-allow)");
    }
    // Auth is on whenever DATABASE_URL is set (docs/operations.md, "Security"); only the embedded
    // database on a loopback listener may run without it.
    settings.auth =
        args.database_url.is_some() || !args.listen.ip().is_loopback() || args.require_auth;
    let listener = TcpListener::bind(args.listen).await?;
    // The console: asked for, or the development mode's on loopback.
    if let Some(addr) = crate::config::console_addr(&args, settings.auth)
        .map_err(|m| Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, m)))?
    {
        crate::config::listen_security(addr, settings.tls.is_some(), args.insecure_listen)?;
        let scheme = if settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                tracing::info!(url = %format!("{scheme}://{}/", l.local_addr()?), auth = settings.auth, "web console serving");
                settings.console = Some(Arc::new(l));
            }
            // The development mode's console is a convenience: a second
            // node on the machine (or its port taken) runs without it.
            Err(e) if args.console_listen.is_none() => tracing::warn!(
                %addr, error = %e,
                "the development console could not listen; running without it (choose another address with --console-listen)"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    // Metrics: the recorder is process-global, so it is installed here (one
    // node per process), not in `serve`, which tests run many times.
    let exporter = match args.metrics_listen {
        Some(addr) => {
            crate::telemetry::metrics::set_tenant_label(args.metrics_tenant_label);
            let exporter = crate::telemetry::install_metrics(addr)?;
            settings.metrics = true;
            tracing::info!(%addr, tenant_label = args.metrics_tenant_label, "serving Prometheus metrics on /metrics");
            Some(tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "the metrics listener stopped");
                }
            }))
        }
        None => None,
    };
    // The private database is restarted should it die under the node.
    let embedded = embedded.map(Arc::new);
    let supervise_stop = CancellationToken::new();
    let supervisor = embedded.clone().map(|pg| {
        let stop = supervise_stop.clone();
        tokio::spawn(async move { pg.supervise(Duration::from_secs(1), stop).await })
    });
    let result = serve(settings, listener, shutdown_signal()).await;
    if let Some(exporter) = exporter {
        exporter.abort();
    }
    supervise_stop.cancel();
    if let Some(s) = supervisor {
        let _ = s.await;
    }
    if let Some(pg) = embedded {
        tracing::info!("stopping embedded PostgreSQL");
        if let Err(e) = pg.stop().await {
            tracing::warn!(error = %e, "stopping embedded PostgreSQL failed");
        }
    }
    result
}

async fn start_embedded(data_dir: &Path) -> Result<EmbeddedPg, Error> {
    let dir = if data_dir.is_absolute() {
        data_dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(data_dir)
    };
    tracing::info!(dir = %dir.display(), "no DATABASE_URL: starting embedded PostgreSQL (development mode)");
    let pg = EmbeddedPg::start(&dir.join("pg")).await?;
    db::ensure_database(&pg.url("postgres"), "sked").await?;
    Ok(pg)
}

/// `sked admin bootstrap-key`: creates a platform admin key directly in
/// the database (applying migrations first) and returns its token, to be
/// printed once. The same use case as CreateApiKey
/// ([`tenancy::create_api_key`]), acting as [`Caller::cli`]: audited with
/// actor `cli` and method `sked admin bootstrap-key`.
///
/// # Errors
/// [`Error`] when the database is unreachable or refuses, or the name is
/// longer than [`crate::domain::tenancy::MAX_KEY_NAME`] characters.
pub async fn bootstrap_key(database_url: &str, name: &str) -> Result<String, Error> {
    let pool = db::connect(database_url, 2).await?;
    db::migrate(&pool).await?;
    // The use case wants a node's Core; creating a key publishes no run
    // event and wakes no executor, so a bus and a wake-up nobody listens to
    // do.
    let core = crate::usecase::Core {
        pool: pool.clone(),
        clock: Clock::system(),
        node_id: default_node_id(),
        bus: EventBus::new(),
        executor_wake: Arc::default(),
        // Creating a key announces nothing: no task sends.
        announcer: db::notify::Announcer::new(pool.clone()).0,
    };
    let caller = Caller::cli();
    let actor = Actor {
        caller: &caller,
        action: "sked admin bootstrap-key",
    };
    let new = tenancy::NewApiKey {
        name: name.to_string(),
        role: crate::domain::Role::Admin,
        tenant_id: None,
    };
    let (key, token) = tenancy::create_api_key(&core, actor, new).await?;
    pool.close().await;
    tracing::info!(key_id = %key.id, "platform admin key created");
    Ok(token)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("signal received");
}

/// The runs held on this node for the bridge's cancel requests: the
/// executor's own and those of the workers connected here.
#[derive(Debug)]
struct LocalHeld {
    executor: RunningRuns,
    workers: crate::usecase::workers::Hub,
}

impl bridge::LocalRuns for LocalHeld {
    fn cancel(&self, id: uuid::Uuid, reason: &str) -> bool {
        self.executor.cancel(id, reason) || self.workers.cancel(id, reason)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn quick(max: usize) -> Restarts {
        Restarts {
            max,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(10),
        }
    }

    #[test]
    fn the_api_pool_is_capped_by_the_cores_and_the_engine_keeps_half() {
        // The default of 20 on 2 cores: 10 for the engine, 4 for the API.
        assert_eq!(split_connections(20, 2), (10, 4));
        // Enough cores: the API gets the other half.
        assert_eq!(split_connections(20, 8), (10, 10));
        assert_eq!(split_connections(1000, 64), (500, 128));
        // One core still gets 4; the smallest setting 2 each.
        assert_eq!(split_connections(20, 1), (10, 4));
        assert_eq!(split_connections(4, 1), (2, 2));
        assert_eq!(split_connections(7, 16), (3, 4));
        // Never more than asked for in all, never an empty pool.
        for total in 4..200 {
            for cores in [0, 1, 2, 3, 8, 64, u32::MAX] {
                let (e, a) = split_connections(total, cores);
                assert!(
                    e >= 2 && a >= 2 && e + a <= total,
                    "{total} on {cores}: {e} + {a}"
                );
                assert!(e >= total / 2, "the engine keeps half");
            }
        }
    }

    #[tokio::test]
    async fn a_panicked_task_is_restarted_and_health_recovers() {
        let (reporter, _service) = tonic_health::server::health_reporter();
        let health = Arc::new(Health::new(reporter));
        health.update(|_| {}).await;
        assert!(health.serving().await, "SERVING at start");
        let starts = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        // Dies the first time; the second incarnation runs until stopped.
        let (release, released) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(AtomicBool::new(false)),
        );
        let start: TaskStart = {
            let (starts, stop, release, released) = (
                Arc::clone(&starts),
                stop.clone(),
                Arc::clone(&release),
                Arc::clone(&released),
            );
            Box::new(move || {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                let (stop, release, released) =
                    (stop.clone(), Arc::clone(&release), Arc::clone(&released));
                Box::pin(async move {
                    if n == 0 {
                        // The backoff keeps it dead long enough to be seen.
                        panic!("boom");
                    }
                    released.store(true, Ordering::SeqCst);
                    release.notify_one();
                    stop.cancelled().await;
                })
            })
        };
        let sup = {
            let (health, stop) = (Arc::clone(&health), stop.clone());
            let restarts = Restarts {
                backoff: Duration::from_millis(300),
                ..quick(3)
            };
            tokio::spawn(async move { supervise("test", &health, &stop, restarts, start).await })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while health.serving().await {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("NOT_SERVING while the task is dead");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !released.load(Ordering::SeqCst) {
                release.notified().await;
            }
        })
        .await
        .expect("restarted");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !health.serving().await {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("SERVING again once it runs");
        stop.cancel();
        sup.await.unwrap().expect("a clean stop");
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_task_that_keeps_dying_stops_the_node() {
        let (reporter, _service) = tonic_health::server::health_reporter();
        let health = Health::new(reporter);
        let stop = CancellationToken::new();
        let starts = Arc::new(AtomicUsize::new(0));
        let start: TaskStart = {
            let starts = Arc::clone(&starts);
            Box::new(move || {
                starts.fetch_add(1, Ordering::SeqCst);
                // Returning before `stop` is dying too.
                Box::pin(async {})
            })
        };
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            supervise("scheduler", &health, &stop, quick(2), start),
        )
        .await
        .expect("gives up")
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::EngineTask {
                    task: "scheduler",
                    deaths: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert!(!health.serving().await);
    }
}
