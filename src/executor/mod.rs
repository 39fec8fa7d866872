//! Claims queued runs and executes them.
//!
//! The claim loop takes up to the number of free slots
//! (`max_concurrent_runs` minus running) in one statement (`FOR UPDATE SKIP
//! LOCKED`, so no two nodes claim the same run), commits, and only then runs
//! each handler outside any transaction. It wakes on the `sked_runs` NOTIFY
//! (and locally right after the scheduler queued runs), when a run finishes,
//! and every [`Executor::poll`] as a fallback.
//!
//! State machine of a run here: `QUEUED → RUNNING` (claim) `→ SUCCEEDED |
//! FAILED` (finish). Finish is conditional on `RUNNING` at the claimed attempt,
//! so it can never overwrite a terminal state written by someone else.
//!
//! Failure handling: a handler that cannot start ends `FAILED` with the
//! reason; a database error while writing the final state is retried a few
//! times, then logged (the run stays `RUNNING` until its lease is reaped).

pub mod command;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::db::{self, runs::Outcome};
use crate::domain::{Clock, EventBody, Handler, Run, RunState};
use crate::events::EventBus;

/// The executor of one node.
#[derive(Debug, Clone)]
pub struct Executor {
    /// Database.
    pub pool: PgPool,
    /// Source of now.
    pub clock: Clock,
    /// This node's id (written to claimed runs).
    pub node_id: String,
    /// Where run events are published.
    pub bus: EventBus,
    /// Woken when runs are queued.
    pub wake: Arc<Notify>,
    /// Runs executing at once on this node; 0 = this node executes nothing
    /// (API and scheduler only).
    pub max_concurrent_runs: usize,
    /// Lease taken on claim.
    pub lease: Duration,
    /// Claim poll fallback.
    pub poll: Duration,
    /// On shutdown, how long running runs may go on before they are abandoned.
    pub shutdown_grace: Duration,
}

impl Executor {
    /// Claims and executes runs until `shutdown`, then waits up to
    /// `shutdown_grace` for running ones.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let mut running: JoinSet<()> = JoinSet::new();
        loop {
            let free = this.max_concurrent_runs.saturating_sub(running.len());
            if free > 0 {
                match this.claim(free).await {
                    Ok(runs) => {
                        for run in runs {
                            let ex = Arc::clone(&this);
                            running.spawn(async move { ex.execute(run).await });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming runs failed"),
                }
            }
            tokio::select! {
                _ = this.wake.notified() => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tokio::time::sleep(this.poll) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if !running.is_empty() {
            tracing::info!(
                running = running.len(),
                "waiting for running runs to finish"
            );
            let drain = async { while running.join_next().await.is_some() {} };
            if tokio::time::timeout(this.shutdown_grace, drain)
                .await
                .is_err()
            {
                tracing::warn!(
                    abandoned = running.len(),
                    "shutdown grace over; abandoning runs"
                );
                running.abort_all();
            }
        }
    }

    async fn claim(&self, free: usize) -> Result<Vec<Run>, db::Error> {
        let mut conn = self.pool.acquire().await?;
        let lease = chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(30));
        let claimed = db::runs::run_claim(
            &mut conn,
            &self.node_id,
            self.clock.now(),
            lease,
            free as i64,
        )
        .await?;
        let mut runs = Vec::with_capacity(claimed.len());
        for (run, ev) in claimed {
            self.bus.publish([ev]);
            runs.push(run);
        }
        Ok(runs)
    }

    #[tracing::instrument(skip_all, fields(run = %run.id, binding = %run.binding_id, definition = %run.definition))]
    async fn execute(&self, run: Run) {
        let (state, outcome) = match &run.handler {
            Handler::Command(c) => command::execute(self, &run, c).await,
        };
        self.finish(&run, state, outcome).await;
    }

    /// Appends events to the run's log and publishes them. Errors are logged;
    /// the caller goes on (the run's final state matters more than a line).
    pub(crate) async fn append(&self, run: &Run, bodies: &[EventBody]) -> Result<(), db::Error> {
        let mut conn = self.pool.acquire().await?;
        let events =
            db::events::event_append(&mut conn, &self.node_id, run.id, bodies, self.clock.now())
                .await?;
        self.bus.publish(events);
        Ok(())
    }

    async fn finish(&self, run: &Run, state: RunState, outcome: Outcome) {
        for attempt in 0..5 {
            let r = async {
                let mut conn = self.pool.acquire().await?;
                db::runs::run_finish(
                    &mut conn,
                    &self.node_id,
                    run.id,
                    run.attempt,
                    state,
                    &outcome,
                    self.clock.now(),
                )
                .await
            }
            .await;
            match r {
                Ok(Some(ev)) => {
                    tracing::info!(state = state.as_str(), reason = %outcome.reason, "run finished");
                    self.bus.publish([ev]);
                    return;
                }
                Ok(None) => {
                    tracing::warn!(
                        "run was no longer RUNNING when it finished; its final state stands"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "writing the run's final state failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        tracing::error!(
            "could not write the run's final state; it stays RUNNING until its lease expires"
        );
    }
}
