//! `pdgate replay` and `pdgate simulate`: command-line flags turned into `pdgate-loadtest` calls,
//! and the results printed and written. Thin on purpose — every behaviour lives in the library;
//! this is the only place its errors become `anyhow`.

use anyhow::Context;
use clap::Args;
use pdgate_loadtest::arrivals::Mode;
use pdgate_loadtest::client::{Api, Target};
use pdgate_loadtest::replay::{self, ReplayOptions};
use pdgate_loadtest::report::{self, markdown, Report};
use pdgate_loadtest::sim::{self, FleetSpec};
use pdgate_loadtest::synth::{Builtin, CountTokens, Synth};
use pdgate_loadtest::trace::{LoadOptions, Source, Trace};
use pdgate_loadtest::{Aggregates, Slo};
use pdgate_scheduler::PolicyKind;
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// A Mooncake JSONL or ShareGPT JSON(L) file, or `synthetic:requests=N,rate=R,input=T,...`.
    pub trace: String,
    /// mooncake or sharegpt (default: guessed from the file).
    #[arg(long)]
    pub format: Option<String>,
    /// Skip malformed trace records (listed in the report) instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Replay trace timestamps this many times faster.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Ignore trace times: arrivals at this many requests/s (Poisson, or gamma with --burstiness).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Gamma shape of inter-arrival times with --rate: 1 is Poisson, < 1 burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Closed loop: keep this many requests outstanding.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Use only the first N requests of the trace.
    #[arg(long)]
    pub max_requests: Option<usize>,
    /// Goodput SLOs, e.g. `ttft=2000,tpot=100,e2el=20000` (ms).
    #[arg(long)]
    pub slo: Option<String>,
    /// Write report.json, report.md and SVG plots here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of --rate arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Base URL of an OpenAI-compatible endpoint (without /v1).
    #[arg(long)]
    pub target: String,
    #[arg(long, default_value = "pdgate-sim-8b")]
    pub model: String,
    #[arg(long, env = "OPENAI_API_KEY")]
    pub api_key: Option<String>,
    /// chat or completions.
    #[arg(long, default_value = "completions")]
    pub api: String,
    /// Ask for whole responses instead of streams (TTFT is then the full latency).
    #[arg(long)]
    pub no_stream: bool,
    /// Stop dispatching after this many seconds (in-flight requests finish).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests in flight at most; at the cap, dispatch waits and the wait is reported as lateness.
    #[arg(long, default_value_t = 2048)]
    pub max_in_flight: usize,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// A HuggingFace tokenizer.json to size prompts with (default: the built-in tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Admin token for the gateway's /admin/workers (to read the engines' cache counters).
    #[arg(long, env = "PDGATE_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Leave per-request records out of report.json.
    #[arg(long)]
    pub no_records: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    #[arg(long, default_value_t = 2)]
    pub prefill: usize,
    #[arg(long, default_value_t = 2)]
    pub decode: usize,
    /// Comma-separated policies, or `all`.
    #[arg(long, default_value = "slo")]
    pub policy: String,
    /// TOML file with scheduler settings (the gateway's `[scheduler]` table without the
    /// header), to compare e.g. SLOs or cost weights; flags here still win.
    #[arg(long)]
    pub scheduler_config: Option<std::path::PathBuf>,
    /// KV blocks per engine (prefill cache; decode reservation pool).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Prefix-cache blocks of a decode engine (default: --kv-blocks, as the engine).
    #[arg(long)]
    pub decode_cache_blocks: Option<usize>,
    /// A host-memory tier under every engine's prefix cache, in blocks (default 0: none).
    #[arg(long)]
    pub host_cache_blocks: Option<usize>,
    /// Copy bandwidth from the host tier back to the GPU, GB/s.
    #[arg(long)]
    pub host_copy_gbps: Option<f64>,
    #[arg(long)]
    pub max_batch: Option<usize>,
    #[arg(long)]
    pub max_batched_tokens: Option<usize>,
    #[arg(long)]
    pub kv_bytes_per_token: Option<u64>,
    /// KV transfer bandwidth, GB/s.
    #[arg(long, default_value_t = 2.0)]
    pub kv_gbps: f64,
    /// Engine time scale (as `pdgate up --time-scale`): reports are in this scaled time.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Fixed gateway cost per leg, ms.
    #[arg(long, default_value_t = 0.0)]
    pub overhead_ms: f64,
    /// Scheduler seed.
    #[arg(long, default_value_t = 1)]
    pub sched_seed: u64,
    /// Gateway replicas behind a round-robin balancer, each knowing only its own bookings;
    /// comma-separated counts run one after another (e.g. `1,2,4,8`).
    #[arg(long, default_value = "1")]
    pub replicas: String,
    /// Engines publish KV events (blocks stored/evicted) to every gateway replica.
    #[arg(long)]
    pub kv_events: bool,
    /// Delay from an engine's cache change to the gateways applying it, ms (with --kv-events).
    #[arg(long)]
    pub event_lag_ms: Option<f64>,
    /// Booking sync between replicas through a broker, with this delivery lag in ms (default:
    /// no sync, each replica knows only its own bookings).
    #[arg(long)]
    pub sync_lag_ms: Option<f64>,
    /// How often each gateway scrapes engine metrics, ms (0 = never).
    #[arg(long)]
    pub metrics_interval_ms: Option<f64>,
}

fn load_trace(a: &TraceArgs, tok: &dyn CountTokens) -> anyhow::Result<Trace> {
    let source = Source::parse(&a.trace, a.format.as_deref())?;
    let mut trace = source
        .load(
            LoadOptions {
                skip_invalid: a.skip_invalid,
            },
            tok,
        )
        .with_context(|| format!("loading trace {}", a.trace))?;
    if let Some(n) = a.max_requests {
        trace.truncate(n);
    }
    if !trace.skipped.is_empty() {
        eprintln!(
            "skipped {} invalid trace records (see the report)",
            trace.skipped.len()
        );
    }
    Ok(trace)
}

fn mode(a: &TraceArgs, trace: &Trace) -> anyhow::Result<Mode> {
    Ok(Mode::choose(
        trace,
        a.speed,
        a.rate,
        a.burstiness,
        a.concurrency,
        a.seed,
    )?)
}

fn slo(a: &TraceArgs) -> anyhow::Result<Slo> {
    a.slo.as_deref().map_or(Ok(Slo::default()), |s| {
        Slo::parse(s).map_err(anyhow::Error::msg)
    })
}

fn finish(reports: &[Report], out: Option<&PathBuf>, records: bool) -> anyhow::Result<()> {
    println!("{}", markdown::terminal(reports));
    if let Some(dir) = out {
        for f in report::write_dir(dir, reports, records)? {
            println!("wrote {f}");
        }
    }
    Ok(())
}

pub async fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let tok: Arc<dyn CountTokens> = match &a.tokenizer {
        None => Arc::new(Builtin),
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Arc::new(pdgate_scheduler::Tokenizer::from_json_bytes(&bytes)?)
        }
    };
    let trace = load_trace(&a.trace, tok.as_ref())?;
    let mode = mode(&a.trace, &trace)?;
    let slo = slo(&a.trace)?;
    let api = Api::parse(&a.api).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(a.timeout > 0.0, "--timeout must be > 0");
    let opts = ReplayOptions {
        target: Target {
            base_url: a
                .target
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_string(),
            api,
            model: a.model.clone(),
            api_key: a.api_key.clone(),
            stream: !a.no_stream,
        },
        mode,
        max_requests: a.trace.max_requests,
        duration: a.duration.filter(|d| *d > 0.0).map(Duration::from_secs_f64),
        max_in_flight: a.max_in_flight.max(1),
        timeout: Duration::from_secs_f64(a.timeout),
        progress: !a.quiet && std::io::stderr().is_terminal(),
        scrape: true,
        admin_token: a.admin_token.clone(),
    };
    let settings = json!({
        "trace": a.trace.trace, "target": a.target, "api": a.api, "model": a.model,
        "stream": !a.no_stream, "mode": format!("{mode:?}"), "max_in_flight": opts.max_in_flight,
        "slo": slo, "tokenizer": a.tokenizer.as_ref().map(|p| p.display().to_string()),
    });
    let skipped = trace.skipped.clone();
    let outcome = replay::run(trace, Synth::new(tok), opts).await?;
    let mut aggregates = Aggregates::compute(&outcome.records, &slo);
    aggregates.cache_hit_rate = outcome.server.as_ref().and_then(|s| s.cache_hit_rate);
    let report = Report {
        kind: "replay".into(),
        label: a.target.clone(),
        settings,
        aggregates,
        instances: outcome
            .server
            .as_ref()
            .map(Report::instances_from)
            .unwrap_or_default(),
        server: outcome.server,
        skipped,
        not_sent: outcome.not_sent,
        wall_s: outcome.wall_s,
        records: outcome.records,
    };
    finish(
        std::slice::from_ref(&report),
        a.trace.out.as_ref(),
        !a.no_records,
    )
}

pub fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    let trace = load_trace(&a.trace, &Builtin)?;
    let mode = mode(&a.trace, &trace)?;
    let slo = slo(&a.trace)?;
    let policies: Vec<PolicyKind> = if a.policy == "all" {
        PolicyKind::ALL.to_vec()
    } else {
        a.policy
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<PolicyKind>()
                    .map_err(|e| anyhow::anyhow!("{e}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    anyhow::ensure!(
        a.prefill > 0 && a.decode > 0,
        "--prefill and --decode must be ≥ 1"
    );
    anyhow::ensure!(
        a.kv_gbps > 0.0 && a.time_scale >= 0.0,
        "--kv-gbps must be > 0, --time-scale ≥ 0"
    );
    let mut spec = FleetSpec::new(a.prefill, a.decode);
    if let Some(k) = a.kv_blocks {
        spec.engine.kv_blocks = k;
        spec.decode_cache_blocks = k;
    }
    if let Some(k) = a.decode_cache_blocks {
        spec.decode_cache_blocks = k;
    }
    if let Some(k) = a.host_cache_blocks {
        spec.engine.host_cache_blocks = k;
    }
    if let Some(g) = a.host_copy_gbps {
        anyhow::ensure!(g.is_finite() && g > 0.0, "--host-copy-gbps must be > 0");
        spec.engine.host_copy_gbps = g;
    }
    if let Some(b) = a.max_batch {
        spec.engine.max_batch = b;
    }
    if let Some(t) = a.max_batched_tokens {
        spec.engine.max_batched_tokens = t;
    }
    if let Some(b) = a.kv_bytes_per_token {
        spec.engine.kv_bytes_per_token = b;
    }
    spec.engine.timing.time_scale = a.time_scale;
    spec.kv_gbps = a.kv_gbps;
    spec.overhead_ms = a.overhead_ms;
    let replicas: Vec<usize> = a
        .replicas
        .split(',')
        .map(|n| match n.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(anyhow::anyhow!(
                "--replicas takes counts ≥ 1, comma-separated (got `{n}`)"
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    spec.gateways.kv_events = a.kv_events;
    if let Some(lag) = a.event_lag_ms {
        anyhow::ensure!(lag.is_finite() && lag >= 0.0, "--event-lag-ms must be ≥ 0");
        spec.gateways.event_lag_ms = lag;
    }
    if let Some(lag) = a.sync_lag_ms {
        anyhow::ensure!(lag.is_finite() && lag >= 0.0, "--sync-lag-ms must be ≥ 0");
        spec.gateways.sync_lag_ms = Some(lag);
    }
    if let Some(every) = a.metrics_interval_ms {
        anyhow::ensure!(
            every.is_finite() && every >= 0.0,
            "--metrics-interval-ms must be ≥ 0"
        );
        spec.metrics_interval_ms = every;
    }
    if let Some(path) = &a.scheduler_config {
        spec.scheduler = config::Config::builder()
            .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
    }
    spec.scheduler.seed = a.sched_seed;
    // The scheduler's prior describes the modelled engines, which run time-scaled.
    spec.scheduler.cost = spec.scheduler.cost.time_scaled(a.time_scale);
    // The scheduler admits against the same SLOs the report measures goodput with.
    if let Some(t) = slo.ttft_ms {
        spec.scheduler.slo.ttft_ms = t;
    }
    if let Some(t) = slo.tpot_ms {
        spec.scheduler.slo.tbt_ms = t;
    }
    let settings = json!({
        "trace": a.trace.trace, "requests": trace.requests.len(), "prefill": a.prefill, "decode": a.decode,
        "mode": format!("{mode:?}"), "kv_blocks": spec.engine.kv_blocks, "decode_cache_blocks": spec.decode_cache_blocks, "host_cache_blocks": spec.engine.host_cache_blocks,
        "max_batch": spec.engine.max_batch, "max_batched_tokens": spec.engine.max_batched_tokens,
        "kv_bytes_per_token": spec.engine.kv_bytes_per_token, "kv_gbps": a.kv_gbps, "time_scale": a.time_scale,
        "overhead_ms": a.overhead_ms, "slo": slo, "kv_events": spec.gateways.kv_events,
        "event_lag_ms": spec.gateways.event_lag_ms, "metrics_interval_ms": spec.metrics_interval_ms,
        "sync_lag_ms": spec.gateways.sync_lag_ms,
    });
    let reports = sim::run_replicas(&trace, mode, &spec, &policies, &replicas, &slo, settings);
    let total: f64 = reports.iter().map(|r| r.wall_s).sum();
    eprintln!(
        "simulated {} requests × {} policies in {total:.2} s",
        trace.requests.len(),
        reports.len()
    );
    finish(&reports, a.trace.out.as_ref(), false)
}
