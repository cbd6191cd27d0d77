//! NATS intake: requests on `bcp.cmd.<project>.<verb>` are decoded and
//! validated here and queued for the writer. Bad input is answered
//! `bad_request` at once and never reaches the writer; a full queue is
//! answered `unavailable` at once, never an unbounded wait.

use super::ServeError;
use super::writer::{Committed, WriteRequest};
use crate::domain::command::decode;
use crate::domain::{ErrorCode, Reply};
use crate::store::ledger::Pending;
use async_nats::{Client, Subject};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

pub const SUBJECT: &str = "bcp.cmd.>";
pub const ACTOR_HEADER: &str = "Bcp-Actor";

async fn answer(client: &Client, reply_to: Option<Subject>, reply: &Reply) {
    if let Some(to) = reply_to
        && let Err(e) = client.publish(to, reply.to_json().into()).await
    {
        tracing::warn!(error = %e, "reply not sent");
    }
}

/// Take commands until `stop`; dropping `queue` on return lets the writer
/// drain and exit.
pub async fn run(
    client: Client,
    queue: mpsc::Sender<WriteRequest>,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let mut sub = client
        .subscribe(SUBJECT)
        .await
        .map_err(|e| ServeError::Nats(e.to_string()))?;
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => break },
            _ = stop.cancelled() => break,
        };
        let mut parts = msg.subject.split('.').skip(2);
        let (project, verb) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let header_actor = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(ACTOR_HEADER))
            .map(|v| v.as_str());
        let decoded = if parts.next().is_some() {
            Err(crate::domain::command::DecodeError(format!(
                "subject {} is not bcp.cmd.<project>.<verb>",
                msg.subject
            )))
        } else {
            decode(project, verb, &msg.payload, header_actor)
        };
        let cmd = match decoded {
            Ok(cmd) => cmd,
            Err(e) => {
                tracing::debug!(subject = %msg.subject, error = %e, "bad_request");
                answer(
                    &client,
                    msg.reply,
                    &Reply::error(ErrorCode::BadRequest, e.0),
                )
                .await;
                continue;
            }
        };
        let request = WriteRequest {
            pending: Pending::new(cmd),
            reply_to: msg.reply,
        };
        match queue.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(r)) => {
                tracing::warn!(command_id = %r.pending.cmd.command_id, "intake queue full; unavailable");
                answer(
                    &client,
                    r.reply_to,
                    &Reply::error(
                        ErrorCode::Unavailable,
                        "intake queue is full; retry with the same command_id",
                    ),
                )
                .await;
            }
            Err(TrySendError::Closed(r)) => {
                answer(
                    &client,
                    r.reply_to,
                    &Reply::error(
                        ErrorCode::Unavailable,
                        "bcp is shutting down; retry with the same command_id",
                    ),
                )
                .await;
            }
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}

/// Publish each committed batch's replies; log the outcome of commands sent
/// without a reply subject.
pub async fn send_replies(client: Client, mut batches: mpsc::Receiver<Vec<Committed>>) {
    while let Some(batch) = batches.recv().await {
        for c in batch {
            if let Some(err) = &c.reply.error {
                tracing::debug!(command_id = %c.command_id, verb = %c.verb, code = ?err.code, message = %err.message, "command rejected");
            }
            if c.reply_to.is_none() {
                if c.reply.ok && c.reply.events.is_empty() {
                    tracing::debug!(command_id = %c.command_id, verb = %c.verb, "command without reply subject decided: nothing to do");
                } else {
                    tracing::info!(command_id = %c.command_id, verb = %c.verb, ok = c.reply.ok, events = c.reply.events.len(), "command without reply subject decided");
                }
            }
            answer(&client, c.reply_to, &c.reply).await;
        }
    }
}
