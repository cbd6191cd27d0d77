//! The command mix every bcp measurement sends, and the offline log builder.
//!
//! A [`Lane`] drives one job at a time through a fixed ten-command life:
//! create, start, record-snapshot ×3, stop, start, record-snapshot ×3; then it
//! moves on to a new job. Every command of that script is accepted, so one
//! command is one event and a log of N events holds N/10 jobs (1 M events =
//! 100 k jobs, the shape issue 5 asks for). Commands of one lane are sent one
//! after the other (a job's next command depends on its state); concurrency
//! comes from many lanes. Every command has a fresh `command_id`.
//!
//! Ids (jobs, commands, snapshots) are UUIDv7 by default: time-ordered, so
//! bcp's tables keyed by them are appended to. [`Ids::Random`] sends
//! UUIDv4, as most producers' libraries make by default: every insert lands
//! at a random place in those tables. [`Ids::Mixed`]: one lane in eight
//! sends UUIDv4, the others UUIDv7 (producers of both kinds on one bcp).
//!
//! The same bodies are sent over NATS (producers) and fed straight into
//! `bcp::store::pipeline::Pipeline::execute` (to build large logs fast for the
//! replay, growth and memory measurements), so both paths write the same
//! events.

use anyhow::{Context, Result, bail};
use bcp::domain::command::decode;
use bcp::store::Store;
use bcp::store::ledger::Pending;
use bcp::store::pipeline::Pipeline;
use chrono::{DateTime, Duration as Span, SubsecRound, Utc};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Commands (= events) per job in the script.
pub const COMMANDS_PER_JOB: u64 = 10;
/// Projects the lanes are spread over.
const PROJECTS: usize = 16;

#[derive(Clone, Copy)]
enum Step {
    Create,
    Start,
    Snapshot,
    Stop,
}

const SCRIPT: [Step; COMMANDS_PER_JOB as usize] = [
    Step::Create,
    Step::Start,
    Step::Snapshot,
    Step::Snapshot,
    Step::Snapshot,
    Step::Stop,
    Step::Start,
    Step::Snapshot,
    Step::Snapshot,
    Step::Snapshot,
];

/// One command: where it goes and its JSON body.
pub struct Cmd {
    pub project: String,
    pub verb: &'static str,
    pub body: Vec<u8>,
}

impl Cmd {
    pub fn subject(&self) -> String {
        format!("bcp.cmd.{}.{}", self.project, self.verb)
    }

    pub fn creates_job(&self) -> bool {
        self.verb == "create"
    }
}

/// How the ids a lane sends are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Ids {
    /// UUIDv7: time-ordered.
    Ordered,
    /// UUIDv4: random.
    Random,
    /// UUIDv7, but one lane in eight sends UUIDv4.
    Mixed,
}

impl Ids {
    fn fresh(self) -> Uuid {
        match self {
            Ids::Ordered | Ids::Mixed => Uuid::now_v7(),
            Ids::Random => Uuid::new_v4(),
        }
    }
}

/// A producer's sequence of commands over successive jobs.
pub struct Lane {
    id: u64,
    ids: Ids,
    project: String,
    job: Uuid,
    step: usize,
    snapshots: i64,
    /// Snapshots are taken from here on, 6 hours apart: never due for
    /// expiry while the benchmark runs, so the sweeper stays idle.
    t0: DateTime<Utc>,
}

impl Lane {
    pub fn new(id: u64, ids: Ids, t0: DateTime<Utc>) -> Lane {
        let ids = match ids {
            Ids::Mixed if id % 8 == 7 => Ids::Random,
            other => other,
        };
        Lane {
            id,
            ids,
            project: format!("bench-{:02}", id as usize % PROJECTS),
            job: ids.fresh(),
            step: 0,
            snapshots: 0,
            t0,
        }
    }

    pub fn next_cmd(&mut self) -> Cmd {
        if self.step == SCRIPT.len() {
            self.step = 0;
            self.snapshots = 0;
            self.job = self.ids.fresh();
        }
        let step = SCRIPT[self.step];
        self.step += 1;
        let command_id = self.ids.fresh();
        let (verb, body) = match step {
            Step::Create => (
                "create",
                json!({
                    "command_id": command_id,
                    "job_id": self.job,
                    "actor": "bench-producer",
                    "deployment": {"kind": "replica_set", "name": format!("rs-{}", self.id)},
                }),
            ),
            Step::Start => (
                "start",
                json!({"command_id": command_id, "job_id": self.job, "actor": "bench-producer"}),
            ),
            Step::Stop => (
                "stop",
                json!({"command_id": command_id, "job_id": self.job, "actor": "bench-producer"}),
            ),
            Step::Snapshot => {
                let taken_at = self.t0 + Span::hours(6 * self.snapshots);
                self.snapshots += 1;
                (
                    "record-snapshot",
                    json!({
                        "command_id": command_id,
                        "job_id": self.job,
                        "actor": "bench-agent",
                        "snapshot_id": self.ids.fresh(),
                        "taken_at": taken_at,
                        "size_bytes": 1_073_741_824u64 + (self.id * 4096 + self.snapshots as u64),
                    }),
                )
            }
        };
        Cmd {
            project: self.project.clone(),
            verb,
            body: serde_json::to_vec(&body).expect("json"),
        }
    }
}

/// Hands out lanes with ids unique over the whole run (so no two lanes share
/// a job), all taking snapshots from the same `t0`.
#[derive(Clone)]
pub struct Lanes {
    next: u64,
    ids: Ids,
    t0: DateTime<Utc>,
}

impl Lanes {
    pub fn new(ids: Ids) -> Lanes {
        Lanes {
            next: 0,
            ids,
            t0: Utc::now().trunc_subsecs(0),
        }
    }

    pub fn take(&mut self, n: usize) -> Vec<Lane> {
        let lanes = (self.next..self.next + n as u64)
            .map(|id| Lane::new(id, self.ids, self.t0))
            .collect();
        self.next += n as u64;
        lanes
    }
}

/// What the offline builder did.
#[derive(Clone)]
pub struct Built {
    pub head_seq: u64,
    pub jobs: u64,
    pub appended: u64,
    /// Time spent in `Pipeline::execute` (not in generating the commands).
    pub elapsed: Duration,
    /// Each batch (decide, seal, commit), in microseconds.
    pub executes: Vec<u64>,
    /// The `Store::commit` of each batch alone (what `bcp serve`'s commit
    /// thread does while its writer decides the next batch), in microseconds.
    pub commits: Vec<u64>,
    /// The CPU time of each of those commits, on its thread.
    pub commit_cpus: Vec<u64>,
    /// The CPU time of the checkpoint that closes the run (the job rows
    /// still held behind, written), on the same thread: part of what the
    /// commits cost, paid once.
    pub checkpoint_cpu: u64,
}

/// Append commands straight through `Pipeline::execute` (the writer's own
/// path, durable commits included) until the log at `db` holds at least
/// `target` events (at most 9 more). Whole jobs only, so every job gets its
/// ten events. `bcp serve` must not be running on `db`.
pub fn extend_log(db: &Path, target: u64, lanes: &mut Lanes, batch: usize) -> Result<Built> {
    let store = Store::open_or_create(db).with_context(|| format!("open {}", db.display()))?;
    let mut ledger = Pipeline::open(store).context("open ledger")?;
    let start_seq = ledger.head_seq();
    let mut in_execute = Duration::ZERO;
    let mut executes = Vec::new();
    let mut commits = Vec::new();
    let mut commit_cpus = Vec::new();
    while ledger.head_seq() < target {
        // A round: `n` lanes each take a new job through its whole script,
        // one command per lane per transaction, so a transaction holds `n`
        // commands for `n` different jobs.
        let remaining = target - ledger.head_seq();
        let n = (remaining.div_ceil(COMMANDS_PER_JOB) as usize).min(batch);
        let mut round = lanes.take(n);
        for _ in 0..COMMANDS_PER_JOB {
            let pendings = round
                .iter_mut()
                .map(|lane| {
                    let c = lane.next_cmd();
                    let cmd = decode(&c.project, c.verb, &c.body, None)
                        .map_err(|e| anyhow::anyhow!("workload body does not decode: {e}"))?;
                    Ok(Pending::new(cmd))
                })
                .collect::<Result<Vec<_>>>()?;
            let t = Instant::now();
            let timed = execute(&mut ledger, &pendings)?;
            in_execute += t.elapsed();
            executes.push(t.elapsed().as_micros() as u64);
            commits.push(timed.commit_us);
            commit_cpus.push(timed.commit_cpu_us);
        }
    }
    let cpu = crate::measure::thread_cpu_us();
    ledger.store().checkpoint().context("checkpoint")?;
    let checkpoint_cpu = crate::measure::thread_cpu_us() - cpu;
    Ok(Built {
        checkpoint_cpu,
        head_seq: ledger.head_seq(),
        jobs: ledger.world().jobs.len() as u64,
        appended: ledger.head_seq() - start_seq,
        elapsed: in_execute,
        executes,
        commits,
        commit_cpus,
    })
}

/// Commands of each kind [`catalog_cost`] measures.
pub const CATALOG_COMMANDS: usize = 200;

/// What one command against a job with a long catalog costs: (writer,
/// commit) CPU in µs, medians.
pub struct CatalogCost {
    /// `stop` and `start` taking turns: the catalog stays as it is.
    pub switch: (u64, u64),
    /// `record-snapshot`: one snapshot added to it.
    pub record: (u64, u64),
}

/// The CPU of `Pipeline::execute`'s steps, one command per batch, against
/// one job whose catalog holds `snapshots` (recorded in batches of 500 on
/// a fresh store at `db`, none due for expiry): the writer's (decide and
/// seal) and the commit's, on this thread. The store is closed after.
pub fn catalog_cost(db: &Path, snapshots: usize) -> Result<CatalogCost> {
    let store = Store::open_or_create(db)?;
    let mut p = Pipeline::open(store)?;
    let job = Uuid::now_v7();
    let t0 = Utc::now().trunc_subsecs(0) - Span::days(1);
    let id = |c: serde_json::Value| {
        let mut c = c;
        c["command_id"] = json!(Uuid::now_v7());
        c["job_id"] = json!(job);
        c
    };
    let snapshot = |i: usize| {
        id(
            json!({"snapshot_id": Uuid::now_v7(), "taken_at": t0 + Span::seconds(i as i64), "size_bytes": 1}),
        )
    };
    let deployment = json!({"deployment": {"kind": "replica_set", "name": "rs0"}});
    run_batch(
        &mut p,
        vec![("create", id(deployment)), ("start", id(json!({})))],
    )?;
    for first in (0..snapshots).step_by(500) {
        let batch = (first..snapshots.min(first + 500))
            .map(|i| ("record-snapshot", snapshot(i)))
            .collect();
        run_batch(&mut p, batch)?;
    }
    let median = |mut v: Vec<(u64, u64)>| {
        let mid = v.len() / 2;
        let w = *v.select_nth_unstable_by_key(mid, |c| c.0).1;
        let c = *v.select_nth_unstable_by_key(mid, |c| c.1).1;
        (w.0, c.1)
    };
    let switch = (0..CATALOG_COMMANDS)
        .map(|i| run_batch(&mut p, vec![(["stop", "start"][i % 2], id(json!({})))]))
        .collect::<Result<Vec<_>>>()?;
    let record = (0..CATALOG_COMMANDS)
        .map(|i| run_batch(&mut p, vec![("record-snapshot", snapshot(snapshots + i))]))
        .collect::<Result<Vec<_>>>()?;
    Ok(CatalogCost {
        switch: median(switch),
        record: median(record),
    })
}

/// What [`execute`] timed of one batch.
struct Timed {
    /// The writer's CPU (decide, seal), µs.
    writer_cpu_us: u64,
    /// `Store::commit`, wall and CPU, µs.
    commit_us: u64,
    commit_cpu_us: u64,
}

/// `Pipeline::execute`, step by step, on this thread, to time the commit
/// apart from the writer's work: `pendings` as one batch, decided now.
/// Every command must be accepted.
fn execute(p: &mut Pipeline<()>, pendings: &[Pending]) -> Result<Timed> {
    let now = Utc::now().trunc_subsecs(6);
    let cpu = crate::measure::thread_cpu_us();
    for pending in pendings {
        if let Some(a) = p.decide(pending, (), now, &mut Uuid::now_v7).pop() {
            bail!("not decided offline: {:?}", a.reply.error);
        }
    }
    let mut prepared = p.to_commit().context("a batch was decided")?;
    let writer_cpu_us = crate::measure::thread_cpu_us() - cpu;
    let (committing, cpu) = (Instant::now(), crate::measure::thread_cpu_us());
    let result = p.store().commit(&mut prepared);
    let commit_us = committing.elapsed().as_micros() as u64;
    let commit_cpu_us = crate::measure::thread_cpu_us() - cpu;
    let settled = p.settle(result);
    if let Some(e) = settled.error {
        return Err(e).context("Store::commit");
    }
    if let Some(a) = settled.answers.iter().find(|a| !a.reply.ok) {
        bail!("rejected offline: {:?}", a.reply.error);
    }
    Ok(Timed {
        writer_cpu_us,
        commit_us,
        commit_cpu_us,
    })
}

/// One batch of `commands` (verb, body) through [`execute`]: (writer,
/// commit) CPU in µs.
fn run_batch(
    p: &mut Pipeline<()>,
    commands: Vec<(&'static str, serde_json::Value)>,
) -> Result<(u64, u64)> {
    let pendings = (commands.iter())
        .map(|(verb, body)| {
            let cmd = decode("p1", verb, &serde_json::to_vec(body)?, None)
                .map_err(|e| anyhow::anyhow!("{verb} does not decode: {e}"))?;
            Ok(Pending::new(cmd))
        })
        .collect::<Result<Vec<_>>>()?;
    let timed = execute(p, &pendings)?;
    Ok((timed.writer_cpu_us, timed.commit_cpu_us))
}

/// How long one retention sweep (what `bcp serve` queues every
/// `--sweep-interval`, through the same writer as every command) takes on
/// the log at `db`: an idle sweep still visits every job's catalog while the
/// writer waits. `bcp serve` must not be running on `db`.
pub fn sweep_duration(db: &Path) -> Result<Duration> {
    let store = Store::open_existing(db)?;
    let mut ledger = Pipeline::open(store).context("open ledger")?;
    let now = Utc::now().trunc_subsecs(6);
    let sweep = bcp::service::sweeper::sweep_command(now);
    let t = Instant::now();
    ledger
        .execute(&[sweep], now, &mut Uuid::now_v7)
        .context("sweep")?;
    Ok(t.elapsed())
}
