//! The single writer: one OS thread owns the [`Ledger`] and decides commands
//! in order against its in-memory state; a second thread commits each batch
//! in one durable transaction. The two overlap: while batch N is being
//! written and fsynced, the commands that arrive are decided into batch N+1,
//! which is committed as soon as N is durable. A command later in a batch
//! sees the effects of earlier ones (also of the batch still committing).
//! Replies go out only after their batch is durable; if a commit fails, it
//! and the batch decided on top of it are rolled back and answered
//! `unavailable`. If the commit thread itself dies (a panic), both batches
//! are answered `unavailable` too, and the writer stops: bcp serve drains
//! and exits, and a retry after the restart gets the recorded outcome.

use super::reply::ReplyTo;
use crate::domain::limits::BATCH_COMMANDS_MAX;
use crate::domain::{ErrorCode, Reply, Verb};
use crate::store::ledger::{Batch, Ledger, Prepared};
use crate::store::{Store, StoreError};
use chrono::{DateTime, SubsecRound, Utc};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// A decoded command and where its reply goes.
pub struct WriteRequest {
    pub pending: crate::store::ledger::Pending,
    pub reply_to: ReplyTo,
    /// When the intake queued it (for the per-batch trace).
    pub queued: Instant,
}

/// A decided command's reply, after its batch is durable.
pub struct Committed {
    pub reply_to: ReplyTo,
    pub reply: Reply,
    pub verb: Verb,
    pub command_id: uuid::Uuid,
    /// bcp's own command (the retention sweep).
    pub internal: bool,
    /// When the intake queued it.
    pub queued: Instant,
    /// The log head once its batch was committed: in group mode the reply
    /// waits until JetStream has acknowledged the log through it.
    pub through: u64,
    /// How long its batch's commit took (None: answered without one).
    pub commit: Option<std::time::Duration>,
}

/// bcp's clock, read only here at the edge; microseconds, UTC.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Where each reply of a batch goes, in batch order.
struct Target {
    queued: Instant,
    reply_to: ReplyTo,
    verb: Verb,
    command_id: uuid::Uuid,
    internal: bool,
}

fn answer(targets: Vec<Target>, replies: Vec<Reply>, through: u64) -> Vec<Committed> {
    answer_timed(targets, replies, through, None)
}

fn answer_timed(
    targets: Vec<Target>,
    replies: Vec<Reply>,
    through: u64,
    commit: Option<std::time::Duration>,
) -> Vec<Committed> {
    targets
        .into_iter()
        .zip(replies)
        .map(|(t, reply)| Committed {
            reply_to: t.reply_to,
            verb: t.verb,
            command_id: t.command_id,
            internal: t.internal,
            queued: t.queued,
            through,
            commit,
            reply,
        })
        .collect()
}

/// A batch being decided.
struct Open {
    batch: Batch,
    targets: Vec<Target>,
}

/// A batch handed to the commit thread.
struct Committing {
    started: Instant,
    done: oneshot::Receiver<(Prepared, Result<(), StoreError>)>,
    targets: Vec<Target>,
}

type CommitJob = (
    Prepared,
    oneshot::Sender<(Prepared, Result<(), StoreError>)>,
);

/// The commit thread: writes each prepared batch in one durable
/// transaction, in the order given, and hands it back with the outcome.
fn spawn_committer(store: Store) -> std::sync::mpsc::Sender<CommitJob> {
    let (tx, rx) = std::sync::mpsc::channel::<CommitJob>();
    std::thread::Builder::new()
        .name("bcp-commit".into())
        .spawn(move || {
            for (prepared, done) in rx {
                let result = store.commit(&prepared);
                let _ = done.send((prepared, result));
            }
        })
        .expect("spawn commit thread");
    tx
}

struct Writer {
    ledger: Ledger,
    queue: mpsc::Receiver<WriteRequest>,
    replies: mpsc::Sender<Vec<Committed>>,
    head: watch::Sender<u64>,
    fatal: CancellationToken,
    committer: std::sync::mpsc::Sender<CommitJob>,
    poisoned: Option<StoreError>,
}

/// Start the writer thread; it returns the final head seq when the queue
/// closes and is empty. If the store fails in a way only reopening it cures
/// (redb after an I/O error), the writer answers everything `unavailable`,
/// cancels `fatal` so the server drains and exits non-zero, and returns the
/// error: a supervisor restarts bcp, and nothing acknowledged was lost.
pub fn spawn(
    ledger: Ledger,
    queue: mpsc::Receiver<WriteRequest>,
    replies: mpsc::Sender<Vec<Committed>>,
    head: watch::Sender<u64>,
    fatal: CancellationToken,
) -> JoinHandle<Result<u64, StoreError>> {
    let committer = spawn_committer(ledger.store().clone());
    let writer = Writer {
        ledger,
        queue,
        replies,
        head,
        fatal,
        committer,
        poisoned: None,
    };
    std::thread::Builder::new()
        .name("bcp-writer".into())
        .spawn(move || futures::executor::block_on(writer.run()))
        .expect("spawn writer thread")
}

impl Writer {
    async fn run(mut self) -> Result<u64, StoreError> {
        let mut open: Option<Open> = None;
        let mut committing: Option<Committing> = None;
        let mut queue_open = true;
        loop {
            let room = open.as_ref().map_or(0, |o| o.batch.len()) < BATCH_COMMANDS_MAX;
            tokio::select! {
                biased;
                done = async { (&mut committing.as_mut().expect("guarded").done).await }, if committing.is_some() => {
                    let c = committing.take().expect("guarded");
                    let Ok((prepared, result)) = done else {
                        // The commit thread dropped the batch: it panicked.
                        self.commit_thread_stopped(c, open.take()).await;
                        continue;
                    };
                    match result {
                        Ok(()) => {
                            self.settled(prepared, c).await;
                            if let Some(o) = open.take() {
                                committing = self.commit(o);
                            }
                        }
                        Err(e) => {
                            // The batch decided on top of the failed one goes first.
                            if let Some(o) = open.take() {
                                self.undo(o, &e).await;
                            }
                            self.failed(prepared, c.targets, e).await;
                        }
                    }
                }
                r = self.queue.recv(), if queue_open && room => {
                    let Some(first) = r else {
                        queue_open = false;
                        continue;
                    };
                    self.take(&mut open, first).await;
                    // Whatever else is already queued joins the same batch.
                    while open.as_ref().is_some_and(|o| o.batch.len() < BATCH_COMMANDS_MAX) {
                        match self.queue.try_recv() {
                            Ok(r) => self.take(&mut open, r).await,
                            Err(_) => break,
                        }
                    }
                    if committing.is_none()
                        && let Some(o) = open.take()
                    {
                        committing = self.commit(o);
                    }
                }
                else => break,
            }
        }
        match self.poisoned {
            Some(e) => Err(e),
            None => Ok(self.ledger.head_seq()),
        }
    }

    /// Decide one command into the open batch (starting one if needed).
    async fn take(&mut self, open: &mut Option<Open>, r: WriteRequest) {
        let target = Target {
            queued: r.queued,
            reply_to: r.reply_to,
            verb: r.pending.cmd.verb,
            command_id: r.pending.cmd.command_id,
            internal: r.pending.internal,
        };
        if let Some(e) = &self.poisoned {
            let reply = unavailable(e);
            self.send(answer(vec![target], vec![reply], 0)).await;
            return;
        }
        if open.is_none() {
            match self.ledger.begin(now()) {
                Ok(batch) => {
                    *open = Some(Open {
                        batch,
                        targets: Vec::new(),
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the store; answering unavailable");
                    self.send(answer(vec![target], vec![unavailable(&e)], 0))
                        .await;
                    return;
                }
            }
        }
        let o = open.as_mut().expect("opened above");
        let mut ids = uuid::Uuid::now_v7;
        match self.ledger.decide(&mut o.batch, &r.pending, &mut ids) {
            Ok(()) => o.targets.push(target),
            Err(e) => {
                // A storage read failed mid-batch: the batch so far is undone.
                let mut o = open.take().expect("opened above");
                o.targets.push(target);
                tracing::error!(error = %e, commands = o.targets.len(), "batch not decided; answering unavailable");
                self.undo(o, &e).await;
            }
        }
    }

    /// Hand the open batch to the commit thread.
    fn commit(&mut self, o: Open) -> Option<Committing> {
        let prepared = self.ledger.prepare(o.batch);
        let (done_tx, done) = oneshot::channel();
        self.committer
            .send((prepared, done_tx))
            .expect("the commit thread lives as long as the writer");
        Some(Committing {
            started: Instant::now(),
            done,
            targets: o.targets,
        })
    }

    /// A batch is durable: publish the new head and reply.
    async fn settled(&mut self, prepared: Prepared, c: Committing) {
        let head_seq = prepared.head_seq();
        self.head.send_replace(head_seq);
        if tracing::enabled!(tracing::Level::TRACE) {
            let oldest = c.targets.iter().map(|t| t.queued).min();
            tracing::trace!(
                commands = prepared.len(),
                head_seq,
                commit_us = c.started.elapsed().as_micros() as u64,
                oldest_queued_us = oldest.map_or(0, |t| t.elapsed().as_micros() as u64),
                "batch committed"
            );
        }
        let replies = self.ledger.committed(prepared);
        let commit = Some(c.started.elapsed());
        self.send(answer_timed(c.targets, replies, head_seq, commit))
            .await;
    }

    /// A batch failed to commit: undo it in memory and answer
    /// `unavailable`; stop first if the store needs reopening (a failed
    /// `commit()` always does: only the reopened store says whether the
    /// batch was recorded).
    async fn failed(&mut self, prepared: Prepared, targets: Vec<Target>, e: StoreError) {
        let n = prepared.len();
        self.ledger.rolled_back(prepared);
        tracing::error!(error = %e, commands = n, "batch not committed; answering unavailable");
        let replies = answer(targets, vec![unavailable(&e); n], 0);
        if e.is_poisoned() {
            // Stopped before answering, as in `commit_thread_stopped`.
            self.stop(e);
        }
        self.send(replies).await;
    }

    /// The commit thread is gone with batch `c` (it panicked): whether `c`
    /// was recorded is unknown, so its commands and the open batch's are
    /// answered `unavailable` (a retry with the same command_id gets the
    /// first outcome after the restart), and the writer stops.
    async fn commit_thread_stopped(&mut self, c: Committing, open: Option<Open>) {
        let e = StoreError::CommitThreadStopped;
        tracing::error!(error = %e, commands = c.targets.len(), "batch outcome unknown; answering unavailable");
        // Stopped before answering: no reply can be seen before the server
        // is told to exit.
        self.stop(StoreError::CommitThreadStopped);
        if let Some(o) = open {
            self.undo(o, &e).await;
        }
        let n = c.targets.len();
        self.send(answer(c.targets, vec![unavailable(&e); n], 0))
            .await;
    }

    /// Undo the open batch in memory (nothing of it was handed to the
    /// commit thread) and answer each of its commands `unavailable`.
    async fn undo(&mut self, o: Open, e: &StoreError) {
        let undone = self.ledger.prepare(o.batch);
        self.ledger.rolled_back(undone);
        let n = o.targets.len();
        self.send(answer(o.targets, vec![unavailable(e); n], 0))
            .await;
    }

    /// Refuse everything from now on and have the server drain and exit.
    fn stop(&mut self, e: StoreError) {
        tracing::error!(error = %e, "the writer stops; restart bcp serve");
        self.queue.close();
        self.fatal.cancel();
        self.poisoned = Some(e);
    }

    async fn send(&self, committed: Vec<Committed>) {
        if self.replies.send(committed).await.is_err() {
            tracing::warn!(
                "reply sender gone; replies dropped (producers retry with the same command_id)"
            );
        }
    }
}

fn unavailable(e: &StoreError) -> Reply {
    let outcome = if e.outcome_unknown() {
        "retry with the same command_id after the restart"
    } else {
        "nothing recorded"
    };
    Reply::error(
        ErrorCode::Unavailable,
        format!("storage error, {outcome}: {e}"),
    )
}
