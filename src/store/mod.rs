//! The redb store: opening, reading the log and projections, and (in
//! [`ledger`]) appending decided events. Synchronous; callers on async code
//! use `spawn_blocking`. Nothing here awaits.

pub mod behind;
mod by_project;
pub mod commands;
pub mod disk;
pub mod import;
pub mod ledger;
pub mod pipeline;
pub mod records;
pub mod rows;
pub mod tables;

use crate::domain::history::{HistoryEntry, HistoryFold};
use crate::domain::{Catalog, Envelope, Job, Region, World};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableHandle};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tables::*;
use uuid::Uuid;

/// One job's stored rows, as the layout migrations read them: `(kind,
/// sub, value)` in key order.
type StoredJob = Vec<(u8, u128, Vec<u8>)>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store {path} is in use by another process (a running `bcp serve`?); stop it, or read through NATS queries"
    )]
    InUse { path: String },
    #[error("no store at {path}")]
    Missing { path: String },
    #[error("{path} is a directory; give the store's file (e.g. {path}/bcp.redb)")]
    Directory { path: String },
    #[error("{path} already holds a log; import only into a new store (or remove it first)")]
    Exists { path: String },
    #[error(
        "the store {path} was not closed cleanly (bcp serve was killed?) and needs recovery before it can be read without writing; start bcp serve on it once (it recovers and re-checks the store), stop it, then audit"
    )]
    NeedsRecovery { path: String },
    #[error("storage error: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error(
        "the commit thread stopped mid-batch (it panicked: a bug); whether that batch was recorded is known only after a restart of bcp serve"
    )]
    CommitThreadStopped,
    /// `commit()` itself failed: the batch's pages and header may have been
    /// written before the error (a failed fsync leaves them in the page
    /// cache, on their way to the disk), so it may or may not be recorded.
    #[error(
        "the commit failed part way ({0}); whether that batch was recorded is known only after a restart of bcp serve"
    )]
    CommitFailed(redb::CommitError),
    /// The write pipeline stopped on an earlier error (one of the above
    /// that needs a reopened store) and takes no more commands.
    #[error("the writer stopped after an earlier failure ({0}); restart bcp serve")]
    Stopped(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl StoreError {
    /// redb refuses every write after an I/O error until the file is
    /// reopened, nothing commits once the commit thread is gone, and after a
    /// failed commit only a reopened store says what was recorded: the
    /// writer must stop and bcp serve be restarted.
    pub fn is_poisoned(&self) -> bool {
        matches!(
            self,
            StoreError::Redb(redb::Error::PreviousIo)
                | StoreError::CommitThreadStopped
                | StoreError::CommitFailed(_)
                | StoreError::Stopped(_)
        )
    }

    /// Whether the batch this error failed may still have been recorded (so
    /// the answer must send the producer back with the same command_id).
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            StoreError::CommitThreadStopped | StoreError::CommitFailed(_)
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What is stored per `command_id`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommandRecord {
    pub fingerprint: crate::domain::command::Fingerprint,
    pub reply: crate::domain::Reply,
}

/// redb's page cache (its default is 1 GiB). The writer's hot pages (the
/// log's tail, B-tree interiors) fit easily; the rest is read through the
/// OS page cache. Keeps bcp's memory proportional to its jobs, not its log.
pub const CACHE_BYTES: usize = 128 << 20;

/// A handle on the store; cheap to clone, shared by the writer and readers.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Every fsync of the file ([`disk::TimedFile`]); none on a read-only store.
    fsync_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// What every handle of one open store shares.
struct Inner {
    db: Db,
    /// Job rows committed but not yet written to `JOB_ROWS` ([`behind`]).
    behind: std::sync::RwLock<behind::Behind>,
    /// Held by each write transaction: commits, checkpoints, rebuilds.
    committing: std::sync::Mutex<()>,
    /// Idempotency records not yet merged into `COMMANDS` ([`records`]).
    recent: std::sync::Mutex<records::Recent>,
    /// A commit was started and its job rows are not held yet (it failed,
    /// or is running): no checkpoint then ([`behind`]).
    in_doubt: std::sync::atomic::AtomicBool,
    /// The jobs of each project, once a ledger opened the store
    /// ([`by_project`]).
    by_project: std::sync::RwLock<Option<by_project::ByProject>>,
}

impl Inner {
    fn new(db: Db) -> Arc<Inner> {
        Arc::new(Inner {
            db,
            behind: Default::default(),
            committing: Default::default(),
            recent: std::sync::Mutex::new(records::Recent::empty(records::BUFFER)),
            in_doubt: Default::default(),
            by_project: Default::default(),
        })
    }

    /// The records not yet merged. A commit thread that panicked holding
    /// the lock changed nothing (they change only after a commit).
    fn recent(&self) -> std::sync::MutexGuard<'_, records::Recent> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rows held behind, to read. A commit thread that panicked
    /// holding the lock (in a commit that writes rows through) changed
    /// nothing in them yet: the lock's poison is ignored for reading them
    /// (that commit left `in_doubt` set, so nothing checkpoints them).
    fn held(&self) -> std::sync::RwLockReadGuard<'_, behind::Behind> {
        self.behind
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rows held behind, to change (see [`Inner::held`]).
    fn held_mut(&self) -> std::sync::RwLockWriteGuard<'_, behind::Behind> {
        self.behind
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lock every write transaction holds. A commit thread that
    /// panicked while holding it (a bug, or an injected fault) left nothing
    /// behind it to repair: redb aborts the transaction.
    fn one_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Closing the store cleanly writes the job rows held behind
/// ([`Store::checkpoint`]); if that fails, the next open catches them up
/// from the log.
impl Drop for Inner {
    fn drop(&mut self) {
        if let Db::ReadWrite(db) = &self.db
            && let Err(e) = behind::checkpoint(db, self)
        {
            tracing::warn!(error = %e, "job rows not checkpointed at close; the next open catches them up from the log");
        }
    }
}

enum Db {
    ReadWrite(Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

/// The first of bcp's tables that `tables` lacks.
fn missing_table(tables: &[String]) -> Option<&'static str> {
    [
        EVENTS.name(),
        COMMANDS.name(),
        JOB_ROWS.name(),
        REGIONS.name(),
    ]
    .into_iter()
    .find(|t| !tables.iter().any(|n| n == t))
}

/// Refuse a store of an older table layout rather than misread it.
fn check_layout(tables: &[String]) -> Result<()> {
    if tables.iter().any(|n| n == OLD_LAYOUT_TABLE) {
        return Err(corrupt(
            "this store was written by an older bcp (another table layout); rebuild it: `bcp export` with that version, then `bcp import`",
        ));
    }
    Ok(())
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub fn decode_envelope(seq: u64, bytes: &[u8]) -> Result<Envelope> {
    Envelope::from_json(bytes).map_err(|e| unparsable(seq, e))
}

/// [`decode_envelope`] for a fold of the state only
/// ([`Envelope::from_json_state`]: ids, actor and hashes left blank).
pub fn decode_state(seq: u64, bytes: &[u8]) -> Result<Envelope> {
    Envelope::from_json_state(bytes).map_err(|e| unparsable(seq, e))
}

fn unparsable(seq: u64, e: serde_json::Error) -> StoreError {
    corrupt(format!("event at seq {seq} does not parse: {e}"))
}

/// How many bytes `value`'s JSON takes, without building it.
fn json_len(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_or(0, |()| count.0)
}

impl Store {
    /// Open the store at `path`, creating it (and its tables) if missing.
    pub fn open_or_create(path: &Path) -> Result<Store> {
        Self::open(path, CACHE_BYTES)
    }

    fn open(path: &Path, cache_bytes: usize) -> Result<Store> {
        not_a_directory(path)?;
        // As redb's `Builder::create(path)` opens it, with the fsyncs timed.
        let fsync_seconds = disk::fsync_histogram();
        let db = disk::open_file(path)
            .map_err(redb::DatabaseError::from)
            .and_then(|file| disk::TimedFile::new(file, fsync_seconds.clone()))
            .and_then(|file| {
                redb::Builder::new()
                    .set_cache_size(cache_bytes)
                    .create_with_backend(file)
            })
            .map_err(|e| open_error(path, e))?;
        let store = Store {
            inner: Inner::new(Db::ReadWrite(db)),
            fsync_seconds,
        };
        store.create_tables()?;
        store.chunk_snapshot_rows()?;
        store.combine_job_rows()?;
        store.load_recent()?;
        store.caught_up()
    }

    /// A store on another storage backend (fault-injection tests).
    pub fn with_backend(backend: impl redb::StorageBackend) -> Result<Store> {
        let db = redb::Builder::new().create_with_backend(backend)?;
        let store = Store {
            inner: Inner::new(Db::ReadWrite(db)),
            fsync_seconds: disk::fsync_histogram(),
        };
        store.create_tables()?;
        store.chunk_snapshot_rows()?;
        store.combine_job_rows()?;
        store.load_recent()?;
        store.caught_up()
    }

    /// Create the tables a store lacks (so auditing a store, read-only,
    /// never needs to); one of an older layout is refused. A store that
    /// has them all is only read here; opening it may still write the job
    /// rows a crash left unwritten ([`Store::caught_up`]).
    fn create_tables(&self) -> Result<()> {
        let names: Vec<String> = self
            .begin_read()?
            .list_tables()?
            .map(|t| t.name().to_owned())
            .collect();
        check_layout(&names)?;
        let checkpointed = names.iter().any(|n| n == CHECKPOINT.name());
        if missing_table(&names).is_none() && checkpointed {
            return Ok(());
        }
        let txn = self.writable()?.begin_write()?;
        txn.open_table(COMMANDS)?;
        txn.open_table(JOB_ROWS)?;
        txn.open_table(REGIONS)?;
        let head = behind::last_seq(&txn.open_table(EVENTS)?)?;
        if !checkpointed {
            // A new store, or one whose rows were all written by each
            // commit: current at its head.
            txn.open_table(CHECKPOINT)?.insert(ROWS_AT, head)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Rewrite a store's snapshot rows of one snapshot each (the layout
    /// before rows held several, [`rows::snapshot_chunks`]) as rows of
    /// several, once, before anything else writes them: the write path
    /// writes a catalog's rows where that layout puts them, and a store
    /// holding both would hold a snapshot twice. [`SNAPSHOT_ROWS`] in
    /// [`CHECKPOINT`] says it is done (a new store: nothing to do). Read
    /// only, such a store reads alike (`rows::read_snapshots`).
    fn chunk_snapshot_rows(&self) -> Result<()> {
        if self
            .begin_read()?
            .open_table(CHECKPOINT)?
            .get(SNAPSHOT_ROWS)?
            .is_some()
        {
            return Ok(());
        }
        let what = "snapshot rows rewritten, several to a row";
        self.rewrite_job_rows(SNAPSHOT_ROWS, what, |table, id, stored| {
            let (mut subs, mut snapshots) = (Vec::new(), Vec::new());
            for (kind, sub, value) in stored {
                if kind != JobRow::Snapshot as u8 {
                    continue;
                }
                snapshots.extend(rows::read_snapshots(&value).map_err(|e| {
                    corrupt(format!("job {}'s snapshot row: {e}", Uuid::from_u128(id)))
                })?);
                subs.push(sub);
            }
            if subs.is_empty() {
                return Ok(false);
            }
            snapshots.sort_by_key(crate::domain::Snapshot::place);
            for sub in subs {
                table.remove(JobRow::Snapshot.key(id, sub))?;
            }
            for (key, row) in rows::snapshot_rows(id, &snapshots) {
                table.insert(key, row.expect("rows from nothing").as_slice())?;
            }
            Ok(true)
        })
    }

    /// Rewrite each job whose catalog holds at most [`rows::COMBINED_MAX`]
    /// snapshots as one combined row (its view, class row and snapshots),
    /// once, before anything else writes its rows: the write path writes a
    /// job's rows where that layout puts them, and a store holding both
    /// would hold a catalog twice. [`COMBINED_ROWS`] in [`CHECKPOINT`] says
    /// it is done (a new store: nothing to do). Read only, such a store
    /// reads alike. The table is rewritten as it stands (a store that
    /// stopped without a checkpoint catches up after, on either layout).
    fn combine_job_rows(&self) -> Result<()> {
        if behind::row_layout(&self.begin_read()?)? == rows::Layout::Combined {
            return Ok(());
        }
        let what = "job rows of small catalogs combined, one row a job";
        self.rewrite_job_rows(COMBINED_ROWS, what, |table, id, stored| {
            // The job's view, class row and snapshot rows (sub, value).
            let (mut view, mut classes, mut snapshot_rows) = (None, None, Vec::new());
            for (kind, sub, value) in stored {
                match kind {
                    k if k == JobRow::Job as u8 => view = Some(value),
                    k if k == JobRow::Classes as u8 => classes = Some(value),
                    k if k == JobRow::Snapshot as u8 => snapshot_rows.push((sub, value)),
                    _ => {}
                }
            }
            let (Some(view), Some(classes)) = (view, classes) else {
                return Ok(false);
            };
            let fault = |e: String| {
                corrupt(format!(
                    "job {}: {e}; run `bcp audit verify`",
                    Uuid::from_u128(id)
                ))
            };
            let read = (snapshot_rows.iter())
                .map(|(sub, v)| Ok((*sub, rows::read_snapshots(v)?)))
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(fault)?;
            // A row where the write path puts none is refused, as
            // `load_world` would, not folded into the catalog.
            if let Some(why) = rows::layout_fault(&read, true) {
                return Err(fault(why));
            }
            let snapshots = read.into_iter().map(|(_, s)| Ok(s));
            let catalog = rows::read_catalog(&classes, snapshots).map_err(fault)?;
            if catalog.snapshots.len() > rows::COMBINED_MAX {
                return Ok(false);
            }
            let view = rows::read_job(&view).map_err(fault)?;
            table.insert(
                JobRow::Job.key(id, 0),
                rows::combined_row(&view, &catalog).as_slice(),
            )?;
            table.remove(JobRow::Classes.key(id, 0))?;
            for (sub, _) in snapshot_rows {
                table.remove(JobRow::Snapshot.key(id, sub))?;
            }
            Ok(true)
        })
    }

    /// Rewrite the job rows once, job by job, in one transaction (the
    /// layout migrations on open): `rewrite` gets each job's stored rows,
    /// `(kind, sub, value)` in key order, and says whether it rewrote them;
    /// then `mark` in [`CHECKPOINT`] holds the head, and `what` is logged
    /// with how many jobs were rewritten, if any.
    fn rewrite_job_rows(
        &self,
        mark: &str,
        what: &str,
        mut rewrite: impl FnMut(&mut redb::Table<rows::JobKey, &[u8]>, u128, StoredJob) -> Result<bool>,
    ) -> Result<()> {
        let read = self.begin_read()?;
        let stored = read.open_table(JOB_ROWS)?;
        let txn = self.writable()?.begin_write()?;
        let mut rewritten = 0usize;
        {
            let mut table = txn.open_table(JOB_ROWS)?;
            let mut job: Option<(u128, StoredJob)> = None;
            for r in stored.iter()? {
                let (k, v) = r?;
                let (id, kind, sub) = k.value();
                if job.as_ref().is_none_or(|j| j.0 != id) {
                    if let Some((id, rows)) = job.take() {
                        rewritten += usize::from(rewrite(&mut table, id, rows)?);
                    }
                    job = Some((id, Vec::new()));
                }
                let (_, rows) = job.as_mut().expect("set above");
                rows.push((kind, sub, v.value().to_vec()));
            }
            if let Some((id, rows)) = job.take() {
                rewritten += usize::from(rewrite(&mut table, id, rows)?);
            }
            let head = behind::last_seq(&txn.open_table(EVENTS)?)?;
            txn.open_table(CHECKPOINT)?.insert(mark, head)?;
        }
        txn.commit()?;
        if rewritten > 0 {
            tracing::info!(jobs = rewritten, "{what}");
        }
        Ok(())
    }

    /// Open an existing store (the audit tools never create one).
    pub fn open_existing(path: &Path) -> Result<Store> {
        Self::open_existing_with_cache(path, CACHE_BYTES)
    }

    /// [`Store::open_existing`] with redb's page cache bounded to
    /// `cache_bytes`: for one pass over the log (audit verify, replay),
    /// where keeping every page read only fills memory.
    pub fn open_existing_with_cache(path: &Path, cache_bytes: usize) -> Result<Store> {
        must_exist(path)?;
        Self::open(path, cache_bytes)
    }

    /// How long each fsync of the store's file took (for `/metrics`).
    pub fn fsync_seconds(&self) -> &prometheus_client::metrics::histogram::Histogram {
        &self.fsync_seconds
    }

    /// The database, for writing; an error on a read-only store.
    pub(crate) fn writable(&self) -> Result<&Database> {
        match &self.inner.db {
            Db::ReadWrite(db) => Ok(db),
            Db::ReadOnly(_) => Err(corrupt("the store is open read-only")),
        }
    }

    /// Read the records not yet merged into `COMMANDS` ([`records`]).
    fn load_recent(&self) -> Result<()> {
        let buffer = self.inner.recent().buffer();
        let txn = self.begin_read()?;
        // UUIDv7 ids made up to an hour after the last event (bcp's clock:
        // producers' may differ a little), where the records look for the
        // largest stored. A last event that does not decode is for the
        // startup check and verify to name, not for this.
        let v7_bound = match txn.open_table(EVENTS)?.last()? {
            Some((_, v)) => {
                (Envelope::from_json(v.value()).ok()).map(|e| records::v7_bound_at(e.recorded_at))
            }
            None => None,
        };
        let loaded = records::Recent::load(&txn, buffer, v7_bound)?;
        *self.inner.recent() = loaded;
        Ok(())
    }

    /// The idempotency record of `id` if it is among the recent ones
    /// ([`records`]): committed, not yet in `COMMANDS`.
    pub(crate) fn recent_record(&self, id: u128) -> Option<Vec<u8>> {
        self.inner.recent().get(id).map(<[u8]>::to_vec)
    }

    /// How many records wait before a sweep merges them into `COMMANDS`
    /// ([`records::BUFFER`]); tests set it small to sweep often.
    #[doc(hidden)]
    pub fn set_records_buffer(&self, records: usize) {
        self.inner.recent().set_buffer(records.max(1));
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction> {
        Ok(match &self.inner.db {
            Db::ReadWrite(db) => db.begin_read()?,
            Db::ReadOnly(db) => db.begin_read()?,
        })
    }

    /// Open an existing store for reading only: nothing is written to the
    /// file, not even by opening it (the audit tools). A store that needs
    /// recovery after a crash is refused; `bcp serve` recovers it.
    pub fn open_read_only(path: &Path, cache_bytes: usize) -> Result<Store> {
        must_exist(path)?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .open_read_only(path)
            .map_err(|e| match open_error(path, e) {
                // Needing recovery is also what a damaged file (one cut
                // short, say) looks like to a read-only open: redb's check of
                // its pages tells the two apart.
                StoreError::NeedsRecovery { path: p } => match disk::check_pages(path) {
                    Ok(Err(why)) => corrupt(format!(
                        "the file {p} is damaged: {why}; bcp audit verify --db says more"
                    )),
                    _ => StoreError::NeedsRecovery { path: p },
                },
                e => e,
            })?;
        let store = Store {
            inner: Inner::new(Db::ReadOnly(db)),
            fsync_seconds: disk::fsync_histogram(),
        };
        let txn = store.begin_read()?;
        let names: Vec<String> = txn.list_tables()?.map(|t| t.name().to_owned()).collect();
        check_layout(&names)?;
        if let Some(t) = missing_table(&names) {
            return Err(corrupt(format!("not a bcp store: no table {t}")));
        }
        store.caught_up()
    }

    /// Record that a single-mode `bcp serve` takes this store's commands
    /// ([`SERVED_SINGLE`]), before it takes any; once is enough.
    pub fn mark_served_single(&self) -> Result<()> {
        if self.served_single()?.is_some() {
            return Ok(());
        }
        let head = self.head_seq()?;
        self.write_checkpoint_key(SERVED_SINGLE, Some(head))
    }

    /// Whether a single-mode `bcp serve` took this store's commands since a
    /// group node last found all of it in the stream: the head then.
    pub fn served_single(&self) -> Result<Option<u64>> {
        self.checkpoint_key(SERVED_SINGLE)
    }

    /// A group node found every event of this store in the stream: what a
    /// single-mode serve acknowledged is published.
    pub fn clear_served_single(&self) -> Result<()> {
        if self.served_single()?.is_none() {
            return Ok(());
        }
        self.write_checkpoint_key(SERVED_SINGLE, None)
    }

    /// The last seq this store knows the stream acknowledged
    /// ([`ACKNOWLEDGED`]); 0 when none.
    pub fn acknowledged(&self) -> Result<u64> {
        Ok(self.checkpoint_key(ACKNOWLEDGED)?.unwrap_or(0))
    }

    /// The stream acknowledged the log through `seq`: raise
    /// [`ACKNOWLEDGED`] to it (never lowered).
    pub fn note_acknowledged(&self, seq: u64) -> Result<()> {
        if seq <= self.acknowledged()? {
            return Ok(());
        }
        self.write_checkpoint_key(ACKNOWLEDGED, Some(seq))
    }

    /// The value of `key` in [`CHECKPOINT`], if any (stores from before
    /// the table lack it).
    fn checkpoint_key(&self, key: &str) -> Result<Option<u64>> {
        let txn = self.begin_read()?;
        match txn.open_table(CHECKPOINT) {
            Ok(t) => Ok(t.get(key)?.map(|v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn write_checkpoint_key(&self, key: &str, value: Option<u64>) -> Result<()> {
        let db = self.writable()?;
        let _one = self.inner.one_writer();
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        {
            let mut t = txn.open_table(CHECKPOINT)?;
            match value {
                Some(v) => t.insert(key, v)?,
                None => t.remove(key)?,
            };
        }
        txn.commit()?;
        Ok(())
    }

    /// Seq of the last event (0 when empty).
    pub fn head_seq(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        behind::last_seq(&txn.open_table(EVENTS)?)
    }

    /// Events with seq in `from..=to`, in order.
    pub fn events(&self, from: u64, to: u64) -> Result<Vec<Envelope>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        t.range(from..=to)?
            .map(|r| {
                let (k, v) = r?;
                decode_envelope(k.value(), v.value())
            })
            .collect()
    }

    /// Events with seq in `from..=to` as stored (the exact bytes published).
    pub fn raw_events(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        t.range(from..=to)?
            .map(|r| {
                let (k, v) = r?;
                Ok((k.value(), v.value().to_vec()))
            })
            .collect()
    }

    /// Visit every event in seq order with its raw stored bytes.
    pub fn for_each_event(&self, mut f: impl FnMut(u64, &[u8]) -> Result<bool>) -> Result<()> {
        let txn = self.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        for r in t.iter()? {
            let (k, v) = r?;
            if !f(k.value(), v.value())? {
                break;
            }
        }
        Ok(())
    }

    pub fn event_count(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        Ok(txn.open_table(EVENTS)?.len()?)
    }

    /// Every event and rejection of one job, in seq order.
    pub fn job_events(&self, job_id: Uuid) -> Result<Vec<Envelope>> {
        let mut out = Vec::new();
        self.for_each_job_event(job_id, |env| {
            out.push(env);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Visit every event and rejection of one job, in seq order, until `f`
    /// returns `Ok(false)`: one read of the store, one event held at a time.
    pub fn for_each_job_event(
        &self,
        job_id: Uuid,
        mut f: impl FnMut(Envelope) -> Result<bool>,
    ) -> Result<()> {
        let view = self.job_rows(JobRow::Event.range(job_id.as_u128()))?;
        let index = view.rows()?;
        // The held rows name only committed events: all in this transaction.
        let events = view.txn().open_table(EVENTS)?;
        for r in index.range(JobRow::Event.range(job_id.as_u128()))? {
            let (key, row) = r?;
            let seqs = rows::read_index(key.2, row.value()).map_err(|e| {
                corrupt(format!(
                    "job {job_id}'s event index row for seq {}: {e}",
                    key.2
                ))
            })?;
            for seq in seqs {
                let bytes = events.get(seq)?.ok_or_else(|| {
                    corrupt(format!("job {job_id}'s index names missing seq {seq}"))
                })?;
                if !f(decode_envelope(seq, bytes.value())?)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The type of the first event of the command that appended the event
    /// at `seq` (whose command is `command_id`), for a job's history: a
    /// command's events are consecutive, and the jobs a command moves
    /// between Active and Misconfigured (`JobMisconfigured`,
    /// `JobReconfigured`) follow the event that names it.
    pub fn command_start(&self, seq: u64, command_id: Uuid) -> Result<Option<String>> {
        #[derive(Deserialize)]
        struct Head {
            command_id: Uuid,
            #[serde(rename = "type")]
            event_type: String,
        }
        let txn = self.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let mut first = None;
        for r in events.range(..seq)?.rev() {
            let (key, bytes) = r?;
            let head: Head = serde_json::from_slice(bytes.value())
                .map_err(|e| corrupt(format!("event at seq {}: {e}", key.value())))?;
            if head.command_id != command_id {
                break;
            }
            let moved = matches!(
                head.event_type.as_str(),
                "JobMisconfigured" | "JobReconfigured"
            );
            first = Some(head.event_type);
            if !moved {
                break;
            }
        }
        Ok(first)
    }

    /// A job's history from its `events` ([`HistoryFold`]),
    /// each move by another job's command named by that command's first
    /// event ([`Store::command_start`]); one that cannot be read is an
    /// error, not a guess at its verb.
    pub fn history(&self, events: &[Envelope]) -> Result<Vec<HistoryEntry>> {
        let mut fold = HistoryFold::default();
        events
            .iter()
            .map(|e| self.history_entry(&mut fold, e))
            .collect()
    }

    /// The history entry of `env`, the next event of `fold`'s job
    /// ([`HistoryFold::entry`], with [`Store::command_start`] read here).
    pub fn history_entry(&self, fold: &mut HistoryFold, env: &Envelope) -> Result<HistoryEntry> {
        let mut unread = None;
        let entry = fold.entry(env, &mut |e| {
            self.command_start(e.seq, e.command_id)
                .unwrap_or_else(|err| {
                    unread = Some(err);
                    None
                })
        });
        unread.map_or(Ok(entry), Err)
    }

    pub fn job(&self, job_id: Uuid) -> Result<Option<Job>> {
        let view = self.job_rows(JobRow::Job.range(job_id.as_u128()))?;
        behind::job_of(&view.rows()?, job_id)
    }

    /// A job's snapshot catalog (None: the job never had a snapshot).
    pub fn catalog(&self, job_id: Uuid) -> Result<Option<Catalog>> {
        let id = job_id.as_u128();
        let view = self.job_rows(JobRow::Job.key(id, 0)..=JobRow::Snapshot.key(id, u128::MAX))?;
        behind::catalog_of(&view.rows()?, job_id)
    }

    /// One page of the jobs matching `filter`, in job-id order, after
    /// `filter.after`: at most `max_jobs` (or `filter.limit`) and about
    /// `max_bytes` of JSON; with the id to continue after when more may match.
    /// A filter naming a project reads that project's jobs alone once a
    /// ledger opened the store (`by_project.rs`); otherwise every job's view.
    pub fn jobs_page(
        &self,
        filter: &crate::domain::filter::JobFilter,
        max_jobs: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Job>, Option<Uuid>)> {
        let mut page = JobsPage {
            jobs: Vec::new(),
            bytes: 0,
            limit: (filter.limit)
                .map_or(max_jobs, std::num::NonZeroUsize::get)
                .clamp(1, max_jobs),
            max_bytes,
        };
        let mut next = filter.after.map_or(Some(0), |a| a.as_u128().checked_add(1));
        // Only views are read here: the rows held behind are copied for
        // those alone.
        let from = JobRow::Job.key(next.unwrap_or(u128::MAX), 0);
        let view = self.job_rows_of(from.., Some(JobRow::Job))?;
        let t = view.rows()?;
        let mut take = |job: Job| match filter.matches(&job) {
            true => page.take(job),
            false => None,
        };
        if let Some(project) = &filter.project_id
            && self.indexes_projects()
        {
            // The project's own job ids, a chunk at a time (the lock is not
            // held while their views are read).
            const CHUNK: usize = 256;
            while let Some(from) = next {
                let ids = self.project_jobs(project, from, CHUNK);
                next = ids.last().and_then(|id| id.checked_add(1));
                for id in ids {
                    // An id whose view is not there was not committed.
                    if let Some(row) = t.get(JobRow::Job.key(id, 0))?
                        && let Some(full) = take(read_job_row(row.value())?)
                    {
                        return Ok(full);
                    }
                }
            }
        } else {
            // Each job's view is its first row: seek to it, then past the job.
            while let Some(from) = next {
                let Some(r) = t.range(JobRow::Job.key(from, 0)..)?.next() else {
                    break;
                };
                let (k, v) = r?;
                let (id, kind, _) = k;
                next = id.checked_add(1);
                if kind != JobRow::Job as u8 {
                    continue; // only rejections of a job id that never existed
                }
                if let Some(full) = take(read_job_row(v.value())?) {
                    return Ok(full);
                }
            }
        }
        Ok((page.jobs, None))
    }

    /// Index the jobs of each project of `world` (replacing any index).
    pub(crate) fn index_projects(&self, world: &World) {
        let index = by_project::ByProject::of(
            (world.jobs.iter()).map(|(id, job)| (&job.project_id, id.as_u128())),
        );
        *self.by_project_mut() = Some(index);
    }

    /// Add jobs decided (not yet committed) to the index, if there is one.
    pub(crate) fn index_jobs<'a>(
        &self,
        jobs: impl IntoIterator<Item = (&'a crate::domain::ids::ProjectId, u128)>,
    ) {
        if let Some(index) = self.by_project_mut().as_mut() {
            index.extend(jobs);
        }
    }

    fn indexes_projects(&self) -> bool {
        self.by_project().is_some()
    }

    fn project_jobs(
        &self,
        project: &crate::domain::ids::ProjectId,
        from: u128,
        n: usize,
    ) -> Vec<u128> {
        (self.by_project().as_ref()).map_or_else(Vec::new, |index| index.from(project, from, n))
    }

    fn by_project(&self) -> std::sync::RwLockReadGuard<'_, Option<by_project::ByProject>> {
        (self.inner.by_project.read()).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn by_project_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<by_project::ByProject>> {
        (self.inner.by_project.write()).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stored projections (jobs, catalogs and regions) as a [`World`].
    pub fn load_world(&self) -> Result<World> {
        let view = self.job_rows(..)?;
        let chunked = behind::snapshot_rows_chunked(view.txn())?;
        let layout = behind::row_layout(view.txn())?;
        // A catalog stored in the other layout than bcp lays it out would
        // be misread by the write path, which knows a job's rows from its
        // state alone (a combined row of more than COMBINED_MAX, say,
        // would be overwritten by a view and its catalog lost).
        let misplaced = |id: u128, catalog: &Catalog, combined: bool| {
            let laid_out = rows::combines(layout, catalog);
            (laid_out != combined).then(|| {
                corrupt(format!(
                    "job {}'s catalog of {} snapshots is stored {}, where bcp lays it out {}; run `bcp audit verify`",
                    Uuid::from_u128(id),
                    catalog.snapshots.len(),
                    if combined { "in one row" } else { "apart" },
                    if laid_out { "in one row" } else { "apart" },
                ))
            })
        };
        let mut world = World::default();
        // Rows come grouped by job: its view, class row, snapshots, events
        // (or its combined row, then its events).
        let mut job: Option<u128> = None;
        let mut combined = false;
        let mut classes: Option<Vec<u8>> = None;
        let mut snapshots: Vec<(u128, Vec<crate::domain::Snapshot>)> = Vec::new();
        let finish = |world: &mut World,
                      job: Option<u128>,
                      classes: Option<Vec<u8>>,
                      snapshots: &mut Vec<_>|
         -> Result<()> {
            let (Some(id), Some(classes)) = (job, classes) else {
                return Ok(());
            };
            let fault = |e: String| corrupt(format!("catalog of job {}: {e}", Uuid::from_u128(id)));
            // The write path changes rows where the layout puts them: a
            // row elsewhere would hold snapshots long gone (verify names it).
            if let Some(why) = rows::layout_fault(snapshots, chunked) {
                return Err(fault(why));
            }
            let catalog = rows::read_catalog(&classes, snapshots.drain(..).map(|(_, s)| Ok(s)))
                .map_err(fault)?;
            if let Some(e) = misplaced(id, &catalog, false) {
                return Err(e);
            }
            world.catalogs.insert(Uuid::from_u128(id), catalog);
            Ok(())
        };
        for r in view.rows()?.range(..)? {
            let (k, v) = r?;
            let (id, kind, sub) = k;
            if job != Some(id) {
                finish(&mut world, job, classes.take(), &mut snapshots)?;
                (job, combined) = (Some(id), false);
            }
            // A job id that never existed has only rejections (event rows).
            let known = world.jobs.contains_key(&Uuid::from_u128(id));
            let catalog_row = kind == JobRow::Classes as u8 || kind == JobRow::Snapshot as u8;
            if catalog_row && (!known || combined) {
                return Err(corrupt(format!(
                    "catalog rows of job {} without the job, or beside its combined row",
                    Uuid::from_u128(id)
                )));
            }
            match kind {
                k if k == JobRow::Job as u8 => {
                    let fault = |e: String| corrupt(format!("job row: {e}"));
                    let (row, catalog) = match rows::read_combined(v.value()).map_err(fault)? {
                        Some((row, catalog)) => (row, Some(catalog)),
                        None => (rows::read_job(v.value()).map_err(fault)?, None),
                    };
                    if row.job_id.as_u128() != id {
                        return Err(corrupt(format!(
                            "job row keyed {} holds job {}",
                            Uuid::from_u128(id),
                            row.job_id
                        )));
                    }
                    if let Some(catalog) = catalog {
                        if let Some(e) = misplaced(id, &catalog, true) {
                            return Err(e);
                        }
                        combined = true;
                        world.catalogs.insert(row.job_id, catalog);
                    }
                    world.jobs.insert(row.job_id, row);
                }
                k if k == JobRow::Classes as u8 => classes = Some(v.value().to_vec()),
                k if k == JobRow::Snapshot as u8 => {
                    if classes.is_none() {
                        return Err(corrupt(format!(
                            "snapshot rows of job {} without a catalog",
                            Uuid::from_u128(id)
                        )));
                    }
                    let read = rows::read_snapshots(v.value()).map_err(|e| {
                        corrupt(format!("catalog of job {}: {e}", Uuid::from_u128(id)))
                    })?;
                    snapshots.push((sub, read));
                }
                _ => {}
            }
        }
        finish(&mut world, job, classes.take(), &mut snapshots)?;
        for r in view.txn().open_table(REGIONS)?.iter()? {
            let (_, v) = r?;
            let region: Region = serde_json::from_slice(v.value())
                .map_err(|e| corrupt(format!("region row: {e}")))?;
            world.regions.insert(region.region.clone(), region);
        }
        world.reindex();
        Ok(world)
    }
}

/// The audit tools never create a store.
fn must_exist(path: &Path) -> Result<()> {
    if !path.exists() {
        return Err(StoreError::Missing {
            path: path.display().to_string(),
        });
    }
    not_a_directory(path)
}

/// A store is a file: a directory given for it is named as such, not
/// left to an I/O error without its path.
fn not_a_directory(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(StoreError::Directory {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.display().to_string(),
        },
        redb::DatabaseError::RepairAborted => StoreError::NeedsRecovery {
            path: path.display().to_string(),
        },
        e => e.into(),
    }
}

/// A jobs page being filled ([`Store::jobs_page`]).
struct JobsPage {
    jobs: Vec<Job>,
    bytes: usize,
    limit: usize,
    max_bytes: usize,
}

impl JobsPage {
    /// Take a matching job; once the page is full (by count or by the JSON
    /// the reply will carry, counted, not built), the page and the id to
    /// continue after instead. A page holds at least one job, however large:
    /// a page of none with a cursor would be asked for again forever.
    fn take(&mut self, job: Job) -> Option<(Vec<Job>, Option<Uuid>)> {
        let json_len = json_len(&job);
        if let Some(last) = self.jobs.last().map(|j| j.job_id)
            && (self.jobs.len() == self.limit || self.bytes + json_len > self.max_bytes)
        {
            return Some((std::mem::take(&mut self.jobs), Some(last)));
        }
        self.bytes += json_len;
        self.jobs.push(job);
        None
    }
}

fn read_job_row(v: &[u8]) -> Result<Job> {
    rows::read_job(v).map_err(|e| corrupt(format!("job row: {e}")))
}
