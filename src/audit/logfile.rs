//! Verifying a log that is not (yet) a store: JSON Lines from `bcp export`,
//! or the messages of the JetStream stream. Each event is checked as it
//! arrives (seq, chain, canonical bytes, versions) by the same
//! [`check_event`] as `audit verify` ([`super::chain`]), and folded by the
//! same pure code.

use super::chain::{AcrossEvents, Digest, check_digest, check_event};
use super::verify::VerifyError;
use crate::domain::envelope::GENESIS_HASH;
use crate::domain::{Envelope, World};
use std::io::BufRead;

/// A whole log, verified, with its fold.
pub struct Verified {
    pub log: Vec<(Envelope, Vec<u8>)>,
    pub world: World,
    pub head_hash: String,
}

impl Verified {
    pub fn head_seq(&self) -> u64 {
        self.log.len() as u64
    }

    /// Check that the log holds exactly the prefix `digest` names.
    pub fn check_digest(&self, digest: &Digest) -> Result<(), VerifyError> {
        check_digest(digest, self.head_seq(), |seq| {
            self.log.get(seq as usize - 1).map(|(e, _)| e.hash.clone())
        })
    }
}

/// Verify events arriving in order (`bytes` of seq 1, 2, …).
pub fn verify_stream(
    events: impl IntoIterator<Item = Result<Vec<u8>, VerifyError>>,
    mut progress: impl FnMut(u64),
) -> Result<Verified, VerifyError> {
    let mut world = World::default();
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut log = Vec::new();
    let mut ends = AcrossEvents::default();
    for (i, bytes) in events.into_iter().enumerate() {
        let bytes = bytes?;
        let env = check_event(i as u64 + 1, &bytes, &prev_hash, &world)?;
        ends.next(&env, &world)?;
        world.evolve(&env);
        prev_hash = env.hash.clone();
        log.push((env, bytes));
        progress(log.len() as u64);
    }
    ends.end(&world)?;
    Ok(Verified {
        log,
        world,
        head_hash: prev_hash,
    })
}

/// Verify JSON Lines (one envelope per line, in seq order).
pub fn verify_json_lines(
    reader: impl BufRead,
    progress: impl FnMut(u64),
) -> Result<Verified, VerifyError> {
    let mut n = 0u64;
    let lines = reader.split(b'\n').filter_map(|line| {
        n += 1;
        match line {
            Ok(l) if l.iter().all(u8::is_ascii_whitespace) => None,
            Ok(mut l) => {
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                Some(Ok(l))
            }
            Err(e) => Some(Err(VerifyError::BadEvent {
                seq: n,
                what: format!("cannot read line {n}: {e}"),
            })),
        }
    });
    verify_stream(lines, progress)
}
