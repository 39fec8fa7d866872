//! Following a run to its end (`sked tail`, `sked run trigger --wait`):
//! its output as it comes, a progress bar while it reports progress, and
//! its outcome as the exit code.
//!
//! The run's events come from `LogService.TailRun`. The stream is resumed
//! with `after_seq` = the last seq printed whenever it breaks (a node
//! restarting, a connection dropping), for up to `--reconnect-for`; events
//! are de-duplicated by seq, so every line is printed once and in order. A
//! stream that ends without the run having ended (its node shut down) is
//! resumed too. With retries followed, a FAILED or TIMED_OUT attempt that
//! got a retry (trigger RETRY, `retry_of` = the attempt; written in the same
//! transaction as the failure) is followed in turn, to the final attempt.
//!
//! Where things go (table output): the program's stdout lines to stdout,
//! its stderr lines to stderr, sked's own lines (state changes, system
//! messages, progress when stderr is no terminal) to stderr prefixed with
//! `[sked]`. With `-o json|yaml` every event goes to stdout as one JSON line
//! (or YAML document) of `RunEvent`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::Code;

use super::connect::Client;
use super::output::{self, Color, Format, paint, state_name};
use super::{EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, EXIT_TIMED_OUT, Error, Result};
use crate::proto::v1 as pb;

/// How to follow.
#[derive(Debug, Clone)]
pub struct Options {
    /// Keep following live until the run ends (else: print what is stored).
    pub follow: bool,
    /// Skip events up to this seq (first run only).
    pub after_seq: i64,
    /// Follow retries of a failed attempt to the final attempt.
    pub retries: bool,
    /// Prefix lines with their event time.
    pub timestamps: bool,
    /// Leave out sked's own `[sked]` lines and the progress bar.
    pub quiet: bool,
    /// How long to keep trying to resume a broken stream.
    pub reconnect_for: Duration,
    /// Output format.
    pub format: Format,
}

/// Flags of every command that follows a run.
#[derive(Debug, Clone, clap::Args)]
pub struct FollowFlags {
    /// Prefix each line with its event time (local).
    #[arg(long)]
    pub timestamps: bool,
    /// Leave out sked's own `[sked]` lines (state changes, progress).
    #[arg(short, long)]
    pub quiet: bool,
    /// How long to keep trying to resume the stream when the connection
    /// drops (or sked cannot be reached), e.g. 30s, 10m.
    #[arg(long, value_name = "DURATION", default_value = "2m")]
    pub reconnect_for: String,
}

impl FollowFlags {
    /// The options these flags give, live, from seq 0.
    ///
    /// # Errors
    /// [`Error::Input`] for an unparsable `--reconnect-for`.
    pub fn options(&self, format: Format, retries: bool) -> Result<Options> {
        let d = super::input::duration("--reconnect-for", &self.reconnect_for)?;
        Ok(Options {
            follow: true,
            after_seq: 0,
            retries,
            timestamps: self.timestamps,
            quiet: self.quiet,
            reconnect_for: Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32),
            format,
        })
    }
}

/// The exit code of a run that ended in `state` (module docs of `cli`).
pub fn exit_code(state: i32) -> i32 {
    use pb::RunState as S;
    match S::try_from(state) {
        Ok(S::Succeeded) => EXIT_OK,
        Ok(S::Failed) => EXIT_FAILED,
        Ok(S::TimedOut) => EXIT_TIMED_OUT,
        Ok(S::Cancelled) => EXIT_CANCELLED,
        Ok(S::Skipped) => EXIT_SKIPPED,
        _ => EXIT_OK,
    }
}

/// Whether a broken stream with this status is worth resuming: anything
/// but sked's definite answers about the request itself.
fn resumable(s: &tonic::Status) -> bool {
    !matches!(
        s.code(),
        Code::NotFound
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::ResourceExhausted
    )
}

/// Prints events.
struct Printer {
    opts: Options,
    bar: Option<ProgressBar>,
    color: bool,
    progress_bar_ok: bool,
}

impl Printer {
    fn new(opts: Options) -> Printer {
        let progress_bar_ok =
            opts.format == Format::Table && !opts.quiet && std::io::stderr().is_terminal();
        Printer {
            color: output::color_stderr(),
            progress_bar_ok,
            bar: None,
            opts,
        }
    }

    fn prefix(&self, e: &pb::RunEvent) -> String {
        if self.opts.timestamps {
            format!("{} ", output::local_time(&e.time))
        } else {
            String::new()
        }
    }

    /// Writes a line with the progress bar (if any) out of the way.
    fn write(&self, to_stderr: bool, line: &str) -> Result<()> {
        let write = || -> std::io::Result<()> {
            if to_stderr {
                // stdout first, so a terminal shows both in event order.
                std::io::stdout().flush()?;
                let mut err = std::io::stderr().lock();
                writeln!(err, "{line}")
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()
            }
        };
        match &self.bar {
            Some(bar) => bar.suspend(write)?,
            None => write()?,
        }
        Ok(())
    }

    fn sked_line(&self, e: &pb::RunEvent, text: &str, color: Option<Color>) -> Result<()> {
        if self.opts.quiet {
            return Ok(());
        }
        let line = format!(
            "{}{} {}",
            self.prefix(e),
            paint("[sked]", Some(Color::Dim), self.color),
            paint(text, color, self.color)
        );
        self.write(true, &line)
    }

    fn note(&self, text: &str) -> Result<()> {
        if self.opts.quiet || self.opts.format != Format::Table {
            return Ok(());
        }
        let line = format!("{} {text}", paint("[sked]", Some(Color::Dim), self.color));
        self.write(true, &line)
    }

    fn event(&mut self, e: &pb::RunEvent) -> Result<()> {
        use pb::run_event::Kind;
        if self.opts.format != Format::Table {
            return output::print_stream_item(self.opts.format, &output::to_json(e));
        }
        match &e.kind {
            Some(Kind::Log(l)) => {
                let stream = pb::LogStream::try_from(l.stream).unwrap_or_default();
                let text = format!("{}{}", self.prefix(e), l.message);
                match stream {
                    pb::LogStream::Stdout => self.write(false, &text)?,
                    pb::LogStream::Stderr => self.write(true, &text)?,
                    _ => self.sked_line(e, &l.message, None)?,
                }
            }
            Some(Kind::StateChanged(s)) => {
                let mut text = state_name(s.to_state);
                if !s.reason.is_empty() {
                    text.push_str(&format!(": {}", s.reason));
                }
                if output::is_terminal(s.to_state)
                    && let Some(bar) = self.bar.take()
                {
                    bar.finish_and_clear();
                }
                self.sked_line(e, &text, output::state_color(s.to_state))?;
            }
            Some(Kind::Progress(p)) => self.progress(e, p)?,
            Some(Kind::Fired(f)) => {
                let params = output::struct_json(&f.params);
                self.sked_line(e, format!("fired {params}").trim_end(), None)?;
            }
            Some(Kind::Notification(n)) => {
                let text = if n.delivered {
                    format!(
                        "notification {} ({}) delivered after {} attempt(s)",
                        n.rule, n.event, n.attempts
                    )
                } else {
                    format!(
                        "notification {} ({}) failed after {} attempt(s): {}",
                        n.rule, n.event, n.attempts, n.error
                    )
                };
                self.sked_line(e, &text, None)?;
            }
            None => {}
        }
        Ok(())
    }

    fn progress(&mut self, e: &pb::RunEvent, p: &pb::Progress) -> Result<()> {
        let mut text = String::new();
        if p.total_steps > 0 {
            text.push_str(&format!("step {}/{} ", p.current_step, p.total_steps));
        }
        text.push_str(&p.message);
        if !self.progress_bar_ok {
            let line = format!("progress {:.0}% {text}", p.percent);
            return self.sked_line(e, line.trim_end(), None);
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("[{bar:30.cyan/blue}] {pos:>3}% {wide_msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        bar.set_position(p.percent.clamp(0.0, 100.0).round() as u64);
        bar.set_message(text);
        Ok(())
    }

    fn done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Follows run `run_id` (and, with `opts.retries`, its retries) to its end;
/// returns the exit code of its outcome. The caller has reached sked for
/// the run already (a call that found it), so sked being unreachable from
/// here on counts as a dropped connection and is retried.
///
/// # Errors
/// The status of a call sked refused (`NOT_FOUND` for an unknown run), or
/// an `UNAVAILABLE` once sked could not be reached for `reconnect_for`.
pub async fn follow(client: &Client, run_id: &str, opts: Options) -> Result<i32> {
    let mut printer = Printer::new(opts.clone());
    let mut run_id = run_id.to_string();
    let mut after_seq = opts.after_seq;
    let result = loop {
        let ended = match tail_one(client, &run_id, after_seq, &mut printer).await {
            Ok(ended) => ended,
            Err(e) => break Err(e),
        };
        let Some(run) = ended else {
            // Not following and the run is not over: what is stored is out.
            break Ok(EXIT_OK);
        };
        let failed = matches!(
            pb::RunState::try_from(run.state),
            Ok(pb::RunState::Failed | pb::RunState::TimedOut)
        );
        if opts.retries && failed && run.attempt < run.max_attempts {
            match find_retry(client, &run).await {
                Ok(Some(next)) => {
                    let due = next
                        .not_before
                        .as_ref()
                        .and_then(output::to_utc)
                        .map(|t| t - chrono::Utc::now())
                        .filter(|d| d.num_milliseconds() > 0)
                        .map(|d| format!(", due in {}", output::duration_std(d)))
                        .unwrap_or_default();
                    printer.note(&format!(
                        "retry: attempt {}/{} is run {}{due}",
                        next.attempt, next.max_attempts, next.id
                    ))?;
                    run_id = next.id;
                    after_seq = 0;
                    continue;
                }
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        }
        break Ok(exit_code(run.state));
    };
    printer.done();
    result
}

/// Streams one run's events from `after_seq`, resuming after breaks.
/// Returns the run once it has ended (`None` without follow while it has
/// not).
async fn tail_one(
    client: &Client,
    run_id: &str,
    mut after_seq: i64,
    printer: &mut Printer,
) -> Result<Option<pb::Run>> {
    let opts = printer.opts.clone();
    // Since when the stream has been broken (None while it works).
    let mut broken_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    let mut last_error: Option<tonic::Status> = None;
    loop {
        if let Some(since) = broken_since {
            if since.elapsed() > opts.reconnect_for {
                let s = last_error.unwrap_or_else(|| tonic::Status::unavailable("stream broken"));
                return Err(Error::Status(tonic::Status::new(
                    s.code(),
                    format!(
                        "lost the stream of run {run_id} after seq {after_seq} and could not resume it within {}: {}",
                        output::duration_std(opts.reconnect_for),
                        s.message()
                    ),
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        let req = pb::TailRunRequest {
            run_id: run_id.to_string(),
            after_seq,
            follow: opts.follow,
        };
        let mut stream = match client.logs().tail_run(req).await {
            // Reached again: a later break gets its own reconnect window.
            Ok(s) => {
                broken_since = None;
                s.into_inner()
            }
            // The caller has reached sked already (the run exists): a
            // failure now is a node restarting or a connection dropping.
            Err(s) if resumable(&s) => {
                broken_since.get_or_insert_with(Instant::now);
                last_error = Some(s);
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        let clean_end = loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    backoff = Duration::from_millis(100);
                    if e.seq <= after_seq {
                        continue;
                    }
                    after_seq = e.seq;
                    printer.event(&e)?;
                }
                Ok(None) => break true,
                Err(s) if resumable(&s) => {
                    last_error = Some(s);
                    break false;
                }
                Err(s) => return Err(s.into()),
            }
        };
        if !clean_end {
            broken_since.get_or_insert_with(Instant::now);
            continue;
        }
        // The stream ended: the run is over, or (without follow) what is
        // stored has been sent, or the node is shutting down.
        let run = match client
            .runs()
            .get_run(pb::GetRunRequest {
                run_id: run_id.to_string(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if resumable(&s) => {
                last_error = Some(s);
                broken_since.get_or_insert_with(Instant::now);
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        if output::is_terminal(run.state) {
            return Ok(Some(run));
        }
        if !opts.follow {
            return Ok(None);
        }
        broken_since.get_or_insert_with(Instant::now);
        last_error = Some(tonic::Status::unavailable(
            "the stream ended before the run did",
        ));
    }
}

/// The retry of an attempt that failed with attempts left, if it got one.
async fn find_retry(client: &Client, ended: &pb::Run) -> Result<Option<pb::Run>> {
    let ended_at = ended.end_time.as_ref().and_then(output::to_utc);
    let mut token = String::new();
    // Runs are listed newest first and the retry is written with the
    // failure: a few pages back from now reach it, however busy the binding.
    for _ in 0..20 {
        let page = client
            .runs()
            .list_runs(pb::ListRunsRequest {
                binding_id: ended.binding_id.clone(),
                page_size: 200,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if let Some(r) = page.runs.iter().find(|r| r.retry_of == ended.id) {
            return Ok(Some(r.clone()));
        }
        let older = page.runs.last().and_then(|r| {
            let created = r.create_time.as_ref().and_then(output::to_utc)?;
            Some(created < ended_at? - chrono::TimeDelta::seconds(5))
        });
        if page.next_page_token.is_empty() || older == Some(true) {
            return Ok(None);
        }
        token = page.next_page_token;
    }
    Ok(None)
}
