//! `pdgate up`: the gateway plus an embedded fleet of reference engines in this process, wired
//! together (engines register their KV segments with the gateway's registry) and ready to serve.
//! The fleet shares one fleet secret: the configured one, else a random one made for this process
//! (so the demo's transfer plane is authenticated, not open to anyone who reaches its ports).
//! With `[[models]]`, every model that lists no engines and discovers none gets a fleet of its
//! own (`up.prefill` + `up.decode` engines serving that model's name).

use crate::config::{Config, WorkerConfig};
use pdgate_engine_sim::{EngineConfig, EngineHandle};
use pdgate_gateway::gateway::Gateway;
use pdgate_scheduler::Role;
use std::path::{Path, PathBuf};

pub struct Fleet {
    pub gateway: Gateway,
    pub engines: Vec<(Role, EngineHandle)>,
    /// The model each of `engines` serves, in the same order.
    pub engine_models: Vec<String>,
    /// The per-process secret's file, when `up` made one; removed with the fleet.
    _secret: Option<GeneratedSecret>,
}

/// A random fleet secret in a private file (a 0700 directory of its own, the file 0600): the
/// secret reaches the gateway and the engines the way a configured one does (`fleet_secret_file`),
/// never on a command line or in the environment. Removed on drop.
struct GeneratedSecret {
    dir: PathBuf,
}

impl GeneratedSecret {
    fn create() -> anyhow::Result<Self> {
        use rand::RngCore;
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let dir = std::env::temp_dir().join(format!(
            "pdgate-up-{}-{}",
            std::process::id(),
            hex(&bytes[..4])
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let secret = Self { dir };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(secret.path())?
            .write_all(hex(&bytes).as_bytes())?;
        Ok(secret)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("fleet-secret")
    }
}

impl Drop for GeneratedSecret {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Points the gateway and the demo engines at one fleet secret: a configured file is shared by
/// both; with none (and no `PDGATE_FLEET_SECRET`, which both read themselves) a fresh random one.
fn share_fleet_secret(cfg: &mut Config) -> anyhow::Result<Option<GeneratedSecret>> {
    let configured = cfg
        .up
        .engine
        .fleet_secret_file
        .clone()
        .or_else(|| cfg.server.fleet_secret_file.clone());
    let env = std::env::var_os(pdgate_wire::fleet::SECRET_ENV).is_some();
    let (file, generated) = match configured {
        Some(file) => (Some(file), None),
        None if env => (None, None),
        None => {
            let g = GeneratedSecret::create()?;
            (Some(g.path()), Some(g))
        }
    };
    if let Some(file) = file {
        let fill = |slot: &mut Option<PathBuf>, file: &Path| {
            slot.get_or_insert_with(|| file.to_path_buf());
        };
        fill(&mut cfg.up.engine.fleet_secret_file, &file);
        fill(&mut cfg.server.fleet_secret_file, &file);
    }
    Ok(generated)
}

impl Fleet {
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cfg.up.prefill > 0 && cfg.up.decode > 0,
            "`up` needs at least one prefill and one decode engine"
        );
        let mut cfg = cfg;
        let engine = cfg.up.engine.clone();
        let single = cfg.models.is_empty();
        anyhow::ensure!(
            engine.block_size == cfg.scheduler.block_size
                && (!single || engine.model == cfg.model.name),
            "up.engine.block_size/model must match scheduler.block_size/model.name"
        );
        let schedulers = std::iter::once(&mut cfg.scheduler)
            .chain(cfg.models.iter_mut().filter_map(|m| m.scheduler.as_mut()));
        for s in schedulers {
            anyhow::ensure!(
                s.block_size == engine.block_size,
                "a model's scheduler.block_size must match up.engine.block_size"
            );
            // The demo fleet's model is authoritative for what a handoff moves.
            s.kv_bytes_per_token = engine.kv_bytes_per_token;
            // ... and for how fast it computes: a time-scaled fleet is predicted time-scaled.
            s.cost = s.cost.time_scaled(engine.timing.time_scale);
        }
        // The models `up` starts engines for: the single model, or each `[[models]]` entry
        // that has no engines of its own.
        let demo_models: Vec<String> = match single {
            true => vec![cfg.model.name.clone()],
            false => cfg
                .models
                .iter()
                .filter(|m| m.workers.is_empty() && m.discovery == Default::default())
                .map(|m| m.name.clone())
                .collect(),
        };
        let secret = share_fleet_secret(&mut cfg)?;
        let up = cfg.up.clone();
        let plain_listener = cfg.server.tls.is_none();
        let gateway = Gateway::start(cfg.gateway()).await?;
        let mut engines = Vec::with_capacity(demo_models.len() * (up.prefill + up.decode));
        let mut engine_models = Vec::with_capacity(engines.capacity());
        for model in &demo_models {
            let roles = std::iter::repeat_n(Role::Prefill, up.prefill)
                .chain(std::iter::repeat_n(Role::Decode, up.decode));
            for role in roles {
                let engine_cfg = EngineConfig {
                    role,
                    model: model.clone(),
                    port: 0,
                    transfer_port: 0,
                    // The reference engine's registry client speaks plain HTTP only; behind a
                    // TLS listener the demo engines find their peers where the peers say they are.
                    registry_url: plain_listener.then(|| gateway.url()),
                    ..up.engine.clone()
                };
                let handle = pdgate_engine_sim::spawn(engine_cfg).await?;
                let worker = WorkerConfig {
                    url: handle.url(),
                    role,
                    protocol: up.engine.protocol,
                    bootstrap_port: None,
                };
                gateway.add_worker_to(model, &worker)?;
                engines.push((role, handle));
                engine_models.push(model.clone());
            }
        }
        gateway.check_health().await;
        Ok(Self {
            gateway,
            engines,
            engine_models,
            _secret: secret,
        })
    }

    pub fn url(&self) -> String {
        self.gateway.url()
    }

    pub fn banner(&self) -> String {
        let mut out = format!("pdgate gateway  {}\n", self.url());
        for ((role, e), model) in self.engines.iter().zip(&self.engine_models) {
            out.push_str(&format!("  {role:<7} engine  {}  {model}\n", e.url()));
        }
        out.push_str(&format!(
            "\ntry:\n  curl -s {}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\nCtrl-C stops everything.\n",
            self.url(),
            self.gateway
                .state
                .models
                .all()
                .first()
                .map_or("", |m| m.name.as_str())
        ));
        out
    }

    /// Engines first, so they can still deregister their segments with the gateway's registry;
    /// a generated secret's file last.
    /// The gateway drains first, so the requests it lets finish still have their engines.
    pub async fn stop(self) {
        self.gateway.stop().await;
        for (_, e) in self.engines {
            e.stop().await;
        }
    }
}
