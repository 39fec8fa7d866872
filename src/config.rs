//! Command line and environment: every setting is a flag with a `SKED_*`
//! environment variable (and `DATABASE_URL`). No other I/O here.

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::TimeDelta;
use clap::{Parser, Subcommand, ValueEnum};

/// sked: a gRPC task-scheduling service on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "sked", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log output format.
    #[arg(long, env = "SKED_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
// Parsed once per process: the size of `serve`'s arguments costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: gRPC API, scheduler and executor.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
    /// Administration straight on the database.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Client subcommands: talk to a node over gRPC (`crate::cli`).
    #[command(flatten)]
    Client(crate::cli::Command),
}

/// `sked admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a platform admin API key directly in the database and print
    /// its token once on stdout (the first key of a deployment, or a
    /// break-glass key). The token is not stored and not logged.
    BootstrapKey(BootstrapKeyArgs),
}

/// `sked admin bootstrap-key`.
#[derive(Debug, Clone, clap::Args)]
pub struct BootstrapKeyArgs {
    /// PostgreSQL URL of the deployment.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Name of the key, for people.
    #[arg(long, default_value = "bootstrap")]
    pub name: String,
}

/// Where the development mode serves the web console: the port after the
/// default gRPC port, loopback only.
pub const DEV_CONSOLE_LISTEN: &str = "127.0.0.1:50052";

/// Where `sked serve` serves the web console: `--console-listen`, else
/// [`DEV_CONSOLE_LISTEN`] when `auth` is off (the development mode), else
/// nowhere; `--no-console` wins.
///
/// # Errors
/// A message naming `--console-listen` for a non-loopback address while
/// auth is off (the console would let anyone act as a platform admin).
pub fn console_addr(args: &ServeArgs, auth: bool) -> Result<Option<SocketAddr>, String> {
    let addr = match (args.console_listen, args.no_console) {
        (_, true) => return Ok(None),
        (Some(a), false) => a,
        (None, false) if !auth => DEV_CONSOLE_LISTEN.parse().map_err(|_| "bad default")?,
        (None, false) => return Ok(None),
    };
    if !auth && !addr.ip().is_loopback() {
        return Err(format!(
            "--console-listen {addr}: authentication is off (development mode), so the console serves only loopback addresses"
        ));
    }
    Ok(Some(addr))
}

/// `sked serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "SKED_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// PostgreSQL URL. Unset: start a private PostgreSQL under --data-dir
    /// (initdb/pg_ctl from PATH or /usr/lib/postgresql/*/bin).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Directory for the embedded PostgreSQL (used only without DATABASE_URL).
    #[arg(long, env = "SKED_DATA_DIR", default_value = ".sked")]
    pub data_dir: PathBuf,
    /// This node's id, unique among nodes sharing the database: 1-128
    /// characters of `[A-Za-z0-9._:-]` (it prefixes the node's event
    /// announcements, `<node>|<run>:...`). Default: `<hostname>-<pid>`.
    #[arg(long, env = "SKED_NODE_ID", value_parser = node_id)]
    pub node_id: Option<String>,
    /// Runs executing at once on this node; more wait QUEUED. One tenant
    /// holds at most all but a quarter of them (at least one fewer: 64 → 48).
    #[arg(long, env = "SKED_MAX_CONCURRENT_RUNS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_runs: u32,
    /// Seconds running runs may take to finish on shutdown.
    #[arg(long, env = "SKED_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Seconds of the lease a running run holds; renewed every third of it
    /// by the node's heartbeat. Another node reaps a dead node's runs
    /// (FAILED/node_lost, retried per policy) within twice this.
    #[arg(long, env = "SKED_LEASE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,
    /// Seconds a run's process group has between SIGTERM and SIGKILL
    /// (timeout, cancel, shutdown).
    #[arg(long, env = "SKED_KILL_GRACE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub kill_grace_secs: u64,
    /// Milliseconds ahead of their instant that fires are prepared at most
    /// (locked and written, committed at the instant), 0–60 000; 0 turns it
    /// off. Bindings due at the same instant start being prepared as long
    /// before it as that takes (with a quarter to spare: ~0.2 s for 1 000,
    /// ~8 s for 100 000 on 2 cores). A change to a binding whose fire is
    /// prepared waits for the commit, at most that long.
    #[arg(long, env = "SKED_FIRE_AHEAD_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub fire_ahead_ms: u64,
    /// Database connections of this node at most, 4 to 1000: half for its
    /// engine (scheduler, executor, reaper), so API traffic never starves
    /// the engine; the rest for API calls, but at most 2 per core of this
    /// machine (at least 4), since more API transactions at once than that
    /// only queue for the CPU beside the engine's.
    #[arg(long, env = "SKED_DB_MAX_CONNECTIONS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(4..=1000))]
    pub db_max_connections: u32,
    /// Changes (calls that need more than the viewer role) one tenant may
    /// make per second on this node, 0 (no limit) to 1e6; bursts of 5 s
    /// worth pass. Past it: RESOURCE_EXHAUSTED with a retry delay.
    #[arg(long, env = "SKED_TENANT_CHANGES_PER_SEC", default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub tenant_changes_per_sec: u32,
    /// Runs one tenant may create per second through the API on this node
    /// (TriggerRun and RetryRun count 1, BackfillRuns one per fire time),
    /// 0 (no limit) to 1e6; bursts of 10 s worth, at least 10 000, pass.
    /// Past it: RESOURCE_EXHAUSTED with a retry delay.
    #[arg(long, env = "SKED_TENANT_API_RUNS_PER_SEC", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub tenant_api_runs_per_sec: u32,
    /// Require API keys even in the embedded development mode. Auth is
    /// always on when DATABASE_URL is set or the listener is not loopback.
    #[arg(long, env = "SKED_REQUIRE_AUTH")]
    pub require_auth: bool,
    /// PEM file with the gRPC listener's certificate chain (leaf first).
    /// With --tls-key the listener speaks only TLS (rustls, TLS 1.2/1.3).
    #[arg(long, env = "SKED_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert.
    #[arg(long, env = "SKED_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM file with CA certificate(s): every client must then present a
    /// certificate signed by one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "SKED_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback --listen address, e.g. behind
    /// a TLS-terminating proxy. Without it (or --tls-cert/--tls-key) sked
    /// refuses to listen on a non-loopback address. Logged as a warning.
    #[arg(long, env = "SKED_INSECURE_LISTEN")]
    pub insecure_listen: bool,
    /// Comma-separated CIDR ranges (or addresses) that `http` runs may call
    /// although the SSRF guard refuses them by default (loopback, private,
    /// link-local, metadata, ...), e.g. `10.20.0.0/16,127.0.0.1`. Checked
    /// against every resolved address. Empty: only public addresses.
    #[arg(long, env = "SKED_HTTP_ALLOW", default_value = "")]
    pub http_allow: String,
    /// Serve Prometheus metrics (text format, `GET /metrics`) on this
    /// address, e.g. `0.0.0.0:9464`. Unset: no metrics listener (the
    /// default). The endpoint has no authentication: bind it where only
    /// your scraper reaches it.
    #[arg(long, env = "SKED_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the web console (HTML pages over HTTP; docs/console.md) on
    /// this address, e.g. `127.0.0.1:50052`. Unset: no console, except in
    /// the development mode (embedded database, auth off), which serves it
    /// on [`DEV_CONSOLE_LISTEN`]. With --tls-cert/--tls-key it serves
    /// HTTPS with them; without, off loopback it needs --insecure-listen (a
    /// TLS-terminating proxy in front).
    #[arg(long, env = "SKED_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,
    /// No web console, not even the development mode's.
    #[arg(long, env = "SKED_NO_CONSOLE", conflicts_with = "console_listen")]
    pub no_console: bool,
    /// Label the per-run metrics (fires, finished runs, fire lag, run
    /// duration) with the tenant: one series per tenant, so only where
    /// tenants are few.
    #[arg(long, env = "SKED_METRICS_TENANT_LABEL")]
    pub metrics_tenant_label: bool,
    /// Seconds of the maintenance leader's lease, 1 to 3600: the leader
    /// renews it every third of it; when the leader dies another node
    /// takes over within this long.
    #[arg(long, env = "SKED_LEADER_LEASE", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub leader_lease_secs: u64,
    /// How long run history is kept: the maintenance leader deletes runs
    /// that ended (or were skipped) longer ago, and drops their events a
    /// whole day at a time; a run not ended, or ended more recently, keeps
    /// every event. A whole number of days, hours or weeks (`30d`, `36h`,
    /// `52w`), from 1d to 36525d.
    #[arg(long, env = "SKED_RETENTION", default_value = "30d", value_parser = retention_period)]
    pub retention: TimeDelta,
    /// How long audit events are kept (same form as --retention, 1d to
    /// 36525d); older ones are deleted by the maintenance leader.
    #[arg(long, env = "SKED_AUDIT_RETENTION", default_value = "365d", value_parser = retention_period)]
    pub audit_retention: TimeDelta,
    /// Before a day of run events is dropped, write it to this directory as
    /// `run-events-YYYY-MM-DD.jsonl.gz` (gzip JSON Lines, one event per
    /// line). Created if missing; every node checks at start-up that it can
    /// write there (any node may lead). Unset: days are dropped unarchived.
    #[arg(long, env = "SKED_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,
    /// Apply this YAML file of definitions and bindings at start-up, before
    /// serving (the format of `sked apply -f`: upsert by name, only changed
    /// fields; definitions marked `deletion_protection: true` cannot be
    /// deleted). A bad file stops the node with the file, line and field.
    /// Safe with several nodes starting at once.
    #[arg(long, env = "SKED_DEFINITIONS", value_name = "FILE")]
    pub definitions: Option<PathBuf>,
}

/// `--retention` and `--audit-retention`: see
/// [`crate::domain::retention::parse_retention`].
fn retention_period(s: &str) -> Result<TimeDelta, String> {
    crate::domain::retention::parse_retention(s)
}

/// `--node-id`: 1-128 characters of `[A-Za-z0-9._:-]`
/// ([`crate::domain::is_valid_name`], the worker name's rule). It prefixes the
/// node's event announcements (`<node>|<run>:<from>:<to>,...`): with a `|`
/// in it the other nodes could not read them and their subscribers would
/// miss every event of this node, and a long one would not fit
/// PostgreSQL's 8 000-byte NOTIFY payload beside the runs it announces.
///
/// # Errors
/// The rule, with the length or the first character that breaks it.
pub fn node_id(s: &str) -> Result<String, String> {
    if crate::domain::is_valid_name(s) {
        return Ok(s.to_string());
    }
    let why = match s.chars().find(|c| !crate::domain::is_name_char(*c)) {
        Some(c) => format!("{c:?} is not one of them"),
        None => format!("this one has {}", s.len()),
    };
    Err(format!(
        "must be 1-128 characters of [A-Za-z0-9._:-]; {why}"
    ))
}

/// How the gRPC listener is protected; see [`listen_security`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenSecurity {
    /// TLS is configured.
    Tls,
    /// Plaintext on a loopback address (development; nothing leaves the host).
    LoopbackPlaintext,
    /// Plaintext on a non-loopback address, explicitly allowed with
    /// `--insecure-listen` (a TLS-terminating proxy in front).
    InsecureOptOut,
}

/// A non-loopback listener without TLS and without `--insecure-listen`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to serve plaintext gRPC on non-loopback address {0}: API keys and data would \
     cross the network in clear. Give --tls-cert and --tls-key (SKED_TLS_CERT, SKED_TLS_KEY), \
     or --insecure-listen (SKED_INSECURE_LISTEN) if a TLS-terminating proxy handles TLS"
)]
pub struct InsecureListen(pub SocketAddr);

/// Decides whether a listener on `listen` may start: with TLS always;
/// without TLS only on a loopback address (127.0.0.0/8, ::1, or ::1-mapped
/// IPv4 loopback) or with the explicit `insecure_listen` opt-out.
///
/// # Errors
/// [`InsecureListen`] for a non-loopback address (including the
/// unspecified `0.0.0.0` / `::`) without TLS and without the opt-out.
pub fn listen_security(
    listen: SocketAddr,
    tls: bool,
    insecure_listen: bool,
) -> Result<ListenSecurity, InsecureListen> {
    if tls {
        Ok(ListenSecurity::Tls)
    } else if listen.ip().to_canonical().is_loopback() {
        Ok(ListenSecurity::LoopbackPlaintext)
    } else if insecure_listen {
        Ok(ListenSecurity::InsecureOptOut)
    } else {
        Err(InsecureListen(listen))
    }
}

/// `sked migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_is_1_to_128_characters_that_cannot_split_an_announcement() {
        for ok in [
            "node-a",
            "host.example.com-1234",
            "a",
            "n_1:2",
            &"x".repeat(128),
        ] {
            assert_eq!(node_id(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "a|b", "a,b", "a b", "ü", &"x".repeat(129)] {
            let e = node_id(bad).expect_err(bad);
            assert!(e.contains("1-128 characters"), "{bad:?}: {e}");
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_may_listen_without_tls() {
        for a in [
            "127.0.0.1:50051",
            "127.1.2.3:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(
                listen_security(addr(a), false, false),
                Ok(ListenSecurity::LoopbackPlaintext),
                "{a}"
            );
        }
    }

    #[test]
    fn non_loopback_without_tls_is_refused_unless_opted_out() {
        for a in [
            "0.0.0.0:50051",
            "[::]:50051",
            "10.0.0.5:50051",
            "[2001:db8::1]:443",
        ] {
            let err = listen_security(addr(a), false, false).unwrap_err();
            assert_eq!(err, InsecureListen(addr(a)));
            let msg = err.to_string();
            for needle in ["--tls-cert", "--tls-key", "--insecure-listen", a] {
                assert!(msg.contains(needle), "{msg:?} names {needle}");
            }
            assert_eq!(
                listen_security(addr(a), false, true),
                Ok(ListenSecurity::InsecureOptOut),
                "{a}"
            );
        }
    }

    #[test]
    fn tls_may_listen_anywhere() {
        for a in ["0.0.0.0:50051", "127.0.0.1:50051"] {
            for opt_out in [false, true] {
                assert_eq!(
                    listen_security(addr(a), true, opt_out),
                    Ok(ListenSecurity::Tls)
                );
            }
        }
    }

    #[test]
    fn http_allow_is_a_flag_defaulting_to_nothing() {
        let parse = |extra: &[&str]| {
            let argv = ["sked", "serve"].iter().chain(extra);
            let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("serve")
            };
            args.http_allow
        };
        assert_eq!(parse(&[]), "");
        assert_eq!(
            parse(&["--http-allow", "127.0.0.0/8,10.1.0.0/16"]),
            "127.0.0.0/8,10.1.0.0/16"
        );
    }

    #[test]
    fn metrics_and_leader_flags_default_off_and_parse() {
        let parse = |extra: &[&str]| {
            let argv = ["sked", "serve"].iter().chain(extra);
            let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("serve")
            };
            args
        };
        let d = parse(&[]);
        assert_eq!(d.metrics_listen, None);
        assert!(!d.metrics_tenant_label);
        assert_eq!(d.leader_lease_secs, 15);
        let a = parse(&[
            "--metrics-listen",
            "127.0.0.1:9464",
            "--metrics-tenant-label",
            "--leader-lease-secs",
            "2",
        ]);
        assert_eq!(a.metrics_listen, Some(addr("127.0.0.1:9464")));
        assert!(a.metrics_tenant_label);
        assert_eq!(a.leader_lease_secs, 2);
        let argv = ["sked", "serve", "--leader-lease-secs", "0"];
        assert!(Cli::try_parse_from(argv).is_err(), "a lease of 0 s");
    }

    #[test]
    fn the_console_is_off_by_default_and_on_in_the_development_mode() {
        let parse = |extra: &[&str]| {
            let argv = ["sked", "serve"].iter().chain(extra);
            let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("serve")
            };
            args
        };
        let d = parse(&[]);
        assert_eq!(console_addr(&d, true), Ok(None));
        assert_eq!(console_addr(&d, false), Ok(Some(addr(DEV_CONSOLE_LISTEN))));
        let off = parse(&["--no-console"]);
        assert_eq!(console_addr(&off, false), Ok(None));
        let set = parse(&["--console-listen", "127.0.0.1:8080"]);
        assert_eq!(console_addr(&set, true), Ok(Some(addr("127.0.0.1:8080"))));
        let public = parse(&["--console-listen", "0.0.0.0:8080"]);
        assert_eq!(console_addr(&public, true), Ok(Some(addr("0.0.0.0:8080"))));
        let e = console_addr(&public, false).unwrap_err();
        assert!(
            e.contains("--console-listen") && e.contains("loopback"),
            "{e}"
        );
        let argv = [
            "sked",
            "serve",
            "--no-console",
            "--console-listen",
            "127.0.0.1:1",
        ];
        assert!(Cli::try_parse_from(argv).is_err(), "conflicting flags");
    }

    #[test]
    fn retention_flags_default_and_refuse_bad_values() {
        let parse = |extra: &[&str]| {
            let argv = ["sked", "serve"].iter().chain(extra);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Serve(args) => args,
                _ => panic!("serve"),
            })
        };
        let d = parse(&[]).unwrap();
        assert_eq!(d.retention, TimeDelta::days(30));
        assert_eq!(d.audit_retention, TimeDelta::days(365));
        assert_eq!(d.archive_dir, None);
        let a = parse(&[
            "--retention",
            "36h",
            "--audit-retention",
            "2w",
            "--archive-dir",
            "/var/lib/sked/archive",
        ])
        .unwrap();
        assert_eq!(a.retention, TimeDelta::hours(36));
        assert_eq!(a.audit_retention, TimeDelta::days(14));
        assert_eq!(a.archive_dir, Some(PathBuf::from("/var/lib/sked/archive")));
        for (flag, bad, says) in [
            ("--retention", "0d", "minimum of 1d"),
            ("--retention", "30", "e.g. 30d"),
            ("--audit-retention", "12h", "minimum of 1d"),
            ("--audit-retention", "99999d", "maximum of 36525d"),
        ] {
            let e = parse(&[flag, bad]).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(says), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn tls_flags_parse_and_key_requires_cert() {
        let cli = Cli::try_parse_from([
            "sked",
            "serve",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(args.tls_key, Some(PathBuf::from("k.pem")));
        assert_eq!(args.tls_client_ca, Some(PathBuf::from("ca.pem")));
        assert!(!args.insecure_listen);
        for partial in [
            &["--tls-cert", "c.pem"][..],
            &["--tls-key", "k.pem"][..],
            &["--tls-client-ca", "ca.pem"][..],
        ] {
            let argv = ["sked", "serve"].iter().chain(partial);
            assert!(Cli::try_parse_from(argv).is_err(), "{partial:?} alone");
        }
    }
}
