//! Shared helpers for the gateway's integration tests: a fleet on loopback, and readers for
//! engine and gateway metrics.
#![allow(dead_code)]

use pdgate::config::Config;
use pdgate::Fleet;
use pdgate_engine_sim::stats::sample;
use pdgate_scheduler::Role;
use serde_json::Value;
use std::time::Duration;

pub fn config(prefill: usize, decode: usize, time_scale: f64) -> Config {
    let mut cfg = Config::default();
    cfg.server.port = 0;
    cfg.up.prefill = prefill;
    cfg.up.decode = decode;
    cfg.up.engine.timing.time_scale = time_scale;
    cfg.up.engine.kv_blocks = 1024;
    cfg.health.interval_ms = 200;
    cfg
}

pub async fn fleet(cfg: Config) -> Fleet {
    Fleet::start(cfg).await.expect("fleet starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn post(url: &str, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

pub fn chat(content: &str, max_tokens: u32) -> Value {
    serde_json::json!({"model": "pdgate-sim-8b", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

pub fn completion(prompt: &str, max_tokens: u32) -> Value {
    serde_json::json!({"model": "pdgate-sim-8b", "prompt": prompt, "max_tokens": max_tokens})
}

pub async fn metrics_text(url: &str) -> String {
    client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Sum of one engine metric over the fleet's engines of `role`.
pub async fn engine_sum(fleet: &Fleet, role: Role, name: &str) -> f64 {
    let mut total = 0.0;
    for (r, e) in &fleet.engines {
        if *r == role {
            total += sample(&metrics_text(&e.url()).await, name).unwrap_or(0.0);
        }
    }
    total
}

/// Polls until `f` holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}
