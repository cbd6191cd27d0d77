//! NATS intake: requests arrive through the service endpoints
//! (`bcp.cmd.*.<verb>`, `bcp.query.*.<kind>`, see [`super::api`]). Commands
//! are decoded and validated here and queued for the writer; queries are
//! answered from redb read transactions. Bad input is answered
//! `bad_request` at once and never reaches the writer; a full queue is
//! answered `unavailable` at once, never an unbounded wait. Subjects no
//! endpoint serves (an unknown verb or query, a malformed subject) are
//! answered `bad_request` by a catch-all subscription, as is a request
//! whose NATS header block does not parse ([`malformed_headers`]).

use super::ServeError;
use super::api::{Kind, Metrics};
use super::queries::QueryError;
use super::reply::ReplyTo;
use super::writer::WriteRequest;
use crate::domain::command::{DecodeError, decode_as};
use crate::domain::{ErrorCode, Reply, Verb};
use crate::store::Store;
use crate::store::ledger::Pending;
use async_nats::service::Request;
use async_nats::{Client, Message};
use futures::{Stream, StreamExt};
use std::sync::Arc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

pub const ACTOR_HEADER: &str = "Bcp-Actor";
/// Set by nats-server on requests crossing a service import with
/// `share: true`: who sent it, as NATS authenticated them.
pub const REQUEST_INFO_HEADER: &str = "Nats-Request-Info";

/// Why `msg`'s NATS header block did not parse, if it did not. The NATS
/// client (patched, .vendor/async-nats) delivers such a message with no
/// headers and the parse error as its description, instead of dropping
/// its connection; its headers (an actor, say) are unknown, so it is
/// refused, not decided without them.
pub fn malformed_headers(msg: &Message) -> Option<&str> {
    msg.description.as_deref().filter(|d| {
        msg.status.is_none() && d.starts_with(async_nats::connection::MALFORMED_HEADERS)
    })
}

/// `user@account` from a Nats-Request-Info header.
pub fn requestor(info: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info).ok()?;
    let acc = v.get("acc")?.as_str()?;
    let user = v
        .get("user")
        .and_then(|u| u.as_str())
        .filter(|u| !u.is_empty());
    let name = v
        .get("name")
        .and_then(|u| u.as_str())
        .filter(|u| !u.is_empty());
    Some(format!("{}@{acc}", user.or(name)?))
}

/// How the intake treats requests.
pub struct Options {
    /// Record the Nats-Request-Info identity as the verified actor.
    pub trust_request_info: bool,
    /// Queries answered at once; more are answered `unavailable`.
    pub queries_in_flight: usize,
    /// While any is raised, commands are answered `unavailable`.
    pub alarms: Arc<super::guard::Alarms>,
    /// Answer subjects no endpoint serves (`bad_request`): one intake per
    /// process does.
    pub catch_all: bool,
    /// Group mode: the last seq JetStream acknowledged (a follower: what it
    /// applied). A query's answer leaves only once its state is
    /// acknowledged ([`QUERY_ACK_WAIT`]): a leader's store holds events the
    /// stream may never get, and so does a node's before it has checked its
    /// log against the stream. `None` (single mode): a commit is final
    /// once fsynced, and answers leave at once.
    pub acked: Option<tokio::sync::watch::Receiver<u64>>,
}

/// How long a group node's query waits for the stream to acknowledge the
/// state it read before answering `unavailable` instead.
pub const QUERY_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Take requests until `stop`; dropping `queue` on return lets the writer
/// drain and exit.
pub async fn run(
    client: Client,
    mut requests: impl Stream<Item = (Kind, Request)> + Unpin,
    store: Store,
    queue: mpsc::Sender<WriteRequest>,
    metrics: Arc<Metrics>,
    options: Options,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let queries = Arc::new(QueryPermits::new(options.queries_in_flight));
    let sub = |s: &'static str| {
        let client = client.clone();
        async move {
            client
                .subscribe(s)
                .await
                .map_err(|e| ServeError::Nats(e.to_string()))
        }
    };
    let mut unserved = match options.catch_all {
        true => futures::stream::select(sub("bcp.cmd.>").await?, sub("bcp.query.>").await?).boxed(),
        false => futures::stream::pending().boxed(),
    };
    loop {
        // Handling a request may wait to send an answer (`bad_request`,
        // `unavailable`), and once the NATS client's buffer is full during
        // an outage, that wait lasts until NATS is back. `stop` must still
        // end it: the producer retries what was not answered.
        let handled = tokio::select! {
            r = requests.next() => match r {
                Some((Kind::Command(verb), request)) => stop.run_until_cancelled(command(&client, verb, request, &queue, &metrics, &options)).await,
                Some((Kind::Query(kind), request)) => stop.run_until_cancelled(query(&client, kind, request, store.clone(), &queries, options.acked.clone())).await,
                None => None,
            },
            m = unserved.next() => match m {
                Some(m) => stop.run_until_cancelled(not_served(&client, m)).await,
                None => None,
            },
            _ = stop.cancelled() => None,
        };
        if handled.is_none() {
            break;
        }
    }
    Ok(())
}

async fn command(
    client: &Client,
    verb: Verb,
    request: Request,
    queue: &mpsc::Sender<WriteRequest>,
    metrics: &Metrics,
    options: &Options,
) {
    let msg = &request.message;
    if let Some(why) = malformed_headers(msg) {
        metrics.rejected(verb.as_str(), "bad_request");
        let reply = Reply::error(ErrorCode::BadRequest, why);
        refuse(client, ReplyTo::of_request(request), reply).await;
        return;
    }
    let project = msg.subject.split('.').nth(2).unwrap_or("");
    let header_actor = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(ACTOR_HEADER))
        .map(|v| v.as_str());
    let identity = options
        .trust_request_info
        .then(|| {
            msg.headers
                .as_ref()?
                .get(REQUEST_INFO_HEADER)
                .and_then(|v| requestor(v.as_str()))
        })
        .flatten();
    let cmd = match decode_as(project, verb.as_str(), &msg.payload, header_actor, identity) {
        Ok(cmd) => cmd,
        Err(e) => {
            tracing::debug!(subject = %msg.subject, error = %e, "bad_request");
            metrics.rejected(verb.as_str(), "bad_request");
            let reply = Reply::error(ErrorCode::BadRequest, e.0);
            refuse(client, ReplyTo::of_request(request), reply).await;
            return;
        }
    };
    // `any` first: no lock on the hot path while nothing is raised.
    if let Some(why) = options
        .alarms
        .any()
        .then(|| options.alarms.refusal())
        .flatten()
    {
        metrics.rejected(verb.as_str(), "unavailable");
        let reply = Reply::error(ErrorCode::Unavailable, why);
        refuse(client, ReplyTo::of_request(request), reply).await;
        return;
    }
    let write = WriteRequest {
        pending: Pending::new(cmd),
        reply_to: ReplyTo::of_request(request),
        queued: std::time::Instant::now(),
    };
    // In a block, so the refused request is dropped before the await.
    let refusal = {
        let (r, message) = match queue.try_send(write) {
            Ok(()) => return,
            Err(TrySendError::Full(r)) => {
                (r, "intake queue is full; retry with the same command_id")
            }
            Err(TrySendError::Closed(r)) => {
                (r, "bcp is shutting down; retry with the same command_id")
            }
        };
        metrics.rejected(verb.as_str(), "unavailable");
        if r.reply_to.is_nobody() {
            // Nobody to tell: counted (`$SRV.STATS` data `dropped`), and
            // logged once a while, not once per command in a flood.
            metrics.dropped(message);
            return;
        }
        metrics.refused_log(message);
        let reply = Reply::error(ErrorCode::Unavailable, message);
        refuse(client, r.reply_to, reply)
    };
    refusal.await;
}

/// Answer `to` with one of the intake's refusals (`bad_request`,
/// `unavailable`). Boxed, as these are the cold paths: unboxed, their
/// futures widen the future of every command, which is copied on its way
/// into the intake's select (bench/RESULTS.md: those copies' samples fell
/// by 40 %).
fn refuse(client: &Client, to: ReplyTo, reply: Reply) -> futures::future::BoxFuture<'_, ()> {
    Box::pin(async move { to.send(client, &reply).await })
}

/// A query refused before its store was read (boxed, as [`refuse`]).
fn refuse_query(
    client: &Client,
    to: ReplyTo,
    error: QueryError,
) -> futures::future::BoxFuture<'_, ()> {
    Box::pin(async move { to.send_bytes(client, error.to_json().into()).await })
}

/// The queries answered at once: at most `total`, and of one project's
/// subjects (`_admin`'s too) at most a quarter of them (at least one), so
/// a project that floods its queries leaves the others theirs.
struct QueryPermits {
    total: Arc<Semaphore>,
    per_project: usize,
    held: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One query's place in [`QueryPermits`], given back when dropped.
struct QueryPermit {
    _total: tokio::sync::OwnedSemaphorePermit,
    permits: Arc<QueryPermits>,
    project: String,
}

impl QueryPermits {
    fn new(total: usize) -> QueryPermits {
        QueryPermits {
            total: Arc::new(Semaphore::new(total)),
            per_project: (total / 4).max(1),
            held: Default::default(),
        }
    }

    /// A place for a query of `project`, or why there is none.
    fn try_acquire(self: &Arc<Self>, project: &str) -> Result<QueryPermit, String> {
        let total = (self.total.clone().try_acquire_owned())
            .map_err(|_| "too many queries in flight; retry shortly".to_owned())?;
        let mut held = self.held.lock().expect("query permits");
        let n = held.entry(project.to_owned()).or_default();
        if *n >= self.per_project {
            return Err(format!(
                "too many queries of project {project} in flight (at most {}); retry shortly",
                self.per_project
            ));
        }
        *n += 1;
        Ok(QueryPermit {
            _total: total,
            permits: self.clone(),
            project: project.to_owned(),
        })
    }
}

impl Drop for QueryPermit {
    fn drop(&mut self) {
        let mut held = self.permits.held.lock().expect("query permits");
        if let Some(n) = held.get_mut(&self.project) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.project);
            }
        }
    }
}

/// Answer a query on a blocking thread, or `unavailable` at once when
/// `queries` has no place for it (a flood of queries must not queue
/// without bound, nor take every blocking thread from the writer's
/// neighbours, nor one project's reads from the others).
async fn query(
    client: &Client,
    kind: &'static str,
    request: Request,
    store: Store,
    queries: &Arc<QueryPermits>,
    acked: Option<tokio::sync::watch::Receiver<u64>>,
) {
    if let Some(why) = malformed_headers(&request.message) {
        let error = QueryError::new(ErrorCode::BadRequest, why, None);
        refuse_query(client, ReplyTo::of_request(request), error).await;
        return;
    }
    let project = request
        .message
        .subject
        .split('.')
        .nth(2)
        .unwrap_or("")
        .to_owned();
    let permit = match queries.try_acquire(&project) {
        Ok(permit) => permit,
        Err(message) => {
            tracing::debug!(query = kind, %message, "unavailable");
            let error = QueryError::new(ErrorCode::Unavailable, message, None);
            refuse_query(client, ReplyTo::of_request(request), error).await;
            return;
        }
    };
    // The most one message may hold (0: the server did not say, no limit
    // of its own known): what a reply, and so each page, must fit.
    let max_payload = match client.server_info().max_payload {
        0 => usize::MAX,
        n => n,
    };
    tokio::spawn(async move {
        let _permit = permit;
        let payload = request.message.payload.clone();
        let read = store.clone();
        let answered = tokio::task::spawn_blocking(move || {
            let cut_backs = read.cut_backs();
            let value = super::queries::answer_within(&read, &project, kind, &payload, max_payload);
            // Read after the answer: no row it read is of a later state
            // (unless the log was cut back meanwhile: `cut_backs` says).
            let read_through = read.applied_seq();
            (
                value,
                Read {
                    through: read_through,
                    cut_backs,
                },
            )
        })
        .await;
        let value = match answered {
            Ok((value, read)) => match acked {
                Some(acked) => withheld_until_acked(value, read, &store, acked).await,
                None => value,
            },
            Err(e) => {
                serde_json::to_value(QueryError::new(ErrorCode::Internal, e.to_string(), None))
                    .expect("reply")
            }
        };
        let mut bytes = serde_json::to_vec(&value).expect("json serializes");
        if bytes.len() > max_payload {
            // Never a silent timeout: say why, so the caller can narrow the query.
            let message = format!(
                "the reply ({} bytes) exceeds the NATS max payload ({max_payload} bytes)",
                bytes.len()
            );
            tracing::warn!(query = kind, %message);
            // The store was read: say as of when, as every answer does.
            let as_of_seq = value["as_of_seq"].as_u64();
            bytes = QueryError::new(ErrorCode::Internal, message, as_of_seq).to_json();
        }
        if request.message.reply.is_some()
            && let Err(e) = request.respond(Ok(bytes.into())).await
        {
            tracing::warn!(error = %e, "query reply not sent");
        }
    });
}

/// Where a query's answer was read: the store's state through seq
/// `through`, while the log had been cut back `cut_backs` times.
struct Read {
    through: u64,
    cut_backs: u64,
}

/// `value`, read from `store` as `read` says, once JetStream has
/// acknowledged that state; `unavailable` if it has not within
/// [`QUERY_ACK_WAIT`] (a leader cut off from the stream's quorum, a node
/// not yet reconciled with the stream), or if the store dropped a tail
/// meanwhile (the seqs acknowledged then name other events than those
/// read): an answer must not show a state that the group may drop.
async fn withheld_until_acked(
    value: serde_json::Value,
    read: Read,
    store: &Store,
    mut acked: tokio::sync::watch::Receiver<u64>,
) -> serde_json::Value {
    let waited = tokio::time::timeout(QUERY_ACK_WAIT, acked.wait_for(|seq| *seq >= read.through))
        .await
        .is_ok_and(|r| r.is_ok());
    let acknowledged = *acked.borrow();
    let message = if store.cut_backs() != read.cut_backs {
        "this node dropped events the stream never acknowledged while answering; retry".to_owned()
    } else if waited {
        return value;
    } else {
        let through = read.through;
        format!(
            "this node's state through seq {through} is not yet acknowledged by the stream \
             (acknowledged through seq {acknowledged}); retry shortly"
        )
    };
    // No state is answered: no `as_of_seq`.
    serde_json::to_value(QueryError::new(ErrorCode::Unavailable, message, None)).expect("reply")
}

/// A subject under bcp.cmd.> or bcp.query.> that no endpoint serves.
async fn not_served(client: &Client, msg: Message) {
    let tokens: Vec<&str> = msg.subject.split('.').collect();
    let served = match tokens.as_slice() {
        ["bcp", "cmd", _, verb] => Verb::parse(verb).is_some(),
        ["bcp", "query", _, kind] => super::api::QUERIES.contains(kind),
        _ => false,
    };
    if served {
        return; // an endpoint has it
    }
    let message = match tokens.as_slice() {
        ["bcp", "cmd", _, verb] => DecodeError(format!(
            "unknown verb {verb:?}; verbs: {}",
            Verb::ALL
                .iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        ["bcp", "query", _, kind] => DecodeError(format!(
            "unknown query {kind:?}; queries: {}",
            super::api::QUERIES.join(", ")
        )),
        ["bcp", "cmd", ..] => DecodeError(format!(
            "subject {} is not bcp.cmd.<project>.<verb>",
            msg.subject
        )),
        _ => DecodeError(format!(
            "subject {} is not bcp.query.<project>.<kind> (bcp.query._admin.<kind> for every project)",
            msg.subject
        )),
    };
    tracing::debug!(subject = %msg.subject, error = %message, "bad_request");
    let Some(to) = msg.reply else { return };
    if tokens.get(1) == Some(&"query") {
        // A query's error shape, as every query's.
        let error = QueryError::new(ErrorCode::BadRequest, message.0, None);
        refuse_query(client, ReplyTo::Subject(to), error).await;
    } else {
        let reply = Reply::error(ErrorCode::BadRequest, message.0);
        refuse(client, ReplyTo::Subject(to), reply).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{Read, withheld_until_acked};
    use crate::store::{Store, ledger::Pending, pipeline::Pipeline};

    /// A group node's query read a state through seq 2; the node then cut
    /// its log back to seq 1 (a tail the stream never acknowledged) and
    /// the stream acknowledged seq 5 of another log. The answer is not
    /// sent: the seqs acknowledged name other events than those it read.
    /// Without a cut-back, an acknowledgment at or past the seq read sends
    /// it as it is.
    #[tokio::test]
    async fn an_answer_read_before_a_cut_back_is_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&dir.path().join("bcp.redb")).unwrap();
        let mut ledger = Pipeline::open(store.clone()).unwrap();
        for n in 1..=2u128 {
            let body = serde_json::json!({"command_id": uuid::Uuid::from_u128(n), "job_id": uuid::Uuid::from_u128(n),
                "deployment": {"kind": "replica_set", "name": "rs0"}});
            let cmd =
                crate::domain::command::decode("p1", "create", body.to_string().as_bytes(), None)
                    .unwrap();
            let replies = ledger
                .execute(
                    &[Pending::new(cmd)],
                    chrono::Utc::now(),
                    &mut uuid::Uuid::now_v7,
                )
                .unwrap();
            assert!(replies[0].ok, "{:?}", replies[0].error);
        }
        drop(ledger);
        let answer = serde_json::json!({"ok": true, "as_of_seq": 2});
        let read = |through| Read {
            through,
            cut_backs: store.cut_backs(),
        };

        let (acked, rx) = tokio::sync::watch::channel(2);
        let sent = withheld_until_acked(answer.clone(), read(2), &store, rx).await;
        assert_eq!(sent, answer);

        let (acked_later, rx) = tokio::sync::watch::channel(1);
        let waiting = tokio::spawn({
            let (answer, read, store) = (answer.clone(), read(2), store.clone());
            async move { withheld_until_acked(answer, read, &store, rx).await }
        });
        let cut = store.clone();
        tokio::task::spawn_blocking(move || cut.truncate_to(1))
            .await
            .unwrap()
            .unwrap();
        acked_later.send_replace(5);
        let sent = waiting.await.unwrap();
        assert_eq!(sent["ok"], serde_json::json!(false), "{sent}");
        assert_eq!(
            sent["error"]["code"],
            serde_json::json!("unavailable"),
            "{sent}"
        );
        let message = sent["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("dropped events the stream never acknowledged"),
            "{message}"
        );
        drop(acked);
    }

    #[test]
    fn requestor_is_user_at_account() {
        let info = r#"{"start":"2026-11-27T03:15:51Z","host":"127.0.0.1","id":8,"acc":"PRODUCERS","user":"alice","kind":"Client"}"#;
        assert_eq!(super::requestor(info).as_deref(), Some("alice@PRODUCERS"));
        let nkey_only = r#"{"acc":"A","user":"","name":"svc-1"}"#;
        assert_eq!(super::requestor(nkey_only).as_deref(), Some("svc-1@A"));
        assert_eq!(super::requestor(r#"{"acc":"A"}"#), None);
        assert_eq!(super::requestor("not json"), None);
    }
}
