//! The fault harness of issue 6: nothing acknowledged is lost, nothing is
//! duplicated, across kill -9 of `bcp serve` and of nats-server under load.
//!
//! A real nats-server (JetStream, file store) and a real `bcp serve` on a
//! real redb file, driven by [`PRODUCERS`] concurrent producers (one
//! connection each, one command in flight each) with a mix of every job verb,
//! region changes, recorded rejections and a little bad input. Each round,
//! while the load runs, `bcp serve` and nats-server are each SIGKILLed at a
//! random moment and restarted (bcp on the same db, nats-server on the same
//! port and store dir), in a random order, sometimes overlapping. Producers
//! treat a timeout, no responders and `unavailable` as "retry later with the
//! same command_id", and keep the first definitive reply of every command.
//!
//! After each round the load is paused (every producer gets its command in
//! hand answered) and, with both processes up:
//! - the relay catches up: the stream's last sequence reaches the highest
//!   seq any reply names (never beyond it);
//! - (a) every reply is in the log: each event of an accepted reply is at
//!   its seq with its type, command_id and job, each recorded rejection is a
//!   `CommandRejected` at its `rejection_seq` with its code; replies claim
//!   every seq from 1 to the head exactly once (an unclaimed event is an
//!   invented or doubly applied one); the job views bcp serves and the
//!   catalogs equal an independent fold of the stream (state, version,
//!   snapshot ids, per-job versions gapless);
//! - (b) the stream is gapless from 1, stream seq = envelope seq = Bcp-Seq,
//!   Nats-Msg-Id = event_id, no event_id twice, hash chain intact
//!   (`support::check_stream`);
//! - (d) every command sent this round, and a sample of earlier ones (all of
//!   them in the last round), is sent again with the same command_id: each
//!   reply is the original with `duplicate: true` (a `bad_request`, never
//!   stored, is refused again the same way);
//! - then `bcp serve` is stopped with SIGTERM (exit 0) so its db can be read
//!   (redb lets one process hold it; a copy of a live file is not a sound
//!   snapshot), and (c) `bcp audit verify --db` passes with the head equal to
//!   the claimed head (so the resends appended nothing), `audit verify
//!   --against-nats` finds the stream byte-equal to the store, `bcp export`
//!   equals the stream payloads line by line, and `bcp replay --db` equals
//!   the views and catalogs the live server served. bcp is started again for
//!   the next round.
//!
//! `BCP_FAULT_ROUNDS` sets the rounds (default 3; `just faults` runs 20);
//! `BCP_FAULT_SEED` replays a run's workload and fault delays (the seed is
//! printed first; process timing still varies). On failure the temp dir
//! (logs, redb file, nats store) is copied to `target/faults-failures/`.

#[allow(dead_code)] // shared with tests/nats.rs; this binary uses part of it
mod support;

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, TimeZone, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::{Harness, bcp_cli_text, check_stream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Concurrent producers, each with one command in flight.
const PRODUCERS: usize = 12;
/// Projects the producers share (producer i uses `p{i % PROJECTS}`).
const PROJECTS: usize = 4;
/// Jobs a producer creates at most.
const JOBS_PER_PRODUCER: usize = 8;
/// One request attempt; a timeout means "retry with the same command_id".
const ATTEMPT: Duration = Duration::from_secs(1);
/// A command not answered by then fails the run (bcp or NATS never came back).
const UNRESOLVED: Duration = Duration::from_secs(120);
/// Earlier commands resent in each round but the last (the last resends all).
const RESEND_SAMPLE: usize = 300;
/// Resends in flight at once.
const RESEND_CONCURRENCY: usize = 32;

// ---------------------------------------------------------------- random

/// xorshift64* seeded through splitmix64: small, seedable, good enough to
/// pick verbs and delays.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    fn uuid(&mut self) -> Uuid {
        let bits = (u128::from(self.next()) << 64) | u128::from(self.next());
        uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid()
    }

    fn weighted<T: Copy>(&mut self, choices: &[(u64, T)]) -> T {
        let total: u64 = choices.iter().map(|(w, _)| w).sum();
        let mut n = self.below(total);
        for (w, c) in choices {
            if n < *w {
                return *c;
            }
            n -= w;
        }
        unreachable!("weights add up")
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("BCP_FAULT_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("BCP_FAULT_SEED={s:?} is not a u64: {e}")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64;
            nanos ^ (u64::from(std::process::id()) << 32)
        }
    }
}

fn rounds_from_env() -> usize {
    match std::env::var("BCP_FAULT_ROUNDS") {
        Ok(s) => s
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("BCP_FAULT_ROUNDS={s:?} is not a positive number")),
        Err(_) => 3,
    }
}

// ------------------------------------------------------------- commands

/// A command as sent, and the first definitive reply it got (not a
/// timeout, no responders or `unavailable`).
struct Sent {
    subject: String,
    body: Vec<u8>,
    verb: &'static str,
    command_id: Uuid,
    job_id: Option<Uuid>,
    reply: Value,
    attempts: u32,
}

impl Sent {
    fn code(&self) -> Option<&str> {
        self.reply["error"]["code"].as_str()
    }

    fn ok(&self) -> bool {
        self.reply["ok"] == json!(true)
    }

    fn describe(&self) -> String {
        format!(
            "{} {} -> {}",
            self.subject,
            String::from_utf8_lossy(&self.body),
            self.reply
        )
    }
}

enum Attempt {
    Reply(Value),
    /// Timeout, no responders, NATS down: the command may or may not have
    /// been decided; retry with the same command_id.
    Transient(String),
}

async fn attempt(client: &async_nats::Client, subject: &str, body: &[u8]) -> Attempt {
    let request = client.request(subject.to_owned(), body.to_vec().into());
    match tokio::time::timeout(ATTEMPT, request).await {
        Err(_) => Attempt::Transient(format!("no reply within {ATTEMPT:?}")),
        Ok(Err(e)) => Attempt::Transient(e.to_string()),
        Ok(Ok(msg)) => {
            let reply: Value = serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
                panic!(
                    "reply on {subject} is not JSON ({e}): {}",
                    String::from_utf8_lossy(&msg.payload)
                )
            });
            if reply["error"]["code"] == json!("unavailable") {
                Attempt::Transient(format!("unavailable: {reply}"))
            } else {
                Attempt::Reply(reply)
            }
        }
    }
}

/// Send until a definitive reply; returns it and the number of attempts.
async fn send_until_answered(
    client: &async_nats::Client,
    subject: &str,
    body: &[u8],
    rng: &mut Rng,
) -> (Value, u32) {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let why = match attempt(client, subject, body).await {
            Attempt::Reply(r) => return (r, attempts),
            Attempt::Transient(why) => why,
        };
        assert!(
            started.elapsed() < UNRESOLVED,
            "{subject} {} still unanswered after {attempts} attempts ({why})",
            String::from_utf8_lossy(body)
        );
        tokio::time::sleep(rng.millis(20, 120)).await;
    }
}

async fn producer_client(url: &str, idx: usize) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .name(format!("bcp faults producer {idx}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .request_timeout(Some(ATTEMPT))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

// ------------------------------------------------------------- producers

/// What a producer believes about one of its jobs, from its replies.
struct JobModel {
    id: Uuid,
    /// None until its create is answered.
    state: Option<String>,
    version: Option<u64>,
    snapshots: Vec<Uuid>,
    /// Snapshots recorded so far (each gets its own `taken_at`).
    taken: u32,
}

struct Producer {
    idx: usize,
    project: String,
    actor: String,
    rng: Rng,
    client: async_nats::Client,
    jobs: Vec<JobModel>,
    sent: Vec<Sent>,
}

/// Agent clocks for snapshots: far enough ahead that bcp's sweeper (wall
/// clock) never finds one due, so every event in the log comes from a
/// command whose reply names it.
fn taken_at(n: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2040, 1, 1, 0, 0, 0).unwrap() + ChronoDuration::hours(6 * i64::from(n))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Verb {
    Create,
    Start,
    StartExpecting,
    Stop,
    StopExpecting,
    Terminate,
    AssignRegion,
    ChangeSchedule,
    RecordSnapshot,
    DeleteSnapshot,
    SetSnapshotExpiry,
    ExpireJob,
    ExpireProject,
    ConfigureRegion,
    CreateExisting,
    StartUnknown,
    BadInput,
}

impl Producer {
    fn verb_for(&mut self, state: &str) -> Verb {
        use Verb::*;
        let choices: &[(u64, Verb)] = match state {
            "Inactive" => &[
                (60, Start),
                (8, StartExpecting),
                (10, ChangeSchedule),
                (8, AssignRegion),
                (4, Stop),
                (4, RecordSnapshot),
                (4, Terminate),
                (2, ExpireJob),
            ],
            "Stopped" => &[
                (35, Start),
                (20, Terminate),
                (10, DeleteSnapshot),
                (10, SetSnapshotExpiry),
                (8, RecordSnapshot),
                (8, ChangeSchedule),
                (5, ExpireJob),
                (4, AssignRegion),
            ],
            // Active, or Misconfigured (a region change the producer did
            // not see): both are running.
            _ => &[
                (45, RecordSnapshot),
                (12, Stop),
                (6, StopExpecting),
                (8, ChangeSchedule),
                (6, SetSnapshotExpiry),
                (5, DeleteSnapshot),
                (5, ExpireJob),
                (2, ExpireProject),
                (3, Start),
                (3, Terminate),
                (2, AssignRegion),
            ],
        };
        self.rng.weighted(choices)
    }

    /// The next command: (verb, subject, body, job it is about).
    fn next_command(&mut self) -> (&'static str, String, Value, Option<Uuid>) {
        let known: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| self.jobs[i].state.is_some())
            .collect();
        let verb = if self.idx == 0 && self.rng.chance(3) {
            Verb::ConfigureRegion
        } else if self.rng.chance(2) {
            Verb::BadInput
        } else if self.rng.chance(1) && !known.is_empty() {
            Verb::CreateExisting
        } else if self.rng.chance(1) {
            Verb::StartUnknown
        } else if known.is_empty() || (self.jobs.len() < JOBS_PER_PRODUCER && self.rng.chance(5)) {
            Verb::Create
        } else {
            let i = known[self.rng.below(known.len() as u64) as usize];
            let state = self.jobs[i].state.clone().expect("known");
            // Move the chosen job to the end, so `self.jobs.last()` is it.
            let job = self.jobs.remove(i);
            self.jobs.push(job);
            self.verb_for(&state)
        };
        let command_id = self.rng.uuid();
        let mut body = json!({"command_id": command_id, "actor": self.actor});
        let project = self.project.clone();
        let on_job = |body: &mut Value, job: Uuid| {
            body["job_id"] = json!(job);
            Some(job)
        };
        let (name, job_id) = match verb {
            Verb::Create => {
                let id = self.rng.uuid();
                self.jobs.push(JobModel {
                    id,
                    state: None,
                    version: None,
                    snapshots: Vec::new(),
                    taken: 0,
                });
                let name = format!("rs-{}-{}", self.idx, self.jobs.len());
                body["deployment"] = json!({"kind": "replica_set", "name": name});
                if self.rng.chance(20) {
                    body["region"] = json!("eu");
                }
                if self.rng.chance(30) {
                    body["schedule"] = json!({"daily_retention_days": self.rng.range(1, 14)});
                }
                ("create", on_job(&mut body, id))
            }
            Verb::CreateExisting => {
                let job = self.jobs[known[0]].id;
                body["deployment"] = json!({"kind": "replica_set", "name": "again"});
                ("create", on_job(&mut body, job))
            }
            Verb::StartUnknown => ("start", on_job(&mut body, self.rng.uuid())),
            Verb::BadInput => {
                // Refused at decoding, never stored: an unknown field.
                body["bogus"] = json!(true);
                let job = self.jobs.first().map_or_else(|| self.rng.uuid(), |j| j.id);
                ("start", on_job(&mut body, job))
            }
            Verb::ConfigureRegion => {
                body["region"] = json!("eu");
                body["snapshot_store"] = json!("s3-eu");
                body["oplog_store"] = json!("oplog-eu");
                body["sync_store"] = if self.rng.chance(50) {
                    json!("sync-eu")
                } else {
                    Value::Null
                };
                return (
                    "configure-region",
                    "bcp.cmd._admin.configure-region".to_owned(),
                    body,
                    None,
                );
            }
            Verb::ExpireProject => {
                let job = self.jobs.last().expect("a job");
                let now = taken_at(job.taken) + ChronoDuration::days(self.rng.range(0, 60) as i64);
                body["now"] = json!(rfc3339(now));
                ("expire-snapshots", None)
            }
            v => {
                let job = self.jobs.last_mut().expect("a job");
                let id = job.id;
                let job_id = on_job(&mut body, id);
                let snapshot = |rng: &mut Rng, job: &JobModel| {
                    if job.snapshots.is_empty() || rng.chance(5) {
                        rng.uuid() // unknown: a recorded not_found
                    } else {
                        job.snapshots[rng.below(job.snapshots.len() as u64) as usize]
                    }
                };
                let name = match v {
                    Verb::Start => "start",
                    Verb::StartExpecting => {
                        body["expected_version"] = json!(job.version.unwrap_or(1));
                        "start"
                    }
                    Verb::Stop => "stop",
                    Verb::StopExpecting => {
                        // Sometimes stale on purpose: a recorded version_conflict.
                        let v = job.version.unwrap_or(1);
                        let stale = self.rng.chance(30);
                        body["expected_version"] =
                            json!(if stale { v.saturating_sub(1) } else { v });
                        "stop"
                    }
                    Verb::Terminate => "terminate",
                    Verb::AssignRegion => {
                        body["region"] = if self.rng.chance(50) {
                            json!("eu")
                        } else {
                            Value::Null
                        };
                        "assign-region"
                    }
                    Verb::ChangeSchedule => {
                        // Only settings valid against any schedule: a patch
                        // refused by the job's current schedule would be a
                        // bad_request decided against state (not stored), and
                        // its resend could be decided differently.
                        body["schedule"] = match self.rng.below(4) {
                            0 => json!({"weekly_retention_weeks": self.rng.range(0, 52)}),
                            1 => json!({"daily_retention_days": self.rng.range(0, 30)}),
                            2 => json!({"monthly_retention_months": self.rng.range(0, 36)}),
                            _ => json!({"point_in_time_window_hours": self.rng.range(1, 168)}),
                        };
                        "change-schedule"
                    }
                    Verb::RecordSnapshot => {
                        let s = self.rng.uuid();
                        job.taken += 1;
                        body["snapshot_id"] = json!(s);
                        body["taken_at"] = json!(rfc3339(taken_at(job.taken)));
                        body["size_bytes"] = json!(self.rng.range(1, 1 << 40));
                        "record-snapshot"
                    }
                    Verb::DeleteSnapshot => {
                        body["snapshot_id"] = json!(snapshot(&mut self.rng, job));
                        "delete-snapshot"
                    }
                    Verb::SetSnapshotExpiry => {
                        body["snapshot_id"] = json!(snapshot(&mut self.rng, job));
                        if self.rng.chance(30) {
                            body["do_not_delete"] = json!(true);
                        } else {
                            let at = taken_at(job.taken)
                                + ChronoDuration::days(self.rng.range(1, 400) as i64);
                            body["expires_at"] = json!(rfc3339(at));
                        }
                        "set-snapshot-expiry"
                    }
                    Verb::ExpireJob => {
                        let now = taken_at(job.taken)
                            + ChronoDuration::days(self.rng.range(0, 60) as i64);
                        body["now"] = json!(rfc3339(now));
                        "expire-snapshots"
                    }
                    other => unreachable!("{other:?} handled above"),
                };
                (name, job_id)
            }
        };
        let subject = format!("bcp.cmd.{project}.{name}");
        (name, subject, body, job_id)
    }

    /// Update the beliefs from a definitive reply.
    async fn learn(&mut self, sent: &Sent, body: &Value) {
        let Some(job_id) = sent.job_id else { return };
        let Some(job) = self.jobs.iter_mut().find(|j| j.id == job_id) else {
            return;
        };
        let snapshot = body["snapshot_id"]
            .as_str()
            .map(|s| Uuid::parse_str(s).expect("uuid"));
        if !sent.ok() {
            if sent.code() == Some("not_found") {
                job.snapshots.retain(|s| Some(*s) != snapshot); // expired meanwhile
            }
            if matches!(sent.code(), Some("invalid_transition" | "version_conflict")) {
                // Resync (a region change can move a job without the
                // producer seeing it); best effort, any failure is fine.
                let query = serde_json::to_vec(&json!({"job_id": job_id})).expect("json");
                if let Attempt::Reply(r) =
                    attempt(&self.client, "bcp.query._admin.job", &query).await
                    && r["ok"] == json!(true)
                {
                    job.state = r["job"]["state"].as_str().map(str::to_owned);
                    job.version = r["job"]["version"].as_u64();
                }
            }
            return;
        }
        if let Some(v) = sent.reply["version"].as_u64() {
            job.version = Some(v);
        }
        for e in sent.reply["events"].as_array().expect("events") {
            match e["type"].as_str().expect("type") {
                "JobCreated" | "JobTerminated" => job.state = Some("Inactive".into()),
                "JobStarted" | "JobReconfigured" => job.state = Some("Active".into()),
                "JobMisconfigured" => job.state = Some("Misconfigured".into()),
                "JobStopped" => job.state = Some("Stopped".into()),
                "SnapshotsPurged" => job.snapshots.clear(),
                "SnapshotRecorded" => job.snapshots.extend(snapshot),
                "SnapshotDeleted" => job.snapshots.retain(|s| Some(*s) != snapshot),
                _ => {}
            }
        }
        if sent.reply["events"].to_string().contains("SnapshotExpired") {
            // Which ones expired is in the log, not the reply: resync.
            let query = serde_json::to_vec(&json!({"job_id": job_id})).expect("json");
            if let Attempt::Reply(r) =
                attempt(&self.client, "bcp.query._admin.snapshots", &query).await
                && let Some(list) = r["snapshots"].as_array()
            {
                job.snapshots = list
                    .iter()
                    .filter_map(|s| s["snapshot_id"].as_str()?.parse().ok())
                    .collect();
            }
        }
    }

    async fn run(mut self, stop: CancellationToken) -> Producer {
        while !stop.is_cancelled() {
            let (verb, subject, body, job_id) = self.next_command();
            let bytes = serde_json::to_vec(&body).expect("json");
            let (reply, attempts) =
                send_until_answered(&self.client, &subject, &bytes, &mut self.rng).await;
            let command_id =
                Uuid::parse_str(body["command_id"].as_str().expect("command_id")).expect("uuid");
            let sent = Sent {
                subject,
                body: bytes,
                verb,
                command_id,
                job_id,
                reply,
                attempts,
            };
            self.learn(&sent, &body).await;
            self.sent.push(sent);
        }
        self
    }
}

// ---------------------------------------------------------------- faults

#[derive(Debug)]
enum Step {
    Sleep(Duration),
    KillBcp,
    /// Start bcp without waiting for it to be ready.
    SpawnBcp,
    StartBcp,
    KillNats,
    StartNats,
}

/// Both crashes of one round, in one of five orders (two with both
/// processes down at once, one that kills bcp again while it starts), with
/// random delays.
fn draw_plan(rng: &mut Rng) -> Vec<Step> {
    use Step::*;
    let mut s = |lo, hi| Sleep(rng.millis(lo, hi));
    let (a, d1, b, d2, tail) = (s(150, 900), s(0, 400), s(50, 900), s(0, 400), s(100, 600));
    let starting = s(0, 250);
    match rng.below(5) {
        0 => vec![a, KillBcp, d1, StartBcp, b, KillNats, d2, StartNats, tail],
        1 => vec![a, KillNats, d2, StartNats, b, KillBcp, d1, StartBcp, tail],
        2 => vec![a, KillNats, d1, KillBcp, d2, StartNats, StartBcp, tail],
        3 => vec![a, KillBcp, d1, KillNats, d2, StartNats, StartBcp, tail],
        _ => vec![
            a, KillBcp, d1, SpawnBcp, starting, KillBcp, StartBcp, b, KillNats, d2, StartNats, tail,
        ],
    }
}

fn describe_plan(plan: &[Step]) -> String {
    plan.iter()
        .map(|s| match s {
            Step::Sleep(d) => format!("{}ms", d.as_millis()),
            Step::KillBcp => "kill -9 bcp".into(),
            Step::SpawnBcp => "spawn bcp".into(),
            Step::StartBcp => "start bcp".into(),
            Step::KillNats => "kill -9 nats".into(),
            Step::StartNats => "start nats".into(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Phase durations of a round, for the report.
struct Lap {
    at: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Lap {
    fn new() -> Lap {
        Lap {
            at: Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, what: &'static str) {
        let now = Instant::now();
        self.laps.push((what, now - self.at));
        self.at = now;
    }

    fn report(&self) -> String {
        self.laps
            .iter()
            .map(|(what, d)| format!("{what} {:.1}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The harness, and on a failure a copy of its temp dir (logs, redb file,
/// nats store) under target/faults-failures/, taken after both processes
/// are killed.
struct Run {
    h: Harness,
    seed: u64,
}

impl Drop for Run {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if self.h.bcp_running() {
            self.h.kill_bcp();
        }
        self.h.nats.kill();
        let dest = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/faults-failures")
            .join(format!("seed-{}", self.seed));
        let _ = std::fs::remove_dir_all(&dest);
        let _ = std::fs::create_dir_all(dest.parent().expect("parent"));
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(self.h.path(""))
            .arg(&dest)
            .status();
        eprintln!(
            "faults: FAILED with seed {} (replay: BCP_FAULT_SEED={}); temp dir copied to {} ({copied:?})",
            self.seed,
            self.seed,
            dest.display()
        );
    }
}

// ---------------------------------------------------------------- checks

#[derive(Default)]
struct Totals {
    rounds: usize,
    sent: usize,
    acked: usize,
    recorded_rejections: usize,
    bad_requests: usize,
    attempts: u64,
    answered_as_duplicate: usize,
    events_checked: u64,
    resends: usize,
    losses: usize,
    duplicates: usize,
    head: u64,
}

/// What the log must hold at `seq`, claimed by `sent[index]`.
struct Claim {
    index: usize,
    event_type: String,
}

/// (a) and the claim half of the duplicate check. Returns the loss and
/// duplicate findings (each a line), and asserts everything else.
fn check_claims(sent: &[Sent], envs: &[Value], findings: &mut Findings) {
    let head = envs.len() as u64;
    let mut claims: BTreeMap<u64, Claim> = BTreeMap::new();
    for (index, s) in sent.iter().enumerate() {
        let mut claim = |seq: u64, event_type: &str, findings: &mut Findings| {
            let previous = claims.insert(
                seq,
                Claim {
                    index,
                    event_type: event_type.to_owned(),
                },
            );
            if let Some(p) = previous {
                findings.duplicate(format!(
                    "seq {seq} is claimed by two commands: {} and {}",
                    sent[p.index].describe(),
                    s.describe()
                ));
            }
        };
        if s.ok() {
            assert_eq!(s.reply["error"], Value::Null, "{}", s.describe());
            assert_eq!(s.reply.get("rejection_seq"), None, "{}", s.describe());
            for e in s.reply["events"].as_array().expect("events of an ok reply") {
                let seq = e["seq"].as_u64().expect("seq");
                claim(seq, e["type"].as_str().expect("type"), findings);
            }
            continue;
        }
        match s.code() {
            Some("bad_request") => {
                assert_eq!(s.reply.get("rejection_seq"), None, "{}", s.describe());
                assert_eq!(s.reply["duplicate"], json!(false), "{}", s.describe());
            }
            Some("not_found" | "already_exists" | "invalid_transition" | "version_conflict") => {
                let seq = s.reply["rejection_seq"].as_u64().unwrap_or_else(|| {
                    panic!(
                        "a rejection decided against state without rejection_seq: {}",
                        s.describe()
                    )
                });
                claim(seq, "CommandRejected", findings);
            }
            other => panic!("unexpected reply code {other:?}: {}", s.describe()),
        }
    }
    for (&seq, c) in &claims {
        let s = &sent[c.index];
        let Some(env) = envs.get(seq as usize - 1).filter(|_| seq >= 1) else {
            findings.loss(format!(
                "seq {seq} ({}) is beyond the log's head {head}: {}",
                c.event_type,
                s.describe()
            ));
            continue;
        };
        let mismatch = |what: &str| {
            format!(
                "seq {seq}: the reply names {} but the log holds {what}: {} ; log: {env}",
                c.event_type,
                s.describe()
            )
        };
        if env["command_id"] != json!(s.command_id) {
            findings.loss(mismatch("another command's event"));
            continue;
        }
        if env["type"] != json!(c.event_type) {
            findings.loss(mismatch("another type"));
            continue;
        }
        if let Some(job) = s.job_id {
            assert_eq!(env["job_id"], json!(job), "{}", mismatch("another job"));
        }
        if c.event_type == "CommandRejected" {
            assert_eq!(
                env["data"]["code"],
                s.reply["error"]["code"],
                "{}",
                mismatch("another code")
            );
            assert_eq!(
                env["data"]["verb"],
                json!(s.verb),
                "{}",
                mismatch("another verb")
            );
            assert_eq!(
                env["job_version"],
                Value::Null,
                "{}",
                mismatch("a job version")
            );
        }
    }
    // The reply's version is the job's version after its last event.
    for s in sent.iter().filter(|s| s.ok()) {
        let (Some(job), Some(last)) = (
            s.job_id,
            s.reply["events"].as_array().and_then(|e| e.last()),
        ) else {
            continue;
        };
        let seq = last["seq"].as_u64().expect("seq");
        if let Some(env) = envs.get(seq as usize - 1)
            && env["job_id"] == json!(job)
        {
            assert_eq!(
                s.reply["version"],
                env["job_version"],
                "reply version vs the log's job_version at {seq}: {}",
                s.describe()
            );
        }
    }
    // Every event of the log is some reply's: one no reply names was
    // appended twice or invented.
    for seq in 1..=head {
        if !claims.contains_key(&seq) {
            findings.duplicate(format!(
                "seq {seq} is in the log but no reply names it: {}",
                envs[seq as usize - 1]
            ));
        }
    }
}

#[derive(Default)]
struct Findings {
    losses: Vec<String>,
    duplicates: Vec<String>,
}

impl Findings {
    fn loss(&mut self, what: String) {
        self.losses.push(what);
    }

    fn duplicate(&mut self, what: String) {
        self.duplicates.push(what);
    }

    fn assert_none(&self, seed: u64, round: usize) {
        if self.losses.is_empty() && self.duplicates.is_empty() {
            return;
        }
        let mut report = String::new();
        for l in self.losses.iter().take(20) {
            let _ = writeln!(report, "LOSS: {l}");
        }
        for d in self.duplicates.iter().take(20) {
            let _ = writeln!(report, "DUPLICATE: {d}");
        }
        panic!(
            "round {round} (seed {seed}): {} losses, {} duplicates\n{report}",
            self.losses.len(),
            self.duplicates.len()
        );
    }
}

/// A job as an independent fold of the log sees it.
#[derive(Debug, Default)]
struct FoldedJob {
    state: String,
    version: u64,
    snapshots: BTreeSet<String>,
}

/// Fold the stream with the contract's event meanings (not bcp's code):
/// per-job versions gapless from 1, the state, the catalog's snapshot ids.
fn fold(envs: &[Value]) -> BTreeMap<String, FoldedJob> {
    let mut jobs: BTreeMap<String, FoldedJob> = BTreeMap::new();
    for env in envs {
        let seq = &env["seq"];
        let Some(version) = env["job_version"].as_u64() else {
            continue; // RegionConfigured, CommandRejected: no job change
        };
        let job_id = env["job_id"].as_str().expect("a job change has a job_id");
        let job = jobs.entry(job_id.to_owned()).or_default();
        assert_eq!(version, job.version + 1, "job_version at seq {seq}: {env}");
        job.version = version;
        let data = &env["data"];
        let id = |v: &Value| v.as_str().expect("snapshot_id").to_owned();
        match env["type"].as_str().expect("type") {
            "JobCreated" | "JobTerminated" => job.state = "Inactive".into(),
            "JobStarted" => job.state = data["state"].as_str().expect("state").into(),
            "JobStopped" => job.state = "Stopped".into(),
            "JobMisconfigured" => job.state = "Misconfigured".into(),
            "JobReconfigured" => job.state = "Active".into(),
            "SnapshotRecorded" => {
                assert!(
                    job.snapshots.insert(id(&data["snapshot_id"])),
                    "seq {seq}: recorded twice"
                );
            }
            "SnapshotDeleted" | "SnapshotExpired" => {
                assert!(
                    job.snapshots.remove(&id(&data["snapshot_id"])),
                    "seq {seq}: not in the catalog"
                );
            }
            "SnapshotsPurged" => {
                for s in data["snapshot_ids"].as_array().expect("snapshot_ids") {
                    assert!(
                        job.snapshots.remove(&id(s)),
                        "seq {seq}: purged one not in the catalog"
                    );
                }
                assert!(job.snapshots.is_empty(), "seq {seq}: purge left snapshots");
            }
            _ => {}
        }
    }
    jobs
}

/// The live projections against the fold; returns (views by job id,
/// catalogs by job id) as the live server served them.
async fn check_projections(
    h: &Harness,
    folded: &BTreeMap<String, FoldedJob>,
) -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
    let r = h.query("jobs", &json!({})).await;
    assert_eq!(r["ok"], json!(true), "query jobs: {r}");
    let views: BTreeMap<String, Value> = r["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|v| (v["job_id"].as_str().expect("job_id").to_owned(), v.clone()))
        .collect();
    assert_eq!(
        views.keys().collect::<Vec<_>>(),
        folded.keys().collect::<Vec<_>>(),
        "the jobs bcp serves vs the jobs of the log"
    );
    let mut catalogs = BTreeMap::new();
    for (id, job) in folded {
        let view = &views[id];
        assert_eq!(view["state"], json!(job.state), "state of {id}: {view}");
        assert_eq!(
            view["version"],
            json!(job.version),
            "version of {id}: {view}"
        );
        assert_eq!(
            view["snapshot_count"],
            json!(job.snapshots.len()),
            "snapshot_count of {id}: {view}"
        );
        let r = h.query("snapshots", &json!({"job_id": id})).await;
        assert_eq!(r["ok"], json!(true), "query snapshots {id}: {r}");
        let ids: BTreeSet<String> = r["snapshots"]
            .as_array()
            .expect("snapshots")
            .iter()
            .map(|s| s["snapshot_id"].as_str().expect("snapshot_id").to_owned())
            .collect();
        assert_eq!(ids, job.snapshots, "catalog of {id}");
        catalogs.insert(id.clone(), r["snapshots"].clone());
    }
    (views, catalogs)
}

/// (d): resend `which` with the same command_ids: every reply is the
/// original with duplicate: true (a bad_request is refused again alike).
async fn check_resends(h: &Harness, sent: &[Sent], which: &[usize], findings: &mut Findings) {
    let client = h.client.clone();
    let replies: Vec<(usize, Value)> = futures::stream::iter(which.iter().copied())
        .map(|i| {
            let client = client.clone();
            let s = &sent[i];
            async move {
                let mut rng = Rng::new(i as u64);
                let (r, _) = send_until_answered(&client, &s.subject, &s.body, &mut rng).await;
                (i, r)
            }
        })
        .buffer_unordered(RESEND_CONCURRENCY)
        .collect()
        .await;
    for (i, again) in replies {
        let s = &sent[i];
        let mut expected = s.reply.clone();
        if s.code() != Some("bad_request") {
            expected["duplicate"] = json!(true);
        }
        if again == expected {
            continue;
        }
        let what = format!("resent {} -> {again}", s.describe());
        if again["duplicate"] == json!(false) && s.code() != Some("bad_request") {
            findings.duplicate(format!("decided again: {what}"));
        } else {
            panic!("a resend's reply differs from the original: {what}");
        }
    }
}

/// Parse `ok: N events verified, head seq N hash …`.
fn verified_head(stdout: &str) -> u64 {
    let rest = stdout
        .strip_prefix("ok: ")
        .unwrap_or_else(|| panic!("audit verify said: {stdout}"));
    let (events, rest) = rest
        .split_once(" events verified, head seq ")
        .expect(stdout);
    let head = rest.split_whitespace().next().expect(stdout);
    assert_eq!(events, head, "audit verify: {stdout}");
    head.parse().expect(stdout)
}

/// With bcp stopped: (c) audit verify, (b) the stream byte-equal to the
/// store (audit verify --against-nats, and bcp export against the stream
/// payloads), and replay of the db equal to what the live server served.
async fn check_stopped_store(
    h: &Harness,
    head: u64,
    payloads: &[bytes::Bytes],
    views: &BTreeMap<String, Value>,
    catalogs: &BTreeMap<String, Value>,
    findings: &mut Findings,
) {
    let db = h.db();
    let db = db.to_str().expect("utf-8 path");
    let (code, out, err) = bcp_cli_text(&["audit", "verify", "--db", db]).await;
    assert_eq!(code, Some(0), "bcp audit verify: {out}{err}");
    let log_head = verified_head(&out);
    if log_head > head {
        findings.duplicate(format!(
            "the log's head is {log_head}, beyond the {head} events replies name (resends appended?)"
        ));
        return;
    } else if log_head < head {
        findings.loss(format!(
            "the log's head is {log_head}, replies name seqs up to {head}"
        ));
        return;
    }
    let url = h.nats.url();
    let (code, out, err) =
        bcp_cli_text(&["audit", "verify", "--db", db, "--against-nats", &url]).await;
    assert_eq!(code, Some(0), "bcp audit verify --against-nats: {out}{err}");
    assert_eq!(verified_head(&out), log_head, "{out}");

    let export = h.path("export.jsonl");
    let export_s = export.to_str().expect("utf-8 path");
    let (code, out, err) = bcp_cli_text(&["export", "--db", db, "--out", export_s]).await;
    assert_eq!(code, Some(0), "bcp export: {out}{err}");
    let text = std::fs::read(&export).expect("read export");
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        payloads.len(),
        "exported events vs stream messages"
    );
    for (i, (line, payload)) in lines.iter().zip(payloads).enumerate() {
        assert_eq!(
            *line,
            payload.as_ref(),
            "store and stream differ at seq {}",
            i + 1
        );
    }

    let (code, out, err) = bcp_cli_text(&["replay", "--db", db, "--format", "json"]).await;
    assert_eq!(code, Some(0), "bcp replay: {err}");
    let replay: Value = serde_json::from_str(&out).expect("replay JSON");
    assert_eq!(replay["as_of_seq"], json!(log_head), "replay as_of_seq");
    let replayed: BTreeMap<String, Value> = replay["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|v| (v["job_id"].as_str().expect("job_id").to_owned(), v.clone()))
        .collect();
    assert_eq!(&replayed, views, "replay of the db vs the views bcp served");
    for (id, catalog) in catalogs {
        let replayed = replay["snapshots"].get(id).cloned().unwrap_or(json!([]));
        assert_eq!(
            &replayed, catalog,
            "replayed catalog of {id} vs the one bcp served"
        );
    }
}

// ------------------------------------------------------------------ test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load() {
    let seed = seed_from_env();
    let rounds = rounds_from_env();
    println!(
        "faults: seed {seed} (replay with BCP_FAULT_SEED={seed}), {rounds} rounds, {PRODUCERS} producers"
    );
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut run = Run {
        // Sweeps of the idempotency records every few batches, so kills
        // land before, during and after them.
        h: Harness::start_with(&["--records-buffer", "16"]).await,
        seed,
    };
    let (port, store) = (run.h.nats.port, run.h.nats.store.clone());
    let url = run.h.nats.url();
    let mut producers = Vec::with_capacity(PRODUCERS);
    for idx in 0..PRODUCERS {
        producers.push(Producer {
            idx,
            project: format!("p{}", idx % PROJECTS),
            actor: format!("faults-{idx}"),
            rng: Rng::new(seed ^ (0xA5A5_0000 + idx as u64)),
            client: producer_client(&url, idx).await,
            jobs: Vec::new(),
            sent: Vec::new(),
        });
    }
    let mut sent: Vec<Sent> = Vec::new();
    let mut t = Totals::default();

    for round in 1..=rounds {
        let round_started = Instant::now();
        let mut clock = Lap::new();
        let plan = draw_plan(&mut rng);
        let stop = CancellationToken::new();
        let tasks: Vec<_> = producers
            .drain(..)
            .map(|p| tokio::spawn(p.run(stop.clone())))
            .collect();
        for step in &plan {
            match step {
                Step::Sleep(d) => tokio::time::sleep(*d).await,
                Step::KillBcp => run.h.kill_bcp(),
                Step::SpawnBcp => run.h.spawn_bcp(),
                Step::StartBcp => run.h.start_bcp().await,
                Step::KillNats => run.h.nats.kill(),
                Step::StartNats => run.h.restart_nats(port, &store).await,
            }
        }
        clock.lap("load");
        // Pause: each producer gets the command in hand answered.
        stop.cancel();
        let first_new = sent.len();
        for task in tasks {
            let mut p = task.await.expect("producer task");
            sent.append(&mut p.sent);
            producers.push(p);
        }
        producers.sort_by_key(|p| p.idx);
        let new = &sent[first_new..];
        clock.lap("pause");

        // Relay caught up to the highest seq any reply names.
        let head = sent
            .iter()
            .flat_map(|s| {
                let events = s.reply["events"].as_array().into_iter().flatten();
                events
                    .map(|e| e["seq"].as_u64().expect("seq"))
                    .chain(s.reply["rejection_seq"].as_u64())
            })
            .max()
            .unwrap_or(0);
        run.h.wait_stream_last_seq(head).await;
        clock.lap("catch-up");
        let msgs = run.h.stream_messages_ordered().await;
        let envs = check_stream(&msgs, head);
        let mut findings = Findings::default();
        check_claims(&sent, &envs, &mut findings);
        let folded = fold(&envs);
        let (views, catalogs) = check_projections(&run.h, &folded).await;
        clock.lap("checks");

        let last = round == rounds;
        let mut which: Vec<usize> = (first_new..sent.len()).collect();
        if last {
            which = (0..sent.len()).collect();
        } else if first_new > 0 {
            for _ in 0..RESEND_SAMPLE.min(first_new) {
                which.push(rng.below(first_new as u64) as usize);
            }
        }
        check_resends(&run.h, &sent, &which, &mut findings).await;
        clock.lap("resends");

        let status = run.h.stop_bcp().await;
        assert_eq!(status.code(), Some(0), "bcp serve exit status on SIGTERM");
        clock.lap("sigterm");
        let payloads: Vec<bytes::Bytes> = msgs.iter().map(|m| m.payload.clone()).collect();
        check_stopped_store(&run.h, head, &payloads, &views, &catalogs, &mut findings).await;
        t.losses += findings.losses.len();
        t.duplicates += findings.duplicates.len();
        findings.assert_none(seed, round);
        clock.lap("audit");
        if !last {
            run.h.start_bcp().await;
            clock.lap("restart");
        }

        let acked = new.iter().filter(|s| s.ok()).count();
        let lost_replies = new
            .iter()
            .filter(|s| s.reply["duplicate"] == json!(true))
            .count();
        let retried = new.iter().filter(|s| s.attempts > 1).count();
        println!(
            "round {round}: {}; sent {} acked {acked} (retried {retried}, answered as duplicate {lost_replies}); head {head}; resent {}; ok [{:.1}s: {}]",
            describe_plan(&plan),
            new.len(),
            which.len(),
            round_started.elapsed().as_secs_f64(),
            clock.report(),
        );
        t.rounds += 1;
        t.events_checked += head;
        t.resends += which.len();
        t.head = head;
    }

    t.sent = sent.len();
    t.acked = sent.iter().filter(|s| s.ok()).count();
    t.recorded_rejections = sent
        .iter()
        .filter(|s| s.reply["rejection_seq"].is_u64())
        .count();
    t.bad_requests = sent
        .iter()
        .filter(|s| s.code() == Some("bad_request"))
        .count();
    t.attempts = sent.iter().map(|s| u64::from(s.attempts)).sum();
    t.answered_as_duplicate = sent
        .iter()
        .filter(|s| s.reply["duplicate"] == json!(true))
        .count();
    let tally = |key: &dyn Fn(&Sent) -> &str| {
        let mut m: Vec<_> = sent
            .iter()
            .fold(HashMap::<&str, usize>::new(), |mut m, s| {
                *m.entry(key(s)).or_default() += 1;
                m
            })
            .into_iter()
            .collect();
        m.sort();
        m
    };
    let by_verb = tally(&|s| s.verb);
    let by_outcome = tally(&|s| s.code().unwrap_or("ok"));
    println!(
        "faults: seed {seed}: rounds {}, commands sent {}, commands acked {}, recorded rejections {}, bad_request {}, attempts {} (answered as duplicate after a lost reply {}), events in the log {}, events checked {}, resends checked {}, losses = {}, duplicates = {}, in {:.1}s",
        t.rounds,
        t.sent,
        t.acked,
        t.recorded_rejections,
        t.bad_requests,
        t.attempts,
        t.answered_as_duplicate,
        t.head,
        t.events_checked,
        t.resends,
        t.losses,
        t.duplicates,
        started.elapsed().as_secs_f64()
    );
    println!("faults: commands by verb: {by_verb:?}");
    println!("faults: replies: {by_outcome:?}");
    assert_eq!(t.losses, 0, "losses");
    assert_eq!(t.duplicates, 0, "duplicates");
    assert_eq!(t.rounds, rounds);
    assert!(
        t.acked > 0,
        "no command was acknowledged: the load did not run"
    );
}
