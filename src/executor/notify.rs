//! Delivery of failure notifications (docs/semantics.md, "Failure
//! notifications"): the outbox `notifications` is filled by triggers in the
//! transaction that ends a run (migration `20261204000200`); every node
//! with a notify key runs a [`Notifier`] that claims due rows (`FOR UPDATE
//! SKIP LOCKED`, a lease, the attempt counted), posts each signed webhook
//! through the HTTP handler's client and SSRF guard, and records the
//! outcome under its claim.
//!
//! **Failure handling.** A 2xx answer marks the row `DELIVERED` (with a
//! `notification_delivered` run event) in one transaction, conditional on
//! the claim: recorded once even if two nodes posted it. A non-2xx answer,
//! a refused address, a connection error or no answer within the timeout
//! puts it back `PENDING` after a backoff ([`delivery_backoff`]); after
//! [`MAX_DELIVERY_ATTEMPTS`] it is `FAILED` (with a `notification_failed`
//! run event). A node that dies mid-post leaves its lease to lapse: another
//! node posts again, so delivery is at least once and receivers
//! de-duplicate on the body's `id`.
//!
//! **Fairness between tenants.** A tenant's receiver that accepts and never
//! answers costs each post the whole `timeout` (10 s), and a tenant may
//! have many notifications due. So a node keeps up to `batch` (32) posts in
//! flight, at most `per_tenant` ([`PER_TENANT_IN_FLIGHT`], 4) of one
//! tenant's: the claim ranks due rows per tenant and takes them round robin
//! (every tenant with due work gets a slot before any gets a second),
//! skipping the tenants that already have their share in flight here; and
//! a slot is refilled (claimed again) as soon as its post ends, not when
//! the whole batch has. One tenant's hanging posts hold at most
//! `per_tenant` slots, and the other tenants' notifications go out at
//! once. Across nodes a tenant may have `per_tenant` in flight per node.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::http::HttpClient;
use crate::db;
use crate::db::notifications::Claimed;
use crate::domain::notify::{
    MAX_DELIVERY_ATTEMPTS, NotifyKey, SIGNATURE_HEADER, delivery_backoff, signature,
};
use crate::domain::{Clock, EventBody, NotificationOutcome};
use crate::events::EventBus;

/// Most posts in flight per tenant on one node, by default.
pub const PER_TENANT_IN_FLIGHT: i64 = 4;

/// Longest error kept per attempt, in bytes.
const MAX_ERROR: usize = 512;
/// Longest run reason sent in a body, in bytes.
const MAX_REASON: usize = 1024;

/// The delivery loop of one node.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Database.
    pub pool: PgPool,
    /// Source of now.
    pub clock: Clock,
    /// This node's id (the claim's owner).
    pub node_id: String,
    /// Where the delivery run events are published.
    pub bus: EventBus,
    /// The HTTP handler's client (SSRF guard included).
    pub http: HttpClient,
    /// Opens the rules' signing secrets.
    pub key: NotifyKey,
    /// How often the outbox is looked at when idle.
    pub poll: Duration,
    /// Claim lease: another node may post again after it lapses.
    pub lease: Duration,
    /// Longest wait for one answer.
    pub timeout: Duration,
    /// Most posts in flight at once on this node (and most claimed by one
    /// claim).
    pub batch: i64,
    /// Most posts in flight at once for one tenant on this node
    /// ([`PER_TENANT_IN_FLIGHT`] by default): a tenant whose receiver hangs
    /// holds at most this many of the `batch` slots.
    pub per_tenant: i64,
}

/// Frees the slot of a post that ended (or panicked: its claim's lease
/// lapses and it is posted again).
fn ended_post(
    ended: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    tenant_of: &mut HashMap<tokio::task::Id, String>,
    in_flight: &mut HashMap<String, i64>,
) {
    let id = match ended {
        Ok((id, ())) => id,
        Err(e) => {
            tracing::error!(error = %e, "notifications: a delivery task failed");
            e.id()
        }
    };
    if let Some(tenant) = tenant_of.remove(&id)
        && let Some(n) = in_flight.get_mut(&tenant)
    {
        *n -= 1;
        if *n <= 0 {
            in_flight.remove(&tenant);
        }
    }
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

fn rfc3339(t: Option<DateTime<Utc>>) -> serde_json::Value {
    t.filter(|t| t.timestamp().abs() < 253_402_300_799)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true).into())
        .unwrap_or(serde_json::Value::Null)
}

/// The webhook's body (field names as NotificationService documents).
pub fn body(n: &db::notifications::Notification) -> serde_json::Value {
    serde_json::json!({
        "id": n.id,
        "event": n.event,
        "rule": n.rule_name,
        "tenant_id": n.tenant_id,
        "binding_id": n.binding_id,
        "definition": n.definition,
        "run_id": n.run_id,
        "attempt": n.run_attempt,
        "state": n.run_state,
        "reason": n.reason.clone().map(|r| cut(r, MAX_REASON)),
        "consecutive_failures": n.consecutive_failures,
        "scheduled_time": rfc3339(n.scheduled_time),
        "start_time": rfc3339(n.start_time),
        "end_time": rfc3339(n.end_time),
        "create_time": rfc3339(Some(n.create_time)),
    })
}

impl Notifier {
    /// Delivers until `stop`, keeping up to `batch` posts in flight: claims
    /// as many as there are free slots, at most `per_tenant` in flight per
    /// tenant, and claims again as soon as a post ends (its slot and its
    /// tenant's share free) and every `poll`, so a post that hangs for its
    /// whole `timeout` holds one slot, not the loop. At `stop` it claims no
    /// more and waits for the posts in flight (each ends within `timeout`),
    /// so their outcomes are recorded.
    pub async fn run(self, stop: CancellationToken) {
        let mut posts = JoinSet::new();
        // Per post in flight, its tenant; per tenant, its posts in flight.
        let mut tenant_of: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut in_flight: HashMap<String, i64> = HashMap::new();
        loop {
            let free = self.batch - posts.len() as i64;
            if free > 0 {
                for c in self.claim(free, &in_flight).await {
                    let tenant = c.n.tenant_id.clone();
                    *in_flight.entry(tenant.clone()).or_default() += 1;
                    let post = posts.spawn(self.clone().deliver(c));
                    tenant_of.insert(post.id(), tenant);
                }
            }
            tokio::select! {
                Some(ended) = posts.join_next_with_id(), if !posts.is_empty() => {
                    ended_post(ended, &mut tenant_of, &mut in_flight);
                    // Those that ended meanwhile too: one claim for all.
                    while let Some(ended) = posts.try_join_next_with_id() {
                        ended_post(ended, &mut tenant_of, &mut in_flight);
                    }
                }
                _ = tokio::time::sleep(self.poll) => {}
                _ = stop.cancelled() => break,
            }
        }
        while let Some(ended) = posts.join_next_with_id().await {
            ended_post(ended, &mut tenant_of, &mut in_flight);
        }
    }

    /// Claims up to `limit` due notifications, fairly between tenants (see
    /// [`db::notifications::notification_claim`]); none on a database
    /// error (logged: the next poll tries again).
    async fn claim(&self, limit: i64, in_flight: &HashMap<String, i64>) -> Vec<Claimed> {
        let busy: Vec<(String, i64)> = in_flight.iter().map(|(t, n)| (t.clone(), *n)).collect();
        match db::notifications::notification_claim(
            &self.pool,
            &self.node_id,
            self.clock.now(),
            self.lease,
            limit,
            self.per_tenant,
            &busy,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "notifications: claim failed");
                Vec::new()
            }
        }
    }

    /// Posts one claimed notification and records the outcome.
    async fn deliver(self, c: Claimed) {
        let now = self.clock.now();
        let (status, error) = match (&c.url, &c.secret) {
            (Some(url), Some(sealed)) => match self.key.open(sealed) {
                Ok(secret) => self.post(url, &secret, &c, now).await,
                Err(e) => (None, Some(e.to_string())),
            },
            _ => (None, Some("the rule was deleted".to_string())),
        };
        let delivered = error.is_none();
        let gone = c.url.is_none();
        let state = if delivered {
            "DELIVERED"
        } else if gone || c.attempts >= MAX_DELIVERY_ATTEMPTS {
            "FAILED"
        } else {
            "PENDING"
        };
        let next =
            now + chrono::TimeDelta::from_std(delivery_backoff(c.attempts)).unwrap_or_default();
        let error = error.map(|e| cut(e, MAX_ERROR));
        if let Err(e) = self
            .record(&c, state, now, next, status, error.clone())
            .await
        {
            tracing::warn!(notification = %c.id, error = %e, "notifications: recording the outcome failed");
        }
        match &error {
            None => {
                tracing::info!(notification = %c.id, rule = %c.n.rule_name, attempts = c.attempts, "notification delivered")
            }
            Some(e) => {
                tracing::warn!(notification = %c.id, rule = %c.n.rule_name, attempts = c.attempts, state, error = %e, "notification not delivered")
            }
        }
    }

    /// One attempt: `(status, error)`, error `None` on a 2xx answer.
    async fn post(
        &self,
        url: &str,
        secret: &str,
        c: &Claimed,
        now: DateTime<Utc>,
    ) -> (Option<i32>, Option<String>) {
        let payload = serde_json::to_vec(&body(&c.n)).unwrap_or_default();
        let mut headers = HeaderMap::new();
        let sig = signature(secret, now.timestamp(), &payload);
        if let Ok(mut v) = HeaderValue::from_str(&sig) {
            v.set_sensitive(true);
            headers.insert(HeaderName::from_static(SIGNATURE_HEADER), v);
        }
        if let Ok(v) = HeaderValue::from_str(&c.id.to_string()) {
            headers.insert(HeaderName::from_static("sked-notification-id"), v);
        }
        match self
            .http
            .post_webhook(url, headers, payload, self.timeout)
            .await
        {
            Ok(s) if s.is_success() => (Some(i32::from(s.as_u16())), None),
            Ok(s) => (Some(i32::from(s.as_u16())), Some(format!("HTTP {s}"))),
            Err(e) => (None, Some(e)),
        }
    }

    async fn record(
        &self,
        c: &Claimed,
        state: &str,
        now: DateTime<Utc>,
        next: DateTime<Utc>,
        status: Option<i32>,
        error: Option<String>,
    ) -> Result<(), db::Error> {
        let mut tx = self.pool.begin().await?;
        let recorded = db::notifications::notification_record(
            &mut tx,
            c.id,
            &self.node_id,
            c.attempts,
            state,
            now,
            next,
            status,
            error.as_deref(),
        )
        .await?;
        let mut events = Vec::new();
        if recorded
            && state != "PENDING"
            && let Some(run_id) = c.n.run_id
        {
            let outcome = NotificationOutcome {
                notification_id: c.id,
                rule: c.n.rule_name.clone(),
                event: c.n.event.clone(),
                attempts: c.attempts,
                status_code: status.unwrap_or(0),
                error: error.unwrap_or_default(),
            };
            let body = if state == "DELIVERED" {
                EventBody::NotificationDelivered(outcome)
            } else {
                EventBody::NotificationFailed(outcome)
            };
            // The run may be gone (retention): the delivery is recorded
            // all the same.
            match db::events::event_append(&mut tx, &self.node_id, run_id, &[body], now).await {
                Ok(e) => events = e,
                Err(db::Error::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        if !events.is_empty() {
            self.bus.publish(events);
        }
        Ok(())
    }
}
