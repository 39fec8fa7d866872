//! Command line and environment: every setting is a flag with a `SKED_*`
//! environment variable (and `DATABASE_URL`). No other I/O here.

use std::net::SocketAddr;
use std::path::PathBuf;

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
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: gRPC API, scheduler and executor.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
    /// Administration straight on the database.
    #[command(subcommand)]
    Admin(AdminCommand),
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
    /// This node's id, unique among nodes sharing the database. Default:
    /// `<hostname>-<pid>`.
    #[arg(long, env = "SKED_NODE_ID")]
    pub node_id: Option<String>,
    /// Runs executing at once on this node; more wait QUEUED.
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
    /// Database connections of this node.
    #[arg(long, env = "SKED_DB_MAX_CONNECTIONS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(4..=1000))]
    pub db_max_connections: u32,
    /// Require API keys even in the embedded development mode. Auth is
    /// always on when DATABASE_URL is set or the listener is not loopback.
    #[arg(long, env = "SKED_REQUIRE_AUTH")]
    pub require_auth: bool,
}

/// `sked migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}
