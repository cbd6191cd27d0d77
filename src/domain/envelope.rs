//! The event envelope (DESIGN.md §3) and its hash chain.
//!
//! `hash = blake3(prev_hash ‖ canonical bytes of the envelope without hash)`,
//! where the canonical bytes are serde_json's serialization of the typed
//! envelope with `hash` left out. Parsing and re-serializing a stored envelope
//! reproduces those bytes exactly, so any edit, removal or reorder is caught.

use super::event::Event;
use super::ids::ProjectId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Envelope {
    pub seq: u64,
    pub event_id: Uuid,
    pub schema_version: u32,
    pub project_id: ProjectId,
    pub job_id: Option<Uuid>,
    /// Per-job version after this event; null for events that change no job.
    pub job_version: Option<u64>,
    pub command_id: Uuid,
    pub actor: Option<String>,
    /// True when `actor` is an identity NATS authenticated (a producer behind
    /// a service import with `share: true`); absent when it was supplied by
    /// the producer (body or `Bcp-Actor` header) and is unverified.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub actor_verified: bool,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: String,
    #[serde(flatten)]
    pub event: Event,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(required)]
    pub hash: String,
}

impl Envelope {
    /// The hash this envelope must carry, given its own `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        let body = serde_json::to_vec(&unhashed).expect("envelope serializes");
        let mut h = blake3::Hasher::new();
        h.update(self.prev_hash.as_bytes());
        h.update(&body);
        h.finalize().to_hex().to_string()
    }

    /// Set `prev_hash` and `hash`, linking this envelope after `prev_hash`.
    pub fn seal(&mut self, prev_hash: &str) {
        self.prev_hash = prev_hash.to_owned();
        self.hash.clear();
        self.hash = self.compute_hash();
    }

    /// The JetStream subject: `bcp.evt.<project>.<job>.<type>`, or
    /// `bcp.evt._admin.<region>.<type>` for a region event.
    pub fn subject(&self) -> String {
        let key = match (&self.event, self.job_id) {
            (Event::RegionConfigured { region, .. }, _) => region.to_string(),
            (_, Some(job)) => job.to_string(),
            (_, None) => "_".to_owned(),
        };
        format!(
            "bcp.evt.{}.{}.{}",
            self.project_id,
            key,
            self.event.type_name()
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelope serializes")
    }
}
