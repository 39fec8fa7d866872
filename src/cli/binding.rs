//! `sked binding`: a tenant's bindings (BindingService). A binding is
//! named by its id or, since a tenant binds a definition at most once, by
//! its definition's name.

use clap::Subcommand;

use super::connect::{Client, GlobalArgs};
use super::def::{overlap_name, retry_summary};
use super::input::{self, PageArgs, ScheduleArgs};
use super::output::{self, Color, Details, Table, colored, print_message, yes_no};
use super::{EXIT_OK, Error, Result};
use crate::proto::v1 as pb;

/// `sked binding`.
#[derive(Debug, clap::Args)]
#[command(after_help = "BINDING is a binding id or the name of its definition.

Examples:
  sked --tenant acme binding create hello
  sked binding create nightly --cron '0 3 * * *' --tz Europe/Berlin --param region=eu
  sked binding pause nightly --note 'db maintenance' --for 1h
  sked binding resume nightly")]
pub struct Args {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the tenant's bindings, oldest first.
    #[command(visible_alias = "ls")]
    List {
        /// Only bindings of this definition.
        #[arg(long)]
        definition: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one binding, with what it will actually run with.
    Get {
        /// Binding id or definition name.
        binding: String,
    },
    /// Bind a definition for the tenant, optionally overriding its
    /// schedule and params.
    Create {
        /// The definition to bind (may come from -f instead).
        definition: Option<String>,
        #[command(flatten)]
        fields: Fields,
    },
    /// Change a binding: only the fields given are replaced (sent with the
    /// etag read just before, or --etag; ABORTED if it moved).
    Update {
        /// Binding id or definition name.
        binding: String,
        #[command(flatten)]
        fields: Fields,
        /// Go back to the definition's schedule.
        #[arg(long)]
        inherit_schedule: bool,
        /// Clear a policy override and inherit the definition's value again
        /// (repeatable): timeout, retry_policy, priority or max_active_runs.
        #[arg(long, value_name = "FIELD", value_parser = ["timeout", "retry_policy", "priority", "max_active_runs"])]
        inherit: Vec<String>,
        /// Apply only if the binding's etag is still this one.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Delete a binding: it stops firing at once; its runs stay as history.
    #[command(visible_alias = "rm")]
    Delete {
        /// Binding id or definition name.
        binding: String,
    },
    /// Pause a binding: no fires (and no catch-up of them) until resumed;
    /// `sked run trigger` still works.
    Pause {
        /// Binding id or definition name.
        binding: String,
        /// Why, for people.
        #[arg(long)]
        note: Option<String>,
        /// Resume by itself after this long.
        #[arg(long = "for", value_name = "DURATION", conflicts_with = "until")]
        for_: Option<String>,
        /// Resume by itself at this time.
        #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
        until: Option<String>,
    },
    /// Resume a paused binding from its next fire time after now.
    Resume {
        /// Binding id or definition name.
        binding: String,
    },
}

/// The fields of a binding as flags.
#[derive(Debug, Clone, clap::Args)]
struct Fields {
    /// A Binding as YAML or JSON in the API's field names (`-` for stdin);
    /// flags override its values.
    #[arg(short = 'f', long, value_name = "FILE")]
    file: Option<String>,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// Params merged over the definition's (JSON Merge Patch): a JSON
    /// object, or @file.
    #[arg(long, value_name = "JSON")]
    params: Option<String>,
    /// One param (repeatable); the value is JSON if it parses, else a string.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    param: Vec<String>,
    /// Fire only at or after this time.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    effective_from: Option<String>,
    /// Fire only at or before this time.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    effective_until: Option<String>,
    /// Whether it fires.
    #[arg(long, value_name = "BOOL")]
    enabled: Option<bool>,
    /// Override the definition's timeout per attempt (1s to 1d).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Override the definition's attempts in all (1-100; 1 = no retry;
    /// the other retry settings take their defaults).
    #[arg(long, value_name = "N")]
    max_attempts: Option<i32>,
    /// Override the definition's priority (higher is claimed first).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    priority: Option<i32>,
    /// Override the definition's cap on active runs under overlap ALLOW
    /// (1-1000; 0 = no cap).
    #[arg(long, value_name = "N")]
    max_active_runs: Option<u32>,
}

impl Fields {
    fn apply(&self, b: &mut pb::Binding) -> Result<Vec<&'static str>> {
        let mut paths = Vec::new();
        let base = b
            .schedule
            .clone()
            .or_else(|| b.effective.as_ref().and_then(|e| e.schedule.clone()));
        if let Some(s) = self.schedule.to_schedule(base.as_ref())? {
            b.schedule = Some(s);
            paths.push("schedule");
        }
        if let Some(p) = input::params(self.params.as_deref(), &self.param)? {
            b.params = Some(p);
            paths.push("params");
        }
        if let Some(t) = &self.effective_from {
            b.effective_from = Some(input::time("--effective-from", t)?);
            paths.push("effective_from");
        }
        if let Some(t) = &self.effective_until {
            b.effective_until = Some(input::time("--effective-until", t)?);
            paths.push("effective_until");
        }
        if let Some(e) = self.enabled {
            b.enabled = Some(e);
            paths.push("enabled");
        }
        if let Some(t) = &self.timeout {
            b.timeout = Some(input::duration("--timeout", t)?);
            paths.push("timeout");
        }
        if let Some(n) = self.max_attempts {
            b.retry_policy = Some(pb::RetryPolicy {
                max_attempts: n,
                ..Default::default()
            });
            paths.push("retry_policy");
        }
        if let Some(n) = self.priority {
            b.priority = Some(n);
            paths.push("priority");
        }
        if let Some(n) = self.max_active_runs {
            b.max_active_runs = Some(n);
            paths.push("max_active_runs");
        }
        Ok(paths)
    }
}

/// The id of the binding `reference` names: itself when it is a UUID, else
/// the tenant's binding of the definition of that name.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no binding of that definition.
pub async fn resolve(client: &Client, reference: &str) -> Result<String> {
    if uuid::Uuid::parse_str(reference).is_ok() {
        return Ok(reference.to_string());
    }
    let page = client
        .bindings()
        .list_bindings(pb::ListBindingsRequest {
            definition: reference.to_string(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    match page.bindings.into_iter().next() {
        Some(b) => Ok(b.id),
        None => Err(Error::NotFound(format!(
            "NOT_FOUND: no binding of definition {reference:?} for this tenant (a binding id or a bound definition's name is expected)"
        ))),
    }
}

/// Runs `sked binding ...`.
///
/// # Errors
/// What the API call answered, or bad flags.
pub async fn run(a: Args) -> Result<i32> {
    let client = Client::new(&a.global)?;
    let format = client.format();
    match a.cmd {
        Cmd::List { definition, page } => {
            let resp = client
                .bindings()
                .list_bindings(pb::ListBindingsRequest {
                    page_size: page.size(),
                    page_token: page.token(),
                    definition: definition.unwrap_or_default(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            print_message(format, &resp, |r| {
                let mut t = Table::new(&["ID", "DEFINITION", "SCHEDULE", "STATUS", "NEXT RUN"]);
                for b in &r.bindings {
                    let schedule = b
                        .effective
                        .as_ref()
                        .and_then(|e| e.schedule.clone())
                        .or_else(|| b.schedule.clone());
                    t.row(vec![
                        b.id.clone().into(),
                        b.definition.clone().into(),
                        output::schedule_summary(&schedule).into(),
                        status_cell(b),
                        output::local_time(&b.next_run_time).into(),
                    ]);
                }
                if t.is_empty() {
                    "No bindings.\n".into()
                } else {
                    t.render()
                }
            })?;
            if format == output::Format::Table {
                output::next_page_hint(&resp.next_page_token);
            }
        }
        Cmd::Get { binding } => {
            let id = resolve(&client, &binding).await?;
            let b = client
                .bindings()
                .get_binding(pb::GetBindingRequest { binding_id: id })
                .await?
                .into_inner();
            print_message(format, &b, details)?;
        }
        Cmd::Create { definition, fields } => {
            let mut b = match &fields.file {
                Some(f) => input::message_file::<pb::Binding>("--file", f, "sked.v1.Binding")?.0,
                None => pb::Binding::default(),
            };
            if let Some(d) = definition {
                b.definition = d;
            }
            if b.definition.is_empty() {
                return Err(Error::Input(
                    "name the definition to bind: `sked binding create DEFINITION`".into(),
                ));
            }
            fields.apply(&mut b)?;
            let b = client
                .bindings()
                .create_binding(pb::CreateBindingRequest { binding: Some(b) })
                .await?
                .into_inner();
            print_message(format, &b, |b| {
                format!(
                    "binding {} created ({} for {})\n",
                    b.id, b.definition, b.tenant_id
                )
            })?;
        }
        Cmd::Update {
            binding,
            fields,
            inherit_schedule,
            inherit,
            etag,
        } => {
            if inherit_schedule && fields.schedule.any() {
                return Err(Error::Input(
                    "--inherit-schedule and a schedule flag contradict each other".into(),
                ));
            }
            let id = resolve(&client, &binding).await?;
            let current = client
                .bindings()
                .get_binding(pb::GetBindingRequest {
                    binding_id: id.clone(),
                })
                .await?
                .into_inner();
            let mut paths: Vec<String> = Vec::new();
            let mut b = current.clone();
            if let Some(f) = &fields.file {
                let (file, names) =
                    input::message_file::<pb::Binding>("--file", f, "sked.v1.Binding")?;
                let mut cur = output::to_json(&b);
                let new = output::to_json(&file);
                for n in names {
                    if matches!(n.as_str(), "id" | "etag" | "definition" | "tenant_id") {
                        continue;
                    }
                    let camel = input::camel_case(&n);
                    match new.get(&camel) {
                        Some(v) => cur[&camel] = v.clone(),
                        None => {
                            if let Some(m) = cur.as_object_mut() {
                                m.remove(&camel);
                            }
                        }
                    }
                    paths.push(n);
                }
                b = output::from_json(cur)?;
            }
            paths.extend(fields.apply(&mut b)?.into_iter().map(String::from));
            if inherit_schedule {
                b.schedule = None;
                paths.push("schedule".into());
            }
            for f in inherit {
                match f.as_str() {
                    "timeout" => b.timeout = None,
                    "retry_policy" => b.retry_policy = None,
                    "priority" => b.priority = None,
                    _ => b.max_active_runs = None,
                }
                paths.push(f);
            }
            paths.sort();
            paths.dedup();
            if paths.is_empty() {
                return Err(Error::Input(
                    "nothing to change: give the fields to change as flags or in -f FILE".into(),
                ));
            }
            b.id = id;
            b.etag = etag.unwrap_or(current.etag);
            let b = client
                .bindings()
                .update_binding(pb::UpdateBindingRequest {
                    binding: Some(b),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner();
            print_message(format, &b, |b| format!("binding {} updated\n", b.id))?;
        }
        Cmd::Delete { binding } => {
            let id = resolve(&client, &binding).await?;
            let r = client
                .bindings()
                .delete_binding(pb::DeleteBindingRequest {
                    binding_id: id.clone(),
                })
                .await?
                .into_inner();
            print_message(format, &r, |_| format!("binding {id} deleted\n"))?;
        }
        Cmd::Pause {
            binding,
            note,
            for_,
            until,
        } => {
            let id = resolve(&client, &binding).await?;
            let expire_time = match (for_, until) {
                (Some(d), _) => {
                    let d = input::duration("--for", &d)?;
                    Some(input::time("--for", &format!("+{}s", d.seconds))?)
                }
                (None, Some(t)) => Some(input::time("--until", &t)?),
                (None, None) => None,
            };
            let b = client
                .bindings()
                .pause_binding(pb::PauseBindingRequest {
                    binding_id: id,
                    note: note.unwrap_or_default(),
                    expire_time,
                })
                .await?
                .into_inner();
            print_message(format, &b, |b| {
                let until = output::local_time(&b.pause_expire_time);
                if until.is_empty() {
                    format!("binding {} paused\n", b.id)
                } else {
                    format!("binding {} paused until {until}\n", b.id)
                }
            })?;
        }
        Cmd::Resume { binding } => {
            let id = resolve(&client, &binding).await?;
            let b = client
                .bindings()
                .resume_binding(pb::ResumeBindingRequest { binding_id: id })
                .await?
                .into_inner();
            print_message(format, &b, |b| {
                let next = output::local_time(&b.next_run_time);
                if next.is_empty() {
                    format!("binding {} resumed\n", b.id)
                } else {
                    format!("binding {} resumed; next run {next}\n", b.id)
                }
            })?;
        }
    }
    Ok(EXIT_OK)
}

fn status_cell(b: &pb::Binding) -> output::Cell {
    if !b.broken_reason.is_empty() {
        colored("broken", Some(Color::Red))
    } else if b.paused {
        colored("paused", Some(Color::Yellow))
    } else if !b.enabled.unwrap_or(true) {
        colored("disabled", Some(Color::Dim))
    } else {
        colored("active", Some(Color::Green))
    }
}

fn details(b: &pb::Binding) -> String {
    let mut v = Details::new();
    v.field("ID", b.id.as_str())
        .field("Tenant", b.tenant_id.as_str())
        .field("Definition", b.definition.as_str())
        .field("Status", status_cell(b));
    if b.paused {
        v.field("Pause note", b.pause_note.as_str())
            .field("Paused until", output::local_time(&b.pause_expire_time));
    }
    v.field("Broken", b.broken_reason.as_str());
    let own = |set: bool| if set { " (binding)" } else { " (definition)" };
    let e = b.effective.clone().unwrap_or_default();
    let schedule = output::schedule_summary(&e.schedule);
    if !schedule.is_empty() {
        v.field(
            "Schedule",
            format!("{schedule}{}", own(b.schedule.is_some())),
        );
    }
    v.field(
        "Params",
        format!(
            "{}{}",
            output::struct_json(&e.params),
            if b.params.is_some() {
                " (definition merged with binding)"
            } else {
                " (definition)"
            }
        ),
    )
    .field("Next run", output::local_time(&b.next_run_time))
    .field("Effective from", output::local_time(&b.effective_from))
    .field("Effective until", output::local_time(&b.effective_until))
    .field(
        "Retry",
        format!(
            "{}{}",
            retry_summary(&e.retry_policy),
            own(b.retry_policy.is_some())
        ),
    )
    .field(
        "Timeout",
        format!(
            "{}{}",
            match output::duration_opt(&e.timeout) {
                t if t.is_empty() => "no limit".to_string(),
                t => t,
            },
            own(b.timeout.is_some())
        ),
    )
    .field(
        "Overlap",
        format!("{} (definition)", overlap_name(e.overlap_policy)),
    )
    .field(
        "Priority",
        format!("{}{}", e.priority, own(b.priority.is_some())),
    )
    .field(
        "Max active runs",
        format!(
            "{}{}",
            match e.max_active_runs {
                0 => "no cap".to_string(),
                n => n.to_string(),
            },
            own(b.max_active_runs.is_some())
        ),
    )
    .field(
        "Notifications",
        format!(
            "{}{}",
            rules_summary(&e.notification_rules),
            own(e.overridden.iter().any(|f| f == "notification_rules"))
        ),
    )
    .field("Enabled", yes_no(b.enabled.unwrap_or(true)))
    .field("Created", output::local_time(&b.create_time))
    .field("Updated", output::local_time(&b.update_time))
    .field("Etag", b.etag.as_str());
    v.render()
}

/// The notification rules in force, one `name: trigger → url` per rule
/// (`none` when there are none).
fn rules_summary(rules: &[pb::NotificationRule]) -> String {
    if rules.is_empty() {
        return "none".into();
    }
    rules
        .iter()
        .map(|r| {
            let trigger = match pb::NotificationTrigger::try_from(r.trigger) {
                Ok(pb::NotificationTrigger::Failure) if r.every_attempt => {
                    "every failed attempt".to_string()
                }
                Ok(pb::NotificationTrigger::Failure) => "failure".to_string(),
                Ok(pb::NotificationTrigger::ConsecutiveFailures) => {
                    format!("{} failures in a row", r.consecutive_failures)
                }
                Ok(pb::NotificationTrigger::Recovery) => "recovery".to_string(),
                _ => "?".to_string(),
            };
            format!("{}: {trigger} → {}", r.name, r.url)
        })
        .collect::<Vec<_>>()
        .join("; ")
}
