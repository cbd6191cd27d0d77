//! The log without NATS: a scripted scenario through the real ledger on a
//! real redb file, snapshotted (projection, `bcp replay --format json`,
//! history); random command sequences (proptest) whose stored projection
//! must equal a fold of the log and whose chain must verify; tampering.

use bcp::audit::replay::{Cut, Select, replay};
use bcp::audit::verify::verify as verify_with;
use bcp::domain::command::decode;
use bcp::domain::{Envelope, World};
use bcp::store::Store;
use bcp::store::ledger::Pending;
use bcp::store::pipeline::Pipeline;
use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use redb::ReadableTable;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use uuid::Uuid;

fn job(n: u128) -> Uuid {
    Uuid::from_u128(0x0192_f0c4_0000_7000_8000_0000_0000_0000 | n)
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 8, 0, 0).unwrap()
}

/// Command `n` (its command_id) of `verb` for job 1 in project p1, with
/// the body's other fields from `extra`.
fn job1_command(n: u128, verb: &str, extra: serde_json::Value) -> Pending {
    let mut body = json!({"command_id": Uuid::from_u128(n), "job_id": job(1)});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Pending::new(decode("p1", verb, body.to_string().as_bytes(), None).unwrap())
}

/// The id of snapshot `n` in the older-store and layout tests.
fn snapshot_id(n: u128) -> Uuid {
    Uuid::from_u128(0x5000 + n)
}

/// A record-snapshot body of snapshot `n` (its size `n` bytes), taken at
/// A pipeline on the store at `path` (made if missing), after `cmds` at
/// [`t0`], every one of them answered ok.
fn open_and_execute(path: &Path, cmds: &[Pending], ids: &mut dyn FnMut() -> Uuid) -> Pipeline<()> {
    let mut p = Pipeline::open(Store::open_or_create(path).unwrap()).unwrap();
    let replies = p.execute(cmds, t0(), ids).unwrap();
    assert!(replies.iter().all(|r| r.ok), "{replies:?}");
    p
}

/// `taken_at`.
fn snapshot_body(n: u128, taken_at: DateTime<Utc>) -> serde_json::Value {
    json!({"snapshot_id": snapshot_id(n), "taken_at": taken_at, "size_bytes": n})
}

/// Drives a ledger with a scripted clock and counter ids.
struct Script {
    ledger: Pipeline<()>,
    now: DateTime<Utc>,
    next_id: u128,
    next_cmd: u128,
}

impl Script {
    fn new(path: &Path) -> Script {
        let ledger = Pipeline::open(Store::open_or_create(path).unwrap()).unwrap();
        Script {
            ledger,
            now: t0(),
            next_id: 0,
            next_cmd: 0,
        }
    }

    /// Send one command (body without command_id), one minute after the last.
    fn send(
        &mut self,
        project: &str,
        verb: &str,
        mut body: serde_json::Value,
    ) -> bcp::domain::Reply {
        self.next_cmd += 1;
        body["command_id"] = json!(Uuid::from_u128(0xc0de_0000 + self.next_cmd));
        let cmd =
            decode(project, verb, body.to_string().as_bytes(), Some("script")).expect("valid body");
        self.now += Duration::minutes(1);
        let mut ids = || {
            self.next_id += 1;
            Uuid::from_u128(0xe000_0000 + self.next_id)
        };
        let mut replies = self
            .ledger
            .execute(&[Pending::new(cmd)], self.now, &mut ids)
            .unwrap();
        replies.pop().unwrap()
    }
}

fn scenario(path: &Path) {
    let mut s = Script::new(path);
    let rs = json!({"kind": "replica_set", "name": "rs0"});
    let shard = json!({"kind": "shard", "name": "shard-0", "cluster": "c1"});
    assert!(
        s.send(
            "p1",
            "create",
            json!({"job_id": job(1), "deployment": rs, "schedule": {"snapshot_interval_hours": 6}})
        )
        .ok
    );
    assert!(s.send("p1", "start", json!({"job_id": job(1)})).ok);
    assert!(!s.send("p1", "start", json!({"job_id": job(1)})).ok); // invalid_transition, recorded
    assert!(
        s.send(
            "p1",
            "stop",
            json!({"job_id": job(1), "expected_version": 2})
        )
        .ok
    );
    assert!(
        !s.send(
            "p1",
            "terminate",
            json!({"job_id": job(1), "expected_version": 2})
        )
        .ok
    ); // version_conflict
    assert!(s.send("p1", "terminate", json!({"job_id": job(1)})).ok);
    assert!(
        s.send(
            "p2",
            "create",
            json!({"job_id": job(2), "deployment": shard, "region": "eu"})
        )
        .ok
    );
    assert!(s.send("p2", "start", json!({"job_id": job(2)})).ok); // eu has no stores: Misconfigured
    assert!(
        s.send(
            "_admin",
            "configure-region",
            json!({"region": "eu", "snapshot_store": "s3-eu", "oplog_store": "ol-eu"})
        )
        .ok
    );
    assert!(
        s.send(
            "_admin",
            "configure-region",
            json!({"region": "eu", "sync_store": "sync-eu"})
        )
        .ok
    ); // → Active
    assert!(!s.send("p1", "stop", json!({"job_id": job(2)})).ok); // job of another project: not_found
}

#[test]
fn scripted_scenario_projection_replay_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    let store = Store::open_existing(&path).unwrap();

    let world = store.load_world().unwrap();
    insta::assert_yaml_snapshot!("projection", world.jobs.values().collect::<Vec<_>>());
    insta::assert_yaml_snapshot!("regions", world.regions.values().collect::<Vec<_>>());

    let events = store.job_events(job(1)).unwrap();
    insta::assert_yaml_snapshot!("history_job1", store.history(&events).unwrap());

    let report = verify(&store).unwrap();
    assert_eq!(report.events, 13);
    drop(store);

    // The CLI, as a user runs it, at the end and at a past seq.
    let bin = env!("CARGO_BIN_EXE_bcp");
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let db = path.to_str().unwrap();
    insta::assert_snapshot!(
        "replay_json_full",
        run(&["replay", "--db", db, "--format", "json"])
    );
    insta::assert_snapshot!(
        "replay_json_seq4",
        run(&["replay", "--db", db, "--until-seq", "4", "--format", "json"])
    );
    let verified = run(&["audit", "verify", "--db", db]);
    assert!(
        verified.starts_with("ok: 13 events verified, head seq 13"),
        "{verified}"
    );
}

#[test]
fn replay_as_of_a_seq_equals_the_fold_of_that_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    let store = Store::open_existing(&path).unwrap();
    let all = store.events(1, u64::MAX).unwrap();
    for cut in 0..=all.len() {
        let view = replay(
            &store,
            Cut {
                until_seq: Some(cut as u64),
                until: None,
            },
            &Select::default(),
        )
        .unwrap();
        let folded = World::fold(&all[..cut]);
        assert_eq!(view.as_of_seq, cut as u64);
        assert_eq!(
            view.jobs,
            folded.jobs.into_values().collect::<Vec<_>>(),
            "cut {cut}"
        );
    }
}

/// Overwrite one stored event's bytes, bypassing the ledger.
fn tamper(path: &Path, seq: u64, edit: impl FnOnce(Envelope) -> Vec<u8>) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(bcp::store::tables::EVENTS).unwrap();
        let env: Envelope = serde_json::from_slice(t.get(seq).unwrap().unwrap().value()).unwrap();
        t.insert(seq, edit(env).as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn verify_names_the_first_tampered_seq() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    // Edit a field and keep the hash: caught as an edit at that seq.
    tamper(&path, 5, |mut env| {
        env.actor = Some("mallory".into());
        env.to_json()
    });
    let err = verify(&Store::open_existing(&path).unwrap()).unwrap_err();
    assert_eq!(err.seq(), Some(5), "{err}");
    assert!(err.to_string().contains("edited"), "{err}");

    // Recompute that event's hash too: the next event no longer links.
    let fresh = tempfile::tempdir().unwrap();
    let path = fresh.path().join("bcp.redb");
    scenario(&path);
    tamper(&path, 5, |mut env| {
        env.actor = Some("mallory".into());
        let prev = env.prev_hash.clone();
        env.seal(&prev);
        env.to_json()
    });
    let err = verify(&Store::open_existing(&path).unwrap()).unwrap_err();
    assert_eq!(err.seq(), Some(6), "{err}");
    assert!(err.to_string().contains("prev_hash"), "{err}");

    // The CLI exits 1 and names the seq.
    let out = Command::new(env!("CARGO_BIN_EXE_bcp"))
        .args(["audit", "verify", "--db", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("seq 6"));
}

/// Edit a stored job view in place, bypassing the ledger (written back as
/// JSON, the row layout before the compact one, which reads alike).
fn edit_job_row(path: &Path, j: Uuid, edit: impl FnOnce(&mut serde_json::Value)) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(bcp::store::tables::JOB_ROWS).unwrap();
        let key = bcp::store::tables::JobRow::Job.key(j.as_u128(), 0);
        let job = bcp::store::rows::read_job(t.get(key).unwrap().unwrap().value()).unwrap();
        let mut v = serde_json::to_value(job).unwrap();
        edit(&mut v);
        t.insert(key, serde_json::to_vec(&v).unwrap().as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
}

/// Every row of `table`, copied out (to rewrite them in the same transaction).
fn every_row<K>(table: &impl ReadableTable<K, &'static [u8]>) -> Vec<(K, Vec<u8>)>
where
    K: redb::Key + 'static + for<'a> redb::Value<SelfType<'a> = K>,
{
    (table.iter().unwrap())
        .map(|r| r.unwrap())
        .map(|(k, v)| (k.value(), v.value().to_vec()))
        .collect()
}

/// Every combined row taken apart, as a store written before combined
/// rows held its jobs, and the mark that says the store combines them
/// removed: how many there were.
fn take_apart(txn: &redb::WriteTransaction) -> usize {
    use bcp::store::tables::{CHECKPOINT, COMBINED_ROWS, JOB_ROWS};
    let mut t = txn.open_table(JOB_ROWS).unwrap();
    let apart: Vec<_> = (every_row(&t).into_iter())
        .filter_map(|(k, v)| bcp::store::rows::apart(k.0, &v))
        .collect();
    for (key, row) in apart.iter().flatten() {
        t.insert(*key, row.as_deref().unwrap()).unwrap();
    }
    let mut c = txn.open_table(CHECKPOINT).unwrap();
    assert!(c.remove(COMBINED_ROWS).unwrap().is_some());
    apart.len()
}

/// A class row as JSON runs, the layout before the compact one.
fn classes_json(row: &[u8]) -> Vec<u8> {
    let c = bcp::store::rows::read_catalog(row, []).unwrap();
    let json = json!({
        "daily_runs": c.daily_days,
        "weekly_runs": c.weekly_weeks,
        "monthly_runs": c.monthly_months,
    });
    serde_json::to_vec(&json).unwrap()
}

/// A job's view and catalog share one row while the catalog holds at most
/// `COMBINED_MAX` snapshots: a batch that takes it past that lays its rows
/// out apart, one that brings it back combines them again and removes the
/// rows apart; each state reads back as it is (held behind the table, and
/// written to it), verifies, and loads the same after a reopen.
#[test]
fn a_job_moves_between_one_row_and_rows_apart_as_its_catalog_grows_and_shrinks() {
    use bcp::store::rows;
    use bcp::store::tables::JobRow;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let cmd = job1_command;
    let max = rows::COMBINED_MAX as u128;
    let record = |n: u128| {
        let taken_at = t0() + Duration::hours(7 * n as i64);
        cmd(0x100 + n, "record-snapshot", snapshot_body(n, taken_at))
    };
    let mut next = 0u128;
    let mut ids = || {
        next += 1;
        Uuid::from_u128(next)
    };
    // Kinds of job 1's stored rows but its event index: the table's rows
    // under what is held behind it.
    let kinds = |store: &Store| {
        let id = job(1).as_u128();
        let view = store
            .job_rows((id, 0, 0)..=(id, u8::MAX, u128::MAX))
            .unwrap();
        let rows = view.rows().unwrap();
        (rows.range(..).unwrap())
            .map(|r| r.unwrap().0.1)
            .filter(|k| *k != JobRow::Event as u8)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let one_row = std::collections::BTreeSet::from([JobRow::Job as u8]);
    let apart = std::collections::BTreeSet::from([
        JobRow::Job as u8,
        JobRow::Classes as u8,
        JobRow::Snapshot as u8,
    ]);
    let mut p = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
    let store = p.store().clone();
    let mut run = |p: &mut Pipeline<()>, cmds: Vec<Pending>| {
        let replies = p.execute(&cmds, t0(), &mut ids).unwrap();
        assert!(replies.iter().all(|r| r.ok), "{replies:?}");
    };
    let created = [
        cmd(
            1,
            "create",
            json!({"deployment": {"kind": "replica_set", "name": "rs0"}}),
        ),
        cmd(2, "start", json!({})),
    ];
    run(
        &mut p,
        created.into_iter().chain((1..=max).map(record)).collect(),
    );
    let check =
        |store: &Store, world: &bcp::domain::World, want: &std::collections::BTreeSet<u8>| {
            assert_eq!(kinds(store), *want);
            assert_eq!(
                store.catalog(job(1)).unwrap().as_ref(),
                world.catalogs.get(&job(1))
            );
            assert_eq!(store.job(job(1)).unwrap().as_ref(), world.jobs.get(&job(1)));
            verify(store).unwrap();
        };
    check(&store, p.world(), &one_row);
    run(&mut p, vec![record(max + 1), record(max + 2)]);
    check(&store, p.world(), &apart);
    store.checkpoint().unwrap();
    check(&store, p.world(), &apart);
    run(&mut p, vec![cmd(0x300, "stop", json!({}))]);
    check(&store, p.world(), &apart);
    let delete = |n: u128| {
        cmd(
            0x200 + n,
            "delete-snapshot",
            json!({"snapshot_id": snapshot_id(n)}),
        )
    };
    run(&mut p, vec![delete(1), delete(2)]);
    check(&store, p.world(), &one_row);
    store.checkpoint().unwrap();
    check(&store, p.world(), &one_row);
    assert_eq!(p.world().catalogs[&job(1)].snapshots.len(), max as usize);
    let world = p.world().clone();
    drop((p, store));
    let store = Store::open_existing(&path).unwrap();
    assert_eq!(store.load_world().unwrap().catalogs, world.catalogs);
    check(&store, &world, &one_row);
}

/// A store written before combined rows, with a snapshot row where bcp
/// puts none (a row that would outlive its snapshots), is refused when
/// opened for writing, as reading it is: its rows are not combined into a
/// catalog the log does not hold.
#[test]
fn an_older_store_with_a_misplaced_snapshot_row_is_refused_not_combined() {
    use bcp::store::rows;
    use bcp::store::tables::{JOB_ROWS, JobRow};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let cmd = job1_command;
    let mut next = 0u128;
    let mut ids = || {
        next += 1;
        Uuid::from_u128(next)
    };
    let snapshot = |n: u128| snapshot_body(n, t0() + Duration::hours(n as i64));
    let cmds = [
        cmd(
            1,
            "create",
            json!({"deployment": {"kind": "replica_set", "name": "rs0"}}),
        ),
        cmd(2, "start", json!({})),
        cmd(3, "record-snapshot", snapshot(1)),
    ];
    let p = open_and_execute(&path, &cmds, &mut ids);
    let stray = p.world().catalogs[&job(1)].snapshots[0].clone();
    drop(p);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        assert_eq!(take_apart(&txn), 1);
        let sub = (2u128..)
            .find(|n| !rows::starts_row(Uuid::from_u128(*n)))
            .unwrap();
        let row = rows::snapshots_row(&[bcp::domain::Snapshot {
            snapshot_id: Uuid::from_u128(0x6000),
            ..stray
        }]);
        (txn.open_table(JOB_ROWS).unwrap())
            .insert(JobRow::Snapshot.key(job(1).as_u128(), sub), row.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let read_only = Store::open_read_only(&path, 1 << 20).unwrap();
    let read = read_only.load_world().unwrap_err().to_string();
    assert!(read.contains("bcp puts"), "{read}");
    drop(read_only);
    let err = Store::open_or_create(&path)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("bcp puts"), "{err}");
}

/// A store written by the bcp before times were stored as numbers (job
/// views and snapshot rows in postcard with RFC 3339 texts for times,
/// class rows as JSON) reads alike: it verifies read-only, serves, and the
/// rows a later batch changes are written in the current encoding, next to
/// the older rows, which stay as they are; it still verifies. (Its job's
/// catalog is larger than `COMBINED_MAX`, so its rows stay apart.)
#[test]
fn a_store_with_rows_of_times_as_text_reads_verifies_and_serves() {
    use bcp::store::rows;
    use bcp::store::tables::{JOB_ROWS, JobRow};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let cmd = job1_command;
    let snapshot = |n: u128, hours: i64| {
        snapshot_body(
            n,
            t0() + Duration::hours(hours) + Duration::microseconds(n as i64),
        )
    };
    let mut next = 0u128;
    let mut ids = || {
        next += 1;
        Uuid::from_u128(next)
    };
    let replica_set = json!({"deployment": {"kind": "replica_set", "name": "rs0"}});
    let many = rows::COMBINED_MAX as u128 + 2;
    let cmds: Vec<_> = [cmd(1, "create", replica_set), cmd(2, "start", json!({}))]
        .into_iter()
        .chain((1..=many).map(|n| cmd(2 + n, "record-snapshot", snapshot(n, 29 * n as i64))))
        .collect();
    let p = open_and_execute(&path, &cmds, &mut ids);
    drop(p);
    // The first bytes of job 1's rows, by kind.
    let first_bytes = |path: &Path| {
        let db = redb::Database::open(path).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let t = txn.open_table(JOB_ROWS).unwrap();
        (every_row(&t).into_iter())
            .filter(|(k, _)| k.0 == job(1).as_u128() && k.1 != JobRow::Event as u8)
            .map(|(k, v)| (k.1, v[0]))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    };
    let (view, classes, snapshots) = (
        JobRow::Job as u8,
        JobRow::Classes as u8,
        JobRow::Snapshot as u8,
    );
    assert_eq!(
        first_bytes(&path),
        [(view, 4), (classes, 1), (snapshots, 5)],
        "times as numbers; its rows apart"
    );
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        assert_eq!(take_apart(&txn), 0, "its catalog is too large to combine");
        {
            let mut t = txn.open_table(JOB_ROWS).unwrap();
            for (key, bytes) in every_row(&t) {
                let mut older = match key.1 {
                    k if k == view => vec![1],
                    k if k == snapshots => vec![2],
                    k if k == classes => {
                        t.insert(key, classes_json(&bytes).as_slice()).unwrap();
                        continue;
                    }
                    _ => continue,
                };
                older.extend(
                    match key.1 == view {
                        true => postcard::to_stdvec(&rows::read_job(&bytes).unwrap()),
                        false => postcard::to_stdvec(&rows::read_snapshots(&bytes).unwrap()),
                    }
                    .unwrap(),
                );
                assert!(older.len() > bytes.len() + 20, "times as text are longer");
                t.insert(key, older.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    assert_eq!(
        first_bytes(&path),
        [(view, 1), (classes, b'{'), (snapshots, 2)]
    );
    let read_only = Store::open_read_only(&path, 1 << 20).unwrap();
    verify(&read_only).unwrap();
    let catalog = read_only.catalog(job(1)).unwrap().unwrap();
    assert_eq!(catalog.snapshots.len(), many as usize);
    assert_eq!(
        catalog.snapshots[1].taken_at,
        t0() + Duration::hours(58) + Duration::microseconds(2)
    );
    drop(read_only);
    // A change to the view only: the snapshot and class rows stay as they
    // were, and verify compares them by value.
    let mut p = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
    let stopped = p
        .execute(&[cmd(101, "stop", json!({}))], t0(), &mut ids)
        .unwrap();
    assert!(stopped[0].ok, "{stopped:?}");
    drop(p);
    assert_eq!(
        first_bytes(&path),
        [(view, 4), (classes, b'{'), (snapshots, 2)]
    );
    verify(&Store::open_existing(&path).unwrap()).unwrap();
    let mut p = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
    let more = p
        .execute(
            &[
                cmd(102, "start", json!({})),
                cmd(103, "record-snapshot", snapshot(99, 29 * 99)),
            ],
            t0(),
            &mut ids,
        )
        .unwrap();
    assert!(more.iter().all(|r| r.ok), "{more:?}");
    drop(p);
    // The class row and the last snapshot row rewritten; any other
    // snapshot row stays as it was.
    let now = first_bytes(&path);
    assert!(
        [(view, 4), (classes, 1), (snapshots, 5)]
            .iter()
            .all(|b| now.contains(b)),
        "{now:?}"
    );
    assert!(now.len() <= 4 && !now.contains(&(view, 1)), "{now:?}");
    let store = Store::open_existing(&path).unwrap();
    verify(&store).unwrap();
    let catalog = store.catalog(job(1)).unwrap().unwrap();
    assert_eq!(catalog.snapshots.len(), many as usize + 1);
}

/// A store written before the compact row encoding (job views, snapshots
/// and idempotency records as JSON; a row per snapshot, keyed by its id)
/// reads alike: it verifies, it serves (projections loaded, a retry
/// answered from its JSON record, its small catalog's rows rewritten as
/// one row with its view), and rows written after it are compact, next to
/// the JSON ones; it still verifies.
#[test]
fn a_store_with_json_rows_reads_verifies_and_serves() {
    use bcp::store::tables::{CHECKPOINT, COMMANDS, JOB_ROWS, JobRow, RECENT, SNAPSHOT_ROWS};
    use bcp::store::{records, rows};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let cmd = job1_command;
    let snapshot = |n: u128, hours: i64| snapshot_body(n, t0() + Duration::hours(hours));
    let shard = json!({"deployment": {"kind": "shard", "name": "s0", "cluster": "c1"}});
    let mut next = 0u128;
    let mut ids = || {
        next += 1;
        Uuid::from_u128(next)
    };
    let first = {
        let mut p = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
        let cmds = [
            cmd(1, "create", shard),
            cmd(2, "start", json!({})),
            cmd(3, "record-snapshot", snapshot(1, 1)),
            cmd(4, "record-snapshot", snapshot(2, 30)),
        ];
        let replies = p.execute(&cmds, t0(), &mut ids).unwrap();
        assert!(replies.iter().all(|r| r.ok), "{replies:?}");
        replies[2].clone()
    };
    // Rewrite every job view, snapshot and record as JSON, a row per
    // snapshot.
    let mut rewritten = 0;
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        assert_eq!(
            take_apart(&txn),
            1,
            "job 1, its view and catalog in one row"
        );
        {
            let mut t = txn.open_table(JOB_ROWS).unwrap();
            for (key, bytes) in every_row(&t) {
                let json = match key.1 {
                    k if k == JobRow::Job as u8 => {
                        serde_json::to_vec(&rows::read_job(&bytes).unwrap()).unwrap()
                    }
                    k if k == JobRow::Classes as u8 => classes_json(&bytes),
                    k if k == JobRow::Snapshot as u8 => {
                        t.remove(key).unwrap();
                        for s in rows::read_snapshots(&bytes).unwrap() {
                            let json = serde_json::to_vec(&s).unwrap();
                            t.insert(
                                JobRow::Snapshot.key(key.0, s.snapshot_id.as_u128()),
                                json.as_slice(),
                            )
                            .unwrap();
                            rewritten += 1;
                        }
                        continue;
                    }
                    _ => continue,
                };
                assert!(json.len() > bytes.len(), "the compact row is the smaller");
                t.insert(key, json.as_slice()).unwrap();
                rewritten += 1;
            }
            let mut c = txn.open_table(CHECKPOINT).unwrap();
            assert!(c.remove(SNAPSHOT_ROWS).unwrap().is_some());
            // That layout kept every record in COMMANDS (no recent ones).
            let mut c = txn.open_table(COMMANDS).unwrap();
            for (key, bytes) in every_row(&c) {
                let json = serde_json::to_vec(&rows::read_record(&bytes).unwrap()).unwrap();
                assert!(json.starts_with(b"{"));
                c.insert(key, json.as_slice()).unwrap();
                rewritten += 1;
            }
            let mut recent = txn.open_table(RECENT).unwrap();
            for (ordinal, row) in every_row(&recent) {
                let (key, bytes) = records::read_recent_row(&row).unwrap();
                let json = serde_json::to_vec(&rows::read_record(bytes).unwrap()).unwrap();
                assert!(json.starts_with(b"{"));
                c.insert(key, json.as_slice()).unwrap();
                recent.remove(ordinal).unwrap();
                rewritten += 1;
            }
        }
        txn.commit().unwrap();
    }
    assert_eq!(
        rewritten,
        1 + 1 + 2 + 4,
        "one view, one class row, two snapshots, four records"
    );
    let read_only = Store::open_read_only(&path, 1 << 20).unwrap();
    verify(&read_only).unwrap();
    assert_eq!(
        read_only.catalog(job(1)).unwrap().unwrap().snapshots.len(),
        2
    );
    drop(read_only);
    let p = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
    assert_eq!(p.world().catalogs[&job(1)].snapshots.len(), 2);
    drop(p);
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let t = txn.open_table(JOB_ROWS).unwrap();
        let rows_of_job_1: Vec<_> = (every_row(&t).into_iter())
            .filter(|(k, _)| k.0 == job(1).as_u128() && k.1 != JobRow::Event as u8)
            .collect();
        assert_eq!(rows_of_job_1.len(), 1, "view and catalog in one row");
        let (_, catalog) = rows::read_combined(&rows_of_job_1[0].1).unwrap().unwrap();
        assert_eq!(catalog.snapshots.len(), 2);
    }
    let mut p = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
    assert_eq!(
        p.world().jobs[&job(1)].deployment.cluster.as_deref(),
        Some("c1")
    );
    let retried = p
        .execute(&[cmd(3, "record-snapshot", snapshot(1, 1))], t0(), &mut ids)
        .unwrap();
    assert_eq!(
        retried[0],
        bcp::domain::Reply {
            duplicate: true,
            ..first
        }
    );
    let more = p
        .execute(
            &[
                cmd(5, "record-snapshot", snapshot(3, 60)),
                cmd(6, "stop", json!({})),
            ],
            t0(),
            &mut ids,
        )
        .unwrap();
    assert!(more.iter().all(|r| r.ok), "{more:?}");
    drop(p);
    let store = Store::open_existing(&path).unwrap();
    verify(&store).unwrap();
    assert_eq!(
        store.job(job(1)).unwrap().unwrap().state,
        bcp::domain::JobState::Stopped
    );
}

#[test]
fn verify_catches_a_projection_that_disagrees_with_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    edit_job_row(&path, job(1), |v| v["state"] = json!("Active"));
    let err = verify(&Store::open_existing(&path).unwrap()).unwrap_err();
    assert!(err.to_string().contains(&job(1).to_string()), "{err}");
}

/// Tampering with the rows queries read, which a rebuild of the projections
/// alone would not notice: a second copy of a row under another key, a row
/// of an unknown kind, the per-job event index, region keys, and the
/// idempotency records (a forged reply, a planted record, a deleted one).
/// Each is found, and named.
#[test]
fn verify_compares_every_row_under_its_key_and_the_idempotency_records() {
    use bcp::store::rows;
    use bcp::store::tables::{COMMANDS, JOB_ROWS, JobRow, REGIONS};
    type Tamper = fn(&redb::WriteTransaction);
    let cases: [(&str, Tamper, &str); 12] = [
        (
            "a copy of a view under sub 1",
            |txn| {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                let view = t
                    .get(JobRow::Job.key(job(1).as_u128(), 0))
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                t.insert(JobRow::Job.key(job(1).as_u128(), 1), view.as_slice())
                    .unwrap();
            },
            "view row is stored, but a rebuild of the log has no such row",
        ),
        (
            "a row of unknown kind",
            |txn| {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                t.insert((job(2).as_u128(), 7, 0), &b"{}"[..]).unwrap();
            },
            "row of unknown kind 7",
        ),
        (
            "an event taken out of a job's index",
            |txn| {
                // Job 1's events (seqs 1 to 7) were written as one index row.
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                let key = JobRow::Event.key(job(1).as_u128(), 1);
                let row = t.get(key).unwrap().unwrap().value().to_vec();
                let mut seqs = rows::read_index(1, &row).unwrap();
                assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7]);
                seqs.retain(|&seq| seq != 2);
                t.insert(key, rows::index_row(&seqs).1.as_slice()).unwrap();
            },
            "event index row for seq 2 is missing",
        ),
        (
            "an index row that overlaps the one before it",
            |txn| {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                t.insert(JobRow::Event.key(job(1).as_u128(), 3), &b""[..])
                    .unwrap();
            },
            "event index row for seq 3 overlaps the row before it (which reaches seq 7)",
        ),
        (
            "an index row that does not decode",
            |txn| {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                t.insert(JobRow::Event.key(job(1).as_u128(), 1), &[1u8, 0][..])
                    .unwrap();
            },
            "event index row for seq 1 does not decode: a gap of 0 after seq 1",
        ),
        (
            "another job's event inside a job's index row",
            |txn| {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                let key = JobRow::Event.key(job(1).as_u128(), 1);
                t.insert(key, rows::index_row(&[1, 2, 3, 4, 5, 6, 7, 8]).1.as_slice())
                    .unwrap();
            },
            "event index row for seq 8 is stored",
        ),
        (
            "another job's event in a job's index",
            |txn| {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                t.insert(JobRow::Event.key(job(1).as_u128(), 8), &b""[..])
                    .unwrap();
            },
            "event index row for seq 8 is stored",
        ),
        (
            "a region under another name",
            |txn| {
                let mut t = txn.open_table(REGIONS).unwrap();
                let row = t.remove("eu").unwrap().unwrap().value().to_vec();
                t.insert("us", row.as_slice()).unwrap();
            },
            "region eu is missing",
        ),
        (
            "a compact view row with a byte more",
            |txn| {
                let mut t = txn.open_table(JOB_ROWS).unwrap();
                let key = JobRow::Job.key(job(1).as_u128(), 0);
                let mut row = t.get(key).unwrap().unwrap().value().to_vec();
                row.push(0);
                t.insert(key, row.as_slice()).unwrap();
            },
            "view row differs",
        ),
        (
            "a forged reply",
            |txn| {
                let mut t = txn.open_table(COMMANDS).unwrap();
                let key = t.iter().unwrap().next().unwrap().unwrap().0.value();
                let forged = json!({"fingerprint": "*", "reply": {"ok": false, "error": {"code": "not_found", "message": "forged"}, "duplicate": false}});
                t.insert(key, serde_json::to_vec(&forged).unwrap().as_slice())
                    .unwrap();
            },
            r#"differs from what the log says it got: recorded {"ok":false,"error":{"code":"not_found","message":"forged"}"#,
        ),
        (
            "a planted record",
            |txn| {
                let mut t = txn.open_table(COMMANDS).unwrap();
                let planted = json!({"fingerprint": "*", "reply": {"ok": true, "events": [{"seq": 1, "type": "JobCreated"}], "duplicate": false}});
                t.insert(999u128, serde_json::to_vec(&planted).unwrap().as_slice())
                    .unwrap();
            },
            "names events [1], but the log holds no event of this command",
        ),
        (
            "a deleted record",
            |txn| {
                let mut t = txn.open_table(COMMANDS).unwrap();
                let key = t.iter().unwrap().last().unwrap().unwrap().0.value();
                t.remove(key).unwrap();
            },
            "but it has no idempotency record",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.redb");
    scenario(&clean);
    verify(&Store::open_existing(&clean).unwrap()).unwrap();
    for (what, tamper, expected) in cases {
        let path = dir.path().join("tampered.redb");
        std::fs::copy(&clean, &path).unwrap();
        {
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            tamper(&txn);
            txn.commit().unwrap();
        }
        let err = verify(&Store::open_existing(&path).unwrap())
            .expect_err(what)
            .to_string();
        assert!(err.contains(expected), "{what}: {err}");
    }
}

// ---- property: random command sequences -------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Create(u8, u8),
    Start(u8),
    Stop(u8),
    Terminate(u8),
    Assign(u8, Option<u8>),
    Configure(u8, bool),
    Schedule(u8, u32),
    WrongProject(u8),
    Record(u8, u8, u16),
    Delete(u8, u8),
    Keep(u8, u8),
    Expire(Option<u8>, u16),
    StaleVersion(u8),
    Retry,
}

fn op() -> impl Strategy<Value = Op> {
    let j = 0u8..4;
    let r = 0u8..2;
    prop_oneof![
        (j.clone(), 0u8..3).prop_map(|(j, k)| Op::Create(j, k)),
        j.clone().prop_map(Op::Start),
        j.clone().prop_map(Op::Stop),
        j.clone().prop_map(Op::Terminate),
        (j.clone(), proptest::option::of(r.clone())).prop_map(|(j, r)| Op::Assign(j, r)),
        (r, any::<bool>()).prop_map(|(r, full)| Op::Configure(r, full)),
        (
            j.clone(),
            prop_oneof![Just(6u32), Just(12), Just(24), Just(7)]
        )
            .prop_map(|(j, h)| Op::Schedule(j, h)),
        j.clone().prop_map(Op::WrongProject),
        j.clone().prop_map(Op::StaleVersion),
        (j.clone(), 0u8..6, 0u16..2000).prop_map(|(j, s, h)| Op::Record(j, s, h)),
        (j.clone(), 0u8..6).prop_map(|(j, s)| Op::Delete(j, s)),
        (j.clone(), 0u8..6).prop_map(|(j, s)| Op::Keep(j, s)),
        (proptest::option::of(j), 0u16..4000).prop_map(|(j, h)| Op::Expire(j, h)),
        Just(Op::Retry),
    ]
}

fn body(op: &Op, cmd: u128) -> Option<(&'static str, &'static str, serde_json::Value)> {
    let cid = Uuid::from_u128(0xc0de_0000 + cmd);
    let region = |r: u8| format!("r{r}");
    // Two projects: a region's change moves jobs of both, and each
    // project's commands (and the audit's check of their events) meet
    // the other's jobs.
    let proj = |j: u8| if j.is_multiple_of(2) { "p1" } else { "p2" };
    Some(match op {
        Op::Create(j, k) => {
            let d = match k {
                0 => json!({"kind": "replica_set", "name": "rs"}),
                1 => json!({"kind": "shard", "name": "s", "cluster": "c"}),
                _ => json!({"kind": "config_server", "name": "cfg", "cluster": "c"}),
            };
            (
                proj(*j),
                "create",
                json!({"command_id": cid, "job_id": job(*j as u128), "deployment": d}),
            )
        }
        Op::Start(j) => (
            proj(*j),
            "start",
            json!({"command_id": cid, "job_id": job(*j as u128)}),
        ),
        Op::Stop(j) => (
            proj(*j),
            "stop",
            json!({"command_id": cid, "job_id": job(*j as u128)}),
        ),
        Op::Terminate(j) => (
            proj(*j),
            "terminate",
            json!({"command_id": cid, "job_id": job(*j as u128)}),
        ),
        Op::Assign(j, r) => (
            proj(*j),
            "assign-region",
            json!({"command_id": cid, "job_id": job(*j as u128), "region": r.map(region)}),
        ),
        Op::Configure(r, full) => {
            let store = if *full { json!("st") } else { json!(null) };
            (
                "_admin",
                "configure-region",
                json!({"command_id": cid, "region": region(*r), "snapshot_store": "s", "oplog_store": "o", "sync_store": store}),
            )
        }
        Op::Schedule(j, h) => (
            proj(*j),
            "change-schedule",
            json!({"command_id": cid, "job_id": job(*j as u128), "schedule": {"snapshot_interval_hours": h}}),
        ),
        Op::WrongProject(j) => (
            "p9",
            "stop",
            json!({"command_id": cid, "job_id": job(*j as u128)}),
        ),
        Op::StaleVersion(j) => (
            proj(*j),
            "stop",
            json!({"command_id": cid, "job_id": job(*j as u128), "expected_version": 999}),
        ),
        Op::Record(j, snap, h) => (
            proj(*j),
            "record-snapshot",
            json!({"command_id": cid, "job_id": job(*j as u128), "snapshot_id": Uuid::from_u128(*snap as u128), "taken_at": t0() + Duration::hours(*h as i64), "size_bytes": 1000}),
        ),
        Op::Delete(j, snap) => (
            proj(*j),
            "delete-snapshot",
            json!({"command_id": cid, "job_id": job(*j as u128), "snapshot_id": Uuid::from_u128(*snap as u128)}),
        ),
        Op::Keep(j, snap) => (
            proj(*j),
            "set-snapshot-expiry",
            json!({"command_id": cid, "job_id": job(*j as u128), "snapshot_id": Uuid::from_u128(*snap as u128), "do_not_delete": true}),
        ),
        Op::Expire(j, h) => {
            let mut b = json!({"command_id": cid, "now": t0() + Duration::hours(*h as i64)});
            // One job's, in its project; or every job's of a project.
            let project = match j {
                Some(j) => {
                    b["job_id"] = json!(job(*j as u128));
                    proj(*j)
                }
                None => proj(cmd as u8),
            };
            (project, "expire-snapshots", b)
        }
        Op::Retry => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// For any command sequence, in batches of any size: the stored
    /// projection equals a fold of the log from scratch, the chain verifies,
    /// retries append nothing; no snapshot was recorded while its job was not
    /// Active, no Inactive job has snapshots, an Active job's region has every
    /// store and a Misconfigured job's region lacks one.
    #[test]
    fn stored_projection_is_the_fold_of_the_log(ops in proptest::collection::vec(op(), 1..60), batch in 1usize..8, cut in 0.0f64..1.0) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        let mut pending = Vec::new();
        let mut sent: Vec<Pending> = Vec::new();
        let mut now = t0();
        let mut next = 0u128;
        for (i, op) in ops.iter().enumerate() {
            let p = match body(op, i as u128) {
                Some((project, verb, b)) => match decode(project, verb, b.to_string().as_bytes(), None) {
                    Ok(cmd) => Some(Pending::new(cmd)),
                    Err(e) => { prop_assert!(e.0.contains("snapshot_interval_hours"), "{}", e); None }
                },
                None => sent.last().cloned(),
            };
            if let Some(p) = p {
                sent.push(p.clone());
                pending.push(p);
            }
            // Also after a last command refused by the decoder: what is
            // pending is executed before the retries below.
            if !pending.is_empty() && (pending.len() >= batch || i + 1 == ops.len()) {
                now += Duration::minutes(30);
                let mut ids = || { next += 1; Uuid::from_u128(next) };
                let replies = ledger.execute(&pending, now, &mut ids).unwrap();
                prop_assert_eq!(replies.len(), pending.len());
                pending.clear();
            }
        }
        let log = store.events(1, u64::MAX).unwrap();
        let folded = World::fold(&log);
        prop_assert_eq!(&store.load_world().unwrap(), &folded);
        prop_assert_eq!(ledger.world(), &folded);
        // Replay's and verify's fold: the same but for the expiry index,
        // which is the catalogs' own.
        let mut unindexed = World::default();
        log.iter().for_each(|env| unindexed.evolve_unindexed(env));
        prop_assert!(unindexed.expiring.is_empty());
        unindexed.reindex();
        prop_assert_eq!(&unindexed, &folded);
        let report = verify(&store).unwrap();
        prop_assert_eq!(report.events, log.len() as u64);
        let mut before = World::default();
        for env in &log {
            if let bcp::domain::Event::SnapshotRecorded { .. } = env.event {
                let state = before.jobs[&env.job_id.unwrap()].state;
                prop_assert_eq!(state, bcp::domain::JobState::Active, "snapshot recorded at seq {}", env.seq);
            }
            before.evolve(env);
        }
        for j in folded.jobs.values() {
            let snapshots = folded.catalogs.get(&j.job_id).map_or(0, |c| c.snapshots.len());
            prop_assert_eq!(snapshots as u64, j.snapshot_count);
            if j.state == bcp::domain::JobState::Inactive {
                prop_assert_eq!(snapshots, 0, "Inactive job {} has snapshots", j.job_id);
            }
            if let Some(r) = &j.region {
                let full = folded.region_ready(Some(r));
                match j.state {
                    bcp::domain::JobState::Active => prop_assert!(full, "Active job {} in region {} lacking a store", j.job_id, r),
                    bcp::domain::JobState::Misconfigured => prop_assert!(!full, "Misconfigured job {} in full region {}", j.job_id, r),
                    _ => {}
                }
            }
        }
        // Resending every command appends nothing.
        let head = store.head_seq().unwrap();
        let mut ids = || Uuid::nil();
        let replies = ledger.execute(&sent, now, &mut ids).unwrap();
        prop_assert!(replies.iter().all(|r| r.duplicate || r.code() == Some(bcp::domain::ErrorCode::BadRequest)));
        prop_assert_eq!(store.head_seq().unwrap(), head);

        // Cut back to a prefix, as a group node drops a tail the stream
        // never acknowledged: the store is then what that prefix alone
        // makes, and retries of the commands it holds append nothing.
        if head == 0 {
            return Ok(());
        }
        // At a command's end: a group publishes whole commands (a log cut
        // inside one is refused by verify, `a_log_cut_inside_a_command_is_refused`).
        let ends = |k: u64| k == head || log[k as usize].command_id != log[k as usize - 1].command_id;
        let at = ((head as f64 * cut).ceil() as u64).clamp(1, head);
        let keep = (1..=at).rev().find(|&k| ends(k)).unwrap_or_else(|| (at..=head).find(|&k| ends(k)).unwrap());
        drop(ledger);
        store.truncate_to(keep).unwrap();
        let prefix = &log[..keep as usize];
        prop_assert_eq!(store.head_seq().unwrap(), keep);
        prop_assert_eq!(&store.events(1, u64::MAX).unwrap()[..], prefix);
        prop_assert_eq!(&store.load_world().unwrap(), &World::fold(prefix));
        prop_assert_eq!(verify(&store).unwrap().events, keep);
        let kept: std::collections::HashSet<Uuid> = prefix.iter().map(|e| e.command_id).collect();
        let again: Vec<Pending> = sent.into_iter().filter(|p| kept.contains(&p.cmd.command_id)).collect();
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        let replies = ledger.execute(&again, now, &mut ids).unwrap();
        prop_assert!(replies.iter().all(|r| r.duplicate), "{:?}", replies);
        prop_assert_eq!(store.head_seq().unwrap(), keep);
    }
}

// ---- snapshot catalog scenarios ----------------------------------------------------------

impl Script {
    /// Send with an explicit clock.
    fn send_at(
        &mut self,
        at: DateTime<Utc>,
        project: &str,
        verb: &str,
        body: serde_json::Value,
    ) -> bcp::domain::Reply {
        self.now = at - Duration::minutes(1);
        self.send(project, verb, body)
    }

    fn catalog(&self, j: Uuid) -> Vec<String> {
        let world = self.ledger.world();
        world.catalogs.get(&j).map_or(vec![], |c| {
            c.snapshots
                .iter()
                .map(|s| {
                    let classes: Vec<String> = s
                        .classes
                        .iter()
                        .map(|c| format!("{c:?}").to_lowercase())
                        .collect();
                    let keep = if s.do_not_delete {
                        " do_not_delete"
                    } else {
                        ""
                    };
                    format!(
                        "{} [{}] expires {}{keep}",
                        s.taken_at.format("%m-%d %H:%M"),
                        classes.join(","),
                        s.expires_at.format("%m-%d %H:%M")
                    )
                })
                .collect()
        })
    }
}

fn snap(n: u128) -> Uuid {
    Uuid::from_u128(0x5000_0000 + n)
}

fn started_job(s: &mut Script, j: Uuid, schedule: serde_json::Value) {
    let d = json!({"kind": "replica_set", "name": "rs0"});
    assert!(
        s.send(
            "p1",
            "create",
            json!({"job_id": j, "deployment": d, "schedule": schedule})
        )
        .ok
    );
    assert!(s.send("p1", "start", json!({"job_id": j})).ok);
}

#[test]
fn catalog_forty_days_of_six_hourly_snapshots_then_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Script::new(&dir.path().join("bcp.redb"));
    let j = job(1);
    // 6-hourly, base 3 days, daily 7, weekly 2 weeks, monthly 1 (28 days); days start 02:00 UTC.
    started_job(
        &mut s,
        j,
        json!({"snapshot_interval_hours": 6, "snapshot_retention_days": 3, "daily_retention_days": 7, "reference_hour_of_day": 2}),
    );
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut expired = 0;
    for i in 0..160u128 {
        let taken = start + Duration::hours(6 * i as i64);
        let r = s.send_at(taken + Duration::minutes(5), "p1", "record-snapshot", json!({"job_id": j, "snapshot_id": snap(i), "taken_at": taken, "size_bytes": 1_000_000 + i as u64}));
        assert!(r.ok, "{r:?}");
        if i % 4 == 3 {
            // a daily sweep, as the server's sweeper would
            let r = s.send_at(
                taken + Duration::minutes(10),
                "p1",
                "expire-snapshots",
                json!({"now": taken + Duration::minutes(10)}),
            );
            expired += r.events.len();
        }
    }
    let view = &s.ledger.world().jobs[&j];
    assert_eq!(view.phase, Some(bcp::domain::Phase::Incremental));
    assert_eq!(view.snapshot_count as usize, 160 - expired);
    insta::assert_yaml_snapshot!("catalog_40_days", s.catalog(j));
    // Ten days later with no new snapshots everything but the monthly of February and the weeklies still in range expire.
    let later = start + Duration::days(50);
    let r = s.send_at(
        later,
        "p1",
        "expire-snapshots",
        json!({"job_id": j, "now": later}),
    );
    assert!(r.ok);
    insta::assert_yaml_snapshot!("catalog_40_days_plus_10", s.catalog(j));
}

#[test]
fn catalog_stop_then_expiry_while_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Script::new(&dir.path().join("bcp.redb"));
    let j = job(2);
    started_job(&mut s, j, json!({}));
    let day = |d: i64| Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap() + Duration::days(d);
    for d in 0..5 {
        assert!(s.send_at(day(d), "p1", "record-snapshot", json!({"job_id": j, "snapshot_id": snap(d as u128), "taken_at": day(d), "size_bytes": 10})).ok);
    }
    assert!(s.send_at(day(5), "p1", "stop", json!({"job_id": j})).ok);
    let refused = s.send_at(
        day(5),
        "p1",
        "record-snapshot",
        json!({"job_id": j, "snapshot_id": snap(9), "taken_at": day(5), "size_bytes": 10}),
    );
    assert_eq!(
        refused.code(),
        Some(bcp::domain::ErrorCode::InvalidTransition)
    );
    assert!(refused.error.unwrap().message.contains("Stopped"));
    insta::assert_yaml_snapshot!("catalog_stopped_before_expiry", s.catalog(j));
    let r = s.send_at(day(8), "p1", "expire-snapshots", json!({"now": day(8)}));
    assert_eq!(r.events.len(), 4, "{r:?}"); // days 1..4 keep 2 days (daily retention off); day 0 is the weekly and monthly
    insta::assert_yaml_snapshot!("catalog_stopped_after_expiry", s.catalog(j));
    assert_eq!(
        s.ledger.world().jobs[&j].state,
        bcp::domain::JobState::Stopped
    );
}

#[test]
fn catalog_terminate_purges_everything_and_restart_is_initial_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let mut s = Script::new(&path);
    let j = job(3);
    started_job(&mut s, j, json!({}));
    let t = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    for i in 0..3 {
        assert!(s.send_at(t + Duration::days(i), "p1", "record-snapshot", json!({"job_id": j, "snapshot_id": snap(i as u128), "taken_at": t + Duration::days(i), "size_bytes": 5})).ok);
    }
    assert!(
        s.send(
            "p1",
            "set-snapshot-expiry",
            json!({"job_id": j, "snapshot_id": snap(0), "do_not_delete": true})
        )
        .ok
    );
    let refused = s.send(
        "p1",
        "delete-snapshot",
        json!({"job_id": j, "snapshot_id": snap(0)}),
    );
    assert_eq!(
        refused.code(),
        Some(bcp::domain::ErrorCode::InvalidTransition)
    );
    assert!(
        s.send(
            "p1",
            "delete-snapshot",
            json!({"job_id": j, "snapshot_id": snap(1)})
        )
        .ok
    );
    insta::assert_yaml_snapshot!("catalog_before_terminate", s.catalog(j));
    assert_eq!(
        s.send("p1", "terminate", json!({"job_id": j})).code(),
        Some(bcp::domain::ErrorCode::InvalidTransition)
    );
    assert!(s.send("p1", "stop", json!({"job_id": j})).ok);
    let r = s.send("p1", "terminate", json!({"job_id": j}));
    assert_eq!(
        r.events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["JobTerminated", "SnapshotsPurged"]
    );
    assert!(s.catalog(j).is_empty(), "do_not_delete ones are purged too");
    let purged = s
        .ledger
        .store()
        .events(r.events[1].seq, r.events[1].seq)
        .unwrap();
    insta::assert_yaml_snapshot!(
        "purge_event_data",
        serde_json::to_value(&purged[0].event).unwrap()
    );
    let r = s.send("p1", "start", json!({"job_id": j}));
    assert!(r.ok);
    assert_eq!(
        s.ledger.world().jobs[&j].phase,
        Some(bcp::domain::Phase::InitialSync)
    );
    verify(s.ledger.store()).unwrap();
}

#[test]
fn catalog_region_misconfigured_then_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Script::new(&dir.path().join("bcp.redb"));
    let j = job(4);
    let d = json!({"kind": "replica_set", "name": "rs0"});
    assert!(
        s.send(
            "_admin",
            "configure-region",
            json!({"region": "eu", "snapshot_store": "s3", "oplog_store": "ol", "sync_store": "sy"})
        )
        .ok
    );
    assert!(
        s.send(
            "p1",
            "create",
            json!({"job_id": j, "deployment": d, "region": "eu"})
        )
        .ok
    );
    assert!(s.send("p1", "start", json!({"job_id": j})).ok);
    let t = Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0).unwrap();
    assert!(
        s.send_at(
            t,
            "p1",
            "record-snapshot",
            json!({"job_id": j, "snapshot_id": snap(1), "taken_at": t, "size_bytes": 7})
        )
        .ok
    );
    // The region loses its oplog store: the job is Misconfigured, keeps its snapshots, takes no new ones.
    let r = s.send(
        "_admin",
        "configure-region",
        json!({"region": "eu", "oplog_store": null}),
    );
    assert_eq!(
        r.events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["RegionConfigured", "JobMisconfigured"]
    );
    let refused = s.send("p1", "record-snapshot", json!({"job_id": j, "snapshot_id": snap(2), "taken_at": t + Duration::hours(24), "size_bytes": 7}));
    assert_eq!(
        refused.code(),
        Some(bcp::domain::ErrorCode::InvalidTransition)
    );
    insta::assert_yaml_snapshot!(
        "catalog_misconfigured",
        (s.ledger.world().jobs[&j].state, s.catalog(j))
    );
    // Repaired: back to Active by itself, incremental (its initial sync was done), recording again.
    let r = s.send(
        "_admin",
        "configure-region",
        json!({"region": "eu", "oplog_store": "ol-2"}),
    );
    assert_eq!(
        r.events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["RegionConfigured", "JobReconfigured"]
    );
    assert!(s.send_at(t + Duration::days(1), "p1", "record-snapshot", json!({"job_id": j, "snapshot_id": snap(2), "taken_at": t + Duration::days(1), "size_bytes": 7})).ok);
    let job = &s.ledger.world().jobs[&j];
    insta::assert_yaml_snapshot!("catalog_repaired", (job.state, job.phase, s.catalog(j)));
    let store = s.ledger.store();
    let history = store.history(&store.job_events(j).unwrap()).unwrap();
    let transitions: Vec<String> = history
        .iter()
        .map(|h| {
            format!(
                "{} {:?} -> {:?} {}",
                h.event_type,
                h.from,
                h.to,
                h.reason.clone().unwrap_or_default()
            )
        })
        .collect();
    insta::assert_yaml_snapshot!("region_history", transitions);
}

/// A job moved between Active and Misconfigured by another job's command
/// (a sibling's region assignment, a sibling created with a region) or by a
/// region's configuration: its history names that command's verb, and
/// `bcp audit history` says the same.
#[test]
fn history_names_the_command_that_moved_a_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let mut s = Script::new(&path);
    let shard =
        |name: &str, cluster: &str| json!({"kind": "shard", "name": name, "cluster": cluster});
    let full =
        json!({"region": "eu", "snapshot_store": "s3", "oplog_store": "ol", "sync_store": "sy"});
    assert!(s.send("_admin", "configure-region", full).ok);
    for (n, name, cluster) in [(1, "a", "k1"), (2, "b", "k1"), (3, "c", "k2")] {
        let body = json!({"job_id": job(n), "deployment": shard(name, cluster)});
        assert!(s.send("p1", "create", body).ok);
        assert!(s.send("p1", "start", json!({"job_id": job(n)})).ok);
    }
    // Job 2 is moved by job 1's region assignment, job 3 by job 4's creation.
    let r = s.send(
        "p1",
        "assign-region",
        json!({"job_id": job(1), "region": "eu"}),
    );
    assert_eq!(r.events.len(), 2, "{r:?}");
    let body = json!({"job_id": job(4), "deployment": shard("d", "k2"), "region": "eu"});
    let r = s.send("p1", "create", body);
    assert_eq!(r.events.len(), 2, "{r:?}");
    // Job 1 (Active in the region) is moved by the region's configuration.
    let r = s.send(
        "_admin",
        "configure-region",
        json!({"region": "eu", "oplog_store": null}),
    );
    assert_eq!(r.events.len(), 2, "{r:?}");
    let store = s.ledger.store();
    let last = |n: u128| {
        let history = store.history(&store.job_events(job(n)).unwrap()).unwrap();
        let h = history.last().unwrap().clone();
        (h.event_type, h.verb)
    };
    let moved = |verb: &str| ("JobMisconfigured".to_owned(), verb.to_owned());
    assert_eq!(last(2), moved("assign-region"));
    assert_eq!(last(3), moved("create"));
    assert_eq!(last(1), moved("configure-region"));

    let store_head = store.head_seq().unwrap();
    drop(s);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
        .args(["audit", "history", "--format", "json", "--job"])
        .arg(job(3).to_string())
        .arg("--db")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = v["history"].as_array().unwrap();
    assert_eq!(entries.last().unwrap()["verb"], json!("create"), "{v}");
    // The shape of bcp.query.history's reply, as DESIGN says.
    let reply = schema("replies/history.json");
    assert!(reply.is_valid(&v), "{v}");
    assert_eq!(
        (&v["ok"], &v["as_of_seq"]),
        (&json!(true), &json!(store_head)),
        "{v}"
    );
}

fn verify(store: &Store) -> Result<bcp::audit::verify::Report, bcp::audit::verify::VerifyError> {
    verify_with(store, None, |_| {})
}

// ---- export / import and tampering --------------------------------------------------------

/// A log of a few hundred events: two jobs taking 6-hourly snapshots for 30
/// days with daily sweeps, one stopped and restarted, rejections between.
fn few_hundred_events(path: &Path) -> u64 {
    let mut s = Script::new(path);
    started_job(&mut s, job(1), json!({"snapshot_interval_hours": 6}));
    started_job(&mut s, job(2), json!({}));
    let start = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
    for i in 0..120u128 {
        let taken = start + Duration::hours(6 * i as i64);
        for j in [1, 2] {
            let id = snap(i * 10 + j);
            s.send_at(
                taken + Duration::minutes(1),
                "p1",
                "record-snapshot",
                json!({"job_id": job(j), "snapshot_id": id, "taken_at": taken, "size_bytes": 42}),
            );
        }
        if i % 4 == 0 {
            s.send_at(
                taken + Duration::minutes(2),
                "p1",
                "expire-snapshots",
                json!({"now": taken}),
            );
        }
        if i == 50 {
            assert!(s.send("p1", "stop", json!({"job_id": job(2)})).ok);
        }
        if i == 60 {
            assert!(s.send("p1", "start", json!({"job_id": job(2)})).ok);
        }
    }
    s.ledger.head_seq()
}

/// `bcp jobs | head` and the like: stdout's reader has gone before bcp
/// writes. The command ends quietly with exit 0, as ripgrep does (it
/// panicked in println!, or said "bcp: Broken pipe" and exited 1).
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    few_hundred_events(&db);
    let db = db.to_str().unwrap();
    let job = job(1).to_string();
    for args in [
        &["man"][..],
        &["completions", "bash"],
        &["audit", "digest", "--db", db],
        &["audit", "history", "--db", db, "--job", &job],
        &["jobs", "--db", db],
        &["export", "--db", db],
        &["replay", "--db", db, "--format", "json"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_bcp"))
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).as_ref()
            ),
            (Some(0), ""),
            "bcp {args:?}"
        );
    }
}

fn bcp(args: &[&str], stdin: Option<&[u8]>) -> (i32, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bcp"));
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        // bcp stops reading at the first bad line: a closed pipe is expected.
        let _ = child.stdin.take().unwrap().write_all(input);
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn export_import_round_trip_keeps_the_head_hash() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    let events = few_hundred_events(&db);
    assert!(events > 300, "{events}");
    let db = db.to_str().unwrap();
    let (code, digest) = bcp(&["audit", "digest", "--db", db], None);
    assert_eq!(code, 0, "{digest}");
    let digest = digest.trim().to_owned();
    assert!(digest.starts_with(&format!("{events}:")), "{digest}");

    let file = dir.path().join("log.jsonl");
    let (code, out) = bcp(
        &["export", "--db", db, "--out", file.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{out}");
    let lines = std::fs::read_to_string(&file).unwrap();
    assert_eq!(lines.lines().count() as u64, events);

    // Into an empty file that is already there (e.g. from mktemp).
    let restored = dir.path().join("restored.redb");
    std::fs::write(&restored, b"").unwrap();
    let restored = restored.to_str().unwrap();
    let (code, out) = bcp(
        &[
            "import",
            "--db",
            restored,
            "--digest",
            &digest,
            file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = bcp(
        &["audit", "verify", "--db", restored, "--digest", &digest],
        None,
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        bcp(&["audit", "digest", "--db", restored], None).1.trim(),
        digest
    );
    // The log read from a file named as a store's work file once was
    // (`<db>.importing`): it is neither removed nor overwritten, and no
    // work file is left beside the new store.
    let beside = dir.path().join("beside");
    std::fs::create_dir(&beside).unwrap();
    let input = beside.join("copy.importing");
    std::fs::copy(&file, &input).unwrap();
    let copy = beside.join("copy.redb");
    let (code, out) = bcp(
        &[
            "import",
            "--db",
            copy.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read(&input).unwrap(),
        std::fs::read(&file).unwrap()
    );
    let mut names: Vec<String> = std::fs::read_dir(&beside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["copy.importing", "copy.redb"]);
    // Readable as a store bcp serve makes is (the umask's mode, not 0600).
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
    };
    let served = beside.join("served.redb");
    drop(Store::open_or_create(&served).unwrap());
    assert_eq!(mode(&copy), mode(&served));
    std::fs::remove_file(&served).unwrap();
    // Nothing read (an empty stdin, say): refused, no store made.
    let empty = beside.join("empty.redb");
    let (code, out) = bcp(&["import", "--db", empty.to_str().unwrap(), "-"], Some(b""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the log is empty") && !empty.exists(), "{out}");
    // The restored projections are the original's, and retries still dedupe.
    let original = Store::open_existing(Path::new(db))
        .unwrap()
        .load_world()
        .unwrap();
    let store = Store::open_existing(Path::new(restored)).unwrap();
    assert_eq!(store.load_world().unwrap(), original);
    let mut ledger = Pipeline::open(store).unwrap();
    let first = decode("p1", "create", json!({"command_id": Uuid::from_u128(0xc0de_0001), "job_id": job(1), "deployment": {"kind": "replica_set", "name": "rs0"}}).to_string().as_bytes(), None).unwrap();
    let mut ids = || Uuid::nil();
    let reply = ledger
        .execute(&[Pending::new(first)], t0(), &mut ids)
        .unwrap()
        .pop()
        .unwrap();
    assert!(reply.duplicate && reply.ok, "{reply:?}");
    assert_eq!(reply.events[0].seq, 1);
    // Its command_id reused for another command is a conflict, as it was
    // before the records were rebuilt: the log says the verb, the project
    // and the job it was for.
    let conflicts = [
        ("p1", "start", json!({"job_id": job(1)})),
        (
            "p2",
            "create",
            json!({"job_id": job(1), "deployment": {"kind": "replica_set", "name": "rs0"}}),
        ),
        (
            "p1",
            "create",
            json!({"job_id": job(2), "deployment": {"kind": "replica_set", "name": "rs0"}}),
        ),
    ];
    for (project, verb, mut body) in conflicts {
        body["command_id"] = json!(Uuid::from_u128(0xc0de_0001));
        let other = decode(project, verb, body.to_string().as_bytes(), None).unwrap();
        let reply = ledger
            .execute(&[Pending::new(other)], t0(), &mut ids)
            .unwrap()
            .pop()
            .unwrap();
        let code = reply.error.as_ref().map(|e| e.code);
        assert_eq!(
            code,
            Some(bcp::domain::ErrorCode::CommandIdConflict),
            "{project} {verb}: {reply:?}"
        );
    }
    drop(ledger);
    // Importing again into a store that holds a log is refused, and so is
    // exporting over the store being read: both leave it byte for byte.
    let before = std::fs::read(restored).unwrap();
    let (code, out) = bcp(&["import", "--db", restored, file.to_str().unwrap()], None);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("already holds a log"), "{out}");
    assert!(
        std::fs::read(restored).unwrap() == before,
        "a refused import wrote"
    );
    let (code, out) = bcp(&["export", "--db", restored, "--out", restored], None);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is the store being exported"), "{out}");
    assert!(
        std::fs::read(restored).unwrap() == before,
        "export truncated its store"
    );
}

#[test]
fn tampered_exports_are_refused_naming_the_seq_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    let events = few_hundred_events(&db);
    let db = db.to_str().unwrap();
    let digest = bcp(&["audit", "digest", "--db", db], None)
        .1
        .trim()
        .to_owned();
    let (code, exported) = bcp(&["export", "--db", db], None);
    assert_eq!(code, 0);
    // The helper joins stdout and stderr; the summary ("ok: exported …")
    // is the one line that is not an envelope.
    let lines: Vec<&str> = exported.lines().filter(|l| l.starts_with('{')).collect();
    assert!(
        exported.contains(&format!("ok: exported {events} events")),
        "{exported}"
    );
    assert_eq!(lines.len() as u64, events);

    let forged = {
        let mut env: Envelope = serde_json::from_str(lines[lines.len() - 1]).unwrap();
        env.seq += 1;
        env.actor = Some("mallory".into());
        env.to_json() // keeps the copied hash: does not link
    };
    let edited = lines[99].replace("\"actor\":\"script\"", "\"actor\":\"mallory\"");
    assert_ne!(edited, lines[99], "seq 100 must carry an actor to edit");
    let cases: Vec<(&str, Vec<String>, u64, Option<&str>)> = vec![
        (
            "edit one field",
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    if i == 99 {
                        edited.clone()
                    } else {
                        l.to_string()
                    }
                })
                .collect(),
            100,
            None,
        ),
        (
            "delete one",
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 149)
                .map(|(_, l)| l.to_string())
                .collect(),
            150,
            None,
        ),
        (
            "swap two",
            {
                let mut v: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                v.swap(199, 200);
                v
            },
            200,
            None,
        ),
        (
            "truncate tail",
            lines[..lines.len() - 5]
                .iter()
                .map(|l| l.to_string())
                .collect(),
            events,
            Some(digest.as_str()),
        ),
        (
            "append forged",
            lines
                .iter()
                .map(|l| l.to_string())
                .chain([String::from_utf8(forged).unwrap()])
                .collect(),
            events + 1,
            None,
        ),
    ];
    for (name, tampered, bad_seq, digest) in cases {
        let input = tampered.join("\n") + "\n";
        let target = dir.path().join(format!("{}.redb", name.replace(' ', "-")));
        let target = target.to_str().unwrap();
        let mut args = vec!["import", "--db", target, "-"];
        if let Some(d) = digest {
            args.extend(["--digest", d]);
        }
        let (code, out) = bcp(&args, Some(input.as_bytes()));
        assert_eq!(code, 1, "{name}: {out}");
        assert!(
            out.contains(&format!("seq {bad_seq}:")),
            "{name}: expected seq {bad_seq} in {out}"
        );
        assert!(out.contains("nothing written"), "{name}: {out}");
        assert!(!Path::new(target).exists(), "{name}: a store was written");
    }
}

type EventsTable<'t> = redb::Table<'t, u64, &'static [u8]>;

#[test]
fn tampered_stores_are_caught_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let events = few_hundred_events(&path);
    let digest = bcp(&["audit", "digest", "--db", path.to_str().unwrap()], None)
        .1
        .trim()
        .to_owned();
    // A digest of seq 0 names no event: a usage error, not a truncated log.
    let hash = digest.split_once(':').unwrap().1;
    let zero = format!("0:{hash}");
    let (code, out) = bcp(
        &[
            "audit",
            "verify",
            "--db",
            path.to_str().unwrap(),
            "--digest",
            &zero,
        ],
        None,
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("1 or more") && !out.contains("truncated"),
        "{out}"
    );
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(&path, &p).unwrap();
        p
    };
    let edit = |p: &Path, f: &dyn Fn(&mut EventsTable)| {
        let db = redb::Database::create(p).unwrap();
        let txn = db.begin_write().unwrap();
        f(&mut txn.open_table(bcp::store::tables::EVENTS).unwrap());
        txn.commit().unwrap();
    };
    let bytes =
        |t: &redb::Table<u64, &[u8]>, seq: u64| t.get(seq).unwrap().unwrap().value().to_vec();
    let check = |p: &Path, with_digest: bool, seq: u64, name: &str| {
        let mut args = vec!["audit", "verify", "--db", p.to_str().unwrap()];
        if with_digest {
            args.extend(["--digest", digest.as_str()]);
        }
        let (code, out) = bcp(&args, None);
        assert_eq!(code, 1, "{name}: {out}");
        assert!(
            out.contains(&format!("seq {seq}:")),
            "{name}: expected seq {seq} in {out}"
        );
    };

    // Replay checks each event's place in the log (not its hash): a gap
    // or a reorder ends it, naming the seq, never a state missing events.
    let replay_refuses = |p: &Path, what: &str, name: &str| {
        let (code, out) = bcp(
            &["replay", "--db", p.to_str().unwrap(), "--format", "json"],
            None,
        );
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(what), "{name}: {out}");
    };
    let p = copy("edit.redb");
    edit(&p, &|t| {
        let b = String::from_utf8(bytes(t, 100))
            .unwrap()
            .replace("\"actor\":\"script\"", "\"actor\":\"mallory\"");
        t.insert(100, b.as_bytes()).unwrap();
    });
    check(&p, false, 100, "edit one field");

    let p = copy("version.redb");
    edit(&p, &|t| {
        let mut env: Envelope = serde_json::from_slice(&bytes(t, 100)).unwrap();
        env.job_version = Some(env.job_version.expect("a job's event") + 10);
        t.insert(100, env.to_json().as_slice()).unwrap();
    });
    check(&p, false, 100, "a version jump");
    replay_refuses(&p, "seq 100: job", "a version jump");

    let p = copy("delete.redb");
    edit(&p, &|t| {
        t.remove(150).unwrap();
    });
    check(&p, false, 150, "delete one");
    replay_refuses(
        &p,
        "seq 150: missing; the next stored seq is 151",
        "delete one",
    );
    // Before the gap, replay answers: the state as of seq 149.
    let (code, out) = bcp(
        &[
            "replay",
            "--db",
            p.to_str().unwrap(),
            "--until-seq",
            "149",
            "--format",
            "json",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"as_of_seq\": 149"), "{out}");
    // Export neither skips it nor leaves a file that looks whole.
    let out = dir.path().join("gap.jsonl");
    let (code, text) = bcp(
        &[
            "export",
            "--db",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("seq 150 is missing") && text.contains("149 events written"),
        "{text}"
    );
    assert!(!out.exists(), "a partial export was left");

    let p = copy("swap.redb");
    edit(&p, &|t| {
        let (a, b) = (bytes(t, 200), bytes(t, 201));
        t.insert(200, b.as_slice()).unwrap();
        t.insert(201, a.as_slice()).unwrap();
    });
    check(&p, false, 200, "swap two");
    replay_refuses(&p, "seq 200: envelope says seq 201", "swap two");

    let p = copy("truncate.redb");
    edit(&p, &|t| {
        for seq in events - 4..=events {
            t.remove(seq).unwrap();
        }
    });
    check(&p, true, events, "truncate tail");

    // Well-linked forgeries appended: the last event again (a snapshot
    // recorded twice, which the state machine never decides), and the
    // same with a new snapshot id (a decision it could have made, which
    // the stored projections do not hold).
    for (name, fresh_id, caught) in [
        (
            "append a repeat",
            false,
            format!(
                "seq {}: SnapshotRecorded is not a decision the log before it allows",
                events + 1
            ),
        ),
        (
            "append a new snapshot",
            true,
            "projection differs".to_owned(),
        ),
    ] {
        let p = copy("forged.redb");
        edit(&p, &|t| {
            let mut env: Envelope = serde_json::from_slice(&bytes(t, events)).unwrap();
            env.seq += 1;
            env.event_id = Uuid::from_u128(0xf02_9ed);
            env.job_version = env.job_version.map(|v| v + 1);
            match &mut env.event {
                bcp::domain::Event::SnapshotRecorded { snapshot_id, .. } if fresh_id => {
                    *snapshot_id = Uuid::from_u128(0xf02_9ed);
                }
                bcp::domain::Event::SnapshotRecorded { .. } => {}
                other => panic!("the log ends on {other:?}"),
            }
            let prev = env.hash.clone();
            env.seal(&prev);
            t.insert(events + 1, env.to_json().as_slice()).unwrap();
        });
        let (code, out) = bcp(&["audit", "verify", "--db", p.to_str().unwrap()], None);
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(&caught), "{name}: {out}");
    }
}

// ---- payloads against the checked-in JSON Schemas -----------------------------------------

fn schema(path: &str) -> jsonschema::Validator {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(path);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_valid(v: &jsonschema::Validator, what: &str, instance: &serde_json::Value) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match its schema: {errors:?}\n{instance}"
    );
}

#[test]
fn real_payloads_validate_against_the_checked_in_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    drop(Store::open_existing(&path).unwrap());
    let big = dir.path().join("big.redb");
    few_hundred_events(&big);

    // Every envelope of both logs, every event type among them.
    let envelope = schema("events/envelope.json");
    let mut types = std::collections::BTreeSet::new();
    for p in [&path, &big] {
        let store = Store::open_existing(p).unwrap();
        store
            .for_each_event(|_, bytes| {
                let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                types.insert(v["type"].as_str().unwrap().to_owned());
                assert_valid(&envelope, "envelope", &v);
                Ok(true)
            })
            .unwrap();
    }
    assert!(types.len() >= 10, "{types:?}");

    // Query answers through the server's own code path.
    let store = Store::open_existing(&big).unwrap();
    let q = |kind: &str, body: serde_json::Value| {
        bcp::service::queries::answer(&store, "_admin", kind, body.to_string().as_bytes())
    };
    assert_valid(
        &schema("replies/job.json"),
        "job reply",
        &q("job", json!({"job_id": job(1)})),
    );
    assert_valid(
        &schema("replies/jobs.json"),
        "jobs reply",
        &q("jobs", json!({"project_id": "p1"})),
    );
    let snapshots = q("snapshots", json!({"job_id": job(1)}));
    assert!(!snapshots["snapshots"].as_array().unwrap().is_empty());
    assert_valid(
        &schema("replies/snapshots.json"),
        "snapshots reply",
        &snapshots,
    );
    assert_valid(
        &schema("replies/history.json"),
        "history reply",
        &q("history", json!({"job_id": job(2)})),
    );
    let not_found = q("job", json!({"job_id": job(99)}));
    assert_eq!(not_found["error"]["code"], "not_found");
    assert_valid(&schema("replies/error.json"), "query error", &not_found);
    assert_eq!(not_found["as_of_seq"], json!(store.head_seq().unwrap()));
    assert!(not_found.get("duplicate").is_none(), "{not_found}");
    assert_valid(
        &schema("views/replay.json"),
        "replay",
        &serde_json::to_value(replay(&store, Cut::default(), &Select::default()).unwrap()).unwrap(),
    );
    drop(store);

    // Command bodies and their replies, accepted and rejected.
    let mut s = Script::new(&dir.path().join("bodies.redb"));
    let reply = schema("reply.json");
    let t = Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap();
    let bodies: Vec<(&str, &str, serde_json::Value)> = vec![
        (
            "_admin",
            "configure-region",
            json!({"region": "eu", "snapshot_store": "s", "oplog_store": "o", "sync_store": null}),
        ),
        (
            "p1",
            "create",
            json!({"job_id": job(7), "deployment": {"kind": "shard", "name": "s0", "cluster": "c"}, "schedule": {"snapshot_interval_hours": 12}, "region": "us"}),
        ),
        ("p1", "start", json!({"job_id": job(7), "actor": "ops"})),
        ("p1", "start", json!({"job_id": job(7)})),
        (
            "p1",
            "record-snapshot",
            json!({"job_id": job(7), "snapshot_id": snap(1), "taken_at": t, "size_bytes": 5}),
        ),
        (
            "p1",
            "stop",
            json!({"job_id": job(7), "expected_version": 1}),
        ),
        ("p1", "stop", json!({"job_id": job(7)})),
        (
            "p1",
            "set-snapshot-expiry",
            json!({"job_id": job(7), "snapshot_id": snap(1), "expires_at": t + Duration::days(1)}),
        ),
        (
            "p1",
            "set-snapshot-expiry",
            json!({"job_id": job(7), "snapshot_id": snap(1), "do_not_delete": true}),
        ),
        (
            "p1",
            "change-schedule",
            json!({"job_id": job(7), "schedule": {"weekly_retention_weeks": 4}}),
        ),
        (
            "p1",
            "expire-snapshots",
            json!({"now": t + Duration::days(60)}),
        ),
        (
            "p1",
            "delete-snapshot",
            json!({"job_id": job(7), "snapshot_id": snap(2)}),
        ),
        ("p1", "terminate", json!({"job_id": job(7)})),
        (
            "p1",
            "assign-region",
            json!({"job_id": job(7), "region": null}),
        ),
    ];
    let mut codes = std::collections::BTreeSet::new();
    for (project, verb, body) in bodies {
        let mut with_id = body.clone();
        with_id["command_id"] = json!(Uuid::now_v7());
        assert_valid(&schema(&format!("commands/{verb}.json")), verb, &with_id);
        let r = s.send(project, verb, body);
        codes.insert(r.code().map(|c| format!("{c:?}")));
        assert_valid(
            &reply,
            &format!("{verb} reply"),
            &serde_json::to_value(&r).unwrap(),
        );
    }
    assert!(
        codes.len() >= 3,
        "accepted and several rejections: {codes:?}"
    );
    // And the schemas do refuse what the server refuses.
    let bad = json!({"command_id": Uuid::now_v7(), "job_id": job(1), "surprise": 1});
    assert!(!schema("commands/start.json").is_valid(&bad));
    let bad = json!({"command_id": Uuid::now_v7(), "job_id": job(1), "deployment": {"kind": "cluster", "name": "x"}});
    assert!(!schema("commands/create.json").is_valid(&bad));
    // Values the server refuses whatever the job: the schemas say so too.
    let (rs, t) = (
        json!({"kind": "replica_set", "name": "x"}),
        "2026-05-01T00:00:00Z",
    );
    for (verb, body) in [
        (
            "create",
            json!({"deployment": rs, "schedule": {"snapshot_interval_hours": 7}}),
        ),
        (
            "create",
            json!({"deployment": rs, "schedule": {"daily_retention_days": 366}}),
        ),
        (
            "create",
            json!({"deployment": {"kind": "shard", "name": "x"}}),
        ),
        (
            "create",
            json!({"deployment": {"kind": "replica_set", "name": "x", "cluster": "c"}}),
        ),
        ("change-schedule", json!({"point_in_time_window_hours": 0})),
        ("set-snapshot-expiry", json!({"snapshot_id": snap(1)})),
        (
            "set-snapshot-expiry",
            json!({"snapshot_id": snap(1), "do_not_delete": false}),
        ),
        (
            "set-snapshot-expiry",
            json!({"snapshot_id": snap(1), "expires_at": t, "do_not_delete": true}),
        ),
        (
            "delete-snapshot",
            json!({"snapshot_id": snap(1), "expires_at": t}),
        ),
    ] {
        let mut body = body;
        body["command_id"] = json!(Uuid::now_v7());
        body["job_id"] = json!(job(1));
        let refused = decode("p1", verb, body.to_string().as_bytes(), None);
        assert!(refused.is_err(), "the server takes {verb} {body}");
        assert!(
            !schema(&format!("commands/{verb}.json")).is_valid(&body),
            "the schema of {verb} takes {body}"
        );
    }
    // And what both take.
    for do_not_delete in [json!(false), json!(null)] {
        let body = json!({"command_id": Uuid::now_v7(), "job_id": job(1), "snapshot_id": snap(1), "expires_at": t, "do_not_delete": do_not_delete});
        let taken = decode(
            "p1",
            "set-snapshot-expiry",
            body.to_string().as_bytes(),
            None,
        );
        assert!(taken.is_ok(), "{body}");
        assert_valid(
            &schema("commands/set-snapshot-expiry.json"),
            "expiry",
            &body,
        );
    }
}

// ---- storage faults -----------------------------------------------------------------------

/// What a [`FaultyBackend`] does wrong, switched on from the test.
#[derive(Clone, Debug, Default)]
struct Faults {
    /// Writes and syncs fail while set (a full disk, an I/O error).
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The next sync panics (a bug in the commit path), once.
    panic_once: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Syncs fail while set, writes still succeed: a failed fsync, after
    /// which what was written may yet reach the disk.
    fail_sync: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A file-backed redb backend that fails as its [`Faults`] say.
#[derive(Debug)]
struct FaultyBackend {
    inner: redb::backends::FileBackend,
    faults: Faults,
}

impl FaultyBackend {
    fn check(&self) -> Result<(), std::io::Error> {
        if self.faults.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected: no space left on device"));
        }
        Ok(())
    }
}

impl redb::StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.check()?;
        if self
            .faults
            .panic_once
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected: a bug in the commit path");
        }
        if self
            .faults
            .fail_sync
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::other("injected: fsync failed"));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

/// A store at `path` that fails as the returned [`Faults`] are set.
fn faulty_store(path: &Path) -> (Store, Faults) {
    let faults = Faults::default();
    let file = bcp::store::disk::open_file(path).unwrap();
    let backend = FaultyBackend {
        inner: redb::backends::FileBackend::new(file).unwrap(),
        faults: faults.clone(),
    };
    (Store::with_backend(backend).unwrap(), faults)
}

/// The pipeline decides batch N+1 while batch N commits (bcp serve's
/// writer runs the commit on another thread). When N's commit fails, N+1 is
/// undone with it, exactly those two batches' commands are answered
/// `unavailable`, and memory equals the disk again. (N+1 seeing N's effects
/// and N's uncommitted records: `overlapping_batches_commit_in_order_…`.)
#[test]
fn a_batch_decided_while_the_one_before_commits_sees_it_and_is_undone_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, Faults { fail, .. }) = faulty_store(&dir.path().join("bcp.redb"));
    let mut ledger = Pipeline::open(store.clone()).unwrap();
    let mut next = 0u128;
    let mut ids = || {
        next += 1;
        Uuid::from_u128(next)
    };
    let cmd = |verb: &str, body: serde_json::Value| {
        Pending::new(decode("p1", verb, body.to_string().as_bytes(), None).unwrap())
    };
    let create = json!({"command_id": Uuid::from_u128(1), "job_id": job(1), "deployment": {"kind": "replica_set", "name": "rs"}});
    // The job has a catalog already: N changes the job and not its catalog,
    // N+1 changes both (each undone from what it kept of them).
    let setup = [
        cmd("create", create),
        cmd(
            "start",
            json!({"command_id": Uuid::from_u128(4), "job_id": job(1)}),
        ),
        cmd(
            "record-snapshot",
            json!({"command_id": Uuid::from_u128(5), "job_id": job(1), "snapshot_id": Uuid::from_u128(8), "taken_at": t0(), "size_bytes": 1}),
        ),
        cmd(
            "stop",
            json!({"command_id": Uuid::from_u128(6), "job_id": job(1)}),
        ),
    ];
    let replies = ledger.execute(&setup, t0(), &mut ids).unwrap();
    assert!(replies.iter().all(|r| r.ok), "{replies:?}");
    let on_disk = (ledger.world().clone(), ledger.head_seq());
    assert_eq!(on_disk.0.catalogs[&job(1)].snapshots.len(), 1);

    let start = cmd(
        "start",
        json!({"command_id": Uuid::from_u128(2), "job_id": job(1)}),
    );
    let snapshot = cmd(
        "record-snapshot",
        json!({"command_id": Uuid::from_u128(3), "job_id": job(1), "snapshot_id": Uuid::from_u128(9), "taken_at": t0(), "size_bytes": 1}),
    );
    // N is at the commit thread while N+1 is decided on top of it.
    let mut p: Pipeline<&str> = Pipeline::new(ledger.into_ledger());
    assert!(p.decide(&start, "start", t0(), &mut ids).is_empty());
    let mut n = p.to_commit().expect("N goes to commit");
    assert!(p.decide(&snapshot, "snapshot", t0(), &mut ids).is_empty());
    assert!(p.decide(&start, "start again", t0(), &mut ids).is_empty());
    assert!(p.to_commit().is_none(), "one batch commits at a time");
    assert_eq!(p.head_seq(), 6, "N+1 is decided on N");
    assert_eq!(p.world().catalogs[&job(1)].snapshots.len(), 2);

    // N's commit fails: N+1 is undone with it, every command answered
    // unavailable, newest batch first; memory equals the disk again.
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let result = store.commit(&mut n);
    assert!(result.is_err());
    let settled = p.settle(result);
    let answered: Vec<_> = settled.answers.iter().map(|a| a.to).collect();
    assert_eq!(answered, ["snapshot", "start again", "start"]);
    assert!(settled.answers.iter().all(|a| {
        a.through == 0
            && a.reply.error.as_ref().map(|e| e.code) == Some(bcp::domain::ErrorCode::Unavailable)
    }));
    assert_eq!(settled.head, None);
    assert_eq!((p.world().clone(), p.head_seq()), on_disk);
    assert_eq!(store.load_world().unwrap(), on_disk.0);
    fail.store(false, std::sync::atomic::Ordering::SeqCst);

    // A failed commit() leaves the store needing a reopen: the pipeline
    // stopped, and answers the next command at once.
    assert!(settled.stopped, "{:?}", settled.error);
    let later = p.decide(&snapshot, "later", t0(), &mut ids);
    assert_eq!(later.len(), 1);
    assert_eq!(
        later[0].reply.error.as_ref().map(|e| e.code),
        Some(bcp::domain::ErrorCode::Unavailable)
    );
    assert!(p.to_commit().is_none(), "nothing was opened");
}

/// `bcp serve`'s writer thread over a [`faulty_store`]: commands go in as
/// `create`s of job n with command id n, answers come out.
struct FaultyWriter {
    faults: Faults,
    queue: tokio::sync::mpsc::Sender<bcp::service::writer::WriteRequest>,
    replies: tokio::sync::mpsc::Receiver<Vec<bcp::service::writer::Committed>>,
    fatal: tokio_util::sync::CancellationToken,
    writer: std::thread::JoinHandle<Result<u64, bcp::store::StoreError>>,
    /// What the relay would be handed.
    outbox: bcp::service::relay::Outbox,
}

fn create_command(n: u128) -> Pending {
    let body = json!({"command_id": Uuid::from_u128(n), "job_id": job(n), "deployment": {"kind": "replica_set", "name": "rs"}});
    Pending::new(decode("p1", "create", body.to_string().as_bytes(), None).unwrap())
}

impl FaultyWriter {
    fn start(path: &Path) -> FaultyWriter {
        let (store, faults) = faulty_store(path);
        let ledger = Pipeline::open(store).unwrap();
        let (queue, intake) = tokio::sync::mpsc::channel(8);
        let (replies_tx, replies) = tokio::sync::mpsc::channel(8);
        let (head, _) = tokio::sync::watch::channel(0);
        let fatal = tokio_util::sync::CancellationToken::new();
        let outbox = bcp::service::relay::Outbox::default();
        let writer = bcp::service::writer::spawn(
            ledger.into_ledger(),
            intake,
            replies_tx,
            head,
            outbox.clone(),
            fatal.clone(),
            None,
        );
        FaultyWriter {
            faults,
            queue,
            replies,
            fatal,
            writer,
            outbox,
        }
    }

    fn request(n: u128) -> bcp::service::writer::WriteRequest {
        bcp::service::writer::WriteRequest {
            pending: create_command(n),
            reply_to: bcp::service::reply::ReplyTo::Nobody,
            queued: std::time::Instant::now(),
        }
    }

    /// Send command n and return its answer.
    fn answer(&mut self, n: u128) -> bcp::domain::Reply {
        self.queue.blocking_send(Self::request(n)).unwrap();
        self.replies.blocking_recv().unwrap().remove(0).reply
    }

    /// The message of an `unavailable` answer.
    fn unavailable(&mut self, n: u128) -> String {
        let reply = self.answer(n);
        let error = reply.error.expect("an error reply");
        assert_eq!(serde_json::to_value(error.code).unwrap(), "unavailable");
        error.message
    }

    /// After a fatal error: the server was told to drain and exit, the
    /// intake is closed (anything after it is answered `unavailable` at once,
    /// "bcp is shutting down"), and the writer thread ended with an error.
    fn stopped(self) -> bcp::store::StoreError {
        assert!(
            self.fatal.is_cancelled(),
            "the server is told to drain and exit"
        );
        assert!(self.queue.blocking_send(Self::request(3)).is_err());
        self.writer
            .join()
            .expect("the writer thread does not panic")
            .expect_err("the writer stopped with an error")
    }
}

/// If the commit thread dies mid-batch (a panic: a bug), the writer does
/// not die with it: the batch is answered `unavailable`, saying that a
/// retry after the restart gets the outcome, and the writer stops with an
/// error that makes the server drain and exit.
#[test]
fn a_commit_thread_that_panics_gets_its_batch_answered_and_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let mut w = FaultyWriter::start(&path);
    // A first batch commits; the next one's commit panics.
    assert!(w.answer(1).ok);
    assert_eq!(w.outbox.seqs(), [1], "a committed event goes to the relay");
    w.faults
        .panic_once
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let message = w.unavailable(2);
    assert!(message.contains("after the restart"), "{message}");
    assert_eq!(w.outbox.seqs(), [1], "nothing of the lost batch");
    let stopped = w.stopped();
    assert!(
        matches!(stopped, bcp::store::StoreError::CommitThreadStopped),
        "{stopped:?}"
    );
    // Restarted: whatever the panic left on disk, the job rows agree with
    // the log (a commit in doubt is never checkpointed over).
    let store = Store::open_existing(&path).unwrap();
    verify(&store).unwrap();
    assert_eq!(
        store.job(job(1)).unwrap().map(|j| j.version),
        Some(1),
        "the committed batch's job"
    );
}

/// A commit whose fsync fails may still be recorded: its pages and header
/// were written before the fsync. So the writer answers `unavailable` with
/// "retry with the same command_id", never "nothing recorded" (which would
/// invite a resend under a new command_id, applied twice), and stops; after
/// the restart the retry gets the batch's outcome, applied once.
#[test]
fn a_failed_commit_is_answered_outcome_unknown_and_the_retry_after_the_restart_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let mut w = FaultyWriter::start(&path);
    assert!(w.answer(1).ok);
    w.faults
        .fail_sync
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let message = w.unavailable(2);
    assert!(
        message.contains("retry with the same command_id after the restart")
            && !message.contains("nothing recorded"),
        "{message}"
    );
    // Not handed to the relay: after the restart, the relay reads what
    // the store holds.
    assert_eq!(w.outbox.seqs(), [1]);
    let stopped = w.stopped();
    assert!(
        matches!(stopped, bcp::store::StoreError::CommitFailed(_)),
        "{stopped:?}"
    );

    // Restarted: the batch whose fsync failed was written, so it is there,
    // and the producer's retry is answered from its record.
    let store = Store::open_existing(&path).unwrap();
    verify(&store).unwrap();
    assert_eq!(store.head_seq().unwrap(), 2);
    let mut ledger = Pipeline::open(store).unwrap();
    let mut ids = Uuid::now_v7;
    let retried = ledger
        .execute(&[create_command(2)], t0(), &mut ids)
        .unwrap();
    assert!(retried[0].ok && retried[0].duplicate, "{retried:?}");
    assert_eq!(retried[0].events[0].seq, 2);
    assert_eq!(ledger.head_seq(), 2, "nothing appended twice");
}

/// Idempotency records go to the recent ones, and sweeps merge them into
/// `COMMANDS` (a buffer of 8 here, so a sweep runs every few batches).
/// Driven as `bcp serve`'s writer drives the pipeline (batch N+1 decided
/// while N commits), with scattered command ids: every retry is answered
/// from its record, before, during and after a sweep (a retry decided just
/// after the commit that finished a sweep included); also across a reopen
/// and a failed commit (wherever the sweeps then stand: a sweep here lasts
/// one commit); and the log verifies. Longer sweeps, and a reopen part way
/// through one: `store::records`' tests.
#[test]
fn records_swept_into_commands_answer_every_retry_and_verify() {
    use bcp::store::tables::{COMMANDS, RECENT};
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    // A command id from n: a UUIDv4 scattered over the key space, but every
    // third a UUIDv7 (time-ordered, below most UUIDv4 ids, so its record is
    // appended at once among theirs).
    let id = |n: u128| match n % 3 {
        0 => Uuid::from_u128(n << 80 | 0x7 << 76 | 0b10 << 62 | n),
        _ => {
            let scattered = n.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
            Uuid::from_u128(scattered & !(0xf << 76) | 0x4 << 76)
        }
    };
    let create = |n: u128| {
        let body = json!({"command_id": id(n), "job_id": job(n), "deployment": {"kind": "replica_set", "name": "rs"}});
        Pending::new(decode("p1", "create", body.to_string().as_bytes(), None).unwrap())
    };
    let mut first: std::collections::HashMap<u128, bcp::domain::Reply> = Default::default();
    let mut next_id = 0u128;
    let mut created = 0u128;
    let mut pseudo = 7u64;
    let mut retries_answered = 0;
    // `rounds` batches of three new commands and three retries, each
    // decided while the one before commits; the commit of round `fail_at`
    // fails (the store is then reopened, as bcp serve is restarted).
    let mut run = |store: Store, rounds: u32, fail_at: Option<(u32, Faults)>| {
        store.set_records_buffer(8);
        let mut p: Pipeline<u128> =
            Pipeline::new(Pipeline::open(store.clone()).unwrap().into_ledger());
        let mut committing = None;
        let mut check =
            |answers: Vec<bcp::store::pipeline::Answer<u128>>,
             first: &mut std::collections::HashMap<u128, bcp::domain::Reply>| {
                for a in answers {
                    assert!(a.reply.ok, "{}: {:?}", a.to, a.reply);
                    match first.get(&a.to) {
                        None => {
                            assert!(!a.reply.duplicate, "{}: {:?}", a.to, a.reply);
                            first.insert(a.to, a.reply);
                        }
                        Some(reply) => {
                            assert!(
                                a.reply.duplicate,
                                "retry of {} applied again: {:?}",
                                a.to, a.reply
                            );
                            assert_eq!(
                                bcp::domain::Reply {
                                    duplicate: false,
                                    ..a.reply
                                },
                                *reply
                            );
                            retries_answered += 1;
                        }
                    }
                }
            };
        for round in 0..=rounds {
            // Every other round the next batch is opened while this one
            // commits (its records stay in memory as uncommitted until a
            // commit settles with no batch open, as in the rounds between).
            let overlap = round % 2 == 1;
            let mut decide_new = |p: &mut Pipeline<u128>| {
                let mut ids = || {
                    next_id += 1;
                    Uuid::from_u128(1 << 100 | next_id)
                };
                for _ in 0..3 {
                    created += 1;
                    assert!(
                        p.decide(&create(created), created, t0(), &mut ids)
                            .is_empty()
                    );
                }
            };
            if round < rounds && overlap {
                decide_new(&mut p);
            }
            if let Some(mut batch) = committing.take() {
                if let Some((at, faults)) = &fail_at
                    && *at == round
                {
                    faults.fail.store(true, std::sync::atomic::Ordering::SeqCst);
                    let settled = p.settle(store.commit(&mut batch));
                    assert!(settled.stopped, "{:?}", settled.error);
                    // Its commands (and the open batch's) were never
                    // answered ok: forget them, as a producer would retry.
                    return;
                }
                let settled = p.settle(store.commit(&mut batch));
                assert!(settled.error.is_none(), "{:?}", settled.error);
                check(settled.answers, &mut first);
            }
            // Retries, into the open batch once the one before committed
            // (as the writer goes on deciding while the commit runs): of
            // recent commands, whose records a sweep may just have merged.
            if round < rounds && !overlap {
                decide_new(&mut p);
            }
            if round < rounds {
                let mut ids = || {
                    next_id += 1;
                    Uuid::from_u128(1 << 100 | next_id)
                };
                for _ in 0..3 {
                    pseudo = pseudo
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let n = created.saturating_sub(30) + u128::from(pseudo >> 33) % 30;
                    if first.contains_key(&n) {
                        assert!(p.decide(&create(n), n, t0(), &mut ids).is_empty());
                    }
                }
            }
            committing = p.to_commit();
        }
    };
    run(Store::open_or_create(&path).unwrap(), 40, None);
    // The UUIDv7 records went to `COMMANDS` at once: none waits (a
    // reopened store learns where they end from a sweep, see
    // `store::records`).
    let waiting = || {
        let db = redb::Database::open(&path).unwrap();
        let (rows, _) = bcp::store::records::read_recent(&db.begin_read().unwrap()).unwrap();
        let v7 = (rows.iter()).filter(|(_, id, _)| bcp::store::records::is_v7(*id));
        (v7.count(), rows.len())
    };
    let (v7, all) = waiting();
    assert!(v7 == 0 && all > 0, "{v7} UUIDv7 records of {all} wait");
    // Reopened (mid sweep or not), and a commit that fails.
    let (store, faults) = faulty_store(&path);
    run(store, 30, Some((17, faults)));
    run(Store::open_or_create(&path).unwrap(), 40, None);
    assert!(
        retries_answered > 100,
        "{retries_answered} retries answered"
    );
    verify(&Store::open_existing(&path).unwrap()).unwrap();
    let (merged, recent) = {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        (
            txn.open_table(COMMANDS).unwrap().len().unwrap(),
            txn.open_table(RECENT).unwrap().len().unwrap(),
        )
    };
    assert!(
        merged > 200 && recent < 40,
        "{merged} merged, {recent} recent"
    );
}

/// Group mode: node A, leading, answers command X as a no-op (its record
/// is A's alone: no event). A is deposed; the new leader B, whose state
/// moved on, applies X with events, and A follows them. A's record of X is
/// rewritten where it is, not given a second row: A reopens, answers a
/// retry of X with B's reply, and verifies. X's id below the first
/// command's makes its record a recent one; above, one in `COMMANDS`.
#[test]
fn a_follower_rewrites_its_own_no_op_record_of_a_command_the_new_leader_applied() {
    for x_id in [5, u128::MAX - 1] {
        follower_rewrites_no_op_record(x_id);
    }
}

fn follower_rewrites_no_op_record(x_id: u128) {
    let dir = tempfile::tempdir().unwrap();
    let (a_path, b_path) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    let cmd = |id: u128, verb: &str, body: serde_json::Value| {
        let mut body = body;
        body["command_id"] = json!(Uuid::from_u128(id));
        body["job_id"] = json!(job(1));
        Pending::new(decode("p1", verb, body.to_string().as_bytes(), None).unwrap())
    };
    let create = cmd(
        1 << 120,
        "create",
        json!({"deployment": {"kind": "replica_set", "name": "rs"}, "region": "eu"}),
    );
    let x = cmd(x_id, "assign-region", json!({"region": "eu"}));
    let y = cmd(6, "assign-region", json!({"region": "us"}));
    let mut ids = Uuid::now_v7;
    let mut b = Pipeline::open(Store::open_or_create(&b_path).unwrap()).unwrap();
    let mut a = Pipeline::open(Store::open_or_create(&a_path).unwrap()).unwrap();
    assert!(b.execute(&[create], t0(), &mut ids).unwrap()[0].ok);
    let b_log = |b: &Pipeline<()>, from: u64| -> Vec<Vec<u8>> {
        let events = b.store().raw_events(from, b.head_seq()).unwrap();
        events.into_iter().map(|(_, bytes)| bytes).collect()
    };
    a.follow(b_log(&b, 1)).unwrap();
    // A leads for a moment: X is a no-op (the job is in eu already).
    let noop = a.execute(std::slice::from_ref(&x), t0(), &mut ids).unwrap();
    assert!(noop[0].ok && noop[0].events.is_empty(), "{noop:?}");
    // B leads: Y moves the job to us, then X (a retry) moves it back.
    let head = b.head_seq();
    let applied = b.execute(&[y, x.clone()], t0(), &mut ids).unwrap();
    assert!(
        applied[1].ok && !applied[1].events.is_empty(),
        "{applied:?}"
    );
    a.follow(b_log(&b, head + 1)).unwrap();
    drop(a);
    let store = Store::open_or_create(&a_path).unwrap();
    let mut a = Pipeline::open(store).unwrap();
    let retried = a.execute(&[x], t0(), &mut ids).unwrap();
    assert!(retried[0].duplicate, "{retried:?}");
    assert_eq!(
        retried[0].events, applied[1].events,
        "B's reply, from the log"
    );
    drop(a);
    verify(&Store::open_existing(&a_path).unwrap()).unwrap();
}

/// A follower applies only what the state machine allows where it
/// stands: a well-linked, well-hashed event the leader's decider could not
/// have made (a stop of a job never started) is refused, and nothing of
/// the batch it came in is applied.
#[test]
fn a_follower_refuses_an_event_no_decision_makes() {
    let dir = tempfile::tempdir().unwrap();
    let mut leader =
        Pipeline::open(Store::open_or_create(&dir.path().join("l.redb")).unwrap()).unwrap();
    let mut follower =
        Pipeline::open(Store::open_or_create(&dir.path().join("f.redb")).unwrap()).unwrap();
    let create = job1_command(
        1,
        "create",
        json!({"deployment": {"kind": "replica_set", "name": "rs"}}),
    );
    assert!(leader.execute(&[create], t0(), &mut Uuid::now_v7).unwrap()[0].ok);
    let mut log: Vec<Vec<u8>> = (leader.store().raw_events(1, 1).unwrap().into_iter())
        .map(|(_, bytes)| bytes)
        .collect();
    let mut forged: Envelope = serde_json::from_slice(&log[0]).unwrap();
    forged.seq = 2;
    forged.job_version = Some(2);
    forged.event = bcp::domain::Event::JobStopped {};
    let prev = forged.hash.clone();
    forged.seal(&prev);
    log.push(forged.to_json());
    let err = follower.follow(log).unwrap_err().to_string();
    assert!(
        err.contains("seq 2") && err.contains("JobStopped is not a decision this log allows"),
        "{err}"
    );
    assert_eq!(follower.head_seq(), 0, "nothing of the batch applied");
}

/// Two overlapping batches, committed: N+1 (decided while N commits) sees
/// N's effects (stop after N's start) and answers a retry of N's start from
/// N's record not yet committed; the log verifies, the stored projection is
/// the fold, and the retry appended nothing.
#[test]
fn overlapping_batches_commit_in_order_and_the_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
    let ledger = Pipeline::open(store.clone()).unwrap();
    let mut next = 0u128;
    let mut ids = || {
        next += 1;
        Uuid::from_u128(next)
    };
    let cmd = job1_command;
    let create = cmd(
        1,
        "create",
        json!({"deployment": {"kind": "replica_set", "name": "rs"}}),
    );
    let start = cmd(2, "start", json!({}));
    let stop = cmd(3, "stop", json!({}));
    let mut p: Pipeline<()> = Pipeline::new(ledger.into_ledger());
    assert!(p.decide(&create, (), t0(), &mut ids).is_empty());
    assert!(p.decide(&start, (), t0(), &mut ids).is_empty());
    let mut n = p.to_commit().unwrap();
    assert!(p.decide(&start, (), t0(), &mut ids).is_empty());
    assert!(p.decide(&stop, (), t0(), &mut ids).is_empty());
    let replies = p.settle(store.commit(&mut n)).answers;
    assert!(
        replies.iter().all(|a| a.reply.ok && !a.reply.duplicate),
        "{replies:?}"
    );
    let created = replies[0].reply.events.clone();
    // N is durable while N+1 is still open (it reads committed records as
    // of its start, before N committed): a retry of N's create decided into
    // N+1 now is still a duplicate, not a second create.
    assert!(p.decide(&create, (), t0(), &mut ids).is_empty());
    let mut n1 = p.to_commit().unwrap();
    let replies = p.settle(store.commit(&mut n1)).answers;
    assert!(
        replies[0].reply.duplicate && replies[1].reply.ok,
        "{replies:?}"
    );
    assert!(replies[2].reply.duplicate, "{replies:?}");
    assert_eq!(replies[2].reply.events, created);
    let mut ledger = p;
    assert_eq!(store.head_seq().unwrap(), 3, "create, start, stop");
    assert_eq!(&store.load_world().unwrap(), ledger.world());
    verify(&store).unwrap();
    // After the commit the retry is answered from the stored record: of N's
    // command and of N+1's (the records the next batch would read were
    // opened before N+1 committed, so they are dropped once it settles).
    let replies = ledger.execute(&[start, stop], t0(), &mut ids).unwrap();
    assert!(replies[0].duplicate && replies[0].events[0].seq == 2);
    assert!(replies[1].duplicate && replies[1].events[0].seq == 3);
    assert_eq!(store.head_seq().unwrap(), 3, "no second stop");
}

#[test]
fn a_storage_error_fails_the_batch_changes_nothing_and_the_retry_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    let (store, Faults { fail, .. }) = faulty_store(&path);
    let mut ledger = Pipeline::open(store.clone()).unwrap();
    let mut next = 0u128;
    let mut run = |ledger: &mut Pipeline<()>, verb: &str, body: &serde_json::Value| {
        let cmd = decode("p1", verb, body.to_string().as_bytes(), None).unwrap();
        let mut ids = || {
            next += 1;
            Uuid::from_u128(next)
        };
        ledger.execute(&[Pending::new(cmd)], t0(), &mut ids)
    };
    let create = json!({"command_id": Uuid::from_u128(1), "job_id": job(1), "deployment": {"kind": "replica_set", "name": "rs"}});
    assert!(run(&mut ledger, "create", &create).unwrap()[0].ok);
    let before = (
        ledger.world().clone(),
        ledger.head_seq(),
        ledger.ledger().head_hash().to_owned(),
    );

    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let start = json!({"command_id": Uuid::from_u128(2), "job_id": job(1)});
    let err = run(&mut ledger, "start", &start).unwrap_err();
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_eq!(
        (
            ledger.world().clone(),
            ledger.head_seq(),
            ledger.ledger().head_hash().to_owned()
        ),
        before,
        "memory rolled back"
    );
    // redb refuses further writes on this handle until the file is reopened.
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let err = run(&mut ledger, "start", &start).unwrap_err();
    assert!(err.is_poisoned(), "{err}");
    drop(ledger);
    drop(store);

    // Reopened (what a restarted bcp serve does): nothing of the failed batch
    // is there, and the producer's retry is applied exactly once.
    let store = Store::open_existing(&path).unwrap();
    verify(&store).unwrap();
    let mut ledger = Pipeline::open(store.clone()).unwrap();
    assert_eq!(
        (
            ledger.world().clone(),
            ledger.head_seq(),
            ledger.ledger().head_hash().to_owned()
        ),
        before
    );
    let replies = run(&mut ledger, "start", &start).unwrap();
    assert!(replies[0].ok && !replies[0].duplicate, "{replies:?}");
    assert_eq!(replies[0].events[0].seq, 2, "no gap after the failed batch");
    assert!(run(&mut ledger, "start", &start).unwrap()[0].duplicate);
    verify(&store).unwrap();
}

/// An auditor's tools read the store they audit and never write to it,
/// not even by opening it.
#[test]
fn the_audit_tools_leave_the_store_file_byte_for_byte_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    let before = std::fs::read(&path).unwrap();
    let db = path.to_str().unwrap();
    let job1 = job(1).to_string();
    let out = dir.path().join("log.jsonl");
    for args in [
        &["audit", "verify", "--db", db][..],
        &["replay", "--db", db, "--format", "json"][..],
        &["audit", "history", "--db", db, "--job", &job1][..],
        &["audit", "digest", "--db", db][..],
        &["export", "--db", db, "--out", out.to_str().unwrap()][..],
        &["jobs", "--db", db][..],
        &["snapshots", "--db", db, &job1][..],
    ] {
        let (code, out) = bcp(args, None);
        assert_eq!(code, 0, "{args:?}: {out}");
    }
    assert!(std::fs::read(&path).unwrap() == before, "the store changed");
    // `_admin` is the scope of every project: its listing is the whole one.
    let all = bcp(&["jobs", "--db", db], None);
    assert_eq!(bcp(&["jobs", "--db", db, "--project", "_admin"], None), all);
    assert!(all.1.lines().count() > 2, "{}", all.1);
}

#[test]
fn a_store_with_an_older_table_layout_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let old: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("jobs");
        txn.open_table(old).unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open_existing(&path).err().expect("refused");
    assert!(err.to_string().contains("older bcp"), "{err}");
}

#[test]
fn serve_refuses_a_store_whose_projection_disagrees_with_the_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    edit_job_row(&path, job(2), |v| v["version"] = json!(2)); // the log says 3
    let err = Pipeline::open(Store::open_existing(&path).unwrap())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("startup check"), "{err}");
    // bcp serve refuses before it touches NATS: a clear message, exit 1.
    let (code, out) = bcp(
        &[
            "serve",
            "--db",
            path.to_str().unwrap(),
            "--nats",
            "nats://127.0.0.1:1",
        ],
        None,
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("corrupt store: startup check") && out.contains(&job(2).to_string()),
        "{out}"
    );
}

// ---- fuzzing decode and decide --------------------------------------------------------------

/// Valid bodies for every verb, over a few known jobs, to mutate.
fn valid_body(verb: &str, j: u128, n: u64) -> serde_json::Value {
    let cid = Uuid::from_u128(0xf000_0000_0000 + n as u128);
    let t = t0() + Duration::hours((n % 5000) as i64);
    let mut b = match verb {
        "create" => {
            json!({"job_id": job(j), "deployment": {"kind": "shard", "name": "s", "cluster": "c"}, "schedule": {"snapshot_interval_hours": 12}, "region": "eu"})
        }
        "assign-region" => {
            json!({"job_id": job(j), "region": if n.is_multiple_of(2) { json!("eu") } else { json!(null) }})
        }
        "change-schedule" => {
            json!({"job_id": job(j), "schedule": {"daily_retention_days": n % 400}})
        }
        "record-snapshot" => {
            json!({"job_id": job(j), "snapshot_id": snap(n as u128 % 7), "taken_at": t, "size_bytes": n})
        }
        "delete-snapshot" => json!({"job_id": job(j), "snapshot_id": snap(n as u128 % 7)}),
        "set-snapshot-expiry" => {
            json!({"job_id": job(j), "snapshot_id": snap(n as u128 % 7), "do_not_delete": true})
        }
        "expire-snapshots" => json!({"now": t}),
        "configure-region" => {
            json!({"region": "eu", "snapshot_store": "s", "oplog_store": if n.is_multiple_of(3) { json!(null) } else { json!("o") }, "sync_store": "y"})
        }
        _ => json!({"job_id": job(j), "expected_version": n % 4}),
    };
    b["command_id"] = json!(cid);
    b
}

const VERBS: [&str; 12] = [
    "create",
    "start",
    "stop",
    "terminate",
    "assign-region",
    "change-schedule",
    "record-snapshot",
    "delete-snapshot",
    "set-snapshot-expiry",
    "expire-snapshots",
    "configure-region",
    "explode",
];

/// Extreme and wrong-typed values to splice into valid bodies.
fn extreme() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(json!(null)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1.5e308)),
        Just(json!(i64::MIN)),
        Just(json!("")),
        Just(json!("x".repeat(70_000))),
        Just(json!("\u{0}\u{202e}💥")),
        Just(json!("9999-12-31T23:59:59Z")),
        Just(json!("0000-01-01T00:00:00+14:00")),
        Just(json!([])),
        Just(json!({"nested": {"deeper": [1, 2, {"x": null}]}})),
        any::<i64>().prop_map(|i| json!(i)),
        ".{0,40}".prop_map(|s| json!(s)),
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    None,
    Remove(usize),
    Replace(usize, serde_json::Value),
    Add(String, serde_json::Value),
    Truncate(usize),
    FlipByte(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => Just(Mutation::None),
        1 => (0usize..8).prop_map(Mutation::Remove),
        1 => (0usize..8, extreme()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => ("[a-z_]{1,12}", extreme()).prop_map(|(k, v)| Mutation::Add(k, v)),
        1 => (0usize..400).prop_map(Mutation::Truncate),
        1 => (0usize..400, any::<u8>()).prop_map(|(i, b)| Mutation::FlipByte(i, b)),
    ]
}

fn mutate(body: serde_json::Value, m: &Mutation) -> Vec<u8> {
    let mut body = body;
    let keys: Vec<String> = body.as_object().unwrap().keys().cloned().collect();
    match m {
        Mutation::None => {}
        Mutation::Remove(i) => {
            body.as_object_mut().unwrap().remove(&keys[i % keys.len()]);
        }
        Mutation::Replace(i, v) => body[&keys[i % keys.len()]] = v.clone(),
        Mutation::Add(k, v) => body[k] = v.clone(),
        Mutation::Truncate(_) | Mutation::FlipByte(..) => {}
    }
    let mut bytes = serde_json::to_vec(&body).unwrap();
    match m {
        Mutation::Truncate(n) => bytes.truncate(*n % (bytes.len() + 1)),
        Mutation::FlipByte(i, b) => {
            let at = i % bytes.len();
            bytes[at] = *b;
        }
        _ => {}
    }
    bytes
}

fn fuzz_input() -> impl Strategy<Value = (String, String, Vec<u8>)> {
    let project = prop_oneof![4 => Just("p1".to_owned()), 1 => Just("_admin".to_owned()), 1 => Just("p2".to_owned()), 1 => "[ -~]{0,70}"];
    let verb = prop_oneof![8 => (0usize..VERBS.len()).prop_map(|i| VERBS[i].to_owned()), 1 => "[ -~]{0,20}"];
    let body = prop_oneof![
        6 => (0usize..VERBS.len(), 0u128..4, any::<u64>(), mutation()).prop_map(|(v, j, n, m)| mutate(valid_body(VERBS[v], j, n), &m)),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
    ];
    (project, verb, body)
}

/// One in-memory ledger shared by every case, so state builds up (jobs
/// created, started, snapshotted) and later inputs meet every state.
fn fuzz_ledger() -> &'static std::sync::Mutex<(Pipeline<()>, u128)> {
    static LEDGER: std::sync::OnceLock<std::sync::Mutex<(Pipeline<()>, u128)>> =
        std::sync::OnceLock::new();
    LEDGER.get_or_init(|| {
        let store = Store::with_backend(redb::backends::InMemoryBackend::new()).unwrap();
        std::sync::Mutex::new((Pipeline::open(store).unwrap(), 0))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any input is answered: a structured decode error, or a decision whose
    /// events (and nothing else) reach the log. `just fuzz` runs 1 M cases
    /// (PROPTEST_CASES); `cargo test` runs proptest's default 256.
    #[test]
    fn fuzz_decode_and_decide((project, verb, body) in fuzz_input()) {
        let decoded = decode(&project, &verb, &body, None);
        let Ok(cmd) = decoded else {
            prop_assert!(!decoded.unwrap_err().0.is_empty());
            return Ok(());
        };
        let mut guard = fuzz_ledger().lock().unwrap_or_else(|p| p.into_inner());
        let (ledger, next) = &mut *guard;
        let before = ledger.head_seq();
        let mut ids = || { *next += 1; Uuid::from_u128(*next) };
        let reply = ledger.execute(&[Pending::new(cmd)], t0(), &mut ids).unwrap().pop().unwrap();
        let appended = ledger.head_seq() - before;
        match (&reply.error, reply.duplicate) {
            (_, true) => prop_assert_eq!(appended, 0),
            (None, false) => prop_assert_eq!(appended, reply.events.len() as u64),
            (Some(e), false) if e.code == bcp::domain::ErrorCode::BadRequest || e.code == bcp::domain::ErrorCode::CommandIdConflict => prop_assert_eq!(appended, 0),
            (Some(_), false) => {
                prop_assert_eq!(appended, 1, "a decided rejection is one CommandRejected");
                prop_assert_eq!(reply.rejection_seq, Some(ledger.head_seq()));
            }
        }
        serde_json::to_vec(&reply).unwrap();
    }
}

#[test]
fn fuzzed_log_verifies() {
    // Whatever the fuzz cases of this run appended must still verify (runs
    // after, or concurrently with, the fuzz cases: both lock the ledger).
    let guard = fuzz_ledger().lock().unwrap_or_else(|p| p.into_inner());
    let store = guard.0.store().clone();
    verify(&store).unwrap();
    prop_assert_world(&store.load_world().unwrap(), guard.0.world());
}

fn prop_assert_world(stored: &World, memory: &World) {
    assert_eq!(stored, memory);
}

#[test]
fn history_and_replay_outputs_at_several_cut_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    scenario(&path);
    let db = path.to_str().unwrap();
    let run = |args: &[&str]| {
        let (code, out) = bcp(args, None);
        assert_eq!(code, 0, "{args:?}: {out}");
        out
    };
    let j1 = job(1).to_string();
    let j2 = job(2).to_string();
    insta::assert_snapshot!(
        "history_table_job1",
        run(&["audit", "history", "--db", db, "--job", &j1])
    );
    insta::assert_snapshot!(
        "history_table_job2",
        run(&["audit", "history", "--db", db, "--job", &j2])
    );
    // Cut by time: the scenario records one command a minute from 08:01.
    insta::assert_snapshot!(
        "replay_table_until_0805",
        run(&["replay", "--db", db, "--until", "2026-11-01T08:05:00Z"])
    );
    insta::assert_snapshot!(
        "replay_json_job2_seq9",
        run(&[
            "replay",
            "--db",
            db,
            "--until-seq",
            "9",
            "--job",
            &j2,
            "--format",
            "json"
        ])
    );
    insta::assert_snapshot!(
        "replay_table_project_p2",
        run(&["replay", "--db", db, "--project", "p2"])
    );
    // A cut by time equals the cut by the seq of the last event at or before it.
    let by_time = run(&[
        "replay",
        "--db",
        db,
        "--until",
        "2026-11-01T08:05:30Z",
        "--format",
        "json",
    ]);
    let by_seq = run(&["replay", "--db", db, "--until-seq", "5", "--format", "json"]);
    assert_eq!(by_time, by_seq);
}

#[test]
fn jobs_query_pages_and_the_cli_follows_the_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bcp.redb");
    {
        let mut ledger = Pipeline::open(Store::open_or_create(&path).unwrap()).unwrap();
        let batch: Vec<Pending> = (0..1200u128)
            .map(|i| {
                let project = if i % 3 == 0 { "p2" } else { "p1" };
                let body = json!({"command_id": Uuid::from_u128(0xc000_0000 + i), "job_id": job(i + 1), "deployment": {"kind": "replica_set", "name": format!("rs{i}")}});
                Pending::new(decode(project, "create", body.to_string().as_bytes(), None).unwrap())
            })
            .collect();
        let mut n = 0u128;
        let mut ids = || {
            n += 1;
            Uuid::from_u128(n)
        };
        assert!(
            ledger
                .execute(&batch, t0(), &mut ids)
                .unwrap()
                .iter()
                .all(|r| r.ok)
        );
    }
    let store = Store::open_existing(&path).unwrap();
    let page = |body: serde_json::Value| {
        bcp::service::queries::answer(&store, "_admin", "jobs", body.to_string().as_bytes())
    };
    let mut seen = Vec::new();
    let mut body = json!({});
    loop {
        let r = page(body.clone());
        assert_eq!(r["ok"], json!(true));
        let jobs = r["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 500, "a page holds at most 500 jobs");
        assert!(
            serde_json::to_vec(&r).unwrap().len() < 1024 * 1024,
            "a page fits NATS's max payload"
        );
        seen.extend(
            jobs.iter()
                .map(|j| j["job_id"].as_str().unwrap().to_owned()),
        );
        if r["next_after"].is_null() {
            break;
        }
        body["after"] = r["next_after"].clone();
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((seen.len(), sorted.len()), (1200, 1200), "every job once");
    assert_eq!(seen, sorted, "in job-id order");
    // Filters apply across pages; limit bounds a page.
    let r = page(json!({"project_id": "p2", "limit": 7}));
    assert_eq!(r["jobs"].as_array().unwrap().len(), 7);
    assert!(
        r["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["project_id"] == json!("p2"))
    );
    let r = page(json!({"project_id": "p2", "limit": 0}));
    assert_eq!(r["error"]["code"], json!("bad_request"), "{r}");
    drop(store);
    // The CLI follows next_after to the end.
    let (code, out) = bcp(
        &[
            "jobs",
            "--db",
            path.to_str().unwrap(),
            "--project",
            "p2",
            "--format",
            "json",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}");
    let jobs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 400);
}

/// What the commit thread hands the relay: every event of the batch, in
/// seq order, each with the route the relay would read from its stored
/// bytes (region events, job events, a rejection), so publishing from
/// memory and from redb go to the same subjects with the same ids.
#[test]
fn a_committed_batch_hands_the_relay_each_event_with_its_route() {
    use bcp::domain::envelope::Routing;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
    let mut p: Pipeline<()> = Pipeline::new(Pipeline::open(store.clone()).unwrap().into_ledger());
    let mut next = 100u128;
    let mut ids = || {
        next += 1;
        Uuid::from_u128(next)
    };
    let cmd = |project: &str, verb: &str, body: serde_json::Value| {
        Pending::new(decode(project, verb, body.to_string().as_bytes(), None).unwrap())
    };
    let batch = [
        cmd(
            "_admin",
            "configure-region",
            json!({"command_id": Uuid::from_u128(1), "region": "eu", "snapshot_store": "s3-eu", "oplog_store": "ol-eu", "sync_store": "sync-eu"}),
        ),
        cmd(
            "p1",
            "create",
            json!({"command_id": Uuid::from_u128(2), "job_id": job(1), "deployment": {"kind": "replica_set", "name": "rs"}, "region": "eu"}),
        ),
        cmd(
            "p1",
            "stop",
            json!({"command_id": Uuid::from_u128(3), "job_id": job(1)}),
        ),
        cmd(
            "p1",
            "start",
            json!({"command_id": Uuid::from_u128(4), "job_id": job(1)}),
        ),
    ];
    for c in &batch {
        assert!(p.decide(c, (), t0(), &mut ids).is_empty());
    }
    let mut prepared = p.to_commit().expect("a batch was decided");
    let result = store.commit(&mut prepared);
    assert!(p.settle(result).error.is_none());
    let events = prepared.into_events();
    let seqs: Vec<u64> = events.iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=p.head_seq()).collect::<Vec<_>>(),
        "every event, in order"
    );
    let mut subjects = Vec::new();
    for (seq, bytes, route) in &events {
        assert_eq!(&Routing::parse(bytes).unwrap().route(), route, "seq {seq}");
        assert_eq!(
            store.raw_events(*seq, *seq).unwrap(),
            [(*seq, bytes.clone())]
        );
        subjects.push(route.subject.clone());
    }
    let job = job(1);
    assert_eq!(
        subjects,
        [
            "bcp.evt._admin.eu.RegionConfigured".to_owned(),
            format!("bcp.evt.p1.{job}.JobCreated"),
            format!("bcp.evt.p1.{job}.CommandRejected"),
            format!("bcp.evt.p1.{job}.JobStarted"),
        ]
    );
}

/// Usage errors exit 2 before anything is sent or read: a `--project` that
/// is no project id, `--db` beside `--from-nats`. `BCP_DB` in the
/// environment (the `--db` tools' default) does not stand in the way of
/// `--from-nats`: that replay goes to NATS (here: none, exit 3).
#[test]
fn bad_projects_and_two_log_sources_are_usage_errors() {
    let job = "0192f0c4-0000-7000-8000-0000000000aa";
    for args in [
        &["send", "start", "--project", "", "--job", job][..],
        &["send", "start", "--project", "de mo", "--job", job][..],
        &["jobs", "--project", "a b", "--db", "/nonexistent"][..],
        &["replay", "--project", "_x", "--db", "/nonexistent"][..],
        &["history", job, "--project", "a.b"][..],
    ] {
        let (code, out) = bcp(args, None);
        assert_eq!(code, 2, "bcp {args:?}: {out}");
        assert!(out.contains("--project"), "bcp {args:?}: {out}");
    }
    let (code, out) = bcp(&["jobs", "--state", "bogus", "--db", "/nonexistent"], None);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--state"), "{out}");
    // A state in any case is one (here the store is missing: not a usage error).
    let (code, out) = bcp(&["jobs", "--state", "active", "--db", "/nonexistent"], None);
    assert_ne!(code, 2, "{out}");
    let (code, out) = bcp(
        &[
            "replay",
            "--db",
            "/nonexistent",
            "--from-nats",
            "nats://127.0.0.1:1",
        ],
        None,
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not both"), "{out}");
    let out = Command::new(env!("CARGO_BIN_EXE_bcp"))
        .args(["replay", "--from-nats", "nats://127.0.0.1:1"])
        .env("BCP_DB", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("cannot connect to NATS"), "{err}");
}

/// What the read tools answer from the store at `path` (every job's
/// events, catalog and view, the whole log), or the error or panic that
/// stopped them.
fn everything_read(path: &Path, jobs: &[Uuid]) -> Result<String, String> {
    std::panic::catch_unwind(|| -> Result<String, String> {
        let store = Store::open_read_only(path, 0).map_err(|e| e.to_string())?;
        let mut out = format!("{:?}", store.load_world().map_err(|e| e.to_string())?);
        for &j in jobs {
            let events = store.job_events(j).map_err(|e| e.to_string())?;
            out += &format!(
                "{events:?}{:?}",
                store.catalog(j).map_err(|e| e.to_string())?
            );
        }
        store
            .for_each_event(|seq, bytes| {
                out += &format!("{seq}{bytes:?}");
                Ok(true)
            })
            .map_err(|e| e.to_string())?;
        Ok(out)
    })
    .map_err(|_| "panicked".to_owned())?
}

/// A byte flipped in a stopped store: `audit verify`'s first step, redb's
/// page check, refuses the store, or the flip was in a byte the store does
/// not use, and then verify passes and every read answers as the
/// original's does. Verify itself never crashes on it. Without the page
/// check, a flipped key in a branch page passed verify while lookups by
/// seq missed events that are there, and other flips crashed verify inside
/// redb (a review flipped every used byte of such a store).
#[test]
fn verify_finds_damaged_pages_and_passes_only_what_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    let jobs = [job(1), job(2)];
    {
        let mut s = Script::new(&db);
        started_job(&mut s, jobs[0], json!({}));
        started_job(&mut s, jobs[1], json!({}));
        let start = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
        for i in 0..8u128 {
            let taken = start + Duration::hours(6 * i as i64);
            let body = json!({"job_id": jobs[(i % 2) as usize], "snapshot_id": snap(i), "taken_at": taken, "size_bytes": 42});
            assert!(s.send_at(taken, "p1", "record-snapshot", body).ok);
        }
    }
    let original = std::fs::read(&db).unwrap();
    let want = everything_read(&db, &jobs).unwrap();
    {
        // The check reads as any reader does, beside others.
        let _reader = Store::open_read_only(&db, 0).unwrap();
        let (code, out) = bcp(&["audit", "verify", "--db", db.to_str().unwrap()], None);
        assert_eq!(code, 0, "verify beside another reader: {out}");
    }
    let copy = dir.path().join("flipped.redb");
    let (mut caught, mut passed) = (0, 0);
    // The bytes the store uses: not zero (most of a small store's file is
    // room redb set aside, zeros nothing reads).
    let used: Vec<usize> = (0..original.len()).filter(|&i| original[i] != 0).collect();
    // A sample (every used byte takes minutes in a debug build): a review
    // found about one flip in a hundred that crashed or fooled verify.
    for &at in used.iter().step_by(41) {
        let mut bytes = original.clone();
        bytes[at] ^= 0x41;
        std::fs::write(&copy, &bytes).unwrap();
        // Refused as damaged, or not even openable (a flip in the header).
        let Ok(Ok(())) = bcp::store::disk::check_pages(&copy) else {
            caught += 1;
            continue;
        };
        let verified = std::panic::catch_unwind(|| {
            let store = Store::open_read_only(&copy, 0).map_err(|e| e.to_string())?;
            verify_with(&store, None, |_| {}).map_err(|e| e.to_string())
        });
        match verified {
            Err(_) => panic!("verify panicked on a flip at byte {at}"),
            Ok(Err(_)) => caught += 1,
            Ok(Ok(_)) => {
                passed += 1;
                assert_eq!(
                    everything_read(&copy, &jobs),
                    Ok(want.clone()),
                    "a flip at byte {at} passed"
                );
            }
        }
        assert!(
            std::fs::read(&copy).unwrap() == bytes,
            "the check wrote to the store"
        );
    }
    assert!(caught > 0 && passed > 0, "caught {caught}, passed {passed}");
    // The CLI says so, and exits 1.
    let mut bytes = original.clone();
    let (code, out) = used
        .iter()
        .find_map(|&at| {
            bytes.clone_from(&original);
            bytes[at] ^= 0x41;
            std::fs::write(&copy, &bytes).unwrap();
            matches!(bcp::store::disk::check_pages(&copy), Ok(Err(_)))
                .then(|| bcp(&["audit", "verify", "--db", copy.to_str().unwrap()], None))
        })
        .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: the store's file is damaged"), "{out}");
    // The other tools trust the pages they read, and may crash on damage;
    // then they say to run verify.
    let panicked = used
        .iter()
        .step_by(97)
        .filter(|&&at| {
            bytes.clone_from(&original);
            bytes[at] ^= 0x41;
            std::fs::write(&copy, &bytes).unwrap();
            let (code, out) = bcp(&["jobs", "--db", copy.to_str().unwrap()], None);
            assert!([0, 1, 101].contains(&code), "{code}: {out}");
            code == 101 && {
                assert!(
                    out.contains("check a store with `bcp audit verify --db PATH`"),
                    "{out}"
                );
                true
            }
        })
        .count();
    assert!(
        panicked > 0,
        "no flip crashed bcp jobs: the hint went untested"
    );
}

/// A log cut inside a command (a file cut at a line: a terminate without
/// its purge, a region configured without its jobs reconfigured) is
/// refused by import, naming the event whose command is incomplete, and
/// nothing is written; the whole log imports.
#[test]
fn a_log_cut_inside_a_command_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    {
        let mut ledger = Pipeline::open(Store::open_or_create(&db).unwrap()).unwrap();
        let mut ids = {
            let mut n = 0u128;
            move || {
                n += 1;
                Uuid::from_u128(0xe000 + n)
            }
        };
        let admin = |n: u128, body: serde_json::Value| {
            let mut body = body;
            body["command_id"] = json!(Uuid::from_u128(n));
            Pending::new(
                decode(
                    "_admin",
                    "configure-region",
                    body.to_string().as_bytes(),
                    None,
                )
                .unwrap(),
            )
        };
        let commands = [
            admin(
                1,
                json!({"region": "eu", "snapshot_store": "s", "oplog_store": "o"}),
            ),
            job1_command(
                2,
                "create",
                json!({"deployment": {"kind": "replica_set", "name": "rs0"}}),
            ),
            job1_command(3, "assign-region", json!({"region": "eu"})),
            job1_command(4, "start", json!({})),
            // The region complete: job 1 reconfigured in the same command.
            admin(5, json!({"region": "eu", "sync_store": "y"})),
            job1_command(
                6,
                "record-snapshot",
                json!({"snapshot_id": Uuid::from_u128(60), "taken_at": "2026-11-01T07:00:00Z", "size_bytes": 1}),
            ),
            job1_command(7, "stop", json!({})),
            // A terminate purges the catalog in the same command.
            job1_command(8, "terminate", json!({})),
        ];
        for (i, c) in commands.into_iter().enumerate() {
            let now = t0() + chrono::Duration::minutes(i as i64);
            let reply = ledger.execute(&[c], now, &mut ids).unwrap().pop().unwrap();
            assert!(
                reply.ok && !reply.events.is_empty(),
                "command {}: {reply:?}",
                i + 1
            );
        }
    }
    let (code, exported) = bcp(&["export", "--db", db.to_str().unwrap()], None);
    assert_eq!(code, 0, "{exported}");
    let lines: Vec<&str> = exported.lines().filter(|l| l.starts_with('{')).collect();
    let types: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let at = |t: &str| types.iter().position(|x| x == t).unwrap();
    let (reconfigured, purged) = (at("JobReconfigured"), at("SnapshotsPurged"));
    assert_eq!(types[reconfigured - 1], "RegionConfigured", "{types:?}");
    assert_eq!(types[purged - 1], "JobTerminated", "{types:?}");
    assert_eq!(purged, lines.len() - 1, "{types:?}");
    // Cut before the event that completes the command: the seq named is
    // the one before it (seqs count from 1), where the command stops.
    for (cut, what) in [
        (
            purged,
            format!(
                "job {} is terminated and its 1 snapshots were not purged",
                job(1)
            ),
        ),
        (
            reconfigured,
            format!(
                "job {} is left Misconfigured in region eu, which has every store",
                job(1)
            ),
        ),
    ] {
        let named = cut;
        let target = dir.path().join(format!("cut-{cut}.redb"));
        let prefix = lines[..cut].join("\n") + "\n";
        let (code, out) = bcp(
            &["import", "--db", target.to_str().unwrap(), "-"],
            Some(prefix.as_bytes()),
        );
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!("seq {named}: the events of its command")),
            "{out}"
        );
        assert!(out.contains(&what), "{out}");
        assert!(!target.exists(), "nothing written");
    }
    // `audit verify` of a store cut there (as a group node drops a tail
    // the stream never acknowledged) says the same.
    Store::open_or_create(&db)
        .unwrap()
        .truncate_to(purged as u64)
        .unwrap();
    let (code, out) = bcp(&["audit", "verify", "--db", db.to_str().unwrap()], None);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("seq {purged}: the events of its command")),
        "{out}"
    );
    let whole = dir.path().join("whole.redb");
    let (code, out) = bcp(
        &["import", "--db", whole.to_str().unwrap(), "-"],
        Some((lines.join("\n") + "\n").as_bytes()),
    );
    assert_eq!(code, 0, "{out}");
}

/// A store damaged under its pages' checks (a byte of an event changed in
/// the file) is not exported as a log that looks whole: export stops at
/// the event whose hash no longer matches, exit 1, and removes `--out`.
#[test]
fn export_of_a_damaged_store_stops_at_the_damaged_event() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    few_hundred_events(&db);
    let mut file = std::fs::read(&db).unwrap();
    let needle = b"\"type\":\"JobStopped\"";
    let at = file
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("a JobStopped in the file");
    file[at + needle.len() - 2] ^= 0x20; // JobStopped -> JobStoppeD
    std::fs::write(&db, &file).unwrap();
    let out = dir.path().join("log.jsonl");
    let (code, text) = bcp(
        &[
            "export",
            "--db",
            db.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("'s hash does not match its bytes and the event before it"),
        "{text}"
    );
    assert!(!out.exists(), "no file that looks like a whole log");
}

/// Logs forged and chained again (every hash recomputed, so the chain
/// holds): what no single event's hash shows is still refused by import,
/// naming the seq. An event id used twice (JetStream would drop the second
/// event as a duplicate), a time earlier than the event before, a schema
/// version this bcp does not read.
#[test]
fn rechained_forgeries_are_refused_naming_the_seq() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    let events = few_hundred_events(&db);
    let (code, exported) = bcp(&["export", "--db", db.to_str().unwrap()], None);
    assert_eq!(code, 0, "{exported}");
    let log: Vec<Envelope> = exported
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len() as u64, events);
    let forge = |at: usize, edit: &dyn Fn(&mut Envelope, &Envelope)| -> String {
        let mut prev = bcp::domain::envelope::GENESIS_HASH.to_owned();
        let mut out = String::new();
        for (i, env) in log.iter().enumerate() {
            let mut env = env.clone();
            if i == at {
                edit(&mut env, &log[i - 1]);
            }
            let bytes = env.seal_to_json(&prev);
            prev = env.hash.clone();
            out += std::str::from_utf8(&bytes).unwrap();
            out += "\n";
        }
        out
    };
    type Edit<'a> = &'a dyn Fn(&mut Envelope, &Envelope);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "an event id twice",
            &|e, before| e.event_id = before.event_id,
            "is an earlier event's",
        ),
        (
            "time going back",
            &|e, before| e.recorded_at = before.recorded_at - chrono::Duration::seconds(1),
            "is earlier than the event before it",
        ),
        (
            "a later schema",
            &|e, _| e.schema_version = 99,
            "schema_version 99 is not one this bcp reads",
        ),
    ];
    // The unforged log, chained again, imports: the forging is faithful.
    let same = forge(usize::MAX, &|_, _| {});
    let target = dir.path().join("same.redb");
    let (code, out) = bcp(
        &["import", "--db", target.to_str().unwrap(), "-"],
        Some(same.as_bytes()),
    );
    assert_eq!(code, 0, "{out}");
    for (name, edit, why) in cases {
        let target = dir.path().join(format!("{}.redb", name.replace(' ', "-")));
        let (code, out) = bcp(
            &["import", "--db", target.to_str().unwrap(), "-"],
            Some(forge(100, edit).as_bytes()),
        );
        assert_eq!(code, 1, "{name}: {out}");
        assert!(
            out.contains("seq 101: ") && out.contains(why),
            "{name}: {out}"
        );
        assert!(!target.exists(), "{name}: a store was written");
    }
}

/// A file that is not a log, one line of more than 64 MiB, is refused at
/// that line, not held in memory whole first; nothing is written.
#[test]
fn import_refuses_a_line_longer_than_any_event() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("huge.redb");
    let huge = vec![b'x'; (64 << 20) + 10];
    let (code, out) = bcp(
        &["import", "--db", target.to_str().unwrap(), "-"],
        Some(&huge),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("line 1 is longer than 64 MiB: not an event"),
        "{out}"
    );
    assert!(!target.exists());
}

/// A store file cut short is called damaged by the tools that read it,
/// not "not closed cleanly" (which would send its owner to run bcp serve on
/// it); verify names the damage too.
#[test]
fn a_store_file_cut_short_is_called_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bcp.redb");
    few_hundred_events(&db);
    let len = std::fs::metadata(&db).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);
    let db = db.to_str().unwrap();
    for args in [
        vec!["replay", "--db", db],
        vec!["export", "--db", db],
        vec!["audit", "history", "--db", db, "--job", &job(1).to_string()],
    ] {
        let (code, out) = bcp(&args, None);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(out.contains("is damaged"), "{args:?}: {out}");
        assert!(!out.contains("not closed cleanly"), "{args:?}: {out}");
    }
    let (code, out) = bcp(&["audit", "verify", "--db", db], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("damaged"), "{out}");
}

/// A directory given as `--db` is named as such by every tool, and import
/// says so before it reads its input; an export that cannot write its file
/// (a full disk: /dev/full) fails and leaves no file that looks like a log,
/// and never removes a device given as `--out`.
#[test]
fn a_directory_as_the_store_and_a_full_disk_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for args in [
        vec!["replay", "--db", d],
        vec!["export", "--db", d],
        vec!["audit", "verify", "--db", d],
        vec!["import", "--db", d, "-"],
    ] {
        let (code, out) = bcp(&args, Some(b"not read"));
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(
            out.contains(&format!("{d} is a directory; give the store's file")),
            "{args:?}: {out}"
        );
    }
    let db = dir.path().join("bcp.redb");
    few_hundred_events(&db);
    let (code, out) = bcp(
        &["export", "--db", db.to_str().unwrap(), "--out", "/dev/full"],
        None,
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("writing the log to /dev/full; nothing kept"),
        "{out}"
    );
    assert!(Path::new("/dev/full").exists(), "a device is never removed");
}
