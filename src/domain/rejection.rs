//! Rejections: why a command was refused against state. [`RejectCode`] is
//! the wire code (and whether the log records it as `CommandRejected`);
//! [`Rejection`] carries the code, the message and the job's state and
//! version when refused. [`decide`](super::decide::decide) produces them;
//! replies and the `CommandRejected` event carry them out.

use super::job::JobState;
use serde::{Deserialize, Serialize};

/// Wire error codes for rejections decided against state, plus `bad_request`
/// for values only checkable against state (a schedule patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    BadRequest,
    NotFound,
    AlreadyExists,
    InvalidTransition,
    VersionConflict,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::BadRequest => "bad_request",
            RejectCode::NotFound => "not_found",
            RejectCode::AlreadyExists => "already_exists",
            RejectCode::InvalidTransition => "invalid_transition",
            RejectCode::VersionConflict => "version_conflict",
        }
    }

    /// Whether the rejection is recorded in the log as `CommandRejected`
    /// (DESIGN.md §2: every rejection decided against state; not bad input).
    pub fn is_audited(self) -> bool {
        self != RejectCode::BadRequest
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
    /// The job's state when refused, if there is such a job.
    pub state: Option<JobState>,
    /// For `version_conflict`: the job's version.
    pub current_version: Option<u64>,
}

/// A rejection without a version (every code but `version_conflict`).
pub(super) fn reject(code: RejectCode, state: Option<JobState>, message: String) -> Rejection {
    Rejection {
        code,
        message,
        state,
        current_version: None,
    }
}
