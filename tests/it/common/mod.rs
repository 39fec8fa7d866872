//! Test harness: a real PostgreSQL and real nodes on 127.0.0.1:0, driven
//! through the generated gRPC clients.
//!
//! PostgreSQL: `SKED_TEST_DATABASE_URL` (or `DATABASE_URL`) if set; else the
//! server on 127.0.0.1:5432 if one answers; else a private cluster started
//! from the machine's initdb/pg_ctl for this test binary (stopped at exit).
//! Each test gets its own database, dropped when the test ends.

#![allow(dead_code)]

mod receiver;
pub use receiver::*;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use sked::app::{self, Settings};
use sked::embedded_pg::{EmbeddedPg, Options};
use sked::proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;

pub use pb::admin_service_client::AdminServiceClient;
pub use pb::binding_service_client::BindingServiceClient;
pub use pb::definition_service_client::DefinitionServiceClient;
pub use pb::log_service_client::LogServiceClient;
pub use pb::run_service_client::RunServiceClient;

/// Generous bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);

static SERVER: OnceLock<Server> = OnceLock::new();
static INIT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

enum Server {
    Url(String),
    Embedded(EmbeddedPg),
}

impl Server {
    fn url(&self, db: &str) -> String {
        match self {
            Server::Url(u) => with_database(u, db),
            Server::Embedded(pg) => pg.url(db),
        }
    }
}

/// Replaces the database name in a `postgres://` URL.
fn with_database(url: &str, db: &str) -> String {
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

extern "C" fn stop_embedded_at_exit() {
    if let Some(Server::Embedded(pg)) = SERVER.get() {
        pg.stop_blocking();
        let _ = std::fs::remove_dir_all(pg.base_dir());
    }
}

async fn server() -> &'static Server {
    INIT.get_or_init(|| async {
        let configured = std::env::var("SKED_TEST_DATABASE_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .ok();
        let candidate =
            configured.unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let reachable = tokio::time::timeout(Duration::from_secs(3), async {
            use sqlx::Connection;
            sqlx::PgConnection::connect(&with_database(&candidate, "postgres")).await
        })
        .await
        .is_ok_and(|r| r.is_ok());
        let server = if reachable {
            Server::Url(candidate)
        } else {
            let dir = std::env::temp_dir().join(format!("sked-test-pg-{}", std::process::id()));
            let pg = EmbeddedPg::start_with(&dir, Options { fast_unsafe: true })
                .await
                .expect("no PostgreSQL reachable and the private test cluster could not start");
            // SAFETY: registering a plain extern "C" fn with no captured state.
            unsafe { libc::atexit(stop_embedded_at_exit) };
            Server::Embedded(pg)
        };
        let _ = SERVER.set(server);
    })
    .await;
    SERVER.get().expect("initialised above")
}

/// Turns of the tests in this binary: every [`TestDb`] holds one. Tests
/// share theirs ([`TestDb::new`]); a test whose assertions are about timing
/// under its own load (fire lag while it floods the node) takes its turn
/// alone ([`TestDb::alone`]), so the other tests' nodes and processes on the
/// same cores do not decide its outcome. Each alone turn costs the suite
/// its duration on one of the test threads: keep them few. (One test holds
/// one `TestDb`: a second shared turn queued behind an alone one would
/// never come.)
static TURN: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

enum Turn {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// A fresh database for one test, dropped on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
    _turn: Turn,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::create(Turn::Shared(TURN.read().await)).await
    }

    /// [`TestDb::new`] for a test that measures timing: it runs while no
    /// other test of this binary holds a `TestDb`.
    pub async fn alone() -> TestDb {
        Self::create(Turn::Alone(TURN.write().await)).await
    }

    async fn create(turn: Turn) -> TestDb {
        let server = server().await;
        let name = format!("sked_t_{}", uuid::Uuid::new_v4().simple());
        let admin_url = server.url("postgres");
        sked::db::ensure_database(&admin_url, &name)
            .await
            .expect("create test database");
        TestDb {
            url: server.url(&name),
            name,
            admin_url,
            _turn: turn,
        }
    }

    /// A pool on this database (for checks a user could make with psql).
    pub async fn pool(&self) -> sqlx::PgPool {
        sked::db::connect(&self.url, 4)
            .await
            .expect("connect test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Async drop is not a thing: drop the database on a helper thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                let _ = rt.block_on(sked::db::drop_database(&admin, &name));
            }
        })
        .join();
    }
}

/// Settings for a test node: fast polls, short grace.
pub fn settings(db: &TestDb, node_id: &str) -> Settings {
    let mut s = Settings::new(db.url.clone());
    s.node_id = node_id.to_string();
    s.shutdown_grace = Duration::from_secs(5);
    s.claim_poll = Duration::from_millis(500);
    s.scheduler_max_sleep = Duration::from_secs(1);
    s.db_max_connections = 10;
    // These nodes run as the development mode does (every caller a platform
    // admin naming its tenant with x-tenant-id): most tests exercise the
    // engine and quotas. tests/it/auth.rs turns auth on.
    s.auth = false;
    s
}

/// A node serving on 127.0.0.1:0.
pub struct TestNode {
    pub addr: SocketAddr,
    /// The web console's address, when started with one
    /// ([`TestNode::start_with_console`]).
    pub console: Option<SocketAddr>,
    pub node_id: String,
    pub channel: Channel,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), app::Error>>,
}

impl TestNode {
    pub async fn start(db: &TestDb, node_id: &str) -> TestNode {
        Self::start_with(settings(db, node_id)).await
    }

    /// A node with `settings` and a web console on 127.0.0.1:0 too.
    pub async fn start_with_console(mut settings: Settings) -> TestNode {
        let console = std::net::TcpListener::bind("127.0.0.1:0").expect("bind console");
        let addr = console.local_addr().expect("console addr");
        settings.console = Some(std::sync::Arc::new(console));
        let mut node = Self::start_with(settings).await;
        node.console = Some(addr);
        node
    }

    pub async fn start_with(settings: Settings) -> TestNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let node_id = settings.node_id.clone();
        let handle = tokio::spawn(app::serve(
            settings,
            listener,
            stop.clone().cancelled_owned(),
        ));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect to node");
        TestNode {
            addr,
            console: None,
            node_id,
            channel,
            stop,
            handle,
        }
    }

    pub fn definitions(&self) -> DefinitionServiceClient<Channel> {
        DefinitionServiceClient::new(self.channel.clone())
    }
    pub fn bindings(&self) -> BindingServiceClient<Channel> {
        BindingServiceClient::new(self.channel.clone())
    }
    pub fn runs(&self) -> RunServiceClient<Channel> {
        RunServiceClient::new(self.channel.clone())
    }
    pub fn logs(&self) -> LogServiceClient<Channel> {
        LogServiceClient::new(self.channel.clone())
    }
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// Graceful stop; returns what `serve` returned.
    pub async fn stop(self) {
        self.stop.cancel();
        let r = tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("node stops in time");
        r.expect("serve task").expect("serve ended cleanly");
    }
}

/// `msg` with the `x-tenant-id` header.
pub fn as_tenant<T>(tenant: &str, msg: T) -> Request<T> {
    request(tenant, None, msg)
}

/// `msg` with the `x-tenant-id` header (unless `tenant` is empty) and, when
/// given, `authorization: Bearer <token>`.
pub fn request<T>(tenant: &str, token: Option<&str>, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if !tenant.is_empty() {
        r.metadata_mut()
            .insert("x-tenant-id", tenant.parse().expect("ascii tenant"));
    }
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii token"),
        );
    }
    r
}

/// `msg` with only `authorization: Bearer <token>`.
pub fn with_key<T>(token: &str, msg: T) -> Request<T> {
    request("", Some(token), msg)
}

/// A command definition.
pub fn command_def(
    name: &str,
    program: &str,
    args: &[&str],
    schedule: pb::Schedule,
) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Command(pb::CommandHandler {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
        schedule: Some(schedule),
        ..Default::default()
    }
}

/// A definition `name` with the `event` handler and `schedule` (other
/// fields at their defaults).
pub fn event_def(name: &str, schedule: pb::Schedule) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
        schedule: Some(schedule),
        ..Default::default()
    }
}

/// `sh -c script` definition.
pub fn sh_def(name: &str, script: &str, schedule: pb::Schedule) -> pb::TaskDefinition {
    command_def(name, "sh", &["-c", script], schedule)
}

pub fn every(secs: i64) -> pb::Schedule {
    pb::Schedule {
        kind: Some(pb::schedule::Kind::Interval(pb::IntervalSchedule {
            every: Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
            anchor_time: None,
        })),
        ..Default::default()
    }
}

pub fn manual() -> pb::Schedule {
    pb::Schedule {
        kind: Some(pb::schedule::Kind::Manual(pb::ManualSchedule {})),
        ..Default::default()
    }
}

pub fn cron(expr: &str, tz: &str) -> pb::Schedule {
    pb::Schedule {
        kind: Some(pb::schedule::Kind::Cron(pb::CronSchedule {
            expression: expr.into(),
        })),
        timezone: tz.into(),
        ..Default::default()
    }
}

/// CreateDefinition of `def` (as a platform caller); the stored definition.
pub async fn create_definition(
    node: &TestNode,
    def: pb::TaskDefinition,
) -> Result<pb::TaskDefinition, tonic::Status> {
    node.definitions()
        .create_definition(as_tenant(
            "",
            pb::CreateDefinitionRequest {
                definition: Some(def),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

/// Creates `def` and binds it for `tenant`; returns the binding.
pub async fn define_and_bind(
    node: &TestNode,
    tenant: &str,
    def: pb::TaskDefinition,
) -> pb::Binding {
    define_and_bind_via(&node.channel, tenant, None, def).await
}

/// [`define_and_bind`] through any channel (e.g. a `sked serve` child).
pub async fn define_and_bind_via(
    ch: &Channel,
    tenant: &str,
    token: Option<&str>,
    def: pb::TaskDefinition,
) -> pb::Binding {
    let name = def.name.clone();
    DefinitionServiceClient::new(ch.clone())
        .create_definition(request(
            "",
            token,
            pb::CreateDefinitionRequest {
                definition: Some(def),
            },
        ))
        .await
        .expect("create definition");
    BindingServiceClient::new(ch.clone())
        .create_binding(request(
            tenant,
            token,
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: name,
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("create binding")
        .into_inner()
}

/// Pauses `tenant`'s binding `id` until resumed (PauseBinding, no note, no
/// expiry); panics when the call fails.
pub async fn pause(node: &TestNode, tenant: &str, id: &str) {
    node.bindings()
        .pause_binding(as_tenant(
            tenant,
            pb::PauseBindingRequest {
                binding_id: id.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("pause binding");
}

/// Resumes `tenant`'s binding `id` (ResumeBinding); panics when the call
/// fails.
pub async fn resume(node: &TestNode, tenant: &str, id: &str) {
    node.bindings()
        .resume_binding(as_tenant(
            tenant,
            pb::ResumeBindingRequest {
                binding_id: id.into(),
            },
        ))
        .await
        .expect("resume binding");
}

/// GetBinding of `tenant`'s binding `id` (panics on an error status).
pub async fn get_binding(node: &TestNode, tenant: &str, id: &str) -> pb::Binding {
    node.bindings()
        .get_binding(as_tenant(
            tenant,
            pb::GetBindingRequest {
                binding_id: id.into(),
            },
        ))
        .await
        .expect("get binding")
        .into_inner()
}

/// Triggers a run of `binding_id` now.
pub async fn trigger(node: &TestNode, tenant: &str, binding_id: &str) -> pb::Run {
    trigger_via(&node.channel, tenant, None, binding_id).await
}

/// [`trigger`] through any channel, with an API key when given.
pub async fn trigger_via(
    ch: &Channel,
    tenant: &str,
    token: Option<&str>,
    binding_id: &str,
) -> pb::Run {
    RunServiceClient::new(ch.clone())
        .trigger_run(request(
            tenant,
            token,
            pb::TriggerRunRequest {
                binding_id: binding_id.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("trigger run")
        .into_inner()
}

/// Spawns the real `sked` binary as `sked serve --listen 127.0.0.1:<free
/// port> <args>`, without the caller's `DATABASE_URL` unless `envs` sets
/// one; returns the child and a channel once its health check answers
/// SERVING (within 60 s; panics if the child exits first).
pub async fn spawn_sked(
    args: &[&std::ffi::OsStr],
    envs: &[(&str, &str)],
) -> (tokio::process::Child, Channel) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sked"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .env_remove("DATABASE_URL")
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sked serve");
    let channel = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(status) = child.try_wait().expect("child status") {
                panic!("sked serve exited before serving: {status}");
            }
            if let Ok(ch) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
            {
                let ok = tonic_health::pb::health_client::HealthClient::new(ch.clone())
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1);
                if ok {
                    return ch;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("sked serve answers its health check within 60 s");
    (child, channel)
}

/// Opens a TailRun stream on `node`.
pub async fn open_tail(
    node: &TestNode,
    tenant: &str,
    run_id: &str,
    after_seq: i64,
    follow: bool,
) -> tonic::Streaming<pb::RunEvent> {
    node.logs()
        .tail_run(as_tenant(
            tenant,
            pb::TailRunRequest {
                run_id: run_id.into(),
                after_seq,
                follow,
            },
        ))
        .await
        .expect("tail run")
        .into_inner()
}

/// Every message of a stream until it ends.
pub async fn drain(mut stream: tonic::Streaming<pb::RunEvent>) -> Vec<pb::RunEvent> {
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.expect("tail stream") {
        out.push(e);
    }
    out
}

/// Every event of a run, following it to its end (TailRun from `after_seq`).
pub async fn tail_all(
    node: &TestNode,
    tenant: &str,
    run_id: &str,
    after_seq: i64,
) -> Vec<pb::RunEvent> {
    let stream = open_tail(node, tenant, run_id, after_seq, true).await;
    tokio::time::timeout(WAIT, drain(stream))
        .await
        .expect("tail ends when the run is terminal")
}

/// Waits until the run is terminal; returns it.
pub async fn wait_terminal(node: &TestNode, tenant: &str, run_id: &str) -> pb::Run {
    tail_all(node, tenant, run_id, 0).await;
    node.runs()
        .get_run(as_tenant(
            tenant,
            pb::GetRunRequest {
                run_id: run_id.into(),
            },
        ))
        .await
        .expect("get run")
        .into_inner()
}

/// Log lines (messages) of a run's events, in order.
pub fn log_lines(events: &[pb::RunEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::run_event::Kind::Log(l)) => Some(l.message.clone()),
            _ => None,
        })
        .collect()
}

/// The field named in an INVALID_ARGUMENT status's BadRequest details.
pub fn violation_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts seqs are exactly 1..=n.
pub fn assert_dense(events: &[pb::RunEvent]) {
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let want: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(seqs, want, "seqs must be dense from 1 with no duplicates");
}

/// Every run of a binding (all pages), oldest fire time first.
pub async fn runs_of(node: &TestNode, tenant: &str, binding_id: &str) -> Vec<pb::Run> {
    let mut out = list_all_runs(
        node,
        tenant,
        pb::ListRunsRequest {
            binding_id: binding_id.into(),
            ..Default::default()
        },
    )
    .await;
    out.sort_by_key(|r| r.scheduled_time.unwrap().seconds);
    out
}

/// Every page of ListBindings for `req`, `req.page_size` a page (the
/// server's default when unset); panics when a call fails.
pub async fn list_all_bindings(
    node: &TestNode,
    tenant: &str,
    req: pb::ListBindingsRequest,
) -> Vec<pb::Binding> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = node
            .bindings()
            .list_bindings(as_tenant(
                tenant,
                pb::ListBindingsRequest {
                    page_token: token.clone(),
                    ..req.clone()
                },
            ))
            .await
            .expect("list bindings")
            .into_inner();
        out.extend(page.bindings);
        token = page.next_page_token;
        if token.is_empty() {
            return out;
        }
    }
}

/// Every page of ListRuns for `req`, `req.page_size` a page (1 000 when
/// unset); panics when a call fails.
pub async fn list_all_runs(
    node: &TestNode,
    tenant: &str,
    req: pb::ListRunsRequest,
) -> Vec<pb::Run> {
    let page_size = if req.page_size == 0 {
        1000
    } else {
        req.page_size
    };
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = node
            .runs()
            .list_runs(as_tenant(
                tenant,
                pb::ListRunsRequest {
                    page_size,
                    page_token: token.clone(),
                    ..req.clone()
                },
            ))
            .await
            .expect("list runs")
            .into_inner();
        out.extend(page.runs);
        token = page.next_page_token;
        if token.is_empty() {
            return out;
        }
    }
}

/// Polls the binding's runs ([`runs_of`]) until `done` holds for them, for
/// at most `limit`; returns them. Panics with `what` on timeout.
pub async fn runs_until(
    node: &TestNode,
    tenant: &str,
    binding_id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&[pb::Run]) -> bool,
) -> Vec<pb::Run> {
    tokio::time::timeout(limit, async {
        loop {
            let runs = runs_of(node, tenant, binding_id).await;
            if done(&runs) {
                return runs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("within {limit:?}: {what}"))
}

/// A codec that sends and receives encoded messages as they are (for
/// malformed and descriptor-built requests).
#[derive(Default, Clone)]
pub struct RawCodec;
/// [`RawCodec`]'s encoder.
pub struct RawEncoder;
/// [`RawCodec`]'s decoder.
pub struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}
impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}
impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// A one-second `event` definition bound for `tenant`: a canary whose fires
/// show the node keeps scheduling.
pub async fn event_canary(node: &TestNode, tenant: &str) -> pb::Binding {
    define_and_bind(
        node,
        tenant,
        pb::TaskDefinition {
            name: format!("canary-{}", tenant.to_lowercase()),
            handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
            schedule: Some(every(1)),
            ..Default::default()
        },
    )
    .await
}

/// Binds the existing definition `definition` for `tenant`.
pub async fn bind_existing(node: &TestNode, tenant: &str, definition: &str) -> pb::Binding {
    node.bindings()
        .create_binding(as_tenant(
            tenant,
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: definition.into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("create binding")
        .into_inner()
}

/// A set timestamp as seconds since the epoch (fractional).
pub fn secs(t: &Option<prost_types::Timestamp>) -> f64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds as f64 + f64::from(t.nanos) / 1e9
}

/// Now, as seconds since the epoch (fractional).
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Seconds since the epoch (fractional) → Timestamp.
pub fn ts(at: f64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.floor() as i64,
        nanos: ((at - at.floor()) * 1e9) as i32,
    }
}

/// `ms` milliseconds as a Duration.
pub fn dur(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A run's state as the enum.
pub fn state(r: &pb::Run) -> pb::RunState {
    pb::RunState::try_from(r.state).unwrap()
}

/// Whether a run has ended (or was skipped).
pub fn is_terminal(r: &pb::Run) -> bool {
    matches!(
        state(r),
        pb::RunState::Succeeded
            | pb::RunState::Failed
            | pb::RunState::TimedOut
            | pb::RunState::Cancelled
            | pb::RunState::Skipped
    )
}

/// GetRun as `tenant`.
pub async fn get_run(node: &TestNode, tenant: &str, id: &str) -> pb::Run {
    node.runs()
        .get_run(as_tenant(tenant, pb::GetRunRequest { run_id: id.into() }))
        .await
        .expect("get run")
        .into_inner()
}

/// Waits until a run due at `at` (seconds since the epoch) has been
/// claimed and has ended on the nodes of `node`'s database: a `true` command
/// of its own definition, binding and tenant ("witness"), triggered for
/// `at` (or now, if `at` has passed). The claim passes have then looked at
/// everything due by `at`, so a test can show that something due by then
/// did not start (or was not created) without guessing how long to wait.
pub async fn claims_passed(node: &TestNode, at: f64) {
    // Already there after the first call on this database.
    let _ = create_definition(node, sh_def("witness", "true", manual())).await;
    let b = bind_existing(node, "witness", "witness").await;
    let run = node
        .runs()
        .trigger_run(as_tenant(
            "witness",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                run_time: (at > now_secs()).then(|| ts(at)),
                ..Default::default()
            },
        ))
        .await
        .expect("trigger the witness run")
        .into_inner();
    let done = wait_terminal(node, "witness", &run.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "witness: {done:?}");
}

/// Waits until `canary` (an [`event_canary`] binding of `tenant`) has fired
/// for a fire time a second or more after `at` (seconds since the epoch).
/// Fires are made in passes of the node's scheduler: a whole pass that
/// began at or after `at` has then ended (the second covers a pass that
/// fired the canary before it looked at the rest), so a test can show that
/// something due by `at` did not fire without guessing how long to wait.
pub async fn fires_passed(node: &TestNode, tenant: &str, canary: &pb::Binding, at: f64) {
    runs_until(node, tenant, &canary.id, WAIT, "the canary fires", |runs| {
        runs.iter().any(|r| secs(&r.scheduled_time) >= at + 1.0)
    })
    .await;
}

/// Index and table tuples this transaction has read from `runs` so far
/// (PostgreSQL's counts of the transaction).
pub async fn runs_tuples_read(tx: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT (pg_stat_get_xact_tuples_returned('runs'::regclass)
                 + coalesce(sum(pg_stat_get_xact_tuples_returned(indexrelid)), 0))::int8
         FROM pg_index WHERE indrelid = 'runs'::regclass",
    )
    .fetch_one(tx)
    .await
    .expect("read statistics")
}
