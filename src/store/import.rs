//! Building a new store from a verified log (JSON Lines or the JetStream
//! stream): events, per-job index, projections and idempotency records, in
//! one transaction, into a fresh file that only replaces the target once
//! complete. Nothing is written for a log that fails verification. Also
//! [`Store::truncate_to`]: the same rebuild, in place, of a prefix of the
//! store's own log (a group-mode node dropping a tail never acknowledged),
//! read from the store as it is written, never held whole.

use super::rows::{JobState, job_rows as job_rows_of};
use super::tables::*;
use super::{CommandRecord, Result, Store, StoreError};
use crate::domain::command::Fingerprint;
use crate::domain::{Envelope, Reply, World};
use redb::{ReadableTable, ReadableTableMetadata};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use uuid::Uuid;

/// Write `log` (already verified, in seq order, with each event's stored
/// bytes) and its fold `world` as a new store at `path`. Refuses a path that
/// holds a non-empty store.
pub fn write_new_store(path: &Path, log: &[(Envelope, Vec<u8>)], world: &World) -> Result<()> {
    // A symlink's target is written (beside it, then renamed over it), not
    // the link replaced by a file.
    let target = link_target(path);
    let path = target.as_deref().unwrap_or(path);
    check_target(path)?;
    let tmp = write_beside(path, log, world)?;
    put_in_place(tmp, path)
}

/// The file [`write_new_store`] is writing: what [`remove_partial`]
/// removes. It stays named after the file is renamed into place or removed
/// (its name was random and is gone then, so removing it does nothing).
static WRITING: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Remove the file an import is writing, if one is (its process is being
/// stopped by a signal, which skips the temp file's own removal): no
/// hidden partial store is left beside the target.
pub fn remove_partial() {
    let writing = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = writing.as_ref() {
        let _ = std::fs::remove_file(path);
    }
}

/// The store of `log` in a file of its own in `path`'s directory (so the
/// rename stays on one file system), never one that exists already (the
/// log being imported, say); removed when dropped, on any error.
fn write_beside(
    path: &Path,
    log: &[(Envelope, Vec<u8>)],
    world: &World,
) -> Result<tempfile::NamedTempFile> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path
        .file_name()
        .map_or("bcp".into(), |n| n.to_string_lossy());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".importing")
        // As `bcp serve` makes a store: what the umask allows (tempfile's
        // own 0600 would keep an auditor's account out).
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir.unwrap_or(Path::new(".")))
        .map_err(|e| {
            let what = format!("a new file beside {}: {e}", path.display());
            StoreError::Redb(redb::Error::Io(std::io::Error::new(e.kind(), what)))
        })?;
    *WRITING.lock().unwrap_or_else(|e| e.into_inner()) = Some(tmp.path().to_path_buf());
    let store = Store::open_or_create(tmp.path())?;
    {
        let mut txn = store.writable()?.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        write_log(&txn, log, world)?;
        txn.commit()?;
    }
    drop(store);
    Ok(tmp)
}

/// Rename the written store to `path`. Checked again, as late as can be:
/// another import (or a bcp serve) may have put a log there while this one
/// was written. A path that held nothing is taken only if it still does.
fn put_in_place(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    let tmp_path = tmp.path().to_owned();
    let persisted = match refuse_a_log_at(path)? {
        true => tmp.persist(path),
        false => tmp.persist_noclobber(path),
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            return StoreError::Exists {
                path: path.display().to_string(),
            };
        }
        StoreError::Corrupt(format!(
            "rename {} to {}: {}",
            tmp_path.display(),
            path.display(),
            e.error
        ))
    })?;
    Ok(())
}

/// Where `path` points when it is a symbolic link (followed to the end).
fn link_target(path: &Path) -> Option<std::path::PathBuf> {
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        if !std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return (at != path).then_some(at);
        }
        let next = std::fs::read_link(&at).ok()?;
        at = match at.parent() {
            Some(dir) if next.is_relative() => dir.join(next),
            _ => next,
        };
    }
    None
}

/// What [`write_new_store`] checks of `path` first, for an import to call
/// before it reads its input: a path that holds a log, or a directory, is
/// refused at once, not after the whole log was verified.
pub fn check_target(path: &Path) -> Result<()> {
    super::not_a_directory(path)?;
    refuse_a_log_at(path).map(|_| ())
}

/// Refuses a path that holds a non-empty store; whether it holds a file
/// (an empty one, e.g. from mktemp, or a store with no events, which an
/// import replaces).
fn refuse_a_log_at(path: &Path) -> Result<bool> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(false);
    };
    if meta.len() > 0 {
        // Read-only: a store this refuses is left exactly as it was (an
        // open for writing would run redb's recovery or grow the file).
        let existing = Store::open_read_only(path, 1 << 20)?;
        if existing.event_count()? > 0 {
            return Err(StoreError::Exists {
                path: path.display().to_string(),
            });
        }
    }
    Ok(true)
}

/// Write `log` (verified, in seq order from 1, with each event's stored
/// bytes) and its fold `world` into `txn`'s empty tables: the events, each
/// job's event index, the projections and the idempotency records rebuilt
/// from the log (fingerprint [`Fingerprint::of_logged`]).
fn write_log(
    txn: &redb::WriteTransaction,
    log: &[(Envelope, Vec<u8>)],
    world: &World,
) -> Result<()> {
    let mut events = txn.open_table(EVENTS)?;
    let mut records = RecordsFromLog::new(txn)?;
    let mut seqs = JobSeqs::default();
    for (env, bytes) in log {
        events.insert(env.seq, bytes.as_slice())?;
        seqs.add(env);
        records.push(Cow::Borrowed(env))?;
    }
    records.finish()?;
    write_rows(txn, world, &seqs, log.last().map_or(0, |(env, _)| env.seq))?;
    debug_assert_eq!(events.len()?, log.len() as u64);
    Ok(())
}

/// Each job's seqs in a log read in seq order (every event about it,
/// rejections included): what its event index rows hold.
#[derive(Default)]
struct JobSeqs(BTreeMap<Uuid, Vec<u64>>);

impl JobSeqs {
    fn add(&mut self, env: &Envelope) {
        if let Some(job) = env.job_id {
            self.0.entry(job).or_default().push(env.seq);
        }
    }
}

/// The idempotency records of a log read in seq order, written to
/// `COMMANDS` as it is read: a command's events are consecutive in every
/// log bcp writes (it appends them together), so each record is written
/// once the next command's first event is read, and only one command's
/// events are held at a time.
struct RecordsFromLog<'t, 'e> {
    table: redb::Table<'t, u128, &'static [u8]>,
    command: Vec<Cow<'e, Envelope>>,
}

impl<'t, 'e> RecordsFromLog<'t, 'e> {
    fn new(txn: &'t redb::WriteTransaction) -> Result<Self> {
        Ok(RecordsFromLog {
            table: txn.open_table(COMMANDS)?,
            command: Vec::new(),
        })
    }

    fn push(&mut self, env: Cow<'e, Envelope>) -> Result<()> {
        if self
            .command
            .last()
            .is_some_and(|e| e.command_id != env.command_id)
        {
            self.write()?;
        }
        self.command.push(env);
        Ok(())
    }

    /// Write the last command's record.
    fn finish(mut self) -> Result<()> {
        self.write()
    }

    fn write(&mut self) -> Result<()> {
        let events: Vec<&Envelope> = self.command.iter().map(|e| e.as_ref()).collect();
        let Some(first) = events.first() else {
            return Ok(());
        };
        let rec = CommandRecord {
            fingerprint: Fingerprint::of_logged(first),
            reply: Reply::from_events(&events),
        };
        let row = super::rows::record_row(&rec);
        if self
            .table
            .insert(first.command_id.as_u128(), row.as_slice())?
            .is_some()
        {
            return Err(StoreError::Corrupt(format!(
                "command {}'s events are not consecutive in the log (again at seq {}): it was decided twice",
                first.command_id, first.seq
            )));
        }
        self.command.clear();
        Ok(())
    }
}

/// Write the projections of `world` (every job's rows, with its event index
/// from `seqs`, and the regions) into `txn`'s empty `JOB_ROWS` and
/// `REGIONS`, and record that they are current at `head`.
fn write_rows(
    txn: &redb::WriteTransaction,
    world: &World,
    seqs: &JobSeqs,
    head: u64,
) -> Result<()> {
    let mut job_rows = txn.open_table(JOB_ROWS)?;
    let ids: BTreeSet<Uuid> = (world.jobs.keys())
        .chain(world.catalogs.keys())
        .chain(seqs.0.keys())
        .copied()
        .collect();
    for id in ids {
        let after = JobState {
            job: world.jobs.get(&id),
            catalog: world.catalogs.get(&id),
        };
        let new_seqs = seqs.0.get(&id).map_or(&[][..], Vec::as_slice);
        let layout = super::rows::Layout::Combined; // a store opened for writing
        for (key, row) in job_rows_of(id, JobState::default(), after, new_seqs, layout) {
            let row = row.expect("rows from nothing only add");
            job_rows.insert(key, row.as_slice())?;
        }
    }
    let mut regions = txn.open_table(REGIONS)?;
    for (name, r) in &world.regions {
        regions.insert(
            name.as_str(),
            serde_json::to_vec(r).expect("region serializes").as_slice(),
        )?;
    }
    // Every row written: current at the head.
    txn.open_table(CHECKPOINT)?.insert(ROWS_AT, head)?;
    Ok(())
}

impl Store {
    /// Cut the log back to its first `keep` events, in place and in one
    /// durable transaction: every later event is removed, and every
    /// projection row and idempotency record is replaced by a rebuild of
    /// that prefix. Group mode only, for a tail the stream never
    /// acknowledged (so no reply covered it); see `service::group`.
    ///
    /// The prefix is read once, in seq order, and never held: memory is
    /// the fold (as a serving node holds it), each job's seqs and one
    /// command's events, not the log.
    pub fn truncate_to(&self, keep: u64) -> Result<()> {
        let _one = self.inner.one_writer();
        let mut txn = self.writable()?.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        txn.delete_table(COMMANDS)?;
        txn.delete_table(RECENT)?;
        txn.open_table(CHECKPOINT)?.remove(SWEEP_TO)?;
        txn.delete_table(JOB_ROWS)?;
        txn.delete_table(REGIONS)?;
        let mut world = World::default();
        let mut seqs = JobSeqs::default();
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut records = RecordsFromLog::new(&txn)?;
            let mut read = 0u64;
            for r in events.range(1..=keep)? {
                let (k, v) = r?;
                let env = super::decode_envelope(k.value(), v.value())?;
                read += 1;
                if env.seq != read {
                    return Err(StoreError::Corrupt(format!(
                        "cannot keep {keep} events: seq {read} is not where the log holds it"
                    )));
                }
                world.evolve(&env);
                seqs.add(&env);
                records.push(Cow::Owned(env))?;
            }
            if read != keep {
                return Err(StoreError::Corrupt(format!(
                    "cannot keep {keep} events: the log holds {read}"
                )));
            }
            records.finish()?;
            events.retain_in(keep + 1.., |_, _| false)?;
        }
        write_rows(&txn, &world, &seqs, keep)?;
        // The rows held behind belong to the table being replaced: readers
        // wait for the rebuilt one.
        self.rows_rebuilt(keep, || txn.commit().map_err(StoreError::from))?;
        // Every record is in `COMMANDS` now.
        self.load_recent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::command::decode;
    use crate::store::ledger::Pending;
    use crate::store::pipeline::Pipeline;

    /// The tests that write stores beside a target, one at a time: the
    /// file being written is one per process ([`remove_partial`]).
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A log of one create of job `n`, and its fold.
    fn log_of(dir: &Path, n: u128) -> (Vec<(Envelope, Vec<u8>)>, World) {
        let path = dir.join(format!("source-{n}.redb"));
        let mut p = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
        let body = serde_json::json!({"command_id": Uuid::from_u128(n), "job_id": Uuid::from_u128(n), "deployment": {"kind": "replica_set", "name": "rs0"}});
        let cmd = decode("p1", "create", body.to_string().as_bytes(), None).unwrap();
        let mut ids = || Uuid::from_u128(n);
        p.execute(&[Pending::new(cmd)], chrono::Utc::now(), &mut ids)
            .unwrap();
        let world = p.world().clone();
        let log = p
            .store()
            .raw_events(1, 1)
            .unwrap()
            .into_iter()
            .map(|(_, bytes)| (Envelope::from_json(&bytes).unwrap(), bytes))
            .collect();
        (log, world)
    }

    /// While a store is written beside its target, [`remove_partial`] (what
    /// a signal runs) removes it; once it is in place, nothing.
    #[test]
    fn remove_partial_removes_the_store_being_written_only() {
        let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (a, world) = log_of(dir.path(), 1);
        let target = dir.path().join("target.redb");
        let tmp = write_beside(&target, &a, &world).unwrap();
        let partial = tmp.path().to_owned();
        assert!(partial.exists());
        remove_partial();
        assert!(!partial.exists(), "the partial store is removed");
        drop(tmp);
        write_new_store(&target, &a, &world).unwrap();
        remove_partial();
        assert!(target.exists(), "a store in place is never removed");
    }

    /// An import into a symbolic link writes the store where it points
    /// (also through a relative link), and the link stays a link.
    #[test]
    fn an_import_into_a_symlink_writes_its_target() {
        let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (a, world) = log_of(dir.path(), 1);
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let link = dir.path().join("bcp.redb");
        std::os::unix::fs::symlink("data/real.redb", &link).unwrap();
        write_new_store(&link, &a, &world).unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let real = Store::open_read_only(&dir.path().join("data/real.redb"), 1 << 20).unwrap();
        assert_eq!(real.head_seq().unwrap(), 1);
    }

    /// Two imports into one path at once: the one that finishes second
    /// finds the other's log there and is refused; the first one's stands.
    /// Also when the path held an empty file both took for theirs.
    #[test]
    fn an_import_that_finds_a_log_put_there_meanwhile_is_refused() {
        let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (a, world_a) = log_of(dir.path(), 1);
        let (b, world_b) = log_of(dir.path(), 2);
        for empty_file in [false, true] {
            let target = dir.path().join(format!("target-{empty_file}.redb"));
            if empty_file {
                std::fs::write(&target, b"").unwrap();
            }
            refuse_a_log_at(&target).unwrap();
            let slow = write_beside(&target, &a, &world_a).unwrap();
            write_new_store(&target, &b, &world_b).unwrap();
            let refused = put_in_place(slow, &target);
            assert!(
                matches!(refused, Err(StoreError::Exists { .. })),
                "{refused:?}"
            );
            let kept = Store::open_read_only(&target, 1 << 20).unwrap();
            let first = kept.raw_events(1, 1).unwrap();
            assert_eq!(first[0].1, b[0].1, "the first import's log stands");
            let leftovers: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".importing"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }
    }
}
