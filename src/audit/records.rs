//! `audit verify`'s check of the idempotency records (the COMMANDS table)
//! against the log: every command the log holds has a record, and each
//! record's reply is what the log says that command got. A forged or
//! edited record would otherwise answer a retry, or a new command reusing
//! its id, with a reply no event backs.
//!
//! What the log cannot tell, and so is not checked: a record's fingerprint
//! (the log does not hold command bodies) and a record of a command that
//! was accepted with no events (a no-op, e.g. assigning a job the region it
//! has), which only needs to be ok with no events.

use super::verify::VerifyError;
use crate::domain::{Envelope, ErrorCode, Event};
use crate::store::tables::COMMANDS;
use crate::store::{CommandRecord, Store, StoreError};
use redb::ReadableTable;
use std::collections::HashMap;
use uuid::Uuid;

/// What the check needs of one event, gathered during the fold.
struct Logged {
    command: u128,
    seq: u64,
    job: Option<u128>,
    job_version: Option<u64>,
    kind: &'static str,
}

/// A recorded rejection's fields a reply repeats.
struct Rejection {
    code: ErrorCode,
    reason: String,
    current_version: Option<u64>,
}

/// The log, as far as the idempotency records are concerned.
#[derive(Default)]
pub struct CommandLog {
    events: Vec<Logged>,
    rejections: HashMap<u64, Rejection>,
}

impl CommandLog {
    /// Note one event (in seq order).
    pub fn add(&mut self, env: &Envelope) {
        self.events.push(Logged {
            command: env.command_id.as_u128(),
            seq: env.seq,
            job: env.job_id.map(|j| j.as_u128()),
            job_version: env.job_version,
            kind: env.event.type_name(),
        });
        if let Event::CommandRejected {
            code,
            reason,
            current_version,
            ..
        } = &env.event
        {
            self.rejections.insert(
                env.seq,
                Rejection {
                    code: ErrorCode::from(*code),
                    reason: reason.clone(),
                    current_version: *current_version,
                },
            );
        }
    }

    /// Compare with the stored records; the first disagreement, named.
    pub fn check(mut self, store: &Store) -> Result<(), VerifyError> {
        let bad = |id: u128, what: String| {
            Err(VerifyError::Records(format!(
                "command {}: {what}",
                Uuid::from_u128(id)
            )))
        };
        // By command, then seq: the order of the table's keys.
        self.events.sort_unstable_by_key(|e| (e.command, e.seq));
        let mut logged = self.events.as_slice();
        let txn = store.begin_read()?;
        let table = txn.open_table(COMMANDS).map_err(StoreError::from)?;
        for r in table.iter().map_err(StoreError::from)? {
            let (k, v) = r.map_err(StoreError::from)?;
            let id = k.value();
            if let Some(e) = logged.first().filter(|e| e.command < id) {
                return bad(
                    e.command,
                    format!(
                        "the log holds its event at seq {}, but it has no idempotency record (a retry would be applied again)",
                        e.seq
                    ),
                );
            }
            let n = logged.iter().take_while(|e| e.command == id).count();
            let (events, rest) = logged.split_at(n);
            logged = rest;
            let record: CommandRecord = match serde_json::from_slice(v.value()) {
                Ok(r) => r,
                Err(e) => return bad(id, format!("its record does not parse: {e}")),
            };
            if let Err(what) = self.reply_matches(&record, events) {
                return bad(id, format!("its recorded reply {what}"));
            }
        }
        match logged.first() {
            Some(e) => bad(
                e.command,
                format!(
                    "the log holds its event at seq {}, but it has no idempotency record (a retry would be applied again)",
                    e.seq
                ),
            ),
            None => Ok(()),
        }
    }

    /// Whether `record`'s reply is what the log says its command got:
    /// `events` are the log's events of that command, in seq order.
    fn reply_matches(&self, record: &CommandRecord, events: &[Logged]) -> Result<(), String> {
        let reply = &record.reply;
        if reply.duplicate {
            return Err("is marked duplicate".into());
        }
        if !reply.ok {
            let Some(seq) = reply.rejection_seq else {
                return Err("is a rejection the log does not hold (no rejection_seq)".into());
            };
            let (Some(error), [e]) = (&reply.error, events) else {
                return Err(format!(
                    "is a rejection at seq {seq}, but the log holds {} events of this command",
                    events.len()
                ));
            };
            let rejection = self.rejections.get(&e.seq).filter(|_| e.seq == seq);
            let Some(r) = rejection else {
                return Err(format!(
                    "is a rejection at seq {seq}, but the log's event of this command is seq {} ({})",
                    e.seq, e.kind
                ));
            };
            if (error.code, &error.message, error.current_version)
                != (r.code, &r.reason, r.current_version)
                || reply.job_id.map(|j| j.as_u128()) != e.job
                || !reply.events.is_empty()
            {
                return Err(format!("differs from the rejection at seq {seq}"));
            }
            return Ok(());
        }
        if reply.error.is_some() || reply.rejection_seq.is_some() {
            return Err("is ok and an error at once".into());
        }
        let refs: Vec<(u64, &str)> = reply
            .events
            .iter()
            .map(|r| (r.seq, r.event_type.as_str()))
            .collect();
        let logged: Vec<(u64, &str)> = events.iter().map(|e| (e.seq, e.kind)).collect();
        if refs != logged {
            return Err(format!(
                "names events {refs:?}, but the log holds {logged:?} for this command"
            ));
        }
        if let Some(job) = reply.job_id.map(|j| j.as_u128()) {
            if events.iter().any(|e| e.job != Some(job)) {
                return Err("names a job other than its events'".into());
            }
            let last_version = events.iter().rev().find_map(|e| e.job_version);
            if last_version.is_some() && reply.version != last_version {
                return Err(format!(
                    "says version {:?}, but its last event made it {last_version:?}",
                    reply.version
                ));
            }
        }
        Ok(())
    }
}
