//! SGLang PD mode between real engines: what each leg of one request answers.
//!
//! It lives here rather than beside `protocol::sglang` because it drives whole engines through
//! `spawn`, the top of the crate, which the protocol code must not import.

use pdgate_engine_sim::{EngineConfig, EngineHandle, Protocol};
use pdgate_scheduler::{BuiltinTokenizer, Role};
use serde_json::{json, Value};

async fn engine(role: Role) -> EngineHandle {
    let mut cfg = EngineConfig {
        role,
        protocol: Protocol::Sglang,
        kv_blocks: 64,
        kv_bytes_per_token: 64,
        bootstrap_timeout_ms: 3000,
        ..EngineConfig::default()
    };
    cfg.timing.time_scale = 0.0;
    pdgate_engine_sim::spawn(cfg).await.expect("engine starts")
}

/// The real split: with `echo` + `logprobs`, the prefill leg's answer carries the prompt's
/// logprobs (and its one token's); the decode leg's only the generated tokens'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_come_from_the_prefill_leg_only() {
    let (p, d) = (engine(Role::Prefill).await, engine(Role::Decode).await);
    let prompt = "the prompt tokens are scored by whoever prefills them";
    let body = json!({"model": "pdgate-sim-8b", "prompt": prompt, "max_tokens": 3,
        "echo": true, "logprobs": 1, "bootstrap_host": "127.0.0.1",
        "bootstrap_port": p.addr.port(), "bootstrap_room": 77});
    let client = reqwest::Client::new();
    let post = |url: String| {
        client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
    };
    let (pr, dr) = tokio::join!(post(p.url()), post(d.url()));
    let pr: Value = pr.expect("prefill").json().await.expect("json");
    let dr: Value = dr.expect("decode").json().await.expect("json");
    let n = BuiltinTokenizer.count(prompt);
    let (pl, dl) = (&pr["choices"][0]["logprobs"], &dr["choices"][0]["logprobs"]);
    assert_eq!(pl["tokens"].as_array().map(Vec::len), Some(n + 1), "{pr}");
    assert_eq!(pl["tokens"][0], "the");
    assert_eq!(pl["token_logprobs"][0], Value::Null);
    assert_eq!(dl["tokens"].as_array().map(Vec::len), Some(3), "{dr}");
    assert_eq!(
        dl["tokens"][0], pl["tokens"][n],
        "same first token on both legs"
    );
    let text = dr["choices"][0]["text"].as_str().expect("text");
    assert!(text.starts_with(prompt), "decode echoes the prompt: {text}");
    p.stop().await;
    d.stop().await;
}
