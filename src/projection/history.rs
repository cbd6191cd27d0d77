//! A job's history: each transition (seq, time, actor, command, from → to)
//! and each rejection, folded from the job's own events.

use crate::domain::{Envelope, Event, Job, JobState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub seq: u64,
    pub recorded_at: DateTime<Utc>,
    pub actor: Option<String>,
    pub command_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The job's version after the event; null for a rejection.
    pub version: Option<u64>,
    /// State before and after (null before the job existed).
    pub from: Option<JobState>,
    pub to: Option<JobState>,
    pub rejected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verb: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Fold one job's events (its transitions and rejections, in seq order).
pub fn history<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> Vec<HistoryEntry> {
    let mut job: Option<Job> = None;
    let mut out = Vec::new();
    for env in events {
        let from = job.as_ref().map(|j| j.state);
        Job::evolve(&mut job, env);
        let to = job.as_ref().map(|j| j.state);
        let (rejected, verb, code, reason) = match &env.event {
            Event::CommandRejected {
                verb, code, reason, ..
            } => (
                true,
                Some(verb.to_string()),
                Some(code.as_str().to_owned()),
                Some(reason.clone()),
            ),
            Event::JobStarted { reason, .. } => (false, None, None, reason.clone()),
            Event::JobMisconfigured { reason } | Event::JobReconfigured { reason, .. } => {
                (false, None, None, Some(reason.clone()))
            }
            _ => (false, None, None, None),
        };
        out.push(HistoryEntry {
            seq: env.seq,
            recorded_at: env.recorded_at,
            actor: env.actor.clone(),
            command_id: env.command_id,
            event_type: env.event.type_name().to_owned(),
            version: env.job_version,
            from,
            to,
            rejected,
            verb,
            code,
            reason,
        });
    }
    out
}
