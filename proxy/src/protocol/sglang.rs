//! SGLang PD: the same body, with `bootstrap_host`, `bootstrap_port`, `bootstrap_room` (random
//! in [0, 2^63)) and `rid` (our request id, so either leg can be aborted), goes to prefill and
//! decode at once. The client gets decode's response **as soon as decode's head arrives**; the
//! prefill answer is drained in the background. If either leg fails, the other is aborted
//! (`POST /abort_request {"rid"}`) and the client gets one error naming the failed leg; a
//! client that leaves aborts both.
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

use super::abort::{abort, AbortGuard};
use super::legs;
use super::logprobs::{PromptLogprobs, ANSWER_LIMIT};
use super::types::{DecodeStart, LegContext, LegError};
use crate::workers::Worker;
use bytes::Bytes;
use pdgate_scheduler::{Observed, Role};
use serde_json::Value;
use std::time::Duration;

pub async fn run(
    ctx: &LegContext<'_>,
    prefill: &Worker,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
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
    let body = legs::overlay(&ctx.req.body, &fields, &[]);
    let legs = Concurrent {
        rid: &rid,
        prefill_url: &prefill.url,
        prefill_body: body.clone(),
        decode_body: body,
        abortable: true,
        prompt_logprobs: legs::wants_prompt_logprobs(ctx),
    };
    concurrent(ctx, legs, on_prefill_done).await
}

/// Two legs sent at once (SGLang, vLLM Mooncake).
pub struct Concurrent<'a> {
    pub rid: &'a str,
    pub prefill_url: &'a str,
    pub prefill_body: Bytes,
    pub decode_body: Bytes,
    /// The engines take `/abort_request`; otherwise a failed leg's partner is only dropped.
    pub abortable: bool,
    /// The client asked for prompt logprobs: wait for the prefill's answer and merge them.
    pub prompt_logprobs: bool,
}

/// A random bootstrap room in [0, 2^63).
pub fn room() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 >> 1
}

/// Sends both legs at once and returns decode's head as soon as it arrives (with prompt
/// logprobs wanted: once the prefill's answer is in too).
pub async fn concurrent(
    ctx: &LegContext<'_>,
    legs: Concurrent<'_>,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let Concurrent {
        rid,
        prefill_url,
        prefill_body,
        decode_body,
        abortable,
        prompt_logprobs,
    } = legs;
    let client = ctx.state.client.clone();
    let rid = rid.to_string();
    // Armed until the legs' fate is known: a client leaving mid-handoff aborts both legs.
    let mut guard = abortable.then(|| {
        AbortGuard::new(
            &client,
            vec![prefill_url.to_string(), ctx.decode.url.clone()],
            &rid,
        )
    });
    let timeout = Duration::from_secs(ctx.state.cfg.upstream.prefill_timeout_secs);
    let url = format!("{prefill_url}{}", legs::path(ctx.req.kind));
    // Polled here alongside the decode leg; handed to a task of its own only if it outlives
    // decode's head (most prefills answer first, so most requests spawn nothing).
    let mut prefill: PrefillLeg = Box::pin(prefill_leg(
        client.clone(),
        url,
        prefill_url.to_string(),
        prefill_body,
        rid.clone(),
        timeout,
        prompt_logprobs,
    ));
    let decode = legs::decode_head_raw(ctx, decode_body, &[]);
    tokio::pin!(decode);
    // A failed prefill before any byte reached the client: the decode leg goes too.
    let drop_decode = |guard: &mut Option<AbortGuard>| {
        disarm(guard);
        if abortable {
            abort(&client, &ctx.decode.url, &rid);
        }
    };
    let first = tokio::select! {
        d = &mut decode => Ok(d),
        p = &mut prefill => Err(p),
    };
    let decode_result = match first {
        Ok(d) => d,
        Err(prefill_result) => {
            let answer = match prefill_result {
                Ok(answer) => answer,
                Err(e) => {
                    drop_decode(&mut guard);
                    return Err(e);
                }
            };
            on_prefill_done(None);
            return match decode.await {
                Ok(response) => Ok(started(response, guard, answer)),
                Err(e) => {
                    disarm(&mut guard);
                    Err(e)
                }
            };
        }
    };
    match decode_result {
        Ok(response) if prompt_logprobs => {
            // The prompt's logprobs are the prefill's: wait for its answer (bounded by its
            // deadline). A prefill failing now is retried elsewhere; nothing reached the client.
            let answer = prefill.await;
            on_prefill_done(None);
            match answer {
                Ok(answer) => Ok(started(response, guard, answer)),
                Err(e) => {
                    drop_decode(&mut guard);
                    Err(e)
                }
            }
        }
        Ok(response) => {
            on_prefill_done(None);
            // Decode streams now; a prefill failing later must not leave it waiting.
            let (decode_url, client2, rid2) = (ctx.decode.url.clone(), client.clone(), rid.clone());
            tokio::spawn(async move {
                if let Err(e) = prefill.await {
                    tracing::warn!(request_id = %rid2, message = %e.error.message, "prefill failed after decode started; aborting decode");
                    if abortable {
                        abort(&client2, &decode_url, &rid2);
                    }
                }
            });
            Ok(DecodeStart {
                response,
                abort_on_drop: guard,
                prompt_logprobs: None,
            })
        }
        Err(e) => {
            disarm(&mut guard);
            // A decode that failed because its prefill is gone (bootstrap unreachable) is the
            // prefill's failure: attribute it there, so the request is retried elsewhere.
            if let Ok(Err(pe)) = tokio::time::timeout(BLAME_WINDOW, &mut prefill).await {
                return Err(pe);
            }
            if abortable {
                abort(&client, prefill_url, &rid);
            }
            // Dropping the prefill leg closes its connection: engines without an abort call
            // (vLLM) abort on disconnect.
            drop(prefill);
            Err(e)
        }
    }
}

/// The prefill leg's future, boxed so it can move to a task of its own mid-flight.
type PrefillLeg =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Vec<u8>>, LegError>> + Send>>;

/// How long a failed decode waits to see whether its prefill failed first.
const BLAME_WINDOW: Duration = Duration::from_millis(200);

/// Decode's head, to go out with the prompt logprobs of the prefill's answer (when it was kept).
fn started(
    response: crate::upstream::Response,
    guard: Option<AbortGuard>,
    answer: Option<Vec<u8>>,
) -> DecodeStart {
    DecodeStart {
        response,
        abort_on_drop: guard,
        prompt_logprobs: answer.as_deref().and_then(prompt_part),
    }
}

fn disarm(guard: &mut Option<AbortGuard>) {
    if let Some(g) = guard.as_mut() {
        g.disarm();
    }
}

/// The prompt's logprobs in a prefill's answer; a prefill that sent none is logged, and the
/// decode's answer goes out as it is.
fn prompt_part(answer: &[u8]) -> Option<PromptLogprobs> {
    let part = PromptLogprobs::from_answer(answer);
    if part.is_none() {
        tracing::warn!("prompt logprobs asked for, but the prefill's answer has none to merge");
    }
    part
}

/// The prefill leg: sent, its answer drained and discarded (the client gets decode's), or, with
/// `keep`, returned for its prompt logprobs (`None` past [`ANSWER_LIMIT`]).
async fn prefill_leg(
    client: crate::upstream::Client,
    url: String,
    engine: String,
    body: Bytes,
    rid: String,
    timeout: Duration,
    keep: bool,
) -> Result<Option<Vec<u8>>, LegError> {
    let resp = client
        .post(&url)
        .header("x-request-id", &rid)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| legs::unreachable(Role::Prefill, &engine, &e))?;
    if !resp.status().is_success() {
        crate::metrics::leg(Role::Prefill, "error");
        return Err(legs::upstream_failure(Role::Prefill, resp).await);
    }
    let mut stream = resp.bytes_stream();
    let mut answer = keep.then(Vec::new);
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| legs::unreachable(Role::Prefill, &engine, &e))?;
        if let Some(a) = answer.as_mut() {
            if a.len() + chunk.len() > ANSWER_LIMIT {
                tracing::warn!(request_id = %rid, "prefill answer too large to merge its prompt logprobs");
                answer = None;
            } else {
                a.extend_from_slice(&chunk);
            }
        }
    }
    crate::metrics::leg(Role::Prefill, "ok");
    Ok(answer)
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
