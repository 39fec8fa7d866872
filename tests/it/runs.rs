//! Firing, execution and run events, through the API.

use crate::common::*;
use sked::proto::v1 as pb;
use tokio_stream::StreamExt;

fn final_state(events: &[pb::RunEvent]) -> Option<i32> {
    events.iter().rev().find_map(|e| match &e.kind {
        Some(pb::run_event::Kind::StateChanged(s)) => Some(s.to_state),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_definition_fires_on_schedule_and_succeeds_with_its_output() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    // Watch the tenant's events before binding, so the first fire is seen live.
    let mut watch = node
        .logs()
        .watch_events(as_tenant("acme", pb::WatchEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();

    let mut def = sh_def(
        "hello",
        r#"echo "hello from $SKED_TENANT_ID"; read -r stdin; echo "stdin=$stdin"; echo "{\"greeting\":\"done\",\"attempt\":$SKED_ATTEMPT}""#,
        every(1),
    );
    def.params = sked::grpc::convert::json_to_struct(
        &serde_json::json!({"who": "world", "n": 1, "drop": true}),
    );
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(def),
        })
        .await
        .unwrap();
    let binding = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "hello".into(),
                    params: sked::grpc::convert::json_to_struct(
                        &serde_json::json!({"n": 2, "drop": null}),
                    ),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let effective = binding.effective.clone().unwrap();
    assert_eq!(
        sked::grpc::convert::struct_to_json(&effective.params.unwrap()),
        serde_json::json!({"who": "world", "n": 2}),
        "binding params merge over the definition's by RFC 7396"
    );
    let next = binding
        .next_run_time
        .expect("an interval binding has a next run time");
    let create = binding.create_time.unwrap();
    assert_eq!(
        next.seconds - create.seconds,
        1,
        "first fire one period after creation"
    );

    // First terminal event seen live.
    let run_id = tokio::time::timeout(WAIT, async {
        while let Some(item) = watch.next().await {
            let e = item.unwrap().event.unwrap();
            if let Some(pb::run_event::Kind::StateChanged(s)) = &e.kind
                && (s.to_state == pb::RunState::Succeeded as i32
                    || s.to_state == pb::RunState::Failed as i32)
            {
                return e.run_id;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("a run finishes within the wait");

    let run = node
        .runs()
        .get_run(as_tenant(
            "acme",
            pb::GetRunRequest {
                run_id: run_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");
    assert_eq!(run.trigger, pb::RunTrigger::Schedule as i32);
    assert_eq!(run.binding_id, binding.id);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(run.node_id, "n1");
    assert_eq!(
        run.scheduled_time, binding.next_run_time,
        "first run is for the binding's first fire time"
    );
    assert_eq!(
        sked::grpc::convert::struct_to_json(run.result.as_ref().unwrap()),
        serde_json::json!({"greeting": "done", "attempt": 1}),
        "last stdout JSON object line is the result"
    );
    let events = node
        .logs()
        .list_run_events(as_tenant(
            "acme",
            pb::ListRunEventsRequest {
                run_id: run_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_dense(&events);
    let lines = log_lines(&events);
    assert_eq!(lines[0], "hello from acme");
    let stdin_json: serde_json::Value =
        serde_json::from_str(lines[1].strip_prefix("stdin=").unwrap()).unwrap();
    assert_eq!(
        stdin_json,
        serde_json::json!({"who": "world", "n": 2}),
        "params arrive as JSON on stdin"
    );
    let states: Vec<(i32, i32)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::run_event::Kind::StateChanged(s)) => Some((s.from_state, s.to_state)),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        vec![
            (
                pb::RunState::Unspecified as i32,
                pb::RunState::Queued as i32
            ),
            (pb::RunState::Queued as i32, pb::RunState::Running as i32),
            (pb::RunState::Running as i32, pb::RunState::Succeeded as i32),
        ]
    );
    drop(watch);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_ends_failed_with_exit_code_and_stderr_summary() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(
        &node,
        "acme",
        sh_def(
            "fails",
            "echo working; echo 'disk full' >&2; exit 3",
            manual(),
        ),
    )
    .await;
    assert!(
        b.next_run_time.is_none(),
        "manual bindings never fire by themselves"
    );
    let run = trigger(&node, "acme", &b.id).await;
    assert_eq!(run.trigger, pb::RunTrigger::Manual as i32);
    let run = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(run.state, pb::RunState::Failed as i32);
    assert_eq!(run.exit_code, Some(3));
    let err = run.error.unwrap();
    assert_eq!(err.message, "exit code 3");
    assert_eq!(err.summary, "disk full");
    assert_eq!(run.reason, "exit code 3");

    // A program that does not exist fails too, with the reason in its log.
    let b = define_and_bind(
        &node,
        "acme",
        command_def("missing", "/nonexistent/prog", &[], manual()),
    )
    .await;
    let run = trigger(&node, "acme", &b.id).await;
    let events = tail_all(&node, "acme", &run.id, 0).await;
    assert_eq!(final_state(&events), Some(pb::RunState::Failed as i32));
    assert!(
        log_lines(&events)
            .iter()
            .any(|l| l.contains("failed to start")),
        "{events:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_before_during_and_after_a_run_returns_the_same_events() {
    let db = TestDb::new().await;
    // One slot: a blocker run holds it, so the tailed run is still QUEUED
    // when the first subscriber connects.
    let mut s = settings(&db, "n1");
    s.max_concurrent_runs = 1;
    let node = TestNode::start_with(s).await;
    let blocker = define_and_bind(&node, "acme", sh_def("blocker", "sleep 1", manual())).await;
    let target = define_and_bind(
        &node,
        "acme",
        sh_def(
            "lines",
            "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.15; done; echo bye >&2",
            manual(),
        ),
    )
    .await;
    let blocker_run = trigger(&node, "acme", &blocker.id).await;
    // Wait until the blocker runs.
    let mut t = open_tail(&node, "acme", &blocker_run.id, 0, true).await;
    while let Some(e) = t.message().await.unwrap() {
        if e.seq == 2 {
            break;
        }
    }
    let run = trigger(&node, "acme", &target.id).await;
    let queued = node
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
    assert_eq!(
        queued.state,
        pb::RunState::Queued as i32,
        "the run has not started yet"
    );

    let before = {
        let node_ch = node.channel.clone();
        let id = run.id.clone();
        tokio::spawn(async move {
            let s = LogServiceClient::new(node_ch)
                .tail_run(as_tenant(
                    "acme",
                    pb::TailRunRequest {
                        run_id: id,
                        after_seq: 0,
                        follow: true,
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            drain(s).await
        })
    };
    // During: once the first line is out.
    let mut probe = open_tail(&node, "acme", &run.id, 0, true).await;
    while let Some(e) = probe.message().await.unwrap() {
        if matches!(&e.kind, Some(pb::run_event::Kind::Log(_))) {
            break;
        }
    }
    let during = tail_all(&node, "acme", &run.id, 0).await;
    let before = tokio::time::timeout(WAIT, before).await.unwrap().unwrap();
    let after = tail_all(&node, "acme", &run.id, 0).await;

    assert_dense(&after);
    assert_eq!(final_state(&after), Some(pb::RunState::Succeeded as i32));
    assert_eq!(
        log_lines(&after),
        [
            "line 1", "line 2", "line 3", "line 4", "line 5", "line 6", "line 7", "line 8", "bye"
        ]
    );
    assert_eq!(
        before, after,
        "tail started before the run sees exactly the persisted events"
    );
    assert_eq!(
        during, after,
        "tail started during the run sees exactly the persisted events"
    );

    // Reconnect with after_seq = k: exactly k+1..n.
    for k in [0, 1, 3, after.len() as i64 - 1, after.len() as i64] {
        let rest = tail_all(&node, "acme", &run.id, k).await;
        assert_eq!(rest, after[k as usize..].to_vec(), "after_seq={k}");
    }
    // Without follow: the replay only.
    let replay = drain(open_tail(&node, "acme", &run.id, 2, false).await).await;
    assert_eq!(replay, after[2..].to_vec());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_mid_run_with_last_seq_misses_nothing() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(
        &node,
        "acme",
        sh_def(
            "slow",
            "for i in 1 2 3 4 5 6; do echo $i; sleep 0.2; done",
            manual(),
        ),
    )
    .await;
    let run = trigger(&node, "acme", &b.id).await;
    let mut first = Vec::new();
    {
        let mut s = open_tail(&node, "acme", &run.id, 0, true).await;
        while let Some(e) = s.message().await.unwrap() {
            first.push(e);
            if first.len() == 4 {
                break; // client goes away mid-run
            }
        }
    }
    let k = first.last().unwrap().seq;
    let rest = tail_all(&node, "acme", &run.id, k).await;
    let mut joined = first.clone();
    joined.extend(rest);
    assert_dense(&joined);
    assert_eq!(log_lines(&joined), ["1", "2", "3", "4", "5", "6"]);
    assert_eq!(final_state(&joined), Some(pb::RunState::Succeeded as i32));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_are_cut_with_a_marker_not_dropped() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(
        &node,
        "acme",
        sh_def(
            "long",
            "head -c 40000 /dev/zero | tr '\\0' 'x'; echo; echo after",
            manual(),
        ),
    )
    .await;
    let run = trigger(&node, "acme", &b.id).await;
    let lines = log_lines(&tail_all(&node, "acme", &run.id, 0).await);
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("xxxx"));
    assert!(
        lines[0].ends_with(&format!("…[truncated {} bytes]", 40000 - 16 * 1024)),
        "{}",
        &lines[0][16000..]
    );
    assert_eq!(lines[1], "after");
    node.stop().await;
}

/// PostgreSQL cannot store NUL: a command whose output, stderr summary and
/// JSON result contain it still ends normally, with U+FFFD in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_output_and_result_is_stored_as_a_replacement_character() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(
        &node,
        "acme",
        sh_def(
            "nul",
            r#"printf 'a\000b\n'; printf 'err\000or\n' >&2; printf '{"k\\u0000":"x\\u0000y"}\n'"#,
            manual(),
        ),
    )
    .await;
    let run = trigger(&node, "acme", &b.id).await;
    let events = tail_all(&node, "acme", &run.id, 0).await;
    assert_eq!(final_state(&events), Some(pb::RunState::Succeeded as i32));
    let lines = log_lines(&events);
    assert!(lines.contains(&"a\u{FFFD}b".to_string()), "{lines:?}");
    assert!(lines.contains(&"err\u{FFFD}or".to_string()), "{lines:?}");
    let run = wait_terminal(&node, "acme", &run.id).await;
    let result = sked::grpc::convert::struct_to_json(&run.result.expect("result"));
    assert_eq!(result, serde_json::json!({"k\u{FFFD}": "x\u{FFFD}y"}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_buffered_when_the_process_exits_are_all_written_however_slow_the_database() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let binding = define_and_bind(
        &node,
        "acme",
        sh_def("burst", "sleep 1; seq 1 10000", manual()),
    )
    .await;
    let run = trigger(&node, "acme", &binding.id).await;
    let run_id: uuid::Uuid = run.id.parse().unwrap();
    // Once it runs, make every log write slow: hold the run's row 200 ms of
    // every 220 ms for 6 s. The 10 000 lines (≈ 49 KB) fit in the pipe, so
    // the process exits at once, and writing them takes seconds — well past
    // the 1 s linger after exit.
    let pool = db.pool().await;
    tokio::time::timeout(WAIT, async {
        loop {
            let state: String = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_one(&pool)
                .await
                .unwrap();
            if state == "RUNNING" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the run starts");
    let slow_until = std::time::Instant::now() + std::time::Duration::from_secs(6);
    while std::time::Instant::now() < slow_until {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE")
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        tx.rollback().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let done = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    let events = tail_all(&node, "acme", &run.id, 0).await;
    assert_dense(&events);
    let want: Vec<String> = (1..=10000).map(|i| i.to_string()).collect();
    let got = log_lines(&events);
    assert_eq!(got.len(), want.len(), "every line is written");
    assert!(got == want, "in order");
    node.stop().await;
}

/// The end of a run of an overlap-free binding announces a run of its own
/// handler kind (the next run of the binding, of the binding's kind), so
/// only the loops that claim that kind look: the `sked_runs` payloads of a
/// command run's life all name `local` alone. Announced as "any runs",
/// every node's slot claim, event claim loops and worker dispatch claimed
/// after every command run (12 claims per run where 4 do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_end_wakes_only_the_loops_of_its_handler_kind() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url)
        .await
        .expect("listener");
    listener.listen("sked_runs").await.expect("listen");
    let b = define_and_bind(&node, "acme", sh_def("once", "true", manual())).await;
    let overlap = b.effective.as_ref().map(|e| e.overlap_policy);
    assert_ne!(overlap, Some(pb::OverlapPolicy::Allow as i32), "{b:?}");
    let run = trigger(&node, "acme", &b.id).await;
    let ended = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&ended), pb::RunState::Succeeded);
    let mut payloads = Vec::new();
    while let Ok(n) =
        tokio::time::timeout(std::time::Duration::from_millis(500), listener.recv()).await
    {
        payloads.push(n.expect("notification").payload().to_string());
    }
    // The trigger's and the end's.
    assert!(payloads.len() >= 2, "{payloads:?}");
    for p in &payloads {
        assert_eq!(
            p, "local",
            "every payload names command runs alone: {payloads:?}"
        );
    }
    node.stop().await;
}
