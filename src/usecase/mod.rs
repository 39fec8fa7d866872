//! Use cases: what sked does for a caller, whoever the caller is — the gRPC
//! services, the `sked` CLI, later a console or a worker protocol. One
//! module per resource ([`definitions`], [`bindings`], [`runs`], [`status`],
//! [`tenancy`]); each function owns its transaction, the checks beyond a
//! request's shape (existence, health, etag, quotas, idempotency), the
//! audit event and run creation, and publishes what it committed.
//!
//! Callers authenticate and authorize first (the gRPC gate), parse their
//! input into domain types, call one function here and convert the result.
//! Errors are [`Error`]s in sked's own terms; `grpc` maps them to status
//! codes (with `BadRequest` and `ResourceInfo` details).

pub mod audit;
pub mod bindings;
pub mod definitions;
pub mod notifications;
pub mod runs;
pub mod sessions;
pub mod status;
pub mod tenancy;
pub mod workers;

use std::fmt;
use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;

use crate::db;
use crate::domain::tenancy::{AuditEvent, Caller};
use crate::domain::{Binding, Clock, FieldViolation};
use crate::events::EventBus;

/// What every use case needs: the database, the clock and what to wake
/// after a commit.
#[derive(Debug, Clone)]
pub struct Core {
    /// Database (the API's pool).
    pub pool: PgPool,
    /// Source of now.
    pub clock: Clock,
    /// This node's id (written into the run events it creates).
    pub node_id: String,
    /// Local event bus: committed run events are published here.
    pub bus: EventBus,
    /// Wakes the local executor after runs were queued.
    pub executor_wake: Arc<Notify>,
    /// Sends the NOTIFYs of committed changes that other nodes must hear
    /// of (run events, waiting runs), outside their transactions: one per
    /// node, shared by every clone, so they go out in the order handed over.
    pub announcer: crate::db::notify::Announcer,
}

/// Who acts, and as which action: the audit log records both.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    /// The authenticated caller.
    pub caller: &'a Caller,
    /// The action's name in the audit log: the full gRPC method
    /// (`sked.v1.RunService/TriggerRun`) for API calls, `sked <command>`
    /// for the CLI.
    pub action: &'a str,
}

impl<'a> Actor<'a> {
    /// `caller` acting as `action`.
    pub fn new(caller: &'a Caller, action: &'a str) -> Actor<'a> {
        Actor { caller, action }
    }

    /// The audit event `id` (from the node's clock,
    /// [`crate::domain::Clock::new_id`]) of a committed change to `target`
    /// in `tenant`.
    pub fn audit(
        &self,
        id: uuid::Uuid,
        now: chrono::DateTime<chrono::Utc>,
        tenant: Option<&str>,
        target: String,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) -> AuditEvent {
        self.caller
            .audit(id, now, tenant, self.action, target, before, after)
    }
}

/// What an operation acts on, for errors: `run 0190…`, `definition "nightly"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Resource type, singular: `run`, `binding`, `definition`, `api_key`,
    /// `quota`, `tenant`.
    pub kind: &'static str,
    /// Its id or name; empty for a collection.
    pub name: String,
}

impl Target {
    /// `kind` named `name`.
    pub fn new(kind: &'static str, name: impl fmt::Display) -> Target {
        Target {
            kind,
            name: name.to_string(),
        }
    }

    /// The collection of `kind` (an insert or a list).
    pub fn all(kind: &'static str) -> Target {
        Target {
            kind,
            name: String::new(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.name.is_empty()) {
            (k, true) => write!(f, "{k}"),
            ("definition", false) => write!(f, "definition {:?}", self.name),
            (k, false) => write!(f, "{k} {}", self.name),
        }
    }
}

/// Why a use case refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is invalid beyond its shape (`INVALID_ARGUMENT`).
    #[error("{}: {}", .0.field, .0.reason)]
    Invalid(FieldViolation),
    /// The target does not exist, or belongs to another tenant.
    #[error("{0} not found")]
    NotFound(Target),
    /// The target exists already.
    #[error("{0} already exists")]
    AlreadyExists(Target),
    /// The target's state does not allow the operation (a run that ended, a
    /// broken binding, a definition still bound); the text says why.
    #[error("{0}")]
    Precondition(String),
    /// A tenant quota or budget refuses it; the text names the limit.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The target changed since the caller read it (etag), or concurrently.
    #[error("{0}")]
    Conflict(String),
    /// Stored data of the target cannot be read.
    #[error("stored data of {target} cannot be read: {source}")]
    Corrupt {
        /// What was read.
        target: Target,
        /// The decoding error.
        source: db::Error,
    },
    /// The database cannot be reached; retrying later may work.
    #[error("database unavailable: {0}")]
    Unavailable(db::Error),
    /// Anything else: a bug or an unexpected database error.
    #[error("{0}")]
    Internal(db::Error),
}

impl From<FieldViolation> for Error {
    fn from(v: FieldViolation) -> Self {
        Error::Invalid(v)
    }
}

impl Error {
    /// Maps a database error of an operation on `target`.
    pub fn db(e: db::Error, target: &Target) -> Error {
        match e {
            db::Error::NotFound => Error::NotFound(target.clone()),
            db::Error::Duplicate(_) => Error::AlreadyExists(target.clone()),
            db::Error::Refused(m) => Error::Precondition(m),
            db::Error::OverQuota(m) => Error::QuotaExceeded(m),
            db::Error::Conflict => Error::Conflict(format!(
                "{target} was changed concurrently; read it again and retry"
            )),
            e @ db::Error::Corrupt { .. } => Error::Corrupt {
                target: target.clone(),
                source: e,
            },
            // Two transactions collided (a deadlock PostgreSQL broke, or a
            // serialization failure): nothing was written; the call may be
            // retried as it is (ABORTED).
            db::Error::Sqlx(sqlx::Error::Database(d))
                if matches!(d.code().as_deref(), Some("40P01" | "40001")) =>
            {
                Error::Conflict(format!(
                    "{target}: the database aborted the transaction as it collided with another \
                     ({}); nothing was written, retry the call",
                    d.message()
                ))
            }
            e @ db::Error::Sqlx(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::Io(_)
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_),
            ) => Error::Unavailable(e),
            e => Error::Internal(e),
        }
    }

    /// `|e| Error::db(e, target)`, for `map_err`.
    pub fn on(target: &Target) -> impl Fn(db::Error) -> Error + '_ {
        move |e| Error::db(e, target)
    }
}

/// Result of a use case.
pub type Result<T> = std::result::Result<T, Error>;

/// A transaction on the API's pool.
pub(crate) type Tx = Transaction<'static, Postgres>;

/// Begins a transaction for an operation on `target`.
pub(crate) async fn begin(core: &Core, target: &Target) -> Result<Tx> {
    core.pool
        .begin()
        .await
        .map_err(|e| Error::db(e.into(), target))
}

/// [`begin`] of a transaction whose statements are planned once per
/// connection ([`db::begin_generic`]).
pub(crate) async fn begin_generic(core: &Core, target: &Target) -> Result<Tx> {
    db::begin_generic(&core.pool)
        .await
        .map_err(|e| Error::db(e, target))
}

/// Commits `tx` of an operation on `target`.
pub(crate) async fn commit(tx: Tx, target: &Target) -> Result<()> {
    tx.commit().await.map_err(|e| Error::db(e.into(), target))
}

/// Appends `event` to the audit log inside the change's transaction.
pub(crate) async fn record(
    tx: &mut sqlx::PgConnection,
    event: &AuditEvent,
    target: &Target,
) -> Result<()> {
    db::tenancy::audit_insert(tx, event)
        .await
        .map_err(Error::on(target))
}

/// `Precondition` when the binding is broken (its stored data cannot be
/// read or computed): only Get, List and Delete work on it.
pub fn require_healthy(b: &Binding) -> Result<()> {
    match &b.broken_reason {
        None => Ok(()),
        Some(r) => Err(Error::Precondition(format!(
            "binding {} is broken ({r}); it can only be read and deleted",
            b.id
        ))),
    }
}

/// `Conflict` unless `etag` is empty or equals the current `version`.
pub fn check_etag(target: &Target, etag: &str, version: i64) -> Result<()> {
    if etag.is_empty() || etag == version.to_string() {
        Ok(())
    } else {
        Err(Error::Conflict(format!(
            "{target} etag {} does not match the current etag \"{version}\"; read it again and retry",
            crate::domain::quote(etag)
        )))
    }
}

/// One page of a list: at most `size` items after the `after` cursor.
#[derive(Debug, Clone, Copy)]
pub struct Page<C> {
    /// Items per page, 1-1000.
    pub size: i64,
    /// Cursor: the last item of the previous page; `None` for the first.
    pub after: Option<C>,
}

/// The first `limit` of `rows` fetched with `limit + 1`, and the cursor of
/// the next page (`None` when there are no more rows).
pub fn page<T, C>(mut rows: Vec<T>, limit: i64, cursor: impl Fn(&T) -> C) -> (Vec<T>, Option<C>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = match rows.last() {
        Some(last) if more => Some(cursor(last)),
        _ => None,
    };
    (rows, next)
}

/// A page token: the cursor of the next page and a digest of the filters
/// the list was asked with, `<cursor>.<16 hex digits>`, so that a token is
/// only accepted with the filters it was issued for.
pub fn page_token(cursor: impl fmt::Display, filters: &str) -> String {
    format!("{cursor}.{}", filters_digest(filters))
}

/// The cursor of `token`, issued by [`page_token`] for `filters`; `None`
/// for an empty token (the first page).
///
/// # Errors
/// `Invalid` on `page_token` when it is malformed, or was issued for other
/// filters or another order.
pub fn page_cursor(token: &str, filters: &str) -> Result<Option<uuid::Uuid>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        Error::Invalid(FieldViolation::new(
            "page_token",
            format!(
                "{} {why}; list again without a page token",
                crate::domain::quote(token)
            ),
        ))
    };
    let (cursor, digest) = token
        .split_once('.')
        .ok_or_else(|| bad("is not a page token of this list"))?;
    if digest != filters_digest(filters) {
        return Err(bad(
            "was issued for other filters or another order than this request's",
        ));
    }
    cursor
        .parse()
        .map(Some)
        .map_err(|_| bad("is not a page token of this list"))
}

/// First 8 bytes of the SHA-256 of `filters`, in hex.
fn filters_digest(filters: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(filters.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}
