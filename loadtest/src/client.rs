//! One request against an OpenAI-compatible endpoint, timed the way `vllm bench serve` times it:
//! the clock starts when the request is handed to the HTTP client, the first token is the first
//! SSE chunk carrying text, every later text chunk adds an inter-token gap, and the end is the
//! last byte of the stream.
//!
//! It never buffers an unbounded body (error bodies and non-streamed replies are capped) and
//! turns every failure into a `RequestError` record instead of an error return.

use crate::metrics::{RequestError, RequestRecord};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A reply body larger than this is cut off and counted as an error.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of an error body kept for the report.
const MAX_ERROR_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "chat" => Ok(Api::Chat),
            "completions" | "completion" => Ok(Api::Completions),
            other => Err(format!("unknown API `{other}` (chat or completions)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    /// Base URL without `/v1`, e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    pub api: Api,
    pub model: String,
    pub api_key: Option<String>,
    pub stream: bool,
}

impl Target {
    /// The request body: exactly `max_tokens` tokens asked for (`ignore_eos` and `min_tokens` for
    /// engines that honour them, as vllm bench does), usage requested in the stream.
    pub fn body(&self, prompt: &str, max_tokens: u32) -> Bytes {
        let mut v = json!({
            "model": self.model,
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "ignore_eos": true,
            "temperature": 0.0,
            "stream": self.stream,
        });
        if self.stream {
            v["stream_options"] = json!({"include_usage": true});
        }
        match self.api {
            Api::Chat => v["messages"] = json!([{"role": "user", "content": prompt}]),
            Api::Completions => v["prompt"] = json!(prompt),
        }
        Bytes::from(v.to_string())
    }

    pub fn url(&self) -> String {
        format!("{}{}", self.base_url.trim_end_matches('/'), self.api.path())
    }
}

fn err(status: Option<u16>, kind: &str, message: impl Into<String>) -> RequestError {
    RequestError {
        status,
        kind: kind.into(),
        message: message.into(),
    }
}

fn transport_error(e: &reqwest::Error) -> RequestError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "stream"
    } else {
        "request"
    };
    err(None, kind, e.to_string())
}

/// Sends one request; fills `rec`'s timing, token counts and error. `rec.sent_ms` must be set
/// by the caller; `started` is the same instant on the monotonic clock.
pub async fn send(
    http: &reqwest::Client,
    target: &Target,
    body: Bytes,
    started: Instant,
    rec: &mut RequestRecord,
) {
    let ms = |t: Instant| t.duration_since(started).as_secs_f64() * 1e3;
    let mut req = http
        .post(target.url())
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = &target.api_key {
        req = req.bearer_auth(key);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(transport_error(&e));
            return;
        }
    };
    let status = resp.status().as_u16();
    if !resp.status().is_success() {
        let body = read_capped(resp, MAX_ERROR_BYTES).await.unwrap_or_default();
        rec.error = Some(api_error(status, &body));
        // How fast a refusal came back matters under overload; the latency aggregates read
        // successful records only, so this does not skew them.
        rec.e2el_ms = Some(ms(Instant::now()));
        return;
    }
    let mut acc = Accumulator::default();
    let mut stream = resp.bytes_stream();
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                rec.error = Some(transport_error(&e));
                return;
            }
        };
        let now = Instant::now();
        total += chunk.len();
        if total > MAX_BODY_BYTES {
            rec.error = Some(err(Some(status), "stream", "reply exceeds the body cap"));
            return;
        }
        buf.extend_from_slice(&chunk);
        if target.stream {
            while let Some(event) = next_event(&mut buf) {
                if let Err(e) = acc.event(&event, ms(now)) {
                    rec.error = Some(e);
                    return;
                }
            }
        }
    }
    let end = ms(Instant::now());
    if target.stream {
        if !acc.done {
            rec.error = Some(err(Some(status), "stream", "stream ended without [DONE]"));
            return;
        }
    } else if let Err(e) = acc.whole(&buf, end) {
        rec.error = Some(e);
        return;
    }
    let Some(ttft) = acc.first_ms else {
        rec.error = Some(err(Some(status), "empty", "no token in the reply"));
        return;
    };
    rec.ttft_ms = Some(ttft);
    rec.e2el_ms = Some(end);
    rec.itl_ms = acc.itl;
    rec.output_tokens = acc.completion_tokens.unwrap_or(acc.chunks);
    if let Some(p) = acc.prompt_tokens {
        rec.input_tokens = p;
    }
    rec.cached_tokens = acc.cached_tokens;
}

async fn read_capped(resp: reqwest::Response, cap: usize) -> Option<String> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(c)) = stream.next().await {
        let room = cap.saturating_sub(out.len());
        out.extend_from_slice(&c[..c.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// An OpenAI error object's `code` (or `type`) classifies the failure.
pub fn api_error(status: u16, body: &str) -> RequestError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let kind = e["code"]
        .as_str()
        .or_else(|| e["type"].as_str())
        .unwrap_or("http_error");
    let message = e["message"].as_str().unwrap_or(body);
    err(
        Some(status),
        kind,
        message.chars().take(300).collect::<String>(),
    )
}

/// Cuts the next complete SSE event (up to a blank line) off the front of `buf`.
pub fn next_event(buf: &mut BytesMut) -> Option<Bytes> {
    let pos = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p, 2))
        .or_else(|| {
            buf.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| (p, 4))
        })?;
    let event = buf.split_to(pos.0 + pos.1).freeze();
    Some(event.slice(..pos.0))
}

#[derive(Debug, Default)]
pub struct Accumulator {
    pub first_ms: Option<f64>,
    last_ms: f64,
    pub itl: Vec<f64>,
    pub chunks: u32,
    pub completion_tokens: Option<u32>,
    pub prompt_tokens: Option<u32>,
    pub cached_tokens: Option<u32>,
    pub done: bool,
}

impl Accumulator {
    /// Feeds one SSE event received at `at_ms`.
    pub fn event(&mut self, event: &[u8], at_ms: f64) -> Result<(), RequestError> {
        let text = String::from_utf8_lossy(event);
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue; // comments, `event:`, `id:` lines
            };
            let data = data.trim();
            if data == "[DONE]" {
                self.done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| err(Some(200), "stream", format!("bad SSE payload: {e}")))?;
            self.payload(&v, at_ms)?;
        }
        Ok(())
    }

    fn payload(&mut self, v: &Value, at_ms: f64) -> Result<(), RequestError> {
        if let Some(e) = v.get("error") {
            return Err(api_error(200, &json!({"error": e}).to_string()));
        }
        self.usage(v);
        let has_text = v["choices"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                let t = c["delta"]["content"]
                    .as_str()
                    .or_else(|| c["text"].as_str());
                t.is_some_and(|t| !t.is_empty())
            })
        });
        if has_text {
            match self.first_ms {
                None => self.first_ms = Some(at_ms),
                Some(_) => self.itl.push(at_ms - self.last_ms),
            }
            self.last_ms = at_ms;
            self.chunks += 1;
        }
        Ok(())
    }

    fn usage(&mut self, v: &Value) {
        let u = &v["usage"];
        let n = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        if let Some(c) = n(&u["completion_tokens"]) {
            self.completion_tokens = Some(c);
        }
        if let Some(p) = n(&u["prompt_tokens"]) {
            self.prompt_tokens = Some(p);
        }
        if let Some(c) = n(&u["prompt_tokens_details"]["cached_tokens"]) {
            self.cached_tokens = Some(c);
        }
    }

    /// A non-streamed reply: the first token is the whole reply.
    fn whole(&mut self, body: &[u8], at_ms: f64) -> Result<(), RequestError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| err(Some(200), "body", format!("reply is not JSON: {e}")))?;
        self.payload(&v, at_ms)?;
        self.done = true;
        Ok(())
    }
}

/// The HTTP client shared by every request: one connection pool, no overall timeout except
/// `timeout` per request, no proxy from the environment.
pub fn http_client(
    timeout: Duration,
    pool: usize,
) -> Result<reqwest::Client, crate::LoadtestError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(|e| crate::LoadtestError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_on_blank_lines_across_chunks() {
        let mut buf = BytesMut::from(&b"data: {\"a\":1}\n\ndata: [DO"[..]);
        assert_eq!(
            next_event(&mut buf).unwrap(),
            Bytes::from_static(b"data: {\"a\":1}")
        );
        assert!(next_event(&mut buf).is_none());
        buf.extend_from_slice(b"NE]\r\n\r\n");
        assert_eq!(
            next_event(&mut buf).unwrap(),
            Bytes::from_static(b"data: [DONE]")
        );
    }

    #[test]
    fn accumulator_times_first_token_and_gaps_and_reads_usage() {
        let mut a = Accumulator::default();
        // The role-only chat chunk carries no text: not a token.
        a.event(
            br#"data: {"choices":[{"delta":{"role":"assistant"}}]}"#,
            5.0,
        )
        .unwrap();
        a.event(br#"data: {"choices":[{"delta":{"content":" hi"}}]}"#, 10.0)
            .unwrap();
        a.event(br#"data: {"choices":[{"text":" there"}]}"#, 25.0)
            .unwrap();
        a.event(br#"data: {"choices":[{"text":"!"}]}"#, 45.0)
            .unwrap();
        a.event(
            br#"data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3}}"#,
            46.0,
        )
        .unwrap();
        a.event(b"data: [DONE]", 46.0).unwrap();
        assert_eq!(a.first_ms, Some(10.0));
        assert_eq!(a.itl, vec![15.0, 20.0]);
        assert_eq!(
            (a.chunks, a.completion_tokens, a.prompt_tokens),
            (3, Some(3), Some(9))
        );
        assert!(a.done);
    }

    #[test]
    fn errors_in_stream_and_bodies_are_classified() {
        let mut a = Accumulator::default();
        let e = a.event(br#"data: {"error":{"message":"boom","type":"server_error","code":"kv_transfer_failed"}}"#, 1.0).unwrap_err();
        assert_eq!(e.kind, "kv_transfer_failed");
        assert!(a.event(b"data: {nope", 1.0).is_err());
        let e = api_error(
            503,
            r#"{"error":{"message":"full","type":"server_error","code":null}}"#,
        );
        assert_eq!(
            (e.status, e.kind.as_str(), e.message.as_str()),
            (Some(503), "server_error", "full")
        );
        assert_eq!(api_error(502, "<html>").kind, "http_error");
    }

    #[test]
    fn bodies_ask_for_exact_lengths() {
        let t = Target {
            base_url: "http://x/".into(),
            api: Api::Chat,
            model: "m".into(),
            api_key: None,
            stream: true,
        };
        let v: Value = serde_json::from_slice(&t.body("hello", 7)).unwrap();
        assert_eq!(v["max_tokens"], 7);
        assert_eq!(v["ignore_eos"], true);
        assert_eq!(v["messages"][0]["content"], "hello");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(t.url(), "http://x/v1/chat/completions");
    }
}
