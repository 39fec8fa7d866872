//! `burst`: N bindings due at the same instant (target, `docs/operations.md`: a per-minute cron
//! burst of 100 000 bindings at :00 all started within 10 s).
//!
//! Setup: definitions `bench.burst.<j>` with the `event` handler and the
//! cron schedule `--cron` (UTC; default every minute, a six-field cron with
//! leading seconds also works); N bindings that inherit it. Once they exist,
//! T = the cron's first fire time at least 5 s ahead (asked of the node with
//! PreviewSchedule). 2 s before T, one `WatchEvents` subscription (kind
//! `fired`) per tenant is opened on the node. From T on, the database is polled
//! every 250 ms until all N runs with `scheduled_time = T` have a
//! `start_time`, or `--timeout` seconds have passed; then the subscribers
//! get up to 5 s more to receive every run's `fired` event.
//!
//! Reported, where a user sees it (issue 18): the time from T until the
//! last `fired` event arrived at a subscriber (the target: every run
//! started, and seen, ≤ 2 s after T), and the arrival lag p50/p99. The
//! stored `start_time − T` is printed for comparison only: a run fired
//! ahead of its instant records its instant as its start. Also the fraction
//! started, when the last run row was created, CPU over the burst.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use clap::Args;
use serde_json::json;

use crate::Common;
use crate::api::{self, Layout};
use crate::env::{Env, progress};
use crate::fire::sleep_until;
use crate::report::{Report, Target};
use crate::stats::{ms1, ms1o, round};

/// Flags of `burst`.
#[derive(Debug, Clone, Args)]
pub struct BurstArgs {
    /// Bindings, all due at the same instant.
    #[arg(long, default_value_t = 100_000)]
    pub bindings: usize,
    /// Cron expression of the bindings (UTC); five fields, or six with
    /// leading seconds (e.g. '*/5 * * * * *').
    #[arg(long, default_value = "* * * * *")]
    pub cron: String,
    /// Give up waiting for the runs this many seconds after the fire instant.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub common: Common,
}

/// Poll period of the database while the burst runs.
const POLL: Duration = Duration::from_millis(250);
/// The fire instant measured is at least this far ahead of the end of setup.
const LEAD: TimeDelta = TimeDelta::seconds(5);
/// The subscribers are opened this long before the fire instant.
const WATCH_LEAD: TimeDelta = TimeDelta::seconds(2);

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls or measurement queries failing.
pub async fn run(env: &mut Env, a: BurstArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.bindings >= 1, "--bindings must be at least 1");
    let n = a.bindings;
    let layout = Layout::new("bench.burst", n, env.common.tenants);
    progress!(
        "burst: {n} bindings on cron {:?}, {} definitions over {} tenants",
        a.cron,
        layout.definitions(),
        layout.tenants
    );
    let cron = a.cron.clone();
    api::create_definitions(env, &layout, |name| api::event_def(name, api::cron(&cron))).await?;
    api::create_bindings(env, &layout, |_| None).await?;

    let after = Utc::now() + LEAD - TimeDelta::microseconds(1);
    let t = api::first_fire_after(env.channel(0), api::cron(&a.cron), after).await?;
    progress!("waiting for the fire at {t} ({:.1} s)", secs_until(t));
    // Subscribed shortly before T: a fire of the bindings at an earlier
    // instant (they fire during setup) is over by then, and does not count
    // towards the N events the subscribers wait for.
    sleep_until(t - WATCH_LEAD).await;
    let tenants: Vec<String> = (0..layout.tenants).map(api::tenant).collect();
    let limit = t + TimeDelta::seconds(a.timeout as i64);
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let mut watching =
        crate::fire::watch_fired(env.channel(0), tenants, limit, n, stop_watching.clone()).await?;
    sleep_until(t).await;
    let cpu0 = env.cpu_snapshot().await;
    let (mut rows, mut started);
    loop {
        (rows, started) = counts(env, t).await?;
        if started >= n as i64 || Utc::now() > limit {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let cpu1 = env.cpu_snapshot().await;
    let cpu = cpu0.percent_until(&cpu1);
    let rss = env.sked_rss_mib();
    progress!("{started}/{n} started");
    let watched = match tokio::time::timeout(Duration::from_secs(5), &mut watching).await {
        Ok(w) => w?,
        Err(_) => {
            stop_watching.cancel();
            watching.await?
        }
    };
    let seen = Seen::of(env, &watched, t).await?;

    let (last_start, p50, p99, last_created, skipped): (
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        i64,
    ) = sqlx::query_as(
        "SELECT max(extract(epoch FROM start_time - $1)::float8 * 1000),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM start_time - $1)::float8 * 1000),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM start_time - $1)::float8 * 1000),
                max(extract(epoch FROM create_time - $1)::float8 * 1000),
                count(*) FILTER (WHERE state = 'SKIPPED')
         FROM runs WHERE trigger = 'SCHEDULE' AND scheduled_time = $1",
    )
    .bind(t)
    .fetch_one(&env.pool)
    .await?;
    let all = started >= n as i64;

    let mut params = env.common.params();
    params.insert("bindings".into(), json!(a.bindings));
    params.insert("cron".into(), json!(a.cron));
    params.insert("timeout".into(), json!(a.timeout));
    let mut r = Report::new(params);
    r.count(
        "runs_created",
        "runs created for the instant",
        rows,
        Target::Info,
    );
    r.count("runs_started", "runs started", started, Target::Info);
    r.num(
        "started_percent",
        "runs started",
        Some(round(started as f64 / n as f64 * 100.0, 3)),
        "%",
        Target::AtLeast(100.0),
    );
    let received = seen.matched;
    r.count(
        "events_received",
        "fired events received by the subscribers",
        received as i64,
        Target::Info,
    );
    let all_seen = all && received >= n;
    r.num(
        "all_started_ms",
        "fire instant → last fired event received",
        seen.lag.max_ms().filter(|_| all_seen),
        "ms",
        Target::AtMost(2_000.0),
    );
    r.num(
        "lag_p50_ms",
        "fired event lag p50 (at a WatchEvents subscriber)",
        seen.lag.quantile_ms(0.5),
        "ms",
        Target::Info,
    );
    r.num(
        "lag_p99_ms",
        "fired event lag p99 (at a WatchEvents subscriber)",
        seen.lag.quantile_ms(0.99),
        "ms",
        Target::Info,
    );
    r.num(
        "start_max_ms",
        "stored start_time − instant, max (comparison only)",
        last_start.map(ms1),
        "ms",
        Target::Info,
    );
    r.num(
        "start_p50_ms",
        "stored start_time − instant, p50 (comparison only)",
        ms1o(p50),
        "ms",
        Target::Info,
    );
    r.num(
        "start_p99_ms",
        "stored start_time − instant, p99 (comparison only)",
        ms1o(p99),
        "ms",
        Target::Info,
    );
    r.num(
        "last_created_ms",
        "fire instant → last run row created",
        ms1o(last_created),
        "ms",
        Target::Info,
    );
    r.count("skipped", "runs SKIPPED", skipped, Target::Info);
    r.num(
        "sked_cpu_percent",
        "sked CPU during the burst",
        Some(round(cpu.sked, 1)),
        "% of a core",
        Target::Info,
    );
    r.num(
        "postgres_cpu_percent",
        "PostgreSQL CPU during the burst",
        cpu.pg.map(|v| round(v, 1)),
        "% of a core",
        Target::Info,
    );
    r.num(
        "sked_rss_mib",
        "sked RSS (all nodes)",
        rss.map(|v| round(v, 1)),
        "MiB",
        Target::Info,
    );
    r.extra("fire_time", json!(t.to_rfc3339()));
    if !all {
        r.note(format!(
            "only {started} of {n} runs started within {} s of the fire instant",
            a.timeout
        ));
    }
    if received < n {
        r.note(format!(
            "the subscribers had received {received} of the {n} fired events 5 s after the last run started"
        ));
    }
    if watched.missed > 0 || watched.broken > 0 {
        r.note(format!(
            "the subscribers were told of {} events not delivered; {} subscriptions ended early",
            watched.missed, watched.broken
        ));
    }
    Ok(r)
}

/// What the subscribers saw of the runs fired for instant `t`.
struct Seen {
    /// Arrival − `t` of each received `fired` event of those runs.
    lag: crate::stats::Histogram,
    /// Received events that belong to those runs.
    matched: usize,
}

impl Seen {
    async fn of(
        env: &Env,
        watched: &crate::fire::Watched,
        t: DateTime<Utc>,
    ) -> anyhow::Result<Seen> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE trigger = 'SCHEDULE' AND scheduled_time = $1",
        )
        .bind(t)
        .fetch_all(&env.pool)
        .await?;
        let ids: std::collections::HashSet<uuid::Uuid> = ids.into_iter().collect();
        let mut lag = crate::stats::Histogram::default();
        let mut matched = 0;
        for (id, at) in &watched.received {
            if ids.contains(id) {
                matched += 1;
                lag.record((*at - t).num_microseconds().unwrap_or(i64::MAX).max(0) as u64);
            }
        }
        Ok(Seen { lag, matched })
    }
}

/// (runs for instant `t`, of which started).
async fn counts(env: &Env, t: DateTime<Utc>) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), count(start_time) FROM runs
         WHERE trigger = 'SCHEDULE' AND scheduled_time = $1",
    )
    .bind(t)
    .fetch_one(&env.pool)
    .await?)
}

fn secs_until(t: DateTime<Utc>) -> f64 {
    (t - Utc::now()).num_milliseconds() as f64 / 1e3
}
