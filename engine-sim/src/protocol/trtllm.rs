//! TensorRT-LLM disaggregated-serving mode (`trtllm-serve disaggregated`). A context leg carries
//! `disaggregated_params.request_type: "context_only"`; the engine prefills, holds the blocks and
//! answers with the filled params in `choices[0].disaggregated_params` (`first_gen_tokens`,
//! `ctx_request_id`, and `encoded_opaque_state`: base64 of where the blocks are). A generation
//! leg carries them back with `request_type: "generation_only"`; the engine pulls and verifies
//! the blocks and continues after the first generated token.
//!
//! It never generates on a generation-only leg whose opaque state it cannot read or whose blocks
//! fail verification.

use super::prepared::{Leg, Prepared};
use super::pull::{self, HeldKv};
use crate::engine::Engine;
use crate::openai::ApiError;
use crate::text;
use base64::Engine as _;
use serde_json::{json, Value};

pub const FIELD: &str = "disaggregated_params";

pub async fn prepare(
    e: &Engine,
    body: &Value,
    rid: &str,
    tokens: &[u32],
) -> Result<Prepared, ApiError> {
    let Some(params) = body.get(FIELD).filter(|v| !v.is_null()) else {
        return Ok(Prepared::Plain);
    };
    match params.get("request_type").and_then(Value::as_str) {
        Some("context_only") => {
            // The context request id is the pool key too, so an abort naming it frees the
            // blocks (TRT-LLM's ids are integers; random ones are unique on this engine).
            let ctx_request_id = rand::random::<u64>() >> 1;
            let key = ctx_request_id.to_string();
            let held = pull::prefill_and_hold(e, &key, tokens).await?;
            let state = serde_json::to_vec(&held).unwrap_or_default();
            let first = text::first_token(tokens, e.cfg.seed);
            let params = json!({
                "request_type": "context_only",
                "first_gen_tokens": [first],
                "ctx_request_id": ctx_request_id,
                "encoded_opaque_state": base64::engine::general_purpose::STANDARD.encode(state),
                "draft_tokens": null,
            });
            Ok(Prepared::PrefillOnly(Box::new(move |resp: &mut Value| {
                if let Some(choice) = resp.pointer_mut("/choices/0") {
                    choice[FIELD] = params;
                }
            })))
        }
        Some("generation_only") => {
            let held = held_of(params)?;
            let first = params
                .pointer("/first_gen_tokens/0")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    ApiError::invalid(
                        FIELD,
                        "`first_gen_tokens` is required on a generation-only request",
                    )
                })?;
            let claim = pull::pull(e, &pull::unique_key(rid), &held, tokens, FIELD).await?;
            Ok(Prepared::Decode(Leg {
                claim: Some(claim),
                first: Some(u32::try_from(first).unwrap_or(u32::MAX)),
            }))
        }
        Some("context_and_generation") | None => Ok(Prepared::Plain),
        Some(other) => Err(ApiError::invalid(
            FIELD,
            format!("unknown `request_type` `{other}`"),
        )),
    }
}

fn held_of(params: &Value) -> Result<HeldKv, ApiError> {
    let bad = || ApiError::invalid(FIELD, "`encoded_opaque_state` is missing or not ours");
    let state = params
        .get("encoded_opaque_state")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(state)
        .map_err(|_| bad())?;
    serde_json::from_slice(&raw).map_err(|_| bad())
}
