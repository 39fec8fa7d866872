//! The web console (`--console-listen`; `docs/console.md`): the API seen by
//! a person. Server-rendered HTML ([`maud`], escaping by default), one small
//! stylesheet and one small script embedded in the binary, charts drawn as
//! SVG on the server; every page reads without JavaScript, which only makes
//! the run page's log tail live (Server-Sent Events).
//!
//! Pages and actions call the same use-case layer as the gRPC services
//! ([`crate::usecase`]), authorized by the same table
//! ([`crate::grpc::authz::RULES`]): each page or action names the gRPC
//! method it corresponds to, and its role and scope apply (a viewer key
//! cannot act; a tenant key sees only its tenant; another tenant's binding
//! or run is 404). Actions are audited under that method's name, as the API
//! call would be, and count against the tenant's rate of changes.
//!
//! Sign-in takes an API key (checked like a gRPC call's, Argon2 and all)
//! and stores a session in the database ([`usecase::sessions`]); the cookie is
//! HttpOnly, SameSite=Strict, and Secure when the node has TLS (the console
//! then serves HTTPS with the node's certificate, [`serve_tls`]). Every POST
//! carries the session's CSRF token in a hidden field, compared in constant
//! time. In development mode (auth off) sign-in asks only for a tenant and
//! every page says that authentication is off.

pub mod pages;
pub mod views;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;

use crate::domain::Role;
use crate::domain::tenancy::{Caller, Origin};
use crate::grpc::{Ctx, authz, limit};
use crate::usecase::{self, sessions as session};

/// The cookie holding the session token.
pub const COOKIE: &str = "sked_session";

/// What every console handler shares.
#[derive(Debug, Clone)]
pub struct Console {
    /// The node's API context: pool, clock, bus, auth, limits.
    pub ctx: Ctx,
    /// The node serves TLS: cookies are `Secure`.
    pub secure: bool,
}

/// Serves the console on `listener` until `stop` is cancelled.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    console: Console,
    listener: TcpListener,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(console))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Most time a TLS handshake may take.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long open connections (a live tail) may take to close at shutdown.
const TLS_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The console's rustls configuration from the node's TLS files: the same
/// certificate, and with a client CA the same demand for a client
/// certificate; HTTP/1.1 only.
///
/// # Errors
/// A message when the PEM material does not parse or does not fit.
pub fn tls_config(t: &crate::transport::TlsSettings) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&t.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&t.key_pem).map_err(|e| format!("key: {e}"))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(std::sync::Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &t.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(c.map_err(|e| format!("client CA: {e}"))?)
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// [`serve`] over TLS: each accepted connection does its handshake (at
/// most [`TLS_HANDSHAKE`]) in its own task, then speaks HTTP/1.1.
///
/// # Errors
/// None so far: a failed accept or handshake drops that connection only.
pub async fn serve_tls(
    console: Console,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let app = router(console);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "console: accept failed");
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "console: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(
                hyper_util::rt::TokioIo::new(tls),
                hyper_util::service::TowerToHyperService::new(app),
            );
            let _ = watcher.watch(conn).await;
        });
    }
    let _ = tokio::time::timeout(TLS_DRAIN, graceful.shutdown()).await;
    Ok(())
}

/// Every route of the console.
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/bindings") }))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .route("/sign-in", get(pages::sign_in_page).post(pages::sign_in))
        .route("/sign-out", post(pages::sign_out))
        .route("/tenant", post(pages::switch_tenant))
        .route("/bindings", get(pages::bindings))
        .route("/bindings/{id}", get(pages::binding))
        .route("/bindings/{id}/pause", post(pages::pause))
        .route("/bindings/{id}/resume", post(pages::resume))
        .route("/bindings/{id}/trigger", post(pages::trigger))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/tail", get(pages::tail))
        .route("/runs/{id}/cancel", post(pages::cancel))
        .route("/runs/{id}/retry", post(pages::retry))
        .route("/status", get(pages::status))
        .route("/definitions", get(pages::definitions))
        .layer(axum::middleware::map_response_with_state(
            console.clone(),
            failure_pages,
        ))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

/// Headers every answer carries: no framing, no sniffing, scripts and
/// styles only from the console itself.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// The message of a [`Failure`], for [`failure_pages`] to render.
#[derive(Debug, Clone)]
struct FailurePage(String);

/// Renders refusals and errors as pages, with the development-mode banner
/// when auth is off (a [`Failure`] does not know the node's mode).
async fn failure_pages(
    axum::extract::State(c): axum::extract::State<Console>,
    mut r: Response,
) -> Response {
    match r.extensions_mut().remove::<FailurePage>() {
        Some(FailurePage(message)) => {
            let status = r.status();
            let dev = !c.ctx.auth.required();
            (status, views::failure(status, &message, dev)).into_response()
        }
        None => r,
    }
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}

/// A refused or failed request, shown as a small page.
#[derive(Debug)]
pub struct Failure {
    /// HTTP status.
    pub status: StatusCode,
    /// What to tell the person.
    pub message: String,
}

impl Failure {
    /// A failure with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut r = self.status.into_response();
        r.extensions_mut().insert(FailurePage(self.message));
        r
    }
}

impl From<usecase::Error> for Failure {
    fn from(e: usecase::Error) -> Failure {
        Failure::from(tonic::Status::from(e))
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error; see the node's log".to_string()
        } else {
            s.message().to_string()
        };
        Failure::new(status, message)
    }
}

/// Who is signed in: the session, the caller its key makes, and the
/// tenant pages act for.
#[derive(Debug, Clone)]
pub struct Who {
    /// The stored session.
    pub session: session::Session,
    /// The caller, as the gRPC gate would see the session's key.
    pub caller: Caller,
    /// The tenant pages act for: a tenant key's own, else the session's
    /// choice (`None` until a platform key or the development mode chose).
    pub tenant: Option<String>,
    /// Authentication is off (development mode).
    pub dev: bool,
}

impl Who {
    /// The caller's role, for showing or hiding action forms.
    pub fn can(&self, path: &str) -> bool {
        authz::find(path).is_some_and(|r| {
            self.caller.role.allows(r.role)
                && (r.scope != authz::Scope::Platform || self.caller.tenant.is_none())
        })
    }
}

/// The session token of a request's cookie header, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

impl Console {
    /// The signed-in person of a request, or `None` without a live session
    /// (none, ended, or its key revoked or deleted).
    ///
    /// # Errors
    /// The database is unavailable.
    pub async fn who(&self, headers: &HeaderMap) -> Result<Option<Who>, Failure> {
        let Some(token) = cookie_token(headers) else {
            return Ok(None);
        };
        let core = &self.ctx.core;
        let Some(s) = session::find(core, &token).await? else {
            return Ok(None);
        };
        let dev = !self.ctx.auth.required();
        let caller = match s.key_id {
            Some(id) => match usecase::tenancy::find_api_key(&core.pool, id).await {
                Ok(k) if k.revoke_time.is_none() => Caller {
                    key_id: Some(k.id),
                    role: k.role,
                    tenant: k.tenant_id,
                    origin: Origin::Api,
                },
                Ok(_) | Err(usecase::Error::NotFound(_)) => {
                    session::end(core, &s.token_hash).await?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            },
            // A session without a key only while auth is off.
            None if dev => Caller::anonymous(),
            None => {
                session::end(core, &s.token_hash).await?;
                return Ok(None);
            }
        };
        let tenant = caller.tenant.clone().or_else(|| s.tenant_id.clone());
        Ok(Some(Who {
            session: s,
            caller,
            tenant,
            dev,
        }))
    }

    /// The signed-in person, or a refusal: for pages a redirect to sign-in,
    /// for actions 401.
    ///
    /// # Errors
    /// No live session.
    pub async fn require(&self, headers: &HeaderMap, page: bool) -> Result<Who, Response> {
        match self.who(headers).await {
            Ok(Some(w)) => Ok(w),
            Ok(None) if page => Err(Redirect::to("/sign-in").into_response()),
            Ok(None) => Err(Failure::new(
                StatusCode::UNAUTHORIZED,
                "sign in first: this action needs a session",
            )
            .into_response()),
            Err(f) => Err(f.into_response()),
        }
    }

    /// What the gRPC gate checks for the method at `path` (its rule in
    /// [`authz::RULES`]): the role, the scope, and for a change the
    /// tenant's rate. Returns the method name (for audit events) and the
    /// tenant of a tenant-scoped method.
    ///
    /// # Errors
    /// 403 for a role too low or a tenant key on a platform method; 400
    /// when no tenant is chosen for a tenant-scoped method; 429 over the
    /// rate of changes.
    pub fn authorize(&self, who: &Who, path: &str) -> Result<(&'static str, String), Failure> {
        let rule = authz::find(path).ok_or_else(|| {
            Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "no rule for this page")
        })?;
        let method = rule.method();
        crate::grpc::auth::require_role(&who.caller, rule.role, method)?;
        let tenant = match rule.scope {
            authz::Scope::Tenant => who.tenant.clone().ok_or_else(|| {
                Failure::new(
                    StatusCode::BAD_REQUEST,
                    "choose a tenant first (the tenant field at the top of the page)",
                )
            })?,
            authz::Scope::Platform => {
                crate::grpc::auth::require_platform(&who.caller, method)?;
                String::new()
            }
            authz::Scope::Key => who.tenant.clone().unwrap_or_default(),
        };
        if rule.role != Role::Viewer {
            let mut md = MetadataMap::new();
            if let Ok(v) = tenant.parse() {
                md.insert(crate::grpc::TENANT_HEADER, v);
            }
            self.ctx.rates.write(&limit::rate_key(&who.caller, &md))?;
        }
        Ok((method, tenant))
    }

    /// Refuses a POST whose `csrf` field is not the session's token.
    ///
    /// # Errors
    /// 403.
    pub fn check_csrf(who: &Who, given: &str) -> Result<(), Failure> {
        if !given.is_empty()
            && session::constant_time_eq(given.as_bytes(), who.session.csrf_token.as_bytes())
        {
            Ok(())
        } else {
            Err(Failure::new(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token: reload the page and submit the form again",
            ))
        }
    }

    /// The `Set-Cookie` value of a session token (`clear`: one that ends
    /// it).
    pub fn cookie(&self, token: &str, clear: bool) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        // A browser-session cookie: the server ends idle sessions.
        let age = if clear { "; Max-Age=0" } else { "" };
        format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}{age}")
    }
}
