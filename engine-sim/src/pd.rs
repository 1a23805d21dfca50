//! Native PD endpoints: `reserve` and `release` on a decode engine, `prefill` on any engine
//! (pulling a planned prefix from a peer first, `import`), `export` on an engine that lends its
//! cached blocks (`export`).
//!
//! A prefill computes only the blocks its prefix cache lacks, then writes *every* block of the
//! prompt into the decode engine's reserved slots through the transfer engine, closing the last
//! batch with a landing notification. It answers only after the decode side acknowledged.

use crate::engine::Engine;
use crate::openai::ApiError;
use crate::pool::PoolError;
use crate::push::send_blocks;
use crate::stats::Stats;
use crate::text;
use axum::extract::State;
use axum::Json;
use pdgate_scheduler::BlockHash;
use pdgate_scheduler::BuiltinTokenizer;
use pdgate_wire::native::{
    ExportRequest, KvDescriptor, PrefillReport, PrefillRequest, ReleaseRequest, ReleaseResponse,
    ReserveRequest,
};
use std::sync::Arc;
use std::time::Instant;

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
    let overloaded = |_| ApiError::server(503, "engine_overloaded", "engine queue is full");
    let started = Instant::now();
    let (pulled, uncached) = match &req.pull {
        // The prefill takes its place in the queue first and the pull runs while it waits.
        Some(from) => {
            let (size, done) = e.gpu.prefill_deferred().map_err(overloaded)?;
            let pulled = crate::import::pull_prefix(&e, &req.request_id, full, &tokens, from).await;
            let lookup = e.lookup_prefix(&tokens, full);
            e.load_from_host(lookup.host_blocks).await;
            let _ = size.send(lookup.uncached);
            done.await
                .map_err(|_| overloaded(crate::batcher::QueueFull))?;
            (pulled, lookup.uncached)
        }
        None => {
            let lookup = e.lookup_prefix(&tokens, full);
            e.prefill_lookup(lookup).await.map_err(overloaded)?;
            (crate::import::Pulled::default(), lookup.uncached)
        }
    };
    e.remember(full, &tokens);
    let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
    Stats::add(&e.stats.prompt_tokens, tokens.len() as u64);
    Stats::add(&e.stats.generation_tokens, 1);

    let sent = Instant::now();
    let bytes_sent = send_blocks(&e, &req.request_id, &req.target, &blocks).await?;
    if req.evict_first {
        e.evict_first(full);
    }
    Ok(Json(PrefillReport {
        request_id: req.request_id,
        prompt_tokens: tokens.len() as u32,
        cached_tokens: (tokens.len() - uncached) as u32,
        blocks_sent: blocks.len() as u32,
        bytes_sent,
        prefill_ms,
        transfer_ms: sent.elapsed().as_secs_f64() * 1e3,
        first_token: text::first_token(&tokens, e.cfg.seed),
        pulled_blocks: pulled.blocks,
        pulled_bytes: pulled.bytes,
        pull_ms: pulled.ms,
    }))
}

/// `POST /pd/export`: leases the cached run of the asked blocks from `skip` on.
pub async fn export(
    State(e): State<Arc<Engine>>,
    body: axum::body::Bytes,
) -> Result<Json<KvDescriptor>, ApiError> {
    let Some(exports) = &e.exports else {
        return Err(ApiError::server(
            404,
            "not_found",
            "this engine lends no KV blocks (export_blocks = 0)",
        ));
    };
    let req: ExportRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::invalid("body", format!("invalid request: {err}")))?;
    let asked: Vec<BlockHash> = req.blocks.iter().copied().map(BlockHash).collect();
    let held = e.cache.lock().match_prefix(&asked);
    let skip = (req.skip as usize).min(held);
    let lend = &asked[skip..held];
    let empty = KvDescriptor {
        request_id: req.request_id.clone(),
        segment: exports.segment_name().to_string(),
        endpoint: e.transfer.endpoint(),
        block_bytes: e.cfg.block_bytes(),
        block_offsets: Vec::new(),
    };
    if lend.is_empty() {
        return Ok(Json(empty));
    }
    // A lease key of our own: two pullers of one request id (retries) must not share a lease.
    let key = crate::protocol::pull::unique_key(&req.request_id);
    match exports.lend(&key, lend, e.cfg.faults.corrupt_kv, Instant::now()) {
        Some(desc) => {
            Stats::add(&e.stats.kv_blocks_exported, lend.len() as u64);
            tracing::debug!(request_id = %req.request_id, blocks = lend.len(), "lent cached KV blocks");
            Ok(Json(desc))
        }
        None => {
            tracing::warn!(request_id = %req.request_id, blocks = lend.len(), "no room to lend KV blocks");
            Ok(Json(empty))
        }
    }
}
