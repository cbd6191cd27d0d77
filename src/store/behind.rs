//! Job rows written behind the log: what a commit of the write path puts
//! off, how long it may put it off, how readers see it, and how a store
//! opened after a crash catches its rows up with its log.
//!
//! Every batch's events and idempotency records are durable before its
//! replies leave, as always. The rows of the jobs it touched (views,
//! catalogs, event index: [`JOB_ROWS`]) are committed state too, but are
//! held in memory (`Behind`) and written by a later commit: a job's rows
//! are held at least [`ROWS_HELD`] events, so a job touched by many
//! batches in that window is written once, and then written, oldest
//! first, in chunks of `ROWS_CHUNK` jobs or a share per commit, so rows
//! that became due together are written over many commits rather than in
//! one.
//!
//! What this keeps true:
//! - **Readers see every committed batch.** Queries read `JOB_ROWS` through
//!   [`JobRows`], the table under the rows held behind it; a batch's rows
//!   join `Behind` right after its commit, before its replies go out.
//! - **Each job's stored rows are one state of it.** A commit writes all
//!   of a job's rows held behind, as they stood before the commit (never
//!   the committing batch's own): a reader that opened the table before or
//!   after that commit, with the rows held behind as they were, sees one
//!   state of the job either way. (A batch written through does write its
//!   own rows; readers wait for its commit.) Queries answer `as_of_seq`
//!   from [`Store::applied_seq`], the state the rows they read are of.
//! - **The table lags the log by at most [`ROWS_BEHIND_MAX`] events.** A
//!   job's rows are written at the latest when their oldest unwritten
//!   change is that far behind the head; a batch of more than half that
//!   many events writes its rows through.
//! - **A clean close leaves the table current.** [`Store::checkpoint`] (and
//!   dropping the last handle of a writable store) writes everything held
//!   behind and records the head it stands at ([`ROWS_AT`] in
//!   [`CHECKPOINT`]); the first commit after it removes that record. A
//!   store opened with the record is read as it is: a log changed by hand
//!   after a clean close is found by the startup check and `audit verify`,
//!   not folded into the rows.
//! - **A crash costs a fold of the last [`ROWS_BEHIND_MAX`] events.** A
//!   store opened without the record was being written when it stopped:
//!   `Store::catch_up` folds each job's events of the log's last
//!   `ROWS_BEHIND_MAX` that are newer than its stored version onto its
//!   stored state, and gives its event index their seqs. A writable store
//!   writes the result and a checkpoint at once; a read-only one (the audit
//!   tools) holds it in memory. If the events folded do not check out (a
//!   tail edited by hand), a writable store is refused and a read-only one
//!   reads only its log (`audit verify` names the event).

use super::rows::{self, JobKey, JobState, Row};
use super::tables::*;
use super::{Result, Store, StoreError};
use crate::domain::{Catalog, Job, World};
use redb::{AccessGuard, ReadOnlyTable, ReadableTable};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::{RangeBounds, RangeInclusive};
use uuid::Uuid;

/// How long (in events of the log) a job's rows are held before they may
/// be written: the window in which further changes to the job cost
/// nothing more.
pub const ROWS_HELD: u64 = 8192;

/// How far (in events) `JOB_ROWS` may lag the log: the rows held longer
/// than [`ROWS_HELD`] are written over the next `ROWS_BEHIND_MAX -
/// ROWS_HELD` events, evenly, and none is held longer than this. Also the
/// most events a store opened after a crash folds to catch up.
pub const ROWS_BEHIND_MAX: u64 = 2 * ROWS_HELD;

/// The fewest jobs a commit writes the rows of, unless some are overdue.
const ROWS_CHUNK: usize = 64;

/// A batch with more events than this writes its rows at once (a group
/// follower catching up, say), so that no row falls further behind than
/// [`ROWS_BEHIND_MAX`].
const WRITE_THROUGH: usize = (ROWS_BEHIND_MAX / 2) as usize;

/// A row of one job held behind: `(kind, sub)` of its key, and the row
/// (`None`: the row is removed).
type HeldRow = ((u8, u128), Option<Vec<u8>>);

/// The rows of one job held behind.
struct Held {
    /// Seq of the first event of the oldest batch whose rows of the job
    /// are held.
    since: u64,
    /// Its rows, in key order: a handful (a view, a class row, the
    /// snapshots a few batches changed, one event index row).
    rows: Vec<HeldRow>,
    /// The last seq of its event index row held (if one is).
    indexed: u64,
}

/// Committed job rows not yet written to `JOB_ROWS`.
#[derive(Default)]
pub(super) struct Behind {
    /// Job → its rows held (one map entry per job, not per row: a batch
    /// holds several rows of each job it touched).
    jobs: BTreeMap<u128, Held>,
    /// `(since, job)`: the jobs held, oldest first.
    order: BTreeSet<(u64, u128)>,
    /// Whether [`CHECKPOINT`] holds [`ROWS_AT`] (the rows were current at
    /// that seq when it was written). The first commit after it removes it.
    marked: bool,
    /// Whether the table may lag the log (rows held, or the log grew,
    /// since the last checkpoint): what a checkpoint is for. False until a
    /// store's rows are caught up, so a store that failed to open never
    /// checkpoints rows it did not catch up.
    lagging: bool,
    /// Why the job rows of a store opened read-only could not be caught up
    /// with its log (an edited tail): they are not read then, only the log.
    unreadable: Option<String>,
    /// The log's head as readers see it: the table and the rows held here
    /// are the state after this seq (a batch's events are in the log a
    /// moment before its rows join the held ones).
    applied: u64,
    /// How many times the log was cut back ([`Store::truncate_to`]): the
    /// same seq then names another event, so a reader that read under
    /// another count read a state this store no longer holds.
    cut_backs: u64,
}

impl Behind {
    /// The rows held with keys in `range`, in key order.
    fn range(
        &self,
        range: impl RangeBounds<JobKey>,
    ) -> impl Iterator<Item = (JobKey, &Option<Vec<u8>>)> {
        // The jobs the range touches (a bound that excludes a key still
        // includes its job's other rows); the filter cuts exactly.
        let job = |b: std::ops::Bound<&JobKey>| match b {
            std::ops::Bound::Unbounded => std::ops::Bound::Unbounded,
            std::ops::Bound::Included(k) | std::ops::Bound::Excluded(k) => {
                std::ops::Bound::Included(k.0)
            }
        };
        let jobs = (job(range.start_bound()), job(range.end_bound()));
        self.jobs
            .range(jobs)
            .flat_map(|(&job, held)| {
                held.rows
                    .iter()
                    .map(move |((kind, sub), row)| ((job, *kind, *sub), row))
            })
            .filter(move |(key, _)| range.contains(key))
    }

    fn rows_of(&self, job: u128) -> impl Iterator<Item = (JobKey, &Option<Vec<u8>>)> {
        self.range((job, 0, 0)..=(job, u8::MAX, u128::MAX))
    }

    /// How many rows are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.jobs.values().map(|held| held.rows.len()).sum()
    }

    /// The jobs to write in a commit of `events` events ending at `head`
    /// (all of them: `all`), oldest first: every job held
    /// [`ROWS_BEHIND_MAX`] events, and of those held [`ROWS_HELD`], a
    /// share that writes them all by the time the oldest would reach
    /// `ROWS_BEHIND_MAX` (so jobs that became due together, as a batch's
    /// do, are written over many commits, not in one).
    fn due(&self, head: u64, events: u64, all: bool) -> Vec<u128> {
        if all {
            return self.order.iter().map(|&(_, job)| job).collect();
        }
        let held = self
            .order
            .range(..=(head.saturating_sub(ROWS_HELD), u128::MAX));
        let Some(&(oldest, _)) = held.clone().next() else {
            return Vec::new();
        };
        let (n, overdue) = held.clone().fold((0, 0), |(n, overdue), &(since, _)| {
            let late = since.saturating_add(ROWS_BEHIND_MAX) <= head;
            (n + 1, overdue + usize::from(late))
        });
        let left = (oldest + ROWS_BEHIND_MAX).saturating_sub(head).max(events);
        let share = (n as u64 * events).div_ceil(left) as usize;
        // Fewer jobs at a time cost more per job (the leaves and branches
        // a write dirties are shared by neighbouring jobs): wait for a
        // chunk, unless some are overdue.
        let share = match n >= ROWS_CHUNK {
            true => share.max(ROWS_CHUNK),
            false => 0,
        };
        held.take(share.max(overdue)).map(|&(_, job)| job).collect()
    }

    /// `jobs`' rows are in the table now.
    fn written(&mut self, jobs: &[u128]) {
        for job in jobs {
            let held = self.jobs.remove(job).expect("a job held behind");
            self.order.remove(&(held.since, *job));
        }
    }

    /// Hold committed `rows` of a batch whose first event is `since`.
    fn hold(&mut self, since: u64, rows: Vec<Row<JobKey>>) {
        let mut rows = rows.into_iter().peekable();
        while let Some(((id, kind, sub), row)) = rows.next() {
            let held = self.jobs.entry(id).or_insert_with(|| {
                self.order.insert((since, id));
                Held {
                    since,
                    rows: Vec::new(),
                    indexed: 0,
                }
            });
            held.hold((kind, sub), row);
            // The rest of this job's rows (a batch's come in job order).
            while let Some(((_, kind, sub), row)) = rows.next_if(|(k, _)| k.0 == id) {
                held.hold((kind, sub), row);
            }
        }
    }

    /// Every row is in the table and [`ROWS_AT`] says so: nothing held.
    fn current(&mut self) {
        self.jobs.clear();
        self.order.clear();
        self.marked = true;
        self.lagging = false;
    }

    /// Seq of the oldest event whose rows are not written.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.order.first().map(|&(since, _)| since)
    }
}

impl Held {
    /// Hold one row of the job. Its event index rows held are one row (the
    /// last, as `JobRow::Event` is the last kind): the batch's seqs join
    /// the one already held (nothing has read them from the table yet).
    fn hold(&mut self, key: (u8, u128), row: Option<Vec<u8>>) {
        let index = JobRow::Event as u8;
        if key.0 == index
            && let Some(row) = &row
        {
            let last = rows::index_last(key.1, row).expect("an index row built here");
            if let Some((_, Some(into))) = self.rows.last_mut().filter(|r| r.0.0 == index) {
                rows::index_join(into, self.indexed, key.1 as u64, row);
                self.indexed = last;
                return;
            }
            self.indexed = last;
        }
        match self.rows.binary_search_by_key(&key, |r| r.0) {
            Ok(i) => self.rows[i].1 = row,
            Err(i) => self.rows.insert(i, (key, row)),
        }
    }
}

/// One committed row: read from its table, or held behind it in memory (a
/// job row here; a recent idempotency record for `audit verify`).
pub enum RowRef<'v> {
    Table(AccessGuard<'static, &'static [u8]>),
    /// A part of a row: an idempotency record in a pack
    /// ([`commands`](super::commands)), the row shared by its records.
    Packed(
        std::rc::Rc<AccessGuard<'static, &'static [u8]>>,
        std::ops::Range<usize>,
    ),
    Behind(&'v [u8]),
    /// A value made from a stored row (`audit verify`'s one entry per
    /// snapshot of a row of several).
    Owned(Vec<u8>),
}

impl RowRef<'_> {
    pub fn value(&self) -> &[u8] {
        match self {
            RowRef::Table(g) => g.value(),
            RowRef::Packed(g, part) => &g.value()[part.clone()],
            RowRef::Behind(b) => b,
            RowRef::Owned(v) => v,
        }
    }
}

/// `JOB_ROWS` as committed, for some keys: a read transaction of the table
/// and a copy of the rows held behind it, taken together
/// ([`Store::job_rows`]).
pub struct JobRowsView {
    txn: redb::ReadTransaction,
    behind: BTreeMap<JobKey, Option<Vec<u8>>>,
}

impl JobRowsView {
    /// The read transaction the view's table is of (for the other tables,
    /// as of the same commit).
    pub fn txn(&self) -> &redb::ReadTransaction {
        &self.txn
    }

    /// The rows, to read (on any thread: the view is shared, each thread
    /// opens its own reader).
    pub fn rows(&self) -> Result<JobRows<'_>> {
        Ok(JobRows {
            table: self.txn.open_table(JOB_ROWS)?,
            behind: &self.behind,
        })
    }
}

/// Reads of [`JobRowsView`]: a held row hides the table's under its key.
pub struct JobRows<'v> {
    table: ReadOnlyTable<JobKey, &'static [u8]>,
    behind: &'v BTreeMap<JobKey, Option<Vec<u8>>>,
}

impl<'v> JobRows<'v> {
    pub fn get(&self, key: JobKey) -> Result<Option<RowRef<'v>>> {
        Ok(match self.behind.get(&key) {
            Some(Some(row)) => Some(RowRef::Behind(row)),
            Some(None) => None,
            None => self.table.get(key)?.map(RowRef::Table),
        })
    }

    /// The rows with keys in `range`, in key order.
    pub fn range(&self, range: impl RangeBounds<JobKey> + Clone) -> Result<Merged<'v>> {
        Ok(Merged {
            table: self.table.range(range.clone())?.peekable(),
            behind: self.behind.range(range).peekable(),
        })
    }
}

/// The table's rows and the held ones, merged in key order.
pub struct Merged<'v> {
    table: std::iter::Peekable<redb::Range<'static, JobKey, &'static [u8]>>,
    behind: std::iter::Peekable<std::collections::btree_map::Range<'v, JobKey, Option<Vec<u8>>>>,
}

impl<'v> Iterator for Merged<'v> {
    type Item = Result<(JobKey, RowRef<'v>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let stored = match self.table.peek() {
                Some(Ok((k, _))) => Some(k.value()),
                Some(Err(_)) => {
                    let e = self.table.next()?.err()?;
                    return Some(Err(e.into()));
                }
                None => None,
            };
            let held = self.behind.peek().map(|(k, _)| **k);
            match (stored, held) {
                (None, None) => return None,
                (Some(s), h) if h.is_none_or(|h| s < h) => {
                    let (k, v) = self.table.next()?.ok()?;
                    return Some(Ok((k.value(), RowRef::Table(v))));
                }
                (s, Some(h)) => {
                    if s == Some(h) {
                        self.table.next(); // hidden by the held row
                    }
                    let (_, row) = self.behind.next()?;
                    if let Some(row) = row {
                        return Some(Ok((h, RowRef::Behind(row))));
                    } // removed: go on
                }
                (Some(_), None) => unreachable!("matched above"),
            }
        }
    }
}

/// The job rows a store opened after a crash lacked, and the first seq
/// they cover.
type Caught = (u64, Vec<Row<JobKey>>);

/// The seq of the last event in `events` (0: none), in a read or a write
/// transaction.
pub(super) fn last_seq(events: &impl ReadableTable<u64, &'static [u8]>) -> Result<u64> {
    Ok(events.last()?.map_or(0, |(k, _)| k.value()))
}

/// Write one job row into `table` (`None`: remove it).
fn put(
    table: &mut redb::Table<'_, JobKey, &'static [u8]>,
    key: JobKey,
    row: &Option<Vec<u8>>,
) -> Result<()> {
    match row {
        Some(bytes) => table.insert(key, bytes.as_slice())?,
        None => table.remove(key)?,
    };
    Ok(())
}

/// Whether a store's snapshot rows are in the layout of several a row
/// ([`SNAPSHOT_ROWS`]): every store opened for writing; one written before,
/// opened read-only, may hold one row per snapshot.
pub(crate) fn snapshot_rows_chunked(txn: &redb::ReadTransaction) -> Result<bool> {
    match txn.open_table(CHECKPOINT) {
        Ok(t) => Ok(t.get(SNAPSHOT_ROWS)?.is_some()),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// How a store lays out its job rows ([`COMBINED_ROWS`]): combined in
/// every store opened for writing; one written before, opened read-only,
/// may hold them apart.
pub(crate) fn row_layout(txn: &redb::ReadTransaction) -> Result<rows::Layout> {
    match txn.open_table(CHECKPOINT) {
        Ok(t) if t.get(COMBINED_ROWS)?.is_some() => Ok(rows::Layout::Combined),
        Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => Ok(rows::Layout::Separate),
        Err(e) => Err(e.into()),
    }
}

/// The log's head, and the seq the rows were checkpointed at (`None`: the
/// store was being written when it stopped).
fn head_and_checkpoint(txn: &redb::ReadTransaction) -> Result<(u64, Option<u64>)> {
    let head = last_seq(&txn.open_table(EVENTS)?)?;
    let at = match txn.open_table(CHECKPOINT) {
        Ok(t) => t.get(ROWS_AT)?.map(|v| v.value()),
        // A store from before rows were written behind: always current.
        Err(redb::TableError::TableDoesNotExist(_)) => Some(head),
        Err(e) => return Err(e.into()),
    };
    Ok((head, at))
}

impl Store {
    /// Committed job rows with keys in `range` (and the table's other rows).
    pub fn job_rows(&self, range: impl RangeBounds<JobKey>) -> Result<JobRowsView> {
        self.job_rows_of(range, None)
    }

    /// [`Store::job_rows`], the held rows of one kind only (the table's
    /// rows of other kinds still show).
    pub fn job_rows_of(
        &self,
        range: impl RangeBounds<JobKey>,
        kind: Option<JobRow>,
    ) -> Result<JobRowsView> {
        // The transaction is begun while the held rows cannot change: a
        // commit applies its rows to them only after it committed, so this
        // pairs a table with the rows held behind exactly that table (or,
        // between a commit and its update of them, with the rows held
        // before it, which are what it wrote: the same state).
        let behind = self.inner.held();
        if let Some(why) = &behind.unreadable {
            return Err(StoreError::Corrupt(format!(
                "the job rows could not be caught up with the log ({why})"
            )));
        }
        let txn = self.begin_read()?;
        let copy = (behind.range(range))
            .filter(|(k, _)| kind.is_none_or(|kind| k.1 == kind as u8))
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(JobRowsView { txn, behind: copy })
    }

    /// Commit `txn` (a batch's events, records and regions, written), with
    /// the held job rows due ([`Behind::due`]). `seqs` are the batch's
    /// events (gapless; `None`: it has none). The batch's own job rows
    /// `rows` are held once it committed; a batch of more than
    /// [`WRITE_THROUGH`] events writes them, and every row held, through.
    pub(super) fn commit_rows(
        &self,
        txn: redb::WriteTransaction,
        seqs: Option<RangeInclusive<u64>>,
        rows: Vec<Row<JobKey>>,
    ) -> Result<()> {
        let Some(seqs) = seqs else {
            assert!(rows.is_empty(), "job rows change only with events");
            return txn.commit().map_err(StoreError::CommitFailed);
        };
        let (first, head) = (seqs.start(), seqs.end());
        let events = head - first + 1;
        let through = events > WRITE_THROUGH as u64;
        let written = {
            let behind = self.inner.held();
            if behind.marked {
                // From now on a crash leaves rows behind: say so on disk.
                txn.open_table(CHECKPOINT)?.remove(ROWS_AT)?;
            }
            let written = behind.due(*head, events, through);
            let mut table = txn.open_table(JOB_ROWS)?;
            let held = written.iter().flat_map(|job| behind.rows_of(*job));
            let own = rows.iter().filter(|_| through).map(|(k, v)| (*k, v));
            for (key, row) in held.chain(own) {
                put(&mut table, key, row)?;
            }
            written
        };
        // Rows written through replace rows that readers would otherwise
        // see held over them (older): readers wait for this commit.
        let mut hold_off = through.then(|| self.inner.held_mut());
        // Errors before this point abort the transaction: nothing recorded.
        // From here until its rows are held, the batch may be on disk
        // without them: a commit that fails or panics here leaves it so,
        // and no checkpoint may then say the table is current.
        (self.inner.in_doubt).store(true, std::sync::atomic::Ordering::SeqCst);
        txn.commit().map_err(StoreError::CommitFailed)?;
        let mut behind = match hold_off.take() {
            Some(b) => b,
            None => self.inner.held_mut(),
        };
        behind.written(&written);
        if !through {
            behind.hold(*first, rows);
        }
        behind.marked = false;
        behind.lagging = true;
        behind.applied = *head;
        let oldest = behind.oldest();
        drop(behind);
        (self.inner.in_doubt).store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(oldest) = oldest {
            assert!(
                head - oldest < ROWS_BEHIND_MAX,
                "the job rows lag the log by less than ROWS_BEHIND_MAX events"
            );
        }
        Ok(())
    }

    /// Write every job row held behind and record that the rows are current
    /// at the log's head: a clean close. Nothing is written when they are
    /// already. Not while a commit runs (the commits are serialized with it).
    pub fn checkpoint(&self) -> Result<()> {
        checkpoint(self.writable()?, &self.inner)
    }

    /// After opening a store that was being written when it stopped (no
    /// checkpoint): the job rows that bring `JOB_ROWS` to the log's head,
    /// and the first seq they cover. `None` for a store closed cleanly: its
    /// rows are taken as they are (and a log changed after that close, by
    /// hand, is found by the startup check and by `audit verify`, not
    /// folded into the rows). Also the log's head. The events folded are
    /// checked first (seqs, links, hashes), so a log edited by hand is
    /// refused before anything is written. See the module doc.
    fn catch_up(&self) -> Result<(u64, Option<Caught>)> {
        let txn = self.begin_read()?;
        let (head, at) = head_and_checkpoint(&txn)?;
        // A writable store's snapshot rows were rewritten several to a row
        // on open (`Store::chunk_snapshot_rows`); a read-only one's may
        // still be one per snapshot.
        let chunked = snapshot_rows_chunked(&txn)?;
        let layout = row_layout(&txn)?;
        if at.is_some() {
            return Ok((head, None));
        }
        let from = head.saturating_sub(ROWS_BEHIND_MAX) + 1;
        let window = self.events(from.saturating_sub(1).max(1), head)?;
        let bad = |seq: u64, what: &str| {
            Err(StoreError::Corrupt(format!(
                "catching the job rows up with the log (bcp stopped without a checkpoint): seq {seq}: {what}; run `bcp audit verify`"
            )))
        };
        for (i, env) in window.iter().enumerate() {
            let seq = from.saturating_sub(1).max(1) + i as u64;
            if env.seq != seq {
                return bad(seq, &format!("found seq {}", env.seq));
            }
            if env.compute_hash() != env.hash {
                return bad(seq, "hash does not match the event");
            }
            if i > 0 && env.prev_hash != window[i - 1].hash {
                return bad(seq, "prev_hash does not link to the event before");
            }
        }
        // Nothing is held yet: the view is the table.
        let view = JobRowsView {
            txn,
            behind: BTreeMap::new(),
        };
        let stored_rows = view.rows()?;
        let mut stored: BTreeMap<Uuid, (Option<Job>, Option<Catalog>)> = BTreeMap::new();
        let mut world = World::default();
        let mut seqs: BTreeMap<Uuid, Vec<u64>> = BTreeMap::new();
        for env in window.into_iter().filter(|e| e.seq >= from) {
            let Some(id) = env.job_id else { continue };
            if let std::collections::btree_map::Entry::Vacant(e) = stored.entry(id) {
                let (job, catalog) = (job_of(&stored_rows, id)?, catalog_of(&stored_rows, id)?);
                if let Some(j) = &job {
                    world.jobs.insert(id, j.clone());
                }
                if let Some(c) = &catalog {
                    world.catalogs.insert(id, c.clone());
                }
                e.insert((job, catalog));
            }
            seqs.entry(id).or_default().push(env.seq);
            let Some(version) = env.job_version else {
                continue; // a rejection: only its index row
            };
            let current = world.jobs.get(&id).map_or(0, |j| j.version);
            if version > current + 1 {
                return bad(
                    env.seq,
                    &format!(
                        "job {id}'s rows are at version {current}, but this event (version {version}) is among the last {} events: the rows are further behind the log than bcp writes them",
                        head - from + 1
                    ),
                );
            }
            if version == current + 1 {
                world.evolve(&env);
            }
        }
        let mut rows = Vec::new();
        for (id, (job, catalog)) in &stored {
            let before = JobState {
                job: job.as_ref(),
                catalog: catalog.as_ref(),
            };
            let after = JobState {
                job: world.jobs.get(id),
                catalog: world.catalogs.get(id),
            };
            let indexed = indexed_since(&stored_rows, id.as_u128(), from)?;
            let unindexed: Vec<u64> = (seqs[id].iter())
                .filter(|seq| !indexed.contains(seq))
                .copied()
                .collect();
            let mut changed = rows::job_rows(*id, before, after, &unindexed, layout);
            let snapshots = |(k, _): &Row<JobKey>| k.1 == JobRow::Snapshot as u8;
            if !chunked && changed.iter().any(snapshots) {
                // Rows of one snapshot each are replaced, not changed in
                // place: every stored one removed, the catalog's rows laid
                // out from nothing.
                let mut replaced = BTreeMap::new();
                for r in stored_rows.range(JobRow::Snapshot.range(id.as_u128()))? {
                    replaced.insert(r?.0, None);
                }
                let now = after.catalog.map_or(&[][..], |c| &c.snapshots[..]);
                replaced.extend(rows::snapshot_rows(id.as_u128(), now));
                changed.retain(|r| !snapshots(r));
                changed.extend(replaced);
                changed.sort_unstable_by_key(|(k, _)| *k);
            }
            rows.extend(changed);
        }
        Ok((head, Some((from, rows))))
    }

    /// Bring a store just opened to its head: a writable one writes the
    /// rows [`Store::catch_up`] finds, and the checkpoint, in one durable
    /// transaction; a read-only one holds them behind, in memory. Until
    /// this succeeded, dropping the store writes nothing.
    pub(super) fn caught_up(self) -> Result<Store> {
        let (head, caught) = match self.catch_up() {
            // The audit tools still read such a store's log (`audit verify`
            // names the event that stopped the catch-up); reads of its job
            // rows fail.
            Err(StoreError::Corrupt(e)) if self.writable().is_err() => {
                self.inner.held_mut().unreadable = Some(e);
                return Ok(self);
            }
            r => r?,
        };
        {
            let mut behind = self.inner.held_mut();
            behind.applied = head;
            match caught {
                None => behind.marked = true,
                Some((from, rows)) => {
                    behind.hold(from, rows);
                    behind.lagging = true;
                }
            }
        }
        if self.writable().is_ok() {
            self.checkpoint()?;
        }
        Ok(self)
    }

    /// The log's head as queries see it: the job rows they read are the
    /// state after this seq (never older; a commit's events are in the log
    /// a moment before its job rows are readable).
    pub fn applied_seq(&self) -> u64 {
        self.inner.held().applied
    }

    /// How many times this store's log was cut back
    /// ([`Store::truncate_to`]). A reader that took this before reading
    /// and finds it unchanged after may trust that every seq it read still
    /// names the event it read.
    pub fn cut_backs(&self) -> u64 {
        self.inner.held().cut_backs
    }

    /// Run `rebuild` (a commit that replaces `JOB_ROWS` whole, and
    /// checkpoints it) with readers held off, and forget the rows held
    /// behind once it committed.
    pub(super) fn rows_rebuilt(
        &self,
        head: u64,
        rebuild: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let mut behind = self.inner.held_mut();
        rebuild()?;
        behind.current();
        behind.applied = head;
        behind.cut_backs += 1;
        Ok(())
    }
}

/// The seqs from `from` on that job `job`'s stored event index holds (its
/// last rows: each is keyed by its first seq).
fn indexed_since(rows: &JobRows<'_>, job: u128, from: u64) -> Result<BTreeSet<u64>> {
    let mut seqs = BTreeSet::new();
    for r in rows.table.range(JobRow::Event.range(job))?.rev() {
        let (key, row) = r?;
        let first = key.value().2;
        let index = rows::read_index(first, row.value()).map_err(|e| {
            StoreError::Corrupt(format!(
                "job {}'s event index row for seq {first}: {e}",
                Uuid::from_u128(job)
            ))
        })?;
        seqs.extend(index.into_iter().filter(|&seq| seq >= from));
        if first < u128::from(from) {
            break;
        }
    }
    Ok(seqs)
}

/// A job's view, from `rows`.
pub(super) fn job_of(rows: &JobRows<'_>, job_id: Uuid) -> Result<Option<Job>> {
    rows.get(JobRow::Job.key(job_id.as_u128(), 0))?
        .map(|v| {
            rows::read_job(v.value()).map_err(|e| StoreError::Corrupt(format!("job {job_id}: {e}")))
        })
        .transpose()
}

/// A job's catalog, from `rows` (None: the job never had a snapshot).
pub(super) fn catalog_of(rows: &JobRows<'_>, job_id: Uuid) -> Result<Option<Catalog>> {
    let id = job_id.as_u128();
    let fault = |e: String| StoreError::Corrupt(format!("catalog {job_id}: {e}"));
    if let Some(view) = rows.get(JobRow::Job.key(id, 0))?
        && let Some((_, catalog)) = rows::read_combined(view.value()).map_err(fault)?
    {
        return Ok(Some(catalog));
    }
    let Some(classes) = rows.get(JobRow::Classes.key(id, 0))? else {
        return Ok(None);
    };
    let mut snapshots = Vec::new();
    for r in rows.range(JobRow::Snapshot.range(id))? {
        snapshots.push(rows::read_snapshots(r?.1.value()));
    }
    rows::read_catalog(classes.value(), snapshots)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("catalog {job_id}: {e}")))
}

/// [`Store::checkpoint`], also from the drop of the last handle.
pub(super) fn checkpoint(db: &redb::Database, inner: &super::Inner) -> Result<()> {
    let _one = inner.one_writer();
    let behind = inner.held();
    if !behind.lagging {
        return Ok(());
    }
    if inner.in_doubt.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(StoreError::Corrupt(
            "a commit failed or stopped before its job rows were held: the next open catches them up from the log".into(),
        ));
    }
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    {
        let head = last_seq(&txn.open_table(EVENTS)?)?;
        let mut table = txn.open_table(JOB_ROWS)?;
        for (key, row) in behind.range(..) {
            put(&mut table, key, row)?;
        }
        txn.open_table(CHECKPOINT)?.insert(ROWS_AT, head)?;
    }
    txn.commit()?;
    drop(behind);
    inner.held_mut().current();
    Ok(())
}

#[cfg(test)]
impl Store {
    /// Lose the rows held behind, as a crash would (nothing is written when
    /// the last handle is dropped).
    fn crash(&self) {
        let mut behind = self.inner.held_mut();
        behind.current();
        behind.marked = false; // as on disk: the first commit removed it
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::command::decode;
    use crate::domain::filter::JobFilter;
    use crate::domain::ids::ProjectId;
    use crate::store::ledger::Pending;
    use crate::store::pipeline::Pipeline;
    use chrono::{Duration, TimeZone, Utc};
    use serde_json::json;

    const JOBS: u128 = 200;

    #[test]
    fn held_rows_merge_each_jobs_index_and_read_back_in_key_order_for_any_range() {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let view = |job, v: u8| (JobRow::Job.key(job, 0), Some(vec![v]));
        let index = |job, seqs: &[u64]| {
            let (first, row) = rows::index_row(seqs);
            (JobRow::Event.key(job, u128::from(first)), Some(row))
        };
        let snap = |job, sub| (JobRow::Snapshot.key(job, sub), Some(vec![9]));
        let mut b = Behind::default();
        b.hold(
            1,
            vec![view(1, 1), index(1, &[1]), view(2, 1), index(2, &[2, 3])],
        );
        // A later batch: job 1 again (one seq), job 2 (a snapshot and two seqs).
        b.hold(
            4,
            vec![view(1, 2), index(1, &[4]), snap(2, 5), index(2, &[5, 6])],
        );
        let all: Vec<_> = b.range(..).map(|(k, v)| (k, v.clone())).collect();
        let want = vec![
            view(1, 2),
            index(1, &[1, 4]),
            view(2, 1),
            snap(2, 5),
            index(2, &[2, 3, 5, 6]),
        ];
        assert_eq!(all, want, "one index row per job, grown; the last view");
        assert_eq!(
            b.order.iter().copied().collect::<Vec<_>>(),
            [(1, 1), (1, 2)]
        );
        // Any bounds, excluded ones too, give exactly the keys in them.
        let keys: Vec<JobKey> = want.iter().map(|(k, _)| *k).collect();
        let (k1, k3) = (keys[1], keys[3]);
        let ranges = [
            (Unbounded, Unbounded),
            (Included(k1), Unbounded),
            (Excluded(k1), Unbounded),
            (Excluded(keys[0]), Excluded(k3)),
            (Included(k1), Included(k3)),
            (Unbounded, Excluded(k1)),
            (Excluded(keys[2]), Excluded(k3)),
        ];
        for r in ranges {
            let got: Vec<JobKey> = b.range(r).map(|(k, _)| k).collect();
            let expect: Vec<JobKey> = keys.iter().copied().filter(|k| r.contains(k)).collect();
            assert_eq!(got, expect, "{r:?}");
        }
        // Written, then held again in the same commit: a new index row from
        // the batch's first seq on, after what the table holds.
        b.written(&[1]);
        b.hold(7, vec![index(1, &[7]), view(1, 3)]);
        b.hold(8, vec![index(1, &[8, 9])]);
        let job1: Vec<_> = b.rows_of(1).map(|(k, v)| (k, v.clone())).collect();
        assert_eq!(job1, [view(1, 3), index(1, &[7, 8, 9])]);
        assert_eq!(b.oldest(), Some(1));
        b.written(&[2]);
        assert_eq!(b.oldest(), Some(7));
    }

    /// Batches of 64 commands over 200 jobs, six hours apart: creates and
    /// starts, then snapshots of a third of the jobs per batch, a retention
    /// sweep every fourth batch (snapshot rows removed) and a rejected start
    /// in each (an event-index row only), until the log holds `events`.
    fn workload(ledger: &mut Pipeline<()>, events: u64) {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        // Event ids never used before in this log, however often it runs
        // on one ledger (a next_id a command at most per event).
        let mut ids = (1u128 << 64) + (u128::from(ledger.head_seq()) << 16);
        let mut cmd = 0u128;
        let mut round = 0i64;
        while ledger.head_seq() < events {
            let now = t0 + Duration::hours(6 * round);
            let mut bodies: Vec<(&str, serde_json::Value)> = Vec::new();
            for n in 0..64u128 {
                let i = (round as u128 * 64 + n) % JOBS;
                let job = Uuid::from_u128(i + 1);
                bodies.push(match round {
                    0..=3 if round as u128 * 64 + n < JOBS => (
                        "create",
                        json!({"job_id": job, "deployment": {"kind": "replica_set", "name": format!("rs{i}")}}),
                    ),
                    0..=3 => ("start", json!({"job_id": Uuid::from_u128(i + 1)})),
                    4..=7 => ("start", json!({"job_id": job})),
                    _ if n == 0 => ("start", json!({"job_id": job})), // rejected
                    _ if n == 1 && round % 4 == 0 => ("expire-snapshots", json!({"now": now})),
                    _ => (
                        "record-snapshot",
                        json!({"job_id": job, "snapshot_id": Uuid::from_u128((round as u128) << 32 | n), "taken_at": now - Duration::minutes(5), "size_bytes": 1}),
                    ),
                });
            }
            let batch: Vec<Pending> = bodies
                .into_iter()
                .map(|(verb, mut body)| {
                    cmd += 1;
                    body["command_id"] = json!(Uuid::from_u128(cmd));
                    Pending::new(decode("p1", verb, body.to_string().as_bytes(), None).unwrap())
                })
                .collect();
            let mut next = || {
                ids += 1;
                Uuid::from_u128(ids)
            };
            ledger.execute(&batch, now, &mut next).unwrap();
            round += 1;
        }
    }

    /// A new store at a temporary path, its pipeline run through the
    /// workload until the log holds `events`.
    fn store_with(events: u64) -> (tempfile::TempDir, std::path::PathBuf, Store, Pipeline<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bcp.redb");
        let store = Store::open_or_create(&path).unwrap();
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        workload(&mut ledger, events);
        (dir, path, store, ledger)
    }

    /// The job rows as they are in the table, without those held behind.
    fn in_table(store: &Store, job: u128) -> usize {
        let txn = store.begin_read().unwrap();
        let table = txn.open_table(JOB_ROWS).unwrap();
        table
            .range((job, 0, 0)..=(job, u8::MAX, u128::MAX))
            .unwrap()
            .count()
    }

    /// Queries read a batch's rows as soon as it committed, from memory;
    /// they reach the table once the log moved ROWS_HELD events on, never
    /// more than ROWS_BEHIND_MAX behind; a store that stopped without a checkpoint (a
    /// crash) folds its log's tail into its rows when opened, read-only in
    /// memory or writable on disk, and then verifies: every row equal to a
    /// rebuild from the log.
    #[test]
    fn rows_written_behind_are_read_at_once_bounded_and_caught_up_after_a_crash() {
        let (dir, path, store, mut ledger) = store_with(1);
        let first = Uuid::from_u128(1);
        assert_eq!(in_table(&store, 1), 0, "held behind, not yet written");
        assert_eq!(store.job(first).unwrap().unwrap().version, 1);
        assert_eq!(store.job_events(first).unwrap().len(), 1);
        let (page, _) = store
            .jobs_page(&Default::default(), 1000, usize::MAX)
            .unwrap();
        assert_eq!(page.len(), 64, "the first batch's jobs, all held behind");

        workload(&mut ledger, ROWS_BEHIND_MAX + 3000);
        let head = ledger.head_seq();
        let oldest = store.inner.behind.read().unwrap().oldest().unwrap();
        assert!(head - oldest < ROWS_BEHIND_MAX, "{head} {oldest}");
        assert!(in_table(&store, 1) > 0, "written once far enough behind");
        let world = ledger.world().clone();
        assert_eq!(
            store.load_world().unwrap(),
            world,
            "table and memory: the committed state"
        );
        // Pages of jobs merge the table's views with the held ones; a page
        // smaller than one job's JSON still holds one job.
        for (per_page, bytes, jobs_per_page) in [(7, usize::MAX, 7), (500, 1, 1)] {
            let (mut listed, mut filter) =
                (Vec::new(), crate::domain::filter::JobFilter::default());
            loop {
                let (page, next) = store.jobs_page(&filter, per_page, bytes).unwrap();
                assert!(next.is_none() || page.len() == jobs_per_page);
                listed.extend(page);
                match next {
                    Some(after) => filter.after = Some(after),
                    None => break,
                }
            }
            assert_eq!(listed, world.jobs.values().cloned().collect::<Vec<_>>());
        }
        // Every job has older rows in the table, hidden by newer held ones.
        let held = store.inner.behind.read().unwrap().jobs.len();
        assert_eq!(held, JOBS as usize);
        assert!((1..=JOBS).all(|job| in_table(&store, job) > 0));
        let kinds = |name: &str| {
            (store.events(1, head).unwrap().iter())
                .filter(|e| e.event.type_name() == name)
                .count()
        };
        assert!(
            kinds("SnapshotExpired") > 100,
            "the sweeps removed snapshot rows"
        );
        assert!(
            kinds("CommandRejected") > 100,
            "rejections: index rows only"
        );

        // A follower taking the whole log in one batch writes it through.
        let copy = dir.path().join("follower.redb");
        {
            let follower = Store::open_or_create(&copy).unwrap();
            let log = store.raw_events(1, head).unwrap();
            assert!(log.len() > WRITE_THROUGH);
            let mut following = Pipeline::open(follower.clone()).unwrap();
            following
                .follow(log.into_iter().map(|(_, b)| b).collect())
                .unwrap();
            assert!(follower.inner.behind.read().unwrap().jobs.is_empty());
            assert!(in_table(&follower, 1) > 0);
            crate::audit::verify::verify(&follower, None, |_| {}).unwrap();
        }

        // A crash: what was held behind is lost; the log has it.
        store.crash();
        drop((ledger, store));
        // Of a bcp from before snapshot rows held several (and before
        // combined rows): one each.
        {
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                let combined: Vec<_> = (t.iter().unwrap())
                    .map(|r| r.unwrap())
                    .filter_map(|(k, v)| rows::apart(k.value().0, v.value()))
                    .collect();
                assert!(combined.len() > 10, "catalogs combined");
                for (key, row) in combined.into_iter().flatten() {
                    t.insert(key, row.unwrap().as_slice()).unwrap();
                }
                let chunks: Vec<_> = (t.iter().unwrap())
                    .map(|r| r.unwrap())
                    .filter(|(k, _)| k.value().1 == JobRow::Snapshot as u8)
                    .map(|(k, v)| (k.value(), rows::read_snapshots(v.value()).unwrap()))
                    .collect();
                assert!(chunks.len() > 10, "catalogs stored");
                for (key, snapshots) in chunks {
                    t.remove(key).unwrap();
                    for s in snapshots {
                        let key = JobRow::Snapshot.key(key.0, s.snapshot_id.as_u128());
                        t.insert(key, rows::snapshot_row(&s).as_slice()).unwrap();
                    }
                }
                let mut c = txn.open_table(CHECKPOINT).unwrap();
                assert!(c.remove(SNAPSHOT_ROWS).unwrap().is_some());
                assert!(c.remove(COMBINED_ROWS).unwrap().is_some());
            }
            txn.commit().unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        let read_only = Store::open_read_only(&path, 0).unwrap();
        assert!(
            read_only.inner.behind.read().unwrap().len() > 64,
            "caught up in memory"
        );
        assert_eq!(read_only.load_world().unwrap(), world);
        crate::audit::verify::verify(&read_only, None, |_| {}).unwrap();
        drop(read_only);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "read-only: nothing written"
        );

        let store = Store::open_existing(&path).unwrap();
        assert!(
            store.inner.behind.read().unwrap().jobs.is_empty(),
            "caught up on disk"
        );
        assert_eq!(store.load_world().unwrap(), world);
        crate::audit::verify::verify(&store, None, |_| {}).unwrap();
        let ledger = Pipeline::open(store.clone()).unwrap();
        assert_eq!(ledger.world(), &world);
        assert_eq!(store.applied_seq(), head);
    }

    /// A project's listing reads the jobs the ledger's index names for it,
    /// and pages exactly as the listing over every job's view does: the
    /// same jobs in the same pages, held behind or in the table, whatever
    /// the filter and page size; an id the index names that was never
    /// committed is skipped.
    #[test]
    fn a_projects_listing_reads_its_own_jobs_and_pages_as_reading_every_view_does() {
        let (_dir, _path, store, mut ledger) = store_with(ROWS_BEHIND_MAX + 2000);
        // p2's jobs sort among p1's (1..=JOBS) and after them.
        let p2_ids = (0..40u128).map(|i| {
            if i % 2 == 0 {
                ((i + 1) << 64) + 7
            } else {
                JOBS + 100 + i
            }
        });
        let batch: Vec<Pending> = (p2_ids.enumerate())
            .map(|(n, id)| {
                let body = json!({"command_id": Uuid::from_u128((1 << 100) + n as u128), "job_id": Uuid::from_u128(id),
                    "deployment": {"kind": "replica_set", "name": format!("p2rs{n}")}});
                Pending::new(decode("p2", "create", body.to_string().as_bytes(), None).unwrap())
            })
            .collect();
        let t = Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap();
        let mut next = || Uuid::new_v4();
        let replies = ledger.execute(&batch, t, &mut next).unwrap();
        assert!(replies.iter().all(|r| r.ok), "{replies:?}");
        let world = ledger.world().clone();
        let (p1, p2) = (
            ProjectId::parse("p1").unwrap(),
            ProjectId::parse("p2").unwrap(),
        );
        store.index_jobs([(&p2, 1u128 << 90)]);
        assert!(store.project_jobs(&p2, 0, 100).contains(&(1 << 90)));

        let list = |filter: &JobFilter, per_page: usize, bytes: usize| {
            let (mut pages, mut filter) = (Vec::new(), filter.clone());
            loop {
                let (page, next) = store.jobs_page(&filter, per_page, bytes).unwrap();
                pages.push(page);
                match next {
                    Some(after) => filter.after = Some(after),
                    None => return pages,
                }
            }
        };
        let filters = [
            JobFilter {
                project_id: Some(p2.clone()),
                ..Default::default()
            },
            JobFilter {
                project_id: Some(p1.clone()),
                ..Default::default()
            },
            JobFilter {
                project_id: Some(p1.clone()),
                state: Some(crate::domain::JobState::Active),
                ..Default::default()
            },
            JobFilter {
                project_id: Some(p2.clone()),
                after: Some(Uuid::from_u128(JOBS)),
                ..Default::default()
            },
            JobFilter {
                project_id: Some(ProjectId::parse("p3").unwrap()),
                ..Default::default()
            },
        ];
        for filter in &filters {
            let want: Vec<Job> = (world.jobs.values())
                .filter(|j| filter.matches(j) && filter.after.is_none_or(|a| j.job_id > a))
                .cloned()
                .collect();
            for (per_page, bytes) in [(7, usize::MAX), (500, 1), (1000, usize::MAX)] {
                let indexed = list(filter, per_page, bytes);
                assert_eq!(indexed.concat(), want, "{filter:?} {per_page}");
                let index = store.by_project_mut().take();
                let read_all = list(filter, per_page, bytes);
                *store.by_project_mut() = index;
                assert_eq!(indexed, read_all, "the same pages, {filter:?} {per_page}");
            }
        }
        assert_eq!(list(&filters[0], 1000, usize::MAX).concat().len(), 40);
    }

    /// A store that stopped without a checkpoint, whose log's tail was then
    /// edited, is refused before anything is written, and stays refused
    /// (a failed open writes no checkpoint); the audit tools still read it
    /// and `audit verify` names the edited event.
    #[test]
    fn a_crashed_store_with_an_edited_tail_is_refused_and_stays_refused() {
        let (_dir, path, store, ledger) = store_with(1000);
        let head = ledger.head_seq();
        assert_eq!(store.applied_seq(), head);
        store.crash();
        drop((ledger, store));
        let edited = head - 3;
        let rows_at = |path: &std::path::Path| {
            use redb::ReadableDatabase;
            let db = redb::Database::create(path).unwrap();
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(CHECKPOINT).unwrap();
            t.get(ROWS_AT).unwrap().map(|v| v.value())
        };
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(EVENTS).unwrap();
                let bytes = t.get(edited).unwrap().unwrap().value().to_vec();
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.contains("\"size_bytes\":1"), "{text}");
                let forged = text.replace("\"size_bytes\":1", "\"size_bytes\":2");
                t.insert(edited, forged.as_bytes()).unwrap();
            }
            txn.commit().unwrap();
        }
        assert_eq!(rows_at(&path), None, "stopped without a checkpoint");
        for _ in 0..2 {
            let Err(e) = Store::open_existing(&path) else {
                panic!("an edited tail was caught up");
            };
            let e = e.to_string();
            assert!(e.contains(&format!("seq {edited}: hash")), "{e}");
            assert_eq!(rows_at(&path), None, "a refused store is not checkpointed");
        }
        let read_only = Store::open_read_only(&path, 0).unwrap();
        let err = crate::audit::verify::verify(&read_only, None, |_| {}).unwrap_err();
        assert_eq!(err.seq(), Some(edited), "{err}");
        // Its job rows are not served as if current.
        let e = read_only.job(Uuid::from_u128(1)).unwrap_err().to_string();
        assert!(e.contains("could not be caught up"), "{e}");
        assert!(
            read_only
                .jobs_page(&Default::default(), 10, usize::MAX)
                .is_err()
        );
    }
}
