//! Booking sync between gateway replicas in front of the same engines: each replica publishes
//! what it booked (and when each leg ended) and books what the others publish, so its scheduler
//! sees the load they placed.
//!
//! Never on the request path's critical section: publishing is a `try_send` onto a bounded
//! queue (`outbox`), and the broker's state never fails a request — when it is down, replicas
//! schedule unsynced until it is back. Files below: `wire` (the messages), `outbox`, `ledger`
//! (others' bookings, expiry), `apply`, `nats` (the broker), `counters` (metrics).

mod apply;
mod counters;
pub mod ledger;
mod nats;
pub mod outbox;
pub mod wire;

use crate::config::{ReplicaSync, ReplicasConfig};
use crate::fleet::Fleet;
use outbox::Outbox;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The running sync: its tasks end when this is stopped.
pub struct ReplicaSyncTasks {
    tasks: Vec<JoinHandle<()>>,
}

impl ReplicaSyncTasks {
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Starts booking sync as `[replicas]` says, installing the fleet's outbox. `Ok(None)`: sync is
/// off. Errors only on configuration (a credential file that cannot be read, a bad URL); an
/// unreachable broker is retried in the background while serving goes on.
pub async fn start(
    cfg: &ReplicasConfig,
    fleet: &Arc<Fleet>,
) -> anyhow::Result<Option<ReplicaSyncTasks>> {
    match cfg.sync {
        ReplicaSync::None => Ok(None),
        ReplicaSync::Nats => {
            let id = uuid::Uuid::new_v4().as_u64_pair().0;
            let (tx, rx) = mpsc::channel(cfg.queue.max(1));
            let tasks = nats::start(cfg, Arc::clone(fleet), id, rx).await?;
            // Set once per fleet; a second start would have no publisher behind it.
            if fleet.replicas.set(Outbox::new(id, tx)).is_err() {
                anyhow::bail!("booking sync already started for this fleet");
            }
            tracing::info!(replica = id, url = %cfg.url, subject = %cfg.subject, "booking sync with other replicas on");
            Ok(Some(ReplicaSyncTasks { tasks }))
        }
    }
}
