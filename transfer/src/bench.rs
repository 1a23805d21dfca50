//! `transfer-bench`'s engine room, in the style of Mooncake's
//! `transfer_engine_bench`: a target that registers one segment, an
//! initiator that keeps `threads` submitters busy with batches of
//! `batch_size` ops of `block_size` bytes for `duration`, and the two
//! baselines docs/transfer.md compares against (a plain loopback socket copy and
//! a single-threaded memcpy of the same bytes).
//!
//! Both ends run with the fleet secret and TLS the options carry, so the
//! bench measures the plane production runs (`secret`, `tls`); the caller
//! decides where they come from.
//!
//! It measures; it must never be on a serving path, and it knows nothing of
//! CLIs (the `pdgate` binary parses arguments and prints).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::auth::Secret;
use crate::batch::Batch;
use crate::engine::{EngineOptions, TransferEngine};
use crate::error::TransferError;
use crate::metadata::SegmentDesc;
use crate::tls::TlsIdentity;
use crate::transport::kind::{TransportChoice, TransportKind};

/// Name of the segment a bench target registers.
pub const BENCH_SEGMENT: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchOp {
    Read,
    Write,
}

impl std::str::FromStr for BenchOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(BenchOp::Read),
            "write" => Ok(BenchOp::Write),
            o => Err(format!("unknown operation {o:?}; expected read or write")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub transport: TransportChoice,
    pub op: BenchOp,
    /// Bytes per op.
    pub block_size: usize,
    /// Ops per batch.
    pub batch_size: usize,
    /// Concurrent submitters, each on its own region of the segment.
    pub threads: usize,
    pub duration: Duration,
    pub slice_size: usize,
    pub connections_per_peer: usize,
    /// The fleet secret both ends prove (`None`: the open plane).
    pub secret: Option<Secret>,
    /// Mutual TLS on TCP connections, both ends with this identity.
    pub tls: Option<TlsIdentity>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        let e = EngineOptions::default();
        BenchOptions {
            transport: TransportChoice::Auto,
            op: BenchOp::Write,
            block_size: 1 << 20,
            batch_size: 16,
            threads: 2,
            duration: Duration::from_secs(5),
            slice_size: e.slice_size,
            connections_per_peer: e.connections_per_peer,
            secret: None,
            tls: None,
        }
    }
}

impl BenchOptions {
    /// Segment bytes the target must register for these options.
    pub fn segment_len(&self) -> usize {
        self.block_size
            .saturating_mul(self.batch_size.max(1))
            .saturating_mul(self.threads.max(1))
    }

    /// The engine options either end of the bench runs with.
    pub fn engine_options(&self, listen: SocketAddr) -> EngineOptions {
        EngineOptions {
            listen,
            transport: self.transport,
            slice_size: self.slice_size,
            connections_per_peer: self.connections_per_peer,
            op_timeout: Duration::from_secs(60),
            secret: self.secret.clone(),
            tls: self.tls.clone(),
            ..EngineOptions::default()
        }
    }
}

/// What one initiator run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub transport: TransportKind,
    pub op: BenchOp,
    pub block_size: usize,
    pub batch_size: usize,
    pub threads: usize,
    pub seconds: f64,
    pub bytes: u64,
    pub batches: u64,
    pub gb_per_s: f64,
    pub latency_us_p50: f64,
    pub latency_us_p90: f64,
    pub latency_us_p99: f64,
    pub latency_us_max: f64,
}

/// Starts a target engine with the bench segment registered.
pub async fn start_target(
    opts: &BenchOptions,
    listen: SocketAddr,
) -> Result<(Arc<TransferEngine>, SegmentDesc), TransferError> {
    let engine = TransferEngine::start(opts.engine_options(listen)).await?;
    let seg = engine.register_segment(BENCH_SEGMENT, opts.segment_len())?;
    // Touch every page so the first run is not billed for page faults.
    seg.fill(0, seg.len(), 1)?;
    let desc = engine.describe(&seg);
    Ok((engine, desc))
}

/// Runs the initiator against `target` for `opts.duration` (after a short
/// warm-up that is not measured).
pub async fn run_initiator(
    opts: &BenchOptions,
    target: &SegmentDesc,
) -> Result<BenchResult, TransferError> {
    let engine =
        TransferEngine::start(opts.engine_options(SocketAddr::from(([127, 0, 0, 1], 0)))).await?;
    let need = opts.segment_len() as u64;
    if target.len < need {
        return Err(TransferError::InvalidBatch(format!(
            "target segment has {} bytes, these options need {need}",
            target.len
        )));
    }
    let block = Bytes::from(vec![0xA5u8; opts.block_size]);
    let batch_for = |t: usize| {
        let base = (t * opts.block_size * opts.batch_size) as u64;
        let mut b = Batch::new();
        for i in 0..opts.batch_size {
            let off = base + (i * opts.block_size) as u64;
            b = match opts.op {
                BenchOp::Write => b.write(off, block.clone()),
                BenchOp::Read => b.read(off, opts.block_size as u64),
            };
        }
        b
    };
    // Warm-up: connections, handshakes, mappings.
    for t in 0..opts.threads.max(1) {
        engine.submit(target, batch_for(t)).await?;
    }
    let started = Instant::now();
    let until = started + opts.duration;
    let mut tasks = Vec::new();
    for t in 0..opts.threads.max(1) {
        let (engine, target, batch) = (engine.clone(), target.clone(), batch_for(t));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut kind = TransportKind::Tcp;
            while Instant::now() < until {
                let r = engine.submit(&target, batch.clone()).await?;
                kind = r.transport;
                lat.push(r.elapsed);
            }
            Ok::<_, TransferError>((lat, kind))
        }));
    }
    let mut lat = Vec::new();
    let mut kind = TransportKind::Tcp;
    for t in tasks {
        let (l, k) = t
            .await
            .map_err(|e| TransferError::Protocol(format!("bench task failed: {e}")))??;
        lat.extend(l);
        kind = k;
    }
    let seconds = started.elapsed().as_secs_f64();
    engine.shutdown();
    lat.sort();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e6
    };
    let batches = lat.len() as u64;
    let bytes = batches * (opts.block_size * opts.batch_size) as u64;
    Ok(BenchResult {
        transport: kind,
        op: opts.op,
        block_size: opts.block_size,
        batch_size: opts.batch_size,
        threads: opts.threads,
        seconds,
        bytes,
        batches,
        gb_per_s: bytes as f64 / seconds / 1e9,
        latency_us_p50: pct(0.50),
        latency_us_p90: pct(0.90),
        latency_us_p99: pct(0.99),
        latency_us_max: pct(1.0),
    })
}

/// Both roles in this process, over the transport `opts` selects.
pub async fn run_loopback(opts: &BenchOptions) -> Result<BenchResult, TransferError> {
    let (target, desc) = start_target(opts, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let r = run_initiator(opts, &desc).await;
    target.shutdown();
    r
}

/// Baseline for tcp: the same bytes through one plain loopback socket
/// (blocking std::net, `write_all` of `block`-sized chunks on one thread,
/// `read_exact` into a segment-sized buffer on another). GB/s.
pub fn baseline_socket(total: u64, block: usize, region: usize) -> std::io::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let region = region.max(block);
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut dst = vec![1u8; region];
        let mut left = total;
        let mut off = 0;
        while left > 0 {
            let n = (block as u64).min(left) as usize;
            if off + n > region {
                off = 0;
            }
            s.read_exact(&mut dst[off..off + n])?;
            off += n;
            left -= n as u64;
        }
        s.write_all(&[1])?;
        Ok(())
    });
    let src = vec![0xA5u8; block];
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let t0 = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = (block as u64).min(left) as usize;
        s.write_all(&src[..n])?;
        left -= n as u64;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let secs = t0.elapsed().as_secs_f64();
    reader
        .join()
        .map_err(|_| std::io::Error::other("baseline reader panicked"))??;
    Ok(total as f64 / secs / 1e9)
}

/// Baseline for shm: one thread `memcpy`ing the same bytes in `block`-sized
/// chunks into a (pre-faulted) destination of `region` bytes. GB/s.
pub fn baseline_memcpy(total: u64, block: usize, region: usize) -> f64 {
    let region = region.max(block);
    let src = vec![0xA5u8; block];
    let mut dst = vec![1u8; region];
    let t0 = Instant::now();
    let mut left = total;
    let mut off = 0;
    while left > 0 {
        let n = (block as u64).min(left) as usize;
        if off + n > region {
            off = 0;
        }
        dst[off..off + n].copy_from_slice(&src[..n]);
        std::hint::black_box(&mut dst);
        off += n;
        left -= n as u64;
    }
    total as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// Parses "4096", "64KiB", "4MiB", "1GiB" (also K/M/G, KB/MB/GB as powers
/// of two, as transfer_engine_bench does).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("4m").unwrap(), 4 << 20);
        assert_eq!(parse_size("1GB").unwrap(), 1 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_bench_measures_each_transport() {
        for (choice, kind) in [
            (TransportChoice::Tcp, TransportKind::Tcp),
            (TransportChoice::Shm, TransportKind::Shm),
        ] {
            for op in [BenchOp::Write, BenchOp::Read] {
                let opts = BenchOptions {
                    transport: choice,
                    op,
                    block_size: 64 << 10,
                    batch_size: 4,
                    threads: 2,
                    duration: Duration::from_millis(100),
                    ..BenchOptions::default()
                };
                let r = run_loopback(&opts).await.unwrap();
                assert_eq!(r.transport, kind);
                assert!(r.batches > 0 && r.gb_per_s > 0.0, "{r:?}");
                assert!(
                    r.latency_us_p50 <= r.latency_us_p99 && r.latency_us_p99 <= r.latency_us_max
                );
                let json = serde_json::to_value(&r).unwrap();
                assert!(json["gb_per_s"].is_number());
            }
        }
        assert!(baseline_socket(1 << 20, 64 << 10, 256 << 10).unwrap() > 0.0);
        assert!(baseline_memcpy(1 << 20, 64 << 10, 256 << 10) > 0.0);
    }
}
