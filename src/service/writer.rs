//! The single writer: one OS thread owns the [`Ledger`]. It takes whatever
//! commands are queued (up to `BATCH_COMMANDS_MAX`), decides them in order,
//! commits them in one durable transaction, and only then hands the replies
//! back. A command later in a batch sees the effects of earlier ones.

use super::intake::ReplyTo;
use crate::domain::limits::BATCH_COMMANDS_MAX;
use crate::domain::{ErrorCode, Reply};
use crate::store::StoreError;
use crate::store::ledger::{Ledger, Pending};
use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A decoded command and where its reply goes.
pub struct WriteRequest {
    pub pending: Pending,
    pub reply_to: ReplyTo,
}

/// A decided command's reply, after its batch is durable.
pub struct Committed {
    pub reply_to: ReplyTo,
    pub reply: Reply,
    pub verb: crate::domain::Verb,
    pub command_id: uuid::Uuid,
}

/// bcp's clock, read only here at the edge; microseconds, UTC.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Start the writer thread; it returns the final head seq when the queue
/// closes and is empty. If the store fails in a way only reopening it cures
/// (redb after an I/O error), the writer answers everything `unavailable`,
/// cancels `fatal` so the server drains and exits non-zero, and returns the
/// error: a supervisor restarts bcp, and nothing acknowledged was lost.
pub fn spawn(
    mut ledger: Ledger,
    mut queue: mpsc::Receiver<WriteRequest>,
    replies: mpsc::Sender<Vec<Committed>>,
    head: watch::Sender<u64>,
    published: Arc<AtomicU64>,
    fatal: CancellationToken,
) -> JoinHandle<Result<u64, StoreError>> {
    std::thread::Builder::new()
        .name("bcp-writer".into())
        .spawn(move || {
            let mut saved_cursor = None;
            let mut poisoned = None;
            let mut batch = Vec::with_capacity(BATCH_COMMANDS_MAX);
            while let Some(first) = queue.blocking_recv() {
                batch.push(first);
                while batch.len() < BATCH_COMMANDS_MAX {
                    match queue.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let (pendings, targets): (Vec<Pending>, Vec<ReplyTo>) =
                    batch.drain(..).map(|r| (r.pending, r.reply_to)).unzip();
                let replies_out: Vec<Reply> = if let Some(e) = &poisoned {
                    vec![unavailable(e); pendings.len()]
                } else {
                    let cursor = published.load(Ordering::SeqCst);
                    let cursor = (saved_cursor != Some(cursor)).then_some(cursor);
                    let mut ids = uuid::Uuid::now_v7;
                    match ledger.execute(&pendings, now(), &mut ids, cursor) {
                        Ok(r) => {
                            if cursor.is_some() {
                                saved_cursor = cursor;
                            }
                            head.send_replace(ledger.head_seq());
                            tracing::trace!(commands = pendings.len(), head_seq = ledger.head_seq(), "batch committed");
                            r
                        }
                        Err(e) => {
                            tracing::error!(error = %e, commands = pendings.len(), "batch not committed; answering unavailable");
                            let replies = vec![unavailable(&e); pendings.len()];
                            if e.is_poisoned() {
                                tracing::error!("the store needs reopening: stopping; restart bcp serve");
                                queue.close();
                                fatal.cancel();
                                poisoned = Some(e);
                            }
                            replies
                        }
                    }
                };
                let committed = pendings
                    .into_iter()
                    .zip(targets)
                    .zip(replies_out)
                    .map(|((p, reply_to), reply)| Committed {
                        reply_to,
                        verb: p.cmd.verb,
                        command_id: p.cmd.command_id,
                        reply,
                    })
                    .collect();
                if replies.blocking_send(committed).is_err() {
                    tracing::warn!("reply sender gone; replies dropped (producers retry with the same command_id)");
                }
            }
            match poisoned {
                Some(e) => Err(e),
                None => Ok(ledger.head_seq()),
            }
        })
        .expect("spawn writer thread")
}

fn unavailable(e: &StoreError) -> Reply {
    Reply::error(
        ErrorCode::Unavailable,
        format!("storage error, nothing recorded: {e}"),
    )
}
