//! The state `decide` reads: every job and every configured region. `evolve`
//! for the whole system is [`World::evolve`]; it delegates per-job events to
//! [`Job::evolve`].

use super::envelope::Envelope;
use super::event::Event;
use super::ids::Name;
use super::job::Job;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// A deployment region and its three stores. Fully configured when all three
/// are set; a region never configured is a region with no stores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub region: Name,
    pub snapshot_store: Option<Name>,
    pub oplog_store: Option<Name>,
    pub sync_store: Option<Name>,
}

impl Region {
    pub fn fully_configured(&self) -> bool {
        self.snapshot_store.is_some() && self.oplog_store.is_some() && self.sync_store.is_some()
    }

    /// The stores that are missing, for messages.
    pub fn missing_stores(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if self.snapshot_store.is_none() {
            m.push("snapshot_store");
        }
        if self.oplog_store.is_none() {
            m.push("oplog_store");
        }
        if self.sync_store.is_none() {
            m.push("sync_store");
        }
        m
    }
}

/// Every job and region, as of some seq.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct World {
    pub jobs: BTreeMap<Uuid, Job>,
    pub regions: BTreeMap<Name, Region>,
}

impl World {
    /// The region by name; an unknown name is a region with no stores.
    pub fn region(&self, name: &Name) -> Region {
        self.regions.get(name).cloned().unwrap_or_else(|| Region {
            region: name.clone(),
            snapshot_store: None,
            oplog_store: None,
            sync_store: None,
        })
    }

    /// Whether a job with this region may be Active: no region (no regional
    /// backup), or a fully configured one.
    pub fn region_ready(&self, region: Option<&Name>) -> bool {
        region.is_none_or(|r| self.regions.get(r).is_some_and(Region::fully_configured))
    }

    /// Apply one committed event.
    pub fn evolve(&mut self, env: &Envelope) {
        match &env.event {
            Event::RegionConfigured {
                region,
                snapshot_store,
                oplog_store,
                sync_store,
            } => {
                self.regions.insert(
                    region.clone(),
                    Region {
                        region: region.clone(),
                        snapshot_store: snapshot_store.clone(),
                        oplog_store: oplog_store.clone(),
                        sync_store: sync_store.clone(),
                    },
                );
            }
            Event::CommandRejected { .. } => {}
            _ => {
                let Some(id) = env.job_id else { return };
                let mut slot = self.jobs.remove(&id);
                Job::evolve(&mut slot, env);
                if let Some(job) = slot {
                    self.jobs.insert(id, job);
                }
            }
        }
    }

    /// Fold a whole log from scratch.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> World {
        let mut w = World::default();
        for e in events {
            w.evolve(e);
        }
        w
    }
}
