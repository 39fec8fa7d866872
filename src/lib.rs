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
//! Data flows one way, gRPC → domain → db; the engine (scheduler → executor
//! → events) works beside the gRPC layer on the same database.
//!
//! - [`proto`] — generated `sked.v1` code and its descriptor set.
//! - [`config`] — command line and `SKED_*` environment.
//! - [`telemetry`] — logging.
//! - [`app`] — wiring, background tasks, shutdown order.
//! - [`domain`] — pure types and rules: schedules (cron, DST), misfire and
//!   overlap plans, retry backoff, run states, params merge (RFC 7396), the
//!   clock.
//! - [`db`] — all SQL.
//! - [`grpc`] — the API services, authentication (API keys, `grpc::auth`),
//!   authorization (`grpc::authz`: one table of role and scope per method,
//!   enforced by one tower layer before a request is decoded), audit
//!   summaries, status mapping; the input boundary (`grpc::codec` +
//!   `grpc::boundary`: every request field checked from the descriptor set
//!   before a handler runs) and per-tenant cost bounds (`grpc::limit`).
//! - [`scheduler`] — due bindings → queued runs, exactly once; misfire,
//!   overlap and pause decisions.
//! - [`executor`] — claim queued runs and run their handlers; leases,
//!   heartbeat, reaper, retries, timeout, cancel, graceful drain.
//! - [`events`] — publish run events, the LISTEN/NOTIFY bridge, streams.
//! - [`embedded_pg`] — the private PostgreSQL of the one-command default.
//! - [`transport`] — TLS, compression and message size of the gRPC listener.

#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod db;
pub mod domain;
pub mod embedded_pg;
pub mod events;
pub mod executor;
pub mod grpc;
pub mod proto;
pub mod scheduler;
pub mod telemetry;
pub mod transport;
