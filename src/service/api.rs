//! The NATS service API (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`): bcp
//! registers as service `bcp` with one endpoint per command verb
//! (`bcp.cmd.*.<verb>`) and per query (`bcp.query.<kind>`), so `nats micro
//! ls` / `nats micro info bcp` / `nats micro stats bcp` see it. The
//! endpoints are also how requests arrive: a request's latency is measured
//! from receipt to the reply sent after the durable commit.
//!
//! NATS micro counts an "error" when a service fails to handle a request.
//! A rejected command was handled (its reply is the rejection), so
//! rejections are reported per endpoint in the stats' `data`
//! (`rejections` by code), next to the relay's lag.

use crate::domain::Verb;
use async_nats::service::{self, Service, ServiceExt};
use futures::stream::{SelectAll, StreamExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub const SERVICE_NAME: &str = "bcp";
pub const QUERIES: [&str; 4] = ["job", "jobs", "snapshots", "history"];

/// What an endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Command(Verb),
    Query(&'static str),
}

impl Kind {
    pub fn endpoint_name(self) -> String {
        match self {
            Kind::Command(v) => v.as_str().to_owned(),
            Kind::Query(q) => format!("query-{q}"),
        }
    }
}

/// Counters the stats handler reports beside NATS micro's own.
pub struct Metrics {
    /// endpoint name → error code → count.
    rejections: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    head: watch::Receiver<u64>,
    published: Arc<AtomicU64>,
}

impl Metrics {
    pub fn new(head: watch::Receiver<u64>, published: Arc<AtomicU64>) -> Arc<Metrics> {
        Arc::new(Metrics {
            rejections: Mutex::default(),
            head,
            published,
        })
    }

    pub fn rejected(&self, endpoint: &str, code: &str) {
        let mut r = self.rejections.lock().expect("metrics lock");
        *r.entry(endpoint.to_owned())
            .or_default()
            .entry(code.to_owned())
            .or_default() += 1;
    }

    /// Last committed seq minus last published seq.
    pub fn relay_lag(&self) -> u64 {
        self.head
            .borrow()
            .saturating_sub(self.published.load(Ordering::SeqCst))
    }
}

type Requests = SelectAll<futures::stream::BoxStream<'static, (Kind, service::Request)>>;

/// Start the service and its endpoints; returns the service (stop it on
/// shutdown) and every endpoint's requests as one stream.
pub async fn start(
    client: &async_nats::Client,
    metrics: Arc<Metrics>,
) -> Result<(Service, Requests), String> {
    let stats_metrics = metrics.clone();
    let service = client
        .service_builder()
        .description("bcp: event-sourced control plane for backup jobs")
        .stats_handler(move |endpoint, _stats| {
            let rejections = stats_metrics
                .rejections
                .lock()
                .expect("metrics lock")
                .get(&endpoint)
                .cloned()
                .unwrap_or_default();
            json!({"rejections": rejections, "relay_lag": stats_metrics.relay_lag()})
        })
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| format!("service: {e}"))?;
    let mut requests = SelectAll::new();
    let kinds = Verb::ALL
        .into_iter()
        .map(Kind::Command)
        .chain(QUERIES.into_iter().map(Kind::Query));
    for kind in kinds {
        let subject = match kind {
            Kind::Command(v) => format!("bcp.cmd.*.{v}"),
            Kind::Query(q) => format!("bcp.query.{q}"),
        };
        let endpoint = service
            .endpoint_builder()
            .name(kind.endpoint_name())
            .add(subject.clone())
            .await
            .map_err(|e| format!("endpoint {subject}: {e}"))?;
        requests.push(endpoint.map(move |r| (kind, r)).boxed());
    }
    Ok((service, requests))
}
