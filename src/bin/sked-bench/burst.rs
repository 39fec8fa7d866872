//! `burst`: N bindings due at the same instant (target, `docs/operations.md`: a per-minute cron
//! burst of 100 000 bindings at :00 all started within 10 s).
//!
//! Setup: definitions `bench.burst.<j>` with the `event` handler and the
//! cron schedule `--cron` (UTC; default every minute, a six-field cron with
//! leading seconds also works); N bindings that inherit it. Once they exist,
//! T = the cron's first fire time at least 5 s ahead (asked of the node with
//! PreviewSchedule). From T on, the database is polled every 250 ms until
//! all N runs with `scheduled_time = T` have a `start_time`, or 120 s have
//! passed. Reported: time from T until the last run started
//! (`max(start_time) − T`), lag (`start_time − T`) p50/p99, the fraction
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
    sleep_until(t).await;
    let cpu0 = env.cpu_snapshot().await;
    let limit = t + TimeDelta::seconds(a.timeout as i64);
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
    r.num(
        "all_started_ms",
        "fire instant → last run started",
        if all { last_start.map(ms1) } else { None },
        "ms",
        Target::AtMost(10_000.0),
    );
    r.num("lag_p50_ms", "start lag p50", ms1o(p50), "ms", Target::Info);
    r.num("lag_p99_ms", "start lag p99", ms1o(p99), "ms", Target::Info);
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
    Ok(r)
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
