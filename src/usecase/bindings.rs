//! Bindings: a tenant's use of a definition with its own schedule and
//! params. Creating (within the tenant's quota), reading, changing,
//! pausing and resuming, and deleting them (with their runs).

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Actor, Core, Error, Result, Target, audit, begin, commit, record};
use crate::db;
use crate::domain::RunReason;
use crate::domain::policy::{PolicyOverrides, RetryPolicy};
use crate::domain::{
    Binding, BindingStatus, FieldViolation, Schedule, effective_schedule, merge_params,
    validate_effective_window, validate_merged_params,
};

/// Longest pause note, in characters.
pub const MAX_NOTE: usize = 1000;

/// Binding `binding_id` of `tenant_id`, as stored (a pause whose expiry has
/// passed is still recorded; see [`shown`]).
///
/// # Errors
/// `NotFound` (also for another tenant's binding), database errors.
pub async fn get(core: &Core, tenant_id: &str, binding_id: Uuid) -> Result<Binding> {
    db::bindings::binding_get(&core.pool, tenant_id, binding_id)
        .await
        .map_err(Error::on(&Target::new("binding", binding_id)))
}

/// A binding as callers see it at `now`: a pause whose expiry has passed is
/// over, even before the scheduler has cleared it.
pub fn shown(mut b: Binding, now: DateTime<Utc>) -> Binding {
    if b.pause_expired(now) {
        b.end_pause();
    }
    b
}

/// Binding `binding_id` of `tenant_id` as callers see it now ([`shown`]):
/// what GetBinding returns.
///
/// # Errors
/// As [`get`].
pub async fn view(core: &Core, tenant_id: &str, binding_id: Uuid) -> Result<Binding> {
    let b = get(core, tenant_id, binding_id).await?;
    Ok(shown(b, core.clock.now()))
}

/// Most bindings one ListBindings call with a status filter reads: a page
/// may then come back short (even empty) with a next page token.
pub const MAX_LIST_SCAN: usize = 5_000;

/// Most entries of ListBindings' label selector.
pub const MAX_LABEL_SELECTOR: usize = 64;

/// Which bindings [`list`] returns: all of the given filters hold.
#[derive(Debug, Clone, Default)]
pub struct BindingFilter {
    /// Only bindings of this definition.
    pub definition: Option<String>,
    /// Only bindings whose definition carries every one of these labels
    /// (key and value equal); at most [`MAX_LABEL_SELECTOR`].
    pub labels: std::collections::BTreeMap<String, String>,
    /// Only bindings whose status is one of these (empty: any).
    pub statuses: Vec<BindingStatus>,
}

impl BindingFilter {
    /// Checks the filters beyond their shape.
    ///
    /// # Errors
    /// `Invalid` naming `definition` or `labels` and the rule.
    pub fn validate(&self) -> Result<()> {
        if let Some(d) = &self.definition {
            crate::domain::validate_definition_name("definition", d)?;
        }
        if self.labels.len() > MAX_LABEL_SELECTOR {
            return Err(FieldViolation::new(
                "labels",
                format!(
                    "has {} entries; at most {MAX_LABEL_SELECTOR}",
                    self.labels.len()
                ),
            )
            .into());
        }
        if let Some(k) = self.labels.keys().find(|k| k.is_empty()) {
            return Err(FieldViolation::new(
                format!("labels[{}]", crate::domain::quote(k)),
                "a label key must not be empty",
            )
            .into());
        }
        Ok(())
    }

    /// The filters as one canonical string, for page tokens.
    fn key(&self) -> String {
        let mut statuses: Vec<&str> = self.statuses.iter().map(|s| s.as_str()).collect();
        statuses.sort_unstable();
        statuses.dedup();
        format!(
            "bindings|{:?}|{:?}|{}",
            self.definition,
            self.labels,
            statuses.join(",")
        )
    }
}

/// One page of `tenant_id`'s bindings matching `filter`, in id (creation)
/// order, as callers see them now ([`shown`]), after `page_token`, with the
/// next page's token (empty on the last). Definition and labels are
/// filtered by the database; the status (which depends on the clock) here,
/// over at most [`MAX_LIST_SCAN`] bindings per call.
///
/// # Errors
/// `Invalid` for bad filters ([`BindingFilter::validate`]) or a page token
/// that is malformed or was issued for other filters; database errors.
pub async fn list(
    core: &Core,
    tenant_id: &str,
    filter: &BindingFilter,
    page_size: i64,
    page_token: &str,
) -> Result<(Vec<Binding>, String)> {
    filter.validate()?;
    let key = filter.key();
    let mut cursor = super::page_cursor(page_token, &key)?;
    let labels = (!filter.labels.is_empty()).then(|| serde_json::json!(filter.labels));
    let want = page_size as usize + 1;
    // Without a status filter every row read is returned: one read.
    let chunk = if filter.statuses.is_empty() {
        want
    } else {
        want.max(500)
    };
    let now = core.clock.now();
    let mut out: Vec<Binding> = Vec::with_capacity(want);
    let mut scanned = 0;
    let exhausted = loop {
        let rows = db::bindings::binding_list(
            &core.pool,
            tenant_id,
            cursor.unwrap_or(Uuid::nil()),
            filter.definition.as_deref(),
            labels.as_ref(),
            chunk as i64,
        )
        .await
        .map_err(Error::on(&Target::all("binding")))?;
        let n = rows.len();
        for b in rows {
            scanned += 1;
            cursor = Some(b.id);
            let b = shown(b, now);
            if filter.statuses.is_empty() || filter.statuses.contains(&b.status(now)) {
                out.push(b);
                if out.len() == want {
                    break;
                }
            }
        }
        if out.len() == want || n < chunk {
            break n < chunk && out.len() < want;
        }
        if scanned >= MAX_LIST_SCAN {
            break false;
        }
    };
    let (out, next) = super::page(out, page_size, |b| b.id);
    // A short page that stopped at the scan bound goes on where it stopped.
    let next = next.or(if exhausted { None } else { cursor });
    Ok((
        out,
        next.map(|c| super::page_token(c, &key)).unwrap_or_default(),
    ))
}

/// What CreateBinding asks for, checked for shape (definition name,
/// schedule, effective window).
#[derive(Debug, Clone)]
pub struct NewBinding {
    /// The definition to bind.
    pub definition: String,
    /// Schedule override; `None` inherits the definition's.
    pub schedule: Option<Schedule>,
    /// Params patch merged over the definition's (RFC 7396); `None` for
    /// none.
    pub params: Option<Value>,
    /// Fires only at or after this instant.
    pub effective_from: Option<DateTime<Utc>>,
    /// Fires only at or before this instant.
    pub effective_until: Option<DateTime<Utc>>,
    /// A disabled binding does not fire.
    pub enabled: bool,
    /// Its own timeout, retry policy, priority and active-run cap (`None`
    /// fields inherit the definition's), checked for range.
    pub overrides: PolicyOverrides,
}

/// Binds a definition for `tenant_id` (CreateBinding): the definition must
/// be visible to the caller and its tenant scope include `tenant_id`; the
/// tenant's `max_bindings` quota is checked under its quota row lock.
/// Returns the new binding, its next fire time computed from now.
///
/// # Errors
/// `NotFound` (definition), `Precondition` when the definition's tenant
/// scope excludes the tenant, `Invalid` on `binding.params` when the merged
/// params exceed the limits, `QuotaExceeded` (`max_bindings`),
/// `AlreadyExists` when the tenant already binds the definition, database
/// errors.
pub async fn create(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    new: NewBinding,
) -> Result<Binding> {
    let def_target = Target::new("definition", &new.definition);
    let def = db::definitions::definition_get(
        &core.pool,
        &new.definition,
        actor.caller.tenant.as_deref(),
    )
    .await
    .map_err(Error::on(&def_target))?;
    if !def.tenant_scope.allows(tenant_id) {
        return Err(Error::Precondition(format!(
            "definition {:?} may not be bound by tenant {tenant_id:?}: its tenant_scope excludes it",
            def.name
        )));
    }
    let now = core.clock.now();
    let effective = effective_schedule(
        new.schedule.as_ref().unwrap_or(&def.schedule),
        now,
        new.effective_from,
        new.effective_until,
    );
    if let Some(p) = &new.params {
        validate_merged_params("binding.params", &merge_params(&def.params, p))?;
    }
    let binding = Binding {
        id: core.clock.new_id(),
        tenant_id: tenant_id.to_string(),
        definition: def.name.clone(),
        next_run_time: effective.next_after(now),
        effective_from: new.effective_from,
        effective_until: new.effective_until,
        schedule: new.schedule,
        effective_params: new
            .params
            .as_ref()
            .map_or_else(|| def.params.clone(), |p| merge_params(&def.params, p)),
        params: new.params,
        effective_schedule: effective,
        create_time: now,
        update_time: now,
        version: 1,
        enabled: new.enabled,
        paused: false,
        pause_note: String::new(),
        pause_expire_time: None,
        effective_policy: new.overrides.apply(def.policy),
        effective_max_active_runs: new.overrides.max_active_runs(def.max_active_runs),
        overrides: new.overrides,
        broken_reason: None,
        definition_enabled: def.enabled,
        outcomes: Default::default(),
    };
    let target = Target::all("binding");
    let mut tx = begin(core, &target).await?;
    db::tenancy::quota_check_new_binding(&mut tx, tenant_id)
        .await
        .map_err(Error::on(&target))?;
    db::bindings::binding_insert(&mut *tx, &binding)
        .await
        .map_err(|e| match e {
            // Deleted since it was read.
            db::Error::NotFound => Error::NotFound(Target::new("definition", &def.name)),
            db::Error::Duplicate(_) => Error::AlreadyExists(Target::new(
                "binding",
                format_args!(
                    "of definition {:?} for tenant {:?}",
                    binding.definition, binding.tenant_id
                ),
            )),
            e => Error::db(e, &target),
        })?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(tenant_id),
        format!("binding/{}", binding.id),
        None,
        Some(audit::binding(&binding)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    tracing::info!(binding = %binding.id, tenant = %binding.tenant_id, definition = %binding.definition,
        next_run_time = ?binding.next_run_time, "binding created");
    Ok(binding)
}

/// One field an UpdateBinding sets, already parsed and checked for shape.
#[derive(Debug, Clone)]
pub enum BindingChange {
    /// `schedule`: the override; `None` inherits the definition's again.
    Schedule(Option<Schedule>),
    /// `params`: the patch over the definition's; `None` for none.
    Params(Option<Value>),
    /// `effective_from`.
    EffectiveFrom(Option<DateTime<Utc>>),
    /// `effective_until`.
    EffectiveUntil(Option<DateTime<Utc>>),
    /// `enabled`: re-enabling fires from the next fire time after now, with
    /// no catch-up of what passed while disabled.
    Enabled(bool),
    /// `timeout` override, seconds; `None` inherits the definition's.
    Timeout(Option<u32>),
    /// `retry_policy` override; `None` inherits the definition's.
    RetryPolicy(Option<RetryPolicy>),
    /// `priority` override; `None` inherits the definition's.
    Priority(Option<i32>),
    /// `max_active_runs` override (0 = no cap); `None` inherits.
    MaxActiveRuns(Option<u32>),
}

/// What UpdateBinding asks for.
#[derive(Debug, Clone)]
pub struct BindingUpdate {
    /// The binding to change.
    pub binding_id: Uuid,
    /// The version the caller read (its etag); empty to skip the check.
    pub etag: String,
    /// The fields to set, applied in order.
    pub changes: Vec<BindingChange>,
}

/// Changes a binding of `tenant_id` (UpdateBinding) under its row lock and
/// bumps its version. A changed schedule or window recomputes the
/// effective schedule (anchored now) and the next fire time; disabling it
/// takes the claim lock, so none of its runs starts after the commit, and
/// enabling it wakes every node's executor. Returns the binding as callers
/// see it ([`shown`]).
///
/// # Errors
/// `NotFound`, `Precondition` (broken binding), `Conflict` (etag,
/// concurrent change), `Invalid` on `binding.effective_until` (window) or
/// `binding.params` (merged params over the limits), database errors.
pub async fn update(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    u: BindingUpdate,
) -> Result<Binding> {
    let id = u.binding_id;
    let target = Target::new("binding", id);
    let mut tx = begin(core, &target).await?;
    let mut cur = db::bindings::binding_get_for_update(&mut *tx, tenant_id, id)
        .await
        .map_err(Error::on(&target))?;
    super::require_healthy(&cur)?;
    super::check_etag(&target, &u.etag, cur.version)?;
    let before = audit::binding(&cur);
    let old_version = cur.version;
    let now = core.clock.now();
    let mut schedule_changed = false;
    let mut re_enabled = false;
    for change in u.changes {
        match change {
            BindingChange::Schedule(s) => {
                schedule_changed |= s != cur.schedule;
                cur.schedule = s;
            }
            BindingChange::Params(p) => cur.params = p,
            BindingChange::EffectiveFrom(from) => {
                schedule_changed |= from != cur.effective_from;
                cur.effective_from = from;
            }
            BindingChange::EffectiveUntil(until) => {
                schedule_changed |= until != cur.effective_until;
                cur.effective_until = until;
            }
            BindingChange::Enabled(on) => {
                // Re-enabled: from the next fire after now, no catch-up.
                re_enabled = on && !cur.enabled;
                cur.enabled = on;
            }
            BindingChange::Timeout(v) => cur.overrides.timeout_secs = v,
            BindingChange::RetryPolicy(v) => cur.overrides.retry = v,
            BindingChange::Priority(v) => cur.overrides.priority = v,
            BindingChange::MaxActiveRuns(v) => cur.overrides.max_active_runs = v,
        }
    }
    let def = db::definitions::definition_get(&mut *tx, &cur.definition, None)
        .await
        .map_err(Error::on(&Target::new("definition", &cur.definition)))?;
    validate_effective_window(cur.effective_from, cur.effective_until)?;
    if schedule_changed {
        cur.effective_schedule = effective_schedule(
            cur.schedule.as_ref().unwrap_or(&def.schedule),
            now,
            cur.effective_from,
            cur.effective_until,
        );
        cur.next_run_time = cur.effective_schedule.next_after(now);
    } else if re_enabled {
        // Same schedule and anchor; only what passed while disabled is dropped.
        cur.next_run_time = cur.effective_schedule.next_after(now);
    }
    cur.effective_params = cur
        .params
        .as_ref()
        .map_or_else(|| def.params.clone(), |p| merge_params(&def.params, p));
    validate_merged_params("binding.params", &cur.effective_params)?;
    cur.effective_policy = cur.overrides.apply(def.policy);
    cur.effective_max_active_runs = cur.overrides.max_active_runs(def.max_active_runs);
    cur.version += 1;
    cur.update_time = now;
    db::bindings::binding_update(&mut *tx, &cur, old_version)
        .await
        .map_err(Error::on(&target))?;
    let stopped = (!cur.enabled).then_some(db::runs::Stopped::Binding(cur.id));
    hold_or_release(&mut tx, stopped, &target).await?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(tenant_id),
        format!("binding/{id}"),
        Some(before),
        Some(audit::binding(&cur)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    tracing::info!(binding = %id, version = cur.version, schedule_changed, next_run_time = ?cur.next_run_time, "binding updated");
    Ok(shown(cur, now))
}

/// Pauses a binding of `tenant_id` (PauseBinding): it does not fire, and
/// none of its runs starts after the commit (claim lock), until resumed or
/// until `expire_time` passes. `note` — at most [`MAX_NOTE`] characters.
/// Pausing a paused binding replaces its note and expiry. Returns the
/// binding as callers see it.
///
/// # Errors
/// `Invalid` on `note` (too long) or `expire_time` (not in the future),
/// `NotFound`, `Precondition` (broken binding), database errors.
pub async fn pause(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    binding_id: Uuid,
    note: &str,
    expire_time: Option<DateTime<Utc>>,
) -> Result<Binding> {
    if note.chars().count() > MAX_NOTE {
        return Err(
            FieldViolation::new("note", format!("must be at most {MAX_NOTE} characters")).into(),
        );
    }
    let now = core.clock.now();
    if expire_time.is_some_and(|e| e <= now) {
        return Err(FieldViolation::new("expire_time", "must be in the future").into());
    }
    let (b, now) = set_pause(core, actor, tenant_id, binding_id, |b, _| {
        b.paused = true;
        b.pause_note = note.to_string();
        b.pause_expire_time = expire_time;
    })
    .await?;
    tracing::info!(binding = %binding_id, expire_time = ?expire_time, note = %note, "binding paused");
    Ok(shown(b, now))
}

/// Resumes a binding of `tenant_id` (ResumeBinding): a paused one fires
/// from the next fire time after now (no catch-up of the pause) and its
/// held runs may start; resuming a binding that is not paused only bumps
/// its version. Returns the binding as callers see it.
///
/// # Errors
/// `NotFound`, `Precondition` (broken binding), database errors.
pub async fn resume(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    binding_id: Uuid,
) -> Result<Binding> {
    let (b, now) = set_pause(core, actor, tenant_id, binding_id, |b, now| {
        if b.paused {
            // From the next fire after now: no catch-up of the pause.
            b.next_run_time = b.effective_schedule.next_after(now);
        }
        b.end_pause();
    })
    .await?;
    tracing::info!(binding = %binding_id, next_run_time = ?b.next_run_time, "binding resumed");
    Ok(shown(b, now))
}

/// Applies `change` to binding `id` of `tenant_id` under its row lock and
/// writes it (new version), holding or releasing its runs as it is now
/// paused or not; audited. Returns the stored binding and the instant of
/// the change, read once the lock is held: a fire prepared ahead holds it
/// until its instant ([`crate::scheduler`]), and a resume must count its
/// "next fire after now" from after that fire.
async fn set_pause(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    id: Uuid,
    change: impl FnOnce(&mut Binding, DateTime<Utc>),
) -> Result<(Binding, DateTime<Utc>)> {
    let target = Target::new("binding", id);
    let mut tx = begin(core, &target).await?;
    let mut cur = db::bindings::binding_get_for_update(&mut *tx, tenant_id, id)
        .await
        .map_err(Error::on(&target))?;
    super::require_healthy(&cur)?;
    let now = core.clock.now();
    let before = audit::binding(&cur);
    let old_version = cur.version;
    change(&mut cur, now);
    cur.version += 1;
    cur.update_time = now;
    db::bindings::binding_update(&mut *tx, &cur, old_version)
        .await
        .map_err(Error::on(&target))?;
    let stopped = cur.paused.then_some(db::runs::Stopped::Binding(cur.id));
    hold_or_release(&mut tx, stopped, &target).await?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(tenant_id),
        format!("binding/{id}"),
        Some(before),
        Some(audit::binding(&cur)),
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    Ok((cur, now))
}

/// Deletes binding `binding_id` of `tenant_id` (DeleteBinding); a broken
/// binding can be deleted too. Stopped means stopped: under the claim lock,
/// no run of it starts after the commit; its runs end
/// CANCELLED/binding_deleted.
///
/// # Errors
/// `NotFound`, database errors.
pub async fn delete(
    core: &Core,
    actor: Actor<'_>,
    tenant_id: &str,
    binding_id: Uuid,
) -> Result<()> {
    let id = binding_id;
    let target = Target::new("binding", id);
    let mut tx = begin(core, &target).await?;
    let before = db::bindings::binding_get_for_update(&mut *tx, tenant_id, id)
        .await
        .map_err(Error::on(&target))?;
    db::bindings::binding_delete(&mut *tx, tenant_id, id)
        .await
        .map_err(Error::on(&target))?;
    // Stopped means stopped: under the claim lock, no run of it starts
    // after this commits; its runs end CANCELLED/binding_deleted.
    let now = core.clock.now();
    let cancelled = db::runs::run_cancel_bindings(
        &mut tx,
        &core.node_id,
        &[id],
        RunReason::BindingDeleted.as_str(),
        now,
    )
    .await
    .map_err(Error::on(&target))?;
    let event = actor.audit(
        core.clock.new_id(),
        now,
        Some(tenant_id),
        format!("binding/{id}"),
        Some(audit::binding(&before)),
        None,
    );
    record(&mut tx, &event, &target).await?;
    commit(tx, &target).await?;
    core.bus.publish(cancelled);
    tracing::info!(binding = %id, tenant = %tenant_id, "binding deleted");
    Ok(())
}

/// In a transaction that writes a binding's (or definition's) paused or
/// enabled flag: when it is `stopped`, takes its stop lock and then the
/// claim lock, so no run of it starts once the transaction commits
/// ([`db::runs::run_stop_lock`], [`db::runs::run_claim_lock`]); otherwise
/// wakes every node's executor on commit, as its held runs may start now.
///
/// # Errors
/// Database errors, reported on `target`.
pub(crate) async fn hold_or_release(
    tx: &mut sqlx::PgConnection,
    stopped: Option<db::runs::Stopped<'_>>,
    target: &Target,
) -> Result<()> {
    match stopped {
        Some(s) => {
            db::runs::run_stop_lock(&mut *tx, s)
                .await
                .map_err(Error::on(target))?;
            db::runs::run_claim_lock(tx).await
        }
        None => db::runs::notify_runs(tx).await,
    }
    .map_err(Error::on(target))
}
