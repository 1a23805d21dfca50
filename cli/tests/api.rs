//! The gateway's OpenAI surface and its errors, against a real fleet on loopback.

mod support;

use pdgate::config::{Protocol, WorkerConfig};
use pdgate_gateway::Gateway;
use pdgate_scheduler::{BuiltinTokenizer, Role};
use serde_json::{json, Value};
use std::time::Duration;
use support::*;

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    assert!(
        body["error"]["message"].is_string(),
        "OpenAI error shape: {body}"
    );
    assert!(
        body["error"]["type"].is_string(),
        "OpenAI error shape: {body}"
    );
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_non_streaming() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let resp = post(&fleet.url(), "/v1/chat/completions", chat("hello there", 7)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["object"], "chat.completion");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(BuiltinTokenizer.count(text), 7, "usage matches the text");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let again: Value = post(&fleet.url(), "/v1/chat/completions", chat("hello there", 7))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        again["choices"][0]["message"]["content"], body["choices"][0]["message"]["content"],
        "deterministic"
    );

    let resp = post(
        &fleet.url(),
        "/v1/completions",
        completion("Once upon a time", 3),
    )
    .await;
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(
        body["usage"]["prompt_tokens"],
        BuiltinTokenizer.count("Once upon a time") as u64
    );
    assert_eq!(
        body["usage"]["total_tokens"],
        body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) + 3
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_with_usage_and_done() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let mut body = chat("stream please", 5);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&fleet.url(), "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(&resp.text().await.expect("body"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    assert_eq!(chunks.len(), 6, "5 token chunks + usage chunk");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[..5]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(BuiltinTokenizer.count(&text), 5);
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    let usage = &chunks[5];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_completions() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let mut body = completion("count", 3);
    body["stream"] = json!(true);
    let text = post(&fleet.url(), "/v1/completions", body)
        .await
        .text()
        .await
        .expect("body");
    let events = sse_events(&text);
    assert_eq!(events.len(), 4);
    let c: Value = serde_json::from_str(&events[0]).expect("json");
    assert_eq!(c["object"], "text_completion");
    assert!(c["choices"][0]["text"].is_string());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_with_the_right_status() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.max_body_bytes = 64 * 1024;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let c = client();

    let resp = c
        .post(format!("{url}/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .expect("sent");
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );

    let (status, body) = error_of(
        post(
            &url,
            "/v1/chat/completions",
            json!({"model": "pdgate-sim-8b"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("messages"))
    );

    let (status, body) = error_of(
        post(
            &url,
            "/v1/completions",
            json!({"model": "pdgate-sim-8b", "prompt": "x", "max_tokens": -1}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("max_tokens"))
    );

    let (status, body) = error_of(
        post(
            &url,
            "/v1/chat/completions",
            json!({"model": "gpt-9", "messages": []}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "validation before model lookup: {body}");
    let (status, body) =
        error_of(post(&url, "/v1/chat/completions", chat_for("gpt-9")).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    let huge = json!({"model": "pdgate-sim-8b", "prompt": "x".repeat(100 * 1024)});
    let (status, body) = error_of(post(&url, "/v1/completions", huge).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );

    let (status, _) = error_of(c.get(format!("{url}/v1/nope")).send().await.expect("sent")).await;
    assert_eq!(status, 404);

    // The engine's own limit (4,096) surfaces as the client's error, not a gateway failure.
    let (status, body) =
        error_of(post(&url, "/v1/completions", completion("x", 5_000)).await).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("max_tokens"))
    );
    // A request no decode instance could ever hold is a 400 from admission, not a 429 "retry".
    let (status, body) =
        error_of(post(&url, "/v1/completions", completion("x", 1_000_000)).await).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("max_tokens"))
    );
    fleet.stop().await;
}

fn chat_for(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_honoured_or_minted_and_echoed() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let url = fleet.url();
    let resp = client()
        .post(format!("{url}/v1/completions"))
        .header("x-request-id", "abc-123")
        .json(&completion("hi", 2))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body["id"], "cmpl-abc-123",
        "the decode engine saw the same id"
    );
    let resp = post(&url, "/v1/completions", completion("hi", 2)).await;
    let minted = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(minted.len(), 36, "a uuid: {minted}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_ready_and_admin_workers() {
    let mut cfg = config(2, 1, 0.0);
    cfg.server.admin_token = Some("admintoken".into());
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let c = client();
    let models: Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "pdgate-sim-8b");
    assert_eq!(
        c.get(format!("{url}/health"))
            .send()
            .await
            .expect("sent")
            .status(),
        200
    );
    let ready: Value = c
        .get(format!("{url}/ready"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (
            ready["healthy_prefill"].as_u64(),
            ready["healthy_decode"].as_u64()
        ),
        (Some(2), Some(1))
    );

    assert_eq!(
        c.get(format!("{url}/admin/workers"))
            .send()
            .await
            .expect("sent")
            .status(),
        401
    );
    let workers: Value = c
        .get(format!("{url}/admin/workers"))
        .bearer_auth("admintoken")
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let list = workers.as_array().expect("array");
    assert_eq!(list.len(), 3);
    assert_eq!(list.iter().filter(|w| w["role"] == "prefill").count(), 2);
    assert!(list
        .iter()
        .all(|w| w["healthy"] == true && w["protocol"] == "native" && w["load"]["in_flight"] == 0));

    // The registry is the fleet's: `up` keys it with its secret, and the admin token may read it.
    let segments: Value = c
        .get(format!("{url}/registry/segments"))
        .bearer_auth("admintoken")
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        segments.as_array().map(Vec::len),
        Some(1),
        "the decode engine registered its KV segment"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_the_data_plane() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.api_key = Some("sk-test".into());
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let (status, body) = error_of(post(&url, "/v1/completions", completion("hi", 1)).await).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    let ok = client()
        .post(format!("{url}/v1/completions"))
        .bearer_auth("sk-test")
        .json(&completion("hi", 1))
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 200);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_pair_is_503_and_not_ready() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.port = 0;
    cfg.health.interval_ms = 50;
    cfg.workers = vec![
        WorkerConfig {
            url: "http://127.0.0.1:9".into(),
            role: Role::Prefill,
            protocol: Protocol::Native,
            bootstrap_port: None,
        },
        WorkerConfig {
            url: "http://127.0.0.1:9".into(),
            role: Role::Decode,
            protocol: Protocol::Native,
            bootstrap_port: None,
        },
    ];
    let gw = Gateway::start(cfg.gateway()).await.expect("gateway");
    let url = gw.url();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = error_of(post(&url, "/v1/completions", completion("hi", 1)).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no_healthy_pair"))
    );
    assert_eq!(
        client()
            .get(format!("{url}/ready"))
            .send()
            .await
            .expect("sent")
            .status(),
        503
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_prefill_is_retried_on_another_instance() {
    let mut fleet = fleet(config(2, 1, 0.0)).await;
    // Stop the first prefill engine while the gateway still believes it healthy.
    let idx = fleet
        .engines
        .iter()
        .position(|(r, _)| *r == Role::Prefill)
        .expect("prefill");
    let (_, dead) = fleet.engines.remove(idx);
    dead.stop().await;
    for i in 0..4 {
        let resp = post(
            &fleet.url(),
            "/v1/completions",
            completion(&format!("retry me {i}"), 2),
        )
        .await;
        assert_eq!(resp.status(), 200, "request {i}");
    }
    let retries = series(
        &metrics_text(&fleet.url()).await,
        "pdgate_retries_total",
        &[("role", "prefill"), ("outcome", "retried")],
    );
    assert!(
        retries.is_some_and(|r| r >= 1.0),
        "retry counted: {retries:?}"
    );
    assert_eq!(
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_reservations_active").await,
        0.0,
        "failed attempts released their reservations"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_on_inference_routes_are_405_naming_post() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let resp = client()
            .get(format!("{}{path}", fleet.url()))
            .send()
            .await
            .expect("sent");
        assert_eq!(
            resp.headers().get("allow").map(|v| v.as_bytes()),
            Some(&b"POST"[..]),
            "{path}"
        );
        let (status, body) = error_of(resp).await;
        assert_eq!(status, 405, "{path}: {body}");
        assert_eq!(body["error"]["param"], "method", "{body}");
    }
    fleet.stop().await;
}
