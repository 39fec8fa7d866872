//! The firing loop: turns due bindings into `QUEUED` runs. It never executes
//! anything (that is [`crate::executor`]).
//!
//! Each pass, in one transaction: lock up to [`Scheduler::batch`] bindings
//! with `next_run_time <= now` (`FOR UPDATE SKIP LOCKED`, so nodes split the
//! work), insert one run per binding for its fire time (the unique index on
//! `(binding_id, scheduled_time)` makes a second insert for the same time a
//! no-op), and advance `next_run_time` from that fire time (never from "now
//! plus period", so no drift). A binding that fell behind (node down, or
//! overloaded) is handled by its misfire policy ([`crate::domain::plan_fires`]);
//! a fire that meets an active run of the binding by its overlap policy
//! ([`crate::domain::policy::plan_overlap_capped`]; under `ALLOW` with a
//! `max_active_runs` cap, the binding's active runs are counted in the
//! pass's transaction, which holds the binding's row lock, so two nodes
//! can never both fill the last slot); `CANCEL_PREVIOUS` cancels the
//! active runs in the same transaction (a running one through a cancel
//! request to its node). Fires beyond a tenant's hourly budget
//! (`max_runs_per_hour`) become `SKIPPED` runs with reason `quota`. Fires of
//! `event` handlers that may start at once are completed in the same
//! transaction (written `SUCCEEDED` with their `fired` event): they do
//! nothing but publish, so a claim would only cost two more row writes.
//!
//! Passes are also prepared ahead of their instant
//! ([`Scheduler::fire_ahead`]): locked and written as long before it as
//! that takes ([`Scheduler::lead`], at most [`Scheduler::ahead`]),
//! committed at the instant, so that only a commit remains when thousands
//! of bindings are due at once. Its docs say why this changes nothing a
//! caller can observe.
//!
//! [`Scheduler::workers`] firing loops run passes at once (`SKIP LOCKED`
//! splits the bindings). Between passes a loop sleeps until the earliest
//! `next_run_time` (but at least until [`Scheduler::coalesce`] after its
//! last pass began; after a pass that fired, just that, without reading
//! the earliest time, at most once per [`Scheduler::max_sleep`]), or
//! until woken by a binding change (LISTEN/NOTIFY via the bridge), or at most
//! [`Scheduler::max_sleep`] (the poll fallback for lost notifications) — no
//! fixed one-minute polling.
//!
//! Metrics: each committed pass records its duration, its fires by
//! outcome and the fire lag of the `event` runs it completed
//! ([`metrics::scheduler_pass`]); a failed pass records nothing.
//!
//! Failure handling: a failed pass rolls back (nothing fired, nothing
//! advanced) and is retried after a short pause; a crash mid-pass leaves the
//! bindings due, and another node (or this one on restart) fires them.
//!
//! Bad stored data takes out only its own binding: each locked row is
//! decoded on its own ([`db::bindings::binding_lock_due`]), each binding's
//! fire plan is computed on its own (a panic in that computation is
//! caught), and a schedule that yields no next fire is validated (an
//! invalid one evaluates to "never"). A binding that fails is logged
//! and marked broken in the same pass (`next_run_time` cleared,
//! `broken_reason` stored), so it leaves the due set instead of failing
//! pass after pass; a next fire time past year 9999, never due, is marked
//! between passes ([`db::bindings::binding_next_due_time`]).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db;
use crate::domain::policy::plan_overlap_capped;
use crate::domain::tenancy::apply_hourly_budget;
use crate::domain::{
    Clock, FirePlan, Handler, NewRun, OverlapPolicy, RunReason, RunSpec, RunState, Schedule,
    plan_fires,
};
use crate::events::EventBus;
use crate::telemetry::metrics;

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
    /// Sends the NOTIFYs of the runs fired, after each pass's commit, in
    /// order with the node's others (the node's one announcer).
    pub announcer: db::notify::Announcer,
    /// Bindings fired per transaction.
    pub batch: i64,
    /// Longest sleep between passes (poll fallback).
    pub max_sleep: Duration,
    /// Shortest time from one pass's start to the next, unless a pass was
    /// full: fires falling due within it are fired together by the next
    /// pass, so a steady stream of fires costs one transaction per
    /// `coalesce`, not one per fire. Adds at most this much fire lag.
    pub coalesce: Duration,
    /// Firing loops run at once (each runs its own passes; see
    /// [`Scheduler::run`]).
    pub workers: usize,
    /// How far ahead of their instant fires are prepared at most
    /// ([`Scheduler::fire_ahead`], [`Scheduler::lead`]); zero turns it off.
    pub ahead: Duration,
    /// Bindings per pass prepared ahead, at most (fewer when passes ahead
    /// have been slow: see [`Scheduler::fire_ahead`]).
    pub ahead_batch: i64,
    /// Passes prepared ahead and not yet committed, at most, on this node
    /// (each holds a database connection until its instant).
    pub ahead_slots: Arc<tokio::sync::Semaphore>,
    /// Fire times up to which this node has prepared every binding it
    /// could lock ([`Scheduler::fire_ahead`]): the next pass ahead starts
    /// after it. Microseconds since the epoch.
    pub ahead_frontier: Arc<std::sync::atomic::AtomicI64>,
    /// What preparing one binding ahead has been costing this node,
    /// nanoseconds of wall time shared by the passes written at once (each
    /// pass's time ÷ its bindings ÷ the passes written beside it; a moving
    /// average, 0 until the first): it sizes a band's lead
    /// ([`Scheduler::lead`]) and each pass, so that none is late.
    pub ahead_cost_ns: Arc<std::sync::atomic::AtomicU64>,
    /// Passes ahead of this node being written now (to share out their
    /// time in [`Scheduler::ahead_cost_ns`]).
    pub ahead_writing: Arc<std::sync::atomic::AtomicUsize>,
}

/// [`Scheduler::lead`] of a band of `bindings` at `cost_ns` a binding (0:
/// not measured yet, [`AHEAD_COST_GUESS`]), at most `max`.
fn lead_for(bindings: i64, cost_ns: u64, max: Duration) -> Duration {
    let per_binding = if cost_ns == 0 {
        AHEAD_COST_GUESS
    } else {
        cost_ns
    };
    let ns = u64::try_from(bindings.max(0))
        .unwrap_or(0)
        .saturating_mul(per_binding)
        .saturating_div(4)
        .saturating_mul(5);
    Duration::from_nanos(ns)
        .saturating_add(AHEAD_MARGIN)
        .min(max)
}

/// The most bindings one pass ahead takes of a band of `bindings`: an
/// equal share for each of the [`AHEAD_SLOTS`] passes written beside each
/// other; a band whose shares would be under [`AHEAD_COST_SAMPLE`] stays
/// one pass (its fixed cost is not worth splitting).
/// Passes written at once take the band's rows with `SKIP LOCKED` in the
/// same order, so without it whichever locked faster took up to its whole
/// time-based limit and the band was ready only when that larger pass was:
/// splits of 1 893 / 8 107 and 3 482 / 6 518 of 10 000 aligned bindings,
/// the larger one ready 12 and 38 ms after its instant (measured
/// 2026-12-07, `RUST_LOG=sked::scheduler=debug`).
fn even_share(bindings: i64) -> i64 {
    let sample = AHEAD_COST_SAMPLE as i64;
    let share = u64::try_from(bindings)
        .unwrap_or(0)
        .div_ceil(AHEAD_SLOTS as u64);
    let share = i64::try_from(share).unwrap_or(i64::MAX);
    if share < sample {
        bindings.max(sample)
    } else {
        share
    }
}

/// Counts a pass ahead in [`Scheduler::ahead_writing`] while it lives.
struct Writing(Arc<std::sync::atomic::AtomicUsize>);

impl Writing {
    fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> (Writing, usize) {
        let now = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (Writing(Arc::clone(count)), now)
    }
    fn now(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A pass's transaction with its writes done, not yet committed
/// ([`Scheduler::prepare`]).
struct Pass {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// Bindings locked.
    locked: usize,
    /// Bindings advanced, and bindings marked broken.
    due: usize,
    broken: usize,
    runs: Vec<NewRun>,
    events: Vec<crate::domain::RunEvent>,
    announce: db::runs::Announce,
}

/// Fire times closer than this are not prepared ahead: the pass at the
/// instant fires them.
const AHEAD_MIN: chrono::Duration = chrono::Duration::milliseconds(100);

/// Passes ahead of at least this many bindings update the estimate of
/// what preparing one costs ([`Scheduler::ahead_cost_ns`]); a node's first
/// pass ahead takes this many, to measure it.
const AHEAD_COST_SAMPLE: usize = 256;

/// Passes prepared ahead that a node holds at once, at most (each holds
/// one connection of the engine's pool until its instant; a node with an
/// engine pool under 6 connections holds one).
pub const AHEAD_SLOTS: usize = 2;

/// What preparing one binding ahead is assumed to cost until a node has
/// measured it ([`Scheduler::ahead_cost_ns`]): on the high side of the
/// 50–120 µs measured (2 cores, embedded PostgreSQL), so that the first
/// band starts early rather than late.
const AHEAD_COST_GUESS: u64 = 150_000;

/// Added to every band's lead ([`Scheduler::lead`]): the commits at the
/// instant, and a pass that starts a little late.
const AHEAD_MARGIN: Duration = Duration::from_millis(150);

/// A pass ahead that could take fewer bindings than this by its instant is
/// not tried (the pass at the instant fires them).
const AHEAD_MIN_PASS: i64 = 64;

/// What a pass ahead did ([`Scheduler::fire_ahead`]).
#[derive(Debug, Clone, Copy)]
enum Ahead {
    /// Not tried (off, or the pass at now was full).
    Off,
    /// Every slot holds a prepared pass.
    Busy,
    /// No fire time after the frontier within [`Scheduler::ahead`].
    Nothing,
    /// The next band is not to be prepared before this long from now (see
    /// [`Scheduler::lead`]); or, when that is its instant, it is left to
    /// the pass at the instant (too close, or too big for the time left).
    Wait(Duration),
    /// Bindings locked and prepared (0: the band was held by others).
    Prepared(usize),
    /// As many bindings locked and prepared as the pass could take: more
    /// of its band may be left.
    Full,
}

/// A pass prepared ahead that is ready to commit later than this after its
/// instant is rolled back (its bindings stay due for a pass at the instant,
/// under their misfire policy): its runs' stored start times, its instant,
/// would understate their lag by more than this.
const AHEAD_LATE: Duration = Duration::from_millis(250);

impl Scheduler {
    /// Runs passes until `shutdown`: [`Scheduler::workers`] firing loops at
    /// once, each running a pass, then another at once when its pass was
    /// full, else sleeping until the next fire time (at least
    /// [`Scheduler::coalesce`] after its pass began), a wake-up, or
    /// `max_sleep`. `SKIP LOCKED` gives each pass its own bindings, so while
    /// one pass's statements run or commit, another fires the bindings that
    /// fell due meanwhile: the database works on two passes at a time
    /// instead of waiting for each pass's round trips in turn, in steady
    /// firing as well as in a backlog.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut loops = tokio::task::JoinSet::new();
        for _ in 0..self.workers.max(1) {
            let me = self.clone();
            let stop = shutdown.clone();
            loops.spawn(async move { me.firing_loop(stop).await });
        }
        while loops.join_next().await.is_some() {}
    }

    /// One firing loop (see [`Scheduler::run`]).
    async fn firing_loop(self, shutdown: CancellationToken) {
        let mut probed: Option<tokio::time::Instant> = None;
        // Passes this loop prepared ahead, each waiting for its instant.
        let mut committing = tokio::task::JoinSet::new();
        loop {
            let started = tokio::time::Instant::now();
            while committing.try_join_next().is_some() {}
            let fired = self.fire_due().await;
            let ahead = if self.ahead.is_zero() || matches!(fired, Ok(n) if n as i64 >= self.batch)
            {
                Ahead::Off
            } else {
                match self.fire_ahead(&mut committing).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "scheduler pass ahead failed; retrying");
                        Ahead::Off
                    }
                }
            };
            let pause = match (fired, ahead) {
                // Behind (a burst of simultaneous fires, or a node that was
                // down): straight on.
                (Ok(n), _) if n as i64 >= self.batch => Duration::ZERO,
                // A full pass ahead: more of its band to prepare.
                (Ok(_), Ahead::Full) => Duration::ZERO,
                // Bindings were due: more are likely within `coalesce`, so
                // the next pass comes then without reading the next fire
                // time. That read walks the due index from its low end,
                // over the entries of bindings just advanced (not yet
                // vacuumable while passes overlap): ~2 ms at 10 000 fires/s,
                // after every pass. Still probed once per `max_sleep`, which
                // also takes out bindings whose next fire lies past 9999.
                (Ok(n), a)
                    if (n > 0 || matches!(a, Ahead::Prepared(1..) | Ahead::Full))
                        && probed.is_some_and(|p| p.elapsed() < self.max_sleep) =>
                {
                    self.coalesce.saturating_sub(started.elapsed())
                }
                (Ok(_), a) => {
                    probed = Some(tokio::time::Instant::now());
                    let floor = self.coalesce.saturating_sub(started.elapsed());
                    let until_due = self.sleep_time().await;
                    // Ahead: wake when the next band is to be prepared
                    // (`Wait`), or `ahead` before the next fire time when
                    // none lies within it, unless that fire is prepared
                    // already (its commit wakes us).
                    let prepared = self.clock.now() + until_due <= self.frontier();
                    match a {
                        _ if prepared => until_due,
                        Ahead::Off | Ahead::Busy => until_due,
                        Ahead::Wait(d) => d.min(until_due),
                        _ => until_due.saturating_sub(self.ahead),
                    }
                    .min(self.max_sleep)
                    .max(floor)
                }
                (Err(e), _) => {
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
                // Passes prepared ahead and not committed roll back (their
                // bindings stay due, for any node).
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Fire times up to which this node prepared every binding it could
    /// lock ([`Scheduler::ahead_frontier`]).
    fn frontier(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_micros(
            self.ahead_frontier
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .unwrap_or_default()
    }

    /// How long before its instant a band of `bindings` due together starts
    /// being prepared: what they cost at this node's rate
    /// ([`Scheduler::ahead_cost_ns`], [`AHEAD_COST_GUESS`] until measured),
    /// plus a quarter and [`AHEAD_MARGIN`]; at most [`Scheduler::ahead`].
    fn lead(&self, bindings: i64) -> chrono::Duration {
        let cost = self
            .ahead_cost_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        chrono::Duration::from_std(lead_for(bindings, cost, self.ahead))
            .unwrap_or(chrono::Duration::MAX)
    }

    /// One pass prepared ahead of its instant: the bindings due in the next
    /// band of fire times (from the earliest fire time after now and after
    /// [`Scheduler::ahead_frontier`], within [`Scheduler::ahead`], to
    /// [`Scheduler::coalesce`] after it), once the band is within its lead
    /// ([`Scheduler::lead`]; before that, [`Ahead::Wait`]), are locked here;
    /// a task in `committing` writes their fires as of the band's last fire
    /// time `at` ([`Scheduler::prepare`]), waits for `at` on the node's
    /// clock and commits. At the instant only the commit remains.
    ///
    /// Why this is exact: every change that decides a fire (UpdateBinding,
    /// Pause, Delete, a definition's disable or update, TriggerRun, retries)
    /// takes the binding's row lock, so it waits for the commit and takes
    /// effect after the fire, as if it came after the instant; what does
    /// not take it (runs ending, other bindings' runs counting against an
    /// hourly budget) is left out of passes ahead. Exactly once holds as in
    /// any pass: the rows stay locked until the commit, and a pass that
    /// does not commit (a crash, a shutdown, ready more than
    /// [`AHEAD_LATE`] after its instant) rolls back and leaves them due.
    ///
    /// # Errors
    /// [`db::Error`] when a statement fails; nothing is prepared then.
    async fn fire_ahead(
        &self,
        committing: &mut tokio::task::JoinSet<()>,
    ) -> Result<Ahead, db::Error> {
        let Ok(slot) = Arc::clone(&self.ahead_slots).try_acquire_owned() else {
            return Ok(Ahead::Busy);
        };
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let after = now.max(self.frontier());
        // The band's size, counted up to what this node's slots can hold.
        let cap = self.ahead_batch.saturating_mul(AHEAD_SLOTS as i64);
        let Some((first, band)) = db::bindings::binding_first_due_between(
            &self.pool,
            after,
            now + self.ahead,
            self.coalesce,
            cap,
        )
        .await?
        else {
            return Ok(Ahead::Nothing);
        };
        // Too close to be worth preparing ahead: the pass at the instant
        // fires it. So a steady stream of fires spread over the second is
        // fired at its instant as before; a second at which many are due,
        // with a quiet gap before it, is prepared ahead.
        if first - now < AHEAD_MIN {
            return Ok(Ahead::Wait((first - now).to_std().unwrap_or_default()));
        }
        // Not before the band needs: its bindings stay locked from their
        // preparation to the instant, and a change to one of them waits
        // that long. The lead is what preparing the whole band one pass
        // after another would take, with a quarter to spare (passes in
        // parallel finish sooner), plus a margin for the commits.
        let lead = self.lead(band);
        if first - now > lead + AHEAD_MIN {
            return Ok(Ahead::Wait(
                (first - now - lead).to_std().unwrap_or_default(),
            ));
        }
        // A pass is sized to be ready by its instant, at what preparing
        // one binding ahead has been costing, with every slot's pass
        // written beside it: prepared too late it would be rolled back, its work lost, and its locks would hold off the passes at
        // the instant meanwhile (measured: the first burst of 100 000 after
        // start-up prepared two passes of 5 000 in 1.5 s for a 1 s lead,
        // both rolled back). With no estimate yet, a small pass measures it.
        let per_binding = self
            .ahead_cost_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        let room = (first - now).to_std().unwrap_or_default();
        let limit = if per_binding == 0 {
            AHEAD_COST_SAMPLE as i64
        } else {
            i64::try_from(room.as_nanos() / (u128::from(per_binding) * AHEAD_SLOTS as u128))
                .unwrap_or(i64::MAX)
        }
        .min(self.ahead_batch)
        .min(even_share(band));
        if limit < AHEAD_MIN_PASS {
            // The estimate decays while it keeps passes from being tried,
            // so one slow pass (a checkpoint) does not turn this off.
            let _ = self.ahead_cost_ns.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |c| Some(c / 8 * 7),
            );
            return Ok(Ahead::Wait(room));
        }
        let band_end = first + self.coalesce;
        tracing::debug!(
            band,
            lead_ms = lead.num_milliseconds(),
            limit,
            cost_ns = per_binding,
            room_ms = room.as_millis() as u64,
            "scheduler pass ahead starts"
        );
        let (writing, beside) = Writing::start(&self.ahead_writing);
        let mut tx = self.pool.begin().await?;
        let (due, broken) =
            db::bindings::binding_lock_due(&mut *tx, band_end, Some(after), limit).await?;
        let locked = due.len() + broken.len();
        let full = locked as i64 >= limit;
        if !full {
            // Everything in the band that no one else holds is ours: the
            // next pass ahead starts after it.
            self.ahead_frontier.fetch_max(
                band_end.timestamp_micros(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if locked == 0 {
            return Ok(Ahead::Prepared(0));
        }
        let at = due.iter().map(|b| b.next_run_time).max().unwrap_or(first);
        // Written in its own task, so that this loop goes on to lock the
        // next pass for the other slot and both are written at once.
        let me = self.clone();
        committing.spawn(async move {
            let _slot = slot;
            let beside = beside.max(writing.now());
            let pass = match me.prepare(tx, due, broken, at, true).await {
                Ok(pass) => pass,
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler pass ahead failed; its bindings fire as due");
                    me.wake.notify_one();
                    return;
                }
            };
            let prepared_in = started.elapsed();
            // Its time is shared with the passes written beside it (the
            // most of those seen before its lock, after it, and at its end).
            let beside = beside.max(writing.now());
            drop(writing);
            let per_binding = (prepared_in.as_nanos() / locked as u128 / beside as u128) as u64;
            // Only passes large enough for their fixed cost not to count.
            if locked >= AHEAD_COST_SAMPLE {
                let _ = me.ahead_cost_ns.fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |c| {
                        Some(if c == 0 {
                            per_binding
                        } else {
                            (c + per_binding) / 2
                        })
                    },
                );
            }
            tracing::debug!(
                locked,
                beside,
                cost_ns = me.ahead_cost_ns.load(std::sync::atomic::Ordering::Relaxed),
                fire_time = %at,
                prepared_ms = prepared_in.as_secs_f64() * 1e3,
                ahead_ms = (at - me.clock.now()).num_milliseconds(),
                "scheduler pass prepared ahead"
            );
            loop {
                let left = (at - me.clock.now()).to_std().unwrap_or_default();
                if left.is_zero() {
                    break;
                }
                // In slices: a clock moved forward (tests) is noticed.
                tokio::time::sleep(left.min(Duration::from_millis(50))).await;
            }
            let committed_at = me.clock.now();
            if (committed_at - at).to_std().unwrap_or_default() > AHEAD_LATE {
                tracing::warn!(fire_time = %at, late_ms = (committed_at - at).num_milliseconds(),
                    "a pass prepared ahead woke too late; rolled back, its bindings fire as due");
                drop(pass);
            } else if let Err(e) = me.finish(pass, started, committed_at).await {
                tracing::warn!(error = %e, "scheduler pass ahead failed to commit; its bindings fire as due");
            }
            me.wake.notify_one();
        });
        Ok(if full {
            Ahead::Full
        } else {
            Ahead::Prepared(locked)
        })
    }

    /// Until the earliest `next_run_time` (zero when one is due; at most
    /// a day, and a short retry when it cannot be read).
    async fn sleep_time(&self) -> Duration {
        match db::bindings::binding_next_due_time(&self.pool).await {
            Ok((next, far)) => {
                for (id, tenant) in far {
                    tracing::error!(binding = %id, %tenant, "binding's next fire time lies past year 9999; taken out of scheduling (it can be read and deleted)");
                }
                match next {
                    Some(t) => (t - self.clock.now())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .min(Duration::from_secs(86_400)),
                    None => Duration::from_secs(86_400),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduler could not read the next fire time");
                Duration::from_millis(500)
            }
        }
    }

    /// One pass: fires up to `batch` due bindings. Returns how many bindings
    /// were due (fired or found already fired).
    ///
    /// Per binding: a disabled or paused one only advances its next fire
    /// time past now (fires in a pause are neither run nor recorded as misfires);
    /// a pause whose expiry has passed ends, and fires from the expiry on are
    /// handled normally. The misfire policy picks the fire times to run, the
    /// overlap policy then decides against the binding's active runs.
    ///
    /// # Errors
    /// [`db::Error`] when the transaction fails; nothing is fired then.
    pub async fn fire_due(&self) -> Result<usize, db::Error> {
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        let (due, broken) = db::bindings::binding_lock_due(&mut *tx, now, None, self.batch).await?;
        if due.is_empty() && broken.is_empty() {
            metrics::scheduler_pass(started.elapsed(), [], now);
            return Ok(0);
        }
        let pass = self.prepare(tx, due, broken, now, false).await?;
        let locked = pass.locked;
        self.finish(pass, started, now).await?;
        Ok(locked)
    }

    /// Writes a pass's fires in `tx` (bindings `due` and `broken`, locked
    /// there), evaluated at `now`, without committing. `ahead`: the pass is
    /// prepared ahead of `now` (see [`Scheduler::fire_ahead`]) and leaves
    /// out, locked but not advanced, the bindings whose fire could be
    /// decided differently at `now` by something that does not wait for
    /// their row lock: those with active runs (they may end meanwhile), and
    /// those of tenants with an hourly budget (other bindings' runs count).
    async fn prepare(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        mut due: Vec<db::bindings::DueBinding>,
        mut broken: Vec<db::bindings::BrokenBinding>,
        now: chrono::DateTime<chrono::Utc>,
        ahead: bool,
    ) -> Result<Pass, db::Error> {
        let t0 = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        let locked = due.len() + broken.len();
        // Each binding's fire plan on its own, so that a schedule that cannot
        // be evaluated (invalid stored data, or a bug that panics) takes out
        // that binding only, never the pass for the others.
        let mut plans = Vec::with_capacity(due.len());
        let mut healthy = Vec::with_capacity(due.len());
        for b in due.drain(..) {
            let planned =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan_binding(&b, now)))
                    .map_err(|p| format!("computing the next fire time failed: {}", panic_text(&p)))
                    .and_then(|plan| {
                        // An invalid schedule evaluates to "no next fire":
                        // only then is it worth telling that apart from a
                        // schedule that has ended (validating every due
                        // binding would cost a cron parse per fire). The
                        // window bounds are the binding's effective window
                        // clipped into the schedule, which may narrow to one
                        // instant that `validate` (meant for input) refuses.
                        if plan.next.is_some() {
                            return Ok(plan);
                        }
                        Schedule {
                            start_time: None,
                            end_time: None,
                            ..b.schedule.clone()
                        }
                        .validate("schedule")
                        .map(|()| plan)
                        .map_err(|e| format!("schedule cannot be evaluated: {e}"))
                    });
            match planned {
                Ok(plan) => {
                    plans.push(plan);
                    healthy.push(b);
                }
                Err(reason) => broken.push(db::bindings::BrokenBinding {
                    id: b.id,
                    tenant_id: b.tenant_id,
                    reason,
                }),
            }
        }
        let due = healthy;
        if !broken.is_empty() {
            for b in &broken {
                tracing::error!(binding = %b.id, tenant = %b.tenant_id, reason = %b.reason,
                    "binding's stored data cannot be read or computed; taken out of scheduling (it can be read and deleted)");
            }
            db::bindings::binding_mark_broken(&mut *tx, &broken).await?;
        }
        // Whether the bindings whose overlap policy matters have active
        // runs; the runs themselves only where they are to be cancelled.
        let contested: Vec<Uuid> = due
            .iter()
            .zip(&plans)
            .filter(|(b, p)| b.policy.overlap != OverlapPolicy::Allow && !p.run.is_empty())
            .map(|(b, _)| b.id)
            .collect();
        let active_state: std::collections::HashMap<Uuid, (bool, bool)> = if contested.is_empty() {
            Default::default()
        } else {
            db::runs::run_active_state(&mut tx, &contested)
                .await?
                .into_iter()
                .map(|a| (a.binding_id, (a.running, a.waiting)))
                .collect()
        };
        // Capped ALLOW bindings (max_active_runs): their active runs,
        // counted up to the cap, under the row lock this pass holds.
        let capped: Vec<(Uuid, i64)> = due
            .iter()
            .zip(&plans)
            .filter(|(b, p)| b.policy.overlap == OverlapPolicy::Allow && !p.run.is_empty())
            .filter_map(|(b, _)| b.max_active_runs.map(|c| (b.id, i64::from(c))))
            .collect();
        let active_counts: std::collections::HashMap<Uuid, usize> = if capped.is_empty() {
            Default::default()
        } else {
            let (ids, caps): (Vec<Uuid>, Vec<i64>) = capped.into_iter().unzip();
            db::runs::run_active_counts(&mut tx, &ids, &caps)
                .await?
                .into_iter()
                .map(|(id, n)| (id, usize::try_from(n).unwrap_or(0)))
                .collect()
        };
        // Ahead: the quotas of every due tenant, read once (what is
        // budgeted is left out; what is limited is not completed inline).
        let quotas = if ahead {
            let tenants = {
                let mut t: Vec<String> = due.iter().map(|b| b.tenant_id.clone()).collect();
                t.sort();
                t.dedup();
                t
            };
            Some(db::tenancy::quota_kinds(&mut *tx, &tenants).await?)
        } else {
            None
        };
        let (due, plans) = if let Some(q) = &quotas {
            due.into_iter()
                .zip(plans)
                .filter(|(b, _)| {
                    let active = active_state.get(&b.id).is_some_and(|&(r, w)| r || w)
                        || active_counts.get(&b.id).is_some_and(|&n| n > 0);
                    !active && !q.hourly.contains(&b.tenant_id)
                })
                .unzip()
        } else {
            (due, plans)
        };
        let cancelling: Vec<Uuid> = due
            .iter()
            .filter(|b| b.policy.overlap == OverlapPolicy::CancelPrevious)
            .filter(|b| active_state.get(&b.id).is_some_and(|&(r, w)| r || w))
            .map(|b| b.id)
            .collect();
        let active = if cancelling.is_empty() {
            Vec::new()
        } else {
            db::runs::run_list_active(&mut *tx, &cancelling).await?
        };

        let mut runs = Vec::with_capacity(due.len());
        let mut ids = Vec::with_capacity(due.len());
        let mut nexts = Vec::with_capacity(due.len());
        let mut cancel_waiting = Vec::new();
        let mut cancel_running = Vec::new();
        // Misfires, told once per pass: a line per binding would be
        // thousands of lines a second from a node that fell behind, which
        // slows it further.
        let mut missed: Option<(Uuid, usize, usize, usize)> = None;
        for (b, plan) in due.iter().zip(plans) {
            if !plan.skipped.is_empty() {
                let m = missed.get_or_insert((b.id, 0, 0, 0));
                m.1 += 1;
                m.2 += plan.skipped.len();
                m.3 += plan.run.len();
            }
            let (running, waiting) = active_state.get(&b.id).copied().unwrap_or_default();
            let (running, waiting) = match active_counts.get(&b.id) {
                Some(&n) => (n, 0),
                None => (usize::from(running), usize::from(waiting)),
            };
            let overlap = plan_overlap_capped(
                b.policy.overlap,
                plan.run,
                running,
                waiting,
                b.max_active_runs,
            );
            let mine: Vec<_> = active.iter().filter(|a| a.binding_id == b.id).collect();
            if overlap.cancel_active {
                for a in &mine {
                    if a.state == RunState::Running {
                        cancel_running.push(a.id);
                    } else {
                        cancel_waiting.push(a.id);
                    }
                }
            }
            let fire = |time| {
                let spec = RunSpec {
                    tenant_id: b.tenant_id.clone(),
                    binding_id: b.id,
                    definition: b.definition.clone(),
                    handler: b.handler.clone(),
                    params: b.params.clone(),
                    policy: b.policy,
                };
                // Deterministic per (binding, fire time): every node agrees.
                NewRun::fire(
                    self.clock.new_id(),
                    spec,
                    time,
                    b.schedule.jitter_for(b.id.as_bytes(), time),
                )
            };
            runs.extend(
                plan.skipped
                    .into_iter()
                    .map(|(t, reason)| fire(t).skipped(reason)),
            );
            runs.extend(
                overlap
                    .skipped
                    .into_iter()
                    .map(|t| fire(t).skipped(RunReason::Overlap.as_str())),
            );
            runs.extend(overlap.run.into_iter().map(fire));
            ids.push(b.id);
            nexts.push(plan.next);
        }
        if let Some((example, bindings, skipped, caught_up)) = missed {
            tracing::info!(bindings, skipped, caught_up, %example,
                "bindings missed fire times; their misfire policies applied");
        }
        let planned_ms = ms(t0);
        self.apply_hourly_budget(&mut tx, &mut runs, now).await?;
        let budget_ms = ms(t0);
        self.complete_event_runs(&mut tx, &mut runs, now, quotas)
            .await?;
        // Rare (CANCEL_PREVIOUS meeting an active run): no round trip
        // otherwise.
        let mut events = if cancel_waiting.is_empty() {
            Vec::new()
        } else {
            db::runs::run_cancel_waiting(
                &mut tx,
                &self.node_id,
                &cancel_waiting,
                RunReason::Overlap.as_str(),
                now,
            )
            .await?
        };
        if !cancel_running.is_empty() {
            db::runs::run_request_cancel(&mut tx, &cancel_running, RunReason::Overlap.as_str())
                .await?;
        }
        let before_insert_ms = ms(t0);
        let (inserted, announce) =
            db::runs::run_insert_unannounced(&mut tx, &self.node_id, &runs, now).await?;
        let inserted_ms = ms(t0);
        events.extend(inserted);
        let ended_pauses: Vec<Uuid> = due
            .iter()
            .filter(|b| b.pause_expire_time.is_some_and(|e| e <= now))
            .map(|b| b.id)
            .collect();
        db::bindings::binding_set_next_run_times(&mut *tx, &ids, &nexts, &ended_pauses, now)
            .await?;
        // Where a pass's time goes (cumulative ms since its bindings were
        // locked).
        tracing::debug!(
            locked,
            planned_ms,
            budget_ms,
            before_insert_ms,
            inserted_ms,
            advanced_ms = ms(t0),
            "scheduler pass prepared"
        );
        Ok(Pass {
            tx,
            locked,
            due: due.len(),
            broken: broken.len(),
            runs,
            events,
            announce,
        })
    }

    /// Commits a prepared pass, then announces and publishes what it wrote.
    /// `started`: when its work began (a pass prepared ahead: its
    /// preparation, not its wait, counts in the pass duration metric);
    /// `committed_at`: the instant its fire lag is measured to (the metric).
    async fn finish(
        &self,
        pass: Pass,
        started: std::time::Instant,
        committed_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), db::Error> {
        let Pass {
            tx,
            locked: _,
            due,
            broken,
            runs,
            events,
            announce,
        } = pass;
        let committing = std::time::Instant::now();
        tx.commit().await?;
        let commit_ms = committing.elapsed().as_secs_f64() * 1e3;
        // This node's subscribers first: what other nodes are told comes
        // through the database anyway (their bridge reads it), and telling
        // them costs a round trip.
        let n_events = events.len();
        let created = events.iter().filter(|e| e.seq == 1).count();
        let inserted: Option<std::collections::HashSet<Uuid>> =
            (created != runs.len()).then(|| {
                events
                    .iter()
                    .filter(|e| e.seq == 1)
                    .map(|e| e.run_id)
                    .collect()
            });
        if !events.is_empty() {
            let waiting = runs
                .iter()
                .any(|r| matches!(r.state, RunState::Queued | RunState::Scheduled));
            self.bus.publish(events);
            if waiting {
                self.executor_wake.notify_one();
            }
        }
        // After the commit, by the node's announcer: a notifying
        // transaction holds the database's notification lock through its
        // commit flush, which would serialise parallel passes
        // ([`db::runs::run_insert_unannounced`]). Handed over, not sent
        // here: sending waits for a connection and a round trip (tens of ms
        // with 1 000 runs), which the next pass need not wait for. Losing
        // it (a crash right here) only delays other nodes' wake-ups to
        // their poll.
        self.announcer
            .send(announce.into_notifications(&self.node_id))
            .await;
        // A fire whose run existed already was not inserted (and has no
        // events): count only the runs this pass created, i.e. those whose
        // first event (seq 1) it wrote.
        match inserted {
            None => metrics::scheduler_pass(started.elapsed(), &runs, committed_at),
            Some(ids) => metrics::scheduler_pass(
                started.elapsed(),
                runs.iter().filter(|r| ids.contains(&r.id)),
                committed_at,
            ),
        }
        tracing::debug!(
            due,
            broken,
            events = n_events,
            pass_ms = started.elapsed().as_secs_f64() * 1e3,
            commit_ms,
            "scheduler pass"
        );
        Ok(())
    }

    /// Completes this pass's due `event` handler fires in the firing
    /// transaction ([`NewRun::complete_inline`]), unless their tenant has a
    /// concurrency quota (then they are claimed like any run). `quotas`:
    /// the tenants' quota kinds when the pass read them already.
    async fn complete_event_runs(
        &self,
        tx: &mut sqlx::PgConnection,
        runs: &mut [NewRun],
        now: chrono::DateTime<chrono::Utc>,
        quotas: Option<db::tenancy::QuotaKinds>,
    ) -> Result<(), db::Error> {
        let tenants = queued_tenants(runs, |r| r.handler == Handler::Event);
        if tenants.is_empty() {
            return Ok(());
        }
        let limited = match quotas {
            Some(q) => q.concurrency,
            None => {
                db::tenancy::quota_kinds(&mut *tx, &tenants)
                    .await?
                    .concurrency
            }
        };
        NewRun::complete_inline(runs, &limited, now);
        Ok(())
    }

    /// Turns the fires of this pass that exceed their tenant's hourly budget
    /// (`max_runs_per_hour`) into `SKIPPED` runs with reason `quota`, earliest
    /// fire times first. Tenants without a budget are untouched.
    async fn apply_hourly_budget(
        &self,
        tx: &mut sqlx::PgConnection,
        runs: &mut [NewRun],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), db::Error> {
        let tenants = queued_tenants(runs, |_| true);
        if tenants.is_empty() {
            return Ok(());
        }
        let mut remaining = db::tenancy::quota_hourly_remaining(tx, &tenants, now).await?;
        if remaining.is_empty() {
            return Ok(());
        }
        let mut queued: Vec<&mut NewRun> = runs
            .iter_mut()
            .filter(|r| r.state == RunState::Queued)
            .collect();
        queued.sort_by_key(|r| r.scheduled_time);
        let fits = apply_hourly_budget(queued.iter().map(|r| r.tenant_id.as_str()), &mut remaining);
        // Told once per tenant and pass, not per fire.
        let mut spent: std::collections::BTreeMap<String, usize> = Default::default();
        for (r, fits) in queued.into_iter().zip(fits) {
            if !fits {
                *spent.entry(r.tenant_id.clone()).or_default() += 1;
                r.state = RunState::Skipped;
                r.reason = RunReason::Quota.to_string();
            }
        }
        for (tenant, skipped) in spent {
            tracing::info!(%tenant, skipped, "hourly run budget spent; fires skipped");
        }
        Ok(())
    }
}

/// The fire plan of due binding `b` at `now`: a disabled or paused one only
/// advances its next fire time past now (fires in a pause are neither caught
/// up nor recorded); a pause whose expiry has passed ends, and fires from the
/// expiry on are handled normally by the misfire policy.
fn plan_binding(b: &db::bindings::DueBinding, now: chrono::DateTime<chrono::Utc>) -> FirePlan {
    let pause_over = b.paused && b.pause_expire_time.is_some_and(|e| e <= now);
    if !b.enabled || (b.paused && !pause_over) {
        return FirePlan {
            next: b.schedule.next_after(now),
            ..FirePlan::default()
        };
    }
    let mut from = Some(b.next_run_time);
    if let Some(expire) = b.pause_expire_time.filter(|_| pause_over)
        && b.next_run_time < expire
    {
        from = b
            .schedule
            .next_after(expire - chrono::Duration::microseconds(1));
    }
    match from {
        Some(t) if t <= now => {
            let plan = plan_fires(&b.schedule, t, now, &b.misfire_policy);
            // The jitter is computed for every run later in the pass: make
            // sure it can be, here where a failure is this binding's alone.
            for t in plan.run.iter().chain(plan.skipped.iter().map(|(t, _)| t)) {
                let _ = *t + b.schedule.jitter_for(b.id.as_bytes(), *t);
            }
            plan
        }
        next => FirePlan {
            next,
            ..FirePlan::default()
        },
    }
}

/// The message of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// The distinct tenants (sorted) of the `QUEUED` runs in `runs` that pass
/// `filter`.
fn queued_tenants(runs: &[NewRun], filter: impl Fn(&NewRun) -> bool) -> Vec<String> {
    let mut tenants: Vec<String> = runs
        .iter()
        .filter(|r| r.state == RunState::Queued && filter(r))
        .map(|r| r.tenant_id.clone())
        .collect();
    tenants.sort();
    tenants.dedup();
    tenants
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_band_is_prepared_as_long_before_its_instant_as_it_takes() {
        let max = Duration::from_secs(10);
        let ms = |d: Duration| d.as_millis();
        // One binding: the margin only.
        assert_eq!(ms(lead_for(1, 60_000, max)), 150);
        // 10 000 at 60 µs: 0.6 s and a quarter, plus the margin.
        assert_eq!(ms(lead_for(10_000, 60_000, max)), 900);
        // Unmeasured: the high guess.
        assert_eq!(ms(lead_for(10_000, 0, max)), 2025);
        // 100 000 at 60 µs: 7.5 s and the margin; at 100 µs, capped at
        // the longest lead.
        assert_eq!(ms(lead_for(100_000, 60_000, max)), 7650);
        assert_eq!(lead_for(100_000, 100_000, max), max);
        assert_eq!(lead_for(i64::MAX, u64::MAX, max), max);
        // Nothing odd from odd counts; off when the longest lead is zero.
        assert_eq!(ms(lead_for(-5, 60_000, max)), 150);
        assert_eq!(lead_for(10, 60_000, Duration::ZERO), Duration::ZERO);
        // More bindings never get a shorter lead.
        let mut last = Duration::ZERO;
        for n in (0..200_000).step_by(997) {
            let l = lead_for(n, 75_000, max);
            assert!(l >= last, "{n}: {l:?} < {last:?}");
            last = l;
        }
    }

    #[test]
    fn passes_written_beside_each_other_share_a_band_evenly() {
        let sample = AHEAD_COST_SAMPLE as i64;
        assert_eq!(even_share(10_000), 5_000);
        assert_eq!(even_share(10_001), 5_001);
        // A small band stays one pass; odd counts are harmless.
        assert_eq!(even_share(300), 300);
        assert_eq!(even_share(100), sample);
        assert_eq!(even_share(0), sample);
        assert_eq!(even_share(-7), sample);
        assert_eq!(even_share(i64::MAX), i64::MAX / 2 + 1);
        // The slots' passes together cover the band; a band worth
        // splitting is split into equal shares (to one binding).
        let slots = AHEAD_SLOTS as i64;
        for n in (0..300_000).step_by(613) {
            let s = even_share(n);
            assert!(s * slots >= n, "{n}: {s}");
            if n < sample * slots {
                assert!(s >= n, "{n}: {s}");
            } else {
                assert!(s <= n / slots + 1, "{n}: {s}");
            }
        }
    }
}
