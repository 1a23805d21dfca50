//! Checking the KV blocks a decode leg claimed against its own prompt before it generates from
//! them. The native decode leg (`generate`) and the push-mode protocols (`protocol::sglang`)
//! both rely on it, so it sits below them all.

use crate::engine::Engine;
use crate::kv;
use crate::openai::ApiError;
use crate::pool::Claim;
use crate::stats::Stats;

/// Checks every block a claim holds against the prompt's own chained hashes.
pub fn verify_claim(
    e: &Engine,
    claim: &Claim,
    tokens: &[u32],
    request_id: &str,
) -> Result<(), ApiError> {
    let hashes = e.hasher.all_blocks(tokens);
    if hashes.len() != claim.slots.len() {
        Stats::add(&e.stats.kv_verify_failures, 1);
        let msg = format!(
            "prompt needs {} KV blocks but the reservation holds {}",
            hashes.len(),
            claim.slots.len()
        );
        return Err(ApiError::server(500, "kv_verification_failed", msg));
    }
    let pool = e
        .pool
        .as_ref()
        .ok_or_else(|| ApiError::invalid("role", "this engine is not a decode engine"))?;
    let block_bytes = pool.block_bytes() as usize;
    let mut buf = vec![0u8; block_bytes];
    for (i, (hash, slot)) in hashes.iter().zip(&claim.slots).enumerate() {
        let offset = *slot as usize * block_bytes;
        let ok =
            pool.segment().read_into(offset, &mut buf).is_ok() && kv::verify_block(*hash, &buf);
        if !ok {
            Stats::add(&e.stats.kv_verify_failures, 1);
            let msg = format!("KV block {i} of request `{}` failed verification (lost, misplaced or corrupted in transfer)", request_id);
            tracing::error!(request_id = %request_id, block = i, "KV verification failed");
            return Err(ApiError::server(500, "kv_verification_failed", msg));
        }
    }
    Stats::add(&e.stats.kv_blocks_verified, hashes.len() as u64);
    // Decode now holds this prefix, as a real engine would after receiving it.
    e.remember(e.full_blocks(&hashes, tokens), tokens);
    Ok(())
}
