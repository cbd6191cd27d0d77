//! Verifying a log that is not (yet) a store: JSON Lines from `bcp export`,
//! or the messages of the JetStream stream. Each event is checked as it
//! arrives (seq, chain, canonical bytes, versions) by the same
//! [`check_event`] as `audit verify` ([`super::chain`]), and folded by the
//! same pure code.

use super::chain::{AcrossEvents, Digest, check_digest, check_event};
use super::verify::VerifyError;
use crate::domain::envelope::GENESIS_HASH;
use crate::domain::{Envelope, World};
use std::io::{BufRead, Read};

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

/// The longest line [`verify_json_lines`] reads: far above any event bcp
/// writes (a terminate's purge of the 4,000 snapshots a catalog holds at
/// most is about 160 KB), so that a file that is not a log (one line of
/// hundreds of MB) is refused before it is held in memory.
pub const LOG_LINE_BYTES_MAX: u64 = 64 << 20;

/// Verify JSON Lines (one envelope per line, in seq order).
pub fn verify_json_lines(
    mut reader: impl BufRead,
    progress: impl FnMut(u64),
) -> Result<Verified, VerifyError> {
    let mut n = 0u64;
    let lines = std::iter::from_fn(move || {
        loop {
            n += 1;
            let mut line = Vec::new();
            let read = (&mut reader)
                .take(LOG_LINE_BYTES_MAX + 1)
                .read_until(b'\n', &mut line);
            match read {
                Ok(0) => return None,
                Ok(_) if line.len() as u64 > LOG_LINE_BYTES_MAX => {
                    return Some(Err(VerifyError::BadEvent {
                        seq: n,
                        what: format!(
                            "line {n} is longer than {} MiB: not an event",
                            LOG_LINE_BYTES_MAX >> 20
                        ),
                    }));
                }
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(Ok(line));
                }
                Err(e) => {
                    return Some(Err(VerifyError::BadEvent {
                        seq: n,
                        what: format!("cannot read line {n}: {e}"),
                    }));
                }
            }
        }
    });
    verify_stream(lines, progress)
}
