//! Every engine PD protocol end to end: the gateway's adapter against reference engines that
//! enforce that protocol (real KV bytes moved and verified), stream and not, chat and
//! completions, plus the failure cases with their status codes and no leaked reservations.

mod support;

use pdgate::config::Protocol;
use pdgate_scheduler::{BlockHasher, BuiltinTokenizer, Role};
use serde_json::{json, Value};
use std::time::Duration;
use support::*;

const PROTOCOLS: [Protocol; 4] = [
    Protocol::VllmNixl,
    Protocol::VllmMooncake,
    Protocol::Sglang,
    Protocol::Trtllm,
];

fn pd_config(
    protocol: Protocol,
    prefill: usize,
    decode: usize,
    time_scale: f64,
) -> pdgate::config::Config {
    let mut cfg = config(prefill, decode, time_scale);
    cfg.up.engine.protocol = protocol;
    cfg.up.engine.bootstrap_timeout_ms = 3000;
    cfg.up.engine.reservation_ttl_secs = 3;
    cfg
}

async fn stream_text(resp: reqwest::Response, chat: bool) -> (String, Value) {
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.expect("body"));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| {
            let choice = c["choices"].get(0)?;
            if chat {
                choice["delta"]["content"].as_str()
            } else {
                choice["text"].as_str()
            }
        })
        .collect();
    let usage = chunks
        .last()
        .map(|c| c["usage"].clone())
        .unwrap_or_default();
    (text, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_serves_chat_and_completions_with_verified_kv() {
    let hasher = BlockHasher::new(16, 0);
    for protocol in PROTOCOLS {
        let fleet = fleet(pd_config(protocol, 1, 1, 0.0)).await;
        let url = fleet.url();
        let prompt = format!(
            "{protocol}: {}",
            "disaggregate prefill from decode ".repeat(12)
        );
        let tokens = BuiltinTokenizer.count(&prompt);

        let resp = post(&url, "/v1/completions", completion(&prompt, 5)).await;
        assert_eq!(resp.status(), 200, "{protocol}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["usage"]["prompt_tokens"], tokens as u64, "{protocol}");
        assert_eq!(body["usage"]["completion_tokens"], 5, "{protocol}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{protocol}");
        let plain_text = body["choices"][0]["text"]
            .as_str()
            .expect("text")
            .to_string();
        assert_eq!(BuiltinTokenizer.count(&plain_text), 5, "{protocol}");

        // Streamed, with usage: the same text as the non-streamed answer (deterministic engine).
        let mut body = completion(&prompt, 5);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (text, usage) = stream_text(post(&url, "/v1/completions", body).await, false).await;
        assert_eq!(text, plain_text, "{protocol}: streamed text matches");
        assert_eq!(usage["completion_tokens"], 5, "{protocol}");

        // Fresh prompts for chat: a prefix the decode already holds may be prefilled there.
        let prompt = format!("chat {prompt}");
        let resp = post(&url, "/v1/chat/completions", chat(&prompt, 4)).await;
        assert_eq!(resp.status(), 200, "{protocol}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{protocol}");
        let prompt2 = format!("more {prompt}");
        let mut body = chat(&prompt2, 3);
        body["stream"] = json!(true);
        let (text, _) = stream_text(post(&url, "/v1/chat/completions", body).await, true).await;
        assert_eq!(BuiltinTokenizer.count(&text), 3, "{protocol}");

        // Every request really moved its KV: each decode verified exactly the prompt's blocks.
        let chat_prompt = pdgate_wire::prompt::render_chat(&[pdgate_wire::prompt::ChatTurn {
            role: "user",
            content: &prompt,
        }]);
        let chat_prompt2 = pdgate_wire::prompt::render_chat(&[pdgate_wire::prompt::ChatTurn {
            role: "user",
            content: &prompt2,
        }]);
        let expected = (hasher.blocks_for(tokens)
            + hasher.blocks_for(BuiltinTokenizer.count(&chat_prompt))
            + hasher.blocks_for(BuiltinTokenizer.count(&chat_prompt2)))
            as f64;
        let verified =
            engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_verified_total").await;
        // The repeated completion prompt is cached on decode by now: decode may prefill it
        // locally (conditional disaggregation), or get it handed off again.
        let once_more = hasher.blocks_for(tokens) as f64;
        assert!(
            verified == expected || verified == expected + once_more,
            "{protocol}: verified {verified}, expected {expected}"
        );
        let expected = verified;
        let sent = engine_sum(&fleet, Role::Prefill, "pdgate_sim_kv_blocks_sent_total").await;
        assert_eq!(sent, expected, "{protocol}: blocks sent by prefill");
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol}: reservation leaked"
        );
        fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_pass_through_to_both_legs() {
    for protocol in PROTOCOLS {
        let fleet = fleet(pd_config(protocol, 1, 1, 0.0)).await;
        let mut body = chat("pass my extras along", 2);
        body["x_vendor_extension"] = json!({"keep": true});
        body["temperature"] = json!(0.3);
        let resp = post(&fleet.url(), "/v1/chat/completions", body).await;
        assert_eq!(resp.status(), 200, "{protocol}");
        fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_prefill_is_retried_on_another_instance() {
    for protocol in PROTOCOLS {
        let mut fleet = fleet(pd_config(protocol, 2, 1, 0.0)).await;
        let idx = fleet
            .engines
            .iter()
            .position(|(r, _)| *r == Role::Prefill)
            .expect("prefill");
        let (_, dead) = fleet.engines.remove(idx);
        dead.stop().await;
        for i in 0..3 {
            let started = std::time::Instant::now();
            let resp = post(
                &fleet.url(),
                "/v1/completions",
                completion(&format!("retry {i}"), 2),
            )
            .await;
            let status = resp.status();
            assert_eq!(
                status,
                200,
                "{protocol} request {i}: {}",
                resp.text().await.unwrap_or_default()
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{protocol}: no bootstrap wait"
            );
        }
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol}: reservation leaked"
        );
        fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_prefill_down_is_a_prompt_502_and_decode_down_too() {
    for protocol in PROTOCOLS {
        for role in [Role::Prefill, Role::Decode] {
            let mut fleet = fleet(pd_config(protocol, 1, 1, 0.0)).await;
            let idx = fleet
                .engines
                .iter()
                .position(|(r, _)| *r == role)
                .expect("engine");
            let (_, dead) = fleet.engines.remove(idx);
            dead.stop().await;
            let started = std::time::Instant::now();
            let resp = post(
                &fleet.url(),
                "/v1/chat/completions",
                chat("anyone there?", 2),
            )
            .await;
            // Prefill down: the retry finds no other prefill (503); decode down: 502.
            let want = if role == Role::Prefill { 503 } else { 502 };
            assert_eq!(resp.status(), want, "{protocol}: {role} down");
            let body: Value = resp.json().await.expect("json");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&role.to_string()),
                "{protocol}: error names the {role} leg: {body}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{protocol}: failed fast, no bootstrap wait"
            );
            assert!(
                no_reservations_left(&fleet).await,
                "{protocol}: reservation leaked"
            );
            fleet.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_frees_both_legs() {
    for protocol in PROTOCOLS {
        let fleet = fleet(pd_config(protocol, 1, 1, 1.0)).await;
        let mut body = chat("stream me a long answer please", 2000);
        body["stream"] = Value::Bool(true);
        let mut resp = post(&fleet.url(), "/v1/chat/completions", body).await;
        assert_eq!(resp.status(), 200, "{protocol}");
        let first = resp.chunk().await.expect("chunk").expect("some bytes");
        assert!(String::from_utf8_lossy(&first).starts_with("data: "));
        drop(resp);
        let stopped = eventually(Duration::from_secs(5), || async {
            engine_sum(&fleet, Role::Decode, "vllm:num_requests_running").await == 0.0
        })
        .await;
        assert!(
            stopped,
            "{protocol}: decode kept generating after the client left"
        );
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol}: reservation leaked"
        );
        fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_decode_without_its_prefill_times_out_and_frees_its_slots() {
    // The engine rule itself: a decode whose room never gets a prefill fails after the timeout.
    let fleet = fleet(pd_config(Protocol::Sglang, 1, 1, 0.0)).await;
    let (prefill, decode) = (
        fleet
            .engines
            .iter()
            .find(|(r, _)| *r == Role::Prefill)
            .expect("p")
            .1
            .url(),
        fleet
            .engines
            .iter()
            .find(|(r, _)| *r == Role::Decode)
            .expect("d")
            .1
            .url(),
    );
    let (host, port) = pdgate_gateway::workers::host_port(&prefill);
    let mut body = completion("a lonely decode", 2);
    body["bootstrap_host"] = json!(host);
    body["bootstrap_port"] = json!(port);
    body["bootstrap_room"] = json!(12345);
    let started = std::time::Instant::now();
    let resp = post(&decode, "/v1/completions", body).await;
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "waited for the prefill"
    );
    assert!(no_reservations_left(&fleet).await);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_prefill_is_a_504_and_leaks_nothing() {
    for protocol in PROTOCOLS {
        // Scaled time: this prompt's prefill takes seconds, past the one-second deadline.
        let mut cfg = pd_config(protocol, 1, 1, 300.0);
        // Admission would (rightly) turn this request away up front: it is the deadline under test.
        cfg.scheduler.slo.admission = false;
        cfg.upstream.prefill_timeout_secs = 1;
        cfg.upstream.prefill_attempts = 1;
        cfg.up.engine.reservation_ttl_secs = 1;
        let fleet = fleet(cfg).await;
        let started = std::time::Instant::now();
        let resp = post(
            &fleet.url(),
            "/v1/completions",
            completion(&"a prompt that takes long to prefill ".repeat(20), 2),
        )
        .await;
        assert_eq!(resp.status(), 504, "{protocol}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            body["error"]["code"], "upstream_timeout",
            "{protocol}: {body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{protocol}: the deadline, not the engine, ended it"
        );
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol}: reservation leaked"
        );
        fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_cut_mid_stream_is_an_sse_error_and_leaks_nothing() {
    for protocol in PROTOCOLS {
        let mut cfg = pd_config(protocol, 1, 1, 0.0);
        cfg.up.engine.faults.cut_stream_after_tokens = 2;
        let fleet = fleet(cfg).await;
        let mut body = completion(&format!("{protocol}: cut me off"), 6);
        body["stream"] = json!(true);
        let resp = post(&fleet.url(), "/v1/completions", body).await;
        assert_eq!(
            resp.status(),
            200,
            "{protocol}: the head went out before the cut"
        );
        let events = sse_events(&resp.text().await.expect("gateway ends its body cleanly"));
        let last = events.last().expect("some events");
        assert_ne!(
            last, "[DONE]",
            "{protocol}: a cut stream must not look complete"
        );
        let err: Value = serde_json::from_str(last).expect("error event is JSON");
        assert_eq!(
            err["error"]["code"], "decode_stream_interrupted",
            "{protocol}: {events:?}"
        );
        let tokens = events[..events.len() - 1]
            .iter()
            .filter(|e| e.contains("\"text\""))
            .count();
        assert_eq!(
            tokens, 2,
            "{protocol}: what came before the cut was relayed: {events:?}"
        );
        let stopped = eventually(Duration::from_secs(5), || async {
            engine_sum(&fleet, Role::Decode, "vllm:num_requests_running").await == 0.0
        })
        .await;
        assert!(stopped, "{protocol}: decode sequence still running");
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol}: reservation leaked"
        );
        fleet.stop().await;
    }
}

/// The chunks of an SSE body (before `[DONE]`, which must end it), as JSON.
async fn stream_chunks(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.expect("body"));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect()
}

/// `logprobs` objects concatenated field by field, in order.
fn concat_logprobs<'a>(parts: impl Iterator<Item = &'a Value>) -> Value {
    let mut out =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for part in parts {
        for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let more = part[field].as_array().expect("array").clone();
            out[field].as_array_mut().expect("array").extend(more);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_get_the_prefills_prompt_logprobs_in_front_in_every_protocol() {
    for protocol in [
        Protocol::Sglang,
        Protocol::VllmNixl,
        Protocol::VllmMooncake,
        Protocol::Trtllm,
    ] {
        echo_logprobs_merged(protocol).await;
    }
}

async fn echo_logprobs_merged(protocol: Protocol) {
    let fleet = fleet(pd_config(protocol, 1, 1, 0.0)).await;
    let url = fleet.url();
    let prefill = fleet
        .engines
        .iter()
        .find(|(r, _)| *r == Role::Prefill)
        .expect("prefill")
        .1
        .url();
    for stream in [false, true] {
        let prompt = format!(
            "stream={stream}: score every prompt token {}",
            "on the prefill ".repeat(6)
        );
        let n = BuiltinTokenizer.count(&prompt);
        let mut body = completion(&prompt, 4);
        body["echo"] = json!(true);
        body["logprobs"] = json!(1);
        // What one engine that ran the whole request (prompt included) answers: the reference.
        let plain: Value = post(&prefill, "/v1/completions", body.clone())
            .await
            .json()
            .await
            .expect("json");
        let want = &plain["choices"][0]["logprobs"];
        assert_eq!(want["tokens"].as_array().map(Vec::len), Some(n + 4));

        let verified_before =
            engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_verified_total").await;
        let (text, logprobs, usage, finish) = if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let chunks = stream_chunks(post(&url, "/v1/completions", body).await).await;
            let choices: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).collect();
            let first = &choices[0]["logprobs"];
            assert_eq!(
                first["tokens"].as_array().map(Vec::len),
                Some(n + 1),
                "{protocol:?}: the prompt's logprobs ride on the first chunk: {first}"
            );
            assert!(
                choices[1..].iter().all(|c| c["logprobs"]["tokens"]
                    .as_array()
                    .is_some_and(|t| t.len() == 1)),
                "later chunks carry only their own token"
            );
            let text: String = choices.iter().filter_map(|c| c["text"].as_str()).collect();
            let logprobs = concat_logprobs(choices.iter().map(|c| &c["logprobs"]));
            let finish = choices.last().expect("choices")["finish_reason"].clone();
            let usage = chunks.last().expect("usage chunk")["usage"].clone();
            (text, logprobs, usage, finish)
        } else {
            let resp = post(&url, "/v1/completions", body).await;
            assert_eq!(resp.status(), 200);
            let v: Value = resp.json().await.expect("json");
            let choice = &v["choices"][0];
            (
                choice["text"].as_str().expect("text").to_string(),
                choice["logprobs"].clone(),
                v["usage"].clone(),
                choice["finish_reason"].clone(),
            )
        };
        let verified =
            engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_verified_total").await;
        assert!(
            verified > verified_before,
            "{protocol:?} stream={stream}: disaggregated, KV handed off"
        );
        // Prompt tokens (the real ones, first without a logprob) from the prefill, then the
        // generated ones from the decode: exactly what a single engine answers.
        let tokens: Vec<&str> = BuiltinTokenizer::pieces(&prompt).collect();
        let got = logprobs["tokens"].as_array().expect("tokens");
        assert_eq!(got.len(), n + 4, "{protocol:?} stream={stream}");
        assert_eq!(
            got[..n],
            json!(tokens).as_array().expect("array")[..],
            "{protocol:?} stream={stream}"
        );
        assert_eq!(logprobs["token_logprobs"][0], Value::Null);
        assert_eq!(
            &logprobs, want,
            "{protocol:?} stream={stream}: merged = single-engine answer"
        );
        assert_eq!(text, plain["choices"][0]["text"].as_str().expect("text"));
        assert!(text.starts_with(&prompt), "echoed");
        assert_eq!(
            usage["prompt_tokens"], n as u64,
            "{protocol:?} stream={stream}"
        );
        assert_eq!(
            usage["completion_tokens"], 4,
            "{protocol:?} stream={stream}"
        );
        assert_eq!(finish, "length", "{protocol:?} stream={stream}");
    }
    // Logprobs without echo: nothing of the prompt, no merge.
    let mut body = completion("generated tokens only", 3);
    body["logprobs"] = json!(0);
    let v: Value = post(&url, "/v1/completions", body)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "{v}"
    );
    assert!(no_reservations_left(&fleet).await);
    fleet.stop().await;
}

/// A gateway in front of one SGLang prefill whose answers arrive `delay` late (its bootstrap
/// server, reached directly, is not delayed) and one decode.
async fn sglang_slow_prefill_answers(
    delay: Duration,
) -> (
    pdgate_gateway::Gateway,
    Vec<pdgate_engine_sim::EngineHandle>,
) {
    let engine = |role| {
        let mut cfg = pdgate_engine_sim::EngineConfig {
            role,
            protocol: Protocol::Sglang,
            kv_blocks: 1024,
            bootstrap_timeout_ms: 3000,
            ..Default::default()
        };
        cfg.timing.time_scale = 0.0;
        pdgate_engine_sim::spawn(cfg)
    };
    let prefill = engine(Role::Prefill).await.expect("prefill");
    let decode = engine(Role::Decode).await.expect("decode");
    let slow = delayed(prefill.url(), delay).await;
    let mut cfg = config(1, 1, 0.0);
    cfg.workers = vec![
        pdgate::config::WorkerConfig {
            url: slow.url.clone(),
            role: Role::Prefill,
            protocol: Protocol::Sglang,
            bootstrap_port: Some(prefill.addr.port()),
            kv_events: None,
            kv_events_replay: None,
        },
        pdgate::config::WorkerConfig {
            url: decode.url(),
            role: Role::Decode,
            protocol: Protocol::Sglang,
            bootstrap_port: None,
            kv_events: None,
            kv_events_replay: None,
        },
    ];
    let gateway = pdgate_gateway::Gateway::start(cfg.gateway())
        .await
        .expect("gateway");
    gateway.check_health().await;
    (gateway, vec![prefill, decode])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_waits_for_the_prefill_answer_only_when_merging_prompt_logprobs() {
    let delay = Duration::from_millis(1500);
    let (gateway, engines) = sglang_slow_prefill_answers(delay).await;
    let url = gateway.url();

    // No echo: decode streams as soon as its head arrives, whole, before prefill even answers.
    let mut body = completion(&"no prompt logprobs, no wait ".repeat(4), 4);
    body["stream"] = json!(true);
    body["logprobs"] = json!(1);
    let started = std::time::Instant::now();
    let resp = post(&url, "/v1/completions", body).await;
    let chunks = stream_chunks(resp).await;
    assert!(
        started.elapsed() < delay / 2,
        "decode was held for the prefill: {:?}",
        started.elapsed()
    );
    assert_eq!(chunks.len(), 4);

    // Echo + logprobs: the prefill's answer is awaited and merged.
    for stream in [false, true] {
        let prompt = format!("stream={stream}: prompt logprobs, so wait ");
        let mut body = completion(&prompt, 2);
        body["echo"] = json!(true);
        body["logprobs"] = json!(1);
        body["stream"] = json!(stream);
        let started = std::time::Instant::now();
        let resp = post(&url, "/v1/completions", body).await;
        let logprobs = if stream {
            let chunks = stream_chunks(resp).await;
            chunks[0]["choices"][0]["logprobs"].clone()
        } else {
            let v: Value = resp.json().await.expect("json");
            v["choices"][0]["logprobs"].clone()
        };
        assert!(
            started.elapsed() >= delay,
            "stream={stream}: merged without waiting?"
        );
        let n = BuiltinTokenizer.count(&prompt);
        assert_eq!(
            logprobs["tokens"][0], "stream",
            "stream={stream}: {logprobs}"
        );
        assert!(
            logprobs["tokens"].as_array().is_some_and(|t| t.len() > n),
            "stream={stream}: {logprobs}"
        );
    }
    gateway.stop().await;
    for e in engines {
        e.stop().await;
    }
}
