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

use super::legs::{self, overlay, params_missing};
use super::phases::{PdProtocol, Shape};
use super::types::{LegContext, LegError};
use crate::workers::Worker;
use bytes::Bytes;
use serde_json::{json, Map, Value};

pub const FIELD: &str = "disaggregated_params";

pub struct Trtllm;

impl PdProtocol for Trtllm {
    const SHAPE: Shape = Shape::Sequential;
    type State = ();
    type Answer = Value;

    async fn prepare(&self, _: &LegContext<'_>, _: &Worker) -> Result<(), LegError> {
        Ok(())
    }

    fn prefill_body(&self, ctx: &LegContext<'_>, _: &()) -> Bytes {
        legs::prefill_body(ctx, &[(FIELD, json!({"request_type": "context_only"}))])
    }

    fn decode_body(
        &self,
        ctx: &LegContext<'_>,
        prefill: &Worker,
        _: &(),
        answer: Option<&Value>,
    ) -> Result<Bytes, LegError> {
        let params = answer.and_then(generation_params).ok_or_else(|| {
            params_missing(format!(
                "context server {} answered without `{FIELD}`: is it a context server?",
                prefill.url
            ))
        })?;
        Ok(overlay(&ctx.req.body, &[(FIELD, params)], &[]))
    }

    fn held_by_prefill(&self, answer: &Value) -> Option<String> {
        let params = answer
            .pointer("/choices/0/disaggregated_params")
            .or_else(|| answer.get(FIELD))?;
        match params.get("ctx_request_id")? {
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// The context leg's params (first choice, or top level) turned into a generation-only leg's.
pub fn generation_params(answer: &Value) -> Option<Value> {
    let params = answer
        .pointer("/choices/0/disaggregated_params")
        .or_else(|| answer.get(FIELD));
    let mut params: Map<String, Value> = params?.as_object()?.clone();
    params.insert("request_type".into(), Value::from("generation_only"));
    Some(Value::Object(params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_come_from_the_first_choice_or_the_top_and_turn_generation_only() {
        let ctx =
            json!({"request_type": "context_only", "ctx_request_id": 7, "first_gen_tokens": [5]});
        let want = json!({"request_type": "generation_only", "ctx_request_id": 7, "first_gen_tokens": [5]});
        let answer = json!({"choices": [{"text": "a", FIELD: ctx}], FIELD: {"ctx_request_id": 1}});
        assert_eq!(generation_params(&answer), Some(want.clone()));
        assert_eq!(
            generation_params(&json!({"choices": [{}], FIELD: ctx})),
            Some(want)
        );
        // A first choice whose params are not an object is not looked past.
        let null = json!({"choices": [{FIELD: null}], FIELD: ctx});
        assert_eq!(generation_params(&null), None);
        assert_eq!(generation_params(&json!({"choices": []})), None);
    }
}
