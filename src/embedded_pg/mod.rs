//! A private PostgreSQL cluster that sked starts and stops itself.
//!
//! sked keeps its state in PostgreSQL. So that one command (`sked serve`) brings up
//! a working node on a machine that has the PostgreSQL *server binaries* installed
//! but no running, configured server, sked can run a cluster of its own when no
//! `DATABASE_URL` is given. [`EmbeddedPg::start`] finds `initdb` and `pg_ctl` (see
//! [`find_bin_dir`]), creates a cluster under sked's data directory the first time,
//! starts it and hands out connection URLs ([`EmbeddedPg::url`]); [`EmbeddedPg::stop`]
//! shuts it down. The test harness uses the same code on machines where no PostgreSQL
//! server runs, with [`Options::fast_unsafe`] for speed.
//!
//! # Layout under `dir`
//!
//! | path                  | what                                                        |
//! |-----------------------|-------------------------------------------------------------|
//! | `<dir>/pgdata`        | the cluster (`PGDATA`); `initdb` runs only if it has no `PG_VERSION` |
//! | `<dir>/pgdata.initdb` | scratch directory of an `initdb` in progress, renamed to `pgdata` when it succeeds, so an interrupted `initdb` never leaves a half-made cluster behind |
//! | `<dir>/run`           | the Unix socket directory (mode 0700)                        |
//! | `<dir>/postgres.log`  | the server log (`pg_ctl -l`), appended to across runs       |
//!
//! # Connections: Unix socket only
//!
//! The server is started with `listen_addresses=''`, so it opens no TCP port and cannot
//! clash with any other PostgreSQL on the machine (for example a system one on
//! 127.0.0.1:5432). It listens only on a Unix socket in a private directory, so the
//! port number ([`EmbeddedPg::port`], 5432) only names the socket file
//! `.s.PGSQL.5432`. Authentication is `trust`; access control is the socket
//! directory's mode 0700, i.e. only the user the server runs as (and root) can connect.
//!
//! A Unix socket path is limited to 107 bytes. If `<dir>/run/.s.PGSQL.5432` would be
//! longer, or `<dir>/run` contains characters that PostgreSQL's
//! `unix_socket_directories` list syntax cannot take unquoted (`,`, whitespace, `"`,
//! `\`), the socket directory is `/tmp/sked-pg-<hash>` instead, where `<hash>` is a
//! stable 64-bit FNV-1a hash of the absolute `dir`. That directory is created with mode
//! 0700 and must be owned by the server's user; it is removed again (if empty) on stop.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When sked runs as root (effective uid 0),
//! `initdb` and `pg_ctl` are run as the `postgres` system user (as installed by the
//! distribution's `postgresql` package), and the cluster directory, socket directory and
//! log file are owned by that user. Every directory from `/` down to `dir` must
//! then be searchable by that user: a data directory under `/root` (mode 0700) is not,
//! and is rejected with [`Error::InvalidDir`]. When not root, everything runs as the
//! current user.
//!
//! # A postmaster left over from a crashed run
//!
//! `pg_ctl start` detaches the server, so if sked dies without stopping it, the server
//! keeps running. On the next [`EmbeddedPg::start`] on the same `dir` it is **stopped
//! (`pg_ctl stop -m fast`) and started again**, so that the running server always has
//! the settings this process asked for (socket directory, [`Options`]). A consequence
//! is that two sked processes must not share one data directory: the second one would
//! restart the first one's server. If `postmaster.pid` names a live process that is not
//! a postmaster of this cluster (a PID reused after a reboot or container restart; checked
//! through `/proc/<pid>/cwd`, which for a postmaster is its data directory), the stale
//! `postmaster.pid` and socket lock file are removed instead, as PostgreSQL would
//! otherwise refuse to start.
//!
//! Dropping an [`EmbeddedPg`] that has not been stopped stops the server with
//! [`EmbeddedPg::stop_blocking`].
//!
//! Should the server die while sked runs (a crash, the OOM killer, `kill -9`),
//! [`EmbeddedPg::supervise`] (run by `sked serve`) notices within a second and
//! starts it again; PostgreSQL's crash recovery replays its WAL, and the
//! node's connection pool reconnects.
//!
//! # Binary versions
//!
//! For an existing cluster, the binaries of its major version (from `PG_VERSION`) in
//! `/usr/lib/postgresql/<major>/bin` are preferred when present, so that installing a
//! newer PostgreSQL next to the old one does not make an existing cluster unusable.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod bins;
mod cluster;
mod prepare;
mod process;
#[cfg(test)]
mod tests;

pub use bins::find_bin_dir;
use cluster::pg_ctl_stop_args;
use prepare::prepare;
use process::{is_alive, run_async, run_blocking};

/// Port number of the server. It only names the socket file (`.s.PGSQL.5432`) in the
/// private socket directory; no TCP port is opened.
pub const DEFAULT_PORT: u16 = 5432;

/// Name of the system user the server runs as when sked runs as root.
const POSTGRES_USER: &str = "postgres";

/// Errors of [`EmbeddedPg`] and [`find_bin_dir`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No directory with both `initdb` and `pg_ctl` was found.
    #[error(
        "PostgreSQL server binaries (initdb and pg_ctl) not found in PATH or \
         /usr/lib/postgresql/*/bin: install PostgreSQL (e.g. `apt-get install -y postgresql`), \
         or set DATABASE_URL to use an existing PostgreSQL server"
    )]
    BinariesNotFound,

    /// sked runs as root, but there is no `postgres` system user to run the server as.
    #[error(
        "running as root, but there is no `postgres` system user to run the embedded \
         PostgreSQL server as (PostgreSQL refuses to run as root): install PostgreSQL \
         (e.g. `apt-get install -y postgresql`, which creates that user), run sked as a \
         non-root user, or set DATABASE_URL"
    )]
    NoPostgresUser,

    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },

    /// The directory cannot hold the cluster (bad characters, not reachable by the
    /// `postgres` user, a foreign `pgdata`, ...).
    #[error("unusable directory {}: {reason}", .path.display())]
    InvalidDir {
        /// The offending path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },

    /// `initdb` or `pg_ctl` failed or timed out.
    #[error("`{cmd}` failed ({status}): {stderr}{}", log_suffix(.log_tail))]
    CommandFailed {
        /// The command line.
        cmd: String,
        /// Its exit status, or how it failed to finish.
        status: String,
        /// Its standard error (or standard output when that was empty).
        stderr: String,
        /// The last lines of the server log, empty if not relevant.
        log_tail: String,
    },
}

fn log_suffix(log_tail: &str) -> String {
    if log_tail.trim().is_empty() {
        String::new()
    } else {
        format!(
            "\n--- last lines of the server log ---\n{}",
            log_tail.trim_end()
        )
    }
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Settings for [`EmbeddedPg::start_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Trade durability for speed, for tests: `fsync=off`, `synchronous_commit=off`,
    /// `full_page_writes=off`, and `initdb --no-sync`. A crash of the machine can
    /// corrupt such a cluster; never use it for data that matters.
    pub fast_unsafe: bool,
}

/// The user `initdb` and `pg_ctl` run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
    /// Whether the children must switch to `uid`/`gid` (we are root).
    switch: bool,
}

/// A running private PostgreSQL cluster; see the [module docs](self).
///
/// Dropping it without [`stop`](EmbeddedPg::stop) stops the server with
/// [`stop_blocking`](EmbeddedPg::stop_blocking), which blocks the dropping thread;
/// prefer awaiting [`stop`](EmbeddedPg::stop) on orderly shutdown.
#[derive(Debug)]
pub struct EmbeddedPg {
    base_dir: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    socket_dir: PathBuf,
    socket_dir_is_tmp: bool,
    log_file: PathBuf,
    port: u16,
    run_as: RunAs,
    opts: Options,
    stopped: AtomicBool,
}

impl EmbeddedPg {
    /// Starts a durable cluster under `dir` (created if missing): the same as
    /// [`start_with`](Self::start_with) with default [`Options`].
    ///
    /// Runs `initdb` first if `<dir>/pgdata` has no `PG_VERSION`; otherwise the existing
    /// cluster is reused. A server still running on `<dir>/pgdata` from an earlier run
    /// is stopped and started again (see the module docs).
    ///
    /// # Errors
    ///
    /// - [`Error::BinariesNotFound`] if no `initdb`/`pg_ctl` is installed;
    /// - [`Error::NoPostgresUser`] when running as root without a `postgres` user;
    /// - [`Error::InvalidDir`] if `dir` cannot be used (see the module docs);
    /// - [`Error::CommandFailed`] if `initdb` or `pg_ctl` fails (with the server log's tail);
    /// - [`Error::Io`] on other file system errors.
    pub async fn start(dir: &Path) -> Result<EmbeddedPg, Error> {
        Self::start_with(dir, Options::default()).await
    }

    /// Starts a cluster under `dir` like [`start`](Self::start), with `opts`.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub async fn start_with(dir: &Path, opts: Options) -> Result<EmbeddedPg, Error> {
        let dir_owned = dir.to_path_buf();
        let prep = tokio::task::spawn_blocking(move || prepare(&dir_owned))
            .await
            .map_err(|e| Error::Io {
                context: "preparing the PostgreSQL directories".into(),
                source: io::Error::other(e.to_string()),
            })??;
        let pg = EmbeddedPg {
            base_dir: prep.base_dir,
            data_dir: prep.data_dir,
            bin_dir: prep.bin_dir,
            socket_dir: prep.socket_dir,
            socket_dir_is_tmp: prep.socket_dir_is_tmp,
            log_file: prep.log_file,
            port: DEFAULT_PORT,
            run_as: prep.run_as,
            opts,
            // Nothing to stop (or to stop on drop) until the server is up.
            stopped: AtomicBool::new(true),
        };
        if prep.needs_initdb {
            pg.initdb(opts).await?;
        }
        pg.clear_leftover_postmaster().await?;
        if let Err(e) = pg.pg_ctl_start(opts).await {
            // `pg_ctl -w` may have given up on a server that is still starting.
            if pg.postmaster_pid().is_some_and(is_alive) {
                let stop = pg.pg_ctl_command(&pg_ctl_stop_args(&pg.data_dir, "immediate"));
                let _ = run_async(&stop, pg.run_as, None).await;
            }
            return Err(e);
        }
        pg.stopped.store(false, Ordering::SeqCst);
        tracing::info!(
            data_dir = %pg.data_dir.display(),
            socket_dir = %pg.socket_dir.display(),
            bin_dir = %pg.bin_dir.display(),
            fast_unsafe = opts.fast_unsafe,
            "embedded PostgreSQL started"
        );
        Ok(pg)
    }

    /// Connection URL for database `db` as the `postgres` superuser over the Unix socket,
    /// e.g. `postgres://postgres@localhost:5432/sked?host=/abs/dir/run`.
    ///
    /// The socket directory goes in the `host` query parameter, which both sqlx's
    /// `PgConnectOptions` and libpq understand; the port names the socket file.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/{}?host={}",
            self.port,
            percent_encode(db, false),
            percent_encode(&self.socket_dir.to_string_lossy(), true),
        )
    }

    /// Stops the server (`pg_ctl stop -m fast`, waiting for it to exit).
    ///
    /// Safe to call twice, and a no-op if the server is already gone.
    ///
    /// # Errors
    ///
    /// [`Error::CommandFailed`] if `pg_ctl stop` fails (the server may still be running;
    /// calling again retries), [`Error::Io`] if it cannot be run.
    pub async fn stop(&self) -> Result<(), Error> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = match self.postmaster_pid() {
            Some(pid) if is_alive(pid) => {
                let cmd = self.pg_ctl_command(&pg_ctl_stop_args(&self.data_dir, "fast"));
                let r = match run_async(&cmd, self.run_as, Some(&self.log_file)).await {
                    Err(_) if self.postmaster_pid().is_none() => Ok(()),
                    other => other,
                };
                // As in stop_blocking: the process outlives its pid file by a moment.
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                while r.is_ok() && is_alive(pid) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                r
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => {
                self.after_stop();
                Ok(())
            }
            Err(e) => {
                self.stopped.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Stops the server like [`stop`](Self::stop), but blocking the calling thread
    /// (`std::process::Command`, up to `pg_ctl`'s 60 s wait), for `Drop` and exit paths
    /// outside the async runtime's control. Not async-signal-safe: call it from normal
    /// code (e.g. after a signal-handling task fired), never inside a signal handler.
    /// Errors are logged with `tracing`, not returned. Safe to call twice.
    pub fn stop_blocking(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(pid) = self.postmaster_pid() else {
            self.after_stop();
            return;
        };
        if !is_alive(pid) {
            self.after_stop();
            return;
        }
        let cmd = self.pg_ctl_command(&pg_ctl_stop_args(&self.data_dir, "fast"));
        match run_blocking(&cmd, self.run_as, Some(&self.log_file)) {
            Ok(()) => {
                // pg_ctl returns once postmaster.pid is gone, which the
                // postmaster removes just before it exits: wait (briefly)
                // for the process itself, so "stopped" means gone.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while is_alive(pid) && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                self.after_stop();
            }
            Err(_) if self.postmaster_pid().is_none() => self.after_stop(),
            Err(e) => {
                self.stopped.store(false, Ordering::SeqCst);
                tracing::error!(error = %e, "could not stop embedded PostgreSQL");
            }
        }
    }

    /// Whether the server runs: `postmaster.pid` names a live process.
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(is_alive)
    }

    /// Starts the server again if its postmaster is gone although
    /// [`stop`](Self::stop) was not called (it crashed or was killed).
    /// Returns whether it restarted it. PostgreSQL recovers from its WAL;
    /// a start refused while the dead server's processes are still exiting
    /// is an error, and the next call tries again.
    ///
    /// # Errors
    /// As [`start`](Self::start)'s `pg_ctl` errors.
    pub async fn restart_if_dead(&self) -> Result<bool, Error> {
        if self.stopped.load(Ordering::SeqCst) || self.is_running() {
            return Ok(false);
        }
        tracing::error!(data_dir = %self.data_dir.display(),
            "embedded PostgreSQL is not running; restarting it");
        self.clear_leftover_postmaster().await?;
        if let Err(e) = self.pg_ctl_start(self.opts).await {
            if self.is_running() {
                // `pg_ctl -w` gave up on a server still recovering: it is up.
                return Ok(true);
            }
            return Err(e);
        }
        tracing::warn!(data_dir = %self.data_dir.display(), "embedded PostgreSQL restarted");
        Ok(true)
    }

    /// Checks the server every `every` until `stop` and restarts it when it
    /// died ([`restart_if_dead`](Self::restart_if_dead)); failed restarts
    /// are logged and retried at the next check.
    pub async fn supervise(&self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.restart_if_dead().await {
                tracing::warn!(error = %e, "restarting embedded PostgreSQL failed; retrying");
            }
        }
    }

    /// The cluster directory (`PGDATA`), `<dir>/pgdata`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The absolute `dir` given to [`start`](Self::start).
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The directory holding `initdb` and `pg_ctl` in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The Unix socket directory: `<dir>/run`, or `/tmp/sked-pg-<hash>` if that path
    /// would be too long (see the module docs).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log, `<dir>/postgres.log`.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The port, which only names the socket file (no TCP port is opened).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::SeqCst) {
            self.stop_blocking();
        }
    }
}

/// Percent-encodes all but RFC 3986 unreserved characters (and `/` if `keep_slash`).
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
