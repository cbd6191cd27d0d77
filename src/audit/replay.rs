//! Projections rebuilt from the log as of a seq.

use crate::domain::{Job, Snapshot, World};
use crate::store::{Result, Store, decode_envelope};
use serde::Serialize;
use std::collections::BTreeMap;
use uuid::Uuid;

/// `{"as_of_seq":N,"jobs":[VIEW…],"snapshots":{JOB_ID:[…]}}`.
#[derive(Debug, Serialize)]
pub struct ReplayView {
    pub as_of_seq: u64,
    pub jobs: Vec<Job>,
    /// Per job, the retained snapshots in time order.
    pub snapshots: BTreeMap<Uuid, Vec<Snapshot>>,
}

/// Fold the log up to and including `until_seq` (all of it when None).
pub fn replay(store: &Store, until_seq: Option<u64>, job: Option<Uuid>) -> Result<ReplayView> {
    let mut world = World::default();
    let mut as_of_seq = 0;
    store.for_each_event(|seq, bytes| {
        if until_seq.is_some_and(|u| seq > u) {
            return Ok(false);
        }
        world.evolve(&decode_envelope(seq, bytes)?);
        as_of_seq = seq;
        Ok(true)
    })?;
    let mut catalogs = world.catalogs;
    let jobs: Vec<Job> = world
        .jobs
        .into_values()
        .filter(|j| job.is_none_or(|id| j.job_id == id))
        .collect();
    let snapshots = jobs
        .iter()
        .map(|j| {
            (
                j.job_id,
                catalogs
                    .remove(&j.job_id)
                    .map(|c| c.snapshots)
                    .unwrap_or_default(),
            )
        })
        .collect();
    Ok(ReplayView {
        as_of_seq,
        jobs,
        snapshots,
    })
}
