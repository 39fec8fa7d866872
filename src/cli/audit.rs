//! `sked audit`: the audit log (AdminService.ListAuditEvents; admin role):
//! one event per successful change, newest first.

use clap::Subcommand;

use super::connect::{Client, GlobalArgs};
use super::input::{self, PageArgs};
use super::output::{self, Table, print_message};
use super::{EXIT_OK, Result};
use crate::proto::v1 as pb;

/// `sked audit`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  sked audit list --for-tenant acme --since -1d
  sked audit list --method CreateBinding --target binding/ -o json")]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List audit events, newest first (-o json shows before/after).
    #[command(visible_alias = "ls")]
    List {
        /// Only this tenant's events (platform admins).
        #[arg(long, value_name = "TENANT")]
        for_tenant: Option<String>,
        /// Only calls made with this key id.
        #[arg(long, value_name = "KEY_ID")]
        key: Option<String>,
        /// Only this method, full or short (TriggerRun).
        #[arg(long)]
        method: Option<String>,
        /// Only targets starting with this, e.g. binding/ or run/0190.
        #[arg(long, value_name = "PREFIX")]
        target: Option<String>,
        /// Only events at or after this time (e.g. -1d).
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        since: Option<String>,
        /// Only events before this time.
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        until: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// Runs `sked audit ...`.
///
/// # Errors
/// What the API call answered, or bad flags.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let format = client.format();
    match a.cmd {
        Cmd::List {
            for_tenant,
            key,
            method,
            target,
            since,
            until,
            page,
        } => {
            let resp = client
                .admin()
                .list_audit_events(pb::ListAuditEventsRequest {
                    tenant_id: for_tenant.unwrap_or_default(),
                    key_id: key.unwrap_or_default(),
                    method: method.unwrap_or_default(),
                    target_prefix: target.unwrap_or_default(),
                    start_time: since
                        .as_deref()
                        .map(|t| input::time("--since", t))
                        .transpose()?,
                    end_time: until
                        .as_deref()
                        .map(|t| input::time("--until", t))
                        .transpose()?,
                    page_size: page.size(),
                    page_token: page.token(),
                })
                .await?
                .into_inner();
            print_message(format, &resp, |r| {
                let mut t = Table::new(&["TIME", "ACTOR", "TENANT", "METHOD", "TARGET"]);
                for e in &r.events {
                    let method = e.method.rsplit('/').next().unwrap_or(&e.method);
                    t.row(vec![
                        output::local_time(&e.time).into(),
                        e.actor.clone().into(),
                        e.tenant_id.clone().into(),
                        method.into(),
                        e.target.clone().into(),
                    ]);
                }
                if t.is_empty() {
                    "No audit events.\n".into()
                } else {
                    t.render()
                }
            })?;
            if format == output::Format::Table {
                output::next_page_hint(&resp.next_page_token);
            }
        }
    }
    Ok(EXIT_OK)
}
