//! `pdgate transfer-bench`: measures the KV transfer engine, Mooncake
//! `transfer_engine_bench`-style. Argument parsing, the plane's secret and
//! certificates, and printing; the measuring lives in
//! `pdgate_transfer::bench`. Never part of serving.
//!
//! The fleet secret comes as everywhere in pdgate (a file, else
//! `PDGATE_FLEET_SECRET`; never a flag's value). `--loopback` without one
//! makes an ephemeral secret, and `--tls` there an ephemeral CA and
//! certificate, so the default measures the authenticated plane production
//! runs; `--compare open,keyed,tls` measures several planes in one run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use pdgate_transfer::bench::{self, BenchOp, BenchOptions, BenchResult, BENCH_SEGMENT};
use pdgate_transfer::{Secret, TlsFiles, TlsIdentity, TransportChoice};
use pdgate_wire::fleet::FleetSecret;
use rand::RngCore;

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
    /// File holding the fleet secret (else PDGATE_FLEET_SECRET). Without
    /// either, --loopback makes an ephemeral one; the roles run open.
    #[arg(long)]
    pub fleet_secret_file: Option<PathBuf>,
    /// Run without the fleet secret (the open plane), even if one is set.
    #[arg(long)]
    pub no_auth: bool,
    /// Mutual TLS on TCP transfer connections. With --loopback and no
    /// --tls-* files, an ephemeral CA and certificate are made for the run.
    #[arg(long)]
    pub tls: bool,
    /// This end's certificate chain (PEM); with --tls-key and --tls-ca turns TLS on.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The fleet CA the peer's certificate must chain to (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// --loopback only: measure each of these planes in turn, --rounds
    /// times in rotating order, and print each one's medians and ratios to
    /// the first. open: no secret; keyed: fleet secret; tls: fleet secret
    /// inside mutual TLS.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with_all = ["no_auth", "tls"])]
    pub compare: Vec<Plane>,
    /// Rounds of --compare.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// How the transfer plane is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Plane {
    /// No fleet secret: anyone who reaches the port is served.
    Open,
    /// The fleet-secret handshake on every connection.
    Keyed,
    /// The fleet-secret handshake inside mutual TLS 1.3.
    Tls,
}

/// The secret the roles prove: the configured one; in loopback without one,
/// an ephemeral one (both ends are this process).
fn secret(a: &TransferBenchArgs) -> anyhow::Result<Option<Secret>> {
    if a.no_auth {
        return Ok(None);
    }
    let configured = FleetSecret::load(a.fleet_secret_file.as_deref())?;
    let bytes = match configured {
        Some(s) => s.as_bytes().to_vec(),
        None if a.loopback => {
            let mut b = vec![0u8; 32];
            rand::rng().fill_bytes(&mut b);
            b
        }
        None => return Ok(None),
    };
    Ok(Some(Secret::new(&bytes)?))
}

/// The TLS identity: from the --tls-* files, else (loopback, --tls) made for
/// this run.
fn tls(a: &TransferBenchArgs, wanted: bool) -> anyhow::Result<Option<TlsIdentity>> {
    if let (Some(cert), Some(key), Some(ca)) = (&a.tls_cert, &a.tls_key, &a.tls_ca) {
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        };
        return Ok(Some(TlsIdentity::load(&files)?));
    }
    if !wanted {
        return Ok(None);
    }
    anyhow::ensure!(
        a.loopback,
        "--tls needs --tls-cert, --tls-key and --tls-ca (the fleet's certificates) outside --loopback"
    );
    Ok(Some(ephemeral_tls()?))
}

/// A throwaway CA and one certificate for 127.0.0.1, used by both ends.
fn ephemeral_tls() -> anyhow::Result<TlsIdentity> {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca = ca.self_signed(&ca_key)?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca, &ca_key)?;
    Ok(TlsIdentity::from_pem(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        ca.pem().as_bytes(),
    )?)
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
        secret: secret(a)?,
        tls: tls(a, a.tls)?,
    })
}

pub async fn run(a: TransferBenchArgs) -> anyhow::Result<()> {
    let opts = options(&a)?;
    if !a.compare.is_empty() {
        anyhow::ensure!(
            a.loopback,
            "--compare runs both ends here: it needs --loopback"
        );
        return compare(&a, opts).await;
    }
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
                let probe = pdgate_transfer::TransferEngine::start(
                    opts.engine_options(SocketAddr::from(([127, 0, 0, 1], 0))),
                )
                .await?;
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

/// Runs every plane of `--compare` `--rounds` times, rotating the order each
/// round so the machine's drift hits all alike, and prints each plane's
/// medians and their ratios to the first plane's.
async fn compare(a: &TransferBenchArgs, base: BenchOptions) -> anyhow::Result<()> {
    let secret = match base.secret.clone() {
        Some(s) => s,
        None => {
            let mut b = [0u8; 32];
            rand::rng().fill_bytes(&mut b);
            Secret::new(&b)?
        }
    };
    let identity = match a.compare.contains(&Plane::Tls) {
        true => tls(a, true)?,
        false => None,
    };
    let opts_for = |p: Plane| BenchOptions {
        secret: (p != Plane::Open).then(|| secret.clone()),
        tls: if p == Plane::Tls {
            identity.clone()
        } else {
            None
        },
        ..base.clone()
    };
    let planes = &a.compare;
    let rounds = a.rounds.max(1);
    let mut runs: Vec<Vec<BenchResult>> = vec![Vec::new(); planes.len()];
    for round in 0..rounds {
        for k in 0..planes.len() {
            let i = (k + round) % planes.len();
            let r = bench::run_loopback(&opts_for(planes[i])).await?;
            if !a.json {
                println!(
                    "  round {round}: {:<5} {:>7.3} GB/s  p50 {:>7.1} us  p99 {:>7.1} us",
                    format!("{:?}", planes[i]).to_lowercase(),
                    r.gb_per_s,
                    r.latency_us_p50,
                    r.latency_us_p99
                );
            }
            runs[i].push(r);
        }
    }
    let median = |v: &[BenchResult], f: fn(&BenchResult) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let rows: Vec<(Plane, f64, f64, f64)> = planes
        .iter()
        .zip(&runs)
        .map(|(p, v)| {
            (
                *p,
                median(v, |r| r.gb_per_s),
                median(v, |r| r.latency_us_p50),
                median(v, |r| r.latency_us_p99),
            )
        })
        .collect();
    let (_, g0, l0, t0) = rows[0];
    if a.json {
        let planes: Vec<_> = rows
            .iter()
            .map(|(p, g, l, t)| {
                serde_json::json!({"plane": p, "gb_per_s": g, "latency_us_p50": l, "latency_us_p99": t,
                    "throughput_ratio": g / g0, "p50_ratio": l / l0, "p99_ratio": t / t0})
            })
            .collect();
        let first = &runs[0][0];
        println!(
            "{}",
            serde_json::json!({"transport": first.transport, "op": first.op, "block_size": first.block_size,
                "batch_size": first.batch_size, "threads": first.threads, "rounds": rounds, "planes": planes})
        );
        return Ok(());
    }
    let first = &runs[0][0];
    println!(
        "{:?} {:?}: block {} B x batch {} x threads {}, median of {rounds} rounds; ratios to {:?}",
        first.transport, first.op, first.block_size, first.batch_size, first.threads, rows[0].0
    );
    for (p, g, l, t) in &rows {
        println!(
            "  {:<5} {:>7.3} GB/s ({:.3})  p50 {:>7.1} us ({:.3})  p99 {:>7.1} us ({:.3})",
            format!("{p:?}").to_lowercase(),
            g,
            g / g0,
            l,
            l / l0,
            t,
            t / t0
        );
    }
    Ok(())
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
