//! Failure notifications (migration `20261204000200_notifications.sql`):
//! the rules of definitions and bindings (`notify_rules`,
//! `notify_overrides`) and the outbox (`notifications`). Rows of the outbox
//! are written by triggers in the transaction that ends a run; delivery
//! claims them with `FOR UPDATE SKIP LOCKED` and a lease, and every state
//! change is conditional on the claim (node and attempts), so a node whose
//! lease lapsed never overwrites the outcome of the one that took over.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::Error;

/// Whose rules.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'a> {
    /// A definition's (inherited by its bindings).
    Definition(&'a str),
    /// One binding's override, of `tenant`.
    Binding {
        /// The binding's tenant.
        tenant: &'a str,
        /// The binding.
        id: Uuid,
    },
}

/// A stored rule.
#[derive(Debug, Clone)]
pub struct StoredRule {
    /// Rule id.
    pub id: Uuid,
    /// Name, unique within its owner.
    pub name: String,
    /// Webhook URL.
    pub url: String,
    /// `FAILURE` | `CONSECUTIVE_FAILURES` | `RECOVERY`.
    pub trigger: String,
    /// Count of a `CONSECUTIVE_FAILURES` rule.
    pub consecutive_failures: i32,
    /// Every failed attempt (`FAILURE`).
    pub every_attempt: bool,
    /// The sealed signing secret.
    pub secret: Vec<u8>,
    /// When the rule (its secret) was created.
    pub create_time: DateTime<Utc>,
}

/// A rule to write: the rule, and its sealed secret.
#[derive(Debug, Clone)]
pub struct NewRule {
    /// Name.
    pub name: String,
    /// Webhook URL.
    pub url: String,
    /// Stored trigger name.
    pub trigger: &'static str,
    /// Count of a `CONSECUTIVE_FAILURES` rule, else 0.
    pub consecutive_failures: i32,
    /// Every failed attempt.
    pub every_attempt: bool,
    /// The sealed signing secret.
    pub secret: Vec<u8>,
    /// Creation time (kept when the secret is kept).
    pub create_time: DateTime<Utc>,
}

/// Locks the owner (the definition row, or the tenant's binding row) and
/// returns the binding's definition (or the definition's name).
///
/// # Errors
/// [`Error::NotFound`] when it does not exist (or is another tenant's
/// binding); [`Error::Sqlx`] otherwise.
pub async fn owner_lock(conn: &mut PgConnection, owner: Owner<'_>) -> Result<String, Error> {
    Ok(match owner {
        Owner::Definition(name) => {
            sqlx::query_scalar!(
                "SELECT name FROM definitions WHERE name = $1 FOR UPDATE",
                name
            )
            .fetch_one(&mut *conn)
            .await?
        }
        Owner::Binding { tenant, id } => {
            sqlx::query_scalar!(
                "SELECT definition FROM bindings WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
                id,
                tenant
            )
            .fetch_one(&mut *conn)
            .await?
        }
    })
}

/// The owner's own rules, in order (a binding's override rules, not its
/// definition's).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn rules_of(db: impl PgExecutor<'_>, owner: Owner<'_>) -> Result<Vec<StoredRule>, Error> {
    let (def, binding) = match owner {
        Owner::Definition(d) => (Some(d), None),
        Owner::Binding { id, .. } => (None, Some(id)),
    };
    Ok(sqlx::query_as!(
        StoredRule,
        "SELECT id, name, url, trigger, consecutive_failures, every_attempt, secret, create_time
         FROM notify_rules
         WHERE ($1::text IS NOT NULL AND definition = $1 AND binding_id IS NULL)
            OR ($2::uuid IS NOT NULL AND binding_id = $2)
         ORDER BY position",
        def,
        binding
    )
    .fetch_all(db)
    .await?)
}

/// The rules in force for each of the tenant's bindings `ids`: per
/// binding, whether it overrides its definition's rules, and the rules in
/// force in order (the binding's own, else the definition's), without
/// their sealed secrets (`secret` empty). Ids of other tenants' bindings,
/// or of none, are absent from the result.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn effective_rules_of(
    db: impl PgExecutor<'_>,
    tenant: &str,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, bool, Option<StoredRule>)>, Error> {
    let rows = sqlx::query!(
        r#"SELECT b.id AS "binding_id!", (o.binding_id IS NOT NULL) AS "overrides!",
                  r.id AS "rule_id?", r.name AS "name?", r.url AS "url?",
                  r.trigger AS "trigger?", r.consecutive_failures AS "consecutive_failures?",
                  r.every_attempt AS "every_attempt?", r.create_time AS "create_time?"
           FROM bindings b
           LEFT JOIN notify_overrides o ON o.binding_id = b.id
           LEFT JOIN notify_rules r
                  ON (o.binding_id IS NOT NULL AND r.binding_id = b.id)
                  OR (o.binding_id IS NULL AND r.binding_id IS NULL AND r.definition = b.definition)
           WHERE b.tenant_id = $1 AND b.id = ANY($2)
           ORDER BY b.id, r.position"#,
        tenant,
        ids
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let rule = match (r.rule_id, r.name, r.url, r.trigger, r.create_time) {
                (Some(id), Some(name), Some(url), Some(trigger), Some(create_time)) => {
                    Some(StoredRule {
                        id,
                        name,
                        url,
                        trigger,
                        consecutive_failures: r.consecutive_failures.unwrap_or(0),
                        every_attempt: r.every_attempt.unwrap_or(false),
                        secret: Vec::new(),
                        create_time,
                    })
                }
                _ => None,
            };
            (r.binding_id, r.overrides, rule)
        })
        .collect())
}

/// Whether the tenant's binding overrides its definition's rules.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn binding_overrides(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: Uuid,
) -> Result<bool, Error> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM notify_overrides WHERE binding_id = $1 AND tenant_id = $2) AS "e!""#,
        id,
        tenant
    )
    .fetch_one(db)
    .await?)
}

/// Replaces the owner's rules with `rules` (in order). For a binding,
/// `overrides` says whether its rules replace the definition's (false:
/// it inherits, and `rules` must be empty). Call after [`owner_lock`] in
/// the same transaction.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn rules_replace(
    conn: &mut PgConnection,
    owner: Owner<'_>,
    definition: &str,
    rules: &[NewRule],
    overrides: bool,
) -> Result<(), Error> {
    let (tenant, binding) = match owner {
        Owner::Definition(_) => (None, None),
        Owner::Binding { tenant, id } => (Some(tenant), Some(id)),
    };
    sqlx::query!(
        "DELETE FROM notify_rules
         WHERE CASE WHEN $2::uuid IS NULL THEN definition = $1 AND binding_id IS NULL ELSE binding_id = $2 END",
        definition,
        binding
    )
    .execute(&mut *conn)
    .await?;
    let ids: Vec<Uuid> = rules.iter().map(|_| Uuid::now_v7()).collect();
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let urls: Vec<&str> = rules.iter().map(|r| r.url.as_str()).collect();
    let triggers: Vec<&str> = rules.iter().map(|r| r.trigger).collect();
    let counts: Vec<i32> = rules.iter().map(|r| r.consecutive_failures).collect();
    let every: Vec<bool> = rules.iter().map(|r| r.every_attempt).collect();
    let secrets: Vec<Vec<u8>> = rules.iter().map(|r| r.secret.clone()).collect();
    let times: Vec<DateTime<Utc>> = rules.iter().map(|r| r.create_time).collect();
    sqlx::query!(
        "INSERT INTO notify_rules (id, definition, binding_id, tenant_id, position, name, url, trigger,
                                   consecutive_failures, every_attempt, secret, create_time)
         SELECT u.id, $1, $2, $3, u.ord, u.name, u.url, u.trigger, u.n, u.every, u.secret, u.t
         FROM UNNEST($4::uuid[], $5::text[], $6::text[], $7::text[], $8::int[], $9::bool[], $10::bytea[],
                     $11::timestamptz[]) WITH ORDINALITY AS u(id, name, url, trigger, n, every, secret, t, ord)",
        definition,
        binding,
        tenant,
        &ids,
        &names as &[&str],
        &urls as &[&str],
        &triggers as &[&str],
        &counts,
        &every,
        &secrets,
        &times,
    )
    .execute(&mut *conn)
    .await?;
    if let (Some(tenant), Some(id)) = (tenant, binding) {
        if overrides {
            sqlx::query!(
                "INSERT INTO notify_overrides (binding_id, tenant_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                id,
                tenant
            )
            .execute(&mut *conn)
            .await?;
        } else {
            sqlx::query!("DELETE FROM notify_overrides WHERE binding_id = $1", id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// A notification claimed for delivery, with its rule's URL and secret.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Notification id.
    pub id: Uuid,
    /// Delivery attempts so far, this one included.
    pub attempts: i32,
    /// The rule's URL (`None`: the rule was deleted since).
    pub url: Option<String>,
    /// The rule's sealed secret.
    pub secret: Option<Vec<u8>>,
    /// The stored notification.
    pub n: Notification,
}

/// A notification as stored.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Id.
    pub id: Uuid,
    /// Rule name.
    pub rule_name: String,
    /// Tenant.
    pub tenant_id: String,
    /// Binding.
    pub binding_id: Uuid,
    /// Definition.
    pub definition: String,
    /// The run it is about.
    pub run_id: Option<Uuid>,
    /// That run's attempt.
    pub run_attempt: Option<i32>,
    /// That run's state.
    pub run_state: Option<String>,
    /// Its error summary or reason.
    pub reason: Option<String>,
    /// `failure` | `consecutive_failures` | `recovery`.
    pub event: String,
    /// The binding's final failures in a row when it was written.
    pub consecutive_failures: i32,
    /// The run's fire time.
    pub scheduled_time: Option<DateTime<Utc>>,
    /// The run's start.
    pub start_time: Option<DateTime<Utc>>,
    /// The run's end.
    pub end_time: Option<DateTime<Utc>>,
    /// When written.
    pub create_time: DateTime<Utc>,
    /// `PENDING` | `DELIVERED` | `FAILED`.
    pub state: String,
    /// Delivery attempts made.
    pub attempts: i32,
    /// Not before this time (the backoff).
    pub next_attempt_time: DateTime<Utc>,
    /// Last attempt.
    pub last_attempt_time: Option<DateTime<Utc>>,
    /// HTTP status of the last attempt, if one came.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When delivered.
    pub delivered_time: Option<DateTime<Utc>>,
}

/// Claims up to `limit` due `PENDING` notifications for `node_id` until
/// `now + lease` (those whose lease lapsed too), counting the attempt,
/// fairly between tenants: at most `per_tenant` per tenant, less what
/// `in_flight` says this node already has in flight for it (pairs of
/// tenant id and count; a tenant at `per_tenant` gets none). The rows are
/// ranked per tenant, oldest `next_attempt_time` first, and taken round
/// robin: every tenant's first row (after its in-flight ones) before any
/// tenant's second, the older first within a round. Cost: one index probe
/// per tenant with pending rows, plus at most `per_tenant` rows (and the
/// leased ones before them) per tenant, whatever a tenant's backlog.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notification_claim(
    db: impl PgExecutor<'_>,
    node_id: &str,
    now: DateTime<Utc>,
    lease: std::time::Duration,
    limit: i64,
    per_tenant: i64,
    in_flight: &[(String, i64)],
) -> Result<Vec<Claimed>, Error> {
    let until = now + chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::seconds(30));
    let busy_tenants: Vec<String> = in_flight.iter().map(|(t, _)| t.clone()).collect();
    let busy_counts: Vec<i64> = in_flight.iter().map(|(_, n)| *n).collect();
    let rows = sqlx::query!(
        r#"WITH RECURSIVE tenants AS (
               (SELECT tenant_id FROM notifications WHERE state = 'PENDING' ORDER BY tenant_id LIMIT 1)
             UNION ALL
               SELECT (SELECT n.tenant_id FROM notifications n
                       WHERE n.state = 'PENDING' AND n.tenant_id > t.tenant_id
                       ORDER BY n.tenant_id LIMIT 1)
               FROM tenants t WHERE t.tenant_id IS NOT NULL),
           busy AS (
             SELECT b.tenant_id, b.n FROM unnest($5::text[], $6::bigint[]) AS b(tenant_id, n)),
           pick AS (
             SELECT d.id, coalesce(b.n, 0) + d.rank AS slot, d.next_attempt_time
             FROM tenants t
             LEFT JOIN busy b ON b.tenant_id = t.tenant_id
             CROSS JOIN LATERAL (
               SELECT n.id, n.next_attempt_time,
                      row_number() OVER (ORDER BY n.next_attempt_time) AS rank
               FROM notifications n
               WHERE n.tenant_id = t.tenant_id AND n.state = 'PENDING' AND n.next_attempt_time <= $1
                 AND (n.lease_expires_at IS NULL OR n.lease_expires_at < $1)
               ORDER BY n.next_attempt_time
               LIMIT greatest($7 - coalesce(b.n, 0), 0)) d
             WHERE t.tenant_id IS NOT NULL
             ORDER BY slot, d.next_attempt_time
             LIMIT $4),
           c AS (
             SELECT n.id FROM notifications n JOIN pick p ON p.id = n.id
             WHERE n.state = 'PENDING' AND n.next_attempt_time <= $1
               AND (n.lease_expires_at IS NULL OR n.lease_expires_at < $1)
             FOR UPDATE OF n SKIP LOCKED),
           u AS (
             UPDATE notifications n SET attempts = n.attempts + 1, lease_expires_at = $2, node_id = $3,
                                        last_attempt_time = $1
             FROM c WHERE n.id = c.id RETURNING n.*)
           SELECT u.id AS "id!", u.rule_name AS "rule_name!", u.tenant_id AS "tenant_id!",
                  u.binding_id AS "binding_id!", u.definition AS "definition!", u.run_id, u.run_attempt,
                  u.run_state, u.reason, u.event AS "event!", u.consecutive_failures AS "consecutive_failures!",
                  u.scheduled_time, u.start_time, u.end_time, u.create_time AS "create_time!",
                  u.state AS "state!", u.attempts AS "attempts!", u.next_attempt_time AS "next_attempt_time!",
                  u.last_attempt_time, u.last_status, u.last_error, u.delivered_time,
                  r.url AS "url?", r.secret AS "secret?"
           FROM u LEFT JOIN notify_rules r ON r.id = u.rule_id"#,
        now,
        until,
        node_id,
        limit,
        &busy_tenants,
        &busy_counts,
        per_tenant
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Claimed {
            id: r.id,
            attempts: r.attempts,
            url: r.url,
            secret: r.secret,
            n: Notification {
                id: r.id,
                rule_name: r.rule_name,
                tenant_id: r.tenant_id,
                binding_id: r.binding_id,
                definition: r.definition,
                run_id: r.run_id,
                run_attempt: r.run_attempt,
                run_state: r.run_state,
                reason: r.reason,
                event: r.event,
                consecutive_failures: r.consecutive_failures,
                scheduled_time: r.scheduled_time,
                start_time: r.start_time,
                end_time: r.end_time,
                create_time: r.create_time,
                state: r.state,
                attempts: r.attempts,
                next_attempt_time: r.next_attempt_time,
                last_attempt_time: r.last_attempt_time,
                last_status: r.last_status,
                last_error: r.last_error,
                delivered_time: r.delivered_time,
            },
        })
        .collect())
}

/// Records the outcome of attempt `attempts` of notification `id` claimed
/// by `node_id`: `DELIVERED`, `FAILED` (no more attempts), or `PENDING`
/// again from `next`. Returns false, changing nothing, when the claim was
/// lost (the lease lapsed and another node took it).
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
#[allow(clippy::too_many_arguments)]
pub async fn notification_record(
    conn: &mut PgConnection,
    id: Uuid,
    node_id: &str,
    attempts: i32,
    state: &str,
    now: DateTime<Utc>,
    next: DateTime<Utc>,
    status: Option<i32>,
    error: Option<&str>,
) -> Result<bool, Error> {
    let r = sqlx::query!(
        "UPDATE notifications SET state = $4, lease_expires_at = NULL, next_attempt_time = $6,
                last_status = $7, last_error = $8,
                delivered_time = CASE WHEN $4 = 'DELIVERED' THEN $5::timestamptz END
         WHERE id = $1 AND node_id = $2 AND attempts = $3 AND state = 'PENDING'",
        id,
        node_id,
        attempts,
        state,
        now,
        next,
        status,
        error,
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// What [`notification_list`] lists.
#[derive(Debug, Clone, Copy)]
pub enum ListScope {
    /// A binding's.
    Binding(Uuid),
    /// A run's.
    Run(Uuid),
}

/// The tenant's notifications of a binding or run, newest first, at most
/// `limit`.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notification_list(
    db: impl PgExecutor<'_>,
    tenant: &str,
    scope: ListScope,
    limit: i64,
) -> Result<Vec<Notification>, Error> {
    let (binding, run) = match scope {
        ListScope::Binding(b) => (Some(b), None),
        ListScope::Run(r) => (None, Some(r)),
    };
    Ok(sqlx::query_as!(
        Notification,
        "SELECT id, rule_name, tenant_id, binding_id, definition, run_id, run_attempt, run_state, reason, event,
                consecutive_failures, scheduled_time, start_time, end_time, create_time, state, attempts,
                next_attempt_time, last_attempt_time, last_status, last_error, delivered_time
         FROM notifications
         WHERE tenant_id = $1 AND (($2::uuid IS NOT NULL AND binding_id = $2) OR ($3::uuid IS NOT NULL AND run_id = $3))
         ORDER BY create_time DESC, id DESC LIMIT $4",
        tenant,
        binding,
        run,
        limit
    )
    .fetch_all(db)
    .await?)
}

/// The earliest `next_attempt_time` of pending notifications (when to
/// look again), if any.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notification_next_due(
    db: impl PgExecutor<'_>,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(sqlx::query_scalar!(
        "SELECT min(greatest(next_attempt_time, coalesce(lease_expires_at, next_attempt_time)))
         FROM notifications WHERE state = 'PENDING'"
    )
    .fetch_one(db)
    .await?)
}

/// Deletes up to `limit` settled (`DELIVERED` or `FAILED`) notifications
/// written before `before`, oldest first; returns how many. Pending ones
/// stay until they settle.
///
/// # Errors
/// [`Error::Sqlx`] on database failure.
pub async fn notification_delete_old(
    db: impl PgExecutor<'_>,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query!(
        "DELETE FROM notifications WHERE id IN (
           SELECT id FROM notifications WHERE state <> 'PENDING' AND create_time < $1
           ORDER BY create_time LIMIT $2)",
        before,
        limit,
    )
    .execute(db)
    .await?
    .rows_affected())
}
