//! One copy per handoff: the engine told to mark its copy of a handed-off prompt evicts it
//! before any other block (reference engines, each a process of its own), and a gateway in
//! front of a roomy fleet tells one engine of every pair once it knows the fleet's prompts.

mod support;

use pdgate_scheduler::{BuiltinTokenizer, Role};
use pdgate_wire::native::{KvDescriptor, PrefillReport, DECODE_FIELD, PREFILL_PATH, RESERVE_PATH};
use serde_json::json;
use support::engines::{engine_process_with, EngineProcess};
use support::{chat, config, engine_sum, fleet, metrics_text, post, series};

/// A prompt of `words` words tagged `tag` (same-length tags give the same token count).
fn prompt(tag: &str, words: usize) -> String {
    (0..words).map(|i| format!("{tag}{i:03} ")).collect()
}

fn full_blocks(p: &str) -> u32 {
    (BuiltinTokenizer.encode(p).len() / 16) as u32
}

/// A whole native handoff of `p`: reserve on `decode`, prefill on `prefill`, then the decode
/// leg (one token); `mark` names the engine told to mark its copy, if any.
async fn handoff(
    prefill: &EngineProcess,
    decode: &EngineProcess,
    rid: &str,
    p: &str,
    mark: Option<Role>,
) {
    let resp = post(
        &decode.url,
        RESERVE_PATH,
        json!({"request_id": rid, "prompt": p}),
    )
    .await;
    let target: KvDescriptor = resp.json().await.expect("descriptor");
    let on_prefill = mark == Some(Role::Prefill);
    let body = json!({"request_id": rid, "prompt": p, "target": target, "evict_first": on_prefill});
    let resp = post(&prefill.url, PREFILL_PATH, body).await;
    assert_eq!(resp.status(), 200);
    let report: PrefillReport = resp.json().await.expect("report");
    let on_decode = mark == Some(Role::Decode);
    let leg =
        json!({"request_id": rid, "first_token": report.first_token, "evict_first": on_decode});
    let body = json!({"model": "pdgate-sim-8b", "prompt": p, "max_tokens": 1, DECODE_FIELD: leg});
    let resp = post(&decode.url, "/v1/completions", body).await;
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
}

/// Full blocks of `p` the engine at `e` finds cached: a plain one-token completion there, read
/// off its prefix-hit counter.
async fn cached_blocks(e: &EngineProcess, p: &str) -> u32 {
    let before = e.metric("vllm:prefix_cache_hits_total").await;
    let body = json!({"model": "pdgate-sim-8b", "prompt": p, "max_tokens": 1});
    assert_eq!(post(&e.url, "/v1/completions", body).await.status(), 200);
    ((e.metric("vllm:prefix_cache_hits_total").await - before) / 16.0) as u32
}

/// A, B, C fill the cache of the `side` engine; D then needs half a prompt of room. With B's
/// copy marked there, B gives it from its end (its head still hits) and the older A stays
/// whole; unmarked, the least recently used A goes, head first, and nothing of it hits any more.
async fn a_marked_copy_goes_first(side: Role) {
    let [a, b, c, d] = ["aa", "bb", "cc", "dd"].map(|t| prompt(t, 120));
    let [na, nb, nc, nd] = [&a, &b, &c, &d].map(|p| full_blocks(p));
    // D overflows the cache by half its blocks, fewer than B holds.
    let over = nd - nd / 2;
    assert!(over >= 4 && over < nb, "{na} {nb} {nc} {nd}");
    let blocks = (na + nb + nc + nd / 2).to_string();
    let small: &[(&str, &str)] = &[("PDGATE_ENGINE_KV_BLOCKS", &blocks)];
    let env = |role| if role == side { small } else { &[] };
    for marked in [true, false] {
        let p = engine_process_with("prefill", "native", 0.0, env(Role::Prefill)).await;
        let dec = engine_process_with("decode", "native", 0.0, env(Role::Decode)).await;
        for (rid, prompt, mark) in [
            ("a", &a, None),
            ("b", &b, marked.then_some(side)),
            ("c", &c, None),
            ("d", &d, None),
        ] {
            handoff(&p, &dec, rid, prompt, mark).await;
        }
        let probed = if side == Role::Prefill { &p } else { &dec };
        let (a_hit, c_hit) = (
            cached_blocks(probed, &a).await,
            cached_blocks(probed, &c).await,
        );
        let marked_blocks = probed
            .metric("pdgate_sim_kv_evict_first_blocks_total")
            .await;
        if marked {
            assert_eq!((a_hit, c_hit), (na, nc), "A and C untouched");
            assert_eq!(
                cached_blocks(probed, &b).await,
                nb - over,
                "B lost its last {over}"
            );
            assert_eq!(marked_blocks, f64::from(nb));
        } else {
            assert_eq!((a_hit, c_hit), (0, nc), "the oldest, A, evicted");
            assert_eq!(marked_blocks, 0.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_marks_its_copy_once_the_blocks_are_sent() {
    a_marked_copy_goes_first(Role::Prefill).await;
}

/// The decode marks the copy it received after its own insert of the prompt, which would
/// otherwise make the copy ordinary again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_marks_the_copy_it_received_when_told() {
    a_marked_copy_goes_first(Role::Decode).await;
}

/// A roomy fleet of one prefill and one decode behind the gateway: the first hundred requests
/// teach the scheduler the fleet's typical prompt, and from then on every handoff names one
/// engine to mark its copy, both engines among them over twenty prompts; each marks at least
/// the prompt's full blocks for every time it is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_names_one_engine_of_each_pair_once_it_knows_the_fleets_prompts() {
    let mut cfg = config(1, 1, 0.0);
    cfg.scheduler.disagg.local_prefill_max_tokens = 0;
    cfg.scheduler.disagg.local_prefill_min_hit = 2.0; // every prompt handed over
                                                      // With pulls a decode's copy serves later prefills too, so both sides keep a share (without,
                                                      // and with no prompt cached almost whole, the prefill keeps every one).
    cfg.scheduler.reuse.pull = true;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    support::engine_reports_read(&url).await;
    let mut min_blocks = u32::MAX;
    for i in 0..120 {
        let p = prompt(&format!("q{i:03}x"), 40);
        let resp = post(&url, "/v1/chat/completions", chat(&p, 2)).await;
        assert_eq!(resp.status(), 200, "request {i}");
        min_blocks = min_blocks.min(full_blocks(&p));
    }
    let gw = metrics_text(&url).await;
    let named = |side| {
        series(
            &gw,
            "pdgate_kv_one_copy_handoffs_total",
            &[("evict_first", side)],
        )
    };
    let (on_prefill, on_decode) = (
        named("prefill").unwrap_or(0.0),
        named("decode").unwrap_or(0.0),
    );
    assert!(
        on_prefill > 0.0 && on_decode > 0.0,
        "{on_prefill} / {on_decode}"
    );
    assert!(on_prefill + on_decode >= 20.0, "{on_prefill} + {on_decode}");
    // Each engine marked what it was named for: at least the prompt's own full blocks (the chat
    // template adds a few) once per handoff.
    for (role, named) in [(Role::Prefill, on_prefill), (Role::Decode, on_decode)] {
        let marked = engine_sum(&fleet, role, "pdgate_sim_kv_evict_first_blocks_total").await;
        assert!(
            marked >= named * f64::from(min_blocks),
            "{role:?}: {marked} blocks for {named}"
        );
    }
}
