//! How a job's rows in [`JOB_ROWS`](super::tables::JOB_ROWS) are laid out
//! and encoded. Its snapshot catalog: its retained snapshots in rows of
//! consecutive ones ([`JobRow::Snapshot`], [`snapshot_chunks`]: about
//! [`CHUNK_MEAN`] a row, where a row starts decided by the snapshot alone)
//! and one row of the job's class history, which days, weeks and months
//! already had their daily, weekly, monthly ([`JobRow::Classes`]). A batch
//! writes only the rows of the snapshots it added, changed or removed, and
//! the class row only when it changed, so recording a snapshot costs one
//! small row however large the catalog is, and a job of a few snapshots
//! has one or two rows of them, not one each. A job of at most
//! [`COMBINED_MAX`] snapshots keeps its view, class row and snapshots in
//! one row instead ([`Layout::Combined`], [`combined_row`]): a job written
//! behind the log is then one insert beside its index row. Its event
//! index ([`JobRow::Event`]): rows of consecutive seqs of the job, each
//! keyed by its first (see [`index_row`]), so the rows of a job written
//! once after many of its events (`behind.rs`) add one index row, not one
//! per event.

use super::CommandRecord;
use super::tables::JobRow;
use crate::domain::catalog::CatalogBefore;
use crate::domain::command::Fingerprint;
use crate::domain::periods::{Month, Runs, Week};
use crate::domain::reply::{ErrorBody, EventRef};
use crate::domain::{Catalog, ErrorCode, Job, Reply, Snapshot};
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use uuid::Uuid;

/// A row to write under key `K`; `None`: remove the row.
pub type Row<K> = (K, Option<Vec<u8>>);

/// A key of [`JOB_ROWS`](super::tables::JOB_ROWS).
pub type JobKey = (u128, u8, u128);

/// The class row: everything of a catalog but its snapshots, as runs.
#[derive(Serialize)]
struct ClassesRef<'a> {
    daily_runs: &'a Runs<NaiveDate>,
    weekly_runs: &'a Runs<Week>,
    monthly_runs: &'a Runs<Month>,
}

/// A class row as stored: as runs, or in the layout before them (every day,
/// week and month listed), which is read alike and rewritten as runs the
/// next time the job's classes change.
#[derive(Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum Classes {
    Runs {
        daily_runs: Runs<NaiveDate>,
        weekly_runs: Runs<Week>,
        monthly_runs: Runs<Month>,
    },
    Listed {
        daily_days: Vec<NaiveDate>,
        weekly_weeks: Vec<Week>,
        monthly_months: Vec<Month>,
    },
}

/// A job's class row ([`JobRow::Classes`]), compact (`COMPACT_V1`): its
/// runs' periods as postcard writes them (a day as its ISO text, a week
/// and a month as two varints), two fifths of the JSON before it. A JSON
/// class row, of either layout, reads alike.
pub fn classes_row(c: &Catalog) -> Vec<u8> {
    compact(&ClassesRef {
        daily_runs: &c.daily_days,
        weekly_runs: &c.weekly_weeks,
        monthly_runs: &c.monthly_months,
    })
}

/// The first byte of a row in bcp's compact encoding: postcard (serde's
/// field order, varints, no names), version 1. A row that starts with `{`
/// is JSON, the layout before it, and reads alike; it is rewritten compact
/// the next time it changes. JSON stays the contract on the wire and in the
/// log; rows are bcp's own, read only through this module.
const COMPACT_V1: u8 = 1;

fn compact<T: Serialize>(value: &T) -> Vec<u8> {
    postcard_row(COMPACT_V1, value)
}

/// The byte `first`, then `value` in postcard. Serialized into a reused
/// buffer and copied out at its size: a row grown from one byte took
/// several reallocations, and rows are held in memory until written
/// (`behind.rs`), where spare capacity would stay.
fn postcard_row<T: Serialize>(first: u8, value: &T) -> Vec<u8> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        buf.push(first);
        let out = postcard::to_extend(value, std::mem::take(buf)).expect("a row serializes");
        let row = out.as_slice().to_vec();
        *buf = out;
        row
    })
}

/// A row of [`COMPACT_V1`] or JSON.
fn read<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&COMPACT_V1, rest)) => one_value(rest),
        _ => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    }
}

/// The first byte of a job's view row and of a row of one snapshot in the
/// compact encoding with times as numbers ([`JobV2`], [`SnapshotV2`]):
/// [`COMPACT_V1`] wrote each time as its RFC 3339 text, 25 bytes or so,
/// where two varints take 6 to 10 and are written and read without
/// formatting or parsing. Rows of [`COMPACT_V1`] read alike and are
/// rewritten in this encoding the next time they change.
const TIMES_V2: u8 = 4;
// Records take 2 and 3 in their own table (`RECORD_V2`, packs), and job
// rows 1, 2, 4, 5 and `{`: a later layout of either takes 7 or above.

/// The first byte of a job's *combined* row: its view, its class row and
/// its snapshots, in one row under its view's key ([`JobRow::Job`]), for a
/// job whose catalog holds at most [`COMBINED_MAX`] snapshots
/// ([`Layout::Combined`]). A job written behind the log was about four
/// rows (view, classes, snapshots, event index), each a B-tree insert in
/// the commit that writes it; combined, two (bench/RESULTS.md).
const COMBINED: u8 = 6;

/// The most snapshots a catalog holds and still shares its job's row.
pub const COMBINED_MAX: usize = 16;

/// How a store lays out a job's view and catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// View, class row and snapshot rows apart: a store written before
    /// combined rows, read as it is.
    Separate,
    /// A job whose catalog holds at most [`COMBINED_MAX`] snapshots in one
    /// row ([`combined_row`]); others apart. Every store opened for
    /// writing (`Store::combine_job_rows`).
    Combined,
}

/// Whether a job in `state` is stored in one combined row under `layout`.
pub fn is_combined(layout: Layout, state: JobState<'_>) -> bool {
    state.job.is_some() && state.catalog.is_some_and(|c| combines(layout, c))
}

/// Whether `layout` keeps a job's catalog `c` in its combined row. Part of
/// a store's layout, as [`starts_row`] is: the write path knows where a
/// job's rows are from its state alone, so a change to [`COMBINED_MAX`]
/// would have it misread every store written before.
pub fn combines(layout: Layout, c: &Catalog) -> bool {
    layout == Layout::Combined && c.snapshots.len() <= COMBINED_MAX
}

/// A job's combined row (first byte 6): its view, then its class row's
/// runs, then its snapshots, each as its own row holds it.
pub fn combined_row(job: &Job, c: &Catalog) -> Vec<u8> {
    let classes = ClassesRef {
        daily_runs: &c.daily_days,
        weekly_runs: &c.weekly_weeks,
        monthly_runs: &c.monthly_months,
    };
    postcard_row(COMBINED, &(As(job), classes, As(&c.snapshots[..])))
}

/// The rows apart ([`Layout::Separate`]) of job `job` whose combined row
/// is `bytes` (`None`: it is not one): what a store written before
/// combined rows holds for it (the tests of older stores).
pub fn apart(job: u128, bytes: &[u8]) -> Option<Vec<Row<JobKey>>> {
    let (view, catalog) = read_combined(bytes).ok()??;
    let mut rows = vec![
        (JobRow::Job.key(job, 0), Some(job_row(&view))),
        (JobRow::Classes.key(job, 0), Some(classes_row(&catalog))),
    ];
    rows.extend(snapshot_rows(job, &catalog.snapshots));
    Some(rows)
}

/// A combined row, read.
type CombinedIn = (JobIn, ClassRuns, Vec<SnapshotIn>);

/// The view and catalog of a combined row; `None` for a row of another
/// layout (a view alone).
pub fn read_combined(bytes: &[u8]) -> Result<Option<(Job, Catalog)>, String> {
    let Some((&COMBINED, rest)) = bytes.split_first() else {
        return Ok(None);
    };
    let (JobIn(job), classes, snapshots): CombinedIn = one_value(rest)?;
    let snapshots = snapshots.into_iter().map(|SnapshotIn(s)| s).collect();
    Ok(Some((job, catalog_of_parts(classes, snapshots)?)))
}

/// A time as two numbers, seconds since 1970 and the nanoseconds past
/// them, as chrono holds it: every `DateTime<Utc>`, leap seconds included,
/// reads back as it was.
mod stamp {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

    fn parts(t: &DateTime<Utc>) -> (i64, u32) {
        (t.timestamp(), t.timestamp_subsec_nanos())
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        parts(t).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let (secs, nanos) = <(i64, u32)>::deserialize(d)?;
        DateTime::from_timestamp(secs, nanos)
            .ok_or_else(|| D::Error::custom(format!("no time is {secs} s and {nanos} ns")))
    }

    /// [`stamp`](self) for an `Option<DateTime<Utc>>`.
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            t.as_ref().map(parts).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            #[derive(Deserialize)]
            struct Stamp(#[serde(with = "super")] DateTime<Utc>);
            Ok(Option::<Stamp>::deserialize(d)?.map(|Stamp(t)| t))
        }
    }
}

/// A job's view as a row of [`TIMES_V2`]: [`Job`]'s fields in its order,
/// times as [`stamp`]s. Serde's remote derive builds `Job` from it field by
/// field, so a field added to `Job` and not here does not compile.
#[derive(Serialize, Deserialize)]
#[serde(remote = "Job")]
struct JobV2 {
    job_id: Uuid,
    project_id: crate::domain::ProjectId,
    deployment: crate::domain::job::Deployment,
    schedule: crate::domain::Schedule,
    region: Option<crate::domain::ids::Name>,
    state: crate::domain::job::JobState,
    phase: Option<crate::domain::job::Phase>,
    version: u64,
    snapshot_count: u64,
    #[serde(with = "stamp::option")]
    latest_snapshot_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(with = "stamp")]
    created_at: chrono::DateTime<chrono::Utc>,
    #[serde(with = "stamp")]
    last_transition_at: chrono::DateTime<chrono::Utc>,
    #[serde(with = "stamp::option")]
    stopped_at: Option<chrono::DateTime<chrono::Utc>>,
    initial_sync_done: bool,
}

/// A snapshot as [`TIMES_V2`] and [`SNAPSHOTS_V2`] rows hold it (see
/// [`JobV2`]).
#[derive(Serialize, Deserialize)]
#[serde(remote = "Snapshot")]
struct SnapshotV2 {
    snapshot_id: Uuid,
    #[serde(with = "stamp")]
    taken_at: chrono::DateTime<chrono::Utc>,
    size_bytes: u64,
    classes: Vec<crate::domain::catalog::SnapshotClass>,
    #[serde(with = "stamp")]
    expires_at: chrono::DateTime<chrono::Utc>,
    do_not_delete: bool,
}

/// A value in its row form ([`JobV2`], [`SnapshotV2`]), borrowed: serde's
/// remote derive serializes the domain type itself in that layout.
struct As<'a, T: ?Sized>(&'a T);

impl Serialize for As<'_, Job> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        JobV2::serialize(self.0, s)
    }
}

impl Serialize for As<'_, Snapshot> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        SnapshotV2::serialize(self.0, s)
    }
}

impl Serialize for As<'_, [Snapshot]> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(As))
    }
}

/// A job read from its row form.
#[derive(Deserialize)]
struct JobIn(#[serde(with = "JobV2")] Job);

/// A snapshot read from its row form.
#[derive(Deserialize)]
struct SnapshotIn(#[serde(with = "SnapshotV2")] Snapshot);

/// A compact row's value after its first byte: exactly one value
/// (postcard alone would ignore trailing bytes).
fn one_value<T: serde::de::DeserializeOwned>(rest: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes(rest) {
        Ok((value, [])) => Ok(value),
        Ok((_, extra)) => Err(format!("{} bytes after the row's value", extra.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// A job's view row ([`JobRow::Job`]).
pub fn job_row(j: &Job) -> Vec<u8> {
    postcard_row(TIMES_V2, &As(j))
}

/// A job's view row of any layout: `TIMES_V2`, `COMPACT_V1` or JSON.
pub fn read_job(bytes: &[u8]) -> Result<Job, String> {
    match bytes.split_first() {
        Some((&TIMES_V2, rest)) => one_value(rest).map(|JobIn(j)| j),
        // Its view alone: the catalog after it is read where it is asked for.
        Some((&COMBINED, rest)) => postcard::take_from_bytes(rest)
            .map(|(JobIn(j), _)| j)
            .map_err(|e| e.to_string()),
        _ => read(bytes),
    }
}

/// A row of one snapshot, as verify compares a catalog's snapshots one by
/// one (a store written before rows held several has one each).
pub fn snapshot_row(s: &Snapshot) -> Vec<u8> {
    postcard_row(TIMES_V2, &As(s))
}

/// A row of one snapshot of any layout: `TIMES_V2`, `COMPACT_V1` or JSON.
pub fn read_snapshot(bytes: &[u8]) -> Result<Snapshot, String> {
    match bytes.split_first() {
        Some((&TIMES_V2, rest)) => one_value(rest).map(|SnapshotIn(s)| s),
        _ => read(bytes),
    }
}

/// The first byte of a row of several snapshots ([`JobRow::Snapshot`]):
/// postcard, the snapshots in catalog order. A row of one snapshot, keyed
/// by its id ([`snapshot_row`], compact or JSON: a store written before
/// the rows held several), reads alike.
const SNAPSHOTS_V1: u8 = 2;

/// [`SNAPSHOTS_V1`] with times as numbers ([`SnapshotV2`]): what bcp
/// writes now. Rows of [`SNAPSHOTS_V1`] read alike.
const SNAPSHOTS_V2: u8 = 5;

/// How many snapshots a row of a catalog holds on average
/// ([`starts_row`]).
pub const CHUNK_MEAN: u32 = 16;

/// Whether snapshot `id` starts a row of its catalog's snapshots: about one
/// in [`CHUNK_MEAN`], by a hash of the id alone. So which row a snapshot is
/// in depends only on its neighbours in time, and a batch that changes a
/// few snapshots rewrites a few rows, whatever the catalog held before it.
pub fn starts_row(id: Uuid) -> bool {
    // Part of the store's layout: a change would move where rows start,
    // and a store's rows would no longer be where the write path looks.
    let x = id.as_u128();
    let mut h = (x as u64) ^ ((x >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 29;
    !id.is_nil() && h >> (64 - CHUNK_MEAN.trailing_zeros()) == 0
}

/// A row of snapshots, in catalog order.
pub fn snapshots_row(snapshots: &[Snapshot]) -> Vec<u8> {
    postcard_row(SNAPSHOTS_V2, &As(snapshots))
}

/// The snapshots of a row of any layout (several, or one).
pub fn read_snapshots(bytes: &[u8]) -> Result<Vec<Snapshot>, String> {
    let snapshots = match bytes.split_first() {
        Some((&SNAPSHOTS_V2, rest)) => one_value::<Vec<SnapshotIn>>(rest)
            .map(|row| row.into_iter().map(|SnapshotIn(s)| s).collect::<Vec<_>>()),
        Some((&SNAPSHOTS_V1, rest)) => one_value::<Vec<Snapshot>>(rest),
        _ => return read_snapshot(bytes).map(|s| vec![s]),
    }?;
    match snapshots.is_empty() {
        true => Err("a row of no snapshot".into()),
        false => Ok(snapshots),
    }
}

/// The rows of a catalog's `snapshots` (in catalog order): each row's
/// `sub` and the range of `snapshots` it holds. A row starts at each
/// snapshot that [`starts_row`] (its `sub` that snapshot's id); the
/// snapshots before the first such are the lead row (`sub` 0).
pub fn snapshot_chunks<S: std::borrow::Borrow<Snapshot>>(
    snapshots: &[S],
) -> impl Iterator<Item = (u128, std::ops::Range<usize>)> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        let first = snapshots.get(start)?.borrow();
        let end = chunk_end(snapshots, start);
        let range = start..end;
        start = end;
        Some((chunk_sub(first), range))
    })
}

/// The rows of job `job`'s catalog `snapshots` (in catalog order), from
/// nothing.
pub fn snapshot_rows(job: u128, snapshots: &[Snapshot]) -> impl Iterator<Item = Row<JobKey>> + '_ {
    (snapshot_chunks(snapshots)).map(move |(sub, range)| {
        (
            JobRow::Snapshot.key(job, sub),
            Some(snapshots_row(&snapshots[range])),
        )
    })
}

/// Where the row that starts at `snapshots[start]` ends.
fn chunk_end<S: std::borrow::Borrow<Snapshot>>(snapshots: &[S], start: usize) -> usize {
    (start + 1..snapshots.len())
        .find(|&i| starts_row(snapshots[i].borrow().snapshot_id))
        .unwrap_or(snapshots.len())
}

/// What is wrong with the layout of one job's snapshot rows as stored
/// (each row's `sub` and its snapshots, as read), if anything: in a store
/// of several a row (`chunked`), each row must be where
/// [`snapshot_chunks`] puts it and hold exactly its snapshots, in order,
/// since the write path rewrites and removes rows there and nowhere else
/// (a row elsewhere would outlive the snapshots it holds). A store written
/// before may also hold one row per snapshot, keyed by its id.
pub fn layout_fault(rows: &[(u128, Vec<Snapshot>)], chunked: bool) -> Option<String> {
    let one_each = || {
        (rows.iter()).all(|(sub, s)| matches!(&s[..], [one] if one.snapshot_id.as_u128() == *sub))
    };
    if !chunked && one_each() {
        return None;
    }
    let mut all: Vec<&Snapshot> = rows.iter().flat_map(|(_, s)| s).collect();
    all.sort_by_key(|s| s.place());
    let laid_out: std::collections::HashMap<u128, std::ops::Range<usize>> =
        snapshot_chunks(&all).collect();
    for (sub, snapshots) in rows {
        match laid_out.get(sub) {
            Some(range) if all[range.clone()].iter().copied().eq(snapshots) => {}
            Some(_) => {
                return Some(format!(
                    "its snapshot row {} does not hold the snapshots bcp puts there",
                    Uuid::from_u128(*sub)
                ));
            }
            None => {
                return Some(format!(
                    "its snapshot row {} is where bcp puts no row",
                    Uuid::from_u128(*sub)
                ));
            }
        }
    }
    (laid_out.len() != rows.len()).then(|| "a row of its snapshots is missing".to_string())
}

/// The `sub` of the row that starts with `first`.
fn chunk_sub(first: &Snapshot) -> u128 {
    match starts_row(first.snapshot_id) {
        true => first.snapshot_id.as_u128(),
        false => 0,
    }
}

/// Where the row holding `snapshots[end - 1]` starts (`None`: `end` is 0).
fn chunk_start(snapshots: &[Snapshot], end: usize) -> Option<usize> {
    let last = end.checked_sub(1)?;
    Some(
        (1..=last)
            .rev()
            .find(|&i| starts_row(snapshots[i].snapshot_id))
            .unwrap_or(0),
    )
}

/// The first byte of an idempotency record in its second compact layout:
/// [`COMPACT_V1`]'s fields, with the fingerprint as its 32 bytes and each
/// event's type as its place in [`EVENT_TYPES`], so a record of one event
/// is 61 bytes instead of 102. Records are kept forever, one per
/// command, and those of random ids are merged into `COMMANDS` in sweeps
/// that rewrite its pages (`records.rs`): the table's size is what a
/// command of a random id costs. Records of either layout read alike.
const RECORD_V2: u8 = 2;
// A record's first byte is 1, 2 or `{`: 3 is taken by the packs of
// records (`commands.rs`), so a later record layout takes 4 or above.

/// Event types as a record stores them: by place in this list. Append
/// only: a place, once written, names its type forever. A type not listed
/// is stored by its name.
const EVENT_TYPES: [&str; 15] = [
    "JobCreated",
    "JobStarted",
    "JobStopped",
    "JobTerminated",
    "SnapshotsPurged",
    "RegionAssigned",
    "JobMisconfigured",
    "JobReconfigured",
    "ScheduleChanged",
    "SnapshotRecorded",
    "SnapshotDeleted",
    "SnapshotExpiryChanged",
    "SnapshotExpired",
    "RegionConfigured",
    "CommandRejected",
];

/// A command's idempotency record (table `COMMANDS`), field by field: the
/// reply's JSON form leaves fields out, which a compact row cannot.
#[derive(Deserialize)]
struct StoredRecord {
    fingerprint: Fingerprint,
    ok: bool,
    job_id: Option<Uuid>,
    version: Option<u64>,
    events: Vec<EventRef>,
    error: Option<(ErrorCode, String, Option<u64>)>,
    rejection_seq: Option<u64>,
}

/// A record in the layout of [`RECORD_V2`], borrowed to write it.
#[derive(Serialize)]
struct RecordV2Ref<'a> {
    fingerprint: Text<'a, [u8; 32]>,
    ok: bool,
    job_id: Option<Uuid>,
    version: Option<u64>,
    events: EventCodes<'a>,
    error: Option<(ErrorCode, &'a str, Option<u64>)>,
    rejection_seq: Option<u64>,
}

/// A reply's events as [`RecordV2Ref`] writes them, `(seq, type's code)`,
/// without collecting them first.
struct EventCodes<'a>(&'a [EventRef]);

impl Serialize for EventCodes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((self.0.iter()).map(|e| (e.seq, event_type_code(&e.event_type))))
    }
}

/// A record in the layout of [`RECORD_V2`], read.
#[derive(Deserialize)]
struct RecordV2 {
    fingerprint: Owned<[u8; 32]>,
    ok: bool,
    job_id: Option<Uuid>,
    version: Option<u64>,
    events: Vec<(u64, Owned<u8>)>,
    error: Option<(ErrorCode, String, Option<u64>)>,
    rejection_seq: Option<u64>,
}

/// A text stored as its code `C` where it has one, else as it is.
#[derive(Serialize)]
enum Text<'a, C> {
    Code(C),
    Other(&'a str),
}

/// [`Text`] read back (the same variants in the same order).
#[derive(Deserialize)]
enum Owned<C> {
    Code(C),
    Other(String),
}

/// A fingerprint as its 32 bytes when it is a digest, else as its text
/// (the `*` of a record rebuilt from the log).
fn fingerprint_code(f: &Fingerprint) -> Text<'_, [u8; 32]> {
    match f.digest_or_text() {
        Ok(bytes) => Text::Code(*bytes),
        Err(text) => Text::Other(text),
    }
}

fn event_type_code(name: &str) -> Text<'_, u8> {
    match EVENT_TYPES.iter().position(|t| *t == name) {
        Some(i) => Text::Code(u8::try_from(i).expect("at most 256 event types")),
        None => Text::Other(name),
    }
}

pub fn record_row(r: &CommandRecord) -> Vec<u8> {
    let reply = &r.reply;
    let record = RecordV2Ref {
        fingerprint: fingerprint_code(&r.fingerprint),
        ok: reply.ok,
        job_id: reply.job_id,
        version: reply.version,
        events: EventCodes(&reply.events),
        error: (reply.error.as_ref()).map(|e| (e.code, e.message.as_str(), e.current_version)),
        rejection_seq: reply.rejection_seq,
    };
    postcard_row(RECORD_V2, &record)
}

pub fn read_record(bytes: &[u8]) -> Result<CommandRecord, String> {
    let r = match bytes.split_first() {
        Some((&RECORD_V2, rest)) => {
            let r: RecordV2 = match postcard::take_from_bytes(rest) {
                Ok((r, [])) => r,
                Ok((_, extra)) => {
                    return Err(format!("{} bytes after the record", extra.len()));
                }
                Err(e) => return Err(e.to_string()),
            };
            let events = (r.events.into_iter())
                .map(|(seq, t)| {
                    let event_type = match t {
                        Owned::Code(i) => (EVENT_TYPES.get(i as usize))
                            .ok_or_else(|| format!("event type {i} is not one bcp knows"))?
                            .to_string(),
                        Owned::Other(name) => name,
                    };
                    Ok(EventRef { seq, event_type })
                })
                .collect::<Result<_, String>>()?;
            StoredRecord {
                fingerprint: match r.fingerprint {
                    Owned::Code(bytes) => Fingerprint::from_digest(bytes),
                    Owned::Other(f) => Fingerprint::from(f),
                },
                ok: r.ok,
                job_id: r.job_id,
                version: r.version,
                events,
                error: r.error,
                rejection_seq: r.rejection_seq,
            }
        }
        Some((&COMPACT_V1, _)) => read(bytes)?,
        _ => return read(bytes),
    };
    Ok(CommandRecord {
        fingerprint: r.fingerprint,
        reply: Reply {
            ok: r.ok,
            job_id: r.job_id,
            version: r.version,
            events: r.events,
            error: r.error.map(|(code, message, current_version)| ErrorBody {
                code,
                message,
                current_version,
            }),
            rejection_seq: r.rejection_seq,
            duplicate: false,
        },
    })
}

/// A row of `kind` for a message: its value as JSON whatever its encoding
/// (or its bytes, when it does not decode).
pub fn show(kind: u8, bytes: &[u8]) -> String {
    let json = match kind {
        k if k == JobRow::Job as u8 => match read_combined(bytes) {
            Ok(Some((job, catalog))) => Ok(serde_json::to_string(
                &serde_json::json!({"job": job, "catalog": catalog}),
            )),
            _ => read_job(bytes).map(|j| serde_json::to_string(&j)),
        },
        k if k == JobRow::Snapshot as u8 => read_snapshots(bytes).map(|s| match s.as_slice() {
            [one] => serde_json::to_string(one),
            _ => serde_json::to_string(&s),
        }),
        _ => Err(String::new()),
    };
    match json {
        Ok(Ok(json)) => json,
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Whether a stored job view row holds the value of the row `want` (as
/// [`job_row`] writes it). A row of the encoding `want` is in is only ever
/// equal byte for byte: that encoding is canonical, so any other bytes are
/// an edit. A row of an earlier one (JSON, `COMPACT_V1`) is compared by
/// value.
pub fn same_job(want: &[u8], stored: &[u8]) -> bool {
    let combined = |row: &[u8]| row.first() == Some(&COMBINED);
    want == stored
        // A combined row also holds a catalog: only its own bytes will do.
        || !combined(want)
            && !combined(stored)
            && want.first() != stored.first()
            && matches!((read_job(want), read_job(stored)), (Ok(x), Ok(y)) if x == y)
}

type ClassRuns = (Runs<NaiveDate>, Runs<Week>, Runs<Month>);

/// A class row, of any layout, as runs.
fn read_classes(classes: &[u8]) -> Result<ClassRuns, String> {
    if let Some((&COMPACT_V1, rest)) = classes.split_first() {
        return one_value(rest);
    }
    Ok(
        match serde_json::from_slice(classes).map_err(|e| e.to_string())? {
            Classes::Runs {
                daily_runs,
                weekly_runs,
                monthly_runs,
            } => (daily_runs, weekly_runs, monthly_runs),
            Classes::Listed {
                daily_days,
                weekly_weeks,
                monthly_months,
            } => (
                daily_days.into_iter().collect(),
                weekly_weeks.into_iter().collect(),
                monthly_months.into_iter().collect(),
            ),
        },
    )
}

/// Whether a stored class row, in either layout, holds `c`'s classes.
pub fn classes_match(stored: &[u8], c: &Catalog) -> bool {
    read_classes(stored)
        .is_ok_and(|(daily, weekly, monthly)| (&daily, &weekly, &monthly) == c.classes())
}

/// A catalog from its class row and the snapshots of its snapshot rows
/// ([`read_snapshots`], the rows in any order).
pub fn read_catalog(
    classes: &[u8],
    rows: impl IntoIterator<Item = Result<Vec<Snapshot>, String>>,
) -> Result<Catalog, String> {
    let classes = read_classes(classes)?;
    let mut snapshots = Vec::new();
    for row in rows {
        snapshots.extend(row?);
    }
    catalog_of_parts(classes, snapshots)
}

/// A catalog of `classes` and `snapshots` (in any order), each snapshot
/// held once.
fn catalog_of_parts(classes: ClassRuns, mut snapshots: Vec<Snapshot>) -> Result<Catalog, String> {
    let (daily_days, weekly_weeks, monthly_months) = classes;
    snapshots.sort_by_key(Snapshot::place);
    let mut ids = std::collections::HashSet::with_capacity(snapshots.len());
    if let Some(s) = snapshots.iter().find(|s| !ids.insert(s.snapshot_id)) {
        return Err(format!("snapshot {} is held twice", s.snapshot_id));
    }
    Ok(Catalog {
        snapshots,
        daily_days,
        weekly_weeks,
        monthly_months,
    })
}

/// What bcp keeps of one job: its view and its snapshot catalog.
#[derive(Clone, Copy, Default)]
pub struct JobState<'a> {
    pub job: Option<&'a Job>,
    pub catalog: Option<&'a Catalog>,
}

/// The one layout of a job's rows in [`JOB_ROWS`](super::tables::JOB_ROWS),
/// used by the write path, import and catch-up (and by verify, which
/// compares the event index seq by seq): the rows that turn job `id`'s
/// stored rows from `before` into `after`, and the event index rows of
/// `new_seqs` (its events since `before`: one row per [`INDEX_ROW_MAX`]),
/// in key order. Only what changed is written: the view when it changed,
/// the class row when the classes did, each snapshot added, changed or
/// removed. From nothing (`JobState::default()`) it is every row the job
/// has. The write path says instead what a batch changed of the catalog
/// ([`CatalogWas`]), so that only that is compared.
pub fn job_rows<'a>(
    id: Uuid,
    before: impl Into<Was<'a>>,
    after: JobState<'_>,
    new_seqs: &[u64],
    layout: Layout,
) -> Vec<Row<JobKey>> {
    let before = before.into();
    let key = id.as_u128();
    let mut rows = Vec::with_capacity(2 + new_seqs.len().div_ceil(INDEX_ROW_MAX));
    let (was, now) = (
        was_combined(layout, &before, after),
        is_combined(layout, after),
    );
    if was || now {
        rows.extend(combined_rows(id, &before, after, (was, now)));
    } else {
        if before.job != after.job {
            rows.push((JobRow::Job.key(key, 0), after.job.map(job_row)));
        }
        rows.extend(catalog_rows(id, before.catalog, after.catalog));
    }
    rows.extend(new_seqs.chunks(INDEX_ROW_MAX).map(|seqs| {
        let (first, row) = index_row(seqs);
        (JobRow::Event.key(key, u128::from(first)), Some(row))
    }));
    rows.sort_unstable_by_key(|(k, _)| *k);
    rows
}

/// Whether the job as it stood before (`before`; `after` now) was stored
/// in a combined row: its snapshots then counted from what the batch
/// changed, without the catalog before.
fn was_combined(layout: Layout, before: &Was<'_>, after: JobState<'_>) -> bool {
    if layout != Layout::Combined || before.job.is_none() {
        return false;
    }
    let count = match before.catalog {
        CatalogWas::Whole(c) => c.map(|c| c.snapshots.len()),
        CatalogWas::Unchanged => after.catalog.map(|c| c.snapshots.len()),
        CatalogWas::Changed(was) => (!was.absent).then(|| {
            let (mut added, mut removed) = (0, 0);
            for (_, old, new) in was.changes(after.catalog) {
                match (old, new) {
                    (None, Some(_)) => added += 1,
                    (Some(_), None) => removed += 1,
                    _ => {}
                }
            }
            after.catalog.map_or(0, |c| c.snapshots.len()) + removed - added
        }),
    };
    count.is_some_and(|n| n <= COMBINED_MAX)
}

/// The rows of a job that was (`was_now.0`) or is (`.1`) stored combined:
/// its combined row when anything in it changed; one taking the place of
/// its rows apart, which go; or its rows apart laid out from nothing when
/// its catalog grew past [`COMBINED_MAX`] (or went).
fn combined_rows(
    id: Uuid,
    before: &Was<'_>,
    after: JobState<'_>,
    was_now: (bool, bool),
) -> Vec<Row<JobKey>> {
    let key = id.as_u128();
    let view = JobRow::Job.key(key, 0);
    let combined = || match (after.job, after.catalog) {
        (Some(job), Some(c)) => (view, Some(combined_row(job, c))),
        _ => unreachable!("a combined job has a view and a catalog"),
    };
    match was_now {
        (true, true) => {
            let changed = before.job != after.job || catalog_changed(before.catalog, after.catalog);
            if changed {
                vec![combined()]
            } else {
                Vec::new()
            }
        }
        (false, true) => {
            let mut rows = vec![combined()];
            let apart = before
                .job
                .and(before_snapshots(before.catalog, after.catalog));
            if let Some(snapshots) = apart {
                rows.push((JobRow::Classes.key(key, 0), None));
                let chunks = snapshot_chunks(&snapshots);
                rows.extend(chunks.map(|(sub, _)| (JobRow::Snapshot.key(key, sub), None)));
            }
            rows
        }
        _ => {
            let mut rows = vec![(view, after.job.map(job_row))];
            if let Some(c) = after.catalog {
                rows.push((JobRow::Classes.key(key, 0), Some(classes_row(c))));
                rows.extend(snapshot_rows(key, &c.snapshots));
            }
            rows
        }
    }
}

/// Whether a catalog changed from `before` to `after`.
fn catalog_changed(before: CatalogWas<'_>, after: Option<&Catalog>) -> bool {
    match before {
        CatalogWas::Unchanged => false,
        CatalogWas::Whole(c) => c != after,
        CatalogWas::Changed(was) => {
            was.absent != after.is_none()
                || after.is_some_and(|c| was.classes_changed(c))
                || was.changes(after).any(|(_, old, new)| old != new)
        }
    }
}

/// The snapshots of the catalog `before` (`None`: there was none), now
/// `after`.
fn before_snapshots(before: CatalogWas<'_>, after: Option<&Catalog>) -> Option<Vec<Snapshot>> {
    match before {
        CatalogWas::Whole(c) => c.map(|c| c.snapshots.clone()),
        CatalogWas::Unchanged => after.map(|c| c.snapshots.clone()),
        CatalogWas::Changed(was) => was.clone().put_back(after.cloned()).map(|c| c.snapshots),
    }
}

/// A job as it stood before the rows [`job_rows`] lays out.
#[derive(Clone, Copy)]
pub struct Was<'a> {
    pub job: Option<&'a Job>,
    pub catalog: CatalogWas<'a>,
}

/// A job's catalog as it stood before the rows [`job_rows`] lays out.
#[derive(Clone, Copy)]
pub enum CatalogWas<'a> {
    /// This catalog (`None`: none): every snapshot compared.
    Whole(Option<&'a Catalog>),
    /// What a batch changed of it: only the snapshots it touched compared.
    Changed(&'a CatalogBefore),
    /// As it is: no rows.
    Unchanged,
}

impl<'a> From<JobState<'a>> for Was<'a> {
    fn from(s: JobState<'a>) -> Was<'a> {
        Was {
            job: s.job,
            catalog: CatalogWas::Whole(s.catalog),
        }
    }
}

/// The most seqs [`job_rows`] puts in one index row (a job's events
/// written at once: many only on import or a write-through). Not a bound
/// on stored rows: a job's index row held behind grows with each batch
/// until it is written (at most `ROWS_BEHIND_MAX` seqs).
pub const INDEX_ROW_MAX: usize = 4096;

/// An event index row ([`JobRow::Event`]) of `seqs` (strictly increasing,
/// at least one): its key's sub, the first seq, and its value. One seq:
/// an empty value, the layout from before index rows held many (read
/// alike). More: `COMPACT_V1`, then the gap from each seq to the next as
/// a LEB128 varint; canonical, so a stored row is equal byte for byte.
pub fn index_row(seqs: &[u64]) -> (u64, Vec<u8>) {
    let (&first, rest) = seqs.split_first().expect("an index row of no seq");
    let mut row = Vec::new();
    index_extend(&mut row, first, rest);
    (first, row)
}

/// Add `seqs` (each after `last`) to the index row `row` whose last seq
/// is `last` (for an empty row, its first): merging two rows of one job
/// held behind, without walking the gaps already there.
pub fn index_extend(row: &mut Vec<u8>, mut last: u64, seqs: &[u64]) {
    if seqs.is_empty() {
        return;
    }
    if row.is_empty() {
        row.push(COMPACT_V1);
    }
    for &seq in seqs {
        assert!(seq > last, "an event index grows: {seq} after {last}");
        let mut gap = seq - last;
        while gap >= 0x80 {
            row.push(gap as u8 | 0x80);
            gap >>= 7;
        }
        row.push(gap as u8);
        last = seq;
    }
}

/// Add the index row `row` with first seq `first` (after `last`) to the
/// index row `into` whose last seq is `last`: its gaps are copied as they
/// are, not decoded and encoded again.
pub fn index_join(into: &mut Vec<u8>, last: u64, first: u64, row: &[u8]) {
    index_extend(into, last, &[first]);
    into.extend_from_slice(row.get(1..).unwrap_or_default());
}

/// The seqs of the index row with key sub `first` and value `row`.
pub fn read_index(first: u128, row: &[u8]) -> Result<Vec<u64>, String> {
    let first = seq_of(first)?;
    let mut seqs = vec![first];
    index_walk(first, row, |seq| seqs.push(seq))?;
    Ok(seqs)
}

/// The last seq of the index row with key sub `first` and value `row`.
pub fn index_last(first: u128, row: &[u8]) -> Result<u64, String> {
    let mut last = seq_of(first)?;
    index_walk(last, row, |seq| last = seq)?;
    Ok(last)
}

fn seq_of(sub: u128) -> Result<u64, String> {
    u64::try_from(sub).map_err(|_| format!("{sub} is not a seq"))
}

/// Each seq of an index row after its first, in order; a row that is not
/// in the one canonical encoding is refused (a zero gap, a varint with a
/// needless byte or past u64, a cut-off varint, the marker with nothing).
fn index_walk(first: u64, row: &[u8], mut each: impl FnMut(u64)) -> Result<(), String> {
    let gaps = match row.split_first() {
        None => return Ok(()),
        Some((&COMPACT_V1, gaps)) if !gaps.is_empty() => gaps,
        Some(_) => return Err("not an event index row".into()),
    };
    let (mut seq, mut gap, mut shift) = (first, 0u64, 0u32);
    for (i, &b) in gaps.iter().enumerate() {
        let bits = u64::from(b & 0x7f);
        if shift >= 64 || (bits << shift) >> shift != bits || (b == 0 && shift > 0) {
            return Err(format!(
                "a gap ending at byte {} is not a canonical varint",
                i + 1
            ));
        }
        gap |= bits << shift;
        shift += 7;
        if b & 0x80 == 0 {
            if gap == 0 {
                return Err(format!("a gap of 0 after seq {seq}"));
            }
            seq = seq
                .checked_add(gap)
                .ok_or_else(|| format!("a gap past the largest seq after {seq}"))?;
            each(seq);
            (gap, shift) = (0, 0);
        }
    }
    match shift {
        0 => Ok(()),
        _ => Err("the last gap is cut off".into()),
    }
}

/// The class row at `key` if it changed: written for a catalog that was
/// `absent` or whose classes `changed`, removed with the catalog.
fn classes_change(
    key: JobKey,
    absent: bool,
    changed: bool,
    after: Option<&Catalog>,
) -> Option<Row<JobKey>> {
    match after {
        Some(c) if absent || changed => Some((key, Some(classes_row(c)))),
        None if !absent => Some((key, None)),
        _ => None,
    }
}

/// The rows that turn a job's stored catalog `before` into `after`: from
/// what a batch changed of it, only the rows of the snapshots it touched;
/// from a whole catalog, every row whose snapshots differ.
fn catalog_rows(job_id: Uuid, before: CatalogWas<'_>, after: Option<&Catalog>) -> Vec<Row<JobKey>> {
    let mut rows = Vec::new();
    let job = job_id.as_u128();
    let classes_key = JobRow::Classes.key(job, 0);
    let now = after.map_or(&[][..], |c| &c.snapshots[..]);
    let before = match before {
        CatalogWas::Unchanged => return rows,
        CatalogWas::Changed(was) => {
            let changed = after.is_some_and(|c| was.classes_changed(c));
            rows.extend(classes_change(classes_key, was.absent, changed, after));
            rows.extend(touched_rows(job, now, was.changes(after)));
            return rows;
        }
        CatalogWas::Whole(before) => before,
    };
    let was = before.map_or(&[][..], |c| &c.snapshots[..]);
    for s in [was, now] {
        assert!(
            s.is_sorted_by_key(Snapshot::place),
            "a catalog keeps its snapshots in time order"
        );
    }
    let changed = before.map(Catalog::classes) != after.map(Catalog::classes);
    rows.extend(classes_change(
        classes_key,
        before.is_none(),
        changed,
        after,
    ));
    let old: std::collections::HashMap<u128, &[Snapshot]> = (snapshot_chunks(was))
        .map(|(sub, range)| (sub, &was[range]))
        .collect();
    let mut kept = std::collections::HashSet::new();
    for (sub, range) in snapshot_chunks(now) {
        kept.insert(sub);
        if old.get(&sub) != Some(&&now[range.clone()]) {
            let row = snapshots_row(&now[range]);
            rows.push((JobRow::Snapshot.key(job, sub), Some(row)));
        }
    }
    let gone = old.into_keys().filter(|sub| !kept.contains(sub));
    rows.extend(gone.map(|sub| (JobRow::Snapshot.key(job, sub), None)));
    rows
}

/// The snapshot rows of catalog `now` (its snapshots, in order) that a
/// batch's `touched` snapshots (id, value before, value now) changed:
/// the row that holds each where it is now, the row that now holds the
/// place it left, the row a snapshot that starts one split, each written
/// as it is now; the row a removed snapshot started, removed. Found by
/// looking around each touched snapshot alone (rows start where
/// [`starts_row`] says, whatever the rest of the catalog holds), so a
/// batch of a few snapshots costs a few rows of a catalog of thousands.
fn touched_rows<'a>(
    job: u128,
    now: &[Snapshot],
    touched: impl Iterator<Item = (Uuid, Option<&'a Snapshot>, Option<&'a Snapshot>)>,
) -> Vec<Row<JobKey>> {
    // Each row changed: `Ok`, where it starts in `now` (to write as it is
    // now); `Err`, the sub of a row that is gone.
    let mut changed: Vec<Result<usize, u128>> = Vec::new();
    // The row that holds `now[end - 1]`; at 0, the lead row (before any
    // snapshot that starts a row), which is gone unless `now` has one.
    let lead = now.first().is_some_and(|s| !starts_row(s.snapshot_id));
    let row_before = |end: usize| chunk_start(now, end).or(lead.then_some(0)).ok_or(0);
    for (id, old, new) in touched {
        if old == new {
            continue;
        }
        let moved = old.map(Snapshot::place) != new.map(Snapshot::place);
        if let Some(n) = new {
            let at = now.partition_point(|s| s.place() < n.place());
            changed.push(row_before(at + 1));
            if moved && starts_row(id) {
                changed.push(row_before(at)); // the row it split
            }
        }
        if let Some(o) = old.filter(|_| moved) {
            changed.push(row_before(now.partition_point(|s| s.place() < o.place())));
            if new.is_none() && starts_row(id) {
                changed.push(Err(id.as_u128()));
            }
        }
    }
    let (starts, mut gone): (BTreeSet<usize>, BTreeSet<u128>) = (
        changed.iter().filter_map(|c| c.ok()).collect(),
        changed.iter().filter_map(|c| c.err()).collect(),
    );
    let mut rows = Vec::with_capacity(starts.len() + gone.len());
    for start in starts {
        let sub = chunk_sub(&now[start]);
        gone.remove(&sub);
        let row = snapshots_row(&now[start..chunk_end(now, start)]);
        rows.push((JobRow::Snapshot.key(job, sub), Some(row)));
    }
    rows.extend((gone.into_iter()).map(|sub| (JobRow::Snapshot.key(job, sub), None)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SnapshotClass;
    use chrono::{TimeZone, Utc};

    fn snap(n: u128, day: u32) -> Snapshot {
        let taken_at = Utc.with_ymd_and_hms(2026, 11, day, 6, 0, 0).unwrap();
        Snapshot {
            snapshot_id: Uuid::from_u128(n),
            taken_at,
            size_bytes: 1,
            classes: vec![SnapshotClass::Base],
            expires_at: taken_at + chrono::Duration::days(2),
            do_not_delete: false,
        }
    }

    fn catalog(snaps: &[Snapshot], days: &[u32]) -> Catalog {
        Catalog {
            snapshots: snaps.to_vec(),
            daily_days: days
                .iter()
                .map(|d| NaiveDate::from_ymd_opt(2026, 11, *d).unwrap())
                .collect(),
            ..Catalog::default()
        }
    }

    /// The `i`th id (from 1) that [`starts_row`] (`true`) or does not.
    fn id(starts: bool, i: usize) -> u128 {
        (1u128..)
            .filter(|&n| starts_row(Uuid::from_u128(n)) == starts)
            .nth(i - 1)
            .unwrap()
    }

    /// Ids for the proptests: every other one starts a row, so catalogs of
    /// a few snapshots have several rows.
    fn pool(i: u128) -> Uuid {
        Uuid::from_u128(id(i.is_multiple_of(2), i as usize / 2 + 1))
    }

    /// `rows` applied to the stored rows `to` (kind, sub → value).
    fn apply_rows(
        mut to: BTreeMap<(u8, u128), Vec<u8>>,
        rows: &[Row<JobKey>],
    ) -> BTreeMap<(u8, u128), Vec<u8>> {
        for (k, v) in rows {
            match v {
                Some(v) => to.insert((k.1, k.2), v.clone()),
                None => to.remove(&(k.1, k.2)),
            };
        }
        to
    }

    /// The rows of catalog `c`, from nothing.
    fn stored(job: Uuid, c: Option<&Catalog>) -> BTreeMap<(u8, u128), Vec<u8>> {
        apply_rows(
            BTreeMap::new(),
            &catalog_rows(job, CatalogWas::Whole(None), c),
        )
    }

    use std::collections::BTreeMap;

    /// (kind, sub, written?) of each row, sorted.
    fn summary(rows: &[Row<JobKey>]) -> Vec<(u8, u128, bool)> {
        let mut s: Vec<_> = rows.iter().map(|(k, v)| (k.1, k.2, v.is_some())).collect();
        s.sort();
        s
    }

    #[test]
    fn only_the_rows_that_changed_are_written_and_they_read_back_as_the_catalog() {
        let job = Uuid::from_u128(7);
        let (classes, snapshot) = (JobRow::Classes as u8, JobRow::Snapshot as u8);
        // a1, a2: in the lead row; b starts a row.
        let (a1, a2, a3, b) = (id(false, 1), id(false, 2), id(false, 3), id(true, 1));
        let before = catalog(&[snap(a1, 1), snap(a2, 2)], &[1, 2]);
        assert_eq!(
            summary(&catalog_rows(job, CatalogWas::Whole(None), Some(&before))),
            vec![(classes, 0, true), (snapshot, 0, true)],
            "one row of both"
        );
        // One recorded on a day that already had its daily: its row.
        let mut after = before.clone();
        after.snapshots.push(snap(b, 2));
        let rows = catalog_rows(job, CatalogWas::Whole(Some(&before)), Some(&after));
        assert_eq!(summary(&rows), vec![(snapshot, b, true)]);
        assert!(rows.iter().all(|(k, _)| k.0 == job.as_u128()));
        // Expired the first, changed the second, recorded a daily after b:
        // the lead row, b's row and the classes.
        let mut later = after.clone();
        later.snapshots.remove(0);
        later.snapshots[0].do_not_delete = true;
        later.snapshots.push(snap(a3, 3));
        later
            .daily_days
            .insert(NaiveDate::from_ymd_opt(2026, 11, 3).unwrap());
        let rows = catalog_rows(job, CatalogWas::Whole(Some(&after)), Some(&later));
        assert_eq!(
            summary(&rows),
            vec![(classes, 0, true), (snapshot, 0, true), (snapshot, b, true)]
        );
        assert_eq!(
            read_snapshots(rows[2].1.as_ref().unwrap()).unwrap(),
            later.snapshots[1..]
        );
        // The lead row's only snapshot expired: the row is removed.
        let mut last = later.clone();
        last.snapshots.remove(0);
        let rows = catalog_rows(job, CatalogWas::Whole(Some(&later)), Some(&last));
        assert_eq!(summary(&rows), vec![(snapshot, 0, false)]);
        // A new catalog writes its classes; the rows read back, in time order.
        let rows = catalog_rows(job, CatalogWas::Whole(None), Some(&later));
        let classes_bytes = rows
            .iter()
            .find(|(k, _)| k.1 == classes)
            .and_then(|(_, v)| v.clone())
            .expect("classes row");
        let snapshots = rows
            .iter()
            .rev()
            .filter(|(k, _)| k.1 == snapshot)
            .map(|(_, v)| read_snapshots(v.as_ref().unwrap()));
        assert_eq!(read_catalog(&classes_bytes, snapshots).unwrap(), later);
        assert!(catalog_rows(job, CatalogWas::Whole(Some(&later)), Some(&later)).is_empty());
        assert!(catalog_rows(job, CatalogWas::Unchanged, Some(&later)).is_empty());
        // A row of one snapshot, keyed by its id (the layout before rows
        // held several), reads alike.
        let one = [
            Ok(vec![snap(a1, 1)]),
            read_snapshots(&snapshot_row(&snap(a2, 2))),
        ];
        assert_eq!(
            read_catalog(&classes_bytes, one).unwrap().snapshots,
            before.snapshots
        );
    }

    #[test]
    fn rows_anywhere_but_where_the_layout_puts_them_are_a_fault() {
        // a1 a2 | b1 a3 | b2: the lead row, then a row at each b.
        let (a1, a2, a3) = (id(false, 1), id(false, 2), id(false, 3));
        let (b1, b2) = (id(true, 1), id(true, 2));
        let c = catalog(
            &[
                snap(a1, 1),
                snap(a2, 2),
                snap(b1, 3),
                snap(a3, 4),
                snap(b2, 5),
            ],
            &[],
        );
        let s = |i: usize| c.snapshots[i].clone();
        let laid_out = vec![
            (0, vec![s(0), s(1)]),
            (b1, vec![s(2), s(3)]),
            (b2, vec![s(4)]),
        ];
        assert_eq!(layout_fault(&laid_out, true), None);
        assert_eq!(layout_fault(&laid_out, false), None);
        let one_each: Vec<_> = (0..5)
            .map(|i| (s(i).snapshot_id.as_u128(), vec![s(i)]))
            .collect();
        assert_eq!(
            layout_fault(&one_each, false),
            None,
            "a store written before"
        );
        assert!(layout_fault(&one_each, true).is_some());
        let faults = [
            // keyed elsewhere
            vec![
                (0, vec![s(0), s(1)]),
                (b1 + 1, vec![s(2), s(3)]),
                (b2, vec![s(4)]),
            ],
            // split where no row starts
            vec![
                (0, vec![s(0)]),
                (a2, vec![s(1)]),
                (b1, vec![s(2), s(3)]),
                (b2, vec![s(4)]),
            ],
            // two rows as one
            vec![(0, vec![s(0), s(1), s(2), s(3)]), (b2, vec![s(4)])],
            // a snapshot in the next row
            vec![
                (0, vec![s(0), s(1)]),
                (b1, vec![s(2)]),
                (b2, vec![s(3), s(4)]),
            ],
            // out of order
            vec![
                (0, vec![s(1), s(0)]),
                (b1, vec![s(2), s(3)]),
                (b2, vec![s(4)]),
            ],
        ];
        for rows in faults {
            assert!(layout_fault(&rows, true).is_some(), "{rows:?}");
            assert!(layout_fault(&rows, false).is_some(), "{rows:?}");
        }
    }

    #[test]
    fn a_snapshot_in_two_rows_is_refused() {
        let row = snapshots_row(&[snap(1, 1)]);
        let twice = [read_snapshots(&row), read_snapshots(&row)];
        let err = read_catalog(&classes_row(&Catalog::default()), twice).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn about_one_snapshot_in_chunk_mean_starts_a_row() {
        let starts = (0..100_000u128)
            .filter(|&n| starts_row(Uuid::from_u128(n << 64 | n)))
            .count();
        let mean = 100_000 / starts;
        assert!((12..=20).contains(&mean), "one in {mean}");
        // UUIDv7 ids of one millisecond differ only in their random bits.
        let v7 = (0..100_000u128)
            .filter(|&n| {
                starts_row(Uuid::from_u128(
                    0x0190_0000_0000_7000_8000_0000_0000_0000 | n,
                ))
            })
            .count();
        assert!(
            (12..=20).contains(&(100_000 / v7)),
            "one in {}",
            100_000 / v7
        );
    }

    proptest::proptest! {
        /// Comparing whole catalogs writes exactly the rows whose snapshots
        /// differ and removes those that are gone: the stored rows of one,
        /// with them, are the rows of the other.
        #[test]
        fn catalog_rows_turn_the_rows_of_one_catalog_into_those_of_another(
            before in proptest::collection::btree_map(0u128..64, (1u32..29, 0u32..24), 0..40),
            removed in proptest::collection::btree_set(0u128..64, 0..20),
            changed in proptest::collection::btree_set(0u128..64, 0..20),
            moved in proptest::collection::btree_set(0u128..64, 0..10),
            added in proptest::collection::btree_map(64u128..96, (1u32..29, 0u32..24), 0..20),
        ) {
            let at = |(day, hour): (u32, u32)| {
                let mut s = snap(0, day);
                s.taken_at = Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap();
                s
            };
            let sorted = |mut v: Vec<Snapshot>| {
                v.sort_by_key(Snapshot::place);
                v
            };
            let was: Vec<Snapshot> = (before.iter())
                .map(|(&id, &t)| Snapshot { snapshot_id: pool(id), ..at(t) })
                .collect();
            let picked = |set: &std::collections::BTreeSet<u128>, s: &Snapshot| set.iter().any(|&i| pool(i) == s.snapshot_id);
            let is: Vec<Snapshot> = (was.iter())
                .filter(|s| !picked(&removed, s))
                .map(|s| match picked(&changed, s) {
                    true => Snapshot { do_not_delete: !s.do_not_delete, ..s.clone() },
                    false => s.clone(),
                })
                // Deleted and recorded again, at another time.
                .map(|s| match picked(&moved, &s) {
                    true => Snapshot { taken_at: s.taken_at + chrono::Duration::minutes(30), ..s },
                    false => s,
                })
                .chain((added.iter()).map(|(&id, &t)| Snapshot { snapshot_id: pool(id), ..at(t) }))
                .collect();
            let (was, is) = (catalog(&sorted(was), &[]), catalog(&sorted(is), &[]));
            let job = Uuid::from_u128(7);
            let rows = catalog_rows(job, CatalogWas::Whole(Some(&was)), Some(&is));
            let (old, new) = (stored(job, Some(&was)), stored(job, Some(&is)));
            proptest::prop_assert_eq!(&apply_rows(old.clone(), &rows), &new);
            for (k, v) in &rows {
                let key = (k.1, k.2);
                proptest::prop_assert!(old.get(&key) != new.get(&key), "{key:?} written unchanged");
                proptest::prop_assert_eq!(v.as_ref(), new.get(&key));
            }
            let mut read = Vec::new();
            for (_, v) in new.iter().filter(|(k, _)| k.0 == JobRow::Snapshot as u8) {
                read.extend(read_snapshots(v).unwrap());
            }
            proptest::prop_assert_eq!(sorted(read), is.snapshots);
            let laid_out: Vec<_> = (new.iter())
                .filter(|(k, _)| k.0 == JobRow::Snapshot as u8)
                .map(|(k, v)| (k.1, read_snapshots(v).unwrap()))
                .collect();
            proptest::prop_assert_eq!(layout_fault(&laid_out, true), None);
        }
    }

    /// One of the catalog's events, in the proptest below.
    #[derive(Clone, Debug)]
    enum Op {
        /// Record snapshot `id` at hour `h` (daily: with a daily class).
        Record(u128, i64, bool),
        Delete(u128),
        Expire(u128),
        Keep(u128, bool),
        Purge,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u128..24, 0i64..96, any::<bool>()).prop_map(|(i, h, d)| Op::Record(i, h, d)),
            (0u128..24).prop_map(Op::Delete),
            (0u128..24).prop_map(Op::Expire),
            (0u128..24, any::<bool>()).prop_map(|(i, k)| Op::Keep(i, k)),
            Just(Op::Purge),
        ]
    }

    /// A world of one job, id 7, with no catalog yet.
    fn one_job() -> (Uuid, crate::domain::World) {
        use crate::domain::job::{Deployment, DeploymentKind, JobState as State};
        use crate::domain::{ProjectId, Schedule};
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let id = Uuid::from_u128(7);
        let mut world = crate::domain::World::default();
        world.jobs.insert(
            id,
            Job {
                job_id: id,
                project_id: ProjectId::try_from("p1".to_owned()).unwrap(),
                deployment: Deployment {
                    kind: DeploymentKind::ReplicaSet,
                    name: "rs".into(),
                    cluster: None,
                },
                schedule: Schedule::default(),
                region: None,
                state: State::Active,
                phase: None,
                version: 1,
                snapshot_count: 0,
                latest_snapshot_at: None,
                created_at: t0,
                last_transition_at: t0,
                stopped_at: None,
                initial_sync_done: true,
            },
        );
        (id, world)
    }

    /// The event `op` stands for now in job `id`'s catalog (`None`: one
    /// `decide` would refuse).
    fn event_of(world: &crate::domain::World, id: Uuid, op: &Op) -> Option<crate::domain::Event> {
        use crate::domain::Event;
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let sid = pool;
        let catalog = world.catalogs.get(&id);
        let has = |i: u128| catalog.and_then(|c| c.get(sid(i))).cloned();
        match *op {
            Op::Record(i, h, daily) => has(i).is_none().then(|| {
                let taken_at = t0 + chrono::Duration::hours(h);
                let mut classes = vec![SnapshotClass::Base];
                if daily {
                    classes.push(SnapshotClass::Daily);
                }
                Event::SnapshotRecorded {
                    snapshot_id: sid(i),
                    taken_at,
                    size_bytes: 1,
                    classes,
                    expires_at: taken_at + chrono::Duration::days(2),
                }
            }),
            Op::Delete(i) => has(i).map(|_| Event::SnapshotDeleted {
                snapshot_id: sid(i),
            }),
            Op::Expire(i) => has(i).map(|s| Event::SnapshotExpired {
                snapshot_id: sid(i),
                expires_at: s.expires_at,
            }),
            Op::Keep(i, keep) => has(i).map(|s| Event::SnapshotExpiryChanged {
                snapshot_id: sid(i),
                expires_at: s.expires_at + chrono::Duration::hours(1),
                do_not_delete: keep,
            }),
            Op::Purge => Some(Event::SnapshotsPurged {
                snapshot_ids: catalog.map_or(vec![], |c| {
                    c.snapshots.iter().map(|s| s.snapshot_id).collect()
                }),
            }),
        }
    }

    /// `event` folded into job `id` of `world`, as its version `version`.
    fn apply(
        world: &mut crate::domain::World,
        id: Uuid,
        event: crate::domain::Event,
        version: u64,
    ) {
        use crate::domain::{Envelope, ProjectId};
        world.evolve(&Envelope {
            seq: version,
            event_id: Uuid::from_u128(1),
            schema_version: 1,
            project_id: ProjectId::try_from("p1".to_owned()).unwrap(),
            job_id: Some(id),
            job_version: Some(version),
            command_id: Uuid::from_u128(2),
            actor: None,
            actor_verified: false,
            recorded_at: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
            prev_hash: String::new(),
            event,
            hash: String::new(),
        });
    }

    /// Each op of `ops` that `decide` would allow, folded into job `id`
    /// (at one version: a catalog may change under a view that does not);
    /// what a batch of them keeps of the catalog before (`None`: none was).
    fn run_ops(
        world: &mut crate::domain::World,
        id: Uuid,
        ops: impl IntoIterator<Item = Op>,
    ) -> Option<crate::domain::catalog::CatalogBefore> {
        let mut before: Option<crate::domain::catalog::CatalogBefore> = None;
        for op in ops {
            if let Some(e) = event_of(world, id, &op) {
                let now = world.catalogs.get(&id);
                (before.get_or_insert_with(|| crate::domain::catalog::CatalogBefore::of(now)))
                    .note(now, &e);
                apply(world, id, e, 2);
            }
        }
        before
    }

    /// Ops that mostly record: catalogs that grow past [`COMBINED_MAX`]
    /// and shrink below it.
    fn growing_op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            12 => (0u128..24, 0i64..96, any::<bool>()).prop_map(|(i, h, d)| Op::Record(i, h, d)),
            3 => (0u128..24).prop_map(Op::Delete),
            3 => (0u128..24).prop_map(Op::Expire),
            2 => (0u128..24, any::<bool>()).prop_map(|(i, k)| Op::Keep(i, k)),
            1 => Just(Op::Purge),
        ]
    }

    /// A job's rows in `layout` (kind, sub → value), from nothing.
    fn stored_job(id: Uuid, state: JobState<'_>, layout: Layout) -> BTreeMap<(u8, u128), Vec<u8>> {
        apply_rows(
            BTreeMap::new(),
            &job_rows(id, JobState::default(), state, &[], layout),
        )
    }

    /// A job's view and catalog read back from its rows `stored`, as the
    /// store's readers do: the combined row, or the rows apart.
    fn read_job_back(stored: &BTreeMap<(u8, u128), Vec<u8>>) -> (Option<Job>, Option<Catalog>) {
        let view = stored.get(&(JobRow::Job as u8, 0));
        if let Some((job, catalog)) = view.and_then(|v| read_combined(v).unwrap()) {
            return (Some(job), Some(catalog));
        }
        let job = view.map(|v| read_job(v).unwrap());
        let classes = stored.get(&(JobRow::Classes as u8, 0));
        let snapshots = (stored.iter())
            .filter(|((kind, _), _)| *kind == JobRow::Snapshot as u8)
            .map(|(_, v)| read_snapshots(v));
        (job, classes.map(|c| read_catalog(c, snapshots).unwrap()))
    }

    proptest::proptest! {
        /// What a batch keeps of a catalog it changes (`CatalogBefore`)
        /// lays out the rows that comparing the whole catalog before with
        /// it after would, and puts the catalog back as it was: for any
        /// events after any catalog, a snapshot deleted and recorded again
        /// elsewhere, expired, kept, purged, or touched twice.
        #[test]
        fn catalog_changes_lay_out_the_rows_of_the_whole_and_put_it_back(
            given in proptest::collection::vec(op(), 0..12),
            batch in proptest::collection::vec(op(), 1..10),
        ) {
            let (id, mut world) = one_job();
            run_ops(&mut world, id, given);
            let initial = world.catalogs.get(&id).cloned();
            let before = run_ops(&mut world, id, batch);
            let after = world.catalogs.get(&id);
            let mut whole = catalog_rows(id, CatalogWas::Whole(initial.as_ref()), after);
            let mut changed = match &before {
                Some(b) => catalog_rows(id, CatalogWas::Changed(b), after),
                None => catalog_rows(id, CatalogWas::Unchanged, after),
            };
            // Both turn the rows of the catalog before into those after;
            // the whole compared writes only what differs, so no more.
            whole.sort();
            changed.sort();
            let want = stored(id, after);
            proptest::prop_assert_eq!(&apply_rows(stored(id, initial.as_ref()), &whole), &want);
            proptest::prop_assert_eq!(&apply_rows(stored(id, initial.as_ref()), &changed), &want);
            for (k, _) in &whole {
                proptest::prop_assert!(changed.iter().any(|(c, _)| c == k), "{k:?} not written");
            }
            if let Some(b) = before {
                proptest::prop_assert_eq!(b.put_back(after.cloned()), initial);
            }
        }
    }

    proptest::proptest! {
        // Catalogs crossing COMBINED_MAX are a few cases in a hundred.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// In the combined layout, a job's rows of any state read back as
        /// that state, and what a batch writes (from what it changed, or
        /// from the whole job before) turns the rows of the job before into
        /// exactly those laid out from nothing after: a catalog that grows
        /// past `COMBINED_MAX` is taken apart, one that shrinks to it is
        /// combined, and no row of either is left behind.
        #[test]
        fn combined_rows_turn_the_rows_of_one_job_into_those_of_another(
            size in 0u128..24,
            given in proptest::collection::vec(growing_op(), 0..10),
            batch in proptest::prop_oneof![
                proptest::collection::vec(op(), 1..14),
                proptest::collection::vec(growing_op(), 1..14),
            ],
        ) {
            let (id, mut world) = one_job();
            // A catalog of about `size` snapshots, around COMBINED_MAX.
            let first = (0..size).map(|i| Op::Record(i, 4 * i as i64, i % 3 == 0));
            run_ops(&mut world, id, first.chain(given));
            let (job0, initial) = (world.jobs[&id].clone(), world.catalogs.get(&id).cloned());
            let was = JobState { job: Some(&job0), catalog: initial.as_ref() };
            let before = run_ops(&mut world, id, batch);
            let now = JobState { job: world.jobs.get(&id), catalog: world.catalogs.get(&id) };
            let from = stored_job(id, was, Layout::Combined);
            let want = stored_job(id, now, Layout::Combined);
            proptest::prop_assert_eq!(read_job_back(&from), (Some(job0.clone()), initial.clone()));
            proptest::prop_assert_eq!(read_job_back(&want), (now.job.cloned(), now.catalog.cloned()));
            let combined = |rows: &BTreeMap<(u8, u128), Vec<u8>>| rows.len() == 1
                && rows.first_key_value().is_some_and(|(_, v)| v[0] == COMBINED);
            proptest::prop_assert_eq!(combined(&want), is_combined(Layout::Combined, now));
            let whole = job_rows(id, was, now, &[], Layout::Combined);
            let changed_was = Was {
                job: Some(&job0),
                catalog: before.as_ref().map_or(CatalogWas::Unchanged, CatalogWas::Changed),
            };
            let changed = job_rows(id, changed_was, now, &[], Layout::Combined);
            proptest::prop_assert_eq!(&apply_rows(from.clone(), &whole), &want);
            proptest::prop_assert_eq!(&apply_rows(from, &changed), &want);
        }
    }

    #[test]
    fn compact_rows_read_back_as_their_values_and_json_rows_read_alike() {
        use crate::domain::job::{Deployment, DeploymentKind, JobState};
        use crate::domain::{ErrorCode, ProjectId, Schedule};
        let t = Utc.with_ymd_and_hms(2026, 11, 1, 6, 0, 0).unwrap();
        let job = |cluster: Option<&str>| Job {
            job_id: Uuid::from_u128(7),
            project_id: ProjectId::try_from("p1".to_owned()).unwrap(),
            deployment: Deployment {
                kind: DeploymentKind::Shard,
                name: "s0".into(),
                cluster: cluster.map(str::to_owned),
            },
            schedule: Schedule::default(),
            region: None,
            state: JobState::Active,
            phase: None,
            version: 3,
            snapshot_count: 1,
            latest_snapshot_at: Some(t),
            created_at: t,
            last_transition_at: t,
            stopped_at: None,
            initial_sync_done: true,
        };
        for j in [job(Some("c1")), job(None)] {
            let row = job_row(&j);
            assert_eq!(row[0], TIMES_V2);
            assert_eq!(read_job(&row).unwrap(), j);
            let json = serde_json::to_vec(&j).unwrap();
            assert_eq!(read_job(&json).unwrap(), j, "a JSON row reads alike");
            assert!(same_job(&row, &json));
            let v1 = compact(&j);
            assert_eq!(read_job(&v1).unwrap(), j, "a row of COMPACT_V1 reads alike");
            assert!(same_job(&row, &v1));
            assert!(
                row.len() * 2 < json.len() && row.len() + 30 < v1.len(),
                "{} vs {} and {}",
                row.len(),
                json.len(),
                v1.len()
            );
            // The current encoding is canonical: other bytes of the same
            // value are an edit.
            let mut longer = row.clone();
            longer.push(0);
            assert!(read_job(&longer).is_err() && !same_job(&row, &longer));
        }
        // JSON leaves an absent cluster out, as the contract's view does.
        let v = serde_json::to_value(job(None)).unwrap();
        assert!(v["deployment"].get("cluster").is_none(), "{v}");
        for other in [job_row(&job(Some("c1"))), compact(&job(Some("c1")))] {
            assert!(!same_job(&job_row(&job(None)), &other));
        }

        // Times as numbers hold every time chrono does, exactly.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap()
            .and_utc();
        for at in [
            t,
            t + chrono::Duration::nanoseconds(123_456_789),
            leap,
            chrono::DateTime::<Utc>::MIN_UTC,
            chrono::DateTime::<Utc>::MAX_UTC,
            Utc.with_ymd_and_hms(-44, 3, 15, 12, 0, 0).unwrap(),
        ] {
            let mut j = job(None);
            (j.created_at, j.stopped_at, j.latest_snapshot_at) = (at, Some(at), None);
            assert_eq!(read_job(&job_row(&j)).unwrap(), j, "{at:?}");
            let mut s = snap(3, 2);
            (s.taken_at, s.expires_at) = (at, at);
            assert_eq!(read_snapshot(&snapshot_row(&s)).unwrap(), s, "{at:?}");
        }
        // Numbers that are no time are refused, not wrapped.
        let mut row = vec![TIMES_V2];
        row.extend(postcard::to_stdvec(&(Uuid::from_u128(3), (i64::MAX, 0u32))).unwrap());
        assert!(read_snapshot(&row).is_err());

        let s = snap(3, 2);
        assert_eq!(read_snapshot(&snapshot_row(&s)).unwrap(), s);
        assert_eq!(read_snapshot(&compact(&s)).unwrap(), s);
        assert_eq!(read_snapshot(&serde_json::to_vec(&s).unwrap()).unwrap(), s);
        let several = [snap(3, 2), snap(5, 2), snap(6, 3)];
        let row = snapshots_row(&several);
        assert_eq!(row[0], SNAPSHOTS_V2);
        assert_eq!(read_snapshots(&row).unwrap(), several);
        let v1 = postcard_row(SNAPSHOTS_V1, &&several[..]);
        assert_eq!(
            read_snapshots(&v1).unwrap(),
            several,
            "a SNAPSHOTS_V1 row reads alike"
        );
        assert!(
            row.len() + 3 * 25 < v1.len(),
            "{} vs {}",
            row.len(),
            v1.len()
        );
        assert!(read_snapshots(&postcard_row(SNAPSHOTS_V2, &As(&[][..]))).is_err());

        let mut c = catalog(&[], &[1, 2, 9]);
        c.weekly_weeks = [Week(2026, 44), Week(2026, 45)].into_iter().collect();
        c.monthly_months = [Month(2026, 11)].into_iter().collect();
        let row = classes_row(&c);
        let json = serde_json::to_vec(&ClassesRef {
            daily_runs: &c.daily_days,
            weekly_runs: &c.weekly_weeks,
            monthly_runs: &c.monthly_months,
        })
        .unwrap();
        assert_eq!(row[0], COMPACT_V1);
        assert!(
            row.len() * 2 < json.len(),
            "{} vs {}",
            row.len(),
            json.len()
        );
        for stored in [&row, &json] {
            assert!(classes_match(stored, &c));
            assert_eq!(read_catalog(stored, []).unwrap().classes(), c.classes());
        }
        assert!(!classes_match(&row, &Catalog::default()));

        let replies = [
            Reply::accepted(
                Some(Uuid::from_u128(7)),
                Some(3),
                vec![EventRef {
                    seq: 9,
                    event_type: "JobStarted".into(),
                }],
            ),
            {
                let mut r = Reply::error(ErrorCode::VersionConflict, "expected 2");
                r.job_id = Some(Uuid::from_u128(7));
                r.rejection_seq = Some(10);
                r.error.as_mut().unwrap().current_version = Some(3);
                r
            },
        ];
        let digest = blake3::hash(b"a command").to_hex().to_string();
        let fingerprints = [
            digest.clone(),
            digest.to_uppercase(),
            "*".into(),
            "f".repeat(63),
        ];
        for (reply, fingerprint) in replies
            .iter()
            .flat_map(|r| fingerprints.iter().map(move |f| (r, f)))
        {
            let rec = CommandRecord {
                fingerprint: fingerprint.clone().into(),
                reply: reply.clone(),
            };
            let row = record_row(&rec);
            assert_eq!(row[0], RECORD_V2);
            let back = read_record(&row).unwrap();
            // Read back as the text it was made from, whichever form it took.
            assert_eq!(back.fingerprint.to_string(), *fingerprint);
            assert_eq!(
                (back.fingerprint, back.reply),
                (rec.fingerprint.clone(), rec.reply.clone())
            );
            // The layouts before it read alike.
            let json = serde_json::to_vec(&rec).unwrap();
            let back = read_record(&json).unwrap();
            assert_eq!(
                (&back.fingerprint, &back.reply),
                (&rec.fingerprint, &rec.reply)
            );
            let v1 = record_row_v1(&rec);
            let back = read_record(&v1).unwrap();
            assert_eq!(
                (&back.fingerprint, &back.reply),
                (&rec.fingerprint, &rec.reply)
            );
            assert!(v1.len() < json.len());
            // Other fingerprints cost the byte that says so.
            assert!(row.len() <= v1.len() + 1);
        }
        // A digest takes its 32 bytes, and a known event type one byte: the
        // record of one event is about half its first compact layout.
        let rec = CommandRecord {
            fingerprint: digest.into(),
            reply: replies[0].clone(),
        };
        assert_eq!(record_row(&rec).len(), 61);
        assert_eq!(record_row_v1(&rec).len(), 102);

        // Trailing bytes, an event type past the list, a cut record: refused.
        let row = record_row(&rec);
        assert!(read_record(&[row.as_slice(), &[0]].concat()).is_err());
        assert!(read_record(&row[..row.len() - 1]).is_err());
        let mut unknown = row.clone();
        let at = unknown.len() - 3; // JobStarted's code, no error, no rejection
        assert_eq!(unknown[at - 2..], [9, 0, 1, 0, 0]);
        unknown[at] = EVENT_TYPES.len() as u8;
        let err = read_record(&unknown).map(|_| ()).unwrap_err();
        assert!(err.contains("event type 15"), "{err}");
        // A type bcp does not list is kept by its name.
        let mut odd = rec.clone();
        odd.reply.events[0].event_type = "SomethingNew".into();
        assert_eq!(read_record(&record_row(&odd)).unwrap().reply, odd.reply);
    }

    /// A record as the first compact layout wrote it.
    fn record_row_v1(r: &CommandRecord) -> Vec<u8> {
        #[derive(Serialize)]
        struct StoredRecordRef<'a> {
            fingerprint: &'a str,
            ok: bool,
            job_id: Option<Uuid>,
            version: Option<u64>,
            events: &'a [EventRef],
            error: Option<(ErrorCode, &'a str, Option<u64>)>,
            rejection_seq: Option<u64>,
        }
        let reply = &r.reply;
        compact(&StoredRecordRef {
            fingerprint: &r.fingerprint.to_string(),
            ok: reply.ok,
            job_id: reply.job_id,
            version: reply.version,
            events: &reply.events,
            error: (reply.error.as_ref()).map(|e| (e.code, e.message.as_str(), e.current_version)),
            rejection_seq: reply.rejection_seq,
        })
    }

    #[test]
    fn records_list_every_event_type_once() {
        let schema = serde_json::to_value(schemars::schema_for!(crate::domain::Event)).unwrap();
        let mut types: Vec<String> = schema["oneOf"]
            .as_array()
            .expect("one schema per event type")
            .iter()
            .map(|v| {
                let t = &v["properties"]["type"];
                t["const"]
                    .as_str()
                    .or(t["enum"][0].as_str())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        types.sort();
        let mut listed: Vec<String> = EVENT_TYPES.iter().map(|t| t.to_string()).collect();
        listed.sort();
        assert_eq!(listed, types);
        // The codes stored records hold: a type keeps its place forever
        // (new types go at the end, and are added here).
        let codes = [
            (0, "JobCreated"),
            (1, "JobStarted"),
            (2, "JobStopped"),
            (3, "JobTerminated"),
            (4, "SnapshotsPurged"),
            (5, "RegionAssigned"),
            (6, "JobMisconfigured"),
            (7, "JobReconfigured"),
            (8, "ScheduleChanged"),
            (9, "SnapshotRecorded"),
            (10, "SnapshotDeleted"),
            (11, "SnapshotExpiryChanged"),
            (12, "SnapshotExpired"),
            (13, "RegionConfigured"),
            (14, "CommandRejected"),
        ];
        for (code, name) in codes {
            assert_eq!(EVENT_TYPES[code], name);
        }
    }

    #[test]
    fn index_rows_hold_their_seqs_grow_in_place_and_refuse_other_bytes() {
        let seqs = [5u64, 6, 9, 200, 70_000, u64::MAX];
        for n in 1..=seqs.len() {
            let (first, row) = index_row(&seqs[..n]);
            assert_eq!(first, 5);
            assert_eq!(row.is_empty(), n == 1, "one seq: the old empty row");
            assert_eq!(read_index(first.into(), &row).unwrap(), seqs[..n]);
            // Grown in place, it is the row of all its seqs, byte for byte.
            for k in 1..n {
                let (_, mut grown) = index_row(&seqs[..k]);
                index_extend(&mut grown, seqs[k - 1], &seqs[k..n]);
                assert_eq!(grown, row, "{k} then {n}");
                // Joined to the row of the rest, likewise.
                let (_, mut joined) = index_row(&seqs[..k]);
                let (rest_first, rest) = index_row(&seqs[k..n]);
                index_join(&mut joined, seqs[k - 1], rest_first, &rest);
                assert_eq!(joined, row, "{k} joined to {n}");
                assert_eq!(index_last(first.into(), &row).unwrap(), seqs[n - 1]);
            }
        }
        assert_eq!(index_row(&[5, 6, 9, 200]).1, [COMPACT_V1, 1, 3, 191, 1]);
        // The layout's rows, one per INDEX_ROW_MAX seqs, keyed by their first.
        let many: Vec<u64> = (1..=INDEX_ROW_MAX as u64 + 1).map(|s| s * 2).collect();
        let rows = job_rows(
            Uuid::from_u128(7),
            JobState::default(),
            JobState::default(),
            &many,
            Layout::Combined,
        );
        let keys: Vec<_> = rows.iter().map(|(k, _)| *k).collect();
        let job = 7u128;
        let last = 2 * (INDEX_ROW_MAX as u128 + 1);
        assert_eq!(
            keys,
            [JobRow::Event.key(job, 2), JobRow::Event.key(job, last)]
        );
        let back: Vec<u64> = rows
            .iter()
            .flat_map(|(k, v)| read_index(k.2, v.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(back, many);
        let bad: [&[u8]; 6] = [
            &[COMPACT_V1],
            &[COMPACT_V1, 0],
            &[COMPACT_V1, 0x81],
            &[COMPACT_V1, 0x81, 0],
            &[
                COMPACT_V1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
            b"{}",
        ];
        for row in bad {
            assert!(read_index(1, row).is_err(), "{row:?}");
        }
        assert!(
            read_index(u128::from(u64::MAX - 1), &[COMPACT_V1, 2]).is_err(),
            "past u64"
        );
        assert!(
            read_index(u128::from(u64::MAX) + 1, &[]).is_err(),
            "a key past u64"
        );
    }

    #[test]
    fn a_class_row_of_the_listed_layout_reads_as_runs() {
        let listed = br#"{"daily_days":["2026-11-01","2026-11-02","2026-11-04"],
            "weekly_weeks":[[2026,44],[2026,45]],"monthly_months":[[2026,11]]}"#;
        let c = read_catalog(listed, []).unwrap();
        let day = |d| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        assert_eq!(c.daily_days.runs(), &[(day(1), day(2)), (day(4), day(4))]);
        assert_eq!(c.weekly_weeks.runs(), &[(Week(2026, 44), Week(2026, 45))]);
        assert_eq!(
            c.monthly_months.runs(),
            &[(Month(2026, 11), Month(2026, 11))]
        );
        // Written back as runs, compact, and read back the same; the JSON
        // layout of runs (before the compact one) reads alike.
        let row = classes_row(&c);
        assert_eq!(row[0], COMPACT_V1);
        assert_eq!(read_catalog(&row, []).unwrap(), c);
        let runs = br#"{"daily_runs":[["2026-11-01","2026-11-02"],["2026-11-04","2026-11-04"]],"weekly_runs":[[[2026,44],[2026,45]]],"monthly_runs":[[[2026,11],[2026,11]]]}"#;
        assert_eq!(read_catalog(runs, []).unwrap(), c);
        let mut longer = row.clone();
        longer.push(0);
        assert!(read_catalog(&longer, []).is_err(), "one value a row");
        assert!(read_catalog(br#"{"daily_runs":[]}"#, []).is_err());
        let extra = br#"{"daily_runs":[],"weekly_runs":[],"monthly_runs":[],"x":1}"#;
        assert!(
            read_catalog(extra, []).is_err(),
            "unknown fields are refused"
        );
    }
}
