//! vLLM MooncakeConnector mode. Each prefill engine's bootstrap server (its HTTP port here)
//! answers `GET /query` with data-parallel rank → engine id; the gateway sends both legs at once
//! with a shared `transfer_id`: the prefill leg `{do_remote_decode: true, transfer_id}`, the
//! decode leg `{do_remote_prefill: true, remote_bootstrap_addr, remote_engine_id, transfer_id}`.
//! The decode engine offers its reserved slots to the prefill under the transfer id, the way
//! the SGLang mode does (mailbox learnt once from the bootstrap server, then one transfer
//! notification per request), and waits; the prefill engine prefills and writes the blocks there.
//!
//! It never generates on a decode leg whose transfer did not complete in time.

use super::prepared::Prepared;
use super::sglang;
use crate::engine::Engine;
use crate::openai::ApiError;
use serde_json::{json, Value};
use std::time::Duration;

pub const FIELD: &str = "kv_transfer_params";
pub const QUERY_PATH: &str = "/query";

pub async fn prepare(
    e: &Engine,
    body: &Value,
    _rid: &str,
    tokens: &[u32],
) -> Result<Prepared, ApiError> {
    let Some(params) = body.get(FIELD).filter(|v| !v.is_null()) else {
        return Ok(Prepared::Plain);
    };
    let flag = |k: &str| params.get(k).and_then(Value::as_bool).unwrap_or(false);
    let transfer_id = params
        .get("transfer_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(FIELD, "`kv_transfer_params.transfer_id` is required"))?;
    let room = format!("mooncake-{transfer_id}");
    let timeout = Duration::from_millis(e.cfg.bootstrap_timeout_ms);
    if flag("do_remote_decode") {
        return sglang::prefill(e, &room, tokens, timeout).await;
    }
    if flag("do_remote_prefill") {
        let addr = params
            .get("remote_bootstrap_addr")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::invalid(
                    FIELD,
                    "`kv_transfer_params.remote_bootstrap_addr` is required",
                )
            })?;
        let engine_id = params.get("remote_engine_id").and_then(Value::as_str);
        if engine_id.is_none() {
            return Err(ApiError::invalid(
                FIELD,
                "`kv_transfer_params.remote_engine_id` is required",
            ));
        }
        let addr = if addr.starts_with("http") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        return sglang::decode(e, &room, &addr, tokens, timeout).await;
    }
    Ok(Prepared::Plain)
}

/// This engine's id as vLLM's Mooncake bootstrap server reports it.
pub fn engine_id(e: &Engine) -> String {
    format!("{}-{}", e.cfg.model, e.http_addr.port())
}

/// `GET /query`: data-parallel rank → engine id (one rank here).
pub async fn query(
    axum::extract::State(e): axum::extract::State<std::sync::Arc<Engine>>,
) -> axum::Json<Value> {
    axum::Json(json!({"0": {"engine_id": engine_id(&e), "dp_rank": 0}}))
}
