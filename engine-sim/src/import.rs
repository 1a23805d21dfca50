//! Pulling cached KV blocks from a peer engine before a prefill (cross-instance reuse, the
//! puller's side): ask the holder to lease the blocks it caches of the prompt beyond our own
//! match (`POST /pd/export`), read them over the transfer plane, verify each against the
//! prompt's own chained hashes and put the verified run into the prefix cache, so the prefill
//! computes only the rest.
//!
//! It never fails a request: a holder that is gone, a lease that expired, a short or wrong
//! block all end the pull where it stands and the prefill recomputes what is missing.

use crate::engine::Engine;
use crate::kv;
use crate::stats::Stats;
use bytes::Bytes;
use pdgate_scheduler::BlockHash;
use pdgate_transfer::{Batch, SegmentDesc};
use pdgate_wire::native::{ExportRequest, KvDescriptor, KvReturned, PullFrom, EXPORT_PATH};
use std::time::Duration;

/// Blocks per read batch, as for the other pulls: amortises a round trip, stays under op limits.
const BLOCKS_PER_BATCH: usize = 32;
/// The holder answers from memory: a slow answer means it is in trouble, and recomputing is the
/// better bet than waiting.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// An export answer names at most one offset per asked block; this bounds it well above that.
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// What a pull brought: blocks verified into the cache, the bytes read for them, the time taken
/// from the ask to the last read. All zero when the pull gave nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pulled {
    pub blocks: u32,
    pub bytes: u64,
    pub ms: f64,
}

/// Pulls what `from` holds of `full` (the prompt's full blocks; `tokens` the prompt) into the
/// prefix cache.
pub async fn pull_prefix(
    e: &Engine,
    request_id: &str,
    full: &[BlockHash],
    tokens: &[u32],
    from: &PullFrom,
) -> Pulled {
    let started = std::time::Instant::now();
    let blocks = pull_blocks(e, request_id, full, tokens, from).await;
    if blocks == 0 {
        return Pulled::default();
    }
    Pulled {
        blocks,
        bytes: u64::from(blocks) * e.cfg.block_bytes(),
        ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

async fn pull_blocks(
    e: &Engine,
    request_id: &str,
    full: &[BlockHash],
    tokens: &[u32],
    from: &PullFrom,
) -> u32 {
    let upto = (from.upto_blocks as usize).min(full.len());
    let local = e.cache.lock().match_prefix(&full[..upto]);
    if local >= upto {
        return 0;
    }
    match pull(e, request_id, &from.url, &full[..upto], local).await {
        Ok(0) => {
            Stats::add(&e.stats.kv_pull_failures, 1);
            tracing::warn!(request_id, holder = %from.url, "pull gave no blocks; recomputing");
            0
        }
        Ok(n) => {
            let end = local + n;
            e.remember(&full[..end], tokens);
            Stats::add(&e.stats.kv_blocks_pulled, n as u64);
            tracing::debug!(request_id, holder = %from.url, blocks = n, "pulled cached KV blocks");
            n as u32
        }
        Err((n, why)) => {
            // Blocks verified before the failure are as good as any: keep them.
            e.remember(&full[..local + n], tokens);
            Stats::add(&e.stats.kv_blocks_pulled, n as u64);
            Stats::add(&e.stats.kv_pull_failures, 1);
            tracing::warn!(request_id, holder = %from.url, pulled = n, error = %why, "pull failed; recomputing the rest");
            n as u32
        }
    }
}

/// Blocks verified, in order from `skip`; on failure also those verified before it.
async fn pull(
    e: &Engine,
    request_id: &str,
    holder: &str,
    want: &[BlockHash],
    skip: usize,
) -> Result<usize, (usize, String)> {
    let lease = ask(e, request_id, holder, want, skip)
        .await
        .map_err(|why| (0, why))?;
    let lent = lease.block_offsets.len().min(want.len() - skip);
    if lent == 0 {
        return Ok(0);
    }
    if e.cfg.faults.pull_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(e.cfg.faults.pull_delay_ms)).await;
    }
    let remote = segment(e, &lease).await.map_err(|why| (0, why))?;
    let bb = lease.block_bytes;
    let returned = Bytes::from(
        serde_json::to_vec(&KvReturned {
            returned: lease.request_id.clone(),
        })
        .unwrap_or_default(),
    );
    let offsets = &lease.block_offsets[..lent];
    let batches = offsets.len().div_ceil(BLOCKS_PER_BATCH);
    let mut verified = 0;
    for (n, chunk) in offsets.chunks(BLOCKS_PER_BATCH).enumerate() {
        let mut batch = Batch::new();
        for off in chunk {
            batch = batch.read(*off, bb);
        }
        // The last read tells the holder it may end the lease now rather than at its deadline.
        if n + 1 == batches {
            batch = batch.notify(returned.clone());
        }
        let report = e.transfer.submit(&remote, batch).await.map_err(|err| {
            e.peers.lock().remove(&lease.segment);
            (verified, format!("reading from `{}`: {err}", lease.segment))
        })?;
        for data in &report.reads {
            Stats::add(&e.stats.kv_blocks_received, 1);
            if !kv::verify_block(want[skip + verified], data) {
                Stats::add(&e.stats.kv_verify_failures, 1);
                return Err((
                    verified,
                    format!(
                        "block {} failed verification (lease expired or bytes wrong)",
                        skip + verified
                    ),
                ));
            }
            verified += 1;
        }
    }
    Stats::add(&e.stats.kv_blocks_verified, verified as u64);
    Ok(verified)
}

/// Asks the holder for a lease on what it caches of `want` beyond `skip`.
async fn ask(
    e: &Engine,
    request_id: &str,
    holder: &str,
    want: &[BlockHash],
    skip: usize,
) -> Result<KvDescriptor, String> {
    let body = ExportRequest {
        request_id: request_id.to_string(),
        blocks: want.iter().map(|b| b.0).collect(),
        skip: skip as u32,
    };
    let mut resp = e
        .client
        .post(format!("{}{EXPORT_PATH}", holder.trim_end_matches('/')))
        .timeout(EXPORT_TIMEOUT)
        .json(&body)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|err| format!("holder {holder}: {err}"))?;
    let mut answer = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|err| format!("holder {holder}: {err}"))?
    {
        if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "holder {holder}: answer over {MAX_ANSWER_BYTES} bytes"
            ));
        }
        answer.extend_from_slice(&chunk);
    }
    let lease: KvDescriptor =
        serde_json::from_slice(&answer).map_err(|err| format!("holder {holder}: {err}"))?;
    if lease.block_bytes != e.cfg.block_bytes() {
        return Err(format!(
            "holder {holder} lends {}-byte blocks, ours are {}",
            lease.block_bytes,
            e.cfg.block_bytes()
        ));
    }
    Ok(lease)
}

/// The holder's export segment, as its transfer engine describes it (P2P, as the other pulls).
async fn segment(e: &Engine, lease: &KvDescriptor) -> Result<SegmentDesc, String> {
    if let Some(desc) = e.peers.lock().get(&lease.segment) {
        if desc.endpoint == lease.endpoint {
            return Ok(desc.clone());
        }
    }
    let desc = e
        .transfer
        .discover(&lease.endpoint, &lease.segment)
        .await
        .map_err(|err| format!("segment `{}` at {}: {err}", lease.segment, lease.endpoint))?;
    crate::peers::remember_peer(e, desc.clone());
    Ok(desc)
}
