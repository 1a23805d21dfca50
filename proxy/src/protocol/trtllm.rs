//! TensorRT-LLM disaggregated serving (`trtllm-serve disaggregated`): a context-only leg, then a
//! generation-only leg.
//!
//! Context leg: the client's body with `disaggregated_params {request_type: "context_only"}`,
//! one token, not streamed. Its answer carries the filled params (first generated token,
//! `ctx_request_id`, `encoded_opaque_state`) in `choices[0].disaggregated_params` (older servers:
//! top level). Generation leg: the client's original body with those params and `request_type`
//! set to `"generation_only"`; the generation server pulls the KV. Unknown fields pass through.
//!
//! It never sends a generation-only leg without the context leg's params.

use super::legs;
use super::types::{DecodeStart, LegContext, LegError};
use crate::error::ApiError;
use crate::workers::Worker;
use pdgate_scheduler::{Observed, Role};
use serde_json::{json, Value};

pub const FIELD: &str = "disaggregated_params";

pub async fn run(
    ctx: &LegContext<'_>,
    prefill: &Worker,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let body = legs::prefill_body(ctx, &[(FIELD, json!({"request_type": "context_only"}))]);
    let started = std::time::Instant::now();
    let answer = legs::prefill_json(ctx, &prefill.url, body, &[]).await?;
    let params = answer
        .pointer("/choices/0/disaggregated_params")
        .or_else(|| answer.get(FIELD))
        .filter(|p| p.is_object())
        .cloned();
    let Some(mut params) = params else {
        return Err(LegError {
            role: Role::Prefill,
            retryable: true,
            error: ApiError::upstream(
                "prefill_failed",
                format!(
                    "context server {} answered without `{FIELD}`: is it a context server?",
                    prefill.url
                ),
            ),
        });
    };
    on_prefill_done(Some(Observed {
        prefill_ms: started.elapsed().as_secs_f64() * 1e3,
        transfer_ms: 0.0,
        kv_bytes: 0,
    }));
    params["request_type"] = Value::from("generation_only");
    let gen_body = legs::overlay(&ctx.req.body, &[(FIELD, params)], &[]);
    let response = legs::decode_head_raw(ctx, gen_body, &[]).await?;
    Ok(DecodeStart {
        prompt_logprobs: legs::prompt_logprobs_of(ctx, &answer),
        ..DecodeStart::new(response)
    })
}
