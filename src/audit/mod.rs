//! Audit tools over a stored log: replay as of a seq, verify the chain, the
//! projections and the idempotency records, job history. They fold the same pure code as the live
//! server ([`crate::domain::World::evolve`], [`crate::domain::history`]).

pub mod chain;
pub mod logfile;
pub mod nats;
pub mod records;
pub mod replay;
pub mod scan;
pub mod verify;
