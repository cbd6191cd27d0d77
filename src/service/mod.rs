//! The running control plane: the only async code in bcp.
//!
//! `serve` wires the parts together (DESIGN.md §1): [`api`] registers the
//! NATS service `bcp` and its endpoints; [`intake`] decodes commands and
//! queues them, and answers queries through [`queries`] (redb snapshots);
//! [`writer`] (one thread) decides and commits commands in batches and hands
//! the replies back; [`relay`] publishes committed events to JetStream in
//! seq order; [`sweeper`] queues retention on a timer; [`shutdown`] turns
//! SIGINT/SIGTERM into an orderly drain. [`lease`] makes this process the
//! stream's one writer, and [`guard`] checks the stream is this log (at
//! start, on every relay reconnection and on a timer) and raises the alarms
//! that stop publishing and commands.

pub mod api;
pub mod connect;
pub mod guard;
pub mod intake;
pub mod lease;
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
    /// Replicas of the stream (and of the lease bucket) when bcp creates them.
    pub stream_replicas: usize,
    /// How often the stream's settings and last message are checked.
    pub stream_check_interval: Duration,
    /// How long the writer lease lives without renewal.
    pub lease_ttl: Duration,
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
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    /// The stream goes on past this store's head: the store is empty or
    /// stale and must not take commands.
    #[error(
        "the stream {stream} holds this log up to seq {stream_last}, but the store {db} only up to seq {head}: it is {what}. It must not take commands. Rebuild a store from the stream and serve that one:\n  bcp import --db NEW.redb --from-nats {nats}\n  bcp serve --db NEW.redb --nats {nats}\n(or point --db at the store that wrote the stream)"
    )]
    Behind {
        stream: String,
        stream_last: u64,
        db: String,
        head: u64,
        what: &'static str,
        nats: String,
    },
}

/// Run until `stop` is cancelled, then drain: stop taking commands, finish
/// the batch in hand, let the relay publish what was committed, save the
/// relay cursor, give the writer lease up.
pub async fn serve(config: ServeConfig, stop: CancellationToken) -> Result<(), ServeError> {
    let store = Store::open_or_create(&config.db)?;
    let ledger = Ledger::open(store.clone())?;
    let head = ledger.head_seq();
    // One connection for requests, replies and the relay. A second one for
    // the relay was tried (`bench --e2e-only`): no difference beyond the
    // run-to-run spread of this machine's fsyncs (8-14 k commands/s).
    let client = connect(&config, "bcp serve").await?;
    let js = relay::context(client.clone());
    let alarms = Arc::new(guard::Alarms::default());
    // Before any endpoint exists: this process is the stream's one writer,
    // and its store is not behind the stream.
    let Some(lease) = take_the_stream(&config, &store, &js, head, &alarms, &stop).await? else {
        return Ok(()); // stopped while waiting for NATS
    };
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

    let metrics = api::Metrics::new(head_rx.clone(), published.clone(), alarms.clone());
    let (service, requests) = api::start(&client, metrics.clone())
        .await
        .map_err(ServeError::Nats)?;
    let status = tokio::spawn(api::answer_status(
        client.clone(),
        api::StatusSource {
            store: store.clone(),
            metrics: metrics.clone(),
            db: config.db.display().to_string(),
            stream: config.stream.clone(),
            writer: lease.holder().clone(),
        },
        stop.clone(),
    ));
    let lease = tokio::spawn(lease::hold(lease, alarms.clone(), stop.clone()));
    let watcher = tokio::spawn(guard::watch(
        store.clone(),
        js.clone(),
        config.stream.clone(),
        head_rx.clone(),
        alarms.clone(),
        config.stream_check_interval,
        stop.clone(),
    ));

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
        relay::Target {
            js,
            stream: config.stream.clone(),
            replicas: config.stream_replicas,
            alarms: alarms.clone(),
        },
        head_rx,
        published.clone(),
        relay_drain.clone(),
    ));
    let sweeper = tokio::spawn(sweeper::run(
        queue_tx.clone(),
        alarms.clone(),
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
            alarms,
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
    let _ = watcher.await;
    let _ = status.await;
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
    if let Ok(lease) = lease.await {
        let _ = tokio::time::timeout_at(deadline, lease.release()).await;
    }
    let _ = tokio::time::timeout_at(deadline, client.flush()).await;
    tracing::info!(head_seq = ledger_head, published_seq, "bcp serve stopped");
    intake_result
}

/// Take the writer lease and check the stream against the store, waiting
/// for NATS (a store may be started before its NATS server). `None` when
/// `stop` came first. A store behind the stream is refused (and the lease
/// given back); any other difference is an alarm: bcp runs, answers
/// queries and status, and takes no commands until the cause is gone.
async fn take_the_stream(
    config: &ServeConfig,
    store: &Store,
    js: &async_nats::jetstream::Context,
    head: u64,
    alarms: &guard::Alarms,
    stop: &CancellationToken,
) -> Result<Option<lease::Lease>, ServeError> {
    let mut told = false;
    let mut wait = |e: String| {
        if !told {
            tracing::warn!(nats = %config.nats_url, error = %e, "waiting for NATS JetStream before taking commands");
            told = true;
        }
    };
    let me = lease::Holder::me(&config.db);
    let lease = loop {
        let attempt = lease::acquire(
            js,
            &config.stream,
            me.clone(),
            config.lease_ttl,
            config.stream_replicas,
        );
        match stop.run_until_cancelled(attempt).await {
            None => return Ok(None),
            Some(Ok(lease)) => break lease,
            Some(Err(lease::LeaseError::Nats(e))) => wait(e),
            Some(Err(held)) => return Err(held.into()),
        }
        if stop
            .run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
            .await
            .is_none()
        {
            return Ok(None);
        }
    };
    loop {
        let inspection = guard::inspect(store, js, &config.stream, head, alarms);
        match stop.run_until_cancelled(inspection).await {
            None => {
                lease.release().await;
                return Ok(None);
            }
            Some(Ok(guard::Inspection::Checked(guard::Verdict::Behind { head, stream_last }))) => {
                lease.release().await;
                alarms.clear(guard::AlarmKind::Fork);
                return Err(ServeError::Behind {
                    stream: config.stream.clone(),
                    stream_last,
                    db: config.db.display().to_string(),
                    head,
                    what: if head == 0 {
                        "empty (a new file: a lost store, a wrong --db?)"
                    } else {
                        "stale (an older copy of this log?)"
                    },
                    nats: config.nats_url.clone(),
                });
            }
            Some(Ok(_)) => return Ok(Some(lease)),
            Some(Err(e)) => wait(e),
        }
        if stop
            .run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
            .await
            .is_none()
        {
            lease.release().await;
            return Ok(None);
        }
    }
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
