//! Schedules across downtime: misfire policies, through the API. The nodes
//! share a clock that the test moves forward to simulate the outage.

use std::time::Duration;

use crate::common::*;
use sked::domain::Clock;
use sked::proto::v1 as pb;

fn terminal(r: &pb::Run) -> bool {
    [
        pb::RunState::Succeeded,
        pb::RunState::Failed,
        pb::RunState::Skipped,
    ]
    .iter()
    .any(|s| *s as i32 == r.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_downtime_applies_each_misfire_policy() {
    let db = TestDb::new().await;
    let clock = Clock::system();
    let mut s = settings(&db, "before");
    s.clock = clock.clone();
    let node = TestNode::start_with(s).await;

    let mut bindings = Vec::new();
    for (name, mode) in [
        ("once", pb::MisfireMode::RunOnce),
        ("all", pb::MisfireMode::RunAll),
        ("skip", pb::MisfireMode::Skip),
    ] {
        let mut def = sh_def(name, "echo ran", every(20));
        def.misfire_policy = Some(pb::MisfirePolicy {
            catchup_window: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            mode: mode as i32,
        });
        // Catch-up runs of one pass overlap each other: ALLOW lets RUN_ALL
        // run every one (under the default SKIP only the first would run).
        def.overlap_policy = pb::OverlapPolicy::Allow as i32;
        bindings.push(define_and_bind(&node, "acme", def).await);
    }
    // Down before the first fire; 309 s pass (15 fire times: t0+20 .. t0+300).
    node.stop().await;
    clock.advance(chrono::Duration::seconds(309));
    let mut s = settings(&db, "after");
    s.clock = clock.clone();
    let node = TestNode::start_with(s).await;

    let t0 = bindings[0].create_time.unwrap().seconds;
    let expect_times: Vec<i64> = (1..=15).map(|k| k * 20).collect();
    for (b, (want_runs, name)) in bindings.iter().zip([
        (vec![300], "once"),
        (vec![260, 280, 300], "all"),
        (vec![], "skip"),
    ]) {
        let offset = b.create_time.unwrap().seconds - t0;
        let runs = tokio::time::timeout(WAIT, async {
            loop {
                let runs: Vec<pb::Run> = runs_of(&node, "acme", &b.id)
                    .await
                    .into_iter()
                    .filter(|r| r.scheduled_time.unwrap().seconds - t0 - offset <= 300)
                    .collect();
                if runs.len() == 15 && runs.iter().all(terminal) {
                    return runs;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: 15 terminal runs for the missed fire times"));
        let b_t0 = b.create_time.unwrap().seconds;
        let times: Vec<i64> = runs
            .iter()
            .map(|r| r.scheduled_time.unwrap().seconds - b_t0)
            .collect();
        assert_eq!(
            times, expect_times,
            "{name}: every missed fire time is in the history, once"
        );
        let ran: Vec<i64> = runs
            .iter()
            .filter(|r| r.state == pb::RunState::Succeeded as i32)
            .map(|r| r.scheduled_time.unwrap().seconds - b_t0)
            .collect();
        assert_eq!(ran, want_runs, "{name}: runs per misfire mode");
        for r in runs
            .iter()
            .filter(|r| r.state != pb::RunState::Succeeded as i32)
        {
            assert_eq!(r.state, pb::RunState::Skipped as i32, "{name}");
            assert_eq!(r.reason, "misfire", "{name}");
            assert_eq!(r.trigger, pb::RunTrigger::Schedule as i32);
        }
        // The binding goes on firing: its next fire is the one after the outage.
        let binding = node
            .bindings()
            .get_binding(as_tenant(
                "acme",
                pb::GetBindingRequest {
                    binding_id: b.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(binding.next_run_time.unwrap().seconds - b_t0, 320, "{name}");
    }
    // A skipped run's history says why.
    let skipped = runs_of(&node, "acme", &bindings[2].id).await;
    let events = tail_all(&node, "acme", &skipped[0].id, 0).await;
    assert_eq!(events.len(), 1);
    match &events[0].kind {
        Some(pb::run_event::Kind::StateChanged(s)) => {
            assert_eq!(
                (s.to_state, s.reason.as_str()),
                (pb::RunState::Skipped as i32, "misfire")
            );
        }
        other => panic!("{other:?}"),
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_misfire_policy_is_rejected() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut def = sh_def("x", "true", every(5));
    def.misfire_policy = Some(pb::MisfirePolicy {
        catchup_window: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        mode: 0,
    });
    let s = node
        .definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(def.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violation_fields(&s),
        ["definition.misfire_policy.catchup_window"]
    );
    def.misfire_policy = Some(pb::MisfirePolicy {
        catchup_window: None,
        mode: 42,
    });
    let s = node
        .definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(def),
        })
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["definition.misfire_policy.mode"]);
    node.stop().await;
}
