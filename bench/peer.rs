//! The peers of bcp's end-to-end run, each a NATS request/reply service
//! on bcp's command subjects, answering in bcp's reply shape (`ok`,
//! `events[].seq`), so the same producers drive them unchanged.
//!
//! Peer C: what a team would build instead of bcp. A NATS request/reply
//! service that turns each command into an event, publishes it to
//! JetStream (message id = command_id, so JetStream's duplicate window
//! makes retries idempotent for two minutes) and replies once JetStream
//! acknowledged it. No local log and no fsync of its own: JetStream's
//! default sync. It listens on bcp's command subjects and answers in bcp's
//! reply shape (`ok`, `events[].seq` = the stream sequence), so the same
//! producers drive it unchanged; its stream is `BCP_EVENTS` on `bcp.evt.>`.
//!
//! It runs as its own process (the bench binary with `--serve-peer-c URL`),
//! like `bcp serve`, so its CPU is metered apart from the producers'.
//! Requests are pipelined as a well-written async-nats service would: the
//! publish is sent in arrival order, and each ack is awaited on its own task.

use anyhow::{Context, Result};
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, Subject};
use futures::StreamExt;
use serde_json::{Value, json};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const STREAM: &str = "BCP_EVENTS";

/// The peers' stream: `BCP_EVENTS` on `bcp.evt.>`, file storage,
/// nats-server's defaults otherwise.
async fn create_stream(js: &jetstream::Context) -> Result<()> {
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["bcp.evt.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("create the stream")?;
    Ok(())
}

/// Serve until the connection ends. Prints `ready` on stdout once the
/// stream exists and the subscription is in place.
pub async fn serve(url: &str) -> Result<()> {
    let client = async_nats::connect(url).await.context("connect")?;
    let js = jetstream::new(client.clone());
    create_stream(&js).await?;
    let mut commands = client.subscribe("bcp.cmd.>").await?;
    client.flush().await?;
    println!("ready");
    while let Some(msg) = commands.next().await {
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        // bcp.cmd.<project>.<verb>
        let mut parts = msg.subject.split('.').skip(2);
        let (project, verb) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let command: Value = match serde_json::from_slice(&msg.payload) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let body = json!({"ok": false, "error": {"code": "bad_request", "message": "not a JSON object"}});
                client.publish(reply_to, body.to_string().into()).await?;
                continue;
            }
        };
        let command_id = command["command_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let event = json!({
            "event_id": uuid::Uuid::now_v7(),
            "recorded_at": chrono::Utc::now(),
            "project_id": project,
            "verb": verb,
            "command": command,
        });
        let mut headers = HeaderMap::new();
        if !command_id.is_empty() {
            headers.insert("Nats-Msg-Id", command_id.as_str());
        }
        let subject = format!("bcp.evt.{project}.{verb}");
        let sent = js
            .publish_with_headers(subject, headers, event.to_string().into())
            .await;
        let (client, verb) = (client.clone(), verb.to_owned());
        tokio::spawn(async move {
            let acked = match sent {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let body = match acked {
                Ok(ack) => json!({
                    "ok": true,
                    "events": [{"seq": ack.sequence, "type": verb}],
                    "duplicate": ack.duplicate,
                }),
                Err(e) => json!({"ok": false, "error": {"code": "unavailable", "message": e}}),
            };
            let _ = client.publish(reply_to, body.to_string().into()).await;
        });
    }
    Ok(())
}

/// Where a floor peer (F, R) keeps what it acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Floor {
    /// Peer F: a flat file, pre-zeroed so a commit changes no metadata and
    /// `fdatasync` flushes data pages only (written round from its start):
    /// the floor of "fsync before the reply" on this disk.
    File,
    /// Peer R: raw redb appends (baseline A as a service), one
    /// `Durability::Immediate` commit per batch, and after the replies
    /// each command published to JetStream on a subject per job, as bcp's
    /// events are (256 acks outstanding, as bcp's relay): the floor of
    /// bcp's contract, an embedded redb log fsynced before the reply and
    /// every entry on the stream.
    Redb,
}

/// Peers F and R: a service that keeps the rule bcp keeps (a reply leaves
/// only after what it answers is durable) and does nothing else: no parse,
/// no decision. Commands are group committed as bcp's are: the commit
/// thread takes every command that arrived while the last commit ran,
/// stores their bytes (`floor`), syncs, and hands the replies (seq = a
/// counter, in bcp's reply shape) to a task that sends them (and, for R,
/// then publishes the commands to JetStream). What bcp costs beyond R is
/// bcp's own; what F lacks of C is the sync's cost.
pub async fn serve_floor(url: &str, path: &Path, floor: Floor) -> Result<()> {
    let mut store = FloorStore::create(path, floor)?;
    let client = async_nats::connect(url).await.context("connect")?;
    let relay = match floor {
        Floor::File => None,
        Floor::Redb => Some(relay(&client).await?),
    };
    let mut commands = client.subscribe("bcp.cmd.>").await?;
    client.flush().await?;

    type Committed = Vec<(Subject, String, async_nats::Message)>;
    let (to_commit, arrived) = std::sync::mpsc::channel::<(Subject, async_nats::Message)>();
    let (to_reply, mut committed) = tokio::sync::mpsc::unbounded_channel::<Committed>();
    let commit = std::thread::Builder::new()
        .name("floor-commit".into())
        .spawn(move || -> Result<()> {
            let mut seq = 0u64;
            while let Ok(first) = arrived.recv() {
                let batch: Vec<_> = std::iter::once(first).chain(arrived.try_iter()).collect();
                store.commit(seq, batch.iter().map(|(_, msg)| msg.payload.as_ref()))?;
                let replies = batch
                    .into_iter()
                    .map(|(reply_to, msg)| {
                        seq += 1;
                        let verb = msg.subject.rsplit('.').next().unwrap_or("");
                        let body =
                            format!(r#"{{"ok":true,"events":[{{"seq":{seq},"type":"{verb}"}}]}}"#);
                        (reply_to, body, msg)
                    })
                    .collect();
                if to_reply.send(replies).is_err() {
                    break;
                }
            }
            Ok(())
        })?;
    let replier = client.clone();
    tokio::spawn(async move {
        while let Some(replies) = committed.recv().await {
            let mut events = Vec::with_capacity(replies.len());
            for (reply_to, body, msg) in replies {
                let _ = replier.publish(reply_to, body.into()).await;
                events.push(msg);
            }
            if let Some((js, acks)) = &relay {
                for msg in events {
                    let subject = event_subject(&msg);
                    match js.publish(subject, msg.payload).await {
                        Ok(ack) => {
                            if acks.send(ack).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("publish: {e}"),
                    }
                }
            }
        }
    });
    println!("ready");
    while let Some(msg) = commands.next().await {
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        if to_commit.send((reply_to, msg)).is_err() {
            break;
        }
    }
    drop(to_commit);
    match commit.join() {
        Ok(done) => done.context("the commit thread"),
        Err(_) => anyhow::bail!("the commit thread panicked"),
    }
}

/// The subject peer R publishes a command on: bcp's layout,
/// `bcp.evt.<project>.<job>.<verb>` (a subject per job, as nats-server
/// indexes bcp's), the job id found in the body without parsing it.
fn event_subject(msg: &async_nats::Message) -> String {
    const KEY: &[u8] = b"\"job_id\":\"";
    let body = msg.payload.as_ref();
    let job = body
        .windows(KEY.len())
        .position(|w| w == KEY)
        .and_then(|at| body.get(at + KEY.len()..at + KEY.len() + 36))
        .and_then(|id| std::str::from_utf8(id).ok())
        .unwrap_or("_");
    // bcp.cmd.<project>.<verb>
    let mut parts = msg.subject.split('.').skip(2);
    let (project, verb) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    format!("bcp.evt.{project}.{job}.{verb}")
}

/// Peer R's stream, and a task awaiting its acks in order, at most 256
/// outstanding (the relay's window).
async fn relay(
    client: &async_nats::Client,
) -> Result<(
    jetstream::Context,
    tokio::sync::mpsc::Sender<jetstream::context::PublishAckFuture>,
)> {
    let js = jetstream::new(client.clone());
    create_stream(&js).await?;
    let (acks, mut pending) =
        tokio::sync::mpsc::channel::<jetstream::context::PublishAckFuture>(256);
    tokio::spawn(async move {
        while let Some(ack) = pending.recv().await {
            if let Err(e) = ack.await {
                eprintln!("ack: {e}");
            }
        }
    });
    Ok((js, acks))
}

/// A floor peer's store.
enum FloorStore {
    File {
        file: std::fs::File,
        offset: u64,
        bytes: Vec<u8>,
    },
    Redb(redb::Database),
}

const FLOOR_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("commands");

impl FloorStore {
    /// The file's size: a run of 100 k commands of about 300 bytes fits.
    const FILE_SIZE: u64 = 64 << 20;

    fn create(path: &Path, floor: Floor) -> Result<FloorStore> {
        Ok(match floor {
            Floor::File => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(path)
                    .with_context(|| format!("create {}", path.display()))?;
                let zeros = vec![0u8; 1 << 20];
                for i in 0..Self::FILE_SIZE / zeros.len() as u64 {
                    file.write_all_at(&zeros, i * zeros.len() as u64)?;
                }
                file.sync_all()?;
                FloorStore::File {
                    file,
                    offset: 0,
                    bytes: Vec::new(),
                }
            }
            Floor::Redb => FloorStore::Redb(redb::Database::create(path)?),
        })
    }

    /// Store `payloads` after `seq` durably.
    fn commit<'a>(&mut self, seq: u64, payloads: impl Iterator<Item = &'a [u8]>) -> Result<()> {
        match self {
            FloorStore::File {
                file,
                offset,
                bytes,
            } => {
                bytes.clear();
                for p in payloads {
                    bytes.extend_from_slice(p);
                    bytes.push(b'\n');
                }
                if *offset + bytes.len() as u64 > Self::FILE_SIZE {
                    *offset = 0;
                }
                file.write_all_at(bytes, *offset)?;
                file.sync_data()?;
                *offset += bytes.len() as u64;
            }
            FloorStore::Redb(db) => {
                let mut txn = db.begin_write()?;
                txn.set_durability(redb::Durability::Immediate)?;
                {
                    let mut t = txn.open_table(FLOOR_TABLE)?;
                    for (i, p) in payloads.enumerate() {
                        t.insert(seq + 1 + i as u64, p)?;
                    }
                }
                txn.commit()?;
            }
        }
        Ok(())
    }
}
