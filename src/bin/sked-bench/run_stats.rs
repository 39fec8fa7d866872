//! `stats`: how fast `RunService.GetRunStats` answers over a month of one
//! tenant's runs (target, SPEC §9 round two: 1 000 000 runs in ≤ 100 ms).
//!
//! Setup: one tenant binds `--bindings` definitions `bench.stats.<j>`
//! (`event`, manual schedule: nothing fires by itself) through the API.
//! Then `--runs` ended runs are written straight into the bench's database,
//! spread evenly over the last `--days` days and over the bindings (90 %
//! `SUCCEEDED`, 6 % `FAILED`, 2 % `TIMED_OUT`, 2 % `CANCELLED`; fire lag 1 to
//! 50 ms, durations 10 ms to 30 s, log-uniform), in batches of 50 000, each
//! batch recorded by sked's own run-end bookkeeping
//! (`sked::db::runs::run_end_record`, in the batch's transaction) — the
//! same statement the executor calls after a run ends. Writing a month of
//! runs through the engine would take the bench hours. Then the rows of
//! past hours are folded as the maintenance leader folds them
//! (`sked::db::runs::run_stats_fold`, timed), and one more run per binding
//! ends in the current hour: the unfolded rows a tenant has between folds
//! (GetRunStats reads them too).
//!
//! Measured: `--calls` GetRunStats calls of the tenant's whole window (day
//! series), one at a time: latency p50, p99 and max as the client sees it;
//! then the same for one binding and for one definition (platform scope).
//! Checked: the tenant's counts per state equal `count(*)` of its runs in
//! the database.

use std::time::Instant;

use anyhow::Context as _;
use chrono::{TimeDelta, Utc};
use clap::Args;
use serde_json::json;
use sked::proto::v1 as pb;
use sked::proto::v1::run_service_client::RunServiceClient;

use crate::Common;
use crate::api::{self, Layout};
use crate::env::{Env, progress};
use crate::report::{Report, Target};
use crate::stats::{ms1, round};

/// Flags of `stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Ended runs written for the tenant.
    #[arg(long, default_value_t = 1_000_000)]
    pub runs: i64,
    /// Bindings (one definition each) the runs are spread over: 1 000
    /// bindings over 30 days is 33 runs a binding a day, 720 000
    /// binding-hours.
    #[arg(long, default_value_t = 1000)]
    pub bindings: usize,
    /// Days the runs' fire times are spread over (the window asked for).
    #[arg(long, default_value_t = 30)]
    pub days: i64,
    /// GetRunStats calls per measurement.
    #[arg(long, default_value_t = 20)]
    pub calls: usize,
    #[command(flatten)]
    pub common: Common,
}

/// Runs written (and recorded) per transaction.
const BATCH: i64 = 50_000;
/// Hourly rows folded per statement (the leader folds 5 000 at a time; the
/// setup's backlog is a month).
const FOLD_BATCH: i64 = 20_000;

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls, the inserts, or a GetRunStats call failing.
pub async fn run(env: &mut Env, a: StatsArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.bindings >= 1, "--bindings must be at least 1");
    anyhow::ensure!(a.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(
        (1..=400).contains(&a.days),
        "--days must be 1-400 (GetRunStats' longest window)"
    );
    let layout = Layout::new("bench.stats", a.bindings, 1);
    let tenant = layout.tenant_of(0);
    api::create_definitions(env, &layout, |name| api::event_def(name, api::manual())).await?;
    let bound = api::create_bindings(env, &layout, |_| None).await?;
    let ids: Vec<uuid::Uuid> = bound
        .iter()
        .map(|b| b.id.parse())
        .collect::<Result<_, _>>()?;

    let now = Utc::now();
    let end = now - TimeDelta::minutes(1);
    let start = end - TimeDelta::days(a.days);
    let step_us = (end - start).num_microseconds().unwrap_or(i64::MAX) / a.runs;
    progress!(
        "stats: writing {} ended runs over {} days and {} bindings",
        a.runs,
        a.days,
        a.bindings
    );
    let t_fill = Instant::now();
    let mut done = 0i64;
    while done < a.runs {
        let n = BATCH.min(a.runs - done);
        let mut tx = env.pool.begin().await?;
        // Run k of the whole series: binding k mod B, fire time start + k
        // steps (unique per binding), a state by k mod 50, lag and
        // duration from a hash of k.
        let ended: Vec<uuid::Uuid> = sqlx::query_scalar(
            r#"INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time,
                                 not_before, create_time, start_time, end_time, node_id, handler, params,
                                 last_seq, reason)
               SELECT gen_random_uuid(), $1, b.id, b.definition, 'SCHEDULE', x.state, x.t, x.t, x.t,
                      CASE WHEN x.state <> 'CANCELLED' THEN x.t + x.lag END,
                      x.t + x.lag + CASE WHEN x.state <> 'CANCELLED' THEN x.dur ELSE interval '0' END,
                      'bench', '{"kind": "event"}', '{}', 0,
                      CASE WHEN x.state = 'CANCELLED' THEN 'bench' END
               FROM generate_series($2::bigint, $3::bigint - 1) k
               CROSS JOIN LATERAL (
                 SELECT $4::timestamptz + make_interval(secs => k * $5::float8 / 1e6) AS t,
                        CASE WHEN k % 50 < 45 THEN 'SUCCEEDED' WHEN k % 50 < 48 THEN 'FAILED'
                             WHEN k % 50 < 49 THEN 'TIMED_OUT' ELSE 'CANCELLED' END AS state,
                        make_interval(secs => 0.001 + 0.049 * ((hashint8(k) & 1023) / 1023.0)) AS lag,
                        make_interval(secs => 0.01 * power(3000, ((hashint8(k * 7) & 1023) / 1023.0))) AS dur) x
               JOIN (SELECT i - 1 AS i, id, definition FROM unnest($6::uuid[]) WITH ORDINALITY AS u(id, i)
                     JOIN bindings bb USING (id)) b ON b.i = k % $7
               RETURNING id"#,
        )
        .bind(&tenant)
        .bind(done)
        .bind(done + n)
        .bind(start)
        .bind(step_us as f64)
        .bind(&ids)
        .bind(a.bindings as i64)
        .fetch_all(&mut *tx)
        .await?;
        let ended: Vec<(uuid::Uuid, bool)> = ended.into_iter().map(|id| (id, false)).collect();
        sked::db::runs::run_end_record(&mut tx, &ended).await?;
        tx.commit().await?;
        done += n;
        progress!("stats: {done}/{} runs", a.runs);
    }
    // Run ends first land in run_stats_delta; nodes move them into
    // run_stats every 5 s (part of the fill's cost).
    for part in 0..sked::db::runs::RUN_STATS_DELTA_PARTS {
        while sked::db::runs::run_stats_delta_fold(&env.pool, part, 50_000).await? == 50_000 {}
    }
    let fill_secs = t_fill.elapsed().as_secs_f64();
    let inbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM run_stats")
        .fetch_one(&env.pool)
        .await?;
    // Fold the past hours, as the leader does every few seconds.
    let t_fold = Instant::now();
    let before = sked::domain::stats::floor_hour(Utc::now());
    let mut folded = 0i64;
    loop {
        let n = sked::db::runs::run_stats_fold(&env.pool, before, FOLD_BATCH).await?;
        folded += n;
        if n < FOLD_BATCH {
            break;
        }
    }
    let fold_secs = t_fold.elapsed().as_secs_f64();
    progress!("stats: folded {folded} hourly rows in {fold_secs:.1} s");
    // One more ended run per binding, this hour: not folded yet.
    let mut tx = env.pool.begin().await?;
    let late: Vec<uuid::Uuid> = sqlx::query_scalar(
        r#"INSERT INTO runs (id, tenant_id, binding_id, definition, trigger, state, scheduled_time,
                             not_before, create_time, start_time, end_time, node_id, handler, params,
                             last_seq, reason)
           SELECT gen_random_uuid(), $1, b.id, b.definition, 'SCHEDULE', 'SUCCEEDED', $2, $2, $2,
                  $2 + interval '5 ms', $2 + interval '105 ms', 'bench', '{"kind": "event"}', '{}', 0, NULL
           FROM bindings b WHERE b.id = ANY($3)
           RETURNING id"#,
    )
    .bind(&tenant)
    .bind(end)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let late: Vec<(uuid::Uuid, bool)> = late.into_iter().map(|id| (id, false)).collect();
    sked::db::runs::run_end_record(&mut tx, &late).await?;
    tx.commit().await?;
    let runs_total = a.runs + late.len() as i64;
    sqlx::raw_sql(
        "VACUUM ANALYZE run_stats, run_stats_delta, run_stats_binding, run_stats_rollup, binding_status",
    )
        .execute(&env.pool)
        .await?;
    let (rows, rollup_rows, unfolded_rows): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM run_stats_binding), (SELECT count(*) FROM run_stats_rollup),
                (SELECT count(*) FROM run_stats) + (SELECT count(*) FROM run_stats_delta)",
    )
    .fetch_one(&env.pool)
    .await?;

    let window = |binding: &str, definition: &str| pb::GetRunStatsRequest {
        binding_id: binding.into(),
        definition: definition.into(),
        start_time: Some(api::ts(start)),
        end_time: Some(api::ts(now)),
        interval: pb::StatsInterval::Day as i32,
    };
    let mut client = RunServiceClient::new(env.channel(0));
    let mut measure = async |what: &str, tenant: &str, req: pb::GetRunStatsRequest| {
        let mut ms = Vec::with_capacity(a.calls);
        let mut last = None;
        for _ in 0..a.calls.max(1) {
            let t = Instant::now();
            let r = client
                .get_run_stats(api::req(tenant, req.clone()))
                .await?
                .into_inner();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            last = Some(r);
        }
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        progress!(
            "GetRunStats {what}: p50 {:.1} ms, p99 {:.1} ms",
            q(0.5),
            q(0.99)
        );
        anyhow::Ok((q(0.5), q(0.99), ms[ms.len() - 1], last))
    };
    let (t50, t99, tmax, whole) = measure("tenant", &tenant, window("", "")).await?;
    let (b50, b99, _, _) = measure("binding", &tenant, window(&bound[0].id, "")).await?;
    let (d50, d99, _, _) = measure("definition", "", window("", &layout.definition(0))).await?;
    let whole = whole.context("no GetRunStats answer")?;

    // Exactness: the counts equal the runs' own.
    let db: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM runs WHERE tenant_id = $1 AND scheduled_time >= $2
           AND scheduled_time < $3 GROUP BY state",
    )
    .bind(&tenant)
    .bind(whole.start_time.as_ref().map(api::from_ts))
    .bind(whole.end_time.as_ref().map(api::from_ts))
    .fetch_all(&env.pool)
    .await?;
    let in_db = |s: &str| db.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
    let c = whole.counts.unwrap_or_default();
    let exact = c.succeeded == in_db("SUCCEEDED")
        && c.failed == in_db("FAILED")
        && c.timed_out == in_db("TIMED_OUT")
        && c.cancelled == in_db("CANCELLED")
        && whole.total == runs_total;

    let mut params = env.common.params();
    params.insert("runs".into(), json!(a.runs));
    params.insert("bindings".into(), json!(a.bindings));
    params.insert("days".into(), json!(a.days));
    params.insert("calls".into(), json!(a.calls));
    let mut r = Report::new(params);
    r.count(
        "runs_total",
        "runs counted (tenant window)",
        whole.total,
        Target::Equal(runs_total as f64),
    );
    r.flag(
        "counts_exact",
        "counts per state equal the runs'",
        exact,
        Some(true),
    );
    r.count(
        "stats_rows",
        "hourly statistics rows before the fold (binding × hour)",
        inbox_rows,
        Target::Info,
    );
    r.count(
        "binding_rows",
        "folded rows per binding and hour",
        rows,
        Target::Info,
    );
    r.count(
        "rollup_rows",
        "folded rows per tenant / definition and hour",
        rollup_rows,
        Target::Info,
    );
    r.count(
        "unfolded_rows",
        "rows not folded when measured (this hour's)",
        unfolded_rows,
        Target::Info,
    );
    r.num(
        "fold_rows_per_s",
        "hourly rows folded",
        Some(round(folded as f64 / fold_secs.max(1e-9), 0)),
        "rows/s",
        Target::Info,
    );
    r.num(
        "fill_runs_per_s",
        "runs written and recorded",
        Some(round(a.runs as f64 / fill_secs.max(1e-9), 0)),
        "runs/s",
        Target::Info,
    );
    r.num(
        "tenant_p50_ms",
        "GetRunStats, tenant, p50",
        Some(ms1(t50)),
        "ms",
        Target::AtMost(100.0),
    );
    r.num(
        "tenant_p99_ms",
        "GetRunStats, tenant, p99",
        Some(ms1(t99)),
        "ms",
        Target::Info,
    );
    r.num(
        "tenant_max_ms",
        "GetRunStats, tenant, max",
        Some(ms1(tmax)),
        "ms",
        Target::Info,
    );
    r.num(
        "binding_p50_ms",
        "GetRunStats, one binding, p50",
        Some(ms1(b50)),
        "ms",
        Target::Info,
    );
    r.num(
        "binding_p99_ms",
        "GetRunStats, one binding, p99",
        Some(ms1(b99)),
        "ms",
        Target::Info,
    );
    r.num(
        "definition_p50_ms",
        "GetRunStats, one definition, p50",
        Some(ms1(d50)),
        "ms",
        Target::Info,
    );
    r.num(
        "definition_p99_ms",
        "GetRunStats, one definition, p99",
        Some(ms1(d99)),
        "ms",
        Target::Info,
    );
    r.extra(
        "duration_p95_ms",
        json!(
            whole
                .duration_p95
                .map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
        ),
    );
    r.note(format!(
        "{} runs over {} days and {} bindings, written in {:.1} s; {} hourly rows folded in {:.1} s; \
         then one run per binding this hour (unfolded)",
        a.runs, a.days, a.bindings, fill_secs, folded, fold_secs
    ));
    Ok(r)
}
