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

/// The tenant's step runs among `ids` that are still waiting or running,
/// for a cancel of their workflow run `parent`.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn run_active_steps(
    db: impl PgExecutor<'_>,
    tenant_id: &str,
    parent: Uuid,
) -> Result<Vec<(Uuid, String)>, Error> {
    let rows = sqlx::query!(
        r#"SELECT id, state FROM runs
           WHERE parent_run_id = $2 AND tenant_id = $1 AND state IN ('SCHEDULED', 'QUEUED', 'RUNNING')
           ORDER BY id"#,
        tenant_id,
        parent
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.state)).collect())
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
