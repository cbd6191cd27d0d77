//! The writer's lease: one `bcp serve` writes a stream at a time.
//!
//! A key named after the stream in the NATS KV bucket [`BUCKET`] says who
//! writes it. It is taken with compare-and-set (create when absent, update
//! at the revision read), renewed every third of its time to live, and
//! ages out of the bucket (`max_age`) when its holder dies, so another
//! process can take it then and not before. A holder is a store: a host and
//! the canonical path of a redb file (redb lets one process open a file, so
//! a restart on the same store takes its own lease back at once), and in a
//! group the node's name. bcp serve on another store finds the lease held
//! and refuses to start (single mode) or waits as a follower (a group).
//!
//! The lease keeps a second process from taking commands; it is not what
//! keeps the log whole. That is the relay's `Nats-Expected-Last-Sequence`
//! and the stream check in [`super::guard`], which hold even if two
//! processes believed they held the lease.

use super::guard::{AlarmKind, Alarms};
use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The KV bucket of writer leases, one key per stream.
pub const BUCKET: &str = "BCP_WRITERS";
/// How long a lease lives without renewal (`bcp serve --lease-ttl`).
pub const TTL_DEFAULT: Duration = Duration::from_secs(10);
/// The same in group mode: a failover waits this long for a dead leader's
/// lease to lapse.
pub const GROUP_TTL_DEFAULT: Duration = Duration::from_secs(3);

/// Who holds a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// `host:/canonical/path/of/the.redb`, the store that writes the
    /// stream; a group node's is `group/node host:/path`.
    pub store: String,
    pub pid: u32,
    /// When this holder took the lease (RFC 3339 UTC).
    pub since: String,
    /// The group of a group node; none for a single-mode bcp serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Who holds a lease another process asked for.
pub struct HeldBy {
    /// The holder, for messages.
    pub holder: String,
    /// A single-mode bcp serve: it acknowledges a command before the
    /// stream has its events, so no group node may take over from it.
    pub single_mode: bool,
}

impl Holder {
    /// Node `node` of group `group`, writing the store at `db`. Its store
    /// is its identity, as in single mode: a node restarted on its store
    /// takes its own lease back at once, but a second process given the
    /// same `--node` on another store is another holder (it waits, as any
    /// follower), never a second leader.
    pub fn node(group: &str, node: &str, db: &Path) -> Holder {
        Holder {
            store: format!("{group}/{node} {}", store_of(db)),
            pid: std::process::id(),
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            group: Some(group.to_owned()),
        }
    }

    /// This process, writing the store at `db`.
    pub fn me(db: &Path) -> Holder {
        Holder {
            store: store_of(db),
            pid: std::process::id(),
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            group: None,
        }
    }

    /// A single-mode bcp serve's: no group, and a store `host:/path`. (A
    /// group node of an older bcp wrote no group either, but its store
    /// was `group/node`.)
    pub fn is_single_mode(&self) -> bool {
        self.group.is_none() && self.store.contains(":/")
    }

    fn describe(&self) -> String {
        format!("{} (pid {}, since {})", self.store, self.pid, self.since)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "another bcp serve writes the stream {stream}: {holder}. Only one process may write a log: stop that one first (if it died, its lease ends within {ttl:?} of its last renewal)"
    )]
    Held {
        stream: String,
        holder: String,
        ttl: Duration,
    },
    #[error("writer lease (KV bucket {BUCKET}): {0}")]
    Nats(String),
}

/// A lease this process holds.
pub struct Lease {
    kv: kv::Store,
    key: String,
    me: Holder,
    revision: u64,
    ttl: Duration,
    /// When it was last taken or renewed (for `bcp.status`).
    renewed: Renewed,
}

/// When a lease was last taken or renewed; shared with the status reply.
pub type Renewed = Arc<std::sync::Mutex<std::time::Instant>>;

/// The lease bucket, opened (created when missing) once, and the lease TTL
/// it enforces: its `max_age`, chosen by the first process to create it.
#[derive(Clone)]
pub struct Bucket {
    kv: kv::Store,
    ttl: Duration,
}

impl Bucket {
    pub async fn open(
        js: &jetstream::Context,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Bucket, LeaseError> {
        let nats = |e: String| LeaseError::Nats(e);
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_owned(),
                    description: "bcp: which bcp serve writes each stream".to_owned(),
                    history: 1,
                    max_age: ttl,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| nats(e.to_string()))?,
        };
        let mut stream = js
            .get_stream(format!("KV_{BUCKET}"))
            .await
            .map_err(|e| nats(e.to_string()))?;
        let max_age = stream
            .info()
            .await
            .map_err(|e| nats(e.to_string()))?
            .config
            .max_age;
        let ttl = if max_age.is_zero() { ttl } else { max_age };
        Ok(Bucket { kv, ttl })
    }

    /// Take the lease on `stream` for `me` if it is free or already `me`'s;
    /// otherwise `Ok(Err(who holds it))`, at once.
    pub async fn try_acquire(
        &self,
        stream: &str,
        me: &Holder,
    ) -> Result<Result<Lease, HeldBy>, LeaseError> {
        let kv = &self.kv;
        // `since` says when the lease was taken, not when the process began.
        let me = &Holder {
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ..me.clone()
        };
        let bytes: bytes::Bytes = serde_json::to_vec(me).expect("holder serializes").into();
        let lease = |revision| Lease {
            kv: kv.clone(),
            key: stream.to_owned(),
            me: me.clone(),
            revision,
            ttl: self.ttl,
            renewed: Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
        };
        loop {
            match kv.create(stream, bytes.clone()).await {
                Ok(revision) => return Ok(Ok(lease(revision))),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(LeaseError::Nats(e.to_string())),
            }
            let entry = kv
                .entry(stream)
                .await
                .map_err(|e| LeaseError::Nats(e.to_string()))?;
            let Some(entry) = entry else { continue };
            let holder = holder_of(&entry);
            if holder.as_ref().is_some_and(|h| h.store == me.store) {
                match kv.update(stream, bytes.clone(), entry.revision).await {
                    Ok(revision) => return Ok(Ok(lease(revision))),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(LeaseError::Nats(e.to_string())),
                }
            }
            return Ok(Err(HeldBy {
                single_mode: holder.as_ref().is_some_and(Holder::is_single_mode),
                holder: holder
                    .map_or_else(|| "an unreadable lease entry".to_owned(), |h| h.describe()),
            }));
        }
    }
}

/// `host:/canonical/path/of/the.redb`: one process at a time opens a
/// store (redb locks its file), so no two live processes share this.
fn store_of(db: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    let path = db.canonicalize().unwrap_or_else(|_| db.to_owned());
    format!("{host}:{}", path.display())
}

fn holder_of(entry: &kv::Entry) -> Option<Holder> {
    serde_json::from_slice(&entry.value).ok()
}

/// Take the lease on `stream` for `me`: at once when free or already ours
/// (a restart on the same store); when another store holds it, wait at most
/// one TTL for it to lapse, then [`LeaseError::Held`].
pub async fn acquire(
    js: &jetstream::Context,
    stream: &str,
    me: Holder,
    ttl: Duration,
    replicas: usize,
) -> Result<Lease, LeaseError> {
    let bucket = Bucket::open(js, ttl, replicas).await?;
    let give_up = tokio::time::Instant::now() + bucket.ttl + Duration::from_secs(1);
    let mut told = false;
    loop {
        let holder = match bucket.try_acquire(stream, &me).await? {
            Ok(lease) => return Ok(lease),
            Err(held) => held.holder,
        };
        if tokio::time::Instant::now() >= give_up {
            return Err(LeaseError::Held {
                stream: stream.to_owned(),
                holder,
                ttl: bucket.ttl,
            });
        }
        if !told {
            tracing::warn!(%holder, "the stream's writer lease is held by another store; waiting up to {:?} for it to lapse", bucket.ttl);
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Lease {
    pub fn holder(&self) -> &Holder {
        &self.me
    }

    pub fn renewed(&self) -> Renewed {
        self.renewed.clone()
    }

    /// Renew; `Err` says why not. A lapsed lease (a NATS outage longer than
    /// the TTL) is taken again when nobody else took it.
    ///
    /// The entry is read first and renewed at its revision only when it
    /// names this holder: a revision alone does not say whose the entry is
    /// (a bucket recreated after JetStream lost its store numbers its
    /// entries from 1 again, and another holder's entry may then carry this
    /// one's revision; updated blindly, it would be overwritten).
    pub(crate) async fn renew(&mut self) -> Result<(), Renewal> {
        let bytes: bytes::Bytes = serde_json::to_vec(&self.me).expect("holder").into();
        // The lease is renewed as of when the renewal was sent: the server
        // may have written it any time after.
        let sent = std::time::Instant::now();
        let unreachable = |e: &dyn std::fmt::Display| Renewal::Unreachable(e.to_string());
        let entry = self
            .kv
            .entry(&self.key)
            .await
            .map_err(|e| unreachable(&e))?;
        let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
            Some(entry) => match holder_of(&entry) {
                Some(h) if h == self.me => {
                    match self.kv.update(&self.key, bytes, entry.revision).await {
                        Ok(revision) => revision,
                        // Changed since it was read: the next renewal says by whom.
                        Err(e) => return Err(unreachable(&e)),
                    }
                }
                other => {
                    return Err(Renewal::Lost(other.map_or_else(
                        || "an unreadable lease entry".to_owned(),
                        |h| h.describe(),
                    )));
                }
            },
            None => self
                .kv
                .create(&self.key, bytes)
                .await
                .map_err(|e| unreachable(&e))?,
        };
        self.revision = written;
        *self.renewed.lock().expect("lease clock") = sent;
        Ok(())
    }

    /// Give the lease up (a clean stop), so the next process need not wait.
    pub async fn release(self) {
        if let Err(e) = self
            .kv
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
        {
            tracing::debug!(error = %e, "writer lease not released; it lapses by itself");
        }
    }
}

pub(crate) enum Renewal {
    Unreachable(String),
    Lost(String),
}

/// What losing the lease means.
pub enum OnLoss {
    /// Single mode: raise the `Writer` alarm (commands refused) until it
    /// is ours again, also while it could not be renewed for half its TTL.
    Alarm(Arc<Alarms>),
    /// Group mode: this node's term ends (cancel the token), also when the
    /// lease could not be renewed for half its TTL: by the next check
    /// another node could hold it.
    Depose(CancellationToken),
}

/// Renew the lease every third of its TTL until `stop` (or, in group mode,
/// until it is lost). Returns the lease to release.
pub async fn hold(mut lease: Lease, on_loss: OnLoss, stop: CancellationToken) -> Lease {
    let mut ticks = tokio::time::interval(lease.ttl / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return lease,
        }
        // A renewal that hangs (a NATS server going away) is a failed one.
        let renewal = tokio::time::timeout(lease.ttl / 4, lease.renew())
            .await
            .unwrap_or_else(|_| Err(Renewal::Unreachable("renewal timed out".into())));
        let since = lease.renewed.lock().expect("lease clock").elapsed();
        let lost = match renewal {
            Ok(()) => None,
            Err(Renewal::Lost(holder)) => Some(format!(
                "another bcp serve took the writer lease of this stream: {holder}"
            )),
            Err(Renewal::Unreachable(e)) => {
                tracing::debug!(error = %e, "writer lease not renewed (NATS unavailable?)");
                // Checked every third of the TTL, each check bounded by a
                // quarter: at half the TTL a single-mode server stops taking
                // commands and a leader steps down, before the TTL is out,
                // so before another process can take the lease.
                (since >= lease.ttl / 2).then(|| {
                    format!(
                        "the writer lease was not renewed for {since:.1?} ({e}); it lapses {:?} after its last renewal, when another bcp serve may take it",
                        lease.ttl
                    )
                })
            }
        };
        match (&on_loss, lost) {
            (OnLoss::Alarm(alarms), None) => alarms.clear(AlarmKind::Writer),
            // Single mode acknowledges a command once its store has it: it
            // takes none while another process could be writing the stream.
            (OnLoss::Alarm(alarms), Some(why)) => alarms.raise(AlarmKind::Writer, why),
            (OnLoss::Depose(_), None) => {}
            (OnLoss::Depose(deposed), Some(why)) => {
                tracing::warn!("stepping down: {why}");
                deposed.cancel();
                return lease;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_mode_holder_reads_as_one() {
        let held = |json: &str| serde_json::from_str::<Holder>(json).unwrap();
        let single =
            held(r#"{"store":"h1:/var/lib/bcp.redb","pid":7,"since":"2026-12-01T00:00:00Z"}"#);
        assert!(single.is_single_mode());
        // A group node of this bcp, and of an older one (no `group`).
        let node = Holder::node("g", "b1", Path::new("/var/lib/b1.redb"));
        assert!(!node.is_single_mode());
        let older = held(r#"{"store":"g/b1","pid":7,"since":"2026-12-01T00:00:00Z"}"#);
        assert!(!older.is_single_mode());
        assert!(Holder::me(Path::new("/x.redb")).is_single_mode());
    }
}
