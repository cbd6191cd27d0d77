//! Reading the published log back from JetStream (`--from-nats`,
//! `--against-nats`): every message of the stream in sequence order, each
//! stream sequence checked against the envelope's own `seq`.

use super::verify::VerifyError;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use futures::StreamExt;
use std::time::Duration;

/// The stream's messages 1..=last as (stream sequence, payload).
pub async fn fetch(
    client: async_nats::Client,
    stream: &str,
    mut progress: impl FnMut(u64),
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let js = jetstream::new(client);
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    let info = s.info().await.map_err(|e| format!("stream info: {e}"))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let held = info.state.messages;
    if last == 0 {
        return Ok(Vec::new());
    }
    if first != 1 {
        return Err(format!(
            "stream {stream} starts at sequence {first}, not 1: its head was removed"
        ));
    }
    let consumer = s
        .create_consumer(OrderedConfig::default())
        .await
        .map_err(|e| format!("consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("consumer: {e}"))?;
    let mut out = Vec::with_capacity(last as usize);
    // The messages the stream holds, not `last` of them: a message deleted
    // inside the stream is then a gap [`in_order`] names, not a wait for
    // one that never comes (and one deleted at its end is named below).
    while (out.len() as u64) < held && out.last().is_none_or(|(seq, _)| *seq < last) {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| format!("timed out after {} of {last} messages", out.len()))?
            .ok_or("the stream ended early")?
            .map_err(|e| format!("reading the stream: {e}"))?;
        let seq = msg
            .info()
            .map_err(|e| format!("message info: {e}"))?
            .stream_sequence;
        out.push((seq, msg.payload.to_vec()));
        progress(out.len() as u64);
    }
    if let Some((seq, _)) = out.last().filter(|(seq, _)| *seq < last) {
        return Err(format!(
            "stream {stream}'s last sequence is {last}, but its messages after {seq} were removed"
        ));
    }
    Ok(out)
}

/// The payloads as a verifiable sequence: a stream sequence that is not the
/// next one is reported at the seq where it happens.
pub fn in_order(
    messages: Vec<(u64, Vec<u8>)>,
) -> impl Iterator<Item = Result<Vec<u8>, VerifyError>> {
    messages.into_iter().enumerate().map(|(i, (seq, bytes))| {
        let expected = i as u64 + 1;
        if seq == expected {
            Ok(bytes)
        } else {
            Err(VerifyError::BadEvent {
                seq: expected,
                what: format!("stream holds sequence {seq} here"),
            })
        }
    })
}
