//! `sked watch`: the tenant's live events across runs
//! (`LogService.WatchEvents`), from now on, until interrupted or `--count`
//! events were shown.

use std::io::Write;
use std::time::{Duration, Instant};

use tonic::Code;

use super::binding::resolve;
use super::connect::{Client, GlobalArgs};
use super::output::{self, Color, Format, paint};
use super::{EXIT_OK, Result};
use crate::proto::v1 as pb;

/// Event kinds by short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    /// State changes.
    State,
    /// Log lines.
    Log,
    /// `fired` events of event handlers.
    Fired,
    /// Progress reports.
    Progress,
}

/// `sked watch`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Events that happen while the stream is being re-established after a \
dropped connection are not shown (use `sked tail RUN` for a run's full log).

Examples:
  sked watch --definition nightly --kind state
  sked watch --json --count 10"
)]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    /// Only events of this binding (id or definition name).
    #[arg(long)]
    binding: Option<String>,
    /// Only events of runs of this definition.
    #[arg(long)]
    definition: Option<String>,
    /// Only these kinds (repeatable or comma-separated; default all).
    #[arg(long, value_enum, value_delimiter = ',')]
    kind: Vec<Kind>,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// How long to keep trying to re-establish a dropped stream.
    #[arg(long, value_name = "DURATION", default_value = "2m")]
    reconnect_for: String,
}

/// Runs `sked watch`.
///
/// # Errors
/// What the API answered, or bad flags.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let format = client.format();
    let reconnect = super::input::duration("--reconnect-for", &a.reconnect_for)?;
    let reconnect = Duration::new(reconnect.seconds.max(0) as u64, 0);
    let binding_id = match &a.binding {
        Some(b) => resolve(&client, b).await?,
        None => String::new(),
    };
    let req = pb::WatchEventsRequest {
        binding_id,
        definition: a.definition.clone().unwrap_or_default(),
        kinds: a
            .kind
            .iter()
            .map(|k| {
                (match k {
                    Kind::State => pb::EventKind::StateChanged,
                    Kind::Log => pb::EventKind::Log,
                    Kind::Fired => pb::EventKind::Fired,
                    Kind::Progress => pb::EventKind::Progress,
                }) as i32
            })
            .collect(),
    };
    let mut shown: u64 = 0;
    let mut broken_since: Option<Instant> = None;
    loop {
        if a.count.is_some_and(|c| shown >= c) {
            return Ok(EXIT_OK);
        }
        let mut stream = match client.logs().watch_events(req.clone()).await {
            Ok(s) => {
                if broken_since.take().is_some() && format == Format::Table {
                    eprintln!("[sked] watching again (events in between are not shown)");
                }
                s.into_inner()
            }
            Err(s) if retry(&s, &mut broken_since, reconnect) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        loop {
            match stream.message().await {
                Ok(Some(item)) => {
                    if item.missed_events > 0 {
                        eprintln!(
                            "[sked] {} events missed (reading too slowly)",
                            item.missed_events
                        );
                    }
                    let Some(e) = &item.event else { continue };
                    if format == Format::Table {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "{}", line(e))?;
                        out.flush()?;
                    } else {
                        output::print_stream_item(format, &output::to_json(&item))?;
                    }
                    shown += 1;
                    if a.count.is_some_and(|c| shown >= c) {
                        return Ok(EXIT_OK);
                    }
                }
                // The node ended the stream (shutting down): watch again.
                Ok(None) => {
                    broken_since.get_or_insert_with(Instant::now);
                    break;
                }
                Err(s) if retry(&s, &mut broken_since, reconnect) => break,
                Err(s) => return Err(s.into()),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether to try again after `s` (a dropped connection within the
/// reconnect window).
fn retry(s: &tonic::Status, since: &mut Option<Instant>, window: Duration) -> bool {
    let transient = matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted
    );
    transient && since.get_or_insert_with(Instant::now).elapsed() <= window
}

/// One event as a line: local time, run id, definition, what happened.
fn line(e: &pb::RunEvent) -> String {
    use pb::run_event::Kind as K;
    let color = output::color_stdout();
    let what = match &e.kind {
        Some(K::StateChanged(s)) => {
            let mut t = paint(
                &output::state_name(s.to_state),
                output::state_color(s.to_state),
                color,
            );
            if !s.reason.is_empty() {
                t.push_str(&format!(": {}", s.reason));
            }
            t
        }
        Some(K::Log(l)) => {
            let stream = pb::LogStream::try_from(l.stream)
                .map(|s| output::short(s.as_str_name(), "LOG_STREAM_").to_lowercase())
                .unwrap_or_default();
            let tag = paint(&format!("{stream}|"), Some(Color::Dim), color);
            format!("{tag} {}", l.message)
        }
        Some(K::Progress(p)) => format!("progress {:.0}% {}", p.percent, p.message)
            .trim_end()
            .to_string(),
        Some(K::Fired(f)) => format!("fired {}", output::struct_json(&f.params))
            .trim_end()
            .to_string(),
        Some(K::Notification(n)) if n.delivered => format!(
            "notification {} ({}) delivered after {} attempt(s)",
            n.rule, n.event, n.attempts
        ),
        Some(K::Notification(n)) => format!(
            "notification {} ({}) failed after {} attempt(s): {}",
            n.rule, n.event, n.attempts, n.error
        ),
        None => String::new(),
    };
    format!(
        "{}  {}  {}  {what}",
        output::local_time(&e.time),
        e.run_id,
        e.definition
    )
}
