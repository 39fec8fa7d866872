//! Retention and archive (issue 15), driven by the test clock: a node whose
//! clock the test moves forward by weeks makes its runs "old", and its
//! leader's retention pass (every 200 ms here) archives and drops the
//! expired days of `run_events`, deletes old runs and audit events, and
//! keeps every event of the runs younger than the retention. What a user
//! checks: ListRunEvents / GetRun / ListAuditEvents through the API, the
//! archive files on disk, and the day tables in the database.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{NaiveDate, TimeDelta};
use sked::domain::Clock;
use sked::domain::retention::{StoredEvent, id_day};
use sked::proto::v1 as pb;
use tonic::Code;

use crate::common::*;

const TENANT: &str = "keeper";

/// Every event of a run through ListRunEvents (all pages).
async fn list_events(node: &TestNode, run_id: &str) -> Result<Vec<pb::RunEvent>, tonic::Status> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = node
            .logs()
            .list_run_events(as_tenant(
                TENANT,
                pb::ListRunEventsRequest {
                    run_id: run_id.into(),
                    after_seq: after,
                    page_size: 2,
                },
            ))
            .await?
            .into_inner();
        out.extend(page.events);
        if page.next_after_seq == 0 {
            return Ok(out);
        }
        after = page.next_after_seq;
    }
}

async fn trigger_at(node: &TestNode, binding: &str, at: Option<prost_types::Timestamp>) -> pb::Run {
    node.runs()
        .trigger_run(as_tenant(
            TENANT,
            pb::TriggerRunRequest {
                binding_id: binding.into(),
                run_time: at,
                ..Default::default()
            },
        ))
        .await
        .expect("trigger")
        .into_inner()
}

/// The lines of an archive file, each back as the event ListRunEvents
/// shows (the same conversion the API uses).
fn archived(path: &Path) -> Vec<pb::RunEvent> {
    let f = std::fs::File::open(path).expect("open archive");
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(|l| {
            let s: StoredEvent = serde_json::from_str(&l.expect("line")).expect("a JSON event");
            sked::grpc::convert::event_to(&sked::domain::RunEvent {
                run_id: s.run_id,
                seq: s.seq,
                time: s.time,
                tenant_id: s.tenant_id,
                binding_id: s.binding_id,
                definition: s.definition,
                body: serde_json::from_value(s.payload).expect("a stored event body"),
            })
        })
        .collect()
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("archive dir")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with(prefix) && n.ends_with(".jsonl.gz")
        })
        .collect();
    v.sort();
    v
}

fn day_file(dir: &Path, day: NaiveDate) -> PathBuf {
    dir.join(format!("run-events-{}.jsonl.gz", day.format("%Y-%m-%d")))
}

/// The day tables of run_events (attached or not), as psql would list them.
async fn day_tables(pool: &sqlx::PgPool) -> BTreeSet<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relname ~ '^run_events_[0-9]{8}$'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn table(day: NaiveDate) -> String {
    format!("run_events_{}", day.format("%Y%m%d"))
}

/// Polls `check` every 100 ms until it holds, at most [`WAIT`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let ok = tokio::time::timeout(WAIT, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting until {what}");
}

fn day_of(run: &pb::Run) -> NaiveDate {
    id_day(run.id.parse().unwrap()).expect("run ids are UUIDv7")
}

async fn not_found(node: &TestNode, run: &pb::Run) -> bool {
    let get = node
        .runs()
        .get_run(as_tenant(
            TENANT,
            pb::GetRunRequest {
                run_id: run.id.clone(),
            },
        ))
        .await;
    matches!(get, Err(s) if s.code() == Code::NotFound)
}

async fn audit_times(node: &TestNode) -> Vec<f64> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = node
            .admin()
            .list_audit_events(as_tenant(
                "",
                pb::ListAuditEventsRequest {
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                },
            ))
            .await
            .expect("list audit events")
            .into_inner();
        out.extend(page.events.iter().map(|e| secs(&e.time)));
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// The whole life of run history under retention, on one node whose clock
/// the test moves: old days archived then dropped, old runs deleted, runs
/// younger than the retention (not ended, or ended after the cutoff though
/// created before it) keep every event, their events archived when they
/// finally go, and audit events kept for their own, longer retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_days_are_archived_then_dropped_and_younger_runs_keep_every_event() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let archive = tempfile::tempdir().unwrap();
    let clock = Clock::system();
    let mut s = settings(&db, "keeper-1");
    s.clock = clock.clone();
    s.retention.every = Duration::from_millis(200);
    s.retention.runs = TimeDelta::days(30);
    s.retention.audit = TimeDelta::days(40);
    s.retention.archive_dir = Some(archive.path().to_path_buf());
    s.retention.batch = 2; // several batches even for a handful of runs
    let node = TestNode::start_with(s).await;
    let binding = define_and_bind(
        &node,
        TENANT,
        sh_def("keeper.job", "echo out-$$; echo err-$$ >&2", manual()),
    )
    .await;
    let t0 = clock.now();

    // Day 0: three runs that end now, one for day 10 (it will run and end
    // on day 20), one for day 90 (still SCHEDULED when its day is dropped).
    let mut old = Vec::new();
    for _ in 0..3 {
        let r = trigger(&node, TENANT, &binding.id).await;
        wait_terminal(&node, TENANT, &r.id).await;
        old.push(r);
    }
    // And an event run: its last three events are stored as one row
    // (issue 18), archived one event per line all the same.
    let ticker = define_and_bind(
        &node,
        TENANT,
        pb::TaskDefinition {
            name: "keeper.tick".into(),
            handler: Some(pb::task_definition::Handler::Event(pb::EventHandler {})),
            schedule: Some(manual()),
            ..Default::default()
        },
    )
    .await;
    let r = trigger(&node, TENANT, &ticker.id).await;
    wait_terminal(&node, TENANT, &r.id).await;
    old.push(r);
    let later = trigger_at(&node, &binding.id, Some(ts(secs_of(t0) + 10.0 * 86400.0))).await;
    let far = trigger_at(&node, &binding.id, Some(ts(secs_of(t0) + 90.0 * 86400.0))).await;
    assert_eq!(state(&later), pb::RunState::Scheduled);
    let mut old_events = Vec::new();
    for r in &old {
        let ev = list_events(&node, &r.id).await.unwrap();
        assert!(ev.len() >= 4, "state changes and log lines: {ev:?}");
        old_events.extend(ev);
    }
    let far_events = list_events(&node, &far.id).await.unwrap();
    assert!(
        !far_events.is_empty(),
        "a SCHEDULED run has its first event"
    );
    let old_days: BTreeSet<NaiveDate> = old.iter().chain([&later, &far]).map(day_of).collect();
    let audit_day0 = audit_times(&node).await.len();
    assert!(audit_day0 >= 7, "definition, binding, 5 triggers audited");

    // Day 20: `later` becomes due, runs and ends; two young runs.
    clock.advance(TimeDelta::days(20));
    let later = wait_terminal(&node, TENANT, &later.id).await;
    assert_eq!(state(&later), pb::RunState::Succeeded);
    let later_events = list_events(&node, &later.id).await.unwrap();
    let mut young = Vec::new();
    for _ in 0..2 {
        let r = trigger(&node, TENANT, &binding.id).await;
        wait_terminal(&node, TENANT, &r.id).await;
        young.push(r);
    }
    let mut young_events = Vec::new();
    for r in &young {
        young_events.push(list_events(&node, &r.id).await.unwrap());
    }
    let young_day = day_of(&young[0]);
    // The leader keeps partitions ahead of its clock.
    until("day 20's partition exists", || async {
        day_tables(&pool).await.contains(&table(young_day))
    })
    .await;

    // Day 32: the days of day 0 lie wholly before the cutoff (day 2).
    clock.advance(TimeDelta::days(12));
    until(
        "day 0 is archived and dropped, its old runs deleted",
        || async {
            let tables = day_tables(&pool).await;
            let mut done = old_days.iter().all(|d| !tables.contains(&table(*d)));
            for r in &old {
                done &= not_found(&node, r).await;
            }
            done
        },
    )
    .await;
    // The archive holds exactly the events ListRunEvents returned of the
    // runs that went, in (run, seq) order: nothing of the runs kept.
    let mut written = Vec::new();
    for d in &old_days {
        let f = day_file(archive.path(), *d);
        if f.exists() {
            written.extend(archived(&f));
        }
    }
    let mut want = old_events.clone();
    want.sort_by(|a, b| (&a.run_id, a.seq).cmp(&(&b.run_id, b.seq)));
    assert_eq!(written, want, "the archive of day 0");
    for r in &old {
        let e = list_events(&node, &r.id).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "a deleted run's events are gone");
    }
    // Created on day 0 but not ended, or ended after the cutoff: every
    // event kept, readable as before.
    assert_eq!(list_events(&node, &far.id).await.unwrap(), far_events);
    assert_eq!(list_events(&node, &later.id).await.unwrap(), later_events);
    assert_eq!(
        state(&get_run(&node, TENANT, &far.id).await),
        pb::RunState::Scheduled
    );
    for (r, ev) in young.iter().zip(&young_events) {
        assert_eq!(&list_events(&node, &r.id).await.unwrap(), ev);
    }
    assert!(day_tables(&pool).await.contains(&table(young_day)));
    assert_eq!(
        audit_times(&node).await.len(),
        audit_day0 + 2,
        "audit events are kept 40 days"
    );

    // Day 55: day 20 expires (cutoff day 25): the young runs' day is
    // archived and dropped; `later` (ended day 20) goes too, and its
    // events, kept in the default partition, are archived on their own.
    // The audit events of day 0 are past their 40 days; day 20's are not.
    clock.advance(TimeDelta::days(23));
    until("day 20 is dropped and `later` deleted", || async {
        !day_tables(&pool).await.contains(&table(young_day)) && not_found(&node, &later).await
    })
    .await;
    for r in &young {
        assert!(not_found(&node, r).await, "young runs are old now");
    }
    let mut want: Vec<pb::RunEvent> = young_events.concat();
    want.sort_by(|a, b| (&a.run_id, a.seq).cmp(&(&b.run_id, b.seq)));
    assert_eq!(archived(&day_file(archive.path(), young_day)), want);
    let defaults = files(archive.path(), "run-events-default-");
    let kept: Vec<pb::RunEvent> = defaults.iter().flat_map(|f| archived(f)).collect();
    assert_eq!(
        kept, later_events,
        "the kept events, archived when their run went"
    );
    assert_eq!(list_events(&node, &far.id).await.unwrap(), far_events);
    until("day 0's audit events are deleted", || async {
        audit_times(&node).await.len() == 2
    })
    .await;
    let day20 = secs_of(t0) + 20.0 * 86400.0;
    assert!(audit_times(&node).await.iter().all(|t| *t >= day20));
    // Only complete files: no temporary left behind.
    let names: Vec<String> = std::fs::read_dir(archive.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".jsonl.gz")), "{names:?}");
    node.stop().await;
}

fn secs_of(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

/// An archive that cannot be written keeps the day (detached, its events
/// nowhere else) and is written, then dropped, once it can be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_archive_keeps_the_day_until_it_can_be_written() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("archive");
    let clock = Clock::system();
    let mut s = settings(&db, "keeper-2");
    s.clock = clock.clone();
    s.retention.every = Duration::from_millis(200);
    s.retention.runs = TimeDelta::days(1);
    s.retention.archive_dir = Some(dir.clone());
    let node = TestNode::start_with(s).await;
    let binding = define_and_bind(&node, TENANT, sh_def("keeper.two", "echo hi", manual())).await;
    let run = trigger(&node, TENANT, &binding.id).await;
    wait_terminal(&node, TENANT, &run.id).await;
    let events = list_events(&node, &run.id).await.unwrap();
    let day = day_of(&run);

    // The directory turns into a file: no archive can be written there.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    clock.advance(TimeDelta::days(3));
    let detached = || async {
        sqlx::query_scalar::<_, bool>("SELECT attached FROM sked_run_events_days() WHERE day = $1")
            .bind(day)
            .fetch_optional(&pool)
            .await
            .unwrap()
    };
    until("the day is detached", || async {
        detached().await == Some(false)
    })
    .await;
    // Passes go on failing; the day stays.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        detached().await,
        Some(false),
        "kept while the archive fails"
    );

    std::fs::remove_file(&dir).unwrap();
    until("the day is archived and dropped", || async {
        detached().await.is_none()
    })
    .await;
    assert_eq!(archived(&day_file(&dir, day)), events);
    assert!(not_found(&node, &run).await);
    node.stop().await;
}

/// Bad retention values stop `sked serve` before it starts, naming the
/// flag, the value and the bound.
#[tokio::test]
async fn bad_retention_values_are_refused_with_a_clear_message() {
    for (args, env, says) in [
        (&["--retention", "0d"][..], None, "minimum of 1d"),
        (&["--retention", "30"][..], None, "e.g. 30d"),
        (&["--audit-retention", "12h"][..], None, "minimum of 1d"),
        (
            &["--audit-retention", "50000d"][..],
            None,
            "maximum of 36525d",
        ),
        (&[][..], Some(("SKED_RETENTION", "1month")), "e.g. 30d"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sked"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        cmd.env_remove("DATABASE_URL");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("run sked"))
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        let flag = args.first().copied().unwrap_or("--retention");
        assert!(
            err.contains(flag) && err.contains(says),
            "{args:?} {env:?}: {err}"
        );
    }
}

/// The migration that partitions `run_events` moves existing events into
/// the day of their run and keeps them readable: runs made on a database
/// at the previous schema (copied from a node whose clock ran five days
/// behind) read the same through ListRunEvents after a node migrated it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_moves_existing_events_into_their_days() {
    // Source: runs of today and of five days ago, made through the API.
    let src = TestDb::new().await;
    let clock = Clock::system();
    clock.advance(TimeDelta::days(-5));
    let mut s = settings(&src, "mig-src");
    s.clock = clock.clone();
    let node = TestNode::start_with(s).await;
    let binding =
        define_and_bind(&node, TENANT, sh_def("keeper.mig", "echo moved", manual())).await;
    let mut runs = Vec::new();
    for back in [true, false] {
        if !back {
            clock.advance(TimeDelta::days(5));
        }
        let r = trigger(&node, TENANT, &binding.id).await;
        wait_terminal(&node, TENANT, &r.id).await;
        runs.push(r);
    }
    let mut before = Vec::new();
    for r in &runs {
        before.push(list_events(&node, &r.id).await.unwrap());
    }
    node.stop().await;
    let src_pool = src.pool().await;
    let dump = |sql: &'static str| {
        let pool = src_pool.clone();
        async move {
            sqlx::query_scalar::<_, serde_json::Value>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (run_rows, event_rows) = (
        dump("SELECT jsonb_agg(t) FROM runs t").await,
        dump("SELECT jsonb_agg(t) FROM run_events t").await,
    );

    // Target: the schema before partitioning, holding those rows (and one
    // event whose run id is not a UUIDv7).
    let dst = TestDb::new().await;
    let pool = dst.pool().await;
    sqlx::migrate::Migrator::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))
        .await
        .unwrap()
        .run_to(20261203000200, &pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO runs SELECT * FROM jsonb_populate_recordset(NULL::runs, $1)")
        .bind(&run_rows)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO run_events SELECT * FROM jsonb_populate_recordset(NULL::run_events, $1)",
    )
    .bind(&event_rows)
    .execute(&pool)
    .await
    .unwrap();
    let v4 = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO run_events VALUES ($1, 1, now(), 't', gen_random_uuid(), 'd', 'log', '{}')",
    )
    .bind(v4)
    .execute(&pool)
    .await
    .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM run_events")
        .fetch_one(&pool)
        .await
        .unwrap();

    let node = TestNode::start(&dst, "mig-dst").await;
    for (r, ev) in runs.iter().zip(&before) {
        assert_eq!(
            &list_events(&node, &r.id).await.unwrap(),
            ev,
            "run {}",
            r.id
        );
        let part: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT tableoid::regclass::text FROM run_events WHERE run_id = $1",
        )
        .bind(r.id.parse::<uuid::Uuid>().unwrap())
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(part, vec![table(day_of(r))], "run {} in its day", r.id);
    }
    let part: String =
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM run_events WHERE run_id = $1")
            .bind(v4)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(part, "run_events_default");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM run_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after, total, "every row moved");
    let old: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relname = 'run_events_unpartitioned'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(old, 0);
    // New runs write into today's partition.
    let b = define_and_bind(&node, TENANT, sh_def("keeper.new", "echo new", manual())).await;
    let r = trigger(&node, TENANT, &b.id).await;
    wait_terminal(&node, TENANT, &r.id).await;
    assert!(!list_events(&node, &r.id).await.unwrap().is_empty());
    let part: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT tableoid::regclass::text FROM run_events WHERE run_id = $1",
    )
    .bind(r.id.parse::<uuid::Uuid>().unwrap())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(part, vec![table(day_of(&r))]);
    node.stop().await;
}
