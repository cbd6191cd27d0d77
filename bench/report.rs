//! The machine a run was made on, and the results as one markdown table:
//! each bcp figure beside its baseline (as a ratio) and issue 5's target.

use crate::measure::{Latency, Run};
use crate::{Machine, Results};
use std::fmt::Write;
use std::path::Path;
use std::process::Command;

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn machine(nats_bin: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let mem_total_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let dirty =
        !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        mem_total_bytes,
        nats_server: crate::procs::nats_server_version(nats_bin),
        kernel: command_output("uname", &["-sr"]),
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        git: format!(
            "{}{}",
            command_output("git", &["rev-parse", "--short", "HEAD"]),
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        ),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

/// 1234567.8 → "1,234,568".
pub fn int(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1e3)
}

fn lat4(l: &Latency) -> String {
    format!(
        "{} / {} / {} / {} ms",
        ms(l.p50_us),
        ms(l.p95_us),
        ms(l.p99_us),
        ms(l.max_us)
    )
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".to_owned()
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

fn cpu_cell(u: &crate::procs::Usage) -> String {
    let parts: Vec<String> = u
        .procs
        .iter()
        .map(|p| format!("{} {:.2}", p.name, p.cores))
        .collect();
    let total: f64 = u.procs.iter().map(|p| p.cores).sum();
    format!(
        "{} = {total:.2} of {} (other processes {:.2}, iowait {:.2})",
        parts.join(" + "),
        u.nproc,
        u.others_cores,
        u.iowait_cores
    )
}

/// Bytes written to storage per unit of work, by the process named first.
fn written_per(u: &crate::procs::Usage, units: u64) -> String {
    match u.procs.first() {
        Some(p) if units > 0 => format!(
            "{} bytes/{}",
            int(p.written_bytes as f64 / units as f64),
            if p.name.starts_with("bcp") {
                "command"
            } else {
                "message"
            }
        ),
        _ => "–".to_owned(),
    }
}

/// "; median of 3: 8,100 / 9,000 / 8,700" (every run's rate, in the order
/// they ran), or nothing for a single run.
/// Every round's ratio beside a median ratio (nothing for one round).
pub fn of_ratios(ratios: &[f64]) -> String {
    of_all(ratios, |r| format!("{r:.2}×"))
}

/// Every run's rate beside a median rate (nothing for one run).
pub fn of_runs(rates: &[f64]) -> String {
    of_all(rates, int)
}

fn of_all(values: &[f64], show: impl Fn(f64) -> String) -> String {
    if values.len() < 2 {
        return String::new();
    }
    let all: Vec<String> = values.iter().map(|&v| show(v)).collect();
    format!("; median of {}: {}", values.len(), all.join(" / "))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Bytes of resident memory per additional job between the first and the
/// last growth step (after each measured run).
pub fn bytes_per_job(r: &Results) -> Option<f64> {
    let (first, last) = (r.growth.first()?, r.growth.last()?);
    let dj = last.jobs_after.checked_sub(first.jobs_after)?;
    (dj > 0).then(|| {
        (last.memory_after.rss_bytes as f64 - first.memory_after.rss_bytes as f64) / dj as f64
    })
}

/// bcp serve's own share of a run's latency ([`crate::measure::Inside`]),
/// for a line of text; empty when it was not measured.
pub fn inside(run: &Run) -> String {
    run.inside_bcp.map_or(String::new(), |i| {
        format!(
            "; inside bcp serve (intake queue → reply sent) p50/p99 {}/{} µs",
            i.p50_us, i.p99_us
        )
    })
}

fn run_counts(run: &Run) -> String {
    let mut s = format!("{} ok", int(run.ok as f64));
    for (n, what) in [
        (run.rejected, "rejected"),
        (run.unavailable, "unavailable"),
        (run.failed, "no reply"),
    ] {
        if n > 0 {
            let _ = write!(s, ", {} {what}", int(n as f64));
        }
    }
    if run.slow_over_50ms > 0 {
        let _ = write!(s, "; {} over 50 ms", int(run.slow_over_50ms as f64));
    }
    if let Some(cpu) = &run.cpu {
        let _ = write!(s, "; other processes {:.2} cores", cpu.others_cores);
    }
    s
}

pub fn table(r: &Results) -> String {
    let mut t = String::new();
    let m = &r.machine;
    let _ = writeln!(
        t,
        "bcp benchmark{} — {} · {} cores {} · {:.0} GiB RAM · {} · load {} → {} · {:.0} s\n",
        if r.args.quick { " (--quick)" } else { "" },
        m.date,
        m.nproc,
        m.cpu,
        m.mem_total_bytes as f64 / (1u64 << 30) as f64,
        m.nats_server,
        m.loadavg_start,
        m.loadavg_end,
        r.elapsed_secs,
    );
    let _ = writeln!(
        t,
        "Envelopes {:.0} bytes on average; {} producers / publishes in flight; 1 command = 1 event; ids {}.\n",
        r.envelope_bytes_mean,
        r.args.in_flight,
        match r.args.ids {
            crate::Ids::Ordered => "UUIDv7 (time-ordered)",
            crate::Ids::Random => "UUIDv4 (random, `--ids random`)",
            crate::Ids::Mixed => "UUIDv7, one producer in eight UUIDv4 (`--ids mixed`)",
        }
    );
    let _ = writeln!(
        t,
        "| # | figure | bcp | baseline | bcp ÷ baseline | target | |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    let e2e = r.e2e.acked.per_sec;
    let b = r.baseline_b.rate.per_sec;
    let bs = r.baseline_b_sync.rate.per_sec;
    let row = |t: &mut String, cells: [&str; 7]| {
        let _ = writeln!(t, "| {} |", cells.join(" | "));
    };
    for (l, a) in r.ledger_a.iter().zip(&r.baseline_a) {
        row(
            &mut t,
            [
                "1",
                &format!(
                    "`Pipeline::execute` alone (no NATS), {} commands/commit",
                    l.batch
                ),
                &format!("{}/s", int(l.rate.per_sec)),
                &format!(
                    "A: {} events/s (raw redb, {}/commit)",
                    int(a.rate.per_sec),
                    a.batch
                ),
                &ratio(l.rate.per_sec, a.rate.per_sec),
                "–",
                "",
            ],
        );
        // A phase-1 latency row: bcp's p50 / p99 beside baseline A's.
        let pair = |t: &mut String, figure: &str, bcp: &Latency, a_label: &str, a: &Latency| {
            row(
                t,
                [
                    "1",
                    figure,
                    &format!("{} / {} ms", ms(bcp.p50_us), ms(bcp.p99_us)),
                    &format!("A: {a_label}{} / {} ms", ms(a.p50_us), ms(a.p99_us)),
                    &ratio(bcp.p50_us as f64, a.p50_us as f64),
                    "–",
                    "",
                ],
            )
        };
        pair(
            &mut t,
            &format!("… time per batch of {}: p50 / p99", l.batch),
            &l.execute,
            "commit ",
            &a.commit,
        );
        pair(
            &mut t,
            "… of which `Store::commit` (bcp serve's commit thread): p50 / p99",
            &l.commit,
            "commit ",
            &a.commit,
        );
        let (lw, aw) = (l.bytes_per_event(), a.bytes_per_event());
        row(
            &mut t,
            [
                "1",
                &format!("… bytes written to disk per event, {}/commit", l.batch),
                &int(lw),
                &format!("A: {}", int(aw)),
                &ratio(lw, aw),
                "–",
                "",
            ],
        );
        pair(
            &mut t,
            "… CPU per write transaction (rows and commit; A: inserts and commit), on its thread: p50 / p99",
            &l.commit_cpu,
            "",
            &a.commit_cpu,
        );
        let (lm, am) = (l.mean_cpu_with_checkpoint_us(), a.commit_cpu.mean_us as f64);
        row(
            &mut t,
            [
                "1",
                "… the same, mean, with the checkpoint closing the run spread over it (the job rows still held behind)",
                &format!("{} ms{}", ms(lm.round() as u64), of_ratios(&l.cpu_ratios)),
                &format!("A: {} ms", ms(a.commit_cpu.mean_us)),
                &ratio(lm, am),
                "≤ 1.5× (issue 14)",
                verdict(lm <= 1.5 * am),
            ],
        );
    }
    let e2e_s = format!(
        "{}/s ({}{})",
        int(e2e),
        run_counts(&r.e2e),
        of_runs(&r.e2e_rates)
    );
    let c = r.peer_c.acked.per_sec;
    row(
        &mut t,
        [
            "3",
            "durable commands/s, end to end",
            &e2e_s,
            &format!(
                "**C: {} commands/s** (JetStream-backed request/reply service{})",
                int(c),
                of_runs(&r.peer_c_rates)
            ),
            &format!("**{}**", ratio(e2e, c)),
            "≥ 1.0× (issue 14)",
            verdict(e2e >= c),
        ],
    );
    // Beside the end-to-end rate: the floors (what bcp's contract costs
    // with nothing of bcp's in it) and raw JetStream, each with its target
    // (a floor has none).
    let floor = |name: &str, what: &str, run: &Run, rates: &[f64]| {
        let rate = run.acked.per_sec;
        let text = format!(
            "{name}: {} commands/s ({what}{}; {name} ÷ C {})",
            int(rate),
            of_runs(rates),
            ratio(rate, c)
        );
        (text, rate, "–", None)
    };
    let beside = [
        floor(
            "R",
            "raw redb fsynced before the reply, every command on JetStream after it: the floor of bcp's contract",
            &r.peer_r,
            &r.peer_r_rates,
        ),
        floor(
            "F",
            "a flat file fsynced before the reply, no JetStream: the floor of the sync",
            &r.peer_f,
            &r.peer_f_rates,
        ),
        (
            format!(
                "B: {} msgs/s (JetStream, default sync{})",
                int(b),
                of_runs(&r.baseline_b_rates)
            ),
            b,
            "≥ 1.0× (issue 5)",
            Some(e2e >= b),
        ),
        (
            format!(
                "B′: {} msgs/s (JetStream, sync always{})",
                int(bs),
                of_runs(&r.baseline_b_sync_rates)
            ),
            bs,
            "≥ 10× (issue 5)",
            Some(e2e >= 10.0 * bs),
        ),
    ];
    for (what, rate, target, met) in beside {
        row(
            &mut t,
            [
                "3",
                "",
                "",
                &what,
                &ratio(e2e, rate),
                target,
                met.map_or("", verdict),
            ],
        );
    }
    // Beside the busy batch sizes only: a 1-event commit is no rate a log
    // would be written at under load.
    for a in r.baseline_a.iter().filter(|a| a.batch >= 64) {
        row(
            &mut t,
            [
                "3",
                "",
                "",
                &format!(
                    "A: {} events/s (raw redb, {}/commit)",
                    int(a.rate.per_sec),
                    a.batch
                ),
                &ratio(e2e, a.rate.per_sec),
                "–",
                "",
            ],
        );
    }
    let peers = [
        ("C", &r.peer_c.latency),
        ("B", &r.baseline_b.latency),
        ("B′", &r.baseline_b_sync.latency),
    ];
    for (i, (name, latency)) in peers.into_iter().enumerate() {
        let (figure, ours) = match i {
            0 => ("ack latency p50 / p95 / p99 / max", lat4(&r.e2e.latency)),
            _ => ("", String::new()),
        };
        row(
            &mut t,
            [
                "3",
                figure,
                &ours,
                &format!("{name}: {}", lat4(latency)),
                &ratio(r.e2e.latency.p99_us as f64, latency.p99_us as f64),
                "–",
                "",
            ],
        );
    }
    row(
        &mut t,
        [
            "3",
            "stream holds every event, after the last ack",
            &format!("{:.0} ms", r.e2e.stream_lag_after_last_ack_ms),
            "",
            "",
            "–",
            "",
        ],
    );
    if let Some(cpu) = &r.e2e.cpu {
        row(
            &mut t,
            [
                "3",
                "CPU used during the run (cores)",
                &cpu_cell(cpu),
                &format!(
                    "C: {}; B: {}",
                    r.peer_c.cpu.as_ref().map_or(String::new(), cpu_cell),
                    cpu_cell(&r.baseline_b.cpu)
                ),
                "",
                "–",
                "",
            ],
        );
        let a64 = r.baseline_a.iter().find(|a| a.batch == 64);
        row(
            &mut t,
            [
                "3",
                "bytes written to disk per command (after the page cache)",
                &written_per(cpu, r.e2e.acked.count),
                &format!(
                    "B′: {}; A: {} bytes/event ({}/commit)",
                    written_per(&r.baseline_b_sync.cpu, r.baseline_b_sync.rate.count),
                    int(a64.map_or(0.0, crate::measure::Appends::bytes_per_event)),
                    a64.map_or(0, |a| a.batch)
                ),
                "",
                "–",
                "",
            ],
        );
    }
    let floors = r.peer_r_fixed_load.iter().zip(&r.peer_f_fixed_load);
    for (((share, run), c), (fr, ff)) in r.fixed_load.iter().zip(&r.peer_c_fixed_load).zip(floors) {
        let p99 = run.latency.p99_us;
        let is_half = (*share - 0.5).abs() < 1e-9;
        row(
            &mut t,
            [
                "4",
                &format!(
                    "p50 / p99 at {:.0} % load ({}/s offered, {}/s done)",
                    share * 100.0,
                    int(run.offered_per_sec.unwrap_or(0.0)),
                    int(run.acked.per_sec)
                ),
                &format!(
                    "{} / {} ms ({})",
                    ms(run.latency.p50_us),
                    ms(p99),
                    run_counts(run)
                ),
                &format!(
                    "C at that rate: {} / {} ms; R: {} / {} ms; F: {} / {} ms",
                    ms(c.latency.p50_us),
                    ms(c.latency.p99_us),
                    ms(fr.latency.p50_us),
                    ms(fr.latency.p99_us),
                    ms(ff.latency.p50_us),
                    ms(ff.latency.p99_us)
                ),
                &format!("p99 {}", ratio(p99 as f64, c.latency.p99_us as f64)),
                if is_half { "p99 < 5 ms" } else { "–" },
                if is_half { verdict(p99 < 5_000) } else { "" },
            ],
        );
        if let Some(i) = run.inside_bcp {
            row(
                &mut t,
                [
                    "4",
                    "… of which inside bcp serve (intake queue → reply sent, `bcp_command_seconds`): p50 / p99",
                    &format!(
                        "{} / {} ms ({} commands; the rest is outside bcp's intake-to-reply path)",
                        ms(i.p50_us),
                        ms(i.p99_us),
                        int(i.commands as f64)
                    ),
                    "",
                    "",
                    "–",
                    "",
                ],
            );
        }
    }
    for (name, cli) in [
        ("audit verify", &r.verify),
        ("replay --format json", &r.replay),
    ] {
        row(
            &mut t,
            [
                "5",
                &format!("`bcp {name}`, {} events", int(cli.rate.count as f64)),
                &format!(
                    "{}/s ({:.2} s{}{})",
                    int(cli.rate.per_sec),
                    cli.rate.secs,
                    cli.peak_rss_bytes
                        .map_or(String::new(), |p| format!(", peak RSS {}", mib(p))),
                    of_runs(&cli.rates)
                ),
                "",
                "",
                "≥ 1,000,000/s",
                verdict(cli.rate.per_sec >= 1e6),
            ],
        );
    }
    let base = r.growth.first().map_or(0.0, |s| s.run.acked.per_sec);
    for (i, s) in r.growth.iter().enumerate() {
        let last = i + 1 == r.growth.len();
        row(
            &mut t,
            [
                "6",
                &format!(
                    "log at {} events, {} jobs: commands/s, p99",
                    int(s.log_events as f64),
                    int(s.jobs as f64)
                ),
                &format!(
                    "{}/s, {} ms ({}{})",
                    int(s.run.acked.per_sec),
                    ms(s.run.latency.p99_us),
                    run_counts(&s.run),
                    of_runs(&s.rates)
                ),
                &format!(
                    "at {} events: {}/s",
                    int(r.growth[0].log_events as f64),
                    int(base)
                ),
                &ratio(s.run.acked.per_sec, base),
                if last { "≥ 0.90×" } else { "–" },
                if last {
                    verdict(s.run.acked.per_sec >= 0.9 * base)
                } else {
                    ""
                },
            ],
        );
    }
    for s in &r.growth {
        row(
            &mut t,
            [
                "6",
                &format!(
                    "restart on {} events: startup; relay catch-up",
                    int(s.log_events as f64)
                ),
                &format!(
                    "{:.0} ms; {}/s",
                    s.startup_ms,
                    int(s.relay_catch_up.per_sec)
                ),
                &format!("B: {} msgs/s", int(b)),
                &ratio(s.relay_catch_up.per_sec, b),
                "–",
                "",
            ],
        );
    }
    for s in &r.growth {
        row(
            &mut t,
            [
                "6",
                &format!(
                    "one idle retention sweep over {} jobs (holds the writer)",
                    int(s.heap.jobs as f64)
                ),
                &format!("{:.1} ms", s.sweep_ms),
                "",
                "",
                "–",
                "",
            ],
        );
    }
    row(
        &mut t,
        [
            "7",
            "`bcp serve` RSS on an empty log",
            &mib(r.memory_empty.rss_bytes),
            "",
            "",
            "–",
            "",
        ],
    );
    for s in &r.growth {
        row(
            &mut t,
            [
                "7",
                &format!(
                    "`bcp serve` RSS / peak (VmHWM), {} jobs, {} events",
                    int(s.jobs_after as f64),
                    int(s.events_after as f64)
                ),
                &format!(
                    "{} / {}",
                    mib(s.memory_after.rss_bytes),
                    mib(s.memory_after.peak_rss_bytes)
                ),
                "",
                "",
                "–",
                "",
            ],
        );
    }
    if let Some(bpj) = bytes_per_job(r) {
        row(
            &mut t,
            [
                "7",
                "`bcp serve` RSS per added job (slope, first → last step)",
                &format!("{} bytes", int(bpj)),
                "",
                "",
                "–",
                "",
            ],
        );
    }
    for s in &r.growth {
        let h = &s.heap;
        let per_job = h.world_bytes as f64 / h.jobs.max(1) as f64;
        let cell = format!(
            "{} ({} bytes/job; {} with redb open)",
            mib(h.world_bytes),
            int(per_job),
            mib(h.with_redb_bytes)
        );
        let what = format!(
            "projections held in memory (`World`, heap), {} jobs",
            int(h.jobs as f64)
        );
        row(
            &mut t,
            ["7", &what, &cell, "", "", "grows with jobs, not events", ""],
        );
    }
    t.push('\n');
    t += &group_rows(&r.group);
    t
}

/// Item 8: single node beside a group of three (replicated ack).
pub fn group_rows(g: &crate::GroupAck) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| 8 | replicated ack | commands/s (runs) | p50 / p99 | group ÷ single |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|");
    for (what, run, rates) in [
        (
            "single node (fsync, then reply)",
            &g.single,
            &g.single_rates,
        ),
        (
            "group of 3, `--stream-replicas 3` (fsync + JetStream quorum ack, then reply)",
            &g.group,
            &g.group_rates,
        ),
    ] {
        let _ = writeln!(
            t,
            "| 8 | {what} | {}{} | {} / {} | {} |",
            int(run.acked.per_sec),
            of_runs(rates),
            ms(run.latency.p50_us),
            ms(run.latency.p99_us),
            ratio(run.acked.per_sec, g.single.acked.per_sec)
        );
    }
    t
}
