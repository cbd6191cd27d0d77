//! The running control plane: the only async code in bcp.
//!
//! `serve` wires the parts together (DESIGN.md §1): [`api`] registers the
//! NATS service `bcp` and its endpoints; [`intake`] decodes commands and
//! queues them, and answers queries through [`queries`] (redb snapshots);
//! [`writer`] (one thread) decides and commits commands in batches and hands
//! the replies back; [`relay`] publishes committed events to JetStream in
//! seq order; [`sweeper`] queues retention on a timer; [`shutdown`] turns
//! SIGINT/SIGTERM into an orderly drain.

pub mod api;
pub mod connect;
pub mod intake;
pub mod queries;
pub mod relay;
pub mod shutdown;
pub mod sweeper;
pub mod writer;

use crate::store::{Store, StoreError, ledger::Ledger};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The stream every event is published to.
pub const STREAM: &str = "BCP_EVENTS";

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub db: PathBuf,
    pub nats_url: String,
    pub stream: String,
    /// How long shutdown waits for what needs NATS: the last replies, the
    /// relay publishing the last events, the final flush.
    pub drain_timeout: Duration,
    /// How often the retention sweeper expires due snapshots.
    pub sweep_interval: Duration,
    pub auth: connect::NatsAuth,
    /// Record the Nats-Request-Info identity as the verified actor. Only
    /// when every producer reaches bcp through a service import with
    /// `share: true` (the server then sets the header; otherwise a client
    /// could forge it).
    pub trust_request_info: bool,
    /// Queries answered at once; more are answered `unavailable`.
    pub queries_in_flight: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("NATS: {0}")]
    Nats(String),
}

/// Run until `stop` is cancelled, then drain: stop taking commands, finish
/// the batch in hand, let the relay publish what was committed, save the
/// relay cursor.
pub async fn serve(config: ServeConfig, stop: CancellationToken) -> Result<(), ServeError> {
    let store = Store::open_or_create(&config.db)?;
    let ledger = Ledger::open(store.clone())?;
    let head = ledger.head_seq();
    // One connection for requests, replies and the relay. A second one for
    // the relay was tried (`bench --e2e-only`): no difference beyond the
    // run-to-run spread of this machine's fsyncs (8-14 k commands/s).
    let client = connect(&config, "bcp serve").await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        db = %config.db.display(),
        nats = %config.nats_url,
        stream = %config.stream,
        head_seq = head,
        jobs = ledger.world().jobs.len(),
        "bcp serve started"
    );

    let published = Arc::new(AtomicU64::new(store.published_seq()?));
    let (head_tx, head_rx) = watch::channel(head);
    let (queue_tx, queue_rx) = mpsc::channel(crate::domain::limits::INTAKE_QUEUE_MAX);
    let (replies_tx, replies_rx) = mpsc::channel(64);

    let metrics = api::Metrics::new(head_rx.clone(), published.clone());
    let (service, requests) = api::start(&client, metrics.clone())
        .await
        .map_err(ServeError::Nats)?;

    let writer = writer::spawn(
        ledger,
        queue_rx,
        replies_tx,
        head_tx,
        published.clone(),
        stop.clone(),
    );
    let replier = tokio::spawn(intake::send_replies(
        client.clone(),
        replies_rx,
        metrics.clone(),
    ));
    let relay_drain = CancellationToken::new();
    let relay = tokio::spawn(relay::run(
        store.clone(),
        relay::context(client.clone()),
        config.stream.clone(),
        head_rx,
        published.clone(),
        relay_drain.clone(),
    ));
    let sweeper = tokio::spawn(sweeper::run(
        queue_tx.clone(),
        config.sweep_interval,
        stop.clone(),
    ));
    let intake_result = intake::run(
        client.clone(),
        requests,
        store.clone(),
        queue_tx,
        metrics,
        intake::Options {
            trust_request_info: config.trust_request_info,
            queries_in_flight: config.queries_in_flight,
        },
        stop.clone(),
    )
    .await;
    // One budget for everything that needs NATS from here on: during an
    // outage neither unsubscribing, nor the replies (a reply waits while the
    // client's buffer is full), nor the relay, nor the final flush can
    // finish, and SIGTERM must still end bcp.
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    let _ = sweeper.await;
    match tokio::time::timeout_at(deadline, service.stop()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "service endpoints not stopped cleanly"),
        Err(_) => tracing::warn!("service endpoints not stopped within the drain timeout"),
    }

    // Drain, in data-flow order. The intake has dropped its queue sender, so
    // the writer finishes what is queued and exits, and then the replier.
    tracing::info!("draining: intake closed, waiting for the writer");
    let writer = tokio::task::spawn_blocking(move || writer.join());
    let mut replier = replier;
    if tokio::time::timeout_at(deadline, &mut replier)
        .await
        .is_err()
    {
        tracing::warn!(
            "replies not sent within {:?} (NATS down?); the rest are dropped, producers retry with the same command_id",
            config.drain_timeout
        );
        // Its receiver gone, the writer's sends fail at once and it exits.
        replier.abort();
    }
    let writer_result = writer
        .await
        .map_err(|e| ServeError::Nats(format!("writer task: {e}")))?
        .map_err(|_| ServeError::Nats("writer thread panicked".into()))?;
    relay_drain.cancel();
    match tokio::time::timeout_at(deadline, relay).await {
        Ok(_) => {}
        Err(_) => tracing::warn!(
            "relay did not publish everything within {:?}; the rest is published on next start",
            config.drain_timeout
        ),
    }
    let published_seq = published.load(std::sync::atomic::Ordering::SeqCst);
    let ledger_head = writer_result?;
    store.save_published_seq(published_seq)?;
    let _ = tokio::time::timeout_at(deadline, client.flush()).await;
    tracing::info!(head_seq = ledger_head, published_seq, "bcp serve stopped");
    intake_result
}

async fn connect(config: &ServeConfig, name: &str) -> Result<async_nats::Client, ServeError> {
    let options = config
        .auth
        .options()
        .await
        .map_err(|e| ServeError::Nats(format!("NATS credentials: {e}")))?;
    options
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(&config.nats_url)
        .await
        .map_err(|source| ServeError::Connect {
            url: config.nats_url.clone(),
            source,
        })
}
