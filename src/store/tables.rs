//! Every redb table, typed, in one place.
//!
//! Committed together, in one write transaction per batch: the batch's
//! events, their per-job index rows, each command's idempotency record, the
//! projection rows of every job and region the batch touched, and the relay's
//! published-through cursor. So the projections are never ahead of or behind
//! the log, and a command is never half-applied.

use redb::TableDefinition;

/// seq → envelope JSON (with `hash`). Gapless from 1.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// (job_id, seq) → (): every event and rejection of a job, for history.
pub const JOB_LOG: TableDefinition<(u128, u64), ()> = TableDefinition::new("job_log");
/// command_id → idempotency record JSON (fingerprint + original reply). Kept forever.
pub const COMMANDS: TableDefinition<u128, &[u8]> = TableDefinition::new("commands");
/// job_id → job view JSON: the job-state projection.
pub const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// job_id → which days/weeks/months had their daily/weekly/monthly: the
/// class history of the snapshot-catalog projection (see `rows.rs`).
pub const CATALOGS: TableDefinition<u128, &[u8]> = TableDefinition::new("catalog_classes");
/// (job_id, snapshot_id) → snapshot JSON: the retained snapshots of the
/// snapshot-catalog projection, one row each.
pub const SNAPSHOTS: TableDefinition<(u128, u128), &[u8]> = TableDefinition::new("snapshots");
/// The name of the whole-catalog table of stores written before bcp kept
/// one row per snapshot; such a store is refused, not misread.
pub const OLD_CATALOGS: &str = "catalogs";
/// region name → region JSON: the region projection.
pub const REGIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("regions");
/// "published_seq" → the last seq the relay saw acknowledged by JetStream.
pub const CURSOR: TableDefinition<&str, u64> = TableDefinition::new("cursor");

pub const PUBLISHED_SEQ: &str = "published_seq";
