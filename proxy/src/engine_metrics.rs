//! Scrapes every engine's Prometheus `/metrics` (vLLM names) on an interval and feeds the load it
//! reports — waiting and running requests, KV-cache usage, cache size — to the scheduler. This is
//! what lets several gateways, or traffic that bypasses pdgate, show up in decisions.

use crate::state::AppState;
use crate::workers::Worker;
use pdgate_engine_sim::stats::sample;
use pdgate_scheduler::EngineReport;
use std::sync::Arc;
use std::time::Duration;

/// What one scrape yields: the report, and the cache size in blocks when the engine states it.
pub fn parse(text: &str) -> Option<(EngineReport, Option<u64>)> {
    let waiting = sample(text, "vllm:num_requests_waiting")?;
    let running = sample(text, "vllm:num_requests_running")?;
    // vLLM renamed the usage gauge; accept either.
    let usage = sample(text, "vllm:kv_cache_usage_perc")
        .or_else(|| sample(text, "vllm:gpu_cache_usage_perc"))
        .unwrap_or(0.0);
    let report = EngineReport {
        waiting: waiting.max(0.0) as u32,
        running: running.max(0.0) as u32,
        kv_usage: usage.clamp(0.0, 1.0),
    };
    Some((report, num_gpu_blocks(text)))
}

/// `num_gpu_blocks` label of `vllm:cache_config_info`.
fn num_gpu_blocks(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))?;
    let rest = &line[line.find("num_gpu_blocks=\"")? + "num_gpu_blocks=\"".len()..];
    rest[..rest.find('"')?].parse().ok()
}

async fn scrape(
    state: &AppState,
    w: &Worker,
    timeout: Duration,
) -> Option<(EngineReport, Option<u64>)> {
    let resp = state
        .client
        .get(format!("{}/metrics", w.url))
        .timeout(timeout)
        .send()
        .await
        .ok()?;
    parse(&resp.text().await.ok()?)
}

pub async fn scrape_all(state: &AppState) {
    let timeout = Duration::from_millis(state.cfg.health.timeout_ms);
    let workers = state.workers.all();
    let results =
        futures::future::join_all(workers.iter().map(|w| scrape(state, w, timeout))).await;
    let mut sched = state.scheduler.lock();
    for (w, r) in workers.iter().zip(results) {
        if let Some((report, blocks)) = r {
            sched.observe_engine(w.id, report, blocks);
        }
    }
}

pub fn spawn(state: Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    let every = state.cfg.health.metrics_interval_ms;
    (every > 0).then(|| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                scrape_all(&state).await;
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_load_and_cache_size() {
        let text = "# HELP x\nvllm:num_requests_running{model_name=\"m\"} 3\nvllm:num_requests_waiting{model_name=\"m\"} 7\n\
                    vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\nvllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"2048\"} 1\n";
        let (r, blocks) = parse(text).expect("parsed");
        assert_eq!(
            (r.running, r.waiting, r.kv_usage, blocks),
            (3, 7, 0.25, Some(2048))
        );
        assert!(parse("garbage").is_none());
    }
}
