//! Given/when/then tables for the snapshot verbs (DOMAIN.md "Schedule and
//! retention", "Transitions"): given the commands a producer sent, when one
//! more, then exactly the events `decide` returns, or the rejection with its
//! code and the state it names, and the catalogs and jobs after `evolve`.
//!
//! Bodies are JSON, decoded with the real decoder; time and ids are
//! arguments, so every expected value is exact. The wire (reply JSON, the
//! stream, queries) is left to the few end-to-end cases in tests/nats.rs.

use super::catalog::Snapshot;
use super::catalog::SnapshotClass::{self, *};
use super::command::{CommandEnvelope, decode};
use super::decide::{Decided, Decision, decide};
use super::envelope::Envelope;
use super::event::Event;
use super::ids::ProjectId;
use super::job::{Deployment, DeploymentKind, JobState, Phase};
use super::rejection::RejectCode;
use super::schedule::Schedule;
use super::world::World;
use JobState::{Active, Inactive, Stopped};
use Phase::{Incremental, InitialSync};
use RejectCode::{AlreadyExists, BadRequest, InvalidTransition, NotFound};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

const CID: Uuid = Uuid::from_u128(0xc1d);
const A: Uuid = Uuid::from_u128(0xa);
const B: Uuid = Uuid::from_u128(0xb);
const C: Uuid = Uuid::from_u128(0xc);
const S0: Uuid = Uuid::from_u128(0x50);
const S1: Uuid = Uuid::from_u128(0x51);
const S2: Uuid = Uuid::from_u128(0x52);
const S3: Uuid = Uuid::from_u128(0x53);
const S4: Uuid = Uuid::from_u128(0x54);
const S5: Uuid = Uuid::from_u128(0x55);
const B1: Uuid = Uuid::from_u128(0xb1);
const C1: Uuid = Uuid::from_u128(0xc1);
const UNKNOWN: Uuid = Uuid::from_u128(0xdead);
const ALL: [SnapshotClass; 4] = [Base, Daily, Weekly, Monthly];

fn t(s: &str) -> DateTime<Utc> {
    s.parse().expect("an RFC 3339 time")
}

/// One command as a producer sends it: project, verb and JSON body.
#[derive(Clone)]
struct Step {
    project: &'static str,
    verb: &'static str,
    body: Value,
}

fn step(project: &'static str, verb: &'static str, body: Value) -> Step {
    Step {
        project,
        verb,
        body,
    }
}

fn create(project: &'static str, job: Uuid, schedule: Value) -> Step {
    let deployment = json!({"kind": "replica_set", "name": "rs"});
    let body =
        json!({"command_id": CID, "job_id": job, "deployment": deployment, "schedule": schedule});
    step(project, "create", body)
}

fn on_job(project: &'static str, verb: &'static str, job: Uuid) -> Step {
    step(project, verb, json!({"command_id": CID, "job_id": job}))
}

fn record(project: &'static str, job: Uuid, snap: Uuid, taken_at: &str, size: u64) -> Step {
    let body = json!({"command_id": CID, "job_id": job, "snapshot_id": snap,
                      "taken_at": taken_at, "size_bytes": size});
    step(project, "record-snapshot", body)
}

/// delete-snapshot, or set-snapshot-expiry with `extra` (expires_at or
/// do_not_delete), on job A.
fn on_snapshot(verb: &'static str, snap: Uuid, extra: Value) -> Step {
    let mut body = json!({"command_id": CID, "job_id": A, "snapshot_id": snap});
    if let Value::Object(fields) = extra {
        body.as_object_mut().unwrap().extend(fields);
    }
    step("p1", verb, body)
}

fn keep(snap: Uuid) -> Step {
    on_snapshot("set-snapshot-expiry", snap, json!({"do_not_delete": true}))
}

fn expire(project: &'static str, job: Option<Uuid>, now: &str) -> Step {
    let mut body = json!({"command_id": CID, "now": now});
    if let Some(job) = job {
        body["job_id"] = json!(job);
    }
    step(project, "expire-snapshots", body)
}

/// A world built by deciding and applying commands in order, as the writer
/// does; `seq` numbers the events, and the clock reads one minute per event.
#[derive(Default)]
struct Log {
    world: World,
    seq: u64,
}

impl Log {
    fn now(&self) -> DateTime<Utc> {
        t("2026-12-01T00:00:00Z") + Duration::minutes(self.seq as i64)
    }

    fn decode(step: &Step) -> CommandEnvelope {
        let body = serde_json::to_vec(&step.body).unwrap();
        decode(step.project, step.verb, &body, None)
            .unwrap_or_else(|e| panic!("{} {}: {e}", step.verb, step.body))
    }

    fn decide(&self, step: &Step) -> Decision {
        decide(&self.world, &Self::decode(step), self.now())
    }

    fn apply(&mut self, decided: Vec<Decided>) {
        let now = self.now();
        for d in decided {
            self.seq += 1;
            let version = d.event.is_job_change().then(|| {
                d.job_id
                    .and_then(|j| self.world.jobs.get(&j))
                    .map_or(1, |j| j.version + 1)
            });
            self.world.evolve(&Envelope {
                seq: self.seq,
                event_id: Uuid::from_u128(u128::from(self.seq)),
                schema_version: 1,
                project_id: d.project_id,
                job_id: d.job_id,
                job_version: version,
                command_id: CID,
                actor: None,
                actor_verified: false,
                recorded_at: now,
                prev_hash: String::new(),
                event: d.event,
                hash: String::new(),
            });
        }
    }

    fn given(steps: &[Step]) -> Log {
        let mut log = Log::default();
        for s in steps {
            let decided = log
                .decide(s)
                .unwrap_or_else(|r| panic!("given {} {} refused: {r:?}", s.verb, s.body));
            log.apply(decided);
        }
        log
    }

    fn catalog(&self, job: Uuid) -> Vec<Snapshot> {
        self.world
            .catalogs
            .get(&job)
            .map_or(vec![], |c| c.snapshots.clone())
    }
}

// ---- the expected values ----

fn snap(id: Uuid, taken_at: &str, size: u64, classes: &[SnapshotClass], expires: &str) -> Snapshot {
    Snapshot {
        snapshot_id: id,
        taken_at: t(taken_at),
        size_bytes: size,
        classes: classes.to_vec(),
        expires_at: t(expires),
        do_not_delete: false,
    }
}

fn kept(s: Snapshot) -> Snapshot {
    Snapshot {
        do_not_delete: true,
        ..s
    }
}

/// Job A keeps dailies 7 days; the rest of its schedule is the default
/// (base 2 days, weekly 2 weeks, monthly 1 month = 28 days). Its first
/// snapshot, on Sunday 2027-02-28, is its first daily, weekly (ISO week 8)
/// and monthly (February).
fn e0() -> Snapshot {
    snap(
        S0,
        "2027-02-28T00:00:00Z",
        500,
        &ALL,
        "2027-03-28T00:00:00Z",
    )
}
/// Monday 2027-03-01 starts a new ISO week and a new month: monthly, 28 days.
fn e1() -> Snapshot {
    snap(
        S1,
        "2027-03-01T00:00:00Z",
        1000,
        &ALL,
        "2027-03-29T00:00:00Z",
    )
}
/// Tuesday: daily only, 7 days.
fn e2() -> Snapshot {
    snap(
        S2,
        "2027-03-02T00:00:00Z",
        2000,
        &[Base, Daily],
        "2027-03-09T00:00:00Z",
    )
}
/// A second Monday snapshot, reported after the Tuesday one: base, 2 days.
fn e3() -> Snapshot {
    snap(
        S3,
        "2027-03-01T12:00:00Z",
        3000,
        &[Base],
        "2027-03-03T12:00:00Z",
    )
}
/// After terminate and a new start, on the Monday again: base only, since
/// that day had its daily (purged snapshots count).
fn e5() -> Snapshot {
    snap(
        S5,
        "2027-03-01T06:00:00Z",
        5,
        &[Base],
        "2027-03-03T06:00:00Z",
    )
}
/// Jobs B (p1) and C (p2) keep base snapshots only: 2 days, whatever class.
fn eb() -> Snapshot {
    snap(B1, "2027-03-01T00:00:00Z", 10, &ALL, "2027-03-03T00:00:00Z")
}
fn ec() -> Snapshot {
    snap(C1, "2027-03-01T00:00:00Z", 10, &ALL, "2027-03-03T00:00:00Z")
}

fn decided(project: &str, job: Uuid, event: Event) -> Decided {
    Decided {
        project_id: ProjectId::parse(project).unwrap(),
        job_id: Some(job),
        event,
    }
}

fn recorded(project: &str, job: Uuid, s: &Snapshot) -> Decided {
    let event = Event::SnapshotRecorded {
        snapshot_id: s.snapshot_id,
        taken_at: s.taken_at,
        size_bytes: s.size_bytes,
        classes: s.classes.clone(),
        expires_at: s.expires_at,
    };
    decided(project, job, event)
}

fn expired(project: &str, job: Uuid, s: &Snapshot) -> Decided {
    let event = Event::SnapshotExpired {
        snapshot_id: s.snapshot_id,
        expires_at: s.expires_at,
    };
    decided(project, job, event)
}

fn expiry_changed(s: &Snapshot) -> Decided {
    let event = Event::SnapshotExpiryChanged {
        snapshot_id: s.snapshot_id,
        expires_at: s.expires_at,
        do_not_delete: s.do_not_delete,
    };
    decided("p1", A, event)
}

fn job_started(job: Uuid) -> Decided {
    let event = Event::JobStarted {
        phase: Phase::InitialSync,
        state: JobState::Active,
        reason: None,
    };
    decided("p1", job, event)
}

fn a_schedule() -> Schedule {
    Schedule {
        daily_retention_days: 7,
        ..Schedule::default()
    }
}

// ---- the givens, one story of job A (and B, C) in order ----

fn job_a() -> Vec<Step> {
    vec![
        create("p1", A, json!({"daily_retention_days": 7})),
        on_job("p1", "start", A),
    ]
}

fn then(mut steps: Vec<Step>, more: impl IntoIterator<Item = Step>) -> Vec<Step> {
    steps.extend(more);
    steps
}

fn a_recorded(n: usize) -> Vec<Step> {
    let records = [
        record("p1", A, S0, "2027-02-28T00:00:00Z", 500),
        record("p1", A, S1, "2027-03-01T00:00:00Z", 1000),
        record("p1", A, S2, "2027-03-02T00:00:00Z", 2000),
        record("p1", A, S3, "2027-03-01T12:00:00Z", 3000),
    ];
    then(job_a(), records.into_iter().take(n))
}

fn s2_deleted() -> Vec<Step> {
    let expiry = json!({"expires_at": "2027-03-05T00:00:00Z"});
    then(
        a_recorded(4),
        [
            keep(S2),
            on_snapshot("set-snapshot-expiry", S2, expiry),
            on_snapshot("delete-snapshot", S2, json!({})),
        ],
    )
}

fn with_b_and_c() -> Vec<Step> {
    let base_only = json!({"weekly_retention_weeks": 0, "monthly_retention_months": 0});
    then(
        s2_deleted(),
        [
            create("p1", B, base_only.clone()),
            on_job("p1", "start", B),
            record("p1", B, B1, "2027-03-01T00:00:00Z", 10),
            create("p2", C, base_only),
            on_job("p2", "start", C),
            record("p2", C, C1, "2027-03-01T00:00:00Z", 10),
        ],
    )
}

fn expired_a_and_p1() -> Vec<Step> {
    let now = "2027-03-04T00:00:00Z";
    then(
        with_b_and_c(),
        [expire("p1", Some(A), now), expire("p1", None, now)],
    )
}

fn a_stopped() -> Vec<Step> {
    then(expired_a_and_p1(), [on_job("p1", "stop", A), keep(S1)])
}

fn a_terminated() -> Vec<Step> {
    then(a_stopped(), [on_job("p1", "terminate", A)])
}

fn a_restarted() -> Vec<Step> {
    then(
        a_terminated(),
        [
            on_job("p1", "start", A),
            record("p1", A, S5, "2027-03-01T06:00:00Z", 5),
        ],
    )
}

// ---- the table ----

enum Then {
    Events(Vec<Decided>),
    /// Refused: the code, the job's state, words the message must hold.
    Refused(RejectCode, Option<JobState>, Vec<String>),
}

/// A job as the job view shows it: state, phase, version, snapshot_count,
/// latest_snapshot_at.
type JobFacts = (JobState, Option<Phase>, u64, u64, Option<&'static str>);

struct Row<'a> {
    name: &'a str,
    given: Vec<Step>,
    when: Step,
    then: Then,
    /// After the events are applied: these jobs' catalogs, exactly.
    catalogs: Vec<(Uuid, Vec<Snapshot>)>,
    jobs: Vec<(Uuid, JobFacts)>,
}

fn check(row: Row<'_>) {
    let name = row.name;
    let mut log = Log::given(&row.given);
    let got = log.decide(&row.when);
    match (row.then, got) {
        (Then::Events(want), Ok(got)) => {
            assert_eq!(got, want, "{name}: events");
            log.apply(got);
        }
        (Then::Refused(code, state, words), Err(r)) => {
            assert_eq!((r.code, r.state), (code, state), "{name}: {r:?}");
            for w in words {
                assert!(
                    r.message.contains(&w),
                    "{name}: {:?} lacks {w:?}",
                    r.message
                );
            }
        }
        (Then::Events(want), Err(r)) => panic!("{name}: refused {r:?}, want {want:?}"),
        (Then::Refused(code, ..), Ok(got)) => panic!("{name}: decided {got:?}, want {code:?}"),
    }
    for (job, want) in row.catalogs {
        assert_eq!(log.catalog(job), want, "{name}: catalog of {job}");
    }
    for (job, (state, phase, version, count, latest)) in row.jobs {
        let j = &log.world.jobs[&job];
        let got = (
            j.state,
            j.phase,
            j.version,
            j.snapshot_count,
            j.latest_snapshot_at,
        );
        let want = (state, phase, version, count, latest.map(t));
        assert_eq!(got, want, "{name}: job {job}");
    }
}

fn refused(code: RejectCode, state: JobState, words: &[&str]) -> Then {
    let words = words.iter().map(|w| w.to_string()).collect();
    Then::Refused(code, Some(state), words)
}

/// Recording snapshots: classes and expiry, the catalog in time order, the
/// phase, duplicates, and the states that refuse a new snapshot.
#[test]
fn record_snapshot() {
    let rows = vec![
        Row {
            name: "create: a schedule subset, the rest default",
            given: vec![],
            when: create("p1", A, json!({"daily_retention_days": 7})),
            then: Then::Events(vec![decided(
                "p1",
                A,
                Event::JobCreated {
                    deployment: Deployment {
                        kind: DeploymentKind::ReplicaSet,
                        name: "rs".into(),
                        cluster: None,
                    },
                    schedule: a_schedule(),
                    region: None,
                },
            )]),
            catalogs: vec![(A, vec![])],
            jobs: vec![(A, (Inactive, None, 1, 0, None))],
        },
        Row {
            name: "start: initial_sync, with an empty catalog",
            given: vec![create("p1", A, json!({"daily_retention_days": 7}))],
            when: on_job("p1", "start", A),
            then: Then::Events(vec![job_started(A)]),
            catalogs: vec![(A, vec![])],
            jobs: vec![(A, (Active, Some(InitialSync), 2, 0, None))],
        },
        Row {
            name: "the first snapshot (a Sunday) is daily, weekly and monthly; initial_sync ends",
            given: a_recorded(0),
            when: record("p1", A, S0, "2027-02-28T00:00:00Z", 500),
            then: Then::Events(vec![recorded("p1", A, &e0())]),
            catalogs: vec![(A, vec![e0()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    3,
                    1,
                    Some("2027-02-28T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "a Monday that starts a month is daily, weekly and monthly (28 days)",
            given: a_recorded(1),
            when: record("p1", A, S1, "2027-03-01T00:00:00Z", 1000),
            then: Then::Events(vec![recorded("p1", A, &e1())]),
            catalogs: vec![(A, vec![e0(), e1()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    4,
                    2,
                    Some("2027-03-01T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "the Tuesday after is daily only (7 days)",
            given: a_recorded(2),
            when: record("p1", A, S2, "2027-03-02T00:00:00Z", 2000),
            then: Then::Events(vec![recorded("p1", A, &e2())]),
            catalogs: vec![(A, vec![e0(), e1(), e2()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    5,
                    3,
                    Some("2027-03-02T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "out of order, a second Monday snapshot is base only (2 days), in time order",
            given: a_recorded(3),
            when: record("p1", A, S3, "2027-03-01T12:00:00Z", 3000),
            then: Then::Events(vec![recorded("p1", A, &e3())]),
            catalogs: vec![(A, vec![e0(), e1(), e3(), e2()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    6,
                    4,
                    Some("2027-03-02T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "the same snapshot again is already_exists, naming it",
            given: a_recorded(4),
            when: record("p1", A, S1, "2027-03-01T00:00:00Z", 1000),
            then: refused(AlreadyExists, Active, &[&S1.to_string()]),
            catalogs: vec![(A, vec![e0(), e1(), e3(), e2()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    6,
                    4,
                    Some("2027-03-02T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "Stopped: no new snapshot (naming the state), the old ones kept",
            given: a_stopped(),
            when: record("p1", A, S4, "2027-03-03T00:00:00Z", 1),
            then: refused(InvalidTransition, Stopped, &["Stopped"]),
            catalogs: vec![(A, vec![e0(), kept(e1())])],
            jobs: vec![(A, (Stopped, None, 12, 2, Some("2027-03-01T00:00:00Z")))],
        },
        Row {
            name: "Inactive (terminated): no new snapshot, naming the state",
            given: a_terminated(),
            when: record("p1", A, S4, "2027-03-03T00:00:00Z", 1),
            then: refused(InvalidTransition, Inactive, &["Inactive"]),
            catalogs: vec![(A, vec![])],
            jobs: vec![(A, (Inactive, None, 14, 0, None))],
        },
        Row {
            name: "a start after terminate is a full initial sync",
            given: a_terminated(),
            when: on_job("p1", "start", A),
            then: Then::Events(vec![job_started(A)]),
            catalogs: vec![(A, vec![])],
            jobs: vec![(A, (Active, Some(InitialSync), 15, 0, None))],
        },
        Row {
            name: "after terminate, a day whose daily was purged still had its daily",
            given: then(a_terminated(), [on_job("p1", "start", A)]),
            when: record("p1", A, S5, "2027-03-01T06:00:00Z", 5),
            then: Then::Events(vec![recorded("p1", A, &e5())]),
            catalogs: vec![(A, vec![e5()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    16,
                    1,
                    Some("2027-03-01T06:00:00Z"),
                ),
            )],
        },
        Row {
            name: "a new schedule keeps the others' settings; recorded snapshots keep their expiry",
            given: a_restarted(),
            when: step(
                "p1",
                "change-schedule",
                json!({"command_id": CID, "job_id": A, "schedule": {"snapshot_interval_hours": 12}}),
            ),
            then: Then::Events(vec![decided(
                "p1",
                A,
                Event::ScheduleChanged {
                    schedule: Schedule {
                        snapshot_interval_hours: 12,
                        ..a_schedule()
                    },
                },
            )]),
            catalogs: vec![(A, vec![e5()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    17,
                    1,
                    Some("2027-03-01T06:00:00Z"),
                ),
            )],
        },
    ];
    rows.into_iter().for_each(check);
}

/// do_not_delete, a new expiry, the operator's delete and unknown snapshots,
/// in the states that allow them and those that do not.
#[test]
fn snapshot_expiry_and_delete() {
    let four = || vec![e0(), e1(), e3(), e2()];
    let three = || vec![e0(), e1(), e3()];
    let moved = Snapshot {
        expires_at: t("2027-03-05T00:00:00Z"),
        ..e2()
    };
    let rows = vec![
        Row {
            name: "do_not_delete keeps the expiry it had",
            given: a_recorded(4),
            when: keep(S2),
            then: Then::Events(vec![expiry_changed(&kept(e2()))]),
            catalogs: vec![(A, vec![e0(), e1(), e3(), kept(e2())])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    7,
                    4,
                    Some("2027-03-02T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "a do_not_delete snapshot cannot be deleted",
            given: then(a_recorded(4), [keep(S2)]),
            when: on_snapshot("delete-snapshot", S2, json!({})),
            then: refused(InvalidTransition, Active, &["do_not_delete"]),
            catalogs: vec![(A, vec![e0(), e1(), e3(), kept(e2())])],
            jobs: vec![],
        },
        Row {
            name: "an expiry again ends do_not_delete",
            given: then(a_recorded(4), [keep(S2)]),
            when: on_snapshot(
                "set-snapshot-expiry",
                S2,
                json!({"expires_at": "2027-03-05T00:00:00Z"}),
            ),
            then: Then::Events(vec![expiry_changed(&moved)]),
            catalogs: vec![(A, vec![e0(), e1(), e3(), moved.clone()])],
            jobs: vec![],
        },
        Row {
            name: "then it can be deleted",
            given: then(
                a_recorded(4),
                [
                    keep(S2),
                    on_snapshot(
                        "set-snapshot-expiry",
                        S2,
                        json!({"expires_at": "2027-03-05T00:00:00Z"}),
                    ),
                ],
            ),
            when: on_snapshot("delete-snapshot", S2, json!({})),
            then: Then::Events(vec![decided(
                "p1",
                A,
                Event::SnapshotDeleted { snapshot_id: S2 },
            )]),
            catalogs: vec![(A, three())],
            // latest_snapshot_at follows the retained snapshots
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    9,
                    3,
                    Some("2027-03-01T12:00:00Z"),
                ),
            )],
        },
        Row {
            name: "delete an unknown snapshot: not_found, naming it",
            given: a_recorded(4),
            when: on_snapshot("delete-snapshot", UNKNOWN, json!({})),
            then: refused(NotFound, Active, &[&UNKNOWN.to_string()]),
            catalogs: vec![(A, four())],
            jobs: vec![],
        },
        Row {
            name: "set-snapshot-expiry of an unknown snapshot: not_found",
            given: a_recorded(4),
            when: keep(UNKNOWN),
            then: refused(NotFound, Active, &[&UNKNOWN.to_string()]),
            catalogs: vec![(A, four())],
            jobs: vec![],
        },
        Row {
            name: "a deleted snapshot cannot be deleted twice",
            given: s2_deleted(),
            when: on_snapshot("delete-snapshot", S2, json!({})),
            then: refused(NotFound, Active, &[&S2.to_string()]),
            catalogs: vec![(A, three())],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    9,
                    3,
                    Some("2027-03-01T12:00:00Z"),
                ),
            )],
        },
        Row {
            name: "Stopped: the expiry can still be changed",
            given: then(expired_a_and_p1(), [on_job("p1", "stop", A)]),
            when: keep(S1),
            then: Then::Events(vec![expiry_changed(&kept(e1()))]),
            catalogs: vec![(A, vec![e0(), kept(e1())])],
            jobs: vec![(A, (Stopped, None, 12, 2, Some("2027-03-01T00:00:00Z")))],
        },
        Row {
            name: "Inactive: no delete, naming the state",
            given: a_terminated(),
            when: on_snapshot("delete-snapshot", S1, json!({})),
            then: refused(InvalidTransition, Inactive, &["Inactive"]),
            catalogs: vec![(A, vec![])],
            jobs: vec![],
        },
        Row {
            name: "Inactive: no set-snapshot-expiry, naming the state",
            given: a_terminated(),
            when: keep(S1),
            then: refused(InvalidTransition, Inactive, &["Inactive"]),
            catalogs: vec![(A, vec![])],
            jobs: vec![],
        },
    ];
    rows.into_iter().for_each(check);
}

/// Expiry on demand, for one job and for a project (never another
/// project's), and terminate purging everything.
#[test]
fn expire_and_terminate() {
    let now = "2027-03-04T00:00:00Z";
    let rows = vec![
        Row {
            name: "a base-only schedule: every class expires with base (2 days)",
            given: then(
                s2_deleted(),
                [
                    create(
                        "p1",
                        B,
                        json!({"weekly_retention_weeks": 0, "monthly_retention_months": 0}),
                    ),
                    on_job("p1", "start", B),
                ],
            ),
            when: record("p1", B, B1, "2027-03-01T00:00:00Z", 10),
            then: Then::Events(vec![recorded("p1", B, &eb())]),
            catalogs: vec![(B, vec![eb()]), (A, vec![e0(), e1(), e3()])],
            jobs: vec![(
                B,
                (
                    Active,
                    Some(Incremental),
                    3,
                    1,
                    Some("2027-03-01T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "for one job: only its due snapshot; another job's due one is out of scope",
            given: with_b_and_c(),
            when: expire("p1", Some(A), now),
            then: Then::Events(vec![expired("p1", A, &e3())]),
            catalogs: vec![(A, vec![e0(), e1()]), (B, vec![eb()]), (C, vec![ec()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    10,
                    2,
                    Some("2027-03-01T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "for one job with nothing more due: no event",
            given: then(with_b_and_c(), [expire("p1", Some(A), now)]),
            when: expire("p1", Some(A), now),
            then: Then::Events(vec![]),
            catalogs: vec![(A, vec![e0(), e1()]), (B, vec![eb()])],
            jobs: vec![(
                A,
                (
                    Active,
                    Some(Incremental),
                    10,
                    2,
                    Some("2027-03-01T00:00:00Z"),
                ),
            )],
        },
        Row {
            name: "for a project: its due snapshots, never another project's",
            given: then(with_b_and_c(), [expire("p1", Some(A), now)]),
            when: expire("p1", None, now),
            then: Then::Events(vec![expired("p1", B, &eb())]),
            catalogs: vec![(A, vec![e0(), e1()]), (B, vec![]), (C, vec![ec()])],
            jobs: vec![(B, (Active, Some(Incremental), 4, 0, None))],
        },
        Row {
            name: "for the other project: its own",
            given: expired_a_and_p1(),
            when: expire("p2", None, now),
            then: Then::Events(vec![expired("p2", C, &ec())]),
            catalogs: vec![(A, vec![e0(), e1()]), (C, vec![])],
            jobs: vec![],
        },
        Row {
            name: "terminate purges everything, do_not_delete included",
            given: a_stopped(),
            when: on_job("p1", "terminate", A),
            then: Then::Events(vec![
                decided("p1", A, Event::JobTerminated {}),
                decided(
                    "p1",
                    A,
                    Event::SnapshotsPurged {
                        snapshot_ids: vec![S0, S1],
                    },
                ),
            ]),
            catalogs: vec![(A, vec![]), (C, vec![ec()])],
            jobs: vec![(A, (Inactive, None, 14, 0, None))],
        },
        Row {
            name: "terminate while Active: stop it first",
            given: a_recorded(4),
            when: on_job("p1", "terminate", A),
            then: refused(InvalidTransition, Active, &["Active", "stop it first"]),
            catalogs: vec![(A, vec![e0(), e1(), e3(), e2()])],
            jobs: vec![],
        },
    ];
    rows.into_iter().for_each(check);
}

/// Schedule values outside DOMAIN.md's table: refused `bad_request` naming
/// the field (and the allowed values), never recorded, so the producer can
/// fix the body and retry with the same command_id. A value no schedule
/// may have is refused by the decoder, whatever the job (an unknown one
/// too); one that only the job's own schedule rules out, by `decide`.
#[test]
fn schedule_values_outside_the_table() {
    let rows: [(Value, &[&str]); 11] = [
        (
            json!({"snapshot_interval_hours": 7}),
            &["snapshot_interval_hours", "6, 8, 12, 24"],
        ),
        (
            json!({"snapshot_retention_days": 31}),
            &["snapshot_retention_days"],
        ),
        (
            json!({"snapshot_retention_days": 1}),
            &["snapshot_retention_days"],
        ),
        (
            json!({"snapshot_interval_hours": 6, "snapshot_retention_days": 6}),
            &["snapshot_retention_days"],
        ),
        (
            json!({"daily_retention_days": 366}),
            &["daily_retention_days"],
        ),
        (
            json!({"weekly_retention_weeks": 53}),
            &["weekly_retention_weeks"],
        ),
        (
            json!({"monthly_retention_months": 37}),
            &["monthly_retention_months"],
        ),
        (
            json!({"point_in_time_window_hours": 0}),
            &["point_in_time_window_hours"],
        ),
        (
            json!({"point_in_time_window_hours": 169}),
            &["point_in_time_window_hours"],
        ),
        (
            json!({"reference_hour_of_day": 24}),
            &["reference_hour_of_day"],
        ),
        (
            json!({"reference_minute_of_hour": 60}),
            &["reference_minute_of_hour"],
        ),
    ];
    for (schedule, words) in rows {
        let name = schedule.to_string();
        let body = json!({"command_id": CID, "job_id": A, "schedule": schedule});
        let e = decode(
            "p1",
            "change-schedule",
            &serde_json::to_vec(&body).unwrap(),
            None,
        )
        .expect_err(&name);
        for w in words {
            assert!(e.0.contains(w), "{name}: {e} lacks {w}");
        }
    }
    // Base retention 30 days needs the 24-hour interval the job has.
    let given = then(
        a_recorded(1),
        [step(
            "p1",
            "change-schedule",
            json!({"command_id": "00000000-0000-0000-0000-000000000c2d", "job_id": A,
                   "schedule": {"snapshot_retention_days": 30}}),
        )],
    );
    let when = step(
        "p1",
        "change-schedule",
        json!({"command_id": CID, "job_id": A, "schedule": {"snapshot_interval_hours": 6}}),
    );
    let r = Log::given(&given).decide(&when).unwrap_err();
    assert!(!r.code.is_audited(), "a bad_request is not recorded");
    check(Row {
        name: "interval 6 beside base retention 30",
        given,
        when,
        then: refused(BadRequest, Active, &["snapshot_retention_days", "2-5"]),
        catalogs: vec![(A, vec![e0()])],
        jobs: vec![(
            A,
            (
                Active,
                Some(Incremental),
                4,
                1,
                Some("2027-02-28T00:00:00Z"),
            ),
        )],
    });
}

/// Every malformed body of the snapshot verbs (and change-schedule) is a
/// decode error, `bad_request` at intake: it never reaches `decide`.
#[test]
fn malformed_bodies_are_refused_by_the_decoder() {
    let (j, s) = (A.to_string(), S1.to_string());
    let cid = CID.to_string();
    let record = |taken_at: Value, size_bytes: Value| {
        json!({"command_id": cid, "job_id": j, "snapshot_id": s,
               "taken_at": taken_at, "size_bytes": size_bytes})
    };
    let t = json!("2027-03-05T00:00:00Z");
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "taken_at not a time",
            "record-snapshot",
            record(json!("yesterday"), json!(1)),
            "taken_at",
        ),
        (
            "taken_at a date only",
            "record-snapshot",
            record(json!("2027-03-05"), json!(1)),
            "taken_at",
        ),
        (
            "taken_at without an offset",
            "record-snapshot",
            record(json!("2027-03-05T00:00:00"), json!(1)),
            "taken_at",
        ),
        (
            "taken_at not a calendar day",
            "record-snapshot",
            record(json!("2027-02-30T00:00:00Z"), json!(1)),
            "taken_at",
        ),
        (
            "taken_at a number",
            "record-snapshot",
            record(json!(1_803_859_200), json!(1)),
            "taken_at",
        ),
        (
            "taken_at null",
            "record-snapshot",
            record(Value::Null, json!(1)),
            "taken_at",
        ),
        (
            "negative size_bytes",
            "record-snapshot",
            record(t.clone(), json!(-1)),
            "size_bytes",
        ),
        (
            "fractional size_bytes",
            "record-snapshot",
            record(t.clone(), json!(1.5)),
            "size_bytes",
        ),
        (
            "size_bytes a string",
            "record-snapshot",
            record(t.clone(), json!("1024")),
            "size_bytes",
        ),
        (
            "size_bytes beyond u64",
            "record-snapshot",
            record(t.clone(), json!(18_446_744_073_709_551_616.0)),
            "size_bytes",
        ),
        (
            "record without taken_at",
            "record-snapshot",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s, "size_bytes": 1}),
            "missing field `taken_at`",
        ),
        (
            "record without size_bytes",
            "record-snapshot",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s, "taken_at": t}),
            "missing field `size_bytes`",
        ),
        (
            "record without snapshot_id",
            "record-snapshot",
            json!({"command_id": cid, "job_id": j, "taken_at": t, "size_bytes": 1}),
            "missing field `snapshot_id`",
        ),
        (
            "malformed snapshot_id",
            "record-snapshot",
            json!({"command_id": cid, "job_id": j, "snapshot_id": "snap-1",
                   "taken_at": t, "size_bytes": 1}),
            "snapshot_id",
        ),
        (
            "classes set by the producer",
            "record-snapshot",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s,
                   "taken_at": t, "size_bytes": 1, "classes": ["monthly"]}),
            "unknown field `classes`",
        ),
        (
            "expiry set by the producer",
            "record-snapshot",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s,
                   "taken_at": t, "size_bytes": 1, "expires_at": t}),
            "unknown field `expires_at`",
        ),
        (
            "both expires_at and do_not_delete",
            "set-snapshot-expiry",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s,
                   "expires_at": t, "do_not_delete": true}),
            "either expires_at",
        ),
        (
            "neither expires_at nor do_not_delete",
            "set-snapshot-expiry",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s}),
            "either expires_at",
        ),
        (
            "do_not_delete false alone",
            "set-snapshot-expiry",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s, "do_not_delete": false}),
            "either expires_at",
        ),
        (
            "expires_at not a time",
            "set-snapshot-expiry",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s, "expires_at": "soon"}),
            "expires_at",
        ),
        (
            "do_not_delete not a boolean",
            "set-snapshot-expiry",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s, "do_not_delete": "yes"}),
            "do_not_delete",
        ),
        (
            "set-snapshot-expiry without snapshot_id",
            "set-snapshot-expiry",
            json!({"command_id": cid, "job_id": j, "do_not_delete": true}),
            "missing field `snapshot_id`",
        ),
        (
            "delete with do_not_delete",
            "delete-snapshot",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s, "do_not_delete": true}),
            "unknown field `do_not_delete`",
        ),
        (
            "delete with expires_at",
            "delete-snapshot",
            json!({"command_id": cid, "job_id": j, "snapshot_id": s, "expires_at": t}),
            "unknown field `expires_at`",
        ),
        (
            "delete without snapshot_id",
            "delete-snapshot",
            json!({"command_id": cid, "job_id": j}),
            "missing field `snapshot_id`",
        ),
        (
            "expire without now",
            "expire-snapshots",
            json!({"command_id": cid, "job_id": j}),
            "missing field `now`",
        ),
        (
            "expire with now not a time",
            "expire-snapshots",
            json!({"command_id": cid, "now": "now"}),
            "now",
        ),
        (
            "expire with a snapshot_id",
            "expire-snapshots",
            json!({"command_id": cid, "now": t, "snapshot_id": s}),
            "unknown field `snapshot_id`",
        ),
        (
            "expire with a malformed job_id",
            "expire-snapshots",
            json!({"command_id": cid, "now": t, "job_id": "job-1"}),
            "job_id",
        ),
        (
            "schedule value of the wrong type",
            "change-schedule",
            json!({"command_id": cid, "job_id": j, "schedule": {"snapshot_interval_hours": -6}}),
            "snapshot_interval_hours",
        ),
        (
            "unknown schedule setting",
            "change-schedule",
            json!({"command_id": cid, "job_id": j, "schedule": {"hourly": 1}}),
            "unknown field `hourly`",
        ),
        (
            "change-schedule without schedule",
            "change-schedule",
            json!({"command_id": cid, "job_id": j}),
            "missing field `schedule`",
        ),
    ];
    for (what, verb, body, needle) in cases {
        let bytes = serde_json::to_vec(&body).unwrap();
        match decode("p1", verb, &bytes, None) {
            Ok(c) => panic!("{what}: decoded {c:?}"),
            Err(e) => assert!(e.0.contains(needle), "{what}: {:?} lacks {needle:?}", e.0),
        }
    }
}

/// The snapshot events as the log and the stream carry them (`type` and
/// `data` side by side; times RFC 3339, whole seconds, `Z`).
#[test]
fn snapshot_events_as_json() {
    let rows = [
        (
            recorded("p1", A, &e1()).event,
            json!({"type": "SnapshotRecorded", "data": {
                "snapshot_id": S1, "taken_at": "2027-03-01T00:00:00Z", "size_bytes": 1000,
                "classes": ["base", "daily", "weekly", "monthly"],
                "expires_at": "2027-03-29T00:00:00Z"}}),
        ),
        (
            expiry_changed(&kept(e2())).event,
            json!({"type": "SnapshotExpiryChanged", "data": {
                "snapshot_id": S2, "expires_at": "2027-03-09T00:00:00Z", "do_not_delete": true}}),
        ),
        (
            Event::SnapshotDeleted { snapshot_id: S2 },
            json!({"type": "SnapshotDeleted", "data": {"snapshot_id": S2}}),
        ),
        (
            expired("p1", A, &e3()).event,
            json!({"type": "SnapshotExpired", "data": {
                "snapshot_id": S3, "expires_at": "2027-03-03T12:00:00Z"}}),
        ),
        (
            Event::SnapshotsPurged {
                snapshot_ids: vec![S0, S1],
            },
            json!({"type": "SnapshotsPurged", "data": {"snapshot_ids": [S0, S1]}}),
        ),
    ];
    for (event, want) in rows {
        let name = event.type_name();
        assert_eq!(serde_json::to_value(&event).unwrap(), want, "{name}");
    }
}
