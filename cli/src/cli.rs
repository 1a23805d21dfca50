//! The command line: `up`, `serve` and `engine`. Flags are the last configuration layer, applied
//! as dotted-key overrides over file and environment, so defaults live only in the config structs.

use crate::config::{self, Config};
use crate::serve_check;
use crate::up::Fleet;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pdgate_engine_sim::EngineConfig;
use pdgate_gateway::config::DiscoveryKind;
use pdgate_gateway::gateway::{shutdown_signal, Gateway};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "pdgate",
    version,
    about = "Prefill/decode disaggregation gateway for LLM serving"
)]
pub struct Cli {
    /// Async worker threads of this process (default: one per core). A process-level knob, so
    /// it is a flag, not a config key: e.g. `1` for engines packed many to a small host.
    #[arg(long, global = true, env = "PDGATE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the gateway with an embedded fleet of reference engines.
    Up(UpArgs),
    /// Run the gateway alone in front of the workers named in the config.
    Serve(ServeArgs),
    /// Run one reference engine.
    Engine(EngineArgs),
    /// Benchmark the KV transfer engine (tcp, shm, rdma) against the host's limits.
    TransferBench(crate::transfer_bench::TransferBenchArgs),
    /// Replay a trace against an OpenAI-compatible endpoint and report TTFT, TPOT, ITL, goodput.
    Replay(crate::replay_cmd::ReplayArgs),
    /// Simulate a trace in virtual time against a modelled fleet, one report per policy.
    Simulate(crate::replay_cmd::SimulateArgs),
}

#[derive(Debug, Args)]
pub struct GatewayFlags {
    /// TOML config file (then PDGATE_* env, then these flags).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    /// Pair-selection policy: slo (default), cache_aware, kv_cost, least_load, power_of_two, random, round_robin.
    #[arg(long)]
    pub policy: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub gateway: GatewayFlags,
    /// Number of prefill engines.
    #[arg(long)]
    pub prefill: Option<usize>,
    /// Number of decode engines.
    #[arg(long)]
    pub decode: Option<usize>,
    /// Engine time scale: 1 is real time, 0 is instant.
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// PD protocol of the demo fleet: native, vllm-nixl, vllm-mooncake, sglang, trtllm.
    #[arg(long)]
    pub protocol: Option<pdgate_wire::Protocol>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub gateway: GatewayFlags,
    /// Check the config (keys, worker URLs, discovery, the files it names, credentials) and
    /// print it as the gateway would run it, secrets redacted; exit non-zero on any problem.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// TOML file holding an engine config (then PDGATE_ENGINE_* env, then these flags).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// prefill or decode.
    #[arg(long)]
    pub role: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Gateway URL hosting the segment registry.
    #[arg(long)]
    pub registry: Option<String>,
    /// PD protocol to enforce: native, vllm-nixl, vllm-mooncake, sglang, trtllm.
    #[arg(long)]
    pub protocol: Option<pdgate_wire::Protocol>,
    /// SGLang / vLLM Mooncake modes: how long a decode waits for its prefill (ms).
    #[arg(long)]
    pub bootstrap_timeout_ms: Option<u64>,
}

fn push<T: ToString>(out: &mut Vec<(&'static str, String)>, key: &'static str, v: &Option<T>) {
    if let Some(v) = v {
        out.push((key, v.to_string()));
    }
}

fn gateway_overrides(f: &GatewayFlags) -> Vec<(&'static str, String)> {
    let mut o = Vec::new();
    push(&mut o, "server.host", &f.host);
    push(&mut o, "server.port", &f.port);
    push(&mut o, "scheduler.policy", &f.policy);
    o
}

pub fn load_gateway(
    flags: &GatewayFlags,
    extra: Vec<(&'static str, String)>,
) -> anyhow::Result<Config> {
    let mut o = gateway_overrides(flags);
    o.extend(extra);
    config::load(flags.config.as_deref(), "PDGATE", &o)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(a) => {
            let mut extra = Vec::new();
            push(&mut extra, "up.prefill", &a.prefill);
            push(&mut extra, "up.decode", &a.decode);
            push(&mut extra, "up.engine.timing.time_scale", &a.time_scale);
            push(&mut extra, "up.engine.protocol", &a.protocol);
            let cfg = load_gateway(&a.gateway, extra)?;
            crate::telemetry::init(&cfg.log);
            let fleet = Fleet::start(cfg).await?;
            println!("{}", fleet.banner());
            shutdown_signal().await;
            tracing::info!("shutting down");
            fleet.stop().await;
        }
        Command::Serve(a) => {
            let file = a.gateway.config.as_deref().map_or_else(
                || "the config".to_string(),
                |p| format!("config {}", p.display()),
            );
            let cfg = load_gateway(&a.gateway, Vec::new()).with_context(|| file.clone())?;
            if a.check {
                let effective = serve_check::check(&cfg).with_context(|| file.clone())?;
                print!("{effective}");
                return Ok(());
            }
            crate::telemetry::init(&cfg.log);
            pdgate_gateway::config_check::check(&cfg.gateway()).with_context(|| file.clone())?;
            anyhow::ensure!(
                !cfg.models.is_empty()
                    || !cfg.workers.is_empty()
                    || cfg.discovery.kind != DiscoveryKind::Static,
                "no [[workers]] configured and [discovery] kind is static; `pdgate up` starts a \
                 demo fleet instead"
            );
            let gw = Gateway::start(cfg.gateway()).await?;
            println!("pdgate gateway {}", gw.url());
            shutdown_signal().await;
            gw.stop().await;
        }
        Command::Engine(a) => {
            let mut o = Vec::new();
            push(&mut o, "role", &a.role);
            push(&mut o, "host", &a.host);
            push(&mut o, "port", &a.port);
            push(&mut o, "model", &a.model);
            push(&mut o, "timing.time_scale", &a.time_scale);
            push(&mut o, "registry_url", &a.registry);
            push(&mut o, "protocol", &a.protocol);
            push(&mut o, "bootstrap_timeout_ms", &a.bootstrap_timeout_ms);
            let cfg: EngineConfig = config::load(a.config.as_deref(), "PDGATE_ENGINE", &o)?;
            crate::telemetry::init(&crate::config::LogConfig::default());
            let role = cfg.role;
            let e = pdgate_engine_sim::spawn(cfg).await?;
            println!("pdgate engine ({role}) {}", e.url());
            shutdown_signal().await;
            e.stop().await;
        }
        Command::TransferBench(a) => crate::transfer_bench::run(a).await?,
        Command::Replay(a) => crate::replay_cmd::replay(a).await?,
        Command::Simulate(a) => crate::replay_cmd::simulate(a)?,
    }
    Ok(())
}
