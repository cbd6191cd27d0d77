//! The outbox relay: publishes committed events to JetStream in seq order,
//! pipelined (up to `RELAY_WINDOW_MAX` acks outstanding, awaited in order),
//! with `Nats-Msg-Id = event_id` and `Nats-Expected-Last-Sequence = seq - 1`,
//! so the stream sequence of every event equals its bcp seq. Every publish
//! but the first after a check also carries `Nats-Expected-Last-Msg-Id` =
//! the previous event's id: the sequence alone checks a position, not what
//! stands there, so once a foreign message took seq K, the pipelined
//! publishes of K+1… would each find "last sequence K" and be stored after
//! it. With the id, every publish after a foreign message is refused.
//!
//! On every (re)connection it checks the stream against the log
//! ([`super::guard::inspect`]) and resumes after the stream's last sequence,
//! so a crash, a NATS outage or a lost NATS store delays publishing but never
//! loses or duplicates an event. While any alarm is raised (the stream is not
//! this log, its settings drifted, another process holds the writer lease)
//! it publishes nothing, and checks again until the cause is gone.

use super::guard::{self, Alarms, Inspection, Verdict};
use crate::domain::envelope::Routing;
use crate::domain::limits::{RELAY_CHUNK_MAX, RELAY_WINDOW_MAX};
use crate::store::Store;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const SEQ_HEADER: &str = "Bcp-Seq";

/// bcp's JetStream context (the relay, the stream check, the lease). An
/// ack or an API answer that has not come within `RELAY_ACK_TIMEOUT` was
/// probably asked of a server that died: the caller reconciles and
/// resumes (the client defaults, 5 s for awaited acks and 10 s for API
/// requests, left publishing and SIGTERM stalled that long after every
/// NATS restart). `ack_timeout` bounds acks never awaited, `timeout` the
/// awaited ones and the API requests.
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .ack_timeout(crate::domain::limits::RELAY_ACK_TIMEOUT)
        .timeout(crate::domain::limits::RELAY_ACK_TIMEOUT)
        .build(client)
}

/// Where the relay publishes: the stream, its replicas, and the alarms that
/// stop it.
pub struct Target {
    pub js: jetstream::Context,
    pub stream: String,
    pub replicas: usize,
    pub alarms: Arc<Alarms>,
    /// Group mode: cancelled when the stream shows another writer (a
    /// publish fenced by `Nats-Expected-Last-Sequence`, or a stream that
    /// is not this log): this node is no longer the leader.
    pub fence: Option<CancellationToken>,
}

/// Why publishing stopped.
enum Interrupted {
    /// NATS failed (an outage, a timeout): reconcile and resume.
    Nats(String),
    /// An alarm is raised: publish nothing until it clears.
    Halted,
    /// Group mode: another node writes the stream; stop for good.
    Fenced,
}

impl From<String> for Interrupted {
    fn from(e: String) -> Self {
        Interrupted::Nats(e)
    }
}

/// Publish until `drain` is cancelled and everything committed is published.
pub async fn run(
    store: Store,
    target: Target,
    mut head: watch::Receiver<u64>,
    published: watch::Sender<u64>,
    drain: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match publish_until_drained(&store, &target, &mut head, &published, &drain, &mut backoff)
            .await
        {
            Ok(()) => return,
            Err(e) => {
                match e {
                    Interrupted::Nats(e) => {
                        tracing::warn!(error = %e, published_seq = *published.borrow(), "relay interrupted; reconciling with the stream")
                    }
                    // The alarm says why, rate-limited.
                    Interrupted::Halted if drain.is_cancelled() => return,
                    Interrupted::Fenced => return,
                    Interrupted::Halted => {}
                }
                if drain.is_cancelled() && head_reached(&head, &published) {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = drain.cancelled(), if !drain.is_cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn head_reached(head: &watch::Receiver<u64>, published: &watch::Sender<u64>) -> bool {
    *published.borrow() >= *head.borrow()
}

async fn publish_until_drained(
    store: &Store,
    target: &Target,
    head: &mut watch::Receiver<u64>,
    published: &watch::Sender<u64>,
    drain: &CancellationToken,
    backoff: &mut Duration,
) -> Result<(), Interrupted> {
    let Target {
        js,
        stream: stream_name,
        replicas,
        alarms,
        fence,
    } = target;
    js.get_or_create_stream(guard::stream_config(stream_name, *replicas))
        .await
        .map_err(|e| format!("stream {stream_name}: {e}"))?;
    let committed = *head.borrow();
    let inspection = guard::inspect(store, js, stream_name, || committed, alarms).await?;
    let Inspection::Checked(Verdict::InStep { last }) = inspection else {
        return Err(fenced(fence));
    };
    if alarms.refusal().is_some() {
        return Err(Interrupted::Halted);
    }
    let mut last = last;
    *backoff = Duration::from_millis(100);
    // The first publish is checked by the sequence alone: the check above
    // found the stream's last message to be the log's event at `last`.
    let mut prev_id: Option<String> = None;
    published.send_replace(last);
    tracing::info!(
        stream_seq = last,
        head_seq = committed,
        nats_server_version = %js.client().server_info().version,
        "relay connected: the stream is this log; publishing from its last sequence"
    );
    loop {
        let target = *head.borrow_and_update();
        while last < target {
            if alarms.refusal().is_some() {
                return Err(Interrupted::Halted);
            }
            let to = target.min(last + RELAY_CHUNK_MAX as u64);
            let s = store.clone();
            let from = last + 1;
            let chunk = tokio::task::spawn_blocking(move || s.raw_events(from, to))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            last = publish_chunk(js, chunk, published, &mut prev_id, alarms, fence)
                .await
                .map_err(|e| match e {
                    Publish::Fenced(_) if fence.is_some() => fenced(fence),
                    Publish::Halted => Interrupted::Halted,
                    e => Interrupted::Nats(e.to_string()),
                })?;
        }
        if drain.is_cancelled() {
            return Ok(());
        }
        tokio::select! {
            changed = head.changed() => if changed.is_err() {
                // The writer is gone: the head read above is final and is
                // published. Wait for the drain (not `changed()` again: it
                // would return at once, forever, and spin a core).
                drain.cancelled().await;
            },
            _ = drain.cancelled() => {}
        }
    }
}

/// Publish a chunk with a window of acks in flight; returns the last seq
/// acknowledged in place.
async fn publish_chunk(
    js: &jetstream::Context,
    chunk: Vec<(u64, Vec<u8>)>,
    published: &watch::Sender<u64>,
    prev_id: &mut Option<String>,
    alarms: &Alarms,
    fence: &Option<CancellationToken>,
) -> Result<u64, Publish> {
    let mut in_flight: VecDeque<(u64, PublishAckFuture)> =
        VecDeque::with_capacity(RELAY_WINDOW_MAX);
    let mut last = *published.borrow();
    for (seq, bytes) in chunk {
        if fence.as_ref().is_some_and(CancellationToken::is_cancelled) {
            return Err(Publish::Fenced("this node stepped down".into()));
        }
        if alarms.any() {
            return Err(Publish::Halted);
        }
        let env = Routing::parse(&bytes)
            .map_err(|e| Publish::Failed(format!("event at seq {seq} does not parse: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(SEQ_HEADER, seq.to_string().as_str());
        let event_id = env.event_id.to_string();
        let mut msg = PublishMessage::build()
            .payload(bytes.into())
            .headers(headers)
            .message_id(&event_id)
            .expected_last_sequence(seq - 1);
        if let Some(prev) = prev_id.replace(event_id) {
            msg = msg.expected_last_message_id(prev);
        }
        if in_flight.len() >= RELAY_WINDOW_MAX {
            last = await_ack(in_flight.pop_front().expect("window not empty"), published).await?;
        }
        let ack = js
            .send_publish(env.subject(), msg)
            .await
            .map_err(|e| Publish::Failed(format!("publish seq {seq}: {e}")))?;
        in_flight.push_back((seq, ack));
    }
    while let Some(f) = in_flight.pop_front() {
        last = await_ack(f, published).await?;
    }
    Ok(last)
}

async fn await_ack(
    (seq, ack): (u64, PublishAckFuture),
    published: &watch::Sender<u64>,
) -> Result<u64, Publish> {
    let ack = ack.await.map_err(|e| {
        let what = format!("ack of seq {seq}: {e}");
        // A wrong last sequence is another writer's doing. A wrong last
        // message id may also be JetStream's forgetting: it remembers the
        // last id only within its duplicate window across a restart; the
        // reconnection's check tells a foreign message apart.
        if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
            Publish::Fenced(what)
        } else {
            Publish::Failed(what)
        }
    })?;
    if ack.sequence != seq {
        return Err(Publish::Failed(format!(
            "seq {seq} was stored at stream sequence {}",
            ack.sequence
        )));
    }
    published.send_replace(seq);
    Ok(seq)
}

/// Why a publish failed.
enum Publish {
    /// The stream's last sequence was not `seq - 1`: someone else wrote it.
    Fenced(String),
    Failed(String),
    /// An alarm was raised: stop before the next publish.
    Halted,
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Publish::Fenced(e) | Publish::Failed(e) => f.write_str(e),
            Publish::Halted => f.write_str("an alarm was raised"),
        }
    }
}

/// What a stream that is not (or no longer) this log's continuation means:
/// in single mode an alarm (raised by the check), in group mode the end of
/// this node's leadership.
fn fenced(fence: &Option<CancellationToken>) -> Interrupted {
    match fence {
        Some(f) => {
            f.cancel();
            Interrupted::Fenced
        }
        None => Interrupted::Halted,
    }
}
