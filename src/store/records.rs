//! The idempotency records of recent commands: appended, then merged into
//! [`COMMANDS`] in key order.
//!
//! A record is kept forever under its `command_id`. Producers that send
//! random ids (UUIDv4) would land each record on its own page of
//! `COMMANDS`, a table that grows with the log: at 64 commands per commit
//! that was 6.5× the bytes of the events themselves (bench/RESULTS.md).
//! So each commit appends its records to [`RECENT`] under an ordinal
//! (neighbouring pages), and this module keeps them in memory ([`Recent`])
//! until they are in `COMMANDS`:
//!
//! - Once [`Recent::buffer`] records wait, the next commit *freezes* them:
//!   a sweep of those records (ordinals up to `to`), sorted by id.
//! - Each commit then merges the sweep's next slice into `COMMANDS` (at
//!   least as many records as it appends), so neighbouring ids share the
//!   pages they dirty. The sweep's `to` is in [`CHECKPOINT`] ([`SWEEP_TO`]),
//!   written with the freeze; how far it got is not stored (that would
//!   dirty a page per commit): a reopened store merges it from the start
//!   again, writing the same rows.
//! - The commit that merges the last slice deletes the sweep's ordinals
//!   from `RECENT` (one range). Its ids leave memory only after the *next*
//!   successful commit: a batch is sealed only while no commit runs, so
//!   every batch decided after that commit reads `COMMANDS` as of a
//!   snapshot that holds them. Before it, the writer finds them here.
//!
//! Everything here changes only after its commit succeeded; a commit that
//! fails part way poisons the store, which is reopened ([`Recent::load`]).
//! A record rewritten in place (a group follower rebuilding a command
//! whose events arrived in two fetches) keeps its ordinal.

use super::tables::{CHECKPOINT, COMMANDS, RECENT, SWEEP_TO};
use super::{Result, StoreError};
use redb::{ReadableTable, ReadableTableMetadata};
use std::collections::HashMap;

/// Records waiting before a sweep starts. The rows are held in memory
/// (about 170 bytes each with the map), so at most about twice this many.
pub const BUFFER: usize = 32_768;

/// The fewest records a commit merges while a sweep runs.
const SLICE_MIN: usize = 64;

/// A record of `RECENT`: the command id, then the record row.
pub fn recent_row(id: u128, record: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(16 + record.len());
    row.extend_from_slice(&id.to_be_bytes());
    row.extend_from_slice(record);
    row
}

/// The command id and record of a `RECENT` row.
pub fn read_recent_row(row: &[u8]) -> Result<(u128, &[u8]), String> {
    match row.split_first_chunk::<16>() {
        Some((id, record)) => Ok((u128::from_be_bytes(*id), record)),
        None => Err(format!("a recent record of {} bytes", row.len())),
    }
}

/// A sweep under way: the ids it merges, sorted, and how many are merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sweep {
    pub to: u64,
    pub ids: Vec<u128>,
    pub merged: usize,
}

/// The records of `RECENT`, in memory, and the sweep.
#[derive(Debug)]
pub struct Recent {
    /// id → (ordinal, record): every row of `RECENT` (and, until the next
    /// commit, the ids of a sweep that just finished).
    held: HashMap<u128, (u64, Vec<u8>)>,
    next: u64,
    sweep: Option<Sweep>,
    /// The last ordinal a sweep (running or done) covers.
    frozen_to: u64,
    /// Records after `frozen_to`: waiting for the next sweep.
    waiting: usize,
    /// The largest id in `COMMANDS`.
    table_max: Option<u128>,
    /// Ids of the sweep the last commit finished: they leave `held` after
    /// the next commit.
    leaving: Vec<u128>,
    buffer: usize,
}

/// What one commit writes of the records, planned before it and applied
/// to [`Recent`] after it succeeded.
pub struct Plan {
    /// (ordinal, id, record) appended to `RECENT`, or rewritten in place.
    appends: Vec<(u64, u128, Vec<u8>)>,
    /// Records merged into `COMMANDS`: the sweep's next slice, and any
    /// rewritten record the sweep merged already.
    merge: Vec<(u128, Vec<u8>)>,
    next: u64,
    sweep: Option<Sweep>,
    /// The sweep this commit finishes (its ordinals are deleted).
    finishes: Option<Sweep>,
    frozen_to: u64,
    waiting: usize,
    table_max: Option<u128>,
}

impl Recent {
    /// Read `RECENT` and the sweep's state (a store without the table has
    /// no recent records).
    pub fn load(txn: &redb::ReadTransaction, buffer: usize) -> Result<Recent> {
        let mut held = HashMap::new();
        let mut next = 1;
        let mut sweep_to = None;
        if let Ok(t) = txn.open_table(CHECKPOINT) {
            sweep_to = t.get(SWEEP_TO)?.map(|v| v.value());
        }
        match txn.open_table(RECENT) {
            Ok(t) => {
                held.reserve(t.len()? as usize);
                for r in t.iter()? {
                    let (k, v) = r?;
                    let (id, record) = read_recent_row(v.value()).map_err(StoreError::Corrupt)?;
                    if let Some((other, _)) = held.insert(id, (k.value(), record.to_vec())) {
                        return Err(StoreError::Corrupt(format!(
                            "command {} has two recent records ({other} and {})",
                            uuid::Uuid::from_u128(id),
                            k.value()
                        )));
                    }
                    next = k.value() + 1;
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let sweep = sweep_to.map(|to| {
            let mut ids: Vec<u128> = held
                .iter()
                .filter(|(_, (ord, _))| *ord <= to)
                .map(|(id, _)| *id)
                .collect();
            ids.sort_unstable();
            Sweep { to, ids, merged: 0 }
        });
        let frozen_to = sweep.as_ref().map_or(0, |s| s.to);
        let waiting = held.values().filter(|(ord, _)| *ord > frozen_to).count();
        let table_max = match txn.open_table(COMMANDS) {
            Ok(t) => t.last()?.map(|(k, _)| k.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Recent {
            held,
            next,
            frozen_to,
            waiting,
            table_max,
            sweep,
            leaving: Vec::new(),
            buffer,
        })
    }

    /// No records (a new store, before [`Recent::load`]).
    pub fn empty(buffer: usize) -> Recent {
        Recent {
            held: HashMap::new(),
            next: 1,
            sweep: None,
            frozen_to: 0,
            waiting: 0,
            table_max: None,
            leaving: Vec::new(),
            buffer,
        }
    }

    pub fn buffer(&self) -> usize {
        self.buffer
    }

    pub fn set_buffer(&mut self, buffer: usize) {
        self.buffer = buffer;
    }

    /// The record of `id`, if it is here.
    pub fn get(&self, id: u128) -> Option<&[u8]> {
        self.held.get(&id).map(|(_, r)| r.as_slice())
    }

    /// The sweep under way.
    pub fn sweep(&self) -> Option<&Sweep> {
        self.sweep.as_ref()
    }

    /// Plan a commit that writes the records of new commands `records`
    /// and rewrites the records `rewrites` (id, record).
    ///
    /// A new record whose id is above every id in `COMMANDS` goes there at
    /// once: it is appended to the table's end (time-ordered ids, UUIDv7,
    /// mostly are), which is what this module's detour saves the others.
    pub fn plan(&self, records: &[(u128, Vec<u8>)], rewrites: &[(u128, Vec<u8>)]) -> Plan {
        let mut next = self.next;
        let mut merge = Vec::new();
        let mut rewritten: HashMap<u128, &[u8]> = HashMap::new();
        let mut appends = Vec::with_capacity(records.len());
        for (id, record) in rewrites {
            match self.held.get(id) {
                // Its sweep is done and its row deleted, or never recent:
                // in `COMMANDS`.
                _ if self.leaving.binary_search(id).is_ok() => merge.push((*id, record.clone())),
                None => merge.push((*id, record.clone())),
                // Recent: in place, and in `COMMANDS` too if the sweep
                // merged it already.
                Some((ord, _)) => {
                    rewritten.insert(*id, record);
                    if (self.sweep.as_ref())
                        .is_some_and(|s| s.ids[..s.merged].binary_search(id).is_ok())
                    {
                        merge.push((*id, record.clone()));
                    }
                    appends.push((*ord, *id, record.clone()));
                }
            }
        }
        let mut table_max = self.table_max;
        let mut new: Vec<&(u128, Vec<u8>)> = records.iter().collect();
        new.sort_unstable_by_key(|(id, _)| *id);
        for (id, record) in new {
            debug_assert!(!self.held.contains_key(id), "a new command's record");
            if table_max.is_none_or(|max| *id > max) {
                merge.push((*id, record.clone()));
                table_max = Some(*id);
            } else {
                appends.push((next, *id, record.clone()));
                next += 1;
            }
        }
        let added = (next - self.next) as usize;
        let mut sweep = self.sweep.clone();
        let mut finishes = None;
        if let Some(s) = &mut sweep {
            let end = (s.merged + added.max(SLICE_MIN)).min(s.ids.len());
            for id in &s.ids[s.merged..end] {
                let record = match rewritten.get(id) {
                    Some(r) => r.to_vec(),
                    None => self.held[id].1.clone(),
                };
                merge.push((*id, record));
            }
            s.merged = end;
            if s.merged == s.ids.len() {
                finishes = sweep.take();
            }
        }
        let mut frozen_to = self.frozen_to;
        let mut waiting = self.waiting + added;
        if sweep.is_none() && finishes.is_none() && waiting >= self.buffer {
            let mut ids: Vec<u128> = (self.held.iter())
                .filter(|(_, (ord, _))| *ord > self.frozen_to)
                .map(|(id, _)| *id)
                .chain(appends.iter().filter(|a| a.0 >= self.next).map(|a| a.1))
                .collect();
            ids.sort_unstable();
            frozen_to = next - 1;
            sweep = Some(Sweep {
                to: frozen_to,
                ids,
                merged: 0,
            });
            waiting = 0;
        }
        for (id, _) in &merge {
            table_max = table_max.max(Some(*id));
        }
        merge.sort_unstable_by_key(|(id, _)| *id);
        Plan {
            appends,
            merge,
            next,
            sweep,
            finishes,
            frozen_to,
            waiting,
            table_max,
        }
    }

    /// Apply a plan whose commit succeeded.
    pub fn committed(&mut self, plan: Plan) {
        for id in std::mem::take(&mut self.leaving) {
            self.held.remove(&id);
        }
        for (ord, id, record) in plan.appends {
            self.held.insert(id, (ord, record));
        }
        self.next = plan.next;
        self.sweep = plan.sweep;
        self.frozen_to = plan.frozen_to;
        self.waiting = plan.waiting;
        self.table_max = plan.table_max;
        if let Some(done) = plan.finishes {
            self.leaving = done.ids;
        }
    }
}

impl Plan {
    /// Write the plan into the batch's transaction.
    pub fn write(&self, txn: &redb::WriteTransaction) -> Result<()> {
        if !self.appends.is_empty() {
            let mut recent = txn.open_table(RECENT)?;
            for (ord, id, record) in &self.appends {
                recent.insert(*ord, recent_row(*id, record).as_slice())?;
            }
        }
        if !self.merge.is_empty() {
            let mut commands = txn.open_table(COMMANDS)?;
            for (id, record) in &self.merge {
                commands.insert(*id, record.as_slice())?;
            }
        }
        if let Some(s) = self.sweep.as_ref().filter(|s| s.merged == 0) {
            // Frozen in this commit.
            txn.open_table(CHECKPOINT)?.insert(SWEEP_TO, s.to)?;
        }
        if let Some(done) = &self.finishes {
            txn.open_table(RECENT)?
                .retain_in(..=done.to, |_, _| false)?;
            txn.open_table(CHECKPOINT)?.remove(SWEEP_TO)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase};

    /// Plan and commit `records` on `db`, as `Store::commit` does.
    fn commit(
        db: &Database,
        recent: &mut Recent,
        new: &[(u128, &[u8])],
        rewrites: &[(u128, &[u8])],
    ) {
        let owned = |rs: &[(u128, &[u8])]| -> Vec<(u128, Vec<u8>)> {
            rs.iter().map(|(i, r)| (*i, r.to_vec())).collect()
        };
        let plan = recent.plan(&owned(new), &owned(rewrites));
        let txn = db.begin_write().unwrap();
        plan.write(&txn).unwrap();
        txn.commit().unwrap();
        recent.committed(plan);
    }

    fn commands(db: &Database) -> Vec<(u128, Vec<u8>)> {
        let txn = db.begin_read().unwrap();
        let Ok(t) = txn.open_table(COMMANDS) else {
            return Vec::new();
        };
        t.iter()
            .unwrap()
            .map(|r| r.unwrap())
            .map(|(k, v)| (k.value(), v.value().to_vec()))
            .collect()
    }

    fn recent_ids(db: &Database) -> Vec<u128> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(RECENT).unwrap();
        t.iter()
            .unwrap()
            .map(|r| read_recent_row(r.unwrap().1.value()).unwrap().0)
            .collect()
    }

    /// A new record above every id in `COMMANDS` goes there at once;
    /// others wait. A sweep freezes once `buffer` records wait, merges in
    /// the next commit (in id order), deletes its rows, and lets its ids go
    /// one commit later. A record rewritten (a group follower) while recent
    /// keeps its ordinal and is merged as rewritten; one rewritten after its
    /// sweep, or never recent, is written to `COMMANDS`. What is on disk
    /// loads back as what is in memory.
    #[test]
    fn records_wait_unless_they_append_and_sweeps_merge_them_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("r.redb")).unwrap();
        let mut recent = Recent::empty(2);
        let z = (1000, b"z".to_vec());
        commit(&db, &mut recent, &[(1000, b"z")], &[]);
        assert_eq!(commands(&db), std::slice::from_ref(&z), "appended at once");
        commit(&db, &mut recent, &[(20, b"b"), (10, b"a")], &[]);
        assert_eq!(commands(&db), std::slice::from_ref(&z));
        assert_eq!(recent_ids(&db), [10, 20], "in id order");
        let sweep = recent.sweep().expect("two records wait: frozen");
        assert_eq!(
            (sweep.to, sweep.ids.as_slice(), sweep.merged),
            (2, &[10, 20][..], 0)
        );
        // The next commit merges the sweep (10 rewritten on the way) and
        // finishes it: its rows leave RECENT, its ids stay a commit more.
        commit(&db, &mut recent, &[(30, b"c")], &[(10, b"a2")]);
        let (a2, b) = ((10, b"a2".to_vec()), (20, b"b".to_vec()));
        assert_eq!(commands(&db), [a2.clone(), b, z.clone()]);
        assert_eq!(recent_ids(&db), [30]);
        assert!(recent.sweep().is_none());
        assert_eq!(recent.get(10), Some(&b"a2"[..]), "still held");
        // 20 rewritten after its sweep, 1000 never recent: COMMANDS only.
        // Then the sweep's ids go.
        commit(&db, &mut recent, &[], &[(20, b"b2"), (1000, b"z2")]);
        let (b2, z2) = ((20, b"b2".to_vec()), (1000, b"z2".to_vec()));
        assert_eq!(commands(&db), [a2.clone(), b2.clone(), z2.clone()]);
        assert_eq!(recent_ids(&db), [30]);
        assert_eq!((recent.get(10), recent.get(20)), (None, None));
        // A rewrite of a record still recent: in place, same ordinal.
        commit(&db, &mut recent, &[], &[(30, b"c2")]);
        assert_eq!(recent_ids(&db), [30]);
        assert_eq!(recent.get(30), Some(&b"c2"[..]));
        let loaded = Recent::load(&db.begin_read().unwrap(), 2).unwrap();
        assert_eq!(loaded.held, recent.held);
        assert_eq!(
            (loaded.next, loaded.sweep, loaded.waiting, loaded.table_max),
            (recent.next, None, 1, Some(1000))
        );
        // Frozen, then reopened before its merge: the sweep loads back.
        commit(&db, &mut recent, &[(5, b"e")], &[]);
        let sweep = recent.sweep().cloned().expect("frozen");
        assert_eq!(sweep.ids, [5, 30]);
        let loaded = Recent::load(&db.begin_read().unwrap(), 2).unwrap();
        assert_eq!(loaded.sweep, Some(sweep));
        // Merged with a record appended at once in the same commit.
        commit(&db, &mut recent, &[(2000, b"y")], &[]);
        let merged: Vec<u128> = commands(&db).into_iter().map(|(id, _)| id).collect();
        assert_eq!(merged, [5, 10, 20, 30, 1000, 2000]);
        assert_eq!(recent_ids(&db), Vec::<u128>::new());
    }
}
