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

/// A store's file as it is, with what redb writes to it kept in memory:
/// redb's integrity check, which commits what it repairs, runs over it and
/// leaves the file exactly as it was ([`check_pages`]). The file's locks
/// are redb's own, through a [`FileBackend`] of the same file, all shared.
#[derive(Debug)]
struct Overlay {
    file: std::fs::File,
    file_len: u64,
    locks: FileBackend,
    state: std::sync::Mutex<Written>,
}

/// What redb did to the overlay: the length it set, and its writes in
/// order, each at its offset (few: a check writes only what it rebuilds
/// and its commit's header).
#[derive(Debug)]
struct Written {
    len: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

impl StorageBackend for Overlay {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.state.lock().expect("overlay lock").len)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        use std::os::unix::fs::FileExt;
        let in_file = self.file_len.saturating_sub(offset).min(out.len() as u64) as usize;
        self.file.read_exact_at(&mut out[..in_file], offset)?;
        out[in_file..].fill(0);
        let end = offset + out.len() as u64;
        for (at, data) in &self.state.lock().expect("overlay lock").writes {
            let (from, to) = ((*at).max(offset), (at + data.len() as u64).min(end));
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            }
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.state.lock().expect("overlay lock").len = len;
        Ok(())
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut state = self.state.lock().expect("overlay lock");
        state.writes.push((offset, data.to_vec()));
        Ok(())
    }
    // redb's locks, taken shared: the check only reads, so it keeps a
    // server out as any reader does, beside other readers.
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.locks.try_lock_shared_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.locks.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.lock_shared_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.locks.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.locks.query_lock_range(start, end)
    }
}

/// Whether every page of the store at `path` passes redb's checksums:
/// redb's own integrity check, run on an in-memory overlay of the file,
/// which is never written. A reader of a B-tree trusts its pages; this
/// finds a flipped byte in a page that no scan in key order notices (a
/// branch's key: lookups then miss a row that is there) or that would
/// crash the reader. Run it before opening the store to read it.
///
/// `Ok(Err(why))`: the file is damaged. `Err`: it could not be checked
/// (missing, in use by a running server, not readable).
pub fn check_pages(path: &std::path::Path) -> super::Result<Result<(), String>> {
    super::must_exist(path)?;
    let io = |e: std::io::Error| super::StoreError::Redb(redb::StorageError::Io(e).into());
    let file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let overlay = Overlay {
        locks: FileBackend::new(std::fs::File::open(path).map_err(io)?)
            .map_err(|e| super::open_error(path, e))?,
        file,
        file_len,
        state: std::sync::Mutex::new(Written {
            len: file_len,
            writes: Vec::new(),
        }),
    };
    // An integrity check on open verifies every page of the committed trees
    // and rebuilds the allocator state from them (a repair session, always).
    // A primary commit slot whose trees fail their checksums is an error,
    // or, for a commit without two-phase commit (bcp's), a fall back to the
    // commit before it: the session then reports progress 0.3 (redb's
    // `do_repair`), which in a file closed cleanly counts as damage too.
    let fell_back = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saw = fell_back.clone();
    let opened = redb::Builder::new()
        .set_cache_size(16 << 20)
        .set_check_integrity_on_open(true)
        .set_repair_callback(move |s| {
            if (s.progress() - 0.3).abs() < 1e-9 {
                saw.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .create_with_backend(overlay);
    match opened {
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(why))) => Ok(Err(why)),
        Err(e) => Err(super::open_error(path, e)),
        Ok(db) if fell_back.load(std::sync::atomic::Ordering::Relaxed) => {
            drop(db);
            // Power lost during a commit leaves that too, in a file redb's
            // own read-only open refuses as needing recovery: that is no
            // damage. (redb may panic reading a damaged file: damage too.)
            let plain = std::panic::catch_unwind(|| redb::Builder::new().open_read_only(path));
            match plain {
                Ok(Err(e @ redb::DatabaseError::RepairAborted)) => Err(super::open_error(path, e)),
                _ => Ok(Err(
                    "the last commit's pages do not match their checksums".into()
                )),
            }
        }
        Ok(_) => Ok(Ok(())),
    }
}
