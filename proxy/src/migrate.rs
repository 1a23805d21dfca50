//! Mid-stream migration: the client's body stream, which relays the decode leg and, when that
//! stream breaks after its head went out (engine gone, body cut, stalled past the deadline),
//! continues the answer on another pair instead of ending it with an error event. The
//! continuation is the request with the text streamed so far as its prompt's tail (see
//! `continuation`); its events are spliced in so the client reads one stream with one envelope,
//! one role chunk, one `usage` and one `[DONE]`.
//!
//! While a stream can still be migrated only whole SSE events go out, so a break never leaves
//! half an event in front of the continuation. How a pair is started is the pipeline's
//! ([`Restart`]); this module never schedules.

use crate::continuation::{self, Transcript};
use crate::error::ApiError;
use crate::metrics;
use crate::openai::ClientRequest;
use crate::relay::{Broken, Relay};
use crate::sse::Splitter;
use crate::state::AppState;
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use pdgate_scheduler::InstanceId;
use std::sync::Arc;
use std::time::Instant;

/// The most of one SSE event held back while waiting for its end; a larger event turns
/// migration off for the stream (its bytes go out as they come).
const MAX_PENDING_EVENT: usize = 1 << 20;

/// Starts a continuation on a fresh pair avoiding the given decodes, under the given leg id;
/// answers its relay and its decode.
pub type Restart = Box<
    dyn Fn(
            ClientRequest,
            Vec<InstanceId>,
            String,
        ) -> BoxFuture<'static, Result<(Relay, InstanceId), ApiError>>
        + Send
        + Sync,
>;

/// What a stream needs to be migrated.
pub struct Plan {
    pub state: Arc<AppState>,
    /// The client's request, as it arrived.
    pub req: ClientRequest,
    pub request_id: String,
    /// The decode serving the stream now.
    pub decode: InstanceId,
    /// The decode pool's PD protocol (some engines cannot continue a chat answer).
    pub protocol: crate::config::Protocol,
    pub restart: Restart,
    /// Migrations the stream may still take (`upstream.migration_limit`).
    pub left: u32,
}

/// The client's body: the relay of the current decode leg, and what migrating it takes.
pub struct Splice {
    relay: Relay,
    plan: Option<Plan>,
    /// Why this stream is not migrated, if it is not (its bytes then go out untouched).
    refused: Option<&'static str>,
    events: Splitter,
    transcript: Transcript,
    /// Decodes that broke this stream: the next pair avoids them.
    broke: Vec<InstanceId>,
}

impl Splice {
    /// `plan: None`: relayed as is, a break answered with the error event (nothing counted).
    pub fn new(relay: Relay, plan: Option<Plan>) -> Self {
        let kind = plan.as_ref().map(|p| p.req.kind);
        let refused = plan
            .as_ref()
            .and_then(|p| continuation::unsafe_reason(&p.req, p.protocol));
        Self {
            relay,
            plan,
            refused,
            events: Splitter::default(),
            transcript: Transcript::new(kind.unwrap_or(pdgate_wire::openai::ApiKind::Chat)),
            broke: Vec::new(),
        }
    }

    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        futures::stream::unfold(self, |mut s| async move {
            let chunk = s.next_chunk().await?;
            Some((Ok(chunk), s))
        })
    }

    /// Whole events only: the stream may still be continued.
    fn aligned(&self) -> bool {
        self.plan.is_some() && self.refused.is_none()
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            match self.relay.next().await {
                None => {
                    let rest = self.events.take_rest();
                    return (!rest.is_empty()).then_some(rest);
                }
                Some(Ok(chunk)) if !self.aligned() => return Some(chunk),
                Some(Ok(chunk)) => {
                    let mut out = BytesMut::new();
                    for event in self.events.push(&chunk) {
                        out.extend_from_slice(&self.transcript.pass(event));
                    }
                    if self.events.pending() > MAX_PENDING_EVENT {
                        self.refused = Some("event_too_large");
                        out.extend_from_slice(&self.events.take_rest());
                    }
                    if !out.is_empty() {
                        return Some(out.freeze());
                    }
                }
                Some(Err(broken)) => match self.migrate(broken).await {
                    Ok(()) => continue,
                    Err(event) => return Some(event),
                },
            }
        }
    }

    /// Continues the broken stream on another pair; `Err`: the event that ends the client's
    /// stream instead.
    async fn migrate(&mut self, broken: Broken) -> Result<(), Bytes> {
        let Some(plan) = self.plan.as_mut() else {
            return Err(broken.event());
        };
        let rid = plan.request_id.as_str();
        if let Some(reason) = self.refused.or(self.transcript.blocker()) {
            let outcome = if reason == "finished" {
                "finished"
            } else {
                "refused_unsafe"
            };
            metrics::migration(outcome);
            tracing::warn!(request_id = %rid, reason, "decode stream broke; not migrated");
            return Err(broken.event());
        }
        if plan.left == 0 {
            metrics::migration("limit");
            tracing::warn!(request_id = %rid, "decode stream broke; migration_limit reached");
            return Err(broken.event());
        }
        plan.left -= 1;
        let text = self.transcript.text();
        let emitted = u32::try_from(plan.req.model.tokenizer.count(text)).unwrap_or(u32::MAX);
        let Some(next) = continuation::request(&plan.req, text, emitted) else {
            metrics::migration("finished");
            return Err(broken.event());
        };
        self.broke.push(plan.decode);
        let leg_id = format!("{rid}-m{}", self.broke.len());
        tracing::warn!(
            request_id = %rid,
            leg_id = %leg_id,
            emitted_tokens = emitted,
            remaining_tokens = next.max_tokens,
            cause = %broken.0,
            "decode stream broke mid-response; continuing it on another decode"
        );
        let began = Instant::now();
        match (plan.restart)(next, self.broke.clone(), leg_id).await {
            Ok((relay, decode)) => {
                metrics::migration("ok");
                metrics::migration_gap(began.elapsed());
                self.relay = relay;
                plan.decode = decode;
                // A partial event of the broken stream never reached the client.
                self.events = Splitter::default();
                self.transcript.continue_after(emitted);
                Ok(())
            }
            Err(e) => {
                let outcome = if e.code == Some("retry_budget_exhausted") {
                    "budget_exhausted"
                } else {
                    "failed"
                };
                metrics::migration(outcome);
                tracing::warn!(request_id = %rid, error = %e.message, "migration failed");
                Err(Broken(format!(
                    "{}; continuing on another decode failed: {}",
                    broken.0, e.message
                ))
                .event())
            }
        }
    }
}
