//! The `pdgate` file layout: the gateway's sections plus the binary's own (`up`, `log`), loaded
//! in layers: file → `PDGATE_*` environment (`__` between levels, e.g. `PDGATE_SERVER__PORT`) →
//! CLI flags. The config structs are the only source of defaults.

use pdgate_engine_sim::EngineConfig;
use pdgate_gateway::config as gateway;
pub use pdgate_gateway::config::{
    BreakerConfig, DiscoveryConfig, HealthConfig, KvEventsConfig, ModelConfig, ModelEntry,
    Protocol, ReplicasConfig, ServerConfig, UpstreamConfig, WorkerConfig,
};
use pdgate_scheduler::SchedulerConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One config file: every gateway section, the demo fleet and logging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    /// How pairs are chosen and requests admitted (policy, SLOs, cost model, prefix index).
    pub scheduler: SchedulerConfig,
    /// Statically configured engine instances.
    pub workers: Vec<WorkerConfig>,
    /// Where more engine instances come from: none (`static`), the Kubernetes API or DNS.
    pub discovery: DiscoveryConfig,
    /// Several models behind one gateway, each with its own engines and scheduler.
    pub models: Vec<ModelEntry>,
    pub health: HealthConfig,
    pub upstream: UpstreamConfig,
    /// Per-worker circuit breakers fed by leg outcomes.
    pub breaker: BreakerConfig,
    /// Bounds on what the engines' KV event streams may make the gateway hold.
    pub kv_events: KvEventsConfig,
    /// Booking sync with the other gateway replicas of the same fleet (off by default).
    pub replicas: ReplicasConfig,
    /// The embedded demo fleet started by `pdgate up`.
    pub up: UpConfig,
    pub log: LogConfig,
}

impl Config {
    /// The gateway's part of the file.
    pub fn gateway(&self) -> gateway::Config {
        gateway::Config {
            server: self.server.clone(),
            model: self.model.clone(),
            scheduler: self.scheduler.clone(),
            workers: self.workers.clone(),
            discovery: self.discovery.clone(),
            models: self.models.clone(),
            health: self.health.clone(),
            upstream: self.upstream.clone(),
            breaker: self.breaker,
            kv_events: self.kv_events.clone(),
            replicas: self.replicas.clone(),
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
    /// Each demo engine publishes KV events on loopback ports of its own (publisher and
    /// replay) and the gateway subscribes: the prefix index is then what the engines hold.
    /// `up.engine.kv_events.encoding` picks the encoding.
    pub kv_events: bool,
}

impl Default for UpConfig {
    fn default() -> Self {
        Self {
            prefill: 2,
            decode: 2,
            engine: EngineConfig::default(),
            kv_events: true,
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
        "discovery",
        "models",
        "health",
        "upstream",
        "breaker",
        "kv_events",
        "replicas",
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
        "host_cache_blocks",
        "host_copy_gbps",
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
        "fleet_secret_file",
        "transfer_tls",
        "kv_events",
        "export_blocks",
        "export_lease_ms",
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
        let file = top_level_keys::<Config>();
        let serving = serde_json::to_value(gateway::Config::default()).expect("serialize");
        for key in serving.as_object().expect("object").keys() {
            assert!(
                file.contains(key),
                "the file layout lacks gateway section `{key}`"
            );
        }
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
