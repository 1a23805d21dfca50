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

    /// Matches `tokens` (whose full blocks hash to `full`) against the prefix cache's tiers and
    /// counts the query (a host-tier hit is a hit: nothing is computed for it).
    pub fn lookup_prefix(&self, tokens: &[u32], full: &[BlockHash]) -> Lookup {
        let tiers = self.cache.lock().match_tiers(full);
        let hit_tokens = ((tiers.gpu + tiers.host) * self.hasher.block_size()).min(tokens.len());
        Stats::add(&self.stats.prefix_queries_tokens, tokens.len() as u64);
        Stats::add(&self.stats.prefix_hits_tokens, hit_tokens as u64);
        Stats::add(&self.stats.kv_host_hit_blocks, tiers.host as u64);
        Lookup {
            uncached: tokens.len() - hit_tokens,
            host_blocks: tiers.host,
        }
    }

    /// Computes what `l` found uncached, after copying its host-tier blocks back.
    pub async fn prefill_lookup(&self, l: Lookup) -> Result<(), crate::batcher::QueueFull> {
        self.load_from_host(l.host_blocks).await;
        self.gpu.prefill(l.uncached).await
    }

    /// Copies `blocks` host-tier blocks back to the GPU: the modelled time, on the request's
    /// own path (the copy engine runs beside the GPU's steps).
    pub async fn load_from_host(&self, blocks: usize) {
        let copy = self.cfg.timing.scaled(self.cfg.host_copy_ms(blocks));
        if !copy.is_zero() {
            tokio::time::sleep(copy).await;
        }
    }
}

/// A prompt's prefix lookup: the tokens to compute, and how many leading cached blocks must
/// first be copied back from the host tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub uncached: usize,
    pub host_blocks: usize,
}

impl Engine {
    /// Caches the full blocks `full` of `tokens` and reports what changed: a `BlockStored` per
    /// run of blocks that were not cached (with the block before the run as its parent), a
    /// `BlockRemoved` for what the insert evicted.
    pub fn remember(&self, full: &[BlockHash], tokens: &[u32]) {
        let mut cache = self.cache.lock();
        let change = cache.insert(full);
        self.stats.kv_host_blocks.store(
            cache.host_len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
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
        // Host-tier stores come before the GPU removals of the same blocks, so a subscriber never
        // sees a demoted block held by no tier. Like vLLM's offloading connector, they name the
        // blocks by hash alone: the subscriber knows their tokens from the GPU store.
        if !change.demoted.is_empty() {
            out.push(KvEvent::BlockStored(BlockStored {
                block_hashes: change.demoted.iter().map(|b| EngineHash(b.0)).collect(),
                parent_block_hash: None,
                token_ids: Vec::new(),
                block_size: bs as u32,
                lora_id: None,
                lora_name: None,
                medium: Medium::Cpu,
                has_extra_keys: false,
            }));
        }
        for (gone, medium) in [
            (&change.evicted, Medium::Gpu),
            (&change.host_evicted, Medium::Cpu),
        ] {
            if !gone.is_empty() {
                out.push(KvEvent::BlockRemoved {
                    block_hashes: gone.iter().map(|b| EngineHash(b.0)).collect(),
                    medium,
                });
            }
        }
        events.publish(out);
    }

    /// Marks the cached blocks of `full` to be evicted before any other: the copy of a
    /// handed-off prompt that the other engine of the pair keeps.
    pub fn evict_first(&self, full: &[BlockHash]) {
        let marked = self.cache.lock().demote(full);
        Stats::add(&self.stats.kv_evict_first_blocks, marked as u64);
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
