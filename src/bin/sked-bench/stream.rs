//! `stream`: one run printing N lines as fast as it can, followed live by S
//! TailRun subscribers, `--repeat R` times in a row (target, issue 18 round
//! two: every line to every subscriber in order, and the median of the R
//! runs' end-to-end p99 ≤ 20 ms; the worst run's p99 is reported too).
//!
//! Setup: a definition `bench.stream.0` with the command handler
//! `seq 1 <lines>` and a manual schedule, bound by one tenant. S channels
//! (one connection each, round-robin over the nodes) are opened first; then
//! TriggerRun, and as soon as it returns S `TailRun(after_seq = 0,
//! follow = true)` streams are opened concurrently. Each subscriber checks
//! that every event arrives with a dense `seq` in order and that the stdout
//! lines are "1".."N" in order, and ends at the terminal `state_changed`.
//! Per log event it records receive time − `RunEvent.time` (when sked read
//! the line) in a fixed-memory histogram; nothing else is allocated per
//! event beyond what decoding does. Subscribers decode only the fields they
//! check (`LiteEvent`, wire-compatible with `RunEvent`): they share the
//! machine with sked, and decoding every field of 100 × N messages took
//! more CPU than the node it measures.
//!
//! Reported: lines persisted/s (N ÷ (last − first log event time) from the
//! database), delivered lines/s over all subscribers (lines received ÷ the
//! span from the first to the last receipt), end-to-end latency p50/p99/max,
//! how many subscribers got all N lines in order, CPU of the nodes,
//! PostgreSQL and the bench itself (decoding S × N messages costs the bench
//! CPU on the same machine).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::json;
use sked::proto::v1 as pb;
use tonic::transport::Channel;

use crate::Common;
use crate::api::{self, Layout, RunServiceClient};
use crate::env::{Env, ProcTicks, progress};
use crate::report::{Report, Target};
use crate::stats::{Histogram, ms1o, round};

/// Flags of `stream`.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// Lines the run prints (`seq 1 <lines>`).
    #[arg(long, default_value_t = 200_000)]
    pub lines: u64,
    /// TailRun subscribers.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Give up on a subscriber after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Consecutive runs measured; the figures are those of the run with
    /// the median p99, and every run's p99 and the worst are listed.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub repeat: u64,
    #[command(flatten)]
    pub common: Common,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    /// Stdout log lines received.
    lines: u64,
    /// Every event had the next seq and every line the next number.
    in_order: bool,
    /// The terminal state received, if any.
    terminal: Option<pb::RunState>,
    /// First and last log line receipt, µs since the epoch.
    first_us: Option<u64>,
    last_us: Option<u64>,
    latency: Histogram,
    /// The first thing that was wrong (a seq gap, a line out of order, a
    /// missing terminal event), for the report.
    problem: Option<String>,
    error: Option<String>,
}

/// Runs the scenario; see the module docs.
///
/// # Errors
/// Setup calls or measurement queries failing.
pub async fn run(env: &mut Env, a: StreamArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.lines >= 1, "--lines must be at least 1");
    anyhow::ensure!(a.subscribers >= 1, "--subscribers must be at least 1");
    let layout = Layout::new("bench.stream", 1, 1);
    let tenant = layout.tenant_of(0);
    let lines = a.lines.to_string();
    api::create_definitions(env, &layout, |name| pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Command(pb::CommandHandler {
            program: "seq".into(),
            args: vec!["1".into(), lines.clone()],
            ..Default::default()
        })),
        schedule: Some(api::manual()),
        ..Default::default()
    })
    .await?;
    let binding = api::create_bindings(env, &layout, |_| None)
        .await?
        .remove(0);

    let mut runs = Vec::with_capacity(a.repeat as usize);
    for i in 0..a.repeat {
        if a.repeat > 1 {
            progress!("run {} of {}", i + 1, a.repeat);
        }
        runs.push(measure_one(env, &a, &tenant, &binding.id).await?);
    }
    let p99s: Vec<f64> = runs
        .iter()
        .map(|r| r.hist.quantile_ms(0.99).unwrap_or(f64::INFINITY))
        .collect();
    // The run whose p99 is the median (the lower middle for an even count)
    // gives every figure below; the p99 of each run is listed too.
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|x, y| p99s[*x].total_cmp(&p99s[*y]));
    let worst = order.last().map(|i| p99s[*i]);
    let m = runs.swap_remove(order[(order.len() - 1) / 2]);
    let OneRun {
        hist,
        total_lines,
        first_us,
        last_us,
        complete,
        errors,
        problems,
        persisted,
        persist_secs,
        state,
        duration_ms,
        all_done,
        cpu,
        bench_cpu,
        rss,
    } = m;
    let delivered_per_s =
        (last_us > first_us).then(|| total_lines as f64 / ((last_us - first_us) as f64 / 1e6));

    let mut params = env.common.params();
    params.insert("lines".into(), json!(a.lines));
    params.insert("subscribers".into(), json!(a.subscribers));
    params.insert("timeout".into(), json!(a.timeout));
    params.insert("repeat".into(), json!(a.repeat));
    let mut r = Report::new(params);
    r.count(
        "lines_persisted",
        "log lines persisted",
        persisted,
        Target::Info,
    );
    r.num(
        "persisted_lines_per_s",
        "lines persisted/s",
        persist_secs
            .filter(|s| *s > 0.0)
            .map(|s| round(a.lines as f64 / s, 1)),
        "lines/s",
        Target::Info,
    );
    r.num(
        "delivered_lines_per_s",
        "lines delivered/s (all subscribers)",
        delivered_per_s.map(|v| round(v, 1)),
        "lines/s",
        Target::Info,
    );
    r.count(
        "subscribers_complete_in_order",
        "subscribers that got every line in order",
        complete as i64,
        Target::Equal(a.subscribers as f64),
    );
    r.flag(
        "all_delivered_in_order",
        "every line to every subscriber in order",
        complete == a.subscribers,
        Some(true),
    );
    r.num(
        "latency_p50_ms",
        "end-to-end latency p50",
        ms1o(hist.quantile_ms(0.5)),
        "ms",
        Target::Info,
    );
    r.num(
        "latency_p99_ms",
        "end-to-end latency p99 (median run)",
        ms1o(hist.quantile_ms(0.99)),
        "ms",
        Target::AtMost(20.0),
    );
    r.num(
        "latency_p99_worst_ms",
        "end-to-end latency p99, worst run",
        ms1o(worst.filter(|w| w.is_finite())),
        "ms",
        Target::Info,
    );
    r.extra(
        "latency_p99_runs_ms",
        json!(p99s.iter().map(|p| round(*p, 1)).collect::<Vec<_>>()),
    );
    r.num(
        "latency_max_ms",
        "end-to-end latency max",
        ms1o(hist.max_ms()),
        "ms",
        Target::Info,
    );
    r.num(
        "run_duration_ms",
        "run duration (start → end)",
        ms1o(duration_ms),
        "ms",
        Target::Info,
    );
    r.num(
        "all_done_ms",
        "trigger → every subscriber done",
        Some(round(all_done.as_secs_f64() * 1e3, 1)),
        "ms",
        Target::Info,
    );
    r.num(
        "sked_cpu_percent",
        "sked CPU",
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
    r.num(
        "bench_cpu_percent",
        "bench (subscribers) CPU",
        Some(round(bench_cpu, 1)),
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
    r.extra("run_state", json!(state));
    if persisted != a.lines as i64 {
        r.note(format!(
            "sked persisted {persisted} of the {} lines the command printed",
            a.lines
        ));
    }
    if let Some(p) = problems.first() {
        r.note(format!(
            "{} subscriber(s) saw a problem; first: {p}",
            problems.len()
        ));
    }
    if let Some(e) = errors.first() {
        r.note(format!("{} subscriber(s) failed; first: {e}", errors.len()));
    }
    Ok(r)
}

/// Figures of one run of the scenario.
struct OneRun {
    hist: Histogram,
    total_lines: u64,
    first_us: u64,
    last_us: u64,
    complete: usize,
    errors: Vec<String>,
    problems: Vec<String>,
    persisted: i64,
    persist_secs: Option<f64>,
    state: String,
    duration_ms: Option<f64>,
    all_done: Duration,
    cpu: crate::env::CpuUse,
    bench_cpu: f64,
    rss: Option<f64>,
}

/// One run: connects the subscribers, triggers the binding, follows the
/// run with every subscriber until its end, and reads what was persisted.
async fn measure_one(
    env: &mut Env,
    a: &StreamArgs,
    tenant: &str,
    binding_id: &str,
) -> anyhow::Result<OneRun> {
    progress!("stream: connecting {} subscribers", a.subscribers);
    let mut channels: Vec<Channel> = Vec::with_capacity(a.subscribers);
    for i in 0..a.subscribers {
        let addr = env.nodes[i % env.nodes.len()].addr;
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
        );
    }

    let cpu0 = env.cpu_snapshot().await;
    let self0 = ProcTicks::of(&[std::process::id() as i32]);
    let started = Instant::now();
    let run = RunServiceClient::new(env.channel(0))
        .trigger_run(api::req(
            tenant,
            pb::TriggerRunRequest {
                binding_id: binding_id.to_string(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    progress!(
        "run {} triggered; {} subscribers tailing",
        run.id,
        a.subscribers
    );
    let mut set = tokio::task::JoinSet::new();
    for ch in channels {
        let (tenant, run_id) = (tenant.to_string(), run.id.clone());
        let (n, limit) = (a.lines, Duration::from_secs(a.timeout));
        set.spawn(async move {
            match tokio::time::timeout(limit, subscribe(ch, tenant, run_id, n)).await {
                Ok(seen) => seen,
                Err(_) => Seen {
                    error: Some(format!("no terminal event within {limit:?}")),
                    ..Default::default()
                },
            }
        });
    }
    let mut seen = Vec::with_capacity(a.subscribers);
    while let Some(r) = set.join_next().await {
        seen.push(r?);
    }
    let all_done = started.elapsed();
    let cpu1 = env.cpu_snapshot().await;
    let self1 = ProcTicks::of(&[std::process::id() as i32]);
    let cpu = cpu0.percent_until(&cpu1);
    let bench_cpu =
        self1.since(&self0) as f64 / crate::env::clock_ticks_per_sec() / all_done.as_secs_f64()
            * 100.0;
    let rss = env.sked_rss_mib();

    let run_id: uuid::Uuid = run.id.parse()?;
    let (persisted, first, last): (
        i64,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as(
        "SELECT count(*), min(time), max(time) FROM run_events WHERE run_id = $1 AND kind = 'log'",
    )
    .bind(run_id)
    .fetch_one(&env.pool)
    .await?;
    let (state, duration_ms): (String, Option<f64>) = sqlx::query_as(
        "SELECT state, extract(epoch FROM end_time - start_time)::float8 * 1000 FROM runs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_one(&env.pool)
    .await?;
    let persist_secs = match (first, last) {
        (Some(f), Some(l)) => (l - f).num_microseconds().map(|us| us as f64 / 1e6),
        _ => None,
    };

    let mut hist = Histogram::default();
    let mut total_lines = 0u64;
    let (mut first_us, mut last_us) = (u64::MAX, 0u64);
    let mut complete = 0usize;
    let mut errors = Vec::new();
    let mut problems = Vec::new();
    for s in &seen {
        hist.merge(&s.latency);
        total_lines += s.lines;
        if let (Some(f), Some(l)) = (s.first_us, s.last_us) {
            first_us = first_us.min(f);
            last_us = last_us.max(l);
        }
        if s.in_order && s.lines == a.lines && s.terminal == Some(pb::RunState::Succeeded) {
            complete += 1;
        }
        if let Some(e) = &s.error {
            errors.push(e.clone());
        }
        if let Some(p) = &s.problem {
            problems.push(p.clone());
        }
    }
    Ok(OneRun {
        hist,
        total_lines,
        first_us,
        last_us,
        complete,
        errors,
        problems,
        persisted,
        persist_secs,
        state,
        duration_ms,
        all_done,
        cpu,
        bench_cpu,
        rss,
    })
}

/// Follows the run from seq 1 until its terminal state, checking order.
async fn subscribe(ch: Channel, tenant: String, run_id: String, lines: u64) -> Seen {
    let mut seen = Seen {
        in_order: true,
        ..Default::default()
    };
    let stream = tail_lite(ch, &tenant, run_id).await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(e) => {
            seen.in_order = false;
            seen.error = Some(format!("TailRun: {e}"));
            return seen;
        }
    };
    let mut next_seq = 1i64;
    let mut next_line = 1u64;
    loop {
        match stream.message().await {
            Ok(Some(e)) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                if e.seq != next_seq {
                    seen.in_order = false;
                    seen.problem
                        .get_or_insert_with(|| format!("expected seq {next_seq}, got {}", e.seq));
                }
                next_seq = e.seq + 1;
                if let Some(l) = &e.log
                    && l.stream == pb::LogStream::Stdout as i32
                {
                    if parse_line(&l.message) != Some(next_line) {
                        seen.in_order = false;
                        seen.problem.get_or_insert_with(|| {
                            format!(
                                "expected line {next_line:?}, got {:?}",
                                String::from_utf8_lossy(&l.message)
                            )
                        });
                    }
                    next_line += 1;
                    seen.lines += 1;
                    let sent = e.time.as_ref().map_or(now, |t| {
                        (t.seconds.max(0) as u64) * 1_000_000 + (t.nanos.max(0) as u64) / 1_000
                    });
                    seen.latency.record(now.saturating_sub(sent));
                    seen.first_us.get_or_insert(now);
                    seen.last_us = Some(now);
                } else if let Some(sc) = &e.state_changed {
                    let to = pb::RunState::try_from(sc.to_state).unwrap_or_default();
                    if matches!(
                        to,
                        pb::RunState::Succeeded
                            | pb::RunState::Failed
                            | pb::RunState::TimedOut
                            | pb::RunState::Cancelled
                            | pb::RunState::Skipped
                    ) {
                        seen.terminal = Some(to);
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                seen.error = Some(format!("stream: {e}"));
                break;
            }
        }
    }
    if seen.terminal.is_none() {
        seen.in_order = false;
        seen.problem
            .get_or_insert_with(|| "no terminal state_changed event".into());
    }
    if seen.lines != lines {
        seen.in_order = false;
        seen.problem
            .get_or_insert_with(|| format!("got {} of {lines} lines", seen.lines));
    }
    seen
}

/// What a subscriber decodes of each `sked.v1.RunEvent`: only the fields it
/// checks (seq, time, a log line, a state change), with the same tags.
/// prost skips the other fields without allocating and the line stays a
/// slice of the received frame, so the bench's own decoding (100
/// subscribers × every line, on the machine sked runs on) takes less of
/// the CPU it shares with the node being measured.
#[derive(Clone, PartialEq, prost::Message)]
struct LiteEvent {
    /// `RunEvent.seq`.
    #[prost(int64, tag = "2")]
    seq: i64,
    /// `RunEvent.time`.
    #[prost(message, optional, tag = "3")]
    time: Option<prost_types::Timestamp>,
    /// `RunEvent.state_changed` (of the `kind` oneof).
    #[prost(message, optional, tag = "10")]
    state_changed: Option<LiteStateChanged>,
    /// `RunEvent.log` (of the `kind` oneof).
    #[prost(message, optional, tag = "11")]
    log: Option<LiteLogLine>,
}

/// `sked.v1.StateChanged`, the target state only.
#[derive(Clone, PartialEq, prost::Message)]
struct LiteStateChanged {
    /// `StateChanged.to_state`.
    #[prost(int32, tag = "2")]
    to_state: i32,
}

/// `sked.v1.LogLine`, stream and message (as bytes: not copied).
#[derive(Clone, PartialEq, prost::Message)]
struct LiteLogLine {
    /// `LogLine.stream`.
    #[prost(int32, tag = "2")]
    stream: i32,
    /// `LogLine.message`.
    #[prost(bytes = "bytes", tag = "3")]
    message: bytes::Bytes,
}

/// `TailRun(run_id, after_seq = 0, follow = true)` decoded as [`LiteEvent`].
async fn tail_lite(
    ch: Channel,
    tenant: &str,
    run_id: String,
) -> Result<tonic::Response<tonic::codec::Streaming<LiteEvent>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<pb::TailRunRequest, LiteEvent>::default();
    grpc.server_streaming(
        api::req(
            tenant,
            pb::TailRunRequest {
                run_id,
                after_seq: 0,
                follow: true,
            },
        ),
        tonic::codegen::http::uri::PathAndQuery::from_static("/sked.v1.LogService/TailRun"),
        codec,
    )
    .await
}

/// A line of `seq`'s output as its number.
fn parse_line(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}
