//! Scheduler decision latency with 16, 256 and 4,096 instances over an index of 1M blocks, and the
//! index's real memory per block (measured with a counting allocator, next to its own estimate).
//!
//! `cargo bench -p pdgate-scheduler --bench decision`

use criterion::{black_box, Criterion};
use pdgate_scheduler::{
    BlockHash, BlockHasher, InstanceSpec, PolicyKind, RequestKey, Role, Scheduler, SchedulerConfig,
    Tokenizer,
};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::time::{Duration, Instant};

// Counts bytes alongside the system allocator, so the index's real size can be read.
#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes live on the heap now.
fn live_bytes() -> isize {
    let s = ALLOC.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize + s.bytes_reallocated
}

const INDEXED_BLOCKS: u64 = 1_000_000;
const GROUP_BLOCKS: u64 = 128;

/// A fleet of `n` instances (half prefill, half decode) whose index holds 1M (block, instance)
/// entries: groups of 128-block prefixes, each cached on two prefill instances.
fn fleet(n: u32, policy: PolicyKind) -> Scheduler {
    let cfg = SchedulerConfig {
        policy,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg);
    let prefill: Vec<_> = (0..n / 2)
        .map(|_| {
            s.add_instance(
                Role::Prefill,
                InstanceSpec {
                    kv_capacity_blocks: 1 << 22,
                    marks_copies: true,
                },
            )
        })
        .collect();
    for _ in 0..n / 2 {
        s.add_instance(
            Role::Decode,
            InstanceSpec {
                kv_capacity_blocks: 1 << 22,
                marks_copies: true,
            },
        );
    }
    let groups = INDEXED_BLOCKS / GROUP_BLOCKS / 2;
    for g in 0..groups {
        let blocks: Vec<BlockHash> = (0..GROUP_BLOCKS)
            .map(|i| BlockHash(g * 1_000 + i))
            .collect();
        for k in 0..2 {
            let id = prefill[((g * 2 + k) as usize) % prefill.len()];
            s.blocks_stored(id, &blocks, Duration::ZERO);
        }
    }
    s
}

fn request(i: u64) -> RequestKey {
    let group = (i * 7919) % (INDEXED_BLOCKS / GROUP_BLOCKS / 2);
    let mut blocks: Vec<BlockHash> = (0..96).map(|b| BlockHash(group * 1_000 + b)).collect();
    blocks.extend((0..32).map(|b| BlockHash(u64::MAX - i * 64 - b)));
    RequestKey {
        prompt_tokens: 2048,
        max_tokens: 128,
        blocks,
    }
}

fn decide(s: &mut Scheduler, i: u64) {
    match s.schedule(&request(i), Duration::from_millis(i)) {
        Ok(d) => s.decode_done(black_box(d).ticket, Duration::from_millis(i)),
        Err(e) => {
            black_box(e);
        }
    }
}

fn percentiles(n: u32, policy: PolicyKind) -> (f64, f64) {
    let mut s = fleet(n, policy);
    let mut samples: Vec<f64> = (0..20_000u64)
        .map(|i| {
            let t = Instant::now();
            decide(&mut s, i);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(30)
        .measurement_time(Duration::from_secs(3));
    let mut group = c.benchmark_group("decision");
    for n in [16u32, 256, 4096] {
        for policy in [PolicyKind::Slo, PolicyKind::CacheAware] {
            let mut s = fleet(n, policy);
            let mut i = 0u64;
            group.bench_function(format!("{policy}/{n}"), |b| {
                b.iter(|| {
                    i += 1;
                    decide(&mut s, i)
                })
            });
        }
    }
    group.finish();

    println!("\n| policy | instances | p50 µs | p99 µs |\n|---|---:|---:|---:|");
    for policy in [
        PolicyKind::Slo,
        PolicyKind::CacheAware,
        PolicyKind::LeastLoad,
    ] {
        for n in [16u32, 256, 4096] {
            let (p50, p99) = percentiles(n, policy);
            println!("| {policy} | {n} | {p50:.2} | {p99:.2} |");
        }
    }

    tokenization();

    let before = live_bytes();
    let s = fleet(16, PolicyKind::Slo);
    let after = live_bytes();
    let entries = INDEXED_BLOCKS;
    println!(
        "\nindex: {entries} entries, {:.1} MiB allocated = {:.0} bytes/entry (the index's own estimate: {:.0} bytes/entry)",
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) as f64 / entries as f64,
        s.index_bytes() as f64 / entries as f64
    );
}

/// Prefix-key cost on a long prompt (~32k built-in tokens): tokenise plus chain block hashes, for
/// the built-in tokenizer and, when `PDGATE_TOKENIZER_JSON` names one, a real HuggingFace one.
fn tokenization() {
    let text: String = (0..32_000).map(|i| format!(" word{}", i % 997)).collect();
    let mut tokenizers = vec![("builtin", Tokenizer::builtin())];
    if let Some(t) = std::env::var("PDGATE_TOKENIZER_JSON")
        .ok()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| Tokenizer::from_json_bytes(&b).ok())
    {
        tokenizers.push(("huggingface", t));
    }
    let hasher = BlockHasher::new(16, 0);
    println!("\n| tokenizer | prompt bytes | tokens | key ms (median of 9) | MB/s |\n|---|---:|---:|---:|---:|");
    for (name, t) in &tokenizers {
        let mut times: Vec<f64> = (0..9)
            .map(|_| {
                let start = Instant::now();
                let ids = t.encode(&text);
                black_box(hasher.full_blocks(&ids));
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let ms = times[4];
        println!(
            "| {name} | {} | {} | {ms:.2} | {:.0} |",
            text.len(),
            t.count(&text),
            text.len() as f64 / ms / 1e3
        );
    }
}
