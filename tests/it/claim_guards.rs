//! What the claim guards (SPEC §3, issue 12):
//! - **stopped means stopped:** after DeleteBinding, PauseBinding, a disable
//!   of the binding or of its definition, or a forced DeleteDefinition
//!   returns, no automatic run of the binding starts (retries included);
//!   paused/disabled runs wait and start after resume/enable; a deleted
//!   binding's runs end `CANCELLED`/`binding_deleted`, running ones too;
//!   TriggerRun on a paused binding runs, and so do its retries.
//! - **run times:** a run never starts before the end of the run whose slot
//!   it takes (tenant quota, or the binding's previous run), even when the
//!   claiming node's clock lags the node that ended that run.

use std::time::Duration;

use crate::common::*;
use sked::domain::Clock;
use sked::proto::v1 as pb;

async fn list_runs(node: &TestNode, tenant: &str, binding_id: &str) -> Vec<pb::Run> {
    node.runs()
        .list_runs(as_tenant(
            tenant,
            pb::ListRunsRequest {
                binding_id: binding_id.into(),
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .expect("list runs")
        .into_inner()
        .runs
}

/// The states a run went through, from its events.
async fn states_seen(node: &TestNode, tenant: &str, id: &str) -> Vec<pb::RunState> {
    node.logs()
        .list_run_events(as_tenant(
            tenant,
            pb::ListRunEventsRequest {
                run_id: id.into(),
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .expect("list run events")
        .into_inner()
        .events
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(pb::run_event::Kind::StateChanged(s)) => pb::RunState::try_from(s.to_state).ok(),
            _ => None,
        })
        .collect()
}

/// Creates definition `name`: an `event` handler firing on New Year's Day
/// (so it never fires during a test) with overlap policy `overlap`.
async fn new_year_event_def(node: &TestNode, name: &str, overlap: pb::OverlapPolicy) {
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                overlap_policy: overlap as i32,
                ..event_def(name, cron("0 0 1 1 *", "UTC"))
            }),
        })
        .await
        .expect("create definition");
}

/// Polls run `id` until `done` holds for it (within [`WAIT`]).
async fn wait_run(
    node: &TestNode,
    tenant: &str,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Run) -> bool,
) -> pb::Run {
    let mut last = None;
    let r = tokio::time::timeout(WAIT, async {
        loop {
            let r = get_run(node, tenant, id).await;
            if done(&r) {
                return r;
            }
            last = Some(r);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("{what}: {last:?}"))
}

/// A definition whose runs fail, with one retry after `backoff_ms`.
fn failing(name: &str, schedule: pb::Schedule, backoff_ms: i64) -> pb::TaskDefinition {
    let mut def = sh_def(name, "exit 3", schedule);
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(backoff_ms)),
        backoff_coefficient: 1.0,
        max_backoff: Some(dur(backoff_ms)),
    });
    def
}

/// Binds a failing definition that fires every second and waits for its
/// first attempt's retry to be pending (`SCHEDULED`, due 3 s after the
/// failure); returns the binding and that retry.
async fn pending_retry(node: &TestNode, name: &str) -> (pb::Binding, pb::Run) {
    let b = define_and_bind(node, "acme", failing(name, every(1), 3000)).await;
    let retry = tokio::time::timeout(WAIT, async {
        loop {
            let runs = list_runs(node, "acme", &b.id).await;
            if let Some(r) = runs
                .iter()
                .find(|r| r.trigger == pb::RunTrigger::Retry as i32)
            {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a failed fire gets a retry");
    assert_eq!(state(&retry), pb::RunState::Scheduled, "{retry:?}");
    (b, retry)
}

/// Waits until a run due after the retry has been claimed, then checks the
/// retry never started.
async fn assert_held(node: &TestNode, retry: &pb::Run) -> pb::Run {
    claims_passed(node, secs(&retry.not_before) + 0.1).await;
    let r = get_run(node, "acme", &retry.id).await;
    assert!(
        matches!(state(&r), pb::RunState::Scheduled | pb::RunState::Queued),
        "the held retry waits: {r:?}"
    );
    assert!(r.start_time.is_none(), "{r:?}");
    let seen = states_seen(node, "acme", &retry.id).await;
    assert!(
        !seen.contains(&pb::RunState::Running),
        "never RUNNING: {seen:?}"
    );
    r
}

/// After the stop is undone: the retry starts (after `since`) and ends.
async fn assert_runs_after(node: &TestNode, retry: &pb::Run, since: f64) {
    let r = wait_run(node, "acme", &retry.id, "the retry runs", is_terminal).await;
    assert_eq!(state(&r), pb::RunState::Failed, "{r:?}");
    assert!(secs(&r.start_time) >= since, "started after: {r:?}");
    let seen = states_seen(node, "acme", &retry.id).await;
    assert!(seen.contains(&pb::RunState::Running), "{seen:?}");
}

async fn set_binding_enabled(node: &TestNode, b: &pb::Binding, on: bool) {
    node.bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    enabled: Some(on),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            },
        ))
        .await
        .expect("update binding");
}

async fn set_definition_enabled(node: &TestNode, name: &str, on: bool) {
    node.definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                name: name.into(),
                enabled: Some(on),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["enabled".into()],
            }),
        })
        .await
        .expect("update definition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retry_of_a_paused_binding_waits_and_runs_after_resume() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let (b, retry) = pending_retry(&node, "pauseretry").await;
    pause(&node, "acme", &b.id).await;
    assert_held(&node, &retry).await;
    let resumed = now_secs();
    resume(&node, "acme", &b.id).await;
    assert_runs_after(&node, &retry, resumed).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retry_of_a_disabled_binding_waits_and_runs_after_enable() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let (b, retry) = pending_retry(&node, "disableretry").await;
    set_binding_enabled(&node, &b, false).await;
    assert_held(&node, &retry).await;
    let enabled = now_secs();
    set_binding_enabled(&node, &b, true).await;
    assert_runs_after(&node, &retry, enabled).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retry_of_a_disabled_definition_waits_and_runs_after_enable() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let (_, retry) = pending_retry(&node, "defdisable").await;
    set_definition_enabled(&node, "defdisable", false).await;
    assert_held(&node, &retry).await;
    let enabled = now_secs();
    set_definition_enabled(&node, "defdisable", true).await;
    assert_runs_after(&node, &retry, enabled).await;
    node.stop().await;
}

/// The retry of a deleted binding ends `CANCELLED`/`binding_deleted` at once,
/// never runs, and stays readable.
async fn assert_cancelled_by_delete(node: &TestNode, retry: &pb::Run) {
    let r = get_run(node, "acme", &retry.id).await;
    assert_eq!(state(&r), pb::RunState::Cancelled, "{r:?}");
    assert_eq!(r.reason, "binding_deleted", "{r:?}");
    claims_passed(node, secs(&retry.not_before) + 0.1).await;
    let r = get_run(node, "acme", &retry.id).await;
    assert_eq!(state(&r), pb::RunState::Cancelled, "{r:?}");
    assert!(r.start_time.is_none(), "{r:?}");
    let seen = states_seen(node, "acme", &retry.id).await;
    assert!(
        !seen.contains(&pb::RunState::Running),
        "never RUNNING: {seen:?}"
    );
    let runs = list_runs(node, "acme", &retry.binding_id).await;
    assert!(
        runs.iter().all(is_terminal),
        "nothing of the deleted binding waits or runs: {runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retry_of_a_deleted_binding_is_cancelled_and_never_runs() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let (b, retry) = pending_retry(&node, "deleteretry").await;
    node.bindings()
        .delete_binding(as_tenant(
            "acme",
            pb::DeleteBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .expect("delete binding");
    assert_cancelled_by_delete(&node, &retry).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_retry_of_a_force_deleted_definition_is_cancelled_and_never_runs() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let (_, retry) = pending_retry(&node, "forcedelete").await;
    node.definitions()
        .delete_definition(pb::DeleteDefinitionRequest {
            name: "forcedelete".into(),
            force: true,
        })
        .await
        .expect("force delete definition");
    assert_cancelled_by_delete(&node, &retry).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_run_of_a_deleted_binding_ends_cancelled_and_is_not_retried() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut def = sh_def("sleeper", "sleep 30", manual());
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 3,
        initial_backoff: Some(dur(100)),
        backoff_coefficient: 1.0,
        max_backoff: Some(dur(100)),
    });
    let b = define_and_bind(&node, "acme", def).await;
    let run = trigger(&node, "acme", &b.id).await;
    wait_run(&node, "acme", &run.id, "the run starts", |r| {
        state(r) == pb::RunState::Running
    })
    .await;
    let deleted = std::time::Instant::now();
    node.bindings()
        .delete_binding(as_tenant(
            "acme",
            pb::DeleteBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .expect("delete binding");
    let r = wait_run(&node, "acme", &run.id, "the run ends", is_terminal).await;
    assert!(
        deleted.elapsed() < Duration::from_secs(10),
        "stopped promptly, not after its 30 s"
    );
    assert_eq!(state(&r), pb::RunState::Cancelled, "{r:?}");
    assert_eq!(r.reason, "binding_deleted", "{r:?}");
    // A retry would be due 100 ms after the end.
    claims_passed(&node, secs(&r.end_time) + 0.2).await;
    let runs = list_runs(&node, "acme", &b.id).await;
    assert_eq!(runs.len(), 1, "no retry: {runs:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_trigger_on_a_paused_binding_runs_and_so_does_its_retry() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", failing("manualpaused", manual(), 200)).await;
    pause(&node, "acme", &b.id).await;
    let run = trigger(&node, "acme", &b.id).await;
    let r = wait_run(&node, "acme", &run.id, "the manual run ends", is_terminal).await;
    assert_eq!(state(&r), pb::RunState::Failed, "{r:?}");
    let retry = tokio::time::timeout(WAIT, async {
        loop {
            let runs = list_runs(&node, "acme", &b.id).await;
            if let Some(x) = runs.iter().find(|x| x.retry_of == run.id && is_terminal(x)) {
                return x.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the manual run's retry runs while paused");
    assert_eq!(state(&retry), pb::RunState::Failed, "{retry:?}");
    assert_eq!(retry.attempt, 2);
    node.stop().await;
}

/// Two nodes share a database; the second's clock lags the first's by 5 s.
/// A run of the first node holds the only slot (a tenant quota of 1, or a
/// binding whose overlap policy is not ALLOW) while the next one waits; the
/// first node stops claiming (shutdown) and lets its run finish, so the
/// lagging node claims the next one. Its start time must not precede the
/// end of the run whose slot it took.
async fn lagging_node_starts_no_earlier_than_the_slot_was_freed(quota: bool) {
    let db = TestDb::new().await;
    let mut s = settings(&db, "ahead");
    s.shutdown_grace = Duration::from_secs(15);
    let ahead = TestNode::start_with(s).await;
    let mut def = sh_def("slot", "sleep 1", manual());
    if quota {
        def.overlap_policy = pb::OverlapPolicy::Allow as i32;
        ahead
            .admin()
            .set_tenant_quota(pb::SetTenantQuotaRequest {
                quota: Some(pb::TenantQuota {
                    tenant_id: "acme".into(),
                    max_concurrent_runs: Some(1),
                    ..Default::default()
                }),
            })
            .await
            .expect("set quota");
    }
    let b = define_and_bind(&ahead, "acme", def).await;
    let first = trigger(&ahead, "acme", &b.id).await;
    wait_run(&ahead, "acme", &first.id, "the first run starts", |r| {
        state(r) == pb::RunState::Running
    })
    .await;
    let mut s = settings(&db, "lagging");
    s.clock = Clock::system();
    s.clock.advance(chrono::Duration::seconds(-5));
    let lagging = TestNode::start_with(s).await;
    // Triggered through the lagging node, so it is due by that node's clock.
    let second = trigger(&lagging, "acme", &b.id).await;
    // The first node stops claiming now and drains its run.
    let stopping = tokio::spawn(ahead.stop());
    let second = wait_run(&lagging, "acme", &second.id, "the second run ends", |r| {
        is_terminal(r)
    })
    .await;
    stopping.await.expect("first node stops");
    let first = get_run(&lagging, "acme", &first.id).await;
    assert_eq!(state(&first), pb::RunState::Succeeded, "{first:?}");
    assert_eq!(state(&second), pb::RunState::Succeeded, "{second:?}");
    assert_eq!(first.node_id, "ahead");
    assert_eq!(second.node_id, "lagging", "the lagging node took the slot");
    assert!(
        secs(&second.start_time) >= secs(&first.end_time),
        "started {:.6} s before the run whose slot it took ended",
        secs(&first.end_time) - secs(&second.start_time)
    );
    assert!(
        secs(&second.end_time) >= secs(&second.start_time),
        "ends no earlier than it started: {second:?}"
    );
    lagging.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_starts_a_quota_slot_no_earlier_than_it_was_freed() {
    lagging_node_starts_no_earlier_than_the_slot_was_freed(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_starts_a_bindings_next_run_no_earlier_than_the_previous_ended() {
    lagging_node_starts_no_earlier_than_the_slot_was_freed(false).await;
}

/// A retry written for a binding that a concurrent DeleteBinding removed
/// (the reaper's race, planted here) is cancelled when due, never queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_retry_of_a_deleted_binding_is_cancelled_instead_of_queued() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", sh_def("gone", "true", manual())).await;
    node.bindings()
        .delete_binding(as_tenant(
            "acme",
            pb::DeleteBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .expect("delete binding");
    let id = uuid::Uuid::now_v7();
    let binding: uuid::Uuid = b.id.parse().unwrap();
    let pool = db.pool().await;
    sqlx::query(
        "INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, attempt,
                           scheduled_time, create_time, handler, params, not_before, last_seq)
         VALUES ($1, 'acme', $2, 'gone', 'RETRY', 'SCHEDULED', 2, now(), now(),
                 '{\"kind\": \"command\", \"program\": \"true\"}', '{}', now(), 1)",
    )
    .bind(id)
    .bind(binding)
    .execute(&pool)
    .await
    .expect("plant a retry");
    let r = wait_run(
        &node,
        "acme",
        &id.to_string(),
        "the retry ends",
        is_terminal,
    )
    .await;
    assert_eq!(state(&r), pb::RunState::Cancelled, "{r:?}");
    assert_eq!(r.reason, "binding_deleted", "{r:?}");
    assert!(r.start_time.is_none(), "{r:?}");
    node.stop().await;
}

/// Event handler runs are claimed (and completed) by the same guarded claim:
/// a paused binding's backfilled event runs wait, also for a tenant whose
/// quota makes them queue, and complete after ResumeBinding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfilled_event_runs_of_a_paused_binding_wait_for_resume() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    for (tenant, quota) in [("acme", None), ("limited", Some(5))] {
        if let Some(q) = quota {
            node.admin()
                .set_tenant_quota(pb::SetTenantQuotaRequest {
                    quota: Some(pb::TenantQuota {
                        tenant_id: tenant.into(),
                        max_concurrent_runs: Some(q),
                        ..Default::default()
                    }),
                })
                .await
                .expect("set quota");
        }
    }
    new_year_event_def(&node, "tick", pb::OverlapPolicy::Allow).await;
    let mut bindings = Vec::new();
    for tenant in ["acme", "limited"] {
        let b = node
            .bindings()
            .create_binding(as_tenant(
                tenant,
                pb::CreateBindingRequest {
                    binding: Some(pb::Binding {
                        definition: "tick".into(),
                        ..Default::default()
                    }),
                },
            ))
            .await
            .expect("create binding")
            .into_inner();
        pause(&node, tenant, &b.id).await;
        // Three New Year's fires.
        let now = now_secs();
        let created = node
            .runs()
            .backfill_runs(as_tenant(
                tenant,
                pb::BackfillRunsRequest {
                    binding_id: b.id.clone(),
                    start_time: Some(prost_types::Timestamp {
                        seconds: now as i64 - 3 * 366 * 86_400,
                        nanos: 0,
                    }),
                    end_time: Some(prost_types::Timestamp {
                        seconds: now as i64 - 1,
                        nanos: 0,
                    }),
                    dry_run: false,
                },
            ))
            .await
            .expect("backfill")
            .into_inner();
        assert_eq!(created.run_ids.len(), 3, "{created:?}");
        bindings.push((tenant, b, created.run_ids));
    }
    claims_passed(&node, now_secs()).await;
    for (tenant, _, ids) in &bindings {
        for id in ids {
            let r = get_run(&node, tenant, id).await;
            assert_eq!(state(&r), pb::RunState::Queued, "held while paused: {r:?}");
        }
    }
    for (tenant, b, ids) in &bindings {
        resume(&node, tenant, &b.id).await;
        for id in ids {
            let r = wait_run(&node, tenant, id, "completes after resume", is_terminal).await;
            assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
        }
    }
    node.stop().await;
}

/// BackfillRuns completes the event runs that may start at once in its own
/// transaction (SUCCEEDED when the call returns, started and ended at their
/// creation, the whole history written and dense), and leaves to the claim
/// the ones that must wait: a tenant with a concurrency quota, a binding
/// whose overlap policy is not ALLOW, a disabled definition. Those complete
/// later, never started before they were created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfilled_event_runs_complete_in_the_call_unless_they_must_wait() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    node.admin()
        .set_tenant_quota(pb::SetTenantQuotaRequest {
            quota: Some(pb::TenantQuota {
                tenant_id: "limited".into(),
                max_concurrent_runs: Some(5),
                ..Default::default()
            }),
        })
        .await
        .expect("set quota");
    for (name, overlap) in [
        ("tick", pb::OverlapPolicy::Allow),
        ("tock", pb::OverlapPolicy::BufferOne),
        ("off", pb::OverlapPolicy::Allow),
    ] {
        new_year_event_def(&node, name, overlap).await;
    }
    // (tenant, definition, completed by the call itself)
    let cases = [
        ("acme", "tick", true),
        ("limited", "tick", false),
        ("acme", "tock", false),
        ("acme", "off", false),
    ];
    let mut created = Vec::new();
    for (tenant, def, inline) in cases {
        let b = bind_existing(&node, tenant, def).await;
        if def == "off" {
            node.definitions()
                .update_definition(pb::UpdateDefinitionRequest {
                    definition: Some(pb::TaskDefinition {
                        name: "off".into(),
                        enabled: Some(false),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["enabled".into()],
                    }),
                })
                .await
                .expect("disable definition");
        }
        let now = now_secs() as i64;
        let ids = node
            .runs()
            .backfill_runs(as_tenant(
                tenant,
                pb::BackfillRunsRequest {
                    binding_id: b.id.clone(),
                    start_time: Some(ts((now - 3 * 366 * 86_400) as f64)),
                    end_time: Some(ts((now - 1) as f64)),
                    dry_run: false,
                },
            ))
            .await
            .expect("backfill")
            .into_inner()
            .run_ids;
        assert_eq!(ids.len(), 3, "three New Year's fires");
        for id in &ids {
            let r = get_run(&node, tenant, id).await;
            if inline {
                assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
                assert_eq!(r.start_time, r.create_time, "{r:?}");
                assert_eq!(r.end_time, r.create_time, "{r:?}");
                assert_eq!(r.node_id, "n1", "{r:?}");
            } else if def == "off" {
                assert_eq!(state(&r), pb::RunState::Queued, "held: {r:?}");
            }
        }
        created.push((tenant, def, ids));
    }
    claims_passed(&node, now_secs()).await;
    for (tenant, def, ids) in &created {
        for id in ids {
            if *def == "off" {
                let r = get_run(&node, tenant, id).await;
                assert_eq!(state(&r), pb::RunState::Queued, "disabled: {r:?}");
                continue;
            }
            let r = wait_run(&node, tenant, id, "completes", is_terminal).await;
            assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
            // Claimed or not, no run starts before it was created (a
            // claim's clock may be read before its snapshot sees the run).
            assert!(
                secs(&r.start_time) >= secs(&r.create_time),
                "started before it was created: {r:?}"
            );
            let events = tail_all(&node, tenant, id, 0).await;
            assert_dense(&events);
            let kinds: Vec<&str> = events
                .iter()
                .map(|e| match &e.kind {
                    Some(pb::run_event::Kind::StateChanged(_)) => "state",
                    Some(pb::run_event::Kind::Fired(_)) => "fired",
                    _ => "other",
                })
                .collect();
            assert_eq!(kinds, ["state", "state", "fired", "state"], "{events:?}");
        }
    }
    node.stop().await;
}

/// A stop in flight when BackfillRuns checks whether its event runs may
/// start is ordered with it: here a pause has written the binding and holds
/// the stop locks (as PauseBinding does before its commit); the backfill
/// waits for it, then sees the binding paused and leaves its runs QUEUED,
/// to complete after ResumeBinding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_waits_for_a_pause_in_flight_and_then_holds_its_runs() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    new_year_event_def(&node, "tick", pb::OverlapPolicy::Allow).await;
    let b = bind_existing(&node, "acme", "tick").await;
    let pool = db.pool().await;
    let mut stop = pool.begin().await.expect("begin");
    sqlx::query("UPDATE bindings SET paused = true WHERE id = $1")
        .bind(b.id.parse::<uuid::Uuid>().expect("uuid"))
        .execute(&mut *stop)
        .await
        .expect("pause");
    let binding_id: uuid::Uuid = b.id.parse().expect("uuid");
    sked::db::runs::run_stop_lock(&mut stop, sked::db::runs::Stopped::Binding(binding_id))
        .await
        .expect("stop lock");
    sked::db::runs::run_claim_lock(&mut stop)
        .await
        .expect("claim locks");
    let now = now_secs() as i64;
    let mut runs = node.runs();
    let id = b.id.clone();
    let call = tokio::spawn(async move {
        runs.backfill_runs(as_tenant(
            "acme",
            pb::BackfillRunsRequest {
                binding_id: id,
                start_time: Some(ts((now - 3 * 366 * 86_400) as f64)),
                end_time: Some(ts((now - 1) as f64)),
                dry_run: false,
            },
        ))
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !call.is_finished(),
        "the backfill waits for the stop's commit"
    );
    stop.commit().await.expect("commit the pause");
    let ids = call
        .await
        .expect("join")
        .expect("backfill")
        .into_inner()
        .run_ids;
    assert_eq!(ids.len(), 3, "three New Year's fires");
    claims_passed(&node, now_secs()).await;
    for id in &ids {
        let r = get_run(&node, "acme", id).await;
        assert_eq!(state(&r), pb::RunState::Queued, "held by the pause: {r:?}");
    }
    resume(&node, "acme", &b.id).await;
    for id in &ids {
        let r = wait_run(&node, "acme", id, "completes after resume", is_terminal).await;
        assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
    }
    node.stop().await;
}

/// The other order, and isolation: while a start outside a claim holds its
/// binding's stop lock (as BackfillRuns does until its commit), pausing
/// that binding waits for it, and pausing another tenant's binding, or
/// claiming that tenant's runs, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_waits_only_for_the_starts_of_its_own_binding() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    new_year_event_def(&node, "tick", pb::OverlapPolicy::Allow).await;
    let busy = bind_existing(&node, "acme", "tick").await;
    let other = bind_existing(&node, "globex", "tick").await;
    let pool = db.pool().await;
    let mut start = pool.begin().await.expect("begin");
    sked::db::runs::run_stop_lock_shared(&mut start, busy.id.parse().expect("uuid"), "tick")
        .await
        .expect("shared stop locks");
    let mut bindings = node.bindings();
    let id = busy.id.clone();
    let paused = tokio::spawn(async move {
        bindings
            .pause_binding(as_tenant(
                "acme",
                pb::PauseBindingRequest {
                    binding_id: id,
                    ..Default::default()
                },
            ))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !paused.is_finished(),
        "the pause waits for the start's commit"
    );
    tokio::time::timeout(WAIT, pause(&node, "globex", &other.id))
        .await
        .expect("another binding's pause does not wait");
    resume(&node, "globex", &other.id).await;
    let run = trigger(&node, "globex", &other.id).await;
    let r = wait_run(
        &node,
        "globex",
        &run.id,
        "claimed and completed",
        is_terminal,
    )
    .await;
    assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
    assert!(!paused.is_finished(), "still waiting");
    start.commit().await.expect("commit");
    tokio::time::timeout(WAIT, paused)
        .await
        .expect("the pause ends after the commit")
        .expect("join")
        .expect("pause binding");
    assert!(get_binding(&node, "acme", &busy.id).await.paused);
    node.stop().await;
}

/// Disabling a definition waits, like a pause, for the starts outside a
/// claim that hold the stop lock of one of its bindings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_definition_waits_for_the_starts_of_its_runs() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    new_year_event_def(&node, "tick", pb::OverlapPolicy::Allow).await;
    let b = bind_existing(&node, "acme", "tick").await;
    let pool = db.pool().await;
    let mut start = pool.begin().await.expect("begin");
    sked::db::runs::run_stop_lock_shared(&mut start, b.id.parse().expect("uuid"), "tick")
        .await
        .expect("shared stop locks");
    let mut definitions = node.definitions();
    let disabled = tokio::spawn(async move {
        definitions
            .update_definition(pb::UpdateDefinitionRequest {
                definition: Some(pb::TaskDefinition {
                    name: "tick".into(),
                    enabled: Some(false),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !disabled.is_finished(),
        "the disable waits for the start's commit"
    );
    start.commit().await.expect("commit");
    let d = tokio::time::timeout(WAIT, disabled)
        .await
        .expect("the disable ends after the commit")
        .expect("join")
        .expect("update definition")
        .into_inner();
    assert_eq!(d.enabled, Some(false));
    node.stop().await;
}

/// A small deterministic generator (xorshift64*), so a failing case can be
/// replayed from its seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One queued run of a generated queue.
#[derive(Debug, Clone)]
struct Queued {
    id: uuid::Uuid,
    tenant: String,
    priority: i32,
    not_before: chrono::DateTime<chrono::Utc>,
}

/// What a claim of `limit` takes from `runs` when it reads every run: each
/// tenant's runs ranked by (priority desc, not_before, id); then priority
/// first, rank, not_before, id (no tenant served before).
fn fair_pick(runs: &[Queued], limit: usize) -> std::collections::BTreeSet<uuid::Uuid> {
    let mut by_tenant: std::collections::BTreeMap<&str, Vec<&Queued>> = Default::default();
    for r in runs {
        by_tenant.entry(r.tenant.as_str()).or_default().push(r);
    }
    let mut ranked = Vec::new();
    for rs in by_tenant.values_mut() {
        rs.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.not_before.cmp(&b.not_before))
                .then(a.id.cmp(&b.id))
        });
        for (i, r) in rs.iter().enumerate() {
            ranked.push((i + 1, *r));
        }
    }
    ranked.sort_by(|(ta, a), (tb, b)| {
        b.priority
            .cmp(&a.priority)
            .then(ta.cmp(tb))
            .then(a.not_before.cmp(&b.not_before))
            .then(a.id.cmp(&b.id))
    });
    ranked.into_iter().take(limit).map(|(_, r)| r.id).collect()
}

/// A claim reads only about `limit / tenants` + 1 runs of each tenant
/// first, and reads on a tenant whose last read run it picked: generated
/// queues (1-8 tenants, backlogs of 0-60, mixed priorities, equal
/// not_before times among them) are claimed exactly as a read of every run
/// would pick them.
#[tokio::test]
async fn a_worker_claim_takes_what_a_read_of_every_queued_run_ranks_first() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    sked::db::migrate(&pool).await.expect("migrate");
    let now = chrono::Utc::now();
    sqlx::query(
        "INSERT INTO definitions (name, handler, schedule, create_time, update_time)
         VALUES ('gen', '{\"kind\": \"worker\", \"queue\": \"gen\"}', '{\"manual\": {}}', $1, $1)",
    )
    .bind(now)
    .execute(&pool)
    .await
    .expect("definition");
    let mut bindings = Vec::new();
    for t in 0..8 {
        let id = uuid::Uuid::new_v4();
        sqlx::query(
            "INSERT INTO bindings (id, tenant_id, definition, effective_schedule, create_time, update_time)
             VALUES ($1, $2, 'gen', '{\"manual\": {}}', $3, $3)",
        )
        .bind(id)
        .bind(format!("t{t}"))
        .bind(now)
        .execute(&pool)
        .await
        .expect("binding");
        bindings.push(id);
    }
    let clock = Clock::system();
    let mut fallbacks_possible = 0;
    for seed in 1..=40u64 {
        let mut g = Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        sqlx::query("DELETE FROM runs")
            .execute(&pool)
            .await
            .expect("clear runs");
        sqlx::query("DELETE FROM tenant_claims")
            .execute(&pool)
            .await
            .expect("clear turns");
        let tenants = 1 + g.below(8) as usize;
        let mut runs = Vec::new();
        for (t, binding) in bindings.iter().enumerate().take(tenants) {
            let backlog = match g.below(4) {
                0 => g.below(3),
                _ => g.below(61),
            };
            let high = g.below(3) == 0;
            for _ in 0..backlog {
                let r = Queued {
                    id: uuid::Uuid::new_v4(),
                    tenant: format!("t{t}"),
                    priority: if high && g.below(2) == 0 { 5 } else { 0 },
                    // Whole seconds of the last minute: many equal times.
                    not_before: now - chrono::Duration::seconds(1 + g.below(60) as i64),
                };
                sqlx::query(
                    "INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time,
                                       create_time, handler, params, not_before, priority, last_seq)
                     VALUES ($1, $2, $3, 'gen', 'MANUAL', 'QUEUED', $4, $4,
                             '{\"kind\": \"worker\", \"queue\": \"gen\"}', '{}', $4, $5, 1)",
                )
                .bind(r.id)
                .bind(&r.tenant)
                .bind(binding)
                .bind(r.not_before)
                .bind(r.priority)
                .execute(&pool)
                .await
                .expect("run");
                runs.push(r);
            }
        }
        let limit = 1 + g.below(120) as usize;
        let want = fair_pick(&runs, limit);
        let per_tenant = limit.div_ceil(tenants) + 1;
        if want.len() == limit && per_tenant < limit {
            fallbacks_possible += 1;
        }
        let mut conn = pool.acquire().await.expect("connection");
        let claimed = sked::db::runs::run_claim(
            &mut conn,
            "gen-node",
            &clock,
            chrono::Duration::seconds(30),
            limit as i64,
            sked::db::runs::ClaimKind::Worker {
                queue: "gen".into(),
                tenant: None,
                worker_names: vec!["w".into(); limit],
            },
            &[],
        )
        .await
        .expect("claim");
        let got: std::collections::BTreeSet<uuid::Uuid> =
            claimed.iter().map(|c| c.run.id).collect();
        assert_eq!(
            got,
            want,
            "seed {seed}: {tenants} tenants, limit {limit}, {} runs queued",
            runs.len()
        );
    }
    assert!(
        fallbacks_possible >= 10,
        "the cases exercise a shallow first read: {fallbacks_possible}"
    );
}
