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
use pdgate_wire::kv_events::{BlockStored, EngineHash, KvEvent, Medium};
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
    /// Publishes the prefix cache's changes as KV events, when configured.
    pub events: Option<Arc<crate::kv_events::Publisher>>,
    /// Where cached blocks are lent to peers (`export_blocks` > 0).
    pub exports: Option<Arc<crate::export::Exports>>,
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

impl Engine {
    /// Caches the full blocks `full` of `tokens` and reports what changed: a `BlockStored` per
    /// run of blocks that were not cached (with the block before the run as its parent), a
    /// `BlockRemoved` for what the insert evicted.
    pub fn remember(&self, full: &[BlockHash], tokens: &[u32]) {
        let mut cache = self.cache.lock();
        let change = cache.insert(full);
        let Some(events) = &self.events else {
            return;
        };
        let bs = self.hasher.block_size();
        let mut out = Vec::new();
        let mut runs = change.new.iter().copied().peekable();
        while let Some(start) = runs.next() {
            let mut end = start + 1;
            while runs.peek() == Some(&end) {
                runs.next();
                end += 1;
            }
            let Some(token_ids) = tokens.get(start * bs..end * bs) else {
                break;
            };
            out.push(KvEvent::BlockStored(BlockStored {
                block_hashes: full[start..end].iter().map(|b| EngineHash(b.0)).collect(),
                parent_block_hash: start.checked_sub(1).map(|p| EngineHash(full[p].0)),
                token_ids: token_ids.to_vec(),
                block_size: bs as u32,
                lora_id: None,
                lora_name: None,
                medium: Medium::Gpu,
                has_extra_keys: false,
            }));
        }
        if !change.evicted.is_empty() {
            out.push(KvEvent::BlockRemoved {
                block_hashes: change.evicted.iter().map(|b| EngineHash(b.0)).collect(),
                medium: Medium::Gpu,
            });
        }
        events.publish(out);
    }

    /// Empties the prefix cache (vLLM's `POST /reset_prefix_cache`).
    pub fn reset_prefix_cache(&self) {
        let mut cache = self.cache.lock();
        cache.clear();
        if let Some(events) = &self.events {
            events.publish(vec![KvEvent::AllBlocksCleared]);
        }
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
