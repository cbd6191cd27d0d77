//! The store's file: redb's own file backend, with the time of every fsync
//! observed (`bcp_fsync_seconds` on `/metrics`). Every acknowledged command
//! waits for one, so the disk's fsync latency is the floor of bcp's; an
//! operator sees it apart from bcp's own work (`bcp_commit_seconds`).

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::ops::Bound;
use std::time::Instant;

/// The store's file, opened as redb's `Builder::create(path)` opens it
/// (created if missing, never truncated).
pub fn open_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// 50 µs to about 0.8 s, doubling.
pub fn fsync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

/// redb's [`FileBackend`], everything passed through; `sync_data` timed.
#[derive(Debug)]
pub struct TimedFile {
    file: FileBackend,
    fsync_seconds: Histogram,
}

impl TimedFile {
    pub fn new(file: std::fs::File, fsync_seconds: Histogram) -> Result<Self, redb::DatabaseError> {
        Ok(TimedFile {
            file: FileBackend::new(file)?,
            fsync_seconds,
        })
    }
}

impl StorageBackend for TimedFile {
    fn sync_data(&self) -> Result<(), std::io::Error> {
        let start = Instant::now();
        let result = self.file.sync_data();
        self.fsync_seconds.observe(start.elapsed().as_secs_f64());
        result
    }

    fn len(&self) -> Result<u64, std::io::Error> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.file.set_len(len)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.file.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.file.close()
    }
    // The file locks, so a second process is still refused (`InUse`).
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}
