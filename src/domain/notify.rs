//! Failure notifications: the rules (when to post, where), the webhook's
//! body and signature, the sealing of each rule's signing secret, and the
//! delivery backoff. Pure; the outbox lives in `db::notifications`, the
//! delivery in `executor::notify` (docs/semantics.md, "Failure
//! notifications").
//!
//! # Signature
//! Each request carries `Sked-Signature: t=<unix seconds>,v1=<hex>` where
//! `<hex>` is HMAC-SHA256 over `"<t>.<body>"` (the exact bytes of the body)
//! keyed with the rule's signing secret (the whole `whsec_…` string, as
//! shown), the scheme Stripe uses. A receiver recomputes it, compares in
//! constant time, and refuses a `t` too far from its clock (replays).
//!
//! # Secrets at rest
//! The signing secret is stored sealed with AES-256-GCM under the node key
//! (`SKED_NOTIFY_KEY`, 32 bytes as 64 hex digits or base64): a random
//! 12-byte nonce, then ciphertext and tag. Every node sharing the database
//! needs the same key.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, rand_core::RngCore};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::FieldViolation;

/// Most rules of one definition, or of one binding's override.
pub const MAX_RULES: usize = 5;
/// Longest rule name, in bytes.
pub const MAX_RULE_NAME: usize = 63;
/// Highest `consecutive_failures` of a rule.
pub const MAX_CONSECUTIVE_FAILURES: i32 = 1000;
/// Delivery attempts of one notification before it is `FAILED`.
pub const MAX_DELIVERY_ATTEMPTS: i32 = 8;
/// The signature header.
pub const SIGNATURE_HEADER: &str = "sked-signature";
/// Prefix of generated signing secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// When a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A run failed (FAILED or TIMED_OUT): its final outcome after retries,
    /// or every failed attempt when `every_attempt`.
    Failure,
    /// The binding's final failures in a row reached the rule's count
    /// (once per streak).
    ConsecutiveFailures,
    /// A run succeeded after final failures.
    Recovery,
}

impl Trigger {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Failure => "FAILURE",
            Trigger::ConsecutiveFailures => "CONSECUTIVE_FAILURES",
            Trigger::Recovery => "RECOVERY",
        }
    }
    /// From the stored name.
    pub fn parse(s: &str) -> Option<Trigger> {
        match s {
            "FAILURE" => Some(Trigger::Failure),
            "CONSECUTIVE_FAILURES" => Some(Trigger::ConsecutiveFailures),
            "RECOVERY" => Some(Trigger::Recovery),
            _ => None,
        }
    }
}

/// A rule as given (the secret apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique among the rules of its owner: `[a-z0-9_.-]`, 1 to
    /// [`MAX_RULE_NAME`] bytes.
    pub name: String,
    /// Webhook URL: http(s), at most 2048 bytes, no user info.
    pub url: String,
    /// When it fires.
    pub trigger: Trigger,
    /// [`Trigger::ConsecutiveFailures`]: the count, 2 to
    /// [`MAX_CONSECUTIVE_FAILURES`]; 0 for the others.
    pub consecutive_failures: i32,
    /// [`Trigger::Failure`]: every failed attempt, retried ones too.
    pub every_attempt: bool,
    /// Generate a new signing secret even if the rule exists.
    pub rotate_secret: bool,
}

/// Checks `rules` (field paths under `prefix`, e.g. `rules`).
///
/// # Errors
/// The first violation: too many rules, a bad or repeated name, a bad URL,
/// a count out of range or given for another trigger, `every_attempt` on a
/// trigger other than FAILURE.
pub fn validate_rules(prefix: &str, rules: &[Rule]) -> Result<(), FieldViolation> {
    if rules.len() > MAX_RULES {
        return Err(FieldViolation::new(
            prefix,
            format!("has {} rules; at most {MAX_RULES}", rules.len()),
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        let f = |name: &str| format!("{prefix}[{i}].{name}");
        if r.name.is_empty() || r.name.len() > MAX_RULE_NAME {
            return Err(FieldViolation::new(
                f("name"),
                format!("must be 1 to {MAX_RULE_NAME} bytes"),
            ));
        }
        if !r
            .name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
        {
            return Err(FieldViolation::new(
                f("name"),
                format!("{} may hold only a-z, 0-9, _ . -", super::quote(&r.name)),
            ));
        }
        if rules[..i].iter().any(|o| o.name == r.name) {
            return Err(FieldViolation::new(
                f("name"),
                format!("{} is used by another rule", super::quote(&r.name)),
            ));
        }
        super::http::validate_url(&f("url"), &r.url)?;
        match r.trigger {
            Trigger::ConsecutiveFailures
                if !(2..=MAX_CONSECUTIVE_FAILURES).contains(&r.consecutive_failures) =>
            {
                return Err(FieldViolation::new(
                    f("consecutive_failures"),
                    format!(
                        "is {}; must be 2 to {MAX_CONSECUTIVE_FAILURES} for CONSECUTIVE_FAILURES",
                        r.consecutive_failures
                    ),
                ));
            }
            Trigger::ConsecutiveFailures => {}
            _ if r.consecutive_failures != 0 => {
                return Err(FieldViolation::new(
                    f("consecutive_failures"),
                    "is only for the CONSECUTIVE_FAILURES trigger; leave it 0",
                ));
            }
            _ => {}
        }
        if r.every_attempt && r.trigger != Trigger::Failure {
            return Err(FieldViolation::new(
                f("every_attempt"),
                "is only for the FAILURE trigger",
            ));
        }
    }
    Ok(())
}

/// The node key that seals signing secrets (`SKED_NOTIFY_KEY`).
#[derive(Clone)]
pub struct NotifyKey(Key<Aes256Gcm>);

impl std::fmt::Debug for NotifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyKey(…)")
    }
}

/// Why a sealed secret cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("the signing secret cannot be opened with this node's SKED_NOTIFY_KEY")]
pub struct OpenError;

impl NotifyKey {
    /// Parses 32 bytes given as 64 hex digits or as base64.
    ///
    /// # Errors
    /// A sentence when `s` is neither.
    pub fn parse(s: &str) -> Result<NotifyKey, String> {
        let s = s.trim();
        let bytes = if s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0))
                .collect::<Vec<u8>>()
        } else {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|_| "SKED_NOTIFY_KEY must be 32 bytes as 64 hex digits or base64")?
        };
        Self::from_bytes(&bytes)
    }

    /// From 32 raw bytes.
    ///
    /// # Errors
    /// A sentence when `b` is not 32 bytes long.
    pub fn from_bytes(b: &[u8]) -> Result<NotifyKey, String> {
        if b.len() != 32 {
            return Err(format!("SKED_NOTIFY_KEY must be 32 bytes; got {}", b.len()));
        }
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| "SKED_NOTIFY_KEY must be 32 bytes")?;
        Ok(NotifyKey(Key::<Aes256Gcm>::from(arr)))
    }

    /// `secret` sealed: nonce (12 bytes) || ciphertext || tag.
    pub fn seal(&self, secret: &str) -> Vec<u8> {
        let cipher = Aes256Gcm::new(&self.0);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = nonce.to_vec();
        // Encryption into a Vec cannot fail for inputs this small.
        out.extend(
            cipher
                .encrypt(&nonce, secret.as_bytes())
                .unwrap_or_default(),
        );
        out
    }

    /// The secret `sealed` holds.
    ///
    /// # Errors
    /// [`OpenError`] when sealed under another key or damaged.
    pub fn open(&self, sealed: &[u8]) -> Result<String, OpenError> {
        if sealed.len() < 12 {
            return Err(OpenError);
        }
        let cipher = Aes256Gcm::new(&self.0);
        let nonce: [u8; 12] = sealed[..12].try_into().map_err(|_| OpenError)?;
        let plain = cipher
            .decrypt(&Nonce::from(nonce), &sealed[12..])
            .map_err(|_| OpenError)?;
        String::from_utf8(plain).map_err(|_| OpenError)
    }
}

/// A new signing secret: `whsec_` and 64 hex digits (32 random bytes).
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    format!("{SECRET_PREFIX}{}", hex(&b))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// The `Sked-Signature` value of `body` sent at `t` (unix seconds): see
/// the module docs.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex(&mac(secret, t, body)))
}

fn mac(secret: &str, t: i64, body: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// Whether `header` (a `Sked-Signature` value) signs `body` with `secret`;
/// what a receiver does (constant-time comparison). `t` is not checked
/// against a clock here.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    v1.iter().any(|h| {
        let bytes: Option<Vec<u8>> = (0..h.len() / 2)
            .map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        bytes.is_some_and(|b| {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
            m.update(t.to_string().as_bytes());
            m.update(b".");
            m.update(body);
            m.verify_slice(&b).is_ok()
        })
    })
}

/// Backoff before delivery attempt `attempts + 1` after `attempts` failed:
/// 1 s doubling per attempt, at most 10 min.
pub fn delivery_backoff(attempts: i32) -> std::time::Duration {
    let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(0);
    std::time::Duration::from_secs((1u64 << exp).min(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_body_or_secret_does_not() {
        let s = new_secret();
        assert!(s.starts_with(SECRET_PREFIX) && s.len() == 6 + 64);
        let h = signature(&s, 1_700_000_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1700000000,v1="));
        assert!(verify(&s, &h, b"{\"a\":1}"));
        assert!(!verify(&s, &h, b"{\"a\":2}"));
        assert!(!verify(&new_secret(), &h, b"{\"a\":1}"));
        assert!(!verify(&s, "v1=00", b"{\"a\":1}"));
    }

    #[test]
    fn a_sealed_secret_opens_only_with_its_key() {
        let k = NotifyKey::from_bytes(&[7u8; 32]).unwrap();
        let sealed = k.seal("whsec_x");
        assert_eq!(k.open(&sealed).unwrap(), "whsec_x");
        let other = NotifyKey::parse(&"ab".repeat(32)).unwrap();
        assert!(other.open(&sealed).is_err());
        assert!(NotifyKey::parse("short").is_err());
    }

    #[test]
    fn rules_are_bounded() {
        let rule = |name: &str, trigger, n| Rule {
            name: name.into(),
            url: "https://example.com/hook".into(),
            trigger,
            consecutive_failures: n,
            every_attempt: false,
            rotate_secret: false,
        };
        assert!(validate_rules("rules", &[rule("a", Trigger::Failure, 0)]).is_ok());
        let six: Vec<Rule> = (0..6)
            .map(|i| rule(&format!("r{i}"), Trigger::Recovery, 0))
            .collect();
        assert_eq!(validate_rules("rules", &six).unwrap_err().field, "rules");
        let e = validate_rules("rules", &[rule("a", Trigger::ConsecutiveFailures, 1)]).unwrap_err();
        assert_eq!(e.field, "rules[0].consecutive_failures");
        let e = validate_rules(
            "rules",
            &[
                rule("a", Trigger::Failure, 0),
                rule("a", Trigger::Failure, 0),
            ],
        )
        .unwrap_err();
        assert_eq!(e.field, "rules[1].name");
        let mut bad = rule("a", Trigger::Failure, 0);
        bad.url = "ftp://x".into();
        assert_eq!(
            validate_rules("rules", &[bad]).unwrap_err().field,
            "rules[0].url"
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(delivery_backoff(1).as_secs(), 1);
        assert_eq!(delivery_backoff(2).as_secs(), 2);
        assert_eq!(delivery_backoff(30).as_secs(), 600);
    }
}
