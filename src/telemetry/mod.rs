//! Logging and metrics: a `tracing` subscriber, pretty or JSON, filtered by
//! `RUST_LOG` (default `info`, sqlx's per-query logs at `warn`); the
//! Prometheus exporter of `--metrics-listen` and the metric names
//! ([`metrics`]).

pub mod metrics;

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, ExporterFuture, Matcher, PrometheusBuilder};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it twice is harmless.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Installs the process-wide Prometheus recorder, its listener bound on
/// `addr` (serving the text format on `GET /metrics`), with sked's
/// histogram buckets and metric descriptions. Returns the listener's future
/// for the caller to spawn (`src/app.rs`). Must run inside a Tokio runtime
/// (the exporter spawns its own upkeep task, which folds histogram samples
/// every few seconds).
///
/// # Errors
/// [`BuildError`] when the address cannot be bound or a recorder is
/// installed already (the recorder is process-global: one per process).
pub fn install_metrics(addr: SocketAddr) -> Result<ExporterFuture, BuildError> {
    use self::metrics as m;
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(m::FIRE_LAG.into()), m::FIRE_LAG_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(m::RUN_DURATION.into()),
            m::RUN_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(m::CLAIM_DURATION.into()), m::PASS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(m::SCHEDULER_PASS_DURATION.into()),
            m::PASS_BUCKETS,
        )?
        .build()?;
    ::metrics::set_global_recorder(recorder)?;
    m::describe();
    ::metrics::gauge!(m::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(exporter)
}
