//! The input boundary: every request message is checked here, field by
//! field from its descriptor, before a handler sees it. One walk covers
//! every field of every request, so a field added later is bounded without
//! new code:
//!
//! - **strings** (and map keys): no NUL character (PostgreSQL cannot store
//!   one), at most [`DEFAULT_MAX_STRING`] bytes unless [`string_limit`] names
//!   another bound for the field;
//! - **repeated fields and maps**: at most [`DEFAULT_MAX_ITEMS`] items /
//!   [`DEFAULT_MAX_ENTRIES`] entries unless [`items_limit`] says otherwise;
//! - **enums**: only the numbers the enum defines;
//! - **`google.protobuf.Timestamp`**: inside the protobuf range,
//!   0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z
//!   ([`MIN_TIMESTAMP_SECS`]..=[`MAX_TIMESTAMP_SECS`]), nanos 0..=999 999 999;
//! - **`google.protobuf.Duration`**: inside the protobuf range, ±315 576 000 000 s
//!   ([`MAX_DURATION_SECS`]), nanos of the same sign as the seconds;
//! - **`google.protobuf.Struct`** (params): at most [`MAX_PARAMS_BYTES`]
//!   encoded and [`MAX_PARAMS_DEPTH`] levels of nesting, numbers finite (no
//!   NaN or infinity: JSON has neither), keys and strings as above.
//!
//! A violation is `INVALID_ARGUMENT` naming the field path (e.g.
//! `definition.labels["team"]`, `binding.params.a.b`) and the limit; the
//! offending value is quoted by at most a short prefix ([`quote`]).
//! Field-specific rules (name syntax, schedule validity, policy ranges) stay
//! with the handlers; this layer guarantees the shapes they may rely on.
//!
//! Source of the ranges: the protobuf well-known types' own documentation
//! (`timestamp.proto`, `duration.proto`).

use std::fmt::Write as _;
use std::sync::OnceLock;

use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, ReflectMessage, Value,
};

use crate::domain::FieldViolation;

/// Longest string field, in bytes, unless [`string_limit`] says otherwise.
pub const DEFAULT_MAX_STRING: usize = 1024;
/// Most items of a repeated field unless [`items_limit`] says otherwise.
pub const DEFAULT_MAX_ITEMS: usize = 1000;
/// Most entries of a map field unless [`items_limit`] says otherwise.
pub const DEFAULT_MAX_ENTRIES: usize = 64;
/// Largest params Struct (any `google.protobuf.Struct` field), encoded bytes.
pub const MAX_PARAMS_BYTES: usize = 64 * 1024;
/// Deepest nesting of a params Struct: `{"a": 1}` is 1 level, each object or
/// list inside adds one. The deepest allowed params still decode inside
/// every request that carries params (prost's decoder stops at 100 nested
/// messages and a Struct level costs it three: today 33 levels decode), so
/// the boundary, not the decoder, names the field; a test guards this for
/// requests that nest params deeper.
pub const MAX_PARAMS_DEPTH: usize = 32;
/// 0001-01-01T00:00:00Z in seconds since the Unix epoch.
pub const MIN_TIMESTAMP_SECS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z in seconds since the Unix epoch.
pub const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;
/// ±10 000 years, the protobuf Duration range.
pub const MAX_DURATION_SECS: i64 = 315_576_000_000;
pub use crate::domain::QUOTE_CHARS;

/// Output-only fields that are not strings (comments say "Output only" in
/// the protos). Handlers ignore them on input, so they are not checked: a
/// resource read with Get can be sent back in Update as it is, even when the
/// server computed a value no client could send (a merged params Struct over
/// 64 KiB encoded, a next fire time). Strings stay checked (`id` and `etag`
/// select and guard updates). A test keeps this list equal to the protos.
pub const OUTPUT_ONLY: &[&str] = &[
    "sked.v1.ApiKey.create_time",
    "sked.v1.ApiKey.revoke_time",
    "sked.v1.Binding.paused",
    "sked.v1.Binding.pause_expire_time",
    "sked.v1.Binding.effective",
    "sked.v1.Binding.next_run_time",
    "sked.v1.Binding.create_time",
    "sked.v1.Binding.update_time",
    "sked.v1.Binding.status",
    "sked.v1.Binding.last_run",
    "sked.v1.Binding.last_success_time",
    "sked.v1.Binding.last_failure_time",
    "sked.v1.Binding.consecutive_failures",
    "sked.v1.Run.trigger",
    "sked.v1.Run.state",
    "sked.v1.Run.attempt",
    "sked.v1.Run.scheduled_time",
    "sked.v1.Run.create_time",
    "sked.v1.Run.start_time",
    "sked.v1.Run.end_time",
    "sked.v1.Run.params",
    "sked.v1.Run.result",
    "sked.v1.Run.error",
    "sked.v1.Run.exit_code",
    "sked.v1.Run.max_attempts",
    "sked.v1.Run.not_before",
    "sked.v1.Run.timeout",
    "sked.v1.Run.progress",
    "sked.v1.TaskDefinition.create_time",
    "sked.v1.TaskDefinition.update_time",
];

/// Bound of a string field (or map key/value), in bytes, by full field name.
/// Map keys and values are named `<map field>.key` / `<map field>.value`.
pub fn string_limit(full_name: &str) -> usize {
    match full_name {
        "sked.v1.TaskDefinition.display_name" => 256,
        "sked.v1.TaskDefinition.description" => 4096,
        "sked.v1.TaskDefinition.labels.key" => 128,
        "sked.v1.TaskDefinition.labels.value" => 256,
        "sked.v1.CommandHandler.program" | "sked.v1.CommandHandler.working_dir" => 4096,
        "sked.v1.CommandHandler.args" | "sked.v1.CommandHandler.env.value" => 16 * 1024,
        "sked.v1.CommandHandler.env.key" => 256,
        "sked.v1.HttpHandler.url" => crate::domain::http::MAX_URL_BYTES,
        "sked.v1.HttpHandler.headers.key" => crate::domain::http::MAX_HEADER_NAME_BYTES,
        "sked.v1.HttpHandler.headers.value" => crate::domain::http::MAX_HEADER_VALUE_BYTES,
        "sked.v1.CronSchedule.expression" => crate::domain::schedule::MAX_CRON_LEN,
        "sked.v1.Schedule.timezone" => 64,
        "sked.v1.ListBindingsRequest.labels.key" => 128,
        "sked.v1.ListBindingsRequest.labels.value" => 256,
        "sked.v1.ListRunsRequest.node" => 512,
        "sked.v1.NotificationRule.url" => crate::domain::http::MAX_URL_BYTES,
        _ => DEFAULT_MAX_STRING,
    }
}

/// Bound of a repeated or map field, in items, by full field name.
pub fn items_limit(field: &FieldDescriptor) -> usize {
    match field.full_name() {
        "sked.v1.TaskDefinition.labels" => 64,
        "sked.v1.CommandHandler.args" => 256,
        "sked.v1.CommandHandler.env" => 128,
        "sked.v1.CommandHandler.non_retryable_exit_codes" => {
            crate::domain::MAX_NON_RETRYABLE_EXIT_CODES
        }
        "sked.v1.HttpHandler.headers" => crate::domain::http::MAX_HEADERS,
        "sked.v1.WeeklySchedule.days_of_week" => 7,
        "sked.v1.ListRunsRequest.states" => crate::usecase::runs::MAX_FILTER_STATES,
        "sked.v1.ListBindingsRequest.statuses" => 6,
        "sked.v1.SetDefinitionNotificationRulesRequest.rules"
        | "sked.v1.SetBindingNotificationRulesRequest.rules" => crate::domain::notify::MAX_RULES,
        "sked.v1.ListBindingsRequest.labels" => crate::usecase::bindings::MAX_LABEL_SELECTOR,
        _ if field.is_map() => DEFAULT_MAX_ENTRIES,
        _ => DEFAULT_MAX_ITEMS,
    }
}

/// The descriptors of every `sked.v1` file and its imports.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        #[allow(clippy::expect_used)]
        DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set generated by build.rs decodes")
    })
}

/// Whether `full_name` is the input message of a `sked.v1` method (only those
/// are checked: responses decoded by our own clients are not).
pub fn is_request(full_name: &str) -> bool {
    static NAMES: OnceLock<std::collections::HashSet<String>> = OnceLock::new();
    NAMES
        .get_or_init(|| {
            pool()
                .services()
                .flat_map(|s| s.methods().collect::<Vec<_>>())
                .map(|m| m.input().full_name().to_string())
                .collect()
        })
        .contains(full_name)
}

pub use crate::domain::quote;

/// Checks the request `bytes` of message `full_name` (a sked request).
///
/// # Errors
/// The first violation found, naming the field path and the limit.
pub fn check_encoded(full_name: &str, bytes: &[u8]) -> Result<(), FieldViolation> {
    let Some(desc) = pool().get_message_by_name(full_name) else {
        return Ok(());
    };
    let msg = DynamicMessage::decode(desc, bytes)
        .map_err(|e| FieldViolation::new("request", format!("could not be decoded: {e}")))?;
    check(&msg)
}

/// Checks every field of `msg` (module docs).
///
/// # Errors
/// The first violation found, naming the field path and the limit.
pub fn check(msg: &DynamicMessage) -> Result<(), FieldViolation> {
    message(msg, "")
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn map_path(prefix: &str, key: &MapKey) -> String {
    match key {
        MapKey::String(s) => format!("{prefix}[{}]", quote(s)),
        MapKey::Bool(b) => format!("{prefix}[{b}]"),
        MapKey::I32(n) => format!("{prefix}[{n}]"),
        MapKey::I64(n) => format!("{prefix}[{n}]"),
        MapKey::U32(n) => format!("{prefix}[{n}]"),
        MapKey::U64(n) => format!("{prefix}[{n}]"),
    }
}

fn message(msg: &DynamicMessage, prefix: &str) -> Result<(), FieldViolation> {
    match msg.descriptor().full_name() {
        "google.protobuf.Timestamp" => return timestamp(msg, prefix),
        "google.protobuf.Duration" => return duration(msg, prefix),
        "google.protobuf.Struct" => {
            let len = prost::Message::encoded_len(msg);
            if len > MAX_PARAMS_BYTES {
                return Err(FieldViolation::new(
                    prefix,
                    format!("is {len} bytes encoded; at most {MAX_PARAMS_BYTES} bytes (64 KiB)"),
                ));
            }
            return json_struct(msg, prefix, 1);
        }
        _ => {}
    }
    for (field, value) in msg.fields() {
        if OUTPUT_ONLY.contains(&field.full_name()) {
            continue;
        }
        let path = join(prefix, field.name());
        match value {
            Value::List(items) => {
                let max = items_limit(&field);
                if items.len() > max {
                    return Err(FieldViolation::new(
                        &path,
                        format!("has {} items; at most {max}", items.len()),
                    ));
                }
                for (i, item) in items.iter().enumerate() {
                    scalar(&field, field.full_name(), item, &format!("{path}[{i}]"))?;
                }
            }
            Value::Map(entries) => {
                let max = items_limit(&field);
                if entries.len() > max {
                    return Err(FieldViolation::new(
                        &path,
                        format!("has {} entries; at most {max}", entries.len()),
                    ));
                }
                let key_name = format!("{}.key", field.full_name());
                let value_name = format!("{}.value", field.full_name());
                let value_field = match field.kind() {
                    Kind::Message(entry) => entry.map_entry_value_field(),
                    _ => continue,
                };
                for (k, v) in entries {
                    if let MapKey::String(s) = k {
                        string(&key_name, s, &format!("{path} key"))?;
                    }
                    scalar(&value_field, &value_name, v, &map_path(&path, k))?;
                }
            }
            other => scalar(&field, field.full_name(), other, &path)?,
        }
    }
    Ok(())
}

/// One value of `field` (a singular value, a list item or a map value);
/// `name` is the full name its limits are looked up by.
fn scalar(
    field: &FieldDescriptor,
    name: &str,
    value: &Value,
    path: &str,
) -> Result<(), FieldViolation> {
    match value {
        Value::String(s) => string(name, s, path),
        Value::Bytes(b) if b.len() > DEFAULT_MAX_STRING => Err(FieldViolation::new(
            path,
            format!("is {} bytes; at most {DEFAULT_MAX_STRING}", b.len()),
        )),
        Value::Message(m) => message(m, path),
        Value::EnumNumber(n) => match field.kind() {
            Kind::Enum(e) if e.get_value(*n).is_none() => Err(FieldViolation::new(
                path,
                format!("{n} is not a value of {}", e.name()),
            )),
            _ => Ok(()),
        },
        Value::F64(f) if !f.is_finite() => Err(FieldViolation::new(path, "must be finite")),
        Value::F32(f) if !f.is_finite() => Err(FieldViolation::new(path, "must be finite")),
        _ => Ok(()),
    }
}

fn string(name: &str, s: &str, path: &str) -> Result<(), FieldViolation> {
    let max = string_limit(name);
    if s.len() > max {
        return Err(FieldViolation::new(
            path,
            format!("is {} bytes; at most {max} bytes", s.len()),
        ));
    }
    nul_free(s, path)
}

fn nul_free(s: &str, path: &str) -> Result<(), FieldViolation> {
    match s.find('\0') {
        Some(at) => Err(FieldViolation::new(
            path,
            format!("contains a NUL character (at byte {at}); text may not contain NUL"),
        )),
        None => Ok(()),
    }
}

fn int_field(msg: &DynamicMessage, name: &str) -> i64 {
    match msg.get_field_by_name(name).as_deref() {
        Some(Value::I64(n)) => *n,
        Some(Value::I32(n)) => i64::from(*n),
        _ => 0,
    }
}

fn timestamp(msg: &DynamicMessage, path: &str) -> Result<(), FieldViolation> {
    let seconds = int_field(msg, "seconds");
    let nanos = int_field(msg, "nanos");
    if !(MIN_TIMESTAMP_SECS..=MAX_TIMESTAMP_SECS).contains(&seconds) {
        return Err(FieldViolation::new(
            path,
            format!(
                "seconds {seconds} is outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z ({MIN_TIMESTAMP_SECS}..={MAX_TIMESTAMP_SECS})"
            ),
        ));
    }
    if !(0..=999_999_999).contains(&nanos) {
        return Err(FieldViolation::new(
            path,
            format!("nanos {nanos} is out of range 0-999999999"),
        ));
    }
    Ok(())
}

fn duration(msg: &DynamicMessage, path: &str) -> Result<(), FieldViolation> {
    let seconds = int_field(msg, "seconds");
    let nanos = int_field(msg, "nanos");
    if !(-MAX_DURATION_SECS..=MAX_DURATION_SECS).contains(&seconds) {
        return Err(FieldViolation::new(
            path,
            format!("seconds {seconds} is out of range ±{MAX_DURATION_SECS} (10 000 years)"),
        ));
    }
    if !(-999_999_999..=999_999_999).contains(&nanos)
        || (seconds > 0 && nanos < 0)
        || (seconds < 0 && nanos > 0)
    {
        return Err(FieldViolation::new(
            path,
            format!("nanos {nanos} must be within ±999999999 and of the sign of seconds"),
        ));
    }
    Ok(())
}

fn too_deep(path: &str) -> FieldViolation {
    FieldViolation::new(
        path,
        format!("nests deeper than {MAX_PARAMS_DEPTH} levels of objects and lists"),
    )
}

/// A Struct at nesting `depth` (1 = the params object itself).
fn json_struct(msg: &DynamicMessage, path: &str, depth: usize) -> Result<(), FieldViolation> {
    if depth > MAX_PARAMS_DEPTH {
        return Err(too_deep(path));
    }
    let Some(fields) = msg.get_field_by_name("fields") else {
        return Ok(());
    };
    let Value::Map(entries) = fields.as_ref() else {
        return Ok(());
    };
    for (k, v) in entries {
        let MapKey::String(key) = k else { continue };
        let mut p = String::with_capacity(path.len() + key.len().min(64) + 1);
        p.push_str(path);
        if key.len() <= QUOTE_CHARS
            && !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            let _ = write!(p, ".{key}");
        } else {
            let _ = write!(p, "[{}]", quote(key));
        }
        if key.len() > DEFAULT_MAX_STRING {
            return Err(FieldViolation::new(
                &p,
                format!("key is {} bytes; at most {DEFAULT_MAX_STRING}", key.len()),
            ));
        }
        nul_free(key, &p)?;
        if let Value::Message(value) = v {
            json_value(value, &p, depth)?;
        }
    }
    Ok(())
}

/// A `google.protobuf.Value` inside a Struct or list at nesting `depth`.
fn json_value(msg: &DynamicMessage, path: &str, depth: usize) -> Result<(), FieldViolation> {
    for (field, value) in msg.fields() {
        match (field.name(), value) {
            ("number_value", Value::F64(f)) if !f.is_finite() => {
                return Err(FieldViolation::new(
                    path,
                    "is NaN or infinite; params numbers must be finite (JSON has neither)",
                ));
            }
            ("string_value", Value::String(s)) => nul_free(s, path)?,
            ("struct_value", Value::Message(m)) => json_struct(m, path, depth + 1)?,
            ("list_value", Value::Message(m)) => {
                if depth + 1 > MAX_PARAMS_DEPTH {
                    return Err(too_deep(path));
                }
                if let Some(values) = m.get_field_by_name("values")
                    && let Value::List(items) = values.as_ref()
                {
                    for (i, item) in items.iter().enumerate() {
                        if let Value::Message(item) = item {
                            json_value(item, &format!("{path}[{i}]"), depth + 1)?;
                        }
                    }
                }
            }
            ("null_value", Value::EnumNumber(_)) | ("bool_value", _) | ("number_value", _) => {}
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> DynamicMessage {
        DynamicMessage::new(pool().get_message_by_name(name).unwrap())
    }

    #[test]
    fn every_method_input_is_a_known_request() {
        assert!(is_request("sked.v1.CreateDefinitionRequest"));
        assert!(is_request("sked.v1.TailRunRequest"));
        assert!(!is_request("sked.v1.TaskDefinition"));
    }

    /// `OUTPUT_ONLY` is exactly the non-string fields whose comment says
    /// "Output only" in proto/sked/v1.
    #[test]
    fn output_only_list_matches_the_protos() {
        let files = [
            include_str!("../../proto/sked/v1/common.proto"),
            include_str!("../../proto/sked/v1/definition_service.proto"),
            include_str!("../../proto/sked/v1/binding_service.proto"),
            include_str!("../../proto/sked/v1/run_service.proto"),
            include_str!("../../proto/sked/v1/log_service.proto"),
            include_str!("../../proto/sked/v1/admin_service.proto"),
        ];
        let mut found = Vec::new();
        for f in files {
            // (is a message, its name) per open block.
            let mut stack: Vec<(bool, String)> = Vec::new();
            let mut comment = String::new();
            for line in f.lines().map(str::trim) {
                let words: Vec<&str> = line.split_whitespace().collect();
                if line.starts_with("//") {
                    comment.push_str(&line.to_lowercase());
                    continue;
                }
                if line.ends_with('{') && words.len() >= 2 {
                    stack.push((words[0] == "message", words[1].to_string()));
                } else if line.starts_with('}') {
                    stack.pop();
                } else if line.ends_with(';') && line.contains(" = ") && !stack.is_empty() {
                    let before_eq = line.split(" = ").next().unwrap_or_default();
                    let parts: Vec<&str> = before_eq.split_whitespace().collect();
                    if parts.len() < 2 {
                        comment.clear();
                        continue; // an enum value
                    }
                    let (ty, name) = (parts[parts.len() - 2], parts[parts.len() - 1]);
                    let msgs: Vec<&str> = stack
                        .iter()
                        .filter(|(m, _)| *m)
                        .map(|(_, n)| n.as_str())
                        .collect();
                    if comment.contains("output only") && ty != "string" && !msgs.is_empty() {
                        found.push(format!("sked.v1.{}.{name}", msgs.join(".")));
                    }
                }
                comment.clear();
            }
        }
        found.sort();
        let mut listed: Vec<String> = OUTPUT_ONLY.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(found, listed);
    }

    #[test]
    fn quote_keeps_a_short_prefix() {
        assert_eq!(quote("abc"), "\"abc\"");
        let q = quote(&"x".repeat(1_000_000));
        assert!(q.len() < 100, "{q}");
        assert!(q.contains("1000000 bytes"));
    }

    #[test]
    fn nul_in_a_nested_string_names_the_field() {
        let mut m = request("sked.v1.GetDefinitionRequest");
        m.set_field_by_name("name", Value::String("a\0b".into()));
        let e = check(&m).unwrap_err();
        assert_eq!(e.field, "name");
        assert!(e.reason.contains("NUL"), "{}", e.reason);
    }
}

#[cfg(test)]
mod depth_tests {
    use prost::Message;
    use prost_types::{Struct, Value as PValue, value::Kind as PKind};

    use super::*;
    use crate::proto::v1 as pb;

    /// `{"a": {"a": ... {"a": 1}}}` with `depth` objects.
    fn nested(depth: usize) -> Struct {
        let mut s = Struct::default();
        s.fields.insert(
            "a".into(),
            PValue {
                kind: Some(PKind::NumberValue(1.0)),
            },
        );
        for _ in 1..depth {
            let mut outer = Struct::default();
            outer.fields.insert(
                "a".into(),
                PValue {
                    kind: Some(PKind::StructValue(s)),
                },
            );
            s = outer;
        }
        s
    }

    fn depth_of_deepest_decodable<M: Message + Default>(build: impl Fn(Struct) -> M) -> usize {
        (1..100)
            .take_while(|d| M::decode(build(nested(*d)).encode_to_vec().as_slice()).is_ok())
            .last()
            .unwrap_or(0)
    }

    #[test]
    fn the_deepest_allowed_params_decode_in_every_request_that_carries_params() {
        let create = depth_of_deepest_decodable(|p| pb::CreateDefinitionRequest {
            definition: Some(pb::TaskDefinition {
                params: Some(p),
                ..Default::default()
            }),
        });
        let update = depth_of_deepest_decodable(|p| pb::UpdateBindingRequest {
            binding: Some(pb::Binding {
                params: Some(p),
                ..Default::default()
            }),
            ..Default::default()
        });
        let trigger = depth_of_deepest_decodable(|p| pb::TriggerRunRequest {
            params: Some(p),
            ..Default::default()
        });
        eprintln!("deepest decodable: create {create}, update {update}, trigger {trigger}");
        for d in [create, update, trigger] {
            assert!(d >= MAX_PARAMS_DEPTH, "{d} < {MAX_PARAMS_DEPTH}");
        }
        // One level deeper than allowed still decodes, so the boundary (not
        // the decoder) names the field and the limit.
        let m = pb::TriggerRunRequest {
            params: Some(nested(MAX_PARAMS_DEPTH + 1)),
            ..Default::default()
        };
        let e = check_encoded("sked.v1.TriggerRunRequest", &m.encode_to_vec()).unwrap_err();
        assert!(e.field.starts_with("params.a.a"), "{}", e.field);
        assert!(e.reason.contains("32 levels"), "{}", e.reason);
    }
}
