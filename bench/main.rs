//! bcp's benchmark (issue 5): bcp end to end beside the baselines it must
//! beat, all measured in one run on one machine.
//!
//! ```text
//! cargo build --release && cargo bench --bench bcp -- --help
//! ```
//! (`just bench`, `just bench-smoke`; `BCP_BENCH_LOG` sets `bcp serve`'s
//! `RUST_LOG`, e.g. `info,bcp::service::writer=trace` for each commit's
//! time). It starts its own nats-servers and
//! `bcp serve` children (`target/release/bcp`, or `$BCP_BIN`) on free
//! loopback ports, with their stores in a temp dir (`--keep` keeps it).
//!
//! What it measures, in this order:
//! 1. **Baseline A**: raw redb appends of real envelope bytes (taken from a
//!    log the workload built), group-committed with `Durability::Immediate`,
//!    1, 4, 64 and 512 per transaction: the ceiling of any durable log on
//!    this disk; each commit timed. Beside it, bcp's own write path without
//!    NATS (`Pipeline::execute`: decide, hash chain, projections, idempotency,
//!    one durable commit) at the same batch sizes, and the bytes and the CPU
//!    time each write transaction takes (the thread's CPU clock,
//!    `measure::thread_cpu_us`). 1 and 4 are about the batches `bcp serve`
//!    commits at low load (about 5 at 25 % of its max load). `--repeats`
//!    rounds, A and bcp taking turns at each size; the round of median CPU
//!    ratio is reported. `--appends-only` runs just this and prints it
//!    (`--batch N` for one size).
//! 2. **Baseline B**: raw JetStream publish-with-ack of the same bytes,
//!    `--in-flight` acks outstanding, against a default nats-server (which
//!    fsyncs every 2 minutes, not per message); **B′**: the same against a
//!    nats-server with `jetstream { sync_interval: always }`, the durable
//!    peer of bcp.
//! 3. **bcp end to end**: `--in-flight` producers (one command in flight
//!    each) send the workload mix (see `workload.rs`) over NATS to a fresh
//!    `bcp serve`; acked commands/s, ack latency p50/p95/p99/max, how long
//!    after the last ack the stream holds every event, and the CPU and disk
//!    writes of each process (from /proc). Beside it, the headline peer
//!    **C** (`peer.rs`): what a team would build instead of bcp, a NATS
//!    request/reply service that publishes each command as an event to
//!    JetStream and replies after the ack (no fsync of its own), driven by
//!    the same producers with the same commands; bcp ÷ C is the headline.
//!    Beside it, two floors (`peer.rs`), services that keep bcp's rule (the
//!    reply leaves after its command is fsynced, commands group committed)
//!    and do nothing else: **R**, raw redb appends with every command
//!    published to JetStream after its reply (the floor of bcp's contract:
//!    bcp ÷ R is what bcp's own work costs), and **F**, a flat file and no
//!    JetStream (the floor of the sync on this disk).
//! 4. **Fixed load**: open-loop pacing at 25/50/75 % of the rate of 3;
//!    latency p50/p99 from each command's due time, and beside it bcp
//!    serve's own share (its `bcp_command_seconds` over the run, read from
//!    `--http` /metrics: intake queue to reply sent), so a missed latency
//!    target shows whether the time went inside bcp or around it; then
//!    peers C, R and F at the same offered rates (what a JetStream-backed
//!    service's latency, and the floors', are at those rates on this
//!    machine).
//! 5. **Replay and verify**: the `bcp` CLI (`audit verify --db`, `replay --db
//!    --format json`) on the log of 6 (`--events`, default 1 M), timed.
//!    `--audit-only` builds a log of `--events` offline and runs just this.
//! 6. **Cost growth**: a log built offline through `Pipeline::execute` to
//!    `--events`/100, /10 and `--events`; after each, `bcp serve` restarts
//!    on it (startup time; relay catch-up rate), then the closed loop of 3
//!    runs again. `--growth-only` runs just this and prints each step's
//!    rate and CPU per command.
//! 7. **Memory**: VmRSS/VmHWM of `bcp serve` at each step of 6 (10 events
//!    per job, so 1 M events = 100 k jobs), and the heap the projections
//!    (`World`) take, counted by this binary's allocator (`heap.rs`).
//! 8. **The replicated ack** (group mode): the closed loop of 3 against
//!    three `bcp serve --group` nodes on a 3-node JetStream cluster with
//!    `--stream-replicas 3` (a reply leaves once the events are fsynced
//!    locally and acknowledged by a JetStream quorum), beside the same loop
//!    against a fresh single-node bcp, taking turns. `--group-only` runs
//!    just this and prints it.
//!
//! Apart from the phases, `--catalog-only` prints the writer's and the
//! commit's CPU per command against one job with 6 to 3,000 retained
//! snapshots (no NATS), and the heap its `World` takes per snapshot: the
//! workload's jobs keep six, a long-lived job with daily, weekly and
//! monthly retention hundreds.
//!
//! The disk's speed here drifts by ±30 % within minutes, so the figures a
//! ratio or a target is read from are each the median of `--repeats` runs
//! (default 3), and the runs whose rates are divided are interleaved:
//! A and bcp's write path take turns at each batch size (1); B, B′, C, F, R
//! and bcp end to end take turns (phases 2 and 3; bcp's later runs find the
//! earlier runs' events in its log), as do verify and replay (5);
//! each growth step (6) repeats its closed loop. Every run's rate is kept
//! beside the median.
//!
//! The workload's ids (jobs, commands, snapshots) are UUIDv7 by default,
//! time-ordered; `--ids random` sends UUIDv4, as most producers' libraries
//! make, which lands every insert keyed by them at a random place in the
//! store's tables (bench/RESULTS.md has both).
//!
//! Before each measured phase it runs `sync`, and it deletes each
//! baseline's files after use: otherwise what one phase wrote without fsync
//! (a default nats-server) is written back by the kernel during the next
//! one and stalls its fsyncs for 100 ms or more (bench/RESULTS.md).
//!
//! Output: a markdown table (each bcp figure beside its baseline and the
//! target of issue 5) on stdout, progress on stderr, every figure in
//! `bench/results/latest.json` (or `--out`). No thresholds: it reports.

mod heap;
mod measure;
mod peer;
mod procs;
mod report;
#[path = "../tests/support/procs.rs"]
mod shared_procs;
mod workload;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use bytes::Bytes;
use measure::{Rate, Run};
use procs::{Bcp, Memory, Nats};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use workload::{Ids, Lanes};

const STREAM: &str = "BCP_EVENTS";

#[global_allocator]
static ALLOC: heap::Counting = heap::Counting;

/// Everything one run can be told.
#[derive(Clone, Debug, Serialize)]
pub struct Args {
    pub quick: bool,
    /// Only the end-to-end run and the fixed loads (3, 4), printed, nothing
    /// written: for comparing two builds quickly.
    pub e2e_only: bool,
    /// Only the replicated-ack comparison (8), printed, nothing written.
    pub group_only: bool,
    /// Only the relay's publish modes, printed, nothing written.
    pub publish_only: bool,
    /// Only phase 1 (raw redb against `Pipeline::execute`), printed,
    /// nothing written: for profiling and comparing the commit.
    pub appends_only: bool,
    /// Only replay and verify (5) of a log of `events` built offline,
    /// printed, nothing written: for profiling and comparing them.
    pub audit_only: bool,
    /// Only the cost growth (6), printed, nothing written.
    pub growth_only: bool,
    /// Only the cost of a command against one job by the size of its
    /// catalog, printed, nothing written.
    pub catalog_only: bool,
    /// The batch sizes of phase 1 (commands per commit).
    pub batches: Vec<usize>,
    /// How the workload's job, command and snapshot ids are made.
    pub ids: Ids,
    /// The largest log of the growth steps, replay and verify.
    pub events: u64,
    /// Commands of the end-to-end run (3).
    pub commands: u64,
    /// Commands of the end-to-end run at each growth step (6).
    pub growth_commands: u64,
    /// Producers (commands in flight) for 3 and 6; publish window for B.
    pub in_flight: usize,
    /// Seconds per offered load (4).
    pub load_secs: f64,
    /// Runs of each figure a ratio or target is read from (1, 2, 3, 5, 6);
    /// the median is reported.
    pub repeats: usize,
    pub baseline_a_events: u64,
    pub baseline_b_msgs: u64,
    pub baseline_b_sync_msgs: u64,
    /// Commands per `Pipeline::execute` when building logs offline.
    pub build_batch: usize,
    pub out: PathBuf,
    pub keep: bool,
}

/// The command line (`cargo bench --bench bcp -- --help`); unset values
/// take the defaults of a full run, or of `--quick`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "bcp-bench",
    about = "bcp's benchmark: bcp end to end beside raw redb (A), raw JetStream (B, B′) and a JetStream-backed request/reply service (C), in one run",
    long_about = None
)]
struct CommandLine {
    /// Small sizes (seconds): only shows the harness still runs.
    #[arg(long)]
    quick: bool,
    /// Only peer C and bcp end to end (3) and the fixed loads (4), printed,
    /// nothing written: for comparing two builds.
    #[arg(long, conflicts_with = "group_only")]
    e2e_only: bool,
    /// Only the replicated-ack comparison (8), printed, nothing written.
    #[arg(long)]
    group_only: bool,
    /// Only the relay's publish modes: one ack per message (as the relay
    /// publishes) against JetStream atomic and fast batches, printed,
    /// nothing written.
    #[arg(long, conflicts_with_all = ["e2e_only", "group_only"])]
    publish_only: bool,
    /// Only phase 1: raw redb appends (A) against bcp's write transaction
    /// at the same batch sizes, printed, nothing written.
    #[arg(long, conflicts_with_all = ["e2e_only", "group_only", "publish_only"])]
    appends_only: bool,
    /// Only replay and verify (5) of a log of `--events` built offline,
    /// printed, nothing written: for profiling and comparing them.
    #[arg(long, conflicts_with_all = ["e2e_only", "group_only", "publish_only", "appends_only"])]
    audit_only: bool,
    /// Only the cost growth (6): the closed loop on logs of `--events`/100,
    /// /10 and `--events`, each step's CPU per command printed, nothing
    /// written: for finding what grows with the log.
    #[arg(long, conflicts_with_all = ["e2e_only", "group_only", "publish_only", "appends_only", "audit_only"])]
    growth_only: bool,
    /// Only the writer's and the commit's CPU per command against one job
    /// with 6 to 3,000 retained snapshots (no NATS), and the heap its
    /// World takes per snapshot, printed, nothing written: a command must
    /// not cost more for a job with a long catalog than the rows it
    /// changes.
    #[arg(long, conflicts_with_all = ["e2e_only", "group_only", "publish_only", "appends_only", "audit_only", "growth_only"])]
    catalog_only: bool,
    /// With `--appends-only`: only this batch size (repeatable), e.g. to
    /// profile one of them.
    #[arg(long = "batch", requires = "appends_only", value_parser = clap::value_parser!(u64).range(1..=4096))]
    batches: Vec<u64>,
    /// How the workload makes its job, command and snapshot ids: UUIDv7
    /// (time-ordered), UUIDv4 (random, as most producers send), or both
    /// (one producer in eight UUIDv4).
    #[arg(long, value_enum, default_value_t = Ids::Ordered)]
    ids: Ids,
    /// The largest log of the growth steps, replay and verify (at least 1000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1000..))]
    events: Option<u64>,
    /// Commands of each end-to-end run (3), for bcp and for peer C.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    commands: Option<u64>,
    /// Commands of the end-to-end run at each growth step (6).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    growth_commands: Option<u64>,
    /// Producers (commands in flight) for 3 and 6; publish window for B.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    in_flight: Option<u64>,
    /// Seconds per offered load (4).
    #[arg(long)]
    load_secs: Option<f64>,
    /// Runs of each figure a ratio is read from; the median is reported.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    repeats: Option<u64>,
    /// Where the JSON results go (default bench/results/latest.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the temp dir (stores, logs) for a look afterwards.
    #[arg(long)]
    keep: bool,
    /// cargo bench passes it to `harness = false` targets.
    #[arg(long, hide = true)]
    bench: bool,
    /// Run as peer C against this NATS URL (the bench starts it so).
    #[arg(long, hide = true, value_name = "NATS_URL")]
    serve_peer_c: Option<String>,
    /// Run as a floor peer (F or R) against this NATS URL, its store in
    /// `--peer-file`.
    #[arg(long, hide = true, value_name = "NATS_URL", requires_all = ["peer_file", "floor"])]
    serve_floor: Option<String>,
    /// A floor peer's store.
    #[arg(long, hide = true)]
    peer_file: Option<PathBuf>,
    /// Which floor peer.
    #[arg(long, hide = true, value_enum)]
    floor: Option<peer::Floor>,
}

impl Args {
    fn from(cli: CommandLine) -> Args {
        let mut a = if cli.quick {
            Args {
                quick: true,
                e2e_only: false,
                group_only: false,
                publish_only: false,
                appends_only: false,
                audit_only: false,
                growth_only: false,
                catalog_only: false,
                batches: BATCHES.to_vec(),
                ids: Ids::Ordered,
                events: 20_000,
                commands: 3_000,
                growth_commands: 1_000,
                in_flight: 64,
                load_secs: 1.0,
                repeats: 2,
                baseline_a_events: 5_000,
                baseline_b_msgs: 10_000,
                baseline_b_sync_msgs: 1_000,
                build_batch: 1024,
                out: PathBuf::new(),
                keep: false,
            }
        } else {
            Args {
                quick: false,
                e2e_only: false,
                group_only: false,
                publish_only: false,
                appends_only: false,
                audit_only: false,
                growth_only: false,
                catalog_only: false,
                batches: BATCHES.to_vec(),
                ids: Ids::Ordered,
                events: 1_000_000,
                commands: 100_000,
                growth_commands: 20_000,
                in_flight: 64,
                load_secs: 10.0,
                repeats: 3,
                baseline_a_events: 200_000,
                baseline_b_msgs: 200_000,
                baseline_b_sync_msgs: 30_000,
                build_batch: 2048,
                out: PathBuf::new(),
                keep: false,
            }
        };
        a.e2e_only = cli.e2e_only;
        a.group_only = cli.group_only;
        a.publish_only = cli.publish_only;
        a.appends_only = cli.appends_only;
        a.audit_only = cli.audit_only;
        a.growth_only = cli.growth_only;
        a.catalog_only = cli.catalog_only;
        a.ids = cli.ids;
        if !cli.batches.is_empty() {
            a.batches = cli.batches.iter().map(|&n| n as usize).collect();
        }
        a.keep = cli.keep;
        a.events = cli.events.unwrap_or(a.events);
        a.commands = cli.commands.unwrap_or(a.commands);
        a.growth_commands = cli.growth_commands.unwrap_or(a.growth_commands);
        a.in_flight = cli.in_flight.map_or(a.in_flight, |n| n as usize);
        a.load_secs = cli.load_secs.unwrap_or(a.load_secs);
        a.repeats = cli.repeats.map_or(a.repeats, |n| n as usize);
        a.out = cli.out.unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results/latest.json")
        });
        a
    }
}

/// One step of the growth series (6, 7).
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Events in the log when the measured run started.
    pub log_events: u64,
    pub jobs: u64,
    /// Offline build of this step's events through `Pipeline::execute`.
    pub build: Rate,
    /// `bcp serve` start until it answers (loads every job into memory).
    pub startup_ms: f64,
    /// The relay publishing what the offline build appended.
    pub relay_catch_up: Rate,
    /// After startup and catch-up, before the measured runs.
    pub memory_loaded: Memory,
    /// The closed loop's run of median rate.
    pub run: Run,
    /// Every run's commands/s, in the order they ran.
    pub rates: Vec<f64>,
    /// Jobs and events in the log after the measured runs.
    pub jobs_after: u64,
    pub events_after: u64,
    /// After the measured runs.
    pub memory_after: Memory,
    /// The projections `bcp serve` keeps in memory, counted on the heap
    /// after it stopped (same log as `memory_after`).
    pub heap: heap::WorldBytes,
    /// One idle retention sweep through `Pipeline::execute` on this log: how
    /// long it holds the writer.
    pub sweep_ms: f64,
}

/// `Pipeline::execute` at a fixed batch size, no NATS (beside baseline A).
#[derive(Clone, Debug, Serialize)]
pub struct LedgerAppends {
    pub batch: usize,
    pub rate: Rate,
    /// Duration of each `Pipeline::execute` call (decide, append, commit).
    pub execute: measure::Latency,
    /// Of which `Store::commit` (the commit thread's part).
    pub commit: measure::Latency,
    /// The CPU time of each `Store::commit`, on its thread.
    pub commit_cpu: measure::Latency,
    /// The CPU time of the checkpoint closing the run (job rows still held
    /// behind, written), on the same thread.
    pub checkpoint_cpu_us: u64,
    /// Bytes written to storage by the appends (and the checkpoint).
    pub written_bytes: u64,
    /// [`LedgerAppends::cpu_ratio`] of every round, in the order they ran
    /// (this run is the median's).
    pub cpu_ratios: Vec<f64>,
}

impl LedgerAppends {
    /// CPU per write transaction, mean with the closing checkpoint, ÷ A's
    /// mean in the same round: the figure the target is read from.
    pub fn cpu_ratio(&self, a: &measure::Appends) -> f64 {
        self.mean_cpu_with_checkpoint_us() / a.commit_cpu.mean_us.max(1) as f64
    }

    /// CPU per write transaction, mean, with the closing checkpoint's
    /// spread over the run's transactions: what the rows cost in all (a
    /// run shorter than `ROWS_HELD` events writes them only there).
    pub fn mean_cpu_with_checkpoint_us(&self) -> f64 {
        let n = self.commit_cpu.samples.max(1) as f64;
        self.commit_cpu.mean_us as f64 + self.checkpoint_cpu_us as f64 / n
    }

    /// Bytes written to storage per event appended.
    pub fn bytes_per_event(&self) -> f64 {
        measure::per_event(self.written_bytes, &self.rate)
    }
}

/// A `bcp` CLI command timed over a log.
#[derive(Clone, Debug, Serialize)]
pub struct Cli {
    pub command: String,
    /// The run of median rate.
    pub rate: Rate,
    /// Every run's events/s, in the order they ran.
    pub rates: Vec<f64>,
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub mem_total_bytes: u64,
    pub nats_server: String,
    pub kernel: String,
    pub date: String,
    pub git: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub args: Args,
    pub machine: Machine,
    pub envelope_bytes_mean: f64,
    pub baseline_a: Vec<measure::Appends>,
    /// `Pipeline::execute` (decide, hash chain, projections, idempotency, one
    /// durable commit per batch) at the batch sizes of baseline A.
    pub ledger_a: Vec<LedgerAppends>,
    /// B's and B′'s runs of median rate, and every run's msgs/s.
    pub baseline_b: measure::Publish,
    pub baseline_b_rates: Vec<f64>,
    pub baseline_b_sync: measure::Publish,
    pub baseline_b_sync_rates: Vec<f64>,
    pub memory_empty: Memory,
    /// Peer C's closed loop (a JetStream-backed request/reply service, the
    /// headline peer): the run of median rate, and every run's commands/s.
    pub peer_c: Run,
    pub peer_c_rates: Vec<f64>,
    /// Peer F's closed loop (a service that fsyncs a flat file before it
    /// replies and does nothing else: the floor of the sync on this disk).
    pub peer_f: Run,
    pub peer_f_rates: Vec<f64>,
    /// Peer R's (the same with raw redb appends, each command published
    /// to JetStream after its reply: the floor of bcp's contract).
    pub peer_r: Run,
    pub peer_r_rates: Vec<f64>,
    /// The closed loop's run of median rate, and every run's commands/s
    /// (each run after a B, a B′, a C, an F and an R run).
    pub e2e: Run,
    pub e2e_rates: Vec<f64>,
    pub fixed_load: Vec<(f64, Run)>,
    /// Peers C, F and R at the same offered rates as `fixed_load`.
    pub peer_c_fixed_load: Vec<Run>,
    pub peer_f_fixed_load: Vec<Run>,
    pub peer_r_fixed_load: Vec<Run>,
    pub growth: Vec<Step>,
    pub verify: Cli,
    pub replay: Cli,
    pub group: GroupAck,
    pub elapsed_secs: f64,
}

/// Item 8: the closed loop against a group of three (replicated ack) and
/// against a single node, the runs of median rate and every run's rate.
#[derive(Clone, Debug, Serialize)]
pub struct GroupAck {
    pub single: Run,
    pub single_rates: Vec<f64>,
    pub group: Run,
    pub group_rates: Vec<f64>,
}

fn main() -> Result<()> {
    let cli = <CommandLine as clap::Parser>::parse();
    if let Some(url) = &cli.serve_peer_c {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(peer::serve(url));
    }
    if let (Some(url), Some(file), Some(floor)) = (&cli.serve_floor, &cli.peer_file, cli.floor) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(peer::serve_floor(url, file, floor));
    }
    // `cargo test --all-targets` builds and runs this target too, without
    // `--bench`: that must not start a benchmark of several minutes.
    if !cli.bench {
        println!("bcp benchmark: run it with `cargo bench --bench bcp -- [--quick] ...` (--help)");
        return Ok(());
    }
    let args = Args::from(cli);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The modes that only print return `None`.
    let Some(results) = rt.block_on(run(args.clone()))? else {
        return Ok(());
    };
    println!("{}", report::table(&results));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn say(what: impl AsRef<str>) {
    eprintln!("[bench] {}", what.as_ref());
}

/// What every phase needs: the binaries, the temp dir, the arguments, and
/// the lanes (so no two phases share a job).
struct Bench {
    args: Args,
    nats_bin: PathBuf,
    bcp_bin: PathBuf,
    dir: PathBuf,
    lanes: Lanes,
}

/// Every phase, or one mode of them (`--e2e-only` …, printed: `None`). It
/// returns (never exits) so the temp dir is removed unless `--keep`.
async fn run(args: Args) -> Result<Option<Results>> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new().prefix("bcp-bench").tempdir()?;
    let mut b = Bench {
        nats_bin: procs::nats_server_bin()?,
        bcp_bin: procs::bcp_bin()?,
        dir: tmp.path().to_owned(),
        lanes: Lanes::new(args.ids),
        args,
    };
    if b.args.keep {
        let _ = tmp.keep();
        say(format!("keeping {}", b.dir.display()));
    }
    let mut machine = report::machine(&b.nats_bin);
    say(format!(
        "{} cores, {}; {}; load {}; temp dir {}",
        machine.nproc,
        machine.cpu,
        machine.nats_server,
        machine.loadavg_start,
        b.dir.display()
    ));

    if b.args.group_only {
        let g = group_ack(&mut b).await?;
        print!("{}", report::group_rows(&g));
        return Ok(None);
    }
    if b.args.publish_only {
        publish_modes(&mut b).await?;
        return Ok(None);
    }
    if b.args.appends_only {
        let db = b.dir.join("samples.redb");
        build(&db, 10_000, &mut b.lanes, b.args.build_batch).await?;
        let samples = envelopes(&db)?;
        let (a, l) = durable_appends(&mut b, &samples).await?;
        for (a, l) in a.iter().zip(&l) {
            let (lw, aw) = (l.bytes_per_event(), a.bytes_per_event());
            println!(
                "{}/commit: CPU per transaction p50 bcp {} µs, A {} µs = {:.2}× (means {} / {} µs; bcp's with the closing checkpoint {:.0} µs = {:.2}×{}); bytes/event bcp {lw:.0}, A {aw:.0} = {:.2}×",
                l.batch,
                l.commit_cpu.p50_us,
                a.commit_cpu.p50_us,
                l.commit_cpu.p50_us as f64 / a.commit_cpu.p50_us.max(1) as f64,
                l.commit_cpu.mean_us,
                a.commit_cpu.mean_us,
                l.mean_cpu_with_checkpoint_us(),
                l.cpu_ratio(a),
                report::of_ratios(&l.cpu_ratios),
                lw / aw.max(1.0),
            );
        }
        return Ok(None);
    }
    if b.args.catalog_only {
        for n in [6, 100, 400, 1000, 3000] {
            let dir = b.dir.join(format!("catalog-{n}"));
            std::fs::create_dir_all(&dir)?;
            let db = dir.join("catalog.redb");
            let path = db.clone();
            let c = tokio::task::spawn_blocking(move || workload::catalog_cost(&path, n)).await??;
            // The job's catalog holds `n` and the snapshots recorded since.
            let held = n + workload::CATALOG_COMMANDS;
            let heap = heap::world_bytes(&db)?;
            println!(
                "{n:>5} snapshots: start/stop writer {} µs, commit {} µs; record-snapshot writer {} µs, commit {} µs (CPU per command, medians of {}); World {} B for {held} snapshots, {} B each",
                c.switch.0,
                c.switch.1,
                c.record.0,
                c.record.1,
                workload::CATALOG_COMMANDS,
                heap.world_bytes,
                heap.world_bytes / held as u64
            );
        }
        return Ok(None);
    }
    if b.args.audit_only {
        let db = b.dir.join("growth.redb");
        say(format!(
            "building a log of {} events offline",
            b.args.events
        ));
        build(&db, b.args.events, &mut b.lanes, b.args.build_batch).await?;
        let (verify, replay) = audit(&b, &db).await?;
        for (name, cli) in [("audit verify", &verify), ("replay", &replay)] {
            println!(
                "{name}: {:.0} events/s{}, peak RSS {:.1} MiB",
                cli.rate.per_sec,
                report::of_runs(&cli.rates),
                cli.peak_rss_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
            );
        }
        return Ok(None);
    }
    if b.args.growth_only {
        let steps = [b.args.events / 100, b.args.events / 10, b.args.events];
        let db = b.dir.join("growth.redb");
        say(format!("building a log of {} events offline", steps[0]));
        let first_build = build(&db, steps[0], &mut b.lanes, b.args.build_batch).await?;
        let growth = growth(&mut b, &db, &steps, first_build).await?;
        let base = growth.first().map_or(0.0, |s| s.run.acked.per_sec);
        for s in &growth {
            println!(
                "log at {} events: {:.0} commands/s{} = {:.2}× the first step, p99 {} µs, {}",
                s.log_events,
                s.run.acked.per_sec,
                report::of_runs(&s.rates),
                s.run.acked.per_sec / base.max(1.0),
                s.run.latency.p99_us,
                cpu_per_command(&s.run, "bcp serve"),
            );
        }
        return Ok(None);
    }
    if b.args.e2e_only {
        let e = fresh_bcp(&mut b, None).await?;
        let (e2e, rates) = &e.e2e;
        let cores = |r: &Run| r.cpu.as_ref().map_or(0.0, |c| c.others_cores);
        // `server`: the process serving the loop, as `cpu_per_command` names it.
        let line = |name: &str, server: &str, r: &Run, rates: &[f64]| {
            println!(
                "{name}: {:.0} commands/s{}, p50/p99 {}/{} µs, {} (other processes {:.2} cores)",
                r.acked.per_sec,
                report::of_runs(rates),
                r.latency.p50_us,
                r.latency.p99_us,
                cpu_per_command(r, server),
                cores(r)
            )
        };
        line("end to end", "bcp serve", e2e, rates);
        let peers = [
            (Peer::C, &e.peer_c, &e.peer_c_fixed_load),
            (Peer::F, &e.peer_f, &e.peer_f_fixed_load),
            (Peer::R, &e.peer_r, &e.peer_r_fixed_load),
        ];
        for (peer, (run, runs), _) in peers {
            line(peer.name(), peer.name(), run, runs);
        }
        let ratio =
            |name: &str, (ours, our_runs): (&Run, &[f64]), (theirs, their_runs): (&Run, &[f64])| {
                println!(
                    "{name}: {:.2}× (medians; runs {})",
                    ours.acked.per_sec / theirs.acked.per_sec,
                    our_runs
                        .iter()
                        .zip(their_runs)
                        .map(|(b, c)| format!("{:.2}×", b / c))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
        let (c, f, r) = (&e.peer_c, &e.peer_f, &e.peer_r);
        let bcp = (e2e, &rates[..]);
        ratio("bcp ÷ C", bcp, (&c.0, &c.1));
        ratio("bcp ÷ R", bcp, (&r.0, &r.1));
        ratio("R ÷ C", (&r.0, &r.1), (&c.0, &c.1));
        ratio("F ÷ C", (&f.0, &f.1), (&c.0, &c.1));
        for (i, (share, run)) in e.fixed_load.iter().enumerate() {
            println!(
                "{:.0} % load: p50/p99 {}/{} µs{}, {} (other processes {:.2} cores)",
                share * 100.0,
                run.latency.p50_us,
                run.latency.p99_us,
                report::inside(run),
                cpu_per_command(run, "bcp serve"),
                cores(run),
            );
            for (peer, _, fixed) in peers {
                let p = &fixed[i];
                println!(
                    "  {} at that rate: p50/p99 {}/{} µs, {}",
                    peer.name(),
                    p.latency.p50_us,
                    p.latency.p99_us,
                    cpu_per_command(p, peer.name()),
                );
            }
        }
        return Ok(None);
    }
    // The growth log's first step doubles as the source of real envelopes
    // for the baselines.
    let steps = [b.args.events / 100, b.args.events / 10, b.args.events];
    let growth_db = b.dir.join("growth.redb");
    say(format!("building a log of {} events offline", steps[0]));
    let first_build = build(&growth_db, steps[0], &mut b.lanes, b.args.build_batch).await?;
    let samples = envelopes(&growth_db)?;
    let envelope_bytes_mean =
        samples.iter().map(|(_, b)| b.len()).sum::<usize>() as f64 / samples.len() as f64;
    say(format!(
        "{} sample envelopes, {envelope_bytes_mean:.0} bytes on average",
        samples.len()
    ));

    let (baseline_a, ledger_a) = durable_appends(&mut b, &samples).await?;
    let EndToEnd {
        memory_empty,
        peer_c: (peer_c, peer_c_rates),
        peer_f: (peer_f, peer_f_rates),
        peer_r: (peer_r, peer_r_rates),
        e2e: (e2e, e2e_rates),
        baselines,
        fixed_load,
        peer_c_fixed_load,
        peer_f_fixed_load,
        peer_r_fixed_load,
    } = fresh_bcp(&mut b, Some(&samples)).await?;
    let ((baseline_b, baseline_b_rates), (baseline_b_sync, baseline_b_sync_rates)) =
        baselines.context("the baselines ran beside bcp")?;
    let growth = growth(&mut b, &growth_db, &steps, first_build).await?;

    let (verify, replay) = audit(&b, &growth_db).await?;
    let group = group_ack(&mut b).await?;

    machine.loadavg_end = report::loadavg();
    Ok(Some(Results {
        args: b.args,
        machine,
        envelope_bytes_mean,
        baseline_a,
        ledger_a,
        baseline_b,
        baseline_b_rates,
        baseline_b_sync,
        baseline_b_sync_rates,
        memory_empty,
        peer_c,
        peer_c_rates,
        peer_f,
        peer_f_rates,
        peer_r,
        peer_r_rates,
        e2e,
        e2e_rates,
        fixed_load,
        peer_c_fixed_load,
        peer_f_fixed_load,
        peer_r_fixed_load,
        growth,
        verify,
        replay,
        group,
        elapsed_secs: started.elapsed().as_secs_f64(),
    }))
}

/// A process's CPU time per command in `r` (µs), and context switches per
/// command, beside nats-server's: steadier than the rate when two builds
/// are compared, since the disk's fsync time moves the rate by ±30 % from
/// run to run here; the switches are the thread hops a command costs,
/// which the CPU per command at low load is mostly made of.
fn cpu_per_command(r: &Run, server: &str) -> String {
    let used = |name: &str| {
        r.cpu
            .as_ref()
            .and_then(|c| c.procs.iter().find(|p| p.name == name).cloned())
            .unwrap_or_default()
    };
    let us_per_command = |name: &str| used(name).cores * 1e6 / r.acked.per_sec;
    let switches_per_command = |name: &str| {
        let secs = r.cpu.as_ref().map_or(0.0, |c| c.secs);
        used(name).switches as f64 / (r.acked.per_sec * secs).max(1.0)
    };
    format!(
        "CPU/command: {server} {:.0} µs, nats-server {:.0} µs; switches/command: {server} {:.1}, nats-server {:.1}",
        us_per_command(server),
        us_per_command("nats-server"),
        switches_per_command(server),
        switches_per_command("nats-server"),
    )
}

/// Commands per commit in phase 1: 1 and 4 are what `bcp serve` commits at
/// low load (its writer hands the next batch over as soon as the last one
/// is durable), 64 and 512 what it commits when busy.
const BATCHES: [usize; 4] = [1, 4, 64, 512];

/// Events appended at `batch` per commit: fewer for small batches, where
/// 2,000 commits already give steady percentiles.
fn appends_for(batch: usize, events: u64) -> u64 {
    events.min(2_000 * batch as u64)
}

/// Baseline A (raw redb), and bcp's `Pipeline::execute` at the same batch
/// sizes: the write path without NATS. `--repeats` rounds, A and bcp taking
/// turns at each batch size; of each size, the round whose CPU ratio (bcp's
/// mean with the closing checkpoint ÷ A's mean) is the median is kept, with
/// every round's ratio in `cpu_ratios`.
async fn durable_appends(
    b: &mut Bench,
    samples: &[(String, Bytes)],
) -> Result<(Vec<measure::Appends>, Vec<LedgerAppends>)> {
    let batches = b.args.batches.clone();
    let mut rounds: Vec<Vec<(measure::Appends, LedgerAppends)>> = vec![Vec::new(); batches.len()];
    for round in 0..b.args.repeats {
        for (i, &batch) in batches.iter().enumerate() {
            let a = baseline_a(b, samples, batch, round).await?;
            let l = ledger_appends(b, batch, round).await?;
            rounds[i].push((a, l));
        }
    }
    let mut baseline_a = Vec::new();
    let mut ledger_a = Vec::new();
    for runs in rounds {
        let ((a, mut l), ratios) = median_by(runs, |(a, l)| l.cpu_ratio(a));
        l.cpu_ratios = ratios;
        baseline_a.push(a);
        ledger_a.push(l);
    }
    Ok((baseline_a, ledger_a))
}

/// One run of baseline A at `batch` per commit, on a fresh file deleted after.
async fn baseline_a(
    b: &Bench,
    samples: &[(String, Bytes)],
    batch: usize,
    round: usize,
) -> Result<measure::Appends> {
    let path = b.dir.join(format!("baseline-a-{batch}-{round}.redb"));
    let bytes: Vec<Bytes> = samples.iter().map(|(_, b)| b.clone()).collect();
    let n = appends_for(batch, b.args.baseline_a_events);
    let batch = batch as u64;
    settle().await?;
    let file = path.clone();
    let a = tokio::task::spawn_blocking(move || measure::redb_appends(&path, &bytes, n, batch))
        .await??;
    std::fs::remove_file(file)?;
    say(format!(
        "baseline A, {batch}/commit: {:.0} events/s, commit p50 {} µs, p99 {} µs",
        a.rate.per_sec, a.commit.p50_us, a.commit.p99_us
    ));
    Ok(a)
}

/// One run of bcp's `Pipeline::execute` at `batch` per commit, on a fresh
/// store deleted after.
async fn ledger_appends(b: &mut Bench, batch: usize, round: usize) -> Result<LedgerAppends> {
    let db = b.dir.join(format!("ledger-{batch}-{round}.redb"));
    settle().await?;
    let written = procs::written_bytes(0).unwrap_or(0);
    let n = appends_for(batch, b.args.baseline_a_events);
    let built = build(&db, n, &mut b.lanes, batch).await?;
    std::fs::remove_file(&db)?;
    let l = LedgerAppends {
        written_bytes: procs::written_bytes(0).unwrap_or(0).saturating_sub(written),
        batch,
        rate: Rate::new(built.appended, built.elapsed),
        execute: measure::Latency::of(built.executes),
        commit: measure::Latency::of(built.commits),
        commit_cpu: measure::Latency::of(built.commit_cpus),
        checkpoint_cpu_us: built.checkpoint_cpu,
        cpu_ratios: Vec::new(),
    };
    say(format!(
        "Pipeline::execute, {batch}/commit: {:.0} events/s, per batch p50 {} µs, p99 {} µs",
        l.rate.per_sec, l.execute.p50_us, l.execute.p99_us
    ));
    Ok(l)
}

/// The run of median rate among `runs` (of an even count, the lower of the
/// two middle ones), and every run's rate in the order they ran.
fn median_by<T>(mut runs: Vec<T>, rate: impl Fn(&T) -> f64) -> (T, Vec<f64>) {
    assert!(!runs.is_empty(), "a median of no runs");
    let rates: Vec<f64> = runs.iter().map(rate).collect();
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| rates[a].total_cmp(&rates[b]));
    (runs.swap_remove(order[(runs.len() - 1) / 2]), rates)
}

impl Cli {
    fn median(runs: Vec<Cli>) -> Cli {
        let (mut cli, rates) = median_by(runs, |c| c.rate.per_sec);
        cli.rates = rates;
        cli
    }
}

/// One run each of baseline B (default nats-server) and B′
/// (`sync_interval: always`), each on a fresh nats-server whose files are
/// deleted after it.
async fn jetstream_baselines(
    b: &Bench,
    samples: &[(String, Bytes)],
    run: usize,
) -> Result<(measure::Publish, measure::Publish)> {
    settle().await?;
    let dir = b.dir.join(format!("nats-b-{run}"));
    let nats = Nats::start(&b.nats_bin, &dir, false)?;
    let default_sync = measure::jetstream_publish(
        &nats,
        samples,
        b.args.baseline_b_msgs,
        b.args.in_flight,
        false,
    )
    .await?;
    drop(nats);
    // Its unsynced writes would otherwise be written back during the next
    // measurement, stalling every fsync on the disk meanwhile.
    std::fs::remove_dir_all(dir)?;
    say(format!(
        "baseline B: {:.0} msgs/s",
        default_sync.rate.per_sec
    ));
    settle().await?;
    let dir = b.dir.join(format!("nats-b-sync-{run}"));
    let nats = Nats::start(&b.nats_bin, &dir, true)?;
    let n = b.args.baseline_b_sync_msgs;
    let sync_always =
        measure::jetstream_publish(&nats, samples, n, b.args.in_flight, false).await?;
    drop(nats);
    std::fs::remove_dir_all(dir)?;
    say(format!(
        "baseline B′ (sync always): {:.0} msgs/s",
        sync_always.rate.per_sec
    ));
    Ok((default_sync, sync_always))
}

/// The peers of bcp's end-to-end run (`peer.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// The headline peer: publish to JetStream, reply after its ack.
    C,
    /// The floor of the sync on this disk: a flat file fsynced, then reply.
    F,
    /// The floor of bcp's contract: raw redb appends fsynced, then reply,
    /// then publish to JetStream.
    R,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::C => "peer C",
            Peer::F => "peer F",
            Peer::R => "peer R",
        }
    }

    /// A floor peer's `--floor` (`peer::Floor`).
    fn floor(self) -> Option<&'static str> {
        match self {
            Peer::C => None,
            Peer::F => Some("file"),
            Peer::R => Some("redb"),
        }
    }
}

/// One closed loop against `peer` on a fresh default nats-server, whose
/// files are deleted after it: the same commands, the same number in
/// flight, as bcp's run it takes turns with.
async fn peer_closed(b: &mut Bench, peer: Peer, run: usize, commands: u64) -> Result<Run> {
    settle().await?;
    let p = PeerProcs::start(b, peer, &format!("{run}")).await?;
    // Peer F publishes no stream to wait for.
    let js = (peer != Peer::F).then(|| jetstream::new(p.client.clone()));
    let lanes = b.lanes.take(b.args.in_flight);
    let result = closed(&p.client, js.as_ref(), lanes, commands, &p.pids()).await?;
    p.stop()?;
    say(format!(
        "{}: {:.0} commands/s, p99 {} µs",
        peer.name(),
        result.acked.per_sec,
        result.latency.p99_us
    ));
    Ok(result)
}

/// A peer on its own fresh nats-server, and a client to drive it.
struct PeerProcs {
    peer: Peer,
    dir: PathBuf,
    nats: Nats,
    process: procs::Peer,
    client: async_nats::Client,
}

impl PeerProcs {
    /// Start it; `name` tells its NATS store, file and log from other runs'.
    async fn start(b: &Bench, peer: Peer, name: &str) -> Result<PeerProcs> {
        let dir = b
            .dir
            .join(format!("{}-{name}", peer.name().replace(' ', "-")));
        let nats = Nats::start(&b.nats_bin, &dir.join("nats"), false)?;
        let (url, file) = (nats.url(), dir.join("floor"));
        let file = file.to_str().context("a temp path in UTF-8")?;
        let args = match peer.floor() {
            None => vec!["--serve-peer-c", &url],
            Some(floor) => vec!["--serve-floor", &url, "--peer-file", file, "--floor", floor],
        };
        let process = procs::Peer::start(&args, &dir.join("peer.log"))?;
        let client = async_nats::connect(nats.url()).await?;
        Ok(PeerProcs {
            peer,
            dir,
            nats,
            process,
            client,
        })
    }

    /// The processes whose CPU a run of it counts.
    fn pids(&self) -> [(&'static str, u32); 3] {
        [
            (self.peer.name(), self.process.pid()),
            ("nats-server", self.nats.pid()),
            ("producers (bench)", 0),
        ]
    }

    /// Stop both processes and remove their files.
    fn stop(self) -> Result<()> {
        let PeerProcs {
            dir,
            nats,
            process,
            client,
            ..
        } = self;
        drop((client, process, nats));
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }
}

/// `--publish-only`: the relay's way to publish (one ack per message, 256
/// in flight, with and without the relay's `Nats-Expected-Last-Sequence`)
/// against JetStream atomic batches of 64 and 256 messages (one ack per
/// batch, 4 batches in flight) and fast batches (one flow-control ack per
/// 64 or 256 stored messages, 4 such in flight), each on a fresh default
/// nats-server, taking turns `--repeats` times; printed.
async fn publish_modes(b: &mut Bench) -> Result<()> {
    let db = b.dir.join("samples.redb");
    build(&db, 10_000, &mut b.lanes, b.args.build_batch).await?;
    let samples = envelopes(&db)?;
    let msgs = b.args.baseline_b_msgs;
    enum Mode {
        PerMessage { fence: bool },
        Atomic(u64),
        Fast(u16),
    }
    let modes = [
        (
            "one ack per message, 256 in flight",
            Mode::PerMessage { fence: false },
        ),
        (
            "one ack per message, 256 in flight, fenced (the relay)",
            Mode::PerMessage { fence: true },
        ),
        ("atomic batches of 64, 4 in flight", Mode::Atomic(64)),
        ("atomic batches of 256, 4 in flight", Mode::Atomic(256)),
        (
            "fast batch, ack per 64, 256 in flight, fenced",
            Mode::Fast(64),
        ),
        (
            "fast batch, ack per 256, 1024 in flight, fenced",
            Mode::Fast(256),
        ),
    ];
    let mut runs: Vec<Vec<measure::Publish>> = (0..modes.len()).map(|_| Vec::new()).collect();
    for i in 0..b.args.repeats {
        for (m, (name, mode)) in modes.iter().enumerate() {
            settle().await?;
            let dir = b.dir.join(format!("nats-publish-{i}-{m}"));
            let nats = Nats::start(&b.nats_bin, &dir, false)?;
            let p = match mode {
                Mode::PerMessage { fence } => {
                    measure::jetstream_publish(&nats, &samples, msgs, 256, *fence).await?
                }
                Mode::Atomic(n) => {
                    measure::jetstream_atomic_batches(&nats, &samples, msgs, *n, 4).await?
                }
                Mode::Fast(flow) => {
                    let window = 4 * u64::from(*flow);
                    measure::jetstream_fast_batch(&nats, &samples, msgs, *flow, window).await?
                }
            };
            drop(nats);
            std::fs::remove_dir_all(dir)?;
            say(format!("{name}: {:.0} msgs/s", p.rate.per_sec));
            runs[m].push(p);
        }
    }
    for ((name, _), runs) in modes.iter().zip(runs) {
        let (p, rates) = median_by(runs, |p| p.rate.per_sec);
        let cores = |who: &str| {
            p.cpu
                .procs
                .iter()
                .find(|c| c.name == who)
                .map_or(0.0, |c| c.cores)
        };
        println!(
            "{name}: {:.0} msgs/s{}, ack p50/p99 {}/{} µs, CPU per message: nats-server {:.1} µs, publisher {:.1} µs",
            p.rate.per_sec,
            report::of_runs(&rates),
            p.latency.p50_us,
            p.latency.p99_us,
            cores("nats-server") * 1e6 / p.rate.per_sec,
            cores("publisher (bench)") * 1e6 / p.rate.per_sec,
        );
    }
    Ok(())
}

/// What [`fresh_bcp`] measured: each figure as (run of median rate, every
/// run's rate).
struct EndToEnd {
    memory_empty: Memory,
    /// The closed loops of peers C, F and R, each just before one of bcp's.
    peer_c: (Run, Vec<f64>),
    peer_f: (Run, Vec<f64>),
    peer_r: (Run, Vec<f64>),
    e2e: (Run, Vec<f64>),
    baselines: Option<Baselines>,
    fixed_load: Vec<(f64, Run)>,
    /// Peers C, F and R at each of `fixed_load`'s offered rates.
    peer_c_fixed_load: Vec<Run>,
    peer_f_fixed_load: Vec<Run>,
    peer_r_fixed_load: Vec<Run>,
}

/// B and B′.
type Baselines = ((measure::Publish, Vec<f64>), (measure::Publish, Vec<f64>));

/// Items 2, 3 and 4: a fresh `bcp serve` on an empty log; `--repeats`
/// closed loops, each after a run of peers C, F and R, and of B and B′
/// before them
/// when `samples` are given (bcp idles meanwhile); then the open loop at 25, 50 and 75 % of the
/// median closed loop's rate.
async fn fresh_bcp(b: &mut Bench, samples: Option<&[(String, Bytes)]>) -> Result<EndToEnd> {
    let nats = Nats::start(&b.nats_bin, &b.dir.join("nats-e2e"), false)?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let db = b.dir.join("e2e.redb");
    let bcp = Bcp::start(&b.bcp_bin, &db, &nats.url(), &b.dir.join("bcp-e2e.log")).await?;
    let memory_empty = bcp.memory()?;
    let pids = [
        ("bcp serve", bcp.pid()),
        ("nats-server", nats.pid()),
        ("producers (bench)", 0),
    ];
    let (mut runs, mut bs, mut syncs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cs, mut fs, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..b.args.repeats {
        if let Some(samples) = samples {
            let (default_sync, sync_always) = jetstream_baselines(b, samples, i).await?;
            bs.push(default_sync);
            syncs.push(sync_always);
        }
        cs.push(peer_closed(b, Peer::C, i, b.args.commands).await?);
        fs.push(peer_closed(b, Peer::F, i, b.args.commands).await?);
        rs.push(peer_closed(b, Peer::R, i, b.args.commands).await?);
        say(format!(
            "bcp end to end, run {} of {}: {} commands, {} in flight",
            i + 1,
            b.args.repeats,
            b.args.commands,
            b.args.in_flight
        ));
        let lanes = b.lanes.take(b.args.in_flight);
        settle().await?;
        let run = closed(&client, Some(&js), lanes, b.args.commands, &pids).await?;
        say(format!(
            "bcp end to end: {:.0} commands/s, p99 {} µs, stream {:.0} ms behind",
            run.acked.per_sec, run.latency.p99_us, run.stream_lag_after_last_ack_ms
        ));
        runs.push(run);
    }
    let e2e = median_by(runs, |r| r.acked.per_sec);
    let peer_c = median_by(cs, |r| r.acked.per_sec);
    let peer_f = median_by(fs, |r| r.acked.per_sec);
    let peer_r = median_by(rs, |r| r.acked.per_sec);
    let baselines = samples.map(|_| {
        (
            median_by(bs, |p| p.rate.per_sec),
            median_by(syncs, |p| p.rate.per_sec),
        )
    });
    let mut fixed_load = Vec::new();
    for share in [0.25, 0.50, 0.75] {
        let rate = e2e.0.acked.per_sec * share;
        let mut run = fixed_rate(b, &client, rate, &pids, Some(&bcp)).await?;
        let lag = measure::wait_for_stream(&js, STREAM, run.last_seq, Duration::from_secs(300));
        run.stream_lag_after_last_ack_ms = lag.await?.as_secs_f64() * 1e3;
        say(format!(
            "fixed load {:.0} %: {rate:.0}/s offered, p50 {} µs, p99 {} µs{}",
            share * 100.0,
            run.latency.p50_us,
            run.latency.p99_us,
            report::inside(&run)
        ));
        fixed_load.push((share, run));
    }
    bcp.stop().await?;
    let rates: Vec<f64> = fixed_load
        .iter()
        .map(|(_, r)| r.offered_per_sec.unwrap_or(0.0))
        .collect();
    let peer_c_fixed_load = peer_open(b, Peer::C, &rates).await?;
    let peer_f_fixed_load = peer_open(b, Peer::F, &rates).await?;
    let peer_r_fixed_load = peer_open(b, Peer::R, &rates).await?;
    Ok(EndToEnd {
        memory_empty,
        peer_c,
        peer_f,
        peer_r,
        e2e,
        baselines,
        fixed_load,
        peer_c_fixed_load,
        peer_f_fixed_load,
        peer_r_fixed_load,
    })
}

/// A peer under the same offered loads as bcp's fixed loads (item 4), on
/// a fresh nats-server: the latency a JetStream-backed service (C), and a
/// service that only fsyncs before it replies (F), have at those rates on
/// this machine, beside bcp's.
async fn peer_open(b: &mut Bench, peer: Peer, rates: &[f64]) -> Result<Vec<Run>> {
    let p = PeerProcs::start(b, peer, "open").await?;
    let mut runs = Vec::new();
    for &rate in rates {
        let run = fixed_rate(b, &p.client, rate, &p.pids(), None).await?;
        say(format!(
            "{} at {rate:.0}/s offered: p50 {} µs, p99 {} µs",
            peer.name(),
            run.latency.p50_us,
            run.latency.p99_us
        ));
        runs.push(run);
    }
    p.stop()?;
    Ok(runs)
}

/// One open-loop run at `rate` for `--load-secs`, with the CPU of `pids`
/// and, given a `bcp` serve, its own share of the latency.
async fn fixed_rate(
    b: &mut Bench,
    client: &async_nats::Client,
    rate: f64,
    pids: &[(&str, u32)],
    bcp: Option<&Bcp>,
) -> Result<Run> {
    // Enough idle lanes for 50 ms of commands in flight.
    let lanes = b.lanes.take(((rate * 0.05) as usize).clamp(256, 8192));
    let secs = Duration::from_secs_f64(b.args.load_secs);
    settle().await?;
    let before = match bcp {
        Some(bcp) => Some(bcp.command_seconds().await?),
        None => None,
    };
    let meter = procs::Meter::start(pids);
    let mut run = measure::open_loop(client, lanes, rate, secs).await;
    run.cpu = Some(meter.stop());
    if let (Some(bcp), Some(before)) = (bcp, before) {
        run.inside_bcp = bcp.command_seconds().await?.since(&before).inside();
    }
    Ok(run)
}

/// Items 6 and 7: grow one log offline step by step; after each step restart
/// `bcp serve` on it, let the relay catch up, run the closed loop, read its
/// memory, stop it, and count the projections' heap bytes.
async fn growth(
    b: &mut Bench,
    db: &Path,
    steps: &[u64],
    first_build: workload::Built,
) -> Result<Vec<Step>> {
    let nats = Nats::start(&b.nats_bin, &b.dir.join("nats-growth"), false)?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let mut growth = Vec::new();
    for (i, &target) in steps.iter().enumerate() {
        let built = if i == 0 {
            first_build.clone()
        } else {
            say(format!("extending the log offline to {target} events"));
            build(db, target, &mut b.lanes, b.args.build_batch).await?
        };
        let head = built.head_seq;
        let before = measure::stream_last_seq(&js, STREAM).await;
        let log = b.dir.join(format!("bcp-growth-{i}.log"));
        let bcp = Bcp::start(&b.bcp_bin, db, &nats.url(), &log).await?;
        let catch_up = measure::wait_for_stream(&js, STREAM, head, Duration::from_secs(3600));
        // The relay starts publishing while bcp is still starting up.
        let relay_catch_up = Rate::new(head - before, bcp.startup + catch_up.await?);
        let memory_loaded = bcp.memory()?;
        say(format!(
            "log at {head} events, {} jobs: started in {:.0} ms, relay caught up {} events at {:.0}/s",
            built.jobs,
            bcp.startup.as_secs_f64() * 1e3,
            head - before,
            relay_catch_up.per_sec
        ));
        let pids = [
            ("bcp serve", bcp.pid()),
            ("nats-server", nats.pid()),
            ("producers (bench)", 0),
        ];
        let mut runs = Vec::new();
        for _ in 0..b.args.repeats {
            let lanes = b.lanes.take(b.args.in_flight);
            settle().await?;
            let run = closed(&client, Some(&js), lanes, b.args.growth_commands, &pids).await?;
            say(format!(
                "  {:.0} commands/s, p99 {} µs",
                run.acked.per_sec, run.latency.p99_us
            ));
            runs.push(run);
        }
        let jobs_after = built.jobs + runs.iter().map(|r| r.jobs_created).sum::<u64>();
        let events_after = runs.iter().map(|r| r.last_seq).fold(head, u64::max);
        let (run, rates) = median_by(runs, |r| r.acked.per_sec);
        let memory_after = bcp.memory()?;
        say(format!(
            "  RSS {} MiB, peak {} MiB",
            memory_after.rss_bytes >> 20,
            memory_after.peak_rss_bytes >> 20
        ));
        let startup_ms = bcp.startup.as_secs_f64() * 1e3;
        bcp.stop().await?;
        let (heap, sweep) = {
            let db = db.to_owned();
            tokio::task::spawn_blocking(move || {
                anyhow::Ok((heap::world_bytes(&db)?, workload::sweep_duration(&db)?))
            })
            .await??
        };
        say(format!(
            "  projections in memory: {} jobs, {} MiB on the heap ({} MiB with redb open); a sweep takes {:.1} ms",
            heap.jobs,
            heap.world_bytes >> 20,
            heap.with_redb_bytes >> 20,
            sweep.as_secs_f64() * 1e3
        ));
        growth.push(Step {
            log_events: head,
            jobs: built.jobs,
            build: Rate::new(built.appended, built.elapsed),
            startup_ms,
            relay_catch_up,
            memory_loaded,
            run,
            rates,
            jobs_after,
            events_after,
            memory_after,
            heap,
            sweep_ms: sweep.as_secs_f64() * 1e3,
        });
    }
    Ok(growth)
}

/// Write back every dirty page on the machine (`sync`) before a
/// measurement, so that what an earlier phase wrote without fsync (a
/// default nats-server syncs every 2 minutes; the kernel writes dirty pages
/// back after 30 s) is not flushed during the next one, stalling its fsyncs.
async fn settle() -> Result<()> {
    let status = tokio::process::Command::new("sync").status().await?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(())
}

/// The closed loop, then (given the stream's context) the wait until the
/// stream holds its last event.
async fn closed(
    client: &async_nats::Client,
    js: Option<&jetstream::Context>,
    lanes: Vec<workload::Lane>,
    commands: u64,
    procs: &[(&str, u32)],
) -> Result<Run> {
    let cpu = procs::Meter::start(procs);
    let mut run = measure::closed_loop(client, lanes, commands).await;
    run.cpu = Some(cpu.stop());
    if run.failed > 0 {
        say(format!("warning: {} commands got no reply", run.failed));
    }
    if let Some(js) = js {
        let lag =
            measure::wait_for_stream(js, STREAM, run.last_seq, Duration::from_secs(300)).await?;
        run.stream_lag_after_last_ack_ms = lag.as_secs_f64() * 1e3;
    }
    Ok(run)
}

/// Extend the log offline, on a blocking thread.
async fn build(db: &Path, target: u64, lanes: &mut Lanes, batch: usize) -> Result<workload::Built> {
    let db = db.to_owned();
    let mut moved = lanes.clone();
    let (built, moved) = tokio::task::spawn_blocking(move || {
        (workload::extend_log(&db, target, &mut moved, batch), moved)
    })
    .await?;
    *lanes = moved;
    built
}

/// Every envelope of a log with the subject the relay publishes it on.
fn envelopes(db: &Path) -> Result<Vec<(String, Bytes)>> {
    let store = bcp::store::Store::open_existing(db)?;
    let mut out = Vec::new();
    store.for_each_event(|seq, bytes| {
        let env = bcp::store::decode_envelope(seq, bytes)?;
        out.push((env.subject(), Bytes::copy_from_slice(bytes)));
        Ok(true)
    })?;
    Ok(out)
}

/// Phase 5: replay and verify of `db`, bcp stopped, taking turns `repeats`
/// times; the runs of median rate.
async fn audit(b: &Bench, db: &Path) -> Result<(Cli, Cli)> {
    let replay_args = ["replay", "--format", "json", "--db"];
    let (mut verifies, mut replays) = (Vec::new(), Vec::new());
    for _ in 0..b.args.repeats {
        let verify = time_cli(&b.bcp_bin, &["audit", "verify", "--db"], db, &b.dir).await?;
        say(format!("audit verify: {:.0} events/s", verify.rate.per_sec));
        verifies.push(verify);
        let replay = time_cli(&b.bcp_bin, &replay_args, db, &b.dir).await?;
        say(format!("replay: {:.0} events/s", replay.rate.per_sec));
        replays.push(replay);
    }
    Ok((Cli::median(verifies), Cli::median(replays)))
}

/// Run `bcp ARGS DB` to completion (stdout discarded, stderr kept in the
/// temp dir); its rate is the log's events over its wall time.
async fn time_cli(bin: &Path, args: &[&str], db: &Path, dir: &Path) -> Result<Cli> {
    let events = {
        let db = db.to_owned();
        tokio::task::spawn_blocking(move || bcp::store::Store::open_existing(&db)?.event_count())
            .await??
    };
    let name = args[..args.len() - 1].join(" ");
    let log = dir.join(format!("bcp-{}.log", name.replace(' ', "-")));
    say(format!("bcp {name} on {events} events"));
    let started = Instant::now();
    let mut child = std::process::Command::new(bin)
        .args(args)
        .arg(db)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let pid = child.id();
    let mut peak = None;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if let Ok(m) = Memory::of(pid) {
            peak = Some(m.peak_rss_bytes);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = started.elapsed();
    if !status.success() {
        bail!(
            "bcp {name} exited with {status}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Ok(Cli {
        command: format!("bcp {} {}", args.join(" "), db.display()),
        rate: Rate::new(events, elapsed),
        rates: vec![events as f64 / elapsed.as_secs_f64().max(1e-9)],
        peak_rss_bytes: peak,
    })
}

/// Item 8: `--repeats` turns of a fresh single-node bcp and a fresh group
/// of three on a 3-node JetStream cluster, the same closed loop against
/// each.
async fn group_ack(b: &mut Bench) -> Result<GroupAck> {
    let (mut singles, mut groups) = (Vec::new(), Vec::new());
    let commands = b.args.growth_commands;
    for i in 0..b.args.repeats {
        let dir = b.dir.join(format!("single-{i}"));
        let nats = Nats::start(&b.nats_bin, &dir.join("nats"), false)?;
        let bcp = Bcp::start(
            &b.bcp_bin,
            &dir.join("bcp.redb"),
            &nats.url(),
            &dir.join("bcp.log"),
        )
        .await?;
        let client = async_nats::connect(nats.url()).await?;
        let js = jetstream::new(client.clone());
        let pids = [
            ("bcp serve", bcp.pid()),
            ("nats-server", nats.pid()),
            ("producers (bench)", 0),
        ];
        let lanes = b.lanes.take(b.args.in_flight);
        let run = replicated_run("single node", i, &client, &js, lanes, commands, &pids).await?;
        bcp.stop().await?;
        drop(nats);
        singles.push(run);

        let dir = b.dir.join(format!("group-{i}"));
        let cluster = Nats::start_cluster(&b.nats_bin, &dir).await?;
        let urls = cluster.iter().map(Nats::url).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        for n in 0..3 {
            let name = format!("b{n}");
            let args = [
                "--group",
                "bench",
                "--node",
                &name,
                "--stream-replicas",
                "3",
            ];
            let (db, log) = (
                dir.join(format!("{name}.redb")),
                dir.join(format!("{name}.log")),
            );
            nodes.push(Bcp::spawn(&b.bcp_bin, &db, &urls, &log, &args)?);
        }
        nodes[0].ready(&urls, &dir.join("b0.log")).await?;
        let client = async_nats::connect(urls.split(',').collect::<Vec<_>>()).await?;
        let js = jetstream::new(client.clone());
        let names = [
            "bcp node 0",
            "bcp node 1",
            "bcp node 2",
            "nats-server 0",
            "nats-server 1",
            "nats-server 2",
        ];
        let pids: Vec<(&str, u32)> = nodes
            .iter()
            .map(Bcp::pid)
            .chain(cluster.iter().map(Nats::pid))
            .zip(names)
            .map(|(pid, name)| (name, pid))
            .chain([("producers (bench)", 0)])
            .collect();
        let lanes = b.lanes.take(b.args.in_flight);
        let run = replicated_run("group of 3", i, &client, &js, lanes, commands, &pids).await?;
        for node in nodes {
            node.stop().await?;
        }
        drop(cluster);
        groups.push(run);
    }
    let (single, single_rates) = median_by(singles, |r| r.acked.per_sec);
    let (group, group_rates) = median_by(groups, |r| r.acked.per_sec);
    Ok(GroupAck {
        single,
        single_rates,
        group,
        group_rates,
    })
}

/// One closed loop of item 8, said as it ends.
async fn replicated_run(
    what: &str,
    i: usize,
    client: &async_nats::Client,
    js: &jetstream::Context,
    lanes: Vec<workload::Lane>,
    commands: u64,
    pids: &[(&str, u32)],
) -> Result<Run> {
    settle().await?;
    let run = closed(client, Some(js), lanes, commands, pids).await?;
    say(format!(
        "{what}, run {}: {:.0} commands/s, p50 {} µs, p99 {} µs",
        i + 1,
        run.acked.per_sec,
        run.latency.p50_us,
        run.latency.p99_us
    ));
    Ok(run)
}
