//! Fires prepared ahead of their instant (`docs/architecture.md`, "Firing
//! ahead"): a run is never seen before its fire time, a change made while a
//! fire is prepared applies after that fire, and across nodes every fire
//! time still runs exactly once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;

/// An `event` definition firing every second from `anchor` (unix seconds;
/// `None`: from its creation).
fn ticker(name: &str, anchor: Option<i64>) -> pb::TaskDefinition {
    let mut schedule = every(1);
    if let (Some(pb::schedule::Kind::Interval(i)), Some(a)) = (&mut schedule.kind, anchor) {
        i.anchor_time = Some(prost_types::Timestamp {
            seconds: a,
            nanos: 0,
        });
    }
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
        schedule: Some(schedule),
        ..Default::default()
    }
}

/// Collects `(run id, arrival time)` of the `fired` events `tenant`'s
/// WatchEvents subscription on `node` receives, until `stop`.
async fn watch_fired(
    node: &TestNode,
    tenant: &str,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<(String, f64)>> {
    let mut stream = node
        .logs()
        .watch_events(as_tenant(
            tenant,
            pb::WatchEventsRequest {
                kinds: vec![pb::EventKind::Fired as i32],
                ..Default::default()
            },
        ))
        .await
        .expect("watch events")
        .into_inner();
    tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(m)) => {
                        let at = now_secs();
                        assert_eq!(m.missed_events, 0, "the subscriber keeps up");
                        if let Some(e) = m.event {
                            got.push((e.run_id, at));
                        }
                    }
                    other => panic!("the subscription ended: {other:?}"),
                },
                _ = stop.cancelled() => return got,
            }
        }
    })
}

/// Sleeps until `frac` into the next whole second.
async fn until_into_second(frac: f64) {
    let now = now_secs();
    let target = now.floor() + 1.0 + frac;
    tokio::time::sleep(Duration::from_secs_f64(target - now)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_is_never_seen_before_its_instant_and_a_pause_meanwhile_applies_after_it() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let watching = watch_fired(&node, "acme", stop.clone()).await;
    let b = define_and_bind(&node, "acme", ticker("tick", None)).await;
    runs_until(&node, "acme", &b.id, WAIT, "three fires", |r| r.len() >= 3).await;

    // Pause just before a fire time: the fire of that second is prepared
    // (its binding locked) by now — a band of one binding is prepared
    // ~150 ms ahead — so the pause waits for it.
    until_into_second(0.9).await;
    let paused_from = now_secs();
    pause(&node, "acme", &b.id).await;
    let paused_at = now_secs();
    let at_pause = runs_of(&node, "acme", &b.id).await;
    // Fire times pass while it is paused: none may run or be recorded.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let in_pause = runs_of(&node, "acme", &b.id).await;
    assert_eq!(
        in_pause.len(),
        at_pause.len(),
        "no fire after PauseBinding returned (called at {paused_from}, returned at {paused_at})"
    );
    for r in &in_pause {
        assert!(
            secs(&r.scheduled_time) <= paused_at && secs(&r.start_time) <= paused_at,
            "run {} (fire time {}, started {}) after the pause returned at {paused_at}",
            r.id,
            secs(&r.scheduled_time),
            secs(&r.start_time)
        );
    }

    until_into_second(0.5).await;
    let resume_from = now_secs();
    let resumed = node
        .bindings()
        .resume_binding(as_tenant(
            "acme",
            pb::ResumeBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .expect("resume")
        .into_inner();
    let resumed_at = now_secs();
    let next = secs(&resumed.next_run_time);
    assert!(
        next > resume_from && next <= resumed_at + 1.0,
        "next fire {next} follows the resume ({resume_from}..{resumed_at}): no catch-up of the pause"
    );
    let after = runs_until(&node, "acme", &b.id, WAIT, "fires after the resume", |r| {
        r.len() >= in_pause.len() + 2
    })
    .await;
    stop.cancel();
    let seen: HashMap<String, f64> = watching.await.expect("watcher").into_iter().collect();

    // Every fire reached the subscriber, and none before its fire time.
    for r in &after {
        assert_eq!(state(r), pb::RunState::Succeeded, "{r:?}");
        let due = secs(&r.scheduled_time);
        assert!(
            due <= paused_at || due >= resume_from,
            "fire time {due} inside the pause ({paused_at}..{resume_from})"
        );
        let at = *seen
            .get(&r.id)
            .unwrap_or_else(|| panic!("the fired event of run {} reached the subscriber", r.id));
        assert!(
            at >= due,
            "run {} was seen at {at}, before its fire time {due}",
            r.id
        );
        assert!(secs(&r.start_time) >= due, "{r:?}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_fires_prepared_ahead_on_two_nodes_run_exactly_once() {
    let db = TestDb::new().await;
    let a = TestNode::start(&db, "n1").await;
    let b = TestNode::start(&db, "n2").await;
    let stop = tokio_util::sync::CancellationToken::new();
    // Subscribed on the node that may not have fired them: the bridge
    // carries the other's.
    let watching = watch_fired(&b, "acme", stop.clone()).await;
    let anchor = now_secs().ceil() as i64 + 2;
    let mut bound = Vec::new();
    for i in 0..40 {
        let node = if i % 2 == 0 { &a } else { &b };
        bound.push(
            define_and_bind(node, "acme", ticker(&format!("aligned-{i}"), Some(anchor))).await,
        );
    }
    // Four whole seconds of fires, all 40 at each.
    let until = (anchor + 6) as f64;
    tokio::time::sleep(Duration::from_secs_f64((until - now_secs()).max(0.0))).await;
    let mut all = Vec::new();
    for binding in &bound {
        all.extend(runs_of(&a, "acme", &binding.id).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let seen = watching.await.expect("watcher");

    let mut per_fire: HashSet<(String, i64)> = HashSet::new();
    for r in &all {
        let t = r.scheduled_time.expect("fire time");
        assert_eq!(t.nanos, 0, "fires on whole seconds: {r:?}");
        assert!(
            per_fire.insert((r.binding_id.clone(), t.seconds)),
            "two runs of binding {} at {}",
            r.binding_id,
            t.seconds
        );
        assert_eq!(state(r), pb::RunState::Succeeded, "{r:?}");
        assert_eq!(r.trigger, pb::RunTrigger::Schedule as i32);
    }
    for binding in &bound {
        let times: Vec<i64> = per_fire
            .iter()
            .filter(|(id, _)| id == &binding.id)
            .map(|(_, t)| *t)
            .collect();
        for t in anchor + 1..anchor + 5 {
            assert!(
                times.contains(&t),
                "binding {} fired at {t} (fired at {times:?})",
                binding.id
            );
        }
    }
    let mut received: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &seen {
        *received.entry(id.as_str()).or_default() += 1;
    }
    let due: HashMap<&str, f64> = all
        .iter()
        .map(|r| (r.id.as_str(), secs(&r.scheduled_time)))
        .collect();
    for (id, at) in &seen {
        if let Some(t) = due.get(id.as_str()) {
            assert!(*at >= *t, "run {id} seen at {at}, before its fire time {t}");
        }
    }
    for r in &all {
        assert_eq!(
            received.get(r.id.as_str()).copied(),
            Some(1),
            "the fired event of run {} reached the subscriber once",
            r.id
        );
    }
    a.stop().await;
    b.stop().await;
}

/// A band of more bindings than one insert statement writes (1 000): each
/// binding fires once at each fire time, prepared ahead and committed at
/// the instant, and its status names its latest run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_band_larger_than_one_statement_fires_every_binding_once_with_its_status() {
    // One binding per tenant and definition: 30 tenants × 40 definitions.
    const TENANTS: usize = 30;
    const PER_TENANT: usize = 40;
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let anchor = now_secs().ceil() as i64;
    for d in 0..PER_TENANT {
        node.definitions()
            .create_definition(as_tenant(
                "",
                pb::CreateDefinitionRequest {
                    definition: Some(ticker(&format!("band-{d}"), Some(anchor))),
                },
            ))
            .await
            .expect("create definition");
    }
    let tenants: Vec<String> = (0..TENANTS).map(|t| format!("band-{t}")).collect();
    let mut bound: HashMap<String, String> = HashMap::new();
    for tenant in &tenants {
        let mut calls = tokio::task::JoinSet::new();
        for d in 0..PER_TENANT {
            let mut client = node.bindings();
            let tenant = tenant.clone();
            calls.spawn(async move {
                client
                    .create_binding(as_tenant(
                        &tenant,
                        pb::CreateBindingRequest {
                            binding: Some(pb::Binding {
                                definition: format!("band-{d}"),
                                ..Default::default()
                            }),
                        },
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("create binding of band-{d} for {tenant}: {e}"))
                    .into_inner()
            });
        }
        while let Some(b) = calls.join_next().await {
            bound.insert(b.expect("create binding").id, tenant.clone());
        }
    }
    assert_eq!(bound.len(), TENANTS * PER_TENANT);
    // Two whole seconds after every binding exists, each fired by then.
    let first = now_secs().ceil() as i64 + 1;
    let last = first + 1;
    tokio::time::sleep(Duration::from_secs_f64(
        (last as f64 + 1.5 - now_secs()).max(0.0),
    ))
    .await;

    for t in first..=last {
        let mut fired: HashMap<String, usize> = HashMap::new();
        for tenant in &tenants {
            let runs = list_all_runs(
                &node,
                tenant,
                pb::ListRunsRequest {
                    scheduled_start_time: Some(ts(t as f64)),
                    scheduled_end_time: Some(ts(t as f64 + 1.0)),
                    ..Default::default()
                },
            )
            .await;
            for r in &runs {
                assert_eq!(state(r), pb::RunState::Succeeded, "{r:?}");
                assert_eq!(secs(&r.scheduled_time), t as f64, "{r:?}");
                assert!(
                    secs(&r.start_time) >= t as f64,
                    "started before its fire time: {r:?}"
                );
                assert_eq!(bound.get(&r.binding_id), Some(tenant), "{r:?}");
                *fired.entry(r.binding_id.clone()).or_default() += 1;
            }
        }
        assert_eq!(fired.len(), bound.len(), "every binding fired at {t}");
        assert!(
            fired.values().all(|&n| n == 1),
            "each binding fired once at {t}"
        );
    }
    for tenant in &tenants {
        let bindings = list_all_bindings(&node, tenant, Default::default()).await;
        assert_eq!(bindings.len(), PER_TENANT);
        for b in &bindings {
            let last_run = b.last_run.as_ref().expect("a last run");
            assert!(
                secs(&last_run.scheduled_time) >= last as f64,
                "binding {}'s last run is its latest fire: {last_run:?}",
                b.id
            );
            assert!(b.last_success_time.is_some(), "{b:?}");
            assert_eq!(b.consecutive_failures, 0, "{b:?}");
        }
    }
    node.stop().await;
}
