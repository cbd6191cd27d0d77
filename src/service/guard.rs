//! The one-log guard: the published stream and the store are one log.
//!
//! bcp is the only writer of `BCP_EVENTS`, and the stream's sequence of
//! every event equals its bcp seq. This module checks that it stays so, on
//! every (re)connection of the relay and on a timer ([`watch`]):
//! - the stream's last message is the log's event at that seq, byte for byte
//!   and on the same subject (so a foreign or altered message, a stream
//!   ahead of the log, or a different log entirely is found);
//! - the stream keeps the settings the audit trail depends on ([`drift`]).
//!
//! What it finds is an [`Alarm`]: logged at ERROR once (again at most every
//! [`ALARM_RELOG`] while it lasts), shown in `$SRV.STATS` data and in
//! `bcp.status`, and while any alarm is raised the relay publishes nothing
//! and commands are answered `unavailable` naming the cause. An alarm clears
//! by itself when a later check finds the cause gone. bcp never skips,
//! overwrites or "fixes" a stream it does not recognise.
//!
//! The log's identity is the hash of its first event: every later hash
//! chains from it, so two logs that share a first event share nothing else
//! by accident, and the stream's first message names the log it carries.

use super::batch;
use crate::domain::envelope::{GENESIS_HASH, Routing};
use crate::domain::limits::STREAM_DUPLICATE_WINDOW;
use crate::store::Store;
use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch as tokio_watch;
use tokio_util::sync::CancellationToken;

/// How often a lasting alarm is logged again.
pub const ALARM_RELOG: Duration = Duration::from_secs(60);

/// What an alarm is about; one alarm per kind at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    /// The stream's messages differ from the log.
    Fork,
    /// The stream's settings differ from what the audit trail needs.
    StreamConfig,
    /// Another bcp serve holds the stream (see `lease`).
    Writer,
    /// An event is larger than the NATS server takes (its `max_payload`):
    /// the relay cannot publish it.
    Publish,
}

/// A raised alarm, as `bcp.status` and `$SRV.STATS` show it.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Alarm {
    pub kind: AlarmKind,
    pub message: String,
    /// When it was first raised (RFC 3339 UTC).
    pub since: String,
}

/// Every raised alarm, shared by the relay, the watcher, the intake (which
/// refuses commands while any is raised) and the status endpoints.
#[derive(Default)]
pub struct Alarms {
    raised: Mutex<BTreeMap<AlarmKind, (Alarm, Instant)>>,
    /// How many are raised: read on the relay's hot path without the lock.
    count: std::sync::atomic::AtomicUsize,
}

impl Alarms {
    /// Raise `kind` (or update its message); logs at ERROR when new or
    /// changed, and again every [`ALARM_RELOG`] while it lasts.
    pub fn raise(&self, kind: AlarmKind, message: String) {
        let mut raised = self.raised.lock().expect("alarms lock");
        let now = Instant::now();
        match raised.get_mut(&kind) {
            Some((alarm, logged)) if alarm.message == message => {
                if now.duration_since(*logged) >= ALARM_RELOG {
                    tracing::error!(alarm = ?kind, since = %alarm.since, "still not taking commands: {message}");
                    *logged = now;
                }
            }
            _ => {
                tracing::error!(alarm = ?kind, "not taking commands: {message}");
                let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                raised.insert(
                    kind,
                    (
                        Alarm {
                            kind,
                            message,
                            since,
                        },
                        now,
                    ),
                );
                self.count.store(raised.len(), Ordering::Relaxed);
            }
        }
    }

    /// Clear `kind`; logs when it was raised.
    pub fn clear(&self, kind: AlarmKind) {
        let mut raised = self.raised.lock().expect("alarms lock");
        if let Some((alarm, _)) = raised.remove(&kind) {
            self.count.store(raised.len(), Ordering::Relaxed);
            // Not "taking commands": a group follower clears its alarms too.
            tracing::info!(alarm = ?kind, since = %alarm.since, "alarm cleared");
        }
    }

    /// Whether any alarm is raised (no lock: the relay asks per event).
    pub fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Raise or clear `kind` by the outcome of a check.
    pub fn set(&self, kind: AlarmKind, problem: Option<String>) {
        match problem {
            Some(message) => self.raise(kind, message),
            None => self.clear(kind),
        }
    }

    /// Why commands are refused now, if they are.
    pub fn refusal(&self) -> Option<String> {
        let raised = self.raised.lock().expect("alarms lock");
        let (alarm, _) = raised.values().next()?;
        Some(format!(
            "bcp is not taking commands: {}; retry with the same command_id once an operator has fixed it (see bcp status)",
            alarm.message
        ))
    }

    pub fn is_raised(&self, kind: AlarmKind) -> bool {
        self.raised.lock().expect("alarms lock").contains_key(&kind)
    }

    pub fn list(&self) -> Vec<Alarm> {
        let raised = self.raised.lock().expect("alarms lock");
        raised.values().map(|(a, _)| a.clone()).collect()
    }
}

/// The stream's configuration: file storage, every `bcp.evt.>` subject, no
/// limits, and no deletes or purges through NATS: the published audit trail
/// is append-only. Its duplicate window is short
/// ([`STREAM_DUPLICATE_WINDOW`]); the stream check does not compare it, so
/// a stream created before keeps its own.
///
/// It allows the relay's fast batches ([`super::batch`], single mode) and
/// atomic batches (a command's events in a group) when the nats-server of
/// `server_version` has them ([`super::batch::server_has`]): an older one
/// refuses a configuration naming them.
pub fn stream_config(name: &str, replicas: usize, server_version: &str) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec!["bcp.evt.>".to_owned()],
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        deny_delete: true,
        deny_purge: true,
        duplicate_window: STREAM_DUPLICATE_WINDOW,
        allow_batch_publish: batch::server_has(server_version, batch::FAST),
        allow_atomic_publish: batch::server_has(server_version, batch::ATOMIC),
        ..Default::default()
    }
}

/// The settings of `actual` the audit trail depends on that differ from
/// [`stream_config`]: a limit would trim it, a rollup, a message TTL, a
/// delete or a purge would remove from it, a seal stops it, another subject
/// set or a mirror or source makes it someone else's.
pub fn drift(actual: &stream::Config) -> Vec<String> {
    let mut found = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            found.push(what);
        }
    };
    check(
        actual.subjects == ["bcp.evt.>"],
        format!("subjects {:?} (want [\"bcp.evt.>\"])", actual.subjects),
    );
    check(
        actual.storage == stream::StorageType::File,
        format!("storage {:?} (want file)", actual.storage),
    );
    check(
        actual.retention == stream::RetentionPolicy::Limits,
        format!("retention {:?} (want limits)", actual.retention),
    );
    check(
        actual.max_messages <= 0,
        format!("max_msgs {} (want no limit)", actual.max_messages),
    );
    check(
        actual.max_bytes <= 0,
        format!("max_bytes {} (want no limit)", actual.max_bytes),
    );
    check(
        actual.max_message_size <= 0,
        format!(
            "max_msg_size {} (want no limit: a larger event could not be published)",
            actual.max_message_size
        ),
    );
    check(
        actual.max_age.is_zero(),
        format!("max_age {:?} (want no limit)", actual.max_age),
    );
    check(
        actual.max_messages_per_subject <= 0,
        format!(
            "max_msgs_per_subject {} (want no limit)",
            actual.max_messages_per_subject
        ),
    );
    check(
        actual.discard == stream::DiscardPolicy::Old,
        format!("discard {:?} (want old)", actual.discard),
    );
    check(actual.deny_delete, "deny_delete false (want true)".into());
    check(actual.deny_purge, "deny_purge false (want true)".into());
    check(!actual.sealed, "sealed (want not sealed)".into());
    check(
        !actual.allow_rollup,
        "allow_rollup true (want false)".into(),
    );
    check(
        !actual.allow_message_ttl,
        "allow_msg_ttl true (want false)".into(),
    );
    check(
        actual.mirror.is_none() && actual.sources.as_ref().is_none_or(|s| s.is_empty()),
        "a mirror or sources (want none)".into(),
    );
    check(
        actual.subject_transform.is_none(),
        "a subject transform (want none)".into(),
    );
    found
}

/// How the stream stands against the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The stream is a prefix of the log (or empty): publish from `last + 1`.
    InStep { last: u64 },
    /// The stream continues the log past its head: the store is empty or
    /// stale (a lost file, a wrong `--db`, an old copy), or another process
    /// writes this log. It must not take commands.
    Behind { head: u64, stream_last: u64 },
    /// The stream is not this log: what differs, naming the seq.
    Fork(String),
}

/// The identifying fields of a published event, read leniently from bytes
/// that may not be bcp's at all.
#[derive(Deserialize)]
struct Link {
    seq: u64,
    event_id: uuid::Uuid,
    prev_hash: String,
    hash: String,
}

fn link(bytes: &[u8]) -> Option<Link> {
    serde_json::from_slice(bytes).ok()
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// What a stream message is, for an alarm.
fn describe(subject: &str, bytes: &[u8]) -> String {
    match link(bytes) {
        Some(l) => format!(
            "event {} (seq {}, hash {}…) on {subject}",
            l.event_id,
            l.seq,
            short(&l.hash)
        ),
        None => format!(
            "a message bcp did not write ({} bytes on {subject})",
            bytes.len()
        ),
    }
}

/// A message read back from the stream: its subject and payload.
pub struct Published {
    pub subject: String,
    pub payload: Vec<u8>,
}

/// Whether the stream's message at `seq` is the log's event `ours`: the
/// same bytes on the subject bcp publishes it on. `None` when it is.
pub fn differs(seq: u64, theirs: &Published, ours: &[u8]) -> Option<String> {
    let subject = Routing::parse(ours)
        .map(|r| r.subject())
        .unwrap_or_default();
    if theirs.payload == ours && theirs.subject == subject {
        return None;
    }
    let log = match link(ours) {
        Some(l) => format!("event {} (hash {}…)", l.event_id, short(&l.hash)),
        None => "an event that does not parse".to_owned(),
    };
    Some(format!(
        "the stream's seq {seq} holds {}, but the log's seq {seq} is {log}",
        describe(&theirs.subject, &theirs.payload)
    ))
}

/// The pure decision, given what the stream says and what the log holds:
/// `stream_last` its last sequence, `stream_messages` how many it holds,
/// `at_last` its message at `min(stream_last, head)`, `next` its message at
/// `head + 1` when `stream_last > head`; `head` the log's head and
/// `ours_at` the log's event at `min(stream_last, head)` (empty at 0),
/// `head_hash` the hash of the log's head (genesis when empty).
pub struct Observed<'a> {
    pub stream_last: u64,
    pub stream_messages: u64,
    pub at: Option<&'a Published>,
    pub next: Option<&'a Published>,
    pub head: u64,
    pub ours_at: &'a [u8],
    pub head_hash: &'a str,
}

pub fn judge(o: &Observed) -> Verdict {
    if o.stream_messages != o.stream_last {
        return Verdict::Fork(format!(
            "the stream holds {} messages up to seq {}: it is not the gapless log from seq 1 (trimmed or deleted from)",
            o.stream_messages, o.stream_last
        ));
    }
    let common = o.stream_last.min(o.head);
    if common > 0 {
        let Some(at) = o.at else {
            return Verdict::Fork(format!(
                "the stream has no message at seq {common}: it was trimmed or deleted from"
            ));
        };
        if let Some(what) = differs(common, at, o.ours_at) {
            let what = if common == o.stream_last {
                what
            } else {
                format!("{what} (and the stream goes on to seq {})", o.stream_last)
            };
            return Verdict::Fork(what);
        }
    }
    if o.stream_last <= o.head {
        return Verdict::InStep {
            last: o.stream_last,
        };
    }
    // The stream goes past the head: a continuation of this log (the store
    // is behind), or something else appended after it.
    let next_seq = o.head + 1;
    match o.next {
        Some(next) => match link(&next.payload) {
            Some(l) if l.seq == next_seq && l.prev_hash == o.head_hash => Verdict::Behind {
                head: o.head,
                stream_last: o.stream_last,
            },
            _ => Verdict::Fork(format!(
                "the stream's seq {next_seq} holds {}, which does not follow the log's head (seq {}); the stream is ahead of the log",
                describe(&next.subject, &next.payload),
                o.head
            )),
        },
        None => Verdict::Fork(format!(
            "the stream has no message at seq {next_seq}: it was trimmed or deleted from"
        )),
    }
}

/// Read what [`judge`] needs from the stream and the store, and judge.
/// `Err` is a NATS or store failure: nothing could be concluded.
pub async fn check(
    store: &Store,
    stream: &stream::Stream,
    state: &stream::State,
    head: u64,
) -> Result<Verdict, String> {
    // A message that is not there (trimmed, deleted, a stream recreated
    // from a later first sequence) is judged, not an error: an error means
    // NATS could not say, and would be waited out.
    let get = |seq: u64| async move {
        match stream.get_raw_message(seq).await {
            Ok(m) => Ok(Some(Published {
                subject: m.subject.to_string(),
                payload: m.payload.to_vec(),
            })),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(format!("read stream seq {seq}: {e}")),
        }
    };
    let common = state.last_sequence.min(head);
    // A stream with fewer messages than its last sequence is judged by
    // that alone.
    let gapless = state.messages == state.last_sequence;
    let at = match common > 0 && gapless {
        true => get(common).await?,
        false => None,
    };
    let next = match state.last_sequence > head && gapless {
        true => get(head + 1).await?,
        false => None,
    };
    let s = store.clone();
    let ours = tokio::task::spawn_blocking(move || {
        // Two point reads, whatever lies between (a lost stream against a
        // long log must not load the log).
        let event = |seq: u64| -> Result<Option<Vec<u8>>, crate::store::StoreError> {
            Ok(match seq {
                0 => None,
                _ => s.raw_events(seq, seq)?.pop().map(|(_, b)| b),
            })
        };
        let at = event(common)?.unwrap_or_default();
        let head_hash = event(head)?
            .and_then(|b| link(&b).map(|l| l.hash))
            .unwrap_or_else(|| GENESIS_HASH.to_owned());
        Ok::<_, crate::store::StoreError>((at, head_hash))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(judge(&Observed {
        stream_last: state.last_sequence,
        stream_messages: state.messages,
        at: at.as_ref(),
        next: next.as_ref(),
        head,
        ours_at: &ours.0,
        head_hash: &ours.1,
    }))
}

/// What a stream ahead of the log means to the caller of [`inspect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behind {
    /// Running: another process writes this log (the `Fork` alarm).
    Alarm,
    /// Starting: this store is empty or stale, and bcp serve refuses to
    /// start saying so (no alarm, whose message would blame another
    /// process).
    Refusal,
}

/// What one inspection of the stream found.
pub enum Inspection {
    /// No stream yet: nothing to compare (the relay creates it).
    NoStream,
    Checked(Verdict),
}

/// Check the stream's settings and its messages against the log, and raise
/// or clear the `StreamConfig` and `Fork` alarms by what is found. The
/// caller decides what `Behind` means (refuse to start, or an alarm).
///
/// `head` is read once the stream's state is in hand: the relay only
/// publishes what is committed, so the stream's last sequence read before
/// can never be past it (read before, a busy relay's publishes in between
/// would look like another writer's).
/// Whether a stream lookup failed because JetStream has no such stream
/// (not because NATS or JetStream could not answer).
pub fn no_such_stream(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

pub async fn inspect(
    store: &Store,
    js: &jetstream::Context,
    stream_name: &str,
    head: impl Fn() -> u64,
    alarms: &Alarms,
    behind: Behind,
) -> Result<Inspection, String> {
    let mut stream = match js.get_stream(stream_name).await {
        Ok(s) => s,
        Err(e) => {
            if no_such_stream(&e) {
                alarms.clear(AlarmKind::Fork);
                alarms.clear(AlarmKind::StreamConfig);
                return Ok(Inspection::NoStream);
            }
            return Err(format!("stream {stream_name}: {e}"));
        }
    };
    let info = stream
        .info()
        .await
        .map_err(|e| format!("stream info: {e}"))?
        .clone();
    let drifted = drift(&info.config);
    alarms.set(
        AlarmKind::StreamConfig,
        (!drifted.is_empty()).then(|| {
            format!(
                "the stream {stream_name}'s settings were changed behind bcp's back: {}",
                drifted.join(", ")
            )
        }),
    );
    let verdict = check(store, &stream, &info.state, head()).await?;
    alarms.set(
        AlarmKind::Fork,
        match &verdict {
            Verdict::InStep { .. } => None,
            Verdict::Behind { .. } if behind == Behind::Refusal => None,
            Verdict::Behind { head, stream_last } => Some(format!(
                "the stream {stream_name} goes on to seq {stream_last} past this log's head {head}: another bcp serve is writing this log"
            )),
            Verdict::Fork(what) => Some(format!("the stream {stream_name} is not this log: {what}")),
        },
    );
    Ok(Inspection::Checked(verdict))
}

/// What [`watch`] checks, and whom it tells.
pub struct Watched {
    pub store: Store,
    pub js: jetstream::Context,
    pub stream: String,
    pub alarms: std::sync::Arc<Alarms>,
    /// Group mode: cancelled when the stream is not this log in step.
    pub fence: Option<CancellationToken>,
    /// How far the relay published (the stream's acknowledgements).
    pub published: tokio_watch::Receiver<u64>,
    /// Woken when the stream lost what the relay published: it was removed,
    /// or replaced by a shorter prefix of the log (an old copy restored). An
    /// idle relay would otherwise not find out until the next command.
    pub lost: std::sync::Arc<tokio::sync::Notify>,
}

/// Inspect the stream every `interval` until `stop`, so a stray publish, a
/// changed setting, a sealed stream, or one removed or cut back to a
/// prefix of the log is found while the relay is idle (the relay is woken
/// to publish again what it lost), and an alarm clears once its cause is
/// gone. In group mode (`fence`), a
/// stream that is not this node's log in step ends the node's term at once:
/// another node wrote it (a deposed leader's late publishes), and the
/// follower phase sorts it out, where an alarm would refuse commands with
/// the lease held.
pub async fn watch(
    Watched {
        store,
        js,
        stream: stream_name,
        alarms,
        fence,
        published,
        lost,
    }: Watched,
    head: tokio_watch::Receiver<u64>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Read before the stream's state: acknowledged, so on the stream
        // then, unless the stream lost it since.
        let acknowledged = *published.borrow();
        let check = inspect(
            &store,
            &js,
            &stream_name,
            || *head.borrow(),
            &alarms,
            Behind::Alarm,
        );
        match stop.run_until_cancelled(check).await {
            None => return,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "stream check not done (NATS unavailable?)")
            }
            // In a group, the relay woken finds the loss and steps down.
            Some(Ok(Inspection::NoStream)) => {
                if acknowledged > 0 {
                    tracing::warn!(stream = %stream_name, published_seq = acknowledged, "the stream is gone{}", republish(&fence));
                    lost.notify_one();
                }
            }
            Some(Ok(Inspection::Checked(Verdict::InStep { last }))) => {
                // Unless the relay reconciled with the stream meanwhile
                // (it moved `published` back to the stream's last sequence).
                if last < acknowledged && *published.borrow() >= acknowledged {
                    tracing::warn!(stream = %stream_name, stream_seq = last, published_seq = acknowledged, "the stream was cut back to a prefix of the log{}", republish(&fence));
                    lost.notify_one();
                }
            }
            Some(Ok(Inspection::Checked(verdict))) => {
                if let Some(fence) = &fence {
                    tracing::warn!(
                        ?verdict,
                        "stepping down: the stream is not this node's log in step"
                    );
                    fence.cancel();
                    return;
                }
            }
        }
    }
}

/// What the relay does about a stream that lost published events: a
/// single-mode relay publishes them again; a group's leader steps down.
fn republish(fence: &Option<CancellationToken>) -> &'static str {
    match fence {
        None => ": the relay publishes the log again from there",
        Some(_) => ": stepping down",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::envelope::Envelope;
    use crate::domain::{Event, ProjectId};
    use chrono::TimeZone;

    /// A sealed chain of `n` events; `seed` tells logs apart.
    fn chain(n: u64, seed: u128) -> Vec<Vec<u8>> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let mut env = Envelope {
                    seq,
                    event_id: uuid::Uuid::from_u128(seed << 64 | seq as u128),
                    schema_version: 1,
                    project_id: ProjectId::parse("p1").unwrap(),
                    job_id: Some(uuid::Uuid::from_u128(seed + 1)),
                    job_version: Some(seq),
                    command_id: uuid::Uuid::from_u128(seq as u128),
                    actor: None,
                    actor_verified: false,
                    recorded_at: chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
                    prev_hash: String::new(),
                    event: Event::JobStopped {},
                    hash: String::new(),
                };
                let bytes = env.seal_to_json(&prev);
                prev = env.hash;
                bytes
            })
            .collect()
    }

    fn log(n: u64) -> Vec<Vec<u8>> {
        chain(n, 1)
    }

    fn published(bytes: &[u8]) -> Published {
        Published {
            subject: Routing::parse(bytes).unwrap().subject(),
            payload: bytes.to_vec(),
        }
    }

    fn hash_of(bytes: &[u8]) -> String {
        link(bytes).unwrap().hash
    }

    fn observe<'a>(
        stream: &'a [Published],
        ours: &'a [Vec<u8>],
        head: u64,
        head_hash: &'a str,
    ) -> Verdict {
        let last = stream.len() as u64;
        let common = last.min(head);
        judge(&Observed {
            stream_last: last,
            stream_messages: last,
            at: (common > 0).then(|| &stream[common as usize - 1]),
            next: (last > head).then(|| &stream[head as usize]),
            head,
            ours_at: if common > 0 {
                &ours[common as usize - 1]
            } else {
                &[]
            },
            head_hash,
        })
    }

    #[test]
    fn a_prefix_of_the_log_is_in_step() {
        let ours = log(5);
        let stream: Vec<_> = ours[..3].iter().map(|b| published(b)).collect();
        let h = hash_of(&ours[4]);
        assert_eq!(observe(&stream, &ours, 5, &h), Verdict::InStep { last: 3 });
        assert_eq!(observe(&[], &ours, 5, &h), Verdict::InStep { last: 0 });
        assert_eq!(
            observe(&[], &[], 0, GENESIS_HASH),
            Verdict::InStep { last: 0 }
        );
    }

    #[test]
    fn a_continuation_of_the_log_means_the_store_is_behind() {
        let ours = log(5);
        let stream: Vec<_> = ours.iter().map(|b| published(b)).collect();
        assert_eq!(
            observe(&stream, &ours, 3, &hash_of(&ours[2])),
            Verdict::Behind {
                head: 3,
                stream_last: 5
            }
        );
        assert_eq!(
            observe(&stream, &[], 0, GENESIS_HASH),
            Verdict::Behind {
                head: 0,
                stream_last: 5
            }
        );
    }

    #[test]
    fn a_foreign_message_at_or_after_the_head_is_a_fork() {
        let ours = log(3);
        let mut stream: Vec<_> = ours[..2].iter().map(|b| published(b)).collect();
        stream.push(Published {
            subject: "bcp.evt.p1.x.JobStarted".into(),
            payload: b"{\"hello\":1}".to_vec(),
        });
        let h = hash_of(&ours[2]);
        let Verdict::Fork(what) = observe(&stream, &ours, 3, &h) else {
            panic!("not a fork")
        };
        assert!(
            what.contains("seq 3 holds a message bcp did not write"),
            "{what}"
        );
        // Appended after the head: ahead, but not this log's continuation.
        let mut ahead: Vec<_> = ours.iter().map(|b| published(b)).collect();
        ahead.push(stream.pop().unwrap());
        let Verdict::Fork(what) = observe(&ahead, &ours, 3, &h) else {
            panic!("not a fork")
        };
        assert!(
            what.contains("seq 4") && what.contains("ahead of the log"),
            "{what}"
        );
    }

    #[test]
    fn another_log_or_the_right_bytes_on_another_subject_is_a_fork() {
        let ours = log(2);
        let other = chain(2, 7);
        assert_ne!(ours, other);
        let stream: Vec<_> = other.iter().map(|b| published(b)).collect();
        let Verdict::Fork(what) = observe(&stream, &ours, 2, &hash_of(&ours[1])) else {
            panic!("not a fork")
        };
        assert!(what.contains("seq 2 holds event"), "{what}");
        let moved = vec![
            published(&ours[0]),
            Published {
                subject: "bcp.evt.elsewhere".into(),
                payload: ours[1].clone(),
            },
        ];
        assert!(matches!(
            observe(&moved, &ours, 2, &hash_of(&ours[1])),
            Verdict::Fork(_)
        ));
    }

    #[test]
    fn a_trimmed_stream_is_a_fork() {
        let v = judge(&Observed {
            stream_last: 10,
            stream_messages: 4,
            at: None,
            next: None,
            head: 10,
            ours_at: &[],
            head_hash: GENESIS_HASH,
        });
        assert!(matches!(v, Verdict::Fork(w) if w.contains("not the gapless log")));
    }

    #[test]
    fn drift_names_every_setting_changed() {
        assert!(drift(&stream_config("S", 1, "2.15.1")).is_empty());
        let mut c = stream_config("S", 3, "2.11.0");
        assert!(drift(&c).is_empty(), "replicas are not drift");
        c.max_messages = 10;
        c.sealed = true;
        c.deny_purge = false;
        c.max_message_size = 100;
        let d = drift(&c);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d[0].starts_with("max_msgs 10"), "{d:?}");
        assert!(d[1].starts_with("max_msg_size 100"), "{d:?}");
    }

    #[test]
    fn alarms_refuse_until_cleared() {
        let a = Alarms::default();
        assert!(a.refusal().is_none());
        a.raise(AlarmKind::Fork, "seq 3 differs".into());
        a.raise(AlarmKind::Fork, "seq 3 differs".into());
        assert_eq!(a.list().len(), 1);
        assert!(a.refusal().unwrap().contains("seq 3 differs"));
        a.set(AlarmKind::Fork, None);
        assert!(a.refusal().is_none());
    }
}
