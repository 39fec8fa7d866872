//! The one-command node: `sked serve` with no DATABASE_URL starts a private
//! PostgreSQL, serves, and shuts down cleanly on SIGTERM.

use std::time::Duration;

use crate::common::*;
use sked::proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sked_serve_runs_a_working_node_on_an_embedded_database_and_stops_on_sigterm() {
    let dir =
        std::env::temp_dir().join(format!("sked-serve-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut child, channel) = spawn_sked(
        &["--data-dir".as_ref(), dir.as_os_str()],
        &[("SKED_SHUTDOWN_GRACE", "5")],
    )
    .await;

    // The README walkthrough, in code.
    DefinitionServiceClient::new(channel.clone())
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(sh_def("hello", "echo hello from $SKED_TENANT_ID", every(1))),
        })
        .await
        .unwrap();
    let mut watch = LogServiceClient::new(channel.clone())
        .watch_events(as_tenant(
            "acme",
            pb::WatchEventsRequest {
                kinds: vec![pb::EventKind::Log as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    BindingServiceClient::new(channel.clone())
        .create_binding(as_tenant(
            "acme",
            pb::CreateBindingRequest {
                binding: Some(pb::Binding {
                    definition: "hello".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap();
    let line = tokio::time::timeout(WAIT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match line.event.unwrap().kind {
        Some(pb::run_event::Kind::Log(l)) => assert_eq!(l.message, "hello from acme"),
        other => panic!("{other:?}"),
    }
    drop(watch);

    // SIGTERM: clean exit, embedded PostgreSQL stopped.
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit");
    assert!(
        !dir.join("pg/pgdata/postmaster.pid").exists(),
        "embedded PostgreSQL was stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
