//! Schedule changes, once schedules and updates, through the API.

use std::time::{Duration, Instant};

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_binding_schedule_changes_the_next_fire_within_a_second() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "acme", sh_def("slowly", "echo tick", every(3600))).await;
    let mut watch = node
        .logs()
        .watch_events(as_tenant(
            "acme",
            pb::WatchEventsRequest {
                kinds: vec![pb::EventKind::Log as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    let updated = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    schedule: Some(every(1)),
                    etag: b.etag.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["schedule"]),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(updated.etag, b.etag);
    let next = updated.next_run_time.unwrap();
    let upd = updated.update_time.unwrap();
    let delta_ms =
        (next.seconds - upd.seconds) * 1000 + i64::from(next.nanos - upd.nanos) / 1_000_000;
    assert!(
        (0..=1000).contains(&delta_ms),
        "next fire {delta_ms} ms after the update"
    );
    let first = tokio::time::timeout(WAIT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.event.unwrap().binding_id, b.id);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fired {:?} after the update",
        started.elapsed()
    );

    // A stale etag is refused and changes nothing.
    let stale = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    schedule: Some(every(7)),
                    etag: b.etag.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["schedule"]),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let now = node
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
    assert_eq!(now.etag, updated.etag);
    assert_eq!(
        now.schedule.unwrap().kind,
        every(1).kind,
        "the stale update changed nothing"
    );

    // Unknown or immutable mask paths are INVALID_ARGUMENT.
    let s = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    definition: "other".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["definition"]),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["update_mask"]);
    // Another tenant cannot update it.
    let s = node
        .bindings()
        .update_binding(as_tenant(
            "other",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    schedule: Some(every(5)),
                    ..Default::default()
                }),
                update_mask: None,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_definition_schedule_moves_inheriting_bindings_only() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let def = sh_def("report", "true", cron("0 3 * * *", "Europe/Berlin"));
    let inherits = define_and_bind(&node, "a", def).await;
    let overrides = node
        .bindings()
        .create_binding(as_tenant(
            "b",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "report".into(),
                    schedule: Some(cron("0 5 * * *", "UTC")),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let d = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "report".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let updated = node
        .definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                name: "report".into(),
                schedule: Some(cron("0 4 1 1 *", "UTC")),
                description: "yearly now".into(),
                etag: d.etag.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["schedule", "description"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.description, "yearly now");
    assert!(
        updated.handler.is_some(),
        "fields outside the mask are kept"
    );
    let a = node
        .bindings()
        .get_binding(as_tenant(
            "a",
            pb::GetBindingRequest {
                binding_id: inherits.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let next = a.next_run_time.unwrap();
    let dt = chrono::DateTime::from_timestamp(next.seconds, 0).unwrap();
    assert_eq!(
        dt.format("%m-%d %H:%M").to_string(),
        "01-01 04:00",
        "inheriting binding follows the new schedule"
    );
    assert_eq!(
        a.effective.unwrap().schedule,
        Some(cron("0 4 1 1 *", "UTC"))
    );
    let b = node
        .bindings()
        .get_binding(as_tenant(
            "b",
            pb::GetBindingRequest {
                binding_id: overrides.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        b.next_run_time, overrides.next_run_time,
        "an overriding binding keeps its own schedule"
    );

    // Stale etag.
    let s = node
        .definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                name: "report".into(),
                description: "x".into(),
                etag: d.etag,
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Aborted);
    // Bad value in an update: rejected, nothing changed.
    let s = node
        .definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                name: "report".into(),
                schedule: Some(cron("0 0 32 * *", "UTC")),
                ..Default::default()
            }),
            update_mask: mask(&["schedule"]),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violation_fields(&s),
        ["definition.schedule.cron.expression"]
    );
    let again = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "report".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.etag, updated.etag);
    let s = node
        .definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                name: "nope".into(),
                description: "x".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_fires_exactly_once_then_has_no_next_time() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(3000);
    let once = pb::Schedule {
        kind: Some(pb::schedule::Kind::Once(pb::OnceSchedule {
            at: Some(prost_types::Timestamp {
                seconds: at.timestamp(),
                nanos: 0,
            }),
        })),
        ..Default::default()
    };
    let b = define_and_bind(&node, "acme", sh_def("one-shot", "echo once", once)).await;
    assert_eq!(b.next_run_time.unwrap().seconds, at.timestamp());
    let run_id = tokio::time::timeout(WAIT, async {
        loop {
            let runs = runs_of(&node, "acme", &b.id).await;
            if let Some(r) = runs.first() {
                return r.id.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    let run = wait_terminal(&node, "acme", &run_id).await;
    assert_eq!(run.state, pb::RunState::Succeeded as i32);
    let after = node
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
    assert!(
        after.next_run_time.is_none(),
        "a once schedule has no next time after it fired"
    );
    let canary = event_canary(&node, "watch").await;
    fires_passed(&node, "watch", &canary, now_secs()).await;
    let runs = runs_of(&node, "acme", &b.id).await;
    assert_eq!(runs.len(), 1, "fired exactly once");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_creates_exactly_the_expected_runs_and_dry_run_creates_none() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    // Hourly at :15 in Berlin; the range covers the October 2025 fall-back
    // (02:00-03:00 happens twice): 01:15 CEST, 02:15 CEST, 02:15 CET, 03:15 CET.
    let b = define_and_bind(
        &node,
        "acme",
        sh_def(
            "hourly",
            "echo backfilled",
            cron("15 * * * *", "Europe/Berlin"),
        ),
    )
    .await;
    let ts = |s: &str| {
        let t: chrono::DateTime<chrono::Utc> = s.parse().unwrap();
        prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        }
    };
    let req = |dry_run| {
        as_tenant(
            "acme",
            pb::BackfillRunsRequest {
                binding_id: b.id.clone(),
                start_time: Some(ts("2025-10-25T23:00:00Z")),
                end_time: Some(ts("2025-10-26T02:30:00Z")),
                dry_run,
            },
        )
    };
    let want: Vec<prost_types::Timestamp> = [
        "2025-10-25T23:15:00Z",
        "2025-10-26T00:15:00Z",
        "2025-10-26T01:15:00Z",
        "2025-10-26T02:15:00Z",
    ]
    .iter()
    .map(|s| ts(s))
    .collect();
    let dry = node
        .runs()
        .backfill_runs(req(true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.scheduled_times, want);
    assert!(dry.run_ids.is_empty());
    let listed = runs_of(&node, "acme", &b.id).await;
    assert!(listed.is_empty(), "dry_run creates nothing");

    let real = node
        .runs()
        .backfill_runs(req(false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(real.scheduled_times, want);
    assert_eq!(real.run_ids.len(), 4);
    for (id, t) in real.run_ids.iter().zip(&want) {
        let run = wait_terminal(&node, "acme", id).await;
        assert_eq!(run.trigger, pb::RunTrigger::Backfill as i32);
        assert_eq!(run.scheduled_time.as_ref(), Some(t));
        assert_eq!(run.state, pb::RunState::Succeeded as i32);
    }
    // Bad ranges.
    let mut r = req(true);
    r.get_mut().end_time = Some(ts("2025-10-25T22:00:00Z"));
    assert_eq!(
        violation_fields(&node.runs().backfill_runs(r).await.unwrap_err()),
        ["end_time"]
    );
    let mut r = req(true);
    r.get_mut().start_time = Some(ts("2020-01-01T00:00:00Z")); // ~50 000 hourly fires
    let s = node.runs().backfill_runs(r).await.unwrap_err();
    assert_eq!(violation_fields(&s), ["end_time"]);
    assert!(s.message().contains("10000"), "{s:?}");
    let mut r = req(true);
    r.get_mut().end_time = Some(ts("2999-01-01T00:00:00Z"));
    assert_eq!(
        violation_fields(&node.runs().backfill_runs(r).await.unwrap_err()),
        ["end_time"]
    );
    node.stop().await;
}

fn tod(h: i32, m: i32) -> Option<pb::TimeOfDay> {
    Some(pb::TimeOfDay {
        hours: h,
        minutes: m,
        seconds: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_kinds_preview_through_the_api() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let preview = |schedule: pb::Schedule, after: &str, count: i32| {
        let mut c = node.definitions();
        let after: chrono::DateTime<chrono::Utc> = after.parse().unwrap();
        async move {
            c.preview_schedule(pb::PreviewScheduleRequest {
                schedule: Some(schedule),
                count,
                after: Some(prost_types::Timestamp {
                    seconds: after.timestamp(),
                    nanos: 0,
                }),
            })
            .await
            .map(|r| {
                r.into_inner()
                    .fire_times
                    .into_iter()
                    .map(|f| (f.local_time, f.dst_shifted))
                    .collect::<Vec<_>>()
            })
        }
    };
    use pb::schedule::Kind as K;
    let sched = |kind: K, tz: &str| pb::Schedule {
        kind: Some(kind),
        timezone: tz.into(),
        ..Default::default()
    };
    // Monthly on the 31st: short months fire on their last day.
    let got = preview(
        sched(
            K::Monthly(pb::MonthlySchedule {
                day_of_month: 31,
                time_of_day: tod(9, 0),
            }),
            "UTC",
        ),
        "2026-01-31T10:00:00Z",
        3,
    )
    .await
    .unwrap();
    assert_eq!(
        got.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        [
            "2026-02-28T09:00:00+00:00",
            "2026-03-31T09:00:00+00:00",
            "2026-04-30T09:00:00+00:00"
        ]
    );
    // Yearly 29 Feb → 28 Feb in common years.
    let got = preview(
        sched(
            K::Yearly(pb::YearlySchedule {
                month: 2,
                day: 29,
                time_of_day: tod(12, 0),
            }),
            "Europe/Berlin",
        ),
        "2027-01-01T00:00:00Z",
        2,
    )
    .await
    .unwrap();
    assert_eq!(got[0].0, "2027-02-28T12:00:00+01:00");
    assert_eq!(got[1].0, "2028-02-29T12:00:00+01:00");
    // Weekly Monday 02:30 in Berlin across the spring-forward Sunday→Monday? Daily 02:30 on the DST day.
    let got = preview(
        sched(
            K::Daily(pb::DailySchedule {
                time_of_day: tod(2, 30),
            }),
            "Europe/Berlin",
        ),
        "2026-03-28T12:00:00Z",
        2,
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        vec![
            ("2026-03-29T03:00:00+02:00".to_string(), true),
            ("2026-03-30T02:30:00+02:00".to_string(), false)
        ]
    );
    let got = preview(
        sched(
            K::Weekly(pb::WeeklySchedule {
                days_of_week: vec![pb::DayOfWeek::Monday as i32],
                time_of_day: tod(9, 0),
            }),
            "America/New_York",
        ),
        "2026-12-25T12:00:00Z",
        2,
    )
    .await
    .unwrap();
    assert_eq!(got[0].0, "2026-12-28T09:00:00-05:00");
    assert_eq!(got[1].0, "2027-01-04T09:00:00-05:00");
    // Bad calendar input names the field.
    let e = preview(
        sched(
            K::Yearly(pb::YearlySchedule {
                month: 4,
                day: 31,
                time_of_day: tod(0, 0),
            }),
            "UTC",
        ),
        "2026-01-01T00:00:00Z",
        1,
    )
    .await
    .unwrap_err();
    assert_eq!(violation_fields(&e), ["schedule.yearly.day"]);
    let e = preview(
        sched(
            K::Daily(pb::DailySchedule {
                time_of_day: tod(24, 0),
            }),
            "UTC",
        ),
        "2026-01-01T00:00:00Z",
        1,
    )
    .await
    .unwrap_err();
    assert_eq!(violation_fields(&e), ["schedule.daily.time_of_day"]);
    let e = preview(
        sched(
            K::Weekly(pb::WeeklySchedule {
                days_of_week: vec![],
                time_of_day: tod(1, 0),
            }),
            "UTC",
        ),
        "2026-01-01T00:00:00Z",
        1,
    )
    .await
    .unwrap_err();
    assert_eq!(violation_fields(&e), ["schedule.weekly.days_of_week"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_outside_its_effective_window_does_not_fire() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(sh_def("windowed", "echo in-window", every(1))),
        })
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    // Window entirely in the past: never fires.
    let past = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "windowed".into(),
                    effective_from: Some(ts(now - chrono::Duration::hours(2))),
                    effective_until: Some(ts(now - chrono::Duration::hours(1))),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(past.next_run_time.is_none());
    // Window starting in an hour: first fire at its start.
    let future = node
        .bindings()
        .create_binding(as_tenant(
            "other",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "windowed".into(),
                    effective_from: Some(ts(now + chrono::Duration::hours(1))),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let next = future.next_run_time.unwrap().seconds;
    assert!(
        (next - (now + chrono::Duration::hours(1)).timestamp()).abs() <= 1,
        "first fire at the window's start"
    );
    let canary = event_canary(&node, "watch").await;
    fires_passed(&node, "watch", &canary, now_secs() + 1.0).await;
    for (tenant, id) in [("acme", &past.id), ("other", &future.id)] {
        let runs = runs_of(&node, tenant, id).await;
        assert!(
            runs.is_empty(),
            "{tenant}: no fire outside the effective window"
        );
    }
    // Until before from is rejected.
    let s = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: past.id.clone(),
                    effective_from: Some(ts(now)),
                    effective_until: Some(ts(now - chrono::Duration::hours(3))),
                    ..Default::default()
                }),
                update_mask: None,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["binding.effective_until"]);
    // Opening the window makes it fire.
    let opened = node
        .bindings()
        .update_binding(as_tenant(
            "acme",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: past.id.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["effective_from", "effective_until"]),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(opened.next_run_time.is_some());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_delays_each_run_by_its_deterministic_offset() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut schedule = every(1);
    schedule.jitter = Some(prost_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    let b = define_and_bind(&node, "acme", sh_def("jittery", "true", schedule)).await;
    let effective =
        sked::grpc::convert::schedule_from("s", b.effective.as_ref().unwrap().schedule.as_ref())
            .unwrap()
            .unwrap();
    let id: uuid::Uuid = b.id.parse().unwrap();
    let runs = tokio::time::timeout(WAIT, async {
        loop {
            let runs = runs_of(&node, "acme", &b.id).await;
            if runs.iter().filter(|r| r.start_time.is_some()).count() >= 3 {
                return runs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    let mut offsets = Vec::new();
    for r in runs.iter().filter(|r| r.start_time.is_some()) {
        let sched = r.scheduled_time.unwrap();
        let sched = chrono::DateTime::from_timestamp(sched.seconds, sched.nanos as u32).unwrap();
        let start = r.start_time.unwrap();
        let start = chrono::DateTime::from_timestamp(start.seconds, start.nanos as u32).unwrap();
        let jitter = effective.jitter_for(id.as_bytes(), sched);
        assert!(jitter >= chrono::Duration::zero() && jitter <= chrono::Duration::seconds(2));
        assert!(
            start >= sched + jitter,
            "run started {} before its jittered time",
            sched + jitter - start
        );
        offsets.push(jitter);
    }
    assert!(
        offsets.windows(2).any(|w| w[0] != w[1]),
        "jitter varies per fire time: {offsets:?}"
    );
    node.stop().await;
}
