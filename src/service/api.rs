//! The NATS service API (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`): bcp
//! registers as service `bcp` with one endpoint per command verb
//! (`bcp.cmd.*.<verb>`) and per query (`bcp.query.*.<kind>`), so `nats micro
//! ls` / `nats micro info bcp` / `nats micro stats bcp` see it. The
//! endpoints are also how requests arrive: a request's latency is measured
//! from receipt to the reply sent after the durable commit.
//!
//! NATS micro counts an "error" when a service fails to handle a request.
//! A rejected command was handled (its reply is the rejection), so
//! rejections are reported per endpoint in the stats' `data`
//! (`rejections` by code), next to the relay's lag and the raised alarms.
//!
//! `bcp.status` is a plain subscription, not an endpoint: every bcp process
//! answers it, so one request collects every process's role and head.

use super::guard::{Alarm, Alarms};
use super::lease::Holder;
use crate::domain::Verb;
use crate::store::Store;
use async_nats::service::{self, Service, ServiceExt};
use futures::stream::{SelectAll, StreamExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub const SERVICE_NAME: &str = "bcp";
pub const QUERIES: [&str; 4] = ["job", "jobs", "snapshots", "history"];
/// Every bcp process answers requests here with its [`Status`].
pub const STATUS_SUBJECT: &str = "bcp.status";

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
    published: watch::Receiver<u64>,
    alarms: Arc<Alarms>,
    /// Fire-and-forget commands not recorded (the intake queue was full or
    /// bcp was stopping): nobody could be told.
    dropped: std::sync::atomic::AtomicU64,
    /// Rate-limited logs of refusals under overload.
    overload_log: Mutex<Overload>,
    /// The same counts for `/metrics` (`bcp serve --http`).
    prom: super::http::Prom,
    /// The writer's queue while a term runs (its depth for `/metrics`).
    queue: Mutex<Option<tokio::sync::mpsc::WeakSender<super::writer::WriteRequest>>>,
    /// A follower: how many events the stream holds past its head, as last
    /// seen (`u64::MAX`: not known, or not following).
    behind_stream: std::sync::atomic::AtomicU64,
}

/// Refusals and drops since the last log line about them.
#[derive(Default)]
struct Overload {
    last: Option<std::time::Instant>,
    refused: u64,
    dropped: u64,
}

/// How often overload (refused or dropped commands) is logged at most.
const OVERLOAD_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Metrics {
    pub fn new(
        head: watch::Receiver<u64>,
        published: watch::Receiver<u64>,
        alarms: Arc<Alarms>,
        fsync_seconds: prometheus_client::metrics::histogram::Histogram,
    ) -> Arc<Metrics> {
        Arc::new(Metrics {
            rejections: Mutex::default(),
            head,
            published,
            alarms,
            dropped: Default::default(),
            overload_log: Mutex::default(),
            prom: super::http::Prom::new(fsync_seconds),
            queue: Mutex::default(),
            behind_stream: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    /// A follower saw the stream `behind` events past its head (`None`:
    /// not known, or no longer following).
    pub fn set_behind_stream(&self, behind: Option<u64>) {
        self.behind_stream.store(
            behind.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn behind_stream(&self) -> Option<u64> {
        let b = self
            .behind_stream
            .load(std::sync::atomic::Ordering::Relaxed);
        (b != u64::MAX).then_some(b)
    }

    /// A fire-and-forget command was not recorded, because `why`.
    pub fn dropped(&self, why: &str) {
        self.dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.overload(why, |o| o.dropped += 1);
    }

    /// A command was answered `unavailable` at once, because `why`.
    pub fn refused_log(&self, why: &str) {
        self.overload(why, |o| o.refused += 1);
    }

    fn overload(&self, why: &str, count: impl FnOnce(&mut Overload)) {
        let mut o = self.overload_log.lock().expect("overload lock");
        count(&mut o);
        if o.last.is_none_or(|t| t.elapsed() >= OVERLOAD_LOG_EVERY) {
            tracing::warn!(
                refused = o.refused,
                dropped_fire_and_forget = o.dropped,
                "commands not taken ({why}): {} answered unavailable, {} sent without a reply subject and not recorded, since the last such line",
                o.refused,
                o.dropped
            );
            *o = Overload {
                last: Some(std::time::Instant::now()),
                ..Overload::default()
            };
        }
    }

    pub fn rejected(&self, endpoint: &'static str, code: &'static str) {
        let mut r = self.rejections.lock().expect("metrics lock");
        *r.entry(endpoint.to_owned())
            .or_default()
            .entry(code.to_owned())
            .or_default() += 1;
        self.prom.command(endpoint, code);
    }

    /// A command accepted (its reply `ok`).
    pub fn accepted(&self, verb: &'static str) {
        self.prom.command(verb, "ok");
    }

    pub fn prom(&self) -> &super::http::Prom {
        &self.prom
    }

    /// The writer's queue of this term (`None` between terms).
    pub fn set_queue(
        &self,
        queue: Option<tokio::sync::mpsc::WeakSender<super::writer::WriteRequest>>,
    ) {
        *self.queue.lock().expect("metrics lock") = queue;
    }

    /// Whether a writer runs (a term: single mode, or a group's leader).
    pub fn writer_running(&self) -> bool {
        self.queue
            .lock()
            .expect("metrics lock")
            .as_ref()
            .is_some_and(|q| q.strong_count() > 0)
    }

    /// Commands waiting for the writer.
    pub fn queue_depth(&self) -> u64 {
        let queue = self.queue.lock().expect("metrics lock");
        let Some(q) = queue.as_ref().and_then(|q| q.upgrade()) else {
            return 0;
        };
        (q.max_capacity() - q.capacity()) as u64
    }

    pub fn head_seq(&self) -> u64 {
        *self.head.borrow()
    }

    pub fn published_seq(&self) -> u64 {
        *self.published.borrow()
    }

    pub fn alarm_list(&self) -> Vec<Alarm> {
        self.alarms.list()
    }

    pub fn dropped_count(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Last committed seq minus last published seq.
    pub fn relay_lag(&self) -> u64 {
        self.head.borrow().saturating_sub(*self.published.borrow())
    }
}

type Requests = SelectAll<futures::stream::BoxStream<'static, (Kind, service::Request)>>;

/// Every command verb's endpoint, then every query's.
pub fn all_kinds() -> impl Iterator<Item = Kind> {
    command_kinds().chain(query_kinds())
}

pub fn command_kinds() -> impl Iterator<Item = Kind> {
    Verb::ALL.into_iter().map(Kind::Command)
}

pub fn query_kinds() -> impl Iterator<Item = Kind> {
    QUERIES.into_iter().map(Kind::Query)
}

/// Start the service (no endpoints yet; stop it on shutdown).
pub async fn start(client: &async_nats::Client, metrics: Arc<Metrics>) -> Result<Service, String> {
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
            // NATS micro counts an error only for a reply with no body,
            // and bcp answers every request with a JSON one: its errors
            // (bad requests: input bcp could not take) are counted here.
            let errors = rejections.get("bad_request").copied().unwrap_or(0);
            json!({
                "errors": errors,
                "rejections": rejections,
                "relay_lag": stats_metrics.relay_lag(),
                "dropped": stats_metrics.dropped.load(std::sync::atomic::Ordering::Relaxed),
                "alarms": stats_metrics.alarms.list(),
            })
        })
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| format!("service: {e}"))?;
    Ok(service)
}

/// Add the endpoints of `kinds` to `service`; their requests as one stream
/// (dropping it unsubscribes them: a group-mode leader's command endpoints
/// live as long as its term).
pub async fn endpoints(
    service: &Service,
    kinds: impl Iterator<Item = Kind>,
) -> Result<Requests, String> {
    let mut requests = SelectAll::new();
    for kind in kinds {
        let subject = match kind {
            Kind::Command(v) => format!("bcp.cmd.*.{v}"),
            Kind::Query(q) => format!("bcp.query.*.{q}"),
        };
        let endpoint = service
            .endpoint_builder()
            .name(kind.endpoint_name())
            .add(subject.clone())
            .await
            .map_err(|e| format!("endpoint {subject}: {e}"))?;
        requests.push(endpoint.map(move |r| (kind, r)).boxed());
    }
    Ok(requests)
}

/// One process's answer on [`STATUS_SUBJECT`].
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Status {
    pub ok: bool,
    /// `single` (no group), `leader` or `follower`.
    pub role: &'static str,
    pub group: Option<String>,
    pub node: Option<String>,
    pub version: &'static str,
    pub pid: u32,
    pub db: String,
    pub stream: String,
    /// The log's identity: the hash of its first event (null while empty).
    pub log_id: Option<String>,
    /// Seq of the last committed event.
    pub head_seq: u64,
    /// Seq of the last event JetStream acknowledged.
    pub published_seq: u64,
    pub relay_lag: u64,
    /// A follower: how many events the stream holds past its head, as it
    /// last saw (a follower applying nothing while this grows is stuck: its
    /// log says why). Null for the writer, and while not yet known.
    pub behind_stream: Option<u64>,
    /// The writer lease's name for this process, while it holds it
    /// (single, leader); null for a follower.
    pub writer: Option<String>,
    /// Milliseconds since the writer lease was last renewed, while this
    /// process holds it (it lapses at the lease TTL).
    pub lease_age_ms: Option<u64>,
    /// Whether commands are taken now (the writer, no alarm raised).
    pub taking_commands: bool,
    pub alarms: Vec<Alarm>,
}

/// What [`answer_status`] reads.
pub struct StatusSource {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub db: String,
    pub stream: String,
    /// This process as the writer lease names it.
    pub holder: Holder,
    pub group: Option<String>,
    pub node: Option<String>,
    pub role: watch::Receiver<Role>,
    pub lease: watch::Receiver<Option<super::lease::Renewed>>,
}

/// What a process is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No group: the one writer.
    Single,
    /// The group's writer, this term.
    Leader,
    /// Applying the leader's events from the stream.
    Follower,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader => "leader",
            Role::Follower => "follower",
        }
    }
}

impl StatusSource {
    fn status(&self) -> Status {
        let log_id = self
            .store
            .raw_events(1, 1)
            .ok()
            .and_then(|e| e.into_iter().next())
            .and_then(|(_, bytes)| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|v| v["hash"].as_str().map(str::to_owned));
        let alarms = self.metrics.alarms.list();
        let role = *self.role.borrow();
        Status {
            ok: true,
            role: role.as_str(),
            group: self.group.clone(),
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            db: self.db.clone(),
            stream: self.stream.clone(),
            log_id,
            head_seq: *self.metrics.head.borrow(),
            published_seq: *self.metrics.published.borrow(),
            relay_lag: self.metrics.relay_lag(),
            behind_stream: (role == Role::Follower)
                .then(|| self.metrics.behind_stream())
                .flatten(),
            writer: (role != Role::Follower).then(|| self.holder.store.clone()),
            lease_age_ms: self
                .lease
                .borrow()
                .as_ref()
                .map(|r| r.lock().expect("lease clock").elapsed().as_millis() as u64),
            taking_commands: alarms.is_empty() && role != Role::Follower,
            alarms,
        }
    }
}

/// Answer every request on [`STATUS_SUBJECT`] until `stop`.
pub async fn answer_status(
    client: async_nats::Client,
    source: StatusSource,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut sub = match client.subscribe(STATUS_SUBJECT).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "{STATUS_SUBJECT} not answered");
            return;
        }
    };
    let source = Arc::new(source);
    while let Some(Some(msg)) = stop.run_until_cancelled(sub.next()).await {
        let Some(reply) = msg.reply else { continue };
        let s = source.clone();
        let status = tokio::task::spawn_blocking(move || s.status()).await;
        let Ok(status) = status else { continue };
        let bytes = serde_json::to_vec(&status).expect("status serializes");
        if let Err(e) = client.publish(reply, bytes.into()).await {
            tracing::debug!(error = %e, "status reply not sent");
        }
    }
}
