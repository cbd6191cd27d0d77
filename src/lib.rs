//! bcp: an event-sourced control plane for backup jobs.
//!
//! Where to start reading: [`domain`] holds the pure core (`decide` and
//! `evolve` over the job state machine of DOMAIN.md); [`store`] appends what
//! the core decides to the redb log in one durable transaction per batch;
//! [`service`] is the only async code (NATS intake, the single writer, the
//! outbox relay to JetStream, queries); [`audit`] folds the same pure code over
//! the stored log for replay and verification. Arrows point inward: the edges
//! depend on the core, never the reverse.

pub mod audit;
pub mod domain;
pub mod projection;
pub mod schema;
pub mod service;
pub mod store;
