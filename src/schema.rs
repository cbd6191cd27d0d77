//! The machine-readable contract: a JSON Schema (2020-12) per command body,
//! reply, query, view and the event envelope, generated from the Rust types
//! the server itself decodes and encodes, so the two cannot drift.
//! `bcp schemas --out schemas` writes them, with `asyncapi.json`: an
//! AsyncAPI 3.0 document of the NATS API built from the same list (every
//! subject, what is sent on it and what comes back); a test fails when the
//! checked-in files differ.

use crate::audit::replay::ReplayView;
use crate::domain::command::{
    AssignRegionBody, ChangeScheduleBody, ConfigureRegionBody, CreateBody, DeleteSnapshotBody,
    ExpireSnapshotsBody, JobBody, RecordSnapshotBody, SetSnapshotExpiryBody,
};
use crate::domain::filter::JobFilter;
use crate::domain::history::HistoryEntry;
use crate::domain::{Envelope, Job, Reply, Snapshot};
use crate::service::queries::{
    HistoryQuery, HistoryReply, JobQuery, JobReply, JobsReply, SnapshotsReply,
};
use schemars::{JsonSchema, Schema};
use serde_json::{Value, json};

/// One schema file: its path under `schemas/`, what it describes, and where
/// on NATS it travels.
pub struct SchemaFile {
    pub path: &'static str,
    pub subject: &'static str,
    pub describes: &'static str,
    pub schema: Schema,
}

fn file<T: JsonSchema>(
    path: &'static str,
    subject: &'static str,
    describes: &'static str,
) -> SchemaFile {
    let mut schema = schemars::schema_for!(T);
    schema.insert(
        "$id".into(),
        json!(format!("https://bcp.example/schemas/{path}")),
    );
    schema.insert("title".into(), json!(path.trim_end_matches(".json")));
    SchemaFile {
        path,
        subject,
        describes,
        schema,
    }
}

/// Every schema, in index order.
pub fn all() -> Vec<SchemaFile> {
    vec![
        file::<CreateBody>(
            "commands/create.json",
            "bcp.cmd.<project>.create",
            "create a job (Inactive)",
        ),
        file::<JobBody>(
            "commands/start.json",
            "bcp.cmd.<project>.start",
            "start a job",
        ),
        file::<JobBody>("commands/stop.json", "bcp.cmd.<project>.stop", "stop a job"),
        file::<JobBody>(
            "commands/terminate.json",
            "bcp.cmd.<project>.terminate",
            "terminate a stopped job",
        ),
        file::<AssignRegionBody>(
            "commands/assign-region.json",
            "bcp.cmd.<project>.assign-region",
            "set, change or remove a job's region",
        ),
        file::<ChangeScheduleBody>(
            "commands/change-schedule.json",
            "bcp.cmd.<project>.change-schedule",
            "replace schedule settings",
        ),
        file::<RecordSnapshotBody>(
            "commands/record-snapshot.json",
            "bcp.cmd.<project>.record-snapshot",
            "a backup agent reports a snapshot",
        ),
        file::<DeleteSnapshotBody>(
            "commands/delete-snapshot.json",
            "bcp.cmd.<project>.delete-snapshot",
            "delete a snapshot (snapshot_id only)",
        ),
        file::<SetSnapshotExpiryBody>(
            "commands/set-snapshot-expiry.json",
            "bcp.cmd.<project>.set-snapshot-expiry",
            "set expires_at, or do_not_delete: true (exactly one)",
        ),
        file::<ExpireSnapshotsBody>(
            "commands/expire-snapshots.json",
            "bcp.cmd.<project>.expire-snapshots",
            "expire due snapshots as of now",
        ),
        file::<ConfigureRegionBody>(
            "commands/configure-region.json",
            "bcp.cmd._admin.configure-region",
            "set or remove a region's stores",
        ),
        file::<Reply>(
            "reply.json",
            "reply to bcp.cmd.>",
            "the reply to every command",
        ),
        file::<JobQuery>("queries/job.json", "bcp.query.<project>.job", "one job"),
        file::<JobFilter>(
            "queries/jobs.json",
            "bcp.query.<project>.jobs (bcp.query._admin.jobs: every project)",
            "jobs matching every given filter",
        ),
        file::<JobQuery>(
            "queries/snapshots.json",
            "bcp.query.<project>.snapshots",
            "a job's snapshot catalog",
        ),
        file::<HistoryQuery>(
            "queries/history.json",
            "bcp.query.<project>.history",
            "a job's transitions and rejections, a page at a time",
        ),
        file::<JobReply>(
            "replies/job.json",
            "reply to bcp.query.<project>.job",
            "a job view (errors: replies/error.json)",
        ),
        file::<JobsReply>(
            "replies/jobs.json",
            "reply to bcp.query.<project>.jobs",
            "job views",
        ),
        file::<SnapshotsReply>(
            "replies/snapshots.json",
            "reply to bcp.query.<project>.snapshots",
            "retained snapshots in time order",
        ),
        file::<HistoryReply>(
            "replies/history.json",
            "reply to bcp.query.<project>.history",
            "history in seq order",
        ),
        file::<crate::service::queries::QueryError>(
            "replies/error.json",
            "reply to bcp.query.<project>.<kind>",
            "a query's error, with how far the answering store had applied the log",
        ),
        file::<crate::service::api::Status>(
            "replies/status.json",
            "reply to bcp.status",
            "one bcp process's role, head and alarms (every process answers)",
        ),
        file::<Job>("views/job.json", "", "a job view"),
        file::<Snapshot>("views/snapshot.json", "", "a snapshot in a catalog"),
        file::<HistoryEntry>("views/history-entry.json", "", "one history entry"),
        file::<ReplayView>("views/replay.json", "", "bcp replay --format json"),
        file::<Envelope>(
            "events/envelope.json",
            "bcp.evt.<project>.<job>.<EventType> (stream BCP_EVENTS)",
            "an event envelope",
        ),
    ]
}

/// `index.json`: every file with its subject and description.
pub fn index(files: &[SchemaFile]) -> Value {
    let entries: Vec<Value> = files
        .iter()
        .map(|f| json!({"path": f.path, "subject": f.subject, "describes": f.describes}))
        .collect();
    json!({"$comment": "generated by `just schemas` from the Rust types; do not edit", "schemas": entries})
}

/// A subject with `<name>` placeholders as an AsyncAPI address (`{name}`)
/// and its parameters.
fn address(subject: &str) -> (String, Value) {
    let mut params = serde_json::Map::new();
    let address = subject
        .split(' ')
        .next()
        .unwrap_or(subject)
        .split('.')
        .map(
            |t| match t.strip_prefix('<').and_then(|t| t.strip_suffix('>')) {
                Some(p) => {
                    let what = match p {
                        "project" => {
                            "the project (its jobs; _admin: every project, or the regions)"
                        }
                        "job" => "the job id (a region's name for RegionConfigured)",
                        "EventType" => "the event's type",
                        _ => "",
                    };
                    params.insert(p.to_owned(), json!({ "description": what }));
                    format!("{{{p}}}")
                }
                None => t.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join(".");
    (address, Value::Object(params))
}

/// `asyncapi.json`: the NATS API as AsyncAPI 3.0, from [`all`]: a channel
/// and a `send` operation (request/reply) per command and query subject,
/// its reply message, `bcp.status`, and the published events (`receive`).
pub fn asyncapi(files: &[SchemaFile]) -> Value {
    let (mut channels, mut operations, mut messages) = (
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
    );
    let name_of = |path: &str| path.trim_end_matches(".json").replace('/', "-");
    for f in files {
        messages.insert(
            name_of(f.path),
            json!({
                "name": name_of(f.path),
                "summary": f.describes,
                "contentType": "application/json",
                "payload": {"$ref": f.path},
            }),
        );
    }
    let reply_of = |subject: &str| {
        files
            .iter()
            .find(|r| {
                r.subject.strip_prefix("reply to ")
                    == Some(subject.split(' ').next().unwrap_or(subject))
            })
            .map(|r| name_of(r.path))
            .unwrap_or_else(|| "reply".to_owned())
    };
    let mut add = |id: String,
                   subject: &str,
                   message: String,
                   action: &str,
                   reply: Option<String>| {
        let (address, parameters) = address(subject);
        let mut channel = json!({
            "address": address,
            "messages": {(message.clone()): {"$ref": format!("#/components/messages/{message}")}},
        });
        if parameters.as_object().is_some_and(|p| !p.is_empty()) {
            channel["parameters"] = parameters;
        }
        channels.insert(id.clone(), channel);
        let mut op = json!({
            "action": action,
            "channel": {"$ref": format!("#/channels/{id}")},
            "messages": [{"$ref": format!("#/channels/{id}/messages/{message}")}],
        });
        if let Some(r) = reply {
            // The reply goes to the requester's inbox: a channel with no
            // fixed address.
            let reply_id = format!("{id}-reply");
            channels.insert(
                reply_id.clone(),
                json!({
                    "address": null,
                    "messages": {(r.clone()): {"$ref": format!("#/components/messages/{r}")}},
                }),
            );
            op["reply"] = json!({
                "channel": {"$ref": format!("#/channels/{reply_id}")},
                "messages": [{"$ref": format!("#/channels/{reply_id}/messages/{r}")}],
            });
        }
        operations.insert(id, op);
    };
    for f in files {
        let is_request = f.subject.starts_with("bcp.cmd.") || f.subject.starts_with("bcp.query.");
        if is_request {
            add(
                name_of(f.path),
                f.subject,
                name_of(f.path),
                "send",
                Some(reply_of(f.subject)),
            );
        } else if f.subject.starts_with("bcp.evt.") {
            add("events".into(), f.subject, name_of(f.path), "receive", None);
        }
    }
    add(
        "status".into(),
        "bcp.status",
        "replies-status".into(),
        "send",
        Some("replies-status".into()),
    );
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "bcp",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The NATS API of bcp, an event-sourced control plane for backup jobs: commands and queries are NATS requests (one JSON reply each), events are published on the JetStream stream BCP_EVENTS. Generated by `just schemas` from the Rust types; do not edit."
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    })
}

/// Every file's path and pretty JSON text, index included.
pub fn render() -> Vec<(String, String)> {
    let files = all();
    let mut out: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            (
                f.path.to_owned(),
                serde_json::to_string_pretty(&f.schema).expect("schema serializes") + "\n",
            )
        })
        .collect();
    out.push((
        "index.json".into(),
        serde_json::to_string_pretty(&index(&files)).expect("index serializes") + "\n",
    ));
    out.push((
        "asyncapi.json".into(),
        serde_json::to_string_pretty(&asyncapi(&files)).expect("asyncapi serializes") + "\n",
    ));
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The AsyncAPI document covers every verb and query, and every file it
    /// points to is one of the schemas written beside it.
    #[test]
    fn asyncapi_covers_the_api() {
        let files = super::all();
        let doc = super::asyncapi(&files);
        let ops = doc["operations"].as_object().unwrap();
        for verb in crate::domain::Verb::ALL {
            assert!(
                ops.contains_key(&format!("commands-{verb}")),
                "no operation for {verb}"
            );
        }
        for q in crate::service::api::QUERIES {
            assert!(
                ops.contains_key(&format!("queries-{q}")),
                "no operation for query {q}"
            );
        }
        assert!(ops.contains_key("events") && ops.contains_key("status"));
        let rendered: Vec<String> = super::render().into_iter().map(|(p, _)| p).collect();
        for m in doc["components"]["messages"].as_object().unwrap().values() {
            let file = m["payload"]["$ref"].as_str().unwrap();
            assert!(rendered.iter().any(|r| r == file), "{file} is not written");
        }
    }

    /// The checked-in `schemas/` must be exactly what the types generate:
    /// run `just schemas` after changing a type of the contract.
    #[test]
    fn checked_in_schemas_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let rendered = super::render();
        for (path, text) in &rendered {
            let on_disk = std::fs::read_to_string(dir.join(path)).unwrap_or_default();
            assert!(
                on_disk == *text,
                "schemas/{path} differs from the Rust types: run `just schemas`"
            );
        }
        let mut stale = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p
                        .strip_prefix(&dir)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/");
                    if !rendered.iter().any(|(r, _)| *r == rel) {
                        stale.push(rel);
                    }
                }
            }
        }
        assert!(
            stale.is_empty(),
            "schemas/ holds files no type generates: {stale:?}"
        );
    }
}
