//! sked's integration tests, one test binary: each module is one area
//! (formerly its own `tests/<area>.rs` binary), sharing the harness in
//! `common` (PostgreSQL, test nodes, clients). One binary links the crate
//! once instead of once per area. Run with `cargo test`; one area with
//! `cargo test --test it <area>::`.

mod common;

mod ahead;
mod announce;
mod api;
mod apply;
mod auth;
mod bench;
mod claim_guards;
mod cli;
mod compression;
mod console;
mod control;
mod crash;
mod defence;
mod event_handler;
mod hostile;
mod http;
mod misfire;
mod nodes;
mod notify;
mod ops;
mod overrides;
mod probe;
mod progress;
mod python;
mod quotas;
mod rates;
mod retention;
mod runs;
mod schedules;
mod serve;
mod status;
mod tls;
mod workers;
mod workflows;
