//! Precise prefix state from the engines' own KV events (vLLM's and SGLang's
//! `--kv-events-config`, the reference engine's too): a subscriber per worker that names a
//! `kv_events` endpoint, keeping the scheduler's prefix index for that worker as the engine
//! reports it. Workers without one keep the approximate entries learnt from routing; a fleet
//! may mix both. Entries the gateway records when it routes a request stay too, until their
//! TTL: the engine's event confirms them a moment later.
//!
//! A supervisor starts a subscription when a worker with events joins the fleet (static
//! config, the admin API or discovery) and stops it when the worker leaves.

pub mod counters;
pub mod index;
pub mod sequence;
pub mod subscriber;

use crate::config::KvEventsConfig;
use crate::fleet::Fleet;
use pdgate_scheduler::{BlockHasher, InstanceId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the supervisor compares the fleet with its subscriptions.
const RECONCILE_EVERY: Duration = Duration::from_millis(250);

/// `tcp://host:port` with a non-zero port: the one transport the subscriber speaks.
pub fn is_tcp_endpoint(ep: &str) -> bool {
    ep.strip_prefix("tcp://")
        .and_then(|hp| hp.rsplit_once(':'))
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Runs subscriptions for the fleet's workers that publish events, until aborted.
pub fn spawn(fleet: Arc<Fleet>, cfg: KvEventsConfig, hasher: BlockHasher) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = Tasks(HashMap::new());
        let running = &mut tasks.0;
        loop {
            let workers = fleet.workers.all();
            running.retain(|id, task| {
                let keep = workers.iter().any(|w| w.id == *id);
                if !keep {
                    task.abort();
                }
                keep
            });
            for w in &workers {
                let Some(endpoint) = &w.kv_events else {
                    continue;
                };
                if running.contains_key(&w.id) {
                    continue;
                }
                let sub = subscriber::Subscription {
                    fleet: Arc::clone(&fleet),
                    id: w.id,
                    endpoint: endpoint.clone(),
                    replay: w.kv_events_replay.clone(),
                    cfg: cfg.clone(),
                    hasher,
                };
                running.insert(w.id, tokio::spawn(sub.run()));
            }
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    })
}

/// Subscriptions, aborted with the supervisor: a JoinHandle dropped alone leaves its task running.
struct Tasks(HashMap<InstanceId, JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.values() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcp_endpoints_only() {
        for ok in [
            "tcp://127.0.0.1:5557",
            "tcp://[::1]:5557",
            "tcp://engine-0:1",
        ] {
            assert!(super::is_tcp_endpoint(ok), "{ok}");
        }
        for bad in [
            "tcp://:5557",
            "ipc:///tmp/x",
            "tcp://h:0",
            "tcp://h",
            "h:5557",
        ] {
            assert!(!super::is_tcp_endpoint(bad), "{bad}");
        }
    }
}
