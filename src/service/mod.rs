//! The running control plane: the only async code in bcp.
//!
//! `serve` wires the parts together (DESIGN.md §1): [`api`] registers the
//! NATS service `bcp` and its endpoints; [`intake`] decodes commands and
//! queues them, and answers queries through [`queries`] (redb snapshots);
//! [`writer`] (one thread) decides and commits commands in batches and hands
//! the replies back, and [`reply`] sends them once they may leave; [`relay`]
//! publishes committed events to JetStream in seq order; [`sweeper`] queues
//! retention on a timer; [`shutdown`] turns SIGINT/SIGTERM into an orderly
//! drain. [`lease`] makes this process the
//! stream's one writer, and [`guard`] checks the stream is this log (at
//! start, on every relay reconnection and on a timer) and raises the alarms
//! that stop publishing and commands.

pub mod api;
pub mod batch;
pub mod connect;
pub mod group;
pub mod guard;
pub mod http;
pub mod intake;
pub mod lease;
pub mod queries;
pub mod relay;
pub mod reply;
pub mod shutdown;
pub mod sweeper;
pub mod writer;

use crate::store::{Store, StoreError, ledger::Ledger};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The stream every event is published to.
pub const STREAM: &str = "BCP_EVENTS";
/// Group mode: a leader whose relay could publish nothing for this many
/// lease TTLs while events wait steps down ([`relay::Target::stall`]).
const RELAY_STALL_TTLS: u32 = 3;

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
    /// Group mode: the group's name and this node's (both or neither).
    pub group: Option<String>,
    pub node: Option<String>,
    /// Serve /healthz, /readyz and /metrics here (`--http`).
    pub http: Option<std::net::SocketAddr>,
    /// Idempotency records waiting before a sweep merges them
    /// ([`crate::store::records`]); small only in tests, to sweep often.
    pub records_buffer: usize,
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
    /// This store cannot join the stream as it is (group mode): an
    /// operator must act; nothing was changed.
    #[error("{0}")]
    Refused(String),
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

/// What every part of a running bcp shares.
pub(crate) struct Node {
    pub config: ServeConfig,
    pub store: Store,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub alarms: Arc<guard::Alarms>,
    pub metrics: Arc<api::Metrics>,
    pub service: async_nats::service::Service,
    /// The log's head in this store.
    pub head: watch::Sender<u64>,
    /// The last seq JetStream acknowledged (a follower: what it applied).
    pub published: watch::Sender<u64>,
    pub role: watch::Sender<api::Role>,
    pub holder: lease::Holder,
    /// The lease this process holds now, if any (for `bcp.status`).
    pub lease: watch::Sender<Option<lease::Renewed>>,
    /// Set at the first call after `stop`: one drain budget for everything
    /// that needs NATS from then on.
    drain_deadline: std::sync::OnceLock<tokio::time::Instant>,
    /// Group mode: set when a term ended because its relay could publish
    /// nothing ([`relay::Target::stall`]): the next follower phase leaves
    /// the lease to the other nodes for a while.
    pub stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl Node {
    /// The deadline of the final drain (`drain_timeout` from its start).
    fn drain_deadline(&self) -> tokio::time::Instant {
        *self
            .drain_deadline
            .get_or_init(|| tokio::time::Instant::now() + self.config.drain_timeout)
    }
}

/// Run until `stop` is cancelled, then drain: stop taking commands, finish
/// the batch in hand, let the relay publish what was committed, give the
/// writer lease up. Without `--group`, this process is the stream's one
/// writer for its whole life; with it, see [`group`].
pub async fn serve(config: ServeConfig, stop: CancellationToken) -> Result<(), ServeError> {
    let store = Store::open_or_create(&config.db)?;
    store.set_records_buffer(config.records_buffer);
    // Single mode refuses a store whose projections are not at its log's
    // head before connecting; a group node opens it after reconciling.
    let ledger = match config.group {
        None => Some(Ledger::open(store.clone())?),
        Some(_) => None,
    };
    let head = store.head_seq()?;
    // One connection for requests, replies and the relay. A second one for
    // the relay was tried (`bench --e2e-only`): no difference beyond the
    // run-to-run spread of this machine's fsyncs (8-14 k commands/s).
    let client = connect(&config, "bcp serve").await?;
    let js = relay::context(client.clone());
    let alarms = Arc::new(guard::Alarms::default());
    let (holder, lease, role) = match (&config.group, &config.node) {
        (Some(g), Some(n)) => (
            lease::Holder::node(g, n, &config.db),
            None,
            api::Role::Follower,
        ),
        _ => {
            // Before any endpoint exists: this process is the stream's one
            // writer, and its store is not behind the stream.
            let Some(lease) = take_the_stream(&config, &store, &js, head, &alarms, &stop).await?
            else {
                return Ok(()); // stopped while waiting for NATS
            };
            // Before the first command: a group node started on this store
            // later must not take what this process acknowledges, and the
            // stream does not have yet, for a tail it may drop.
            store.mark_served_single()?;
            (lease.holder().clone(), Some(lease), api::Role::Single)
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        db = %config.db.display(),
        nats = %config.nats_url,
        stream = %config.stream,
        group = config.group.as_deref().unwrap_or("-"),
        node = config.node.as_deref().unwrap_or("-"),
        head_seq = head,
        "bcp serve started"
    );

    let (head_tx, head_rx) = watch::channel(head);
    let (published_tx, published_rx) = watch::channel(0);
    let (role_tx, role_rx) = watch::channel(role);
    let (lease_tx, lease_rx) = watch::channel(None);
    let http_role = role_rx.clone();
    let metrics = api::Metrics::new(
        head_rx,
        published_rx,
        alarms.clone(),
        store.fsync_seconds().clone(),
    );
    let service = api::start(&client, metrics.clone())
        .await
        .map_err(ServeError::Nats)?;
    let status = tokio::spawn(api::answer_status(
        client.clone(),
        api::StatusSource {
            store: store.clone(),
            metrics: metrics.clone(),
            db: config.db.display().to_string(),
            stream: config.stream.clone(),
            holder: holder.clone(),
            group: config.group.clone(),
            node: config.node.clone(),
            role: role_rx,
            lease: lease_rx,
        },
        stop.clone(),
    ));
    let http = match config.http {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Nats(format!("--http {addr}: {e}")))?;
            tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
            Some(tokio::spawn(http::serve(
                listener,
                http::HttpState {
                    metrics: metrics.clone(),
                    client: client.clone(),
                    role: http_role,
                },
                stop.clone(),
            )))
        }
    };
    let node = Node {
        config,
        store,
        client,
        js,
        alarms,
        metrics,
        service,
        head: head_tx,
        published: published_tx,
        role: role_tx,
        holder,
        lease: lease_tx,
        drain_deadline: std::sync::OnceLock::new(),
        stalled: Arc::default(),
    };
    let result = match (ledger, lease) {
        (Some(ledger), Some(lease)) => term(&node, ledger, lease, &stop).await.map(|_| ()),
        _ => group::run(&node, &stop).await,
    };
    // An error (a store a group refuses, say) ends the process as a signal
    // would: whatever runs until the stop (the queries' intake, the status
    // reply) stops, and the error is the exit's reason.
    stop.cancel();
    let deadline = node.drain_deadline();
    let _ = status.await;
    if let Some(http) = http {
        let _ = tokio::time::timeout_at(deadline, http).await;
    }
    match tokio::time::timeout_at(deadline, node.service.stop()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "service endpoints not stopped cleanly"),
        Err(_) => tracing::warn!("service endpoints not stopped within the drain timeout"),
    }
    let _ = tokio::time::timeout_at(deadline, node.client.flush()).await;
    // A clean close: the job rows held behind are written, so the next open
    // and the audit tools find the rows current (else the next open folds
    // them from the log's tail).
    let store = node.store.clone();
    match tokio::task::spawn_blocking(move || store.checkpoint()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "job rows not checkpointed; the next open catches them up")
        }
        Err(e) => tracing::warn!(error = %e, "checkpoint task failed"),
    }
    tracing::info!(
        head_seq = *node.head.borrow(),
        published_seq = *node.published.borrow(),
        "bcp serve stopped"
    );
    result
}

/// How a term ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TermEnd {
    /// `stop`: the process drains and exits.
    Stopped,
    /// Group mode: the lease was lost or the stream fenced a publish.
    Deposed,
}

/// One writer's term: this process takes commands (single mode: all its
/// life; a group leader: while it holds the lease and the stream takes its
/// publishes). Then drain: stop taking commands, finish the batch in hand,
/// let the relay publish what was committed, give the lease up.
pub(crate) async fn term(
    node: &Node,
    ledger: Ledger,
    lease: lease::Lease,
    stop: &CancellationToken,
) -> Result<TermEnd, ServeError> {
    let group = node.config.group.is_some();
    let config = &node.config;
    // `end` ends the term: on `stop`, or when deposed.
    let end = stop.child_token();
    // Group mode: cancelled when this node stops leading (the lease lost,
    // a publish fenced, or the term ending for any reason): from then on
    // the relay publishes nothing and no reply leaves that JetStream had
    // not acknowledged; the next leader answers the retries.
    let deposed = CancellationToken::new();
    // How long the lease is held (renewed): the term, and in a group that
    // stops (SIGTERM) also its drain, so that what it committed is
    // published, and its replies sent, while no other node may lead.
    let lease_end = match group {
        true => CancellationToken::new(),
        false => end.clone(),
    };
    let depose = {
        let (deposed, end, lease_end) = (deposed.clone(), end.clone(), lease_end.clone());
        let stopping = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = deposed.cancelled() => {
                    end.cancel();
                    lease_end.cancel();
                }
                _ = end.cancelled() => if group && !stopping.is_cancelled() {
                    deposed.cancel();
                    lease_end.cancel();
                },
            }
        })
    };
    let kinds: Vec<api::Kind> = match group {
        // Followers answer queries too: a group's query endpoints live as
        // long as the process (see `group`).
        true => api::command_kinds().collect(),
        false => api::all_kinds().collect(),
    };
    let requests = api::endpoints(&node.service, kinds.into_iter())
        .await
        .map_err(ServeError::Nats)?;
    let (queue_tx, queue_rx) = mpsc::channel(crate::domain::limits::INTAKE_QUEUE_MAX);
    node.metrics.set_queue(Some(queue_tx.downgrade()));
    let (replies_tx, replies_rx) = mpsc::channel(64);
    let on_loss = match group {
        true => lease::OnLoss::Depose(deposed.clone()),
        false => lease::OnLoss::Alarm(node.alarms.clone()),
    };
    node.lease.send_replace(Some(lease.renewed()));
    let lease = tokio::spawn(lease::hold(lease, on_loss, lease_end.clone()));
    // The stream check wakes the relay when the stream lost what it published.
    let lost = Arc::new(tokio::sync::Notify::new());
    let watcher = tokio::spawn(guard::watch(
        guard::Watched {
            store: node.store.clone(),
            js: node.js.clone(),
            stream: config.stream.clone(),
            alarms: node.alarms.clone(),
            fence: group.then(|| deposed.clone()),
            published: node.published.subscribe(),
            lost: lost.clone(),
        },
        node.head.subscribe(),
        config.stream_check_interval,
        end.clone(),
    ));
    // This term's committed events, from the commit thread to the relay.
    let outbox = relay::Outbox::default();
    // A storage failure that needs a restart stops the whole process.
    let writer = writer::spawn(
        ledger,
        queue_rx,
        replies_tx,
        node.head.clone(),
        outbox.clone(),
        stop.clone(),
        group.then(|| node.published.subscribe()),
    );
    let gate = group.then(|| reply::ReplyGate {
        published: node.published.subscribe(),
        deposed: deposed.clone(),
    });
    let replier = tokio::spawn(reply::send_replies(
        node.client.clone(),
        replies_rx,
        node.metrics.clone(),
        gate,
    ));
    let relay_drain = CancellationToken::new();
    let mut relay = tokio::spawn(relay::run(
        node.store.clone(),
        outbox,
        relay::Target {
            js: node.js.clone(),
            stream: config.stream.clone(),
            replicas: config.stream_replicas,
            alarms: node.alarms.clone(),
            fence: group.then(|| deposed.clone()),
            lost,
            stall: group.then(|| (RELAY_STALL_TTLS * config.lease_ttl, node.stalled.clone())),
        },
        node.head.subscribe(),
        node.published.clone(),
        relay_drain.clone(),
    ));
    let sweeper = tokio::spawn(sweeper::run(
        queue_tx.clone(),
        node.alarms.clone(),
        config.sweep_interval,
        end.clone(),
    ));
    let intake_result = intake::run(
        node.client.clone(),
        requests,
        node.store.clone(),
        queue_tx,
        node.metrics.clone(),
        intake::Options {
            trust_request_info: config.trust_request_info,
            queries_in_flight: config.queries_in_flight,
            alarms: node.alarms.clone(),
            catch_all: !group,
            // A group's queries are answered by its own intake (`group`).
            acked: None,
        },
        end.clone(),
    )
    .await;
    end.cancel();
    // One budget for everything that needs NATS from here on: during an
    // outage neither the replies (a reply waits while the client's buffer
    // is full), nor the relay, nor the final flush can finish, and SIGTERM
    // must still end bcp.
    let deadline = match stop.is_cancelled() {
        true => node.drain_deadline(),
        false => tokio::time::Instant::now() + config.drain_timeout,
    };
    // A group stopping is not deposed here: its drain publishes what it
    // committed (a lease lost meanwhile deposes it through `lease::hold`).
    let _ = depose.await;
    if deposed.is_cancelled() {
        // Another node writes (or is about to write) the stream: publish
        // nothing more.
        relay.abort();
    }
    let _ = sweeper.await;
    let _ = watcher.await;

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
    if !deposed.is_cancelled() && tokio::time::timeout_at(deadline, &mut relay).await.is_err() {
        // Stopped here, not left running: nothing publishes or settles
        // acks once the term is over.
        relay.abort();
        tracing::warn!(
            "relay did not publish everything within {:?}; the rest is published on next start",
            config.drain_timeout
        );
    }
    // A group's drain is over: nothing more is published or answered
    // (a reply still waiting for its ack is withheld), then the lease goes.
    deposed.cancel();
    lease_end.cancel();
    node.metrics.set_queue(None);
    let ledger_head = writer_result?;
    if group {
        // What JetStream acknowledged of this term: never dropped later as
        // "never acknowledged" (`group::reconcile`).
        let (store, acked) = (node.store.clone(), *node.published.borrow());
        let noted = tokio::task::spawn_blocking(move || store.note_acknowledged(acked))
            .await
            .map_err(|e| e.to_string())
            .and_then(|noted| noted.map_err(|e| e.to_string()));
        if let Err(e) = noted {
            // A lower mark only weakens that check; nothing else reads it.
            tracing::warn!(error = %e, "could not note how far the stream acknowledged this term");
        }
    }
    let lease = lease
        .await
        .map_err(|e| ServeError::Nats(format!("lease task: {e}")))?;
    node.lease.send_replace(None);
    if !stop.is_cancelled() {
        tracing::warn!(head_seq = ledger_head, "term ended: deposed");
        return Ok(TermEnd::Deposed);
    }
    if group {
        tracing::info!(head_seq = ledger_head, "term ended: stopping");
    }
    // Nothing more is published: the next writer need not wait for the TTL.
    let _ = tokio::time::timeout_at(deadline, lease.release()).await;
    intake_result.map(|()| TermEnd::Stopped)
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
    let waiting = format!("{} (before taking commands)", config.nats_url);
    let me = lease::Holder::me(&config.db);
    let taken = until_nats(stop, &waiting, || async {
        let attempt = lease::acquire(
            js,
            &config.stream,
            me.clone(),
            config.lease_ttl,
            config.stream_replicas,
        );
        match attempt.await {
            Err(lease::LeaseError::Nats(e)) => Err(e),
            answer => Ok(answer),
        }
    })
    .await;
    let lease = match taken {
        None => return Ok(None),
        Some(taken) => taken?,
    };
    let inspected = until_nats(stop, &waiting, || {
        guard::inspect(
            store,
            js,
            &config.stream,
            || head,
            alarms,
            guard::Behind::Refusal,
        )
    })
    .await;
    match inspected {
        None => {
            lease.release().await;
            Ok(None)
        }
        Some(guard::Inspection::Checked(guard::Verdict::Behind { head, stream_last })) => {
            lease.release().await;
            Err(ServeError::Behind {
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
            })
        }
        Some(_) => Ok(Some(lease)),
    }
}

/// Run `attempt` until it answers, waiting out NATS failures (its `Err`:
/// logged once at WARN, naming `what` waits; retried every second).
/// `None` on `stop`.
pub(crate) async fn until_nats<T, E, F>(
    stop: &CancellationToken,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut told = false;
    loop {
        match stop.run_until_cancelled(attempt()).await? {
            Ok(answer) => return Some(answer),
            Err(e) if !told => {
                tracing::warn!(error = %e, "{what}: waiting for NATS JetStream");
                told = true;
            }
            Err(_) => {}
        }
        stop.run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
            .await?;
    }
}

async fn connect(config: &ServeConfig, name: &str) -> Result<async_nats::Client, ServeError> {
    let options = config
        .auth
        .options()
        .await
        .map_err(|e| ServeError::Nats(format!("NATS credentials: {e}")))?;
    let url = config.nats_url.clone();
    options
        .name(name)
        // The client logs its own events at INFO; losing NATS (or being
        // told of a slow consumer, which drops messages) is an operator's
        // business: WARN, naming the server.
        .event_callback(move |event| {
            let url = url.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(nats = %url, "connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(nats = %url, "NATS connection lost; reconnecting")
                    }
                    async_nats::Event::SlowConsumer(sid) => tracing::warn!(
                        nats = %url,
                        subscription = sid,
                        "slow consumer: NATS dropped messages for bcp (producers retry what got no reply)"
                    ),
                    other => tracing::info!(nats = %url, event = %other, "NATS"),
                }
            }
        })
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // A cluster's URLs, comma-separated: the client fails over between them.
        .connect(
            config
                .nats_url
                .split(',')
                .map(str::trim)
                .collect::<Vec<_>>(),
        )
        .await
        .map_err(|source| ServeError::Connect {
            url: config.nats_url.clone(),
            source,
        })
}
