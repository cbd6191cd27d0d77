//! The NATS contract (DESIGN.md §3) end to end: a real nats-server with
//! JetStream and a real `bcp serve` process per test, driven by an async-nats
//! producer. Covers command replies and rejections, idempotent retries, bad
//! input, the published stream, NATS outages and restarts, a lost NATS
//! store, fire-and-forget commands and the `bcp send` exit codes; the
//! snapshot verbs and catalog, the retention sweeper of a running server,
//! `bcp snapshots`, and auditing from the stream (`replay --from-nats`,
//! `import --from-nats`, `audit verify --against-nats`). Scenarios that
//! stop `bcp serve` end with `bcp audit verify` on the stopped store.

mod support;

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, SubsecRound, Utc};
use futures::future::join_all;
use serde_json::{Value, json};
use support::procs::http_get;
use support::{Harness, Nats, bcp_cli, free_port};
use uuid::Uuid;

fn id() -> Uuid {
    Uuid::now_v7()
}

fn create_body(command_id: Uuid, job_id: Uuid, name: &str) -> Value {
    json!({
        "command_id": command_id,
        "job_id": job_id,
        "deployment": {"kind": "replica_set", "name": name},
    })
}

fn job_body(command_id: Uuid, job_id: Uuid) -> Value {
    json!({"command_id": command_id, "job_id": job_id})
}

/// The exact reply of an accepted command.
fn accepted(job_id: Option<Uuid>, version: Option<u64>, events: &[(u64, &str)]) -> Value {
    let mut r = json!({
        "ok": true,
        "events": events.iter().map(|(seq, ty)| json!({"seq": seq, "type": ty})).collect::<Vec<_>>(),
        "duplicate": false,
    });
    if let Some(j) = job_id {
        r["job_id"] = json!(j);
    }
    if let Some(v) = version {
        r["version"] = json!(v);
    }
    r
}

/// `reply` with `duplicate: true`, as a retry must answer.
fn as_duplicate(reply: &Value) -> Value {
    let mut r = reply.clone();
    r["duplicate"] = json!(true);
    r
}

/// Asserts a command's rejection: `ok:false`, the code, a message, the
/// recorded `rejection_seq` (or none), not a duplicate, and no other
/// fields than the contract's. Returns the message.
fn rejected(reply: &Value, code: &str, rejection_seq: Option<u64>) -> String {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
    assert_eq!(reply["duplicate"], json!(false), "{reply}");
    assert!(reply.get("as_of_seq").is_none(), "{reply}");
    assert_eq!(
        reply.get("rejection_seq").cloned(),
        rejection_seq.map(|s| json!(s)),
        "rejection_seq of {reply}"
    );
    assert!(reply.get("events").is_none(), "{reply}");
    assert!(reply.get("version").is_none(), "{reply}");
    let message = reply["error"]["message"].as_str().expect("message");
    assert!(!message.is_empty(), "{reply}");
    message.to_owned()
}

/// Asserts a query's error: `ok:false`, the code, a message, how far the
/// store had applied the log (when `read`: the store was read), and no
/// other fields. Returns the message.
fn query_refused(reply: &Value, code: &str, read: bool) -> String {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
    let mut keys: Vec<&str> = reply
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    let contract: &[&str] = if read {
        &["as_of_seq", "error", "ok"]
    } else {
        &["error", "ok"]
    };
    assert_eq!(keys, contract, "{reply}");
    assert_eq!(reply["as_of_seq"].is_u64(), read, "{reply}");
    let message = reply["error"]["message"].as_str().expect("message");
    assert!(!message.is_empty(), "{reply}");
    message.to_owned()
}

/// Lifecycle over NATS: every reply exactly, the job VIEW after each step,
/// the Bcp-Actor header, list filters, and a history with from/to per
/// transition.
#[tokio::test]
async fn lifecycle_over_nats() {
    let mut h = Harness::start().await;
    let job = id();
    // (verb, event, state after, phase after)
    let steps = [
        ("create", "JobCreated", "Inactive", Value::Null),
        ("start", "JobStarted", "Active", json!("initial_sync")),
        ("stop", "JobStopped", "Stopped", Value::Null),
        // No snapshot was recorded, so the initial sync never finished: a
        // restart begins a new initial sync (DOMAIN.md restart rule).
        ("start", "JobStarted", "Active", json!("initial_sync")),
        ("stop", "JobStopped", "Stopped", Value::Null),
        ("terminate", "JobTerminated", "Inactive", Value::Null),
    ];
    // What the history must say, built from the replies:
    // (seq, type, command_id, actor, from, to).
    let mut expected_history = Vec::new();
    let (mut seq, mut state_before) = (0u64, Value::Null);
    for (i, (verb, event, state, phase)) in steps.iter().enumerate() {
        let cid = id();
        let reply = if *verb == "create" {
            // The actor from the Bcp-Actor header when the body has none.
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Bcp-Actor", "ops-bot");
            let body = create_body(cid, job, "rs0");
            let msg = h
                .client
                .request_with_headers(
                    "bcp.cmd.p1.create",
                    headers,
                    serde_json::to_vec(&body).unwrap().into(),
                )
                .await
                .expect("create reply");
            serde_json::from_slice::<Value>(&msg.payload).unwrap()
        } else {
            let mut body = job_body(cid, job);
            body["expected_version"] = json!(seq);
            body["actor"] = json!("alice");
            h.cmd("p1", verb, &body).await
        };
        let mut events = vec![(seq + 1, *event)];
        // Terminate deletes the job's snapshots at once; bcp may record that
        // as a SnapshotsPurged (empty here) right after JobTerminated.
        if *verb == "terminate" && reply["events"].as_array().map_or(0, Vec::len) == 2 {
            events.push((seq + 2, "SnapshotsPurged"));
        }
        seq += events.len() as u64;
        assert_eq!(
            reply,
            accepted(Some(job), Some(seq), &events),
            "reply to {verb} (step {i})"
        );
        let actor = if *verb == "create" {
            "ops-bot"
        } else {
            "alice"
        };
        for (k, (s, ty)) in events.iter().enumerate() {
            let from = if k == 0 {
                state_before.clone()
            } else {
                json!(state)
            };
            expected_history.push((*s, *ty, cid, actor, from, json!(state)));
        }
        state_before = json!(state);

        let view = h.job(job).await;
        assert_eq!(view["job_id"], json!(job));
        assert_eq!(view["project_id"], json!("p1"));
        assert_eq!(
            view["deployment"],
            json!({"kind": "replica_set", "name": "rs0"})
        );
        assert_eq!(view["region"], Value::Null);
        assert_eq!(view["state"], json!(state), "state after {verb}");
        assert_eq!(view["phase"], *phase, "phase after {verb}");
        assert_eq!(view["version"], json!(seq), "version after {verb}");
        assert_eq!(view["snapshot_count"], json!(0));
        assert!(view["last_transition_at"].is_string(), "{view}");
        assert_eq!(view["schedule"]["snapshot_interval_hours"], json!(24));
    }

    let listed = |r: Value| -> Vec<Value> {
        assert_eq!(r["ok"], json!(true), "{r}");
        r["jobs"].as_array().unwrap().clone()
    };
    let inactive = listed(
        h.query("jobs", &json!({"project_id": "p1", "state": "Inactive"}))
            .await,
    );
    assert_eq!(inactive.len(), 1);
    assert_eq!(inactive[0]["job_id"], json!(job));
    let active = listed(h.query("jobs", &json!({"state": "Active"})).await);
    assert!(active.is_empty(), "{active:?}");
    let other = listed(h.query("jobs", &json!({"project_id": "p2"})).await);
    assert!(other.is_empty(), "{other:?}");

    // One entry per event; the transitions carry from and to.
    let history = h.history(job).await;
    assert_eq!(history.len(), expected_history.len(), "{history:?}");
    for (e, (seq, ty, cid, actor, from, to)) in history.iter().zip(&expected_history) {
        assert_eq!(e["seq"], json!(seq), "{e}");
        assert_eq!(e["version"], json!(seq), "{e}");
        assert_eq!(e["type"], json!(ty), "{e}");
        assert_eq!(e["from"], *from, "{e}");
        assert_eq!(e["to"], *to, "{e}");
        assert_eq!(e["rejected"], json!(false), "{e}");
        assert_eq!(e["command_id"], json!(cid), "{e}");
        assert_eq!(e["actor"], json!(actor), "{e}");
        assert!(e["recorded_at"].is_string(), "{e}");
    }
    let transitions: Vec<_> = history
        .iter()
        .filter(|e| e["from"] != e["to"])
        .map(|e| (e["from"].clone(), e["to"].clone()))
        .collect();
    assert_eq!(
        transitions,
        [
            (Value::Null, json!("Inactive")),
            (json!("Inactive"), json!("Active")),
            (json!("Active"), json!("Stopped")),
            (json!("Stopped"), json!("Active")),
            (json!("Active"), json!("Stopped")),
            (json!("Stopped"), json!("Inactive")),
        ]
    );
    let unknown = h.query("history", &json!({"job_id": id()})).await;
    query_refused(&unknown, "not_found", true);

    h.caught_up_stream(seq).await;
    h.stop_and_verify(seq).await;
}

/// Retries: the same command gets its first reply (`duplicate:true`) and
/// appends nothing, forever, also when sent concurrently; the same id with
/// another body is `command_id_conflict`; a retried rejection is the same
/// rejection.
#[tokio::test]
async fn idempotent_retry() {
    let mut h = Harness::start().await;
    let job = id();
    let create_id = id();
    let create = create_body(create_id, job, "rs0");
    let first = h.cmd("p1", "create", &create).await;
    assert_eq!(first, accepted(Some(job), Some(1), &[(1, "JobCreated")]));
    let retry = h.cmd("p1", "create", &create).await;
    assert_eq!(retry, as_duplicate(&first));
    // The actor is not part of what a command asks: still the same command.
    let mut with_actor = create.clone();
    with_actor["actor"] = json!("someone-else");
    assert_eq!(
        h.cmd("p1", "create", &with_actor).await,
        as_duplicate(&first)
    );

    // Same id, another body: refused, and not recorded.
    let conflict = h
        .cmd("p1", "create", &create_body(create_id, job, "rs1"))
        .await;
    let message = rejected(&conflict, "command_id_conflict", None);
    assert!(message.contains(&create_id.to_string()), "{message}");
    let conflict = h.cmd("p1", "start", &job_body(create_id, job)).await;
    rejected(&conflict, "command_id_conflict", None);

    let start = job_body(id(), job);
    let started = h.cmd("p1", "start", &start).await;
    assert_eq!(started, accepted(Some(job), Some(2), &[(2, "JobStarted")]));

    // A rejection is recorded once; its retry is the same rejection.
    let again = job_body(id(), job);
    let refused = h.cmd("p1", "start", &again).await;
    rejected(&refused, "invalid_transition", Some(3));
    assert_eq!(refused["job_id"], json!(job));
    assert_eq!(h.cmd("p1", "start", &again).await, as_duplicate(&refused));

    // The first reply stays the reply, after the job moved on.
    assert_eq!(h.cmd("p1", "create", &create).await, as_duplicate(&first));
    assert_eq!(h.cmd("p1", "start", &start).await, as_duplicate(&started));

    // The same new command five times at once: decided once.
    let job2 = id();
    let create2 = create_body(id(), job2, "rs2");
    let replies = join_all((0..5).map(|_| h.cmd("p2", "create", &create2))).await;
    let original = accepted(Some(job2), Some(1), &[(4, "JobCreated")]);
    let fresh = replies.iter().filter(|r| r["duplicate"] == json!(false));
    assert_eq!(fresh.count(), 1, "{replies:?}");
    for r in &replies {
        let mut r = r.clone();
        r["duplicate"] = json!(false);
        assert_eq!(r, original);
    }

    // Nothing was appended by any retry or conflict: the next event is seq 5.
    let stop = h.cmd("p1", "stop", &job_body(id(), job)).await;
    assert_eq!(stop, accepted(Some(job), Some(3), &[(5, "JobStopped")]));
    let events = h.caught_up_stream(5).await;
    let types: Vec<_> = events.iter().map(|e| e["type"].clone()).collect();
    assert_eq!(
        types,
        [
            "JobCreated",
            "JobStarted",
            "CommandRejected",
            "JobCreated",
            "JobStopped"
        ]
    );
    assert_eq!(events[2]["command_id"], again["command_id"]);
    assert_eq!(events[2]["job_version"], Value::Null);
    assert_eq!(events[2]["data"]["code"], json!("invalid_transition"));
    h.stop_and_verify(5).await;
}

/// Input that cannot be decoded is `bad_request`, with a reason, and
/// appends nothing; rejections decided against state are recorded with a
/// `rejection_seq` and change no job.
#[tokio::test]
async fn bad_input_and_rejections() {
    let mut h = Harness::start().await;
    let job = id();
    let other = id();
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    let r = h
        .cmd("p2", "create", &create_body(id(), other, "rs-other"))
        .await;
    assert_eq!(r, accepted(Some(other), Some(1), &[(3, "JobCreated")]));
    let head = 3;
    let view_before = h.job(job).await;
    let other_before = h.job(other).await;
    h.caught_up_stream(head).await;

    let cid = || id().to_string();
    let j = job.to_string();
    let obj = |v: Value| serde_json::to_vec(&v).unwrap();
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "not JSON",
            "bcp.cmd.p1.start".into(),
            b"not json".to_vec(),
            "invalid start body",
        ),
        (
            "a JSON array",
            "bcp.cmd.p1.start".into(),
            b"[]".to_vec(),
            "invalid start body",
        ),
        (
            "empty body",
            "bcp.cmd.p1.stop".into(),
            Vec::new(),
            "invalid stop body",
        ),
        (
            "unknown field",
            "bcp.cmd.p1.start".into(),
            obj(json!({"command_id": cid(), "job_id": j, "colour": "red"})),
            "unknown field `colour`",
        ),
        (
            "wrong type",
            "bcp.cmd.p1.start".into(),
            obj(json!({"command_id": cid(), "job_id": j, "expected_version": "two"})),
            "expected_version",
        ),
        (
            "negative version",
            "bcp.cmd.p1.stop".into(),
            obj(json!({"command_id": cid(), "job_id": j, "expected_version": -1})),
            "expected_version",
        ),
        (
            "missing command_id",
            "bcp.cmd.p1.start".into(),
            obj(json!({"job_id": j})),
            "missing field `command_id`",
        ),
        (
            "malformed job_id",
            "bcp.cmd.p1.start".into(),
            obj(json!({"command_id": cid(), "job_id": "not-a-uuid"})),
            "job_id",
        ),
        (
            "malformed command_id",
            "bcp.cmd.p1.start".into(),
            obj(json!({"command_id": "0192f0c4-zzzz", "job_id": j})),
            "command_id",
        ),
        (
            "body over 64 KiB",
            "bcp.cmd.p1.start".into(),
            obj(json!({"command_id": cid(), "job_id": j, "actor": "a".repeat(70_000)})),
            "limit is 65536",
        ),
        (
            "actor too long",
            "bcp.cmd.p1.stop".into(),
            obj(json!({"command_id": cid(), "job_id": j, "actor": "a".repeat(300)})),
            "actor",
        ),
        (
            "unknown verb",
            "bcp.cmd.p1.fly".into(),
            obj(json!({"command_id": cid(), "job_id": j})),
            "unknown verb \"fly\"",
        ),
        (
            "subject with an extra token",
            "bcp.cmd.p1.start.now".into(),
            obj(json!({"command_id": cid(), "job_id": j})),
            "is not bcp.cmd.<project>.<verb>",
        ),
        (
            "reserved project",
            "bcp.cmd._x.start".into(),
            obj(json!({"command_id": cid(), "job_id": j})),
            "reserved",
        ),
        (
            "job command on _admin",
            "bcp.cmd._admin.start".into(),
            obj(json!({"command_id": cid(), "job_id": j})),
            "job command",
        ),
        (
            "configure-region outside _admin",
            "bcp.cmd.p1.configure-region".into(),
            obj(json!({"command_id": cid(), "region": "eu"})),
            "_admin",
        ),
        (
            "create without deployment",
            "bcp.cmd.p1.create".into(),
            obj(json!({"command_id": cid(), "job_id": cid()})),
            "missing field `deployment`",
        ),
        (
            "schedule value not allowed",
            "bcp.cmd.p1.create".into(),
            obj(json!({
                "command_id": cid(), "job_id": cid(),
                "deployment": {"kind": "replica_set", "name": "rs9"},
                "schedule": {"snapshot_interval_hours": 5},
            })),
            "6, 8, 12, 24",
        ),
        (
            "shard without cluster",
            "bcp.cmd.p1.create".into(),
            obj(json!({
                "command_id": cid(), "job_id": cid(),
                "deployment": {"kind": "shard", "name": "s0"},
            })),
            "cluster is required",
        ),
        (
            "unknown deployment kind",
            "bcp.cmd.p1.create".into(),
            obj(json!({
                "command_id": cid(), "job_id": cid(),
                "deployment": {"kind": "standalone", "name": "x"},
            })),
            "deployment.kind",
        ),
        (
            "assign-region without region",
            "bcp.cmd.p1.assign-region".into(),
            obj(json!({"command_id": cid(), "job_id": j})),
            "missing field `region`",
        ),
        (
            "a schedule value no job may have, for an unknown job",
            "bcp.cmd.p1.change-schedule".into(),
            obj(
                json!({"command_id": cid(), "job_id": cid(), "schedule": {"snapshot_interval_hours": 7}}),
            ),
            "6, 8, 12, 24",
        ),
        // serde would read these as the fields in declaration order.
        (
            "a body as an array of its fields",
            "bcp.cmd.p1.start".into(),
            obj(json!([cid(), j])),
            "a JSON array; a body is a JSON object",
        ),
        (
            "a deployment as an array",
            "bcp.cmd.p1.create".into(),
            obj(json!({
                "command_id": cid(), "job_id": cid(),
                "deployment": ["replica_set", "rs-arr"],
            })),
            "field deployment: an array",
        ),
        (
            "a schedule as an array",
            "bcp.cmd.p1.change-schedule".into(),
            obj(json!({"command_id": cid(), "job_id": j, "schedule": [6, 5]})),
            "field schedule: an array",
        ),
        (
            "a query as an array",
            "bcp.query.p1.jobs".into(),
            obj(json!([null, "Active"])),
            "a JSON array",
        ),
    ];
    for (what, subject, body, needle) in cases {
        let reply = h.request_bytes(&subject, body).await;
        let message = if subject.starts_with("bcp.query.") {
            query_refused(&reply, "bad_request", true)
        } else {
            let message = rejected(&reply, "bad_request", None);
            let mut keys: Vec<_> = reply.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            assert_eq!(keys, ["duplicate", "error", "ok"], "{what}: {reply}");
            message
        };
        assert!(
            message.contains(needle),
            "{what}: message {message:?} lacks {needle:?}"
        );
    }
    // A query body that cannot be decoded is a bad_request too; a kind no
    // endpoint serves is refused before any store is read.
    let r = h.query("job", &json!({"job": j})).await;
    query_refused(&r, "bad_request", true);
    // A filter naming a cluster no deployment may have, as a region.
    for filter in [
        json!({"cluster": ""}),
        json!({"cluster": "a\u{202e}b"}),
        json!({"region": ""}),
    ] {
        let r = h.query("jobs", &filter).await;
        query_refused(&r, "bad_request", true);
    }
    let r = h.query("nope", &json!({})).await;
    query_refused(&r, "bad_request", false);

    // Nothing was appended: the job is unchanged, and the next recorded
    // rejection takes seq head + 1.
    assert_eq!(h.job(job).await, view_before);
    let unknown = id();
    let r = h.cmd("p1", "start", &job_body(id(), unknown)).await;
    let message = rejected(&r, "not_found", Some(head + 1));
    assert_eq!(r["job_id"], json!(unknown));
    assert!(message.contains(&unknown.to_string()), "{message}");

    // A job of another project does not exist for this project, with or
    // without an expected_version (its version is not leaked).
    let r = h.cmd("p1", "stop", &job_body(id(), other)).await;
    rejected(&r, "not_found", Some(head + 2));
    let mut body = job_body(id(), other);
    body["expected_version"] = json!(7);
    let r = h.cmd("p1", "start", &body).await;
    rejected(&r, "not_found", Some(head + 3));
    assert!(r["error"].get("current_version").is_none(), "{r}");
    assert_eq!(h.job(other).await, other_before);

    // Illegal transition: names the state.
    let r = h.cmd("p1", "start", &job_body(id(), job)).await;
    let message = rejected(&r, "invalid_transition", Some(head + 4));
    assert!(message.contains("Active"), "{message}");
    let r = h.cmd("p1", "terminate", &job_body(id(), job)).await;
    let message = rejected(&r, "invalid_transition", Some(head + 5));
    assert!(message.contains("Active"), "{message}");

    // Stale expected_version: version_conflict with the current version.
    let mut body = job_body(id(), job);
    body["expected_version"] = json!(1);
    let r = h.cmd("p1", "stop", &body).await;
    rejected(&r, "version_conflict", Some(head + 6));
    assert_eq!(r["error"]["current_version"], json!(2), "{r}");

    // The job id is taken.
    let r = h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    rejected(&r, "already_exists", Some(head + 7));

    // Rejections change no job, and are in its history.
    assert_eq!(h.job(job).await, view_before);
    let history = h.history(job).await;
    let refused: Vec<_> = history
        .iter()
        .filter(|e| e["rejected"] == json!(true))
        .map(|e| (e["seq"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        refused,
        [
            (head + 4, "invalid_transition"),
            (head + 5, "invalid_transition"),
            (head + 6, "version_conflict"),
            (head + 7, "already_exists"),
        ]
    );
    for e in history.iter().filter(|e| e["rejected"] == json!(true)) {
        assert_eq!(e["version"], Value::Null, "{e}");
        assert_eq!(e["from"], e["to"], "{e}");
    }

    let events = h.caught_up_stream(head + 7).await;
    for e in &events[head as usize..] {
        assert_eq!(e["type"], json!("CommandRejected"), "{e}");
        assert_eq!(e["job_version"], Value::Null, "{e}");
    }
    h.stop_and_verify(head + 7).await;
}

/// The stream: every message read back by sequence matches the contract;
/// region events go to `bcp.evt._admin.<region>`; the stream is file-backed
/// and refuses deletes and purges.
#[tokio::test]
async fn jetstream_stream_contents() {
    let mut h = Harness::start().await;
    let job = id();
    let job2 = id();
    let r = h
        .cmd(
            "_admin",
            "configure-region",
            &json!({"command_id": id(), "region": "eu", "snapshot_store": "s3-eu"}),
        )
        .await;
    assert_eq!(r, accepted(None, None, &[(1, "RegionConfigured")]));
    let mut create = create_body(id(), job, "rs0");
    create["region"] = json!("eu");
    let r = h.cmd("p1", "create", &create).await;
    assert_eq!(r, accepted(Some(job), Some(1), &[(2, "JobCreated")]));
    let r = h.cmd("p1", "start", &job_body(id(), job)).await;
    assert_eq!(r, accepted(Some(job), Some(2), &[(3, "JobStarted")]));
    let view = h.job(job).await;
    assert_eq!(view["state"], json!("Misconfigured"), "{view}");
    // One command, two events: the region and the job it repairs.
    let r = h
        .cmd(
            "_admin",
            "configure-region",
            &json!({"command_id": id(), "region": "eu", "oplog_store": "o", "sync_store": "s"}),
        )
        .await;
    assert_eq!(
        r,
        accepted(
            None,
            None,
            &[(4, "RegionConfigured"), (5, "JobReconfigured")]
        )
    );
    let view = h.job(job).await;
    assert_eq!(view["state"], json!("Active"), "{view}");
    assert_eq!(view["phase"], json!("initial_sync"), "{view}");
    assert_eq!(view["version"], json!(3), "{view}");
    let r = h.cmd("p2", "create", &create_body(id(), job2, "rs1")).await;
    assert_eq!(r, accepted(Some(job2), Some(1), &[(6, "JobCreated")]));
    let r = h.cmd("p2", "terminate", &job_body(id(), job2)).await;
    rejected(&r, "invalid_transition", Some(7));

    let events = h.caught_up_stream(7).await;
    let info = h.stream_info().await.expect("stream exists");
    let subjects: Vec<String> = h
        .stream_messages()
        .await
        .iter()
        .map(|m| m.subject.to_string())
        .collect();
    assert_eq!(
        subjects,
        [
            "bcp.evt._admin.eu.RegionConfigured".to_owned(),
            format!("bcp.evt.p1.{job}.JobCreated"),
            format!("bcp.evt.p1.{job}.JobStarted"),
            "bcp.evt._admin.eu.RegionConfigured".to_owned(),
            format!("bcp.evt.p1.{job}.JobReconfigured"),
            format!("bcp.evt.p2.{job2}.JobCreated"),
            format!("bcp.evt.p2.{job2}.CommandRejected"),
        ]
    );
    assert_eq!(
        events[3]["data"],
        json!({"region": "eu", "snapshot_store": "s3-eu", "oplog_store": "o", "sync_store": "s"})
    );
    let versions: Vec<_> = events.iter().map(|e| e["job_version"].clone()).collect();
    assert_eq!(
        versions,
        [
            Value::Null,
            json!(1),
            json!(2),
            Value::Null,
            json!(3),
            json!(1),
            Value::Null
        ]
    );
    for e in &events {
        assert_eq!(e["schema_version"], json!(1), "{e}");
        assert!(e["recorded_at"].is_string(), "{e}");
        assert!(e["command_id"].is_string(), "{e}");
        let event_id = Uuid::parse_str(e["event_id"].as_str().unwrap()).unwrap();
        assert_eq!(event_id.get_version_num(), 7, "event_id is a UUID v7: {e}");
    }

    let config = &info.config;
    assert_eq!(config.subjects, ["bcp.evt.>"]);
    assert!(config.deny_delete, "deny_delete");
    assert!(config.deny_purge, "deny_purge");
    // Short: JetStream's de-duplication only has to catch the relay's
    // re-sent publishes (limits.rs says why).
    assert_eq!(
        config.duplicate_window,
        bcp::domain::limits::STREAM_DUPLICATE_WINDOW
    );
    assert_eq!(
        config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    // And NATS enforces them: the published trail cannot be trimmed.
    let stream = h.js.get_stream(support::STREAM).await.unwrap();
    assert!(stream.delete_message(3).await.is_err(), "delete refused");
    assert!(stream.purge().await.is_err(), "purge refused");
    let info = h.stream_info().await.unwrap();
    assert_eq!((info.state.messages, info.state.last_sequence), (7, 7));
    h.stop_and_verify(7).await;
}

/// A NATS crash (SIGKILL) with events committed and maybe not yet
/// published; the server comes back on the same port and store; bcp
/// reconnects by itself and the relay publishes every event exactly once.
/// Then SIGTERM during an outage: bcp still exits 0, and publishes the rest
/// on its next start.
#[tokio::test]
async fn relay_catches_up_after_nats_outage() {
    let mut h = Harness::start().await;
    let jobs: Vec<Uuid> = (0..10).map(|_| id()).collect();
    let creates: Vec<Value> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| create_body(id(), *j, &format!("rs{i}")))
        .collect();
    let replies = join_all(creates.iter().map(|c| h.cmd("p1", "create", c))).await;
    let mut seqs: Vec<u64> = replies
        .iter()
        .map(|r| {
            assert_eq!(r["ok"], json!(true), "{r}");
            r["events"][0]["seq"].as_u64().unwrap()
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());

    // Crash NATS right away, whatever the relay has published so far.
    let (port, store) = (h.nats.port, h.nats.store.clone());
    h.restart_nats(port, &store).await;

    let mut head = 10;
    for j in &jobs[..5] {
        let mut r = h.cmd_until_ok("p1", "start", &job_body(id(), *j)).await;
        head += 1;
        // Answered first time, or a retry of a command whose reply was lost.
        r["duplicate"] = json!(false);
        assert_eq!(r, accepted(Some(*j), Some(2), &[(head, "JobStarted")]));
    }
    let events = h.caught_up_stream(head).await;
    let mut created: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == json!("JobCreated"))
        .map(|e| Uuid::parse_str(e["job_id"].as_str().unwrap()).unwrap())
        .collect();
    created.sort();
    let mut expected = jobs.clone();
    expected.sort();
    assert_eq!(created, expected);
    for j in &jobs[..5] {
        assert_eq!(h.job(*j).await["state"], json!("Active"));
    }

    // SIGTERM while NATS is down: bcp still drains and exits 0 (once its
    // drain timeout is spent); what it could not publish goes out on the
    // next start.
    let r = h.cmd("p1", "stop", &job_body(id(), jobs[0])).await;
    head += 1;
    assert_eq!(r, accepted(Some(jobs[0]), Some(3), &[(head, "JobStopped")]));
    h.nats.kill();
    let status = h.stop_bcp().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status of SIGTERM in an outage"
    );
    h.restart_nats(port, &store).await;
    h.start_bcp().await;
    h.caught_up_stream(head).await;
    // Losing NATS was said at WARN, naming the server.
    let log = h.bcp_log_text();
    let url = h.nats.url();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("NATS connection lost") && l.contains(&url)),
        "{log}"
    );
    h.stop_and_verify(head).await;
}

/// SIGTERM while NATS is down and thousands of commands are mid-flight
/// (queued, being committed, or committed with their replies unsent): bcp
/// still ends within its drain timeout (10 s), exit 0, with every answered
/// command in its log; after the restart the relay publishes the whole log
/// exactly once, and a retry is answered from the stored record.
#[tokio::test]
async fn sigterm_in_an_outage_under_load_ends_within_the_drain_timeout() {
    let mut h = Harness::start().await;
    let bodies: Vec<Value> = (0..6000)
        .map(|i| create_body(id(), id(), &format!("rs{i}")))
        .collect();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut pending = Vec::new();
    for body in &bodies {
        let (client, answered) = (h.client.clone(), answered.clone());
        let bytes: bytes::Bytes = serde_json::to_vec(body).unwrap().into();
        pending.push(tokio::spawn(async move {
            let sent = client.request("bcp.cmd.p1.create", bytes);
            if let Ok(Ok(_)) = tokio::time::timeout(std::time::Duration::from_secs(5), sent).await {
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    // Once replies flow, most commands are queued in bcp: crash NATS.
    let deadline = support::Deadline::new("the first replies", support::REPLY);
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 300 {
        deadline.tick().await;
    }
    let (port, store) = (h.nats.port, h.nats.store.clone());
    h.nats.kill();
    let before = answered.load(std::sync::atomic::Ordering::SeqCst);
    assert!(before < 4000, "NATS went down with {before} replies sent");
    let started = std::time::Instant::now();
    let status = h.stop_bcp().await;
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status of SIGTERM in an outage"
    );
    assert!(
        took < std::time::Duration::from_secs(20),
        "SIGTERM took {took:?}"
    );
    for p in pending {
        p.await.unwrap();
    }
    let head = bcp::store::Store::open_existing(&h.db())
        .unwrap()
        .head_seq()
        .unwrap();
    assert!(
        head >= before as u64,
        "every answered command is in the log"
    );

    h.restart_nats(port, &store).await;
    h.start_bcp().await;
    // A retry of the last command the log holds is answered from its record.
    let events = h.caught_up_stream(head).await;
    let last = events.last().expect("events");
    let retried = bodies
        .iter()
        .find(|b| b["job_id"] == last["job_id"])
        .expect("a command of this test");
    let r = h.cmd("p1", "create", retried).await;
    assert_eq!(
        (r["ok"].clone(), r["duplicate"].clone()),
        (json!(true), json!(true)),
        "{r}"
    );
    h.stop_and_verify(head).await;
}

/// One project flooding its queries takes at most a quarter of
/// `--queries-in-flight` (here 1 of 4): the rest of its flood is answered
/// `unavailable`, naming the project, while another project's queries,
/// sent one at a time meanwhile, are every one answered.
#[tokio::test]
async fn one_projects_flood_of_queries_leaves_the_others_theirs() {
    let h = Harness::start_with(&["--queries-in-flight", "4"]).await;
    for project in ["p1", "p2"] {
        for i in 0..50 {
            let r = h
                .cmd(
                    project,
                    "create",
                    &create_body(id(), id(), &format!("rs{i}")),
                )
                .await;
            assert_eq!(r["ok"], json!(true), "{r}");
        }
    }
    let (h, all) = (&h, &json!({}));
    let flood = join_all((0..400).map(|_| h.request("bcp.query.p1.jobs", all)));
    let others = async {
        let mut replies = Vec::new();
        for _ in 0..40 {
            replies.push(h.request("bcp.query.p2.jobs", all).await);
        }
        replies
    };
    let (flood, others) = futures::join!(flood, others);
    for r in &others {
        assert_eq!(r["ok"], json!(true), "{r}");
        assert_eq!(r["jobs"].as_array().map(Vec::len), Some(50), "{r}");
    }
    let refused: Vec<&Value> = flood.iter().filter(|r| r["ok"] != json!(true)).collect();
    assert!(
        !refused.is_empty() && refused.len() < flood.len(),
        "{} of {} refused",
        refused.len(),
        flood.len()
    );
    for r in refused {
        assert_eq!(r["error"]["code"], json!("unavailable"), "{r}");
        assert_eq!(
            r["error"]["message"],
            json!("too many queries of project p1 in flight (at most 1); retry shortly"),
            "{r}"
        );
    }
}

/// Queries beyond `--queries-in-flight` are answered `unavailable` at once
/// (a flood of queries must not queue without bound); every query gets an
/// answer, and commands are unaffected.
#[tokio::test]
async fn queries_beyond_the_limit_are_answered_unavailable_at_once() {
    let h = Harness::start_with(&["--queries-in-flight", "1"]).await;
    let creates: Vec<Value> = (0..50)
        .map(|i| create_body(id(), id(), &format!("rs{i}")))
        .collect();
    for r in join_all(creates.iter().map(|c| h.cmd("p1", "create", c))).await {
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    let all = json!({});
    let replies = join_all((0..400).map(|_| h.query("jobs", &all))).await;
    let (mut ok, mut unavailable) = (0, 0);
    for r in &replies {
        if r["ok"] == json!(true) {
            assert_eq!(r["jobs"].as_array().map(Vec::len), Some(50), "{r}");
            ok += 1;
        } else {
            assert_eq!(r["error"]["code"], json!("unavailable"), "{r}");
            assert_eq!(
                r["error"]["message"],
                json!("too many queries in flight; retry shortly")
            );
            unavailable += 1;
        }
    }
    assert!(
        ok >= 1 && unavailable >= 1,
        "{ok} ok, {unavailable} unavailable"
    );
    // The permits come back: one query at a time is always answered.
    for _ in 0..3 {
        let r = h.query("jobs", &json!({})).await;
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    let r = h
        .cmd("p1", "create", &create_body(id(), id(), "after"))
        .await;
    assert_eq!(r["ok"], json!(true), "{r}");
}

/// `bcp serve` drains on SIGTERM and exits 0; started again on the same db
/// it has every job, history and idempotency record, continues the seq, and
/// does not publish anything twice.
#[tokio::test]
async fn restart_of_serve_on_the_same_db() {
    let mut h = Harness::start().await;
    let (j1, j2) = (id(), id());
    let create = create_body(id(), j1, "rs0");
    let created = h.cmd("p1", "create", &create).await;
    h.cmd("p1", "start", &job_body(id(), j1)).await;
    h.cmd("p1", "create", &create_body(id(), j2, "rs1")).await;
    let terminate = job_body(id(), j2);
    let refused = h.cmd("p1", "terminate", &terminate).await;
    rejected(&refused, "invalid_transition", Some(4));
    let (view1, view2, history1, history2) = (
        h.job(j1).await,
        h.job(j2).await,
        h.history(j1).await,
        h.history(j2).await,
    );
    let published = h.caught_up_stream(4).await;

    let status = h.stop_bcp().await;
    assert_eq!(status.code(), Some(0), "exit status on SIGTERM");
    h.start_bcp().await;

    assert_eq!(h.job(j1).await, view1);
    assert_eq!(h.job(j2).await, view2);
    assert_eq!(h.history(j1).await, history1);
    assert_eq!(h.history(j2).await, history2);
    let r = h.query("jobs", &json!({"project_id": "p1"})).await;
    assert_eq!(r["jobs"].as_array().unwrap().len(), 2, "{r}");
    // Idempotency records survive the restart.
    assert_eq!(h.cmd("p1", "create", &create).await, as_duplicate(&created));
    assert_eq!(
        h.cmd("p1", "terminate", &terminate).await,
        as_duplicate(&refused)
    );

    let r = h.cmd("p1", "stop", &job_body(id(), j1)).await;
    assert_eq!(r, accepted(Some(j1), Some(3), &[(5, "JobStopped")]));
    let events = h.caught_up_stream(5).await;
    assert_eq!(events[..4], published[..], "republished differently");

    // After a kill -9 the audit tools, which never write, refuse the store
    // with what to do; bcp serve recovers it.
    h.kill_bcp();
    let db = h.db();
    let (code, _, err) =
        support::bcp_cli_text(&["audit", "verify", "--db", db.to_str().unwrap()]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("not closed cleanly"), "{err}");
    h.start_bcp().await;
    h.stop_and_verify(5).await;
}

/// The NATS store is lost: a fresh nats-server with an empty store dir;
/// bcp, restarted on the same db, republishes the whole log from seq 1 with
/// the same bytes and message ids; and again when the store is lost while
/// bcp runs.
#[tokio::test]
async fn lost_nats_store_is_republished() {
    let mut h = Harness::start().await;
    let job = id();
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    h.cmd(
        "_admin",
        "configure-region",
        &json!({"command_id": id(), "region": "us", "snapshot_store": "s"}),
    )
    .await;
    let r = h.cmd("p1", "start", &job_body(id(), job)).await;
    rejected(&r, "invalid_transition", Some(4));
    h.caught_up_stream(4).await;
    let before = h.stream_messages().await;

    let status = h.stop_bcp().await;
    assert_eq!(status.code(), Some(0));
    let fresh_store = h.path("nats-b");
    assert!(!fresh_store.exists());
    h.restart_nats(free_port(), &fresh_store).await;
    assert!(h.stream_info().await.is_none(), "the new server is empty");
    h.start_bcp().await;

    h.caught_up_stream(4).await;
    let after = h.stream_messages().await;
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.subject, b.subject);
        assert_eq!(a.payload, b.payload, "payload of seq {}", a.sequence);
        assert_eq!(
            a.headers.get("Nats-Msg-Id"),
            b.headers.get("Nats-Msg-Id"),
            "Nats-Msg-Id of seq {}",
            a.sequence
        );
    }
    let r = h.cmd("p1", "stop", &job_body(id(), job)).await;
    assert_eq!(r, accepted(Some(job), Some(3), &[(5, "JobStopped")]));
    h.caught_up_stream(5).await;

    // Lost again, this time while bcp runs: its next publish finds no
    // stream, and the relay reconciles and republishes the whole log.
    let (port, empty) = (h.nats.port, h.path("nats-c"));
    h.restart_nats(port, &empty).await;
    let mut r = h.cmd_until_ok("p1", "start", &job_body(id(), job)).await;
    r["duplicate"] = json!(false); // a retry, if the first reply was lost
    assert_eq!(r, accepted(Some(job), Some(4), &[(6, "JobStarted")]));
    h.caught_up_stream(6).await;
    h.stop_and_verify(6).await;
}

/// Commands without a reply subject are decided and recorded in order; a
/// later request with the same command_id gets the reply.
#[tokio::test]
async fn fire_and_forget() {
    let mut h = Harness::start().await;
    let job = id();
    let create = create_body(id(), job, "rs0");
    let start = job_body(id(), job);
    let start_again = job_body(id(), job);
    for (verb, body) in [
        ("create", &create),
        ("start", &start),
        ("start", &start_again),
    ] {
        h.client
            .publish(
                format!("bcp.cmd.p1.{verb}"),
                serde_json::to_vec(body).unwrap().into(),
            )
            .await
            .unwrap();
    }
    // Undecodable, also without a reply: dropped, nothing recorded.
    h.client
        .publish("bcp.cmd.p1.stop", "garbage".into())
        .await
        .unwrap();
    h.client.flush().await.unwrap();

    let deadline = support::Deadline::new("three fire-and-forget commands", support::REPLY);
    let history = loop {
        let r = h.query("history", &json!({"job_id": job})).await;
        if r["ok"] == json!(true) && r["history"].as_array().unwrap().len() == 3 {
            break r["history"].as_array().unwrap().clone();
        }
        deadline.tick().await;
    };
    let summary: Vec<_> = history
        .iter()
        .map(|e| (e["seq"].clone(), e["type"].clone(), e["rejected"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (json!(1), json!("JobCreated"), json!(false)),
            (json!(2), json!("JobStarted"), json!(false)),
            (json!(3), json!("CommandRejected"), json!(true)),
        ]
    );
    assert_eq!(history[2]["code"], json!("invalid_transition"));
    let view = h.job(job).await;
    assert_eq!(
        (view["state"].clone(), view["version"].clone()),
        (json!("Active"), json!(2))
    );

    let mut dup = accepted(Some(job), Some(1), &[(1, "JobCreated")]);
    dup["duplicate"] = json!(true);
    assert_eq!(h.cmd("p1", "create", &create).await, dup);
    let mut dup = accepted(Some(job), Some(2), &[(2, "JobStarted")]);
    dup["duplicate"] = json!(true);
    assert_eq!(h.cmd("p1", "start", &start).await, dup);
    let r = h.cmd("p1", "start", &start_again).await;
    assert_eq!(r["duplicate"], json!(true), "{r}");
    assert_eq!(r["error"]["code"], json!("invalid_transition"), "{r}");
    assert_eq!(r["rejection_seq"], json!(3), "{r}");

    // The garbage appended nothing: the next event is seq 4.
    let r = h.cmd("p1", "stop", &job_body(id(), job)).await;
    assert_eq!(r, accepted(Some(job), Some(3), &[(4, "JobStopped")]));
    h.caught_up_stream(4).await;
    h.stop_and_verify(4).await;
}

/// `bcp send`: exit 0 accepted, 1 rejected, 2 usage, 3 when no bcp answers.
#[tokio::test]
async fn send_cli_exit_codes() {
    let mut h = Harness::start().await;
    let url = h.nats.url();
    let job = id().to_string();
    let cid = id().to_string();
    let send = |args: &[&str]| {
        let mut all = vec!["send"];
        all.extend_from_slice(args);
        if !args.contains(&"--timeout") {
            all.extend_from_slice(&["--timeout", "3"]);
        }
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            let out = bcp_cli(&refs).await;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            (out.status.code(), stdout, stderr)
        }
    };
    let create = [
        "create",
        "--project",
        "p1",
        "--job",
        &job,
        "--kind",
        "replica_set",
        "--name",
        "rs0",
        "--command-id",
        &cid,
        "--nats",
        &url,
    ];
    let (code, out, err) = send(&create).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let reply: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        reply,
        accepted(Some(job.parse().unwrap()), Some(1), &[(1, "JobCreated")])
    );
    assert!(err.contains(&format!("command_id: {cid}")), "{err}");
    // A retry with the same --command-id: accepted, duplicate.
    let (code, out, _) = send(&create).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        as_duplicate(&reply)
    );

    // create with no --job: bcp send makes the job id up (the command's
    // own id), so retrying with the command_id it printed, as README says,
    // is the same command: the first reply, not command_id_conflict.
    let unnamed = [
        "create",
        "--project",
        "p1",
        "--kind",
        "replica_set",
        "--name",
        "rs9",
    ];
    let (code, out, err) = send(&[&unnamed[..], &["--nats", &url]].concat()).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let first: Value = serde_json::from_str(out.trim()).unwrap();
    let printed = err
        .lines()
        .find_map(|l| l.strip_prefix("command_id: "))
        .unwrap_or_else(|| panic!("no command_id on stderr: {err}"))
        .trim()
        .to_owned();
    assert_eq!(first["job_id"], json!(printed), "{first}");
    let retry = [&unnamed[..], &["--command-id", &printed, "--nats", &url]].concat();
    let (code, out, err) = send(&retry).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        as_duplicate(&first)
    );

    let start = ["start", "--project", "p1", "--job", &job, "--nats", &url];
    let (code, out, err) = send(&start).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, _) = send(&start).await;
    assert_eq!(code, Some(1), "{out}");
    let reply: Value = serde_json::from_str(out.trim()).unwrap();
    rejected(&reply, "invalid_transition", Some(4));
    let (code, out, _) = send(&[
        "stop",
        "--project",
        "p1",
        "--job",
        &id().to_string(),
        "--nats",
        &url,
    ])
    .await;
    assert_eq!(code, Some(1), "{out}");
    let (code, out, _) = send(&[
        "stop",
        "--project",
        "p1",
        "--job",
        &job,
        "--body",
        r#"{"colour":1}"#,
        "--nats",
        &url,
    ])
    .await;
    assert_eq!(code, Some(1), "{out}");
    rejected(
        &serde_json::from_str(out.trim()).unwrap(),
        "bad_request",
        None,
    );
    let (code, _, err) = send(&["start", "--project", "p1", "--nats", &url]).await;
    assert_eq!(code, Some(2), "usage: {err}");
    // Usage errors, sent nothing: ids in --body (the command_id printed
    // would not be the one sent, and a retry with it a new command), a
    // create's flags on another verb, a timeout of 0 (sent, never awaited).
    let usage = [
        (
            r#"{"command_id":"0192f0c4-0000-7000-8000-0000000c0010"}"#,
            "use --command-id",
        ),
        (&format!(r#"{{"job_id":"{}"}}"#, id()), "use --job"),
    ];
    for (body, says) in usage {
        let args = ["stop", "--project", "p1", "--job", &job, "--body", body];
        let (code, out, err) = send(&[&args[..], &["--nats", &url]].concat()).await;
        assert_eq!(code, Some(2), "{out}{err}");
        assert!(err.contains(says) && out.is_empty(), "{err}");
    }
    let (code, _, err) = send(&[
        "start",
        "--project",
        "p1",
        "--job",
        &job,
        "--kind",
        "shard",
        "--nats",
        &url,
    ])
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("for create, not start"), "{err}");
    let out = bcp_cli(&[
        "send",
        "stop",
        "--project",
        "p1",
        "--job",
        &job,
        "--timeout",
        "0",
        "--nats",
        &url,
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let r = h.job(job.parse().unwrap()).await;
    assert_eq!(
        r["state"],
        json!("Active"),
        "no usage error stopped it: {r}"
    );

    // No server at all: a closed port.
    let closed = format!("nats://127.0.0.1:{}", free_port());
    let (code, out, err) =
        send(&["start", "--project", "p1", "--job", &job, "--nats", &closed]).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    // A nats-server, but no bcp behind it.
    let lonely = Nats::start(
        free_port(),
        &h.path("nats-lonely"),
        &h.path("nats-lonely.log"),
    )
    .await;
    let lonely_url = lonely.url();
    let start_on_lonely = |extra: &[&'static str]| {
        let mut args = vec![
            "start",
            "--project",
            "p1",
            "--job",
            &job,
            "--nats",
            &lonely_url,
        ];
        args.extend_from_slice(extra);
        send(&args)
    };
    let (code, out, err) = start_on_lonely(&[]).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains("no reply"), "{err}");
    // Something that takes the request and never answers: bcp send waits
    // its whole --timeout, past the NATS client's own 10 s default.
    let silent = async_nats::connect(lonely.url()).await.unwrap();
    let _taken = silent.subscribe("bcp.cmd.p1.start").await.unwrap();
    silent.flush().await.unwrap();
    let asked = std::time::Instant::now();
    let (code, out, err) = start_on_lonely(&["--timeout", "11"]).await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(
        err.contains("no reply on bcp.cmd.p1.start within 11s"),
        "{err}"
    );
    assert!(
        asked.elapsed() >= std::time::Duration::from_secs(11),
        "{:?}",
        asked.elapsed()
    );
    // A frozen server listed first: the CLI gives it two seconds, then
    // asks the next one, and a reachable bcp still answers.
    lonely.freeze(true);
    let both = format!("{},{url}", lonely.url());
    let (code, out, err) = support::bcp_cli_text(&["status", "--nats", &both]).await;
    lonely.freeze(false);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("single"), "{out}");
    drop(lonely);

    h.caught_up_stream(5).await;
    h.stop_and_verify(5).await;
}

/// `bcp audit verify` after a mixed workload (regions, schedules, region
/// assignment, rejections): refused while serve holds the db, exit 0 with
/// `ok:` once it stopped.
#[tokio::test]
async fn audit_verify_after_serve_stops() {
    let mut h = Harness::start().await;
    let (a, b) = (id(), id());
    let mut head = 0;
    let mut expect_ok = |r: Value| {
        assert_eq!(r["ok"], json!(true), "{r}");
        head += r["events"].as_array().unwrap().len() as u64;
    };
    expect_ok(h.cmd("p1", "create", &create_body(id(), a, "rs0")).await);
    let mut shard = json!({
        "command_id": id(), "job_id": b,
        "deployment": {"kind": "shard", "name": "sh0", "cluster": "c1"},
        "schedule": {"snapshot_interval_hours": 6, "snapshot_retention_days": 3},
    });
    expect_ok(h.cmd("p1", "create", &shard).await);
    let mut assign = job_body(id(), a);
    assign["region"] = json!("eu");
    expect_ok(h.cmd("p1", "assign-region", &assign).await);
    expect_ok(h.cmd("p1", "start", &job_body(id(), a)).await);
    let mut sched = job_body(id(), b);
    sched["schedule"] = json!({"snapshot_interval_hours": 12});
    expect_ok(h.cmd("p1", "change-schedule", &sched).await);
    expect_ok(
        h.cmd(
            "_admin",
            "configure-region",
            &json!({"command_id": id(), "region": "eu", "snapshot_store": "s", "oplog_store": "o", "sync_store": "y"}),
        )
        .await,
    );
    // Only invalid against the job's own schedule (12-hourly keeps base
    // snapshots 2-5 days): bad_request, and not recorded.
    let mut too_long = job_body(id(), b);
    too_long["schedule"] = json!({"snapshot_retention_days": 10});
    let r = h.cmd("p1", "change-schedule", &too_long).await;
    rejected(&r, "bad_request", None);
    let r = h.cmd("p1", "terminate", &job_body(id(), a)).await;
    rejected(&r, "invalid_transition", Some(head + 1));
    head += 1;
    shard["command_id"] = json!(id());
    let r = h.cmd("p1", "create", &shard).await;
    rejected(&r, "already_exists", Some(head + 1));
    head += 1;
    let r = h.query("jobs", &json!({"cluster": "c1"})).await;
    assert_eq!(r["jobs"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(
        r["jobs"][0]["schedule"]["snapshot_interval_hours"],
        json!(12)
    );
    let r = h
        .query("jobs", &json!({"region": "eu", "state": "Active"}))
        .await;
    assert_eq!(r["jobs"][0]["job_id"], json!(a), "{r}");
    h.caught_up_stream(head).await;

    // The running server holds the store: verify refuses, it does not guess.
    let db = h.db();
    let db = db.to_str().unwrap();
    let out = bcp_cli(&["audit", "verify", "--db", db]).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    h.stop_and_verify(head).await;
}

fn record_body(job: Uuid, snapshot: Uuid, taken_at: &str, size_bytes: u64) -> Value {
    json!({
        "command_id": id(),
        "job_id": job,
        "snapshot_id": snapshot,
        "taken_at": taken_at,
        "size_bytes": size_bytes,
    })
}

/// A body for delete-snapshot (and, with a field added, set-snapshot-expiry).
fn snapshot_body(job: Uuid, snapshot: Uuid) -> Value {
    json!({"command_id": id(), "job_id": job, "snapshot_id": snapshot})
}

/// A catalog entry as `bcp.query.snapshots` shows it.
fn catalog_entry(
    snapshot: Uuid,
    taken_at: &str,
    size_bytes: u64,
    classes: &[&str],
    expires_at: &str,
    do_not_delete: bool,
) -> Value {
    json!({
        "snapshot_id": snapshot,
        "taken_at": taken_at,
        "size_bytes": size_bytes,
        "classes": classes,
        "expires_at": expires_at,
        "do_not_delete": do_not_delete,
    })
}

/// The reply of `bcp.query.<project>.snapshots` for `job`.
async fn project_snapshots(h: &Harness, project: &str, job: Uuid) -> Value {
    let subject = format!("bcp.query.{project}.snapshots");
    h.request(&subject, &json!({ "job_id": job })).await
}

/// A successful `bcp.query.snapshots` reply, exactly.
fn catalog_reply(as_of_seq: u64, job: Uuid, entries: &[&Value]) -> Value {
    json!({"ok": true, "as_of_seq": as_of_seq, "job_id": job, "snapshots": entries})
}

/// state, phase, snapshot_count and latest_snapshot_at of a job view.
fn snapshot_facts(view: &Value) -> Value {
    json!([
        view["state"],
        view["phase"],
        view["snapshot_count"],
        view["latest_snapshot_at"]
    ])
}

/// The snapshot verbs over the wire; their rules (classes and expiry, the
/// catalog in time order, phase, duplicates, do_not_delete, unknown
/// snapshots, the states that refuse, every malformed body) are the
/// given/when/then tables of `src/domain/scenarios.rs`. Here: a recorded
/// snapshot's exact reply and catalog entry through the project's query, a
/// malformed body and a schedule value outside the table refused
/// `bad_request` with nothing appended, expiry for a project never touching
/// another project's snapshots, and terminate purging what the query shows.
#[tokio::test]
async fn snapshot_verbs_over_nats() {
    let mut h = Harness::start().await;
    let (a, b, c, s0, b1, c1) = (id(), id(), id(), id(), id(), id());

    // Job A keeps dailies 7 days. Times lie ahead of bcp's clock (the
    // agent's clock), so the server's own sweeps never touch them. Its
    // first snapshot is daily, weekly and monthly: the monthly's 28 days.
    let mut create_a = create_body(id(), a, "rs-a");
    create_a["schedule"] = json!({"daily_retention_days": 7});
    h.cmd("p1", "create", &create_a).await;
    h.cmd("p1", "start", &job_body(id(), a)).await;
    let record_s0 = record_body(a, s0, "2027-02-28T00:00:00Z", 500);
    let r = h.cmd("p1", "record-snapshot", &record_s0).await;
    assert_eq!(r, accepted(Some(a), Some(3), &[(3, "SnapshotRecorded")]));
    let retry = h.cmd("p1", "record-snapshot", &record_s0).await;
    assert_eq!(retry, as_duplicate(&r));
    let e0 = catalog_entry(
        s0,
        "2027-02-28T00:00:00Z",
        500,
        &["base", "daily", "weekly", "monthly"],
        "2027-03-28T00:00:00Z",
        false,
    );
    assert_eq!(
        project_snapshots(&h, "p1", a).await,
        catalog_reply(3, a, &[&e0])
    );
    let view = h.job(a).await;
    let facts = json!(["Active", "incremental", 1, "2027-02-28T00:00:00Z"]);
    assert_eq!(snapshot_facts(&view), facts, "{view}");

    // A malformed body, and a schedule value outside DOMAIN.md's table
    // (refused by decide, against the job's schedule): bad_request, nothing
    // appended, so the fixed schedule, retried with the same command_id,
    // is the next event.
    let mut classes = record_body(a, id(), "2027-03-01T00:00:00Z", 1);
    classes["classes"] = json!(["monthly"]);
    let r = h.cmd("p1", "record-snapshot", &classes).await;
    let message = rejected(&r, "bad_request", None);
    assert!(message.contains("unknown field `classes`"), "{message}");
    let mut keys: Vec<_> = r.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["duplicate", "error", "ok"], "{r}");
    let mut schedule = job_body(id(), a);
    schedule["schedule"] = json!({"snapshot_interval_hours": 7});
    let r = h.cmd("p1", "change-schedule", &schedule).await;
    let message = rejected(&r, "bad_request", None);
    assert!(message.contains("6, 8, 12, 24"), "{message}");
    schedule["schedule"] = json!({"snapshot_interval_hours": 12});
    let r = h.cmd("p1", "change-schedule", &schedule).await;
    assert_eq!(r, accepted(Some(a), Some(4), &[(4, "ScheduleChanged")]));
    assert_eq!(
        h.job(a).await["schedule"],
        json!({
            "snapshot_interval_hours": 12,
            "snapshot_retention_days": 2,
            "daily_retention_days": 7,
            "weekly_retention_weeks": 2,
            "monthly_retention_months": 1,
            "point_in_time_window_hours": 24,
            "reference_hour_of_day": 0,
            "reference_minute_of_hour": 0,
        })
    );

    // Jobs B (p1) and C (p2) keep base snapshots only (2 days).
    let base_only = json!({"weekly_retention_weeks": 0, "monthly_retention_months": 0});
    for (project, job, snap) in [("p1", b, b1), ("p2", c, c1)] {
        let mut create = create_body(id(), job, "rs-bc");
        create["schedule"] = base_only.clone();
        h.cmd(project, "create", &create).await;
        h.cmd(project, "start", &job_body(id(), job)).await;
        let record = record_body(job, snap, "2027-03-01T00:00:00Z", 10);
        let r = h.cmd(project, "record-snapshot", &record).await;
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    // Expiry for project p1: B's due b1 goes; C's due c1 (p2) stays, and
    // p1's query does not show C at all.
    let expire_p1 = json!({"command_id": id(), "now": "2027-03-04T00:00:00Z"});
    let r = h.cmd("p1", "expire-snapshots", &expire_p1).await;
    assert_eq!(r, accepted(None, None, &[(11, "SnapshotExpired")]));
    assert_eq!(
        project_snapshots(&h, "p1", b).await,
        catalog_reply(11, b, &[])
    );
    let r = project_snapshots(&h, "p1", c).await;
    query_refused(&r, "not_found", true);
    let ec = catalog_entry(
        c1,
        "2027-03-01T00:00:00Z",
        10,
        &["base", "daily", "weekly", "monthly"],
        "2027-03-03T00:00:00Z",
        false,
    );
    assert_eq!(
        project_snapshots(&h, "p2", c).await,
        catalog_reply(11, c, &[&ec])
    );
    assert_eq!(h.snapshots(a).await, [e0]);
    // Nothing due for one job: accepted, no events, nothing appended.
    let expire_a = json!({"command_id": id(), "job_id": a, "now": "2027-03-04T00:00:00Z"});
    let r = h.cmd("p1", "expire-snapshots", &expire_a).await;
    assert_eq!(
        r,
        json!({"ok": true, "job_id": a, "version": 4, "events": [], "duplicate": false})
    );

    // Terminate purges everything, do_not_delete included; the Inactive
    // job then refuses a snapshot, naming its state.
    h.cmd("p1", "stop", &job_body(id(), a)).await;
    let mut keep = snapshot_body(a, s0);
    keep["do_not_delete"] = json!(true);
    let r = h.cmd("p1", "set-snapshot-expiry", &keep).await;
    assert_eq!(
        r,
        accepted(Some(a), Some(6), &[(13, "SnapshotExpiryChanged")])
    );
    let r = h.cmd("p1", "terminate", &job_body(id(), a)).await;
    let purged = [(14, "JobTerminated"), (15, "SnapshotsPurged")];
    assert_eq!(r, accepted(Some(a), Some(8), &purged));
    assert_eq!(
        project_snapshots(&h, "p1", a).await,
        catalog_reply(15, a, &[])
    );
    let view = h.job(a).await;
    assert_eq!(
        snapshot_facts(&view),
        json!(["Inactive", null, 0, null]),
        "{view}"
    );
    let late = record_body(a, id(), "2027-03-03T00:00:00Z", 1);
    let r = h.cmd("p1", "record-snapshot", &late).await;
    let message = rejected(&r, "invalid_transition", Some(16));
    assert!(message.contains("Inactive"), "{message}");

    // The log: the events the replies named, with the data.
    let events = h.caught_up_stream(16).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let want = "JobCreated JobStarted SnapshotRecorded ScheduleChanged \
                JobCreated JobStarted SnapshotRecorded JobCreated JobStarted SnapshotRecorded \
                SnapshotExpired JobStopped SnapshotExpiryChanged \
                JobTerminated SnapshotsPurged CommandRejected";
    assert_eq!(types.join(" "), want);
    let expired = &events[10];
    assert_eq!(
        (&expired["project_id"], &expired["job_id"]),
        (&json!("p1"), &json!(b))
    );
    assert_eq!(
        expired["data"],
        json!({"snapshot_id": b1, "expires_at": "2027-03-03T00:00:00Z"})
    );
    assert_eq!(expired["command_id"], expire_p1["command_id"]);
    let kept =
        json!({"snapshot_id": s0, "expires_at": "2027-03-28T00:00:00Z", "do_not_delete": true});
    assert_eq!(events[12]["data"], kept);
    assert_eq!(events[14]["data"], json!({"snapshot_ids": [s0]}));
    let refused = &events[15];
    assert_eq!(
        refused["data"]["code"],
        json!("invalid_transition"),
        "{refused}"
    );
    assert_eq!(refused["data"]["state"], json!("Inactive"), "{refused}");
    assert_eq!(refused["job_version"], Value::Null, "{refused}");
    h.stop_and_verify(16).await;
}

/// RFC 3339, whole seconds, `Z`: how bcp prints such a time.
fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The retention sweeper of a running server (`--sweep-interval 1`): due
/// snapshots of every job (a Stopped one included) leave the catalog by
/// `SnapshotExpired` events with actor `bcp-sweeper`; a due `do_not_delete`
/// snapshot stays; sweeps with nothing due append nothing.
#[tokio::test]
async fn sweeper_expires_due_snapshots() {
    let mut h = Harness::start_with(&["--sweep-interval", "1"]).await;
    let (j, j2) = (id(), id());
    // Daily, weekly and monthly retention off: every snapshot of these
    // jobs expires 2 days (base retention) after it was taken.
    let base_only = json!({"weekly_retention_weeks": 0, "monthly_retention_months": 0});
    let mut seq = 0;
    for (n, job) in [j, j2].into_iter().enumerate() {
        let mut create = create_body(id(), job, &format!("rs{n}"));
        create["schedule"] = base_only.clone();
        let r = h.cmd("p1", "create", &create).await;
        assert_eq!(r, accepted(Some(job), Some(1), &[(seq + 1, "JobCreated")]));
        let r = h.cmd("p1", "start", &job_body(id(), job)).await;
        assert_eq!(r, accepted(Some(job), Some(2), &[(seq + 2, "JobStarted")]));
        seq += 2;
    }
    let t0 = Utc::now().trunc_subsecs(0);
    let secs = ChronoDuration::seconds;
    let taken_to_expire_at = |expires: DateTime<Utc>| rfc3339(expires - ChronoDuration::days(2));
    let (d, s, k, r2, r) = (id(), id(), id(), id(), id());
    // Far enough ahead that the setup below is done before anything falls
    // due, even on a loaded machine running every test at once.
    let (d_due, s_due) = (t0 + secs(8), t0 + secs(9));
    let record = async |job: Uuid, snap: Uuid, taken_at: String, version: u64, seq: u64| {
        let reply = h
            .cmd(
                "p1",
                "record-snapshot",
                &record_body(job, snap, &taken_at, 1),
            )
            .await;
        assert_eq!(
            reply,
            accepted(Some(job), Some(version), &[(seq, "SnapshotRecorded")]),
            "record {snap} taken at {taken_at}"
        );
    };
    // D: due in 8 s, made do_not_delete well before that.
    record(j, d, taken_to_expire_at(d_due), 3, 5).await;
    let mut keep = snapshot_body(j, d);
    keep["do_not_delete"] = json!(true);
    let reply = h.cmd("p1", "set-snapshot-expiry", &keep).await;
    assert_eq!(
        reply,
        accepted(Some(j), Some(4), &[(6, "SnapshotExpiryChanged")])
    );
    // S, and R2 of a job that is then stopped: due in 9 s. K: not for days.
    record(j, s, taken_to_expire_at(s_due), 5, 7).await;
    record(j, k, rfc3339(t0 + ChronoDuration::days(1)), 6, 8).await;
    record(j2, r2, taken_to_expire_at(s_due), 3, 9).await;
    let reply = h.cmd("p1", "stop", &job_body(id(), j2)).await;
    assert_eq!(reply, accepted(Some(j2), Some(4), &[(10, "JobStopped")]));
    // R: due for weeks; recorded last, so the next sweep's event is seq 12.
    let r_taken = t0 - ChronoDuration::days(30);
    record(j, r, rfc3339(r_taken), 7, 11).await;

    // The sweeper expires R at once, then S and R2 (both in one sweep: they
    // fall due together) once their time has come; D stays.
    let deadline = support::Deadline::new(
        "the sweeper to expire R, S and R2",
        std::time::Duration::from_secs(40),
    );
    loop {
        let left: Vec<Value> = h
            .snapshots(j)
            .await
            .iter()
            .map(|e| e["snapshot_id"].clone())
            .collect();
        if left == [json!(d), json!(k)] {
            break;
        }
        assert!(left.contains(&json!(d)), "D was expired: {left:?}");
        deadline.tick().await;
    }
    let catalog = h.snapshots(j).await;
    assert_eq!(
        catalog,
        [
            // D, the job's first snapshot: first daily, weekly and monthly.
            json!({
                "snapshot_id": d, "taken_at": taken_to_expire_at(d_due), "size_bytes": 1,
                "classes": ["base", "daily", "weekly", "monthly"], "expires_at": rfc3339(d_due),
                "do_not_delete": true,
            }),
            // K's classes depend on today's date (its ISO week and month).
            json!({
                "snapshot_id": k, "taken_at": rfc3339(t0 + ChronoDuration::days(1)),
                "size_bytes": 1, "classes": catalog[1]["classes"],
                "expires_at": rfc3339(t0 + ChronoDuration::days(3)), "do_not_delete": false,
            }),
        ]
    );
    assert!(h.snapshots(j2).await.is_empty());
    let view2 = h.job(j2).await;
    assert_eq!(
        (&view2["state"], &view2["snapshot_count"], &view2["version"]),
        (&json!("Stopped"), &json!(0), &json!(5)),
        "{view2}"
    );

    // Exactly three SnapshotExpired events (seqs 12-14), by the sweeper:
    // the sweeps between R's and S's expiry, and those that saw D due,
    // appended nothing (the stream never goes past 14).
    let events = h.caught_up_stream(14).await;
    let ours: Vec<&Value> = events[..11].iter().map(|e| &e["command_id"]).collect();
    let mut expired: Vec<(Value, Value, Value)> = Vec::new();
    for e in &events[11..] {
        assert_eq!(e["type"], json!("SnapshotExpired"), "{e}");
        assert_eq!(e["actor"], json!("bcp-sweeper"), "{e}");
        assert_eq!(e["project_id"], json!("p1"), "{e}");
        assert!(!ours.contains(&&e["command_id"]), "{e}");
        expired.push((
            e["job_id"].clone(),
            e["data"]["snapshot_id"].clone(),
            e["data"]["expires_at"].clone(),
        ));
    }
    expired.sort_by_key(|x| x.1.to_string());
    let mut want = vec![
        (
            json!(j),
            json!(r),
            json!(rfc3339(r_taken + ChronoDuration::days(2))),
        ),
        (json!(j), json!(s), json!(rfc3339(s_due))),
        (json!(j2), json!(r2), json!(rfc3339(s_due))),
    ];
    want.sort_by_key(|x| x.1.to_string());
    assert_eq!(expired, want);
    let by_snapshot = |snap: Uuid| {
        events[11..]
            .iter()
            .find(|e| e["data"]["snapshot_id"] == json!(snap))
            .expect("expired")
    };
    let (s_event, r2_event) = (by_snapshot(s), by_snapshot(r2));
    assert_eq!(s_event["command_id"], r2_event["command_id"], "one sweep");
    // The sweep that expired S ran at or after S's expiry, later than D's:
    // D was due then, and kept.
    let s_swept: DateTime<Utc> = s_event["recorded_at"].as_str().unwrap().parse().unwrap();
    assert!(s_swept >= s_due && d_due < s_due, "{s_event}");

    // The history names the sweeper and its verb; the Stopped job's
    // snapshot expired without a state change.
    for job in [j, j2] {
        let history = h.history(job).await;
        let swept: Vec<_> = history
            .iter()
            .filter(|e| e["type"] == json!("SnapshotExpired"))
            .collect();
        assert_eq!(swept.len(), if job == j { 2 } else { 1 }, "{history:?}");
        for e in swept {
            assert_eq!(e["actor"], json!("bcp-sweeper"), "{e}");
            assert_eq!(e["verb"], json!("expire-snapshots"), "{e}");
            assert_eq!(e["from"], e["to"], "{e}");
        }
    }

    // Still nothing appended by the sweeps since: the next event is seq 15.
    let reply = h.cmd("p1", "stop", &job_body(id(), j)).await;
    assert_eq!(reply, accepted(Some(j), Some(10), &[(15, "JobStopped")]));
    h.caught_up_stream(15).await;
    // The sweep logs as a sweep, not as someone's fire-and-forget command.
    let log = h.bcp_log_text();
    assert!(log.contains("retention sweep: expired snapshots"), "{log}");
    assert!(!log.contains("command without reply subject"), "{log}");
    h.stop_and_verify(15).await;
}

/// Audit from the published stream: after a workload (regions, jobs in two
/// projects, snapshots, expiry, a rejection), `bcp import --from-nats`
/// rebuilds a store with the original's digest, `audit verify
/// --against-nats` finds store and stream equal, and `replay --from-nats`
/// equals `replay --db` (whole log, at a cut, for one job). The rebuilt
/// store serves: retries get their first replies, nothing is republished,
/// and `replay --from-nats` works while it runs.
#[tokio::test]
async fn rebuild_and_audit_from_nats() {
    let mut h = Harness::start().await;
    let url = h.nats.url();
    let (j1, j2, j3) = (id(), id(), id());
    let (a1, a2, b1) = (id(), id(), id());
    let mut head = 0u64;
    // Counts what a reply appended: its events, or its recorded rejection.
    let mut count = |r: &Value| {
        if r["ok"] == json!(true) {
            head += r["events"].as_array().map_or(0, Vec::len) as u64;
        } else {
            assert_eq!(r["rejection_seq"], json!(head + 1), "{r}");
            head += 1;
        }
        head
    };
    count(
        &h.cmd(
            "_admin",
            "configure-region",
            &json!({"command_id": id(), "region": "eu",
                    "snapshot_store": "s", "oplog_store": "o", "sync_store": "y"}),
        )
        .await,
    );
    let create_j1 = create_body(id(), j1, "rs1");
    let created_j1 = h.cmd("p1", "create", &create_j1).await;
    count(&created_j1);
    count(&h.cmd("p1", "start", &job_body(id(), j1)).await);
    count(
        &h.cmd(
            "p1",
            "record-snapshot",
            &record_body(j1, a1, "2027-03-01T00:00:00Z", 100),
        )
        .await,
    );
    count(
        &h.cmd(
            "p1",
            "record-snapshot",
            &record_body(j1, a2, "2027-03-01T06:00:00Z", 200),
        )
        .await,
    );
    let mut keep = snapshot_body(j1, a1);
    keep["do_not_delete"] = json!(true);
    let cut = count(&h.cmd("p1", "set-snapshot-expiry", &keep).await);
    assert_eq!(cut, 6);
    let mut create_j2 = create_body(id(), j2, "rs2");
    create_j2["region"] = json!("eu");
    count(&h.cmd("p2", "create", &create_j2).await);
    count(&h.cmd("p2", "start", &job_body(id(), j2)).await);
    count(
        &h.cmd(
            "p2",
            "record-snapshot",
            &record_body(j2, b1, "2027-03-01T00:00:00Z", 300),
        )
        .await,
    );
    let start_again = job_body(id(), j1);
    let refused = h.cmd("p1", "start", &start_again).await;
    rejected(&refused, "invalid_transition", Some(10));
    count(&refused);
    count(&h.cmd("p1", "stop", &job_body(id(), j1)).await);
    count(
        &h.cmd(
            "p2",
            "expire-snapshots",
            &json!({"command_id": id(), "now": "2028-01-01T00:00:00Z"}),
        )
        .await,
    );
    count(&h.cmd("p1", "create", &create_body(id(), j3, "rs3")).await);
    assert_eq!(head, 13);
    let events = h.caught_up_stream(head).await;

    // While bcp serve runs, the stream is the auditor's log.
    let replay_from_nats = |extra: &[&str]| {
        let mut args = vec!["replay", "--from-nats", url.as_str(), "--format", "json"];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            support::bcp_cli_json(&args).await
        }
    };
    let live = replay_from_nats(&[]).await;
    assert_eq!(live["as_of_seq"], json!(head));
    let jobs: Vec<&Value> = live["jobs"].as_array().unwrap().iter().collect();
    assert_eq!(jobs.len(), 3, "{live}");
    assert_eq!(
        live["snapshots"][j1.to_string()].as_array().unwrap().len(),
        2
    );
    assert_eq!(live["snapshots"][j2.to_string()], json!([]), "expired");
    assert_eq!(live["snapshots"][j3.to_string()], json!([]));
    let db = h.db();
    let db = db.to_str().unwrap().to_owned();
    let (code, _, err) = support::bcp_cli_text(&["audit", "digest", "--db", &db]).await;
    assert_eq!(code, Some(1), "digest of a live store: {err}");
    assert!(err.contains("in use"), "{err}");

    let status = h.stop_bcp().await;
    assert_eq!(status.code(), Some(0));
    let digest = support::bcp_cli_ok(&["audit", "digest", "--db", &db]).await;
    let digest = digest.trim().to_owned();
    assert_eq!(
        digest,
        format!("{head}:{}", events[12]["hash"].as_str().unwrap())
    );

    // Rebuild from the stream into a new store: the same log.
    let restored = h.path("restored.redb");
    let restored = restored.to_str().unwrap().to_owned();
    let out = support::bcp_cli_ok(&["import", "--db", &restored, "--from-nats", &url]).await;
    assert!(
        out.starts_with(&format!(
            "ok: imported {head} events into {restored}, head seq {head} "
        )),
        "{out}"
    );
    assert_eq!(
        support::bcp_cli_ok(&["audit", "digest", "--db", &restored])
            .await
            .trim(),
        digest
    );
    let out = support::bcp_cli_ok(&["audit", "verify", "--db", &restored]).await;
    assert!(
        out.starts_with(&format!("ok: {head} events verified, head seq {head} ")),
        "{out}"
    );
    // A second import into it is refused: it holds a log.
    let (code, out, err) =
        support::bcp_cli_text(&["import", "--db", &restored, "--from-nats", &url]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("already holds a log"), "{err}");
    let out = support::bcp_cli_ok(&["audit", "verify", "--db", &db, "--against-nats", &url]).await;
    assert!(
        out.starts_with(&format!("ok: {head} events verified, head seq {head} ")),
        "{out}"
    );
    // It says that the stream was compared, not only the store verified.
    assert!(
        out.trim_end().ends_with(&format!(
            "; stream BCP_EVENTS at {url} holds the same bytes"
        )),
        "{out}"
    );
    // Copies of the log's first three events in streams of their own (one
    // that allows deletes; its subjects carried over by a transform, since
    // only BCP_EVENTS may listen on bcp.evt.>), each as `alter` publishes
    // them.
    let log = h.js.get_stream(support::STREAM).await.unwrap();
    let copy = |name: &'static str, alter: fn(u64, &mut String, &mut async_nats::HeaderMap)| {
        let (js, log) = (h.js.clone(), log.clone());
        async move {
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.into(),
                subjects: vec![format!("{name}.>")],
                subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
                    source: format!("{name}.>"),
                    destination: "bcp.evt.>".into(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
            for seq in 1..=3 {
                let m = log.get_raw_message(seq).await.unwrap();
                let mut subject = m.subject.replacen("bcp.evt", name, 1);
                let mut headers = m.headers.clone();
                alter(seq, &mut subject, &mut headers);
                js.publish_with_headers(subject, headers, m.payload)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
            js.get_stream(name).await.unwrap()
        }
    };
    // Message 2 deleted, and the last message (3) deleted: each named at
    // once, not waited for.
    for (name, deleted) in [("HOLE", 2), ("TAIL", 3)] {
        let stream = copy(name, |_, _, _| {}).await;
        assert!(stream.delete_message(deleted).await.unwrap());
    }
    // The same bytes published otherwise than bcp publishes them: on
    // another subject (a consumer filtering by project misses it), without
    // the event's id as Nats-Msg-Id, with another Bcp-Seq.
    copy("ELSEWHERE", |seq, subject, _| {
        if seq == 2 {
            *subject = "ELSEWHERE.elsewhere.x.JobCreated".into();
        }
    })
    .await;
    copy("NO_ID", |seq, _, headers| {
        if seq == 2 {
            headers.insert("Nats-Msg-Id", "not-the-event-id");
        }
    })
    .await;
    copy("BAD_SEQ", |seq, _, headers| {
        if seq == 2 {
            headers.insert("Bcp-Seq", "7");
        }
    })
    .await;
    let started = std::time::Instant::now();
    // And a stream that is not there: a failure of the comparison, not of
    // an event, so no seq named (it said "seq 0").
    for (stream, says) in [
        ("NO_SUCH", "FAILED: cannot read the stream: stream NO_SUCH"),
        ("HOLE", "seq 2: the stream holds sequence 3 here"),
        (
            "ELSEWHERE",
            "seq 2: published on bcp.evt.elsewhere.x.JobCreated, but its event belongs on bcp.evt.p1.",
        ),
        (
            "NO_ID",
            "seq 2: its Nats-Msg-Id header is Some(\"not-the-event-id\"), not its event id",
        ),
        (
            "BAD_SEQ",
            "seq 2: its Bcp-Seq header is Some(\"7\"), not its stream sequence 2",
        ),
    ] {
        let args = [
            "audit",
            "verify",
            "--db",
            &db,
            "--against-nats",
            &url,
            "--stream",
            stream,
        ];
        let (code, out, err) = support::bcp_cli_text(&args).await;
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(
            out.starts_with(says) || out.contains(says),
            "{args:?}: {out}{err}"
        );
    }
    for (args, says) in [
        (
            vec!["replay", "--from-nats", &url, "--stream", "HOLE"],
            "seq 2: stream holds sequence 3 here",
        ),
        (
            vec!["replay", "--from-nats", &url, "--stream", "ELSEWHERE"],
            "seq 2: published on bcp.evt.elsewhere.x.JobCreated",
        ),
        (
            vec!["replay", "--from-nats", &url, "--stream", "TAIL"],
            "FAILED: cannot read the stream: stream TAIL's last sequence is 3, but its messages after 2 were removed",
        ),
    ] {
        let (code, out, err) = support::bcp_cli_text(&args).await;
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(out.contains(says), "{args:?}: {out}{err}");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // Replay from the stream equals replay of the store: whole, at a cut,
    // for one job.
    let replay_db = |path: String, extra: &[&str]| {
        let mut args = vec!["replay".to_owned(), "--db".to_owned(), path];
        args.extend(["--format", "json"].map(str::to_owned));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            support::bcp_cli_json(&args).await
        }
    };
    let full = replay_db(db.clone(), &[]).await;
    assert_eq!(full, live);
    assert_eq!(replay_from_nats(&[]).await, full);
    assert_eq!(replay_db(restored.clone(), &[]).await, full);
    let cut_s = cut.to_string();
    let at_cut = replay_db(db.clone(), &["--until-seq", &cut_s]).await;
    assert_eq!(replay_from_nats(&["--until-seq", &cut_s]).await, at_cut);
    assert_eq!(at_cut["as_of_seq"], json!(cut));
    let cut_jobs = at_cut["jobs"].as_array().unwrap();
    assert_eq!(cut_jobs.len(), 1, "{at_cut}");
    assert_eq!(
        (
            &cut_jobs[0]["job_id"],
            &cut_jobs[0]["state"],
            &cut_jobs[0]["version"]
        ),
        (&json!(j1), &json!("Active"), &json!(5))
    );
    let cut_snaps = at_cut["snapshots"][j1.to_string()].as_array().unwrap();
    let flags: Vec<(&Value, &Value)> = cut_snaps
        .iter()
        .map(|s| (&s["snapshot_id"], &s["do_not_delete"]))
        .collect();
    assert_eq!(
        flags,
        [(&json!(a1), &json!(true)), (&json!(a2), &json!(false))]
    );
    let j1_s = j1.to_string();
    let one = replay_db(db.clone(), &["--job", &j1_s]).await;
    assert_eq!(replay_from_nats(&["--job", &j1_s]).await, one);
    assert_eq!(one["jobs"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["jobs"][0]["state"], json!("Stopped"));

    // The rebuilt store replaces the original and serves.
    std::fs::rename(&db, h.path("original.redb")).unwrap();
    std::fs::rename(&restored, &db).unwrap();
    h.start_bcp().await;
    assert_eq!(
        h.cmd("p1", "create", &create_j1).await,
        as_duplicate(&created_j1)
    );
    assert_eq!(
        h.cmd("p1", "start", &start_again).await,
        as_duplicate(&refused)
    );
    assert_eq!(h.history(j1).await.len(), 7);
    let r = h.cmd("p1", "start", &job_body(id(), j1)).await;
    assert_eq!(r, accepted(Some(j1), Some(7), &[(head + 1, "JobStarted")]));
    head += 1;
    // Published once: the relay resumed after the stream's last message.
    h.caught_up_stream(head).await;
    let now = replay_from_nats(&[]).await;
    assert_eq!(now["as_of_seq"], json!(head));
    let j1_now = now["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["job_id"] == json!(j1))
        .unwrap();
    assert_eq!(j1_now["state"], json!("Active"));
    let before = (head - 1).to_string();
    assert_eq!(replay_from_nats(&["--until-seq", &before]).await, full);
    h.stop_and_verify(head).await;
    support::bcp_cli_ok(&["audit", "verify", "--db", &db, "--against-nats", &url]).await;
}

/// `bcp snapshots JOB` through NATS: the table (one row per snapshot, in
/// time order, `do_not_delete` in place of an expiry) and `--format json`
/// (the catalog of `bcp.query.snapshots`); exit 1 for an unknown job, 2 for
/// a malformed one, 3 without a server; `--db` on the stopped store agrees.
#[tokio::test]
async fn snapshots_cli() {
    let mut h = Harness::start().await;
    let url = h.nats.url();
    let (job, s1, s2) = (id(), id(), id());
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    let r = h
        .cmd(
            "p1",
            "record-snapshot",
            &record_body(job, s2, "2027-03-02T06:30:00Z", 2048),
        )
        .await;
    assert_eq!(r, accepted(Some(job), Some(3), &[(3, "SnapshotRecorded")]));
    let r = h
        .cmd(
            "p1",
            "record-snapshot",
            &record_body(job, s1, "2027-03-01T00:00:00Z", 1024),
        )
        .await;
    assert_eq!(r, accepted(Some(job), Some(4), &[(4, "SnapshotRecorded")]));
    let mut keep = snapshot_body(job, s2);
    keep["do_not_delete"] = json!(true);
    let r = h.cmd("p1", "set-snapshot-expiry", &keep).await;
    assert_eq!(
        r,
        accepted(Some(job), Some(5), &[(5, "SnapshotExpiryChanged")])
    );
    let catalog = h.snapshots(job).await;
    assert_eq!(
        catalog,
        [
            // Taken first but recorded second: the week and the month
            // already had theirs (classes go by recording order), and a
            // daily is kept no longer than a base snapshot by default.
            catalog_entry(
                s1,
                "2027-03-01T00:00:00Z",
                1024,
                &["base", "daily"],
                "2027-03-03T00:00:00Z",
                false
            ),
            catalog_entry(
                s2,
                "2027-03-02T06:30:00Z",
                2048,
                &["base", "daily", "weekly", "monthly"],
                "2027-03-30T06:30:00Z",
                true
            ),
        ]
    );

    let j = job.to_string();
    let table = support::bcp_cli_ok(&["snapshots", &j, "--nats", &url]).await;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let (s1, s2) = (s1.to_string(), s2.to_string());
    assert_eq!(
        rows,
        [
            vec!["SNAPSHOT", "TAKEN", "EXPIRES", "BYTES", "CLASSES"],
            vec![
                s1.as_str(),
                "2027-03-01T00:00Z",
                "2027-03-03T00:00Z",
                "1024",
                "base,daily"
            ],
            vec![
                s2.as_str(),
                "2027-03-02T06:30Z",
                "do_not_delete",
                "2048",
                "base,daily,weekly,monthly"
            ],
        ],
        "{table}"
    );
    let json_out =
        support::bcp_cli_json(&["snapshots", &j, "--nats", &url, "--format", "json"]).await;
    assert_eq!(json_out, json!(catalog));

    let unknown = id().to_string();
    let (code, out, err) = support::bcp_cli_text(&["snapshots", &unknown, "--nats", &url]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains(&format!("no job {unknown}")), "{err}");
    let (code, _, err) = support::bcp_cli_text(&["snapshots", "not-a-job", "--nats", &url]).await;
    assert_eq!(code, Some(2), "{err}");
    let closed = format!("nats://127.0.0.1:{}", free_port());
    let (code, out, err) = support::bcp_cli_text(&["snapshots", &j, "--nats", &closed]).await;
    assert_eq!(code, Some(3), "{out}{err}");

    h.caught_up_stream(5).await;
    h.stop_and_verify(5).await;
    let db = h.db();
    let from_db = support::bcp_cli_json(&[
        "snapshots",
        &j,
        "--db",
        db.to_str().unwrap(),
        "--format",
        "json",
    ])
    .await;
    assert_eq!(from_db, json_out);
}

// ---- the NATS service API, the Python producer, auth ---------------------------------------

#[tokio::test]
async fn service_api_is_discoverable_with_stats() {
    let h = Harness::start().await;
    let job = id();
    assert_eq!(
        h.cmd("p1", "create", &create_body(id(), job, "rs0")).await["ok"],
        json!(true)
    );
    assert_eq!(
        h.cmd("p1", "start", &json!({"command_id": id(), "job_id": job}))
            .await["ok"],
        json!(true)
    );
    let refused = h
        .cmd("p1", "start", &json!({"command_id": id(), "job_id": job}))
        .await;
    assert_eq!(refused["error"]["code"], json!("invalid_transition"));
    let bad = h.cmd("p1", "start", &json!({"nope": 1})).await;
    assert_eq!(bad["error"]["code"], json!("bad_request"));
    h.query("job", &json!({"job_id": job})).await;

    let ping = h.request("$SRV.PING.bcp", &json!({})).await;
    assert_eq!(ping["type"], json!("io.nats.micro.v1.ping_response"));
    assert_eq!(
        (ping["name"].clone(), ping["version"].clone()),
        (json!("bcp"), json!(env!("CARGO_PKG_VERSION")))
    );

    let info = h.request("$SRV.INFO.bcp", &json!({})).await;
    let endpoints: std::collections::BTreeMap<String, String> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let verbs = bcp::domain::Verb::ALL.map(|v| v.as_str());
    for verb in verbs {
        assert_eq!(
            endpoints.get(verb),
            Some(&format!("bcp.cmd.*.{verb}")),
            "{info}"
        );
    }
    for q in ["job", "jobs", "snapshots", "history"] {
        assert_eq!(
            endpoints.get(&format!("query-{q}")),
            Some(&format!("bcp.query.*.{q}")),
            "{info}"
        );
    }
    assert_eq!(endpoints.len(), verbs.len() + 4);

    let stats = h.request("$SRV.STATS.bcp", &json!({})).await;
    let by_name = |name: &str| {
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == json!(name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    let start = by_name("start");
    // The readiness probe of the harness is a bad_request on start too.
    assert!(start["num_requests"].as_u64().unwrap() >= 3, "{start}");
    assert!(start["processing_time"].as_u64().unwrap() > 0, "{start}");
    assert_eq!(
        start["data"]["rejections"]["invalid_transition"],
        json!(1),
        "{start}"
    );
    assert!(
        start["data"]["rejections"]["bad_request"].as_u64().unwrap() >= 1,
        "{start}"
    );
    // Bad requests are the endpoint's errors (in data: NATS micro's own
    // count is for replies without a body).
    assert_eq!(
        start["data"]["errors"], start["data"]["rejections"]["bad_request"],
        "{start}"
    );
    assert_eq!(by_name("create")["data"]["errors"], json!(0));
    assert_eq!(by_name("create")["num_requests"], json!(1));
    assert_eq!(by_name("create")["data"]["rejections"], json!({}));
    assert_eq!(by_name("query-job")["num_requests"], json!(1));
    let lag = by_name("create")["data"]["relay_lag"]
        .as_u64()
        .expect("relay_lag");
    assert!(lag <= 3, "{lag}");
}

#[tokio::test]
async fn python_producer_example_runs_against_bcp() {
    let h = Harness::start().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pylib = root.join(".tools/pylib");
    let pythonpath = match std::env::var("PYTHONPATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", pylib.display()),
        _ => pylib.display().to_string(),
    };
    let has_nats = std::process::Command::new("python3")
        .args(["-c", "import nats, blake3"])
        .env("PYTHONPATH", &pythonpath)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        has_nats,
        "python3 with nats-py and blake3 is needed for examples/producer.py and \
         examples/verify_log.py: run `just py-deps` (pip install --target .tools/pylib nats-py blake3)"
    );
    let out = tokio::process::Command::new("python3")
        .arg(root.join("examples/producer.py"))
        .args(["--url", &h.nats.url(), "--project", "py"])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "producer.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("start (retry)    ok  duplicate=True"),
        "{stdout}"
    );
    let job: Uuid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("job ").and_then(|r| r.strip_suffix(" done")))
        .unwrap_or_else(|| panic!("no job id in:\n{stdout}"))
        .parse()
        .unwrap();
    let view = h.job(job).await;
    assert_eq!(
        (
            view["project_id"].clone(),
            view["state"].clone(),
            view["version"].clone(),
            view["snapshot_count"].clone()
        ),
        (json!("py"), json!("Stopped"), json!(4), json!(1))
    );
    let history = h.history(job).await;
    let kinds: Vec<&str> = history
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "JobCreated",
            "JobStarted",
            "CommandRejected",
            "SnapshotRecorded",
            "JobStopped"
        ]
    );
    assert_eq!(history[0]["actor"], json!("producer.py"));

    // The hash chain recomputed from the README's rule alone, in Python,
    // on a real exported log (issue 15), a non-ASCII actor included.
    let mut body = job_body(id(), job);
    body["actor"] = json!("zoë ✓ \"quoted\"");
    h.cmd("py", "start", &body).await;
    let mut h = h;
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    let log = h.path("log.jsonl");
    let (db, out) = (h.db(), log.to_str().unwrap().to_owned());
    support::bcp_cli_ok(&["export", "--db", db.to_str().unwrap(), "--out", &out]).await;
    let verify = |path: std::path::PathBuf| {
        std::process::Command::new("python3")
            .arg(root.join("examples/verify_log.py"))
            .arg(path)
            .env("PYTHONPATH", &pythonpath)
            .output()
            .expect("run python3")
    };
    let ok = verify(log.clone());
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(said.starts_with("ok: 6 events, head hash "), "{said}");
    let text = std::fs::read_to_string(&log).unwrap();
    let tampered = h.path("tampered.jsonl");
    std::fs::write(&tampered, text.replacen("zoë", "zoe", 1)).unwrap();
    let bad = verify(tampered);
    assert!(!bad.status.success(), "a changed actor must not verify");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("seq 6: hash does not match"));
}

/// A child process killed when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect_as(
    url: &str,
    user: &str,
    password: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .request_timeout(Some(std::time::Duration::from_secs(3)))
        .connect(url)
        .await
}

#[tokio::test]
async fn auth_limits_producers_to_their_project_and_records_verified_actors() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nats-server.conf");
    let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
    let _nats = Proc(
        std::process::Command::new(support::nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .args(["-p", &port.to_string(), "-sd"])
            .arg(dir.path().join("js"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = support::Deadline::new("nats-server with the example config", support::STARTUP);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        deadline.tick().await;
    }
    // Credentials from the environment for serve; from flags for send below.
    let db = dir.path().join("bcp.redb");
    let bcp_log = std::fs::File::create(dir.path().join("bcp.log")).unwrap();
    let mut serve = Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
            .args(["serve", "--trust-request-info", "--nats", &url, "--db"])
            .arg(&db)
            .env("BCP_NATS_USER", "bcp")
            .env("BCP_NATS_PASSWORD", "bcp-secret")
            .env("RUST_LOG", "info")
            .stdout(bcp_log.try_clone().unwrap())
            .stderr(bcp_log)
            .spawn()
            .unwrap(),
    );
    // Without credentials nobody gets in.
    assert!(
        connect_as(&url, "alice", "wrong").await.is_err(),
        "a wrong password is refused"
    );
    let alice = connect_as(&url, "alice", "alice-secret").await.unwrap();
    let bob = connect_as(&url, "bob", "bob-secret").await.unwrap();
    let ask = |c: &async_nats::Client, subject: String, body: Value| {
        let c = c.clone();
        async move {
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                c.request(subject, serde_json::to_vec(&body).unwrap().into()),
            )
            .await;
            match r {
                Ok(Ok(m)) => Ok(serde_json::from_slice::<Value>(&m.payload).unwrap()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            }
        }
    };
    let deadline = support::Deadline::new("bcp serve behind auth", support::STARTUP);
    loop {
        if let Ok(r) = ask(&alice, "bcp.query.p1.jobs".into(), json!({})).await
            && r["ok"] == json!(true)
        {
            break;
        }
        if let Some(status) = serve.0.try_wait().unwrap() {
            panic!(
                "bcp serve exited with {status}: {}",
                std::fs::read_to_string(dir.path().join("bcp.log")).unwrap()
            );
        }
        deadline.tick().await;
    }

    // alice commands p1; the body's actor claim is replaced by her identity.
    let (ja, jb) = (id(), id());
    let mut body = create_body(id(), ja, "rs-a");
    body["actor"] = json!("mallory");
    let r = ask(&alice, "bcp.cmd.p1.create".into(), body).await.unwrap();
    assert_eq!(r["ok"], json!(true), "{r}");
    // alice cannot command p2: her publish is refused by nats-server.
    let denied = ask(
        &alice,
        "bcp.cmd.p2.create".into(),
        create_body(id(), id(), "rs-x"),
    )
    .await;
    assert!(
        denied.is_err() || denied.as_ref().unwrap()["ok"] != json!(true),
        "{denied:?}"
    );
    // bob can, through the CLI with credentials as flags.
    let jb_text = jb.to_string();
    let as_bob = [
        "--nats",
        &url,
        "--nats-user",
        "bob",
        "--nats-password",
        "bob-secret",
    ];
    let create = [
        "--inbox-prefix",
        "_INBOX_bob",
        "--project",
        "p2",
        "--job",
        &jb_text,
    ];
    let kind = ["--kind", "replica_set", "--name", "rs-b"];
    let out = bcp_cli(&[&["send", "create"][..], &as_bob, &create, &kind].concat()).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // bob's replies without his inbox prefix, and his command to alice's
    // project: nats-server refuses them, which the request alone would
    // only see as a timeout. Exit 3, saying what NATS refused.
    for (project, inbox) in [("p2", None), ("p1", Some("_INBOX_bob"))] {
        let mut args = [&["send", "start"][..], &as_bob].concat();
        args.extend(["--project", project, "--job", &jb_text, "--timeout", "1"]);
        args.extend(inbox.map(|i| ["--inbox-prefix", i]).into_iter().flatten());
        let out = bcp_cli(&args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        let what = if inbox.is_none() {
            "Subscription"
        } else {
            "Publish"
        };
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains(&format!("Permissions Violation for {what}"))
                && err.contains("--inbox-prefix"),
            "{project}: {err}"
        );
    }
    // bob may neither ask for bcp.status nor watch the events: both say
    // what NATS refused (not "is bcp serve running?", not a silent wait).
    let inbox = ["--inbox-prefix", "_INBOX_bob"];
    for (cmd, what) in [("status", "Publish"), ("watch", "Subscription")] {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            bcp_cli(&[&[cmd][..], &as_bob, &inbox].concat()),
        )
        .await
        .unwrap_or_else(|_| panic!("bcp {cmd} did not stop on the refusal"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{cmd}: {err}");
        assert!(
            err.contains(&format!("Permissions Violation for {what}"))
                && !err.contains("command-id"),
            "{cmd}: {err}"
        );
    }
    // The first was applied all the same (only its reply was refused),
    // as the message says it may have been.
    let r = ask(&bob, "bcp.query.p2.job".into(), json!({"job_id": jb}))
        .await
        .unwrap();
    assert_eq!(r["job"]["state"], json!("Active"), "{r}");
    // Without credentials the CLI cannot reach bcp at all: exit 3.
    let out = bcp_cli(&[
        "send",
        "start",
        "--nats",
        &url,
        "--project",
        "p2",
        "--job",
        &jb.to_string(),
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let p2 = ask(
        &bob,
        "bcp.query.p2.jobs".into(),
        json!({"project_id": "p2"}),
    )
    .await
    .unwrap();
    assert_eq!(
        p2["jobs"].as_array().unwrap().len(),
        1,
        "only bob's job in p2: {p2}"
    );
    assert_eq!(p2["jobs"][0]["job_id"], json!(jb));

    // The log records who NATS says sent each command.
    let h = ask(&alice, "bcp.query.p1.history".into(), json!({"job_id": ja}))
        .await
        .unwrap();
    assert_eq!(
        (
            h["history"][0]["actor"].clone(),
            h["history"][0]["actor_verified"].clone()
        ),
        (json!("alice@PRODUCERS"), json!(true)),
        "{h}"
    );
    let h = ask(&bob, "bcp.query.p2.history".into(), json!({"job_id": jb}))
        .await
        .unwrap();
    assert_eq!(
        (
            h["history"][0]["actor"].clone(),
            h["history"][0]["actor_verified"].clone()
        ),
        (json!("bob@PRODUCERS"), json!(true)),
        "{h}"
    );

    // Reads are scoped like commands (issue 15): alice reads only p1. A
    // query on p2's subject is refused by nats-server; p2's job asked for
    // on p1's subject is not_found, exactly as a job that does not exist.
    let listed = ask(&alice, "bcp.query.p1.jobs".into(), json!({}))
        .await
        .unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["jobs"][0]["job_id"], json!(ja));
    let denied = ask(&alice, "bcp.query.p2.jobs".into(), json!({})).await;
    assert!(
        denied.is_err() || denied.as_ref().unwrap()["ok"] != json!(true),
        "{denied:?}"
    );
    for kind in ["job", "snapshots", "history"] {
        let r = ask(
            &alice,
            format!("bcp.query.p1.{kind}"),
            json!({"job_id": jb}),
        )
        .await
        .unwrap();
        let other = id();
        let missing = ask(
            &alice,
            format!("bcp.query.p1.{kind}"),
            json!({"job_id": other}),
        )
        .await
        .unwrap();
        // Another project's job reads exactly as a missing one.
        assert_eq!(
            r["error"],
            json!({"code": "not_found", "message": format!("no job {jb}")}),
            "{kind}: {r}"
        );
        assert_eq!(
            missing["error"],
            json!({"code": "not_found", "message": format!("no job {other}")})
        );
    }
    let widened = ask(
        &alice,
        "bcp.query.p1.jobs".into(),
        json!({"project_id": "p2"}),
    )
    .await
    .unwrap();
    assert_eq!(widened["error"]["code"], json!("bad_request"), "{widened}");
    // ops reads every project through _admin, and commands none.
    let ops = connect_as(&url, "ops", "ops-secret").await.unwrap();
    let all = ask(&ops, "bcp.query._admin.jobs".into(), json!({}))
        .await
        .unwrap();
    assert_eq!(all["jobs"].as_array().unwrap().len(), 2, "{all}");
    let r = ask(
        &ops,
        "bcp.cmd.p1.start".into(),
        json!({"command_id": id(), "job_id": ja}),
    )
    .await;
    assert!(r.is_err(), "ops cannot command: {r:?}");

    // A verified actor cannot be forged from inside the BCP account
    // (issue 15): a command published there would carry the sender's own
    // Nats-Request-Info claim, so the example config lets no user of that
    // account publish commands; this one is refused and records nothing.
    let insider = connect_as(&url, "bcp", "bcp-secret").await.unwrap();
    let mut forged = async_nats::HeaderMap::new();
    forged.insert("Nats-Request-Info", r#"{"acc":"PRODUCERS","user":"alice"}"#);
    let forged_create = create_body(id(), id(), "forged");
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        insider.request_with_headers(
            "bcp.cmd.p1.create".to_owned(),
            forged,
            serde_json::to_vec(&forged_create).unwrap().into(),
        ),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "a command from inside the BCP account was answered: {r:?}"
    );
    let all = ask(&ops, "bcp.query._admin.jobs".into(), json!({}))
        .await
        .unwrap();
    assert_eq!(
        all["jobs"].as_array().unwrap().len(),
        2,
        "nothing recorded: {all}"
    );

    // Replies are private (issue 15): alice may subscribe only to her own
    // inbox prefix; a subscription to bob's sees none of his replies.
    let snoop = alice.subscribe("_INBOX_bob.>").await.unwrap();
    let mut snoop_all = alice.subscribe("_INBOX.>").await.unwrap();
    let mut snoop = snoop;
    let r = ask(&bob, "bcp.query.p2.job".into(), json!({"job_id": jb}))
        .await
        .unwrap();
    assert_eq!(r["ok"], json!(true), "{r}");
    let seen = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        tokio::select! {
            m = futures::StreamExt::next(&mut snoop) => m,
            m = futures::StreamExt::next(&mut snoop_all) => m,
        }
    })
    .await;
    assert!(
        !matches!(seen, Ok(Some(_))),
        "alice read a reply meant for bob: {seen:?}"
    );

    // Drain, then the stored log agrees and verifies.
    let status = support::terminate(&mut serve.0, "bcp serve to drain").await;
    assert!(status.success(), "{status}");
    let db = db.to_str().unwrap();
    let history = support::bcp_cli_json(&[
        "audit",
        "history",
        "--db",
        db,
        "--job",
        &ja.to_string(),
        "--format",
        "json",
    ])
    .await;
    assert_eq!(history["history"][0]["actor"], json!("alice@PRODUCERS"));
    let verified = support::bcp_cli_ok(&["audit", "verify", "--db", db]).await;
    // alice's and bob's creates, and bob's start whose reply was refused.
    assert!(verified.starts_with("ok: 3 events verified"), "{verified}");
}

/// Group commit decides a batch in order: many concurrent commands for one
/// job (conflicting on purpose) must end as if they were run one by one in
/// the log's order, and the log must verify.
#[tokio::test]
async fn concurrent_commands_equal_a_serial_order() {
    let mut h = Harness::start().await;
    let job = id();
    assert_eq!(
        h.cmd("p1", "create", &create_body(id(), job, "rs0")).await["ok"],
        json!(true)
    );
    let verbs = [
        "start",
        "stop",
        "start",
        "stop",
        "terminate",
        "change-schedule",
    ];
    let bodies: Vec<(String, Value)> = (0..120)
        .map(|i| {
            let verb = verbs[i % verbs.len()];
            let mut b = json!({"command_id": id(), "job_id": job});
            if verb == "change-schedule" {
                b["schedule"] = json!({"weekly_retention_weeks": 1 + i % 50});
            }
            if i % 7 == 0 {
                b["expected_version"] = json!(i % 5);
            }
            (verb.to_owned(), b)
        })
        .collect();
    let replies = join_all(bodies.iter().map(|(verb, body)| h.cmd("p1", verb, body))).await;
    // Order the commands by where the log put them (their first event, or
    // their recorded rejection), then run them one by one on a fresh ledger.
    let mut ordered: Vec<(u64, usize)> = replies
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let seq = r["events"][0]["seq"]
                .as_u64()
                .or(r["rejection_seq"].as_u64());
            (
                seq.unwrap_or_else(|| panic!("every reply here has a seq: {r}")),
                i,
            )
        })
        .collect();
    ordered.sort();
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = bcp::store::pipeline::Pipeline::open(
        bcp::store::Store::open_or_create(&dir.path().join("serial.redb")).unwrap(),
    )
    .unwrap();
    let mut n = 0u128;
    let mut ids = || {
        n += 1;
        Uuid::from_u128(n)
    };
    let now = Utc::now();
    let decode = |verb: &str, body: &Value| {
        bcp::store::ledger::Pending::new(
            bcp::domain::command::decode("p1", verb, body.to_string().as_bytes(), None).unwrap(),
        )
    };
    ledger
        .execute(
            &[decode("create", &create_body(id(), job, "rs0"))],
            now,
            &mut ids,
        )
        .unwrap();
    for (_, i) in &ordered {
        let (verb, body) = &bodies[*i];
        let serial = ledger
            .execute(&[decode(verb, body)], now, &mut ids)
            .unwrap()
            .remove(0);
        let live = &replies[*i];
        let types = |v: &Value| {
            v["events"]
                .as_array()
                .map(|e| e.iter().map(|x| x["type"].clone()).collect::<Vec<_>>())
        };
        let serial = serde_json::to_value(&serial).unwrap();
        assert_eq!(
            live["ok"], serial["ok"],
            "{verb} {body}: live {live} serial {serial}"
        );
        assert_eq!(
            live["error"]["code"], serial["error"]["code"],
            "{verb} {body}"
        );
        assert_eq!(live["version"], serial["version"], "{verb} {body}");
        assert_eq!(types(live), types(&serial), "{verb} {body}");
        assert_eq!(
            live["events"]
                .as_array()
                .map(|e| e.iter().map(|x| x["seq"].clone()).collect::<Vec<_>>()),
            serial["events"]
                .as_array()
                .map(|e| e.iter().map(|x| x["seq"].clone()).collect::<Vec<_>>()),
            "same seqs: the log order is the serial order"
        );
    }
    let accepted = replies.iter().filter(|r| r["ok"] == json!(true)).count();
    assert!(
        accepted > 10 && accepted < 120,
        "a mix of accepted and conflicting commands: {accepted}"
    );
    let untimed = |mut v: Value| {
        for k in ["created_at", "last_transition_at", "stopped_at"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    let serial_view = serde_json::to_value(&ledger.world().jobs[&job]).unwrap();
    assert_eq!(
        untimed(h.job(job).await),
        untimed(serial_view),
        "same final state"
    );
    let head = ledger.head_seq();
    h.stop_and_verify(head).await;
}

/// Start nats-server with `config` (written to the temp dir), and `bcp
/// serve` with `serve_args` (credentials); returns once bcp answers a query
/// asked with `connect`'s credentials.
async fn serve_behind(
    dir: &std::path::Path,
    config: &str,
    serve_args: &[String],
    connect: async_nats::ConnectOptions,
) -> (Proc, Proc, String, async_nats::Client) {
    let port = free_port();
    let url = if config.contains("tls") {
        format!("tls://127.0.0.1:{port}")
    } else {
        format!("nats://127.0.0.1:{port}")
    };
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{config}\n",
            dir.join("js")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("nats.log")).unwrap();
    let nats = Proc(
        std::process::Command::new(support::nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = support::Deadline::new("nats-server with auth", support::STARTUP);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        deadline.tick().await;
    }
    let bcp_log = std::fs::File::create(dir.join("bcp.log")).unwrap();
    let mut serve = Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
            .args(["serve", "--nats", &url, "--db"])
            .arg(dir.join("bcp.redb"))
            .args(serve_args)
            .env("RUST_LOG", "info")
            .stdout(bcp_log.try_clone().unwrap())
            .stderr(bcp_log)
            .spawn()
            .unwrap(),
    );
    let client = connect
        .request_timeout(Some(std::time::Duration::from_secs(2)))
        .connect(&url)
        .await
        .unwrap();
    let deadline = support::Deadline::new("bcp serve behind auth", support::STARTUP);
    loop {
        if let Ok(Ok(m)) = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            client.request("bcp.query._admin.jobs", "{}".into()),
        )
        .await
            && serde_json::from_slice::<Value>(&m.payload).unwrap()["ok"] == json!(true)
        {
            break;
        }
        if let Some(status) = serve.0.try_wait().unwrap() {
            panic!(
                "bcp serve exited with {status}: {}",
                std::fs::read_to_string(dir.join("bcp.log")).unwrap()
            );
        }
        deadline.tick().await;
    }
    (nats, serve, url, client)
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `d` (ca.pem, server.pem/.key, client.pem/.key).
fn write_test_certificates(d: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "bcp-test-ca");
    std::fs::write(d.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::from_params(&ca, &ca_key);
    for (name, san) in [("server", "127.0.0.1"), ("client", "bcp-client")] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(d.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(d.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test]
async fn token_nkey_and_mutual_tls_credentials_work_for_serve_and_send() {
    // Token.
    let dir = tempfile::tempdir().unwrap();
    let (_nats, _serve, url, _client) = serve_behind(
        dir.path(),
        "authorization { token: \"t0ken\" }",
        &["--nats-token".into(), "t0ken".into()],
        async_nats::ConnectOptions::with_token("t0ken".into()),
    )
    .await;
    let send = |extra: Vec<String>, url: String| async move {
        let mut args = vec![
            "send".to_owned(),
            "create".into(),
            "--nats".into(),
            url,
            "--project".into(),
            "p1".into(),
            "--kind".into(),
            "replica_set".into(),
            "--name".into(),
            "rs0".into(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bcp_cli(&args).await.status.code()
    };
    assert_eq!(
        send(vec!["--nats-token".into(), "t0ken".into()], url.clone()).await,
        Some(0)
    );
    assert_eq!(
        send(vec!["--nats-token".into(), "wrong".into()], url.clone()).await,
        Some(3)
    );

    // Nkey: the server knows only the public key.
    let dir = tempfile::tempdir().unwrap();
    let (bcp_key, producer_key) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
    let config = format!(
        "authorization {{ users: [{{ nkey: {} }}, {{ nkey: {} }}] }}",
        bcp_key.public_key(),
        producer_key.public_key()
    );
    let (_nats, _serve, url, _client) = serve_behind(
        dir.path(),
        &config,
        &["--nats-nkey".into(), bcp_key.seed().unwrap()],
        async_nats::ConnectOptions::with_nkey(producer_key.seed().unwrap()),
    )
    .await;
    assert_eq!(
        send(
            vec!["--nats-nkey".into(), producer_key.seed().unwrap()],
            url.clone()
        )
        .await,
        Some(0)
    );
    assert_eq!(send(vec![], url.clone()).await, Some(3), "no credentials");

    // Mutual TLS: a CA, a server certificate for 127.0.0.1, a client certificate.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_test_certificates(d);
    let p = |f: &str| d.join(f).display().to_string();
    let config = format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    );
    let tls_args = vec![
        "--tls-ca".to_owned(),
        p("ca.pem"),
        "--tls-cert".into(),
        p("client.pem"),
        "--tls-key".into(),
        p("client.key"),
    ];
    let (_nats, _serve, url, _client) = serve_behind(
        d,
        &config,
        &tls_args,
        async_nats::ConnectOptions::new()
            .add_root_certificates(d.join("ca.pem"))
            .add_client_certificate(d.join("client.pem"), d.join("client.key"))
            .require_tls(true),
    )
    .await;
    assert_eq!(send(tls_args.clone(), url.clone()).await, Some(0));
    assert_eq!(
        send(vec!["--tls-ca".into(), p("ca.pem")], url.clone()).await,
        Some(3),
        "no client certificate"
    );
}

/// A flood of fire-and-forget commands beyond the intake queue (issue 15):
/// every one is either recorded or counted as dropped in `$SRV.STATS` data
/// (`dropped`), never lost silently, and the drops are logged a few times,
/// not once each.
#[tokio::test]
async fn a_fire_and_forget_flood_is_recorded_or_counted() {
    let h = Harness::start().await;
    let sent = 20_000u64;
    for i in 0..sent {
        let body = serde_json::to_vec(&create_body(id(), id(), &format!("ff{i}"))).unwrap();
        h.client
            .publish("bcp.cmd.p1.create", body.into())
            .await
            .unwrap();
    }
    h.client.flush().await.unwrap();
    let deadline = support::Deadline::new("every command recorded or counted", support::CATCH_UP);
    let (recorded, dropped) = loop {
        let status = h.request("bcp.status", &json!({})).await;
        let stats = h.request("$SRV.STATS.bcp", &json!({})).await;
        let create = stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == json!("create"))
            .unwrap()
            .clone();
        let (recorded, dropped) = (
            status["head_seq"].as_u64().unwrap(),
            create["data"]["dropped"].as_u64().unwrap(),
        );
        assert!(recorded + dropped <= sent, "{recorded} + {dropped}");
        if recorded + dropped == sent {
            break (recorded, dropped);
        }
        deadline.tick().await;
    };
    eprintln!("{sent} fire-and-forget commands: {recorded} recorded, {dropped} dropped");
    let log = h.bcp_log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("commands not taken"))
        .count();
    assert!(dropped == 0 || lines >= 1, "drops are logged:\n{log}");
    assert!(lines <= 10, "{lines} overload lines for {dropped} drops");
}

/// Text that would display as something else, and times outside what the
/// log can hold, are refused as bad_request naming the field, and append
/// nothing (issue 15).
#[tokio::test]
async fn spoofing_text_and_out_of_range_times_are_refused() {
    let h = Harness::start().await;
    let job = id();
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    let refused = |r: Value, field: &str| {
        assert_eq!(r["error"]["code"], json!("bad_request"), "{r}");
        let message = r["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(field), "{field}: {message}");
        message
    };
    let m = refused(
        h.cmd(
            "p1",
            "create",
            &create_body(id(), id(), "evil\u{202E}gnp.exe"),
        )
        .await,
        "deployment.name",
    );
    assert!(m.contains("U+202E"), "{m}");
    let mut shard = create_body(id(), id(), "s0");
    shard["deployment"] = json!({"kind": "shard", "name": "s0", "cluster": "c\u{2066}1"});
    refused(h.cmd("p1", "create", &shard).await, "deployment.cluster");
    let mut body = job_body(id(), job);
    body["actor"] = json!("alice\u{200B}");
    refused(h.cmd("p1", "stop", &body).await, "actor");
    // Every default-ignorable code point: a tag character, Hangul fillers,
    // the combining grapheme joiner, a variation selector.
    for c in ['\u{E0020}', '\u{3164}', '\u{115F}', '\u{034F}', '\u{FE0F}'] {
        body["actor"] = json!(format!("alice{c}"));
        let m = refused(h.cmd("p1", "stop", &body).await, "actor");
        assert!(m.contains(&format!("U+{:04X}", c as u32)), "{m}");
    }
    refused(
        h.cmd("p1", "create", &create_body(id(), id(), "   ")).await,
        "deployment.name",
    );
    for blank in ["", "  "] {
        body["actor"] = json!(blank);
        refused(h.cmd("p1", "stop", &body).await, "actor");
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Bcp-Actor", "root\u{202E}");
    let r = h
        .client
        .request_with_headers(
            "bcp.cmd.p1.stop".to_owned(),
            headers,
            serde_json::to_vec(&job_body(id(), job)).unwrap().into(),
        )
        .await
        .unwrap();
    refused(serde_json::from_slice(&r.payload).unwrap(), "actor");

    let snapshot = |taken_at: &str| json!({"command_id": id(), "job_id": job, "snapshot_id": id(), "taken_at": taken_at, "size_bytes": 1});
    refused(
        h.cmd("p1", "record-snapshot", &snapshot("9999-12-31T23:59:59Z"))
            .await,
        "taken_at",
    );
    refused(
        h.cmd("p1", "record-snapshot", &snapshot("2026-06-30T23:59:60Z"))
            .await,
        "taken_at",
    );
    refused(
        h.cmd("p1", "record-snapshot", &snapshot("1969-12-31T23:59:59Z"))
            .await,
        "taken_at",
    );
    let expiry = json!({"command_id": id(), "job_id": job, "snapshot_id": id(), "expires_at": "9500-01-01T00:00:00Z"});
    refused(
        h.cmd("p1", "set-snapshot-expiry", &expiry).await,
        "expires_at",
    );
    let sweep = json!({"command_id": id(), "now": "9999-01-01T00:00:00Z"});
    refused(h.cmd("p1", "expire-snapshots", &sweep).await, "now");
    // The bounds themselves: the last accepted time is stored as RFC 3339.
    let r = h
        .cmd("p1", "record-snapshot", &snapshot("8999-12-31T23:59:59Z"))
        .await;
    assert_eq!(r["ok"], json!(true), "{r}");
    let snaps = h.snapshots(job).await;
    assert!(
        snaps[0]["expires_at"].as_str().unwrap().starts_with("9"),
        "{snaps:?}"
    );
    assert_eq!(
        snaps[0]["expires_at"].as_str().unwrap().len(),
        20,
        "{snaps:?}"
    );
    let status = h.request("bcp.status", &json!({})).await;
    assert_eq!(
        status["head_seq"],
        json!(3),
        "only the valid commands appended: {status}"
    );
}

/// stderr a closed pipe (`bcp serve 2>&1 | head -2`): a log line that
/// cannot be written is lost, never fatal; bcp keeps taking commands and
/// SIGTERM still ends it, exit 0 (issue 15).
#[tokio::test]
async fn a_closed_stderr_neither_kills_bcp_nor_blocks_sigterm() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(
        free_port(),
        &dir.path().join("nats"),
        &dir.path().join("nats.log"),
    )
    .await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
        .args(["serve", "--nats", &nats.url(), "--db"])
        .arg(dir.path().join("bcp.redb"))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        lines.next().unwrap().unwrap();
        lines.next().unwrap().unwrap();
    } // the read end closes here, as `head -2` exits
    let client = support::connect(&nats.url()).await;
    let deadline = support::Deadline::new(
        "bcp serve to answer with its stderr closed",
        support::STARTUP,
    );
    let reply = loop {
        let body = serde_json::to_vec(&create_body(id(), id(), "rs0")).unwrap();
        if let Ok(Ok(m)) = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            client.request("bcp.cmd.p1.create", body.into()),
        )
        .await
        {
            break serde_json::from_slice::<Value>(&m.payload).unwrap();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "bcp serve died with its stderr closed"
        );
        deadline.tick().await;
    };
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let status = support::terminate(&mut child, "bcp serve (SIGTERM)").await;
    assert_eq!(status.code(), Some(0), "{status}");
}

/// The cluster rule as a rule of state (issue 15): a shard without a region,
/// in a cluster where another job has one, is Misconfigured when it would
/// be Active; its siblings move in the same command that gives or takes a
/// region, each with an event naming the cause, and back when it goes away.
#[tokio::test]
async fn the_cluster_rule_moves_siblings_when_a_cluster_becomes_regional() {
    let h = Harness::start().await;
    let shard = |name: &str, job: Uuid| json!({"command_id": id(), "job_id": job, "deployment": {"kind": "shard", "name": name, "cluster": "c1"}});
    let (s0, s1) = (id(), id());
    h.cmd("p1", "create", &shard("shard0", s0)).await;
    h.cmd("p1", "create", &shard("shard1", s1)).await;
    h.cmd("p1", "start", &job_body(id(), s0)).await;
    h.cmd("p1", "start", &job_body(id(), s1)).await;
    let full = json!({"command_id": id(), "region": "eu", "snapshot_store": "s", "oplog_store": "o", "sync_store": "y"});
    h.cmd("_admin", "configure-region", &full).await;
    assert_eq!(h.job(s1).await["state"], json!("Active"));

    // shard0 gets a region: shard1, regionless in a now regional cluster,
    // is Misconfigured in the same command.
    let r = h
        .cmd(
            "p1",
            "assign-region",
            &json!({"command_id": id(), "job_id": s0, "region": "eu"}),
        )
        .await;
    assert_eq!(r["ok"], json!(true), "{r}");
    let types: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["RegionAssigned", "JobMisconfigured"], "{r}");
    assert_eq!(h.job(s0).await["state"], json!("Active"));
    let sibling = h.job(s1).await;
    assert_eq!(sibling["state"], json!("Misconfigured"), "{sibling}");
    let history = h.history(s1).await;
    let last = history.last().unwrap();
    assert_eq!(last["type"], json!("JobMisconfigured"), "{last}");
    let reason = last["reason"].as_str().unwrap_or_default().to_owned() + &last.to_string();
    assert!(
        reason.contains("cluster c1") && reason.contains(&s0.to_string()),
        "{last}"
    );
    // A shard started now is Misconfigured too, as before.
    let s2 = id();
    h.cmd("p1", "create", &shard("shard2", s2)).await;
    h.cmd("p1", "start", &job_body(id(), s2)).await;
    assert_eq!(h.job(s2).await["state"], json!("Misconfigured"));

    // The cause goes away: shard0 stopped, terminated and its region removed;
    // shard1 and shard2 return to Active in that command.
    h.cmd("p1", "stop", &job_body(id(), s0)).await;
    h.cmd("p1", "terminate", &job_body(id(), s0)).await;
    let r = h
        .cmd(
            "p1",
            "assign-region",
            &json!({"command_id": id(), "job_id": s0, "region": null}),
        )
        .await;
    let types: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["RegionAssigned", "JobReconfigured", "JobReconfigured"],
        "{r}"
    );
    assert_eq!(h.job(s1).await["state"], json!("Active"));
    assert_eq!(h.job(s2).await["state"], json!("Active"));
    // The log, its projections and its records agree (audit verify).
    let head = h.request("bcp.status", &json!({})).await["head_seq"]
        .as_u64()
        .unwrap();
    let mut h = h;
    h.stop_and_verify(head).await;
}

/// The CLI's live views (issue 15): `bcp job`, `bcp history` (scoped by
/// project like the queries) and `bcp watch` (one line per published
/// event), reaching NATS through NATS_URL.
#[tokio::test]
async fn job_history_and_watch_from_the_cli() {
    let h = Harness::start().await;
    let url = h.nats.url();
    let job = id();
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    let j = job.to_string();
    let v = support::bcp_cli_json(&[
        "job",
        &j,
        "--nats",
        &url,
        "--project",
        "p1",
        "--format",
        "json",
    ])
    .await;
    assert_eq!(v["state"], json!("Active"), "{v}");
    let table = support::bcp_cli_ok(&["history", &j, "--nats", &url, "--project", "p1"]).await;
    assert!(
        table.contains("JobCreated") && table.contains("JobStarted: Inactive -> Active"),
        "{table}"
    );
    let (code, _, err) =
        support::bcp_cli_text(&["job", &j, "--nats", &url, "--project", "p2"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("no job {j}")), "{err}");

    // An empty BCP_NATS_URL counts as unset: NATS_URL is used.
    let jobs = tokio::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
        .args(["jobs", "--project", "p1", "--format", "json"])
        .env("BCP_NATS_URL", "")
        .env("NATS_URL", &url)
        .output()
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&jobs.stdout);
    assert!(
        jobs.status.success() && listed.contains(&j),
        "{listed} {jobs:?}"
    );
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
        .args(["watch", "--project", "p1"])
        .env_remove("BCP_NATS_URL")
        .env("NATS_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut err = tokio::io::BufReader::new(watch.stderr.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut err, &mut line)
        .await
        .unwrap();
    assert!(line.contains("watching bcp.evt.p1.*.*"), "{line}");
    h.cmd("p1", "stop", &job_body(id(), job)).await;
    h.cmd("p2", "create", &create_body(id(), id(), "other"))
        .await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    let mut out = tokio::io::BufReader::new(watch.stdout.take().unwrap());
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut l = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncBufReadExt::read_line(&mut out, &mut l),
        )
        .await
        .expect("a line per event")
        .unwrap();
        seen.push(l);
    }
    assert!(
        seen[0].contains("JobStopped") && seen[0].contains(&j),
        "{seen:?}"
    );
    assert!(
        seen[1].contains("JobStarted"),
        "p2's event is not shown: {seen:?}"
    );
}

/// The README's walk-through works when followed in order on a fresh
/// server (issue 15): examples/tour.sh runs it, and every command of it
/// stands in the README as it is in the script, and the other way round.
#[tokio::test]
async fn the_readme_walkthrough_runs_in_order() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tour = std::fs::read_to_string(root.join("examples/tour.sh")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let commands: Vec<&str> = tour
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .chain(
            tour.lines()
                .filter(|l| l.starts_with("JOB") || l.starts_with("SNAP")),
        )
        .collect();
    assert!(commands.len() > 20, "{commands:?}");
    for c in &commands {
        assert!(
            readme.lines().any(|l| l == *c),
            "README lacks the tour's `{c}`"
        );
    }
    let walk = &readme[readme.find("## Usage").unwrap()..readme.find("### Audit").unwrap()];
    // The commands of the section's shell blocks (prose may start a line
    // with "bcp" too).
    let blocks: Vec<&str> = walk
        .split("```")
        .enumerate()
        .filter(|(i, b)| i % 2 == 1 && b.starts_with("sh\n"))
        .map(|(_, b)| b)
        .collect();
    assert!(blocks.len() >= 3, "the Usage, Snapshots and Regions blocks");
    for l in blocks
        .iter()
        .flat_map(|b| b.lines())
        .filter(|l| l.starts_with("bcp "))
    {
        assert!(commands.contains(&l), "the tour lacks the README's `{l}`");
    }

    let mut h = Harness::start().await;
    let out = tokio::process::Command::new("bash")
        .arg(root.join("examples/tour.sh"))
        .current_dir(root)
        .env("BCP", env!("CARGO_BIN_EXE_bcp"))
        .env("BCP_NATS_URL", h.nats.url())
        .env_remove("BCP_PROJECT")
        .env_remove("BCP_ACTOR")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "the tour failed:\n{stdout}\n{stderr}");
    let job2 = h
        .job("0192f0c4-0000-7000-8000-000000000002".parse().unwrap())
        .await;
    assert_eq!(job2["state"], json!("Active"), "{job2}");
    // `step` prints each command with its variables expanded.
    let shown = stdout
        .split("$ bcp job 0192f0c4-0000-7000-8000-000000000002")
        .nth(1)
        .and_then(|rest| rest.split("\n$ ").next())
        .unwrap_or_default();
    assert!(
        shown.contains("Misconfigured"),
        "the Regions part shows the new job Misconfigured:\n{stdout}"
    );

    // The Audit section's answer to "who stopped the job?" is what
    // `bcp audit history` prints for this walk-through (but the time).
    let sample = readme
        .lines()
        .find_map(|l| l.strip_prefix("#     3 "))
        .expect("README's audit history sample line");
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    let db = h.db();
    let job = "0192f0c4-0000-7000-8000-000000000001";
    let (code, out, err) = support::bcp_cli_text(&[
        "audit",
        "history",
        "--db",
        db.to_str().unwrap(),
        "--job",
        job,
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    let line = (out.lines())
        .find_map(|l| l.strip_prefix("    3 "))
        .unwrap_or_else(|| panic!("no seq 3 in:\n{out}"));
    let but_time = |l: &str| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
    assert_eq!(
        but_time(line),
        but_time(sample),
        "README says:\n{sample}\nbcp says:\n{line}"
    );
}

/// The audit tools' messages and exit codes (issue 15): each says what to
/// do, none calls a usage or reachability problem a bad log.
#[tokio::test]
async fn audit_tool_messages_say_what_to_do() {
    let mut h = Harness::start().await;
    h.cmd("p1", "create", &create_body(id(), id(), "rs0")).await;
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    let db = h.db();
    let db = db.to_str().unwrap();
    let (code, _, err) = support::bcp_cli_text(&["replay"]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--db") && err.contains("--from-nats"), "{err}");
    let (code, _, err) =
        support::bcp_cli_text(&["replay", "--db", db, "--until", "yesterday"]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("such as 2026-11-27T10:00:00Z"), "{err}");
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    let (code, out, err) =
        support::bcp_cli_text(&["audit", "verify", "--db", db, "--against-nats", &nowhere]).await;
    assert_eq!(
        code,
        Some(3),
        "unreachable NATS is not a bad log: {out}{err}"
    );
    let file = h.path("log.jsonl");
    let (code, _, err) =
        support::bcp_cli_text(&["export", "--db", db, "--out", file.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.starts_with("ok: exported 1 events to "), "{err}");
    let (code, _, err) =
        support::bcp_cli_text(&["import", "--db", db, file.to_str().unwrap()]).await;
    assert_ne!(code, Some(0));
    assert!(
        err.contains("already holds a log") && !err.contains("corrupt"),
        "{err}"
    );
    // No message says the same thing twice.
    let junk = h.path("junk.redb");
    std::fs::write(&junk, b"not a store").unwrap();
    let (code, _, err) =
        support::bcp_cli_text(&["audit", "verify", "--db", junk.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.matches("magic number mismatch").count(), 1, "{err}");
    let (code, _, err) = support::bcp_cli_text(&["jobs", "--nats", &h.nats.url()]).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("nothing answers there") && !err.contains("no responders: no responders"),
        "{err}"
    );
}

/// `bcp serve --http` (issue 15): /healthz, /readyz (not ready while an
/// alarm is raised) and /metrics in the Prometheus text format.
#[tokio::test]
async fn operators_http_endpoints() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let h = Harness::start_with(&["--http", &addr, "--stream-check-interval", "1"]).await;
    assert_eq!(
        http_get(port, "/healthz").await.unwrap(),
        (200, "ok\n".to_owned())
    );
    let (status, body) = http_get(port, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let job = id();
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    h.cmd("p1", "start", &job_body(id(), job)).await; // invalid_transition
    h.request_bytes("bcp.cmd.p1.stop", b"not json".to_vec())
        .await;
    h.caught_up_stream(3).await;
    let (status, metrics) = http_get(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        r#"bcp_commands_total{verb="create",outcome="ok"} 1"#,
        r#"bcp_commands_total{verb="start",outcome="ok"} 1"#,
        r#"bcp_commands_total{verb="start",outcome="invalid_transition"} 1"#,
        r#"bcp_commands_total{verb="stop",outcome="bad_request"} 1"#,
        "bcp_head_seq 3",
        "bcp_published_seq 3",
        "bcp_relay_lag 0",
        "bcp_intake_queue_depth 0",
        "bcp_alarms 0",
        // The three that went through the writer; the bad request did not.
        "bcp_command_seconds_count 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    let batches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bcp_batch_commands_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        batches >= 3,
        "one batch per command here at least: {metrics}"
    );
    assert!(
        metrics.contains("bcp_commit_seconds_bucket{le="),
        "{metrics}"
    );
    // The store's own fsyncs: one durable commit at least for each of the
    // three commands that appended an event.
    let fsyncs: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bcp_fsync_seconds_count "))
        .unwrap_or_else(|| panic!("no bcp_fsync_seconds in:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(fsyncs >= 3, "{metrics}");
    // An alarm: not ready, and it says why.
    let mut config = h.stream_info().await.unwrap().config;
    config.max_messages = 10;
    h.js.update_stream(config).await.unwrap();
    let deadline = support::Deadline::new("/readyz to say not ready", support::STARTUP);
    let body = loop {
        let (status, body) = http_get(port, "/readyz").await.unwrap();
        if status == 503 {
            break body;
        }
        deadline.tick().await;
    };
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], json!(false));
    assert_eq!(v["alarms"][0]["kind"], json!("stream_config"), "{v}");
}

/// One raw NATS request with this header block (`HPUB`, as a client that
/// writes headers byte by byte would send it); the reply's JSON, read off
/// the socket.
async fn raw_request_with_headers(url: &str, subject: &str, header: &[u8], body: &[u8]) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("nats://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut out =
        b"CONNECT {\"verbose\":false,\"headers\":true,\"protocol\":1}\r\nSUB _INBOX.raw 1\r\n"
            .to_vec();
    out.extend_from_slice(
        format!(
            "HPUB {subject} _INBOX.raw {} {}\r\n",
            header.len(),
            header.len() + body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    sock.write_all(&out).await.expect("write");
    let mut got = Vec::new();
    let read = async {
        loop {
            let mut buf = [0u8; 4096];
            let n = sock.read(&mut buf).await.expect("read");
            assert!(n > 0, "nats-server closed the raw connection");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if text.contains("PING\r\n") {
                sock.write_all(b"PONG\r\n").await.expect("pong");
                got = String::from_utf8_lossy(&got)
                    .replace("PING\r\n", "")
                    .into_bytes();
            }
            let text = String::from_utf8_lossy(&got).into_owned();
            let Some(at) = text.find("MSG _INBOX.raw 1 ") else {
                continue;
            };
            let line_end = at + text[at..].find("\r\n").expect("MSG line") + 2;
            let len: usize = text[at + 17..line_end - 2].trim().parse().expect("length");
            if got.len() >= line_end + len {
                return serde_json::from_slice::<Value>(&got[line_end..line_end + len])
                    .expect("JSON reply");
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no reply to a request with header {:?}",
                String::from_utf8_lossy(header)
            )
        })
}

#[tokio::test]
async fn a_malformed_nats_header_is_refused_and_keeps_the_connection() {
    let h = Harness::start().await;
    let job = id();
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    let start = serde_json::to_vec(&job_body(id(), job)).unwrap();
    let cases: [(&str, &[u8]); 3] = [
        (
            "a value that is not UTF-8",
            b"NATS/1.0\r\nBcp-Actor: \xff\r\n\r\n",
        ),
        ("a line with no colon", b"NATS/1.0\r\nBcp-Actor\r\n\r\n"),
        ("no version line", b"HTTP/1.1\r\nBcp-Actor: mallory\r\n\r\n"),
    ];
    for (what, header) in cases {
        for subject in ["bcp.cmd.p1.start", "bcp.query.p1.job"] {
            let body = if subject.contains("query") {
                serde_json::to_vec(&json!({ "job_id": job })).unwrap()
            } else {
                start.clone()
            };
            let reply = raw_request_with_headers(&h.nats.url(), subject, header, &body).await;
            let message = if subject.contains("query") {
                query_refused(&reply, "bad_request", false)
            } else {
                rejected(&reply, "bad_request", None)
            };
            assert!(
                message.starts_with("malformed header block"),
                "{what} on {subject}: {message}"
            );
        }
    }
    // Nothing was decided, and bcp's own connection never dropped: a
    // well-formed command right after is answered, and nothing reconnected.
    assert_eq!(h.job(job).await["state"], "Inactive");
    let r = h.cmd("p1", "start", &job_body(id(), job)).await;
    assert_eq!(r, accepted(Some(job), Some(2), &[(2, "JobStarted")]));
    let log = h.bcp_log_text();
    assert!(
        !log.contains("reconnecting"),
        "bcp's NATS connection dropped: {log}"
    );
}

/// A job's history is paged (it grows for as long as the job lives), the
/// CLI follows the pages, and refused commands of another project that
/// named the job stay out of its project's view (`_admin` sees them).
#[tokio::test]
async fn a_long_history_is_paged_and_other_projects_attempts_stay_out_of_it() {
    let h = Harness::start().await;
    let job = id();
    h.cmd("p1", "create", &create_body(id(), job, "rs0")).await;
    h.cmd("p1", "start", &job_body(id(), job)).await;
    // Another project names the job: refused as not found, and recorded.
    for _ in 0..3 {
        let r = h.cmd("p2", "stop", &job_body(id(), job)).await;
        rejected(&r, "not_found", r["rejection_seq"].as_u64());
    }
    // The job's own project: 520 refused starts of a running job.
    let bodies: Vec<Value> = (0..520).map(|_| job_body(id(), job)).collect();
    let refused = join_all(bodies.iter().map(|b| h.cmd("p1", "start", b))).await;
    for r in &refused {
        rejected(r, "invalid_transition", r["rejection_seq"].as_u64());
    }
    let h = &h;
    let page = |project: &'static str, after: Option<u64>| {
        let mut body = json!({ "job_id": job });
        if let Some(after) = after {
            body["after_seq"] = json!(after);
        }
        async move {
            h.request(&format!("bcp.query.{project}.history"), &body)
                .await
        }
    };
    let first = page("p1", None).await;
    let entries = first["history"].as_array().unwrap();
    assert_eq!(entries.len(), 500, "a page holds at most 500 entries");
    assert_eq!(entries[0]["type"], "JobCreated");
    let last = entries[499]["seq"].as_u64().unwrap();
    assert_eq!(first["next_after_seq"], json!(last));
    let second = page("p1", Some(last)).await;
    let rest = second["history"].as_array().unwrap();
    assert_eq!(rest.len(), 2 + 520 - 500);
    assert!(rest[0]["seq"].as_u64().unwrap() > last);
    assert!(second.get("next_after_seq").is_none(), "{second}");
    let everything = [entries.as_slice(), rest.as_slice()].concat();
    assert!(
        everything
            .iter()
            .all(|e| !e["reason"].to_string().contains("p2")),
        "another project's attempts are not in p1's view"
    );
    // `_admin` sees every event recorded under the job id.
    let mut admin = Vec::new();
    let mut after = None;
    loop {
        let p = page("_admin", after).await;
        admin.extend(p["history"].as_array().unwrap().clone());
        match p["next_after_seq"].as_u64() {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(admin.len(), everything.len() + 3);
    // The other project still learns nothing of the job.
    let r = page("p2", None).await;
    query_refused(&r, "not_found", true);
    // The CLI follows the pages.
    let cli = support::bcp_cli_json(&[
        "history",
        &job.to_string(),
        "--nats",
        &h.nats.url(),
        "--project",
        "p1",
        "--format",
        "json",
    ])
    .await;
    assert_eq!(cli.as_array().unwrap(), &everything);
}
