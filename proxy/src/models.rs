//! The models a gateway serves, each with its own fleet (workers and scheduler), prefix keyer
//! (tokenizer and block hasher) and discovery settings. A request reaches one model by the name
//! or alias in its body, and only that model's engines; nothing is shared between models but the
//! gateway's front door. Built once at start; membership changes inside a model go through its
//! `Fleet`, never through this list.

use crate::config::{Config, DiscoveryConfig, ServedModel};
use crate::fleet::Fleet;
use crate::room_line::Line;
use crate::workers::Worker;
use anyhow::Context;
use pdgate_scheduler::{BlockHasher, InstanceId, SchedulerConfig, Tokenizer};
use std::sync::Arc;

/// Worker ids each model's scheduler may hand out before the next model's range begins
/// (`config::MAX_MODELS` ranges fit in a `u32`).
pub const IDS_PER_MODEL: u32 = 1 << 22;

pub struct Model {
    /// What the engines serve and are sent, whichever name the client used.
    pub name: String,
    pub aliases: Vec<String>,
    pub fleet: Arc<Fleet>,
    pub tokenizer: Tokenizer,
    pub hasher: BlockHasher,
    pub scheduler: SchedulerConfig,
    pub discovery: DiscoveryConfig,
    /// New requests waiting for KV room on this model's decodes.
    pub room: Line,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("name", &self.name).finish()
    }
}

impl Model {
    fn build(m: ServedModel, index: usize) -> anyhow::Result<Self> {
        let tokenizer = match &m.tokenizer {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading tokenizer {}", path.display()))?;
                Tokenizer::from_json_bytes(&bytes)
                    .with_context(|| format!("loading tokenizer {}", path.display()))?
            }
            None => Tokenizer::builtin(),
        };
        let first_id = u32::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(IDS_PER_MODEL))
            .context("too many models")?;
        let fleet = Arc::new(Fleet::for_model(&m.name, m.scheduler.clone(), first_id));
        for w in &m.workers {
            fleet.add(w);
        }
        Ok(Self {
            hasher: BlockHasher::new(
                m.scheduler.block_size,
                pdgate_scheduler::blocks::DEFAULT_SEED,
            ),
            name: m.name,
            aliases: m.aliases,
            fleet,
            tokenizer,
            room: Line::new(&m.scheduler.slo),
            scheduler: m.scheduler,
            discovery: m.discovery,
        })
    }

    /// Whether a request naming `name` is for this model.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }
}

/// Every served model, in config order.
pub struct Models {
    list: Vec<Arc<Model>>,
}

impl Models {
    /// The models of `cfg`, their static workers added; refuses a set of models that cannot be
    /// told apart (`Config::model_problems`) or a tokenizer that does not load.
    pub fn build(cfg: &Config) -> anyhow::Result<Self> {
        let problems = cfg.model_problems();
        if !problems.is_empty() {
            anyhow::bail!("[[models]]: {}", problems.join("; "));
        }
        let list = cfg
            .served_models()
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let name = m.name.clone();
                Model::build(m, i)
                    .map(Arc::new)
                    .with_context(|| format!("model `{name}`"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { list })
    }

    pub fn all(&self) -> &[Arc<Model>] {
        &self.list
    }

    /// The model a request's `model` names (its name or an alias).
    pub fn resolve(&self, name: &str) -> Option<&Arc<Model>> {
        self.list.iter().find(|m| m.answers_to(name))
    }

    /// The model with exactly this configured name (not an alias).
    pub fn named(&self, name: &str) -> Option<&Arc<Model>> {
        self.list.iter().find(|m| m.name == name)
    }

    /// The one model, when only one is served.
    pub fn only(&self) -> Option<&Arc<Model>> {
        match self.list.as_slice() {
            [m] => Some(m),
            _ => None,
        }
    }

    /// The model holding worker `id` (ids are unique across models).
    pub fn model_of(&self, id: InstanceId) -> Option<&Arc<Model>> {
        self.list.iter().find(|m| m.fleet.workers.get(id).is_some())
    }

    /// The model whose fleet holds an engine at `url` (any role), if any.
    pub fn holding_url(&self, url: &str) -> Option<(&Arc<Model>, Arc<Worker>)> {
        let url = url.trim_end_matches('/');
        self.list.iter().find_map(|m| {
            m.fleet
                .workers
                .all()
                .into_iter()
                .find(|w| w.url == url)
                .map(|w| (m, w))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelEntry, WorkerConfig};
    use pdgate_scheduler::Role;

    fn entry(name: &str, aliases: &[&str], urls: &[&str]) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            workers: urls
                .iter()
                .map(|u| WorkerConfig {
                    url: u.to_string(),
                    role: Role::Decode,
                    protocol: Default::default(),
                    bootstrap_port: None,
                    kv_events: None,
                    kv_events_replay: None,
                })
                .collect(),
            ..ModelEntry::default()
        }
    }

    #[test]
    fn each_model_has_its_own_fleet_and_id_range() {
        let cfg = Config {
            models: vec![
                entry("a", &["a-alias"], &["http://e:1"]),
                entry("b", &[], &["http://e:2"]),
            ],
            ..Config::default()
        };
        let models = Models::build(&cfg).expect("models");
        let a = models.resolve("a-alias").expect("alias resolves");
        assert_eq!(a.name, "a");
        assert!(models.resolve("nope").is_none());
        assert!(models.only().is_none());
        let b = models.named("b").expect("b");
        let (ida, idb) = (a.fleet.workers.all()[0].id, b.fleet.workers.all()[0].id);
        assert_ne!(ida, idb);
        assert_eq!(models.model_of(idb).map(|m| m.name.as_str()), Some("b"));
        assert_eq!(
            models
                .holding_url("http://e:1/")
                .map(|(m, _)| m.name.as_str()),
            Some("a")
        );
    }

    #[test]
    fn clashing_models_are_refused_at_build() {
        for (models, needle) in [
            (
                vec![entry("a", &[], &[]), entry("a", &[], &[])],
                "already names",
            ),
            (
                vec![entry("a", &["b"], &[]), entry("b", &[], &[])],
                "already names",
            ),
            (vec![entry("a", &["a"], &[])], "listed twice"),
            (vec![entry(" ", &[], &[])], "name: empty"),
            (
                vec![
                    entry("a", &[], &["http://e:1"]),
                    entry("b", &[], &["http://e:1/"]),
                ],
                "already an engine of model `a`",
            ),
        ] {
            let cfg = Config {
                models,
                ..Config::default()
            };
            let err = Models::build(&cfg).err().expect("refused").to_string();
            assert!(err.contains(needle), "{err}");
        }
        let mixed = Config {
            models: vec![entry("a", &[], &[])],
            workers: entry("x", &[], &["http://e:9"]).workers,
            ..Config::default()
        };
        let err = Models::build(&mixed).err().expect("refused").to_string();
        assert!(err.contains("[[models.workers]]"), "{err}");
    }

    #[test]
    fn the_single_model_config_is_one_implicit_model() {
        let models = Models::build(&Config::default()).expect("models");
        let only = models.only().expect("one model");
        assert_eq!(only.name, pdgate_wire::openai::DEFAULT_MODEL);
        assert!(only.aliases.is_empty());
    }
}
