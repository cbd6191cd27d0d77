//! The single writer's threads and channels around the write model,
//! [`Pipeline`] (which owns the batches and the rules between them): one OS
//! thread decides commands in order against the in-memory state; a second
//! thread commits each batch in one durable transaction. The two overlap: while batch N is being
//! written and fsynced, the commands that arrive are decided into batch N+1,
//! which is committed as soon as N is durable. A command later in a batch
//! sees the effects of earlier ones (also of the batch still committing).
//! Replies go out only after their batch is durable; if a commit fails, it
//! and the batch decided on top of it are rolled back and answered
//! `unavailable`. If the commit thread itself dies (a panic), both batches
//! are answered `unavailable` too, and the writer stops: bcp serve drains
//! and exits, and a retry after the restart gets the recorded outcome.

use super::relay::Outbox;
use super::reply::ReplyTo;
use crate::domain::{Reply, Verb};
use crate::store::ledger::{Ledger, Prepared};
use crate::store::pipeline::{Answer, Pipeline, Settled};
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
    /// When the intake queued it (`bcp_command_seconds`, the per-batch
    /// trace).
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

/// Where a command's reply goes, and what the reply path reports of it.
struct Target {
    queued: Instant,
    reply_to: ReplyTo,
    verb: Verb,
    command_id: uuid::Uuid,
    internal: bool,
}

/// A batch for the commit thread, and where its outcome goes.
type CommitJob = (Prepared, oneshot::Sender<CommitDone>);

/// The outcome of one commit, sent back by the commit thread.
struct CommitDone {
    result: Result<(), StoreError>,
    /// When the commit returned: the writer may notice it later.
    at: Instant,
}

/// The commit thread and the channel that feeds it.
struct Committer {
    jobs: std::sync::mpsc::Sender<CommitJob>,
    thread: JoinHandle<()>,
}

/// The commit thread: writes each prepared batch in one durable
/// transaction, in the order given, hands a committed batch's events to
/// the relay's `outbox`, and sends back the outcome; it ends (dropping its
/// handle on the store) when the channel closes.
///
/// A group leader's (`acked`: how far JetStream acknowledged the log)
/// also raises the store's acknowledged mark in each transaction, to what
/// was acknowledged when it began: a leader killed mid-term then keeps
/// every event acknowledged before its last commit from `reconcile`'s
/// tail drop, should the stream have lost them too (see `group`).
fn spawn_committer(store: Store, outbox: Outbox, acked: Option<watch::Receiver<u64>>) -> Committer {
    let (jobs, rx) = std::sync::mpsc::channel::<CommitJob>();
    let thread = std::thread::Builder::new()
        .name("bcp-commit".into())
        .spawn(move || {
            let mut marked = 0;
            for (mut prepared, done) in rx {
                let acked = acked.as_ref().map_or(0, |a| *a.borrow());
                if acked > marked {
                    prepared.raise_acknowledged(acked);
                }
                let writes = prepared.has_rows();
                let result = store.commit(&mut prepared);
                if result.is_ok() && writes {
                    marked = marked.max(acked);
                }
                let at = Instant::now();
                if result.is_ok() {
                    // Before the writer announces the new head.
                    outbox.push(prepared.into_events());
                }
                let _ = done.send(CommitDone { result, at });
            }
        })
        .expect("spawn commit thread");
    Committer { jobs, thread }
}

/// The batch at the commit thread.
struct Committing {
    started: Instant,
    done: oneshot::Receiver<CommitDone>,
}

impl Committing {
    /// The commit thread has sent the outcome. (A commit thread that
    /// panicked sends none: the writer learns of it at its next `select`,
    /// after deciding what is queued, all of which is then answered
    /// `unavailable`.)
    fn is_done(&self) -> bool {
        !self.done.is_empty()
    }
}

struct Writer {
    pipeline: Pipeline<Target>,
    queue: mpsc::Receiver<WriteRequest>,
    replies: mpsc::Sender<Vec<Committed>>,
    head: watch::Sender<u64>,
    fatal: CancellationToken,
    committer: Committer,
    poisoned: Option<StoreError>,
}

/// Start the writer thread; it returns the final head seq when the queue
/// closes and is empty. Each committed batch's events go to `outbox`
/// before `head` moves past them. If the store fails in a way only
/// reopening it cures (redb after an I/O error), the writer answers
/// everything `unavailable`, cancels `fatal` so the server drains and exits
/// non-zero, and returns the error: a supervisor restarts bcp, and nothing
/// acknowledged was lost.
pub fn spawn(
    ledger: Ledger,
    queue: mpsc::Receiver<WriteRequest>,
    replies: mpsc::Sender<Vec<Committed>>,
    head: watch::Sender<u64>,
    outbox: Outbox,
    fatal: CancellationToken,
    acked: Option<watch::Receiver<u64>>,
) -> JoinHandle<Result<u64, StoreError>> {
    let committer = spawn_committer(ledger.store().clone(), outbox, acked);
    let writer = Writer {
        pipeline: Pipeline::new(ledger),
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
        let mut committing: Option<Committing> = None;
        let mut queue_open = true;
        loop {
            tokio::select! {
                biased;
                done = async { (&mut committing.as_mut().expect("guarded").done).await }, if committing.is_some() => {
                    let c = committing.take().expect("guarded");
                    let (settled, finished) = match done {
                        Ok(done) => (self.pipeline.settle(done.result), Some(done.at)),
                        // The commit thread dropped the batch: it panicked.
                        Err(_) => (self.pipeline.commit_lost(), None),
                    };
                    self.deliver(settled, c.started, finished).await;
                    committing = self.commit_next();
                }
                r = self.queue.recv(), if queue_open && self.pipeline.has_room() => {
                    let Some(first) = r else {
                        queue_open = false;
                        continue;
                    };
                    self.take(first).await;
                    // Whatever else is already queued joins the same batch,
                    // until the commit running is done: its replies and the
                    // next commit come first (a backlog of hundreds of
                    // commands took milliseconds to decide, with the commit
                    // thread idle and that batch's replies held meanwhile).
                    while self.pipeline.has_room()
                        && !committing.as_ref().is_some_and(Committing::is_done)
                    {
                        match self.queue.try_recv() {
                            Ok(r) => self.take(r).await,
                            Err(_) => break,
                        }
                    }
                    if committing.is_none() {
                        committing = self.commit_next();
                    }
                }
                else => break,
            }
        }
        let head = self.pipeline.ledger().head_seq();
        // The loop ends with no batch at the commit thread. Close its
        // channel and wait for it to drop its handle on the store, so the
        // store is closed cleanly (not left needing recovery) once the
        // writer has returned.
        let Writer {
            committer,
            poisoned,
            pipeline,
            ..
        } = self;
        drop(pipeline);
        drop(committer.jobs);
        let _ = committer.thread.join();
        match poisoned {
            Some(e) => Err(e),
            None => Ok(head),
        }
    }

    /// Decide one command into the open batch.
    async fn take(&mut self, r: WriteRequest) {
        let target = Target {
            queued: r.queued,
            reply_to: r.reply_to,
            verb: r.pending.cmd.verb,
            command_id: r.pending.cmd.command_id,
            internal: r.pending.internal,
        };
        let mut ids = uuid::Uuid::now_v7;
        let answers = self.pipeline.decide(&r.pending, target, now(), &mut ids);
        if !answers.is_empty() {
            self.send(committed(answers, None)).await;
        }
    }

    /// Hand the open batch to the commit thread, if there is one.
    fn commit_next(&mut self) -> Option<Committing> {
        let prepared = self.pipeline.to_commit()?;
        let (done_tx, done) = oneshot::channel();
        let started = Instant::now();
        self.committer
            .jobs
            .send((prepared, done_tx))
            .expect("the commit thread lives as long as the writer");
        Some(Committing { started, done })
    }

    /// A commit settled: stop if the store needs reopening (before any
    /// answer can be seen), answer, then publish the new head. The replies
    /// go first: the head wakes the relay, which publishes the batch's
    /// events on the same tokio workers, and a reply waiting behind that
    /// is a command's latency, while the relay's is only the stream's lag.
    /// The commit ran from `started` to `finished` (`None`: the commit
    /// thread is gone).
    async fn deliver(
        &mut self,
        settled: Settled<Target>,
        started: Instant,
        finished: Option<Instant>,
    ) {
        let commit = settled.head.zip(finished).map(|(head_seq, finished)| {
            let commit = finished.saturating_duration_since(started);
            if tracing::enabled!(tracing::Level::TRACE) {
                let oldest = settled.answers.iter().map(|a| a.to.queued).min();
                tracing::trace!(
                    commands = settled.answers.len(),
                    head_seq,
                    commit_us = commit.as_micros() as u64,
                    // From the commit's end to the writer settling it.
                    noticed_us = finished.elapsed().as_micros() as u64,
                    oldest_queued_us = oldest.map_or(0, |t| t.elapsed().as_micros() as u64),
                    "batch committed"
                );
            }
            commit
        });
        if settled.stopped {
            self.queue.close();
            self.fatal.cancel();
            self.poisoned = settled.error;
        }
        self.send(committed(settled.answers, commit)).await;
        if let Some(head_seq) = settled.head {
            self.head.send_replace(head_seq);
        }
    }

    async fn send(&self, committed: Vec<Committed>) {
        if self.replies.send(committed).await.is_err() {
            tracing::warn!(
                "reply sender gone; replies dropped (producers retry with the same command_id)"
            );
        }
    }
}

/// The answers of a batch as the reply path takes them.
fn committed(answers: Vec<Answer<Target>>, commit: Option<std::time::Duration>) -> Vec<Committed> {
    answers
        .into_iter()
        .map(|Answer { to, reply, through }| Committed {
            reply_to: to.reply_to,
            verb: to.verb,
            command_id: to.command_id,
            internal: to.internal,
            queued: to.queued,
            through,
            commit,
            reply,
        })
        .collect()
}
