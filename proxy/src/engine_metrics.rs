//! Scrapes every engine's Prometheus `/metrics` on an interval and feeds the load it reports —
//! waiting and running requests, KV-cache usage, cache size — to the scheduler. This is what lets
//! several gateways, or traffic that bypasses pdgate, show up in decisions. vLLM's names are read
//! first, SGLang's (`--enable-metrics`) otherwise, so either fleet reports its load.

use crate::state::AppState;
use crate::workers::Worker;
use pdgate_engine_sim::stats::sample;
use pdgate_scheduler::EngineReport;
use std::sync::Arc;
use std::time::Duration;

/// What one scrape yields: the report, and the cache size in blocks of `block_size` tokens when
/// the engine states it.
pub fn parse(text: &str, block_size: usize) -> Option<(EngineReport, Option<u64>)> {
    parse_vllm(text).or_else(|| parse_sglang(text, block_size))
}

fn parse_vllm(text: &str) -> Option<(EngineReport, Option<u64>)> {
    let waiting = sample(text, "vllm:num_requests_waiting")?;
    let running = sample(text, "vllm:num_requests_running")?;
    // vLLM renamed the usage gauge; accept either.
    let usage = sample(text, "vllm:kv_cache_usage_perc")
        .or_else(|| sample(text, "vllm:gpu_cache_usage_perc"))
        .unwrap_or(0.0);
    Some((report(waiting, running, usage), num_gpu_blocks(text)))
}

/// SGLang exports one series per scheduler: per data-parallel rank the counts add up, and the
/// fullest rank's usage is what a new request may meet; the tensor- and pipeline-parallel ranks of
/// one scheduler repeat its figures, so only rank 0 of those is read. The cache size is in tokens:
/// `max_total_num_tokens` in older releases, free + evictable + in-use slots in newer ones.
fn parse_sglang(text: &str, block_size: usize) -> Option<(EngineReport, Option<u64>)> {
    // In PD mode a request also waits in the disaggregation queues: a prefill for its decode's
    // bootstrap, a decode for KV slots and then for the KV to arrive. (A prefill whose KV is in
    // flight holds memory, which token usage shows, not compute.)
    let pd_waiting: f64 = [
        "sglang:num_prefill_bootstrap_queue_reqs",
        "sglang:num_decode_prealloc_queue_reqs",
        "sglang:num_decode_transfer_queue_reqs",
    ]
    .iter()
    .filter_map(|name| sum(text, name))
    .sum();
    let waiting = sum(text, "sglang:num_queue_reqs")? + pd_waiting;
    let running = sum(text, "sglang:num_running_reqs")?;
    let usage = series(text, "sglang:token_usage").fold(0.0, f64::max);
    let tokens = sum(text, "sglang:max_total_num_tokens").or_else(|| {
        let (free, evictable, used) = (
            sum(text, "sglang:kv_available_tokens")?,
            sum(text, "sglang:kv_evictable_tokens").unwrap_or(0.0),
            sum(text, "sglang:kv_used_tokens").unwrap_or(0.0),
        );
        Some(free + evictable + used)
    });
    let blocks = tokens
        .filter(|t| t.is_finite() && *t >= 1.0)
        .map(|t| t as u64 / block_size.max(1) as u64)
        .filter(|b| *b > 0);
    Some((report(waiting, running, usage), blocks))
}

fn report(waiting: f64, running: f64, usage: f64) -> EngineReport {
    EngineReport {
        waiting: waiting.max(0.0) as u32,
        running: running.max(0.0) as u32,
        kv_usage: usage.clamp(0.0, 1.0),
    }
}

/// Values of every series of metric `name` but those of a non-zero tensor- or pipeline-parallel
/// rank, which repeat rank 0's.
fn series<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |l| {
            let rest = l.strip_prefix(name)?;
            (rest.starts_with('{') || rest.starts_with(' ')).then_some(rest)
        })
        .filter(|rest| !secondary_rank(rest))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .filter(|v| v.is_finite())
}

fn secondary_rank(sample: &str) -> bool {
    ["tp_rank=\"", "pp_rank=\""].iter().any(|label| {
        sample
            .find(label)
            .is_some_and(|at| !sample[at + label.len()..].starts_with("0\""))
    })
}

fn sum(text: &str, name: &str) -> Option<f64> {
    series(text, name).reduce(|a, b| a + b)
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
    parse(&resp.text().await.ok()?, state.cfg.scheduler.block_size)
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
        let (r, blocks) = parse(text, 16).expect("parsed");
        assert_eq!(
            (r.running, r.waiting, r.kv_usage, blocks),
            (3, 7, 0.25, Some(2048))
        );
        assert!(parse("garbage", 16).is_none());
    }

    /// The shape SGLang serves with `--enable-metrics`, two data-parallel ranks.
    const SGLANG: &str = "# HELP sglang:num_running_reqs The number of running requests.\n\
        # TYPE sglang:num_running_reqs gauge\n\
        sglang:num_running_reqs{model_name=\"m\",dp_rank=\"0\"} 3.0\n\
        sglang:num_running_reqs{model_name=\"m\",dp_rank=\"1\"} 2.0\n\
        sglang:num_queue_reqs{model_name=\"m\",dp_rank=\"0\"} 4.0\n\
        sglang:num_queue_reqs{model_name=\"m\",dp_rank=\"1\"} 0.0\n\
        sglang:token_usage{model_name=\"m\",dp_rank=\"0\"} 0.5\n\
        sglang:token_usage{model_name=\"m\",dp_rank=\"1\"} 0.75\n\
        sglang:kv_available_tokens{model_name=\"m\",dp_rank=\"0\"} 1000.0\n\
        sglang:kv_evictable_tokens{model_name=\"m\",dp_rank=\"0\"} 24.0\n\
        sglang:kv_used_tokens{model_name=\"m\",dp_rank=\"0\"} 1024.0\n\
        sglang:cache_hit_rate{model_name=\"m\",dp_rank=\"0\"} 0.1\n";

    #[test]
    fn reads_sglang_load_summed_over_ranks_and_cache_size_in_blocks() {
        let (r, blocks) = parse(SGLANG, 16).expect("parsed");
        assert_eq!(
            (r.running, r.waiting, r.kv_usage, blocks),
            (5, 4, 0.75, Some(2048 / 16))
        );
        let old = "sglang:num_running_reqs{name=\"m\"} 1\nsglang:num_queue_reqs{name=\"m\"} 2\n\
                   sglang:token_usage{name=\"m\"} 0.1\nsglang:max_total_num_tokens{name=\"m\"} 161721.0\n";
        let (r, blocks) = parse(old, 16).expect("parsed");
        assert_eq!((r.running, r.waiting, blocks), (1, 2, Some(161_721 / 16)));
        let tp = "sglang:num_running_reqs{tp_rank=\"0\",dp_rank=\"0\"} 4\n\
                  sglang:num_running_reqs{tp_rank=\"1\",dp_rank=\"0\"} 4\n\
                  sglang:num_queue_reqs{tp_rank=\"0\",pp_rank=\"0\"} 2\n\
                  sglang:num_queue_reqs{tp_rank=\"0\",pp_rank=\"10\"} 2\n";
        let (r, _) = parse(tp, 16).expect("parsed");
        assert_eq!((r.running, r.waiting), (4, 2), "tp/pp ranks repeat rank 0");
        let pd = "sglang:num_running_reqs 1\nsglang:num_queue_reqs 1\n\
                  sglang:num_decode_prealloc_queue_reqs 2\nsglang:num_decode_transfer_queue_reqs 3\n\
                  sglang:num_prefill_inflight_queue_reqs 9\n";
        let (r, _) = parse(pd, 16).expect("parsed");
        assert_eq!(
            r.waiting, 6,
            "decode's PD queues wait too; in-flight prefills do not"
        );
        let no_size = "sglang:num_running_reqs 1\nsglang:num_queue_reqs 0\n";
        assert_eq!(parse(no_size, 16).map(|(_, b)| b), Some(None));
        assert!(
            parse("sglang:num_running_reqs 1\n", 16).is_none(),
            "no queue gauge"
        );
    }
}
