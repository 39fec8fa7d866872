//! Validation, tenancy, health and reflection, through the API.

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;

async fn create(
    node: &TestNode,
    def: pb::TaskDefinition,
) -> Result<pb::TaskDefinition, tonic::Status> {
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(def),
        })
        .await
        .map(|r| r.into_inner())
}

fn assert_invalid(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str, reason_part: &str) {
    let s = r.expect_err("must be rejected");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(violation_fields(&s), vec![field.to_string()], "{s:?}");
    assert!(
        s.message().contains(reason_part),
        "message {:?} should contain {reason_part:?}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_the_field_named_and_nothing_written() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;

    assert_invalid(
        create(&node, sh_def("c1", "true", cron("0 25 * * *", "UTC"))).await,
        "definition.schedule.cron.expression",
        "field 2 (hour): 25 is out of range 0-23",
    );
    assert_invalid(
        create(&node, sh_def("c2", "true", cron("* * *", "UTC"))).await,
        "definition.schedule.cron.expression",
        "5 fields",
    );
    assert_invalid(
        create(
            &node,
            sh_def("c3", "true", cron("0 3 * * *", "Mars/Olympus_Mons")),
        )
        .await,
        "definition.schedule.timezone",
        "Mars/Olympus_Mons",
    );
    assert_invalid(
        create(&node, sh_def("c4", "true", every(0))).await,
        "definition.schedule.interval.every",
        "at least 1 second",
    );
    assert_invalid(
        create(&node, command_def("c5", "", &[], every(5))).await,
        "definition.command.program",
        "required",
    );
    assert_invalid(
        create(&node, sh_def("Bad Name", "true", every(5))).await,
        "definition.name",
        "must match",
    );
    let mut no_schedule = sh_def("c6", "true", every(5));
    no_schedule.schedule = None;
    assert_invalid(
        create(&node, no_schedule).await,
        "definition.schedule",
        "required",
    );
    let mut no_kind = sh_def("c7", "true", every(5));
    no_kind.schedule = Some(pb::Schedule::default());
    assert_invalid(
        create(&node, no_kind).await,
        "definition.schedule",
        "one of cron, interval, once, manual, daily, weekly, monthly or yearly",
    );

    // Nothing was written by any of those.
    let list = node
        .definitions()
        .list_definitions(pb::ListDefinitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.definitions.is_empty(), "{:?}", list.definitions);

    // Bindings: unknown definition, bad override.
    let s = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "nope".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert!(
        s.message().contains(r#"definition "nope" not found"#),
        "{s:?}"
    );
    create(
        &node,
        sh_def("ok", "true", cron("0 3 * * *", "Europe/Berlin")),
    )
    .await
    .unwrap();
    let r = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "ok".into(),
                    schedule: Some(cron("61 * * * *", "UTC")),
                    ..Default::default()
                }),
            },
        ))
        .await;
    assert_invalid(r, "binding.schedule.cron.expression", "field 1 (minute)");
    let list = node
        .bindings()
        .list_bindings(as_tenant("acme", pb::ListBindingsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.bindings.is_empty());

    // A second binding of the same definition by one tenant.
    let first = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "ok".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let again = node
        .bindings()
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "ok".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    // Deleting a definition that is still bound.
    let s = node
        .definitions()
        .delete_definition(pb::DeleteDefinitionRequest {
            name: "ok".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    node.bindings()
        .delete_binding(as_tenant(
            "acme",
            pb::DeleteBindingRequest {
                binding_id: first.id,
            },
        ))
        .await
        .unwrap();
    node.definitions()
        .delete_definition(pb::DeleteDefinitionRequest {
            name: "ok".into(),
            force: false,
        })
        .await
        .unwrap();
    let s = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest { name: "ok".into() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // Malformed ids and paging.
    let s = node
        .runs()
        .get_run(as_tenant(
            "acme",
            pb::GetRunRequest {
                run_id: "not-a-uuid".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["run_id"]);
    let s = node
        .runs()
        .list_runs(as_tenant(
            "acme",
            pb::ListRunsRequest {
                page_size: 5000,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["page_size"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_scoped_calls_need_the_tenant_header() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let s = node
        .bindings()
        .list_bindings(pb::ListBindingsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&s), ["x-tenant-id"]);
    let s = node
        .runs()
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["x-tenant-id"]);
    let s = node
        .logs()
        .tail_run(pb::TailRunRequest {
            run_id: uuid::Uuid::now_v7().to_string(),
            after_seq: 0,
            follow: true,
        })
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["x-tenant-id"]);
    let s = node
        .runs()
        .list_runs(as_tenant("bad tenant!", pb::ListRunsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["x-tenant-id"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_see_another_tenants_bindings_runs_or_events() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let b = define_and_bind(&node, "b", sh_def("secret", "echo b-only", manual())).await;
    let run = trigger(&node, "b", &b.id).await;
    wait_terminal(&node, "b", &run.id).await;

    let mut watch_a = node
        .logs()
        .watch_events(as_tenant("a", pb::WatchEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();

    let s = node
        .bindings()
        .get_binding(as_tenant(
            "a",
            pb::GetBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = node
        .bindings()
        .delete_binding(as_tenant(
            "a",
            pb::DeleteBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = node
        .runs()
        .get_run(as_tenant(
            "a",
            pb::GetRunRequest {
                run_id: run.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = node
        .runs()
        .trigger_run(as_tenant(
            "a",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = node
        .logs()
        .tail_run(as_tenant(
            "a",
            pb::TailRunRequest {
                run_id: run.id.clone(),
                after_seq: 0,
                follow: true,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = node
        .logs()
        .list_run_events(as_tenant(
            "a",
            pb::ListRunEventsRequest {
                run_id: run.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let bindings = node
        .bindings()
        .list_bindings(as_tenant("a", pb::ListBindingsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(bindings.bindings.is_empty());
    let runs = node
        .runs()
        .list_runs(as_tenant("a", pb::ListRunsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(runs.runs.is_empty());

    // b's next run produces events; a's watcher sees none of them, while b's own does.
    let mut watch_b = node
        .logs()
        .watch_events(as_tenant("b", pb::WatchEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let run2 = trigger(&node, "b", &b.id).await;
    wait_terminal(&node, "b", &run2.id).await;
    let seen_b = tokio::time::timeout(WAIT, watch_b.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen_b.event.unwrap().tenant_id, "b");
    // a's own run after b's ended: a's watcher gets to its end and saw
    // nothing of b's before it.
    let a_run = trigger(&node, "a", &bind_existing(&node, "a", "secret").await.id).await;
    let mut seen_a = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(m) = watch_a.message().await.unwrap() {
            assert_eq!(m.missed_events, 0, "a's watcher missed events");
            let Some(e) = m.event else { continue };
            let done = e.run_id == a_run.id
                && matches!(&e.kind, Some(pb::run_event::Kind::StateChanged(s)) if s.to_state == pb::RunState::Succeeded as i32);
            seen_a.push(e);
            if done {
                return;
            }
        }
    })
    .await
    .expect("a's run ends within the wait");
    assert!(
        seen_a.iter().all(|e| e.tenant_id == "a"),
        "tenant a must see nothing of b: {seen_a:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_and_reflection_lists_the_services() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };

    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let h = HealthClient::new(node.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let h = HealthClient::new(node.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sked.v1.RunService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(node.channel.clone())
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "sked.v1.DefinitionService",
        "sked.v1.BindingService",
        "sked.v1.RunService",
        "sked.v1.LogService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    // Error details resolve too (grpcurl prints BadRequest with them).
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "google.rpc.BadRequest".into(),
        )),
    };
    let mut stream = ServerReflectionClient::new(node.channel.clone())
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(
            resp.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "{resp:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_schedule_lists_fire_times_in_utc_and_local_time() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let r = node
        .definitions()
        .preview_schedule(pb::PreviewScheduleRequest {
            schedule: Some(cron("30 2 * * *", "America/New_York")),
            count: 3,
            after: Some(prost_types::Timestamp {
                seconds: 1_741_410_000,
                nanos: 0,
            }), // 2025-03-08T05:00:00Z
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(i64, String, bool)> = r
        .fire_times
        .iter()
        .map(|f| {
            (
                f.time.as_ref().unwrap().seconds,
                f.local_time.clone(),
                f.dst_shifted,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                1_741_419_000,
                "2025-03-08T02:30:00-05:00".to_string(),
                false
            ),
            // 02:30 does not exist on 2025-03-09: fires at the first instant after the gap, flagged.
            (1_741_503_600, "2025-03-09T03:00:00-04:00".to_string(), true),
            (
                1_741_588_200,
                "2025-03-10T02:30:00-04:00".to_string(),
                false
            ),
        ]
    );
    let s = node
        .definitions()
        .preview_schedule(pb::PreviewScheduleRequest {
            schedule: Some(cron("0 0 * * *", "UTC")),
            count: 1001,
            after: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&s), ["count"]);
    node.stop().await;
}
