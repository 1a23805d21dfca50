//! Pull-mode KV handoff, shared by the vLLM NIXL and TensorRT-LLM modes: the prefill engine
//! keeps a request's KV blocks in its own registered segment until a decode engine reads them
//! (one-sided `Batch::read` through pdgate-transfer) or a timeout frees them; the decode engine
//! verifies every block it read against its own prompt before it generates.
//!
//! It must never let a decode generate from blocks it did not read and verify: blocks freed on
//! the prefill side are zeroed, so a late or repeated pull fails loudly.

use crate::engine::Engine;
use crate::kv;
use crate::openai::ApiError;
use crate::pool::{Claim, KvPool, PoolError};
use crate::stats::Stats;
use bytes::Bytes;
use pdgate_scheduler::BlockHash;
use pdgate_transfer::{Batch, SegmentDesc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Blocks per read batch: amortises a round trip, keeps each batch well under the op limits.
const BLOCKS_PER_BATCH: usize = 32;

/// Where a held prefill's blocks are: enough for a decode engine to read them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldKv {
    /// The prefill's key for the held blocks (what the decode names when it is done).
    pub request_id: String,
    /// `host:port` of the prefill engine's transfer listener.
    pub endpoint: String,
    pub segment: String,
    pub block_ids: Vec<u64>,
}

/// Notification payload of a decode's last read batch: the prefill may free the blocks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvPulled {
    pub pulled: String,
}

/// A pool key unique on this engine even when a request id repeats (retries, odd clients).
pub fn unique_key(rid: &str) -> String {
    format!("{rid}#{:08x}", rand::random::<u32>())
}

fn pool_of(e: &Engine) -> Result<&Arc<KvPool>, ApiError> {
    e.pool
        .as_ref()
        .ok_or_else(|| ApiError::server(500, "kv_pool_missing", "this engine holds no KV pool"))
}

pub fn pool_error(err: PoolError) -> ApiError {
    match err {
        PoolError::Full { .. } => ApiError::server(503, "kv_pool_full", err.to_string()),
        PoolError::Duplicate(_) => ApiError::server(409, "duplicate_request", err.to_string()),
        PoolError::NotLanded(_) => ApiError::server(504, "kv_not_ready", err.to_string()),
        PoolError::Unknown(_) => ApiError::server(500, "kv_pool_error", err.to_string()),
    }
}

/// Prefills `tokens` (cached leading blocks are skipped), counts the work and returns the hashes
/// of every block of the prompt, the KV that is to move.
pub async fn compute(e: &Engine, tokens: &[u32]) -> Result<Vec<BlockHash>, ApiError> {
    let all = e.hasher.all_blocks(tokens);
    let full = e.full_blocks(&all, tokens);
    let lookup = e.lookup_prefix(tokens, full);
    e.prefill_lookup(lookup)
        .await
        .map_err(|_| ApiError::server(503, "engine_overloaded", "engine queue is full"))?;
    e.remember(full, tokens);
    Stats::add(&e.stats.prompt_tokens, tokens.len() as u64);
    Stats::add(&e.stats.generation_tokens, 1);
    Ok(all)
}

/// Prefill side: computes, writes every block of the prompt into this engine's own pool under
/// `key` and holds it there until pulled (or the pool's TTL sweep frees it).
pub async fn prefill_and_hold(e: &Engine, key: &str, tokens: &[u32]) -> Result<HeldKv, ApiError> {
    let pool = pool_of(e)?;
    let hashes = compute(e, tokens).await?;
    let desc = pool
        .reserve(key, hashes.len(), Instant::now())
        .map_err(pool_error)?;
    let block_bytes = desc.block_bytes as usize;
    let mut buf = vec![0u8; block_bytes];
    for (hash, offset) in hashes.iter().zip(&desc.block_offsets) {
        kv::fill_block(*hash, &mut buf);
        if e.cfg.faults.corrupt_kv && block_bytes > 0 {
            buf[block_bytes / 2] ^= 0x5a;
        }
        if let Err(err) = pool.segment().write(*offset as usize, &buf) {
            pool.release(key);
            return Err(ApiError::server(500, "kv_pool_error", err.to_string()));
        }
    }
    Stats::add(&e.stats.kv_blocks_sent, hashes.len() as u64);
    Stats::add(&e.stats.kv_bytes_sent, (hashes.len() * block_bytes) as u64);
    Ok(HeldKv {
        request_id: key.to_string(),
        endpoint: desc.endpoint,
        segment: desc.segment,
        block_ids: desc
            .block_offsets
            .iter()
            .map(|o| o / desc.block_bytes.max(1))
            .collect(),
    })
}

/// Frees a reservation unless disarmed (error paths of a pull).
struct Release<'a> {
    pool: &'a KvPool,
    key: &'a str,
    armed: bool,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.release(self.key);
        }
    }
}

/// Decode side: reads the held blocks from the prefill engine into this engine's pool under
/// `key`, verifying each against the prompt's own chained hashes, and tells the prefill engine
/// (with the last batch's notification) that it may free them. `param` names the request field
/// that carried `held`, for errors.
pub async fn pull(
    e: &Engine,
    key: &str,
    held: &HeldKv,
    tokens: &[u32],
    param: &'static str,
) -> Result<Claim, ApiError> {
    let pool = pool_of(e)?;
    let hashes = e.hasher.all_blocks(tokens);
    if hashes.len() != held.block_ids.len() {
        let msg = format!(
            "prompt needs {} KV blocks but `{param}` names {}",
            hashes.len(),
            held.block_ids.len()
        );
        return Err(ApiError::invalid(param, msg));
    }
    let local = pool
        .reserve(key, hashes.len(), Instant::now())
        .map_err(pool_error)?;
    let mut guard = Release {
        pool,
        key,
        armed: true,
    };
    let remote = peer(e, held).await?;
    let block_bytes = pool.block_bytes();
    let done = Bytes::from(
        serde_json::to_vec(&KvPulled {
            pulled: held.request_id.clone(),
        })
        .unwrap_or_default(),
    );
    let batches = held.block_ids.len().div_ceil(BLOCKS_PER_BATCH);
    for (n, ids) in held.block_ids.chunks(BLOCKS_PER_BATCH).enumerate() {
        let mut batch = Batch::new();
        for id in ids {
            batch = batch.read(id.saturating_mul(block_bytes), block_bytes);
        }
        if n + 1 == batches {
            batch = batch.notify(done.clone());
        }
        let report = e.transfer.submit(&remote, batch).await.map_err(|err| {
            e.peers.lock().remove(&held.segment);
            tracing::error!(request_id = key, error = %err, "KV pull failed");
            ApiError::server(
                502,
                "kv_transfer_failed",
                format!("reading KV blocks from `{}` failed: {err}", held.segment),
            )
        })?;
        for (i, data) in report.reads.iter().enumerate() {
            let at = n * BLOCKS_PER_BATCH + i;
            Stats::add(&e.stats.kv_blocks_received, 1);
            if !kv::verify_block(hashes[at], data) {
                Stats::add(&e.stats.kv_verify_failures, 1);
                tracing::error!(
                    request_id = key,
                    block = at,
                    "pulled KV block failed verification"
                );
                let msg = format!("KV block {at} pulled from `{}` failed verification (freed, expired or corrupted)", held.segment);
                return Err(ApiError::server(500, "kv_verification_failed", msg));
            }
            let offset = local.block_offsets[at] as usize;
            pool.segment()
                .write(offset, data)
                .map_err(|err| ApiError::server(500, "kv_pool_error", err.to_string()))?;
        }
    }
    Stats::add(&e.stats.kv_blocks_verified, hashes.len() as u64);
    e.remember(e.full_blocks(&hashes, tokens), tokens);
    pool.mark_landed(key, hashes.len() as u32);
    let claim = pool.claim(key, Duration::ZERO).await.map_err(pool_error)?;
    guard.armed = false;
    Ok(claim)
}

/// The prefill's segment, from the cache or by asking its transfer engine directly (P2P).
async fn peer(e: &Engine, held: &HeldKv) -> Result<SegmentDesc, ApiError> {
    if let Some(desc) = e.peers.lock().get(&held.segment) {
        if desc.endpoint == held.endpoint {
            return Ok(desc.clone());
        }
    }
    let desc = e
        .transfer
        .discover(&held.endpoint, &held.segment)
        .await
        .map_err(|err| {
            ApiError::server(
                502,
                "kv_transfer_failed",
                format!(
                    "prefill segment `{}` at {} unreachable: {err}",
                    held.segment, held.endpoint
                ),
            )
        })?;
    crate::peers::remember_peer(e, desc.clone());
    Ok(desc)
}
