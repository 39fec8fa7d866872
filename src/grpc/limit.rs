//! Bounds on expensive calls (schedule previews, backfill enumeration): the
//! CPU work runs on the blocking pool, never on the async workers that serve
//! every other caller and the engine, under a time limit, and at most
//! [`COSTLY_PER_CALLER`] such calls run at once **per caller** (tenant, else
//! key, else connection) — a limit of its own that no other tenant can use up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::{Request, Status};

use super::auth::Caller;

/// Expensive calls one caller may have in flight at once.
pub const COSTLY_PER_CALLER: usize = 2;
/// Longest an expensive call may compute before `DEADLINE_EXCEEDED`.
pub const COSTLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Above this many callers tracked, idle ones are forgotten.
const MAX_TRACKED: usize = 10_000;

/// Per-caller concurrency limits for expensive calls (module docs).
#[derive(Debug, Default)]
pub struct CostLimiter {
    callers: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Who a call is limited as: the tenant it acts for, else the key, else the
/// peer address (one connection).
pub fn caller_key<T>(caller: &Caller, req: &Request<T>) -> String {
    if let Some(t) = &caller.tenant {
        return format!("tenant:{t}");
    }
    if let Some(t) = req
        .metadata()
        .get(super::TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        return format!("tenant:{}", super::truncate(t.to_string(), 128));
    }
    if let Some(k) = caller.key_id {
        return format!("key:{k}");
    }
    req.remote_addr()
        .map_or_else(|| "peer:unknown".to_string(), |a| format!("peer:{a}"))
}

impl CostLimiter {
    /// Runs `work` on the blocking pool as one of `who`'s expensive calls.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when `who` already has [`COSTLY_PER_CALLER`]
    /// in flight; `DEADLINE_EXCEEDED` after [`COSTLY_TIMEOUT`] (the slot stays
    /// taken until the work ends, so a caller cannot pile work up);
    /// `INTERNAL` if the work panicked.
    pub async fn run<T, F>(&self, who: String, what: &str, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let sem = {
            let mut callers = self
                .callers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if callers.len() > MAX_TRACKED {
                callers.retain(|_, s| s.available_permits() < COSTLY_PER_CALLER);
            }
            Arc::clone(
                callers
                    .entry(who)
                    .or_insert_with(|| Arc::new(Semaphore::new(COSTLY_PER_CALLER))),
            )
        };
        let permit = sem.try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "at most {COSTLY_PER_CALLER} {what} calls at once per tenant; retry when one has answered"
            ))
        })?;
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
}
