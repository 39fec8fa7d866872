//! Child processes and PIDs: running `initdb` and `pg_ctl` (as the server's
//! user, with a timeout, reporting the server log's tail on failure), and
//! telling from `postmaster.pid` and `/proc` whether a postmaster lives.

use std::ffi::OsString;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Error, RunAs, io_ctx};

/// Seconds after which a child process (`initdb`, `pg_ctl`) is killed: a hang guard on
/// top of `pg_ctl -t`.
const COMMAND_TIMEOUT_SECS: u64 = 300;

/// The PID on the first line of a `postmaster.pid`.
pub(super) fn read_postmaster_pid(path: &Path) -> Option<i32> {
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
pub(super) fn is_alive(pid: i32) -> bool {
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
pub(super) fn runs_in_dir(pid: i32, dir: &Path) -> Option<bool> {
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let dir = std::fs::canonicalize(dir).ok()?;
    Some(cwd == dir)
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
pub(super) struct Cmd {
    pub(super) program: PathBuf,
    pub(super) args: Vec<OsString>,
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

pub(super) async fn run_async(cmd: &Cmd, run_as: RunAs, log: Option<&Path>) -> Result<(), Error> {
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

pub(super) fn run_blocking(cmd: &Cmd, run_as: RunAs, log: Option<&Path>) -> Result<(), Error> {
    tracing::debug!(cmd = %cmd.display(), uid = run_as.uid, "running (blocking)");
    let output = cmd
        .std(run_as)
        .output()
        .map_err(io_ctx(format!("running {}", cmd.display())))?;
    cmd.check(&output, log)
}
