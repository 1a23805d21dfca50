//! Relays the decode leg's body to the client chunk by chunk, without re-buffering: the upstream
//! stream is polled only when the client's connection asks for more, so backpressure reaches the
//! engine, and dropping the relay (client gone) drops the upstream connection, which aborts the
//! decode and frees its KV. An upstream failure after bytes went out is handed on as [`Broken`]
//! (`migrate` continues the answer elsewhere, or turns it into one SSE error event).
//!
//! The relay also judges the decode worker: a body that ended properly (an SSE stream with its
//! closing `data: [DONE]`, any other body at its end) is its success; a body error, a stall or
//! an SSE stream that stopped without `[DONE]` is its failure; a relay dropped before the end
//! (client gone, or too slow to read) says nothing about it.

use crate::booking::{Booking, Verdict};
use crate::breaker::Outcome;
use crate::error::ApiError;
use crate::protocol::abort::AbortGuard;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use pdgate_scheduler::Role;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;

/// A decode leg's body as it arrives.
pub type Upstream = Pin<Box<dyn Stream<Item = Result<Bytes, crate::http1::Error>> + Send>>;

/// The last bytes of a body: enough to tell whether an SSE stream ended with `data: [DONE]`.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    const DONE: &'static [u8] = b"data: [DONE]";
    const KEEP: usize = 32;

    fn push(&mut self, chunk: &[u8]) {
        self.0
            .extend_from_slice(&chunk[chunk.len().saturating_sub(Self::KEEP)..]);
        let excess = self.0.len().saturating_sub(Self::KEEP);
        self.0.drain(..excess);
    }

    fn done(&self) -> bool {
        self.0.trim_ascii_end().ends_with(Self::DONE)
    }
}

/// The decode stream broke after its head went out: why.
#[derive(Debug, Clone)]
pub struct Broken(pub String);

impl Broken {
    /// The one SSE event a client gets when its stream broke and was not continued.
    pub fn event(&self) -> Bytes {
        let err = ApiError::upstream("decode_stream_interrupted", self.0.clone());
        Bytes::from(format!("\n\ndata: {}\n\n", err.body()))
    }
}

pub struct Relay {
    upstream: Upstream,
    booking: Option<Booking>,
    /// The decode worker's breaker verdict, given at the end of the body.
    verdict: Option<Verdict>,
    /// The body is SSE: it must end with `data: [DONE]`.
    sse: bool,
    tail: Tail,
    started: Instant,
    /// The first token's latency is measured (not for a continuation: the client's first
    /// token came from the decode before it).
    first_seen: bool,
    request_id: String,
    stall: Stall,
    abort_on_drop: Option<AbortGuard>,
}

/// The stall deadline: how long the upstream may keep the relay waiting with nothing to send.
/// Only time spent waiting on the upstream counts (a client slow to read is the write
/// deadline's business), and the timer is re-armed lazily, once per deadline at most, not per
/// chunk: a streamed answer is many small chunks.
struct Stall {
    limit: Duration,
    /// When the current wait on the upstream began; `None` while data flows.
    waiting_since: Option<tokio::time::Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            waiting_since: None,
            timer: None,
        }
    }

    fn data_came(&mut self) {
        self.waiting_since = None;
    }

    /// The upstream had nothing: `true` once it has had nothing for the whole limit.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let due = *self
            .waiting_since
            .get_or_insert_with(tokio::time::Instant::now)
            + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            // Fired: at this wait's deadline, or at one left from an earlier wait (re-armed).
            if timer.deadline() >= due {
                return true;
            }
            timer.as_mut().reset(due);
        }
    }
}

/// What a relay holds for its request besides the body.
pub struct Held {
    pub booking: Booking,
    /// The decode worker's breaker verdict, given at the end of the body.
    pub verdict: Verdict,
    pub started: Instant,
    pub request_id: String,
    /// See [`Stall`].
    pub stall_limit: Duration,
    /// This relay continues a stream another relay began (its time to first token was taken).
    pub continuation: bool,
    /// Aborts the engines' legs if the relay is dropped before the upstream ended (client
    /// gone, or the upstream stalled).
    pub abort_on_drop: Option<AbortGuard>,
}

impl Relay {
    pub fn new(upstream: Upstream, sse: bool, held: Held) -> Self {
        Self {
            upstream,
            booking: Some(held.booking),
            verdict: Some(held.verdict),
            sse,
            tail: Tail::default(),
            started: held.started,
            first_seen: held.continuation,
            request_id: held.request_id,
            stall: Stall::new(held.stall_limit),
            abort_on_drop: held.abort_on_drop,
        }
    }

    /// The upstream ended (properly or not): nothing is left on the engines to abort.
    fn upstream_ended(&mut self) {
        if let Some(g) = self.abort_on_drop.as_mut() {
            g.disarm();
        }
    }

    /// The verdict is given once, at the body's end: taken, it marks the relay finished.
    fn finished(&self) -> bool {
        self.verdict.is_none()
    }

    fn finish(&mut self, outcome: Outcome) {
        let counted = if matches!(outcome, Outcome::Success) {
            "ok"
        } else {
            "error"
        };
        crate::metrics::leg(Role::Decode, counted);
        if let Some(v) = self.verdict.take() {
            v.record(outcome);
        }
        self.booking.take();
    }

    fn ended_properly(&self) -> bool {
        !self.sse || self.tail.done()
    }

    /// The decode stream broke after bytes went out: the decode's failure.
    fn interrupted(&mut self, why: String) -> Broken {
        tracing::warn!(request_id = %self.request_id, error = %why, "decode stream broke mid-response");
        self.finish(Outcome::Failure);
        Broken(why)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.finished() {
            // The client left before the body's end: nothing is known of the engine.
            crate::metrics::leg(Role::Decode, "cancelled");
        }
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, Broken>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished() {
            return Poll::Ready(None);
        }
        match self.upstream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.stall.data_came();
                if !self.first_seen {
                    self.first_seen = true;
                    let ttft = self.started.elapsed();
                    crate::metrics::first_token(ttft);
                    if let Some(b) = &self.booking {
                        crate::metrics::ttft_prediction_error(ttft, b.decision.predicted_ttft_ms);
                    }
                }
                if self.sse {
                    self.tail.push(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.upstream_ended();
                let broken = self.interrupted(format!("decode engine stream ended early: {e}"));
                Poll::Ready(Some(Err(broken)))
            }
            Poll::Ready(None) if self.ended_properly() => {
                self.upstream_ended();
                self.finish(Outcome::Success);
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.upstream_ended();
                let broken =
                    self.interrupted("decode engine stream ended without `data: [DONE]`".into());
                Poll::Ready(Some(Err(broken)))
            }
            Poll::Pending if self.stall.poll_stalled(cx) => {
                let limit = self.stall.limit;
                let broken = self.interrupted(format!("decode engine sent nothing for {limit:?}"));
                Poll::Ready(Some(Err(broken)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_is_found_across_chunks_and_only_at_the_end() {
        let done = |chunks: &[&str]| {
            let mut t = Tail::default();
            chunks.iter().for_each(|c| t.push(c.as_bytes()));
            t.done()
        };
        assert!(done(&["data: {\"x\": 1}\n\ndata: [DO", "NE]\n\n"]));
        assert!(done(&[&"x".repeat(100), "data: [DONE]\n\n"]));
        assert!(!done(&["data: [DONE]\n\n", "data: {\"late\": true}\n\n"]));
        assert!(!done(&["data: {\"x\": 1}\n\n"]));
    }

    /// Whether the stall deadline has passed, polled once.
    async fn stalled_now(stall: &mut Stall) -> bool {
        futures::future::poll_fn(|cx| Poll::Ready(stall.poll_stalled(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_counts_from_the_start_of_the_current_wait_only() {
        let mut stall = Stall::new(Duration::from_secs(2));
        assert!(!stalled_now(&mut stall).await, "a wait begins");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!stalled_now(&mut stall).await);
        stall.data_came();
        assert!(
            !stalled_now(&mut stall).await,
            "a new wait begins, 1.5 s in"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !stalled_now(&mut stall).await,
            "the first wait's deadline passed, not this one's"
        );
        let waiting = tokio::time::Instant::now();
        futures::future::poll_fn(|cx| {
            if stall.poll_stalled(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let waited = waiting.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1010),
            "3.5 s in, 2 s after the data: {waited:?}"
        );
    }
}
