//! Per-binding policy overrides (timeout, retry policy, priority,
//! max_active_runs), the active-run cap under ALLOW across nodes, and
//! `sked serve --definitions`.

use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;

fn secs_dur(s: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s,
        nanos: 0,
    }
}

fn retry(max_attempts: i32) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts,
        initial_backoff: Some(dur(100)),
        ..Default::default()
    }
}

async fn bind(node: &TestNode, tenant: &str, b: pb::Binding) -> Result<pb::Binding, tonic::Status> {
    node.bindings()
        .create_binding(as_tenant(
            tenant,
            pb::CreateBindingRequest { binding: Some(b) },
        ))
        .await
        .map(|r| r.into_inner())
}

/// The priority stored on a run (what the claim orders by), as psql shows it.
async fn stored_priority(db: &TestDb, run_id: &str) -> i32 {
    let pool = db.pool().await;
    let p: i32 = sqlx::query_scalar("SELECT priority FROM runs WHERE id = $1::uuid")
        .bind(run_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_overrides_run_with_their_own_values_and_unset_ones_follow_the_definition() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut def = sh_def("ovr.sleep", "sleep 5", manual());
    def.timeout = Some(secs_dur(30));
    def.retry_policy = Some(retry(1));
    def.priority = 1;
    create_definition(&node, def).await.unwrap();

    // acme overrides all three; globex inherits
    let a = bind(
        &node,
        "acme",
        pb::Binding {
            definition: "ovr.sleep".into(),
            timeout: Some(secs_dur(1)),
            retry_policy: Some(retry(2)),
            priority: Some(7),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let g = bind(
        &node,
        "globex",
        pb::Binding {
            definition: "ovr.sleep".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ea = a.effective.clone().unwrap();
    assert_eq!(ea.timeout.unwrap().seconds, 1);
    assert_eq!(ea.retry_policy.unwrap().max_attempts, 2);
    assert_eq!(ea.priority, 7);
    assert_eq!(ea.overridden, ["retry_policy", "timeout", "priority"]);
    let eg = g.effective.clone().unwrap();
    assert_eq!(eg.timeout.unwrap().seconds, 30);
    assert_eq!(eg.retry_policy.unwrap().max_attempts, 1);
    assert_eq!(eg.priority, 1);
    assert!(eg.overridden.is_empty(), "{:?}", eg.overridden);

    // acme's run: past its 1 s timeout it ends TIMED_OUT, and is retried
    // once (2 attempts), each attempt with priority 7
    let first = trigger(&node, "acme", &a.id).await;
    assert_eq!(first.timeout.unwrap().seconds, 1);
    assert_eq!(first.max_attempts, 2);
    assert_eq!(stored_priority(&db, &first.id).await, 7);
    let runs = runs_until(
        &node,
        "acme",
        &a.id,
        Duration::from_secs(60),
        "two attempts ended",
        |rs| rs.len() == 2 && rs.iter().all(is_terminal),
    )
    .await;
    let mut attempts: Vec<i32> = runs.iter().map(|r| r.attempt).collect();
    attempts.sort();
    assert_eq!(attempts, [1, 2]);
    for r in &runs {
        assert_eq!(state(r), pb::RunState::TimedOut, "{r:?}");
        let took = secs(&r.end_time) - secs(&r.start_time);
        assert!(
            took < 4.0,
            "ended by the 1 s timeout, not the 5 s sleep: {took}"
        );
        assert_eq!(stored_priority(&db, &r.id).await, 7);
    }

    // the definition changes: globex (inheriting) follows, acme keeps its own
    node.definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                name: "ovr.sleep".into(),
                timeout: Some(secs_dur(2)),
                retry_policy: Some(retry(3)),
                priority: 3,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["timeout".into(), "retry_policy".into(), "priority".into()],
            }),
        })
        .await
        .unwrap();
    let eg = get_binding(&node, "globex", &g.id).await.effective.unwrap();
    assert_eq!(eg.timeout.unwrap().seconds, 2);
    assert_eq!(eg.retry_policy.unwrap().max_attempts, 3);
    assert_eq!(eg.priority, 3);
    let ea = get_binding(&node, "acme", &a.id).await.effective.unwrap();
    assert_eq!(ea.timeout.unwrap().seconds, 1);
    assert_eq!(ea.priority, 7);
    let run = trigger(&node, "globex", &g.id).await;
    assert_eq!(run.timeout.unwrap().seconds, 2);
    assert_eq!(run.max_attempts, 3);
    assert_eq!(stored_priority(&db, &run.id).await, 3);
    node.runs()
        .cancel_run(as_tenant(
            "globex",
            pb::CancelRunRequest {
                run_id: run.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    // clearing acme's timeout override: it inherits the definition's again
    let cleared = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: a.id.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["timeout".into(), "priority".into()],
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.timeout.is_none() && cleared.priority.is_none());
    let ea = cleared.effective.unwrap();
    assert_eq!(ea.timeout.unwrap().seconds, 2);
    assert_eq!(ea.priority, 3);
    assert_eq!(ea.retry_policy.unwrap().max_attempts, 2, "still its own");
    assert_eq!(ea.overridden, ["retry_policy"]);
    // and a new override through the update mask
    let b = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: a.id.clone(),
                    priority: Some(-5),
                    ..Default::default()
                }),
                update_mask: None,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.effective.unwrap().priority, -5);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_override_values_are_invalid_argument_naming_the_field() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    create_definition(&node, sh_def("ovr.bad", "true", manual()))
        .await
        .unwrap();
    let base = || pb::Binding {
        definition: "ovr.bad".into(),
        ..Default::default()
    };
    let cases: Vec<(pb::Binding, &str)> = vec![
        (
            pb::Binding {
                timeout: Some(secs_dur(0)),
                ..base()
            },
            "binding.timeout",
        ),
        (
            pb::Binding {
                timeout: Some(secs_dur(2 * 86_400)),
                ..base()
            },
            "binding.timeout",
        ),
        (
            pb::Binding {
                timeout: Some(dur(1500)),
                ..base()
            },
            "binding.timeout",
        ),
        (
            pb::Binding {
                retry_policy: Some(retry(101)),
                ..base()
            },
            "binding.retry_policy.max_attempts",
        ),
        (
            pb::Binding {
                retry_policy: Some(pb::RetryPolicy {
                    max_attempts: 2,
                    backoff_coefficient: 0.5,
                    ..Default::default()
                }),
                ..base()
            },
            "binding.retry_policy.backoff_coefficient",
        ),
        (
            pb::Binding {
                max_active_runs: Some(1001),
                ..base()
            },
            "binding.max_active_runs",
        ),
    ];
    for (b, field) in cases {
        let e = bind(&node, "acme", b).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(violation_fields(&e), [field], "{e:?}");
    }
    // nothing was written
    let list = node
        .bindings()
        .list_bindings(as_tenant("acme", pb::ListBindingsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.bindings.is_empty());

    let ok = bind(&node, "acme", base()).await.unwrap();
    let e = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: ok.id.clone(),
                    max_active_runs: Some(5000),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["max_active_runs".into()],
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(violation_fields(&e), ["binding.max_active_runs"]);
    assert!(e.message().contains("1000"), "names the limit: {e:?}");

    let mut def = sh_def("ovr.bad2", "true", manual());
    def.max_active_runs = Some(1001);
    let e = create_definition(&node, def).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(violation_fields(&e), ["definition.max_active_runs"]);
    node.stop().await;
}

/// The most runs active at once, from their start and end times (a run
/// not ended yet counts as active to the end).
fn max_concurrent(runs: &[pb::Run]) -> usize {
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for r in runs.iter().filter(|r| r.start_time.is_some()) {
        edges.push((secs(&r.start_time), 1));
        let end = if r.end_time.is_some() {
            secs(&r.end_time)
        } else {
            f64::MAX
        };
        edges.push((end, -1));
    }
    // an end at the same instant as a start frees its slot first
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_active_runs_caps_the_active_runs_of_a_binding_across_nodes() {
    let db = TestDb::new().await;
    // two nodes fire and claim from the same database
    let n1 = TestNode::start(&db, "n1").await;
    let n2 = TestNode::start(&db, "n2").await;
    let mut def = sh_def("ovr.capped", "sleep 3", every(1));
    def.overlap_policy = pb::OverlapPolicy::Allow as i32;
    def.max_active_runs = Some(3);
    create_definition(&n1, def).await.unwrap();
    assert_eq!(
        n1.definitions()
            .get_definition(pb::GetDefinitionRequest {
                name: "ovr.capped".into()
            })
            .await
            .unwrap()
            .into_inner()
            .max_active_runs,
        Some(3)
    );
    let acme = bind(
        &n1,
        "acme",
        pb::Binding {
            definition: "ovr.capped".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(acme.effective.as_ref().unwrap().max_active_runs, 3);
    // globex overrides the cap down to 1
    let globex = bind(
        &n2,
        "globex",
        pb::Binding {
            definition: "ovr.capped".into(),
            max_active_runs: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let eg = globex.effective.as_ref().unwrap();
    assert_eq!(eg.max_active_runs, 1);
    assert_eq!(eg.overridden, ["max_active_runs"]);

    let done = |rs: &[pb::Run]| {
        rs.iter()
            .filter(|r| state(r) == pb::RunState::Succeeded)
            .count()
            >= 4
            && rs
                .iter()
                .filter(|r| state(r) == pb::RunState::Skipped && r.reason == "overlap")
                .count()
                >= 3
    };
    let a = runs_until(
        &n1,
        "acme",
        &acme.id,
        Duration::from_secs(60),
        "acme: 4 runs succeeded, 3 fires skipped (overlap)",
        done,
    )
    .await;
    let g = runs_until(
        &n2,
        "globex",
        &globex.id,
        Duration::from_secs(60),
        "globex: 4 runs succeeded, 3 fires skipped (overlap)",
        done,
    )
    .await;
    for (runs, cap) in [(&a, 3), (&g, 1)] {
        let m = max_concurrent(runs);
        assert!(m <= cap, "{m} runs active at once, cap {cap}: {runs:#?}");
        assert_eq!(
            m, cap,
            "the cap is reached (runs sleep 3 s, fires every 1 s)"
        );
        // overlap; misfire only where a loaded machine left the
        // scheduler more than the catch-up window behind
        for r in runs.iter().filter(|r| state(r) == pb::RunState::Skipped) {
            assert!(matches!(r.reason.as_str(), "overlap" | "misfire"), "{r:?}");
        }
        assert!(
            runs.iter().all(|r| matches!(
                state(r),
                pb::RunState::Skipped | pb::RunState::Succeeded
            ) || !is_terminal(r)),
            "{runs:#?}"
        );
    }
    n2.stop().await;
    n1.stop().await;
}

const DEFS: &str = "definitions:
  - name: seed.hello
    command: {program: sh, args: [-c, 'echo hello']}
    schedule: {manual: {}}
    timeout: 30s
  - name: seed.builtin
    command: {program: sh, args: [-c, 'echo builtin']}
    schedule: {manual: {}}
    deletion_protection: true
    overlap_policy: OVERLAP_POLICY_ALLOW
    max_active_runs: 2
bindings:
  acme:
    - definition: seed.builtin
      timeout: 5s
      priority: 4
      max_active_runs: 1
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_definitions_applies_the_file_once_and_protects_what_it_marks() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("sked-defs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("defs.yaml");
    std::fs::write(&path, DEFS).unwrap();
    let file = sked::app::DefinitionsFile::read(&path).unwrap();
    let with_file = |id: &str| {
        let mut s = settings(&db, id);
        s.definitions = Some(file.clone());
        s
    };
    // two nodes start at once with the same file
    let (n1, n2) = tokio::join!(
        TestNode::start_with(with_file("n1")),
        TestNode::start_with(with_file("n2"))
    );
    let get = |name: &'static str| {
        let c = n1.definitions();
        async move {
            c.clone()
                .get_definition(pb::GetDefinitionRequest { name: name.into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let builtin = get("seed.builtin").await;
    assert!(builtin.deletion_protection);
    assert_eq!(builtin.max_active_runs, Some(2));
    let hello = get("seed.hello").await;
    assert!(!hello.deletion_protection);
    assert_eq!(hello.timeout.unwrap().seconds, 30);
    let list = n1
        .bindings()
        .list_bindings(as_tenant("acme", pb::ListBindingsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .bindings;
    assert_eq!(
        list.len(),
        1,
        "one binding, however many nodes applied the file"
    );
    let b = &list[0];
    assert_eq!(b.timeout.unwrap().seconds, 5);
    assert_eq!(b.priority, Some(4));
    assert_eq!(b.max_active_runs, Some(1));
    assert_eq!(b.effective.as_ref().unwrap().max_active_runs, 1);

    // protected: DeleteDefinition refuses it (even forced); the other goes
    let refused = n2
        .definitions()
        .delete_definition(pb::DeleteDefinitionRequest {
            name: "seed.builtin".into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    n2.stop().await;

    // a restart with the same file changes nothing
    let n3 = TestNode::start_with(with_file("n3")).await;
    let again = n3
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "seed.builtin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.etag, builtin.etag, "a restart rewrites nothing");
    n3.stop().await;
    n1.stop().await;

    // a bad file: the real binary exits non-zero naming file, line and key
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "definitions:\n  - name: x\n    command: {program: sh}\n    schedul: {manual: {}}\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sked"))
        .args(["serve", "--listen", "127.0.0.1:0", "--definitions"])
        .arg(&bad)
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:", bad.display())) && err.contains("schedul"),
        "{err}"
    );
    // a file sked refuses (a bad binding override) also stops the node
    let refused = dir.join("refused.yaml");
    std::fs::write(
        &refused,
        "bindings:\n  acme:\n    - definition: seed.hello\n      max_active_runs: 5000\n",
    )
    .unwrap();
    let file = sked::app::DefinitionsFile::read(&refused).unwrap();
    let mut s = settings(&db, "n4");
    s.definitions = Some(file);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = sked::app::serve(s, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused.yaml") && e.contains("binding.max_active_runs"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
