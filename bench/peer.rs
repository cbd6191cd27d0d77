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
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use serde_json::{Value, json};

pub const STREAM: &str = "BCP_EVENTS";

/// Serve until the connection ends. Prints `ready` on stdout once the
/// stream exists and the subscription is in place.
pub async fn serve(url: &str) -> Result<()> {
    let client = async_nats::connect(url).await.context("connect")?;
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["bcp.evt.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("create the stream")?;
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
