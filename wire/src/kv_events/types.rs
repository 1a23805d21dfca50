//! The event types both ends agree on, and the decoder's limits.

/// The 8-byte big-endian sequence number that ends a replay.
pub const END_OF_REPLAY: i64 = -1;

/// An engine's own block hash. Engines send a 64-bit integer or a byte string (vLLM's
/// `ExternalBlockHash` is `bytes | int`); a byte string is folded to 64 bits with XXH3, which is
/// all a lookup table needs. It is never the gateway's key: that is recomputed from the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineHash(pub u64);

impl EngineHash {
    pub fn from_bytes(b: &[u8]) -> Self {
        Self(xxhash_rust::xxh3::xxh3_64(b))
    }
}

/// Where a block lives: engines with KV offloading report CPU (or disk) copies separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Medium {
    Gpu,
    Cpu,
    Disk,
    Other,
}

impl Medium {
    /// `None` (older engines send no medium) means the GPU.
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            None => Self::Gpu,
            Some(s) if s.eq_ignore_ascii_case("gpu") => Self::Gpu,
            Some(s) if s.eq_ignore_ascii_case("cpu") => Self::Cpu,
            Some(s) if s.eq_ignore_ascii_case("disk") => Self::Disk,
            Some(_) => Self::Other,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Gpu => "GPU",
            Self::Cpu => "CPU",
            Self::Disk => "DISK",
            Self::Other => "OTHER",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<EngineHash>,
    /// The block before the first of `block_hashes`; `None` for a prompt's first block.
    pub parent_block_hash: Option<EngineHash>,
    /// `block_size` tokens per block, in block order.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    pub lora_name: Option<String>,
    pub medium: Medium,
    /// The engine mixed more than tokens into these blocks' hashes (multimodal inputs, a cache
    /// salt): equal tokens elsewhere are not the same blocks.
    pub has_extra_keys: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved {
        block_hashes: Vec<EngineHash>,
        medium: Medium,
    },
    AllBlocksCleared,
}

impl KvEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BlockStored(_) => "stored",
            Self::BlockRemoved { .. } => "removed",
            Self::AllBlocksCleared => "cleared",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Seconds since the Unix epoch at which the engine made the batch.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<u32>,
}

/// What one payload may hold; anything larger is refused whole, before it is allocated.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_events_per_batch: usize,
    pub max_hashes_per_event: usize,
    pub max_tokens_per_event: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 16 << 20,
            max_events_per_batch: 65_536,
            max_hashes_per_event: 16_384,
            max_tokens_per_event: 1 << 20,
        }
    }
}
