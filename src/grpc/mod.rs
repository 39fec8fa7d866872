//! The gRPC API (`sked.v1`): one file per service, plus tenant context,
//! status mapping and proto ↔ domain conversion. No SQL, no transactions
//! and no business rules here: handlers parse a request into plain values,
//! call one function of [`crate::usecase`] (or open an event stream) and
//! convert the answer; a use-case error becomes its status code
//! (`impl From<usecase::Error> for Status`; `NOT_FOUND` carries a
//! `google.rpc.ResourceInfo`).
//!
//! Every request passes the authorization gate first ([`authz`]: one table
//! of role and scope per method, enforced by a tower layer; the key itself
//! is checked by [`auth`]), then the input boundary ([`codec`] decodes,
//! [`boundary`] checks each field against its bound), so handlers get the
//! caller and its tenant from [`authz::grant`] / [`authz::tenant_grant`] and
//! may rely on NUL-free, bounded strings, in-range timestamps and
//! durations, and params within size and depth. Expensive work is bounded
//! per tenant and connection by [`limit`].
//!
//! Errors: `INVALID_ARGUMENT` carries a `google.rpc.BadRequest`
//! naming the field; internal errors never leak SQL text — the client gets a
//! request id (also in a `google.rpc.RequestInfo` detail) and the server log
//! has the full chain under that id.

pub mod admin;
pub mod auth;
pub mod authz;
pub mod bindings;
pub mod boundary;
pub mod codec;
pub mod convert;
pub mod definitions;
pub mod limit;
pub mod logs;
pub mod notifications;
pub mod runs;
pub mod workers;

use std::sync::Arc;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::FieldViolation;
use crate::usecase::{self, Core};

/// Request header naming the tenant of a tenant-scoped call.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// What every service needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// What the use cases need: database, clock, node id, event bus,
    /// executor wake-up.
    pub core: Core,
    /// Cancelled at shutdown, after runs drained: ends every open stream.
    pub streams_stop: tokio_util::sync::CancellationToken,
    /// Authentication of callers (by the gate, [`authz`]).
    pub auth: Arc<auth::Auth>,
    /// Per-caller bounds on expensive calls.
    pub costly: Arc<limit::CostLimiter>,
    /// Per-tenant rates of changes (spent by the gate, [`authz`]) and of
    /// runs created through the API (spent by the handlers).
    pub rates: Arc<limit::RateLimits>,
    /// Seals the signing secrets of notification rules
    /// (`SKED_NOTIFY_KEY`); `None`: rules cannot be set.
    pub notify_key: Option<crate::domain::notify::NotifyKey>,
}

/// Longest field path kept in an error, in bytes.
pub const MAX_ERROR_FIELD: usize = 256;
/// Longest error reason kept, in bytes. With the field path, an error
/// message stays under 1 KiB, so it always fits the client's metadata
/// limits and the real status reaches it.
pub const MAX_ERROR_REASON: usize = 640;

/// `s` cut to at most `max` bytes at a character boundary, with `…` when cut.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push('…');
    }
    s
}

/// `INVALID_ARGUMENT` with a `BadRequest` detail for `v`; field and reason
/// are cut to [`MAX_ERROR_FIELD`] / [`MAX_ERROR_REASON`] bytes.
pub fn invalid(v: FieldViolation) -> Status {
    let field = truncate(v.field, MAX_ERROR_FIELD);
    let reason = truncate(v.reason, MAX_ERROR_REASON);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

impl From<usecase::Error> for Status {
    /// The status of a refused or failed use case: `INVALID_ARGUMENT` with
    /// `BadRequest`, `NOT_FOUND` with `ResourceInfo` (type and name of what
    /// was not found), `ALREADY_EXISTS`, `FAILED_PRECONDITION`,
    /// `RESOURCE_EXHAUSTED` (quotas), `ABORTED` (etag, concurrent change),
    /// `DATA_LOSS` (unreadable stored data of one resource), `UNAVAILABLE`
    /// (database), `INTERNAL` with a request id (anything else; the chain is
    /// logged, never sent).
    fn from(e: usecase::Error) -> Status {
        use usecase::Error as E;
        match e {
            E::Invalid(v) => invalid(v),
            E::NotFound(t) => {
                let message = truncate(format!("{t} not found"), MAX_ERROR_REASON);
                Status::with_error_details(
                    Code::NotFound,
                    message,
                    ErrorDetails::with_resource_info(
                        t.kind,
                        truncate(t.name, MAX_ERROR_FIELD),
                        "",
                        "not found",
                    ),
                )
            }
            E::AlreadyExists(t) => {
                Status::already_exists(truncate(format!("{t} already exists"), MAX_ERROR_REASON))
            }
            E::Precondition(m) => Status::failed_precondition(truncate(m, MAX_ERROR_REASON)),
            E::QuotaExceeded(m) => Status::resource_exhausted(truncate(m, MAX_ERROR_REASON)),
            E::Conflict(m) => Status::aborted(truncate(m, MAX_ERROR_REASON)),
            E::Corrupt { target, source } => {
                tracing::error!(error = %source, %target, "stored data cannot be read");
                Status::data_loss(truncate(
                    format!("stored data of {target} cannot be read: {source}"),
                    MAX_ERROR_REASON,
                ))
            }
            E::Unavailable(e) => {
                tracing::warn!(error = %e, "database unavailable");
                Status::unavailable("database unavailable; retry")
            }
            E::Internal(e) => internal(&e),
        }
    }
}

/// `INTERNAL` with a fresh request id; the error chain is logged under it.
pub fn internal(e: &(dyn std::error::Error + 'static)) -> Status {
    let request_id = uuid::Uuid::now_v7().to_string();
    let mut chain = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    tracing::error!(request_id, error = chain, "internal error");
    Status::with_error_details(
        Code::Internal,
        format!("internal error (request id {request_id})"),
        ErrorDetails::with_request_info(request_id, ""),
    )
}

/// Page size from a request: 0 → `default`, otherwise 1..=1000.
///
/// # Errors
/// `INVALID_ARGUMENT` on `page_size` when negative or above 1000.
pub fn page_size(n: i32, default: i64) -> Result<i64, Status> {
    match n {
        0 => Ok(default),
        1..=1000 => Ok(i64::from(n)),
        _ => Err(invalid(FieldViolation::new(
            "page_size",
            format!("{n} is out of range 0-1000"),
        ))),
    }
}

/// Parses a UUID field.
///
/// # Errors
/// `INVALID_ARGUMENT` on `field` when empty or not a UUID.
pub fn parse_uuid(field: &str, s: &str) -> Result<uuid::Uuid, Status> {
    if s.is_empty() {
        return Err(invalid(FieldViolation::new(field, "is required")));
    }
    s.parse().map_err(|_| {
        invalid(FieldViolation::new(
            field,
            format!("{} is not a UUID", boundary::quote(s)),
        ))
    })
}

/// The paths an update applies (AIP-134): `mask`'s paths, each of which must
/// be in `allowed`; or, when the mask is absent or empty, `implied` (the
/// fields the client set).
///
/// # Errors
/// `INVALID_ARGUMENT` on `update_mask` naming a path that is unknown or
/// immutable.
pub fn update_paths(
    mask: Option<&prost_types::FieldMask>,
    allowed: &[&'static str],
    implied: Vec<&'static str>,
) -> Result<Vec<&'static str>, Status> {
    let Some(mask) = mask.filter(|m| !m.paths.is_empty()) else {
        return Ok(implied);
    };
    mask.paths
        .iter()
        .map(|p| {
            allowed.iter().copied().find(|a| a == p).ok_or_else(|| {
                invalid(FieldViolation::new(
                    "update_mask",
                    format!(
                        "{} is not an updatable field (updatable: {})",
                        boundary::quote(p),
                        allowed.join(", ")
                    ),
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;
    use crate::db;
    use crate::usecase::{Error, Target};

    #[test]
    fn not_found_names_the_resource_in_resource_info() {
        let id = uuid::Uuid::now_v7();
        let s = Status::from(Error::NotFound(Target::new("run", id)));
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), format!("run {id} not found"));
        let info = s.get_details_resource_info().expect("ResourceInfo detail");
        assert_eq!(info.resource_type, "run");
        assert_eq!(info.resource_name, id.to_string());
    }

    #[test]
    fn use_case_errors_map_to_their_codes() {
        let cases = [
            (
                Error::Invalid(FieldViolation::new("f", "bad")),
                Code::InvalidArgument,
            ),
            (
                Error::AlreadyExists(Target::new("definition", "d")),
                Code::AlreadyExists,
            ),
            (Error::Precondition("x".into()), Code::FailedPrecondition),
            (Error::QuotaExceeded("x".into()), Code::ResourceExhausted),
            (Error::Conflict("x".into()), Code::Aborted),
            (
                Error::Unavailable(db::Error::Sqlx(sqlx::Error::PoolTimedOut)),
                Code::Unavailable,
            ),
            (
                Error::Internal(db::Error::Sqlx(sqlx::Error::RowNotFound)),
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().len() < 1024);
        }
        let s = Status::from(Error::AlreadyExists(Target::new("definition", "d")));
        assert_eq!(s.message(), "definition \"d\" already exists");
    }
}
