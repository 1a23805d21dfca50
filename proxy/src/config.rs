//! The gateway's configuration: one struct tree with serde defaults and doc comments, the only
//! source of the gateway's defaults. The `pdgate` binary loads it in layers (file → `PDGATE_*`
//! environment → CLI flags) as part of its own file layout.

pub use crate::breaker::BreakerConfig;
use pdgate_scheduler::{Role, SchedulerConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    /// How pairs are chosen and requests admitted (policy, SLOs, cost model, prefix index); with
    /// `[[models]]`, the settings of every model that has no `[models.scheduler]` of its own.
    pub scheduler: SchedulerConfig,
    /// Statically configured engine instances.
    pub workers: Vec<WorkerConfig>,
    /// Where more engine instances come from: none (`static`), the Kubernetes API or DNS.
    pub discovery: DiscoveryConfig,
    /// Several models behind one gateway, each with its own engines and scheduler. Empty: the
    /// top-level `model`, `workers` and `discovery` are the one model served.
    pub models: Vec<ModelEntry>,
    pub health: HealthConfig,
    pub upstream: UpstreamConfig,
    /// Per-worker circuit breakers fed by leg outcomes.
    pub breaker: BreakerConfig,
    /// Booking sync with the other gateway replicas of the same fleet (off by default).
    pub replicas: ReplicasConfig,
    /// Bounds on what the engines' KV event streams may make the gateway hold.
    pub kv_events: KvEventsConfig,
}

/// Limits for the KV event subscribers (workers with `kv_events` set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvEventsConfig {
    /// A payload (one event batch) larger than this is dropped and counted as a decode error.
    pub max_payload_bytes: usize,
    /// Events in one batch, block hashes in one event: more is a decode error.
    pub max_events_per_batch: usize,
    pub max_blocks_per_event: usize,
    /// Engine blocks remembered per worker (for `BlockRemoved`); stores beyond it are skipped.
    pub max_blocks_per_worker: usize,
    /// How long a replay after a gap may take, and how many batches it may bring.
    pub replay_timeout_ms: u64,
    pub max_replay_batches: usize,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 16 << 20,
            max_events_per_batch: 65_536,
            max_blocks_per_event: 16_384,
            max_blocks_per_worker: 4 << 20,
            replay_timeout_ms: 2_000,
            max_replay_batches: 20_000,
        }
    }
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
    /// Client connections: how many at once, and how long each part of a request may take.
    pub limits: ConnLimits,
    /// TLS on the client listener; absent means plain HTTP.
    pub tls: Option<ServerTls>,
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Bearer token required on `/admin/*` when set.
    pub admin_token: Option<String>,
    /// File holding the fleet secret (else `PDGATE_FLEET_SECRET`), shared with the engines: the
    /// segment registry takes writes only from holders of it. Never a command-line value.
    pub fleet_secret_file: Option<PathBuf>,
    /// More API keys accepted on `/v1/*`, beside `api_key`; each key gets its own `rate_limit`.
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (blank lines and `#` comments skipped), read at start:
    /// keeps keys out of the config file and the environment.
    pub api_keys_file: Option<PathBuf>,
    /// Limits on `/v1/*` per API key (one shared budget when no key is configured).
    pub rate_limit: RateLimitConfig,
    /// Most segments the registry holds at once (two per engine at most with the reference
    /// engine); a publish beyond it is refused with 503.
    pub segment_capacity: usize,
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
            limits: ConnLimits::default(),
            tls: None,
            api_key: None,
            admin_token: None,
            fleet_secret_file: None,
            api_keys: Vec::new(),
            api_keys_file: None,
            rate_limit: RateLimitConfig::default(),
            segment_capacity: 4096,
            drain_secs: 30,
            segment_ttl_secs: 30,
        }
    }
}

/// `[server.limits]`: what one client connection may cost the gateway. Every wait on a client
/// is bounded by one of these, so a client that sends or reads slowly (or not at all) holds a
/// connection, and the request behind it, for a bounded time only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnLimits {
    /// Client connections open at once; a connection past it is answered 503 and closed.
    pub max_connections: usize,
    /// A request head must arrive whole within this many milliseconds of its first byte.
    pub head_timeout_ms: u64,
    /// A request body must arrive whole within this many milliseconds of the end of its head
    /// (the largest body, `max_body_bytes`, then needs about 70 KB/s at the defaults).
    pub body_timeout_ms: u64,
    /// A body slower than `body_min_rate_bytes_per_sec` is refused (408) once this grace and
    /// the time its bytes earned have passed, well before `body_timeout_ms`.
    pub body_grace_ms: u64,
    /// Each this many bytes of body buy one more second past `body_grace_ms`; 0 turns it off.
    pub body_min_rate_bytes_per_sec: u64,
    /// A kept-alive connection with no request under way for this long is closed.
    pub idle_timeout_ms: u64,
    /// Each write toward the client must be taken by it within this; a client that stops
    /// reading loses the connection, and its request is dropped (legs aborted, KV freed).
    pub write_timeout_ms: u64,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            head_timeout_ms: 30_000,
            body_timeout_ms: 60_000,
            body_grace_ms: 5_000,
            body_min_rate_bytes_per_sec: 1024,
            idle_timeout_ms: 75_000,
            write_timeout_ms: 30_000,
        }
    }
}

/// `[server.tls]`: the client listener speaks TLS (1.2 and 1.3, ALPN `http/1.1`) with this
/// certificate. The certificate and key are read again on SIGHUP and when either file changes
/// (checked every `reload_poll_ms`); a pair that does not load keeps the one in service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, the server's own certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, every client must present a certificate they issued
    /// (mutual TLS). Read at start only.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the two files are checked for a change, in milliseconds (0: on SIGHUP only).
    #[serde(default = "ServerTls::default_reload_poll_ms")]
    pub reload_poll_ms: u64,
}

impl ServerTls {
    fn default_reload_poll_ms() -> u64 {
        10_000
    }
}

/// `[server.rate_limit]`: what one API key may ask of the gateway. Each key has its own token
/// bucket and concurrency budget; a request beyond either is answered 429 with `Retry-After` at
/// once, never queued. Zero turns a limit off (the default: no limits).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second per key (the bucket's refill rate).
    pub requests_per_second: f64,
    /// Requests a key may send at once after a quiet spell (the bucket's size); 0 means one
    /// second's worth, at least 1.
    pub burst: u32,
    /// Requests of one key in flight at once, a streamed answer counting until its last byte.
    pub max_concurrent: u32,
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
            name: pdgate_wire::openai::DEFAULT_MODEL.into(),
            tokenizer: None,
        }
    }
}

/// `[[models]]`: one model of several served by one gateway. Requests naming `name` or one of
/// `aliases` go to this model's engines only, scheduled by its own scheduler; the engines are
/// sent `name` (what they serve) whichever the client used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// More names clients may use for this model.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// As `model.tokenizer`, for this model.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// This model's scheduler settings, replacing the top-level `[scheduler]` whole.
    #[serde(default)]
    pub scheduler: Option<SchedulerConfig>,
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
}

/// One served model as the gateway runs it: `[[models]]` entries with their scheduler resolved,
/// or the single model of the top-level sections.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedModel {
    pub name: String,
    pub aliases: Vec<String>,
    pub tokenizer: Option<PathBuf>,
    pub scheduler: SchedulerConfig,
    pub workers: Vec<WorkerConfig>,
    pub discovery: DiscoveryConfig,
}

/// Most `[[models]]` one gateway serves: each model's worker ids get a range of their own.
pub const MAX_MODELS: usize = 1024;

impl Config {
    /// The models served: every `[[models]]` entry, or the one the top-level sections describe.
    pub fn served_models(&self) -> Vec<ServedModel> {
        if self.models.is_empty() {
            return vec![ServedModel {
                name: self.model.name.clone(),
                aliases: Vec::new(),
                tokenizer: self.model.tokenizer.clone(),
                scheduler: self.scheduler.clone(),
                workers: self.workers.clone(),
                discovery: self.discovery.clone(),
            }];
        }
        self.models
            .iter()
            .map(|m| ServedModel {
                name: m.name.clone(),
                aliases: m.aliases.clone(),
                tokenizer: m.tokenizer.clone(),
                scheduler: m
                    .scheduler
                    .clone()
                    .unwrap_or_else(|| self.scheduler.clone()),
                workers: m.workers.clone(),
                discovery: m.discovery.clone(),
            })
            .collect()
    }

    /// What makes a set of models unservable whatever else holds: a name two models answer to,
    /// an engine in two models, single-model sections mixed with `[[models]]`. The gateway
    /// refuses to start on any; `config_check` reports them with the rest.
    pub fn model_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.models.is_empty() {
            let single = ModelConfig::default();
            if self.model.name != single.name || self.model.tokenizer.is_some() {
                out.push(
                    "model: with [[models]], each model is named in its own entry (drop [model])"
                        .into(),
                );
            }
            if !self.workers.is_empty() {
                out.push(
                    "workers: with [[models]], each model lists its own engines \
                     ([[models.workers]])"
                        .into(),
                );
            }
            if self.discovery != DiscoveryConfig::default() {
                out.push(
                    "discovery: with [[models]], each model has its own [models.discovery]".into(),
                );
            }
            if self.models.len() > MAX_MODELS {
                out.push(format!("models: at most {MAX_MODELS} models"));
            }
        }
        // Each name or URL seen, with the index of the model it belongs to.
        let mut names: Vec<(&str, usize)> = Vec::new();
        let mut urls: Vec<(&str, usize)> = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.trim().is_empty() {
                out.push(format!("models[{i}].name: empty"));
            }
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if n.trim().is_empty() {
                    if n != &m.name {
                        out.push(format!("models[{i}].aliases: an empty alias"));
                    }
                    continue;
                }
                match names.iter().find(|(seen, _)| seen == n) {
                    Some((_, owner)) if *owner == i => {
                        out.push(format!("models[{i}] ({}): `{n}` is listed twice", m.name))
                    }
                    Some((_, owner)) => out.push(format!(
                        "models[{i}] ({}): `{n}` already names model `{}` (models[{owner}])",
                        m.name, self.models[*owner].name
                    )),
                    None => names.push((n, i)),
                }
            }
            for w in &m.workers {
                let url = w.url.trim_end_matches('/');
                if let Some((_, owner)) = urls.iter().find(|(u, o)| *u == url && *o != i) {
                    out.push(format!(
                        "models[{i}] ({}): engine {url} is already an engine of model `{}` \
                         (an engine serves one model)",
                        m.name, self.models[*owner].name
                    ));
                } else {
                    urls.push((url, i));
                }
            }
        }
        out
    }
}

/// The PD protocol a worker speaks: `native`, `vllm-nixl`, `vllm-mooncake`, `sglang` or `trtllm`.
pub use pdgate_wire::Protocol;

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
    /// The engine's KV events publisher (`tcp://host:5557`, the `endpoint` of vLLM's and
    /// SGLang's `--kv-events-config`, the reference engine's too): the gateway subscribes and
    /// keeps this worker's prefix index exactly as the engine reports it. Unset: the index
    /// learns from the gateway's own routing (approximate, `scheduler.index.ttl_secs`).
    #[serde(default)]
    pub kv_events: Option<String>,
    /// The engine's replay socket (`replay_endpoint`, `tcp://host:5558`): missed batches are
    /// asked for after a sequence gap or a reconnect. Unset: a gap drops this worker's entries.
    #[serde(default)]
    pub kv_events_replay: Option<String>,
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
    /// A decode stream that sends nothing for this long (while the gateway waits on it) is cut:
    /// the client gets the stream's error event, the decode's breaker a failure, and the leg is
    /// dropped (the engine aborts it and frees its KV). As long as the prefill deadline by
    /// default, since a concurrent protocol's decode may wait that long for its KV.
    pub decode_stall_timeout_ms: u64,
    /// Prefill instances tried per request before giving up (retries happen before any byte
    /// reached the client).
    pub prefill_attempts: u32,
    /// Decode instances tried per request before giving up: a decode that failed before its
    /// first byte reached the client (refused, reset, an error answer, a KV handoff that did not
    /// verify) is retried with a fresh pair that avoids it.
    pub decode_attempts: u32,
    /// A decode stream that breaks after its head went out (engine gone, body cut, stalled past
    /// `decode_stall_timeout_ms`) is continued on another pair at most this many times per
    /// request: the prompt extended by the text already streamed, `max_tokens` reduced by what
    /// was emitted, spliced into the client's stream. 0 turns migration off (the client gets
    /// the `decode_stream_interrupted` error event). Requests it would change are never
    /// migrated (see docs/deploying.md, Reliability).
    pub migration_limit: u32,
    /// Retries under way may be at most this percentage of the requests in flight (Envoy's
    /// retry budget), so a struggling fleet is not buried under retries; a retry holds its slot
    /// until its answer starts. Past it a request that failed waits `retry_budget_wait_ms` for a
    /// slot, then gets 503 with `Retry-After`.
    pub retry_budget_percent: u32,
    /// Retries always allowed under way, however few requests are in flight.
    pub retry_budget_min: usize,
    /// How long a retry (or a migration) the budget cannot take at once waits for a slot, ms:
    /// a dying engine breaks its requests all at once, and a short wait turns that burst into
    /// retries in turn instead of failures. 0: refused at once; a budget that allows no retry
    /// at all never waits.
    pub retry_budget_wait_ms: u64,
    /// When every prefill attempt failed before any byte reached the client, send the plain
    /// request to the decode instance (it prefills locally) instead of failing. Never silent:
    /// the response carries `x-pdgate-fallback: decode-prefill` and `pdgate_fallbacks_total`
    /// counts it. Off by default: a decode prefilling long prompts slows every stream it serves.
    pub fallback_to_decode: bool,
    /// How `https://` engine URLs are reached.
    pub tls: UpstreamTls,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            control_timeout_ms: 5000,
            prefill_timeout_secs: 120,
            decode_head_timeout_secs: 60,
            decode_stall_timeout_ms: 120_000,
            prefill_attempts: 2,
            decode_attempts: 2,
            migration_limit: 1,
            retry_budget_percent: 20,
            retry_budget_min: 3,
            retry_budget_wait_ms: 1000,
            fallback_to_decode: false,
            tls: UpstreamTls::default(),
        }
    }
}

/// `[discovery]`: engines found at run time, added and drained through the same path as
/// `POST /admin/workers` and `DELETE /admin/workers/{id}`. Static `[[workers]]` are kept
/// whatever the kind: discovery only removes what it added.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub kind: DiscoveryKind,
    pub kubernetes: KubernetesDiscovery,
    pub dns: DnsDiscovery,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    /// Only the `[[workers]]` list (and the admin API).
    #[default]
    Static,
    /// Ready pods matching a label selector per role, watched through the Kubernetes API.
    Kubernetes,
    /// The records of a headless Service per role, re-resolved on an interval.
    Dns,
}

/// `[discovery.kubernetes]`: pods are watched in one namespace, one label selector per role
/// (evaluated by the API server). A pod is a worker while it is Ready, has an IP and is not
/// terminating; per-pod annotations `pdgate.io/protocol`, `pdgate.io/http-port` and
/// `pdgate.io/bootstrap-port` say how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// "" = the gateway pod's own namespace (`POD_NAMESPACE`, else the service account's).
    pub namespace: String,
    pub prefill_selector: String,
    pub decode_selector: String,
    /// A full re-list this often, on top of the watch: repairs anything a watch missed.
    pub resync_secs: u64,
    /// "" = in-cluster service account, else the kubeconfig (`KUBECONFIG`, `~/.kube/config`).
    /// A URL talks to that API server directly without credentials, e.g. `kubectl proxy`'s
    /// `http://127.0.0.1:8001`.
    pub api_server: String,
}

impl Default for KubernetesDiscovery {
    fn default() -> Self {
        Self {
            namespace: String::new(),
            prefill_selector: "pdgate.io/role=prefill".into(),
            decode_selector: "pdgate.io/role=decode".into(),
            resync_secs: 300,
            api_server: String::new(),
        }
    }
}

/// `[discovery.dns]`: a headless Service name per role. Its SRV records (`_http._tcp.<name>`)
/// give each pod's address and port; without them its A/AAAA records and `port` do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsDiscovery {
    pub prefill: String,
    pub decode: String,
    /// The engines' HTTP port when the name has no SRV record.
    pub port: u16,
    pub protocol: Protocol,
    /// The prefill engines' bootstrap port (SGLang, vLLM Mooncake); 0 = none.
    pub bootstrap_port: u16,
    pub interval_secs: u64,
    /// "" = the system resolver configuration (`/etc/resolv.conf`), else `ip:port` of the one
    /// name server to ask.
    pub nameserver: String,
}

impl Default for DnsDiscovery {
    fn default() -> Self {
        Self {
            prefill: String::new(),
            decode: String::new(),
            port: 8000,
            protocol: Protocol::default(),
            bootstrap_port: 0,
            interval_secs: 10,
            nameserver: String::new(),
        }
    }
}

/// `[upstream.tls]`: engines whose URL is `https://` are reached over TLS, their certificates
/// checked against `ca_file` only (never the system's roots). Without `ca_file` an `https://`
/// engine is refused: the gateway never talks to an engine it cannot authenticate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM CA certificates that engines' certificates must chain to.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain the gateway presents to engines that ask for one (mutual TLS);
    /// needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// `[replicas]`: gateway replicas in front of the same engines tell each other what they booked
/// (one message per booking, prefill done and decode done) over a broker's pub/sub, so each
/// schedules against the load the others placed too. Serving never waits on the broker: when it
/// is down, replicas run unsynced (logged and counted) until it is back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicasConfig {
    /// `none`: this replica schedules on its own bookings only; `nats`: NATS core pub/sub.
    pub sync: ReplicaSync,
    /// The broker, e.g. `nats://127.0.0.1:4222` (`tls://` for TLS); several comma-separated.
    pub url: String,
    /// The subject every replica of one fleet publishes to and subscribes on; fleets sharing a
    /// broker need different subjects.
    pub subject: String,
    /// File holding the broker's token (trimmed); never a config or command-line value.
    pub token_file: Option<PathBuf>,
    /// User name for user/password auth, with `password_file`.
    pub user: Option<String>,
    /// File holding the password of `user` (trimmed).
    pub password_file: Option<PathBuf>,
    /// Each replica says it is alive this often, so the others notice when it stops.
    pub heartbeat_ms: u64,
    /// A replica not heard from for this long is gone: the bookings it placed are released.
    pub replica_timeout_ms: u64,
    /// A booking from another replica whose release never arrived is dropped after this long
    /// (NATS core delivers at most once, so a release can be lost).
    pub booking_ttl_secs: u64,
    /// Messages waiting to be published, and received messages waiting to be applied; past
    /// either the message is dropped and counted.
    pub queue: usize,
    /// Other replicas' bookings held at once; past it new ones are dropped and counted.
    pub max_bookings: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaSync {
    #[default]
    None,
    Nats,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        Self {
            sync: ReplicaSync::None,
            url: "nats://127.0.0.1:4222".into(),
            subject: "pdgate.bookings".into(),
            token_file: None,
            user: None,
            password_file: None,
            heartbeat_ms: 1000,
            replica_timeout_ms: 5000,
            booking_ttl_secs: 600,
            queue: 4096,
            max_bookings: 65_536,
        }
    }
}
