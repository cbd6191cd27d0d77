//! The state `decide` reads: every job and every configured region. `evolve`
//! for the whole system is [`World::evolve`]; it delegates per-job events to
//! [`Job::evolve`].

use super::catalog::{Catalog, Snapshot, day_of};
use super::envelope::Envelope;
use super::event::Event;
use super::ids::Name;
use super::job::{Job, JobState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
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
    /// Per job that ever had a snapshot: its catalog.
    pub catalogs: BTreeMap<Uuid, Catalog>,
    /// Every retained snapshot that may expire (not do_not_delete), by
    /// (expires_at, job, snapshot): derived from `catalogs`, so the
    /// retention sweep reads what is due instead of every catalog. Kept by
    /// `evolve`; after changing `catalogs` directly, call
    /// [`World::reindex`] or [`World::set_catalog`].
    pub expiring: BTreeSet<(DateTime<Utc>, Uuid, Uuid)>,
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

    /// Why `job` would be Misconfigured if it had `region` and were running:
    /// its region lacks a store, or it is a shard/config server with no
    /// region in a cluster where another job has one. None: it may be Active.
    pub fn not_ready_reason(&self, job: &Job, region: Option<&Name>) -> Option<String> {
        if let Some(r) = region {
            let region = self.region(r);
            return (!region.fully_configured())
                .then(|| format!("region {r} lacks {}", region.missing_stores().join(", ")));
        }
        let cluster = job.deployment.cluster.as_ref()?;
        let regional = self.jobs.values().any(|o| {
            o.job_id != job.job_id
                && o.project_id == job.project_id
                && o.deployment.cluster.as_ref() == Some(cluster)
                && o.region.is_some()
        });
        regional
            .then(|| format!("cluster {cluster} uses regional backup but this job has no region"))
    }

    /// Apply one committed event.
    pub fn evolve(&mut self, env: &Envelope) {
        self.apply(env, true);
    }

    /// [`evolve`](World::evolve), leaving [`World::expiring`] as it was:
    /// for a fold that never asks what is due (replay, verify), only what
    /// the jobs, catalogs and regions are. Such a world must never decide
    /// (the sweep would find nothing due). Inserting every snapshot into
    /// the index and taking it out again was about a tenth of replay's CPU.
    pub fn evolve_unindexed(&mut self, env: &Envelope) {
        self.apply(env, false);
    }

    fn apply(&mut self, env: &Envelope, index: bool) {
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
                // Job::evolve, on the job in place (no remove and re-insert).
                let Some(id) = env.job_id else { return };
                let job = match Job::created(env) {
                    Some(created) => match self.jobs.entry(id) {
                        Entry::Vacant(v) => v.insert(created),
                        Entry::Occupied(o) => {
                            let job = o.into_mut();
                            *job = created;
                            job
                        }
                    },
                    None => {
                        let Some(job) = self.jobs.get_mut(&id) else {
                            return;
                        };
                        job.apply(env);
                        job
                    }
                };
                let expiring = index.then_some(&mut self.expiring);
                let changed = Self::evolve_catalog(&mut self.catalogs, expiring, job, env);
                assert_eq!(
                    changed.is_some(),
                    Self::changes_catalog(&env.event),
                    "changes_catalog names the events evolve_catalog applies"
                );
                if let Some(catalog) = changed {
                    job.snapshot_count = catalog.snapshots.len() as u64;
                    // The catalog is in time order: its last is its latest.
                    job.latest_snapshot_at = catalog.snapshots.last().map(|s| s.taken_at);
                }
            }
        }
    }

    /// `env`'s job version, if it has one, follows its job's here (by one:
    /// a job's versions count its changes from 1).
    pub fn version_follows(&self, env: &Envelope) -> Result<(), String> {
        if let (Some(job), Some(v)) = (env.job_id, env.job_version) {
            let current = self.jobs.get(&job).map_or(0, |j| j.version);
            if v != current + 1 {
                return Err(format!("job {job} version {v} follows version {current}"));
            }
        }
        Ok(())
    }

    /// Why `env` could not have been decided against this world (the log
    /// before it), or `Ok`: what an audit asks of every event beyond its
    /// hash. A hash chain shows the log was not edited after the fact; this
    /// shows each event is one the state machine allows where it stands: a
    /// job's events only for a job of that project that exists (a job
    /// version exactly on those that change it), a transition only from a
    /// state that has it, a job with a region Active exactly while the
    /// region has every store, a terminate's purge right after it, listing
    /// the catalog, a snapshot's events only for a snapshot its catalog
    /// holds (none expired or deleted while marked do_not_delete). It names
    /// the rules of the transition table, not what a decision computes
    /// (reasons, phases, classes, expiry times), which a later release may
    /// compute otherwise for the same log.
    pub fn admits(&self, env: &Envelope) -> Result<(), String> {
        use JobState::*;
        if env.job_version.is_some() != (env.job_id.is_some() && env.event.is_job_change()) {
            return Err("job_version must be set exactly on events that change a job".into());
        }
        let Some(id) = env.job_id else {
            return match &env.event {
                Event::RegionConfigured { .. } | Event::CommandRejected { .. } => Ok(()),
                other => Err(format!("a {} names no job", other.type_name())),
            };
        };
        if let Event::RegionConfigured { .. } = env.event {
            return Err(format!("a RegionConfigured names job {id}"));
        }
        let job = self.jobs.get(&id);
        if let Event::JobCreated { .. } = env.event {
            return match job {
                Some(_) => Err(format!("job {id} already exists")),
                None => Ok(()),
            };
        }
        let job = match (job, &env.event) {
            // A refusal may name a job that does not exist, or another
            // project's (not_found), in any state.
            (_, Event::CommandRejected { .. }) => return Ok(()),
            (None, _) => return Err(format!("no job {id}")),
            (Some(job), _) if job.project_id != env.project_id => {
                return Err(format!("job {id} is of project {}", job.project_id));
            }
            (Some(job), _) => job,
        };
        let state = job.state;
        let catalog = self.catalogs.get(&id);
        let snapshot = |snapshot_id: &Uuid| {
            let found = catalog.and_then(|c| c.get(*snapshot_id));
            found.ok_or_else(|| format!("job {id}'s catalog holds no snapshot {snapshot_id}"))
        };
        let from = |allowed: &[JobState]| {
            if allowed.contains(&state) {
                Ok(())
            } else {
                Err(format!("job {id} is {state}"))
            }
        };
        // A terminate's purge comes next, in the same command: nothing else
        // of the job's between them.
        let unpurged = catalog.is_some_and(|c| !c.snapshots.is_empty());
        if state == Inactive && unpurged && !matches!(env.event, Event::SnapshotsPurged { .. }) {
            return Err(format!(
                "job {id} was terminated and its snapshots not purged"
            ));
        }
        // A job with a region is Active exactly while its region has every
        // store (the region rule; a job without one also answers to the
        // cluster rule, which is not checked here).
        let ready = |to_active: bool| match &job.region {
            Some(r) if self.region_ready(Some(r)) != to_active => Err(format!(
                "region {r} is {}fully configured",
                if to_active { "not " } else { "" }
            )),
            _ => Ok(()),
        };
        match &env.event {
            Event::JobCreated { .. }
            | Event::RegionConfigured { .. }
            // Answered above, before the job's state is read.
            | Event::CommandRejected { .. } => Ok(()),
            Event::ScheduleChanged { .. } => Ok(()),
            Event::JobStarted { state: to, .. } => {
                from(&[Inactive, Stopped])?;
                match to {
                    Active | Misconfigured => ready(*to == Active),
                    other => Err(format!("a start cannot leave a job {other}")),
                }
            }
            Event::JobStopped {} => from(&[Active, Misconfigured]),
            Event::JobTerminated {} => from(&[Stopped]),
            Event::SnapshotsPurged { snapshot_ids } => {
                from(&[Inactive])?;
                let held: BTreeSet<Uuid> = (catalog.into_iter())
                    .flat_map(|c| c.snapshots.iter().map(|s| s.snapshot_id))
                    .collect();
                let listed: BTreeSet<Uuid> = snapshot_ids.iter().copied().collect();
                if held == listed {
                    Ok(())
                } else {
                    Err(format!(
                        "it lists {} snapshots, job {id}'s catalog holds {}",
                        listed.len(),
                        held.len()
                    ))
                }
            }
            Event::RegionAssigned { region } => {
                if *region == job.region {
                    return Err(format!("job {id} is in that region already"));
                }
                if state != Inactive && job.region.is_some() {
                    return Err(format!("job {id} is {state} and has a region"));
                }
                Ok(())
            }
            Event::JobMisconfigured { .. } => from(&[Active]).and(ready(false)),
            Event::JobReconfigured { .. } => from(&[Misconfigured]).and(ready(true)),
            Event::SnapshotRecorded { snapshot_id, .. } => {
                from(&[Active])?;
                match snapshot(snapshot_id) {
                    Ok(_) => Err(format!("job {id}'s catalog holds {snapshot_id} already")),
                    Err(_) => Ok(()),
                }
            }
            Event::SnapshotDeleted { snapshot_id } => {
                from(&[Active, Stopped, Misconfigured])?;
                match snapshot(snapshot_id)? {
                    s if s.do_not_delete => Err(format!("{snapshot_id} is do_not_delete")),
                    _ => Ok(()),
                }
            }
            Event::SnapshotExpiryChanged { snapshot_id, .. } => {
                from(&[Active, Stopped, Misconfigured])?;
                snapshot(snapshot_id).map(|_| ())
            }
            Event::SnapshotExpired {
                snapshot_id,
                expires_at,
            } => match snapshot(snapshot_id)? {
                s if s.do_not_delete => Err(format!("{snapshot_id} is do_not_delete")),
                s if s.expires_at != *expires_at => Err(format!(
                    "{snapshot_id} expires at {}, not {expires_at}",
                    s.expires_at
                )),
                _ => Ok(()),
            },
        }
    }

    /// Whether `event` (of a job that exists) changes the job's catalog:
    /// what the write path keeps the catalog's touched parts for
    /// ([`super::catalog::CatalogBefore`]), to undo the batch and lay out
    /// only the rows it changed.
    pub fn changes_catalog(event: &Event) -> bool {
        matches!(
            event,
            Event::SnapshotRecorded { .. }
                | Event::SnapshotDeleted { .. }
                | Event::SnapshotExpired { .. }
                | Event::SnapshotExpiryChanged { .. }
                | Event::SnapshotsPurged { .. }
        )
    }

    /// Apply a snapshot event to the job's catalog, and to `expiring` when
    /// given; returns the catalog when it changed (exactly for the events
    /// [`World::changes_catalog`] names).
    fn evolve_catalog<'c>(
        catalogs: &'c mut BTreeMap<Uuid, Catalog>,
        mut expiring: Option<&mut BTreeSet<(DateTime<Utc>, Uuid, Uuid)>>,
        job: &Job,
        env: &Envelope,
    ) -> Option<&'c Catalog> {
        let id = job.job_id;
        let catalog = catalogs.entry(id);
        let mut index = |s: &Snapshot, keep: bool| {
            if let Some(expiring) = expiring.as_deref_mut() {
                let key = (s.expires_at, id, s.snapshot_id);
                if keep {
                    expiring.insert(key);
                } else {
                    expiring.remove(&key);
                }
            }
        };
        match &env.event {
            Event::SnapshotRecorded {
                snapshot_id,
                taken_at,
                size_bytes,
                classes,
                expires_at,
            } => {
                let snap = Snapshot {
                    snapshot_id: *snapshot_id,
                    taken_at: *taken_at,
                    size_bytes: *size_bytes,
                    classes: classes.clone(),
                    expires_at: *expires_at,
                    do_not_delete: false,
                };
                index(&snap, true);
                let c = catalog.or_default();
                c.record(snap, day_of(*taken_at, &job.schedule));
                Some(c)
            }
            Event::SnapshotDeleted { snapshot_id } | Event::SnapshotExpired { snapshot_id, .. } => {
                let c = catalog.or_default();
                if let Some(s) = c.remove(*snapshot_id) {
                    index(&s, false);
                }
                Some(c)
            }
            Event::SnapshotExpiryChanged {
                snapshot_id,
                expires_at,
                do_not_delete,
            } => {
                let c = catalog.or_default();
                if let Some(s) = c
                    .snapshots
                    .iter_mut()
                    .find(|s| s.snapshot_id == *snapshot_id)
                {
                    index(s, false);
                    s.expires_at = *expires_at;
                    s.do_not_delete = *do_not_delete;
                    if !s.do_not_delete {
                        index(s, true);
                    }
                }
                Some(c)
            }
            Event::SnapshotsPurged { .. } => {
                let c = catalog.or_default();
                c.snapshots.iter().for_each(|s| index(s, false));
                c.snapshots.clear();
                Some(c)
            }
            _ => None,
        }
    }

    /// Replace (or remove) a job's catalog, keeping [`World::expiring`].
    pub fn set_catalog(&mut self, job_id: Uuid, catalog: Option<Catalog>) {
        if let Some(old) = self.catalogs.get(&job_id) {
            for s in &old.snapshots {
                self.expiring.remove(&(s.expires_at, job_id, s.snapshot_id));
            }
        }
        match catalog {
            Some(c) => {
                self.index(job_id, &c);
                self.catalogs.insert(job_id, c);
            }
            None => {
                self.catalogs.remove(&job_id);
            }
        }
    }

    /// Rebuild [`World::expiring`] from `catalogs`.
    pub fn reindex(&mut self) {
        let catalogs = std::mem::take(&mut self.catalogs);
        self.expiring.clear();
        for (id, c) in &catalogs {
            self.index(*id, c);
        }
        self.catalogs = catalogs;
    }

    fn index(&mut self, job_id: Uuid, c: &Catalog) {
        for s in c.snapshots.iter().filter(|s| !s.do_not_delete) {
            self.expiring.insert((s.expires_at, job_id, s.snapshot_id));
        }
    }

    /// Jobs with a snapshot due at `now` (expires_at <= now, not
    /// do_not_delete), in job-id order.
    pub fn jobs_with_due(&self, now: DateTime<Utc>) -> BTreeSet<Uuid> {
        self.expiring
            .range(..=(now, Uuid::max(), Uuid::max()))
            .map(|(_, job, _)| *job)
            .collect()
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
