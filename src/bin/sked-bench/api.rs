//! Scenario setup through the public gRPC API: requests with the tenant
//! header, timestamps, the tenant/definition layout of N bindings, and
//! bounded-concurrency bulk calls.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use sked::proto::v1 as pb;
use tonic::Request;
use tonic::transport::Channel;

use crate::env::{Env, progress};

pub use pb::binding_service_client::BindingServiceClient;
pub use pb::definition_service_client::DefinitionServiceClient;
pub use pb::run_service_client::RunServiceClient;

/// `msg` with the `x-tenant-id` header (none when `tenant` is empty).
/// Authentication is off on the bench's nodes, so no key is needed.
pub fn req<T>(tenant: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if !tenant.is_empty()
        && let Ok(v) = tenant.parse()
    {
        r.metadata_mut().insert("x-tenant-id", v);
    }
    r
}

/// A protobuf timestamp.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A protobuf timestamp as chrono (UTC); the epoch when out of range.
pub fn from_ts(t: &prost_types::Timestamp) -> DateTime<Utc> {
    Utc.timestamp_opt(t.seconds, t.nanos.max(0) as u32)
        .single()
        .unwrap_or_default()
}

/// Now, truncated to microseconds (PostgreSQL's resolution), so instants the
/// bench computes compare exactly with `timestamptz` columns.
pub fn now_us() -> DateTime<Utc> {
    let n = Utc::now();
    Utc.timestamp_micros(n.timestamp_micros())
        .single()
        .unwrap_or(n)
}

/// A protobuf duration of whole seconds.
pub fn secs(s: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: s,
        nanos: 0,
    }
}

/// An interval schedule every `every` seconds, anchored at `anchor`
/// (the binding's creation time when `None`).
pub fn interval(every: i64, anchor: Option<DateTime<Utc>>) -> pb::Schedule {
    pb::Schedule {
        kind: Some(pb::schedule::Kind::Interval(pb::IntervalSchedule {
            every: Some(secs(every)),
            anchor_time: anchor.map(ts),
        })),
        ..Default::default()
    }
}

/// A cron schedule in UTC.
pub fn cron(expr: &str) -> pb::Schedule {
    pb::Schedule {
        kind: Some(pb::schedule::Kind::Cron(pb::CronSchedule {
            expression: expr.into(),
        })),
        ..Default::default()
    }
}

/// A trigger-only schedule.
pub fn manual() -> pb::Schedule {
    pb::Schedule {
        kind: Some(pb::schedule::Kind::Manual(pb::ManualSchedule {})),
        ..Default::default()
    }
}

/// A definition of the `event` handler (publishes `fired`, succeeds at once).
pub fn event_def(name: &str, schedule: pb::Schedule) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
        schedule: Some(schedule),
        ..Default::default()
    }
}

/// How N bindings are laid out. A tenant can bind a definition once
/// (`UNIQUE (tenant_id, definition)`), so N bindings over T tenants need
/// ⌈N ÷ T⌉ definitions of the same shape: binding `i` belongs to tenant
/// `bench-<i mod T>` and binds definition `<prefix>.<i div T>`.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Definition name prefix, e.g. `bench.tick`.
    pub prefix: String,
    /// Bindings.
    pub bindings: usize,
    /// Tenants (at most `bindings`).
    pub tenants: usize,
}

impl Layout {
    /// `bindings` over `tenants` tenants (capped at `bindings`).
    pub fn new(prefix: &str, bindings: usize, tenants: usize) -> Layout {
        Layout {
            prefix: prefix.into(),
            bindings,
            tenants: tenants.clamp(1, bindings.max(1)),
        }
    }

    /// Definitions needed.
    pub fn definitions(&self) -> usize {
        self.bindings.div_ceil(self.tenants)
    }

    /// Name of definition `j`.
    pub fn definition(&self, j: usize) -> String {
        format!("{}.{j}", self.prefix)
    }

    /// Tenant of binding `i`.
    pub fn tenant_of(&self, i: usize) -> String {
        tenant(i % self.tenants)
    }

    /// Definition of binding `i`.
    pub fn definition_of(&self, i: usize) -> String {
        self.definition(i / self.tenants)
    }
}

/// Name of tenant `k`.
pub fn tenant(k: usize) -> String {
    format!("bench-{k:03}")
}

/// A created binding.
#[derive(Debug, Clone)]
pub struct Bound {
    /// Binding id (UUID).
    pub id: String,
    /// Its tenant.
    pub tenant: String,
}

/// Runs `call(i)` for `i` in `0..n` with at most `limit` calls in flight,
/// printing progress every 5 s; returns the results in index order. Stops
/// at the first error.
///
/// # Errors
/// The first failed call, with `what` and its index.
pub async fn bulk<R, F, Fut>(what: &str, n: usize, limit: usize, call: F) -> anyhow::Result<Vec<R>>
where
    R: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    let started = Instant::now();
    let mut last_note = Instant::now();
    let mut done = 0usize;
    let mut record = |r: Result<(usize, anyhow::Result<R>), tokio::task::JoinError>,
                      done: &mut usize|
     -> anyhow::Result<()> {
        let (i, r) = r.context("setup task panicked")?;
        out[i] = Some(r.with_context(|| format!("{what} #{i}"))?);
        *done += 1;
        Ok(())
    };
    for i in 0..n {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let fut = call(i);
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            (i, r)
        });
        while let Some(r) = set.try_join_next() {
            record(r, &mut done)?;
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            last_note = Instant::now();
            progress!("{what}: {done}/{n}");
        }
    }
    while let Some(r) = set.join_next().await {
        record(r, &mut done)?;
    }
    let secs = started.elapsed().as_secs_f64();
    if n > 0 {
        progress!(
            "{what}: {n} in {secs:.1} s ({:.0}/s)",
            n as f64 / secs.max(1e-9)
        );
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every index recorded"))
        .collect())
}

/// Creates the layout's definitions, each `make(name)`, through the nodes.
///
/// # Errors
/// The first failed CreateDefinition.
pub async fn create_definitions(
    env: &Env,
    layout: &Layout,
    make: impl Fn(&str) -> pb::TaskDefinition,
) -> anyhow::Result<()> {
    let channels = env.channels();
    bulk(
        "CreateDefinition",
        layout.definitions(),
        env.common.concurrency,
        |j| {
            let def = make(&layout.definition(j));
            let ch = channels[j % channels.len()].clone();
            async move {
                DefinitionServiceClient::new(ch)
                    .create_definition(req(
                        "",
                        pb::CreateDefinitionRequest {
                            definition: Some(def),
                        },
                    ))
                    .await?;
                Ok(())
            }
        },
    )
    .await?;
    Ok(())
}

/// Creates the layout's bindings, binding `i` with schedule override
/// `schedule(i)` (none = the definition's), through the nodes round-robin.
/// Returns them in index order.
///
/// # Errors
/// The first failed CreateBinding.
pub async fn create_bindings(
    env: &Env,
    layout: &Layout,
    schedule: impl Fn(usize) -> Option<pb::Schedule>,
) -> anyhow::Result<Vec<Bound>> {
    create_bindings_until(env, layout, schedule, None).await
}

/// [`create_bindings`] with their effective windows already ended: each
/// ends at the instant this call started, so none fires, however long the
/// creation takes, while BackfillRuns still fills their past. (Ending the
/// windows after creation let the first bindings fire every second while
/// the rest were created: at 5 000 bindings, some 66 000 runs beyond the
/// backlog.)
pub async fn create_ended_bindings(
    env: &Env,
    layout: &Layout,
    schedule: impl Fn(usize) -> Option<pb::Schedule>,
) -> anyhow::Result<Vec<Bound>> {
    create_bindings_until(env, layout, schedule, Some(ts(Utc::now()))).await
}

async fn create_bindings_until(
    env: &Env,
    layout: &Layout,
    schedule: impl Fn(usize) -> Option<pb::Schedule>,
    effective_until: Option<prost_types::Timestamp>,
) -> anyhow::Result<Vec<Bound>> {
    let channels = env.channels();
    bulk(
        "CreateBinding",
        layout.bindings,
        env.common.concurrency,
        |i| {
            let tenant = layout.tenant_of(i);
            let binding = pb::Binding {
                definition: layout.definition_of(i),
                schedule: schedule(i),
                effective_until,
                ..Default::default()
            };
            let ch = channels[i % channels.len()].clone();
            async move {
                let b = BindingServiceClient::new(ch)
                    .create_binding(req(
                        &tenant,
                        pb::CreateBindingRequest {
                            binding: Some(binding),
                        },
                    ))
                    .await?
                    .into_inner();
                Ok(Bound { id: b.id, tenant })
            }
        },
    )
    .await
}

/// PreviewSchedule: the first fire time of `schedule` strictly after `after`.
///
/// # Errors
/// The call fails, or the schedule never fires after `after`.
pub async fn first_fire_after(
    ch: Channel,
    schedule: pb::Schedule,
    after: DateTime<Utc>,
) -> anyhow::Result<DateTime<Utc>> {
    let r = DefinitionServiceClient::new(ch)
        .preview_schedule(req(
            "",
            pb::PreviewScheduleRequest {
                schedule: Some(schedule),
                count: 1,
                after: Some(ts(after)),
            },
        ))
        .await?
        .into_inner();
    let t = r
        .fire_times
        .first()
        .and_then(|f| f.time.as_ref())
        .context("the schedule has no fire time")?;
    Ok(from_ts(t))
}
