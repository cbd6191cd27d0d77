//! Replies to commands, as they go on the wire (DESIGN.md §3). Stored with
//! each command's idempotency record, so a retry gets the original reply.

use super::rejection::{RejectCode, Rejection};
use super::{Envelope, Event};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    AlreadyExists,
    InvalidTransition,
    VersionConflict,
    CommandIdConflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as on the wire (`bad_request`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InvalidTransition => "invalid_transition",
            ErrorCode::VersionConflict => "version_conflict",
            ErrorCode::CommandIdConflict => "command_id_conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl From<RejectCode> for ErrorCode {
    fn from(c: RejectCode) -> Self {
        match c {
            RejectCode::BadRequest => ErrorCode::BadRequest,
            RejectCode::NotFound => ErrorCode::NotFound,
            RejectCode::AlreadyExists => ErrorCode::AlreadyExists,
            RejectCode::InvalidTransition => ErrorCode::InvalidTransition,
            RejectCode::VersionConflict => ErrorCode::VersionConflict,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EventRef {
    pub seq: u64,
    #[serde(rename = "type")]
    pub event_type: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

/// `{"ok":true,…,"events":[…]}` or `{"ok":false,"error":{…}}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
// What is written is `WireReply` (`Serialize` below; schemars' serialize
// contract follows it). The checked-in schemas are the deserialize
// contract, from these fields and their attributes, as before.
#[schemars(into = "WireReply<'static>")]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Seq of the `CommandRejected` audit record, for a recorded rejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection_seq: Option<u64>,
    pub duplicate: bool,
}

/// How a [`Reply`] goes on the wire: `events` always on an accepted reply
/// (empty when nothing changed), never on an error. Borrowed from the
/// reply it writes: a reply is serialized once per command sent, without
/// a copy of it.
#[derive(Serialize, schemars::JsonSchema)]
struct WireReply<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<&'a Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    /// The events the command appended, in seq order (present when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<&'a [EventRef]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorBody>,
    /// Seq of the `CommandRejected` audit record, for a recorded rejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    rejection_seq: Option<u64>,
    /// True when this is the stored reply to an earlier command with the same id.
    duplicate: bool,
}

impl Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireReply {
            ok: self.ok,
            job_id: self.job_id.as_ref(),
            version: self.version,
            events: self.ok.then_some(self.events.as_slice()),
            error: self.error.as_ref(),
            rejection_seq: self.rejection_seq,
            duplicate: self.duplicate,
        }
        .serialize(s)
    }
}

impl Reply {
    pub fn accepted(job_id: Option<Uuid>, version: Option<u64>, events: Vec<EventRef>) -> Reply {
        Reply {
            ok: true,
            job_id,
            version,
            events,
            error: None,
            rejection_seq: None,
            duplicate: false,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            job_id: None,
            version: None,
            events: Vec::new(),
            error: Some(ErrorBody {
                code,
                message: message.into(),
                current_version: None,
            }),
            rejection_seq: None,
            duplicate: false,
        }
    }

    pub fn rejected(job_id: Option<Uuid>, r: &Rejection, rejection_seq: Option<u64>) -> Reply {
        let mut reply = Reply::error(r.code.into(), r.message.clone());
        reply.job_id = job_id;
        reply.rejection_seq = rejection_seq;
        if let Some(e) = reply.error.as_mut() {
            e.current_version = r.current_version;
        }
        reply
    }

    pub fn code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("reply serializes")
    }
}

impl Reply {
    /// The reply of a command about `job` (the job it names, if any) whose
    /// events are `events` (in seq order, at least one): its recorded
    /// rejection, or ok with its events and the version its last event of
    /// `job` gave that job. The one derivation of a reply: the write path
    /// answers with it, import and group followers rebuild idempotency
    /// records with it ([`Reply::from_events`]), and `audit verify` checks
    /// every stored record against it.
    pub fn of_events(job: Option<Uuid>, events: &[EventFacts<'_>]) -> Reply {
        if let Some((e, (code, reason, current_version))) =
            events.iter().find_map(|e| Some((e, e.rejected?)))
        {
            let mut reply = Reply::error(code, reason);
            reply.job_id = e.job_id;
            reply.rejection_seq = Some(e.seq);
            if let Some(err) = reply.error.as_mut() {
                err.current_version = current_version;
            }
            return reply;
        }
        let version = job.and_then(|job| {
            (events.iter().rev())
                .filter(|e| e.job_id == Some(job))
                .find_map(|e| e.job_version)
        });
        let refs = events
            .iter()
            .map(|e| EventRef {
                seq: e.seq,
                event_type: e.event_type.to_owned(),
            })
            .collect();
        Reply::accepted(job, version, refs)
    }

    /// [`Reply::of_events`] where the command itself is not known (the log
    /// holds no command bodies): its job is the one all its events concern,
    /// if they concern one.
    pub fn from_events(events: &[&Envelope]) -> Reply {
        let first_job = events.first().and_then(|e| e.job_id);
        let one_job = first_job.filter(|j| events.iter().all(|e| e.job_id == Some(*j)));
        let facts: Vec<EventFacts> = events.iter().map(|e| EventFacts::of(e)).collect();
        Reply::of_events(one_job, &facts)
    }
}

/// What a reply repeats of one of its command's events.
#[derive(Clone, Copy, Debug)]
pub struct EventFacts<'a> {
    pub seq: u64,
    pub job_id: Option<Uuid>,
    pub job_version: Option<u64>,
    pub event_type: &'static str,
    /// A recorded rejection: its code, its reason, and the job's version.
    pub rejected: Option<(ErrorCode, &'a str, Option<u64>)>,
}

impl<'a> EventFacts<'a> {
    pub fn of(env: &'a Envelope) -> EventFacts<'a> {
        let rejected = match &env.event {
            Event::CommandRejected {
                code,
                reason,
                current_version,
                ..
            } => Some((ErrorCode::from(*code), reason.as_str(), *current_version)),
            _ => None,
        };
        EventFacts {
            seq: env.seq,
            job_id: env.job_id,
            job_version: env.job_version,
            event_type: env.event.type_name(),
            rejected,
        }
    }
}
