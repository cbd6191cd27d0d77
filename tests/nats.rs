//! The NATS contract (DESIGN.md §3) end to end: a real nats-server with
//! JetStream and a real `bcp serve` process per test, driven by an async-nats
//! producer. Covers command replies and rejections, idempotent retries, bad
//! input, the published stream, NATS outages and restarts, a lost NATS
//! store, fire-and-forget commands and the `bcp send` exit codes. Scenarios
//! that stop `bcp serve` end with `bcp audit verify` on the stopped store.

mod support;

use futures::future::join_all;
use serde_json::{Value, json};
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

/// Asserts a rejection: `ok:false`, the code, a message, the recorded
/// `rejection_seq` (or none), not a duplicate, and no other fields than the
/// contract's. Returns the message.
fn rejected(reply: &Value, code: &str, rejection_seq: Option<u64>) -> String {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["error"]["code"], json!(code), "{reply}");
    assert_eq!(reply["duplicate"], json!(false), "{reply}");
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
    rejected(&unknown, "not_found", None);

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
    ];
    for (what, subject, body, needle) in cases {
        let reply = h.request_bytes(&subject, body).await;
        let message = rejected(&reply, "bad_request", None);
        assert!(
            message.contains(needle),
            "{what}: message {message:?} lacks {needle:?}"
        );
        let mut keys: Vec<_> = reply.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["duplicate", "error", "ok"], "{what}: {reply}");
    }
    // A query body that cannot be decoded is a bad_request too.
    let r = h.query("job", &json!({"job": j})).await;
    rejected(&r, "bad_request", None);
    let r = h.query("nope", &json!({})).await;
    rejected(&r, "bad_request", None);

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
    h.stop_and_verify(head).await;
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
        all.extend_from_slice(&["--timeout", "3"]);
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

    let start = ["start", "--project", "p1", "--job", &job, "--nats", &url];
    let (code, out, err) = send(&start).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, _) = send(&start).await;
    assert_eq!(code, Some(1), "{out}");
    let reply: Value = serde_json::from_str(out.trim()).unwrap();
    rejected(&reply, "invalid_transition", Some(3));
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
    let (code, out, err) = send(&[
        "start",
        "--project",
        "p1",
        "--job",
        &job,
        "--nats",
        &lonely.url(),
    ])
    .await;
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains("no reply"), "{err}");
    drop(lonely);

    h.caught_up_stream(4).await;
    h.stop_and_verify(4).await;
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
