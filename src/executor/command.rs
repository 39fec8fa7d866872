//! The `command` handler (`docs/semantics.md`, "Handlers"): runs a program as a child process, no
//! shell. Params go to stdin as JSON, and to `SKED_PARAMS` when their JSON
//! is at most [`MAX_ENV_PARAMS`] bytes, else to a private file named by
//! `SKED_PARAMS_FILE` (the environment has a size limit; stdin and a file do
//! not). stdout and stderr are read line by line (each line capped at 16 KiB
//! with a marker) and appended to the run's log in batches, up to the
//! definition's output cap per run (past it lines are counted, not stored,
//! and one marker line says how many); exit code 0 → `SUCCEEDED`, a last
//! stdout line holding a JSON object → `result` (taken even past the cap).
//! A stdout line `::progress <percent> [<step>/<total>] [message]` is a
//! progress event in the same batch instead of a log line (it counts
//! toward the cap like one); the batch's write also sets the run's
//! `progress` to its last ([`crate::db::events::event_append`]). An exit
//! code the definition lists as non-retryable ends the run `FAILED` with
//! `retryable = false`: no retry.
//!
//! Backpressure: lines go through a bounded channel, so when the database is
//! slower than the process, the pipe fills and the process waits; memory
//! stays bounded.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use tokio_util::sync::CancellationToken;

use super::{Executor, Stop, StopReason};
use crate::db::runs::Outcome;
use crate::domain::progress::PROGRESS_PREFIX;
use crate::domain::{
    CommandHandler, DEFAULT_MAX_OUTPUT_BYTES, EventBody, LogStream, MAX_LOG_LINE, Run, RunReason,
    RunState, cap_log_line, parse_progress_line,
};

/// Largest params JSON passed in the `SKED_PARAMS` environment variable, in
/// bytes (32 KiB): well within every platform's environment limit (Linux
/// takes at most 128 KiB per string). Larger params go to a file named by
/// `SKED_PARAMS_FILE` instead; stdin always has them.
pub const MAX_ENV_PARAMS: usize = 32 << 10;

/// Lines written per database batch at most. Smaller batches reach
/// subscribers sooner, and a command that prints faster than its lines are
/// written waits on its pipe (nothing is lost). With 100 tails of a `seq 1
/// 200000` (`sked-bench stream`): 512 gave an end-to-end p50/p99 of 48/78
/// ms, 128 gave 16/67 ms for 9 % fewer lines/s; on 2026-12-06, 128 gave a
/// median p99 of 27–36 ms at ~24 500 lines/s, 64 gave 19–22 ms at ~20 000,
/// 32 gives 11–14 ms at 12 300–13 900 lines/s (issue 18 asks ≤ 20 ms).
const BATCH_LINES: usize = 32;
/// Longest a line waits before its batch is written.
const BATCH_DELAY: Duration = Duration::from_millis(10);
/// Characters of stderr kept as the error summary.
const SUMMARY_CHARS: usize = 500;

/// Runs `c` for `run` until it exits, its timeout passes or `stop` is asked;
/// returns the terminal state and outcome.
///
/// The process leads its own process group, so termination reaches every
/// process it started: SIGTERM to the group, SIGKILL after
/// [`Executor::kill_grace`]. When the main process has exited, whatever is
/// left in its group is killed too, so a run leaves nothing behind. The child
/// also gets `PR_SET_PDEATHSIG(SIGKILL)`: should the sked node be killed
/// outright, the run's main process dies with it instead of running on
/// beside the retry that another node starts. Processes *it* started are not
/// covered (they outlive a `kill -9` of the node until they end or their
/// host/container goes); a per-run supervisor process would close that gap.
pub(crate) async fn execute(
    ex: &Executor,
    run: &Run,
    c: &CommandHandler,
    stop: &Stop,
) -> (RunState, Outcome) {
    let params = serde_json::to_string(&run.params).unwrap_or_else(|_| "{}".into());
    let mut cmd = Command::new(&c.program);
    // Removed (with the file) when this function returns, i.e. when the run
    // has ended.
    let mut _params_file = None;
    cmd.args(&c.args).envs(&c.env);
    // After the handler's own env: these names are sked's.
    if params.len() <= MAX_ENV_PARAMS {
        cmd.env("SKED_PARAMS", &params)
            .env_remove("SKED_PARAMS_FILE");
    } else {
        match write_params_file(&params).await {
            Ok(f) => {
                cmd.env("SKED_PARAMS_FILE", &f.path)
                    .env_remove("SKED_PARAMS");
                _params_file = Some(f);
            }
            Err(e) => {
                let message = format!("failed to write the params file: {e}");
                return start_failed(ex, run, message).await;
            }
        }
    }
    cmd.env("SKED_RUN_ID", run.id.to_string())
        .env("SKED_TENANT_ID", &run.tenant_id)
        .env("SKED_BINDING_ID", run.binding_id.to_string())
        .env("SKED_DEFINITION", &run.definition)
        .env("SKED_ATTEMPT", run.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so the whole tree can be signalled.
        .process_group(0)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    if !c.working_dir.is_empty() {
        cmd.current_dir(&c.working_dir);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("failed to start {:?}: {e}", c.program);
            return start_failed(ex, run, message).await;
        }
    };
    let pgid = child.id().map(|p| p as i32);

    if let Some(mut stdin) = child.stdin.take() {
        // A process that never reads stdin must not block us: write in the
        // background and ignore a broken pipe.
        tokio::spawn(async move {
            let _ = stdin.write_all(params.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
    }
    let (tx, rx) = mpsc::channel::<Piped>(BATCH_LINES * 2);
    let past_cap = Arc::new(AtomicBool::new(false));
    if let Some(out) = child.stdout.take() {
        let r = BufReader::with_capacity(PIPE_BUFFER, out);
        tokio::spawn(pump(
            r,
            LogStream::Stdout,
            tx.clone(),
            Arc::clone(&past_cap),
        ));
    }
    if let Some(err) = child.stderr.take() {
        let r = BufReader::with_capacity(PIPE_BUFFER, err);
        tokio::spawn(pump(
            r,
            LogStream::Stderr,
            tx.clone(),
            Arc::clone(&past_cap),
        ));
    }
    drop(tx);

    let exited = CancellationToken::new();
    let timeout = run
        .policy
        .timeout_secs
        .map(|t| Duration::from_secs(t.into()));
    let supervise = async {
        let (ended, exit) = tokio::select! {
            s = child.wait() => (Ended::Exited, Some(s)),
            _ = stop.stopped() => (Ended::Stopped, None),
            _ = sleep_or_never(timeout) => (Ended::TimedOut, None),
        };
        let status = match exit {
            Some(s) => s,
            None => {
                let why = match (&ended, stop.reason()) {
                    (Ended::TimedOut, _) => format!(
                        "timeout: still running after {}s; terminating",
                        timeout.unwrap_or_default().as_secs()
                    ),
                    (_, Some(StopReason::Cancel(r))) => {
                        format!("cancel requested ({r}); terminating")
                    }
                    (_, Some(StopReason::Shutdown)) => "node shutting down; terminating".into(),
                    _ => "run no longer held by this node; terminating".into(),
                };
                let _ = ex
                    .append(
                        run,
                        &[EventBody::Log {
                            stream: LogStream::System,
                            message: why,
                        }],
                    )
                    .await;
                terminate(&mut child, pgid, ex.kill_grace).await
            }
        };
        // Whatever the main process left in its group goes with it.
        if let Some(g) = pgid {
            signal_group(g, libc::SIGKILL);
        }
        exited.cancel();
        (ended, status)
    };
    let cap = c.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
    let (logs, (ended, status)) = tokio::join!(
        collect_logs(ex, run, rx, &exited, cap, &past_cap),
        supervise
    );

    let summary = (!logs.stderr_head.is_empty()).then(|| logs.stderr_head.clone());
    match ended {
        Ended::TimedOut => {
            let message = format!("timed out after {}s", timeout.unwrap_or_default().as_secs());
            return (
                RunState::TimedOut,
                Outcome {
                    error_message: Some(message.clone()),
                    error_summary: summary,
                    reason: RunReason::Timeout.to_string(),
                    ..Outcome::default()
                },
            );
        }
        Ended::Stopped => {
            let reason = match stop.reason() {
                Some(StopReason::Cancel(r)) => r.clone(),
                Some(StopReason::Shutdown) => RunReason::Shutdown.to_string(),
                _ => RunReason::LeaseLost.to_string(),
            };
            return (
                RunState::Cancelled,
                Outcome {
                    error_summary: summary,
                    reason,
                    ..Outcome::default()
                },
            );
        }
        Ended::Exited => {}
    }
    match status {
        Ok(s) if s.success() => {
            let result = logs
                .last_stdout
                .as_deref()
                .and_then(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
                .filter(serde_json::Value::is_object)
                .map(crate::domain::storable_json);
            (
                RunState::Succeeded,
                Outcome {
                    result,
                    exit_code: Some(0),
                    ..Outcome::default()
                },
            )
        }
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            let (message, exit_code) = match (s.code(), s.signal()) {
                (Some(code), _) => (format!("exit code {code}"), Some(code)),
                (None, Some(sig)) => (format!("killed by signal {sig}"), None),
                (None, None) => ("exited abnormally".to_string(), None),
            };
            // The definition says this failure can never succeed: no retry,
            // and the run's log and reason say why.
            let retryable = !exit_code.is_some_and(|code| c.is_non_retryable(code));
            let reason = if retryable {
                message.clone()
            } else {
                let reason = format!("{message} is non-retryable");
                let _ = ex
                    .append(
                        run,
                        &[EventBody::Log {
                            stream: LogStream::System,
                            message: format!(
                                "{reason} (command.non_retryable_exit_codes): the run is not retried"
                            ),
                        }],
                    )
                    .await;
                reason
            };
            (
                RunState::Failed,
                Outcome {
                    error_message: Some(message),
                    error_summary: summary,
                    exit_code,
                    reason,
                    retryable,
                    ..Outcome::default()
                },
            )
        }
        Err(e) => {
            let message = format!("waiting for the process failed: {e}");
            (
                RunState::Failed,
                Outcome {
                    error_message: Some(message.clone()),
                    reason: message,
                    ..Outcome::default()
                },
            )
        }
    }
}

/// Ends a run that could not start: one SYSTEM line, `FAILED`.
async fn start_failed(ex: &Executor, run: &Run, message: String) -> (RunState, Outcome) {
    let _ = ex
        .append(
            run,
            &[EventBody::Log {
                stream: LogStream::System,
                message: message.clone(),
            }],
        )
        .await;
    (
        RunState::Failed,
        Outcome {
            error_message: Some(message.clone()),
            reason: message,
            ..Outcome::default()
        },
    )
}

/// A params file: `<private dir>/params.json`, deleted with its directory
/// when dropped.
struct ParamsFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

/// Writes `params` to `params.json` (mode 0600) in a new directory of the
/// system temp directory that only this user can enter (mode 0700).
async fn write_params_file(params: &str) -> std::io::Result<ParamsFile> {
    let params = params.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::Builder::new().prefix("sked-params-").tempdir()?;
        // Private before the file exists in it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let path = dir.path().join("params.json");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(params.as_bytes())?;
        f.flush()?;
        Ok(ParamsFile { _dir: dir, path })
    })
    .await
    .map_err(std::io::Error::other)?
}

enum Ended {
    Exited,
    Stopped,
    TimedOut,
}

async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM to the group, then SIGKILL after `grace` if the main process has
/// not exited; returns its exit status.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: Option<i32>,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(g) = pgid {
        signal_group(g, libc::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            tracing::warn!(grace = ?grace, "process ignored SIGTERM; sending SIGKILL");
            if let Some(g) = pgid {
                signal_group(g, libc::SIGKILL);
            }
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

/// Sends `sig` to process group `pgid`; a group that is already gone is fine.
fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: killpg has no memory-safety preconditions; it only takes ints.
    let r = unsafe { libc::killpg(pgid, sig) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, sig, error = %e, "signalling the process group failed");
        }
    }
}

/// Asks the kernel to SIGKILL the child when the thread that spawned it (a
/// runtime worker, alive as long as the node) dies: Linux `PR_SET_PDEATHSIG`.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

struct Logs {
    last_stdout: Option<String>,
    stderr_head: String,
}

/// How long the log reader waits for the next line once the process group
/// is gone, before it closes the log although a pipe is still open (a
/// process that escaped its group may hold it). Each line read restarts the
/// wait, so lines still buffered in the pipe when the process exited are
/// all written, however slow the database is.
const PIPE_LINGER: Duration = Duration::from_secs(1);
/// Hard limit on reading after the process group is gone (an escaped
/// process writing without pause would otherwise hold the run open).
const PIPE_DRAIN_MAX: Duration = Duration::from_secs(60);

/// Writes lines to the run's log in batches until both pipes are closed, or
/// no line came for [`PIPE_LINGER`] after `exited` (at most
/// [`PIPE_DRAIN_MAX`] after it).
///
/// At most `cap` bytes of lines are stored (each line's bytes plus one for
/// its end): from the first line that would pass it on, output is still
/// read (so the process never blocks on a full pipe, and the last stdout
/// line still gives the result) but only counted, and one SYSTEM line at
/// the end says how many were left out. Past the cap the pumps stop
/// splitting lines one by one (`past_cap`): they count whole buffers
/// ([`skim`]), so a process printing without end costs the node little CPU.
async fn collect_logs(
    ex: &Executor,
    run: &Run,
    mut rx: mpsc::Receiver<Piped>,
    exited: &CancellationToken,
    cap: u64,
    past_cap: &AtomicBool,
) -> Logs {
    // Armed (reset) once the process group is gone.
    let linger = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    tokio::pin!(linger);
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut logs = Logs {
        last_stdout: None,
        stderr_head: String::new(),
    };
    let mut batch: Vec<EventBody> = Vec::new();
    let mut stored_bytes: u64 = 0;
    let mut over = Overflow::default();
    let mut read_at = ex.clock.now();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let flush_at = deadline;
        let line = tokio::select! {
            // Lines first: the linger only counts while none are waiting.
            biased;
            l = rx.recv() => {
                if let Some(until) = drain_until {
                    linger.as_mut().reset((tokio::time::Instant::now() + PIPE_LINGER).min(until));
                }
                l
            }
            _ = exited.cancelled(), if drain_until.is_none() => {
                let now = tokio::time::Instant::now();
                drain_until = Some(now + PIPE_DRAIN_MAX);
                linger.as_mut().reset(now + PIPE_LINGER);
                continue;
            }
            _ = &mut linger => {
                tracing::warn!("output pipes still open after the process group ended; closing the log");
                None
            }
            _ = async { if let Some(d) = flush_at { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => {
                flush(ex, run, &mut batch, read_at).await;
                deadline = None;
                continue;
            }
        };
        let (stream, message) = match line {
            None => break,
            Some(Piped::Line(stream, message)) => (stream, message),
            Some(Piped::Skimmed {
                stream,
                lines,
                bytes,
                last,
            }) => {
                over.lines += lines;
                over.bytes += bytes;
                if let (LogStream::Stdout, Some(last)) = (stream, last)
                    && parse_progress_line(&last).is_none()
                {
                    logs.last_stdout = Some(last);
                }
                continue;
            }
        };
        // A `::progress` line is a progress event, not a log line (and not
        // a candidate for the result). The prefix test keeps the parse off
        // every other line.
        let progress = match stream {
            LogStream::Stdout if message.starts_with(PROGRESS_PREFIX) => {
                parse_progress_line(&message)
            }
            _ => None,
        };
        match stream {
            _ if progress.is_some() => {}
            LogStream::Stdout if !message.trim().is_empty() => {
                logs.last_stdout = Some(message.clone())
            }
            LogStream::Stderr if logs.stderr_head.chars().count() < SUMMARY_CHARS => {
                if !logs.stderr_head.is_empty() {
                    logs.stderr_head.push('\n');
                }
                logs.stderr_head.push_str(&message);
                logs.stderr_head = logs.stderr_head.chars().take(SUMMARY_CHARS).collect();
            }
            _ => {}
        }
        let size = message.len() as u64 + 1;
        if over.lines > 0 || stored_bytes + size > cap {
            over.lines += 1;
            over.bytes += size;
            past_cap.store(true, Ordering::Relaxed);
            continue;
        }
        stored_bytes += size;
        if batch.is_empty() {
            // The batch's events carry the time its first line was read, so
            // RunEvent.time never flatters the write and delivery latency.
            read_at = ex.clock.now();
        }
        batch.push(match progress {
            Some(p) => EventBody::Progress(p),
            None => EventBody::Log { stream, message },
        });
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + BATCH_DELAY);
        if batch.len() >= BATCH_LINES {
            flush(ex, run, &mut batch, read_at).await;
            deadline = None;
        }
    }
    if over.lines > 0 {
        if batch.is_empty() {
            read_at = ex.clock.now();
        }
        tracing::info!(run = %run.id, cap, lines = over.lines, bytes = over.bytes,
            "run output passed its cap; the rest was counted, not stored");
        batch.push(EventBody::Log {
            stream: LogStream::System,
            message: format!(
                "output cap of {cap} bytes reached: {} more lines ({} bytes) were not stored",
                over.lines, over.bytes
            ),
        });
    }
    flush(ex, run, &mut batch, read_at).await;
    logs
}

/// Lines past the output cap: counted, not stored.
#[derive(Default)]
struct Overflow {
    lines: u64,
    bytes: u64,
}

async fn flush(
    ex: &Executor,
    run: &Run,
    batch: &mut Vec<EventBody>,
    read_at: chrono::DateTime<chrono::Utc>,
) {
    if batch.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(100);
    // Lines are never dropped silently: retry until the database takes them.
    loop {
        match ex.append_at(run, batch, read_at).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, lines = batch.len(), "writing log lines failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    batch.clear();
}

/// Read buffer of each output pipe, bytes: what [`skim`] counts per step.
const PIPE_BUFFER: usize = 64 << 10;

/// What a pump sends to the log writer.
#[derive(Debug, PartialEq)]
enum Piped {
    /// One line (without its end), capped at [`MAX_LOG_LINE`].
    Line(LogStream, String),
    /// Output past the cap, counted in bulk: `lines` ended in it (a last
    /// line without an end counts at EOF), `bytes` read, and the last
    /// non-blank line that ended in it, capped (stdout's gives the result).
    Skimmed {
        stream: LogStream,
        lines: u64,
        bytes: u64,
        last: Option<String>,
    },
}

/// Reads `r` line by line into `tx` until EOF or the receiver is gone; once
/// `past_cap` is set, counts the rest in bulk ([`skim`]).
async fn pump<R: AsyncBufRead + Unpin>(
    mut r: R,
    stream: LogStream,
    tx: mpsc::Sender<Piped>,
    past_cap: Arc<AtomicBool>,
) {
    loop {
        if past_cap.load(Ordering::Relaxed) {
            return skim(r, stream, tx).await;
        }
        match read_capped_line(&mut r).await {
            Ok(Some(line)) => {
                if tx.send(Piped::Line(stream, line)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => return read_failed(&tx, stream, &e).await,
        }
    }
}

async fn read_failed(tx: &mpsc::Sender<Piped>, stream: LogStream, e: &std::io::Error) {
    let message = format!("reading {stream:?} failed: {e}");
    let _ = tx.send(Piped::Line(LogStream::System, message)).await;
}

/// Counts the rest of `r` a buffer at a time, one [`Piped::Skimmed`] per
/// buffer: lines (newlines) and bytes, and the buffer's last non-blank line
/// (a line's start may lie in an earlier buffer: at most [`MAX_LOG_LINE`]
/// bytes of the line in progress are kept).
async fn skim<R: AsyncBufRead + Unpin>(mut r: R, stream: LogStream, tx: mpsc::Sender<Piped>) {
    // The line in progress: its first bytes, its length, whether blank.
    let mut head: Vec<u8> = Vec::new();
    let mut len = 0usize;
    let mut blank = true;
    let keep = MAX_LOG_LINE + 4;
    loop {
        let chunk = match r.fill_buf().await {
            Ok(c) => c,
            Err(e) => return read_failed(&tx, stream, &e).await,
        };
        let n = chunk.len();
        if n == 0 {
            if len > 0 {
                let last = (!blank).then(|| line_text(&head, len));
                let _ = tx
                    .send(Piped::Skimmed {
                        stream,
                        lines: 1,
                        bytes: 0,
                        last,
                    })
                    .await;
            }
            return;
        }
        let mut lines = 0u64;
        let mut last = None;
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let seg = &rest[..i];
            lines += 1;
            let seg_blank = blank && seg.iter().all(u8::is_ascii_whitespace);
            if !seg_blank {
                // The last non-blank line ending in this buffer: only its
                // bounds are kept until the buffer is done.
                last = Some((std::mem::take(&mut head), len, seg));
            }
            head.clear();
            len = 0;
            blank = true;
            rest = &rest[i + 1..];
        }
        let last = last.map(|(mut h, l, seg)| {
            let room = keep.saturating_sub(h.len());
            h.extend_from_slice(&seg[..seg.len().min(room)]);
            line_text(&h, l + seg.len())
        });
        let room = keep.saturating_sub(head.len());
        head.extend_from_slice(&rest[..rest.len().min(room)]);
        len += rest.len();
        blank = blank && rest.iter().all(u8::is_ascii_whitespace);
        r.consume(n);
        let msg = Piped::Skimmed {
            stream,
            lines,
            bytes: n as u64,
            last,
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

/// A line kept by [`skim`]: `kept` holds the first bytes of a line of
/// `len` bytes; as [`read_capped_line`] makes it.
fn line_text(kept: &[u8], len: usize) -> String {
    let mut kept = &kept[..kept.len().min(MAX_LOG_LINE + 4)];
    let dropped = len.saturating_sub(kept.len());
    if dropped == 0 && kept.last() == Some(&b'\r') {
        kept = &kept[..kept.len() - 1];
    }
    let line = crate::domain::storable_text(String::from_utf8_lossy(kept).into_owned());
    cap_log_line(line, dropped)
}

/// Reads one line (without its `\n` / `\r\n`), keeping at most
/// [`MAX_LOG_LINE`] bytes of it in memory and marking the cut. `None` at EOF.
/// Invalid UTF-8 is replaced (U+FFFD).
pub(crate) async fn read_capped_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<String>> {
    let mut buf: Vec<u8> = Vec::new();
    let mut dropped = 0usize;
    let mut saw_any = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            if !saw_any {
                return Ok(None);
            }
            break;
        }
        saw_any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = (MAX_LOG_LINE + 4).saturating_sub(buf.len());
        let keep = take.min(room);
        buf.extend_from_slice(&chunk[..keep]);
        dropped += take - keep;
        r.consume(if done { take + 1 } else { take });
        if done {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    let line = crate::domain::storable_text(String::from_utf8_lossy(&buf).into_owned());
    Ok(Some(cap_log_line(line, dropped)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What skimming `input` reports: (lines, bytes, last non-blank line).
    async fn skimmed(input: &[u8], buffer: usize) -> (u64, u64, Option<String>) {
        let (tx, mut rx) = mpsc::channel(4);
        let input = input.to_vec();
        let task = tokio::spawn(async move {
            skim(
                BufReader::with_capacity(buffer, &input[..]),
                LogStream::Stdout,
                tx,
            )
            .await
        });
        let (mut lines, mut bytes, mut last) = (0, 0, None);
        while let Some(m) = rx.recv().await {
            let Piped::Skimmed {
                lines: l,
                bytes: b,
                last: x,
                ..
            } = m
            else {
                panic!("skim sent a line: {m:?}");
            };
            lines += l;
            bytes += b;
            if x.is_some() {
                last = x;
            }
        }
        task.await.unwrap();
        (lines, bytes, last)
    }

    /// The same, line by line.
    async fn read_by_line(input: &[u8]) -> (u64, Option<String>) {
        let mut r = BufReader::with_capacity(1024, input);
        let (mut lines, mut last) = (0, None);
        while let Some(l) = read_capped_line(&mut r).await.unwrap() {
            lines += 1;
            if !l.trim().is_empty() {
                last = Some(l);
            }
        }
        (lines, last)
    }

    /// Skimming counts the lines, bytes and last non-blank line that
    /// reading line by line finds, whatever the buffer boundaries: random
    /// inputs of short, blank, CR-ended and over-long lines, cut at buffers
    /// of 1 to 97 bytes.
    #[tokio::test]
    async fn skimming_agrees_with_reading_line_by_line() {
        let mut next = crate::domain::xorshift(0x9e37_79b9_7f4a_7c15_u64);
        for case in 0..300 {
            let mut input = Vec::new();
            for _ in 0..next() % 12 {
                match next() % 6 {
                    0 => input.extend_from_slice(b"\n"),
                    1 => input.extend_from_slice(b"  \t\n"),
                    2 => input.extend_from_slice(b"{\"ok\":1}\r\n"),
                    3 => input.extend(std::iter::repeat_n(
                        b'x',
                        MAX_LOG_LINE + (next() % 40) as usize,
                    )),
                    4 => input.extend_from_slice("é line\n".as_bytes()),
                    _ => input.extend_from_slice(b"y\n"),
                }
            }
            if next().is_multiple_of(3) {
                input.extend_from_slice(b"tail without end");
            }
            let buffer = 1 + (next() % 97) as usize;
            let (lines, bytes, last) = skimmed(&input, buffer).await;
            let (want_lines, want_last) = read_by_line(&input).await;
            assert_eq!(lines, want_lines, "case {case}: lines");
            assert_eq!(bytes, input.len() as u64, "case {case}: bytes");
            assert_eq!(last, want_last, "case {case}: last line (buffer {buffer})");
        }
    }

    #[tokio::test]
    async fn lines_are_split_and_capped() {
        let long = "x".repeat(MAX_LOG_LINE * 3);
        let input = format!("one\r\ntwo\n{long}\nlast");
        let mut r = BufReader::with_capacity(1024, input.as_bytes());
        assert_eq!(
            read_capped_line(&mut r).await.unwrap().as_deref(),
            Some("one")
        );
        assert_eq!(
            read_capped_line(&mut r).await.unwrap().as_deref(),
            Some("two")
        );
        let cut = read_capped_line(&mut r).await.unwrap().unwrap();
        assert!(cut.starts_with("xxx"));
        assert!(
            cut.ends_with(&format!("…[truncated {} bytes]", MAX_LOG_LINE * 2)),
            "{}",
            &cut[cut.len() - 40..]
        );
        assert_eq!(
            read_capped_line(&mut r).await.unwrap().as_deref(),
            Some("last")
        );
        assert_eq!(read_capped_line(&mut r).await.unwrap(), None);
    }
}
