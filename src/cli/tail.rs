//! `sked tail`: follow one run live and exit with its outcome (the work is
//! in [`super::follow`]).

use super::binding::resolve;
use super::connect::{Client, GlobalArgs};
use super::follow::{self, FollowFlags};
use super::{Error, Result};
use crate::proto::v1 as pb;

/// `sked tail`.
#[derive(Debug, clap::Args)]
#[command(after_help = TAIL_HELP)]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    /// The run's id.
    #[arg(required_unless_present = "latest")]
    run: Option<String>,
    /// Follow the newest run of this binding (id or definition name)
    /// instead.
    #[arg(long, value_name = "BINDING", conflicts_with = "run")]
    latest: Option<String>,
    /// Print the events stored so far and stop, without waiting for the run
    /// to end (exit code: the outcome if it has ended, else 0).
    #[arg(long)]
    no_follow: bool,
    /// Skip the events up to this seq (what an earlier tail already showed).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    after_seq: i64,
    /// When the run fails and is retried, follow the retries too (to the
    /// final attempt).
    #[arg(long)]
    retries: bool,
    #[command(flatten)]
    follow: FollowFlags,
}

/// `sked tail --help`'s closing text.
const TAIL_HELP: &str = concat!(
    "The program's stdout lines go to stdout, its stderr lines to stderr; sked's own\n",
    "lines (state changes, system messages) to stderr as `[sked] ...`. A progress bar\n",
    "shows while the run reports progress (on a terminal). With -o json every event\n",
    "is one JSON line of sked.v1.RunEvent on stdout. A dropped connection is resumed\n",
    "from the last event seen, so no line is lost or repeated.\n\n",
    "Exit codes: 0 the run SUCCEEDED; 3 FAILED; 4 TIMED_OUT; 5 CANCELLED; 6 SKIPPED;\n",
    "7 sked could not be reached or the run does not exist; 1 any other error;\n",
    "2 a bad command line."
);

/// Runs `sked tail`.
///
/// # Errors
/// What the API answered (NOT_FOUND for an unknown run), or bad flags.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let run_id = match (a.run, a.latest) {
        // Fails fast (exit 7) when sked cannot be reached or has no such run.
        (Some(r), _) => {
            client
                .runs()
                .get_run(pb::GetRunRequest { run_id: r.clone() })
                .await?;
            r
        }
        (None, Some(b)) => {
            let binding_id = resolve(&client, &b).await?;
            let page = client
                .runs()
                .list_runs(pb::ListRunsRequest {
                    binding_id,
                    page_size: 1,
                    ..Default::default()
                })
                .await?
                .into_inner();
            match page.runs.into_iter().next() {
                Some(r) => r.id,
                None => {
                    return Err(Error::NotFound(format!(
                        "NOT_FOUND: binding {b:?} has no runs yet"
                    )));
                }
            }
        }
        (None, None) => return Err(Error::Input("name a run, or --latest BINDING".into())),
    };
    let mut opts = a.follow.options(client.format(), a.retries)?;
    opts.follow = !a.no_follow;
    opts.after_seq = a.after_seq;
    follow::follow(&client, &run_id, opts).await
}
