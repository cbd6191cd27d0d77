//! Every bound bcp keeps, in one place (TigerBeetle style: a limit on
//! everything). Documented in README "Limits".

/// Largest command or query body accepted, in bytes. Larger is `bad_request`.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// The times a command may carry (`taken_at`, `expires_at`, `now`): from
/// the Unix epoch up to, not including, the year 9000, so that an expiry
/// derived from them (retention is counted in days, weeks and months, at
/// most a few years) is still a four-digit-year RFC 3339 time.
pub const TIME_MIN: &str = "1970-01-01T00:00:00Z";
pub const TIME_MAX: &str = "9000-01-01T00:00:00Z";
/// Snapshots a job's catalog holds at most: a `record-snapshot` beyond is
/// `invalid_transition`. Retention alone keeps under 500 (every class at
/// its longest); the rest is room for `do_not_delete` ones. Bounded so that
/// the job's terminate, whose `SnapshotsPurged` lists them all, is one
/// event NATS can carry (156 KB at this many; NATS's default
/// `max_payload` is 1 MiB), and its `snapshots` reply one message (904 KB
/// with every snapshot at its largest).
pub const CATALOG_SNAPSHOTS_MAX: usize = 4_000;
/// Longest `actor` string accepted, in bytes.
pub const ACTOR_BYTES_MAX: usize = 256;
/// Commands waiting for the writer. When full, producers get `unavailable`.
pub const INTAKE_QUEUE_MAX: usize = 8192;
/// Commands decided and committed together in one write transaction.
pub const BATCH_COMMANDS_MAX: usize = 512;
/// Idempotency records of ids that do not land where the last ones did
/// (neither above every id stored nor a UUIDv7 above every UUIDv7 stored)
/// waiting before a sweep merges them into place, in id order
/// (`store::records`); held in memory meanwhile, so at most about twice
/// this many (about 8 MB).
pub const RECORDS_WAITING_MAX: usize = 32_768;
/// Events the relay publishes to JetStream before awaiting the oldest ack.
pub const RELAY_WINDOW_MAX: usize = 256;
/// How long bcp waits for JetStream to acknowledge a publish (or answer an
/// API request) before it reconciles with the stream and resumes from its
/// last sequence.
pub const RELAY_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The duplicate window of the stream bcp creates: 10 s, not JetStream's
/// default of 2 minutes. nats-server keeps every message id of the window
/// in memory and garbage-collects them: right after a relay catch-up of
/// 880 k events (the growth step of the benchmark), the default window
/// took its CPU per command at 1 M events from about 20 to 39-46 µs in 4
/// of 6 runs. bcp's idempotency is its own and permanent, so the window
/// serves only the relay: a publish whose ack timed out
/// ([`RELAY_ACK_TIMEOUT`]) may still be stored after the reconciliation
/// that follows read the stream's last sequence, and its re-sent copy must
/// then get a duplicate ack rather than a wrong-last-sequence refusal (in a
/// group, that refusal makes the leader step down). The window covers the
/// timeout and the reconciliation's API request several times over.
pub const STREAM_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
const _: () = assert!(STREAM_DUPLICATE_WINDOW.as_secs() >= 4 * RELAY_ACK_TIMEOUT.as_secs());
/// Stored events per answer the relay asks of nats-server in a fast batch
/// (`service::batch`; nats-server may answer more often, never less). At
/// most [`RELAY_WINDOW_MAX`] events go unanswered, so the window holds
/// several answers' worth.
pub const RELAY_BATCH_FLOW: u16 = 64;
const _: () = assert!(RELAY_WINDOW_MAX >= 2 * RELAY_BATCH_FLOW as usize);
/// Events the relay reads from redb per read transaction.
pub const RELAY_CHUNK_MAX: usize = 1024;
/// Events a group leader publishes in one JetStream atomic batch (whole
/// commands): nats-server's default batch size (`jetstream.limits.batch`;
/// the relay halves its own limits when the server refuses that many).
/// Only a longer command (an `expire-snapshots` of many, a
/// `configure-region` moving that many jobs) goes in several.
pub const RELAY_ATOMIC_BATCH_MAX: usize = 1000;
/// Committed events held in memory for the relay (about 0.6 KB each):
/// beyond it, the oldest are dropped and the relay reads them from redb.
pub const RELAY_OUTBOX_MAX: usize = 4 * RELAY_CHUNK_MAX;
/// Queries answered at once (each on a blocking thread, its reply up to
/// [`QUERY_JOBS_BYTES_MAX`]); beyond it a query is answered `unavailable`
/// at once. `bcp serve --queries-in-flight` sets it.
pub const QUERIES_IN_FLIGHT_DEFAULT: usize = 32;
/// Jobs returned by one `bcp.query.jobs` reply.
pub const QUERY_JOBS_MAX: usize = 500;
/// Bytes of job views in one `bcp.query.jobs` reply, well under NATS's
/// default 1 MiB max payload; a reply that would hold more is a page with
/// `next_after`.
pub const QUERY_JOBS_BYTES_MAX: usize = 512 * 1024;
/// History entries returned by one `bcp.query.history` reply.
pub const QUERY_HISTORY_MAX: usize = 500;
/// Bytes of history entries in one `bcp.query.history` reply (as
/// [`QUERY_JOBS_BYTES_MAX`]); a reply that would hold more is a page with
/// `next_after_seq`. A job's history grows without bound (a few snapshot
/// events a day), so it is paged, never one reply over the max payload.
pub const QUERY_HISTORY_BYTES_MAX: usize = 512 * 1024;
/// `SnapshotExpired` events one `expire-snapshots` command (or one sweep)
/// appends; what is left is due at the next sweep.
pub const EXPIRE_EVENTS_MAX: usize = 10_000;
/// Default interval of the retention sweeper inside `bcp serve`.
pub const SWEEP_INTERVAL_SECS_DEFAULT: u64 = 60;
