//! `examples/python_worker.py` against a real node: stubs generated from
//! `proto/` with grpcio-tools, the example run as a child process, one run
//! completed through it. `.ci/run` prepares a venv and passes its
//! interpreter in `SKED_PYTHON`; without it the test says so and passes,
//! except under `CI=true`, where a missing interpreter is a failure.

use std::path::Path;
use std::time::Duration;

use sked::proto::v1 as pb;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_example_completes_a_run() {
    let Some(python) = std::env::var_os("SKED_PYTHON") else {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true but SKED_PYTHON is not set: .ci/run must pass the venv's interpreter"
        );
        eprintln!(
            "skipped: set SKED_PYTHON to a Python with grpcio and grpcio-tools (.ci/run does)"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = tempfile::tempdir().expect("temp dir");
    // protoc wants the files relative to the include path.
    let protos: Vec<String> = std::fs::read_dir(root.join("proto/sked/v1"))
        .expect("proto dir")
        .map(|e| {
            let name = e.expect("entry").file_name();
            format!("proto/sked/v1/{}", name.to_string_lossy())
        })
        .collect();
    let out = stubs.path().to_str().expect("utf-8 path");
    let status = tokio::process::Command::new(&python)
        .current_dir(root)
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={out}"))
        .arg(format!("--grpc_python_out={out}"))
        .args(&protos)
        .status()
        .await
        .expect("run grpc_tools.protoc");
    assert!(status.success(), "stub generation failed: {status}");

    let db = TestDb::new().await;
    let node = TestNode::start(&db, "py-node").await;
    let def = pb::TaskDefinition {
        name: "py-greet".into(),
        handler: Some(pb::task_definition::Handler::Worker(pb::WorkerHandler {
            queue: "python".into(),
            ..Default::default()
        })),
        schedule: Some(manual()),
        ..Default::default()
    };
    let binding = define_and_bind(&node, "acme", def).await;
    let mut child = tokio::process::Command::new(&python)
        .arg(root.join("examples/python_worker.py"))
        .arg("python")
        .env("SKED_ADDR", node.addr.to_string())
        .env("SKED_TENANT", "acme")
        .env("SKED_MAX_RUNS", "1")
        .env("PYTHONPATH", out)
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker");
    let run = trigger(&node, "acme", &binding.id).await;
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        wait_terminal(&node, "acme", &run.id),
    )
    .await
    .expect("the Python worker finishes the run within 60 s");
    assert_eq!(state(&run), pb::RunState::Succeeded, "{run:?}");
    let result = run.result.expect("a result");
    assert_eq!(
        result.fields.get("greeting").and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        }),
        Some("hello world"),
        "{result:?}"
    );
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the worker exits after SKED_MAX_RUNS")
        .expect("wait");
    assert!(exit.success(), "python worker exited {exit}");
    node.stop().await;
}
