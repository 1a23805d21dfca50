//! The reference engine's PD protocol modes, one file per protocol, each enforcing its rules as
//! the real engine does (`native` lives in `pd.rs`/`generate.rs`). A mode looks at a request and
//! says what this engine must do with it: serve it plainly, run it as a prefill-only leg (answer
//! one token plus whatever the protocol hands back), or run it as a decode leg whose KV arrived
//! and was verified.
//!
//! A mode must never fall back to a local prefill when a PD leg's KV is missing: that would hide
//! exactly the handoff bugs these modes exist to catch.

pub mod abort;
pub mod bootstrap;
pub mod mailbox;
pub mod prepared;
pub mod pull;
pub mod rendezvous;
pub mod sglang;
pub mod trtllm;
pub mod vllm_mooncake;
pub mod vllm_nixl;

use crate::config::Protocol;
use crate::engine::Engine;
use crate::openai::ApiError;
use serde_json::Value;
use tokio::sync::watch;

pub use prepared::{Decorate, Leg, Prepared};

/// What this engine must do with a request under its protocol.
pub async fn prepare(
    e: &Engine,
    body: &Value,
    rid: &str,
    tokens: &[u32],
    abort: Option<watch::Receiver<bool>>,
) -> Result<Prepared, ApiError> {
    match e.cfg.protocol {
        Protocol::Native => Ok(Prepared::Plain),
        Protocol::VllmNixl => vllm_nixl::prepare(e, body, rid, tokens).await,
        Protocol::VllmMooncake => vllm_mooncake::prepare(e, body, rid, tokens).await,
        Protocol::Trtllm => trtllm::prepare(e, body, rid, tokens).await,
        Protocol::Sglang => {
            let abort = abort.unwrap_or_else(|| watch::channel(false).1);
            sglang::prepare(e, body, rid, tokens, abort).await
        }
    }
}

/// Whether prefill engines of this mode take bootstrap offers and push KV (push-mode protocols).
pub fn prefill_takes_offers(p: Protocol) -> bool {
    matches!(p, Protocol::Sglang | Protocol::VllmMooncake)
}

/// Whether this mode keeps KV blocks in a pool on prefill engines too (pull-mode protocols).
pub fn prefill_holds_kv(p: Protocol) -> bool {
    matches!(p, Protocol::VllmNixl | Protocol::Trtllm)
}

/// `POST /abort_request {"rid": ...}` (SGLang's shape; accepted in every mode). On a pull-mode
/// prefill, `rid` may also name KV held for a decode (`remote_request_id`, `ctx_request_id`):
/// the gateway calls it off when that decode failed before reading it, so the blocks come back
/// now instead of at `reservation_ttl_secs`.
pub async fn abort_request(
    axum::extract::State(e): axum::extract::State<std::sync::Arc<Engine>>,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let rid = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("rid").and_then(Value::as_str).map(str::to_string));
    let Some(rid) = rid else {
        return axum::Json(serde_json::json!({"aborted": false}));
    };
    let released = e.cfg.role == pdgate_scheduler::Role::Prefill
        && prefill_holds_kv(e.cfg.protocol)
        && e.pool.as_ref().is_some_and(|p| p.release(&rid));
    if released {
        tracing::info!(held = %rid, "KV held for a decode that will not read it released");
        return axum::Json(serde_json::json!({"aborted": true, "released": true}));
    }
    let aborted = e.aborts.abort(&rid);
    axum::Json(serde_json::json!({"aborted": aborted}))
}
