//! Commands: their bodies, decoding a NATS request (subject verb + JSON
//! body) into a typed [`CommandEnvelope`], and the [`Fingerprint`] an
//! idempotency record keeps of a command. The verbs themselves are
//! [`super::verb`].
//!
//! Decoding is strict: unknown fields, wrong types, malformed ids, values
//! outside the allowed ranges and oversized bodies are a [`DecodeError`]
//! (`bad_request` on the wire) and never reach the writer.

use super::envelope::Envelope;
use super::ids::{Name, ProjectId};
use super::job::Deployment;
use super::limits::{ACTOR_BYTES_MAX, PAYLOAD_BYTES_MAX, TIME_MAX, TIME_MIN};
use super::schedule::{Schedule, SchedulePatch};
use super::timestamp;
use super::verb::Verb;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// A change to one store of a region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreChange {
    Set(Name),
    Remove,
}

impl StoreChange {
    pub fn apply(change: &Option<StoreChange>, current: &Option<Name>) -> Option<Name> {
        match change {
            None => current.clone(),
            Some(StoreChange::Set(n)) => Some(n.clone()),
            Some(StoreChange::Remove) => None,
        }
    }
}

/// What a command asks, once decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Create {
        deployment: Deployment,
        schedule: Schedule,
        region: Option<Name>,
    },
    Start,
    Stop,
    Terminate,
    AssignRegion {
        region: Option<Name>,
    },
    ChangeSchedule {
        schedule: SchedulePatch,
    },
    ConfigureRegion {
        region: Name,
        snapshot_store: Option<StoreChange>,
        oplog_store: Option<StoreChange>,
        sync_store: Option<StoreChange>,
    },
    RecordSnapshot {
        snapshot_id: Uuid,
        #[serde(serialize_with = "timestamp::serialize")]
        taken_at: DateTime<Utc>,
        size_bytes: u64,
    },
    DeleteSnapshot {
        snapshot_id: Uuid,
    },
    SetSnapshotExpiry {
        snapshot_id: Uuid,
        expiry: Expiry,
    },
    /// Expire what is due at `now`: one job (`job_id`), every job of the
    /// project, or (the sweeper, project `_admin`) every job.
    ExpireSnapshots {
        #[serde(serialize_with = "timestamp::serialize")]
        now: DateTime<Utc>,
    },
}

/// What `set-snapshot-expiry` sets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    At(#[serde(serialize_with = "timestamp::serialize")] DateTime<Utc>),
    DoNotDelete,
}

/// A decoded command with everything the writer needs to decide it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CommandEnvelope {
    pub command_id: Uuid,
    pub project_id: ProjectId,
    pub verb: Verb,
    /// None for `configure-region`, and for `expire-snapshots` over a project.
    pub job_id: Option<Uuid>,
    pub expected_version: Option<u64>,
    #[serde(skip)]
    pub actor: Option<String>,
    /// The actor is an identity NATS vouched for (Nats-Request-Info), not a
    /// name the producer supplied.
    #[serde(skip)]
    pub actor_verified: bool,
    pub command: Command,
}

impl CommandEnvelope {
    /// A digest of what the command asks (everything but the actor), so a
    /// retry with the same `command_id` and another body is detected.
    /// The bytes hashed are the command's JSON (times as chrono writes
    /// them, through [`timestamp::serialize`]), the same in every version:
    /// stored records hold these fingerprints.
    pub fn fingerprint(&self) -> Fingerprint {
        thread_local! {
            /// Serialized into, and hashed, for each command on the thread.
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            serde_json::to_writer(&mut *buf, self).expect("command serializes");
            Fingerprint(Print::Digest(*blake3::hash(buf).as_bytes()))
        })
    }
}

/// What an idempotency record holds of the command it answered, to tell
/// a retry from another command under the same `command_id`: the digest
/// of [`CommandEnvelope::fingerprint`], kept as its 32 bytes from the hash
/// to the stored row, or a text (`*`, [`Fingerprint::ANY_BODY`], or what
/// a record of an older layout held). Its text form, the one older
/// layouts stored and records compared, is the digest's 64 lowercase hex
/// digits: a text that reads as one is that digest, so two fingerprints
/// are equal exactly when their texts are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub struct Fingerprint(Print);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Print {
    Digest([u8; 32]),
    Text(Box<str>),
}

impl Fingerprint {
    /// The text of a record rebuilt from the log by an earlier version: a
    /// retry with its `command_id` gets the original reply whatever its
    /// body. Records rebuilt now hold [`Fingerprint::of_logged`].
    pub const ANY_BODY: &str = "*";

    /// [`Fingerprint::ANY_BODY`]'s fingerprint.
    pub fn any_body() -> Fingerprint {
        Fingerprint::from(Fingerprint::ANY_BODY.to_owned())
    }

    /// The fingerprint of a record rebuilt from the log (import, a group
    /// follower) for the command whose first event is `first`. The log does
    /// not hold the command's body, only what its events say of it: its
    /// verb, its project and its job (but for `expire-snapshots`, whose
    /// events name the jobs it expired, not whether the command named
    /// one). A retry that names other ones is a `command_id_conflict`, as
    /// it would have been before the records were rebuilt; one that differs
    /// only in the rest of its body gets the original reply.
    pub fn of_logged(first: &Envelope) -> Fingerprint {
        match Verb::of_event(&first.event) {
            Some(verb) => Fingerprint::logged(verb, &first.project_id, first.job_id),
            // Never a command's first event in a log bcp verifies.
            None => Fingerprint::any_body(),
        }
    }

    /// What [`Fingerprint::of_logged`] keeps of a command, as a digest
    /// (the size of a body's), domain-separated from bodies' digests.
    fn logged(verb: Verb, project: &ProjectId, job: Option<Uuid>) -> Fingerprint {
        let job = job.filter(|_| verb != Verb::ExpireSnapshots);
        let mut h = blake3::Hasher::new();
        h.update(b"bcp: a command as its events say it\0");
        h.update(verb.as_str().as_bytes());
        h.update(b"\0");
        h.update(project.as_str().as_bytes());
        h.update(b"\0");
        if let Some(job) = job {
            h.update(job.as_bytes());
        }
        Fingerprint::from_digest(*h.finalize().as_bytes())
    }

    /// Whether `retry` (whose fingerprint is `print`) asks what this record
    /// answered: the same command; for a record rebuilt from the log, a
    /// command of the same verb, project and job; for one an earlier
    /// version rebuilt, any command.
    pub fn admits(&self, retry: &CommandEnvelope, print: &Fingerprint) -> bool {
        self == print
            || matches!(&self.0, Print::Text(t) if &**t == Fingerprint::ANY_BODY)
            || *self == Fingerprint::logged(retry.verb, &retry.project_id, retry.job_id)
    }

    /// The digest's 32 bytes, or the text of a fingerprint that is not one.
    pub fn digest_or_text(&self) -> Result<&[u8; 32], &str> {
        match &self.0 {
            Print::Digest(bytes) => Ok(bytes),
            Print::Text(text) => Err(text),
        }
    }

    /// From a digest's 32 bytes.
    pub fn from_digest(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(Print::Digest(bytes))
    }
}

impl From<String> for Fingerprint {
    fn from(text: String) -> Fingerprint {
        let lower_hex =
            text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match blake3::Hash::from_hex(&text) {
            Ok(hash) if lower_hex => Fingerprint::from_digest(*hash.as_bytes()),
            _ => Fingerprint(Print::Text(text.into_boxed_str())),
        }
    }
}

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.to_string()
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Print::Digest(bytes) => f.write_str(&blake3::Hash::from_bytes(*bytes).to_hex()),
            Print::Text(text) => f.write_str(text),
        }
    }
}

/// Why a request could not be decoded: always `bad_request` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Every time a command carries must lie in [`TIME_MIN`, `TIME_MAX`) and
/// not be a leap second: what bcp derives from it (an expiry years later)
/// stays a valid RFC 3339 time, and the log holds no time a reader cannot
/// parse back.
fn check_times(command: &Command) -> Result<(), DecodeError> {
    let (field, t) = match command {
        Command::RecordSnapshot { taken_at, .. } => ("taken_at", taken_at),
        Command::SetSnapshotExpiry {
            expiry: Expiry::At(t),
            ..
        } => ("expires_at", t),
        Command::ExpireSnapshots { now } => ("now", now),
        _ => return Ok(()),
    };
    let (min, max) = *TIME_BOUNDS;
    if *t < min || *t >= max || chrono::Timelike::nanosecond(t) >= 1_000_000_000 {
        return Err(bad(format!(
            "{field} must be from {TIME_MIN} up to (not including) {TIME_MAX}, and not a leap second"
        )));
    }
    Ok(())
}

/// [`TIME_MIN`] and [`TIME_MAX`], parsed once (not for every command).
static TIME_BOUNDS: std::sync::LazyLock<(DateTime<Utc>, DateTime<Utc>)> =
    std::sync::LazyLock::new(|| (time_bound(TIME_MIN), time_bound(TIME_MAX)));

fn time_bound(s: &str) -> DateTime<Utc> {
    s.parse().expect("a valid bound")
}

fn bad(msg: impl Into<String>) -> DecodeError {
    DecodeError(msg.into())
}

/// A field that must be present but may be null.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// Schema of a field that must be present but may be null.
fn nullable_name_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"anyOf": [g.subschema_for::<Name>(), {"type": "null"}]})
}

/// A field that may be absent (keep), null (remove) or a value (set).
fn store_change<'de, D: Deserializer<'de>>(d: D) -> Result<Option<StoreChange>, D::Error> {
    Ok(Some(match Option::<Name>::deserialize(d)? {
        Some(n) => StoreChange::Set(n),
        None => StoreChange::Remove,
    }))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    command_id: Uuid,
    job_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    deployment: Deployment,
    #[serde(default)]
    schedule: SchedulePatch,
    #[serde(default)]
    region: Option<Name>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobBody {
    command_id: Uuid,
    job_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignRegionBody {
    command_id: Uuid,
    job_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(deserialize_with = "nullable")]
    #[schemars(schema_with = "nullable_name_schema", required)]
    region: Option<Name>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeScheduleBody {
    command_id: Uuid,
    job_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    schedule: SchedulePatch,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigureRegionBody {
    command_id: Uuid,
    #[serde(default)]
    actor: Option<String>,
    region: Name,
    #[serde(default, deserialize_with = "store_change")]
    #[schemars(with = "Option<Name>")]
    snapshot_store: Option<StoreChange>,
    #[serde(default, deserialize_with = "store_change")]
    #[schemars(with = "Option<Name>")]
    oplog_store: Option<StoreChange>,
    #[serde(default, deserialize_with = "store_change")]
    #[schemars(with = "Option<Name>")]
    sync_store: Option<StoreChange>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordSnapshotBody {
    command_id: Uuid,
    job_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    snapshot_id: Uuid,
    taken_at: DateTime<Utc>,
    size_bytes: u64,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteSnapshotBody {
    command_id: Uuid,
    job_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    snapshot_id: Uuid,
}

/// Exactly one of the two: `expires_at`, or `do_not_delete: true`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [
    {"required": ["expires_at"], "properties": {
        "expires_at": {"type": "string"}, "do_not_delete": {"enum": [false, null]}}},
    {"required": ["do_not_delete"], "properties": {
        "do_not_delete": {"const": true}, "expires_at": {"type": "null"}}},
]))]
pub struct SetSnapshotExpiryBody {
    command_id: Uuid,
    job_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    snapshot_id: Uuid,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    do_not_delete: Option<bool>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpireSnapshotsBody {
    command_id: Uuid,
    #[serde(default)]
    job_id: Option<Uuid>,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(default)]
    actor: Option<String>,
    now: DateTime<Utc>,
}

/// A body, parsed strictly. A body that does not parse is parsed again,
/// tracking where it failed, for the message: the path costs every body
/// that parses about as much as the parse itself.
fn parse<'a, T: Deserialize<'a>>(verb: Verb, body: &'a [u8]) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match T::deserialize(&mut de) {
        Ok(value) => {
            de.end()
                .map_err(|e| bad(format!("invalid {verb} body: {e}")))?;
            // Read, but perhaps from an array by position.
            match array_in(body) {
                Some(at) => Err(bad(format!("invalid {verb} body: {at}"))),
                None => Ok(value),
            }
        }
        Err(_) if is_array(body) => Err(bad(format!("invalid {verb} body: {TOP_ARRAY}"))),
        Err(e) => Err(parse_error::<T>(verb, body)
            .unwrap_or_else(|| bad(format!("invalid {verb} body: {e}")))),
    }
}

const TOP_ARRAY: &str = "a JSON array; a body is a JSON object";

/// Whether `body`'s JSON value is (or starts as) an array.
pub fn is_array(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// Where `body` holds a JSON array, said for a reply (None: nowhere, or
/// not JSON at all). Checked once a body has parsed: an unknown field
/// whose value is an array is refused as unknown first. No command or query
/// body has an array anywhere: each is an object of values and objects.
/// But serde reads an array as a struct's fields in declaration order, so
/// `["<command_id>","<job_id>"]` would pass for a `start`, and the order
/// of fields in bcp's types would become part of the wire format.
pub fn array_in(body: &[u8]) -> Option<String> {
    // Nearly every body has no `[` byte at all: no parse for those.
    if !body.contains(&b'[') {
        return None;
    }
    fn walk(v: &serde_json::Value, path: &mut Vec<String>) -> bool {
        match v {
            serde_json::Value::Array(_) => true,
            serde_json::Value::Object(fields) => fields.iter().any(|(name, v)| {
                path.push(name.clone());
                walk(v, path) || {
                    path.pop();
                    false
                }
            }),
            _ => false,
        }
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut path = Vec::new();
    walk(&value, &mut path).then(|| match path.is_empty() {
        true => TOP_ARRAY.to_owned(),
        false => format!(
            "field {}: an array, where the contract has an object or a value",
            path.join(".")
        ),
    })
}

/// Why `body` does not parse as a `T`, naming the field (`None`: it
/// parses, which a body that failed once does not).
fn parse_error<'a, T: Deserialize<'a>>(verb: Verb, body: &'a [u8]) -> Option<DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let e = serde_path_to_error::deserialize::<_, T>(&mut de).err()?;
    let path = e.path().to_string();
    let inner = e.into_inner();
    Some(if path == "." {
        bad(format!("invalid {verb} body: {inner}"))
    } else {
        bad(format!("invalid {verb} body: field {path}: {inner}"))
    })
}

/// Decode a command from its subject parts and body. `header_actor` is the
/// `Bcp-Actor` header; an `actor` in the body wins over it.
pub fn decode(
    project: &str,
    verb: &str,
    body: &[u8],
    header_actor: Option<&str>,
) -> Result<CommandEnvelope, DecodeError> {
    decode_as(project, verb, body, header_actor, None)
}

/// [`decode`], with the sender's identity as NATS authenticated it
/// (`user@account`), which then is the actor, marked verified.
pub fn decode_as(
    project: &str,
    verb: &str,
    body: &[u8],
    header_actor: Option<&str>,
    identity: Option<String>,
) -> Result<CommandEnvelope, DecodeError> {
    if body.len() > PAYLOAD_BYTES_MAX {
        return Err(bad(format!(
            "body is {} bytes; the limit is {PAYLOAD_BYTES_MAX}",
            body.len()
        )));
    }
    let verb = Verb::parse(verb).ok_or_else(|| {
        let all: Vec<_> = Verb::ALL.iter().map(|v| v.as_str()).collect();
        bad(format!("unknown verb {verb:?}; verbs: {}", all.join(", ")))
    })?;
    let project_id = ProjectId::parse(project).map_err(bad)?;
    if project_id.is_admin() != (verb == Verb::ConfigureRegion) {
        return Err(bad(if verb == Verb::ConfigureRegion {
            "configure-region is sent on project _admin (bcp.cmd._admin.configure-region)"
                .to_owned()
        } else {
            format!("{verb} is a job command; project _admin only takes configure-region")
        }));
    }
    let job = |b: JobBody, command| {
        (
            b.command_id,
            Some(b.job_id),
            b.expected_version,
            b.actor,
            command,
        )
    };
    let (command_id, job_id, expected_version, actor, command) = match verb {
        Verb::Create => {
            let b: CreateBody = parse(verb, body)?;
            b.deployment.validate().map_err(bad)?;
            let schedule = Schedule::default()
                .apply(&b.schedule)
                .map_err(|e| bad(e.to_string()))?;
            let command = Command::Create {
                deployment: b.deployment,
                schedule,
                region: b.region,
            };
            (
                b.command_id,
                Some(b.job_id),
                b.expected_version,
                b.actor,
                command,
            )
        }
        Verb::Start => job(parse(verb, body)?, Command::Start),
        Verb::Stop => job(parse(verb, body)?, Command::Stop),
        Verb::Terminate => job(parse(verb, body)?, Command::Terminate),
        Verb::AssignRegion => {
            let b: AssignRegionBody = parse(verb, body)?;
            let command = Command::AssignRegion { region: b.region };
            (
                b.command_id,
                Some(b.job_id),
                b.expected_version,
                b.actor,
                command,
            )
        }
        Verb::ChangeSchedule => {
            let b: ChangeScheduleBody = parse(verb, body)?;
            // A value no job's schedule could take is bad input whatever
            // the job: refused here, before the job is looked up (an
            // unknown job would be a recorded not_found). The default
            // schedule is the widest base: its interval (24) allows every
            // base retention (2-30), and its retention (2) every interval,
            // so only a patch invalid on every schedule fails on it. What
            // depends on the job's own schedule is checked in `decide`.
            Schedule::default()
                .apply(&b.schedule)
                .map_err(|e| bad(e.to_string()))?;
            let command = Command::ChangeSchedule {
                schedule: b.schedule,
            };
            (
                b.command_id,
                Some(b.job_id),
                b.expected_version,
                b.actor,
                command,
            )
        }
        Verb::ConfigureRegion => {
            let b: ConfigureRegionBody = parse(verb, body)?;
            let command = Command::ConfigureRegion {
                region: b.region,
                snapshot_store: b.snapshot_store,
                oplog_store: b.oplog_store,
                sync_store: b.sync_store,
            };
            (b.command_id, None, None, b.actor, command)
        }
        Verb::RecordSnapshot => {
            let b: RecordSnapshotBody = parse(verb, body)?;
            let command = Command::RecordSnapshot {
                snapshot_id: b.snapshot_id,
                taken_at: b.taken_at,
                size_bytes: b.size_bytes,
            };
            (
                b.command_id,
                Some(b.job_id),
                b.expected_version,
                b.actor,
                command,
            )
        }
        Verb::DeleteSnapshot => {
            let b: DeleteSnapshotBody = parse(verb, body)?;
            let command = Command::DeleteSnapshot {
                snapshot_id: b.snapshot_id,
            };
            (
                b.command_id,
                Some(b.job_id),
                b.expected_version,
                b.actor,
                command,
            )
        }
        Verb::SetSnapshotExpiry => {
            let b: SetSnapshotExpiryBody = parse(verb, body)?;
            let expiry = match (b.expires_at, b.do_not_delete) {
                (Some(at), None | Some(false)) => Expiry::At(at),
                (None, Some(true)) => Expiry::DoNotDelete,
                _ => {
                    return Err(bad(
                        "set-snapshot-expiry takes either expires_at (RFC 3339) or do_not_delete: true",
                    ));
                }
            };
            let command = Command::SetSnapshotExpiry {
                snapshot_id: b.snapshot_id,
                expiry,
            };
            (
                b.command_id,
                Some(b.job_id),
                b.expected_version,
                b.actor,
                command,
            )
        }
        Verb::ExpireSnapshots => {
            let b: ExpireSnapshotsBody = parse(verb, body)?;
            if b.expected_version.is_some() && b.job_id.is_none() {
                return Err(bad("expected_version needs a job_id"));
            }
            (
                b.command_id,
                b.job_id,
                b.expected_version,
                b.actor,
                Command::ExpireSnapshots { now: b.now },
            )
        }
    };
    let actor_verified = identity.is_some();
    let actor = identity
        .or(actor)
        .or_else(|| header_actor.map(str::to_owned));
    if let Some(a) = &actor {
        if a.len() > ACTOR_BYTES_MAX {
            return Err(bad(format!(
                "actor must be at most {ACTOR_BYTES_MAX} bytes of printable characters"
            )));
        }
        if let Some(c) = a.chars().find(|c| !super::ids::is_displayable(*c)) {
            return Err(bad(format!(
                "actor holds U+{:04X}, a control or invisible formatting character (it could make an actor display as another)",
                c as u32
            )));
        }
        if a.trim().is_empty() {
            return Err(bad(
                "actor, when given, must hold a visible character, not be empty or only spaces"
                    .to_owned(),
            ));
        }
    }
    check_times(&command)?;
    Ok(CommandEnvelope {
        command_id,
        project_id,
        verb,
        job_id,
        expected_version,
        actor,
        actor_verified,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0192f0c4-0000-7000-8000-000000000001";
    const JID: &str = "0192f0c4-0000-7000-8000-0000000000aa";

    fn err(project: &str, verb: &str, body: &str) -> String {
        decode(project, verb, body.as_bytes(), None).unwrap_err().0
    }

    #[test]
    fn decodes_a_create_with_defaults() {
        let body = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","deployment":{{"kind":"replica_set","name":"rs0"}},"schedule":{{"snapshot_interval_hours":6}}}}"#
        );
        let c = decode("p1", "create", body.as_bytes(), Some("alice")).unwrap();
        assert_eq!(c.actor.as_deref(), Some("alice"));
        let Command::Create { schedule, .. } = c.command else {
            panic!()
        };
        assert_eq!(schedule.snapshot_interval_hours, 6);
        assert_eq!(schedule.weekly_retention_weeks, 2);
    }

    #[test]
    fn a_body_that_does_not_parse_is_named_by_the_field_that_failed() {
        // The whole message, path included (found by a second parse).
        let create = |deployment: &str| {
            err(
                "p1",
                "create",
                &format!(r#"{{"command_id":"{CID}","job_id":"{JID}","deployment":{deployment}}}"#),
            )
        };
        assert_eq!(
            create(r#"{"kind":"replica_set","name":7}"#),
            "invalid create body: field deployment.name: invalid type: integer `7`, expected a string at line 1 column 144"
        );
        assert_eq!(
            create(r#"{"kind":"replica_set","name":"rs","x":1}"#),
            "invalid create body: field deployment.x: unknown field `x`, expected one of `kind`, `name`, `cluster` at line 1 column 151"
        );
        // Parsed, then trailing bytes: no path to name.
        assert_eq!(
            err(
                "p1",
                "start",
                &format!(r#"{{"command_id":"{CID}","job_id":"{JID}"}} x"#)
            ),
            "invalid start body: trailing characters at line 1 column 103"
        );
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(err("p1", "start", "not json").contains("invalid start body"));
        assert!(
            err(
                "p1",
                "start",
                &format!(r#"{{"command_id":"{CID}","job_id":"{JID}","x":1}}"#)
            )
            .contains("unknown field `x`")
        );
        assert!(
            err("p1", "start", &format!(r#"{{"command_id":"{CID}"}}"#))
                .contains("missing field `job_id`")
        );
        assert!(
            err(
                "p1",
                "start",
                &format!(r#"{{"command_id":"nope","job_id":"{JID}"}}"#)
            )
            .contains("command_id")
        );
        assert!(
            err(
                "p1",
                "start",
                &format!(r#"{{"command_id":"{CID}","job_id":"{JID}","expected_version":-1}}"#)
            )
            .contains("invalid")
        );
        let snap = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{CID}","taken_at":"yesterday","size_bytes":1}}"#
        );
        assert!(err("p1", "record-snapshot", &snap).contains("taken_at"));
        let neg = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{CID}","taken_at":"2026-01-01T00:00:00Z","size_bytes":-5}}"#
        );
        assert!(err("p1", "record-snapshot", &neg).contains("size_bytes"));
        let both = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{CID}","expires_at":"2026-01-01T00:00:00Z","do_not_delete":true}}"#
        );
        assert!(err("p1", "set-snapshot-expiry", &both).contains("either"));
        let neither = format!(r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{CID}"}}"#);
        assert!(err("p1", "set-snapshot-expiry", &neither).contains("either"));
        assert!(
            err(
                "p1",
                "expire-snapshots",
                &format!(r#"{{"command_id":"{CID}"}}"#)
            )
            .contains("missing field `now`")
        );
        assert!(err("p1", "fly", "{}").contains("unknown verb"));
        assert!(err("_admin", "start", "{}").contains("job command"));
        assert!(err("p1", "configure-region", "{}").contains("_admin"));
        assert!(err("_x", "start", "{}").contains("reserved"));
        assert!(
            err(
                "p1",
                "assign-region",
                &format!(r#"{{"command_id":"{CID}","job_id":"{JID}"}}"#)
            )
            .contains("missing field `region`")
        );
        let big = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","actor":"{}"}}"#,
            "a".repeat(PAYLOAD_BYTES_MAX)
        );
        assert!(err("p1", "start", &big).contains("limit"));
        let long_actor = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","actor":"{}"}}"#,
            "a".repeat(300)
        );
        assert!(err("p1", "start", &long_actor).contains("actor"));
        let bad_sched = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","deployment":{{"kind":"replica_set","name":"rs0"}},"schedule":{{"snapshot_interval_hours":5}}}}"#
        );
        assert!(err("p1", "create", &bad_sched).contains("6, 8, 12, 24"));
        let shard = format!(
            r#"{{"command_id":"{CID}","job_id":"{JID}","deployment":{{"kind":"shard","name":"s0"}}}}"#
        );
        assert!(err("p1", "create", &shard).contains("cluster is required"));
    }

    #[test]
    fn region_null_removes_and_absent_store_keeps() {
        let b = format!(r#"{{"command_id":"{CID}","job_id":"{JID}","region":null}}"#);
        let c = decode("p1", "assign-region", b.as_bytes(), None).unwrap();
        assert_eq!(c.command, Command::AssignRegion { region: None });
        let b = format!(
            r#"{{"command_id":"{CID}","region":"eu","snapshot_store":"s","oplog_store":null}}"#
        );
        let c = decode("_admin", "configure-region", b.as_bytes(), None).unwrap();
        let Command::ConfigureRegion {
            snapshot_store,
            oplog_store,
            sync_store,
            ..
        } = c.command
        else {
            panic!()
        };
        assert_eq!(
            snapshot_store,
            Some(StoreChange::Set(Name::parse("s").unwrap()))
        );
        assert_eq!(oplog_store, Some(StoreChange::Remove));
        assert_eq!(sync_store, None);
    }

    /// Stored idempotency records hold fingerprints: a retry after an
    /// upgrade must find the same one, so the bytes hashed never change
    /// (times as chrono writes them, to the nanosecond as needed).
    #[test]
    fn fingerprints_stay_what_records_hold() {
        let sid = "0192f0c4-0000-7000-8000-0000000000bb";
        let cases = [
            (
                "record-snapshot",
                format!(
                    r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{sid}","taken_at":"2026-11-27T06:00:00Z","size_bytes":1}}"#
                ),
            ),
            (
                "record-snapshot",
                format!(
                    r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{sid}","taken_at":"2026-11-27T06:00:00.123456+01:00","size_bytes":1}}"#
                ),
            ),
            (
                "set-snapshot-expiry",
                format!(
                    r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{sid}","expires_at":"2027-01-01T00:00:00.5Z"}}"#
                ),
            ),
            (
                "set-snapshot-expiry",
                format!(
                    r#"{{"command_id":"{CID}","job_id":"{JID}","snapshot_id":"{sid}","do_not_delete":true}}"#
                ),
            ),
            (
                "expire-snapshots",
                format!(r#"{{"command_id":"{CID}","now":"2026-12-31T23:59:59.999999999Z"}}"#),
            ),
            (
                "create",
                format!(
                    r#"{{"command_id":"{CID}","job_id":"{JID}","deployment":{{"kind":"replica_set","name":"rs0"}}}}"#
                ),
            ),
        ];
        let got: Vec<String> = cases
            .iter()
            .map(|(verb, body)| {
                decode("p1", verb, body.as_bytes(), None)
                    .unwrap()
                    .fingerprint()
                    .to_string()
            })
            .collect();
        assert_eq!(
            got,
            [
                "61a008fafa2c780b1b96d0542df1977027b8d384010c171a7e81867acd6c95fb",
                "bd8b64c25eb1a720629fee5754b84020e7b9263728e99bd17d694a8c254496c3",
                "84704da21e2b45d6db44632a000ebc8dfede8922850c84458da784cfd7faa75f",
                "1616ad3d15b61a3dc195720912566ffd026add891b94bc50531e380738db3223",
                "cbaf9653d5ad69b15a067adcdace764638159d6d47bcc84a6590c78d079b3ea6",
                "9cac50e94bd6d0a30eacd414f0a645b50e440928d581c55142d1773601a6f29a",
            ]
        );
    }

    /// Two fingerprints are equal exactly when their texts are: a text
    /// that reads as a digest is that digest, any other stays a text.
    #[test]
    fn fingerprints_equal_as_their_texts_do() {
        let body = format!(r#"{{"command_id":"{CID}","job_id":"{JID}"}}"#);
        let digest = decode("p1", "start", body.as_bytes(), None)
            .unwrap()
            .fingerprint();
        let hex = digest.to_string();
        let texts = [
            hex.clone(),
            hex.to_uppercase(),
            hex[..63].to_owned(),
            Fingerprint::ANY_BODY.to_owned(),
            String::new(),
        ];
        assert_eq!(Fingerprint::from(hex.clone()), digest);
        assert!(digest.digest_or_text().is_ok());
        for a in &texts {
            let fa = Fingerprint::from(a.clone());
            assert_eq!(fa.to_string(), *a, "the text survives");
            assert_eq!(fa.digest_or_text().is_ok(), *a == hex);
            for b in &texts {
                assert_eq!(
                    fa == Fingerprint::from(b.clone()),
                    a == b,
                    "{a} against {b}"
                );
            }
        }
        // A record an earlier version rebuilt from the log admits any
        // retry; a command's own, that command alone.
        let retry = decode("p1", "start", body.as_bytes(), None).unwrap();
        let other = Fingerprint::from(hex.to_uppercase());
        assert!(Fingerprint::any_body().admits(&retry, &digest));
        assert!(digest.admits(&retry, &digest));
        assert!(!digest.admits(&retry, &other));
        assert!(!digest.admits(&retry, &Fingerprint::any_body()));
    }

    /// A record rebuilt from the log knows its command's verb, project and
    /// job from its first event: a retry naming other ones is a conflict,
    /// one that differs in the rest of its body is not (the log does not
    /// hold it).
    #[test]
    fn a_record_rebuilt_from_the_log_admits_the_verb_project_and_job_it_holds() {
        use crate::domain::event::Event;
        let logged = |project: &str, job: Option<Uuid>, event: Event| {
            Fingerprint::of_logged(&Envelope {
                seq: 7,
                event_id: Uuid::from_u128(7),
                schema_version: 1,
                project_id: ProjectId::parse(project).unwrap(),
                job_id: job,
                job_version: None,
                command_id: CID.parse().unwrap(),
                actor: None,
                actor_verified: false,
                recorded_at: "2026-01-01T00:00:00Z".parse().unwrap(),
                prev_hash: String::new(),
                event,
                hash: String::new(),
            })
        };
        let cmd = |project: &str, verb: &str, body: &str| {
            decode(project, verb, body.replace("JID", JID).as_bytes(), None).unwrap()
        };
        let job: Uuid = JID.parse().unwrap();
        let elsewhere = r#"{"command_id":"%","job_id":"00000000-0000-7000-8000-000000000009"}"#;
        let on_job = format!(r#"{{"command_id":"{CID}","job_id":"JID"}}"#);
        let elsewhere = elsewhere.replace('%', CID);
        let started = logged(
            "p1",
            Some(job),
            Event::JobStarted {
                phase: crate::domain::job::Phase::InitialSync,
                state: crate::domain::job::JobState::Active,
                reason: None,
            },
        );
        let admits = |print: &Fingerprint, c: &CommandEnvelope| print.admits(c, &c.fingerprint());
        assert!(admits(&started, &cmd("p1", "start", &on_job)));
        let with_version =
            format!(r#"{{"command_id":"{CID}","job_id":"JID","expected_version":4}}"#);
        assert!(
            admits(&started, &cmd("p1", "start", &with_version)),
            "the rest of the body is not in the log"
        );
        assert!(
            !admits(&started, &cmd("p1", "stop", &on_job)),
            "another verb"
        );
        assert!(
            !admits(&started, &cmd("p2", "start", &on_job)),
            "another project"
        );
        assert!(
            !admits(&started, &cmd("p1", "start", &elsewhere)),
            "another job"
        );
        // A rejection names its verb; the job is the command's own.
        let rejected = logged(
            "p1",
            Some(job),
            Event::CommandRejected {
                verb: Verb::Stop,
                code: crate::domain::rejection::RejectCode::InvalidTransition,
                reason: "no".into(),
                state: None,
                expected_version: None,
                current_version: None,
            },
        );
        assert!(admits(&rejected, &cmd("p1", "stop", &on_job)));
        assert!(!admits(&rejected, &cmd("p1", "start", &on_job)));
        // expire-snapshots: its events name the jobs it expired, not
        // whether the command named one, so any job is its own.
        let expired = logged(
            "p1",
            Some(job),
            Event::SnapshotExpired {
                snapshot_id: Uuid::from_u128(3),
                expires_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            },
        );
        let project_wide = format!(r#"{{"command_id":"{CID}","now":"2026-01-01T00:00:00Z"}}"#);
        assert!(admits(
            &expired,
            &cmd("p1", "expire-snapshots", &project_wide)
        ));
        assert!(!admits(
            &expired,
            &cmd("p2", "expire-snapshots", &project_wide)
        ));
        // Never equal to the digest of a body.
        assert_ne!(started, cmd("p1", "start", &on_job).fingerprint());
    }

    #[test]
    fn fingerprint_ignores_actor_but_not_the_body() {
        let a = format!(r#"{{"command_id":"{CID}","job_id":"{JID}","actor":"a"}}"#);
        let b = format!(r#"{{"command_id":"{CID}","job_id":"{JID}"}}"#);
        let c = format!(r#"{{"command_id":"{CID}","job_id":"{JID}","expected_version":3}}"#);
        let f = |s: &str, v: &str| decode("p1", v, s.as_bytes(), None).unwrap().fingerprint();
        assert_eq!(f(&a, "start"), f(&b, "start"));
        assert_ne!(f(&b, "start"), f(&c, "start"));
        assert_ne!(f(&b, "start"), f(&b, "stop"));
    }
}
