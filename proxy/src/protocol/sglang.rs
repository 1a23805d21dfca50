//! SGLang PD: the same body, with `bootstrap_host`, `bootstrap_port`, `bootstrap_room` (random
//! in [0, 2^63)) and `rid` (our request id, so either leg can be aborted), goes to prefill and
//! decode at once (the runner's concurrent shape). The client gets decode's response **as soon
//! as decode's head arrives**; the prefill answer is drained in the background. If either leg
//! fails, the other is aborted (`POST /abort_request {"rid"}`) and the client gets one error
//! naming the failed leg; a client that leaves aborts both.
//!
//! One exception: a completions request with `echo` + `logprobs` wants the prompt's logprobs,
//! which only the prefill computed. Then the prefill's answer is awaited too (a prefill failing
//! then is retried elsewhere like any other: no byte reached the client) and its prompt logprobs
//! are merged in front of decode's (`logprobs.rs`). SGLang's router waits for the prefill
//! whenever `logprobs` is set and merges only the native `/generate` shape
//! (`meta_info.input_token_logprobs`); without `echo` the prefill has nothing to add, so we
//! don't wait.
//!
//! A batched prompt reaches this adapter one prompt at a time (`batch`), so room, host and port
//! are scalars here.

use super::legs::overlay;
use super::phases::{Abort, PdProtocol, Shape};
use super::types::{LegContext, LegError};
use crate::workers::Worker;
use bytes::Bytes;
use serde_json::Value;

pub struct Sglang;

/// One attempt's bootstrap room: the id its legs carry, and the body both are sent.
pub struct Room {
    rid: String,
    body: Bytes,
}

impl PdProtocol for Sglang {
    const SHAPE: Shape = Shape::Concurrent { abort: Abort::Call };
    type State = Room;
    type Answer = Value;

    async fn prepare(&self, ctx: &LegContext<'_>, prefill: &Worker) -> Result<Room, LegError> {
        let room = room();
        // One rid per attempt: an abort sent for a failed attempt must not hit its retry.
        let rid = format!("{}-{room:x}", ctx.request_id);
        let fields = [
            (
                "bootstrap_host",
                Value::from(prefill.bootstrap_host.as_str()),
            ),
            ("bootstrap_port", Value::from(prefill.bootstrap_port)),
            ("bootstrap_room", Value::from(room)),
            ("rid", Value::from(rid.as_str())),
        ];
        // Both legs get the same bytes: serialised once, shared by reference count.
        let body = overlay(&ctx.req.body, &fields, &[]);
        Ok(Room { rid, body })
    }

    fn prefill_body(&self, _: &LegContext<'_>, room: &Room) -> Bytes {
        room.body.clone()
    }

    fn decode_body(
        &self,
        _: &LegContext<'_>,
        _: &Worker,
        room: &Room,
        _: Option<&Value>,
    ) -> Result<Bytes, LegError> {
        Ok(room.body.clone())
    }

    fn rid<'a>(&self, _: &'a LegContext<'_>, room: &'a Room) -> &'a str {
        &room.rid
    }
}

/// A random bootstrap room in [0, 2^63).
pub fn room() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_room_range() {
        use crate::workers::host_port;
        assert_eq!(
            host_port("http://10.0.0.1:30000"),
            ("10.0.0.1".into(), 30000)
        );
        assert_eq!(host_port("http://p.svc/"), ("p.svc".into(), 80));
        assert!((0..64).map(|_| room()).all(|r| r < 1 << 63));
    }
}
