//! `decide`: a command against the current [`World`] → the events it causes,
//! or a [`Rejection`]. The transition table of DOMAIN.md reads straight off
//! the `match` in `decide_job`.
//!
//! Pure: `now` is an argument; event ids and seqs are assigned by the store.

use super::catalog::{Catalog, expires_at};
use super::command::{Command, CommandEnvelope, Expiry, StoreChange};
use super::event::Event;
use super::ids::{Name, ProjectId};
use super::job::{Job, JobState, Phase};
use super::limits::{CATALOG_SNAPSHOTS_MAX, EXPIRE_EVENTS_MAX};
use super::rejection::{RejectCode, Rejection, reject};
use super::world::{Region, World};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One event to append, with the stream it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub project_id: ProjectId,
    pub job_id: Option<Uuid>,
    pub event: Event,
}

pub type Decision = Result<Vec<Decided>, Rejection>;

/// Decide one command. An `Ok` with no events means "already so" (assigning
/// the region a job already has).
pub fn decide(world: &World, cmd: &CommandEnvelope, now: DateTime<Utc>) -> Decision {
    if let Command::ConfigureRegion {
        region,
        snapshot_store,
        oplog_store,
        sync_store,
    } = &cmd.command
    {
        return Ok(configure_region(
            world,
            cmd,
            region,
            [snapshot_store, oplog_store, sync_store],
        ));
    }
    let Some(job_id) = cmd.job_id else {
        let Command::ExpireSnapshots { now } = &cmd.command else {
            unreachable!("only configure-region and expire-snapshots come without a job_id")
        };
        // Every job of the project with something due; the sweeper (project
        // _admin): of every project. The expiry index names them, so an
        // idle sweep reads nothing but the index's first entry.
        let due = world.jobs_with_due(*now);
        let jobs = due
            .iter()
            .filter_map(|id| world.jobs.get(id))
            .filter(|j| cmd.project_id.is_admin() || j.project_id == cmd.project_id);
        return Ok(expire(world, jobs, *now));
    };
    let job = world
        .jobs
        .get(&job_id)
        .filter(|j| j.project_id == cmd.project_id);
    let current = job.map_or(0, |j| j.version);
    if let Some(expected) = cmd.expected_version {
        // A job of another project is reported as not found below, not as a
        // version conflict that would leak its version; so is a missing
        // job, alike, but to `create` (version 0: the id is free).
        let creates = matches!(cmd.command, Command::Create { .. });
        if expected != current && (job.is_some() || (creates && !world.jobs.contains_key(&job_id)))
        {
            return Err(Rejection {
                code: RejectCode::VersionConflict,
                message: format!("expected version {expected}, job is at version {current}"),
                state: job.map(|j| j.state),
                current_version: Some(current),
            });
        }
    }
    let on_job = |event| Decided {
        project_id: cmd.project_id.clone(),
        job_id: Some(job_id),
        event,
    };
    if let Command::Create {
        deployment,
        schedule,
        region,
    } = &cmd.command
    {
        if world.jobs.contains_key(&job_id) {
            return Err(reject(
                RejectCode::AlreadyExists,
                None,
                format!("job {job_id} already exists"),
            ));
        }
        let event = Event::JobCreated {
            deployment: deployment.clone(),
            schedule: *schedule,
            region: region.clone(),
        };
        let mut out = vec![on_job(event)];
        if region.is_some() {
            let cluster = deployment.cluster.as_deref();
            out.extend(cluster_siblings(
                world,
                job_id,
                &cmd.project_id,
                cluster,
                region.as_ref(),
            ));
        }
        return Ok(out);
    }
    let Some(job) = job else {
        return Err(reject(
            RejectCode::NotFound,
            None,
            format!("no job {job_id} in project {}", cmd.project_id),
        ));
    };
    let events = decide_job(world, job, cmd, now)?;
    let region_changed = events.iter().find_map(|e| match e {
        Event::RegionAssigned { region } => Some(region.clone()),
        _ => None,
    });
    let mut out: Vec<Decided> = events.into_iter().map(on_job).collect();
    if let Some(region) = region_changed {
        let cluster = job.deployment.cluster.as_deref();
        out.extend(cluster_siblings(
            world,
            job.job_id,
            &job.project_id,
            cluster,
            region.as_ref(),
        ));
    }
    Ok(out)
}

/// The cluster rule as a rule of state: a shard or config server with no
/// region, in a cluster where another job has one, is Misconfigured when it
/// would be Active. When `job` (of a sharded cluster) gets `region` (or
/// loses its own), every running sibling without a region whose state the
/// rule now changes moves in the same command, each with an event naming
/// the cause; and moves back when the cause goes away. `job` is the job
/// whose region changes (to `region`), of `project` and `cluster`.
fn cluster_siblings(
    world: &World,
    job: Uuid,
    project: &ProjectId,
    cluster: Option<&str>,
    region: Option<&Name>,
) -> Vec<Decided> {
    let Some(cluster) = cluster else {
        return Vec::new();
    };
    let in_cluster =
        |o: &Job| o.project_id == *project && o.deployment.cluster.as_deref() == Some(cluster);
    world
        .jobs
        .values()
        .filter(|s| s.job_id != job && in_cluster(s) && s.region.is_none())
        .filter_map(|s| {
            // Regional after the change: `job` with its new region, or any
            // other sibling of `s` with one.
            let regional = region.is_some()
                || world.jobs.values().any(|o| {
                    o.job_id != s.job_id && o.job_id != job && in_cluster(o) && o.region.is_some()
                });
            let event = match (s.state, regional) {
                (JobState::Active, true) => Event::JobMisconfigured {
                    reason: format!(
                        "cluster {cluster} uses regional backup (job {job} was assigned region {}) but this job has no region",
                        region.map_or("-", |r| r.as_str())
                    ),
                },
                (JobState::Misconfigured, false) => Event::JobReconfigured {
                    reason: format!(
                        "cluster {cluster} no longer uses regional backup (job {job} left its region)"
                    ),
                    phase: s.resume_phase(),
                },
                _ => return None,
            };
            Some(Decided {
                project_id: s.project_id.clone(),
                job_id: Some(s.job_id),
                event,
            })
        })
        .collect()
}

/// The transition table for an existing job.
fn decide_job(
    world: &World,
    job: &Job,
    cmd: &CommandEnvelope,
    now: DateTime<Utc>,
) -> Result<Vec<Event>, Rejection> {
    use JobState::*;
    let state = job.state;
    let refuse = |allowed: &str| {
        let message = format!(
            "cannot {} a job that is {state}; {} is allowed from {allowed}",
            cmd.verb, cmd.verb
        );
        Err(reject(RejectCode::InvalidTransition, Some(state), message))
    };
    match (&cmd.command, state) {
        (Command::Start, Inactive | Stopped) => Ok(vec![start(world, job, now)]),
        (Command::Start, _) => refuse("Inactive or Stopped"),
        (Command::Stop, Active | Misconfigured) => Ok(vec![Event::JobStopped {}]),
        (Command::Stop, _) => refuse("Active or Misconfigured"),
        (Command::Terminate, Stopped) => {
            let snapshot_ids = world.catalogs.get(&job.job_id).map_or(vec![], |c| {
                c.snapshots.iter().map(|s| s.snapshot_id).collect()
            });
            Ok(vec![
                Event::JobTerminated {},
                Event::SnapshotsPurged { snapshot_ids },
            ])
        }
        (Command::Terminate, Active | Misconfigured) => refuse("Stopped only: stop it first"),
        (Command::Terminate, _) => refuse("Stopped only"),
        (Command::AssignRegion { region }, _) if *region == job.region => Ok(vec![]),
        (Command::AssignRegion { region }, _) if state == Inactive || job.region.is_none() => {
            Ok(assign_region(world, job, region))
        }
        (Command::AssignRegion { .. }, _) => refuse(
            "Inactive, or any state while the job has no region yet (its snapshots live in the region's stores: stop and terminate first)",
        ),
        (Command::ChangeSchedule { schedule }, _) => {
            let schedule = job
                .schedule
                .apply(schedule)
                .map_err(|e| reject(RejectCode::BadRequest, Some(state), e.to_string()))?;
            Ok(vec![Event::ScheduleChanged { schedule }])
        }
        (
            Command::RecordSnapshot {
                snapshot_id,
                taken_at,
                size_bytes,
            },
            Active,
        ) => {
            let empty = Catalog::default();
            let catalog = world.catalogs.get(&job.job_id).unwrap_or(&empty);
            if catalog.get(*snapshot_id).is_some() {
                let message = format!(
                    "snapshot {snapshot_id} is already in job {}'s catalog",
                    job.job_id
                );
                return Err(reject(RejectCode::AlreadyExists, Some(state), message));
            }
            if catalog.snapshots.len() >= CATALOG_SNAPSHOTS_MAX {
                let message = format!(
                    "job {}'s catalog holds {CATALOG_SNAPSHOTS_MAX} snapshots, the most a job keeps (its catalog and its purge must each fit one NATS message); delete or expire some first",
                    job.job_id
                );
                return Err(reject(RejectCode::InvalidTransition, Some(state), message));
            }
            let classes = catalog.classify(*taken_at, &job.schedule);
            let expires_at = expires_at(*taken_at, &classes, &job.schedule);
            Ok(vec![Event::SnapshotRecorded {
                snapshot_id: *snapshot_id,
                taken_at: *taken_at,
                size_bytes: *size_bytes,
                classes,
                expires_at,
            }])
        }
        (Command::RecordSnapshot { .. }, _) => {
            refuse("Active only: new snapshots are created only while backing up")
        }
        (Command::DeleteSnapshot { snapshot_id }, Active | Stopped | Misconfigured) => {
            let snap = find_snapshot(world, job, *snapshot_id)?;
            if snap.do_not_delete {
                let message = format!(
                    "snapshot {snapshot_id} is marked do_not_delete; set an expiry on it first"
                );
                return Err(reject(RejectCode::InvalidTransition, Some(state), message));
            }
            Ok(vec![Event::SnapshotDeleted {
                snapshot_id: *snapshot_id,
            }])
        }
        (
            Command::SetSnapshotExpiry {
                snapshot_id,
                expiry,
            },
            Active | Stopped | Misconfigured,
        ) => {
            let snap = find_snapshot(world, job, *snapshot_id)?;
            let (expires_at, do_not_delete) = match expiry {
                Expiry::At(at) => (*at, false),
                Expiry::DoNotDelete => (snap.expires_at, true),
            };
            Ok(vec![Event::SnapshotExpiryChanged {
                snapshot_id: *snapshot_id,
                expires_at,
                do_not_delete,
            }])
        }
        (Command::DeleteSnapshot { .. } | Command::SetSnapshotExpiry { .. }, _) => {
            refuse("Active, Stopped or Misconfigured (an Inactive job has no snapshots)")
        }
        (Command::ExpireSnapshots { now }, _) => Ok(expire(world, std::iter::once(job), *now)
            .into_iter()
            .map(|d| d.event)
            .collect()),
        (Command::Create { .. } | Command::ConfigureRegion { .. }, _) => {
            unreachable!("handled by decide")
        }
    }
}

fn find_snapshot<'w>(
    world: &'w World,
    job: &Job,
    id: Uuid,
) -> Result<&'w super::catalog::Snapshot, Rejection> {
    world
        .catalogs
        .get(&job.job_id)
        .and_then(|c| c.get(id))
        .ok_or_else(|| {
            reject(
                RejectCode::NotFound,
                Some(job.state),
                format!("no snapshot {id} in job {}'s catalog", job.job_id),
            )
        })
}

/// Retention: `SnapshotExpired` for each due snapshot of `jobs`, at most
/// `EXPIRE_EVENTS_MAX` (the rest are due at the next sweep).
fn expire<'a>(
    world: &World,
    jobs: impl Iterator<Item = &'a Job>,
    now: DateTime<Utc>,
) -> Vec<Decided> {
    let mut out = Vec::new();
    for job in jobs {
        let Some(catalog) = world.catalogs.get(&job.job_id) else {
            continue;
        };
        for snap in catalog.due(now) {
            if out.len() == EXPIRE_EVENTS_MAX {
                return out;
            }
            out.push(Decided {
                project_id: job.project_id.clone(),
                job_id: Some(job.job_id),
                event: Event::SnapshotExpired {
                    snapshot_id: snap.snapshot_id,
                    expires_at: snap.expires_at,
                },
            });
        }
    }
    out
}

fn start(world: &World, job: &Job, now: DateTime<Utc>) -> Event {
    let window = chrono::Duration::hours(i64::from(job.schedule.point_in_time_window_hours));
    let resumes = job.state == JobState::Stopped
        && job.initial_sync_done
        && job.stopped_at.is_some_and(|at| now - at < window);
    let phase = if resumes {
        Phase::Incremental
    } else {
        Phase::InitialSync
    };
    match world.not_ready_reason(job, job.region.as_ref()) {
        None => Event::JobStarted {
            phase,
            state: JobState::Active,
            reason: None,
        },
        Some(reason) => Event::JobStarted {
            phase,
            state: JobState::Misconfigured,
            reason: Some(reason),
        },
    }
}

fn assign_region(world: &World, job: &Job, region: &Option<Name>) -> Vec<Event> {
    let mut events = vec![Event::RegionAssigned {
        region: region.clone(),
    }];
    let reason = world.not_ready_reason(job, region.as_ref());
    match (job.state, reason) {
        (JobState::Active, Some(reason)) => events.push(Event::JobMisconfigured { reason }),
        (JobState::Misconfigured, None) => events.push(Event::JobReconfigured {
            reason: match region {
                Some(r) => format!("assigned to fully configured region {r}"),
                None => "region removed".to_owned(),
            },
            phase: job.resume_phase(),
        }),
        _ => {}
    }
    events
}

/// The region policy: one command, events for the region and for every job
/// of that region whose state it changes, across projects.
fn configure_region(
    world: &World,
    cmd: &CommandEnvelope,
    name: &Name,
    changes: [&Option<StoreChange>; 3],
) -> Vec<Decided> {
    let before = world.region(name);
    let after = Region {
        region: name.clone(),
        snapshot_store: StoreChange::apply(changes[0], &before.snapshot_store),
        oplog_store: StoreChange::apply(changes[1], &before.oplog_store),
        sync_store: StoreChange::apply(changes[2], &before.sync_store),
    };
    let mut out = vec![Decided {
        project_id: cmd.project_id.clone(),
        job_id: None,
        event: Event::RegionConfigured {
            region: name.clone(),
            snapshot_store: after.snapshot_store.clone(),
            oplog_store: after.oplog_store.clone(),
            sync_store: after.sync_store.clone(),
        },
    }];
    let ready = after.fully_configured();
    for job in world
        .jobs
        .values()
        .filter(|j| j.region.as_ref() == Some(name))
    {
        let event = match (job.state, ready) {
            (JobState::Active, false) => Event::JobMisconfigured {
                reason: format!("region {name} lacks {}", after.missing_stores().join(", ")),
            },
            (JobState::Misconfigured, true) => Event::JobReconfigured {
                reason: format!("region {name} is fully configured"),
                phase: job.resume_phase(),
            },
            _ => continue,
        };
        out.push(Decided {
            project_id: job.project_id.clone(),
            job_id: Some(job.job_id),
            event,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::envelope::Envelope;
    use crate::domain::job::{Deployment, DeploymentKind};
    use crate::domain::schedule::Schedule;
    use crate::domain::verb::Verb;
    use chrono::TimeZone;

    const P: &str = "p1";

    fn t(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, hour, 0, 0).unwrap()
    }
    fn job_id() -> Uuid {
        Uuid::from_u128(0xaa)
    }
    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    /// A world built by applying `events` to job `job_id()` (or to regions).
    fn given(events: Vec<Event>) -> World {
        let mut w = World::default();
        let mut version = 0;
        for (i, event) in events.into_iter().enumerate() {
            let region_event = matches!(event, Event::RegionConfigured { .. });
            if !region_event {
                version += 1;
            }
            w.evolve(&Envelope {
                seq: i as u64 + 1,
                event_id: Uuid::from_u128(i as u128),
                schema_version: 1,
                project_id: ProjectId::parse(if region_event { "_admin" } else { P }).unwrap(),
                job_id: (!region_event).then(job_id),
                job_version: (!region_event).then_some(version),
                command_id: Uuid::from_u128(1000 + i as u128),
                actor: None,
                actor_verified: false,
                recorded_at: t(i as u32),
                prev_hash: String::new(),
                event,
                hash: String::new(),
            });
        }
        w
    }

    fn created(region: Option<&str>) -> Event {
        Event::JobCreated {
            deployment: Deployment {
                kind: DeploymentKind::ReplicaSet,
                name: "rs0".into(),
                cluster: None,
            },
            schedule: Schedule::default(),
            region: region.map(name),
        }
    }
    fn started(state: JobState) -> Event {
        Event::JobStarted {
            phase: Phase::InitialSync,
            state,
            reason: None,
        }
    }
    fn region_full(r: &str) -> Event {
        Event::RegionConfigured {
            region: name(r),
            snapshot_store: Some(name("s")),
            oplog_store: Some(name("o")),
            sync_store: Some(name("y")),
        }
    }

    /// The four states, each with a job that has no region (Misconfigured
    /// needs one: its region "eu" has no stores).
    fn in_state(state: JobState) -> World {
        match state {
            JobState::Inactive => given(vec![created(None)]),
            JobState::Active => given(vec![created(None), started(JobState::Active)]),
            JobState::Stopped => given(vec![
                created(None),
                started(JobState::Active),
                Event::JobStopped {},
            ]),
            JobState::Misconfigured => {
                given(vec![created(Some("eu")), started(JobState::Misconfigured)])
            }
        }
    }

    fn cmd(command: Command, verb: Verb) -> CommandEnvelope {
        CommandEnvelope {
            command_id: Uuid::from_u128(1),
            project_id: ProjectId::parse(P).unwrap(),
            verb,
            job_id: Some(job_id()),
            expected_version: None,
            actor: None,
            actor_verified: false,
            command,
        }
    }

    fn types(d: &Decision) -> Result<Vec<&'static str>, RejectCode> {
        match d {
            Ok(evs) => Ok(evs.iter().map(|d| d.event.type_name()).collect()),
            Err(r) => Err(r.code),
        }
    }

    #[test]
    fn transition_table() {
        use JobState::*;
        let create = || {
            cmd(
                Command::Create {
                    deployment: Deployment {
                        kind: DeploymentKind::ReplicaSet,
                        name: "x".into(),
                        cluster: None,
                    },
                    schedule: Schedule::default(),
                    region: None,
                },
                Verb::Create,
            )
        };
        let start = || cmd(Command::Start, Verb::Start);
        let stop = || cmd(Command::Stop, Verb::Stop);
        let terminate = || cmd(Command::Terminate, Verb::Terminate);
        let assign_eu = || {
            cmd(
                Command::AssignRegion {
                    region: Some(name("eu")),
                },
                Verb::AssignRegion,
            )
        };
        let schedule = || {
            cmd(
                Command::ChangeSchedule {
                    schedule: Default::default(),
                },
                Verb::ChangeSchedule,
            )
        };
        let it = Err(RejectCode::InvalidTransition);
        let ok = |v: &[&'static str]| Ok(v.to_vec());
        // (state, command, expected) — every (command, state) pair.
        type Row = (
            JobState,
            CommandEnvelope,
            Result<Vec<&'static str>, RejectCode>,
        );
        let table: Vec<Row> = vec![
            (Inactive, create(), Err(RejectCode::AlreadyExists)),
            (Active, create(), Err(RejectCode::AlreadyExists)),
            (Stopped, create(), Err(RejectCode::AlreadyExists)),
            (Misconfigured, create(), Err(RejectCode::AlreadyExists)),
            (Inactive, start(), ok(&["JobStarted"])),
            (Active, start(), it.clone()),
            (Stopped, start(), ok(&["JobStarted"])),
            (Misconfigured, start(), it.clone()),
            (Inactive, stop(), it.clone()),
            (Active, stop(), ok(&["JobStopped"])),
            (Stopped, stop(), it.clone()),
            (Misconfigured, stop(), ok(&["JobStopped"])),
            (Inactive, terminate(), it.clone()),
            (Active, terminate(), it.clone()),
            (
                Stopped,
                terminate(),
                ok(&["JobTerminated", "SnapshotsPurged"]),
            ),
            (Misconfigured, terminate(), it.clone()),
            // first assignment is allowed in any state; eu has no stores
            (Inactive, assign_eu(), ok(&["RegionAssigned"])),
            (
                Active,
                assign_eu(),
                ok(&["RegionAssigned", "JobMisconfigured"]),
            ),
            (Stopped, assign_eu(), ok(&["RegionAssigned"])),
            (Misconfigured, assign_eu(), ok(&[])), // already in eu
            (Inactive, schedule(), ok(&["ScheduleChanged"])),
            (Active, schedule(), ok(&["ScheduleChanged"])),
            (Stopped, schedule(), ok(&["ScheduleChanged"])),
            (Misconfigured, schedule(), ok(&["ScheduleChanged"])),
        ];
        for (state, c, expected) in table {
            let w = in_state(state);
            assert_eq!(w.jobs[&job_id()].state, state);
            let got = decide(&w, &c, t(20));
            assert_eq!(types(&got), expected, "{} in {state}", c.verb);
            // The audit (World::admits) agrees: what was decided passes,
            // each event after the ones before it; the command's own event
            // from a state the table refuses it does not.
            let mut after = w.clone();
            match &got {
                Ok(decided) => {
                    for d in decided {
                        let mut env = audited(&after, d.job_id, d.event.clone());
                        env.project_id = d.project_id.clone();
                        assert_eq!(after.admits(&env), Ok(()), "{} in {state}", c.verb);
                        after.evolve(&env);
                    }
                }
                Err(r) if r.code == RejectCode::InvalidTransition => {
                    let own = match c.command {
                        Command::Start => started(JobState::Active),
                        Command::Stop => Event::JobStopped {},
                        Command::Terminate => Event::JobTerminated {},
                        _ => unreachable!("{} is refused only by state", c.verb),
                    };
                    let env = audited(&w, Some(job_id()), own);
                    assert!(w.admits(&env).is_err(), "{} in {state}", c.verb);
                }
                Err(_) => {}
            }
            if let Err(r) = got
                && r.code == RejectCode::InvalidTransition
            {
                assert!(r.message.contains(state.as_str()), "{}", r.message);
                assert_eq!(r.state, Some(state));
            }
        }
    }

    /// `event` of job `job` (project P) as the next event after `w`.
    fn audited(w: &World, job: Option<Uuid>, event: Event) -> Envelope {
        let version = job.map(|j| w.jobs.get(&j).map_or(0, |j| j.version) + 1);
        Envelope {
            seq: 100,
            event_id: Uuid::from_u128(100),
            schema_version: 1,
            project_id: ProjectId::parse(P).unwrap(),
            job_id: job,
            job_version: version.filter(|_| event.is_job_change()),
            command_id: Uuid::from_u128(101),
            actor: None,
            actor_verified: false,
            recorded_at: t(21),
            prev_hash: String::new(),
            event,
            hash: String::new(),
        }
    }

    /// What an audit refuses beyond the transition table: events of jobs
    /// that do not exist or are another project's, a job created twice,
    /// and snapshot events the catalog contradicts (the laundering a
    /// reviewer showed: a do_not_delete snapshot expired).
    #[test]
    fn the_audit_refuses_events_the_catalog_or_the_jobs_contradict() {
        let snap = Uuid::from_u128(0x5);
        let recorded = Event::SnapshotRecorded {
            snapshot_id: snap,
            taken_at: t(10),
            size_bytes: 1,
            classes: vec![],
            expires_at: t(23),
        };
        let mut w = in_state(JobState::Active);
        w.evolve(&audited(&w, Some(job_id()), recorded.clone()));
        let admits = |w: &World, job: Uuid, event: Event| w.admits(&audited(w, Some(job), event));
        let expired = |at| Event::SnapshotExpired {
            snapshot_id: snap,
            expires_at: at,
        };
        let keep = Event::SnapshotExpiryChanged {
            snapshot_id: snap,
            expires_at: t(23),
            do_not_delete: true,
        };
        let deleted = |id| Event::SnapshotDeleted { snapshot_id: id };
        // Allowed now: expiry at its time, a delete, keeping it.
        assert_eq!(admits(&w, job_id(), expired(t(23))), Ok(()));
        assert_eq!(admits(&w, job_id(), deleted(snap)), Ok(()));
        assert_eq!(admits(&w, job_id(), keep.clone()), Ok(()));
        // Contradicted: recorded twice, an expiry time it does not have,
        // an unknown snapshot.
        assert!(admits(&w, job_id(), recorded).is_err());
        let wrong = admits(&w, job_id(), expired(t(22))).unwrap_err();
        assert!(wrong.contains("expires at"), "{wrong}");
        assert!(admits(&w, job_id(), deleted(Uuid::from_u128(0x6))).is_err());
        // Marked do_not_delete: neither expired nor deleted.
        let mut kept = w.clone();
        kept.evolve(&audited(&kept, Some(job_id()), keep));
        for event in [expired(t(23)), deleted(snap)] {
            let why = admits(&kept, job_id(), event).unwrap_err();
            assert!(why.contains("do_not_delete"), "{why}");
        }
        // Jobs: created twice, missing, another project's; a purge that
        // does not list what the catalog holds.
        assert!(admits(&w, job_id(), created(None)).is_err());
        assert_eq!(admits(&w, Uuid::from_u128(0xbb), created(None)), Ok(()));
        let missing = admits(&w, Uuid::from_u128(0xbb), Event::JobStopped {});
        assert!(missing.unwrap_err().contains("no job"));
        let mut foreign = audited(&w, Some(job_id()), Event::JobStopped {});
        foreign.project_id = ProjectId::parse("p2").unwrap();
        assert!(w.admits(&foreign).unwrap_err().contains("of project p1"));
        let mut stopped = w.clone();
        stopped.evolve(&audited(&stopped, Some(job_id()), Event::JobStopped {}));
        stopped.evolve(&audited(&stopped, Some(job_id()), Event::JobTerminated {}));
        for (ids, ok) in [(vec![snap], true), (vec![], false)] {
            let purge = Event::SnapshotsPurged { snapshot_ids: ids };
            assert_eq!(admits(&stopped, job_id(), purge).is_ok(), ok);
        }
        // Terminated, not yet purged: nothing else of the job's.
        let early = admits(&stopped, job_id(), started(JobState::Active));
        assert!(early.unwrap_err().contains("not purged"));
        // Job versions exactly on a job's changes; a region's event names
        // no job (a crafted one must be refused, never panic).
        let mut unversioned = audited(&w, Some(job_id()), Event::JobStopped {});
        unversioned.job_version = None;
        let mut versioned = audited(
            &w,
            Some(job_id()),
            Event::CommandRejected {
                verb: Verb::Stop,
                code: RejectCode::InvalidTransition,
                reason: "x".into(),
                state: Some(JobState::Active),
                expected_version: None,
                current_version: None,
            },
        );
        versioned.job_version = Some(3);
        let mut region_of_a_job = audited(&w, None, region_full("eu"));
        region_of_a_job.job_id = Some(job_id());
        for env in [unversioned, versioned, region_of_a_job] {
            assert!(w.admits(&env).is_err(), "{:?}", env.event);
        }
        // A job with a region is Active exactly while the region has every
        // store: eu has none here.
        let inactive_in_eu = given(vec![created(Some("eu"))]);
        let start = |state| admits(&inactive_in_eu, job_id(), started(state));
        assert!(
            start(JobState::Active)
                .unwrap_err()
                .contains("not fully configured")
        );
        assert_eq!(start(JobState::Misconfigured), Ok(()));
        let reconfigured = Event::JobReconfigured {
            reason: "x".into(),
            phase: Phase::InitialSync,
        };
        let misconfigured = in_state(JobState::Misconfigured);
        assert!(admits(&misconfigured, job_id(), reconfigured).is_err());
    }

    #[test]
    fn create_then_missing_and_foreign_jobs_are_not_found() {
        let w = World::default();
        let mut c = cmd(Command::Start, Verb::Start);
        assert_eq!(types(&decide(&w, &c, t(0))), Err(RejectCode::NotFound));
        c.expected_version = Some(1);
        assert_eq!(
            types(&decide(&w, &c, t(0))),
            Err(RejectCode::NotFound),
            "a missing job, as another project's"
        );
        let w = in_state(JobState::Inactive);
        let mut other = cmd(Command::Start, Verb::Start);
        other.project_id = ProjectId::parse("p2").unwrap();
        assert_eq!(types(&decide(&w, &other, t(0))), Err(RejectCode::NotFound));
        other.expected_version = Some(7);
        assert_eq!(
            types(&decide(&w, &other, t(0))),
            Err(RejectCode::NotFound),
            "no version leak across projects"
        );
    }

    #[test]
    fn expected_version_is_honoured() {
        let w = in_state(JobState::Active); // version 2
        let mut c = cmd(Command::Stop, Verb::Stop);
        c.expected_version = Some(1);
        let r = decide(&w, &c, t(5)).unwrap_err();
        assert_eq!(
            (r.code, r.current_version),
            (RejectCode::VersionConflict, Some(2))
        );
        c.expected_version = Some(2);
        assert!(decide(&w, &c, t(5)).is_ok());
    }

    #[test]
    fn restart_within_the_window_resumes_incremental() {
        // stopped at t(3) (event index 3), window 24h
        let w = given(vec![
            created(None),
            Event::JobStarted {
                phase: Phase::Incremental,
                state: JobState::Active,
                reason: None,
            },
            Event::ScheduleChanged {
                schedule: Schedule::default(),
            },
            Event::JobStopped {},
        ]);
        let start = cmd(Command::Start, Verb::Start);
        let phase = |now| match &decide(&w, &start, now).unwrap()[0].event {
            Event::JobStarted { phase, .. } => *phase,
            e => panic!("{e:?}"),
        };
        assert_eq!(
            phase(t(3) + chrono::Duration::hours(23)),
            Phase::Incremental
        );
        assert_eq!(
            phase(t(3) + chrono::Duration::hours(24)),
            Phase::InitialSync
        );
        // never finished its initial sync: always initial_sync
        let w2 = in_state(JobState::Stopped);
        match &decide(&w2, &start, t(4)).unwrap()[0].event {
            Event::JobStarted { phase, .. } => assert_eq!(*phase, Phase::InitialSync),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn region_change_rules() {
        let w = given(vec![
            region_full("us"),
            created(Some("us")),
            started(JobState::Active),
        ]);
        // changing or removing the region of a running job is refused
        for region in [Some(name("eu")), None] {
            let c = cmd(Command::AssignRegion { region }, Verb::AssignRegion);
            assert_eq!(
                types(&decide(&w, &c, t(9))),
                Err(RejectCode::InvalidTransition)
            );
        }
        // an Inactive job may change and remove its region
        let w = given(vec![region_full("us"), created(Some("us"))]);
        for region in [Some(name("eu")), None] {
            let c = cmd(Command::AssignRegion { region }, Verb::AssignRegion);
            assert_eq!(types(&decide(&w, &c, t(9))), Ok(vec!["RegionAssigned"]));
        }
        // starting into a fully configured region is Active
        let w = given(vec![region_full("us"), created(Some("us"))]);
        match &decide(&w, &cmd(Command::Start, Verb::Start), t(9)).unwrap()[0].event {
            Event::JobStarted { state, .. } => assert_eq!(*state, JobState::Active),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn configuring_a_region_moves_its_jobs() {
        let mut w = in_state(JobState::Misconfigured); // job in eu, eu has no stores
        let admin = |snap: Option<StoreChange>| CommandEnvelope {
            command_id: Uuid::from_u128(9),
            project_id: ProjectId::parse("_admin").unwrap(),
            verb: Verb::ConfigureRegion,
            job_id: None,
            expected_version: None,
            actor: None,
            actor_verified: false,
            command: Command::ConfigureRegion {
                region: name("eu"),
                snapshot_store: snap,
                oplog_store: Some(StoreChange::Set(name("o"))),
                sync_store: Some(StoreChange::Set(name("y"))),
            },
        };
        let d = decide(&w, &admin(Some(StoreChange::Set(name("s")))), t(9)).unwrap();
        assert_eq!(
            d.iter().map(|d| d.event.type_name()).collect::<Vec<_>>(),
            ["RegionConfigured", "JobReconfigured"]
        );
        assert_eq!(d[1].job_id, Some(job_id()));
        assert_eq!(d[1].project_id.as_str(), P);
        // apply, then removing a store misconfigures the now Active job
        let mut seq = 100;
        for x in d {
            seq += 1;
            let version = x
                .event
                .is_job_change()
                .then(|| w.jobs[&job_id()].version + 1);
            w.evolve(&Envelope {
                seq,
                event_id: Uuid::from_u128(seq as u128),
                schema_version: 1,
                project_id: x.project_id,
                job_id: x.job_id,
                job_version: version,
                command_id: Uuid::from_u128(9),
                actor: None,
                actor_verified: false,
                recorded_at: t(9),
                prev_hash: String::new(),
                event: x.event,
                hash: String::new(),
            });
        }
        assert_eq!(w.jobs[&job_id()].state, JobState::Active);
        assert_eq!(w.jobs[&job_id()].phase, Some(Phase::InitialSync));
        let d = decide(&w, &admin(Some(StoreChange::Remove)), t(10)).unwrap();
        assert_eq!(
            d.iter().map(|d| d.event.type_name()).collect::<Vec<_>>(),
            ["RegionConfigured", "JobMisconfigured"]
        );
    }

    /// A job keeps at most CATALOG_SNAPSHOTS_MAX snapshots: one more is
    /// refused, in any case of its classes. At that many, the terminate's
    /// purge and the `snapshots` reply each fit one NATS message of the
    /// default 1 MiB with room for the envelope or reply around them, even
    /// with every snapshot at its largest.
    #[test]
    fn a_full_catalog_refuses_one_more_snapshot_and_fits_one_nats_message() {
        use crate::domain::catalog::{Snapshot, SnapshotClass};
        let far = Utc.with_ymd_and_hms(8999, 12, 31, 23, 59, 59).unwrap();
        let snapshot = |i: usize| Snapshot {
            snapshot_id: Uuid::from_u128(u128::MAX - i as u128),
            taken_at: far,
            size_bytes: u64::MAX,
            classes: vec![
                SnapshotClass::Base,
                SnapshotClass::Daily,
                SnapshotClass::Weekly,
                SnapshotClass::Monthly,
            ],
            expires_at: far,
            do_not_delete: true,
        };
        let record = cmd(
            Command::RecordSnapshot {
                snapshot_id: Uuid::from_u128(7),
                taken_at: t(5),
                size_bytes: 1,
            },
            Verb::RecordSnapshot,
        );
        let mut world = in_state(JobState::Active);
        let mut catalog = Catalog {
            snapshots: (0..CATALOG_SNAPSHOTS_MAX - 1).map(snapshot).collect(),
            ..Catalog::default()
        };
        world.set_catalog(job_id(), Some(catalog.clone()));
        assert_eq!(
            types(&decide(&world, &record, t(6))),
            Ok(vec!["SnapshotRecorded"])
        );

        catalog.snapshots.push(snapshot(CATALOG_SNAPSHOTS_MAX));
        world.set_catalog(job_id(), Some(catalog.clone()));
        let refused = decide(&world, &record, t(6)).unwrap_err();
        assert_eq!(refused.code, RejectCode::InvalidTransition);
        assert!(
            refused.message.contains("holds 4000 snapshots"),
            "{}",
            refused.message
        );

        let nats_default_max_payload = 1 << 20;
        let purge = Event::SnapshotsPurged {
            snapshot_ids: catalog.snapshots.iter().map(|s| s.snapshot_id).collect(),
        };
        let purge = serde_json::to_vec(&purge).unwrap().len();
        let listed = serde_json::to_vec(&catalog.snapshots).unwrap().len();
        assert!(purge + 4096 < nats_default_max_payload, "{purge}");
        assert!(listed + 4096 < nats_default_max_payload, "{listed}");
    }
}
