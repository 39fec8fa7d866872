//! Console sessions: a random cookie token whose SHA-256 is the row key of
//! `console_sessions` (migration `20261206000100`), the key it signed in
//! with, the tenant it acts for and its CSRF token.
//!
//! The database, not the node's memory, holds them: any node of a cluster
//! serves any session and a restart signs nobody out. The token is 256 bits
//! from the OS random source (two UUIDv4, which `uuid` draws from
//! `getrandom`); only its hash is stored, so a copy of the table signs no
//! one in. A session ends after [`IDLE`] without a request, on sign-out,
//! and when its key is revoked (checked on every request).

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// A session unused this long has ended.
pub const IDLE: chrono::TimeDelta = chrono::TimeDelta::hours(12);

/// How stale `seen_time` may get before a request refreshes it (saves a
/// write per page view).
const SEEN_REFRESH: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// One stored session.
#[derive(Debug, Clone)]
pub struct Session {
    /// SHA-256 of the cookie token.
    pub token_hash: Vec<u8>,
    /// The API key signed in with; `None` in development mode without auth.
    pub key_id: Option<Uuid>,
    /// The tenant pages act for (a platform key's or the development
    /// mode's choice; a tenant key's own tenant).
    pub tenant_id: Option<String>,
    /// The CSRF token every form of the session carries.
    pub csrf_token: String,
    /// Last request.
    pub seen_time: DateTime<Utc>,
}

/// A fresh random token: 256 bits, URL-safe base64 without padding.
pub fn random_token() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a cookie token: the stored form.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `a` and `b` are equal, in time independent of where they differ
/// (CSRF tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Stores a new session; returns its cookie token.
///
/// # Errors
/// Database errors.
pub async fn create(
    pool: &PgPool,
    key_id: Option<Uuid>,
    tenant_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<String, sqlx::Error> {
    // Ended sessions go when someone signs in (cheap: indexed).
    sqlx::query("DELETE FROM console_sessions WHERE seen_time < $1")
        .bind(now - IDLE)
        .execute(pool)
        .await?;
    let token = random_token();
    sqlx::query(
        "INSERT INTO console_sessions (token_hash, key_id, tenant_id, csrf_token, create_time, seen_time) \
         VALUES ($1, $2, $3, $4, $5, $5)",
    )
    .bind(hash_token(&token))
    .bind(key_id)
    .bind(tenant_id)
    .bind(random_token())
    .bind(now)
    .execute(pool)
    .await?;
    Ok(token)
}

/// The live session of cookie token `token` (refreshing its idle clock),
/// or `None` when there is none or it ended.
///
/// # Errors
/// Database errors.
pub async fn find(
    pool: &PgPool,
    token: &str,
    now: DateTime<Utc>,
) -> Result<Option<Session>, sqlx::Error> {
    let hash = hash_token(token);
    let row = sqlx::query(
        "SELECT key_id, tenant_id, csrf_token, seen_time FROM console_sessions \
         WHERE token_hash = $1 AND seen_time >= $2",
    )
    .bind(&hash)
    .bind(now - IDLE)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let s = Session {
        token_hash: hash,
        key_id: row.try_get("key_id")?,
        tenant_id: row.try_get("tenant_id")?,
        csrf_token: row.try_get("csrf_token")?,
        seen_time: row.try_get("seen_time")?,
    };
    if now - s.seen_time > SEEN_REFRESH {
        sqlx::query("UPDATE console_sessions SET seen_time = $2 WHERE token_hash = $1")
            .bind(&s.token_hash)
            .bind(now)
            .execute(pool)
            .await?;
    }
    Ok(Some(s))
}

/// Sets the tenant a session acts for.
///
/// # Errors
/// Database errors.
pub async fn set_tenant(pool: &PgPool, s: &Session, tenant: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE console_sessions SET tenant_id = $2 WHERE token_hash = $1")
        .bind(&s.token_hash)
        .bind(tenant)
        .execute(pool)
        .await?;
    Ok(())
}

/// Ends a session.
///
/// # Errors
/// Database errors.
pub async fn delete(pool: &PgPool, token_hash: &[u8]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
        .bind(token_hash)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_token(&a).len(), 32);
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
