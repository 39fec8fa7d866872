//! The `sked` client subcommands (issue 16): the real `sked` binary
//! (assert_cmd, `CARGO_BIN_EXE_sked`) against a real node on 127.0.0.1:0.
//! Every subcommand's happy path and one error each; `tail` of succeeding,
//! failing, timed-out and cancelled runs (exit codes, every line in order),
//! resumed after its connection is cut; `-o json` compared with what the
//! API returns; auth by environment, token file and config file; TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use sked::cli::output::to_json;
use sked::cli::{
    EXIT_CANCELLED, EXIT_ERROR, EXIT_FAILED, EXIT_OK, EXIT_TIMED_OUT, EXIT_UNREACHABLE, EXIT_USAGE,
};
use sked::proto::v1 as pb;
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------- harness

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "sked-cli-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the `sked` binary against one node: `SKED_ADDR` set, the caller's
/// `SKED_*` settings removed, an empty config dir of its own.
struct Sked {
    addr: String,
    env: Vec<(String, String)>,
    config_home: TempDir,
}

impl Sked {
    fn new(addr: impl std::fmt::Display) -> Sked {
        Sked {
            addr: format!("http://{addr}"),
            env: Vec::new(),
            config_home: TempDir::new(),
        }
    }

    fn for_node(node: &TestNode) -> Sked {
        Sked::new(node.addr)
    }

    /// The same with an extra environment variable.
    fn env(mut self, k: &str, v: &str) -> Sked {
        self.env.push((k.into(), v.into()));
        self
    }

    fn command(&self, args: &[&str]) -> assert_cmd::Command {
        let mut c = assert_cmd::Command::new(env!("CARGO_BIN_EXE_sked"));
        for k in [
            "SKED_ADDR",
            "SKED_TOKEN",
            "SKED_TOKEN_FILE",
            "SKED_TENANT",
            "SKED_CONFIG",
            "SKED_CA_FILE",
            "SKED_CERT_FILE",
            "SKED_KEY_FILE",
        ] {
            c.env_remove(k);
        }
        if !self.addr.is_empty() {
            c.env("SKED_ADDR", &self.addr);
        }
        c.env("XDG_CONFIG_HOME", self.config_home.path())
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.args(args).timeout(Duration::from_secs(90));
        c
    }

    /// Runs `sked args...` to its end (on a blocking thread: the node runs
    /// in this test's runtime).
    async fn run(&self, args: &[&str]) -> Output {
        let mut c = self.command(args);
        tokio::task::spawn_blocking(move || c.output().expect("run sked"))
            .await
            .unwrap()
    }

    /// [`Sked::run`] with `input` on stdin.
    async fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut c = self.command(args);
        c.write_stdin(input.to_string());
        tokio::task::spawn_blocking(move || c.output().expect("run sked"))
            .await
            .unwrap()
    }

    /// Runs it and asserts exit code 0; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert_eq!(code(&o), EXIT_OK, "sked {args:?}: {}", describe(&o));
        stdout(&o)
    }

    /// Runs it with `-o json`, asserts success; returns the parsed JSON.
    async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("sked {args:?} -o json: {e}: {out}"))
    }

    /// Runs it, asserts it fails with `exit` and prints one line naming
    /// each of `needles` on stderr.
    async fn fails(&self, args: &[&str], exit: i32, needles: &[&str]) -> String {
        let o = self.run(args).await;
        assert_eq!(code(&o), exit, "sked {args:?}: {}", describe(&o));
        let err = stderr(&o);
        let line = err.trim_end();
        assert!(
            !line.contains('\n'),
            "sked {args:?}: one line of error, got {line:?}"
        );
        for n in needles {
            assert!(line.contains(n), "sked {args:?}: {line:?} names {n:?}");
        }
        line.to_string()
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("sked exited (not killed)")
}
fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}
fn lines(s: &str) -> Vec<String> {
    s.lines().map(String::from).collect()
}

/// A command definition made through the API.
async fn api_def(node: &TestNode, def: pb::TaskDefinition) -> pb::Binding {
    define_and_bind(node, "acme", def).await
}

/// A definition with a retry policy.
fn retrying(mut d: pb::TaskDefinition, attempts: i32) -> pb::TaskDefinition {
    d.retry_policy = Some(pb::RetryPolicy {
        max_attempts: attempts,
        initial_backoff: Some(dur(100)),
        ..Default::default()
    });
    d
}

// ---------------------------------------------------------------- definitions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn def_create_list_get_update_delete() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-def").await;
    let sked = Sked::for_node(&node);

    // create from flags: the command after `--`
    let out = sked
        .ok(&[
            "def",
            "create",
            "hello",
            "--every",
            "2s",
            "--description",
            "says hello",
            "--label",
            "team=core",
            "--max-attempts",
            "3",
            "--backoff",
            "1s",
            "--timeout",
            "30s",
            "--overlap",
            "allow",
            "--",
            "sh",
            "-c",
            "echo hello",
        ])
        .await;
    assert_eq!(out, "definition hello created\n");
    let api = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "hello".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::task_definition::Handler::Command(c)) = &api.handler else {
        panic!("a command handler: {api:?}")
    };
    assert_eq!(
        (c.program.as_str(), c.args.clone()),
        ("sh", vec!["-c".into(), "echo hello".into()])
    );
    assert_eq!(api.retry_policy.as_ref().unwrap().max_attempts, 3);
    assert_eq!(api.timeout, Some(dur(30_000)));
    assert_eq!(api.overlap_policy, pb::OverlapPolicy::Allow as i32);
    assert_eq!(api.labels.get("team").map(String::as_str), Some("core"));

    // create from a YAML file on stdin, in the API's field names
    let yaml = "name: nightly\ndisplayName: Nightly report\nevent: {}\nschedule:\n  cron:\n    expression: '0 2 * * *'\n  timezone: Europe/Berlin\n";
    let o = sked
        .run_with_stdin(&["def", "create", "-f", "-"], yaml)
        .await;
    assert_eq!(code(&o), EXIT_OK, "{}", describe(&o));

    // list: a table for people, the API's response as JSON
    let table = sked.ok(&["def", "list"]).await;
    let rows = lines(&table);
    assert!(rows[0].starts_with("NAME"), "{table}");
    assert!(
        rows[1].starts_with("hello") && rows[1].contains("every 2s"),
        "{table}"
    );
    assert!(
        rows[2].starts_with("nightly") && rows[2].contains("cron 0 2 * * * (Europe/Berlin)"),
        "{table}"
    );
    let list = node
        .definitions()
        .list_definitions(pb::ListDefinitionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sked.json(&["def", "list"]).await, to_json(&list));

    // get: the canonical proto3 JSON of the API's message
    let got = sked.json(&["def", "get", "hello"]).await;
    assert_eq!(got, to_json(&api));
    assert_eq!(got["schedule"]["interval"]["every"], "2s");
    assert_eq!(got["retryPolicy"]["maxAttempts"], 3);
    let yaml = sked.ok(&["def", "get", "hello", "-o", "yaml"]).await;
    assert!(
        yaml.contains("name: hello") && yaml.contains("maxAttempts: 3"),
        "{yaml}"
    );
    let view = sked.ok(&["def", "get", "hello"]).await;
    assert!(
        view.contains("Handler:") && view.contains("sh -c 'echo hello'"),
        "{view}"
    );
    assert!(view.contains("3 attempts, backoff 1s"), "{view}");

    // update: only what the flags name changes
    sked.ok(&[
        "def",
        "update",
        "hello",
        "--timeout",
        "10m",
        "--enabled",
        "false",
    ])
    .await;
    let after = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "hello".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.timeout, Some(dur(600_000)));
    assert_eq!(after.enabled, Some(false));
    assert_eq!(after.handler, api.handler, "the handler is untouched");
    assert_eq!(after.retry_policy, api.retry_policy);
    assert_eq!(after.description, "says hello");

    // update from a file: only the fields it names
    let dir = TempDir::new();
    let f = dir.write("patch.yaml", "description: new words\npriority: 7\n");
    sked.ok(&["def", "update", "hello", "-f", f.to_str().unwrap()])
        .await;
    let patched = node
        .definitions()
        .get_definition(pb::GetDefinitionRequest {
            name: "hello".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (patched.description.as_str(), patched.priority),
        ("new words", 7)
    );
    assert_eq!(patched.timeout, after.timeout);

    // a stale etag is ABORTED
    sked.fails(
        &[
            "def",
            "update",
            "hello",
            "--priority",
            "1",
            "--etag",
            &api.etag,
        ],
        EXIT_ERROR,
        &["ABORTED"],
    )
    .await;

    // errors: the status, the field and the reason, in one line
    sked.fails(
        &["def", "create", "bad", "--cron", "0 25 * * *", "--", "true"],
        EXIT_ERROR,
        &[
            "INVALID_ARGUMENT",
            "definition.schedule.cron.expression",
            "field 2 (hour): 25 is out of range 0-23",
        ],
    )
    .await;
    // a file with a typo'd key is refused before anything is sent
    let typo = dir.write(
        "typo.yaml",
        "name: typo\nschedul: {manual: {}}\nevent: {}\n",
    );
    sked.fails(
        &["def", "create", "-f", typo.to_str().unwrap()],
        EXIT_USAGE,
        &["typo.yaml", "schedul"],
    )
    .await;
    sked.fails(
        &["def", "create", "x", "--every", "soon", "--", "true"],
        EXIT_USAGE,
        &["--every"],
    )
    .await;

    // delete, then it is gone
    sked.ok(&["def", "delete", "nightly"]).await;
    sked.fails(
        &["def", "get", "nightly"],
        EXIT_UNREACHABLE,
        &["NOT_FOUND", "nightly"],
    )
    .await;
    node.stop().await;
}

// ---------------------------------------------------------------- bindings

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_create_list_get_update_pause_resume_delete() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-binding").await;
    create_definition(&node, sh_def("report", "echo hi", cron("0 3 * * *", "UTC")))
        .await
        .unwrap();
    let sked = Sked::for_node(&node).env("SKED_TENANT", "acme");

    let created = sked
        .json(&[
            "binding",
            "create",
            "report",
            "--param",
            "region=eu",
            "--param",
            "n=3",
        ])
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["tenantId"], "acme");
    assert_eq!(
        created["params"],
        serde_json::json!({"region": "eu", "n": 3.0})
    );

    let api = |id: String| {
        let mut c = node.bindings();
        async move {
            c.get_binding(as_tenant("acme", pb::GetBindingRequest { binding_id: id }))
                .await
                .unwrap()
                .into_inner()
        }
    };
    // get by id and by definition name: the API's message
    let b = api(id.clone()).await;
    assert_eq!(sked.json(&["binding", "get", &id]).await, to_json(&b));
    assert_eq!(sked.json(&["binding", "get", "report"]).await, to_json(&b));
    let view = sked.ok(&["binding", "get", "report"]).await;
    assert!(view.contains("cron 0 3 * * * (UTC) (definition)"), "{view}");
    assert!(
        view.contains("none (definition)"),
        "no notification rules: {view}"
    );

    let table = sked.ok(&["binding", "list"]).await;
    assert!(table.contains(&id) && table.contains("active"), "{table}");

    // update: a schedule override, then back to the definition's
    sked.ok(&[
        "binding",
        "update",
        "report",
        "--cron",
        "15 4 * * *",
        "--tz",
        "Asia/Tokyo",
    ])
    .await;
    let s = api(id.clone()).await.schedule.unwrap();
    assert_eq!(s.timezone, "Asia/Tokyo");
    assert_eq!(b.params, api(id.clone()).await.params, "params untouched");
    sked.ok(&["binding", "update", "report", "--inherit-schedule"])
        .await;
    assert!(api(id.clone()).await.schedule.is_none());

    // policy overrides: `get` says where each value comes from; --inherit
    // clears them
    sked.ok(&[
        "binding",
        "update",
        "report",
        "--timeout",
        "10s",
        "--priority",
        "5",
        "--max-attempts",
        "3",
        "--max-active-runs",
        "2",
    ])
    .await;
    let o = api(id.clone()).await;
    assert_eq!(o.timeout.unwrap().seconds, 10);
    assert_eq!(o.priority, Some(5));
    assert_eq!(o.retry_policy.unwrap().max_attempts, 3);
    assert_eq!(o.max_active_runs, Some(2));
    let view = sked.ok(&["binding", "get", "report"]).await;
    for want in [
        "10s (binding)",
        "5 (binding)",
        "2 (binding)",
        "(definition)",
    ] {
        assert!(view.contains(want), "{want}: {view}");
    }
    sked.ok(&[
        "binding",
        "update",
        "report",
        "--inherit",
        "timeout",
        "--inherit",
        "priority",
        "--inherit",
        "retry_policy",
        "--inherit",
        "max_active_runs",
    ])
    .await;
    let o = api(id.clone()).await;
    assert!(o.timeout.is_none() && o.priority.is_none());
    assert!(o.retry_policy.is_none() && o.max_active_runs.is_none());
    let overridden = o.effective.unwrap().overridden;
    assert!(
        !overridden.iter().any(
            |f| ["timeout", "priority", "retry_policy", "max_active_runs"].contains(&f.as_str())
        ),
        "{overridden:?}"
    );

    // pause for an hour with a note, then resume
    let out = sked
        .ok(&[
            "binding",
            "pause",
            "report",
            "--note",
            "maintenance",
            "--for",
            "1h",
        ])
        .await;
    assert!(out.contains("paused until"), "{out}");
    let p = api(id.clone()).await;
    assert!(p.paused && p.pause_note == "maintenance");
    let until = secs(&p.pause_expire_time);
    assert!(
        (until - now_secs() - 3600.0).abs() < 120.0,
        "about an hour: {until}"
    );
    assert!(sked.ok(&["binding", "list"]).await.contains("paused"));
    sked.ok(&["binding", "resume", &id]).await;
    assert!(!api(id.clone()).await.paused);

    // errors
    sked.fails(
        &["binding", "create", "nosuch"],
        EXIT_UNREACHABLE,
        &["NOT_FOUND", "nosuch"],
    )
    .await;
    Sked::for_node(&node)
        .fails(
            &["binding", "list"],
            EXIT_ERROR,
            &["INVALID_ARGUMENT", "x-tenant-id", "SKED_TENANT"],
        )
        .await;
    sked.fails(
        &["binding", "pause", "unbound"],
        EXIT_UNREACHABLE,
        &["NOT_FOUND", "unbound"],
    )
    .await;

    sked.ok(&["binding", "delete", "report"]).await;
    sked.fails(&["binding", "get", &id], EXIT_UNREACHABLE, &["NOT_FOUND"])
        .await;
    node.stop().await;
}

// ---------------------------------------------------------------- runs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_trigger_get_list_cancel_retry_backfill() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-run").await;
    let b = api_def(&node, sh_def("job", "echo params: $SKED_PARAMS", manual())).await;
    let sked = Sked::for_node(&node).env("SKED_TENANT", "acme");

    // trigger (by definition name), wait through the API, compare
    let r = sked
        .json(&[
            "run",
            "trigger",
            "job",
            "--param",
            "dry=true",
            "--idempotency-key",
            "k1",
        ])
        .await;
    let run_id = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["bindingId"], b.id.as_str());
    assert_eq!(r["trigger"], "RUN_TRIGGER_MANUAL");
    let ended = wait_terminal(&node, "acme", &run_id).await;
    assert_eq!(state(&ended), pb::RunState::Succeeded);
    assert_eq!(sked.json(&["run", "get", &run_id]).await, to_json(&ended));
    let view = sked.ok(&["run", "get", &run_id]).await;
    assert!(
        view.contains("SUCCEEDED") && view.contains(r#"{"dry":true}"#),
        "{view}"
    );
    // the same idempotency key returns the same run
    let again = sked
        .json(&["run", "trigger", "job", "--idempotency-key", "k1"])
        .await;
    assert_eq!(again["id"], run_id.as_str());

    // list: filter by binding and state; JSON is the API's response
    let table = sked
        .ok(&["run", "list", "--binding", "job", "--state", "succeeded"])
        .await;
    assert!(
        table.contains(&run_id) && table.contains("SUCCEEDED"),
        "{table}"
    );
    let api_list = node
        .runs()
        .list_runs(as_tenant(
            "acme",
            pb::ListRunsRequest {
                binding_id: b.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sked.json(&["run", "list", "--binding", &b.id]).await,
        to_json(&api_list)
    );

    // cancel a delayed run
    let delayed = sked.json(&["run", "trigger", "job", "--at", "+1h"]).await;
    assert_eq!(delayed["state"], "RUN_STATE_SCHEDULED");
    let delayed_id = delayed["id"].as_str().unwrap();
    let out = sked
        .ok(&["run", "cancel", delayed_id, "--reason", "not today"])
        .await;
    assert!(out.contains("CANCELLED"), "{out}");
    let c = get_run(&node, "acme", delayed_id).await;
    assert_eq!(
        (state(&c), c.reason.as_str()),
        (pb::RunState::Cancelled, "not today")
    );
    sked.fails(
        &["run", "cancel", delayed_id],
        EXIT_ERROR,
        &["FAILED_PRECONDITION"],
    )
    .await;

    // retry an ended run, waiting for the new attempt
    let o = sked.run(&["run", "retry", &run_id, "--wait"]).await;
    assert_eq!(code(&o), EXIT_OK, "{}", describe(&o));
    assert_eq!(stdout(&o), "params: {\"dry\":true}\n", "{}", describe(&o));

    // backfill: dry run, then for real
    let every = api_def(&node, sh_def("minutely", "true", every(60))).await;
    let dry = sked
        .json(&[
            "run",
            "backfill",
            &every.id,
            "--from",
            "-10m",
            "--to",
            "now",
            "--dry-run",
        ])
        .await;
    let times = dry["scheduledTimes"].as_array().unwrap().len();
    assert!((9..=10).contains(&times), "{dry}");
    assert!(
        dry.get("runIds").is_none(),
        "dry run creates nothing: {dry}"
    );
    let table = sked
        .ok(&[
            "run", "backfill", "minutely", "--from", "-3m", "--to", "-1m",
        ])
        .await;
    assert!(table.starts_with("2 runs created"), "{table}");

    // errors
    sked.fails(
        &["run", "get", &uuid::Uuid::now_v7().to_string()],
        EXIT_UNREACHABLE,
        &["NOT_FOUND"],
    )
    .await;
    sked.fails(
        &["run", "backfill", "minutely", "--from", "+1h"],
        EXIT_ERROR,
        &["INVALID_ARGUMENT"],
    )
    .await;
    node.stop().await;
}

// ---------------------------------------------------------------- tail

/// 200 stdout lines, with stderr lines among them, then `exit $1`.
const CHATTY: &str = "for i in $(seq 1 200); do echo out $i; if [ $((i % 50)) -eq 0 ]; then echo err $i >&2; fi; done; exit ${1:-0}";

fn expected_out() -> Vec<String> {
    (1..=200).map(|i| format!("out {i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_exits_with_the_outcome_and_prints_every_line_in_order() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-tail").await;
    let ok = api_def(&node, sh_def("chatty-ok", CHATTY, manual())).await;
    let bad = api_def(
        &node,
        command_def("chatty-bad", "sh", &["-c", CHATTY, "sh", "3"], manual()),
    )
    .await;
    let sked = Sked::for_node(&node).env("SKED_TENANT", "acme");

    // Tailing from the start while the run goes on.
    let run = trigger(&node, "acme", &ok.id).await;
    let o = sked.run(&["tail", &run.id]).await;
    assert_eq!(code(&o), EXIT_OK, "{}", describe(&o));
    assert_eq!(lines(&stdout(&o)), expected_out());
    let err = stderr(&o);
    let err_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("err ")).collect();
    assert_eq!(err_lines, ["err 50", "err 100", "err 150", "err 200"]);
    assert!(
        err.contains("[sked] RUNNING") && err.contains("[sked] SUCCEEDED"),
        "{err}"
    );

    // A failing run: every line, then exit code 3.
    let run = trigger(&node, "acme", &bad.id).await;
    let o = sked.run(&["tail", &run.id]).await;
    assert_eq!(code(&o), EXIT_FAILED, "{}", describe(&o));
    assert_eq!(lines(&stdout(&o)), expected_out());
    assert!(
        stderr(&o).contains("[sked] FAILED: exit code 3"),
        "{}",
        describe(&o)
    );

    // -o json: one RunEvent per line, exactly the API's events.
    let o = sked.run(&["tail", &run.id, "-o", "json"]).await;
    assert_eq!(code(&o), EXIT_FAILED, "{}", describe(&o));
    let printed: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let api = node
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
        .into_inner();
    assert_eq!(printed, api.events.iter().map(to_json).collect::<Vec<_>>());

    // --no-follow of a stored run, from a seq on; --latest by definition.
    let o = sked
        .run(&["tail", &run.id, "--no-follow", "--after-seq", "100", "-q"])
        .await;
    assert_eq!(code(&o), EXIT_FAILED, "{}", describe(&o));
    assert!(!stdout(&o).contains("out 1\n") && stdout(&o).contains("out 200"));
    let o = sked.run(&["tail", "--latest", "chatty-bad", "-q"]).await;
    assert_eq!(code(&o), EXIT_FAILED, "{}", describe(&o));
    assert_eq!(lines(&stdout(&o)), expected_out());

    // errors: an unknown run, an unreachable node
    sked.fails(
        &["tail", &uuid::Uuid::now_v7().to_string()],
        EXIT_UNREACHABLE,
        &["NOT_FOUND"],
    )
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    Sked::new(port)
        .fails(
            &["tail", &run.id],
            EXIT_UNREACHABLE,
            &["UNAVAILABLE", "could not reach sked"],
        )
        .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_exit_codes_for_timed_out_and_cancelled_runs() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-tail-codes").await;
    let mut slow = sh_def("slow", "echo started; sleep 30", manual());
    slow.timeout = Some(dur(1000));
    let slow = api_def(&node, slow).await;
    let sleepy = api_def(&node, sh_def("sleepy", "echo started; sleep 30", manual())).await;
    let sked = Sked::for_node(&node).env("SKED_TENANT", "acme");

    let run = trigger(&node, "acme", &slow.id).await;
    let o = sked.run(&["tail", &run.id]).await;
    assert_eq!(code(&o), EXIT_TIMED_OUT, "{}", describe(&o));
    assert_eq!(stdout(&o), "started\n");

    let run = trigger(&node, "acme", &sleepy.id).await;
    let tail = {
        let mut c = sked.command(&["tail", &run.id]);
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    // Cancel once it runs (its first line is stored).
    tokio::time::timeout(WAIT, async {
        while !log_lines(&tail_no_follow(&node, &run.id).await).contains(&"started".to_string()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the run starts");
    sked.ok(&["run", "cancel", &run.id, "--reason", "enough"])
        .await;
    let o = tail.await.unwrap();
    assert_eq!(code(&o), EXIT_CANCELLED, "{}", describe(&o));
    assert!(stderr(&o).contains("CANCELLED: enough"), "{}", describe(&o));
    node.stop().await;
}

async fn tail_no_follow(node: &TestNode, run_id: &str) -> Vec<pb::RunEvent> {
    drain(open_tail(node, "acme", run_id, 0, false).await).await
}

/// A TCP forwarder to `target` whose live connections can be cut.
struct Proxy {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (a, c) = (accepted.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        Proxy {
            addr,
            accepted,
            conns,
        }
    }

    /// Drops every live connection (both sides see it close).
    fn cut(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_resumes_after_the_connection_drops() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-resume").await;
    let b = api_def(
        &node,
        sh_def(
            "slow-lines",
            "for i in $(seq 1 60); do echo line $i; sleep 0.05; done",
            manual(),
        ),
    )
    .await;
    let proxy = Proxy::start(node.addr).await;
    let sked = Sked::new(proxy.addr).env("SKED_TENANT", "acme");
    let run = trigger(&node, "acme", &b.id).await;
    let tail = {
        let mut c = sked.command(&["tail", &run.id, "--reconnect-for", "30s"]);
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    // Once the run is a few lines in, cut the tail's connection.
    tokio::time::timeout(WAIT, async {
        while !log_lines(&tail_no_follow(&node, &run.id).await).contains(&"line 10".to_string()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the run prints");
    assert!(
        proxy.accepted.load(Ordering::SeqCst) >= 1,
        "the tail connected"
    );
    proxy.cut();
    let at_cut = get_run(&node, "acme", &run.id).await;
    assert!(!is_terminal(&at_cut), "cut while the run was going on");

    let o = tail.await.unwrap();
    assert_eq!(code(&o), EXIT_OK, "{}", describe(&o));
    let want: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    assert_eq!(lines(&stdout(&o)), want, "every line once, in order");
    assert!(
        proxy.accepted.load(Ordering::SeqCst) >= 2,
        "the tail reconnected"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_wait_follows_retries_to_the_final_attempt() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-wait").await;
    api_def(
        &node,
        retrying(
            sh_def(
                "flaky",
                "echo try $SKED_ATTEMPT; [ $SKED_ATTEMPT -ge 3 ] || { echo no >&2; exit 4; }",
                manual(),
            ),
            3,
        ),
    )
    .await;
    api_def(
        &node,
        retrying(
            sh_def("doomed", "echo try $SKED_ATTEMPT; exit 4", manual()),
            2,
        ),
    )
    .await;
    let sked = Sked::for_node(&node).env("SKED_TENANT", "acme");

    let o = sked.run(&["run", "trigger", "flaky", "--wait"]).await;
    assert_eq!(code(&o), EXIT_OK, "{}", describe(&o));
    assert_eq!(lines(&stdout(&o)), ["try 1", "try 2", "try 3"]);
    let err = stderr(&o);
    assert!(
        err.contains("retry: attempt 2/3") && err.contains("retry: attempt 3/3"),
        "{err}"
    );

    let o = sked
        .run(&["run", "trigger", "doomed", "--wait", "-q"])
        .await;
    assert_eq!(code(&o), EXIT_FAILED, "{}", describe(&o));
    assert_eq!(lines(&stdout(&o)), ["try 1", "try 2"]);

    sked.fails(
        &["run", "trigger", "nosuch", "--wait"],
        EXIT_UNREACHABLE,
        &["NOT_FOUND", "nosuch"],
    )
    .await;
    node.stop().await;
}

// ---------------------------------------------------------------- watch, preview, completions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_live_events() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-watch").await;
    let b = api_def(&node, sh_def("beacon", "echo beep", manual())).await;
    let sked = Sked::for_node(&node).env("SKED_TENANT", "acme");

    let watch = {
        let mut c = sked.command(&[
            "watch",
            "--definition",
            "beacon",
            "--kind",
            "log",
            "--count",
            "1",
            "--json",
        ]);
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    // The watch sees events from when it subscribed: trigger until it has
    // one (bounded).
    let o = tokio::time::timeout(WAIT, async {
        loop {
            trigger(&node, "acme", &b.id).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if watch.is_finished() {
                return watch.await.unwrap();
            }
        }
    })
    .await
    .expect("the watch sees a log line");
    assert_eq!(code(&o), EXIT_OK, "{}", describe(&o));
    let item: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(item["event"]["log"]["message"], "beep");
    assert_eq!(item["event"]["definition"], "beacon");

    Sked::for_node(&node)
        .fails(&["watch"], EXIT_ERROR, &["x-tenant-id"])
        .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_marks_dst_shifts_and_completions_and_help_work() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-preview").await;
    let sked = Sked::for_node(&node);
    let args = [
        "preview",
        "30 2 * * *",
        "--tz",
        "America/New_York",
        "--count",
        "3",
        "--after",
        "2025-03-08T05:00:00Z",
    ];
    let table = sked.ok(&args).await;
    let rows = lines(&table);
    assert!(
        rows[2].starts_with("1  2025-03-08 02:30:00 -05:00"),
        "{table}"
    );
    assert!(
        rows[3].contains("2025-03-09 03:00:00 -04:00") && rows[3].contains("DST gap"),
        "{table}"
    );
    let api = node
        .definitions()
        .preview_schedule(pb::PreviewScheduleRequest {
            schedule: Some(cron("30 2 * * *", "America/New_York")),
            count: 3,
            after: Some(prost_types::Timestamp {
                seconds: 1_741_410_000,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sked.json(&args).await, to_json(&api));
    sked.fails(
        &["preview", "@daily", "--tz", "Mars/Olympus"],
        EXIT_ERROR,
        &["INVALID_ARGUMENT", "schedule.timezone"],
    )
    .await;
    sked.fails(&["preview"], EXIT_USAGE, &["give a schedule"])
        .await;

    let bash = sked.ok(&["completions", "bash"]).await;
    assert!(
        bash.contains("_sked()") && bash.contains("binding"),
        "bash completion"
    );
    let o = sked.run(&["completions", "tcsh-9000"]).await;
    assert_eq!(code(&o), EXIT_USAGE);
    let help = sked.ok(&["tail", "--help"]).await;
    assert!(
        help.contains("Exit codes") && help.contains("--reconnect-for"),
        "{help}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_nodes_and_the_leader() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-status").await;
    // The node's heartbeat row and the leader's lease, as the API has them.
    let api = tokio::time::timeout(WAIT, async {
        loop {
            let s = node
                .admin()
                .get_scheduler_status(pb::GetSchedulerStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if !s.nodes.is_empty() && !s.leader_node_id.is_empty() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the node shows up and leads");
    let sked = Sked::for_node(&node);
    let json = sked.json(&["status"]).await;
    assert_eq!(json["nodeId"], "cli-status");
    assert_eq!(json["leaderNodeId"], api.leader_node_id.as_str());
    assert_eq!(json["leaderTerm"], to_json(&api)["leaderTerm"]);
    let nodes: Vec<&str> = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nodeId"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["cli-status"]);
    let view = sked.ok(&["status"]).await;
    assert!(
        view.contains("Leader:") && view.contains("cli-status (term"),
        "{view}"
    );
    assert!(
        view.lines()
            .any(|l| l.starts_with("cli-status") && l.contains("leader")),
        "{view}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_counts_percentiles_and_the_series() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "cli-stats").await;
    let ok = api_def(&node, sh_def("fine", "sleep 0.05", manual())).await;
    let bad = api_def(&node, sh_def("broken", "exit 1", manual())).await;
    for (b, n) in [(&ok, 3), (&bad, 1)] {
        for _ in 0..n {
            let r = trigger(&node, "acme", &b.id).await;
            wait_terminal(&node, "acme", &r.id).await;
        }
    }
    let sked = Sked::for_node(&node).env("SKED_TENANT", "acme");

    // -o json is the API's answer for the same window
    let (from, to) = (now_secs() - 3600.0, now_secs() + 3600.0);
    let rfc = |t: f64| {
        chrono::DateTime::from_timestamp(t as i64, 0)
            .unwrap()
            .to_rfc3339()
    };
    let (from_s, to_s) = (rfc(from), rfc(to));
    let api = node
        .runs()
        .get_run_stats(as_tenant(
            "acme",
            pb::GetRunStatsRequest {
                start_time: Some(ts(from.trunc())),
                end_time: Some(ts(to.trunc())),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(api.total, 4);
    let json = sked
        .json(&["stats", "--from", &from_s, "--to", &to_s])
        .await;
    assert_eq!(json, to_json(&api));
    assert_eq!(json["counts"]["succeeded"], "3");
    assert_eq!(json["counts"]["failed"], "1");
    assert_eq!(json["interval"], "STATS_INTERVAL_HOUR");
    assert_eq!(json["series"].as_array().unwrap().len(), 3, "3 whole hours");

    // one binding, a day series by default for 7 days; YAML parses too
    let one = sked
        .json(&["stats", "--binding", &ok.id, "--since", "7d"])
        .await;
    assert_eq!(one["counts"]["succeeded"], "3");
    assert_eq!(one["total"], "3");
    assert_eq!(one["interval"], "STATS_INTERVAL_DAY");
    assert!(
        one["durationP50"]
            .as_str()
            .is_some_and(|d| d.ends_with('s'))
    );
    let yaml = sked
        .ok(&["stats", "--binding", &bad.id, "--since", "2h", "-o", "yaml"])
        .await;
    let yaml: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(yaml["counts"]["failed"], "1");

    // the table: counts, success rate, percentiles, one row per hour
    let view = sked
        .ok(&["stats", "--since", "3h", "--interval", "hour"])
        .await;
    assert!(
        view.contains("4 ended: 3 succeeded, 1 failed") && view.contains("75.0 %"),
        "{view}"
    );
    assert!(view.contains("Duration:") && view.contains("p95"), "{view}");
    assert!(view.contains("Fire lag:") && view.contains("p99"), "{view}");
    let rows = view
        .lines()
        .skip_while(|l| !l.starts_with("HOUR"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    assert!((3..=4).contains(&rows), "an hour a row: {view}");
    let per_day = sked.ok(&["stats", "--since", "7d"]).await;
    assert!(per_day.contains("DAY (UTC)"), "{per_day}");

    // errors: a window too long (sked says so, naming the field), flags
    // that contradict each other (nothing sent), a binding not there
    sked.fails(
        &["stats", "--since", "500d"],
        EXIT_ERROR,
        &["INVALID_ARGUMENT", "end_time", "400 days"],
    )
    .await;
    let o = sked
        .run(&["stats", "--binding", &ok.id, "--definition", "fine"])
        .await;
    assert_eq!(code(&o), EXIT_USAGE, "{}", describe(&o));
    assert!(
        stderr(&o).contains("cannot be used with"),
        "{}",
        describe(&o)
    );
    sked.fails(&["stats", "--since", "soon"], EXIT_USAGE, &["--since"])
        .await;
    sked.fails(
        &["stats", "--binding", &uuid::Uuid::new_v4().to_string()],
        EXIT_UNREACHABLE,
        &["NOT_FOUND"],
    )
    .await;
    node.stop().await;
}

// ---------------------------------------------------------------- auth: quota, key, audit, config

/// A node with auth on and a platform admin token.
async fn secured(db: &TestDb) -> (TestNode, String) {
    let root = sked::app::bootstrap_key(&db.url, "root")
        .await
        .expect("bootstrap key");
    let mut s = settings(db, "cli-secure");
    s.auth = true;
    (TestNode::start_with(s).await, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_key_audit_and_config_file_with_auth_on() {
    let db = TestDb::new().await;
    let (node, root) = secured(&db).await;
    let dir = TempDir::new();
    let admin = Sked::for_node(&node).env("SKED_TOKEN", &root);

    // no key: UNAUTHENTICATED, with the hint
    Sked::for_node(&node)
        .fails(
            &["def", "list"],
            EXIT_ERROR,
            &["UNAUTHENTICATED", "SKED_TOKEN"],
        )
        .await;

    // quota: set changes only what it names
    admin
        .ok(&[
            "quota",
            "set",
            "acme",
            "--max-bindings",
            "5",
            "--max-concurrent-runs",
            "2",
        ])
        .await;
    let q = admin
        .json(&["quota", "set", "acme", "--max-runs-per-hour", "100"])
        .await;
    assert_eq!(
        q,
        serde_json::json!({"tenantId": "acme", "maxConcurrentRuns": 2, "maxRunsPerHour": 100, "maxBindings": 5})
    );
    admin
        .ok(&["quota", "set", "acme", "--max-concurrent-runs", "unlimited"])
        .await;
    let view = admin.ok(&["quota", "get", "acme"]).await;
    assert!(
        view.contains("Max concurrent runs:  unlimited")
            && view.contains("Max bindings:         5"),
        "{view}"
    );
    let usage = admin.json(&["quota", "usage", "acme"]).await;
    let api = node
        .admin()
        .get_quota_usage(with_key(
            &root,
            pb::GetQuotaUsageRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage, to_json(&api));
    assert!(
        admin
            .ok(&["quota", "usage", "acme"])
            .await
            .contains("Health:")
    );
    admin
        .fails(
            &["quota", "set", "acme", "--max-bindings", "0"],
            EXIT_ERROR,
            &["INVALID_ARGUMENT", "max_bindings"],
        )
        .await;

    // keys: the token alone on stdout, usable from a file
    admin
        .ok(&["def", "create", "hello", "--manual", "--", "echo", "hi"])
        .await;
    let token = admin
        .ok(&[
            "key",
            "create",
            "acme ci",
            "--role",
            "operator",
            "--for-tenant",
            "acme",
        ])
        .await;
    let token = token.trim();
    assert!(token.starts_with("sked_"), "{token}");
    let token_file = dir.write("acme.token", &format!("{token}\n"));
    let acme = Sked::for_node(&node).env("SKED_TOKEN_FILE", token_file.to_str().unwrap());
    acme.ok(&["binding", "create", "hello"]).await;
    let o = acme.run(&["run", "trigger", "hello", "--wait", "-q"]).await;
    assert_eq!(
        (code(&o), stdout(&o)),
        (EXIT_OK, "hi\n".to_string()),
        "{}",
        describe(&o)
    );
    acme.fails(
        &["key", "create", "more", "--role", "admin"],
        EXIT_ERROR,
        &["PERMISSION_DENIED"],
    )
    .await;
    acme.fails(&["status"], EXIT_ERROR, &["PERMISSION_DENIED"])
        .await;
    assert!(admin.ok(&["status"]).await.contains("Leader:"));
    let keys = admin.json(&["key", "list", "--for-tenant", "acme"]).await;
    let key = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "acme ci")
        .expect("the key is listed")
        .clone();
    assert_eq!(key["role"], "ROLE_OPERATOR");
    assert!(admin.ok(&["key", "list"]).await.contains("acme ci"));

    // a config file: addr and token file, under XDG_CONFIG_HOME
    let mut from_config = Sked::for_node(&node);
    from_config.addr.clear();
    from_config.config_home.write(
        "sked/config.yaml",
        &format!(
            "addr: http://{}\ntoken_file: {}\n",
            node.addr,
            token_file.display()
        ),
    );
    let listed = from_config.json(&["binding", "list"]).await;
    assert_eq!(listed["bindings"][0]["definition"], "hello");
    // flags and environment win over it
    from_config
        .fails(
            &["binding", "list", "--addr", "127.0.0.1:1"],
            EXIT_UNREACHABLE,
            &["UNAVAILABLE"],
        )
        .await;
    let bad = Sked::for_node(&node);
    bad.config_home
        .write("sked/config.yaml", "addr: http://127.0.0.1:1\ntokn: x\n");
    bad.fails(&["def", "list"], EXIT_USAGE, &["config.yaml", "tokn"])
        .await;

    // revoke: the key stops working
    admin
        .ok(&["key", "revoke", key["id"].as_str().unwrap()])
        .await;
    acme.fails(&["binding", "list"], EXIT_ERROR, &["UNAUTHENTICATED"])
        .await;

    // the audit log of all that
    let audit = admin.ok(&["audit", "list", "--for-tenant", "acme"]).await;
    assert!(
        audit.contains("SetTenantQuota") && audit.contains("CreateBinding"),
        "{audit}"
    );
    let events = admin
        .json(&["audit", "list", "--method", "RevokeApiKey"])
        .await;
    assert_eq!(events["events"].as_array().unwrap().len(), 1, "{events}");
    admin
        .fails(
            &["audit", "list", "--since", "last tuesday"],
            EXIT_USAGE,
            &["--since"],
        )
        .await;
    node.stop().await;
}

// ---------------------------------------------------------------- TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_addresses_speak_tls_with_a_ca_file_and_client_certificate() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "cli test ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = |san: &str, usage| {
        let mut p = CertificateParams::new(vec![san.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, san);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("cli.example", ExtendedKeyUsagePurpose::ClientAuth);
    let dir = TempDir::new();
    let ca_file = dir.write("ca.pem", &ca.pem());
    let cert_file = dir.write("client.pem", &client_cert);
    let key_file = dir.write("client.key", &client_key);

    let db = TestDb::new().await;
    let mut s = settings(&db, "cli-tls");
    s.tls = Some(sked::transport::TlsSettings {
        cert_pem: server_cert.into_bytes(),
        key_pem: server_key.into_bytes(),
        client_ca_pem: Some(ca.pem().into_bytes()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(sked::app::serve(
        s,
        listener,
        stop.clone().cancelled_owned(),
    ));

    let sked = Sked {
        addr: format!("https://{addr}"),
        env: Vec::new(),
        config_home: TempDir::new(),
    };
    let out = sked
        .ok(&[
            "def",
            "list",
            "--ca-file",
            ca_file.to_str().unwrap(),
            "--cert-file",
            cert_file.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
        ])
        .await;
    assert_eq!(out, "No definitions.\n");
    // without the client certificate the server refuses the handshake
    let o = sked
        .run(&["def", "list", "--ca-file", ca_file.to_str().unwrap()])
        .await;
    assert_ne!(code(&o), EXIT_OK, "{}", describe(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", describe(&o));
    // TLS files with a plaintext address are a usage error
    Sked::new(addr)
        .fails(
            &["def", "list", "--ca-file", ca_file.to_str().unwrap()],
            EXIT_USAGE,
            &["https://"],
        )
        .await;
    stop.cancel();
    tokio::time::timeout(WAIT, handle)
        .await
        .expect("node stops")
        .unwrap()
        .unwrap();
}

/// `sked serve --node-id` refuses an id that could split the node's event
/// announcements (`<node>|…`), before it opens anything, naming the flag
/// and the rule.
#[test]
fn serve_refuses_a_node_id_outside_its_rule() {
    for bad in ["a|b", "a,b", &"n".repeat(129)] {
        let o = assert_cmd::Command::new(env!("CARGO_BIN_EXE_sked"))
            .args([
                "serve",
                "--node-id",
                bad,
                "--database-url",
                "postgres://127.0.0.1:1/none",
            ])
            .env_remove("SKED_NODE_ID")
            .timeout(Duration::from_secs(20))
            .output()
            .expect("sked serve");
        assert_eq!(code(&o), 2, "{bad:?}: {}", describe(&o));
        let err = stderr(&o);
        assert!(
            err.contains("--node-id") && err.contains("1-128 characters of [A-Za-z0-9._:-]"),
            "{bad:?}: {err}"
        );
    }
}
