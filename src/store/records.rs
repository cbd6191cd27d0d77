//! The idempotency records of commands whose ids are not time-ordered:
//! appended first, then merged into [`COMMANDS`] in id order.
//!
//! A record is kept forever under its `command_id` (or in a pack of a
//! commit's records, [`commands`](super::commands)). A record whose id is
//! above every id in `COMMANDS` (UUIDv7 producers' mostly are) is appended
//! to its end at once. Any other (UUIDv4 producers') would land on its own
//! page of a table that grows with the log: at 64 commands per commit that
//! was 6.5× the bytes of the events themselves (bench/RESULTS.md). So it is
//! appended to [`RECENT`] under an ordinal (neighbouring pages), and kept
//! in memory ([`Recent`]) until it is in `COMMANDS`:
//!
//! - The commit that brings the records waiting to [`Recent::buffer`]
//!   *freezes* them, its own included: a sweep of those records (ordinals
//!   up to `to`), sorted by id.
//! - Each later commit merges the sweep's next slice into `COMMANDS` (at
//!   least as many records as it appends), so neighbouring ids share the
//!   pages they dirty. The sweep's `to` is in [`CHECKPOINT`] ([`SWEEP_TO`]),
//!   written with the freeze; how far it got is not stored (that would
//!   dirty a page per commit): a reopened store merges it from the start
//!   again, writing rows `COMMANDS` may hold already, equal to them.
//! - The commit that merges the last slice deletes the sweep's ordinals
//!   from `RECENT` (one range). Its ids leave memory only after the *next*
//!   successful commit: a batch is sealed only while no commit runs, so
//!   every batch decided after that commit reads `COMMANDS` as of a
//!   snapshot that holds them. Before it, the writer finds them here.
//!
//! A record rewritten (a group follower rebuilding a command whose events
//! arrived in two fetches, or a command it had answered as a no-op while
//! leading) goes where the record is: in place under its ordinal, and into
//! `COMMANDS` too while a sweep covers it, so the two never differ.
//!
//! Nothing here changes before its commit succeeded: an error before the
//! commit leaves memory equal to the disk; one in it poisons the store,
//! which is reopened ([`Recent::load`]).
//!
//! Where a new record goes decides only what it costs, never whether it is
//! found: lookups read both. The fast path is for records that land where
//! the last ones did: above every id in `COMMANDS`, or a UUIDv7 above
//! every UUIDv7 there (`Recent::v7_max`). UUIDv4 ids sort above
//! UUIDv7's (their first bits are random, a v7's are the time), so one
//! UUIDv4 producer would otherwise send every UUIDv7 producer's records
//! through `RECENT` too; UUIDv7 ids of one moment sort together however
//! many UUIDv4 ids the table holds, and the first of them after the last
//! lands on the page that one did.
//!
//! Only a UUIDv7 of at most an hour after the time of the batch that
//! writes it (bcp's clock, [`v7_bound_at`]) counts: one from a producer
//! whose clock runs further ahead, or an id that only looks like a UUIDv7,
//! would otherwise send every other UUIDv7 producer's records through
//! `RECENT` until their clocks passed it. A reopened store looks for the
//! largest UUIDv7 below the time of its last event and an hour
//! ([`Recent::load`]).
//!
//! Known limits: a UUIDv7 producer whose clock runs behind the others'
//! sends its records through `RECENT`, and one less than an hour ahead
//! sends theirs there until their clocks pass it. Freezing a sweep and letting its
//! ids go take a few milliseconds under the lock the writer's lookups
//! take, once per sweep.

use super::tables::{CHECKPOINT, COMMANDS, RECENT, SWEEP_TO};
use super::{Result, StoreError};
use redb::{ReadableTable, ReadableTableMetadata};
use std::collections::HashMap;

/// Records waiting before a sweep starts. The rows are held in memory
/// (about 120 bytes each with the map), so at most about twice this many.
pub const BUFFER: usize = crate::domain::limits::RECORDS_WAITING_MAX;

/// The fewest records a commit merges while a sweep runs.
const SLICE_MIN: usize = 64;

/// How many keys of `COMMANDS` [`Recent::load`] reads, down from its
/// bound, for the largest UUIDv7 id.
const V7_LOOKBACK: usize = 256;

/// The largest UUIDv7 id of millisecond `ms` (since the Unix epoch).
pub fn v7_bound(ms: u64) -> u128 {
    u128::from(ms.min((1 << 48) - 1)) << 80 | ((1 << 80) - 1)
}

/// How far ahead of bcp's clock a producer's UUIDv7 may be and still count
/// as where UUIDv7 records end.
const V7_AHEAD_MS: u64 = 3_600_000;

/// The largest UUIDv7 id that counts at time `t` (bcp's clock).
pub fn v7_bound_at(t: chrono::DateTime<chrono::Utc>) -> u128 {
    v7_bound((t.timestamp_millis().max(0) as u64).saturating_add(V7_AHEAD_MS))
}

/// Whether `id` is a UUIDv7 (version 7, RFC 9562 variant): time first.
pub fn is_v7(id: u128) -> bool {
    let id = uuid::Uuid::from_u128(id);
    id.get_version_num() == 7 && id.get_variant() == uuid::Variant::RFC4122
}

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

/// `table` of `txn`, or `None` if the store has none (written before it).
fn optional<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: redb::TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A row of `RECENT`: (ordinal, id, record).
pub type RecentRow = (u64, u128, Vec<u8>);

/// Every row of `RECENT`, in ordinal order, and the last ordinal of the
/// sweep under way: what [`Recent::load`] and `audit verify` read.
pub fn read_recent(txn: &redb::ReadTransaction) -> Result<(Vec<RecentRow>, Option<u64>)> {
    let sweep_to = match optional(txn, CHECKPOINT)? {
        Some(t) => t.get(SWEEP_TO)?.map(|v| v.value()),
        None => None,
    };
    let mut rows = Vec::new();
    if let Some(t) = optional(txn, RECENT)? {
        rows.reserve(t.len()? as usize);
        for r in t.iter()? {
            let (k, v) = r?;
            let (id, record) = read_recent_row(v.value()).map_err(|e| {
                StoreError::Corrupt(format!("the recent record at ordinal {}: {e}", k.value()))
            })?;
            rows.push((k.value(), id, record.to_vec()));
        }
    }
    Ok((rows, sweep_to))
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
    /// The largest UUIDv7 id in `COMMANDS`, where known: a new UUIDv7
    /// above it lands on the page the last one did.
    v7_max: Option<u128>,
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
    /// Records written to `COMMANDS`: appended at its end, the sweep's
    /// next slice, rewrites of records there or covered by the sweep.
    merge: Vec<(u128, Vec<u8>)>,
    next: u64,
    /// How many of the sweep's ids are merged after this commit.
    merged: Option<usize>,
    /// The sweep this commit finishes: its ordinals up to here are deleted.
    finish_to: Option<u64>,
    /// The sweep this commit freezes.
    freeze: Option<Sweep>,
    waiting: usize,
    table_max: Option<u128>,
    v7_max: Option<u128>,
    /// UUIDv7 ids above it do not count as UUIDv7: not packed either.
    v7_bound: Option<u128>,
}

impl Recent {
    /// Read `RECENT` and the sweep's state (a store without the table has
    /// no recent records). The largest UUIDv7 id in `COMMANDS` is looked
    /// for below `v7_bound` (UUIDv7 ids made up to some time: UUIDv4 ids
    /// mostly sort above them), or among its last keys without one.
    pub fn load(
        txn: &redb::ReadTransaction,
        buffer: usize,
        v7_bound: Option<u128>,
    ) -> Result<Recent> {
        let (rows, sweep_to) = read_recent(txn)?;
        let next = rows.last().map_or(1, |(ord, ..)| ord + 1);
        let mut held = HashMap::with_capacity(rows.len());
        for (ord, id, record) in rows {
            if let Some((other, _)) = held.insert(id, (ord, record)) {
                return Err(StoreError::Corrupt(format!(
                    "command {} has two recent records ({other} and {ord})",
                    uuid::Uuid::from_u128(id)
                )));
            }
        }
        // Never an ordinal a sweep covers (a sweep's rows may all be gone
        // from a store restored by hand: new rows there would be deleted
        // with them).
        let next = next.max(sweep_to.map_or(0, |to| to + 1));
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
        let (table_max, v7_max) = match optional(txn, COMMANDS)? {
            Some(t) => {
                let mut v7_max = None;
                let below = match v7_bound {
                    Some(bound) => t.range(..=bound)?,
                    None => t.iter()?,
                };
                for row in below.rev().take(V7_LOOKBACK) {
                    let id = row?.0.value();
                    if is_v7(id) {
                        v7_max = Some(id);
                        break;
                    }
                }
                (t.last()?.map(|(k, _)| k.value()), v7_max)
            }
            None => (None, None),
        };
        Ok(Recent {
            held,
            next,
            frozen_to,
            waiting,
            table_max,
            v7_max,
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
            v7_max: None,
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
    /// and rewrites the records `rewrites` (id, record); UUIDv7 ids above
    /// `v7_bound` do not count as UUIDv7 ([`v7_bound_at`]).
    ///
    /// A new record whose id is above every id in `COMMANDS`, or a UUIDv7
    /// above every UUIDv7 there, goes there at once: it lands where the
    /// last ones did (time-ordered ids, UUIDv7, mostly do), which is what
    /// this module's detour saves the others.
    /// A record rewritten goes where its record is: in place if it is held
    /// (and into `COMMANDS` too if a sweep covers it, so both stay equal),
    /// else to `COMMANDS`. A "new" record whose id is held is a rewrite.
    pub fn plan(
        &self,
        records: Vec<(u128, Vec<u8>)>,
        rewrites: Vec<(u128, Vec<u8>)>,
        v7_bound: Option<u128>,
    ) -> Plan {
        let v7 = |id: u128| is_v7(id) && v7_bound.is_none_or(|bound| id <= bound);
        let mut next = self.next;
        let mut merge = Vec::new();
        let mut appends = Vec::with_capacity(records.len());
        // Ids rewritten in place, and where in `appends`.
        let mut rewritten: HashMap<u128, usize> = HashMap::new();
        let swept_to = self.sweep.as_ref().map_or(0, |s| s.to);
        let (held, mut new): (Vec<_>, Vec<_>) =
            (records.into_iter()).partition(|(id, _)| self.held.contains_key(id));
        for (id, record) in rewrites.into_iter().chain(held) {
            match self.held.get(&id) {
                // Its sweep is done and its row deleted, or never recent:
                // in `COMMANDS`.
                _ if self.leaving.binary_search(&id).is_ok() => merge.push((id, record)),
                None => merge.push((id, record)),
                Some((ord, _)) => {
                    if *ord <= swept_to {
                        merge.push((id, record.clone()));
                    }
                    rewritten.insert(id, appends.len());
                    appends.push((*ord, id, record));
                }
            }
        }
        new.sort_unstable_by_key(|(id, _)| *id);
        let mut table_max = self.table_max;
        let mut v7_max = self.v7_max;
        for (id, record) in new {
            let v7 = v7(id);
            if self.leaving.binary_search(&id).is_ok() {
                merge.push((id, record));
            } else if table_max.is_none_or(|max| id > max)
                || v7 && v7_max.is_some_and(|max| id > max)
            {
                merge.push((id, record));
                table_max = table_max.max(Some(id));
                if v7 {
                    v7_max = Some(id);
                }
            } else {
                appends.push((next, id, record));
                next += 1;
            }
        }
        let added = (next - self.next) as usize;
        // The sweep's next slice (the records as rewritten, if they were).
        let (mut merged, mut finish_to) = (None, None);
        if let Some(s) = &self.sweep {
            let end = (s.merged + added.max(SLICE_MIN)).min(s.ids.len());
            for id in &s.ids[s.merged..end] {
                let record = match rewritten.get(id) {
                    Some(&i) => appends[i].2.clone(),
                    None => self.held[id].1.clone(),
                };
                merge.push((*id, record));
            }
            merged = Some(end);
            if end == s.ids.len() {
                finish_to = Some(s.to);
            }
        }
        let mut waiting = self.waiting + added;
        let mut freeze = None;
        if self.sweep.is_none() && waiting >= self.buffer {
            let mut ids: Vec<u128> = (self.held.iter())
                .filter(|(_, (ord, _))| *ord > self.frozen_to)
                .map(|(id, _)| *id)
                .chain(appends.iter().filter(|a| a.0 >= self.next).map(|a| a.1))
                .collect();
            ids.sort_unstable();
            freeze = Some(Sweep {
                to: next - 1,
                ids,
                merged: 0,
            });
            waiting = 0;
        }
        for (id, _) in &merge {
            table_max = table_max.max(Some(*id));
            if v7(*id) {
                v7_max = v7_max.max(Some(*id));
            }
        }
        // An id both rewritten and in the sweep's slice is there twice,
        // with the same record.
        merge.sort_by_key(|(id, _)| *id);
        merge.dedup_by(|a, b| {
            debug_assert!(a.0 != b.0 || a.1 == b.1, "one record per id");
            a.0 == b.0
        });
        Plan {
            appends,
            merge,
            next,
            merged,
            finish_to,
            freeze,
            waiting,
            table_max,
            v7_max,
            v7_bound,
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
        self.waiting = plan.waiting;
        self.table_max = plan.table_max;
        self.v7_max = plan.v7_max;
        if let (Some(s), Some(merged)) = (&mut self.sweep, plan.merged) {
            s.merged = merged;
        }
        if plan.finish_to.is_some() {
            self.leaving = self.sweep.take().expect("a sweep finished").ids;
        }
        if let Some(s) = plan.freeze {
            self.frozen_to = s.to;
            self.sweep = Some(s);
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
            let v7 = |id| is_v7(id) && self.v7_bound.is_none_or(|bound| id <= bound);
            super::commands::insert(&mut txn.open_table(COMMANDS)?, &self.merge, v7)?;
        }
        if let Some(to) = self.finish_to {
            txn.open_table(RECENT)?.retain_in(..=to, |_, _| false)?;
            txn.open_table(CHECKPOINT)?.remove(SWEEP_TO)?;
        }
        if let Some(s) = &self.freeze {
            txn.open_table(CHECKPOINT)?.insert(SWEEP_TO, s.to)?;
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
        let plan = recent.plan(owned(new), owned(rewrites), Some(v7_bound(1000)));
        let txn = db.begin_write().unwrap();
        plan.write(&txn).unwrap();
        txn.commit().unwrap();
        recent.committed(plan);
    }

    /// Every record in `COMMANDS`, packs opened.
    fn commands(db: &Database) -> Vec<(u128, Vec<u8>)> {
        let txn = db.begin_read().unwrap();
        let Ok(all) = super::super::commands::Records::new(&txn, 0..=u128::MAX) else {
            return Vec::new();
        };
        (all.map(Result::unwrap))
            .map(|(id, r)| (id, r.value().to_vec()))
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

    /// A UUIDv7 id made at millisecond `ms` (the `n`th of it).
    fn v7(ms: u64, n: u64) -> u128 {
        u128::from(ms) << 80 | 0x7 << 76 | 0b10 << 62 | u128::from(n)
    }

    /// A UUIDv4 id whose random bits start with `top`.
    fn v4(top: u16, n: u64) -> u128 {
        u128::from(top) << 112 | 0x4 << 76 | 0b10 << 62 | u128::from(n)
    }

    /// One UUIDv4 producer among UUIDv7 ones: its ids sort above theirs,
    /// yet a UUIDv7 above every UUIDv7 in `COMMANDS` still goes there at
    /// once (it lands where the last did). A reopened store finds the
    /// largest UUIDv7 below its bound (without one, among the table's last
    /// keys); failing that, it learns it from the next sweep that merges
    /// one.
    #[test]
    fn uuidv7_records_append_beside_uuidv4_ones() {
        assert!(is_v7(v7(1, 0)) && !is_v7(v4(0xf000, 0)));
        assert!(is_v7(uuid::Uuid::now_v7().as_u128()));
        assert!(!is_v7(
            uuid::Uuid::from_u128(v7(1, 0) & !(0b11 << 62)).as_u128()
        ));
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("r.redb")).unwrap();
        let mut recent = Recent::empty(4);
        let (big, r) = (v4(0xf000, 1), &b"r"[..]);
        commit(&db, &mut recent, &[(v7(100, 0), r), (big, r)], &[]);
        assert_eq!(commands(&db).len(), 2, "both above everything: appended");
        // Later UUIDv7s are below the UUIDv4 but above every UUIDv7.
        commit(&db, &mut recent, &[(v7(101, 0), r), (v7(101, 1), r)], &[]);
        commit(
            &db,
            &mut recent,
            &[(v7(102, 0), r), (v4(0x8000, 2), r)],
            &[],
        );
        let ids =
            |db: &Database| -> Vec<u128> { commands(db).into_iter().map(|(id, _)| id).collect() };
        assert_eq!(
            ids(&db),
            [v7(100, 0), v7(101, 0), v7(101, 1), v7(102, 0), big]
        );
        assert_eq!(recent_ids(&db), [v4(0x8000, 2)], "the UUIDv4 below waits");
        // A UUIDv7 from a clock behind the others' waits too.
        commit(&db, &mut recent, &[(v7(50, 0), r)], &[]);
        assert_eq!(recent_ids(&db), [v4(0x8000, 2), v7(50, 0)]);
        // One of a clock ahead of the batch's bound waits, and does not
        // count: the next in time still goes at once.
        commit(&db, &mut recent, &[(v7(5000, 0), r)], &[]);
        assert_eq!(recent_ids(&db), [v4(0x8000, 2), v7(50, 0), v7(5000, 0)]);
        assert_eq!(recent.v7_max, Some(v7(102, 0)));
        commit(&db, &mut recent, &[(v7(103, 0), r)], &[]);
        assert!(ids(&db).contains(&v7(103, 0)));
        // Nor does it when a sweep merges it.
        commit(&db, &mut recent, &[(v4(0x8000, 3), r)], &[]);
        assert!(recent.sweep().is_some(), "four wait: frozen");
        commit(&db, &mut recent, &[], &[]);
        assert!(ids(&db).contains(&v7(5000, 0)), "merged");
        assert_eq!(recent.v7_max, Some(v7(103, 0)));
        let txn = db.begin_read().unwrap();
        let loaded = Recent::load(&txn, 8, Some(v7_bound(1000))).unwrap();
        assert_eq!(loaded.v7_max, Some(v7(103, 0)), "found behind the UUIDv4");
        let unbounded = Recent::load(&txn, 8, None).unwrap();
        assert_eq!(unbounded.v7_max, Some(v7(5000, 0)), "without a bound");

        // A table whose last keys are all UUIDv4: found below the bound (and
        // a UUIDv7 of a clock ahead of it ignored); without one, unknown
        // until a sweep merges one.
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("r.redb")).unwrap();
        let mut recent = Recent::empty(usize::MAX);
        let many: Vec<(u128, &[u8])> = (0..V7_LOOKBACK as u64)
            .map(|n| (v4(0xf000, n), r))
            .collect();
        commit(&db, &mut recent, &[(v7(100, 0), r)], &[]);
        commit(&db, &mut recent, &many, &[]);
        commit(&db, &mut recent, &[(v7(900, 0), r)], &[]);
        assert_eq!(recent.v7_max, Some(v7(900, 0)));
        let txn = db.begin_read().unwrap();
        let loaded = Recent::load(&txn, 2, Some(v7_bound(200))).unwrap();
        assert_eq!(loaded.v7_max, Some(v7(100, 0)));
        assert_eq!(
            Recent::load(&txn, 2, Some(v7_bound(900))).unwrap().v7_max,
            Some(v7(900, 0))
        );
        let mut recent = Recent::load(&txn, 2, Some(v7_bound(99))).unwrap();
        assert_eq!(recent.v7_max, None);
        commit(&db, &mut recent, &[(v7(101, 0), r), (v7(101, 1), r)], &[]);
        assert_eq!(recent_ids(&db), [v7(101, 0), v7(101, 1)], "waiting: frozen");
        commit(&db, &mut recent, &[], &[]);
        assert_eq!(recent.v7_max, Some(v7(101, 1)), "learnt from the merge");
        commit(&db, &mut recent, &[(v7(102, 0), r)], &[]);
        assert!(ids(&db).contains(&v7(102, 0)), "appended at once again");
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
        let loaded = Recent::load(&db.begin_read().unwrap(), 2, None).unwrap();
        assert_eq!(loaded.held, recent.held);
        assert_eq!(
            (loaded.next, loaded.sweep, loaded.waiting, loaded.table_max),
            (recent.next, None, 1, Some(1000))
        );
        // Frozen, then reopened before its merge: the sweep loads back.
        commit(&db, &mut recent, &[(5, b"e")], &[]);
        let sweep = recent.sweep().cloned().expect("frozen");
        assert_eq!(sweep.ids, [5, 30]);
        let loaded = Recent::load(&db.begin_read().unwrap(), 2, None).unwrap();
        assert_eq!(loaded.sweep, Some(sweep));
        // Merged with a record appended at once in the same commit.
        commit(&db, &mut recent, &[(2000, b"y")], &[]);
        let merged: Vec<u128> = commands(&db).into_iter().map(|(id, _)| id).collect();
        assert_eq!(merged, [5, 10, 20, 30, 1000, 2000]);
        assert_eq!(recent_ids(&db), Vec::<u128>::new());
    }

    /// A sweep longer than a slice merges over several commits; reopened
    /// part way, it merges from its start again. A record rewritten while
    /// its sweep covers it is written to both tables (merged yet or not,
    /// as far as this process knows), so they never differ; a "new"
    /// record whose id is held is a rewrite, not a second row.
    #[test]
    fn a_long_sweep_merges_over_commits_and_rewrites_keep_both_tables_equal() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("r.redb")).unwrap();
        let mut recent = Recent::empty(100);
        commit(&db, &mut recent, &[(u128::MAX, b"top")], &[]);
        let records: Vec<(u128, Vec<u8>)> = (1..=100u128).map(|i| (i * 10, vec![1])).collect();
        let refs: Vec<(u128, &[u8])> = records.iter().map(|(i, r)| (*i, r.as_slice())).collect();
        commit(&db, &mut recent, &refs, &[]);
        assert_eq!(
            recent.sweep().map(|s| (s.ids.len(), s.merged)),
            Some((100, 0))
        );
        commit(&db, &mut recent, &[(5, b"n")], &[]);
        assert_eq!(recent.sweep().map(|s| s.merged), Some(SLICE_MIN));
        assert_eq!(commands(&db).len(), 1 + SLICE_MIN);
        // Reopened: the sweep starts again from its first id.
        let mut recent = Recent::load(&db.begin_read().unwrap(), 100, None).unwrap();
        assert_eq!(
            recent.sweep().map(|s| (s.ids.len(), s.merged)),
            Some((100, 0))
        );
        // 100 (merged before the reopen) and 900 (not yet) rewritten, and
        // 300 sent again as "new": each lands in both tables.
        commit(
            &db,
            &mut recent,
            &[(300, b"c3")],
            &[(100, b"c1"), (900, b"c9")],
        );
        let table: HashMap<u128, Vec<u8>> = commands(&db).into_iter().collect();
        for (id, want) in [(100, b"c1"), (300, b"c3"), (900, b"c9")] {
            assert_eq!(table[&id], want, "{id} in COMMANDS");
            assert_eq!(recent.get(id), Some(&want[..]), "{id} held");
        }
        assert_eq!(recent_ids(&db).iter().filter(|id| **id == 300).count(), 1);
        commit(&db, &mut recent, &[], &[]);
        assert!(recent.sweep().is_none(), "merged in two commits");
        let table: HashMap<u128, Vec<u8>> = commands(&db).into_iter().collect();
        assert_eq!(table.len(), 1 + 100);
        assert_eq!((&table[&900], &table[&1000]), (&b"c9".to_vec(), &vec![1]));
        assert_eq!(recent_ids(&db), [5]);
    }
}
