//! `sked def`: task definitions (DefinitionService). Creating, updating and
//! deleting need a platform admin key.

use clap::Subcommand;

use super::connect::{Client, GlobalArgs};
use super::input::{self, Overlap, PageArgs, ScheduleArgs};
use super::output::{self, Details, Table, colored, print_message, yes_no};
use super::{EXIT_OK, Error, Result};
use crate::proto::v1 as pb;

/// `sked def`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  sked def create hello --every 2s -- sh -c 'echo hello from $SKED_TENANT_ID'
  sked def create nightly --cron '0 2 * * *' --tz Europe/Berlin --max-attempts 3 --backoff 30s -- ./report.sh
  sked def create -f definition.yaml        # a TaskDefinition in the API's field names
  sked def update nightly --timeout 10m --enabled false
  sked def get nightly -o yaml")]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List definitions, in name order.
    #[command(visible_alias = "ls")]
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one definition.
    Get {
        /// The definition's name.
        name: String,
    },
    /// Create a definition from flags and/or a file. The command to run
    /// goes after `--`.
    Create {
        /// The definition's name ([a-z0-9][a-z0-9._-]{0,127}); may come
        /// from -f instead.
        name: Option<String>,
        #[command(flatten)]
        fields: Fields,
    },
    /// Change a definition: only the fields given (flags, or the top-level
    /// fields a -f file sets) are replaced. Safe against concurrent changes:
    /// sent with the etag read just before (or --etag), ABORTED if it moved.
    Update {
        /// The definition's name.
        name: String,
        #[command(flatten)]
        fields: Fields,
        /// Apply only if the definition's etag is still this one.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Delete a definition (FAILED_PRECONDITION while bindings use it,
    /// unless --force; never a protected one).
    #[command(visible_alias = "rm")]
    Delete {
        /// The definition's name.
        name: String,
        /// Also delete its bindings (their runs stay as history).
        #[arg(long)]
        force: bool,
    },
}

/// Misfire modes by short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Misfire {
    /// One run for the latest missed fire time.
    RunOnce,
    /// One run per missed fire time.
    RunAll,
    /// No catch-up run.
    Skip,
}

/// The fields of a definition as flags.
#[derive(Debug, Clone, clap::Args)]
struct Fields {
    /// A TaskDefinition as YAML or JSON in the API's field names (`-` for
    /// stdin); flags override its values.
    #[arg(short = 'f', long, value_name = "FILE")]
    file: Option<String>,
    /// Name for people.
    #[arg(long)]
    display_name: Option<String>,
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// A label (repeatable); replaces all labels on update.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Handler: call this URL (params as the JSON body).
    #[arg(long, value_name = "URL", help_heading = "Handler", conflicts_with_all = ["event", "worker"])]
    http: Option<String>,
    /// HTTP method of --http (default POST).
    #[arg(long, requires = "http", help_heading = "Handler")]
    method: Option<String>,
    /// HTTP header of --http (repeatable); `${env:SKED_SECRET_X}` is resolved
    /// on the node.
    #[arg(
        long = "header",
        value_name = "NAME=VALUE",
        requires = "http",
        help_heading = "Handler"
    )]
    headers: Vec<String>,
    /// Handler: publish a `fired` event with the params and succeed.
    #[arg(long, help_heading = "Handler", conflicts_with = "worker")]
    event: bool,
    /// Handler: hand runs to workers polling this queue.
    #[arg(long, value_name = "QUEUE", help_heading = "Handler")]
    worker: Option<String>,
    /// Environment variable of the command (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", help_heading = "Handler")]
    env: Vec<String>,
    /// Working directory of the command.
    #[arg(long, value_name = "DIR", help_heading = "Handler")]
    workdir: Option<String>,
    /// Exit code of the command that is never retried (repeatable).
    #[arg(
        long = "non-retryable-exit-code",
        value_name = "CODE",
        help_heading = "Handler"
    )]
    non_retryable: Vec<i32>,
    /// Handler: the program and its arguments, after `--` (no shell unless
    /// the program is one).
    #[arg(last = true, value_name = "COMMAND", help_heading = "Handler")]
    command: Vec<String>,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// Default params: a JSON object, or @file.
    #[arg(long, value_name = "JSON", help_heading = "Policy")]
    params: Option<String>,
    /// One default param (repeatable); the value is JSON if it parses, else
    /// a string.
    #[arg(long = "param", value_name = "KEY=VALUE", help_heading = "Policy")]
    param: Vec<String>,
    /// Wall-clock limit per attempt (1s to 1d).
    #[arg(long, value_name = "DURATION", help_heading = "Policy")]
    timeout: Option<String>,
    /// Attempts in all (1 = no retry).
    #[arg(long, help_heading = "Policy")]
    max_attempts: Option<i32>,
    /// Delay before the first retry.
    #[arg(long, value_name = "DURATION", help_heading = "Policy")]
    backoff: Option<String>,
    /// Growth of the delay per attempt (default 2).
    #[arg(long, help_heading = "Policy")]
    backoff_coefficient: Option<f64>,
    /// Cap on the delay.
    #[arg(long, value_name = "DURATION", help_heading = "Policy")]
    max_backoff: Option<String>,
    /// What a fire does while the previous run is active.
    #[arg(long, value_enum, help_heading = "Policy")]
    overlap: Option<Overlap>,
    /// How far back missed fires are caught up (default 60s).
    #[arg(long, value_name = "DURATION", help_heading = "Policy")]
    catchup_window: Option<String>,
    /// How missed fires inside the window run.
    #[arg(long, value_enum, help_heading = "Policy")]
    misfire: Option<Misfire>,
    /// Claim order among waiting runs, higher first.
    #[arg(long, allow_hyphen_values = true, help_heading = "Policy")]
    priority: Option<i32>,
    /// Whether it fires for anyone.
    #[arg(long, value_name = "BOOL", help_heading = "Policy")]
    enabled: Option<bool>,
    /// Deletion protection (a built-in: only disabled, never deleted).
    #[arg(long, value_name = "BOOL", help_heading = "Policy")]
    protected: Option<bool>,
    /// Only these tenants may bind it (repeatable).
    #[arg(
        long = "allow-tenant",
        value_name = "TENANT",
        help_heading = "Policy",
        conflicts_with = "all_tenants"
    )]
    allow_tenants: Vec<String>,
    /// Every tenant may bind it (the default).
    #[arg(long, help_heading = "Policy")]
    all_tenants: bool,
    /// Cap on each run's stored output, in bytes.
    #[arg(long, value_name = "BYTES", help_heading = "Policy")]
    max_output_bytes: Option<u64>,
}

fn map(flag: &str, pairs: &[String]) -> Result<std::collections::HashMap<String, String>> {
    pairs.iter().map(|p| input::key_value(flag, p)).collect()
}

impl Fields {
    /// Sets what the flags give on `d`; returns the update-mask paths.
    fn apply(&self, d: &mut pb::TaskDefinition) -> Result<Vec<&'static str>> {
        use pb::task_definition::Handler;
        let mut paths = Vec::new();
        if let Some(v) = &self.display_name {
            d.display_name = v.clone();
            paths.push("display_name");
        }
        if let Some(v) = &self.description {
            d.description = v.clone();
            paths.push("description");
        }
        if !self.labels.is_empty() {
            d.labels = map("--label", &self.labels)?;
            paths.push("labels");
        }
        let handler = if let Some(url) = &self.http {
            Some(Handler::Http(pb::HttpHandler {
                method: self.method.clone().unwrap_or_default(),
                url: url.clone(),
                headers: map("--header", &self.headers)?,
                timeout: None,
            }))
        } else if self.event {
            Some(Handler::Event(pb::EventHandler {}))
        } else if let Some(q) = &self.worker {
            Some(Handler::Worker(pb::WorkerHandler {
                queue: q.clone(),
                schedule_to_start_timeout: None,
            }))
        } else if let Some((program, args)) = self.command.split_first() {
            Some(Handler::Command(pb::CommandHandler {
                program: program.clone(),
                args: args.to_vec(),
                env: map("--env", &self.env)?,
                working_dir: self.workdir.clone().unwrap_or_default(),
                non_retryable_exit_codes: self.non_retryable.clone(),
            }))
        } else {
            None
        };
        let command_extras =
            !self.env.is_empty() || self.workdir.is_some() || !self.non_retryable.is_empty();
        match handler {
            Some(h) => {
                if command_extras && !matches!(h, Handler::Command(_)) {
                    return Err(Error::Input(
                        "--env, --workdir and --non-retryable-exit-code go with a command (after --)"
                            .into(),
                    ));
                }
                d.handler = Some(h);
                paths.push("command");
            }
            None if command_extras => match &mut d.handler {
                Some(Handler::Command(c)) => {
                    if !self.env.is_empty() {
                        c.env = map("--env", &self.env)?;
                    }
                    if let Some(w) = &self.workdir {
                        c.working_dir = w.clone();
                    }
                    if !self.non_retryable.is_empty() {
                        c.non_retryable_exit_codes = self.non_retryable.clone();
                    }
                    paths.push("command");
                }
                _ => {
                    return Err(Error::Input(
                        "--env, --workdir and --non-retryable-exit-code go with a command (after --)"
                            .into(),
                    ));
                }
            },
            None => {}
        }
        if let Some(s) = self.schedule.to_schedule(d.schedule.as_ref())? {
            d.schedule = Some(s);
            paths.push("schedule");
        }
        if let Some(p) = input::params(self.params.as_deref(), &self.param)? {
            d.params = Some(p);
            paths.push("params");
        }
        if let Some(t) = &self.timeout {
            d.timeout = Some(input::duration("--timeout", t)?);
            paths.push("timeout");
        }
        if self.max_attempts.is_some()
            || self.backoff.is_some()
            || self.backoff_coefficient.is_some()
            || self.max_backoff.is_some()
        {
            let r = d.retry_policy.get_or_insert_with(Default::default);
            if let Some(n) = self.max_attempts {
                r.max_attempts = n;
            }
            if let Some(b) = &self.backoff {
                r.initial_backoff = Some(input::duration("--backoff", b)?);
            }
            if let Some(c) = self.backoff_coefficient {
                r.backoff_coefficient = c;
            }
            if let Some(m) = &self.max_backoff {
                r.max_backoff = Some(input::duration("--max-backoff", m)?);
            }
            paths.push("retry_policy");
        }
        if let Some(o) = self.overlap {
            d.overlap_policy = pb::OverlapPolicy::from(o) as i32;
            paths.push("overlap_policy");
        }
        if self.catchup_window.is_some() || self.misfire.is_some() {
            let m = d.misfire_policy.get_or_insert_with(Default::default);
            if let Some(w) = &self.catchup_window {
                m.catchup_window = Some(input::duration("--catchup-window", w)?);
            }
            if let Some(mode) = self.misfire {
                m.mode = match mode {
                    Misfire::RunOnce => pb::MisfireMode::RunOnce,
                    Misfire::RunAll => pb::MisfireMode::RunAll,
                    Misfire::Skip => pb::MisfireMode::Skip,
                } as i32;
            }
            paths.push("misfire_policy");
        }
        if let Some(p) = self.priority {
            d.priority = p;
            paths.push("priority");
        }
        if let Some(e) = self.enabled {
            d.enabled = Some(e);
            paths.push("enabled");
        }
        if let Some(p) = self.protected {
            d.deletion_protection = p;
            paths.push("deletion_protection");
        }
        if !self.allow_tenants.is_empty() {
            d.tenant_scope = Some(pb::TenantScope {
                scope: Some(pb::tenant_scope::Scope::TenantList(pb::TenantList {
                    tenant_ids: self.allow_tenants.clone(),
                })),
            });
            paths.push("tenant_scope");
        } else if self.all_tenants {
            d.tenant_scope = Some(pb::TenantScope {
                scope: Some(pb::tenant_scope::Scope::AllTenants(true)),
            });
            paths.push("tenant_scope");
        }
        if let Some(m) = self.max_output_bytes {
            d.max_output_bytes = Some(m);
            paths.push("max_output_bytes");
        }
        Ok(paths)
    }

    /// The -f file's definition and its top-level fields as update paths.
    fn file(&self) -> Result<Option<(pb::TaskDefinition, Vec<String>)>> {
        let Some(f) = &self.file else {
            return Ok(None);
        };
        let (d, fields) =
            input::message_file::<pb::TaskDefinition>("--file", f, "sked.v1.TaskDefinition")?;
        Ok(Some((d, fields)))
    }
}

/// Runs `sked def ...`.
///
/// # Errors
/// What the API call answered, or bad flags.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let format = client.format();
    match a.cmd {
        Cmd::List { page } => {
            let resp = client
                .defs()
                .list_definitions(pb::ListDefinitionsRequest {
                    page_size: page.size(),
                    page_token: page.token(),
                })
                .await?
                .into_inner();
            print_message(format, &resp, |r| {
                let mut t = Table::new(&["NAME", "HANDLER", "SCHEDULE", "ENABLED", "UPDATED"]);
                for d in &r.definitions {
                    let enabled = d.enabled.unwrap_or(true);
                    t.row(vec![
                        d.name.clone().into(),
                        handler_summary(&d.handler, 48).into(),
                        output::schedule_summary(&d.schedule).into(),
                        colored(yes_no(enabled), (!enabled).then_some(output::Color::Dim)),
                        output::local_time(&d.update_time).into(),
                    ]);
                }
                if t.is_empty() {
                    "No definitions.\n".into()
                } else {
                    t.render()
                }
            })?;
            if format == output::Format::Table {
                output::next_page_hint(&resp.next_page_token);
            }
        }
        Cmd::Get { name } => {
            let d = client
                .defs()
                .get_definition(pb::GetDefinitionRequest { name })
                .await?
                .into_inner();
            print_message(format, &d, details)?;
        }
        Cmd::Create { name, fields } => {
            let mut d = match fields.file()? {
                Some((d, _)) => d,
                None => pb::TaskDefinition::default(),
            };
            if let Some(n) = name {
                d.name = n;
            }
            if d.name.is_empty() {
                return Err(Error::Input(
                    "a definition needs a name: `sked def create NAME ...` or `name:` in -f".into(),
                ));
            }
            fields.apply(&mut d)?;
            if d.handler.is_none() {
                return Err(Error::Input(
                    "a definition needs a handler: a command after `--`, --http URL, --event or --worker QUEUE"
                        .into(),
                ));
            }
            if d.schedule.is_none() {
                return Err(Error::Input(
                    "a definition needs a schedule: --cron, --every, --daily, --at, --manual or --schedule"
                        .into(),
                ));
            }
            let d = client
                .defs()
                .create_definition(pb::CreateDefinitionRequest {
                    definition: Some(d),
                })
                .await?
                .into_inner();
            print_message(format, &d, |d| format!("definition {} created\n", d.name))?;
        }
        Cmd::Update { name, fields, etag } => {
            let current = client
                .defs()
                .get_definition(pb::GetDefinitionRequest { name: name.clone() })
                .await?
                .into_inner();
            let mut paths: Vec<String> = Vec::new();
            let mut d = match fields.file()? {
                Some((file_def, file_fields)) => {
                    if !file_def.name.is_empty() && file_def.name != name {
                        return Err(Error::Input(format!(
                            "-f names definition {:?}, not {name:?}",
                            file_def.name
                        )));
                    }
                    let (d, p) = overlay(&current, &file_def, &file_fields)?;
                    paths.extend(p);
                    d
                }
                None => current.clone(),
            };
            paths.extend(fields.apply(&mut d)?.into_iter().map(String::from));
            paths.sort();
            paths.dedup();
            if paths.is_empty() {
                return Err(Error::Input(
                    "nothing to change: give the fields to change as flags or in -f FILE".into(),
                ));
            }
            d.name = name;
            d.etag = etag.unwrap_or(current.etag);
            let d = client
                .defs()
                .update_definition(pb::UpdateDefinitionRequest {
                    definition: Some(d),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner();
            print_message(format, &d, |d| format!("definition {} updated\n", d.name))?;
        }
        Cmd::Delete { name, force } => {
            let r = client
                .defs()
                .delete_definition(pb::DeleteDefinitionRequest {
                    name: name.clone(),
                    force,
                })
                .await?
                .into_inner();
            print_message(format, &r, |_| format!("definition {name} deleted\n"))?;
        }
    }
    Ok(EXIT_OK)
}

/// The handler's oneof keys, which all replace the handler (path `command`).
const HANDLER_FIELDS: [&str; 4] = ["command", "http", "event", "worker"];

/// `current` with the top-level `fields` of `file` put over it; returns it
/// and the update paths.
fn overlay(
    current: &pb::TaskDefinition,
    file: &pb::TaskDefinition,
    fields: &[String],
) -> Result<(pb::TaskDefinition, Vec<String>)> {
    let mut cur = output::to_json(current);
    let new = output::to_json(file);
    let (Some(cur_map), Some(new_map)) = (cur.as_object_mut(), new.as_object()) else {
        return Err(Error::Input("-f: expected a mapping".into()));
    };
    let mut paths = Vec::new();
    for f in fields {
        if f == "name" || f == "etag" {
            continue;
        }
        let camel = input::camel_case(f);
        if HANDLER_FIELDS.contains(&f.as_str()) {
            for h in HANDLER_FIELDS {
                cur_map.remove(h);
            }
            paths.push("command".to_string());
        } else {
            paths.push(f.clone());
        }
        match new_map.get(&camel) {
            Some(v) => cur_map.insert(camel, v.clone()),
            None => cur_map.remove(&camel),
        };
    }
    let d = output::from_json(cur)?;
    Ok((d, paths))
}

/// A short form of a handler, at most `max` characters.
pub fn handler_summary(h: &Option<pb::task_definition::Handler>, max: usize) -> String {
    use pb::task_definition::Handler;
    let text = match h {
        Some(Handler::Command(c)) => {
            let mut words = vec![quote(&c.program)];
            words.extend(c.args.iter().map(|a| quote(a)));
            words.join(" ")
        }
        Some(Handler::Http(h)) => {
            let m = if h.method.is_empty() {
                "POST"
            } else {
                &h.method
            };
            format!("{m} {}", h.url)
        }
        Some(Handler::Event(_)) => "event".into(),
        Some(Handler::Worker(w)) => format!("worker queue={}", w.queue),
        Some(Handler::Workflow(w)) => format!("workflow steps={}", w.steps.len()),
        None => String::new(),
    };
    if text.chars().count() > max {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// A word as a shell would need it.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A retry policy in words.
pub fn retry_summary(r: &Option<pb::RetryPolicy>) -> String {
    let Some(r) = r else {
        return String::new();
    };
    if r.max_attempts <= 1 {
        return "no retry".into();
    }
    let mut text = format!("{} attempts", r.max_attempts);
    if let Some(b) = r.initial_backoff {
        text.push_str(&format!(", backoff {}", output::duration_std(b)));
        let c = if r.backoff_coefficient == 0.0 {
            2.0
        } else {
            r.backoff_coefficient
        };
        text.push_str(&format!(" ×{c}"));
    }
    if let Some(m) = r.max_backoff {
        text.push_str(&format!(" ≤ {}", output::duration_std(m)));
    }
    text
}

/// An overlap policy's short name.
pub fn overlap_name(o: i32) -> String {
    pb::OverlapPolicy::try_from(o)
        .map(|o| output::short(o.as_str_name(), "OVERLAP_POLICY_").to_string())
        .unwrap_or_default()
        .replace("UNSPECIFIED", "SKIP")
}

fn details(d: &pb::TaskDefinition) -> String {
    let mut v = Details::new();
    v.field("Name", d.name.as_str())
        .field("Display name", d.display_name.as_str())
        .field("Description", d.description.as_str());
    let mut labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    v.field("Labels", labels.join(", "))
        .field("Handler", handler_summary(&d.handler, 200))
        .field("Schedule", output::schedule_summary(&d.schedule))
        .field("Params", output::struct_json(&d.params))
        .field("Retry", retry_summary(&d.retry_policy))
        .field("Timeout", output::duration_opt(&d.timeout))
        .field("Overlap", overlap_name(d.overlap_policy));
    if let Some(m) = &d.misfire_policy {
        let mode = pb::MisfireMode::try_from(m.mode)
            .map(|m| output::short(m.as_str_name(), "MISFIRE_MODE_").to_string())
            .unwrap_or_default()
            .replace("UNSPECIFIED", "RUN_ONCE");
        let window = m
            .catchup_window
            .map(output::duration_std)
            .unwrap_or_else(|| "60s".into());
        v.field("Misfire", format!("catch up {window}, {mode}"));
    }
    let enabled = d.enabled.unwrap_or(true);
    v.field("Priority", d.priority.to_string())
        .field(
            "Enabled",
            colored(yes_no(enabled), (!enabled).then_some(output::Color::Yellow)),
        )
        .field("Protected", yes_no(d.deletion_protection));
    let scope = match d.tenant_scope.as_ref().and_then(|s| s.scope.as_ref()) {
        Some(pb::tenant_scope::Scope::TenantList(l)) => l.tenant_ids.join(", "),
        _ => "all tenants".into(),
    };
    v.field("Tenants", scope)
        .field(
            "Max output",
            d.max_output_bytes
                .map(|b| format!("{b} bytes"))
                .unwrap_or_default(),
        )
        .field("Created", output::local_time(&d.create_time))
        .field("Updated", output::local_time(&d.update_time))
        .field("Etag", d.etag.as_str());
    v.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_shown_as_a_shell_would_take_them() {
        let h = Some(pb::task_definition::Handler::Command(pb::CommandHandler {
            program: "sh".into(),
            args: vec!["-c".into(), "echo it's".into()],
            ..Default::default()
        }));
        assert_eq!(handler_summary(&h, 100), r"sh -c 'echo it'\''s'");
        assert_eq!(handler_summary(&h, 8), "sh -c '…");
    }

    #[test]
    fn a_file_overlays_only_the_fields_it_names() {
        let current = pb::TaskDefinition {
            name: "a".into(),
            description: "old".into(),
            priority: 5,
            handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
            ..Default::default()
        };
        let file = pb::TaskDefinition {
            name: "a".into(),
            handler: Some(pb::task_definition::Handler::Worker(pb::WorkerHandler {
                queue: "q".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let (d, paths) = overlay(
            &current,
            &file,
            &["worker".into(), "priority".into(), "name".into()],
        )
        .unwrap();
        assert_eq!(paths, vec!["command", "priority"]);
        assert_eq!(d.priority, 0, "a field the file sets to its default");
        assert_eq!(d.description, "old", "a field the file leaves out");
        assert!(matches!(
            d.handler,
            Some(pb::task_definition::Handler::Worker(_))
        ));
    }
}
