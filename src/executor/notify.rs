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
    /// Most notifications claimed (and posted concurrently) at once.
    pub batch: i64,
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
    /// Delivers until `stop`: claims a batch, posts it, looks again at once
    /// when the batch was full, else after `poll`.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let now = self.clock.now();
            let claimed = match db::notifications::notification_claim(
                &self.pool,
                &self.node_id,
                now,
                self.lease,
                self.batch,
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "notifications: claim failed");
                    Vec::new()
                }
            };
            let full = claimed.len() as i64 >= self.batch;
            let mut posts = JoinSet::new();
            for c in claimed {
                posts.spawn(self.clone().deliver(c));
            }
            while posts.join_next().await.is_some() {}
            if !full {
                tokio::select! {
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = stop.cancelled() => return,
                }
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
