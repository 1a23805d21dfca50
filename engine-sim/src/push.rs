//! Pushing a prompt's KV blocks into the slots a decode engine reserved, through the transfer
//! engine, the last batch carrying the landing notification. Native prefills (`pd`) and
//! push-mode protocols (`protocol::sglang`, vLLM Mooncake through it) both send this way, so it
//! sits below them all.

use crate::engine::Engine;
use crate::kv;
use crate::openai::ApiError;
use crate::peers::locate;
use crate::stats::Stats;
use bytes::{Bytes, BytesMut};
use pdgate_scheduler::BlockHash;
use pdgate_transfer::{Batch, SegmentDesc};
use pdgate_wire::native::{KvDescriptor, KvLanded};

/// Blocks per transfer batch: large enough to amortise a round trip, small enough to pipeline
/// and to keep what a prefill stages per request small (each batch's bytes are built before it
/// is sent: 8 blocks of 128 KiB are 1 MiB; at 32 the engine's memory swung by tens of MiB with
/// the number of requests sending at once).
const BLOCKS_PER_BATCH: usize = 8;

/// Writes `blocks` into `target`'s reserved slots in order; returns the bytes sent.
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

fn block_bytes_of(hash: BlockHash, len: usize, corrupt: bool) -> Bytes {
    let mut buf = BytesMut::zeroed(len);
    kv::fill_block(hash, &mut buf);
    if corrupt && len > 0 {
        buf[len / 2] ^= 0x5a;
    }
    buf.freeze()
}
