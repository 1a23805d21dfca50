//! Active health checking: every worker's `/health` on an interval with a deadline, folded into
//! hysteresis thresholds; flips are pushed into the scheduler so a down worker gets no traffic.

use crate::config::HealthConfig;
use crate::fleet::Fleet;
use crate::http1::Client;
use std::sync::Arc;
use std::time::Duration;

/// Checks every worker once, concurrently.
pub async fn check_all(fleet: &Fleet, client: &Client, cfg: &HealthConfig) {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let checks = fleet.workers.all().into_iter().map(|w| {
        let client = client.clone();
        async move {
            let ok = matches!(
                client.get(format!("{}/health", w.url)).timeout(timeout).send().await,
                Ok(r) if r.status().is_success()
            );
            (w, ok)
        }
    });
    for (w, ok) in futures::future::join_all(checks).await {
        if let Some(healthy) = w.observe(ok, cfg.fail_threshold, cfg.recover_threshold) {
            fleet.scheduler.lock().set_healthy(w.id, healthy);
            if healthy {
                fleet.workers.health_recovered(&w);
                tracing::info!(worker = %w.url, role = %w.role, "worker up");
            } else {
                tracing::warn!(worker = %w.url, role = %w.role, "worker down");
            }
        }
    }
    crate::metrics::record_health(&fleet.model, &fleet.scheduler.lock());
}

/// Runs checks forever; the first pass runs at once.
pub fn spawn(fleet: Arc<Fleet>, client: Client, cfg: HealthConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            check_all(&fleet, &client, &cfg).await;
        }
    })
}
