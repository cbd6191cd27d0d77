//! Projections rebuilt from the log as of a point (a seq, a time, or both),
//! optionally for one job or project: the same pure fold as the server.

use super::scan::{self, scan};
use crate::domain::{Envelope, Job, ProjectId, Snapshot, World};
use crate::store::{Result, Store, StoreError, decode_envelope};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Where replay stops: after the last event with seq <= `until_seq` and
/// `recorded_at` <= `until` (the log's times never go backwards).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cut {
    pub until_seq: Option<u64>,
    pub until: Option<DateTime<Utc>>,
}

impl Cut {
    pub fn includes(&self, env: &Envelope) -> bool {
        self.until_seq.is_none_or(|s| env.seq <= s)
            && self.until.is_none_or(|t| env.recorded_at <= t)
    }
}

/// Which jobs to show.
#[derive(Clone, Debug, Default)]
pub struct Select {
    pub job: Option<Uuid>,
    pub project: Option<ProjectId>,
}

/// `{"as_of_seq":N,"jobs":[VIEW…],"snapshots":{JOB_ID:[…]}}`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ReplayView {
    pub as_of_seq: u64,
    pub jobs: Vec<Job>,
    /// Per job, the retained snapshots in time order.
    pub snapshots: BTreeMap<Uuid, Vec<Snapshot>>,
}

/// Fold a log from its start up to `cut`.
#[derive(Default)]
pub struct Replayer {
    world: World,
    as_of_seq: u64,
    done: bool,
}

impl Replayer {
    /// Feed the next event; returns false once past the cut.
    pub fn feed(&mut self, env: &Envelope, cut: &Cut) -> bool {
        if self.done || !cut.includes(env) {
            self.done = true;
            return false;
        }
        self.world.evolve(env);
        self.as_of_seq = env.seq;
        true
    }

    pub fn view(self, select: &Select) -> ReplayView {
        let mut catalogs = self.world.catalogs;
        let jobs: Vec<Job> = self
            .world
            .jobs
            .into_values()
            .filter(|j| select.job.is_none_or(|id| j.job_id == id))
            .filter(|j| select.project.as_ref().is_none_or(|p| *p == j.project_id))
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
        ReplayView {
            as_of_seq: self.as_of_seq,
            jobs,
            snapshots,
        }
    }
}

/// Replay a store: events are parsed on every core ([`scan`]) and folded in
/// seq order here.
pub fn replay(store: &Store, cut: Cut, select: &Select) -> Result<ReplayView> {
    let mut r = Replayer::default();
    scan::<_, StoreError>(
        store,
        scan::workers(),
        decode_envelope,
        |_, env| match env {
            Ok(env) => Ok(r.feed(env, &cut)),
            Err(e) => Err(std::mem::replace(e, StoreError::Corrupt(String::new()))),
        },
    )?;
    Ok(r.view(select))
}
