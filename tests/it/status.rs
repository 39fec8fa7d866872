//! What runs came to, through the API: a binding's status (last run, last
//! success and failure, consecutive failures, FAILING, COMPLETED...), the
//! filters of ListRuns and ListBindings, and GetRunStats against what the
//! test computes itself from ListRuns.

use std::collections::BTreeSet;

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;

/// A manual `sh` definition that fails when its params mention "fail",
/// sleeps `s` seconds when they carry `{"s": "<secs>"}`, and succeeds
/// otherwise.
fn flaky(name: &str) -> pb::TaskDefinition {
    sh_def(
        name,
        r#"case "$SKED_PARAMS" in *fail*) echo boom >&2; exit 1;; esac
           s=$(printf '%s' "$SKED_PARAMS" | sed -n 's/.*"s":"\([0-9.]*\)".*/\1/p')
           [ -n "$s" ] && sleep "$s"
           echo ok"#,
        manual(),
    )
}

/// TriggerRun with params; waits for the run to end and returns it.
async fn run_with(
    node: &TestNode,
    tenant: &str,
    binding: &str,
    params: serde_json::Value,
) -> pb::Run {
    let run = node
        .runs()
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
        .into_inner();
    wait_terminal(node, tenant, &run.id).await
}

/// Every page of ListRuns for `req` (3 runs a page, so tokens are used).
async fn list_runs(node: &TestNode, tenant: &str, req: pb::ListRunsRequest) -> Vec<pb::Run> {
    list_all_runs(
        node,
        tenant,
        pb::ListRunsRequest {
            page_size: 3,
            ..req
        },
    )
    .await
}

/// Every page of ListBindings for `req` (2 a page).
async fn list_bindings(
    node: &TestNode,
    tenant: &str,
    req: pb::ListBindingsRequest,
) -> Vec<pb::Binding> {
    list_all_bindings(
        node,
        tenant,
        pb::ListBindingsRequest {
            page_size: 2,
            ..req
        },
    )
    .await
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| id(i).to_string()).collect()
}

fn status(b: &pb::Binding) -> pb::BindingStatus {
    pb::BindingStatus::try_from(b.status).expect("a known status")
}

fn micros(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1000
}

fn dur_micros(d: &Option<prost_types::Duration>) -> i64 {
    let d = d.as_ref().expect("duration set");
    d.seconds * 1_000_000 + i64::from(d.nanos) / 1000
}

/// The `p`-th percentile of `values` by nearest rank (what RunStats
/// documents).
fn nearest_rank(values: &[i64], p: f64) -> i64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// `reported` is `exact` within the documented bucket resolution: never
/// below it, at most 2^(1/4) above it (1 ms above it under 1 ms).
fn assert_within_bucket(what: &str, reported: i64, exact: i64) {
    let upper = ((exact as f64) * 2f64.powf(0.25)).ceil() as i64;
    assert!(
        reported >= exact && reported <= upper.max(1000),
        "{what}: reported {reported} us, exact {exact} us"
    );
}

fn invalid_field<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
    let s = r.expect_err("refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    violation_fields(&s).first().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_a_success_drive_the_binding_status() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", flaky("flaky")).await;
    assert_eq!(status(&b), pb::BindingStatus::Active);
    assert!(b.last_run.is_none() && b.last_success_time.is_none());

    let mut failed = Vec::new();
    for i in 0..3 {
        let run = run_with(&node, "acme", &b.id, serde_json::json!({"mode": "fail"})).await;
        assert_eq!(state(&run), pb::RunState::Failed, "{run:?}");
        failed.push(run);
        let seen = get_binding(&node, "acme", &b.id).await;
        assert_eq!(seen.consecutive_failures, i + 1);
        let expect = if i < 2 {
            pb::BindingStatus::Active
        } else {
            pb::BindingStatus::Failing
        };
        assert_eq!(status(&seen), expect, "after {} failures", i + 1);
    }
    let last = failed.last().unwrap();
    let seen = get_binding(&node, "acme", &b.id).await;
    let lr = seen.last_run.clone().expect("a last run");
    assert_eq!(lr.run_id, last.id);
    assert_eq!(lr.state, pb::RunState::Failed as i32);
    assert_eq!(lr.scheduled_time, last.scheduled_time);
    assert_eq!(lr.end_time, last.end_time);
    assert_eq!(seen.last_failure_time, last.end_time);
    assert!(seen.last_success_time.is_none());
    // The FAILING filter finds it; ACTIVE does not.
    let failing = list_bindings(
        &node,
        "acme",
        pb::ListBindingsRequest {
            statuses: vec![pb::BindingStatus::Failing as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&failing, |b| &b.id), vec![b.id.clone()]);

    // A success: the count starts over.
    let ok = run_with(&node, "acme", &b.id, serde_json::json!({"mode": "ok"})).await;
    assert_eq!(state(&ok), pb::RunState::Succeeded, "{ok:?}");
    let seen = get_binding(&node, "acme", &b.id).await;
    assert_eq!(seen.consecutive_failures, 0);
    assert_eq!(status(&seen), pb::BindingStatus::Active);
    assert_eq!(seen.last_success_time, ok.end_time);
    assert_eq!(seen.last_failure_time, last.end_time, "kept");
    assert_eq!(seen.last_run.unwrap().run_id, ok.id);

    // A cancelled run is the last run, but neither a failure nor a success.
    let delayed = node
        .runs()
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                run_time: Some(ts(now_secs() + 3600.0)),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let cancelled = node
        .runs()
        .cancel_run(as_tenant(
            "acme",
            pb::CancelRunRequest {
                run_id: delayed.id.clone(),
                reason: "not today".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let seen = get_binding(&node, "acme", &b.id).await;
    let lr = seen.last_run.unwrap();
    assert_eq!(lr.run_id, cancelled.id);
    assert_eq!(lr.state, pb::RunState::Cancelled as i32);
    assert_eq!(seen.consecutive_failures, 0);
    assert_eq!(seen.last_success_time, ok.end_time);

    // ListBindings shows the same status as GetBinding.
    let listed = list_bindings(&node, "acme", pb::ListBindingsRequest::default()).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].last_run,
        get_binding(&node, "acme", &b.id).await.last_run
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_attempt_is_not_a_final_failure() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut def = flaky("retried");
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(100)),
        max_backoff: Some(dur(100)),
        ..Default::default()
    });
    let b = define_and_bind(&node, "acme", def).await;
    let first = node
        .runs()
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                params: sked::grpc::convert::json_to_struct(&serde_json::json!({"mode": "fail"})),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let runs = runs_until(&node, "acme", &b.id, WAIT, "both attempts end", |runs| {
        runs.len() == 2 && runs.iter().all(is_terminal)
    })
    .await;
    let second = runs.iter().find(|r| r.attempt == 2).expect("the retry");
    assert_eq!(second.retry_of, first.id);
    let seen = get_binding(&node, "acme", &b.id).await;
    assert_eq!(
        seen.consecutive_failures, 1,
        "the retried attempt is not a final failure; its retry is"
    );
    assert_eq!(seen.last_failure_time, second.end_time);
    assert_eq!(seen.last_run.unwrap().run_id, second.id);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_and_the_binding_filters() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let labelled = |name: &str, team: &str, schedule| {
        let mut d = event_def(name, schedule);
        d.labels = [("team".to_string(), team.to_string())].into();
        d
    };
    // ACTIVE: fires every minute.
    let active = define_and_bind(&node, "acme", labelled("minutely", "red", every(60))).await;
    // COMPLETED: a once schedule that fires in a second.
    let once = pb::Schedule {
        kind: Some(pb::schedule::Kind::Once(pb::OnceSchedule {
            at: Some(ts(now_secs().ceil() + 1.0)),
        })),
        ..Default::default()
    };
    let done = define_and_bind(&node, "acme", labelled("once", "blue", once)).await;
    // COMPLETED too: its effective window is over.
    create_definition(&node, labelled("window", "red", every(60)))
        .await
        .unwrap();
    let ended = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "window".into(),
                    effective_from: Some(ts(now_secs() - 7200.0)),
                    effective_until: Some(ts(now_secs() - 3600.0)),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&ended), pb::BindingStatus::Completed);
    // PAUSED and DISABLED.
    let paused = define_and_bind(&node, "acme", labelled("paused", "red", every(60))).await;
    pause(&node, "acme", &paused.id).await;
    create_definition(&node, labelled("off", "blue", every(60)))
        .await
        .unwrap();
    let disabled = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "off".into(),
                    enabled: Some(false),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // Another tenant's binding of the same definition is never listed.
    bind_existing(&node, "other", "minutely").await;

    // The once binding fires, then has nothing left to fire.
    tokio::time::timeout(WAIT, async {
        loop {
            let b = get_binding(&node, "acme", &done.id).await;
            if status(&b) == pb::BindingStatus::Completed {
                let lr = b.last_run.expect("the once run");
                assert_eq!(lr.state, pb::RunState::Succeeded as i32);
                assert!(b.next_run_time.is_none());
                assert_eq!(b.last_success_time, lr.end_time);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the once binding completes");

    let all = list_bindings(&node, "acme", pb::ListBindingsRequest::default()).await;
    assert_eq!(all.len(), 5);
    let by_status = |s: pb::BindingStatus| -> BTreeSet<String> {
        all.iter()
            .filter(|b| status(b) == s)
            .map(|b| b.id.clone())
            .collect()
    };
    assert_eq!(
        by_status(pb::BindingStatus::Active),
        [active.id.clone()].into()
    );
    assert_eq!(
        by_status(pb::BindingStatus::Completed),
        [done.id.clone(), ended.id.clone()].into()
    );
    assert_eq!(
        by_status(pb::BindingStatus::Paused),
        [paused.id.clone()].into()
    );
    assert_eq!(
        by_status(pb::BindingStatus::Disabled),
        [disabled.id.clone()].into()
    );

    // Each filter returns exactly the matching bindings, over pages.
    for statuses in [
        vec![pb::BindingStatus::Completed],
        vec![pb::BindingStatus::Paused, pb::BindingStatus::Disabled],
        vec![pb::BindingStatus::Failing],
    ] {
        let got = list_bindings(
            &node,
            "acme",
            pb::ListBindingsRequest {
                statuses: statuses.iter().map(|s| *s as i32).collect(),
                ..Default::default()
            },
        )
        .await;
        let want: Vec<String> = all
            .iter()
            .filter(|b| statuses.contains(&status(b)))
            .map(|b| b.id.clone())
            .collect();
        assert_eq!(ids(&got, |b| &b.id), want, "statuses {statuses:?}");
    }
    let red = list_bindings(
        &node,
        "acme",
        pb::ListBindingsRequest {
            labels: [("team".to_string(), "red".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids(&red, |b| &b.id),
        vec![active.id.clone(), ended.id.clone(), paused.id.clone()]
    );
    let red_completed = list_bindings(
        &node,
        "acme",
        pb::ListBindingsRequest {
            labels: [("team".to_string(), "red".to_string())].into(),
            statuses: vec![pb::BindingStatus::Completed as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&red_completed, |b| &b.id), vec![ended.id.clone()]);
    let nobody = list_bindings(
        &node,
        "acme",
        pb::ListBindingsRequest {
            labels: [("team".to_string(), "green".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    assert!(nobody.is_empty());
    let of_def = list_bindings(
        &node,
        "acme",
        pb::ListBindingsRequest {
            definition: "off".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&of_def, |b| &b.id), vec![disabled.id.clone()]);

    // A page token belongs to its filters.
    let first = node
        .bindings()
        .list_bindings(as_tenant(
            "acme",
            pb::ListBindingsRequest {
                page_size: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let r = node
        .bindings()
        .list_bindings(as_tenant(
            "acme",
            pb::ListBindingsRequest {
                page_size: 1,
                page_token: first.next_page_token.clone(),
                labels: [("team".to_string(), "red".to_string())].into(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(invalid_field(r), "page_token");
    // Bad filters name their field.
    let bad = |req: pb::ListBindingsRequest| {
        let node = &node;
        async move { invalid_field(node.bindings().list_bindings(as_tenant("acme", req)).await) }
    };
    assert_eq!(
        bad(pb::ListBindingsRequest {
            statuses: vec![pb::BindingStatus::Unspecified as i32],
            ..Default::default()
        })
        .await,
        "statuses[0]"
    );
    assert_eq!(
        bad(pb::ListBindingsRequest {
            statuses: vec![99],
            ..Default::default()
        })
        .await,
        "statuses[0]"
    );
    assert_eq!(
        bad(pb::ListBindingsRequest {
            definition: "Not A Name".into(),
            ..Default::default()
        })
        .await,
        "definition"
    );
    assert!(
        bad(pb::ListBindingsRequest {
            labels: (0..65)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .starts_with("labels")
    );
    assert_eq!(
        bad(pb::ListBindingsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        "page_token"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_run_filter_returns_exactly_the_matching_runs() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let flaky_b = define_and_bind(&node, "acme", flaky("flaky")).await;
    let tick = define_and_bind(&node, "acme", event_def("tick", every(60))).await;
    // Runs of every kind: failed and succeeded commands, triggered and
    // backfilled event runs, a cancelled delayed trigger.
    run_with(
        &node,
        "acme",
        &flaky_b.id,
        serde_json::json!({"mode": "fail"}),
    )
    .await;
    run_with(
        &node,
        "acme",
        &flaky_b.id,
        serde_json::json!({"mode": "ok"}),
    )
    .await;
    run_with(&node, "acme", &tick.id, serde_json::json!({})).await;
    let now = now_secs();
    let backfill = node
        .runs()
        .backfill_runs(as_tenant(
            "acme",
            pb::BackfillRunsRequest {
                binding_id: tick.id.clone(),
                start_time: Some(ts(now - 600.0)),
                end_time: Some(ts(now - 60.0)),
                dry_run: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(backfill.run_ids.len() >= 8, "{backfill:?}");
    let delayed = node
        .runs()
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: flaky_b.id.clone(),
                run_time: Some(ts(now + 3600.0)),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    node.runs()
        .cancel_run(as_tenant(
            "acme",
            pb::CancelRunRequest {
                run_id: delayed.id.clone(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap();
    // Another tenant's runs never show.
    let other = bind_existing(&node, "other", "tick").await;
    run_with(&node, "other", &other.id, serde_json::json!({})).await;
    let all = runs_until(&node, "acme", &tick.id, WAIT, "the backfill ends", |runs| {
        runs.iter().all(is_terminal)
    })
    .await;
    assert_eq!(all.len(), backfill.run_ids.len() + 1);

    // Everything, newest first; then oldest first is the reverse.
    let everything = list_runs(&node, "acme", pb::ListRunsRequest::default()).await;
    assert_eq!(everything.len(), 3 + backfill.run_ids.len() + 1);
    let ids_desc = ids(&everything, |r| &r.id);
    let mut sorted = ids_desc.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(ids_desc, sorted, "newest (largest UUIDv7) first");
    let oldest = list_runs(
        &node,
        "acme",
        pb::ListRunsRequest {
            order: pb::ListRunsOrder::OldestFirst as i32,
            ..Default::default()
        },
    )
    .await;
    let mut asc = ids_desc.clone();
    asc.reverse();
    assert_eq!(ids(&oldest, |r| &r.id), asc);

    let want = |f: &dyn Fn(&pb::Run) -> bool| -> Vec<String> {
        everything
            .iter()
            .filter(|r| f(r))
            .map(|r| r.id.clone())
            .collect()
    };
    let from = now - 400.0;
    let until = now - 200.0;
    let cases: Vec<(&str, pb::ListRunsRequest, Vec<String>)> = vec![
        (
            "states",
            pb::ListRunsRequest {
                states: vec![pb::RunState::Failed as i32, pb::RunState::Cancelled as i32],
                ..Default::default()
            },
            want(&|r| matches!(state(r), pb::RunState::Failed | pb::RunState::Cancelled)),
        ),
        (
            "state and states",
            pb::ListRunsRequest {
                state: pb::RunState::Failed as i32,
                states: vec![pb::RunState::Succeeded as i32],
                ..Default::default()
            },
            want(&|r| matches!(state(r), pb::RunState::Failed | pb::RunState::Succeeded)),
        ),
        (
            "trigger",
            pb::ListRunsRequest {
                trigger: pb::RunTrigger::Backfill as i32,
                ..Default::default()
            },
            want(&|r| r.trigger == pb::RunTrigger::Backfill as i32),
        ),
        (
            "definition",
            pb::ListRunsRequest {
                definition: "flaky".into(),
                ..Default::default()
            },
            want(&|r| r.definition == "flaky"),
        ),
        (
            "node",
            pb::ListRunsRequest {
                node: "n1".into(),
                ..Default::default()
            },
            want(&|r| r.node_id == "n1"),
        ),
        (
            "unknown node",
            pb::ListRunsRequest {
                node: "n9".into(),
                ..Default::default()
            },
            vec![],
        ),
        (
            "time range",
            pb::ListRunsRequest {
                scheduled_start_time: Some(ts(from)),
                scheduled_end_time: Some(ts(until)),
                ..Default::default()
            },
            want(&|r| {
                let t = secs(&r.scheduled_time);
                t >= from && t < until
            }),
        ),
        (
            "binding, state and time",
            pb::ListRunsRequest {
                binding_id: tick.id.clone(),
                states: vec![pb::RunState::Succeeded as i32],
                scheduled_start_time: Some(ts(from)),
                ..Default::default()
            },
            want(&|r| {
                r.binding_id == tick.id
                    && state(r) == pb::RunState::Succeeded
                    && secs(&r.scheduled_time) >= from
            }),
        ),
    ];
    for (what, req, expect) in cases {
        assert!(
            !expect.is_empty() || what == "unknown node",
            "{what}: the test made runs for it"
        );
        let got = list_runs(&node, "acme", req.clone()).await;
        assert_eq!(ids(&got, |r| &r.id), expect, "{what}");
        // Oldest first, the same runs reversed.
        let got = list_runs(
            &node,
            "acme",
            pb::ListRunsRequest {
                order: pb::ListRunsOrder::OldestFirst as i32,
                ..req
            },
        )
        .await;
        let mut rev = expect.clone();
        rev.reverse();
        assert_eq!(ids(&got, |r| &r.id), rev, "{what}, oldest first");
    }

    // A page token belongs to its filters and order.
    let first = node
        .runs()
        .list_runs(as_tenant(
            "acme",
            pb::ListRunsRequest {
                page_size: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    for other_filters in [
        pb::ListRunsRequest {
            trigger: pb::RunTrigger::Manual as i32,
            ..Default::default()
        },
        pb::ListRunsRequest {
            order: pb::ListRunsOrder::OldestFirst as i32,
            ..Default::default()
        },
    ] {
        let r = node
            .runs()
            .list_runs(as_tenant(
                "acme",
                pb::ListRunsRequest {
                    page_size: 1,
                    page_token: first.next_page_token.clone(),
                    ..other_filters
                },
            ))
            .await;
        assert_eq!(invalid_field(r), "page_token");
    }
    // Bad filters name their field.
    let bad = |req: pb::ListRunsRequest| {
        let node = &node;
        async move { invalid_field(node.runs().list_runs(as_tenant("acme", req)).await) }
    };
    assert_eq!(
        bad(pb::ListRunsRequest {
            states: vec![pb::RunState::Unspecified as i32],
            ..Default::default()
        })
        .await,
        "states[0]"
    );
    assert_eq!(
        bad(pb::ListRunsRequest {
            states: vec![pb::RunState::Failed as i32; 9],
            ..Default::default()
        })
        .await,
        "states"
    );
    assert_eq!(
        bad(pb::ListRunsRequest {
            trigger: 42,
            ..Default::default()
        })
        .await,
        "trigger"
    );
    assert_eq!(
        bad(pb::ListRunsRequest {
            order: 42,
            ..Default::default()
        })
        .await,
        "order"
    );
    assert_eq!(
        bad(pb::ListRunsRequest {
            definition: "NO".into(),
            ..Default::default()
        })
        .await,
        "definition"
    );
    assert_eq!(
        bad(pb::ListRunsRequest {
            node: "n".repeat(129),
            ..Default::default()
        })
        .await,
        "node"
    );
    assert_eq!(
        bad(pb::ListRunsRequest {
            scheduled_start_time: Some(ts(now)),
            scheduled_end_time: Some(ts(now)),
            ..Default::default()
        })
        .await,
        "scheduled_end_time"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stats_equal_what_list_runs_shows() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let start = now_secs();
    let b = define_and_bind(&node, "acme", flaky("flaky")).await;
    // Durations from ~0 to 300 ms, some failures; triggered in a burst so
    // that later runs wait (fire lags spread too).
    let mut triggered = Vec::new();
    for (i, s) in ["0.3", "0.05", "0", "0.1", "0.2", "0", "0.15", "0.02"]
        .iter()
        .enumerate()
    {
        let params = if i % 3 == 2 {
            serde_json::json!({"mode": "fail"})
        } else {
            serde_json::json!({"s": s})
        };
        triggered.push(
            node.runs()
                .trigger_run(as_tenant(
                    "acme",
                    pb::TriggerRunRequest {
                        binding_id: b.id.clone(),
                        params: sked::grpc::convert::json_to_struct(&params),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    // Event runs of another binding, fired by the scheduler every second
    // (written SUCCEEDED where they are created), then paused.
    let ticks = define_and_bind(&node, "acme", event_def("ticks", every(1))).await;
    for r in &triggered {
        wait_terminal(&node, "acme", &r.id).await;
    }
    runs_until(&node, "acme", &ticks.id, WAIT, "ticks fire", |runs| {
        runs.len() >= 3
    })
    .await;
    pause(&node, "acme", &ticks.id).await;
    // Another tenant's runs count only for it.
    let other = bind_existing(&node, "other", "flaky").await;
    run_with(
        &node,
        "other",
        &other.id,
        serde_json::json!({"mode": "fail"}),
    )
    .await;

    let window = (start - 60.0, now_secs() + 60.0);
    let stats = |tenant: &str, binding: &str, definition: &str| {
        let node = &node;
        let (tenant, binding, definition) = (
            tenant.to_string(),
            binding.to_string(),
            definition.to_string(),
        );
        async move {
            node.runs()
                .get_run_stats(as_tenant(
                    &tenant,
                    pb::GetRunStatsRequest {
                        binding_id: binding,
                        definition,
                        start_time: Some(ts(window.0)),
                        end_time: Some(ts(window.1)),
                        interval: pb::StatsInterval::Hour as i32,
                    },
                ))
                .await
                .expect("stats")
                .into_inner()
        }
    };
    let check = |what: &str, s: &pb::RunStats, runs: &[pb::Run]| {
        let count = |st: pb::RunState| runs.iter().filter(|r| state(r) == st).count() as i64;
        let c = s.counts.expect("counts");
        assert_eq!(c.succeeded, count(pb::RunState::Succeeded), "{what}");
        assert_eq!(c.failed, count(pb::RunState::Failed), "{what}");
        assert_eq!(c.timed_out, count(pb::RunState::TimedOut), "{what}");
        assert_eq!(c.cancelled, count(pb::RunState::Cancelled), "{what}");
        assert_eq!(c.skipped, count(pb::RunState::Skipped), "{what}");
        assert_eq!(s.total, runs.len() as i64, "{what}");
        let judged = c.succeeded + c.failed + c.timed_out;
        assert_eq!(
            s.success_rate,
            (judged > 0).then(|| c.succeeded as f64 / judged as f64),
            "{what}"
        );
        let started: Vec<&pb::Run> = runs.iter().filter(|r| r.start_time.is_some()).collect();
        assert_eq!(s.started, started.len() as i64, "{what}");
        let durations: Vec<i64> = started
            .iter()
            .map(|r| micros(&r.end_time) - micros(&r.start_time))
            .collect();
        let lags: Vec<i64> = started
            .iter()
            .map(|r| (micros(&r.start_time) - micros(&r.scheduled_time)).max(0))
            .collect();
        assert_eq!(
            dur_micros(&s.duration_max),
            *durations.iter().max().unwrap(),
            "{what}"
        );
        let mean = durations.iter().sum::<i64>() as f64 / durations.len() as f64;
        assert!(
            (dur_micros(&s.duration_mean) as f64 - mean).abs() <= 1.0,
            "{what}: mean {:?} vs {mean}",
            s.duration_mean
        );
        assert_within_bucket(
            &format!("{what} duration p50"),
            dur_micros(&s.duration_p50),
            nearest_rank(&durations, 50.0),
        );
        assert_within_bucket(
            &format!("{what} duration p95"),
            dur_micros(&s.duration_p95),
            nearest_rank(&durations, 95.0),
        );
        assert_within_bucket(
            &format!("{what} lag p50"),
            dur_micros(&s.fire_lag_p50),
            nearest_rank(&lags, 50.0),
        );
        assert_within_bucket(
            &format!("{what} lag p99"),
            dur_micros(&s.fire_lag_p99),
            nearest_rank(&lags, 99.0),
        );
        // The series adds up to the totals, one bucket per hour.
        let sum: i64 = s
            .series
            .iter()
            .map(|b| {
                let c = b.counts.unwrap();
                c.succeeded + c.failed + c.timed_out + c.cancelled + c.skipped
            })
            .sum();
        assert_eq!(sum, s.total, "{what}");
        assert_eq!(
            s.series.len() as i64,
            (micros(&s.end_time) - micros(&s.start_time)) / 3_600_000_000,
            "{what}"
        );
    };
    let in_window = |r: &pb::Run| {
        let t = secs(&r.scheduled_time);
        t >= window.0 && t < window.1
    };
    // Three times: from the unfolded rows the run ends wrote; after the
    // leader's fold moved them all into the folded tables (a cut-off past
    // now also takes this hour's); with a run ended since, so the answer
    // adds folded rows and an unfolded one of the same hour.
    let pool = db.pool().await;
    for round in 0..3usize {
        if round == 1 {
            // Run ends first reach run_stats_delta; every node moves them
            // into run_stats every 5 s (this one too, concurrently: a
            // partition it is moving is skipped here and its rows land in
            // run_stats when it commits, hence the retries).
            let drain = async || {
                for part in 0..sked::db::runs::RUN_STATS_DELTA_PARTS {
                    while sked::db::runs::run_stats_delta_fold(&pool, part, 2)
                        .await
                        .expect("delta fold")
                        == 2
                    {}
                }
            };
            drain().await;
            let folded = sked::db::runs::run_stats_fold(
                &pool,
                chrono::Utc::now() + chrono::TimeDelta::hours(2),
                2,
            )
            .await
            .expect("fold");
            assert_eq!(folded, 2, "a batch is bounded by its limit");
            let mut left = -1i64;
            for _ in 0..50 {
                drain().await;
                while sked::db::runs::run_stats_fold(
                    &pool,
                    chrono::Utc::now() + chrono::TimeDelta::hours(2),
                    2,
                )
                .await
                .expect("fold")
                    == 2
                {}
                left = sqlx::query_scalar(
                    "SELECT (SELECT count(*) FROM run_stats) + (SELECT count(*) FROM run_stats_delta)",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if left == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert_eq!(left, 0, "every row folded");
        }
        if round == 2 {
            let r = run_with(&node, "acme", &b.id, serde_json::json!({"s": "0.05"})).await;
            assert_eq!(state(&r), pb::RunState::Succeeded);
        }
        let binding_runs: Vec<pb::Run> = runs_of(&node, "acme", &b.id)
            .await
            .into_iter()
            .filter(in_window)
            .collect();
        assert_eq!(
            binding_runs.len(),
            triggered.len() + usize::from(round == 2)
        );
        assert!(binding_runs.iter().all(is_terminal));
        check("binding", &stats("acme", &b.id, "").await, &binding_runs);
        let tenant_runs: Vec<pb::Run> = list_runs(&node, "acme", pb::ListRunsRequest::default())
            .await
            .into_iter()
            .filter(in_window)
            .collect();
        assert!(tenant_runs.iter().all(is_terminal));
        let s = stats("acme", "", "").await;
        check("tenant", &s, &tenant_runs);
        assert!(
            micros(&s.start_time) % 3_600_000_000 == 0 && micros(&s.end_time) % 3_600_000_000 == 0,
            "the window is widened to whole hours"
        );
        // The definition across tenants (a platform caller, no tenant named),
        // and narrowed to one tenant.
        let mut flaky_runs = binding_runs.clone();
        flaky_runs.extend(runs_of(&node, "other", &other.id).await);
        check("definition", &stats("", "", "flaky").await, &flaky_runs);
        check(
            "definition of acme",
            &stats("acme", "", "flaky").await,
            &binding_runs,
        );
        // The other tenant sees only its own.
        let theirs = stats("other", "", "").await;
        assert_eq!(theirs.total, 1);
        assert_eq!(theirs.counts.unwrap().failed, 1);
    }
    // The binding's status agrees with its last run.
    let seen = get_binding(&node, "acme", &b.id).await;
    let binding_runs = runs_of(&node, "acme", &b.id).await;
    let last = binding_runs
        .iter()
        .max_by_key(|r| (micros(&r.end_time), r.id.clone()))
        .unwrap();
    assert_eq!(seen.last_run.unwrap().run_id, last.id);
    let ticked = get_binding(&node, "acme", &ticks.id).await;
    assert_eq!(
        ticked.last_run.unwrap().state,
        pb::RunState::Succeeded as i32,
        "event runs written SUCCEEDED by the scheduler are recorded too"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stats_refuse_bad_input_and_other_tenants() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", flaky("flaky")).await;
    let now = now_secs();
    let req = |binding: &str, definition: &str, from: f64, to: f64| pb::GetRunStatsRequest {
        binding_id: binding.into(),
        definition: definition.into(),
        start_time: Some(ts(from)),
        end_time: Some(ts(to)),
        interval: 0,
    };
    let call = |tenant: &str, r: pb::GetRunStatsRequest| {
        let node = &node;
        let tenant = tenant.to_string();
        async move { node.runs().get_run_stats(as_tenant(&tenant, r)).await }
    };
    let field = |r| invalid_field(r);
    assert_eq!(
        field(call("acme", req(&b.id, "", now, now)).await),
        "end_time",
        "an empty window"
    );
    assert_eq!(
        field(call("acme", req(&b.id, "", now - 401.0 * 86400.0, now)).await),
        "end_time",
        "longer than 400 days"
    );
    let mut hourly = req("", "", now - 40.0 * 86400.0, now);
    hourly.interval = pb::StatsInterval::Hour as i32;
    assert_eq!(field(call("acme", hourly).await), "interval");
    assert_eq!(
        field(call("acme", req(&b.id, "flaky", now - 60.0, now)).await),
        "definition",
        "both a binding and a definition"
    );
    assert_eq!(
        field(call("acme", req("nope", "", now - 60.0, now)).await),
        "binding_id"
    );
    assert_eq!(
        field(call("", req("", "Bad Name", now - 60.0, now)).await),
        "definition"
    );
    let mut no_start = req("", "", now - 60.0, now);
    no_start.start_time = None;
    assert_eq!(field(call("acme", no_start).await), "start_time");
    // The tenant of the call is required for a binding or the tenant.
    assert_eq!(
        field(call("", req("", "", now - 60.0, now)).await),
        "x-tenant-id"
    );
    // Another tenant's binding is not found, not empty.
    let r = call("other", req(&b.id, "", now - 60.0, now)).await;
    assert_eq!(r.expect_err("not theirs").code(), Code::NotFound);
    // A day series by default past two days.
    let s = call("acme", req("", "", now - 5.0 * 86400.0, now))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.interval, pb::StatsInterval::Day as i32);
    assert!((5..=6).contains(&s.series.len()), "{}", s.series.len());
    assert_eq!(s.total, 0);
    assert!(s.duration_p50.is_none() && s.success_rate.is_none());
    node.stop().await;
}

/// With keys: a tenant key reads only its own tenant's statistics, and the
/// definition's (across tenants) is for the platform only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stats_keep_tenants_apart() {
    let db = TestDb::new().await;
    let root = sked::app::bootstrap_key(&db.url, "root")
        .await
        .expect("bootstrap key");
    let mut s = settings(&db, "secure");
    s.auth = true;
    let node = TestNode::start_with(s).await;
    let key = |tenant: &str| {
        let node = &node;
        let root = root.clone();
        let tenant = tenant.to_string();
        async move {
            node.admin()
                .create_api_key(with_key(
                    &root,
                    pb::CreateApiKeyRequest {
                        name: format!("{tenant}-viewer"),
                        role: pb::Role::Operator as i32,
                        tenant_id: tenant,
                    },
                ))
                .await
                .expect("create key")
                .into_inner()
                .token
        }
    };
    let acme = key("acme").await;
    let other = key("other").await;
    let b = define_and_bind_via(&node.channel, "acme", Some(&root), flaky("flaky")).await;
    let run = trigger_via(&node.channel, "acme", Some(&acme), &b.id).await;
    let run = tokio::time::timeout(WAIT, async {
        loop {
            let r = node
                .runs()
                .get_run(with_key(
                    &acme,
                    pb::GetRunRequest {
                        run_id: run.id.clone(),
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            if is_terminal(&r) {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the run ends");
    let now = now_secs();
    let req = |binding: &str, definition: &str| pb::GetRunStatsRequest {
        binding_id: binding.into(),
        definition: definition.into(),
        start_time: Some(ts(secs(&run.scheduled_time) - 60.0)),
        end_time: Some(ts(now + 60.0)),
        interval: 0,
    };
    let total = |r: Result<tonic::Response<pb::RunStats>, tonic::Status>| {
        r.expect("stats").into_inner().total
    };
    assert_eq!(
        total(
            node.runs()
                .get_run_stats(with_key(&acme, req("", "")))
                .await
        ),
        1
    );
    assert_eq!(
        total(
            node.runs()
                .get_run_stats(with_key(&acme, req(&b.id, "")))
                .await
        ),
        1
    );
    assert_eq!(
        total(
            node.runs()
                .get_run_stats(with_key(&other, req("", "")))
                .await
        ),
        0
    );
    let r = node
        .runs()
        .get_run_stats(with_key(&other, req(&b.id, "")))
        .await;
    assert_eq!(r.expect_err("not theirs").code(), Code::NotFound);
    // Naming another tenant is refused.
    let r = node
        .runs()
        .get_run_stats(request("acme", Some(&other), req("", "")))
        .await;
    assert_eq!(
        r.expect_err("another tenant").code(),
        Code::PermissionDenied
    );
    // A definition's statistics span tenants: platform keys only.
    let r = node
        .runs()
        .get_run_stats(with_key(&acme, req("", "flaky")))
        .await;
    assert_eq!(r.expect_err("platform only").code(), Code::PermissionDenied);
    assert_eq!(
        total(
            node.runs()
                .get_run_stats(with_key(&root, req("", "flaky")))
                .await
        ),
        1
    );
    // Without any key: refused before anything is read.
    let r = node
        .runs()
        .get_run_stats(as_tenant("acme", req("", "")))
        .await;
    assert_eq!(r.expect_err("no key").code(), Code::Unauthenticated);
    node.stop().await;
}

/// Runs of many hours ended by one statement (a backfill's event runs,
/// claimed together), then more of older hours: the hourly series and the
/// percentiles still equal what ListRuns shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stats_series_follow_the_fire_times_across_hours() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", event_def("tenmin", every(600))).await;
    let now = now_secs();
    for (from, to) in [
        (now - 3.0 * 3600.0, now - 600.0),
        (now - 7.0 * 3600.0, now - 5.0 * 3600.0),
    ] {
        let r = node
            .runs()
            .backfill_runs(as_tenant(
                "acme",
                pb::BackfillRunsRequest {
                    binding_id: b.id.clone(),
                    start_time: Some(ts(from)),
                    end_time: Some(ts(to)),
                    dry_run: false,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(r.run_ids.len() >= 10, "{r:?}");
        runs_until(&node, "acme", &b.id, WAIT, "the backfill ends", |runs| {
            runs.iter().all(is_terminal)
        })
        .await;
    }
    let runs = runs_of(&node, "acme", &b.id).await;
    let start = (now / 3600.0).floor() * 3600.0 - 8.0 * 3600.0;
    let s = node
        .runs()
        .get_run_stats(as_tenant(
            "acme",
            pb::GetRunStatsRequest {
                start_time: Some(ts(start)),
                end_time: Some(ts(now + 1.0)),
                interval: pb::StatsInterval::Hour as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.total, runs.len() as i64);
    assert_eq!(s.counts.unwrap().succeeded, runs.len() as i64);
    assert_eq!(s.series.len(), 9);
    for bucket in &s.series {
        let from = secs(&bucket.start_time);
        let want = runs
            .iter()
            .filter(|r| {
                let t = secs(&r.scheduled_time);
                t >= from && t < from + 3600.0
            })
            .count() as i64;
        assert_eq!(bucket.counts.unwrap().succeeded, want, "hour at {from}");
    }
    let lags: Vec<i64> = runs
        .iter()
        .map(|r| micros(&r.start_time) - micros(&r.scheduled_time))
        .collect();
    assert_within_bucket(
        "lag p50",
        dur_micros(&s.fire_lag_p50),
        nearest_rank(&lags, 50.0),
    );
    assert_within_bucket(
        "lag p99",
        dur_micros(&s.fire_lag_p99),
        nearest_rank(&lags, 99.0),
    );
    // A day series of the same window adds up the same.
    let d = node
        .runs()
        .get_run_stats(as_tenant(
            "acme",
            pb::GetRunStatsRequest {
                binding_id: b.id.clone(),
                start_time: Some(ts(start)),
                end_time: Some(ts(now + 1.0)),
                interval: pb::StatsInterval::Day as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let day_sum: i64 = d.series.iter().map(|b| b.counts.unwrap().succeeded).sum();
    assert_eq!(day_sum, runs.len() as i64);
    assert!((1..=2).contains(&d.series.len()));
    node.stop().await;
}

/// Run ends reach the statistics through `run_stats_delta`, which folds
/// move into `run_stats` (and past hours into the folded tables) while
/// GetRunStats reads: every read, whatever fold commits meanwhile, counts
/// each ended run exactly once.
#[tokio::test]
async fn run_stats_stay_exact_while_run_ends_are_folded() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let start = now_secs();
    let ticks = define_and_bind(&node, "acme", event_def("ticks", every(1))).await;
    runs_until(&node, "acme", &ticks.id, WAIT, "ticks fire", |runs| {
        runs.len() >= 6
    })
    .await;
    pause(&node, "acme", &ticks.id).await;
    let n = runs_of(&node, "acme", &ticks.id).await.len() as i64;
    let pool = db.pool().await;
    let delta: i64 = sqlx::query_scalar("SELECT count(*) FROM run_stats_delta")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(delta <= n, "one delta row per ended run at most");
    let parts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'run_stats_delta'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        parts,
        i64::from(sked::db::runs::RUN_STATS_DELTA_PARTS),
        "the fold visits every partition"
    );
    // Folds in batches of one, as fast as they go, while reading.
    let folding = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut moved = 0;
            // Every partition in turn, 25 times each.
            for i in 0..200u32 {
                let part = i % sked::db::runs::RUN_STATS_DELTA_PARTS;
                moved += sked::db::runs::run_stats_delta_fold(&pool, part, 1)
                    .await
                    .expect("delta fold");
                sked::db::runs::run_stats_fold(
                    &pool,
                    chrono::Utc::now() + chrono::TimeDelta::hours(2),
                    1,
                )
                .await
                .expect("fold");
            }
            moved
        })
    };
    let req = pb::GetRunStatsRequest {
        binding_id: ticks.id.clone(),
        start_time: Some(ts(start - 60.0)),
        end_time: Some(ts(now_secs() + 60.0)),
        ..Default::default()
    };
    let mut reads = 0;
    while !folding.is_finished() || reads < 20 {
        let s = node
            .runs()
            .get_run_stats(as_tenant("acme", req.clone()))
            .await
            .expect("stats")
            .into_inner();
        assert_eq!(s.total, n, "read {reads}: every ended run once");
        assert_eq!(s.counts.unwrap().succeeded, n);
        reads += 1;
    }
    folding.await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM run_stats_delta")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "every run end moved");
    node.stop().await;
}

/// Movers of `run_stats_delta` into `run_stats` running at once (every
/// node runs one, and the leader's catch-up another) move each run end
/// exactly once: 6 movers in batches of 1 to 50 over every partition, 3 000
/// run ends of 40 bindings over two hours; then every count, duration sum
/// and histogram total in `run_stats` equals the rows written. A mover of
/// a partition another transaction is moving moves nothing and waits for
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_movers_of_run_ends_move_each_exactly_once() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    sked::db::migrate(&pool).await.expect("migrate");
    const ENDS: i64 = 3000;
    // Written directly: the movers' input, without a node (whose own
    // mover would take part; it is tested above through the API).
    sqlx::query(
        "INSERT INTO run_stats_delta (binding_id, hour, tenant_id, definition, state, lag_b, dur_b, lag_us, dur_us)
         SELECT ('00000000-0000-7000-8000-' || lpad((i % 40)::text, 12, '0'))::uuid,
                date_trunc('hour', now()) - ((i / 40) % 2) * interval '1 hour', 'acme', 'ticks',
                CASE WHEN i % 3 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END,
                i % 7, i % 5, (i % 7) * 1000, i * 10
         FROM generate_series(1, $1) AS i",
    )
    .bind(ENDS)
    .execute(&pool)
    .await
    .unwrap();

    // A mover finds partition 0 taken by another transaction: nothing
    // moved, at once.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
        .bind(sked::db::runs::STATS_FOLD_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    let in_part0: i64 = sqlx::query_scalar("SELECT count(*) FROM run_stats_delta_0")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(in_part0 > 0, "the 40 bindings hash into partition 0 too");
    let t0 = std::time::Instant::now();
    let moved = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        sked::db::runs::run_stats_delta_fold(&pool, 0, 1000),
    )
    .await
    .expect("a mover does not wait for another")
    .expect("delta fold");
    assert_eq!(moved, 0, "a partition being moved is left to its mover");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    holder.rollback().await.unwrap();

    let movers: Vec<_> = (0..6u32)
        .map(|m| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut moved = 0i64;
                let limit = [1i64, 7, 50][m as usize % 3];
                // Until a whole round over the partitions moves nothing
                // here and nothing is left anywhere.
                loop {
                    let mut round = 0;
                    for i in 0..sked::db::runs::RUN_STATS_DELTA_PARTS {
                        let part = (i + m) % sked::db::runs::RUN_STATS_DELTA_PARTS;
                        round += sked::db::runs::run_stats_delta_fold(&pool, part, limit)
                            .await
                            .expect("delta fold");
                    }
                    moved += round;
                    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM run_stats_delta")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                    if round == 0 && left == 0 {
                        return moved;
                    }
                }
            })
        })
        .collect();
    let mut moved = 0;
    for m in movers {
        moved += m.await.unwrap();
    }
    assert_eq!(
        moved, ENDS,
        "the movers moved every run end once between them"
    );
    let (ok, failed, started, dur_sum, lag_n, dur_n): (i64, i64, i64, f64, i64, i64) =
        sqlx::query_as(
            "SELECT sum(succeeded)::int8, sum(failed)::int8, sum(started)::int8, sum(duration_sum_us),
                    (SELECT coalesce(sum(x), 0)::int8 FROM run_stats, unnest(lag_hist) x),
                    (SELECT coalesce(sum(x), 0)::int8 FROM run_stats, unnest(duration_hist) x)
             FROM run_stats",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
    let want_failed = ENDS / 3;
    assert_eq!((ok, failed), (ENDS - want_failed, want_failed));
    assert_eq!((started, lag_n, dur_n), (ENDS, ENDS, ENDS));
    assert_eq!(dur_sum, (1..=ENDS).map(|i| (i * 10) as f64).sum::<f64>());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM run_stats")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 80, "one row per binding and hour");
}
