//! The processes the benchmark runs: nats-server (default sync, or
//! `sync_interval: always`), `bcp serve` and peer C, each on a free loopback port and
//! a store in the benchmark's temp dir, output captured in a log file there.
//! Children are killed on drop; `bcp serve` is stopped with SIGTERM (its
//! graceful drain) between phases.

use anyhow::{Context, Result, anyhow, bail};
use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const STARTUP: Duration = Duration::from_secs(120);

/// The nats-server binary, found as the tests find it; the benchmark never
/// runs without its baseline.
pub fn nats_server_bin() -> Result<PathBuf> {
    crate::shared_procs::find_nats_server().map_err(|e| anyhow!(e))
}

pub use crate::shared_procs::free_port;

/// `$BCP_BIN`, else the release build in the target dir. Refuses to run
/// without one (`just bench` builds it first) and warns when a source file
/// is newer than the binary.
pub fn bcp_bin() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = match std::env::var_os("BCP_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("release/bcp"),
    };
    if !bin.is_file() {
        bail!(
            "no bcp binary at {}: run `cargo build --release` first (`just bench` does), or set BCP_BIN",
            bin.display()
        );
    }
    let built = std::fs::metadata(&bin)?.modified()?;
    if let Some(newer) = newest_file(&root.join("src")).filter(|(t, _)| *t > built) {
        eprintln!(
            "warning: {} is newer than {}; the figures are of the older build",
            newer.1.display(),
            bin.display()
        );
    }
    Ok(bin)
}

fn newest_file(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry.metadata().ok()?.modified().ok().map(|t| (t, path))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

pub fn nats_server_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn log_file(path: &Path) -> Result<(File, File)> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    Ok((f.try_clone()?, f))
}

fn tail(path: &Path) -> String {
    crate::shared_procs::tail(path, 20)
}

/// A running nats-server with JetStream.
pub struct Nats {
    child: Child,
    port: u16,
}

impl Nats {
    /// Start one in `dir` (config, store and log there). `sync_always`:
    /// JetStream fsyncs every message (`sync_interval: always`); otherwise
    /// nats-server's default (a background sync every 2 minutes).
    pub fn start(bin: &Path, dir: &Path, sync_always: bool) -> Result<Nats> {
        Self::start_with(bin, dir, free_port(), sync_always, "")
    }

    /// Three servers forming one JetStream cluster on loopback (each in
    /// `dir/nN`); the JetStream API answers once they return.
    pub async fn start_cluster(bin: &Path, dir: &Path) -> Result<Vec<Nats>> {
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for i in 0..route_ports.len() {
            let name = format!("n{i}");
            let extra = crate::shared_procs::cluster_block(&name, "bcp-bench", i, &route_ports);
            servers.push(Self::start_with(
                bin,
                &dir.join(&name),
                free_port(),
                false,
                &extra,
            )?);
        }
        let client = async_nats::connect(servers[0].url()).await?;
        let deadline = Instant::now() + STARTUP;
        loop {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                client.request("$JS.API.INFO", "".into()),
            )
            .await;
            if let Ok(Ok(m)) = r
                && !String::from_utf8_lossy(&m.payload).contains("\"error\"")
            {
                return Ok(servers);
            }
            if Instant::now() > deadline {
                bail!("the JetStream cluster did not answer within {STARTUP:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start_with(
        bin: &Path,
        dir: &Path,
        port: u16,
        sync_always: bool,
        extra: &str,
    ) -> Result<Nats> {
        std::fs::create_dir_all(dir)?;
        let store = dir.join("jetstream");
        let sync = if sync_always {
            "\n  sync_interval: always"
        } else {
            ""
        };
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"{sync}\n}}\n{extra}",
            store.display()
        );
        let config_path = dir.join("nats-server.conf");
        std::fs::write(&config_path, config)?;
        let log = dir.join("nats-server.log");
        let (out, err) = log_file(&log)?;
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let deadline = Instant::now() + STARTUP;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("nats-server exited with {status}:\n{}", tail(&log));
            }
            if Instant::now() > deadline {
                bail!("nats-server did not listen on {port} within {STARTUP:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nats { child, port })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running peer (`peer.rs`): this bench binary with `--serve-peer-c` or
/// `--serve-peer-f`.
pub struct Peer {
    child: Child,
}

impl Peer {
    /// Start it with `args` (which peer, against which NATS URL) and wait
    /// until it says it is ready.
    pub fn start(args: &[&str], log: &Path) -> Result<Peer> {
        use std::io::BufRead;
        let exe = std::env::current_exe().context("the bench binary's path")?;
        let err = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("start the peer: {args:?}"))?;
        let out = child.stdout.take().expect("piped");
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("the peer ({args:?}) did not start:\n{}", tail(log));
        }
        Ok(Peer { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `bcp serve`.
pub struct Bcp {
    child: Option<Child>,
    log: PathBuf,
    /// From spawn until it answered a query and a command probe.
    pub startup: Duration,
    /// Its `--http` port (/metrics), when started with one.
    http_port: Option<u16>,
}

impl Bcp {
    /// Start `bcp serve --db DB --nats URL` and wait until it answers.
    /// With `--http` on a free loopback port, for
    /// [`Bcp::command_seconds`].
    pub async fn start(bin: &Path, db: &Path, url: &str, log: &Path) -> Result<Bcp> {
        let port = crate::shared_procs::free_port();
        let http = format!("127.0.0.1:{port}");
        let mut bcp = Self::spawn(bin, db, url, log, &["--http", &http])?;
        bcp.http_port = Some(port);
        bcp.ready(url, log).await?;
        Ok(bcp)
    }

    /// Its `bcp_command_seconds` histogram now: each command's time inside
    /// bcp serve, from the intake queue to its reply being sent.
    pub async fn command_seconds(&self) -> Result<crate::measure::Buckets> {
        let port = self
            .http_port
            .ok_or_else(|| anyhow!("bcp serve was started without --http"))?;
        let (status, body) = crate::shared_procs::http_get(port, "/metrics")
            .await
            .map_err(|e| anyhow!(e))?;
        if status != 200 {
            bail!("GET /metrics: status {status}");
        }
        crate::measure::Buckets::parse(&body, "bcp_command_seconds")
    }

    /// Start `bcp serve` with `extra` arguments, not waiting for it.
    pub fn spawn(bin: &Path, db: &Path, url: &str, log: &Path, extra: &[&str]) -> Result<Bcp> {
        let (out, err) = log_file(log)?;
        let log_filter = std::env::var("BCP_BENCH_LOG").unwrap_or_else(|_| "info".into());
        let child = crate::shared_procs::serve_command(bin, db, url)
            .args(extra)
            .env("RUST_LOG", log_filter)
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Bcp {
            child: Some(child),
            log: log.to_owned(),
            startup: Duration::ZERO,
            http_port: None,
        })
    }

    /// Wait until `url` answers a query and a command probe (in a group:
    /// until one node leads).
    pub async fn ready(&mut self, url: &str, log: &Path) -> Result<()> {
        let started = Instant::now();
        let bcp = self;
        let servers: Vec<&str> = url.split(',').collect();
        let client = async_nats::connect(servers).await?;
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = bcp.child()?.try_wait()? {
                bail!(
                    "bcp serve exited with {status} while starting:\n{}",
                    tail(log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "bcp serve did not answer within {STARTUP:?}:\n{}",
                    tail(log)
                );
            }
            // A query for a job that does not exist, and a command body that
            // is a bad_request (appends nothing): both answered means
            // queries and intake are up. (Not `bcp.query.jobs`: its reply
            // outgrows NATS's 1 MiB payload limit at a few thousand jobs.)
            let short = Duration::from_millis(500);
            let nil = r#"{"job_id":"00000000-0000-0000-0000-000000000000"}"#;
            let q = tokio::time::timeout(short, client.request("bcp.query._admin.job", nil.into()));
            let c = tokio::time::timeout(short, client.request("bcp.cmd.ready.start", "{}".into()));
            let (q, c) = tokio::join!(q, c);
            let ok = |r: Result<Result<async_nats::Message, _>, _>, want: &str| {
                r.ok()
                    .and_then(|r| r.ok())
                    .is_some_and(|m| String::from_utf8_lossy(&m.payload).contains(want))
            };
            if ok(q, "not_found") && ok(c, "bad_request") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bcp.startup = started.elapsed();
        Ok(())
    }

    fn child(&mut self) -> Result<&mut Child> {
        self.child
            .as_mut()
            .ok_or_else(|| anyhow!("bcp serve is not running"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Resident memory of the process now and at its peak (kB → bytes).
    pub fn memory(&self) -> Result<Memory> {
        Memory::of(self.pid())
    }

    /// SIGTERM and wait for the drain to finish (exit 0).
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed");
        }
        let deadline = Instant::now() + STARTUP;
        let log = self.log.clone();
        let child = self.child()?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                if !status.success() {
                    bail!(
                        "bcp serve exited with {status} after SIGTERM:\n{}",
                        tail(&log)
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("bcp serve did not exit within {STARTUP:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Bcp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `VmRSS` and `VmHWM` (peak) from /proc/PID/status.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Memory {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        let kb = |key: &str| -> Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(key))
                .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))?;
            let n = line
                .split_whitespace()
                .nth(1)
                .ok_or_else(|| anyhow!("bad line {line:?}"))?;
            Ok(n.parse::<u64>()? * 1024)
        };
        Ok(Memory {
            rss_bytes: kb("VmRSS:")?,
            peak_rss_bytes: kb("VmHWM:")?,
        })
    }
}

/// CPU time (user + system) a process has used so far, in seconds; `None`
/// once it is gone. `pid` 0 is the benchmark itself.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks (100 per second on
    // Linux unless the kernel says otherwise).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Bytes a process has caused to be written to storage so far
/// (`write_bytes` of /proc/PID/io). `pid` 0 is the benchmark itself.
pub fn written_bytes(pid: u32) -> Option<u64> {
    let path = if pid == 0 {
        "/proc/self/io".to_owned()
    } else {
        format!("/proc/{pid}/io")
    };
    let io = std::fs::read_to_string(path).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Context switches (voluntary and not) of every thread of a process so
/// far (/proc/PID/task/*/status; a thread that ended takes its count with
/// it); `None` once the process is gone. `pid` 0 is the benchmark itself.
pub fn switches(pid: u32) -> Option<u64> {
    let dir = if pid == 0 {
        "/proc/self/task".to_owned()
    } else {
        format!("/proc/{pid}/task")
    };
    let mut total = 0;
    for thread in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(thread.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// What one process used over an interval.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProcUse {
    pub name: String,
    /// CPU time over wall time: 1.0 is one core busy throughout.
    pub cores: f64,
    /// Bytes written to storage (after the page cache) over the interval.
    pub written_bytes: u64,
    /// Context switches of its threads over the interval: each is a thread
    /// put to sleep or woken, the cost of a hop between threads.
    pub switches: u64,
}

/// What some processes used over an interval, and what the rest of the
/// machine did meanwhile (other people's builds and tests disturb timing on
/// a shared machine; this says how much).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Usage {
    pub procs: Vec<ProcUse>,
    /// Cores busy in every other process (and the kernel on their behalf).
    pub others_cores: f64,
    /// Cores idle while some I/O was outstanding (iowait).
    pub iowait_cores: f64,
    pub nproc: usize,
    pub secs: f64,
}

/// Machine-wide CPU time from /proc/stat: (busy, iowait), in seconds.
fn machine_cpu_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy / clock_ticks(), at(4) / clock_ticks())
}

/// Start of a CPU and I/O measurement over some processes.
pub struct Meter {
    started: Instant,
    machine: (f64, f64),
    at_start: Vec<(String, u32, f64, u64, u64)>,
}

impl Meter {
    pub fn start(procs: &[(&str, u32)]) -> Meter {
        Meter {
            started: Instant::now(),
            machine: machine_cpu_secs(),
            at_start: procs
                .iter()
                .map(|(name, pid)| {
                    let cpu = cpu_secs(*pid).unwrap_or(0.0);
                    let written = written_bytes(*pid).unwrap_or(0);
                    let switched = switches(*pid).unwrap_or(0);
                    (name.to_string(), *pid, cpu, written, switched)
                })
                .collect(),
        }
    }

    pub fn stop(self) -> Usage {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let (busy, iowait) = machine_cpu_secs();
        let procs: Vec<ProcUse> = self
            .at_start
            .into_iter()
            .map(|(name, pid, cpu, written, switched)| ProcUse {
                name,
                cores: (cpu_secs(pid).unwrap_or(cpu) - cpu) / wall,
                written_bytes: written_bytes(pid)
                    .unwrap_or(written)
                    .saturating_sub(written),
                switches: switches(pid).unwrap_or(switched).saturating_sub(switched),
            })
            .collect();
        let ours: f64 = procs.iter().map(|p| p.cores).sum();
        Usage {
            procs,
            others_cores: ((busy - self.machine.0) / wall - ours).max(0.0),
            iowait_cores: (iowait - self.machine.1) / wall,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            secs: wall,
        }
    }
}
