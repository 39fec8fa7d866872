//! Reads of runs: one run ([`run_get`], [`run_progress`],
//! [`run_find_by_idempotency_key`]), a page of them ([`run_list`]), and what
//! the scheduler asks before firing ([`run_active_state`],
//! [`run_list_active`], [`run_next_due_time`]).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{RunRow, corrupt_state};
use crate::db::Error;
use crate::domain::{Run, RunState, RunTrigger};

/// An active run of a binding, for overlap decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRun {
    /// Binding.
    pub binding_id: Uuid,
    /// Run.
    pub id: Uuid,
    /// `SCHEDULED` (retries only), `QUEUED` or `RUNNING`.
    pub state: RunState,
}

/// Whether a binding has active runs, for overlap decisions: a `RUNNING`
/// one, and a waiting one (`QUEUED`, or a `SCHEDULED` retry). Workflow
/// steps are not waiting runs of their binding (their workflow run is the
/// binding's active run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveState {
    /// Binding.
    pub binding_id: Uuid,
    /// It has a `RUNNING` run.
    pub running: bool,
    /// It has a `QUEUED` run or a `SCHEDULED` retry.
    pub waiting: bool,
}

/// Turns sequential and bitmap scans off for the rest of the transaction,
/// so the per-binding probes of [`run_active_state`] and
/// [`run_active_counts`] walk their index and stop at the first rows. Right
/// after a backfill of 160 000 runs, the statistics still describe a
/// table of a few hundred rows, and the planner read all of `runs` once per
/// binding probed (2.2 s for 18 bindings; every fire of the pass late).
async fn probes_by_index(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query!(
        "SELECT set_config('enable_seqscan', 'off', true) AS seqscan,
                set_config('enable_bitmapscan', 'off', true) AS bitmapscan"
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// [`ActiveState`] of each of `bindings` (one row each, in no order): two
/// index probes per binding (`runs_active_state`), so the cost does not grow
/// with a binding's backlog (a backfill of thousands of queued runs). Call
/// inside a transaction: it turns sequential and bitmap scans off for the
/// rest of it (`probes_by_index`).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_active_state(
    conn: &mut PgConnection,
    bindings: &[Uuid],
) -> Result<Vec<ActiveState>, Error> {
    probes_by_index(&mut *conn).await?;
    Ok(sqlx::query!(
        // One probe per binding for the usual answer (nothing active), two
        // or three more only for a binding that has active runs. Scalar
        // LIMIT 1 subqueries, not EXISTS: the planner may run an EXISTS as
        // one hashed scan of every QUEUED run, which statistics gone stale
        // after a backfill make look cheap (measured: 35 000 rows a pass).
        // The waiting probe names two states, so no index made for one
        // state (`runs_queued`, `runs_scheduled`: every queued run of every
        // binding, by priority) can serve it: with statistics from before a
        // backfill of 160 000 runs, the planner walked all of `runs_queued`
        // for a binding with none queued (~1 s a pass, every fire of a
        // running binding late); now it probes `runs_active_state` by
        // binding.
        r#"SELECT b AS "binding_id!",
                  CASE WHEN a.state IS NULL THEN false
                       ELSE (SELECT 1 FROM runs WHERE binding_id = b AND state = 'RUNNING' LIMIT 1) IS NOT NULL
                  END AS "running!",
                  CASE WHEN a.state IS NULL THEN false
                       ELSE (SELECT 1 FROM runs
                             WHERE binding_id = b AND state IN ('QUEUED', 'SCHEDULED')
                               AND (state = 'QUEUED' OR trigger = 'RETRY') AND parent_run_id IS NULL
                             LIMIT 1) IS NOT NULL
                  END AS "waiting!"
           FROM unnest($1::uuid[]) AS b
           LEFT JOIN LATERAL (SELECT state FROM runs
                              WHERE binding_id = b AND state IN ('SCHEDULED', 'QUEUED', 'RUNNING')
                              LIMIT 1) a ON true"#,
        bindings
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| ActiveState {
        binding_id: r.binding_id,
        running: r.running,
        waiting: r.waiting,
    })
    .collect())
}

/// How many active runs (`QUEUED`, `RUNNING`, `SCHEDULED` retries) each of
/// `bindings` has, counting up to its `caps` entry at most (so the cost is
/// bounded by the cap, not by a backlog): for `max_active_runs` under
/// overlap policy `ALLOW`; workflow steps aside (their workflow run
/// counts). One row per binding, in no order. The caller
/// holds the bindings' row locks (a scheduler pass), so no other pass
/// creates runs for them until it commits. Turns sequential and bitmap
/// scans off for the rest of the transaction (`probes_by_index`).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_active_counts(
    conn: &mut PgConnection,
    bindings: &[Uuid],
    caps: &[i64],
) -> Result<Vec<(Uuid, i64)>, Error> {
    probes_by_index(&mut *conn).await?;
    Ok(sqlx::query!(
        r#"SELECT u.b AS "binding_id!",
                  (SELECT count(*) FROM (SELECT 1 FROM runs
                                         WHERE binding_id = u.b AND parent_run_id IS NULL
                                           AND (state IN ('QUEUED', 'RUNNING')
                                                OR (state = 'SCHEDULED' AND trigger = 'RETRY'))
                                         LIMIT u.cap) x) AS "active!"
           FROM unnest($1::uuid[], $2::bigint[]) AS u(b, cap)"#,
        bindings,
        caps,
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| (r.binding_id, r.active))
    .collect())
}

/// The active runs of `bindings`: `QUEUED`, `RUNNING`, and `SCHEDULED`
/// retries (a retry waiting out its backoff is still the same execution; a
/// delayed manual trigger is not counted).
/// Reads every one of them: for `CANCEL_PREVIOUS`, which cancels them all
/// (elsewhere [`run_active_state`] is enough).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_list_active(
    db: impl PgExecutor<'_>,
    bindings: &[Uuid],
) -> Result<Vec<ActiveRun>, Error> {
    sqlx::query!(
        "SELECT binding_id, id, state FROM runs
         WHERE binding_id = ANY($1) AND state IN ('SCHEDULED', 'QUEUED', 'RUNNING')
           AND (state <> 'SCHEDULED' OR trigger = 'RETRY')
         ORDER BY id",
        bindings
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| {
        Ok(ActiveRun {
            binding_id: r.binding_id,
            id: r.id,
            state: RunState::parse(&r.state).ok_or_else(|| corrupt_state(&r.state))?,
        })
    })
    .collect()
}

/// When waiting runs next need a hand: the first `SCHEDULED` run's
/// `not_before` (to promote it), and the first jittered `QUEUED` run's
/// `not_before` after `now` (it becomes claimable then).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NextDue {
    /// The earliest `SCHEDULED` run's `not_before`.
    pub scheduled: Option<DateTime<Utc>>,
    /// The earliest `QUEUED` run's `not_before` after `now`.
    pub queued: Option<DateTime<Utc>>,
}

/// [`NextDue`] at `now`.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_next_due_time(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<NextDue, Error> {
    run_next_due_time_notifying(db, now, &[], &[]).await
}

/// [`run_next_due_time`], sending NOTIFY `payloads[i]` on `channels[i]`
/// first (a one-time filter; delivered on the caller's commit), so a
/// transaction that announces runs reads when runs are next due in the
/// same round trip.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub(super) async fn run_next_due_time_notifying(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    channels: &[&str],
    payloads: &[String],
) -> Result<NextDue, Error> {
    let r = sqlx::query!(
        "SELECT (SELECT min(not_before) FROM runs WHERE state = 'SCHEDULED') AS scheduled,
                (SELECT min(not_before) FROM runs WHERE state = 'QUEUED' AND not_before > $1) AS queued
         WHERE (SELECT count(pg_notify(c, p)) FROM UNNEST($2::text[], $3::text[]) AS x(c, p)) >= 0",
        now,
        channels as &[&str],
        payloads,
    )
    .fetch_one(db)
    .await?;
    Ok(NextDue {
        scheduled: r.scheduled,
        queued: r.queued,
    })
}

/// The run a TriggerRun with `key` for `binding_id` created at or after
/// `since`, if any (the first one).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_find_by_idempotency_key(
    db: impl PgExecutor<'_>,
    binding_id: Uuid,
    key: &str,
    since: DateTime<Utc>,
) -> Result<Option<Uuid>, Error> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM runs WHERE binding_id = $1 AND idempotency_key = $2 AND create_time >= $3
         ORDER BY create_time, id LIMIT 1",
        binding_id,
        key,
        since
    )
    .fetch_optional(db)
    .await?)
}

/// Gets the tenant's run `id`.
///
/// The row is found by primary key alone and its tenant compared here: with
/// `tenant_id` in the query, a plan made while `runs` looked small (a new
/// installation, before autovacuum's first ANALYZE) walked the tenant's
/// whole range of `runs_tenant_create_time` (since dropped) and filtered on the id, and
/// kept doing so for the connection's life (measured: ~1 ms a TriggerRun,
/// a core of PostgreSQL at 1 000 TriggerRun/s).
///
/// # Errors
/// [`Error::NotFound`] when the tenant has no such run.
pub async fn run_get(db: impl PgExecutor<'_>, tenant_id: &str, id: Uuid) -> Result<Run, Error> {
    let row = sqlx::query_as!(
        RunRow,
        "SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
         FROM runs WHERE id = $1",
        id
    )
    .fetch_optional(db)
    .await?;
    match row {
        Some(r) if r.tenant_id == tenant_id => r.try_into(),
        _ => Err(Error::NotFound),
    }
}

/// Which runs [`run_list`] returns: all of the given filters hold.
#[derive(Debug, Clone, Default)]
pub struct RunQuery<'a> {
    /// Only runs of this binding.
    pub binding_id: Option<Uuid>,
    /// Only runs in one of these states (empty: any).
    pub states: &'a [RunState],
    /// Only runs of this trigger.
    pub trigger: Option<RunTrigger>,
    /// Only runs of this definition.
    pub definition: Option<&'a str>,
    /// Only runs executed (claimed) by this node.
    pub node: Option<&'a str>,
    /// Only runs with `scheduled_time >=` this.
    pub scheduled_from: Option<DateTime<Utc>>,
    /// Only runs with `scheduled_time <` this.
    pub scheduled_until: Option<DateTime<Utc>>,
    /// Ascending id (oldest first) instead of descending.
    pub oldest_first: bool,
}

impl RunQuery<'_> {
    /// Whether anything but the binding narrows the list.
    fn filters(&self) -> bool {
        !self.states.is_empty()
            || self.trigger.is_some()
            || self.definition.is_some()
            || self.node.is_some()
            || self.scheduled_from.is_some()
            || self.scheduled_until.is_some()
    }
}

/// One call's answer of [`run_list`].
#[derive(Debug, Clone, Default)]
pub struct RunListed {
    /// Matching runs, in the query's order, at most `limit`.
    pub runs: Vec<Run>,
    /// Set when the scan stopped at `scan` runs before finding `limit`
    /// matching ones: the id of the last run scanned, where the next call
    /// goes on.
    pub scanned_to: Option<Uuid>,
}

/// Lists up to `limit` of the tenant's runs matching `f`, after the cursor
/// `after` in the query's order (id descending: newest first, or ascending
/// with `oldest_first`; `None` starts at the beginning). The tenant's runs
/// (or the binding's) are read in id order and filtered, but at most `scan`
/// of them per call: when fewer than `limit` matched by then,
/// [`RunListed::scanned_to`] says where the scan stopped, so one call never
/// reads more than `scan` rows however selective the filters.
///
/// # Errors
/// [`Error::Sqlx`] on database failure; [`Error::Corrupt`] for bad JSON.
pub async fn run_list(
    conn: &mut PgConnection,
    tenant_id: &str,
    f: &RunQuery<'_>,
    after: Option<Uuid>,
    scan: i64,
    limit: i64,
) -> Result<RunListed, Error> {
    let states: Vec<&str> = f.states.iter().map(|s| s.as_str()).collect();
    let scan = scan.max(1);
    let after = after.unwrap_or(if f.oldest_first {
        Uuid::nil()
    } else {
        Uuid::max()
    });
    // One statement per order and per index (binding or tenant), so each
    // reads its index in order and stops early.
    let rows = match (f.oldest_first, f.binding_id.is_some()) {
        (false, true) => sqlx::query_as!(
                RunRow,
                r#"SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
         FROM (SELECT * FROM runs WHERE tenant_id = $1 AND binding_id = $2 AND id < $3
               ORDER BY id DESC LIMIT $10) s
         WHERE (cardinality($4::text[]) = 0 OR s.state = ANY($4))
           AND ($5::text IS NULL OR s.trigger = $5) AND ($6::text IS NULL OR s.definition = $6)
           AND ($7::text IS NULL OR s.node_id = $7)
           AND ($8::timestamptz IS NULL OR s.scheduled_time >= $8)
           AND ($9::timestamptz IS NULL OR s.scheduled_time < $9)
         ORDER BY s.id DESC LIMIT $11"#,
                tenant_id,
                f.binding_id,
                after,
                &states as &[&str],
                f.trigger.map(RunTrigger::as_str),
                f.definition,
                f.node,
                f.scheduled_from,
                f.scheduled_until,
                scan,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?,
        (false, false) => sqlx::query_as!(
                RunRow,
                r#"SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
         FROM (SELECT * FROM runs WHERE tenant_id = $1 AND id < $3 AND $2::uuid IS NULL
               ORDER BY id DESC LIMIT $10) s
         WHERE (cardinality($4::text[]) = 0 OR s.state = ANY($4))
           AND ($5::text IS NULL OR s.trigger = $5) AND ($6::text IS NULL OR s.definition = $6)
           AND ($7::text IS NULL OR s.node_id = $7)
           AND ($8::timestamptz IS NULL OR s.scheduled_time >= $8)
           AND ($9::timestamptz IS NULL OR s.scheduled_time < $9)
         ORDER BY s.id DESC LIMIT $11"#,
                tenant_id,
                f.binding_id,
                after,
                &states as &[&str],
                f.trigger.map(RunTrigger::as_str),
                f.definition,
                f.node,
                f.scheduled_from,
                f.scheduled_until,
                scan,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?,
        (true, true) => sqlx::query_as!(
                RunRow,
                r#"SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
         FROM (SELECT * FROM runs WHERE tenant_id = $1 AND binding_id = $2 AND id > $3
               ORDER BY id ASC LIMIT $10) s
         WHERE (cardinality($4::text[]) = 0 OR s.state = ANY($4))
           AND ($5::text IS NULL OR s.trigger = $5) AND ($6::text IS NULL OR s.definition = $6)
           AND ($7::text IS NULL OR s.node_id = $7)
           AND ($8::timestamptz IS NULL OR s.scheduled_time >= $8)
           AND ($9::timestamptz IS NULL OR s.scheduled_time < $9)
         ORDER BY s.id ASC LIMIT $11"#,
                tenant_id,
                f.binding_id,
                after,
                &states as &[&str],
                f.trigger.map(RunTrigger::as_str),
                f.definition,
                f.node,
                f.scheduled_from,
                f.scheduled_until,
                scan,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?,
        (true, false) => sqlx::query_as!(
                RunRow,
                r#"SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress
         FROM (SELECT * FROM runs WHERE tenant_id = $1 AND id > $3 AND $2::uuid IS NULL
               ORDER BY id ASC LIMIT $10) s
         WHERE (cardinality($4::text[]) = 0 OR s.state = ANY($4))
           AND ($5::text IS NULL OR s.trigger = $5) AND ($6::text IS NULL OR s.definition = $6)
           AND ($7::text IS NULL OR s.node_id = $7)
           AND ($8::timestamptz IS NULL OR s.scheduled_time >= $8)
           AND ($9::timestamptz IS NULL OR s.scheduled_time < $9)
         ORDER BY s.id ASC LIMIT $11"#,
                tenant_id,
                f.binding_id,
                after,
                &states as &[&str],
                f.trigger.map(RunTrigger::as_str),
                f.definition,
                f.node,
                f.scheduled_from,
                f.scheduled_until,
                scan,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?,
    };
    let runs: Vec<Run> = rows
        .into_iter()
        .map(Run::try_from)
        .collect::<Result<_, _>>()?;
    // Not every row scanned matched: did the scan stop at `scan` rows?
    let scanned_to = if (runs.len() as i64) < limit && f.filters() {
        match (f.oldest_first, f.binding_id.is_some()) {
            (false, true) => sqlx::query_scalar!(
                "SELECT id FROM runs WHERE tenant_id = $1 AND binding_id = $2 AND id < $3 ORDER BY id DESC OFFSET $4 LIMIT 1",
                tenant_id,
                f.binding_id,
                after,
                scan - 1,
            )
            .fetch_optional(&mut *conn)
            .await?,
            (false, false) => sqlx::query_scalar!(
                "SELECT id FROM runs WHERE tenant_id = $1 AND id < $3 AND $2::uuid IS NULL ORDER BY id DESC OFFSET $4 LIMIT 1",
                tenant_id,
                f.binding_id,
                after,
                scan - 1,
            )
            .fetch_optional(&mut *conn)
            .await?,
            (true, true) => sqlx::query_scalar!(
                "SELECT id FROM runs WHERE tenant_id = $1 AND binding_id = $2 AND id > $3 ORDER BY id ASC OFFSET $4 LIMIT 1",
                tenant_id,
                f.binding_id,
                after,
                scan - 1,
            )
            .fetch_optional(&mut *conn)
            .await?,
            (true, false) => sqlx::query_scalar!(
                "SELECT id FROM runs WHERE tenant_id = $1 AND id > $3 AND $2::uuid IS NULL ORDER BY id ASC OFFSET $4 LIMIT 1",
                tenant_id,
                f.binding_id,
                after,
                scan - 1,
            )
            .fetch_optional(&mut *conn)
            .await?,
        }
    } else {
        None
    };
    Ok(RunListed { runs, scanned_to })
}

/// The run's current state and highest event seq (any tenant; for stream
/// bookkeeping after the caller's access was checked).
///
/// # Errors
/// [`Error::NotFound`] when there is no such run.
pub async fn run_progress(db: impl PgExecutor<'_>, id: Uuid) -> Result<(RunState, i64), Error> {
    let r = sqlx::query!("SELECT state, last_seq FROM runs WHERE id = $1", id)
        .fetch_one(db)
        .await?;
    let state = RunState::parse(&r.state).ok_or_else(|| Error::Corrupt {
        what: "run state",
        source: <serde_json::Error as serde::de::Error>::custom(r.state.clone()),
    })?;
    Ok((state, r.last_seq))
}
