//! Crashes and shutdowns of real `sked serve` processes, checked through the
//! API of the nodes that remain:
//!
//! - `kill -9` of a node mid-run: another node's reaper ends the run FAILED
//!   with reason `node_lost` within 2 × lease, and the retry (trigger RETRY,
//!   attempt 2, `retry_of` set) runs to success on the surviving node.
//! - SIGTERM: running runs get the shutdown grace to finish (their events
//!   complete and dense), the rest are cancelled with reason `shutdown`, their
//!   process groups leave nothing behind, and the process exits 0.

use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use sked::proto::v1 as pb;
use tokio::process::Child;
use tonic::transport::Channel;

const TENANT: &str = "acme";

/// `sked serve` against `db_url` as node `node_id`, with extra `envs`.
/// With DATABASE_URL set the node requires API keys: `token` is a platform
/// admin key made with `sked admin bootstrap-key`'s library call.
async fn spawn_node(
    db_url: &str,
    node_id: &str,
    envs: &[(&str, &str)],
) -> (Child, Channel, String) {
    let token = sked::app::bootstrap_key(db_url, "crash-test")
        .await
        .expect("bootstrap key");
    let mut all = vec![("DATABASE_URL", db_url), ("SKED_NODE_ID", node_id)];
    all.extend_from_slice(envs);
    let (child, ch) = spawn_sked(&[], &all).await;
    (child, ch, token)
}

fn pid_of(child: &Child) -> i32 {
    child.id().expect("child still running") as i32
}

async fn get_run(ch: &Channel, token: &str, run_id: &str) -> pb::Run {
    RunServiceClient::new(ch.clone())
        .get_run(request(
            TENANT,
            Some(token),
            pb::GetRunRequest {
                run_id: run_id.into(),
            },
        ))
        .await
        .expect("get run")
        .into_inner()
}

/// Every persisted event of a run (all ListRunEvents pages), in seq order.
async fn run_events(ch: &Channel, token: &str, run_id: &str) -> Vec<pb::RunEvent> {
    let mut out = Vec::new();
    let mut after_seq = 0;
    loop {
        let page = LogServiceClient::new(ch.clone())
            .list_run_events(request(
                TENANT,
                Some(token),
                pb::ListRunEventsRequest {
                    run_id: run_id.into(),
                    after_seq,
                    page_size: 1000,
                },
            ))
            .await
            .expect("list run events")
            .into_inner();
        out.extend(page.events);
        after_seq = page.next_after_seq;
        if after_seq == 0 {
            return out;
        }
    }
}

/// Polls the run every 50 ms until `done` holds, for at most `limit`.
async fn wait_run(
    ch: &Channel,
    token: &str,
    run_id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&pb::Run) -> bool,
) -> pb::Run {
    let mut last = None;
    let found = tokio::time::timeout(limit, async {
        loop {
            let run = get_run(ch, token, run_id).await;
            if done(&run) {
                return run;
            }
            last = Some(run);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("run {run_id} not {what} within {limit:?}; last: {last:#?}"))
}

/// Polls the run's log until a line starting with `pid ` appears; returns the pid.
async fn wait_pid_line(ch: &Channel, token: &str, run_id: &str) -> i32 {
    tokio::time::timeout(WAIT, async {
        loop {
            let lines = log_lines(&run_events(ch, token, run_id).await);
            if let Some(pid) = lines.iter().find_map(|l| l.strip_prefix("pid ")) {
                return pid.parse().expect("pid line holds a number");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the run prints its pid")
}

/// The last event as a state change, if it is one.
fn last_state_change(events: &[pb::RunEvent]) -> Option<&pb::StateChanged> {
    match events.last()?.kind.as_ref()? {
        pb::run_event::Kind::StateChanged(s) => Some(s),
        _ => None,
    }
}

/// Pids of processes in process group `pgid` that are alive (not zombies,
/// which this machine's init may never reap).
fn live_members_of_group(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string()
        })
        .collect()
}

/// SIGKILLs a process group on drop (also when the test fails).
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        // SAFETY: killpg only takes ints; the group is a run's own.
        unsafe { libc::killpg(self.0, libc::SIGKILL) };
    }
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn to_system_time(t: &prost_types::Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_mid_run_fails_it_node_lost_and_the_retry_runs_elsewhere() {
    const LEASE: Duration = Duration::from_secs(2);
    let db = TestDb::new().await;
    let (mut victim, ch, token) = spawn_node(&db.url, "victim", &[("SKED_LEASE", "2")]).await;

    let mut def = sh_def(
        "flaky",
        r#"echo pid $$; if [ "$SKED_ATTEMPT" = 1 ]; then sleep 30; fi; echo attempt $SKED_ATTEMPT done"#,
        manual(),
    );
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: secs(1),
        ..Default::default()
    });
    let binding_id = define_and_bind_via(&ch, TENANT, Some(&token), def).await.id;
    let first = trigger_via(&ch, TENANT, Some(&token), &binding_id).await;
    let first = wait_run(&ch, &token, &first.id, WAIT, "RUNNING on victim", |r| {
        r.state == pb::RunState::Running as i32
    })
    .await;
    assert_eq!(first.node_id, "victim");
    assert_eq!(first.attempt, 1);
    assert_eq!(first.max_attempts, 2);
    // The shell is up (and leads the run's process group). The `sleep` it
    // starts is its child, not sked's: it outlives a SIGKILL of the node, so
    // the guard kills what is left of the group when the test ends.
    let pgid = wait_pid_line(&ch, &token, &first.id).await;
    let _leftovers = KillGroupOnDrop(pgid);

    let mut s = settings(&db, "survivor");
    s.lease = LEASE;
    let survivor = TestNode::start_with(s).await;

    let killed_at = Instant::now();
    let killed_wall = SystemTime::now();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid_of(&victim), libc::SIGKILL) }, 0);
    let status = tokio::time::timeout(WAIT, victim.wait())
        .await
        .expect("victim dies")
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );

    // The survivor's reaper fails the run within 2 × lease (+1 s of polling).
    let lost = wait_run(
        &survivor.channel,
        &token,
        &first.id,
        2 * LEASE + Duration::from_secs(1),
        "FAILED/node_lost",
        |r| r.state != pb::RunState::Running as i32,
    )
    .await;
    let noticed_after = killed_at.elapsed();
    assert_eq!(lost.state, pb::RunState::Failed as i32, "{lost:#?}");
    assert_eq!(lost.reason, "node_lost");
    assert_eq!(lost.node_id, "victim");
    let ended_after = to_system_time(lost.end_time.as_ref().expect("end_time"))
        .duration_since(killed_wall)
        .unwrap_or_default();
    assert!(
        ended_after <= 2 * LEASE,
        "reaped {ended_after:?} after the kill (seen after {noticed_after:?}); lease {LEASE:?}"
    );
    let events = run_events(&survivor.channel, &token, &first.id).await;
    assert_dense(&events);
    assert_eq!(
        last_state_change(&events),
        Some(&pb::StateChanged {
            from_state: pb::RunState::Running as i32,
            to_state: pb::RunState::Failed as i32,
            reason: "node_lost".into(),
        }),
        "{events:#?}"
    );

    // The retry: attempt 2 of the same binding, run to success by the survivor.
    let runs = runs_of(&survivor, TENANT, &binding_id).await;
    assert_eq!(runs.len(), 2, "the lost run and its one retry: {runs:#?}");
    let retry = runs
        .into_iter()
        .find(|r| r.id != first.id)
        .expect("a retry run");
    assert_eq!(retry.trigger, pb::RunTrigger::Retry as i32);
    assert_eq!(retry.retry_of, first.id);
    assert_eq!(retry.attempt, 2);
    assert_eq!(retry.max_attempts, 2);
    let retry = wait_terminal(&survivor, TENANT, &retry.id).await;
    assert_eq!(retry.state, pb::RunState::Succeeded as i32, "{retry:#?}");
    assert_eq!(retry.node_id, "survivor");
    let events = run_events(&survivor.channel, &token, &retry.id).await;
    assert_dense(&events);
    let lines = log_lines(&events);
    assert!(
        lines.iter().any(|l| l == "attempt 2 done"),
        "retry log: {lines:?}"
    );
    assert!(
        !log_lines(&run_events(&survivor.channel, &token, &first.id).await)
            .iter()
            .any(|l| l.ends_with("done")),
        "the lost attempt never finished"
    );
    assert_eq!(
        runs_of(&survivor, TENANT, &binding_id).await.len(),
        2,
        "no further retry after the success"
    );

    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_runs_then_cancels_the_rest_with_shutdown_and_exits_0() {
    // "short" needs ~1.5 s; the grace leaves it twice that on a loaded machine.
    const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
    let db = TestDb::new().await;
    let (mut child, ch, token) = spawn_node(
        &db.url,
        "draining",
        &[("SKED_SHUTDOWN_GRACE", "3"), ("SKED_KILL_GRACE", "1")],
    )
    .await;

    let short_binding = define_and_bind_via(
        &ch,
        TENANT,
        Some(&token),
        sh_def(
            "short",
            "for i in $(seq 1 20); do echo line $i; sleep 0.07; done",
            manual(),
        ),
    )
    .await
    .id;
    let long_binding = define_and_bind_via(
        &ch,
        TENANT,
        Some(&token),
        sh_def("long", "echo started; echo pid $$; sleep 30", manual()),
    )
    .await
    .id;
    let short = trigger_via(&ch, TENANT, Some(&token), &short_binding).await;
    let long = trigger_via(&ch, TENANT, Some(&token), &long_binding).await;
    for run in [&short, &long] {
        let r = wait_run(&ch, &token, &run.id, WAIT, "RUNNING", |r| {
            r.state == pb::RunState::Running as i32
        })
        .await;
        assert_eq!(r.node_id, "draining");
    }
    let pgid = wait_pid_line(&ch, &token, &long.id).await;

    let term_wall = SystemTime::now();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid_of(&child), libc::SIGTERM) }, 0);
    drop(ch);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("sked serve exits within 30 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit: {status}");

    // The long run's processes are gone with it (the shell, and `sleep` in
    // its group).
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // SAFETY: kill with signal 0 only checks for existence.
            let gone = unsafe { libc::kill(pgid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if gone && live_members_of_group(pgid).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the long run's process {pgid} or its group is still alive: {:?}",
            live_members_of_group(pgid)
        )
    });

    // Read the outcome through another node on the same database.
    let mut s = settings(&db, "reader");
    s.max_concurrent_runs = 0;
    let reader = TestNode::start_with(s).await;

    let short = get_run(&reader.channel, &token, &short.id).await;
    assert_eq!(short.state, pb::RunState::Succeeded as i32, "{short:#?}");
    let events = run_events(&reader.channel, &token, &short.id).await;
    assert_dense(&events);
    let want: Vec<String> = (1..=20).map(|i| format!("line {i}")).collect();
    assert_eq!(log_lines(&events), want);
    assert_eq!(
        last_state_change(&events),
        Some(&pb::StateChanged {
            from_state: pb::RunState::Running as i32,
            to_state: pb::RunState::Succeeded as i32,
            reason: String::new(),
        }),
        "{events:#?}"
    );

    let long = get_run(&reader.channel, &token, &long.id).await;
    assert_eq!(long.state, pb::RunState::Cancelled as i32, "{long:#?}");
    assert_eq!(long.reason, "shutdown");
    let cancelled_after = to_system_time(long.end_time.as_ref().expect("end_time"))
        .duration_since(term_wall)
        .unwrap_or_default();
    assert!(
        cancelled_after >= SHUTDOWN_GRACE,
        "cancelled {cancelled_after:?} after SIGTERM, before the grace was over"
    );
    let events = run_events(&reader.channel, &token, &long.id).await;
    assert_dense(&events);
    let lines = log_lines(&events);
    assert_eq!(
        lines.first().map(String::as_str),
        Some("started"),
        "{lines:?}"
    );
    assert_eq!(
        last_state_change(&events),
        Some(&pb::StateChanged {
            from_state: pb::RunState::Running as i32,
            to_state: pb::RunState::Cancelled as i32,
            reason: "shutdown".into(),
        }),
        "{events:#?}"
    );
    // No retry policy: the shutdown-cancelled run is not retried.
    assert_eq!(runs_of(&reader, TENANT, &long_binding).await.len(), 1);

    reader.stop().await;
}
