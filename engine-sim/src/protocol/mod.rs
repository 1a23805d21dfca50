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
pub mod pull;
pub mod rendezvous;
pub mod sglang;
pub mod trtllm;
pub mod vllm_mooncake;
pub mod vllm_nixl;

use crate::config::Protocol;
use crate::engine::Engine;
use crate::openai::ApiError;
use crate::pool::Claim;
use serde_json::Value;
use tokio::sync::watch;

/// Adds protocol fields to a prefill-only leg's (non-streamed) response.
pub type Decorate = Box<dyn FnOnce(&mut Value) + Send>;

/// A decode leg whose KV is in place.
pub struct Leg {
    pub claim: Option<Claim>,
    /// The first generated token when the protocol carries it (else it is recomputed).
    pub first: Option<u32>,
}

pub enum Prepared {
    /// Not a PD leg: prefill here and decode.
    Plain,
    /// A prefill-only leg: prefill done and KV held or pushed; answer with one token.
    PrefillOnly(Decorate),
    Decode(Leg),
}

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

/// A pool key unique on this engine even when a request id repeats (retries, odd clients).
pub fn unique_key(rid: &str) -> String {
    format!("{rid}#{:08x}", rand::random::<u32>())
}

/// `POST /abort_request {"rid": ...}` (SGLang's shape; accepted in every mode).
pub async fn abort_request(
    axum::extract::State(e): axum::extract::State<std::sync::Arc<Engine>>,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let rid = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("rid").and_then(Value::as_str).map(str::to_string));
    let aborted = rid.as_deref().is_some_and(|r| e.aborts.abort(r));
    axum::Json(serde_json::json!({"aborted": aborted}))
}
