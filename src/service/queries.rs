//! Read-only queries (`bcp.query.<project>.{job,jobs,snapshots,history}`),
//! answered from redb read transactions (MVCC snapshots: never blocked by,
//! never blocking, the writer). The subject's project scopes the answer as
//! subject permissions scope the reader: a job of another project is
//! `not_found`, a listing holds only the project's jobs. Project `_admin`
//! (operators) sees every project.

use crate::domain::ErrorCode;
use crate::domain::filter::JobFilter;
use crate::domain::history::{HistoryEntry, HistoryFold};
use crate::domain::limits::{
    PAYLOAD_BYTES_MAX, QUERY_HISTORY_BYTES_MAX, QUERY_HISTORY_MAX, QUERY_JOBS_BYTES_MAX,
    QUERY_JOBS_MAX,
};
use crate::domain::reply::ErrorBody;
use crate::domain::{Job, ProjectId, Snapshot};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Body of `bcp.query.job` and `bcp.query.snapshots`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    pub job_id: Uuid,
}

/// Body of `bcp.query.history`: a job, and where its page starts.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    pub job_id: Uuid,
    /// Only entries after this seq: the `next_after_seq` of the page before.
    #[serde(default)]
    pub after_seq: Option<u64>,
}

/// Reply of `bcp.query.job`.
#[derive(Serialize, schemars::JsonSchema)]
pub struct JobReply {
    pub ok: bool,
    /// The store has applied the log through this seq (a group-mode
    /// follower may trail the leader).
    pub as_of_seq: u64,
    pub job: Job,
}

/// Reply of `bcp.query.jobs`.
#[derive(Serialize, schemars::JsonSchema)]
pub struct JobsReply {
    pub ok: bool,
    /// The store has applied the log through this seq (a group-mode
    /// follower may trail the leader).
    pub as_of_seq: u64,
    /// Matching jobs in job-id order: one page.
    pub jobs: Vec<Job>,
    /// Present when more jobs may match: ask again with `after` set to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<Uuid>,
}

/// Reply of `bcp.query.snapshots`: the retained snapshots in time order.
#[derive(Serialize, schemars::JsonSchema)]
pub struct SnapshotsReply {
    pub ok: bool,
    /// The store has applied the log through this seq (a group-mode
    /// follower may trail the leader).
    pub as_of_seq: u64,
    pub job_id: Uuid,
    pub snapshots: Vec<Snapshot>,
}

/// Reply of `bcp.query.history`: transitions and rejections in seq order.
#[derive(Serialize, schemars::JsonSchema)]
pub struct HistoryReply {
    pub ok: bool,
    /// The store has applied the log through this seq (a group-mode
    /// follower may trail the leader).
    pub as_of_seq: u64,
    pub job_id: Uuid,
    /// One page: at most 500 entries and about 512 KiB of them (less on a
    /// NATS server whose `max_payload` is smaller).
    pub history: Vec<HistoryEntry>,
    /// Present when more entries follow: ask again with `after_seq` set to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after_seq: Option<u64>,
}

/// One page of a history being read in seq order: the entries after
/// `after_seq`, at most [`QUERY_HISTORY_MAX`] and about `bytes_max` of
/// JSON (always at least one), and the seq to ask after for the rest.
struct HistoryPage {
    after_seq: Option<u64>,
    bytes_max: usize,
    entries: Vec<HistoryEntry>,
    bytes: usize,
    next_after_seq: Option<u64>,
}

impl HistoryPage {
    fn new(after_seq: Option<u64>, bytes_max: usize) -> HistoryPage {
        HistoryPage {
            after_seq,
            bytes_max,
            entries: Vec::new(),
            bytes: 0,
            next_after_seq: None,
        }
    }

    /// Take the next entry; `false` once the page is full and another
    /// entry follows (nothing more is needed).
    fn offer(&mut self, entry: HistoryEntry) -> bool {
        if self.after_seq.is_some_and(|after| entry.seq <= after) {
            return true;
        }
        let size = serde_json::to_vec(&entry).map_or(0, |b| b.len() + 1);
        let fits = self.entries.len() < QUERY_HISTORY_MAX
            && (self.entries.is_empty() || self.bytes + size <= self.bytes_max);
        if !fits {
            self.next_after_seq = self.entries.last().map(|e| e.seq);
            return false;
        }
        self.bytes += size;
        self.entries.push(entry);
        true
    }
}

/// [`HistoryPage`] of `entries` (all of a job's, in seq order).
#[cfg(test)]
fn history_page(
    entries: Vec<HistoryEntry>,
    after_seq: Option<u64>,
    page_bytes: usize,
) -> (Vec<HistoryEntry>, Option<u64>) {
    let mut page = HistoryPage::new(after_seq, page_bytes);
    for entry in entries {
        if !page.offer(entry) {
            break;
        }
    }
    (page.entries, page.next_after_seq)
}

fn to_value(v: impl Serialize) -> Value {
    serde_json::to_value(v).expect("reply serializes")
}

/// A query's error reply: the error of a command's reply (without its
/// `duplicate`), and how far the answering store had applied the log
/// (absent when the query was refused before the store was read, or its
/// answer failed).
#[derive(Serialize, schemars::JsonSchema)]
pub struct QueryError {
    /// Always false.
    pub ok: bool,
    pub error: ErrorBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of_seq: Option<u64>,
}

impl QueryError {
    pub fn new(code: ErrorCode, message: impl Into<String>, as_of_seq: Option<u64>) -> QueryError {
        QueryError {
            ok: false,
            error: ErrorBody {
                code,
                message: message.into(),
                current_version: None,
            },
            as_of_seq,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("reply serializes")
    }
}

fn error(as_of_seq: u64, code: ErrorCode, message: impl Into<String>) -> Value {
    to_value(QueryError::new(code, message, Some(as_of_seq)))
}

/// Answer one query on `bcp.query.<project>.<kind>`; pure apart from
/// reading `store`. Pages of `jobs` and `history` hold up to bcp's limits.
pub fn answer(store: &Store, project: &str, kind: &str, body: &[u8]) -> Value {
    answer_within(store, project, kind, body, usize::MAX)
}

/// What a reply holds besides its page's entries (`ok`, `as_of_seq`, the
/// job id, the next cursor), with room to spare.
const REPLY_FRAME_BYTES: usize = 4096;

/// [`answer`] for a connection whose messages hold at most `max_payload`
/// bytes: the pages of `jobs` and `history` are kept below it too, so a
/// NATS server configured with a small `max_payload` still gets every page
/// (only a single entry larger than that cannot be sent).
pub fn answer_within(
    store: &Store,
    project: &str,
    kind: &str,
    body: &[u8],
    max_payload: usize,
) -> Value {
    let page_bytes = |limit: usize| {
        limit
            .min(max_payload.saturating_sub(REPLY_FRAME_BYTES))
            .max(1)
    };
    // Read before the rows: what follows is at least this state (the log's
    // own head may be a batch ahead of the rows readers see). Errors say it
    // too: a follower behind may not know a job yet.
    let as_of_seq = store.applied_seq();
    let project = match ProjectId::parse(project) {
        Ok(p) => p,
        Err(e) => {
            return error(
                as_of_seq,
                ErrorCode::BadRequest,
                format!("subject project: {e}"),
            );
        }
    };
    if body.len() > PAYLOAD_BYTES_MAX {
        return error(
            as_of_seq,
            ErrorCode::BadRequest,
            format!("body is larger than {PAYLOAD_BYTES_MAX} bytes"),
        );
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let result = match kind {
        "job" => parse::<JobQuery>(body).map(|q| match store.job(q.job_id) {
            Ok(Some(job)) if !visible(&project, &job) => not_found(as_of_seq, q.job_id),
            Ok(Some(job)) => to_value(JobReply {
                ok: true,
                as_of_seq,
                job,
            }),
            Ok(None) => not_found(as_of_seq, q.job_id),
            Err(e) => error(as_of_seq, ErrorCode::Unavailable, e.to_string()),
        }),
        "jobs" => parse::<JobFilter>(body).and_then(|mut f| {
            f.validate()?;
            if !project.is_admin() {
                if f.project_id.as_ref().is_some_and(|p| *p != project) {
                    return Err(format!(
                        "project_id must be the subject's project ({project}) or absent; bcp.query._admin.jobs lists every project's jobs"
                    ));
                }
                f.project_id = Some(project.clone());
            }
            Ok(match store.jobs_page(&f, QUERY_JOBS_MAX, page_bytes(QUERY_JOBS_BYTES_MAX)) {
                Ok((jobs, next_after)) => to_value(JobsReply {
                    ok: true,
                    as_of_seq,
                    jobs,
                    next_after,
                }),
                Err(e) => error(as_of_seq, ErrorCode::Unavailable, e.to_string()),
            })
        }),
        "snapshots" => {
            parse::<JobQuery>(body).map(|q| match (store.job(q.job_id), store.catalog(q.job_id)) {
                (Ok(None), _) => not_found(as_of_seq, q.job_id),
                (Ok(Some(job)), _) if !visible(&project, &job) => not_found(as_of_seq, q.job_id),
                (Ok(Some(_)), Ok(catalog)) => {
                    let snapshots = catalog.map(|c| c.snapshots).unwrap_or_default();
                    to_value(SnapshotsReply {
                        ok: true,
                        as_of_seq,
                        job_id: q.job_id,
                        snapshots,
                    })
                }
                (Err(e), _) | (_, Err(e)) => error(as_of_seq, ErrorCode::Unavailable, e.to_string()),
            })
        }
        "history" => parse::<HistoryQuery>(body).map(|q| {
            // A command of another project that named this job id was
            // refused and recorded under the id (the events say whose it
            // was); only `_admin` sees those. A project sees its own job's
            // history, or, for an id that was never a job, its own refused
            // attempts.
            if !project.is_admin() {
                match store.job(q.job_id) {
                    Ok(Some(job)) if job.project_id != project => return not_found(as_of_seq, q.job_id),
                    Ok(_) => {}
                    Err(e) => return error(as_of_seq, ErrorCode::Unavailable, e.to_string()),
                }
            }
            // Read and folded in seq order, up to the page's end: only the
            // fold and the page are held, never the whole history.
            let mut fold = HistoryFold::default();
            let mut page = HistoryPage::new(q.after_seq, page_bytes(QUERY_HISTORY_BYTES_MAX));
            let mut any = false;
            let read = store.for_each_job_event(q.job_id, |env| {
                if !project.is_admin() && env.project_id != project {
                    return Ok(true);
                }
                any = true;
                Ok(page.offer(store.history_entry(&mut fold, &env)?))
            });
            match read {
                Err(e) => error(as_of_seq, ErrorCode::Unavailable, e.to_string()),
                Ok(()) if !any => not_found(as_of_seq, q.job_id),
                Ok(()) => to_value(HistoryReply {
                    ok: true,
                    as_of_seq,
                    job_id: q.job_id,
                    history: page.entries,
                    next_after_seq: page.next_after_seq,
                }),
            }
        }),
        other => Err(format!(
            "unknown query {other:?}; queries: job, jobs, snapshots, history"
        )),
    };
    result.unwrap_or_else(|e| error(as_of_seq, ErrorCode::BadRequest, e))
}

/// Whether a reader scoped to `project` may see `job`.
fn visible(project: &ProjectId, job: &Job) -> bool {
    project.is_admin() || job.project_id == *project
}

/// The same answer for a job that does not exist and one of another
/// project: a reader learns nothing of other projects.
fn not_found(as_of_seq: u64, job_id: Uuid) -> Value {
    error(as_of_seq, ErrorCode::NotFound, format!("no job {job_id}"))
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    use crate::domain::command::{array_in, is_array};
    let parsed = serde_json::from_slice(body);
    // As for commands: fields by name only, never by position.
    match array_in(body).filter(|_| parsed.is_ok() || is_array(body)) {
        Some(at) => Err(format!("invalid query body: {at}")),
        None => parsed.map_err(|e| format!("invalid query body: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, reason_bytes: usize) -> HistoryEntry {
        HistoryEntry {
            seq,
            recorded_at: chrono::DateTime::UNIX_EPOCH,
            actor: None,
            actor_verified: false,
            command_id: Uuid::nil(),
            event_type: "CommandRejected".into(),
            version: None,
            from: None,
            to: None,
            verb: "start".into(),
            rejected: true,
            code: Some("invalid_transition".into()),
            reason: Some("r".repeat(reason_bytes)),
        }
    }

    /// Pages end at 500 entries or about 512 KiB, never hold nothing while
    /// entries are left, and together hold every entry once, in order.
    #[test]
    fn history_pages_hold_every_entry_once_within_their_bounds() {
        for (count, reason_bytes) in [(1_200, 10), (40, 100_000), (3, 600_000), (0, 0)] {
            let all: Vec<HistoryEntry> = (1..=count).map(|s| entry(s * 2, reason_bytes)).collect();
            let (mut got, mut after) = (Vec::new(), None);
            loop {
                let (page, next) = history_page(all.clone(), after, QUERY_HISTORY_BYTES_MAX);
                let bytes: usize = page
                    .iter()
                    .map(|e| serde_json::to_vec(e).unwrap().len())
                    .sum();
                assert!(page.len() <= QUERY_HISTORY_MAX);
                assert!(
                    page.len() == 1 || bytes <= QUERY_HISTORY_BYTES_MAX,
                    "{bytes}"
                );
                assert!(!page.is_empty() || got.len() == all.len());
                got.extend(page.iter().map(|e| e.seq));
                match next {
                    Some(n) => {
                        assert_eq!(Some(&n), got.last());
                        after = Some(n);
                    }
                    None => break,
                }
            }
            let want: Vec<u64> = all.iter().map(|e| e.seq).collect();
            assert_eq!(got, want, "{count} entries of {reason_bytes} bytes");
        }
    }
}
