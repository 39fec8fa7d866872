//! `sked stats`: run statistics of a binding, a definition or the tenant
//! over a window (`RunService.GetRunStats`): counts per state, success
//! rate, duration and fire lag percentiles, and a per-hour or per-day
//! series.

use super::connect::{Client, GlobalArgs};
use super::input;
use super::output::{self, Color, Details, Table, colored, print_message};
use super::{EXIT_OK, Error, Result};
use crate::proto::v1 as pb;

/// `sked stats`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "The window is on the runs' fire times (scheduled_time), widened \
to whole hours (UTC); only runs that ended count. Percentiles are within 19 % above the \
exact value (histogram buckets, 4 per doubling).

Examples:
  sked stats                          # the tenant, last 7 days, per day
  sked stats --binding 0190... --since 24h --interval hour
  sked stats --definition nightly-report --from 2026-11-01 --to 2026-12-01 -o json"
)]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    /// Only this binding's runs (its id).
    #[arg(long, value_name = "ID", conflicts_with = "definition")]
    binding: Option<String>,
    /// Only runs of this definition (platform keys; with --tenant only
    /// that tenant's bindings of it).
    #[arg(long, value_name = "NAME")]
    definition: Option<String>,
    /// How far back the window starts, up to now (e.g. 24h, 7d, 30d).
    #[arg(long, value_name = "DURATION", conflicts_with_all = ["from", "to"])]
    since: Option<String>,
    /// Window start (e.g. 2026-11-01, -3d, RFC 3339); with --to.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, requires = "to")]
    from: Option<String>,
    /// Window end, exclusive (e.g. now, 2026-12-01).
    #[arg(
        long,
        value_name = "TIME",
        allow_hyphen_values = true,
        requires = "from"
    )]
    to: Option<String>,
    /// Series buckets: hour (windows up to 31 days) or day; by default hours
    /// for windows up to 2 days, else days.
    #[arg(long, value_enum)]
    interval: Option<Interval>,
}

/// `--interval`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Interval {
    Hour,
    Day,
}

/// The window `[from, to)` the flags name; by default the last 7 days.
fn window(a: &Args) -> Result<(prost_types::Timestamp, prost_types::Timestamp)> {
    if let (Some(from), Some(to)) = (&a.from, &a.to) {
        return Ok((input::time("--from", from)?, input::time("--to", to)?));
    }
    let since = input::duration("--since", a.since.as_deref().unwrap_or("7d"))?;
    if since.seconds < 0 || (since.seconds == 0 && since.nanos <= 0) {
        return Err(Error::Input(
            "--since: must be a positive duration (e.g. 7d)".into(),
        ));
    }
    let now = chrono::Utc::now();
    let span = chrono::TimeDelta::seconds(since.seconds)
        + chrono::TimeDelta::nanoseconds(i64::from(since.nanos));
    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    };
    Ok((ts(now - span), ts(now)))
}

/// Runs `sked stats`.
///
/// # Errors
/// Bad flags (before anything is sent); what GetRunStats answered
/// (INVALID_ARGUMENT for a window over 400 days, NOT_FOUND for another
/// tenant's binding, PERMISSION_DENIED for --definition with a tenant key).
pub async fn run(a: Args) -> Result<i32> {
    let (start, end) = window(&a)?;
    let client = Client::new(&a.global)?;
    let s = client
        .runs()
        .get_run_stats(pb::GetRunStatsRequest {
            binding_id: a.binding.clone().unwrap_or_default(),
            definition: a.definition.clone().unwrap_or_default(),
            start_time: Some(start),
            end_time: Some(end),
            interval: match a.interval {
                None => pb::StatsInterval::Unspecified,
                Some(Interval::Hour) => pb::StatsInterval::Hour,
                Some(Interval::Day) => pb::StatsInterval::Day,
            } as i32,
        })
        .await?
        .into_inner();
    let subject = match (&a.binding, &a.definition) {
        (Some(b), _) => format!("binding {b}"),
        (None, Some(d)) => format!("definition {d}"),
        (None, None) => "the tenant".into(),
    };
    print_message(client.format(), &s, |s| view(&subject, s))?;
    Ok(EXIT_OK)
}

/// A success rate as a percentage, coloured: green from 99 %, yellow from
/// 90 %, red below.
fn rate(r: Option<f64>) -> output::Cell {
    match r {
        None => "-".into(),
        Some(r) => {
            let color = if r >= 0.99 {
                Color::Green
            } else if r >= 0.9 {
                Color::Yellow
            } else {
                Color::Red
            };
            colored(format!("{:.1} %", r * 100.0), Some(color))
        }
    }
}

fn view(subject: &str, s: &pb::RunStats) -> String {
    let c = s.counts.unwrap_or_default();
    let mut v = Details::new();
    v.field("Runs of", subject)
        .field(
            "Window",
            format!(
                "{} .. {}",
                output::local_time(&s.start_time),
                output::local_time(&s.end_time)
            ),
        )
        .field(
            "Runs",
            format!(
                "{} ended: {} succeeded, {} failed, {} timed out, {} cancelled, {} skipped",
                s.total, c.succeeded, c.failed, c.timed_out, c.cancelled, c.skipped
            ),
        )
        .field("Success rate", rate(s.success_rate));
    if s.started > 0 {
        v.field(
            "Duration",
            format!(
                "p50 {}, p95 {}, max {}, mean {} ({} started)",
                output::duration_opt(&s.duration_p50),
                output::duration_opt(&s.duration_p95),
                output::duration_opt(&s.duration_max),
                output::duration_opt(&s.duration_mean),
                s.started
            ),
        )
        .field(
            "Fire lag",
            format!(
                "p50 {}, p99 {}",
                output::duration_opt(&s.fire_lag_p50),
                output::duration_opt(&s.fire_lag_p99)
            ),
        );
    } else {
        v.field("Duration", "no run started");
    }
    let hourly = s.interval == pb::StatsInterval::Hour as i32;
    let mut t = Table::new(&[
        if hourly { "HOUR" } else { "DAY (UTC)" },
        "TOTAL",
        "SUCCEEDED",
        "FAILED",
        "TIMED_OUT",
        "CANCELLED",
        "SKIPPED",
        "SUCCESS",
    ]);
    for b in &s.series {
        let c = b.counts.unwrap_or_default();
        let total = c.succeeded + c.failed + c.timed_out + c.cancelled + c.skipped;
        let judged = c.succeeded + c.failed + c.timed_out;
        // Days are UTC days: shown as their UTC date, not a local time.
        let when = if hourly {
            output::local_time(&b.start_time)
        } else {
            b.start_time
                .as_ref()
                .and_then(output::to_utc)
                .map(|t| t.format("%Y-%m-%d").to_string())
                .unwrap_or_default()
        };
        t.row(vec![
            when.into(),
            total.to_string().into(),
            c.succeeded.to_string().into(),
            c.failed.to_string().into(),
            c.timed_out.to_string().into(),
            c.cancelled.to_string().into(),
            c.skipped.to_string().into(),
            rate((judged > 0).then(|| c.succeeded as f64 / judged as f64)),
        ]);
    }
    format!("{}\n{}", v.render(), t.render())
}
