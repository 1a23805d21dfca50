//! What the protocol layer hands in and out: a request's leg context, a leg's failure, and the
//! decode head the relay takes over. Below every protocol file, so they share these without
//! importing each other or `mod.rs`.

use super::abort::AbortGuard;
use super::logprobs::PromptLogprobs;
use crate::error::ApiError;
use crate::openai::ClientRequest;
use crate::state::AppState;
use crate::workers::Worker;
use pdgate_scheduler::Role;

/// Everything a protocol needs to run one request's legs.
pub struct LegContext<'a> {
    pub state: &'a AppState,
    pub request_id: &'a str,
    pub req: &'a ClientRequest,
    pub prompt_tokens: u32,
    /// `None`: the decode instance prefills locally (conditional disaggregation).
    pub prefill: Option<&'a Worker>,
    pub decode: &'a Worker,
    /// The scheduler's planned pull of cached prefix blocks into the prefill, for protocols
    /// whose prefill can take it (native); the engine recomputes whatever the pull misses.
    pub pull: Option<pdgate_wire::native::PullFrom>,
    /// The side whose engine marks its copy of the handed-off prompt evicted first, for
    /// protocols whose engines take the mark (native); `None`: both keep it.
    pub evict_first: Option<Role>,
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
    pub abort_on_drop: Option<AbortGuard>,
    /// Prompt logprobs a prefill leg computed, to merge in front of the decode's answer.
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// A decode answer ready for the relay: its content type, its body (merged, if there was
/// anything to merge), whether that body is SSE, and the legs' abort guard.
pub struct DecodeBody {
    pub content_type: Option<http::HeaderValue>,
    pub body: crate::relay::Upstream,
    pub sse: bool,
    pub abort_on_drop: Option<AbortGuard>,
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
