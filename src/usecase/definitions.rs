//! Definitions: the tasks platform teams publish. Creating, reading,
//! changing (with what bindings inherit following at once) and deleting
//! them (with their bindings' runs), and previewing a schedule.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Actor, Core, Error, Page, Result, Target, audit, begin, commit, record};
use crate::db;
use crate::domain::RunReason;
use crate::domain::schedule::CRON_LAST_YEAR;
use crate::domain::{
    Definition, FieldViolation, Handler, MisfirePolicy, OverlapPolicy, RetryPolicy, Schedule,
    ScheduleKind, TenantScope, effective_schedule, merge_params, validate_merged_params,
};

/// Most fire times one PreviewSchedule returns.
pub const MAX_PREVIEW: i32 = 1000;
/// Fire times a PreviewSchedule returns when the caller asks for none.
pub const DEFAULT_PREVIEW: i32 = 10;

/// Publishes `def` (CreateDefinition). The caller has checked its shape
/// (name, schedule, policies, params size, output cap); `create_time`,
/// `update_time` and `version` are set here (now, now, 1). Returns the
/// stored definition.
///
/// # Errors
/// `AlreadyExists` when a definition of that name exists, database errors.
pub async fn create(core: &Core, actor: Actor<'_>, mut def: Definition) -> Result<Definition> {
    let now = core.clock.now();
    def.create_time = now;
    def.update_time = now;
    def.version = 1;
    let target = Target::new("definition", &def.name);
    let mut tx = begin(core, &target).await?;
    check_step_definitions(&mut tx, &def, &target).await?;
    db::definitions::definition_insert(&mut *tx, &def)
        .await
        .map_err(Error::on(&target))?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        None,
        format!("definition/{}", def.name),
        None,
        Some(audit::definition(&def)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    tracing::info!(definition = %def.name, "definition created");
    Ok(def)
}

/// Checks the definitions a workflow's steps run (`definition` steps):
/// each exists, is not a workflow and is not `def` itself.
///
/// # Errors
/// `Invalid` on `definition.workflow.steps[i].definition`; database errors.
async fn check_step_definitions(
    tx: &mut sqlx::PgConnection,
    def: &Definition,
    target: &Target,
) -> Result<()> {
    let Handler::Workflow(w) = &def.handler else {
        return Ok(());
    };
    for (i, s) in w.steps.iter().enumerate() {
        let Some(name) = &s.definition else { continue };
        let field = format!("definition.workflow.steps[{i}].definition");
        if *name == def.name {
            return Err(Error::Invalid(FieldViolation::new(
                field,
                "a workflow cannot run itself as a step",
            )));
        }
        match db::definitions::definition_get(&mut *tx, name, None).await {
            Ok(d) if matches!(d.handler, Handler::Workflow(_)) => {
                return Err(Error::Invalid(FieldViolation::new(
                    field,
                    format!(
                        "definition {name:?} is a workflow; a step cannot be one (depth at most 1)"
                    ),
                )));
            }
            Ok(_) => {}
            Err(db::Error::NotFound) => {
                return Err(Error::Invalid(FieldViolation::new(
                    field,
                    format!("no definition {name:?}"),
                )));
            }
            Err(e) => return Err(Error::db(e, target)),
        }
    }
    Ok(())
}

/// Definition `name` as `viewer` sees it: a tenant (`Some`, the caller's
/// own tenant for a tenant key) sees only definitions whose tenant scope
/// includes it; `None` (platform) sees all.
///
/// # Errors
/// `NotFound` (also outside the viewer's scope), `Corrupt` when its stored
/// data cannot be read, database errors.
pub async fn get(core: &Core, viewer: Option<&str>, name: &str) -> Result<Definition> {
    db::definitions::definition_get(&core.pool, name, viewer)
        .await
        .map_err(Error::on(&Target::new("definition", name)))
}

/// One page of the definitions `viewer` sees (see [`get`]), in name order;
/// the cursor is the last definition's name.
///
/// # Errors
/// Database errors.
pub async fn list(
    core: &Core,
    viewer: Option<&str>,
    page: Page<String>,
) -> Result<(Vec<Definition>, Option<String>)> {
    let rows = db::definitions::definition_list(
        &core.pool,
        page.after.as_deref().unwrap_or(""),
        viewer,
        page.size + 1,
    )
    .await
    .map_err(Error::on(&Target::all("definition")))?;
    Ok(super::page(rows, page.size, |d| d.name.clone()))
}

/// One field an UpdateDefinition sets, already parsed and checked for
/// shape (a new `params` is within the size and depth limits on its own).
#[derive(Debug, Clone)]
pub enum DefinitionChange {
    /// `display_name`.
    DisplayName(String),
    /// `description`.
    Description(String),
    /// `labels` (replaces all of them).
    Labels(BTreeMap<String, String>),
    /// `command`: the handler.
    Handler(Handler),
    /// `schedule`: bindings inheriting it follow at once.
    Schedule(Schedule),
    /// `params`: must stay within the limits merged with every binding's
    /// overrides.
    Params(Value),
    /// `misfire_policy`.
    MisfirePolicy(MisfirePolicy),
    /// `retry_policy`.
    RetryPolicy(RetryPolicy),
    /// `timeout`, seconds; `None` for no timeout.
    Timeout(Option<u32>),
    /// `overlap_policy`.
    OverlapPolicy(OverlapPolicy),
    /// `priority`.
    Priority(i32),
    /// `enabled`: a disabled definition fires for no tenant.
    Enabled(bool),
    /// `deletion_protection`: a protected definition cannot be deleted.
    DeletionProtection(bool),
    /// `max_output_bytes`; `None` for the default.
    MaxOutputBytes(Option<u64>),
    /// `max_active_runs`; `None` for no cap. Bindings that do not override
    /// it follow at their next fire.
    MaxActiveRuns(Option<u32>),
    /// `tenant_scope`: may not strand a tenant that binds it.
    TenantScope(TenantScope),
}

/// What UpdateDefinition asks for.
#[derive(Debug, Clone)]
pub struct DefinitionUpdate {
    /// The definition to change.
    pub name: String,
    /// The version the caller read (its etag); empty to skip the check.
    pub etag: String,
    /// The fields to set, applied in order.
    pub changes: Vec<DefinitionChange>,
}

/// Changes a definition (UpdateDefinition) under its row lock and bumps its
/// version. Bindings that inherit a changed schedule follow it at once (an
/// interval without anchor is anchored now); disabling it takes the claim
/// lock, so none of its runs starts after the commit, and enabling it wakes
/// every node's executor. Returns the stored definition.
///
/// # Errors
/// `NotFound`, `Conflict` (etag, concurrent change), `Precondition` when a
/// narrowed tenant scope would strand tenants that bind it, `Invalid` on
/// `definition.params (binding …)` when new params merged with a binding's
/// overrides exceed the limits, database errors.
pub async fn update(core: &Core, actor: Actor<'_>, u: DefinitionUpdate) -> Result<Definition> {
    let target = Target::new("definition", &u.name);
    let mut tx = begin(core, &target).await?;
    let mut cur = db::definitions::definition_get_for_update(&mut *tx, &u.name)
        .await
        .map_err(Error::on(&target))?;
    super::check_etag(&target, &u.etag, cur.version)?;
    let before = audit::definition(&cur);
    let old_version = cur.version;
    let mut schedule_changed = false;
    let mut params_changed = false;
    for change in u.changes {
        match change {
            DefinitionChange::DisplayName(v) => cur.display_name = v,
            DefinitionChange::Description(v) => cur.description = v,
            DefinitionChange::Labels(v) => cur.labels = v,
            DefinitionChange::Handler(v) => cur.handler = v,
            DefinitionChange::Schedule(s) => {
                schedule_changed |= s != cur.schedule;
                cur.schedule = s;
            }
            DefinitionChange::Params(p) => {
                params_changed = true;
                cur.params = p;
            }
            DefinitionChange::MisfirePolicy(v) => cur.misfire_policy = v,
            DefinitionChange::RetryPolicy(v) => cur.policy.retry = v,
            DefinitionChange::Timeout(v) => cur.policy.timeout_secs = v,
            DefinitionChange::OverlapPolicy(v) => cur.policy.overlap = v,
            DefinitionChange::Priority(v) => cur.policy.priority = v,
            DefinitionChange::Enabled(v) => cur.enabled = v,
            DefinitionChange::DeletionProtection(v) => cur.protected = v,
            DefinitionChange::MaxOutputBytes(v) => cur.max_output_bytes = v,
            DefinitionChange::MaxActiveRuns(v) => cur.max_active_runs = v,
            DefinitionChange::TenantScope(scope) => {
                if let TenantScope::AllowList(allow) = &scope {
                    let stranded =
                        db::definitions::definition_bound_outside(&mut *tx, &cur.name, allow)
                            .await
                            .map_err(Error::on(&target))?;
                    if !stranded.is_empty() {
                        return Err(Error::Precondition(format!(
                            "tenants outside the new tenant_scope still bind {target}: {}; delete their bindings first",
                            stranded.join(", ")
                        )));
                    }
                }
                cur.tenant_scope = scope;
            }
        }
    }
    if params_changed {
        // Runs receive the merge: it must stay within the limit for every
        // binding that overrides some params.
        let overrides = db::bindings::binding_list_param_overrides(&mut *tx, &cur.name)
            .await
            .map_err(Error::on(&target))?;
        for (id, p) in overrides {
            validate_merged_params(
                &format!("definition.params (binding {id})"),
                &merge_params(&cur.params, &p),
            )?;
        }
    }
    check_step_definitions(&mut tx, &cur, &target).await?;
    if !cur.enabled || schedule_changed {
        // A scheduler pass firing one of its bindings ends first (one
        // prepared ahead ends at its instant), and `now` below is read
        // after it: the new schedule counts from after that fire.
        db::bindings::binding_lock_by_definition(&mut *tx, &cur.name)
            .await
            .map_err(Error::on(&target))?;
    }
    let now = core.clock.now();
    cur.version += 1;
    cur.update_time = now;
    db::definitions::definition_update(&mut *tx, &cur, old_version)
        .await
        .map_err(Error::on(&target))?;
    let stopped = (!cur.enabled).then_some(db::runs::Stopped::Definition(&cur.name));
    super::bindings::hold_or_release(&mut tx, stopped, &target).await?;
    if schedule_changed {
        // Bindings that inherit the schedule follow it at once; an
        // interval without anchor is anchored at the change.
        let bindings = db::bindings::binding_list_inheriting_schedule(&mut *tx, &cur.name)
            .await
            .map_err(Error::on(&target))?;
        let ids: Vec<_> = bindings.iter().map(|b| b.0).collect();
        let schedules: Vec<_> = bindings
            .iter()
            .map(|(_, from, until)| effective_schedule(&cur.schedule, now, *from, *until))
            .collect();
        let nexts: Vec<_> = schedules.iter().map(|s| s.next_after(now)).collect();
        db::bindings::binding_set_effective_schedules(&mut *tx, &ids, &schedules, &nexts, now)
            .await
            .map_err(Error::on(&target))?;
    }
    let event = actor.audit(
        core.clock.new_id(),
        now,
        None,
        format!("definition/{}", cur.name),
        Some(before),
        Some(audit::definition(&cur)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    tracing::info!(definition = %cur.name, version = cur.version, schedule_changed, "definition updated");
    Ok(cur)
}

/// Deletes definition `name` (DeleteDefinition); with `force`, its
/// bindings too, whose runs end CANCELLED/binding_deleted as with
/// DeleteBinding (under the claim lock: none starts after the commit). A
/// definition whose stored data cannot be read can still be deleted.
/// Returns the ids of the bindings deleted with it.
///
/// # Errors
/// `NotFound`, `Precondition` when it is protected, or bound and not
/// `force`d (or bound concurrently), database errors.
pub async fn delete(core: &Core, actor: Actor<'_>, name: &str, force: bool) -> Result<Vec<Uuid>> {
    let target = Target::new("definition", name);
    let mut tx = begin(core, &target).await?;
    // A definition whose stored data cannot be read can still be deleted
    // (the row is locked all the same; the audit records why its content
    // is missing).
    let mut before = match db::definitions::definition_get_for_update(&mut *tx, name).await {
        Ok(cur) => audit::definition(&cur),
        Err(e @ db::Error::Corrupt { .. }) => {
            tracing::warn!(definition = %name, error = %e, "deleting a definition that cannot be read");
            serde_json::json!({ "name": name, "unreadable": e.to_string() })
        }
        Err(e) => return Err(Error::db(e, &target)),
    };
    let bindings = db::definitions::definition_delete(&mut tx, name, force)
        .await
        .map_err(Error::on(&target))?;
    // As DeleteBinding for each deleted binding.
    let now = core.clock.now();
    let cancelled = db::runs::run_cancel_bindings(
        &mut tx,
        &core.node_id,
        &bindings,
        RunReason::BindingDeleted.as_str(),
        now,
    )
    .await
    .map_err(Error::on(&target))?;
    if let Some(o) = before.as_object_mut()
        && !bindings.is_empty()
    {
        o.insert("deleted_bindings".into(), serde_json::json!(bindings));
    }
    let event = actor.audit(
        core.clock.new_id(),
        now,
        None,
        format!("definition/{name}"),
        Some(before),
        None,
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    core.bus.publish(cancelled);
    tracing::info!(definition = %name, deleted_bindings = bindings.len(), "definition deleted");
    Ok(bindings)
}

/// How many fire times a preview returns for the requested `count`: 0 means
/// [`DEFAULT_PREVIEW`], otherwise 1..=[`MAX_PREVIEW`].
///
/// # Errors
/// `Invalid` on `count` when negative or above [`MAX_PREVIEW`].
pub fn preview_count(count: i32) -> Result<usize> {
    match count {
        0 => Ok(DEFAULT_PREVIEW as usize),
        1..=MAX_PREVIEW => Ok(count as usize),
        n => {
            Err(FieldViolation::new("count", format!("{n} is out of range 0-{MAX_PREVIEW}")).into())
        }
    }
}

/// A checked PreviewSchedule: the schedule (interval anchor resolved at
/// `after`), where to start and how many fire times to compute.
#[derive(Debug, Clone)]
pub struct Preview {
    schedule: Schedule,
    after: DateTime<Utc>,
    count: usize,
}

/// One fire time of a preview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewFire {
    /// The fire time, a UTC instant.
    pub time: DateTime<Utc>,
    /// The same instant in the schedule's time zone, RFC 3339.
    pub local_time: String,
    /// The wall time asked for did not exist (DST gap); the fire moved to
    /// the end of the gap.
    pub dst_shifted: bool,
}

/// Checks a preview of `schedule` from `after` for `count` fire times (see
/// [`preview_count`]); an interval without anchor is anchored at `after`.
///
/// # Errors
/// `Invalid` on `after` when `schedule` is a cron schedule and `after` is
/// past [`CRON_LAST_YEAR`].
pub fn preview(schedule: Schedule, after: DateTime<Utc>, count: usize) -> Result<Preview> {
    let schedule = schedule.resolve_anchor(after);
    if matches!(schedule.kind, ScheduleKind::Cron { .. }) && after.year() > CRON_LAST_YEAR {
        return Err(FieldViolation::new(
            "after",
            format!("cron schedules compute fire times up to year {CRON_LAST_YEAR}"),
        )
        .into());
    }
    Ok(Preview {
        schedule,
        after,
        count,
    })
}

impl Preview {
    /// The first fire times strictly after the start, in order: as many as
    /// asked for, fewer when the schedule ends. Pure but possibly long (up
    /// to [`MAX_PREVIEW`] schedule steps): callers bound how many run at
    /// once.
    pub fn fire_times(&self) -> Vec<PreviewFire> {
        let mut fire_times = Vec::with_capacity(self.count);
        let mut t = self.after;
        while fire_times.len() < self.count {
            let Some(fire) = self.schedule.next_fire_after(t) else {
                break;
            };
            let next = fire.time;
            fire_times.push(PreviewFire {
                time: next,
                local_time: self.schedule.describe_local(next),
                dst_shifted: fire.dst_shifted,
            });
            t = next;
        }
        fire_times
    }
}
