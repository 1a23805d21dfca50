//! Batched prompts on `/v1/completions` against a real fleet on loopback: each prompt routed as
//! its own request (own id on the engines), answers merged in OpenAI's order with summed usage,
//! streamed and not, in every protocol; bad prompt arrays are 400s naming `prompt`; one failing
//! prompt fails the batch and leaves no KV reservation or running sequence behind.

mod support;

use pdgate::config::{Protocol, WorkerConfig};
use pdgate::Fleet;
use pdgate_scheduler::{BuiltinTokenizer, PolicyKind, Role};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

const PROMPTS: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog",
    "Disaggregated serving splits prefill from decode",
    "third prompt",
];

fn batch(prompts: &[&str], max_tokens: u32) -> Value {
    json!({"model": "pdgate-sim-8b", "prompt": prompts, "max_tokens": max_tokens})
}

fn streamed(mut body: Value, include_usage: bool) -> Value {
    body["stream"] = json!(true);
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Each prompt's answer when sent alone (the reference engine's reply is a function of the prompt).
async fn singles(url: &str, prompts: &[&str], max_tokens: u32) -> Vec<Value> {
    let mut out = Vec::new();
    for p in prompts {
        let resp = post(url, "/v1/completions", completion(p, max_tokens)).await;
        assert_eq!(resp.status(), 200, "single {p:?}");
        out.push(resp.json().await.expect("json"));
    }
    out
}

fn summed_usage(answers: &[Value]) -> Value {
    let sum = |k: &str| -> u64 {
        answers
            .iter()
            .map(|a| a["usage"][k].as_u64().expect("usage field"))
            .sum()
    };
    json!({"prompt_tokens": sum("prompt_tokens"), "completion_tokens": sum("completion_tokens"),
           "total_tokens": sum("total_tokens")})
}

fn text_of(answer: &Value) -> &str {
    answer["choices"][0]["text"].as_str().expect("text")
}

/// A merged non-streamed answer's (index, text) pairs, in the order given.
fn choices(body: &Value) -> Vec<(u64, String)> {
    body["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            let index = c["index"].as_u64().expect("index");
            (index, c["text"].as_str().expect("text").to_string())
        })
        .collect()
}

/// A merged stream: text per choice index, the usage chunks, the ids seen, and the raw events.
struct Merged {
    texts: BTreeMap<u64, String>,
    usage_chunks: Vec<Value>,
    ids: Vec<String>,
    events: Vec<String>,
}

async fn read_stream(resp: reqwest::Response) -> Merged {
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(&resp.text().await.expect("body"));
    let mut merged = Merged {
        texts: BTreeMap::new(),
        usage_chunks: Vec::new(),
        ids: Vec::new(),
        events: events.clone(),
    };
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(e).expect("chunk json");
        merged
            .ids
            .push(chunk["id"].as_str().unwrap_or("").to_string());
        let list = chunk["choices"].as_array().expect("choices");
        if list.is_empty() {
            merged.usage_chunks.push(chunk["usage"].clone());
        }
        for c in list {
            let index = c["index"].as_u64().expect("index");
            let piece = c["text"].as_str().expect("text");
            merged.texts.entry(index).or_default().push_str(piece);
        }
    }
    merged
}

fn expected_texts(singles: &[Value]) -> BTreeMap<u64, String> {
    (0u64..)
        .zip(singles)
        .map(|(i, s)| (i, text_of(s).to_string()))
        .collect()
}

async fn batch_status(url: &str, body: Value) -> (u16, Value) {
    let resp = post(url, "/v1/completions", body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_prompts_answer_each_prompt_at_its_index_with_summed_usage() {
    let fleet = fleet(config(2, 2, 0.0)).await;
    let url = fleet.url();
    let singles = singles(&url, &PROMPTS, 5).await;
    let texts: Vec<&str> = singles.iter().map(text_of).collect();
    assert!(
        texts[0] != texts[1] && texts[1] != texts[2],
        "distinct replies, so the order is checkable: {texts:?}"
    );

    let resp = client()
        .post(format!("{url}/v1/completions"))
        .header("x-request-id", "batch-a")
        .json(&batch(&PROMPTS, 5))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "batch-a");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(
        body["id"], "cmpl-batch-a",
        "one id, the single-request form"
    );
    assert_eq!(body["model"], "pdgate-sim-8b");
    let want: Vec<(u64, String)> = (0u64..).zip(texts.iter().map(|t| t.to_string())).collect();
    assert_eq!(choices(&body), want, "prompt i's reply at index i");
    assert!(body["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .all(|c| c["finish_reason"] == "length"));
    assert_eq!(body["usage"], summed_usage(&singles));

    // A one-element array is the plain string.
    let (status, one) = batch_status(&url, batch(&[PROMPTS[1]], 5)).await;
    assert_eq!(status, 200);
    assert_eq!(choices(&one), vec![(0, texts[1].to_string())]);
    assert_eq!(one["usage"], singles[1]["usage"]);
    assert!(no_reservations_left(&fleet).await, "reservation leaked");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_batch_interleaves_renumbered_chunks_then_one_usage_and_one_done() {
    let fleet = fleet(config(2, 2, 0.0)).await;
    let url = fleet.url();
    let singles = singles(&url, &PROMPTS, 6).await;

    let resp = client()
        .post(format!("{url}/v1/completions"))
        .header("x-request-id", "batch-s")
        .json(&streamed(batch(&PROMPTS, 6), true))
        .send()
        .await
        .expect("sent");
    let merged = read_stream(resp).await;
    let dones = merged.events.iter().filter(|e| *e == "[DONE]").count();
    assert_eq!(dones, 1, "one [DONE]: {:?}", merged.events);
    assert_eq!(merged.events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(merged.texts, expected_texts(&singles), "text per index");
    assert_eq!(
        merged.usage_chunks,
        vec![summed_usage(&singles)],
        "per-prompt usage chunks replaced by one summed"
    );
    let usage_event: Value =
        serde_json::from_str(&merged.events[merged.events.len() - 2]).expect("json");
    assert_eq!(usage_event["choices"], json!([]), "usage chunk comes last");
    assert!(
        merged.ids.iter().all(|id| id == "cmpl-batch-s"),
        "{:?}",
        merged.ids
    );
    // 6 token chunks per prompt, one choice each.
    assert_eq!(merged.events.len(), 3 * 6 + 2);

    // Without include_usage: no usage chunk at all.
    let resp = post(&url, "/v1/completions", streamed(batch(&PROMPTS, 6), false)).await;
    let merged = read_stream(resp).await;
    assert!(merged.usage_chunks.is_empty());
    assert_eq!(merged.texts, expected_texts(&singles));
    assert!(no_reservations_left(&fleet).await, "reservation leaked");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prompt_arrays_are_400s_naming_prompt() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.max_batch_prompts = 4;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let body = |prompt: Value| json!({"model": "pdgate-sim-8b", "prompt": prompt});
    for (case, prompt) in [
        ("empty", json!([])),
        ("non-string", json!(["a", 2])),
        ("null element", json!(["a", null])),
        ("over the limit", json!(["a", "b", "c", "d", "e"])),
        ("token ids", json!([1, 2, 3])),
        ("batched token ids", json!([[1, 2], [3]])),
        ("object", json!({"text": "a"})),
    ] {
        let (status, err) = batch_status(&url, body(prompt)).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (400, Some("prompt")),
            "{case}: {err}"
        );
        assert_eq!(err["error"]["type"], "invalid_request_error", "{case}");
    }
    let (_, err) = batch_status(&url, body(json!([1, 2, 3]))).await;
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("token-id")),
        "{err}"
    );
    // At the limit is fine.
    let (status, _) = batch_status(&url, batch(&["a", "b", "c", "d"], 1)).await;
    assert_eq!(status, 200);
    // `n` other than 1 stays refused for batches as for single prompts (engines get `n: 1`).
    let mut n2 = batch(&["a", "b"], 1);
    n2["n"] = json!(2);
    let (status, err) = batch_status(&url, n2).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("n")));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_work_in_every_pd_protocol() {
    for protocol in [
        Protocol::VllmNixl,
        Protocol::VllmMooncake,
        Protocol::Sglang,
        Protocol::Trtllm,
    ] {
        let mut cfg = config(1, 1, 0.0);
        cfg.up.engine.protocol = protocol;
        cfg.up.engine.bootstrap_timeout_ms = 3000;
        cfg.up.engine.reservation_ttl_secs = 3;
        let fleet = fleet(cfg).await;
        let url = fleet.url();
        let prompts: Vec<String> = PROMPTS.iter().map(|p| format!("{protocol}: {p}")).collect();
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let singles = singles(&url, &prompts, 4).await;

        let (status, body) = batch_status(&url, batch(&prompts, 4)).await;
        assert_eq!(status, 200, "{protocol}: {body}");
        let want: Vec<(u64, String)> = (0u64..)
            .zip(singles.iter().map(|s| text_of(s).to_string()))
            .collect();
        assert_eq!(choices(&body), want, "{protocol}");
        assert_eq!(body["usage"], summed_usage(&singles), "{protocol}");

        let resp = post(&url, "/v1/completions", streamed(batch(&prompts, 4), true)).await;
        let merged = read_stream(resp).await;
        assert_eq!(merged.texts, expected_texts(&singles), "{protocol}");
        assert_eq!(
            merged.usage_chunks,
            vec![summed_usage(&singles)],
            "{protocol}"
        );
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol}: reservation leaked"
        );
        fleet.stop().await;
    }
}

/// A fleet of one prefill and two decode workers, round robin: the second decode worker is a
/// proxy in front of the same decode engine that records request ids and can be told to fail.
async fn fleet_with_proxied_decode(time_scale: f64) -> (Fleet, std::sync::Arc<Flaky>) {
    let mut cfg = config(1, 1, time_scale);
    cfg.scheduler.policy = PolicyKind::RoundRobin;
    cfg.scheduler.slo.admission = false;
    let fleet = fleet(cfg).await;
    let decode = fleet
        .engines
        .iter()
        .find(|(r, _)| *r == Role::Decode)
        .expect("decode")
        .1
        .url();
    let proxy = flaky(decode).await;
    proxy.set_failing(false);
    fleet.gateway.add_worker(&WorkerConfig {
        url: proxy.url.clone(),
        role: Role::Decode,
        protocol: Protocol::Native,
        bootstrap_port: None,
        kv_events: None,
        kv_events_replay: None,
    });
    fleet.gateway.check_health().await;
    (fleet, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_prompt_reaches_the_engines_under_its_own_request_id() {
    let (fleet, proxy) = fleet_with_proxied_decode(0.0).await;
    let prompts = ["id one", "id two", "id three", "id four"];
    let resp = client()
        .post(format!("{}/v1/completions", fleet.url()))
        .header("x-request-id", "batch-ids")
        .json(&batch(&prompts, 2))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(choices(&body).len(), 4);
    let mut seen = proxy.request_ids();
    seen.sort();
    seen.dedup();
    // Round robin over two decode workers: half the prompts' decode legs went through the proxy.
    assert_eq!(seen.len(), 2, "{seen:?}");
    let derived: Vec<String> = (0..4).map(|i| format!("batch-ids-{i}")).collect();
    assert!(seen.iter().all(|id| derived.contains(id)), "{seen:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_decode_fails_the_batch_and_cancels_the_other_prompts() {
    // Real time: the healthy prompt is still decoding when its partner's decode leg fails.
    let (fleet, proxy) = fleet_with_proxied_decode(1.0).await;
    proxy.set_failing(true);
    let started = std::time::Instant::now();
    let (status, err) = batch_status(
        &fleet.url(),
        batch(&["a long answer, please", "this one fails"], 1000),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "failed at once, not after the other prompt's 1,000 tokens"
    );
    assert_eq!(status, 502, "{err}");
    assert_eq!(err["error"]["code"], "decode_failed", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("prompt ")),
        "says which prompt: {err}"
    );
    let stopped = eventually(Duration::from_secs(5), || async {
        engine_sum(&fleet, Role::Decode, "vllm:num_requests_running").await == 0.0
    })
    .await;
    assert!(stopped, "the other prompt kept decoding");
    assert!(no_reservations_left(&fleet).await, "reservation leaked");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_too_large_for_the_decode_pool_fails_the_batch() {
    let mut cfg = config(1, 1, 0.0);
    cfg.up.engine.kv_blocks = 64;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let big = "overflowing ".repeat(1500);
    assert!(BuiltinTokenizer.count(&big) > 64 * 16, "more than the pool");
    // The pool's size reaches the scheduler with the first metrics scrape.
    let admitted_as_too_large = eventually(Duration::from_secs(5), || async {
        post(&url, "/v1/completions", completion(&big, 2))
            .await
            .status()
            == 400
    })
    .await;
    assert!(admitted_as_too_large, "the scheduler learnt the pool size");

    let (status, err) = batch_status(&url, batch(&["small one", "small two", &big], 2)).await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "the too-large prompt's own error: {err}"
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("prompt 2:")),
        "{err}"
    );
    assert!(no_reservations_left(&fleet).await, "reservation leaked");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_its_prefill_down_fails_and_leaks_nothing() {
    for protocol in [Protocol::Native, Protocol::Sglang] {
        let mut cfg = config(1, 1, 0.0);
        cfg.up.engine.protocol = protocol;
        cfg.up.engine.bootstrap_timeout_ms = 3000;
        cfg.up.engine.reservation_ttl_secs = 3;
        let mut fleet = fleet(cfg).await;
        let idx = fleet
            .engines
            .iter()
            .position(|(r, _)| *r == Role::Prefill)
            .expect("prefill");
        let (_, dead) = fleet.engines.remove(idx);
        dead.stop().await;
        let (status, err) = batch_status(&fleet.url(), batch(&PROMPTS, 2)).await;
        // As for one prompt: the retry finds no other prefill.
        assert_eq!(status, 503, "{protocol}: {err}");
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol}: reservation leaked"
        );
        fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_a_streamed_batch_stops_every_prompt() {
    let fleet = fleet(config(1, 1, 1.0)).await;
    let body = streamed(batch(&["stream one long", "stream two long"], 2000), false);
    let mut resp = post(&fleet.url(), "/v1/completions", body).await;
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.expect("chunk").expect("some bytes");
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(resp);
    let stopped = eventually(Duration::from_secs(5), || async {
        engine_sum(&fleet, Role::Decode, "vllm:num_requests_running").await == 0.0
    })
    .await;
    assert!(stopped, "decode kept generating after the client left");
    assert!(no_reservations_left(&fleet).await, "reservation leaked");
    fleet.stop().await;
}
