//! Gateway overhead: the same completions sent straight to one reference engine, and through the
//! gateway's native PD handoff (reserve on decode, prefill leg writing KV through the transfer
//! engine, decode leg verifying it), with "instant" engines (`time_scale = 0`) so what is left is
//! the serving path itself.
//!
//! Rows:
//! 1. `direct`: one standalone engine serving whole requests (prefill + decode locally).
//! 2. `gateway`: a fleet of 1 prefill + 1 decode engine behind the gateway, same ~256-token prompts.
//! 3. `gateway-short`: the same fleet with ~16-token prompts, to separate the fixed per-request
//!    cost from the KV-size-dependent one.
//!
//! Env: `PDGATE_BENCH_CONCURRENCY` (default 8), `PDGATE_BENCH_REQUESTS` (default 2000),
//! `PDGATE_BENCH_JSON=path` (also write the figures as JSON there).
//!
//! Run: `cargo bench -p pdgate --bench gateway_overhead`

use pdgate::config::Config;
use pdgate::Fleet;
use pdgate_engine_sim::EngineConfig;
use pdgate_scheduler::{BuiltinTokenizer, Role};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &str = "pdgate-sim-8b";
const MAX_TOKENS: u32 = 8;
const WARMUP: usize = 100;
const LONG_TOKENS: usize = 256;
const SHORT_TOKENS: usize = 16;
/// Request indices of the warm-up, far from the measured ones so no prompt repeats.
const WARMUP_BASE: usize = 1_000_000;
const FILLER: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "red",
    "birds", "sing",
];

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a positive integer, got `{v}`")),
        Err(_) => default,
    }
}

/// A prompt of exactly `tokens` built-in-tokenizer tokens whose first tokens are unique to `idx`,
/// so no two requests share a KV block and the prefix cache cannot short-cut the work.
fn prompt(idx: usize, tokens: usize) -> String {
    let mut s = format!("req{idx:08} says");
    let mut n = BuiltinTokenizer.count(&s);
    let mut i = idx;
    while n < tokens {
        s.push(' ');
        s.push_str(FILLER[i % FILLER.len()]);
        i += 1;
        n += 1;
    }
    s
}

fn body(idx: usize, tokens: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": MODEL,
        "prompt": prompt(idx, tokens),
        "max_tokens": MAX_TOKENS,
        "stream": false,
    }))
    .expect("serialize body")
}

struct Failure {
    idx: usize,
    what: String,
}

struct Outcome {
    latencies: Vec<Duration>,
    failures: Vec<Failure>,
    wall: Duration,
}

/// Sends requests `base..base + n` to `url` from `concurrency` workers, each one request at a time.
async fn drive(
    client: &reqwest::Client,
    url: &str,
    base: usize,
    n: usize,
    concurrency: usize,
    tokens: usize,
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.to_string(), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n / concurrency + 1);
            let mut fails = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let idx = base + i;
                let payload = body(idx, tokens);
                let t0 = Instant::now();
                let res = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(payload)
                    .send()
                    .await;
                let outcome = match res {
                    Ok(r) => {
                        let status = r.status();
                        match r.bytes().await {
                            Ok(b) if status.is_success() => Ok(b),
                            Ok(b) => Err(format!(
                                "HTTP {status}: {}",
                                String::from_utf8_lossy(&b[..b.len().min(300)])
                            )),
                            Err(e) => Err(format!("HTTP {status}, body error: {e}")),
                        }
                    }
                    Err(e) => Err(format!("send error: {e}")),
                };
                let dt = t0.elapsed();
                match outcome {
                    Ok(b) => {
                        // A 200 must carry a completion; anything else counts as a failure.
                        let ok = serde_json::from_slice::<Value>(&b)
                            .ok()
                            .and_then(|v| v.pointer("/choices/0/text").cloned())
                            .is_some();
                        if ok {
                            lat.push(dt);
                        } else {
                            fails.push(Failure {
                                idx,
                                what: format!(
                                    "200 without a completion: {}",
                                    String::from_utf8_lossy(&b[..b.len().min(300)])
                                ),
                            });
                        }
                    }
                    Err(what) => fails.push(Failure { idx, what }),
                }
            }
            (lat, fails)
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for w in workers {
        let (lat, fails) = w.await.expect("worker task");
        latencies.extend(lat);
        failures.extend(fails);
    }
    Outcome {
        latencies,
        failures,
        wall: started.elapsed(),
    }
}

struct Row {
    name: &'static str,
    prompt_tokens: usize,
    requests: usize,
    ok: usize,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    rps: f64,
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    name: &'static str,
    client: &reqwest::Client,
    base_url: &str,
    n: usize,
    concurrency: usize,
    tokens: usize,
    all_failures: &mut Vec<(&'static str, Failure)>,
) -> Row {
    let url = format!("{base_url}/v1/completions");
    eprintln!("[{name}] warm-up: {WARMUP} requests");
    let warm = drive(client, &url, WARMUP_BASE, WARMUP, concurrency, tokens).await;
    eprintln!("[{name}] measuring: {n} requests at concurrency {concurrency}");
    let run = drive(client, &url, 0, n, concurrency, tokens).await;
    let failed = warm.failures.len() + run.failures.len();
    all_failures.extend(warm.failures.into_iter().map(|f| (name, f)));
    all_failures.extend(run.failures.into_iter().map(|f| (name, f)));
    let mut lat = run.latencies;
    lat.sort_unstable();
    let mean_ms = if lat.is_empty() {
        f64::NAN
    } else {
        lat.iter().map(Duration::as_secs_f64).sum::<f64>() / lat.len() as f64 * 1e3
    };
    Row {
        name,
        prompt_tokens: tokens,
        requests: n,
        ok: lat.len(),
        failed,
        p50_ms: percentile_ms(&lat, 0.50),
        p99_ms: percentile_ms(&lat, 0.99),
        mean_ms,
        rps: lat.len() as f64 / run.wall.as_secs_f64(),
    }
}

fn engine_config() -> EngineConfig {
    let mut cfg = EngineConfig {
        role: Role::Prefill,
        model: MODEL.into(),
        port: 0,
        transfer_port: 0,
        registry_url: None,
        ..EngineConfig::default()
    };
    cfg.timing.time_scale = 0.0;
    cfg
}

fn fleet_config() -> Config {
    let mut cfg = Config::default();
    cfg.server.port = 0;
    cfg.up.prefill = 1;
    cfg.up.decode = 1;
    cfg.up.engine = engine_config();
    cfg
}

fn main() {
    let concurrency = env_usize("PDGATE_BENCH_CONCURRENCY", 8).max(1);
    let n = env_usize("PDGATE_BENCH_REQUESTS", 2000).max(1);
    let json_path = std::env::var("PDGATE_BENCH_JSON")
        .ok()
        .filter(|s| !s.is_empty());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for tokens in [LONG_TOKENS, SHORT_TOKENS] {
        for idx in [0, n - 1, WARMUP_BASE + WARMUP - 1] {
            let got = BuiltinTokenizer.count(&prompt(idx, tokens));
            assert_eq!(
                got, tokens,
                "prompt {idx} has {got} tokens, wanted {tokens}"
            );
        }
    }

    let (rows, failures) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(concurrency * 2)
            .build()
            .expect("client");
        let mut failures = Vec::new();
        let mut rows = Vec::new();

        // 1. Direct: one standalone instant engine serving whole requests.
        let engine = pdgate_engine_sim::spawn(engine_config())
            .await
            .expect("engine starts");
        rows.push(
            measure(
                "direct",
                &client,
                &engine.url(),
                n,
                concurrency,
                LONG_TOKENS,
                &mut failures,
            )
            .await,
        );
        engine.stop().await;

        // 2 and 3. Through the gateway: 1 prefill + 1 decode instant engine, native PD handoff.
        let fleet = Fleet::start(fleet_config()).await.expect("fleet starts");
        rows.push(
            measure(
                "gateway",
                &client,
                &fleet.url(),
                n,
                concurrency,
                LONG_TOKENS,
                &mut failures,
            )
            .await,
        );
        rows.push(
            measure(
                "gateway-short",
                &client,
                &fleet.url(),
                n,
                concurrency,
                SHORT_TOKENS,
                &mut failures,
            )
            .await,
        );
        fleet.stop().await;
        (rows, failures)
    });
    rt.shutdown_timeout(Duration::from_secs(5));

    let (direct, gateway, short) = (&rows[0], &rows[1], &rows[2]);
    let added_p50 = gateway.p50_ms - direct.p50_ms;
    let added_p99 = gateway.p99_ms - direct.p99_ms;
    let rps_ratio = gateway.rps / direct.rps;
    let kv_p50 = gateway.p50_ms - short.p50_ms;

    println!("\n## Gateway overhead (instant engines, time_scale = 0)\n");
    println!(
        "{n} requests per row after {WARMUP} warm-up, concurrency {concurrency}, \
         max_tokens {MAX_TOKENS}, non-streaming `/v1/completions`\n"
    );
    println!("| path | prompt tok | ok/req | failed | p50 ms | p99 ms | mean ms | req/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {}/{} | {} | {:.3} | {:.3} | {:.3} | {:.0} |",
            r.name,
            r.prompt_tokens,
            r.ok,
            r.requests,
            r.failed,
            r.p50_ms,
            r.p99_ms,
            r.mean_ms,
            r.rps
        );
    }
    println!();
    println!("| gateway vs direct | value |");
    println!("|---|---:|");
    println!("| added latency p50 (ms) | {added_p50:+.3} |");
    println!("| added latency p99 (ms) | {added_p99:+.3} |");
    println!("| throughput ratio (gateway ÷ direct req/s) | {rps_ratio:.3} |");
    println!(
        "| p50 of {LONG_TOKENS}-tok minus {SHORT_TOKENS}-tok via gateway (ms) | {kv_p50:+.3} |"
    );
    println!();
    println!(
        "Note: client, gateway and engines run in one process on one tokio runtime and share \
         this machine's {threads} CPU thread(s); on a small box the gateway row also pays for the \
         extra engine and hops competing for the same cores, so this is an upper bound on \
         overhead, not a measurement of an isolated gateway."
    );

    if let Some(path) = json_path {
        let row_json = |r: &Row| {
            json!({
                "name": r.name,
                "prompt_tokens": r.prompt_tokens,
                "requests": r.requests,
                "ok": r.ok,
                "failed": r.failed,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "mean_ms": r.mean_ms,
                "rps": r.rps,
            })
        };
        let doc = json!({
            "bench": "gateway_overhead",
            "concurrency": concurrency,
            "requests": n,
            "warmup": WARMUP,
            "max_tokens": MAX_TOKENS,
            "cpu_threads": threads,
            "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
            "added_latency_p50_ms": added_p50,
            "added_latency_p99_ms": added_p99,
            "throughput_ratio": rps_ratio,
            "long_minus_short_p50_ms": kv_p50,
        });
        let text = serde_json::to_string_pretty(&doc).expect("serialize json");
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("write {path}: {e}"));
        eprintln!("wrote {path}");
    }

    if !failures.is_empty() {
        eprintln!("\n{} request(s) failed:", failures.len());
        for (name, f) in failures.iter().take(20) {
            eprintln!("  [{name}] request {}: {}", f.idx, f.what);
        }
        if failures.len() > 20 {
            eprintln!("  ... and {} more", failures.len() - 20);
        }
        std::process::exit(1);
    }
}
