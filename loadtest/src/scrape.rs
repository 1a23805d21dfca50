//! Server-side counters around a run: the gateway's `/metrics` (`pdgate_*` counters) and, through
//! the gateway's `/admin/workers`, each engine's vLLM-named prefix-cache and token counters, so
//! the report states the prefix-cache hit rate the engines saw and how load spread over them.
//!
//! Best effort and read-only: a target that is not pdgate (no `/admin/workers`, no `/metrics`)
//! yields no server section, never an error, and nothing here is on the dispatch path.

use pdgate_wire::prometheus::sample;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Sum over series of every `pdgate_*_total` counter of the gateway.
    pub gateway: BTreeMap<String, f64>,
    pub instances: Vec<InstanceCounters>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceCounters {
    pub id: String,
    pub role: String,
    pub url: String,
    pub prefix_hits_tokens: f64,
    pub prefix_queries_tokens: f64,
    pub prompt_tokens: f64,
    pub generation_tokens: f64,
    pub requests_finished: f64,
}

/// What changed between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    pub gateway: BTreeMap<String, f64>,
    pub instances: Vec<InstanceCounters>,
    /// Hit tokens over queried tokens summed over the engines (None when nothing was queried).
    pub cache_hit_rate: Option<f64>,
}

pub async fn snapshot(
    http: &reqwest::Client,
    base: &str,
    admin_token: Option<&str>,
) -> Option<Snapshot> {
    let base = base.trim_end_matches('/');
    let text = get(http, &format!("{base}/metrics"), None).await?;
    let gateway = counters(&text, "pdgate_");
    let mut instances = Vec::new();
    if let Some(body) = get(http, &format!("{base}/admin/workers"), admin_token).await {
        let workers: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        for w in workers {
            let (Some(url), id) = (w["url"].as_str(), w["id"].to_string()) else {
                continue;
            };
            let Some(m) = get(
                http,
                &format!("{}/metrics", url.trim_end_matches('/')),
                None,
            )
            .await
            else {
                continue;
            };
            let s = |name| sample(&m, name).unwrap_or(0.0);
            instances.push(InstanceCounters {
                id: id.trim_matches('"').to_string(),
                role: w["role"].as_str().unwrap_or("?").to_string(),
                url: url.to_string(),
                prefix_hits_tokens: s("vllm:prefix_cache_hits_total"),
                prefix_queries_tokens: s("vllm:prefix_cache_queries_total"),
                prompt_tokens: s("vllm:prompt_tokens_total"),
                generation_tokens: s("vllm:generation_tokens_total"),
                requests_finished: s("vllm:request_success_total"),
            });
        }
    }
    Some(Snapshot { gateway, instances })
}

async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> Option<String> {
    let mut req = http.get(url).timeout(std::time::Duration::from_secs(10));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

/// Sums every sample of each counter whose name starts with `prefix` and ends in `_total`.
pub fn counters(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !name.ends_with("_total") {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *out.entry(name.to_string()).or_insert(0.0) += v;
        }
    }
    out
}

pub fn delta(before: &Snapshot, after: &Snapshot) -> ServerStats {
    let gateway = after
        .gateway
        .iter()
        .map(|(k, v)| (k.clone(), v - before.gateway.get(k).copied().unwrap_or(0.0)))
        .collect();
    let instances: Vec<InstanceCounters> = after
        .instances
        .iter()
        .map(|a| {
            let b = before
                .instances
                .iter()
                .find(|b| b.url == a.url)
                .cloned()
                .unwrap_or_default();
            InstanceCounters {
                id: a.id.clone(),
                role: a.role.clone(),
                url: a.url.clone(),
                prefix_hits_tokens: a.prefix_hits_tokens - b.prefix_hits_tokens,
                prefix_queries_tokens: a.prefix_queries_tokens - b.prefix_queries_tokens,
                prompt_tokens: a.prompt_tokens - b.prompt_tokens,
                generation_tokens: a.generation_tokens - b.generation_tokens,
                requests_finished: a.requests_finished - b.requests_finished,
            }
        })
        .collect();
    let hits: f64 = instances.iter().map(|i| i.prefix_hits_tokens).sum();
    let queries: f64 = instances.iter().map(|i| i.prefix_queries_tokens).sum();
    ServerStats {
        gateway,
        cache_hit_rate: (queries > 0.0).then(|| hits / queries),
        instances,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_series_and_skip_non_totals() {
        let text = "# HELP x\npdgate_requests_total{api=\"chat\",status=\"2xx\"} 3\npdgate_requests_total{api=\"completions\",status=\"2xx\"} 4\npdgate_workers_healthy{role=\"prefill\"} 2\npdgate_kv_transfer_bytes_total 100\nother_total 9\n";
        let c = counters(text, "pdgate_");
        assert_eq!(c.get("pdgate_requests_total"), Some(&7.0));
        assert_eq!(c.get("pdgate_kv_transfer_bytes_total"), Some(&100.0));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn delta_gives_the_hit_rate_of_the_run_only() {
        let inst = |h, q| InstanceCounters {
            url: "u".into(),
            prefix_hits_tokens: h,
            prefix_queries_tokens: q,
            ..Default::default()
        };
        let before = Snapshot {
            gateway: BTreeMap::new(),
            instances: vec![inst(100.0, 1000.0)],
        };
        let after = Snapshot {
            gateway: BTreeMap::new(),
            instances: vec![inst(400.0, 2000.0)],
        };
        let d = delta(&before, &after);
        assert_eq!(d.cache_hit_rate, Some(0.3));
    }
}
