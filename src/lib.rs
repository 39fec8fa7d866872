//! # sked
//!
//! A gRPC task-scheduling service on PostgreSQL. Platform teams publish task
//! definitions; each tenant binds them with its own schedule and params; sked
//! fires every due run exactly once across any number of nodes sharing one
//! database, executes it, records every state change and log line, and
//! streams the live execution to subscribers. What it promises is in
//! `docs/semantics.md`, how it is built in `docs/architecture.md`.
//!
//! # Layout
//!
//! Data flows one way, gRPC → usecase → domain/db; the engine (scheduler →
//! executor → events) works beside them on the same database.
//!
//! - [`proto`] — generated `sked.v1` code and its descriptor set.
//! - [`config`] — command line and `SKED_*` environment.
//! - [`telemetry`] — logging; Prometheus metrics (names, recording
//!   helpers, the exporter).
//! - [`app`] — wiring, background tasks (each engine task supervised:
//!   restarted when it dies, health `NOT_SERVING` meanwhile), shutdown
//!   order.
//! - [`domain`] — pure types and rules: schedules (cron, DST), misfire and
//!   overlap plans, retry backoff, run states, params merge (RFC 7396), the
//!   clock.
//! - [`db`] — all SQL.
//! - [`usecase`] — what sked does for a caller (gRPC, CLI): one module per
//!   resource owning transactions, checks beyond shape, quotas,
//!   idempotency, audit and run creation.
//! - [`grpc`] — the API services, authentication (API keys, `grpc::auth`),
//!   authorization (`grpc::authz`: one table of role and scope per method,
//!   enforced by one tower layer before a request is decoded), audit
//!   summaries, status mapping; the input boundary (`grpc::codec` +
//!   `grpc::boundary`: every request field checked from the descriptor set
//!   before a handler runs) and per-tenant cost bounds (`grpc::limit`).
//! - [`scheduler`] — due bindings → queued runs, exactly once; misfire,
//!   overlap and pause decisions.
//! - [`executor`] — claim queued runs and run their handlers; leases,
//!   heartbeat, reaper, retries, timeout, cancel, graceful drain; delivery
//!   of failure notifications (`executor::notify`).
//! - [`events`] — publish run events, the LISTEN/NOTIFY bridge, streams.
//! - [`cluster`] — the nodes sharing a database: heartbeat rows, the
//!   maintenance leader's lease and the [`cluster::Leadership`] handle.
//! - [`retention`] — the leader's retention and archive task: `run_events`
//!   day partitions created ahead, old runs deleted in batches, expired
//!   days archived and dropped, old audit events deleted.
//! - [`embedded_pg`] — the private PostgreSQL of the one-command default.
//! - [`transport`] — TLS, compression and message size of the gRPC listener.
//! - [`console`] — the web console (`--console-listen`): server-rendered
//!   pages and actions over the use cases, authorized by `grpc::authz`'s
//!   table; sessions in the database (`usecase::sessions`).
//! - [`cli`] — the `sked` client subcommands (`def`, `binding`, `run`,
//!   `tail`, `watch`, `preview`, `quota`, `key`, `audit`): a gRPC client of
//!   a node like any other, one file per resource; it names only [`proto`]
//!   and [`domain`], never the server's layers.

#![warn(missing_docs)]

pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod db;
pub mod domain;
pub mod embedded_pg;
pub mod events;
pub mod executor;
pub mod grpc;
pub mod proto;
pub mod retention;
pub mod scheduler;
pub mod telemetry;
pub mod transport;
pub mod usecase;

/// Checks that keep the layering of `# Layout` true (read the sources).
#[cfg(test)]
mod house {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    fn sources(under: &str) -> Vec<(PathBuf, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(under);
        let mut files = Vec::new();
        if root.is_dir() {
            rust_files(&root, &mut files);
        } else {
            // A module in one file (`src/cluster.rs`).
            files.push(root.with_extension("rs"));
        }
        files
            .into_iter()
            // Test code is not the layering's business: a `tests.rs` file,
            // and a file's inline test module (from `#[cfg(test)]` on).
            .filter(|p| !p.ends_with("tests.rs"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("read source");
                let code = match text.find("#[cfg(test)]") {
                    Some(i) => text[..i].to_string(),
                    None => text,
                };
                (p, code)
            })
            .collect()
    }

    /// `src/domain` is pure: no database, no gRPC, no async runtime.
    #[test]
    fn domain_uses_no_sqlx_tonic_or_tokio() {
        for (path, text) in sources("src/domain") {
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for krate in [
                    "sqlx::",
                    "tonic::",
                    "tokio::",
                    "use sqlx",
                    "use tonic",
                    "use tokio",
                ] {
                    assert!(
                        !code.contains(krate),
                        "{}:{}: the domain layer uses {krate}: {line}",
                        path.display(),
                        n + 1
                    );
                }
            }
        }
    }

    /// SQL lives in `src/db` only (the benchmark binary reads the database
    /// directly to measure, and is not part of the service).
    #[test]
    fn sql_only_under_src_db() {
        for (path, text) in sources("src") {
            let p = path.to_string_lossy();
            if p.contains("/src/db/") || p.contains("/src/bin/") || p.ends_with("/src/lib.rs") {
                continue;
            }
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for q in [
                    "sqlx::query",
                    "sqlx::raw_sql",
                    "query_as!(",
                    "query_scalar!(",
                ] {
                    assert!(
                        !code.contains(q),
                        "{}:{}: SQL outside src/db: {line}",
                        path.display(),
                        n + 1
                    );
                }
            }
        }
    }

    /// gRPC handlers parse, call a use case and convert: nothing under
    /// `src/grpc` opens a transaction, writes the audit log or calls the
    /// database layer (`src/usecase` does).
    #[test]
    fn grpc_handlers_open_no_transactions() {
        for (path, text) in sources("src/grpc") {
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for q in [
                    ".begin()",
                    "Transaction<",
                    ".commit()",
                    "PgConnection",
                    "audit_insert",
                    "crate::db",
                    "db::",
                ] {
                    assert!(
                        !code.contains(q),
                        "{}:{}: a gRPC handler reaches past the use-case layer ({q}): {line}",
                        path.display(),
                        n + 1
                    );
                }
            }
        }
    }

    /// Layers only call downwards (`# Layout`): each module may name only
    /// the crate modules listed for it, so no cycle can form.
    #[test]
    fn layers_call_only_downwards() {
        const MODULES: [&str; 17] = [
            "app",
            "cli",
            "cluster",
            "config",
            "console",
            "db",
            "domain",
            "embedded_pg",
            "events",
            "executor",
            "grpc",
            "proto",
            "retention",
            "scheduler",
            "telemetry",
            "transport",
            "usecase",
        ];
        // `telemetry` (metric names and recording helpers) sits beside
        // `domain`: the engine and the use cases record into it.
        let allowed: [(&str, &[&str]); 12] = [
            ("domain", &[]),
            ("db", &["domain"]),
            ("telemetry", &["config", "domain"]),
            ("events", &["db", "domain", "telemetry"]),
            ("cluster", &["db", "domain", "telemetry"]),
            ("retention", &["cluster", "db", "domain", "telemetry"]),
            ("usecase", &["db", "domain", "events", "telemetry"]),
            ("scheduler", &["db", "domain", "events", "telemetry"]),
            ("executor", &["db", "domain", "events", "telemetry"]),
            ("grpc", &["domain", "events", "proto", "usecase"]),
            // The API seen by a person: the gRPC layer's context and rules
            // (authz table, auth, limits), the same use cases.
            (
                "console",
                &["domain", "events", "grpc", "transport", "usecase"],
            ),
            // A gRPC client like any other: the API's types, pure rules.
            ("cli", &["domain", "proto"]),
        ];
        for (layer, may) in allowed {
            for (path, text) in sources(&format!("src/{layer}")) {
                for (n, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or_default();
                    for m in MODULES {
                        if m == layer || may.contains(&m) {
                            continue;
                        }
                        let named = code.contains(&format!("crate::{m}::"))
                            || code.contains(&format!("crate::{m};"))
                            || code.contains(&format!("crate::{m}}}"))
                            || code.contains(&format!("crate::{m},"))
                            || code.split_once("crate::{").is_some_and(|(_, group)| {
                                group
                                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                                    .any(|w| w == m)
                            });
                        assert!(
                            !named,
                            "{}:{}: {layer} uses crate::{m} (allowed: {may:?}): {line}",
                            path.display(),
                            n + 1
                        );
                    }
                }
            }
        }
    }
}
