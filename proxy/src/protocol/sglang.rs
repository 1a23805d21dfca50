//! SGLang PD: the same body, with `bootstrap_host`, `bootstrap_port`, `bootstrap_room` (random
//! in [0, 2^63)) and `rid` (our request id, so either leg can be aborted), goes to prefill and
//! decode at once. The client gets decode's response **as soon as decode's head arrives**; the
//! prefill answer is drained in the background. If either leg fails, the other is aborted
//! (`POST /abort_request {"rid"}`) and the client gets one error naming the failed leg; a
//! client that leaves aborts both.
//!
//! Batched prompts are refused by the gateway's parser, so room, host and port are scalars here.
//! Prefill logprobs are not merged (SGLang's router prepends them when logprobs are requested).

use super::{legs, DecodeStart, LegContext, LegError};
use crate::error::ApiError;
use crate::workers::Worker;
use bytes::Bytes;
use pdgate_scheduler::{Observed, Role};
use serde_json::Value;
use std::time::Duration;

/// SGLang's default `--disaggregation-bootstrap-port`.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

pub async fn run(
    ctx: &LegContext<'_>,
    prefill: &Worker,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let (host, http_port) = host_port(&prefill.url);
    let mut body = ctx.req.body.clone();
    body["bootstrap_host"] = Value::from(host);
    body["bootstrap_port"] = Value::from(prefill.bootstrap_port.unwrap_or(http_port));
    let room = room();
    body["bootstrap_room"] = Value::from(room);
    // One rid per attempt: an abort sent for a failed attempt must not hit its retry.
    let rid = format!("{}-{room:x}", ctx.request_id);
    body["rid"] = Value::from(rid.as_str());
    // Both legs get the same bytes: serialised once, shared by reference count.
    let body = legs::to_body(&body);
    concurrent(
        ctx,
        &rid,
        &prefill.url,
        body.clone(),
        body,
        true,
        on_prefill_done,
    )
    .await
}

/// A random bootstrap room in [0, 2^63).
pub fn room() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 >> 1
}

/// `(host, port)` of an `http://host:port` URL (port 80 when absent).
pub fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(80)),
        None => (authority.to_string(), 80),
    }
}

/// Sends both legs at once and returns decode's head as soon as it arrives. `abortable`: the
/// engines take `/abort_request`; otherwise a failed leg's partner is only dropped.
pub async fn concurrent(
    ctx: &LegContext<'_>,
    rid: &str,
    prefill_url: &str,
    prefill_body: Bytes,
    decode_body: Bytes,
    abortable: bool,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let client = ctx.state.client.clone();
    let rid = rid.to_string();
    // Armed until the legs' fate is known: a client leaving mid-handoff aborts both legs.
    let mut guard = abortable.then(|| {
        legs::AbortGuard::new(
            &client,
            vec![prefill_url.to_string(), ctx.decode.url.clone()],
            &rid,
        )
    });
    let timeout = Duration::from_secs(ctx.state.cfg.upstream.prefill_timeout_secs);
    let url = format!("{prefill_url}{}", legs::path(ctx.req.kind));
    let mut prefill = tokio::spawn(prefill_leg(
        client.clone(),
        url,
        prefill_url.to_string(),
        prefill_body,
        rid.clone(),
        timeout,
    ));
    let decode = legs::decode_head_raw(ctx, decode_body, &[]);
    tokio::pin!(decode);
    let first = tokio::select! {
        d = &mut decode => Ok(d),
        p = &mut prefill => Err(p),
    };
    let decode_result = match first {
        Ok(d) => d,
        Err(joined) => {
            let prefill_result = joined.unwrap_or_else(|e| Err(join_failed(&e)));
            if let Err(e) = prefill_result {
                disarm(&mut guard);
                if abortable {
                    legs::abort(&client, &ctx.decode.url, &rid);
                }
                return Err(e);
            }
            on_prefill_done(None);
            return match decode.await {
                Ok(response) => Ok(DecodeStart {
                    response,
                    abort_on_drop: guard,
                }),
                Err(e) => {
                    disarm(&mut guard);
                    Err(e)
                }
            };
        }
    };
    match decode_result {
        Ok(response) => {
            on_prefill_done(None);
            // Decode streams now; a prefill failing later must not leave it waiting.
            let (decode_url, client2, rid2) = (ctx.decode.url.clone(), client.clone(), rid.clone());
            tokio::spawn(async move {
                if let Ok(Err(e)) = prefill.await {
                    tracing::warn!(request_id = %rid2, message = %e.error.message, "prefill failed after decode started; aborting decode");
                    if abortable {
                        legs::abort(&client2, &decode_url, &rid2);
                    }
                }
            });
            Ok(DecodeStart {
                response,
                abort_on_drop: guard,
            })
        }
        Err(e) => {
            disarm(&mut guard);
            // A decode that failed because its prefill is gone (bootstrap unreachable) is the
            // prefill's failure: attribute it there, so the request is retried elsewhere.
            if let Ok(Ok(Err(pe))) = tokio::time::timeout(BLAME_WINDOW, &mut prefill).await {
                return Err(pe);
            }
            if abortable {
                legs::abort(&client, prefill_url, &rid);
            } else {
                prefill.abort();
            }
            Err(e)
        }
    }
}

/// How long a failed decode waits to see whether its prefill failed first.
const BLAME_WINDOW: Duration = Duration::from_millis(200);

fn disarm(guard: &mut Option<legs::AbortGuard>) {
    if let Some(g) = guard.as_mut() {
        g.disarm();
    }
}

fn join_failed(e: &tokio::task::JoinError) -> LegError {
    LegError {
        role: Role::Prefill,
        retryable: true,
        error: ApiError::upstream("prefill_failed", format!("prefill leg task failed: {e}")),
    }
}

/// The prefill leg: sent, its answer drained and discarded (the client gets decode's).
async fn prefill_leg(
    client: crate::upstream::Client,
    url: String,
    engine: String,
    body: Bytes,
    rid: String,
    timeout: Duration,
) -> Result<(), LegError> {
    let resp = client
        .post(&url)
        .header("x-request-id", &rid)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| super::unreachable(Role::Prefill, &engine, &e))?;
    if !resp.status().is_success() {
        crate::metrics::leg(Role::Prefill, "error");
        return Err(super::upstream_failure(Role::Prefill, resp).await);
    }
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        chunk.map_err(|e| super::unreachable(Role::Prefill, &engine, &e))?;
    }
    crate::metrics::leg(Role::Prefill, "ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_room_range() {
        assert_eq!(
            host_port("http://10.0.0.1:30000"),
            ("10.0.0.1".into(), 30000)
        );
        assert_eq!(host_port("http://p.svc/"), ("p.svc".into(), 80));
        assert!((0..64).map(|_| room()).all(|r| r < 1 << 63));
    }
}
