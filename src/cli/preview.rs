//! `sked preview`: a schedule's next fire times, from
//! `DefinitionService.PreviewSchedule` (the server's own schedule code, so
//! what is shown is what will fire), with DST shifts marked.

use super::connect::{Client, GlobalArgs};
use super::input::{self, ScheduleArgs};
use super::output::{self, Color, Table, colored, print_message};
use super::{EXIT_OK, Error, Result};
use crate::proto::v1 as pb;

/// `sked preview`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Times are shown in the schedule's zone (and UTC). A fire marked \
`DST gap` asked for a wall-clock time that did not exist that day (spring forward) and moved \
to the first instant after the gap; `offset` marks the first fire after a change of the zone's \
UTC offset.

Examples:
  sked preview '30 2 * * *' --tz America/New_York --count 5 --after 2025-03-07
  sked preview --every 90m
  sked preview --daily 09:00 --tz Europe/Berlin --jitter 5m"
)]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    /// A cron expression (same as --cron).
    expression: Option<String>,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// How many fire times (1-1000).
    #[arg(long, short = 'n', default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=1000))]
    count: i32,
    /// Fire times after this time (default now).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    after: Option<String>,
}

/// Runs `sked preview`.
///
/// # Errors
/// INVALID_ARGUMENT naming what is wrong with the schedule, or bad flags.
pub async fn run(a: Args) -> Result<i32> {
    let mut flags = a.schedule.clone();
    if let Some(e) = a.expression {
        if flags.cron.is_some() {
            return Err(Error::Input(
                "give the cron expression once (positional or --cron)".into(),
            ));
        }
        flags.cron = Some(e);
    }
    let Some(schedule) = flags.to_schedule(None)? else {
        return Err(Error::Input(
            "give a schedule: a cron expression, --every, --daily, --at, --manual or --schedule"
                .into(),
        ));
    };
    let client = Client::new(&a.global)?;
    let zone = if schedule.timezone.is_empty() {
        "UTC".to_string()
    } else {
        schedule.timezone.clone()
    };
    let summary = output::schedule_summary(&Some(schedule.clone()));
    let resp = client
        .defs()
        .preview_schedule(pb::PreviewScheduleRequest {
            schedule: Some(schedule),
            count: a.count,
            after: a
                .after
                .as_deref()
                .map(|t| input::time("--after", t))
                .transpose()?,
        })
        .await?
        .into_inner();
    print_message(client.format(), &resp, |r| {
        let mut t = Table::new(&["#", "FIRE TIME", "UTC", "NOTE"]);
        let mut previous_offset: Option<String> = None;
        for (i, f) in r.fire_times.iter().enumerate() {
            let (local, offset) = split_offset(&f.local_time);
            let mut notes = Vec::new();
            if f.dst_shifted {
                notes.push("DST gap: moved to the first instant after it".to_string());
            }
            if let Some(prev) = &previous_offset
                && *prev != offset
            {
                notes.push(format!("offset {prev} → {offset}"));
            }
            previous_offset = Some(offset.clone());
            let utc = f
                .time
                .as_ref()
                .and_then(output::to_utc)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            let note = notes.join("; ");
            let color = (!note.is_empty()).then_some(Color::Yellow);
            t.row(vec![
                (i + 1).to_string().into(),
                format!("{local} {offset}").into(),
                utc.into(),
                colored(note, color),
            ]);
        }
        let head = format!(
            "{summary}: next {} fire times in {zone}\n",
            r.fire_times.len()
        );
        if r.fire_times.is_empty() {
            format!("{summary}: no further fire times\n")
        } else {
            head + &t.render()
        }
    })?;
    Ok(EXIT_OK)
}

/// `2025-03-09T03:00:00-04:00` → (`2025-03-09 03:00:00`, `-04:00`).
fn split_offset(rfc3339: &str) -> (String, String) {
    match chrono::DateTime::parse_from_rfc3339(rfc3339) {
        Ok(t) => (
            t.format("%Y-%m-%d %H:%M:%S").to_string(),
            t.format("%:z").to_string(),
        ),
        Err(_) => (rfc3339.to_string(), String::new()),
    }
}
