//! The outbox relay: publishes committed events to JetStream in seq order,
//! pipelined (up to `RELAY_WINDOW_MAX` acks outstanding, awaited in order),
//! with `Nats-Msg-Id = event_id` and `Nats-Expected-Last-Sequence = seq - 1`,
//! so the stream sequence of every event equals its bcp seq.
//!
//! On every (re)connection it reconciles with the stream's last sequence:
//! that, not a local guess, says where to resume, so a crash between publish
//! and cursor save, a NATS outage or a lost NATS store delays publishing but
//! never loses or duplicates an event.

use crate::domain::envelope::Routing;
use crate::domain::limits::{RELAY_CHUNK_MAX, RELAY_WINDOW_MAX};
use crate::store::Store;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const SEQ_HEADER: &str = "Bcp-Seq";

/// The relay's JetStream context. A publish whose ack has not come within
/// `RELAY_ACK_TIMEOUT` was probably sent to a server that died: the relay
/// then reconciles with the stream and resumes (the client default, 5 s,
/// left publishing stalled that long after every NATS restart).
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .ack_timeout(crate::domain::limits::RELAY_ACK_TIMEOUT)
        .build(client)
}

/// The stream's configuration: file storage, every `bcp.evt.>` subject, and
/// no deletes or purges through NATS: the published audit trail is append-only.
pub fn stream_config(name: &str) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec!["bcp.evt.>".to_owned()],
        storage: stream::StorageType::File,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

/// Publish until `drain` is cancelled and everything committed is published.
pub async fn run(
    store: Store,
    js: jetstream::Context,
    stream_name: String,
    mut head: watch::Receiver<u64>,
    published: Arc<AtomicU64>,
    drain: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match publish_until_drained(&store, &js, &stream_name, &mut head, &published, &drain).await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, published_seq = published.load(Ordering::SeqCst), "relay interrupted; reconciling with the stream");
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

fn head_reached(head: &watch::Receiver<u64>, published: &AtomicU64) -> bool {
    published.load(Ordering::SeqCst) >= *head.borrow()
}

async fn publish_until_drained(
    store: &Store,
    js: &jetstream::Context,
    stream_name: &str,
    head: &mut watch::Receiver<u64>,
    published: &AtomicU64,
    drain: &CancellationToken,
) -> Result<(), String> {
    let mut stream = js
        .get_or_create_stream(stream_config(stream_name))
        .await
        .map_err(|e| format!("stream {stream_name}: {e}"))?;
    let mut last = stream
        .info()
        .await
        .map_err(|e| format!("stream info: {e}"))?
        .state
        .last_sequence;
    let committed = *head.borrow();
    if last > committed {
        return Err(format!(
            "stream {stream_name} holds {last} messages but the log only {committed}: another publisher, or a store from another log"
        ));
    }
    published.store(last, Ordering::SeqCst);
    tracing::info!(
        stream_seq = last,
        head_seq = committed,
        nats_server_version = %js.client().server_info().version,
        "relay connected: publishing from the stream's last sequence"
    );
    loop {
        let target = *head.borrow_and_update();
        while last < target {
            let to = target.min(last + RELAY_CHUNK_MAX as u64);
            let s = store.clone();
            let from = last + 1;
            let chunk = tokio::task::spawn_blocking(move || s.raw_events(from, to))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            last = publish_chunk(js, chunk, published).await?;
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
    published: &AtomicU64,
) -> Result<u64, String> {
    let mut in_flight: VecDeque<(u64, PublishAckFuture)> =
        VecDeque::with_capacity(RELAY_WINDOW_MAX);
    let mut last = published.load(Ordering::SeqCst);
    for (seq, bytes) in chunk {
        let env = Routing::parse(&bytes)
            .map_err(|e| format!("event at seq {seq} does not parse: {e}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(SEQ_HEADER, seq.to_string().as_str());
        let msg = PublishMessage::build()
            .payload(bytes.into())
            .headers(headers)
            .message_id(env.event_id.to_string())
            .expected_last_sequence(seq - 1);
        if in_flight.len() >= RELAY_WINDOW_MAX {
            last = await_ack(in_flight.pop_front().expect("window not empty"), published).await?;
        }
        let ack = js
            .send_publish(env.subject(), msg)
            .await
            .map_err(|e| format!("publish seq {seq}: {e}"))?;
        in_flight.push_back((seq, ack));
    }
    while let Some(f) = in_flight.pop_front() {
        last = await_ack(f, published).await?;
    }
    Ok(last)
}

async fn await_ack(
    (seq, ack): (u64, PublishAckFuture),
    published: &AtomicU64,
) -> Result<u64, String> {
    let ack = ack.await.map_err(|e| format!("ack of seq {seq}: {e}"))?;
    if ack.sequence != seq {
        return Err(format!(
            "seq {seq} was stored at stream sequence {}",
            ack.sequence
        ));
    }
    published.store(seq, Ordering::SeqCst);
    Ok(seq)
}
