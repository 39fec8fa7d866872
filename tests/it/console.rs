//! The web console (`src/console`, docs/console.md) over real HTTP against a
//! real node: sessions, roles, CSRF and tenant isolation of actions and
//! pages; the live log tail over Server-Sent Events and its resumption;
//! the console over TLS; then one scenario in a real headless Chromium
//! (`browser` below).

use std::net::SocketAddr;

use crate::common::*;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, SET_COOKIE};
use sked::proto::v1 as pb;

/// A client that does not follow redirects (the tests look at them).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

/// A console session: its cookie and the base URL.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

impl Browser {
    fn new(console: SocketAddr) -> Browser {
        Browser {
            http: client(),
            base: format!("http://{console}"),
            cookie: None,
        }
    }

    /// Signs in with `key` (empty in development mode) for `tenant`.
    async fn sign_in(console: SocketAddr, key: &str, tenant: &str) -> Browser {
        let mut b = Browser::new(console);
        let r = b
            .http
            .post(format!("{}/sign-in", b.base))
            .form(&[("key", key), ("tenant", tenant)])
            .send()
            .await
            .expect("sign in");
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "sign-in redirects");
        let set = r
            .headers()
            .get(SET_COOKIE)
            .expect("a session cookie")
            .to_str()
            .unwrap()
            .to_string();
        for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(attr), "cookie has {attr}: {set}");
        }
        b.cookie = Some(set.split(';').next().unwrap().to_string());
        b
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        match &self.cookie {
            Some(c) => r.header(COOKIE, c),
            None => r,
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .req(reqwest::Method::GET, path)
            .send()
            .await
            .expect("GET");
        (r.status(), r.text().await.unwrap_or_default())
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> StatusCode {
        self.req(reqwest::Method::POST, path)
            .form(form)
            .send()
            .await
            .expect("POST")
            .status()
    }

    /// The CSRF token the forms of `path` carry.
    async fn csrf(&self, path: &str) -> String {
        let (s, html) = self.get(path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {html}");
        csrf_in(&html).expect("a CSRF field")
    }
}

fn csrf_in(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(html[at..].split('"').next()?.to_string())
}

/// A node with auth on and a console; the root token.
async fn secured(db: &TestDb) -> (TestNode, String) {
    let root = sked::app::bootstrap_key(&db.url, "root")
        .await
        .expect("bootstrap key");
    let mut s = settings(db, "console");
    s.auth = true;
    (TestNode::start_with_console(s).await, root)
}

async fn make_key(node: &TestNode, admin: &str, role: pb::Role, tenant: &str) -> String {
    node.admin()
        .create_api_key(with_key(
            admin,
            pb::CreateApiKeyRequest {
                name: format!("{tenant}-{}", role.as_str_name()),
                role: role as i32,
                tenant_id: tenant.into(),
            },
        ))
        .await
        .expect("create api key")
        .into_inner()
        .token
}

async fn paused(node: &TestNode, token: &str, tenant: &str, id: &str) -> bool {
    node.bindings()
        .get_binding(request(
            tenant,
            Some(token),
            pb::GetBindingRequest {
                binding_id: id.into(),
            },
        ))
        .await
        .expect("get binding")
        .into_inner()
        .paused
}

#[tokio::test]
async fn actions_need_a_session_a_role_and_the_csrf_token_and_tenants_stay_apart() {
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    let console = node.console.unwrap();
    let viewer = make_key(&node, &root, pb::Role::Viewer, "acme").await;
    let operator = make_key(&node, &root, pb::Role::Operator, "acme").await;
    let other = make_key(&node, &root, pb::Role::Operator, "beta").await;
    let b = define_and_bind_via(
        &node.channel,
        "acme",
        Some(&root),
        sh_def("nightly", "echo hi", manual()),
    )
    .await;
    let run = trigger_via(&node.channel, "acme", Some(&root), &b.id).await;
    let pause = format!("/bindings/{}/pause", b.id);

    // No session: pages send to sign-in, actions are refused.
    let anon = Browser::new(console);
    let r = anon
        .req(reqwest::Method::GET, "/bindings")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/sign-in");
    for path in [
        pause.clone(),
        format!("/bindings/{}/resume", b.id),
        format!("/bindings/{}/trigger", b.id),
        format!("/runs/{}/cancel", run.id),
        format!("/runs/{}/retry", run.id),
    ] {
        assert_eq!(
            anon.post(&path, &[("csrf", "x")]).await,
            StatusCode::UNAUTHORIZED,
            "{path} without a session"
        );
    }
    let (s, _) = anon.get(&format!("/runs/{}/tail", run.id)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "tail without a session");
    // A wrong key signs nobody in.
    let r = client()
        .post(format!("http://{console}/sign-in"))
        .form(&[("key", "sk_nope"), ("tenant", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());

    // A viewer reads but cannot act, even with its valid CSRF token.
    let v = Browser::sign_in(console, &viewer, "").await;
    let (s, html) = v.get(&format!("/bindings/{}", b.id)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("nightly") && !html.contains("id=\"pause\""));
    assert!(!html.contains("Development mode"), "no banner with auth on");
    let token = v.csrf(&format!("/bindings/{}", b.id)).await;
    assert_eq!(
        v.post(&pause, &[("csrf", &token)]).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        v.post(&format!("/bindings/{}/trigger", b.id), &[("csrf", &token)])
            .await,
        StatusCode::FORBIDDEN
    );
    assert!(!paused(&node, &root, "acme", &b.id).await);
    let (s, _) = v.get("/status").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "status is for platform admins");

    // An operator: a missing or forged CSRF token is refused, the right
    // one pauses, through the use case, audited as PauseBinding.
    let o = Browser::sign_in(console, &operator, "acme").await;
    let token = o.csrf(&format!("/bindings/{}", b.id)).await;
    assert_eq!(
        o.post(&pause, &[("note", "x")]).await,
        StatusCode::FORBIDDEN,
        "missing CSRF"
    );
    // The same token with its last character changed.
    let last = if token.ends_with('A') { 'E' } else { 'A' };
    let forged = format!("{}{last}", &token[..token.len() - 1]);
    assert_ne!(forged, token);
    assert_eq!(
        o.post(&pause, &[("csrf", &forged), ("note", "x")]).await,
        StatusCode::FORBIDDEN,
        "forged CSRF"
    );
    // Another session's token is not this one's.
    assert_eq!(
        o.post(&pause, &[("csrf", &v.csrf("/bindings").await)])
            .await,
        StatusCode::FORBIDDEN,
        "another session's CSRF"
    );
    assert!(!paused(&node, &root, "acme", &b.id).await);
    assert_eq!(
        o.post(
            &pause,
            &[
                ("csrf", &token),
                ("note", "disk full"),
                ("expire_hours", "2")
            ]
        )
        .await,
        StatusCode::SEE_OTHER
    );
    assert!(paused(&node, &root, "acme", &b.id).await);
    let audit = node
        .admin()
        .list_audit_events(with_key(
            &root,
            pb::ListAuditEventsRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("audit")
        .into_inner();
    assert!(
        audit
            .events
            .iter()
            .any(|e| e.method.ends_with("PauseBinding")),
        "the pause is audited: {:?}",
        audit.events
    );
    let (_, html) = o.get(&format!("/bindings/{}", b.id)).await;
    assert!(html.contains("data-status=\"PAUSED\"") && html.contains("disk full"));
    assert!(html.contains(" until "), "the expiry is shown");
    let (_, html) = o.get("/bindings?status=PAUSED").await;
    assert!(html.contains(&b.id), "the status filter keeps it");
    let (_, html) = o.get("/bindings?status=ACTIVE").await;
    assert!(!html.contains(&b.id), "the status filter drops it");
    let (s, html) = o.get(&format!("/bindings/{}?page=bogus", b.id)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a bad page token: {html}");
    assert!(html.contains("page_token"));

    // Tenant beta's session: acme's binding and run are 404, pages and
    // actions alike, and its bindings page shows none of acme's.
    let other = Browser::sign_in(console, &other, "").await;
    for path in [
        format!("/bindings/{}", b.id),
        format!("/runs/{}", run.id),
        format!("/runs/{}/tail", run.id),
    ] {
        let (s, html) = other.get(&path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {html}");
        assert!(!html.contains("nightly"), "{path} reveals nothing");
    }
    let token = other.csrf("/bindings").await;
    assert_eq!(
        other
            .post(&format!("/bindings/{}/resume", b.id), &[("csrf", &token)])
            .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        other
            .post(&format!("/runs/{}/retry", run.id), &[("csrf", &token)])
            .await,
        StatusCode::NOT_FOUND
    );
    let (_, html) = other.get("/bindings").await;
    assert!(!html.contains(&b.id));
    assert!(paused(&node, &root, "acme", &b.id).await);
    // Revoking the operator's key ends its session at once.
    let token = o.csrf("/bindings").await;
    let (key_id, _) = sked::domain::tenancy::parse_token(&operator).expect("a token");
    node.admin()
        .revoke_api_key(with_key(
            &root,
            pb::RevokeApiKeyRequest {
                key_id: key_id.to_string(),
            },
        ))
        .await
        .expect("revoke");
    let r = o
        .req(reqwest::Method::GET, "/bindings")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "back to sign-in");
    assert_eq!(
        o.post(&format!("/bindings/{}/resume", b.id), &[("csrf", &token)])
            .await,
        StatusCode::UNAUTHORIZED
    );
    assert!(paused(&node, &root, "acme", &b.id).await);
    // A platform admin sees the scheduler status.
    let admin = Browser::sign_in(console, &root, "acme").await;
    let (s, html) = admin.get("/status").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains(&node.node_id));
    assert!(html.contains("id=\"lag-hour\""), "the tenant's last hour");
    // A platform key switches tenant as it would with x-tenant-id.
    let token = admin.csrf("/bindings").await;
    let (_, html) = admin.get("/bindings").await;
    assert!(html.contains(&b.id));
    assert_eq!(
        admin
            .post("/tenant", &[("csrf", token.as_str()), ("tenant", "beta")])
            .await,
        StatusCode::SEE_OTHER
    );
    let (_, html) = admin.get("/bindings").await;
    assert!(!html.contains(&b.id) && html.contains("beta"));
    // Signing out ends the session.
    assert_eq!(
        admin.post("/sign-out", &[("csrf", token.as_str())]).await,
        StatusCode::SEE_OTHER
    );
    let r = admin
        .req(reqwest::Method::GET, "/bindings")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/sign-in", "signed out");
    node.stop().await;
}

#[tokio::test]
async fn with_tls_the_console_serves_https_with_secure_cookies() {
    let db = TestDb::new().await;
    let root = sked::app::bootstrap_key(&db.url, "root")
        .await
        .expect("bootstrap key");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert_pem = cert.cert.pem();
    let mut s = settings(&db, "console-tls");
    s.auth = true;
    s.tls = Some(sked::transport::TlsSettings {
        cert_pem: cert_pem.clone().into_bytes(),
        key_pem: cert.signing_key.serialize_pem().into_bytes(),
        client_ca_pem: None,
    });
    let console = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = console.local_addr().unwrap();
    s.console = Some(std::sync::Arc::new(console));
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let node = tokio::spawn(sked::app::serve(s, grpc, stop.clone().cancelled_owned()));
    let https = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(WAIT)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    // The node may still be starting: wait for the console to answer.
    let deadline = std::time::Instant::now() + WAIT;
    let page = loop {
        match https.get(format!("https://{addr}/sign-in")).send().await {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "console over TLS: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(page.status(), StatusCode::OK);
    let r = https
        .post(format!("https://{addr}/sign-in"))
        .form(&[("key", root.as_str()), ("tenant", "acme")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(cookie.contains("; Secure"), "{cookie}");
    // Plain HTTP gets no page.
    let plain = client().get(format!("http://{addr}/sign-in")).send().await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "no plaintext console next to TLS"
    );
    stop.cancel();
    tokio::time::timeout(WAIT, node)
        .await
        .expect("node stops")
        .expect("serve task")
        .expect("serve ended cleanly");
}

/// The README's first command: `sked serve` without DATABASE_URL (the
/// development mode) serves the console too; here on a free port (the
/// default, 127.0.0.1:50052, may be taken on a test machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sked_serve_in_the_development_mode_serves_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let console: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let addr = console.to_string();
    let (mut child, _channel) = spawn_sked(
        &[
            "--data-dir".as_ref(),
            dir.path().as_os_str(),
            "--console-listen".as_ref(),
            addr.as_ref(),
        ],
        &[("SKED_SHUTDOWN_GRACE", "5")],
    )
    .await;
    let (s, html) = Browser::new(console).get("/sign-in").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("authentication is OFF"));
    let b = Browser::sign_in(console, "", "acme").await;
    let (s, html) = b.get("/bindings").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("authentication is OFF") && html.contains("acme"));
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit with the console open");
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<i64>,
    event: String,
    data: String,
}

/// Reads SSE events from `r` until `enough` says so or the stream ends.
async fn read_sse(mut r: reqwest::Response, enough: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
    let mut buf = String::new();
    let mut out: Vec<Sse> = Vec::new();
    loop {
        if enough(&out) {
            return out;
        }
        let chunk = tokio::time::timeout(WAIT, r.chunk())
            .await
            .expect("SSE data in time")
            .expect("SSE read");
        let Some(chunk) = chunk else {
            return out;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut ev = Sse {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            let mut any = false;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().parse().ok();
                    any = true;
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.trim().to_string();
                    any = true;
                } else if let Some(v) = line.strip_prefix("data:") {
                    ev.data.push_str(v.trim_start());
                    any = true;
                }
            }
            if any {
                out.push(ev);
            }
        }
    }
}

fn log_messages(events: &[Sse]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "log")
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.data).expect("json data");
            v["message"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[tokio::test]
async fn the_live_tail_follows_a_running_run_and_resumes_after_last_event_id() {
    let db = TestDb::new().await;
    let node = TestNode::start_with_console(settings(&db, "console-dev")).await;
    let console = node.console.unwrap();
    // The development mode: sign-in asks only for a tenant, every page
    // says auth is off.
    let (s, html) = Browser::new(console).get("/sign-in").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("authentication is OFF"), "{html}");
    assert!(!html.contains("name=\"key\""));
    // The run prints a line every 0.2 s until the test lets it end, so
    // "while it executes" holds however slow the machine is.
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("done");
    let b = define_and_bind(
        &node,
        "acme",
        sh_def(
            "ticker",
            &format!(
                "i=0; while [ ! -f '{}' ]; do i=$((i+1)); echo line-$i; sleep 0.2; done; echo finished-ok",
                mark.display()
            ),
            manual(),
        ),
    )
    .await;
    let s = Browser::sign_in(console, "", "acme").await;
    for page in ["/bindings", "/definitions", "/status"] {
        let (st, html) = s.get(page).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        assert!(html.contains("authentication is OFF"), "banner on {page}");
    }
    let (st, html) = s.get("/bindings/not-an-id").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(
        html.contains("authentication is OFF"),
        "the banner on error pages too"
    );
    // The schedule calendar marks fires moved by a DST gap: 02:30 on
    // 28 March does not exist in Berlin in 2027 (nor in 2032), it does in
    // the other years.
    let spring = define_and_bind(
        &node,
        "acme",
        sh_def("spring", "true", cron("30 2 28 3 *", "Europe/Berlin")),
    )
    .await;
    let (st, html) = s.get(&format!("/bindings/{}", spring.id)).await;
    assert_eq!(st, StatusCode::OK);
    let fires = html.matches("<li>2").count();
    let shifted = html.matches(">DST-shifted<").count();
    assert_eq!(fires, 10, "ten next fires: {html}");
    assert!((1..10).contains(&shifted), "{shifted} of 10 shifted");
    assert!(
        html.contains("2027-03-28 01:00:00 UTC"),
        "03:00 CEST: {html}"
    );
    // Trigger through the console's form: the run page follows.
    let token = s.csrf(&format!("/bindings/{}", b.id)).await;
    let r = s
        .req(
            reqwest::Method::POST,
            &format!("/bindings/{}/trigger", b.id),
        )
        .form(&[
            ("csrf", token.as_str()),
            ("params", "{\"who\": \"console\"}"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let run_page = r.headers()["location"].to_str().unwrap().to_string();
    let run_id = run_page.trim_start_matches("/runs/").to_string();
    let run = get_run(&node, "acme", &run_id).await;
    assert!(
        run.params
            .as_ref()
            .is_some_and(|p| p.fields.contains_key("who")),
        "params passed"
    );

    // First connection: until two lines arrived while the run runs.
    let first = s
        .req(reqwest::Method::GET, &format!("/runs/{run_id}/tail"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(
        first.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let got = read_sse(first, |e| log_messages(e).len() >= 2).await;
    let running = get_run(&node, "acme", &run_id).await;
    assert!(
        !is_terminal(&running),
        "lines arrived while the run executes"
    );
    let last = got.iter().filter_map(|e| e.id).max().expect("ids");
    std::fs::write(&mark, "").unwrap();
    // Reconnect as EventSource does: Last-Event-ID resumes after it.
    let second = s
        .req(reqwest::Method::GET, &format!("/runs/{run_id}/tail"))
        .header("last-event-id", last.to_string())
        .send()
        .await
        .unwrap();
    let rest = read_sse(second, |e| e.iter().any(|e| e.event == "end")).await;
    assert!(rest.iter().any(|e| e.event == "end"), "the tail ends");
    let mut seqs: Vec<i64> = got.iter().chain(&rest).filter_map(|e| e.id).collect();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "no event twice: {seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap: {seqs:?}"
    );
    let mut lines = log_messages(&got);
    lines.extend(log_messages(&rest));
    assert!(lines.len() >= 3, "{lines:?}");
    let want: Vec<String> = (1..lines.len())
        .map(|i| format!("line-{i}"))
        .chain(["finished-ok".to_string()])
        .collect();
    assert_eq!(lines, want, "every line once, in order");
    assert!(
        rest.iter()
            .any(|e| e.event == "state" && e.data.contains("SUCCEEDED")),
        "the final state comes through"
    );
    // The ended run's page shows it all without JavaScript.
    let (st, html) = s.get(&run_page).await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains("finished-ok") && html.contains("data-state=\"SUCCEEDED\""));

    // Cancel a running run from its page, with a reason; then retry it.
    let sleeper = define_and_bind(&node, "acme", sh_def("sleeper", "sleep 60", manual())).await;
    let long = trigger(&node, "acme", &sleeper.id).await;
    let deadline = std::time::Instant::now() + WAIT;
    while state(&get_run(&node, "acme", &long.id).await) != pb::RunState::Running {
        assert!(std::time::Instant::now() < deadline, "the run starts");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let page = format!("/runs/{}", long.id);
    let token = s.csrf(&page).await;
    let (_, html) = s.get(&page).await;
    assert!(html.contains("id=\"cancel\"") && !html.contains("id=\"retry\""));
    assert_eq!(
        s.post(
            &format!("{page}/cancel"),
            &[("csrf", token.as_str()), ("reason", "wrong day")]
        )
        .await,
        StatusCode::SEE_OTHER
    );
    let ended = wait_terminal(&node, "acme", &long.id).await;
    assert_eq!(state(&ended), pb::RunState::Cancelled);
    assert!(ended.reason.contains("wrong day"), "{ended:?}");
    let r = s
        .req(reqwest::Method::POST, &format!("{page}/retry"))
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let again = r.headers()["location"].to_str().unwrap().to_string();
    assert_ne!(again, page, "a new attempt");
    let retried = get_run(&node, "acme", again.trim_start_matches("/runs/")).await;
    assert_eq!(retried.attempt, 2);
    assert_eq!(
        s.post(&format!("{again}/cancel"), &[("csrf", token.as_str())])
            .await,
        StatusCode::SEE_OTHER
    );
    wait_terminal(&node, "acme", &retried.id).await;
    node.stop().await;
}

/// The browser scenario in a real headless Chromium driven over WebDriver
/// (Debian's `chromium` and `chromium-driver`; the test starts
/// `chromedriver` itself on a loopback port). Screenshots of each page go
/// to `target/console-screenshots/`.
mod browser {
    use std::path::PathBuf;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use fantoccini::{Client, ClientBuilder, Locator};
    use serde_json::json;

    use super::*;

    const CHROMIUM: &str = "/usr/bin/chromium";
    const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

    /// `chromedriver`, ended when dropped.
    struct Driver {
        _child: tokio::process::Child,
        url: String,
        _profile: tempfile::TempDir,
    }

    /// Skip with a message locally; under CI=true a missing browser fails.
    fn available() -> bool {
        let ok =
            std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists();
        if !ok {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true but {CHROMIUM} or {CHROMEDRIVER} is missing: .ci/run installs chromium and chromium-driver"
            );
            eprintln!(
                "SKIPPED: the console browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
            );
        }
        ok
    }

    async fn start_driver() -> Driver {
        // A free loopback port for chromedriver.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = client();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver {
            _child: child,
            url,
            _profile: tempfile::tempdir().expect("profile dir"),
        }
    }

    async fn browse(d: &Driver) -> Client {
        let profile = d._profile.path().display().to_string();
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    "--disable-extensions", "--window-size=1280,1000",
                    // Nothing leaves the machine: every non-loopback request
                    // goes to a closed loopback port.
                    "--proxy-server=http://127.0.0.1:9",
                    format!("--user-data-dir={profile}"),
                ],
            },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&d.url)
            .await
            .expect("WebDriver session")
    }

    /// Polls `script` (a JS expression returning a boolean) until true.
    async fn until(c: &Client, what: &str, script: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = c
                .execute(&format!("return !!({script});"), vec![])
                .await
                .expect("execute");
            if v == json!(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn shots() -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let dir = target.join("console-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        dir
    }

    async fn shot(c: &Client, name: &str) {
        let png = c.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(shots().join(format!("{name}.png")), png).expect("write screenshot");
    }

    /// Presses Tab `n` times from the top of the page; what had the focus
    /// after each press (id, else class, else text).
    async fn tab_order(c: &Client, n: usize) -> Vec<String> {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        use fantoccini::key::Key;
        c.execute(
            "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);",
            vec![],
        )
        .await
        .expect("execute");
        let mut seen = Vec::with_capacity(n);
        for _ in 0..n {
            let tab = KeyActions::new("keyboard".to_string())
                .then(KeyAction::Down {
                    value: char::from(Key::Tab),
                })
                .then(KeyAction::Up {
                    value: char::from(Key::Tab),
                });
            c.perform_actions(tab).await.expect("Tab");
            let v = c
                .execute(
                    "const e = document.activeElement; return e.id || e.className || e.textContent.trim();",
                    vec![],
                )
                .await
                .expect("execute");
            seen.push(v.as_str().unwrap_or_default().to_string());
        }
        seen
    }

    /// Every form control has a label; every image a name (what can be
    /// checked of accessibility without a human).
    async fn accessible(c: &Client, page: &str) {
        let unlabeled = c
            .execute(
                "return [...document.querySelectorAll('input:not([type=hidden]),select,textarea')]
                   .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
                   .map(e => e.outerHTML);",
                vec![],
            )
            .await
            .expect("execute");
        assert_eq!(unlabeled, json!([]), "{page}: controls without a label");
        let unnamed = c
            .execute(
                "return [...document.querySelectorAll('svg[role=img]')].filter(e => !e.getAttribute('aria-label')).length;",
                vec![],
            )
            .await
            .expect("execute");
        assert_eq!(unnamed, json!(0), "{page}: images without a name");
        // WCAG AA contrast of every visible text against its background.
        let low = c
            .execute(
                r#"
                const rgb = s => (s.match(/[\d.]+/g) || []).map(Number);
                const lum = ([r, g, b]) => {
                  const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
                  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
                };
                const bg = e => {
                  for (; e; e = e.parentElement) {
                    const c = rgb(getComputedStyle(e).backgroundColor);
                    if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
                  }
                  return [255, 255, 255];
                };
                const bad = [];
                for (const e of document.querySelectorAll('body *')) {
                  const own = [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
                  if (!own || !e.getClientRects().length || e.closest('svg')) continue;
                  const st = getComputedStyle(e);
                  const [a, b] = [lum(rgb(st.color)), lum(bg(e))];
                  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
                  const large = parseFloat(st.fontSize) >= 24 || (parseFloat(st.fontSize) >= 18.66 && Number(st.fontWeight) >= 700);
                  if (ratio < (large ? 3 : 4.5)) bad.push(e.tagName + ' ' + ratio.toFixed(2) + ' ' + e.textContent.trim().slice(0, 30));
                }
                return bad;"#,
                vec![],
            )
            .await
            .expect("execute");
        assert_eq!(low, json!([]), "{page}: text below WCAG AA contrast");
        // The keyboard reaches the content first: the skip link.
        let first = c
            .execute(
                "document.activeElement && document.activeElement.blur(); return document.querySelector('a.skip') !== null;",
                vec![],
            )
            .await
            .expect("execute");
        assert_eq!(first, json!(true), "{page}: a skip link");
    }

    async fn run_of(node: &TestNode, token: &str, id: &str) -> pb::Run {
        node.runs()
            .get_run(request(
                "acme",
                Some(token),
                pb::GetRunRequest { run_id: id.into() },
            ))
            .await
            .expect("get run")
            .into_inner()
    }

    async fn ended(node: &TestNode, token: &str, id: &str) -> pb::Run {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = run_of(node, token, id).await;
            if is_terminal(&r) {
                return r;
            }
            assert!(Instant::now() < deadline, "run {id} did not end");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Backfills `binding`'s fires of the last `days` days (before today)
    /// and waits until they all ended: history for the strip.
    async fn history(node: &TestNode, token: &str, binding: &str, days: f64) {
        let today = (now_secs() / 86_400.0).floor() * 86_400.0;
        let created = node
            .runs()
            .backfill_runs(request(
                "acme",
                Some(token),
                pb::BackfillRunsRequest {
                    binding_id: binding.into(),
                    start_time: Some(ts(today - days * 86_400.0)),
                    end_time: Some(ts(today)),
                    dry_run: false,
                },
            ))
            .await
            .expect("backfill")
            .into_inner()
            .scheduled_times
            .len();
        assert!(created > 0);
        let deadline = Instant::now() + WAIT;
        loop {
            let runs = node
                .runs()
                .list_runs(request(
                    "acme",
                    Some(token),
                    pb::ListRunsRequest {
                        binding_id: binding.into(),
                        page_size: 100,
                        ..Default::default()
                    },
                ))
                .await
                .expect("list runs")
                .into_inner()
                .runs;
            if runs.len() >= created && runs.iter().all(is_terminal) {
                return;
            }
            assert!(Instant::now() < deadline, "backfilled runs did not end");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    async fn sign_in_see_red_squares_follow_a_run_and_pause() {
        if !available() {
            return;
        }
        let db = TestDb::new().await;
        let (node, root) = secured(&db).await;
        let console = node.console.unwrap();
        let base = format!("http://{console}");
        let operator = make_key(&node, &root, pb::Role::Operator, "acme").await;
        // A nightly backup that fails (slowly, printing as it goes), and a
        // healthy report next to it.
        // It prints a line every 0.2 s, at least three, until the test lets
        // it end: "while the run executes" holds on a slow machine too.
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("done");
        std::fs::write(&mark, "").unwrap();
        let backup = define_and_bind_via(
            &node.channel,
            "acme",
            Some(&root),
            sh_def(
                "backup",
                &format!(
                    "i=0; while [ $i -lt 3 ] || [ ! -f '{}' ]; do i=$((i+1)); echo copying part $i; sleep 0.2; done; echo disk full >&2; exit 3",
                    mark.display()
                ),
                cron("0 2 * * *", "UTC"),
            ),
        )
        .await;
        let report = define_and_bind_via(
            &node.channel,
            "acme",
            Some(&root),
            sh_def("report", "echo ok", cron("0 6 * * *", "UTC")),
        )
        .await;
        // History: the report has run well for three weeks, the backup
        // has failed every night for the last four.
        history(&node, &root, &report.id, 21.0).await;
        history(&node, &root, &backup.id, 4.0).await;
        let failed = trigger_via(&node.channel, "acme", Some(&root), &backup.id).await;
        let ok = trigger_via(&node.channel, "acme", Some(&root), &report.id).await;
        let failed = ended(&node, &root, &failed.id).await;
        assert_eq!(state(&failed), pb::RunState::Failed);
        ended(&node, &root, &ok.id).await;

        let driver = start_driver().await;
        let c = browse(&driver).await;
        // Sign in with the key.
        c.goto(&format!("{base}/sign-in")).await.expect("goto");
        accessible(&c, "sign-in").await;
        // The keyboard: the skip link first, then the form.
        let order = tab_order(&c, 4).await;
        assert_eq!(order[0], "skip", "{order:?}");
        assert!(
            order.contains(&"key".to_string()) && order.contains(&"tenant".to_string()),
            "{order:?}"
        );
        c.find(Locator::Id("key"))
            .await
            .unwrap()
            .send_keys(&operator)
            .await
            .unwrap();
        c.find(Locator::Css("form.stack button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        // The bindings page: the backup's day is red, the report's green.
        let row = format!("tr[data-binding='{}']", backup.id);
        until(
            &c,
            "the red square",
            &format!("document.querySelector(\"{row} rect.fail\")"),
        )
        .await;
        until(
            &c,
            "the green square",
            &format!(
                "document.querySelector(\"tr[data-binding='{}'] rect.ok\")",
                report.id
            ),
        )
        .await;
        let red = c
            .execute(
                &format!(
                    "return getComputedStyle(document.querySelector(\"{row} rect.fail\")).fill;"
                ),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(red, json!("rgb(207, 34, 46)"), "failures are red");
        accessible(&c, "bindings").await;
        shot(&c, "bindings").await;

        // Its last run: the failed one, read without following.
        c.find(Locator::Css(&format!("{row} a[href^='/runs/']")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until(
            &c,
            "the failed run's page",
            "document.querySelector('#run-state [data-state=FAILED]') && document.querySelector('#log').textContent.includes('copying part 3')",
        )
        .await;
        shot(&c, "run-failed").await;

        // The binding page; trigger a new run and watch its lines arrive
        // live while it executes.
        c.goto(&format!("{base}/bindings/{}", backup.id))
            .await
            .unwrap();
        accessible(&c, "binding").await;
        let order = tab_order(&c, 20).await;
        for id in ["note", "expire_hours", "pause", "params", "trigger"] {
            assert!(
                order.contains(&id.to_string()),
                "{id} by keyboard: {order:?}"
            );
        }
        shot(&c, "binding").await;
        std::fs::remove_file(&mark).unwrap();
        c.find(Locator::Id("trigger"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until(
            &c,
            "the live tail",
            "document.querySelector('#tail-status') && document.querySelector('#tail-status').textContent.includes('Following')",
        )
        .await;
        let run_id = c
            .current_url()
            .await
            .unwrap()
            .path()
            .trim_start_matches("/runs/")
            .to_string();
        until(
            &c,
            "live lines",
            "document.querySelectorAll('#log .line').length >= 2",
        )
        .await;
        let mid = run_of(&node, &root, &run_id).await;
        assert!(
            !is_terminal(&mid),
            "lines arrived while the run executes: {mid:?}"
        );
        let lines = c
            .execute(
                "return document.querySelectorAll('#log .line').length;",
                vec![],
            )
            .await
            .unwrap();
        shot(&c, "run-live").await;
        std::fs::write(&mark, "").unwrap();
        until(
            &c,
            "the run's end",
            "document.querySelector('#tail-status').textContent.includes('ended') && document.querySelector('#run-state [data-state=FAILED]')",
        )
        .await;
        let all = c
            .execute(
                "return [...document.querySelectorAll('#log .line')].map(e => e.textContent.trim());",
                vec![],
            )
            .await
            .unwrap();
        let got: Vec<String> = serde_json::from_value(all).unwrap();
        assert!(
            lines.as_u64().unwrap() < got.len() as u64,
            "more lines came live"
        );
        let got: Vec<String> = got
            .into_iter()
            .filter(|l| l.starts_with("copying") || l == "disk full")
            .collect();
        let want: Vec<String> = (1..got.len())
            .map(|i| format!("copying part {i}"))
            .chain(["disk full".to_string()])
            .collect();
        assert!(got.len() >= 4, "{got:?}");
        assert_eq!(got, want, "every line once, in order");
        shot(&c, "run").await;

        // Pause the binding with a note; the status changes.
        c.goto(&format!("{base}/bindings/{}", backup.id))
            .await
            .unwrap();
        c.find(Locator::Id("note"))
            .await
            .unwrap()
            .send_keys("disk full, waiting for ops")
            .await
            .unwrap();
        c.find(Locator::Id("pause"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until(
            &c,
            "the paused status",
            "document.querySelector('#binding-status [data-status=PAUSED]') && document.body.textContent.includes('waiting for ops')",
        )
        .await;
        shot(&c, "binding-paused").await;
        assert!(paused(&node, &root, "acme", &backup.id).await);

        // The other pages: definitions (any key), status (platform admin
        // only: refused for this tenant key).
        c.goto(&format!("{base}/definitions")).await.unwrap();
        until(
            &c,
            "the definitions",
            "document.body.textContent.includes('backup')",
        )
        .await;
        shot(&c, "definitions").await;
        c.close().await.expect("close browser");
        let admin = browse(&driver).await;
        admin.goto(&format!("{base}/sign-in")).await.unwrap();
        admin
            .find(Locator::Id("key"))
            .await
            .unwrap()
            .send_keys(&root)
            .await
            .unwrap();
        admin
            .find(Locator::Id("tenant"))
            .await
            .unwrap()
            .send_keys("acme")
            .await
            .unwrap();
        admin
            .find(Locator::Css("form.stack button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until(
            &admin,
            "signed in",
            "document.querySelector('#tenant-switch')",
        )
        .await;
        admin.goto(&format!("{base}/status")).await.unwrap();
        until(
            &admin,
            "the scheduler status",
            &format!("document.body.textContent.includes('{}')", node.node_id),
        )
        .await;
        shot(&admin, "status").await;
        admin.close().await.expect("close browser");
        node.stop().await;
    }
}
