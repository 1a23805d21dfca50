//! The request path, top to bottom: parse → key → schedule → legs → stream → account.
//!
//! Retries happen only before any byte reached the client: a failed prefill is retried on
//! another prefill instance (with a fresh pair), never a decode that already streamed. Each leg's
//! outcome feeds its own worker's circuit breaker; open breakers are avoided when scheduling.
//! The decode-only fallback (off by default) is the one place a request runs without the
//! disaggregated prefill it was scheduled for, and it always says so on the response.
//! A batched completions prompt takes [`route`] once per prompt (`batch`); `inference` parses a
//! request and sends it here or there.

use crate::booking::{Booking, Verdict};
use crate::breaker::Outcome;
use crate::error::ApiError;
use crate::metrics;
use crate::openai::ClientRequest;
use crate::protocol::{self, DecodeBody, DecodeStart, LegContext, LegError};
use crate::relay::{Held, Relay};
use crate::retry::RetryPermit;
use crate::state::AppState;
use crate::workers::Worker;
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use pdgate_scheduler::{InstanceId, Rejection, RequestKey, Role};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

/// One in-flight slot, or 503 at once: the gateway never queues requests itself.
pub fn in_flight_permit(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    if state.is_draining() {
        metrics::rejected("draining");
        return Err(ApiError::unavailable(
            "gateway_draining",
            "the gateway is shutting down; retry on another replica",
        ));
    }
    Arc::clone(&state.in_flight)
        .try_acquire_owned()
        .map_err(|_| {
            metrics::rejected("gateway_full");
            ApiError::unavailable(
                "gateway_overloaded",
                "too many requests in flight; retry shortly",
            )
        })
}

/// One parsed request from key to the relayed response; each prompt of a batch takes it on its
/// own, under its own request id. The permit lives as long as the response body.
pub async fn route(
    state: &Arc<AppState>,
    req: &ClientRequest,
    request_id: &str,
    started: Instant,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let key = prefix_key(state, req).await;
    // Prefills that failed this request: not tried again, and they count against the attempts.
    let mut failed: Vec<InstanceId> = Vec::new();
    // Workers whose half-open breaker's one probe another request claimed first: skipped, free.
    let mut contested: Vec<InstanceId> = Vec::new();
    let attempts = state.cfg.upstream.prefill_attempts.max(1) as usize;
    // Decodes that failed this request before its first byte: avoided by the next pair.
    let mut decode_failed: Vec<InstanceId> = Vec::new();
    let decode_attempts = state.cfg.upstream.decode_attempts.max(1) as usize;
    // The retry under way, if this attempt is one: held until the request is answered.
    let mut _retry: Option<RetryPermit> = None;
    // The failure of the decode being retried, answered if no other pair can be scheduled.
    let mut decode_cause: Option<ApiError> = None;
    // The last pair whose prefill failed, for the decode-only fallback (when enabled).
    let mut last_failed: Option<(Booking, Arc<Worker>, ApiError)> = None;
    loop {
        let mut avoid: Vec<InstanceId> = failed
            .iter()
            .chain(&contested)
            .chain(&decode_failed)
            .copied()
            .collect();
        state.fleet.workers.add_tripped(state.now(), &mut avoid);
        let booking = match schedule(state, &key, &avoid) {
            Ok(b) => b,
            Err(r) => {
                return match (r, last_failed.take()) {
                    // Every prefill left has failed this request (or is cut off by its breaker).
                    (Rejection::NoHealthy(Role::Prefill), Some((booking, decode, cause))) => {
                        let f = Fallback {
                            req,
                            request_id,
                            prompt_tokens: key.prompt_tokens,
                            started,
                        };
                        fallback(state, f, booking, decode, cause, permit).await
                    }
                    // A decode retry with no other decode to go to: the decode's own failure
                    // says more than "no healthy pair".
                    (r, _) => Err(decode_cause.take().unwrap_or_else(|| rejection_error(r))),
                };
            }
        };
        let decision = booking.decision;
        let decode = state.fleet.workers.get(decision.decode);
        let prefill = decision.prefill.map(|id| state.fleet.workers.get(id));
        let (Some(decode), Some(prefill)) = (decode, prefill.map_or(Some(None), |p| p.map(Some)))
        else {
            // Removed between the pick and here: pick again without it (each pass avoids more,
            // so this ends).
            contested.push(decision.decode);
            contested.extend(decision.prefill);
            continue;
        };
        if let Err(id) = claim_pair(state, prefill.as_deref(), &decode) {
            contested.push(id);
            continue;
        }
        // A new pair is under way: the failed one's booking is released, not held alongside.
        last_failed = None;
        tracing::info!(
            prefill = prefill.as_ref().map_or("(local)", |p| p.url.as_str()),
            decode = %decode.url,
            prompt_tokens = key.prompt_tokens,
            cached_blocks = decision.cached_blocks,
            predicted_ttft_ms = decision.predicted_ttft_ms,
            "scheduled"
        );
        let ctx = LegContext {
            state,
            request_id,
            req,
            prompt_tokens: key.prompt_tokens,
            prefill: prefill.as_deref(),
            decode: &decode,
        };
        let verdicts = (
            prefill
                .as_ref()
                .map(|p| Verdict::new(&state.fleet, state.cfg.breaker, p)),
            Verdict::new(&state.fleet, state.cfg.breaker, &decode),
        );
        let result = protocol::run_legs(decode.protocol, &ctx, |observed| {
            booking.prefill_done(observed)
        })
        .await;
        match account_breakers(verdicts, result) {
            Ok((start, decode_verdict)) => {
                let served = Served {
                    booking,
                    verdict: decode_verdict,
                    started,
                    request_id,
                    permit,
                };
                return Ok(respond(
                    req,
                    start,
                    served,
                    state.cfg.upstream.decode_stall_timeout_ms,
                ));
            }
            Err(LegError {
                role: Role::Prefill,
                retryable: true,
                error,
            }) => {
                failed.extend(decision.prefill);
                if failed.len() < attempts {
                    let Some(permit) = state.retries.try_acquire(state.requests_in_flight()) else {
                        metrics::retry(Role::Prefill, "budget_exhausted");
                        return Err(budget_exhausted(error));
                    };
                    _retry = Some(permit);
                    tracing::warn!(message = %error.message, "prefill failed; retrying on another instance");
                    metrics::retry(Role::Prefill, "retried");
                    if state.cfg.upstream.fallback_to_decode {
                        last_failed = Some((booking, decode, error));
                    }
                    continue;
                }
                if state.cfg.upstream.fallback_to_decode {
                    let f = Fallback {
                        req,
                        request_id,
                        prompt_tokens: key.prompt_tokens,
                        started,
                    };
                    return fallback(state, f, booking, decode, error, permit).await;
                }
                return Err(error);
            }
            Err(LegError {
                role: Role::Decode,
                retryable: true,
                error,
            }) => {
                decode_failed.push(decision.decode);
                if decode_failed.len() >= decode_attempts {
                    return Err(error);
                }
                let Some(permit) = state.retries.try_acquire(state.requests_in_flight()) else {
                    metrics::retry(Role::Decode, "budget_exhausted");
                    return Err(budget_exhausted(error));
                };
                _retry = Some(permit);
                tracing::warn!(message = %error.message, decode = %decode.url, "decode failed before its first byte; retrying with another pair");
                metrics::retry(Role::Decode, "retried");
                decode_cause = Some(error);
            }
            Err(e) => return Err(e.error),
        }
    }
}

/// A request that failed where a retry was due, but the fleet's retry budget is spent: 503 at
/// once with `Retry-After`, saying what failed.
fn budget_exhausted(cause: ApiError) -> ApiError {
    ApiError::unavailable(
        "retry_budget_exhausted",
        format!("{}; not retried: too many retries under way", cause.message),
    )
}

/// Claims the breakers of a scheduled pair; `Err(id)`: that worker's half-open probe is taken.
fn claim_pair(
    state: &AppState,
    prefill: Option<&Worker>,
    decode: &Worker,
) -> Result<(), InstanceId> {
    let now = state.now();
    if !state.fleet.workers.claim(decode, now) {
        return Err(decode.id);
    }
    if let Some(p) = prefill {
        if !state.fleet.workers.claim(p, now) {
            // Give back the decode's claim (its probe, if half-open): it served nothing.
            state
                .fleet
                .workers
                .record(decode, Outcome::Unknown, now, &state.cfg.breaker);
            return Err(p.id);
        }
    }
    Ok(())
}

/// Feeds each leg's outcome to its own worker's breaker: the failed leg is the failure; the
/// other leg's fate is unknown (a decode aborted because its prefill failed did nothing wrong),
/// and a request the engine refused as invalid says nothing about either engine. A decode that
/// sent its head is not judged yet: its verdict is returned for the relay, which gives it at
/// the end of the body (a stream cut mid-way is that decode's failure).
fn account_breakers(
    (prefill, decode): (Option<Verdict>, Verdict),
    result: Result<DecodeStart, LegError>,
) -> Result<(DecodeStart, Verdict), LegError> {
    let (p, d) = match &result {
        Ok(_) => (Outcome::Success, Outcome::Unknown),
        Err(e) if !e.retryable => (Outcome::Unknown, Outcome::Unknown),
        Err(e) if e.role == Role::Prefill => (Outcome::Failure, Outcome::Unknown),
        Err(_) => (Outcome::Unknown, Outcome::Failure),
    };
    if let Some(prefill) = prefill {
        prefill.record(p);
    }
    match result {
        Ok(start) => Ok((start, decode)),
        Err(e) => {
            decode.record(d);
            Err(e)
        }
    }
}

/// What the decode-only fallback needs of the request.
struct Fallback<'a> {
    req: &'a ClientRequest,
    request_id: &'a str,
    prompt_tokens: u32,
    started: Instant,
}

/// Every prefill attempt failed before any byte reached the client: the plain request goes to
/// the last pair's decode instance, which prefills it itself. Marked on the response
/// (`x-pdgate-fallback: decode-prefill`), counted and logged: never silent.
async fn fallback(
    state: &Arc<AppState>,
    f: Fallback<'_>,
    booking: Booking,
    decode: Arc<Worker>,
    cause: ApiError,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    if !state.fleet.workers.claim(&decode, state.now()) {
        return Err(cause);
    }
    tracing::warn!(decode = %decode.url, cause = %cause.message, "every prefill failed; decode prefills the request itself (fallback_to_decode)");
    metrics::fallback();
    // Its prefill never ran: release that load; the decode stays booked for the stream.
    booking.prefill_done(None);
    let ctx = LegContext {
        state,
        request_id: f.request_id,
        req: f.req,
        prompt_tokens: f.prompt_tokens,
        prefill: None,
        decode: &decode,
    };
    let verdicts = (None, Verdict::new(&state.fleet, state.cfg.breaker, &decode));
    let result = protocol::run_legs(decode.protocol, &ctx, |_| {}).await;
    let (start, verdict) = account_breakers(verdicts, result).map_err(|e| e.error)?;
    let served = Served {
        booking,
        verdict,
        started: f.started,
        request_id: f.request_id,
        permit,
    };
    let stall_ms = state.cfg.upstream.decode_stall_timeout_ms;
    let mut resp = respond(f.req, start, served, stall_ms);
    resp.headers_mut()
        .insert(FALLBACK_HEADER, HeaderValue::from_static("decode-prefill"));
    Ok(resp)
}

/// Marks a response the decode instance prefilled itself because every prefill failed.
pub const FALLBACK_HEADER: &str = "x-pdgate-fallback";

/// Tokenises the whole rendered prompt and cuts it into chained block hashes. A real tokenizer
/// takes ~2 ms per 1,000 tokens (measured in the scheduler's bench), so it runs on the blocking
/// pool rather than stalling the connections sharing this worker thread.
async fn prefix_key(state: &Arc<AppState>, req: &ClientRequest) -> RequestKey {
    let tokens = if matches!(state.tokenizer, pdgate_scheduler::Tokenizer::Builtin) {
        state.tokenizer.encode(&req.prompt)
    } else {
        let (state, prompt) = (Arc::clone(state), req.prompt.clone());
        match tokio::task::spawn_blocking(move || state.tokenizer.encode(&prompt)).await {
            Ok(tokens) => tokens,
            Err(_) => pdgate_scheduler::BuiltinTokenizer.encode(&req.prompt),
        }
    };
    RequestKey {
        prompt_tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
        max_tokens: req.max_tokens,
        blocks: state.hasher.full_blocks(&tokens),
    }
}

fn schedule(
    state: &Arc<AppState>,
    key: &RequestKey,
    avoid: &[InstanceId],
) -> Result<Booking, Rejection> {
    let began = Instant::now();
    let result = state
        .fleet
        .scheduler
        .lock()
        .schedule_avoiding(key, state.now(), avoid);
    metrics::decision(
        state.cfg.scheduler.policy.as_str(),
        began.elapsed(),
        &result,
    );
    let mut booking = Booking::new(Arc::clone(&state.fleet), result?);
    booking.share(&key.blocks);
    Ok(booking)
}

/// The client's answer to a scheduling rejection: 503 when nothing can serve, 400 when nothing
/// ever could, 429 admission.
fn rejection_error(r: Rejection) -> ApiError {
    metrics::rejected(r.label());
    match r {
        Rejection::NoHealthy(role) => ApiError::unavailable(
            "no_healthy_pair",
            format!("no healthy {role} instance is available"),
        ),
        too_large @ Rejection::TooLarge { .. } => {
            ApiError::invalid("max_tokens", too_large.to_string())
        }
        other => ApiError::rejected(other.label(), other.to_string(), other.retry_after_secs()),
    }
}

/// What a request that reached its decode's head holds until its relay ends.
struct Served<'a> {
    booking: Booking,
    /// The decode worker's breaker verdict, given by the relay.
    verdict: Verdict,
    started: Instant,
    request_id: &'a str,
    permit: OwnedSemaphorePermit,
}

/// Relays the decode leg to the client: streamed as it arrives, or as one JSON body.
fn respond(req: &ClientRequest, start: DecodeStart, served: Served<'_>, stall_ms: u64) -> Response {
    let DecodeBody {
        content_type,
        body: upstream,
        sse,
        abort_on_drop,
    } = start.into_body();
    let content_type = content_type.unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let Served {
        booking,
        verdict,
        started,
        request_id,
        permit,
    } = served;
    let held = Held {
        booking,
        verdict,
        started,
        request_id: request_id.to_string(),
        stall_limit: Duration::from_millis(stall_ms),
        // Dropped before the upstream ended (client gone, upstream stalled), it aborts the
        // engines' legs.
        abort_on_drop,
    };
    let relay = Relay::new(upstream, sse, held);
    // The permit lives as long as the body, so a long stream counts as in flight.
    let body = relay.map(move |item| {
        let _keep = &permit;
        item
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    if req.stream {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    resp
}
