//! `sked status`: the scheduler's health over every node sharing the
//! database (`AdminService.GetSchedulerStatus`; platform admin keys).

use super::connect::{Client, GlobalArgs};
use super::output::{self, Color, Details, Table, colored, print_message};
use super::{EXIT_OK, Result};
use crate::proto::v1 as pb;

/// `sked status`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Shows the nodes (heartbeat, runs, stream subscribers; stale = no \
heartbeat for 10 s), the maintenance leader, the runs waiting and running, how long the oldest \
queued run has waited and the fire lag of the last minute. Needs a platform admin key."
)]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
}

/// Runs `sked status`.
///
/// # Errors
/// What the API answered (PERMISSION_DENIED for a tenant key).
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let s = client
        .admin()
        .get_scheduler_status(pb::GetSchedulerStatusRequest {})
        .await?
        .into_inner();
    print_message(client.format(), &s, view)?;
    Ok(EXIT_OK)
}

/// How long ago `t` was, as of `now`.
fn ago(t: &Option<prost_types::Timestamp>, now: &Option<prost_types::Timestamp>) -> String {
    let (Some(t), Some(now)) = (
        t.as_ref().and_then(output::to_utc),
        now.as_ref().and_then(output::to_utc),
    ) else {
        return String::new();
    };
    let d = now - t;
    if d.num_milliseconds() < 1000 {
        "just now".into()
    } else {
        format!("{} ago", output::duration_std(d))
    }
}

fn view(s: &pb::SchedulerStatus) -> String {
    let mut v = Details::new();
    let leader = if s.leader_node_id.is_empty() {
        colored("none (the lease lapsed)", Some(Color::Yellow))
    } else {
        format!(
            "{} (term {}, lease until {})",
            s.leader_node_id,
            s.leader_term,
            output::local_time(&s.leader_lease_expire_time)
        )
        .into()
    };
    let lag = match &s.fire_lag {
        Some(l) if l.runs > 0 => format!(
            "p50 {}, p99 {}, max {} over {} fires",
            output::duration_opt(&l.p50),
            output::duration_opt(&l.p99),
            output::duration_opt(&l.max),
            l.runs
        ),
        _ => "no fire started in the last minute".into(),
    };
    v.field("Answered by", s.node_id.as_str())
        .field("Leader", leader)
        .field(
            "Runs",
            format!(
                "{} scheduled, {} queued, {} running",
                s.scheduled_runs, s.queued_runs, s.running_runs
            ),
        )
        .field(
            "Oldest queued",
            s.oldest_queued_age
                .map(|d| format!("waiting {}", output::duration_std(d)))
                .unwrap_or_else(|| "none waiting".into()),
        )
        .field("Fire lag (1 min)", lag)
        .field("Subscribers", s.stream_subscribers.to_string());
    let mut t = Table::new(&[
        "NODE",
        "STATE",
        "VERSION",
        "STARTED",
        "HEARTBEAT",
        "RUNNING",
        "SUBSCRIBERS",
    ]);
    for n in &s.nodes {
        let (state, color) = if n.stale {
            ("stale", Color::Red)
        } else if n.draining {
            ("draining", Color::Yellow)
        } else if n.leader {
            ("leader", Color::Green)
        } else {
            ("ok", Color::Green)
        };
        t.row(vec![
            n.node_id.clone().into(),
            colored(state, Some(color)),
            n.version.clone().into(),
            output::local_time(&n.start_time).into(),
            ago(&n.heartbeat_time, &s.time).into(),
            n.running_runs.to_string().into(),
            n.stream_subscribers.to_string().into(),
        ]);
    }
    format!("{}\n{}", v.render(), t.render())
}
