//! Every redb table, typed, in one place.
//!
//! Committed together, in one write transaction per batch: the batch's
//! events, each command's idempotency record, the rows of every region the
//! batch touched. So a command is never half-applied. The rows of the jobs
//! it touched are committed state at the same moment, but written to
//! [`JOB_ROWS`] by a later commit (at most
//! [`ROWS_BEHIND_MAX`](super::behind::ROWS_BEHIND_MAX) events later), and
//! read until then from memory: see [`behind`](super::behind).
//!
//! A job's rows (its view, its catalog, its event index) share one table,
//! keyed by job first, so one command dirties one B-tree leaf for its job
//! rather than one leaf in each of four trees: with `Durability::Immediate`
//! every dirtied page is written and fsynced per batch.

use redb::TableDefinition;

/// seq → envelope JSON (with `hash`). Gapless from 1.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// command_id → idempotency record (fingerprint + original reply; compact,
/// `rows::record_row`), or largest command_id → a pack of records
/// ([`commands`](super::commands)). Kept forever; a recent command's
/// record is in [`RECENT`] until a sweep merges it here.
pub const COMMANDS: TableDefinition<u128, &[u8]> = TableDefinition::new("commands");
/// ordinal → command_id (16 bytes, big-endian) ‖ idempotency record: the
/// records of recent commands in commit order, merged into [`COMMANDS`]
/// later in key order ([`records`](super::records)). A store without it
/// (written before it) has none.
pub const RECENT: TableDefinition<u64, &[u8]> = TableDefinition::new("recent_commands");
/// (job_id, kind, sub) → row: everything bcp keeps per job, see [`JobRow`].
pub const JOB_ROWS: TableDefinition<(u128, u8, u128), &[u8]> = TableDefinition::new("job_rows");
/// region name → region JSON: the region projection.
pub const REGIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("regions");
/// [`ROWS_AT`] → the seq `JOB_ROWS` was last made current at (a clean
/// close); the first commit after it removes the key. A store opened
/// without the key was being written when it stopped and is caught up
/// from its log (`behind.rs`). Stores from before rows were written behind
/// lack the table: their rows are always current.
pub const CHECKPOINT: TableDefinition<&str, u64> = TableDefinition::new("checkpoint");
/// The key of [`CHECKPOINT`] for the job rows.
pub const ROWS_AT: &str = "rows_at";
/// The key of [`CHECKPOINT`] present (its value: the head then) once a
/// single-mode `bcp serve` took this store's commands, until a group node
/// finds every event of it in the stream. A single-mode bcp acknowledges a
/// command before the stream has it, so a group node must not drop a tail
/// of such a store as "never acknowledged".
pub const SERVED_SINGLE: &str = "served_in_single_mode";
/// The key of [`CHECKPOINT`] present (its value: the head then) once the
/// store's snapshot rows hold several snapshots each (`rows.rs`); a store
/// without it is rewritten so when opened for writing
/// (`Store::chunk_snapshot_rows`).
pub const SNAPSHOT_ROWS: &str = "snapshot_rows_chunked";
/// The key of [`CHECKPOINT`] present (its value: the head then) once the
/// store keeps a job of a small catalog in one combined row
/// (`rows::Layout::Combined`); a store without it is rewritten so when
/// opened for writing (`Store::combine_job_rows`).
pub const COMBINED_ROWS: &str = "job_rows_combined";
/// The key of [`CHECKPOINT`] in a group node's store: the last seq it
/// knows the stream acknowledged (it applied it from the stream, found it
/// there, or had it acknowledged as leader). A group node never drops the
/// events up to it as "never acknowledged": a stream without them lost
/// them, and this store may be the last place that holds them.
pub const ACKNOWLEDGED: &str = "stream_acknowledged";
/// The key of [`CHECKPOINT`] for the records: the last ordinal of
/// [`RECENT`] the sweep under way merges (absent: none runs).
pub const SWEEP_TO: &str = "records_sweep_to";
// Stores written before the relay cursor was removed also hold a table
// "cursor" (the last seq JetStream acknowledged); nothing reads it: the
// relay always resumes from the stream's own last sequence.

/// The kinds of row in [`JOB_ROWS`], and what `sub` is for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum JobRow {
    /// sub 0 → the job view (compact, `rows::job_row`): the job-state
    /// projection; for a job of a small catalog, the view with its catalog
    /// (`rows::combined_row`), and no class or snapshot rows.
    Job = 0,
    /// sub 0 → which days/weeks/months had their daily/weekly/monthly: the
    /// class history of the snapshot catalog (`rows.rs`).
    Classes = 1,
    /// sub 0 or a snapshot's id → the retained snapshots from that one on
    /// ([`rows::snapshot_chunks`](super::rows::snapshot_chunks)); in a
    /// store written before (no [`SNAPSHOT_ROWS`]): sub snapshot_id → that
    /// snapshot alone.
    Snapshot = 2,
    /// sub seq → the seqs from `sub` on that the row holds (`rows::index_row`;
    /// empty: `sub` alone): every event and rejection of the job, for
    /// history, in rows that do not overlap.
    Event = 3,
}

impl JobRow {
    pub fn key(self, job_id: u128, sub: u128) -> (u128, u8, u128) {
        (job_id, self as u8, sub)
    }

    /// Every key of this kind for one job.
    pub fn range(self, job_id: u128) -> std::ops::RangeInclusive<(u128, u8, u128)> {
        self.key(job_id, 0)..=self.key(job_id, u128::MAX)
    }
}

/// A table every earlier layout of bcp's store had: such a store is
/// refused with a message, not misread.
pub const OLD_LAYOUT_TABLE: &str = "jobs";
