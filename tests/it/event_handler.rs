//! The `event` handler (SPEC §4): a run publishes `fired` with its params to
//! WatchEvents subscribers and succeeds at once — whether it is completed in
//! the firing transaction (scheduled fires) or claimed by the executor
//! (triggers, tenants with a concurrency quota).

use crate::common::*;
use sked::proto::v1 as pb;
use tokio_stream::StreamExt;

fn event_def(name: &str, schedule: pb::Schedule) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
        schedule: Some(schedule),
        params: sked::grpc::convert::json_to_struct(&serde_json::json!({"tick": "hello", "n": 7})),
        ..Default::default()
    }
}

fn state(e: &pb::RunEvent) -> Option<(i32, i32)> {
    match &e.kind {
        Some(pb::run_event::Kind::StateChanged(s)) => Some((s.from_state, s.to_state)),
        _ => None,
    }
}

/// The whole log of an event run: → QUEUED, QUEUED → RUNNING, fired with
/// the params, RUNNING → SUCCEEDED; seqs 1..4.
fn assert_event_run_log(events: &[pb::RunEvent], params: &serde_json::Value) {
    use pb::RunState as S;
    assert_dense(events);
    assert_eq!(events.len(), 4, "{events:#?}");
    assert_eq!(
        state(&events[0]),
        Some((S::Unspecified as i32, S::Queued as i32))
    );
    assert_eq!(
        state(&events[1]),
        Some((S::Queued as i32, S::Running as i32))
    );
    match &events[2].kind {
        Some(pb::run_event::Kind::Fired(f)) => assert_eq!(
            &sked::grpc::convert::struct_to_json(f.params.as_ref().expect("params")),
            params
        ),
        other => panic!("third event must be fired: {other:?}"),
    }
    assert_eq!(
        state(&events[3]),
        Some((S::Running as i32, S::Succeeded as i32))
    );
}

async fn run_events(node: &TestNode, tenant: &str, run_id: &str) -> Vec<pb::RunEvent> {
    node.logs()
        .list_run_events(as_tenant(
            tenant,
            pb::ListRunEventsRequest {
                run_id: run_id.into(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_event_runs_publish_fired_and_succeed() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut watch = node
        .logs()
        .watch_events(as_tenant(
            "acme",
            pb::WatchEventsRequest {
                kinds: vec![pb::EventKind::Fired as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let binding = define_and_bind(&node, "acme", event_def("tick", every(1))).await;
    let params = serde_json::json!({"tick": "hello", "n": 7});

    // Live: a subscriber filtering on FIRED sees only fired events, with params.
    let first = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("a fired event within the wait")
        .unwrap()
        .unwrap()
        .event
        .expect("an event, not a missed count");
    match &first.kind {
        Some(pb::run_event::Kind::Fired(f)) => assert_eq!(
            sked::grpc::convert::struct_to_json(f.params.as_ref().unwrap()),
            params
        ),
        other => panic!("only fired events pass the filter: {other:?}"),
    }
    assert_eq!(first.binding_id, binding.id);
    assert_eq!(first.seq, 3);

    let runs = runs_until(&node, "acme", &binding.id, WAIT, "three fires", |r| {
        r.len() >= 3
    })
    .await;
    for r in &runs[..3] {
        assert_eq!(r.state, pb::RunState::Succeeded as i32, "{r:?}");
        assert_eq!(r.trigger, pb::RunTrigger::Schedule as i32);
        let start = r.start_time.unwrap();
        let end = r.end_time.unwrap();
        assert_eq!(start, end, "an event run starts and ends at once");
        assert!(
            (start.seconds, start.nanos) >= {
                let s = r.scheduled_time.unwrap();
                (s.seconds, s.nanos)
            },
            "never starts before its fire time"
        );
        assert_eq!(r.node_id, "n1");
        assert_event_run_log(&run_events(&node, "acme", &r.id).await, &params);
    }
    // Exactly one run per fire time.
    let mut times: Vec<_> = runs.iter().map(|r| r.scheduled_time.unwrap()).collect();
    let n = times.len();
    times.dedup();
    assert_eq!(times.len(), n);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggered_and_quota_limited_event_runs_go_through_the_claim() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let params = serde_json::json!({"tick": "hello", "n": 7});

    // A trigger: queued, then claimed and completed by the executor.
    let manual_binding = define_and_bind(&node, "acme", event_def("poke", manual())).await;
    let run = trigger(&node, "acme", &manual_binding.id).await;
    let done = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    assert_event_run_log(&tail_all(&node, "acme", &run.id, 0).await, &params);

    // Many at once (more than one claim batch per binding would allow
    // without re-claiming: SKIP overlap takes one run per binding a claim).
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(trigger(&node, "acme", &manual_binding.id).await.id);
    }
    for id in &ids {
        let r = wait_terminal(&node, "acme", id).await;
        assert_eq!(r.state, pb::RunState::Succeeded as i32);
        assert_eq!(run_events(&node, "acme", id).await.len(), 4);
    }

    // A tenant with a concurrency quota: its scheduled fires are claimed
    // (they wait for a slot like any run) and still succeed with all events.
    node.admin()
        .set_tenant_quota(as_tenant(
            "",
            pb::SetTenantQuotaRequest {
                quota: Some(pb::TenantQuota {
                    tenant_id: "capped".into(),
                    max_concurrent_runs: Some(1),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap();
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(event_def("tock", every(1))),
        })
        .await
        .unwrap();
    let capped = node
        .bindings()
        .create_binding(as_tenant(
            "capped",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "tock".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let runs = runs_until(&node, "capped", &capped.id, WAIT, "two fires done", |r| {
        r.iter()
            .filter(|r| r.state == pb::RunState::Succeeded as i32)
            .count()
            >= 2
    })
    .await;
    for r in runs
        .iter()
        .filter(|r| r.state == pb::RunState::Succeeded as i32)
    {
        assert_event_run_log(&run_events(&node, "capped", &r.id).await, &params);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_handler_round_trips_and_a_missing_handler_is_named() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(event_def("tick", manual())),
        })
        .await
        .unwrap();
    let got = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "tick".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        got.handler,
        Some(pb::task_definition::Handler::Event(pb::EventHandler {}))
    ));

    let mut bad = event_def("nohandler", manual());
    bad.handler = None;
    let err = node
        .definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(bad),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(violation_fields(&err), vec!["definition.handler"]);
    assert!(err.message().contains("event"), "{}", err.message());
    node.stop().await;
}

/// Every event of a run through ListRunEvents, `page_size` at a time,
/// starting after `after_seq`, following `next_after_seq`.
async fn pages(node: &TestNode, run_id: &str, page_size: i32, after_seq: i64) -> Vec<pb::RunEvent> {
    let mut out = Vec::new();
    let mut after = after_seq;
    for _ in 0..20 {
        let page = node
            .logs()
            .list_run_events(as_tenant(
                "acme",
                pb::ListRunEventsRequest {
                    run_id: run_id.into(),
                    after_seq: after,
                    page_size,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= page_size as usize, "{page:?}");
        out.extend(page.events);
        if page.next_after_seq == 0 {
            return out;
        }
        after = page.next_after_seq;
    }
    panic!("more pages than events");
}

/// The WatchEvents events of `run` seen so far, in arrival order.
fn seen(got: &[pb::RunEvent], run: &str) -> Vec<pb::RunEvent> {
    got.iter().filter(|e| e.run_id == run).cloned().collect()
}

/// An event run's whole history is stored as one row (issue 18: its state
/// changes do not each need a row; a scheduled fire writes all four events
/// at once, a claim the last three). Whoever reads it sees four events with
/// seqs 1..4: ListRunEvents by any page size from any seq, TailRun from
/// any seq, and WatchEvents subscribers on both nodes — one of which gets
/// the run through the other node's announcement and a read by seq range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_runs_history_reads_the_same_by_any_page_from_any_seq_on_any_node() {
    let db = TestDb::new().await;
    let n1 = TestNode::start(&db, "n1").await;
    let n2 = TestNode::start(&db, "n2").await;
    let params = serde_json::json!({"tick": "hello", "n": 7});
    let mut watches = Vec::new();
    for node in [&n1, &n2] {
        watches.push(
            node.logs()
                .watch_events(as_tenant("acme", pb::WatchEventsRequest::default()))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let scheduled = define_and_bind(&n1, "acme", event_def("tick", every(1))).await;
    let poke = define_and_bind(&n1, "acme", event_def("poke", manual())).await;
    let triggered = trigger(&n2, "acme", &poke.id).await;
    wait_terminal(&n1, "acme", &triggered.id).await;
    let fired = runs_until(&n1, "acme", &scheduled.id, WAIT, "two fires", |r| {
        r.iter()
            .filter(|r| r.state == pb::RunState::Succeeded as i32)
            .count()
            >= 2
    })
    .await;
    let fired: Vec<pb::Run> = fired
        .into_iter()
        .filter(|r| r.state == pb::RunState::Succeeded as i32)
        .take(2)
        .collect();
    let mut runs: Vec<String> = fired.iter().map(|r| r.id.clone()).collect();
    runs.push(triggered.id.clone());

    // Both subscribers see every event of every run (each run crossed to
    // the node that did not execute it), in seq order.
    let mut got: Vec<Vec<pb::RunEvent>> = vec![Vec::new(), Vec::new()];
    for (w, got) in watches.iter_mut().zip(&mut got) {
        tokio::time::timeout(WAIT, async {
            while !runs.iter().all(|r| seen(got, r).len() >= 4) {
                let msg = w.next().await.expect("the watch stays open").unwrap();
                got.push(msg.event.expect("an event, not a missed count"));
            }
        })
        .await
        .expect("all events of the runs reach both subscribers");
    }

    for run in &runs {
        let full = pages(&n1, run, 100, 0).await;
        assert_event_run_log(&full, &params);
        for got in &got {
            assert_eq!(seen(got, run), full, "WatchEvents of {run}");
        }
        for after in 0..=4 {
            let want: Vec<pb::RunEvent> = full.iter().filter(|e| e.seq > after).cloned().collect();
            for size in 1..=5 {
                assert_eq!(
                    pages(&n2, run, size, after).await,
                    want,
                    "ListRunEvents of {run} after seq {after}, {size} a page"
                );
            }
            assert_eq!(
                tail_all(&n2, "acme", run, after).await,
                want,
                "TailRun after {after}"
            );
        }
    }

    // The bridge's read by seq range: part of a row, and a range whose end
    // (as a NOTIFY payload could give it) would overflow past the lookback.
    let pool = db.pool().await;
    let id: uuid::Uuid = runs[0].parse().unwrap();
    for (ranges, want) in [
        (vec![(id, 2, 3)], vec![2, 3]),
        (vec![(id, 4, 4), (id, 1, 1)], vec![4, 1]),
        (vec![(id, 1, i64::MAX)], vec![1, 2, 3, 4]),
        (vec![(id, 5, 9)], vec![]),
    ] {
        let got: Vec<i64> = sked::db::events::event_fetch_ranges(&pool, &ranges)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, want, "{ranges:?}");
    }
    n1.stop().await;
    n2.stop().await;
}
