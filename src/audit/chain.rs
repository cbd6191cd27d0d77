//! The hash chain's checks and the log's digest, one definition for every
//! reader of a log: a store (`audit verify`, [`super::verify`]), JSON Lines
//! or the stream's messages ([`super::logfile`]).
//!
//! An event is checked in order against the one before it: it is at the
//! expected seq (no gap, no reorder), its `prev_hash` is the previous
//! event's hash, its bytes are its canonical form with the right hash, and
//! its job version follows the job's, and the state machine allows it
//! where it stands ([`World::admits`]). A [`Digest`] (`SEQ:HASH`) names a
//! prefix the log must still hold.

use super::verify::VerifyError;
use crate::domain::event::SCHEMA_VERSION;
use crate::domain::{Envelope, World};

/// `SEQ:HASH`, as printed by `bcp audit digest`: the log must still hold
/// exactly this prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Digest, String> {
        let (seq, hash) = s.split_once(':').ok_or("a digest is SEQ:HASH")?;
        let seq = seq
            .parse()
            .map_err(|_| format!("digest seq {seq:?} is not a number"))?;
        if seq == 0 {
            // Seq 0 is the empty log: there is no event to compare.
            return Err("a digest's seq is an event's, 1 or more".into());
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("digest hash must be 64 hex digits".into());
        }
        Ok(Digest {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// A log ending at `head_seq`, with `hash_at` the hash of the event at a
/// seq, holds exactly the prefix `digest` names.
pub fn check_digest(
    digest: &Digest,
    head_seq: u64,
    hash_at: impl Fn(u64) -> Option<String>,
) -> Result<(), VerifyError> {
    let bad = |what: String| VerifyError::BadEvent {
        seq: digest.seq,
        what,
    };
    if digest.seq > head_seq {
        return Err(bad(format!(
            "the log ends at seq {head_seq}, before the digest's seq (truncated)"
        )));
    }
    match hash_at(digest.seq) {
        Some(h) if h == digest.hash => Ok(()),
        Some(h) => Err(bad(format!("hash is {h}, the digest says {}", digest.hash))),
        None => Err(bad("missing".into())),
    }
}

/// The store holds the event expected at `expected_seq` under `key`: any
/// other key means that event is missing (a gap).
pub fn check_key(expected_seq: u64, key: u64) -> Result<(), VerifyError> {
    if key != expected_seq {
        return Err(VerifyError::BadEvent {
            seq: expected_seq,
            what: format!("missing; the next stored seq is {key}"),
        });
    }
    Ok(())
}

/// The envelope expected at `expected_seq` says it is there (no gap, no
/// reorder).
pub fn check_seq(expected_seq: u64, env: &Envelope) -> Result<(), VerifyError> {
    if env.seq != expected_seq {
        return Err(VerifyError::BadEvent {
            seq: expected_seq,
            what: format!("envelope says seq {} (gap or reorder)", env.seq),
        });
    }
    Ok(())
}

/// `env`'s job version, if it has one, follows its job's in `world`.
pub fn check_version(env: &Envelope, world: &World) -> Result<(), VerifyError> {
    world
        .version_follows(env)
        .map_err(|what| VerifyError::BadEvent { seq: env.seq, what })
}

/// What [`check_event`] finds in an event's bytes alone: it parses, and
/// what [`Envelope::check_stored`] says of them. Independent of every other
/// event, so [`verify`](super::verify::verify) computes it on worker threads.
pub struct Parsed(Result<(Envelope, Result<(), &'static str>), String>);

impl Parsed {
    pub fn of(bytes: &[u8]) -> Parsed {
        Parsed(match Envelope::from_json(bytes) {
            Ok(mut env) => {
                let stored = env.check_stored(bytes);
                Ok((env, stored))
            }
            Err(e) => Err(format!("does not parse: {e}")),
        })
    }
}

/// Checks one envelope after `prev_hash`, against the fold so far.
pub fn check_event(
    expected_seq: u64,
    bytes: &[u8],
    prev_hash: &str,
    world: &World,
) -> Result<Envelope, VerifyError> {
    let parsed = Parsed::of(bytes);
    check_parsed(expected_seq, &parsed, prev_hash, world)?;
    match parsed.0 {
        Ok((env, _)) => Ok(env),
        Err(_) => unreachable!("check_parsed passed an event that does not parse"),
    }
}

/// [`check_event`] given what the event's bytes alone say: the checks
/// happen, and the first failing one is named, in the same order.
pub fn check_parsed<'p>(
    expected_seq: u64,
    parsed: &'p Parsed,
    prev_hash: &str,
    world: &World,
) -> Result<&'p Envelope, VerifyError> {
    let bad = |what: String| VerifyError::BadEvent {
        seq: expected_seq,
        what,
    };
    let (env, stored) = parsed.0.as_ref().map_err(|e| bad(e.clone()))?;
    check_seq(expected_seq, env)?;
    if env.prev_hash != prev_hash {
        return Err(bad("prev_hash does not match the previous event's hash (an event before it was removed, reordered or edited)".into()));
    }
    stored.map_err(|what| bad(what.to_owned()))?;
    if !(1..=SCHEMA_VERSION).contains(&env.schema_version) {
        return Err(bad(format!(
            "schema_version {} is not one this bcp reads (1 to {SCHEMA_VERSION}): written by a later bcp, or edited",
            env.schema_version
        )));
    }
    check_version(env, world)?;
    world.admits(env).map_err(|why| {
        bad(format!(
            "{} is not a decision the log before it allows: {why}",
            env.event.type_name()
        ))
    })?;
    Ok(env)
}

/// What no single event shows, checked across them in seq order: no
/// event id twice (the relay publishes each under its id, and JetStream
/// drops a second one as a duplicate), `recorded_at` never earlier than the
/// event before (so "as of a time" is a prefix), and what a command's events
/// must leave done by its last one, checked when the next command's first
/// event comes and at the log's end: a terminated job's catalog purged, and
/// after a region's stores changed, each of its running jobs Active exactly
/// while the region has every store. The write path appends a command's
/// events together, so a log cut inside one (a file cut at a line, a copy
/// taken mid-command) leaves these undone, and its fold a state no decision
/// makes; [`World::admits`] alone finds that only at a later event of the
/// same job, and never at the log's end.
#[derive(Default)]
pub struct AcrossEvents {
    event_ids: std::collections::HashSet<u128, std::hash::BuildHasherDefault<IdHasher>>,
    recorded_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The command whose events are being read, and what they left to do:
    /// (seq of the event that asks it, what).
    command: Option<uuid::Uuid>,
    owed: Vec<(u64, Owed)>,
}

enum Owed {
    Purge(uuid::Uuid),
    Region(crate::domain::ids::Name),
}

impl AcrossEvents {
    /// Room for the ids of `events` events.
    pub fn with_capacity(events: usize) -> AcrossEvents {
        AcrossEvents {
            event_ids: std::collections::HashSet::with_capacity_and_hasher(
                events,
                Default::default(),
            ),
            ..Default::default()
        }
    }

    /// `env` is the next event, `world` the fold before it.
    pub fn next(&mut self, env: &Envelope, world: &World) -> Result<(), VerifyError> {
        let bad = |what: String| VerifyError::BadEvent { seq: env.seq, what };
        if !self.event_ids.insert(env.event_id.as_u128()) {
            return Err(bad(format!(
                "its event_id {} is an earlier event's",
                env.event_id
            )));
        }
        if let Some(before) = self.recorded_at.filter(|t| env.recorded_at < *t) {
            return Err(bad(format!(
                "recorded_at {} is earlier than the event before it ({})",
                env.recorded_at.to_rfc3339(),
                before.to_rfc3339()
            )));
        }
        self.recorded_at = Some(env.recorded_at);
        if self.command != Some(env.command_id) {
            self.end(world)?;
            self.command = Some(env.command_id);
        }
        match &env.event {
            crate::domain::Event::JobTerminated {} => {
                let job = env.job_id.expect("admitted: a JobTerminated names its job");
                self.owed.push((env.seq, Owed::Purge(job)));
            }
            crate::domain::Event::RegionConfigured { region, .. } => {
                self.owed.push((env.seq, Owed::Region(region.clone())));
            }
            _ => {}
        }
        Ok(())
    }

    /// The command read last ends here: what it owed is done in `world`.
    pub fn end(&mut self, world: &World) -> Result<(), VerifyError> {
        use crate::domain::JobState::{Active, Misconfigured};
        let command = self.command.take();
        for (seq, owed) in self.owed.drain(..) {
            let undone = match owed {
                Owed::Purge(job) => world
                    .catalogs
                    .get(&job)
                    .filter(|c| !c.snapshots.is_empty())
                    .map(|c| {
                        format!(
                            "job {job} is terminated and its {} snapshots were not purged",
                            c.snapshots.len()
                        )
                    }),
                Owed::Region(region) => {
                    let ready = world.region_ready(Some(&region));
                    world
                        .jobs
                        .values()
                        .find(|j| {
                            j.region.as_ref() == Some(&region)
                                && matches!(j.state, Active | Misconfigured)
                                && (j.state == Active) != ready
                        })
                        .map(|j| {
                            format!(
                                "job {} is left {} in region {region}, which {} every store",
                                j.job_id,
                                j.state,
                                if ready { "has" } else { "lacks" }
                            )
                        })
                }
            };
            if let Some(what) = undone {
                let command = command.map_or_else(String::new, |c| format!(" {c}"));
                return Err(VerifyError::BadEvent {
                    seq,
                    what: format!(
                        "the events of its command{command} end before it is complete ({what}): the log was cut inside a command"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The hasher of [`AcrossEvents`]'s event ids: UUIDs, whose bits are
/// mostly random already, so a multiply mixes them enough; SipHash's cost
/// (a million ids in verify's fold) buys nothing here.
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, n: u128) {
        let x = (n as u64) ^ ((n >> 64) as u64);
        let h = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
