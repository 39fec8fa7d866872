//! `sked key`: API keys (AdminService key calls; admin role). A tenant
//! admin manages its own tenant's keys, a platform admin any.

use clap::Subcommand;

use super::connect::{Client, GlobalArgs};
use super::input::PageArgs;
use super::output::{self, Color, Table, colored, print_message};
use super::{EXIT_OK, Result};
use crate::proto::v1 as pb;

/// `sked key`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  sked key create 'acme ci' --role operator --for-tenant acme > acme-ci.token
  SKED_TOKEN_FILE=acme-ci.token sked binding list
  sked key revoke KEY_ID")]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Roles by short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// Read: get, list, tail, watch.
    Viewer,
    /// Viewer + bindings and runs.
    Operator,
    /// Operator + definitions, quotas, keys, audit log.
    Admin,
    /// Only the worker protocol.
    Worker,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List keys (never their secrets), oldest first.
    #[command(visible_alias = "ls")]
    List {
        /// Platform admins: only this tenant's keys.
        #[arg(long, value_name = "TENANT")]
        for_tenant: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Create a key. Its token is printed on stdout, once: it is stored
    /// nowhere.
    Create {
        /// Name, for people.
        name: String,
        /// What the key may do.
        #[arg(long, value_enum)]
        role: Role,
        /// The key's tenant; none for a platform key (platform admins only).
        #[arg(long, value_name = "TENANT")]
        for_tenant: Option<String>,
    },
    /// Revoke a key: it fails authentication from now on, on every node.
    Revoke {
        /// The key's id.
        key: String,
    },
}

fn role_name(r: i32) -> String {
    pb::Role::try_from(r)
        .map(|r| output::short(r.as_str_name(), "ROLE_").to_lowercase())
        .unwrap_or_default()
}

/// Runs `sked key ...`.
///
/// # Errors
/// What the API call answered.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let format = client.format();
    match a.cmd {
        Cmd::List { for_tenant, page } => {
            let resp = client
                .admin()
                .list_api_keys(pb::ListApiKeysRequest {
                    tenant_id: for_tenant.unwrap_or_default(),
                    page_size: page.size(),
                    page_token: page.token(),
                })
                .await?
                .into_inner();
            print_message(format, &resp, |r| {
                let mut t = Table::new(&["ID", "NAME", "ROLE", "TENANT", "CREATED", "REVOKED"]);
                for k in &r.keys {
                    let revoked = output::local_time(&k.revoke_time);
                    t.row(vec![
                        k.id.clone().into(),
                        k.name.clone().into(),
                        role_name(k.role).into(),
                        if k.tenant_id.is_empty() {
                            colored("(platform)", Some(Color::Dim))
                        } else {
                            k.tenant_id.clone().into()
                        },
                        output::local_time(&k.create_time).into(),
                        colored(revoked, Some(Color::Yellow)),
                    ]);
                }
                if t.is_empty() {
                    "No keys.\n".into()
                } else {
                    t.render()
                }
            })?;
            if format == output::Format::Table {
                output::next_page_hint(&resp.next_page_token);
            }
        }
        Cmd::Create {
            name,
            role,
            for_tenant,
        } => {
            let role = match role {
                Role::Viewer => pb::Role::Viewer,
                Role::Operator => pb::Role::Operator,
                Role::Admin => pb::Role::Admin,
                Role::Worker => pb::Role::Worker,
            };
            let r = client
                .admin()
                .create_api_key(pb::CreateApiKeyRequest {
                    name,
                    role: role as i32,
                    tenant_id: for_tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_message(format, &r, |r| {
                let k = r.key.clone().unwrap_or_default();
                let whose = if k.tenant_id.is_empty() {
                    "the platform".to_string()
                } else {
                    format!("tenant {}", k.tenant_id)
                };
                // People read the note, scripts take stdout: the token alone.
                eprintln!(
                    "key {} created: {} of {whose}; its token (below) is shown only this once",
                    k.id,
                    role_name(k.role)
                );
                format!("{}\n", r.token)
            })?;
        }
        Cmd::Revoke { key } => {
            let k = client
                .admin()
                .revoke_api_key(pb::RevokeApiKeyRequest { key_id: key })
                .await?
                .into_inner();
            print_message(format, &k, |k| {
                format!(
                    "key {} revoked at {}\n",
                    k.id,
                    output::local_time(&k.revoke_time)
                )
            })?;
        }
    }
    Ok(EXIT_OK)
}
