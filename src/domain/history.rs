//! A job's history: each transition (seq, time, actor, command, from → to)
//! and each rejection, folded from the job's own events. The live server
//! (`bcp.query.history`) and the audit tools use exactly this fold.

use super::envelope::Envelope;
use super::event::Event;
use super::job::{Job, JobState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HistoryEntry {
    pub seq: u64,
    pub recorded_at: DateTime<Utc>,
    pub actor: Option<String>,
    /// The actor was authenticated by NATS (see the envelope's field).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub actor_verified: bool,
    pub command_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The job's version after the event; null for a rejection.
    pub version: Option<u64>,
    /// State before and after (null before the job existed).
    pub from: Option<JobState>,
    pub to: Option<JobState>,
    /// The command that caused the event.
    pub verb: String,
    pub rejected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The fold of one job's events (its transitions and rejections, in seq
/// order) into its history, one event at a time, holding only the job and
/// the last event's command: a reader can page through a long history
/// without holding it.
///
/// `command_start` gives the type of the first event of an event's
/// command in the whole log (`Store::command_start`). It is asked only of
/// a job moved between Active and Misconfigured by another job's command
/// or a region's, whose own events do not say which command that was.
#[derive(Default)]
pub struct HistoryFold {
    job: Option<Job>,
    /// The command of the event before, and whether that event was a
    /// `RegionAssigned`.
    prev: Option<(Uuid, bool)>,
}

impl HistoryFold {
    /// The entry of `env`, the job's next event.
    pub fn entry(
        &mut self,
        env: &Envelope,
        command_start: &mut impl FnMut(&Envelope) -> Option<String>,
    ) -> HistoryEntry {
        let after_region_assigned = self
            .prev
            .is_some_and(|(command, assigned)| assigned && command == env.command_id);
        let verb = verb_of(env, after_region_assigned, command_start);
        self.prev = Some((
            env.command_id,
            matches!(env.event, Event::RegionAssigned { .. }),
        ));
        let from = self.job.as_ref().map(|j| j.state);
        Job::evolve(&mut self.job, env);
        let to = self.job.as_ref().map(|j| j.state);
        let (rejected, code, reason) = match &env.event {
            Event::CommandRejected { code, reason, .. } => {
                (true, Some(code.as_str().to_owned()), Some(reason.clone()))
            }
            Event::JobStarted { reason, .. } => (false, None, reason.clone()),
            Event::JobMisconfigured { reason } | Event::JobReconfigured { reason, .. } => {
                (false, None, Some(reason.clone()))
            }
            _ => (false, None, None),
        };
        HistoryEntry {
            seq: env.seq,
            recorded_at: env.recorded_at,
            actor: env.actor.clone(),
            actor_verified: env.actor_verified,
            command_id: env.command_id,
            event_type: env.event.type_name().to_owned(),
            version: env.job_version,
            from,
            to,
            verb: verb.to_owned(),
            rejected,
            code,
            reason,
        }
    }
}

/// The verb of the command behind an event. The envelope names the command
/// by id only; the event type says which verb, except for a job moved
/// between Active and Misconfigured. That follows its own `RegionAssigned`
/// in the same command (assign-region), or else another event that names
/// the command (its `command_start`): a sibling's `RegionAssigned`
/// (assign-region) or `JobCreated` (create, with a region), or a
/// `RegionConfigured` (configure-region).
fn verb_of(
    env: &Envelope,
    after_region_assigned: bool,
    command_start: &mut impl FnMut(&Envelope) -> Option<String>,
) -> &'static str {
    use super::verb::Verb;
    let verb = Verb::of_event(&env.event).unwrap_or_else(|| {
        if after_region_assigned {
            Verb::AssignRegion
        } else {
            match command_start(env).as_deref() {
                Some("RegionAssigned") => Verb::AssignRegion,
                Some("JobCreated") => Verb::Create,
                _ => Verb::ConfigureRegion,
            }
        }
    });
    verb.as_str()
}
