//! The gateway's configuration: one struct tree with serde defaults and doc comments, loaded in
//! layers: file → `PDGATE_*` environment (`__` between levels, e.g. `PDGATE_SERVER__PORT`) → CLI
//! flags. These structs are the only source of defaults.

pub use crate::breaker::BreakerConfig;
use pdgate_engine_sim::EngineConfig;
use pdgate_scheduler::{Role, SchedulerConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    /// How pairs are chosen and requests admitted (policy, SLOs, cost model, prefix index).
    pub scheduler: SchedulerConfig,
    /// Statically configured engine instances.
    pub workers: Vec<WorkerConfig>,
    pub health: HealthConfig,
    pub upstream: UpstreamConfig,
    /// Per-worker circuit breakers fed by leg outcomes.
    pub breaker: BreakerConfig,
    /// The embedded demo fleet started by `pdgate up`.
    pub up: UpConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// Requests in flight at once; beyond it the gateway answers 503 at once instead of queueing.
    /// Each prompt of a batched completions request counts as one.
    pub max_in_flight: usize,
    /// Most prompts one `/v1/completions` request may batch (`"prompt": [...]`); each becomes
    /// its own routed request, so this bounds one client request's fan-out.
    pub max_batch_prompts: usize,
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Bearer token required on `/admin/*` when set.
    pub admin_token: Option<String>,
    /// Seconds to let in-flight requests finish after SIGTERM.
    pub drain_secs: u64,
    /// Segment-registry entries not re-published (engines heartbeat every 10 s by default)
    /// within this many seconds are stale: their engine died without deregistering.
    pub segment_ttl_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            max_body_bytes: 4 * 1024 * 1024,
            max_in_flight: 4096,
            max_batch_prompts: 32,
            api_key: None,
            admin_token: None,
            drain_secs: 30,
            segment_ttl_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name served (what `/v1/models` lists and requests must name).
    pub name: String,
    /// The model's HuggingFace `tokenizer.json`; without it prefix keys use the built-in
    /// tokenizer (which is what the reference engine uses).
    pub tokenizer: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            name: EngineConfig::default().model,
            tokenizer: None,
        }
    }
}

/// The PD protocol a worker speaks: `native`, `vllm-nixl`, `vllm-mooncake`, `sglang` or `trtllm`.
/// One enum shared with the reference engine, so `pdgate up --protocol P` and a pool's
/// `protocol = "P"` can never disagree on a name.
pub use pdgate_engine_sim::config::Protocol;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub url: String,
    pub role: Role,
    #[serde(default)]
    pub protocol: Protocol,
    /// Prefill engines of `sglang` and `vllm-mooncake` pools: the port of the engine's bootstrap
    /// server (SGLang `--disaggregation-bootstrap-port`, vLLM Mooncake's, both 8998 by default).
    /// Unset means the HTTP port (the reference engine serves both on one port).
    #[serde(default)]
    pub bootstrap_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failed checks before a worker is marked down.
    pub fail_threshold: u32,
    /// Consecutive passed checks before a down worker is marked up again.
    pub recover_threshold: u32,
    /// How often each engine's `/metrics` is scraped for its own load (0 disables).
    pub metrics_interval_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 2000,
            timeout_ms: 1000,
            fail_threshold: 2,
            recover_threshold: 1,
            metrics_interval_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub connect_timeout_ms: u64,
    /// Deadline for a reserve or release call.
    pub control_timeout_ms: u64,
    /// Deadline for a whole prefill leg (compute and KV transfer).
    pub prefill_timeout_secs: u64,
    /// Deadline for the decode leg's response head.
    pub decode_head_timeout_secs: u64,
    /// Prefill instances tried per request before giving up (retries happen before any byte
    /// reached the client).
    pub prefill_attempts: u32,
    /// When every prefill attempt failed before any byte reached the client, send the plain
    /// request to the decode instance (it prefills locally) instead of failing. Never silent:
    /// the response carries `x-pdgate-fallback: decode-prefill` and `pdgate_fallbacks_total`
    /// counts it. Off by default: a decode prefilling long prompts slows every stream it serves.
    pub fallback_to_decode: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            control_timeout_ms: 5000,
            prefill_timeout_secs: 120,
            decode_head_timeout_secs: 60,
            prefill_attempts: 2,
            fallback_to_decode: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpConfig {
    pub prefill: usize,
    pub decode: usize,
    /// Every demo engine starts from this; role, port and registry are set per engine.
    pub engine: EngineConfig,
}

impl Default for UpConfig {
    fn default() -> Self {
        Self {
            prefill: 2,
            decode: 2,
            engine: EngineConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directive, overridden by `RUST_LOG`.
    pub filter: String,
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            json: false,
        }
    }
}

/// A config tree that can be layered: its top-level keys, so that only environment variables
/// naming one of them are read (other `PDGATE_*` variables, e.g. test or bench knobs, are not
/// config and must not be rejected as unknown keys).
pub trait Layered: serde::de::DeserializeOwned + Serialize + Default {
    const SECTIONS: &'static [&'static str];
}

impl Layered for Config {
    const SECTIONS: &'static [&'static str] = &[
        "server",
        "model",
        "scheduler",
        "workers",
        "health",
        "upstream",
        "breaker",
        "up",
        "log",
    ];
}

impl Layered for EngineConfig {
    const SECTIONS: &'static [&'static str] = &[
        "role",
        "model",
        "host",
        "port",
        "transfer_port",
        "transport",
        "block_size",
        "kv_bytes_per_token",
        "kv_blocks",
        "max_batch",
        "max_batched_tokens",
        "max_waiting",
        "max_tokens_limit",
        "default_max_tokens",
        "seed",
        "reservation_ttl_secs",
        "timing",
        "protocol",
        "bootstrap_timeout_ms",
        "registry_url",
        "registry_heartbeat_secs",
        "faults",
    ];
}

/// `PREFIX_KEY__SUB=v` variables whose first key is one of `T::SECTIONS`.
fn env_layer<T: Layered>(prefix: &str) -> std::collections::HashMap<String, String> {
    let lead = format!("{prefix}_");
    std::env::vars()
        .filter(|(k, _)| {
            k.strip_prefix(&lead).is_some_and(|rest| {
                let first = rest
                    .split("__")
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                T::SECTIONS.contains(&first.as_str())
            })
        })
        .collect()
}

/// Loads `T` from an optional file, then `PDGATE_*` env, then `overrides` (CLI flags as
/// dotted keys, e.g. `server.port`).
pub fn load<T: Layered>(
    file: Option<&Path>,
    env_prefix: &str,
    overrides: &[(&str, String)],
) -> anyhow::Result<T> {
    let mut b = config::Config::builder();
    if let Some(path) = file {
        b = b.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    b = b.add_source(
        config::Environment::with_prefix(env_prefix)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(env_layer::<T>(env_prefix))),
    );
    for (key, value) in overrides {
        b = b.set_override(*key, value.as_str())?;
    }
    let cfg = b.build()?.try_deserialize()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_configs_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("configs dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                load::<Config>(Some(&path), "PDGATE_TEST_NONE", &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 1, "no configs found");
    }

    #[test]
    fn layers_apply_in_order_file_then_override() {
        let dir = std::env::temp_dir().join(format!("pdgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[server]\nport = 9001\nhost = \"0.0.0.0\"\n[scheduler]\npolicy = \"round_robin\"\n",
        )
        .expect("write");
        let cfg: Config = load(
            Some(&file),
            "PDGATE_TEST_NONE",
            &[("server.port", "9002".into())],
        )
        .expect("load");
        assert_eq!(cfg.server.port, 9002, "CLI beats file");
        assert_eq!(cfg.server.host, "0.0.0.0", "file beats default");
        assert_eq!(
            cfg.scheduler.policy,
            pdgate_scheduler::PolicyKind::RoundRobin
        );
        assert_eq!(
            cfg.server.max_body_bytes,
            ServerConfig::default().max_body_bytes,
            "default kept"
        );
    }

    fn top_level_keys<T: Layered>() -> Vec<String> {
        let v = serde_json::to_value(T::default()).expect("serialize");
        let mut keys: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn sections_list_every_top_level_key() {
        let sorted = |s: &[&str]| {
            let mut v: Vec<String> = s.iter().map(|k| k.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(top_level_keys::<Config>(), sorted(Config::SECTIONS));
        assert_eq!(
            top_level_keys::<EngineConfig>(),
            sorted(EngineConfig::SECTIONS)
        );
    }

    #[test]
    fn env_layer_reads_only_config_keys() {
        std::env::set_var("PDGATECFGTEST_SERVER__PORT", "7007");
        std::env::set_var("PDGATECFGTEST_BIN", "/not/config");
        let cfg: Config =
            load(None, "PDGATECFGTEST", &[]).expect("stray PDGATE_* vars are ignored");
        assert_eq!(cfg.server.port, 7007, "env beats default");
        let cfg: Config =
            load(None, "PDGATECFGTEST", &[("server.port", "7008".into())]).expect("load");
        assert_eq!(cfg.server.port, 7008, "CLI beats env");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("pdgate-cfg-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(&file, "[server]\nprot = 1\n").expect("write");
        assert!(load::<Config>(Some(&file), "PDGATE_TEST_NONE", &[]).is_err());
    }
}
