//! SGLang PD mode. The gateway sends the same body, carrying `bootstrap_host`, `bootstrap_port`
//! and `bootstrap_room`, to a prefill and a decode engine at once. The decode engine reserves
//! KV slots and offers them to the prefill as SGLang does: it asks the prefill's bootstrap
//! server (served on the prefill's HTTP port, so `bootstrap_port` is that port) once where its
//! KV sender listens, then sends each room's offer as a message over pdgate-transfer (see
//! `bootstrap`), and waits for the prefill with the same room to write the blocks (up to
//! `bootstrap_timeout_ms`); the prefill engine prefills, takes the offer and pushes every block
//! through pdgate-transfer. `/abort_request {"rid"}` ends either leg at once.
//!
//! It never generates on a decode leg whose room no prefill filled in time: that is an error,
//! as in SGLang, not a local recompute.

use super::prepared::{Leg, Prepared};
use super::rendezvous::Offer;
use super::{abort, pull};
use crate::engine::Engine;
use crate::openai::ApiError;
use pdgate_scheduler::Role;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// SGLang's default bootstrap port, used when a request names none.
const DEFAULT_BOOTSTRAP_PORT: u64 = 8998;

/// A field that may be a scalar or (batched requests) a one-element array.
fn scalar<'a>(body: &'a Value, field: &str) -> Option<&'a Value> {
    match body.get(field)? {
        Value::Array(a) if a.len() == 1 => a.first(),
        Value::Null => None,
        v => Some(v),
    }
}

fn aborted_error(rid: &str) -> ApiError {
    ApiError::server(
        503,
        "request_aborted",
        format!("request `{rid}` was aborted"),
    )
}

pub async fn prepare(
    e: &Engine,
    body: &Value,
    rid: &str,
    tokens: &[u32],
    abort: watch::Receiver<bool>,
) -> Result<Prepared, ApiError> {
    let Some(room) = scalar(body, "bootstrap_room") else {
        return Ok(Prepared::Plain);
    };
    let room = room.as_u64().ok_or_else(|| {
        ApiError::invalid("bootstrap_room", "`bootstrap_room` must be an integer")
    })?;
    let room = format!("sglang-{room}");
    let timeout = Duration::from_millis(e.cfg.bootstrap_timeout_ms);
    match e.cfg.role {
        Role::Prefill => {
            tokio::select! {
                r = prefill(e, &room, tokens, timeout) => r,
                _ = abort::aborted(abort) => Err(aborted_error(rid)),
            }
        }
        Role::Decode => {
            let host = scalar(body, "bootstrap_host")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "bootstrap_host",
                        "`bootstrap_host` is required with `bootstrap_room`",
                    )
                })?;
            let port = scalar(body, "bootstrap_port")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_BOOTSTRAP_PORT);
            let bootstrap = format!("http://{host}:{port}");
            tokio::select! {
                r = decode(e, &room, &bootstrap, tokens, timeout) => r,
                _ = abort::aborted(abort) => Err(aborted_error(rid)),
            }
        }
    }
}

/// Prefill, then push every block into the slots the decode of this room offered.
pub(super) async fn prefill(
    e: &Engine,
    room: &str,
    tokens: &[u32],
    timeout: Duration,
) -> Result<Prepared, ApiError> {
    let blocks = pull::compute(e, tokens).await?;
    let target = e.rendezvous.take(room, timeout).await?;
    if blocks.len() != target.block_offsets.len() {
        let msg = format!(
            "prompt has {} KV blocks, the decode of room `{room}` reserved {}",
            blocks.len(),
            target.block_offsets.len()
        );
        return Err(ApiError::server(500, "kv_transfer_failed", msg));
    }
    crate::push::send_blocks(e, &target.request_id, &target, &blocks).await?;
    Ok(Prepared::PrefillOnly(Box::new(|_| {})))
}

/// Reserve, offer the slots to the prefill (through its bootstrap mailbox), wait for them to
/// fill, verify.
pub(super) async fn decode(
    e: &Engine,
    room: &str,
    bootstrap: &str,
    tokens: &[u32],
    timeout: Duration,
) -> Result<Prepared, ApiError> {
    let pool = e
        .pool
        .as_ref()
        .ok_or_else(|| ApiError::invalid("bootstrap_room", "this engine is not a decode engine"))?;
    let blocks = e.hasher.blocks_for(tokens.len());
    let target = pool
        .reserve(room, blocks, Instant::now())
        .map_err(pull::pool_error)?;
    let release = ReleaseOnError {
        pool,
        key: room,
        armed: true,
    };
    let offer = Offer {
        room: room.to_string(),
        target,
    };
    super::bootstrap::send(e, bootstrap, &offer).await?;
    let claim = pool.claim(room, timeout).await.map_err(|err| match err {
        // `Unknown`: the TTL sweep freed the reservation while we waited (a TTL no longer than
        // the bootstrap timeout races it); for the client it is the same missing prefill.
        crate::pool::PoolError::NotLanded(_) | crate::pool::PoolError::Unknown(_) => {
            ApiError::server(
                504,
                "bootstrap_timeout",
                format!(
                    "no prefill for bootstrap room `{room}` arrived within {} ms",
                    timeout.as_millis()
                ),
            )
        }
        other => pull::pool_error(other),
    })?;
    let mut release = release;
    release.armed = false;
    crate::verify::verify_claim(e, &claim, tokens, room)?;
    Ok(Prepared::Decode(Leg {
        claim: Some(claim),
        first: None,
    }))
}

/// Frees a reservation unless the decode leg took it over.
struct ReleaseOnError<'a> {
    pool: &'a crate::pool::KvPool,
    key: &'a str,
    armed: bool,
}

impl Drop for ReleaseOnError<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.release(self.key);
        }
    }
}
