//! Batched prompts on `/v1/completions` (`"prompt": ["a", "b", …]`). Each prompt is its own
//! request through the whole pipeline (`pipeline::route`: scheduled on its own so each prompt
//! goes where its prefix is cached, its own legs, retries and breakers, in every protocol) under
//! the derived id `{id}-{i}`; they run concurrently and their answers merge into one response,
//! numbered as OpenAI does (prompt `i`'s choice `j` is choice `i·n + j`).
//!
//! All or nothing up to the response head: the first prompt to fail answers for the batch, and
//! the other prompts' futures are dropped, which aborts their legs and frees their KV exactly as
//! a client disconnect does. Once a streamed head went out, a failure is one SSE error event, as
//! for a single request. It must never buffer without bound: answers are read up to a limit and
//! streams merge through a bounded channel.

mod merge;
mod stream;

use crate::error::ApiError;
use crate::openai::ClientRequest;
use crate::pipeline::{self, FALLBACK_HEADER};
use crate::state::AppState;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::future::try_join_all;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

pub use merge::{merge_answers, BatchInfo, ChunkMerge, Step, Usage};

/// Runs every prompt of a batch and answers with the merged response, or the first failure.
pub async fn run(
    state: &Arc<AppState>,
    reqs: Vec<ClientRequest>,
    request_id: &str,
    started: Instant,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let Some(first) = reqs.first() else {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    };
    let (info, streamed) = (BatchInfo::of(request_id, &first.body), first.stream);
    tracing::info!(prompts = reqs.len(), "batched prompts fanned out");
    let permits = permits(state, permit, reqs.len())?;
    let heads = start_all(state, &reqs, request_id, started, permits).await?;
    let fallback = heads
        .iter()
        .find_map(|r| r.headers().get(FALLBACK_HEADER).cloned());
    let mut resp = if streamed {
        stream::respond(heads, info)
    } else {
        answer(heads, &info).await?
    };
    if let Some(v) = fallback {
        resp.headers_mut().insert(FALLBACK_HEADER, v);
    }
    Ok(resp)
}

/// One in-flight slot per prompt (each is a request on the engines): the caller's, plus the rest.
fn permits(
    state: &AppState,
    first: OwnedSemaphorePermit,
    count: usize,
) -> Result<Vec<OwnedSemaphorePermit>, ApiError> {
    let mut permits = Vec::with_capacity(count);
    permits.push(first);
    for _ in 1..count {
        permits.push(pipeline::in_flight_permit(state)?);
    }
    Ok(permits)
}

/// Every prompt up to its response head, concurrently. The first failure returns at once and
/// drops the other prompts' futures: their legs are aborted and their bookings released.
async fn start_all(
    state: &Arc<AppState>,
    reqs: &[ClientRequest],
    request_id: &str,
    started: Instant,
    permits: Vec<OwnedSemaphorePermit>,
) -> Result<Vec<Response>, ApiError> {
    let subs = reqs
        .iter()
        .zip(permits)
        .enumerate()
        .map(|(i, (req, permit))| {
            let sub_id = format!("{request_id}-{i}");
            let span = tracing::info_span!("prompt", index = i, sub_request_id = %sub_id);
            async move {
                pipeline::route(state, req, &sub_id, started, permit)
                    .await
                    .map_err(|e| of_prompt(i, e))
            }
            .instrument(span)
        });
    try_join_all(subs).await
}

/// The batch answers with a prompt's own error, saying which prompt it was.
fn of_prompt(i: usize, mut e: ApiError) -> ApiError {
    e.message = format!("prompt {i}: {}", e.message);
    e
}

/// Non-streamed: every prompt's answer read (bounded) and merged into one completion object.
async fn answer(heads: Vec<Response>, info: &BatchInfo) -> Result<Response, ApiError> {
    let reads = heads
        .into_iter()
        .enumerate()
        .map(|(i, r)| read_answer(i, r));
    let answers = try_join_all(reads).await?;
    let merged = merge_answers(answers, info);
    let mut resp = axum::Json(merged).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

async fn read_answer(i: usize, resp: Response) -> Result<Value, ApiError> {
    let cut = |detail: String| {
        ApiError::upstream(
            "decode_stream_interrupted",
            format!("prompt {i}: decode engine's answer {detail}"),
        )
    };
    // The same bound as the prompt-logprob merge that may have produced this answer.
    let bytes = axum::body::to_bytes(resp.into_body(), crate::protocol::logprobs::ANSWER_LIMIT)
        .await
        .map_err(|e| cut(format!("could not be read: {e}")))?;
    // A decode leg that broke mid-body leaves the relay's error event appended: not JSON.
    serde_json::from_slice(&bytes).map_err(|_| cut("was cut off or is not JSON".into()))
}
