//! Active health checking: every worker's `/health` on an interval with a deadline, folded into
//! hysteresis thresholds; flips are pushed into the scheduler so a down worker gets no traffic.

use crate::config::HealthConfig;
use crate::fleet::Fleet;
use crate::http1::Client;
use crate::workers::Worker;
use pdgate_scheduler::InstanceId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Checks every worker once, concurrently.
pub async fn check_all(fleet: &Fleet, client: &Client, cfg: &HealthConfig) {
    let checks = fleet
        .workers
        .all()
        .into_iter()
        .map(|w| async move { (probe(client, &w, cfg).await, w) });
    for (ok, w) in futures::future::join_all(checks).await {
        apply(fleet, &w, ok, cfg);
    }
    crate::metrics::record_health(&fleet.model, &fleet.scheduler.lock());
}

async fn probe(client: &Client, w: &Worker, cfg: &HealthConfig) -> bool {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    matches!(
        client.get(format!("{}/health", w.url)).timeout(timeout).send().await,
        Ok(r) if r.status().is_success()
    )
}

/// Folds one check's outcome into the worker's hysteresis; a flip reaches the scheduler.
fn apply(fleet: &Fleet, w: &Worker, ok: bool, cfg: &HealthConfig) {
    if let Some(healthy) = w.observe(ok, cfg.fail_threshold, cfg.recover_threshold) {
        fleet.scheduler.lock().set_healthy(w.id, healthy);
        if healthy {
            fleet.workers.health_recovered(w);
            tracing::info!(worker = %w.url, role = %w.role, "worker up");
        } else {
            tracing::warn!(worker = %w.url, role = %w.role, "worker down");
        }
    }
}

/// Checks of one worker under way at once at most. A check can wait out its whole deadline (a
/// partitioned engine: the kernel retransmits the SYN after a second), and the next one must
/// not wait behind it, or a link that comes back is seen only after that deadline.
const CHECKS_PER_WORKER: usize = 2;

/// Outcomes waiting to be folded in; beyond it a finished check waits to report.
const DONE_QUEUE: usize = 256;

/// Where a worker's checks stand: how many are under way, and the round of the newest whose
/// outcome was applied (an older check that ends later is stale and dropped).
#[derive(Default)]
struct Checks {
    under_way: usize,
    applied_round: u64,
}

/// Runs checks forever, one round every interval, the first at once. Each worker's checks run
/// on their own: a slow one holds back neither the other workers nor that worker's next round.
pub fn spawn(fleet: Arc<Fleet>, client: Client, cfg: HealthConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A check's sender waits when it is full; at most CHECKS_PER_WORKER per worker exist.
        let (done_tx, mut done) = mpsc::channel::<(Arc<Worker>, u64, bool)>(DONE_QUEUE);
        let mut checks: HashMap<InstanceId, Checks> = HashMap::new();
        let mut round = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    round += 1;
                    let workers = fleet.workers.all();
                    checks.retain(|id, _| workers.iter().any(|w| w.id == *id));
                    for w in workers {
                        let c = checks.entry(w.id).or_default();
                        if c.under_way >= CHECKS_PER_WORKER {
                            continue;
                        }
                        c.under_way += 1;
                        let (client, cfg, done_tx) = (client.clone(), cfg.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let ok = probe(&client, &w, &cfg).await;
                            let _ = done_tx.send((w, round, ok)).await;
                        });
                    }
                    crate::metrics::record_health(&fleet.model, &fleet.scheduler.lock());
                }
                Some((w, of_round, ok)) = done.recv() => {
                    let Some(c) = checks.get_mut(&w.id) else {
                        continue; // removed since
                    };
                    c.under_way = c.under_way.saturating_sub(1);
                    if of_round <= c.applied_round {
                        continue;
                    }
                    c.applied_round = of_round;
                    apply(&fleet, &w, ok, &cfg);
                }
            }
        }
    })
}
