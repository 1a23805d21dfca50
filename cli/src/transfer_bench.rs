//! `pdgate transfer-bench`: measures the KV transfer engine, Mooncake
//! `transfer_engine_bench`-style. Argument parsing and printing only; the
//! measuring lives in `pdgate_transfer::bench`. Never part of serving.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use pdgate_transfer::bench::{self, BenchOp, BenchOptions, BenchResult, BENCH_SEGMENT};
use pdgate_transfer::TransportChoice;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    /// Register the bench segment and serve until interrupted.
    Target,
    /// Drive batches against a target (`--target host:port`).
    Initiator,
}

#[derive(Debug, Args)]
pub struct TransferBenchArgs {
    /// target or initiator (ignored with --loopback).
    #[arg(long, value_enum, default_value = "initiator")]
    pub role: Role,
    /// Run target and initiator in this process, over loopback.
    #[arg(long)]
    pub loopback: bool,
    /// Target: listen address for the transfer listener.
    #[arg(long, default_value = "0.0.0.0:17777")]
    pub listen: SocketAddr,
    /// Initiator: the target's transfer endpoint (host:port); its segment is
    /// found by handshake, no registry needed.
    #[arg(long)]
    pub target: Option<String>,
    /// auto, tcp, shm or rdma.
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// read or write.
    #[arg(long, default_value = "write")]
    pub operation: String,
    /// Bytes per op (e.g. 4KiB, 1MiB).
    #[arg(long, default_value = "1MiB")]
    pub block_size: String,
    /// Ops per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Slice size for parallel transfers (default: the engine's).
    #[arg(long)]
    pub slice_size: Option<String>,
    /// Connections per peer (default: the engine's).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Also measure the baseline (plain socket copy for tcp, memcpy for shm)
    /// of the same bytes and print the ratio.
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn options(a: &TransferBenchArgs) -> anyhow::Result<BenchOptions> {
    let d = BenchOptions::default();
    Ok(BenchOptions {
        transport: a.transport.parse::<TransportChoice>()?,
        op: a.operation.parse::<BenchOp>().map_err(anyhow::Error::msg)?,
        block_size: bench::parse_size(&a.block_size).map_err(anyhow::Error::msg)?,
        batch_size: a.batch_size.max(1),
        threads: a.threads.max(1),
        duration: Duration::try_from_secs_f64(a.duration).context("--duration")?,
        slice_size: match &a.slice_size {
            Some(s) => bench::parse_size(s).map_err(anyhow::Error::msg)?,
            None => d.slice_size,
        },
        connections_per_peer: a.connections.unwrap_or(d.connections_per_peer),
    })
}

pub async fn run(a: TransferBenchArgs) -> anyhow::Result<()> {
    let opts = options(&a)?;
    let result = if a.loopback {
        bench::run_loopback(&opts).await?
    } else {
        match a.role {
            Role::Target => {
                let (engine, desc) = bench::start_target(&opts, a.listen).await?;
                println!(
                    "transfer-bench target: segment {BENCH_SEGMENT:?} ({} bytes) at {}",
                    desc.len, desc.endpoint
                );
                pdgate_gateway::gateway::shutdown_signal().await;
                engine.shutdown();
                return Ok(());
            }
            Role::Initiator => {
                let endpoint = a
                    .target
                    .as_deref()
                    .context("--target host:port is required for the initiator")?;
                let probe = pdgate_transfer::TransferEngine::start(Default::default()).await?;
                let desc = probe.discover(endpoint, BENCH_SEGMENT).await?;
                probe.shutdown();
                bench::run_initiator(&opts, &desc).await?
            }
        }
    };
    let baseline = if a.baseline {
        Some(measure_baseline(&result)?)
    } else {
        None
    };
    print(&result, baseline, a.json)
}

/// (name, GB/s) of the matching baseline for the bytes `r` moved.
fn measure_baseline(r: &BenchResult) -> anyhow::Result<(&'static str, f64)> {
    let region = r.block_size * r.batch_size * r.threads;
    let total = r.bytes.max(r.block_size as u64);
    Ok(match r.transport {
        pdgate_transfer::TransportKind::Shm => (
            "memcpy",
            bench::baseline_memcpy(total, r.block_size, region),
        ),
        _ => (
            "socket",
            bench::baseline_socket(total, r.block_size, region)?,
        ),
    })
}

fn print(r: &BenchResult, baseline: Option<(&str, f64)>, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(r)?;
        if let (Some((name, gbps)), Some(obj)) = (baseline, v.as_object_mut()) {
            obj.insert("baseline".into(), name.into());
            obj.insert("baseline_gb_per_s".into(), gbps.into());
            obj.insert("ratio".into(), (r.gb_per_s / gbps).into());
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "{:?} {:?}: block {} B x batch {} x threads {}, {:.2} s, {} batches",
        r.transport, r.op, r.block_size, r.batch_size, r.threads, r.seconds, r.batches
    );
    println!("  throughput  {:.3} GB/s", r.gb_per_s);
    println!(
        "  latency     p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  max {:.1} us",
        r.latency_us_p50, r.latency_us_p90, r.latency_us_p99, r.latency_us_max
    );
    if let Some((name, gbps)) = baseline {
        println!(
            "  baseline    {name} {gbps:.3} GB/s  ratio {:.2}",
            r.gb_per_s / gbps
        );
    }
    Ok(())
}
