//! The redb store: opening, reading the log and projections, and (in
//! [`ledger`]) appending decided events. Synchronous; callers on async code
//! use `spawn_blocking`. Nothing here awaits.

pub mod import;
pub mod ledger;
pub mod tables;

use crate::domain::{Catalog, Envelope, Job, Region, World};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tables::*;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store {path} is in use by another process (a running `bcp serve`?); stop it, or read through NATS queries"
    )]
    InUse { path: String },
    #[error("no store at {path}")]
    Missing { path: String },
    #[error("storage error: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt store: {0}")]
    Corrupt(String),
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
    /// reopened: the writer must stop and bcp serve be restarted.
    pub fn is_poisoned(&self) -> bool {
        matches!(self, StoreError::Redb(redb::Error::PreviousIo))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What is stored per `command_id`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommandRecord {
    pub fingerprint: String,
    pub reply: crate::domain::Reply,
}

/// A handle on the store; cheap to clone, shared by the writer and readers.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub fn decode_envelope(seq: u64, bytes: &[u8]) -> Result<Envelope> {
    Envelope::from_json(bytes)
        .map_err(|e| corrupt(format!("event at seq {seq} does not parse: {e}")))
}

impl Store {
    /// Open the store at `path`, creating it (and its tables) if missing.
    pub fn open_or_create(path: &Path) -> Result<Store> {
        let db = Database::create(path).map_err(|e| open_error(path, e))?;
        let store = Store { db: Arc::new(db) };
        store.create_tables()?;
        Ok(store)
    }

    /// A store on another storage backend (fault-injection tests).
    pub fn with_backend(backend: impl redb::StorageBackend) -> Result<Store> {
        let db = redb::Builder::new().create_with_backend(backend)?;
        let store = Store { db: Arc::new(db) };
        store.create_tables()?;
        Ok(store)
    }

    fn create_tables(&self) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(EVENTS)?;
        txn.open_table(JOB_LOG)?;
        txn.open_table(COMMANDS)?;
        txn.open_table(JOBS)?;
        txn.open_table(CATALOGS)?;
        txn.open_table(REGIONS)?;
        txn.open_table(CURSOR)?;
        txn.commit()?;
        Ok(())
    }

    /// Open an existing store (the audit tools never create one).
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.display().to_string(),
            });
        }
        Self::open_or_create(path)
    }

    /// [`Store::open_existing`] with redb's page cache bounded to
    /// `cache_bytes` (it defaults to 1 GiB): for one pass over the log
    /// (audit verify, replay), where keeping every page read only fills
    /// memory.
    pub fn open_existing_with_cache(path: &Path, cache_bytes: usize) -> Result<Store> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.display().to_string(),
            });
        }
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| open_error(path, e))?;
        let store = Store { db: Arc::new(db) };
        store.create_tables()?;
        Ok(store)
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Seq of the last event (0 when empty).
    pub fn head_seq(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        Ok(t.last()?.map_or(0, |(k, _)| k.value()))
    }

    pub fn published_seq(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CURSOR)?;
        Ok(t.get(PUBLISHED_SEQ)?.map_or(0, |v| v.value()))
    }

    /// Events with seq in `from..=to`, in order.
    pub fn events(&self, from: u64, to: u64) -> Result<Vec<Envelope>> {
        let txn = self.db.begin_read()?;
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
        let txn = self.db.begin_read()?;
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
        let txn = self.db.begin_read()?;
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
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(EVENTS)?.len()?)
    }

    /// Every event and rejection of one job, in seq order.
    pub fn job_events(&self, job_id: Uuid) -> Result<Vec<Envelope>> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(JOB_LOG)?;
        let events = txn.open_table(EVENTS)?;
        let id = job_id.as_u128();
        let mut out = Vec::new();
        for r in index.range((id, 0)..=(id, u64::MAX))? {
            let seq = r?.0.value().1;
            let bytes = events
                .get(seq)?
                .ok_or_else(|| corrupt(format!("job_log names missing seq {seq}")))?;
            out.push(decode_envelope(seq, bytes.value())?);
        }
        Ok(out)
    }

    pub fn job(&self, job_id: Uuid) -> Result<Option<Job>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(JOBS)?;
        t.get(job_id.as_u128())?
            .map(|v| {
                serde_json::from_slice(v.value()).map_err(|e| corrupt(format!("job {job_id}: {e}")))
            })
            .transpose()
    }

    /// A job's snapshot catalog (None: the job never had a snapshot).
    pub fn catalog(&self, job_id: Uuid) -> Result<Option<Catalog>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CATALOGS)?;
        t.get(job_id.as_u128())?
            .map(|v| {
                serde_json::from_slice(v.value())
                    .map_err(|e| corrupt(format!("catalog {job_id}: {e}")))
            })
            .transpose()
    }

    /// One page of the jobs matching `filter`, in job-id order, after
    /// `filter.after`: at most `max_jobs` (or `filter.limit`) and about
    /// `max_bytes` of JSON; with the id to continue after when more may match.
    pub fn jobs_page(
        &self,
        filter: &crate::projection::JobFilter,
        max_jobs: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Job>, Option<Uuid>)> {
        let limit = filter.limit.unwrap_or(max_jobs).clamp(1, max_jobs);
        let txn = self.db.begin_read()?;
        let t = txn.open_table(JOBS)?;
        let start = filter.after.map_or(0, |a| a.as_u128().saturating_add(1));
        let (mut jobs, mut bytes) = (Vec::new(), 0);
        for r in t.range(start..)? {
            let (k, v) = r?;
            let job: Job =
                serde_json::from_slice(v.value()).map_err(|e| corrupt(format!("job row: {e}")))?;
            if !filter.matches(&job) {
                continue;
            }
            if jobs.len() == limit || bytes + v.value().len() > max_bytes {
                let last = jobs
                    .last()
                    .map(|j: &Job| j.job_id)
                    .unwrap_or(Uuid::from_u128(k.value().saturating_sub(1)));
                return Ok((jobs, Some(last)));
            }
            bytes += v.value().len();
            jobs.push(job);
        }
        Ok((jobs, None))
    }

    /// The stored projections (jobs, catalogs and regions) as a [`World`].
    pub fn load_world(&self) -> Result<World> {
        let txn = self.db.begin_read()?;
        let mut world = World::default();
        for r in txn.open_table(JOBS)?.iter()? {
            let (k, v) = r?;
            let job: Job =
                serde_json::from_slice(v.value()).map_err(|e| corrupt(format!("job row: {e}")))?;
            if job.job_id.as_u128() != k.value() {
                return Err(corrupt(format!(
                    "job row keyed {} holds job {}",
                    Uuid::from_u128(k.value()),
                    job.job_id
                )));
            }
            world.jobs.insert(job.job_id, job);
        }
        for r in txn.open_table(CATALOGS)?.iter()? {
            let (k, v) = r?;
            let catalog: Catalog = serde_json::from_slice(v.value())
                .map_err(|e| corrupt(format!("catalog row: {e}")))?;
            world.catalogs.insert(Uuid::from_u128(k.value()), catalog);
        }
        for r in txn.open_table(REGIONS)?.iter()? {
            let (_, v) = r?;
            let region: Region = serde_json::from_slice(v.value())
                .map_err(|e| corrupt(format!("region row: {e}")))?;
            world.regions.insert(region.region.clone(), region);
        }
        Ok(world)
    }

    /// Store the relay's published-through cursor on its own (used at
    /// shutdown; while serving, the writer carries it in each batch).
    pub fn save_published_seq(&self, seq: u64) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(corrupt)?;
        txn.open_table(CURSOR)?.insert(PUBLISHED_SEQ, seq)?;
        txn.commit()?;
        Ok(())
    }
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.display().to_string(),
        },
        e => e.into(),
    }
}
