//! Per-tenant rates on a node (`--tenant-changes-per-sec`,
//! `--tenant-api-runs-per-sec`): past its own rate a tenant's call is
//! `RESOURCE_EXHAUSTED` with a `RetryInfo` and changes nothing, while other
//! tenants' calls on the same node pass; reads are never counted.

use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

/// A node with the given rates and auth off (callers name their tenant).
async fn node_with(db: &TestDb, name: &str, changes: u32, runs: u32) -> TestNode {
    let mut s = settings(db, name);
    s.tenant_changes_per_sec = changes;
    s.tenant_api_runs_per_sec = runs;
    TestNode::start_with(s).await
}

fn retry_delay(e: &tonic::Status) -> Option<Duration> {
    e.get_details_retry_info().and_then(|r| r.retry_delay)
}

#[tokio::test]
async fn a_tenant_past_its_rate_of_changes_is_refused_and_others_are_not() {
    let db = TestDb::new().await;
    // 2 changes/s: a burst of 10 passes, then about 2 per second.
    let node = node_with(&db, "rates-changes", 2, 0).await;
    let def = sh_def("rated", "true", manual());
    create_definition(&node, def).await.expect("definition");
    let hog = bind_existing(&node, "hog", "rated").await;
    let calm = bind_existing(&node, "calm", "rated").await;

    let mut refused = None;
    let mut passed = 0;
    for i in 0..40 {
        let r = node
            .bindings()
            .pause_binding(as_tenant(
                "hog",
                pb::PauseBindingRequest {
                    binding_id: hog.id.clone(),
                    note: format!("pause {i}"),
                    expire_time: None,
                },
            ))
            .await;
        match r {
            Ok(_) => passed += 1,
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, e) = refused.expect("40 changes in a burst: some refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains("changes per second"),
        "{}",
        e.message()
    );
    let delay = retry_delay(&e).expect("a RetryInfo with a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "retry delay {delay:?}"
    );
    assert!(passed >= 9, "the burst passed only {passed} changes");
    // The refused call changed nothing: the note is the last accepted one.
    let b = node
        .bindings()
        .get_binding(as_tenant(
            "hog",
            pb::GetBindingRequest {
                binding_id: hog.id.clone(),
            },
        ))
        .await
        .expect("reads are not counted")
        .into_inner();
    assert_eq!(b.pause_note, format!("pause {}", at - 1));
    // Another tenant's changes pass meanwhile.
    for _ in 0..5 {
        node.bindings()
            .pause_binding(as_tenant(
                "calm",
                pb::PauseBindingRequest {
                    binding_id: calm.id.clone(),
                    note: "calm".into(),
                    expire_time: None,
                },
            ))
            .await
            .expect("another tenant's change");
    }
    // And the hog's pass again once it waited.
    tokio::time::sleep(delay + Duration::from_millis(50)).await;
    resume(&node, "hog", &hog.id).await;
    node.stop().await;
}

#[tokio::test]
async fn runs_created_through_the_api_are_counted_per_tenant() {
    let db = TestDb::new().await;
    // 1 run/s: the bucket holds one largest backfill (10 000 runs).
    let node = node_with(&db, "rates-runs", 0, 1).await;
    let def = pb::TaskDefinition {
        name: "ticks".into(),
        handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
        schedule: Some(every(1)),
        ..Default::default()
    };
    create_definition(&node, def).await.expect("definition");
    let hog = bind_existing(&node, "hog", "ticks").await;
    let calm = bind_existing(&node, "calm", "ticks").await;
    let now = now_secs().floor();
    let backfill = |tenant: &str, id: &str, from: f64, to: f64, dry_run: bool| {
        let mut runs = node.runs();
        let req = as_tenant(
            tenant,
            pb::BackfillRunsRequest {
                binding_id: id.to_string(),
                start_time: Some(ts(from)),
                end_time: Some(ts(to)),
                dry_run,
            },
        );
        async move { runs.backfill_runs(req).await }
    };
    let full = backfill("hog", &hog.id, now - 20_000.0, now - 10_000.0, false)
        .await
        .expect("one largest backfill fits the bucket")
        .into_inner();
    assert_eq!(full.run_ids.len(), 10_000);
    // A dry run creates nothing and costs nothing.
    backfill("hog", &hog.id, now - 30_000.0, now - 29_000.0, true)
        .await
        .expect("a dry run is not counted");
    let e = backfill("hog", &hog.id, now - 25_000.0, now - 24_900.0, false)
        .await
        .expect_err("the bucket is empty");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("runs per second"), "{}", e.message());
    assert!(retry_delay(&e).is_some(), "a RetryInfo");
    // Triggers cost a run each: with the bucket refilling at 1 run/s, a
    // quick series of them is refused within a few.
    let mut refused = None;
    for _ in 0..10 {
        if let Err(e) = node
            .runs()
            .trigger_run(as_tenant(
                "hog",
                pb::TriggerRunRequest {
                    binding_id: hog.id.clone(),
                    ..Default::default()
                },
            ))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a trigger costs a run too");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    // The refused calls created nothing in the refused range.
    let pool = db.pool().await;
    let (in_refused,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM runs WHERE tenant_id = 'hog'
           AND scheduled_time >= to_timestamp($1) AND scheduled_time < to_timestamp($2)",
    )
    .bind(now - 25_000.0)
    .bind(now - 24_900.0)
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(in_refused, 0);
    // Another tenant has its own bucket.
    let other = backfill("calm", &calm.id, now - 5_000.0, now - 4_000.0, false)
        .await
        .expect("another tenant's backfill")
        .into_inner();
    assert_eq!(other.run_ids.len(), 1_000);
    node.stop().await;
}
