//! Native PD endpoints: `reserve` and `release` on a decode engine, `prefill` on any engine.
//!
//! A prefill computes only the blocks its prefix cache lacks, then writes *every* block of the
//! prompt into the decode engine's reserved slots through the transfer engine, closing the last
//! batch with a landing notification. It answers only after the decode side acknowledged.

use crate::engine::Engine;
use crate::native::{
    KvDescriptor, KvLanded, PrefillReport, PrefillRequest, ReleaseRequest, ReleaseResponse,
    ReserveRequest,
};
use crate::openai::ApiError;
use crate::pool::PoolError;
use crate::stats::Stats;
use crate::{kv, text};
use axum::extract::State;
use axum::Json;
use bytes::{Bytes, BytesMut};
use pdgate_scheduler::{BlockHash, BuiltinTokenizer};
use pdgate_transfer::{Batch, SegmentDesc, TransportKind};
use std::sync::Arc;
use std::time::Instant;

/// Blocks per transfer batch: large enough to amortise a round trip, small enough to pipeline.
const BLOCKS_PER_BATCH: usize = 32;

const MAX_CACHED_PEERS: usize = 4096;

type ApiResult<T> = Result<Json<T>, ApiError>;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("invalid request: {e}")))
}

pub async fn reserve(
    State(e): State<Arc<Engine>>,
    body: axum::body::Bytes,
) -> ApiResult<KvDescriptor> {
    let req: ReserveRequest = parse(&body)?;
    let pool = e
        .pool
        .as_ref()
        .ok_or_else(|| ApiError::invalid("role", "reserve is served by decode engines only"))?;
    let blocks = e.hasher.blocks_for(BuiltinTokenizer.count(&req.prompt));
    pool.reserve(&req.request_id, blocks, Instant::now())
        .map(Json)
        .map_err(|err| match err {
            PoolError::Full { .. } => ApiError::server(503, "kv_pool_full", err.to_string()),
            PoolError::Duplicate(_) => {
                ApiError::server(409, "duplicate_reservation", err.to_string())
            }
            other => ApiError::server(500, "kv_pool_error", other.to_string()),
        })
}

pub async fn release(
    State(e): State<Arc<Engine>>,
    body: axum::body::Bytes,
) -> ApiResult<ReleaseResponse> {
    let req: ReleaseRequest = parse(&body)?;
    let released = e.pool.as_ref().is_some_and(|p| p.release(&req.request_id));
    Ok(Json(ReleaseResponse { released }))
}

pub async fn prefill(
    State(e): State<Arc<Engine>>,
    body: axum::body::Bytes,
) -> ApiResult<PrefillReport> {
    let req: PrefillRequest = parse(&body)?;
    let tokens = BuiltinTokenizer.encode(&req.prompt);
    let blocks = e.hasher.all_blocks(&tokens);
    if blocks.len() != req.target.block_offsets.len() {
        let msg = format!(
            "prompt has {} KV blocks, target descriptor {}",
            blocks.len(),
            req.target.block_offsets.len()
        );
        return Err(ApiError::invalid("target", msg));
    }
    let full = e.full_blocks(&blocks, &tokens);
    let uncached = e.lookup_prefix(&tokens, full);
    let started = Instant::now();
    e.gpu
        .prefill(uncached)
        .await
        .map_err(|_| ApiError::server(503, "engine_overloaded", "engine queue is full"))?;
    e.cache.lock().insert(full);
    let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
    Stats::add(&e.stats.prompt_tokens, tokens.len() as u64);
    Stats::add(&e.stats.generation_tokens, 1);

    let sent = Instant::now();
    let bytes_sent = send_blocks(&e, &req.request_id, &req.target, &blocks).await?;
    Ok(Json(PrefillReport {
        request_id: req.request_id,
        prompt_tokens: tokens.len() as u32,
        cached_tokens: (tokens.len() - uncached) as u32,
        blocks_sent: blocks.len() as u32,
        bytes_sent,
        prefill_ms,
        transfer_ms: sent.elapsed().as_secs_f64() * 1e3,
        first_token: text::token_at(text::prompt_key(&tokens), e.cfg.seed, 0),
    }))
}

async fn resolve(e: &Engine, target: &KvDescriptor) -> Result<SegmentDesc, ApiError> {
    let len = target
        .block_offsets
        .iter()
        .max()
        .map_or(0, |m| m + target.block_bytes);
    locate(e, &target.segment, &target.endpoint, len)
        .await
        .map_err(|msg| ApiError::server(502, "kv_transfer_failed", msg))
}

/// Where a peer's segment `name` is: the registry's entry when one is configured (cached in
/// `e.peers`), else what its owner told us (`endpoint`, at least `len` bytes long).
pub(crate) async fn locate(
    e: &Engine,
    name: &str,
    endpoint: &str,
    len: u64,
) -> Result<SegmentDesc, String> {
    let Some(reg) = &e.registry else {
        return Ok(SegmentDesc {
            name: name.to_string(),
            endpoint: endpoint.to_string(),
            len,
            transport: TransportKind::Tcp,
        });
    };
    if let Some(desc) = e.peers.lock().get(name) {
        return Ok(desc.clone());
    }
    let desc = reg
        .lookup(name)
        .await
        .map_err(|err| err.to_string())?
        .ok_or_else(|| format!("segment `{name}` is not registered"))?;
    remember_peer(e, desc.clone());
    Ok(desc)
}

/// Caches a peer's segment descriptor.
pub(crate) fn remember_peer(e: &Engine, desc: SegmentDesc) {
    let mut peers = e.peers.lock();
    // Bounded: a fleet has few peer segments; forget them all rather than grow without end.
    if peers.len() >= MAX_CACHED_PEERS {
        peers.clear();
    }
    peers.insert(desc.name.clone(), desc);
}

pub(crate) async fn send_blocks(
    e: &Engine,
    request_id: &str,
    target: &KvDescriptor,
    blocks: &[BlockHash],
) -> Result<u64, ApiError> {
    let desc = resolve(e, target).await?;
    let block_bytes = usize::try_from(target.block_bytes)
        .map_err(|_| ApiError::invalid("target", "block size too large"))?;
    let landed = serde_json::to_vec(&KvLanded {
        request_id: request_id.into(),
        blocks: blocks.len() as u32,
    })
    .unwrap_or_default();
    let mut total = 0u64;
    let batches = blocks.len().div_ceil(BLOCKS_PER_BATCH);
    for (n, (hashes, offsets)) in blocks
        .chunks(BLOCKS_PER_BATCH)
        .zip(target.block_offsets.chunks(BLOCKS_PER_BATCH))
        .enumerate()
    {
        let mut batch = Batch::new();
        for (hash, offset) in hashes.iter().zip(offsets) {
            batch = batch.write(
                *offset,
                block_bytes_of(*hash, block_bytes, e.cfg.faults.corrupt_kv),
            );
        }
        if n + 1 == batches {
            batch = batch.notify(Bytes::from(landed.clone()));
        }
        total += batch.bytes();
        e.transfer.submit(&desc, batch).await.map_err(|err| {
            // The peer may have moved (restart on a new port): look it up afresh next time.
            e.peers.lock().remove(&desc.name);
            tracing::error!(request_id, error = %err, "KV transfer failed");
            ApiError::server(
                502,
                "kv_transfer_failed",
                format!("KV transfer to `{}` failed: {err}", desc.name),
            )
        })?;
    }
    Stats::add(&e.stats.kv_blocks_sent, blocks.len() as u64);
    Stats::add(&e.stats.kv_bytes_sent, total);
    Ok(total)
}

fn block_bytes_of(hash: BlockHash, len: usize, corrupt: bool) -> Bytes {
    let mut buf = BytesMut::zeroed(len);
    kv::fill_block(hash, &mut buf);
    if corrupt && len > 0 {
        buf[len / 2] ^= 0x5a;
    }
    buf.freeze()
}
