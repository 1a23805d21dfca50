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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecodeLeg {
    pub request_id: String,
    pub first_token: u32,
}

/// Payload of the transfer notification that closes a prefill's last batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvLanded {
    pub request_id: String,
    pub blocks: u32,
}
