//! `bcp audit verify`: the log is gapless from seq 1, every hash links to the
//! one before, every stored envelope is byte-for-byte its canonical form,
//! per-job versions count up by one, and the stored projections equal a full
//! rebuild. Reports the first bad seq.

use super::logfile::{Digest, check_digest};
use super::scan::{self, scan};
use crate::domain::envelope::GENESIS_HASH;
use crate::domain::{Envelope, Job, Region, World};
use crate::store::rows;
use crate::store::tables::{JOB_ROWS, JobRow, REGIONS};
use crate::store::{Store, StoreError};
use redb::{ReadableTable, ReadableTableMetadata};
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
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VerifyError {
    pub fn seq(&self) -> Option<u64> {
        match self {
            VerifyError::BadEvent { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// What [`check_event`] finds in an event's bytes alone: it parses, and
/// what [`Envelope::check_stored`] says of them. Independent of every other
/// event, so [`verify`] computes it on worker threads.
pub struct Parsed(Result<(Envelope, Result<(), &'static str>), String>);

impl Parsed {
    pub fn of(bytes: &[u8]) -> Parsed {
        Parsed(match Envelope::from_json(bytes) {
            Ok(mut env) => {
                let stored = env.check_stored(bytes);
                Ok((env, stored))
            }
            Err(e) => Err(format!("does not parse: {e}")),
        })
    }
}

/// Checks one envelope after `prev_hash`, against the fold so far.
pub fn check_event(
    expected_seq: u64,
    bytes: &[u8],
    prev_hash: &str,
    world: &World,
) -> Result<Envelope, VerifyError> {
    let parsed = Parsed::of(bytes);
    check_parsed(expected_seq, &parsed, prev_hash, world)?;
    match parsed.0 {
        Ok((env, _)) => Ok(env),
        Err(_) => unreachable!("check_parsed passed an event that does not parse"),
    }
}

/// [`check_event`] given what the event's bytes alone say: the checks
/// happen, and the first failing one is named, in the same order.
pub fn check_parsed<'p>(
    expected_seq: u64,
    parsed: &'p Parsed,
    prev_hash: &str,
    world: &World,
) -> Result<&'p Envelope, VerifyError> {
    let bad = |what: String| VerifyError::BadEvent {
        seq: expected_seq,
        what,
    };
    let (env, stored) = parsed.0.as_ref().map_err(|e| bad(e.clone()))?;
    if env.seq != expected_seq {
        return Err(bad(format!(
            "envelope says seq {} (gap or reorder)",
            env.seq
        )));
    }
    if env.prev_hash != prev_hash {
        return Err(bad("prev_hash does not match the previous event's hash (an event before it was removed, reordered or edited)".into()));
    }
    stored.map_err(|what| bad(what.to_owned()))?;
    if let (Some(job), Some(v)) = (env.job_id, env.job_version) {
        let current = world.jobs.get(&job).map_or(0, |j| j.version);
        if v != current + 1 {
            return Err(bad(format!(
                "job {job} version {v} follows version {current}"
            )));
        }
    }
    Ok(env)
}

/// Verify a store; with a digest, also that the log still holds exactly the
/// prefix it names. `progress` sees the count of events checked.
///
/// Parsing and the canonical-bytes and hash check of each event run on
/// every core ([`scan`]); the seq, link and version checks and the fold run
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
    scan(
        store,
        scan::workers(),
        |_, bytes| Parsed::of(bytes),
        |key, parsed| {
            seq += 1;
            if key != seq {
                return Err(VerifyError::BadEvent {
                    seq,
                    what: format!("missing; the next stored seq is {key}"),
                });
            }
            let env = check_parsed(seq, parsed, &prev_hash, &world)?;
            world.evolve(env);
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
    progress(seq);
    if let Some(d) = digest {
        check_digest(d, seq, |_| digest_hash.clone())?;
    }
    if !projections_match(store, &world, scan::workers())? {
        let stored = store.load_world()?;
        if stored != world {
            return Err(VerifyError::Projection(describe_difference(
                &stored, &world,
            )));
        }
    }
    Ok(Report {
        events: seq,
        head_seq: seq,
        head_hash: prev_hash,
        elapsed: started.elapsed(),
    })
}

/// How often [`verify`] reports progress, in events.
const PROGRESS_EVERY: u64 = 4096;

/// Whether the stored job rows (views, catalog class rows, snapshot rows;
/// the event index aside) are byte for byte what the writer would store for
/// `world`, under the same keys (a class row of the layout before runs by
/// what it holds), and the stored regions equal `world`'s.
/// True means `store.load_world()` equals `world` (serialization
/// round-trips these types exactly), without parsing 100 k job rows; false
/// means only that the caller must compare the slow way (a row written by
/// another version of bcp may differ in bytes and still be equal).
fn projections_match(store: &Store, world: &World, parts: usize) -> Result<bool, StoreError> {
    if world.catalogs.keys().any(|id| !world.jobs.contains_key(id)) {
        return Ok(false);
    }
    let txn = store.begin_read()?;
    let regions = txn.open_table(REGIONS)?;
    if regions.len()? != world.regions.len() as u64 {
        return Ok(false);
    }
    // Serializing the expected rows is most of the work: the jobs are split
    // into `parts` key ranges (one per core), each compared on its own thread.
    let jobs: Vec<(&Uuid, &Job)> = world.jobs.iter().collect();
    let per_part = jobs.len().div_ceil(parts.max(1)).max(1);
    let mut parts: Vec<&[(&Uuid, &Job)]> = jobs.chunks(per_part).collect();
    if parts.is_empty() {
        parts.push(&[]); // still: no stored rows may be left over
    }
    // Part i holds every key from its first job to the next part's first
    // job, the first part from 0 and the last to the end: together all keys.
    let starts: Vec<u128> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| if i == 0 { 0 } else { part[0].0.as_u128() })
        .collect();
    let txn = &txn;
    let matched = std::thread::scope(|s| {
        let checks: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let last = starts
                    .get(i + 1)
                    .map_or((u128::MAX, u8::MAX, u128::MAX), |next| {
                        (next - 1, u8::MAX, u128::MAX)
                    });
                let keys = (starts[i], 0, 0)..=last;
                s.spawn(move || job_rows_match(txn, world, part, keys))
            })
            .collect();
        checks
            .into_iter()
            .map(|c| c.join().expect("projection check thread panicked"))
            .collect::<Result<Vec<bool>, StoreError>>()
    })?;
    if matched.contains(&false) {
        return Ok(false);
    }
    let mut stored = std::collections::BTreeMap::new();
    for r in regions.iter()? {
        let (_, v) = r?;
        match serde_json::from_slice::<Region>(v.value()) {
            Ok(region) => stored.insert(region.region.clone(), region),
            Err(_) => return Ok(false),
        };
    }
    Ok(stored == world.regions)
}

/// [`projections_match`] for the stored rows with keys in `keys`, which
/// must be exactly those of `jobs` (the event index aside).
fn job_rows_match(
    txn: &redb::ReadTransaction,
    world: &World,
    jobs: &[(&Uuid, &Job)],
    keys: std::ops::RangeInclusive<rows::JobKey>,
) -> Result<bool, StoreError> {
    // The rows the writer stores for these jobs, in key order.
    let expected = jobs.iter().flat_map(|(id, job)| {
        let view = (JobRow::Job.key(id.as_u128(), 0), rows::job_row(job));
        let mut catalog = world
            .catalogs
            .get(id)
            .map(|c| rows::catalog_rows(**id, None, Some(c)))
            .unwrap_or_default();
        catalog.sort_unstable_by_key(|(k, _)| *k);
        std::iter::once(view).chain(
            catalog
                .into_iter()
                .map(|(k, v)| (k, v.expect("a new catalog only adds rows"))),
        )
    });
    let mut expected = expected.fuse();
    for r in txn.open_table(JOB_ROWS)?.range(keys)? {
        let (k, v) = r?;
        let key = k.value();
        if key.1 == JobRow::Event as u8 {
            continue;
        }
        match expected.next() {
            Some((want_key, want)) if want_key == key && want.as_slice() == v.value() => {}
            // A class row of the layout before runs: equal if it holds the same.
            Some((want_key, _))
                if want_key == key
                    && key.1 == JobRow::Classes as u8
                    && world
                        .catalogs
                        .get(&Uuid::from_u128(key.0))
                        .is_some_and(|c| rows::classes_match(v.value(), c)) => {}
            _ => return Ok(false),
        }
    }
    Ok(expected.next().is_none())
}

fn describe_difference(stored: &World, rebuilt: &World) -> String {
    for (id, job) in &rebuilt.jobs {
        match stored.jobs.get(id) {
            None => return format!("job {id} is missing from the stored projection"),
            Some(s) if s != job => return format!("job {id}: stored {s:?}, rebuilt {job:?}"),
            _ => {}
        }
    }
    if let Some(id) = stored.jobs.keys().find(|id| !rebuilt.jobs.contains_key(id)) {
        return format!("stored job {id} has no events in the log");
    }
    "regions differ".to_owned()
}

#[cfg(test)]
mod tests {
    use super::{JOB_ROWS, JobRow, projections_match, rows};
    use crate::domain::command::decode;
    use crate::store::Store;
    use crate::store::ledger::{Ledger, Pending};
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;

    #[test]
    fn the_fast_projection_check_matches_what_the_writer_stored_and_only_that() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
        let mut ledger = Ledger::open(store.clone()).unwrap();
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
            ledger
                .execute(&[Pending::new(cmd)], t0, &mut ids, None)
                .unwrap();
        }
        let mut world = ledger.world().clone();
        assert_eq!(world.catalogs[&job].snapshots.len(), 1);
        assert!(projections_match(&store, &world, 2).unwrap());
        // A class row in the layout before runs is compared by what it holds.
        let write_classes = |row: &str| {
            let txn = store.writable().unwrap().begin_write().unwrap();
            txn.open_table(JOB_ROWS)
                .unwrap()
                .insert(JobRow::Classes.key(job.as_u128(), 0), row.as_bytes())
                .unwrap();
            txn.commit().unwrap();
        };
        write_classes(
            r#"{"daily_days":["2026-11-01"],"weekly_weeks":[[2026,44]],"monthly_months":[[2026,11]]}"#,
        );
        assert!(projections_match(&store, &world, 2).unwrap());
        write_classes(
            r#"{"daily_days":["2026-11-02"],"weekly_weeks":[[2026,44]],"monthly_months":[[2026,11]]}"#,
        );
        assert!(!projections_match(&store, &world, 2).unwrap());
        write_classes(&String::from_utf8(rows::classes_row(&world.catalogs[&job])).unwrap());
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
        ledger
            .execute(&[Pending::new(cmd)], t0, &mut ids, None)
            .unwrap();
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
        world.catalogs.get_mut(&job).unwrap().snapshots[0].size_bytes = 2;
        assert!(!projections_match(&store, &world, 2).unwrap());
        world.catalogs.remove(&job);
        assert!(!projections_match(&store, &world, 2).unwrap());
    }
}
