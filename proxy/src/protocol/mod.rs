//! Engine PD protocols: how the legs of one request are sent to a (prefill, decode) pair, up to
//! the decode leg's response head. One file per protocol; the pipeline picks by the pool's
//! protocol and never needs to know a protocol's wire details. Shared types live in `types`,
//! below the protocols, so no protocol file imports this one.

pub mod abort;
pub mod legs;
pub mod logprobs;
pub mod native;
pub mod sglang;
pub mod trtllm;
pub mod types;
pub mod vllm_mooncake;
pub mod vllm_nixl;

pub use legs::{read_limited, unreachable, upstream_failure};
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
