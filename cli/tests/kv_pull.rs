//! Cross-instance KV reuse between reference engines, each a process of its own: a prefill pulls
//! the prefix another engine caches over the authenticated transfer plane, verifies every block,
//! and computes only the rest; a pull that cannot complete (bytes wrong, lease expired, holder
//! dead, wrong fleet secret) is recomputed and the prefill still answers.
#![allow(clippy::unwrap_used)]

mod support;

use pdgate_wire::native::{KvDescriptor, PrefillReport, EXPORT_PATH, PREFILL_PATH, RESERVE_PATH};
use pdgate_wire::prometheus::sample;
use serde_json::json;
use std::time::Duration;
use support::engines::{engine_process_with, signal, EngineProcess};
use support::{client, eventually, metrics_text};

const SECRET: (&str, &str) = (
    "PDGATE_FLEET_SECRET",
    "kv-pull-test-fleet-secret-0123456789",
);
const LENDS: (&str, &str) = ("PDGATE_ENGINE_EXPORT_BLOCKS", "256");

/// A prompt of a few dozen full blocks; `tag` makes it distinct from other tests' prompts.
fn prompt(tag: &str) -> String {
    (0..400).map(|i| format!("{tag}{i} ")).collect()
}

/// Warms `holder` with a prompt tagged `tag`, then has `puller` prefill it, pulling every full
/// block from `holder`.
async fn warm_then_pull_all(
    holder: &EngineProcess,
    puller: &EngineProcess,
    decode: &EngineProcess,
    tag: &str,
) -> PrefillReport {
    let p = prompt(tag);
    let full = warm(&holder.url, &decode.url, &p).await;
    prefill(
        &puller.url,
        &decode.url,
        "r1",
        &p,
        Some((&holder.url, full)),
    )
    .await
}

/// The engine gave up its one pull and took no block from it (it recomputed).
async fn pull_failed_once(url: &str) {
    assert_eq!(
        metric(url, "pdgate_sim_kv_pull_failures_total").await,
        1.0,
        "one pull given up"
    );
    assert_eq!(
        metric(url, "pdgate_sim_kv_blocks_pulled_total").await,
        0.0,
        "no block pulled"
    );
}

async fn engine(role: &str, env: &[(&str, &str)]) -> EngineProcess {
    engine_process_with(role, "native", 0.0, env).await
}

/// Reserves room for `prompt`'s KV on `decode`.
async fn reserve(decode: &str, rid: &str, prompt: &str) -> KvDescriptor {
    client()
        .post(format!("{decode}{RESERVE_PATH}"))
        .json(&json!({"request_id": rid, "prompt": prompt}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Reserves on `decode`, prefills on `prefill` (pulling from `holder` first, if given).
async fn prefill(
    prefill: &str,
    decode: &str,
    rid: &str,
    prompt: &str,
    pull: Option<(&str, u32)>,
) -> PrefillReport {
    let target = reserve(decode, rid, prompt).await;
    let mut body = json!({"request_id": rid, "prompt": prompt, "target": target});
    if let Some((url, upto)) = pull {
        body["pull"] = json!({"url": url, "upto_blocks": upto});
    }
    let resp = client()
        .post(format!("{prefill}{PREFILL_PATH}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a prefill never fails for its pull");
    let report: PrefillReport = resp.json().await.unwrap();
    // The decode verifies what the prefill wrote only on its leg; free the slots for the next.
    client()
        .post(format!("{decode}/pd/release"))
        .json(&json!({"request_id": rid}))
        .send()
        .await
        .unwrap();
    report
}

async fn metric(url: &str, name: &str) -> f64 {
    sample(&metrics_text(url).await, name).unwrap_or(0.0)
}

/// Warms `holder` with `p`; returns the prompt's full blocks.
async fn warm(holder: &str, decode: &str, p: &str) -> u32 {
    let r = prefill(holder, decode, "warm", p, None).await;
    assert_eq!(r.cached_tokens, 0);
    r.prompt_tokens / 16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_pulls_the_cached_prefix_verifies_it_and_computes_the_rest() {
    let holder = engine("prefill", &[SECRET, LENDS]).await;
    let puller = engine("prefill", &[SECRET]).await;
    let decode = engine("decode", &[SECRET]).await;
    let p = prompt("pull");
    let full = warm(&holder.url, &decode.url, &p).await;
    assert!(full >= 16, "{full} blocks");
    // The plan covers all but the last 4 full blocks: those, and the partial one, are computed.
    let r = prefill(
        &puller.url,
        &decode.url,
        "r1",
        &p,
        Some((&holder.url, full - 4)),
    )
    .await;
    assert_eq!(r.pulled_blocks, full - 4);
    assert_eq!(r.cached_tokens, (full - 4) * 16);
    assert_eq!(
        metric(&puller.url, "pdgate_sim_kv_blocks_pulled_total").await,
        f64::from(full - 4)
    );
    assert_eq!(
        metric(&puller.url, "pdgate_sim_kv_verify_failures_total").await,
        0.0
    );
    assert_eq!(
        metric(&holder.url, "pdgate_sim_kv_blocks_exported_total").await,
        f64::from(full - 4)
    );
    // The pulled blocks are the puller's own now: the same prompt again hits them locally, and a
    // second plan has nothing left to pull.
    let again = prefill(
        &puller.url,
        &decode.url,
        "r2",
        &p,
        Some((&holder.url, full - 4)),
    )
    .await;
    assert_eq!((again.pulled_blocks, again.cached_tokens), (0, full * 16));
    // An engine configured to lend nothing says so.
    let resp = client()
        .post(format!("{}{EXPORT_PATH}", puller.url))
        .json(&json!({"request_id": "q", "blocks": [1, 2], "skip": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // The puller's last read ended the lease, so nothing is left to expire.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        metric(&holder.url, "pdgate_sim_kv_export_leases_expired_total").await,
        0.0
    );
}

/// A decode keeps the KV it received in its prefix cache and lends it like a prefill does: the
/// scheduler counts decodes among the holders it plans pulls from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_lends_the_kv_it_received() {
    let first = engine("prefill", &[SECRET]).await;
    let puller = engine("prefill", &[SECRET]).await;
    let decode = engine("decode", &[SECRET, LENDS]).await;
    let p = prompt("decode-lends");
    // Turn one: prefilled on `first`, decoded on `decode`, which takes the KV over.
    let target = reserve(&decode.url, "t1", &p).await;
    let report: PrefillReport = client()
        .post(format!("{}{PREFILL_PATH}", first.url))
        .json(&json!({"request_id": "t1", "prompt": p, "target": target}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let full = report.prompt_tokens / 16;
    assert!(full >= 16, "{full} blocks");
    let body = json!({"model": "pdgate-sim-8b", "prompt": p, "max_tokens": 2,
        "pdgate_kv": {"request_id": "t1", "first_token": report.first_token}});
    let resp = client()
        .post(format!("{}/v1/completions", decode.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    // Turn two on another prefill: every full block comes from the decode, checked.
    let r = prefill(
        &puller.url,
        &decode.url,
        "t2",
        &p,
        Some((&decode.url, full)),
    )
    .await;
    assert_eq!((r.pulled_blocks, r.cached_tokens), (full, full * 16));
    assert_eq!(
        metric(&decode.url, "pdgate_sim_kv_blocks_exported_total").await,
        f64::from(full)
    );
    assert_eq!(
        metric(&puller.url, "pdgate_sim_kv_verify_failures_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_from_the_holder_are_refused_and_recomputed() {
    let holder = engine(
        "prefill",
        &[SECRET, LENDS, ("PDGATE_ENGINE_FAULTS__CORRUPT_KV", "true")],
    )
    .await;
    let puller = engine("prefill", &[SECRET]).await;
    let decode = engine("decode", &[SECRET]).await;
    let r = warm_then_pull_all(&holder, &puller, &decode, "corrupt").await;
    assert_eq!((r.pulled_blocks, r.cached_tokens), (0, 0), "all recomputed");
    assert_eq!(
        metric(&puller.url, "pdgate_sim_kv_verify_failures_total").await,
        1.0
    );
    pull_failed_once(&puller.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puller_without_the_fleet_secret_reads_nothing() {
    let holder = engine("prefill", &[SECRET, LENDS]).await;
    let outsider = engine(
        "prefill",
        &[("PDGATE_FLEET_SECRET", "some-other-fleet-secret-9876543210")],
    )
    .await;
    let decode = engine("decode", &[SECRET]).await;
    let p = prompt("secret");
    let full = warm(&holder.url, &decode.url, &p).await;
    // The outsider's prefill writes to decode too, which refuses it: only the pull is judged.
    let target = reserve(&decode.url, "x", &p).await;
    let body = json!({"request_id": "x", "prompt": p, "target": target,
        "pull": {"url": holder.url, "upto_blocks": full}});
    let resp = client()
        .post(format!("{}{PREFILL_PATH}", outsider.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let _ = resp.text().await;
    pull_failed_once(&outsider.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expires_before_the_read_is_recomputed() {
    let holder = engine(
        "prefill",
        &[SECRET, LENDS, ("PDGATE_ENGINE_EXPORT_LEASE_MS", "100")],
    )
    .await;
    // The puller reads well after the lease and its sweep (every 25 ms here) ended it.
    let puller = engine(
        "prefill",
        &[SECRET, ("PDGATE_ENGINE_FAULTS__PULL_DELAY_MS", "1500")],
    )
    .await;
    let decode = engine("decode", &[SECRET]).await;
    let r = warm_then_pull_all(&holder, &puller, &decode, "lease").await;
    assert_eq!((r.pulled_blocks, r.cached_tokens), (0, 0));
    assert_eq!(
        metric(&holder.url, "pdgate_sim_kv_export_leases_expired_total").await,
        1.0
    );
    assert_eq!(
        metric(&puller.url, "pdgate_sim_kv_pull_failures_total").await,
        1.0
    );
    assert_eq!(
        metric(&puller.url, "pdgate_sim_kv_verify_failures_total").await,
        1.0,
        "zeroed bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_dies_mid_pull_leaves_a_recompute() {
    let holder = engine("prefill", &[SECRET, LENDS]).await;
    let puller = engine(
        "prefill",
        &[SECRET, ("PDGATE_ENGINE_FAULTS__PULL_DELAY_MS", "3000")],
    )
    .await;
    let decode = engine("decode", &[SECRET]).await;
    let p = prompt("death");
    let full = warm(&holder.url, &decode.url, &p).await;
    let (pu, de, hu, pp) = (
        puller.url.clone(),
        decode.url.clone(),
        holder.url.clone(),
        p.clone(),
    );
    let pending =
        tokio::spawn(async move { prefill(&pu, &de, "r1", &pp, Some((&hu, full))).await });
    // The lease is granted (the puller now waits before reading): kill the holder.
    let leased = eventually(Duration::from_secs(10), || async {
        metric(&holder.url, "pdgate_sim_kv_blocks_exported_total").await > 0.0
    })
    .await;
    assert!(leased);
    signal(&holder, "-KILL");
    let r = pending.await.unwrap();
    assert_eq!((r.pulled_blocks, r.cached_tokens), (0, 0));
    assert_eq!(
        metric(&puller.url, "pdgate_sim_kv_pull_failures_total").await,
        1.0
    );
    // The recompute cached the prompt as a prefill does.
    let again = prefill(&puller.url, &decode.url, "r2", &p, None).await;
    assert_eq!(again.cached_tokens, full * 16);
}

/// Through the gateway: with `[scheduler.reuse] pull` on, a burst on one hot prefix makes the
/// scheduler plan pulls from its holder into the other prefill, which the engines carry out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_hands_planned_pulls_to_the_prefill_and_counts_them() {
    let mut cfg = support::config(2, 1, 1.0);
    cfg.scheduler.reuse.pull = true;
    cfg.scheduler.disagg.local_prefill_min_hit = 2.0; // every prefill on a prefill instance
    cfg.up.engine.export_blocks = 1024;
    cfg.up.engine.kv_blocks = 4096;
    let fleet = support::fleet(cfg).await;
    let prefix = prompt("hot");
    let warm = support::post(
        &fleet.url(),
        "/v1/completions",
        support::completion(&prefix, 1),
    )
    .await;
    assert_eq!(warm.status(), 200);
    let burst = (0..24).map(|i| {
        let url = fleet.url();
        let body = support::completion(&format!("{prefix} tail{i} {}", "x ".repeat(64)), 1);
        tokio::spawn(async move { support::post(&url, "/v1/completions", body).await.status() })
    });
    for h in burst.collect::<Vec<_>>() {
        assert_eq!(h.await.unwrap(), 200);
    }
    let gw = sample(
        &metrics_text(&fleet.url()).await,
        "pdgate_kv_pulled_blocks_total",
    )
    .unwrap_or(0.0);
    let engines = support::engine_sum(
        &fleet,
        pdgate_scheduler::Role::Prefill,
        "pdgate_sim_kv_blocks_pulled_total",
    )
    .await;
    let failures = support::engine_sum(
        &fleet,
        pdgate_scheduler::Role::Prefill,
        "pdgate_sim_kv_pull_failures_total",
    )
    .await;
    assert!(
        gw > 0.0,
        "some pull was planned and done (failures {failures})"
    );
    assert_eq!(gw, engines, "the gateway counts what the engines pulled");
}
