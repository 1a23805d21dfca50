//! Leg plumbing shared by the runner and the protocols: posting a JSON leg with the request id
//! and a deadline, waiting for a decode head, reading a prefill's answer, and turning an engine's
//! failure into a [`LegError`] attributed to its leg. Each protocol keeps only its own wire
//! details.
//!
//! Nothing here may retry or swallow a failure: errors are attributed to their leg and returned.

use super::logprobs::{PromptLogprobs, ANSWER_LIMIT};
use super::phases::PrefillAnswer;
use super::types::{LegContext, LegError};
use crate::error::ApiError;
use crate::metrics;
use bytes::Bytes;
use pdgate_scheduler::Role;
use serde_json::Value;
use std::time::Duration;

/// Largest prefill-leg answer read when it carries no prompt logprobs (one token plus protocol
/// fields).
const PREFILL_ANSWER_LIMIT: usize = 1024 * 1024;

/// The client's body turned into a prefill-only leg (one token, not streamed, no usage chunk),
/// with the protocol's `fields` set.
pub fn prefill_body(ctx: &LegContext<'_>, fields: &[(&str, Value)]) -> Bytes {
    let mut set = vec![
        ("stream", Value::Bool(false)),
        ("max_tokens", Value::from(1)),
    ];
    if ctx.req.body.get("max_completion_tokens").is_some() {
        set.push(("max_completion_tokens", Value::from(1)));
    }
    set.extend(fields.iter().cloned());
    overlay(&ctx.req.body, &set, &["stream_options"])
}

/// The client's body with `set` fields put in (replacing any the client sent) and `omit`
/// fields left out, serialised straight from the parsed body: the prompt is never copied.
pub fn overlay(body: &Value, set: &[(&str, Value)], omit: &[&str]) -> Bytes {
    let empty = serde_json::Map::new();
    let base = body.as_object().unwrap_or(&empty);
    to_body(&Overlay { base, set, omit })
}

struct Overlay<'a> {
    base: &'a serde_json::Map<String, Value>,
    set: &'a [(&'a str, Value)],
    omit: &'a [&'a str],
}

impl serde::Serialize for Overlay<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let replaced = |k: &str| self.omit.contains(&k) || self.set.iter().any(|(f, _)| *f == k);
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.base.iter().filter(|(k, _)| !replaced(k)) {
            map.serialize_entry(k, v)?;
        }
        for (k, v) in self.set {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The client asked for the prompt's logprobs (completions `echo` + `logprobs`): only the
/// prefill ran the prompt, so its answer has them and the decode's does not.
pub fn wants_prompt_logprobs(ctx: &LegContext<'_>) -> bool {
    pdgate_wire::openai::logprobs_wanted(ctx.req.kind, &ctx.req.body)
        .ok()
        .flatten()
        .is_some_and(|w| w.prompt)
}

/// The prompt's logprobs out of a sequential protocol's prefill answer, when the client asked.
pub fn prompt_logprobs_of(ctx: &LegContext<'_>, answer: &Value) -> Option<PromptLogprobs> {
    if !wants_prompt_logprobs(ctx) {
        return None;
    }
    let part = PromptLogprobs::from_json(answer);
    if part.is_none() {
        tracing::warn!("prefill answer carries no prompt logprobs to merge");
    }
    part
}

/// What the sequential protocols read out of a prefill's answer: its KV transfer params, at the
/// top (vLLM, older TensorRT-LLM) or in the first choice (TensorRT-LLM).
#[derive(serde::Deserialize)]
struct LeanAnswer {
    #[serde(default)]
    kv_transfer_params: Option<Value>,
    #[serde(default)]
    disaggregated_params: Option<Value>,
    #[serde(default)]
    choices: Option<Vec<LeanChoice>>,
}

#[derive(serde::Deserialize)]
struct LeanChoice {
    #[serde(default)]
    disaggregated_params: Option<Value>,
}

/// The prefill's answer as JSON. Unless the prompt's logprobs are to be merged from it, only the
/// transfer params are kept: the rest (text, usage, ids) is checked to be JSON but never built
/// into values, since nothing reads it.
fn parse_prefill_answer(raw: &[u8], whole: bool) -> Option<Value> {
    if whole {
        return serde_json::from_slice(raw).ok();
    }
    let lean: LeanAnswer = serde_json::from_slice(raw).ok()?;
    let mut answer = serde_json::Map::new();
    for (field, p) in [
        ("kv_transfer_params", lean.kv_transfer_params),
        ("disaggregated_params", lean.disaggregated_params),
    ] {
        if let Some(p) = p {
            answer.insert(field.into(), p);
        }
    }
    let choices: Vec<Value> = lean
        .choices
        .into_iter()
        .flatten()
        .map(|c| {
            let mut choice = serde_json::Map::new();
            if let Some(p) = c.disaggregated_params {
                choice.insert("disaggregated_params".into(), p);
            }
            Value::Object(choice)
        })
        .collect();
    if !choices.is_empty() {
        answer.insert("choices".into(), Value::Array(choices));
    }
    Some(Value::Object(answer))
}

/// Posts a sequential protocol's prefill leg and reads its answer, as its type reads it.
pub async fn prefill_answer<A: PrefillAnswer>(
    ctx: &LegContext<'_>,
    url: &str,
    body: Bytes,
) -> Result<A, LegError> {
    let timeout = Duration::from_secs(ctx.state.cfg.upstream.prefill_timeout_secs);
    let resp = ctx
        .state
        .client
        .post(format!("{url}{}", A::path(ctx)))
        .header("x-request-id", ctx.request_id)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| unreachable(Role::Prefill, url, &e))?;
    if !resp.status().is_success() {
        metrics::leg(Role::Prefill, "error");
        return Err(upstream_failure(Role::Prefill, resp).await);
    }
    let answer = A::read(ctx, url, resp).await?;
    metrics::leg(Role::Prefill, "ok");
    Ok(answer)
}

/// An OpenAI prefill leg's answer, as JSON (see [`parse_prefill_answer`]).
impl PrefillAnswer for Value {
    fn path(ctx: &LegContext<'_>) -> &'static str {
        ctx.req.kind.path()
    }

    async fn read(
        ctx: &LegContext<'_>,
        engine: &str,
        resp: crate::http1::Response,
    ) -> Result<Self, LegError> {
        // With its prompt's logprobs, an answer grows with the prompt, as in the concurrent
        // protocols.
        let whole = wants_prompt_logprobs(ctx);
        let limit = if whole {
            ANSWER_LIMIT
        } else {
            PREFILL_ANSWER_LIMIT
        };
        let raw = read_limited(resp, limit).await;
        let answer = raw.and_then(|b| parse_prefill_answer(&b, whole));
        answer.ok_or_else(|| {
            metrics::leg(Role::Prefill, "error");
            LegError {
                role: Role::Prefill,
                retryable: true,
                error: ApiError::upstream(
                    "prefill_failed",
                    format!("prefill engine {engine} sent an unreadable answer"),
                ),
            }
        })
    }

    fn prompt_logprobs(&self, ctx: &LegContext<'_>) -> Option<PromptLogprobs> {
        prompt_logprobs_of(ctx, self)
    }
}

/// A prefill that answered without what the decode leg needs: the prefill's failure, retried
/// elsewhere.
pub fn params_missing(message: String) -> LegError {
    LegError {
        role: Role::Prefill,
        retryable: true,
        error: ApiError::upstream("prefill_failed", message),
    }
}

/// A leg's JSON body, serialised once: legs that send the same body to both engines share it.
pub fn to_body(v: &impl serde::Serialize) -> Bytes {
    // JSON values and overlays always serialise (string keys); the empty fallback is unreachable.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// Posts a decode leg and waits (bounded) for its response head.
pub async fn decode_head(
    ctx: &LegContext<'_>,
    body: &Value,
    headers: &[(&str, String)],
) -> Result<crate::http1::Response, LegError> {
    decode_head_raw(ctx, to_body(body), headers).await
}

/// [`decode_head`] with an already serialised body.
pub async fn decode_head_raw(
    ctx: &LegContext<'_>,
    body: Bytes,
    headers: &[(&str, String)],
) -> Result<crate::http1::Response, LegError> {
    let url = &ctx.decode.url;
    let head_timeout = Duration::from_secs(ctx.state.cfg.upstream.decode_head_timeout_secs);
    let mut rb = ctx
        .state
        .client
        .post(format!("{url}{}", ctx.req.kind.path()))
        .header("x-request-id", ctx.request_id)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body);
    for (k, v) in headers {
        rb = rb.header(*k, v);
    }
    let resp = match tokio::time::timeout(head_timeout, rb.send()).await {
        Ok(r) => r.map_err(|e| unreachable(Role::Decode, url, &e))?,
        Err(_) => {
            return Err(LegError {
                role: Role::Decode,
                retryable: true,
                error: ApiError::timeout(format!(
                    "decode engine {url} sent no response head in time"
                )),
            })
        }
    };
    if !resp.status().is_success() {
        metrics::leg(Role::Decode, "error");
        return Err(upstream_failure(Role::Decode, resp).await);
    }
    // A decode leg that sent its head is counted by the relay, once its body ended.
    Ok(resp)
}

/// A concurrent protocol's prefill leg: sent, its answer drained and discarded (the client gets
/// decode's), or, with `keep`, returned for its prompt logprobs (`None` past [`ANSWER_LIMIT`]).
pub async fn prefill_drained(
    client: crate::http1::Client,
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
        .map_err(|e| unreachable(Role::Prefill, &engine, &e))?;
    if !resp.status().is_success() {
        metrics::leg(Role::Prefill, "error");
        return Err(upstream_failure(Role::Prefill, resp).await);
    }
    let mut stream = resp.bytes_stream();
    let mut answer = keep.then(Vec::new);
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| unreachable(Role::Prefill, &engine, &e))?;
        if let Some(a) = answer.as_mut() {
            if a.len() + chunk.len() > ANSWER_LIMIT {
                tracing::warn!(request_id = %rid, "prefill answer too large to merge its prompt logprobs");
                answer = None;
            } else {
                a.extend_from_slice(&chunk);
            }
        }
    }
    metrics::leg(Role::Prefill, "ok");
    Ok(answer)
}

/// Turns an engine's non-success answer into a leg error: the client's own mistakes (400, 413,
/// 422) pass through as they are; anything else is the engine's fault (502, retryable).
pub async fn upstream_failure(role: Role, resp: crate::http1::Response) -> LegError {
    let status = resp.status();
    let body: serde_json::Value = read_limited(resp, 64 * 1024)
        .await
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let message = body
        .pointer("/error/message")
        .or_else(|| body.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("no error message")
        .to_string();
    if matches!(status.as_u16(), 400 | 413 | 422) {
        let param = body
            .pointer("/error/param")
            .and_then(|p| p.as_str())
            .unwrap_or("body");
        let mut error = ApiError::invalid(param, message);
        error.status = status;
        return LegError {
            role,
            retryable: false,
            error,
        };
    }
    let code = match body.pointer("/error/code").and_then(|c| c.as_str()) {
        Some("kv_verification_failed") => "kv_verification_failed",
        Some("kv_transfer_failed") => "kv_transfer_failed",
        _ if role == Role::Prefill => "prefill_failed",
        _ => "decode_failed",
    };
    LegError {
        role,
        retryable: true,
        error: ApiError::upstream(code, format!("{role} engine answered {status}: {message}")),
    }
}

pub fn unreachable(role: Role, url: &str, e: &crate::http1::Error) -> LegError {
    let error = if e.is_timeout() {
        ApiError::timeout(format!("{role} engine {url} timed out"))
    } else {
        ApiError::upstream(
            "engine_unreachable",
            format!("{role} engine {url} unreachable: {e}"),
        )
    };
    LegError {
        role,
        retryable: true,
        error,
    }
}

/// Reads at most `limit` bytes of a body; `None` if it is longer or broken.
pub async fn read_limited(resp: crate::http1::Response, limit: usize) -> Option<Vec<u8>> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.ok()?;
        if out.len() + chunk.len() > limit {
            return None;
        }
        out.extend_from_slice(&chunk);
    }
    Some(out)
}

#[cfg(test)]
mod tests {

    use super::*;
    use serde_json::json;

    #[test]
    fn overlay_sets_replaces_and_omits_without_touching_the_rest() {
        let body = json!({"model": "m", "prompt": "p \"q\"", "stream": true,
            "stream_options": {"include_usage": true}, "bootstrap_room": 1, "extra": [1, {"a": null}]});
        let out = overlay(
            &body,
            &[("bootstrap_room", json!(7)), ("rid", json!("r"))],
            &["stream_options"],
        );
        let v: Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(
            v,
            json!({"model": "m", "prompt": "p \"q\"", "stream": true, "bootstrap_room": 7,
                "rid": "r", "extra": [1, {"a": null}]})
        );
        // One key each: the client's `bootstrap_room` was replaced, not duplicated.
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        assert_eq!(text.matches("\"bootstrap_room\"").count(), 1);
    }

    #[test]
    fn prefill_answer_keeps_the_transfer_params_and_only_them_unless_asked() {
        let old = br#"{"choices":[{"text":"a"}],"disaggregated_params":{"ctx":8}}"#;
        let lean = parse_prefill_answer(old, false).expect("parses");
        assert_eq!(
            lean["disaggregated_params"]["ctx"], 8,
            "older servers: top level"
        );
        let raw = br#"{"id":"x","choices":[{"text":"a","logprobs":{"tokens":["a"]},"disaggregated_params":{"ctx":7}}],
            "usage":{"prompt_tokens":3},"kv_transfer_params":{"remote_block_ids":[1,2],"remote_engine_id":"e"}}"#;
        let lean = parse_prefill_answer(raw, false).expect("parses");
        assert_eq!(
            lean["kv_transfer_params"]["remote_block_ids"],
            json!([1, 2])
        );
        assert_eq!(
            lean.pointer("/choices/0/disaggregated_params/ctx"),
            Some(&json!(7))
        );
        assert!(lean.get("usage").is_none() && lean.pointer("/choices/0/text").is_none());
        let whole = parse_prefill_answer(raw, true).expect("parses");
        assert_eq!(whole, serde_json::from_slice::<Value>(raw).expect("json"));
        assert_eq!(
            parse_prefill_answer(br#"{"choices":null}"#, false),
            Some(json!({}))
        );
        assert!(parse_prefill_answer(b"not json", false).is_none());
        assert!(parse_prefill_answer(br#"{"kv_transfer_params":1,"#, false).is_none());
    }
}
