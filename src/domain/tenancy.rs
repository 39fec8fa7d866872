//! Tenancy rules (`docs/semantics.md`, "Tenancy"): roles, API keys, quotas and the
//! hourly budget, usage verdicts, audit events.
//!
//! # API keys
//! A key is the token `sked_<id>_<secret>`: `id` is the key's UUID in 32 hex
//! digits (public, the lookup key), `secret` 32 bytes from the operating
//! system's CSPRNG in 64 hex digits. Only an Argon2id hash of the secret is
//! stored (PHC string, RustCrypto `argon2` with its default parameters, the
//! OWASP-recommended m=19 MiB, t=2, p=1); the token is shown once, when the
//! key is created.

use std::collections::HashMap;

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::FieldViolation;

/// What a key may do. Each of viewer, operator and admin includes the
/// ones below it; [`Role::Worker`] stands apart (ordered lowest, so it
/// passes no viewer check): it may call only WorkerService, which admin keys
/// may call too (see [`Role::allows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Only WorkerService: take runs of worker handlers and report on them.
    Worker,
    /// Read: get, list, tail, watch.
    Viewer,
    /// Viewer + bindings and runs: create/update/delete/pause bindings,
    /// trigger/cancel/retry/backfill runs.
    Operator,
    /// Operator + definitions, quotas, API keys and the audit log.
    Admin,
}

impl Role {
    /// Whether a key of this role may call a method needing `need`: for
    /// [`Role::Worker`] methods only worker and admin keys, otherwise this
    /// role or a higher one (a worker key passes no other method).
    pub fn allows(self, need: Role) -> bool {
        match need {
            Role::Worker => matches!(self, Role::Worker | Role::Admin),
            _ => self != Role::Worker && self >= need,
        }
    }

    /// Lower-case name: `worker`, `viewer`, `operator`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses [`Role::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "worker" => Some(Role::Worker),
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A stored API key (never its secret).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    /// Key id: the public part of the token.
    pub id: Uuid,
    /// For people, e.g. "ci deploys".
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Its tenant; `None` for a platform key (names the tenant per call with
    /// `x-tenant-id`).
    pub tenant_id: Option<String>,
    /// Argon2id PHC string of the secret.
    pub secret_hash: String,
    /// When it was created.
    pub create_time: DateTime<Utc>,
    /// The key that created it; `None` for the CLI or the no-auth mode.
    pub created_by: Option<Uuid>,
    /// When it was revoked; a revoked key never authenticates again.
    pub revoke_time: Option<DateTime<Utc>>,
}

/// Prefix of every token.
pub const TOKEN_PREFIX: &str = "sked_";

/// A freshly generated key: its id, the token to hand out once, and the hash
/// to store.
#[derive(Debug)]
pub struct NewSecret {
    /// Key id.
    pub id: Uuid,
    /// `sked_<id>_<secret>`: shown to the creator once, stored nowhere.
    pub token: String,
    /// Argon2id PHC string of the secret.
    pub secret_hash: String,
}

/// Errors of key hashing.
#[derive(Debug, thiserror::Error)]
#[error("hashing the key secret failed: {0}")]
pub struct HashError(String);

/// Generates key `id` (a UUIDv7 from the node's clock) with a 256-bit
/// secret from the OS CSPRNG, hashed with Argon2id (CPU-heavy: tens of
/// milliseconds; call off the async executor).
///
/// # Errors
/// [`HashError`] if Argon2 refuses (it does not with default parameters).
pub fn generate_key(id: Uuid) -> Result<NewSecret, HashError> {
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    let secret_hex = hex(&secret);
    let salt = SaltString::generate(&mut OsRng);
    let secret_hash = Argon2::default()
        .hash_password(secret_hex.as_bytes(), &salt)
        .map_err(|e| HashError(e.to_string()))?
        .to_string();
    Ok(NewSecret {
        id,
        token: format!("{TOKEN_PREFIX}{}_{secret_hex}", id.simple()),
        secret_hash,
    })
}

/// Splits a token into (key id, secret); `None` when it is not shaped like
/// one (then it cannot be valid, and no lookup is needed).
pub fn parse_token(token: &str) -> Option<(Uuid, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.len() != 64 || !secret.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some((Uuid::try_parse(id).ok()?, secret))
}

/// Whether `secret` matches the stored Argon2 PHC string (constant-time
/// comparison inside `argon2`). CPU-heavy, like [`generate_key`].
pub fn verify_secret(secret: &str, secret_hash: &str) -> bool {
    PasswordHash::new(secret_hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(secret.as_bytes(), &h)
            .is_ok()
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Longest key name, characters.
pub const MAX_KEY_NAME: usize = 200;

/// Limits of one tenant; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Runs of the tenant executing at once; more wait `QUEUED`.
    pub max_concurrent_runs: Option<u32>,
    /// Runs started (first attempts created) per rolling hour; scheduled
    /// fires beyond it are `SKIPPED` with reason [`RunReason::Quota`](super::RunReason::Quota), manual
    /// triggers and backfills are refused with `RESOURCE_EXHAUSTED`.
    pub max_runs_per_hour: Option<u32>,
    /// Bindings the tenant may have; CreateBinding beyond it is
    /// `RESOURCE_EXHAUSTED`.
    pub max_bindings: Option<u32>,
}

/// Largest value of any quota field.
pub const MAX_QUOTA: u32 = 1_000_000_000;

impl Quota {
    /// Checks every set limit is 1..=[`MAX_QUOTA`] (0 would silently stop a
    /// tenant; disabling belongs to bindings).
    ///
    /// # Errors
    /// A violation naming `<prefix>.<field>`.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldViolation> {
        for (name, v) in [
            ("max_concurrent_runs", self.max_concurrent_runs),
            ("max_runs_per_hour", self.max_runs_per_hour),
            ("max_bindings", self.max_bindings),
        ] {
            if let Some(v) = v
                && !(1..=MAX_QUOTA).contains(&v)
            {
                return Err(FieldViolation::new(
                    format!("{prefix}.{name}"),
                    format!("{v} is out of range 1-{MAX_QUOTA} (leave it unset for no limit)"),
                ));
            }
        }
        Ok(())
    }
}

/// How many of `wanted` new runs per tenant fit in the hourly budget:
/// `remaining[tenant]` is what is left of it (tenants without a budget are
/// absent and get all they want). Fires are granted in the order given, so
/// the earliest fire times of a pass win. Returns, per input position,
/// whether that run fits; `remaining` is decremented.
pub fn apply_hourly_budget<'a>(
    tenants: impl IntoIterator<Item = &'a str>,
    remaining: &mut HashMap<String, u64>,
) -> Vec<bool> {
    tenants
        .into_iter()
        .map(|t| match remaining.get_mut(t) {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        })
        .collect()
}

/// Share of a limit at which usage is reported as near the limit.
pub const NEAR_LIMIT_PERCENT: u64 = 80;

/// A tenant's current use of its quota.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    /// The limits.
    pub quota: Quota,
    /// Runs executing now.
    pub running_runs: u64,
    /// Runs waiting to start (`QUEUED`, due).
    pub queued_runs: u64,
    /// Of those, waiting because the tenant is at `max_concurrent_runs`.
    pub throttled_now: u64,
    /// First attempts created in the last hour (what the hourly budget counts).
    pub runs_last_hour: u64,
    /// Runs created in the last hour that had to wait for a concurrency slot.
    pub throttled_last_hour: u64,
    /// Fires skipped with reason `quota` in the last hour.
    pub skipped_last_hour: u64,
    /// Bindings the tenant has.
    pub bindings: u64,
}

/// The health verdict of a tenant's quota usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaHealth {
    /// Well inside every limit.
    Ok,
    /// Some use is at ≥ 80 % of its limit (or bindings at their limit).
    NearLimit,
    /// The quota is holding work back: runs wait for a concurrency slot now,
    /// or fires were skipped for the hourly budget in the last hour, or the
    /// budget is spent.
    Throttled,
}

impl QuotaUsage {
    /// The verdict (see [`QuotaHealth`]).
    pub fn health(&self) -> QuotaHealth {
        let q = &self.quota;
        let budget_spent = q
            .max_runs_per_hour
            .is_some_and(|m| self.runs_last_hour >= u64::from(m));
        if self.throttled_now > 0 || self.skipped_last_hour > 0 || budget_spent {
            return QuotaHealth::Throttled;
        }
        let near = |used: u64, max: Option<u32>| {
            max.is_some_and(|m| used * 100 >= u64::from(m) * NEAR_LIMIT_PERCENT)
        };
        if near(self.running_runs, q.max_concurrent_runs)
            || near(self.runs_last_hour, q.max_runs_per_hour)
            || near(self.bindings, q.max_bindings)
        {
            QuotaHealth::NearLimit
        } else {
            QuotaHealth::Ok
        }
    }
}

/// One audit record of a successful mutating call.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// UUIDv7.
    pub id: Uuid,
    /// When the call committed.
    pub time: DateTime<Utc>,
    /// The caller's key; `None` in no-auth mode or for the CLI.
    pub key_id: Option<Uuid>,
    /// Who, for people: `key <id>`, `cli`, `anonymous` (no-auth mode).
    pub actor: String,
    /// The tenant acted on; `None` for platform objects (definitions, keys
    /// of the platform).
    pub tenant_id: Option<String>,
    /// Full gRPC method, e.g. `sked.v1.BindingService/CreateBinding`.
    pub method: String,
    /// What was acted on: `definition/<name>`, `binding/<id>`, `run/<id>`,
    /// `quota/<tenant>`, `api_key/<id>`.
    pub target: String,
    /// Summary of the object before (`None` when created).
    pub before: Option<serde_json::Value>,
    /// Summary after (`None` when deleted).
    pub after: Option<serde_json::Value>,
}

/// Which tenants may bind a definition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TenantScope {
    /// Every tenant.
    #[default]
    AllTenants,
    /// Only these (sorted, unique, non-empty).
    AllowList(Vec<String>),
}

impl TenantScope {
    /// Whether `tenant` may bind.
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            TenantScope::AllTenants => true,
            TenantScope::AllowList(l) => l.iter().any(|t| t == tenant),
        }
    }

    /// The allow-list, `None` for all tenants (the database column).
    pub fn as_list(&self) -> Option<&[String]> {
        match self {
            TenantScope::AllTenants => None,
            TenantScope::AllowList(l) => Some(l),
        }
    }
}

/// Where a caller acts from: the audit log tells an API call without a key
/// (auth off) from the operator's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// A request to the API, with a key or (auth off) anonymous.
    #[default]
    Api,
    /// The `sked` command line acting on the database directly (e.g.
    /// `sked admin bootstrap-key`); whoever runs it holds the database URL.
    Cli,
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its key; `None` when auth is off, and for the CLI.
    pub key_id: Option<Uuid>,
    /// What it may do.
    pub role: Role,
    /// The key's tenant; `None` for the platform.
    pub tenant: Option<String>,
    /// API or command line.
    pub origin: Origin,
}

impl Caller {
    /// The caller when auth is off: an anonymous platform admin.
    pub fn anonymous() -> Caller {
        Caller {
            key_id: None,
            role: Role::Admin,
            tenant: None,
            origin: Origin::Api,
        }
    }

    /// The `sked` command line: a platform admin without a key (it reaches
    /// the database itself, so no key could limit it).
    pub fn cli() -> Caller {
        Caller {
            origin: Origin::Cli,
            ..Caller::anonymous()
        }
    }

    /// For people and the audit log: `key <id>`, `anonymous` (auth off) or
    /// `cli`.
    pub fn actor(&self) -> String {
        match (self.origin, self.key_id) {
            (Origin::Cli, _) => "cli".to_string(),
            (Origin::Api, Some(id)) => format!("key {id}"),
            (Origin::Api, None) => "anonymous".to_string(),
        }
    }

    /// Builds the audit event `id` (a UUIDv7 from the node's clock) of a
    /// successful mutating call.
    #[allow(clippy::too_many_arguments)]
    pub fn audit(
        &self,
        id: Uuid,
        now: chrono::DateTime<chrono::Utc>,
        tenant: Option<&str>,
        method: &str,
        target: String,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) -> AuditEvent {
        AuditEvent {
            id,
            time: now,
            key_id: self.key_id,
            actor: self.actor(),
            tenant_id: tenant.map(str::to_string),
            method: method.to_string(),
            target,
            before,
            after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_round_trip() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn generated_key_verifies_and_others_do_not() {
        let k = generate_key(Uuid::now_v7()).unwrap();
        let (id, secret) = parse_token(&k.token).unwrap();
        assert_eq!(id, k.id);
        assert!(k.secret_hash.starts_with("$argon2id$"));
        assert!(
            !k.secret_hash.contains(secret),
            "hash must not hold the secret"
        );
        assert!(verify_secret(secret, &k.secret_hash));
        let mut forged = secret.to_string();
        forged.replace_range(0..1, if secret.starts_with('0') { "1" } else { "0" });
        assert!(!verify_secret(&forged, &k.secret_hash));
        assert!(!verify_secret(secret, "not a phc string"));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        for t in [
            "",
            "sked_",
            "Bearer x",
            "sked_0123_abcd",
            &format!("sked_{}_{}", "g".repeat(32), "a".repeat(64)),
            &format!("sked_{}_{}", "a".repeat(32), "z".repeat(64)),
            &format!("key_{}_{}", "a".repeat(32), "a".repeat(64)),
        ] {
            assert!(parse_token(t).is_none(), "{t:?}");
        }
        assert!(parse_token(&format!("sked_{}_{}", "a".repeat(32), "b".repeat(64))).is_some());
    }

    #[test]
    fn hourly_budget_grants_in_order_until_spent() {
        let mut rem = HashMap::from([("a".to_string(), 2u64), ("b".to_string(), 0)]);
        let fits = apply_hourly_budget(["a", "b", "a", "c", "a"], &mut rem);
        assert_eq!(fits, vec![true, false, true, true, false]);
        assert_eq!(rem["a"], 0);
    }

    #[test]
    fn health_verdicts() {
        let quota = Quota {
            max_concurrent_runs: Some(10),
            max_runs_per_hour: Some(100),
            max_bindings: Some(5),
        };
        let base = QuotaUsage {
            quota,
            ..Default::default()
        };
        assert_eq!(base.health(), QuotaHealth::Ok);
        let near = QuotaUsage {
            runs_last_hour: 80,
            ..base.clone()
        };
        assert_eq!(near.health(), QuotaHealth::NearLimit);
        let near_bindings = QuotaUsage {
            bindings: 4,
            ..base.clone()
        };
        assert_eq!(near_bindings.health(), QuotaHealth::NearLimit);
        let spent = QuotaUsage {
            runs_last_hour: 100,
            ..base.clone()
        };
        assert_eq!(spent.health(), QuotaHealth::Throttled);
        let waiting = QuotaUsage {
            throttled_now: 1,
            ..base.clone()
        };
        assert_eq!(waiting.health(), QuotaHealth::Throttled);
        let unlimited = QuotaUsage {
            running_runs: 1000,
            ..Default::default()
        };
        assert_eq!(unlimited.health(), QuotaHealth::Ok);
    }

    #[test]
    fn quota_limits_must_be_positive() {
        let q = Quota {
            max_bindings: Some(0),
            ..Default::default()
        };
        assert_eq!(q.validate("quota").unwrap_err().field, "quota.max_bindings");
        assert!(Quota::default().validate("quota").is_ok());
    }

    #[test]
    fn actors_name_key_anonymous_and_cli() {
        let id = Uuid::nil();
        let key = Caller {
            key_id: Some(id),
            role: Role::Viewer,
            tenant: Some("acme".into()),
            origin: Origin::Api,
        };
        assert_eq!(key.actor(), format!("key {id}"));
        assert_eq!(Caller::anonymous().actor(), "anonymous");
        let cli = Caller::cli();
        assert_eq!(cli.actor(), "cli");
        assert_eq!(
            (cli.key_id, cli.role, cli.tenant.as_deref()),
            (None, Role::Admin, None)
        );
        let e = cli.audit(
            Uuid::now_v7(),
            Utc::now(),
            None,
            "sked admin bootstrap-key",
            "api_key/x".into(),
            None,
            None,
        );
        assert_eq!((e.actor.as_str(), e.key_id), ("cli", None));
    }

    #[test]
    fn scope_allows() {
        assert!(TenantScope::AllTenants.allows("x"));
        let s = TenantScope::AllowList(vec!["a".into()]);
        assert!(s.allows("a") && !s.allows("b"));
    }
}
