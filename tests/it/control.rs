//! Run control through the API (SPEC §3): overlap policies, retries with
//! backoff, timeouts, cancel across nodes, pause/resume, enable/disable,
//! delayed and idempotent triggers, the per-node concurrency limit, and the
//! status codes of rejected calls.

use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;

/// Lets a binding fire for `secs`, ends its effective window (it fires no
/// more; unlike a delete or pause, that leaves its runs alone), then waits
/// until every run it made has ended; returns them.
async fn fire_for(node: &TestNode, b: &pb::Binding, secs: u64) -> Vec<pb::Run> {
    tokio::time::sleep(Duration::from_secs(secs)).await;
    node.bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    effective_until: Some(ts(now_secs())),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["effective_until".into()],
                }),
            },
        ))
        .await
        .unwrap();
    runs_until(
        node,
        "acme",
        &b.id,
        Duration::from_secs(40),
        "every run ends",
        |runs| runs.iter().all(is_terminal),
    )
    .await
}

/// Execution intervals `[start, end]` of the runs that ran, by start.
fn intervals(runs: &[pb::Run]) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = runs
        .iter()
        .filter(|r| r.start_time.is_some())
        .map(|r| (secs(&r.start_time), secs(&r.end_time)))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

fn overlapping(iv: &[(f64, f64)]) -> bool {
    iv.windows(2).any(|w| w[1].0 < w[0].1)
}

fn overlap_skips(runs: &[pb::Run]) -> usize {
    runs.iter()
        .filter(|r| state(r) == pb::RunState::Skipped && r.reason == "overlap")
        .count()
}

async fn bind_with_overlap(
    node: &TestNode,
    name: &str,
    script: &str,
    policy: pb::OverlapPolicy,
) -> pb::Binding {
    let mut def = sh_def(name, script, every(1));
    def.overlap_policy = policy as i32;
    define_and_bind(node, "acme", def).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_records_skipped_overlap_runs_and_never_runs_two_at_once() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = bind_with_overlap(&node, "skip", "sleep 3", pb::OverlapPolicy::Skip).await;
    let runs = fire_for(&node, &b, 7).await;
    let iv = intervals(&runs);
    assert!(iv.len() >= 2, "at least two runs ran: {iv:?}");
    assert!(!overlapping(&iv), "never two running: {iv:?}");
    assert!(
        overlap_skips(&runs) >= 3,
        "fires during a run are SKIPPED/overlap"
    );
    for r in &runs {
        assert!(
            matches!(state(r), pb::RunState::Succeeded | pb::RunState::Skipped),
            "{r:?}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_allow_runs_fires_concurrently() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = bind_with_overlap(&node, "allow", "sleep 3", pb::OverlapPolicy::Allow).await;
    let runs = fire_for(&node, &b, 4).await;
    let iv = intervals(&runs);
    assert!(overlapping(&iv), "runs overlap under ALLOW: {iv:?}");
    assert_eq!(overlap_skips(&runs), 0);
    assert!(runs.iter().all(|r| state(r) == pb::RunState::Succeeded));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_buffer_one_keeps_at_most_one_waiting_and_starts_it_next() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = bind_with_overlap(&node, "buffer", "sleep 2", pb::OverlapPolicy::BufferOne).await;
    let runs = fire_for(&node, &b, 7).await;
    let iv = intervals(&runs);
    assert!(iv.len() >= 3, "{iv:?}");
    assert!(!overlapping(&iv), "never two running: {iv:?}");
    assert!(
        overlap_skips(&runs) >= 2,
        "fires beyond the buffer are skipped"
    );
    // Waiting = created, not yet started. At every creation instant at most
    // one run waits.
    let ran: Vec<&pb::Run> = runs.iter().filter(|r| r.start_time.is_some()).collect();
    for r in &ran {
        let t = secs(&r.create_time);
        let waiting = ran
            .iter()
            .filter(|x| secs(&x.create_time) <= t && t < secs(&x.start_time))
            .count();
        assert!(waiting <= 1, "{waiting} runs waiting at {t}");
    }
    // The buffered run starts as soon as the one before it ends.
    for w in iv.windows(2) {
        if w[1].0 > w[0].1 {
            continue;
        }
        assert!(w[1].0 - w[0].1 < 1.0, "buffered run starts promptly: {w:?}");
    }
    assert!(
        iv.windows(2).any(|w| w[1].0 - w[0].1 < 0.5),
        "a buffered run followed its predecessor at once: {iv:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_cancel_previous_cancels_the_running_one_before_starting() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "n1");
    s.kill_grace = Duration::from_secs(1);
    let node = TestNode::start_with(s).await;
    let mut def = sh_def("cancelprev", "echo start; sleep 30", every(2));
    def.overlap_policy = pb::OverlapPolicy::CancelPrevious as i32;
    let b = define_and_bind(&node, "acme", def).await;
    let runs = fire_for(&node, &b, 5).await;
    let ran: Vec<&pb::Run> = runs.iter().filter(|r| r.start_time.is_some()).collect();
    assert!(ran.len() >= 2, "{runs:?}");
    let cancelled: Vec<&&pb::Run> = ran
        .iter()
        .filter(|r| state(r) == pb::RunState::Cancelled && r.reason == "overlap")
        .collect();
    assert!(
        !cancelled.is_empty(),
        "a running run was cancelled by the next fire"
    );
    let iv = intervals(&runs);
    assert!(
        !overlapping(&iv),
        "the new run starts only after the old one stopped: {iv:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_twice_then_succeeding_makes_three_runs_linked_by_retry_of_spaced_by_backoff() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let state_file =
        std::env::temp_dir().join(format!("sked-retry-{}", uuid::Uuid::new_v4().simple()));
    let script = format!(
        "f={}; n=$(cat $f 2>/dev/null || echo 0); n=$((n+1)); echo $n > $f; \
         echo attempt $SKED_ATTEMPT; [ $n -ge 3 ] || exit 1",
        state_file.display()
    );
    let mut def = sh_def("flaky", &script, manual());
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 3,
        initial_backoff: Some(dur(1000)),
        backoff_coefficient: 2.0,
        max_backoff: Some(dur(10_000)),
    });
    let b = define_and_bind(&node, "acme", def).await;
    let first = trigger(&node, "acme", &b.id).await;
    let runs = runs_until(&node, "acme", &b.id, WAIT, "three attempts end", |runs| {
        runs.len() >= 3 && runs.iter().all(is_terminal)
    })
    .await;
    let _ = std::fs::remove_file(&state_file);
    let mut runs = runs;
    runs.sort_by_key(|r| r.attempt);
    assert_eq!(runs.len(), 3, "exactly three runs");
    assert_eq!(runs[0].id, first.id);
    let states: Vec<pb::RunState> = runs.iter().map(state).collect();
    assert_eq!(
        states,
        [
            pb::RunState::Failed,
            pb::RunState::Failed,
            pb::RunState::Succeeded
        ]
    );
    for (k, r) in runs.iter().enumerate() {
        assert_eq!(r.attempt, k as i32 + 1);
        assert_eq!(r.max_attempts, 3);
    }
    for k in 1..3 {
        let (prev, r) = (&runs[k - 1], &runs[k]);
        assert_eq!(r.trigger, pb::RunTrigger::Retry as i32);
        assert_eq!(
            r.retry_of,
            prev.id,
            "attempt {} links its predecessor",
            k + 1
        );
        // Backoff 1 s then 2 s, ±10 % jitter, from the failed attempt's end.
        let backoff = 1.0 * 2f64.powi(k as i32 - 1);
        let delay = secs(&r.not_before) - secs(&prev.end_time);
        assert!(
            delay >= backoff * 0.9 - 0.002 && delay <= backoff * 1.1 + 0.002,
            "retry {k} delayed {delay:.3}s, backoff {backoff}s ±10%"
        );
        let late = secs(&r.start_time) - secs(&r.not_before);
        assert!(
            (0.0..1.0).contains(&late),
            "retry started {late:.3}s after due"
        );
    }
    node.stop().await;
}

/// Whether process group `pgid` still has a member.
fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::killpg(pgid, 0) == 0 }
}

async fn wait_group_gone(pgid: i32) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while group_alive(pgid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("process group {pgid} is gone"));
}

fn pid_from_logs(events: &[pb::RunEvent]) -> i32 {
    log_lines(events)
        .iter()
        .find_map(|l| l.strip_prefix("pid ").and_then(|p| p.trim().parse().ok()))
        .expect("the script printed its pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_terminates_the_whole_process_group_and_kills_one_ignoring_sigterm() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "n1");
    s.kill_grace = Duration::from_secs(1);
    let node = TestNode::start_with(s).await;
    for (name, script, min, max) in [
        // A child in the background: the group, not just sh, must go.
        ("polite", "echo pid $$; sleep 60 & wait", 1.0, 1.9),
        (
            "stubborn",
            "trap '' TERM; echo pid $$; while :; do sleep 0.2; done",
            2.0,
            3.5,
        ),
    ] {
        let mut def = sh_def(name, script, manual());
        def.timeout = Some(dur(1000));
        let b = define_and_bind(&node, "acme", def).await;
        let run = trigger(&node, "acme", &b.id).await;
        let events = tail_all(&node, "acme", &run.id, 0).await;
        let run = node
            .runs()
            .get_run(as_tenant("acme", pb::GetRunRequest { run_id: run.id }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&run), pb::RunState::TimedOut, "{name}");
        assert_eq!(run.reason, "timeout", "{name}");
        let took = secs(&run.end_time) - secs(&run.start_time);
        assert!(
            took >= min && took <= max,
            "{name}: ended after {took:.2}s, expected {min}-{max}s"
        );
        wait_group_gone(pid_from_logs(&events)).await;
        assert!(
            log_lines(&events).iter().any(|l| l.starts_with("timeout:")),
            "{name}: the log says why it was terminated"
        );
        assert_eq!(
            runs_of(&node, "acme", &b.id).await.len(),
            1,
            "{name}: no retry"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_another_node_stops_the_run_within_2s_and_does_not_retry() {
    let db = TestDb::new().await;
    let a = TestNode::start(&db, "a").await;
    let mut s = settings(&db, "b");
    s.max_concurrent_runs = 0;
    let b_node = TestNode::start_with(s).await;
    let mut def = sh_def("long", "echo pid $$; sleep 30", manual());
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 3,
        initial_backoff: Some(dur(100)),
        ..Default::default()
    });
    let b = define_and_bind(&a, "acme", def).await;
    let run = trigger(&a, "acme", &b.id).await;
    // Wait until it runs (its pid line is out).
    let mut tail = open_tail(&a, "acme", &run.id, 0, true).await;
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(e) = tail.message().await.unwrap() {
            seen.push(e);
            if !log_lines(&seen).is_empty() {
                return;
            }
        }
    })
    .await
    .expect("run starts");
    let pid = pid_from_logs(&seen);
    let t0 = std::time::Instant::now();
    let resp = b_node
        .runs()
        .cancel_run(as_tenant(
            "acme",
            pb::CancelRunRequest {
                run_id: run.id.clone(),
                reason: "operator: wrong input".into(),
            },
        ))
        .await
        .expect("cancel accepted")
        .into_inner();
    assert_eq!(resp.reason, "operator: wrong input");
    let ended = tail_all(&b_node, "acme", &run.id, 0).await;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "cancelled in {:?}",
        t0.elapsed()
    );
    let last = ended.last().unwrap();
    match &last.kind {
        Some(pb::run_event::Kind::StateChanged(s)) => {
            assert_eq!(s.to_state, pb::RunState::Cancelled as i32);
            assert_eq!(s.reason, "operator: wrong input");
        }
        k => panic!("last event is the terminal state change, got {k:?}"),
    }
    assert_dense(&ended);
    wait_group_gone(pid).await;
    let got = wait_terminal(&b_node, "acme", &run.id).await;
    assert_eq!(state(&got), pb::RunState::Cancelled);
    assert_eq!(got.node_id, "a");
    // A retry would be due 100 ms after the end.
    claims_passed(&a, secs(&got.end_time) + 0.2).await;
    assert_eq!(
        runs_of(&a, "acme", &b.id).await.len(),
        1,
        "a cancelled run is not retried"
    );
    b_node.stop().await;
    a.stop().await;
}

/// The executor sleeps until the first waiting run is due, at most its
/// poll (a minute here): a TriggerRun due sooner ends the sleep at its due
/// time, whichever node took the call (the `sked_runs` notification names
/// the time), also after a run due later was triggered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_trigger_due_before_the_executors_sleep_ends_starts_when_due() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "n1");
    s.claim_poll = Duration::from_secs(60);
    let a = TestNode::start_with(s).await;
    let mut s = settings(&db, "n2");
    s.claim_poll = Duration::from_secs(60);
    // n2 executes nothing: it takes calls, and only n1's executor runs them.
    s.max_concurrent_runs = 0;
    let b_node = TestNode::start_with(s).await;
    let b = define_and_bind(&a, "acme", sh_def("soon", "echo ran", manual())).await;
    let trigger = |node: &TestNode, at: f64| {
        let mut runs = node.runs();
        let binding_id = b.id.clone();
        async move {
            runs.trigger_run(as_tenant(
                "acme",
                pb::TriggerRunRequest {
                    binding_id,
                    run_time: Some(ts(at)),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
        }
    };
    // Both executors now sleep their whole poll.
    let far = trigger(&a, now_secs() + 3600.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (node, name) in [(&a, "the executing node"), (&b_node, "another node")] {
        let at = now_secs() + 1.5;
        let run = trigger(node, at).await;
        assert_eq!(state(&run), pb::RunState::Scheduled, "{name}");
        let done = wait_terminal(&a, "acme", &run.id).await;
        assert_eq!(state(&done), pb::RunState::Succeeded, "{name}");
        let start = secs(&done.start_time);
        assert!(start >= at - 0.001, "{name}: not started before run_time");
        // Not at the 60 s poll: a margin for a loaded machine.
        assert!(
            start < at + 3.0,
            "{name}: started {:.3} s after its run_time, not when due",
            start - at
        );
    }
    let far = get_run(&a, "acme", &far.id).await;
    assert_eq!(
        state(&far),
        pb::RunState::Scheduled,
        "the later run still waits"
    );
    b_node.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_trigger_waits_scheduled_and_cancel_of_a_waiting_run_is_immediate() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", sh_def("later", "echo ran", manual())).await;
    let at = now_secs() + 2.0;
    let run = node
        .runs()
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                run_time: Some(ts(at)),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&run), pb::RunState::Scheduled);
    let done = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded);
    assert!(
        secs(&done.start_time) >= at - 0.001,
        "not started before run_time"
    );
    assert!(secs(&done.start_time) < at + 1.0, "started when due");
    let events = tail_all(&node, "acme", &run.id, 0).await;
    let states: Vec<i32> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::run_event::Kind::StateChanged(s)) => Some(s.to_state),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            pb::RunState::Scheduled as i32,
            pb::RunState::Queued as i32,
            pb::RunState::Running as i32,
            pb::RunState::Succeeded as i32
        ]
    );

    // A waiting run is cancelled at once.
    let run = node
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
                run_id: run.id.clone(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), pb::RunState::Cancelled);
    assert_eq!(cancelled.reason, "cancelled");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_idempotency_key_returns_the_first_run() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", sh_def("idem", "echo ran", manual())).await;
    let call = |key: &str| {
        let mut runs = node.runs();
        let req = as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                idempotency_key: key.into(),
                ..Default::default()
            },
        );
        async move { runs.trigger_run(req).await.unwrap().into_inner() }
    };
    let (one, two) = tokio::join!(call("order-42"), call("order-42"));
    assert_eq!(one.id, two.id, "concurrent calls with one key, one run");
    let three = call("order-42").await;
    assert_eq!(three.id, one.id);
    assert_eq!(three.idempotency_key, "order-42");
    let other = call("order-43").await;
    assert_ne!(other.id, one.id);
    assert_eq!(runs_of(&node, "acme", &b.id).await.len(), 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_with_expiry_stops_fires_then_resumes_by_itself() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", sh_def("ticker", "echo tick", every(1))).await;
    runs_until(&node, "acme", &b.id, WAIT, "a first fire", |r| {
        !r.is_empty()
    })
    .await;
    let paused_at = now_secs();
    let expire = paused_at + 3.0;
    let p = node
        .bindings()
        .pause_binding(as_tenant(
            "acme",
            pb::PauseBindingRequest {
                binding_id: b.id.clone(),
                note: "maintenance window".into(),
                expire_time: Some(ts(expire)),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // Stopped means stopped from when PauseBinding returns: a fire
    // prepared ahead of its instant before the call, and due before it
    // returned, may still run (the pause waited for it).
    let pause_returned = now_secs();
    assert!(p.paused);
    assert_eq!(p.pause_note, "maintenance window");
    // A manual trigger still works while paused.
    let manual_run = trigger(&node, "acme", &b.id).await;
    assert_eq!(
        state(&wait_terminal(&node, "acme", &manual_run.id).await),
        pb::RunState::Succeeded
    );
    // Fires resume by themselves after the expiry.
    let runs = runs_until(
        &node,
        "acme",
        &b.id,
        WAIT,
        "fires resume after the pause expires",
        |runs| {
            runs.iter().any(|r| {
                r.trigger == pb::RunTrigger::Schedule as i32 && secs(&r.scheduled_time) >= expire
            })
        },
    )
    .await;
    let in_pause: Vec<f64> = runs
        .iter()
        .filter(|r| r.trigger == pb::RunTrigger::Schedule as i32)
        .map(|r| secs(&r.scheduled_time))
        .filter(|t| *t > pause_returned && *t < expire)
        .collect();
    assert!(
        in_pause.is_empty(),
        "no fire (not even a SKIPPED row) inside the pause: {in_pause:?}"
    );
    let got = node
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
    assert!(!got.paused, "the pause is over");

    // Pause without expiry, then ResumeBinding: next fire after now.
    pause(&node, "acme", &b.id).await;
    // Stays paused past fire times (the binding fires every second) that
    // the resume must not catch up: real time has to pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = now_secs();
    let resumed = node
        .bindings()
        .resume_binding(as_tenant(
            "acme",
            pb::ResumeBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let after = now_secs();
    assert!(!resumed.paused);
    // The next fire follows the resume, which happened between the two
    // readings (a slow answer must not fail the test).
    let next = secs(&resumed.next_run_time);
    assert!(
        next > before - 0.01 && next <= after + 1.0,
        "next fire {next} after a resume between {before} and {after}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_definitions_and_bindings_do_not_fire_but_can_be_triggered() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut def = sh_def("off", "echo on", every(1));
    def.enabled = Some(false);
    let b = define_and_bind(&node, "acme", def).await;
    let bound = now_secs();
    let canary = event_canary(&node, "watch").await;
    fires_passed(&node, "watch", &canary, bound + 1.0).await;
    assert!(
        runs_of(&node, "acme", &b.id).await.is_empty(),
        "a disabled definition does not fire"
    );
    node.definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                name: "off".into(),
                enabled: Some(true),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["enabled".into()],
            }),
        })
        .await
        .unwrap();
    let runs = runs_until(&node, "acme", &b.id, WAIT, "fires once enabled", |r| {
        !r.is_empty()
    })
    .await;
    assert!(
        runs.iter().all(|r| state(r) != pb::RunState::Skipped),
        "the disabled time is not caught up or recorded"
    );

    // A disabled binding stops firing too; a manual trigger still runs.
    let off = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    enabled: Some(false),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(off.enabled, Some(false));
    let disabled = now_secs();
    // A fire already in flight may still land; after that, none.
    fires_passed(&node, "watch", &canary, disabled).await;
    let before = runs_of(&node, "acme", &b.id).await.len();
    fires_passed(&node, "watch", &canary, disabled + 2.0).await;
    assert_eq!(
        runs_of(&node, "acme", &b.id).await.len(),
        before,
        "a disabled binding does not fire"
    );
    let manual_run = trigger(&node, "acme", &b.id).await;
    assert_eq!(
        state(&wait_terminal(&node, "acme", &manual_run.id).await),
        pb::RunState::Succeeded
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_concurrency_limit_keeps_excess_runs_queued() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "n1");
    s.max_concurrent_runs = 2;
    let node = TestNode::start_with(s).await;
    let mut def = sh_def("par", "sleep 1", manual());
    def.overlap_policy = pb::OverlapPolicy::Allow as i32;
    // Two tenants, so the node's limit (not one tenant's share of it,
    // which is 1 of 2 slots) is what binds.
    let b = define_and_bind(&node, "acme", def).await;
    let beta = bind_existing(&node, "beta", "par").await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(("acme", trigger(&node, "acme", &b.id).await.id));
        ids.push(("beta", trigger(&node, "beta", &beta.id).await.id));
    }
    let mut runs = Vec::new();
    for (tenant, id) in &ids {
        runs.push(wait_terminal(&node, tenant, id).await);
    }
    assert!(runs.iter().all(|r| state(r) == pb::RunState::Succeeded));
    let iv = intervals(&runs);
    for (start, _) in &iv {
        let running = iv.iter().filter(|(s, e)| s <= start && start < e).count();
        assert!(running <= 2, "{running} running at once: {iv:?}");
    }
    for tenant in ["acme", "beta"] {
        let own: Vec<_> = runs
            .iter()
            .filter(|r| r.tenant_id == tenant)
            .cloned()
            .collect();
        let iv = intervals(&own);
        for (start, _) in &iv {
            let running = iv.iter().filter(|(s, e)| s <= start && start < e).count();
            assert!(
                running <= 1,
                "{tenant}: {running} of its runs at once on a 2-slot node"
            );
        }
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_run_control_calls_get_the_right_status() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", sh_def("ctl", "sleep 2", manual())).await;
    let running = trigger(&node, "acme", &b.id).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut runs = node.runs();
    let mut bindings = node.bindings();

    // Retry of a run that has not ended.
    let e = runs
        .retry_run(as_tenant(
            "acme",
            pb::RetryRunRequest {
                run_id: running.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // Unknown run / binding, and another tenant's.
    for tenant in ["acme", "other"] {
        let id = if tenant == "acme" {
            unknown.clone()
        } else {
            running.id.clone()
        };
        let e = runs
            .cancel_run(as_tenant(
                tenant,
                pb::CancelRunRequest {
                    run_id: id,
                    reason: String::new(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let e = bindings
        .pause_binding(as_tenant(
            "acme",
            pb::PauseBindingRequest {
                binding_id: unknown.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = bindings
        .resume_binding(as_tenant(
            "other",
            pb::ResumeBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Bad input names the field.
    let e = bindings
        .pause_binding(as_tenant(
            "acme",
            pb::PauseBindingRequest {
                binding_id: b.id.clone(),
                note: String::new(),
                expire_time: Some(ts(now_secs() - 10.0)),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&e), ["expire_time"]);
    let e = runs
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                idempotency_key: "has space".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&e), ["idempotency_key"]);
    for (def, field) in [
        (
            pb::TaskDefinition {
                retry_policy: Some(pb::RetryPolicy {
                    max_attempts: 101,
                    ..Default::default()
                }),
                ..sh_def("bad1", "true", manual())
            },
            "definition.retry_policy.max_attempts",
        ),
        (
            pb::TaskDefinition {
                retry_policy: Some(pb::RetryPolicy {
                    backoff_coefficient: 0.5,
                    ..Default::default()
                }),
                ..sh_def("bad2", "true", manual())
            },
            "definition.retry_policy.backoff_coefficient",
        ),
        (
            pb::TaskDefinition {
                timeout: Some(dur(1500)),
                ..sh_def("bad3", "true", manual())
            },
            "definition.timeout",
        ),
        (
            pb::TaskDefinition {
                overlap_policy: 99,
                ..sh_def("bad4", "true", manual())
            },
            "definition.overlap_policy",
        ),
    ] {
        let e = node
            .definitions()
            .create_definition(pb::CreateDefinitionRequest {
                definition: Some(def),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(violation_fields(&e), [field]);
    }
    let defs = node
        .definitions()
        .list_definitions(pb::ListDefinitionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .definitions;
    assert_eq!(defs.len(), 1, "nothing written by rejected calls");

    // Once it ended: cancel is FAILED_PRECONDITION, retry makes attempt 2.
    let done = wait_terminal(&node, "acme", &running.id).await;
    let e = runs
        .cancel_run(as_tenant(
            "acme",
            pb::CancelRunRequest {
                run_id: done.id.clone(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let again = runs
        .retry_run(as_tenant(
            "acme",
            pb::RetryRunRequest {
                run_id: done.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.trigger, pb::RunTrigger::Retry as i32);
    assert_eq!(again.retry_of, done.id);
    assert_eq!(again.attempt, 2);
    assert_eq!(
        state(&wait_terminal(&node, "acme", &again.id).await),
        pb::RunState::Succeeded
    );
    node.stop().await;
}
