//! Remote workers (`worker { queue }` handler, `sked.v1.WorkerService`):
//! runs executed by real worker processes (`examples/worker.rs`, built by
//! cargo here and run as children), lease loss and fencing, cancel to the
//! worker, slots, fairness and tenant isolation (in-process clients of the
//! generated API where the test must control each message).

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sked::proto::v1 as pb;
use sked::proto::v1::worker_service_client::WorkerServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::common::*;

/// Lease of the nodes here: runs of a lost worker end within 2 × this.
const LEASE: Duration = Duration::from_secs(2);

async fn node(db: &TestDb, id: &str) -> TestNode {
    let mut s = settings(db, id);
    s.lease = LEASE;
    s.kill_grace = Duration::from_secs(2);
    TestNode::start_with(s).await
}

fn worker_def(name: &str, queue: &str, max_attempts: i32) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Worker(pb::WorkerHandler {
            queue: queue.into(),
            schedule_to_start_timeout: None,
        })),
        schedule: Some(manual()),
        overlap_policy: pb::OverlapPolicy::Allow as i32,
        retry_policy: Some(pb::RetryPolicy {
            max_attempts,
            initial_backoff: Some(dur(100)),
            backoff_coefficient: 1.0,
            max_backoff: Some(dur(100)),
        }),
        ..Default::default()
    }
}

async fn trigger_with(
    node: &TestNode,
    tenant: &str,
    binding: &str,
    params: serde_json::Value,
) -> pb::Run {
    node.runs()
        .trigger_run(as_tenant(
            tenant,
            pb::TriggerRunRequest {
                binding_id: binding.into(),
                params: sked::grpc::convert::json_to_struct(&params),
                ..Default::default()
            },
        ))
        .await
        .expect("trigger")
        .into_inner()
}

/// The example worker, built once per test process.
fn example_path() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.args(["build", "--example", "worker"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            // The variables cargo sets for a test run (OUT_DIR, CARGO_PKG_…)
            // would change build scripts' inputs and rebuild dependencies
            // on every run: build as a plain `cargo build` does.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().into_owned();
                if k == "OUT_DIR"
                    || (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR")
                {
                    cmd.env_remove(k);
                }
            }
            let ok = cmd.status().expect("run cargo build --example worker");
            assert!(ok.success(), "cargo build --example worker failed");
            let exe = std::env::current_exe().expect("test exe");
            // target/debug/deps/it-… → target/debug/examples/worker
            exe.parent()
                .and_then(|p| p.parent())
                .expect("target dir")
                .join("examples")
                .join("worker")
        })
        .clone()
}

/// A worker process and the lines it printed.
struct Worker {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Worker {
    fn spawn(node: &TestNode, tenant: &str, queue: &str, name: &str, slots: u32) -> Worker {
        let mut child = Command::new(example_path())
            .env("SKED_ADDR", format!("http://{}", node.addr))
            .env("SKED_TENANT", tenant)
            .env("SKED_QUEUE", queue)
            .env("SKED_WORKER_NAME", name)
            .env("SKED_SLOTS", slots.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(out).lines();
            while let Ok(Some(l)) = r.next_line().await {
                let _ = tx.send(l);
            }
        });
        Worker { child, lines }
    }

    /// The next line starting with `prefix`, within `within`.
    async fn next(&mut self, prefix: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.lines.recv()).await {
                Ok(Some(l)) if l.starts_with(prefix) => return l,
                Ok(Some(_)) => continue,
                _ => panic!("no {prefix:?} line from the worker within {within:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_worker_runs_a_binding_and_its_result_is_stored() {
    let db = TestDb::new().await;
    let node = node(&db, "w1").await;
    let b = define_and_bind(&node, "acme", worker_def("w.basic", "basic", 1)).await;
    let mut w = Worker::spawn(&node, "acme", "basic", "w-basic", 1);
    let run = trigger_with(&node, "acme", &b.id, serde_json::json!({"n": 7})).await;
    let line = w.next("assigned", Duration::from_secs(20)).await;
    assert!(line.contains(&run.id), "{line}");
    assert!(
        line.contains(r#""n":7"#),
        "the worker saw the params: {line}"
    );
    let done = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{done:?}");
    let result = sked::grpc::convert::struct_to_json(done.result.as_ref().expect("result"));
    assert_eq!(result, serde_json::json!({"ok": true, "worker": "w-basic"}));
    node.stop().await;
}

#[tokio::test]
async fn a_killed_worker_loses_its_run_which_is_retried_on_another_and_its_late_complete_is_refused()
 {
    let db = TestDb::new().await;
    let node = node(&db, "w2").await;
    let b = define_and_bind(&node, "acme", worker_def("w.kill", "kill", 2)).await;
    let mut a = Worker::spawn(&node, "acme", "kill", "w-a", 1);
    let run = trigger_with(&node, "acme", &b.id, serde_json::json!({"sleep_ms": 60000})).await;
    let line = a.next("assigned", Duration::from_secs(20)).await;
    let old_token = line.split(' ').nth(2).expect("token").to_string();
    // kill -9 mid-run.
    a.child.start_kill().expect("kill");
    let _ = a.child.wait().await;
    let killed = Instant::now();
    let ended = wait_terminal(&node, "acme", &run.id).await;
    let took = killed.elapsed();
    assert_eq!(state(&ended), pb::RunState::Failed, "{ended:?}");
    assert_eq!(ended.reason, "worker_lost");
    // The reaper passes every lease / 4, so allow one pass on top.
    assert!(
        took <= 2 * LEASE + LEASE / 2,
        "ended {took:?} after the kill; lease {LEASE:?}"
    );
    // The retry runs on another worker.
    let mut b_worker = Worker::spawn(&node, "acme", "kill", "w-b", 1);
    let line = b_worker.next("assigned", Duration::from_secs(20)).await;
    let retry_id = line.split(' ').nth(1).expect("run id").to_string();
    assert_ne!(retry_id, run.id);
    let retry = get_run(&node, "acme", &retry_id).await;
    assert_eq!(retry.attempt, 2);
    // The killed worker's late CompleteRun (simulated) changes nothing.
    let err = WorkerServiceClient::new(node.channel.clone())
        .complete_run(as_tenant(
            "acme",
            pb::CompleteRunRequest {
                lease_token: old_token,
                result: None,
            },
        ))
        .await
        .expect_err("a lost lease is refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let again = get_run(&node, "acme", &run.id).await;
    assert_eq!(state(&again), pb::RunState::Failed);
    assert_eq!(again.reason, "worker_lost");
    node.stop().await;
}

#[tokio::test]
async fn cancel_run_reaches_the_worker_within_a_second() {
    let db = TestDb::new().await;
    let node = node(&db, "w3").await;
    let b = define_and_bind(&node, "acme", worker_def("w.cancel", "cancel", 3)).await;
    let mut w = Worker::spawn(&node, "acme", "cancel", "w-c", 1);
    let run = trigger_with(&node, "acme", &b.id, serde_json::json!({"sleep_ms": 60000})).await;
    w.next("assigned", Duration::from_secs(20)).await;
    let asked = Instant::now();
    node.runs()
        .cancel_run(as_tenant(
            "acme",
            pb::CancelRunRequest {
                run_id: run.id.clone(),
                reason: "enough".into(),
            },
        ))
        .await
        .expect("cancel");
    let line = w.next("cancel", Duration::from_secs(1)).await;
    assert!(asked.elapsed() <= Duration::from_secs(1));
    assert_eq!(line, format!("cancel {} enough", run.id));
    let ended = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&ended), pb::RunState::Cancelled, "{ended:?}");
    assert_eq!(ended.reason, "enough");
    // Not retried although attempts are left.
    let runs = runs_of(&node, "acme", &b.id).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    node.stop().await;
}

/// An in-process worker stream: the test sends and reads each message.
struct Stream {
    tx: mpsc::Sender<pb::WorkerRequest>,
    rx: tonic::Streaming<pb::WorkerResponse>,
}

impl Stream {
    async fn open(node: &TestNode, tenant: &str, queue: &str, name: &str, slots: u32) -> Stream {
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::WorkerRequest {
            hello: Some(pb::Hello {
                queue: queue.into(),
                worker_name: name.into(),
                slots,
                lease_tokens: vec![],
            }),
            ..Default::default()
        })
        .await
        .expect("hello");
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if !tenant.is_empty() {
            req.metadata_mut()
                .insert("x-tenant-id", tenant.parse().expect("header"));
        }
        let rx = WorkerServiceClient::new(node.channel.clone())
            .work(req)
            .await
            .expect("work")
            .into_inner();
        Stream { tx, rx }
    }

    /// The next Assigned within `within`, or `None`.
    async fn assigned(&mut self, within: Duration) -> Option<pb::Assigned> {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.message()).await {
                Ok(Ok(Some(pb::WorkerResponse {
                    kind: Some(pb::worker_response::Kind::Assigned(a)),
                }))) => return Some(a),
                Ok(Ok(Some(_))) => continue,
                Ok(other) => panic!("stream ended: {other:?}"),
                Err(_) => return None,
            }
        }
    }

    async fn complete(&self, token: &str) {
        self.tx
            .send(pb::WorkerRequest {
                completes: vec![pb::Complete {
                    lease_token: token.into(),
                    result: None,
                }],
                ..Default::default()
            })
            .await
            .expect("send complete");
    }
}

#[tokio::test]
async fn a_worker_with_two_slots_never_holds_three_runs() {
    let db = TestDb::new().await;
    let node = node(&db, "w4").await;
    let b = define_and_bind(&node, "acme", worker_def("w.slots", "slots", 1)).await;
    let mut s = Stream::open(&node, "acme", "slots", "w-s", 2).await;
    for _ in 0..5 {
        trigger_with(&node, "acme", &b.id, serde_json::json!({})).await;
    }
    let first = s.assigned(Duration::from_secs(10)).await.expect("first");
    let second = s.assigned(Duration::from_secs(10)).await.expect("second");
    assert!(
        s.assigned(Duration::from_millis(1500)).await.is_none(),
        "a third run was pushed while two were unfinished"
    );
    s.complete(&first.lease_token).await;
    let third = s
        .assigned(Duration::from_secs(5))
        .await
        .expect("a slot freed: the next run comes");
    assert!(
        s.assigned(Duration::from_millis(1000)).await.is_none(),
        "still two at most"
    );
    s.complete(&second.lease_token).await;
    s.complete(&third.lease_token).await;
    assert!(s.assigned(Duration::from_secs(5)).await.is_some());
    node.stop().await;
}

#[tokio::test]
async fn two_workers_share_a_queue_fairly() {
    let db = TestDb::new().await;
    let node = node(&db, "w5").await;
    let b = define_and_bind(&node, "acme", worker_def("w.fair", "fair", 1)).await;
    let total = 1000;
    let mut counts = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<&'static str>();
    for name in ["one", "two"] {
        let mut s = Stream::open(&node, "acme", "fair", name, 4).await;
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            while let Some(a) = s.assigned(Duration::from_secs(60)).await {
                // Equal workers: the same small amount of work each.
                tokio::time::sleep(Duration::from_millis(5)).await;
                s.complete(&a.lease_token).await;
                if done_tx.send(name).is_err() {
                    return;
                }
            }
        });
    }
    for _ in 0..total {
        trigger_with(&node, "acme", &b.id, serde_json::json!({})).await;
    }
    for _ in 0..total {
        let name = tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
            .await
            .expect("runs keep completing")
            .expect("workers alive");
        *counts.entry(name).or_insert(0usize) += 1;
    }
    for name in ["one", "two"] {
        let n = counts.get(name).copied().unwrap_or(0);
        let share = n as f64 / total as f64;
        assert!(
            (0.4..=0.6).contains(&share),
            "worker {name} got {n} of {total}: {counts:?}"
        );
    }
    node.stop().await;
}

/// The runs one claim of `slots` deals to a new stream on `queue` (of every
/// tenant), counted per tenant; the runs stay held.
async fn one_claim(node: &TestNode, queue: &str, slots: u32) -> HashMap<String, usize> {
    let mut s = Stream::open(node, "", queue, "w-pick", slots).await;
    let mut got: HashMap<String, usize> = HashMap::new();
    for _ in 0..slots {
        let a = s
            .assigned(Duration::from_secs(20))
            .await
            .expect("every slot is filled");
        *got.entry(a.tenant_id).or_default() += 1;
    }
    assert!(
        s.assigned(Duration::from_millis(300)).await.is_none(),
        "no more than the slots"
    );
    got
}

/// A claim reads only about `limit / tenants` + 1 of each tenant's runs
/// first; a tenant whose last read run it picks is read on (db::runs::
/// run_claim). The pick is the one a full read gives: priority first, then
/// the tenants' turns, a tenant with few runs leaving its turns to others.
#[tokio::test]
async fn a_claim_of_many_slots_picks_by_priority_and_turn_as_if_it_read_every_run() {
    let db = TestDb::new().await;
    let node = node(&db, "w-pick").await;
    let mut hi = worker_def("w.pick.hi", "pick", 1);
    hi.priority = 5;
    let hi = define_and_bind(&node, "hi", hi).await;
    let lo = define_and_bind(&node, "lo1", worker_def("w.pick.lo", "pick", 1)).await;
    let mut lo_bindings = vec![("lo1", lo.id.clone(), 2)];
    for t in ["lo2", "lo3", "lo4"] {
        lo_bindings.push((t, bind_existing(&node, t, "w.pick.lo").await.id, 40));
    }
    for _ in 0..30 {
        trigger_with(&node, "hi", &hi.id, serde_json::json!({})).await;
    }
    for (t, b, n) in &lo_bindings {
        for _ in 0..*n {
            trigger_with(&node, t, b, serde_json::json!({})).await;
        }
    }
    // 60 slots over 5 tenants: 13 of each read first; all of hi's 30
    // (priority 5) come first, so its 13th is picked and it is read on.
    let got = one_claim(&node, "pick", 60).await;
    assert_eq!(got.get("hi"), Some(&30), "{got:?}");
    assert_eq!(got.get("lo1"), Some(&2), "{got:?}");
    let mut rest: Vec<usize> = ["lo2", "lo3", "lo4"]
        .iter()
        .map(|t| got.get(*t).copied().unwrap_or(0))
        .collect();
    rest.sort_unstable();
    assert_eq!(rest, vec![9, 9, 10], "turns shared evenly: {got:?}");

    // Equal priority, one deep backlog among shallow ones: the deep one
    // takes every slot the others leave.
    let deep = define_and_bind(&node, "deep", worker_def("w.pick.even", "even", 1)).await;
    for _ in 0..100 {
        trigger_with(&node, "deep", &deep.id, serde_json::json!({})).await;
    }
    for t in ["s1", "s2", "s3", "s4"] {
        let b = bind_existing(&node, t, "w.pick.even").await;
        trigger_with(&node, t, &b.id, serde_json::json!({})).await;
    }
    let got = one_claim(&node, "even", 60).await;
    assert_eq!(got.get("deep"), Some(&56), "{got:?}");
    for t in ["s1", "s2", "s3", "s4"] {
        assert_eq!(got.get(t), Some(&1), "{got:?}");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_tenant_worker_never_receives_another_tenants_runs() {
    let db = TestDb::new().await;
    let node = node(&db, "w6").await;
    let def = worker_def("w.tenants", "shared", 1);
    let ba = define_and_bind(&node, "tenant-a", def).await;
    let bb = bind_existing(&node, "tenant-b", "w.tenants").await;
    let mut s = Stream::open(&node, "tenant-a", "shared", "w-a", 10).await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(
            trigger_with(&node, "tenant-b", &bb.id, serde_json::json!({}))
                .await
                .id,
        );
        trigger_with(&node, "tenant-a", &ba.id, serde_json::json!({})).await;
    }
    let mut got = 0;
    while let Some(a) = s.assigned(Duration::from_secs(3)).await {
        assert_eq!(a.tenant_id, "tenant-a", "{a:?}");
        assert!(!mine.contains(&a.run_id));
        got += 1;
    }
    assert_eq!(got, 3, "tenant A's runs all came");
    for id in &mine {
        let r = get_run(&node, "tenant-b", id).await;
        assert_eq!(
            state(&r),
            pb::RunState::Queued,
            "B's run waits for B's worker"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn a_reconnecting_worker_keeps_its_valid_leases() {
    let db = TestDb::new().await;
    let node = node(&db, "w7").await;
    let b = define_and_bind(&node, "acme", worker_def("w.reconnect", "re", 1)).await;
    let mut first = Stream::open(&node, "acme", "re", "w-r", 1).await;
    let run = trigger_with(&node, "acme", &b.id, serde_json::json!({})).await;
    let a = first
        .assigned(Duration::from_secs(10))
        .await
        .expect("assigned");
    assert_eq!(a.run_id, run.id);
    // The stream drops; the worker comes back within the lease.
    drop(first);
    tokio::time::sleep(LEASE / 2).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::WorkerRequest {
        hello: Some(pb::Hello {
            queue: "re".into(),
            worker_name: "w-r".into(),
            slots: 1,
            lease_tokens: vec![a.lease_token.clone(), uuid::Uuid::new_v4().to_string()],
        }),
        ..Default::default()
    })
    .await
    .expect("hello");
    let mut rx = WorkerServiceClient::new(node.channel.clone())
        .work(as_tenant("acme", ReceiverStream::new(rx)))
        .await
        .expect("work")
        .into_inner();
    // The unknown token is answered FAILED_PRECONDITION at once.
    match rx.message().await.expect("message") {
        Some(pb::WorkerResponse {
            kind: Some(pb::worker_response::Kind::Ack(ack)),
        }) => assert_eq!(ack.code, tonic::Code::FailedPrecondition as i32),
        other => panic!("expected an ack: {other:?}"),
    }
    // Kept: the stream renews it, so it outlives 2 × lease.
    tokio::time::sleep(LEASE * 2 + LEASE / 2).await;
    assert_eq!(
        state(&get_run(&node, "acme", &run.id).await),
        pb::RunState::Running
    );
    tx.send(pb::WorkerRequest {
        completes: vec![pb::Complete {
            lease_token: a.lease_token.clone(),
            result: None,
        }],
        ..Default::default()
    })
    .await
    .expect("complete");
    match rx.message().await.expect("message") {
        Some(pb::WorkerResponse {
            kind: Some(pb::worker_response::Kind::Ack(ack)),
        }) => assert_eq!(ack.code, 0, "{ack:?}"),
        other => panic!("expected an ack: {other:?}"),
    }
    assert_eq!(
        state(&get_run(&node, "acme", &run.id).await),
        pb::RunState::Succeeded
    );
    node.stop().await;
}

#[tokio::test]
async fn a_run_no_worker_takes_ends_failed_no_worker() {
    let db = TestDb::new().await;
    let node = node(&db, "w8").await;
    let mut def = worker_def("w.nobody", "nobody", 1);
    if let Some(pb::task_definition::Handler::Worker(w)) = &mut def.handler {
        w.schedule_to_start_timeout = Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        });
    }
    let b = define_and_bind(&node, "acme", def).await;
    let run = trigger_with(&node, "acme", &b.id, serde_json::json!({})).await;
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        wait_terminal(&node, "acme", &run.id),
    )
    .await
    .expect("ended in time");
    assert_eq!(state(&ended), pb::RunState::Failed, "{ended:?}");
    assert_eq!(ended.reason, "no_worker");
    node.stop().await;
}

#[tokio::test]
async fn a_workers_log_lines_appear_in_tail_run_in_order_and_need_a_valid_lease() {
    let db = TestDb::new().await;
    let node = node(&db, "w9").await;
    let b = define_and_bind(&node, "acme", worker_def("w.logs", "logs", 1)).await;
    let mut s = Stream::open(&node, "acme", "logs", "w-l", 1).await;
    let run = trigger_with(&node, "acme", &b.id, serde_json::json!({})).await;
    let a = s.assigned(Duration::from_secs(10)).await.expect("assigned");
    let msgs: Vec<pb::AppendLogsRequest> = (0..3)
        .map(|i| pb::AppendLogsRequest {
            lease_token: a.lease_token.clone(),
            lines: vec![pb::WorkerLogLine {
                message: format!("line {i}"),
                stderr: i == 2,
            }],
        })
        .collect();
    let got = WorkerServiceClient::new(node.channel.clone())
        .append_logs(as_tenant("acme", tokio_stream::iter(msgs.clone())))
        .await
        .expect("append")
        .into_inner();
    assert_eq!(got.appended, 3);
    s.complete(&a.lease_token).await;
    let done = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded);
    let events = tail_all(&node, "acme", &run.id, 0).await;
    assert_eq!(log_lines(&events), ["line 0", "line 1", "line 2"]);
    // After the run ended the lease is void: nothing more is stored.
    let err = WorkerServiceClient::new(node.channel.clone())
        .append_logs(as_tenant("acme", tokio_stream::iter(msgs)))
        .await
        .expect_err("a lost lease is refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let after = tail_all(&node, "acme", &run.id, 0).await;
    assert_eq!(after.len(), events.len());
    node.stop().await;
}

#[tokio::test]
async fn progress_reports_are_stored_checked_and_fenced() {
    let db = TestDb::new().await;
    let node = node(&db, "w10").await;
    let b = define_and_bind(&node, "acme", worker_def("w.progress", "progress", 1)).await;
    let mut s = Stream::open(&node, "acme", "progress", "w-p", 1).await;
    let run = trigger_with(&node, "acme", &b.id, serde_json::json!({})).await;
    let a = s.assigned(Duration::from_secs(10)).await.expect("assigned");
    let report = |percent: f64| pb::ReportProgressRequest {
        lease_token: a.lease_token.clone(),
        percent,
        current_step: 1,
        total_steps: 2,
        message: "halfway".into(),
    };
    let mut client = WorkerServiceClient::new(node.channel.clone());
    client
        .report_progress(as_tenant("acme", report(50.0)))
        .await
        .expect("a valid report");
    let err = client
        .report_progress(as_tenant("acme", report(150.0)))
        .await
        .expect_err("percent out of range");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Stored like a command's `::progress`: Run.progress holds the latest,
    // and the event is in the run's stream.
    let got = node
        .runs()
        .get_run(as_tenant(
            "acme",
            pb::GetRunRequest {
                run_id: run.id.clone(),
            },
        ))
        .await
        .expect("get run")
        .into_inner();
    let p = got.progress.expect("Run.progress after a report");
    assert_eq!((p.percent, p.current_step, p.total_steps), (50.0, 1, 2));
    assert_eq!(p.message, "halfway");
    s.complete(&a.lease_token).await;
    wait_terminal(&node, "acme", &run.id).await;
    let events = tail_all(&node, "acme", &run.id, 0).await;
    let reported: Vec<f64> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::run_event::Kind::Progress(p)) => Some(p.percent),
            _ => None,
        })
        .collect();
    assert_eq!(reported, [50.0], "one progress event, the valid one");
    let err = client
        .report_progress(as_tenant("acme", report(60.0)))
        .await
        .expect_err("the lease ended with the run");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    node.stop().await;
}

/// Completions sent together end together (one transaction), each fenced on
/// its own: a lost lease among them is refused alone, in order.
#[tokio::test]
async fn a_batch_of_completions_ends_its_runs_and_refuses_only_the_lost_lease() {
    let db = TestDb::new().await;
    let node = node(&db, "w11").await;
    let b = define_and_bind(&node, "acme", worker_def("w.batch", "batch", 1)).await;
    let mut s = Stream::open(&node, "acme", "batch", "w-b", 3).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            trigger_with(&node, "acme", &b.id, serde_json::json!({}))
                .await
                .id,
        );
    }
    let mut tokens = Vec::new();
    while tokens.len() < 3 {
        let a = s.assigned(Duration::from_secs(10)).await.expect("assigned");
        tokens.push(a.lease_token);
    }
    let lost = uuid::Uuid::now_v7().to_string();
    let mut batch: Vec<String> = tokens.clone();
    batch.insert(1, lost.clone());
    let acks = complete_all(&mut s, &batch).await;
    let expected: Vec<(String, i32)> = batch
        .iter()
        .map(|t| (t.clone(), if *t == lost { 9 } else { 0 }))
        .collect();
    assert_eq!(acks, expected, "one ack per item, in order");
    for id in &ids {
        let r = wait_terminal(&node, "acme", id).await;
        assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
    }
    node.stop().await;
}

/// A completion announces a wake-up of the worker dispatches when a run
/// may have waited for it: here, one of a tenant whose concurrency quota
/// holds it back (the dispatch no longer claims on every freed slot, so
/// without that NOTIFY the run would wait for the poll). A tenant without
/// a quota, whose bindings allow overlap, has nothing to announce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_wakes_the_dispatch_only_when_a_quota_or_overlap_may_hold_a_run() {
    let db = TestDb::new().await;
    let node = node(&db, "w14").await;
    node.admin()
        .set_tenant_quota(pb::SetTenantQuotaRequest {
            quota: Some(pb::TenantQuota {
                tenant_id: "capped".into(),
                max_concurrent_runs: Some(1),
                ..Default::default()
            }),
        })
        .await
        .expect("set quota");
    let mut listener = sqlx::postgres::PgListener::connect(&db.url)
        .await
        .expect("listener");
    listener.listen("sked_runs").await.expect("listen");
    for (tenant, wakes) in [("capped", 1), ("free", 0)] {
        let b = define_and_bind(&node, tenant, worker_def(&format!("w.{tenant}"), tenant, 1)).await;
        let mut s = Stream::open(&node, tenant, tenant, "w", 4).await;
        let first = trigger_with(&node, tenant, &b.id, serde_json::json!({})).await;
        let second = trigger_with(&node, tenant, &b.id, serde_json::json!({})).await;
        let a = s.assigned(Duration::from_secs(10)).await.expect("assigned");
        assert_eq!(a.run_id, first.id);
        if tenant == "capped" {
            assert!(
                s.assigned(Duration::from_millis(300)).await.is_none(),
                "the quota holds the second run back"
            );
        } else {
            let b2 = s.assigned(Duration::from_secs(10)).await.expect("assigned");
            assert_eq!(b2.run_id, second.id);
            complete_all(&mut s, &[b2.lease_token]).await;
        }
        // The triggers' notifications, then the completion's alone.
        while tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_ok()
        {}
        let acks = complete_all(&mut s, &[a.lease_token]).await;
        assert_eq!(acks[0].1, 0, "{acks:?}");
        // The capped tenant's wake-up may come late on a loaded machine:
        // waited for (up to WAIT); then, as for the other tenant, whatever
        // else arrives within 500 ms.
        let mut payloads = Vec::new();
        if wakes > 0 {
            let n = tokio::time::timeout(WAIT, listener.recv())
                .await
                .expect("the completion's notification");
            payloads.push(n.expect("notification").payload().to_string());
        }
        while let Ok(n) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
            payloads.push(n.expect("notification").payload().to_string());
        }
        assert_eq!(
            payloads.iter().filter(|p| p.as_str() == "worker").count(),
            wakes,
            "{tenant}: {payloads:?}"
        );
        if tenant == "capped" {
            let next = s.assigned(Duration::from_secs(10)).await.expect("assigned");
            assert_eq!(next.run_id, second.id);
            complete_all(&mut s, &[next.lease_token]).await;
        }
        for id in [&first.id, &second.id] {
            let r = wait_terminal(&node, tenant, id).await;
            assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
        }
    }
    node.stop().await;
}

/// Sends one message completing `tokens` on `s` and returns the acks'
/// (token, code) in order.
async fn complete_all(s: &mut Stream, tokens: &[String]) -> Vec<(String, i32)> {
    s.tx.send(pb::WorkerRequest {
        completes: tokens
            .iter()
            .map(|t| pb::Complete {
                lease_token: t.clone(),
                result: None,
            })
            .collect(),
        ..Default::default()
    })
    .await
    .expect("send completions");
    let mut acks = Vec::new();
    while acks.len() < tokens.len() {
        match tokio::time::timeout(Duration::from_secs(10), s.rx.message()).await {
            Ok(Ok(Some(pb::WorkerResponse {
                kind: Some(pb::worker_response::Kind::Ack(a)),
            }))) => acks.push((a.lease_token, a.code)),
            Ok(Ok(Some(_))) => continue,
            other => panic!("no ack: {other:?}"),
        }
    }
    acks
}

/// Each completion is fenced by the tenant of the stream that sends it: a
/// tenant's worker that names another tenant's lease tokens (sent at the
/// same time as the owner's completions of the same runs) is refused them,
/// and the owner's go through. A lock held by the test makes all of them
/// wait on a first completion and reach the database together.
#[tokio::test]
async fn a_worker_naming_another_tenants_lease_tokens_is_refused_them_and_the_owners_complete() {
    let db = TestDb::new().await;
    let node = node(&db, "w-mix").await;
    let def = worker_def("w.mix", "mix", 1);
    let ba = define_and_bind(&node, "ta", def).await;
    let bb = bind_existing(&node, "tb", "w.mix").await;
    let bc = bind_existing(&node, "tc", "w.mix").await;
    let mut a = Stream::open(&node, "ta", "mix", "w-a", 5).await;
    let mut b = Stream::open(&node, "tb", "mix", "w-b", 5).await;
    let mut c = Stream::open(&node, "tc", "mix", "w-c", 1).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push((
            "ta",
            trigger_with(&node, "ta", &ba.id, serde_json::json!({}))
                .await
                .id,
        ));
        ids.push((
            "tb",
            trigger_with(&node, "tb", &bb.id, serde_json::json!({}))
                .await
                .id,
        ));
    }
    ids.push((
        "tc",
        trigger_with(&node, "tc", &bc.id, serde_json::json!({}))
            .await
            .id,
    ));
    let mut tokens: HashMap<&str, Vec<String>> = HashMap::new();
    for (tenant, s, n) in [("ta", &mut a, 5), ("tb", &mut b, 5), ("tc", &mut c, 1)] {
        while tokens.get(tenant).map_or(0, Vec::len) < n {
            let x = s.assigned(Duration::from_secs(10)).await.expect("assigned");
            assert_eq!(x.tenant_id, tenant);
            tokens.entry(tenant).or_default().push(x.lease_token);
        }
    }
    // Completions wait on this lock until all of them were sent.
    let pool = db.pool().await;
    let mut hold = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE binding_status IN SHARE MODE")
        .execute(&mut *hold)
        .await
        .expect("lock");
    let c_tokens = tokens["tc"].clone();
    let c_acks = tokio::spawn(async move { complete_all(&mut c, &c_tokens).await });
    // A names its own tokens and B's; B names its own.
    let mut a_batch = tokens["ta"].clone();
    a_batch.extend(tokens["tb"].iter().cloned());
    let b_batch = tokens["tb"].clone();
    let a_acks = tokio::spawn({
        let a_batch = a_batch.clone();
        async move { complete_all(&mut a, &a_batch).await }
    });
    let b_acks = tokio::spawn(async move { complete_all(&mut b, &b_batch).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold.commit().await.expect("release");

    let c_acks = c_acks.await.expect("c");
    assert!(c_acks.iter().all(|(_, code)| *code == 0), "{c_acks:?}");
    let a_want: Vec<(String, i32)> = a_batch
        .iter()
        .map(|t| (t.clone(), if tokens["ta"].contains(t) { 0 } else { 9 }))
        .collect();
    assert_eq!(
        a_acks.await.expect("a"),
        a_want,
        "ta's own ok, tb's refused"
    );
    let b_want: Vec<(String, i32)> = tokens["tb"].iter().map(|t| (t.clone(), 0)).collect();
    assert_eq!(b_acks.await.expect("b"), b_want, "tb's all ok");
    for (tenant, id) in &ids {
        let r = wait_terminal(&node, tenant, id).await;
        assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
    }
    node.stop().await;
}

/// A binding of tenant "acme" to a worker definition of `queue` (an
/// every-second schedule), and about `n` of its runs backfilled over the
/// past that wait QUEUED (their schedule-to-start timeout is a day and no
/// worker takes the queue here). Returns the backfilled run ids.
async fn worker_backlog(node: &TestNode, queue: &str, n: i64) -> Vec<String> {
    worker_backlog_ending(node, queue, n, 86_400, 61).await
}

/// [`worker_backlog`] with a schedule-to-start timeout of
/// `schedule_to_start` seconds, its fire times ending `ago` seconds before
/// now.
async fn worker_backlog_ending(
    node: &TestNode,
    queue: &str,
    n: i64,
    schedule_to_start: i64,
    ago: i64,
) -> Vec<String> {
    let mut def = worker_def(&format!("w.{queue}"), queue, 1);
    def.schedule = Some(every(1));
    if let Some(pb::task_definition::Handler::Worker(w)) = &mut def.handler {
        w.schedule_to_start_timeout = Some(prost_types::Duration {
            seconds: schedule_to_start,
            nanos: 0,
        });
    }
    let b = define_and_bind(node, "acme", def).await;
    let now = now_secs() as i64;
    node.runs()
        .backfill_runs(as_tenant(
            "acme",
            pb::BackfillRunsRequest {
                binding_id: b.id.clone(),
                start_time: Some(prost_types::Timestamp {
                    seconds: now - n - ago + 1,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: now - ago,
                    nanos: 0,
                }),
                dry_run: false,
            },
        ))
        .await
        .expect("backfill")
        .into_inner()
        .run_ids
}

/// Makes `conn`'s pending statistics visible to every connection: flushed
/// when its session goes idle after this call, before the call returns.
async fn flush_statistics(conn: &mut sqlx::PgConnection) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .expect("flush statistics");
}

/// Index tuples read through the claim indexes so far (PostgreSQL's
/// statistics; `conn` first flushes its own pending counts).
async fn claim_index_reads(conn: &mut sqlx::PgConnection) -> i64 {
    flush_statistics(conn).await;
    sqlx::query_scalar(
        "SELECT coalesce(sum(idx_tup_read), 0)::int8 FROM pg_stat_user_indexes
         WHERE indexrelname IN ('runs_claim_tenant', 'runs_claim_binding')",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("read statistics")
}

/// A deep backlog of one queue is not read by the claims of another queue,
/// nor by the claims of commands (the claim indexes split the runs by
/// queue): before, every command claim of the node read a tenant's whole
/// worker backlog while it held the lock every claim waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queues_backlog_is_not_read_by_the_claims_of_other_queues_or_of_commands() {
    const BACKLOG: i64 = 2000;
    let db = TestDb::new().await;
    let node = node(&db, "w13").await;
    let created = worker_backlog(&node, "deep", BACKLOG).await;
    assert!(created.len() as i64 >= BACKLOG - 1, "{}", created.len());
    // Only the claims below are counted: the node's own claims and
    // promotions stop, and its connections close (a backend reports what
    // it read up to a second late, and at the latest when it exits; on a
    // loaded machine the node's reads while the backlog was written
    // otherwise landed in the window).
    node.stop().await;

    let pool = db.pool().await;
    let mut conn = pool.acquire().await.expect("connection");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND backend_type = 'client backend'
               AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("read activity");
        if others == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{others} other connections stay open after the node stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let clock = sked::domain::Clock::system();
    let lease = chrono::Duration::seconds(30);
    // Each claim on a connection of its own, whose statistics are flushed
    // before it is released.
    let claim = |kind| {
        let clock = clock.clone();
        let pool = pool.clone();
        async move {
            let mut c = pool.acquire().await.expect("connection");
            let got = sked::db::runs::run_claim(&mut c, "probe", &clock, lease, 100, kind, &[])
                .await
                .expect("claim");
            flush_statistics(&mut c).await;
            got
        }
    };
    // Other claims: of commands, and of another queue. Each would have read
    // the whole backlog (BACKLOG index tuples); the node's own claims in the
    // meantime read a few tuples each.
    let before = claim_index_reads(&mut conn).await;
    for _ in 0..3 {
        assert!(claim(sked::db::runs::ClaimKind::ToExecute).await.is_empty());
        let other = sked::db::runs::ClaimKind::Worker {
            queue: "shallow".into(),
            tenant: None,
            worker_names: vec!["probe".into(); 10],
        };
        assert!(claim(other).await.is_empty());
    }
    let read = claim_index_reads(&mut conn).await - before;
    assert!(
        read < BACKLOG / 2,
        "6 claims of other queues read {read} index tuples past a backlog of {BACKLOG}"
    );
    // The backlog's own queue still gets its runs, in claim order.
    let deep = sked::db::runs::ClaimKind::Worker {
        queue: "deep".into(),
        tenant: None,
        worker_names: vec!["probe".into(); 10],
    };
    let got = claim(deep).await;
    assert_eq!(got.len(), 10, "the deep queue's claim");
    assert!(got.iter().all(|c| c.lease_token.is_some()));
}

/// A worker's complete and heartbeat read their own runs by lease token,
/// whatever the statistics say: after an `ANALYZE` taken while nothing ran
/// (as after a backfill), the partial indexes of RUNNING runs all looked
/// empty, and a batch of completions read every RUNNING run through another
/// of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_heartbeats_read_only_their_own_leases_whatever_the_statistics() {
    const HELD: usize = 1000;
    let db = TestDb::new().await;
    let node = node(&db, "w14").await;
    worker_backlog(&node, "held", HELD as i64 + 60).await;
    let pool = db.pool().await;
    let mut conn = pool.acquire().await.expect("connection");
    // Statistics of a moment when no run is RUNNING.
    sqlx::query("ANALYZE runs")
        .execute(&mut *conn)
        .await
        .expect("analyze");
    let clock = sked::domain::Clock::system();
    let claimed = sked::db::runs::run_claim(
        &mut conn,
        "probe",
        &clock,
        chrono::Duration::seconds(60),
        HELD as i64,
        sked::db::runs::ClaimKind::Worker {
            queue: "held".into(),
            tenant: None,
            worker_names: vec!["probe".into(); HELD],
        },
        &[],
    )
    .await
    .expect("claim");
    assert_eq!(claimed.len(), HELD);
    let tokens: Vec<uuid::Uuid> = claimed.iter().filter_map(|c| c.lease_token).collect();
    let (beat, done) = (&tokens[..20], &tokens[20..60]);

    use sqlx::Connection as _;
    let mut tx = conn.begin().await.expect("begin");
    sked::db::generic_plans(&mut tx)
        .await
        .expect("generic plans");
    let renewed = sked::db::runs::run_worker_heartbeat(
        &mut *tx,
        beat,
        None,
        chrono::Utc::now() + chrono::Duration::seconds(60),
    )
    .await
    .expect("heartbeat");
    let (completed, _) = sked::db::runs::run_complete_by_leases(
        &mut tx,
        done,
        &vec![None; done.len()],
        None,
        chrono::Utc::now(),
    )
    .await
    .expect("complete");
    // Index tuples this transaction read through the other partial indexes
    // of RUNNING runs (PostgreSQL's counts of the transaction so far).
    let read: i64 = sqlx::query_scalar(
        "SELECT (pg_stat_get_xact_tuples_returned('runs_running_tenant'::regclass)
                 + pg_stat_get_xact_tuples_returned('runs_lease'::regclass))::int8",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("read statistics");
    tx.commit().await.expect("commit");
    assert_eq!(renewed.len(), beat.len());
    assert_eq!(completed.len(), done.len());
    assert!(
        read < HELD as i64 / 2,
        "a heartbeat of {} and a completion of {} leases read {read} other RUNNING runs of {HELD}",
        beat.len(),
        done.len()
    );
    // A completed lease is no longer found.
    assert!(
        sked::db::runs::run_by_lease(&pool, done[0])
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        sked::db::runs::run_by_lease(&pool, beat[0])
            .await
            .expect("read")
            .is_some()
    );
    node.stop().await;
}

/// A backlog of worker runs still within their schedule-to-start timeout
/// costs the reaper nothing: its read is keyed by each run's deadline
/// (`sked_start_deadline` on `runs_queued_worker`), so it reads only runs
/// past theirs, earliest first. Before, every reap of every node read the
/// whole worker backlog to end none of it. A backfill of fire times older
/// than the timeout counts from its creation, not from its fire times
/// (before, its runs ended `no_worker` at the first reap). The deadline's
/// default in SQL is the domain's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_reads_only_worker_runs_past_their_schedule_to_start_deadline() {
    const BACKLOG: i64 = 1500;
    const LATE: i64 = 50;
    let db = TestDb::new().await;
    let node = node(&db, "w15").await;
    let t0 = chrono::Utc::now();
    let created = worker_backlog(&node, "patient", BACKLOG).await;
    assert!(created.len() as i64 >= BACKLOG - 1, "{}", created.len());
    // Fire times an hour ago, a 2-minute timeout: due long before they
    // were created.
    let late = worker_backlog_ending(&node, "late", LATE, 120, 3600).await;
    assert!(late.len() as i64 >= LATE - 1, "{}", late.len());
    let pool = db.pool().await;
    let mut conn = pool.acquire().await.expect("connection");

    let t = chrono::DateTime::parse_from_rfc3339("2026-03-29T00:30:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let deadline = |created: chrono::DateTime<chrono::Utc>, handler: serde_json::Value| {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT sked_start_deadline($1, $2, $3)",
        )
        .bind(t)
        .bind(created)
        .bind(handler)
    };
    let default = deadline(t, serde_json::json!({"kind": "worker", "queue": "q"}))
        .fetch_one(&mut *conn)
        .await
        .expect("deadline");
    assert_eq!(
        default - t,
        chrono::Duration::seconds(i64::from(sked::domain::DEFAULT_SCHEDULE_TO_START_SECS))
    );
    let own = deadline(
        t,
        serde_json::json!({"kind": "worker", "schedule_to_start_secs": 5}),
    )
    .fetch_one(&mut *conn)
    .await
    .expect("deadline");
    assert_eq!(own - t, chrono::Duration::seconds(5));
    let created_later = t + chrono::Duration::days(7);
    let backfilled = deadline(
        created_later,
        serde_json::json!({"kind": "worker", "schedule_to_start_secs": 5}),
    )
    .fetch_one(&mut *conn)
    .await
    .expect("deadline");
    assert_eq!(backfilled - created_later, chrono::Duration::seconds(5));

    use sqlx::Connection as _;
    let mut tx = conn.begin().await.expect("begin");
    sked::db::generic_plans(&mut tx)
        .await
        .expect("generic plans");
    let before = runs_tuples_read(&mut tx).await;
    let now = chrono::Utc::now();
    let ended = sked::db::runs::run_fail_no_worker(&mut tx, "probe", now, 100)
        .await
        .expect("reap");
    let reads = runs_tuples_read(&mut tx).await - before;
    assert!(ended.is_empty(), "{} ended early", ended.len());
    assert!(
        reads < 100,
        "a reap with nothing past its deadline read {reads} of {} waiting runs",
        created.len() + late.len()
    );
    // Two minutes after their creation the late runs are past theirs and
    // end (with any run the binding fired meanwhile, of the same timeout);
    // the patient ones are untouched.
    let ended = sked::db::runs::run_fail_no_worker(
        &mut tx,
        "probe",
        chrono::Utc::now() + chrono::Duration::seconds(121),
        100,
    )
    .await
    .expect("reap");
    let ended_ids: Vec<String> = ended.iter().map(|(r, _)| r.id.to_string()).collect();
    for id in &late {
        assert!(
            ended_ids.contains(id),
            "late run {id} not ended: {ended_ids:?}"
        );
    }
    for (run, _) in &ended {
        assert_eq!(run.definition, "w.late", "{run:?}");
        assert_eq!(run.state, sked::domain::RunState::Failed);
        assert!(run.create_time >= t0, "{run:?}");
    }
    // A day later every run is past its 24-hour deadline: the reap ends
    // them, a batch at a time.
    let ended = sked::db::runs::run_fail_no_worker(
        &mut tx,
        "probe",
        now + chrono::Duration::hours(25),
        100,
    )
    .await
    .expect("reap");
    assert_eq!(ended.len(), 100);
    tx.rollback().await.expect("rollback");
    // Nothing of the late backlog ended on the node's own reaps meanwhile.
    for id in &late {
        let r = get_run(&node, "acme", id).await;
        assert_eq!(state(&r), pb::RunState::Queued, "{r:?}");
    }
    node.stop().await;
}

/// The seq ranges announced on `sked_events`, per run id.
type Announced = HashMap<String, Vec<(i64, i64)>>;

/// Whether `announced` holds seq `seq` of run `id`.
fn announced_seq(announced: &Announced, id: &str, seq: i64) -> bool {
    announced
        .get(id)
        .is_some_and(|r| r.iter().any(|(f, t)| *f <= seq && seq <= *t))
}

/// Reads `listener`'s `sked_events` payloads (each must parse and come
/// from node `node`) into `announced` until `done` holds or 10 s pass.
/// Returns the largest payload's bytes and the most runs one payload named.
async fn read_announcements(
    listener: &mut sqlx::postgres::PgListener,
    node: &str,
    announced: &mut Announced,
    done: impl Fn(&Announced) -> bool,
) -> (usize, usize) {
    let (mut largest, mut most_ranges) = (0, 0);
    let until = Instant::now() + Duration::from_secs(10);
    while !done(announced) && Instant::now() < until {
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), listener.recv()).await else {
            continue;
        };
        let (from_node, ranges) =
            sked::events::bridge::parse_events_payload(n.payload()).expect("payload parses");
        assert_eq!(from_node, node);
        largest = largest.max(n.payload().len());
        most_ranges = most_ranges.max(ranges.len());
        for (id, from, to) in ranges {
            announced
                .entry(id.to_string())
                .or_default()
                .push((from, to));
        }
    }
    (largest, most_ranges)
}

/// A claim announces the event it writes for each run it takes: the
/// `→ RUNNING` of each worker run, read by other nodes' bridges from
/// `sked_events` (`<node>|<run>:<from>:<to>,...`), each payload within
/// PostgreSQL's limit; every announced seq is the run's `→ RUNNING` event
/// as stored.
#[tokio::test]
async fn a_claim_announces_the_event_of_every_run_it_takes() {
    let db = TestDb::new().await;
    let node = node(&db, "w-ann").await;
    let backlog = worker_backlog(&node, "ann", 150).await;
    assert!(backlog.len() >= 140, "{}", backlog.len());
    let mut listener = sqlx::postgres::PgListener::connect(&db.url)
        .await
        .expect("listen");
    listener.listen("sked_events").await.expect("listen");
    let mut s = Stream::open(&node, "", "ann", "w-ann", 1000).await;
    // The binding fires every second too: its runs are taken as well.
    let mut taken = std::collections::HashSet::new();
    while !backlog.iter().all(|id| taken.contains(id)) {
        let a = s
            .assigned(Duration::from_secs(20))
            .await
            .expect("every backfilled run is taken");
        taken.insert(a.run_id);
    }
    // The RUNNING event of each taken run, as stored.
    let pool = db.pool().await;
    let stored: HashMap<String, i64> = sqlx::query_as::<_, (uuid::Uuid, i64)>(
        "SELECT run_id, seq FROM run_events WHERE kind = 'state_changed' AND payload->>'to' = 'RUNNING'",
    )
    .fetch_all(&pool)
    .await
    .expect("events")
    .into_iter()
    .map(|(id, seq)| (id.to_string(), seq))
    .collect();
    let mut announced = Announced::new();
    let (largest, most_ranges) = read_announcements(&mut listener, "w-ann", &mut announced, |a| {
        taken.iter().all(|id| announced_seq(a, id, stored[id]))
    })
    .await;
    assert!(largest <= 7900, "a payload of {largest} bytes");
    assert!(
        most_ranges > 100,
        "one claim announced its runs at once: {most_ranges}"
    );
    for id in &taken {
        assert!(
            announced_seq(&announced, id, stored[id]),
            "run {id}: its RUNNING event (seq {}) was announced: {:?}",
            stored[id],
            announced.get(id)
        );
    }

    // An event claim ends its runs in the statement: its three events of
    // each (→ RUNNING, fired, → SUCCEEDED) are announced as one range, the
    // run's → QUEUED by the TriggerRun that wrote it.
    let b = define_and_bind(&node, "acme", event_def("ann.event", manual())).await;
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let r = trigger(&node, "acme", &b.id).await;
        wait_terminal(&node, "acme", &r.id).await;
        let events = node
            .logs()
            .list_run_events(as_tenant(
                "acme",
                pb::ListRunEventsRequest {
                    run_id: r.id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .expect("events")
            .into_inner()
            .events;
        assert_eq!(events.len(), 4, "{events:?}");
        seqs.extend(events.iter().map(|e| (r.id.clone(), e.seq)));
    }
    let seen = |a: &Announced| seqs.iter().all(|(id, seq)| announced_seq(a, id, *seq));
    read_announcements(&mut listener, "w-ann", &mut announced, seen).await;
    assert!(
        seen(&announced),
        "every event of the event runs was announced: {seqs:?}"
    );
    node.stop().await;
}

/// A worker run's events reach other nodes in seq order, each only once
/// stored: the claim's `→ RUNNING` and the completion's `→ SUCCEEDED` are
/// announced after their commits (the node's announcer), the claim's
/// before the worker has the run. Read here as another node's bridge
/// would: on each notification, the events it names are already in
/// `run_events`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_events_are_announced_in_seq_order_once_stored() {
    let db = TestDb::new().await;
    let node = node(&db, "w-order").await;
    let b = define_and_bind(&node, "acme", worker_def("w.order", "order", 1)).await;
    let pool = db.pool().await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url)
        .await
        .expect("listen");
    listener.listen("sked_events").await.expect("listen");
    // A slot per run: no assignment arrives while completions are acked
    // (`complete_all` reads past other messages).
    let mut s = Stream::open(&node, "acme", "order", "w-o", 30).await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(
            trigger_with(&node, "acme", &b.id, serde_json::json!({}))
                .await
                .id,
        );
    }
    let mut tokens = Vec::new();
    while tokens.len() < ids.len() {
        let a = s
            .assigned(Duration::from_secs(20))
            .await
            .expect("every run is assigned");
        tokens.push(a.lease_token);
    }
    // Completed in batches of 7, as a worker's completions come.
    for batch in tokens.chunks(7) {
        let acks = complete_all(&mut s, batch).await;
        assert!(acks.iter().all(|(_, c)| *c == 0), "{acks:?}");
    }
    // Each run: → QUEUED (1, the TriggerRun), → RUNNING (2), → SUCCEEDED
    // (3). Every announced range is stored when it arrives, and each run's
    // ranges arrive in seq order.
    let mut last: HashMap<String, i64> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(20);
    while ids.iter().any(|id| last.get(id).copied().unwrap_or(0) < 3) && Instant::now() < until {
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), listener.recv()).await else {
            continue;
        };
        let (from_node, ranges) =
            sked::events::bridge::parse_events_payload(n.payload()).expect("payload parses");
        assert_eq!(from_node, "w-order");
        for (id, from, to) in ranges {
            let stored: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM run_events WHERE run_id = $1 AND seq BETWEEN $2 AND $3",
            )
            .bind(id)
            .bind(from)
            .bind(to)
            .fetch_one(&pool)
            .await
            .expect("read events");
            assert_eq!(
                stored,
                to - from + 1,
                "run {id} {from}..={to} announced before stored"
            );
            let seen = last.entry(id.to_string()).or_default();
            assert_eq!(
                from,
                *seen + 1,
                "run {id}: {from}..={to} announced after {seen}"
            );
            *seen = to;
        }
    }
    for id in &ids {
        assert_eq!(last.get(id), Some(&3), "run {id}: {last:?}");
        let r = wait_terminal(&node, "acme", id).await;
        assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
    }
    node.stop().await;
}
