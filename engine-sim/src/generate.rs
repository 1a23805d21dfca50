//! Completions and chat handlers: a whole request on this engine, or the decode leg of a native
//! PD request (the body carries `pdgate_kv`), in which case the KV blocks must already sit in this
//! engine's pool and every one of them is verified before a token is produced.

use crate::config::Protocol;
use crate::engine::{now_secs, Engine};
use crate::logprobs::Logprobs;
use crate::openai::{usage, ApiError, ApiKind, Envelope, GenRequest};
use crate::pool::Claim;
use crate::protocol::abort::AbortHandle;
use crate::protocol::{self, Decorate, Prepared};
use crate::stats::Stats;
use crate::text;
use crate::verify::verify_claim;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pdgate_scheduler::BuiltinTokenizer;
use pdgate_wire::native::{DecodeLeg, DECODE_FIELD};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long a decode leg waits for its KV blocks' landing notification.
const LANDING_WAIT: Duration = Duration::from_secs(5);

pub async fn completions(
    State(e): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(e, ApiKind::Completions, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn chat(State(e): State<Arc<Engine>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(e, ApiKind::Chat, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

async fn handle(
    e: Arc<Engine>,
    kind: ApiKind,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|err| ApiError::invalid("body", format!("invalid JSON: {err}")))?;
    let req = GenRequest::parse(
        kind,
        &body,
        e.cfg.default_max_tokens,
        e.cfg.max_tokens_limit,
    )?;
    if req.model != e.cfg.model {
        return Err(ApiError {
            status: 404,
            code: Some("model_not_found"),
            ..ApiError::invalid("model", format!("model `{}` is not served here", req.model))
        });
    }
    let rid = request_id(&headers);
    let tokens = BuiltinTokenizer.encode(&req.prompt);
    let seq = text::Sequence::new(&tokens, e.cfg.seed);
    let leg: Option<DecodeLeg> = match body.get(DECODE_FIELD) {
        Some(v) => Some(
            serde_json::from_value::<DecodeLeg>(v.clone())
                .map_err(|err| ApiError::invalid(DECODE_FIELD, err.to_string()))?,
        ),
        None => None,
    };
    let evict_first = leg.as_ref().is_some_and(|l| l.evict_first);
    // Registered for the whole leg, streaming included, so `/abort_request` reaches it.
    let abort = (e.cfg.protocol == Protocol::Sglang).then(|| e.aborts.register(&rid));
    let abort_rx = abort.as_ref().map(AbortHandle::receiver);
    let mut req = req;
    let mut decorate = None;
    // `prompt_here`: the prompt ran through this engine's forward pass, so its logprobs exist
    // here; a decode leg received the KV instead and has only the generated tokens'.
    let (first, claim, prompt_here) = match leg {
        Some(leg) => (
            leg.first_token,
            Some(take_kv(&e, &leg, &tokens).await?),
            false,
        ),
        None => match protocol::prepare(&e, &body, &rid, &tokens, abort_rx.clone()).await? {
            Prepared::Plain => (prefill_locally(&e, &tokens, &seq).await?, None, true),
            Prepared::PrefillOnly(d) => {
                // A prefill-only leg produces exactly the first token, whatever was asked.
                req.max_tokens = 1;
                decorate = Some(d);
                (seq.next_token(), None, true)
            }
            Prepared::Decode(leg) => (
                leg.first.unwrap_or_else(|| seq.next_token()),
                leg.claim,
                false,
            ),
        },
    };
    if claim.is_some() {
        // The KV received for a decode leg stays in this engine's prefix cache (as vLLM keeps
        // it), so a later turn prefilled here reuses it.
        let full = e.hasher.full_blocks(&tokens);
        e.remember(&full, &tokens);
        // Marked after that insert, which would otherwise make the copy ordinary again.
        if evict_first {
            e.evict_first(&full);
        }
    }
    Stats::add(&e.stats.prompt_tokens, tokens.len() as u64);
    let rx = e
        .gpu
        .decode(tokens.len(), req.max_tokens - 1, claim)
        .map_err(|_| ApiError::server(503, "engine_overloaded", "engine queue is full"))?;
    let out = Output {
        engine: Arc::clone(&e),
        rid,
        reply: seq.reply(first, req.max_tokens),
        req,
        prompt_tokens: tokens.len() as u32,
        prompt_here,
        decorate,
        abort: abort.map(|h| (h, abort_rx)),
    };
    Ok(if out.req.stream {
        out.stream(rx)
    } else {
        out.collect(rx).await
    })
}

/// Takes over the reservation and checks every landed block against the prompt's own hashes.
async fn take_kv(e: &Engine, leg: &DecodeLeg, tokens: &[u32]) -> Result<Claim, ApiError> {
    let pool = e
        .pool
        .as_ref()
        .ok_or_else(|| ApiError::invalid(DECODE_FIELD, "this engine is not a decode engine"))?;
    let claim = pool
        .claim(&leg.request_id, LANDING_WAIT)
        .await
        .map_err(|err| ApiError::server(409, "kv_not_ready", err.to_string()))?;
    verify_claim(e, &claim, tokens, &leg.request_id)?;
    Ok(claim)
}

/// Prefills on this engine (a non-PD request), reusing cached leading blocks.
async fn prefill_locally(
    e: &Engine,
    tokens: &[u32],
    seq: &text::Sequence,
) -> Result<u32, ApiError> {
    let full = e.hasher.full_blocks(tokens);
    let lookup = e.lookup_prefix(tokens, &full);
    e.prefill_lookup(lookup)
        .await
        .map_err(|_| ApiError::server(503, "engine_overloaded", "engine queue is full"))?;
    e.remember(&full, tokens);
    Stats::add(&e.stats.generation_tokens, 1);
    Ok(seq.next_token())
}

struct Output {
    engine: Arc<Engine>,
    req: GenRequest,
    rid: String,
    /// The reply's vocabulary indices, all `max_tokens` of them: a pure function of the prompt's
    /// tokens and the first token (see `text`), so computed up front.
    reply: Vec<u32>,
    prompt_tokens: u32,
    /// Whether this engine ran the prompt (and so has its logprobs).
    prompt_here: bool,
    decorate: Option<Decorate>,
    /// The leg's abort registration (kept alive while it generates) and its signal.
    abort: Option<(AbortHandle, Option<watch::Receiver<bool>>)>,
}

impl Output {
    fn id(&self) -> String {
        match self.req.kind {
            ApiKind::Completions => format!("cmpl-{}", self.rid),
            ApiKind::Chat => format!("chatcmpl-{}", self.rid),
        }
    }

    fn piece(&self, position: u32) -> &'static str {
        text::piece(self.reply.get(position as usize).copied().unwrap_or(0))
    }

    /// The logprobs of the answer's first `generated` tokens, or `None` if none were asked for;
    /// the prompt's lead them when asked for and computed here.
    fn logprobs(&self, generated: std::ops::Range<u32>) -> Option<Value> {
        let wanted = self.req.logprobs?;
        let mut lp = Logprobs::new(wanted);
        if wanted.prompt && self.prompt_here && generated.start == 0 {
            lp.push_prompt(&self.req.prompt);
        }
        for position in generated {
            lp.push(self.piece(position));
        }
        Some(lp.to_json())
    }

    /// The text of the token at `position`, the prompt in front of the first when echoed.
    fn text_at(&self, position: u32) -> std::borrow::Cow<'static, str> {
        if position == 0 && self.req.echo {
            return format!("{}{}", self.req.prompt, self.piece(0)).into();
        }
        self.piece(position).into()
    }

    fn abort_signal(&self) -> Option<watch::Receiver<bool>> {
        self.abort.as_ref().and_then(|(_, rx)| rx.clone())
    }

    async fn collect(mut self, mut rx: mpsc::Receiver<()>) -> Response {
        let mut text = self.text_at(0).into_owned();
        let mut n = 1;
        let abort = self.abort_signal();
        while next_step(&mut rx, &abort).await.is_some() {
            text.push_str(self.piece(n));
            n += 1;
        }
        Stats::add(&self.engine.stats.requests_finished, 1);
        let id = self.id();
        let env = Envelope {
            id: &id,
            model: &self.req.model,
            created: now_secs(),
            kind: self.req.kind,
        };
        let finish = if n == self.req.max_tokens {
            "length"
        } else {
            "abort"
        };
        let mut resp = env.full_response(&text, finish, usage(self.prompt_tokens, n));
        if let Some(lp) = self.logprobs(0..n) {
            resp["choices"][0]["logprobs"] = lp;
        }
        if let Some(decorate) = self.decorate.take() {
            decorate(&mut resp);
        }
        ([("x-request-id", self.rid.clone())], Json(resp)).into_response()
    }

    fn stream(self, mut rx: mpsc::Receiver<()>) -> Response {
        let (tx, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let rid = self.rid.clone();
        tokio::spawn(async move {
            let id = self.id();
            let env = Envelope {
                id: &id,
                model: &self.req.model,
                created: now_secs(),
                kind: self.req.kind,
            };
            let total = self.req.max_tokens;
            let with_usage = self.req.include_usage;
            let abort = self.abort_signal();
            let mut position = 0u32;
            loop {
                let last = position + 1 == total;
                let mut chunk = env.chunk(
                    &self.text_at(position),
                    position == 0,
                    last.then_some("length"),
                    with_usage,
                );
                if let Some(lp) = self.logprobs(position..position + 1) {
                    chunk["choices"][0]["logprobs"] = lp;
                }
                if tx.send(Ok(sse(&chunk))).await.is_err() {
                    return; // client gone: dropping `rx` aborts the sequence
                }
                position += 1;
                if position == self.engine.cfg.faults.cut_stream_after_tokens && !last {
                    // A body error makes the server drop the connection mid-chunk; returning
                    // drops `rx`, which aborts the sequence and frees its KV like a crash would.
                    // The pause lets the tokens already sent reach the wire first (the server
                    // discards its unflushed buffer on a body error), as a crash between decode
                    // steps would have left them.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    let _ = tx
                        .send(Err(std::io::Error::other("injected fault: stream cut")))
                        .await;
                    return;
                }
                if last || next_step(&mut rx, &abort).await.is_none() {
                    break;
                }
            }
            Stats::add(&self.engine.stats.requests_finished, 1);
            if with_usage {
                let _ = tx
                    .send(Ok(sse(
                        &env.usage_chunk(usage(self.prompt_tokens, position))
                    )))
                    .await;
            }
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        });
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body_rx));
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header("x-request-id", rid)
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

/// The next decode step, or `None` when the sequence ended or the leg was aborted.
async fn next_step(
    rx: &mut mpsc::Receiver<()>,
    abort: &Option<watch::Receiver<bool>>,
) -> Option<()> {
    match abort {
        None => rx.recv().await,
        Some(a) => tokio::select! {
            step = rx.recv() => step,
            _ = crate::protocol::abort::aborted(a.clone()) => None,
        },
    }
}

pub fn sse(v: &Value) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}
