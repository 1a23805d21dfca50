//! `pdgate up`: the gateway plus an embedded fleet of reference engines in this process, wired
//! together (engines register their KV segments with the gateway's registry) and ready to serve.

use crate::config::{Config, WorkerConfig};
use pdgate_engine_sim::{EngineConfig, EngineHandle};
use pdgate_gateway::gateway::Gateway;
use pdgate_scheduler::Role;

pub struct Fleet {
    pub gateway: Gateway,
    pub engines: Vec<(Role, EngineHandle)>,
}

impl Fleet {
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cfg.up.prefill > 0 && cfg.up.decode > 0,
            "`up` needs at least one prefill and one decode engine"
        );
        anyhow::ensure!(
            cfg.up.engine.block_size == cfg.scheduler.block_size
                && cfg.up.engine.model == cfg.model.name,
            "up.engine.block_size/model must match scheduler.block_size/model.name"
        );
        let mut cfg = cfg;
        // The demo fleet's model is authoritative for what a handoff moves.
        cfg.scheduler.kv_bytes_per_token = cfg.up.engine.kv_bytes_per_token;
        // ... and for how fast it computes: a time-scaled fleet is predicted time-scaled.
        cfg.scheduler.cost = cfg
            .scheduler
            .cost
            .time_scaled(cfg.up.engine.timing.time_scale);
        let up = cfg.up.clone();
        let gateway = Gateway::start(cfg.gateway()).await?;
        let mut engines = Vec::with_capacity(up.prefill + up.decode);
        let roles = std::iter::repeat_n(Role::Prefill, up.prefill)
            .chain(std::iter::repeat_n(Role::Decode, up.decode));
        for role in roles {
            let engine_cfg = EngineConfig {
                role,
                port: 0,
                transfer_port: 0,
                registry_url: Some(gateway.url()),
                ..up.engine.clone()
            };
            let handle = pdgate_engine_sim::spawn(engine_cfg).await?;
            gateway.add_worker(&WorkerConfig {
                url: handle.url(),
                role,
                protocol: up.engine.protocol,
                bootstrap_port: None,
            });
            engines.push((role, handle));
        }
        gateway.check_health().await;
        Ok(Self { gateway, engines })
    }

    pub fn url(&self) -> String {
        self.gateway.url()
    }

    pub fn banner(&self) -> String {
        let mut out = format!("pdgate gateway  {}\n", self.url());
        for (role, e) in &self.engines {
            out.push_str(&format!("  {role:<7} engine  {}\n", e.url()));
        }
        out.push_str(&format!(
            "\ntry:\n  curl -s {}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\nCtrl-C stops everything.\n",
            self.url(),
            self.gateway.state.cfg.model.name
        ));
        out
    }

    /// Engines first, so they can still deregister their segments with the gateway's registry.
    pub async fn stop(self) {
        for (_, e) in self.engines {
            e.stop().await;
        }
        self.gateway.stop().await;
    }
}
