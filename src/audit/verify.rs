//! `bcp audit verify`: the log is gapless from seq 1, every hash links to the
//! one before, every stored envelope is byte-for-byte its canonical form,
//! per-job versions count up by one, and the stored projections equal a full
//! rebuild. Reports the first bad seq.

use super::logfile::{Digest, check_digest};
use crate::domain::envelope::GENESIS_HASH;
use crate::domain::{Envelope, World};
use crate::store::{Store, StoreError};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Report {
    pub events: u64,
    pub head_seq: u64,
    pub head_hash: String,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("seq {seq}: {what}")]
    BadEvent { seq: u64, what: String },
    #[error("projection differs from a rebuild of the log: {0}")]
    Projection(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VerifyError {
    pub fn seq(&self) -> Option<u64> {
        match self {
            VerifyError::BadEvent { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// Checks one envelope after `prev_hash`, against the fold so far.
pub fn check_event(
    expected_seq: u64,
    bytes: &[u8],
    prev_hash: &str,
    world: &World,
) -> Result<Envelope, VerifyError> {
    let bad = |what: String| VerifyError::BadEvent {
        seq: expected_seq,
        what,
    };
    let mut env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("does not parse: {e}")))?;
    if env.seq != expected_seq {
        return Err(bad(format!(
            "envelope says seq {} (gap or reorder)",
            env.seq
        )));
    }
    if env.prev_hash != prev_hash {
        return Err(bad("prev_hash does not match the previous event's hash (an event before it was removed, reordered or edited)".into()));
    }
    env.check_stored(bytes)
        .map_err(|what| bad(what.to_owned()))?;
    if let (Some(job), Some(v)) = (env.job_id, env.job_version) {
        let current = world.jobs.get(&job).map_or(0, |j| j.version);
        if v != current + 1 {
            return Err(bad(format!(
                "job {job} version {v} follows version {current}"
            )));
        }
    }
    Ok(env)
}

/// Verify a store; with a digest, also that the log still holds exactly the
/// prefix it names. `progress` sees the count of events checked.
pub fn verify(
    store: &Store,
    digest: Option<&Digest>,
    mut progress: impl FnMut(u64),
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let mut digest_hash = None;
    let mut world = World::default();
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut seq = 0u64;
    let mut failure = None;
    store.for_each_event(|key, bytes| {
        seq += 1;
        if key != seq {
            failure = Some(VerifyError::BadEvent {
                seq,
                what: format!("missing; the next stored seq is {key}"),
            });
            return Ok(false);
        }
        match check_event(seq, bytes, &prev_hash, &world) {
            Ok(env) => {
                world.evolve(&env);
                if digest.is_some_and(|d| d.seq == seq) {
                    digest_hash = Some(env.hash.clone());
                }
                prev_hash = env.hash;
                progress(seq);
                Ok(true)
            }
            Err(e) => {
                failure = Some(e);
                Ok(false)
            }
        }
    })?;
    if let Some(f) = failure {
        return Err(f);
    }
    if let Some(d) = digest {
        check_digest(d, seq, |_| digest_hash.clone())?;
    }
    let stored = store.load_world()?;
    if stored != world {
        return Err(VerifyError::Projection(describe_difference(
            &stored, &world,
        )));
    }
    Ok(Report {
        events: seq,
        head_seq: seq,
        head_hash: prev_hash,
        elapsed: started.elapsed(),
    })
}

fn describe_difference(stored: &World, rebuilt: &World) -> String {
    for (id, job) in &rebuilt.jobs {
        match stored.jobs.get(id) {
            None => return format!("job {id} is missing from the stored projection"),
            Some(s) if s != job => return format!("job {id}: stored {s:?}, rebuilt {job:?}"),
            _ => {}
        }
    }
    if let Some(id) = stored.jobs.keys().find(|id| !rebuilt.jobs.contains_key(id)) {
        return format!("stored job {id} has no events in the log");
    }
    "regions differ".to_owned()
}
