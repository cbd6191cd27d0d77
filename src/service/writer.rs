//! The single writer: one OS thread owns the [`Ledger`]. It takes whatever
//! commands are queued (up to `BATCH_COMMANDS_MAX`), decides them in order,
//! commits them in one durable transaction, and only then hands the replies
//! back. A command later in a batch sees the effects of earlier ones.

use super::intake::ReplyTo;
use crate::domain::limits::BATCH_COMMANDS_MAX;
use crate::domain::{ErrorCode, Reply};
use crate::store::ledger::{Ledger, Pending};
use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, watch};

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
/// closes and is empty.
pub fn spawn(
    mut ledger: Ledger,
    mut queue: mpsc::Receiver<WriteRequest>,
    replies: mpsc::Sender<Vec<Committed>>,
    head: watch::Sender<u64>,
    published: Arc<AtomicU64>,
) -> JoinHandle<u64> {
    std::thread::Builder::new()
        .name("bcp-writer".into())
        .spawn(move || {
            let mut saved_cursor = None;
            let mut batch = Vec::with_capacity(BATCH_COMMANDS_MAX);
            while let Some(first) = queue.blocking_recv() {
                batch.push(first);
                while batch.len() < BATCH_COMMANDS_MAX {
                    match queue.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let pendings: Vec<Pending> = batch.iter().map(|r| r.pending.clone()).collect();
                let cursor = published.load(Ordering::SeqCst);
                let cursor = (saved_cursor != Some(cursor)).then_some(cursor);
                let mut ids = uuid::Uuid::now_v7;
                let result = ledger.execute(&pendings, now(), &mut ids, cursor);
                let replies_out: Vec<Reply> = match result {
                    Ok(r) => {
                        if cursor.is_some() {
                            saved_cursor = cursor;
                        }
                        head.send_replace(ledger.head_seq());
                        tracing::trace!(commands = batch.len(), head_seq = ledger.head_seq(), "batch committed");
                        r
                    }
                    Err(e) => {
                        tracing::error!(error = %e, commands = batch.len(), "batch not committed; answering unavailable");
                        let reply = Reply::error(ErrorCode::Unavailable, format!("storage error, nothing recorded: {e}"));
                        vec![reply; batch.len()]
                    }
                };
                let committed = batch
                    .drain(..)
                    .zip(replies_out)
                    .map(|(req, reply)| Committed {
                        reply_to: req.reply_to,
                        verb: req.pending.cmd.verb,
                        command_id: req.pending.cmd.command_id,
                        reply,
                    })
                    .collect();
                if replies.blocking_send(committed).is_err() {
                    tracing::warn!("reply sender gone; replies dropped (producers retry with the same command_id)");
                }
            }
            ledger.head_seq()
        })
        .expect("spawn writer thread")
}
