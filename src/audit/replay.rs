//! Projections rebuilt from the log as of a point (a seq, a time, or both),
//! optionally for one job or project: the same pure fold as the server.

use super::chain;
use super::scan::{self, scan};
use crate::domain::{Envelope, Job, ProjectId, Snapshot, World};
use crate::store::{Result, Store, StoreError, decode_state};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::sync_channel;
use uuid::Uuid;

/// Where replay stops: after the last event with seq <= `until_seq` and
/// `recorded_at` <= `until` (the log's times never go backwards).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cut {
    pub until_seq: Option<u64>,
    pub until: Option<DateTime<Utc>>,
}

impl Cut {
    pub fn includes(&self, env: &Envelope) -> bool {
        self.until_seq.is_none_or(|s| env.seq <= s)
            && self.until.is_none_or(|t| env.recorded_at <= t)
    }
}

/// Which jobs to show.
#[derive(Clone, Debug, Default)]
pub struct Select {
    pub job: Option<Uuid>,
    pub project: Option<ProjectId>,
}

/// `{"as_of_seq":N,"jobs":[VIEW…],"snapshots":{JOB_ID:[…]}}`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ReplayView {
    pub as_of_seq: u64,
    pub jobs: Vec<Job>,
    /// Per job, the retained snapshots in time order.
    pub snapshots: BTreeMap<Uuid, Vec<Snapshot>>,
}

impl ReplayView {
    /// Write exactly what `serde_json::to_writer_pretty(out, self)` writes,
    /// with the jobs and snapshot lists serialized on `workers` threads:
    /// for 100 k jobs that is some 250 MB of JSON, which took a quarter of
    /// replay's time on one thread after the scan had used both cores.
    pub fn write_pretty(&self, out: &mut impl Write, workers: usize) -> io::Result<()> {
        write!(
            out,
            "{{\n  \"as_of_seq\": {},\n  \"jobs\": ",
            self.as_of_seq
        )?;
        pretty_list(out, b"[]", &self.jobs, workers, |job, buf| {
            serde_json::to_writer_pretty(Indented(buf), job)
        })?;
        out.write_all(b",\n  \"snapshots\": ")?;
        let snapshots: Vec<_> = self.snapshots.iter().collect();
        pretty_list(out, b"{}", &snapshots, workers, |(job, list), buf| {
            serde_json::to_writer(&mut *buf, job)?;
            buf.extend_from_slice(b": ");
            serde_json::to_writer_pretty(Indented(buf), list)
        })?;
        out.write_all(b"\n}")
    }
}

/// Items of a pretty-printed list or map two levels deep (in the top-level
/// object's value), in order: `empty` for none, else the brackets of
/// `empty` around each item on its own line. `item` writes one item as if
/// at the top level, through [`Indented`].
fn pretty_list<T: Sync>(
    out: &mut impl Write,
    empty: &[u8; 2],
    items: &[T],
    workers: usize,
    item: impl Fn(&T, &mut Vec<u8>) -> serde_json::Result<()> + Sync,
) -> io::Result<()> {
    /// Items per piece of work: large enough that a handover costs little,
    /// small enough that the queued pieces stay a few MB.
    const CHUNK: usize = 512;
    if items.is_empty() {
        return out.write_all(empty);
    }
    out.write_all(&empty[..1])?;
    let chunks: Vec<&[T]> = items.chunks(CHUNK).collect();
    let chunk = |n: usize, buf: &mut Vec<u8>| -> serde_json::Result<()> {
        for (i, x) in chunks[n].iter().enumerate() {
            let first = n == 0 && i == 0;
            buf.extend_from_slice(if first { b"\n    " } else { b",\n    " });
            item(x, buf)?;
        }
        Ok(())
    };
    let count = chunks.len();
    let workers = workers.clamp(1, count);
    // Chunk n goes to worker n % workers; each sends its pieces back on its
    // own bounded channel, so they are written in order with a few queued.
    std::thread::scope(|s| {
        let from_workers: Vec<_> = (0..workers)
            .map(|w| {
                let (tx, rx) = sync_channel::<serde_json::Result<Vec<u8>>>(2);
                let chunk = &chunk;
                s.spawn(move || {
                    // Each piece sized by the last: grown from empty, its
                    // copies while growing were 3 % of replay's CPU.
                    let mut last = 0;
                    for n in (w..count).step_by(workers) {
                        let mut buf = Vec::with_capacity(last + last / 8);
                        let done = chunk(n, &mut buf).map(|()| buf);
                        last = done.as_ref().map_or(0, Vec::len);
                        let failed = done.is_err();
                        if tx.send(done).is_err() || failed {
                            break;
                        }
                    }
                });
                rx
            })
            .collect();
        for n in 0..count {
            let piece = from_workers[n % workers]
                .recv()
                .expect("a serializing thread stopped early")?;
            out.write_all(&piece)?;
        }
        Ok::<_, io::Error>(())
    })?;
    out.write_all(b"\n  ")?;
    out.write_all(&empty[1..])
}

/// A writer for serde_json's pretty printer that shifts what it writes two
/// levels (four spaces) to the right. The printer writes each line break on
/// its own (`"\n"`, `",\n"`), and JSON strings escape theirs, so a write
/// that ends in a line break is exactly where an indent goes.
struct Indented<'a>(&'a mut Vec<u8>);

impl Write for Indented<'_> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    /// What the printer calls, for every token: kept inline, as `Vec`'s is.
    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.extend_from_slice(buf);
        if buf.last() == Some(&b'\n') {
            self.0.extend_from_slice(b"    ");
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Fold a log from its start up to `cut`.
#[derive(Default)]
pub struct Replayer {
    world: World,
    as_of_seq: u64,
    done: bool,
}

impl Replayer {
    /// Feed the next event; returns false once past the cut.
    pub fn feed(&mut self, env: &Envelope, cut: &Cut) -> bool {
        if self.done || !cut.includes(env) {
            self.done = true;
            return false;
        }
        self.world.evolve_unindexed(env);
        self.as_of_seq = env.seq;
        true
    }

    /// [`feed`](Replayer::feed) an event read from a store under `key`,
    /// after the checks that cost nothing worth naming: it is the event
    /// after the last one fed (no gap, no reorder: its key and its
    /// envelope's seq), and its job's version follows the job's. Its hash,
    /// the chain and the rows are `bcp audit verify`'s to check.
    pub fn feed_stored(&mut self, key: u64, env: &Envelope, cut: &Cut) -> Result<bool, String> {
        // Past `--until-seq`, the log's damage is not this replay's: the
        // state just before it is a question worth answering.
        if self.done || cut.until_seq.is_some_and(|s| key > s) {
            self.done = true;
            return Ok(false);
        }
        // The checks verify makes of an event's place, by the same code.
        let expected = self.as_of_seq + 1;
        (chain::check_key(expected, key))
            .and_then(|()| chain::check_seq(expected, env))
            .and_then(|()| chain::check_version(env, &self.world))
            .map_err(|e| e.to_string())?;
        Ok(self.feed(env, cut))
    }

    pub fn view(self, select: &Select) -> ReplayView {
        let World { jobs, catalogs, .. } = self.world;
        let jobs: Vec<Job> = jobs
            .into_values()
            .filter(|j| select.job.is_none_or(|id| j.job_id == id))
            .filter(|j| select.project.as_ref().is_none_or(|p| *p == j.project_id))
            .collect();
        // Both in job id order: each job's catalog is found by walking the
        // catalogs once, not by a lookup per job.
        let mut catalogs = catalogs.into_iter().peekable();
        let snapshots = jobs
            .iter()
            .map(|j| {
                while catalogs.next_if(|(id, _)| *id < j.job_id).is_some() {}
                let catalog = catalogs.next_if(|(id, _)| *id == j.job_id);
                (
                    j.job_id,
                    catalog.map(|(_, c)| c.snapshots).unwrap_or_default(),
                )
            })
            .collect();
        ReplayView {
            as_of_seq: self.as_of_seq,
            jobs,
            snapshots,
        }
    }
}

/// Replay a store: events are parsed on every core ([`scan`](fn@scan)) and folded in
/// seq order here. Only the state is read of each event
/// ([`decode_state`]), and its place in the log checked
/// ([`Replayer::feed_stored`]); `bcp audit verify` checks the rest.
pub fn replay(store: &Store, cut: Cut, select: &Select) -> Result<ReplayView> {
    let mut r = Replayer::default();
    scan::<_, StoreError>(store, scan::workers(), decode_state, |key, env| match env {
        Ok(env) => r.feed_stored(key, env, &cut).map_err(StoreError::Corrupt),
        Err(e) => Err(std::mem::replace(e, StoreError::Corrupt(String::new()))),
    })?;
    Ok(r.view(select))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(n: u128) -> Job {
        serde_json::from_value(json!({
            "job_id": Uuid::from_u128(n),
            "project_id": "p1",
            "deployment": {"kind": "shard", "name": "shard-0", "cluster": "c1"},
            "schedule": {
                "snapshot_interval_hours": 6, "snapshot_retention_days": 2,
                "daily_retention_days": 0, "weekly_retention_weeks": 2,
                "monthly_retention_months": 1, "point_in_time_window_hours": 24,
                "reference_hour_of_day": 0, "reference_minute_of_hour": 0
            },
            "region": if n.is_multiple_of(3) { json!(null) } else { json!("eu") },
            "state": "Active", "phase": "incremental", "version": n as u64,
            "snapshot_count": 1, "latest_snapshot_at": "2026-11-01T08:00:00Z",
            "created_at": "2026-11-01T08:00:00Z", "last_transition_at": "2026-11-01T08:00:00Z",
            "stopped_at": null, "initial_sync_done": true
        }))
        .unwrap()
    }

    fn snapshot(n: u128) -> Snapshot {
        serde_json::from_value(json!({
            "snapshot_id": Uuid::from_u128(n), "taken_at": "2026-11-01T08:00:00Z",
            "size_bytes": n as u64, "classes": if n.is_multiple_of(2) { json!([]) } else { json!(["base", "daily"]) },
            "expires_at": "2026-11-03T08:00:00Z", "do_not_delete": false
        }))
        .unwrap()
    }

    /// What `serde_json::to_writer_pretty` writes, byte for byte, for views
    /// of none, one and many chunks of jobs, on one thread or several.
    #[test]
    fn the_parallel_writer_writes_what_serde_json_writes() {
        for jobs in [0u128, 1, 2, 511, 512, 513, 1500] {
            let view = ReplayView {
                as_of_seq: 7 * jobs as u64,
                jobs: (1..=jobs).map(job).collect(),
                snapshots: (1..=jobs)
                    .map(|n| {
                        (
                            Uuid::from_u128(n),
                            (0..n % 4).map(|s| snapshot(n * 10 + s)).collect(),
                        )
                    })
                    .collect(),
            };
            let want = serde_json::to_vec_pretty(&view).unwrap();
            for workers in [1, 2, 3] {
                let mut got = Vec::new();
                view.write_pretty(&mut got, workers).unwrap();
                same(&got, &want, &format!("{jobs} jobs, {workers} workers"));
            }
        }
    }

    /// Strings the views cannot hold today (their names are restricted),
    /// with quotes, backslashes, line breaks, control and non-ASCII
    /// characters, in lists and maps nested and empty: still what the
    /// printer writes two levels down.
    #[test]
    fn indenting_after_line_breaks_is_exact_for_any_json() {
        let items: Vec<serde_json::Value> = (0..1100)
            .map(|n| {
                json!({
                    "name": format!("line\nbreak \"quoted\" back\\slash \u{1} é ✓ {n}"),
                    "empty": [], "none": {}, "n": n,
                    "nested": [{"a": ["x\ny", {}]}, []],
                })
            })
            .collect();
        let want = serde_json::to_vec_pretty(&json!({ "items": items })).unwrap();
        for workers in [1, 2] {
            let mut got = b"{\n  \"items\": ".to_vec();
            pretty_list(&mut got, b"[]", &items, workers, |v, buf| {
                serde_json::to_writer_pretty(Indented(buf), v)
            })
            .unwrap();
            got.extend_from_slice(b"\n}");
            same(&got, &want, &format!("{workers} workers"));
        }
    }

    /// `got == want`, or a failure that shows where they part.
    fn same(got: &[u8], want: &[u8], what: &str) {
        if let Some(at) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
            let around = |b: &[u8]| {
                String::from_utf8_lossy(&b[at.saturating_sub(80)..b.len().min(at + 80)])
                    .into_owned()
            };
            panic!(
                "{what}: differs at byte {at}\n got: {}\nwant: {}",
                around(got),
                around(want)
            );
        }
    }
}
