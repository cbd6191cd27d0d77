//! The steps of the write side: decide a command against the in-memory
//! [`World`], append what it decided to the hash-chained log, and lay out
//! the rows a batch writes (events, idempotency records, projection rows)
//! for ONE `Durability::Immediate` transaction ([`Store::commit`]).
//!
//! A batch goes `begin` → `decide` (per command) → `seal` (its rows, and
//! what it decided) → [`Store::commit`] → `committed` (its replies may go
//! out) or `undo` (the in-memory state is put back as it is on disk). The
//! order those steps may run in, with one batch committing while the next
//! is decided, is owned by [`Pipeline`](super::pipeline::Pipeline), the only
//! caller of the steps. `push` holds the invariants every appended event
//! meets (gapless seq, chained hash, per-job version), as assertions.

use super::rows::{CatalogWas, JobKey, JobState, Row, Was};
use super::tables::*;
use super::{CommandRecord, Result, Store, StoreError, decode_envelope};
use crate::domain::catalog::CatalogBefore;
use crate::domain::command::Fingerprint;
use crate::domain::envelope::{GENESIS_HASH, Route};
use crate::domain::event::SCHEMA_VERSION;
use crate::domain::rejection::Rejection;
use crate::domain::reply::EventFacts;
use crate::domain::{
    CommandEnvelope, Envelope, ErrorCode, Event, Job, Name, Region, Reply, World, decide,
};
use chrono::{DateTime, Utc};
use redb::ReadableTable;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// Events at the end of the log re-checked on every open.
pub const TAIL_CHECKED: u64 = 1024;

/// The startup check: the last `n` events link and hash correctly, and every
/// job they touch has the stored version its last event gave it, so a store
/// whose log and projections disagree (a torn copy, a manual edit) is refused
/// instead of served. `bcp audit verify` checks the whole log.
fn check_tail(store: &Store, world: &World, head_seq: u64, n: u64) -> Result<()> {
    let from = head_seq.saturating_sub(n) + 1;
    let tail = store.events(from, head_seq)?;
    let bad = |seq: u64, what: String| {
        Err(StoreError::Corrupt(format!(
            "startup check at seq {seq}: {what}; run `bcp audit verify`"
        )))
    };
    let mut versions: BTreeMap<Uuid, u64> = BTreeMap::new();
    for (i, env) in tail.iter().enumerate() {
        if env.seq != from + i as u64 {
            return bad(from + i as u64, format!("found seq {}", env.seq));
        }
        if env.compute_hash() != env.hash {
            return bad(env.seq, "hash does not match the event".into());
        }
        if i > 0 && env.prev_hash != tail[i - 1].hash {
            return bad(
                env.seq,
                "prev_hash does not link to the event before".into(),
            );
        }
        if let (Some(job), Some(v)) = (env.job_id, env.job_version) {
            versions.insert(job, v);
        }
    }
    for (job, v) in versions {
        let stored = world.jobs.get(&job).map(|j| j.version);
        if stored != Some(v) {
            return Err(StoreError::Corrupt(format!(
                "startup check: job {job} is at version {v} in the log but {stored:?} in the stored projection; run `bcp audit verify`"
            )));
        }
    }
    Ok(())
}

/// A decoded command waiting for the writer.
#[derive(Clone, Debug)]
pub struct Pending {
    pub cmd: CommandEnvelope,
    pub fingerprint: Fingerprint,
    /// bcp's own command (the retention sweeper): when it decides nothing,
    /// no idempotency record is kept, so an idle sweep writes nothing.
    pub internal: bool,
}

impl Pending {
    pub fn new(cmd: CommandEnvelope) -> Pending {
        let fingerprint = cmd.fingerprint();
        Pending {
            cmd,
            fingerprint,
            internal: false,
        }
    }
}

/// Where event ids come from: UUID v7 from the clock when serving, a counter
/// in tests. Passed in, so the append path stays deterministic under test.
pub type IdSource<'a> = &'a mut dyn FnMut() -> Uuid;

/// The log head and the projections as decided so far, and the steps of a
/// batch. Only the [`Pipeline`](super::pipeline::Pipeline) drives the steps.
pub struct Ledger {
    store: Store,
    world: World,
    head_seq: u64,
    head_hash: String,
    head_time: Option<DateTime<Utc>>,
    /// Idempotency records of batches decided but not yet known committed
    /// (the writer decides the next batch while the previous one commits).
    uncommitted: HashMap<u128, CommandRecord>,
    /// The committed idempotency records, opened ahead for the next batch
    /// when a batch is sealed (no commit runs then). redb's `begin_read`
    /// waits for a running commit to finish its fsync; opened at a batch's
    /// first command, while the batch before commits, it stalled deciding
    /// for a whole commit, every command in flight with it. It sees every
    /// commit whose records have left `uncommitted` (dropped when they
    /// leave without a batch open: the next `begin` reads afresh, and no
    /// commit runs before it).
    ahead: Option<super::commands::Committed>,
}

/// Prior values of everything a batch touched, to undo a failed commit.
#[derive(Default)]
struct Undo {
    jobs: BTreeMap<Uuid, JobUndo>,
    regions: BTreeMap<Name, Option<Region>>,
    head: (u64, String, Option<DateTime<Utc>>),
}

/// A job as it was before a batch changed it.
struct JobUndo {
    job: Option<Job>,
    /// What the batch changed of its catalog (`None`: nothing): its
    /// classes and the snapshots its events touched, as they were. No
    /// copy of the rest: a command costs what it changes of a catalog
    /// that may hold hundreds of snapshots.
    catalog: Option<CatalogBefore>,
}

/// What a batch decided, held in memory until its commit settles: the
/// replies it may send, and how to undo it.
pub(super) struct Decided {
    replies: Vec<Reply>,
    undo: Undo,
    /// The idempotency records it added to `Ledger::uncommitted`.
    records: Vec<u128>,
    /// The log head once the batch is committed.
    head_seq: u64,
}

impl Decided {
    pub(super) fn len(&self) -> usize {
        self.replies.len()
    }

    pub(super) fn head_seq(&self) -> u64 {
        self.head_seq
    }
}

/// A batch being decided: the rows it will write, and what it decided.
pub(super) struct Batch {
    now: DateTime<Utc>,
    /// Committed idempotency records, as of the batch's start.
    commands: super::commands::Committed,
    rows: Rows,
    /// The seqs of the batch's events about each job (its event index).
    seqs: BTreeMap<Uuid, Vec<u64>>,
    decided: Decided,
}

impl Batch {
    pub(super) fn len(&self) -> usize {
        self.decided.replies.len()
    }
}

/// Everything one batch writes, in one durable transaction.
#[derive(Default)]
struct Rows {
    /// `(seq, stored bytes, where it is published)`, in seq order.
    events: Vec<(u64, Vec<u8>, Route)>,
    /// The idempotency records of the batch's commands.
    commands: Vec<(u128, Vec<u8>)>,
    /// Records rewritten: of a command decided earlier whose events went
    /// on in this batch (a group follower's).
    rewritten: Vec<(u128, Vec<u8>)>,
    /// The rows of the jobs the batch touched (views, catalogs, event
    /// index); `None`: remove.
    job_rows: Vec<Row<JobKey>>,
    regions: Vec<(String, Vec<u8>)>,
    /// The batch's time: the records' UUIDv7 bound (`records::v7_bound_at`).
    now: DateTime<Utc>,
    /// The stream acknowledged the log through this seq (`ACKNOWLEDGED`,
    /// raised in the batch's own transaction): a group follower's batch,
    /// or a group leader's (what was acknowledged when it was committed).
    acknowledged: Option<u64>,
}

impl Rows {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.commands.is_empty()
            && self.rewritten.is_empty()
            && self.job_rows.is_empty()
            && self.regions.is_empty()
    }
}

/// The rows of a sealed batch: what [`Store::commit`] writes, on any thread.
pub struct Prepared {
    rows: Rows,
}

impl Prepared {
    /// A group leader's batch: JetStream has acknowledged the log through
    /// `seq` (never lowers the mark: the store keeps the higher).
    pub fn raise_acknowledged(&mut self, seq: u64) {
        self.rows.acknowledged = self.rows.acknowledged.max(Some(seq));
    }

    /// Whether committing it writes anything (else no transaction runs).
    pub fn has_rows(&self) -> bool {
        !self.rows.is_empty()
    }

    /// The batch's events, `(seq, stored bytes, route)` in seq order:
    /// once committed, what the relay publishes, where.
    pub fn into_events(self) -> Vec<(u64, Vec<u8>, Route)> {
        self.rows.events
    }
}

impl Store {
    /// Write a prepared batch in ONE `Durability::Immediate` transaction:
    /// its events, idempotency records and region rows, and the job rows
    /// [`behind`](super::behind) says are due; the batch's own job rows are
    /// held behind once it committed, and its records held among the
    /// recent ones ([`records`](super::records)) if they wait (both are
    /// taken out of `p`, which keeps its events for the relay). On `Err`, nothing of it was
    /// written (but see [`StoreError::CommitFailed`]).
    pub fn commit(&self, p: &mut Prepared) -> Result<()> {
        if p.rows.is_empty() {
            // Only answers already durable (retries, an idle sweep): no fsync.
            return Ok(());
        }
        let _one = self.inner.one_writer();
        let mut txn = self.writable()?.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let job_rows = std::mem::take(&mut p.rows.job_rows);
        let records = std::mem::take(&mut p.rows.commands);
        let rewritten = std::mem::take(&mut p.rows.rewritten);
        let r = &p.rows;
        {
            let mut events = txn.open_table(EVENTS)?;
            for (seq, bytes, _) in &r.events {
                events.insert(*seq, bytes.as_slice())?;
            }
            if !r.regions.is_empty() {
                let mut regions = txn.open_table(REGIONS)?;
                for (name, bytes) in &r.regions {
                    regions.insert(name.as_str(), bytes.as_slice())?;
                }
            }
        }
        // Appended to the recent records, with the sweep's next slice
        // merged ([`records`](super::records)); applied once committed.
        let v7_bound = super::records::v7_bound_at(r.now);
        let plan = self.inner.recent().plan(records, rewritten, Some(v7_bound));
        plan.write(&txn)?;
        if let Some(seq) = r.acknowledged {
            let mut t = txn.open_table(CHECKPOINT)?;
            // Raised, never lowered.
            if t.get(ACKNOWLEDGED)?.is_none_or(|v| v.value() < seq) {
                t.insert(ACKNOWLEDGED, seq)?;
            }
        }
        let seqs = (r.events.first()).zip(r.events.last());
        self.commit_rows(txn, seqs.map(|(first, last)| first.0..=last.0), job_rows)?;
        self.inner.recent().committed(plan);
        Ok(())
    }
}

impl Ledger {
    /// Load the projections and the log head. Refuses a store whose
    /// projections are not at the log's head.
    pub fn open(store: Store) -> Result<Ledger> {
        let world = store.load_world()?;
        let (head_seq, head_hash, head_time, count) = {
            let txn = store.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let count = redb::ReadableTableMetadata::len(&events)?;
            match events.last()? {
                None => (0, GENESIS_HASH.to_owned(), None, count),
                Some((k, v)) => {
                    let env = decode_envelope(k.value(), v.value())?;
                    (env.seq, env.hash, Some(env.recorded_at), count)
                }
            }
        };
        if head_seq != count {
            return Err(StoreError::Corrupt(format!(
                "the log holds {count} events but its last seq is {head_seq}: there is a gap"
            )));
        }
        check_tail(&store, &world, head_seq, TAIL_CHECKED)?;
        store.index_projects(&world);
        Ok(Ledger {
            store,
            world,
            head_seq,
            head_hash,
            head_time,
            uncommitted: HashMap::new(),
            ahead: None,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The projections as decided so far (including a batch not yet committed).
    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    pub fn head_hash(&self) -> &str {
        &self.head_hash
    }

    /// Start a batch decided at `now` (never before the log's last time, even
    /// if the wall clock went back, so replay "as of a time" is always a
    /// prefix of the log).
    pub(super) fn begin(&mut self, now: DateTime<Utc>) -> Result<Batch> {
        let now = self.head_time.map_or(now, |t| now.max(t));
        let commands = match self.ahead.take() {
            Some(commands) => commands,
            None => self.committed_records()?,
        };
        Ok(Batch {
            now,
            commands,
            rows: Rows {
                now,
                ..Rows::default()
            },
            seqs: BTreeMap::new(),
            decided: Decided {
                replies: Vec::new(),
                undo: Undo {
                    head: (self.head_seq, self.head_hash.clone(), self.head_time),
                    ..Undo::default()
                },
                records: Vec::new(),
                head_seq: self.head_seq,
            },
        })
    }

    fn committed_records(&self) -> Result<super::commands::Committed> {
        super::commands::Committed::new(self.store.begin_read()?.open_table(COMMANDS)?)
    }

    /// Open the committed records for the next batch now; only while no
    /// commit runs. A failed read is left to that batch's `begin` to report.
    fn read_ahead(&mut self) {
        self.ahead = self.committed_records().ok();
    }

    /// Decide one command into `b`, after the ones already in it. On `Err`
    /// (a storage read failed) `b` must be [abandoned](Ledger::abandon).
    pub(super) fn decide(
        &mut self,
        b: &mut Batch,
        p: &Pending,
        next_id: IdSource<'_>,
    ) -> Result<()> {
        let reply = self.decide_one(b, p, next_id)?;
        b.decided.replies.push(reply);
        Ok(())
    }

    /// Close `b`: serialize the projection rows it changed. The rows go to
    /// [`Store::commit`]; what it decided stays until the commit settles
    /// ([`Ledger::committed`] or [`Ledger::undo`]).
    pub(super) fn seal(&mut self, b: Batch) -> (Prepared, Decided) {
        let Batch {
            mut rows,
            seqs,
            mut decided,
            ..
        } = b;
        // Sealed only when no commit runs (the pipeline commits one batch
        // at a time), so this does not wait: the next batch, decided while
        // this one commits, starts from it.
        if self.ahead.is_none() {
            self.read_ahead();
        }
        let touched: std::collections::BTreeSet<Uuid> = decided
            .undo
            .jobs
            .keys()
            .chain(seqs.keys())
            .copied()
            .collect();
        // Jobs the batch created are listed by their project from now on
        // (the listing skips them until they are committed).
        let created: Vec<_> = (decided.undo.jobs.iter())
            .filter(|(_, u)| u.job.is_none())
            .filter_map(|(id, _)| Some((&self.world.jobs.get(id)?.project_id, id.as_u128())))
            .collect();
        if !created.is_empty() {
            self.store.index_jobs(created);
        }
        // In job order, each job's rows in key order: one job's rows are
        // neighbours in one B-tree.
        for id in touched {
            let after = JobState {
                job: self.world.jobs.get(&id),
                catalog: self.world.catalogs.get(&id),
            };
            let before = match decided.undo.jobs.get(&id) {
                Some(u) => Was {
                    job: u.job.as_ref(),
                    catalog: u
                        .catalog
                        .as_ref()
                        .map_or(CatalogWas::Unchanged, CatalogWas::Changed),
                },
                None => Was {
                    job: after.job,
                    catalog: CatalogWas::Unchanged,
                },
            };
            let new_seqs = seqs.get(&id).map_or(&[][..], Vec::as_slice);
            // A store opened for writing lays its rows out combined.
            let layout = super::rows::Layout::Combined;
            (rows.job_rows).extend(super::rows::job_rows(id, before, after, new_seqs, layout));
        }
        for name in decided.undo.regions.keys() {
            if let Some(r) = self.world.regions.get(name) {
                rows.regions.push((
                    name.as_str().to_owned(),
                    serde_json::to_vec(r).expect("region serializes"),
                ));
            }
        }
        decided.head_seq = self.head_seq;
        (Prepared { rows }, decided)
    }

    /// `d`'s batch is durable: its replies may go out. Its idempotency
    /// records leave `uncommitted`, unless a batch is open: that batch reads
    /// committed records as of its start, before `d` committed, so they stay
    /// until it is settled too (a retry decided into it is a duplicate).
    pub(super) fn committed(&mut self, mut d: Decided, open: Option<&mut Batch>) -> Vec<Reply> {
        match open {
            Some(b) => {
                debug_assert!(self.ahead.is_none(), "the open batch took it");
                b.decided.records.append(&mut d.records)
            }
            None => {
                for id in &d.records {
                    self.uncommitted.remove(id);
                }
                // Records opened ahead before this commit lack these.
                self.ahead = None;
            }
        }
        d.replies
    }

    /// `d`'s batch was not committed: put the in-memory state back as it was
    /// before it. Batches decided after it must be undone first (newest
    /// first); the pipeline keeps that order.
    pub(super) fn undo(&mut self, d: Decided) {
        for id in &d.records {
            self.uncommitted.remove(id);
        }
        let undo = d.undo;
        for (id, u) in undo.jobs {
            match u.job {
                Some(j) => self.world.jobs.insert(id, j),
                None => self.world.jobs.remove(&id),
            };
            if let Some(before) = u.catalog {
                let now = self.world.catalogs.get(&id).cloned();
                self.world.set_catalog(id, before.put_back(now));
            }
        }
        for (name, region) in undo.regions {
            match region {
                Some(r) => self.world.regions.insert(name, r),
                None => self.world.regions.remove(&name),
            };
        }
        (self.head_seq, self.head_hash, self.head_time) = undo.head;
    }

    /// Undo a batch that was never sealed (its rows are dropped unbuilt).
    pub(super) fn abandon(&mut self, b: Batch) {
        self.undo(b.decided);
    }

    /// The idempotency record of `command_id`, if any: decided in a batch
    /// not yet committed, or committed.
    fn record(&self, b: &Batch, key: u128, command_id: Uuid) -> Result<Option<CommandRecord>> {
        if let Some(rec) = self.uncommitted.get(&key) {
            return Ok(Some(rec.clone()));
        }
        let read = |bytes: &[u8]| {
            super::rows::read_record(bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("command record {command_id}: {e}")))
        };
        if let Some(rec) = self.store.recent_record(key) {
            return read(&rec);
        }
        match b.commands.lookup(key)? {
            None => Ok(None),
            Some(rec) => read(&rec),
        }
    }

    fn decide_one(&mut self, b: &mut Batch, p: &Pending, next_id: IdSource<'_>) -> Result<Reply> {
        let cmd = &p.cmd;
        let key = cmd.command_id.as_u128();
        if let Some(rec) = self.record(b, key, cmd.command_id)? {
            if !rec.fingerprint.admits(cmd, &p.fingerprint) {
                return Ok(Reply::error(
                    ErrorCode::CommandIdConflict,
                    format!(
                        "command_id {} was already used for a different command",
                        cmd.command_id
                    ),
                ));
            }
            return Ok(Reply {
                duplicate: true,
                ..rec.reply
            });
        }
        let now = b.now;
        let reply = match decide(&self.world, cmd, now) {
            Ok(decided) if decided.is_empty() => {
                // A no-op: the job's version as it stands.
                let version = cmd
                    .job_id
                    .and_then(|id| self.world.jobs.get(&id))
                    .map(|j| j.version);
                Reply::accepted(cmd.job_id, version, Vec::new())
            }
            Ok(decided) => {
                let envs: Vec<Envelope> = decided
                    .into_iter()
                    .map(|d| self.append(b, cmd, d.project_id, d.job_id, d.event, next_id))
                    .collect();
                let facts: Vec<EventFacts> = envs.iter().map(EventFacts::of).collect();
                Reply::of_events(cmd.job_id, &facts)
            }
            Err(rejection) if rejection.code.is_audited() => {
                let env = self.append_rejection(b, cmd, &rejection, next_id);
                Reply::of_events(cmd.job_id, &[EventFacts::of(&env)])
            }
            // A value only checkable against state: bad input, not recorded.
            Err(rejection) => return Ok(Reply::rejected(cmd.job_id, &rejection, None)),
        };
        if p.internal && reply.events.is_empty() {
            return Ok(reply);
        }
        let rec = CommandRecord {
            fingerprint: p.fingerprint.clone(),
            reply: reply.clone(),
        };
        b.rows.commands.push((key, super::rows::record_row(&rec)));
        b.decided.records.push(key);
        self.uncommitted.insert(key, rec);
        Ok(reply)
    }

    fn append_rejection(
        &mut self,
        b: &mut Batch,
        cmd: &CommandEnvelope,
        r: &Rejection,
        next_id: IdSource<'_>,
    ) -> Envelope {
        let event = Event::CommandRejected {
            verb: cmd.verb,
            code: r.code,
            reason: r.message.clone(),
            state: r.state,
            expected_version: cmd.expected_version,
            current_version: r.current_version,
        };
        self.append(b, cmd, cmd.project_id.clone(), cmd.job_id, event, next_id)
    }

    fn append(
        &mut self,
        b: &mut Batch,
        cmd: &CommandEnvelope,
        project_id: crate::domain::ProjectId,
        job_id: Option<Uuid>,
        event: Event,
        next_id: IdSource<'_>,
    ) -> Envelope {
        let job_version = match (job_id, event.is_job_change()) {
            (Some(id), true) => Some(self.world.jobs.get(&id).map_or(0, |j| j.version) + 1),
            _ => None,
        };
        let mut env = Envelope {
            seq: self.head_seq + 1,
            event_id: next_id(),
            schema_version: SCHEMA_VERSION,
            project_id,
            job_id,
            job_version,
            command_id: cmd.command_id,
            actor: cmd.actor.clone(),
            actor_verified: cmd.actor_verified,
            recorded_at: b.now,
            prev_hash: String::new(),
            event,
            hash: String::new(),
        };
        let bytes = env.seal_to_json(&self.head_hash);
        self.push(b, &env, bytes);
        env
    }

    /// Add a sealed event that continues the log to the batch: its rows,
    /// and its effect on the in-memory state (remembering what it changes,
    /// to undo a failed commit).
    fn push(&mut self, b: &mut Batch, env: &Envelope, bytes: Vec<u8>) {
        assert_eq!(env.seq, self.head_seq + 1, "the log is gapless");
        assert_eq!(env.prev_hash, self.head_hash, "the log is chained");
        // What `audit verify` will ask of it: every test of the write path
        // checks the decider against the audit's rules (a lookup or two;
        // in debug builds only).
        debug_assert_eq!(
            self.world.admits(env),
            Ok(()),
            "{} is a decision the state machine allows",
            env.event.type_name()
        );
        if let Some(id) = env.job_id.filter(|_| env.job_version.is_some()) {
            let before = self.world.jobs.get(&id);
            assert_eq!(
                env.job_version,
                Some(before.map_or(0, |j| j.version) + 1),
                "a job's versions count its changes from 1"
            );
            let undo = (b.decided.undo.jobs.entry(id)).or_insert_with(|| JobUndo {
                job: before.cloned(),
                catalog: None,
            });
            if World::changes_catalog(&env.event) {
                let now = self.world.catalogs.get(&id);
                (undo.catalog.get_or_insert_with(|| CatalogBefore::of(now))).note(now, &env.event);
            }
        }
        if let Event::RegionConfigured { region, .. } = &env.event {
            b.decided
                .undo
                .regions
                .entry(region.clone())
                .or_insert_with(|| self.world.regions.get(region).cloned());
        }
        b.rows.events.push((env.seq, bytes, env.route()));
        if let Some(id) = env.job_id {
            b.seqs.entry(id).or_default().push(env.seq);
        }
        self.world.evolve(env);
        self.head_seq = env.seq;
        self.head_hash = env.hash.clone();
        self.head_time = Some(env.recorded_at);
    }

    /// Follow a log decided elsewhere (a group-mode follower applying the
    /// leader's events from the stream): `events` are the stored bytes of
    /// the events that continue this log, each checked here (its seq, its
    /// link to the head, its hash, its job version, a decision the state
    /// machine allows there) before it is applied.
    /// Returns the batch to seal and commit; on `Err` (an event that does
    /// not continue this log) nothing was applied. The idempotency records
    /// of their commands are rebuilt from the log, as import does (a command
    /// whose events began earlier is rebuilt whole).
    pub(super) fn follow(&mut self, events: Vec<Vec<u8>>) -> Result<Batch> {
        let Some(first) = events.first() else {
            return self.begin(Utc::now());
        };
        let first = decode_envelope(self.head_seq + 1, first)?;
        // The head's command may go on in `events`: its earlier events count.
        let mut by_command: BTreeMap<Uuid, Vec<Envelope>> = BTreeMap::new();
        let head_command = first.command_id;
        let mut seq = self.head_seq;
        while seq > 0 {
            let env = self.store.events(seq, seq)?.pop().expect("seq <= head");
            if env.command_id != first.command_id {
                break;
            }
            by_command.entry(env.command_id).or_default().insert(0, env);
            seq -= 1;
        }
        // That command's record exists: it is rewritten whole.
        let rewrites_head = !by_command.is_empty();
        let mut b = self.begin(first.recorded_at)?;
        for bytes in events {
            let env = match self.continues(&bytes) {
                Ok(env) => env,
                Err(e) => {
                    self.abandon(b);
                    return Err(e);
                }
            };
            self.push(&mut b, &env, bytes);
            by_command.entry(env.command_id).or_default().push(env);
        }
        // The records' UUIDv7 bound: the time of the last event followed
        // (a catch-up batch may span more than the bound's hour).
        b.rows.now = self.head_time.unwrap_or(b.rows.now);
        // Read from the stream: acknowledged by it.
        b.rows.acknowledged = Some(self.head_seq);
        for (id, evs) in by_command {
            let rec = CommandRecord {
                fingerprint: Fingerprint::of_logged(&evs[0]),
                reply: Reply::from_events(&evs.iter().collect::<Vec<_>>()),
            };
            let row = (id.as_u128(), super::rows::record_row(&rec));
            // A record that exists is rewritten where it is: the head's
            // command, or one this node recorded as leader (a no-op, which
            // the log does not hold) that the new leader applied.
            let exists = match self.record(&b, id.as_u128(), id) {
                Ok(found) => found.is_some() || id == head_command && rewrites_head,
                Err(e) => {
                    self.abandon(b);
                    return Err(e);
                }
            };
            match exists {
                true => b.rows.rewritten.push(row),
                false => b.rows.commands.push(row),
            }
        }
        Ok(b)
    }

    /// The event `bytes`, if it continues this log: the next seq, linked to
    /// the head, its own hash, the next version of its job, legal where it
    /// stands ([`World::admits`]).
    fn continues(&self, bytes: &[u8]) -> Result<Envelope> {
        let seq = self.head_seq + 1;
        let mut env = decode_envelope(seq, bytes)?;
        let bad = |what: &str| Err(StoreError::Corrupt(format!("event at seq {seq}: {what}")));
        if env.seq != seq {
            return bad(&format!("it says seq {} (gap or reorder)", env.seq));
        }
        if env.prev_hash != self.head_hash {
            return bad("prev_hash does not link to this log's head");
        }
        if let Err(what) = env.check_stored(bytes) {
            return bad(what);
        }
        if let Err(what) = self.world.version_follows(&env) {
            return bad(&what);
        }
        if self.head_time.is_some_and(|t| env.recorded_at < t) {
            return bad(
                "recorded_at is earlier than the head's (time only moves forward in the log)",
            );
        }
        // Also that job_version is set exactly on a job's changes.
        if let Err(why) = self.world.admits(&env) {
            let event = env.event.type_name();
            return bad(&format!("{event} is not a decision this log allows: {why}"));
        }
        Ok(env)
    }
}
