//! Audit summaries: the JSON `before` / `after` of an audit event. They hold
//! what an auditor needs to see what changed, never secrets (an API key's
//! hash is left out too).

use serde_json::{Value, json};

use crate::domain::tenancy::{ApiKey, Quota};
use crate::domain::{Binding, Definition, Run, TenantScope};

/// A definition: everything but timestamps.
pub fn definition(d: &Definition) -> Value {
    json!({
        "name": d.name,
        "display_name": d.display_name,
        "description": d.description,
        "labels": d.labels,
        "handler": d.handler,
        "schedule": d.schedule,
        "params": d.params,
        "misfire_policy": d.misfire_policy,
        "overlap_policy": d.policy.overlap.as_str(),
        "retry_policy": d.policy.retry,
        "timeout_secs": d.policy.timeout_secs,
        "priority": d.policy.priority,
        "enabled": d.enabled,
        "deletion_protection": d.protected,
        "max_output_bytes": d.max_output_bytes,
        "max_active_runs": d.max_active_runs,
        "tenant_scope": match &d.tenant_scope {
            TenantScope::AllTenants => json!("ALL_TENANTS"),
            TenantScope::AllowList(l) => json!(l),
        },
        "etag": d.version.to_string(),
    })
}

/// A binding: what the tenant set, plus pause state and next fire time.
pub fn binding(b: &Binding) -> Value {
    json!({
        "id": b.id,
        "tenant_id": b.tenant_id,
        "definition": b.definition,
        "schedule": b.schedule,
        "params": b.params,
        "effective_from": b.effective_from,
        "effective_until": b.effective_until,
        "enabled": b.enabled,
        "paused": b.paused,
        "pause_note": b.pause_note,
        "pause_expire_time": b.pause_expire_time,
        "next_run_time": b.next_run_time,
        "timeout_secs": b.overrides.timeout_secs,
        "retry_policy": b.overrides.retry,
        "priority": b.overrides.priority,
        "max_active_runs": b.overrides.max_active_runs,
        "broken_reason": b.broken_reason,
        "etag": b.version.to_string(),
    })
}

/// A run: identity, state and why.
pub fn run(r: &Run) -> Value {
    json!({
        "id": r.id,
        "binding_id": r.binding_id,
        "definition": r.definition,
        "trigger": r.trigger.as_str(),
        "state": r.state.as_str(),
        "attempt": r.attempt,
        "scheduled_time": r.scheduled_time,
        "reason": r.reason,
        "cancel_reason": r.cancel_reason,
        "idempotency_key": r.idempotency_key,
    })
}

/// A quota (null = unlimited).
pub fn quota(q: &Quota) -> Value {
    json!({
        "max_concurrent_runs": q.max_concurrent_runs,
        "max_runs_per_hour": q.max_runs_per_hour,
        "max_bindings": q.max_bindings,
    })
}

/// An API key without its hash.
pub fn api_key(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "role": k.role.as_str(),
        "tenant_id": k.tenant_id,
        "revoke_time": k.revoke_time,
    })
}
