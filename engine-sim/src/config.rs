//! The reference engine's configuration: one struct tree with serde defaults, the only source of
//! the engine's defaults. The gateway's `up` command and `pdgate engine` fill it from their own
//! layered config.

use pdgate_scheduler::Role;
use pdgate_transfer::TransportChoice;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Role in a disaggregated fleet. Either role also serves plain (non-PD) requests.
    pub role: Role,
    /// Model name served and listed by `/v1/models`.
    pub model: String,
    /// HTTP listen address (port 0 picks a free one).
    pub host: String,
    pub port: u16,
    /// Transfer-engine listen port (0 picks a free one).
    pub transfer_port: u16,
    /// KV transport: "auto" (shared memory to engines on this host, TCP otherwise), "tcp",
    /// "shm" or "rdma" (needs a build with the transfer crate's `rdma` feature and a device).
    pub transport: TransportChoice,
    /// Tokens per KV block; the gateway must key prefixes with the same size.
    pub block_size: usize,
    /// KV-cache bytes per token. Llama-3-8B at fp16 holds 128 KiB per token; the default is a
    /// sixteenth of that so a laptop demo moves real but modest bytes.
    pub kv_bytes_per_token: u64,
    /// Capacity of the KV cache in blocks: the prefix cache on a prefill engine, the pool that
    /// reservations come from on a decode engine.
    pub kv_blocks: usize,
    /// A host-memory tier under the prefix cache, in blocks (0: none): blocks the GPU tier
    /// evicts move there (published as `CPU` medium KV events), and a prompt that continues into
    /// it is computed only past it, paying a copy back at `host_copy_gbps`.
    pub host_cache_blocks: usize,
    /// Host-to-GPU copy bandwidth for host-tier hits, GB/s (PCIe 4.0 x16 moves about 25; 0 or
    /// not finite: the copy is free).
    pub host_copy_gbps: f64,
    /// Continuous batching: at most this many sequences decode together.
    pub max_batch: usize,
    /// Continuous batching: prompt tokens prefilled in one step at most.
    pub max_batched_tokens: usize,
    /// Waiting requests beyond this are refused with 503 (bounded queue).
    pub max_waiting: usize,
    /// Upper bound on `max_tokens` a request may ask for.
    pub max_tokens_limit: u32,
    /// Generated tokens when a request names no `max_tokens`.
    pub default_max_tokens: u32,
    /// Seed of the deterministic text generator.
    pub seed: u64,
    /// Seconds a decode reservation may wait for its decode leg before it is reclaimed.
    pub reservation_ttl_secs: u64,
    /// Timing model of the emulated GPU.
    pub timing: TimingModel,
    /// The PD protocol this engine enforces: "native" (pdgate's own), "vllm-nixl",
    /// "vllm-mooncake", "sglang" or "trtllm" (see `protocol/`).
    pub protocol: Protocol,
    /// SGLang mode: how long a decode leg waits for the prefill with the same bootstrap room
    /// (SGLang's own default is about 300 s).
    pub bootstrap_timeout_ms: u64,
    /// Gateway-hosted segment registry (`http://host:port`); without it peers are reached
    /// through the endpoint carried in the transfer descriptor (P2P mode).
    pub registry_url: Option<String>,
    /// Seconds between re-publications of this engine's segment in the registry: a heartbeat,
    /// so the registry can expire the entries of an engine that died without deregistering.
    pub registry_heartbeat_secs: u64,
    /// File holding the fleet secret (else `PDGATE_FLEET_SECRET`): what proves to the gateway and
    /// to peer engines that this engine belongs to the fleet. Never a command-line value.
    pub fleet_secret_file: Option<std::path::PathBuf>,
    /// Mutual TLS 1.3 on the transfer plane's TCP connections: `cert`, `key` and `ca` PEM paths
    /// (`[transfer_tls]`). Peers must present a certificate from `ca`, and the certificate here
    /// must name the host peers dial. The fleet-secret handshake still runs inside. Absent: plain
    /// TCP (shared memory to same-host peers is never TLS).
    pub transfer_tls: Option<pdgate_transfer::TlsFiles>,
    /// KV cache events over ZMQ, with vLLM's keys (`--kv-events-config` on `pdgate engine`):
    /// off unless `enable_kv_cache_events` and `publisher = "zmq"`.
    pub kv_events: crate::kv_events::KvEventsConfig,
    /// Blocks this engine can lend to peers at once (cross-instance KV reuse): cached blocks are
    /// copied into a registered segment of this many blocks while a peer reads them. 0: lends
    /// nothing, `POST /pd/export` answers 404.
    pub export_blocks: usize,
    /// How long a lent copy stays readable before it is freed (zeroed), ms: a puller that has not
    /// read by then fails verification and recomputes.
    pub export_lease_ms: u64,
    pub faults: Faults,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            role: Role::Prefill,
            model: pdgate_wire::openai::DEFAULT_MODEL.into(),
            host: "127.0.0.1".into(),
            port: 0,
            transfer_port: 0,
            transport: TransportChoice::Auto,
            block_size: 16,
            kv_bytes_per_token: 8 * 1024,
            kv_blocks: 4096,
            host_cache_blocks: 0,
            host_copy_gbps: 20.0,
            max_batch: 64,
            max_batched_tokens: 8192,
            max_waiting: 1024,
            max_tokens_limit: 4096,
            default_max_tokens: 16,
            seed: 0,
            reservation_ttl_secs: 120,
            timing: TimingModel::default(),
            protocol: Protocol::Native,
            bootstrap_timeout_ms: 300_000,
            registry_url: None,
            registry_heartbeat_secs: 10,
            fleet_secret_file: None,
            transfer_tls: None,
            kv_events: crate::kv_events::KvEventsConfig::default(),
            export_blocks: 0,
            export_lease_ms: 2_000,
            faults: Faults::default(),
        }
    }
}

pub use pdgate_wire::Protocol;

impl EngineConfig {
    pub fn block_bytes(&self) -> u64 {
        self.kv_bytes_per_token * self.block_size as u64
    }

    /// Modelled time to copy `blocks` from the host tier back to the GPU, ms (before the time
    /// scale).
    pub fn host_copy_ms(&self, blocks: usize) -> f64 {
        if blocks == 0 || !self.host_copy_gbps.is_finite() || self.host_copy_gbps <= 0.0 {
            return 0.0;
        }
        (blocks as u64 * self.block_bytes()) as f64 / (self.host_copy_gbps * 1e6)
    }
}

/// Step times of the emulated GPU, in milliseconds, before `time_scale`.
///
/// Prefill follows `a·T² + b·T + c` over the step's uncached tokens; the defaults are the
/// coefficients NVIDIA Dynamo's mocker uses for an 8B-class model on one H100-class GPU. A decode
/// step costs a base plus terms for batch size and resident context (memory-bound reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimingModel {
    pub prefill_a: f64,
    pub prefill_b: f64,
    pub prefill_c: f64,
    pub decode_base_ms: f64,
    pub decode_per_seq_ms: f64,
    pub decode_per_ktoken_ms: f64,
    /// Multiplies every modelled duration: 1.0 is real time, 0.0 is "instant" (no sleeping).
    pub time_scale: f64,
}

impl Default for TimingModel {
    /// The emulated GPU behaves, by default, exactly as the scheduler's prior cost model says, so
    /// an uncorrected prediction is right on the demo fleet; the numbers live there, once.
    fn default() -> Self {
        let prior = pdgate_scheduler::CostModel::default();
        Self {
            prefill_a: prior.prefill_a,
            prefill_b: prior.prefill_b,
            prefill_c: prior.prefill_c,
            decode_base_ms: prior.decode_base_ms,
            decode_per_seq_ms: prior.decode_per_seq_ms,
            decode_per_ktoken_ms: prior.decode_per_ktoken_ms,
            time_scale: 1.0,
        }
    }
}

impl TimingModel {
    /// Modelled prefill time of `tokens` uncached tokens in one step (0 tokens cost nothing).
    pub fn prefill_ms(&self, tokens: usize) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        let t = tokens as f64;
        self.prefill_a * t * t + self.prefill_b * t + self.prefill_c
    }

    /// Modelled time of one decode step for `batch` sequences holding `context_tokens` in total.
    pub fn decode_step_ms(&self, batch: usize, context_tokens: usize) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        self.decode_base_ms
            + self.decode_per_seq_ms * batch as f64
            + self.decode_per_ktoken_ms * context_tokens as f64 / 1000.0
    }

    pub fn scaled(&self, ms: f64) -> std::time::Duration {
        let scaled = (ms * self.time_scale).max(0.0);
        std::time::Duration::from_secs_f64(scaled / 1000.0)
    }
}

/// Fault injection, for tests of the gateway's failure handling.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// A prefill engine flips one byte of every KV block it sends.
    pub corrupt_kv: bool,
    /// A streamed answer breaks off (connection cut, no `[DONE]`) after this many tokens, as an
    /// engine that crashes mid-decode would; 0 never.
    pub cut_stream_after_tokens: u32,
    /// A puller waits this long between the holder's lease and its reads, ms (tests of lease
    /// expiry and of a holder dying mid-pull); 0 never.
    pub pull_delay_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_time_is_quadratic_and_zero_for_no_work() {
        let m = TimingModel::default();
        assert_eq!(m.prefill_ms(0), 0.0);
        let (t1, t2) = (m.prefill_ms(1000), m.prefill_ms(8000));
        assert!((t1 - (4.21e-7 * 1e6 + 15.18 + 16.5)).abs() < 1e-9);
        assert!(t2 > 8.0 * (t1 - m.prefill_c), "superlinear growth");
    }

    #[test]
    fn time_scale_scales_and_zero_means_instant() {
        let mut m = TimingModel {
            time_scale: 0.5,
            ..TimingModel::default()
        };
        assert_eq!(m.scaled(100.0), std::time::Duration::from_millis(50));
        m.time_scale = 0.0;
        assert_eq!(m.scaled(100.0), std::time::Duration::ZERO);
    }

    #[test]
    fn decode_step_grows_with_batch_and_context() {
        let m = TimingModel::default();
        assert!(m.decode_step_ms(32, 0) > m.decode_step_ms(1, 0));
        assert!(m.decode_step_ms(1, 100_000) > m.decode_step_ms(1, 0));
        assert_eq!(m.decode_step_ms(0, 100), 0.0);
    }
}
