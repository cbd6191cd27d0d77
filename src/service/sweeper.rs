//! The retention sweeper: on a timer, queue an `expire-snapshots` over every
//! job with bcp's clock as `now`, through the same writer as any command.
//! What it decides is logged as `SnapshotExpired` events, so replay never
//! reads a clock. An idle sweep appends and stores nothing.

use super::writer::{WriteRequest, now};
use crate::domain::ProjectId;
use crate::domain::command::{Command, CommandEnvelope};
use crate::domain::verb::Verb;
use crate::store::ledger::Pending;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const ACTOR: &str = "bcp-sweeper";

/// The sweep command for `now`: project `_admin` stands for every project.
pub fn sweep_command(now: chrono::DateTime<chrono::Utc>) -> Pending {
    let cmd = CommandEnvelope {
        command_id: uuid::Uuid::now_v7(),
        project_id: ProjectId::parse(ProjectId::ADMIN).expect("_admin is valid"),
        verb: Verb::ExpireSnapshots,
        job_id: None,
        expected_version: None,
        actor: Some(ACTOR.to_owned()),
        actor_verified: true,
        command: Command::ExpireSnapshots { now },
    };
    Pending {
        internal: true,
        ..Pending::new(cmd)
    }
}

/// Queue a sweep every `interval` until `stop`; none while an alarm is
/// raised (bcp then appends nothing of its own either).
pub async fn run(
    queue: mpsc::Sender<WriteRequest>,
    alarms: std::sync::Arc<super::guard::Alarms>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        if alarms.refusal().is_some() {
            continue;
        }
        let request = WriteRequest {
            pending: sweep_command(now()),
            reply_to: super::reply::ReplyTo::Nobody,
            queued: std::time::Instant::now(),
        };
        if queue.try_send(request).is_err() {
            tracing::debug!("intake queue full; the sweep runs at the next tick");
        }
    }
}
