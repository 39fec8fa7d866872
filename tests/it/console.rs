//! The web console (`src/console`, docs/console.md) over real HTTP against a
//! real node: sessions, roles, CSRF and tenant isolation of actions and
//! pages; the live log tail over Server-Sent Events and its resumption;
//! then one scenario in a real headless Chromium (`browser` below).

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
    let forged = format!("{}A", &token[..token.len() - 1]);
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
        o.post(&pause, &[("csrf", &token), ("note", "disk full")])
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
    // A platform admin sees the scheduler status.
    let admin = Browser::sign_in(console, &root, "acme").await;
    let (s, html) = admin.get("/status").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains(&node.node_id));
    node.stop().await;
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
    let b = define_and_bind(
        &node,
        "acme",
        sh_def(
            "ticker",
            "for i in 1 2 3 4 5 6 7 8; do echo line-$i; sleep 0.3; done",
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
    let want: Vec<String> = (1..=8).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, want);
    assert!(
        rest.iter()
            .any(|e| e.event == "state" && e.data.contains("SUCCEEDED")),
        "the final state comes through"
    );
    // The ended run's page shows it all without JavaScript.
    let (st, html) = s.get(&run_page).await;
    assert_eq!(st, StatusCode::OK);
    assert!(html.contains("line-8") && html.contains("data-state=\"SUCCEEDED\""));
    node.stop().await;
}
