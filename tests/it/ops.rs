//! Operating sked, through real `sked serve` processes:
//!
//! - three nodes on one database: `GetSchedulerStatus` lists the three and
//!   exactly one leader; `kill -9` of the leader's process and another node
//!   leads within one lease (a short `--leader-lease-secs`), in a higher
//!   term; the dead node turns stale;
//! - `/metrics` of a node run as a child process (the metrics recorder is
//!   process-global), parsed by a Prometheus text-format parser: the
//!   counters equal the runs the test made, the fire-lag histogram has their
//!   observations;
//! - a node on a private PostgreSQL cluster: stopping PostgreSQL turns
//!   health `NOT_SERVING` and the node stops acting as leader once it cannot
//!   renew its lease; starting it again turns health `SERVING`, the node
//!   leads again in a new term, firing resumes by itself and the fires
//!   missed meanwhile are recorded per the misfire policy (every fire time
//!   present once: nothing silently lost);
//! - the lease statement on its own: one winner among racing nodes, renewal
//!   in the same term, a new term after a lapse or a release, the fence.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use sked::proto::v1 as pb;
use sked::proto::v1::worker_service_client::WorkerServiceClient;
use tokio::process::Child;
use tonic::transport::Channel;

const TENANT: &str = "acme";

fn pid_of(child: &Child) -> i32 {
    child.id().expect("child still running") as i32
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn status(ch: &Channel, token: &str) -> Result<pb::SchedulerStatus, tonic::Status> {
    AdminServiceClient::new(ch.clone())
        .get_scheduler_status(with_key(token, pb::GetSchedulerStatusRequest {}))
        .await
        .map(|r| r.into_inner())
}

/// Polls GetSchedulerStatus every 50 ms until `done` holds, for at most
/// `limit`.
async fn wait_status(
    ch: &Channel,
    token: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&pb::SchedulerStatus) -> bool,
) -> pb::SchedulerStatus {
    let mut last = None;
    let found = tokio::time::timeout(limit, async {
        loop {
            match status(ch, token).await {
                Ok(s) if done(&s) => return s,
                Ok(s) => last = Some(s),
                Err(e) => panic!("GetSchedulerStatus: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("within {limit:?}: {what}; last status: {last:#?}"))
}

/// Every run of the tenant (all ListRuns pages), oldest fire time first.
async fn all_runs(ch: &Channel, token: &str) -> Vec<pb::Run> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = RunServiceClient::new(ch.clone())
            .list_runs(request(
                TENANT,
                Some(token),
                pb::ListRunsRequest {
                    page_size: 1000,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .expect("list runs")
            .into_inner();
        out.extend(page.runs);
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    out.sort_by(|a, b| secs(&a.scheduled_time).total_cmp(&secs(&b.scheduled_time)));
    out
}

/// Polls the tenant's runs until `done` holds, for at most `limit`.
async fn runs_until_via(
    ch: &Channel,
    token: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&[pb::Run]) -> bool,
) -> Vec<pb::Run> {
    tokio::time::timeout(limit, async {
        loop {
            let runs = all_runs(ch, token).await;
            if done(&runs) {
                return runs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("within {limit:?}: {what}"))
}

fn event_def(name: &str) -> pb::TaskDefinition {
    pb::TaskDefinition {
        name: name.into(),
        handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
        schedule: Some(every(1)),
        ..Default::default()
    }
}

async fn delete_binding(ch: &Channel, token: &str, id: &str) {
    BindingServiceClient::new(ch.clone())
        .delete_binding(request(
            TENANT,
            Some(token),
            pb::DeleteBindingRequest {
                binding_id: id.into(),
            },
        ))
        .await
        .expect("delete binding");
}

async fn health_status(ch: &Channel) -> Option<i32> {
    tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

async fn wait_health(ch: &Channel, want: tonic_health::ServingStatus, limit: Duration) {
    let want = want as i32;
    let mut last = None;
    tokio::time::timeout(limit, async {
        loop {
            last = health_status(ch).await;
            if last == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("health {want} within {limit:?}; last: {last:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_leader_and_kill_9_of_the_leader_hands_over_within_a_lease() {
    const LEASE: Duration = Duration::from_secs(2);
    let db = TestDb::new().await;
    let token = sked::app::bootstrap_key(&db.url, "ops-test")
        .await
        .expect("bootstrap key");
    let mut nodes: BTreeMap<String, (Child, Channel)> = BTreeMap::new();
    for id in ["ops-a", "ops-b", "ops-c"] {
        let node = spawn_sked(
            &[],
            &[
                ("DATABASE_URL", &db.url),
                ("SKED_NODE_ID", id),
                ("SKED_LEADER_LEASE", "2"),
                ("SKED_DB_MAX_CONNECTIONS", "4"),
            ],
        )
        .await;
        nodes.insert(id.to_string(), node);
    }
    let ch_a = nodes["ops-a"].1.clone();

    let s = wait_status(&ch_a, &token, WAIT, "three fresh nodes and a leader", |s| {
        s.nodes.len() == 3 && s.nodes.iter().all(|n| !n.stale) && !s.leader_node_id.is_empty()
    })
    .await;
    assert_eq!(s.node_id, "ops-a");
    let ids: Vec<&str> = s.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["ops-a", "ops-b", "ops-c"]);
    let leaders: Vec<&pb::SchedulerNode> = s.nodes.iter().filter(|n| n.leader).collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {s:#?}");
    assert_eq!(leaders[0].node_id, s.leader_node_id);
    assert!(s.leader_term >= 1, "{s:#?}");
    let expire = secs(&s.leader_lease_expire_time);
    assert!(
        expire > secs(&s.time) - 1.0 && expire <= secs(&s.time) + LEASE.as_secs_f64() + 1.0,
        "the lease lapses within one lease of now: {s:#?}"
    );
    for n in &s.nodes {
        assert_eq!(n.version, env!("CARGO_PKG_VERSION"));
        assert!(
            secs(&n.start_time) <= secs(&n.heartbeat_time) + 1.0,
            "{n:#?}"
        );
        assert!(!n.draining);
        assert_eq!(n.running_runs, 0);
    }
    // Every node names the same leader.
    for (id, (_, ch)) in &nodes {
        let other = status(ch, &token).await.expect("status");
        assert_eq!(&other.node_id, id);
        assert_eq!(other.leader_node_id, s.leader_node_id, "as seen by {id}");
    }
    // Stream subscribers: this node's now, every node's with its heartbeat.
    let ch_b = nodes["ops-b"].1.clone();
    let _watch = LogServiceClient::new(ch_b.clone())
        .watch_events(request(
            TENANT,
            Some(&token),
            pb::WatchEventsRequest::default(),
        ))
        .await
        .expect("watch events");
    wait_status(&ch_b, &token, WAIT, "ops-b counts its subscriber", |s| {
        s.stream_subscribers >= 1
            && s.nodes
                .iter()
                .any(|n| n.node_id == "ops-b" && n.stream_subscribers >= 1)
    })
    .await;
    // A platform admin only.
    let tenant_admin = AdminServiceClient::new(ch_a.clone())
        .create_api_key(with_key(
            &token,
            pb::CreateApiKeyRequest {
                name: "tenant admin".into(),
                role: pb::Role::Admin as i32,
                tenant_id: TENANT.into(),
            },
        ))
        .await
        .expect("create key")
        .into_inner()
        .token;
    let denied = status(&ch_a, &tenant_admin).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // kill -9 the leader: another node leads within one lease.
    let old_leader = s.leader_node_id.clone();
    let old_term = s.leader_term;
    let (mut victim, _) = nodes.remove(&old_leader).expect("the leader is ours");
    let killed_at = Instant::now();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid_of(&victim), libc::SIGKILL) }, 0);
    tokio::time::timeout(WAIT, victim.wait())
        .await
        .expect("the leader dies")
        .unwrap();
    let survivor = nodes.values().next().expect("two survivors").1.clone();
    let taken = wait_status(
        &survivor,
        &token,
        LEASE + Duration::from_secs(5),
        "another node leads",
        |s| !s.leader_node_id.is_empty() && s.leader_node_id != old_leader,
    )
    .await;
    let took = killed_at.elapsed();
    assert!(
        took <= LEASE + Duration::from_millis(1500),
        "a survivor led {took:?} after the kill; lease {LEASE:?}"
    );
    assert!(nodes.contains_key(&taken.leader_node_id), "{taken:#?}");
    assert!(taken.leader_term > old_term, "a new term: {taken:#?}");
    assert_eq!(taken.nodes.iter().filter(|n| n.leader).count(), 1);

    // The dead node turns stale (no heartbeat for 10 s); the others stay
    // fresh.
    let stale = wait_status(&survivor, &token, WAIT, "the dead node is stale", |s| {
        s.nodes.iter().any(|n| n.node_id == old_leader && n.stale)
    })
    .await;
    assert_eq!(stale.nodes.len(), 3);
    assert!(
        stale
            .nodes
            .iter()
            .filter(|n| n.node_id != old_leader)
            .all(|n| !n.stale),
        "{stale:#?}"
    );

    // A clean stop: the node deletes its row, and a stopped leader hands
    // over at once.
    for (_, (child, _)) in nodes.iter() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid_of(child), libc::SIGTERM) };
    }
    for (id, (mut child, _)) in nodes {
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{id} exits"))
            .unwrap();
        assert_eq!(status.code(), Some(0), "{id}: {status}");
    }
    let pool = db.pool().await;
    let left: Vec<String> = sqlx::query_scalar("SELECT node_id FROM nodes ORDER BY node_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, [old_leader], "only the killed node's row is left");
}

/// The value of a counter (0 when absent) with `label` = `value`.
fn counter(scrape: &prometheus_parse::Scrape, name: &str, label: (&str, &str)) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref v => panic!("{name} is not a counter: {v:?}"),
        })
        .sum()
}

/// Observations of a histogram (its `+Inf` bucket) with `label` = `value`
/// (any labels when `None`).
fn observations(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            v => panic!("{name} is not a histogram: {v:?}"),
        })
        .sum()
}

async fn scrape(port: u16) -> (String, prometheus_parse::Scrape) {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .error_for_status()
        .expect("200")
        .text()
        .await
        .expect("body");
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    (body, parsed)
}

async fn wait_terminal_via(ch: &Channel, token: &str, run_id: &str) -> pb::Run {
    tokio::time::timeout(WAIT, async {
        loop {
            let run = RunServiceClient::new(ch.clone())
                .get_run(request(
                    TENANT,
                    Some(token),
                    pb::GetRunRequest {
                        run_id: run_id.into(),
                    },
                ))
                .await
                .expect("get run")
                .into_inner();
            if is_terminal(&run) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the run ends")
}

/// A `sked serve` child process serving `/metrics` (the recorder is
/// process-global), with a platform key.
struct MeteredNode {
    _child: Child,
    channel: Channel,
    /// The bootstrap key's token.
    token: String,
    /// Where `/metrics` is served on 127.0.0.1.
    port: u16,
}

impl MeteredNode {
    async fn start(db: &TestDb, node_id: &str, envs: &[(&str, &str)]) -> MeteredNode {
        let token = sked::app::bootstrap_key(&db.url, "ops-test")
            .await
            .expect("bootstrap key");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec![
            ("DATABASE_URL", db.url.as_str()),
            ("SKED_NODE_ID", node_id),
            ("SKED_METRICS_LISTEN", listen.as_str()),
        ];
        all.extend_from_slice(envs);
        let (child, channel) = spawn_sked(&[], &all).await;
        MeteredNode {
            _child: child,
            channel,
            token,
            port,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_runs_the_test_made() {
    let db = TestDb::new().await;
    let node = MeteredNode::start(&db, "metered", &[("SKED_DB_MAX_CONNECTIONS", "4")]).await;
    let (ch, token, port) = (node.channel.clone(), node.token.clone(), node.port);

    // Scheduled fires of an `event` binding (each has a fire lag), until
    // at least three ran; then the binding goes, and no more fire.
    let ticker = define_and_bind_via(&ch, TENANT, Some(&token), event_def("ticker")).await;
    runs_until_via(&ch, &token, WAIT, "three scheduled fires", |runs| {
        runs.iter().filter(|r| is_terminal(r)).count() >= 3
    })
    .await;
    delete_binding(&ch, &token, &ticker.id).await;
    // Manual command runs: three succeed, three fail (no retry): `bad`
    // is FAILING after its third.
    let ok = define_and_bind_via(&ch, TENANT, Some(&token), sh_def("ok", "true", manual())).await;
    let bad =
        define_and_bind_via(&ch, TENANT, Some(&token), sh_def("bad", "exit 3", manual())).await;
    let mut made = Vec::new();
    for b in [&ok, &ok, &ok, &bad, &bad, &bad] {
        made.push(trigger_via(&ch, TENANT, Some(&token), &b.id).await.id);
    }
    for id in &made {
        wait_terminal_via(&ch, &token, id).await;
    }

    let runs = all_runs(&ch, &token).await;
    assert!(runs.iter().all(is_terminal), "{runs:#?}");
    let count = |st: pb::RunState| runs.iter().filter(|r| state(r) == st).count() as f64;
    let scheduled = runs
        .iter()
        .filter(|r| r.trigger == pb::RunTrigger::Schedule as i32)
        .count() as f64;
    assert!(scheduled >= 3.0);
    assert_eq!(count(pb::RunState::Failed), 3.0);
    assert_eq!(count(pb::RunState::Succeeded), scheduled + 3.0);

    // Counters move with the publication right after each commit: wait
    // (bounded) until the scrape shows every run, then compare exactly.
    let want = [
        ("succeeded", count(pb::RunState::Succeeded)),
        ("failed", count(pb::RunState::Failed)),
        ("timed_out", 0.0),
        ("cancelled", 0.0),
        ("skipped", 0.0),
    ];
    let mut last = None;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            let (body, m) = scrape(port).await;
            let finished: Vec<(&str, f64)> = want
                .iter()
                .map(|(s, _)| (*s, counter(&m, "sked_runs_finished_total", ("state", s))))
                .collect();
            if finished == want {
                return (body, m);
            }
            last = Some(finished);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sked_runs_finished_total never matched {want:?}; last {last:?}"));
    let (body, m) = got;
    assert_eq!(
        counter(&m, "sked_fires_total", ("outcome", "run")),
        scheduled,
        "one fire per scheduled run:\n{body}"
    );
    for outcome in ["misfire", "overlap", "quota", "other"] {
        assert_eq!(counter(&m, "sked_fires_total", ("outcome", outcome)), 0.0);
    }
    assert_eq!(
        observations(&m, "sked_fire_lag_seconds", None),
        scheduled,
        "a lag observation per scheduled run:\n{body}"
    );
    assert_eq!(
        observations(
            &m,
            "sked_run_duration_seconds",
            Some(("state", "succeeded"))
        ),
        3.0,
        "durations of the command runs that succeeded:\n{body}"
    );
    assert_eq!(
        observations(&m, "sked_run_duration_seconds", Some(("state", "failed"))),
        3.0
    );
    assert!(observations(&m, "sked_claim_duration_seconds", Some(("kind", "execute"))) >= 1.0);
    assert!(observations(&m, "sked_scheduler_pass_duration_seconds", None) >= 3.0);
    assert!(counter(&m, "sked_events_published_total", ("origin", "local")) > 0.0);
    assert!(
        m.samples.iter().any(|s| s.metric == "sked_build_info"
            && s.labels.get("version") == Some(env!("CARGO_PKG_VERSION"))),
        "{body}"
    );
    // Gauges: health, leadership (the only node leads), pools.
    let gauge = |name: &str| {
        m.samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                ref v => panic!("{name} is not a gauge: {v:?}"),
            })
    };
    assert_eq!(gauge("sked_health_serving"), Some(1.0), "{body}");
    assert_eq!(gauge("sked_leader"), Some(1.0), "{body}");
    for name in [
        "sked_db_pool_max_connections",
        "sked_cluster_runs",
        "sked_queue_oldest_age_seconds",
    ] {
        // Sampled every 10 s: the first sample runs at start.
        assert!(gauge(name).is_some(), "{name} is exported:\n{body}");
    }
    // The failing bindings gauge, sampled (every 10 s): `bad` is FAILING,
    // `ok` is not; no tenant label unless asked for.
    let mut seen = None;
    tokio::time::timeout(WAIT, async {
        loop {
            let (_, m) = scrape(port).await;
            let failing: Vec<(f64, usize)> = m
                .samples
                .iter()
                .filter(|s| s.metric == "sked_failing_bindings")
                .map(|s| match s.value {
                    prometheus_parse::Value::Gauge(v) => (v, s.labels.len()),
                    ref v => panic!("sked_failing_bindings is not a gauge: {v:?}"),
                })
                .collect();
            if failing == [(1.0, 0)] {
                return;
            }
            seen = Some(failing);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sked_failing_bindings never read 1; last {seen:?}"));
    // No run, binding or definition id ever labels a series.
    for s in &m.samples {
        for id in runs
            .iter()
            .map(|r| r.id.as_str())
            .chain([ticker.id.as_str(), ok.id.as_str()])
        {
            assert!(
                !format!("{:?}", s.labels).contains(id),
                "{} is labelled with an id",
                s.metric
            );
        }
    }

    // The same runs through GetSchedulerStatus: nothing waits; the lag
    // sample holds the scheduled runs that started in the last minute.
    let s = status(&ch, &token).await.expect("status");
    assert_eq!((s.scheduled_runs, s.queued_runs, s.running_runs), (0, 0, 0));
    assert!(s.oldest_queued_age.is_none());
    let lag = s.fire_lag.expect("fire lag");
    assert_eq!(lag.runs as f64, scheduled, "{s:#?}");
    let p50 = lag.p50.expect("p50");
    let p99 = lag.p99.expect("p99");
    assert!(p50.seconds < 5 && p99.seconds < 5, "{lag:?}");
    assert!(
        (p50.seconds, p50.nanos) <= (p99.seconds, p99.nanos),
        "{lag:?}"
    );
}

/// A worker run costs the worker dispatch one claim, whatever woke it:
/// counted by `sked_claim_duration_seconds{kind="worker"}` of a node run as
/// a child process, over runs triggered one at a time with a run time
/// ahead (created `SCHEDULED`, promoted when due) and completed by a
/// worker stream of the test. Before, each run made three: the promotion's
/// own wake, its NOTIFY heard by the same node, and the slot its
/// completion freed (every claim takes the lock all claims wait on).
/// Overlap ALLOW, so a run's end announces nothing (an overlap-free
/// binding's end is a NOTIFY, and rightly a claim); the dispatch's poll
/// adds at most one claim a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_run_costs_the_dispatch_one_claim() {
    const RUNS: usize = 12;
    let db = TestDb::new().await;
    let node = MeteredNode::start(&db, "dispatch", &[]).await;
    let (ch, token, port) = (node.channel.clone(), node.token.clone(), node.port);
    let def = pb::TaskDefinition {
        name: "w.one".into(),
        handler: Some(pb::task_definition::Handler::Worker(pb::WorkerHandler {
            queue: "one".into(),
            schedule_to_start_timeout: None,
        })),
        schedule: Some(manual()),
        overlap_policy: pb::OverlapPolicy::Allow as i32,
        ..Default::default()
    };
    let b = define_and_bind_via(&ch, TENANT, Some(&token), def).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::WorkerRequest {
        hello: Some(pb::Hello {
            queue: "one".into(),
            worker_name: "w1".into(),
            slots: 4,
            lease_tokens: vec![],
        }),
        ..Default::default()
    })
    .await
    .expect("hello");
    let mut from = WorkerServiceClient::new(ch.clone())
        .work(request(
            TENANT,
            Some(&token),
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .expect("work")
        .into_inner();
    let worker_claims = |m: &prometheus_parse::Scrape| {
        observations(m, "sked_claim_duration_seconds", Some(("kind", "worker")))
    };
    // The stream's first claims (on connect) done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = worker_claims(&scrape(port).await.1);
    let started = Instant::now();
    for _ in 0..RUNS {
        let run = RunServiceClient::new(ch.clone())
            .trigger_run(request(
                TENANT,
                Some(&token),
                pb::TriggerRunRequest {
                    binding_id: b.id.clone(),
                    run_time: Some(ts(now_secs() + 0.3)),
                    ..Default::default()
                },
            ))
            .await
            .expect("trigger run")
            .into_inner();
        assert_eq!(state(&run), pb::RunState::Scheduled, "{run:?}");
        let assigned = tokio::time::timeout(WAIT, async {
            loop {
                match from.message().await.expect("stream").expect("open") {
                    pb::WorkerResponse {
                        kind: Some(pb::worker_response::Kind::Assigned(a)),
                    } => return a,
                    _ => continue,
                }
            }
        })
        .await
        .expect("the run is assigned");
        assert_eq!(assigned.run_id, run.id);
        tx.send(pb::WorkerRequest {
            completes: vec![pb::Complete {
                lease_token: assigned.lease_token.clone(),
                result: None,
            }],
            ..Default::default()
        })
        .await
        .expect("complete");
        let ack = tokio::time::timeout(WAIT, async {
            loop {
                if let pb::WorkerResponse {
                    kind: Some(pb::worker_response::Kind::Ack(a)),
                } = from.message().await.expect("stream").expect("open")
                {
                    return a;
                }
            }
        })
        .await
        .expect("the completion is acked");
        assert_eq!(ack.code, 0, "{ack:?}");
        let ended = wait_terminal_via(&ch, &token, &run.id).await;
        assert_eq!(state(&ended), pb::RunState::Succeeded, "{ended:?}");
    }
    // Claims after the last completion would count too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claims = worker_claims(&scrape(port).await.1) - before;
    let polls = started.elapsed().as_secs_f64().ceil();
    assert!(
        claims >= RUNS as f64 && claims <= RUNS as f64 + polls + 1.0,
        "{claims} worker claims for {RUNS} runs in {polls} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_postgresql_turns_health_not_serving_and_firing_resumes_with_misfires() {
    use sked::embedded_pg::{EmbeddedPg, Options};
    use tonic_health::ServingStatus;
    let dir = std::env::temp_dir().join(format!("sked-ops-pg-{}", uuid::Uuid::new_v4().simple()));
    let opts = Options { fast_unsafe: true };
    let pg = EmbeddedPg::start_with(&dir, opts)
        .await
        .expect("a private PostgreSQL cluster");
    sked::db::ensure_database(&pg.url("postgres"), "sked")
        .await
        .expect("create database");
    let url = pg.url("sked");
    let token = sked::app::bootstrap_key(&url, "ops-test")
        .await
        .expect("bootstrap key");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (mut child, ch) = spawn_sked(
        &[],
        &[
            ("DATABASE_URL", &url),
            ("SKED_NODE_ID", "pg-bound"),
            ("SKED_DB_MAX_CONNECTIONS", "4"),
            ("SKED_LEADER_LEASE", "2"),
            ("SKED_METRICS_LISTEN", &listen),
        ],
    )
    .await;
    let gauge = |m: &prometheus_parse::Scrape, name: &str| {
        m.samples
            .iter()
            .find(|s| s.metric == name)
            .and_then(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => Some(v),
                _ => None,
            })
    };
    // Every second; missed fires older than the catch-up window (the 5 s
    // misfire tolerance here) are skipped, the latest inside it runs once.
    let mut def = event_def("heartbeat");
    def.misfire_policy = Some(pb::MisfirePolicy {
        catchup_window: Some(prost_types::Duration::default()),
        mode: pb::MisfireMode::RunOnce as i32,
    });
    define_and_bind_via(&ch, TENANT, Some(&token), def).await;
    runs_until_via(&ch, &token, WAIT, "two fires before the outage", |runs| {
        runs.len() >= 2
    })
    .await;
    wait_health(&ch, ServingStatus::Serving, WAIT).await;
    let before = wait_status(&ch, &token, WAIT, "the node leads", |s| {
        s.leader_node_id == "pg-bound"
    })
    .await;

    let stopping_at = now_secs();
    pg.stop().await.expect("stop PostgreSQL");
    let down_at = now_secs();
    let stopped = Instant::now();
    // The health check runs every 5 s, each given 3 s.
    wait_health(&ch, ServingStatus::NotServing, Duration::from_secs(15)).await;
    // The node answers, but says it does not serve; keep the database away
    // long enough that fires fall out of the catch-up window.
    if let Some(rest) = Duration::from_secs(9).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the node keeps running without its database"
    );
    // Its lease (2 s) could not be renewed: it no longer acts as leader.
    let (body, m) = scrape(port).await;
    assert_eq!(gauge(&m, "sked_leader"), Some(0.0), "{body}");
    assert_eq!(gauge(&m, "sked_health_serving"), Some(0.0), "{body}");
    let up_at = now_secs();
    let pg = EmbeddedPg::start_with(&dir, opts)
        .await
        .expect("PostgreSQL starts again");
    wait_health(&ch, ServingStatus::Serving, Duration::from_secs(30)).await;
    let serving_at = now_secs();
    // It leads again, in a new term (its lease lapsed meanwhile).
    let after = wait_status(&ch, &token, WAIT, "the node leads again", |s| {
        s.leader_node_id == "pg-bound"
    })
    .await;
    assert!(
        after.leader_term > before.leader_term,
        "{before:#?} {after:#?}"
    );

    // Firing resumes by itself: fires after the restart run.
    let runs = runs_until_via(&ch, &token, WAIT, "fires after the restart", |runs| {
        runs.iter()
            .any(|r| secs(&r.scheduled_time) >= up_at + 2.0 && state(r) == pb::RunState::Succeeded)
    })
    .await;
    // Nothing silently lost: every fire time, one second apart, once.
    let times: Vec<f64> = runs.iter().map(|r| secs(&r.scheduled_time)).collect();
    for w in times.windows(2) {
        assert!(
            (w[1] - w[0] - 1.0).abs() < 1e-3,
            "fire times are consecutive, 1 s apart: {times:?}"
        );
    }
    // Fires that fell due while the database was away and aged out of the
    // catch-up window are SKIPPED/misfire; every other fire ran.
    let skipped: Vec<&pb::Run> = runs
        .iter()
        .filter(|r| state(r) == pb::RunState::Skipped)
        .collect();
    assert!(!skipped.is_empty(), "misfires recorded: {runs:#?}");
    for r in &runs {
        let t = secs(&r.scheduled_time);
        match state(r) {
            pb::RunState::Skipped => {
                assert_eq!(r.reason, "misfire", "{r:#?}");
                assert!(
                    t > stopping_at - 1.0 && t < serving_at + 3.0,
                    "skipped only for the outage: {r:#?}"
                );
            }
            pb::RunState::Succeeded => {}
            _ => panic!("every fire ran or was skipped: {r:#?}"),
        }
        if t >= down_at + 1.0 && t <= up_at - 2.0 {
            assert_eq!(
                state(r),
                pb::RunState::Skipped,
                "a fire due mid-outage, out of the window by the restart: {r:#?}"
            );
        }
    }

    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid_of(&child), libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the node exits")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    pg.stop().await.expect("stop PostgreSQL");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The lease statement itself: of many nodes racing for it exactly one
/// wins; the holder renews in the same term; nobody else takes an unexpired
/// lease; once it lapsed the next taker starts a new term; a release lets
/// it lapse at once; the fence holds only for the holder's current term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_lease_has_one_holder_per_term() {
    use sked::db::cluster::{leader_acquire, leader_get, leader_holds, leader_release};
    let db = TestDb::new().await;
    sked::db::migrate(&db.pool().await).await.unwrap();
    let pool = sked::db::connect(&db.url, 16).await.unwrap();
    let lease = Duration::from_millis(800);
    const NAME: &str = "maintenance";

    let mut racers = tokio::task::JoinSet::new();
    for i in 0..12 {
        let pool = pool.clone();
        racers.spawn(async move {
            let id = format!("n{i}");
            (
                id.clone(),
                leader_acquire(&pool, NAME, &id, lease).await.unwrap(),
            )
        });
    }
    let mut won = Vec::new();
    while let Some(r) = racers.join_next().await {
        let (id, got) = r.unwrap();
        if let Some(l) = got {
            assert_eq!(l.node_id, id);
            won.push(l);
        }
    }
    assert_eq!(won.len(), 1, "exactly one winner: {won:?}");
    let first = won.pop().unwrap();
    assert_eq!(first.term, 1);

    // The holder renews in the same term; others are refused meanwhile.
    let renewed = leader_acquire(&pool, NAME, &first.node_id, lease)
        .await
        .unwrap()
        .expect("the holder renews");
    assert_eq!(renewed.term, 1);
    assert!(renewed.expire_time >= first.expire_time);
    let other = if first.node_id == "n0" { "n1" } else { "n0" };
    assert!(
        leader_acquire(&pool, NAME, other, lease)
            .await
            .unwrap()
            .is_none()
    );
    assert!(leader_holds(&pool, NAME, &first.node_id, 1).await.unwrap());
    assert!(!leader_holds(&pool, NAME, other, 1).await.unwrap());

    // Lapsed: the next taker gets term 2, and the old holder's fence fails.
    let (_, remaining) = leader_get(&pool, NAME).await.unwrap().expect("a lease row");
    tokio::time::sleep(remaining + Duration::from_millis(50)).await;
    assert!(leader_get(&pool, NAME).await.unwrap().unwrap().0.expired);
    assert!(!leader_holds(&pool, NAME, &first.node_id, 1).await.unwrap());
    let second = leader_acquire(&pool, NAME, other, lease)
        .await
        .unwrap()
        .expect("a lapsed lease is free");
    assert_eq!((second.node_id.as_str(), second.term), (other, 2));
    assert!(
        leader_acquire(&pool, NAME, &first.node_id, lease)
            .await
            .unwrap()
            .is_none()
    );

    // A release lets it lapse now; retaking it is a new term even for the
    // same node.
    leader_release(&pool, NAME, &first.node_id).await.unwrap();
    assert!(
        !leader_get(&pool, NAME).await.unwrap().unwrap().0.expired,
        "not the holder's to release"
    );
    leader_release(&pool, NAME, other).await.unwrap();
    assert!(leader_get(&pool, NAME).await.unwrap().unwrap().0.expired);
    let third = leader_acquire(&pool, NAME, other, lease)
        .await
        .unwrap()
        .expect("released");
    assert_eq!(third.term, 3);
}

/// Why the hot write statements call `sked::db::generic_plans` first: a
/// prepared statement over `UNNEST` of short arrays (one TriggerRun's
/// run, a few completions) is planned by PostgreSQL for the call's own
/// values at first, and on every later call while that plan looks
/// cheaper than the generic one (which assumes 100 elements). With
/// `generic_plans` in the transaction the statement is never planned for
/// its values; the setting ends with the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_plans_plans_an_unnest_statement_once_per_connection() {
    let db = TestDb::new().await;
    sked::db::migrate(&db.pool().await).await.unwrap();
    let pool = sked::db::connect(&db.url, 1).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    // Two texts of the same statement, so each has its own prepared plan.
    let stmt = |tag: &str| {
        format!(
            "SELECT count(*) AS n FROM runs r JOIN UNNEST($1::uuid[]) AS u(id) ON r.id = u.id -- {tag}"
        )
    };
    for _ in 0..10 {
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        let one = vec![uuid::Uuid::now_v7()];
        let plain: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(stmt("plain")))
            .bind(&one)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        sked::db::generic_plans(&mut tx).await.unwrap();
        let mode: String = sqlx::query_scalar("SELECT current_setting('plan_cache_mode')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(mode, "force_generic_plan");
        let generic: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(stmt("generic")))
            .bind(&one)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!((plain, generic), (0, 0));
        tx.commit().await.unwrap();
    }
    let mode: String = sqlx::query_scalar("SELECT current_setting('plan_cache_mode')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(mode, "auto", "the setting ends with its transaction");
    let (generic, custom) = prepared_plans(&mut conn, "generic").await;
    assert_eq!(custom, 0, "planned for the call's own values");
    assert!(generic >= 1, "{generic}");
    // Without it PostgreSQL plans at least the first five calls for their
    // own values, and every later one too while that plan looks cheaper
    // (what the hot statements did on a busy `runs` table).
    let (_, custom) = prepared_plans(&mut conn, "plain").await;
    assert!(custom >= 5, "{custom}");
}

/// `(generic_plans, custom_plans)` of this connection's prepared statement
/// whose text ends with `-- tag`.
async fn prepared_plans(conn: &mut sqlx::PgConnection, tag: &str) -> (i64, i64) {
    let q = format!(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE '%-- {tag}'"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(q))
        .fetch_one(conn)
        .await
        .unwrap()
}
