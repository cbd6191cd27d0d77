//! `bcp audit verify`: the log is gapless from seq 1, every hash links to the
//! one before, every stored envelope is byte-for-byte its canonical form,
//! per-job versions count up by one, every stored row of the projections
//! is, under its key, what the writer would store for a full rebuild, each
//! job's event index holds exactly the seqs of its events (in rows that
//! decode and do not overlap), and the idempotency records agree with the
//! log ([`super::records`]). The per-event checks are [`super::chain`]'s.
//! Reports the first bad seq, or the first row or record that differs.

use super::chain::{AcrossEvents, Digest, Parsed, check_digest, check_key, check_parsed};
use super::records::CommandLog;
use super::scan::{self, scan};
use crate::domain::envelope::GENESIS_HASH;
use crate::domain::{Snapshot, World};
use crate::store::behind::{Merged, RowRef};
use crate::store::rows;
use crate::store::tables::{JobRow, REGIONS};
use crate::store::{Store, StoreError};
use redb::ReadableTable;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug)]
pub struct Report {
    pub events: u64,
    pub head_seq: u64,
    pub head_hash: String,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("seq {seq}: {what}")]
    BadEvent { seq: u64, what: String },
    #[error("projection differs from a rebuild of the log: {0}")]
    Projection(String),
    #[error("idempotency records differ from the log: {0}")]
    Records(String),
    /// redb's own check of the file's pages failed ([`crate::store::disk::check_pages`]).
    #[error("the store's file is damaged: {0}")]
    Pages(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream to compare with was reached but could not be read
    /// whole (missing, trimmed, a message gone): no seq to name.
    #[error("cannot read the stream: {0}")]
    Stream(String),
    /// The stream to compare with could not be reached: nothing is known
    /// of the log.
    #[error("{0}")]
    Unreachable(String),
}

impl VerifyError {
    pub fn seq(&self) -> Option<u64> {
        match self {
            VerifyError::BadEvent { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// Verify a store; with a digest, also that the log still holds exactly the
/// prefix it names. `progress` sees the count of events checked.
///
/// Parsing and the canonical-bytes and hash check of each event run on
/// every core ([`scan`](fn@scan)); the seq, link and version checks and the fold run
/// in seq order here, and the first bad seq is the one reported.
pub fn verify(
    store: &Store,
    digest: Option<&Digest>,
    mut progress: impl FnMut(u64),
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let mut digest_hash = None;
    let mut world = World::default();
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut seq = 0u64;
    // What the index and record checks need of each event. Sized once:
    // growing a vector of a million entries costs copies and page faults on
    // the fold's thread.
    let events = usize::try_from(store.event_count()?).unwrap_or(0);
    let mut commands = CommandLog::with_capacity(events);
    let mut ends = AcrossEvents::with_capacity(events);
    scan::<_, VerifyError>(
        store,
        scan::workers(),
        |_, bytes| Parsed::of(bytes),
        |key, parsed| {
            seq += 1;
            check_key(seq, key)?;
            let env = check_parsed(seq, parsed, &prev_hash, &world)?;
            ends.next(env, &world)?;
            world.evolve_unindexed(env);
            commands.add(env);
            if digest.is_some_and(|d| d.seq == seq) {
                digest_hash = Some(env.hash.clone());
            }
            // Copied, not moved: the envelope is freed by the worker thread
            // that allocated it.
            prev_hash.clear();
            prev_hash.push_str(&env.hash);
            if seq.is_multiple_of(PROGRESS_EVERY) {
                progress(seq);
            }
            Ok(true)
        },
    )?;
    ends.end(&world)?;
    progress(seq);
    if let Some(d) = digest {
        check_digest(d, seq, |_| digest_hash.clone())?;
    }
    let index = commands.job_index();
    // Independent of each other: both at once, each on every core.
    let (rows, records) = std::thread::scope(|s| {
        let records = s.spawn(|| commands.check(store, scan::workers()));
        let rows = projections_differ(store, &world, &index, scan::workers());
        (rows, records.join().expect("record check panicked"))
    });
    if let Some(difference) = rows? {
        return Err(VerifyError::Projection(difference));
    }
    records?;
    Ok(Report {
        events: seq,
        head_seq: seq,
        head_hash: prev_hash,
        elapsed: started.elapsed(),
    })
}

/// How often [`verify`] reports progress, in events.
const PROGRESS_EVERY: u64 = 4096;

/// The first stored projection row that is not what the writer would store
/// for `world` and the event index `index` ((job, seq), sorted), or `None`.
///
/// Every row of JOB_ROWS is compared under its key, byte for byte: a job's
/// view, class row and snapshot rows, or its combined row (view and
/// catalog in one: `rows::Layout`, as the store's mark says). A class row of the layout before
/// runs is compared by what it holds. A job's event index is compared seq
/// by seq (every event about the job, rejections included): how its seqs
/// are split into rows depends on when the writer wrote them, but each row
/// must be keyed by its first seq and the rows must not overlap. Regions
/// likewise, keyed by name. A row where none is expected, or under another
/// key, is a difference: queries read rows by key.
fn projections_differ(
    store: &Store,
    world: &World,
    index: &[(u128, u64)],
    parts: usize,
) -> Result<Option<String>, StoreError> {
    // The committed rows: the table, and any held behind it (a store
    // serving; one closed cleanly has none).
    let view = store.job_rows(..)?;
    // Every job id with a row: a view, a catalog, or an event about it
    // (the index is sorted by job: one id per run of it, not per event).
    let mut ids: Vec<u128> = world
        .jobs
        .keys()
        .chain(world.catalogs.keys())
        .map(|id| id.as_u128())
        .chain(index.chunk_by(|a, b| a.0 == b.0).map(|run| run[0].0))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // Serializing the expected rows is most of the work: the ids are split
    // into `parts` key ranges (one per core), each compared on its own thread.
    let differences = scan::by_key_ranges(
        &ids,
        |id| *id,
        parts,
        |jobs, range| {
            let (lo, hi) = (*range.start(), *range.end());
            let from = index.partition_point(|(job, _)| *job < lo);
            let to = index.partition_point(|(job, _)| *job <= hi);
            let keys = (lo, 0, 0)..=(hi, u8::MAX, u128::MAX);
            job_rows_differ(&view, world, jobs, &index[from..to], keys)
        },
    );
    let differences = differences
        .into_iter()
        .collect::<Result<Vec<Option<String>>, StoreError>>()?;
    if let Some(d) = differences.into_iter().flatten().next() {
        return Ok(Some(d));
    }
    let mut expected = world.regions.iter();
    for r in view.txn().open_table(REGIONS)?.iter()? {
        let (k, v) = r?;
        let name = k.value();
        match expected.next() {
            Some((want, region))
                if want.as_str() == name
                    && serde_json::to_vec(region).expect("region serializes") == v.value() => {}
            Some((want, _)) if want.as_str() == name => {
                return Ok(Some(format!(
                    "region {name}: the stored row differs from a rebuild"
                )));
            }
            Some((want, _)) if want.as_str() < name => {
                return Ok(Some(format!("region {want} is missing")));
            }
            _ => {
                return Ok(Some(format!(
                    "a stored row of region {name:?}, which the log never configured"
                )));
            }
        }
    }
    Ok(expected
        .next()
        .map(|(want, _)| format!("region {want} is missing")))
}

const KINDS: [(JobRow, &str); 4] = [
    (JobRow::Job, "view"),
    (JobRow::Classes, "catalog class"),
    (JobRow::Snapshot, "snapshot"),
    (JobRow::Event, "event index"),
];

/// A JOB_ROWS key, for a message.
fn describe(key: rows::JobKey) -> String {
    let (job, kind, sub) = key;
    let job = Uuid::from_u128(job);
    match KINDS.iter().find(|(k, _)| *k as u8 == kind) {
        Some((JobRow::Job | JobRow::Classes, name)) => format!("job {job}'s {name} row"),
        Some((JobRow::Snapshot, name)) => {
            format!("job {job}'s {name} row for {}", Uuid::from_u128(sub))
        }
        Some((_, name)) => format!("job {job}'s {name} row for seq {sub}"),
        None => format!("job {job}'s row of unknown kind {kind} (sub {sub})"),
    }
}

/// [`projections_differ`] for the stored rows with keys in `keys`, which
/// must be exactly those of the jobs `ids` (sorted) with their events
/// `index`.
fn job_rows_differ(
    view: &crate::store::behind::JobRowsView,
    world: &World,
    ids: &[u128],
    index: &[(u128, u64)],
    keys: std::ops::RangeInclusive<rows::JobKey>,
) -> Result<Option<String>, StoreError> {
    // The rows the writer stores for these jobs, in key order: the layout
    // the write path and import use, from nothing, but the event index as
    // one entry per seq (an index row's key with an empty value) and the
    // snapshots as one entry each (keyed by its id), however rows hold them.
    let mut events = index.iter().peekable();
    let layout = crate::store::behind::row_layout(view.txn())?;
    let expected = ids.iter().flat_map(|&id| {
        let uuid = Uuid::from_u128(id);
        let all = rows::JobState {
            job: world.jobs.get(&uuid),
            catalog: world.catalogs.get(&uuid),
        };
        let seqs = std::iter::from_fn(|| events.next_if(|(job, _)| *job == id).map(|e| e.1));
        let index: Vec<_> = seqs
            .map(|seq| (JobRow::Event.key(id, u128::from(seq)), Vec::new()))
            .collect();
        // A combined row holds its snapshots: compared with it, byte for byte.
        let snapshots = match rows::is_combined(layout, all) {
            true => Vec::new(),
            false => snapshot_entries(id, all.catalog.map_or(vec![], |c| c.snapshots.clone())),
        };
        rows::job_rows(uuid, rows::JobState::default(), all, &[], layout)
            .into_iter()
            .filter(|(k, _)| k.1 != JobRow::Snapshot as u8)
            .map(|(k, v)| (k, v.expect("rows from nothing only add")))
            .chain(snapshots)
            .chain(index)
    });
    let mut expected = expected.peekable();
    let chunked = crate::store::behind::snapshot_rows_chunked(view.txn())?;
    let mut stored = IndexEntries::new(view.rows()?.range(keys)?, chunked);
    while let Some(r) = stored.next() {
        let (key, v) = match r? {
            Ok(row) => row,
            Err(why) => return Ok(Some(why)),
        };
        let Some((want_key, want)) = expected.next_if(|(want_key, _)| *want_key <= key) else {
            return Ok(Some(format!(
                "{} is stored, but a rebuild of the log has no such row",
                describe(key)
            )));
        };
        if want_key < key {
            return Ok(Some(format!("{} is missing", describe(want_key))));
        }
        let v = v.as_ref().map_or(&[][..], RowRef::value);
        let same = want.as_slice() == v
            // A row of an earlier layout (JSON; class rows listing every
            // period): equal if it holds the same. (Snapshots are compared
            // re-encoded, one entry each: `snapshot_entries`.)
            || key.1 == JobRow::Job as u8 && rows::same_job(&want, v)
            || key.1 == JobRow::Classes as u8
                && world
                    .catalogs
                    .get(&Uuid::from_u128(key.0))
                    .is_some_and(|c| rows::classes_match(v, c));
        if !same {
            return Ok(Some(format!(
                "{} differs: stored {}, rebuilt {}",
                describe(key),
                rows::show(key.1, v),
                rows::show(key.1, &want)
            )));
        }
    }
    Ok(expected
        .next()
        .map(|(want_key, _)| format!("{} is missing", describe(want_key))))
}

/// A stored row: its key and value (the value of an index entry: none).
type Stored<'v> = (rows::JobKey, Option<RowRef<'v>>);

/// One entry per snapshot of job `job`, keyed by its id, in key order:
/// what verify compares of a catalog's snapshot rows, however many each
/// holds (a store written before rows held several keeps one each).
fn snapshot_entries(job: u128, mut snapshots: Vec<Snapshot>) -> Vec<(rows::JobKey, Vec<u8>)> {
    snapshots.sort_by_key(|s| s.snapshot_id);
    (snapshots.iter())
        .map(|s| {
            (
                JobRow::Snapshot.key(job, s.snapshot_id.as_u128()),
                rows::snapshot_row(s),
            )
        })
        .collect()
}

/// Stored job rows with each event index row taken apart into one entry
/// per seq (its key the row's, with that seq), in key order; an index row
/// that does not decode, or that overlaps the row before it, is a
/// difference (`Ok(Err(why))`).
struct IndexEntries<'v> {
    rows: std::iter::Peekable<Merged<'v>>,
    /// Seqs of the index row being taken apart, next first.
    seqs: std::vec::IntoIter<u64>,
    /// The snapshots of the job's snapshot rows, one entry each
    /// ([`snapshot_entries`]), next first.
    snapshots: std::vec::IntoIter<(rows::JobKey, Vec<u8>)>,
    /// Whether the store's snapshot rows are several a row
    /// ([`rows::layout_fault`]).
    chunked: bool,
    /// The job of that row, and the last index key given out.
    last: Option<rows::JobKey>,
}

impl<'v> IndexEntries<'v> {
    fn new(rows: Merged<'v>, chunked: bool) -> Self {
        IndexEntries {
            chunked,
            rows: rows.peekable(),
            seqs: Vec::new().into_iter(),
            snapshots: Vec::new().into_iter(),
            last: None,
        }
    }

    fn next(&mut self) -> Option<Result<Result<Stored<'v>, String>, StoreError>> {
        if let (Some(seq), Some(last)) = (self.seqs.next(), self.last) {
            let key = JobRow::Event.key(last.0, u128::from(seq));
            self.last = Some(key);
            return Some(Ok(Ok((key, None))));
        }
        if let Some((key, snapshot)) = self.snapshots.next() {
            return Some(Ok(Ok((key, Some(RowRef::Owned(snapshot))))));
        }
        let (key, row) = match self.rows.next()? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        if key.1 == JobRow::Snapshot as u8 {
            return self.snapshots_of(key, row);
        }
        if key.1 != JobRow::Event as u8 {
            return Some(Ok(Ok((key, Some(row)))));
        }
        let seqs = match rows::read_index(key.2, row.value()) {
            Ok(seqs) => seqs,
            Err(e) => return Some(Ok(Err(format!("{} does not decode: {e}", describe(key))))),
        };
        if let Some(last) = self.last.filter(|last| last.0 == key.0 && *last >= key) {
            return Some(Ok(Err(format!(
                "{} overlaps the row before it (which reaches seq {})",
                describe(key),
                last.2
            ))));
        }
        self.seqs = seqs.into_iter();
        self.seqs.next(); // the row's own key
        self.last = Some(key);
        Some(Ok(Ok((key, None))))
    }

    /// The first entry of the snapshots of the job's snapshot rows, the
    /// first of which is `row` at `key` (the rest are read now).
    fn snapshots_of(
        &mut self,
        key: rows::JobKey,
        row: RowRef<'v>,
    ) -> Option<Result<Result<Stored<'v>, String>, StoreError>> {
        let mut stored = Vec::new();
        let (mut key, mut row) = (key, row);
        loop {
            match rows::read_snapshots(row.value()) {
                Ok(s) => stored.push((key.2, s)),
                Err(e) => return Some(Ok(Err(format!("{} does not decode: {e}", describe(key))))),
            }
            let job = key.0;
            match self.rows.next_if(|r| {
                r.as_ref()
                    .is_ok_and(|(k, _)| k.0 == job && k.1 == JobRow::Snapshot as u8)
            }) {
                Some(next) => (key, row) = next.expect("only rows read match"),
                None => break,
            }
        }
        if let Some(why) = rows::layout_fault(&stored, self.chunked) {
            return Some(Ok(Err(format!("job {}: {why}", Uuid::from_u128(key.0)))));
        }
        let snapshots = stored.into_iter().flat_map(|(_, s)| s).collect();
        self.snapshots = snapshot_entries(key.0, snapshots).into_iter();
        let (key, snapshot) = self.snapshots.next()?;
        Some(Ok(Ok((key, Some(RowRef::Owned(snapshot))))))
    }
}

#[cfg(test)]
mod tests {
    use super::rows;
    use crate::domain::command::decode;
    use crate::store::Store;
    use crate::store::ledger::Pending;
    use crate::store::pipeline::Pipeline;
    use crate::store::tables::{JOB_ROWS, JobRow};
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;

    /// [`super::projections_differ`] with the event index of `store`'s log.
    fn projections_match(
        store: &Store,
        world: &crate::domain::World,
        parts: usize,
    ) -> Result<bool, crate::store::StoreError> {
        let mut index = Vec::new();
        store.for_each_event(|seq, bytes| {
            if let Some(job) = crate::store::decode_envelope(seq, bytes)?.job_id {
                index.push((job.as_u128(), seq));
            }
            Ok(true)
        })?;
        index.sort_unstable();
        Ok(super::projections_differ(store, world, &index, parts)?.is_none())
    }

    #[test]
    fn the_fast_projection_check_matches_what_the_writer_stored_and_only_that() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 8, 0, 0).unwrap();
        let job = Uuid::from_u128(7);
        let bodies = [
            (
                "create",
                serde_json::json!({"deployment": {"kind": "replica_set", "name": "rs"}}),
            ),
            ("start", serde_json::json!({})),
            (
                "record-snapshot",
                serde_json::json!({"snapshot_id": Uuid::from_u128(9), "taken_at": t0, "size_bytes": 1}),
            ),
            ("start", serde_json::json!({})), // rejected: stored as an event row only
        ];
        let mut next = 0u128;
        for (n, (verb, mut body)) in bodies.into_iter().enumerate() {
            body["command_id"] = serde_json::json!(Uuid::from_u128(100 + n as u128));
            body["job_id"] = serde_json::json!(job);
            let cmd = decode("p1", verb, body.to_string().as_bytes(), None).unwrap();
            let mut ids = || {
                next += 1;
                Uuid::from_u128(next)
            };
            ledger.execute(&[Pending::new(cmd)], t0, &mut ids).unwrap();
        }
        let mut world = ledger.world().clone();
        assert_eq!(world.catalogs[&job].snapshots.len(), 1);
        assert!(projections_match(&store, &world, 2).unwrap());
        // The rows held behind the table are written first: below, rows
        // are edited in the table.
        store.checkpoint().unwrap();
        assert!(projections_match(&store, &world, 2).unwrap());
        let edit = |rows: &[(rows::JobKey, Option<Vec<u8>>)]| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                for (key, row) in rows {
                    match row {
                        Some(row) => t.insert(*key, row.as_slice()).unwrap(),
                        None => t.remove(*key).unwrap(),
                    };
                }
            }
            txn.commit().unwrap();
        };
        let mark = |key: &str, on: bool| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            {
                let mut t = txn.open_table(crate::store::tables::CHECKPOINT).unwrap();
                match on {
                    true => t.insert(key, 1).unwrap(),
                    false => t.remove(key).unwrap(),
                };
            }
            txn.commit().unwrap();
        };
        // A job of a small catalog is one combined row: compared byte for
        // byte, so a change to its catalog, its catalog gone (a view alone
        // in its place) or a catalog row beside it is a difference.
        let (view_key, classes_key) = (
            JobRow::Job.key(job.as_u128(), 0),
            JobRow::Classes.key(job.as_u128(), 0),
        );
        let (job_now, catalog) = (&world.jobs[&job], &world.catalogs[&job]);
        let combined = rows::combined_row(job_now, catalog);
        let stored = store.job_rows(..).unwrap();
        let stored_rows: Vec<_> = (stored.rows().unwrap().range(..).unwrap())
            .map(|r| r.unwrap().0)
            .filter(|k| k.0 == job.as_u128() && k.1 != JobRow::Event as u8)
            .collect();
        assert_eq!(stored_rows, [view_key], "one row of view and catalog");
        drop(stored);
        let mut bigger = catalog.clone();
        bigger.snapshots[0].size_bytes = 3;
        for (wrong, also) in [
            (rows::combined_row(job_now, &bigger), None),
            (rows::job_row(job_now), None),
            (combined.clone(), Some(rows::classes_row(catalog))),
        ] {
            edit(&[(view_key, Some(wrong)), (classes_key, also)]);
            assert!(!projections_match(&store, &world, 2).unwrap());
        }
        assert!(
            store.load_world().is_err(),
            "a catalog row beside a combined row"
        );
        // A combined row of more snapshots than bcp combines: the write
        // path would take the job's rows for rows apart and lose its
        // catalog, so opening the store refuses it.
        let mut many = catalog.clone();
        many.snapshots = (0..=rows::COMBINED_MAX as u128)
            .map(|i| crate::domain::Snapshot {
                snapshot_id: Uuid::from_u128(0x9000 + i),
                taken_at: t0 + chrono::Duration::minutes(i as i64),
                ..catalog.snapshots[0].clone()
            })
            .collect();
        edit(&[
            (view_key, Some(rows::combined_row(job_now, &many))),
            (classes_key, None),
        ]);
        assert!(!projections_match(&store, &world, 2).unwrap());
        let err = store.load_world().unwrap_err().to_string();
        assert!(
            err.contains("stored in one row, where bcp lays it out apart"),
            "{err}"
        );
        edit(&[(view_key, Some(combined)), (classes_key, None)]);
        assert!(projections_match(&store, &world, 2).unwrap());
        assert_eq!(store.load_world().unwrap().catalogs[&job], *catalog);
        // The same job's rows apart, as a store written before combined
        // rows holds them (no mark): compared row by row, below.
        edit(&[
            (view_key, Some(rows::job_row(job_now))),
            (classes_key, Some(rows::classes_row(catalog))),
        ]);
        edit(&rows::snapshot_rows(job.as_u128(), &catalog.snapshots).collect::<Vec<_>>());
        assert!(!projections_match(&store, &world, 2).unwrap());
        let err = store.load_world().unwrap_err().to_string();
        assert!(
            err.contains("stored apart, where bcp lays it out in one row"),
            "{err}"
        );
        mark(crate::store::tables::COMBINED_ROWS, false);
        assert!(projections_match(&store, &world, 2).unwrap());
        assert_eq!(store.load_world().unwrap().catalogs[&job], *catalog);
        // A class row in the layout before runs is compared by what it holds.
        let write_classes = |row: &[u8]| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            txn.open_table(JOB_ROWS)
                .unwrap()
                .insert(JobRow::Classes.key(job.as_u128(), 0), row)
                .unwrap();
            txn.commit().unwrap();
        };
        write_classes(
            br#"{"daily_days":["2026-11-01"],"weekly_weeks":[[2026,44]],"monthly_months":[[2026,11]]}"#,
        );
        assert!(projections_match(&store, &world, 2).unwrap());
        write_classes(
            br#"{"daily_days":["2026-11-02"],"weekly_weeks":[[2026,44]],"monthly_months":[[2026,11]]}"#,
        );
        assert!(!projections_match(&store, &world, 2).unwrap());
        write_classes(&rows::classes_row(&world.catalogs[&job]));
        assert!(projections_match(&store, &world, 2).unwrap());
        // Split into key ranges, a stored row of a job the fold does not
        // have is found wherever it falls: before, between or after them.
        let mut ids = || {
            next += 1;
            Uuid::from_u128(next)
        };
        let other = Uuid::from_u128(20);
        let body = serde_json::json!({"command_id": Uuid::from_u128(200), "job_id": other, "deployment": {"kind": "replica_set", "name": "rs2"}});
        let cmd = decode("p1", "create", body.to_string().as_bytes(), None).unwrap();
        ledger.execute(&[Pending::new(cmd)], t0, &mut ids).unwrap();
        let both = ledger.world().clone();
        for parts in 1..=3 {
            assert!(
                projections_match(&store, &both, parts).unwrap(),
                "{parts} parts"
            );
        }
        for stray in [5u128, 10, 30] {
            let key = JobRow::Job.key(stray, 0);
            let txn = store.writable().unwrap().begin_write().unwrap();
            txn.open_table(JOB_ROWS)
                .unwrap()
                .insert(key, &b"{}"[..])
                .unwrap();
            txn.commit().unwrap();
            for parts in 1..=3 {
                assert!(
                    !projections_match(&store, &both, parts).unwrap(),
                    "job {stray}, {parts} parts"
                );
            }
            let txn = store.writable().unwrap().begin_write().unwrap();
            txn.open_table(JOB_ROWS).unwrap().remove(key).unwrap();
            txn.commit().unwrap();
        }
        world = both;
        assert!(projections_match(&store, &world, 2).unwrap());
        // Snapshot rows are compared snapshot by snapshot, however rows
        // hold them: a row per snapshot (the layout before rows held
        // several) matches; a copy in a second row, a changed one or a row
        // of none does not.
        let snapshot = world.catalogs[&job].snapshots[0].clone();
        let write_snapshots = |rows: &[(u128, Vec<u8>)]| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                t.retain_in(JobRow::Snapshot.range(job.as_u128()), |_, _| false)
                    .unwrap();
                for (sub, row) in rows {
                    t.insert(JobRow::Snapshot.key(job.as_u128(), *sub), row.as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        };
        let (own, sub) = (
            rows::snapshot_row(&snapshot),
            snapshot.snapshot_id.as_u128(),
        );
        let chunk = rows::snapshots_row(std::slice::from_ref(&snapshot));
        assert!(
            !rows::starts_row(snapshot.snapshot_id),
            "its row is the lead row"
        );
        // A row per snapshot, keyed by its id: the layout of a store
        // written before (no mark); in one of rows of several, a row where
        // the write path would never look, so never remove.
        write_snapshots(&[(sub, own.clone())]);
        assert!(!projections_match(&store, &world, 2).unwrap());
        let err = store.load_world().unwrap_err().to_string();
        assert!(err.contains("where bcp puts no row"), "{err}");
        mark(crate::store::tables::SNAPSHOT_ROWS, false);
        assert!(projections_match(&store, &world, 2).unwrap());
        assert!(store.load_world().is_ok());
        mark(crate::store::tables::SNAPSHOT_ROWS, true);
        // The right snapshots under another key.
        write_snapshots(&[(sub + 1, chunk.clone())]);
        assert!(!projections_match(&store, &world, 2).unwrap());
        write_snapshots(&[(0, chunk.clone()), (sub + 1, own.clone())]);
        assert!(!projections_match(&store, &world, 2).unwrap());
        let changed = crate::domain::Snapshot {
            size_bytes: 3,
            ..snapshot.clone()
        };
        write_snapshots(&[(0, rows::snapshots_row(&[changed]))]);
        assert!(!projections_match(&store, &world, 2).unwrap());
        write_snapshots(&[(0, chunk.clone()), (sub + 1, rows::snapshots_row(&[]))]);
        assert!(!projections_match(&store, &world, 2).unwrap());
        write_snapshots(&[(0, chunk)]);
        assert!(projections_match(&store, &world, 2).unwrap());
        world.catalogs.get_mut(&job).unwrap().snapshots[0].size_bytes = 2;
        assert!(!projections_match(&store, &world, 2).unwrap());
        world.catalogs.remove(&job);
        assert!(!projections_match(&store, &world, 2).unwrap());
    }
}
