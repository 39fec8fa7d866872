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

use super::auth::Caller;

/// Streams (TailRun, WatchEvents) one tenant may have open on a node at once.
pub const STREAMS_PER_TENANT: usize = 256;
/// Expensive calls one caller may have in flight at once.
pub const COSTLY_PER_CALLER: usize = 2;
/// Longest an expensive call may compute before `DEADLINE_EXCEEDED`.
pub const COSTLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Above this many callers tracked, idle ones are forgotten.
const MAX_TRACKED: usize = 10_000;

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
