//! Web console sessions (`src/console`, docs/console.md): a random cookie
//! token whose SHA-256 is the row key of `console_sessions` (migration
//! `20261206000100`), the key it signed in with, the tenant it acts for and
//! its CSRF token.
//!
//! The database, not the node's memory, holds them: any node of a cluster
//! serves any session and a restart signs nobody out. The token is 256 bits
//! from the OS random source (two UUIDv4, which `uuid` draws from
//! `getrandom`); only its hash is stored, so a copy of the table signs no
//! one in. A session ends after [`IDLE`] without a request, on sign-out,
//! and when its key is revoked (the console checks the key on every
//! request).

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{Core, Error, Result, Target};
use crate::db;
use crate::db::console::SessionRow;

/// A session unused this long has ended.
pub const IDLE: chrono::TimeDelta = chrono::TimeDelta::hours(12);

/// How stale `seen_time` may get before a request refreshes it (saves a
/// write per page view).
const SEEN_REFRESH: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// One stored session.
pub type Session = SessionRow;

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

fn target() -> Target {
    Target::all("console session")
}

/// Stores a new session for `key_id` (`None`: development mode) acting for
/// `tenant_id`; returns its cookie token. Sessions idle past [`IDLE`] are
/// deleted on the way.
///
/// # Errors
/// Database errors.
pub async fn create(core: &Core, key_id: Option<Uuid>, tenant_id: Option<&str>) -> Result<String> {
    let now = core.clock.now();
    let target = target();
    let on = Error::on(&target);
    db::console::session_delete_idle(&core.pool, now - IDLE)
        .await
        .map_err(&on)?;
    let token = random_token();
    let row = SessionRow {
        token_hash: hash_token(&token),
        key_id,
        tenant_id: tenant_id.map(str::to_string),
        csrf_token: random_token(),
        seen_time: now,
    };
    db::console::session_insert(&core.pool, &row, now)
        .await
        .map_err(&on)?;
    Ok(token)
}

/// The live session of cookie token `token` (refreshing its idle clock),
/// or `None` when there is none or it ended.
///
/// # Errors
/// Database errors.
pub async fn find(core: &Core, token: &str) -> Result<Option<Session>> {
    let now = core.clock.now();
    let target = target();
    let on = Error::on(&target);
    let hash = hash_token(token);
    let Some(s) = db::console::session_get(&core.pool, &hash, now - IDLE)
        .await
        .map_err(&on)?
    else {
        return Ok(None);
    };
    if now - s.seen_time > SEEN_REFRESH {
        db::console::session_touch(&core.pool, &hash, now)
            .await
            .map_err(&on)?;
    }
    Ok(Some(s))
}

/// Sets the tenant session `s` acts for.
///
/// # Errors
/// Database errors.
pub async fn set_tenant(core: &Core, s: &Session, tenant: &str) -> Result<()> {
    db::console::session_set_tenant(&core.pool, &s.token_hash, tenant)
        .await
        .map_err(Error::on(&target()))
}

/// Ends the session whose token hashes to `token_hash`.
///
/// # Errors
/// Database errors.
pub async fn end(core: &Core, token_hash: &[u8]) -> Result<()> {
    db::console::session_delete(&core.pool, token_hash)
        .await
        .map_err(Error::on(&target()))
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
