//! The facts bcp records. Names and fields are the contract (DOMAIN.md
//! "Events"); serialized adjacently tagged, so an envelope carries `type` and
//! `data` side by side.

use super::catalog::SnapshotClass;
use super::ids::Name;
use super::job::{Deployment, JobState, Phase};
use super::rejection::RejectCode;
use super::schedule::Schedule;
use super::verb::Verb;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Current shape of every event; bump and upcast on read when one changes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    JobCreated {
        deployment: Deployment,
        schedule: Schedule,
        region: Option<Name>,
    },
    /// A start; `state` is Misconfigured (with `reason`) when the job's region
    /// lacks a store.
    JobStarted {
        phase: Phase,
        state: JobState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    JobStopped {},
    JobTerminated {},
    SnapshotsPurged {
        snapshot_ids: Vec<Uuid>,
    },
    RegionAssigned {
        region: Option<Name>,
    },
    JobMisconfigured {
        reason: String,
    },
    JobReconfigured {
        reason: String,
        phase: Phase,
    },
    ScheduleChanged {
        schedule: Schedule,
    },
    /// A backup agent's snapshot, classified and given its expiry on record.
    SnapshotRecorded {
        snapshot_id: Uuid,
        #[serde(
            serialize_with = "super::timestamp::serialize",
            deserialize_with = "super::timestamp::deserialize"
        )]
        taken_at: DateTime<Utc>,
        size_bytes: u64,
        classes: Vec<SnapshotClass>,
        #[serde(
            serialize_with = "super::timestamp::serialize",
            deserialize_with = "super::timestamp::deserialize"
        )]
        expires_at: DateTime<Utc>,
    },
    /// The operator's manual delete.
    SnapshotDeleted {
        snapshot_id: Uuid,
    },
    /// The snapshot's expiry as it is after the change.
    SnapshotExpiryChanged {
        snapshot_id: Uuid,
        #[serde(
            serialize_with = "super::timestamp::serialize",
            deserialize_with = "super::timestamp::deserialize"
        )]
        expires_at: DateTime<Utc>,
        do_not_delete: bool,
    },
    /// Retention removed a due snapshot (`expires_at` <= the sweep's `now`).
    SnapshotExpired {
        snapshot_id: Uuid,
        #[serde(
            serialize_with = "super::timestamp::serialize",
            deserialize_with = "super::timestamp::deserialize"
        )]
        expires_at: DateTime<Utc>,
    },
    /// A region's stores as they are after the change (`job_id` null).
    RegionConfigured {
        region: Name,
        snapshot_store: Option<Name>,
        oplog_store: Option<Name>,
        sync_store: Option<Name>,
    },
    /// Audit only: a command decided against state and refused.
    CommandRejected {
        verb: Verb,
        code: RejectCode,
        reason: String,
        /// The job's state when refused (null when there was no such job).
        state: Option<JobState>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current_version: Option<u64>,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::JobCreated { .. } => "JobCreated",
            Event::JobStarted { .. } => "JobStarted",
            Event::JobStopped {} => "JobStopped",
            Event::JobTerminated {} => "JobTerminated",
            Event::SnapshotsPurged { .. } => "SnapshotsPurged",
            Event::RegionAssigned { .. } => "RegionAssigned",
            Event::JobMisconfigured { .. } => "JobMisconfigured",
            Event::JobReconfigured { .. } => "JobReconfigured",
            Event::ScheduleChanged { .. } => "ScheduleChanged",
            Event::SnapshotRecorded { .. } => "SnapshotRecorded",
            Event::SnapshotDeleted { .. } => "SnapshotDeleted",
            Event::SnapshotExpiryChanged { .. } => "SnapshotExpiryChanged",
            Event::SnapshotExpired { .. } => "SnapshotExpired",
            Event::RegionConfigured { .. } => "RegionConfigured",
            Event::CommandRejected { .. } => "CommandRejected",
        }
    }

    /// Whether the event changes a job (and so counts in its `job_version`).
    pub fn is_job_change(&self) -> bool {
        !matches!(
            self,
            Event::RegionConfigured { .. } | Event::CommandRejected { .. }
        )
    }
}
