//! The firing loop: turns due bindings into `QUEUED` runs. It never executes
//! anything (that is [`crate::executor`]).
//!
//! Each pass, in one transaction: lock up to [`Scheduler::batch`] bindings
//! with `next_run_time <= now` (`FOR UPDATE SKIP LOCKED`, so nodes split the
//! work), insert one run per binding for its fire time (the unique index on
//! `(binding_id, scheduled_time)` makes a second insert for the same time a
//! no-op), and advance `next_run_time` from that fire time (never from "now
//! plus period", so no drift). A binding that fell behind (node down, or
//! overloaded) runs once for its latest missed fire time: see
//! [`crate::domain::coalesce_due`].
//!
//! Between passes the loop sleeps until the earliest `next_run_time`, or
//! until woken by a binding change (LISTEN/NOTIFY via the bridge), or at most
//! [`Scheduler::max_sleep`] (the poll fallback for lost notifications) — no
//! fixed one-minute polling.
//!
//! Failure handling: a failed pass rolls back (nothing fired, nothing
//! advanced) and is retried after a short pause; a crash mid-pass leaves the
//! bindings due, and another node (or this one on restart) fires them.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, runs::NewRun};
use crate::domain::{Clock, RunState, RunTrigger, plan_fires};
use crate::events::EventBus;

/// The firing loop of one node.
#[derive(Debug, Clone)]
pub struct Scheduler {
    /// Database.
    pub pool: PgPool,
    /// Source of now.
    pub clock: Clock,
    /// This node's id (in NOTIFY payloads).
    pub node_id: String,
    /// Where created runs' first events are published.
    pub bus: EventBus,
    /// Woken on binding changes.
    pub wake: Arc<Notify>,
    /// Woken after runs were queued (the local executor).
    pub executor_wake: Arc<Notify>,
    /// Bindings fired per transaction.
    pub batch: i64,
    /// Longest sleep between passes (poll fallback).
    pub max_sleep: Duration,
}

impl Scheduler {
    /// Runs passes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pause = match self.fire_due().await {
                Ok(n) if n as i64 >= self.batch => Duration::ZERO, // more may be due
                Ok(_) => self.sleep_time().await,
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler pass failed; retrying");
                    Duration::from_millis(500)
                }
            };
            if pause.is_zero() {
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn sleep_time(&self) -> Duration {
        match db::bindings::binding_next_due_time(&self.pool).await {
            Ok(Some(t)) => (t - self.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(self.max_sleep),
            Ok(None) => self.max_sleep,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler could not read the next due time");
                Duration::from_millis(500)
            }
        }
    }

    /// One pass: fires up to `batch` due bindings. Returns how many bindings
    /// were due (fired or found already fired).
    ///
    /// # Errors
    /// [`db::Error`] when the transaction fails; nothing is fired then.
    pub async fn fire_due(&self) -> Result<usize, db::Error> {
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        let due = db::bindings::binding_lock_due(&mut *tx, now, self.batch).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let mut runs = Vec::with_capacity(due.len());
        let mut ids = Vec::with_capacity(due.len());
        let mut nexts = Vec::with_capacity(due.len());
        for b in &due {
            let plan = plan_fires(&b.schedule, b.next_run_time, now, &b.misfire_policy);
            if !plan.skipped.is_empty() {
                tracing::info!(binding = %b.id, skipped = plan.skipped.len(), runs = plan.run.len(),
                    "binding missed fire times; applying its misfire policy");
            }
            let new_run = |time, state, reason: String| NewRun {
                id: Uuid::now_v7(),
                tenant_id: b.tenant_id.clone(),
                binding_id: b.id,
                definition: b.definition.clone(),
                trigger: RunTrigger::Schedule,
                scheduled_time: time,
                // Deterministic per (binding, fire time): every node agrees.
                not_before: time + b.schedule.jitter_for(b.id.as_bytes(), time),
                handler: b.handler.clone(),
                params: b.params.clone(),
                state,
                reason,
            };
            runs.extend(
                plan.skipped
                    .into_iter()
                    .map(|(t, reason)| new_run(t, RunState::Skipped, reason)),
            );
            runs.extend(
                plan.run
                    .into_iter()
                    .map(|t| new_run(t, RunState::Queued, String::new())),
            );
            ids.push(b.id);
            nexts.push(plan.next);
        }
        let events = db::runs::run_insert(&mut tx, &self.node_id, &runs, now).await?;
        db::bindings::binding_set_next_run_times(&mut *tx, &ids, &nexts).await?;
        tx.commit().await?;
        tracing::debug!(due = due.len(), fired = events.len(), "scheduler pass");
        if !events.is_empty() {
            self.bus.publish(events);
            self.executor_wake.notify_one();
        }
        Ok(due.len())
    }
}
