//! Engine PD protocols: how the legs of one request are sent to a (prefill, decode) pair, up to
//! the decode leg's response head. Each protocol is one [`PdProtocol`] (its data: bodies, shape,
//! how the prefill's answer feeds the decode) in a file of its own; [`runner`] executes the
//! phases of any of them. The pipeline picks by the pool's protocol and never needs to know a
//! protocol's wire details.
//!
//! Layers, each file importing only from those below it: `types`, `abort`, `logprobs`; `phases`
//! (the trait); `legs` (I/O); `runner`; the protocols; this file (dispatch).

pub mod abort;
pub mod legs;
pub mod logprobs;
pub mod native;
pub mod phases;
pub mod runner;
pub mod sglang;
pub mod trtllm;
pub mod types;
pub mod vllm_mooncake;
pub mod vllm_nixl;

pub use legs::{read_limited, unreachable, upstream_failure};
pub use phases::{Abort, PdProtocol, Shape};
pub use types::{DecodeBody, DecodeStart, LegContext, LegError};

use crate::config::Protocol;
use pdgate_scheduler::Observed;

/// Runs the legs; `on_prefill_done` is called once the prefill (and its KV handoff) finished,
/// with what was measured.
pub async fn run_legs(
    protocol: Protocol,
    ctx: &LegContext<'_>,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let Some(prefill) = ctx.prefill else {
        return runner::decode_local(ctx, on_prefill_done).await;
    };
    // Static dispatch: each arm is the runner specialised to one protocol, no boxing.
    match protocol {
        Protocol::Native => runner::run(&native::Native, ctx, prefill, on_prefill_done).await,
        Protocol::VllmNixl => {
            runner::run(&vllm_nixl::VllmNixl, ctx, prefill, on_prefill_done).await
        }
        Protocol::VllmMooncake => {
            runner::run(&vllm_mooncake::VllmMooncake, ctx, prefill, on_prefill_done).await
        }
        Protocol::Sglang => runner::run(&sglang::Sglang, ctx, prefill, on_prefill_done).await,
        Protocol::Trtllm => runner::run(&trtllm::Trtllm, ctx, prefill, on_prefill_done).await,
    }
}
