//! `sked run`: runs (RunService) — list, get, trigger (and wait for the
//! outcome), cancel, retry, backfill.

use clap::Subcommand;

use super::binding::resolve;
use super::connect::{Client, GlobalArgs};
use super::follow::{self, FollowFlags};
use super::input::{self, PageArgs, State};
use super::output::{self, Details, Table, print_message};
use super::{EXIT_CODES_HELP, EXIT_OK, Result};
use crate::proto::v1 as pb;

/// `sked run`.
#[derive(Debug, clap::Args)]
#[command(after_help = "BINDING is a binding id or the name of its definition.

Examples:
  sked run trigger nightly --param dry=true --wait     # exit code = the run's outcome
  sked run list --binding nightly --state failed
  sked run backfill nightly --from -6h --to now --dry-run
  sked run cancel RUN_ID --reason 'wrong input'")]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the tenant's runs, newest first.
    #[command(visible_alias = "ls")]
    List {
        /// Only runs of this binding (id or definition name).
        #[arg(long)]
        binding: Option<String>,
        /// Only runs in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one run.
    Get {
        /// Run id.
        run: String,
    },
    /// Start a run of a binding now (or at --at), whatever its schedule,
    /// also when it is paused. With --wait, follow it (and its retries)
    /// like `sked tail` and exit with its outcome.
    #[command(after_help = EXIT_CODES_HELP)]
    Trigger {
        /// Binding id or definition name.
        binding: String,
        /// Param overrides, merged last: a JSON object, or @file.
        #[arg(long, value_name = "JSON")]
        params: Option<String>,
        /// One param override (repeatable); the value is JSON if it parses,
        /// else a string.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        param: Vec<String>,
        /// Run no earlier than this time (SCHEDULED until then).
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        at: Option<String>,
        /// The same key for the same binding within 24 h returns the first
        /// run instead of starting another.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Follow the run's output to its end (through its retries) and
        /// exit with its outcome.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        follow: FollowFlags,
    },
    /// Cancel a scheduled, queued or running run.
    Cancel {
        /// Run id.
        run: String,
        /// Why (kept in the run's reason).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Run an ended run again as a new attempt (same params).
    #[command(after_help = EXIT_CODES_HELP)]
    Retry {
        /// Run id.
        run: String,
        /// Follow the new attempt to its end and exit with its outcome.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        follow: FollowFlags,
    },
    /// Create one run per fire time of the binding's schedule in
    /// [--from, --to).
    Backfill {
        /// Binding id or definition name.
        binding: String,
        /// Start of the range (inclusive), e.g. -6h or 2025-03-09 00:00.
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        from: String,
        /// End of the range (exclusive, not in the future).
        #[arg(
            long,
            value_name = "TIME",
            default_value = "now",
            allow_hyphen_values = true
        )]
        to: String,
        /// Only list the fire times; create nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs `sked run ...`.
///
/// # Errors
/// What the API call answered, or bad flags.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let format = client.format();
    match a.cmd {
        Cmd::List {
            binding,
            state,
            page,
        } => {
            let binding_id = match binding {
                Some(b) => resolve(&client, &b).await?,
                None => String::new(),
            };
            let resp = client
                .runs()
                .list_runs(pb::ListRunsRequest {
                    page_size: page.size(),
                    page_token: page.token(),
                    binding_id,
                    state: state.map_or(0, |s| pb::RunState::from(s) as i32),
                    ..Default::default()
                })
                .await?
                .into_inner();
            print_message(format, &resp, |r| {
                if r.runs.is_empty() {
                    "No runs.\n".into()
                } else {
                    runs_table(&r.runs).render()
                }
            })?;
            if format == output::Format::Table {
                output::next_page_hint(&resp.next_page_token);
            }
        }
        Cmd::Get { run } => {
            let r = client
                .runs()
                .get_run(pb::GetRunRequest { run_id: run })
                .await?
                .into_inner();
            print_message(format, &r, details)?;
        }
        Cmd::Trigger {
            binding,
            params,
            param,
            at,
            idempotency_key,
            wait,
            follow,
        } => {
            let binding_id = resolve(&client, &binding).await?;
            let r = client
                .runs()
                .trigger_run(pb::TriggerRunRequest {
                    binding_id,
                    params: input::params(params.as_deref(), &param)?,
                    run_time: at.as_deref().map(|t| input::time("--at", t)).transpose()?,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if wait {
                if format == output::Format::Table && !follow.quiet {
                    eprintln!("[sked] run {} ({})", r.id, r.definition);
                }
                return follow::follow(&client, &r.id, follow.options(format, true)?).await;
            }
            print_message(format, &r, |r| {
                format!(
                    "run {} {} ({}, attempt {}/{})\n",
                    r.id,
                    output::state_name(r.state),
                    r.definition,
                    r.attempt,
                    r.max_attempts
                )
            })?;
        }
        Cmd::Cancel { run, reason } => {
            let r = client
                .runs()
                .cancel_run(pb::CancelRunRequest {
                    run_id: run,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_message(format, &r, |r| {
                let state = output::state_name(r.state);
                if output::is_terminal(r.state) {
                    format!("run {} {state}\n", r.id)
                } else {
                    format!(
                        "run {} cancelling ({state} until its node stops it)\n",
                        r.id
                    )
                }
            })?;
        }
        Cmd::Retry { run, wait, follow } => {
            let r = client
                .runs()
                .retry_run(pb::RetryRunRequest { run_id: run })
                .await?
                .into_inner();
            if wait {
                if format == output::Format::Table && !follow.quiet {
                    eprintln!("[sked] run {} (attempt {})", r.id, r.attempt);
                }
                return follow::follow(&client, &r.id, follow.options(format, true)?).await;
            }
            print_message(format, &r, |r| {
                format!(
                    "run {} {} (attempt {}, retry of {})\n",
                    r.id,
                    output::state_name(r.state),
                    r.attempt,
                    r.retry_of
                )
            })?;
        }
        Cmd::Backfill {
            binding,
            from,
            to,
            dry_run,
        } => {
            let binding_id = resolve(&client, &binding).await?;
            let resp = client
                .runs()
                .backfill_runs(pb::BackfillRunsRequest {
                    binding_id,
                    start_time: Some(input::time("--from", &from)?),
                    end_time: Some(input::time("--to", &to)?),
                    dry_run,
                })
                .await?
                .into_inner();
            print_message(format, &resp, |r| {
                let mut t = Table::new(&["FIRE TIME", "RUN"]);
                for (i, at) in r.scheduled_times.iter().enumerate() {
                    t.row(vec![
                        output::local_time(&Some(*at)).into(),
                        r.run_ids.get(i).cloned().unwrap_or_default().into(),
                    ]);
                }
                let n = r.scheduled_times.len();
                let head = if dry_run {
                    format!("{n} fire times (dry run: nothing created)\n")
                } else {
                    format!("{} runs created\n", r.run_ids.len())
                };
                if n == 0 { head } else { head + &t.render() }
            })?;
        }
    }
    Ok(EXIT_OK)
}

/// Runs as a table.
pub fn runs_table(runs: &[pb::Run]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "DEFINITION",
        "STATE",
        "TRIGGER",
        "ATTEMPT",
        "SCHEDULED",
        "DURATION",
        "REASON",
    ]);
    for r in runs {
        let mut reason = r.reason.clone();
        if reason.chars().count() > 40 {
            reason = reason.chars().take(39).collect::<String>() + "…";
        }
        t.row(vec![
            r.id.clone().into(),
            r.definition.clone().into(),
            output::state_cell(r.state),
            trigger_name(r.trigger).into(),
            format!("{}/{}", r.attempt, r.max_attempts).into(),
            output::local_time(&r.scheduled_time).into(),
            output::run_duration(r).into(),
            reason.into(),
        ]);
    }
    t
}

fn trigger_name(t: i32) -> String {
    pb::RunTrigger::try_from(t)
        .map(|t| output::short(t.as_str_name(), "RUN_TRIGGER_").to_string())
        .unwrap_or_default()
}

fn details(r: &pb::Run) -> String {
    let mut v = Details::new();
    v.field("ID", r.id.as_str())
        .field("Tenant", r.tenant_id.as_str())
        .field("Binding", r.binding_id.as_str())
        .field("Definition", r.definition.as_str())
        .field("State", output::state_cell(r.state))
        .field("Reason", r.reason.as_str())
        .field("Trigger", trigger_name(r.trigger))
        .field("Attempt", format!("{}/{}", r.attempt, r.max_attempts))
        .field("Retry of", r.retry_of.as_str())
        .field("Scheduled", output::local_time(&r.scheduled_time))
        .field("Not before", output::local_time(&r.not_before))
        .field("Created", output::local_time(&r.create_time))
        .field("Started", output::local_time(&r.start_time))
        .field("Ended", output::local_time(&r.end_time))
        .field("Duration", output::run_duration(r))
        .field("Timeout", output::duration_opt(&r.timeout))
        .field("Node", r.node_id.as_str())
        .field(
            "Exit code",
            r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        );
    if let Some(e) = &r.error {
        v.field("Error", e.message.as_str())
            .field("Stderr", e.summary.as_str());
    }
    if let Some(p) = &r.progress {
        let mut text = format!("{:.0}%", p.percent);
        if p.total_steps > 0 {
            text.push_str(&format!(" step {}/{}", p.current_step, p.total_steps));
        }
        if !p.message.is_empty() {
            text.push_str(&format!(" {}", p.message));
        }
        v.field("Progress", text);
    }
    v.field("Params", output::struct_json(&r.params))
        .field("Result", output::struct_json(&r.result))
        .field("Idempotency key", r.idempotency_key.as_str());
    v.render()
}
