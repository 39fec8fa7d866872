//! Workflow steps (migration `20261205000200_workflows.sql`, where the DAG
//! advances): the step runs of a workflow run, and which runs are steps.

use sqlx::PgExecutor;
use uuid::Uuid;

use super::RunRow;
use crate::db::Error;
use crate::domain::Run;

/// Where a run sits in a workflow: its workflow run and step name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOf {
    /// The run.
    pub run_id: Uuid,
    /// The workflow run it is a step of.
    pub parent_run_id: Uuid,
    /// The step's name.
    pub step: String,
}

/// Every run (every attempt) of every step of the tenant's workflow run
/// `parent`, oldest first, with its step name; empty for a run that is not
/// a workflow or has no steps yet. At most 100 steps, each with its
/// attempts (≤ 100).
///
/// # Errors
/// [`Error::Sqlx`] on database failure; [`Error::Corrupt`] for bad JSON.
pub async fn run_steps(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    parent: Uuid,
) -> Result<Vec<(Run, String)>, Error> {
    let rows = sqlx::query!(
        r#"SELECT id, tenant_id, binding_id, definition, trigger, state, attempt, scheduled_time,
                  create_time, start_time, end_time, handler, params, result, error_message,
                  error_summary, exit_code, node_id, reason, last_seq, not_before, retry_of,
                  retry_policy, timeout_secs, overlap_policy, priority, idempotency_key, cancel_reason, progress,
                  step AS "step!"
           FROM runs WHERE parent_run_id = $2 AND tenant_id = $1
           ORDER BY create_time, id"#,
        tenant_id,
        parent
    )
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|r| {
            let step = r.step;
            let row = RunRow {
                id: r.id,
                tenant_id: r.tenant_id,
                binding_id: r.binding_id,
                definition: r.definition,
                trigger: r.trigger,
                state: r.state,
                attempt: r.attempt,
                scheduled_time: r.scheduled_time,
                create_time: r.create_time,
                start_time: r.start_time,
                end_time: r.end_time,
                handler: r.handler,
                params: r.params,
                result: r.result,
                error_message: r.error_message,
                error_summary: r.error_summary,
                exit_code: r.exit_code,
                node_id: r.node_id,
                reason: r.reason,
                last_seq: r.last_seq,
                not_before: r.not_before,
                retry_of: r.retry_of,
                retry_policy: r.retry_policy,
                timeout_secs: r.timeout_secs,
                overlap_policy: r.overlap_policy,
                priority: r.priority,
                idempotency_key: r.idempotency_key,
                cancel_reason: r.cancel_reason,
                progress: r.progress,
            };
            Ok((Run::try_from(row)?, step))
        })
        .collect()
}

/// Which of runs `ids` are workflow steps, and of what.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_steps_of(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<StepOf>, Error> {
    let rows = sqlx::query!(
        r#"SELECT id, parent_run_id AS "parent_run_id!", step AS "step!" FROM runs
           WHERE id = ANY($1) AND parent_run_id IS NOT NULL"#,
        ids
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StepOf {
            run_id: r.id,
            parent_run_id: r.parent_run_id,
            step: r.step,
        })
        .collect())
}

/// The steps of workflow runs `parents` (any tenant's) that are still
/// waiting or running, as `(id, state)`, in id order.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_active_steps_of(
    db: impl PgExecutor<'_>,
    parents: &[Uuid],
) -> Result<Vec<(Uuid, String)>, Error> {
    let rows = sqlx::query!(
        r#"SELECT id, state FROM runs
           WHERE parent_run_id = ANY($1) AND state IN ('SCHEDULED', 'QUEUED', 'RUNNING')
           ORDER BY id"#,
        parents
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.state)).collect())
}

/// Stops the steps of workflow runs `parents` (CancelRun of a workflow
/// run, its timeout): the waiting ones end `CANCELLED` with `reason` at
/// once (their events returned, to publish after the commit), the running
/// ones are asked to stop with it (`run_request_cancel`).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_stop_steps(
    tx: &mut sqlx::PgConnection,
    node_id: &str,
    parents: &[Uuid],
    reason: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<crate::domain::RunEvent>, Error> {
    let (running, waiting): (Vec<_>, Vec<_>) = run_active_steps_of(&mut *tx, parents)
        .await?
        .into_iter()
        .partition(|(_, state)| state == "RUNNING");
    let waiting: Vec<Uuid> = waiting.into_iter().map(|(id, _)| id).collect();
    let running: Vec<Uuid> = running.into_iter().map(|(id, _)| id).collect();
    let events = super::run_cancel_waiting(&mut *tx, node_id, &waiting, reason, now).await?;
    super::run_request_cancel(&mut *tx, &running, reason).await?;
    Ok(events)
}

/// Workflow runs `RUNNING` past their own timeout (`start_time` +
/// `timeout_secs` ≤ `now`) and not yet asked to stop, oldest first, at most
/// `limit` (index `runs_workflow_timeout`, migration
/// `20261209000100_workflow_timeout.sql`).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_workflows_past_timeout(
    db: impl PgExecutor<'_>,
    now: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar!(
        r#"SELECT id FROM runs
           WHERE state = 'RUNNING' AND timeout_secs IS NOT NULL AND (handler ->> 'kind') = 'workflow'
             AND cancel_reason IS NULL
             AND start_time + make_interval(secs => timeout_secs) <= $1
           ORDER BY start_time LIMIT $2"#,
        now,
        limit
    )
    .fetch_all(db)
    .await?)
}

/// Advances workflow runs `ids` now (`sked_workflow_advance_guarded`), as
/// a step's end does at commit: ends those whose steps have all ended (a
/// cancel, a timeout). A no-op for a run that is not a `RUNNING` workflow.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_workflow_advance(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<(), Error> {
    sqlx::query!(
        "SELECT sked_workflow_advance_guarded(id) FROM unnest($1::uuid[]) AS id",
        ids
    )
    .fetch_all(db)
    .await?;
    Ok(())
}

/// The tenant's step runs of workflow run `parent` as `(id, step name)`,
/// in creation order (a workflow tail's list of logs to follow).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_step_ids(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    parent: Uuid,
) -> Result<Vec<(Uuid, String)>, Error> {
    let rows = sqlx::query!(
        r#"SELECT id, step AS "step!" FROM runs
           WHERE parent_run_id = $2 AND tenant_id = $1
           ORDER BY create_time, id"#,
        tenant_id,
        parent
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.step)).collect())
}
