//! Relays the decode leg's body to the client chunk by chunk, without re-buffering: the upstream
//! stream is polled only when the client's connection asks for more, so backpressure reaches the
//! engine, and dropping the relay (client gone) drops the upstream connection, which aborts the
//! decode and frees its KV. An upstream failure after bytes went out becomes one SSE error event.

use crate::booking::Booking;
use crate::error::ApiError;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

type Upstream = Pin<Box<dyn Stream<Item = Result<Bytes, crate::upstream::Error>> + Send>>;

pub struct Relay {
    upstream: Upstream,
    booking: Option<Booking>,
    started: Instant,
    first_seen: bool,
    finished: bool,
    request_id: String,
}

impl Relay {
    pub fn new(upstream: Upstream, booking: Booking, started: Instant, request_id: String) -> Self {
        Self {
            upstream,
            booking: Some(booking),
            started,
            first_seen: false,
            finished: false,
            request_id,
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        self.booking.take();
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.upstream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if !self.first_seen {
                    self.first_seen = true;
                    let ttft = self.started.elapsed();
                    crate::metrics::first_token(ttft);
                    if let Some(b) = &self.booking {
                        crate::metrics::ttft_prediction_error(ttft, b.decision.predicted_ttft_ms);
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(request_id = %self.request_id, error = %e, "decode stream broke mid-response");
                self.finish();
                let err = ApiError::upstream(
                    "decode_stream_interrupted",
                    format!("decode engine stream ended early: {e}"),
                );
                Poll::Ready(Some(Ok(Bytes::from(format!(
                    "\n\ndata: {}\n\n",
                    err.body()
                )))))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
