//! docs/transfer.md's loopback figures without the `pdgate` binary:
//! `cargo bench -p pdgate-transfer --bench loopback` runs tcp and shm through
//! `bench::run_loopback` next to their baselines (plain loopback socket copy,
//! single memcpy of the same bytes), ROUNDS times alternating, and prints the
//! median of each figure, plus 4 KiB latency and the slice-size sweep behind
//! `DEFAULT_SLICE_SIZE`. `PDGATE_BENCH_SECS` sets seconds per run (default 2).

use std::time::Duration;

use pdgate_transfer::bench::{self, BenchOp, BenchOptions, BenchResult};
use pdgate_transfer::TransportChoice;

const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let secs: f64 = std::env::var("PDGATE_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let run = |o: &BenchOptions| -> BenchResult {
        rt.block_on(bench::run_loopback(o)).expect("bench run")
    };
    let base = BenchOptions {
        block_size: 1 << 20,
        batch_size: 16,
        threads: 1,
        duration: Duration::from_secs_f64(secs),
        ..BenchOptions::default()
    };
    println!("| figure | transport | GB/s (median of {ROUNDS}) | baseline GB/s | ratio |");
    println!("|---|---|---|---|---|");
    for choice in [TransportChoice::Tcp, TransportChoice::Shm] {
        let o = BenchOptions {
            transport: choice,
            ..base.clone()
        };
        let (mut got, mut baseline) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let r = run(&o);
            got.push(r.gb_per_s);
            let region = o.segment_len();
            baseline.push(match choice {
                TransportChoice::Shm => bench::baseline_memcpy(r.bytes, o.block_size, region),
                _ => {
                    bench::baseline_socket(r.bytes, o.block_size, region).expect("socket baseline")
                }
            });
        }
        let (g, b) = (median(got), median(baseline));
        let name = if choice == TransportChoice::Shm {
            "memcpy"
        } else {
            "socket copy"
        };
        println!(
            "| write 16x1MiB | {choice} | {g:.2} | {name} {b:.2} | {:.2} |",
            g / b
        );
    }
    for choice in [TransportChoice::Tcp, TransportChoice::Shm] {
        let o = BenchOptions {
            transport: choice,
            op: BenchOp::Read,
            ..base.clone()
        };
        let g = median((0..ROUNDS).map(|_| run(&o).gb_per_s).collect());
        println!("| read 16x1MiB | {choice} | {g:.2} | | |");
    }
    println!();
    println!("| 4 KiB single-op write | p50 us | p99 us |");
    println!("|---|---|---|");
    for choice in [TransportChoice::Tcp, TransportChoice::Shm] {
        let o = BenchOptions {
            transport: choice,
            block_size: 4 << 10,
            batch_size: 1,
            ..base.clone()
        };
        let rs: Vec<BenchResult> = (0..ROUNDS).map(|_| run(&o)).collect();
        let p50 = median(rs.iter().map(|r| r.latency_us_p50).collect());
        let p99 = median(rs.iter().map(|r| r.latency_us_p99).collect());
        println!("| {choice} | {p50:.1} | {p99:.1} |");
    }
    println!();
    println!("| tcp slice size (8x4MiB writes) | GB/s |");
    println!("|---|---|");
    for slice in [64usize << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20] {
        let o = BenchOptions {
            transport: TransportChoice::Tcp,
            block_size: 4 << 20,
            batch_size: 8,
            slice_size: slice,
            ..base.clone()
        };
        let g = median((0..ROUNDS).map(|_| run(&o).gb_per_s).collect());
        println!("| {} KiB | {g:.2} |", slice >> 10);
    }
}
