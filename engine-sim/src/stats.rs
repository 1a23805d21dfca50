//! The engine's counters and gauges, rendered in Prometheus text format under vLLM's names (so
//! anything that scrapes vLLM can scrape this) plus `pdgate_sim_*` counters of KV blocks moved.
//!
//! Plain atomics rather than the global `metrics` recorder: several engines may share a process
//! (tests, the simulator), and each must report only its own numbers.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_used_blocks: AtomicU64,
    pub kv_total_blocks: AtomicU64,
    pub prefix_queries_tokens: AtomicU64,
    pub prefix_hits_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub requests_finished: AtomicU64,
    pub reservations_active: AtomicU64,
    pub kv_blocks_sent: AtomicU64,
    pub kv_bytes_sent: AtomicU64,
    pub kv_blocks_received: AtomicU64,
    pub kv_blocks_verified: AtomicU64,
    pub kv_verify_failures: AtomicU64,
    pub bootstrap_queries: AtomicU64,
    pub bootstrap_offers: AtomicU64,
    pub bootstrap_offers_refused: AtomicU64,
    /// Holder side of cross-instance reuse: blocks lent under a lease, leases that expired.
    pub kv_blocks_exported: AtomicU64,
    pub kv_export_leases_expired: AtomicU64,
    /// Puller side: blocks pulled and verified into the cache, pulls given up (recomputed).
    pub kv_blocks_pulled: AtomicU64,
    pub kv_pull_failures: AtomicU64,
    /// Prompt blocks found in the host tier (copied back, not computed).
    pub kv_host_hit_blocks: AtomicU64,
    /// Blocks held in the host tier now.
    pub kv_host_blocks: AtomicU64,
    /// Blocks of handed-off prompts marked evicted first (the pair's other engine keeps them).
    pub kv_evict_first_blocks: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// `cache_blocks`: the engine's KV cache in blocks, whatever its role. A prefill engine in a
    /// push-mode protocol has no pool others write into, but its cache still holds prefixes, and
    /// the gateway sizes its picture of that cache from `num_gpu_blocks`.
    pub fn render(
        &self,
        model: &str,
        block_size: usize,
        cache_blocks: usize,
        host_blocks: usize,
    ) -> String {
        let g = |a: &AtomicU64| a.load(Relaxed);
        let total = g(&self.kv_total_blocks);
        let usage = if total == 0 {
            0.0
        } else {
            g(&self.kv_used_blocks) as f64 / total as f64
        };
        let label = format!("model_name=\"{model}\"");
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{label}}} {value}"
            );
        };
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Requests in the running batch.",
            g(&self.running).to_string(),
        );
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Requests waiting to be scheduled.",
            g(&self.waiting).to_string(),
        );
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage, 1 means 100 percent.",
            format!("{usage}"),
        );
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            g(&self.prefix_queries_tokens).to_string(),
        );
        metric(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            g(&self.prefix_hits_tokens).to_string(),
        );
        metric(
            "vllm:prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            g(&self.prompt_tokens).to_string(),
        );
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Tokens generated.",
            g(&self.generation_tokens).to_string(),
        );
        metric(
            "vllm:request_success_total",
            "counter",
            "Requests finished.",
            g(&self.requests_finished).to_string(),
        );
        metric(
            "pdgate_sim_kv_reservations_active",
            "gauge",
            "Decode KV reservations not yet released.",
            g(&self.reservations_active).to_string(),
        );
        metric(
            "pdgate_sim_kv_blocks_sent_total",
            "counter",
            "KV blocks written to decode engines.",
            g(&self.kv_blocks_sent).to_string(),
        );
        metric(
            "pdgate_sim_kv_bytes_sent_total",
            "counter",
            "KV bytes written to decode engines.",
            g(&self.kv_bytes_sent).to_string(),
        );
        metric(
            "pdgate_sim_kv_blocks_received_total",
            "counter",
            "KV blocks landed from prefill engines.",
            g(&self.kv_blocks_received).to_string(),
        );
        metric(
            "pdgate_sim_kv_blocks_verified_total",
            "counter",
            "Landed KV blocks whose bytes checked out.",
            g(&self.kv_blocks_verified).to_string(),
        );
        metric(
            "pdgate_sim_kv_verify_failures_total",
            "counter",
            "Decode legs refused because a KV block was wrong.",
            g(&self.kv_verify_failures).to_string(),
        );
        metric(
            "pdgate_sim_bootstrap_queries_total",
            "counter",
            "GET /pd/bootstrap answered (a decode learning where to send offers).",
            g(&self.bootstrap_queries).to_string(),
        );
        metric(
            "pdgate_sim_bootstrap_offers_total",
            "counter",
            "Bootstrap offers received from decode engines as transfer notifications.",
            g(&self.bootstrap_offers).to_string(),
        );
        metric(
            "pdgate_sim_bootstrap_offers_refused_total",
            "counter",
            "Bootstrap offers refused (duplicate room, too many rooms); their decode times out.",
            g(&self.bootstrap_offers_refused).to_string(),
        );
        metric(
            "pdgate_sim_kv_blocks_exported_total",
            "counter",
            "Cached KV blocks lent to peer engines under a lease.",
            g(&self.kv_blocks_exported).to_string(),
        );
        metric(
            "pdgate_sim_kv_export_leases_expired_total",
            "counter",
            "Export leases that ended at their deadline rather than on the puller's notification.",
            g(&self.kv_export_leases_expired).to_string(),
        );
        metric(
            "pdgate_sim_kv_blocks_pulled_total",
            "counter",
            "KV blocks pulled from peer engines and verified into the prefix cache.",
            g(&self.kv_blocks_pulled).to_string(),
        );
        metric(
            "pdgate_sim_kv_pull_failures_total",
            "counter",
            "Planned pulls given up (holder unreachable, lease gone, bytes wrong); recomputed.",
            g(&self.kv_pull_failures).to_string(),
        );
        metric(
            "pdgate_sim_kv_host_hit_blocks_total",
            "counter",
            "Prompt blocks found in the host tier and copied back instead of computed.",
            g(&self.kv_host_hit_blocks).to_string(),
        );
        metric(
            "pdgate_sim_kv_evict_first_blocks_total",
            "counter",
            "Blocks of handed-off prompts marked to be evicted first: the other engine of the pair keeps them.",
            g(&self.kv_evict_first_blocks).to_string(),
        );
        metric(
            "pdgate_sim_kv_host_cache_blocks",
            "gauge",
            "Blocks held in the host-memory tier.",
            g(&self.kv_host_blocks).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Cache configuration.\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{block_size=\"{block_size}\",num_gpu_blocks=\"{cache_blocks}\",num_cpu_blocks=\"{host_blocks}\"}} 1"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_wire::prometheus::sample;

    #[test]
    fn renders_vllm_names_that_sample_reads_back() {
        let s = Stats::default();
        Stats::add(&s.prefix_hits_tokens, 32);
        s.kv_total_blocks.store(10, Relaxed);
        s.kv_used_blocks.store(4, Relaxed);
        let text = s.render("m", 16, 64, 0);
        assert_eq!(sample(&text, "vllm:prefix_cache_hits_total"), Some(32.0));
        assert!(
            text.contains("num_gpu_blocks=\"64\""),
            "the cache's size, not the pool's: {text}"
        );
        assert_eq!(sample(&text, "vllm:kv_cache_usage_perc"), Some(0.4));
        assert_eq!(sample(&text, "vllm:num_requests_running"), Some(0.0));
        assert_eq!(sample(&text, "vllm:nope"), None);
    }
}
