//! Defects found by probing a real node from outside (issue 12), each as a
//! test of what a user would check: malformed requests to the health
//! service, unbounded echo in reflection errors, responses carrying
//! timestamps outside the protobuf range, output-only fields refused on
//! input, params that pass every input check but not the merged limit,
//! one tenant holding every executor slot, the per-tenant cost limit
//! bypassed by naming other tenants, cron schedules that stop computing at
//! year 5000, LIKE wildcards in an exact filter, and long quotes in errors.

use std::time::{Duration, Instant};

use prost_types::{Struct, Value as PValue, value::Kind as PKind};
use sked::grpc::boundary::MAX_TIMESTAMP_SECS;
use sked::proto::v1 as pb;
use tonic::Code;

use crate::common::*;

fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

fn params(pairs: &[(&str, PValue)]) -> Struct {
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

fn string_value(s: String) -> PValue {
    PValue {
        kind: Some(PKind::StringValue(s)),
    }
}

/// A list of `n` numbers: about 11 bytes each encoded, 2 bytes as JSON.
fn number_list(n: usize) -> PValue {
    PValue {
        kind: Some(PKind::ListValue(prost_types::ListValue {
            values: vec![
                PValue {
                    kind: Some(PKind::NumberValue(1.0)),
                };
                n
            ],
        })),
    }
}

fn json_len(s: &Struct) -> usize {
    sked::grpc::convert::struct_to_json(s).to_string().len()
}

async fn create_binding(node: &TestNode, tenant: &str, b: pb::Binding) -> pb::Binding {
    node.bindings()
        .create_binding(as_tenant(
            tenant,
            pb::CreateBindingRequest { binding: Some(b) },
        ))
        .await
        .expect("create binding")
        .into_inner()
}

/// Malformed bytes to the health service: INVALID_ARGUMENT like every other
/// service, never INTERNAL (probe: `grpc.health.v1.Health/Check` with an
/// invalid UTF-8 `service`, a truncated field, wire type 7 all ended
/// `INTERNAL "failed to decode Protobuf message"`).
#[tokio::test]
async fn health_answers_malformed_requests_with_invalid_argument() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-health").await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("invalid UTF-8 in service", vec![0x0a, 0x02, 0xff, 0xfe]),
        (
            "truncated length-delimited field",
            vec![0x0a, 0x05, b'a', b'b'],
        ),
        ("wire type 7", vec![0x0f]),
        ("11-byte varint", {
            let mut v = vec![0x10];
            v.extend([0xff; 10]);
            v.push(0x01);
            v
        }),
    ];
    for path in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ] {
        for (what, body) in &cases {
            let mut grpc = tonic::client::Grpc::new(node.channel.clone());
            grpc.ready().await.expect("ready");
            let req = tonic::Request::new(body.clone());
            let res = if path.ends_with("Watch") {
                match grpc
                    .server_streaming(req, path.parse().expect("path"), RawCodec)
                    .await
                {
                    Ok(mut s) => s.get_mut().message().await.map(|_| ()),
                    Err(e) => Err(e),
                }
            } else {
                grpc.unary(req, path.parse().expect("path"), RawCodec)
                    .await
                    .map(|_| ())
            };
            let e = res.expect_err(what);
            assert_eq!(
                e.code(),
                Code::InvalidArgument,
                "{path}, {what}: {:?} {}",
                e.code(),
                e.message()
            );
        }
    }
    node.stop().await;
}

/// Reflection must not echo an unbounded symbol name in `grpc-message`:
/// with 1 MB the client saw a metadata-size error instead of NOT_FOUND
/// (probe: a grpcio client got RESOURCE_EXHAUSTED "received metadata size
/// exceeds hard limit (value length 875019 vs. 16384)").
#[tokio::test]
async fn reflection_errors_do_not_echo_huge_symbols() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-reflection").await;
    let symbol = "x".repeat(1 << 20);

    use tonic_reflection::pb::v1 as r1;
    let mut client =
        r1::server_reflection_client::ServerReflectionClient::new(node.channel.clone());
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1::server_reflection_request::MessageRequest::FileContainingSymbol(symbol.clone()),
        ),
    };
    let outcome = match client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
    {
        Ok(resp) => resp
            .into_inner()
            .message()
            .await
            .map(|m| m.map(|m| m.message_response)),
        Err(e) => Err(e),
    };
    match outcome {
        Ok(Some(Some(r1::server_reflection_response::MessageResponse::ErrorResponse(e)))) => {
            assert!(
                e.error_message.len() <= 1024,
                "v1 error_response message is {} bytes",
                e.error_message.len()
            );
        }
        Ok(other) => panic!("v1: expected an error for an unknown symbol, got {other:?}"),
        Err(status) => {
            assert!(
                matches!(status.code(), Code::NotFound | Code::InvalidArgument),
                "v1: {:?} {}",
                status.code(),
                &status.message()[..status.message().len().min(200)]
            );
            assert!(
                status.message().len() <= 1024,
                "v1: grpc-message is {} bytes",
                status.message().len()
            );
        }
    }

    use tonic_reflection::pb::v1alpha as ra;
    let mut client =
        ra::server_reflection_client::ServerReflectionClient::new(node.channel.clone());
    let req = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            ra::server_reflection_request::MessageRequest::FileContainingSymbol(symbol),
        ),
    };
    let outcome = match client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
    {
        Ok(resp) => resp
            .into_inner()
            .message()
            .await
            .map(|m| m.map(|m| m.message_response)),
        Err(e) => Err(e),
    };
    match outcome {
        Ok(Some(Some(ra::server_reflection_response::MessageResponse::ErrorResponse(e)))) => {
            assert!(e.error_message.len() <= 1024);
        }
        Ok(other) => panic!("v1alpha: expected an error, got {other:?}"),
        Err(status) => {
            assert!(
                matches!(status.code(), Code::NotFound | Code::InvalidArgument),
                "v1alpha: {:?} {}",
                status.code(),
                &status.message()[..status.message().len().min(200)]
            );
            assert!(status.message().len() <= 1024);
        }
    }
    node.stop().await;
}

/// Every timestamp the API answers is inside the protobuf range, so
/// protojson clients (grpcurl, Python's json_format, Go's protojson) can
/// print it. Probe: an interval binding with `start_time`
/// 9999-12-31T23:59:59.999999999Z answered `next_run_time`
/// 10000-01-01T00:00:00.07Z; PreviewSchedule after 9999-12-31T23:59:59Z
/// answered three fire times in year 10000; a daily 23:00 schedule in
/// Etc/GMT+12 previewed 10000-01-01T11:00:00Z.
#[tokio::test]
async fn answers_never_carry_timestamps_past_9999() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-range").await;
    create_definition(&node, event_def("ev", manual()))
        .await
        .unwrap();
    let mut schedule = every(1);
    schedule.start_time = Some(ts(MAX_TIMESTAMP_SECS, 999_999_999));
    let b = create_binding(
        &node,
        "t1",
        pb::Binding {
            definition: "ev".into(),
            schedule: Some(schedule.clone()),
            ..Default::default()
        },
    )
    .await;
    if let Some(t) = b.next_run_time {
        assert!(
            t.seconds <= MAX_TIMESTAMP_SECS,
            "next_run_time {t:?} is past 9999-12-31T23:59:59Z"
        );
    }

    let daily_late = pb::Schedule {
        kind: Some(pb::schedule::Kind::Daily(pb::DailySchedule {
            time_of_day: Some(pb::TimeOfDay {
                hours: 23,
                minutes: 0,
                seconds: 0,
            }),
        })),
        timezone: "Etc/GMT+12".into(),
        ..Default::default()
    };
    for (what, s, after) in [
        ("interval", every(1), MAX_TIMESTAMP_SECS),
        (
            "daily Etc/GMT+12",
            daily_late,
            MAX_TIMESTAMP_SECS - 3 * 86_400,
        ),
    ] {
        let fires = node
            .definitions()
            .preview_schedule(as_tenant(
                "t1",
                pb::PreviewScheduleRequest {
                    schedule: Some(s),
                    count: 10,
                    after: Some(ts(after, 0)),
                },
            ))
            .await
            .expect("preview")
            .into_inner()
            .fire_times;
        for f in fires {
            let t = f.time.expect("fire time");
            assert!(
                t.seconds <= MAX_TIMESTAMP_SECS,
                "{what}: previewed {} ({t:?}) is past 9999-12-31T23:59:59Z",
                f.local_time
            );
        }
    }
    node.stop().await;
}

/// A binding read with GetBinding can be sent back in UpdateBinding: output
/// only fields are ignored on input (common.proto). Probe: a definition's
/// params and a binding's params, each within 64 KiB encoded and small as
/// JSON, made `effective.params` over 64 KiB encoded, and sending the
/// binding back with `update_mask: ["enabled"]` ended INVALID_ARGUMENT on
/// `binding.effective.params` (the same for an out-of-range
/// `binding.next_run_time`).
#[tokio::test]
async fn a_binding_as_read_can_be_written_back() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-writeback").await;
    let mut def = event_def("ev", manual());
    def.params = Some(params(&[("a", number_list(5000))]));
    create_definition(&node, def).await.expect("definition");
    let created = create_binding(
        &node,
        "t1",
        pb::Binding {
            definition: "ev".into(),
            params: Some(params(&[("b", number_list(5000))])),
            ..Default::default()
        },
    )
    .await;
    let mut read = node
        .bindings()
        .get_binding(as_tenant(
            "t1",
            pb::GetBindingRequest {
                binding_id: created.id,
            },
        ))
        .await
        .expect("get")
        .into_inner();
    read.enabled = Some(false);
    let updated = node
        .bindings()
        .update_binding(as_tenant(
            "t1",
            pb::UpdateBindingRequest {
                binding: Some(read),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            },
        ))
        .await
        .map(|r| r.into_inner());
    match updated {
        Ok(b) => assert_eq!(b.enabled, Some(false)),
        Err(e) => panic!(
            "writing back the binding as read: {:?} {} (fields {:?})",
            e.code(),
            e.message(),
            violation_fields(&e)
        ),
    }
    node.stop().await;
}

/// Params that pass the per-message limit (64 KiB encoded) but are over
/// 64 KiB as JSON (control characters escape to six bytes each) must not
/// make a definition whose every run fails. Probe: a definition with one
/// 60 000-character string of U+0001 was accepted, every scheduled run of
/// its binding ended FAILED `failed to start "/bin/sh": Argument list too
/// long (os error 7)` and TriggerRun answered INVALID_ARGUMENT "merged ...
/// 360008 bytes of JSON" to a caller who sent no params.
#[tokio::test]
async fn params_over_the_json_limit_are_refused_at_the_definition() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-json-limit").await;
    let p = params(&[("a", string_value("\u{1}".repeat(60_000)))]);
    assert!(json_len(&p) > 64 * 1024);
    let mut def = sh_def("esc", "cat > /dev/null", every(1));
    def.params = Some(p);
    match create_definition(&node, def).await {
        Err(e) => {
            assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
            assert!(
                violation_fields(&e).iter().any(|f| f.contains("params")),
                "names params: {:?} {}",
                violation_fields(&e),
                e.message()
            );
        }
        Ok(_) => {
            // Accepted: then its runs must run.
            let b = create_binding(
                &node,
                "t1",
                pb::Binding {
                    definition: "esc".into(),
                    ..Default::default()
                },
            )
            .await;
            let runs = runs_until(&node, "t1", &b.id, WAIT, "a terminal run", |rs| {
                rs.iter().any(|r| r.end_time.is_some())
            })
            .await;
            let r = runs.iter().find(|r| r.end_time.is_some()).expect("ended");
            assert_eq!(
                r.state,
                pb::RunState::Succeeded as i32,
                "an accepted definition's run ended {:?}: {:?}",
                r.state,
                r.error
            );
        }
    }
    node.stop().await;
}

/// UpdateDefinition may not push an existing binding's merged params over
/// 64 KiB (issue 12, class 6). Probe: definition params 40 000 bytes,
/// binding params 40 000 bytes under another key, the definition update
/// was accepted and the binding's runs received 80 015 bytes of params.
#[tokio::test]
async fn a_definition_update_cannot_push_a_binding_over_the_merged_limit() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-merged-update").await;
    create_definition(&node, event_def("ev", every(1)))
        .await
        .expect("definition");
    let b = create_binding(
        &node,
        "t1",
        pb::Binding {
            definition: "ev".into(),
            params: Some(params(&[("b", string_value("y".repeat(40_000)))])),
            ..Default::default()
        },
    )
    .await;
    let update = node
        .definitions()
        .update_definition(as_tenant(
            "",
            pb::UpdateDefinitionRequest {
                definition: Some(pb::TaskDefinition {
                    name: "ev".into(),
                    params: Some(params(&[("a", string_value("x".repeat(40_000)))])),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["params".into()],
                }),
            },
        ))
        .await;
    if let Err(e) = update {
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        return node.stop().await;
    }
    // Accepted: no run may then receive more than 64 KiB of params.
    let since = Instant::now();
    let runs = runs_until(&node, "t1", &b.id, WAIT, "runs after the update", |rs| {
        since.elapsed() > Duration::from_secs(3) && !rs.is_empty()
    })
    .await;
    for r in runs {
        if let Some(p) = &r.params {
            assert!(
                json_len(p) <= 64 * 1024,
                "run {} ({:?}) received {} bytes of params",
                r.id,
                r.state,
                json_len(p)
            );
        }
    }
    node.stop().await;
}

/// One tenant's long runs may not hold every executor slot of the node.
/// Probe: a tenant backfilled 299 runs of `sleep 120` (a BackfillRuns call
/// any operator may make); all 64 slots of the node were taken and another
/// tenant's one-second `/bin/true` binding started no run for minutes (one
/// QUEUED, the rest SKIPPED "overlap").
#[tokio::test]
async fn one_tenant_cannot_hold_every_executor_slot() {
    let db = TestDb::new().await;
    let mut s = settings(&db, "probe-slots");
    s.max_concurrent_runs = 4;
    let node = TestNode::start_with(s).await;
    let mut hog = sh_def("hog", "sleep 60", manual());
    hog.overlap_policy = pb::OverlapPolicy::Allow as i32;
    let hog_b = define_and_bind(&node, "hog", hog).await;
    for _ in 0..8 {
        trigger(&node, "hog", &hog_b.id).await;
    }
    // Wait until the hog's runs are running.
    runs_until(&node, "hog", &hog_b.id, WAIT, "hog runs start", |rs| {
        rs.iter()
            .filter(|r| r.state == pb::RunState::Running as i32)
            .count()
            >= 2
    })
    .await;
    let victim = define_and_bind(&node, "victim", sh_def("victim", "true", every(1))).await;
    runs_until(
        &node,
        "victim",
        &victim.id,
        Duration::from_secs(10),
        "the other tenant's binding runs while one tenant has many long runs",
        |rs| rs.iter().any(|r| r.state == pb::RunState::Succeeded as i32),
    )
    .await;
    for r in runs_of(&node, "hog", &hog_b.id).await {
        if r.end_time.is_none() {
            let _ = node
                .runs()
                .cancel_run(as_tenant(
                    "hog",
                    pb::CancelRunRequest {
                        run_id: r.id,
                        reason: "test over".into(),
                    },
                ))
                .await;
        }
    }
    node.stop().await;
}

/// The expensive-call limit cannot be bypassed by naming a different
/// tenant per call (issue 12 decision: per tenant and per connection).
/// Probe: 40 concurrent PreviewSchedule calls (20 x-tenant-id values), all
/// accepted; the other tenant's one-second binding lagged up to 0.5 s and
/// health checks took up to 0.86 s.
#[tokio::test]
async fn expensive_calls_are_bounded_per_connection_too() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-costly").await;
    let minutes: Vec<String> = (0..60).map(|i| i.to_string()).collect();
    let hours: Vec<String> = (0..24).map(|i| i.to_string()).collect();
    let expr = format!("0-59 {} {} * * *", minutes.join(","), hours.join(","));
    assert!(expr.len() <= 256);
    let mut calls = Vec::new();
    for i in 0..24 {
        let mut client = node.definitions();
        let schedule = cron(&expr, "UTC");
        calls.push(tokio::spawn(async move {
            client
                .preview_schedule(as_tenant(
                    &format!("t{i}"),
                    pb::PreviewScheduleRequest {
                        schedule: Some(schedule),
                        count: 1000,
                        after: None,
                    },
                ))
                .await
                .map(|_| ())
        }));
    }
    let mut exhausted = 0;
    for c in calls {
        match c.await.expect("join") {
            Ok(()) => {}
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("{:?} {}", e.code(), e.message()),
        }
    }
    assert!(
        exhausted > 0,
        "24 concurrent expensive previews on one connection, one per x-tenant-id, were all admitted"
    );
    node.stop().await;
}

/// Cron schedules compute up to 9999 like the calendar kinds do (or the
/// API refuses what it cannot compute). Probe: PreviewSchedule of
/// `0 0 1 1 *` after 5000-06-01 answered no fire times (yearly answered
/// 5001-01-01...), and a cron binding with start_time in 9899 was accepted
/// with no next_run_time (it silently never fires).
#[tokio::test]
async fn cron_schedules_compute_past_year_5000() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-cron-5000").await;
    // 6000-06-01T00:00:00Z
    let after = 127_174_377_600;
    let fires = node
        .definitions()
        .preview_schedule(as_tenant(
            "t1",
            pb::PreviewScheduleRequest {
                schedule: Some(cron("0 0 1 1 *", "UTC")),
                count: 2,
                after: Some(ts(after, 0)),
            },
        ))
        .await
        .map(|r| r.into_inner().fire_times);
    match fires {
        Ok(f) => assert_eq!(
            f.iter().map(|f| f.local_time.clone()).collect::<Vec<_>>(),
            ["6001-01-01T00:00:00+00:00", "6002-01-01T00:00:00+00:00"]
        ),
        Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message()),
    }
    node.stop().await;
}

/// ListAuditEvents `method` is "only this method": `%` and `_` are not
/// wildcards. Probe: `method: "%"` listed every event, `"C%g"` every
/// CreateBinding.
#[tokio::test]
async fn audit_method_filter_is_not_a_pattern() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-audit-like").await;
    define_and_bind(&node, "t1", event_def("ev", manual())).await;
    for pattern in ["%", "C%g", "_reateBinding"] {
        let events = node
            .admin()
            .list_audit_events(as_tenant(
                "",
                pb::ListAuditEventsRequest {
                    method: pattern.into(),
                    page_size: 100,
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner().events);
        match events {
            Ok(ev) => assert!(
                ev.is_empty(),
                "method {pattern:?} matched {:?}",
                ev.iter().map(|e| &e.method).collect::<Vec<_>>()
            ),
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message()),
        }
    }
    node.stop().await;
}

/// Error messages quote at most a short prefix (40 characters, common.proto)
/// of an offending value. Probe: a 1000-byte definition name, tenant_id or
/// x-tenant-id came back with about 600 characters of it.
#[tokio::test]
async fn errors_quote_only_a_short_prefix() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-quote").await;
    let long = "a".repeat(1000);
    let mut errors = Vec::new();
    errors.push(
        node.definitions()
            .get_definition(as_tenant(
                "",
                pb::GetDefinitionRequest { name: long.clone() },
            ))
            .await
            .expect_err("1000-byte name"),
    );
    errors.push(
        node.admin()
            .get_tenant_quota(as_tenant(
                "",
                pb::GetTenantQuotaRequest {
                    tenant_id: long.clone(),
                },
            ))
            .await
            .expect_err("1000-byte tenant_id"),
    );
    errors.push(
        node.bindings()
            .list_bindings(as_tenant(&long, pb::ListBindingsRequest::default()))
            .await
            .expect_err("1000-byte x-tenant-id"),
    );
    for e in errors {
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            !e.message().contains(&"a".repeat(100)),
            "quotes {} bytes: {}…",
            e.message().len(),
            &e.message()[..80]
        );
    }
    node.stop().await;
}

/// Backfilled runs of one tenant may not starve another tenant's schedule.
/// Probe: 16 BackfillRuns calls (10 000 fire times each, on `event`
/// bindings) queued 160 000 runs; for the next minute another
/// tenant's one-second `/bin/true` binding started its runs 2-3 s late and
/// half of its fires were SKIPPED "overlap" (and an `event` binding of a
/// third tenant lagged up to 0.7 s, missing fires).
///
/// Causes found: the 16 backfill calls held every database connection of
/// the node, so the scheduler and the claim waited for one (now the engine
/// has its own pool); each fire of a backfilled binding read its whole
/// backlog to apply the overlap policy (now two index probes); and plans
/// made from statistics stale after the burst of inserts turned the claim's
/// primary-key lookups into a scan of the whole queue (now forced probes).
#[tokio::test]
async fn backfills_of_one_tenant_do_not_starve_another_tenants_schedule() {
    let db = TestDb::alone().await;
    let node = TestNode::start(&db, "probe-backfill-fair").await;
    create_definition(&node, event_def("ev", every(1)))
        .await
        .expect("definition");
    // Two bystanders: a command every second (claims, a process each; ALLOW,
    // so a process slowed by a loaded machine delays no later fire) and an
    // `event` binding every second (fired by the scheduler pass itself).
    let victim = define_and_bind(
        &node,
        "victim",
        pb::TaskDefinition {
            overlap_policy: pb::OverlapPolicy::Allow as i32,
            ..sh_def("victim", "true", every(1))
        },
    )
    .await;
    let ticker = define_and_bind(&node, "ticker", event_def("tick", every(1))).await;
    runs_until(&node, "victim", &victim.id, WAIT, "victim fires", |rs| {
        rs.iter().any(|r| r.state == pb::RunState::Succeeded as i32)
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let mut calls = Vec::new();
    for i in 0..16 {
        let tenant = format!("hog{i}");
        let b = create_binding(
            &node,
            &tenant,
            pb::Binding {
                definition: "ev".into(),
                ..Default::default()
            },
        )
        .await;
        // Each flooding tenant is a client of its own (one connection may
        // have only 2 BackfillRuns calls at once).
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", node.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut runs = pb::run_service_client::RunServiceClient::new(channel);
        calls.push(tokio::spawn(async move {
            runs.backfill_runs(as_tenant(
                &tenant,
                pb::BackfillRunsRequest {
                    binding_id: b.id,
                    start_time: Some(ts(now - 9_999, 0)),
                    end_time: Some(ts(now - 1, 0)),
                    dry_run: false,
                },
            ))
            .await
        }));
    }
    for c in calls {
        c.await.expect("join").expect("backfill");
    }
    let from = now + 1;
    // The window the bystanders' fires are measured over while the
    // backlog drains: real firing time, not a wait for something.
    tokio::time::sleep(Duration::from_secs(15)).await;
    for (tenant, id) in [("victim", &victim.id), ("ticker", &ticker.id)] {
        let runs = runs_of(&node, tenant, id).await;
        let mut lags = Vec::new();
        let mut missed = Vec::new();
        for r in runs
            .iter()
            .filter(|r| r.scheduled_time.is_some_and(|t| t.seconds >= from))
        {
            let s = r.scheduled_time.unwrap_or_default();
            match r.start_time {
                Some(st) => lags.push(
                    (st.seconds - s.seconds) * 1000 + i64::from((st.nanos - s.nanos) / 1_000_000),
                ),
                None if r.state == pb::RunState::Skipped as i32 => {
                    missed.push((s.seconds, r.reason.clone()))
                }
                None => {}
            }
        }
        lags.sort_unstable();
        let pct = |p: usize| lags.get((lags.len() * p / 100).min(lags.len().saturating_sub(1)));
        eprintln!(
            "{tenant} fire lag while backfills drained: n={} p50={:?} ms p99={:?} ms max={:?} ms",
            lags.len(),
            pct(50),
            pct(99),
            lags.last()
        );
        // The defect skipped half the fires; one skipped fire in the 15 s
        // is a single pass that a loaded two-core machine held up past the
        // one-second period (seen once in a full CI run on a slow machine,
        // with every other fire of both bindings on time).
        assert!(
            missed.len() <= 1,
            "{tenant}'s fires skipped while backfills drained: {missed:?}"
        );
        assert!(
            lags.len() >= 10,
            "{tenant}'s binding started {} runs in 15 s",
            lags.len()
        );
        // The ≤ 100 ms p99 target is measured by sked-bench (a timed test
        // flakes on a shared machine). The defect this guards was
        // systematic (every start 1-3 s late): the median bounds it and
        // stays clear of a busy machine's spikes.
        assert!(
            pct(50).is_some_and(|&m| m < 1000),
            "{tenant}'s runs started a median {:?} ms late: {lags:?}",
            pct(50)
        );
    }
    node.stop().await;
}

/// The overlap probes of a firing pass read a handful of rows whatever a
/// binding's backlog and whatever the statistics say. Probe (the test
/// above, on a slower machine): with statistics from before a backfill of
/// 160 000 runs, the planner read all of `runs` once per probed binding
/// (or every queued run, by `runs_queued`): 0.4-2.2 s per pass, and every
/// fire of the pass late. Here the statistics are taken while `runs` is
/// empty, autovacuum is off for it, and 100 000 queued runs are planted
/// after: the probes must still give the right answers reading fewer than
/// 1 000 rows. (Planted this way, the planner already picks the indexes
/// without the probes turning sequential scans off; the test above is the
/// one that failed without that.)
#[tokio::test]
async fn overlap_probes_read_no_backlog_whatever_the_statistics() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    sked::db::migrate(&pool).await.expect("migrate");
    let (busy, idle) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let plant = |binding: uuid::Uuid, state: &'static str, n: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state,
                                   scheduled_time, create_time, handler, params, not_before)
                 SELECT gen_random_uuid(), 't', $1, 'd', 'BACKFILL', $2,
                        now() - g * interval '1 s', now(), '{\"kind\": \"event\"}', '{}', now()
                 FROM generate_series(1, $3::bigint) AS g",
            )
            .bind(binding)
            .bind(state)
            .bind(n)
            .execute(&pool)
            .await
            .expect("plant runs");
        }
    };
    sqlx::query("ALTER TABLE runs SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .expect("autovacuum off");
    sqlx::query("ANALYZE runs")
        .execute(&pool)
        .await
        .expect("analyze");
    plant(idle, "SUCCEEDED", 200).await;
    plant(busy, "QUEUED", 100_000).await;
    plant(idle, "RUNNING", 1).await;

    let mut tx = pool.begin().await.expect("begin");
    let rows_read = async |tx: &mut sqlx::PgConnection| -> i64 {
        sqlx::query_scalar(
            // Rows of runs this transaction read: by sequential scans, and
            // fetched from the table by index scans (a walk of runs_queued
            // fetches every queued run to test its binding).
            "SELECT coalesce((SELECT seq_tup_read + coalesce(idx_tup_fetch, 0)
                              FROM pg_stat_xact_user_tables WHERE relname = 'runs'), 0)::bigint",
        )
        .fetch_one(tx)
        .await
        .expect("rows read")
    };
    let before: i64 = rows_read(&mut tx).await;
    let mut state = sked::db::runs::run_active_state(&mut tx, &[busy, idle])
        .await
        .expect("active state");
    state.sort_by_key(|a| a.binding_id != busy);
    assert_eq!(
        state
            .iter()
            .map(|a| (a.binding_id, a.running, a.waiting))
            .collect::<Vec<_>>(),
        vec![(busy, false, true), (idle, true, false)]
    );
    let mut counts = sked::db::runs::run_active_counts(&mut tx, &[busy, idle], &[5, 5])
        .await
        .expect("active counts");
    counts.sort_by_key(|(b, _)| *b != busy);
    assert_eq!(counts, vec![(busy, 5), (idle, 1)]);
    let read = rows_read(&mut tx).await - before;
    assert!(
        read < 1_000,
        "the probes read {read} rows of runs (100 000 queued)"
    );
    tx.rollback().await.expect("rollback");
}

/// A command definition inside every per-field bound (args ≤ 256 × 16 KiB,
/// env ≤ 128 × 16 KiB) must be able to start: either its arguments and
/// environment together are bounded below what exec accepts, or its runs
/// start. Probe: 128 env values of 16 KiB (or 200 args of 16 KiB) were
/// accepted and every run ended FAILED `failed to start "/bin/true":
/// Argument list too long (os error 7)`.
#[tokio::test]
async fn accepted_command_arguments_fit_what_exec_accepts() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-argmax").await;
    let mut def = command_def("big-env", "true", &[], manual());
    if let Some(pb::task_definition::Handler::Command(c)) = &mut def.handler {
        c.env = (0..128)
            .map(|i| (format!("K{i}"), "v".repeat(16 * 1024)))
            .collect();
    }
    match create_definition(&node, def).await {
        Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message()),
        Ok(_) => {
            let b = create_binding(
                &node,
                "t1",
                pb::Binding {
                    definition: "big-env".into(),
                    ..Default::default()
                },
            )
            .await;
            let run = trigger(&node, "t1", &b.id).await;
            let run = wait_terminal(&node, "t1", &run.id).await;
            assert_eq!(
                run.state,
                pb::RunState::Succeeded as i32,
                "an accepted definition's run: {:?}",
                run.error
            );
        }
    }
    node.stop().await;
}

/// Deleted means stopped: after DeleteBinding (which then answers
/// NOT_FOUND for the binding), RetryRun of one of its old runs may not
/// start the deleted binding's command again. Probe: RetryRun answered OK
/// and the new attempt ran to SUCCEEDED for a binding that no longer
/// exists (also after a forced DeleteDefinition: the old command ran).
#[tokio::test]
async fn a_deleted_bindings_runs_cannot_be_retried_into_running() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-retry-deleted").await;
    let b = define_and_bind(&node, "t1", sh_def("once", "true", manual())).await;
    let first = trigger(&node, "t1", &b.id).await;
    wait_terminal(&node, "t1", &first.id).await;
    node.bindings()
        .delete_binding(as_tenant(
            "t1",
            pb::DeleteBindingRequest { binding_id: b.id },
        ))
        .await
        .expect("delete binding");
    match node
        .runs()
        .retry_run(as_tenant("t1", pb::RetryRunRequest { run_id: first.id }))
        .await
    {
        Err(e) => assert!(
            matches!(e.code(), Code::NotFound | Code::FailedPrecondition),
            "{:?} {}",
            e.code(),
            e.message()
        ),
        Ok(r) => {
            let r = wait_terminal(&node, "t1", &r.into_inner().id).await;
            assert!(
                r.start_time.is_none(),
                "a retry of a deleted binding's run started and ended {:?}",
                pb::RunState::try_from(r.state)
            );
        }
    }
    node.stop().await;
}

/// Sends one raw gRPC request (`body` as is, no framing added) to `path`;
/// returns grpc-status and grpc-message from the headers of a
/// trailers-only answer or from the trailers.
async fn raw_http_call(node: &TestNode, path: &str, body: Vec<u8>) -> (String, String) {
    use http_body_util::BodyExt;
    use tonic::codegen::{Service, http};
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-tenant-id", "t1")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            tonic::codegen::Bytes::from(body),
        )))
        .expect("request");
    let mut ch = node.channel.clone();
    std::future::poll_fn(|cx| ch.poll_ready(cx))
        .await
        .expect("ready");
    let resp = ch.call(req).await.expect("an HTTP answer");
    let (parts, body) = resp.into_parts();
    let trailers = body.collect().await.expect("body").trailers().cloned();
    let get = |k: &str| {
        parts
            .headers
            .get(k)
            .or_else(|| trailers.as_ref().and_then(|t| t.get(k)))
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

/// A request without any message (an empty body: the client sent no
/// length-prefixed frame) is malformed input, INVALID_ARGUMENT like a
/// truncated frame — never INTERNAL. Probe: every unary and server-streaming
/// method, health included, answered grpc-status 13 "Missing request
/// message." (a 3-byte body answered 3 "Unexpected EOF").
#[tokio::test]
async fn a_request_without_a_message_is_invalid_argument() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "probe-empty-body").await;
    for path in [
        "/sked.v1.BindingService/ListBindings",
        "/sked.v1.DefinitionService/GetDefinition",
        "/sked.v1.LogService/TailRun",
        "/sked.v1.LogService/WatchEvents",
        "/grpc.health.v1.Health/Check",
    ] {
        let (status, message) = raw_http_call(&node, path, Vec::new()).await;
        assert_eq!(
            status,
            (Code::InvalidArgument as i32).to_string(),
            "{path} with an empty body: grpc-status {status} {message}"
        );
    }
    node.stop().await;
}
