//! Progress reported by a command (`::progress` stdout lines) and
//! non-retryable exit codes, through the generated client against a real
//! node running real `sh` commands.

use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;
use tonic::Code;

/// What a run's events say, in order: `log:<line>`, `progress:<percent>
/// <step>/<total> <message>` or `state:<to_state>`.
fn story(events: &[pb::RunEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::run_event::Kind::Log(l)) => Some(format!("log:{}", l.message)),
            Some(pb::run_event::Kind::Progress(p)) => Some(format!(
                "progress:{} {}/{} {}",
                p.percent, p.current_step, p.total_steps, p.message
            )),
            Some(pb::run_event::Kind::StateChanged(s)) => Some(format!(
                "state:{}",
                pb::RunState::try_from(s.to_state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?")
            )),
            _ => None,
        })
        .collect()
}

fn with_retries(mut def: pb::TaskDefinition, max_attempts: i32) -> pb::TaskDefinition {
    def.retry_policy = Some(pb::RetryPolicy {
        max_attempts,
        initial_backoff: Some(dur(100)),
        backoff_coefficient: 1.0,
        max_backoff: Some(dur(100)),
    });
    def
}

fn with_codes(mut def: pb::TaskDefinition, codes: Vec<i32>) -> pb::TaskDefinition {
    if let Some(pb::task_definition::Handler::Command(c)) = &mut def.handler {
        c.non_retryable_exit_codes = codes;
    }
    def
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_become_events_in_order_and_set_run_progress() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let script = "echo start; \
                  echo '::progress 10 1/3 reading input'; \
                  echo working; \
                  echo '::progress 40 2/3'; \
                  echo '::progress 12.5 halfway there'; \
                  echo '::progress 150 2/3 out of range'; \
                  echo '::progress 50 3/2 bad steps'; \
                  echo '::progressive 20'; \
                  echo '::progress 90 3/3 writing rows'; \
                  echo done";
    let b = define_and_bind(&node, "acme", sh_def("progress", script, manual())).await;
    let run = trigger(&node, "acme", &b.id).await;
    assert!(run.progress.is_none(), "no progress before it ran");

    let events = tail_all(&node, "acme", &run.id, 0).await;
    assert_dense(&events);
    let got: Vec<String> = story(&events)
        .into_iter()
        .filter(|s| !s.starts_with("state:") || s == "state:RUN_STATE_SUCCEEDED")
        .collect();
    assert_eq!(
        got,
        [
            "log:start",
            "progress:10 1/3 reading input",
            "log:working",
            "progress:40 2/3 ",
            "progress:12.5 0/0 halfway there",
            // Malformed reports stay ordinary log lines.
            "log:::progress 150 2/3 out of range",
            "log:::progress 50 3/2 bad steps",
            "log:::progressive 20",
            "progress:90 3/3 writing rows",
            "log:done",
            "state:RUN_STATE_SUCCEEDED",
        ]
    );

    let ended = get_run(&node, "acme", &run.id).await;
    assert_eq!(state(&ended), pb::RunState::Succeeded);
    assert_eq!(
        ended.progress,
        Some(pb::Progress {
            percent: 90.0,
            current_step: 3,
            total_steps: 3,
            message: "writing rows".into(),
        }),
        "GetRun shows the last progress"
    );

    // ListRunEvents has the same events in the same order.
    let listed = node
        .logs()
        .list_run_events(as_tenant(
            "acme",
            pb::ListRunEventsRequest {
                run_id: run.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(listed, events);

    // A run that reports none has no progress.
    let quiet = define_and_bind(&node, "acme", sh_def("quiet", "echo hi", manual())).await;
    let r = trigger(&node, "acme", &quiet.id).await;
    let r = wait_terminal(&node, "acme", &r.id).await;
    assert_eq!(state(&r), pb::RunState::Succeeded);
    assert_eq!(r.progress, None);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_visible_while_the_run_runs_and_can_be_watched() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let mut watch = node
        .logs()
        .watch_events(as_tenant(
            "acme",
            pb::WatchEventsRequest {
                kinds: vec![pb::EventKind::Progress as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // The run reports, then waits for a file only the test creates.
    let gate = tempfile::tempdir().unwrap();
    let go = gate.path().join("go");
    let script = format!(
        "echo '::progress 25 1/4 step one'; while [ ! -e '{}' ]; do sleep 0.05; done; echo '{{\"rows\":4}}'",
        go.display()
    );
    let b = define_and_bind(&node, "acme", sh_def("watched", &script, manual())).await;
    let run = trigger(&node, "acme", &b.id).await;

    let seen = tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("a progress event is watched")
        .unwrap()
        .expect("stream open")
        .event
        .expect("event");
    assert_eq!(seen.run_id, run.id);
    let Some(pb::run_event::Kind::Progress(p)) = seen.kind else {
        panic!("only progress events are watched: {seen:?}");
    };
    assert_eq!((p.percent, p.current_step, p.total_steps), (25.0, 1, 4));

    let mid = get_run(&node, "acme", &run.id).await;
    assert_eq!(state(&mid), pb::RunState::Running);
    assert_eq!(mid.progress.map(|p| p.message), Some("step one".into()));

    std::fs::write(&go, b"").unwrap();
    let ended = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&ended), pb::RunState::Succeeded);
    // A progress line never takes the result's place.
    let result = ended.result.expect("the last JSON line is the result");
    assert!(result.fields.contains_key("rows"), "{result:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_exit_code_fails_once_and_others_retry() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;

    // Exit 2 is listed: FAILED once, not retried, and it says why.
    let def = with_codes(
        with_retries(sh_def("bad-input", "echo oops >&2; exit 2", manual()), 3),
        vec![2, 64],
    );
    let stored = create_definition(&node, def.clone()).await.unwrap();
    let Some(pb::task_definition::Handler::Command(c)) = &stored.handler else {
        panic!("command handler: {stored:?}");
    };
    assert_eq!(c.non_retryable_exit_codes, [2, 64], "stored as given");
    let b = bind_existing(&node, "acme", "bad-input").await;
    let run = trigger(&node, "acme", &b.id).await;
    let ended = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&ended), pb::RunState::Failed);
    assert_eq!(ended.exit_code, Some(2));
    assert_eq!(ended.reason, "exit code 2 is non-retryable");
    assert_eq!(
        ended.error.as_ref().map(|e| e.message.as_str()),
        Some("exit code 2")
    );
    let events = tail_all(&node, "acme", &run.id, 0).await;
    assert!(
        log_lines(&events)
            .iter()
            .any(|l| l.contains("exit code 2 is non-retryable")),
        "{:?}",
        story(&events)
    );
    // Well past the backoff (100 ms): still the one attempt.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let runs = runs_of(&node, "acme", &b.id).await;
    assert_eq!(runs.len(), 1, "not retried: {runs:?}");

    // Exit 1 is not listed: retried up to max_attempts.
    let def = with_codes(
        with_retries(sh_def("flaky", "exit 1", manual()), 3),
        vec![2],
    );
    let b = define_and_bind(&node, "acme", def).await;
    trigger(&node, "acme", &b.id).await;
    let runs = runs_until(&node, "acme", &b.id, WAIT, "three attempts end", |runs| {
        runs.len() == 3 && runs.iter().all(is_terminal)
    })
    .await;
    assert!(runs.iter().all(|r| state(r) == pb::RunState::Failed));
    assert!(runs.iter().all(|r| r.reason == "exit code 1"), "{runs:?}");
    let mut attempts: Vec<i32> = runs.iter().map(|r| r.attempt).collect();
    attempts.sort();
    assert_eq!(attempts, [1, 2, 3]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_exit_codes_are_bounded() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    for (codes, field) in [
        (vec![2, 0], "definition.command.non_retryable_exit_codes[1]"),
        (vec![256], "definition.command.non_retryable_exit_codes[0]"),
        (vec![-1], "definition.command.non_retryable_exit_codes[0]"),
        (
            (1..=33).collect(),
            "definition.command.non_retryable_exit_codes",
        ),
    ] {
        let def = with_codes(sh_def("bounded", "true", manual()), codes.clone());
        let s = create_definition(&node, def).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{codes:?}: {s:?}");
        assert_eq!(violation_fields(&s), [field], "{codes:?}: {s:?}");
    }
    let def = with_codes(sh_def("bounded", "true", manual()), (224..=255).collect());
    create_definition(&node, def)
        .await
        .expect("32 codes of 1..=255 are accepted");
    node.stop().await;
}

/// The entry point a worker's ReportProgress uses
/// (`db::events::progress_append`), written from outside the node (as
/// another node would): the event reaches TailRun through the NOTIFY
/// bridge, GetRun shows it, and a report for another attempt or after the
/// run ended changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_progress_is_fenced_by_attempt_and_running_state() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "n1").await;
    let pool = db.pool().await;
    let gate = tempfile::tempdir().unwrap();
    let go = gate.path().join("go");
    let script = format!(
        "echo started; while [ ! -e '{}' ]; do sleep 0.05; done; echo finished",
        go.display()
    );
    let b = define_and_bind(&node, "acme", sh_def("reported", &script, manual())).await;
    let run = trigger(&node, "acme", &b.id).await;
    let run_id: uuid::Uuid = run.id.parse().unwrap();
    let mut tail = open_tail(&node, "acme", &run.id, 0, true).await;
    // Wait until it runs (its first line is out).
    let mut seen = Vec::new();
    while !log_lines(&seen).contains(&"started".to_string()) {
        let e = tokio::time::timeout(WAIT, tail.message())
            .await
            .expect("the run starts")
            .unwrap()
            .expect("stream open");
        seen.push(e);
    }

    let report = sked::domain::Progress {
        percent: 60.0,
        current_step: 3,
        total_steps: 5,
        message: "from a worker".into(),
    };
    let mut conn = pool.acquire().await.unwrap();
    let now = chrono::Utc::now();
    let wrong_attempt =
        sked::db::events::progress_append(&mut conn, "other", run_id, 2, &report, now)
            .await
            .unwrap();
    assert_eq!(wrong_attempt, None, "attempt 2 does not hold the run");
    let ev = sked::db::events::progress_append(&mut conn, "other", run_id, 1, &report, now)
        .await
        .unwrap()
        .expect("recorded while RUNNING at attempt 1");
    assert_eq!(ev.seq, seen.last().unwrap().seq + 1, "the next dense seq");

    let live = tokio::time::timeout(WAIT, tail.message())
        .await
        .expect("the reported progress is tailed")
        .unwrap()
        .expect("stream open");
    assert_eq!(live.seq, ev.seq);
    assert_eq!(
        live.kind,
        Some(pb::run_event::Kind::Progress(pb::Progress {
            percent: 60.0,
            current_step: 3,
            total_steps: 5,
            message: "from a worker".into(),
        }))
    );
    let mid = get_run(&node, "acme", &run.id).await;
    assert_eq!(mid.progress.map(|p| p.percent), Some(60.0));

    std::fs::write(&go, b"").unwrap();
    let ended = wait_terminal(&node, "acme", &run.id).await;
    assert_eq!(state(&ended), pb::RunState::Succeeded);
    let late = sked::db::events::progress_append(&mut conn, "other", run_id, 1, &report, now)
        .await
        .unwrap();
    assert_eq!(late, None, "an ended run takes no report");

    // The use case checks the report's bounds and refuses an ended run.
    let core = sked::usecase::Core {
        pool: pool.clone(),
        clock: sked::domain::Clock::system(),
        node_id: "other".into(),
        bus: sked::events::EventBus::new(),
        executor_wake: Default::default(),
        announcer: {
            let (announcer, task) = sked::db::notify::Announcer::new(pool.clone());
            tokio::spawn(task.run());
            announcer
        },
    };
    let over = sked::domain::Progress {
        percent: 101.0,
        ..report.clone()
    };
    match sked::usecase::runs::report_progress(&core, run_id, 1, &over).await {
        Err(sked::usecase::Error::Invalid(v)) => assert_eq!(v.field, "progress.percent"),
        other => panic!("percent 101 is invalid: {other:?}"),
    }
    match sked::usecase::runs::report_progress(&core, run_id, 1, &report).await {
        Err(sked::usecase::Error::Precondition(m)) => assert!(m.contains("not running"), "{m}"),
        other => panic!("an ended run refuses the report: {other:?}"),
    }
    let events = tail_all(&node, "acme", &run.id, 0).await;
    assert_dense(&events);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e.kind, Some(pb::run_event::Kind::Progress(_))))
            .count(),
        1
    );
    node.stop().await;
}
