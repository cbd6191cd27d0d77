//! Group mode: several `bcp serve --group G --node N` processes, each with
//! its own redb store, form one logical bcp on a NATS cluster. NATS is the
//! replicated part (no consensus of bcp's own): the JetStream stream is the
//! log every node agrees on, and a lease in NATS KV names the one leader.
//!
//! A node starts as a follower: it drops any tail of its own log that the
//! stream never acknowledged (`reconcile`), then applies the stream to its
//! store with the same checks and the same row layout as the write path
//! (`Pipeline::follow`), answers queries from its store, and tries for the
//! lease. Once it holds the lease and has applied the stream to its last
//! message, it leads a term (`super::term`): it takes commands, and a reply
//! leaves only once its events are fsynced locally and acknowledged by
//! JetStream (`reply::ReplyGate`). The term ends when the lease is lost or
//! not renewed in time, or when the stream refuses a publish
//! (`Nats-Expected-Last-Sequence`: another node wrote there): the node
//! withholds every reply not yet acknowledged and becomes a follower again.
//!
//! Why dropping a tail never drops an acknowledged command: a leader
//! replies to a command only once JetStream acknowledged the log through
//! that command's last event, at that very seq (the relay checks the ack's
//! sequence). The tail `reconcile` drops is what this store holds beyond
//! the longest prefix it shares with the stream, so JetStream never
//! acknowledged any of it, and no reply covered it, unless the stream
//! lost events it acknowledged: the store keeps how far it knows the
//! stream acknowledged (`Store::acknowledged`: raised by every batch it
//! applies from the stream, by `reconcile`, by each commit of a leader's
//! term to what JetStream had acknowledged when that commit began, and at
//! the end of a term), and `reconcile` refuses to drop below that. A
//! leader killed mid-term has marked all but what was acknowledged after
//! its last commit.

use super::api::{self, Role};
use super::guard::{self, AlarmKind, Published};
use super::lease::{self, Lease};
use super::{Node, ServeError, TermEnd, intake, until_nats};
use crate::store::ledger::Ledger;
use crate::store::pipeline::Pipeline;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::stream::Stream;
use futures::{FutureExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often a follower tries for the lease (and, holding it, renews it
/// and checks whether it has caught up).
const LEASE_POLL: Duration = Duration::from_millis(200);
/// Events a follower applies in one transaction at most; a follower at
/// most this far behind the stream tries for the lease.
const FOLLOW_BATCH_MAX: usize = 1024;
/// How often an idle follower reads the stream's info to know how far
/// behind it is (a busy one knows from each message it applies).
const BEHIND_LOOK: Duration = Duration::from_secs(1);
/// How often a follower stopped by an event that does not continue its
/// log reads the stream again.
const FORK_RETRY: Duration = Duration::from_secs(2);

/// Follow, lead, follow again… until `stop`.
pub(crate) async fn run(node: &Node, stop: &CancellationToken) -> Result<(), ServeError> {
    // Every node answers queries from its own store, all its life.
    let queries = api::endpoints(&node.service, api::query_kinds())
        .await
        .map_err(ServeError::Nats)?;
    let (no_commands, _) = mpsc::channel(1);
    let queries = tokio::spawn(intake::run(
        node.client.clone(),
        queries,
        node.store.clone(),
        no_commands,
        node.metrics.clone(),
        intake::Options {
            trust_request_info: node.config.trust_request_info,
            queries_in_flight: node.config.queries_in_flight,
            alarms: node.alarms.clone(),
            catch_all: true,
            acked: Some(node.published.subscribe()),
        },
        stop.clone(),
    ));
    let result = loop {
        node.role.send_replace(Role::Follower);
        let (ledger, lease) = match follow(node, stop).await {
            Ok(Some(taken)) => taken,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        node.role.send_replace(Role::Leader);
        tracing::info!(head_seq = ledger.head_seq(), "leader: taking commands");
        match super::term(node, ledger, lease, stop).await {
            Ok(TermEnd::Stopped) => break Ok(()),
            Ok(TermEnd::Deposed) => {
                // What fenced the term is the next follower phase's to sort out.
                node.alarms.clear(AlarmKind::Fork);
            }
            Err(e) => break Err(e),
        }
    };
    if result.is_err() {
        // The process ends with this error: the queries' intake too.
        stop.cancel();
    }
    let _ = queries.await;
    result
}

/// The follower phase: reconcile, apply the stream, take the lease, catch
/// up. `None` on `stop`.
async fn follow(
    node: &Node,
    stop: &CancellationToken,
) -> Result<Option<(Ledger, Lease)>, ServeError> {
    let config = &node.config;
    // A store with events never creates the stream: a missing one was lost
    // (reconcile refuses an empty one the same way).
    let has_events = node.store.head_seq()? > 0;
    let Some(stream) = until_nats(stop, "the stream", || async {
        // The stream's batch flags follow the server's version, known only
        // once connected (the first connection may still be under way).
        let client = node.js.client();
        client.flush().await.map_err(|e| e.to_string())?;
        if has_events {
            return match existing_stream(node).await {
                Ok(Some(stream)) => Ok(Ok(stream)),
                Ok(None) => Ok(Err(lost_stream(node))),
                Err(e) => Err(e),
            };
        }
        let version = client.server_info().version;
        node.js
            .get_or_create_stream(guard::stream_config(
                &config.stream,
                config.stream_replicas,
                &version,
            ))
            .await
            .map(Ok)
            .map_err(|e| e.to_string())
    })
    .await
    else {
        return Ok(None);
    };
    let stream = stream?;
    // NATS failing meanwhile (a step-down often comes with NATS trouble) is
    // waited out; a store that cannot join is refused.
    let reconciled = until_nats(stop, "reconciling with the stream", || async {
        match reconcile(node, &stream).await {
            Err(ServeError::Nats(e)) => Err(e),
            answer => Ok(answer),
        }
    })
    .await;
    match reconciled {
        None => return Ok(None),
        Some(Err(refused)) => return Err(refused),
        Some(Ok(())) => {}
    }
    let store = node.store.clone();
    let mut ledger = tokio::task::spawn_blocking(move || Pipeline::<()>::open(store))
        .await
        .map_err(|e| ServeError::Nats(format!("open the store: {e}")))??;
    node.head.send_replace(ledger.head_seq());
    node.published.send_replace(ledger.head_seq());
    tracing::info!(
        head_seq = ledger.head_seq(),
        "follower: applying the stream"
    );

    let mut lease: Option<Lease> = None;
    let mut bucket: Option<lease::Bucket> = None;
    // A single-mode bcp serve seen holding the lease.
    let mut single_writer: Option<String> = None;
    let mut messages = None;
    // How many messages the stream holds past what was applied, as the
    // last one delivered said (unknown until then): a node tries for the
    // lease only when near the head, so a far-behind node does not lead
    // only to replay the stream before taking commands.
    let mut behind = match stop.run_until_cancelled(stream.get_info()).await {
        None => return Ok(None),
        Some(info) => info
            .ok()
            .map(|i| i.state.last_sequence.saturating_sub(ledger.head_seq())),
    };
    let mut retry_at = tokio::time::Instant::now();
    // The last time this node applied events, and until when it leaves the
    // lease to the others after it could not catch up holding it.
    let mut progressed_at = tokio::time::Instant::now();
    let mut hold_off_until = tokio::time::Instant::now();
    if node
        .stalled
        .swap(false, std::sync::atomic::Ordering::SeqCst)
    {
        // The last term could publish nothing: another node may.
        hold_off_until += 2 * config.lease_ttl;
    }
    // When the stream's info was last read for `behind` (idle, at most once
    // a second: one JetStream request, not one per poll).
    let mut looked_at: Option<tokio::time::Instant> = None;
    let mut lost_for = LostWatch::default();
    let mut poll = tokio::time::interval(LEASE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forked = node.alarms.is_raised(AlarmKind::Fork);
        // After an event that does not continue this log, try again now and
        // then: the alarm clears once the stream is this log again.
        if messages.is_none() && (!forked || tokio::time::Instant::now() >= retry_at) {
            retry_at = tokio::time::Instant::now() + FORK_RETRY;
            let from = ledger.head_seq() + 1;
            match stop.run_until_cancelled(ordered_from(&stream, from)).await {
                None => return Ok(None),
                Some(Ok(m)) => messages = Some(m),
                // A stream deleted meanwhile is found by the next look at
                // its info (below).
                Some(Err(e)) => tracing::debug!(error = %e, "follower: no consumer yet"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {
                give_up(lease).await;
                return Ok(None);
            }
            _ = poll.tick() => {
                let now = tokio::time::Instant::now();
                let stale = now.duration_since(progressed_at) >= LEASE_POLL
                    && looked_at.is_none_or(|at| now.duration_since(at) >= BEHIND_LOOK);
                if behind.is_none() || stale {
                    looked_at = Some(now);
                    // Nothing applied since the last look: how far behind
                    // this node is comes from the stream itself. A consumer
                    // that delivers nothing (its server's copy of the
                    // stream broken) would otherwise leave the last count
                    // standing, and a node far behind would lead.
                    let head = ledger.head_seq();
                    let last = match stop.run_until_cancelled(stream.get_info()).await {
                        None => return Ok(None),
                        Some(Ok(info)) => Some(info.state.last_sequence),
                        Some(Err(_)) => None,
                    };
                    // A stream that ends before the head is not near: no
                    // lease is tried on it while it may be lost.
                    behind = last.and_then(|last| last.checked_sub(head));
                    let lost = match last {
                        Some(last) => last < head,
                        None => missing(node, head).await,
                    };
                    if lost_for.saw(lost) {
                        give_up(lease).await;
                        return Err(match last {
                            Some(last) if last > 0 => shorter_stream(node, last, head),
                            _ => lost_stream(node),
                        });
                    }
                }
                node.metrics.set_behind_stream(behind);
                if behind.is_some_and(|b| b > 0) && now.duration_since(progressed_at) >= config.lease_ttl {
                    // Behind and applying nothing for a lease TTL: read the
                    // stream through a new consumer (NATS may place it on
                    // another server), and leave the lease to a node that
                    // can lead now rather than hold it while stuck.
                    tracing::warn!(
                        behind = behind.unwrap_or_default(),
                        head_seq = ledger.head_seq(),
                        lease_held = lease.is_some(),
                        "follower: no event applied for {:?} while the stream is ahead; reading it again{}",
                        now.duration_since(progressed_at),
                        if lease.is_some() { ", and giving the lease up" } else { "" }
                    );
                    messages = None;
                    progressed_at = now;
                    if lease.is_some() {
                        give_up(lease.take()).await;
                        hold_off_until = now + 2 * config.lease_ttl;
                    }
                }
                let near = behind.is_some_and(|b| b <= FOLLOW_BATCH_MAX as u64) && now >= hold_off_until;
                let taking = async {
                    match lease.take() {
                        // A forked node must not lead: let another take it.
                        Some(l) if forked => {
                            l.release().await;
                            None
                        }
                        Some(mut l) => l.renew().await.is_ok().then_some(l),
                        None if forked || !near || single_writer.is_some() => None,
                        None => {
                            if bucket.is_none() {
                                bucket = lease::Bucket::open(&node.js, config.lease_ttl, config.stream_replicas).await.ok();
                            }
                            let tried = match &bucket {
                                Some(b) => b.try_acquire(&config.stream, &node.holder).await,
                                None => return None,
                            };
                            match tried {
                                Ok(Ok(lease)) => Some(lease),
                                Ok(Err(held)) => {
                                    if held.single_mode {
                                        single_writer = Some(held.holder);
                                    }
                                    None
                                }
                                Err(e) => {
                                    // Opened again next time: a bucket
                                    // deleted (to clear a stuck lease) is
                                    // made again, as at the start.
                                    tracing::debug!(error = %e, "follower: the lease bucket did not answer; opening it again");
                                    bucket = None;
                                    None
                                }
                            }
                        }
                    }
                };
                let Some(taken) = stop.run_until_cancelled(taking).await else {
                    return Ok(None);
                };
                lease = taken;
                if let Some(holder) = &single_writer {
                    // For good (until this node restarts): its lease
                    // lapsing would not say its acknowledged events are in
                    // the stream.
                    node.alarms.raise(AlarmKind::Writer, format!(
                        "a single-mode bcp serve writes the stream {}: {holder}. A group never takes over from it (it acknowledges commands before the stream has their events): stop it (it publishes what it acknowledged as it drains), then restart this group's nodes",
                        config.stream
                    ));
                }
                let Some(held) = lease.take() else { continue };
                let last = match stop.run_until_cancelled(stream.get_info()).await {
                    None => {
                        give_up(Some(held)).await;
                        return Ok(None);
                    }
                    Some(Ok(info)) => info.state.last_sequence,
                    Some(Err(_)) => {
                        lease = Some(held);
                        continue;
                    }
                };
                if last == ledger.head_seq() {
                    return Ok(Some((ledger.into_ledger(), held)));
                }
                if last < ledger.head_seq() {
                    // The stream lost events this store holds (since the
                    // last look): not one to lead on. The looks above end
                    // the node once it stays so.
                    held.release().await;
                    behind = None;
                    continue;
                }
                lease = Some(held);
                tracing::info!(stream_last = last, head_seq = ledger.head_seq(), "lease taken; catching up before taking commands");
            }
            batch = next_batch(&mut messages), if messages.is_some() => {
                let Some((batch, pending, first)) = batch else {
                    messages = None; // the consumer ended: open another
                    continue;
                };
                if first <= ledger.head_seq() {
                    // The consumer went back (async-nats recreates an
                    // ordered consumer from the stream's start when it had
                    // delivered nothing yet): events this node has, not a
                    // fork. Read on from the head instead.
                    tracing::debug!(stream_seq = first, head_seq = ledger.head_seq(), "follower: the consumer went back; reading from the head");
                    messages = None;
                    continue;
                }
                let (l, applied) = tokio::task::spawn_blocking(move || {
                    let applied = ledger.follow(batch);
                    (ledger, applied)
                })
                .await
                .map_err(|e| ServeError::Nats(format!("apply: {e}")))?;
                ledger = l;
                match applied {
                    Ok(()) => {
                        behind = Some(pending);
                        progressed_at = tokio::time::Instant::now();
                        node.head.send_replace(ledger.head_seq());
                        node.published.send_replace(ledger.head_seq());
                        node.alarms.clear(AlarmKind::Fork);
                    }
                    Err(crate::store::StoreError::Corrupt(what)) => {
                        node.alarms.raise(AlarmKind::Fork, format!("the stream {} is not this log: {what}", config.stream));
                        messages = None;
                    }
                    Err(e) => {
                        give_up(lease).await;
                        return Err(e.into());
                    }
                }
            }
        }
    }
}

/// Release a lease held while following (it would otherwise keep the
/// other nodes waiting its TTL out), bounded by [`LEASE_POLL`].
async fn give_up(lease: Option<Lease>) {
    if let Some(l) = lease {
        let _ = tokio::time::timeout(LEASE_POLL, l.release()).await;
    }
}

type Messages = async_nats::jetstream::consumer::pull::Ordered;

async fn ordered_from(stream: &Stream, from: u64) -> Result<Messages, String> {
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// The next message and whatever else is already there, up to
/// [`FOLLOW_BATCH_MAX`], with how many the stream held past the last of
/// them and the stream sequence of the first; `None` when the consumer
/// failed or ended.
async fn next_batch(messages: &mut Option<Messages>) -> Option<(Vec<Vec<u8>>, u64, u64)> {
    let m = messages.as_mut()?;
    let first = m.next().await?.ok()?;
    let (mut pending, stream_seq) = first
        .info()
        .map_or((u64::MAX, u64::MAX), |i| (i.pending, i.stream_sequence));
    let mut batch = vec![first.payload.to_vec()];
    while batch.len() < FOLLOW_BATCH_MAX {
        match m.next().now_or_never() {
            Some(Some(Ok(msg))) => {
                pending = msg.info().map_or(u64::MAX, |i| i.pending);
                batch.push(msg.payload.to_vec());
            }
            _ => break,
        }
    }
    Some((batch, pending, stream_seq))
}

/// The stream, `None` when JetStream says it does not exist.
async fn existing_stream(node: &Node) -> Result<Option<Stream>, String> {
    match node.js.get_stream(&node.config.stream).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) if guard::no_such_stream(&e) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether JetStream says the stream does not exist, under a store with
/// events (`head` > 0). Asked whenever reading the stream's info fails.
async fn missing(node: &Node, head: u64) -> bool {
    head > 0 && matches!(existing_stream(node).await, Ok(None))
}

/// How long a follower's stream must keep looking lost (missing, or ending
/// before this store's head), look after look, before the node ends: one
/// answer of a cluster that is restarting is not taken as final.
const LOST_CONFIRM: Duration = Duration::from_secs(2);

/// Since when the stream has looked lost. A lost stream must end a
/// follower: nothing else would. A fork alarm stands, an ordered consumer
/// retries against a missing stream without end, a node that cannot tell
/// how far behind it is never tries for the lease, and one whose stream
/// was made again empty waits for events that never come.
#[derive(Default)]
struct LostWatch(Option<tokio::time::Instant>);

impl LostWatch {
    /// One look at the stream (`lost`: whether it looked lost); true once
    /// it has looked lost at every look for [`LOST_CONFIRM`].
    fn saw(&mut self, lost: bool) -> bool {
        if !lost {
            self.0 = None;
            return false;
        }
        let now = tokio::time::Instant::now();
        now.duration_since(*self.0.get_or_insert(now)) >= LOST_CONFIRM
    }
}

/// The stream ends at `last` (> 0), before this store's `head`.
fn shorter_stream(node: &Node, last: u64, head: u64) -> ServeError {
    ServeError::Nats(format!(
        "the stream {} ends at seq {last}, before this store's head {head}: it lost events (restart this node to check it)",
        node.config.stream
    ))
}

/// A store with events against a missing or empty stream (a lost stream).
fn lost_stream(node: &Node) -> ServeError {
    let name = &node.config.stream;
    let head = node.store.head_seq().unwrap_or_default();
    ServeError::Refused(format!(
        "the stream {name} is missing or empty but this store holds {head} events (the stream was lost?); nothing was changed: republish the log from the node whose store holds the most of it (start it once without --group, until bcp status shows relay lag 0), stop it, then start the group again{}",
        never_acknowledged_hint(node)
    ))
}

/// For a refusal of a store whose log the stream lacks from its first
/// event: when the store records no acknowledgement at all, the other
/// likely cause, a new group's first leader that could publish nothing.
/// Said, not acted on: a leader killed mid-term has not marked the acks
/// that came after its last commit (all of them, if they came after its
/// only one), and a stream can lose its data and keep its name; only an
/// operator who knows which happened may remove the store.
fn never_acknowledged_hint(node: &Node) -> &'static str {
    let unmarked = node.store.acknowledged().is_ok_and(|a| a == 0)
        && node.store.served_single().is_ok_and(|s| s.is_none());
    if unmarked {
        ". This store records no acknowledgement from the stream for any of its events: if this node led a new group first and could not publish (may its NATS user publish on bcp.evt.>?), no producer got a reply for them, and removing its store file and restarting the node makes it follow the stream; a node killed while leading has not recorded the acknowledgements after its last commit, so check the other nodes' heads first (bcp status)"
    } else {
        ""
    }
}

/// Drop the tail of this store's log that the stream does not hold: the
/// events after the longest prefix the two share (see the module doc for
/// why that tail was never acknowledged). Refuses, changing nothing, a
/// store of another log, a non-empty store against an empty stream (a
/// lost stream: republish it from one node in single mode first), and one
/// against a stream trimmed or deleted from.
async fn reconcile(node: &Node, stream: &Stream) -> Result<(), ServeError> {
    let name = &node.config.stream;
    let head = node.store.head_seq()?;
    let state = stream
        .get_info()
        .await
        .map_err(|e| ServeError::Nats(format!("stream {name}: {e}")))?
        .state;
    let last = state.last_sequence;
    if head == 0 {
        return Ok(());
    }
    if last == 0 {
        return Err(lost_stream(node));
    }
    if state.first_sequence != 1 || state.messages != last {
        // Its messages cannot all be read to compare (a read of one gone
        // would be waited out as a NATS failure, for good), and a store
        // is not matched against a log with holes.
        return Err(ServeError::Refused(format!(
            "the stream {name} is not the gapless log from seq 1: it holds {} messages up to seq {last} (trimmed or deleted from); nothing was changed: make a fresh stream from the verified log of the node whose store holds the most of it (this one holds {head} events; see the README), started once without --group, then start the group again",
            state.messages
        )));
    }
    // Whether the stream's message at `seq` is this store's event there.
    let same = async |seq: u64| -> Result<bool, ServeError> {
        let theirs = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| ServeError::Nats(format!("read stream seq {seq}: {e}")))?;
        let theirs = Published {
            subject: theirs.subject.to_string(),
            payload: theirs.payload.to_vec(),
        };
        let ours = node.store.raw_events(seq, seq)?;
        let Some((_, ours)) = ours.first() else {
            return Err(ServeError::Refused(format!(
                "this store has no event at seq {seq}, below its head {head}: run bcp audit verify"
            )));
        };
        Ok(guard::differs(seq, &theirs, ours).is_none())
    };
    // The longest shared prefix. Hash-chained, two logs that agree at a
    // seq agree at every seq before it, so it is found by bisection.
    let common = head.min(last);
    let keep = if same(common).await? {
        common
    } else {
        let (mut agree, mut differ) = (0, common); // agree: shared (0 trivially)
        while differ - agree > 1 {
            let mid = agree + (differ - agree) / 2;
            if same(mid).await? {
                agree = mid;
            } else {
                differ = mid;
            }
        }
        agree
    };
    if keep == 0 {
        return Err(ServeError::Refused(format!(
            "this store holds another log than the stream {name} (their first events differ); nothing was changed{}",
            never_acknowledged_hint(node)
        )));
    }
    let acknowledged = node.store.acknowledged()?;
    if keep < acknowledged {
        // Not a tail no reply covered: the stream had these, and lost them.
        return Err(ServeError::Refused(format!(
            "the stream {name} lacks seqs {}..={acknowledged} of this store's log, which it had acknowledged (it holds the log to seq {keep}{}): it lost acknowledged events, and this store may be the last place that holds them; nothing was changed: republish the log from the store that holds the most of it (bcp serve on it once without --group, until bcp status shows relay lag 0, or a fresh stream from a verified log), stop it, then start the group",
            keep + 1,
            if last > keep {
                ", then goes on otherwise"
            } else {
                ""
            }
        )));
    }
    if keep < head && node.store.served_single()?.is_some() {
        // A single-mode bcp serve acknowledges a command once its store has
        // it, before the stream does: this tail may have been answered.
        return Err(ServeError::Refused(format!(
            "this store was last served by a single-mode bcp serve (without --group) and holds seqs {}..={head}, which the stream {name} lacks: that process may have acknowledged them. Start bcp serve on it once without --group until bcp status shows relay lag 0, stop it, then start the group; nothing was changed",
            keep + 1
        )));
    }
    // The mark first: a crash between the two leaves the single-mode mark,
    // which only makes the next start more careful.
    node.store.note_acknowledged(keep)?;
    if keep == head {
        // Everything a single-mode serve acknowledged is in the stream.
        node.store.clear_served_single()?;
    }
    if keep < head {
        tracing::warn!(
            kept = keep,
            dropped = head - keep,
            "dropping seqs {}..={head}: the stream does not hold them (a group node replies only to what the stream acknowledged)",
            keep + 1
        );
        let store = node.store.clone();
        tokio::task::spawn_blocking(move || store.truncate_to(keep))
            .await
            .map_err(|e| ServeError::Refused(format!("truncate: {e}")))??;
    }
    Ok(())
}
