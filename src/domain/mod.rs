//! The pure domain core: identifiers, schedules, jobs, regions, commands,
//! events, `decide` and `evolve`, and every fold of the log: the job, the
//! catalog and the world (`evolve`), a job's history, job filters.
//!
//! Nothing in here performs I/O, reads a clock or draws randomness: time and
//! ids arrive as arguments. Replay reuses exactly this code, so replay can
//! never disagree with the live system.

pub mod catalog;
pub mod command;
pub mod decide;
pub mod envelope;
mod envelope_de;
pub mod event;
pub mod filter;
pub mod history;
pub mod ids;
pub mod job;
pub mod limits;
pub mod periods;
pub mod rejection;
pub mod reply;
pub mod schedule;
pub mod timestamp;
pub mod verb;
pub mod world;

pub use catalog::{Catalog, Snapshot, SnapshotClass};
pub use command::{Command, CommandEnvelope, Fingerprint};
pub use decide::{Decision, decide};
pub use envelope::Envelope;
pub use event::Event;
pub use ids::{Name, ProjectId};
pub use job::{Deployment, DeploymentKind, Job, JobState, Phase};
pub use rejection::{RejectCode, Rejection};
pub use reply::{ErrorCode, Reply};
pub use schedule::{Schedule, SchedulePatch};
pub use verb::Verb;
pub use world::{Region, World};

#[cfg(test)]
mod scenarios;
