//! Remote workers (handler kind `worker`, `sked.v1.WorkerService`): the
//! node's [`Hub`] of connected worker streams, the dispatch loop that
//! claims runs for their free slots, and the fenced writes of a lease
//! (complete, fail, heartbeat, cancel ack).
//!
//! - **Dispatch.** One task per node ([`Hub::run`]) claims for the streams
//!   with free slots, round-robin over them (the starting stream rotates
//!   each pass), each claim at most the stream's free slots:
//!   [`db::runs::run_claim`] with [`ClaimKind::Worker`], so fair share,
//!   priority, tenant quotas and overlap rules apply as for commands. It
//!   claims on the `sked_runs` NOTIFY (through the bridge, [`Hub::wake`]),
//!   when a stream connects, when a slot frees after claims that took
//!   every slot they asked for (else no run waits for one), and every
//!   [`DISPATCH_POLL`] as a fallback.
//! - **Leases.** A claim mints a lease token per run. While the stream
//!   holding it is connected, the hub renews its runs' leases every
//!   `lease / 3` (the open stream is the worker's heartbeat); a dropped
//!   stream's runs keep their leases until they expire, and the reaper then
//!   ends them `FAILED`/`worker_lost` (retried per policy). A worker that
//!   reconnects with its tokens in Hello keeps the still-valid ones.
//! - **Fencing.** Complete, Fail and CancelAck find the run by its token
//!   among `RUNNING` runs and end it with [`db::runs::run_finish`],
//!   conditional on its id and attempt still `RUNNING`: a lost lease changes
//!   nothing and answers `Precondition` (`FAILED_PRECONDITION`).
//! - **Cancel.** A cancel request for a run held here ([`LocalRuns`], from
//!   the bridge, or a heartbeat's pending cancel) is sent on the stream; the
//!   run ends `CANCELLED` when the worker acks or fails it, or after the kill
//!   grace anyway. The definition's timeout ends the run `TIMED_OUT` at its
//!   deadline and sends a cancel (reason `timeout`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Core, Error, Result};
use crate::db::{self, runs::ClaimKind, runs::Outcome};
use crate::domain::{
    EventBody, FieldViolation, Handler, LogStream, NewRun, Run, RunReason, RunState,
};
use crate::events::bridge::LocalRuns;
use crate::telemetry::metrics;

/// Longest the dispatch loop sleeps without a wake-up.
pub const DISPATCH_POLL: Duration = Duration::from_secs(1);
/// Most slots one stream may ask for.
pub const MAX_SLOTS: u32 = 1000;
/// Most bytes of a failure message kept.
pub const MAX_ERROR_BYTES: usize = 1024;

/// What a worker sends first on its stream.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Queue to take runs of.
    pub queue: String,
    /// The worker's name, stored on the runs it takes.
    pub worker_name: String,
    /// Most unfinished runs at once (1..=[`MAX_SLOTS`]).
    pub slots: u32,
    /// Leases the worker still holds (after a reconnect).
    pub lease_tokens: Vec<Uuid>,
}

impl Hello {
    /// Checks queue, name and slots.
    ///
    /// # Errors
    /// A violation naming the `hello.*` field.
    pub fn validate(&self) -> std::result::Result<(), FieldViolation> {
        crate::domain::validate_queue("hello.queue", &self.queue)?;
        if !crate::domain::is_valid_name(&self.worker_name) {
            return Err(FieldViolation::new(
                "hello.worker_name",
                "must be 1-128 characters of [A-Za-z0-9._:-]",
            ));
        }
        if !(1..=MAX_SLOTS).contains(&self.slots) {
            return Err(FieldViolation::new(
                "hello.slots",
                format!("{} is outside 1..=1000", self.slots),
            ));
        }
        Ok(())
    }
}

/// A run leased to a worker.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The run (`RUNNING`).
    pub run: Run,
    /// The lease's fencing token.
    pub lease_token: Uuid,
    /// When the definition's timeout ends the attempt.
    pub deadline: Option<DateTime<Utc>>,
    /// When the lease runs out unless renewed.
    pub lease_expire_time: DateTime<Utc>,
}

/// What the node sends a worker.
#[derive(Debug, Clone)]
pub enum ToWorker {
    /// A run to execute.
    Assigned(Box<Assignment>),
    /// Stop the run of this lease.
    Cancel {
        /// The lease token.
        lease_token: Uuid,
        /// Why.
        reason: String,
    },
}

/// One report of a worker about one lease.
#[derive(Debug, Clone)]
pub enum Report {
    /// Renew the lease.
    Heartbeat(Uuid),
    /// The run succeeded with this result (a JSON object or nothing).
    Complete(Uuid, Option<serde_json::Value>),
    /// The run failed: message, whether a retry may succeed.
    Fail(Uuid, String, bool),
    /// The worker stopped the run it was asked to cancel.
    CancelAck(Uuid),
}

impl Report {
    /// The lease token the report names.
    pub fn token(&self) -> Uuid {
        match self {
            Report::Heartbeat(t) | Report::Complete(t, _) | Report::Fail(t, ..) => *t,
            Report::CancelAck(t) => *t,
        }
    }
}

/// A lease held by a stream of this node.
#[derive(Debug, Clone)]
struct Held {
    run_id: Uuid,
    attempt: i32,
    /// The definition's timeout, as an instant.
    deadline: Option<DateTime<Utc>>,
    /// A cancel was sent; the run ends `CANCELLED` at this instant anyway.
    cancel_by: Option<(DateTime<Utc>, String)>,
}

#[derive(Debug)]
struct Stream {
    queue: String,
    tenant: Option<String>,
    worker_name: String,
    slots: usize,
    held: HashMap<Uuid, Held>,
    tx: mpsc::UnboundedSender<ToWorker>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    streams: HashMap<u64, Stream>,
    /// Run id → (stream id, lease token), for cancel requests.
    by_run: HashMap<Uuid, (u64, Uuid)>,
    /// Rotates the dispatch order.
    turn: usize,
    /// Whether a claim of the last pass took as many runs as it asked for
    /// (more may be waiting for a free slot).
    slot_bound: bool,
}

impl State {
    fn release(&mut self, token: Uuid) {
        for s in self.streams.values_mut() {
            if let Some(h) = s.held.remove(&token) {
                self.by_run.remove(&h.run_id);
                return;
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    core: Core,
    lease: Duration,
    kill_grace: Duration,
    /// Runs may be waiting (a NOTIFY, a promotion, a stream connected):
    /// the next pass claims.
    wake: Arc<Notify>,
    /// Slots freed by completions, cancels sent, leases renewed: the next
    /// pass reaps and sleeps anew, and claims only if the last claims
    /// filled every slot they asked for (runs may have been left for want
    /// of slots). A completion frees nothing else a run waits for without
    /// saying so: a completion batch holding a run of an overlap-free
    /// binding or of a tenant with a concurrency quota sends its NOTIFY
    /// ([`db::runs::run_complete_by_leases`]), heard here on
    /// [`Inner::wake`]; other ends (failures, cancels, timeouts) wake it
    /// directly. Measured: every worker run's completion cost an empty
    /// claim, which takes the claim lock every node's claims wait for.
    nudge: Notify,
    state: Mutex<State>,
}

/// The worker streams connected to this node, and their dispatch (module
/// docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub(Arc<Inner>);

/// One connected worker stream; dropping it disconnects the stream (its
/// leases stay until they expire or the worker reconnects with them).
#[derive(Debug)]
pub struct Connection {
    hub: Hub,
    id: u64,
    tenant: Option<String>,
    /// Runs assigned and cancels, in order.
    pub rx: mpsc::UnboundedReceiver<ToWorker>,
}

impl Hub {
    /// The hub of a node whose runs hold `lease` and whose cancels allow
    /// `kill_grace`.
    pub fn new(core: Core, lease: Duration, kill_grace: Duration) -> Hub {
        Hub(Arc::new(Inner {
            core,
            lease,
            kill_grace,
            wake: Arc::default(),
            nudge: Notify::new(),
            state: Mutex::default(),
        }))
    }

    /// Runs held by the worker streams connected here (the node's share of
    /// `running_runs` in its heartbeat).
    pub fn held_runs(&self) -> usize {
        self.state().by_run.len()
    }

    /// Wakes the dispatch loop (runs queued, slots freed).
    pub fn wake(&self) -> Arc<Notify> {
        Arc::clone(&self.0.wake)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lease_chrono(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.0.lease).unwrap_or(chrono::Duration::seconds(30))
    }

    /// Connects a worker stream of `tenant` (`None`: every tenant's runs).
    /// Returns the connection and the lease tokens of `hello` that are no
    /// longer valid (the others are renewed and held by the stream).
    ///
    /// # Errors
    /// `Invalid` for a bad hello; `Unavailable`/`Internal` on database
    /// failure.
    pub async fn connect(
        &self,
        tenant: Option<String>,
        hello: Hello,
    ) -> Result<(Connection, Vec<Uuid>)> {
        hello.validate()?;
        let until = self.0.core.clock.now() + self.lease_chrono();
        let renewed = db::runs::run_worker_heartbeat(
            &self.0.core.pool,
            &hello.lease_tokens,
            tenant.as_deref(),
            until,
        )
        .await
        .map_err(|e| Error::db(e, &super::Target::new("run", "lease")))?;
        let lost: Vec<Uuid> = hello
            .lease_tokens
            .iter()
            .filter(|t| !renewed.iter().any(|r| r.token == **t))
            .copied()
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut st = self.state();
            st.next_id += 1;
            let id = st.next_id;
            let mut held = HashMap::new();
            for r in &renewed {
                held.insert(
                    r.token,
                    Held {
                        run_id: r.run_id,
                        attempt: r.attempt,
                        deadline: deadline(r.start_time, r.timeout_secs),
                        cancel_by: None,
                    },
                );
                st.by_run.insert(r.run_id, (id, r.token));
            }
            st.streams.insert(
                id,
                Stream {
                    queue: hello.queue.clone(),
                    tenant: tenant.clone(),
                    worker_name: hello.worker_name.clone(),
                    slots: hello.slots as usize,
                    held,
                    tx,
                },
            );
            id
        };
        // Pending cancels of the kept runs reach the worker now.
        for r in renewed {
            if let Some(reason) = r.cancel_reason {
                self.send_cancel(r.run_id, &reason);
            }
        }
        tracing::info!(queue = %hello.queue, worker = %hello.worker_name, slots = hello.slots,
            tenant = ?tenant, kept = self.state().streams.get(&id).map_or(0, |s| s.held.len()),
            "worker connected");
        self.0.wake.notify_one();
        Ok((
            Connection {
                hub: self.clone(),
                id,
                tenant,
                rx,
            },
            lost,
        ))
    }

    /// Sends a cancel for run `run_id` to the stream holding it (once) and
    /// starts its kill grace; returns whether a stream here holds it.
    fn send_cancel(&self, run_id: Uuid, reason: &str) -> bool {
        let by = self.0.core.clock.now()
            + chrono::Duration::from_std(self.0.kill_grace)
                .unwrap_or(chrono::Duration::seconds(10));
        let mut st = self.state();
        let Some(&(sid, token)) = st.by_run.get(&run_id) else {
            return false;
        };
        let Some(s) = st.streams.get_mut(&sid) else {
            return false;
        };
        let Some(h) = s.held.get_mut(&token) else {
            return false;
        };
        if h.cancel_by.is_none() {
            h.cancel_by = Some((by, reason.to_string()));
            let _ = s.tx.send(ToWorker::Cancel {
                lease_token: token,
                reason: reason.to_string(),
            });
        }
        drop(st);
        // The loop sleeps until the next kill grace runs out.
        self.0.nudge.notify_one();
        true
    }

    /// Claims for the connected streams and keeps their leases until `stop`
    /// (module docs). A node's shutdown never ends remote work: the streams
    /// close and the workers reconnect elsewhere with their leases.
    pub async fn run(self, stop: CancellationToken) {
        let mut last_renew = tokio::time::Instant::now();
        let mut last_claim = tokio::time::Instant::now();
        let mut claim_due = true;
        loop {
            if last_renew.elapsed() >= self.0.lease / 3 {
                last_renew = tokio::time::Instant::now();
                if let Err(e) = self.renew().await {
                    tracing::warn!(error = %e, "renewing worker leases failed");
                }
            }
            // A run ended here: it may have held its tenant's quota.
            claim_due |= self.expire().await;
            // At least every DISPATCH_POLL: a lost NOTIFY, a jittered run
            // coming due. A slot freed after claims that filled theirs:
            // runs may have been left for want of it.
            if claim_due || last_claim.elapsed() >= DISPATCH_POLL || self.slot_freed_for_more() {
                last_claim = tokio::time::Instant::now();
                if let Err(e) = self.dispatch().await {
                    tracing::warn!(error = %e, "claiming runs for workers failed");
                }
            }
            let pause = self
                .sleep_time()
                .min(DISPATCH_POLL.saturating_sub(last_claim.elapsed()));
            claim_due = tokio::select! {
                _ = self.0.wake.notified() => true,
                _ = self.0.nudge.notified() => false,
                _ = tokio::time::sleep(pause) => false,
                _ = stop.cancelled() => return,
            };
        }
    }

    /// Whether the last pass's claims took every slot they asked for and a
    /// stream has a free slot now.
    fn slot_freed_for_more(&self) -> bool {
        let st = self.state();
        st.slot_bound && st.streams.values().any(|s| s.held.len() < s.slots)
    }

    /// Until the next lease renewal, kill grace or deadline, at most
    /// [`DISPATCH_POLL`].
    fn sleep_time(&self) -> Duration {
        let now = self.0.core.clock.now();
        let mut pause = DISPATCH_POLL.min(self.0.lease / 3);
        let st = self.state();
        for s in st.streams.values() {
            for h in s.held.values() {
                for t in [h.deadline, h.cancel_by.as_ref().map(|c| c.0)]
                    .into_iter()
                    .flatten()
                {
                    let d = (t - now).to_std().unwrap_or(Duration::ZERO);
                    pause = pause.min(d.max(Duration::from_millis(5)));
                }
            }
        }
        pause
    }

    /// One dispatch pass: one claim per (queue, tenant) for the free slots
    /// of all its streams, the claimed runs dealt to the streams one slot
    /// each in turn (the first stream rotating between passes), so equal
    /// workers share a queue evenly and a claim is as large as the free
    /// slots allow (a claim's cost is mostly fixed).
    async fn dispatch(&self) -> std::result::Result<(), db::Error> {
        let groups: Vec<(ClaimKind, Vec<u64>)> = {
            let mut st = self.state();
            st.turn = st.turn.wrapping_add(1);
            let mut ids: Vec<u64> = st.streams.keys().copied().collect();
            ids.sort_unstable();
            if !ids.is_empty() {
                let k = st.turn % ids.len();
                ids.rotate_left(k);
            }
            let mut full = false;
            let mut groups: Vec<(QueueKey, Vec<FreeSlots<'_>>)> = Vec::new();
            for id in ids {
                let Some(s) = st.streams.get(&id) else {
                    continue;
                };
                let free = s.slots.saturating_sub(s.held.len());
                if free == 0 {
                    // Runs may be waiting for this stream's slots.
                    full = true;
                    continue;
                }
                let key = (s.queue.clone(), s.tenant.clone());
                let entry = (id, s.worker_name.as_str(), free);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, g)) => g.push(entry),
                    None => groups.push((key, vec![entry])),
                }
            }
            let claims = groups
                .into_iter()
                .map(|((queue, tenant), streams)| {
                    // Slots dealt in turn: stream 1, 2, …, 1, 2, …
                    let mut slots = Vec::new();
                    let most = streams.iter().map(|(_, _, f)| *f).max().unwrap_or(0);
                    for round in 0..most {
                        for (id, name, free) in &streams {
                            if *free > round {
                                slots.push((*id, (*name).to_string()));
                            }
                        }
                    }
                    let (ids, worker_names): (Vec<u64>, Vec<String>) = slots.into_iter().unzip();
                    (
                        ClaimKind::Worker {
                            queue,
                            tenant,
                            worker_names,
                        },
                        ids,
                    )
                })
                .collect::<Vec<_>>();
            st.slot_bound = full;
            claims
        };
        for (kind, slots) in groups {
            let names = match &kind {
                ClaimKind::Worker { worker_names, .. } => worker_names.clone(),
                _ => Vec::new(),
            };
            let started = std::time::Instant::now();
            let claimed = self.claim(kind, slots.len()).await?;
            metrics::claimed("worker", started.elapsed(), claimed.iter().map(|c| &c.run));
            if claimed.len() >= slots.len() {
                self.state().slot_bound = true;
            }
            if claimed.is_empty() {
                continue;
            }
            // Announced before any worker has the runs, so before any of
            // their completions is.
            let announce = db::runs::Announce::events(claimed.iter().flat_map(|c| &c.events));
            self.0
                .core
                .announcer
                .send(announce.into_notifications(&self.0.core.node_id))
                .await;
            // Which slot each claimed run fills: the first free one of the
            // worker it was claimed for.
            let mut taken = vec![false; slots.len()];
            let now = self.0.core.clock.now();
            let mut orphans = Vec::new();
            {
                let mut st = self.state();
                let State {
                    streams, by_run, ..
                } = &mut *st;
                for c in claimed {
                    self.0.core.bus.publish(c.events);
                    let Some(token) = c.lease_token else { continue };
                    let slot = (0..slots.len()).find(|&i| {
                        !taken[i] && c.worker_name.as_deref() == Some(names[i].as_str())
                    });
                    let run = c.run;
                    let start = run.start_time.unwrap_or(now);
                    let held = Held {
                        run_id: run.id,
                        attempt: run.attempt,
                        deadline: deadline(Some(start), run.policy.timeout_secs.map(|t| t as i32)),
                        cancel_by: None,
                    };
                    let a = Assignment {
                        deadline: held.deadline,
                        lease_expire_time: start + self.lease_chrono(),
                        lease_token: token,
                        run,
                    };
                    let to = slot.map(|i| {
                        taken[i] = true;
                        slots[i]
                    });
                    match to.and_then(|id| Some((id, streams.get_mut(&id)?))) {
                        Some((id, s)) => {
                            by_run.insert(held.run_id, (id, token));
                            s.held.insert(token, held);
                            let _ = s.tx.send(ToWorker::Assigned(Box::new(a)));
                        }
                        // The stream went away meanwhile: the lease runs
                        // out and the reaper ends the run worker_lost.
                        None => orphans.push(held.run_id),
                    }
                }
            }
            for run in orphans {
                tracing::warn!(%run, "worker stream closed while its run was claimed; the lease will expire");
            }
        }
        Ok(())
    }

    async fn claim(
        &self,
        kind: ClaimKind,
        limit: usize,
    ) -> std::result::Result<Vec<db::runs::Claimed>, db::Error> {
        let mut tries = 0;
        loop {
            let mut conn = self.0.core.pool.acquire().await?;
            match db::runs::run_claim(
                &mut conn,
                &self.0.core.node_id,
                &self.0.core.clock,
                self.lease_chrono(),
                limit as i64,
                kind.clone(),
                &[],
            )
            .await
            {
                // Another node started a run of the same overlap-free
                // binding at this instant; claim again.
                Err(db::Error::Duplicate(c)) if c == "runs_one_running" && tries < 5 => {
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    /// Renews the leases held by connected streams; tells the workers of
    /// runs no longer theirs to stop, and delivers pending cancels (should
    /// their NOTIFY have been lost).
    async fn renew(&self) -> std::result::Result<(), db::Error> {
        let tokens: Vec<Uuid> = {
            let st = self.state();
            st.streams
                .values()
                .flat_map(|s| s.held.keys().copied())
                .collect()
        };
        if tokens.is_empty() {
            return Ok(());
        }
        let until = self.0.core.clock.now() + self.lease_chrono();
        let renewed =
            db::runs::run_worker_heartbeat(&self.0.core.pool, &tokens, None, until).await?;
        let valid: HashSet<Uuid> = renewed.iter().map(|r| r.token).collect();
        {
            let mut st = self.state();
            let State {
                streams, by_run, ..
            } = &mut *st;
            for s in streams.values_mut() {
                let gone: Vec<Uuid> = s
                    .held
                    .keys()
                    .filter(|t| tokens.contains(t) && !valid.contains(t))
                    .copied()
                    .collect();
                for t in gone {
                    if let Some(h) = s.held.remove(&t) {
                        by_run.remove(&h.run_id);
                    }
                    let _ = s.tx.send(ToWorker::Cancel {
                        lease_token: t,
                        reason: RunReason::LeaseLost.to_string(),
                    });
                }
            }
        }
        for r in renewed {
            if let Some(reason) = r.cancel_reason {
                self.send_cancel(r.run_id, &reason);
            }
        }
        self.0.nudge.notify_one();
        Ok(())
    }

    /// Ends the runs past their deadline (`TIMED_OUT`, cancel sent) or past
    /// their kill grace after a cancel (`CANCELLED`).
    /// Returns whether it released a slot (runs a tenant's concurrency
    /// quota held back may now start).
    async fn expire(&self) -> bool {
        let now = self.0.core.clock.now();
        let due: Vec<(Uuid, Held, mpsc::UnboundedSender<ToWorker>)> = {
            let st = self.state();
            st.streams
                .values()
                .flat_map(|s| {
                    s.held.iter().filter_map(|(t, h)| {
                        let late = h.deadline.is_some_and(|d| d <= now)
                            || h.cancel_by.as_ref().is_some_and(|c| c.0 <= now);
                        late.then(|| (*t, h.clone(), s.tx.clone()))
                    })
                })
                .collect()
        };
        let released = !due.is_empty();
        for (token, h, tx) in due {
            let (state, outcome) = match &h.cancel_by {
                Some((by, reason)) if *by <= now => (
                    RunState::Cancelled,
                    Outcome {
                        reason: reason.clone(),
                        retryable: false,
                        ..Outcome::default()
                    },
                ),
                _ => {
                    let _ = tx.send(ToWorker::Cancel {
                        lease_token: token,
                        reason: RunReason::Timeout.to_string(),
                    });
                    (
                        RunState::TimedOut,
                        Outcome {
                            reason: RunReason::Timeout.to_string(),
                            error_message: Some("the run outlived its timeout".into()),
                            ..Outcome::default()
                        },
                    )
                }
            };
            self.state().release(token);
            match finish(&self.0.core, h.run_id, h.attempt, state, outcome).await {
                Ok(_) => {}
                Err(e) => tracing::warn!(run = %h.run_id, error = %e,
                    "ending a worker run at its deadline failed; its lease will expire"),
            }
        }
        released
    }
}

/// A worker queue and, for a tenant key's worker, its tenant.
type QueueKey = (String, Option<String>);

/// A stream's id, its worker's name and its free slots.
type FreeSlots<'a> = (u64, &'a str, usize);

impl LocalRuns for Hub {
    fn cancel(&self, id: Uuid, reason: &str) -> bool {
        self.send_cancel(id, reason)
    }
}

impl Connection {
    /// Applies a batch of reports in order; returns one answer per report
    /// (`Precondition` for a lease that is no longer valid).
    pub async fn report(&self, items: Vec<Report>) -> Vec<(Uuid, Result<()>)> {
        let hub = &self.hub;
        // Heartbeats of the batch: one statement.
        let beats: Vec<Uuid> = items
            .iter()
            .filter_map(|r| match r {
                Report::Heartbeat(t) => Some(*t),
                _ => None,
            })
            .collect();
        let mut beat_answer: Result<HashSet<Uuid>> = Ok(HashSet::new());
        if !beats.is_empty() {
            beat_answer = heartbeat(&hub.0.core, hub.0.lease, self.tenant.as_deref(), &beats)
                .await
                .map(|(valid, _)| valid.into_iter().collect());
        }
        // Completions of the batch: one transaction, one commit (a commit
        // per run was the worker path's bottleneck).
        let completes: Vec<(Uuid, Option<serde_json::Value>)> = items
            .iter()
            .filter_map(|r| match r {
                Report::Complete(t, result) => Some((*t, result.clone())),
                _ => None,
            })
            .collect();
        let mut completed: HashMap<Uuid, Result<()>> = HashMap::new();
        if !completes.is_empty() {
            completed = complete_batch(&hub.0.core, self.tenant.as_deref(), completes).await;
        }
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let token = item.token();
            if let Some(r) = completed.remove(&token) {
                if !matches!(r, Err(Error::Unavailable(_) | Error::Internal(_))) {
                    hub.state().release(token);
                    hub.0.nudge.notify_one();
                }
                out.push((token, r));
                continue;
            }
            let r = match item {
                Report::Heartbeat(t) => match &beat_answer {
                    Ok(valid) if valid.contains(&t) => Ok(()),
                    Ok(_) => Err(lost()),
                    Err(e) => Err(Error::Precondition(e.to_string())),
                },
                other => {
                    let r = report_end(&hub.0.core, self.tenant.as_deref(), other).await;
                    if !matches!(r, Err(Error::Unavailable(_) | Error::Internal(_))) {
                        hub.state().release(token);
                        // Its tenant's quota may have held a run back (a
                        // failure's end announces only overlap-free runs).
                        hub.0.wake.notify_one();
                    }
                    r
                }
            };
            out.push((token, r));
        }
        out
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut st = self.hub.state();
        if let Some(s) = st.streams.remove(&self.id) {
            for h in s.held.values() {
                st.by_run.remove(&h.run_id);
            }
            tracing::info!(worker = %s.worker_name, queue = %s.queue, held = s.held.len(),
                "worker disconnected; its leases hold until they expire");
        }
    }
}

/// Completes, fails or acks the cancel of the run of a lease, for a worker
/// of `tenant` (`None`: any tenant). Unary form of [`Connection::report`]:
/// the hub releases the lease if a stream here holds it.
///
/// # Errors
/// `Precondition` when the lease is no longer valid (nothing changed).
pub async fn report_unary(hub: &Hub, tenant: Option<&str>, item: Report) -> Result<()> {
    let token = item.token();
    let r = report_end(&hub.0.core, tenant, item).await;
    if r.is_ok() {
        hub.state().release(token);
        // As for a stream's failures: its tenant's quota may have held a
        // run back.
        hub.0.wake.notify_one();
    }
    r
}

/// Renews the leases of `tokens` (of `tenant`'s runs only, when given) by
/// the node's lease; returns the valid tokens and the pending cancels
/// (token, reason).
///
/// # Errors
/// `Unavailable`/`Internal` on database failure.
pub async fn heartbeat(
    core: &Core,
    lease: Duration,
    tenant: Option<&str>,
    tokens: &[Uuid],
) -> Result<(Vec<Uuid>, Vec<(Uuid, String)>)> {
    let until = core.clock.now()
        + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30));
    let renewed = db::runs::run_worker_heartbeat(&core.pool, tokens, tenant, until)
        .await
        .map_err(|e| Error::db(e, &super::Target::new("run", "lease")))?;
    let cancels = renewed
        .iter()
        .filter_map(|r| r.cancel_reason.clone().map(|c| (r.token, c)))
        .collect();
    Ok((renewed.into_iter().map(|r| r.token).collect(), cancels))
}

impl Hub {
    /// The node's lease.
    pub fn lease(&self) -> Duration {
        self.0.lease
    }

    /// The use-case core.
    pub fn core(&self) -> &Core {
        &self.0.core
    }
}

/// Appends `lines` (`(stderr, text)`, in order) to the log of the run of
/// lease `token` (of `tenant`'s runs only, when given) as `log` events,
/// published; returns how many.
///
/// # Errors
/// `Precondition` when the lease is no longer valid (nothing stored).
pub async fn append_logs(
    core: &Core,
    tenant: Option<&str>,
    token: Uuid,
    lines: Vec<(bool, String)>,
) -> Result<usize> {
    let target = super::Target::new("run", "lease");
    let run = db::runs::run_by_lease(&core.pool, token)
        .await
        .map_err(Error::on(&target))?
        .ok_or_else(lost)?;
    if tenant.is_some_and(|t| t != run.tenant_id) {
        return Err(lost());
    }
    let bodies: Vec<EventBody> = lines
        .into_iter()
        .map(|(stderr, message)| EventBody::Log {
            stream: if stderr {
                LogStream::Stderr
            } else {
                LogStream::Stdout
            },
            message,
        })
        .collect();
    let n = bodies.len();
    let mut tx = super::begin(core, &target).await?;
    let events =
        db::events::event_append(&mut tx, &core.node_id, run.id, &bodies, core.clock.now())
            .await
            .map_err(Error::on(&target))?;
    // The append locked the run's row: the lease is checked again under
    // the lock, so no line lands after the run ended.
    let still = db::runs::run_by_lease(&mut *tx, token)
        .await
        .map_err(Error::on(&target))?;
    if still.is_none_or(|r| r.id != run.id) {
        return Err(lost());
    }
    super::commit(tx, &target).await?;
    core.bus.publish(events);
    Ok(n)
}

/// A worker's progress report of one run (the fields of a `progress` run
/// event).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressReport {
    /// 0 to 100.
    pub percent: f64,
    /// 1-based current step; 0 = not given.
    pub current_step: u32,
    /// Steps in all; 0 = not given.
    pub total_steps: u32,
    /// For people, at most 1 KiB.
    pub message: String,
}

impl ProgressReport {
    /// Checks the ranges.
    ///
    /// # Errors
    /// A violation naming the field.
    pub fn validate(&self) -> std::result::Result<(), FieldViolation> {
        if !(0.0..=100.0).contains(&self.percent) {
            return Err(FieldViolation::new("percent", "must be 0 to 100"));
        }
        if self.total_steps > 0 && self.current_step > self.total_steps {
            return Err(FieldViolation::new(
                "current_step",
                format!(
                    "{} is past total_steps {}",
                    self.current_step, self.total_steps
                ),
            ));
        }
        if self.message.len() > MAX_ERROR_BYTES {
            return Err(FieldViolation::new("message", "is longer than 1 KiB"));
        }
        Ok(())
    }
}

/// Records the progress of the run of lease `token` (of `tenant`'s runs
/// only, when given): a `progress` run event (TailRun, WatchEvents) and
/// `Run.progress`.
///
/// # Errors
/// `Invalid` for a bad report; `Precondition` when the lease is no longer
/// valid.
pub async fn report_progress(
    core: &Core,
    tenant: Option<&str>,
    token: Uuid,
    progress: ProgressReport,
) -> Result<()> {
    progress.validate()?;
    let target = super::Target::new("run", "lease");
    let run = db::runs::run_by_lease(&core.pool, token)
        .await
        .map_err(Error::on(&target))?
        .ok_or_else(lost)?;
    if tenant.is_some_and(|t| t != run.tenant_id) {
        return Err(lost());
    }
    // Fenced like the other writes: the event is appended only while the
    // run is RUNNING at the lease's attempt (one run row is leased once).
    let progress = crate::domain::Progress {
        percent: progress.percent,
        current_step: progress.current_step,
        total_steps: progress.total_steps,
        message: progress.message,
    };
    match super::runs::report_progress(core, run.id, run.attempt, &progress).await {
        Ok(_) => Ok(()),
        Err(Error::Precondition(_)) => Err(lost()),
        Err(e) => Err(e),
    }
}

fn lost() -> Error {
    Error::Precondition(
        "the lease is no longer valid (the run ended, or was reaped and retried): drop the run"
            .into(),
    )
}

/// The end of a lease's run as a worker reports it (module docs, fencing).
async fn report_end(core: &Core, tenant: Option<&str>, item: Report) -> Result<()> {
    let token = item.token();
    let target = super::Target::new("run", "lease");
    let run = db::runs::run_by_lease(&core.pool, token)
        .await
        .map_err(Error::on(&target))?
        .ok_or_else(lost)?;
    if tenant.is_some_and(|t| t != run.tenant_id) || !matches!(run.handler, Handler::Worker(_)) {
        return Err(lost());
    }
    let (state, outcome) = match item {
        Report::Heartbeat(_) => return Ok(()),
        Report::Complete(_, result) => (
            RunState::Succeeded,
            Outcome {
                result,
                ..Outcome::default()
            },
        ),
        Report::Fail(_, error, retryable) => match &run.cancel_reason {
            // Asked to stop: a failure is the worker's answer to it.
            Some(reason) => (
                RunState::Cancelled,
                Outcome {
                    reason: reason.clone(),
                    error_message: Some(clip(&error)),
                    retryable: false,
                    ..Outcome::default()
                },
            ),
            None => (
                RunState::Failed,
                Outcome {
                    error_message: Some(clip(&error)),
                    retryable,
                    ..Outcome::default()
                },
            ),
        },
        Report::CancelAck(_) => (
            RunState::Cancelled,
            Outcome {
                reason: run
                    .cancel_reason
                    .clone()
                    .unwrap_or_else(|| RunReason::Cancelled.to_string()),
                retryable: false,
                ..Outcome::default()
            },
        ),
    };
    if finish(core, run.id, run.attempt, state, outcome).await? {
        Ok(())
    } else {
        Err(lost())
    }
}

/// Completes the runs of several leases in one transaction, one statement
/// ([`db::runs::run_complete_by_leases`]): each item is fenced on its own (a
/// lost lease answers `Precondition` for that item and changes nothing), the
/// whole batch commits once, and its events are published after the commit.
/// A database error fails every item of the batch (nothing was committed,
/// the leases still hold).
async fn complete_batch(
    core: &Core,
    tenant: Option<&str>,
    items: Vec<(Uuid, Option<serde_json::Value>)>,
) -> HashMap<Uuid, Result<()>> {
    let target = super::Target::new("run", "lease");
    let tokens: Vec<Uuid> = items.iter().map(|(t, _)| *t).collect();
    let results: Vec<Option<String>> = items
        .iter()
        .map(|(_, r)| r.as_ref().map(serde_json::Value::to_string))
        .collect();
    let run = async {
        let now = core.clock.now();
        let mut tx = super::begin_generic(core, &target).await?;
        let (done, announce) =
            db::runs::run_complete_by_leases(&mut tx, &tokens, &results, tenant, now)
                .await
                .map_err(Error::on(&target))?;
        super::commit(tx, &target).await?;
        core.announcer
            .send(announce.into_notifications(&core.node_id))
            .await;
        tracing::debug!(runs = done.len(), "worker runs completed in one batch");
        let mut out: HashMap<Uuid, Result<()>> = tokens.iter().map(|t| (*t, Err(lost()))).collect();
        let mut events = Vec::with_capacity(done.len());
        for c in done {
            out.insert(c.token, Ok(()));
            metrics::run_duration(
                RunState::Succeeded,
                &c.event.tenant_id,
                c.start_time,
                Some(c.event.time),
            );
            events.push(c.event);
        }
        core.bus.publish(events);
        Ok::<_, Error>(out)
    };
    match run.await {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(error = %e, "a batch of worker completions failed; nothing was committed");
            // Answered as retryable failures, never as lost leases.
            // A collision with another transaction is as transient as a
            // lost connection: the worker sends the items again.
            let retry = |e: &Error| match e {
                Error::Unavailable(_) | Error::Conflict(_) => {
                    Error::Unavailable(db::Error::Refused(e.to_string()))
                }
                _ => Error::Internal(db::Error::Refused(e.to_string())),
            };
            tokens.iter().map(|t| (*t, Err(retry(&e)))).collect()
        }
    }
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_string();
    }
    let mut at = MAX_ERROR_BYTES;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s[..at].to_string()
}

/// Ends run `id` of `attempt` in `state` if it is still `RUNNING` (the lease),
/// with its retry per policy in the same transaction (as the executor's
/// finish); publishes the events. Returns whether it ended it.
async fn finish(
    core: &Core,
    id: Uuid,
    attempt: i32,
    state: RunState,
    outcome: Outcome,
) -> Result<bool> {
    let target = super::Target::new("run", id.to_string());
    let now = core.clock.now();
    let mut tx = super::begin(core, &target).await?;
    // A retry is written only while the binding exists; its lock is taken
    // before the run's row (the order DeleteBinding takes them in).
    let may_retry = matches!(state, RunState::Failed | RunState::TimedOut) && outcome.retryable;
    let binding = if may_retry {
        db::runs::run_binding_of(&mut *tx, id)
            .await
            .map_err(Error::on(&target))?
    } else {
        None
    };
    let bound = match binding {
        Some(b) => db::bindings::binding_lock_shared(&mut *tx, b)
            .await
            .map_err(Error::on(&target))?,
        None => false,
    };
    let Some((ended, ev)) =
        db::runs::run_finish(&mut tx, &core.node_id, id, attempt, state, &outcome, now)
            .await
            .map_err(Error::on(&target))?
    else {
        return Ok(false);
    };
    let mut events = vec![ev];
    let retry =
        NewRun::retry_of(core.clock.new_id(), &ended, outcome.retryable, now).filter(|_| bound);
    let retried = retry.is_some();
    if let Some(retry) = retry {
        events.extend(
            db::runs::run_insert(&mut tx, &core.node_id, &[retry], now)
                .await
                .map_err(Error::on(&target))?,
        );
    }
    // The end, final unless retried, in the same transaction.
    db::runs::run_end_record(&mut tx, &[(ended.id, retried)])
        .await
        .map_err(Error::on(&target))?;
    super::commit(tx, &target).await?;
    metrics::run_durations([&ended]);
    tracing::info!(run = %id, state = state.as_str(), reason = %outcome.reason,
        retry = events.len() > 1, "worker run finished");
    core.bus.publish(events);
    Ok(true)
}

fn deadline(start: Option<DateTime<Utc>>, timeout_secs: Option<i32>) -> Option<DateTime<Utc>> {
    Some(start? + chrono::Duration::seconds(i64::from(timeout_secs?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_is_checked() {
        let ok = Hello {
            queue: "billing.q-1".into(),
            worker_name: "host-1:42".into(),
            slots: 2,
            lease_tokens: vec![],
        };
        assert!(ok.validate().is_ok());
        let bad = |f: fn(&mut Hello)| {
            let mut h = ok.clone();
            f(&mut h);
            h.validate().expect_err("refused").field
        };
        assert_eq!(bad(|h| h.queue = String::new()), "hello.queue");
        assert_eq!(bad(|h| h.queue = "a b".into()), "hello.queue");
        assert_eq!(bad(|h| h.queue = "q".repeat(129)), "hello.queue");
        assert_eq!(bad(|h| h.worker_name = String::new()), "hello.worker_name");
        assert_eq!(bad(|h| h.slots = 0), "hello.slots");
        assert_eq!(bad(|h| h.slots = 1001), "hello.slots");
    }

    #[test]
    fn progress_reports_are_checked() {
        let ok = ProgressReport {
            percent: 50.0,
            current_step: 2,
            total_steps: 4,
            message: "half".into(),
        };
        assert!(ok.validate().is_ok());
        let bad = |f: fn(&mut ProgressReport)| {
            let mut p = ok.clone();
            f(&mut p);
            p.validate().expect_err("refused").field
        };
        assert_eq!(bad(|p| p.percent = 100.5), "percent");
        assert_eq!(bad(|p| p.percent = f64::NAN), "percent");
        assert_eq!(bad(|p| p.current_step = 5), "current_step");
        assert_eq!(bad(|p| p.message = "x".repeat(1025)), "message");
    }

    #[test]
    fn deadlines_follow_the_timeout() {
        let t = Utc::now();
        assert_eq!(deadline(Some(t), None), None);
        assert_eq!(deadline(None, Some(5)), None);
        assert_eq!(
            deadline(Some(t), Some(5)),
            Some(t + chrono::Duration::seconds(5))
        );
        assert_eq!(clip(&"é".repeat(600)).len(), 1024);
    }
}
