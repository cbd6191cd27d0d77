//! One log, one writer: the published stream never forks from the store.
//!
//! Each way the stream and the store could part is done here for real, on a
//! real nats-server and real `bcp serve` processes: a stray publish on an
//! event subject (while bcp idles, racing the relay, while bcp is stopped),
//! an empty and a stale store started against a populated stream, a second
//! server on another store, and stream settings changed behind bcp's back.
//! In every case bcp never skips, overwrites or acks into a forked stream,
//! and says what is wrong (the reply, `bcp status`, `$SRV.STATS`, one
//! ERROR line); and the README's way out is followed to the end.

#[allow(dead_code)] // shared with tests/nats.rs; this binary uses part of it
mod support;

use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use support::{Deadline, Harness, STREAM, bcp_cli_text};
use uuid::Uuid;

fn id() -> Uuid {
    Uuid::now_v7()
}

fn create(job: Uuid) -> Value {
    json!({"command_id": id(), "job_id": job, "deployment": {"kind": "replica_set", "name": "rs0"}})
}

fn on(job: Uuid) -> Value {
    json!({"command_id": id(), "job_id": job})
}

/// A `record-snapshot` body: a new snapshot of `job`, taken at `taken`.
fn snapshot(job: Uuid, taken: chrono::DateTime<chrono::Utc>) -> Value {
    let mut body = on(job);
    body["snapshot_id"] = json!(id());
    body["taken_at"] = json!(taken.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    body["size_bytes"] = json!(1);
    body
}

fn seqs(reply: &Value) -> Vec<u64> {
    assert_eq!(reply["ok"], json!(true), "{reply}");
    reply["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

/// `bcp status --format json` against the harness's NATS: (exit code, the
/// one process's status).
async fn status(h: &Harness) -> (Option<i32>, Value) {
    let url = h.nats.url();
    let (code, out, err) = bcp_cli_text(&["status", "--nats", &url, "--format", "json"]).await;
    let all: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let all = all.as_array().expect("a list").clone();
    assert_eq!(all.len(), 1, "one bcp process answers: {all:?}");
    (code, all[0].clone())
}

/// Poll `bcp status` until it reports an alarm of `kind`; returns its message.
async fn alarm(h: &Harness, kind: &str) -> String {
    let deadline = Deadline::new(
        format!("a {kind} alarm in bcp status"),
        Duration::from_secs(30),
    );
    loop {
        let (code, s) = status(h).await;
        if let Some(a) = s["alarms"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["kind"] == json!(kind)))
        {
            assert_eq!(code, Some(1), "bcp status exits 1 on an alarm");
            assert_eq!(s["taking_commands"], json!(false), "{s}");
            assert_eq!(s["role"], json!("single"));
            return a["message"].as_str().expect("message").to_owned();
        }
        deadline.tick().await;
    }
}

/// A command answered `unavailable`; returns its message.
async fn refused(h: &Harness, verb: &str, body: &Value) -> String {
    let r = h.cmd("p1", verb, body).await;
    assert_eq!(r["ok"], json!(false), "{r}");
    assert_eq!(r["error"]["code"], json!("unavailable"), "{r}");
    r["error"]["message"].as_str().expect("message").to_owned()
}

/// Publish `payload` on `subject` into the stream as someone other than
/// bcp would; returns its stream sequence.
async fn stray(h: &Harness, subject: String, payload: &'static str) -> u64 {
    h.js.publish(subject, payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence
}

async fn stream_last(h: &Harness) -> u64 {
    h.stream_info().await.expect("stream").state.last_sequence
}

/// `bcp serve` on `db`, expected to refuse to start: its exit code and
/// stderr (bounded: a server that does not exit fails the test).
async fn serve_refused(db: &Path, nats: &str, extra: &[&str]) -> (Option<i32>, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bcp"))
        .arg("serve")
        .arg("--db")
        .arg(db)
        .args(["--nats", nats])
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("BCP_STREAM")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(40), child)
        .await
        .expect("bcp serve to exit by itself")
        .expect("run bcp serve");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// While bcp idles, someone publishes on an event subject: the stream's
/// last message is no longer the log's. bcp finds it on its timer, refuses
/// commands naming the seq, says so once at ERROR, in `bcp status` and in
/// `$SRV.STATS`, and publishes nothing over it. Once the stream is
/// replaced (deleted here, as the README says), it republishes its log and
/// takes commands again by itself.
#[tokio::test]
async fn a_stray_publish_while_idle_stops_commands_until_the_stream_is_this_log() {
    let mut h = Harness::start_with(&["--stream-check-interval", "1"]).await;
    let job = id();
    assert_eq!(seqs(&h.cmd("p1", "create", &create(job)).await), [1]);
    assert_eq!(seqs(&h.cmd("p1", "start", &on(job)).await), [2]);
    h.caught_up_stream(2).await;

    let forged = stray(
        &h,
        format!("bcp.evt.p1.{job}.JobStopped"),
        r#"{"forged":true}"#,
    )
    .await;
    assert_eq!(forged, 3);
    let what = alarm(&h, "fork").await;
    assert!(
        what.contains("seq 3")
            && what.contains("a message bcp did not write")
            && what.contains("ahead of the log"),
        "{what}"
    );
    let stop = on(job);
    let message = refused(&h, "stop", &stop).await;
    assert!(
        message.contains("not taking commands") && message.contains("seq 3"),
        "{message}"
    );
    // Queries still answer, from the store, which the stray did not touch.
    assert_eq!(h.job(job).await["state"], json!("Active"));

    let stats = h.request("$SRV.STATS.bcp", &json!({})).await;
    let endpoint = stats["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["name"] == json!("stop"))
        .expect("the stop endpoint")
        .clone();
    assert_eq!(
        endpoint["data"]["alarms"][0]["kind"],
        json!("fork"),
        "{endpoint}"
    );
    assert_eq!(
        endpoint["data"]["rejections"]["unavailable"],
        json!(1),
        "{endpoint}"
    );

    // Checked every second, retried by the relay: logged once all the same.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = h.bcp_log_text();
    let errors = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("not taking commands"))
        .count();
    assert_eq!(errors, 1, "one ERROR for one lasting alarm:\n{log}");
    assert_eq!(
        stream_last(&h).await,
        3,
        "bcp published nothing over the stray"
    );
    let m =
        h.js.get_stream(STREAM)
            .await
            .unwrap()
            .get_raw_message(3)
            .await
            .unwrap();
    assert_eq!(
        &m.payload[..],
        br#"{"forged":true}"#,
        "and overwrote nothing"
    );

    h.js.delete_stream(STREAM)
        .await
        .expect("delete the forked stream");
    let r = h.cmd_until_ok("p1", "stop", &stop).await;
    assert_eq!(seqs(&r), [3]);
    h.caught_up_stream(3).await;
    let (code, s) = status(&h).await;
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(s["alarms"], json!([]));
    assert_eq!(s["taking_commands"], json!(true));
    assert_eq!(s["head_seq"], json!(3));
    assert_eq!(s["published_seq"], json!(3));
    assert!(h.bcp_log_text().contains("alarm cleared"));
    h.stop_and_verify(3).await;
}

/// While bcp idles, the stream loses what it published. Removed, it is
/// published again without waiting for a command; cut back to a prefix of
/// the log (an old copy restored), the rest is published again; emptied by
/// its settings (a max_age, since reverted), it is a fork: bcp refuses
/// commands, rather than wait for NATS to answer for messages that are
/// gone and publish the next event on top of the hole.
#[tokio::test]
async fn a_stream_that_loses_published_events_while_bcp_idles_is_made_whole_or_refused() {
    let h = Harness::start_with(&["--stream-check-interval", "1"]).await;
    let job = id();
    assert_eq!(seqs(&h.cmd("p1", "create", &create(job)).await), [1]);
    assert_eq!(seqs(&h.cmd("p1", "start", &on(job)).await), [2]);
    assert_eq!(seqs(&h.cmd("p1", "stop", &on(job)).await), [3]);
    let published = h.caught_up_stream(3).await;

    h.js.delete_stream(STREAM).await.expect("delete the stream");
    assert_eq!(
        h.caught_up_stream(3).await,
        published,
        "published again, unasked"
    );

    // An old copy: the stream holds seqs 1 and 2 only. (Made again should
    // bcp's check find the new stream empty before both are in: each
    // publish expects the one before it.)
    let config = h.stream_info().await.unwrap().config;
    let copy = h.stream_messages().await;
    'restore: loop {
        h.js.delete_stream(STREAM).await.unwrap();
        h.js.create_stream(config.clone()).await.unwrap();
        for (before, m) in copy[..2].iter().enumerate() {
            let mut headers = m.headers.clone();
            headers.insert("Nats-Expected-Last-Sequence", before.to_string().as_str());
            let (subject, payload) = (m.subject.to_string(), m.payload.clone());
            let ack =
                h.js.publish_with_headers(subject, headers, payload)
                    .await
                    .unwrap();
            if ack.await.is_err() {
                continue 'restore;
            }
        }
        break;
    }
    assert_eq!(
        h.caught_up_stream(3).await,
        published,
        "the rest published again"
    );
    let (code, s) = status(&h).await;
    assert_eq!((code, &s["alarms"]), (Some(0), &json!([])), "{s}");

    // Every message expires; the limit is taken away again.
    let mut trimmed = config.clone();
    trimmed.max_age = Duration::from_secs(1);
    trimmed.duplicate_window = Duration::from_secs(1);
    h.js.update_stream(trimmed).await.unwrap();
    let deadline = Deadline::new("the messages to expire", Duration::from_secs(30));
    while h.stream_info().await.unwrap().state.messages > 0 {
        deadline.tick().await;
    }
    h.js.update_stream(config).await.unwrap();
    let what = alarm(&h, "fork").await;
    assert!(what.contains("holds 0 messages up to seq 3"), "{what}");
    refused(&h, "start", &on(job)).await;
    assert_eq!(stream_last(&h).await, 3, "nothing published over the hole");
}

/// An event larger than the NATS server takes (a terminate's purge of 200
/// snapshots, on a server of `max_payload: 8192`): the relay publishes
/// everything before it, raises the `publish` alarm naming the seq and the
/// fix, and bcp takes no commands, rather than acknowledge commands it can
/// never publish while the relay retries for ever. Once the server takes
/// it, bcp publishes it and takes commands again by itself.
#[tokio::test]
async fn an_event_larger_than_nats_takes_raises_an_alarm_until_it_can_be_published() {
    let mut h = Harness::start_configured("max_payload: 8192", &[]).await;
    let job = id();
    h.cmd("p1", "create", &create(job)).await;
    h.cmd("p1", "start", &on(job)).await;
    let taken = chrono::Utc::now();
    let recorded = futures::future::join_all((0..200).map(|_| {
        let body = snapshot(job, taken);
        let h = &h;
        async move { h.cmd("p1", "record-snapshot", &body).await }
    }))
    .await;
    assert!(recorded.iter().all(|r| r["ok"] == json!(true)));
    h.cmd("p1", "stop", &on(job)).await;
    let purge = *seqs(&h.cmd("p1", "terminate", &on(job)).await)
        .last()
        .unwrap();
    assert_eq!(purge, 205);

    let what = alarm(&h, "publish").await;
    assert!(
        what.contains("the event at seq 205") && what.contains("max_payload (8192 bytes)"),
        "{what}"
    );
    refused(&h, "start", &on(job)).await;
    h.wait_stream_last_seq(204).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stream_last(&h).await,
        204,
        "everything before it, nothing past"
    );
    let (_, s) = status(&h).await;
    assert_eq!(s["published_seq"], json!(204), "what the stream holds: {s}");
    let log = h.bcp_log_text();
    let connects = log.matches("relay connected").count();
    assert!(
        connects < 6,
        "the relay backs off while it cannot publish ({connects} connections):\n{log}"
    );

    // A server of NATS's default max_payload, on the same store.
    let (port, store) = (h.nats.port, h.nats.store.clone());
    h.restart_nats(port, &store).await;
    h.caught_up_stream(205).await;
    let r = h.cmd_until_ok("p1", "start", &on(job)).await;
    assert_eq!(seqs(&r), [206]);
    let (code, s) = status(&h).await;
    assert_eq!((code, &s["alarms"]), (Some(0), &json!([])), "{s}");
    h.stop_and_verify(206).await;
}

/// JetStream lost its store (the lease bucket recreated, numbered from 1
/// again) and another process's lease entry now carries the revision this
/// bcp's has: the renewal reads whose entry it is rather than update the
/// revision blindly, so it leaves the other's entry alone and raises the
/// `writer` alarm.
#[tokio::test]
async fn a_lease_renewal_never_overwrites_another_holders_entry_of_the_same_revision() {
    let h = Harness::start_with(&["--lease-ttl", "60"]).await;
    let bucket = h.js.get_key_value("BCP_WRITERS").await.unwrap();
    // Renewed every 20 s: act between two renewals.
    let mine = bucket.entry(STREAM).await.unwrap().expect("bcp's lease");
    let config =
        h.js.get_stream("KV_BCP_WRITERS")
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
    h.js.delete_stream("KV_BCP_WRITERS").await.unwrap();
    h.js.create_stream(config).await.unwrap();
    let bucket = h.js.get_key_value("BCP_WRITERS").await.unwrap();
    for _ in 1..mine.revision {
        bucket.put("filler", "x".into()).await.unwrap();
    }
    let other = json!({"store": "elsewhere:/var/lib/other.redb", "pid": 7, "since": "2026-01-01T00:00:00Z"});
    let revision = bucket
        .put(STREAM, serde_json::to_vec(&other).unwrap().into())
        .await
        .unwrap();
    assert_eq!(
        revision, mine.revision,
        "the other's entry has bcp's revision"
    );

    let what = alarm(&h, "writer").await;
    assert!(what.contains("elsewhere:/var/lib/other.redb"), "{what}");
    let entry = bucket
        .get(STREAM)
        .await
        .unwrap()
        .expect("the other's lease");
    assert_eq!(
        serde_json::from_slice::<Value>(&entry).unwrap(),
        other,
        "left alone"
    );
}

/// JetStream refuses bcp (its API denied) for half the writer lease's TTL
/// and more: bcp cannot renew the lease, which another process could take
/// once it lapses, so it takes no commands (the `writer` alarm says so)
/// rather than acknowledge commands a second writer's stream would leave
/// out. Once the lease is renewed it takes commands again.
#[tokio::test]
async fn a_lapsed_lease_stops_commands_until_it_is_renewed() {
    let h = Harness::start_configured(&clients_may(""), &["--lease-ttl", "3"]).await;
    let job = id();
    assert_eq!(seqs(&h.cmd("p1", "create", &create(job)).await), [1]);
    h.nats
        .reconfigure(&clients_may(r#"publish: { deny: ["$JS.API.>"] }"#));
    let what = alarm(&h, "writer").await;
    assert!(
        what.contains("not renewed") && what.contains("lapses"),
        "{what}"
    );
    refused(&h, "start", &on(job)).await;

    h.nats.reconfigure(&clients_may(""));
    let r = h.cmd_until_ok("p1", "start", &on(job)).await;
    assert_eq!(seqs(&r), [2]);
    h.caught_up_stream(2).await;
    let (code, s) = status(&h).await;
    assert_eq!((code, &s["alarms"]), (Some(0), &json!([])), "{s}");
}

/// JetStream's storage full (README, "What survives what"): the relay's
/// publishes are refused, and so are the writer lease's renewals (its KV
/// bucket is in the same storage), so the `writer` alarm names JetStream's
/// refusal. Every command acknowledged meanwhile is in the log, and reaches
/// the stream, in order, once the storage is raised; the alarm clears by
/// itself.
#[tokio::test]
async fn a_full_jetstream_raises_the_writer_alarm_and_loses_nothing_acknowledged() {
    let mut h =
        Harness::start_configured("jetstream { max_file_store: 200KB }", &["--lease-ttl", "3"])
            .await;
    // A create's event is about 700 bytes: 200 KB holds a few hundred.
    let mut acked = 0u64;
    for _ in 0..600 {
        let r = h.cmd("p1", "create", &create(id())).await;
        if r["ok"] != json!(true) {
            assert_eq!(r["error"]["code"], json!("unavailable"), "{r}");
            break;
        }
        acked += 1;
        assert_eq!(seqs(&r), [acked]);
    }
    let what = alarm(&h, "writer").await;
    assert!(what.contains("insufficient resources"), "{what}");
    let (_, s) = status(&h).await;
    assert_eq!(s["head_seq"], json!(acked), "{s}");
    assert!(
        s["published_seq"].as_u64().expect("published_seq") < acked,
        "the relay is stalled: {s}"
    );

    h.nats.reconfigure("jetstream { max_file_store: 64MB }");
    let r = h.cmd_until_ok("p1", "create", &create(id())).await;
    assert_eq!(seqs(&r), [acked + 1]);
    h.caught_up_stream(acked + 1).await;
    let deadline = Deadline::new("the writer alarm cleared", Duration::from_secs(30));
    loop {
        let (code, s) = status(&h).await;
        if s["alarms"] == json!([]) {
            assert_eq!(
                (code, &s["taking_commands"]),
                (Some(0), &json!(true)),
                "{s}"
            );
            break;
        }
        deadline.tick().await;
    }
    h.stop_and_verify(acked + 1).await;
}

/// A single-mode bcp acknowledges a command once its store has it, before
/// the stream does. Such a store started in a group must not drop what the
/// stream lacks as "never acknowledged": the group node refuses it,
/// changing nothing, until single mode has published it; then it joins.
#[tokio::test]
async fn a_group_node_never_drops_what_a_single_mode_serve_acknowledged() {
    let mut h = Harness::start_configured(&clients_may(""), &[]).await;
    let job = id();
    assert_eq!(seqs(&h.cmd("p1", "create", &create(job)).await), [1]);
    h.caught_up_stream(1).await;
    h.nats
        .reconfigure(&clients_may(r#"publish: { deny: ["bcp.evt.>"] }"#));
    // Acknowledged (in the store), not published.
    let started = h.cmd("p1", "start", &on(job)).await;
    assert_eq!(seqs(&started), [2], "{started}");
    h.kill_bcp();
    assert_eq!(stream_last(&h).await, 1);

    h.serve_args = ["--group", "g1", "--node", "n1", "--stream-replicas", "1"]
        .map(str::to_owned)
        .to_vec();
    h.spawn_bcp();
    let status = h.bcp_exit().await;
    assert_eq!(status.code(), Some(1), "the group node refuses the store");
    let log = h.bcp_log_text();
    assert!(
        log.contains("last served by a single-mode bcp serve") && log.contains("holds seqs 2..=2"),
        "{log}"
    );
    let db = h.db();
    let out = support::bcp_cli_ok(&["audit", "verify", "--db", db.to_str().unwrap()]).await;
    assert!(
        out.starts_with("ok: 2 events verified"),
        "nothing was changed: {out}"
    );

    // Published by single mode, the store joins the group and leads it.
    h.nats.reconfigure(&clients_may(""));
    h.serve_args.clear();
    h.start_bcp().await;
    h.caught_up_stream(2).await;
    h.stop_bcp().await;
    h.serve_args = ["--group", "g1", "--node", "n1", "--stream-replicas", "1"]
        .map(str::to_owned)
        .to_vec();
    h.start_bcp().await;
    let r = h.cmd_until_ok("p1", "stop", &on(job)).await;
    assert_eq!(seqs(&r), [3], "{r}");
    h.caught_up_stream(3).await;
}

/// A stray message lands where the relay is about to publish: the relay's
/// publish (Nats-Expected-Last-Sequence) fails, and bcp halts rather than
/// take the stray for its own event and skip it. The command acknowledged
/// before is in the log (durable) and reaches a fresh stream once the
/// forked one is replaced, as the README says: stop, verify, replace,
/// start.
#[tokio::test]
async fn a_stray_publish_that_beats_the_relay_is_never_skipped() {
    // The timer check is kept out of the way: the relay finds this one.
    let mut h = Harness::start_with(&["--stream-check-interval", "3600"]).await;
    let job = id();
    assert_eq!(seqs(&h.cmd("p1", "create", &create(job)).await), [1]);
    h.caught_up_stream(1).await;

    assert_eq!(
        stray(&h, format!("bcp.evt.p1.{job}.JobStarted"), "{}").await,
        2
    );
    let start = on(job);
    let started = h.cmd("p1", "start", &start).await;
    assert_eq!(
        seqs(&started),
        [2],
        "committed to the log before the fork is known"
    );
    let what = alarm(&h, "fork").await;
    assert!(
        what.contains("the stream's seq 2 holds a message bcp did not write")
            && what.contains("the log's seq 2 is event"),
        "{what}"
    );
    refused(&h, "stop", &on(job)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stream_last(&h).await,
        2,
        "the relay skipped nothing and published nothing past the stray"
    );

    let status = h.stop_bcp().await;
    assert_eq!(
        status.code(),
        Some(0),
        "a halted relay does not hold up the drain"
    );
    let db = h.db();
    let (code, out, err) = bcp_cli_text(&["audit", "verify", "--db", db.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    h.js.delete_stream(STREAM)
        .await
        .expect("delete the forked stream");
    h.start_bcp().await;
    let events = h.caught_up_stream(2).await;
    assert_eq!(events[1]["type"], json!("JobStarted"));
    assert_eq!(events[1]["command_id"], start["command_id"]);
    let mut retried = h.cmd("p1", "start", &start).await;
    assert_eq!(retried["duplicate"], json!(true));
    retried["duplicate"] = json!(false);
    assert_eq!(retried, started);
    assert_eq!(seqs(&h.cmd("p1", "stop", &on(job)).await), [3]);
    h.stop_and_verify(3).await;
}

/// A message published while bcp is stopped: bcp starts (queries and
/// status answer) but takes no commands, and says where the stream went
/// past its log.
#[tokio::test]
async fn a_stray_publish_while_stopped_is_found_at_start() {
    let mut h = Harness::start().await;
    let job = id();
    h.cmd("p1", "create", &create(job)).await;
    h.caught_up_stream(1).await;
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    assert_eq!(
        stray(&h, format!("bcp.evt.p1.{job}.JobStarted"), "{}").await,
        2
    );

    h.start_bcp().await;
    let what = alarm(&h, "fork").await;
    assert!(
        what.contains("seq 2") && what.contains("ahead of the log"),
        "{what}"
    );
    let message = refused(&h, "start", &on(job)).await;
    assert!(message.contains("seq 2"), "{message}");
    let (_, s) = status(&h).await;
    assert_eq!(s["head_seq"], json!(1), "nothing appended: {s}");
    assert_eq!(stream_last(&h).await, 2);
}

/// An empty store (a lost file, a wrong --db) and a stale copy of the store
/// are each started against the populated stream: bcp serve exits non-zero
/// with the fix, and the stream is untouched. The fix, followed: import the
/// stream into a store and serve it; old command_ids stay duplicates.
#[tokio::test]
async fn an_empty_or_stale_store_refuses_to_start() {
    let mut h = Harness::start().await;
    let job = id();
    let created = create(job);
    h.cmd("p1", "create", &created).await;
    h.cmd("p1", "start", &on(job)).await;
    h.caught_up_stream(2).await;
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    let stale = h.path("stale.redb");
    std::fs::copy(h.db(), &stale).expect("copy the store");
    h.start_bcp().await;
    let stop = on(job);
    assert_eq!(seqs(&h.cmd("p1", "stop", &stop).await), [3]);
    h.caught_up_stream(3).await;
    assert_eq!(h.stop_bcp().await.code(), Some(0));

    let url = h.nats.url();
    let (code, err) = serve_refused(&h.path("typo.redb"), &url, &[]).await;
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("holds this log up to seq 3")
            && err.contains("only up to seq 0")
            && err.contains("empty"),
        "{err}"
    );
    assert!(
        err.contains(&format!("bcp import --db NEW.redb --from-nats {url}")),
        "{err}"
    );
    let (code, stale_err) = serve_refused(&stale, &url, &[]).await;
    assert_ne!(code, Some(0), "{stale_err}");
    assert!(
        stale_err.contains("only up to seq 2") && stale_err.contains("stale"),
        "{stale_err}"
    );
    // Neither blames another process first (an alarm that said "another
    // bcp serve is writing this log").
    for err in [&err, &stale_err] {
        assert!(!err.contains("another bcp serve"), "{err}");
    }
    assert_eq!(stream_last(&h).await, 3, "the stream is untouched");

    // The fix: a store rebuilt from the stream, served.
    std::fs::remove_file(h.db()).unwrap();
    let db = h.db();
    let (code, out, err) =
        bcp_cli_text(&["import", "--db", db.to_str().unwrap(), "--from-nats", &url]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    h.start_bcp().await;
    let again = h.cmd("p1", "stop", &stop).await;
    assert_eq!(
        again["duplicate"],
        json!(true),
        "an old command_id is not applied again: {again}"
    );
    assert_eq!(seqs(&h.cmd("p1", "start", &on(job)).await), [4]);
    h.caught_up_stream(4).await;
    h.stop_and_verify(4).await;
}

/// A second `bcp serve` on another store, next to the running one, even on
/// a stream with no events yet (so the empty-store rule does not apply):
/// the writer lease refuses it, naming the holder, and every command is
/// answered by the one writer.
#[tokio::test]
async fn a_second_server_on_another_store_is_refused() {
    let mut h = Harness::start_with(&["--lease-ttl", "3"]).await;
    let url = h.nats.url();
    let (code, err) = serve_refused(&h.path("other.redb"), &url, &["--lease-ttl", "3"]).await;
    assert_ne!(code, Some(0), "{err}");
    let holder = h.db().canonicalize().unwrap();
    assert!(
        err.contains("another bcp serve writes the stream BCP_EVENTS")
            && err.contains(&holder.display().to_string()),
        "{err}"
    );
    let (_, s) = status(&h).await;
    assert!(
        s["writer"]
            .as_str()
            .unwrap()
            .ends_with(&holder.display().to_string()),
        "{s}"
    );

    let jobs: Vec<Uuid> = (0..10).map(|_| id()).collect();
    for (i, job) in jobs.iter().enumerate() {
        assert_eq!(
            seqs(&h.cmd("p1", "create", &create(*job)).await),
            [i as u64 + 1]
        );
    }
    h.caught_up_stream(10).await;
    h.stop_and_verify(10).await;
}

/// Settings the audit trail depends on, changed through the stream-update
/// API: a message limit (it would trim the trail) stops commands until it
/// is undone; a seal stops them for good. bcp never changes the stream back
/// itself.
#[tokio::test]
async fn stream_settings_changed_behind_bcps_back_stop_commands() {
    let h = Harness::start_with(&["--stream-check-interval", "1"]).await;
    let job = id();
    h.cmd("p1", "create", &create(job)).await;
    h.caught_up_stream(1).await;
    let mut config = h.stream_info().await.unwrap().config;

    config.max_messages = 10;
    h.js.update_stream(config.clone())
        .await
        .expect("set max_msgs");
    let what = alarm(&h, "stream_config").await;
    assert!(what.contains("max_msgs 10"), "{what}");
    let message = refused(&h, "start", &on(job)).await;
    assert!(message.contains("max_msgs 10"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.stream_info().await.unwrap().config.max_messages,
        10,
        "bcp does not undo it"
    );

    config.max_messages = -1;
    h.js.update_stream(config.clone())
        .await
        .expect("undo max_msgs");
    assert_eq!(seqs(&h.cmd_until_ok("p1", "start", &on(job)).await), [2]);
    h.caught_up_stream(2).await;

    config.sealed = true;
    h.js.update_stream(config).await.expect("seal");
    let what = alarm(&h, "stream_config").await;
    assert!(what.contains("sealed"), "{what}");
    refused(&h, "stop", &on(job)).await;
    let (_, s) = status(&h).await;
    assert_eq!(s["head_seq"], json!(2), "{s}");
    assert_eq!(stream_last(&h).await, 2);
}

// ------------------------------------------------------------ group mode

/// One request with a short timeout; `None` on a timeout or no responders.
async fn try_cmd(client: &async_nats::Client, verb: &str, body: &Value) -> Option<Value> {
    let subject = format!("bcp.cmd.p1.{verb}");
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        client.request(subject, serde_json::to_vec(body).unwrap().into()),
    )
    .await;
    match r {
        Ok(Ok(m)) => Some(serde_json::from_slice(&m.payload).expect("a JSON reply")),
        _ => None,
    }
}

/// Send until a definitive reply (anything but `unavailable`), the same
/// body (so the same command_id) every time, as a producer must.
async fn cmd_definitive(client: &async_nats::Client, verb: &str, body: &Value) -> Value {
    let deadline = Deadline::new(
        format!("a definitive reply to {verb}"),
        Duration::from_secs(90),
    );
    loop {
        if let Some(r) = try_cmd(client, verb, body).await
            && r["error"]["code"] != json!("unavailable")
        {
            return r;
        }
        deadline.tick().await;
    }
}

/// Three nodes on a 3-node JetStream cluster: one leader takes commands,
/// the followers apply the stream to their own stores and answer queries
/// from them (saying how far they applied), and `bcp status` lists all
/// three.
#[tokio::test]
async fn a_group_has_one_leader_and_followers_that_apply_the_stream() {
    let mut c = support::cluster::Cluster::start(3).await;
    let leader = c.leader(3).await;
    let job = id();
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "create", &create(job)).await),
        [1]
    );
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "start", &on(job)).await),
        [2]
    );
    let statuses = c.all_at(3, 2).await;
    for s in &statuses {
        let leads = s["node"] == json!(c.nodes[leader].0);
        assert_eq!(
            s["role"],
            json!(if leads { "leader" } else { "follower" }),
            "{s}"
        );
        assert_eq!(s["group"], json!(support::cluster::GROUP));
        assert_eq!(s["alarms"], json!([]), "{s}");
        assert_eq!(s["published_seq"], json!(2), "{s}");
        assert_eq!(s["writer"].is_null(), !leads, "{s}");
    }
    // Every node answers queries (a queue group), each from its store.
    for _ in 0..10 {
        let r = c
            .client
            .request(
                "bcp.query._admin.job",
                serde_json::to_vec(&json!({"job_id": job})).unwrap().into(),
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["job"]["state"], json!("Active"), "{v}");
        assert_eq!(v["as_of_seq"], json!(2), "{v}");
    }
    let (code, out, err) = bcp_cli_text(&["status", "--nats", &c.urls()]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.matches("follower").count(), 2, "{out}");
    assert_eq!(out.matches("leader").count(), 1, "{out}");

    // A fourth process given the name of one of them, on its own store:
    // it follows (another store, another lease holder), and bcp status
    // says the name is taken twice.
    let twin = c.add_node("b2", "b2-twin");
    c.spawn_node(twin);
    c.all_at(4, 2).await;
    let (code, out, err) = bcp_cli_text(&["status", "--nats", &c.urls()]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("2 processes answer as node b2 of group"),
        "{err}"
    );
    assert_eq!(out.matches("leader").count(), 1, "{out}");
}

/// Servers whose clients are `app`, who may do anything, unless they log
/// in as `user` (password the same), who may not publish on `deny`.
fn a_user_denied(user: &str, deny: &str) -> String {
    format!(
        r#"authorization {{ users = [
  {{ user: app, password: app }},
  {{ user: {user}, password: {user}, permissions: {{ publish: {{ deny: ["{deny}"] }} }} }}
] }}
no_auth_user: app"#
    )
}

/// A leader that renews its lease but can publish nothing (here its NATS
/// user may not publish events) must not keep the group from taking
/// commands: once it has published nothing for three lease TTLs while
/// events wait, it steps down, drops what it decided alone, and leaves
/// the lease to the others for a while; a node that can publish leads and
/// answers the producer's retry, and the first one follows it.
#[tokio::test]
async fn a_leader_that_cannot_publish_leaves_the_lease_to_one_that_can() {
    let auth = a_user_denied("mute", "bcp.evt.>");
    let mut c = support::cluster::Cluster::start_with(1, &auth).await;
    let able = c.leader(1).await;
    let r = cmd_definitive(&c.client, "create", &create(id())).await;
    assert_eq!(seqs(&r), [1], "{r}");
    let mute = c.add_node("b2", "b2");
    c.spawn_node_as(mute, Some(("mute", "mute")));
    c.all_at(2, 1).await;
    // The able node stops (its lease given up): the mute one leads.
    assert_eq!(c.stop_node(able).await, Some(0));
    assert_eq!(c.leader(1).await, mute);
    c.spawn_node(able);
    let r = cmd_definitive(&c.client, "create", &create(id())).await;
    assert_eq!(seqs(&r), [2], "{r}");
    assert_eq!(c.leader(2).await, able);
    c.all_at(2, 2).await;
    logged(
        &c,
        mute,
        &[
            "stepping down: nothing published for",
            "dropping seqs 2..=2",
        ],
    );
}

/// A brand-new group whose first leader can publish nothing: its term
/// decides a command, no reply leaves, and it steps down. Its store then
/// holds an event against an empty stream. The node cannot tell that from
/// a stream that lost acknowledged events (a leader killed mid-term has
/// not marked the acks after its last commit, and a stream can lose its
/// data and keep its name), so it refuses, changing nothing, and says
/// that its store records none and what to do if it could not publish.
/// Done (its store removed, the node restarted), it follows the node that
/// can publish, which answered the producer's retry.
#[tokio::test]
async fn a_first_leader_that_published_nothing_refuses_saying_how_to_rejoin() {
    let auth = a_user_denied("mute", "bcp.evt.>");
    let mut c = support::cluster::Cluster::start_with(0, &auth).await;
    let mute = c.add_node("b1", "b1");
    c.spawn_node_as(mute, Some(("mute", "mute")));
    assert_eq!(c.leader(1).await, mute);
    let body = create(id());
    assert_eq!(
        try_cmd(&c.client, "create", &body).await,
        None,
        "no reply before an ack"
    );
    // Decided and fsynced by the mute leader, never published.
    c.all_at(1, 1).await;
    ends_saying(
        &mut c,
        mute,
        "is missing or empty but this store holds 1 events",
    )
    .await;
    logged(
        &c,
        mute,
        &[
            "stepping down: nothing published for",
            "This store records no acknowledgement from the stream for any of its events: if this node led a new group first and could not publish",
        ],
    );
    assert_eq!(
        bcp::store::Store::open_read_only(&c.db(mute), 1 << 20)
            .unwrap()
            .head_seq()
            .unwrap(),
        1,
        "nothing was changed"
    );
    let able = c.add_node("b2", "b2");
    c.spawn_node(able);
    let r = cmd_definitive(&c.client, "create", &body).await;
    assert_eq!(seqs(&r), [1], "{r}");
    // What the refusal says to do: remove the store, restart the node.
    std::fs::remove_file(c.db(mute)).unwrap();
    c.spawn_node_as(mute, Some(("mute", "mute")));
    let at = c.all_at(2, 1).await;
    assert_eq!(c.leader(2).await, able, "{at:?}");
}

/// A node whose consumer delivers nothing must not keep the group without
/// a leader. In a review, a nats-server restarted after kill -9 kept a
/// broken copy of the stream, and a follower whose consumer it served
/// applied nothing, took the lease as the others died and held it "catching
/// up" for good. Here the node's NATS user may not pull. Behind and applying
/// nothing for a lease TTL, it gives the lease up, and a node that can lead
/// does.
#[tokio::test]
async fn a_node_that_cannot_catch_up_leaves_the_lease_to_one_that_can() {
    let auth = a_user_denied("stuck", "$JS.API.CONSUMER.MSG.NEXT.>");
    let mut c = support::cluster::Cluster::start_with(2, &auth).await;
    let first = c.leader(2).await;
    let stuck = c.add_node("b3", "b3");
    c.spawn_node_as(stuck, Some(("stuck", "stuck")));
    let deadline = Deadline::new("b3 answering bcp.status", Duration::from_secs(30));
    while c.statuses().await.len() < 3 {
        deadline.tick().await;
    }
    for seq in 1..=20 {
        let r = cmd_definitive(&c.client, "create", &create(id())).await;
        assert_eq!(seqs(&r), [seq], "{r}");
    }
    // bcp status shows it: its head, and the stream 20 events past it.
    let deadline = Deadline::new("b3 showing itself behind", Duration::from_secs(30));
    loop {
        let statuses = c.statuses().await;
        let b3 = statuses.iter().find(|s| s["node"] == json!("b3"));
        if let Some(s) = b3.filter(|s| s["behind_stream"] == json!(20)) {
            assert_eq!(
                (&s["head_seq"], &s["role"]),
                (&json!(0), &json!("follower")),
                "{s}"
            );
            break;
        }
        deadline.tick().await;
    }
    let healthy = 1 - first;
    c.kill_node(first);
    c.kill_node(healthy);
    // Alone, b3 takes the lease once it lapses, and cannot catch up.
    tokio::time::sleep(Duration::from_secs(8)).await;
    c.spawn_node(healthy);
    let r = cmd_definitive(&c.client, "create", &create(id())).await;
    assert_eq!(seqs(&r), [21], "{r}");
    logged(&c, stuck, &["no event applied for", "giving the lease up"]);
}

/// A leader stopped by SIGTERM under load publishes what it committed and
/// sends those replies before it gives the lease up: nothing it decided is
/// dropped on its next start, and its producers are not left to time out.
#[tokio::test]
async fn a_leader_stopped_under_load_publishes_what_it_committed() {
    let mut c = support::cluster::Cluster::start(3).await;
    let leader = c.leader(3).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut producers = Vec::new();
    for _ in 0..4 {
        let (client, stop) = (c.producer().await, stop.clone());
        producers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                cmd_definitive(&client, "create", &create(id())).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        c.stop_node(leader).await,
        Some(0),
        "the leader drains on SIGTERM"
    );
    stop.cancel();
    for p in producers {
        p.await.expect("a producer");
    }
    let log = c.node_log_text(leader);
    let stopped = log
        .lines()
        .rfind(|l| l.contains("bcp serve stopped"))
        .unwrap_or_else(|| panic!("no stop line:\n{log}"));
    let field = |name: &str| {
        let at = stopped
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("{stopped}"));
        stopped[at + name.len() + 1..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(field("head_seq") > 0, "{stopped}");
    assert_eq!(field("head_seq"), field("published_seq"), "{stopped}");
    assert!(!log.contains("replies withheld"), "{log}");
}

/// A leader's terms in a node's log: (start, end) of each, ends at the
/// first `stepping down`, `term ended`, `bcp serve stopped` or `KILLED`
/// line: from `stepping down` on a leader publishes and answers nothing,
/// and it logs `term ended` only after its drain, which may outlast a
/// lease it lost.
fn terms(log: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<String> = None;
    for line in log.lines() {
        let Some(time) = line.split_whitespace().next() else {
            continue;
        };
        if line.contains("leader: taking commands") {
            open = Some(time.to_owned());
        } else if (line.contains("stepping down")
            || line.contains("term ended")
            || line.contains("bcp serve stopped")
            || line.ends_with(" KILLED"))
            && let Some(start) = open.take()
        {
            out.push((start, time.to_owned()));
        }
    }
    assert!(open.is_none(), "a term still open at the end:\n{log}");
    out
}

/// The failover harness (`just failover` runs more rounds): 3 NATS nodes,
/// 3 bcp nodes, concurrent producers that retry with the same command_id;
/// the leader is killed (kill -9) each round and restarted, and one NATS
/// node is killed once. At the end every acknowledged command is in the
/// stream exactly once, the stream is gapless and chained, every node
/// reports the same head, `bcp audit verify` passes on every store and
/// their digests are equal, and no two nodes ever led at the same time.
#[tokio::test]
async fn failover_keeps_every_acknowledged_command_exactly_once() {
    let rounds: usize = std::env::var("BCP_FAILOVER_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let mut c = support::cluster::Cluster::start(3).await;
    c.leader(3).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Value, Value)>::new()));
    let mut producers = Vec::new();
    for _ in 0..4 {
        let (client, stop, acked) = (c.producer().await, stop.clone(), acked.clone());
        producers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let job = id();
                // `terminate` appends two events (its job has a snapshot).
                let verbs = std::iter::once("create").chain(
                    ["start", "record-snapshot", "stop", "terminate"]
                        .into_iter()
                        .cycle(),
                );
                for (i, verb) in verbs.enumerate() {
                    let body = match verb {
                        "create" => create(job),
                        // Recent, so that no sweep expires it during the test.
                        "record-snapshot" => snapshot(
                            job,
                            chrono::Utc::now() - chrono::Duration::minutes(30 - i as i64),
                        ),
                        _ => on(job),
                    };
                    let reply = cmd_definitive(&client, verb, &body).await;
                    assert_eq!(reply["ok"], json!(true), "{verb}: {reply}");
                    acked.lock().unwrap().push((body, reply));
                    if stop.is_cancelled() || i >= 20 {
                        break;
                    }
                }
            }
        }));
    }
    let mut failovers = Vec::new();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = c.leader(3).await;
        let killed = std::time::Instant::now();
        c.kill_node(leader);
        let probe = cmd_definitive(&c.client, "create", &create(id())).await;
        assert_eq!(probe["ok"], json!(true), "{probe}");
        failovers.push(killed.elapsed());
        if killed.elapsed() > Duration::from_secs(5) {
            // Not a failure by itself (no timing assertions): the logs say why.
            for i in 0..3 {
                let log = c.node_log_text(i);
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("--- slow failover, {} ---", c.nodes[i].0);
                tail.iter().rev().for_each(|l| eprintln!("{l}"));
            }
        }
        c.spawn_node(leader);
        if round == 1 {
            c.kill_server(1);
            tokio::time::sleep(Duration::from_secs(2)).await;
            c.restart_server(1);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for p in producers {
        p.await.expect("a producer");
    }
    eprintln!("kill -9 of the leader to the first command acknowledged by the next: {failovers:?}");

    c.leader(3).await;
    let mut stream = c.js.get_stream(STREAM).await.expect("stream");
    let last = stream.info().await.unwrap().state.last_sequence;
    let statuses = c.all_at(3, last).await;
    assert!(
        statuses.iter().all(|s| s["alarms"] == json!([])),
        "{statuses:?}"
    );
    let mut msgs = Vec::new();
    for seq in 1..=last {
        msgs.push(stream.get_raw_message(seq).await.expect("stream message"));
    }
    let envelopes = support::check_stream(&msgs, last);
    // Every command whole, acknowledged or not (a leader killed mid-command
    // leaves none of it).
    for (i, e) in envelopes.iter().enumerate() {
        if e["type"] == json!("JobTerminated") {
            let next = envelopes.get(i + 1);
            assert_eq!(
                next.map(|n| (&n["type"], &n["command_id"])),
                Some((&json!("SnapshotsPurged"), &e["command_id"])),
                "the terminate at seq {} is cut in two",
                e["seq"]
            );
        }
    }
    let mut by_command: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for e in &envelopes {
        by_command
            .entry(e["command_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["seq"].as_u64().unwrap());
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the producers got {} commands acknowledged",
        acked.len()
    );
    assert!(
        acked.iter().any(|(_, reply)| seqs(reply).len() == 2),
        "no terminate (two events) was acknowledged"
    );
    for (body, reply) in &acked {
        let id = body["command_id"].as_str().unwrap();
        assert_eq!(
            by_command.get(id).cloned().unwrap_or_default(),
            seqs(reply),
            "command {id} ({reply}) in the stream"
        );
    }
    // A command_id reused for another command is a conflict on the leader
    // now, whichever node decided it: a node that applied it from the
    // stream rebuilt its record from the log (its verb, project and job).
    for (body, _) in acked.iter().step_by(acked.len() / 20) {
        let job = serde_json::from_value(body["job_id"].clone()).unwrap();
        let (verb, mut other) = match body.get("deployment") {
            Some(_) => ("start", on(job)),
            None => ("create", create(job)),
        };
        other["command_id"] = body["command_id"].clone();
        let reply = cmd_definitive(&c.client, verb, &other).await;
        assert_eq!(
            reply["error"]["code"],
            json!("command_id_conflict"),
            "{verb} {other}: {reply}"
        );
    }

    let mut periods: Vec<(String, String, usize)> = Vec::new();
    for i in 0..3 {
        assert_eq!(c.stop_node(i).await, Some(0), "node {i} drains on SIGTERM");
        periods.extend(
            terms(&c.node_log_text(i))
                .into_iter()
                .map(|(a, b)| (a, b, i)),
        );
    }
    periods.sort();
    assert!(periods.len() > rounds, "{periods:?}");
    for w in periods.windows(2) {
        assert!(w[0].1 <= w[1].0, "two leaders at once: {w:?}");
    }
    let mut digests = Vec::new();
    for i in 0..3 {
        let db = c.db(i);
        let db = db.to_str().unwrap();
        let (code, out, err) = bcp_cli_text(&["audit", "verify", "--db", db]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(
            out.starts_with(&format!("ok: {last} events verified")),
            "{out}"
        );
        let (code, out, err) = bcp_cli_text(&["audit", "digest", "--db", db]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        digests.push(out);
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
}

/// A node whose store holds events the stream never acknowledged (decided
/// locally, never published: here appended to a stopped node's store
/// offline, as a leader killed between its commit and its publish leaves
/// them) drops exactly that tail when it starts, applies the stream in its
/// place, and rejoins with the same log as every other node.
#[tokio::test]
async fn a_node_drops_the_tail_the_stream_never_acknowledged() {
    let mut c = support::cluster::Cluster::start(3).await;
    let leader = c.leader(3).await;
    let job = id();
    cmd_definitive(&c.client, "create", &create(job)).await;
    cmd_definitive(&c.client, "start", &on(job)).await;
    c.all_at(3, 2).await;
    let follower = (leader + 1) % 3;
    assert_eq!(c.stop_node(follower).await, Some(0));

    let unacknowledged = create(id());
    {
        use bcp::store::{ledger::Pending, pipeline::Pipeline};
        let store = bcp::store::Store::open_existing(&c.db(follower)).unwrap();
        let mut ledger = Pipeline::open(store).unwrap();
        let cmd = bcp::domain::command::decode(
            "p1",
            "create",
            unacknowledged.to_string().as_bytes(),
            None,
        )
        .unwrap();
        let replies = ledger
            .execute(&[Pending::new(cmd)], chrono::Utc::now(), &mut Uuid::now_v7)
            .unwrap();
        assert_eq!(
            seqs(&serde_json::from_slice(&replies[0].to_json()).unwrap()),
            [3]
        );
    }
    let stop = on(job);
    assert_eq!(seqs(&cmd_definitive(&c.client, "stop", &stop).await), [3]);

    c.spawn_node(follower);
    c.all_at(3, 3).await;
    assert!(
        c.node_log_text(follower).contains("dropping seqs 3..=3"),
        "{}",
        c.node_log_text(follower)
    );
    assert_eq!(c.stop_node(follower).await, Some(0));
    let store = bcp::store::Store::open_existing(&c.db(follower)).unwrap();
    let third = store.events(3, 3).unwrap().pop().unwrap();
    assert_eq!(
        json!(third.command_id),
        stop["command_id"],
        "the stream's seq 3 took its place"
    );
    assert_eq!(store.head_seq().unwrap(), 3);
    drop(store);
    let db = c.db(follower);
    let (code, out, err) = bcp_cli_text(&["audit", "verify", "--db", db.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    // The dropped command was never acknowledged: sent now, it is decided afresh.
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "create", &unacknowledged).await),
        [4]
    );
}

/// A group node answers no query with a state the stream has not
/// acknowledged: here a node restarted with an event in its store that
/// never reached the stream (its leader's term ended before the ack),
/// while JetStream has no quorum, so the node cannot check its log
/// against the stream. Its queries wait, then say `unavailable`; once the
/// stream is back, the node drops the event and answers without it.
#[tokio::test]
async fn a_group_node_answers_no_state_the_stream_has_not_acknowledged() {
    let mut c = support::cluster::Cluster::start_with(1, &clients_may("")).await;
    c.leader(1).await;
    let acked = id();
    cmd_definitive(&c.client, "create", &create(acked)).await;
    c.all_at(1, 1).await;
    assert_eq!(c.stop_node(0).await, Some(0));
    let unacknowledged = id();
    {
        use bcp::store::{ledger::Pending, pipeline::Pipeline};
        let store = bcp::store::Store::open_existing(&c.db(0)).unwrap();
        let mut ledger = Pipeline::open(store).unwrap();
        let body = create(unacknowledged).to_string();
        let cmd = bcp::domain::command::decode("p1", "create", body.as_bytes(), None).unwrap();
        let replies = ledger
            .execute(&[Pending::new(cmd)], chrono::Utc::now(), &mut Uuid::now_v7)
            .unwrap();
        assert!(replies[0].ok, "{:?}", replies[0].error);
    }
    // The JetStream API closed to clients, core NATS still open: the node
    // cannot check its log against the stream.
    c.reconfigure(&clients_may("publish: { deny: [\"$JS.API.>\"] }"));
    let deadline = Deadline::new("the JetStream API to close", Duration::from_secs(30));
    loop {
        let info = c.client.request("$JS.API.INFO", "".into());
        match tokio::time::timeout(Duration::from_secs(1), info).await {
            Ok(Ok(_)) => deadline.tick().await,
            _ => break,
        }
    }
    c.spawn_node(0);
    let client = c.client.clone();
    let job_query = async |job: Uuid| -> Value {
        let body = serde_json::to_vec(&json!({"job_id": job})).unwrap();
        let deadline = Deadline::new("a query answered", Duration::from_secs(30));
        loop {
            let asked = client.request("bcp.query.p1.job", body.clone().into());
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), asked).await
                && let Ok(v) = serde_json::from_slice::<Value>(&r.payload)
            {
                return v;
            }
            deadline.tick().await;
        }
    };
    for job in [unacknowledged, acked] {
        let v = job_query(job).await;
        assert_eq!(v["error"]["code"], json!("unavailable"), "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("through seq 2 is not yet acknowledged by the stream"),
            "{message}"
        );
    }
    c.reconfigure(&clients_may(""));
    c.leader(1).await;
    assert_eq!(job_query(acked).await["job"]["state"], json!("Inactive"));
    let v = job_query(unacknowledged).await;
    assert_eq!(v["error"]["code"], json!("not_found"), "{v}");
    assert_eq!(v["as_of_seq"], json!(1), "{v}");
    assert!(
        c.node_log_text(0).contains("dropping seqs 2..=2"),
        "{}",
        c.node_log_text(0)
    );
}

/// A NATS cluster whose messages hold at most 32 KiB: a job's history of
/// 400 entries (about 100 KB of JSON) comes in pages that each fit, every
/// entry once and in order, where one page of bcp's own size (up to 500
/// entries, 512 KiB) could not be sent at all.
#[tokio::test]
async fn pages_fit_a_small_max_payload() {
    let c = support::cluster::Cluster::start_with(1, "max_payload: 32768").await;
    c.leader(1).await;
    let job = id();
    cmd_definitive(&c.client, "create", &create(job)).await;
    let refused = futures::future::join_all((0..399).map(|_| {
        let stop = on(job);
        let client = c.client.clone();
        async move { cmd_definitive(&client, "stop", &stop).await }
    }))
    .await;
    assert!(
        refused
            .iter()
            .all(|r| r["error"]["code"] == json!("invalid_transition"))
    );
    let (mut seen, mut after, mut pages) = (Vec::new(), Value::Null, 0);
    loop {
        let body = serde_json::to_vec(&json!({"job_id": job, "after_seq": after})).unwrap();
        let r = c
            .client
            .request("bcp.query.p1.history", body.into())
            .await
            .unwrap();
        assert!(r.payload.len() <= 32768, "{} bytes", r.payload.len());
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["ok"], json!(true), "{v}");
        seen.extend(
            v["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_u64().unwrap()),
        );
        pages += 1;
        after = v["next_after_seq"].clone();
        if after.is_null() {
            break;
        }
    }
    assert_eq!(seen, (1..=400).collect::<Vec<u64>>());
    assert!(pages > 1, "{pages} pages");
}

/// In a group, an event larger than the NATS server takes that is not its
/// command's first (a terminate's purge, after its JobTerminated): nothing
/// of the command reaches the stream, which holds a command's events all
/// or none, and the `publish` alarm says why. (Cutting before the large
/// event alone published the JobTerminated without its purge, and a node
/// that took over then had a terminated job with its snapshots.)
#[tokio::test]
async fn a_group_publishes_none_of_a_command_with_an_event_too_large_for_nats() {
    let c = support::cluster::Cluster::start_with(1, "max_payload: 8192").await;
    c.leader(1).await;
    let job = id();
    cmd_definitive(&c.client, "create", &create(job)).await;
    cmd_definitive(&c.client, "start", &on(job)).await;
    let taken = chrono::Utc::now();
    futures::future::join_all((0..200).map(|_| {
        let body = snapshot(job, taken);
        let client = c.client.clone();
        async move { cmd_definitive(&client, "record-snapshot", &body).await }
    }))
    .await;
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "stop", &on(job)).await),
        [203]
    );
    // Never answered: its events are not on the stream.
    assert_eq!(try_cmd(&c.client, "terminate", &on(job)).await, None);
    let deadline = Deadline::new("the publish alarm", Duration::from_secs(30));
    let what = loop {
        let alarms: Vec<Value> = (c.statuses().await.iter())
            .flat_map(|s| s["alarms"].as_array().cloned().unwrap_or_default())
            .collect();
        if let Some(a) = alarms.iter().find(|a| a["kind"] == json!("publish")) {
            break a["message"].as_str().unwrap().to_owned();
        }
        deadline.tick().await;
    };
    assert!(what.contains("the event at seq 205"), "{what}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last =
        c.js.get_stream(STREAM)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence;
    assert_eq!(last, 203, "no part of the terminate");
}

/// Every client without credentials (the bcp nodes, the test's own) has
/// `permissions` (none: may do anything).
fn clients_may(permissions: &str) -> String {
    format!(
        r#"authorization {{ users = [ {{ user: "app", password: "app", permissions: {{ {permissions} }} }} ] }}
no_auth_user: "app""#
    )
}

/// A nats-server that takes smaller atomic batches than the relay's (its
/// `jetstream.limits.batch.max_msgs`, here 2) refuses a command's batch:
/// the leader sends the same events again in halves, and the command is
/// answered, not retried forever.
#[tokio::test]
async fn a_smaller_batch_limit_of_nats_server_is_met_in_halves() {
    let c = support::cluster::Cluster::start_configured(1, "limits { batch { max_msgs: 2 } }", "")
        .await;
    c.leader(1).await;
    let admin = async |body: Value| {
        let body = serde_json::to_vec(&body).unwrap();
        let subject = "bcp.cmd._admin.configure-region";
        let r = c.client.request(subject, body.into()).await.unwrap();
        serde_json::from_slice::<Value>(&r.payload).unwrap()
    };
    let full = json!({"command_id": id(), "region": "eu", "snapshot_store": "s", "oplog_store": "o", "sync_store": "y"});
    assert_eq!(admin(full).await["ok"], json!(true));
    for _ in 0..3 {
        let job = id();
        let mut body = create(job);
        body["region"] = json!("eu");
        cmd_definitive(&c.client, "create", &body).await;
        cmd_definitive(&c.client, "start", &on(job)).await;
    }
    // The region loses a store: its event and one per running job, 4.
    let reply = admin(json!({"command_id": id(), "region": "eu", "oplog_store": null})).await;
    assert_eq!(seqs(&reply), [8, 9, 10, 11], "{reply}");
    let stream = c.js.get_stream(STREAM).await.expect("stream");
    let mut batches = Vec::new();
    for seq in 8..=11 {
        let m = stream.get_raw_message(seq).await.expect("message");
        batches.push(
            m.headers
                .get("Nats-Batch-Id")
                .map(|v| v.as_str().to_owned()),
        );
    }
    assert!(batches.iter().all(Option::is_some), "{batches:?}");
    assert_eq!(batches[0], batches[1]);
    assert_eq!(batches[2], batches[3]);
    assert_ne!(batches[1], batches[2]);
    assert!(
        c.node_log_text(0)
            .contains("nats-server takes smaller atomic batches"),
        "{}",
        c.node_log_text(0)
    );
}

/// A second process given a running node's `--node` (on its own store, a
/// copy-paste slip) is another holder of the writer lease: it follows and
/// waits, and the group keeps one leader. Once the first stops, it leads.
#[tokio::test]
async fn a_second_process_with_a_nodes_name_never_leads_beside_it() {
    let mut c = support::cluster::Cluster::start(1).await;
    assert_eq!(c.leader(1).await, 0);
    let job = id();
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "create", &create(job)).await),
        [1]
    );
    let twin = c.add_node("b1", "b1-twin");
    c.spawn_node(twin);
    c.all_at(2, 1).await;
    // Longer than the lease's renewal (a third of 3 s) several times over.
    for _ in 0..12 {
        let statuses = c.statuses().await;
        let leaders: Vec<_> = statuses
            .iter()
            .filter(|s| s["role"] == json!("leader"))
            .map(|s| (s["pid"].clone(), s["db"].clone()))
            .collect();
        assert_eq!(leaders.len(), 1, "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(c.leader(2).await, 0, "the first keeps the lease");
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "start", &on(job)).await),
        [2]
    );
    assert_eq!(c.stop_node(0).await, Some(0));
    assert_eq!(c.leader(1).await, twin);
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "stop", &on(job)).await),
        [3]
    );
}

/// A group node whose store cannot join the stream is refused: it exits
/// non-zero saying why, and changes nothing. Here a store of another log,
/// and a store with events after the stream was deleted (lost): no node
/// creates it again.
#[tokio::test]
async fn a_group_node_refuses_a_store_it_cannot_join() {
    let mut c = support::cluster::Cluster::start(1).await;
    c.leader(1).await;
    cmd_definitive(&c.client, "create", &create(id())).await;

    let other = c.add_node("b9", "other");
    {
        use bcp::store::{ledger::Pending, pipeline::Pipeline};
        let store = bcp::store::Store::open_or_create(&c.db(other)).unwrap();
        let mut ledger = Pipeline::open(store).unwrap();
        let body = create(id()).to_string();
        let cmd = bcp::domain::command::decode("p1", "create", body.as_bytes(), None).unwrap();
        ledger
            .execute(&[Pending::new(cmd)], chrono::Utc::now(), &mut Uuid::now_v7)
            .unwrap();
    }
    let log_of = |db: &std::path::Path| {
        let store = bcp::store::Store::open_existing(db).unwrap();
        store.raw_events(1, u64::MAX).unwrap()
    };
    let before = log_of(&c.db(other));
    assert_eq!(before.len(), 1);
    c.spawn_node(other);
    ends_saying(&mut c, other, "holds another log than the stream").await;
    assert!(log_of(&c.db(other)) == before, "the store's log changed");

    assert_eq!(c.stop_node(0).await, Some(0));
    c.js.delete_stream(STREAM).await.expect("delete the stream");
    c.spawn_node(0);
    ends_on_a_lost_stream(&mut c, 0, "this store holds 1 events").await;
}

/// While no process takes a stream's commands (here the writer lease is
/// held by a process that does not answer: the node waits as a
/// follower), `bcp status` says so and exits 1, as for an alarm.
#[tokio::test]
async fn status_fails_while_no_process_takes_commands() {
    let mut c = support::cluster::Cluster::start(0).await;
    let kv =
        c.js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: "BCP_WRITERS".into(),
            max_age: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("lease bucket");
    let holder = json!({"store": "g1/b7 elsewhere:/var/lib/bcp.redb", "pid": 1, "since": "2026-01-01T00:00:00Z", "group": "g1"});
    kv.put(STREAM, serde_json::to_vec(&holder).unwrap().into())
        .await
        .expect("a lease held elsewhere");
    let node = c.add_node("b1", "b1");
    c.spawn_node(node);
    let deadline = Deadline::new("the node to follow", Duration::from_secs(30));
    while c.statuses().await.len() != 1 {
        deadline.tick().await;
    }
    let (code, out, err) = bcp_cli_text(&["status", "--nats", &c.urls()]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("follower"), "{out}");
    assert!(!out.contains("ALARM"), "{out}");
    assert!(
        err.contains("0 of the processes that answered take the commands of stream BCP_EVENTS"),
        "{err}"
    );
}

/// A single-mode bcp serve acknowledges a command once its own store has
/// it, before the stream does; a group node that took over from it, once
/// its lease lapsed (a paused or dead process), would lose those commands.
/// So a group node that finds a single-mode writer never leads: it raises
/// an alarm, and keeps it after the writer dies.
#[tokio::test]
async fn a_group_never_takes_over_from_a_single_mode_writer() {
    let mut c = support::cluster::Cluster::start(0).await;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bcp"));
    let log = std::fs::File::create(c.path("single.log")).unwrap();
    let mut single = support::procs::serve_command(bin, &c.path("single.redb"), &c.urls())
        .args(["--lease-ttl", "2"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("bcp serve (single mode)");
    let job = id();
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "create", &create(job)).await),
        [1]
    );
    let node = c.add_node("b1", "b1");
    c.spawn_node(node);
    c.all_at(2, 1).await;
    let kill = |child: &mut std::process::Child| {
        child.kill().unwrap();
        child.wait().unwrap();
    };
    kill(&mut single);
    // Well past the single writer's lease (2 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let statuses = c.statuses().await;
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    let s = &statuses[0];
    assert_eq!(s["role"], json!("follower"), "{s}");
    let alarms = s["alarms"].as_array().unwrap();
    assert!(
        alarms.iter().any(|a| a["kind"] == json!("writer")
            && a["message"]
                .as_str()
                .unwrap()
                .contains("a single-mode bcp serve writes the stream")),
        "{s}"
    );
    assert_eq!(try_cmd(&c.client, "start", &on(job)).await, None);
}

/// A stray message forks the stream under a group: the node stops taking
/// commands (a fork alarm, no leader). Once the stream is deleted, a node
/// with events ends, saying the stream was lost and how to republish it,
/// rather than keep an alarm about a stream that is gone; a leader too,
/// rather than make the stream again.
#[tokio::test]
async fn a_group_node_ends_when_its_forked_stream_is_deleted() {
    let mut c = support::cluster::Cluster::start(1).await;
    c.leader(1).await;
    let job = id();
    cmd_definitive(&c.client, "create", &create(job)).await;
    c.all_at(1, 1).await;
    c.js.publish(format!("bcp.evt.p1.{job}.JobStarted"), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let deadline = Deadline::new("the fork alarm", Duration::from_secs(30));
    loop {
        let s = c.statuses().await;
        if s.len() == 1
            && s[0]["role"] == json!("follower")
            && s[0]["alarms"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["kind"] == json!("fork"))
        {
            break;
        }
        deadline.tick().await;
    }
    let (code, out, err) = bcp_cli_text(&["status", "--nats", &c.urls()]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    c.js.delete_stream(STREAM).await.expect("delete the stream");
    ends_saying(
        &mut c,
        0,
        "is missing or empty but this store holds 1 events",
    )
    .await;

    // The same for a leader: it does not make the stream again (and
    // republish), it steps down and ends.
    let mut c = support::cluster::Cluster::start(1).await;
    c.leader(1).await;
    cmd_definitive(&c.client, "create", &create(id())).await;
    c.js.delete_stream(STREAM).await.expect("delete the stream");
    assert_eq!(try_cmd(&c.client, "create", &create(id())).await, None);
    ends_on_a_lost_stream(&mut c, 0, "this store holds").await;
}

/// A follower reading the stream when it is deleted ends too, saying the
/// stream was lost, rather than wait for it for good: its consumer would
/// retry against the missing stream without end, and no lease is taken
/// while how far behind the stream it is cannot be known.
#[tokio::test]
async fn a_follower_ends_when_the_stream_is_deleted_under_it() {
    let (mut c, leader) = two_nodes_at(1).await;
    let follower = 1 - leader;
    c.js.delete_stream(STREAM).await.expect("delete the stream");
    ends_on_a_lost_stream(&mut c, follower, "this store holds 1 events").await;
    ends_on_a_lost_stream(&mut c, leader, "this store holds").await;
}

/// A stream made again, empty, under a running group (by hand, or by a
/// node of an empty store starting meanwhile) lost what it acknowledged:
/// the leader does not publish the log into it again, which the other
/// nodes would not follow, and every node of events ends saying the
/// stream was lost; the stream stays empty.
#[tokio::test]
async fn a_group_ends_when_its_stream_is_made_again_empty() {
    let (mut c, leader) = two_nodes_at(1).await;
    let version = c.client.server_info().version.clone();
    c.js.delete_stream(STREAM).await.expect("delete the stream");
    c.js.create_stream(bcp::service::guard::stream_config(STREAM, 3, &version))
        .await
        .expect("make the stream again");
    for node in [1 - leader, leader] {
        ends_saying(
            &mut c,
            node,
            "is missing or empty but this store holds 1 events",
        )
        .await;
    }
    let stream = c.js.get_stream(STREAM).await.expect("the stream");
    let state = stream.get_info().await.expect("stream info").state;
    assert_eq!((state.messages, state.last_sequence), (0, 0));
}

/// A group's stream whose messages expired (a limit set, then taken away
/// again) is not the gapless log: each node in turn finds it forked, and
/// refuses to join it, rather than lead and step down without end.
#[tokio::test]
async fn a_group_refuses_a_stream_trimmed_under_it() {
    let (mut c, _) = two_nodes_at(2).await;
    let stream = c.js.get_stream(STREAM).await.expect("the stream");
    let config = stream.get_info().await.expect("stream info").config;
    let mut trimmed = config.clone();
    trimmed.max_age = Duration::from_secs(1);
    trimmed.duplicate_window = Duration::from_secs(1);
    c.js.update_stream(trimmed).await.expect("a message limit");
    let deadline = Deadline::new("the messages to expire", Duration::from_secs(30));
    while stream.get_info().await.expect("stream info").state.messages > 0 {
        deadline.tick().await;
    }
    c.js.update_stream(config)
        .await
        .expect("the limit taken away");
    for node in [0, 1] {
        // (Both expired by now; a node that read the stream between the
        // two expiries says it held 1.)
        ends_saying(&mut c, node, "is not the gapless log from seq 1: it holds ").await;
    }
}

/// The lease bucket deleted while no node leads (the leader killed; an
/// operator clearing a lease that seems stuck): the follower makes the
/// bucket again, takes the lease, and takes commands.
#[tokio::test]
async fn a_follower_leads_after_the_lease_bucket_is_deleted() {
    let (mut c, leader) = two_nodes_at(1).await;
    c.kill_node(leader);
    c.js.delete_stream("KV_BCP_WRITERS")
        .await
        .expect("delete the lease bucket");
    assert_eq!(c.leader(1).await, 1 - leader);
    let reply = cmd_definitive(&c.client, "create", &create(id())).await;
    assert_eq!(seqs(&reply), [2]);
}

/// A stream that lost events it had acknowledged (here restored, while the
/// group was stopped, from a copy one event short) is not a tail to drop:
/// each node refuses it, its store unchanged, naming the acknowledged
/// events the stream lacks. The leader knows how far it was acknowledged
/// from its term, the follower from the events it applied.
#[tokio::test]
async fn a_group_never_drops_events_the_stream_acknowledged_then_lost() {
    let (mut c, _) = two_nodes_at(3).await;
    let stream = c.js.get_stream(STREAM).await.expect("the stream");
    let config = stream.get_info().await.expect("stream info").config;
    let mut copy = Vec::new();
    for seq in 1..=2 {
        copy.push(stream.get_raw_message(seq).await.expect("a message"));
    }
    for node in [0, 1] {
        assert_eq!(c.stop_node(node).await, Some(0));
    }
    c.js.delete_stream(STREAM).await.expect("delete the stream");
    c.js.create_stream(config)
        .await
        .expect("make the stream again");
    for m in copy {
        let ack =
            c.js.publish_with_headers(m.subject.to_string(), m.headers, m.payload)
                .await
                .expect("publish");
        ack.await.expect("stored");
    }
    for node in [0, 1] {
        c.spawn_node(node);
        ends_saying(
            &mut c,
            node,
            "lacks seqs 3..=3 of this store's log, which it had acknowledged",
        )
        .await;
        let store = bcp::store::Store::open_existing(&c.db(node)).expect("open the store");
        assert_eq!(store.head_seq().expect("head"), 3, "the store changed");
    }
}

/// A leader killed mid-term has marked in its store how far JetStream had
/// acknowledged its log, as of each commit: the mark rides in every
/// commit's transaction. So when the stream then turns out to have lost
/// acknowledged events (restored from a copy of its first event only), the
/// restarted node refuses the stream, its store unchanged, instead of
/// dropping them as a tail no reply covered: they were answered, and this
/// store is the last place that holds them.
#[tokio::test]
async fn a_leader_killed_mid_term_keeps_what_the_stream_acknowledged_then_lost() {
    let mut c = support::cluster::Cluster::start(1).await;
    c.leader(1).await;
    let job = id();
    let mut seq = 0;
    for (verb, body) in [
        ("create", create(job)),
        ("start", on(job)),
        ("stop", on(job)),
    ]
    .into_iter()
    .chain(std::iter::once(("start", on(job))))
    {
        seq += 1;
        assert_eq!(seqs(&cmd_definitive(&c.client, verb, &body).await), [seq]);
    }
    c.kill_node(0);
    let stream = c.js.get_stream(STREAM).await.expect("the stream");
    let config = stream.get_info().await.expect("stream info").config;
    let first = stream.get_raw_message(1).await.expect("seq 1");
    c.js.delete_stream(STREAM).await.expect("delete the stream");
    c.js.create_stream(config)
        .await
        .expect("make the stream again");
    let ack =
        c.js.publish_with_headers(first.subject.to_string(), first.headers, first.payload)
            .await
            .expect("publish");
    ack.await.expect("stored");
    c.spawn_node(0);
    let log = ends_saying(&mut c, 0, "lacks seqs 2..=").await;
    logged(&c, 0, &["of this store's log, which it had acknowledged"]);
    assert!(!log.contains("dropping seqs"), "{log}");
    let store = bcp::store::Store::open_existing(&c.db(0)).expect("open the store");
    assert_eq!(store.head_seq().expect("head"), 4, "the store changed");
}

/// A group of two nodes, both at seq `n` (a job created, then started
/// and stopped in turn); the leader's index.
async fn two_nodes_at(n: u64) -> (support::cluster::Cluster, usize) {
    let c = support::cluster::Cluster::start(2).await;
    let leader = c.leader(2).await;
    let job = id();
    cmd_definitive(&c.client, "create", &create(job)).await;
    for verb in ["start", "stop"].iter().cycle().take(n as usize - 1) {
        cmd_definitive(&c.client, verb, &on(job)).await;
    }
    c.all_at(2, n).await;
    (c, leader)
}

/// Node `node` exits non-zero, its log saying `what`; the log.
async fn ends_saying(c: &mut support::cluster::Cluster, node: usize, what: &str) -> String {
    assert_ne!(c.exited(node).await, Some(0));
    logged(c, node, &[what])
}

/// Node `node`'s log, which says each of `all`.
fn logged(c: &support::cluster::Cluster, node: usize, all: &[&str]) -> String {
    let log = c.node_log_text(node);
    for what in all {
        assert!(log.contains(what), "no {what:?} in:\n{log}");
    }
    log
}

/// Node `node` exits non-zero, saying its stream is missing (`holds`: what
/// it says of its store), and no node made the stream again.
async fn ends_on_a_lost_stream(c: &mut support::cluster::Cluster, node: usize, holds: &str) {
    ends_saying(c, node, &format!("is missing or empty but {holds}")).await;
    assert!(
        c.js.get_stream(STREAM).await.is_err(),
        "the stream was made again"
    );
}

/// A command of two events (`terminate`: `JobTerminated`, then
/// `SnapshotsPurged`) whose second event cannot be published (a NATS
/// permission denies it) never reaches the stream in part: the leader
/// publishes a command's events as one atomic batch. The leader dies with
/// the command decided but unacknowledged; the next one decides the
/// producer's retry afresh, and the stream holds both events once,
/// committed together.
#[tokio::test]
async fn a_commands_events_reach_the_stream_whole_or_not_at_all() {
    // Any client may publish anything but a `SnapshotsPurged` event.
    let no_purges = clients_may(r#"publish: { deny: ["bcp.evt.*.*.SnapshotsPurged"] }"#);
    let mut c = support::cluster::Cluster::start_with(2, &no_purges).await;
    let leader = c.leader(2).await;
    let job = id();
    cmd_definitive(&c.client, "create", &create(job)).await;
    cmd_definitive(&c.client, "start", &on(job)).await;
    let mut snapshot = on(job);
    snapshot["snapshot_id"] = json!(id());
    let taken = chrono::Utc::now() - chrono::Duration::minutes(1);
    snapshot["taken_at"] = json!(taken.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    snapshot["size_bytes"] = json!(1024);
    cmd_definitive(&c.client, "record-snapshot", &snapshot).await;
    assert_eq!(
        seqs(&cmd_definitive(&c.client, "stop", &on(job)).await),
        [4]
    );
    c.all_at(2, 4).await;

    let terminate = on(job);
    assert_eq!(try_cmd(&c.client, "terminate", &terminate).await, None);
    // Decided and in the leader's store, but no part of it in the stream,
    // through the relay's retries.
    let deadline = Deadline::new(
        "the leader to decide the terminate",
        Duration::from_secs(10),
    );
    while !c
        .statuses()
        .await
        .iter()
        .any(|s| s["role"] == json!("leader") && s["head_seq"] == json!(6))
    {
        deadline.tick().await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stream = c.js.get_stream(STREAM).await.expect("stream");
    let last = || async {
        stream
            .get_info()
            .await
            .expect("stream info")
            .state
            .last_sequence
    };
    assert_eq!(last().await, 4, "the stream holds part of the terminate");
    for s in c.statuses().await {
        assert_eq!(s["published_seq"], json!(4), "{s}");
    }

    c.kill_node(leader);
    c.reconfigure("");
    let next = c.leader(1).await;
    assert_ne!(next, leader);
    let reply = cmd_definitive(&c.client, "terminate", &terminate).await;
    assert_eq!(seqs(&reply), [5, 6], "{reply}");
    assert_eq!(reply["duplicate"], json!(false), "{reply}");
    assert_eq!(last().await, 6);
    let (fifth, sixth) = (
        stream.get_raw_message(5).await.expect("seq 5"),
        stream.get_raw_message(6).await.expect("seq 6"),
    );
    assert!(
        fifth.subject.ends_with(".JobTerminated"),
        "{}",
        fifth.subject
    );
    assert!(
        sixth.subject.ends_with(".SnapshotsPurged"),
        "{}",
        sixth.subject
    );
    let batch = |m: &async_nats::jetstream::message::StreamMessage, h: &str| {
        m.headers.get(h).map(|v| v.as_str().to_owned())
    };
    assert!(batch(&fifth, "Nats-Batch-Id").is_some());
    assert_eq!(
        batch(&fifth, "Nats-Batch-Id"),
        batch(&sixth, "Nats-Batch-Id")
    );
    assert_eq!(batch(&sixth, "Nats-Batch-Commit").as_deref(), Some("1"));

    // The old leader drops the terminate it decided alone, and follows.
    c.spawn_node(leader);
    c.all_at(2, 6).await;
    assert!(
        c.node_log_text(leader).contains("dropping seqs 5..=6"),
        "{}",
        c.node_log_text(leader)
    );
    assert_eq!(c.stop_node(leader).await, Some(0));
    let db = c.db(leader);
    let (code, out, err) = bcp_cli_text(&["audit", "verify", "--db", db.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{out}{err}");
}

/// A stray message lands while the relay has many publishes in flight (a
/// long log published at start): the sequence check alone would refuse
/// bcp's event at the stray's seq but store the next ones after it, since
/// each finds "last sequence = seq - 1". Here the relay publishes in a
/// fast batch, which nats-server ends at the refused message; with one
/// ack per message, the previous event's id expected by each publish
/// does it. Either way nothing of bcp's follows the stray.
#[tokio::test]
async fn a_stray_publish_amid_pipelined_publishes_is_the_streams_last() {
    let mut h = Harness::start().await;
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    assert_eq!(write_offline(&h, 40, 500), 20_000);
    h.spawn_bcp();
    let deadline = Deadline::new("the relay to start publishing", Duration::from_secs(60));
    while h.stream_info().await.map_or(0, |i| i.state.last_sequence) < 200 {
        deadline.tick().await;
    }
    let stray_seq = stray(
        &h,
        format!("bcp.evt.p1.{}.JobCreated", id()),
        r#"{"forged":true}"#,
    )
    .await;
    assert!(
        stray_seq < 20_000,
        "the relay had not finished: {stray_seq}"
    );
    alarm(&h, "fork").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = stream_last(&h).await;
    let stream = h.js.get_stream(STREAM).await.unwrap();
    let last_msg = stream.get_raw_message(last).await.unwrap();
    assert_eq!(
        (last, &last_msg.payload[..]),
        (stray_seq, &br#"{"forged":true}"#[..]),
        "nothing of bcp's was stored after the stray"
    );
    let mut before = Vec::new();
    for seq in 1..stray_seq {
        before.push(stream.get_raw_message(seq).await.unwrap());
    }
    support::check_stream(&before, stray_seq - 1);
    assert!(
        h.bcp_log_text().contains("batched=true"),
        "the relay published in fast batches"
    );
}

/// Commit `batches` batches of `per` creates to the stopped harness's
/// store, as `bcp serve` would; returns the log's head.
fn write_offline(h: &Harness, batches: usize, per: usize) -> u64 {
    use bcp::store::{ledger::Pending, pipeline::Pipeline};
    let store = bcp::store::Store::open_existing(&h.db()).unwrap();
    let mut ledger = Pipeline::open(store).unwrap();
    for _ in 0..batches {
        let batch: Vec<Pending> = (0..per)
            .map(|_| {
                let body = create(id()).to_string();
                Pending::new(
                    bcp::domain::command::decode("p1", "create", body.as_bytes(), None).unwrap(),
                )
            })
            .collect();
        ledger
            .execute(&batch, chrono::Utc::now(), &mut Uuid::now_v7)
            .unwrap();
    }
    ledger.head_seq()
}

/// The relay publishes in fast batches only on a stream that allows them
/// (bcp creates its stream so): on one where they are turned off, while
/// it runs or before it starts, it keeps one ack per message. Either way
/// each event lands at its own seq with the relay's headers, and a backlog
/// longer than a batch's window and several answers goes through whole.
#[tokio::test]
async fn the_relay_batches_only_on_a_stream_that_allows_it() {
    let mut h = Harness::start().await;
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    assert_eq!(write_offline(&h, 3, 700), 2_100);
    h.spawn_bcp();
    h.wait_stream_last_seq(2_100).await;
    let log = h.bcp_log_text();
    assert!(
        log.contains("batched=true") && !log.contains("batched=false"),
        "{log}"
    );
    let mut config = h.stream_info().await.unwrap().config;
    assert!(
        config.allow_batch_publish,
        "bcp's stream allows fast batches"
    );

    // Fast batches turned off while bcp runs: nats-server refuses the next
    // batch, and the relay reconciles and goes on one ack per message.
    config.allow_batch_publish = false;
    h.js.update_stream(config)
        .await
        .expect("disallow fast batches");
    assert_eq!(seqs(&h.cmd("p1", "create", &create(id())).await), [2_101]);
    h.wait_stream_last_seq(2_101).await;
    let log = h.bcp_log_text();
    assert!(
        log.contains("batch publish is disabled") && log.contains("batched=false"),
        "{log}"
    );

    // The stream as an older bcp made it, at a start.
    assert_eq!(h.stop_bcp().await.code(), Some(0));
    assert_eq!(write_offline(&h, 2, 700), 3_501);
    h.spawn_bcp();
    h.wait_stream_last_seq(3_501).await;
    let log = h.bcp_log_text();
    let connected = log.lines().rfind(|l| l.contains("relay connected"));
    assert!(
        connected.is_some_and(|l| l.contains("stream_seq=2101") && l.contains("batched=false")),
        "{log}"
    );
    assert!(
        !h.stream_info().await.unwrap().config.allow_batch_publish,
        "bcp does not change a stream's settings"
    );
    support::check_stream(&h.stream_messages_ordered().await, 3_501);
    h.stop_and_verify(3_501).await;
}

/// Under load, the stream check on its timer (every second here) finds the
/// stream in step however far the relay got meanwhile: no alarm, no
/// command refused.
#[tokio::test]
async fn the_timer_check_raises_no_alarm_under_load() {
    let h = Harness::start_with(&["--stream-check-interval", "1"]).await;
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let bodies: Vec<Value> = (0..64).map(|_| create(id())).collect();
        let replies =
            futures::future::join_all(bodies.iter().map(|b| h.cmd("p1", "create", b))).await;
        for r in replies {
            assert_eq!(r["ok"], json!(true), "{r}");
        }
        sent += 64;
    }
    let log = h.bcp_log_text();
    assert!(
        !log.contains("not taking commands"),
        "a false alarm after {sent} commands:\n{log}"
    );
    let (code, s) = status(&h).await;
    assert_eq!(code, Some(0), "{s}");
}
