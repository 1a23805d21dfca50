//! vLLM NixlConnector mode. A prefill leg carries `kv_transfer_params.do_remote_decode: true`
//! (and `max_tokens: 1`); the engine prefills, holds the blocks and answers with
//! `kv_transfer_params` naming them (`remote_engine_id` = its segment, `remote_block_ids`,
//! `remote_host`/`remote_port` = its transfer listener). A decode leg carries those params with
//! `do_remote_prefill: true`; the engine pulls and verifies the blocks, then generates.
//!
//! Like vLLM, it never prefills on a decode leg that names remote blocks it cannot read: a
//! missing or corrupted block is an error, not a silent recompute.

use super::prepared::{Leg, Prepared};
use super::pull::{self, HeldKv};
use crate::engine::Engine;
use crate::openai::ApiError;
use serde_json::{json, Value};

pub const FIELD: &str = "kv_transfer_params";

pub async fn prepare(
    e: &Engine,
    body: &Value,
    rid: &str,
    tokens: &[u32],
) -> Result<Prepared, ApiError> {
    let Some(params) = body.get(FIELD).filter(|v| !v.is_null()) else {
        return Ok(Prepared::Plain);
    };
    let flag = |k: &str| params.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("do_remote_decode") {
        let key = pull::unique_key(rid);
        let held = pull::prefill_and_hold(e, &key, tokens).await?;
        let (host, port) = split_endpoint(&held.endpoint);
        let params = json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": held.segment,
            "remote_block_ids": held.block_ids,
            "remote_host": host,
            "remote_port": port,
            "remote_request_id": held.request_id,
            "tp_size": 1,
        });
        return Ok(Prepared::PrefillOnly(Box::new(move |resp: &mut Value| {
            resp[FIELD] = params;
        })));
    }
    if flag("do_remote_prefill") {
        let held = held_of(params, rid)?;
        let claim = pull::pull(e, &pull::unique_key(rid), &held, tokens, FIELD).await?;
        return Ok(Prepared::Decode(Leg {
            claim: Some(claim),
            first: None,
        }));
    }
    Ok(Prepared::Plain)
}

fn split_endpoint(endpoint: &str) -> (String, u16) {
    match endpoint.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(0)),
        None => (endpoint.to_string(), 0),
    }
}

fn held_of(params: &Value, rid: &str) -> Result<HeldKv, ApiError> {
    let bad =
        |what: &str| ApiError::invalid(FIELD, format!("`{FIELD}.{what}` is missing or malformed"));
    let host = params
        .get("remote_host")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("remote_host"))?;
    let port = params
        .get("remote_port")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("remote_port"))?;
    let segment = params
        .get("remote_engine_id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("remote_engine_id"))?;
    let block_ids = params
        .get("remote_block_ids")
        .and_then(Value::as_array)
        .and_then(|ids| ids.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad("remote_block_ids"))?;
    // vLLM keys the prefill's blocks by request id; without our extra field fall back to it.
    let request_id = params
        .get("remote_request_id")
        .and_then(Value::as_str)
        .unwrap_or(rid)
        .to_string();
    Ok(HeldKv {
        request_id,
        endpoint: format!("{host}:{port}"),
        segment: segment.to_string(),
        block_ids,
    })
}
