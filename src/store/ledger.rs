//! The write side: decide a batch of commands in order against the in-memory
//! [`World`], append what was decided to the hash-chained log, and commit the
//! events, idempotency records, projection rows and relay cursor in ONE
//! `Durability::Immediate` transaction. Only the writer holds a [`Ledger`].
//!
//! If the commit fails, the in-memory state is rolled back to what is on disk
//! and every command of the batch is answered `unavailable`: nothing
//! acknowledged is ever missing from the log.

use super::tables::*;
use super::{CommandRecord, Result, Store, StoreError, decode_envelope};
use crate::domain::decide::Rejection;
use crate::domain::envelope::GENESIS_HASH;
use crate::domain::event::SCHEMA_VERSION;
use crate::domain::reply::EventRef;
use crate::domain::{
    Catalog, CommandEnvelope, Envelope, ErrorCode, Event, Job, Name, Region, Reply, World, decide,
};
use chrono::{DateTime, Utc};
use redb::{ReadableDatabase, ReadableTable, Table};
use std::collections::BTreeMap;
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
    pub fingerprint: String,
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

pub struct Ledger {
    store: Store,
    world: World,
    head_seq: u64,
    head_hash: String,
    head_time: Option<DateTime<Utc>>,
}

/// Prior values of everything a batch touched, to undo a failed commit.
#[derive(Default)]
struct Undo {
    jobs: BTreeMap<Uuid, (Option<Job>, Option<Catalog>)>,
    regions: BTreeMap<Name, Option<Region>>,
}

struct Tables<'t> {
    events: Table<'t, u64, &'static [u8]>,
    job_log: Table<'t, (u128, u64), ()>,
    commands: Table<'t, u128, &'static [u8]>,
}

impl Ledger {
    /// Load the projections and the log head. Refuses a store whose
    /// projections are not at the log's head.
    pub fn open(store: Store) -> Result<Ledger> {
        let world = store.load_world()?;
        let (head_seq, head_hash, head_time, count) = {
            let txn = store.db().begin_read()?;
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
        Ok(Ledger {
            store,
            world,
            head_seq,
            head_hash,
            head_time,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    pub fn head_hash(&self) -> &str {
        &self.head_hash
    }

    /// Decide and durably commit `batch`, in order; one reply per command.
    /// `published_seq`, when given, is stored as the relay cursor in the same
    /// transaction. On `Err`, nothing of the batch was committed.
    pub fn execute(
        &mut self,
        batch: &[Pending],
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
        published_seq: Option<u64>,
    ) -> Result<Vec<Reply>> {
        // The log's time never goes backwards, even if the wall clock does,
        // so replay "as of a time" is always a prefix of the log.
        let now = self.head_time.map_or(now, |t| now.max(t));
        let (head_seq, head_hash, head_time) =
            (self.head_seq, self.head_hash.clone(), self.head_time);
        let mut undo = Undo::default();
        let result = self.execute_in_txn(batch, now, next_id, published_seq, &mut undo);
        if result.is_err() {
            for (id, (job, catalog)) in undo.jobs {
                match job {
                    Some(j) => self.world.jobs.insert(id, j),
                    None => self.world.jobs.remove(&id),
                };
                match catalog {
                    Some(c) => self.world.catalogs.insert(id, c),
                    None => self.world.catalogs.remove(&id),
                };
            }
            for (name, region) in undo.regions {
                match region {
                    Some(r) => self.world.regions.insert(name, r),
                    None => self.world.regions.remove(&name),
                };
            }
            self.head_seq = head_seq;
            self.head_hash = head_hash;
            self.head_time = head_time;
        }
        result
    }

    fn execute_in_txn(
        &mut self,
        batch: &[Pending],
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
        published_seq: Option<u64>,
        undo: &mut Undo,
    ) -> Result<Vec<Reply>> {
        let mut txn = self.store.db().begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut replies = Vec::with_capacity(batch.len());
        {
            let mut t = Tables {
                events: txn.open_table(EVENTS)?,
                job_log: txn.open_table(JOB_LOG)?,
                commands: txn.open_table(COMMANDS)?,
            };
            for p in batch {
                let reply = self.execute_one(&mut t, p, now, next_id, undo)?;
                replies.push(reply);
            }
            let mut jobs = txn.open_table(JOBS)?;
            let mut catalogs = txn.open_table(CATALOGS)?;
            for id in undo.jobs.keys() {
                let key = id.as_u128();
                match self.world.jobs.get(id) {
                    Some(job) => jobs.insert(
                        key,
                        serde_json::to_vec(job).expect("job serializes").as_slice(),
                    )?,
                    None => jobs.remove(key)?,
                };
                match self.world.catalogs.get(id) {
                    Some(c) => catalogs.insert(
                        key,
                        serde_json::to_vec(c)
                            .expect("catalog serializes")
                            .as_slice(),
                    )?,
                    None => catalogs.remove(key)?,
                };
            }
            let mut regions = txn.open_table(REGIONS)?;
            for name in undo.regions.keys() {
                if let Some(r) = self.world.regions.get(name) {
                    regions.insert(
                        name.as_str(),
                        serde_json::to_vec(r).expect("region serializes").as_slice(),
                    )?;
                }
            }
            if let Some(seq) = published_seq {
                txn.open_table(CURSOR)?.insert(PUBLISHED_SEQ, seq)?;
            }
        }
        txn.commit()?;
        Ok(replies)
    }

    fn execute_one(
        &mut self,
        t: &mut Tables<'_>,
        p: &Pending,
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
        undo: &mut Undo,
    ) -> Result<Reply> {
        let cmd = &p.cmd;
        let key = cmd.command_id.as_u128();
        if let Some(rec) = t.commands.get(key)? {
            let rec: CommandRecord = serde_json::from_slice(rec.value()).map_err(|e| {
                StoreError::Corrupt(format!("command record {}: {e}", cmd.command_id))
            })?;
            if rec.fingerprint != p.fingerprint && rec.fingerprint != super::import::ANY_BODY {
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
        let reply = match decide(&self.world, cmd, now) {
            Ok(decided) => {
                let mut refs = Vec::with_capacity(decided.len());
                for d in decided {
                    let env =
                        self.append(t, cmd, d.project_id, d.job_id, d.event, now, next_id, undo)?;
                    refs.push(EventRef {
                        seq: env.seq,
                        event_type: env.event.type_name().to_owned(),
                    });
                }
                let version = cmd
                    .job_id
                    .and_then(|id| self.world.jobs.get(&id))
                    .map(|j| j.version);
                Reply::accepted(cmd.job_id, version, refs)
            }
            Err(rejection) if rejection.code.is_audited() => {
                let env = self.append_rejection(t, cmd, &rejection, now, next_id, undo)?;
                Reply::rejected(cmd.job_id, &rejection, Some(env.seq))
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
        t.commands.insert(
            key,
            serde_json::to_vec(&rec)
                .expect("record serializes")
                .as_slice(),
        )?;
        Ok(reply)
    }

    fn append_rejection(
        &mut self,
        t: &mut Tables<'_>,
        cmd: &CommandEnvelope,
        r: &Rejection,
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
        undo: &mut Undo,
    ) -> Result<Envelope> {
        let event = Event::CommandRejected {
            verb: cmd.verb,
            code: r.code,
            reason: r.message.clone(),
            state: r.state,
            expected_version: cmd.expected_version,
            current_version: r.current_version,
        };
        self.append(
            t,
            cmd,
            cmd.project_id.clone(),
            cmd.job_id,
            event,
            now,
            next_id,
            undo,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        t: &mut Tables<'_>,
        cmd: &CommandEnvelope,
        project_id: crate::domain::ProjectId,
        job_id: Option<Uuid>,
        event: Event,
        now: DateTime<Utc>,
        next_id: IdSource<'_>,
        undo: &mut Undo,
    ) -> Result<Envelope> {
        let job_version = match (job_id, event.is_job_change()) {
            (Some(id), true) => Some(self.world.jobs.get(&id).map_or(0, |j| j.version) + 1),
            _ => None,
        };
        if let Some(id) = job_id.filter(|_| job_version.is_some()) {
            undo.jobs.entry(id).or_insert_with(|| {
                (
                    self.world.jobs.get(&id).cloned(),
                    self.world.catalogs.get(&id).cloned(),
                )
            });
        }
        if let Event::RegionConfigured { region, .. } = &event {
            undo.regions
                .entry(region.clone())
                .or_insert_with(|| self.world.regions.get(region).cloned());
        }
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
            recorded_at: now,
            prev_hash: String::new(),
            event,
            hash: String::new(),
        };
        let bytes = env.seal_to_json(&self.head_hash);
        t.events.insert(env.seq, bytes.as_slice())?;
        if let Some(id) = job_id {
            t.job_log.insert((id.as_u128(), env.seq), ())?;
        }
        self.world.evolve(&env);
        self.head_seq = env.seq;
        self.head_hash = env.hash.clone();
        self.head_time = Some(env.recorded_at);
        Ok(env)
    }
}
