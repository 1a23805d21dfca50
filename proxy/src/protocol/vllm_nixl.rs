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

use super::legs;
use super::types::{DecodeStart, LegContext, LegError};
use crate::error::ApiError;
use crate::workers::Worker;
use pdgate_scheduler::{Observed, Role};
use serde_json::json;

pub const FIELD: &str = "kv_transfer_params";

pub async fn run(
    ctx: &LegContext<'_>,
    prefill: &Worker,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let body = legs::prefill_body(
        ctx,
        &[(
            FIELD,
            json!({
                "do_remote_decode": true,
                "do_remote_prefill": false,
                "remote_engine_id": null,
                "remote_block_ids": null,
                "remote_host": null,
                "remote_port": null,
            }),
        )],
    );
    let started = std::time::Instant::now();
    let answer = legs::prefill_json(ctx, &prefill.url, body, &[]).await?;
    let Some(params) = answer.get(FIELD).filter(|p| p.is_object()).cloned() else {
        return Err(missing(&prefill.url));
    };
    on_prefill_done(Some(Observed {
        prefill_ms: started.elapsed().as_secs_f64() * 1e3,
        transfer_ms: 0.0,
        kv_bytes: 0,
    }));
    let decode_body = legs::overlay(&ctx.req.body, &[(FIELD, params)], &[]);
    let response = legs::decode_head_raw(ctx, decode_body, &[]).await?;
    Ok(DecodeStart {
        prompt_logprobs: legs::prompt_logprobs_of(ctx, &answer),
        ..DecodeStart::new(response)
    })
}

fn missing(url: &str) -> LegError {
    LegError {
        role: Role::Prefill,
        retryable: true,
        error: ApiError::upstream(
            "prefill_failed",
            format!("prefill engine {url} answered without `{FIELD}`: is it running with a KV connector (kv_role kv_both / kv_producer)?"),
        ),
    }
}
