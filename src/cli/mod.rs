//! The `sked` client subcommands: a gRPC client of a sked node like any
//! other (`def`, `binding`, `run`, `tail`, `watch`, `preview`, `stats`,
//! `status`, `quota`, `key`, `audit`, `apply`, `completions`). One file per resource; shared pieces:
//! [`connect`] (address, API key, tenant, TLS, the config file),
//! [`output`] (tables, `-o json|yaml`), [`input`] (durations, times,
//! params, schedules and message files) and [`follow`] (following a run to
//! its end, shared by `tail` and `run trigger --wait`).
//!
//! Nothing here reaches into the server's layers: every command is one or a
//! few API calls, so what the CLI can do any client can do (grpcurl, the
//! generated clients of any language).
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done; for `tail` / `run trigger --wait`: the run SUCCEEDED |
//! | 1 | sked refused the call (invalid argument, permission, precondition, ...) or another error |
//! | 2 | bad command line or input file (before anything was sent) |
//! | 3 | the run ended FAILED |
//! | 4 | the run ended TIMED_OUT |
//! | 5 | the run ended CANCELLED |
//! | 6 | the run was SKIPPED |
//! | 7 | could not reach sked, or what was named does not exist (`UNAVAILABLE`, `NOT_FOUND`) |

pub mod apply;
pub mod audit;
pub mod binding;
pub mod connect;
pub mod def;
pub mod follow;
pub mod input;
pub mod key;
pub mod output;
pub mod preview;
pub mod quota;
pub mod run;
pub mod stats;
pub mod status;
pub mod tail;
pub mod watch;

use clap::Subcommand;
use tonic::Code;

pub use connect::GlobalArgs;

/// Exit code: done (for a followed run: SUCCEEDED).
pub const EXIT_OK: i32 = 0;
/// Exit code: sked refused the call, or another error.
pub const EXIT_ERROR: i32 = 1;
/// Exit code: bad command line or input, nothing was sent.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the followed run ended FAILED.
pub const EXIT_FAILED: i32 = 3;
/// Exit code: the followed run ended TIMED_OUT.
pub const EXIT_TIMED_OUT: i32 = 4;
/// Exit code: the followed run ended CANCELLED.
pub const EXIT_CANCELLED: i32 = 5;
/// Exit code: the followed run was SKIPPED.
pub const EXIT_SKIPPED: i32 = 6;
/// Exit code: sked could not be reached, or the named object does not exist.
pub const EXIT_UNREACHABLE: i32 = 7;

/// The table of exit codes, for `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes: 0 the run SUCCEEDED; 3 FAILED; 4 TIMED_OUT; 5 CANCELLED; 6 SKIPPED;
7 sked could not be reached or the run does not exist; 1 any other error;
2 a bad command line.";

/// Client subcommands (flattened into `sked`'s own).
// Parsed once per process: the size of the flag structs does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Task definitions: list, get, create, update, delete.
    #[command(visible_alias = "definition")]
    Def(def::Args),
    /// A tenant's bindings: list, get, create, update, delete, pause, resume.
    Binding(binding::Args),
    /// Runs: list, get, trigger, cancel, retry, backfill.
    Run(run::Args),
    /// Follow one run's output live until it ends; exits with its outcome.
    #[command(after_help = EXIT_CODES_HELP)]
    Tail(tail::Args),
    /// Watch the tenant's live events across runs.
    Watch(watch::Args),
    /// Preview a schedule's next fire times (DST shifts marked).
    Preview(preview::Args),
    /// Run statistics of the tenant, a binding or a definition over a
    /// window: counts, success rate, duration and fire lag, a series.
    Stats(stats::Args),
    /// The scheduler's health: nodes, leader, backlog, fire lag.
    Status(status::Args),
    /// Tenant quotas and their use.
    Quota(quota::Args),
    /// API keys: list, create, revoke.
    Key(key::Args),
    /// The audit log of changes.
    Audit(audit::Args),
    /// Definitions as code: create / update definitions and bindings from a
    /// YAML file (--dry-run, --prune).
    Apply(apply::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
}

/// `sked completions`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "E.g. `sked completions bash > /etc/bash_completion.d/sked`, \
`sked completions zsh > \"${fpath[1]}/_sked\"`."
)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// Why a command failed. Every variant prints as one line ([`Error::line`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sked answered with an error status.
    #[error("{}", status_line(.0))]
    Status(#[from] tonic::Status),
    /// The address, TLS files or config file are unusable.
    #[error("{0}")]
    Connect(String),
    /// A flag or an input file is unusable.
    #[error("{0}")]
    Input(String),
    /// Something named does not exist (found out by the client).
    #[error("{0}")]
    NotFound(String),
    /// Writing the output failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The exit code of this error (module docs).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Status(s) => match s.code() {
                Code::NotFound | Code::Unavailable => EXIT_UNREACHABLE,
                _ => EXIT_ERROR,
            },
            Error::Connect(_) => EXIT_UNREACHABLE,
            Error::NotFound(_) => EXIT_UNREACHABLE,
            Error::Input(_) => EXIT_USAGE,
            Error::Io(_) => EXIT_ERROR,
        }
    }
}

/// Shorthand for the result of a command.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The canonical name of a gRPC status code (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One line for a status: the code, then each `BadRequest` field violation
/// as `field: reason` (or the message when there are none), the retry delay
/// of a `RetryInfo` and the request id of a `RequestInfo` when sent, and a
/// hint for the few errors a flag fixes.
pub fn status_line(s: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let details = s.get_error_details();
    let mut text = match details.bad_request() {
        Some(b) if !b.field_violations.is_empty() => b
            .field_violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; "),
        _ => s.message().to_string(),
    };
    if text.is_empty() {
        text = "(no message)".into();
    }
    if let Some(r) = details.retry_info()
        && let Some(d) = r.retry_delay
    {
        text.push_str(&format!(" (retry in {})", output::duration_std(d)));
    }
    if let Some(r) = details.request_info()
        && !text.contains(&r.request_id)
    {
        text.push_str(&format!(" (request id {})", r.request_id));
    }
    match s.code() {
        Code::Unavailable if !text.contains("database") => {
            let at = connect::ADDR
                .get()
                .map(String::as_str)
                .unwrap_or("its address");
            text = format!("could not reach sked at {at}: {text} (--addr / SKED_ADDR)");
        }
        Code::Unauthenticated => text = format!("{text} (--token-file, SKED_TOKEN)"),
        _ => {}
    }
    if text.contains("x-tenant-id") && !text.contains("SKED_TENANT") {
        text.push_str(" (--tenant / SKED_TENANT)");
    }
    let text = text.replace(['\n', '\r'], " ");
    format!("{}: {text}", code_name(s.code()))
}

/// Runs a client subcommand; returns the process exit code (module docs).
/// Errors are printed on stderr as one line `sked: <error>`.
pub async fn run(cmd: Command, bin: &mut clap::Command) -> i32 {
    let result = match cmd {
        Command::Def(a) => def::run(a).await,
        Command::Binding(a) => binding::run(a).await,
        Command::Run(a) => run::run(a).await,
        Command::Tail(a) => tail::run(a).await,
        Command::Watch(a) => watch::run(a).await,
        Command::Preview(a) => preview::run(a).await,
        Command::Stats(a) => stats::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Quota(a) => quota::run(a).await,
        Command::Key(a) => key::run(a).await,
        Command::Audit(a) => audit::run(a).await,
        Command::Apply(a) => apply::run(a).await,
        Command::Completions(a) => {
            clap_complete::generate(a.shell, bin, "sked", &mut std::io::stdout());
            Ok(EXIT_OK)
        }
    };
    match result {
        Ok(code) => code,
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("sked: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client part of `sked`'s command tree.
    fn tree() -> clap::Command {
        <Command as Subcommand>::augment_subcommands(clap::Command::new("sked"))
    }

    /// `--help` is complete: every client subcommand says what it does and
    /// every argument what it takes.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let here = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{here}: no about"));
                }
                for arg in sub.get_arguments() {
                    let id = arg.get_id().as_str();
                    if id != "help" && id != "version" && arg.get_help().is_none() {
                        missing.push(format!("{here}: {id} has no help"));
                    }
                }
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        let tree = tree();
        tree.clone().debug_assert();
        walk(&tree, "sked", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn errors_are_one_line_with_code_field_and_reason() {
        use tonic_types::{ErrorDetails, StatusExt};
        let s = tonic::Status::with_error_details(
            Code::InvalidArgument,
            "definition.schedule.cron.expression: field 2 (hour): 25 is out of range 0-23",
            ErrorDetails::with_bad_request_violation(
                "definition.schedule.cron.expression",
                "field 2 (hour): 25 is out of range 0-23",
            ),
        );
        assert_eq!(
            status_line(&s),
            "INVALID_ARGUMENT: definition.schedule.cron.expression: field 2 (hour): 25 is out of range 0-23"
        );
        let e = Error::Status(tonic::Status::not_found("run x not found\nsecond line"));
        assert_eq!(e.to_string(), "NOT_FOUND: run x not found second line");
        assert_eq!(e.exit_code(), EXIT_UNREACHABLE);
        let retry = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "too many changes",
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(1500))),
        );
        assert_eq!(
            status_line(&retry),
            "RESOURCE_EXHAUSTED: too many changes (retry in 1.5s)"
        );
    }
}
