//! The write pipeline: the one model of how commands become durable. It
//! owns the [`Ledger`], the batch being decided ("open") and the batch being
//! committed ("committing"), and holds the rules between them:
//!
//! - commands are decided in arrival order into the open batch, each seeing
//!   the effects of every command before it (also of the committing batch);
//! - at most one batch commits at a time, and batches commit in the order
//!   they were decided ([`Pipeline::to_commit`] hands out the open batch
//!   only when nothing is committing);
//! - a batch's replies are released only when its commit succeeded
//!   ([`Pipeline::settle`]);
//! - when a commit fails, the open batch (decided on top of it) is undone
//!   first, then the failed one: memory equals the disk again, and every
//!   command of both is answered `unavailable`;
//! - once the store needs reopening (an I/O error, a failed `commit()`, a
//!   lost commit thread) the pipeline is stopped and answers everything
//!   `unavailable`.
//!
//! The pipeline does no I/O of its own beyond the ledger's reads; who runs
//! [`Store::commit`], and on which thread, is the caller's (bcp serve's
//! writer commits on a second thread, overlapped with deciding; `execute`
//! and `follow` commit in line). `T` is where a command's answer goes.

use super::ledger::{Batch, Decided, IdSource, Ledger, Pending, Prepared};
use super::{Result, Store, StoreError};
use crate::domain::limits::BATCH_COMMANDS_MAX;
use crate::domain::{ErrorCode, Reply};
use chrono::{DateTime, Utc};

/// A command's reply and where it goes.
#[derive(Debug)]
pub struct Answer<T> {
    pub to: T,
    pub reply: Reply,
    /// The log head once the command's batch was committed; 0 when it was
    /// answered without a commit of its own (`unavailable`).
    pub through: u64,
}

/// What settling a commit released.
#[derive(Debug)]
pub struct Settled<T> {
    /// In decision order.
    pub answers: Vec<Answer<T>>,
    /// The new log head, when the batch was committed.
    pub head: Option<u64>,
    /// Why the batch was not committed.
    pub error: Option<StoreError>,
    /// The pipeline stopped now (the store needs reopening, `error` says
    /// why): the caller stops taking commands before it sends these answers.
    pub stopped: bool,
}

pub struct Pipeline<T> {
    ledger: Ledger,
    open: Option<(Batch, Vec<T>)>,
    committing: Option<(Decided, Vec<T>)>,
    /// Once stopped, the answer to every command.
    stopped: Option<Reply>,
}

impl<T> Pipeline<T> {
    pub fn new(ledger: Ledger) -> Pipeline<T> {
        Pipeline {
            ledger,
            open: None,
            committing: None,
            stopped: None,
        }
    }

    /// The log head and projections as decided so far.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn head_seq(&self) -> u64 {
        self.ledger.head_seq()
    }

    /// The projections as decided so far.
    pub fn world(&self) -> &crate::domain::World {
        self.ledger.world()
    }

    pub fn store(&self) -> &Store {
        self.ledger.store()
    }

    /// Give the ledger back; only between batches.
    pub fn into_ledger(self) -> Ledger {
        assert!(
            self.open.is_none() && self.committing.is_none(),
            "the ledger leaves the pipeline only between batches"
        );
        self.ledger
    }

    /// Whether the open batch can take another command.
    pub fn has_room(&self) -> bool {
        self.open
            .as_ref()
            .is_none_or(|(b, _)| b.len() < BATCH_COMMANDS_MAX)
    }

    /// Decide `p` into the open batch (opening one at `now` if there is
    /// none). Answers at once only when it cannot: the pipeline has stopped
    /// (this command), or a storage read failed (the whole open batch is
    /// undone, this command included).
    pub fn decide(
        &mut self,
        p: &Pending,
        to: T,
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
    ) -> Vec<Answer<T>> {
        match self.try_decide(p, to, now, next_id) {
            Ok(()) => Vec::new(),
            Err((_, answers)) => answers,
        }
    }

    /// [`Pipeline::decide`], also giving the storage error.
    fn try_decide(
        &mut self,
        p: &Pending,
        to: T,
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
    ) -> std::result::Result<(), (Option<StoreError>, Vec<Answer<T>>)> {
        if let Some(reply) = &self.stopped {
            let reply = reply.clone();
            return Err((
                None,
                vec![Answer {
                    to,
                    reply,
                    through: 0,
                }],
            ));
        }
        let (batch, targets) = match &mut self.open {
            Some(open) => open,
            None => match self.ledger.begin(now) {
                Ok(b) => self.open.insert((b, Vec::new())),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the store; answering unavailable");
                    let answers = unavailable(vec![to], &e);
                    return Err((Some(e), answers));
                }
            },
        };
        match self.ledger.decide(batch, p, next_id) {
            Ok(()) => {
                targets.push(to);
                Ok(())
            }
            Err(e) => {
                let (batch, mut targets) = self.open.take().expect("opened above");
                targets.push(to);
                tracing::error!(error = %e, commands = targets.len(), "batch not decided; answering unavailable");
                self.ledger.abandon(batch);
                let answers = unavailable(targets, &e);
                Err((Some(e), answers))
            }
        }
    }

    /// The open batch's rows, to hand to [`Store::commit`], when no batch is
    /// committing; then [`Pipeline::settle`] it with the commit's result.
    pub fn to_commit(&mut self) -> Option<Prepared> {
        if self.committing.is_some() {
            return None;
        }
        let (batch, targets) = self.open.take()?;
        let (prepared, decided) = self.ledger.seal(batch);
        self.committing = Some((decided, targets));
        Some(prepared)
    }

    /// Settle the committing batch with its commit's result: its replies
    /// on success; otherwise it and the open batch are undone (newest
    /// first) and answered `unavailable`, and the pipeline stops if the
    /// store needs reopening.
    pub fn settle(&mut self, result: Result<()>) -> Settled<T> {
        let (decided, targets) = self.committing.take().expect("settle follows to_commit");
        match result {
            Ok(()) => {
                let through = decided.head_seq();
                let open = self.open.as_mut().map(|(batch, _)| batch);
                let replies = self.ledger.committed(decided, open);
                assert_eq!(replies.len(), targets.len(), "one reply per command");
                Settled {
                    answers: targets
                        .into_iter()
                        .zip(replies)
                        .map(|(to, reply)| Answer { to, reply, through })
                        .collect(),
                    head: Some(through),
                    error: None,
                    stopped: false,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = decided.len(), "batch not committed; answering unavailable");
                let mut answers = self.undo_open(&e);
                self.ledger.undo(decided);
                answers.extend(unavailable(targets, &e));
                self.stop_if_poisoned(e, answers)
            }
        }
    }

    /// The commit thread is gone with the committing batch (it panicked):
    /// whether that batch was recorded is unknown, so it and the open batch
    /// are answered `unavailable` (a retry with the same command_id gets
    /// the first outcome after the restart), and the pipeline stops.
    pub fn commit_lost(&mut self) -> Settled<T> {
        let e = StoreError::CommitThreadStopped;
        let mut answers = self.undo_open(&e);
        if let Some((decided, targets)) = self.committing.take() {
            tracing::error!(error = %e, commands = targets.len(), "batch outcome unknown; answering unavailable");
            self.ledger.undo(decided);
            answers.extend(unavailable(targets, &e));
        }
        self.stop_if_poisoned(e, answers)
    }

    /// Undo the open batch (it was never handed to a commit) and answer
    /// its commands `unavailable`.
    fn undo_open(&mut self, e: &StoreError) -> Vec<Answer<T>> {
        match self.open.take() {
            Some((batch, targets)) => {
                self.ledger.abandon(batch);
                unavailable(targets, e)
            }
            None => Vec::new(),
        }
    }

    fn stop_if_poisoned(&mut self, e: StoreError, answers: Vec<Answer<T>>) -> Settled<T> {
        let stopped = e.is_poisoned();
        if stopped {
            tracing::error!(error = %e, "the writer stops; restart bcp serve");
            self.stopped = Some(unavailable_reply(&e));
        }
        Settled {
            answers,
            head: None,
            error: Some(e),
            stopped,
        }
    }
}

/// The pipeline with its commits run in line, on the caller's thread: the
/// tools that build logs offline, group followers, and tests.
impl Pipeline<()> {
    /// Open `store`'s ledger (projections and log head, checked).
    pub fn open(store: Store) -> Result<Pipeline<()>> {
        Ledger::open(store).map(Pipeline::new)
    }

    /// Decide `batch` and commit it durably in line: one reply per command
    /// (the tools that build logs offline, and tests). On `Err`, nothing of
    /// the batch was committed.
    pub fn execute(
        &mut self,
        batch: &[Pending],
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
    ) -> Result<Vec<Reply>> {
        assert!(
            self.open.is_none() && self.committing.is_none(),
            "execute runs alone"
        );
        for p in batch {
            if let Err((e, answers)) = self.try_decide(p, (), now, next_id) {
                let said = |a: &Answer<()>| a.reply.error.as_ref().map(|e| e.message.clone());
                return Err(e.unwrap_or_else(|| {
                    StoreError::Stopped(answers.first().and_then(said).unwrap_or_default())
                }));
            }
        }
        self.commit_in_line()
            .map(|s| s.answers.into_iter().map(|a| a.reply).collect())
    }

    /// Apply `events` (the stored bytes of events decided elsewhere, that
    /// continue this log: a group follower) and commit them in line.
    pub fn follow(&mut self, events: Vec<Vec<u8>>) -> Result<()> {
        assert!(
            self.open.is_none() && self.committing.is_none(),
            "follow runs alone"
        );
        if let Some(reply) = &self.stopped {
            let said = reply.error.as_ref().map(|e| e.message.clone());
            return Err(StoreError::Stopped(said.unwrap_or_default()));
        }
        let batch = self.ledger.follow(events)?;
        self.open = Some((batch, Vec::new()));
        self.commit_in_line().map(|_| ())
    }

    fn commit_in_line(&mut self) -> Result<Settled<()>> {
        let Some(mut prepared) = self.to_commit() else {
            return Ok(Settled {
                answers: Vec::new(),
                head: None,
                error: None,
                stopped: false,
            });
        };
        let result = self.ledger.store().commit(&mut prepared);
        let mut settled = self.settle(result);
        match settled.error.take() {
            None => Ok(settled),
            Some(e) => Err(e),
        }
    }
}

/// `unavailable` for a command that was not committed because of `e`.
pub fn unavailable_reply(e: &StoreError) -> Reply {
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

fn unavailable_answer<T>(to: T, e: &StoreError) -> Answer<T> {
    Answer {
        to,
        reply: unavailable_reply(e),
        through: 0,
    }
}

fn unavailable<T>(targets: Vec<T>, e: &StoreError) -> Vec<Answer<T>> {
    targets
        .into_iter()
        .map(|to| unavailable_answer(to, e))
        .collect()
}
