//! Replies: where a command's reply goes ([`ReplyTo`]), and sending each
//! committed batch's replies once they may leave ([`send_replies`]: after
//! the durable commit, and in a group after JetStream's ack through the
//! batch, [`ReplyGate`]).

use super::api::Metrics;
use super::writer::Committed;
use crate::domain::Reply;
use async_nats::service::Request;
use async_nats::{Client, Subject};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where a reply goes.
pub enum ReplyTo {
    /// A service request: replying also records its latency in `$SRV.STATS`.
    Request(Box<Request>),
    /// A plain message with a reply subject (the catch-all).
    Subject(Subject),
    /// Fire and forget: the outcome is only logged (and kept for retries).
    Nobody,
}

impl ReplyTo {
    pub(super) fn of_request(r: Request) -> ReplyTo {
        if r.message.reply.is_some() {
            ReplyTo::Request(Box::new(r))
        } else {
            ReplyTo::Nobody
        }
    }

    pub fn is_nobody(&self) -> bool {
        matches!(self, ReplyTo::Nobody)
    }

    pub async fn send(self, client: &Client, reply: &Reply) {
        self.send_bytes(client, reply.to_json().into()).await
    }

    /// Send a reply already serialized (a query's, say).
    pub async fn send_bytes(self, client: &Client, bytes: bytes::Bytes) {
        let sent = match self {
            ReplyTo::Request(r) => r.respond(Ok(bytes)).await,
            ReplyTo::Subject(s) => client.publish(s, bytes).await,
            ReplyTo::Nobody => Ok(()),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "reply not sent");
        }
    }
}

/// Group mode: a reply waits until JetStream has acknowledged the log
/// through its batch, and none leaves once the node is deposed.
pub struct ReplyGate {
    pub published: tokio::sync::watch::Receiver<u64>,
    pub deposed: CancellationToken,
}

/// Send each committed batch's replies; count rejections; log the outcome
/// of commands sent without a reply subject.
pub async fn send_replies(
    client: Client,
    mut batches: mpsc::Receiver<Vec<Committed>>,
    metrics: Arc<Metrics>,
    mut gate: Option<ReplyGate>,
) {
    while let Some(batch) = batches.recv().await {
        if let Some(g) = gate.as_mut() {
            let through = batch.iter().map(|c| c.through).max().unwrap_or(0);
            let acked = tokio::select! {
                r = g.published.wait_for(|p| *p >= through) => r.is_ok(),
                _ = g.deposed.cancelled() => false,
            };
            if !acked || g.deposed.is_cancelled() {
                // Never acknowledged: the producers retry with the same
                // command_id, and the next leader answers.
                tracing::info!(
                    commands = batch.len(),
                    through,
                    "replies withheld: the stream did not acknowledge them before this node stepped down"
                );
                continue;
            }
        }
        let oldest = tracing::enabled!(tracing::Level::TRACE)
            .then(|| batch.iter().map(|c| c.queued).min())
            .flatten();
        if let Some(commit) = batch.first().and_then(|c| c.commit) {
            metrics.prom().batch(batch.len(), commit);
        }
        for c in batch {
            if c.reply.ok && !c.internal {
                metrics.accepted(c.verb.as_str());
            }
            if let Some(err) = &c.reply.error {
                metrics.rejected(c.verb.as_str(), err.code.as_str());
                tracing::debug!(command_id = %c.command_id, verb = %c.verb, code = ?err.code, message = %err.message, "command rejected");
            }
            if c.internal {
                if !c.reply.events.is_empty() {
                    tracing::info!(
                        expired = c.reply.events.len(),
                        first_seq = c.reply.events[0].seq,
                        "retention sweep: expired snapshots"
                    );
                }
            } else if c.reply_to.is_nobody() {
                if c.reply.ok && c.reply.events.is_empty() {
                    tracing::debug!(command_id = %c.command_id, verb = %c.verb, "command without reply subject decided: nothing to do");
                } else {
                    tracing::info!(command_id = %c.command_id, verb = %c.verb, ok = c.reply.ok, events = c.reply.events.len(), "command without reply subject decided");
                }
            }
            if !c.internal {
                // Before the send, so a client that has its reply also
                // finds it counted.
                metrics.prom().answered(c.queued.elapsed());
            }
            c.reply_to.send(&client, &c.reply).await;
        }
        if let Some(t) = oldest {
            tracing::trace!(
                oldest_queued_us = t.elapsed().as_micros() as u64,
                "replies sent"
            );
        }
    }
}
