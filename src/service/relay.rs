//! The outbox relay: publishes committed events to JetStream in seq order,
//! pipelined (up to `RELAY_WINDOW_MAX` acks outstanding, awaited in order),
//! with `Nats-Msg-Id = event_id` and `Nats-Expected-Last-Sequence = seq - 1`,
//! so the stream sequence of every event equals its bcp seq. Every publish
//! but the first after a check (and those inside a group's atomic batch,
//! below) also carries `Nats-Expected-Last-Msg-Id` =
//! the previous event's id: the sequence alone checks a position, not what
//! stands there, so once a foreign message took seq K, the pipelined
//! publishes of K+1… would each find "last sequence K" and be stored after
//! it. With the id, every publish after a foreign message is refused.
//!
//! The events come from the [`Outbox`], handed over by the commit thread
//! as each batch becomes durable, and from redb only when the outbox no
//! longer holds them (after a restart, or when the relay fell behind):
//! a read of redb waits for the fsync of any commit running, which the
//! relay would otherwise pay once per batch. Each event in the outbox comes
//! with its route (subject and id), made by the writer with the event; only
//! an event read from redb is parsed for it. Acks stay outstanding across
//! batches: the relay publishes a new batch without waiting for the acks
//! of the one before (in a group, each reply waits for its batch's ack).
//!
//! In single mode, on a stream that allows them (`allow_batched`, as bcp
//! creates it on nats-server 2.14+), the events go in JetStream fast
//! batches ([`super::batch`]): the same headers (but for the last message
//! id on a batch's first message, whose fence is the sequence alone: the
//! batch before it was committed at that sequence), one answer per 64
//! stored events instead of an ack each, each batch committed with the
//! last event committed when it is sent. In group mode, or on a stream
//! made before, each event has its own ack.
//!
//! In group mode a command's events are published whole or not at all:
//! one that has several (`terminate` with its purge, a region change and
//! the jobs it moves) goes in a JetStream atomic batch (a stream with
//! `allow_atomic`, nats-server 2.12+), after every publish before it is
//! acknowledged, together with the whole commands that follow it in the
//! chunk, as many as fit. A leader that dies mid-command then leaves the
//! stream without any of it, never with a part the next leader would
//! build on (only a command of more than [`RELAY_ATOMIC_BATCH_MAX`] events
//! goes in several batches). On a stream made without `allow_atomic`, each
//! event goes alone, and the relay says so when it connects.
//!
//! On every (re)connection it checks the stream against the log
//! ([`super::guard::inspect`]) and resumes after the stream's last sequence,
//! so a crash, a NATS outage or a lost NATS store delays publishing but never
//! loses or duplicates an event. While any alarm is raised (the stream is not
//! this log, its settings drifted, another process holds the writer lease)
//! it publishes nothing, and checks again until the cause is gone.

use super::batch::{self, Batcher};
use super::guard::{self, AlarmKind, Alarms, Inspection, Verdict};
use crate::domain::envelope::{Route, Routing};
use crate::domain::limits::{
    RELAY_ACK_TIMEOUT, RELAY_ATOMIC_BATCH_MAX, RELAY_BATCH_FLOW, RELAY_CHUNK_MAX, RELAY_OUTBOX_MAX,
    RELAY_WINDOW_MAX,
};
use crate::store::Store;
use async_nats::jetstream::{
    self, context::PublishError, message::PublishMessage, publish::PublishAck,
};
use async_nats::{HeaderMap, header};
use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::envelope::SEQ_HEADER;

/// bcp's JetStream context (the relay, the stream check, the lease). An
/// ack or an API answer that has not come within `RELAY_ACK_TIMEOUT` was
/// probably asked of a server that died: the caller reconciles and
/// resumes (the client defaults, 5 s for awaited acks and 10 s for API
/// requests, left publishing and SIGTERM stalled that long after every
/// NATS restart). `ack_timeout` bounds acks never awaited, `timeout` the
/// awaited ones and the API requests.
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .ack_timeout(crate::domain::limits::RELAY_ACK_TIMEOUT)
        .timeout(crate::domain::limits::RELAY_ACK_TIMEOUT)
        .build(client)
}

/// Where the relay publishes: the stream, its replicas, and the alarms that
/// stop it.
pub struct Target {
    pub js: jetstream::Context,
    pub stream: String,
    pub replicas: usize,
    pub alarms: Arc<Alarms>,
    /// Group mode: cancelled when the stream shows another writer (a
    /// publish fenced by `Nats-Expected-Last-Sequence`, or a stream that
    /// is not this log): this node is no longer the leader.
    pub fence: Option<CancellationToken>,
    /// Woken by the stream check when the stream lost published events
    /// ([`guard::Watched::lost`]): reconcile with it again.
    pub lost: Arc<tokio::sync::Notify>,
    /// Group mode: how long publishing may fail while events wait before
    /// this node steps down (cancels `fence`), and the flag it sets then.
    /// Its lease renews, so nothing else would end its term; another node
    /// may be able to publish (this one's connection or credentials may be
    /// what fails).
    pub stall: Option<(Duration, Arc<std::sync::atomic::AtomicBool>)>,
}

/// Committed events on their way to the relay, in seq order, without a
/// gap: the commit thread [`push`](Outbox::push)es each batch once it is
/// durable, before its head is announced, so the relay finds there every
/// event up to the head it was woken for. Holds at most
/// [`RELAY_OUTBOX_MAX`] events; older ones are read from redb.
#[derive(Clone, Default)]
pub struct Outbox(Arc<Mutex<VecDeque<Event>>>);

/// A committed event: its seq, its stored bytes, and where it is
/// published (made by the writer with the event; read back from the bytes
/// for an event read from redb).
type Event = (u64, Vec<u8>, Route);

impl Outbox {
    /// Add a durable batch's events (seq order, following the last pushed).
    pub fn push(&self, events: Vec<Event>) {
        let mut held = self.0.lock().expect("outbox lock");
        if let (Some((last, ..)), Some((first, ..))) = (held.back(), events.first())
            && *first != last + 1
        {
            // Not the batch after the last (cannot happen: one commit
            // thread, batches in order). The relay reads redb instead.
            tracing::error!(
                last,
                first,
                "outbox: batch does not follow the last; the events held before it dropped"
            );
            held.clear();
        }
        held.extend(events);
        let excess = held.len().saturating_sub(RELAY_OUTBOX_MAX);
        held.drain(..excess);
    }

    /// The events from `from` through at most `to`, taken out, if the
    /// outbox holds `from`; `None`: read them from redb. Drops what is
    /// older than `from` (published).
    pub fn take(&self, from: u64, to: u64) -> Option<Vec<Event>> {
        let mut held = self.0.lock().expect("outbox lock");
        let published = held.iter().take_while(|(seq, ..)| *seq < from).count();
        held.drain(..published);
        if held.front()?.0 != from {
            return None;
        }
        let n = held.iter().take_while(|(seq, ..)| *seq <= to).count();
        Some(held.drain(..n).collect())
    }

    /// The seqs held (tests).
    pub fn seqs(&self) -> Vec<u64> {
        let held = self.0.lock().expect("outbox lock");
        held.iter().map(|(seq, ..)| *seq).collect()
    }
}

/// The ack of a publish not yet acknowledged.
type Ack = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// A publish not yet acknowledged: the seq it ends at, what it holds,
/// and its ack.
type InFlight = (u64, Sent, Ack);

/// What one publish held: one event, or a group's atomic batch of
/// `events` from one command (`several` false) or several whole ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sent {
    events: usize,
    several: bool,
}

/// Events per atomic batch, each limit halved when nats-server refuses a
/// batch of that kind as too large (its `jetstream.limits.batch`), and kept
/// across reconnections. Two, so that what a batch of several commands
/// teaches never splits a command: `group` bounds a batch of several whole
/// commands (1: each command alone), `split` the parts of a command of
/// more events than it (the one case where a command is not all or
/// nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AtomicLimits {
    group: usize,
    split: usize,
}

impl Default for AtomicLimits {
    fn default() -> Self {
        AtomicLimits {
            group: RELAY_ATOMIC_BATCH_MAX,
            split: RELAY_ATOMIC_BATCH_MAX,
        }
    }
}

impl AtomicLimits {
    /// nats-server refused `sent` as too large: half of it, of its kind.
    fn refused(&mut self, sent: Sent) {
        let half = (sent.events / 2).max(1);
        if sent.several {
            self.group = self.group.min(half);
        } else {
            self.split = self.split.min(half);
        }
    }
}

/// Why publishing stopped.
enum Interrupted {
    /// NATS failed (an outage, a timeout): reconcile and resume.
    Nats(String),
    /// An alarm is raised: publish nothing until it clears.
    Halted,
    /// Group mode: another node writes the stream; stop for good.
    Fenced,
}

impl From<String> for Interrupted {
    fn from(e: String) -> Self {
        Interrupted::Nats(e)
    }
}

/// Publish until `drain` is cancelled and everything committed is published.
pub async fn run(
    store: Store,
    outbox: Outbox,
    target: Target,
    mut head: watch::Receiver<u64>,
    published: watch::Sender<u64>,
    drain: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    // Kept across reconnections: a smaller limit of nats-server's is met
    // by the next attempt.
    let mut limits = AtomicLimits::default();
    let source = Source { store, outbox };
    let mut stall = Stall::default();
    loop {
        let before = *published.borrow();
        match publish_until_drained(&source, &target, &mut head, &published, &drain, &mut limits)
            .await
        {
            Ok(()) => return,
            Err(e) => {
                let nats_failed = matches!(e, Interrupted::Nats(_));
                match e {
                    Interrupted::Nats(e) => {
                        tracing::warn!(error = %e, published_seq = *published.borrow(), "relay interrupted; reconciling with the stream")
                    }
                    // The alarm says why, rate-limited.
                    Interrupted::Halted if drain.is_cancelled() => return,
                    Interrupted::Fenced => return,
                    Interrupted::Halted => {}
                }
                if drain.is_cancelled() && head_reached(&head, &published) {
                    return;
                }
                // Back off further while nothing is acknowledged (a lasting
                // failure: a full JetStream, a refused publish), from the
                // start again once something was.
                if *published.borrow() > before {
                    backoff = Duration::from_millis(100);
                }
                let stalled_for = stall.failed(
                    tokio::time::Instant::now(),
                    *published.borrow() > before,
                    !head_reached(&head, &published),
                    nats_failed,
                );
                if let (Some(stalled_for), Some(fence), Some((limit, stalled))) =
                    (stalled_for, &target.fence, &target.stall)
                    && stalled_for >= *limit
                {
                    tracing::warn!(
                        published_seq = *published.borrow(),
                        head_seq = *head.borrow(),
                        "stepping down: nothing published for {stalled_for:?} while events wait; another node may be able to"
                    );
                    stalled.store(true, std::sync::atomic::Ordering::SeqCst);
                    fence.cancel();
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = drain.cancelled(), if !drain.is_cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Since when publishing has failed with events waiting: a group's leader
/// steps down once it lasts ([`Target::stall`]).
#[derive(Default)]
struct Stall(Option<tokio::time::Instant>);

impl Stall {
    /// After a failed attempt to publish, at `now`: whether anything was
    /// acknowledged during it (`progressed`), whether events wait, and
    /// whether it was NATS that failed (a halt by an alarm says why itself,
    /// and another node would meet the same). How long publishing has
    /// stalled, counted from the first failure that left events waiting
    /// since the last progress; `None` while it has not.
    fn failed(
        &mut self,
        now: tokio::time::Instant,
        progressed: bool,
        waiting: bool,
        nats: bool,
    ) -> Option<Duration> {
        if progressed || !waiting || !nats {
            self.0 = None;
            return None;
        }
        Some(now.duration_since(*self.0.get_or_insert(now)))
    }
}

fn head_reached(head: &watch::Receiver<u64>, published: &watch::Sender<u64>) -> bool {
    *published.borrow() >= *head.borrow()
}

/// Where the relay reads committed events: the outbox, else redb.
struct Source {
    store: Store,
    outbox: Outbox,
}

impl Source {
    /// The events from `from` through at most `to` (at least `from`).
    async fn events(&self, from: u64, to: u64) -> Result<Vec<Event>, String> {
        if let Some(events) = self.outbox.take(from, to) {
            return Ok(events);
        }
        let s = self.store.clone();
        let until = to.min(from + RELAY_CHUNK_MAX as u64 - 1);
        let events = tokio::task::spawn_blocking(move || s.raw_events(from, until))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        match events.first() {
            Some((seq, _)) if *seq == from => {}
            _ => return Err(format!("the store holds no event at seq {from}")),
        }
        // Each event's route from its bytes. An event that does not parse
        // ends the chunk: those before it are published, and the next
        // chunk, starting at it, fails.
        let mut routed = Vec::with_capacity(events.len());
        for (seq, bytes) in events {
            match Routing::parse(&bytes) {
                Ok(r) => routed.push((seq, bytes, r.route())),
                Err(e) if routed.is_empty() => {
                    return Err(format!("event at seq {seq} does not parse: {e}"));
                }
                Err(_) => break,
            }
        }
        if routed.last().is_some_and(|(seq, ..)| *seq < to) {
            // The chunk may end inside a command: leave that command's
            // events to the next chunk, so that a group publishes it
            // whole (unless they are all the chunk holds).
            let last = routed.last().map(|(.., r)| r.command_id);
            let its = routed
                .iter()
                .rev()
                .take_while(|(.., r)| Some(r.command_id) == last)
                .count();
            if its < routed.len() {
                routed.truncate(routed.len() - its);
            }
        }
        Ok(routed)
    }
}

async fn publish_until_drained(
    source: &Source,
    target: &Target,
    head: &mut watch::Receiver<u64>,
    published: &watch::Sender<u64>,
    drain: &CancellationToken,
    limits: &mut AtomicLimits,
) -> Result<(), Interrupted> {
    let Target {
        js,
        stream: stream_name,
        replicas,
        alarms,
        fence,
        lost,
        ..
    } = target;
    // In a group the follower phase made the stream; a leader finding it
    // gone steps down, and its follower phase says the stream was lost
    // (a store with events never creates it again).
    let stream = if fence.is_some() {
        match js.get_stream(stream_name).await {
            Ok(stream) => stream,
            Err(e) if guard::no_such_stream(&e) => {
                tracing::warn!(stream = %stream_name, "the stream is gone: stepping down");
                return Err(fenced(fence));
            }
            Err(e) => return Err(format!("stream {stream_name}: {e}").into()),
        }
    } else {
        js.get_or_create_stream(guard::stream_config(
            stream_name,
            *replicas,
            &js.client().server_info().version,
        ))
        .await
        .map_err(|e| format!("stream {stream_name}: {e}"))?
    };
    // Fast batches in single mode, on a stream that allows them (one made
    // by an older bcp does not: its events keep one ack each). In group
    // mode each reply waits for its own events' acks.
    let batched = fence.is_none() && stream.cached_info().config.allow_batch_publish;
    // In a group, a command's events whole, on a stream that allows it.
    let atomic = fence.is_some() && stream.cached_info().config.allow_atomic_publish;
    let committed = *head.borrow();
    let inspection = guard::inspect(
        &source.store,
        js,
        stream_name,
        || committed,
        alarms,
        guard::Behind::Alarm,
    )
    .await?;
    let Inspection::Checked(Verdict::InStep { last }) = inspection else {
        return Err(fenced(fence));
    };
    if fence.is_some() && last < *published.borrow() {
        // A group's stream lost events it acknowledged (made again empty,
        // or cut back): not republished by one node, which the others
        // would not follow; the follower phase refuses the stream.
        tracing::warn!(stream = %stream_name, stream_seq = last, published_seq = *published.borrow(), "the stream lost acknowledged events: stepping down");
        return Err(fenced(fence));
    }
    // The stream holds the log through `last`, whatever halts the relay
    // below (`bcp status` reads this).
    published.send_replace(last);
    if alarms.is_raised(AlarmKind::Publish) {
        // Does the event that could not be published fit now (a server of
        // a larger max_payload)?
        let next = match last < committed {
            true => source.events(last + 1, last + 1).await?,
            false => Vec::new(),
        };
        let still = next
            .first()
            .and_then(|(seq, bytes, _)| too_large(js.client().max_payload(), *seq, bytes));
        alarms.set(AlarmKind::Publish, still);
    }
    if alarms.refusal().is_some() {
        return Err(Interrupted::Halted);
    }
    let mut sent = last;
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(RELAY_WINDOW_MAX);
    let mut writer_gone = false;
    // The first publish is checked by the sequence alone: the check above
    // found the stream's last message to be the log's event at `last`.
    let mut prev_id: Option<String> = None;
    tracing::info!(
        stream_seq = last,
        head_seq = committed,
        batched,
        atomic,
        nats_server_version = %js.client().server_info().version,
        "relay connected: the stream is this log; publishing from its last sequence"
    );
    if fence.is_some() && !atomic {
        tracing::warn!(
            stream = %stream_name,
            "the stream does not allow atomic batches (made before bcp asked for them, or by a nats-server older than 2.12): a command's events are published one by one, and a leader that dies between them leaves the command cut in two"
        );
    }
    if batched {
        return publish_batched(target, source, head, published, drain, last).await;
    }
    let interrupted = |e| match e {
        Publish::Fenced(_) if fence.is_some() => fenced(fence),
        Publish::Halted => Interrupted::Halted,
        e => Interrupted::Nats(e.to_string()),
    };
    loop {
        let target = *head.borrow_and_update();
        while sent < target {
            if alarms.refusal().is_some() {
                return Err(Interrupted::Halted);
            }
            let events = source.events(sent + 1, target).await?;
            // In a group a command is published whole or not at all.
            let chunk = fitting(js, events, fence.is_some(), alarms)?;
            sent = publish_chunk(
                js,
                chunk,
                Window {
                    in_flight: &mut in_flight,
                    published,
                    prev_id: &mut prev_id,
                    limits: &mut *limits,
                },
                alarms,
                fence,
                atomic,
            )
            .await
            .map_err(interrupted)?
            .unwrap_or(sent);
        }
        if let Some((seq, sent, ack)) = in_flight.front_mut() {
            // Acks outstanding: settle the oldest, unless more events are
            // committed first (then publish those too, without waiting).
            let (seq, sent) = (*seq, *sent);
            tokio::select! {
                biased;
                result = ack => {
                    in_flight.pop_front();
                    settle_publish(seq, sent, result, published, limits).map_err(interrupted)?;
                }
                changed = head.changed(), if !writer_gone => writer_gone = changed.is_err(),
            }
            continue;
        }
        if wait_for_more(head, drain, &mut writer_gone, lost).await? {
            return Ok(());
        }
    }
}

/// The most bytes the relay's headers add to an event (`Nats-Msg-Id`,
/// `Bcp-Seq`, the expected last sequence and message id, a batch's id,
/// sequence and commit: about 400 at most); nats-server's `max_payload`
/// bounds payload and headers together.
const HEADERS_MAX: usize = 512;

/// Why the event at `seq` cannot be published to a server of `max_payload`
/// (with its headers), if it cannot.
fn too_large(max: usize, seq: u64, bytes: &[u8]) -> Option<String> {
    (max > 0 && bytes.len() + HEADERS_MAX > max).then(|| {
        format!(
            "the event at seq {seq} is {} bytes, which with the relay's headers (up to {HEADERS_MAX} bytes) is more than the NATS server's max_payload ({max} bytes), so it cannot be published; raise max_payload in the nats-server configuration (bcp publishes it and takes commands again once connected to a server that takes it)",
            bytes.len()
        )
    })
}

/// The events of `events` before the first one the server cannot take
/// (with `whole_commands`, before the command that holds it); when that is
/// the first, the `Publish` alarm, and publishing halts.
fn fitting(
    js: &jetstream::Context,
    mut events: Vec<Event>,
    whole_commands: bool,
    alarms: &Alarms,
) -> Result<Vec<Event>, Interrupted> {
    // Once per chunk: the client keeps it current (a reconnection's INFO).
    let max = js.client().max_payload();
    let refused = events
        .iter()
        .enumerate()
        .find_map(|(i, (seq, bytes, _))| Some((i, too_large(max, *seq, bytes)?)));
    let refused = refused.map(|(mut i, why)| {
        let command = events[i].2.command_id;
        while whole_commands && i > 0 && events[i - 1].2.command_id == command {
            i -= 1;
        }
        (i, why)
    });
    match refused {
        Some((0, why)) => {
            alarms.raise(AlarmKind::Publish, why);
            Err(Interrupted::Halted)
        }
        Some((i, _)) => {
            events.truncate(i);
            Ok(events)
        }
        None => Ok(events),
    }
}

/// Everything committed is published: wait for more, unless draining.
/// Returns whether the relay is done; `Err` when the stream check found
/// the stream lost published events (reconcile with it again).
async fn wait_for_more(
    head: &mut watch::Receiver<u64>,
    drain: &CancellationToken,
    writer_gone: &mut bool,
    lost: &tokio::sync::Notify,
) -> Result<bool, Interrupted> {
    if drain.is_cancelled() {
        return Ok(true);
    }
    let gone = || Interrupted::Nats("the stream check found published events gone".into());
    if *writer_gone {
        // The head read last is final and is published. Wait for the
        // drain (not `changed()` again: it would return at once, forever,
        // and spin a core).
        tokio::select! {
            _ = drain.cancelled() => {}
            _ = lost.notified() => return Err(gone()),
        }
        return Ok(false);
    }
    tokio::select! {
        changed = head.changed() => *writer_gone = changed.is_err(),
        _ = drain.cancelled() => {}
        _ = lost.notified() => return Err(gone()),
    }
    Ok(false)
}

/// Single mode on a stream that allows fast batches ([`super::batch`]):
/// publish from the stream's last sequence `last`, each batch committed
/// with the last event committed when it is sent, and `published` moved
/// on by nats-server's answers, at most [`RELAY_WINDOW_MAX`] events
/// unanswered.
async fn publish_batched(
    target: &Target,
    source: &Source,
    head: &mut watch::Receiver<u64>,
    published: &watch::Sender<u64>,
    drain: &CancellationToken,
    last: u64,
) -> Result<(), Interrupted> {
    let Target {
        js, alarms, lost, ..
    } = target;
    let mut batcher = Batcher::new(js.client(), RELAY_BATCH_FLOW).await?;
    let interrupted = |e: Publish| match e {
        Publish::Halted => Interrupted::Halted,
        e => Interrupted::Nats(e.to_string()),
    };
    let mut sent = last;
    // The first publish is checked by the sequence alone (as in
    // `publish_until_drained`).
    let mut prev_id: Option<String> = None;
    let mut writer_gone = false;
    loop {
        let target = *head.borrow_and_update();
        if sent < target && batcher.can_send() {
            if alarms.refusal().is_some() {
                return Err(Interrupted::Halted);
            }
            for (seq, bytes, route) in
                fitting(js, source.events(sent + 1, target).await?, false, alarms)?
            {
                if alarms.any() {
                    return Err(Interrupted::Halted);
                }
                while seq - 1 - *published.borrow() >= RELAY_WINDOW_MAX as u64 {
                    settle_batch(batcher.next(RELAY_ACK_TIMEOUT).await, published)
                        .map_err(interrupted)?;
                }
                let event_id = route.event_id.to_string();
                // A batch's first message is fenced by the sequence alone,
                // enough there: the batch before it was committed, its
                // answer naming the stream's last sequence. nats-server
                // checks the last message id only once a message is in a
                // batch, and (as its source reads) a batch refused there
                // stays open, counted against its limit of batches in
                // flight, until nats-server restarts; a sequence refusal
                // ends the batch.
                let prev = prev_id.take().filter(|_| batcher.is_open());
                let headers = fenced_headers(seq, &event_id, prev);
                prev_id = Some(event_id);
                // The last event committed ends the batch: nats-server
                // answers a batch's tail only at its commit.
                let commit = seq == target;
                batcher
                    .send(seq, route.subject, headers, bytes.into(), commit)
                    .await?;
                sent = seq;
                if commit {
                    break;
                }
            }
            continue;
        }
        if batcher.is_open() {
            // Answers outstanding: take the next, unless more events are
            // committed first and the batch takes them.
            let more = !writer_gone && batcher.can_send();
            tokio::select! {
                biased;
                answer = batcher.next(RELAY_ACK_TIMEOUT) => {
                    settle_batch(answer, published).map_err(interrupted)?;
                }
                changed = head.changed(), if more => writer_gone = changed.is_err(),
            }
            continue;
        }
        if wait_for_more(head, drain, &mut writer_gone, lost).await? {
            return Ok(());
        }
    }
}

/// nats-server's answer about a batch: the stream holds the log through
/// the seq it names.
fn settle_batch(
    answer: Result<batch::Answer, batch::Refused>,
    published: &watch::Sender<u64>,
) -> Result<(), Publish> {
    match answer {
        Ok(batch::Answer::Stored(seq) | batch::Answer::Committed(seq)) => {
            published.send_if_modified(|p| {
                let moved = seq > *p;
                *p = (*p).max(seq);
                moved
            });
            Ok(())
        }
        Err(batch::Refused::WrongLastSequence(e)) => Err(Publish::Fenced(e)),
        Err(batch::Refused::Other(e)) => Err(Publish::Failed(e)),
    }
}

/// The relay's headers on the event at `seq` with id `event_id`, fenced
/// by the stream's last sequence and, when known, the last message's id.
fn fenced_headers(seq: u64, event_id: &str, prev_id: Option<String>) -> HeaderMap {
    let mut headers = event_headers(seq, event_id);
    headers.insert(header::NATS_EXPECTED_LAST_SEQUENCE, (seq - 1).to_string());
    if let Some(prev) = prev_id {
        headers.insert(header::NATS_EXPECTED_LAST_MESSAGE_ID, prev);
    }
    headers
}

/// The publishes outstanding, and what the next publish is fenced by.
struct Window<'a> {
    in_flight: &'a mut VecDeque<InFlight>,
    published: &'a watch::Sender<u64>,
    /// The id of the event published last (the next publish expects it).
    prev_id: &'a mut Option<String>,
    /// Events per atomic batch, as nats-server takes them.
    limits: &'a mut AtomicLimits,
}

impl Window<'_> {
    /// Await every ack outstanding, oldest first.
    async fn settle_all(&mut self) -> Result<(), Publish> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    async fn settle_oldest(&mut self) -> Result<(), Publish> {
        let (seq, sent, ack) = self.in_flight.pop_front().expect("a publish in flight");
        settle_publish(seq, sent, ack.await, self.published, self.limits)
    }

    /// Add a publish of `sent` through `seq`.
    fn push(&mut self, seq: u64, sent: Sent, ack: Ack) {
        self.in_flight.push_back((seq, sent, ack));
    }
}

/// Every publish's headers: the event's seq and id (JetStream's message
/// id).
fn event_headers(seq: u64, event_id: &str) -> HeaderMap {
    // Values given as owned strings are moved in, not copied.
    let mut headers = HeaderMap::new();
    headers.insert(SEQ_HEADER, seq.to_string());
    headers.insert(header::NATS_MESSAGE_ID, event_id);
    headers
}

/// Publish a chunk, its acks joining the window of those outstanding
/// (when it is full, the oldest is awaited first); returns the last seq
/// sent (`None`: the chunk was empty). With `atomic` (group mode), from
/// the first command of several events on, whole commands go together in
/// atomic batches ([`atomic_batches`], [`publish_atomic`]).
async fn publish_chunk(
    js: &jetstream::Context,
    mut chunk: Vec<Event>,
    mut window: Window<'_>,
    alarms: &Alarms,
    fence: &Option<CancellationToken>,
    atomic: bool,
) -> Result<Option<u64>, Publish> {
    let mut sent = None;
    let mut at = 0;
    while at < chunk.len() {
        may_publish(fence, alarms)?;
        if atomic && command_end(&chunk, at) - at > 1 {
            for batch in atomic_batches(&chunk[at..], *window.limits) {
                // Every publish before it acknowledged: the stream's last
                // message is then this log's, and the batch's sequence
                // fence (nats-server refuses `Nats-Expected-Last-Msg-Id`
                // in a batch) is enough. Its own ack is awaited in turn,
                // as any: the publishes after it expect its last id.
                window.settle_all().await?;
                // Again before each batch: a node that stepped down (or an
                // alarm raised) while the last was settling publishes
                // nothing more.
                may_publish(fence, alarms)?;
                let (seq, event_id, ack) = publish_atomic(js, batch).await?;
                *window.prev_id = Some(event_id);
                let several = command_end(batch, 0) < batch.len();
                window.push(
                    seq,
                    Sent {
                        events: batch.len(),
                        several,
                    },
                    ack,
                );
                sent = Some(seq);
            }
            break;
        }
        let (seq, bytes, route) = &mut chunk[at];
        let seq = *seq;
        at += 1;
        let event_id = route.event_id.to_string();
        let headers = fenced_headers(seq, &event_id, window.prev_id.take());
        *window.prev_id = Some(event_id);
        let msg = PublishMessage::build()
            .payload(std::mem::take(bytes).into())
            .headers(headers);
        if window.in_flight.len() >= RELAY_WINDOW_MAX {
            window.settle_oldest().await?;
        }
        let ack = js
            .send_publish(std::mem::take(&mut route.subject), msg)
            .await
            .map_err(|e| Publish::Failed(format!("publish seq {seq}: {e}")))?;
        window.push(
            seq,
            Sent {
                events: 1,
                several: false,
            },
            ack.into_future(),
        );
        sent = Some(seq);
    }
    Ok(sent)
}

/// Whether the relay may publish on: not once this node stepped down, nor
/// while an alarm is raised.
fn may_publish(fence: &Option<CancellationToken>, alarms: &Alarms) -> Result<(), Publish> {
    if fence.as_ref().is_some_and(CancellationToken::is_cancelled) {
        return Err(Publish::Fenced("this node stepped down".into()));
    }
    if alarms.any() {
        return Err(Publish::Halted);
    }
    Ok(())
}

/// The end (exclusive) of the command whose events start at `events[at]`.
fn command_end(events: &[Event], at: usize) -> usize {
    let command_id = events[at].2.command_id;
    at + events[at..]
        .iter()
        .take_while(|e| e.2.command_id == command_id)
        .count()
}

/// `events` (whole commands: a chunk never ends inside one) cut into
/// atomic batches, in order: as many whole commands as fit in
/// `limits.group` events together; a command of more goes alone, whole
/// up to `limits.split` events, in parts of `limits.split` beyond (the
/// one case where a command is not all or nothing). One batch for many
/// commands: the publishes before each batch are awaited first, so under
/// load a batch per command drained the pipeline once per command of
/// several events.
fn atomic_batches(events: &[Event], limits: AtomicLimits) -> Vec<&[Event]> {
    let mut batches = Vec::new();
    let (mut start, mut end) = (0, 0);
    while end < events.len() {
        let next = command_end(events, end);
        if next - end <= limits.split && next - start <= limits.group {
            // Fits, with the commands before it.
            end = next;
            continue;
        }
        if end > start {
            // Close the batch before it; then look at it again, first.
            batches.push(&events[start..end]);
            start = end;
            continue;
        }
        // Alone: whole if `split` takes it, else in parts.
        batches.extend(events[start..next].chunks(limits.split));
        (start, end) = (next, next);
    }
    if end > start {
        batches.push(&events[start..end]);
    }
    batches
}

/// Group mode: `events` (whole commands, or a part of one larger than a
/// batch; at most [`RELAY_ATOMIC_BATCH_MAX`]) as one JetStream atomic batch: nats-server stages the messages and
/// stores all of them at the commit (the last message), or none. Each
/// has its seq and id; the first is fenced by the stream's last sequence
/// (nats-server refuses a last message id in a batch, and the sequence on
/// any message but the first). All but the commit go without a reply
/// subject. Returns the last seq, its event id, and the commit's ack.
async fn publish_atomic(
    js: &jetstream::Context,
    events: &[Event],
) -> Result<(u64, String, Ack), Publish> {
    // Unique per attempt: a batch whose commit never arrived stays staged
    // in nats-server until its timeout, under its id.
    let batch_id = uuid::Uuid::now_v7().simple().to_string();
    let n = events.len();
    let mut commit = None;
    for (i, (seq, bytes, route)) in events.iter().enumerate() {
        let (seq, payload) = (*seq, bytes::Bytes::copy_from_slice(bytes));
        let event_id = route.event_id.to_string();
        // nats-server takes the sequence fence on a batch's first message
        // only (it holds for the batch, stored together).
        let mut headers = if i == 0 {
            fenced_headers(seq, &event_id, None)
        } else {
            event_headers(seq, &event_id)
        };
        headers.insert(header::NATS_BATCH_ID, batch_id.as_str());
        headers.insert(header::NATS_BATCH_SEQUENCE, (i + 1).to_string());
        if i + 1 < n {
            js.client()
                .publish_with_headers(route.subject.clone(), headers, payload)
                .await
                .map_err(|e| Publish::Failed(format!("publish seq {seq} in a batch: {e}")))?;
            continue;
        }
        headers.insert(header::NATS_BATCH_COMMIT, header::NATS_BATCH_COMMIT_FINAL);
        let msg = PublishMessage::build().payload(payload).headers(headers);
        let ack = js
            .send_publish(route.subject.clone(), msg)
            .await
            .map_err(|e| Publish::Failed(format!("publish seq {seq}, a batch's commit: {e}")))?;
        commit = Some((seq, event_id, ack));
    }
    let (seq, event_id, ack) = commit.expect("a batch has a last event");
    Ok((seq, event_id, ack.into_future()))
}

/// [`settle`] a publish of `sent`; an atomic batch refused as too large
/// halves the limit of its kind, for the next attempt.
fn settle_publish(
    seq: u64,
    sent: Sent,
    ack: Result<PublishAck, PublishError>,
    published: &watch::Sender<u64>,
    limits: &mut AtomicLimits,
) -> Result<(), Publish> {
    let settled = settle(seq, ack, published);
    if let Err(Publish::TooLarge(e)) = &settled {
        limits.refused(sent);
        match sent.several {
            true => {
                tracing::warn!(error = %e, events = limits.group, "nats-server takes smaller atomic batches; fewer commands go together")
            }
            false => {
                tracing::warn!(error = %e, events = limits.split, "nats-server takes smaller atomic batches; a command of more events goes in several")
            }
        }
    }
    settled
}

/// nats-server's `err_code` of a refused atomic batch that holds more
/// messages than its `jetstream.limits.batch` allows.
const ATOMIC_BATCH_TOO_LARGE: u64 = 10199;

/// The JetStream `err_code` behind a refused publish, if it was one.
fn jetstream_code(e: &PublishError) -> Option<u64> {
    std::error::Error::source(e)?
        .downcast_ref::<jetstream::Error>()
        .map(|j| j.error_code().0)
}

/// The ack of the publish of `seq`: it was stored at stream sequence
/// `seq`, so the stream holds the log through `seq`.
fn settle(
    seq: u64,
    ack: Result<PublishAck, PublishError>,
    published: &watch::Sender<u64>,
) -> Result<(), Publish> {
    let ack = ack.map_err(|e| {
        let what = format!("ack of seq {seq}: {e}");
        // A wrong last sequence is another writer's doing. A wrong last
        // message id may also be JetStream's forgetting: it remembers the
        // last id only within its duplicate window across a restart; the
        // reconnection's check tells a foreign message apart.
        if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence {
            Publish::Fenced(what)
        } else if jetstream_code(&e) == Some(ATOMIC_BATCH_TOO_LARGE) {
            Publish::TooLarge(what)
        } else {
            Publish::Failed(what)
        }
    })?;
    if ack.sequence != seq {
        return Err(Publish::Failed(format!(
            "seq {seq} was stored at stream sequence {}",
            ack.sequence
        )));
    }
    published.send_replace(seq);
    Ok(())
}

/// Why a publish failed.
enum Publish {
    /// The stream's last sequence was not `seq - 1`: someone else wrote it.
    Fenced(String),
    Failed(String),
    /// An alarm was raised: stop before the next publish.
    Halted,
    /// An atomic batch held more messages than nats-server allows.
    TooLarge(String),
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Publish::Fenced(e) | Publish::Failed(e) | Publish::TooLarge(e) => f.write_str(e),
            Publish::Halted => f.write_str("an alarm was raised"),
        }
    }
}

/// What a stream that is not (or no longer) this log's continuation means:
/// in single mode an alarm (raised by the check), in group mode the end of
/// this node's leadership.
fn fenced(fence: &Option<CancellationToken>) -> Interrupted {
    match fence {
        Some(f) => {
            f.cancel();
            Interrupted::Fenced
        }
        None => Interrupted::Halted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stall counts from the first failure that leaves events waiting,
    /// not from an earlier one while idle, and starts again after any
    /// progress or a halt by an alarm (review: a failure at a term's start,
    /// then a long idle spell, made one later failure a step-down).
    #[test]
    fn a_stall_counts_from_the_first_failure_that_leaves_events_waiting() {
        let t0 = tokio::time::Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut stall = Stall::default();
        assert_eq!(stall.failed(at(0), false, false, true), None, "idle");
        assert_eq!(
            stall.failed(at(20), false, true, true),
            Some(Duration::ZERO)
        );
        assert_eq!(
            stall.failed(at(25), false, true, true),
            Some(Duration::from_secs(5))
        );
        assert_eq!(stall.failed(at(26), true, true, true), None, "progress");
        assert_eq!(
            stall.failed(at(27), false, true, true),
            Some(Duration::ZERO)
        );
        assert_eq!(stall.failed(at(28), false, true, false), None, "a halt");
        assert_eq!(
            stall.failed(at(40), false, true, true),
            Some(Duration::ZERO)
        );
    }

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
        let route = |s: u64| Route {
            event_id: uuid::Uuid::from_u128(s.into()),
            subject: format!("bcp.evt.p1.job{s}.JobStarted"),
            command_id: uuid::Uuid::from_u128(s.into()),
        };
        seqs.map(|s| (s, s.to_string().into_bytes(), route(s)))
            .collect()
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|(s, ..)| *s).collect()
    }

    #[test]
    fn the_relay_takes_what_the_outbox_holds_from_the_seq_it_asks() {
        let outbox = Outbox::default();
        outbox.push(batch(1..=3));
        outbox.push(batch(4..=5));
        // Up to the head the relay was woken for, not past it.
        assert_eq!(seqs(&outbox.take(1, 4).unwrap()), [1, 2, 3, 4]);
        assert_eq!(
            outbox.take(5, 9).unwrap(),
            batch(5..=5),
            "the bytes and routes too"
        );
        assert_eq!(outbox.seqs(), Vec::<u64>::new(), "taken out");
        // Asked for what it no longer holds (a reconnection resumes from
        // the stream's last sequence): redb's turn.
        outbox.push(batch(6..=8));
        assert_eq!(outbox.take(4, 8), None);
        assert_eq!(outbox.seqs(), [6, 7, 8], "what is held stays");
        // Asked past what it holds: older ones are dropped as published.
        assert_eq!(outbox.take(7, 7).map(|e| seqs(&e)), Some(vec![7]));
        assert_eq!(outbox.seqs(), [8]);
        assert_eq!(outbox.take(9, 9), None);
        assert_eq!(outbox.seqs(), Vec::<u64>::new());
    }

    /// Events of commands of the given sizes, in order.
    fn commands(sizes: &[usize]) -> Vec<Event> {
        let mut events = batch(1..=sizes.iter().sum::<usize>() as u64);
        let mut e = events.iter_mut();
        for (n, &size) in sizes.iter().enumerate() {
            e.by_ref()
                .take(size)
                .for_each(|ev| ev.2.command_id = uuid::Uuid::from_u128(n as u128));
        }
        events
    }

    #[test]
    fn atomic_batches_hold_whole_commands_as_many_as_fit() {
        let cut = |sizes: &[usize], group: usize, split: usize| -> Vec<Vec<u64>> {
            let events = commands(sizes);
            let batches = atomic_batches(&events, AtomicLimits { group, split });
            let all: Vec<u64> = batches.iter().flat_map(|b| seqs(b)).collect();
            assert_eq!(all, seqs(&events), "every event once, in order");
            batches.iter().map(|b| seqs(b)).collect()
        };
        // Commands of 2, 1, 1, 2, 1 events: all in one batch of 7.
        assert_eq!(cut(&[2, 1, 1, 2, 1], 7, 7), [vec![1, 2, 3, 4, 5, 6, 7]]);
        // A command that does not fit starts the next batch, never split.
        assert_eq!(cut(&[2, 1, 2, 2], 4, 4), [vec![1, 2, 3], vec![4, 5, 6, 7]]);
        // A command larger than a batch goes alone, in parts of `split`;
        // the commands after it batch again.
        assert_eq!(
            cut(&[1, 5, 1, 1], 2, 2),
            [vec![1], vec![2, 3], vec![4, 5], vec![6], vec![7, 8]]
        );
        assert_eq!(cut(&[3], 1, 1), [vec![1], vec![2], vec![3]]);
        assert_eq!(cut(&[], 4, 4), Vec::<Vec<u64>>::new());
        // Fewer commands together (`group` learned from a batch of several)
        // never splits a command `split` still takes whole.
        assert_eq!(cut(&[2, 3, 1], 1, 4), [vec![1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(cut(&[2, 1, 3], 3, 8), [vec![1, 2, 3], vec![4, 5, 6]]);
        // A command `split` no longer takes whole is cut, however many
        // commands may go together (a refused command of 4 left split 2).
        assert_eq!(cut(&[4], 1000, 2), [vec![1, 2], vec![3, 4]]);
        assert_eq!(
            cut(&[1, 4, 1], 1000, 2),
            [vec![1], vec![2, 3], vec![4, 5], vec![6]]
        );
        assert_eq!(command_end(&commands(&[2, 1]), 0), 2);
        assert_eq!(command_end(&commands(&[2, 1]), 2), 3);
    }

    /// A refused batch of several commands halves only how many go
    /// together; a refused command (or part of one), only its parts.
    #[test]
    fn a_refused_batch_halves_the_limit_of_its_kind() {
        let mut limits = AtomicLimits::default();
        limits.refused(Sent {
            events: 1000,
            several: true,
        });
        assert_eq!((limits.group, limits.split), (500, RELAY_ATOMIC_BATCH_MAX));
        limits.refused(Sent {
            events: 300,
            several: true,
        });
        assert_eq!((limits.group, limits.split), (150, RELAY_ATOMIC_BATCH_MAX));
        limits.refused(Sent {
            events: 81,
            several: false,
        });
        assert_eq!((limits.group, limits.split), (150, 40));
        limits.refused(Sent {
            events: 1,
            several: false,
        });
        assert_eq!(limits.split, 1, "never below one");
        // A later, larger refusal never raises a limit.
        limits.refused(Sent {
            events: 900,
            several: true,
        });
        assert_eq!(limits.group, 150);
    }

    #[test]
    fn the_outbox_keeps_the_newest_events_within_its_bound() {
        let outbox = Outbox::default();
        let n = RELAY_OUTBOX_MAX as u64;
        outbox.push(batch(1..=n));
        outbox.push(batch(n + 1..=n + 10));
        let held = outbox.seqs();
        assert_eq!(held.len(), RELAY_OUTBOX_MAX);
        assert_eq!((held[0], *held.last().unwrap()), (11, n + 10));
        assert_eq!(outbox.take(1, 20), None, "the dropped ones: from redb");
        // A batch that does not follow the last is not spliced in after a
        // gap: the outbox starts again from it.
        outbox.push(batch(n + 20..=n + 21));
        assert_eq!(outbox.seqs(), [n + 20, n + 21]);
    }
}
