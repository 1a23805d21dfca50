//! Loopback throughput and latency of the TCP transport against a plain
//! tokio socket doing the same byte movement.
//!
//! Throughput: move N bytes (default 1 GiB, `PDGATE_BENCH_BYTES` overrides)
//! from engine A into engine B's segment in 4 MiB write ops, 8 per batch,
//! through `submit`; baseline: the same bytes over one TcpStream with
//! `write_all` / `read_exact` into a buffer as large as B's segment. Each side
//! runs 3 times (`PDGATE_BENCH_ROUNDS` overrides), alternating, and the medians
//! are compared. Latency: ~2000 single-op
//! 4 KiB submits, plus a plain 4 KiB request/1-byte ack ping-pong for scale.
//!
//! The transfer side runs twice per round, without a fleet secret (open plane)
//! and with one (every connection authenticated once, then pooled), so the
//! cost of authentication is the ratio of the two in one run; and the first
//! batch on a fresh connection is timed both ways, where the handshake's round
//! trips are paid.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pdgate_transfer::{Batch, EngineOptions, Secret, TransferEngine, TransportChoice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OP: usize = 4 << 20;
const OPS_PER_BATCH: usize = 8;
const LAT_SIZE: usize = 4 << 10;
const LAT_ITERS: usize = 2000;
const DEFAULT_ROUNDS: usize = 3;
/// Fresh engine pairs whose first batch is timed.
const FIRST_ITERS: usize = 100;

/// Without, then with, the fleet secret.
const AUTH: [bool; 2] = [false, true];

fn main() {
    let total: u64 = std::env::var("PDGATE_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let rounds: usize = std::env::var("PDGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(total, rounds));
}

async fn run(total: u64, rounds: usize) {
    let n_ops = total.div_ceil(OP as u64).max(1) as usize;
    let bytes = (n_ops * OP) as u64;
    println!(
        "moving {bytes} bytes ({:.2} GiB) in {n_ops} ops of {} MiB, {OPS_PER_BATCH} ops/batch",
        bytes as f64 / (1u64 << 30) as f64,
        OP >> 20
    );
    let payload = Bytes::from((0..OP).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>());

    // Warm-ups first so page faults on fresh memory and connection setup
    // are not billed to either side.
    for auth in AUTH {
        transfer_run(&payload, OP * OPS_PER_BATCH, auth).await;
    }
    baseline_run(&payload, OP * OPS_PER_BATCH).await;

    // Alternate the three so background load on a shared machine hits all
    // alike; report the median of each. The open and keyed runs of a round are
    // back to back, in alternating order, and their ratio is taken per round:
    // a paired comparison, so drift in the machine's load cancels out.
    let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    let (mut open, mut keyed, mut bs, mut ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (o, k) = if round % 2 == 0 {
            let o = transfer_run(&payload, n_ops * OP, false).await;
            (o, transfer_run(&payload, n_ops * OP, true).await)
        } else {
            let k = transfer_run(&payload, n_ops * OP, true).await;
            (transfer_run(&payload, n_ops * OP, false).await, k)
        };
        let b = baseline_run(&payload, n_ops * OP).await;
        println!(
            "  round {round}: transfer {:>6.3} GB/s  keyed {:>6.3} GB/s  baseline {:>6.3} GB/s",
            gbps(o),
            gbps(k),
            gbps(b)
        );
        ratios.push(o.as_secs_f64() / k.as_secs_f64());
        open.push(o);
        keyed.push(k);
        bs.push(b);
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (t, k, b) = (median(open), median(keyed), median(bs));
    println!(
        "transfer  {:>7.3} GB/s  (median of {rounds}, {:?})",
        gbps(t),
        t
    );
    println!(
        "keyed     {:>7.3} GB/s  (median of {rounds}, {:?}; fleet secret set)",
        gbps(k),
        k
    );
    println!(
        "baseline  {:>7.3} GB/s  (median of {rounds}, {:?})",
        gbps(b),
        b
    );
    println!("ratio transfer/baseline = {:.3}", gbps(t) / gbps(b));
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio keyed/open throughput = {:.3} (median of the {rounds} per-round ratios; of the medians {:.3})",
        ratios[ratios.len() / 2],
        gbps(k) / gbps(t)
    );

    // Latency: the two planes alternate in chunks, samples pooled per plane.
    let (mut open, mut keyed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        open.extend(transfer_latency(false).await);
        keyed.extend(transfer_latency(true).await);
    }
    let (o50, o99) = percentiles(open);
    let (k50, k99) = percentiles(keyed);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "4 KiB single-op submit latency over {}: p50 {:.1} us  p99 {:.1} us",
        LAT_ITERS * rounds,
        us(o50),
        us(o99)
    );
    println!(
        "4 KiB single-op submit latency, keyed:    p50 {:.1} us  p99 {:.1} us  (keyed/open p50 {:.3}, p99 {:.3})",
        us(k50),
        us(k99),
        us(k50) / us(o50),
        us(k99) / us(o99)
    );
    let (p50, p99) = baseline_latency().await;
    println!(
        "4 KiB plain ping-pong latency over {LAT_ITERS}:   p50 {:.1} us  p99 {:.1} us",
        us(p50),
        us(p99)
    );
    let (mut open, mut keyed) = (Vec::new(), Vec::new());
    for _ in 0..FIRST_ITERS {
        open.push(first_batch(false).await);
        keyed.push(first_batch(true).await);
    }
    let (o50, _) = percentiles(open);
    let (k50, _) = percentiles(keyed);
    println!(
        "first 4 KiB batch on a new connection over {FIRST_ITERS}: p50 {:.1} us open, {:.1} us keyed (handshake {:+.1} us)",
        us(o50),
        us(k50),
        us(k50) - us(o50)
    );
}

async fn transfer_run(payload: &Bytes, total: usize, auth: bool) -> Duration {
    let a = TransferEngine::start(tcp(auth)).await.expect("engine a");
    let b = TransferEngine::start(tcp(auth)).await.expect("engine b");
    let seg = b
        .register_segment("bench", OP * OPS_PER_BATCH)
        .expect("segment");
    let desc = b.describe(&seg);
    // Touch the target once so its pages exist, as a real KV pool's would.
    seg.fill(0, seg.len(), 1).expect("fill");
    let n_ops = total / OP;
    let start = Instant::now();
    let mut done = 0;
    while done < n_ops {
        let mut batch = Batch::new();
        for slot in 0..OPS_PER_BATCH.min(n_ops - done) {
            batch = batch.write((slot * OP) as u64, payload.clone());
        }
        done += batch.ops.len();
        a.submit(&desc, batch).await.expect("submit");
    }
    let elapsed = start.elapsed();
    assert_eq!(
        seg.read(OP - 16, 16).expect("read"),
        payload[OP - 16..].to_vec()
    );
    elapsed
}

async fn baseline_run(payload: &Bytes, total: usize) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        // Same footprint as B's segment, filled 4 MiB at a time, so
        // neither side gets a cache-resident destination the other lacks.
        let mut buf = vec![1u8; OP * OPS_PER_BATCH];
        let mut got = 0;
        while got < total {
            let off = got % buf.len();
            s.read_exact(&mut buf[off..off + OP]).await.expect("read");
            got += OP;
        }
        s.write_all(b"k").await.expect("ack");
        buf
    });
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let start = Instant::now();
    for _ in 0..total / OP {
        s.write_all(payload).await.expect("write");
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.expect("ack");
    let elapsed = start.elapsed();
    let buf = receiver.await.expect("receiver");
    assert_eq!(buf[OP - 16..OP], payload[OP - 16..]);
    elapsed
}

/// `LAT_ITERS` samples of a 4 KiB single-op submit over a warm connection.
async fn transfer_latency(auth: bool) -> Vec<Duration> {
    let a = TransferEngine::start(tcp(auth)).await.expect("engine a");
    let b = TransferEngine::start(tcp(auth)).await.expect("engine b");
    let seg = b.register_segment("lat", LAT_SIZE).expect("segment");
    let desc = b.describe(&seg);
    let data = Bytes::from(vec![3u8; LAT_SIZE]);
    let mut samples = Vec::with_capacity(LAT_ITERS);
    for i in 0..LAT_ITERS + 100 {
        let t = Instant::now();
        a.submit(&desc, Batch::new().write(0, data.clone()))
            .await
            .expect("submit");
        if i >= 100 {
            samples.push(t.elapsed());
        }
    }
    samples
}

/// One 4 KiB submit from a new engine, so its connection (and handshake) is
/// part of what is timed.
async fn first_batch(auth: bool) -> Duration {
    let b = TransferEngine::start(tcp(auth)).await.expect("engine b");
    let seg = b.register_segment("first", LAT_SIZE).expect("segment");
    let desc = b.describe(&seg);
    let a = TransferEngine::start(tcp(auth)).await.expect("engine a");
    let data = Bytes::from(vec![5u8; LAT_SIZE]);
    let t = Instant::now();
    a.submit(&desc, Batch::new().write(0, data))
        .await
        .expect("submit");
    t.elapsed()
}

async fn baseline_latency() -> (Duration, Duration) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; LAT_SIZE];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(b"k").await.is_err() {
                break;
            }
        }
    });
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let data = vec![3u8; LAT_SIZE];
    let mut ack = [0u8; 1];
    let mut samples = Vec::with_capacity(LAT_ITERS);
    for i in 0..LAT_ITERS + 100 {
        let t = Instant::now();
        s.write_all(&data).await.expect("write");
        s.read_exact(&mut ack).await.expect("ack");
        if i >= 100 {
            samples.push(t.elapsed());
        }
    }
    percentiles(samples)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

/// This bench measures the TCP transport, so `auto`'s shm is ruled out;
/// `auth` gives both engines the same fleet secret.
fn tcp(auth: bool) -> EngineOptions {
    EngineOptions {
        transport: TransportChoice::Tcp,
        secret: auth.then(|| Secret::new(b"tcp-throughput-bench-secret").expect("secret")),
        ..EngineOptions::default()
    }
}
