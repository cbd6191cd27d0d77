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

/// `bcp.evt.<project>.<job>.<type>`, or `bcp.evt._admin.<region>.<type>`
/// for a region event (the one rule, for [`Envelope`] and [`Routing`]).
fn subject_of(
    project: &str,
    job_id: Option<Uuid>,
    event_type: &str,
    region: Option<&str>,
) -> String {
    let key = match (region, job_id) {
        (Some(region), _) => region.to_owned(),
        (None, Some(job)) => job.to_string(),
        (None, None) => "_".to_owned(),
    };
    format!("bcp.evt.{project}.{key}.{event_type}")
}

/// What publishing an event needs, read from its stored bytes without
/// building the whole envelope (the relay's hot path).
#[derive(Deserialize)]
pub struct Routing {
    pub event_id: Uuid,
    project_id: String,
    job_id: Option<Uuid>,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    data: RoutingData,
}

#[derive(Default, Deserialize)]
struct RoutingData {
    #[serde(default)]
    region: Option<String>,
}

impl Routing {
    pub fn parse(bytes: &[u8]) -> Result<Routing, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The same subject as [`Envelope::subject`].
    pub fn subject(&self) -> String {
        let region = self
            .data
            .region
            .as_deref()
            .filter(|_| self.event_type == "RegionConfigured");
        subject_of(&self.project_id, self.job_id, &self.event_type, region)
    }
}

fn hash_of(prev_hash: &str, unhashed: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(prev_hash.as_bytes());
    h.update(unhashed);
    h.finalize().to_hex().to_string()
}

/// Append the `hash` field to canonical bytes that end with `}`.
fn with_hash(bytes: &mut Vec<u8>, hash: &str) {
    debug_assert_eq!(bytes.last(), Some(&b'}'));
    bytes.pop();
    bytes.extend_from_slice(b",\"hash\":\"");
    bytes.extend_from_slice(hash.as_bytes());
    bytes.extend_from_slice(b"\"}");
}

impl Envelope {
    /// The hash this envelope must carry, given its own `prev_hash`.
    pub fn compute_hash(&self) -> String {
        if self.hash.is_empty() {
            return hash_of(
                &self.prev_hash,
                &serde_json::to_vec(self).expect("envelope serializes"),
            );
        }
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        unhashed.compute_hash()
    }

    /// Set `prev_hash` and `hash`, linking this envelope after `prev_hash`.
    pub fn seal(&mut self, prev_hash: &str) {
        self.seal_to_json(prev_hash);
    }

    /// [`Envelope::seal`], returning the stored bytes; the envelope is
    /// serialized once (`hash` is its last field, so the stored form is the
    /// canonical bytes with `,"hash":"…"` before the closing brace).
    pub fn seal_to_json(&mut self, prev_hash: &str) -> Vec<u8> {
        self.prev_hash = prev_hash.to_owned();
        self.hash.clear();
        let mut bytes = serde_json::to_vec(self).expect("envelope serializes");
        self.hash = hash_of(prev_hash, &bytes);
        with_hash(&mut bytes, &self.hash);
        bytes
    }

    /// Check a parsed envelope against the bytes it was parsed from: its hash
    /// matches its content, and the bytes are its canonical form. One
    /// serialization, no copy of the envelope.
    pub fn check_stored(&mut self, stored: &[u8]) -> Result<(), &'static str> {
        let hash = std::mem::take(&mut self.hash);
        let mut bytes = serde_json::to_vec(self).expect("envelope serializes");
        self.hash = hash;
        if hash_of(&self.prev_hash, &bytes) != self.hash {
            return Err("hash does not match its content (edited)");
        }
        with_hash(&mut bytes, &self.hash);
        if bytes != stored {
            return Err("stored bytes are not the envelope's canonical form (edited)");
        }
        Ok(())
    }

    /// The JetStream subject: `bcp.evt.<project>.<job>.<type>`, or
    /// `bcp.evt._admin.<region>.<type>` for a region event.
    pub fn subject(&self) -> String {
        let region = match &self.event {
            Event::RegionConfigured { region, .. } => Some(region.as_str()),
            _ => None,
        };
        subject_of(
            self.project_id.as_str(),
            self.job_id,
            self.event.type_name(),
            region,
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelope serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::ProjectId;
    use chrono::TimeZone;

    #[test]
    fn sealed_bytes_are_serde_bytes_and_check_out() {
        let mut env = Envelope {
            seq: 7,
            event_id: Uuid::from_u128(1),
            schema_version: 1,
            project_id: ProjectId::parse("p1").unwrap(),
            job_id: Some(Uuid::from_u128(2)),
            job_version: Some(3),
            command_id: Uuid::from_u128(4),
            actor: Some("a \"quoted\" actor ✓".into()),
            actor_verified: false,
            recorded_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            prev_hash: String::new(),
            event: Event::JobStopped {},
            hash: String::new(),
        };
        let bytes = env.seal_to_json(GENESIS_HASH);
        assert_eq!(
            bytes,
            serde_json::to_vec(&env).unwrap(),
            "one serialization gives serde's bytes"
        );
        assert_eq!(env.compute_hash(), env.hash);
        let mut parsed: Envelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed.check_stored(&bytes), Ok(()));
        let mut edited = parsed.clone();
        edited.actor = Some("mallory".into());
        assert!(edited.check_stored(&bytes).unwrap_err().contains("hash"));
        let spaced = String::from_utf8(bytes.clone())
            .unwrap()
            .replacen(':', ": ", 1);
        assert!(
            parsed
                .check_stored(spaced.as_bytes())
                .unwrap_err()
                .contains("canonical")
        );
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;
    use crate::domain::ids::{Name, ProjectId};
    use chrono::TimeZone;

    fn sealed(project: &str, job_id: Option<Uuid>, event: Event) -> (Envelope, Vec<u8>) {
        let mut env = Envelope {
            seq: 1,
            event_id: Uuid::from_u128(9),
            schema_version: 1,
            project_id: ProjectId::parse(project).unwrap(),
            job_id,
            job_version: None,
            command_id: Uuid::from_u128(4),
            actor: None,
            actor_verified: false,
            recorded_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            prev_hash: String::new(),
            event,
            hash: String::new(),
        };
        let bytes = env.seal_to_json(GENESIS_HASH);
        (env, bytes)
    }

    #[test]
    fn routing_gives_the_envelopes_subject() {
        let eu = Name::parse("eu").unwrap();
        let cases = [
            sealed(
                "_admin",
                None,
                Event::RegionConfigured {
                    region: eu.clone(),
                    snapshot_store: None,
                    oplog_store: None,
                    sync_store: None,
                },
            ),
            sealed(
                "p1",
                Some(Uuid::from_u128(7)),
                Event::RegionAssigned { region: Some(eu) },
            ),
            sealed("p1", Some(Uuid::from_u128(7)), Event::JobStopped {}),
            sealed(
                "p1",
                None,
                Event::SnapshotsPurged {
                    snapshot_ids: vec![],
                },
            ),
        ];
        for (env, bytes) in cases {
            let r = Routing::parse(&bytes).unwrap();
            assert_eq!((r.event_id, r.subject()), (env.event_id, env.subject()));
        }
    }
}
