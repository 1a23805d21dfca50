//! The native PD handoff end to end on loopback: every request is prefilled on one engine, its KV
//! blocks really land in a decode engine's memory and are verified there, and the counts agree.

mod support;

use pdgate_scheduler::{BlockHasher, BuiltinTokenizer, Role};
use pdgate_wire::prometheus::sample;
use serde_json::Value;
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_block_sent_is_received_and_verified() {
    let fleet = fleet(config(2, 2, 0.0)).await;
    let url = fleet.url();
    let n = 6;
    let mut expected_blocks = 0.0;
    let hasher = BlockHasher::new(16, 0);
    for i in 0..n {
        let prompt = format!(
            "request {i}: {}",
            "tell me about prefill and decode disaggregation ".repeat(10 + i)
        );
        let resp = post(&url, "/v1/completions", completion(&prompt, 4)).await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        let tokens = BuiltinTokenizer.count(&prompt);
        assert_eq!(body["usage"]["prompt_tokens"], tokens as u64);
        assert_eq!(body["usage"]["completion_tokens"], 4);
        expected_blocks += hasher.blocks_for(tokens) as f64;
    }
    assert!(expected_blocks > 20.0, "prompts span many blocks");
    let sent = engine_sum(&fleet, Role::Prefill, "pdgate_sim_kv_blocks_sent_total").await;
    let received = engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_received_total").await;
    let verified = engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_verified_total").await;
    assert_eq!(sent, expected_blocks);
    assert_eq!(received, expected_blocks);
    assert_eq!(verified, expected_blocks);
    // Both prefill engines were used (least_load spreads sequential equal requests by id order
    // only when loads differ, so check the fleet as a whole did all the work it reports).
    let gw = metrics_text(&url).await;
    let bytes = sample(&gw, "pdgate_kv_transfer_bytes_total").expect("bytes metric");
    let block_bytes = 16.0 * 8192.0;
    assert!(
        bytes >= expected_blocks * block_bytes,
        "gateway counted {bytes} bytes"
    );
    assert_eq!(
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_reservations_active").await,
        0.0
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_kv_fails_loudly_and_frees_the_reservation() {
    let mut cfg = config(1, 1, 0.0);
    cfg.up.engine.faults.corrupt_kv = true;
    let fleet = fleet(cfg).await;
    let resp = post(
        &fleet.url(),
        "/v1/chat/completions",
        chat("a prompt whose KV gets corrupted in flight", 8),
    )
    .await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "kv_verification_failed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("failed verification"),
        "{body}"
    );
    assert!(body.get("choices").is_none(), "no garbage text");
    assert_eq!(
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_verify_failures_total").await,
        1.0
    );
    assert_eq!(
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_blocks_verified_total").await,
        0.0
    );
    let freed = eventually(Duration::from_secs(5), || async {
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_reservations_active").await == 0.0
    })
    .await;
    assert!(freed, "reservation leaked");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prefix_hits_the_prefill_cache() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let prompt = "a long shared system prompt that repeats across requests ".repeat(8);
    for _ in 0..2 {
        let resp = post(&fleet.url(), "/v1/completions", completion(&prompt, 2)).await;
        assert_eq!(resp.status(), 200);
    }
    let hits = engine_sum(&fleet, Role::Prefill, "vllm:prefix_cache_hits_total").await;
    let full_blocks = (BuiltinTokenizer.count(&prompt) / 16 * 16) as f64;
    assert_eq!(hits, full_blocks, "second request reuses every full block");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_frees_the_decode_reservation() {
    // Real-time engines so the stream is long enough to walk away from.
    let fleet = fleet(config(1, 1, 1.0)).await;
    let mut body = chat("stream me a long answer please", 2000);
    body["stream"] = Value::Bool(true);
    let mut resp = post(&fleet.url(), "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.expect("chunk").expect("some bytes");
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let running = engine_sum(&fleet, Role::Decode, "vllm:num_requests_running").await;
    assert_eq!(running, 1.0, "decode is generating");
    assert_eq!(
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_reservations_active").await,
        1.0
    );
    drop(resp);
    let freed = eventually(Duration::from_secs(5), || async {
        engine_sum(&fleet, Role::Decode, "pdgate_sim_kv_reservations_active").await == 0.0
            && engine_sum(&fleet, Role::Decode, "vllm:num_requests_running").await == 0.0
    })
    .await;
    assert!(freed, "decode kept the reservation after the client left");
    let generated = engine_sum(&fleet, Role::Decode, "vllm:generation_tokens_total").await;
    assert!(
        generated < 1999.0,
        "decode stopped early ({generated} tokens)"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_keeps_heartbeating_segments_and_drops_stale_ones() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.segment_ttl_secs = 2;
    cfg.up.engine.registry_heartbeat_secs = 1;
    // A known fleet secret, so this test can present the registry token as an engine does.
    let dir = std::env::temp_dir().join(format!("pdgate-handoff-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, "handoff-test-fleet-secret-0123456789").expect("write");
    cfg.server.fleet_secret_file = Some(secret_file.clone());
    cfg.up.engine.fleet_secret_file = Some(secret_file.clone());
    let token = pdgate_wire::fleet::FleetSecret::load(Some(&secret_file))
        .expect("secret")
        .expect("configured")
        .registry_token();
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    // A segment whose owner died without deregistering: published once, never refreshed.
    let ghost = serde_json::json!({"name": "ghost", "endpoint": "127.0.0.1:9", "len": 4096, "transport": "tcp"});
    assert_eq!(
        client()
            .post(format!("{url}/registry/segments"))
            .bearer_auth(&token)
            .json(&ghost)
            .send()
            .await
            .expect("sent")
            .status(),
        201
    );
    let names = || async {
        let list: Value = client()
            .get(format!("{url}/registry/segments"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        list.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["name"].as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(names().await.len(), 2);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let left = names().await;
    assert_eq!(
        left.len(),
        1,
        "only the live decode engine's segment remains: {left:?}"
    );
    assert!(left[0].starts_with("kv-"));
    // The handoff still works through the refreshed entry.
    assert_eq!(
        post(
            &url,
            "/v1/completions",
            completion(&"still moving KV ".repeat(20), 2)
        )
        .await
        .status(),
        200
    );
    fleet.stop().await;
}

/// `pdgate up` with no secret configured makes one for its fleet: handoffs go over the
/// authenticated transfer plane, and a process outside the fleet cannot reach the KV pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_up_fleets_transfer_plane_is_keyed_by_a_generated_secret() {
    let cfg = config(1, 1, 0.0);
    assert!(cfg.up.engine.fleet_secret_file.is_none());
    let fleet = fleet(cfg).await;
    let resp = post(
        &fleet.url(),
        "/v1/completions",
        completion(&"a prompt long enough to span blocks ".repeat(8), 2),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let decode = fleet
        .engines
        .iter()
        .find(|(r, _)| *r == Role::Decode)
        .map(|(_, e)| e)
        .expect("a decode engine");
    let plane = &decode.engine.transfer;
    let kv = decode.engine.pool.as_ref().expect("kv pool").segment();
    assert!(
        plane.admission_stats().admitted >= 1,
        "the handoff came in authenticated"
    );
    let stranger = pdgate_transfer::TransferEngine::start(Default::default())
        .await
        .expect("engine");
    let refused = stranger.discover(&plane.endpoint(), kv.name()).await;
    assert!(
        matches!(&refused, Err(pdgate_transfer::TransferError::Remote(m)) if m.contains("fleet secret")),
        "{refused:?}"
    );
    assert!(plane.admission_stats().refused >= 1);
    fleet.stop().await;
}
