//! Reading the published log back from JetStream (`--from-nats`,
//! `--against-nats`): every message of the stream in sequence order, each
//! stream sequence checked against the envelope's own `seq`, and each
//! message published as the contract says: on its envelope's subject, with
//! `Nats-Msg-Id` its event id and `Bcp-Seq` its seq (a consumer filtering
//! by subject, or deduplicating by id, reads the log through them).

use super::verify::VerifyError;
use crate::domain::envelope::Routing;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use futures::StreamExt;
use std::time::Duration;

/// A message of the stream: its sequence, how it was published, its payload.
pub struct Published {
    pub seq: u64,
    pub subject: String,
    pub msg_id: Option<String>,
    pub bcp_seq: Option<String>,
    pub payload: Vec<u8>,
}

impl Published {
    /// What differs between how the message was published and how bcp
    /// publishes its payload, if anything. A payload that is not an event
    /// is left to the verification of the events.
    pub fn misrouted(&self) -> Option<String> {
        let route = Routing::parse(&self.payload).ok()?.route();
        let event_id = route.event_id.to_string();
        let seq = self.seq.to_string();
        if self.subject != route.subject {
            Some(format!(
                "published on {}, but its event belongs on {}",
                self.subject, route.subject
            ))
        } else if self.msg_id.as_deref() != Some(event_id.as_str()) {
            Some(format!(
                "its Nats-Msg-Id header is {:?}, not its event id {event_id}",
                self.msg_id
            ))
        } else if self.bcp_seq.as_deref() != Some(seq.as_str()) {
            Some(format!(
                "its Bcp-Seq header is {:?}, not its stream sequence {seq}",
                self.bcp_seq
            ))
        } else {
            None
        }
    }
}

/// The stream's messages 1..=last.
pub async fn fetch(
    client: async_nats::Client,
    stream: &str,
    mut progress: impl FnMut(u64),
) -> Result<Vec<Published>, String> {
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
    while (out.len() as u64) < held && out.last().is_none_or(|m: &Published| m.seq < last) {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| format!("timed out after {} of {last} messages", out.len()))?
            .ok_or("the stream ended early")?
            .map_err(|e| format!("reading the stream: {e}"))?;
        let seq = msg
            .info()
            .map_err(|e| format!("message info: {e}"))?
            .stream_sequence;
        let header = |name: &str| {
            (msg.headers.as_ref())
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        out.push(Published {
            seq,
            subject: msg.subject.to_string(),
            msg_id: header(async_nats::header::NATS_MESSAGE_ID.as_ref()),
            bcp_seq: header(crate::domain::envelope::SEQ_HEADER),
            payload: msg.payload.to_vec(),
        });
        progress(out.len() as u64);
    }
    if let Some(seq) = out.last().map(|m| m.seq).filter(|seq| *seq < last) {
        return Err(format!(
            "stream {stream}'s last sequence is {last}, but its messages after {seq} were removed"
        ));
    }
    Ok(out)
}

/// The payloads as a verifiable sequence: a stream sequence that is not the
/// next one, or a message not published as bcp publishes it, is reported
/// at the seq where it happens.
pub fn in_order(messages: Vec<Published>) -> impl Iterator<Item = Result<Vec<u8>, VerifyError>> {
    messages.into_iter().enumerate().map(|(i, m)| {
        let expected = i as u64 + 1;
        if m.seq != expected {
            return Err(VerifyError::BadEvent {
                seq: expected,
                what: format!("stream holds sequence {} here", m.seq),
            });
        }
        match m.misrouted() {
            Some(what) => Err(VerifyError::BadEvent { seq: m.seq, what }),
            None => Ok(m.payload),
        }
    })
}
