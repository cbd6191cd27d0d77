//! Operators' HTTP endpoints, served when `bcp serve --http ADDR` is given:
//! `/healthz` (the process is up), `/readyz` (NATS connected, no alarm
//! raised, and the writer running, or a group follower applying the
//! stream), and `/metrics` in the Prometheus/OpenMetrics text format,
//! encoded by `prometheus-client` (commands by verb and outcome, each
//! command's time from intake to reply, batch sizes, commit and fsync
//! latency, relay lag, intake queue depth, head and published seq, alarms).

use super::api::{Metrics, Role};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `verb` and `outcome`: static strings, so counting allocates nothing.
type Labels = [(&'static str, &'static str); 2];

/// The Prometheus side of [`Metrics`]: counters and histograms updated as
/// commands are answered, gauges set from the live state at each scrape.
pub struct Prom {
    registry: Registry,
    commands: Family<Labels, Counter>,
    batch_commands: Histogram,
    commit_seconds: Histogram,
    command_seconds: Histogram,
    gauges: Gauges,
}

#[derive(Default)]
struct Gauges {
    head: Gauge,
    published: Gauge,
    relay_lag: Gauge,
    queue_depth: Gauge,
    alarms: Gauge,
    dropped: Gauge,
}

impl Prom {
    /// The registry, with the store's fsync times (`Store::fsync_seconds`).
    pub fn new(fsync_seconds: Histogram) -> Self {
        let mut registry = Registry::with_prefix("bcp");
        let commands = Family::<Labels, Counter>::default();
        registry.register(
            "commands",
            "Commands answered, by verb and outcome (ok, or the error code)",
            commands.clone(),
        );
        let batch_commands = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "batch_commands",
            "Commands decided and committed together in one write transaction",
            batch_commands.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        registry.register(
            "commit_seconds",
            "From a batch handed to the commit thread to its durable commit (fsync included)",
            commit_seconds.clone(),
        );
        let command_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        registry.register(
            "command_seconds",
            "From a command decoded and queued by intake to its reply: waiting for the writer, decided, committed (in a group, also acknowledged by JetStream)",
            command_seconds.clone(),
        );
        registry.register(
            "fsync_seconds",
            "Each fsync of the store's file: the disk's part of a commit",
            fsync_seconds,
        );
        let gauges = Gauges::default();
        for (name, help, g) in [
            ("head_seq", "Seq of the last committed event", &gauges.head),
            (
                "published_seq",
                "Seq of the last event JetStream acknowledged",
                &gauges.published,
            ),
            (
                "relay_lag",
                "Committed events not yet acknowledged by JetStream",
                &gauges.relay_lag,
            ),
            (
                "intake_queue_depth",
                "Commands waiting for the writer",
                &gauges.queue_depth,
            ),
            (
                "alarms",
                "Alarms raised (commands refused while any is)",
                &gauges.alarms,
            ),
            (
                "dropped_fire_and_forget",
                "Commands sent without a reply subject and not recorded (queue full)",
                &gauges.dropped,
            ),
        ] {
            registry.register(name, help, g.clone());
        }
        Prom {
            registry,
            commands,
            batch_commands,
            commit_seconds,
            command_seconds,
            gauges,
        }
    }

    /// One command answered: `outcome` is `ok` or the error code.
    pub fn command(&self, verb: &'static str, outcome: &'static str) {
        self.commands
            .get_or_create(&[("verb", verb), ("outcome", outcome)])
            .inc();
    }

    /// One batch committed: its size and how long the commit took.
    pub fn batch(&self, commands: usize, commit: std::time::Duration) {
        self.batch_commands.observe(commands as f64);
        self.commit_seconds.observe(commit.as_secs_f64());
    }

    /// One command answered, `since` the intake queued it.
    pub fn answered(&self, since: std::time::Duration) {
        self.command_seconds.observe(since.as_secs_f64());
    }
}

/// What the endpoints read.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub client: async_nats::Client,
    pub role: watch::Receiver<Role>,
}

/// Serve the endpoints on `listener` until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, state: HttpState, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(Arc::new(state));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "HTTP endpoints stopped");
    }
}

async fn readyz(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let connected = s.client.connection_state() == async_nats::connection::State::Connected;
    let alarms = s.metrics.alarm_list();
    let role = *s.role.borrow();
    let writing = role == Role::Follower || s.metrics.writer_running();
    let ready = connected && alarms.is_empty() && writing;
    let body = serde_json::json!({
        "ready": ready,
        "role": role.as_str(),
        "nats_connected": connected,
        "writer_running": s.metrics.writer_running(),
        "alarms": alarms,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let m = &s.metrics;
    let p = m.prom();
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    p.gauges.head.set(as_i64(m.head_seq()));
    p.gauges.published.set(as_i64(m.published_seq()));
    p.gauges.relay_lag.set(as_i64(m.relay_lag()));
    p.gauges.queue_depth.set(as_i64(m.queue_depth()));
    p.gauges.alarms.set(as_i64(m.alarm_list().len() as u64));
    p.gauges.dropped.set(as_i64(m.dropped_count()));
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &p.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
