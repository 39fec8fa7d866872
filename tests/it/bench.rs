//! Smoke test of `sked-bench` (SPEC §9): every scenario once, at a tiny
//! size, through the built binary, against the PostgreSQL server the other
//! tests use. Checks the mechanics — exit status, the final JSON line and
//! its figure keys, exactness (no duplicate fires, every streamed line in
//! order) — never timings.

use std::process::Stdio;
use std::time::Duration;

use crate::common::TestDb;
use serde_json::Value;

/// Longest a tiny scenario may take (the bench itself waits for fire
/// instants, warm-up and settle periods).
const LIMIT: Duration = Duration::from_secs(180);

/// Runs `sked-bench <args> --database-url <server>` and returns the JSON
/// object on the last line of its stdout.
///
/// The server is the test harness's (`SKED_TEST_DATABASE_URL`, `DATABASE_URL`,
/// 127.0.0.1:5432 or a private cluster): a [`TestDb`] on it gives its URL;
/// the bench creates (and drops) a database of its own on the same server.
async fn bench(args: &[&str]) -> Value {
    let db = TestDb::new().await;
    let out = tokio::time::timeout(
        LIMIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sked-bench"))
            .args(args)
            .arg("--database-url")
            .arg(&db.url)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("sked-bench {args:?} finishes within {LIMIT:?}"))
    .expect("run sked-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sked-bench {args:?} failed with {}; stdout:\n{stdout}",
        out.status
    );
    let last = stdout.lines().last().expect("stdout has lines");
    let v: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is JSON ({e}): {last}"));
    assert_eq!(v["scenario"], args[0], "{v}");
    for k in ["cpus", "cpu_model", "postgres", "database"] {
        assert!(v["machine"].get(k).is_some(), "machine.{k} missing: {v}");
    }
    assert_eq!(v["machine"]["database"], "url", "{v}");
    assert!(v["params"].is_object(), "{v}");
    v
}

/// Asserts `figures` has every key in `keys`.
fn has_figures(v: &Value, keys: &[&str]) {
    for k in keys {
        assert!(v["figures"].get(*k).is_some(), "figure {k} missing: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_fire_smoke() {
    let v = bench(&[
        "fire",
        "--bindings",
        "20",
        "--warmup",
        "1",
        "--measure",
        "3",
    ])
    .await;
    has_figures(
        &v,
        &[
            "expected_fires",
            "fired",
            "fired_percent",
            "duplicates",
            "lag_p50_ms",
            "lag_p99_ms",
            "lag_max_ms",
            "sked_cpu_percent",
            "postgres_cpu_percent",
            "sked_rss_mib",
        ],
    );
    // 20 bindings × one fire per second of a 3 s window, counted from the anchors.
    assert_eq!(v["figures"]["expected_fires"], 60, "{v}");
    assert_eq!(v["figures"]["duplicates"], 0, "{v}");
    assert_eq!(v["params"]["bindings"], 20, "{v}");
}

/// `fire --retention-drop`: a day of old events written, attached and
/// watched while the bindings fire (the figures' keys; the drop's timing is
/// the scenario's verdict, not this test's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_fire_retention_drop_smoke() {
    let v = bench(&[
        "fire",
        "--bindings",
        "20",
        "--warmup",
        "1",
        "--measure",
        "4",
        "--retention-drop",
        "5000",
    ])
    .await;
    has_figures(
        &v,
        &[
            "lag_p99_ms",
            "duplicates",
            "retention_drop_events",
            "retention_drop_mib",
            "retention_dropped_after_s",
            "retention_dropped_in_window",
        ],
    );
    assert_eq!(v["figures"]["retention_drop_events"], 5000, "{v}");
    assert_eq!(v["figures"]["duplicates"], 0, "{v}");
    assert_eq!(v["params"]["retention_every_secs"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_burst_smoke() {
    let v = bench(&["burst", "--bindings", "50", "--cron", "*/5 * * * * *"]).await;
    has_figures(
        &v,
        &[
            "runs_created",
            "runs_started",
            "started_percent",
            "all_started_ms",
            "lag_p50_ms",
            "lag_p99_ms",
            "fire_time",
        ],
    );
    assert_eq!(v["params"]["cron"], "*/5 * * * * *", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_throughput_smoke() {
    let v = bench(&[
        "throughput",
        "--bindings",
        "4",
        "--step-secs",
        "1",
        "--start-rate",
        "50",
        "--max-rate",
        "200",
        "--ceiling-secs",
        "1",
    ])
    .await;
    has_figures(
        &v,
        &[
            "completed_runs_per_s",
            "ceiling_rows_per_s",
            "ratio_percent",
            "rows_per_run",
            "row_equivalent_ratio_percent",
            "step_list",
        ],
    );
    let steps = v["figures"]["step_list"]
        .as_array()
        .expect("step_list array");
    assert!(!steps.is_empty(), "{v}");
    assert!(
        v["figures"]["completed_runs_per_s"]
            .as_f64()
            .is_some_and(|c| c > 0.0),
        "the backfilled runs complete: {v}"
    );
    assert!(
        v["figures"]["ceiling_rows_per_s"]
            .as_f64()
            .is_some_and(|c| c > 0.0),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_stream_smoke() {
    let v = bench(&["stream", "--lines", "2000", "--subscribers", "3"]).await;
    has_figures(
        &v,
        &[
            "lines_persisted",
            "persisted_lines_per_s",
            "delivered_lines_per_s",
            "subscribers_complete_in_order",
            "all_delivered_in_order",
            "latency_p50_ms",
            "latency_p99_ms",
            "latency_max_ms",
        ],
    );
    assert_eq!(v["figures"]["lines_persisted"], 2000, "{v}");
    assert_eq!(v["figures"]["subscribers_complete_in_order"], 3, "{v}");
    assert_eq!(v["figures"]["all_delivered_in_order"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_idle_smoke() {
    let v = bench(&["idle", "--bindings", "200", "--measure", "2"]).await;
    has_figures(
        &v,
        &[
            "startup_empty_ms",
            "startup_ms",
            "rss_baseline_mib",
            "rss_mib",
            "rss_per_binding_kib",
            "rss_total_per_binding_kib",
            "sked_cpu_percent",
        ],
    );
    // A yearly cron is never due within the bench.
    assert_eq!(v["figures"]["runs"], 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_workers_smoke() {
    let v = bench(&[
        "workers",
        "--workers",
        "2",
        "--slots",
        "10",
        "--bindings",
        "4",
        "--rate",
        "50",
        "--secs",
        "2",
        "--backlog",
        "300",
        "--ceiling-secs",
        "1",
    ])
    .await;
    has_figures(
        &v,
        &[
            "completed_runs_per_s",
            "backlog_created",
            "backlog_completed",
            "backlog_succeeded_db",
            "runs_triggered",
            "runs_received",
            "dispatch_p50_ms",
            "dispatch_p99_ms",
            "dispatch_max_ms",
            "ceiling_rows_per_s",
            "ratio_percent",
            "rejected_acks",
        ],
    );
    // Every backlog run is created, taken by a worker and completed once.
    assert_eq!(v["figures"]["backlog_created"], 300, "{v}");
    assert_eq!(v["figures"]["backlog_completed"], 300, "{v}");
    assert_eq!(v["figures"]["backlog_succeeded_db"], 300, "{v}");
    assert_eq!(v["figures"]["rejected_acks"], 0, "{v}");
    // Every triggered run reaches a worker, so its latency is measured.
    assert!(
        v["figures"]["runs_triggered"]
            .as_i64()
            .is_some_and(|n| n > 0),
        "{v}"
    );
    assert_eq!(
        v["figures"]["runs_received"], v["figures"]["runs_triggered"],
        "{v}"
    );
    assert!(v["figures"]["dispatch_p99_ms"].is_number(), "{v}");
    assert_eq!(v["params"]["workers"], 2, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_stats_smoke() {
    let v = bench(&[
        "stats",
        "--runs",
        "3000",
        "--bindings",
        "5",
        "--days",
        "3",
        "--calls",
        "3",
    ])
    .await;
    has_figures(
        &v,
        &[
            "runs_total",
            "counts_exact",
            "stats_rows",
            "tenant_p50_ms",
            "tenant_p99_ms",
            "binding_p50_ms",
            "definition_p50_ms",
        ],
    );
    // The month's runs, then one more per binding in the current hour
    // (read unfolded, as between folds).
    assert_eq!(v["figures"]["runs_total"], 3000 + 5, "{v}");
    assert_eq!(v["figures"]["counts_exact"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_workflow_smoke() {
    let v = bench(&["workflow", "--bindings", "3", "--duration", "4"]).await;
    has_figures(
        &v,
        &[
            "step_latencies",
            "step_latency_p50_ms",
            "step_latency_p99_ms",
            "workflows_succeeded",
            "workflows_failed",
            "steps_per_sec",
        ],
    );
    assert!(v["figures"]["step_latencies"].as_i64().unwrap() > 0, "{v}");
    assert_eq!(v["figures"]["workflows_failed"], 0, "{v}");
}
