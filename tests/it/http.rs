//! The `http` handler against a real HTTP/1.1 server on 127.0.0.1 (the
//! shared scripted receiver, `common::Receiver`): results,
//! retry classes, timeout, secrets in headers, and the SSRF guard. Names
//! resolve from the node's injected host table, so no DNS query is made,
//! and no packet leaves 127.0.0.0/8.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::common::*;
use sked::domain::HttpAllow;
use sked::executor::http::HttpSettings;
use sked::proto::v1 as pb;

const SECRET: &str = "s3cr3t-value-for-tests";

/// Node settings: `localhost` resolves from a table (no DNS), the secret
/// from a table (no process environment change), loopback allowed when
/// `allow_loopback`.
fn http_settings(allow_loopback: bool) -> HttpSettings {
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    HttpSettings {
        allow: if allow_loopback {
            HttpAllow::parse("127.0.0.0/8").unwrap()
        } else {
            HttpAllow::default()
        },
        hosts: Some(BTreeMap::from([("localhost".to_string(), vec![loopback])])),
        secrets: Some(BTreeMap::from([(
            "SKED_SECRET_HTTP_TEST".to_string(),
            SECRET.to_string(),
        )])),
    }
}

async fn start_node(db: &TestDb, allow_loopback: bool) -> TestNode {
    let mut s = settings(db, "http1");
    s.http = http_settings(allow_loopback);
    TestNode::start_with(s).await
}

fn http_def(name: &str, h: pb::HttpHandler, max_attempts: i32) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Http(h)),
        schedule: Some(manual()),
        params: sked::grpc::convert::json_to_struct(&serde_json::json!({"q": "x y", "n": 2})),
        retry_policy: Some(pb::RetryPolicy {
            max_attempts,
            initial_backoff: Some(dur(1000)),
            backoff_coefficient: 1.0,
            max_backoff: Some(dur(1000)),
        }),
        ..Default::default()
    }
}

fn handler(method: &str, url: String) -> pb::HttpHandler {
    pb::HttpHandler {
        method: method.into(),
        url,
        ..Default::default()
    }
}

fn result_json(r: &pb::Run) -> serde_json::Value {
    sked::grpc::convert::struct_to_json(r.result.as_ref().expect("a result"))
}

async fn run_once(
    node: &TestNode,
    tenant: &str,
    def: pb::TaskDefinition,
) -> (pb::Binding, pb::Run) {
    let b = define_and_bind(node, tenant, def).await;
    let run = trigger(node, tenant, &b.id).await;
    let run = wait_terminal(node, tenant, &run.id).await;
    (b, run)
}

#[tokio::test]
async fn a_2xx_succeeds_with_its_json_body_as_result_and_secrets_stay_out_of_logs() {
    let db = TestDb::new().await;
    let node = start_node(&db, true).await;
    let server = Receiver::start(vec![reply(200, r#"{"ok":true,"n":1}"#)]).await;
    let mut h = handler(
        "POST",
        format!("http://127.0.0.1:{}/hook?token=abc", server.addr.port()),
    );
    h.headers = [
        (
            "Authorization".to_string(),
            "Bearer ${env:SKED_SECRET_HTTP_TEST}".to_string(),
        ),
        ("X-Plain".to_string(), "plain".to_string()),
    ]
    .into();
    let (_, run) = run_once(&node, "acme", http_def("hook.post", h, 1)).await;
    assert_eq!(state(&run), pb::RunState::Succeeded, "{run:?}");
    assert_eq!(result_json(&run), serde_json::json!({"ok": true, "n": 1}));

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].target, "/hook?token=abc");
    let header = |k: &str| {
        seen[0]
            .headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("authorization"),
        Some(format!("Bearer {SECRET}")),
        "secret resolved on the node"
    );
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    let body: serde_json::Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"q": "x y", "n": 2}),
        "params are the body"
    );

    // The log has the summary, never the secret or the query.
    let events = tail_all(&node, "acme", &run.id, 0).await;
    let lines = log_lines(&events);
    let port = server.addr.port();
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("http: POST http://127.0.0.1:{port}/hook?…")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("http: 200 ")),
        "{lines:?}"
    );
    for l in &lines {
        assert!(
            !l.contains(SECRET) && !l.contains("token=abc"),
            "leak in {l:?}"
        );
    }
    // Stored as written: the reference, not the value.
    let def = node
        .definitions()
        .get_definition(as_tenant(
            "",
            pb::GetDefinitionRequest {
                name: "hook.post".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::task_definition::Handler::Http(stored)) = def.handler else {
        panic!("http handler")
    };
    assert_eq!(
        stored.headers["Authorization"],
        "Bearer ${env:SKED_SECRET_HTTP_TEST}"
    );
    assert_eq!(stored.method, "POST");

    // GET: params in the query; a non-JSON-object body kept as {"body"}.
    let text = Receiver::start(vec![reply(200, "hello")]).await;
    let h = handler("GET", format!("http://localhost:{}/get", text.addr.port()));
    let (_, run) = run_once(&node, "acme", http_def("hook.get", h, 1)).await;
    assert_eq!(state(&run), pb::RunState::Succeeded, "{run:?}");
    assert_eq!(result_json(&run), serde_json::json!({"body": "hello"}));
    let seen = text.seen();
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/get?n=2&q=x+y");
    assert!(seen[0].body.is_empty());
    node.stop().await;
}

#[tokio::test]
async fn a_503_is_retried_and_a_404_is_not() {
    let db = TestDb::new().await;
    let node = start_node(&db, true).await;
    let flaky = Receiver::start(vec![reply(503, "busy"), reply(200, r#"{"done":1}"#)]).await;
    let h = handler("PUT", format!("http://127.0.0.1:{}/x", flaky.addr.port()));
    let b = define_and_bind(&node, "acme", http_def("hook.flaky", h, 3)).await;
    trigger(&node, "acme", &b.id).await;
    let runs = runs_until(
        &node,
        "acme",
        &b.id,
        Duration::from_secs(20),
        "a retry that succeeds",
        |rs| rs.iter().any(|r| state(r) == pb::RunState::Succeeded),
    )
    .await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(state(&runs[0]), pb::RunState::Failed);
    assert_eq!(runs[0].reason, "HTTP 503 Service Unavailable");
    assert_eq!(runs[1].attempt, 2);
    assert_eq!(result_json(&runs[1]), serde_json::json!({"done": 1}));
    assert_eq!(flaky.seen().len(), 2);

    let missing = Receiver::start(vec![reply(404, "no such thing")]).await;
    let h = handler(
        "POST",
        format!("http://127.0.0.1:{}/gone", missing.addr.port()),
    );
    let (b, run) = run_once(&node, "acme", http_def("hook.gone", h, 3)).await;
    assert_eq!(state(&run), pb::RunState::Failed);
    assert_eq!(run.reason, "HTTP 404 Not Found");
    assert_eq!(run.error.as_ref().unwrap().summary, "no such thing");
    // Past the 1 s backoff a retry would have been created by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        runs_of(&node, "acme", &b.id).await.len(),
        1,
        "a 404 is not retried"
    );
    assert_eq!(missing.seen().len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn a_slow_server_times_out_at_the_smaller_timeout() {
    let db = TestDb::new().await;
    let node = start_node(&db, true).await;
    let slow = Receiver::start(vec![Reply {
        delay: Duration::from_secs(30),
        ..reply(200, "{}")
    }])
    .await;
    let mut h = handler(
        "POST",
        format!("http://127.0.0.1:{}/slow", slow.addr.port()),
    );
    h.timeout = Some(dur(1000));
    let mut def = http_def("hook.slow", h, 1);
    def.timeout = Some(dur(60_000));
    let started = std::time::Instant::now();
    let (_, run) = run_once(&node, "acme", def).await;
    assert_eq!(state(&run), pb::RunState::TimedOut, "{run:?}");
    assert_eq!(run.reason, "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the 1 s http timeout won"
    );
    node.stop().await;
}

#[tokio::test]
async fn cancel_aborts_the_request() {
    let db = TestDb::new().await;
    let node = start_node(&db, true).await;
    let slow = Receiver::start(vec![Reply {
        delay: Duration::from_secs(30),
        ..reply(200, "{}")
    }])
    .await;
    let h = handler(
        "POST",
        format!("http://127.0.0.1:{}/slow", slow.addr.port()),
    );
    let b = define_and_bind(&node, "acme", http_def("hook.cancel", h, 1)).await;
    let run = trigger(&node, "acme", &b.id).await;
    // Cancel once the request is in flight (the server has seen it).
    tokio::time::timeout(Duration::from_secs(10), async {
        while slow.seen().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the request reaches the server");
    let asked = std::time::Instant::now();
    node.runs()
        .cancel_run(as_tenant(
            "acme",
            pb::CancelRunRequest {
                run_id: run.id.clone(),
                reason: "operator".into(),
            },
        ))
        .await
        .expect("cancel");
    let run = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&run), pb::RunState::Cancelled, "{run:?}");
    assert_eq!(run.reason, "operator");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "aborted, not waited out"
    );
    node.stop().await;
}

#[tokio::test]
async fn loopback_targets_are_refused_without_the_allow_list() {
    let db = TestDb::new().await;
    let node = start_node(&db, false).await;
    let server = Receiver::start(vec![reply(200, "{}")]).await;
    let port = server.addr.port();
    for (i, url) in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
    ]
    .into_iter()
    .enumerate()
    {
        let (b, run) = run_once(
            &node,
            "acme",
            http_def(&format!("ssrf.{i}"), handler("GET", url.clone()), 3),
        )
        .await;
        assert_eq!(state(&run), pb::RunState::Failed, "{url}: {run:?}");
        assert_eq!(run.reason, "ssrf_blocked", "{url}");
        assert!(
            run.error.as_ref().unwrap().message.contains("loopback"),
            "{url}: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            runs_of(&node, "acme", &b.id).await.len(),
            1,
            "{url}: not retried"
        );
    }
    assert_eq!(server.connections(), 0, "no connection reached the server");
    assert!(server.seen().is_empty());
    node.stop().await;
}

#[tokio::test]
async fn bad_http_handlers_are_invalid_argument_naming_the_field() {
    let db = TestDb::new().await;
    let node = start_node(&db, true).await;
    let base = || handler("POST", "https://example.com/hook".into());
    let mut cases: Vec<(pb::HttpHandler, &str)> = Vec::new();
    let mut h = base();
    h.headers = [(
        "Authorization".to_string(),
        "${env:DATABASE_URL}".to_string(),
    )]
    .into();
    cases.push((h, "definition.http.headers[\"Authorization\"]"));
    let mut h = base();
    h.url = "ftp://example.com/".into();
    cases.push((h, "definition.http.url"));
    let mut h = base();
    h.method = "TRACE".into();
    cases.push((h, "definition.http.method"));
    let mut h = base();
    h.timeout = Some(dur(0));
    cases.push((h, "definition.http.timeout"));
    let mut h = base();
    h.timeout = Some(dur(3_601_000));
    cases.push((h, "definition.http.timeout"));
    for (i, (h, field)) in cases.into_iter().enumerate() {
        let err = create_definition(&node, http_def(&format!("bad.{i}"), h, 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(violation_fields(&err), vec![field.to_string()], "{err:?}");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_redirect_to_a_refused_address_is_blocked_on_its_hop() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "http1");
    // Only 127.0.0.1 is allowed; 127.0.0.2 (still loopback, so nothing
    // leaves the machine) is refused.
    s.http = http_settings(false);
    s.http.allow = HttpAllow::parse("127.0.0.1/32").unwrap();
    s.http.hosts = Some(BTreeMap::from([(
        "inner.test".to_string(),
        vec!["127.0.0.2".parse().unwrap()],
    )]));
    let node = TestNode::start_with(s).await;
    let inner = Receiver::start_on("127.0.0.2:0", vec![reply(200, "{}")]).await;
    let port = inner.addr.port();
    for (i, target) in [
        format!("http://127.0.0.2:{port}/"),
        format!("http://inner.test:{port}/"),
    ]
    .into_iter()
    .enumerate()
    {
        let outer = Receiver::start(vec![Reply {
            location: Some(target.clone()),
            ..reply(302, "")
        }])
        .await;
        let h = handler("GET", format!("http://127.0.0.1:{}/", outer.addr.port()));
        let (_, run) = run_once(&node, "acme", http_def(&format!("redirect.{i}"), h, 1)).await;
        assert_eq!(state(&run), pb::RunState::Failed, "{target}: {run:?}");
        assert_eq!(run.reason, "ssrf_blocked", "{target}: {run:?}");
        assert_eq!(outer.seen().len(), 1, "the first hop was allowed");
    }
    assert_eq!(inner.connections(), 0, "no hop reached the refused address");
    node.stop().await;
}
