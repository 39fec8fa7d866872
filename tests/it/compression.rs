//! Compressed clients (issue 12, class 8): a client that compresses its
//! requests (gzip, as grpcio/Java/Go clients do when enabled, or zstd) is
//! served by every service — all of sked.v1, health and both reflection
//! versions — and gets compressed responses; a compressed message that
//! inflates past the decoded-size cap is refused and the node keeps serving.

use std::collections::BTreeSet;

use crate::common::*;
use sked::proto::v1 as pb;
use sked::transport::MAX_DECODED_MESSAGE_BYTES;
use tonic::Code;
use tonic::codec::CompressionEncoding::{self, Gzip, Zstd};
use tonic::transport::Channel;

/// The `grpc-encoding` a response was sent with.
fn encoding<T>(r: &tonic::Response<T>) -> Option<String> {
    r.metadata()
        .get("grpc-encoding")
        .map(|v| v.to_str().unwrap().to_string())
}

macro_rules! compressed {
    ($client:ty, $ch:expr, $enc:expr) => {
        <$client>::new($ch.clone())
            .send_compressed($enc)
            .accept_compressed($enc)
    };
}

/// Asks reflection (v1 or v1alpha, by module) for its services through a
/// compressed client; returns their names and the response's encoding.
macro_rules! list_services {
    ($pb:path, $ch:expr) => {{
        use $pb as r;
        let mut client = r::server_reflection_client::ServerReflectionClient::new($ch.clone())
            .send_compressed(Gzip)
            .accept_compressed(Gzip);
        let req = r::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let resp = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("reflection over gzip");
        let enc = encoding(&resp);
        let msg = resp
            .into_inner()
            .message()
            .await
            .expect("reflection answer")
            .expect("one answer");
        let Some(r::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            msg.message_response
        else {
            panic!("not a ListServices answer: {msg:?}");
        };
        let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
        (names, enc)
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_client_is_served_by_every_service_with_gzip_responses() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let ch = &node.channel;
    let gzip = Some("gzip".to_string());
    let mut called = BTreeSet::new();

    // DefinitionService: a large, compressible description round-trips.
    let description = "compress me ".repeat(340); // within the 4 KiB bound
    let mut defs = compressed!(
        pb::definition_service_client::DefinitionServiceClient<Channel>,
        ch,
        Gzip
    );
    let mut def = sh_def("zipped", "echo hello compressed", manual());
    def.description = description.clone();
    let r = defs
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(def),
        })
        .await
        .expect("CreateDefinition over gzip");
    assert_eq!(encoding(&r), gzip, "CreateDefinition response encoding");
    let r = defs
        .get_definition(pb::GetDefinitionRequest {
            name: "zipped".into(),
        })
        .await
        .expect("GetDefinition over gzip");
    assert_eq!(encoding(&r), gzip);
    assert_eq!(r.into_inner().description, description);
    called.insert("sked.v1.DefinitionService");

    // BindingService.
    let mut bindings = compressed!(
        pb::binding_service_client::BindingServiceClient<Channel>,
        ch,
        Gzip
    );
    let r = bindings
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "zipped".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("CreateBinding over gzip");
    assert_eq!(encoding(&r), gzip);
    let binding = r.into_inner();
    let r = bindings
        .list_bindings(as_tenant("acme", pb::ListBindingsRequest::default()))
        .await
        .expect("ListBindings over gzip");
    assert_eq!(encoding(&r), gzip);
    assert_eq!(r.into_inner().bindings.len(), 1);
    called.insert("sked.v1.BindingService");

    // LogService's WatchEvents, open before the run: a server stream
    // compressed message by message, its events read below.
    let mut watcher = compressed!(pb::log_service_client::LogServiceClient<Channel>, ch, Gzip);
    let watch = watcher
        .watch_events(as_tenant(
            "acme",
            pb::WatchEventsRequest {
                kinds: vec![pb::EventKind::Log as i32],
                ..Default::default()
            },
        ))
        .await
        .expect("WatchEvents over gzip");
    assert_eq!(encoding(&watch), gzip);
    let mut watch = watch.into_inner();

    // RunService.
    let mut runs = compressed!(pb::run_service_client::RunServiceClient<Channel>, ch, Gzip);
    let r = runs
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: binding.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("TriggerRun over gzip");
    assert_eq!(encoding(&r), gzip);
    let run = r.into_inner();
    called.insert("sked.v1.RunService");

    // LogService: a server stream, compressed message by message.
    let mut logs = compressed!(pb::log_service_client::LogServiceClient<Channel>, ch, Gzip);
    let r = logs
        .tail_run(as_tenant(
            "acme",
            pb::TailRunRequest {
                run_id: run.id.clone(),
                after_seq: 0,
                follow: true,
            },
        ))
        .await
        .expect("TailRun over gzip");
    assert_eq!(encoding(&r), gzip);
    let events = tokio::time::timeout(WAIT, drain(r.into_inner()))
        .await
        .expect("the run ends");
    assert_eq!(log_lines(&events), vec!["hello compressed".to_string()]);
    let watched = tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("the log line is watched")
        .expect("the stream is open")
        .expect("an item");
    let line = watched.event.expect("an event");
    assert_eq!(line.run_id, run.id);
    assert_eq!(log_lines(&[line]), vec!["hello compressed".to_string()]);
    let r = logs
        .list_run_events(as_tenant(
            "acme",
            pb::ListRunEventsRequest {
                run_id: run.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("ListRunEvents over gzip");
    assert_eq!(encoding(&r), gzip);
    assert_eq!(r.into_inner().events.len(), events.len());
    called.insert("sked.v1.LogService");

    let r = runs
        .get_run(as_tenant(
            "acme",
            pb::GetRunRequest {
                run_id: run.id.clone(),
            },
        ))
        .await
        .expect("GetRun over gzip");
    assert_eq!(r.into_inner().state, pb::RunState::Succeeded as i32);

    // AdminService.
    let mut admin = compressed!(
        pb::admin_service_client::AdminServiceClient<Channel>,
        ch,
        Gzip
    );
    let r = admin
        .get_tenant_quota(pb::GetTenantQuotaRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("GetTenantQuota over gzip");
    assert_eq!(encoding(&r), gzip);
    assert_eq!(r.into_inner().tenant_id, "acme");
    called.insert("sked.v1.AdminService");

    // WorkerService: a heartbeat of a lease nobody holds (none is valid).
    let mut workers = compressed!(
        pb::worker_service_client::WorkerServiceClient<Channel>,
        ch,
        Gzip
    );
    let r = workers
        .heartbeat(pb::HeartbeatRequest {
            lease_tokens: vec![uuid::Uuid::new_v4().to_string()],
        })
        .await
        .expect("Heartbeat over gzip");
    assert_eq!(encoding(&r), gzip);
    assert!(r.into_inner().valid.is_empty());
    called.insert("sked.v1.WorkerService");

    // NotificationService.
    let mut notify = compressed!(
        pb::notification_service_client::NotificationServiceClient<Channel>,
        ch,
        Gzip
    );
    let r = notify
        .list_notifications(as_tenant(
            "acme",
            pb::ListNotificationsRequest {
                binding_id: binding.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("ListNotifications over gzip");
    assert_eq!(encoding(&r), gzip);
    assert!(r.into_inner().notifications.is_empty());
    called.insert("sked.v1.NotificationService");

    // Health.
    let mut health = compressed!(
        tonic_health::pb::health_client::HealthClient<Channel>,
        ch,
        Gzip
    );
    let r = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("Health/Check over gzip");
    assert_eq!(encoding(&r), gzip);
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Reflection, both versions; and every sked.v1 service it lists was
    // called above (a new service must be added to this test).
    let (v1, enc) = list_services!(tonic_reflection::pb::v1, ch);
    assert_eq!(enc, gzip, "reflection v1 response encoding");
    let (v1alpha, enc) = list_services!(tonic_reflection::pb::v1alpha, ch);
    assert_eq!(enc, gzip, "reflection v1alpha response encoding");
    // Each version lists itself (tonic-reflection registers only its own).
    assert!(v1.contains("grpc.reflection.v1.ServerReflection"), "{v1:?}");
    assert!(
        v1alpha.contains("grpc.reflection.v1alpha.ServerReflection"),
        "{v1alpha:?}"
    );
    let without_reflection = |l: &BTreeSet<String>| -> BTreeSet<String> {
        l.iter()
            .filter(|s| !s.starts_with("grpc.reflection."))
            .cloned()
            .collect()
    };
    assert_eq!(without_reflection(&v1), without_reflection(&v1alpha));
    assert!(v1.contains("grpc.health.v1.Health"), "{v1:?}");
    let sked: BTreeSet<&str> = v1
        .iter()
        .map(String::as_str)
        .filter(|s| s.starts_with("sked."))
        .collect();
    assert_eq!(sked, called, "every sked service was called compressed");

    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zstd_client_is_served_with_zstd_responses() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let enc: CompressionEncoding = Zstd;
    let mut defs = compressed!(
        pb::definition_service_client::DefinitionServiceClient<Channel>,
        node.channel,
        enc
    );
    let mut def = sh_def("zstd", "true", manual());
    def.description = "zstandard ".repeat(400);
    let r = defs
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(def.clone()),
        })
        .await
        .expect("CreateDefinition over zstd");
    assert_eq!(encoding(&r), Some("zstd".into()));
    let got = defs
        .get_definition(pb::GetDefinitionRequest {
            name: "zstd".into(),
        })
        .await
        .expect("GetDefinition over zstd");
    assert_eq!(encoding(&got), Some("zstd".into()));
    assert_eq!(got.into_inner().description, def.description);

    let mut health = compressed!(
        tonic_health::pb::health_client::HealthClient<Channel>,
        node.channel,
        enc
    );
    let r = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("Health/Check over zstd");
    assert_eq!(encoding(&r), Some("zstd".into()));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_message_inflating_past_the_cap_is_refused_and_the_node_keeps_serving() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;

    for (i, enc) in [Gzip, Zstd].into_iter().enumerate() {
        // Twice the cap of one repeated byte: the client compresses it to a few
        // KiB (gzip ~1:1000, zstd more), far below the cap on the wire, so
        // only the decompressed-size check can stop it.
        let mut def = sh_def("bomb", "true", manual());
        def.description = "a".repeat(2 * MAX_DECODED_MESSAGE_BYTES);
        let mut defs = compressed!(
            pb::definition_service_client::DefinitionServiceClient<Channel>,
            node.channel,
            enc
        );
        let err = defs
            .create_definition(pb::CreateDefinitionRequest {
                definition: Some(def),
            })
            .await
            .expect_err("a message inflating past the cap is refused");
        assert!(
            matches!(err.code(), Code::ResourceExhausted | Code::InvalidArgument),
            "{enc:?}: {err:?}"
        );
        // Refused by the server's decompression limit, which it names.
        assert!(
            err.message()
                .contains(&MAX_DECODED_MESSAGE_BYTES.to_string()),
            "{enc:?}: {err:?}"
        );
        assert!(
            err.message().len() <= 1024,
            "short error message: {}",
            err.message().len()
        );

        // The same node and connection go on serving, compressed or not.
        let ok = defs
            .create_definition(pb::CreateDefinitionRequest {
                definition: Some(sh_def(&format!("after-{i}"), "true", manual())),
            })
            .await
            .expect("a normal compressed call after the bomb");
        assert_eq!(ok.into_inner().name, format!("after-{i}"));
    }
    let r = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "bomb".into(),
        })
        .await
        .expect_err("the bomb was not stored");
    assert_eq!(r.code(), Code::NotFound);
    node.stop().await;
}

/// A gRPC frame: compressed-flag byte, big-endian length, payload.
fn frame(flag: u8, declared_len: usize, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend_from_slice(&(declared_len as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends one raw gRPC request (`body` as is) to `path` with the given
/// `grpc-encoding` header (none when empty); returns the answer's
/// grpc-status and grpc-message (percent-encoded), from the headers of a
/// trailers-only answer or from the trailers.
async fn raw_call(ch: &Channel, path: &str, encoding: &str, body: Vec<u8>) -> (String, String) {
    use http_body_util::BodyExt;
    use tonic::codegen::{Service, http};
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if !encoding.is_empty() {
        req = req.header("grpc-encoding", encoding);
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            tonic::codegen::Bytes::from(body),
        )))
        .unwrap();
    let mut ch = ch.clone();
    std::future::poll_fn(|cx| ch.poll_ready(cx)).await.unwrap();
    let resp = ch.call(req).await.expect("an HTTP answer");
    let (parts, body) = resp.into_parts();
    let trailers = body.collect().await.expect("body").trailers().cloned();
    let get = |k: &str| {
        parts
            .headers
            .get(k)
            .or_else(|| trailers.as_ref().and_then(|t| t.get(k)))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_does_not_decompress_is_invalid_argument_and_the_node_keeps_serving() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let garbage = b"\x1f\x8b\x08\x00 not really deflate data";
    let cases: [(&str, &str, Vec<u8>); 5] = [
        ("corrupt gzip", "gzip", frame(1, garbage.len(), garbage)),
        ("corrupt zstd", "zstd", frame(1, garbage.len(), garbage)),
        (
            "compressed flag without grpc-encoding",
            "",
            frame(1, 3, b"abc"),
        ),
        ("compressed flag 7", "gzip", frame(7, 3, b"abc")),
        (
            "frame shorter than its length",
            "gzip",
            frame(0, 100, b"abc"),
        ),
    ];
    for path in [
        "/sked.v1.DefinitionService/GetDefinition",
        "/sked.v1.LogService/TailRun",
        "/sked.v1.LogService/WatchEvents",
        "/grpc.health.v1.Health/Check",
    ] {
        for (what, encoding, body) in &cases {
            let (status, message) = raw_call(&node.channel, path, encoding, body.clone()).await;
            assert_eq!(
                status, "3",
                "{what} on {path}: INVALID_ARGUMENT, got {status} {message:?}"
            );
            assert!(
                !message.is_empty() && message.len() <= 1024,
                "{what}: {message:?}"
            );
        }
    }
    // An encoding sked does not offer is UNIMPLEMENTED, as gRPC specifies.
    let (status, _) = raw_call(
        &node.channel,
        "/grpc.health.v1.Health/Check",
        "br",
        frame(1, 3, b"abc"),
    )
    .await;
    assert_eq!(status, "12");
    // The same connection serves well-formed compressed calls afterwards.
    let mut health = compressed!(
        tonic_health::pb::health_client::HealthClient<Channel>,
        node.channel,
        Gzip
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("a well-formed gzip call after the bad ones");
    node.stop().await;
}
