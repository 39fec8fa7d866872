//! Several nodes on one database: exactly-once firing, cross-node tails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_create_exactly_one_run_per_binding_and_fire_time() {
    let db = TestDb::new().await;
    let a = TestNode::start(&db, "node-a").await;
    let b = TestNode::start(&db, "node-b").await;
    let mut bindings = Vec::new();
    for i in 0..4 {
        bindings.push(
            define_and_bind(
                &a,
                "acme",
                sh_def(&format!("tick{i}"), "echo tick", every(1)),
            )
            .await,
        );
    }
    // Measure over more than 5 s of firing.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    a.stop().await;
    b.stop().await;

    let node = TestNode::start_with({
        let mut s = settings(&db, "reader");
        s.max_concurrent_runs = 0;
        s
    })
    .await;
    let mut runs = Vec::new();
    let mut token = String::new();
    loop {
        let page = node
            .runs()
            .list_runs(as_tenant(
                "acme",
                pb::ListRunsRequest {
                    page_size: 100,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        runs.extend(page.runs);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let mut per_binding: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut executors = BTreeSet::new();
    for r in &runs {
        assert_eq!(r.trigger, pb::RunTrigger::Schedule as i32);
        let t = r.scheduled_time.as_ref().unwrap();
        per_binding
            .entry(r.binding_id.clone())
            .or_default()
            .push(t.seconds * 1_000_000 + i64::from(t.nanos) / 1000);
        executors.insert(r.node_id.clone());
    }
    assert_eq!(per_binding.len(), bindings.len());
    for (binding, mut times) in per_binding {
        times.sort();
        let distinct: BTreeSet<_> = times.iter().collect();
        assert_eq!(
            distinct.len(),
            times.len(),
            "binding {binding}: a fire time ran twice: {times:?}"
        );
        assert!(
            times.len() >= 5,
            "binding {binding}: expected ≥ 5 fires in 6.5 s, got {}",
            times.len()
        );
        for w in times.windows(2) {
            assert_eq!(
                w[1] - w[0],
                1_000_000,
                "binding {binding}: fire times are consecutive, 1 s apart"
            );
        }
    }
    assert!(
        executors
            .iter()
            .all(|n| n == "node-a" || n == "node-b" || n.is_empty()),
        "{executors:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_on_node_b_follows_a_run_executing_on_node_a() {
    let db = TestDb::new().await;
    let a = TestNode::start(&db, "node-a").await;
    // Node B executes nothing: the run must run on A.
    let b = TestNode::start_with({
        let mut s = settings(&db, "node-b");
        s.max_concurrent_runs = 0;
        s
    })
    .await;
    let binding = define_and_bind(
        &b,
        "acme",
        sh_def(
            "remote",
            "for i in 1 2 3 4 5; do echo remote $i; sleep 0.2; done",
            manual(),
        ),
    )
    .await;
    let run = trigger(&b, "acme", &binding.id).await;
    let mut stream = open_tail(&b, "acme", &run.id, 0, true).await;
    let mut got = Vec::new();
    let mut live_log_times = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(e) = stream.message().await.unwrap() {
            if matches!(&e.kind, Some(pb::run_event::Kind::Log(_))) {
                live_log_times.push(std::time::Instant::now());
            }
            got.push(e);
        }
    })
    .await
    .expect("tail on B ends when the run on A ends");
    assert_dense(&got);
    assert_eq!(
        log_lines(&got),
        ["remote 1", "remote 2", "remote 3", "remote 4", "remote 5"]
    );
    // Lines arrived live, spread over the run (not all at the end).
    let spread = *live_log_times.last().unwrap() - live_log_times[0];
    assert!(
        spread >= Duration::from_millis(500),
        "lines arrived live over {spread:?}"
    );
    let finished = b
        .runs()
        .get_run(as_tenant(
            "acme",
            pb::GetRunRequest {
                run_id: run.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(finished.node_id, "node-a");
    assert_eq!(finished.state, pb::RunState::Succeeded as i32);
    let persisted = a
        .logs()
        .list_run_events(as_tenant(
            "acme",
            pb::ListRunEventsRequest {
                run_id: run.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(got, persisted, "B streamed exactly what A persisted");
    a.stop().await;
    b.stop().await;
}
