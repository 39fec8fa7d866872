//! Who is calling, and may they (`docs/semantics.md`, "Tenancy").
//!
//! Every call carries `authorization: Bearer <api key>`. The key's id (the
//! public half of the token) finds its row; a revoked, unknown or forged key
//! is `UNAUTHENTICATED`. The secret is checked against the stored Argon2id
//! hash once per key and process, then against an in-memory SHA-256 of it
//! (the row is still read on every call, so a revocation on any node takes
//! effect at once). A role too low for the method is `PERMISSION_DENIED`;
//! which role and scope each method needs is the table of [`super::authz`],
//! whose gate calls the functions here before a request is decoded.
//!
//! Tenant: a tenant key acts for its tenant (an `x-tenant-id` naming another
//! one is `PERMISSION_DENIED`); a platform key names the tenant of a
//! tenant-scoped call with `x-tenant-id`. Isolation itself is in the
//! queries: every tenant-scoped query filters by the tenant resolved here.
//!
//! Auth off ([`Auth::new`] with `required = false`) is the development mode
//! of an embedded database on loopback: every caller is an anonymous
//! platform admin and names the tenant with `x-tenant-id`.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::Status;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use super::{TENANT_HEADER, invalid};
use crate::domain::tenancy::{Origin, parse_token, verify_secret};
use crate::domain::{FieldViolation, Role, validate_tenant_id};
use crate::usecase;

pub use crate::domain::tenancy::Caller;

/// Most verified keys remembered; past it the memory starts over.
const MAX_VERIFIED: usize = 10_000;

/// After a wrong secret for a key, how long further unverified secrets for
/// that key are refused without running Argon2 (bounds the CPU a caller who
/// knows a key id can make the node spend).
pub const FAILED_KEY_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// The authenticator of a node.
#[derive(Debug)]
pub struct Auth {
    required: bool,
    /// Key id → SHA-256 of the secret that passed Argon2 verification.
    verified: Mutex<HashMap<Uuid, [u8; 32]>>,
    /// Key id → when a wrong secret for it was last refused.
    failed: Mutex<HashMap<Uuid, std::time::Instant>>,
    /// Key id → the lock its Argon2 verifications take one at a time (the
    /// first verified secret then answers the others from `verified`).
    verifying: Mutex<HashMap<Uuid, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

fn unauthenticated(why: &str) -> Status {
    Status::unauthenticated(format!(
        "{why}; send `authorization: Bearer <api key>` (create keys with AdminService.CreateApiKey or `sked admin bootstrap-key`)"
    ))
}

impl Auth {
    /// `required = false` only for the development mode (module docs).
    pub fn new(required: bool) -> Auth {
        Auth {
            required,
            verified: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            verifying: Mutex::new(HashMap::new()),
        }
    }

    /// Whether calls must carry a key.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The caller of a request with `metadata`.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` without a valid, unrevoked key; `UNAVAILABLE` when
    /// the database is down.
    pub async fn authenticate(&self, pool: &PgPool, md: &MetadataMap) -> Result<Caller, Status> {
        if !self.required {
            return Ok(Caller::anonymous());
        }
        let header = md
            .get("authorization")
            .ok_or_else(|| unauthenticated("missing API key"))?
            .to_str()
            .map_err(|_| unauthenticated("malformed authorization header"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| unauthenticated("authorization must be `Bearer <api key>`"))?
            .trim();
        let (id, secret) = parse_token(token).ok_or_else(|| unauthenticated("invalid API key"))?;
        let key = match usecase::tenancy::find_api_key(pool, id).await {
            Ok(k) => k,
            Err(usecase::Error::NotFound(_)) => return Err(unauthenticated("invalid API key")),
            Err(e) => return Err(e.into()),
        };
        if key.revoke_time.is_some() {
            return Err(unauthenticated("API key revoked"));
        }
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let known = || {
            self.verified
                .lock()
                .map(|m| m.get(&id) == Some(&digest))
                .unwrap_or(false)
        };
        if !known() {
            // One Argon2 verification at a time per key.
            let lock = self.verifying.lock().map(|mut m| {
                if m.len() >= MAX_VERIFIED {
                    m.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
                }
                std::sync::Arc::clone(m.entry(id).or_default())
            });
            let lock = lock.map_err(|_| unauthenticated("invalid API key"))?;
            let _turn = lock.lock().await;
            if !known() {
                let cooling = self.failed.lock().is_ok_and(|m| {
                    m.get(&id)
                        .is_some_and(|t| t.elapsed() < FAILED_KEY_COOLDOWN)
                });
                if cooling {
                    return Err(unauthenticated(
                        "invalid API key (a wrong secret for this key was refused in the last second; retry later)",
                    ));
                }
                let (secret, hash) = (secret.to_string(), key.secret_hash.clone());
                let ok = tokio::task::spawn_blocking(move || verify_secret(&secret, &hash))
                    .await
                    .unwrap_or(false);
                if !ok {
                    tracing::warn!(key_id = %id, "API key with a wrong secret refused");
                    if let Ok(mut m) = self.failed.lock() {
                        if m.len() >= MAX_VERIFIED {
                            m.retain(|_, t| t.elapsed() < FAILED_KEY_COOLDOWN);
                        }
                        m.insert(id, std::time::Instant::now());
                    }
                    return Err(unauthenticated("invalid API key"));
                }
                if let Ok(mut m) = self.verified.lock() {
                    if m.len() >= MAX_VERIFIED {
                        m.clear();
                    }
                    m.insert(id, digest);
                }
            }
        }
        Ok(Caller {
            key_id: Some(key.id),
            role: key.role,
            tenant: key.tenant_id,
            origin: Origin::Api,
        })
    }
}

/// `PERMISSION_DENIED` unless `caller` has at least `need` for `method`.
///
/// # Errors
/// `PERMISSION_DENIED` naming the role needed.
pub fn require_role(caller: &Caller, need: Role, method: &str) -> Result<(), Status> {
    if caller.role.allows(need) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{method} needs role {} or higher; this key is {}",
            need.as_str(),
            caller.role.as_str()
        )))
    }
}

/// `PERMISSION_DENIED` unless `caller` is a platform key.
///
/// # Errors
/// `PERMISSION_DENIED` for tenant keys.
pub fn require_platform(caller: &Caller, method: &str) -> Result<(), Status> {
    if caller.tenant.is_none() {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{method} needs a platform key; this key belongs to a tenant"
        )))
    }
}

/// The tenant a call with metadata `md` acts for: a tenant key's own (an
/// `x-tenant-id` header, if sent, must name it), or for a platform key the
/// `x-tenant-id` header.
///
/// # Errors
/// `INVALID_ARGUMENT` (field `x-tenant-id`) when a platform key sends none or
/// a malformed one; `PERMISSION_DENIED` when a tenant key names another
/// tenant.
pub fn call_tenant(caller: &Caller, md: &MetadataMap) -> Result<String, Status> {
    if md.get_all(TENANT_HEADER).iter().nth(1).is_some() {
        return Err(invalid(FieldViolation::new(
            TENANT_HEADER,
            "header given more than once; name one tenant",
        )));
    }
    let header = md
        .get(TENANT_HEADER)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| invalid(FieldViolation::new(TENANT_HEADER, "header must be ASCII")))
        })
        .transpose()?;
    match (&caller.tenant, header) {
        (Some(own), None) => Ok(own.clone()),
        (Some(own), Some(h)) if &h == own => Ok(h),
        (Some(_), Some(_)) => Err(Status::permission_denied(format!(
            "this key belongs to another tenant than the {TENANT_HEADER} header names"
        ))),
        (None, None) => Err(invalid(FieldViolation::new(
            TENANT_HEADER,
            "header is required for this call with a platform key",
        ))),
        (None, Some(h)) => {
            validate_tenant_id(TENANT_HEADER, &h).map_err(invalid)?;
            Ok(h)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(tenant: Option<&str>) -> MetadataMap {
        let mut md = MetadataMap::new();
        if let Some(t) = tenant {
            md.insert(TENANT_HEADER, t.parse().unwrap());
        }
        md
    }

    #[test]
    fn tenant_resolution() {
        let tenant_key = Caller {
            key_id: Some(Uuid::nil()),
            role: Role::Operator,
            tenant: Some("acme".into()),
            origin: Origin::Api,
        };
        let platform = Caller {
            tenant: None,
            ..tenant_key.clone()
        };
        assert_eq!(
            call_tenant(&tenant_key, &with_header(None)).unwrap(),
            "acme"
        );
        assert_eq!(
            call_tenant(&tenant_key, &with_header(Some("acme"))).unwrap(),
            "acme"
        );
        assert_eq!(
            call_tenant(&tenant_key, &with_header(Some("other")))
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call_tenant(&platform, &with_header(None))
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            call_tenant(&platform, &with_header(Some("beta"))).unwrap(),
            "beta"
        );
    }

    #[test]
    fn roles_include_lower_ones() {
        let op = Caller {
            key_id: None,
            role: Role::Operator,
            tenant: None,
            origin: Origin::Api,
        };
        assert!(require_role(&op, Role::Viewer, "m").is_ok());
        assert!(require_role(&op, Role::Operator, "m").is_ok());
        let e = require_role(&op, Role::Admin, "m").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("admin"));
    }
}
