//! `bindings`: a tenant's use of a definition. Every function takes the
//! tenant and filters by it, so isolation holds in SQL, not only in handlers.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{DbTime, Error, decode, encode, policy_from_cols};
use crate::domain::policy::PolicyOverrides;
use crate::domain::{
    Binding, Handler, LastRun, MisfirePolicy, RunOutcomes, RunPolicy, RunState, Schedule,
    merge_params,
};

struct Row {
    id: Uuid,
    tenant_id: String,
    definition: String,
    schedule: Option<serde_json::Value>,
    params: Option<serde_json::Value>,
    effective_from: Option<DbTime>,
    effective_until: Option<DbTime>,
    effective_schedule: serde_json::Value,
    next_run_time: Option<DbTime>,
    create_time: DbTime,
    update_time: DbTime,
    version: i64,
    enabled: bool,
    paused: bool,
    pause_note: String,
    pause_expire_time: Option<DbTime>,
    broken_reason: Option<String>,
    def_params: serde_json::Value,
    overlap_policy: String,
    retry_policy: serde_json::Value,
    timeout_secs: Option<i32>,
    priority: i32,
    def_enabled: bool,
    def_max_active_runs: Option<i32>,
    // the binding's policy overrides (NULL = inherit)
    b_timeout_secs: Option<i32>,
    b_retry_policy: Option<serde_json::Value>,
    b_priority: Option<i32>,
    b_max_active_runs: Option<i32>,
    // binding_status (LEFT JOIN: none until a run ended)
    last_run_id: Option<Uuid>,
    last_run_state: Option<String>,
    last_run_scheduled_time: Option<DbTime>,
    last_run_end_time: Option<DbTime>,
    last_success_time: Option<DbTime>,
    last_failure_time: Option<DbTime>,
    consecutive_failures: Option<i32>,
}

impl Row {
    /// The run outcomes of the row. They are sked's own bookkeeping, not
    /// the binding's data: a value that cannot be read is left out rather
    /// than marking the binding broken.
    fn outcomes(&self) -> RunOutcomes {
        let time = |t: Option<DbTime>| t.and_then(|t| t.get("binding status time").ok());
        let last_run = match (
            self.last_run_id,
            self.last_run_state.as_deref().and_then(RunState::parse),
            time(self.last_run_scheduled_time),
            time(self.last_run_end_time),
        ) {
            (Some(id), Some(state), Some(scheduled_time), Some(end_time)) => Some(LastRun {
                id,
                state,
                scheduled_time,
                end_time,
            }),
            _ => None,
        };
        RunOutcomes {
            last_run,
            last_success_time: time(self.last_success_time),
            last_failure_time: time(self.last_failure_time),
            consecutive_failures: self
                .consecutive_failures
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
        }
    }
}

/// Longest stored or shown `broken_reason`, in characters.
pub const MAX_BROKEN_REASON: usize = 500;

/// Collects what of a row could not be read, keeping the readable rest.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// `r`'s value, or `fallback` with the error noted.
    fn take<T>(&mut self, r: Result<T, Error>, fallback: impl FnOnce() -> T) -> T {
        r.unwrap_or_else(|e| {
            self.0.push(e.to_string());
            fallback()
        })
    }
    fn time(&mut self, t: Option<DbTime>, what: &'static str) -> Option<DateTime<Utc>> {
        t.and_then(|t| self.take(t.get(what).map(Some), || None))
    }
}

impl From<Row> for Binding {
    /// Never fails: a field that cannot be read is shown empty (a schedule
    /// as `manual`, an instant as unset or the Unix epoch, the policy as the
    /// default) and [`Binding::broken_reason`] says what could not be read,
    /// so one bad row never breaks a Get or a List.
    fn from(r: Row) -> Self {
        let outcomes = r.outcomes();
        let mut p = Problems::default();
        let effective_params = match &r.params {
            Some(q) => merge_params(&r.def_params, q),
            None => r.def_params.clone(),
        };
        let manual = || Schedule::new(crate::domain::ScheduleKind::Manual, "UTC");
        let schedule = r
            .schedule
            .map(|s| p.take(decode("binding schedule", s), manual));
        let effective_schedule = p.take(
            decode("binding effective schedule", r.effective_schedule),
            manual,
        );
        let overrides = PolicyOverrides {
            retry: r
                .b_retry_policy
                .and_then(|v| p.take(decode("binding retry policy", v).map(Some), || None)),
            timeout_secs: r.b_timeout_secs.and_then(|t| u32::try_from(t).ok()),
            priority: r.b_priority,
            max_active_runs: r.b_max_active_runs.and_then(|t| u32::try_from(t).ok()),
        };
        let def_policy = p.take(
            policy_from_cols(
                &r.overlap_policy,
                r.retry_policy,
                r.timeout_secs,
                r.priority,
            ),
            RunPolicy::default,
        );
        let effective_policy = overrides.apply(def_policy);
        let effective_max_active_runs =
            overrides.max_active_runs(r.def_max_active_runs.and_then(|t| u32::try_from(t).ok()));
        let epoch = DateTime::<Utc>::UNIX_EPOCH;
        let b = Binding {
            id: r.id,
            tenant_id: r.tenant_id,
            definition: r.definition,
            schedule,
            params: r.params,
            effective_from: p.time(r.effective_from, "binding effective_from"),
            effective_until: p.time(r.effective_until, "binding effective_until"),
            effective_schedule,
            effective_params,
            next_run_time: p.time(r.next_run_time, "binding next_run_time"),
            create_time: p
                .time(Some(r.create_time), "binding create_time")
                .unwrap_or(epoch),
            update_time: p
                .time(Some(r.update_time), "binding update_time")
                .unwrap_or(epoch),
            version: r.version,
            enabled: r.enabled,
            paused: r.paused,
            pause_note: r.pause_note,
            pause_expire_time: p.time(r.pause_expire_time, "binding pause_expire_time"),
            overrides,
            effective_policy,
            effective_max_active_runs,
            broken_reason: None,
            definition_enabled: r.def_enabled,
            outcomes,
        };
        let mut reasons: Vec<String> = r.broken_reason.into_iter().collect();
        for q in p.0 {
            if !reasons.contains(&q) {
                reasons.push(q);
            }
        }
        Binding {
            broken_reason: (!reasons.is_empty())
                .then(|| super::clip(&reasons.join("; "), MAX_BROKEN_REASON)),
            ..b
        }
    }
}

/// Inserts `b` and announces the change to every node's scheduler
/// ([`super::notify::BINDINGS`]).
///
/// # Errors
/// [`Error::Duplicate`] when the tenant already binds the definition;
/// [`Error::NotFound`] when the definition does not exist (any more).
pub async fn binding_insert(db: impl PgExecutor<'_>, b: &Binding) -> Result<(), Error> {
    let r = sqlx::query!(
        r#"WITH ins AS (
             INSERT INTO bindings (id, tenant_id, definition, schedule, params, effective_schedule,
                                   create_time, update_time, version, effective_from,
                                   effective_until, enabled, timeout_secs, retry_policy, priority,
                                   max_active_runs)
             VALUES ($1, $2, $3, $4, $5, $6, $8, $9, $10, $11, $12, $13, $15, $16, $17, $18) RETURNING id),
           due AS (INSERT INTO binding_due (binding_id, next_run_time) SELECT id, $7 FROM ins)
           SELECT pg_notify($14::text, '') AS "n" FROM ins"#,
        b.id,
        b.tenant_id,
        b.definition,
        b.schedule.as_ref().map(encode),
        b.params,
        encode(&b.effective_schedule),
        b.next_run_time,
        b.create_time,
        b.update_time,
        b.version,
        b.effective_from,
        b.effective_until,
        b.enabled,
        super::notify::BINDINGS,
        b.overrides.timeout_secs.map(|t| t as i32),
        b.overrides.retry.as_ref().map(encode),
        b.overrides.priority,
        b.overrides.max_active_runs.map(|t| t as i32),
    )
    .execute(db)
    .await;
    match r {
        Err(sqlx::Error::Database(e)) if e.is_foreign_key_violation() => Err(Error::NotFound),
        r => r.map(|_| ()).map_err(Error::from),
    }
}

/// The read of one binding of a tenant as a [`Row`] (`$1` tenant, `$2` id),
/// with an optional locking clause appended: one text for the plain read
/// and the locked ones (`query_as!` takes literals only).
macro_rules! binding_select {
    ($tenant:expr, $id:expr $(, $lock:literal)?) => {
        sqlx::query_as!(
            Row,
            r#"SELECT b.id, b.tenant_id, b.definition, b.schedule, b.params,
                b.effective_from AS "effective_from: DbTime", b.effective_until AS "effective_until: DbTime",
                b.effective_schedule, nd.next_run_time AS "next_run_time?: DbTime",
                b.create_time AS "create_time: DbTime", b.update_time AS "update_time: DbTime", b.version,
                b.enabled, b.paused, b.pause_note, b.pause_expire_time AS "pause_expire_time: DbTime",
                b.broken_reason, d.params AS def_params, d.overlap_policy, d.retry_policy, d.timeout_secs,
                d.priority, d.enabled AS def_enabled, d.max_active_runs AS def_max_active_runs,
                b.timeout_secs AS b_timeout_secs, b.retry_policy AS b_retry_policy, b.priority AS b_priority,
                b.max_active_runs AS b_max_active_runs, s.last_run_id AS "last_run_id?",
                s.last_run_state AS "last_run_state?",
                s.last_run_scheduled_time AS "last_run_scheduled_time?: DbTime",
                s.last_run_end_time AS "last_run_end_time?: DbTime",
                s.last_success_time AS "last_success_time?: DbTime",
                s.last_failure_time AS "last_failure_time?: DbTime",
                s.consecutive_failures AS "consecutive_failures?"
         FROM bindings b JOIN definitions d ON d.name = b.definition
         LEFT JOIN binding_due nd ON nd.binding_id = b.id
         LEFT JOIN binding_status s ON s.binding_id = b.id
         WHERE b.tenant_id = $1 AND b.id = $2"# $(+ $lock)?,
            $tenant,
            $id
        )
    };
}

/// Gets the tenant's binding `id`.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such binding.
pub async fn binding_get(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    id: Uuid,
) -> Result<Binding, Error> {
    Ok(binding_select!(tenant_id, id).fetch_one(db).await?.into())
}

/// [`binding_get`] taking a `FOR KEY SHARE` lock on the binding for the
/// caller's transaction, as [`binding_lock_shared`] does: a DeleteBinding
/// then waits for that transaction (and sees the runs it wrote), or has
/// committed first and the binding is not found. One round trip where a
/// read and then a lock took two (TriggerRun).
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such binding.
pub async fn binding_get_key_share(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    id: Uuid,
) -> Result<Binding, Error> {
    Ok(
        binding_select!(tenant_id, id, "\n         FOR KEY SHARE OF b")
            .fetch_one(db)
            .await?
            .into(),
    )
}

/// Lists up to `limit` of the tenant's bindings with id > `after`, in id
/// (creation) order, optionally only those of `definition`, and only those
/// whose definition carries every label of `labels` (a JSON object of
/// strings; `None` or `{}` for any).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_list(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    after: Uuid,
    definition: Option<&str>,
    labels: Option<&serde_json::Value>,
    limit: i64,
) -> Result<Vec<Binding>, Error> {
    Ok(sqlx::query_as!(
        Row,
        r#"SELECT b.id, b.tenant_id, b.definition, b.schedule, b.params,
                b.effective_from AS "effective_from: DbTime", b.effective_until AS "effective_until: DbTime",
                b.effective_schedule, nd.next_run_time AS "next_run_time?: DbTime",
                b.create_time AS "create_time: DbTime", b.update_time AS "update_time: DbTime", b.version,
                b.enabled, b.paused, b.pause_note, b.pause_expire_time AS "pause_expire_time: DbTime",
                b.broken_reason, d.params AS def_params, d.overlap_policy, d.retry_policy, d.timeout_secs,
                d.priority, d.enabled AS def_enabled, d.max_active_runs AS def_max_active_runs,
                b.timeout_secs AS b_timeout_secs, b.retry_policy AS b_retry_policy, b.priority AS b_priority,
                b.max_active_runs AS b_max_active_runs, s.last_run_id AS "last_run_id?",
                s.last_run_state AS "last_run_state?",
                s.last_run_scheduled_time AS "last_run_scheduled_time?: DbTime",
                s.last_run_end_time AS "last_run_end_time?: DbTime",
                s.last_success_time AS "last_success_time?: DbTime",
                s.last_failure_time AS "last_failure_time?: DbTime",
                s.consecutive_failures AS "consecutive_failures?"
         FROM bindings b JOIN definitions d ON d.name = b.definition
         LEFT JOIN binding_due nd ON nd.binding_id = b.id
         LEFT JOIN binding_status s ON s.binding_id = b.id
         WHERE b.tenant_id = $1 AND b.id > $2 AND ($3::text IS NULL OR b.definition = $3)
           AND ($5::jsonb IS NULL OR d.labels @> $5)
         ORDER BY b.id LIMIT $4"#,
        tenant_id,
        after,
        definition,
        limit,
        labels,
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Binding::from)
    .collect())
}

/// Deletes the tenant's binding `id`; its runs stay.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such binding.
pub async fn binding_delete(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    id: Uuid,
) -> Result<(), Error> {
    let r = sqlx::query!(
        r#"WITH del AS (DELETE FROM bindings WHERE tenant_id = $1 AND id = $2 RETURNING id)
           SELECT count(*) AS "n!", pg_notify($3::text, '') AS "x" FROM del"#,
        tenant_id,
        id,
        super::notify::BINDINGS,
    )
    .fetch_one(db)
    .await?;
    if r.n == 0 {
        Err(Error::NotFound)
    } else {
        Ok(())
    }
}

/// Whether the runs of binding `id` may start at `now`, as a claim decides
/// it: the binding exists, is enabled and not paused (a pause whose
/// `pause_expire_time` has passed is over), and its definition is enabled.
/// The same rule as the claim's `held_back` and the scheduler's
/// `plan_binding`. Read without a row lock: to keep the answer true until
/// a commit, hold [`crate::db::runs::run_stop_lock_shared`] before reading
/// it.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_startable(
    db: impl PgExecutor<'_>,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar!(
        r#"SELECT (b.enabled AND NOT (b.paused AND coalesce(b.pause_expire_time > $2, true)) AND d.enabled)
                  AS "startable!"
           FROM bindings b JOIN definitions d ON d.name = b.definition
           WHERE b.id = $1"#,
        id,
        now
    )
    .fetch_optional(db)
    .await?
    .unwrap_or(false))
}

/// Whether binding `id` exists, taking a `FOR KEY SHARE` lock on it for the
/// caller's transaction: a DeleteBinding then waits for that transaction
/// (and sees what it wrote), or has committed before and the binding is gone.
/// Used before writing a retry, so a deleted binding gets none.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_lock_shared(db: impl PgExecutor<'_>, id: Uuid) -> Result<bool, Error> {
    Ok(sqlx::query_scalar!(
        "SELECT 1 AS x FROM bindings WHERE id = $1 FOR KEY SHARE",
        id
    )
    .fetch_optional(db)
    .await?
    .is_some())
}

/// Locks the bindings of definition `name` (`FOR UPDATE`) for the caller's
/// transaction, so a scheduler pass firing one of them (which holds its row
/// lock) finishes first, and later passes see what the caller writes (a
/// disabled definition).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_lock_by_definition(db: impl PgExecutor<'_>, name: &str) -> Result<(), Error> {
    sqlx::query!(
        "SELECT id FROM bindings WHERE definition = $1 FOR UPDATE",
        name
    )
    .fetch_all(db)
    .await?;
    Ok(())
}

/// A binding whose next fire time has come, locked for this transaction.
#[derive(Debug, Clone)]
pub struct DueBinding {
    /// Binding id.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// Definition name.
    pub definition: String,
    /// Schedule in force.
    pub schedule: Schedule,
    /// The due fire time (≤ now).
    pub next_run_time: DateTime<Utc>,
    /// Effective params (definition's merged with the binding's).
    pub params: serde_json::Value,
    /// Handler to snapshot into the run.
    pub handler: Handler,
    /// The definition's misfire policy.
    pub misfire_policy: MisfirePolicy,
    /// The run policy in force (the definition's with the binding's
    /// overrides), snapshotted into runs.
    pub policy: RunPolicy,
    /// Cap on active runs under `ALLOW` (`None` = no cap).
    pub max_active_runs: Option<u32>,
    /// Binding and definition both enabled.
    pub enabled: bool,
    /// Paused (possibly with an expiry that has passed).
    pub paused: bool,
    /// When the pause ends by itself.
    pub pause_expire_time: Option<DateTime<Utc>>,
}

/// A due binding whose stored data cannot be read: it is to be taken out of
/// the due set with [`binding_mark_broken`].
#[derive(Debug, Clone)]
pub struct BrokenBinding {
    /// Binding id.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// What could not be read (short, for people).
    pub reason: String,
}

/// The earliest `next_run_time` in `(after, until]`, locked or not, and
/// how many bindings are due in `(after, that time + band]`, counted up to
/// `cap` (a fire prepared ahead of its instant starts its band there, and
/// sizes its lead by the count; see [`crate::scheduler`]).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_first_due_between(
    db: impl PgExecutor<'_>,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    band: std::time::Duration,
    cap: i64,
) -> Result<Option<(DateTime<Utc>, i64)>, Error> {
    let band_us = i64::try_from(band.as_micros()).unwrap_or(i64::MAX);
    let row = sqlx::query!(
        r#"WITH first AS (
               SELECT next_run_time AS t FROM binding_due
               WHERE next_run_time > $1 AND next_run_time <= $2
               ORDER BY next_run_time LIMIT 1)
           SELECT first.t AS "t!: DbTime",
                  (SELECT count(*) FROM (
                       SELECT 1 FROM binding_due
                       WHERE next_run_time > $1
                         AND next_run_time <= first.t + make_interval(secs => $3::float8 / 1e6)
                       LIMIT $4) band) AS "n!"
           FROM first"#,
        after,
        until,
        band_us as f64,
        cap.max(1),
    )
    .fetch_optional(db)
    .await?;
    row.map(|r| Ok((r.t.get("binding next_run_time")?, r.n)))
        .transpose()
}

/// Stored instants from this one on cannot be computed with (past year
/// 9999); see [`binding_next_due_time`].
const FAR_FUTURE: &str = "10000-01-01T00:00:00Z";

/// Why a binding whose next fire time lay past year 9999 was taken out.
const REASON_FAR_FUTURE: &str =
    "corrupt binding next_run_time in database: timestamp is past year 9999";

/// Locks up to `limit` bindings due at `now` (`next_run_time <= now`, and
/// `> after` when given: a fire prepared ahead of its instant takes only
/// fire times still to come),
/// skipping rows another node has locked (`FOR UPDATE SKIP LOCKED`): each due binding is handled
/// by exactly one node at a time. Call inside a transaction and advance them
/// with [`binding_set_next_run_times`].
///
/// Each row is decoded on its own: the bindings whose stored data (their
/// own or their definition's) does not decode come back as
/// [`BrokenBinding`]s, so one bad row never fails the pass for the others.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_lock_due(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    after: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<(Vec<DueBinding>, Vec<BrokenBinding>), Error> {
    let rows = sqlx::query!(
        r#"SELECT b.id, b.tenant_id, b.definition, b.effective_schedule,
                  nd.next_run_time AS "next_run_time!: DbTime",
                  b.params, b.def_params, b.handler, b.misfire_policy, b.overlap_policy,
                  -- the binding's overrides, resolved against the definition as it is now
                  coalesce(b.retry_policy, b.def_retry_policy) AS "retry_policy!",
                  coalesce(b.timeout_secs, b.def_timeout_secs) AS timeout_secs,
                  coalesce(b.priority, b.def_priority) AS "priority!",
                  nullif(coalesce(b.max_active_runs, b.def_max_active_runs), 0) AS max_active_runs,
                  b.enabled AND b.def_enabled AS "enabled!",
                  b.paused, b.pause_expire_time AS "pause_expire_time: DbTime", b.max_output_bytes
           -- The due rows first, by the due index, then each one's binding
           -- and definition by primary key (the lateral subquery cannot be
           -- flattened into a join). As one join, the planner hashed every
           -- binding on every pass: next_run_time only grows, so its
           -- statistics always say every row is due (measured at 5 000
           -- one-second bindings: 9.7 ms per pass, half of it hashing
           -- bindings, 59 us of PostgreSQL per fire).
           FROM (SELECT nd.binding_id, nd.next_run_time FROM binding_due nd
                 WHERE nd.next_run_time <= $1
                   AND nd.next_run_time > coalesce($3::timestamptz, '-infinity')
                 ORDER BY nd.next_run_time
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED) nd
           CROSS JOIN LATERAL (
                 SELECT b.id, b.tenant_id, b.definition, b.effective_schedule, b.params,
                        b.retry_policy, b.timeout_secs, b.priority, b.max_active_runs, b.enabled,
                        b.paused, b.pause_expire_time, d.params AS def_params, d.handler, d.misfire_policy,
                        d.overlap_policy, d.retry_policy AS def_retry_policy,
                        d.timeout_secs AS def_timeout_secs, d.priority AS def_priority,
                        d.max_active_runs AS def_max_active_runs, d.enabled AS def_enabled,
                        d.max_output_bytes
                 FROM bindings b JOIN definitions d ON d.name = b.definition
                 WHERE b.id = nd.binding_id
                 OFFSET 0
                 FOR UPDATE OF b SKIP LOCKED) b
           ORDER BY nd.next_run_time"#,
        now,
        limit,
        after,
    )
    .fetch_all(db)
    .await?;
    let mut due = Vec::with_capacity(rows.len());
    let mut broken = Vec::new();
    for r in rows {
        let decoded = (|| -> Result<DueBinding, Error> {
            let mut handler: Handler = decode("definition handler", r.handler)?;
            handler.set_output_cap(r.max_output_bytes.and_then(|m| u64::try_from(m).ok()));
            Ok(DueBinding {
                id: r.id,
                tenant_id: r.tenant_id.clone(),
                definition: r.definition,
                schedule: decode("binding effective schedule", r.effective_schedule)?,
                next_run_time: r.next_run_time.get("binding next_run_time")?,
                params: match &r.params {
                    Some(p) => merge_params(&r.def_params, p),
                    None => r.def_params,
                },
                handler,
                misfire_policy: decode("definition misfire policy", r.misfire_policy)?,
                policy: policy_from_cols(
                    &r.overlap_policy,
                    r.retry_policy,
                    r.timeout_secs,
                    r.priority,
                )?,
                max_active_runs: r.max_active_runs.and_then(|n| u32::try_from(n).ok()),
                enabled: r.enabled,
                paused: r.paused,
                pause_expire_time: r
                    .pause_expire_time
                    .map(|t| t.get("binding pause_expire_time"))
                    .transpose()?,
            })
        })();
        match decoded {
            Ok(b) => due.push(b),
            Err(e) => broken.push(BrokenBinding {
                id: r.id,
                tenant_id: r.tenant_id,
                reason: super::clip(&e.to_string(), MAX_BROKEN_REASON),
            }),
        }
    }
    Ok((due, broken))
}

/// Takes bindings out of the due set for good: no next fire time, and
/// `broken_reason` set (shown by the API). Only DeleteBinding ends that.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_mark_broken(
    db: impl PgExecutor<'_>,
    broken: &[BrokenBinding],
) -> Result<(), Error> {
    let ids: Vec<Uuid> = broken.iter().map(|b| b.id).collect();
    let reasons: Vec<String> = broken
        .iter()
        .map(|b| super::clip(&b.reason, MAX_BROKEN_REASON))
        .collect();
    sqlx::query!(
        "WITH b AS (
           UPDATE bindings b SET broken_reason = u.reason
           FROM UNNEST($1::uuid[], $2::text[]) AS u(id, reason)
           WHERE b.id = u.id RETURNING b.id)
         UPDATE binding_due nd SET next_run_time = NULL FROM b WHERE nd.binding_id = b.id",
        &ids,
        &reasons,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Sets each binding's next fire time (`None` = never again), and ends
/// the pauses of `ended_pauses` (their expiry at or before `now`;
/// auto-resume). The caller holds the bindings' row locks
/// ([`binding_lock_due`]), so it knows which pauses those are: only their
/// `bindings` rows are rewritten, every other binding's narrow
/// `binding_due` row alone.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_set_next_run_times(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    next: &[Option<DateTime<Utc>>],
    ended_pauses: &[Uuid],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    sqlx::query!(
        "WITH next AS (
           UPDATE binding_due nd SET next_run_time = u.next
           FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, next)
           WHERE nd.binding_id = u.id)
         UPDATE bindings b SET paused = false, pause_note = '', pause_expire_time = NULL
         WHERE b.id = ANY ($3) AND b.pause_expire_time <= $4",
        ids,
        next as &[Option<DateTime<Utc>>],
        ended_pauses,
        now,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The earliest next fire time over all bindings, if any binding will fire,
/// and the bindings (id, tenant) just taken out of the due set because
/// their next fire time lay past year 9999.
///
/// Such a time is never due, so [`binding_lock_due`] would never see it:
/// this statement, run between passes, marks those bindings broken instead
/// (`next_run_time` cleared, `broken_reason` set) — an index range probe
/// that finds nothing in the normal case. A stored time before year 1 comes
/// back as `DateTime::MIN_UTC` (due at once: the next pass decodes and marks
/// that binding).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_next_due_time(
    db: impl PgExecutor<'_>,
) -> Result<(Option<DateTime<Utc>>, Vec<(Uuid, String)>), Error> {
    let far: DateTime<Utc> = FAR_FUTURE.parse().unwrap_or(DateTime::<Utc>::MAX_UTC);
    let r = sqlx::query!(
        r#"WITH far AS (
             UPDATE bindings b SET broken_reason = $2
             FROM binding_due nd WHERE nd.binding_id = b.id AND nd.next_run_time >= $1
             RETURNING b.id, b.tenant_id),
           cleared AS (UPDATE binding_due nd SET next_run_time = NULL FROM far WHERE nd.binding_id = far.id)
           SELECT (SELECT min(next_run_time) FROM binding_due WHERE next_run_time < $1) AS "t: DbTime",
                  (SELECT array_agg(id) FROM far) AS "ids: Vec<Uuid>",
                  (SELECT array_agg(tenant_id) FROM far) AS "tenants: Vec<String>""#,
        far,
        REASON_FAR_FUTURE,
    )
    .fetch_one(db)
    .await?;
    let t = r.t.map(|t| {
        t.get("binding next_run_time")
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    });
    let marked = r
        .ids
        .unwrap_or_default()
        .into_iter()
        .zip(r.tenants.unwrap_or_default())
        .collect();
    Ok((t, marked))
}

/// Gets the tenant's binding `id` and locks it for this transaction, with
/// its `binding_due` row: a firing pass holds both and advances only the
/// due row, so locking that row too makes this wait for the pass and read
/// the advanced next fire time (EvalPlanQual), not the one just fired,
/// which a write-back would make due again.
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such binding.
pub async fn binding_get_for_update(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    id: Uuid,
) -> Result<Binding, Error> {
    Ok(sqlx::query_as!(
        Row,
        r#"SELECT b.id, b.tenant_id, b.definition, b.schedule, b.params,
                b.effective_from AS "effective_from: DbTime", b.effective_until AS "effective_until: DbTime",
                b.effective_schedule, nd.next_run_time AS "next_run_time?: DbTime",
                b.create_time AS "create_time: DbTime", b.update_time AS "update_time: DbTime", b.version,
                b.enabled, b.paused, b.pause_note, b.pause_expire_time AS "pause_expire_time: DbTime",
                b.broken_reason, d.params AS def_params, d.overlap_policy, d.retry_policy, d.timeout_secs,
                d.priority, d.enabled AS def_enabled, d.max_active_runs AS def_max_active_runs,
                b.timeout_secs AS b_timeout_secs, b.retry_policy AS b_retry_policy, b.priority AS b_priority,
                b.max_active_runs AS b_max_active_runs, s.last_run_id AS "last_run_id?",
                s.last_run_state AS "last_run_state?",
                s.last_run_scheduled_time AS "last_run_scheduled_time?: DbTime",
                s.last_run_end_time AS "last_run_end_time?: DbTime",
                s.last_success_time AS "last_success_time?: DbTime",
                s.last_failure_time AS "last_failure_time?: DbTime",
                s.consecutive_failures AS "consecutive_failures?"
         FROM bindings b JOIN definitions d ON d.name = b.definition
         JOIN binding_due nd ON nd.binding_id = b.id
         LEFT JOIN binding_status s ON s.binding_id = b.id
         WHERE b.tenant_id = $1 AND b.id = $2
         FOR UPDATE OF b, nd"#,
        tenant_id,
        id
    )
    .fetch_one(db)
    .await?
    .into())
}

/// Writes `b`'s overrides, effective schedule, next fire time, enabled and
/// pause state if its
/// version is still `expected_version` (`b.version` is the new one), and
/// wakes every node's scheduler.
///
/// # Errors
/// [`Error::Conflict`] when the version moved on.
pub async fn binding_update(
    db: impl PgExecutor<'_>,
    b: &Binding,
    expected_version: i64,
) -> Result<(), Error> {
    let r = sqlx::query!(
        r#"WITH u AS (
             UPDATE bindings SET schedule = $3, params = $4, effective_schedule = $5,
                                 update_time = $7, version = $8, effective_from = $10, effective_until = $11,
                                 enabled = $12, paused = $13, pause_note = $14, pause_expire_time = $15,
                                 timeout_secs = $17, retry_policy = $18, priority = $19, max_active_runs = $20
             WHERE tenant_id = $1 AND id = $2 AND version = $9 RETURNING id),
           due AS (UPDATE binding_due nd SET next_run_time = $6 FROM u WHERE nd.binding_id = u.id)
           SELECT count(*) AS "n!", pg_notify($16::text, '') AS "x" FROM u"#,
        b.tenant_id,
        b.id,
        b.schedule.as_ref().map(encode),
        b.params,
        encode(&b.effective_schedule),
        b.next_run_time,
        b.update_time,
        b.version,
        expected_version,
        b.effective_from,
        b.effective_until,
        b.enabled,
        b.paused,
        b.pause_note,
        b.pause_expire_time,
        super::notify::BINDINGS,
        b.overrides.timeout_secs.map(|t| t as i32),
        b.overrides.retry.as_ref().map(encode),
        b.overrides.priority,
        b.overrides.max_active_runs.map(|t| t as i32),
    )
    .fetch_one(db)
    .await?;
    if r.n == 0 {
        Err(Error::Conflict)
    } else {
        Ok(())
    }
}

/// A binding that inherits its definition's schedule: id and effective window.
pub type InheritingBinding = (Uuid, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Bindings of `definition` that inherit its schedule (no override), locked;
/// broken ones (and ones whose window cannot be read) are left out.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_list_inheriting_schedule(
    db: impl PgExecutor<'_>,
    definition: &str,
) -> Result<Vec<InheritingBinding>, Error> {
    Ok(sqlx::query!(
        r#"SELECT id, effective_from AS "effective_from: DbTime",
                  effective_until AS "effective_until: DbTime"
           FROM bindings
           WHERE definition = $1 AND schedule IS NULL AND broken_reason IS NULL
           ORDER BY id FOR UPDATE"#,
        definition
    )
    .fetch_all(db)
    .await?
    .into_iter()
    // A window that cannot be read leaves that binding as it is (the
    // scheduler marks it broken when it falls due).
    .filter_map(|r| {
        let from = r
            .effective_from
            .map(|t| t.get("effective_from"))
            .transpose()
            .ok()?;
        let until = r
            .effective_until
            .map(|t| t.get("effective_until"))
            .transpose()
            .ok()?;
        Some((r.id, from, until))
    })
    .collect())
}

/// The params overrides of `definition`'s bindings that have one: (binding
/// id, params). For checking what a change of the definition's params would
/// make of theirs.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_list_param_overrides(
    db: impl PgExecutor<'_>,
    definition: &str,
) -> Result<Vec<(Uuid, serde_json::Value)>, Error> {
    Ok(sqlx::query!(
        r#"SELECT id, params AS "params!" FROM bindings
           WHERE definition = $1 AND params IS NOT NULL ORDER BY id"#,
        definition
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| (r.id, r.params))
    .collect())
}

/// Sets each binding's effective schedule and next fire time and wakes every
/// node's scheduler (a definition's schedule changed).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_set_effective_schedules(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    schedules: &[Schedule],
    next: &[Option<DateTime<Utc>>],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let schedules: Vec<serde_json::Value> = schedules.iter().map(encode).collect();
    sqlx::query!(
        r#"WITH u AS (
             UPDATE bindings b SET effective_schedule = u.schedule, update_time = $4, version = version + 1
             FROM UNNEST($1::uuid[], $2::jsonb[], $3::timestamptz[]) AS u(id, schedule, next)
             WHERE b.id = u.id RETURNING b.id, u.next),
           due AS (UPDATE binding_due nd SET next_run_time = u.next FROM u WHERE nd.binding_id = u.id)
           SELECT count(*) AS "n!", pg_notify($5::text, '') AS "x" FROM u"#,
        ids,
        &schedules,
        next as &[Option<DateTime<Utc>>],
        now,
        super::notify::BINDINGS,
    )
    .fetch_one(db)
    .await?;
    Ok(())
}

/// Bindings whose status is `FAILING` (`crate::domain::stats::BindingStatus`:
/// at least `failing_after` final failures in a row, and neither broken,
/// disabled, paused nor completed at `now`), counted per tenant; tenants
/// with none are left out. Reads the `binding_status` rows with a streak of
/// failures (a scan of that narrow table) and their bindings by key; for
/// the sampled `sked_failing_bindings` gauge, never per request.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_failing_counts(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    failing_after: u32,
) -> Result<Vec<(String, i64)>, Error> {
    // The precedence of domain::stats::binding_status, in SQL.
    let rows = sqlx::query!(
        r#"SELECT b.tenant_id, count(*) AS "n!"
           FROM binding_status s
           JOIN bindings b ON b.id = s.binding_id
           JOIN definitions d ON d.name = b.definition
           WHERE s.consecutive_failures >= $2
             AND b.broken_reason IS NULL AND b.enabled AND d.enabled
             AND NOT (b.paused AND (b.pause_expire_time IS NULL OR b.pause_expire_time > $1))
             AND (b.effective_until IS NULL OR b.effective_until > $1)
             AND (EXISTS (SELECT 1 FROM binding_due nd WHERE nd.binding_id = b.id AND nd.next_run_time IS NOT NULL)
                  OR b.effective_schedule->>'kind' = 'manual')
           GROUP BY b.tenant_id"#,
        now,
        i32::try_from(failing_after).unwrap_or(i32::MAX),
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.tenant_id, r.n)).collect())
}
