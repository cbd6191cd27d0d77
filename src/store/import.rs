//! Building a new store from a verified log (JSON Lines or the JetStream
//! stream): events, per-job index, projections and idempotency records, in
//! one transaction, into a fresh file that only replaces the target once
//! complete. Nothing is written for a log that fails verification.

use super::tables::*;
use super::{CommandRecord, Result, Store, StoreError};
use crate::domain::reply::EventRef;
use crate::domain::{Envelope, ErrorCode, Event, Reply, World};
use redb::ReadableTableMetadata;
use std::collections::BTreeMap;
use std::path::Path;
use uuid::Uuid;

/// Fingerprint of an idempotency record rebuilt from the log, where the
/// original body is not known: a retry with this `command_id` gets the
/// original reply whatever its body.
pub const ANY_BODY: &str = "*";

/// The reply a command got, as far as the log tells: its events, or its
/// recorded rejection.
fn reply_from_events(events: &[&Envelope]) -> Reply {
    if let Some(env) = events
        .iter()
        .find(|e| matches!(e.event, Event::CommandRejected { .. }))
    {
        let Event::CommandRejected {
            code,
            reason,
            current_version,
            ..
        } = &env.event
        else {
            unreachable!()
        };
        let mut reply = Reply::error(ErrorCode::from(*code), reason.clone());
        reply.job_id = env.job_id;
        reply.rejection_seq = Some(env.seq);
        if let Some(e) = reply.error.as_mut() {
            e.current_version = *current_version;
        }
        return reply;
    }
    let first_job = events.first().and_then(|e| e.job_id);
    let one_job = first_job.filter(|j| events.iter().all(|e| e.job_id == Some(*j)));
    let version = one_job.and_then(|_| events.iter().rev().find_map(|e| e.job_version));
    let refs = events
        .iter()
        .map(|e| EventRef {
            seq: e.seq,
            event_type: e.event.type_name().to_owned(),
        })
        .collect();
    Reply::accepted(one_job, version, refs)
}

/// Write `log` (already verified, in seq order, with each event's stored
/// bytes) and its fold `world` as a new store at `path`. Refuses a path that
/// holds a non-empty store.
pub fn write_new_store(path: &Path, log: &[(Envelope, Vec<u8>)], world: &World) -> Result<()> {
    if path.exists() {
        let existing = Store::open_existing(path)?;
        if existing.event_count()? > 0 {
            return Err(StoreError::Corrupt(format!(
                "{} already holds a log; import only into a new store",
                path.display()
            )));
        }
    }
    let tmp = path.with_extension("importing");
    let _ = std::fs::remove_file(&tmp);
    let store = Store::open_or_create(&tmp)?;
    {
        let mut txn = store.writable()?.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut job_rows = txn.open_table(JOB_ROWS)?;
            let mut by_command: BTreeMap<Uuid, Vec<&Envelope>> = BTreeMap::new();
            for (env, bytes) in log {
                events.insert(env.seq, bytes.as_slice())?;
                if let Some(j) = env.job_id {
                    job_rows.insert(
                        JobRow::Event.key(j.as_u128(), u128::from(env.seq)),
                        [].as_slice(),
                    )?;
                }
                by_command.entry(env.command_id).or_default().push(env);
            }
            let mut commands = txn.open_table(COMMANDS)?;
            for (id, evs) in by_command {
                let rec = CommandRecord {
                    fingerprint: ANY_BODY.to_owned(),
                    reply: reply_from_events(&evs),
                };
                commands.insert(
                    id.as_u128(),
                    serde_json::to_vec(&rec)
                        .expect("record serializes")
                        .as_slice(),
                )?;
            }
            for (id, job) in &world.jobs {
                job_rows.insert(
                    JobRow::Job.key(id.as_u128(), 0),
                    super::rows::job_row(job).as_slice(),
                )?;
            }
            for (id, c) in &world.catalogs {
                for (key, row) in super::rows::catalog_rows(*id, None, Some(c)) {
                    let row = row.expect("a new catalog only adds rows");
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
            debug_assert_eq!(events.len()?, log.len() as u64);
        }
        txn.commit()?;
    }
    drop(store);
    std::fs::rename(&tmp, path).map_err(|e| {
        StoreError::Corrupt(format!(
            "rename {} to {}: {e}",
            tmp.display(),
            path.display()
        ))
    })?;
    Ok(())
}
