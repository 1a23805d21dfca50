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
use crate::fleet::Fleet;
use crate::metrics;
use crate::migrate::{Plan, Restart, Splice};
use crate::openai::ClientRequest;
use crate::protocol::{self, DecodeBody, DecodeStart, LegContext, LegError};
use crate::relay::{Held, Relay};
use crate::retry::{RetryPermit, RoomWait};
use crate::room_line::Place;
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
    let leg = start_leg(state, req, request_id, &[]).await?;
    Ok(respond(state, req, request_id, started, leg, permit))
}

/// A decode leg whose head arrived, ready for the relay.
struct Leg {
    start: DecodeStart,
    booking: Booking,
    /// The decode worker's breaker verdict, given by the relay.
    verdict: Verdict,
    decode: InstanceId,
    protocol: crate::config::Protocol,
    /// The decode prefilled the request itself (`fallback_to_decode`).
    fallback: bool,
}

/// Schedules a pair avoiding `avoid_decodes` and runs its legs up to the decode's head,
/// retrying failed legs on fresh pairs while nothing reached the client.
async fn start_leg(
    state: &Arc<AppState>,
    req: &ClientRequest,
    request_id: &str,
    avoid_decodes: &[InstanceId],
) -> Result<Leg, ApiError> {
    let key = prefix_key(req).await;
    // The model's own engines and scheduler: a request never leaves the model it named.
    let fleet = &req.model.fleet;
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
    let room_wait = Duration::from_secs_f64(req.model.scheduler.slo.room_wait_ms.max(0.0) / 1e3);
    // The wait for a decode with KV room when every pool is booked full; a retry waits anew.
    let mut room = RoomWait::new(room_wait);
    // This request's place in the model's line of new requests waiting for room, once it has one.
    let mut place: Option<Place<'_>> = None;
    loop {
        let mut avoid: Vec<InstanceId> = failed
            .iter()
            .chain(&contested)
            .chain(&decode_failed)
            .chain(avoid_decodes)
            .copied()
            .collect();
        fleet.workers.add_tripped(fleet.now(), &mut avoid);
        // A request already admitted (a retry, a migration) is not judged on its TTFT again.
        let admitted = decode_cause.is_some() || !avoid_decodes.is_empty();
        if let Some(p) = place.as_mut() {
            if !p.reach_head(room.deadline()).await {
                return Err(rejection_error(Rejection::KvFull));
            }
        }
        let waited = if admitted {
            Duration::ZERO
        } else {
            room.waited()
        };
        let booking = match schedule(req, &key, &avoid, waited, room.is_open()) {
            Ok(b) => {
                if let Some(p) = place.take() {
                    p.served();
                }
                b
            }
            Err(Rejection::KvFull) => {
                if !admitted && place.is_none() {
                    place = Some(join_line(req, &key, &mut room)?);
                }
                // Streams ending on a full decode free room within moments: wait for it.
                if let Some(pause) = room.pause() {
                    tokio::time::sleep(pause).await;
                    continue;
                }
                let mut refusal = rejection_error(Rejection::KvFull);
                if let Some(cause) = decode_cause.take() {
                    refusal.message = format!("{}; {}", cause.message, refusal.message);
                }
                return Err(refusal);
            }
            Err(r) => {
                return match (r, last_failed.take()) {
                    // Every prefill left has failed this request (or is cut off by its breaker).
                    (Rejection::NoHealthy(Role::Prefill), Some((booking, decode, cause))) => {
                        let f = Fallback {
                            req,
                            request_id,
                            prompt_tokens: key.prompt_tokens,
                        };
                        fallback(state, f, booking, decode, cause).await
                    }
                    // A decode retry with no other decode to go to: the decode's own failure
                    // says more than "no healthy pair".
                    (r, _) => Err(decode_cause.take().unwrap_or_else(|| rejection_error(r))),
                };
            }
        };
        let decision = booking.decision;
        let decode = fleet.workers.get(decision.decode);
        let prefill = decision.prefill.map(|id| fleet.workers.get(id));
        let (Some(decode), Some(prefill)) = (decode, prefill.map_or(Some(None), |p| p.map(Some)))
        else {
            // Removed between the pick and here: pick again without it (each pass avoids more,
            // so this ends).
            contested.push(decision.decode);
            contested.extend(decision.prefill);
            continue;
        };
        if let Err(id) = claim_pair(state, fleet, prefill.as_deref(), &decode) {
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
            pull_upto_blocks = decision.pull.map_or(0, |p| p.upto_blocks),
            predicted_pull_ms = decision.pull.map_or(0.0, |p| p.ms),
            predicted_ttft_ms = decision.predicted_ttft_ms,
            late = decision.late,
            evict_first = decision.evict_first.map_or("none", Role::as_str),
            "scheduled"
        );
        let ctx = LegContext {
            state,
            request_id,
            req,
            prompt_tokens: key.prompt_tokens,
            prefill: prefill.as_deref(),
            decode: &decode,
            pull: pull_from(fleet, &decision),
            evict_first: decision.evict_first,
        };
        if let Some(side) = decision.evict_first {
            metrics::one_copy_handoff(side);
        }
        let verdicts = (
            prefill
                .as_ref()
                .map(|p| Verdict::new(fleet, state.cfg.breaker, p)),
            Verdict::new(fleet, state.cfg.breaker, &decode),
        );
        let result = protocol::run_legs(decode.protocol, &ctx, |observed| {
            booking.prefill_done(observed)
        })
        .await;
        match account_breakers(verdicts, result) {
            Ok((start, verdict)) => {
                return Ok(Leg {
                    start,
                    booking,
                    verdict,
                    decode: decision.decode,
                    protocol: decode.protocol,
                    fallback: false,
                });
            }
            Err(LegError {
                role: Role::Prefill,
                retryable: true,
                error,
            }) => {
                failed.extend(decision.prefill);
                if failed.len() < attempts {
                    let Some(permit) = retry_permit(state).await else {
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
                    };
                    return fallback(state, f, booking, decode, error).await;
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
                let Some(permit) = retry_permit(state).await else {
                    metrics::retry(Role::Decode, "budget_exhausted");
                    return Err(budget_exhausted(error));
                };
                _retry = Some(permit);
                tracing::warn!(message = %error.message, decode = %decode.url, "decode failed before its first byte; retrying with another pair");
                metrics::retry(Role::Decode, "retried");
                decode_cause = Some(error);
                room = RoomWait::new(room_wait);
            }
            Err(e) => return Err(e.error),
        }
    }
}

/// The decision's pull as the prefill engine takes it: the holder's URL, if it is still in the
/// fleet (a holder removed since the pick is simply not pulled from).
fn pull_from(
    fleet: &Fleet,
    d: &pdgate_scheduler::Decision,
) -> Option<pdgate_wire::native::PullFrom> {
    let p = d.pull?;
    let holder = fleet.workers.get(p.from)?;
    Some(pdgate_wire::native::PullFrom {
        url: holder.url.clone(),
        upto_blocks: p.upto_blocks,
    })
}

/// A request that failed where a retry was due, but the fleet's retry budget is spent: 503 at
/// once with `Retry-After`, saying what failed.
/// A slot in the retry budget, waiting for one as configured.
async fn retry_permit(state: &AppState) -> Option<RetryPermit> {
    let wait = Duration::from_millis(state.cfg.upstream.retry_budget_wait_ms);
    state
        .retries
        .acquire(|| state.requests_in_flight(), wait)
        .await
}

fn budget_exhausted(cause: ApiError) -> ApiError {
    ApiError::unavailable(
        "retry_budget_exhausted",
        format!("{}; not retried: too many retries under way", cause.message),
    )
}

/// Claims the breakers of a scheduled pair; `Err(id)`: that worker's half-open probe is taken.
fn claim_pair(
    state: &AppState,
    fleet: &Fleet,
    prefill: Option<&Worker>,
    decode: &Worker,
) -> Result<(), InstanceId> {
    let now = fleet.now();
    if !fleet.workers.claim(decode, now) {
        return Err(decode.id);
    }
    if let Some(p) = prefill {
        if !fleet.workers.claim(p, now) {
            // Give back the decode's claim (its probe, if half-open): it served nothing.
            fleet
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
) -> Result<Leg, ApiError> {
    let fleet = &f.req.model.fleet;
    if !fleet.workers.claim(&decode, fleet.now()) {
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
        pull: None,
        evict_first: None,
    };
    let verdicts = (None, Verdict::new(fleet, state.cfg.breaker, &decode));
    let result = protocol::run_legs(decode.protocol, &ctx, |_| {}).await;
    let (start, verdict) = account_breakers(verdicts, result).map_err(|e| e.error)?;
    Ok(Leg {
        start,
        booking,
        verdict,
        decode: decode.id,
        protocol: decode.protocol,
        fallback: true,
    })
}

/// Marks a response the decode instance prefilled itself because every prefill failed.
pub const FALLBACK_HEADER: &str = "x-pdgate-fallback";

/// Tokenises the whole rendered prompt and cuts it into chained block hashes. A real tokenizer
/// takes ~2 ms per 1,000 tokens (measured in the scheduler's bench), so it runs on the blocking
/// pool rather than stalling the connections sharing this worker thread.
async fn prefix_key(req: &ClientRequest) -> RequestKey {
    let model = &req.model;
    let tokens = if matches!(model.tokenizer, pdgate_scheduler::Tokenizer::Builtin) {
        model.tokenizer.encode(&req.prompt)
    } else {
        let (model, prompt) = (Arc::clone(model), req.prompt.clone());
        match tokio::task::spawn_blocking(move || model.tokenizer.encode(&prompt)).await {
            Ok(tokens) => tokens,
            Err(_) => pdgate_scheduler::BuiltinTokenizer.encode(&req.prompt),
        }
    };
    RequestKey {
        prompt_tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
        max_tokens: req.max_tokens,
        blocks: model.hasher.full_blocks(&tokens),
    }
}

/// Asks the model's scheduler for a pair. `waited`: how long the request has waited for KV
/// room so far; `waiting`: a `kv_full` answer will be asked again shortly, so it is not counted
/// as a decision (a wait of a second would otherwise count a hundred rejections).
fn schedule(
    req: &ClientRequest,
    key: &RequestKey,
    avoid: &[InstanceId],
    waited: Duration,
    waiting: bool,
) -> Result<Booking, Rejection> {
    let (model, began) = (&req.model, Instant::now());
    let fleet = &model.fleet;
    let result = fleet
        .scheduler
        .lock()
        .schedule_after_wait(key, fleet.now(), avoid, waited);
    if !(waiting && matches!(result, Err(Rejection::KvFull))) {
        metrics::decision(
            &model.name,
            model.scheduler.policy.as_str(),
            began.elapsed(),
            &result,
        );
    }
    let mut booking = Booking::new(Arc::clone(fleet), result?);
    booking.share(&key.blocks);
    Ok(booking)
}

/// A place in the model's line of requests waiting for KV room, or the refusal (429 `kv_full`)
/// when the line is full or too slow to serve this request within its wait, or within the time
/// it can still wait and make its TTFT SLO; its wait then ends when that slack does.
fn join_line<'m>(
    req: &'m ClientRequest,
    key: &RequestKey,
    room: &mut RoomWait,
) -> Result<Place<'m>, ApiError> {
    if !req.model.room.has_place() {
        return Err(rejection_error(Rejection::KvFull));
    }
    let fleet = &req.model.fleet;
    let slack_ms = fleet
        .scheduler
        .lock()
        .ttft_slack_ms(key, fleet.now(), room.waited());
    let place = req
        .model
        .room
        .join(slack_ms)
        .ok_or_else(|| rejection_error(Rejection::KvFull))?;
    room.cap(Duration::from_secs_f64(slack_ms.max(0.0) / 1e3));
    Ok(place)
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

/// Relays the decode leg to the client: streamed as it arrives, or as one JSON body; a stream
/// that breaks mid-way is continued on another pair when it may be (`migrate`).
fn respond(
    state: &Arc<AppState>,
    req: &ClientRequest,
    request_id: &str,
    started: Instant,
    leg: Leg,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (fallback, decode, protocol) = (leg.fallback, leg.decode, leg.protocol);
    let (relay, content_type) = relay_of(state, request_id, started, leg, false);
    // Only a stream can break after its head went out with part of an answer delivered; with
    // `migration_limit = 0` the plan only counts breaks.
    let plan = req.stream.then(|| Plan {
        state: Arc::clone(state),
        req: req.clone(),
        request_id: request_id.to_string(),
        decode,
        protocol,
        restart: restart(state),
        left: state.cfg.upstream.migration_limit,
    });
    let body = Splice::new(relay, plan).into_stream();
    // The permit lives as long as the body, so a long stream counts as in flight.
    let body = body.map(move |item| {
        let _keep = &permit;
        item
    });
    let content_type = content_type.unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    if req.stream {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if fallback {
        resp.headers_mut()
            .insert(FALLBACK_HEADER, HeaderValue::from_static("decode-prefill"));
    }
    resp
}

/// The relay of a leg whose head arrived, and its content type.
fn relay_of(
    state: &AppState,
    request_id: &str,
    started: Instant,
    leg: Leg,
    continuation: bool,
) -> (Relay, Option<HeaderValue>) {
    let DecodeBody {
        content_type,
        body: upstream,
        sse,
        abort_on_drop,
    } = leg.start.into_body();
    let held = Held {
        booking: leg.booking,
        verdict: leg.verdict,
        started,
        request_id: request_id.to_string(),
        stall_limit: Duration::from_millis(state.cfg.upstream.decode_stall_timeout_ms),
        continuation,
        // Dropped before the upstream ended (client gone, upstream stalled), it aborts the
        // engines' legs.
        abort_on_drop,
    };
    (Relay::new(upstream, sse, held), content_type)
}

/// How a broken stream's continuation starts: a fresh pair through the same path as any
/// request, counted against the retry budget like a retry.
fn restart(state: &Arc<AppState>) -> Restart {
    let state = Arc::clone(state);
    Box::new(move |req, avoid, leg_id| {
        let state = Arc::clone(&state);
        Box::pin(async move {
            let Some(_permit) = retry_permit(&state).await else {
                return Err(budget_exhausted(ApiError::upstream(
                    "decode_stream_interrupted",
                    "the decode stream broke",
                )));
            };
            let leg = start_leg(&state, &req, &leg_id, &avoid).await?;
            let decode = leg.decode;
            let (relay, _) = relay_of(&state, &leg_id, Instant::now(), leg, true);
            Ok((relay, decode))
        })
    })
}
