//! `sked apply` (issue 16, definitions as code): the real `sked` binary
//! against a real node. The example file creates everything, a second apply
//! changes nothing, a changed file changes exactly the changed fields,
//! `--dry-run` changes nothing, a typo'd key fails naming its line, and
//! `--prune` deletes what apply created and the file dropped, nothing else.

use std::process::Output;
use std::time::Duration;

use crate::common::*;
use sked::cli::{EXIT_OK, EXIT_USAGE};
use sked::proto::v1 as pb;

fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/definitions.yaml"
    ))
    .unwrap()
}

/// Runs `sked apply -f FILE args...` with `text` as FILE.
async fn apply(node: &TestNode, text: &str, args: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(format!("sked-apply-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("defs.yaml");
    std::fs::write(&path, text).unwrap();
    let mut c = assert_cmd::Command::new(env!("CARGO_BIN_EXE_sked"));
    for k in [
        "SKED_TOKEN",
        "SKED_TOKEN_FILE",
        "SKED_TENANT",
        "SKED_CONFIG",
    ] {
        c.env_remove(k);
    }
    c.env("SKED_ADDR", format!("http://{}", node.addr))
        .env("XDG_CONFIG_HOME", &dir)
        .env("NO_COLOR", "1")
        .arg("apply")
        .arg("-f")
        .arg(&path)
        .args(args)
        .timeout(Duration::from_secs(60));
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

async fn ok(node: &TestNode, file: &str, args: &[&str]) -> String {
    let (code, out, err) = text(&apply(node, file, args).await);
    assert_eq!(code, EXIT_OK, "apply {args:?}: {out}\n{err}");
    out
}

async fn def(node: &TestNode, name: &str) -> Option<pb::TaskDefinition> {
    node.definitions()
        .get_definition(pb::GetDefinitionRequest { name: name.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

async fn bindings(node: &TestNode, tenant: &str) -> Vec<pb::Binding> {
    let mut v = node
        .bindings()
        .list_bindings(as_tenant(
            tenant,
            pb::ListBindingsRequest {
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .bindings;
    v.sort_by(|a, b| a.definition.cmp(&b.definition));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_updates_exactly_and_is_idempotent() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "apply-1").await;
    let file = example();

    // a dry run against an empty node changes nothing
    let out = ok(&node, &file, &["--dry-run"]).await;
    assert!(out.contains("definition hello: created"), "{out}");
    assert!(out.contains("dry run: 5 created"), "{out}");
    assert!(def(&node, "hello").await.is_none());

    let out = ok(&node, &file, &[]).await;
    assert!(
        out.contains("5 created, 0 updated, 0 unchanged, 0 deleted"),
        "{out}"
    );
    let hello = def(&node, "hello").await.unwrap();
    assert_eq!(hello.labels["team"], "core");
    assert_eq!(hello.labels["sked.apply/managed"], "true");
    assert_eq!(hello.timeout.as_ref().unwrap().seconds, 30);
    let nightly = def(&node, "nightly-report").await.unwrap();
    assert!(nightly.deletion_protection);
    // protected in the file: DeleteDefinition refuses it; hello is not
    let refused = node
        .definitions()
        .delete_definition(pb::DeleteDefinitionRequest {
            name: "nightly-report".into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(!hello.deletion_protection);
    assert_eq!(nightly.retry_policy.as_ref().unwrap().max_attempts, 3);
    let acme = bindings(&node, "acme").await;
    assert_eq!(acme.len(), 2);
    assert_eq!(bindings(&node, "globex").await.len(), 1);

    // a second apply reports no changes and changes nothing
    let out = ok(&node, &file, &[]).await;
    assert!(
        out.contains("0 created, 0 updated, 5 unchanged, 0 deleted (no changes)"),
        "{out}"
    );
    assert_eq!(def(&node, "hello").await.unwrap().etag, hello.etag);
    assert_eq!(bindings(&node, "acme").await[0].etag, acme[0].etag);

    // a changed file changes exactly the changed fields
    let changed = file
        .replace("timeout: 30s", "timeout: 45s")
        .replace("params: {greeting: hi}", "params: {greeting: hey}");
    assert_ne!(changed, file);
    let out = ok(&node, &changed, &["--dry-run"]).await;
    assert!(out.contains("definition hello: updated (timeout)"), "{out}");
    assert_eq!(
        def(&node, "hello").await.unwrap().etag,
        hello.etag,
        "dry run changed nothing"
    );
    let out = ok(&node, &changed, &[]).await;
    assert!(out.contains("definition hello: updated (timeout)"), "{out}");
    assert!(
        out.contains("binding acme/hello: updated (params)"),
        "{out}"
    );
    assert!(
        out.contains("definition nightly-report: unchanged"),
        "{out}"
    );
    assert!(out.contains("2 updated, 3 unchanged"), "{out}");
    let hello2 = def(&node, "hello").await.unwrap();
    assert_eq!(hello2.timeout.as_ref().unwrap().seconds, 45);
    assert_eq!(hello2.description, hello.description);
    assert_eq!(hello2.schedule, hello.schedule);
    assert_ne!(hello2.etag, hello.etag);
    assert_eq!(
        def(&node, "nightly-report").await.unwrap().etag,
        nightly.etag
    );
    let out = ok(&node, &changed, &[]).await;
    assert!(out.contains("(no changes)"), "{out}");

    // a typo'd key fails naming the file, its line and the key; nothing sent
    let typo = changed.replace("    timeout: 45s", "    timeuot: 45s");
    let line = typo.lines().position(|l| l.contains("timeuot")).unwrap() + 1;
    let (code, _, err) = text(&apply(&node, &typo, &[]).await);
    assert_eq!(code, EXIT_USAGE, "{err}");
    assert!(err.contains(&format!("defs.yaml:{line}:")), "{err}");
    assert!(err.contains("timeuot"), "{err}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_only_what_apply_made_and_the_file_dropped() {
    let db = TestDb::new().await;
    let node = TestNode::start(&db, "apply-2").await;
    // made by hand: prune leaves it and its binding alone
    define_and_bind(&node, "acme", sh_def("handmade", "true", manual())).await;
    let with_extra = format!(
        "{}  initech:\n    - definition: extra\n",
        example().replace(
            "definitions:\n",
            "definitions:\n  - name: extra\n    command: {program: 'true'}\n    schedule: {manual: {}}\n"
        )
    );
    let out = ok(&node, &with_extra, &[]).await;
    assert!(out.contains("7 created"), "{out}");
    assert_eq!(bindings(&node, "initech").await.len(), 1);

    // without --prune, dropping things deletes nothing
    let dropped = example().replace("  globex:\n    - definition: hello\n", "");
    let out = ok(&node, &dropped, &[]).await;
    assert!(out.contains("0 deleted"), "{out}");
    assert!(def(&node, "extra").await.is_some());

    let out = ok(&node, &dropped, &["--prune", "--dry-run"]).await;
    assert!(out.contains("definition extra: deleted"), "{out}");
    assert!(def(&node, "extra").await.is_some());

    // globex is no longer listed under bindings: its binding stays (apply
    // prunes bindings only in tenants the file lists); list it empty to prune
    let pruned = dropped.replace("bindings:\n", "bindings:\n  globex: []\n");
    let out = ok(&node, &pruned, &["--prune"]).await;
    assert!(out.contains("definition extra: deleted"), "{out}");
    assert!(out.contains("binding globex/hello: deleted"), "{out}");
    assert!(out.contains("2 deleted"), "{out}");
    assert!(def(&node, "extra").await.is_none());
    assert!(bindings(&node, "initech").await.is_empty());
    assert!(bindings(&node, "globex").await.is_empty());
    assert!(def(&node, "handmade").await.is_some());
    let acme: Vec<String> = bindings(&node, "acme")
        .await
        .into_iter()
        .map(|b| b.definition)
        .collect();
    assert_eq!(acme, ["handmade", "hello", "nightly-report"]);
    let out = ok(&node, &pruned, &["--prune"]).await;
    assert!(out.contains("(no changes)"), "{out}");
    node.stop().await;
}
