//! JetStream fast batch publishing (nats-server 2.14+, a stream with
//! `allow_batched`), as the relay uses it in single mode: the events go
//! as one batch, each message naming the batch, its place in it and the
//! operation in its reply subject (`<inbox>.<id>.<flow>.fail.<n>.<op>.$FI`,
//! nats-server's `getFastBatch`). nats-server answers the first message
//! (with the flow it grants), then once per at most [`RELAY_BATCH_FLOW`](crate::domain::limits::RELAY_BATCH_FLOW)
//! stored messages ("every message through n is stored"), and once when
//! the batch commits. With "fail", a gap or a message refused before it is stored
//! (its `Nats-Expected-Last-Sequence` does not hold) ends the batch there:
//! nothing after it is stored. A message refused later (its last message
//! id, a store error) does not end it, but the next message's sequence
//! fence then fails. Each message keeps the relay's headers, so the fence
//! works as with one ack per message; what goes away is an answer, and an
//! ack future, per message. No Rust client has this API (async-nats 0.51
//! has the stream flag only).
//!
//! A batch is committed with the last event the relay has to send (the
//! tail of a burst would otherwise wait for [`RELAY_BATCH_FLOW`](crate::domain::limits::RELAY_BATCH_FLOW) more),
//! and the next begins only once that commit is answered: a batch opened
//! while another is open starts at one answer per message
//! (`fastBatchInit`).

use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use serde::Deserialize;
use std::time::Duration;

/// Whether nats-server `version` ("2.15.1", "v2.14.0-beta.1") is
/// `at_least` (major, minor): [`FAST`] or [`ATOMIC`] batches.
pub fn server_has(version: &str, at_least: (u32, u32)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    matches!(
        (parts.next().flatten(), parts.next().flatten()),
        (Some(major), Some(minor)) if (major, minor) >= at_least
    )
}

/// Fast batches (this module), stream flag `allow_batched`: nats-server
/// 2.14 and later. An older one ignores the flag, or (2.12, parsing the
/// API strictly) refuses a stream configuration that names it.
pub const FAST: (u32, u32) = (2, 14);

/// Atomic batches (the relay's way of publishing a command's events
/// whole in a group), stream flag `allow_atomic`: nats-server 2.12 and
/// later.
pub const ATOMIC: (u32, u32) = (2, 12);

/// `err_code` of a refused `Nats-Expected-Last-Sequence`.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// What nats-server said of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The log is stored in the stream through this seq; the batch goes on.
    Stored(u64),
    /// The batch is committed, the log stored through this seq.
    Committed(u64),
}

/// Why the batch ended without its commit: nats-server refused it, or
/// said nothing in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A message's `Nats-Expected-Last-Sequence` did not hold: something
    /// else wrote the stream.
    WrongLastSequence(String),
    Other(String),
}

/// One open batch at a time, on one connection.
pub struct Batcher {
    client: Client,
    inbox: String,
    /// Stored messages per answer asked of nats-server (the relay's is
    /// [`RELAY_BATCH_FLOW`](crate::domain::limits::RELAY_BATCH_FLOW)).
    flow: u16,
    answers: Subscriber,
    open: Option<Open>,
}

struct Open {
    /// Every reply subject of the batch starts so:
    /// `<inbox>.<id>.<flow>.fail.`.
    prefix: String,
    /// The log seq before the batch's first message.
    base: u64,
    /// Messages sent in it.
    sent: u64,
    /// Its commit is sent: nothing more goes in it.
    committing: bool,
}

impl Batcher {
    pub async fn new(client: Client, flow: u16) -> Result<Batcher, String> {
        let inbox = client.new_inbox();
        let answers = client
            .subscribe(format!("{inbox}.>"))
            .await
            .map_err(|e| format!("subscribe to the batch answers: {e}"))?;
        Ok(Batcher {
            client,
            inbox,
            flow,
            answers,
            open: None,
        })
    }

    /// Whether a message may be sent now: no batch, or one not committing.
    pub fn can_send(&self) -> bool {
        self.open.as_ref().is_none_or(|b| !b.committing)
    }

    /// Whether a batch is open (answers are still to come).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Send the event at log seq `seq` (the one after the last sent, or
    /// the first of a new batch); `commit` ends the batch with it.
    pub async fn send(
        &mut self,
        seq: u64,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
        commit: bool,
    ) -> Result<(), String> {
        assert!(self.can_send(), "a message sent after its batch's commit");
        let (inbox, flow) = (&self.inbox, self.flow);
        let b = self.open.get_or_insert_with(|| Open {
            prefix: format!("{inbox}.{}.{flow}.fail.", uuid::Uuid::now_v7().simple()),
            base: seq - 1,
            sent: 0,
            committing: false,
        });
        assert_eq!(
            seq,
            b.base + b.sent + 1,
            "a batch's messages follow the log"
        );
        b.sent += 1;
        b.committing = commit;
        let n = b.sent;
        let op = match (n, commit) {
            (_, true) => 2, // commit, storing this message
            (1, false) => 0,
            (_, false) => 1,
        };
        let reply = format!("{}{n}.{op}.$FI", b.prefix);
        self.client
            .publish_with_reply_and_headers(subject, reply, headers, payload)
            .await
            .map_err(|e| format!("publish seq {seq}: {e}"))
    }

    /// The next answer about the open batch, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Answer, Refused> {
        let b = self
            .open
            .as_ref()
            .expect("answers are awaited for an open batch");
        let msg = loop {
            let msg = tokio::time::timeout(timeout, self.answers.next())
                .await
                .map_err(|_| Refused::Other(format!("no answer within {timeout:?}")))?
                .ok_or_else(|| Refused::Other("the answers' subscription ended".into()))?;
            // A batcher's earlier batches are answered through their
            // commit before the next opens: anything else on the inbox is
            // not nats-server's answer.
            if msg.subject.as_str().starts_with(&b.prefix) {
                break msg;
            }
        };
        // A status with no payload: nats-server's 503 "no responders" when
        // no stream takes the subject (it was removed).
        if let Some(status) = msg.status.filter(|_| msg.payload.is_empty()) {
            return Err(Refused::Other(match status {
                async_nats::StatusCode::NO_RESPONDERS => {
                    "no stream takes the batch's subjects (no responders): the stream is gone"
                        .into()
                }
                status => format!("nats-server answered status {status} with no payload"),
            }));
        }
        let answer = parse(&msg.payload, b.base, b.sent)?;
        if let Answer::Committed(_) = answer {
            self.open = None;
        }
        Ok(answer)
    }
}

/// An answer's payload, of the batch whose first message is log seq
/// `base + 1` and of which `sent` messages were sent.
pub fn parse(payload: &[u8], base: u64, sent: u64) -> Result<Answer, Refused> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(rename = "type")]
        kind: Option<String>,
        seq: Option<u64>,
        count: Option<u64>,
        error: Option<WireError>,
    }
    #[derive(Deserialize)]
    struct WireError {
        err_code: Option<u64>,
        description: Option<String>,
    }
    let text = || String::from_utf8_lossy(payload).into_owned();
    let w: Wire = serde_json::from_slice(payload)
        .map_err(|e| Refused::Other(format!("an answer that does not parse ({e}): {}", text())))?;
    let refused = |e: &WireError| {
        let what = format!(
            "refused: {}",
            e.description.as_deref().unwrap_or("no reason")
        );
        match e.err_code {
            Some(WRONG_LAST_SEQUENCE) => Refused::WrongLastSequence(what),
            _ => Refused::Other(what),
        }
    };
    let within = |n: u64| {
        if n > sent {
            Err(Refused::Other(format!(
                "{n} stored of {sent} sent: {}",
                text()
            )))
        } else {
            Ok(base + n)
        }
    };
    match (w.kind.as_deref(), &w.error) {
        (Some("ack"), None) => within(w.seq.unwrap_or(0)).map(Answer::Stored),
        (Some("err"), Some(e)) | (None, Some(e)) => Err(refused(e)),
        // A commit, or (`duplicate`) a batch of events already stored, each
        // at its seq: publishes of the session before whose acks were late.
        (None, None) => {
            let count = w.count.unwrap_or(0);
            let at = within(count)?;
            if count != sent || w.seq != Some(at) {
                return Err(Refused::Other(format!(
                    "a commit of {count} messages stored through stream seq {:?}, \
                     for {sent} sent after seq {base}",
                    w.seq
                )));
            }
            Ok(Answer::Committed(at))
        }
        _ => Err(Refused::Other(format!("an unexpected answer: {}", text()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_asked_of_the_nats_servers_that_have_them() {
        for (v, yes) in [
            ("2.15.1", true),
            ("v2.14.0-beta.1", true),
            ("2.14.0", true),
            ("3.0.0", true),
            ("2.13.9", false),
            ("2.12.1", false),
            ("2.9", false),
            ("", false),
            ("nightly", false),
        ] {
            assert_eq!(server_has(v, FAST), yes, "{v}");
        }
        for (v, yes) in [("2.12.0", true), ("v2.12.0-RC.1", true), ("2.11.9", false)] {
            assert_eq!(server_has(v, ATOMIC), yes, "{v}");
        }
    }

    #[test]
    fn the_answers_of_a_batch_say_how_far_the_log_is_stored() {
        let p = |s: &str, sent| parse(s.as_bytes(), 100, sent);
        // The first message's answer: nothing stored yet, the flow asked.
        assert_eq!(
            p(r#"{"type":"ack","seq":0,"msgs":64}"#, 1),
            Ok(Answer::Stored(100))
        );
        assert_eq!(
            p(r#"{"type":"ack","seq":64,"msgs":64}"#, 90),
            Ok(Answer::Stored(164))
        );
        assert_eq!(
            p(r#"{"stream":"S","seq":190,"batch":"b","count":90}"#, 90),
            Ok(Answer::Committed(190))
        );
    }

    #[test]
    fn a_refusal_or_an_answer_out_of_step_ends_the_batch() {
        let p = |s: &str, sent| parse(s.as_bytes(), 100, sent);
        let fence = r#"{"type":"err","seq":3,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"}}"#;
        assert_eq!(
            p(fence, 5),
            Err(Refused::WrongLastSequence(
                "refused: wrong last sequence: 7".into()
            ))
        );
        // The first message refused: the answer of a plain publish.
        let first = r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 7"},"stream":"S","seq":0}"#;
        assert!(matches!(p(first, 1), Err(Refused::WrongLastSequence(_))));
        let disabled =
            r#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"}}"#;
        assert!(matches!(p(disabled, 1), Err(Refused::Other(_))));
        // More stored than sent, a commit short of what was sent or stored
        // elsewhere in the stream, a gap: none is the log.
        assert!(p(r#"{"type":"ack","seq":6,"msgs":64}"#, 5).is_err());
        assert!(p(r#"{"stream":"S","seq":104,"batch":"b","count":4}"#, 5).is_err());
        assert!(p(r#"{"stream":"S","seq":106,"batch":"b","count":5}"#, 5).is_err());
        // Events stored already, through their own seqs, are stored; a
        // duplicate answered elsewhere (or at seq 0) is not this log.
        assert_eq!(
            p(
                r#"{"stream":"S","seq":101,"duplicate": true,"batch":"b","count":1}"#,
                1
            ),
            Ok(Answer::Committed(101))
        );
        assert!(
            p(
                r#"{"stream":"S","seq":0,"duplicate": true,"batch":"b","count":5}"#,
                5
            )
            .is_err()
        );
        assert!(
            p(
                r#"{"stream":"S","seq":99,"duplicate": true,"batch":"b","count":1}"#,
                1
            )
            .is_err()
        );
        assert!(p(r#"{"type":"gap","last_seq":3,"seq":5}"#, 5).is_err());
        assert!(p("not json", 5).is_err());
    }
}
