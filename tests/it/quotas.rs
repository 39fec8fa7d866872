//! Tenant quotas and fair share through the API (AdminService quotas,
//! SPEC §1): max_concurrent_runs holds a tenant's excess runs QUEUED,
//! max_runs_per_hour skips scheduled fires with reason "quota" and refuses
//! triggers, max_bindings refuses the next binding, GetQuotaUsage reports it
//! all, and the claim order serves a small tenant before a big backlog and a
//! high priority before both. A tenant holds at most its share of a node's
//! slots (`max_concurrent_runs` minus a quarter), and uses all of it.
//!
//! These nodes run with auth off (every caller a platform admin naming its
//! tenant with x-tenant-id), so SetTenantQuota needs no key.

use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;

fn health(u: &pb::QuotaUsage) -> pb::QuotaHealth {
    pb::QuotaHealth::try_from(u.health).unwrap()
}

fn quota_skipped(runs: &[pb::Run]) -> usize {
    runs.iter()
        .filter(|r| state(r) == pb::RunState::Skipped && r.reason == "quota")
        .count()
}

/// `def` with overlap policy ALLOW: several runs of one binding may run at
/// once, so only quotas and slots limit them.
fn allow(mut def: pb::TaskDefinition) -> pb::TaskDefinition {
    def.overlap_policy = pb::OverlapPolicy::Allow as i32;
    def
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

/// Most intervals running at one instant (the maximum is reached at some
/// start; an interval ending exactly when another starts does not overlap it).
fn max_running(iv: &[(f64, f64)]) -> usize {
    iv.iter()
        .map(|(start, _)| iv.iter().filter(|(s, e)| s <= start && start < e).count())
        .max()
        .unwrap_or(0)
}

async fn set_quota(
    node: &TestNode,
    quota: pb::TenantQuota,
) -> Result<pb::TenantQuota, tonic::Status> {
    node.admin()
        .set_tenant_quota(pb::SetTenantQuotaRequest { quota: Some(quota) })
        .await
        .map(|r| r.into_inner())
}

async fn get_quota(node: &TestNode, tenant: &str) -> pb::TenantQuota {
    node.admin()
        .get_tenant_quota(pb::GetTenantQuotaRequest {
            tenant_id: tenant.into(),
        })
        .await
        .expect("get tenant quota")
        .into_inner()
}

async fn usage(node: &TestNode, tenant: &str) -> pb::QuotaUsage {
    node.admin()
        .get_quota_usage(pb::GetQuotaUsageRequest {
            tenant_id: tenant.into(),
        })
        .await
        .expect("get quota usage")
        .into_inner()
}

/// Polls the run until it is RUNNING.
async fn wait_running(node: &TestNode, tenant: &str, id: &str) -> pb::Run {
    tokio::time::timeout(WAIT, async {
        loop {
            let r = get_run(node, tenant, id).await;
            assert!(
                !is_terminal(&r),
                "run ended before it was seen RUNNING: {r:?}"
            );
            if state(&r) == pb::RunState::Running {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the run starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_runs_caps_a_tenant_and_all_runs_finish() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let set = set_quota(
        &node,
        pb::TenantQuota {
            tenant_id: "acme".into(),
            max_concurrent_runs: Some(2),
            ..Default::default()
        },
    )
    .await
    .expect("set quota");
    assert_eq!(set.max_concurrent_runs, Some(2));
    assert_eq!(set.max_runs_per_hour, None);
    assert_eq!(get_quota(&node, "acme").await, set);

    let capped = define_and_bind(&node, "acme", allow(sh_def("capped", "sleep 1", manual()))).await;
    // Another tenant, without a quota, at the same time.
    let unlimited =
        define_and_bind(&node, "free", allow(sh_def("free", "sleep 1", manual()))).await;
    for _ in 0..10 {
        trigger(&node, "acme", &capped.id).await;
    }
    for _ in 0..4 {
        trigger(&node, "free", &unlimited.id).await;
    }

    // Watch the usage while the runs go through: never more than 2 running,
    // and at some point THROTTLED with runs held back.
    let mut saw_throttled = false;
    let mut seen = Vec::new();
    let (acme, free) = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let u = usage(&node, "acme").await;
            assert!(u.running_runs <= 2, "acme runs more than its quota: {u:?}");
            assert!(u.throttled_runs <= u.queued_runs, "{u:?}");
            if health(&u) == pb::QuotaHealth::Throttled && u.throttled_runs > 0 {
                saw_throttled = true;
            }
            seen.push((u.running_runs, u.queued_runs, u.throttled_runs, u.health));
            let acme = runs_of(&node, "acme", &capped.id).await;
            let free = runs_of(&node, "free", &unlimited.id).await;
            if acme.len() == 10 && free.len() == 4 && acme.iter().chain(&free).all(is_terminal) {
                return (acme, free);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("within 40 s every run ends");
    assert!(
        saw_throttled,
        "GetQuotaUsage reported THROTTLED with throttled_runs > 0 while 8 runs waited; \
         (running, queued, throttled, health) seen: {seen:?}"
    );

    for r in acme.iter().chain(&free) {
        assert_eq!(state(r), pb::RunState::Succeeded, "{r:?}");
    }
    let iv = intervals(&acme);
    assert_eq!(iv.len(), 10);
    assert_eq!(
        max_running(&iv),
        2,
        "acme ran exactly 2 at once at most (and reached 2): {iv:?}"
    );
    // The excess really waited: 10 runs of 1 s, two at a time, take >= 5 s.
    let span = iv.iter().map(|x| x.1).fold(f64::MIN, f64::max) - iv[0].0;
    assert!(
        span >= 4.9,
        "10 x 1 s runs two at a time took {span:.2} s: {iv:?}"
    );

    let free_iv = intervals(&free);
    assert!(
        max_running(&free_iv) >= 3,
        "a tenant without a quota is not limited by acme's: {free_iv:?}"
    );

    let u = usage(&node, "acme").await;
    assert_eq!(u.tenant_id, "acme");
    assert_eq!(
        u.quota.as_ref().and_then(|q| q.max_concurrent_runs),
        Some(2)
    );
    assert_eq!(u.running_runs, 0, "{u:?}");
    assert_eq!(u.queued_runs, 0, "{u:?}");
    assert_eq!(u.throttled_runs, 0, "{u:?}");
    assert_eq!(u.runs_last_hour, 10, "{u:?}");
    assert!(
        (1..=10).contains(&u.throttled_last_hour),
        "the runs that waited for a slot are counted (8 expected): {u:?}"
    );
    assert_eq!(u.skipped_last_hour, 0, "{u:?}");
    assert_eq!(u.bindings, 1, "{u:?}");
    assert_eq!(
        health(&u),
        pb::QuotaHealth::Ok,
        "nothing is held back any more: {u:?}"
    );

    let f = usage(&node, "free").await;
    assert_eq!(
        f.quota,
        Some(pb::TenantQuota {
            tenant_id: "free".into(),
            ..Default::default()
        })
    );
    assert_eq!(f.runs_last_hour, 4, "{f:?}");
    assert_eq!(f.throttled_last_hour, 0, "{f:?}");
    assert_eq!(health(&f), pb::QuotaHealth::Ok, "{f:?}");
    node.stop().await;
}

/// A node keeps a quarter of its slots for other tenants (4 → one tenant
/// holds at most 3), but a tenant alone on the node still uses its whole
/// share at once, and its excess runs wait and all finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_alone_on_a_node_runs_up_to_its_share_of_the_slots() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "n1");
    s.max_concurrent_runs = 4;
    let node = TestNode::start_with(s).await;
    let b = define_and_bind(&node, "acme", allow(sh_def("par", "sleep 3", manual()))).await;
    for _ in 0..6 {
        trigger(&node, "acme", &b.id).await;
    }
    let runs = runs_until(
        &node,
        "acme",
        &b.id,
        Duration::from_secs(60),
        "all 6 runs end",
        |rs| rs.len() == 6 && rs.iter().all(is_terminal),
    )
    .await;
    for r in &runs {
        assert_eq!(state(r), pb::RunState::Succeeded, "{r:?}");
    }
    let iv = intervals(&runs);
    assert_eq!(iv.len(), 6);
    assert_eq!(
        max_running(&iv),
        3,
        "one tenant ran exactly its share (3 of 4 slots) at once at most, and reached it: {iv:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hourly_budget_skips_scheduled_fires_with_reason_quota_and_refuses_triggers() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    set_quota(
        &node,
        pb::TenantQuota {
            tenant_id: "acme".into(),
            max_runs_per_hour: Some(3),
            ..Default::default()
        },
    )
    .await
    .expect("set quota");
    // ALLOW, so no fire is ever skipped for overlap: every skip is the quota's.
    let b = define_and_bind(&node, "acme", allow(sh_def("hourly", "true", every(1)))).await;
    let runs = runs_until(
        &node,
        "acme",
        &b.id,
        Duration::from_secs(30),
        "six fires, the ones in the budget finished",
        |runs| {
            runs.len() >= 6
                && runs
                    .iter()
                    .filter(|r| state(r) != pb::RunState::Skipped)
                    .all(|r| state(r) == pb::RunState::Succeeded)
        },
    )
    .await;
    for r in &runs {
        assert_eq!(r.trigger, pb::RunTrigger::Schedule as i32, "{r:?}");
        assert_eq!(r.attempt, 1, "{r:?}");
    }
    let ran: Vec<&pb::Run> = runs
        .iter()
        .filter(|r| state(r) != pb::RunState::Skipped)
        .collect();
    assert_eq!(ran.len(), 3, "exactly the budget ran: {runs:#?}");
    // runs_of sorts by fire time: the budget went to the earliest fires.
    for r in &runs[..3] {
        assert_eq!(state(r), pb::RunState::Succeeded, "{r:?}");
    }
    for r in &runs[3..] {
        assert_eq!(state(r), pb::RunState::Skipped, "{r:?}");
        assert_eq!(r.reason, "quota", "{r:?}");
        assert!(r.start_time.is_none(), "a skipped fire never ran: {r:?}");
    }

    // Manual triggers and backfills past the budget are refused, and write
    // nothing.
    let err = node
        .runs()
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("TriggerRun past the hourly budget");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let end = now_secs() - 1.0;
    let err = node
        .runs()
        .backfill_runs(as_tenant(
            "acme",
            pb::BackfillRunsRequest {
                binding_id: b.id.clone(),
                start_time: Some(ts(end - 5.0)),
                end_time: Some(ts(end)),
                dry_run: false,
            },
        ))
        .await
        .expect_err("BackfillRuns past the hourly budget");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let before = runs_of(&node, "acme", &b.id).await;
    let u = usage(&node, "acme").await;
    let after = runs_of(&node, "acme", &b.id).await;
    assert!(
        after
            .iter()
            .all(|r| r.trigger == pb::RunTrigger::Schedule as i32),
        "the refused calls created no run: {after:#?}"
    );
    assert_eq!(
        after
            .iter()
            .filter(|r| state(r) != pb::RunState::Skipped)
            .count(),
        3,
        "still only the budget ran: {after:#?}"
    );
    assert_eq!(u.quota.as_ref().and_then(|q| q.max_runs_per_hour), Some(3));
    assert_eq!(u.runs_last_hour, 3, "{u:?}");
    let (lo, hi) = (quota_skipped(&before) as i64, quota_skipped(&after) as i64);
    assert!(
        lo >= 3 && (lo..=hi).contains(&u.skipped_last_hour),
        "skipped_last_hour counts the quota-skipped fires ({lo}..={hi}): {u:?}"
    );
    assert_eq!(health(&u), pb::QuotaHealth::Throttled, "{u:?}");

    // A bigger budget lets the next fires run again.
    set_quota(
        &node,
        pb::TenantQuota {
            tenant_id: "acme".into(),
            max_runs_per_hour: Some(100),
            ..Default::default()
        },
    )
    .await
    .expect("raise quota");
    let raised = now_secs();
    let runs = runs_until(
        &node,
        "acme",
        &b.id,
        Duration::from_secs(15),
        "a fire after the raise succeeds",
        |runs| {
            runs.iter()
                .any(|r| secs(&r.scheduled_time) > raised && state(r) == pb::RunState::Succeeded)
        },
    )
    .await;
    for r in runs.iter().filter(|r| secs(&r.scheduled_time) > raised) {
        assert_ne!(
            state(r),
            pb::RunState::Skipped,
            "fired after the raise: {r:?}"
        );
    }
    let u = usage(&node, "acme").await;
    assert!(u.runs_last_hour >= 4, "{u:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bindings_refuses_the_next_binding_and_writes_nothing() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    set_quota(
        &node,
        pb::TenantQuota {
            tenant_id: "acme".into(),
            max_bindings: Some(1),
            ..Default::default()
        },
    )
    .await
    .expect("set quota");
    let first = define_and_bind(&node, "acme", sh_def("first", "true", manual())).await;
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(sh_def("second", "true", manual())),
        })
        .await
        .expect("create definition");
    let create_second = || async {
        node.bindings()
            .create_binding(as_tenant(
                "acme",
                pb::CreateBindingRequest {
                    binding: Some(pb::Binding {
                        definition: "second".into(),
                        ..Default::default()
                    }),
                },
            ))
            .await
    };
    let err = create_second()
        .await
        .expect_err("a second binding past max_bindings");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let list = node
        .bindings()
        .list_bindings(as_tenant("acme", pb::ListBindingsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list.bindings.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        ids,
        [first.id.as_str()],
        "the refused binding was not stored"
    );
    let audit = node
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "acme".into(),
            method: "CreateBinding".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        audit.events.len(),
        1,
        "only the created binding is audited: {:#?}",
        audit.events
    );

    let u = usage(&node, "acme").await;
    assert_eq!(u.bindings, 1, "{u:?}");
    assert_eq!(
        health(&u),
        pb::QuotaHealth::NearLimit,
        "1 of 1 bindings is at the limit: {u:?}"
    );

    // Limits of 0 and below are refused, naming the field; the quota stays.
    for bad in [0, -1] {
        let err = set_quota(
            &node,
            pb::TenantQuota {
                tenant_id: "acme".into(),
                max_bindings: Some(bad),
                ..Default::default()
            },
        )
        .await
        .expect_err("max_bindings out of range");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert_eq!(
            violation_fields(&err),
            ["quota.max_bindings"],
            "{bad}: {err:?}"
        );
    }
    let q = get_quota(&node, "acme").await;
    assert_eq!(q.max_bindings, Some(1), "{q:?}");

    // Raising it lets the second binding in.
    set_quota(
        &node,
        pb::TenantQuota {
            tenant_id: "acme".into(),
            max_bindings: Some(2),
            ..Default::default()
        },
    )
    .await
    .expect("raise quota");
    create_second()
        .await
        .expect("second binding within the raised quota");
    assert_eq!(usage(&node, "acme").await.bindings, 2);
    node.stop().await;
}

/// Single-slot node with the slot held by tenant "c" running `sleep 3`;
/// returns the node and the blocker run (RUNNING).
async fn blocked_node(db: &TestDb) -> (TestNode, pb::Binding) {
    let mut s = settings(db, "n1");
    s.max_concurrent_runs = 1;
    let node = TestNode::start_with(s).await;
    let blocker = define_and_bind(&node, "c", sh_def("blocker", "sleep 3", manual())).await;
    (node, blocker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_share_starts_a_small_tenant_within_the_first_claims() {
    let db = TestDb::new().await;
    let (node, blocker) = blocked_node(&db).await;
    // Tenant a: a big backlog. Paused, so only its backfilled runs exist.
    let big = define_and_bind(&node, "a", allow(sh_def("big", "true", every(1)))).await;
    pause(&node, "a", &big.id).await;
    // Tenant b: two runs.
    let small = define_and_bind(&node, "b", allow(sh_def("small", "true", manual()))).await;

    let blocker_run = trigger(&node, "c", &blocker.id).await;
    let blocker_run = wait_running(&node, "c", &blocker_run.id).await;
    let end = now_secs() - 0.5;
    let backfill = node
        .runs()
        .backfill_runs(as_tenant(
            "a",
            pb::BackfillRunsRequest {
                binding_id: big.id.clone(),
                start_time: Some(ts(end - 200.0)),
                end_time: Some(ts(end)),
                dry_run: false,
            },
        ))
        .await
        .expect("backfill")
        .into_inner();
    assert!(backfill.run_ids.len() >= 199, "{}", backfill.run_ids.len());
    for _ in 0..2 {
        trigger(&node, "b", &small.id).await;
    }

    let b_runs = runs_until(
        &node,
        "b",
        &small.id,
        Duration::from_secs(30),
        "b's two runs succeed",
        |runs| runs.len() == 2 && runs.iter().all(|r| state(r) == pb::RunState::Succeeded),
    )
    .await;
    let blocker_run = get_run(&node, "c", &blocker_run.id).await;
    assert_eq!(
        state(&blocker_run),
        pb::RunState::Succeeded,
        "{blocker_run:?}"
    );
    let a_runs = runs_of(&node, "a", &big.id).await;
    let blocker_end = secs(&blocker_run.end_time);
    for r in a_runs.iter().chain(&b_runs) {
        assert!(
            secs(&r.create_time) < blocker_end,
            "test setup: every run was queued while the blocker held the slot: {r:?}"
        );
    }

    // Claim order after the blocker, by start time.
    let blocker_start = secs(&blocker_run.start_time);
    let mut order: Vec<(f64, &str)> = a_runs
        .iter()
        .chain(&b_runs)
        .filter(|r| r.start_time.is_some() && secs(&r.start_time) > blocker_start)
        .map(|r| (secs(&r.start_time), r.tenant_id.as_str()))
        .collect();
    order.sort_by(|x, y| x.0.total_cmp(&y.0));
    let b_positions: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, (_, t))| *t == "b")
        .map(|(i, _)| i)
        .collect();
    let head: Vec<&str> = order.iter().take(6).map(|(_, t)| *t).collect();
    assert_eq!(b_positions.len(), 2, "{order:?}");
    assert!(
        b_positions.iter().all(|&i| i < 4),
        "b's runs are among the first 4 claims after the blocker, not behind a's \
         {} older runs; first claims: {head:?}",
        a_runs.len()
    );
    // It was a real contest: most of a's backlog was still waiting.
    let b_last = b_runs
        .iter()
        .map(|r| secs(&r.start_time))
        .fold(f64::MIN, f64::max);
    let a_later = a_runs
        .iter()
        .filter(|r| r.start_time.is_none() || secs(&r.start_time) > b_last)
        .count();
    assert!(
        a_later >= 150,
        "only {a_later} of a's {} runs started after b's",
        a_runs.len()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_run_is_claimed_before_other_tenants_runs() {
    let db = TestDb::new().await;
    let (node, blocker) = blocked_node(&db).await;
    let low_a = define_and_bind(&node, "a", allow(sh_def("low-a", "true", manual()))).await;
    let low_b = define_and_bind(&node, "b", allow(sh_def("low-b", "true", manual()))).await;
    let mut def = allow(sh_def("urgent", "true", manual()));
    def.priority = 10;
    let urgent = define_and_bind(&node, "p", def).await;

    let blocker_run = trigger(&node, "c", &blocker.id).await;
    wait_running(&node, "c", &blocker_run.id).await;
    let mut low = Vec::new();
    for _ in 0..3 {
        low.push(("a", trigger(&node, "a", &low_a.id).await.id));
        low.push(("b", trigger(&node, "b", &low_b.id).await.id));
    }
    // Queued last, and by a tenant never served before.
    let urgent_run = trigger(&node, "p", &urgent.id).await;

    let urgent_run = wait_terminal(&node, "p", &urgent_run.id).await;
    let blocker_run = get_run(&node, "c", &blocker_run.id).await;
    assert_eq!(
        state(&urgent_run),
        pb::RunState::Succeeded,
        "{urgent_run:?}"
    );
    assert!(
        secs(&urgent_run.create_time) < secs(&blocker_run.end_time),
        "test setup: the urgent run was queued while the blocker held the slot"
    );
    for (tenant, id) in &low {
        let r = wait_terminal(&node, tenant, id).await;
        assert_eq!(state(&r), pb::RunState::Succeeded, "{r:?}");
        assert!(
            secs(&r.start_time) > secs(&urgent_run.start_time),
            "the priority-10 run starts before every priority-0 run: {r:?} vs {urgent_run:?}"
        );
    }
    node.stop().await;
}

/// The hourly budget counts the runs created in the hour before `now` by
/// run id (UUIDv7, on `runs_tenant_id`) and then by `create_time` exactly:
/// runs of earlier hours are not read however many the tenant has, and
/// the count and GetQuotaUsage's `runs_last_hour` stay exact. `runs` keeps
/// no index on `create_time` (every write of a run paid for its entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hourly_budget_reads_only_the_runs_of_its_hour() {
    const RUNS: usize = 1500;
    const MAX: u32 = 1_000_000;
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    // Worker runs no worker takes: they stay QUEUED, created now.
    let def = pb::TaskDefinition {
        name: "queued".into(),
        handler: Some(pb::task_definition::Handler::Worker(pb::WorkerHandler {
            queue: "nobody".into(),
            schedule_to_start_timeout: Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            }),
        })),
        schedule: Some(every(1)),
        overlap_policy: pb::OverlapPolicy::Allow as i32,
        ..Default::default()
    };
    let b = define_and_bind(&node, "acme", def).await;
    pause(&node, "acme", &b.id).await;
    let end = now_secs() - 61.0;
    let created = node
        .runs()
        .backfill_runs(as_tenant(
            "acme",
            pb::BackfillRunsRequest {
                binding_id: b.id.clone(),
                start_time: Some(ts(end - RUNS as f64)),
                end_time: Some(ts(end)),
                dry_run: false,
            },
        ))
        .await
        .expect("backfill")
        .into_inner()
        .run_ids
        .len();
    assert!(created >= RUNS, "{created}");
    set_quota(
        &node,
        pb::TenantQuota {
            tenant_id: "acme".into(),
            max_runs_per_hour: Some(MAX as i32),
            ..Default::default()
        },
    )
    .await
    .expect("set quota");

    let pool = db.pool().await;
    let mut conn = pool.acquire().await.expect("connection");
    use sqlx::Connection as _;
    let mut tx = conn.begin().await.expect("begin");
    sked::db::generic_plans(&mut tx)
        .await
        .expect("generic plans");
    let tenants = ["acme".to_string()];
    let now = chrono::Utc::now();
    let left = |m: std::collections::HashMap<String, u64>| m["acme"];
    // The backfilled runs, and any fire of the binding before its pause.
    let counted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE tenant_id = 'acme' AND attempt = 1 AND state <> 'SKIPPED'",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("count");
    assert!(counted >= created as i64, "{counted} < {created}");

    // Three hours on: none of the runs is in the hour, and none is read.
    let before = runs_tuples_read(&mut tx).await;
    let later = sked::db::tenancy::quota_hourly_remaining(
        &mut tx,
        &tenants,
        now + chrono::Duration::hours(3),
    )
    .await
    .expect("budget");
    let read = runs_tuples_read(&mut tx).await - before;
    assert_eq!(left(later), u64::from(MAX));
    assert!(
        read < 100,
        "counting an empty hour read {read} of the tenant's {created} older runs"
    );

    // Now every run is in the hour, counted exactly; 59 minutes on they
    // still count; 61 minutes on, none does.
    let all = u64::from(MAX) - counted as u64;
    for (minutes, want) in [(0, all), (59, all), (61, u64::from(MAX))] {
        let at = now + chrono::Duration::minutes(minutes);
        let got = sked::db::tenancy::quota_hourly_remaining(&mut tx, &tenants, at)
            .await
            .expect("budget");
        assert_eq!(left(got), want, "{minutes} minutes on");
    }
    tx.commit().await.expect("commit");

    let u = usage(&node, "acme").await;
    assert_eq!(u.runs_last_hour, counted, "{u:?}");
    node.stop().await;
}
