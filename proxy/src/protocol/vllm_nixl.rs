//! vLLM NixlConnector (and most vLLM v1 PD connectors): sequential legs, decode pulls.
//!
//! Prefill leg: the client's body with `kv_transfer_params {do_remote_decode: true, ...}`,
//! `max_tokens: 1` (and `max_completion_tokens: 1` if present), `stream: false`, no
//! `stream_options`. Its answer's `kv_transfer_params` go verbatim into the decode leg: the
//! client's original body. Both legs carry the same `X-Request-Id`. The decode answer is complete
//! (usage, finish reason) on its own, except for the prompt's logprobs (`echo` + `logprobs`):
//! only the prefill ran the prompt, so they come from its answer. Unknown fields pass through.
//!
//! It never sends a decode leg without the params a prefill returned: that would make vLLM
//! recompute silently.

use super::legs::{self, overlay, params_missing};
use super::phases::{PdProtocol, Shape};
use super::types::{LegContext, LegError};
use crate::workers::Worker;
use bytes::Bytes;
use serde_json::{json, Value};

pub const FIELD: &str = "kv_transfer_params";

pub struct VllmNixl;

impl PdProtocol for VllmNixl {
    const SHAPE: Shape = Shape::Sequential;
    type State = ();
    type Answer = Value;

    async fn prepare(&self, _: &LegContext<'_>, _: &Worker) -> Result<(), LegError> {
        Ok(())
    }

    fn prefill_body(&self, ctx: &LegContext<'_>, _: &()) -> Bytes {
        let params = json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        });
        legs::prefill_body(ctx, &[(FIELD, params)])
    }

    fn decode_body(
        &self,
        ctx: &LegContext<'_>,
        prefill: &Worker,
        _: &(),
        answer: Option<&Value>,
    ) -> Result<Bytes, LegError> {
        let params = answer.and_then(params_of).ok_or_else(|| {
            params_missing(format!("prefill engine {} answered without `{FIELD}`: is it running with a KV connector (kv_role kv_both / kv_producer)?", prefill.url))
        })?;
        Ok(overlay(&ctx.req.body, &[(FIELD, params)], &[]))
    }

    fn held_by_prefill(&self, answer: &Value) -> Option<String> {
        let id = answer.get(FIELD)?.get("remote_request_id")?;
        id.as_str().map(str::to_string)
    }
}

/// The prefill's transfer params, passed on verbatim.
pub fn params_of(answer: &Value) -> Option<Value> {
    answer.get(FIELD).filter(|p| p.is_object()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_the_answers_top_level_object_verbatim() {
        let p = json!({"remote_engine_id": "e", "remote_block_ids": [1, 2], "extra": null});
        assert_eq!(params_of(&json!({"choices": [], FIELD: p})), Some(p));
        assert_eq!(params_of(&json!({"choices": [{FIELD: {"a": 1}}]})), None);
        assert_eq!(params_of(&json!({FIELD: null})), None);
    }
}
