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

use std::ffi::{CString, OsString};
use std::fmt::Write as _;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Port number of the server. It only names the socket file (`.s.PGSQL.5432`) in the
/// private socket directory; no TCP port is opened.
pub const DEFAULT_PORT: u16 = 5432;

/// Longest Unix socket path (`sizeof(sun_path) - 1` on Linux).
const MAX_SOCKET_PATH: usize = 107;

/// Seconds `pg_ctl -w` waits for the server to start or stop (`pg_ctl -t`).
const PG_CTL_WAIT_SECS: u64 = 60;

/// Seconds after which a child process (`initdb`, `pg_ctl`) is killed: a hang guard on
/// top of `pg_ctl -t`.
const COMMAND_TIMEOUT_SECS: u64 = 300;

/// `max_connections` of the server, in both modes (tests open many pools).
const MAX_CONNECTIONS: u32 = 200;

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
                match run_async(&cmd, self.run_as, Some(&self.log_file)).await {
                    Err(_) if self.postmaster_pid().is_none() => Ok(()),
                    other => other,
                }
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
            Ok(()) => self.after_stop(),
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

    fn pg_ctl_command(&self, args: &[OsString]) -> Cmd {
        Cmd {
            program: self.bin_dir.join("pg_ctl"),
            args: args.to_vec(),
        }
    }

    fn postmaster_pid(&self) -> Option<i32> {
        read_postmaster_pid(&self.data_dir.join("postmaster.pid"))
    }

    fn after_stop(&self) {
        if self.socket_dir_is_tmp {
            // Only succeeds if empty, which it is once the server has gone.
            let _ = std::fs::remove_dir(&self.socket_dir);
        }
        tracing::info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped");
    }

    /// Runs `initdb` into `<dir>/pgdata.initdb`, then renames it to `<dir>/pgdata`.
    async fn initdb(&self, opts: Options) -> Result<(), Error> {
        let scratch = self.base_dir.join("pgdata.initdb");
        let data_dir = self.data_dir.clone();
        let run_as = self.run_as;
        let scratch2 = scratch.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            if scratch2.exists() {
                // Left over from an interrupted initdb of ours.
                std::fs::remove_dir_all(&scratch2)
                    .map_err(io_ctx(format!("removing {}", scratch2.display())))?;
            }
            if data_dir.exists() {
                // `prepare` checked it is empty.
                std::fs::remove_dir(&data_dir)
                    .map_err(io_ctx(format!("removing empty {}", data_dir.display())))?;
            }
            make_private_dir(&scratch2, run_as)
        })
        .await
        .map_err(|e| Error::Io {
            context: "preparing initdb".into(),
            source: io::Error::other(e.to_string()),
        })??;

        tracing::info!(data_dir = %self.data_dir.display(), "initializing PostgreSQL cluster");
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            scratch.clone().into(),
            "-U".into(),
            POSTGRES_USER.into(),
            "--auth=trust".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
        ];
        if opts.fast_unsafe {
            args.push("--no-sync".into());
        }
        let cmd = Cmd {
            program: self.bin_dir.join("initdb"),
            args,
        };
        run_async(&cmd, self.run_as, None).await?;

        tokio::fs::rename(&scratch, &self.data_dir)
            .await
            .map_err(io_ctx(format!(
                "renaming {} to {}",
                scratch.display(),
                self.data_dir.display()
            )))?;
        if !opts.fast_unsafe {
            let base = self.base_dir.clone();
            // Make the rename durable; failure to sync a directory is not fatal.
            let _ = tokio::task::spawn_blocking(move || {
                std::fs::File::open(&base).and_then(|d| d.sync_all())
            })
            .await;
        }
        Ok(())
    }

    /// Deals with a `postmaster.pid` left by an earlier run (see the module docs).
    async fn clear_leftover_postmaster(&self) -> Result<(), Error> {
        let pid_file = self.data_dir.join("postmaster.pid");
        if !pid_file.exists() {
            return Ok(());
        }
        let Some(pid) = read_postmaster_pid(&pid_file) else {
            // Unparseable: no postmaster can be using it (postgres would refuse it).
            tracing::warn!(path = %pid_file.display(), "removing unreadable postmaster.pid");
            return self.remove_lock_files().await;
        };
        if !is_alive(pid) {
            // A stale file of a dead postmaster: PostgreSQL replaces it itself.
            return Ok(());
        }
        match runs_in_dir(pid, &self.data_dir) {
            Some(false) => {
                tracing::warn!(
                    pid,
                    path = %pid_file.display(),
                    "postmaster.pid names a live process that is not this cluster's \
                     postmaster (reused PID); removing the stale lock files"
                );
                self.remove_lock_files().await
            }
            Some(true) | None => {
                tracing::warn!(
                    pid,
                    data_dir = %self.data_dir.display(),
                    "PostgreSQL from an earlier run is still running; restarting it"
                );
                let cmd = self.pg_ctl_command(&pg_ctl_stop_args(&self.data_dir, "fast"));
                run_async(&cmd, self.run_as, Some(&self.log_file)).await
            }
        }
    }

    async fn remove_lock_files(&self) -> Result<(), Error> {
        let files = [
            self.data_dir.join("postmaster.pid"),
            self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port)),
        ];
        for f in files {
            match tokio::fs::remove_file(&f).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_ctx(format!("removing {}", f.display()))(e)),
            }
        }
        Ok(())
    }

    async fn pg_ctl_start(&self, opts: Options) -> Result<(), Error> {
        let mut server_opts: Vec<String> = vec![
            "-k".into(),
            self.socket_dir.to_string_lossy().into_owned(),
            "-p".into(),
            self.port.to_string(),
            "-c".into(),
            "listen_addresses=".into(),
            "-c".into(),
            "unix_socket_permissions=0700".into(),
            "-c".into(),
            format!("max_connections={MAX_CONNECTIONS}"),
        ];
        if opts.fast_unsafe {
            for setting in [
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ] {
                server_opts.push("-c".into());
                server_opts.push(setting.into());
            }
        }
        // pg_ctl hands `-o` to /bin/sh: quote every word.
        let o = server_opts
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ");
        let args: Vec<OsString> = vec![
            "start".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-l".into(),
            self.log_file.clone().into(),
            "-w".into(),
            "-t".into(),
            PG_CTL_WAIT_SECS.to_string().into(),
            "-s".into(),
            "-o".into(),
            o.into(),
        ];
        run_async(
            &self.pg_ctl_command(&args),
            self.run_as,
            Some(&self.log_file),
        )
        .await
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::SeqCst) {
            self.stop_blocking();
        }
    }
}

/// Finds a directory containing both `initdb` and `pg_ctl`.
///
/// Looks in each `PATH` entry first, then in `/usr/lib/postgresql/*/bin` (Debian's
/// layout), highest numeric version first. For a `PATH` hit whose `initdb` is a symlink
/// (as `/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb`), the directory the
/// link resolves to is returned if it holds both programs too, so that all binaries
/// come from one installation.
///
/// # Errors
///
/// [`Error::BinariesNotFound`] if no such directory exists.
pub fn find_bin_dir() -> Result<PathBuf, Error> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for dir in path_dirs.into_iter().filter(|d| d.is_absolute()) {
        if has_pg_bins(&dir) {
            if let Some(real) = std::fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                && has_pg_bins(&real)
            {
                return Ok(real);
            }
            return Ok(dir);
        }
    }
    versioned_bin_dirs(Path::new("/usr/lib/postgresql"))
        .into_iter()
        .find(|d| has_pg_bins(d))
        .ok_or(Error::BinariesNotFound)
}

/// `<root>/<version>/bin` for each numeric version directory under `root`, highest first.
fn versioned_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let key = parse_version(name.to_str()?)?;
            Some((key, e.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, p)| p).collect()
}

/// "15" -> [15], "9.6" -> [9, 6]; anything else -> None.
fn parse_version(s: &str) -> Option<Vec<u32>> {
    s.split('.').map(|p| p.parse::<u32>().ok()).collect()
}

fn has_pg_bins(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What [`prepare`] found and made.
struct Prepared {
    base_dir: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    socket_dir: PathBuf,
    socket_dir_is_tmp: bool,
    log_file: PathBuf,
    run_as: RunAs,
    needs_initdb: bool,
}

/// The synchronous file system part of start: directories, ownership, binaries.
fn prepare(dir: &Path) -> Result<Prepared, Error> {
    std::fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
    let base_dir =
        std::fs::canonicalize(dir).map_err(io_ctx(format!("resolving {}", dir.display())))?;
    check_path_chars(&base_dir)?;
    let run_as = resolve_run_as()?;
    if run_as.switch {
        check_searchable(&base_dir, run_as)?;
    }

    let data_dir = base_dir.join("pgdata");
    let version_file = data_dir.join("PG_VERSION");
    let needs_initdb = !version_file.exists();
    let bin_dir = if needs_initdb {
        if data_dir.exists() {
            let empty = std::fs::read_dir(&data_dir)
                .map_err(io_ctx(format!("reading {}", data_dir.display())))?
                .next()
                .is_none();
            if !empty {
                return Err(Error::InvalidDir {
                    path: data_dir,
                    reason: "it is not empty but has no PG_VERSION, so it is not a \
                             PostgreSQL cluster; move it away or remove it"
                        .into(),
                });
            }
        }
        find_bin_dir()?
    } else {
        let major = std::fs::read_to_string(&version_file)
            .map_err(io_ctx(format!("reading {}", version_file.display())))?;
        let versioned = Path::new("/usr/lib/postgresql")
            .join(major.trim())
            .join("bin");
        if !major.trim().is_empty() && has_pg_bins(&versioned) {
            versioned
        } else {
            find_bin_dir()?
        }
    };

    let (socket_dir, socket_dir_is_tmp) = choose_socket_dir(&base_dir, DEFAULT_PORT);
    if socket_dir_is_tmp {
        make_tmp_socket_dir(&socket_dir, run_as)?;
    } else {
        make_private_dir(&socket_dir, run_as)?;
    }

    let log_file = base_dir.join("postgres.log");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_file)
        .map_err(io_ctx(format!("creating {}", log_file.display())))?;
    if run_as.switch {
        chown(&log_file, run_as)?;
    }

    Ok(Prepared {
        base_dir,
        data_dir,
        bin_dir,
        socket_dir,
        socket_dir_is_tmp,
        log_file,
        run_as,
        needs_initdb,
    })
}

/// pg_ctl puts the data directory and log file in double quotes in a /bin/sh command
/// line, and URLs need UTF-8: refuse paths that would break either.
fn check_path_chars(path: &Path) -> Result<(), Error> {
    let Some(s) = path.to_str() else {
        return Err(Error::InvalidDir {
            path: path.to_path_buf(),
            reason: "the path is not valid UTF-8".into(),
        });
    };
    if let Some(c) = s
        .chars()
        .find(|c| matches!(c, '"' | '\\' | '$' | '`') || c.is_control())
    {
        return Err(Error::InvalidDir {
            path: path.to_path_buf(),
            reason: format!("the path contains {c:?}, which pg_ctl cannot handle"),
        });
    }
    Ok(())
}

/// Root: the `postgres` user. Otherwise: the current user.
fn resolve_run_as() -> Result<RunAs, Error> {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 {
        return Ok(RunAs {
            uid: euid,
            gid: egid,
            switch: false,
        });
    }
    let (uid, gid) = lookup_user(POSTGRES_USER)?.ok_or(Error::NoPostgresUser)?;
    if uid == 0 {
        return Err(Error::NoPostgresUser);
    }
    Ok(RunAs {
        uid,
        gid,
        switch: true,
    })
}

/// uid and gid of user `name`, thread-safely (`getpwnam_r`).
fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, Error> {
    let cname = CString::new(name).map_err(|e| Error::Io {
        context: format!("looking up user {name:?}"),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero passwd (integers and null pointers) is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the duration of the call and `buf.len()`
        // is the size of `buf`; `pwd`'s strings point into `buf`, which we do not read.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &raw mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(Error::Io {
                context: format!("looking up user {name:?}"),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// Every directory from `/` down to `dir` must be searchable by `run_as` (whose
/// children run with no supplementary groups: std drops them when switching from root).
fn check_searchable(dir: &Path, run_as: RunAs) -> Result<(), Error> {
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .map_err(io_ctx(format!("inspecting {}", ancestor.display())))?;
        let mode = meta.mode();
        let searchable = if meta.uid() == run_as.uid {
            mode & 0o100 != 0
        } else if meta.gid() == run_as.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(Error::InvalidDir {
                path: ancestor.to_path_buf(),
                reason: format!(
                    "it is not searchable by the `postgres` user (uid {}), which runs the \
                     embedded PostgreSQL server because sked runs as root; use a data \
                     directory that user can reach (e.g. under /var/lib or /tmp), or set \
                     DATABASE_URL",
                    run_as.uid
                ),
            });
        }
    }
    Ok(())
}

/// `<base>/run`, or `/tmp/sked-pg-<hash>` if that is too long for a socket path or
/// not expressible unquoted in `unix_socket_directories`. The bool says "fallback".
fn choose_socket_dir(base: &Path, port: u16) -> (PathBuf, bool) {
    let run = base.join("run");
    let socket_path_len = run.as_os_str().len() + format!("/.s.PGSQL.{port}").len();
    let awkward = run
        .to_string_lossy()
        .chars()
        .any(|c| matches!(c, ',' | '"' | '\\' | '\'') || c.is_whitespace());
    if socket_path_len <= MAX_SOCKET_PATH && !awkward {
        (run, false)
    } else {
        let hash = fnv1a64(base.as_os_str().as_encoded_bytes());
        (PathBuf::from(format!("/tmp/sked-pg-{hash:016x}")), true)
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Creates `dir` (mode 0700) if missing, and gives it to `run_as`.
fn make_private_dir(dir: &Path, run_as: RunAs) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(io_ctx(format!("creating {}", dir.display()))(e)),
    }
    if run_as.switch {
        chown(dir, run_as)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_ctx(format!("setting the mode of {}", dir.display())))
}

/// Like [`make_private_dir`] in world-writable /tmp: an existing entry must be a real
/// directory (not a symlink) already owned by `run_as`.
fn make_tmp_socket_dir(dir: &Path, run_as: RunAs) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            if run_as.switch {
                chown(dir, run_as)?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)
                .map_err(io_ctx(format!("inspecting {}", dir.display())))?;
            if !meta.file_type().is_dir() || meta.uid() != run_as.uid {
                return Err(Error::InvalidDir {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "the socket directory exists but is not a directory owned by uid {}; \
                         remove it",
                        run_as.uid
                    ),
                });
            }
        }
        Err(e) => return Err(io_ctx(format!("creating {}", dir.display()))(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_ctx(format!("setting the mode of {}", dir.display())))
}

fn chown(path: &Path, run_as: RunAs) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid)).map_err(io_ctx(format!(
        "giving {} to uid {}",
        path.display(),
        run_as.uid
    )))
}

/// The PID on the first line of a `postmaster.pid`.
fn read_postmaster_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .next()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 0)
}

/// Whether process `pid` exists (possibly owned by another user) and is not a zombie.
///
/// A stopped postmaster can linger as a zombie: `pg_ctl` detaches it, so its parent is
/// init (or a subreaper), which may reap it late.
fn is_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence; pid > 0 targets one process.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

/// Whether `/proc/<pid>/stat` says the process is a zombie (or dead); false if unknown.
fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may contain spaces and parentheses, so split at the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| matches!(state, "Z" | "X" | "x"))
}

/// Whether process `pid`'s working directory is `dir` (a postmaster's is its data
/// directory). `None` when that cannot be told (no /proc, no permission).
fn runs_in_dir(pid: i32, dir: &Path) -> Option<bool> {
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let dir = std::fs::canonicalize(dir).ok()?;
    Some(cwd == dir)
}

fn pg_ctl_stop_args(data_dir: &Path, mode: &str) -> Vec<OsString> {
    vec![
        "stop".into(),
        "-D".into(),
        data_dir.into(),
        "-m".into(),
        mode.into(),
        "-w".into(),
        "-t".into(),
        PG_CTL_WAIT_SECS.to_string().into(),
        "-s".into(),
    ]
}

/// Single-quotes `word` for /bin/sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
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

/// The last lines (at most 40, from its last 8 KiB) of the server log.
fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 8192;
    const MAX_LINES: usize = 40;
    let read = || -> io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.lines().collect();
        if len > MAX_BYTES && !lines.is_empty() {
            lines.remove(0); // partial
        }
        let skip = lines.len().saturating_sub(MAX_LINES);
        Ok(lines[skip..].join("\n"))
    };
    read().unwrap_or_default()
}

/// A command line to run as [`RunAs`].
struct Cmd {
    program: PathBuf,
    args: Vec<OsString>,
}

impl Cmd {
    fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Environment variables to drop: the libpq/server `PG*` ones (PGDATA, PGPORT, ...)
    /// would override or confuse what we pass explicitly.
    fn pg_env_vars() -> Vec<OsString> {
        std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| k.as_encoded_bytes().starts_with(b"PG"))
            .collect()
    }

    fn tokio(&self, run_as: RunAs) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        c.args(&self.args)
            .current_dir("/")
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for k in Self::pg_env_vars() {
            c.env_remove(k);
        }
        if run_as.switch {
            c.uid(run_as.uid).gid(run_as.gid);
        }
        c
    }

    fn std(&self, run_as: RunAs) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(&self.program);
        c.args(&self.args)
            .current_dir("/")
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for k in Self::pg_env_vars() {
            c.env_remove(k);
        }
        if run_as.switch {
            c.uid(run_as.uid).gid(run_as.gid);
        }
        c
    }

    fn check(&self, output: &std::process::Output, log: Option<&Path>) -> Result<(), Error> {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            tracing::debug!(cmd = %self.display(), %stdout, %stderr, "command succeeded");
            return Ok(());
        }
        let text = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        Err(Error::CommandFailed {
            cmd: self.display(),
            status: output.status.to_string(),
            stderr: text.trim().to_owned(),
            log_tail: log.map(log_tail).unwrap_or_default(),
        })
    }
}

async fn run_async(cmd: &Cmd, run_as: RunAs, log: Option<&Path>) -> Result<(), Error> {
    tracing::debug!(cmd = %cmd.display(), uid = run_as.uid, "running");
    let output = tokio::time::timeout(
        Duration::from_secs(COMMAND_TIMEOUT_SECS),
        cmd.tokio(run_as).output(),
    )
    .await;
    match output {
        Ok(Ok(output)) => cmd.check(&output, log),
        Ok(Err(e)) => Err(io_ctx(format!("running {}", cmd.display()))(e)),
        Err(_) => Err(Error::CommandFailed {
            cmd: cmd.display(),
            status: format!("killed after {COMMAND_TIMEOUT_SECS} s"),
            stderr: String::new(),
            log_tail: log.map(log_tail).unwrap_or_default(),
        }),
    }
}

fn run_blocking(cmd: &Cmd, run_as: RunAs, log: Option<&Path>) -> Result<(), Error> {
    tracing::debug!(cmd = %cmd.display(), uid = run_as.uid, "running (blocking)");
    let output = cmd
        .std(run_as)
        .output()
        .map_err(io_ctx(format!("running {}", cmd.display())))?;
    cmd.check(&output, log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{Connection, PgConnection};
    use std::str::FromStr;
    use std::sync::atomic::AtomicU32;

    fn test_dir(name: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "embpg-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ))
    }

    async fn connect(url: &str) -> PgConnection {
        PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    async fn show(conn: &mut PgConnection, setting: &'static str) -> String {
        let sql = match setting {
            "fsync" => "SHOW fsync",
            "max_connections" => "SHOW max_connections",
            "listen_addresses" => "SHOW listen_addresses",
            "unix_socket_directories" => "SHOW unix_socket_directories",
            other => panic!("unknown setting {other}"),
        };
        sqlx::query_scalar(sql).fetch_one(conn).await.unwrap()
    }

    async fn select_one(conn: &mut PgConnection) -> i32 {
        sqlx::query_scalar("SELECT 1")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    #[test]
    fn finds_bin_dir() {
        let dir = find_bin_dir().unwrap();
        assert!(dir.join("initdb").is_file(), "{}", dir.display());
        assert!(dir.join("pg_ctl").is_file(), "{}", dir.display());
    }

    #[test]
    fn versioned_dirs_sort_numerically() {
        let root = test_dir("versions");
        for v in ["9.6", "15", "10", "16", "main", "1x"] {
            std::fs::create_dir_all(root.join(v).join("bin")).unwrap();
        }
        let got = versioned_bin_dirs(&root);
        let want: Vec<PathBuf> = ["16", "15", "10", "9.6"]
            .iter()
            .map(|v| root.join(v).join("bin"))
            .collect();
        assert_eq!(got, want);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn url_parses_as_unix_socket() {
        let pg = EmbeddedPg {
            base_dir: "/a b".into(),
            data_dir: "/a b/pgdata".into(),
            bin_dir: "/bin".into(),
            socket_dir: "/a b/r+un&x".into(),
            socket_dir_is_tmp: false,
            log_file: "/a b/postgres.log".into(),
            port: 5433,
            run_as: RunAs {
                uid: 1,
                gid: 1,
                switch: false,
            },
            opts: Options::default(),
            stopped: AtomicBool::new(true),
        };
        let url = pg.url("my db");
        assert_eq!(
            url,
            "postgres://postgres@localhost:5433/my%20db?host=/a%20b/r%2Bun%26x"
        );
        let opts = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
        assert_eq!(opts.get_database(), Some("my db"));
        assert_eq!(opts.get_socket(), Some(&PathBuf::from("/a b/r+un&x")));
        assert_eq!(opts.get_port(), 5433);
        assert_eq!(opts.get_username(), "postgres");
    }

    #[test]
    fn long_or_awkward_dirs_use_tmp_socket_dir() {
        let short = Path::new("/var/lib/sked");
        assert_eq!(
            choose_socket_dir(short, 5432),
            (PathBuf::from("/var/lib/sked/run"), false)
        );
        let long = PathBuf::from(format!("/{}", "x".repeat(100)));
        let (dir, tmp) = choose_socket_dir(&long, 5432);
        assert!(tmp);
        assert!(dir.starts_with("/tmp"), "{}", dir.display());
        assert_eq!(choose_socket_dir(&long, 5432).0, dir, "stable");
        assert!(choose_socket_dir(Path::new("/a,b"), 5432).1);
        assert!(choose_socket_dir(Path::new("/a b"), 5432).1);
    }

    #[test]
    fn rejects_shell_hostile_paths() {
        assert!(check_path_chars(Path::new("/tmp/ok dir,x")).is_ok());
        for bad in ["/tmp/a\"b", "/tmp/$x", "/tmp/a`b", "/tmp/a\\b"] {
            assert!(
                matches!(
                    check_path_chars(Path::new(bad)),
                    Err(Error::InvalidDir { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote("listen_addresses="), "'listen_addresses='");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    /// The full cycle with durable settings: initdb, connect, CREATE DATABASE, stop,
    /// start again on the same cluster (no initdb), connect, stop twice.
    #[tokio::test]
    async fn start_connect_restart_stop() {
        let dir = test_dir("cycle");
        let pg = EmbeddedPg::start(&dir).await.unwrap();
        assert_eq!(pg.data_dir(), dir.join("pgdata"));
        assert!(pg.data_dir().join("PG_VERSION").is_file());
        assert_eq!(pg.socket_dir(), dir.join("run"));

        let mut conn = connect(&pg.url("postgres")).await;
        assert_eq!(show(&mut conn, "fsync").await, "on");
        assert_eq!(show(&mut conn, "max_connections").await, "200");
        assert_eq!(show(&mut conn, "listen_addresses").await, "");
        assert_eq!(
            show(&mut conn, "unix_socket_directories").await,
            dir.join("run").to_str().unwrap()
        );
        sqlx::query("CREATE DATABASE x")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();

        let mut conn = connect(&pg.url("x")).await;
        assert_eq!(select_one(&mut conn).await, 1);
        conn.close().await.unwrap();

        pg.stop().await.unwrap();
        pg.stop().await.unwrap();
        assert!(!pg.data_dir().join("postmaster.pid").exists());
        assert!(PgConnection::connect(&pg.url("x")).await.is_err());
        drop(pg);

        let pg = EmbeddedPg::start(&dir).await.unwrap();
        let mut conn = connect(&pg.url("x")).await;
        assert_eq!(select_one(&mut conn).await, 1);
        conn.close().await.unwrap();
        pg.stop().await.unwrap();
        pg.stop_blocking();
        drop(pg);

        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A server left running by a "crashed" sked is stopped and restarted.
    #[tokio::test]
    async fn restarts_postmaster_left_by_crashed_run() {
        let dir = test_dir("crash");
        let opts = Options { fast_unsafe: true };
        let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
        let old_pid = pg.postmaster_pid().unwrap();
        let mut conn = connect(&pg.url("postgres")).await;
        assert_eq!(show(&mut conn, "fsync").await, "off");
        conn.close().await.unwrap();
        std::mem::forget(pg); // as if sked had been killed

        assert!(is_alive(old_pid));
        let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
        let new_pid = pg.postmaster_pid().unwrap();
        assert_ne!(old_pid, new_pid);
        let mut conn = connect(&pg.url("postgres")).await;
        assert_eq!(select_one(&mut conn).await, 1);
        conn.close().await.unwrap();
        pg.stop().await.unwrap();
        assert!(!is_alive(new_pid));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A postmaster.pid naming a live process that is not a postmaster (PID reuse)
    /// does not block start.
    #[tokio::test]
    async fn ignores_pid_file_of_unrelated_process() {
        let dir = test_dir("stalepid");
        let opts = Options { fast_unsafe: true };
        let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
        let pid_file = pg.data_dir().join("postmaster.pid");
        let contents = std::fs::read_to_string(&pid_file).unwrap();
        pg.stop().await.unwrap();
        drop(pg);

        // Our own PID: alive, and our cwd is not the data directory.
        let mut lines: Vec<&str> = contents.lines().collect();
        let me = std::process::id().to_string();
        lines[0] = &me;
        std::fs::write(&pid_file, lines.join("\n") + "\n").unwrap();

        let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
        let mut conn = connect(&pg.url("postgres")).await;
        assert_eq!(select_one(&mut conn).await, 1);
        conn.close().await.unwrap();
        pg.stop().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory too long for a socket path gets its socket under /tmp.
    #[tokio::test]
    async fn long_dir_uses_tmp_socket() {
        let dir = test_dir(&"long".repeat(25));
        let pg = EmbeddedPg::start_with(&dir, Options { fast_unsafe: true })
            .await
            .unwrap();
        let sock = pg.socket_dir().to_str().unwrap().to_owned();
        assert!(sock.starts_with("/tmp/sked-pg-"), "{sock}");
        let mut conn = connect(&pg.url("postgres")).await;
        assert_eq!(select_one(&mut conn).await, 1);
        conn.close().await.unwrap();
        pg.stop().await.unwrap();
        assert!(!pg.socket_dir().exists(), "tmp socket dir removed on stop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Dropping a started server stops it.
    #[tokio::test]
    async fn drop_stops_server() {
        let dir = test_dir("drop");
        let pg = EmbeddedPg::start_with(&dir, Options { fast_unsafe: true })
            .await
            .unwrap();
        let pid = pg.postmaster_pid().unwrap();
        drop(pg);
        assert!(!is_alive(pid));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A server that fails to start yields CommandFailed carrying the log's tail.
    #[tokio::test]
    async fn start_failure_reports_log_tail() {
        let dir = test_dir("badconf");
        let opts = Options { fast_unsafe: true };
        let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
        pg.stop().await.unwrap();
        let conf = pg.data_dir().join("postgresql.conf");
        drop(pg);
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nno_such_setting_xyz = 1\n");
        std::fs::write(&conf, text).unwrap();

        let err = EmbeddedPg::start_with(&dir, opts).await.unwrap_err();
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(matches!(err, Error::CommandFailed { .. }), "{msg}");
        assert!(msg.contains("no_such_setting_xyz"), "{msg}");
        assert!(!dir.join("pgdata/postmaster.pid").exists(), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let msg = Error::BinariesNotFound.to_string();
        assert!(msg.contains("apt-get install -y postgresql"), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");
        assert!(Error::NoPostgresUser.to_string().contains("postgres"));
    }

    /// When root, a data directory the postgres user cannot reach is refused up front.
    #[tokio::test]
    async fn root_rejects_unreachable_dir() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let outer = test_dir("private");
        std::fs::create_dir_all(&outer).unwrap();
        std::fs::set_permissions(&outer, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = EmbeddedPg::start(&outer.join("inner")).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidDir { ref path, .. } if *path == outer),
            "{err}"
        );
        std::fs::remove_dir_all(&outer).unwrap();
    }
}
