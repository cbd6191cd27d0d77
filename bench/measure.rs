//! The measurements: the two baselines (raw redb appends, raw JetStream
//! publishes) and bcp end to end (closed loop at a fixed number of commands
//! in flight, and open loop at a fixed offered rate).

use crate::workload::{Cmd, Lane};
use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
}

impl Latency {
    pub fn of(mut us: Vec<u64>) -> Latency {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        let at = |q: f64| us[((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1];
        Latency {
            samples: us.len(),
            p50_us: at(0.50),
            p95_us: at(0.95),
            p99_us: at(0.99),
            max_us: *us.last().expect("not empty"),
            mean_us: us.iter().sum::<u64>() / us.len() as u64,
        }
    }
}

/// Time the calling thread has spent on a CPU so far, in microseconds:
/// user and kernel time, not time blocked on the disk.
///
/// `CLOCK_THREAD_CPUTIME_ID`, which brings the running thread's account up
/// to date before it answers. `/proc/thread-self/schedstat`, read before,
/// does not: it lags by whatever the thread ran since it last slept or
/// took a tick, so a commit timed after a stretch of deciding was charged
/// with that deciding too (phase 1 read bcp's write transaction as 3.7×
/// raw redb's CPU; with bcp writing only the events, 2.8× where the profile
/// showed about the same).
pub fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant Linux supports for the calling thread.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// A throughput figure: `count` things in `secs`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rate {
    pub count: u64,
    pub secs: f64,
    pub per_sec: f64,
}

impl Rate {
    pub fn new(count: u64, elapsed: Duration) -> Rate {
        let secs = elapsed.as_secs_f64();
        Rate {
            count,
            secs,
            per_sec: count as f64 / secs.max(1e-9),
        }
    }
}

// ---------------------------------------------------------------- baseline A

/// What baseline A measured at one batch size.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Appends {
    pub batch: u64,
    pub rate: Rate,
    /// Duration of each `commit()` (the fsync and page writes): the floor
    /// under any durable ack on this disk.
    pub commit: Latency,
    /// CPU time of each write transaction (inserts and commit), on its
    /// thread: the kernel's page writes included, the wait for the disk not.
    /// Comparable with `Store::commit`, which also writes its rows.
    pub commit_cpu: Latency,
    /// Bytes written to storage by the appends.
    pub written_bytes: u64,
}

impl Appends {
    /// Bytes written to storage per event appended.
    pub fn bytes_per_event(&self) -> f64 {
        per_event(self.written_bytes, &self.rate)
    }
}

/// `bytes` spread over the events `rate` counted (baseline A and bcp's
/// write transaction alike).
pub fn per_event(bytes: u64, rate: &Rate) -> f64 {
    bytes as f64 / rate.count.max(1) as f64
}

/// Baseline A: `events` appends of the sample envelopes (cycled, keyed by a
/// u64 seq like bcp's events table) into a fresh redb file, `batch` per
/// write transaction, every commit `Durability::Immediate`. Nothing else:
/// no decide, no hashing, no projections, no idempotency records.
pub fn redb_appends(path: &Path, samples: &[Bytes], events: u64, batch: u64) -> Result<Appends> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
    let db = redb::Database::create(path)?;
    let mut commits = Vec::new();
    let mut commit_cpus = Vec::new();
    let written = crate::procs::written_bytes(0).unwrap_or(0);
    let started = Instant::now();
    let mut seq = 0u64;
    while seq < events {
        let cpu = thread_cpu_us();
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        {
            let mut t = txn.open_table(TABLE)?;
            for _ in 0..batch.min(events - seq) {
                seq += 1;
                let bytes = &samples[seq as usize % samples.len()];
                t.insert(seq, bytes.as_ref())?;
            }
        }
        let t = Instant::now();
        txn.commit()?;
        commits.push(micros(t.elapsed()));
        commit_cpus.push(thread_cpu_us() - cpu);
    }
    Ok(Appends {
        batch,
        rate: Rate::new(seq, started.elapsed()),
        commit: Latency::of(commits),
        commit_cpu: Latency::of(commit_cpus),
        written_bytes: crate::procs::written_bytes(0)
            .unwrap_or(0)
            .saturating_sub(written),
    })
}

// ---------------------------------------------------------------- baseline B

/// What baseline B (and B′) measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Publish {
    pub rate: Rate,
    /// Publish to ack, per message, awaited in order (as a pipelined
    /// publisher sees it).
    pub latency: Latency,
    /// CPU used by nats-server and the publisher during the run.
    pub cpu: crate::procs::Usage,
}

/// A fresh stream of the shape of bcp's own (src/service/guard.rs): file
/// storage, `bcp.evt.>`, no deletes or purges.
fn baseline_stream(name: &str) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec!["bcp.evt.>".to_owned()],
        storage: stream::StorageType::File,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

/// A connection to `nats` and its JetStream, `config`'s stream created.
async fn connect_with_stream(
    nats: &crate::procs::Nats,
    config: stream::Config,
) -> Result<(async_nats::Client, jetstream::Context)> {
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let name = config.name.clone();
    js.create_stream(config)
        .await
        .with_context(|| format!("create the stream {name}"))?;
    Ok((client, js))
}

/// Baseline B: publish `msgs` of the sample envelopes (subject as bcp's
/// relay would use) to a fresh file-storage stream, `window` acks in flight,
/// awaited in order. With `fence` off, no headers: the cheapest durable-ish
/// publish a user could do by hand. With it, each message carries
/// `Nats-Expected-Last-Sequence` as the relay's do, for a like-for-like
/// comparison with [`jetstream_fast_batch`].
pub async fn jetstream_publish(
    nats: &crate::procs::Nats,
    samples: &[(String, Bytes)],
    msgs: u64,
    window: usize,
    fence: bool,
) -> Result<Publish> {
    let (_, js) = connect_with_stream(nats, baseline_stream("BASELINE")).await?;
    let mut in_flight: VecDeque<(Instant, PublishAckFuture)> = VecDeque::with_capacity(window);
    let mut lat = Vec::with_capacity(msgs as usize);
    let cpu = crate::procs::Meter::start(&[("nats-server", nats.pid()), ("publisher (bench)", 0)]);
    let started = Instant::now();
    for i in 0..msgs {
        if in_flight.len() >= window {
            let (sent, ack) = in_flight.pop_front().expect("not empty");
            ack.await.context("publish ack")?;
            lat.push(micros(sent.elapsed()));
        }
        let (subject, payload) = &samples[i as usize % samples.len()];
        let sent = Instant::now();
        let ack = if fence {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Expected-Last-Sequence", i.to_string().as_str());
            js.publish_with_headers(subject.clone(), headers, payload.clone())
                .await
        } else {
            js.publish(subject.clone(), payload.clone()).await
        }
        .context("publish")?;
        in_flight.push_back((sent, ack));
    }
    while let Some((sent, ack)) = in_flight.pop_front() {
        ack.await.context("publish ack")?;
        lat.push(micros(sent.elapsed()));
    }
    let rate = Rate::new(msgs, started.elapsed());
    Ok(Publish {
        rate,
        latency: Latency::of(lat),
        cpu: cpu.stop(),
    })
}

/// The relay's alternative (issue 14): the same messages as JetStream
/// atomic batches (nats-server 2.12+, stream `allow_atomic`) of `batch`
/// messages, one ack per batch at its commit, `window` batches in flight.
/// The first message of each batch carries `Nats-Expected-Last-Sequence`,
/// as the relay would need to keep stream seq == log seq; the others go
/// without a reply subject. Latency is per batch, publish of its first
/// message to the ack of its commit.
pub async fn jetstream_atomic_batches(
    nats: &crate::procs::Nats,
    samples: &[(String, Bytes)],
    msgs: u64,
    batch: u64,
    window: usize,
) -> Result<Publish> {
    let (client, js) = connect_with_stream(
        nats,
        stream::Config {
            allow_atomic_publish: true,
            ..baseline_stream("BASELINE_BATCHED")
        },
    )
    .await?;
    let mut in_flight: VecDeque<(Instant, PublishAckFuture)> = VecDeque::with_capacity(window);
    let mut lat = Vec::new();
    let cpu = crate::procs::Meter::start(&[("nats-server", nats.pid()), ("publisher (bench)", 0)]);
    let started = Instant::now();
    let mut sent_msgs = 0u64;
    let mut batches = 0u64;
    while sent_msgs < msgs {
        if in_flight.len() >= window {
            let (sent, ack) = in_flight.pop_front().expect("not empty");
            ack.await.context("batch commit ack")?;
            lat.push(micros(sent.elapsed()));
        }
        let n = batch.min(msgs - sent_msgs);
        let id = format!("b{batches}");
        let sent = Instant::now();
        for i in 1..=n {
            let (subject, payload) = &samples[(sent_msgs + i - 1) as usize % samples.len()];
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", i.to_string().as_str());
            if i == 1 {
                headers.insert(
                    "Nats-Expected-Last-Sequence",
                    sent_msgs.to_string().as_str(),
                );
            }
            if i < n {
                client
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .context("publish in a batch")?;
            } else {
                headers.insert("Nats-Batch-Commit", "1");
                let ack = js
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .context("publish a batch's commit")?;
                in_flight.push_back((sent, ack));
            }
        }
        sent_msgs += n;
        batches += 1;
    }
    while let Some((sent, ack)) = in_flight.pop_front() {
        ack.await.context("batch commit ack")?;
        lat.push(micros(sent.elapsed()));
    }
    let rate = Rate::new(msgs, started.elapsed());
    let last = js
        .get_stream("BASELINE_BATCHED")
        .await?
        .get_info()
        .await?
        .state
        .last_sequence;
    anyhow::ensure!(last == msgs, "the stream holds {last} of {msgs} messages");
    Ok(Publish {
        rate,
        latency: Latency::of(lat),
        cpu: cpu.stop(),
    })
}

/// The relay's other alternative (issue 14): JetStream's fast batch
/// publishing (nats-server 2.14+, stream `allow_batched`), through the
/// relay's own [`Batcher`](bcp::service::batch::Batcher): the messages go
/// as one long batch, each carrying `Nats-Expected-Last-Sequence` as the
/// relay's do, nats-server answers once per `flow` stored messages ("all
/// through seq N are stored"), and the last message commits the batch. At
/// most `window` messages go unanswered. Latency is per message, publish
/// to the answer that covers it.
pub async fn jetstream_fast_batch(
    nats: &crate::procs::Nats,
    samples: &[(String, Bytes)],
    msgs: u64,
    flow: u16,
    window: u64,
) -> Result<Publish> {
    use bcp::service::batch::{Answer, Batcher};
    anyhow::ensure!(
        window >= u64::from(flow),
        "a window under the flow never gets an answer"
    );
    let (client, _) = connect_with_stream(
        nats,
        stream::Config {
            allow_batch_publish: true,
            ..baseline_stream("BASELINE_FAST")
        },
    )
    .await?;
    let mut batcher = Batcher::new(client, flow)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(window as usize);
    let mut lat = Vec::with_capacity(msgs as usize);
    let mut acked = 0u64;
    let cpu = crate::procs::Meter::start(&[("nats-server", nats.pid()), ("publisher (bench)", 0)]);
    let started = Instant::now();
    let mut seq = 0u64;
    let mut committed = false;
    while !committed {
        while seq < msgs && seq - acked < window {
            seq += 1;
            let (subject, payload) = &samples[(seq - 1) as usize % samples.len()];
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Sequence",
                (seq - 1).to_string().as_str(),
            );
            sent_at.push_back(Instant::now());
            batcher
                .send(seq, subject.clone(), headers, payload.clone(), seq == msgs)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let through = match batcher.next(Duration::from_secs(10)).await {
            Ok(Answer::Stored(through)) => through,
            Ok(Answer::Committed(through)) => {
                committed = true;
                through
            }
            Err(e) => bail!("fast batch: {e:?}"),
        };
        while acked < through {
            let sent = sent_at.pop_front().context("an ack beyond what was sent")?;
            lat.push(micros(sent.elapsed()));
            acked += 1;
        }
    }
    let rate = Rate::new(msgs, started.elapsed());
    anyhow::ensure!(acked == msgs, "committed through seq {acked}, not {msgs}");
    Ok(Publish {
        rate,
        latency: Latency::of(lat),
        cpu: cpu.stop(),
    })
}

// ------------------------------------------------------------ bcp end to end

/// What one end-to-end run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Run {
    /// Commands answered (ok or not) over the time from the first send to
    /// the last reply.
    pub acked: Rate,
    pub ok: u64,
    pub rejected: u64,
    pub unavailable: u64,
    /// No reply (timeout, no responders): each one a producer would retry.
    pub failed: u64,
    pub jobs_created: u64,
    /// Send to reply (closed loop); intended send time to reply (open loop).
    pub latency: Latency,
    /// Highest seq in any reply.
    pub last_seq: u64,
    /// From the last reply until the stream's last sequence reached
    /// `last_seq`: how far the relay trailed the acks.
    pub stream_lag_after_last_ack_ms: f64,
    /// Open loop only: the offered rate.
    pub offered_per_sec: Option<f64>,
    /// CPU each process used during the run.
    pub cpu: Option<crate::procs::Usage>,
    /// Replies slower than 50 ms, and the ten slowest as (seconds into the
    /// run the command was sent or due, latency µs): one stall shows as a
    /// cluster at one moment.
    pub slow_over_50ms: u64,
    pub slowest: Vec<(f64, u64)>,
    /// When the run started (Unix seconds), to line stalls up with other
    /// records of the machine.
    pub started_unix_s: f64,
    /// bcp serve's own share of the latency, from its
    /// `bcp_command_seconds` over the run (none for peer C).
    pub inside_bcp: Option<Inside>,
}

/// Each command's time inside bcp serve during one run, from the intake
/// queue to its reply being sent (`bcp_command_seconds`): set beside the
/// producers' latency, what is left of theirs was spent outside that path
/// (NATS, the producers, bcp's NATS client and tasks, and waiting for a
/// core meanwhile).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Inside {
    pub commands: u64,
    /// Estimated within the histogram's buckets, whatever bounds bcp
    /// serve exports, as Prometheus's `histogram_quantile` does.
    pub p50_us: u64,
    pub p99_us: u64,
}

/// A Prometheus histogram as scraped: (upper bound in seconds, cumulative
/// count) per bucket, in order, `+Inf` last.
#[derive(Debug)]
pub struct Buckets(Vec<(f64, u64)>);

impl Buckets {
    /// The `name` histogram's buckets in a /metrics text.
    pub fn parse(metrics: &str, name: &str) -> Result<Buckets> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets = Vec::new();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let (le, count) = rest
                .split_once("\"} ")
                .with_context(|| format!("a bucket line of {name}: {line}"))?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            buckets.push((le, count.trim().parse()?));
        }
        if buckets.last().is_none_or(|(le, _)| le.is_finite()) {
            bail!("no histogram {name} (with a +Inf bucket) in /metrics");
        }
        Ok(Buckets(buckets))
    }

    /// What was counted after `earlier` (a scrape of the same histogram).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .zip(earlier.0.iter().chain(std::iter::repeat(&(0.0, 0))))
                .map(|(&(le, now), &(_, then))| (le, now.saturating_sub(then)))
                .collect(),
        )
    }

    pub fn count(&self) -> u64 {
        self.0.last().map_or(0, |&(_, n)| n)
    }

    /// The `q` quantile in seconds, interpolated linearly within its bucket
    /// (from 0 for the first); in the `+Inf` bucket, the largest finite
    /// bound. `None` when nothing was counted.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = (0.0, 0u64);
        for &(le, n) in &self.0 {
            if n as f64 >= rank {
                if le.is_infinite() {
                    return Some(below.0);
                }
                let within = (rank - below.1 as f64) / (n - below.1).max(1) as f64;
                return Some(below.0 + (le - below.0) * within);
            }
            below = (le, n);
        }
        Some(below.0)
    }

    /// The run's [`Inside`], from this histogram's counts over it.
    pub fn inside(&self) -> Option<Inside> {
        let us = |q| self.quantile(q).map(|s| (s * 1e6).round() as u64);
        Some(Inside {
            commands: self.count(),
            p50_us: us(0.5)?,
            p99_us: us(0.99)?,
        })
    }
}

/// Tally of replies, shared by producer tasks.
#[derive(Default)]
struct Tally {
    ok: u64,
    rejected: u64,
    unavailable: u64,
    failed: u64,
    jobs_created: u64,
    last_seq: u64,
    latency_us: Vec<u64>,
    slow: Vec<(f64, u64)>,
}

impl Tally {
    /// One reply (or none), `us` after the command was sent (or due), `at`
    /// seconds into the run.
    fn record(&mut self, created_job: bool, reply: Result<async_nats::Message>, us: u64, at: f64) {
        let Ok(msg) = reply else {
            self.failed += 1;
            return;
        };
        self.latency_us.push(us);
        if us > 50_000 {
            self.slow.push((at, us));
        }
        let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        let seqs = v["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["seq"].as_u64())
            .chain(v["rejection_seq"].as_u64());
        self.last_seq = self.last_seq.max(seqs.max().unwrap_or(0));
        if v["ok"] == Value::Bool(true) {
            self.ok += 1;
            if created_job {
                self.jobs_created += 1;
            }
        } else if v["error"]["code"] == "unavailable" {
            self.unavailable += 1;
        } else {
            self.rejected += 1;
        }
    }

    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.rejected += o.rejected;
        self.unavailable += o.unavailable;
        self.failed += o.failed;
        self.jobs_created += o.jobs_created;
        self.last_seq = self.last_seq.max(o.last_seq);
        self.latency_us.extend(o.latency_us);
        self.slow.extend(o.slow);
    }

    fn into_run(mut self, elapsed: Duration) -> Run {
        self.slow.sort_by_key(|&(_, us)| std::cmp::Reverse(us));
        Run {
            slow_over_50ms: self.slow.len() as u64,
            slowest: self.slow.into_iter().take(10).collect(),
            acked: Rate::new(self.ok + self.rejected + self.unavailable, elapsed),
            ok: self.ok,
            rejected: self.rejected,
            unavailable: self.unavailable,
            failed: self.failed,
            jobs_created: self.jobs_created,
            latency: Latency::of(self.latency_us),
            last_seq: self.last_seq,
            ..Run::default()
        }
    }
}

async fn send(client: &async_nats::Client, cmd: &Cmd) -> Result<async_nats::Message> {
    let msg = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(cmd.subject(), cmd.body.clone().into()),
    )
    .await
    .context("no reply within 30 s")??;
    Ok(msg)
}

/// Closed loop: one producer task per lane, each with one command in flight
/// (so `lanes.len()` in flight), until `commands` have been answered.
pub async fn closed_loop(client: &async_nats::Client, lanes: Vec<Lane>, commands: u64) -> Run {
    let left = Arc::new(AtomicI64::new(commands as i64));
    let wall = std::time::SystemTime::now();
    let started = Instant::now();
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|mut lane| {
            let client = client.clone();
            let left = left.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while left.fetch_sub(1, Ordering::Relaxed) > 0 {
                    let cmd = lane.next_cmd();
                    let sent = Instant::now();
                    let reply = send(&client, &cmd).await;
                    let at = (sent - started).as_secs_f64();
                    tally.record(cmd.creates_job(), reply, micros(sent.elapsed()), at);
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(t.await.expect("producer task"));
    }
    let mut run = tally.into_run(started.elapsed());
    run.started_unix_s = unix_s(wall);
    run
}

/// Open loop: commands are due at `rate` per second for `duration`,
/// regardless of how fast replies come; each is sent by an idle lane (from a
/// pool large enough that one is always free unless bcp falls behind).
/// Latency counts from when a command was due, so queueing in the producer
/// is included (no coordinated omission).
pub async fn open_loop(
    client: &async_nats::Client,
    lanes: Vec<Lane>,
    rate: f64,
    duration: Duration,
) -> Run {
    let (idle_tx, mut idle_rx) = tokio::sync::mpsc::channel(lanes.len());
    for lane in lanes {
        idle_tx.try_send(lane).expect("pool sized for every lane");
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = tokio::task::JoinSet::new();
    let wall = std::time::SystemTime::now();
    let started = tokio::time::Instant::now();
    let due_total = (rate * duration.as_secs_f64()) as u64;
    for i in 0..due_total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let mut lane = idle_rx.recv().await.expect("lanes come back");
        let (client, tally, idle_tx) = (client.clone(), tally.clone(), idle_tx.clone());
        tasks.spawn(async move {
            let cmd = lane.next_cmd();
            let reply = send(&client, &cmd).await;
            let us = micros(due.elapsed());
            let at = (due - started).as_secs_f64();
            tally
                .lock()
                .expect("tally")
                .record(cmd.creates_job(), reply, us, at);
            let _ = idle_tx.send(lane).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let mut run = tally.into_run(elapsed);
    run.offered_per_sec = Some(rate);
    run.started_unix_s = unix_s(wall);
    run
}

fn unix_s(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The stream's last sequence (0 while it does not exist yet).
pub async fn stream_last_seq(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(s) => s.get_info().await.map_or(0, |i| i.state.last_sequence),
        Err(_) => 0,
    }
}

/// Poll until the stream's last sequence is at least `seq`; returns how
/// long that took.
pub async fn wait_for_stream(
    js: &jetstream::Context,
    name: &str,
    seq: u64,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let last = stream_last_seq(js, name).await;
        if last >= seq {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("stream {name} at {last}, still short of {seq} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
