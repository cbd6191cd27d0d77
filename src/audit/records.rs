//! `audit verify`'s check of the idempotency records (the COMMANDS table)
//! against the log: every command the log holds has a record, and each
//! record's reply is what the log says that command got. A forged or
//! edited record would otherwise answer a retry, or a new command reusing
//! its id, with a reply no event backs.
//!
//! The reply a record must hold is [`Reply::of_events`] of the command's
//! events: the one derivation the write path answers with and import
//! rebuilds records with. What the log cannot tell, and so is not checked: a
//! record's fingerprint (the log does not hold command bodies) and a record
//! of a command that was accepted with no events (a no-op, e.g. assigning a
//! job the region it has), which only needs to be ok with no events.

use super::verify::VerifyError;
use crate::domain::reply::EventFacts;
use crate::domain::{Envelope, ErrorCode, Event, Reply};
use crate::store::tables::COMMANDS;
use crate::store::{CommandRecord, Store, StoreError};
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

/// The log, as far as the idempotency records and the event index are
/// concerned.
pub struct CommandLog {
    events: Vec<Logged>,
    rejections: HashMap<u64, Rejection>,
}

impl CommandLog {
    pub fn with_capacity(events: usize) -> CommandLog {
        CommandLog {
            events: Vec::with_capacity(events),
            rejections: HashMap::new(),
        }
    }

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

    /// Per job, the seqs of its events, sorted: what the stored event index
    /// must hold.
    pub fn job_index(&self) -> Vec<(u128, u64)> {
        // Sized once: grown by doubling, a million entries cost copies and
        // page faults on a thread nothing else runs beside.
        let mut index = Vec::with_capacity(self.events.len());
        index.extend(self.events.iter().filter_map(|e| Some((e.job?, e.seq))));
        index.sort_unstable();
        index
    }

    /// Compare with the stored records, split into `parts` key ranges
    /// checked on threads of their own; the first disagreement (in key
    /// order), named.
    pub fn check(mut self, store: &Store, parts: usize) -> Result<(), VerifyError> {
        // By command, then seq: the order of the table's keys.
        self.events.sort_unstable_by_key(|e| (e.command, e.seq));
        let txn = store.begin_read()?;
        let checks = super::scan::by_key_ranges(
            &self.events,
            |e| e.command,
            parts,
            |events, keys| self.check_range(&txn, keys, events),
        );
        checks.into_iter().collect()
    }

    /// [`CommandLog::check`] of the records with keys in `keys`, whose
    /// logged events are `logged`.
    fn check_range(
        &self,
        txn: &redb::ReadTransaction,
        keys: std::ops::RangeInclusive<u128>,
        mut logged: &[Logged],
    ) -> Result<(), VerifyError> {
        let bad = |id: u128, what: String| {
            Err(VerifyError::Records(format!(
                "command {}: {what}",
                Uuid::from_u128(id)
            )))
        };
        let unrecorded = |e: &Logged| {
            bad(
                e.command,
                format!(
                    "the log holds its event at seq {}, but it has no idempotency record (a retry would be applied again)",
                    e.seq
                ),
            )
        };
        let table = txn.open_table(COMMANDS).map_err(StoreError::from)?;
        for r in table.range(keys).map_err(StoreError::from)? {
            let (k, v) = r.map_err(StoreError::from)?;
            let id = k.value();
            if let Some(e) = logged.first().filter(|e| e.command < id) {
                return unrecorded(e);
            }
            let n = logged.iter().take_while(|e| e.command == id).count();
            let (events, rest) = logged.split_at(n);
            logged = rest;
            let record: CommandRecord = match crate::store::rows::read_record(v.value()) {
                Ok(r) => r,
                Err(e) => return bad(id, format!("its record does not parse: {e}")),
            };
            if let Err(what) = self.reply_matches(&record, events) {
                return bad(id, format!("its recorded reply {what}"));
            }
        }
        match logged.first() {
            Some(e) => unrecorded(e),
            None => Ok(()),
        }
    }

    /// Whether `record`'s reply is what the log says its command got:
    /// `events` are the log's events of that command, in seq order. The
    /// reply the log implies is [`Reply::of_events`], the derivation the
    /// write path answered with, for the job the record names.
    fn reply_matches(&self, record: &CommandRecord, events: &[Logged]) -> Result<(), String> {
        let reply = &record.reply;
        if reply.duplicate {
            return Err("is marked duplicate".into());
        }
        if events.is_empty() {
            // A no-op: the log holds nothing to compare but that it was ok.
            let seqs: Vec<u64> = reply.events.iter().map(|e| e.seq).collect();
            return match (reply.ok, &reply.error, reply.rejection_seq) {
                (true, None, None) if seqs.is_empty() => Ok(()),
                (true, None, None) => Err(format!(
                    "names events {seqs:?}, but the log holds no event of this command"
                )),
                _ => Err(
                    "is not ok, but the log holds no event of this command (no recorded rejection)"
                        .into(),
                ),
            };
        }
        // The command's own job comes first; a region change may move the
        // job's cluster siblings after it (the cluster rule).
        if let Some(job) = reply.job_id.filter(|_| reply.ok)
            && events[0].job != Some(job.as_u128())
        {
            return Err("names a job other than its events'".into());
        }
        let facts: Vec<EventFacts> = events
            .iter()
            .map(|e| EventFacts {
                seq: e.seq,
                job_id: e.job.map(Uuid::from_u128),
                job_version: e.job_version,
                event_type: e.kind,
                rejected: self
                    .rejections
                    .get(&e.seq)
                    .map(|r| (r.code, r.reason.as_str(), r.current_version)),
            })
            .collect();
        let logged = Reply::of_events(reply.job_id, &facts);
        if *reply != logged {
            return Err(format!(
                "differs from what the log says it got: recorded {}, the log says {}",
                serde_json::to_string(reply).unwrap_or_default(),
                serde_json::to_string(&logged).unwrap_or_default()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::CommandLog;
    use crate::domain::command::decode;
    use crate::store::ledger::Pending;
    use crate::store::pipeline::Pipeline;
    use crate::store::tables::COMMANDS;
    use crate::store::{Store, decode_envelope};
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;

    fn log_of(store: &Store) -> CommandLog {
        let mut log = CommandLog::with_capacity(0);
        store
            .for_each_event(|seq, bytes| {
                log.add(&decode_envelope(seq, bytes)?);
                Ok(true)
            })
            .unwrap();
        log
    }

    /// Records are checked in key ranges on several threads: a record
    /// planted or removed anywhere (before, between, after the ranges) is
    /// found whatever the number of ranges.
    #[test]
    fn every_record_is_checked_in_every_split() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 8, 0, 0).unwrap();
        let mut next = 0u128;
        // Command ids 100, 200, …, 900: jobs created, one started twice
        // (the second a recorded rejection), one assigned its own region
        // (a no-op, recorded with no events).
        for n in 1..=9u128 {
            let (verb, body) = match n {
                1..=6 => (
                    "create",
                    serde_json::json!({"job_id": Uuid::from_u128(n), "deployment": {"kind": "replica_set", "name": "rs"}}),
                ),
                7 | 8 => ("start", serde_json::json!({"job_id": Uuid::from_u128(1)})),
                _ => (
                    "assign-region",
                    serde_json::json!({"job_id": Uuid::from_u128(2), "region": null}),
                ),
            };
            let mut body = body;
            body["command_id"] = serde_json::json!(Uuid::from_u128(n * 100));
            let cmd = decode("p1", verb, body.to_string().as_bytes(), None).unwrap();
            let mut ids = || {
                next += 1;
                Uuid::from_u128(next)
            };
            let reply = ledger.execute(&[Pending::new(cmd)], t0, &mut ids).unwrap();
            assert_eq!(reply[0].ok, n != 8, "{n}: {reply:?}");
        }
        for parts in 1..=4 {
            log_of(&store).check(&store, parts).unwrap();
        }
        type Records<'t> = redb::Table<'t, u128, &'static [u8]>;
        let edit = |f: &dyn Fn(&mut Records)| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            f(&mut txn.open_table(COMMANDS).unwrap());
            txn.commit().unwrap();
        };
        let noop = serde_json::to_vec(
            &serde_json::json!({"fingerprint": "*", "reply": {"ok": true, "duplicate": false}}),
        )
        .unwrap();
        let created = serde_json::to_vec(&serde_json::json!({"fingerprint": "*", "reply": {"ok": true, "events": [{"seq": 1, "type": "JobCreated"}], "duplicate": false}})).unwrap();
        for key in [50u128, 450, 950] {
            // A planted no-op is not detectable (the log cannot tell it was
            // never sent); a planted reply naming events is.
            edit(&|t| {
                t.insert(key, noop.as_slice()).unwrap();
            });
            log_of(&store).check(&store, 3).unwrap();
            edit(&|t| {
                t.insert(key, created.as_slice()).unwrap();
            });
            for parts in 1..=4 {
                let err = log_of(&store).check(&store, parts).unwrap_err();
                assert!(
                    err.to_string().contains(&Uuid::from_u128(key).to_string()),
                    "{key}, {parts} parts: {err}"
                );
            }
            edit(&|t| {
                t.remove(key).unwrap();
            });
        }
        for key in [100u128, 500, 800] {
            let saved = {
                let txn = store.begin_read().unwrap();
                txn.open_table(COMMANDS)
                    .unwrap()
                    .get(key)
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec()
            };
            edit(&|t| {
                t.remove(key).unwrap();
            });
            for parts in 1..=4 {
                let err = log_of(&store).check(&store, parts).unwrap_err();
                assert!(
                    err.to_string().contains("no idempotency record"),
                    "{key}, {parts} parts: {err}"
                );
            }
            edit(&|t| {
                t.insert(key, saved.as_slice()).unwrap();
            });
        }
        log_of(&store).check(&store, 2).unwrap();
    }
}
