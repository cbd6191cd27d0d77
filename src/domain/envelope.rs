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
use std::cell::RefCell;
use uuid::Uuid;

/// `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

// `Deserialize` is written by hand (`envelope_de.rs`): the derived one
// buffers every field through serde's `Content` because of the flattened
// `event`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
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
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: String,
    #[serde(flatten)]
    pub event: Event,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(required)]
    pub hash: String,
}

/// The header that carries an event's seq on the stream (beside
/// `Nats-Msg-Id`, its event id).
pub const SEQ_HEADER: &str = "Bcp-Seq";

/// `bcp.evt.<project>.<job>.<type>`, or `bcp.evt._admin.<region>.<type>`
/// for a region event (the one rule, for [`Envelope`] and [`Routing`]).
fn subject_of(
    project: &str,
    job_id: Option<Uuid>,
    event_type: &str,
    region: Option<&str>,
) -> String {
    // Built in place: the writer makes one for every event it decides.
    let mut job = Uuid::encode_buffer();
    let key = match (region, job_id) {
        (Some(region), _) => region,
        (None, Some(id)) => &*id.hyphenated().encode_lower(&mut job),
        (None, None) => "_",
    };
    ["bcp.evt.", project, ".", key, ".", event_type].concat()
}

/// Where the relay publishes an event: its subject, its id (the
/// message id JetStream deduplicates by), and its command's id (in a
/// group, a command's events are published together). Made where the
/// event is ([`Envelope::route`]) or, for an event read back from the
/// store, from its bytes ([`Routing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub event_id: Uuid,
    pub subject: String,
    pub command_id: Uuid,
}

/// What publishing an event needs, read from its stored bytes without
/// building the whole envelope: the relay's path for events read from
/// redb, and the guard's comparison of the stream with the log.
#[derive(Deserialize)]
pub struct Routing {
    pub event_id: Uuid,
    command_id: Uuid,
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

    pub fn route(&self) -> Route {
        Route {
            event_id: self.event_id,
            subject: self.subject(),
            command_id: self.command_id,
        }
    }
}

/// The chain's one rule: blake3 of `prev_hash` then the canonical bytes
/// (given in consecutive parts), as hex.
fn hash_of_parts(prev_hash: &str, unhashed: &[&[u8]]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(prev_hash.as_bytes());
    for part in unhashed {
        h.update(part);
    }
    h.finalize()
}

fn hash_of(prev_hash: &str, unhashed: &[u8]) -> String {
    hash_of_parts(prev_hash, &[unhashed]).to_hex().to_string()
}

/// What [`with_hash`] puts before the hash.
const HASH_FIELD: &[u8] = b",\"hash\":\"";

/// Append the `hash` field to canonical bytes that end with `}`.
fn with_hash(bytes: &mut Vec<u8>, hash: &str) {
    debug_assert_eq!(bytes.last(), Some(&b'}'));
    bytes.pop();
    bytes.extend_from_slice(HASH_FIELD);
    bytes.extend_from_slice(hash.as_bytes());
    bytes.extend_from_slice(b"\"}");
}

/// Stored bytes as [`with_hash`] lays them out, `head ++ ,"hash":" ++ hash
/// ++ "}`: the canonical bytes without their closing brace, and the 64
/// hex digits of the hash (`None`: not that layout).
fn split_stored(stored: &[u8]) -> Option<(&[u8], &[u8])> {
    const HEX: usize = 64;
    let split = stored.len().checked_sub(HASH_FIELD.len() + HEX + 2)?;
    let (head, suffix) = stored.split_at(split);
    let (field, rest) = suffix.split_at(HASH_FIELD.len());
    let (hash, end) = rest.split_at(HEX);
    (field == HASH_FIELD && end == b"\"}").then_some((head, hash))
}

thread_local! {
    /// The serialization buffer of [`Envelope::seal_to_json`] and
    /// [`Envelope::check_stored`], reused.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Envelope {
    /// Parse stored bytes: `serde_json::from_slice`, with UTF-8 checked once
    /// for the whole envelope instead of once per string (invalid UTF-8
    /// still gets `from_slice`'s error).
    pub fn from_json(bytes: &[u8]) -> Result<Envelope, serde_json::Error> {
        match std::str::from_utf8(bytes) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(bytes),
        }
    }

    /// Parse stored bytes for a fold that reads the state only (replay): as
    /// [`from_json`](Envelope::from_json), but `event_id`, `command_id`,
    /// `actor`, `prev_hash` and `hash` are only checked to be there (the
    /// optional ones may be missing) and hold JSON, and come back blank:
    /// nil ids, no actor, empty hashes. Parsing the two ids and copying the
    /// two hashes was about a tenth of replay's CPU. `bcp audit verify`
    /// reads and checks them.
    pub fn from_json_state(bytes: &[u8]) -> Result<Envelope, serde_json::Error> {
        fn read<'de, R: serde_json::de::Read<'de>>(
            mut de: serde_json::Deserializer<R>,
        ) -> Result<Envelope, serde_json::Error> {
            use serde::Deserializer as _;
            let visitor = super::envelope_de::EnvelopeVisitor { state_only: true };
            let env = (&mut de).deserialize_map(visitor)?;
            de.end().map(|()| env)
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => read(serde_json::Deserializer::from_str(text)),
            Err(_) => read(serde_json::Deserializer::from_slice(bytes)),
        }
    }

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
        // Serialized into the reused buffer, then copied out once at its
        // final size (a Vec grown from empty reallocated about eight times).
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            serde_json::to_writer(&mut *buf, &*self).expect("envelope serializes");
            self.hash = hash_of(prev_hash, buf);
            let mut bytes = Vec::with_capacity(buf.len() + HASH_FIELD.len() + self.hash.len() + 1);
            bytes.extend_from_slice(buf);
            with_hash(&mut bytes, &self.hash);
            debug_assert_eq!(bytes.len(), bytes.capacity());
            bytes
        })
    }

    /// Check a parsed envelope against the bytes it was parsed from: its hash
    /// matches its content, and the bytes are its canonical form.
    ///
    /// The envelope is serialized once, into a reused buffer, and compared
    /// with `stored`; when they agree, the canonical bytes *are* `stored`
    /// without its `hash` field, and those are hashed. Any disagreement takes
    /// [`Self::check_stored_slow`], so the answer, and which of the two
    /// problems it names, is exactly the slow path's.
    pub fn check_stored(&mut self, stored: &[u8]) -> Result<(), &'static str> {
        let Some(head) = split_stored(stored)
            .filter(|(_, hash)| *hash == self.hash.as_bytes())
            .map(|(head, _)| head)
        else {
            return self.check_stored_slow(stored);
        };
        let hash = std::mem::take(&mut self.hash);
        let canonical = SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            serde_json::to_writer(&mut *buf, self).expect("envelope serializes");
            buf.split_last() == Some((&b'}', head))
        });
        self.hash = hash;
        if !canonical {
            return self.check_stored_slow(stored);
        }
        if hash_of_parts(&self.prev_hash, &[head, b"}"])
            .to_hex()
            .as_str()
            != self.hash.as_str()
        {
            return Err("hash does not match its content (edited)");
        }
        Ok(())
    }

    /// The hash a stored event ends with, if it is the hash of its bytes
    /// chained to `prev_hash` (the previous event's): the link check of a
    /// reader that copies events without parsing them (`bcp export`). A
    /// byte changed anywhere in the event, or an event out of place, fails
    /// it; whether the bytes are canonical is `audit verify`'s to say.
    pub fn stored_link<'s>(prev_hash: &str, stored: &'s [u8]) -> Option<&'s str> {
        let (head, hash) = split_stored(stored)?;
        let hash = std::str::from_utf8(hash).ok()?;
        (hash_of_parts(prev_hash, &[head, b"}"]).to_hex().as_str() == hash).then_some(hash)
    }

    /// [`Self::check_stored`] by serializing into a buffer, hashing it and
    /// comparing: the definition the fast path must agree with.
    pub fn check_stored_slow(&mut self, stored: &[u8]) -> Result<(), &'static str> {
        let hash = std::mem::take(&mut self.hash);
        let canonical = serde_json::to_vec(self).expect("envelope serializes");
        self.hash = hash;
        // The form first: bytes that are not the canonical form (a field
        // bcp does not write, an escape it does not use) are named so, also
        // when their hash was made over them.
        let mut stored_form = canonical.clone();
        with_hash(&mut stored_form, &self.hash);
        if stored_form != stored {
            return Err("stored bytes are not the envelope's canonical form (edited)");
        }
        if hash_of(&self.prev_hash, &canonical) != self.hash {
            return Err("hash does not match its content (edited)");
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

    /// Where the relay publishes this event: the same [`Route`] as
    /// [`Routing::route`] of its stored bytes.
    pub fn route(&self) -> Route {
        Route {
            event_id: self.event_id,
            subject: self.subject(),
            command_id: self.command_id,
        }
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
        // A value edited in the bytes, its hash kept: canonical, not its hash.
        let edited = String::from_utf8(bytes.clone())
            .unwrap()
            .replacen("quoted", "QUOTED", 1);
        let mut reparsed: Envelope = serde_json::from_str(&edited).unwrap();
        let why = reparsed.check_stored(edited.as_bytes()).unwrap_err();
        assert!(why.contains("hash"), "{why}");
        // Bytes not in the canonical form, hashed as they are: the form is
        // what is named.
        let mut rehashed: Envelope = serde_json::from_slice(&bytes).unwrap();
        let loose = String::from_utf8(bytes.clone())
            .unwrap()
            .replacen(':', ": ", 1);
        let head = &loose[..loose.rfind(",\"hash\"").unwrap()];
        rehashed.hash = hash_of(GENESIS_HASH, format!("{head}}}").as_bytes());
        let loose = format!("{head},\"hash\":\"{}\"}}", rehashed.hash);
        let why = rehashed.check_stored(loose.as_bytes()).unwrap_err();
        assert!(why.contains("canonical"), "{why}");
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
    fn routing_gives_the_envelopes_route() {
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
            // What the writer hands the relay equals what the relay reads
            // back from the store.
            assert_eq!(r.route(), env.route());
        }
    }

    #[test]
    fn every_event_type_routes_alike_from_its_envelope_and_its_bytes() {
        let events = super::equivalence_tests::events();
        assert!(events.len() >= 15, "every event type");
        for event in events {
            for (project, job) in [("p1", Some(Uuid::from_u128(7))), ("_admin", None)] {
                let (env, bytes) = sealed(project, job, event.clone());
                let route = env.route();
                assert_eq!(Routing::parse(&bytes).unwrap().route(), route);
                assert_eq!(
                    (route.event_id, &route.subject),
                    (env.event_id, &env.subject())
                );
            }
        }
    }
}

/// The hand `Deserialize` and the fast `check_stored` against what they
/// replace (the derived impl with `flatten`, `check_stored_slow`), on every
/// event type and on many corruptions of their stored bytes.
#[cfg(test)]
mod equivalence_tests {
    use super::super::envelope_de::derived::Flattened;
    use super::*;
    use crate::domain::catalog::SnapshotClass;
    use crate::domain::ids::{Name, ProjectId};
    use crate::domain::job::{Deployment, DeploymentKind, JobState, Phase};
    use crate::domain::rejection::RejectCode;
    use crate::domain::schedule::Schedule;
    use crate::domain::verb::Verb;
    use chrono::TimeZone;

    /// One event of every type.
    pub(super) fn events() -> Vec<Event> {
        let t = Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap();
        let eu = Name::parse("eu").unwrap();
        vec![
            Event::JobCreated {
                deployment: Deployment {
                    kind: DeploymentKind::Shard,
                    name: "sh\"0\\ ✓".into(),
                    cluster: Some("c1".into()),
                },
                schedule: Schedule::default(),
                region: Some(eu.clone()),
            },
            Event::JobStarted {
                phase: Phase::InitialSync,
                state: JobState::Misconfigured,
                reason: Some("region eu lacks sync_store".into()),
            },
            Event::JobStarted {
                phase: Phase::Incremental,
                state: JobState::Active,
                reason: None,
            },
            Event::JobStopped {},
            Event::JobTerminated {},
            Event::SnapshotsPurged {
                snapshot_ids: vec![Uuid::from_u128(5), Uuid::from_u128(6)],
            },
            Event::RegionAssigned { region: None },
            Event::JobMisconfigured { reason: "x".into() },
            Event::JobReconfigured {
                reason: "y".into(),
                phase: Phase::Incremental,
            },
            Event::ScheduleChanged {
                schedule: Schedule::default(),
            },
            Event::SnapshotRecorded {
                snapshot_id: Uuid::from_u128(8),
                taken_at: t + chrono::Duration::nanoseconds(123_456_789),
                size_bytes: u64::MAX,
                classes: vec![SnapshotClass::Base, SnapshotClass::Monthly],
                expires_at: t + chrono::Duration::days(28),
            },
            Event::SnapshotDeleted {
                snapshot_id: Uuid::from_u128(9),
            },
            Event::SnapshotExpiryChanged {
                snapshot_id: Uuid::from_u128(9),
                expires_at: t,
                do_not_delete: true,
            },
            Event::SnapshotExpired {
                snapshot_id: Uuid::from_u128(9),
                expires_at: t + chrono::Duration::microseconds(1),
            },
            Event::RegionConfigured {
                region: eu.clone(),
                snapshot_store: Some(eu.clone()),
                oplog_store: None,
                sync_store: Some(eu),
            },
            Event::CommandRejected {
                verb: Verb::Start,
                code: RejectCode::InvalidTransition,
                reason: "no".into(),
                state: Some(JobState::Stopped),
                expected_version: Some(3),
                current_version: None,
            },
        ]
    }

    fn sealed_logs() -> Vec<Vec<u8>> {
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let mut prev = GENESIS_HASH.to_owned();
        events()
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                let mut env = Envelope {
                    seq: i as u64 + 1,
                    event_id: Uuid::from_u128(i as u128 + 100),
                    schema_version: 1,
                    project_id: ProjectId::parse("p-1").unwrap(),
                    job_id: (i % 3 != 0).then(|| Uuid::from_u128(2)),
                    job_version: (i % 2 == 0).then_some(i as u64),
                    command_id: Uuid::from_u128(4),
                    actor: (i % 4 != 1).then(|| format!("actor \"{i}\" ✓")),
                    actor_verified: i % 5 == 0,
                    recorded_at: t + chrono::Duration::microseconds(i as i64 * 1_000_001),
                    prev_hash: String::new(),
                    event,
                    hash: String::new(),
                };
                let bytes = env.seal_to_json(&prev);
                prev = env.hash;
                bytes
            })
            .collect()
    }

    /// Both impls agree on `bytes`: both refuse, or both give the same
    /// envelope, and then both checks of it give the same answer.
    /// And the state-only read takes whatever the full one takes, giving
    /// the same envelope with its ids, actor and hashes blank.
    fn agree(bytes: &[u8], original: &[u8]) {
        let ours = serde_json::from_slice::<Envelope>(bytes);
        let theirs = serde_json::from_slice::<Flattened>(bytes).map(Envelope::from);
        let show = String::from_utf8_lossy(bytes);
        match (&ours, Envelope::from_json_state(bytes)) {
            (Ok(full), Ok(state)) => assert_eq!(state, blank(full.clone()), "{show}"),
            (Ok(_), Err(e)) => panic!("{show}: the state-only read refused: {e}"),
            (Err(_), _) => {}
        }
        match (ours, theirs) {
            (Ok(mut a), Ok(b)) => {
                assert_eq!(a, b, "{show}");
                let mut b = b;
                for stored in [bytes, original] {
                    assert_eq!(
                        a.check_stored(stored),
                        b.check_stored_slow(stored),
                        "{show}"
                    );
                }
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!("{show}: ours {a:?}, derived {b:?}"),
        }
    }

    /// What [`Envelope::from_json_state`] leaves of `env`.
    fn blank(env: Envelope) -> Envelope {
        Envelope {
            event_id: Uuid::nil(),
            command_id: Uuid::nil(),
            actor: None,
            prev_hash: String::new(),
            hash: String::new(),
            ..env
        }
    }

    /// The state-only read skips the values of the fields no fold reads,
    /// and nothing else: a required one missing, or twice, is still an
    /// error, as is any other field of the wrong shape.
    #[test]
    fn the_state_only_read_checks_what_it_skips_is_there_and_the_rest_whole() {
        let bytes = sealed_logs().swap_remove(3);
        let text = String::from_utf8(bytes.clone()).unwrap();
        let full = Envelope::from_json(&bytes).unwrap();
        assert_eq!(
            Envelope::from_json_state(&bytes).unwrap(),
            blank(full.clone())
        );
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let edited = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
            let mut v = value.clone();
            edit(v.as_object_mut().unwrap());
            serde_json::to_vec(&v).unwrap()
        };
        // Skipped values: accepted whatever they hold.
        for field in ["event_id", "command_id", "actor", "prev_hash", "hash"] {
            let odd = edited(&|m| {
                m.insert(field.into(), serde_json::json!({"not": ["a", field]}));
            });
            assert!(Envelope::from_json(&odd).is_err(), "{field}");
            assert_eq!(
                Envelope::from_json_state(&odd).unwrap(),
                blank(full.clone()),
                "{field}"
            );
        }
        // Refused alike: required fields missing, fields twice, state
        // fields of the wrong shape, data that is not the type's.
        let mut refused: Vec<(String, Vec<u8>)> = ["event_id", "command_id", "prev_hash", "seq"]
            .into_iter()
            .map(|f| (format!("no {f}"), edited(&|m| drop(m.remove(f)))))
            .collect();
        for field in ["event_id", "hash", "seq", "data"] {
            let at = text.find(&format!("\"{field}\":")).unwrap();
            let twice = format!("{}\"{field}\":null,{}", &text[..at], &text[at..]);
            refused.push((format!("{field} twice"), twice.into_bytes()));
        }
        for (field, bad) in [
            ("seq", serde_json::json!("1")),
            ("job_id", serde_json::json!("x")),
            ("recorded_at", serde_json::json!("yesterday")),
            ("data", serde_json::json!(5)),
        ] {
            refused.push((
                format!("{field}: {bad}"),
                edited(&|m| drop(m.insert(field.into(), bad.clone()))),
            ));
        }
        for (what, bytes) in refused {
            assert!(Envelope::from_json(&bytes).is_err(), "full read, {what}");
            assert!(
                Envelope::from_json_state(&bytes).is_err(),
                "state-only read, {what}"
            );
        }
    }

    #[test]
    fn hand_deserialize_and_fast_check_agree_with_the_originals() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut mutants = 0;
        for bytes in sealed_logs() {
            agree(&bytes, &bytes);
            let mut env: Envelope = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(env.check_stored(&bytes), Ok(()));
            let text = String::from_utf8(bytes.clone()).unwrap();
            // Reordered, renamed, repeated and extra fields.
            let data_at = text.find(",\"data\":").unwrap();
            let hash_at = text.find(",\"hash\":").unwrap();
            let type_at = text.find(",\"type\":").unwrap();
            let data_first = format!(
                "{}{}{}{}",
                &text[..type_at],
                &text[data_at..hash_at],
                &text[type_at..data_at],
                &text[hash_at..]
            );
            let edits = [
                data_first,
                text.replacen("{", "{\"extra\":[1,{\"a\":null}],", 1),
                text.replacen("{", "{\"seq\":1,", 1),
                text.replacen("{", "{\"type\":\"JobStopped\",", 1),
                text.replacen(",\"data\":", ",\"data\":{},\"data\":", 1),
                text.replacen(",\"hash\":", ",\"hash\":\"\",\"hash\":", 1),
                text[..data_at].to_owned() + &text[hash_at..],
                text[..type_at].to_owned() + &text[data_at..],
                text.replacen(",\"hash\":", ",\"hash\":\"x\",\"h\":", 1),
                text.replacen(",\"job_id\":null", "", 1),
                text.replacen(",\"actor\":null", "", 1),
                text.replacen("\"actor_verified\":true,", "", 1),
                text.replacen("\"actor_verified\":true", "\"actor_verified\":false", 1),
                text.replacen("Z\"", "+00:00\"", 1),
                text.replacen("Z\"", "z\"", 1),
                text.replacen(".", ".0", 1),
                text.replacen(":", ": ", 1),
                text.clone() + " ",
                format!(" {text}"),
            ];
            for e in &edits {
                agree(e.as_bytes(), &bytes);
                mutants += 1;
            }
            // Byte-level corruption.
            let alphabet = b"{}[]\",:0123456789.-+eEZTtrufalsn \\xu";
            for _ in 0..400 {
                let mut m = bytes.clone();
                for _ in 0..=next(2) {
                    let i = next(m.len());
                    match next(4) {
                        0 => m[i] = alphabet[next(alphabet.len())],
                        1 => {
                            m.remove(i);
                        }
                        2 => m.insert(i, alphabet[next(alphabet.len())]),
                        _ => {
                            let j = next(m.len());
                            m.swap(i, j);
                        }
                    }
                }
                agree(&m, &bytes);
                mutants += 1;
            }
        }
        assert!(mutants > 6000);
    }
}
