//! Engine PD protocols: how the legs of one request are sent to a (prefill, decode) pair, up to
//! the decode leg's response head. One file per protocol; the pipeline picks by the pool's
//! protocol and never needs to know a protocol's wire details.

pub mod legs;
pub mod logprobs;
pub mod native;
pub mod sglang;
pub mod trtllm;
pub mod vllm_mooncake;
pub mod vllm_nixl;

use crate::config::Protocol;
use crate::error::ApiError;
use crate::openai::ClientRequest;
use crate::state::AppState;
use crate::workers::Worker;
use pdgate_scheduler::{Observed, Role};

/// Everything a protocol needs to run one request's legs.
pub struct LegContext<'a> {
    pub state: &'a AppState,
    pub request_id: &'a str,
    pub req: &'a ClientRequest,
    pub prompt_tokens: u32,
    /// `None`: the decode instance prefills locally (conditional disaggregation).
    pub prefill: Option<&'a Worker>,
    pub decode: &'a Worker,
}

/// A failed leg, attributed to the role that failed.
#[derive(Debug)]
pub struct LegError {
    pub role: Role,
    /// True when another instance might succeed (engine or network failure, not a bad request).
    pub retryable: bool,
    pub error: ApiError,
}

/// What the handoff produced: the decode response head, ready to be relayed.
pub struct DecodeStart {
    pub response: crate::http1::Response,
    /// Aborts the legs still running on the engines if the client goes away before the relay
    /// finished (protocols with an abort call); the relay disarms it on a clean end.
    pub abort_on_drop: Option<legs::AbortGuard>,
    /// Prompt logprobs a prefill leg computed, to merge in front of the decode's answer.
    pub prompt_logprobs: Option<logprobs::PromptLogprobs>,
}

/// A decode answer ready for the relay: its content type, its body (merged, if there was
/// anything to merge), whether that body is SSE, and the legs' abort guard.
pub struct DecodeBody {
    pub content_type: Option<http::HeaderValue>,
    pub body: crate::relay::Upstream,
    pub sse: bool,
    pub abort_on_drop: Option<legs::AbortGuard>,
}

impl DecodeStart {
    pub fn new(response: crate::http1::Response) -> Self {
        Self {
            response,
            abort_on_drop: None,
            prompt_logprobs: None,
        }
    }

    pub fn into_body(self) -> DecodeBody {
        let content_type = self
            .response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .cloned();
        let sse = content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let body: crate::relay::Upstream = Box::pin(self.response.bytes_stream());
        let body = match self.prompt_logprobs {
            Some(p) => p.wrap(body, sse),
            None => body,
        };
        DecodeBody {
            content_type,
            body,
            sse,
            abort_on_drop: self.abort_on_drop,
        }
    }
}

/// Runs the legs; `on_prefill_done` is called once the prefill (and its KV handoff) finished,
/// with what was measured.
pub async fn run_legs(
    protocol: Protocol,
    ctx: &LegContext<'_>,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let Some(prefill) = ctx.prefill else {
        // The scheduler chose decode-local prefill: the plain request, in every protocol.
        let response = legs::decode_head(ctx, &ctx.req.body, &[]).await?;
        on_prefill_done(None);
        return Ok(DecodeStart::new(response));
    };
    match protocol {
        Protocol::Native => native::run(ctx, prefill, on_prefill_done).await,
        Protocol::VllmNixl => vllm_nixl::run(ctx, prefill, on_prefill_done).await,
        Protocol::VllmMooncake => vllm_mooncake::run(ctx, prefill, on_prefill_done).await,
        Protocol::Sglang => sglang::run(ctx, prefill, on_prefill_done).await,
        Protocol::Trtllm => trtllm::run(ctx, prefill, on_prefill_done).await,
    }
}

/// Turns an engine's non-success answer into a leg error: the client's own mistakes (400, 413,
/// 422) pass through as they are; anything else is the engine's fault (502, retryable).
pub async fn upstream_failure(role: Role, resp: crate::http1::Response) -> LegError {
    let status = resp.status();
    let body: serde_json::Value = read_limited(resp, 64 * 1024)
        .await
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let message = body
        .pointer("/error/message")
        .or_else(|| body.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("no error message")
        .to_string();
    if matches!(status.as_u16(), 400 | 413 | 422) {
        let param = body
            .pointer("/error/param")
            .and_then(|p| p.as_str())
            .unwrap_or("body");
        let mut error = ApiError::invalid(param, message);
        error.status = status;
        return LegError {
            role,
            retryable: false,
            error,
        };
    }
    let code = match body.pointer("/error/code").and_then(|c| c.as_str()) {
        Some("kv_verification_failed") => "kv_verification_failed",
        Some("kv_transfer_failed") => "kv_transfer_failed",
        _ if role == Role::Prefill => "prefill_failed",
        _ => "decode_failed",
    };
    LegError {
        role,
        retryable: true,
        error: ApiError::upstream(code, format!("{role} engine answered {status}: {message}")),
    }
}

pub fn unreachable(role: Role, url: &str, e: &crate::http1::Error) -> LegError {
    let error = if e.is_timeout() {
        ApiError::timeout(format!("{role} engine {url} timed out"))
    } else {
        ApiError::upstream(
            "engine_unreachable",
            format!("{role} engine {url} unreachable: {e}"),
        )
    };
    LegError {
        role,
        retryable: true,
        error,
    }
}

/// Reads at most `limit` bytes of a body; `None` if it is longer or broken.
pub async fn read_limited(resp: crate::http1::Response, limit: usize) -> Option<Vec<u8>> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.ok()?;
        if out.len() + chunk.len() > limit {
            return None;
        }
        out.extend_from_slice(&chunk);
    }
    Some(out)
}
