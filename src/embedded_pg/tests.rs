//! End-to-end tests of the embedded cluster (start, connect, restart, stop,
//! crash recovery) and of the pieces that need a real directory.

use super::bins::versioned_bin_dirs;
use super::*;
use sqlx::{Connection, PgConnection};
use std::os::unix::fs::PermissionsExt;
use std::str::FromStr;
use std::sync::atomic::AtomicU32;

fn test_dir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "embpg-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

async fn show(conn: &mut PgConnection, setting: &'static str) -> String {
    let sql = match setting {
        "fsync" => "SHOW fsync",
        "max_connections" => "SHOW max_connections",
        "max_wal_size" => "SHOW max_wal_size",
        "wal_init_zero" => "SHOW wal_init_zero",
        "backend_flush_after" => "SHOW backend_flush_after",
        "listen_addresses" => "SHOW listen_addresses",
        "unix_socket_directories" => "SHOW unix_socket_directories",
        other => panic!("unknown setting {other}"),
    };
    sqlx::query_scalar(sql).fetch_one(conn).await.unwrap()
}

async fn select_one(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT 1")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[test]
fn versioned_dirs_sort_numerically() {
    let root = test_dir("versions");
    for v in ["9.6", "15", "10", "16", "main", "1x"] {
        std::fs::create_dir_all(root.join(v).join("bin")).unwrap();
    }
    let got = versioned_bin_dirs(&root);
    let want: Vec<PathBuf> = ["16", "15", "10", "9.6"]
        .iter()
        .map(|v| root.join(v).join("bin"))
        .collect();
    assert_eq!(got, want);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn url_parses_as_unix_socket() {
    let pg = EmbeddedPg {
        base_dir: "/a b".into(),
        data_dir: "/a b/pgdata".into(),
        bin_dir: "/bin".into(),
        socket_dir: "/a b/r+un&x".into(),
        socket_dir_is_tmp: false,
        log_file: "/a b/postgres.log".into(),
        port: 5433,
        run_as: RunAs {
            uid: 1,
            gid: 1,
            switch: false,
        },
        opts: Options::default(),
        stopped: AtomicBool::new(true),
    };
    let url = pg.url("my db");
    assert_eq!(
        url,
        "postgres://postgres@localhost:5433/my%20db?host=/a%20b/r%2Bun%26x"
    );
    let opts = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
    assert_eq!(opts.get_database(), Some("my db"));
    assert_eq!(opts.get_socket(), Some(&PathBuf::from("/a b/r+un&x")));
    assert_eq!(opts.get_port(), 5433);
    assert_eq!(opts.get_username(), "postgres");
}

/// The full cycle with durable settings: initdb, connect, CREATE DATABASE, stop,
/// start again on the same cluster (no initdb), connect, stop twice.
#[tokio::test]
async fn start_connect_restart_stop() {
    let dir = test_dir("cycle");
    let pg = EmbeddedPg::start(&dir).await.unwrap();
    assert_eq!(pg.data_dir(), dir.join("pgdata"));
    assert!(pg.data_dir().join("PG_VERSION").is_file());
    assert_eq!(pg.socket_dir(), dir.join("run"));

    let mut conn = connect(&pg.url("postgres")).await;
    assert_eq!(show(&mut conn, "fsync").await, "on");
    assert_eq!(show(&mut conn, "max_connections").await, "200");
    assert_eq!(show(&mut conn, "max_wal_size").await, "8GB");
    assert_eq!(show(&mut conn, "wal_init_zero").await, "off");
    assert_eq!(show(&mut conn, "backend_flush_after").await, "256kB");
    assert_eq!(show(&mut conn, "listen_addresses").await, "");
    assert_eq!(
        show(&mut conn, "unix_socket_directories").await,
        dir.join("run").to_str().unwrap()
    );
    sqlx::query("CREATE DATABASE x")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let mut conn = connect(&pg.url("x")).await;
    assert_eq!(select_one(&mut conn).await, 1);
    conn.close().await.unwrap();

    pg.stop().await.unwrap();
    pg.stop().await.unwrap();
    assert!(!pg.data_dir().join("postmaster.pid").exists());
    assert!(PgConnection::connect(&pg.url("x")).await.is_err());
    drop(pg);

    let pg = EmbeddedPg::start(&dir).await.unwrap();
    let mut conn = connect(&pg.url("x")).await;
    assert_eq!(select_one(&mut conn).await, 1);
    conn.close().await.unwrap();
    pg.stop().await.unwrap();
    pg.stop_blocking();
    drop(pg);

    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server left running by a "crashed" sked is stopped and restarted.
#[tokio::test]
async fn restarts_postmaster_left_by_crashed_run() {
    let dir = test_dir("crash");
    let opts = Options { fast_unsafe: true };
    let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
    let old_pid = pg.postmaster_pid().unwrap();
    let mut conn = connect(&pg.url("postgres")).await;
    assert_eq!(show(&mut conn, "fsync").await, "off");
    conn.close().await.unwrap();
    std::mem::forget(pg); // as if sked had been killed

    assert!(is_alive(old_pid));
    let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
    let new_pid = pg.postmaster_pid().unwrap();
    assert_ne!(old_pid, new_pid);
    let mut conn = connect(&pg.url("postgres")).await;
    assert_eq!(select_one(&mut conn).await, 1);
    conn.close().await.unwrap();
    pg.stop().await.unwrap();
    assert!(!is_alive(new_pid));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A postmaster.pid naming a live process that is not a postmaster (PID reuse)
/// does not block start.
#[tokio::test]
async fn ignores_pid_file_of_unrelated_process() {
    let dir = test_dir("stalepid");
    let opts = Options { fast_unsafe: true };
    let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
    let pid_file = pg.data_dir().join("postmaster.pid");
    let contents = std::fs::read_to_string(&pid_file).unwrap();
    pg.stop().await.unwrap();
    drop(pg);

    // Our own PID: alive, and our cwd is not the data directory.
    let mut lines: Vec<&str> = contents.lines().collect();
    let me = std::process::id().to_string();
    lines[0] = &me;
    std::fs::write(&pid_file, lines.join("\n") + "\n").unwrap();

    let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
    let mut conn = connect(&pg.url("postgres")).await;
    assert_eq!(select_one(&mut conn).await, 1);
    conn.close().await.unwrap();
    pg.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A directory too long for a socket path gets its socket under /tmp.
#[tokio::test]
async fn long_dir_uses_tmp_socket() {
    let dir = test_dir(&"long".repeat(25));
    let pg = EmbeddedPg::start_with(&dir, Options { fast_unsafe: true })
        .await
        .unwrap();
    let sock = pg.socket_dir().to_str().unwrap().to_owned();
    assert!(sock.starts_with("/tmp/sked-pg-"), "{sock}");
    let mut conn = connect(&pg.url("postgres")).await;
    assert_eq!(select_one(&mut conn).await, 1);
    conn.close().await.unwrap();
    pg.stop().await.unwrap();
    assert!(!pg.socket_dir().exists(), "tmp socket dir removed on stop");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Dropping a started server stops it.
#[tokio::test]
async fn drop_stops_server() {
    let dir = test_dir("drop");
    let pg = EmbeddedPg::start_with(&dir, Options { fast_unsafe: true })
        .await
        .unwrap();
    let pid = pg.postmaster_pid().unwrap();
    drop(pg);
    assert!(!is_alive(pid));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server that fails to start yields CommandFailed carrying the log's tail.
#[tokio::test]
async fn start_failure_reports_log_tail() {
    let dir = test_dir("badconf");
    let opts = Options { fast_unsafe: true };
    let pg = EmbeddedPg::start_with(&dir, opts).await.unwrap();
    pg.stop().await.unwrap();
    let conf = pg.data_dir().join("postgresql.conf");
    drop(pg);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nno_such_setting_xyz = 1\n");
    std::fs::write(&conf, text).unwrap();

    let err = EmbeddedPg::start_with(&dir, opts).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, Error::CommandFailed { .. }), "{msg}");
    assert!(msg.contains("no_such_setting_xyz"), "{msg}");
    assert!(!dir.join("pgdata/postmaster.pid").exists(), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn error_messages_say_what_to_do() {
    let msg = Error::BinariesNotFound.to_string();
    assert!(msg.contains("apt-get install -y postgresql"), "{msg}");
    assert!(msg.contains("DATABASE_URL"), "{msg}");
    assert!(Error::NoPostgresUser.to_string().contains("postgres"));
}

/// When root, a data directory the postgres user cannot reach is refused up front.
#[tokio::test]
async fn root_rejects_unreachable_dir() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let outer = test_dir("private");
    std::fs::create_dir_all(&outer).unwrap();
    std::fs::set_permissions(&outer, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = EmbeddedPg::start(&outer.join("inner")).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidDir { ref path, .. } if *path == outer),
        "{err}"
    );
    std::fs::remove_dir_all(&outer).unwrap();
}
