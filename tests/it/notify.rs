//! Failure notifications against a real HTTP receiver on 127.0.0.1 (the
//! shared scripted receiver, `common::Receiver`): signed webhooks, retries
//! with backoff, exactly one notification per failure with two nodes, the
//! FAILURE / CONSECUTIVE_FAILURES / RECOVERY rules, binding overrides, bounds,
//! tenancy, and fairness between tenants (one tenant's hanging receiver
//! does not hold back another's). Signatures are checked here with `hmac` + `sha2` directly,
//! as a receiver would.

use std::time::Duration;

use crate::common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sked::domain::HttpAllow;
use sked::domain::notify::NotifyKey;
use sked::proto::v1 as pb;
use sked::proto::v1::notification_service_client::NotificationServiceClient;
use tonic::transport::Channel;

/// The Stripe-like scheme of the docs, written out as a receiver would:
/// `t=<secs>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn signature_ok(secret: &str, hook: &Seen) -> bool {
    let (header, body) = (hook.header("sked-signature"), hook.body.as_str());
    let mut t = "";
    let mut v1 = "";
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v,
            Some(("v1", v)) => v1 = v,
            _ => {}
        }
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let age = now_secs() - t.parse::<f64>().unwrap_or(0.0);
    !t.is_empty() && v1 == want && age.abs() < 300.0
}

fn key() -> NotifyKey {
    NotifyKey::from_bytes(&[42u8; 32]).unwrap()
}

fn node_settings(db: &TestDb, id: &str) -> sked::app::Settings {
    let mut s = settings(db, id);
    s.http.allow = HttpAllow::parse("127.0.0.1/32").unwrap();
    s.notify_key = Some(key());
    s.notify_poll = Duration::from_millis(100);
    s
}

fn notifications(node: &TestNode) -> NotificationServiceClient<Channel> {
    NotificationServiceClient::new(node.channel.clone())
}

fn rule(name: &str, url: &str, trigger: pb::NotificationTrigger, n: i32) -> pb::NotificationRule {
    pb::NotificationRule {
        name: name.into(),
        url: url.into(),
        trigger: trigger as i32,
        consecutive_failures: n,
        ..Default::default()
    }
}

async fn set_definition_rules(
    node: &TestNode,
    definition: &str,
    rules: Vec<pb::NotificationRule>,
) -> Result<pb::NotificationRules, tonic::Status> {
    notifications(node)
        .set_definition_notification_rules(as_tenant(
            "",
            pb::SetDefinitionNotificationRulesRequest {
                definition: definition.into(),
                rules,
            },
        ))
        .await
        .map(|r| r.into_inner())
}

/// SetBindingNotificationRules as `tenant`: `rules` as the binding's own,
/// or (`inherit`) back to its definition's.
async fn set_binding_rules(
    node: &TestNode,
    tenant: &str,
    binding: &str,
    rules: Vec<pb::NotificationRule>,
    inherit: bool,
) -> Result<pb::NotificationRules, tonic::Status> {
    notifications(node)
        .set_binding_notification_rules(as_tenant(
            tenant,
            pb::SetBindingNotificationRulesRequest {
                binding_id: binding.into(),
                rules,
                inherit,
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn list_of_binding(node: &TestNode, tenant: &str, binding: &str) -> Vec<pb::Notification> {
    notifications(node)
        .list_notifications(as_tenant(
            tenant,
            pb::ListNotificationsRequest {
                binding_id: binding.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("list notifications")
        .into_inner()
        .notifications
}

/// Waits until the binding's notifications satisfy `done`.
async fn wait_list(
    node: &TestNode,
    tenant: &str,
    binding: &str,
    done: impl Fn(&[pb::Notification]) -> bool,
) -> Vec<pb::Notification> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let l = list_of_binding(node, tenant, binding).await;
            if done(&l) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("notifications reach the expected state within 30 s")
}

fn delivered(l: &[pb::Notification]) -> usize {
    l.iter()
        .filter(|n| n.state == pb::NotificationState::Delivered as i32)
        .count()
}

/// Stored events of a run (ListRunEvents: TailRun ends at the terminal
/// state change, and notifications come after it).
async fn events_of(node: &TestNode, tenant: &str, run_id: &str) -> Vec<pb::RunEvent> {
    node.logs()
        .list_run_events(as_tenant(
            tenant,
            pb::ListRunEventsRequest {
                run_id: run_id.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("list run events")
        .into_inner()
        .events
}

fn notification_events(events: &[pb::RunEvent]) -> Vec<pb::NotificationDelivery> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::run_event::Kind::Notification(n)) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_failing_binding_with_a_rule_delivers_one_signed_webhook() {
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    let rx = Receiver::start(statuses(&[200])).await;
    let b = define_and_bind(
        &node,
        "acme",
        sh_def("fails", "echo boom >&2; exit 3", manual()),
    )
    .await;
    let set = set_definition_rules(
        &node,
        "fails",
        vec![rule(
            "oncall",
            &rx.url(),
            pb::NotificationTrigger::Failure,
            0,
        )],
    )
    .await
    .expect("set rules");
    let secret = set.rules[0].signing_secret.clone();
    assert!(
        secret.starts_with("whsec_"),
        "the secret is shown at create: {set:?}"
    );

    let run = trigger(&node, "acme", &b.id).await;
    let run = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&run), pb::RunState::Failed);

    let hooks = rx.wait_for(1).await;
    let h = &hooks[0];
    assert!(
        signature_ok(&secret, h),
        "signature {:?} verifies with the secret returned at create",
        h.header("sked-signature")
    );
    assert!(!signature_ok("whsec_wrong", h));
    let body = h.json();
    assert_eq!(body["event"], "failure");
    assert_eq!(body["rule"], "oncall");
    assert_eq!(body["tenant_id"], "acme");
    assert_eq!(body["binding_id"], b.id.as_str());
    assert_eq!(body["definition"], "fails");
    assert_eq!(body["run_id"], run.id.as_str());
    assert_eq!(body["state"], "FAILED");
    assert_eq!(body["attempt"], 1);
    assert_eq!(body["consecutive_failures"], 1);
    assert!(body["end_time"].is_string() && body["scheduled_time"].is_string());

    // Delivered, recorded once, visible through the API and as a run event.
    let l = wait_list(&node, "acme", &b.id, |l| delivered(l) == 1).await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].id, body["id"].as_str().unwrap());
    assert_eq!(l[0].delivery_attempts, 1);
    assert_eq!(l[0].last_status_code, 200);
    let by_run = notifications(&node)
        .list_notifications(as_tenant(
            "acme",
            pb::ListNotificationsRequest {
                run_id: run.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .notifications;
    assert_eq!(by_run.len(), 1);
    let ev = notification_events(&events_of(&node, "acme", &run.id).await);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(ev[0].delivered && ev[0].attempts == 1 && ev[0].rule == "oncall");

    // Another tenant sees none of it.
    assert!(list_of_binding(&node, "other", &b.id).await.is_empty());
    // No second delivery comes.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.seen().len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn a_receiver_failing_twice_gets_it_three_times_and_it_is_delivered_once() {
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    let rx = Receiver::start(statuses(&[500, 500, 200])).await;
    let b = define_and_bind(&node, "acme", sh_def("flaky.rx", "exit 1", manual())).await;
    let set = set_definition_rules(
        &node,
        "flaky.rx",
        vec![rule("hook", &rx.url(), pb::NotificationTrigger::Failure, 0)],
    )
    .await
    .unwrap();
    let secret = set.rules[0].signing_secret.clone();
    let run = trigger(&node, "acme", &b.id).await;
    wait_terminal(&node, "acme", &run.id).await;

    let l = wait_list(&node, "acme", &b.id, |l| delivered(l) == 1).await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].delivery_attempts, 3, "{:?}", l[0]);
    assert_eq!(l[0].last_status_code, 200);
    assert!(l[0].last_error.is_empty());
    let hooks = rx.seen();
    assert_eq!(hooks.len(), 3, "two 500s, then the 200");
    let ids: Vec<String> = hooks.iter().map(|h| h.json()["id"].to_string()).collect();
    assert!(
        ids.iter().all(|i| i == &ids[0]),
        "the same notification each time"
    );
    assert!(hooks.iter().all(|h| signature_ok(&secret, h)));
    let ev = notification_events(&events_of(&node, "acme", &run.id).await);
    assert_eq!(ev.len(), 1, "delivered recorded once: {ev:?}");
    assert!(ev[0].delivered && ev[0].attempts == 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rx.seen().len(), 3);
    node.stop().await;
}

#[tokio::test]
async fn with_two_nodes_each_failure_is_notified_exactly_once() {
    let db = TestDb::new().await;
    let a = TestNode::start_with(node_settings(&db, "a")).await;
    let b = TestNode::start_with(node_settings(&db, "b")).await;
    // A slow receiver: both nodes claim while deliveries are in flight.
    let rx = Receiver::start(vec![Reply {
        delay: Duration::from_millis(150),
        ..reply(200, "")
    }])
    .await;
    create_definition(&a, sh_def("fails.many", "exit 1", manual()))
        .await
        .unwrap();
    set_definition_rules(
        &a,
        "fails.many",
        vec![rule("hook", &rx.url(), pb::NotificationTrigger::Failure, 0)],
    )
    .await
    .unwrap();
    let mut bindings = Vec::new();
    for t in 0..6 {
        bindings.push((
            format!("t{t}"),
            bind_existing(&a, &format!("t{t}"), "fails.many").await,
        ));
    }
    let mut runs = Vec::new();
    for round in 0..2 {
        for (tenant, bd) in &bindings {
            // Alternate the API node; either node's executor may run it.
            let node = if round == 0 { &a } else { &b };
            let r = trigger(node, tenant, &bd.id).await;
            runs.push((tenant.clone(), wait_terminal(node, tenant, &r.id).await));
        }
    }
    let hooks = rx.wait_for(runs.len()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hooks_after = rx.seen();
    assert_eq!(hooks_after.len(), hooks.len(), "no late duplicates");
    let mut run_ids: Vec<String> = hooks_after
        .iter()
        .map(|h| h.json()["run_id"].as_str().unwrap().to_string())
        .collect();
    run_ids.sort();
    let mut want: Vec<String> = runs.iter().map(|(_, r)| r.id.clone()).collect();
    want.sort();
    assert_eq!(run_ids, want, "each failed run notified exactly once");
    for (tenant, bd) in &bindings {
        let l = wait_list(&a, tenant, &bd.id, |l| delivered(l) == 2).await;
        assert!(l.iter().all(|n| n.delivery_attempts == 1), "{l:?}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn consecutive_and_recovery_rules_fire_when_they_should_and_not_otherwise() {
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    let rx = Receiver::start(statuses(&[200])).await;
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ok");
    let script = format!("test -e '{}'", flag.display());
    let b = define_and_bind(&node, "acme", sh_def("streak", &script, manual())).await;
    set_definition_rules(
        &node,
        "streak",
        vec![
            rule(
                "three",
                &rx.url(),
                pb::NotificationTrigger::ConsecutiveFailures,
                3,
            ),
            rule("back", &rx.url(), pb::NotificationTrigger::Recovery, 0),
        ],
    )
    .await
    .unwrap();
    let run_once = |want: pb::RunState| {
        let (node, b) = (&node, &b);
        async move {
            let r = trigger(node, "acme", &b.id).await;
            let r = wait_terminal(node, "acme", &r.id).await;
            assert_eq!(state(&r), want);
            r
        }
    };
    // Short settle: the poll is 100 ms; a notification that should not
    // exist would be written by the run's own transaction anyway.
    let count = || async { list_of_binding(&node, "acme", &b.id).await.len() };

    run_once(pb::RunState::Failed).await;
    run_once(pb::RunState::Failed).await;
    assert_eq!(count().await, 0, "two failures: below the streak of three");
    let third = run_once(pb::RunState::Failed).await;
    let l = wait_list(&node, "acme", &b.id, |l| delivered(l) == 1).await;
    assert_eq!(l[0].event, "consecutive_failures");
    assert_eq!(l[0].rule, "three");
    assert_eq!(l[0].run_id, third.id);
    assert_eq!(l[0].consecutive_failures, 3);
    run_once(pb::RunState::Failed).await;
    assert_eq!(
        count().await,
        1,
        "the fourth failure does not fire it again"
    );

    std::fs::write(&flag, b"").unwrap();
    let ok = run_once(pb::RunState::Succeeded).await;
    let l = wait_list(&node, "acme", &b.id, |l| delivered(l) == 2).await;
    assert_eq!(l[0].event, "recovery", "{l:?}");
    assert_eq!(l[0].rule, "back");
    assert_eq!(l[0].run_id, ok.id);
    assert_eq!(l[0].consecutive_failures, 0);
    run_once(pb::RunState::Succeeded).await;
    assert_eq!(count().await, 2, "a success after a success is no recovery");

    // A new streak: the count starts again.
    std::fs::remove_file(&flag).unwrap();
    run_once(pb::RunState::Failed).await;
    run_once(pb::RunState::Failed).await;
    assert_eq!(count().await, 2);
    run_once(pb::RunState::Failed).await;
    wait_list(&node, "acme", &b.id, |l| delivered(l) == 3).await;

    let kinds: Vec<String> = rx
        .wait_for(3)
        .await
        .iter()
        .map(|h| h.json()["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        ["consecutive_failures", "recovery", "consecutive_failures"]
    );
    node.stop().await;
}

#[tokio::test]
async fn every_attempt_rules_fire_per_attempt_and_final_ones_once() {
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    let rx = Receiver::start(statuses(&[200])).await;
    let mut def = sh_def("retried", "exit 1", manual());
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 3,
        initial_backoff: Some(dur(100)),
        backoff_coefficient: 1.0,
        max_backoff: Some(dur(100)),
    });
    let b = define_and_bind(&node, "acme", def).await;
    let mut each = rule("each", &rx.url(), pb::NotificationTrigger::Failure, 0);
    each.every_attempt = true;
    set_definition_rules(
        &node,
        "retried",
        vec![
            each,
            rule("final", &rx.url(), pb::NotificationTrigger::Failure, 0),
        ],
    )
    .await
    .unwrap();
    trigger(&node, "acme", &b.id).await;
    let l = wait_list(&node, "acme", &b.id, |l| delivered(l) == 4).await;
    let mut per: Vec<(String, i32)> = l.iter().map(|n| (n.rule.clone(), n.run_attempt)).collect();
    per.sort();
    assert_eq!(
        per,
        [
            ("each".to_string(), 1),
            ("each".to_string(), 2),
            ("each".to_string(), 3),
            ("final".to_string(), 3)
        ],
        "every attempt for `each`, the final outcome only for `final`"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.seen().len(), 4);
    node.stop().await;
}

#[tokio::test]
async fn a_binding_override_replaces_the_definition_rules_for_its_tenant_only() {
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    let def_rx = Receiver::start(statuses(&[200])).await;
    let own_rx = Receiver::start(statuses(&[200])).await;
    let a = define_and_bind(&node, "acme", sh_def("shared", "exit 1", manual())).await;
    let other = bind_existing(&node, "other", "shared").await;
    set_definition_rules(
        &node,
        "shared",
        vec![rule(
            "platform",
            &def_rx.url(),
            pb::NotificationTrigger::Failure,
            0,
        )],
    )
    .await
    .unwrap();
    let set = set_binding_rules(
        &node,
        "acme",
        &a.id,
        vec![rule(
            "mine",
            &own_rx.url(),
            pb::NotificationTrigger::Failure,
            0,
        )],
        false,
    )
    .await
    .unwrap();
    let secret = set.rules[0].signing_secret.clone();
    assert!(set.overridden && secret.starts_with("whsec_"));
    // Another tenant cannot touch (or see) acme's binding.
    let e = set_binding_rules(&node, "other", &a.id, vec![], false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let got = notifications(&node)
        .get_binding_notification_rules(as_tenant(
            "other",
            pb::GetBindingNotificationRulesRequest {
                binding_id: other.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!got.overridden);
    assert_eq!(got.rules[0].name, "platform");
    assert!(got.rules[0].signing_secret.is_empty(), "never shown again");

    let ra = trigger(&node, "acme", &a.id).await;
    wait_terminal(&node, "acme", &ra.id).await;
    let ro = trigger(&node, "other", &other.id).await;
    wait_terminal(&node, "other", &ro.id).await;
    let own = own_rx.wait_for(1).await;
    let plat = def_rx.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(own_rx.seen().len(), 1);
    assert_eq!(def_rx.seen().len(), 1);
    assert_eq!(own[0].json()["tenant_id"], "acme");
    assert!(signature_ok(&secret, &own[0]));
    assert_eq!(plat[0].json()["tenant_id"], "other");

    // Back to inheriting: acme's next failure goes to the platform's rule.
    set_binding_rules(&node, "acme", &a.id, vec![], true)
        .await
        .unwrap();
    let ra = trigger(&node, "acme", &a.id).await;
    wait_terminal(&node, "acme", &ra.id).await;
    let plat = def_rx.wait_for(2).await;
    assert_eq!(plat[1].json()["tenant_id"], "acme");
    assert_eq!(own_rx.seen().len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn rules_are_bounded_and_secrets_are_shown_once() {
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    create_definition(&node, sh_def("bounded", "true", manual()))
        .await
        .unwrap();
    let url = "http://127.0.0.1:9/hook";
    let fail = pb::NotificationTrigger::Failure;
    let cases: Vec<(Vec<pb::NotificationRule>, &str)> = vec![
        (
            (0..6)
                .map(|i| rule(&format!("r{i}"), url, fail, 0))
                .collect(),
            "rules",
        ),
        (vec![rule("a", "ftp://x/", fail, 0)], "rules[0].url"),
        (
            vec![rule(
                "a",
                &format!("https://e.com/{}", "x".repeat(2100)),
                fail,
                0,
            )],
            "rules[0].url",
        ),
        (vec![rule("A b", url, fail, 0)], "rules[0].name"),
        (
            vec![rule(
                "a",
                url,
                pb::NotificationTrigger::ConsecutiveFailures,
                1,
            )],
            "rules[0].consecutive_failures",
        ),
        (
            vec![rule("a", url, fail, 3)],
            "rules[0].consecutive_failures",
        ),
        (
            vec![rule("a", url, pb::NotificationTrigger::Unspecified, 0)],
            "rules[0].trigger",
        ),
        (
            vec![rule("a", url, fail, 0), rule("a", url, fail, 0)],
            "rules[1].name",
        ),
    ];
    for (rules, field) in cases {
        let e = set_definition_rules(&node, "bounded", rules)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
        assert_eq!(violation_fields(&e), [field], "{e:?}");
    }
    let e = set_definition_rules(&node, "nope", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    let first = set_definition_rules(&node, "bounded", vec![rule("a", url, fail, 0)])
        .await
        .unwrap();
    let s1 = first.rules[0].signing_secret.clone();
    assert!(s1.starts_with("whsec_") && s1.len() == 70);
    // Same name: the secret is kept and not shown; a new rule gets its own.
    let again = set_definition_rules(
        &node,
        "bounded",
        vec![rule("a", url, fail, 0), rule("b", url, fail, 0)],
    )
    .await
    .unwrap();
    assert!(again.rules[0].signing_secret.is_empty());
    let s2 = again.rules[1].signing_secret.clone();
    assert!(
        s2.starts_with("whsec_") && s2 != s1,
        "each rule has its own secret"
    );
    let mut rot = rule("a", url, fail, 0);
    rot.rotate_secret = true;
    let rotated = set_definition_rules(&node, "bounded", vec![rot])
        .await
        .unwrap();
    let s3 = rotated.rules[0].signing_secret.clone();
    assert!(s3.starts_with("whsec_") && s3 != s1);
    assert_eq!(rotated.rules.len(), 1, "the set replaces the rules");

    // The secret is stored sealed, not in clear.
    let pool = db.pool().await;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT secret FROM notify_rules WHERE name = 'a'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains(&s3[6..]));
    assert_eq!(key().open(&stored).unwrap(), s3);
    node.stop().await;
}

#[tokio::test]
async fn a_node_without_a_notify_key_refuses_rules() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    create_definition(&node, sh_def("nokey", "true", manual()))
        .await
        .unwrap();
    let e = set_definition_rules(
        &node,
        "nokey",
        vec![rule(
            "a",
            "https://example.com/",
            pb::NotificationTrigger::Failure,
            0,
        )],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("SKED_NOTIFY_KEY"), "{e:?}");
    // Removing rules needs no key.
    set_definition_rules(&node, "nokey", vec![]).await.unwrap();

    // Runs of bindings without rules write nothing to the outbox, failing
    // or not.
    let failing = define_and_bind(&node, "acme", sh_def("norules", "exit 1", manual())).await;
    let ok = bind_existing(&node, "acme", "nokey").await;
    for b in [&failing, &ok, &failing] {
        let r = trigger(&node, "acme", &b.id).await;
        wait_terminal(&node, "acme", &r.id).await;
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
        .fetch_one(&db.pool().await)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    node.stop().await;
}

#[tokio::test]
async fn a_claim_whose_lease_lapsed_is_delivered_by_another_node_and_the_late_outcome_is_refused() {
    let db = TestDb::new().await;
    let rx = Receiver::start(statuses(&[200])).await;
    // Rules are set on a node with the key; the failure happens while only
    // a node without it runs, so the notification waits in the outbox.
    let keyed = TestNode::start_with(node_settings(&db, "keyed")).await;
    let b = define_and_bind(&keyed, "acme", sh_def("lapsed", "exit 1", manual())).await;
    let set = set_definition_rules(
        &keyed,
        "lapsed",
        vec![rule("hook", &rx.url(), pb::NotificationTrigger::Failure, 0)],
    )
    .await
    .unwrap();
    let secret = set.rules[0].signing_secret.clone();
    keyed.stop().await;
    let mut plain = node_settings(&db, "plain");
    plain.notify_key = None;
    let plain = TestNode::start_with(plain).await;
    let run = trigger(&plain, "acme", &b.id).await;
    wait_terminal(&plain, "acme", &run.id).await;
    let l = list_of_binding(&plain, "acme", &b.id).await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].state, pb::NotificationState::Pending as i32);
    plain.stop().await;

    // A node claims it and dies mid-post: its lease lapses in 1 s.
    let pool = db.pool().await;
    sqlx::query(
        "UPDATE notifications SET attempts = 1, node_id = 'dead', lease_expires_at = now() + interval '1 second'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let node = TestNode::start_with(node_settings(&db, "alive")).await;
    let l = wait_list(&node, "acme", &b.id, |l| delivered(l) == 1).await;
    assert_eq!(l[0].delivery_attempts, 2, "the dead node's attempt counts");
    let hooks = rx.seen();
    assert_eq!(hooks.len(), 1);
    assert!(signature_ok(&secret, &hooks[0]));

    // The dead node's late outcome changes nothing.
    let mut conn = pool.acquire().await.unwrap();
    let id: uuid::Uuid = l[0].id.parse().unwrap();
    let now = chrono::Utc::now();
    let late = sked::db::notifications::notification_record(
        &mut conn,
        id,
        "dead",
        1,
        "FAILED",
        now,
        now,
        Some(500),
        Some("late"),
    )
    .await
    .unwrap();
    assert!(!late, "a lost claim records nothing");
    let l = list_of_binding(&node, "acme", &b.id).await;
    assert_eq!(l[0].state, pb::NotificationState::Delivered as i32);
    let ev = notification_events(&events_of(&node, "acme", &run.id).await);
    assert_eq!(ev.len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn a_tenant_whose_receiver_hangs_does_not_hold_back_another_tenants_notifications() {
    // The node's share per tenant (sked::executor::notify::PER_TENANT_IN_FLIGHT).
    const K: usize = 4;
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    let pool = db.pool().await;
    // Tenant a: five rules to a receiver that accepts and never answers
    // (each post waits for the node's 10 s timeout), and 9 failures: 45
    // notifications, more than a batch of 32.
    let hangs = Receiver::start(vec![hang()]).await;
    let a = define_and_bind(&node, "a", sh_def("a.fails", "exit 1", manual())).await;
    set_definition_rules(
        &node,
        "a.fails",
        (0..5)
            .map(|i| {
                rule(
                    &format!("h{i}"),
                    &hangs.url(),
                    pb::NotificationTrigger::Failure,
                    0,
                )
            })
            .collect(),
    )
    .await
    .unwrap();
    // Tenant b: one failing binding whose receiver answers 200.
    let answers = Receiver::start(statuses(&[200])).await;
    let b = define_and_bind(&node, "b", sh_def("b.fails", "exit 1", manual())).await;
    set_definition_rules(
        &node,
        "b.fails",
        vec![rule(
            "ok",
            &answers.url(),
            pb::NotificationTrigger::Failure,
            0,
        )],
    )
    .await
    .unwrap();

    for _ in 0..9 {
        let r = trigger(&node, "a", &a.id).await;
        wait_terminal(&node, "a", &r.id).await;
    }
    let a_pending = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM notifications WHERE tenant_id = 'a' AND state = 'PENDING'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(a_pending().await, 45);
    // The node is busy with a's posts: K of them hang.
    tokio::time::timeout(Duration::from_secs(10), async {
        while hangs.open() < K {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a's receiver holds K posts");

    let r = trigger(&node, "b", &b.id).await;
    let run = wait_terminal(&node, "b", &r.id).await;
    assert_eq!(state(&run), pb::RunState::Failed);
    let ended = std::time::Instant::now();
    let l = wait_list(&node, "b", &b.id, |l| delivered(l) == 1).await;
    let took = ended.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "b's notification went out in {took:?}, not behind a's hanging posts"
    );
    assert_eq!(l[0].delivery_attempts, 1);
    assert_eq!(answers.seen().len(), 1);
    assert_eq!(answers.seen()[0].json()["tenant_id"], "b");
    // Never more than K of a's posts in flight at once: claimed (leased)
    // in the database, and held open at its receiver.
    let leased: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM notifications WHERE tenant_id = 'a' AND lease_expires_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!((1..=K as i64).contains(&leased), "{leased} of a's leased");
    assert!(
        hangs.peak_open() <= K,
        "a's receiver held {} posts at once, more than {K}",
        hangs.peak_open()
    );
    assert_eq!(a_pending().await, 45, "a's backlog still waits");
    // Stopping waits for the hanging posts (the node's 10 s timeout): each
    // failed attempt is recorded under its claim, to be retried later.
    node.stop().await;
    let (leased, attempts): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE lease_expires_at IS NOT NULL), coalesce(sum(attempts), 0)
         FROM notifications WHERE tenant_id = 'a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leased, 0, "every claimed post recorded its outcome");
    assert_eq!(attempts, hangs.seen().len() as i64, "one attempt per post");
}

/// GetBinding / ListBindings of `tenant`'s binding `id`: its effective
/// notification rules (name, url, secret) and whether they are its own.
async fn effective_rules(
    node: &TestNode,
    tenant: &str,
    id: &str,
) -> (Vec<(String, String, String)>, bool) {
    let got = get_binding(node, tenant, id).await;
    let listed = node
        .bindings()
        .list_bindings(as_tenant(tenant, pb::ListBindingsRequest::default()))
        .await
        .expect("list bindings")
        .into_inner()
        .bindings
        .into_iter()
        .find(|b| b.id == id)
        .expect("listed");
    assert_eq!(
        got.effective, listed.effective,
        "GetBinding and ListBindings agree"
    );
    let e = got.effective.unwrap();
    let own = e.overridden.iter().any(|f| f == "notification_rules");
    let rules = e
        .notification_rules
        .into_iter()
        .map(|r| (r.name, r.url, r.signing_secret))
        .collect();
    (rules, own)
}

#[tokio::test]
async fn a_bindings_effective_config_shows_the_notification_rules_in_force_never_their_secrets() {
    let db = TestDb::new().await;
    let node = TestNode::start_with(node_settings(&db, "n1")).await;
    let a = define_and_bind(&node, "acme", sh_def("shared", "exit 1", manual())).await;
    let other = bind_existing(&node, "other", "shared").await;
    let none = |url: &str| url.is_empty();
    // No rules anywhere: none in force, none overridden.
    assert_eq!(effective_rules(&node, "acme", &a.id).await, (vec![], false));

    let url = "http://127.0.0.1:9/platform";
    set_definition_rules(
        &node,
        "shared",
        vec![
            rule("platform", url, pb::NotificationTrigger::Failure, 0),
            rule(
                "streak",
                url,
                pb::NotificationTrigger::ConsecutiveFailures,
                3,
            ),
        ],
    )
    .await
    .unwrap();
    let (rules, own) = effective_rules(&node, "acme", &a.id).await;
    assert!(!own);
    assert_eq!(
        rules.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["platform", "streak"],
        "the definition's rules, in order"
    );
    assert!(
        rules.iter().all(|r| r.1 == url && none(&r.2)),
        "no secret: {rules:?}"
    );

    // acme's own rules replace the definition's for acme only.
    let own_url = "http://127.0.0.1:9/mine";
    set_binding_rules(
        &node,
        "acme",
        &a.id,
        vec![rule("mine", own_url, pb::NotificationTrigger::Recovery, 0)],
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        effective_rules(&node, "acme", &a.id).await,
        (vec![("mine".into(), own_url.into(), String::new())], true)
    );
    let (rules, own) = effective_rules(&node, "other", &other.id).await;
    assert!(!own && rules.len() == 2, "other still inherits: {rules:?}");

    // An empty override silences the binding, and says so.
    set_binding_rules(&node, "acme", &a.id, vec![], false)
        .await
        .unwrap();
    assert_eq!(effective_rules(&node, "acme", &a.id).await, (vec![], true));

    // Inheriting again follows the definition, also after it changes.
    set_binding_rules(&node, "acme", &a.id, vec![], true)
        .await
        .unwrap();
    set_definition_rules(
        &node,
        "shared",
        vec![rule("only", url, pb::NotificationTrigger::Failure, 0)],
    )
    .await
    .unwrap();
    assert_eq!(
        effective_rules(&node, "acme", &a.id).await,
        (vec![("only".into(), url.into(), String::new())], false)
    );
    // The answers of the binding's own calls carry them too.
    let paused = node
        .bindings()
        .pause_binding(as_tenant(
            "acme",
            pb::PauseBindingRequest {
                binding_id: a.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.effective.unwrap().notification_rules.len(), 1);
    node.stop().await;
}
