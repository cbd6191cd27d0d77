//! Heap bytes of bcp's in-memory state, measured exactly: the benchmark's
//! own allocator counts live bytes, and [`world_bytes`] loads a stopped
//! store's projections (what `bcp serve` holds in memory, the `World`) the
//! way the server does. That splits `bcp serve`'s RSS into state that grows
//! with jobs and redb's page cache, which grows with the file read and
//! written (up to redb's default 1 GiB cache).

use std::alloc::{GlobalAlloc, Layout};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};

/// The allocator `bcp serve` runs with (mimalloc, `src/main.rs`), counting
/// live bytes: what phase 1 times in-process is bcp's write path as it
/// runs, not as glibc's malloc would run it.
pub struct Counting;

static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// What the projections of a store take on the heap.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct WorldBytes {
    pub jobs: u64,
    /// Heap held by the loaded `World` (jobs, catalogs, regions) alone.
    pub world_bytes: u64,
    /// Heap held right after loading, redb's page cache and the open
    /// database included.
    pub with_redb_bytes: u64,
}

/// Load the stored projections of `db` (`bcp serve` must be stopped) and
/// count the heap they hold, with and without the open database.
pub fn world_bytes(db: &Path) -> anyhow::Result<WorldBytes> {
    let before = live();
    let store = bcp::store::Store::open_existing(db)?;
    let world = store.load_world()?;
    let with_redb = live() - before;
    drop(store);
    let alone = live() - before;
    let jobs = world.jobs.len() as u64;
    drop(world);
    Ok(WorldBytes {
        jobs,
        world_bytes: alone.max(0) as u64,
        with_redb_bytes: with_redb.max(0) as u64,
    })
}
