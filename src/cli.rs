//! The `bcp` command line: argument definitions (clap) and each
//! subcommand's work. `anyhow` lives here and in `main`, not in the library.

/// `print!` to stdout, returning its error instead of panicking: a reader
/// that left (`bcp jobs | head`) ends the command quietly in main.
macro_rules! out {
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout(), format_args!($($arg)*))?
    };
}

/// `println!` to stdout, as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        out!($($arg)*);
        out!("\n");
    }};
}

mod audit;

use anyhow::{Context, Result, bail};
use bcp::domain::history::HistoryEntry;
use bcp::domain::{Job, JobState, Reply, Verb};
use bcp::store::{CACHE_BYTES, Store};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// Exit codes of DESIGN.md §4.
pub const EXIT_OK: u8 = 0;
pub const EXIT_REJECTED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNAVAILABLE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "bcp",
    version,
    about = "Event-sourced control plane for backup jobs"
)]
pub struct Cli {
    /// Log format of diagnostics on stderr (filter with RUST_LOG).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "BCP_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Cmd,
}

/// NATS credentials, for every command that talks to NATS.
#[derive(Args, Clone, Default)]
pub struct AuthArgs {
    /// NATS user name (with --nats-password).
    #[arg(long, env = "BCP_NATS_USER", help_heading = "NATS auth")]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user); better from the environment.
    #[arg(
        long,
        env = "BCP_NATS_PASSWORD",
        hide_env_values = true,
        help_heading = "NATS auth"
    )]
    pub nats_password: Option<String>,
    /// NATS token; better from the environment.
    #[arg(
        long,
        env = "BCP_NATS_TOKEN",
        hide_env_values = true,
        help_heading = "NATS auth"
    )]
    pub nats_token: Option<String>,
    /// An nkey seed (SU...).
    #[arg(
        long,
        env = "BCP_NATS_NKEY",
        hide_env_values = true,
        help_heading = "NATS auth"
    )]
    pub nats_nkey: Option<String>,
    /// A .creds file (JWT + nkey seed).
    #[arg(long, env = "BCP_NATS_CREDS", help_heading = "NATS auth")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server; implies TLS.
    #[arg(long, env = "BCP_TLS_CA", help_heading = "NATS auth")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --tls-key; implies TLS.
    #[arg(
        long,
        env = "BCP_TLS_CERT",
        requires = "tls_key",
        help_heading = "NATS auth"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM), with --tls-cert.
    #[arg(
        long,
        env = "BCP_TLS_KEY",
        requires = "tls_cert",
        help_heading = "NATS auth"
    )]
    pub tls_key: Option<PathBuf>,
    /// Require TLS even without a CA or client certificate.
    #[arg(long, env = "BCP_TLS", help_heading = "NATS auth")]
    pub tls: bool,
    /// Inbox prefix for replies (default _INBOX), when NATS allows this user only its own.
    #[arg(long, env = "BCP_INBOX_PREFIX", help_heading = "NATS auth")]
    pub inbox_prefix: Option<String>,
}

impl AuthArgs {
    pub fn auth(&self) -> bcp::service::connect::NatsAuth {
        bcp::service::connect::NatsAuth {
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            nkey_seed: self.nats_nkey.clone(),
            creds_file: self.nats_creds.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_required: self.tls,
            inbox_prefix: self.inbox_prefix.clone(),
        }
    }
}

/// The credentials given on the command line, for [`connect`].
static AUTH: std::sync::OnceLock<bcp::service::connect::NatsAuth> = std::sync::OnceLock::new();

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the control plane (graceful drain on SIGINT/SIGTERM).
    #[command(after_help = "Example:\n  bcp serve --db data/bcp.redb --nats nats://127.0.0.1:4222")]
    Serve {
        /// The store (one redb file; created when missing).
        #[arg(long, env = "BCP_DB", default_value = "data/bcp.redb")]
        db: PathBuf,
        /// The NATS server(s), comma-separated for a cluster.
        #[arg(long, env = "BCP_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// JetStream stream the events are published to.
        #[arg(long, env = "BCP_STREAM", default_value = bcp::service::STREAM)]
        stream: String,
        /// Record the identity in the Nats-Request-Info header as the verified actor
        /// (only when producers reach bcp through a service import with share: true;
        /// see examples/nats-server.conf).
        #[arg(long, env = "BCP_TRUST_REQUEST_INFO")]
        trust_request_info: bool,
        /// Seconds between retention sweeps (expiring due snapshots).
        #[arg(long, env = "BCP_SWEEP_INTERVAL", default_value_t = bcp::domain::limits::SWEEP_INTERVAL_SECS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
        sweep_interval: u64,
        /// Idempotency records waiting before a sweep merges them into place (tests set
        /// it small, to sweep often).
        #[arg(long, hide = true, env = "BCP_RECORDS_BUFFER", default_value_t = bcp::store::records::BUFFER, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        records_buffer: usize,
        /// Queries answered at once (of one project's subjects at most a quarter); beyond it a query is answered `unavailable` at once.
        #[arg(long, env = "BCP_QUERIES_IN_FLIGHT", default_value_t = bcp::domain::limits::QUERIES_IN_FLIGHT_DEFAULT as u64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        queries_in_flight: u64,
        /// Replicas of the stream and of the writer-lease bucket when bcp creates them
        /// (3 on a 3-node JetStream cluster).
        #[arg(long, env = "BCP_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
        stream_replicas: u64,
        /// Seconds between checks that the stream is still this log, with the settings it needs.
        #[arg(long, env = "BCP_STREAM_CHECK_INTERVAL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        stream_check_interval: u64,
        /// Seconds the writer lease lives without renewal: how long another process waits
        /// for this one after it died (default 10; 3 in a group, the failover's wait).
        #[arg(long, env = "BCP_LEASE_TTL", value_parser = clap::value_parser!(u64).range(2..))]
        lease_ttl: Option<u64>,
        /// Run as one node of the group NAME (with --node): the nodes, each on its own
        /// --db, form one logical bcp; one leader at a time takes commands.
        #[arg(long, env = "BCP_GROUP", requires = "node")]
        group: Option<String>,
        /// This node's name in the group (unique, kept across restarts).
        #[arg(long, env = "BCP_NODE", requires = "group")]
        node: Option<String>,
        /// Serve /healthz, /readyz and /metrics (Prometheus text) on this address,
        /// e.g. 127.0.0.1:9090.
        #[arg(long, env = "BCP_HTTP")]
        http: Option<std::net::SocketAddr>,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Send one command and print the reply. Exit 0 accepted, 1 rejected, 2 usage, 3 unavailable.
    #[command(
        after_help = "Examples:\n  bcp send create --project p1 --kind replica_set --name rs0\n  bcp send start --project p1 --job 0192f0c4-...\n  bcp send configure-region --project _admin --region eu --body '{\"snapshot_store\":\"s3\"}'"
    )]
    Send(Box<SendArgs>),
    /// List jobs (through NATS, or from a stopped store with --db).
    #[command(
        after_help = "Examples:\n  bcp jobs\n  bcp jobs --project p1 --state Active\n  bcp jobs --region eu --format json\n  bcp jobs --cluster c1 --db data/bcp.redb"
    )]
    Jobs {
        #[command(flatten)]
        source: Source,
        /// Only this project's jobs.
        #[arg(long, value_parser = project_arg)]
        project: Option<String>,
        /// Only jobs in this state.
        #[arg(long, ignore_case = true, value_parser = ["Inactive", "Active", "Stopped", "Misconfigured"])]
        state: Option<String>,
        /// Only jobs in this region.
        #[arg(long)]
        region: Option<String>,
        /// Only jobs of this cluster (its shards and config server).
        #[arg(long)]
        cluster: Option<String>,
        /// Output: a table for people, or JSON for programs.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// A job's snapshot catalog, in time order (through NATS, or --db on a stopped store).
    #[command(
        after_help = "Example:\n  bcp snapshots 0192f0c4-0000-7000-8000-0000000000aa --project p1"
    )]
    Snapshots {
        /// The job's id (a UUID).
        job: Uuid,
        /// The job's project: reads are scoped by project (bcp.query.<project>.snapshots);
        /// _admin (the default) reads every project, where NATS permits it.
        #[arg(long, env = "BCP_PROJECT", default_value = "_admin", value_parser = project_arg)]
        project: String,
        #[command(flatten)]
        source: Source,
        /// Output: a table for people, or JSON for programs.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// One job's view (through NATS, or --db on a stopped store).
    #[command(after_help = "Example:\n  bcp job 0192f0c4-0000-7000-8000-0000000000aa --project p1")]
    Job(JobArgs),
    /// A job's history: every transition and rejection, in seq order (through
    /// NATS, or --db on a stopped store).
    #[command(
        after_help = "Example:\n  bcp history 0192f0c4-0000-7000-8000-0000000000aa --project p1"
    )]
    History(JobArgs),
    /// Follow the published events, one line per event, until Ctrl-C.
    #[command(
        after_help = "Examples:\n  bcp watch\n  bcp watch --project p1\n  bcp watch --project p1 --job 0192f0c4-0000-7000-8000-0000000000aa"
    )]
    Watch {
        /// The NATS server(s), comma-separated for a cluster.
        #[arg(long, env = "BCP_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// Only this project's events (default: every project).
        #[arg(long, value_parser = project_arg)]
        project: Option<String>,
        /// Only this job's events.
        #[arg(long)]
        job: Option<Uuid>,
        /// One JSON envelope per line instead of a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Every running bcp process: role, head, published seq, and any alarm.
    /// Exit 0 each stream has one process taking commands and no alarm is
    /// raised, 1 otherwise (an alarm, a group with no leader), 3 none answered.
    #[command(after_help = "Example:\n  bcp status --nats nats://127.0.0.1:4222")]
    Status {
        /// The NATS server(s), comma-separated for a cluster.
        #[arg(long, env = "BCP_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// Milliseconds to collect replies (one per process).
        #[arg(long, default_value_t = 1000)]
        wait: u64,
        /// Output: a table for people, or JSON for programs.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Rebuild job states and snapshot catalogs as of a seq or a time.
    Replay(audit::ReplayArgs),
    /// Audit the log: a job's history, verify the chain, print a digest.
    #[command(
        subcommand,
        after_help = "Examples:\n  bcp audit history --db data/bcp.redb --job 0192f0c4-...\n  bcp audit verify --db data/bcp.redb\n  bcp audit digest --db data/bcp.redb > anchor.txt\n  bcp audit verify --db data/bcp.redb --digest \"$(cat anchor.txt)\""
    )]
    Audit(audit::AuditCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  bcp completions bash > /etc/bash_completion.d/bcp\n  bcp completions zsh > \"${fpath[1]}/_bcp\""
    )]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from the same definitions as --help.
    #[command(after_help = "Example:\n  bcp man > bcp.1 && man ./bcp.1")]
    Man,
    /// Write the log as JSON Lines (one envelope per line, seq order).
    Export(audit::ExportArgs),
    /// Build a new store from JSON Lines or the stream, verifying as it goes.
    Import(audit::ImportArgs),
    /// Write the JSON Schemas of the contract (commands, replies, queries, views, events).
    #[command(after_help = "Example:\n  bcp schemas --out schemas")]
    Schemas {
        /// The directory to write them to.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
}

/// One job, where to read it, and how to print it (`bcp job`, `bcp history`).
#[derive(Args)]
pub struct JobArgs {
    /// The job's id (a UUID).
    job: Uuid,
    #[command(flatten)]
    scope: Scope,
    /// Output: a table for people, or JSON for programs.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

/// Where a job query reads, and as which project.
#[derive(Args)]
pub struct Scope {
    /// The job's project: reads are scoped by project (bcp.query.<project>.<kind>);
    /// _admin (the default) reads every project, where NATS permits it.
    #[arg(long, env = "BCP_PROJECT", default_value = "_admin", value_parser = project_arg)]
    project: String,
    #[command(flatten)]
    source: Source,
}

impl Scope {
    /// One query about `job`: its reply, or exit 1 with the error's message.
    fn ask(&self, kind: &str, job: Uuid) -> Result<std::result::Result<Value, String>> {
        self.ask_with(kind, json!({ "job_id": job }))
    }

    /// [`Scope::ask`] with a body of its own (a page after the first).
    fn ask_with(&self, kind: &str, body: Value) -> Result<std::result::Result<Value, String>> {
        let v = match &self.source.db {
            Some(db) => bcp::service::queries::answer(
                &Store::open_read_only(db, CACHE_BYTES)?,
                &self.project,
                kind,
                &serde_json::to_vec(&body)?,
            ),
            None => request(
                &self.source.nats,
                &format!("bcp.query.{}.{kind}", self.project),
                &body,
                5,
            )?,
        };
        Ok(match v["ok"] == json!(true) {
            true => Ok(v),
            false => Err(v["error"]["message"]
                .as_str()
                .unwrap_or("query failed")
                .to_owned()),
        })
    }
}

/// After a tool's panic message, what to do about it. The `--db` tools
/// trust the pages redb reads (as `bcp serve` does), and redb may panic on
/// a damaged one; `audit verify` checks every page first.
fn hint_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!(
            "bcp: this is a bug, or a store read with --db is damaged: check a store with `bcp audit verify --db PATH`"
        );
    }));
}

/// A `--project` value: a project id (or `_admin`), else a usage error
/// (exit 2) before anything is sent or read.
pub fn project_arg(s: &str) -> std::result::Result<String, String> {
    bcp::domain::ProjectId::parse(s).map(|_| s.to_owned())
}

#[derive(Args)]
pub struct Source {
    /// Read through a running server.
    #[arg(long, env = "BCP_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Read a stopped store directly instead.
    #[arg(long)]
    db: Option<PathBuf>,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Args)]
pub struct SendArgs {
    /// create, start, stop, terminate, assign-region, change-schedule, configure-region, ...
    verb: String,
    #[command(flatten)]
    auth: AuthArgs,
    /// The job's project: the command goes to bcp.cmd.<project>.<verb>.
    #[arg(long, env = "BCP_PROJECT", value_parser = project_arg)]
    project: String,
    /// The job (create: when omitted, the new job's id is the command's id,
    /// so a retry with the same --command-id creates the same job).
    #[arg(long)]
    job: Option<Uuid>,
    /// Generated when omitted and printed on stderr: reuse it to retry safely.
    #[arg(long)]
    command_id: Option<Uuid>,
    /// Refuse with version_conflict unless the job is at exactly this version.
    #[arg(long)]
    expected_version: Option<u64>,
    /// Who sends it (recorded in the log; unverified unless NATS vouches for it).
    #[arg(long, env = "BCP_ACTOR")]
    actor: Option<String>,
    /// create: replica_set, shard or config_server.
    #[arg(long)]
    kind: Option<String>,
    /// create: deployment name.
    #[arg(long)]
    name: Option<String>,
    /// create: cluster of a shard or config_server.
    #[arg(long)]
    cluster: Option<String>,
    /// create, assign-region, configure-region: region name.
    #[arg(long)]
    region: Option<String>,
    /// assign-region: remove the job's region.
    #[arg(long, conflicts_with = "region")]
    no_region: bool,
    /// create, change-schedule: schedule settings as JSON, e.g. '{"snapshot_interval_hours":6}'.
    #[arg(long)]
    schedule: Option<String>,
    /// record-snapshot, delete-snapshot, set-snapshot-expiry: the snapshot.
    #[arg(long)]
    snapshot_id: Option<Uuid>,
    /// record-snapshot: when the agent took it (RFC 3339).
    #[arg(long)]
    taken_at: Option<String>,
    /// record-snapshot: its size.
    #[arg(long)]
    size_bytes: Option<u64>,
    /// set-snapshot-expiry: the new expiry (RFC 3339).
    #[arg(long)]
    expires_at: Option<String>,
    /// set-snapshot-expiry: keep the snapshot until told otherwise.
    #[arg(long)]
    do_not_delete: bool,
    /// expire-snapshots: the time to expire as of (RFC 3339).
    #[arg(long)]
    now: Option<String>,
    /// Extra body fields as a JSON object, merged last (not command_id or
    /// job_id: those come from --command-id and --job alone).
    #[arg(long)]
    body: Option<String>,
    /// The NATS server(s), comma-separated for a cluster.
    #[arg(long, env = "BCP_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Seconds to wait for the reply (at least 1).
    #[arg(long, default_value = "5", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

/// A usage error (exit 2) found after clap parsed the arguments.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Could not reach bcp (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

pub fn run(cli: Cli) -> Result<u8> {
    if let Some(auth) = auth_of(&cli.command) {
        let _ = AUTH.set(auth.auth());
    }
    if !matches!(cli.command, Cmd::Serve { .. }) {
        hint_on_panic();
    }
    match cli.command {
        Cmd::Serve {
            db,
            nats,
            stream,
            trust_request_info,
            sweep_interval,
            queries_in_flight,
            records_buffer,
            stream_replicas,
            stream_check_interval,
            lease_ttl,
            group,
            node,
            http,
            auth: _,
        } => serve(bcp::service::ServeConfig {
            db,
            nats_url: nats,
            stream,
            drain_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(sweep_interval),
            auth: AUTH.get().cloned().unwrap_or_default(),
            trust_request_info,
            queries_in_flight: queries_in_flight as usize,
            stream_replicas: stream_replicas as usize,
            stream_check_interval: Duration::from_secs(stream_check_interval),
            lease_ttl: match (lease_ttl, &group) {
                (Some(secs), _) => Duration::from_secs(secs),
                (None, None) => bcp::service::lease::TTL_DEFAULT,
                (None, Some(_)) => bcp::service::lease::GROUP_TTL_DEFAULT,
            },
            group,
            node,
            http,
            records_buffer,
        }),
        Cmd::Status {
            nats, wait, format, ..
        } => status(&nats, Duration::from_millis(wait), format),
        Cmd::Job(JobArgs { job, scope, format }) => {
            let v = match scope.ask("job", job)? {
                Ok(v) => v,
                Err(message) => return rejected(&message),
            };
            let job: Job = serde_json::from_value(v["job"].clone())?;
            match format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&job)?),
                Format::Table => out!("{}", jobs_table(std::slice::from_ref(&job))),
            }
            Ok(EXIT_OK)
        }
        Cmd::History(JobArgs { job, scope, format }) => {
            // Every page: the reply says where the next one starts. In a
            // group, pages may come from different nodes; one that has
            // applied less of the log than the page before's (a follower
            // trailing the leader) may not hold the rest yet: ask again.
            let mut entries: Vec<HistoryEntry> = Vec::new();
            let mut body = json!({ "job_id": job });
            let (mut as_of, mut behind) = (0, 0);
            loop {
                let v = match scope.ask_with("history", body.clone())? {
                    Ok(v) => v,
                    Err(message) => return rejected(&message),
                };
                let at = v["as_of_seq"].as_u64().unwrap_or(0);
                if at < as_of {
                    behind += 1;
                    if behind > 50 {
                        bail!("the servers answering stay behind seq {as_of}; ask again later");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                as_of = at;
                entries.extend(serde_json::from_value::<Vec<HistoryEntry>>(
                    v["history"].clone(),
                )?);
                match v["next_after_seq"].as_u64() {
                    Some(after)
                        if body["after_seq"]
                            .as_u64()
                            .is_none_or(|before| after > before) =>
                    {
                        body["after_seq"] = json!(after)
                    }
                    Some(after) => bail!("the history's pages do not advance (after seq {after})"),
                    None => break,
                }
            }
            match format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&entries)?),
                Format::Table => out!("{}", history_table(&entries)),
            }
            Ok(EXIT_OK)
        }
        Cmd::Watch {
            nats,
            project,
            job,
            json,
            auth: _,
        } => watch(&nats, project.as_deref(), job, json),
        Cmd::Snapshots {
            job,
            project,
            source,
            format,
        } => {
            let scope = Scope { project, source };
            let v = match scope.ask("snapshots", job)? {
                Ok(v) => v,
                Err(message) => return rejected(&message),
            };
            let snapshots: Vec<bcp::domain::Snapshot> =
                serde_json::from_value(v["snapshots"].clone())?;
            match format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&snapshots)?),
                Format::Table => out!("{}", snapshots_table(&snapshots)),
            }
            Ok(EXIT_OK)
        }
        Cmd::Send(args) => send(*args),
        Cmd::Jobs {
            source,
            project,
            state,
            region,
            cluster,
            format,
        } => {
            let mut filter = Map::new();
            let mut put = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    filter.insert(k.into(), Value::String(v));
                }
            };
            // Reads are scoped by the subject's project; _admin lists every project.
            let scope = project.clone().unwrap_or_else(|| "_admin".to_owned());
            // `_admin` is the scope of every project, not a project of jobs.
            put("project_id", project.filter(|p| p != "_admin"));
            put(
                "state",
                state.map(|s| JobState::parse(&s).map_or(s, |st| st.as_str().to_owned())),
            );
            put("region", region);
            put("cluster", cluster);
            // Every page: a reply holds at most a page and names where to go on.
            let store = source
                .db
                .as_ref()
                .map(|db| Store::open_read_only(db, CACHE_BYTES))
                .transpose()?;
            let mut jobs: Vec<Job> = Vec::new();
            loop {
                let body = Value::Object(filter.clone());
                let v = match &store {
                    Some(store) => bcp::service::queries::answer(
                        store,
                        &scope,
                        "jobs",
                        &serde_json::to_vec(&body)?,
                    ),
                    None => request(&source.nats, &format!("bcp.query.{scope}.jobs"), &body, 5)?,
                };
                let next = v["next_after"].clone();
                let listed = jobs.len();
                jobs.extend(jobs_from(v)?);
                if next.is_null() {
                    break;
                }
                if jobs.len() == listed {
                    bail!("the jobs' pages do not advance (after {next})");
                }
                filter.insert("after".into(), next);
            }
            match format {
                Format::Json => outln!("{}", serde_json::to_string_pretty(&jobs)?),
                Format::Table => out!("{}", jobs_table(&jobs)),
            }
            Ok(EXIT_OK)
        }
        Cmd::Replay(a) => audit::replay(a),
        Cmd::Audit(cmd) => audit::audit(cmd),
        Cmd::Export(a) => audit::export(a),
        Cmd::Import(a) => audit::import(a),
        Cmd::Completions { shell } => {
            // Into memory first: clap_complete panics on a failed write (a
            // closed pipe, `| head`); a write error here is an error (and a
            // closed pipe, as for every command, a quiet exit).
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "bcp", &mut script);
            std::io::stdout().write_all(&script)?;
            Ok(EXIT_OK)
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(EXIT_OK)
        }
        Cmd::Schemas { out } => {
            for (path, text) in bcp::schema::render() {
                let p = out.join(path);
                std::fs::create_dir_all(p.parent().expect("schema paths have a parent"))?;
                std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
            }
            outln!("schemas written to {}", out.display());
            Ok(EXIT_OK)
        }
    }
}

fn serve(config: bcp::service::ServeConfig) -> Result<u8> {
    if let Some(dir) = config.db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let rt = serve_runtime()?;
    rt.block_on(async {
        let stop = bcp::service::shutdown::on_signal();
        // On the runtime's workers, not on this thread: the intake then
        // runs where NATS delivers the requests, rather than waking this
        // thread for them.
        tokio::spawn(bcp::service::serve(config, stop))
            .await
            .context("bcp serve panicked")
    })??;
    Ok(EXIT_OK)
}

/// The runtime of `bcp serve`: one worker per core beyond the two that
/// its own threads keep busy under load (the writer and the commit
/// thread), at least one. Its work on the runtime is a few long-lived
/// tasks (the intake, the replies, the relay, the NATS connection); a
/// worker more than the cores left for them only adds wake-ups across
/// threads. On two cores, one worker took about a tenth less CPU per
/// command than two (`bench/RESULTS.md`). Tokio's own
/// `TOKIO_WORKER_THREADS`, when set, decides instead.
fn serve_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        builder.worker_threads(serve_workers(cores));
    }
    builder.build()
}

/// Runtime workers for `bcp serve` on `cores` cores ([`serve_runtime`]).
fn serve_workers(cores: usize) -> usize {
    cores.saturating_sub(2).max(1)
}

/// Every bcp process's status: one request on `bcp.status`, every reply
/// that comes within `wait`. Exit 0 when each stream has one process
/// taking its commands and none reports an alarm, 1 otherwise (an alarm;
/// a group with no leader), 3 when none answered.
fn status(url: &str, wait: Duration, format: Format) -> Result<u8> {
    let replies: Vec<Value> = block_on(async {
        let client = connect(url).await?;
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await?;
        client
            .publish_with_reply(bcp::service::api::STATUS_SUBJECT, inbox, "{}".into())
            .await?;
        client.flush().await?;
        let mut replies = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
            // "No responders" is a status message, not a reply.
            if msg.status.is_none() {
                replies.push(serde_json::from_slice(&msg.payload).context("status reply")?);
            }
        }
        Ok(replies)
    })?;
    if replies.is_empty() {
        return Err(Unavailable(format!(
            "no bcp process answered on {} within {wait:?} (is bcp serve running?){}",
            bcp::service::api::STATUS_SUBJECT,
            refused_note(bcp::service::api::STATUS_SUBJECT)
        ))
        .into());
    }
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&replies)?),
        Format::Table => out!("{}", status_table(&replies)),
    }
    let alarmed = replies
        .iter()
        .any(|r| r["alarms"].as_array().is_some_and(|a| !a.is_empty()));
    // Each stream should have one process taking its commands: none (a
    // group without a leader) or two is a fault as an alarm is.
    let mut writers: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in &replies {
        let taking = r["taking_commands"] == Value::Bool(true);
        *writers
            .entry(r["stream"].as_str().unwrap_or("?"))
            .or_default() += usize::from(taking);
    }
    let mut unserved = false;
    for (stream, n) in writers.into_iter().filter(|(_, n)| *n != 1) {
        unserved = true;
        eprintln!(
            "bcp: {n} of the processes that answered take the commands of stream {stream} (one should)"
        );
    }
    // A group's node names tell its processes apart (in this table, the
    // logs, the restart of "node N"): two under one name is a mistake.
    let mut names: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
    for r in &replies {
        if let (Some(group), Some(node)) = (r["group"].as_str(), r["node"].as_str()) {
            *names.entry((group, node)).or_default() += 1;
        }
    }
    for ((group, node), n) in names.iter().filter(|(_, n)| **n > 1) {
        unserved = true;
        eprintln!(
            "bcp: {n} processes answer as node {node} of group {group}: give each its own --node (their stores, pids and dbs are above)"
        );
    }
    Ok(if alarmed || unserved {
        EXIT_REJECTED
    } else {
        EXIT_OK
    })
}

pub fn status_table(replies: &[Value]) -> String {
    let mut out = String::new();
    for r in replies {
        let field = |k: &str| match &r[k] {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_owned(),
            v => v.to_string(),
        };
        let behind = match &r["behind_stream"] {
            Value::Number(n) => format!(" ({n} behind the stream)"),
            _ => String::new(),
        };
        out += &format!(
            "{} {} pid {}  db {}  stream {}  head {}{behind}  published {}  lag {}  lease renewed {} ms ago  taking commands: {}\n  log id {}\n",
            field("role"),
            field("node"),
            field("pid"),
            field("db"),
            field("stream"),
            field("head_seq"),
            field("published_seq"),
            field("relay_lag"),
            field("lease_age_ms"),
            match (&r["taking_commands"], r["role"].as_str()) {
                (Value::Bool(true), _) => "yes",
                (_, Some("follower")) => "no, it follows the stream",
                _ => "NO",
            },
            field("log_id"),
        );
        for a in r["alarms"].as_array().into_iter().flatten() {
            out += &format!(
                "  ALARM {} since {}: {}\n",
                a["kind"].as_str().unwrap_or("?"),
                a["since"].as_str().unwrap_or("?"),
                a["message"].as_str().unwrap_or("?")
            );
        }
    }
    out
}

/// A query answered with an error: say it, exit 1.
fn rejected(message: &str) -> Result<u8> {
    eprintln!("bcp: {message}");
    Ok(EXIT_REJECTED)
}

/// Follow the published events (a core NATS subscription on the event
/// subjects): one line per event, or the envelope itself with `json`.
fn watch(url: &str, project: Option<&str>, job: Option<Uuid>, json: bool) -> Result<u8> {
    let subject = format!(
        "bcp.evt.{}.{}.*",
        project.unwrap_or("*"),
        job.map_or("*".to_owned(), |j| j.to_string())
    );
    block_on(async {
        let client = connect(url).await?;
        let mut events = client.subscribe(subject.clone()).await?;
        client.flush().await?;
        // NATS refuses a subscription on its own (the client reports it
        // after the flush): a refused watch says so rather than wait
        // forever for events that cannot come.
        let refused = || match refused_note(&subject) {
            note if note.is_empty() => Ok(()),
            note => Err(Unavailable(format!("cannot watch {subject}{note}"))),
        };
        // The refusal comes a moment after the flush's answer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        refused()?;
        let mut check = tokio::time::interval(Duration::from_millis(200));
        eprintln!("watching {subject} (Ctrl-C stops)");
        let mut out = std::io::stdout().lock();
        loop {
            let msg = tokio::select! {
                msg = events.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                _ = check.tick() => {
                    refused()?;
                    continue;
                }
            };
            let line = if json {
                String::from_utf8_lossy(&msg.payload).into_owned()
            } else {
                let e: Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
                let field = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
                format!(
                    "{:>7} {} {:<12} {:<36} {:<20} {}",
                    e["seq"],
                    field("recorded_at"),
                    field("project_id"),
                    field("job_id"),
                    field("type"),
                    field("actor")
                )
            };
            // A closed pipe (`| head`) is a normal end.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        Ok(EXIT_OK)
    })
}

/// The NATS credentials of a command that talks to NATS (the others,
/// which only read a local file, take none).
fn auth_of(cmd: &Cmd) -> Option<&AuthArgs> {
    match cmd {
        Cmd::Serve { auth, .. } | Cmd::Watch { auth, .. } | Cmd::Status { auth, .. } => Some(auth),
        Cmd::Send(a) => Some(&a.auth),
        Cmd::Jobs { source, .. } | Cmd::Snapshots { source, .. } => Some(&source.auth),
        Cmd::Job(a) | Cmd::History(a) => Some(&a.scope.source.auth),
        Cmd::Replay(a) => Some(&a.source.auth),
        Cmd::Audit(audit::AuditCmd::Verify { auth, .. }) => Some(auth),
        Cmd::Import(a) => Some(&a.auth),
        _ => None,
    }
}

/// Build a command body from the flags.
fn send_body(a: &SendArgs, verb: Verb) -> Result<(Value, Uuid)> {
    let command_id = a.command_id.unwrap_or_else(Uuid::now_v7);
    let mut body = Map::new();
    body.insert("command_id".into(), json!(command_id));
    let job = match (a.job, verb) {
        (Some(j), _) => Some(j),
        // The new job's id is the command's: a retry with the same
        // --command-id (and no --job) is then the same command, and gets
        // the first reply instead of command_id_conflict.
        (None, Verb::Create) => Some(command_id),
        (None, Verb::ConfigureRegion | Verb::ExpireSnapshots) => None,
        (None, _) => return Err(Usage(format!("{verb} needs --job")).into()),
    };
    if let Some(j) = job {
        body.insert("job_id".into(), json!(j));
    }
    if let Some(v) = a.expected_version {
        body.insert("expected_version".into(), json!(v));
    }
    if let Some(actor) = &a.actor {
        body.insert("actor".into(), json!(actor));
    }
    if verb != Verb::Create && (a.kind.is_some() || a.name.is_some() || a.cluster.is_some()) {
        return Err(Usage(format!(
            "--kind, --name and --cluster are for create, not {verb}"
        ))
        .into());
    }
    if verb == Verb::Create {
        let (Some(kind), Some(name)) = (&a.kind, &a.name) else {
            return Err(Usage("create needs --kind and --name".into()).into());
        };
        let mut d = json!({"kind": kind, "name": name});
        if let Some(c) = &a.cluster {
            d["cluster"] = json!(c);
        }
        body.insert("deployment".into(), d);
    }
    if a.no_region {
        body.insert("region".into(), Value::Null);
    } else if let Some(r) = &a.region {
        body.insert("region".into(), json!(r));
    }
    if let Some(s) = &a.schedule {
        let s: Value =
            serde_json::from_str(s).map_err(|e| Usage(format!("--schedule is not JSON: {e}")))?;
        body.insert("schedule".into(), s);
    }
    let fields = [
        ("snapshot_id", a.snapshot_id.map(|s| json!(s))),
        ("taken_at", a.taken_at.as_ref().map(|s| json!(s))),
        ("size_bytes", a.size_bytes.map(|s| json!(s))),
        ("expires_at", a.expires_at.as_ref().map(|s| json!(s))),
        ("do_not_delete", a.do_not_delete.then_some(json!(true))),
        ("now", a.now.as_ref().map(|s| json!(s))),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            body.insert(k.into(), v);
        }
    }
    if let Some(extra) = &a.body {
        let extra: Value =
            serde_json::from_str(extra).map_err(|e| Usage(format!("--body is not JSON: {e}")))?;
        let Value::Object(extra) = extra else {
            return Err(Usage("--body must be a JSON object".into()).into());
        };
        // The ids come from their flags alone: the command_id printed is
        // the one to retry with, and the job is the one --job names.
        for (field, flag) in [("command_id", "--command-id"), ("job_id", "--job")] {
            if extra.contains_key(field) {
                return Err(Usage(format!("--body may not hold {field}; use {flag}")).into());
            }
        }
        body.extend(extra);
    }
    Ok((Value::Object(body), command_id))
}

fn send(a: SendArgs) -> Result<u8> {
    let Some(verb) = Verb::parse(&a.verb) else {
        let all: Vec<_> = Verb::ALL.iter().map(|v| v.as_str()).collect();
        return Err(Usage(format!(
            "unknown verb {:?}; verbs: {}",
            a.verb,
            all.join(", ")
        ))
        .into());
    };
    let (body, command_id) = send_body(&a, verb)?;
    eprintln!("command_id: {command_id}");
    let subject = format!("bcp.cmd.{}.{}", a.project, verb);
    let value = request(&a.nats, &subject, &body, a.timeout)?;
    outln!("{}", serde_json::to_string(&value)?);
    let reply: Reply = serde_json::from_value(value).context("reply is not a bcp reply")?;
    Ok(match reply.code() {
        None => EXIT_OK,
        Some(bcp::domain::ErrorCode::Unavailable) => EXIT_UNAVAILABLE,
        Some(_) => EXIT_REJECTED,
    })
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// The first permissions violation nats-server sent this process's
/// connection: it comes on its own, not as the answer to the request it
/// spoiled, which then only times out. One command per process, so one
/// slot.
static REFUSED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// What to add to "no reply" on `subject`: nothing, or what NATS refused
/// and what to do.
fn refused_note(subject: &str) -> String {
    let refused = REFUSED.lock().unwrap_or_else(|e| e.into_inner());
    let advice = if subject.starts_with("bcp.cmd.") {
        "a user needs permission to publish on the command's subject and to receive on its \
         inbox prefix, --inbox-prefix; if only the reply was refused the command may have been \
         applied, and resending it with the same --command-id is safe"
    } else if subject.starts_with("bcp.evt.") {
        "a user needs permission to subscribe to the event subjects"
    } else {
        "a user needs permission to publish on this subject and to receive on its inbox \
         prefix, --inbox-prefix"
    };
    refused.as_ref().map_or_else(String::new, |e| {
        format!("; NATS refused this connection: {e} ({advice})")
    })
}

/// Connect for a CLI command; failures are [`Unavailable`].
async fn connect(url: &str) -> Result<async_nats::Client> {
    let options = AUTH
        .get()
        .cloned()
        .unwrap_or_default()
        .options()
        .await
        .context("NATS credentials")?
        .event_callback(|event| async move {
            use async_nats::{Event, ServerError};
            // Only what the advice is about: permissions (a payload too
            // large, say, is another matter).
            let refusal = match event {
                Event::ServerError(ServerError::AuthorizationViolation) => {
                    Some("authorization violation".to_owned())
                }
                Event::ServerError(ServerError::Other(e))
                    if e.to_ascii_lowercase().contains("permissions violation") =>
                {
                    Some(e)
                }
                _ => None,
            };
            if let Some(e) = refusal {
                let mut refused = REFUSED.lock().unwrap_or_else(|e| e.into_inner());
                refused.get_or_insert(e);
            }
        });
    // Each server in the order given, two seconds each: a frozen one
    // (which accepts the connection and never answers) costs its two
    // seconds, not the whole command.
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    let options = options
        .connection_timeout(Duration::from_secs(2))
        .retain_servers_order();
    let whole = Duration::from_secs(2 * servers.len() as u64 + 3);
    let client = tokio::time::timeout(whole, options.connect(servers))
        .await
        .map_err(|_| Unavailable(format!("timed out connecting to NATS at {url}")))?
        .map_err(|e| Unavailable(format!("cannot connect to NATS at {url}: {e}")))?;
    Ok(client)
}

/// One NATS request/reply; connection problems are [`Unavailable`].
fn request(url: &str, subject: &str, body: &Value, timeout_secs: u64) -> Result<Value> {
    block_on(async {
        let timeout = Duration::from_secs(timeout_secs);
        let client = connect(url).await?;
        let payload = serde_json::to_vec(body)?;
        // The client's own request timeout (10 s by default) is this one:
        // `--timeout 30` waits 30 s.
        let asked = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(timeout));
        let timed_out = || {
            Unavailable(format!(
                "no reply on {subject} within {timeout_secs}s{}",
                refused_note(subject)
            ))
        };
        let msg = tokio::time::timeout(timeout, client.send_request(subject.to_owned(), asked))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::TimedOut => timed_out(),
                async_nats::RequestErrorKind::NoResponders => Unavailable(format!(
                    "no reply on {subject}: nothing answers there (is bcp serve running? in a group, a failover takes a few seconds)"
                )),
                _ => Unavailable(format!("no reply on {subject}: {e}{}", refused_note(subject))),
            })?;
        let v: Value = serde_json::from_slice(&msg.payload).context("reply is not JSON")?;
        Ok(v)
    })
}

fn jobs_from(v: Value) -> Result<Vec<Job>> {
    if v["ok"] != json!(true) {
        let message = v["error"]["message"].as_str().unwrap_or("no message");
        bail!(
            "query failed ({}): {message}",
            v["error"]["code"].as_str().unwrap_or("?")
        );
    }
    Ok(serde_json::from_value(v["jobs"].clone())?)
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Fits 80 columns: a UUID is 36 of them.
pub fn jobs_table(jobs: &[Job]) -> String {
    let mut out = format!(
        "{:<36} {:<10} {:<20} {:<13} {:<10} {:>4} {}\n",
        "JOB", "PROJECT", "DEPLOYMENT", "STATE", "REGION", "VER", "PHASE"
    );
    for j in jobs {
        let phase = j
            .phase
            .map(|p| serde_json::to_value(p).expect("phase"))
            .map(|v| v.as_str().unwrap_or("").to_owned());
        // The name as an operator knows it, with its cluster for a shard or
        // config server (names are printable text, at most 128 characters).
        let deployment = match &j.deployment.cluster {
            Some(c) => format!("{}/{}", c, j.deployment.name),
            None => j.deployment.name.clone(),
        };
        out += &format!(
            "{:<36} {:<10} {:<20} {:<13} {:<10} {:>4} {}\n",
            j.job_id,
            j.project_id.as_str(),
            deployment,
            j.state.as_str(),
            or_dash(j.region.as_ref()),
            j.version,
            or_dash(phase)
        );
    }
    out
}

pub fn snapshots_table(snapshots: &[bcp::domain::Snapshot]) -> String {
    let mut out = format!(
        "{:<36} {:<17} {:<17} {:>12} {}\n",
        "SNAPSHOT", "TAKEN", "EXPIRES", "BYTES", "CLASSES"
    );
    for s in snapshots {
        let classes: Vec<String> = s
            .classes
            .iter()
            .map(|c| {
                serde_json::to_value(c)
                    .expect("class")
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        let expires = if s.do_not_delete {
            "do_not_delete".to_owned()
        } else {
            s.expires_at.format("%Y-%m-%dT%H:%MZ").to_string()
        };
        out += &format!(
            "{:<36} {:<17} {:<17} {:>12} {}\n",
            s.snapshot_id,
            s.taken_at.format("%Y-%m-%dT%H:%MZ"),
            expires,
            s.size_bytes,
            classes.join(",")
        );
    }
    out
}

/// One line per event (seq, time, actor, command, event, from -> to), the
/// reason and command id indented below; the command column as wide as
/// the longest verb.
pub fn history_table(entries: &[HistoryEntry]) -> String {
    let w = (Verb::ALL.iter())
        .map(|v| v.as_str().len())
        .max()
        .unwrap_or(0);
    // As wide as the longest actor: two verified identities may share
    // any prefix, and the table answers who did what.
    let a = (entries.iter())
        .map(|e| or_dash(e.actor.as_ref()).chars().count())
        .fold(10, usize::max);
    let mut out = format!(
        "{:>5} {:<20} {:<a$} {:<w$} {}\n",
        "SEQ", "TIME", "ACTOR", "COMMAND", "EVENT: FROM -> TO"
    );
    for e in entries {
        let change = if e.rejected {
            format!("REJECTED {}", or_dash(e.code.as_ref()))
        } else {
            format!("{}: {} -> {}", e.event_type, or_dash(e.from), or_dash(e.to))
        };
        out += &format!(
            "{:>5} {:<20} {:<a$} {:<w$} {}\n",
            e.seq,
            e.recorded_at.format("%Y-%m-%dT%H:%M:%SZ"),
            or_dash(e.actor.as_ref()),
            e.verb,
            change
        );
        out += &format!("{:>5} command {}\n", "", e.command_id);
        if let Some(reason) = &e.reason {
            out += &format!("{:>5} {}\n", "", reason);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Cli, HistoryEntry, history_table};
    use clap::CommandFactory;

    /// `bcp serve` keeps a core for each of its writer and commit threads,
    /// and never asks tokio for no worker (which panics).
    #[test]
    fn serve_leaves_its_own_threads_a_core_each_and_has_a_worker() {
        let workers: Vec<usize> = (0..=8).map(super::serve_workers).collect();
        assert_eq!(workers, [1, 1, 1, 1, 2, 3, 4, 5, 6]);
    }

    /// Every option and argument of every command says what it is for
    /// (issue 15): `--help`, the man page and the completions show it.
    #[test]
    fn every_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: String, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !matches!(id, "help" | "version") {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "bcp".into(), &mut missing);
        missing.sort();
        missing.dedup();
        assert!(
            missing.is_empty(),
            "no description:\n{}",
            missing.join("\n")
        );
    }

    /// Two verified identities that share a long prefix stay two in the
    /// history table: the actor column is as wide as the longest.
    #[test]
    fn the_history_table_shows_whole_actors() {
        let entry = |seq: u64, actor: &str| HistoryEntry {
            seq,
            recorded_at: chrono::DateTime::UNIX_EPOCH,
            actor: Some(actor.to_owned()),
            actor_verified: true,
            command_id: uuid::Uuid::nil(),
            event_type: "JobStopped".into(),
            version: Some(seq),
            from: None,
            to: None,
            verb: "stop".into(),
            rejected: false,
            code: None,
            reason: None,
        };
        let table = history_table(&[entry(1, "alice@PRODUCERS"), entry(2, "alice@PRODUCERS-EU")]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].contains(" alice@PRODUCERS    stop "), "{table}");
        assert!(lines[3].contains(" alice@PRODUCERS-EU stop "), "{table}");
        assert!(lines[0].contains(" ACTOR              COMMAND"), "{table}");
    }

    #[test]
    fn completions_and_man_page_cover_every_command() {
        let mut cmd = Cli::command();
        let mut script = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "bcp", &mut script);
        let script = String::from_utf8(script).unwrap();
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.starts_with(".ie") || man.contains(".TH bcp"), "{man}");
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            assert!(script.contains(name), "completions lack {name}");
            assert!(man.contains(name), "man page lacks {name}");
        }
    }
}
