//! `sked quota`: a tenant's limits and its use of them (AdminService quota
//! calls). Setting needs a platform admin key.

use clap::Subcommand;

use super::connect::{Client, GlobalArgs};
use super::output::{Color, Details, colored, print_message};
use super::{EXIT_OK, Error, Result};
use crate::proto::v1 as pb;

/// `sked quota`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "TENANT defaults to --tenant / SKED_TENANT (or a tenant key's own).

Examples:
  sked quota set acme --max-concurrent-runs 2 --max-runs-per-hour 100 --max-bindings 50
  sked quota set acme --max-runs-per-hour unlimited
  sked quota usage acme"
)]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show a tenant's limits (unset = unlimited).
    Get {
        /// The tenant.
        tenant: Option<String>,
    },
    /// Change a tenant's limits: the ones given change, the others stay.
    /// Takes effect at once.
    Set {
        /// The tenant.
        tenant: Option<String>,
        /// Runs executing at once (a number, or `unlimited`).
        #[arg(long, value_name = "N|unlimited", value_parser = limit)]
        max_concurrent_runs: Option<Limit>,
        /// First attempts per rolling hour (a number, or `unlimited`).
        #[arg(long, value_name = "N|unlimited", value_parser = limit)]
        max_runs_per_hour: Option<Limit>,
        /// Bindings (a number, or `unlimited`).
        #[arg(long, value_name = "N|unlimited", value_parser = limit)]
        max_bindings: Option<Limit>,
    },
    /// How much of its quota a tenant uses now, and a verdict.
    Usage {
        /// The tenant.
        tenant: Option<String>,
    },
}

/// A limit flag's value: a number, or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(Option<i32>);

fn limit(s: &str) -> std::result::Result<Limit, String> {
    if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    s.parse::<i32>()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("{s:?} is neither a number nor `unlimited`"))
}

fn show_limit(l: Option<i32>) -> String {
    l.map_or_else(|| "unlimited".to_string(), |n| n.to_string())
}

fn quota_details(q: &pb::TenantQuota) -> String {
    let mut v = Details::new();
    v.field("Tenant", q.tenant_id.as_str())
        .field("Max concurrent runs", show_limit(q.max_concurrent_runs))
        .field("Max runs per hour", show_limit(q.max_runs_per_hour))
        .field("Max bindings", show_limit(q.max_bindings));
    v.render()
}

/// Runs `sked quota ...`.
///
/// # Errors
/// What the API call answered.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let format = client.format();
    match a.cmd {
        Cmd::Get { tenant } => {
            let q = client
                .admin()
                .get_tenant_quota(pb::GetTenantQuotaRequest {
                    tenant_id: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_message(format, &q, quota_details)?;
        }
        Cmd::Set {
            tenant,
            max_concurrent_runs,
            max_runs_per_hour,
            max_bindings,
        } => {
            let tenant = tenant
                .or_else(|| client.settings.tenant.clone())
                .ok_or_else(|| {
                    Error::Input("name the tenant: `sked quota set TENANT ...`".into())
                })?;
            let mut q = client
                .admin()
                .get_tenant_quota(pb::GetTenantQuotaRequest {
                    tenant_id: tenant.clone(),
                })
                .await?
                .into_inner();
            q.tenant_id = tenant;
            if let Some(Limit(l)) = max_concurrent_runs {
                q.max_concurrent_runs = l;
            }
            if let Some(Limit(l)) = max_runs_per_hour {
                q.max_runs_per_hour = l;
            }
            if let Some(Limit(l)) = max_bindings {
                q.max_bindings = l;
            }
            let q = client
                .admin()
                .set_tenant_quota(pb::SetTenantQuotaRequest { quota: Some(q) })
                .await?
                .into_inner();
            print_message(format, &q, quota_details)?;
        }
        Cmd::Usage { tenant } => {
            let u = client
                .admin()
                .get_quota_usage(pb::GetQuotaUsageRequest {
                    tenant_id: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_message(format, &u, |u| {
                let q = u.quota.clone().unwrap_or_default();
                let of = |n: i64, l: Option<i32>| match l {
                    Some(l) => format!("{n} of {l}"),
                    None => n.to_string(),
                };
                let health = pb::QuotaHealth::try_from(u.health).unwrap_or_default();
                let (name, color) = match health {
                    pb::QuotaHealth::Ok => ("OK", Color::Green),
                    pb::QuotaHealth::NearLimit => ("NEAR_LIMIT", Color::Yellow),
                    pb::QuotaHealth::Throttled => ("THROTTLED", Color::Red),
                    pb::QuotaHealth::Unspecified => ("", Color::Dim),
                };
                let mut v = Details::new();
                v.field("Tenant", u.tenant_id.as_str())
                    .field("Health", colored(name, Some(color)))
                    .field("Running", of(u.running_runs, q.max_concurrent_runs))
                    .field("Queued", u.queued_runs.to_string())
                    .field("Throttled now", u.throttled_runs.to_string())
                    .field("Runs last hour", of(u.runs_last_hour, q.max_runs_per_hour))
                    .field("Throttled last hour", u.throttled_last_hour.to_string())
                    .field("Skipped last hour", u.skipped_last_hour.to_string())
                    .field("Bindings", of(u.bindings, q.max_bindings));
                v.render()
            })?;
        }
    }
    Ok(EXIT_OK)
}
