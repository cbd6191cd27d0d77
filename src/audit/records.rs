//! `audit verify`'s check of the idempotency records (the COMMANDS table,
//! and the recent records not merged into it yet) against the log: every command the log holds has a record, and each
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
use crate::store::behind::RowRef;
use crate::store::commands::Records;
use crate::store::records::read_recent;
use crate::store::{CommandRecord, Store, StoreError};
use std::collections::HashMap;
use uuid::Uuid;

/// A record of the recent ones ([`crate::store::records`]).
struct Recent {
    id: u128,
    ordinal: u64,
    record: Vec<u8>,
}

/// The recent records, sorted by id, and the last ordinal of the sweep
/// under way ([`read_recent`]). An id held twice is a difference.
fn recent_records(txn: &redb::ReadTransaction) -> Result<(Vec<Recent>, Option<u64>), VerifyError> {
    let (rows, sweep_to) = read_recent(txn)?;
    let mut recent: Vec<Recent> = rows
        .into_iter()
        .map(|(ordinal, id, record)| Recent {
            id,
            ordinal,
            record,
        })
        .collect();
    recent.sort_unstable_by_key(|r| r.id);
    if let Some(w) = recent.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(VerifyError::Records(format!(
            "command {}: it has two recent records (ordinals {} and {})",
            Uuid::from_u128(w[0].id),
            w[0].ordinal,
            w[1].ordinal
        )));
    }
    Ok((recent, sweep_to))
}

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
    /// order), named. The stored records are `COMMANDS` and the recent
    /// ones not yet merged into it ([`crate::store::records`]).
    pub fn check(mut self, store: &Store, parts: usize) -> Result<(), VerifyError> {
        // By command, then seq: the order of the table's keys.
        self.events.sort_unstable_by_key(|e| (e.command, e.seq));
        let txn = store.begin_read()?;
        let (recent, sweep_to) = recent_records(&txn)?;
        let checks = super::scan::by_key_ranges(
            &self.events,
            |e| e.command,
            parts,
            |events, keys| {
                let from = recent.partition_point(|r| r.id < *keys.start());
                let to = recent.partition_point(|r| r.id <= *keys.end());
                self.check_range(&txn, keys, events, &recent[from..to], sweep_to)
            },
        );
        checks.into_iter().collect()
    }

    /// [`CommandLog::check`] of the records with keys in `keys`, whose
    /// logged events are `logged`, and whose recent records are `recent`.
    fn check_range(
        &self,
        txn: &redb::ReadTransaction,
        keys: std::ops::RangeInclusive<u128>,
        mut logged: &[Logged],
        recent: &[Recent],
        sweep_to: Option<u64>,
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
        // Rows are read where they are, not copied (verify reads them all).
        let mut stored = Records::new(txn, keys)?;
        let mut next_stored = || {
            stored.next().transpose().map_err(|e| match e {
                StoreError::Corrupt(what) => VerifyError::Records(what),
                e => VerifyError::from(e),
            })
        };
        let mut table_row = next_stored()?;
        let mut recent = recent.iter().peekable();
        loop {
            // The next record by id, from the table or the recent ones.
            let (id, bytes) = match (table_row.take(), recent.peek()) {
                (None, None) => break,
                (Some((id, row)), Some(r)) if r.id == id => {
                    if sweep_to.is_none_or(|to| r.ordinal > to) {
                        return bad(
                            id,
                            format!(
                                "it has a record in the table and a recent one (ordinal {}) that no sweep merges",
                                r.ordinal
                            ),
                        );
                    }
                    if r.record != row.value() {
                        return bad(
                            id,
                            "its record in the table differs from its recent one".into(),
                        );
                    }
                    recent.next();
                    table_row = next_stored()?;
                    (id, row)
                }
                (Some((id, row)), Some(r)) if r.id > id => {
                    table_row = next_stored()?;
                    (id, row)
                }
                (Some((id, row)), None) => {
                    table_row = next_stored()?;
                    (id, row)
                }
                (row, Some(_)) => {
                    table_row = row;
                    let r = recent.next().expect("peeked");
                    (r.id, RowRef::Behind(&r.record))
                }
            };
            if let Some(e) = logged.first().filter(|e| e.command < id) {
                return unrecorded(e);
            }
            let n = logged.iter().take_while(|e| e.command == id).count();
            let (events, rest) = logged.split_at(n);
            logged = rest;
            // A command's events are appended together, once: apart, it was
            // decided twice (a retry applied again).
            if let Some(w) = events.windows(2).find(|w| w[1].seq != w[0].seq + 1) {
                return bad(
                    id,
                    format!(
                        "its events are not consecutive in the log (seq {}, then again at seq {}): it was decided twice",
                        w[0].seq, w[1].seq
                    ),
                );
            }
            let record: CommandRecord = match crate::store::rows::read_record(bytes.value()) {
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
    use crate::store::records::{read_recent_row, recent_row};
    use crate::store::tables::{CHECKPOINT, COMMANDS, RECENT, SWEEP_TO};
    use crate::store::{Store, decode_envelope};
    use chrono::{TimeZone, Utc};
    use redb::{ReadableTable, ReadableTableMetadata};
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

    /// Where a command's record is stored: (in COMMANDS, its recent row
    /// (ordinal, row)).
    type Placed = (Option<Vec<u8>>, Option<(u64, Vec<u8>)>);

    /// Take `key`'s record out of every table that holds it.
    fn take_record(store: &Store, key: u128) -> Placed {
        let txn = store.writable().unwrap().begin_write().unwrap();
        let placed = {
            let mut commands = txn.open_table(COMMANDS).unwrap();
            let table = commands.remove(key).unwrap().map(|v| v.value().to_vec());
            let mut recent = txn.open_table(RECENT).unwrap();
            let row = recent
                .iter()
                .unwrap()
                .map(|r| r.unwrap())
                .find(|(_, v)| read_recent_row(v.value()).unwrap().0 == key)
                .map(|(k, v)| (k.value(), v.value().to_vec()));
            if let Some((ordinal, _)) = &row {
                recent.remove(*ordinal).unwrap();
            }
            (table, row)
        };
        txn.commit().unwrap();
        placed
    }

    fn put_record(store: &Store, key: u128, (table, row): Placed) {
        let txn = store.writable().unwrap().begin_write().unwrap();
        if let Some(v) = table {
            txn.open_table(COMMANDS)
                .unwrap()
                .insert(key, v.as_slice())
                .unwrap();
        }
        if let Some((ordinal, v)) = row {
            txn.open_table(RECENT)
                .unwrap()
                .insert(ordinal, v.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }

    /// Records are checked in key ranges on several threads: a record
    /// planted or removed anywhere (before, between, after the ranges) is
    /// found whatever the number of ranges; wherever it is stored: all
    /// recent (the default buffer), or some merged into `COMMANDS` and the
    /// rest recent (a buffer of one record sweeps at every other commit).
    #[test]
    fn every_record_is_checked_in_every_split() {
        for buffer in [crate::store::records::BUFFER, 1] {
            every_record_is_checked(buffer);
        }
    }

    fn every_record_is_checked(buffer: usize) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
        store.set_records_buffer(buffer);
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 8, 0, 0).unwrap();
        let mut next = 0u128;
        // Command ids 900, 800, …, 100: jobs created, one started twice
        // (the second a recorded rejection), one assigned its own region
        // (a no-op, recorded with no events). Falling ids: only the first
        // is appended to `COMMANDS` at once, the others wait as recent.
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
            body["command_id"] = serde_json::json!(Uuid::from_u128((10 - n) * 100));
            let cmd = decode("p1", verb, body.to_string().as_bytes(), None).unwrap();
            let mut ids = || {
                next += 1;
                Uuid::from_u128(next)
            };
            let reply = ledger.execute(&[Pending::new(cmd)], t0, &mut ids).unwrap();
            assert_eq!(reply[0].ok, n != 8, "{n}: {reply:?}");
        }
        let (in_table, recent) = {
            let txn = store.begin_read().unwrap();
            let in_table = txn.open_table(COMMANDS).unwrap().len().unwrap();
            (in_table, super::recent_records(&txn).unwrap().0.len())
        };
        match buffer {
            1 => assert!(
                in_table > 0 && recent > 0,
                "{in_table} merged, {recent} recent"
            ),
            _ => assert_eq!((in_table, recent), (1, 8)),
        }
        for parts in 1..=4 {
            log_of(&store).check(&store, parts).unwrap();
        }
        // A command whose events stand apart in the log (seqs 1 and 3) was
        // decided twice, whatever its record says.
        for parts in 1..=4 {
            let mut apart = log_of(&store);
            apart.events[0].command = apart.events[2].command;
            let err = apart.check(&store, parts).unwrap_err().to_string();
            assert!(
                err.contains("not consecutive in the log (seq 1, then again at seq 3)")
                    && err.contains("decided twice"),
                "{parts} parts: {err}"
            );
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
        for key in [200u128, 500, 800] {
            let saved = take_record(&store, key);
            assert!(saved != (None, None), "{key} is stored somewhere");
            for parts in 1..=4 {
                let err = log_of(&store).check(&store, parts).unwrap_err();
                assert!(
                    err.to_string().contains("no idempotency record"),
                    "{key}, {parts} parts: {err}"
                );
            }
            put_record(&store, key, saved);
        }
        log_of(&store).check(&store, 2).unwrap();
        // A recent record also in the table, which no sweep covers (or
        // whose bytes differ): one of them is not what the writer left.
        let key = 900u128;
        let saved = take_record(&store, key);
        let record = match &saved {
            (Some(v), _) => v.clone(),
            (None, Some((_, row))) => read_recent_row(row).unwrap().1.to_vec(),
            (None, None) => unreachable!("900 is stored"),
        };
        let twice = |table: &[u8], recent: &[u8], ordinal: u64| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            txn.open_table(COMMANDS)
                .unwrap()
                .insert(key, table)
                .unwrap();
            txn.open_table(RECENT)
                .unwrap()
                .insert(ordinal, recent_row(key, recent).as_slice())
                .unwrap();
            txn.commit().unwrap();
            let checked = log_of(&store).check(&store, 2).map_err(|e| e.to_string());
            take_record(&store, key);
            checked
        };
        let sweep_to = |to: Option<u64>| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            let before = {
                let mut t = txn.open_table(CHECKPOINT).unwrap();
                let before = t.get(SWEEP_TO).unwrap().map(|v| v.value());
                match to {
                    Some(to) => t.insert(SWEEP_TO, to).unwrap(),
                    None => t.remove(SWEEP_TO).unwrap(),
                };
                before
            };
            txn.commit().unwrap();
            before
        };
        let running = sweep_to(None);
        let err = twice(&record, &record, 1_000).unwrap_err();
        assert!(err.contains("that no sweep merges"), "{err}");
        sweep_to(Some(1_000));
        let err = twice(&record, &noop, 1_000).unwrap_err();
        assert!(err.contains("differs from its recent one"), "{err}");
        twice(&record, &record, 1_000).unwrap();
        let err = twice(&record, &record, 1_001).unwrap_err();
        assert!(err.contains("that no sweep merges"), "{err}");
        sweep_to(running);
        put_record(&store, key, saved);
        log_of(&store).check(&store, 2).unwrap();
        // An id held twice among the recent records.
        let txn = store.writable().unwrap().begin_write().unwrap();
        txn.open_table(RECENT)
            .unwrap()
            .insert(u64::MAX - 1, recent_row(key, &record).as_slice())
            .unwrap();
        txn.open_table(RECENT)
            .unwrap()
            .insert(u64::MAX, recent_row(key, &record).as_slice())
            .unwrap();
        txn.commit().unwrap();
        let err = log_of(&store).check(&store, 2).unwrap_err().to_string();
        assert!(err.contains("two recent records"), "{err}");
    }

    /// The UUIDv7 records of a batch are packed into one row
    /// ([`crate::store::commands`]): each is checked as a record alone
    /// would be, whatever the split, and a row planted inside a pack's
    /// span (which lookups would miss) is named.
    #[test]
    fn packed_records_are_checked_like_any_other() {
        use crate::store::commands::{Records, pack_row};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 8, 0, 0).unwrap();
        let ms = t0.timestamp_millis() as u128;
        let v7 = |n: u128| ms << 80 | 0x7 << 76 | 0b10 << 62 | n;
        let batch: Vec<Pending> = (1..=6u128)
            .map(|n| {
                let body = serde_json::json!({"command_id": Uuid::from_u128(v7(n)), "job_id": Uuid::from_u128(n), "deployment": {"kind": "replica_set", "name": "rs"}});
                Pending::new(decode("p1", "create", body.to_string().as_bytes(), None).unwrap())
            })
            .collect();
        let mut next = 0u128;
        let mut ids = || {
            next += 1;
            Uuid::from_u128(1000 + next)
        };
        let replies = ledger.execute(&batch, t0, &mut ids).unwrap();
        assert!(replies.iter().all(|r| r.ok), "{replies:?}");
        let rows = || -> Vec<(u128, Vec<u8>)> {
            let txn = store.begin_read().unwrap();
            let t = txn.open_table(COMMANDS).unwrap();
            (t.iter().unwrap().map(|r| r.unwrap()))
                .map(|(k, v)| (k.value(), v.value().to_vec()))
                .collect()
        };
        assert_eq!(rows().len(), 1, "six records, one pack");
        assert_eq!(rows()[0].0, v7(6), "under its largest id");
        let records: Vec<(u128, Vec<u8>)> = {
            let txn = store.begin_read().unwrap();
            (Records::new(&txn, 0..=u128::MAX).unwrap())
                .map(|r| r.unwrap())
                .map(|(id, r)| (id, r.value().to_vec()))
                .collect()
        };
        assert_eq!(
            records.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=6).map(v7).collect::<Vec<_>>()
        );
        for parts in 1..=4 {
            log_of(&store).check(&store, parts).unwrap();
        }
        let set = |rows: &[(u128, Vec<u8>)]| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            {
                let mut t = txn.open_table(COMMANDS).unwrap();
                t.retain(|_, _| false).unwrap();
                for (k, v) in rows {
                    t.insert(k, v.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        };
        let check_all = |want: &str, id: u128| {
            for parts in 1..=4 {
                let err = log_of(&store).check(&store, parts).unwrap_err().to_string();
                assert!(err.contains(want), "{parts} parts: {err}");
                assert!(
                    err.contains(&Uuid::from_u128(id).to_string()),
                    "{parts} parts: {err}"
                );
            }
        };
        // The third command's record answering with the second's event.
        let mut edited = records.clone();
        edited[2].1 = records[1].1.clone();
        set(&[(v7(6), pack_row(&edited))]);
        check_all("its recorded reply", v7(3));
        // The fourth's record taken out of the pack.
        let mut fewer = records.clone();
        fewer.remove(3);
        set(&[(v7(6), pack_row(&fewer))]);
        check_all("no idempotency record", v7(4));
        // A row inside the pack's span: a lookup of the ids below it finds
        // that row, not the pack. Read whole, the table is out of order
        // there; a range that ends inside the span reads no record of
        // those ids, as a lookup would not.
        set(&[(v7(6), pack_row(&fewer)), (v7(4), records[3].1.clone())]);
        for parts in 1..=4 {
            let err = log_of(&store).check(&store, parts).unwrap_err().to_string();
            let (first, planted) = (Uuid::from_u128(v7(1)), Uuid::from_u128(v7(4)));
            let whole = format!("{first}: read after {planted}: a pack's span holds another row");
            let split = format!(
                "command {first}: the log holds its event at seq 1, but it has no idempotency record"
            );
            assert!(
                err.contains(&whole) || parts > 1 && err.contains(&split),
                "{parts} parts: {err}"
            );
        }
        set(&[(v7(6), pack_row(&records))]);
        log_of(&store).check(&store, 2).unwrap();
    }
}
