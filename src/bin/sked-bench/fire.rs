//! `fire`: fire accuracy of N bindings every 1 s (target, `docs/operations.md`: ≥ 99.99 % of
//! fires run, 0 duplicates, fire lag p99 ≤ 50 ms).
//!
//! Setup: definitions `bench.tick.<j>` with the `event` handler; N bindings,
//! each overriding the schedule with an interval of 1 s. By default binding
//! `i` is anchored at `t0 + i/N s` (phases spread uniformly over the second,
//! as bindings created at different times are); `--aligned` anchors all of
//! them at the same whole second.
//!
//! After `--warmup` seconds the window `[w0, w0 + measure)` is measured.
//! About 3 s after it ends, from the database:
//! * expected fires: per binding, the fire times `anchor + k s` inside the
//!   window, counted exactly from its anchor;
//! * fired: runs with trigger SCHEDULE, `scheduled_time` in the window and
//!   state SUCCEEDED;
//! * duplicates: (schedule runs in the window − distinct (binding,
//!   scheduled_time)) + runs with more than one `fired` event;
//! * lag, where a user sees it (issue 18): one `WatchEvents` subscription
//!   (kind `fired`) per tenant on the first node, opened before the
//!   warm-up (`--watchers-per-tenant K`: K per tenant, each a stream of its
//!   own, so each event is sent K times); each `fired` event of a run fired
//!   in the window, at every subscription, its arrival time − the run's
//!   fire time, p50/p99/max; every fired run's event must arrive at every
//!   subscription of its tenant, and none may be reported missed. A note
//!   gives the five seconds of the window whose fires arrived latest (due
//!   time in UTC, lag max and p99, fires), to set beside PostgreSQL's log. The stored
//!   `start_time − scheduled_time` is printed too (`start_lag_*`), for
//!   comparison only: a run fired ahead of its instant (`--fire-ahead`)
//!   records its fire time as its start;
//! * CPU of the nodes and of PostgreSQL over the window, nodes' RSS.
//!
//! `--hostile-tenants K` adds a backfill flood during the window (limits:
//! no tenant may slow another's schedule): K more tenants (`hostile-<k>`)
//! each bind `bench.hostile` (`event`, every 1 s, overlap `SKIP`, so its
//! runs go one at a time) and call BackfillRuns for `--hostile-runs` past
//! fire times, again and again (one call in flight per tenant) until the
//! window ends. The figures above are then the other tenants'; the target
//! for their lag p99 is 100 ms.
//!
//! `--retention-drop E` measures firing while retention drops a day (issue
//! 15: `fire` at 10 000 bindings keeps lag p99 ≤ 50 ms while retention
//! drops a day of 10 000 000 events). Before it creates the bindings
//! (no fire may overlap it) the bench writes E log events of runs created
//! 40 days ago (1 000 events per run, ids of that UTC day) into a table of
//! `run_events`' shape with its primary key and a check of the day's id
//! range (fast SQL: `generate_series`, outside any measurement), then
//! `VACUUM` and a `CHECKPOINT` so that neither autovacuum's first pass
//! over the fill nor writing it back lands in the
//! window (a day retention drops was written and vacuumed long before). A
//! quarter into the window it attaches that table as the day's partition (the check makes `ATTACH` skip its scan), and the
//! nodes' leader — retention passes every second in this scenario, default
//! retention 30 days — detaches and drops it while the bindings fire. The
//! bench watches the table until it is gone and reports when, and whether
//! that was inside the window (target: yes).

use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use clap::Args;
use serde_json::json;

use crate::Common;
use crate::api::{self, Layout};
use crate::env::{Env, progress};
use crate::report::{Report, Target};
use crate::stats::{ms1o, round};
use sked::proto::v1 as pb;

/// Flags of `fire`.
#[derive(Debug, Clone, Args)]
pub struct FireArgs {
    /// Bindings, each firing every second.
    #[arg(long, default_value_t = 10_000)]
    pub bindings: usize,
    /// Seconds between creating the bindings and the measured window.
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Length of the measured window, seconds.
    #[arg(long, default_value_t = 60)]
    pub measure: u64,
    /// Anchor every binding at the same whole second (all fire at once)
    /// instead of spreading their phases over the second.
    #[arg(long)]
    pub aligned: bool,
    /// `WatchEvents` subscriptions per tenant (1 to 64), each a stream of
    /// its own on the first node: every `fired` event is sent this many
    /// times, and the lag is measured at each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub watchers_per_tenant: u64,
    /// Tenants flooding the queue with backfilled runs during the window
    /// (0 = none).
    #[arg(long, default_value_t = 0)]
    pub hostile_tenants: usize,
    /// Fire times per BackfillRuns call of a hostile tenant (≤ 10 000).
    #[arg(long, default_value_t = 10_000)]
    pub hostile_runs: i64,
    /// Events of a day 40 days old for retention to drop during the window
    /// (0 = none; the issue's figure is 10 000 000).
    #[arg(long, default_value_t = 0)]
    pub retention_drop: u64,
    #[command(flatten)]
    pub common: Common,
}

/// The window's runs: (runs, distinct (binding, time), succeeded, skipped,
/// not finished, lag p50, p99, max in ms).
type WindowRow = (
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<f64>,
    Option<f64>,
    Option<f64>,
);

/// Seconds waited after the window before reading the results.
const SETTLE: Duration = Duration::from_secs(3);

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls or measurement queries failing.
pub async fn run(env: &mut Env, a: FireArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.bindings >= 1, "--bindings must be at least 1");
    anyhow::ensure!(a.measure >= 1, "--measure must be at least 1");
    let n = a.bindings;
    let layout = Layout::new("bench.tick", n, env.common.tenants);
    progress!(
        "fire: {n} bindings every 1 s ({}), {} definitions over {} tenants",
        if a.aligned {
            "aligned"
        } else {
            "phases spread over the second"
        },
        layout.definitions(),
        layout.tenants
    );
    // The old day is written before any binding exists: its ~60 s of
    // bulk writing is setup, and fires meanwhile would leave the window a
    // `runs` table a minute older than plain `fire`'s (autovacuum of it
    // inside the window), so the figure would not be the drop's alone.
    let old_day = if a.retention_drop > 0 {
        Some(fill_old_day(env, a.retention_drop).await?)
    } else {
        None
    };
    api::create_definitions(env, &layout, |name| {
        api::event_def(name, api::interval(1, None))
    })
    .await?;

    // Anchors, whole microseconds (the database's resolution).
    let t0 = Utc
        .timestamp_opt(Utc::now().timestamp(), 0)
        .single()
        .expect("valid now");
    let anchors: Vec<DateTime<Utc>> = (0..n)
        .map(|i| {
            if a.aligned {
                t0
            } else {
                t0 + TimeDelta::microseconds((i as i64 * 1_000_000) / n as i64)
            }
        })
        .collect();
    let setup_started = std::time::Instant::now();
    api::create_bindings(env, &layout, |i| Some(api::interval(1, Some(anchors[i])))).await?;
    let setup_secs = setup_started.elapsed().as_secs_f64();

    let hostile = if a.hostile_tenants > 0 {
        hostile_bindings(env, a.hostile_tenants).await?
    } else {
        Vec::new()
    };

    // Subscribed before the warm-up, so every fire of the window reaches
    // them; they stop a little after the settling time.
    let watch_until =
        Utc::now() + TimeDelta::seconds((a.warmup + a.measure + SETTLE.as_secs()) as i64 + 2);
    let tenants: Vec<String> = (0..layout.tenants)
        .flat_map(|t| std::iter::repeat_n(api::tenant(t), a.watchers_per_tenant as usize))
        .collect();
    let watching = watch_fired(
        env.channel(0),
        tenants,
        watch_until,
        usize::MAX,
        Default::default(),
    )
    .await?;
    progress!("warm-up {} s", a.warmup);
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let w0 = api::now_us();
    let w1 = w0 + TimeDelta::seconds(a.measure as i64);
    let cpu0 = env.cpu_snapshot().await;
    progress!("measuring {} s", a.measure);
    let flood = flood(env, hostile, a.hostile_runs, w1);
    let dropped = match &old_day {
        Some(day) => {
            sleep_until(w0 + TimeDelta::milliseconds(a.measure as i64 * 250)).await;
            Some(attach_and_watch(env, day, w1).await?)
        }
        None => None,
    };
    sleep_until(w1).await;
    let flooded = flood.await;
    let cpu1 = env.cpu_snapshot().await;
    let rss = env.sked_rss_mib();
    let cpu = cpu0.percent_until(&cpu1);
    progress!("window over; settling {} s", SETTLE.as_secs());
    tokio::time::sleep(SETTLE).await;

    let expected: i64 = anchors.iter().map(|&a| fires_in(a, w0, w1)).sum();
    let (runs, distinct, fired, skipped, pending, p50, p99, max): WindowRow = sqlx::query_as(
        "SELECT count(*),
                count(DISTINCT (binding_id, scheduled_time)),
                count(*) FILTER (WHERE state = 'SUCCEEDED'),
                count(*) FILTER (WHERE state = 'SKIPPED'),
                count(*) FILTER (WHERE state IN ('SCHEDULED', 'QUEUED', 'RUNNING')),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM start_time - scheduled_time)::float8 * 1000)
                    FILTER (WHERE state = 'SUCCEEDED'),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM start_time - scheduled_time)::float8 * 1000)
                    FILTER (WHERE state = 'SUCCEEDED'),
                (max(extract(epoch FROM start_time - scheduled_time)::float8 * 1000)
                    FILTER (WHERE state = 'SUCCEEDED'))
         FROM runs
         WHERE trigger = 'SCHEDULE' AND scheduled_time >= $1 AND scheduled_time < $2
           AND tenant_id NOT LIKE 'hostile-%'",
    )
    .bind(w0)
    .bind(w1)
    .fetch_one(&env.pool)
    .await?;
    let (multi_fired, without_fired): (i64, i64) = sqlx::query_as(
        r#"SELECT count(*) FILTER (WHERE f > 1), count(*) FILTER (WHERE f = 0 AND state = 'SUCCEEDED')
         FROM (SELECT r.id, r.state, count(e.run_id) AS f
               FROM runs r LEFT JOIN run_events e ON e.run_id = r.id
                 AND (e.kind = 'fired' OR (e.kind = 'batch' AND e.payload @> '[{"kind": "fired"}]'))
               WHERE r.trigger = 'SCHEDULE' AND r.scheduled_time >= $1 AND r.scheduled_time < $2
                 AND r.tenant_id NOT LIKE 'hostile-%'
               GROUP BY r.id, r.state) w"#,
    )
    .bind(w0)
    .bind(w1)
    .fetch_one(&env.pool)
    .await?;
    let duplicates = (runs - distinct) + multi_fired;
    let watched = watching.await?;
    // Around the drop: from 1 s before the attach to 1 s after the drop.
    let near = dropped.as_ref().map(|d| {
        (
            d.attached_at - TimeDelta::seconds(1),
            d.gone_at + TimeDelta::seconds(1),
        )
    });
    let seen = SeenLag::of(env, &watched, w0, w1, near).await?;
    let fired_pct = if expected > 0 {
        Some(round(fired as f64 / expected as f64 * 100.0, 3))
    } else {
        None
    };

    let mut params = env.common.params();
    params.insert("bindings".into(), json!(a.bindings));
    params.insert("warmup".into(), json!(a.warmup));
    params.insert("measure".into(), json!(a.measure));
    params.insert("aligned".into(), json!(a.aligned));
    params.insert("watchers_per_tenant".into(), json!(a.watchers_per_tenant));
    params.insert("hostile_tenants".into(), json!(a.hostile_tenants));
    params.insert("hostile_runs".into(), json!(a.hostile_runs));
    params.insert("retention_drop".into(), json!(a.retention_drop));
    let mut r = Report::new(params);
    r.count(
        "expected_fires",
        "fires due in the window",
        expected,
        Target::Info,
    );
    r.count("fired", "fires run (SUCCEEDED)", fired, Target::Info);
    r.num(
        "fired_percent",
        "fires run",
        fired_pct,
        "%",
        Target::AtLeast(99.99),
    );
    r.count(
        "duplicates",
        "duplicate fires",
        duplicates,
        Target::Equal(0.0),
    );
    r.num(
        "lag_p50_ms",
        "fire lag p50 (fired event at a WatchEvents subscriber)",
        seen.hist.quantile_ms(0.5),
        "ms",
        Target::Info,
    );
    r.num(
        "lag_p99_ms",
        "fire lag p99 (fired event at a WatchEvents subscriber)",
        seen.hist.quantile_ms(0.99),
        "ms",
        Target::AtMost(if a.hostile_tenants > 0 { 100.0 } else { 50.0 }),
    );
    r.num(
        "lag_max_ms",
        "fire lag max (fired event at a WatchEvents subscriber)",
        seen.hist.max_ms(),
        "ms",
        Target::Info,
    );
    r.count(
        "fired_events_received",
        "fired events of the window's runs received by the subscribers",
        seen.matched as i64,
        Target::Equal((fired * a.watchers_per_tenant as i64) as f64),
    );
    r.count(
        "events_missed",
        "events the node did not deliver to the subscribers (missed_events)",
        watched.missed as i64,
        Target::Equal(0.0),
    );
    if watched.broken > 0 {
        r.note(format!(
            "{} WatchEvents subscriptions ended early",
            watched.broken
        ));
    }
    r.num(
        "start_lag_p50_ms",
        "start_time − fire time p50 (stored)",
        ms1o(p50),
        "ms",
        Target::Info,
    );
    r.num(
        "start_lag_p99_ms",
        "start_time − fire time p99 (stored)",
        ms1o(p99),
        "ms",
        Target::Info,
    );
    r.num(
        "start_lag_max_ms",
        "start_time − fire time max (stored)",
        ms1o(max),
        "ms",
        Target::Info,
    );
    r.count(
        "skipped",
        "fires SKIPPED (misfire/overlap)",
        skipped,
        Target::Info,
    );
    // The seconds whose fires reached the subscribers latest, with when
    // they were due: a p99 miss is usually a few bad seconds, and their
    // times can be set beside PostgreSQL's log (autovacuum, checkpoints) or
    // the node's.
    if !seen.worst.is_empty() {
        r.note(format!(
            "worst seconds (due at, UTC: lag max / p99 at the subscriber, fires): {}",
            seen.worst
                .iter()
                .map(|(t, max, p99, n)| format!(
                    "{} {:.1} / {:.1} ms, {n}",
                    t.format("%H:%M:%S"),
                    max,
                    p99
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    r.count(
        "not_finished",
        "runs not finished 3 s after the window",
        pending,
        Target::Info,
    );
    r.count(
        "succeeded_without_fired_event",
        "SUCCEEDED runs without a fired event",
        without_fired,
        Target::Info,
    );
    r.num(
        "sked_cpu_percent",
        "sked CPU (all nodes)",
        Some(round(cpu.sked, 1)),
        "% of a core",
        Target::Info,
    );
    r.num(
        "postgres_cpu_percent",
        "PostgreSQL CPU",
        cpu.pg.map(|v| round(v, 1)),
        "% of a core",
        Target::Info,
    );
    r.machine_cpu("window", "in the window", &cpu);
    r.num(
        "sked_rss_mib",
        "sked RSS (all nodes)",
        rss.map(|v| round(v, 1)),
        "MiB",
        Target::Info,
    );
    r.num(
        "setup_bindings_per_s",
        "CreateBinding rate during setup",
        Some(round(n as f64 / setup_secs.max(1e-9), 1)),
        "/s",
        Target::Info,
    );
    if a.hostile_tenants > 0 {
        let queued: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE state = 'QUEUED' AND tenant_id LIKE 'hostile-%'",
        )
        .fetch_one(&env.pool)
        .await?;
        r.count(
            "hostile_runs_queued",
            "runs the hostile tenants' BackfillRuns calls queued",
            flooded.created,
            Target::Info,
        );
        r.count(
            "hostile_calls_refused",
            "their calls that failed (quota, limits)",
            flooded.refused,
            Target::Info,
        );
        r.count(
            "hostile_backlog_after",
            "their runs still QUEUED after the window",
            queued,
            Target::Info,
        );
    }
    if let (Some(day), Some(d)) = (&old_day, &dropped) {
        r.count(
            "retention_drop_events",
            &format!("events of {} for retention to drop", day.day),
            a.retention_drop as i64,
            Target::Info,
        );
        r.num(
            "retention_drop_mib",
            "their table and index",
            Some(round(day.bytes as f64 / (1 << 20) as f64, 1)),
            "MiB",
            Target::Info,
        );
        r.num(
            "retention_fill_s",
            "writing them (before the bindings)",
            Some(round(day.fill_secs, 1)),
            "s",
            Target::Info,
        );
        r.num(
            "retention_dropped_after_s",
            "attached → dropped by the leader",
            d.after_secs.map(|v| round(v, 2)),
            "s",
            Target::Info,
        );
        r.count(
            "retention_dropped_in_window",
            "the day dropped inside the window (1 = yes)",
            i64::from(d.in_window),
            Target::Equal(1.0),
        );
        // Fires due from 1 s before the attach to 1 s after the drop, and
        // the others: what the drop itself cost, at the subscribers as
        // the headline figure.
        let (near_p99, near_max, away_p99) = (
            seen.near.quantile_ms(0.99),
            seen.near.max_ms(),
            seen.away.quantile_ms(0.99),
        );
        r.num(
            "lag_p99_near_drop_ms",
            "fire lag p99 at the subscriber, ±1 s around attach → drop",
            ms1o(near_p99),
            "ms",
            Target::Info,
        );
        r.num(
            "lag_max_near_drop_ms",
            "fire lag max at the subscriber, ±1 s around attach → drop",
            ms1o(near_max),
            "ms",
            Target::Info,
        );
        r.num(
            "lag_p99_away_from_drop_ms",
            "fire lag p99 at the subscriber, the rest of the window",
            ms1o(away_p99),
            "ms",
            Target::Info,
        );
    }
    r.extra("window_start", json!(w0.to_rfc3339()));
    r.extra("window_end", json!(w1.to_rfc3339()));
    Ok(r)
}

/// The hostile tenants' bindings: `hostile-<k>` binds `bench.hostile`.
async fn hostile_bindings(env: &Env, tenants: usize) -> anyhow::Result<Vec<api::Bound>> {
    let ch = env.channel(0);
    api::DefinitionServiceClient::new(ch.clone())
        .create_definition(api::req(
            "",
            pb::CreateDefinitionRequest {
                definition: Some(api::event_def("bench.hostile", api::interval(1, None))),
            },
        ))
        .await?;
    let mut out = Vec::with_capacity(tenants);
    for k in 0..tenants {
        let tenant = format!("hostile-{k}");
        let b = api::BindingServiceClient::new(ch.clone())
            .create_binding(api::req(
                &tenant,
                pb::CreateBindingRequest {
                    binding: Some(pb::Binding {
                        definition: "bench.hostile".into(),
                        ..Default::default()
                    }),
                },
            ))
            .await?
            .into_inner();
        out.push(api::Bound { id: b.id, tenant });
    }
    Ok(out)
}

/// What the flood did.
#[derive(Debug, Default)]
struct Flooded {
    created: i64,
    refused: i64,
}

/// Starts the hostile tenants' BackfillRuns loops (one call in flight per
/// tenant, each `runs` past seconds earlier than the last) until `until`;
/// the future resolves when they have stopped.
fn flood(
    env: &Env,
    hostile: Vec<api::Bound>,
    runs: i64,
    until: DateTime<Utc>,
) -> impl std::future::Future<Output = Flooded> + use<> {
    let channels = env.channels();
    let mut set = tokio::task::JoinSet::new();
    for (k, b) in hostile.into_iter().enumerate() {
        let ch = channels[k % channels.len()].clone();
        set.spawn(async move {
            let mut done = Flooded::default();
            let mut cursor = Utc::now() - TimeDelta::seconds(1);
            while Utc::now() < until {
                let from = cursor - TimeDelta::seconds(runs);
                let r = api::RunServiceClient::new(ch.clone())
                    .backfill_runs(api::req(
                        &b.tenant,
                        pb::BackfillRunsRequest {
                            binding_id: b.id.clone(),
                            start_time: Some(api::ts(from)),
                            end_time: Some(api::ts(cursor)),
                            dry_run: false,
                        },
                    ))
                    .await;
                match r {
                    Ok(resp) => done.created += resp.into_inner().run_ids.len() as i64,
                    Err(e) => {
                        if done.refused == 0 {
                            progress!("{}: first refusal: {}", b.tenant, e.message());
                        }
                        done.refused += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                cursor = from;
            }
            done
        });
    }
    async move {
        let mut all = Flooded::default();
        while let Some(r) = set.join_next().await {
            if let Ok(f) = r {
                all.created += f.created;
                all.refused += f.refused;
            }
        }
        all
    }
}

/// The old day written for `--retention-drop`, not attached yet.
struct OldDay {
    day: chrono::NaiveDate,
    /// Size of the table with its primary key, bytes.
    bytes: i64,
    fill_secs: f64,
}

/// Writes `events` log events of runs created 40 days ago into a staging
/// table shaped like `run_events`, with its primary key and a check of the
/// day's id range (module docs). Staged under another name than
/// `run_events_<day>`, which retention would take for a detached day and
/// drop at once.
async fn fill_old_day(env: &Env, events: u64) -> anyhow::Result<OldDay> {
    let day = (Utc::now() - TimeDelta::days(40)).date_naive();
    let started = std::time::Instant::now();
    progress!("writing {events} events of runs created on {day} (retention drop)");
    let day_ms = day
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_millis();
    // Run r (one per millisecond of the day) has events 1..=1000.
    sqlx::query("CREATE TABLE bench_retention_day (LIKE run_events INCLUDING DEFAULTS)")
        .execute(&env.pool)
        .await?;
    sqlx::query(
        "INSERT INTO bench_retention_day
         SELECT (lpad(to_hex($1::bigint + g / 1000), 12, '0') || '70008000' || lpad(to_hex(g / 1000), 12, '0'))::uuid,
                g % 1000 + 1,
                to_timestamp(($1::bigint + g / 1000) / 1000.0),
                'bench-old', '00000000-0000-7000-8000-000000000000', 'bench.old', 'log',
                jsonb_build_object('kind', 'log', 'stream', 'stdout', 'message', 'old line ' || g)
         FROM generate_series(0::bigint, $2::bigint - 1) AS g",
    )
    .bind(day_ms)
    .bind(events as i64)
    .execute(&env.pool)
    .await?;
    sqlx::query("ALTER TABLE bench_retention_day ADD PRIMARY KEY (run_id, seq)")
        .execute(&env.pool)
        .await?;
    // A CHECK cannot take parameters: spell the bounds out.
    let (lo, hi): (uuid::Uuid, uuid::Uuid) = sqlx::query_as(
        "SELECT sked_run_events_day_floor($1::date), sked_run_events_day_floor($1::date + 1)",
    )
    .bind(day)
    .fetch_one(&env.pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE bench_retention_day ADD CONSTRAINT bench_retention_day_range
         CHECK (run_id >= '{lo}'::uuid AND run_id < '{hi}'::uuid)"
    )))
    .execute(&env.pool)
    .await?;
    // Vacuumed, as a day that retention drops was many times since it was
    // written: so autovacuum's first pass over 10 000 000 freshly inserted
    // rows (hint bits and the visibility map of every page, throttled)
    // cannot fall into the measured window.
    sqlx::query("VACUUM (ANALYZE) bench_retention_day")
        .execute(&env.pool)
        .await?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('bench_retention_day')")
        .fetch_one(&env.pool)
        .await?;
    let fill_secs = started.elapsed().as_secs_f64();
    progress!(
        "written in {fill_secs:.1} s ({:.0} MiB); checkpoint",
        bytes as f64 / (1 << 20) as f64
    );
    // The fill is setup, not load: without a checkpoint its ~2 GiB of dirty
    // pages are written back (and its WAL recycled) during the window, and
    // every firing commit waits on that I/O. A day that retention drops was
    // written long before, and checkpointed many times since.
    let checkpoint = std::time::Instant::now();
    sqlx::query("CHECKPOINT").execute(&env.pool).await?;
    progress!("checkpoint in {:.1} s", checkpoint.elapsed().as_secs_f64());
    Ok(OldDay {
        day,
        bytes,
        fill_secs,
    })
}

/// When retention dropped the old day.
struct Dropped {
    /// Seconds from attaching it until its table was gone (`None`: not
    /// gone by the end of the window).
    after_secs: Option<f64>,
    in_window: bool,
    /// When it was attached, and when it was seen gone (or the window's end).
    attached_at: DateTime<Utc>,
    gone_at: DateTime<Utc>,
}

/// Attaches the staging table as the old day's partition, then watches it
/// until retention dropped it or the window ended.
async fn attach_and_watch(env: &Env, day: &OldDay, w1: DateTime<Utc>) -> anyhow::Result<Dropped> {
    let name = format!("run_events_{}", day.day.format("%Y%m%d"));
    let (lo, hi): (uuid::Uuid, uuid::Uuid) = sqlx::query_as(
        "SELECT sked_run_events_day_floor($1::date), sked_run_events_day_floor($1::date + 1)",
    )
    .bind(day.day)
    .fetch_one(&env.pool)
    .await?;
    let attached = std::time::Instant::now();
    let attached_at = Utc::now();
    let mut tx = env.pool.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE bench_retention_day RENAME TO {name}"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE run_events ATTACH PARTITION {name} FOR VALUES FROM ('{lo}') TO ('{hi}')"
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    progress!(
        "attached {name} ({:.0} ms); waiting for retention to drop it",
        attached.elapsed().as_secs_f64() * 1e3
    );
    loop {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(&env.pool)
            .await?;
        if !exists {
            let after = attached.elapsed().as_secs_f64();
            progress!("retention dropped {name} {after:.2} s after it was attached");
            return Ok(Dropped {
                after_secs: Some(after),
                in_window: Utc::now() < w1,
                attached_at,
                gone_at: Utc::now(),
            });
        }
        if Utc::now() >= w1 {
            progress!("{name} still there at the end of the window");
            return Ok(Dropped {
                after_secs: None,
                in_window: false,
                attached_at,
                gone_at: Utc::now(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fire times `anchor + k s` (integer k) in `[w0, w1)`.
fn fires_in(anchor: DateTime<Utc>, w0: DateTime<Utc>, w1: DateTime<Utc>) -> i64 {
    // Fire times before x: count of k with anchor + k < x, relative to a
    // common origin: ceil((x - anchor) / 1 s).
    let before = |x: DateTime<Utc>| {
        let d = x.timestamp_micros() - anchor.timestamp_micros();
        d.div_euclid(1_000_000) + i64::from(d.rem_euclid(1_000_000) != 0)
    };
    before(w1) - before(w0)
}

/// Sleeps until the wall-clock instant `t`.
pub async fn sleep_until(t: DateTime<Utc>) {
    let d = (t - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(d).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fires_in_half_open_windows() {
        let a = Utc.timestamp_opt(100, 250_000_000).unwrap();
        let w0 = Utc.timestamp_opt(100, 250_000_000).unwrap();
        let w1 = Utc.timestamp_opt(103, 250_000_000).unwrap();
        assert_eq!(fires_in(a, w0, w1), 3); // 100.25, 101.25, 102.25
        let w0 = Utc.timestamp_opt(100, 300_000_000).unwrap();
        assert_eq!(fires_in(a, w0, w1), 2);
    }
}

/// What the `WatchEvents` subscribers received: each `fired` event's run id
/// and when it arrived, and how many events the node said it did not
/// deliver to them (`missed_events`).
#[derive(Debug, Default)]
pub(crate) struct Watched {
    pub received: Vec<(uuid::Uuid, DateTime<Utc>)>,
    pub missed: u64,
    /// Subscriptions that failed or ended before `until`.
    pub broken: usize,
}

/// Subscribes to `WatchEvents` (kind `fired`) for each of `tenants` on
/// `channel` and records every event until `until`, or until `enough` events
/// arrived in all (issue 18: fire lag is measured where a user sees it, at a
/// subscriber receiving the `fired` event). Returns once every subscription
/// is open; the handle yields what they received, also when `done` is
/// cancelled early.
pub(crate) async fn watch_fired(
    channel: tonic::transport::Channel,
    tenants: Vec<String>,
    until: DateTime<Utc>,
    enough: usize,
    done: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<Watched>> {
    let mut streams = Vec::with_capacity(tenants.len());
    for t in tenants {
        let mut client = pb::log_service_client::LogServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20);
        let stream = client
            .watch_events(api::req(
                &t,
                pb::WatchEventsRequest {
                    kinds: vec![pb::EventKind::Fired as i32],
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        streams.push(stream);
    }
    let total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Ok(tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for mut s in streams {
            let (total, done) = (total.clone(), done.clone());
            set.spawn(async move {
                let mut w = Watched::default();
                let left = (until - Utc::now()).to_std().unwrap_or_default();
                let deadline = tokio::time::Instant::now() + left;
                loop {
                    let next = tokio::select! {
                        m = tokio::time::timeout_at(deadline, s.message()) => m,
                        () = done.cancelled() => break,
                    };
                    match next {
                        Err(_) => break,
                        Ok(Ok(Some(m))) => {
                            let at = Utc::now();
                            w.missed += m.missed_events;
                            if let Some(e) = m.event
                                && let Ok(id) = e.run_id.parse()
                            {
                                w.received.push((id, at));
                                let seen = total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if seen + 1 >= enough {
                                    done.cancel();
                                }
                            }
                        }
                        Ok(_) => {
                            w.broken += 1;
                            break;
                        }
                    }
                }
                w
            });
        }
        let mut all = Watched::default();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(mut w) => {
                    all.received.append(&mut w.received);
                    all.missed += w.missed;
                    all.broken += w.broken;
                }
                Err(_) => all.broken += 1,
            }
        }
        all
    }))
}

/// Fire lag as the subscribers saw it: each received `fired` event of a run
/// fired in the window, arrival time − the run's fire time.
struct SeenLag {
    hist: crate::stats::Histogram,
    /// Received events that belong to the window's runs.
    matched: usize,
    /// The five seconds with the largest lag: (second, max ms, p99 ms, fires).
    worst: Vec<(DateTime<Utc>, f64, f64, usize)>,
    /// Lags of fires due within the `near` span given to [`SeenLag::of`],
    /// and of the others (both empty without one).
    near: crate::stats::Histogram,
    away: crate::stats::Histogram,
}

impl SeenLag {
    async fn of(
        env: &Env,
        watched: &Watched,
        w0: DateTime<Utc>,
        w1: DateTime<Utc>,
        near: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> anyhow::Result<SeenLag> {
        let due: Vec<(uuid::Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, scheduled_time FROM runs
             WHERE trigger = 'SCHEDULE' AND state = 'SUCCEEDED'
               AND scheduled_time >= $1 AND scheduled_time < $2
               AND tenant_id NOT LIKE 'hostile-%'",
        )
        .bind(w0)
        .bind(w1)
        .fetch_all(&env.pool)
        .await?;
        let due: std::collections::HashMap<uuid::Uuid, DateTime<Utc>> = due.into_iter().collect();
        let mut hist = crate::stats::Histogram::default();
        let mut per_second: std::collections::BTreeMap<i64, crate::stats::Histogram> =
            Default::default();
        let mut matched = 0;
        let (mut near_hist, mut away_hist) = Default::default();
        for (id, at) in &watched.received {
            let Some(t) = due.get(id) else { continue };
            matched += 1;
            let us = (*at - *t).num_microseconds().unwrap_or(i64::MAX).max(0) as u64;
            hist.record(us);
            per_second.entry(t.timestamp()).or_default().record(us);
            if let Some((from, to)) = near {
                let h: &mut crate::stats::Histogram = if (from..=to).contains(t) {
                    &mut near_hist
                } else {
                    &mut away_hist
                };
                h.record(us);
            }
        }
        let mut worst: Vec<(DateTime<Utc>, f64, f64, usize)> = per_second
            .into_iter()
            .filter_map(|(s, h)| {
                Some((
                    Utc.timestamp_opt(s, 0).single()?,
                    h.max_ms()?,
                    h.quantile_ms(0.99)?,
                    h.count() as usize,
                ))
            })
            .collect();
        worst.sort_by(|a, b| b.1.total_cmp(&a.1));
        worst.truncate(5);
        Ok(SeenLag {
            hist,
            matched,
            worst,
            near: near_hist,
            away: away_hist,
        })
    }
}
