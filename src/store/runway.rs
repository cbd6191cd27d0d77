//! The store file's runway: blocks allocated and zeroed ahead of where
//! redb writes next, so a commit's `fdatasync` flushes data only.
//!
//! redb grows its file with `set_len` (a hole) and writes new pages into
//! the hole. On ext4 every commit's `fdatasync` then also allocates those
//! pages' blocks and writes the allocation (block bitmap, extent tree,
//! inode), each with a synchronous write of its own: 40 % of the sync's CPU
//! in a profile of `bcp serve` (bench/RESULTS.md). A background thread
//! writes zeros over the hole ahead of the highest byte redb has written
//! ([`RUNWAY`] bytes, [`CHUNK`] at a time), writes them back and syncs, so
//! commits overwrite blocks that are already allocated.
//!
//! redb writes most new pages just above the file's written prefix (its
//! allocator takes the lowest free pages), and a few far above it (a grown
//! file's last pages): the runway extends the prefix, up to [`RUNWAY`] past
//! the highest write that touched it, and steps over the far writes.
//!
//! What redb sees does not change: zeros go only where redb has written
//! nothing (neither since the file was opened, nor data the file held at
//! open), never past the length redb set, and a write or `set_len` that
//! reaches the chunk being zeroed waits for it. A chunk that fails (a full
//! disk, say) stops the runway for this process, with a warning; redb then
//! allocates as it did without one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// How far ahead of redb's highest write the file is kept zeroed.
pub const RUNWAY: u64 = 8 << 20;
/// How much the thread zeroes and syncs at a time.
pub const CHUNK: u64 = 1 << 20;

/// The runway of one open store file; the thread stops when it is dropped.
#[derive(Debug)]
pub struct Runway {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    file: File,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    /// Below it every byte is zeroed by the runway or written by redb (the
    /// prefix); the runway never writes below it.
    zeroed: u64,
    /// The end of redb's highest write within the runway's reach (or of
    /// the prefix at open): where redb's new pages go.
    frontier: u64,
    /// What redb wrote (or the file held at open) above the prefix, as
    /// start → end, disjoint: the runway steps over it.
    islands: BTreeMap<u64, u64>,
    /// The file's length as redb set it.
    len: u64,
    /// The end of the chunk being zeroed, which starts at `zeroed`.
    busy: Option<u64>,
    /// The thread is zeroing up to the target (then it syncs and sleeps).
    filling: bool,
    stopped: bool,
}

impl Runway {
    /// Start the runway of `file` (a handle of the store's file, opened for
    /// writing).
    pub fn start(file: &File) -> io::Result<Runway> {
        let file = file.try_clone()?;
        let len = file.metadata()?.len();
        let mut state = State {
            zeroed: 0,
            frontier: 0,
            islands: BTreeMap::new(),
            len,
            busy: None,
            filling: false,
            stopped: false,
        };
        for (start, end) in data(&file, len)? {
            state.claim(start, end);
        }
        state.frontier = state.zeroed;
        let shared = Arc::new(Shared {
            file,
            state: Mutex::new(state),
            changed: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("bcp-runway".into())
                .spawn(move || shared.run())?
        };
        Ok(Runway {
            shared,
            thread: Some(thread),
        })
    }

    /// Before redb writes `len` bytes at `offset`: wait while they reach
    /// the chunk being zeroed, then claim them (the runway never zeroes
    /// them afterwards).
    pub fn before_write(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut s = self.shared.idle_up_to(end);
        // New pages: within the runway's reach, if not yet zeroed.
        let new_pages = offset <= s.target().max(s.zeroed);
        s.claim(offset, end);
        if new_pages && end > s.frontier {
            s.frontier = end;
            // Woken once the runway is half gone, not for every page.
            if !s.filling && s.short() {
                self.shared.changed.notify_all();
            }
        }
    }

    /// redb's `set_len`, run (by `set`) while no chunk is being zeroed.
    pub fn set_len(&self, len: u64, set: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut s = self.shared.idle_up_to(u64::MAX);
        set()?;
        s.len = len;
        s.zeroed = s.zeroed.min(len);
        s.frontier = s.frontier.min(len);
        s.islands.retain(|&start, _| start < len);
        if let Some(end) = s.islands.values_mut().last() {
            *end = (*end).min(len);
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// How far the file is zeroed or claimed, and redb's highest write (for
    /// tests).
    pub fn zeroed_and_frontier(&self) -> (u64, u64) {
        let s = self.shared.lock();
        (s.zeroed, s.frontier)
    }

    /// Whether a chunk is being zeroed (for tests).
    #[cfg(test)]
    fn zeroing(&self) -> bool {
        self.shared.lock().busy.is_some()
    }

    /// Wait until the runway is as long as it will get (for tests).
    pub fn settle(&self) {
        let mut s = self.shared.lock();
        while !s.stopped && (s.busy.is_some() || s.filling || s.short()) {
            s = self.shared.wait(s);
        }
    }
}

impl Drop for Runway {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl State {
    /// Where the runway should reach.
    fn target(&self) -> u64 {
        self.len.min(self.frontier.saturating_add(RUNWAY))
    }

    /// `start..end` holds data: part of the prefix, or an island above it.
    fn claim(&mut self, start: u64, end: u64) {
        if end <= self.zeroed {
            return;
        }
        let (mut start, mut end) = (start.max(self.zeroed), end);
        // Merge with every island it meets.
        let met: Vec<(u64, u64)> = self
            .islands
            .range(..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in met {
            self.islands.remove(&s);
            (start, end) = (start.min(s), end.max(e));
        }
        if start <= self.zeroed {
            self.zeroed = end;
        } else {
            self.islands.insert(start, end);
        }
    }

    /// The runway is short: half of it is gone (or, at the file's end, any
    /// of it).
    fn short(&self) -> bool {
        let target = self.target();
        self.zeroed < target && (target == self.len || self.zeroed + RUNWAY / 2 < target)
    }

    /// The next range to zero: from the prefix's end to the target, at
    /// most a chunk, up to the next island.
    fn next_chunk(&self) -> Option<(u64, u64)> {
        let (start, target) = (self.zeroed, self.target());
        let next_island = self.islands.keys().next().copied().unwrap_or(u64::MAX);
        let end = target.min(start + CHUNK).min(next_island);
        (end > start).then_some((start, end))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(s).unwrap_or_else(|e| e.into_inner())
    }

    /// The state, once no chunk being zeroed lies below `end`.
    fn idle_up_to(&self, end: u64) -> MutexGuard<'_, State> {
        let mut s = self.lock();
        while s.busy.is_some() && end > s.zeroed {
            s = self.wait(s);
        }
        s
    }

    /// The thread: when the runway is short, zero it to its target a chunk
    /// at a time, then sync the file (the blocks' allocation) once.
    fn run(&self) {
        let mut s = self.lock();
        loop {
            if s.stopped {
                return;
            }
            if !s.filling {
                if !s.short() {
                    s = self.wait(s);
                    continue;
                }
                s.filling = true;
            }
            let done = match s.next_chunk() {
                Some((start, end)) => {
                    s.busy = Some(end);
                    drop(s);
                    let done = self.zero(start, end);
                    s = self.lock();
                    s.busy = None;
                    done.map(|()| s.claim(start, end))
                }
                None => {
                    drop(s);
                    let done = self.file.sync_data();
                    s = self.lock();
                    s.filling = false;
                    done
                }
            };
            if let Err(e) = done {
                tracing::warn!(
                    error = %e,
                    "could not allocate the store file ahead of redb's writes; commits allocate it as they write"
                );
                s.stopped = true;
            }
            self.changed.notify_all();
        }
    }

    /// Zero `start..end` and write it back (allocating its blocks).
    fn zero(&self, start: u64, end: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = start;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        sync_range(&self.file, start, end - start)
    }
}

/// Write `len` bytes at `offset` back and wait for them, so their blocks
/// are allocated now and not by the next commit's `fdatasync`.
fn sync_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let (offset, len) = (offset as libc::off64_t, len as libc::off64_t);
    // SAFETY: a plain syscall on an open descriptor; it reads no memory.
    match unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The ranges of `file` (of length `len`) that hold data, in order; the
/// rest is holes, which redb has never written.
fn data(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let (mut at, mut found) = (0u64, Vec::new());
    while at < len {
        // SAFETY: plain syscalls on an open descriptor.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(found),
                // A file system without SEEK_DATA: treat the whole file as data.
                Some(libc::EINVAL) => Ok(vec![(0, len)]),
                _ => Err(e),
            };
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        found.push((data as u64, (hole as u64).min(len)));
        at = hole as u64;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn data_end(file: &File, len: u64) -> u64 {
        data(file, len).unwrap().last().map_or(0, |&(_, end)| end)
    }

    /// A file of `len` bytes whose first `data` bytes are 7s, the rest a hole.
    fn file_with(dir: &tempfile::TempDir, data: usize, len: u64) -> File {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("store"))
            .unwrap();
        file.write_all_at(&vec![7u8; data], 0).unwrap();
        file.set_len(len).unwrap();
        file
    }

    fn contents(file: &File) -> Vec<u8> {
        let mut out = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut out, 0).unwrap();
        out
    }

    /// redb's writes through the runway, as it grows the file and rewrites
    /// pages below its highest, while the thread zeroes ahead: the file
    /// holds exactly what was written, and the runway is allocated.
    #[test]
    fn zeroes_ahead_of_the_writes_and_never_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(&dir, 10_000, 10_000);
        let mut model = vec![7u8; 10_000];
        let runway = Runway::start(&file).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut high = 10_000u64;
        for round in 0..3_000u64 {
            if high + (64 << 10) > model.len() as u64 {
                // redb doubles the file when it runs out of room.
                let len = model.len() as u64 * 2;
                runway.set_len(len, || file.set_len(len)).unwrap();
                model.resize(len as usize, 0);
            }
            // Mostly new pages at the top, some rewritten below it.
            let offset = if next(3) == 0 { next(high) } else { high };
            let len = 1 + next(8_192);
            let byte = (round % 250) as u8 + 1;
            runway.before_write(offset, len);
            file.write_all_at(&vec![byte; len as usize], offset)
                .unwrap();
            model[offset as usize..(offset + len) as usize].fill(byte);
            high = high.max(offset + len);
        }
        runway.settle();
        let (zeroed, frontier) = runway.zeroed_and_frontier();
        assert_eq!(frontier, high);
        // Zeroed to the target, or short of it by less than half a runway.
        let (len, target) = (model.len() as u64, (high + RUNWAY).min(model.len() as u64));
        assert!(zeroed <= target, "{zeroed} past {target}");
        assert!(
            zeroed == len || zeroed + RUNWAY / 2 >= target,
            "{zeroed} short of {target}"
        );
        assert!(
            contents(&file) == model,
            "the file differs from what was written"
        );
        // The runway's blocks are allocated: data, not a hole, up to `zeroed`.
        assert_eq!(data(&file, model.len() as u64).unwrap(), [(0, zeroed)]);
        assert!(file.metadata().unwrap().blocks() * 512 >= zeroed);
    }

    /// Writes aimed at the chunk being zeroed (redb catching up with the
    /// runway) wait for it: none of them is zeroed over.
    #[test]
    fn a_write_into_the_chunk_being_zeroed_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let len = 256u64 << 20;
        let file = file_with(&dir, 4096, len);
        let mut model = vec![7u8; 4096];
        model.resize(len as usize, 0);
        let runway = Runway::start(&file).unwrap();
        let mut write = |at: u64, byte: u8| {
            runway.before_write(at, 4096);
            file.write_all_at(&[byte; 4096], at).unwrap();
            model[at as usize..at as usize + 4096].fill(byte);
        };
        for round in 0..150u64 {
            let (zeroed, _) = runway.zeroed_and_frontier();
            if zeroed + CHUNK + 4096 > len {
                break;
            }
            let byte = (round % 250) as u8 + 1;
            // A new page at the prefix's end: the runway is short, and the
            // thread starts on the chunk above it ...
            write(zeroed - 4096, byte);
            let started = std::time::Instant::now();
            while !runway.zeroing() && started.elapsed() < std::time::Duration::from_secs(5) {
                std::hint::spin_loop();
            }
            // ... into which the next new page goes.
            write(zeroed + CHUNK / 2 + round * 4099 % (CHUNK / 2 - 4096), byte);
        }
        runway.settle();
        assert!(
            contents(&file) == model,
            "the file differs from what was written"
        );
    }

    /// A write far above the prefix (redb writes a grown file's last
    /// pages) is stepped over: the runway stays ahead of where new pages
    /// go, the far bytes stay, and the prefix takes them in once it
    /// reaches them.
    #[test]
    fn a_far_write_is_stepped_over() {
        let dir = tempfile::tempdir().unwrap();
        let len = 64u64 << 20;
        let file = file_with(&dir, 4096, len);
        let runway = Runway::start(&file).unwrap();
        let far = len - (1 << 20);
        runway.before_write(far, 8192);
        file.write_all_at(&[9u8; 8192], far).unwrap();
        runway.settle();
        assert_eq!(runway.zeroed_and_frontier(), (4096 + RUNWAY, 4096));
        assert_eq!(
            data(&file, len).unwrap(),
            [(0, 4096 + RUNWAY), (far, far + 8192)]
        );
        // New pages climb to the far write: the runway zeroes up to it,
        // over nothing of it, and goes on past it.
        let mut at = 4096;
        while at < far {
            runway.before_write(at, 4096);
            file.write_all_at(&[5u8; 4096], at).unwrap();
            at += 4096 * 61;
        }
        runway.settle();
        assert_eq!(runway.zeroed_and_frontier(), (len, at - 4096 * 61 + 4096));
        let bytes = contents(&file);
        assert!(
            bytes[far as usize..far as usize + 8192]
                .iter()
                .all(|&b| b == 9)
        );
        assert_eq!(data(&file, len).unwrap(), [(0, len)]);
    }

    /// A shrink stops the runway at the new length; the file never grows
    /// past what redb set.
    #[test]
    fn a_shrink_bounds_the_runway() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(&dir, 4096, 32 << 20);
        let runway = Runway::start(&file).unwrap();
        runway.settle();
        assert_eq!(runway.zeroed_and_frontier(), (4096 + RUNWAY, 4096));
        runway.set_len(2 << 20, || file.set_len(2 << 20)).unwrap();
        runway.settle();
        assert_eq!(runway.zeroed_and_frontier(), (2 << 20, 4096));
        drop(runway);
        assert_eq!(file.metadata().unwrap().len(), 2 << 20);
        let mut expected = vec![7u8; 4096];
        expected.resize(2 << 20, 0);
        assert!(contents(&file) == expected);
    }

    /// A file opened with data starts its runway past its last data, whose
    /// bytes stay as they were.
    #[test]
    fn starts_past_the_data_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(&dir, 3 << 20, 6 << 20);
        assert_eq!(data_end(&file, 6 << 20), 3 << 20);
        let runway = Runway::start(&file).unwrap();
        runway.settle();
        assert_eq!(runway.zeroed_and_frontier(), (6 << 20, 3 << 20));
        let mut expected = vec![7u8; 3 << 20];
        expected.resize(6 << 20, 0);
        assert!(contents(&file) == expected);
        assert_eq!(data(&file, 6 << 20).unwrap(), [(0, 6 << 20)]);
    }
}
