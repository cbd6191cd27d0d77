//! Reading the whole log on every core, folding it in order; and checking
//! a sorted key space on every core, in key ranges ([`by_key_ranges`]).
//!
//! What replay and verify do per event splits in two: a pure part that needs
//! only the event's bytes (parsing; for verify, also the canonical-bytes and
//! hash check, since each envelope carries its own `prev_hash`), and the fold
//! (seq, link and version checks, `evolve`) that needs every event before
//! it. [`scan`] runs the first on worker threads and the second on the
//! calling thread, in seq order, with bounded memory: one thread reads the
//! log into batches and deals them out round robin; each worker sends its
//! results back on its own channel, so the fold takes them back in the
//! order they were dealt, with no reordering and no unbounded buffering.

use crate::store::{Store, StoreError};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};

/// Events per batch handed to a worker.
const BATCH: usize = 1024;
/// Batches queued per worker, each way.
const QUEUE: usize = 2;

/// Events as stored, packed: `keys[i]` and `bytes[ends[i - 1]..ends[i]]`.
#[derive(Default)]
struct Batch {
    keys: Vec<u64>,
    ends: Vec<usize>,
    bytes: Vec<u8>,
}

impl Batch {
    fn with_capacity(bytes: usize) -> Batch {
        Batch {
            keys: Vec::with_capacity(BATCH),
            ends: Vec::with_capacity(BATCH),
            bytes: Vec::with_capacity(bytes),
        }
    }

    fn push(&mut self, key: u64, bytes: &[u8]) {
        self.keys.push(key);
        self.bytes.extend_from_slice(bytes);
        self.ends.push(self.bytes.len());
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.ends.clear();
        self.bytes.clear();
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        self.keys
            .iter()
            .zip(starts.zip(&self.ends))
            .map(|(&k, (s, &e))| (k, &self.bytes[s..e]))
    }
}

/// Worker threads for a scan: one per core the process may use.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
}

/// Visit every event of `store` in seq order: `work(seq, bytes)` on `workers`
/// threads, then `fold(seq, &mut result)` here, in order, until it returns
/// `Ok(false)` or an error, or the log ends. Events after the one where the
/// fold stopped may have been worked on, but are never folded. A storage
/// error while reading is returned once the fold has seen every event read
/// before it, unless the fold stopped first.
pub fn scan<T: Send, E: From<StoreError>>(
    store: &Store,
    workers: usize,
    work: impl Fn(u64, &[u8]) -> T + Sync,
    mut fold: impl FnMut(u64, &mut T) -> Result<bool, E>,
) -> Result<(), E> {
    if workers <= 1 {
        let mut failed = None;
        store.for_each_event(|seq, bytes| match fold(seq, &mut work(seq, bytes)) {
            Ok(go_on) => Ok(go_on),
            Err(e) => {
                failed = Some(e);
                Ok(false)
            }
        })?;
        return failed.map_or(Ok(()), Err);
    }
    let work = &work;
    std::thread::scope(|s| {
        let mut to_workers: Vec<SyncSender<Batch>> = Vec::new();
        let mut from_workers: Vec<Receiver<Vec<(u64, T)>>> = Vec::new();
        // Emptied batches go back to the reader, and folded results to their
        // worker, to be filled again: the results are dropped on the thread
        // that allocated them, and no buffer of hundreds of KiB is freed and
        // allocated per batch (both cost more in glibc's malloc, in
        // consolidation and contention, than the work itself).
        let (spare_batches, spares) = channel::<Batch>();
        let mut to_refill: Vec<Sender<Vec<(u64, T)>>> = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = sync_channel::<Batch>(QUEUE);
            let (done_tx, done_rx) = sync_channel(QUEUE);
            let (refill_tx, refill_rx) = channel::<Vec<(u64, T)>>();
            let spare_batches = spare_batches.clone();
            s.spawn(move || {
                for mut batch in rx {
                    let mut out = refill_rx.try_recv().unwrap_or_default();
                    out.clear();
                    out.extend(batch.iter().map(|(k, b)| (k, work(k, b))));
                    batch.clear();
                    let _ = spare_batches.send(batch);
                    if done_tx.send(out).is_err() {
                        break;
                    }
                }
            });
            to_workers.push(tx);
            from_workers.push(done_rx);
            to_refill.push(refill_tx);
        }
        drop(spare_batches);
        let reader = s.spawn(move || {
            let mut dealt = 0usize;
            let mut batch = Batch::default();
            let read = store.for_each_event(|key, bytes| {
                if batch.bytes.capacity() == 0 {
                    batch = Batch::with_capacity(bytes.len() * BATCH * 9 / 8);
                }
                batch.push(key, bytes);
                if batch.len() < BATCH {
                    return Ok(true);
                }
                let full = std::mem::replace(&mut batch, spares.try_recv().unwrap_or_default());
                dealt += 1;
                // A closed channel: the fold stopped.
                Ok(to_workers[(dealt - 1) % to_workers.len()]
                    .send(full)
                    .is_ok())
            });
            // Also after a read error: the fold sees every event read before it.
            if batch.len() > 0 {
                let _ = to_workers[dealt % to_workers.len()].send(batch);
            }
            read
        });
        let mut folded = Ok(());
        'batches: for i in 0.. {
            // Batches are dealt round robin, so when the worker due next has
            // nothing more, the log has been read to its end.
            let Ok(mut results) = from_workers[i % workers].recv() else {
                break;
            };
            for (seq, result) in results.iter_mut() {
                match fold(*seq, result) {
                    Ok(true) => {}
                    Ok(false) => break 'batches,
                    Err(e) => {
                        folded = Err(e);
                        break 'batches;
                    }
                }
            }
            let _ = to_refill[i % workers].send(results);
        }
        // Unblocks the workers and, through them, the reader.
        drop(from_workers);
        let read = reader.join().expect("log reader panicked");
        folded?;
        read.map_err(E::from)
    })
}

/// `check(items, keys)` on a thread of its own for each of up to `parts`
/// key ranges that together cover every u128 key: the ranges split `sorted`
/// (in key order by `key`) into about equal parts, the first from 0 and the
/// last to the end, and each gets the items whose keys it holds. Results in
/// key order, so the first error found is the one at the lowest key.
pub fn by_key_ranges<I: Sync, T: Send>(
    sorted: &[I],
    key: impl Fn(&I) -> u128 + Sync,
    parts: usize,
    check: impl Fn(&[I], std::ops::RangeInclusive<u128>) -> T + Sync,
) -> Vec<T> {
    let per_part = sorted.len().div_ceil(parts.max(1)).max(1);
    let mut starts: Vec<u128> = sorted.chunks(per_part).map(|c| key(&c[0])).collect();
    starts.dedup();
    match starts.first_mut() {
        Some(first) => *first = 0,
        None => starts.push(0), // still: no stored key may be left over
    }
    let (key, check) = (&key, &check);
    std::thread::scope(|s| {
        let checks: Vec<_> = starts
            .iter()
            .enumerate()
            .map(|(i, &lo)| {
                let hi = starts.get(i + 1).map_or(u128::MAX, |next| next - 1);
                let from = sorted.partition_point(|x| key(x) < lo);
                let to = sorted.partition_point(|x| key(x) <= hi);
                s.spawn(move || check(&sorted[from..to], lo..=hi))
            })
            .collect();
        checks
            .into_iter()
            .map(|c| c.join().expect("key range check panicked"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tables::EVENTS;

    /// A store whose events are the bytes of their own seq, with one gap.
    fn store_with(n: u64, gap: u64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("s.redb")).unwrap();
        let txn = store.writable().unwrap().begin_write().unwrap();
        {
            let mut t = txn.open_table(EVENTS).unwrap();
            for seq in (1..=n).filter(|&s| s != gap) {
                t.insert(seq, seq.to_string().as_bytes()).unwrap();
            }
        }
        txn.commit().unwrap();
        (dir, store)
    }

    #[test]
    fn folds_in_order_stops_where_told_and_reports_the_first_error() {
        let n = 5 * BATCH as u64 + 123;
        let (_dir, store) = store_with(n, 4000);
        for workers in [1, 2, 3] {
            let work = |seq: u64, b: &[u8]| (seq, std::str::from_utf8(b).unwrap().parse::<u64>());
            let mut seen = Vec::new();
            scan::<_, StoreError>(&store, workers, work, |seq, (s, v)| {
                assert_eq!((seq, *s), (seq, *v.as_ref().unwrap()));
                seen.push(seq);
                Ok(true)
            })
            .unwrap();
            let all: Vec<u64> = (1..=n).filter(|&s| s != 4000).collect();
            assert_eq!(seen, all, "{workers} workers");

            let mut seen = 0;
            scan::<_, StoreError>(&store, workers, work, |seq, _| {
                seen = seq;
                Ok(seq < 2500)
            })
            .unwrap();
            assert_eq!(seen, 2500, "{workers} workers");

            let mut last = 0;
            let err = scan(&store, workers, work, |seq, _| {
                if seq > 1500 && seq % 700 == 0 {
                    return Err(StoreError::Corrupt(format!("at {seq}")));
                }
                last = seq;
                Ok(true)
            })
            .unwrap_err();
            assert_eq!(err.to_string(), "corrupt store: at 2100");
            assert_eq!(last, 2099);
        }
    }

    #[test]
    fn batches_give_back_what_was_pushed() {
        let mut b = Batch::with_capacity(4);
        b.push(1, b"a");
        b.push(2, b"");
        b.push(3, b"ccc");
        let got: Vec<(u64, &[u8])> = b.iter().collect();
        assert_eq!(got, vec![(1, &b"a"[..]), (2, &b""[..]), (3, &b"ccc"[..])]);
    }
}
