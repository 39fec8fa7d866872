//! Transport security (issue 12): TLS on the gRPC listener (server
//! certificate, optional client certificates) and PostgreSQL reached over
//! TLS with `sslmode=verify-full`. Every certificate is made here with
//! rcgen; everything listens on and connects to 127.0.0.1 only.

use std::net::SocketAddr;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sked::app::{self, Settings};
use sked::proto::v1 as pb;
use sked::transport::{TlsError, TlsSettings};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

// ---------------------------------------------------------------- PKI

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, sans.first().copied().unwrap_or("leaf"));
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for IP 127.0.0.1.
    fn server(&self) -> Leaf {
        self.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    fn client(&self) -> Leaf {
        self.leaf(&["client.example"], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- nodes

/// A node serving TLS on 127.0.0.1:0 (in process, through `app::serve`).
struct TlsNode {
    addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), app::Error>>,
}

impl TlsNode {
    async fn start(mut settings: Settings, tls: TlsSettings) -> TlsNode {
        settings.tls = Some(tls);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(app::serve(
            settings,
            listener,
            stop.clone().cancelled_owned(),
        ));
        TlsNode { addr, stop, handle }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("node stops in time")
            .expect("serve task")
            .expect("serve ended cleanly");
    }
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` if given.
async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("127.0.0.1");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Creates and reads back a definition through `ch` (a call that reaches
/// the database); the error of the first call that fails.
async fn define_and_get(ch: Channel, name: &str) -> Result<pb::TaskDefinition, tonic::Status> {
    let mut defs = DefinitionServiceClient::new(ch);
    defs.create_definition(pb::CreateDefinitionRequest {
        definition: Some(sh_def(name, "true", manual())),
    })
    .await?;
    Ok(defs
        .get_definition(pb::GetDefinitionRequest { name: name.into() })
        .await?
        .into_inner())
}

/// Asserts a client without an acceptable TLS setup gets no answer: the
/// connection or the call fails (within a bound, no hang).
async fn assert_refused(
    what: &str,
    channel: impl std::future::Future<Output = Result<Channel, tonic::transport::Error>>,
) {
    let outcome = tokio::time::timeout(WAIT, async {
        match channel.await {
            Err(e) => Err(format!("connect: {e}")),
            Ok(ch) => match define_and_get(ch, "refused").await {
                Err(s) => Err(format!("call: {s}")),
                Ok(d) => Ok(d),
            },
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: refused within {WAIT:?}, not hanging"));
    assert!(outcome.is_err(), "{what} must be refused, got {outcome:?}");
}

/// A plaintext (h2c) channel to `addr`.
async fn plaintext_channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

// ---------------------------------------------------------------- gRPC TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_node_serves_clients_trusting_its_ca_and_refuses_plaintext_and_strangers() {
    let db = TestDb::new().await;
    let ca = Ca::new("sked test CA");
    let server = ca.server();
    let dir = TempDir::new("sked-tls");
    let tls = TlsSettings::from_files(
        &dir.write("server.pem", &server.cert),
        &dir.write("server.key", &server.key),
        None,
    )
    .expect("rcgen material is accepted");
    let node = TlsNode::start(settings(&db, "tls1"), tls).await;

    let ch = tls_channel(node.addr, &ca.pem(), None)
        .await
        .expect("TLS connect trusting the CA");
    let def = define_and_get(ch.clone(), "over-tls")
        .await
        .expect("calls succeed over TLS");
    assert_eq!(def.name, "over-tls");
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health over TLS")
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    assert_refused("a plaintext client", plaintext_channel(node.addr)).await;
    let stranger = Ca::new("another CA");
    assert_refused(
        "a client trusting another CA",
        tls_channel(node.addr, &stranger.pem(), None),
    )
    .await;

    // Nothing of the refused clients reached the database.
    let ch = tls_channel(node.addr, &ca.pem(), None).await.unwrap();
    let err = DefinitionServiceClient::new(ch)
        .get_definition(pb::GetDefinitionRequest {
            name: "refused".into(),
        })
        .await
        .expect_err("no definition from refused clients");
    assert_eq!(err.code(), tonic::Code::NotFound);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_presenting_a_certificate_it_signed_are_served() {
    let db = TestDb::new().await;
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let other_ca = Ca::new("other client CA");
    let server = server_ca.server();
    let tls = TlsSettings {
        cert_pem: server.cert.clone().into_bytes(),
        key_pem: server.key.clone().into_bytes(),
        client_ca_pem: Some(client_ca.pem().into_bytes()),
    };
    let node = TlsNode::start(settings(&db, "mtls1"), tls).await;

    assert_refused(
        "a client without a certificate",
        tls_channel(node.addr, &server_ca.pem(), None),
    )
    .await;
    assert_refused(
        "a client with a certificate of another CA",
        tls_channel(node.addr, &server_ca.pem(), Some(&other_ca.client())),
    )
    .await;
    assert_refused("a plaintext client", plaintext_channel(node.addr)).await;

    let ch = tls_channel(node.addr, &server_ca.pem(), Some(&client_ca.client()))
        .await
        .expect("mutual TLS connect");
    let def = define_and_get(ch, "mtls")
        .await
        .expect("a client with a certificate of the client CA is served");
    assert_eq!(def.name, "mtls");
    node.stop().await;
}

#[test]
fn unusable_tls_material_is_refused_at_start_naming_the_flag() {
    let ca = Ca::new("ca");
    let a = ca.server();
    let b = ca.server();
    let dir = TempDir::new("sked-tls-bad");
    let cert = dir.write("a.pem", &a.cert);
    let key_a = dir.write("a.key", &a.key);
    let key_b = dir.write("b.key", &b.key);
    let garbage = dir.write("garbage.pem", "not a PEM file\n");
    let missing = dir.0.join("missing.pem");

    assert!(TlsSettings::from_files(&cert, &key_a, None).is_ok());
    match TlsSettings::from_files(&missing, &key_a, None) {
        Err(e @ TlsError::Read { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("--tls-cert") && msg.contains("missing.pem"),
                "{msg}"
            );
        }
        other => panic!("missing cert file: {other:?}"),
    }
    match TlsSettings::from_files(&cert, &key_a, Some(&missing)) {
        Err(e @ TlsError::Read { .. }) => assert!(e.to_string().contains("--tls-client-ca")),
        other => panic!("missing client CA file: {other:?}"),
    }
    for (what, cert, key, client_ca) in [
        ("a key of another certificate", &cert, &key_b, None),
        (
            "a certificate file without a certificate",
            &garbage,
            &key_a,
            None,
        ),
        ("a key file without a key", &cert, &garbage, None),
        (
            "a client CA without a certificate",
            &cert,
            &key_a,
            Some(&garbage),
        ),
    ] {
        match TlsSettings::from_files(cert, key, client_ca.map(PathBuf::as_path)) {
            Err(TlsError::Invalid(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// `sked serve` with `SKED_TLS_CERT`/`SKED_TLS_KEY`: the real binary serves
/// TLS only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sked_serve_with_tls_flags_serves_tls_only() {
    let db = TestDb::new().await;
    let ca = Ca::new("binary CA");
    let server = ca.server();
    let dir = TempDir::new("sked-tls-bin");
    let cert = dir.write("server.pem", &server.cert);
    let key = dir.write("server.key", &server.key);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sked"))
        .args(["serve", "--listen", &addr.to_string()])
        .env("DATABASE_URL", &db.url)
        .env("SKED_TLS_CERT", &cert)
        .env("SKED_TLS_KEY", &key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sked serve");
    let ch = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("sked serve exited: {status}");
            }
            if let Ok(ch) = tls_channel(addr, &ca.pem(), None).await {
                let serving = tonic_health::pb::health_client::HealthClient::new(ch.clone())
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1);
                if serving {
                    return ch;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("sked serve answers health over TLS within 60 s");
    // Auth is on (DATABASE_URL): an unauthenticated call is answered, over
    // TLS, with UNAUTHENTICATED — the API itself is reached.
    let err = DefinitionServiceClient::new(ch)
        .get_definition(pb::GetDefinitionRequest { name: "x".into() })
        .await
        .expect_err("no key");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let plain = tokio::time::timeout(WAIT, async {
        let ch = plaintext_channel(addr).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
            tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?,
        )
    })
    .await
    .expect("no hang");
    assert!(plain.is_err(), "plaintext health check refused: {plain:?}");
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

// ---------------------------------------------------------------- PostgreSQL over TLS

/// A private PostgreSQL cluster on 127.0.0.1:<free port> that accepts only
/// TLS over TCP (`hostssl`), with a server certificate for IP 127.0.0.1.
/// Stopped (immediate) and removed on drop, also when the test fails.
struct SslPg {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// (uid, gid) to run the server binaries as when we are root
    /// (PostgreSQL refuses to run as root).
    run_as: Option<(u32, u32)>,
}

impl SslPg {
    fn start(server: &Leaf) -> SslPg {
        let bin = sked::embedded_pg::find_bin_dir().expect("initdb/pg_ctl installed");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = root.then(postgres_user);
        let mut pg = SslPg {
            dir: TempDir::new("sked-tls-pg"),
            bin,
            port: 0,
            run_as,
        };
        pg.own(&pg.dir.0);
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--no-sync".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
            ],
        );
        for (name, content) in [("server.crt", &server.cert), ("server.key", &server.key)] {
            let p = data.join(name);
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            pg.own(&p);
        }
        // TCP only with TLS; the Unix socket (for pg_ctl) stays trusted.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostnossl all all all reject\n\
             hostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        write!(
            conf,
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             fsync = off\nsynchronous_commit = off\nmax_connections = 50\n",
            pg.dir.0.display()
        )
        .unwrap();
        drop(conf);
        pg.port = port;
        let log = pg.dir.0.join("postgres.log");
        pg.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-s".as_ref(),
            ],
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.0.join("data")
    }

    fn own(&self, p: &Path) {
        if let Some((uid, gid)) = self.run_as {
            chown(p, Some(uid), Some(gid)).unwrap();
        }
    }

    fn command(&self, program: &str, args: &[&std::ffi::OsStr]) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.bin.join(program));
        cmd.args(args).current_dir(&self.dir.0);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) {
        let out = self.command(program, args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} failed: {}\n{}\nlog: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.0.join("postgres.log")).unwrap_or_default()
        );
    }

    fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for SslPg {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command(
                "pg_ctl",
                &[
                    "stop".as_ref(),
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "-s".as_ref(),
                ],
            )
            .output();
        // `self.dir` removes the directory when dropped right after.
    }
}

/// uid and gid of the `postgres` system user.
fn postgres_user() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam with a valid C string; the result is read at once,
    // before any other getpw* call of this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "running as root needs a postgres user");
    // SAFETY: non-null pointer from getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn pg_settings(url: String) -> Settings {
    let mut s = Settings::new(url);
    s.node_id = "pg-tls".into();
    s.shutdown_grace = Duration::from_secs(5);
    s.claim_poll = Duration::from_millis(500);
    s.scheduler_max_sleep = Duration::from_secs(1);
    s.db_max_connections = 6;
    s.auth = false;
    s
}

/// `serve` with `url` must fail to start (the database cannot be reached);
/// returns its error text.
async fn serve_fails(url: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        app::serve(pg_settings(url), listener, std::future::pending()),
    )
    .await
    .expect("fails within 30 s");
    match r {
        Err(e @ app::Error::Db(_)) => e.to_string(),
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_requiring_tls_is_reached_with_sslmode_verify_full() {
    let ca = Ca::new("pg CA");
    let pg = SslPg::start(&ca.server());
    let ca_file = pg.dir.write("root.pem", &ca.pem());
    let url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    ));

    let node = TestNode::start_with(pg_settings(url.clone())).await;
    let def = define_and_get(node.channel.clone(), "over-pg-tls")
        .await
        .expect("calls that hit the database succeed");
    assert_eq!(def.name, "over-pg-tls");
    // A run end to end: claim, events, LISTEN/NOTIFY all over TLS.
    let b = define_and_bind(&node, "acme", sh_def("hello-tls", "echo tls", manual())).await;
    let run = trigger(&node, "acme", &b.id).await;
    let run = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(run.state, pb::RunState::Succeeded as i32);

    // What PostgreSQL says about the client connections: all encrypted.
    let pool = sked::db::connect(&url, 1)
        .await
        .expect("verify-full connect");
    let (all_ssl, n): (Option<bool>, i64) = sqlx::query_as(
        "SELECT bool_and(s.ssl), count(*) FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.client_addr IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(n >= 2, "the node's and this pool's connections: {n}");
    assert_eq!(all_ssl, Some(true), "every TCP connection uses TLS");
    pool.close().await;
    node.stop().await;

    // Without TLS the server refuses (hostnossl reject) ...
    let err = serve_fails(pg.url("sslmode=disable")).await;
    assert!(err.contains("no encryption"), "{err}");
    // ... and verify-full refuses a server whose certificate it cannot verify:
    // another CA, or a name the certificate does not carry.
    let other = pg.dir.write("other.pem", &Ca::new("other").pem());
    let err = serve_fails(pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other.display()
    )))
    .await;
    assert!(err.contains("certificate"), "{err}");
    let err = serve_fails(
        pg.url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            ca_file.display()
        ))
        .replace("127.0.0.1", "localhost"),
    )
    .await;
    assert!(err.contains("certificate"), "{err}");
}
