//! A PD protocol as the phases of one request's legs, in the spirit of pingora's `ProxyHttp`:
//! the runner (`runner.rs`) calls them in order and owns everything that must hold under
//! failure (deadlines, which role failed, aborts, the prompt logprobs wait); a protocol fills
//! in only its data: which body goes to which engine, in what [`Shape`], and how the prefill's
//! answer feeds the decode leg. Phases with a default are the ones most protocols do not need.

use super::logprobs::PromptLogprobs;
use super::types::{LegContext, LegError};
use crate::workers::Worker;
use bytes::Bytes;
use pdgate_scheduler::Observed;
use std::future::Future;
use std::time::Duration;

/// How a protocol's two legs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The prefill answers first; the decode leg is built from its answer.
    Sequential,
    /// Both legs go out at once, the decode leg built from what `prepare` set up (bootstrap
    /// data); the client gets decode's head as soon as it arrives.
    Concurrent { abort: Abort },
}

/// How a concurrent protocol calls off a leg whose partner failed, or whose client left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// `POST {engine}/abort_request {"rid"}` (SGLang).
    Call,
    /// The engine has no abort call: the leg's connection is dropped, and the engine aborts on
    /// disconnect (vLLM).
    Disconnect,
}

/// One PD protocol. The runner calls, for a request with a prefill instance:
/// [`prepare`](Self::prepare), then [`prefill_body`](Self::prefill_body) and
/// [`decode_body`](Self::decode_body) in its [`Shape`], then [`handed_over`](Self::handed_over)
/// once decode's head arrived, or [`release`](Self::release) when the prefill side failed.
pub trait PdProtocol: Sync {
    const SHAPE: Shape;

    /// Per-request setup the later phases read (ids, a KV reservation). Dropped when the legs
    /// end unless handed over or released: a state holding a resource frees it on drop too,
    /// since the request may be dropped at any await (client gone).
    type State: Send + Sync;

    /// A sequential prefill's answer: what the decode leg is built from. Concurrent protocols
    /// never get one (their decode leg is out before the prefill answers).
    type Answer: PrefillAnswer;

    /// Setup before any leg is sent (a reservation on decode, a lookup on the prefill's
    /// bootstrap server); its failure ends the attempt before either leg.
    fn prepare(
        &self,
        ctx: &LegContext<'_>,
        prefill: &Worker,
    ) -> impl Future<Output = Result<Self::State, LegError>> + Send;

    /// The prefill leg's body.
    fn prefill_body(&self, ctx: &LegContext<'_>, state: &Self::State) -> Bytes;

    /// The decode leg's body: from the prefill's answer (sequential, always `Some`), or from
    /// `state` (concurrent, `None`). A sequential protocol fails here, as the prefill's fault,
    /// when the answer lacks what the decode leg needs: a decode leg without the prefill's
    /// params would make the engine recompute silently.
    fn decode_body(
        &self,
        ctx: &LegContext<'_>,
        prefill: &Worker,
        state: &Self::State,
        answer: Option<&Self::Answer>,
    ) -> Result<Bytes, LegError>;

    /// The key under which a sequential prefill holds the request's KV until the decode reads
    /// it (pull-mode protocols), read from its answer. When the decode leg fails before its
    /// head (or the client leaves first), the runner calls that key off on the prefill
    /// (`POST /abort_request {"rid": key}`), so the blocks are not held until the engine's own
    /// timeout for a reader that is gone. Engines without that call answer 404 and keep their
    /// timeout.
    fn held_by_prefill(&self, _answer: &Self::Answer) -> Option<String> {
        None
    }

    /// The id both legs of a concurrent request carry, for the abort call to name.
    fn rid<'a>(&self, ctx: &'a LegContext<'_>, _state: &'a Self::State) -> &'a str {
        ctx.request_id
    }

    /// What a sequential prefill reported, for the scheduler; by default only how long it took.
    fn reported(&self, _answer: &Self::Answer, elapsed: Duration) -> Observed {
        Observed {
            prefill_ms: elapsed.as_secs_f64() * 1e3,
            ..Observed::default()
        }
    }

    /// The prefill side failed: free what `prepare` holds before the error is returned, so a
    /// retry may set up again under the same request id.
    fn release(&self, state: Self::State) -> impl Future<Output = ()> + Send {
        drop(state);
        std::future::ready(())
    }

    /// Decode's head arrived: the decode leg owns what `prepare` set up.
    fn handed_over(&self, _state: Self::State) {}
}

/// The wire of a sequential prefill leg, named by the type of its answer: where the leg is
/// posted and how the answer is read.
pub trait PrefillAnswer: Sized + Send + Sync {
    fn path(ctx: &LegContext<'_>) -> &'static str;

    /// Reads a successful response; `engine` names the prefill in errors.
    fn read(
        ctx: &LegContext<'_>,
        engine: &str,
        resp: crate::http1::Response,
    ) -> impl Future<Output = Result<Self, LegError>> + Send;

    /// The prompt's logprobs in the answer, to merge in front of decode's, when the client
    /// asked for them.
    fn prompt_logprobs(&self, _ctx: &LegContext<'_>) -> Option<PromptLogprobs> {
        None
    }
}
