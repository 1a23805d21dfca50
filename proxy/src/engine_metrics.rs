//! Scrapes every engine's Prometheus `/metrics` on an interval and feeds the load it reports —
//! waiting and running requests, KV-cache usage, cache size — to the scheduler. This is what lets
//! several gateways, or traffic that bypasses pdgate, show up in decisions. vLLM's names are read
//! first, SGLang's (`--enable-metrics`) otherwise, so either fleet reports its load.

use crate::config::HealthConfig;
use crate::fleet::Fleet;
use crate::http1::Client;
use crate::workers::Worker;
use pdgate_scheduler::EngineReport;
use pdgate_wire::prometheus::sample;
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

/// SGLang exports one series per scheduler. Per data-parallel group (`dp_rank`) the counts add
/// up, and the fullest group's usage is what a new request may meet; the other tensor- and
/// pipeline-parallel ranks of a group repeat its figures, so only its lowest-ranked series is read
/// (with DP attention a group's `tp_rank` is global, so the lowest is not always 0). The cache size
/// is in tokens: `max_total_num_tokens` in older releases, free + evictable + in-use slots in newer
/// ones.
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

/// One value of metric `name` per scheduler group: per `dp_rank` (all series without one form a
/// single group), the series with the lowest `(pp_rank, tp_rank)`.
fn series<'a>(text: &'a str, name: &str) -> impl Iterator<Item = f64> + 'a {
    let mut groups: Vec<(Option<&'a str>, (u64, u64), f64)> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let labels = match rest.strip_prefix('{') {
            Some(r) => match r.rfind('}') {
                Some(end) => &r[..end],
                None => continue,
            },
            None if rest.starts_with(' ') => "",
            None => continue,
        };
        let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        let rank = |key| {
            label(labels, key)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (dp, order) = (label(labels, "dp_rank"), (rank("pp_rank"), rank("tp_rank")));
        match groups.iter_mut().find(|(d, ..)| *d == dp) {
            Some(g) if order < g.1 => *g = (dp, order, value),
            Some(_) => {}
            None => groups.push((dp, order, value)),
        }
    }
    groups.into_iter().map(|(.., value)| value)
}

/// The value of label `key` in `a="x",b="y"` (exact key, quoted value; an escaped quote ends
/// nothing).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let (k, after) = rest.split_once("=\"")?;
        let bytes = after.as_bytes();
        let mut end = 0;
        while end < bytes.len() && bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        let value = after.get(..end)?;
        if k.trim() == key {
            return Some(value);
        }
        rest = after.get(end + 1..)?;
    }
}

fn sum(text: &str, name: &str) -> Option<f64> {
    series(text, name).reduce(|a, b| a + b)
}

/// `num_gpu_blocks` label of `vllm:cache_config_info`.
fn num_gpu_blocks(text: &str) -> Option<u64> {
    cache_config(text, "num_gpu_blocks")
}

/// `num_cpu_blocks` of `vllm:cache_config_info`: a host-memory tier under the prefix cache
/// (0 when absent or unset; vLLM writes `None` without one).
pub fn num_cpu_blocks(text: &str) -> u64 {
    cache_config(text, "num_cpu_blocks").unwrap_or(0)
}

fn cache_config(text: &str, name: &str) -> Option<u64> {
    let labels = text
        .lines()
        .find_map(|l| l.strip_prefix("vllm:cache_config_info{"))?;
    label(&labels[..labels.rfind('}')?], name)?.parse().ok()
}

async fn scrape(
    client: &Client,
    w: &Worker,
    timeout: Duration,
    block_size: usize,
) -> Option<(EngineReport, Option<u64>, u64)> {
    let resp = client
        .get(format!("{}/metrics", w.url))
        .timeout(timeout)
        .send()
        .await
        .ok()?;
    let text = resp.text().await.ok()?;
    let (report, gpu_blocks) = parse(&text, block_size)?;
    Some((report, gpu_blocks, num_cpu_blocks(&text)))
}

/// Every worker's own load report, scraped once, concurrently, into the scheduler.
pub async fn scrape_all(fleet: &Fleet, client: &Client, timeout: Duration, block_size: usize) {
    let workers = fleet.workers.all();
    let scrapes = workers
        .iter()
        .map(|w| scrape(client, w, timeout, block_size));
    let results = futures::future::join_all(scrapes).await;
    let mut sched = fleet.scheduler.lock();
    for (w, r) in workers.iter().zip(results) {
        if let Some((report, gpu_blocks, host_blocks)) = r {
            sched.observe_engine_tiers(w.id, report, gpu_blocks, host_blocks);
        }
    }
}

pub fn spawn(
    fleet: Arc<Fleet>,
    client: Client,
    cfg: &HealthConfig,
    block_size: usize,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = cfg.metrics_interval_ms;
    let timeout = Duration::from_millis(cfg.timeout_ms);
    (every > 0).then(|| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                scrape_all(&fleet, &client, timeout, block_size).await;
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
        assert_eq!(num_cpu_blocks(text), 0, "no host tier");
        let tiered = "vllm:cache_config_info{block_size=\"16\",num_cpu_blocks=\"512\",num_gpu_blocks=\"2048\"} 1\n";
        assert_eq!(num_cpu_blocks(tiered), 512);
        let vllm_none = "vllm:cache_config_info{block_size=\"16\",num_cpu_blocks=\"None\"} 1\n";
        assert_eq!(num_cpu_blocks(vllm_none), 0);
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
    fn labels_are_read_by_exact_name() {
        let l = r#"model_name="a,\"b\"",attn_tp_rank="3", tp_rank="1""#;
        assert_eq!(label(l, "tp_rank"), Some("1"));
        assert_eq!(label(l, "attn_tp_rank"), Some("3"));
        assert_eq!(label(l, "dp_rank"), None);
        assert_eq!(label("broken=\"", "broken"), Some(""));
        assert_eq!(label("", "x"), None);
    }

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
        // DP attention, attention-TP 1: each DP group reports from its own global tp_rank.
        let dp_attention =
            "sglang:num_running_reqs{dp_rank=\"0\",tp_rank=\"0\",attn_tp_rank=\"0\"} 1\n\
                  sglang:num_running_reqs{dp_rank=\"1\",tp_rank=\"1\",attn_tp_rank=\"0\"} 2\n\
                  sglang:num_running_reqs{dp_rank=\"2\",tp_rank=\"2\",attn_tp_rank=\"0\"} 4\n\
                  sglang:num_queue_reqs{dp_rank=\"1\",tp_rank=\"1\"} 3\n\
                  sglang:num_queue_reqs{dp_rank=\"1\",tp_rank=\"5\"} 3\n";
        let (r, _) = parse(dp_attention, 16).expect("parsed");
        assert_eq!(
            (r.running, r.waiting),
            (7, 3),
            "every DP group counted once"
        );
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
