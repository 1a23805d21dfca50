//! The native PD protocol between the gateway and reference engines: message types only.
//!
//! Flow: the gateway asks decode to `reserve` KV blocks and gets a [`KvDescriptor`]; sends the
//! prefill leg ([`PrefillRequest`]) which writes every KV block into the descriptor's slots
//! through the transfer engine and answers a [`PrefillReport`]; then sends the decode leg: the
//! client's own OpenAI body with [`DecodeLeg`] under [`DECODE_FIELD`]. The gateway `release`s the
//! reservation on any failure before the decode leg took it over.

use serde::{Deserialize, Serialize};

pub const RESERVE_PATH: &str = "/pd/reserve";
pub const RELEASE_PATH: &str = "/pd/release";
pub const PREFILL_PATH: &str = "/pd/prefill";
/// Served by an engine that lends its cached blocks to peers (see [`ExportRequest`]).
pub const EXPORT_PATH: &str = "/pd/export";
/// Body field of a decode leg carrying [`DecodeLeg`].
pub const DECODE_FIELD: &str = "pdgate_kv";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReserveRequest {
    pub request_id: String,
    /// The rendered prompt: the engine sizes the reservation with its own tokenizer, which is
    /// the one whose blocks the prefill will write (the gateway may key prefixes with another).
    pub prompt: String,
}

/// Where a request's KV blocks must be written: slot offsets in a decode engine's segment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvDescriptor {
    pub request_id: String,
    pub segment: String,
    /// The segment owner's transfer endpoint, used when no registry is configured (P2P mode).
    pub endpoint: String,
    pub block_bytes: u64,
    pub block_offsets: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseRequest {
    pub request_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseResponse {
    pub released: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrefillRequest {
    pub request_id: String,
    /// The rendered prompt text (chat messages already through the shared template).
    pub prompt: String,
    pub target: KvDescriptor,
    /// The scheduler's plan to fetch cached prefix blocks from another engine before computing
    /// the rest; a pull that fails for any reason is recomputed, never an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullFrom>,
    /// Once the blocks are sent, mark this engine's copy of the prompt to be evicted before any
    /// other block: the decode keeps the fleet's copy (one copy per handoff).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evict_first: bool,
}

/// Where to pull a prefix from: the holder engine's HTTP base URL (it answers [`EXPORT_PATH`])
/// and how many leading blocks of the prompt the pull should leave cached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PullFrom {
    pub url: String,
    pub upto_blocks: u32,
}

/// Asks a holder to lease the blocks it caches of `blocks` (a prompt's leading chained block
/// hashes), from position `skip` on, so the asker can read them over the transfer plane. The
/// answer is a [`KvDescriptor`] naming the leased copies of the longest cached run, in prompt
/// order (possibly none); the asker's last read batch notifies [`KvReturned`], else the lease
/// expires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportRequest {
    pub request_id: String,
    pub blocks: Vec<u64>,
    pub skip: u32,
}

/// Notification payload of a puller's last read batch: the holder may end the lease now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvReturned {
    pub returned: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrefillReport {
    pub request_id: String,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub blocks_sent: u32,
    pub bytes_sent: u64,
    pub prefill_ms: f64,
    pub transfer_ms: f64,
    /// Vocabulary index of the first generated token; decode continues after it.
    pub first_token: u32,
    /// Blocks pulled from another engine and verified (counted in `cached_tokens` too), the
    /// bytes read for them and how long the pull took, ask to last read (0 when none).
    #[serde(default)]
    pub pulled_blocks: u32,
    #[serde(default)]
    pub pulled_bytes: u64,
    #[serde(default)]
    pub pull_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecodeLeg {
    pub request_id: String,
    pub first_token: u32,
    /// Once the blocks are verified, mark this engine's copy of the prompt to be evicted
    /// before any other block: the prefill keeps the fleet's copy (one copy per handoff).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evict_first: bool,
}

/// Payload of the transfer notification that closes a prefill's last batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvLanded {
    pub request_id: String,
    pub blocks: u32,
}
