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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(into = "WireReply")]
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
/// (empty when nothing changed), never on an error.
#[derive(Serialize, schemars::JsonSchema)]
struct WireReply {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    /// The events the command appended, in seq order (present when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<Vec<EventRef>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
    /// Seq of the `CommandRejected` audit record, for a recorded rejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    rejection_seq: Option<u64>,
    /// True when this is the stored reply to an earlier command with the same id.
    duplicate: bool,
}

impl From<Reply> for WireReply {
    fn from(r: Reply) -> WireReply {
        WireReply {
            ok: r.ok,
            job_id: r.job_id,
            version: r.version,
            events: r.ok.then_some(r.events),
            error: r.error,
            rejection_seq: r.rejection_seq,
            duplicate: r.duplicate,
        }
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
    /// The reply a command got, as far as the log tells: its recorded
    /// rejection, or its events (the job and its version when they all
    /// concern one job). Import and group-mode followers rebuild the
    /// idempotency records with it.
    pub fn from_events(events: &[&Envelope]) -> Reply {
        if let Some(env) = events
            .iter()
            .find(|e| matches!(e.event, Event::CommandRejected { .. }))
        {
            let Event::CommandRejected {
                code,
                reason,
                current_version,
                ..
            } = &env.event
            else {
                unreachable!()
            };
            let mut reply = Reply::error(ErrorCode::from(*code), reason.clone());
            reply.job_id = env.job_id;
            reply.rejection_seq = Some(env.seq);
            if let Some(e) = reply.error.as_mut() {
                e.current_version = *current_version;
            }
            return reply;
        }
        let first_job = events.first().and_then(|e| e.job_id);
        let one_job = first_job.filter(|j| events.iter().all(|e| e.job_id == Some(*j)));
        let version = one_job.and_then(|_| events.iter().rev().find_map(|e| e.job_version));
        let refs = events
            .iter()
            .map(|e| EventRef {
                seq: e.seq,
                event_type: e.event.type_name().to_owned(),
            })
            .collect();
        Reply::accepted(one_job, version, refs)
    }
}
