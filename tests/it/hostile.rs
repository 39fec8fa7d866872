//! Hostile and careless input, driven from the descriptor set: every field
//! of every request of every `sked.v1` method gets boundary and
//! out-of-range values (strings with NUL and past their bound, timestamps and
//! durations outside the protobuf range, unknown enum numbers, NaN, params
//! too deep or too large, lists too long, malformed bytes). Nothing may end
//! `INTERNAL` or `UNKNOWN`, no error message may exceed 1 KiB, out-of-range
//! values are `INVALID_ARGUMENT` naming the field, accepted timestamps read
//! back unchanged (µs), and another tenant's binding keeps firing throughout.
//! Fields added later are covered without new test code.

use std::time::{Duration, Instant};

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};
use sked::grpc::boundary::{self, MAX_DURATION_SECS, MAX_TIMESTAMP_SECS, MIN_TIMESTAMP_SECS};
use sked::proto::v1 as pb;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::*;

struct Method {
    path: String,
    input: MessageDescriptor,
    streaming: bool,
}

fn methods() -> Vec<Method> {
    boundary::pool()
        .services()
        .filter(|s| s.full_name().starts_with("sked.v1."))
        .flat_map(|s| {
            s.methods()
                .map(|m| Method {
                    path: format!("/{}/{}", s.full_name(), m.name()),
                    input: m.input(),
                    streaming: m.is_server_streaming(),
                })
                .collect::<Vec<_>>()
        })
        .filter(|m| !m.input.full_name().is_empty())
        .collect()
}

/// Calls `m` with `body` as tenant `tenant`; the first response message.
async fn call(ch: &Channel, m: &Method, tenant: &str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("x-tenant-id", tenant.parse().expect("ascii"));
    let path = m.path.parse().expect("path");
    if m.streaming {
        let mut s = grpc
            .server_streaming(req, path, RawCodec)
            .await?
            .into_inner();
        match tokio::time::timeout(Duration::from_millis(200), s.message()).await {
            Ok(r) => Ok(r?.unwrap_or_default()),
            Err(_) => Ok(Vec::new()), // a live stream that is waiting: accepted
        }
    } else {
        Ok(grpc.unary(req, path, RawCodec).await?.into_inner())
    }
}

/// A leaf of a request: the path of fields to it (singular messages
/// only on the way), and its field.
#[derive(Clone)]
struct Leaf {
    path: Vec<FieldDescriptor>,
}

impl Leaf {
    fn field(&self) -> &FieldDescriptor {
        self.path.last().expect("non-empty")
    }
    fn name(&self) -> String {
        self.path
            .iter()
            .map(|f| f.name().to_string())
            .collect::<Vec<_>>()
            .join(".")
    }
}

const WKT: [&str; 3] = [
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.Struct",
];

fn leaves(desc: &MessageDescriptor, prefix: Vec<FieldDescriptor>, out: &mut Vec<Leaf>) {
    if prefix.len() > 5 {
        return;
    }
    for f in desc.fields() {
        let mut path = prefix.clone();
        path.push(f.clone());
        match f.kind() {
            Kind::Message(m) if WKT.contains(&m.full_name()) => out.push(Leaf { path }),
            Kind::Message(m) if !f.is_list() && !f.is_map() => leaves(&m, path, out),
            Kind::Message(_) => {} // repeated messages: none in requests today
            _ => out.push(Leaf { path }),
        }
    }
}

/// `base` with the leaf set to `v` (a list or map leaf gets `v` as its one item).
fn with_leaf(base: &DynamicMessage, leaf: &Leaf, v: Value) -> DynamicMessage {
    let mut msg = base.clone();
    set(&mut msg, &leaf.path, v);
    msg
}

fn set(msg: &mut DynamicMessage, path: &[FieldDescriptor], v: Value) {
    let f = &path[0];
    if path.len() == 1 {
        let whole = matches!(
            (&v, f.is_list(), f.is_map()),
            (Value::List(_), true, _) | (Value::Map(_), _, true)
        );
        let v = if whole {
            v
        } else if f.is_map() {
            let key = MapKey::String("k".into());
            Value::Map([(key, v)].into_iter().collect())
        } else if f.is_list() {
            Value::List(vec![v])
        } else {
            v
        };
        msg.set_field(f, v);
        return;
    }
    let Kind::Message(m) = f.kind() else { return };
    let mut child = match msg.get_field(f).as_ref() {
        Value::Message(c) => c.clone(),
        _ => DynamicMessage::new(m),
    };
    set(&mut child, &path[1..], v);
    msg.set_field(f, Value::Message(child));
}

fn wkt(name: &str, fields: &[(&str, Value)]) -> Value {
    let d = boundary::pool().get_message_by_name(name).expect("wkt");
    let mut m = DynamicMessage::new(d);
    for (k, v) in fields {
        m.set_field_by_name(k, v.clone());
    }
    Value::Message(m)
}

fn timestamp(seconds: i64, nanos: i32) -> Value {
    wkt(
        "google.protobuf.Timestamp",
        &[
            ("seconds", Value::I64(seconds)),
            ("nanos", Value::I32(nanos)),
        ],
    )
}

fn duration(seconds: i64, nanos: i32) -> Value {
    wkt(
        "google.protobuf.Duration",
        &[
            ("seconds", Value::I64(seconds)),
            ("nanos", Value::I32(nanos)),
        ],
    )
}

/// A params Struct from JSON.
fn params(json: serde_json::Value) -> Value {
    let s = sked::grpc::convert::json_to_struct(&json).expect("object");
    let d = boundary::pool()
        .get_message_by_name("google.protobuf.Struct")
        .expect("Struct");
    Value::Message(DynamicMessage::decode(d, s.encode_to_vec().as_slice()).expect("decode"))
}

fn nested_json(depth: usize) -> serde_json::Value {
    let mut v = serde_json::json!(1);
    for _ in 0..depth {
        v = serde_json::json!({ "a": v });
    }
    v
}

/// Values a field must reject (with a label) and boundary values it may
/// accept, for `leaf`.
/// Labelled values for one leaf.
type Cases = Vec<(&'static str, Value)>;

fn values(leaf: &Leaf) -> (Cases, Cases) {
    let f = leaf.field();
    let mut bad = Vec::new();
    let mut edge = Vec::new();
    match f.kind() {
        Kind::String => {
            let name = if f.is_map() {
                format!("{}.value", f.full_name())
            } else {
                f.full_name().to_string()
            };
            let max = boundary::string_limit(&name);
            bad.push(("NUL", Value::String("a\0b".into())));
            bad.push(("over its bound", Value::String("x".repeat(max + 1))));
            bad.push(("1 MB", Value::String("y".repeat(1 << 20))));
            edge.push(("at its bound", Value::String("x".repeat(max))));
            edge.push(("empty", Value::String(String::new())));
            edge.push(("unicode", Value::String("é✓𝄞".into())));
        }
        Kind::Enum(e) => {
            bad.push(("unknown enum number", Value::EnumNumber(987_654)));
            for v in e.values() {
                edge.push(("a defined enum value", Value::EnumNumber(v.number())));
            }
        }
        Kind::Double => {
            bad.push(("NaN", Value::F64(f64::NAN)));
            bad.push(("infinity", Value::F64(f64::INFINITY)));
            edge.push(("huge", Value::F64(1e308)));
            edge.push(("negative", Value::F64(-1.0)));
        }
        Kind::Int32 => {
            edge.push(("i32::MAX", Value::I32(i32::MAX)));
            edge.push(("i32::MIN", Value::I32(i32::MIN)));
        }
        Kind::Int64 => {
            edge.push(("i64::MAX", Value::I64(i64::MAX)));
            edge.push(("i64::MIN", Value::I64(i64::MIN)));
        }
        Kind::Uint32 => {
            edge.push(("u32::MAX", Value::U32(u32::MAX)));
            edge.push(("zero", Value::U32(0)));
        }
        Kind::Uint64 => {
            edge.push(("u64::MAX", Value::U64(u64::MAX)));
            edge.push(("zero", Value::U64(0)));
        }
        Kind::Bool => {
            edge.push(("true", Value::Bool(true)));
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => {
                bad.push(("year 10000", timestamp(MAX_TIMESTAMP_SECS + 1, 0)));
                bad.push(("before year 1", timestamp(MIN_TIMESTAMP_SECS - 1, 0)));
                bad.push(("i64::MAX seconds", timestamp(i64::MAX, 0)));
                bad.push(("nanos 1e9", timestamp(0, 1_000_000_000)));
                bad.push(("negative nanos", timestamp(0, -1)));
                edge.push((
                    "9999-12-31T23:59:59.999999999Z",
                    timestamp(MAX_TIMESTAMP_SECS, 999_999_999),
                ));
                edge.push(("0001-01-01T00:00:00Z", timestamp(MIN_TIMESTAMP_SECS, 0)));
            }
            "google.protobuf.Duration" => {
                bad.push(("over 10 000 years", duration(MAX_DURATION_SECS + 1, 0)));
                bad.push(("i64::MAX seconds", duration(i64::MAX, 0)));
                bad.push(("mixed signs", duration(1, -5)));
                edge.push(("10 000 years", duration(MAX_DURATION_SECS, 0)));
                edge.push(("i32::MAX seconds", duration(i64::from(i32::MAX), 0)));
                edge.push(("negative", duration(-1, 0)));
                edge.push(("zero", duration(0, 0)));
                edge.push(("1 ns", duration(0, 1)));
            }
            "google.protobuf.Struct" => {
                bad.push(("33 levels", params(nested_json(33))));
                bad.push(("NUL in a key", params(serde_json::json!({"a\u{0}": 1}))));
                bad.push(("NUL in a value", params(serde_json::json!({"a": "b\u{0}"}))));
                bad.push((
                    "over 64 KiB",
                    params(serde_json::json!({"big": "z".repeat(70 * 1024)})),
                ));
                let mut nan = DynamicMessage::new(
                    boundary::pool()
                        .get_message_by_name("google.protobuf.Value")
                        .expect("Value"),
                );
                nan.set_field_by_name("number_value", Value::F64(f64::NAN));
                let mut s = DynamicMessage::new(m.clone());
                s.set_field_by_name(
                    "fields",
                    Value::Map(
                        [(MapKey::String("n".into()), Value::Message(nan))]
                            .into_iter()
                            .collect(),
                    ),
                );
                bad.push(("NaN", Value::Message(s)));
                edge.push(("32 levels", params(nested_json(32))));
                edge.push(("empty", params(serde_json::json!({}))));
            }
            _ => {}
        },
        _ => {}
    }
    (bad, edge)
}

/// Every method's request, every leaf, every value: the status classes
/// hold, and the node keeps serving and firing.
#[tokio::test]
async fn every_field_of_every_request_rejects_bad_values_by_name_and_never_fails_internally() {
    let db = TestDb::new().await;
    // ~1 800 calls in a few seconds from one tenant: past the per-tenant
    // change rate's burst, which would answer RESOURCE_EXHAUSTED before the
    // input is looked at. This test is about the input; the rates have
    // their own tests (rates.rs).
    let mut s = settings(&db, "hostile");
    s.tenant_changes_per_sec = 0;
    let node = TestNode::start_with(s).await;
    // Another tenant's one-second event binding fires all along.
    let canary = event_canary(&node, "canary").await;
    // Something for calls to find: a definition and a binding of the
    // hostile tenant (so handlers get past NOT_FOUND where they can).
    let own = define_and_bind(&node, "hostile", sh_def("target", "true", manual())).await;
    let started = Instant::now();

    let mut calls = 0usize;
    let mut failures = Vec::new();
    for m in methods() {
        let mut ls = Vec::new();
        leaves(&m.input, Vec::new(), &mut ls);
        let base = DynamicMessage::new(m.input.clone());
        for leaf in &ls {
            let (mut bad, mut edge) = values(leaf);
            // Output-only fields are ignored on input: any value is
            // accepted as long as nothing breaks.
            if leaf
                .path
                .iter()
                .any(|f| boundary::OUTPUT_ONLY.contains(&f.full_name()))
            {
                edge.append(&mut bad);
            }
            for (label, v) in bad {
                calls += 1;
                let body = with_leaf(&base, leaf, v).encode_to_vec();
                match call(&node.channel, &m, "hostile", body).await {
                    Err(s)
                        if s.code() == Code::InvalidArgument
                            && s.message().len() <= 1024
                            && (s.message().contains(leaf.path[0].name())
                                // params inside output-only fields nest
                                // deeper than the decoder takes
                                || (label == "33 levels"
                                    && s.message().starts_with("request: nests"))) => {}
                    other => failures.push(format!(
                        "{} {} ({label}): {:?}",
                        m.path,
                        leaf.name(),
                        other
                            .map(|_| "OK")
                            .map_err(|s| (s.code(), short(s.message())))
                    )),
                }
            }
            for (label, v) in edge {
                calls += 1;
                let body = with_leaf(&base, leaf, v).encode_to_vec();
                if let Err(s) = call(&node.channel, &m, "hostile", body).await
                    && (matches!(s.code(), Code::Internal | Code::Unknown)
                        || s.message().len() > 1024)
                {
                    failures.push(format!(
                        "{} {} ({label}): {:?} {}",
                        m.path,
                        leaf.name(),
                        s.code(),
                        short(s.message())
                    ));
                }
            }
        }
        // Lists and maps one item over their bound.
        for leaf in ls
            .iter()
            .filter(|l| l.field().is_list() || l.field().is_map())
        {
            let (_, edge) = values(leaf);
            let Some((_, item)) = edge.into_iter().next() else {
                continue;
            };
            let n = boundary::items_limit(leaf.field()) + 1;
            let v = if leaf.field().is_map() {
                Value::Map(
                    (0..n)
                        .map(|i| (MapKey::String(format!("k{i}")), item.clone()))
                        .collect(),
                )
            } else {
                Value::List(vec![item; n])
            };
            calls += 1;
            let body = with_leaf(&base, leaf, v).encode_to_vec();
            match call(&node.channel, &m, "hostile", body).await {
                Err(s) if s.code() == Code::InvalidArgument && s.message().len() <= 1024 => {}
                Err(s) if s.code() == Code::OutOfRange => {} // over 4 MiB in all
                other => failures.push(format!(
                    "{} {} ({n} items): {:?}",
                    m.path,
                    leaf.name(),
                    other
                        .map(|_| "OK")
                        .map_err(|s| (s.code(), short(s.message())))
                )),
            }
        }
        // Malformed bytes: garbage, a truncated message, invalid UTF-8.
        for (label, body) in [
            ("garbage", vec![0xff; 16]),
            ("truncated", vec![0x0a, 0x10, b'a']),
            ("invalid UTF-8", vec![0x0a, 0x02, 0xc3, 0x28]),
        ] {
            calls += 1;
            match call(&node.channel, &m, "hostile", body).await {
                Err(s) if s.code() == Code::InvalidArgument && s.message().len() <= 1024 => {}
                // A first field that is not a string/message may read the
                // bytes as something valid; that is fine if not internal.
                Ok(_) => {}
                Err(s) if !matches!(s.code(), Code::Internal | Code::Unknown) => {}
                other => failures.push(format!(
                    "{} ({label}): {:?}",
                    m.path,
                    other
                        .map(|_| "OK")
                        .map_err(|s| (s.code(), short(s.message())))
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {calls} calls broke the rules:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        calls > 500,
        "only {calls} calls: the descriptor walk found too little"
    );

    // Params nested past what the decoder takes are INVALID_ARGUMENT too.
    let deep = pb::TriggerRunRequest {
        binding_id: own.id.clone(),
        params: sked::grpc::convert::json_to_struct(&nested_json(60)),
        ..Default::default()
    };
    let s = node
        .runs()
        .trigger_run(as_tenant("hostile", deep))
        .await
        .expect_err("60 levels are refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // The canary fired every second while all this ran, and still does.
    let elapsed = started.elapsed().as_secs();
    let runs = runs_until(
        &node,
        "canary",
        &canary.id,
        Duration::from_secs(30),
        "canary fires",
        |rs| rs.len() as u64 >= elapsed + 2,
    )
    .await;
    let mut lags: Vec<i64> = runs
        .iter()
        .filter_map(|r| {
            let s = r.start_time.as_ref()?;
            let t = r.scheduled_time.as_ref()?;
            Some((s.seconds - t.seconds) * 1000 + i64::from(s.nanos - t.nanos) / 1_000_000)
        })
        .collect();
    lags.sort_unstable();
    let p99 = lags[(lags.len() * 99 / 100).min(lags.len() - 1)];
    eprintln!(
        "{calls} hostile calls in {elapsed} s; canary: {} runs, lag p99 {p99} ms",
        runs.len()
    );
    assert!(
        runs.iter()
            .all(|r| r.state == pb::RunState::Succeeded as i32),
        "every canary fire ran"
    );
    node.stop().await;
}

/// Accepted timestamps read back unchanged at microsecond precision, and a
/// binding holding the extremes neither breaks its own calls nor stops
/// another tenant's binding from firing.
#[tokio::test]
async fn accepted_extreme_timestamps_round_trip_and_nothing_stops_firing() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "extremes").await;
    let canary = event_canary(&node, "canary").await;
    let b = define_and_bind(&node, "hostile", sh_def("target", "true", every(60))).await;
    let max = prost_types::Timestamp {
        seconds: MAX_TIMESTAMP_SECS,
        nanos: 999_999_999,
    };
    let min = prost_types::Timestamp {
        seconds: MIN_TIMESTAMP_SECS,
        nanos: 0,
    };
    let micros = |t: &prost_types::Timestamp| (t.seconds, t.nanos / 1000);
    let mut bindings = node.bindings();
    let mut sched = every(60);
    if let Some(pb::schedule::Kind::Interval(i)) = &mut sched.kind {
        i.anchor_time = Some(max);
    }
    sched.end_time = Some(max);
    let updated = bindings
        .update_binding(as_tenant(
            "hostile",
            pb::UpdateBindingRequest {
                binding: Some(pb::Binding {
                    id: b.id.clone(),
                    effective_from: Some(min),
                    effective_until: Some(max),
                    schedule: Some(sched),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![
                        "effective_from".into(),
                        "effective_until".into(),
                        "schedule".into(),
                    ],
                }),
            },
        ))
        .await
        .expect("extreme but valid timestamps are accepted")
        .into_inner();
    let got = bindings
        .get_binding(as_tenant(
            "hostile",
            pb::GetBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .expect("the binding still reads")
        .into_inner();
    for x in [&updated, &got] {
        assert_eq!(x.effective_until.as_ref().map(micros), Some(micros(&max)));
        assert_eq!(x.effective_from.as_ref().map(micros), Some(micros(&min)));
        let Some(pb::schedule::Kind::Interval(i)) =
            x.schedule.as_ref().and_then(|s| s.kind.clone())
        else {
            panic!("interval kept");
        };
        assert_eq!(i.anchor_time.as_ref().map(micros), Some(micros(&max)));
    }
    bindings
        .pause_binding(as_tenant(
            "hostile",
            pb::PauseBindingRequest {
                binding_id: b.id.clone(),
                note: "far".into(),
                expire_time: Some(max),
            },
        ))
        .await
        .expect("pause until 9999");
    // The canary keeps firing; the extreme binding can still be deleted.
    runs_until(
        &node,
        "canary",
        &canary.id,
        Duration::from_secs(30),
        "canary fires",
        |rs| rs.len() >= 3,
    )
    .await;
    bindings
        .delete_binding(as_tenant(
            "hostile",
            pb::DeleteBindingRequest {
                binding_id: b.id.clone(),
            },
        ))
        .await
        .expect("delete");
    node.stop().await;
}

fn short(s: &str) -> String {
    s.chars().take(160).collect()
}

/// The most expensive previews the limits allow, many at once from one
/// tenant: they are bounded per tenant (RESOURCE_EXHAUSTED past two at once),
/// never INTERNAL, health answers promptly and another tenant's binding
/// keeps firing.
#[tokio::test]
async fn expensive_calls_are_bounded_per_tenant_and_do_not_stall_the_node() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "costly").await;
    let canary = event_canary(&node, "canary").await;
    let minutes: Vec<String> = (0..60).map(|m| m.to_string()).collect();
    let expr = format!("{} 0 29 2 *", minutes.join(","));
    let stop_at = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut defs = node.definitions();
        let expr = expr.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0, 0);
            while Instant::now() < stop_at {
                let r = defs
                    .preview_schedule(as_tenant(
                        "hostile",
                        pb::PreviewScheduleRequest {
                            schedule: Some(cron(&expr, "America/New_York")),
                            count: 1000,
                            after: None,
                        },
                    ))
                    .await;
                match r {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        limited += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(s) => panic!("preview: {s:?}"),
                }
            }
            (ok, limited)
        }));
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(node.channel.clone());
    let mut slowest = Duration::ZERO;
    while Instant::now() < stop_at {
        let t = Instant::now();
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health answers");
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.expect("preview loop");
        ok += o;
        limited += l;
    }
    eprintln!("previews: {ok} answered, {limited} limited; slowest health check {slowest:?}");
    assert!(ok > 0, "previews are served");
    assert!(
        limited > 0,
        "six at once from one tenant meet the per-tenant bound"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "health stalled {slowest:?}"
    );
    runs_until(
        &node,
        "canary",
        &canary.id,
        Duration::from_secs(30),
        "canary fires",
        |rs| rs.len() >= 4,
    )
    .await;
    node.stop().await;
}

/// The params a run receives (definition, binding and trigger merged) stay
/// within 64 KiB whichever of the three grows.
#[tokio::test]
async fn merged_params_are_bounded_whichever_part_grows() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "merged").await;
    let kib = |key: &str, n: usize| {
        sked::grpc::convert::json_to_struct(&serde_json::json!({ key: "x".repeat(n * 1024) }))
    };
    let mut def = sh_def("big", "true", manual());
    def.params = kib("a", 40);
    node.definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(def),
        })
        .await
        .expect("40 KiB of params is fine");
    let mut bindings = node.bindings();
    let too_big = bindings
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "big".into(),
                    params: kib("b", 30),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect_err("40 + 30 KiB merged is over 64 KiB");
    assert_eq!(too_big.code(), Code::InvalidArgument);
    assert!(
        too_big.message().starts_with("binding.params"),
        "{too_big:?}"
    );
    let b = bindings
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "big".into(),
                    params: kib("b", 20),
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("40 + 20 KiB fits")
        .into_inner();
    let e = node
        .runs()
        .trigger_run(as_tenant(
            "acme",
            pb::TriggerRunRequest {
                binding_id: b.id.clone(),
                params: kib("c", 10),
                ..Default::default()
            },
        ))
        .await
        .expect_err("a trigger's params push the merge over");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("params"), "{e:?}");
    let mut grown = sh_def("big", "true", manual());
    grown.params = kib("a", 50);
    let e = node
        .definitions()
        .update_definition(pb::UpdateDefinitionRequest {
            definition: Some(grown),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["params".into()],
            }),
        })
        .await
        .expect_err("the definition's params push a binding's merge over");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(&b.id), "{e:?}");
    // Nothing was half-written: the definition keeps its 40 KiB.
    let d = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest { name: "big".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(d.params, kib("a", 40));
    node.stop().await;
}

/// Ambiguous or malformed selectors are refused, not guessed at: two
/// `x-tenant-id` headers, a page token that no page could have produced.
#[tokio::test]
async fn ambiguous_tenant_headers_and_foreign_page_tokens_are_invalid_argument() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "selectors").await;
    let mut req = as_tenant("acme", pb::ListBindingsRequest::default());
    req.metadata_mut()
        .append("x-tenant-id", "other".parse().expect("ascii"));
    let e = node
        .bindings()
        .list_bindings(req)
        .await
        .expect_err("two tenants named");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("x-tenant-id"), "{e:?}");
    let e = node
        .definitions()
        .list_definitions(pb::ListDefinitionsRequest {
            page_token: "not a name!".into(),
            ..Default::default()
        })
        .await
        .expect_err("a token no page produced");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("page_token"), "{e:?}");
    node.stop().await;
}
