//! Workflows: a definition whose handler is a DAG of steps, each step a
//! child run (issue "Workflows"), through the generated client.

use std::time::Duration;

use crate::common::*;
use sked::grpc::convert::{json_to_struct, struct_to_json};
use sked::proto::v1 as pb;

/// A `sh -c script` step.
fn sh_step(name: &str, deps: &[&str], script: &str) -> pb::WorkflowStep {
    pb::WorkflowStep {
        name: name.into(),
        handler: Some(pb::workflow_step::Handler::Command(pb::CommandHandler {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        })),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn workflow_def(
    name: &str,
    steps: Vec<pb::WorkflowStep>,
    on_failure: pb::WorkflowOnFailure,
) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Workflow(
            pb::WorkflowHandler {
                steps,
                on_failure: on_failure as i32,
                ..Default::default()
            },
        )),
        schedule: Some(manual()),
        ..Default::default()
    }
}

/// The steps of workflow run `parent` (ListRuns by parent_run_id), oldest
/// first.
async fn steps_of(node: &TestNode, tenant: &str, parent: &str) -> Vec<pb::Run> {
    node.runs()
        .list_runs(as_tenant(
            tenant,
            pb::ListRunsRequest {
                parent_run_id: parent.into(),
                order: pb::ListRunsOrder::OldestFirst as i32,
                ..Default::default()
            },
        ))
        .await
        .expect("list steps")
        .into_inner()
        .runs
}

/// The latest attempt of step `name` among `steps`.
fn step<'a>(steps: &'a [pb::Run], name: &str) -> &'a pb::Run {
    steps
        .iter()
        .filter(|r| r.step == name)
        .max_by_key(|r| r.attempt)
        .unwrap_or_else(|| panic!("no step {name} in {steps:#?}"))
}

fn result(r: &pb::Run) -> serde_json::Value {
    r.result.as_ref().map(struct_to_json).unwrap_or_default()
}

/// Waits for the workflow run to end (polling GetRun); returns it.
async fn wait_workflow(node: &TestNode, tenant: &str, id: &str) -> pb::Run {
    tokio::time::timeout(WAIT, async {
        loop {
            let r = get_run(node, tenant, id).await;
            if is_terminal(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the workflow ends within the wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_runs_b_and_c_together_and_d_gets_both_results() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut d = sh_step("d", &["b", "c"], r#"printf '%s\n' "$SKED_PARAMS""#);
    d.params = json_to_struct(&serde_json::json!({"mine": true}));
    let mut def = workflow_def(
        "diamond",
        vec![
            sh_step("a", &[], r#"echo '{"a": 1}'"#),
            sh_step("b", &["a"], r#"sleep 1; echo '{"b": "B"}'"#),
            sh_step("c", &["a"], r#"sleep 1; echo '{"c": "C"}'"#),
            d,
        ],
        pb::WorkflowOnFailure::Stop,
    );
    def.params = json_to_struct(&serde_json::json!({"region": "eu"}));
    let stored = create_definition(&node, def.clone()).await.unwrap();
    // Stored as given (unset params read back as an empty object).
    let mut want = def.handler.clone();
    if let Some(pb::task_definition::Handler::Workflow(w)) = &mut want {
        for s in &mut w.steps {
            s.params
                .get_or_insert_with(|| json_to_struct(&serde_json::json!({})).unwrap());
        }
    }
    assert_eq!(stored.handler, want);
    let binding = bind_existing(&node, "acme", "diamond").await;
    let wf = trigger(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{done:#?}");
    let steps = steps_of(&node, "acme", &wf.id).await;
    assert_eq!(steps.len(), 4, "{steps:#?}");
    for s in &steps {
        assert_eq!(state(s), pb::RunState::Succeeded, "{s:#?}");
        assert_eq!(s.parent_run_id, wf.id);
        assert_eq!(s.trigger, pb::RunTrigger::Step as i32);
        assert_eq!(s.binding_id, binding.id);
    }
    let (a, b, c, dd) = (
        step(&steps, "a"),
        step(&steps, "b"),
        step(&steps, "c"),
        step(&steps, "d"),
    );
    // b and c overlap in time; both start after a ended; d after both.
    assert!(
        secs(&b.start_time) < secs(&c.end_time) && secs(&c.start_time) < secs(&b.end_time),
        "b and c run in parallel: {b:#?} {c:#?}"
    );
    assert!(secs(&b.start_time) >= secs(&a.end_time) && secs(&c.start_time) >= secs(&a.end_time));
    assert!(secs(&dd.start_time) >= secs(&b.end_time) && secs(&dd.start_time) >= secs(&c.end_time));
    let got = result(dd);
    assert_eq!(got["steps"]["b"], serde_json::json!({"b": "B"}), "{got}");
    assert_eq!(got["steps"]["c"], serde_json::json!({"c": "C"}), "{got}");
    assert_eq!(got["region"], "eu", "the workflow's params reach the step");
    assert_eq!(got["mine"], true, "the step's own params too");
    assert!(
        got["steps"].get("a").is_none(),
        "only the step's own dependencies: {got}"
    );
    assert_eq!(result(a), serde_json::json!({"a": 1}));
    // GetRun of the workflow: every step's state, in definition order; the
    // workflow's result holds the steps' results.
    let names: Vec<(&str, i32)> = done
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.state))
        .collect();
    let ok = pb::RunState::Succeeded as i32;
    assert_eq!(names, vec![("a", ok), ("b", ok), ("c", ok), ("d", ok)]);
    assert_eq!(result(&done)["steps"]["b"], serde_json::json!({"b": "B"}));
    // A step's GetRun names its workflow and step.
    let got_b = get_run(&node, "acme", &b.id).await;
    assert_eq!(
        (got_b.parent_run_id.as_str(), got_b.step.as_str()),
        (wf.id.as_str(), "b")
    );
    // parent_run_id at the boundary: not a UUID is INVALID_ARGUMENT naming
    // the field; another tenant naming this workflow run gets NOT_FOUND,
    // as for any run not its own.
    let list = |tenant: &'static str, parent: &str| {
        let node = &node;
        let parent = parent.to_string();
        async move {
            node.runs()
                .list_runs(as_tenant(
                    tenant,
                    pb::ListRunsRequest {
                        parent_run_id: parent,
                        ..Default::default()
                    },
                ))
                .await
        }
    };
    let bad = list("acme", "not-a-uuid")
        .await
        .expect_err("a malformed parent_run_id is refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("parent_run_id"), "{bad:?}");
    let theirs = list("other", &wf.id)
        .await
        .expect_err("another tenant's workflow run is not found");
    assert_eq!(theirs.code(), tonic::Code::NotFound, "{theirs:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycles_self_and_unknown_dependencies_are_invalid_and_nothing_is_written() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let cases = [
        (
            vec![sh_step("a", &["b"], "true"), sh_step("b", &["a"], "true")],
            "definition.workflow.steps",
            "a → b → a",
        ),
        (
            vec![sh_step("a", &[], "true"), sh_step("b", &["b"], "true")],
            "definition.workflow.steps",
            "b → b",
        ),
        (
            vec![sh_step("a", &["nope"], "true")],
            "definition.workflow.steps[0].depends_on",
            "\"nope\"",
        ),
        (
            vec![sh_step("a", &[], "true"), sh_step("a", &[], "true")],
            "definition.workflow.steps[1].name",
            "duplicate",
        ),
        (
            vec![
                sh_step("x", &["z"], "true"),
                sh_step("y", &["x"], "true"),
                sh_step("z", &["y"], "true"),
            ],
            "definition.workflow.steps",
            "x → z → y → x",
        ),
    ];
    for (steps, field, text) in cases {
        let err = create_definition(
            &node,
            workflow_def("bad", steps, pb::WorkflowOnFailure::Stop),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(violation_fields(&err), vec![field.to_string()], "{err:?}");
        assert!(err.message().contains(text), "{text} in {err:?}");
    }
    let err = node
        .definitions()
        .get_definition(as_tenant(
            "",
            pb::GetDefinitionRequest { name: "bad".into() },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "nothing was written");
    // Too many steps.
    let many: Vec<_> = (0..101)
        .map(|i| sh_step(&format!("s{i}"), &[], "true"))
        .collect();
    let err = create_definition(
        &node,
        workflow_def("bad", many, pb::WorkflowOnFailure::Stop),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("at most 100"), "{err:?}");
    node.stop().await;
}

/// a → b (slow), a → c (fails) → d; e after a alone; f always after d.
fn failing_steps() -> Vec<pb::WorkflowStep> {
    let mut f = sh_step("f", &["d"], r#"echo '{"cleanup": true}'"#);
    f.always = true;
    vec![
        sh_step("a", &[], "true"),
        sh_step("b", &["a"], "sleep 1"),
        sh_step("c", &["a"], "exit 3"),
        sh_step("d", &["b", "c"], "true"),
        sh_step("e", &["b"], "true"),
        f,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_skips_what_is_left_continue_runs_the_unrelated_branch_always_runs_after_a_failure() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let stop = define_and_bind(
        &node,
        "acme",
        workflow_def("stopper", failing_steps(), pb::WorkflowOnFailure::Stop),
    )
    .await;
    let cont = define_and_bind(
        &node,
        "acme",
        workflow_def("goer", failing_steps(), pb::WorkflowOnFailure::Continue),
    )
    .await;

    let wf = trigger(&node, "acme", &stop.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Failed, "{done:#?}");
    assert_eq!(done.reason, "steps_failed");
    let steps = steps_of(&node, "acme", &wf.id).await;
    assert_eq!(state(step(&steps, "c")), pb::RunState::Failed);
    assert_eq!(
        state(step(&steps, "b")),
        pb::RunState::Succeeded,
        "b, running, finishes"
    );
    let d = step(&steps, "d");
    assert_eq!(
        (state(d), d.reason.as_str()),
        (pb::RunState::Skipped, "workflow_stopped")
    );
    assert!(d.start_time.is_none(), "d never starts");
    let e = step(&steps, "e");
    assert_eq!(
        (state(e), e.reason.as_str()),
        (pb::RunState::Skipped, "workflow_stopped"),
        "under STOP nothing new starts, not even e"
    );
    let f = step(&steps, "f");
    assert_eq!(
        state(f),
        pb::RunState::Succeeded,
        "always runs after a failure: {f:#?}"
    );
    // f's only dependency (d) ended SKIPPED when c failed: f ran then.
    assert!(secs(&f.start_time) >= secs(&step(&steps, "c").end_time));

    let wf = trigger(&node, "acme", &cont.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(
        state(&done),
        pb::RunState::Failed,
        "a failed step fails the workflow under CONTINUE too"
    );
    let steps = steps_of(&node, "acme", &wf.id).await;
    let d = step(&steps, "d");
    assert_eq!(
        (state(d), d.reason.as_str()),
        (pb::RunState::Skipped, "upstream_failed")
    );
    assert_eq!(
        state(step(&steps, "e")),
        pb::RunState::Succeeded,
        "the unrelated branch runs"
    );
    assert_eq!(state(step(&steps, "f")), pb::RunState::Succeeded);
    assert!(
        done.error.as_ref().unwrap().message.contains("c (FAILED)"),
        "{done:#?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_retries_alone_and_retry_run_reruns_only_what_did_not_succeed() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let flag = tempfile::tempdir().unwrap();
    let ok_file = flag.path().join("ok");
    let ok = ok_file.display().to_string();
    // b fails twice (its retries) unless the flag file exists; a and c
    // count their executions in files.
    let count = |name: &str| {
        format!(
            r#"echo x >> {dir}/{name}.count; echo '{{"{name}": 1}}'"#,
            dir = flag.path().display()
        )
    };
    let mut b = sh_step(
        "b",
        &["a"],
        &format!("echo x >> {}/b.count; test -e {ok}", flag.path().display()),
    );
    b.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(10)),
        ..Default::default()
    });
    let steps = vec![
        sh_step("a", &[], &count("a")),
        b,
        sh_step("c", &["a"], &count("c")),
        sh_step("d", &["b", "c"], r#"printf '%s\n' "$SKED_PARAMS""#),
    ];
    let binding = define_and_bind(
        &node,
        "acme",
        workflow_def("retrying", steps, pb::WorkflowOnFailure::Continue),
    )
    .await;
    let wf = trigger(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Failed);
    let steps = steps_of(&node, "acme", &wf.id).await;
    let b_runs: Vec<_> = steps.iter().filter(|r| r.step == "b").collect();
    assert_eq!(
        b_runs.len(),
        2,
        "b retried alone, per its policy: {steps:#?}"
    );
    assert!(b_runs.iter().all(|r| state(r) == pb::RunState::Failed));
    assert_eq!(steps.iter().filter(|r| r.step == "a").count(), 1);
    assert_eq!(state(step(&steps, "d")), pb::RunState::Skipped);
    let counts = |name: &str| {
        std::fs::read_to_string(flag.path().join(format!("{name}.count")))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    assert_eq!((counts("a"), counts("b"), counts("c")), (1, 2, 1));

    // Retry the workflow: only b and d run again; a and c are reused.
    std::fs::write(&ok_file, "").unwrap();
    let again = node
        .runs()
        .retry_run(as_tenant(
            "acme",
            pb::RetryRunRequest {
                run_id: wf.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.retry_of, wf.id);
    let done = wait_workflow(&node, "acme", &again.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{done:#?}");
    assert_eq!(
        (counts("a"), counts("b"), counts("c")),
        (1, 3, 1),
        "a and c did not run again"
    );
    let steps = steps_of(&node, "acme", &again.id).await;
    assert_eq!(step(&steps, "a").reason, "reused");
    assert_eq!(step(&steps, "c").reason, "reused");
    let d = result(step(&steps, "d"));
    assert_eq!(
        d["steps"]["c"],
        serde_json::json!({"c": 1}),
        "a reused result flows downstream: {d}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_workflow_cancels_running_steps_and_starts_none_after() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let steps = vec![
        sh_step("a", &[], "true"),
        sh_step("b", &["a"], "sleep 30"),
        sh_step("c", &["a"], "sleep 30"),
        sh_step("d", &["b", "c"], "true"),
    ];
    let binding = define_and_bind(
        &node,
        "acme",
        workflow_def("cancelled", steps, pb::WorkflowOnFailure::Stop),
    )
    .await;
    let wf = trigger(&node, "acme", &binding.id).await;
    // Wait until b and c run.
    tokio::time::timeout(WAIT, async {
        loop {
            let steps = steps_of(&node, "acme", &wf.id).await;
            let running = steps
                .iter()
                .filter(|r| state(r) == pb::RunState::Running)
                .count();
            if running == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("b and c start");
    // A reason sked records itself is refused and changes nothing: a
    // workflow cancelled as "timeout" would end TIMED_OUT and be retried.
    for reason in [
        "overlap",
        "misfire",
        "quota",
        "binding_deleted",
        "shutdown",
        "node_lost",
        "corrupt",
        "timeout",
        "lease lost",
        "ssrf_blocked",
        "worker_lost",
        "no_worker",
    ] {
        let status = node
            .runs()
            .cancel_run(as_tenant(
                "acme",
                pb::CancelRunRequest {
                    run_id: wf.id.clone(),
                    reason: reason.into(),
                },
            ))
            .await
            .expect_err(reason);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{reason}: {status:?}"
        );
        assert_eq!(
            violation_fields(&status),
            ["reason"],
            "{reason}: {status:?}"
        );
        assert!(status.message().contains(reason), "{status:?}");
    }
    let steps = steps_of(&node, "acme", &wf.id).await;
    assert_eq!(
        steps
            .iter()
            .filter(|r| state(r) == pb::RunState::Running)
            .count(),
        2,
        "refused cancels stop nothing: {steps:#?}"
    );
    node.runs()
        .cancel_run(as_tenant(
            "acme",
            pb::CancelRunRequest {
                run_id: wf.id.clone(),
                reason: "enough".into(),
            },
        ))
        .await
        .unwrap();
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Cancelled, "{done:#?}");
    assert_eq!(done.reason, "enough");
    let steps = steps_of(&node, "acme", &wf.id).await;
    assert_eq!(state(step(&steps, "b")), pb::RunState::Cancelled);
    assert_eq!(state(step(&steps, "c")), pb::RunState::Cancelled);
    assert!(
        steps.iter().all(|r| r.step != "d"),
        "d never starts: {steps:#?}"
    );
    // Nothing starts later either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(steps_of(&node, "acme", &wf.id).await.len(), 3);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_of_one_runs_a_workflow_one_step_at_a_time() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    node.admin()
        .set_tenant_quota(pb::SetTenantQuotaRequest {
            quota: Some(pb::TenantQuota {
                tenant_id: "acme".into(),
                max_concurrent_runs: Some(1),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let steps = vec![
        sh_step("a", &[], "true"),
        sh_step("b", &["a"], "sleep 0.3"),
        sh_step("c", &["a"], "sleep 0.3"),
        sh_step("d", &["b", "c"], "true"),
    ];
    let binding = define_and_bind(
        &node,
        "acme",
        workflow_def("quota", steps, pb::WorkflowOnFailure::Stop),
    )
    .await;
    let wf = trigger(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(
        state(&done),
        pb::RunState::Succeeded,
        "a quota of 1 does not deadlock: {done:#?}"
    );
    let steps = steps_of(&node, "acme", &wf.id).await;
    let (b, c) = (step(&steps, "b"), step(&steps, "c"));
    assert!(
        secs(&b.end_time) <= secs(&c.start_time) || secs(&c.end_time) <= secs(&b.start_time),
        "the quota counts steps: b and c one after the other"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_of_a_workflow_streams_every_steps_lines_with_its_name_and_ends_with_it() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let ev = pb::WorkflowStep {
        name: "tick".into(),
        handler: Some(pb::workflow_step::Handler::Event(pb::EventHandler {})),
        ..Default::default()
    };
    let mut def = workflow_def(
        "tailed",
        vec![
            sh_step("a", &[], "echo line-a1; sleep 0.2; echo line-a2"),
            ev,
            sh_step("c", &["a", "tick"], "echo line-c"),
        ],
        pb::WorkflowOnFailure::Stop,
    );
    if let Some(pb::task_definition::Handler::Workflow(w)) = &mut def.handler {
        w.serial = true;
    }
    let binding = define_and_bind(&node, "acme", def).await;
    let wf = trigger(&node, "acme", &binding.id).await;
    // Live from the start (follow), and a replay after the end.
    let live = tail_all(&node, "acme", &wf.id, 0).await;
    let replay = drain(open_tail(&node, "acme", &wf.id, 0, false).await).await;
    for events in [&live, &replay] {
        let lines: Vec<(String, String)> = events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(pb::run_event::Kind::Log(l)) => Some((e.step.clone(), l.message.clone())),
                _ => None,
            })
            .collect();
        let want = |s: &str, m: &str| (s.to_string(), m.to_string());
        assert_eq!(
            lines,
            vec![
                want("a", "line-a1"),
                want("a", "line-a2"),
                want("c", "line-c")
            ],
            "{events:#?}"
        );
        assert!(events.iter().any(|e| e.step == "tick"
            && matches!(&e.kind, Some(pb::run_event::Kind::Fired(_)))));
        let last = events.last().unwrap();
        assert_eq!(
            (last.run_id.as_str(), last.step.as_str()),
            (wf.id.as_str(), "")
        );
        match &last.kind {
            Some(pb::run_event::Kind::StateChanged(s)) => {
                assert_eq!(s.to_state, pb::RunState::Succeeded as i32)
            }
            k => panic!("the workflow's end comes last: {k:?}"),
        }
        // Each run's events in seq order, none twice.
        let mut seen = std::collections::HashMap::<String, i64>::new();
        for e in events.iter() {
            let last = seen.entry(e.run_id.clone()).or_insert(0);
            assert_eq!(e.seq, *last + 1, "dense per run: {e:?}");
            *last = e.seq;
        }
    }
    // serial: a and tick one after the other.
    let steps = steps_of(&node, "acme", &wf.id).await;
    let (a, t) = (step(&steps, "a"), step(&steps, "tick"));
    assert!(
        secs(&a.end_time) <= secs(&t.start_time) || secs(&t.end_time) <= secs(&a.start_time),
        "serial: {a:#?} {t:#?}"
    );
    node.stop().await;
}

/// `sked apply -f examples/workflow.yaml` (the README's example) against
/// the node.
async fn apply_example(node: &TestNode) -> std::process::Output {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflow.yaml");
    let dir = tempfile::tempdir().unwrap();
    let mut c = assert_cmd::Command::new(env!("CARGO_BIN_EXE_sked"));
    for k in [
        "SKED_TOKEN",
        "SKED_TOKEN_FILE",
        "SKED_TENANT",
        "SKED_CONFIG",
    ] {
        c.env_remove(k);
    }
    c.env("SKED_ADDR", format!("http://{}", node.addr))
        .env("XDG_CONFIG_HOME", dir.path())
        .env("NO_COLOR", "1")
        .args(["apply", "-f", path])
        .timeout(Duration::from_secs(60));
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_workflow_applies_runs_and_applies_again_unchanged() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let out = apply_example(&node).await;
    assert!(out.status.success(), "{out:?}");
    let out = apply_example(&node).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unchanged"),
        "a second apply changes nothing: {out:?}"
    );
    let b = node
        .bindings()
        .list_bindings(as_tenant("acme", pb::ListBindingsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .bindings
        .remove(0);
    let wf = trigger(&node, "acme", &b.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{done:#?}");
    let steps = steps_of(&node, "acme", &wf.id).await;
    let eu = result(step(&steps, "transform-eu"));
    assert_eq!(eu["region"], "eu");
    assert_eq!(eu["day"], "yesterday");
    assert_eq!(eu["steps"]["extract"]["rows"], 42);
    assert_eq!(done.steps.len(), 5);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_node_running_a_step_another_node_starts_the_next_step_exactly_once() {
    use sked::proto::v1::log_service_client::LogServiceClient;
    use sked::proto::v1::run_service_client::RunServiceClient;
    let db = TestDb::new().await;
    let token = sked::app::bootstrap_key(&db.url, "workflow-crash")
        .await
        .expect("bootstrap key");
    let (mut victim, ch) = spawn_sked(
        &[],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("SKED_NODE_ID", "victim"),
            ("SKED_LEASE", "2"),
        ],
    )
    .await;
    // a's first attempt hangs (on the victim); its retry succeeds at once.
    let mut a = sh_step(
        "a",
        &[],
        r#"echo pid $$; if [ "$SKED_ATTEMPT" = 1 ]; then sleep 30; fi; echo '{"a": "done"}'"#,
    );
    a.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(100)),
        ..Default::default()
    });
    let def = workflow_def(
        "crashy",
        vec![a, sh_step("b", &["a"], r#"printf '%s\n' "$SKED_PARAMS""#)],
        pb::WorkflowOnFailure::Stop,
    );
    let binding = define_and_bind_via(&ch, "acme", Some(&token), def).await;
    let wf = trigger_via(&ch, "acme", Some(&token), &binding.id).await;
    let list_steps = |ch: tonic::transport::Channel| {
        let token = token.clone();
        let id = wf.id.clone();
        async move {
            RunServiceClient::new(ch)
                .list_runs(request(
                    "acme",
                    Some(&token),
                    pb::ListRunsRequest {
                        parent_run_id: id,
                        order: pb::ListRunsOrder::OldestFirst as i32,
                        ..Default::default()
                    },
                ))
                .await
                .expect("list steps")
                .into_inner()
                .runs
        }
    };
    // a runs on the victim and has printed its pid.
    let (a_run, pgid) = tokio::time::timeout(WAIT, async {
        loop {
            let steps = list_steps(ch.clone()).await;
            if let Some(a) = steps
                .iter()
                .find(|r| r.step == "a" && state(r) == pb::RunState::Running)
            {
                let events = LogServiceClient::new(ch.clone())
                    .list_run_events(request(
                        "acme",
                        Some(&token),
                        pb::ListRunEventsRequest {
                            run_id: a.id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .events;
                if let Some(pid) = log_lines(&events)
                    .iter()
                    .find_map(|l| l.strip_prefix("pid ").map(str::to_string))
                {
                    return (a.clone(), pid.parse::<i32>().unwrap());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a runs on the victim");
    assert_eq!(a_run.node_id, "victim");
    struct KillGroup(i32);
    impl Drop for KillGroup {
        fn drop(&mut self) {
            // SAFETY: killpg only takes ints; the group is the step's own.
            unsafe { libc::killpg(self.0, libc::SIGKILL) };
        }
    }
    let _leftovers = KillGroup(pgid);
    let mut s = settings(&db, "survivor");
    s.lease = Duration::from_secs(2);
    let survivor = TestNode::start_with(s).await;
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(victim.id().unwrap() as i32, libc::SIGKILL) },
        0
    );
    tokio::time::timeout(WAIT, victim.wait())
        .await
        .expect("victim dies")
        .unwrap();

    // The survivor reaps a (node_lost), retries it, and starts b once.
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let r = RunServiceClient::new(survivor.channel.clone())
                .get_run(request(
                    "acme",
                    Some(&token),
                    pb::GetRunRequest {
                        run_id: wf.id.clone(),
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            if is_terminal(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the workflow ends on the survivor");
    assert_eq!(state(&done), pb::RunState::Succeeded, "{done:#?}");
    let steps = list_steps(survivor.channel.clone()).await;
    let a_runs: Vec<_> = steps.iter().filter(|r| r.step == "a").collect();
    assert_eq!(a_runs.len(), 2, "{steps:#?}");
    assert_eq!(
        (state(a_runs[0]), a_runs[0].reason.as_str()),
        (pb::RunState::Failed, "node_lost")
    );
    let b_runs: Vec<_> = steps.iter().filter(|r| r.step == "b").collect();
    assert_eq!(b_runs.len(), 1, "b starts exactly once: {steps:#?}");
    assert_eq!(b_runs[0].node_id, "survivor");
    assert_eq!(result(b_runs[0])["steps"]["a"]["a"], "done");
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_workflow_retries_by_its_own_policy_reusing_what_succeeded() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let mut def = workflow_def(
        "self-healing",
        vec![
            sh_step("a", &[], &format!("echo x >> {d}/a.count")),
            // Fails the first time only.
            sh_step(
                "b",
                &["a"],
                &format!("if [ -e {d}/b.once ]; then exit 0; fi; touch {d}/b.once; exit 1"),
            ),
        ],
        pb::WorkflowOnFailure::Stop,
    );
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(50)),
        ..Default::default()
    });
    let binding = define_and_bind(&node, "acme", def).await;
    let wf = trigger(&node, "acme", &binding.id).await;
    assert_eq!(
        state(&wait_workflow(&node, "acme", &wf.id).await),
        pb::RunState::Failed
    );
    let retry = runs_until(
        &node,
        "acme",
        &binding.id,
        WAIT,
        "the workflow's retry ends",
        |runs| {
            runs.iter()
                .any(|r| r.retry_of == wf.id && r.parent_run_id.is_empty() && is_terminal(r))
        },
    )
    .await
    .into_iter()
    .find(|r| r.retry_of == wf.id && r.parent_run_id.is_empty())
    .unwrap();
    assert_eq!(retry.trigger, pb::RunTrigger::Retry as i32);
    assert_eq!(retry.attempt, 2);
    assert_eq!(state(&retry), pb::RunState::Succeeded, "{retry:#?}");
    let steps = steps_of(&node, "acme", &retry.id).await;
    assert_eq!(step(&steps, "a").reason, "reused");
    let a_count = std::fs::read_to_string(dir.path().join("a.count")).unwrap();
    assert_eq!(a_count.lines().count(), 1, "a ran once");
    node.stop().await;
}

/// Polls workflow run `parent`'s steps until `done` holds; returns them.
async fn steps_until(
    node: &TestNode,
    parent: &str,
    what: &str,
    done: impl Fn(&[pb::Run]) -> bool,
) -> Vec<pb::Run> {
    tokio::time::timeout(WAIT, async {
        loop {
            let steps = steps_of(node, "acme", parent).await;
            if done(&steps) {
                return steps;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("within the wait: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_the_binding_holds_the_next_step_and_resume_continues_it() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut def = workflow_def(
        "paused",
        vec![sh_step("a", &[], "sleep 2"), sh_step("b", &["a"], "true")],
        pb::WorkflowOnFailure::Stop,
    );
    def.schedule = Some(every(1));
    let binding = define_and_bind(&node, "acme", def).await;
    // The first scheduled workflow run, with a running.
    let wf = runs_until(
        &node,
        "acme",
        &binding.id,
        WAIT,
        "a workflow run runs",
        |runs| {
            runs.iter()
                .any(|r| r.parent_run_id.is_empty() && state(r) == pb::RunState::Running)
        },
    )
    .await
    .into_iter()
    .find(|r| r.parent_run_id.is_empty() && state(r) == pb::RunState::Running)
    .unwrap();
    assert_eq!(wf.trigger, pb::RunTrigger::Schedule as i32);
    // The workflow run runs as soon as its first step is created; the step
    // itself is claimed a moment later. Pausing before that would hold `a`
    // too, so the pause waits until `a` runs.
    steps_until(&node, &wf.id, "a runs", |s| {
        s.iter()
            .any(|r| r.step == "a" && state(r) == pb::RunState::Running)
    })
    .await;
    pause(&node, "acme", &binding.id).await;
    let paused_at = now_secs();
    let steps = steps_until(&node, &wf.id, "a ends and b is created", |s| {
        s.iter().any(|r| r.step == "b")
    })
    .await;
    let a = step(&steps, "a");
    assert_eq!(state(a), pb::RunState::Succeeded);
    assert!(
        secs(&a.end_time) > paused_at,
        "a ended after the pause: {a:#?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = step(&steps_of(&node, "acme", &wf.id).await, "b").clone();
    assert_eq!(state(&b), pb::RunState::Queued, "held while paused: {b:#?}");
    resume(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{done:#?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_binding_cancels_its_running_workflow_and_its_steps() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let binding = define_and_bind(
        &node,
        "acme",
        workflow_def(
            "deleted",
            vec![
                sh_step("a", &[], "sleep 30"),
                sh_step("w", &[], "sleep 30"),
                sh_step("b", &["a"], "true"),
            ],
            pb::WorkflowOnFailure::Stop,
        ),
    )
    .await;
    let wf = trigger(&node, "acme", &binding.id).await;
    steps_until(&node, &wf.id, "a and w run", |s| {
        s.iter()
            .filter(|r| state(r) == pb::RunState::Running)
            .count()
            == 2
    })
    .await;
    node.bindings()
        .delete_binding(as_tenant(
            "acme",
            pb::DeleteBindingRequest {
                binding_id: binding.id.clone(),
            },
        ))
        .await
        .expect("delete binding");
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(
        (state(&done), done.reason.as_str()),
        (pb::RunState::Cancelled, "binding_deleted")
    );
    let steps = steps_of(&node, "acme", &wf.id).await;
    assert_eq!(state(step(&steps, "a")), pb::RunState::Cancelled);
    assert_eq!(state(step(&steps, "w")), pb::RunState::Cancelled);
    assert!(steps.iter().all(|r| r.step != "b"), "{steps:#?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_whose_stored_steps_cannot_be_read_ends_failed_corrupt_and_its_step_still_ends()
{
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let binding = define_and_bind(
        &node,
        "acme",
        workflow_def(
            "planted",
            vec![sh_step("a", &[], "sleep 0.5"), sh_step("b", &["a"], "true")],
            pb::WorkflowOnFailure::Stop,
        ),
    )
    .await;
    let wf = trigger(&node, "acme", &binding.id).await;
    let steps = steps_until(&node, &wf.id, "a runs", |s| {
        s.iter()
            .any(|r| r.step == "a" && state(r) == pb::RunState::Running)
    })
    .await;
    let a = step(&steps, "a").clone();
    let pool = db.pool().await;
    let id: uuid::Uuid = wf.id.parse().unwrap();
    sqlx::query(
        "UPDATE runs SET handler = jsonb_set(handler, '{steps}', '\"oops\"') WHERE id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let (state_, reason): (String, Option<String>) = tokio::time::timeout(WAIT, async {
        loop {
            let row: (String, Option<String>) =
                sqlx::query_as("SELECT state, reason FROM runs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if row.0 != "RUNNING" {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the workflow ends");
    assert_eq!(
        (state_.as_str(), reason.as_deref()),
        ("FAILED", Some("corrupt"))
    );
    let a = get_run(&node, "acme", &a.id).await;
    assert_eq!(
        state(&a),
        pb::RunState::Succeeded,
        "the step's end committed"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_may_run_another_definition_as_it_is_when_the_step_starts() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut shared = sh_def("shared.echo", r#"printf '%s\n' "$SKED_PARAMS""#, manual());
    shared.params = json_to_struct(&serde_json::json!({"from_def": 1, "who": "def"}));
    shared.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 3,
        ..Default::default()
    });
    create_definition(&node, shared).await.unwrap();
    let mut by_ref = pb::WorkflowStep {
        name: "b".into(),
        handler: Some(pb::workflow_step::Handler::Definition("shared.echo".into())),
        depends_on: vec!["a".into()],
        ..Default::default()
    };
    by_ref.params = json_to_struct(&serde_json::json!({"who": "step"}));
    let mut def = workflow_def(
        "referring",
        vec![sh_step("a", &[], r#"echo '{"a": 1}'"#), by_ref.clone()],
        pb::WorkflowOnFailure::Stop,
    );
    def.params = json_to_struct(&serde_json::json!({"wf": true}));
    let stored = create_definition(&node, def.clone()).await.unwrap();
    match &stored.handler {
        Some(pb::task_definition::Handler::Workflow(w)) => assert_eq!(
            w.steps[1].handler,
            Some(pb::workflow_step::Handler::Definition("shared.echo".into())),
            "stored as a reference"
        ),
        h => panic!("{h:?}"),
    }
    let binding = bind_existing(&node, "acme", "referring").await;
    let wf = trigger(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Succeeded, "{done:#?}");
    let steps = steps_of(&node, "acme", &wf.id).await;
    let b = step(&steps, "b");
    let got = result(b);
    assert_eq!(got["from_def"], 1, "the definition's params: {got}");
    assert_eq!(got["who"], "step", "the step's over them: {got}");
    assert_eq!(got["wf"], true, "the workflow's too: {got}");
    assert_eq!(got["steps"]["a"]["a"], 1);
    assert_eq!(b.max_attempts, 3, "the definition's retry policy");

    // Unknown, a workflow, or itself: INVALID_ARGUMENT naming the step.
    for (target, text) in [
        ("nope", "no definition"),
        ("referring", "is a workflow"),
        ("selfish", "itself"),
    ] {
        let mut r = by_ref.clone();
        r.handler = Some(pb::workflow_step::Handler::Definition(target.into()));
        let err = create_definition(
            &node,
            workflow_def(
                "selfish",
                vec![sh_step("a", &[], "true"), r],
                pb::WorkflowOnFailure::Stop,
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(
            violation_fields(&err),
            vec!["definition.workflow.steps[1].definition".to_string()]
        );
        assert!(err.message().contains(text), "{text}: {err:?}");
    }

    // A definition deleted since: the step ends FAILED, the workflow too.
    node.definitions()
        .delete_definition(as_tenant(
            "",
            pb::DeleteDefinitionRequest {
                name: "shared.echo".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let wf = trigger(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::Failed, "{done:#?}");
    let steps = steps_of(&node, "acme", &wf.id).await;
    let b = step(&steps, "b");
    assert_eq!(
        (state(b), b.reason.as_str()),
        (pb::RunState::Failed, "definition_missing")
    );
    node.stop().await;
}

/// An `event` step (completed in its claim, in batches).
fn event_step(name: &str, deps: &[&str]) -> pb::WorkflowStep {
    pb::WorkflowStep {
        name: name.into(),
        handler: Some(pb::workflow_step::Handler::Event(pb::EventHandler {})),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Event steps of one workflow run end in the same claim transaction (a
/// batch), each firing the advance at commit; the first advance sees them
/// all and the others are skipped (migration 20261206000200). Many such
/// workflows at once, in two tenants (two event claim shards may run at
/// once): every join starts exactly once, after every step it waits for,
/// and every workflow succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_steps_that_end_together_advance_their_workflow_once_and_lose_nothing() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let fan: Vec<String> = (1..=6).map(|i| format!("b{i}")).collect();
    let fan_refs: Vec<&str> = fan.iter().map(String::as_str).collect();
    let mut steps = vec![event_step("a", &[])];
    steps.extend(fan.iter().map(|b| event_step(b, &["a"])));
    steps.push(event_step("j", &fan_refs));
    steps.push(event_step("z", &["j"]));
    let mut def = workflow_def("fan", steps, pb::WorkflowOnFailure::Stop);
    def.overlap_policy = pb::OverlapPolicy::Allow as i32;
    let mut workflows = Vec::new();
    for tenant in ["acme", "globex"] {
        let binding = if tenant == "acme" {
            define_and_bind(&node, tenant, def.clone()).await
        } else {
            bind_existing(&node, tenant, "fan").await
        };
        for _ in 0..15 {
            workflows.push((tenant, trigger(&node, tenant, &binding.id).await.id));
        }
    }
    for (tenant, id) in &workflows {
        let done = wait_workflow(&node, tenant, id).await;
        assert_eq!(state(&done), pb::RunState::Succeeded, "{done:#?}");
        let steps = steps_of(&node, tenant, id).await;
        assert_eq!(steps.len(), 9, "each step once: {steps:#?}");
        for name in ["a", "j", "z"]
            .iter()
            .copied()
            .chain(fan_refs.iter().copied())
        {
            let s = step(&steps, name);
            assert_eq!(state(s), pb::RunState::Succeeded, "{s:#?}");
            assert_eq!(s.attempt, 1);
        }
        let j = step(&steps, "j");
        let last_b = fan_refs
            .iter()
            .map(|b| secs(&step(&steps, b).end_time))
            .fold(f64::MIN, f64::max);
        assert!(
            secs(&j.start_time) >= last_b,
            "j starts after every b: {steps:#?}"
        );
        let z = step(&steps, "z");
        assert!(secs(&z.start_time) >= secs(&j.end_time), "{steps:#?}");
    }
    node.stop().await;
}

/// A workflow run waiting under `BUFFER_ONE` starts once the one before it
/// has ended, not before, and without waiting for a poll (there is none to
/// fall back on here: the end of the first one's last step wakes the
/// claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_workflow_run_starts_when_the_one_before_it_ends() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "n1");
    s.claim_poll = Duration::from_secs(600);
    let node = TestNode::start_with(s).await;
    let mut def = workflow_def(
        "buffered",
        vec![sh_step("a", &[], "sleep 1")],
        pb::WorkflowOnFailure::Stop,
    );
    def.overlap_policy = pb::OverlapPolicy::BufferOne as i32;
    let binding = define_and_bind(&node, "acme", def).await;
    let first = trigger(&node, "acme", &binding.id).await;
    steps_until(&node, &first.id, "a runs", |s| {
        s.iter()
            .any(|r| r.step == "a" && state(r) == pb::RunState::Running)
    })
    .await;
    let second = trigger(&node, "acme", &binding.id).await;
    assert_eq!(state(&second), pb::RunState::Queued, "{second:#?}");
    let first = wait_workflow(&node, "acme", &first.id).await;
    let second = wait_workflow(&node, "acme", &second.id).await;
    assert_eq!(state(&first), pb::RunState::Succeeded, "{first:#?}");
    assert_eq!(state(&second), pb::RunState::Succeeded, "{second:#?}");
    assert!(
        secs(&second.start_time) >= secs(&first.end_time),
        "one at a time: {first:#?} {second:#?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_past_its_timeout_ends_timed_out_stops_its_steps_and_retries_by_its_policy() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let mut def = workflow_def(
        "bounded",
        vec![
            sh_step("a", &[], "true"),
            // Leaves its pid, then outlives the workflow's timeout.
            sh_step(
                "b",
                &["a"],
                &format!("echo $$ >> {d}/b.pids; exec sleep 60"),
            ),
            sh_step("c", &["b"], "true"),
        ],
        pb::WorkflowOnFailure::Stop,
    );
    def.timeout = Some(dur(2000));
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(50)),
        ..Default::default()
    });
    let binding = define_and_bind(&node, "acme", def).await;
    let wf = trigger(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::TimedOut, "{done:#?}");
    assert_eq!(done.reason, "timeout");
    let took = ((secs(&done.end_time) - secs(&done.start_time)) * 1000.0) as i64;
    // Ended by its timeout (2 s), checked about once a second, plus the
    // step's SIGTERM.
    assert!(
        (2000..6000).contains(&took),
        "ended {took} ms after its start"
    );
    let steps = steps_of(&node, "acme", &wf.id).await;
    assert_eq!(state(step(&steps, "a")), pb::RunState::Succeeded);
    let b = step(&steps, "b");
    assert_eq!(state(b), pb::RunState::Cancelled, "{b:#?}");
    assert_eq!(b.reason, "timeout");
    assert!(
        steps.iter().all(|r| r.step != "c"),
        "c never starts: {steps:#?}"
    );
    // b's process is gone (terminated, and reaped by its node).
    let pid = std::fs::read_to_string(dir.path().join("b.pids")).unwrap();
    let pid = pid.lines().next().unwrap().trim().to_string();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "b's process {pid} still runs"
    );
    // The second attempt (its retry policy) reuses a, runs b again, and
    // times out as well: TIMED_OUT, and no third attempt.
    let runs = runs_until(
        &node,
        "acme",
        &binding.id,
        WAIT,
        "the workflow's retry ends",
        |runs| {
            runs.iter()
                .any(|r| r.retry_of == wf.id && r.parent_run_id.is_empty() && is_terminal(r))
        },
    )
    .await;
    let retry = runs
        .iter()
        .find(|r| r.retry_of == wf.id && r.parent_run_id.is_empty())
        .unwrap();
    assert_eq!(retry.trigger, pb::RunTrigger::Retry as i32);
    assert_eq!(retry.attempt, 2);
    assert_eq!(state(retry), pb::RunState::TimedOut, "{retry:#?}");
    let steps = steps_of(&node, "acme", &retry.id).await;
    assert_eq!(step(&steps, "a").reason, "reused");
    assert_eq!(state(step(&steps, "b")), pb::RunState::Cancelled);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let workflow_runs = runs_of(&node, "acme", &binding.id)
        .await
        .into_iter()
        .filter(|r| r.parent_run_id.is_empty())
        .count();
    assert_eq!(workflow_runs, 2, "max_attempts 2: no third attempt");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_whose_step_waits_past_its_timeout_ends_timed_out_at_once() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    // A worker step of a queue no worker serves: it waits QUEUED.
    let waiting = pb::WorkflowStep {
        name: "w".into(),
        handler: Some(pb::workflow_step::Handler::Worker(pb::WorkerHandler {
            queue: "nobody-serves-this".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut def = workflow_def(
        "waits",
        vec![sh_step("a", &[], "true"), waiting],
        pb::WorkflowOnFailure::Continue,
    );
    def.timeout = Some(dur(1000));
    let binding = define_and_bind(&node, "acme", def).await;
    let wf = trigger(&node, "acme", &binding.id).await;
    let done = wait_workflow(&node, "acme", &wf.id).await;
    assert_eq!(state(&done), pb::RunState::TimedOut, "{done:#?}");
    assert_eq!(done.reason, "timeout");
    assert!(
        done.error
            .as_ref()
            .is_some_and(|e| e.message.contains("timeout of 1 s")),
        "{:?}",
        done.error
    );
    let took = ((secs(&done.end_time) - secs(&done.start_time)) * 1000.0) as i64;
    assert!(
        (1000..4000).contains(&took),
        "ended {took} ms after its start"
    );
    let steps = steps_of(&node, "acme", &wf.id).await;
    assert_eq!(state(step(&steps, "a")), pb::RunState::Succeeded);
    let w = step(&steps, "w");
    assert_eq!(state(w), pb::RunState::Cancelled, "{w:#?}");
    assert_eq!(w.reason, "timeout");
    // Its log ends with the TIMED_OUT event, reason `timeout`.
    let events = tail_all(&node, "acme", &wf.id, 0).await;
    let last = events.last().cloned().expect("events");
    assert_eq!(last.run_id, wf.id, "the workflow run's end comes last");
    let own: Vec<pb::RunEvent> = events.into_iter().filter(|e| e.run_id == wf.id).collect();
    assert_dense(&own);
    match &last.kind {
        Some(pb::run_event::Kind::StateChanged(c)) => {
            assert_eq!(c.to_state, pb::RunState::TimedOut as i32);
            assert_eq!(c.reason, "timeout");
        }
        other => panic!("last event {other:?}"),
    }
    node.stop().await;
}
