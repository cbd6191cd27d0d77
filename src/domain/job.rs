//! A backup job, its states and phases, and how one event changes it
//! ([`Job::evolve`]): the per-job half of `evolve`.

use super::envelope::Envelope;
use super::event::Event;
use super::ids::{Name, ProjectId};
use super::schedule::Schedule;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    ReplicaSet,
    Shard,
    ConfigServer,
}

/// What the job backs up: a replica set (no `cluster`), or one shard or the
/// config server of a sharded cluster (its `cluster` named).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("allOf" = [
    {"if": {"properties": {"kind": {"const": "replica_set"}}},
     "then": {"properties": {"cluster": {"type": "null"}}}},
    {"if": {"properties": {"kind": {"enum": ["shard", "config_server"]}}},
     "then": {"required": ["cluster"], "properties": {"cluster": {"type": "string"}}}},
]))]
pub struct Deployment {
    pub kind: DeploymentKind,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// As derived, but `cluster` is left out only in JSON (when absent): a
/// binary row (`store::rows`) has every field in order.
impl Serialize for Deployment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let skip = s.is_human_readable() && self.cluster.is_none();
        let mut st = s.serialize_struct("Deployment", if skip { 2 } else { 3 })?;
        st.serialize_field("kind", &self.kind)?;
        st.serialize_field("name", &self.name)?;
        if skip {
            st.skip_field("cluster")?;
        } else {
            st.serialize_field("cluster", &self.cluster)?;
        }
        st.end()
    }
}

pub(crate) fn check_label(what: &str, s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 0 || n > 128 {
        return Err(format!(
            "{what} must be 1-128 printable characters, got {n} characters"
        ));
    }
    if let Some(c) = s.chars().find(|c| !super::ids::is_displayable(*c)) {
        return Err(format!(
            "{what} holds U+{:04X}, a control or invisible formatting character (it could make a name display as another)",
            c as u32
        ));
    }
    if s.trim().is_empty() {
        return Err(format!(
            "{what} must hold a visible character, not only spaces"
        ));
    }
    Ok(())
}

impl Deployment {
    pub fn validate(&self) -> Result<(), String> {
        check_label("deployment.name", &self.name)?;
        match (&self.kind, &self.cluster) {
            (DeploymentKind::ReplicaSet, Some(_)) => {
                Err("deployment.cluster is only for kinds shard and config_server".into())
            }
            (DeploymentKind::Shard | DeploymentKind::ConfigServer, None) => {
                Err("deployment.cluster is required for kinds shard and config_server".into())
            }
            (_, Some(c)) => check_label("deployment.cluster", c),
            (_, None) => Ok(()),
        }
    }
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum JobState {
    Inactive,
    Active,
    Stopped,
    Misconfigured,
}

impl JobState {
    pub const ALL: [JobState; 4] = [
        JobState::Inactive,
        JobState::Active,
        JobState::Stopped,
        JobState::Misconfigured,
    ];

    pub fn parse(s: &str) -> Option<JobState> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Inactive => "Inactive",
            JobState::Active => "Active",
            JobState::Stopped => "Stopped",
            JobState::Misconfigured => "Misconfigured",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    InitialSync,
    Incremental,
}

/// The job-state projection of one job; also the job VIEW of the contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Job {
    pub job_id: Uuid,
    pub project_id: ProjectId,
    pub deployment: Deployment,
    pub schedule: Schedule,
    pub region: Option<Name>,
    pub state: JobState,
    /// `initial_sync` or `incremental` while Active, else null.
    pub phase: Option<Phase>,
    /// Number of events applied to the job, from 1.
    pub version: u64,
    pub snapshot_count: u64,
    #[serde(serialize_with = "super::timestamp::serialize_option")]
    pub latest_snapshot_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub last_transition_at: DateTime<Utc>,
    /// When the job was last stopped, while it is Stopped (restart rule).
    #[serde(serialize_with = "super::timestamp::serialize_option")]
    pub stopped_at: Option<DateTime<Utc>>,
    /// Whether the job finished its initial sync since it was last started
    /// from scratch; decides the phase on restart and on reconfiguration.
    pub initial_sync_done: bool,
}

impl Job {
    /// The phase a job resumes in when it becomes Active again without a
    /// restart (a region repaired).
    pub fn resume_phase(&self) -> Phase {
        if self.initial_sync_done {
            Phase::Incremental
        } else {
            Phase::InitialSync
        }
    }

    /// Apply one event of this job's stream. `job` is None before JobCreated.
    /// Events about other jobs or regions must not be passed here.
    /// `snapshot_count` and `latest_snapshot_at` are kept by
    /// [`super::World::evolve`], which also folds the catalog.
    pub fn evolve(job: &mut Option<Job>, env: &Envelope) {
        if let Some(created) = Job::created(env) {
            *job = Some(created);
        } else if let Some(j) = job.as_mut() {
            j.apply(env);
        }
    }

    /// The job a JobCreated event creates (None for every other event).
    pub fn created(env: &Envelope) -> Option<Job> {
        let Event::JobCreated {
            deployment,
            schedule,
            region,
        } = &env.event
        else {
            return None;
        };
        let at = env.recorded_at;
        Some(Job {
            job_id: env.job_id.expect("JobCreated has a job_id"),
            project_id: env.project_id.clone(),
            deployment: deployment.clone(),
            schedule: *schedule,
            region: region.clone(),
            state: JobState::Inactive,
            phase: None,
            version: env.job_version.unwrap_or(0),
            snapshot_count: 0,
            latest_snapshot_at: None,
            created_at: at,
            last_transition_at: at,
            stopped_at: None,
            initial_sync_done: false,
        })
    }

    /// Apply one event of this job's stream other than JobCreated (see
    /// [`Job::evolve`]).
    pub fn apply(&mut self, env: &Envelope) {
        let j = self;
        let at = env.recorded_at;
        let version = env.job_version.unwrap_or(0);
        if env.job_version.is_some() {
            j.version = version;
        }
        match &env.event {
            Event::JobCreated { .. }
            | Event::RegionConfigured { .. }
            | Event::CommandRejected { .. } => {}
            Event::JobStarted { phase, state, .. } => {
                j.state = *state;
                j.phase = (*state == JobState::Active).then_some(*phase);
                j.initial_sync_done = *phase == Phase::Incremental;
                j.stopped_at = None;
                j.last_transition_at = at;
            }
            Event::JobStopped {} => {
                j.state = JobState::Stopped;
                j.phase = None;
                j.stopped_at = Some(at);
                j.last_transition_at = at;
            }
            Event::JobTerminated {} => {
                j.state = JobState::Inactive;
                j.phase = None;
                j.stopped_at = None;
                j.initial_sync_done = false;
                j.last_transition_at = at;
            }
            Event::SnapshotsPurged { .. } => {
                j.snapshot_count = 0;
                j.latest_snapshot_at = None;
            }
            Event::RegionAssigned { region } => j.region = region.clone(),
            Event::JobMisconfigured { .. } => {
                j.state = JobState::Misconfigured;
                j.phase = None;
                j.last_transition_at = at;
            }
            Event::JobReconfigured { phase, .. } => {
                j.state = JobState::Active;
                j.phase = Some(*phase);
                j.last_transition_at = at;
            }
            Event::ScheduleChanged { schedule } => j.schedule = *schedule,
            Event::SnapshotRecorded { .. } => {
                // The first snapshot after a start ends the initial sync.
                j.initial_sync_done = true;
                if j.state == JobState::Active {
                    j.phase = Some(Phase::Incremental);
                }
            }
            // Catalog changes; World::evolve keeps the counts.
            Event::SnapshotDeleted { .. }
            | Event::SnapshotExpiryChanged { .. }
            | Event::SnapshotExpired { .. } => {}
        }
    }
}
