//! Who may call which RPC: **one table** ([`RULES`]) and **one gate**
//! ([`AuthzLayer`]) in front of every service of the listener.
//!
//! Each method of each `sked.v1` service has exactly one [`Rule`], keyed by
//! its gRPC path as the generated server routes it
//! (`/sked.v1.RunService/TriggerRun`): the least [`Role`] it needs and its
//! [`Scope`]. A test walks the descriptor set and fails when a method has no
//! rule or a rule names no method.
//!
//! The gate ([`AuthzLayer`], added in `src/app.rs`) runs before the request
//! message is decoded, in this order:
//!
//! 1. **Path.** Health and reflection ([`OPEN_SERVICES`]) pass untouched,
//!    without a key. Any other path without a rule is `UNIMPLEMENTED` —
//!    the gate fails closed: a method added to the proto but not to the
//!    table is never served.
//! 2. **Key** ([`auth::Auth::authenticate`]): `UNAUTHENTICATED`.
//! 3. **Role** ([`auth::require_role`]): `PERMISSION_DENIED` naming the role
//!    needed.
//! 4. **Scope**: a [`Scope::Platform`] method refuses tenant keys
//!    (`PERMISSION_DENIED`); a [`Scope::Tenant`] method resolves the tenant
//!    it acts for ([`auth::call_tenant`]: `INVALID_ARGUMENT` on
//!    `x-tenant-id`, `PERMISSION_DENIED` for a tenant key naming another).
//! 5. **Rate**: a method needing more than [`Role::Viewer`] is a change and
//!    spends one of its tenant's changes ([`limit::RateLimits::write`],
//!    counted for [`limit::rate_key`]): `RESOURCE_EXHAUSTED`.
//!
//! It then puts the [`Grant`] (caller, tenant, method) in the request's
//! extensions. Only after that does the codec decode the message and the
//! input boundary check it (`src/grpc/codec.rs`, `src/grpc/boundary.rs`), so
//! a caller without a valid key, or without the role, learns nothing about
//! its input and costs no decoding. Handlers never authorize: they take the
//! grant with [`grant`] or [`tenant_grant`] (a request that reached a
//! handler without one is `INTERNAL`: the gate was not wired).
//!
//! # Adding an RPC
//!
//! 1. Add it to the proto and implement the handler.
//! 2. Add its row to [`RULES`]: the path, the role, the scope (below). Until
//!    then the test `every_sked_method_has_exactly_one_rule` fails, and the
//!    gate answers the method `UNIMPLEMENTED`.
//! 3. In the handler, `let (g, tenant_id) = authz::tenant_grant(&req)?;` for
//!    a tenant-scoped method, else `let g = authz::grant(&req)?;`. Audit
//!    events name the method with `g.method`.
//!
//! Choosing the scope: a method whose data belongs to one tenant (bindings,
//! runs, their events) is [`Scope::Tenant`]; one only the platform may call
//! (definitions, setting quotas) is [`Scope::Platform`]; one that any key may
//! call and whose handler narrows a tenant key to its own tenant (reading
//! definitions, quotas and usage, keys, the audit log) is [`Scope::Key`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sqlx::PgPool;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use super::auth::{self, Auth, Caller};
use super::{Ctx, limit};
use crate::domain::Role;

/// Whom a method acts for, once its caller is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One tenant's data: a tenant key's own tenant, or the one a platform
    /// key names with `x-tenant-id` ([`auth::call_tenant`]). Every query of
    /// the handler filters by it (another tenant's object is `NOT_FOUND`).
    Tenant,
    /// Platform keys only; a tenant key is `PERMISSION_DENIED` whatever its
    /// role.
    Platform,
    /// Any key. The handler narrows a tenant key to its own tenant (the
    /// definitions in its scope, its quota, its keys, its audit events); a
    /// platform key may name a tenant in the request message.
    Key,
}

/// What one method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The gRPC path, `/sked.v1.<Service>/<Method>`.
    pub path: &'static str,
    /// The least role that may call it. Above [`Role::Viewer`] the call is
    /// a change, counted against its tenant's rate of changes.
    pub role: Role,
    /// Whom it acts for.
    pub scope: Scope,
}

impl Rule {
    /// `sked.v1.<Service>/<Method>`: the name in audit events and in
    /// `PERMISSION_DENIED` messages.
    pub fn method(&self) -> &'static str {
        self.path.strip_prefix('/').unwrap_or(self.path)
    }
}

const fn rule(path: &'static str, role: Role, scope: Scope) -> Rule {
    Rule { path, role, scope }
}

use Role::{Admin, Operator, Viewer, Worker};
use Scope::{Key, Platform, Tenant};

/// Every `sked.v1` method: role and scope (module docs). README's role table
/// ("Tenants, keys and quotas") says the same in words.
pub const RULES: &[Rule] = &[
    // Definitions: published by the platform, read by everyone (a tenant
    // key sees those in its scope).
    rule(
        "/sked.v1.DefinitionService/CreateDefinition",
        Admin,
        Platform,
    ),
    rule("/sked.v1.DefinitionService/GetDefinition", Viewer, Key),
    rule("/sked.v1.DefinitionService/ListDefinitions", Viewer, Key),
    rule(
        "/sked.v1.DefinitionService/UpdateDefinition",
        Admin,
        Platform,
    ),
    rule(
        "/sked.v1.DefinitionService/DeleteDefinition",
        Admin,
        Platform,
    ),
    rule("/sked.v1.DefinitionService/PreviewSchedule", Viewer, Key),
    // Bindings: one tenant's.
    rule("/sked.v1.BindingService/CreateBinding", Operator, Tenant),
    rule("/sked.v1.BindingService/GetBinding", Viewer, Tenant),
    rule("/sked.v1.BindingService/ListBindings", Viewer, Tenant),
    rule("/sked.v1.BindingService/UpdateBinding", Operator, Tenant),
    rule("/sked.v1.BindingService/DeleteBinding", Operator, Tenant),
    rule("/sked.v1.BindingService/PauseBinding", Operator, Tenant),
    rule("/sked.v1.BindingService/ResumeBinding", Operator, Tenant),
    // Runs and their events: one tenant's.
    rule("/sked.v1.RunService/TriggerRun", Operator, Tenant),
    rule("/sked.v1.RunService/CancelRun", Operator, Tenant),
    rule("/sked.v1.RunService/RetryRun", Operator, Tenant),
    rule("/sked.v1.RunService/GetRun", Viewer, Tenant),
    rule("/sked.v1.RunService/ListRuns", Viewer, Tenant),
    rule("/sked.v1.RunService/BackfillRuns", Operator, Tenant),
    // Statistics: of a binding or the tenant, the call's tenant (a tenant
    // key's own, or x-tenant-id for a platform key); of a definition across
    // tenants, platform keys only (checked in the handler).
    rule("/sked.v1.RunService/GetRunStats", Viewer, Key),
    // Notification rules: a definition's are the platform's, a binding's
    // override its tenant's; deliveries are read per tenant.
    rule(
        "/sked.v1.NotificationService/SetDefinitionNotificationRules",
        Admin,
        Platform,
    ),
    rule(
        "/sked.v1.NotificationService/SetBindingNotificationRules",
        Operator,
        Tenant,
    ),
    rule(
        "/sked.v1.NotificationService/GetBindingNotificationRules",
        Viewer,
        Tenant,
    ),
    rule(
        "/sked.v1.NotificationService/ListNotifications",
        Viewer,
        Tenant,
    ),
    rule("/sked.v1.LogService/TailRun", Viewer, Tenant),
    rule("/sked.v1.LogService/WatchEvents", Viewer, Tenant),
    rule("/sked.v1.LogService/ListRunEvents", Viewer, Tenant),
    // Quotas: a tenant key reads its own (tenant_id in the message, else
    // the call's tenant); only the platform sets them.
    rule("/sked.v1.AdminService/GetTenantQuota", Viewer, Key),
    rule("/sked.v1.AdminService/SetTenantQuota", Admin, Platform),
    rule("/sked.v1.AdminService/GetQuotaUsage", Viewer, Key),
    // Keys and the audit log: a tenant admin's are its own tenant's.
    rule("/sked.v1.AdminService/CreateApiKey", Admin, Key),
    rule("/sked.v1.AdminService/RevokeApiKey", Admin, Key),
    rule("/sked.v1.AdminService/ListApiKeys", Admin, Key),
    rule("/sked.v1.AdminService/ListAuditEvents", Admin, Key),
    // The scheduler's status spans every tenant: platform admins only.
    rule("/sked.v1.AdminService/GetSchedulerStatus", Admin, Platform),
    // Workers: worker keys (and admin keys) only. A tenant key's worker
    // gets its own tenant's runs; a platform key's every tenant's, or the
    // one named by `x-tenant-id` (resolved in the use case).
    rule("/sked.v1.WorkerService/Work", Worker, Key),
    rule("/sked.v1.WorkerService/CompleteRun", Worker, Key),
    rule("/sked.v1.WorkerService/FailRun", Worker, Key),
    rule("/sked.v1.WorkerService/Heartbeat", Worker, Key),
    rule("/sked.v1.WorkerService/AppendLogs", Worker, Key),
    rule("/sked.v1.WorkerService/ReportProgress", Worker, Key),
];

/// Services answered without a key (load balancers, `grpcurl list`).
pub const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The rule of the method at `path`.
pub fn find(path: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.path == path)
}

/// Whether `path` is a method of an [`OPEN_SERVICES`] service.
pub fn is_open(path: &str) -> bool {
    OPEN_SERVICES.iter().any(|s| {
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(s))
            .is_some_and(|m| m.starts_with('/'))
    })
}

/// What the gate established for one call; in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who calls.
    pub caller: Caller,
    /// The tenant a [`Scope::Tenant`] call acts for; `None` otherwise.
    pub tenant: Option<String>,
    /// `sked.v1.<Service>/<Method>` ([`Rule::method`]), for audit events.
    pub method: &'static str,
}

fn no_grant() -> Status {
    tracing::error!(
        "a sked.v1 request reached its handler without a grant: the authorization layer is not wired in front of the service"
    );
    Status::internal("the call was not authorized (server misconfigured)")
}

/// The grant of `req` (module docs).
///
/// # Errors
/// `INTERNAL` when the request did not pass the gate.
pub fn grant<T>(req: &Request<T>) -> Result<Grant, Status> {
    req.extensions()
        .get::<Grant>()
        .cloned()
        .ok_or_else(no_grant)
}

/// The grant of a [`Scope::Tenant`] call and the tenant it acts for.
///
/// # Errors
/// `INTERNAL` when the request did not pass the gate, or its rule is not
/// tenant-scoped.
pub fn tenant_grant<T>(req: &Request<T>) -> Result<(Grant, String), Status> {
    let g = grant(req)?;
    let tenant = g.tenant.clone().ok_or_else(no_grant)?;
    Ok((g, tenant))
}

/// The gate's state: what authentication and rates need.
#[derive(Debug, Clone)]
pub struct Gate {
    auth: Arc<Auth>,
    pool: PgPool,
    rates: Arc<limit::RateLimits>,
}

impl Gate {
    /// The gate of a node's services.
    pub fn new(ctx: &Ctx) -> Gate {
        Gate {
            auth: Arc::clone(&ctx.auth),
            pool: ctx.core.pool.clone(),
            rates: Arc::clone(&ctx.rates),
        }
    }

    /// Steps 1-5 of the module docs for a call to `path` with `md`:
    /// `Ok(None)` for an open service, else the grant.
    ///
    /// # Errors
    /// `UNIMPLEMENTED` for a path without a rule; `UNAUTHENTICATED`,
    /// `PERMISSION_DENIED`, `INVALID_ARGUMENT` on `x-tenant-id`,
    /// `RESOURCE_EXHAUSTED` (module docs); `UNAVAILABLE` when the database
    /// is down.
    pub async fn check(&self, path: &str, md: &MetadataMap) -> Result<Option<Grant>, Status> {
        let Some(rule) = find(path) else {
            if is_open(path) {
                return Ok(None);
            }
            return Err(Status::unimplemented(format!(
                "no method {}",
                crate::domain::quote(path)
            )));
        };
        let method = rule.method();
        let caller = self.auth.authenticate(&self.pool, md).await?;
        auth::require_role(&caller, rule.role, method)?;
        let tenant = match rule.scope {
            Scope::Tenant => Some(auth::call_tenant(&caller, md)?),
            Scope::Platform => {
                auth::require_platform(&caller, method)?;
                None
            }
            Scope::Key => None,
        };
        // Every call that needs more than reading is a change: counted
        // against its tenant's rate before it does anything.
        if rule.role != Role::Viewer {
            self.rates.write(&limit::rate_key(&caller, md))?;
        }
        Ok(Some(Grant {
            caller,
            tenant,
            method,
        }))
    }
}

/// The tower layer of the gate (module docs); `src/app.rs` adds it to the
/// server, so it is in front of every service.
#[derive(Debug, Clone)]
pub struct AuthzLayer(Gate);

impl AuthzLayer {
    /// The layer of a node's services.
    pub fn new(ctx: &Ctx) -> AuthzLayer {
        AuthzLayer(Gate::new(ctx))
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            gate: self.0.clone(),
            inner,
        }
    }
}

/// The gate in front of `S` ([`AuthzLayer`]).
#[derive(Debug, Clone)]
pub struct Authz<S> {
    gate: Gate,
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The service polled ready is the one that serves this request.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let gate = self.gate.clone();
        let path = req.uri().path().to_owned();
        let md = MetadataMap::from_headers(req.headers().clone());
        Box::pin(async move {
            match gate.check(&path, &md).await {
                Ok(Some(grant)) => {
                    req.extensions_mut().insert(grant);
                    inner.call(req).await
                }
                Ok(None) => inner.call(req).await,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every method of every `sked.v1` service in the descriptor set has
    /// exactly one rule, and every rule names a method that exists.
    #[test]
    fn every_sked_method_has_exactly_one_rule() {
        let methods: BTreeSet<String> = crate::grpc::boundary::pool()
            .services()
            .filter(|s| s.package_name() == "sked.v1")
            .flat_map(|s| {
                s.methods()
                    .map(|m| format!("/{}/{}", s.full_name(), m.name()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(
            !methods.is_empty(),
            "the descriptor set has sked.v1 services"
        );
        let ruled: Vec<&str> = RULES.iter().map(|r| r.path).collect();
        let unique: BTreeSet<&str> = ruled.iter().copied().collect();
        assert_eq!(unique.len(), ruled.len(), "a path has two rules");
        let missing: Vec<_> = methods
            .iter()
            .filter(|m| !unique.contains(m.as_str()))
            .collect();
        assert!(missing.is_empty(), "methods without a rule: {missing:?}");
        let unknown: Vec<_> = unique.iter().filter(|p| !methods.contains(**p)).collect();
        assert!(unknown.is_empty(), "rules naming no method: {unknown:?}");
    }

    /// The gate in front of a service that answers with the grant it got.
    async fn through_gate(auth: bool, path: &str, headers: &[(&str, &str)]) -> (String, String) {
        use tower::{Layer, ServiceExt};
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool");
        let gate = AuthzLayer(Gate {
            auth: Arc::new(Auth::new(auth)),
            pool,
            rates: Arc::new(limit::RateLimits::unlimited()),
        });
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(http::Response::new(format!(
                "{:?}",
                req.extensions()
                    .get::<Grant>()
                    .map(|g| (&g.tenant, g.method))
            )))
        });
        let mut req = http::Request::builder().uri(format!("http://x{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = gate
            .layer(inner)
            .oneshot(req.body(()).unwrap())
            .await
            .unwrap();
        let status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, resp.into_body())
    }

    #[tokio::test]
    async fn the_gate_fails_closed_and_hands_the_grant_on() {
        // A path without a rule never reaches a service, key or not.
        let (status, body) = through_gate(false, "/sked.v1.RunService/Nope", &[]).await;
        assert_eq!((status.as_str(), body.as_str()), ("12", ""));
        let (status, _) = through_gate(false, "/other.Service/Call", &[]).await;
        assert_eq!(status, "12");
        // Open services pass without a key and without a grant.
        let (status, body) = through_gate(true, "/grpc.health.v1.Health/Check", &[]).await;
        assert_eq!((status.as_str(), body.as_str()), ("", "None"));
        // A sked method without a key is refused before any service runs.
        let (status, body) = through_gate(true, "/sked.v1.RunService/GetRun", &[]).await;
        assert_eq!((status.as_str(), body.as_str()), ("16", ""));
        // Tenant scope: the tenant is resolved before the service runs.
        let (status, _) = through_gate(false, "/sked.v1.RunService/GetRun", &[]).await;
        assert_eq!(status, "3");
        let (status, body) = through_gate(
            false,
            "/sked.v1.RunService/GetRun",
            &[("x-tenant-id", "acme")],
        )
        .await;
        assert_eq!(status, "");
        assert_eq!(body, r#"Some((Some("acme"), "sked.v1.RunService/GetRun"))"#);
        let (_, body) = through_gate(false, "/sked.v1.AdminService/ListApiKeys", &[]).await;
        assert_eq!(body, r#"Some((None, "sked.v1.AdminService/ListApiKeys"))"#);
    }

    #[test]
    fn open_services_are_only_health_and_reflection() {
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_open(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/grpc.health.v1.HealthX/Check"));
        assert!(!is_open("/sked.v1.RunService/TriggerRun"));
        assert!(!is_open("grpc.health.v1.Health/Check"));
        assert!(find("/sked.v1.RunService/TriggerRun").is_some());
        assert!(find("/sked.v1.RunService/Nope").is_none());
        assert_eq!(
            find("/sked.v1.RunService/TriggerRun").map(Rule::method),
            Some("sked.v1.RunService/TriggerRun")
        );
    }
}
