//! The auditor's subcommands: replay, audit (history, verify, digest),
//! export and import. They read a stopped store (`--db`) or the published
//! stream (`--from-nats`), which works beside a running server.

use super::{EXIT_OK, EXIT_REJECTED, Format, history_table, jobs_table};
use anyhow::{Context, Result, bail};
use bcp::audit::chain::Digest;
use bcp::audit::logfile::{Verified, verify_json_lines, verify_stream};
use bcp::audit::replay::{self, Cut, Replayer, Select};
use bcp::audit::verify::{self, VerifyError};
use bcp::domain::ProjectId;
use bcp::store::{CACHE_BYTES, Store, import::write_new_store};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Where the log comes from: a stopped store, or the JetStream stream.
#[derive(Args)]
pub struct LogSource {
    /// A store no running server holds open (or --from-nats URL: the published stream).
    #[arg(long, env = "BCP_DB")]
    pub db: Option<PathBuf>,
    /// Read the published log from this NATS server's stream instead (works while bcp serve runs).
    #[arg(long)]
    pub from_nats: Option<String>,
    /// The JetStream stream that holds the published log.
    #[arg(long, env = "BCP_STREAM", default_value = bcp::service::STREAM)]
    pub stream: String,
    #[command(flatten)]
    pub auth: super::AuthArgs,
}

impl LogSource {
    /// The store to read, unless the stream is: `--from-nats` wins over a
    /// `BCP_DB` from the environment (an operator's default for the `--db`
    /// tools), but not over `--db` given beside it.
    fn db(&self) -> Result<Option<&PathBuf>> {
        let from_env = |db: &PathBuf| std::env::var_os("BCP_DB").is_some_and(|e| *db == e);
        match (&self.db, &self.from_nats) {
            (Some(db), Some(_)) if from_env(db) => Ok(None),
            (Some(_), Some(_)) => bail!(super::Usage(
                "give --db PATH or --from-nats URL, not both".into()
            )),
            (db, _) => Ok(db.as_ref()),
        }
    }
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  bcp replay --db data/bcp.redb --until-seq 3 --format json\n  bcp replay --db data/bcp.redb --until 2026-11-27T10:00:00Z --job 0192…\n  bcp replay --from-nats nats://127.0.0.1:4222 --project demo"
)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub source: LogSource,
    /// Stop after this seq.
    #[arg(long)]
    pub until_seq: Option<u64>,
    /// Stop after the last event recorded at or before this time (RFC 3339,
    /// e.g. 2026-11-27T10:00:00Z).
    #[arg(long, value_parser = parse_until)]
    pub until: Option<DateTime<Utc>>,
    /// Only this job.
    #[arg(long)]
    pub job: Option<Uuid>,
    /// Only this project's jobs.
    #[arg(long, value_parser = ProjectId::parse)]
    pub project: Option<ProjectId>,
    /// Output: a table for people, or JSON for programs.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Every transition and rejection of a job: seq, time, actor, command, from -> to, reason.
    #[command(after_help = "Example:\n  bcp audit history --db data/bcp.redb --job 0192…")]
    History {
        /// The store (stopped: a running bcp serve holds it open).
        #[arg(long, env = "BCP_DB")]
        db: PathBuf,
        /// The job's id (a UUID).
        #[arg(long)]
        job: Uuid,
        /// Output: a table for people, or JSON for programs.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Check the hash chain, gaplessness, per-job versions, and that the stored projections equal a rebuild.
    #[command(
        after_help = "Exit 0 and a one-line summary, or exit 1 naming the first bad seq.\nExamples:\n  bcp audit verify --db data/bcp.redb\n  bcp audit verify --db data/bcp.redb --digest 42:9f…\n  bcp audit verify --db data/bcp.redb --against-nats nats://127.0.0.1:4222"
    )]
    Verify {
        /// The store (stopped: a running bcp serve holds it open).
        #[arg(long, env = "BCP_DB")]
        db: PathBuf,
        /// SEQ:HASH from `bcp audit digest`: the log must still hold exactly that prefix.
        #[arg(long)]
        digest: Option<Digest>,
        /// Also check that this NATS server's stream holds the same events, byte for byte.
        #[arg(long)]
        against_nats: Option<String>,
        /// The JetStream stream that holds the published log.
        #[arg(long, env = "BCP_STREAM", default_value = bcp::service::STREAM)]
        stream: String,
        #[command(flatten)]
        auth: Box<super::AuthArgs>,
    },
    /// Print the head seq and hash (SEQ:HASH), to anchor outside bcp.
    Digest {
        /// The store (stopped: a running bcp serve holds it open).
        #[arg(long, env = "BCP_DB")]
        db: PathBuf,
    },
}

#[derive(Args)]
#[command(after_help = "Example:\n  bcp export --db data/bcp.redb --out bcp-log.jsonl")]
pub struct ExportArgs {
    /// The store (stopped: a running bcp serve holds it open).
    #[arg(long, env = "BCP_DB")]
    pub db: PathBuf,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
#[command(
    after_help = "Examples:\n  bcp import --db restored.redb bcp-log.jsonl\n  bcp import --db restored.redb --from-nats nats://127.0.0.1:4222"
)]
pub struct ImportArgs {
    /// The new store (refused if it already holds a log).
    #[arg(long)]
    pub db: PathBuf,
    /// JSON Lines from `bcp export`, or - for stdin.
    #[arg(conflicts_with = "from_nats", required_unless_present = "from_nats")]
    pub file: Option<String>,
    /// Rebuild from this NATS server's stream instead of a file.
    #[arg(long)]
    pub from_nats: Option<String>,
    /// The JetStream stream that holds the published log.
    #[arg(long, env = "BCP_STREAM", default_value = bcp::service::STREAM)]
    pub stream: String,
    /// SEQ:HASH: refuse unless the log holds exactly that prefix.
    #[arg(long)]
    pub digest: Option<Digest>,
    #[command(flatten)]
    pub auth: super::AuthArgs,
}

/// redb's page cache for a pass over the whole log: none. Every read of
/// replay, verify and export is a forward range over a table, which reads
/// each page once and holds the branch pages above it while it moves on, so
/// a cache only adds the work of filling and evicting it. On a 1.02 M-event
/// log, against 64 MiB: replay 1.05-1.15 s -> 0.91-0.93 s, verify
/// 1.99-2.05 s -> 1.88-1.91 s, and 80-90 MB less memory (1 MiB measured
/// the same as none).
const SCAN_CACHE_BYTES: usize = 0;

/// A bar on stderr while stdout is a terminal; nothing otherwise.
fn progress(total: Option<u64>, what: &'static str) -> ProgressBar {
    let target = if std::io::stdout().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(total, target);
    let style = ProgressStyle::with_template(
        "{msg} [{wide_bar:.cyan/blue}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what);
    bar
}

fn failed(e: VerifyError) -> Result<u8> {
    match e {
        VerifyError::Store(e) => Err(e.into()),
        VerifyError::Unreachable(why) => Err(super::Unavailable(why).into()),
        e => {
            outln!("FAILED: {e}");
            Ok(EXIT_REJECTED)
        }
    }
}

/// Fetch and verify the stream.
fn verified_from_nats(
    url: &str,
    stream: &str,
) -> Result<std::result::Result<Verified, VerifyError>> {
    let bar = progress(None, "reading the stream");
    // Not reaching NATS is an error (exit 3); a stream that cannot be
    // read whole is a failed check of the log (exit 1), as in verify.
    let fetched = super::block_on(async {
        let client = super::connect(url).await?;
        Ok(bcp::audit::nats::fetch(client, stream, |n| bar.set_position(n)).await)
    })?;
    bar.finish_and_clear();
    let messages = match fetched {
        Ok(messages) => messages,
        Err(e) => return Ok(Err(VerifyError::Stream(e))),
    };
    let bar = progress(Some(messages.len() as u64), "verifying");
    let v = verify_stream(bcp::audit::nats::in_order(messages), |n| {
        bar.set_position(n)
    });
    bar.finish_and_clear();
    Ok(v)
}

pub fn replay(a: ReplayArgs) -> Result<u8> {
    let cut = Cut {
        until_seq: a.until_seq,
        until: a.until,
    };
    let select = Select {
        job: a.job,
        project: a.project,
    };
    let view = match (a.source.db()?, &a.source.from_nats) {
        (Some(db), _) => {
            replay::replay(&Store::open_read_only(db, SCAN_CACHE_BYTES)?, cut, &select)?
        }
        (None, Some(url)) => {
            let verified = match verified_from_nats(url, &a.source.stream)? {
                Ok(v) => v,
                Err(e) => return failed(e),
            };
            let mut r = Replayer::default();
            for (env, _) in &verified.log {
                if !r.feed(env, &cut) {
                    break;
                }
            }
            r.view(&select)
        }
        (None, None) => bail!(super::Usage(
            "give --db PATH (a stopped store) or --from-nats URL (the published stream)".into()
        )),
    };
    match a.format {
        Format::Json => {
            // Streamed: the view of 100 k jobs is some 250 MB of JSON.
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            view.write_pretty(&mut out, bcp::audit::scan::workers())?;
            out.write_all(b"\n")?;
            out.flush()?;
            // The process exits next: freeing 100 k jobs one by one would
            // only delay that.
            std::mem::forget(view);
        }
        Format::Table => {
            outln!("as of seq {}", view.as_of_seq);
            out!("{}", jobs_table(&view.jobs));
            for (job, snaps) in view.snapshots.iter().filter(|(_, s)| !s.is_empty()) {
                outln!("\nsnapshots of {job}:");
                out!("{}", super::snapshots_table(snaps));
            }
        }
    }
    Ok(EXIT_OK)
}

pub fn audit(cmd: AuditCmd) -> Result<u8> {
    match cmd {
        AuditCmd::History { db, job, format } => {
            let store = Store::open_read_only(&db, CACHE_BYTES)?;
            let events = store.job_events(job)?;
            if events.is_empty() {
                eprintln!("bcp: no job {job} in {}", db.display());
                return Ok(EXIT_REJECTED);
            }
            let entries = store.history(&events)?;
            match format {
                // The shape of `bcp.query.history`'s reply (one page of it,
                // with every entry).
                Format::Json => outln!(
                    "{}",
                    serde_json::to_string_pretty(&bcp::service::queries::HistoryReply {
                        ok: true,
                        as_of_seq: store.head_seq()?,
                        job_id: job,
                        history: entries,
                        next_after_seq: None,
                    })?
                ),
                Format::Table => out!("{}", history_table(&entries)),
            }
            Ok(EXIT_OK)
        }
        AuditCmd::Verify {
            db,
            digest,
            against_nats,
            stream,
            auth: _,
        } => {
            // First the pages under the tables: what follows reads through
            // them and trusts them (a damaged page can crash a reader).
            if let Err(e) = bcp::store::disk::check_pages(&db)? {
                return failed(VerifyError::Pages(e));
            }
            let store = Store::open_read_only(&db, SCAN_CACHE_BYTES)?;
            let bar = progress(Some(store.event_count()?), "verifying");
            let report = match verify::verify(&store, digest.as_ref(), |n| bar.set_position(n)) {
                Ok(r) => r,
                Err(e) => return failed(e),
            };
            bar.finish_and_clear();
            let compared = match against_nats {
                None => String::new(),
                Some(url) => match compare_with_stream(&store, &url, &stream) {
                    Ok(()) => format!("; stream {stream} at {url} holds the same bytes"),
                    Err(e) => return failed(e),
                },
            };
            let anchored = digest.map_or(String::new(), |d| format!(", contains digest {d}"));
            let empty = if store.event_count()? > 0 {
                ""
            } else {
                " (empty log)"
            };
            outln!(
                "ok: {} events verified, head seq {} hash {}{anchored}, in {:.3}s{empty}{compared}",
                report.events,
                report.head_seq,
                report.head_hash,
                report.elapsed.as_secs_f64()
            );
            Ok(EXIT_OK)
        }
        AuditCmd::Digest { db } => {
            let store = Store::open_read_only(&db, CACHE_BYTES)?;
            let head = store.head_seq()?;
            if head == 0 {
                bail!("the log at {} is empty", db.display());
            }
            let env = store.events(head, head)?.pop().context("head event")?;
            outln!(
                "{}",
                Digest {
                    seq: head,
                    hash: env.hash
                }
            );
            Ok(EXIT_OK)
        }
    }
}

/// The stream must hold exactly the store's events, byte for byte.
fn compare_with_stream(
    store: &Store,
    url: &str,
    stream: &str,
) -> std::result::Result<(), VerifyError> {
    let messages = super::block_on(async {
        let client = super::connect(url).await?;
        bcp::audit::nats::fetch(client, stream, |_| {})
            .await
            .map_err(anyhow::Error::msg)
    })
    .map_err(|e| match e.downcast::<super::Unavailable>() {
        // Not reaching NATS says nothing of the log: exit 3, not 1.
        Ok(u) => VerifyError::Unreachable(u.0),
        Err(e) => VerifyError::Stream(format!("{e:#}")),
    })?;
    let head = store.head_seq()?;
    let mut mismatch = None;
    let mut n = 0u64;
    store.for_each_event(|seq, bytes| {
        n = seq;
        match messages.get(seq as usize - 1) {
            Some(m) if m.seq != seq => {
                mismatch = Some(VerifyError::BadEvent {
                    seq,
                    what: format!(
                        "the stream holds sequence {} here (a message was removed)",
                        m.seq
                    ),
                });
                Ok(false)
            }
            Some(m) if m.payload.as_slice() == bytes => match m.misrouted() {
                None => Ok(true),
                Some(what) => {
                    mismatch = Some(VerifyError::BadEvent { seq, what });
                    Ok(false)
                }
            },
            Some(_) => {
                mismatch = Some(VerifyError::BadEvent {
                    seq,
                    what: "the stream's message differs from the store's event".into(),
                });
                Ok(false)
            }
            None => {
                mismatch = Some(VerifyError::BadEvent {
                    seq,
                    what: format!(
                        "missing from the stream, which ends at {} (relay lag?)",
                        messages.len()
                    ),
                });
                Ok(false)
            }
        }
    })?;
    if let Some(m) = mismatch {
        return Err(m);
    }
    if messages.len() as u64 > head {
        return Err(VerifyError::BadEvent {
            seq: head + 1,
            what: format!(
                "the stream holds {} messages, the store {head}",
                messages.len()
            ),
        });
    }
    debug_assert_eq!(n, head);
    Ok(())
}

/// Whether `a` and `b` name one file (one inode of one device, e.g. through
/// a link or another spelling of the path). False when either is missing.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

pub fn export(a: ExportArgs) -> Result<u8> {
    let store = Store::open_read_only(&a.db, SCAN_CACHE_BYTES)?;
    // Creating `--out` truncates it: never the store being read.
    if let Some(out) = &a.out
        && same_file(out, &a.db)
    {
        bail!(super::Usage(format!(
            "--out {} is the store being exported; write the log elsewhere",
            out.display()
        )));
    }
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let bar = progress(Some(store.event_count()?), "exporting");
    let mut io_error = None;
    // A log with a gap is not a log: stop at it, naming it, rather than
    // write a file import would refuse (verify says the rest).
    let mut exported = 0u64;
    let mut gap = None;
    // Each event's hash is checked against its bytes and the event before
    // it: a damaged store is not exported as a log that looks whole.
    let mut prev_hash = bcp::domain::envelope::GENESIS_HASH.to_owned();
    let mut broken = None;
    store.for_each_event(|seq, bytes| {
        if seq != exported + 1 {
            gap = Some((exported + 1, seq));
            return Ok(false);
        }
        match bcp::domain::Envelope::stored_link(&prev_hash, bytes) {
            Some(hash) => {
                prev_hash.clear();
                prev_hash.push_str(hash);
            }
            None => {
                broken = Some(seq);
                return Ok(false);
            }
        }
        if let Err(e) = out.write_all(bytes).and_then(|_| out.write_all(b"\n")) {
            io_error = Some(e);
            return Ok(false);
        }
        exported = seq;
        bar.set_position(seq);
        Ok(true)
    })?;
    bar.finish_and_clear();
    let stopped = match (gap, broken) {
        (Some((missing, next)), _) => Some(format!(
            "seq {missing} is missing from the store (the next stored is {next})"
        )),
        (None, Some(seq)) => Some(format!(
            "seq {seq}'s hash does not match its bytes and the event before it (the store is damaged or was edited)"
        )),
        (None, None) => None,
    };
    if let Some(why) = stopped {
        drop(out);
        if let Some(p) = &a.out {
            // Not a file that looks like a whole log.
            remove_written(p);
        }
        bail!(
            "{why}; {exported} events written before it; bcp audit verify --db {} says more",
            a.db.display()
        );
    }
    let flushed = match io_error {
        Some(e) => Err(e),
        None => out.flush(),
    };
    match flushed {
        // A closed pipe (`| head`) is a normal end.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(EXIT_OK),
        Err(e) => {
            drop(out);
            if let Some(p) = &a.out {
                // A disk full, say: not a file that looks like a log.
                remove_written(p);
            }
            return Err(anyhow::Error::from(e).context(format!(
                "writing the log{}; nothing kept",
                a.out
                    .as_ref()
                    .map_or(String::new(), |p| format!(" to {}", p.display()))
            )));
        }
        Ok(()) => {}
    }
    // The summary goes to stderr: stdout may be the log itself.
    let head = store.head_seq()?;
    let hash = store
        .events(head, head)?
        .pop()
        .map_or_else(|| "-".to_owned(), |e| e.hash);
    let to = a
        .out
        .as_ref()
        .map_or_else(|| "stdout".to_owned(), |p| p.display().to_string());
    eprintln!("ok: exported {exported} events to {to}, head seq {head} hash {hash}");
    Ok(EXIT_OK)
}

/// `--until`: an RFC 3339 time, with the expected form in the error.
fn parse_until(s: &str) -> std::result::Result<DateTime<Utc>, String> {
    bcp::domain::timestamp::parse(s)
        .map_err(|e| format!("{e}: expected an RFC 3339 time such as 2026-11-27T10:00:00Z"))
}

pub fn import(a: ImportArgs) -> Result<u8> {
    remove_partial_on_signal();
    bcp::store::import::check_target(&a.db)?;
    let verified = match (&a.file, &a.from_nats) {
        (_, Some(url)) => verified_from_nats(url, &a.stream)?,
        (Some(f), None) => {
            let reader: Box<dyn BufRead> = if f == "-" {
                Box::new(BufReader::new(std::io::stdin().lock()))
            } else {
                Box::new(BufReader::new(
                    std::fs::File::open(f).with_context(|| format!("open {f}"))?,
                ))
            };
            let bar = progress(None, "verifying");
            let v = verify_json_lines(reader, |n| bar.set_position(n));
            bar.finish_and_clear();
            v
        }
        (None, None) => bail!(super::Usage("give FILE, - or --from-nats".into())),
    };
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            outln!("FAILED: {e}; nothing written");
            return Ok(EXIT_REJECTED);
        }
    };
    if let Some(d) = &a.digest
        && let Err(e) = verified.check_digest(d)
    {
        outln!("FAILED: {e}; nothing written");
        return Ok(EXIT_REJECTED);
    }
    if verified.log.is_empty() {
        // An empty file or stdin, a stream not yet written: a store of no
        // log is never what an import is for (bcp serve makes its own).
        outln!("FAILED: the log is empty (no events read); nothing written");
        return Ok(EXIT_REJECTED);
    }
    write_new_store(&a.db, &verified.log, &verified.world)?;
    outln!(
        "ok: imported {} events into {}, head seq {} hash {}",
        verified.head_seq(),
        a.db.display(),
        verified.head_seq(),
        verified.head_hash
    );
    Ok(EXIT_OK)
}

/// Ctrl-C or SIGTERM during an import: remove the store being written
/// (a signal skips the temp file's own removal, which left a hidden
/// `.NAME.*.importing` beside the target for each stopped import), then
/// exit as the signal would have (130, 143).
fn remove_partial_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            let code = tokio::select! {
                _ = tokio::signal::ctrl_c() => 130,
                _ = term.recv() => 143,
            };
            bcp::store::import::remove_partial();
            std::process::exit(code);
        });
    });
}

/// Remove what an export wrote to `--out`: a regular file only (never
/// `/dev/stdout` or a device given as `--out`).
fn remove_written(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file()) {
        let _ = std::fs::remove_file(path);
    }
}
