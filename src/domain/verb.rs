//! The verbs of the contract: the last token of a command's subject
//! (`bcp.cmd.<project>.<verb>`), their wire names and parsing them.

use super::event::Event;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Verb {
    Create,
    Start,
    Stop,
    Terminate,
    AssignRegion,
    ChangeSchedule,
    RecordSnapshot,
    DeleteSnapshot,
    SetSnapshotExpiry,
    ExpireSnapshots,
    ConfigureRegion,
}

impl Verb {
    pub const ALL: [Verb; 11] = [
        Verb::Create,
        Verb::Start,
        Verb::Stop,
        Verb::Terminate,
        Verb::AssignRegion,
        Verb::ChangeSchedule,
        Verb::RecordSnapshot,
        Verb::DeleteSnapshot,
        Verb::SetSnapshotExpiry,
        Verb::ExpireSnapshots,
        Verb::ConfigureRegion,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Create => "create",
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::Terminate => "terminate",
            Verb::AssignRegion => "assign-region",
            Verb::ChangeSchedule => "change-schedule",
            Verb::RecordSnapshot => "record-snapshot",
            Verb::DeleteSnapshot => "delete-snapshot",
            Verb::SetSnapshotExpiry => "set-snapshot-expiry",
            Verb::ExpireSnapshots => "expire-snapshots",
            Verb::ConfigureRegion => "configure-region",
        }
    }

    pub fn parse(s: &str) -> Option<Verb> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The verb of the command an event was decided for, where the event
    /// alone says it: every type but `JobMisconfigured` and
    /// `JobReconfigured`, which assign-region, create and configure-region
    /// all decide (never as a command's first event).
    pub fn of_event(event: &Event) -> Option<Verb> {
        Some(match event {
            Event::JobCreated { .. } => Verb::Create,
            Event::JobStarted { .. } => Verb::Start,
            Event::JobStopped {} => Verb::Stop,
            Event::JobTerminated {} | Event::SnapshotsPurged { .. } => Verb::Terminate,
            Event::RegionAssigned { .. } => Verb::AssignRegion,
            Event::JobMisconfigured { .. } | Event::JobReconfigured { .. } => return None,
            Event::ScheduleChanged { .. } => Verb::ChangeSchedule,
            Event::SnapshotRecorded { .. } => Verb::RecordSnapshot,
            Event::SnapshotDeleted { .. } => Verb::DeleteSnapshot,
            Event::SnapshotExpiryChanged { .. } => Verb::SetSnapshotExpiry,
            Event::SnapshotExpired { .. } => Verb::ExpireSnapshots,
            Event::RegionConfigured { .. } => Verb::ConfigureRegion,
            Event::CommandRejected { verb, .. } => *verb,
        })
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
