//! Bounds on expensive calls (schedule previews, backfill enumeration): the
//! CPU work runs on the blocking pool, never on the async workers that serve
//! every other caller and the engine, under a time limit, and at most
//! [`COSTLY_PER_CALLER`] such calls run at once **per caller** (tenant, else
//! key, else connection) — a limit of its own that no other tenant can use up.
//! Open streams are bounded the same way, [`STREAMS_PER_TENANT`] per tenant
//! and per connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Status};
use tonic_types::StatusExt;

use super::auth::Caller;
use crate::usecase::runs::MAX_BACKFILL;

/// Streams (TailRun, WatchEvents) one tenant may have open on a node at once.
pub const STREAMS_PER_TENANT: usize = 256;
/// Expensive calls one caller may have in flight at once.
pub const COSTLY_PER_CALLER: usize = 2;
/// Longest an expensive call may compute before `DEADLINE_EXCEEDED`.
pub const COSTLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Above this many callers tracked, idle ones are forgotten.
const MAX_TRACKED: usize = 10_000;

/// Who a call with metadata `md` has its rates counted for: the tenant it
/// acts for (a tenant key's own, or the `x-tenant-id` a platform key names),
/// else its key, else (no authentication, no tenant) one shared name.
pub fn rate_key(caller: &Caller, md: &tonic::metadata::MetadataMap) -> String {
    if let Some(t) = &caller.tenant {
        return t.clone();
    }
    if let Some(t) = md.get(super::TENANT_HEADER).and_then(|v| v.to_str().ok()) {
        return super::truncate(t.to_string(), 128);
    }
    match caller.key_id {
        Some(k) => format!("key:{k}"),
        None => "platform".to_string(),
    }
}

/// Per-caller concurrency limits for expensive calls and open streams
/// (module docs).
#[derive(Debug, Default)]
pub struct CostLimiter {
    callers: Mutex<HashMap<String, Arc<Semaphore>>>,
    streams: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// `who`'s semaphore of `permits` in `map`, created on first use; idle
/// entries are forgotten once the map grows past [`MAX_TRACKED`].
fn semaphore(
    map: &Mutex<HashMap<String, Arc<Semaphore>>>,
    who: String,
    permits: usize,
) -> Arc<Semaphore> {
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if map.len() > MAX_TRACKED {
        map.retain(|_, s| s.available_permits() < permits);
    }
    Arc::clone(
        map.entry(who)
            .or_insert_with(|| Arc::new(Semaphore::new(permits))),
    )
}

/// Who a call is limited as, each with its own bound: the tenant it acts
/// for (else its key), and the connection it came on (peer address), so
/// naming a different tenant per call (possible with platform keys and in
/// the development mode) does not lift the bound of one client.
pub fn caller_keys<T>(caller: &Caller, req: &Request<T>) -> Vec<String> {
    let mut keys = Vec::with_capacity(2);
    if let Some(t) = &caller.tenant {
        keys.push(format!("tenant:{t}"));
    } else if let Some(t) = req
        .metadata()
        .get(super::TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        keys.push(format!("tenant:{}", super::truncate(t.to_string(), 128)));
    } else if let Some(k) = caller.key_id {
        keys.push(format!("key:{k}"));
    }
    if let Some(a) = req.remote_addr() {
        keys.push(format!("peer:{a}"));
    }
    keys
}

impl CostLimiter {
    /// Runs `work` on the blocking pool as one of `who`'s expensive calls.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when any of `who` (tenant, connection:
    /// [`caller_keys`]) already has [`COSTLY_PER_CALLER`] in flight; `DEADLINE_EXCEEDED` after [`COSTLY_TIMEOUT`] (the slot stays
    /// taken until the work ends, so a caller cannot pile work up);
    /// `INTERNAL` if the work panicked.
    pub async fn run<T, F>(&self, who: Vec<String>, what: &str, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let mut permit = Vec::with_capacity(who.len());
        for w in who {
            let sem = semaphore(&self.callers, w, COSTLY_PER_CALLER);
            permit.push(sem.try_acquire_owned().map_err(|_| {
                Status::resource_exhausted(format!(
                    "at most {COSTLY_PER_CALLER} {what} calls at once per tenant and per connection; retry when one has answered"
                ))
            })?);
        }
        let task = tokio::task::spawn_blocking(move || {
            let out = work();
            drop(permit);
            out
        });
        match tokio::time::timeout(COSTLY_TIMEOUT, task).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(super::internal(&e)),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{what} took longer than {}s; ask for fewer fire times",
                COSTLY_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Slots for one open stream of `tenant` on the connection from `peer`,
    /// held while the stream lives.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the tenant, or the connection, has
    /// [`STREAMS_PER_TENANT`] open.
    pub fn stream_permit(
        &self,
        tenant: &str,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Vec<OwnedSemaphorePermit>, Status> {
        let mut keys = vec![format!("tenant:{tenant}")];
        keys.extend(peer.map(|a| format!("peer:{a}")));
        keys.into_iter()
            .map(|k| {
                semaphore(&self.streams, k, STREAMS_PER_TENANT)
                    .try_acquire_owned()
                    .map_err(|_| {
                        Status::resource_exhausted(format!(
                            "at most {STREAMS_PER_TENANT} open TailRun/WatchEvents streams per tenant and per connection on a node; close one first"
                        ))
                    })
            })
            .collect()
    }
}

/// Per-tenant rates on a node (token buckets, `governor`): changes (every
/// call that needs more than the viewer role) per second, and runs created
/// through the API (TriggerRun, RetryRun: 1; BackfillRuns: one per fire
/// time) per second. Each tenant has buckets of its own, so no tenant can
/// spend another's; past its rate a call is `RESOURCE_EXHAUSTED` with a
/// `RetryInfo` saying when to retry, and changes nothing.
///
/// Why: changes take row locks and some the claim lock (stopping calls,
/// ordered with claims), and every run inserted costs the database that all
/// tenants share. A burst of 10 s worth of runs is allowed at once (at
/// least one largest backfill, 10 000 runs).
#[derive(Debug)]
pub struct RateLimits {
    writes: Option<(Keyed, u32)>,
    runs: Option<(Keyed, u32)>,
}

type Keyed = governor::DefaultKeyedRateLimiter<String>;

impl RateLimits {
    /// Buckets for `writes_per_sec` changes (burst 5 s worth) and
    /// `runs_per_sec` API-created runs (burst 10 s worth, at least
    /// [`MAX_BACKFILL`], the largest backfill) per tenant; 0 turns that limit
    /// off.
    pub fn new(writes_per_sec: u32, runs_per_sec: u32) -> RateLimits {
        let bucket = |rate: u32, burst: u32| {
            let rate = std::num::NonZeroU32::new(rate)?;
            let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
            Some((
                governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst)),
                rate.get(),
            ))
        };
        RateLimits {
            writes: bucket(writes_per_sec, writes_per_sec.saturating_mul(5)),
            runs: bucket(
                runs_per_sec,
                runs_per_sec.saturating_mul(10).max(MAX_BACKFILL as u32),
            ),
        }
    }

    /// No limits (tests of other things).
    pub fn unlimited() -> RateLimits {
        RateLimits::new(0, 0)
    }

    /// Spends one change of `tenant`'s.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` with `RetryInfo` past the rate.
    pub fn write(&self, tenant: &str) -> Result<(), Status> {
        match &self.writes {
            None => Ok(()),
            Some((l, rate)) => take(l, tenant, 1, || {
                format!("tenant {tenant:?} may make at most {rate} changes per second on a node")
            }),
        }
    }

    /// Spends `n` API-created runs of `tenant`'s.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` with `RetryInfo` past the rate.
    pub fn runs(&self, tenant: &str, n: usize) -> Result<(), Status> {
        let Some((l, rate)) = &self.runs else {
            return Ok(());
        };
        // More than u32 runs is more than any bucket holds: refused, not
        // waved through.
        let Some(n) = std::num::NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        take(l, tenant, n.get(), || {
            format!(
                "tenant {tenant:?} may create at most {rate} runs per second through the API on a node"
            )
        })
    }
}

fn take(l: &Keyed, tenant: &str, n: u32, what: impl Fn() -> String) -> Result<(), Status> {
    if l.len() > MAX_TRACKED {
        l.retain_recent();
    }
    let key = tenant.to_string();
    let n = std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
    let wait = match l.check_key_n(&key, n) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(not_until)) => not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        )),
        // More than the bucket holds: cannot happen for the run bucket
        // (≥ MAX_BACKFILL); for any other cost, wait for a full bucket.
        Err(_) => Duration::from_secs(10),
    };
    let wait = wait.max(Duration::from_millis(1));
    Err(Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("{}; retry in {:.3} s", what(), wait.as_secs_f64()),
        tonic_types::ErrorDetails::with_retry_info(Some(wait)),
    ))
}
