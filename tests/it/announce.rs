//! The node's announcer (`db::notify::Announcer`) against a real
//! PostgreSQL and a real `LISTEN`ing connection: notifications handed over
//! by many tasks at once all arrive, each task's in the order it handed
//! them over, and what was handed over before the last clone was dropped
//! is still sent.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use sked::db::notify::Announcer;

const CHANNEL: &str = "sked_test_announce";

/// Receives `n` notifications on `listener` (60 s at most in all).
async fn receive(listener: &mut sqlx::postgres::PgListener, n: usize) -> Vec<String> {
    let mut got = Vec::with_capacity(n);
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < n {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, listener.recv()).await {
            Ok(Ok(m)) => got.push(m.payload().to_string()),
            Ok(Err(e)) => panic!("listener failed: {e}"),
            Err(_) => panic!("{} of {n} notifications arrived", got.len()),
        }
    }
    got
}

/// An announcer on `db` and a connection listening on [`CHANNEL`].
async fn listening(db: &TestDb) -> (Announcer, sqlx::postgres::PgListener) {
    let mut listener = sqlx::postgres::PgListener::connect(&db.url)
        .await
        .expect("connect listener");
    listener.listen(CHANNEL).await.expect("listen");
    let (announcer, task) = Announcer::new(db.pool().await);
    tokio::spawn(task.run());
    (announcer, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_hand_overs_all_arrive_each_in_its_order() {
    let db = TestDb::new().await;
    let (announcer, mut listener) = listening(&db).await;
    let (tasks, hand_overs, per) = (8usize, 100usize, 3usize);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let a = announcer.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..hand_overs {
                let batch = (0..per)
                    .map(|j| (CHANNEL, format!("{t}:{}", i * per + j)))
                    .collect();
                a.send(batch).await;
            }
        }));
    }
    for h in handles {
        h.await.expect("sender");
    }
    let got = receive(&mut listener, tasks * hand_overs * per).await;
    // Each task's payloads in the order handed over, none twice, none lost.
    let mut next: HashMap<usize, usize> = HashMap::new();
    for p in &got {
        let (t, k) = p.split_once(':').expect("payload");
        let (t, k): (usize, usize) = (t.parse().unwrap(), k.parse().unwrap());
        let want = next.entry(t).or_default();
        assert_eq!(k, *want, "task {t}: {k} arrived where {want} was due");
        *want += 1;
    }
    assert_eq!(next.len(), tasks);
    assert!(next.values().all(|n| *n == hand_overs * per), "{next:?}");
    // Nothing more than was handed over.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "an extra notification arrived"
    );
}

#[tokio::test]
async fn what_was_handed_over_is_sent_after_the_last_clone_is_dropped() {
    let db = TestDb::new().await;
    let (announcer, mut listener) = listening(&db).await;
    // More than one statement's worth (4 096), in hand-overs of 100.
    let n = 5000usize;
    for i in 0..n / 100 {
        let batch = (0..100)
            .map(|j| (CHANNEL, (i * 100 + j).to_string()))
            .collect();
        announcer.send(batch).await;
    }
    // An empty hand-over sends nothing.
    announcer.send(Vec::new()).await;
    drop(announcer);
    let got = receive(&mut listener, n).await;
    let want: Vec<String> = (0..n).map(|k| k.to_string()).collect();
    assert_eq!(got, want);
}
