//! proto ↔ domain conversion. Input conversions validate and name the field
//! that is wrong; output conversions cannot fail.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};

use crate::domain::misfire::MAX_CATCHUP_WINDOW_SECS;
use crate::domain::policy::validate_timeout;
use crate::domain::schedule::{MAX_JITTER_SECS, TimeOfDay};
use crate::domain::{
    self, FieldViolation, MisfireMode, MisfirePolicy, OverlapPolicy, RetryPolicy, Schedule,
    ScheduleKind,
};
use crate::proto::v1 as pb;

/// Timestamp → UTC instant, truncated to whole microseconds (what the
/// database stores, so a value reads back equal to what was accepted).
///
/// # Errors
/// A violation on `field` unless inside 0001-01-01T00:00:00Z ..
/// 9999-12-31T23:59:59.999999Z with nanos 0..=999 999 999 (the boundary
/// checks this before any handler; this keeps the conversion total).
pub fn time_from(field: &str, t: &Timestamp) -> Result<DateTime<Utc>, FieldViolation> {
    use crate::grpc::boundary::{MAX_TIMESTAMP_SECS, MIN_TIMESTAMP_SECS};
    let nanos = u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n <= 999_999_999)
        .ok_or_else(|| FieldViolation::new(field, "nanos must be 0-999999999"))?;
    if !(MIN_TIMESTAMP_SECS..=MAX_TIMESTAMP_SECS).contains(&t.seconds) {
        return Err(FieldViolation::new(
            field,
            "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ));
    }
    DateTime::from_timestamp(t.seconds, nanos - nanos % 1000)
        .ok_or_else(|| FieldViolation::new(field, "timestamp out of range"))
}

/// UTC instant → Timestamp.
pub fn time_to(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// JSON → protobuf Value. Integers become numbers (f64, as protobuf has no
/// integers in Struct).
pub fn json_to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(json_map_to_struct(o)),
    };
    Value { kind: Some(kind) }
}

fn json_map_to_struct(o: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// JSON object → Struct; `None` for anything that is not an object.
pub fn json_to_struct(v: &serde_json::Value) -> Option<Struct> {
    v.as_object().map(json_map_to_struct)
}

/// protobuf Value → JSON. Whole numbers within ±2^53 become JSON integers,
/// so `{"n": 1}` reaches a command as `1`, not `1.0`; NaN and infinities
/// become null (JSON has neither).
pub fn value_to_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(f)) => {
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                serde_json::Value::from(*f as i64)
            } else {
                serde_json::Number::from_f64(*f)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// Struct → JSON object.
pub fn struct_to_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

/// Converts and validates an API schedule at `field` (e.g.
/// `definition.schedule`). `None` in → `None` out.
///
/// # Errors
/// A violation naming the sub-field: missing kind, sub-second or < 1 s
/// interval, missing `once.at`, bad cron, bad calendar fields, unknown time
/// zone, bad jitter or start/end.
pub fn schedule_from(
    field: &str,
    s: Option<&pb::Schedule>,
) -> Result<Option<Schedule>, FieldViolation> {
    let Some(s) = s else { return Ok(None) };
    use pb::schedule::Kind as K;
    let tod = |kind: &str, t: Option<&pb::TimeOfDay>| -> Result<TimeOfDay, FieldViolation> {
        let f = format!("{field}.{kind}.time_of_day");
        let t = t.ok_or_else(|| FieldViolation::new(&f, "is required"))?;
        let part = |v: i32| u8::try_from(v).unwrap_or(u8::MAX);
        TimeOfDay::new(part(t.hours), part(t.minutes), part(t.seconds))
            .map_err(|reason| FieldViolation::new(&f, reason))
    };
    let small = |f: String, v: i32| -> Result<u8, FieldViolation> {
        u8::try_from(v).map_err(|_| FieldViolation::new(f, format!("{v} is out of range")))
    };
    let kind = match &s.kind {
        None => {
            return Err(FieldViolation::new(
                field,
                "one of cron, interval, once, manual, daily, weekly, monthly or yearly is required",
            ));
        }
        Some(K::Cron(c)) => ScheduleKind::Cron {
            expression: c.expression.trim().to_string(),
        },
        Some(K::Interval(i)) => {
            let f = format!("{field}.interval.every");
            let every = i
                .every
                .as_ref()
                .ok_or_else(|| FieldViolation::new(&f, "is required"))?;
            if every.nanos != 0 {
                return Err(FieldViolation::new(&f, "must be whole seconds"));
            }
            let anchor_time = i
                .anchor_time
                .as_ref()
                .map(|t| time_from(&format!("{field}.interval.anchor_time"), t))
                .transpose()?;
            ScheduleKind::Interval {
                every_secs: every.seconds,
                anchor_time,
            }
        }
        Some(K::Once(o)) => {
            let f = format!("{field}.once.at");
            let at =
                o.at.as_ref()
                    .ok_or_else(|| FieldViolation::new(&f, "is required"))?;
            ScheduleKind::Once {
                at: time_from(&f, at)?,
            }
        }
        Some(K::Manual(_)) => ScheduleKind::Manual,
        Some(K::Daily(d)) => ScheduleKind::Daily {
            time_of_day: tod("daily", d.time_of_day.as_ref())?,
        },
        Some(K::Weekly(w)) => {
            let f = format!("{field}.weekly.days_of_week");
            let mut days = Vec::with_capacity(w.days_of_week.len());
            for d in &w.days_of_week {
                days.push(match pb::DayOfWeek::try_from(*d) {
                    Ok(pb::DayOfWeek::Sunday) => 0,
                    Ok(pb::DayOfWeek::Unspecified) | Err(_) => {
                        return Err(FieldViolation::new(
                            &f,
                            format!("{d} is not a day of the week (1 = Monday .. 7 = Sunday)"),
                        ));
                    }
                    Ok(day) => day as u8,
                });
            }
            ScheduleKind::Weekly {
                days_of_week: days,
                time_of_day: tod("weekly", w.time_of_day.as_ref())?,
            }
        }
        Some(K::Monthly(m)) => ScheduleKind::Monthly {
            day_of_month: i8::try_from(m.day_of_month).map_err(|_| {
                FieldViolation::new(
                    format!("{field}.monthly.day_of_month"),
                    format!("{} is out of range 1-31 or -1", m.day_of_month),
                )
            })?,
            time_of_day: tod("monthly", m.time_of_day.as_ref())?,
        },
        Some(K::Yearly(y)) => ScheduleKind::Yearly {
            month: small(format!("{field}.yearly.month"), y.month)?,
            day: small(format!("{field}.yearly.day"), y.day)?,
            time_of_day: tod("yearly", y.time_of_day.as_ref())?,
        },
    };
    let timezone = if s.timezone.is_empty() {
        "UTC".to_string()
    } else {
        s.timezone.clone()
    };
    let mut schedule = Schedule::new(kind, timezone);
    if let Some(j) = &s.jitter {
        let f = format!("{field}.jitter");
        if j.nanos != 0 {
            return Err(FieldViolation::new(f, "must be whole seconds"));
        }
        schedule.jitter_secs = u32::try_from(j.seconds).map_err(|_| {
            FieldViolation::new(
                f,
                format!("{}s is out of range 0s-{MAX_JITTER_SECS}s", j.seconds),
            )
        })?;
    }
    schedule.start_time = s
        .start_time
        .as_ref()
        .map(|t| time_from(&format!("{field}.start_time"), t))
        .transpose()?;
    schedule.end_time = s
        .end_time
        .as_ref()
        .map(|t| time_from(&format!("{field}.end_time"), t))
        .transpose()?;
    schedule.validate(field)?;
    Ok(Some(schedule))
}

/// Domain schedule → API schedule.
pub fn schedule_to(s: &Schedule) -> pb::Schedule {
    use pb::schedule::Kind as K;
    let tod = |t: &TimeOfDay| {
        Some(pb::TimeOfDay {
            hours: i32::from(t.hour),
            minutes: i32::from(t.minute),
            seconds: i32::from(t.second),
        })
    };
    let kind = match &s.kind {
        ScheduleKind::Cron { expression } => K::Cron(pb::CronSchedule {
            expression: expression.clone(),
        }),
        ScheduleKind::Interval {
            every_secs,
            anchor_time,
        } => K::Interval(pb::IntervalSchedule {
            every: Some(prost_types::Duration {
                seconds: *every_secs,
                nanos: 0,
            }),
            anchor_time: anchor_time.map(time_to),
        }),
        ScheduleKind::Once { at } => K::Once(pb::OnceSchedule {
            at: Some(time_to(*at)),
        }),
        ScheduleKind::Manual => K::Manual(pb::ManualSchedule {}),
        ScheduleKind::Daily { time_of_day } => K::Daily(pb::DailySchedule {
            time_of_day: tod(time_of_day),
        }),
        ScheduleKind::Weekly {
            days_of_week,
            time_of_day,
        } => K::Weekly(pb::WeeklySchedule {
            days_of_week: days_of_week
                .iter()
                .map(|d| if *d == 0 { 7 } else { i32::from(*d) })
                .collect(),
            time_of_day: tod(time_of_day),
        }),
        ScheduleKind::Monthly {
            day_of_month,
            time_of_day,
        } => K::Monthly(pb::MonthlySchedule {
            day_of_month: i32::from(*day_of_month),
            time_of_day: tod(time_of_day),
        }),
        ScheduleKind::Yearly {
            month,
            day,
            time_of_day,
        } => K::Yearly(pb::YearlySchedule {
            month: i32::from(*month),
            day: i32::from(*day),
            time_of_day: tod(time_of_day),
        }),
    };
    pb::Schedule {
        kind: Some(kind),
        timezone: s.timezone.clone(),
        jitter: (s.jitter_secs > 0).then_some(prost_types::Duration {
            seconds: i64::from(s.jitter_secs),
            nanos: 0,
        }),
        start_time: s.start_time.map(time_to),
        end_time: s.end_time.map(time_to),
    }
}

/// Params from the API: an absent Struct is `{}`.
pub fn params_from(s: Option<&Struct>) -> serde_json::Value {
    s.map_or_else(|| serde_json::json!({}), struct_to_json)
}

/// API misfire policy → domain (unset → the default: 60 s, run once).
///
/// # Errors
/// A violation on `<field>.catchup_window` when negative, fractional or over
/// 366 days, or on `<field>.mode` for an unknown mode.
pub fn misfire_policy_from(
    field: &str,
    p: Option<&pb::MisfirePolicy>,
) -> Result<MisfirePolicy, FieldViolation> {
    let Some(p) = p else {
        return Ok(MisfirePolicy::default());
    };
    let catchup_window_secs = match &p.catchup_window {
        None => MisfirePolicy::default().catchup_window_secs,
        Some(d) => {
            let f = format!("{field}.catchup_window");
            if d.nanos != 0 {
                return Err(FieldViolation::new(f, "must be whole seconds"));
            }
            if !(0..=MAX_CATCHUP_WINDOW_SECS).contains(&d.seconds) {
                return Err(FieldViolation::new(
                    f,
                    format!(
                        "{}s is out of range 0s-{MAX_CATCHUP_WINDOW_SECS}s",
                        d.seconds
                    ),
                ));
            }
            d.seconds
        }
    };
    let mode = match pb::MisfireMode::try_from(p.mode) {
        Ok(pb::MisfireMode::Unspecified | pb::MisfireMode::RunOnce) => MisfireMode::RunOnce,
        Ok(pb::MisfireMode::RunAll) => MisfireMode::RunAll,
        Ok(pb::MisfireMode::Skip) => MisfireMode::Skip,
        Err(_) => {
            return Err(FieldViolation::new(
                format!("{field}.mode"),
                format!("{} is not a MisfireMode", p.mode),
            ));
        }
    };
    Ok(MisfirePolicy {
        catchup_window_secs,
        mode,
    })
}

/// Domain misfire policy → API.
pub fn misfire_policy_to(p: &MisfirePolicy) -> pb::MisfirePolicy {
    pb::MisfirePolicy {
        catchup_window: Some(prost_types::Duration {
            seconds: p.catchup_window_secs,
            nanos: 0,
        }),
        mode: match p.mode {
            MisfireMode::RunOnce => pb::MisfireMode::RunOnce,
            MisfireMode::RunAll => pb::MisfireMode::RunAll,
            MisfireMode::Skip => pb::MisfireMode::Skip,
        } as i32,
    }
}

/// A Duration of whole milliseconds ≥ 0, at most one day (the longest
/// backoff, `policy::MAX_DELAY`); checked arithmetic, so a huge value is
/// rejected, never wrapped.
fn millis_from(field: &str, d: &prost_types::Duration) -> Result<u64, FieldViolation> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos % 1_000_000 != 0 {
        return Err(FieldViolation::new(
            field,
            "must be a non-negative whole number of milliseconds",
        ));
    }
    let max = domain::policy::MAX_DELAY.as_millis() as u64;
    (d.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add((d.nanos / 1_000_000) as u64))
        .filter(|ms| *ms <= max)
        .ok_or_else(|| {
            FieldViolation::new(
                field,
                format!("{}s is out of range 0s-{}s", d.seconds, max / 1000),
            )
        })
}

fn millis_to(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// API retry policy → domain, defaults filled in (unset → no retry).
///
/// # Errors
/// A violation naming the field out of range (`<field>.max_attempts`...).
pub fn retry_policy_from(
    field: &str,
    p: Option<&pb::RetryPolicy>,
) -> Result<RetryPolicy, FieldViolation> {
    let Some(p) = p else {
        return Ok(RetryPolicy::default());
    };
    let d = RetryPolicy::default();
    let max_attempts = match p.max_attempts {
        0 => d.max_attempts,
        n if n < 0 => {
            return Err(FieldViolation::new(
                format!("{field}.max_attempts"),
                "must be 1 to 100 (1 = no retry)",
            ));
        }
        n => n as u32,
    };
    let initial_backoff_ms = match &p.initial_backoff {
        None => d.initial_backoff_ms,
        Some(x) => millis_from(&format!("{field}.initial_backoff"), x)?,
    };
    let max_backoff_ms = match &p.max_backoff {
        None => (initial_backoff_ms.saturating_mul(100))
            .min(domain::policy::MAX_DELAY.as_millis() as u64),
        Some(x) => millis_from(&format!("{field}.max_backoff"), x)?,
    };
    let policy = RetryPolicy {
        max_attempts,
        initial_backoff_ms,
        backoff_coefficient: if p.backoff_coefficient == 0.0 {
            d.backoff_coefficient
        } else {
            p.backoff_coefficient
        },
        max_backoff_ms,
    };
    policy.validate(field)?;
    Ok(policy)
}

/// Domain retry policy → API.
pub fn retry_policy_to(p: &RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: p.max_attempts as i32,
        initial_backoff: Some(millis_to(p.initial_backoff_ms)),
        backoff_coefficient: p.backoff_coefficient,
        max_backoff: Some(millis_to(p.max_backoff_ms)),
    }
}

/// API timeout → whole seconds (unset → no limit).
///
/// # Errors
/// A violation on `field` unless whole seconds, 1 s to 1 day.
pub fn timeout_from(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<u32>, FieldViolation> {
    let Some(d) = d else { return Ok(None) };
    if d.nanos != 0 || d.seconds < 0 {
        return Err(FieldViolation::new(
            field,
            "must be 1 s to 1 day, whole seconds",
        ));
    }
    validate_timeout(field, d.seconds as u64)?;
    Ok(Some(d.seconds as u32))
}

/// An `http` handler's timeout → whole seconds (unset → the definition's).
///
/// # Errors
/// A violation on `field` unless whole seconds, 1 s to 1 h.
pub fn http_timeout_from(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<u32>, FieldViolation> {
    let Some(d) = d else { return Ok(None) };
    let max = i64::from(domain::http::MAX_HTTP_TIMEOUT_SECS);
    let min = i64::from(domain::http::MIN_HTTP_TIMEOUT_SECS);
    if d.nanos != 0 || d.seconds < min || d.seconds > max {
        return Err(FieldViolation::new(
            field,
            "must be 1 s to 1 h, whole seconds",
        ));
    }
    Ok(Some(d.seconds as u32))
}

/// Seconds → API Duration.
pub fn secs_to(secs: u32) -> prost_types::Duration {
    prost_types::Duration {
        seconds: secs.into(),
        nanos: 0,
    }
}

/// API overlap policy → domain (UNSPECIFIED → SKIP).
///
/// # Errors
/// A violation on `field` for an unknown number.
pub fn overlap_from(field: &str, n: i32) -> Result<OverlapPolicy, FieldViolation> {
    match pb::OverlapPolicy::try_from(n) {
        Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Skip) => Ok(OverlapPolicy::Skip),
        Ok(pb::OverlapPolicy::Allow) => Ok(OverlapPolicy::Allow),
        Ok(pb::OverlapPolicy::BufferOne) => Ok(OverlapPolicy::BufferOne),
        Ok(pb::OverlapPolicy::CancelPrevious) => Ok(OverlapPolicy::CancelPrevious),
        Err(_) => Err(FieldViolation::new(
            field,
            format!("{n} is not an OverlapPolicy"),
        )),
    }
}

/// Domain overlap policy → API.
pub fn overlap_to(p: OverlapPolicy) -> pb::OverlapPolicy {
    match p {
        OverlapPolicy::Skip => pb::OverlapPolicy::Skip,
        OverlapPolicy::Allow => pb::OverlapPolicy::Allow,
        OverlapPolicy::BufferOne => pb::OverlapPolicy::BufferOne,
        OverlapPolicy::CancelPrevious => pb::OverlapPolicy::CancelPrevious,
    }
}

/// Definition → API.
pub fn definition_to(d: &domain::Definition) -> pb::TaskDefinition {
    let handler = pb_handler_of(&d.handler);
    pb::TaskDefinition {
        name: d.name.clone(),
        display_name: d.display_name.clone(),
        description: d.description.clone(),
        labels: d.labels.clone().into_iter().collect(),
        handler: Some(handler),
        schedule: Some(schedule_to(&d.schedule)),
        params: json_to_struct(&d.params),
        misfire_policy: Some(misfire_policy_to(&d.misfire_policy)),
        retry_policy: Some(retry_policy_to(&d.policy.retry)),
        timeout: d.policy.timeout_secs.map(secs_to),
        overlap_policy: overlap_to(d.policy.overlap) as i32,
        priority: d.policy.priority,
        enabled: Some(d.enabled),
        deletion_protection: d.protected,
        tenant_scope: Some(tenant_scope_to(&d.tenant_scope)),
        create_time: Some(time_to(d.create_time)),
        update_time: Some(time_to(d.update_time)),
        etag: d.version.to_string(),
        max_output_bytes: d.max_output_bytes,
        max_active_runs: d.max_active_runs,
    }
}

/// A domain handler → API (the definition handler oneof).
pub fn pb_handler_of(h: &domain::Handler) -> pb::task_definition::Handler {
    match h {
        domain::Handler::Command(c) => pb::task_definition::Handler::Command(pb::CommandHandler {
            program: c.program.clone(),
            args: c.args.clone(),
            env: c.env.clone().into_iter().collect(),
            working_dir: c.working_dir.clone(),
            non_retryable_exit_codes: c.non_retryable_exit_codes.clone(),
        }),
        domain::Handler::Event => pb::task_definition::Handler::Event(pb::EventHandler {}),
        domain::Handler::Http(h) => pb::task_definition::Handler::Http(pb::HttpHandler {
            method: h.method.as_str().to_string(),
            url: h.url.clone(),
            headers: h.headers.clone().into_iter().collect(),
            timeout: h.timeout_secs.map(secs_to),
        }),
        domain::Handler::Worker(w) => pb::task_definition::Handler::Worker(pb::WorkerHandler {
            queue: w.queue.clone(),
            schedule_to_start_timeout: w.schedule_to_start_secs.map(secs_to),
        }),
        domain::Handler::Workflow(w) => pb::task_definition::Handler::Workflow(workflow_to(w)),
    }
}

/// Most tenant ids in a tenant scope's allow-list.
pub const MAX_SCOPE_TENANTS: usize = 1000;

/// API tenant scope → domain: unset means all tenants; otherwise exactly one
/// of `all_tenants` (true) or a `tenant_list` of at least one tenant (sorted,
/// de-duplicated).
///
/// # Errors
/// A violation on `<field>`, `<field>.all_tenants`,
/// `<field>.tenant_list.tenant_ids` or `<field>.tenant_list.tenant_ids[i]`.
pub fn tenant_scope_from(
    field: &str,
    s: Option<&pb::TenantScope>,
) -> Result<domain::TenantScope, FieldViolation> {
    let Some(s) = s else {
        return Ok(domain::TenantScope::AllTenants);
    };
    match &s.scope {
        None => Err(FieldViolation::new(
            field,
            "set all_tenants, or tenant_list with at least one tenant (or leave tenant_scope unset for all tenants)",
        )),
        Some(pb::tenant_scope::Scope::AllTenants(true)) => Ok(domain::TenantScope::AllTenants),
        Some(pb::tenant_scope::Scope::AllTenants(false)) => Err(FieldViolation::new(
            format!("{field}.all_tenants"),
            "must be true when set; to limit the tenants, set tenant_list instead",
        )),
        Some(pb::tenant_scope::Scope::TenantList(list)) => {
            let ids = &list.tenant_ids;
            if ids.is_empty() {
                return Err(FieldViolation::new(
                    format!("{field}.tenant_list.tenant_ids"),
                    "list at least one tenant (to stop a definition from firing, disable it)",
                ));
            }
            if ids.len() > MAX_SCOPE_TENANTS {
                return Err(FieldViolation::new(
                    format!("{field}.tenant_list.tenant_ids"),
                    format!("at most {MAX_SCOPE_TENANTS} tenants"),
                ));
            }
            for (i, t) in ids.iter().enumerate() {
                domain::validate_tenant_id(&format!("{field}.tenant_list.tenant_ids[{i}]"), t)?;
            }
            let mut l = ids.clone();
            l.sort();
            l.dedup();
            Ok(domain::TenantScope::AllowList(l))
        }
    }
}

/// Domain tenant scope → API.
pub fn tenant_scope_to(s: &domain::TenantScope) -> pb::TenantScope {
    let scope = match s {
        domain::TenantScope::AllTenants => pb::tenant_scope::Scope::AllTenants(true),
        domain::TenantScope::AllowList(l) => pb::tenant_scope::Scope::TenantList(pb::TenantList {
            tenant_ids: l.clone(),
        }),
    };
    pb::TenantScope { scope: Some(scope) }
}

/// API handler → domain handler (validated).
///
/// # Errors
/// A violation when missing or invalid (e.g. `definition.command.program`).
pub fn handler_from(
    prefix: &str,
    h: Option<&pb::task_definition::Handler>,
) -> Result<domain::Handler, FieldViolation> {
    let h = match h {
        None => {
            return Err(FieldViolation::new(
                format!("{prefix}.handler"),
                "one of command, event, http or worker is required",
            ));
        }
        Some(pb::task_definition::Handler::Command(c)) => {
            domain::Handler::Command(domain::CommandHandler {
                program: c.program.clone(),
                args: c.args.clone(),
                env: c.env.clone().into_iter().collect::<BTreeMap<_, _>>(),
                working_dir: c.working_dir.clone(),
                max_output_bytes: None,
                non_retryable_exit_codes: c.non_retryable_exit_codes.clone(),
            })
        }
        Some(pb::task_definition::Handler::Event(pb::EventHandler {})) => domain::Handler::Event,
        Some(pb::task_definition::Handler::Workflow(w)) => {
            domain::Handler::Workflow(workflow_from(&format!("{prefix}.workflow"), w)?)
        }
        Some(pb::task_definition::Handler::Http(h)) => {
            let field = format!("{prefix}.http");
            domain::Handler::Http(domain::HttpHandler {
                method: domain::HttpMethod::parse(&format!("{field}.method"), &h.method)?,
                url: h.url.clone(),
                headers: h.headers.clone().into_iter().collect::<BTreeMap<_, _>>(),
                timeout_secs: http_timeout_from(&format!("{field}.timeout"), h.timeout.as_ref())?,
            })
        }
        Some(pb::task_definition::Handler::Worker(w)) => {
            let field = format!("{prefix}.worker.schedule_to_start_timeout");
            let secs = match &w.schedule_to_start_timeout {
                None => None,
                Some(d) if d.nanos == 0 && d.seconds >= 0 && d.seconds <= i64::from(u32::MAX) => {
                    Some(d.seconds as u32)
                }
                Some(_) => {
                    return Err(FieldViolation::new(
                        field,
                        "must be 1 s to 24 h, whole seconds",
                    ));
                }
            };
            domain::Handler::Worker(domain::WorkerHandler {
                queue: w.queue.clone(),
                schedule_to_start_secs: secs,
            })
        }
    };
    h.validate(prefix)?;
    Ok(h)
}

/// Domain workflow → API.
pub fn workflow_to(w: &domain::WorkflowHandler) -> pb::WorkflowHandler {
    pb::WorkflowHandler {
        steps: w
            .steps
            .iter()
            .map(|s| {
                let handler = match (&s.definition, &s.handler) {
                    (Some(d), _) => pb::workflow_step::Handler::Definition(d.clone()),
                    (None, Some(h)) => step_handler_to(h),
                    // Refused at create: a step has one or the other.
                    (None, None) => pb::workflow_step::Handler::Event(pb::EventHandler {}),
                };
                pb::WorkflowStep {
                    name: s.name.clone(),
                    handler: Some(handler),
                    depends_on: s.depends_on.clone(),
                    params: json_to_struct(&s.params),
                    retry_policy: s.retry.as_ref().map(retry_policy_to),
                    timeout: s.timeout_secs.map(secs_to),
                    always: s.always,
                }
            })
            .collect(),
        on_failure: match w.on_failure {
            domain::OnFailure::Stop => pb::WorkflowOnFailure::Stop,
            domain::OnFailure::Continue => pb::WorkflowOnFailure::Continue,
        } as i32,
        max_parallel_steps: w.max_parallel_steps.unwrap_or(0),
        serial: w.serial,
    }
}

/// A step's handler → API.
fn step_handler_to(h: &domain::Handler) -> pb::workflow_step::Handler {
    match pb_handler_of(h) {
        pb::task_definition::Handler::Command(c) => pb::workflow_step::Handler::Command(c),
        pb::task_definition::Handler::Event(e) => pb::workflow_step::Handler::Event(e),
        pb::task_definition::Handler::Http(h) => pb::workflow_step::Handler::Http(h),
        pb::task_definition::Handler::Worker(w) => pb::workflow_step::Handler::Worker(w),
        // Refused at create: a step is never a workflow.
        pb::task_definition::Handler::Workflow(_) => {
            pb::workflow_step::Handler::Event(pb::EventHandler {})
        }
    }
}

/// API workflow → domain (validated); `prefix` is its field path
/// (`definition.workflow`). A `definition` step is checked for shape only
/// here (the use case checks that the definition exists).
///
/// # Errors
/// A violation naming the step and field, e.g.
/// `definition.workflow.steps[1].depends_on`, or a cycle on
/// `definition.workflow.steps`.
pub fn workflow_from(
    prefix: &str,
    w: &pb::WorkflowHandler,
) -> Result<domain::WorkflowHandler, FieldViolation> {
    if w.steps.len() > domain::workflow::MAX_STEPS {
        return Err(FieldViolation::new(
            format!("{prefix}.steps"),
            format!(
                "has {} steps; at most {}",
                w.steps.len(),
                domain::workflow::MAX_STEPS
            ),
        ));
    }
    let mut steps = Vec::with_capacity(w.steps.len());
    for (i, s) in w.steps.iter().enumerate() {
        let f = format!("{prefix}.steps[{i}]");
        let (handler, definition) = match &s.handler {
            Some(pb::workflow_step::Handler::Definition(d)) => (None, Some(d.clone())),
            other => {
                let h = other.as_ref().and_then(|h| match h {
                    pb::workflow_step::Handler::Command(c) => {
                        Some(pb::task_definition::Handler::Command(c.clone()))
                    }
                    pb::workflow_step::Handler::Event(e) => {
                        Some(pb::task_definition::Handler::Event(*e))
                    }
                    pb::workflow_step::Handler::Http(h) => {
                        Some(pb::task_definition::Handler::Http(h.clone()))
                    }
                    pb::workflow_step::Handler::Worker(w) => {
                        Some(pb::task_definition::Handler::Worker(w.clone()))
                    }
                    pb::workflow_step::Handler::Definition(_) => None,
                });
                (Some(Box::new(handler_from(&f, h.as_ref())?)), None)
            }
        };
        steps.push(domain::WorkflowStep {
            name: s.name.clone(),
            handler,
            definition,
            depends_on: s.depends_on.clone(),
            params: params_from(s.params.as_ref()),
            retry: s
                .retry_policy
                .as_ref()
                .map(|p| retry_policy_from(&format!("{f}.retry_policy"), Some(p)))
                .transpose()?,
            timeout_secs: timeout_from(&format!("{f}.timeout"), s.timeout.as_ref())?,
            always: s.always,
        });
    }
    let on_failure = match pb::WorkflowOnFailure::try_from(w.on_failure) {
        Ok(pb::WorkflowOnFailure::Unspecified | pb::WorkflowOnFailure::Stop) => {
            domain::OnFailure::Stop
        }
        Ok(pb::WorkflowOnFailure::Continue) => domain::OnFailure::Continue,
        Err(_) => {
            return Err(FieldViolation::new(
                format!("{prefix}.on_failure"),
                format!("{} is not a WorkflowOnFailure", w.on_failure),
            ));
        }
    };
    let wf = domain::WorkflowHandler {
        steps,
        on_failure,
        max_parallel_steps: (w.max_parallel_steps != 0).then_some(w.max_parallel_steps),
        serial: w.serial,
    };
    wf.validate(prefix)?;
    Ok(wf)
}

/// The policy overrides of an API binding, checked against the same bounds
/// as a definition's fields (`binding.timeout`, `binding.retry_policy.*`,
/// `binding.max_active_runs`).
///
/// # Errors
/// A violation naming the first field out of range.
pub fn overrides_from(b: &pb::Binding) -> Result<domain::policy::PolicyOverrides, FieldViolation> {
    if let Some(n) = b.max_active_runs {
        domain::policy::validate_max_active_runs("binding.max_active_runs", n, true)?;
    }
    Ok(domain::policy::PolicyOverrides {
        retry: b
            .retry_policy
            .as_ref()
            .map(|p| retry_policy_from("binding.retry_policy", Some(p)))
            .transpose()?,
        timeout_secs: timeout_from("binding.timeout", b.timeout.as_ref())?,
        priority: b.priority,
        max_active_runs: b.max_active_runs,
    })
}

/// Binding → API.
pub fn binding_to(b: &domain::Binding, now: DateTime<Utc>) -> pb::Binding {
    let o = &b.outcomes;
    pb::Binding {
        id: b.id.to_string(),
        tenant_id: b.tenant_id.clone(),
        definition: b.definition.clone(),
        schedule: b.schedule.as_ref().map(schedule_to),
        params: b.params.as_ref().and_then(json_to_struct),
        effective_from: b.effective_from.map(time_to),
        effective_until: b.effective_until.map(time_to),
        enabled: Some(b.enabled),
        paused: b.paused,
        pause_note: b.pause_note.clone(),
        pause_expire_time: b.pause_expire_time.map(time_to),
        effective: Some(pb::EffectiveConfig {
            schedule: Some(schedule_to(&b.effective_schedule)),
            params: json_to_struct(&b.effective_params),
            retry_policy: Some(retry_policy_to(&b.effective_policy.retry)),
            timeout: b.effective_policy.timeout_secs.map(secs_to),
            overlap_policy: overlap_to(b.effective_policy.overlap) as i32,
            priority: b.effective_policy.priority,
            max_active_runs: b.effective_max_active_runs.unwrap_or(0),
            notification_rules: Vec::new(),
            overridden: [
                ("schedule", b.schedule.is_some()),
                ("params", b.params.is_some()),
                ("retry_policy", b.overrides.retry.is_some()),
                ("timeout", b.overrides.timeout_secs.is_some()),
                ("priority", b.overrides.priority.is_some()),
                ("max_active_runs", b.overrides.max_active_runs.is_some()),
            ]
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(f, _)| f.to_string())
            .collect(),
        }),
        timeout: b.overrides.timeout_secs.map(secs_to),
        retry_policy: b.overrides.retry.as_ref().map(retry_policy_to),
        priority: b.overrides.priority,
        max_active_runs: b.overrides.max_active_runs,
        next_run_time: b.next_run_time.map(time_to),
        create_time: Some(time_to(b.create_time)),
        update_time: Some(time_to(b.update_time)),
        etag: b.version.to_string(),
        broken_reason: b.broken_reason.clone().unwrap_or_default(),
        status: binding_status_to(b.status(now)) as i32,
        last_run: o.last_run.map(|r| pb::LastRun {
            run_id: r.id.to_string(),
            state: state_to(r.state) as i32,
            scheduled_time: Some(time_to(r.scheduled_time)),
            end_time: Some(time_to(r.end_time)),
        }),
        last_success_time: o.last_success_time.map(time_to),
        last_failure_time: o.last_failure_time.map(time_to),
        consecutive_failures: i32::try_from(o.consecutive_failures).unwrap_or(i32::MAX),
    }
}

/// Binding status → API enum.
pub fn binding_status_to(s: domain::BindingStatus) -> pb::BindingStatus {
    match s {
        domain::BindingStatus::Active => pb::BindingStatus::Active,
        domain::BindingStatus::Paused => pb::BindingStatus::Paused,
        domain::BindingStatus::Disabled => pb::BindingStatus::Disabled,
        domain::BindingStatus::Failing => pb::BindingStatus::Failing,
        domain::BindingStatus::Completed => pb::BindingStatus::Completed,
        domain::BindingStatus::Broken => pb::BindingStatus::Broken,
    }
}

/// API enum → binding status (a filter value).
///
/// # Errors
/// A violation on `field` for UNSPECIFIED or an unknown number.
pub fn binding_status_from(field: &str, n: i32) -> Result<domain::BindingStatus, FieldViolation> {
    domain::BindingStatus::ALL
        .into_iter()
        .find(|s| binding_status_to(*s) as i32 == n)
        .ok_or_else(|| {
            FieldViolation::new(
                field,
                format!("{n} is not a BindingStatus (UNSPECIFIED is not a filter value)"),
            )
        })
}

/// API enum → run trigger; `None` for UNSPECIFIED.
///
/// # Errors
/// A violation on `field` for an unknown number.
pub fn trigger_from(field: &str, n: i32) -> Result<Option<domain::RunTrigger>, FieldViolation> {
    match pb::RunTrigger::try_from(n) {
        Ok(pb::RunTrigger::Unspecified) => Ok(None),
        Ok(pb::RunTrigger::Schedule) => Ok(Some(domain::RunTrigger::Schedule)),
        Ok(pb::RunTrigger::Manual) => Ok(Some(domain::RunTrigger::Manual)),
        Ok(pb::RunTrigger::Retry) => Ok(Some(domain::RunTrigger::Retry)),
        Ok(pb::RunTrigger::Backfill) => Ok(Some(domain::RunTrigger::Backfill)),
        Ok(pb::RunTrigger::Step) => Ok(Some(domain::RunTrigger::Step)),
        Err(_) => Err(FieldViolation::new(
            field,
            format!("{n} is not a RunTrigger"),
        )),
    }
}

/// Microseconds → API duration.
pub fn micros_to(us: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Per-state counts → API.
pub fn state_counts_to(c: &domain::stats::StateCounts) -> pb::RunStateCounts {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::RunStateCounts {
        succeeded: n(c.succeeded),
        failed: n(c.failed),
        timed_out: n(c.timed_out),
        cancelled: n(c.cancelled),
        skipped: n(c.skipped),
    }
}

/// Stats series interval → API enum.
pub fn stats_interval_to(i: domain::stats::StatsInterval) -> pb::StatsInterval {
    match i {
        domain::stats::StatsInterval::Hour => pb::StatsInterval::Hour,
        domain::stats::StatsInterval::Day => pb::StatsInterval::Day,
    }
}

/// Run statistics → API.
pub fn run_stats_to(s: &domain::stats::RunStats) -> pb::RunStats {
    pb::RunStats {
        start_time: Some(time_to(s.start)),
        end_time: Some(time_to(s.end)),
        counts: Some(state_counts_to(&s.counts)),
        total: i64::try_from(s.counts.total()).unwrap_or(i64::MAX),
        success_rate: s.success_rate,
        duration_p50: s.duration_p50_us.map(micros_to),
        duration_p95: s.duration_p95_us.map(micros_to),
        duration_max: s.duration_max_us.map(micros_to),
        duration_mean: s.duration_mean_us.map(micros_to),
        fire_lag_p50: s.lag_p50_us.map(micros_to),
        fire_lag_p99: s.lag_p99_us.map(micros_to),
        started: i64::try_from(s.started).unwrap_or(i64::MAX),
        interval: stats_interval_to(s.interval) as i32,
        series: s
            .series
            .iter()
            .map(|(t, c)| pb::RunStatsBucket {
                start_time: Some(time_to(*t)),
                counts: Some(state_counts_to(c)),
            })
            .collect(),
    }
}

/// Run state → API enum.
pub fn state_to(s: domain::RunState) -> pb::RunState {
    match s {
        domain::RunState::Scheduled => pb::RunState::Scheduled,
        domain::RunState::Queued => pb::RunState::Queued,
        domain::RunState::Running => pb::RunState::Running,
        domain::RunState::Succeeded => pb::RunState::Succeeded,
        domain::RunState::Failed => pb::RunState::Failed,
        domain::RunState::TimedOut => pb::RunState::TimedOut,
        domain::RunState::Cancelled => pb::RunState::Cancelled,
        domain::RunState::Skipped => pb::RunState::Skipped,
    }
}

/// API enum → run state; `None` for UNSPECIFIED.
///
/// # Errors
/// A violation on `field` for an unknown number.
pub fn state_from(field: &str, n: i32) -> Result<Option<domain::RunState>, FieldViolation> {
    match pb::RunState::try_from(n) {
        Ok(pb::RunState::Unspecified) => Ok(None),
        Ok(pb::RunState::Scheduled) => Ok(Some(domain::RunState::Scheduled)),
        Ok(pb::RunState::Queued) => Ok(Some(domain::RunState::Queued)),
        Ok(pb::RunState::TimedOut) => Ok(Some(domain::RunState::TimedOut)),
        Ok(pb::RunState::Cancelled) => Ok(Some(domain::RunState::Cancelled)),
        Ok(pb::RunState::Running) => Ok(Some(domain::RunState::Running)),
        Ok(pb::RunState::Succeeded) => Ok(Some(domain::RunState::Succeeded)),
        Ok(pb::RunState::Failed) => Ok(Some(domain::RunState::Failed)),
        Ok(pb::RunState::Skipped) => Ok(Some(domain::RunState::Skipped)),
        Err(_) => Err(FieldViolation::new(field, format!("{n} is not a RunState"))),
    }
}

/// Run → API.
pub fn run_to(r: &domain::Run) -> pb::Run {
    pb::Run {
        id: r.id.to_string(),
        tenant_id: r.tenant_id.clone(),
        binding_id: r.binding_id.to_string(),
        definition: r.definition.clone(),
        trigger: match r.trigger {
            domain::RunTrigger::Schedule => pb::RunTrigger::Schedule,
            domain::RunTrigger::Manual => pb::RunTrigger::Manual,
            domain::RunTrigger::Retry => pb::RunTrigger::Retry,
            domain::RunTrigger::Backfill => pb::RunTrigger::Backfill,
            domain::RunTrigger::Step => pb::RunTrigger::Step,
        } as i32,
        state: state_to(r.state) as i32,
        attempt: r.attempt,
        scheduled_time: Some(time_to(r.scheduled_time)),
        create_time: Some(time_to(r.create_time)),
        start_time: r.start_time.map(time_to),
        end_time: r.end_time.map(time_to),
        params: json_to_struct(&r.params),
        result: r.result.as_ref().and_then(json_to_struct),
        error: r.error_message.as_ref().map(|m| pb::RunError {
            message: m.clone(),
            summary: r.error_summary.clone().unwrap_or_default(),
        }),
        exit_code: r.exit_code,
        node_id: r.node_id.clone().unwrap_or_default(),
        reason: r
            .reason
            .clone()
            .or_else(|| r.cancel_reason.clone())
            .unwrap_or_default(),
        max_attempts: r.policy.retry.max_attempts as i32,
        retry_of: r.retry_of.map(|u| u.to_string()).unwrap_or_default(),
        idempotency_key: r.idempotency_key.clone().unwrap_or_default(),
        not_before: Some(time_to(r.not_before)),
        timeout: r.policy.timeout_secs.map(secs_to),
        progress: r.progress.as_ref().map(progress_to),
        // Filled in by the service from the run's step columns.
        parent_run_id: String::new(),
        step: String::new(),
        steps: Vec::new(),
    }
}

/// Progress → API.
pub fn progress_to(p: &domain::Progress) -> pb::Progress {
    pb::Progress {
        percent: p.percent,
        current_step: p.current_step,
        total_steps: p.total_steps,
        message: p.message.clone(),
    }
}

/// API progress → domain (validated), for a report such as a worker's
/// ReportProgress; `prefix` is the field path of the message.
///
/// # Errors
/// A violation naming `<prefix>.percent`, `<prefix>.current_step` or
/// `<prefix>.message` (see [`domain::Progress::validate`]).
pub fn progress_from(prefix: &str, p: &pb::Progress) -> Result<domain::Progress, FieldViolation> {
    let progress = domain::Progress {
        percent: p.percent,
        current_step: p.current_step,
        total_steps: p.total_steps,
        message: p.message.clone(),
    };
    progress.validate(prefix)?;
    Ok(progress)
}

/// Run event → API.
pub fn event_to(e: &domain::RunEvent) -> pb::RunEvent {
    let kind = match &e.body {
        domain::EventBody::StateChanged { from, to, reason } => {
            pb::run_event::Kind::StateChanged(pb::StateChanged {
                from_state: from.map_or(pb::RunState::Unspecified, state_to) as i32,
                to_state: state_to(*to) as i32,
                reason: reason.clone(),
            })
        }
        domain::EventBody::Log { stream, message } => pb::run_event::Kind::Log(pb::LogLine {
            level: if *stream == domain::LogStream::Stderr {
                "WARN"
            } else {
                "INFO"
            }
            .to_string(),
            stream: match stream {
                domain::LogStream::Stdout => pb::LogStream::Stdout,
                domain::LogStream::Stderr => pb::LogStream::Stderr,
                domain::LogStream::System => pb::LogStream::System,
            } as i32,
            message: message.clone(),
        }),
        domain::EventBody::Fired { params } => pb::run_event::Kind::Fired(pb::Fired {
            params: json_to_struct(params),
        }),
        domain::EventBody::Progress(p) => pb::run_event::Kind::Progress(progress_to(p)),
        domain::EventBody::NotificationDelivered(n) => notification_event_to(n, true),
        domain::EventBody::NotificationFailed(n) => notification_event_to(n, false),
    };
    pb::RunEvent {
        run_id: e.run_id.to_string(),
        seq: e.seq,
        time: Some(time_to(e.time)),
        tenant_id: e.tenant_id.clone(),
        binding_id: e.binding_id.to_string(),
        definition: e.definition.clone(),
        kind: Some(kind),
        step: String::new(),
    }
}

fn notification_event_to(n: &domain::NotificationOutcome, delivered: bool) -> pb::run_event::Kind {
    pb::run_event::Kind::Notification(pb::NotificationDelivery {
        notification_id: n.notification_id.to_string(),
        rule: n.rule.clone(),
        event: n.event.clone(),
        delivered,
        attempts: n.attempts,
        status_code: n.status_code,
        error: n.error.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_json_round_trip_keeps_integers() {
        let j = serde_json::json!({"n": 1, "f": 1.5, "s": "x", "l": [true, null], "o": {"k": -3}});
        let s = json_to_struct(&j).unwrap();
        assert_eq!(struct_to_json(&s), j);
    }

    #[test]
    fn interval_must_be_whole_seconds() {
        let s = pb::Schedule {
            kind: Some(pb::schedule::Kind::Interval(pb::IntervalSchedule {
                every: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                anchor_time: None,
            })),
            ..Default::default()
        };
        let e = schedule_from("definition.schedule", Some(&s)).unwrap_err();
        assert_eq!(e.field, "definition.schedule.interval.every");
    }

    #[test]
    fn tenant_scope_is_one_of_all_tenants_or_a_tenant_list() {
        use pb::tenant_scope::Scope;
        let f = "definition.tenant_scope";
        let scope = |s: Option<Scope>| pb::TenantScope { scope: s };
        let list = |ids: &[&str]| {
            Some(Scope::TenantList(pb::TenantList {
                tenant_ids: ids.iter().map(|t| t.to_string()).collect(),
            }))
        };
        assert_eq!(
            tenant_scope_from(f, None).unwrap(),
            domain::TenantScope::AllTenants
        );
        let all = scope(Some(Scope::AllTenants(true)));
        assert_eq!(
            tenant_scope_from(f, Some(&all)).unwrap(),
            domain::TenantScope::AllTenants
        );
        assert_eq!(tenant_scope_to(&domain::TenantScope::AllTenants), all);
        let b_a = scope(list(&["b", "a", "b"]));
        let allow = tenant_scope_from(f, Some(&b_a)).unwrap();
        assert_eq!(
            allow,
            domain::TenantScope::AllowList(vec!["a".into(), "b".into()])
        );
        assert_eq!(tenant_scope_to(&allow), scope(list(&["a", "b"])));
        // Neither form, an explicit false, an empty list: each names its field.
        let field = |s: pb::TenantScope| tenant_scope_from(f, Some(&s)).unwrap_err().field;
        assert_eq!(field(scope(None)), f);
        assert_eq!(
            field(scope(Some(Scope::AllTenants(false)))),
            "definition.tenant_scope.all_tenants"
        );
        assert_eq!(
            field(scope(list(&[]))),
            "definition.tenant_scope.tenant_list.tenant_ids"
        );
        assert_eq!(
            field(scope(list(&["a", "Not Valid"]))),
            "definition.tenant_scope.tenant_list.tenant_ids[1]"
        );
    }
}
