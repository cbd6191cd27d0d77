//! The rows of [`COMMANDS`]: a command's idempotency record alone, or a
//! *pack* of the records a commit brought, under one key.
//!
//! A commit of 64 commands inserted 64 records, each a B-tree insert that
//! cost more CPU per byte than the events' own (bench/RESULTS.md); one
//! row per commit costs about one. So the UUIDv7 records of a commit that
//! land in a gap of the table go in as one pack, keyed by its largest id;
//! any other record goes alone, as before.
//!
//! The invariant every lookup relies on: **no row's key lies inside a
//! pack's span** (its smallest id to its key) but the pack's own, so the
//! first row at or after an id is the only one that can hold it
//! ([`Committed::lookup`]). [`insert`] keeps it: a record whose id falls in a pack's
//! span is merged into that pack (one rewrite per pack per commit), and a
//! new pack only spans a gap between existing rows. A pack holds at most
//! [`PACK_MAX`] records, so a rewrite stays about the size of the page an
//! insert dirtied anyway; a larger one is split, each part keyed by its
//! own largest id. Only UUIDv7 ids of at most the batch's time (and its
//! hour ahead, [`super::records::v7_bound_at`]) are packed: ids of one
//! moment, so a pack's span is usually milliseconds wide and later records
//! seldom fall in it (one from a clock ahead widens it: what falls in is
//! merged, correct but a rewrite).
//!
//! The record bytes are [`super::rows::record_row`]'s, alone or packed:
//! packing changes where a record is kept, never what it says.
//! `audit verify` reads every record through [`Records`], which also
//! refuses packs that break the invariant.

use super::behind::RowRef;
use super::tables::COMMANDS;
use super::{Result, StoreError};
use redb::{AccessGuard, ReadableTable};
use std::ops::{Range, RangeInclusive};
use std::rc::Rc;

/// The first byte of a pack (a record's first byte is 1, 2 or `{`).
const PACK: u8 = 3;

/// The most records one pack holds: 96 records of about 61 bytes (and
/// their id and end) fit one 8 KiB page; at 128 a pack took a 16 KiB one,
/// 4 % more bytes per event at 512 per commit (bench/RESULTS.md).
pub const PACK_MAX: usize = 96;

/// The bytes before a pack's ids: [`PACK`], then the count (u32 LE).
const HEAD: usize = 5;

/// `records` (ids strictly increasing) as one pack: the byte `PACK` (3),
/// the count, the ids (16 bytes each, big-endian), the end of each record
/// (u32 LE, from the start of the records), then the records.
pub fn pack_row<R: AsRef<[u8]>>(records: &[(u128, R)]) -> Vec<u8> {
    assert!(!records.is_empty() && records.len() <= PACK_MAX);
    assert!(
        records.windows(2).all(|w| w[0].0 < w[1].0),
        "a pack's ids increase"
    );
    let bytes: usize = records.iter().map(|(_, r)| r.as_ref().len()).sum();
    let mut row = Vec::with_capacity(HEAD + records.len() * 20 + bytes);
    row.push(PACK);
    row.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for (id, _) in records {
        row.extend_from_slice(&id.to_be_bytes());
    }
    let mut end = 0u32;
    for (_, r) in records {
        end = u32::try_from(r.as_ref().len())
            .ok()
            .and_then(|len| end.checked_add(len))
            .expect("a pack under 4 GiB");
        row.extend_from_slice(&end.to_le_bytes());
    }
    for (_, r) in records {
        row.extend_from_slice(r.as_ref());
    }
    row
}

/// A row of [`COMMANDS`], read.
enum Row<'a> {
    /// The record of the command whose id is the row's key.
    One(&'a [u8]),
    Pack(Pack<'a>),
}

/// A pack, read in place.
struct Pack<'a> {
    ids: &'a [u8],
    ends: &'a [u8],
    records: &'a [u8],
}

impl<'a> Row<'a> {
    /// Read the row under `key`: a pack whose parts do not add up, whose
    /// ids do not increase or whose largest id is not `key` is refused (a
    /// lookup in it could miss a record).
    fn parse(key: u128, bytes: &'a [u8]) -> std::result::Result<Row<'a>, String> {
        let row = Row::split(bytes)?;
        if let Row::Pack(pack) = &row {
            let n = pack.len();
            if pack.end(n - 1) != pack.records.len()
                || (1..n).any(|i| pack.end(i - 1) > pack.end(i))
            {
                return Err("a pack's records do not fill it".into());
            }
            pack.check(key)?;
        }
        Ok(row)
    }

    /// A row's bytes split into their parts, unchecked but for the sizes
    /// (in O(1): for a row [`Row::parse`] read before).
    fn split(bytes: &'a [u8]) -> std::result::Result<Row<'a>, String> {
        let Some((&PACK, rest)) = bytes.split_first() else {
            return Ok(Row::One(bytes));
        };
        let n = match rest.get(..4) {
            Some(n) => u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize,
            None => return Err("a pack cut short".into()),
        };
        let rest = &rest[4..];
        if n == 0 || rest.len() < n * 20 {
            return Err(format!("a pack of {n} records in {} bytes", bytes.len()));
        }
        let (ids, rest) = rest.split_at(n * 16);
        let (ends, records) = rest.split_at(n * 4);
        Ok(Row::Pack(Pack { ids, ends, records }))
    }
}

impl<'a> Pack<'a> {
    fn len(&self) -> usize {
        self.ids.len() / 16
    }

    fn id(&self, i: usize) -> u128 {
        u128::from_be_bytes(self.ids[i * 16..][..16].try_into().expect("16 bytes"))
    }

    fn end(&self, i: usize) -> usize {
        u32::from_le_bytes(self.ends[i * 4..][..4].try_into().expect("4 bytes")) as usize
    }

    /// Where the `i`th record's bytes are in `records`.
    fn span(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        start..self.end(i)
    }

    fn record(&self, i: usize) -> &'a [u8] {
        &self.records[self.span(i)]
    }

    /// The record of `id`, if the pack holds it.
    fn get(&self, id: u128) -> Option<&'a [u8]> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.id(mid).cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.record(mid)),
            }
        }
        None
    }

    /// Its ids strictly increase, up to `key` (its row's).
    fn check(&self, key: u128) -> std::result::Result<(), String> {
        let n = self.len();
        if (1..n).any(|i| self.id(i - 1) >= self.id(i)) {
            return Err("a pack's ids are out of order".into());
        }
        if self.id(n - 1) != key {
            return Err(format!(
                "a pack's largest id is {}, not its key",
                uuid::Uuid::from_u128(self.id(n - 1))
            ));
        }
        Ok(())
    }
}

fn corrupt(key: u128, e: String) -> StoreError {
    StoreError::Corrupt(format!(
        "idempotency records at {}: {e}",
        uuid::Uuid::from_u128(key)
    ))
}

/// `COMMANDS` as one read transaction saw it, to look records up in (a
/// batch's, as of its start). Its last key is read once: an id above it
/// is in no row (a pack is keyed by its largest id), so a new UUIDv7
/// command, above every record stored, costs no search of the B-tree.
pub struct Committed {
    table: redb::ReadOnlyTable<u128, &'static [u8]>,
    last: Option<u128>,
}

impl Committed {
    pub fn new(table: redb::ReadOnlyTable<u128, &'static [u8]>) -> Result<Committed> {
        let last = table.last()?.map(|(key, _)| key.value());
        Ok(Committed { table, last })
    }

    /// The stored record of command `id`, if any (above the table's last
    /// key: none, without a search).
    pub fn lookup(&self, id: u128) -> Result<Option<Vec<u8>>> {
        match self.last {
            Some(last) if id <= last => lookup(&self.table, id),
            _ => Ok(None),
        }
    }
}

/// The stored record of command `id`, if any: in the first row at or
/// after `id`, alone under it or in that row's pack.
fn lookup(table: &impl ReadableTable<u128, &'static [u8]>, id: u128) -> Result<Option<Vec<u8>>> {
    let Some(row) = table.range(id..)?.next() else {
        return Ok(None);
    };
    let (key, value) = row?;
    let key = key.value();
    Ok(
        match Row::parse(key, value.value()).map_err(|e| corrupt(key, e))? {
            Row::One(record) => (key == id).then(|| record.to_vec()),
            Row::Pack(pack) => pack.get(id).map(<[u8]>::to_vec),
        },
    )
}

/// Write `records` (sorted by id, each id once) into `COMMANDS`, a record
/// already stored replaced: runs of UUIDv7 ids (`packable`) in a gap of
/// the table as one pack each, a record in a pack's span into that pack,
/// any other alone.
pub fn insert(
    table: &mut redb::Table<u128, &'static [u8]>,
    records: &[(u128, Vec<u8>)],
    packable: impl Fn(u128) -> bool,
) -> Result<()> {
    debug_assert!(records.windows(2).all(|w| w[0].0 < w[1].0));
    let mut i = 0;
    while i < records.len() {
        let id = records[i].0;
        // The first row at or after `id`: its key, the smallest id it
        // holds, and, if it is a pack whose span holds `id`, its bytes
        // (read once, to merge into).
        let next = match table.range(id..)?.next() {
            None => None,
            Some(row) => {
                let (key, value) = row?;
                let key = key.value();
                Some(
                    match Row::parse(key, value.value()).map_err(|e| corrupt(key, e))? {
                        Row::One(_) => (key, key, None),
                        Row::Pack(p) => {
                            let min = p.id(0);
                            (key, min, (min <= id).then(|| value.value().to_vec()))
                        }
                    },
                )
            }
        };
        match next {
            Some((key, _, Some(bytes))) => {
                // In that pack's span, as are the records after it up to
                // its key: merged into it, one rewrite.
                let n = records[i..].partition_point(|(r, _)| *r <= key);
                let Ok(Row::Pack(pack)) = Row::split(&bytes) else {
                    unreachable!("parsed above")
                };
                let old = (0..pack.len()).map(|j| (pack.id(j), pack.record(j)));
                let new = records[i..i + n].iter().map(|(r, b)| (*r, b.as_slice()));
                write_packs(table, &merge(old, new))?;
                i += n;
            }
            Some((key, _, None)) if key == id => {
                table.insert(id, records[i].1.as_slice())?;
                i += 1;
            }
            next => {
                // A gap, up to the next row's span or the table's end.
                let limit = next.map(|(_, min, _)| min);
                let n = records[i..].partition_point(|(r, _)| limit.is_none_or(|l| *r < l));
                assert!(n > 0, "the row after a gap starts past the gap's first id");
                insert_in_gap(table, &records[i..i + n], &packable)?;
                i += n;
            }
        }
    }
    Ok(())
}

/// [`insert`] of records that lie in one gap between rows.
fn insert_in_gap(
    table: &mut redb::Table<u128, &'static [u8]>,
    records: &[(u128, Vec<u8>)],
    packable: impl Fn(u128) -> bool,
) -> Result<()> {
    let mut i = 0;
    while i < records.len() {
        let run = (records[i..].iter())
            .take(PACK_MAX)
            .take_while(|(r, _)| packable(*r))
            .count();
        if run >= 2 {
            let pack = &records[i..i + run];
            table.insert(pack[run - 1].0, pack_row(pack).as_slice())?;
            i += run;
        } else {
            table.insert(records[i].0, records[i].1.as_slice())?;
            i += 1;
        }
    }
    Ok(())
}

/// Two sorted runs of records as one, `new`'s record where both hold an id.
fn merge<'r>(
    old: impl Iterator<Item = (u128, &'r [u8])>,
    new: impl Iterator<Item = (u128, &'r [u8])>,
) -> Vec<(u128, &'r [u8])> {
    let mut all: Vec<(u128, &[u8])> = new.chain(old).collect();
    // Stable: of two equal ids, `new`'s (first) is kept.
    all.sort_by_key(|(id, _)| *id);
    all.dedup_by_key(|(id, _)| *id);
    all
}

/// `records` (sorted) as packs of at most [`PACK_MAX`], of about equal
/// size, each under its largest id.
fn write_packs(
    table: &mut redb::Table<u128, &'static [u8]>,
    records: &[(u128, &[u8])],
) -> Result<()> {
    let parts = records.len().div_ceil(PACK_MAX);
    let per = records.len().div_ceil(parts);
    for part in records.chunks(per) {
        table.insert(part[part.len() - 1].0, pack_row(part).as_slice())?;
    }
    Ok(())
}

/// Every stored record with an id in a key range, in id order: each row
/// at or after the range's start, packs opened, up to the first row past
/// its end (whose pack may hold ids in it). An id out of order (a pack
/// whose span holds another row) or a pack that does not parse is an
/// error: lookups would miss records.
pub struct Records {
    rows: redb::Range<'static, u128, &'static [u8]>,
    keys: RangeInclusive<u128>,
    /// The pack being read, and the next of its records.
    pack: Option<(Rc<AccessGuard<'static, &'static [u8]>>, usize)>,
    last: Option<u128>,
    done: bool,
}

impl Records {
    pub fn new(txn: &redb::ReadTransaction, keys: RangeInclusive<u128>) -> Result<Records> {
        let table = txn.open_table(COMMANDS)?;
        Ok(Records {
            rows: table.range(*keys.start()..)?,
            keys,
            pack: None,
            last: None,
            done: false,
        })
    }

    fn advance(&mut self) -> Result<Option<(u128, RowRef<'static>)>> {
        loop {
            if let Some((guard, i)) = &mut self.pack {
                let Ok(Row::Pack(pack)) = Row::split(guard.value()) else {
                    unreachable!("checked when read")
                };
                if *i < pack.len() {
                    let (id, span) = (pack.id(*i), pack.span(*i));
                    let at = HEAD + pack.len() * 20;
                    let found = (Rc::clone(guard), at + span.start..at + span.end);
                    *i += 1;
                    if let Some(found) = self.take(id, RowRef::Packed(found.0, found.1))? {
                        return Ok(Some(found));
                    }
                    continue;
                }
                self.pack = None;
            }
            if self.done {
                return Ok(None);
            }
            let Some(row) = self.rows.next() else {
                return Ok(None);
            };
            let (key, value) = row?;
            let key = key.value();
            self.done = key > *self.keys.end();
            match Row::parse(key, value.value()).map_err(|e| corrupt(key, e))? {
                Row::One(_) => {
                    if let Some(found) = self.take(key, RowRef::Table(value))? {
                        return Ok(Some(found));
                    }
                }
                Row::Pack(_) => self.pack = Some((Rc::new(value), 0)),
            }
        }
    }

    /// `id`'s record if it is in the range, after checking it follows the
    /// last one read.
    fn take(&mut self, id: u128, row: RowRef<'static>) -> Result<Option<(u128, RowRef<'static>)>> {
        if let Some(last) = self.last.filter(|last| *last >= id) {
            return Err(corrupt(
                id,
                format!(
                    "read after {}: a pack's span holds another row (a lookup could miss records)",
                    uuid::Uuid::from_u128(last)
                ),
            ));
        }
        self.last = Some(id);
        Ok(self.keys.contains(&id).then_some((id, row)))
    }
}

/// `(id, bytes)` of each record, in id order.
impl Iterator for Records {
    type Item = Result<(u128, RowRef<'static>)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.advance().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use redb::{Database, ReadableDatabase};
    use std::collections::BTreeMap;

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("c.redb")).unwrap();
        (dir, db)
    }

    fn rec(id: u128, tag: u8) -> (u128, Vec<u8>) {
        (id, vec![2, tag, (id % 251) as u8])
    }

    fn write(db: &Database, records: &[(u128, Vec<u8>)], packable: impl Fn(u128) -> bool) {
        let txn = db.begin_write().unwrap();
        insert(&mut txn.open_table(COMMANDS).unwrap(), records, packable).unwrap();
        txn.commit().unwrap();
    }

    /// Every record, through [`Records`], and the rows' keys and kinds.
    type Stored = (Vec<(u128, Vec<u8>)>, Vec<(u128, usize)>);

    fn stored(db: &Database) -> Stored {
        let txn = db.begin_read().unwrap();
        let all = Records::new(&txn, 0..=u128::MAX).unwrap();
        let mut records = Vec::new();
        for found in all {
            let (id, r) = found.unwrap();
            records.push((id, r.value().to_vec()));
        }
        let t = txn.open_table(COMMANDS).unwrap();
        let rows = (t.iter().unwrap())
            .map(|r| r.unwrap())
            .map(|(k, v)| match Row::parse(k.value(), v.value()).unwrap() {
                Row::One(_) => (k.value(), 0),
                Row::Pack(p) => (k.value(), p.len()),
            })
            .collect();
        (records, rows)
    }

    /// A lookup as the write path makes it ([`Committed`]).
    fn look(db: &Database, id: u128) -> Option<Vec<u8>> {
        let txn = db.begin_read().unwrap();
        let committed = Committed::new(txn.open_table(COMMANDS).unwrap()).unwrap();
        committed.lookup(id).unwrap()
    }

    #[test]
    fn a_pack_reads_back_each_record_and_refuses_bad_bytes() {
        let records: Vec<_> = [5u128, 9, 1 << 100].iter().map(|&i| rec(i, 7)).collect();
        let row = pack_row(&records);
        let Ok(Row::Pack(p)) = Row::parse(1 << 100, &row) else {
            panic!("a pack")
        };
        assert_eq!(p.len(), 3);
        for (i, (id, r)) in records.iter().enumerate() {
            assert_eq!((p.id(i), p.record(i)), (*id, r.as_slice()));
            assert_eq!(p.get(*id), Some(r.as_slice()));
        }
        assert_eq!(p.get(6), None);
        assert_eq!(p.get(u128::MAX), None);
        assert!(p.check(1 << 100).is_ok());
        assert!(p.check(9).is_err());
        // A record row is not a pack; a cut or padded pack is refused.
        let parse = |bytes: &[u8]| Row::parse(1 << 100, bytes).map(|_| ());
        assert!(matches!(Row::parse(7, &[2, 1, 2]), Ok(Row::One(_))));
        assert!(parse(&row[..row.len() - 1]).is_err());
        assert!(parse(&[row.as_slice(), &[0]].concat()).is_err());
        assert!(parse(&row[..3]).is_err());
        assert!(parse(&[PACK, 0, 0, 0, 0]).is_err());
        // Under another key than its largest id, or its ids out of order:
        // a lookup in it could miss a record, so it is refused there too.
        assert!(Row::parse(9, &row).is_err());
        let mut swapped = row.clone();
        swapped[HEAD..HEAD + 32].rotate_left(16);
        assert_eq!(parse(&swapped), Err("a pack's ids are out of order".into()));
        let (_d, db) = db();
        let txn = db.begin_write().unwrap();
        txn.open_table(COMMANDS)
            .unwrap()
            .insert(1 << 100, swapped.as_slice())
            .unwrap();
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let err = lookup(&txn.open_table(COMMANDS).unwrap(), 5).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");
    }

    #[test]
    fn runs_in_a_gap_are_packed_and_every_record_is_found() {
        let (_d, db) = db();
        // Alone: 100 and 10_000 (not packable); packed: 200..=210 and 300.
        let packable = |id: u128| id != 100 && id < 10_000;
        write(&db, &[rec(100, 0), rec(10_000, 0)], packable);
        let first: Vec<_> = (200..=210).chain([300]).map(|i| rec(i, 1)).collect();
        write(&db, &first, packable);
        let (records, rows) = stored(&db);
        assert_eq!(rows, vec![(100, 0), (300, 12), (10_000, 0)]);
        assert_eq!(records.len(), 14);
        for (id, r) in &records {
            assert_eq!(look(&db, *id).as_ref(), Some(r), "{id}");
        }
        for absent in [0, 99, 101, 199, 211, 299, 301, 9_999, 10_001, u128::MAX] {
            assert_eq!(look(&db, absent), None, "{absent}");
        }

        // A run that reaches the next row's span stops before it: 90..=99
        // pack (the gap below 100), 101 goes alone into the gap below the
        // pack (it ends at the pack's smallest id, 200).
        write(
            &db,
            &(90..100)
                .chain([101])
                .map(|i| rec(i, 2))
                .collect::<Vec<_>>(),
            packable,
        );
        let (_, rows) = stored(&db);
        assert_eq!(
            rows,
            vec![(99, 10), (100, 0), (101, 0), (300, 12), (10_000, 0)]
        );
    }

    #[test]
    fn a_record_in_a_packs_span_is_merged_into_it_and_a_full_pack_splits() {
        let (_d, db) = db();
        let all = |_: u128| true;
        write(&db, &[rec(10, 0), rec(20, 0), rec(30, 0)], all);
        // 15 and 25 fall in the pack's span, 20 is rewritten, 40 follows.
        write(&db, &[rec(15, 1), rec(20, 1), rec(25, 1), rec(40, 1)], all);
        let (records, rows) = stored(&db);
        assert_eq!(rows, vec![(30, 5), (40, 0)]);
        let tags: Vec<(u128, u8)> = records.iter().map(|(i, r)| (*i, r[1])).collect();
        assert_eq!(
            tags,
            vec![(10, 0), (15, 1), (20, 1), (25, 1), (30, 0), (40, 1)]
        );

        // Past PACK_MAX: parts of about equal size, each under its
        // largest id, the last still under the pack's key.
        let wide: Vec<_> = (0..PACK_MAX as u128)
            .map(|i| rec(1000 + 10 * i, 2))
            .collect();
        write(&db, &wide, all);
        let inside: Vec<_> = (0..PACK_MAX as u128)
            .map(|i| rec(1005 + 10 * i, 3))
            .collect();
        write(&db, &inside, all);
        let (records, rows) = stored(&db);
        // The pack took every one of them but the last (2 × PACK_MAX - 1
        // records: parts of PACK_MAX and one less); the last, past its
        // key, went alone.
        let p = PACK_MAX as u128;
        let key = 1000 + 10 * (p - 1);
        assert_eq!(
            rows[2..],
            [
                (1000 + 5 * (p - 1), PACK_MAX),
                (key, PACK_MAX - 1),
                (key + 5, 0)
            ]
        );
        assert_eq!(records.len(), 6 + 2 * PACK_MAX);
        assert!(rows.iter().all(|(_, n)| *n <= PACK_MAX));
        for (id, r) in &records {
            assert_eq!(look(&db, *id).as_ref(), Some(r), "{id}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Commits of any ids, packable or not, rewrites among them: the
        /// table holds exactly what a map would, every record is found
        /// where it is, no pack passes its limit, and reading the whole
        /// table in any key ranges finds every record once.
        #[test]
        fn commands_hold_what_a_map_would(
            commits in proptest::collection::vec(
                proptest::collection::btree_set(0u128..600, 0..300), 1..8),
            tag_seed in any::<u8>(),
            cut in 0u128..600,
        ) {
            let (_d, db) = db();
            let mut model = BTreeMap::new();
            for (n, ids) in commits.iter().enumerate() {
                let tag = tag_seed.wrapping_add(n as u8);
                let records: Vec<_> = ids.iter().map(|&i| rec(i, tag)).collect();
                // Ids divisible by 7 are not packable (UUIDv4's, say).
                write(&db, &records, |id| id % 7 != 0);
                model.extend(records);
            }
            let (records, rows) = stored(&db);
            prop_assert_eq!(&records, &model.clone().into_iter().collect::<Vec<_>>());
            prop_assert!(rows.iter().all(|(_, n)| *n <= PACK_MAX));
            for id in 0..610 {
                prop_assert_eq!(look(&db, id), model.get(&id).cloned(), "id {}", id);
            }
            let txn = db.begin_read().unwrap();
            let mut halves = Vec::new();
            for keys in [0..=cut, cut + 1..=u128::MAX] {
                for found in Records::new(&txn, keys).unwrap() {
                    halves.push(found.unwrap().0);
                }
            }
            prop_assert_eq!(halves, model.keys().copied().collect::<Vec<_>>());
        }
    }
}
