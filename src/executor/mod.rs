//! Claims queued runs and executes them; renews their leases; reaps runs
//! whose node died; stops runs on cancel, timeout and shutdown.
//!
//! The claim loop takes up to the number of free slots
//! (`max_concurrent_runs` minus running) in one statement (`FOR UPDATE SKIP
//! LOCKED`, so no two nodes claim the same run), commits, and only then runs
//! each handler outside any transaction.
//!
//! **Per-tenant share:** one tenant holds at most [`tenant_slot_cap`] of a
//! node's slots (`max_concurrent_runs` minus a quarter of it, at least one
//! fewer: 64 → 48, 4 → 3, 2 → 1, 1 → 1), so however many long runs one
//! tenant queues, a quarter of every node's slots stays open to the others.
//! The loop counts its running runs per tenant; a claim skips the tenants
//! at their share (their backlog is not even read, see
//! [`db::runs::run_claim`]) and takes at most as many runs as the tenant
//! closest to its share may still start, so no claim pushes a tenant past
//! it. A claim cut short so claims again at once. A tenant alone on a node
//! still gets its share, not all of it; `event` runs hold no slot and are
//! not counted. Each pass it also moves due
//! `SCHEDULED` runs (retry backoff, delayed triggers) to `QUEUED` and reaps
//! expired leases. It wakes on the `sked_runs` NOTIFY (and locally right
//! after the scheduler queued runs), when a run finishes, at the next
//! `not_before` of a waiting run, and every [`Executor::poll`] as a fallback.
//! That `not_before` is read by each pass's promotion (in the statement that
//! sends its notifications) and named by the `scheduled` notifications of
//! runs written since (`DueTimer`), so sleeping costs no read of its own.
//!
//! State machine of a run here:
//!
//! ```text
//! SCHEDULED ─promote─► QUEUED ─claim─► RUNNING ─finish─► SUCCEEDED | FAILED | TIMED_OUT | CANCELLED
//!                                         └────reap (lease expired)────► FAILED/node_lost
//! ```
//!
//! Every transition is conditional on the expected state and attempt, so a
//! late writer (a node that lost its lease, a finish racing a reaper) never
//! overwrites a terminal run.
//!
//! Failure handling:
//! - **Leases:** a claimed run holds `lease_expires_at`; a heartbeat task
//!   renews the leases of this node's runs every `lease / 3`. When a node
//!   dies, any node's reaper ends its runs `FAILED` with reason `node_lost`
//!   once the lease is over (within 2 × lease of the last heartbeat) and
//!   retries them per policy. A node whose heartbeat finds a run no longer
//!   its own stops executing it.
//! - **Retries:** `FAILED`, `TIMED_OUT`, `node_lost` and shutdown-cancelled
//!   attempts with attempts left get a `SCHEDULED` retry in the same
//!   transaction as their final state ([`retry_run`]).
//! - **Stopped bindings:** the claim takes no run of a deleted, paused or
//!   disabled binding (manual runs excepted for pause/disable; see
//!   [`db::runs::run_claim`]); a retry is written only while its binding
//!   exists (its row lock orders the finish with a DeleteBinding), and a
//!   due retry whose binding is gone is cancelled (`binding_deleted`)
//!   instead of queued.
//! - **Cancel:** a cancel request reaches the executing node by NOTIFY on
//!   `sked_cancel` (through the bridge) or by its next heartbeat; the run's
//!   process group gets SIGTERM, then SIGKILL after [`Executor::kill_grace`].
//! - **Shutdown:** stop claiming, give running runs
//!   [`Executor::shutdown_grace`], then cancel the rest with reason
//!   `shutdown` and wait for their final state to be written.
//! - A database error while writing a final state is retried a few times,
//!   then logged; the run stays `RUNNING` until its lease is reaped.

pub mod command;
pub mod http;
pub mod notify;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{
    self,
    runs::{ClaimKind, Outcome},
};
use crate::domain::{Clock, EventBody, Handler, NewRun, Run, RunReason, RunState};
use crate::events::EventBus;
use crate::events::bridge::{Due, DueTimer, LocalRuns, WakeAll};
use crate::telemetry::metrics;

/// Shortest time between two passes of the claim loop (from the start of
/// one to the start of the next): runs due within it are promoted (or
/// claimed) together, and a due run another node holds locked cannot make
/// the loop spin.
const MIN_SLEEP: Duration = Duration::from_millis(5);

/// Runs promoted or reaped per statement.
const MAINTENANCE_BATCH: i64 = 1000;
/// Runs of `event` handlers claimed and completed per transaction.
pub const EVENT_BATCH: usize = 1000;

/// Why an executing run is being stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// CancelRun or an overlap policy; the run ends `CANCELLED` with it.
    Cancel(String),
    /// The node shuts down; `CANCELLED`/`shutdown`, retried per policy.
    Shutdown,
    /// The run is no longer this node's (reaped); its state stands.
    LeaseLost,
}

/// A stop signal for one executing run: the first reason set wins.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    why: Arc<OnceLock<StopReason>>,
}

impl Stop {
    /// Asks the run to stop (idempotent; the first reason stands).
    pub fn stop(&self, why: StopReason) {
        let _ = self.why.set(why);
        self.token.cancel();
    }
    /// Resolves when a stop was asked.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }
    /// The reason, once asked.
    pub fn reason(&self) -> Option<&StopReason> {
        self.why.get()
    }
}

/// The runs executing on this node, by id, so cancel requests (bridge,
/// heartbeat) and shutdown can reach them.
#[derive(Debug, Clone, Default)]
pub struct RunningRuns(Arc<Mutex<HashMap<Uuid, Stop>>>);

impl RunningRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Stop>> {
        // A panic while holding this lock leaves a plain map behind; keep going.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn insert(&self, id: Uuid) -> Stop {
        let stop = Stop::default();
        self.lock().insert(id, stop.clone());
        stop
    }
    fn remove(&self, id: Uuid) {
        self.lock().remove(&id);
    }
    fn ids(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }
    /// How many runs execute here now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    /// Whether none does.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
    /// Forgets every run: after the executor's task died, its runs' tasks
    /// are gone with it, and their leases must lapse (the reaper ends them
    /// `node_lost` and retries them per policy) instead of being renewed by
    /// the restarted executor's heartbeat. Returns how many were forgotten.
    pub fn abandon_all(&self) -> usize {
        let mut map = self.lock();
        for s in map.values() {
            s.stop(StopReason::LeaseLost);
        }
        let n = map.len();
        map.clear();
        n
    }
    /// Stops run `id` if it executes here; returns whether it does.
    pub fn stop(&self, id: Uuid, why: StopReason) -> bool {
        match self.lock().get(&id) {
            Some(s) => {
                s.stop(why);
                true
            }
            None => false,
        }
    }
    fn stop_all(&self, why: StopReason) {
        for s in self.lock().values() {
            s.stop(why.clone());
        }
    }
}

impl LocalRuns for RunningRuns {
    fn cancel(&self, id: Uuid, reason: &str) -> bool {
        self.stop(id, StopReason::Cancel(reason.to_string()))
    }
}

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
    /// Woken when runs it may claim are queued (or a slot freed up).
    pub wake: Arc<Notify>,
    /// Woken when `SCHEDULED` runs are written, with when the first is
    /// due when the writer said: end the sleep sooner for it (no claim,
    /// no promotion until one is due).
    pub timer: Arc<DueTimer>,
    /// The worker dispatch of this node, woken at once when a promotion
    /// queues `worker` runs (other nodes hear the NOTIFY).
    pub workers_wake: Arc<Notify>,
    /// The event claim loops of this node (one per
    /// [`db::runs::EVENT_SHARDS`]): woken when `event` runs are queued,
    /// and whenever the slot claim loop claims.
    pub events_wake: WakeAll,
    /// Runs executing here (shared with the bridge for cancel requests).
    pub running: RunningRuns,
    /// Runs executing at once on this node; 0 = this node executes nothing
    /// (API, scheduler and maintenance only). One tenant holds at most
    /// [`tenant_slot_cap`] of them.
    pub max_concurrent_runs: usize,
    /// Lease taken on claim and renewed every `lease / 3`.
    pub lease: Duration,
    /// Claim poll fallback.
    pub poll: Duration,
    /// On shutdown, how long running runs may go on before they are cancelled.
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long a process group has before SIGKILL (default 10 s).
    pub kill_grace: Duration,
    /// The client of `http` runs (SSRF guard, no proxy; [`http`]).
    pub http: http::HttpClient,
}

impl Executor {
    /// Claims and executes runs until `shutdown`, then drains (module docs).
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        // The heartbeat outlives claiming: it keeps renewing leases while
        // running runs drain, and stops once they are done.
        let heartbeat_stop = CancellationToken::new();
        // One loop per event shard completes event runs (they hold no slot
        // and take their shard's claim lock, not the slot claims' one), so
        // a workflow's next event step is claimed while the slot claim
        // runs, and the shards' claims use two cores.
        let mut event_loops = JoinSet::new();
        for shard in 0..db::runs::EVENT_SHARDS {
            event_loops.spawn(Arc::clone(&this).event_loop(
                shard,
                this.events_wake.waiter(),
                shutdown.clone(),
            ));
        }
        tokio::join!(
            async {
                Arc::clone(&this).claim_and_drain(shutdown.clone()).await;
                heartbeat_stop.cancel();
            },
            async {
                while let Some(r) = event_loops.join_next().await {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "an event claim loop died");
                    }
                }
            },
            Arc::clone(&this).heartbeat(heartbeat_stop.clone()),
        );
    }

    /// Completes the event runs of `shard` ([`db::runs::EVENT_SHARDS`]):
    /// claims again at once while claims find runs, else waits for `wake`
    /// (event runs queued: their NOTIFY or a promotion; a run that ended
    /// here, which may have left its tenant quota room) or the poll.
    async fn event_loop(
        self: Arc<Self>,
        shard: u32,
        mut wake: tokio::sync::watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let started = tokio::time::Instant::now();
            match self.complete_events(shard).await {
                // A full batch: a backlog (a backfill) is draining. Pause
                // as long as the claim took, so that the loops together
                // use at most one core's worth and the scheduler's firing
                // passes keep the other: two loops claiming 1 000 runs
                // back to back on two cores delayed firing past the
                // misfire grace (probe::backfills_of_one_tenant_do_not_
                // starve_another_tenants_schedule).
                Ok(n) if n >= EVENT_BATCH && db::runs::EVENT_SHARDS > 1 => {
                    tokio::select! {
                        _ = tokio::time::sleep(started.elapsed()) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
                // More may be waiting (a next run of an overlap-free
                // binding, a workflow's next step): again at once.
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, shard, "completing event runs failed"),
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(self.poll) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }

    async fn claim_and_drain(self: Arc<Self>, shutdown: CancellationToken) {
        let this = self;
        let mut running = Slots::default();
        let cap = tenant_slot_cap(this.max_concurrent_runs);
        let mut last_reap: Option<tokio::time::Instant> = None;
        let mut last_deadlines = tokio::time::Instant::now();
        // Whether a claim may find something: a claim that comes back short
        // clears it, and only what can queue runs for this loop sets it (a
        // wake, a freed slot, a promotion of local runs, a jittered run
        // coming due, the poll). A promotion of worker runs alone, or a
        // SCHEDULED run written, costs no claim statement (they take the
        // claim lock every other claim waits on).
        let mut claim_due = true;
        // Whether a run ended here since the event loops were last woken:
        // its tenant may have room under its concurrency quota for event
        // runs that waited for it.
        let mut freed = false;
        let mut last_claim = tokio::time::Instant::now();
        loop {
            let promoted_at = tokio::time::Instant::now();
            // The promotion reads when runs are next due after it: what the
            // timer heard so far is in that read (a run written after it
            // wakes the timer again).
            this.timer.take();
            let mut next_due = None;
            match this.promote().await {
                Ok((w, next)) => {
                    next_due = Some(next);
                    if w.worker {
                        this.workers_wake.notify_one();
                    }
                    if w.event {
                        this.events_wake.wake();
                    }
                    claim_due |= w.local;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "promoting scheduled runs failed");
                    claim_due = true;
                }
            }
            if last_reap.is_none_or(|t| t.elapsed() >= this.lease / 4) {
                last_reap = Some(tokio::time::Instant::now());
                if let Err(e) = this.reap().await {
                    tracing::warn!(error = %e, "reaping expired leases failed");
                }
            }
            // About once per poll (1 s by default; the loop wakes at least
            // that often): a workflow run's timeout is applied that late at
            // most, on whichever node looks first.
            if last_deadlines.elapsed() >= this.poll {
                last_deadlines = tokio::time::Instant::now();
                if let Err(e) = this.time_out_workflows().await {
                    tracing::warn!(error = %e, "stopping workflow runs past their timeout failed; retried");
                }
            }
            // Finished runs free their slots even while event runs keep the
            // loop from sleeping (where they are otherwise joined).
            while running.try_join_next() {
                claim_due = true;
                freed = true;
            }
            if last_claim.elapsed() >= this.poll {
                claim_due = true;
            }
            let claiming = claim_due;
            if claiming {
                last_claim = tokio::time::Instant::now();
                claim_due = false;
            }
            loop {
                let free = this.max_concurrent_runs.saturating_sub(running.len());
                if !claiming || free == 0 {
                    break;
                }
                let (limit, excluded) = claim_plan(free, cap, &running.held);
                match this.claim(limit, &excluded).await {
                    Ok(runs) => {
                        let n = runs.len();
                        for (run, stop) in runs {
                            let ex = Arc::clone(&this);
                            let tenant = run.tenant_id.clone();
                            running.spawn(tenant, async move { ex.execute(run, stop).await });
                        }
                        // Cut short by a tenant near its share, the claim
                        // may have left other tenants' runs for free slots:
                        // claim again (each round fills at least a slot).
                        if n < limit || limit == free {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming runs failed");
                        claim_due = true;
                        break;
                    }
                }
            }
            // Event handler runs need no slot: they complete in their
            // claim, in the event loops. Their own NOTIFYs wake those; this
            // loop wakes them when a run ended (quota room). Woken on every
            // claim round, they made two claims for each of this loop's.
            if claiming && freed {
                freed = false;
                this.events_wake.wake();
            }
            // The loop's next pass starts MIN_SLEEP after this one's at the
            // earliest (not MIN_SLEEP after its work): runs due meanwhile
            // wait at most that long.
            let floor = promoted_at + MIN_SLEEP;
            let (pause, mut queued_due) = match next_due {
                Some(next) => this.sleep_for(next, floor),
                None => this.sleep_time(floor).await,
            };
            let sleep = tokio::time::sleep(pause);
            tokio::pin!(sleep);
            let joined = loop {
                tokio::select! {
                    _ = this.wake.notified() => {
                        claim_due = true;
                        break None;
                    }
                    // SCHEDULED runs were written (a TriggerRun with a
                    // future run time, a retry's backoff): end the sleep
                    // sooner if one is due before it ends, nothing else. A
                    // pass of the loop here was a promotion that found
                    // nothing, per TriggerRun. The sleep never ends later,
                    // so these wakes cannot put a due promotion off.
                    _ = this.timer.notified() => {
                        let heard = this.timer.take();
                        // At its floor it cannot end sooner.
                        if sleep.deadline() > floor.max(tokio::time::Instant::now()) {
                            let next = match heard {
                                // Named by the writer: no read. A promotion
                                // (a jittered QUEUED run due sooner would
                                // have been the deadline already).
                                Due::At(t) => Some((this.pause_until(t, floor), false)),
                                Due::Unknown => Some(this.sleep_time(floor).await),
                                // In the read of the last promotion.
                                Due::Nothing => None,
                            };
                            if let Some((pause, queued)) = next {
                                let at = tokio::time::Instant::now() + pause;
                                if at < sleep.deadline() {
                                    sleep.as_mut().reset(at);
                                    queued_due = queued;
                                }
                            }
                        }
                    }
                    Some(r) = running.tasks.join_next_with_id(), if !running.is_empty() => {
                        break Some(r);
                    }
                    _ = &mut sleep => {
                        // A jittered QUEUED run came due (or the poll ran
                        // out, counted above).
                        claim_due |= queued_due;
                        break None;
                    }
                    _ = shutdown.cancelled() => break None,
                }
            };
            if let Some(r) = joined {
                running.joined(r);
                claim_due = true;
                freed = true;
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
        if !running.is_empty() {
            tracing::info!(
                running = running.len(),
                grace = ?this.shutdown_grace,
                "waiting for running runs to finish"
            );
            let drain = async { while running.tasks.join_next().await.is_some() {} };
            if tokio::time::timeout(this.shutdown_grace, drain)
                .await
                .is_err()
            {
                tracing::warn!(
                    running = running.len(),
                    "shutdown grace over; cancelling the remaining runs"
                );
                this.running.stop_all(StopReason::Shutdown);
                // They end CANCELLED/shutdown once their processes are gone.
                let drain = async { while running.tasks.join_next().await.is_some() {} };
                if tokio::time::timeout(this.kill_grace + Duration::from_secs(10), drain)
                    .await
                    .is_err()
                {
                    tracing::error!(
                        abandoned = running.len(),
                        "runs did not stop; abandoning them to the reaper"
                    );
                    running.tasks.abort_all();
                }
            }
        }
    }

    /// How long the claim loop may sleep: until the next waiting run is due,
    /// but not before `floor`, at most `poll`; and whether that is a
    /// jittered `QUEUED` run coming due (a claim then), rather than a
    /// promotion or the poll.
    async fn sleep_time(&self, floor: tokio::time::Instant) -> (Duration, bool) {
        match db::runs::run_next_due_time(&self.pool, self.clock.now()).await {
            Ok(next) => self.sleep_for(next, floor),
            Err(e) => {
                tracing::warn!(error = %e, "reading the next due run failed");
                (self.poll, true)
            }
        }
    }

    /// [`Executor::sleep_time`] from `next`, read earlier.
    fn sleep_for(&self, next: db::runs::NextDue, floor: tokio::time::Instant) -> (Duration, bool) {
        let until = |t| self.pause_until(t, floor);
        let scheduled = next.scheduled.map(until).unwrap_or(self.poll);
        let queued = next.queued.map(until).unwrap_or(self.poll);
        (
            scheduled.min(queued),
            next.queued.is_some() && queued <= scheduled,
        )
    }

    /// How long to sleep for a run due at `t`: not past `floor`, at most
    /// `poll`.
    fn pause_until(
        &self,
        t: chrono::DateTime<chrono::Utc>,
        floor: tokio::time::Instant,
    ) -> Duration {
        let least = floor.saturating_duration_since(tokio::time::Instant::now());
        (t - self.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(least)
            .min(self.poll)
    }

    /// Claims up to `limit` runs to execute, none of the `excluded` tenants.
    async fn claim(
        &self,
        limit: usize,
        excluded: &[String],
    ) -> Result<Vec<(Run, Stop)>, db::Error> {
        let started = std::time::Instant::now();
        let claimed = self
            .claim_kind(limit, ClaimKind::ToExecute, excluded)
            .await?;
        metrics::claimed("execute", started.elapsed(), claimed.iter().map(|c| &c.run));
        let mut runs = Vec::with_capacity(claimed.len());
        for db::runs::Claimed { run, events, .. } in claimed {
            self.bus.publish(events);
            // A workflow run executes nothing here: its start created its
            // first steps in the claim's transaction (migration
            // 20261205000200), and its steps' ends advance and end it.
            if matches!(run.handler, Handler::Workflow(_)) {
                continue;
            }
            let stop = self.running.insert(run.id);
            runs.push((run, stop));
        }
        Ok(runs)
    }

    /// Claims and completes up to [`EVENT_BATCH`] due runs of `event`
    /// handlers in one transaction, publishes their events; returns how
    /// many.
    async fn complete_events(&self, shard: u32) -> Result<usize, db::Error> {
        // They hold no slot, so no tenant's share limits them.
        let started = std::time::Instant::now();
        let done = self
            .claim_kind(EVENT_BATCH, ClaimKind::Event { shard }, &[])
            .await?;
        metrics::claimed("event", started.elapsed(), done.iter().map(|c| &c.run));
        let n = done.len();
        if n > 0 {
            tracing::debug!(runs = n, "event runs completed");
            self.bus.publish(done.into_iter().flat_map(|c| c.events));
        }
        Ok(n)
    }

    async fn claim_kind(
        &self,
        limit: usize,
        kind: ClaimKind,
        excluded: &[String],
    ) -> Result<Vec<db::runs::Claimed>, db::Error> {
        let lease = chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(30));
        let mut tries = 0;
        loop {
            let mut conn = self.pool.acquire().await?;
            match db::runs::run_claim(
                &mut conn,
                &self.node_id,
                &self.clock,
                lease,
                limit as i64,
                kind.clone(),
                excluded,
            )
            .await
            {
                // Another node started a run of the same overlap-free
                // binding at this instant; the index refused ours. Again.
                Err(db::Error::Duplicate(c)) if c == "runs_one_running" && tries < 5 => {
                    tries += 1;
                }
                // Two claims' commits advanced workflows (or wrote rows) in
                // opposite orders and PostgreSQL broke the tie: nothing of
                // this claim was written. Again.
                Err(db::Error::Sqlx(sqlx::Error::Database(d)))
                    if matches!(d.code().as_deref(), Some("40P01" | "40001")) && tries < 5 =>
                {
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    /// Moves due `SCHEDULED` runs to `QUEUED`; says which kinds it queued.
    async fn promote(&self) -> Result<(db::runs::Waiting, db::runs::NextDue), db::Error> {
        let mut conn = self.pool.acquire().await?;
        let promoted = db::runs::run_promote_due(
            &mut conn,
            &self.node_id,
            self.clock.now(),
            MAINTENANCE_BATCH,
        )
        .await?;
        self.bus.publish(promoted.events);
        Ok((promoted.waiting, promoted.next))
    }

    /// Ends runs whose lease expired (their node or worker is gone) and
    /// worker runs nobody took in time (`no_worker`), and schedules their
    /// retries, in one transaction.
    async fn reap(&self) -> Result<(), db::Error> {
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        let mut reaped = db::runs::run_reap(&mut tx, &self.node_id, now, MAINTENANCE_BATCH).await?;
        // Worker runs nobody took within their schedule-to-start timeout
        // end FAILED/no_worker here too, retried alike.
        reaped.extend(
            db::runs::run_fail_no_worker(&mut tx, &self.node_id, now, MAINTENANCE_BATCH).await?,
        );
        if reaped.is_empty() {
            return Ok(());
        }
        let retries: Vec<NewRun> = reaped
            .iter()
            .filter_map(|(run, _)| NewRun::retry_of(self.clock.new_id(), run, true, now))
            .collect();
        let mut events: Vec<_> = reaped.iter().map(|(_, e)| e.clone()).collect();
        events.extend(db::runs::run_insert(&mut tx, &self.node_id, &retries, now).await?);
        // Their ends, final unless retried, in the same transaction.
        let ended: Vec<(uuid::Uuid, bool)> = reaped
            .iter()
            .map(|(run, _)| (run.id, retries.iter().any(|r| r.retry_of == Some(run.id))))
            .collect();
        db::runs::run_end_record(&mut tx, &ended).await?;
        tx.commit().await?;
        metrics::run_durations(reaped.iter().map(|(run, _)| run));
        for (run, _) in &reaped {
            tracing::warn!(run = %run.id, node = ?run.node_id, state = run.state.as_str(),
                reason = ?run.reason, "run ended by the reaper (lease expired, or no worker took it)");
        }
        self.bus.publish(events);
        Ok(())
    }

    /// Stops the workflow runs past their own timeout, in one transaction:
    /// their waiting steps end `CANCELLED` (reason `timeout`) at once, their
    /// running ones are asked to stop (on whichever node or worker runs
    /// them), and the run is marked with cancel reason `timeout`, so that
    /// the end of its last step ends it `TIMED_OUT` and retries it by its
    /// policy (`sked_workflow_advance`, migration
    /// `20261209000100_workflow_timeout.sql`). Rows are taken in the order
    /// a step's end takes them (steps, then the workflow run), as CancelRun
    /// does; a deadlock with one is retried on the next check.
    async fn time_out_workflows(&self) -> Result<(), db::Error> {
        let now = self.clock.now();
        let ids = db::runs::run_workflows_past_timeout(&self.pool, now, MAINTENANCE_BATCH).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let reason = RunReason::Timeout.as_str();
        let mut tx = self.pool.begin().await?;
        let mut events =
            db::runs::run_stop_steps(&mut tx, &self.node_id, &ids, reason, now).await?;
        let marked = db::runs::run_request_cancel(&mut tx, &ids, reason).await?;
        // A step another node created meanwhile (before the mark).
        events.extend(db::runs::run_stop_steps(&mut tx, &self.node_id, &ids, reason, now).await?);
        // Those with no step left running end now; the others when their
        // running steps have stopped.
        db::runs::run_workflow_advance(&mut *tx, &marked).await?;
        tx.commit().await?;
        for id in &marked {
            tracing::warn!(run = %id, "workflow run past its timeout: its steps are stopped, it ends TIMED_OUT");
        }
        self.bus.publish(events);
        Ok(())
    }

    /// Renews this node's leases every `lease / 3` until `stop`; delivers
    /// pending cancel requests (the NOTIFY fallback) and stops runs that are
    /// no longer this node's.
    async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let every = self.lease / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            let ids = self.running.ids();
            if ids.is_empty() {
                continue;
            }
            let until = self.clock.now()
                + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(30));
            match db::runs::run_heartbeat(&self.pool, &self.node_id, &ids, until).await {
                Ok(renewed) => {
                    for (id, cancel) in &renewed {
                        if let Some(reason) = cancel {
                            self.running.stop(*id, StopReason::Cancel(reason.clone()));
                        }
                    }
                    for id in ids {
                        if !renewed.iter().any(|(r, _)| *r == id) {
                            self.running.stop(id, StopReason::LeaseLost);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "renewing run leases failed"),
            }
        }
    }

    #[tracing::instrument(skip_all, fields(run = %run.id, binding = %run.binding_id, definition = %run.definition, attempt = run.attempt))]
    async fn execute(&self, run: Run, stop: Stop) {
        let (state, outcome) = match &run.handler {
            // Never executed (see `claim`): the database advances it.
            Handler::Workflow(_) => {
                self.running.remove(run.id);
                return;
            }
            Handler::Command(c) => command::execute(self, &run, c, &stop).await,
            Handler::Http(h) => http::execute(self, &run, h, &stop).await,
            // Never claimed for a task (ClaimKind::Event); kept total.
            Handler::Event => (RunState::Succeeded, Outcome::default()),
            // Never claimed for a task either: workers claim them
            // (ClaimKind::Worker, `usecase::workers`). Kept total.
            Handler::Worker(_) => (
                RunState::Failed,
                Outcome {
                    error_message: Some("a worker run reached the command executor".into()),
                    retryable: false,
                    ..Outcome::default()
                },
            ),
        };
        if stop.reason() == Some(&StopReason::LeaseLost) {
            tracing::warn!("run was taken from this node (lease lost); its final state stands");
        } else {
            self.finish(&run, state, outcome).await;
        }
        self.running.remove(run.id);
    }

    /// Appends events to the run's log and publishes them. Errors are logged;
    /// the caller goes on (the run's final state matters more than a line).
    pub(crate) async fn append(&self, run: &Run, bodies: &[EventBody]) -> Result<(), db::Error> {
        self.append_at(run, bodies, self.clock.now()).await
    }

    /// [`Executor::append`] with the events' time given (e.g. when the
    /// first line of a batch was read).
    pub(crate) async fn append_at(
        &self,
        run: &Run,
        bodies: &[EventBody],
        time: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), db::Error> {
        let mut conn = self.pool.acquire().await?;
        let events =
            db::events::event_append(&mut conn, &self.node_id, run.id, bodies, time).await?;
        self.bus.publish(events);
        Ok(())
    }

    async fn finish(&self, run: &Run, state: RunState, outcome: Outcome) {
        for attempt in 0..5 {
            let r = async {
                let now = self.clock.now();
                let mut tx = self.pool.begin().await?;
                // A retry is written only while the binding exists; its
                // lock (taken before the run's row, the order DeleteBinding
                // takes them in) makes a concurrent delete see the retry
                // and cancel it, or commit first and get none.
                let bound = if may_retry(run, state, &outcome) {
                    db::bindings::binding_lock_shared(&mut *tx, run.binding_id).await?
                } else {
                    true
                };
                let Some((ended, ev)) = db::runs::run_finish(
                    &mut tx,
                    &self.node_id,
                    run.id,
                    run.attempt,
                    state,
                    &outcome,
                    now,
                )
                .await?
                else {
                    return Ok(None);
                };
                let mut events = vec![ev];
                let retry = NewRun::retry_of(self.clock.new_id(), &ended, outcome.retryable, now)
                    .filter(|_| bound);
                let retried = retry.is_some();
                if let Some(retry) = retry {
                    events
                        .extend(db::runs::run_insert(&mut tx, &self.node_id, &[retry], now).await?);
                }
                // The end, final unless retried, in the same transaction.
                db::runs::run_end_record(&mut tx, &[(ended.id, retried)]).await?;
                tx.commit().await?;
                Ok::<_, db::Error>(Some((events, ended)))
            }
            .await;
            match r {
                Ok(Some((events, ended))) => {
                    metrics::run_durations([&ended]);
                    tracing::info!(state = state.as_str(), reason = %outcome.reason, retry = events.len() > 1, "run finished");
                    self.bus.publish(events);
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

/// How many of a node's `max_concurrent_runs` slots one tenant may hold:
/// all but a quarter of them, and at least one fewer when there are two or
/// more (64 → 48, 4 → 3, 2 → 1); 1 for a single slot (0 stays 0: the node
/// executes nothing). The rest stays open to other tenants however many
/// runs one tenant has waiting.
pub fn tenant_slot_cap(max_concurrent_runs: usize) -> usize {
    if max_concurrent_runs == 0 {
        return 0;
    }
    max_concurrent_runs
        .saturating_sub((max_concurrent_runs / 4).max(1))
        .max(1)
}

/// The claim for `free` slots when tenants hold `held` of them and each may
/// hold `cap`: how many runs it may take (at most what the tenant closest
/// to its share may still start, since a claim may give every run to one
/// tenant) and the tenants at their share, whose runs it must skip.
fn claim_plan(free: usize, cap: usize, held: &HashMap<String, usize>) -> (usize, Vec<String>) {
    let mut limit = free.min(cap);
    let mut excluded = Vec::new();
    for (tenant, &n) in held {
        if n >= cap {
            excluded.push(tenant.clone());
        } else {
            limit = limit.min(cap - n);
        }
    }
    (limit, excluded)
}

/// The executing runs' tasks, with how many each tenant holds. A task is
/// counted from its spawn until it is joined (whichever join point sees it,
/// and also when it panicked: the tenant is kept by task id).
#[derive(Default)]
struct Slots {
    tasks: JoinSet<()>,
    tenant_of: HashMap<tokio::task::Id, String>,
    held: HashMap<String, usize>,
}

impl Slots {
    fn spawn<F>(&mut self, tenant: String, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let id = self.tasks.spawn(task).id();
        *self.held.entry(tenant.clone()).or_default() += 1;
        self.tenant_of.insert(id, tenant);
    }

    /// Accounts for a joined task.
    fn joined(&mut self, r: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match r {
            Ok((id, ())) => id,
            Err(e) => {
                if e.is_panic() {
                    tracing::error!(error = %e, "a run's task panicked");
                }
                e.id()
            }
        };
        if let Some(tenant) = self.tenant_of.remove(&id)
            && let Some(n) = self.held.get_mut(&tenant)
        {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&tenant);
            }
        }
    }

    /// Joins one finished task if there is one; returns whether it did.
    fn try_join_next(&mut self) -> bool {
        match self.tasks.try_join_next_with_id() {
            Some(r) => {
                self.joined(r);
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// Whether `run`, ending in `state` with `outcome`, may get a retry (see
/// [`NewRun::retry_of`], which decides on the run as written).
fn may_retry(run: &Run, state: RunState, outcome: &Outcome) -> bool {
    let retry_state = match state {
        RunState::Failed | RunState::TimedOut => true,
        RunState::Cancelled => outcome.reason == RunReason::Shutdown.as_str(),
        _ => false,
    };
    retry_state
        && outcome.retryable
        && run.attempt < run.policy.retry.max_attempts as i32
        && run.cancel_reason.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CommandHandler, RetryPolicy, RunPolicy, RunTrigger};

    fn ended(state: RunState, reason: &str, attempt: i32, max_attempts: u32) -> Run {
        let now = chrono::Utc::now();
        Run {
            id: Uuid::now_v7(),
            tenant_id: "t".into(),
            binding_id: Uuid::now_v7(),
            definition: "d".into(),
            trigger: RunTrigger::Schedule,
            state,
            attempt,
            scheduled_time: now,
            create_time: now,
            start_time: Some(now),
            end_time: Some(now),
            handler: Handler::Command(CommandHandler {
                program: "true".into(),
                args: vec![],
                env: Default::default(),
                working_dir: String::new(),
                max_output_bytes: None,
                non_retryable_exit_codes: vec![],
            }),
            params: serde_json::json!({"a": 1}),
            result: None,
            error_message: None,
            error_summary: None,
            exit_code: None,
            node_id: None,
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            not_before: now,
            retry_of: None,
            policy: RunPolicy {
                retry: RetryPolicy {
                    max_attempts,
                    initial_backoff_ms: 1000,
                    backoff_coefficient: 2.0,
                    max_backoff_ms: 60_000,
                },
                ..RunPolicy::default()
            },
            idempotency_key: None,
            cancel_reason: None,
            progress: None,
        }
    }

    #[test]
    fn a_tenant_holds_at_most_its_share_of_the_slots() {
        let caps: Vec<_> = [0, 1, 2, 3, 4, 5, 8, 64, 100]
            .into_iter()
            .map(tenant_slot_cap)
            .collect();
        assert_eq!(caps, [0, 1, 1, 2, 3, 4, 6, 48, 75]);

        let held = |v: &[(&str, usize)]| -> HashMap<String, usize> {
            v.iter().map(|(t, n)| (t.to_string(), *n)).collect()
        };
        // Nobody running: one claim may fill up to the cap.
        assert_eq!(claim_plan(4, 3, &held(&[])), (3, vec![]));
        // A tenant at its share is skipped; the claim is not limited by it.
        assert_eq!(
            claim_plan(1, 3, &held(&[("hog", 3)])),
            (1, vec!["hog".to_string()])
        );
        // A tenant one short of its share: one run per claim, so the claim
        // cannot give it two.
        assert_eq!(
            claim_plan(30, 48, &held(&[("a", 47), ("b", 2)])),
            (1, vec![])
        );
        assert_eq!(claim_plan(30, 48, &held(&[("a", 40)])), (8, vec![]));
    }

    #[test]
    fn retries_follow_the_policy() {
        let now = chrono::Utc::now();
        let r = ended(RunState::Failed, "exit code 1", 2, 3);
        let retry = NewRun::retry_of(Uuid::now_v7(), &r, true, now).expect("attempts left");
        assert_eq!(retry.attempt, 3);
        assert_eq!(retry.retry_of, Some(r.id));
        assert_eq!(retry.state, RunState::Scheduled);
        assert_eq!(retry.trigger, RunTrigger::Retry);
        assert_eq!(retry.params, r.params);
        let delay = (retry.not_before - now).num_milliseconds();
        assert!((1800..=2200).contains(&delay), "2 s ±10 %: {delay}");

        assert!(
            NewRun::retry_of(
                Uuid::now_v7(),
                &ended(RunState::TimedOut, RunReason::Timeout.as_str(), 1, 2),
                true,
                now
            )
            .is_some()
        );
        assert!(
            NewRun::retry_of(
                Uuid::now_v7(),
                &ended(RunState::Failed, RunReason::NodeLost.as_str(), 1, 2),
                true,
                now
            )
            .is_some()
        );
        assert!(
            NewRun::retry_of(
                Uuid::now_v7(),
                &ended(RunState::Cancelled, RunReason::Shutdown.as_str(), 1, 2),
                true,
                now
            )
            .is_some()
        );
        assert!(
            NewRun::retry_of(
                Uuid::now_v7(),
                &ended(RunState::Cancelled, "operator", 1, 2),
                true,
                now
            )
            .is_none(),
            "cancelled runs are not retried"
        );
        assert!(
            NewRun::retry_of(
                Uuid::now_v7(),
                &ended(RunState::Failed, "x", 2, 2),
                true,
                now
            )
            .is_none()
        );
        assert!(
            NewRun::retry_of(
                Uuid::now_v7(),
                &ended(RunState::Failed, "x", 1, 2),
                false,
                now
            )
            .is_none()
        );
        assert!(
            NewRun::retry_of(
                Uuid::now_v7(),
                &ended(RunState::Succeeded, "", 1, 2),
                true,
                now
            )
            .is_none()
        );
        let mut asked = ended(RunState::Failed, "exit code 1", 1, 3);
        asked.cancel_reason = Some(RunReason::BindingDeleted.to_string());
        assert!(
            NewRun::retry_of(Uuid::now_v7(), &asked, true, now).is_none(),
            "a run whose cancel was asked for is not retried, whatever it ended with"
        );
    }
}
