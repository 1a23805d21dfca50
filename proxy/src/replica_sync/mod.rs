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
use crate::models::Model;
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

/// The sync settings of one model: with several models each syncs on a subject of its own
/// (`{subject}.{hex of the model name}`: any name, a valid subject token), so a replica never
/// receives another model's bookings; one model keeps `subject` as configured.
pub fn for_model(cfg: &ReplicasConfig, model: &Model, several: bool) -> ReplicasConfig {
    let mut cfg = cfg.clone();
    if several {
        let hex: String = model.name.bytes().map(|b| format!("{b:02x}")).collect();
        cfg.subject = format!("{}.{hex}", cfg.subject);
    }
    cfg
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

#[cfg(test)]
mod model_subject_tests {
    use super::*;
    use crate::config::{Config, ModelEntry};
    use crate::models::Models;

    #[test]
    fn each_model_syncs_on_its_own_subject_and_one_model_on_the_configured_one() {
        let entry = |name: &str| ModelEntry {
            name: name.into(),
            ..ModelEntry::default()
        };
        let cfg = Config {
            models: vec![entry("llama 3.1"), entry("qwen.2")],
            ..Config::default()
        };
        let models = Models::build(&cfg).expect("models");
        let [a, b] = models.all() else {
            panic!("two models")
        };
        let (sa, sb) = (
            for_model(&cfg.replicas, a, true).subject,
            for_model(&cfg.replicas, b, true).subject,
        );
        assert_ne!(sa, sb);
        for s in [&sa, &sb] {
            let token = s
                .strip_prefix("pdgate.bookings.")
                .expect("under the subject");
            assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{s}");
        }
        assert_eq!(
            for_model(&cfg.replicas, a, false).subject,
            "pdgate.bookings"
        );
    }
}
