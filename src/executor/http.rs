//! The `http` handler (`docs/semantics.md`, "The http handler"): one HTTP
//! request per attempt with reqwest (rustls), params as the JSON body or,
//! for GET, the query string.
//!
//! **SSRF guard.** Every address a request may connect to passes
//! [`HttpAllow::check`] first: names through [`GuardedResolver`] (a
//! reqwest resolver that resolves, drops refused addresses and fails when
//! none is left, so DNS cannot point a public name at an internal
//! address), IP literals (which reqwest connects to without resolving)
//! before the request and on every redirect hop in the redirect policy.
//! System proxy variables are ignored (`no_proxy`), so no proxy connects on
//! our behalf. A refused request makes no connection and ends `FAILED`
//! with reason `ssrf_blocked`.
//!
//! **Secrets.** Header values may hold `${env:SKED_SECRET_*}`; they are
//! resolved here, per attempt, from this node's environment, sent as
//! sensitive header values, and never written anywhere: the run's log
//! names the method, the URL without its query, the status and the
//! duration only, and every text written is scrubbed of the resolved
//! values.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Executor, Stop, StopReason};
use crate::db::runs::Outcome;
use crate::domain::http::{redact, resolve_secrets};
use crate::domain::{
    EventBody, HttpAllow, HttpHandler, HttpMethod, LogStream, Run, RunReason, RunState,
    storable_json,
};

/// Most bytes of a response body read; the rest is not read.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most bytes of a non-JSON body kept as `{"body": ...}`.
pub const MAX_BODY_TEXT_BYTES: usize = 64 << 10;
/// Redirects followed at most, each through the SSRF guard.
pub const MAX_REDIRECTS: usize = 5;

/// How this node makes HTTP requests: the operator's allow list, and for
/// tests a fixed host table instead of DNS.
#[derive(Debug, Clone, Default)]
pub struct HttpSettings {
    /// Ranges let through the SSRF guard (`--http-allow`).
    pub allow: HttpAllow,
    /// Names resolved from this table only (lower-case host → addresses);
    /// `None` = the system resolver. Tests set it so no DNS query is made.
    pub hosts: Option<BTreeMap<String, Vec<IpAddr>>>,
    /// Secrets resolved from this table only (name → value); `None` = the
    /// node's environment. Tests set it instead of changing the process
    /// environment under other threads.
    pub secrets: Option<BTreeMap<String, String>>,
}

/// A request refused by the SSRF guard: no connection was made.
#[derive(Debug, thiserror::Error)]
#[error(
    "{host} resolves only to addresses this node may not call ({detail}); --http-allow can allow them"
)]
pub struct Blocked {
    /// The host as written.
    pub host: String,
    /// The refused addresses and why, e.g. `127.0.0.1 (loopback)`.
    pub detail: String,
}

/// A reqwest resolver that applies the SSRF guard to resolved addresses.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    allow: Arc<HttpAllow>,
    hosts: Option<Arc<BTreeMap<String, Vec<IpAddr>>>>,
}

impl GuardedResolver {
    /// A resolver over `settings` (its host table, or DNS).
    pub fn new(settings: &HttpSettings) -> Self {
        Self {
            allow: Arc::new(settings.allow.clone()),
            hosts: settings.hosts.clone().map(Arc::new),
        }
    }

    /// The addresses of `host` that pass the guard.
    ///
    /// # Errors
    /// [`Blocked`] when every address is refused; a resolution error when
    /// there is none.
    pub async fn lookup(
        &self,
        host: &str,
    ) -> Result<Vec<IpAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let all: Vec<IpAddr> = match &self.hosts {
            Some(table) => table
                .get(&host)
                .cloned()
                .ok_or_else(|| format!("{host}: no such host in the node's host table"))?,
            None => tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect(),
        };
        if all.is_empty() {
            return Err(format!("{host}: no addresses").into());
        }
        let (ok, refused): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|ip| self.allow.check(*ip).is_ok());
        if ok.is_empty() {
            return Err(Box::new(blocked(&host, &refused, &self.allow)));
        }
        Ok(ok)
    }
}

fn blocked(host: &str, refused: &[IpAddr], allow: &HttpAllow) -> Blocked {
    let detail = refused
        .iter()
        .map(|ip| match allow.check(*ip) {
            Err(why) => format!("{ip} ({why})"),
            Ok(()) => ip.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Blocked {
        host: host.to_string(),
        detail,
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let ips = this.lookup(name.as_str()).await?;
            // The connector sets the port.
            let addrs: Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Whether `url`'s host is an IP literal the guard refuses (reqwest
/// connects to literals without asking the resolver).
fn literal_blocked(url: &reqwest::Url, allow: &HttpAllow) -> Option<Blocked> {
    let ip = match url.host()? {
        url::Host::Ipv4(a) => IpAddr::V4(a),
        url::Host::Ipv6(a) => IpAddr::V6(a),
        url::Host::Domain(_) => return None,
    };
    allow
        .check(ip)
        .err()
        .map(|_| blocked(&ip.to_string(), &[ip], allow))
}

/// The HTTP client of one node: one connection pool, the guarded
/// resolver, a redirect policy that guards every hop, no proxy.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    allow: Arc<HttpAllow>,
    secrets: Option<Arc<BTreeMap<String, String>>>,
}

impl HttpClient {
    /// Builds the client.
    ///
    /// # Errors
    /// reqwest's, should its TLS set-up fail.
    pub fn new(settings: &HttpSettings) -> Result<Self, reqwest::Error> {
        let allow = Arc::new(settings.allow.clone());
        let hop_allow = Arc::clone(&allow);
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            if let Some(b) = literal_blocked(attempt.url(), &hop_allow) {
                return attempt.error(b);
            }
            attempt.follow()
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(settings)))
            .redirect(redirects)
            .user_agent(concat!("sked/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            client,
            allow,
            secrets: settings.secrets.clone().map(Arc::new),
        })
    }
}

impl HttpClient {
    /// POSTs `body` (JSON) to `url` with `headers` through the SSRF guard,
    /// within `timeout`; the failure notifications' webhook
    /// ([`super::notify`]). Returns the answer's status; the body is read
    /// (up to [`MAX_BODY_BYTES`]) and dropped.
    ///
    /// # Errors
    /// A sentence (URL shown without its query) when the URL is bad, the
    /// guard refuses it, the connection fails or the timeout passes.
    pub async fn post_webhook(
        &self,
        url: &str,
        headers: HeaderMap,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<reqwest::StatusCode, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
        let shown = loggable_url(&url);
        if let Some(b) = literal_blocked(&url, &self.allow) {
            return Err(b.to_string());
        }
        let exchange = async {
            let resp = self
                .client
                .post(url)
                .headers(headers)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await?;
            let status = resp.status();
            read_capped(resp).await?;
            Ok::<_, reqwest::Error>(status)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => Err(match find_blocked(&e) {
                Some(b) => b.to_string(),
                None => format!("POST {shown}: {}", error_chain(&e)),
            }),
            Err(_) => Err(format!(
                "POST {shown}: no answer within {}s",
                timeout.as_secs()
            )),
        }
    }
}

/// `url` for a log line: scheme, host, port and path; a query is shown as
/// `?…` (it may carry secrets), user info and fragment are dropped.
pub fn loggable_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

/// The error's chain, searched for a guard refusal.
fn find_blocked<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Blocked> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<Blocked>() {
            return Some(b);
        }
        cur = err.source();
    }
    None
}

/// The error's chain as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Runs `h` for `run` until the response is read, the timeout (the smaller
/// of the handler's and the definition's) passes or `stop` is asked;
/// returns the terminal state and outcome.
pub(crate) async fn execute(
    ex: &Executor,
    run: &Run,
    h: &HttpHandler,
    stop: &Stop,
) -> (RunState, Outcome) {
    let mut url = match reqwest::Url::parse(&h.url) {
        Ok(u) => u,
        Err(e) => return failed(ex, run, format!("bad URL: {e}"), false, &[]).await,
    };
    let mut secrets = Vec::new();
    let mut headers = HeaderMap::new();
    for (name, value) in &h.headers {
        let resolved = match resolve_secrets(value, |n| match &ex.http.secrets {
            Some(table) => table.get(n).cloned(),
            None => std::env::var(n).ok(),
        }) {
            Ok((v, s)) => {
                secrets.extend(s);
                v
            }
            Err(e) => {
                let message = format!("header {name}: {e}");
                return failed(ex, run, message, false, &secrets).await;
            }
        };
        let (Ok(n), Ok(mut v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&resolved),
        ) else {
            let message = format!(
                "header {name}: its value (with secrets resolved) is not a valid header value"
            );
            return failed(ex, run, message, false, &secrets).await;
        };
        v.set_sensitive(true);
        headers.insert(n, v);
    }
    let method = match h.method {
        HttpMethod::Get => reqwest::Method::GET,
        HttpMethod::Post => reqwest::Method::POST,
        HttpMethod::Put => reqwest::Method::PUT,
        HttpMethod::Patch => reqwest::Method::PATCH,
        HttpMethod::Delete => reqwest::Method::DELETE,
    };
    if h.method == HttpMethod::Get
        && let Some(obj) = run.params.as_object().filter(|o| !o.is_empty())
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in obj {
            match v {
                serde_json::Value::String(s) => q.append_pair(k, s),
                other => q.append_pair(k, &other.to_string()),
            };
        }
    }
    let shown = loggable_url(&url);
    let timeout = h
        .effective_timeout_secs(run.policy.timeout_secs)
        .map(|s| Duration::from_secs(s.into()));
    let _ = ex
        .append(
            run,
            &[system(redact(
                &format!("http: {} {shown}", method.as_str()),
                &secrets,
            ))],
        )
        .await;
    if let Some(b) = literal_blocked(&url, &ex.http.allow) {
        return ssrf_blocked(ex, run, &b, &secrets).await;
    }
    let mut req = ex.http.client.request(method.clone(), url).headers(headers);
    if h.method != HttpMethod::Get {
        req = req.json(&run.params);
    }
    let started = Instant::now();
    let exchange = async {
        let resp = req.send().await?;
        let status = resp.status();
        let final_url = loggable_url(resp.url());
        let (body, cut) = read_capped(resp).await?;
        Ok::<_, reqwest::Error>((status, final_url, body, cut))
    };
    let ended = tokio::select! {
        r = exchange => Some(r),
        _ = stop.stopped() => None,
        _ = sleep_or_never(timeout) => {
            let secs = timeout.unwrap_or_default().as_secs();
            let message = format!("timed out after {secs}s");
            let _ = ex.append(run, &[system(format!("http: {message}; request aborted"))]).await;
            return (
                RunState::TimedOut,
                Outcome {
                    error_message: Some(message),
                    reason: RunReason::Timeout.to_string(),
                    ..Outcome::default()
                },
            );
        }
    };
    let ms = started.elapsed().as_millis();
    let Some(r) = ended else {
        // Dropping the exchange aborted the request.
        let reason = match stop.reason() {
            Some(StopReason::Cancel(r)) => r.clone(),
            Some(StopReason::Shutdown) => RunReason::Shutdown.to_string(),
            _ => RunReason::LeaseLost.to_string(),
        };
        let _ = ex
            .append(
                run,
                &[system(format!("http: stopped ({reason}); request aborted"))],
            )
            .await;
        return (
            RunState::Cancelled,
            Outcome {
                reason,
                ..Outcome::default()
            },
        );
    };
    match r {
        Err(e) => {
            if let Some(b) = find_blocked(&e) {
                return ssrf_blocked(ex, run, b, &secrets).await;
            }
            // reqwest's message names the URL with its query: leave it out.
            let e = e.without_url();
            let message = format!("request failed after {ms} ms: {}", error_chain(&e));
            // Connection errors, resets and the like may pass: retryable.
            // A redirect loop or a bad redirect target will not.
            let retryable = !e.is_redirect() && !e.is_builder();
            failed(ex, run, message, retryable, &secrets).await
        }
        Ok((status, final_url, body, cut)) => {
            let summary = format!(
                "http: {} {} in {ms} ms ({} bytes{}){}",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                body.len(),
                if cut { ", cut" } else { "" },
                if final_url != shown {
                    format!(" from {final_url}")
                } else {
                    String::new()
                },
            );
            let _ = ex.append(run, &[system(redact(&summary, &secrets))]).await;
            if status.is_success() {
                let result = if cut {
                    None
                } else {
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .filter(serde_json::Value::is_object)
                }
                .unwrap_or_else(|| serde_json::json!({ "body": body_text(&body) }));
                return (
                    RunState::Succeeded,
                    Outcome {
                        result: Some(storable_json(result)),
                        ..Outcome::default()
                    },
                );
            }
            let code = status.as_u16();
            let message = format!("HTTP {code} {}", status.canonical_reason().unwrap_or(""))
                .trim_end()
                .to_string();
            // 5xx and 429 may pass on a later attempt; any other status
            // (4xx, a 3xx left over) will not.
            let retryable = status.is_server_error() || code == 429;
            let head = body_text(&body);
            (
                RunState::Failed,
                Outcome {
                    error_message: Some(message.clone()),
                    error_summary: (!head.is_empty())
                        .then(|| redact(&head.chars().take(500).collect::<String>(), &secrets)),
                    reason: message,
                    retryable,
                    ..Outcome::default()
                },
            )
        }
    }
}

/// Reads at most [`MAX_BODY_BYTES`] of the body; `true` when it was cut.
async fn read_capped(mut resp: reqwest::Response) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_BODY_BYTES - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// The first [`MAX_BODY_TEXT_BYTES`] of `body` as text (invalid UTF-8
/// replaced), cut at a character boundary.
fn body_text(body: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&body[..body.len().min(MAX_BODY_TEXT_BYTES)]).into_owned();
    if s.len() > MAX_BODY_TEXT_BYTES {
        let mut cut = MAX_BODY_TEXT_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn system(message: String) -> EventBody {
    EventBody::Log {
        stream: LogStream::System,
        message,
    }
}

async fn ssrf_blocked(
    ex: &Executor,
    run: &Run,
    b: &Blocked,
    secrets: &[String],
) -> (RunState, Outcome) {
    let message = redact(&format!("ssrf_blocked: {b}"), secrets);
    let _ = ex.append(run, &[system(format!("http: {message}"))]).await;
    (
        RunState::Failed,
        Outcome {
            error_message: Some(message),
            reason: RunReason::SsrfBlocked.to_string(),
            retryable: false,
            ..Outcome::default()
        },
    )
}

async fn failed(
    ex: &Executor,
    run: &Run,
    message: String,
    retryable: bool,
    secrets: &[String],
) -> (RunState, Outcome) {
    let message = redact(&message, secrets);
    let _ = ex.append(run, &[system(format!("http: {message}"))]).await;
    (
        RunState::Failed,
        Outcome {
            error_message: Some(message.clone()),
            reason: message,
            retryable,
            ..Outcome::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(allow: &str, hosts: &[(&str, &[&str])]) -> HttpSettings {
        HttpSettings {
            allow: HttpAllow::parse(allow).unwrap(),
            hosts: Some(
                hosts
                    .iter()
                    .map(|(h, a)| {
                        (
                            h.to_string(),
                            a.iter().map(|s| s.parse().unwrap()).collect(),
                        )
                    })
                    .collect(),
            ),
            secrets: None,
        }
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses_and_fails_when_none_is_left() {
        let s = settings(
            "",
            &[
                ("internal.example", &["10.0.0.5", "169.254.169.254"]),
                ("mixed.example", &["127.0.0.1", "93.184.216.34"]),
                ("mapped.example", &["::ffff:127.0.0.1"]),
            ],
        );
        let r = GuardedResolver::new(&s);
        let e = r.lookup("internal.example").await.unwrap_err();
        let b = e.downcast_ref::<Blocked>().expect("a guard refusal");
        assert!(b.detail.contains("10.0.0.5 (private)"), "{b}");
        assert!(b.detail.contains("169.254.169.254 (metadata)"), "{b}");
        assert!(
            r.lookup("Mapped.Example.")
                .await
                .unwrap_err()
                .downcast_ref::<Blocked>()
                .is_some()
        );
        assert_eq!(
            r.lookup("mixed.example").await.unwrap(),
            vec!["93.184.216.34".parse::<IpAddr>().unwrap()]
        );
        let e = r.lookup("unknown.example").await.unwrap_err();
        assert!(e.downcast_ref::<Blocked>().is_none(), "not a guard refusal");

        let allowed = GuardedResolver::new(&settings(
            "10.0.0.0/8",
            &[("internal.example", &["10.0.0.5"])],
        ));
        assert_eq!(allowed.lookup("internal.example").await.unwrap().len(), 1);
    }

    #[test]
    fn literals_are_checked_and_urls_logged_without_queries() {
        let none = HttpAllow::default();
        for u in [
            "http://127.0.0.1:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://0x7f.1/",
        ] {
            let url = reqwest::Url::parse(u).unwrap();
            assert!(literal_blocked(&url, &none).is_some(), "{u}");
        }
        let url = reqwest::Url::parse("http://example.com/").unwrap();
        assert!(literal_blocked(&url, &none).is_none());
        let url = reqwest::Url::parse("https://u:p@example.com/a/b?token=s3cr3t#f").unwrap();
        assert_eq!(loggable_url(&url), "https://example.com/a/b?…");
    }

    #[test]
    fn non_json_bodies_are_kept_capped() {
        let big = "é".repeat(MAX_BODY_TEXT_BYTES);
        let t = body_text(big.as_bytes());
        assert!(t.len() <= MAX_BODY_TEXT_BYTES && t.ends_with('é'));
        assert_eq!(body_text(b"plain"), "plain");
    }
}
