//! `pdgate serve --config FILE --check`: load the config through every layer as `serve` would,
//! check it (`pdgate_gateway::config_check`), and print the effective config as TOML with its
//! secrets redacted, so what a deployment will run can be read (and diffed) before it runs.
//! It never binds or connects.

use crate::config::{
    BreakerConfig, Config, DiscoveryConfig, HealthConfig, KvEventsConfig, LogConfig, ModelConfig,
    ModelEntry, ReplicasConfig, ServerConfig, UpstreamConfig, WorkerConfig,
};
use pdgate_scheduler::SchedulerConfig;
use serde::Serialize;

/// What stands in for a secret in the printed config.
pub const REDACTED: &str = "<redacted>";

/// The effective config as TOML (what `serve` reads: every section but `pdgate up`'s), or every
/// problem with it.
pub fn check(cfg: &Config) -> anyhow::Result<String> {
    pdgate_gateway::config_check::check(&cfg.gateway())?;
    Ok(toml::to_string(&Served::of(&redacted(cfg)))?)
}

/// The sections `serve` reads, in the file's order (a test keeps it in step with `Config`).
#[derive(Serialize)]
struct Served<'a> {
    server: &'a ServerConfig,
    model: &'a ModelConfig,
    scheduler: &'a SchedulerConfig,
    workers: &'a [WorkerConfig],
    discovery: &'a DiscoveryConfig,
    models: &'a [ModelEntry],
    health: &'a HealthConfig,
    upstream: &'a UpstreamConfig,
    breaker: &'a BreakerConfig,
    kv_events: &'a KvEventsConfig,
    replicas: &'a ReplicasConfig,
    log: &'a LogConfig,
}

impl<'a> Served<'a> {
    fn of(c: &'a Config) -> Self {
        Self {
            server: &c.server,
            model: &c.model,
            scheduler: &c.scheduler,
            workers: &c.workers,
            discovery: &c.discovery,
            models: &c.models,
            health: &c.health,
            upstream: &c.upstream,
            breaker: &c.breaker,
            kv_events: &c.kv_events,
            replicas: &c.replicas,
            log: &c.log,
        }
    }
}

/// `cfg` with every credential replaced (file paths stay: they are not secrets).
pub fn redacted(cfg: &Config) -> Config {
    let mut c = cfg.clone();
    let hide = |s: &mut Option<String>| {
        if s.is_some() {
            *s = Some(REDACTED.into());
        }
    };
    hide(&mut c.server.api_key);
    hide(&mut c.server.admin_token);
    for key in &mut c.server.api_keys {
        *key = REDACTED.into();
    }
    // A broker URL may carry `user:password@`: the part before the host goes.
    c.replicas.url = c
        .replicas
        .url
        .split(',')
        .map(|u| match (u.split_once("://"), u.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{REDACTED}@{host}"),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layered;

    #[test]
    fn the_printed_config_has_every_section_but_ups() {
        let v = serde_json::to_value(Served::of(&Config::default())).expect("serialize");
        let mut printed: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        printed.sort_unstable();
        let mut want: Vec<&str> = Config::SECTIONS
            .iter()
            .copied()
            .filter(|s| *s != "up")
            .collect();
        want.sort_unstable();
        assert_eq!(printed, want);
    }

    #[test]
    fn credentials_are_redacted_and_paths_kept() {
        let mut cfg = Config::default();
        cfg.server.api_key = Some("sk-one".into());
        cfg.server.api_keys = vec!["sk-two".into()];
        cfg.server.admin_token = Some("adm".into());
        cfg.server.fleet_secret_file = Some("/etc/pdgate/fleet".into());
        cfg.replicas.url = "nats://u:nats-pass@10.0.0.5:4222,nats://10.0.0.6:4222".into();
        let text = toml::to_string(&Served::of(&redacted(&cfg))).expect("toml");
        assert!(!text.contains("nats-pass"), "{text}");
        assert!(text.contains("10.0.0.5:4222") && text.contains("nats://10.0.0.6:4222"));
        for secret in ["sk-one", "sk-two", "adm\""] {
            assert!(!text.contains(secret), "{secret} printed");
        }
        assert!(text.contains("/etc/pdgate/fleet"));
        assert_eq!(text.matches(REDACTED).count(), 4);
    }
}
