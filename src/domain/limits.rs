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
/// Longest `actor` string accepted, in bytes.
pub const ACTOR_BYTES_MAX: usize = 256;
/// Commands waiting for the writer. When full, producers get `unavailable`.
pub const INTAKE_QUEUE_MAX: usize = 8192;
/// Commands decided and committed together in one write transaction.
pub const BATCH_COMMANDS_MAX: usize = 512;
/// Events the relay publishes to JetStream before awaiting the oldest ack.
pub const RELAY_WINDOW_MAX: usize = 256;
/// How long bcp waits for JetStream to acknowledge a publish (or answer an
/// API request) before it reconciles with the stream and resumes from its
/// last sequence.
pub const RELAY_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The duplicate window of the stream bcp creates. bcp does not rely on
/// JetStream's de-duplication: every publish carries the expected last
/// sequence, and the relay re-sends nothing without first checking the
/// stream. nats-server keeps every message id of the window in memory
/// (JetStream's default of 2 minutes is some 3 M ids at 25 k events/s),
/// and garbage-collects them: after a catch-up of 880 k events, that took
/// its CPU per command from 20 to 44 µs for two minutes.
pub const STREAM_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);
/// Events the relay reads from redb per read transaction.
pub const RELAY_CHUNK_MAX: usize = 1024;
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
/// `SnapshotExpired` events one `expire-snapshots` command (or one sweep)
/// appends; what is left is due at the next sweep.
pub const EXPIRE_EVENTS_MAX: usize = 10_000;
/// Default interval of the retention sweeper inside `bcp serve`.
pub const SWEEP_INTERVAL_SECS_DEFAULT: u64 = 60;
