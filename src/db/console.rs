//! `console_sessions`: the web console's sign-in sessions (hashes of their
//! tokens only; `src/usecase/sessions.rs`).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::Error;

/// One stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// SHA-256 of the cookie token.
    pub token_hash: Vec<u8>,
    /// The API key signed in with; `None` in development mode without auth.
    pub key_id: Option<Uuid>,
    /// The tenant pages act for, when chosen.
    pub tenant_id: Option<String>,
    /// The session's CSRF token.
    pub csrf_token: String,
    /// Last request.
    pub seen_time: DateTime<Utc>,
}

/// Stores a new session seen at `now`.
///
/// # Errors
/// [`Error::Sqlx`]; [`Error::Duplicate`] for a token hash already stored.
pub async fn session_insert(
    db: impl PgExecutor<'_>,
    s: &SessionRow,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    sqlx::query!(
        "INSERT INTO console_sessions (token_hash, key_id, tenant_id, csrf_token, create_time, seen_time)
         VALUES ($1, $2, $3, $4, $5, $5)",
        &s.token_hash,
        s.key_id,
        s.tenant_id.as_deref(),
        &s.csrf_token,
        now,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The session of `token_hash` if it was seen at or after `seen_after`.
///
/// # Errors
/// [`Error::Sqlx`].
pub async fn session_get(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    seen_after: DateTime<Utc>,
) -> Result<Option<SessionRow>, Error> {
    Ok(sqlx::query_as!(
        SessionRow,
        "SELECT token_hash, key_id, tenant_id, csrf_token, seen_time FROM console_sessions
         WHERE token_hash = $1 AND seen_time >= $2",
        token_hash,
        seen_after,
    )
    .fetch_optional(db)
    .await?)
}

/// Marks the session seen at `now`.
///
/// # Errors
/// [`Error::Sqlx`].
pub async fn session_touch(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    sqlx::query!(
        "UPDATE console_sessions SET seen_time = $2 WHERE token_hash = $1",
        token_hash,
        now,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Sets the tenant the session acts for.
///
/// # Errors
/// [`Error::Sqlx`].
pub async fn session_set_tenant(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
    tenant: &str,
) -> Result<(), Error> {
    sqlx::query!(
        "UPDATE console_sessions SET tenant_id = $2 WHERE token_hash = $1",
        token_hash,
        tenant,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Deletes the session.
///
/// # Errors
/// [`Error::Sqlx`].
pub async fn session_delete(db: impl PgExecutor<'_>, token_hash: &[u8]) -> Result<(), Error> {
    sqlx::query!(
        "DELETE FROM console_sessions WHERE token_hash = $1",
        token_hash
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Deletes the sessions last seen before `before`; how many.
///
/// # Errors
/// [`Error::Sqlx`].
pub async fn session_delete_idle(
    db: impl PgExecutor<'_>,
    before: DateTime<Utc>,
) -> Result<u64, Error> {
    Ok(
        sqlx::query!("DELETE FROM console_sessions WHERE seen_time < $1", before)
            .execute(db)
            .await?
            .rows_affected(),
    )
}
