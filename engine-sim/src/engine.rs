//! One engine's state, shared by every handler: its config, modelled GPU, prefix cache, KV pool,
//! transfer engine and the per-protocol state (aborts, rendezvous rooms, bootstrap mailboxes).
//!
//! It imports no handler: the handlers and the route table above them all build on it, so it
//! must stay at the bottom for the crate's modules to form no circle.

use crate::batcher::Gpu;
use crate::cache::PrefixCache;
use crate::config::EngineConfig;
use crate::pool::KvPool;
use crate::protocol::abort::Aborts;
use crate::protocol::mailbox::Bootstrap;
use crate::protocol::rendezvous::Rendezvous;
use crate::stats::Stats;
use parking_lot::Mutex;
use pdgate_scheduler::{BlockHash, BlockHasher};
use pdgate_transfer::{MetadataStore, TransferEngine};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

pub struct Engine {
    pub cfg: EngineConfig,
    pub stats: Arc<Stats>,
    pub gpu: Gpu,
    pub cache: Mutex<PrefixCache>,
    pub hasher: BlockHasher,
    pub transfer: Arc<TransferEngine>,
    /// Present on decode engines: where prefill engines write KV.
    pub pool: Option<Arc<KvPool>>,
    pub registry: Option<Arc<dyn MetadataStore>>,
    /// Segments looked up in the registry, so a prefill does not ask for every request.
    pub peers: Mutex<std::collections::HashMap<String, pdgate_transfer::SegmentDesc>>,
    /// Re-publishes the KV segment in the registry; stopped before deregistering.
    pub(crate) heartbeat: Mutex<Option<JoinHandle<()>>>,
    pub started: u64,
    pub http_addr: SocketAddr,
    /// For engine-to-engine calls (a decode asking a prefill's bootstrap server for its mailbox).
    pub client: reqwest::Client,
    /// Running legs by request id, for `/abort_request`.
    pub aborts: Arc<Aborts>,
    /// Push-mode bootstrap rooms (SGLang, vLLM Mooncake) on a prefill engine.
    pub rendezvous: Rendezvous,
    /// Push-mode offers: the mailbox a prefill takes them on, the mailboxes a decode learnt.
    pub bootstrap: Bootstrap,
}

impl Engine {
    /// The full blocks among `all`, the hashes of every block of `tokens`: what a prefix cache
    /// holds, without hashing the prompt a second time.
    pub fn full_blocks<'a>(&self, all: &'a [BlockHash], tokens: &[u32]) -> &'a [BlockHash] {
        &all[..(tokens.len() / self.hasher.block_size()).min(all.len())]
    }

    /// Matches `tokens` (whose full blocks hash to `full`) against the prefix cache, counts the
    /// query, returns uncached tokens.
    pub fn lookup_prefix(&self, tokens: &[u32], full: &[BlockHash]) -> usize {
        let hit_blocks = self.cache.lock().match_prefix(full);
        let hit_tokens = hit_blocks * self.hasher.block_size();
        Stats::add(&self.stats.prefix_queries_tokens, tokens.len() as u64);
        Stats::add(&self.stats.prefix_hits_tokens, hit_tokens as u64);
        tokens.len() - hit_tokens
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
