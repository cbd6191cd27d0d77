//! Audit tools over a stored log: replay as of a seq, verify the chain and
//! the projections, job history. They fold the same pure code as the live
//! server ([`crate::domain::World::evolve`], [`crate::projection`]).

pub mod logfile;
pub mod nats;
pub mod replay;
pub mod scan;
pub mod verify;
