//! The machine-readable contract: a JSON Schema (2020-12) per command body,
//! reply, query, view and the event envelope, generated from the Rust types
//! the server itself decodes and encodes, so the two cannot drift.
//! `bcp schemas --out schemas` writes them; a test fails when the checked-in
//! files differ.

use crate::audit::replay::ReplayView;
use crate::domain::command::{
    AssignRegionBody, ChangeScheduleBody, ConfigureRegionBody, CreateBody, ExpireSnapshotsBody,
    JobBody, RecordSnapshotBody, SnapshotBody,
};
use crate::domain::{Envelope, Job, Reply, Snapshot};
use crate::projection::JobFilter;
use crate::projection::history::HistoryEntry;
use crate::service::queries::{HistoryReply, JobQuery, JobReply, JobsReply, SnapshotsReply};
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
        file::<SnapshotBody>(
            "commands/delete-snapshot.json",
            "bcp.cmd.<project>.delete-snapshot",
            "delete a snapshot (snapshot_id only)",
        ),
        file::<SnapshotBody>(
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
        file::<JobQuery>(
            "queries/history.json",
            "bcp.query.<project>.history",
            "a job's transitions and rejections",
        ),
        file::<JobReply>(
            "replies/job.json",
            "reply to bcp.query.<project>.job",
            "a job view (errors: reply.json)",
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
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
