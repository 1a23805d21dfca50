//! The one leg runner: executes a [`PdProtocol`]'s phases for a request, up to the decode leg's
//! response head. What makes PD hold under failure lives here once for every protocol:
//! deadlines, a failure attributed to the leg that failed (and whether a retry elsewhere may
//! succeed), the abort or release of what the other leg holds, and the wait for the prefill's
//! prompt logprobs.
//!
//! Sequential: prefill leg, its answer, then the decode leg built from it. Concurrent: both legs
//! at once; the client gets decode's response **as soon as decode's head arrives** and the
//! prefill answer is drained in the background. If either leg fails, the other is called off
//! ([`Abort`]) and the client gets one error naming the failed leg; a client that leaves aborts
//! both. One exception: a completions request with `echo` + `logprobs` wants the prompt's
//! logprobs, which only the prefill computed; then the prefill's answer is awaited too (a
//! prefill failing then is retried elsewhere like any other: no byte reached the client) and its
//! prompt logprobs are merged in front of decode's (`logprobs.rs`).

use super::abort::{abort, AbortGuard};
use super::legs;
use super::logprobs::PromptLogprobs;
use super::phases::{Abort, PdProtocol, PrefillAnswer, Shape};
use super::types::{DecodeStart, LegContext, LegError};
use crate::workers::Worker;
use bytes::Bytes;
use pdgate_scheduler::{Observed, Role};
use std::time::{Duration, Instant};

/// Runs a request's legs on a (prefill, decode) pair; `on_prefill_done` is called once the
/// prefill (and its KV handoff) finished, with what was measured.
pub async fn run<P: PdProtocol>(
    protocol: &P,
    ctx: &LegContext<'_>,
    prefill: &Worker,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let state = protocol.prepare(ctx, prefill).await?;
    let result = match P::SHAPE {
        Shape::Sequential => sequential(protocol, ctx, prefill, &state, on_prefill_done).await,
        Shape::Concurrent { abort } => match concurrent_legs(protocol, ctx, prefill, &state, abort)
        {
            Ok(legs) => concurrent(ctx, legs, on_prefill_done).await,
            Err(e) => Err(e),
        },
    };
    match &result {
        Ok(_) => protocol.handed_over(state),
        // Awaited: the retry that follows may set up again under the same request id.
        Err(e) if e.role == Role::Prefill => protocol.release(state).await,
        // Dropped, so whatever it holds is freed in the background: the decode engine, which
        // would take the release, may be the one not answering.
        Err(_) => drop(state),
    }
    result
}

/// The scheduler chose decode-local prefill: the plain request, in every protocol.
pub async fn decode_local(
    ctx: &LegContext<'_>,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let response = legs::decode_head(ctx, &ctx.req.body, &[]).await?;
    on_prefill_done(None);
    Ok(DecodeStart::new(response))
}

/// The prefill leg, its answer, then the decode leg built from that answer.
async fn sequential<P: PdProtocol>(
    protocol: &P,
    ctx: &LegContext<'_>,
    prefill: &Worker,
    state: &P::State,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let body = protocol.prefill_body(ctx, state);
    let started = Instant::now();
    let answer: P::Answer = legs::prefill_answer(ctx, &prefill.url, body).await?;
    let elapsed = started.elapsed();
    let decode_body = protocol.decode_body(ctx, prefill, state, Some(&answer))?;
    on_prefill_done(Some(protocol.reported(&answer, elapsed)));
    // Armed until decode's head: a decode that failed (or a client that left) before it will
    // never read what the prefill holds for it.
    let mut held = protocol
        .held_by_prefill(&answer)
        .map(|key| AbortGuard::new(&ctx.state.client, vec![prefill.url.clone()], &key));
    let response = legs::decode_head_raw(ctx, decode_body, &[]).await?;
    if let Some(g) = held.as_mut() {
        g.disarm();
    }
    Ok(DecodeStart {
        prompt_logprobs: answer.prompt_logprobs(ctx),
        ..DecodeStart::new(response)
    })
}

/// Two legs to send at once.
struct Concurrent<'a> {
    rid: &'a str,
    prefill_url: &'a str,
    prefill_body: Bytes,
    decode_body: Bytes,
    abort: Abort,
    /// The client asked for prompt logprobs: wait for the prefill's answer and merge them.
    prompt_logprobs: bool,
}

/// The prefill leg's future, boxed so it can move to a task of its own mid-flight.
type PrefillLeg =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Vec<u8>>, LegError>> + Send>>;

/// How long a failed decode waits to see whether its prefill failed first.
const BLAME_WINDOW: Duration = Duration::from_millis(200);

/// A concurrent protocol's legs, both built before either is sent.
fn concurrent_legs<'a, P: PdProtocol>(
    protocol: &P,
    ctx: &'a LegContext<'_>,
    prefill: &'a Worker,
    state: &'a P::State,
    abort: Abort,
) -> Result<Concurrent<'a>, LegError> {
    Ok(Concurrent {
        rid: protocol.rid(ctx, state),
        prefill_url: &prefill.url,
        prefill_body: protocol.prefill_body(ctx, state),
        decode_body: protocol.decode_body(ctx, prefill, state, None)?,
        abort,
        prompt_logprobs: legs::wants_prompt_logprobs(ctx),
    })
}

/// Sends both legs at once and returns decode's head as soon as it arrives (with prompt
/// logprobs wanted: once the prefill's answer is in too).
async fn concurrent(
    ctx: &LegContext<'_>,
    legs: Concurrent<'_>,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    let mut flight = Flight::new(ctx, &legs);
    let keep = legs.prompt_logprobs;
    // Polled here alongside the decode leg; handed to a task of its own only if it outlives
    // decode's head (most prefills answer first, so most requests spawn nothing).
    let mut prefill = prefill_leg(ctx, legs.rid, legs.prefill_url, legs.prefill_body, keep);
    let decode = legs::decode_head_raw(ctx, legs.decode_body, &[]);
    tokio::pin!(decode);
    let first = tokio::select! {
        d = &mut decode => Ok(d),
        p = &mut prefill => Err(p),
    };
    let response = match first {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Err(flight.decode_failed(e, prefill).await),
        Err(Err(e)) => {
            flight.drop_decode();
            return Err(e);
        }
        Err(Ok(answer)) => {
            on_prefill_done(None);
            return match decode.await {
                Ok(response) => Ok(flight.started(response, answer)),
                Err(e) => {
                    flight.disarm();
                    Err(e)
                }
            };
        }
    };
    if !keep {
        on_prefill_done(None);
        flight.outlive(prefill);
        return Ok(flight.started(response, None));
    }
    // The prompt's logprobs are the prefill's: wait for its answer (bounded by its deadline).
    // A prefill failing now is retried elsewhere; nothing reached the client.
    let answer = prefill.await;
    on_prefill_done(None);
    match answer {
        Ok(answer) => Ok(flight.started(response, answer)),
        Err(e) => {
            flight.drop_decode();
            Err(e)
        }
    }
}

/// A concurrent protocol's prefill leg, under its own deadline.
fn prefill_leg(
    ctx: &LegContext<'_>,
    rid: &str,
    engine: &str,
    body: Bytes,
    keep: bool,
) -> PrefillLeg {
    let timeout = Duration::from_secs(ctx.state.cfg.upstream.prefill_timeout_secs);
    let url = format!("{engine}{}", ctx.req.kind.path());
    Box::pin(legs::prefill_drained(
        ctx.state.client.clone(),
        url,
        engine.to_string(),
        body,
        rid.to_string(),
        timeout,
        keep,
    ))
}

/// A concurrent request's two legs in flight, and what it takes to call either off.
struct Flight<'a> {
    client: &'a crate::http1::Client,
    rid: &'a str,
    prefill_url: &'a str,
    decode_url: &'a str,
    abort: Abort,
    guard: Option<AbortGuard>,
}

impl<'a> Flight<'a> {
    fn new(ctx: &'a LegContext<'_>, legs: &Concurrent<'a>) -> Self {
        let client = &ctx.state.client;
        let decode_url = ctx.decode.url.as_str();
        Self {
            client,
            rid: legs.rid,
            prefill_url: legs.prefill_url,
            decode_url,
            abort: legs.abort,
            // Armed until the legs' fate is known: a client leaving mid-handoff aborts both.
            guard: (legs.abort == Abort::Call).then(|| {
                let urls = vec![legs.prefill_url.to_string(), decode_url.to_string()];
                AbortGuard::new(client, urls, legs.rid)
            }),
        }
    }

    fn disarm(&mut self) {
        if let Some(g) = self.guard.as_mut() {
            g.disarm();
        }
    }

    /// Calls off the leg on `url`; without an abort call, dropping its connection does.
    fn abort_leg(&self, url: &str) {
        if self.abort == Abort::Call {
            abort(self.client, url, self.rid);
        }
    }

    /// A failed prefill before any byte reached the client: the decode leg goes too.
    fn drop_decode(&mut self) {
        self.disarm();
        self.abort_leg(self.decode_url);
    }

    /// Decode's head, to go out with the prompt logprobs of the prefill's answer (when it was
    /// kept).
    fn started(self, response: crate::http1::Response, answer: Option<Vec<u8>>) -> DecodeStart {
        DecodeStart {
            response,
            abort_on_drop: self.guard,
            prompt_logprobs: answer.as_deref().and_then(prompt_part),
        }
    }

    /// Decode streams now; a prefill failing later must not leave it waiting.
    fn outlive(&self, prefill: PrefillLeg) {
        let (decode_url, client, rid) = (
            self.decode_url.to_string(),
            self.client.clone(),
            self.rid.to_string(),
        );
        let abort_call = self.abort == Abort::Call;
        tokio::spawn(async move {
            if let Err(e) = prefill.await {
                tracing::warn!(request_id = %rid, message = %e.error.message, "prefill failed after decode started; aborting decode");
                if abort_call {
                    abort(&client, &decode_url, &rid);
                }
            }
        });
    }

    /// The decode leg failed before its head: the error to return, and the prefill called off.
    async fn decode_failed(mut self, e: LegError, mut prefill: PrefillLeg) -> LegError {
        self.disarm();
        // A decode that failed because its prefill is gone (bootstrap unreachable) is the
        // prefill's failure: attribute it there, so the request is retried elsewhere.
        if let Ok(Err(pe)) = tokio::time::timeout(BLAME_WINDOW, &mut prefill).await {
            return pe;
        }
        self.abort_leg(self.prefill_url);
        // Dropping the prefill leg closes its connection: engines without an abort call
        // (vLLM) abort on disconnect.
        drop(prefill);
        e
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, WorkerConfig};
    use crate::openai::ClientRequest;
    use crate::protocol::{sglang::Sglang, trtllm::Trtllm, vllm_nixl::VllmNixl};
    use crate::state::AppState;
    use parking_lot::Mutex;
    use pdgate_wire::openai::ApiKind;
    use serde_json::{json, Value};
    use std::sync::Arc;

    /// What a fake engine was sent: (path, body).
    type Seen = Arc<Mutex<Vec<(String, Value)>>>;

    /// An engine answering every request with `status` and `answer`; returns its URL.
    async fn engine(status: u16, answer: Value) -> (String, Seen) {
        let seen = Seen::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |uri: http::Uri, body: Bytes| {
            let (log, answer) = (log.clone(), answer.clone());
            async move {
                let body = serde_json::from_slice(&body).unwrap_or_default();
                log.lock().push((uri.path().to_string(), body));
                let status = http::StatusCode::from_u16(status).expect("status");
                (status, axum::Json(answer))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    /// A pair of workers in a fresh gateway state, and a completions request.
    struct Pair {
        state: Arc<AppState>,
        prefill: Arc<Worker>,
        decode: Arc<Worker>,
        req: ClientRequest,
    }

    impl Pair {
        fn new(prefill_url: &str, decode_url: &str) -> Self {
            let cfg = Config::default();
            let access = crate::access::Access::new(&cfg.server, None, [127, 0, 0, 1].into())
                .expect("access");
            let state = AppState::new(cfg, access).expect("state");
            let add = |url: &str, role| {
                let cfg = WorkerConfig {
                    url: url.into(),
                    role,
                    protocol: Default::default(),
                    bootstrap_port: None,
                    kv_events: None,
                    kv_events_replay: None,
                };
                state.models.all()[0].fleet.add(&cfg)
            };
            let (prefill, decode) = (
                add(prefill_url, Role::Prefill),
                add(decode_url, Role::Decode),
            );
            let req = ClientRequest {
                kind: ApiKind::Completions,
                model: std::sync::Arc::clone(&state.models.all()[0]),
                body: json!({"model": "m", "prompt": "hello", "max_tokens": 4}),
                prompt: "hello".into(),
                stream: false,
                max_tokens: 4,
            };
            Self {
                state,
                prefill,
                decode,
                req,
            }
        }

        fn ctx(&self) -> LegContext<'_> {
            LegContext {
                state: &self.state,
                request_id: "req-1",
                req: &self.req,
                prompt_tokens: 1,
                prefill: Some(&self.prefill),
                decode: &self.decode,
                pull: None,
                evict_first: None,
            }
        }

        /// Runs `protocol`; also returns what `on_prefill_done` was called with, if it was.
        async fn run<P: PdProtocol>(
            &self,
            protocol: &P,
        ) -> (Result<DecodeStart, LegError>, Option<Option<Observed>>) {
            let mut done = None;
            let result = run(protocol, &self.ctx(), &self.prefill, |o| done = Some(o)).await;
            (result, done)
        }
    }

    type Log = Arc<Mutex<Vec<&'static str>>>;

    /// A sequential protocol (vLLM NIXL's bodies) whose state logs how it ended.
    struct Probe(Log);

    struct Lease {
        log: Log,
        open: bool,
    }

    impl Lease {
        fn end(mut self, how: &'static str) {
            self.open = false;
            self.log.lock().push(how);
        }
    }

    impl Drop for Lease {
        fn drop(&mut self) {
            if self.open {
                self.log.lock().push("dropped");
            }
        }
    }

    impl PdProtocol for Probe {
        const SHAPE: Shape = Shape::Sequential;
        type State = Lease;
        type Answer = Value;

        async fn prepare(&self, _: &LegContext<'_>, _: &Worker) -> Result<Lease, LegError> {
            let log = self.0.clone();
            Ok(Lease { log, open: true })
        }

        fn prefill_body(&self, ctx: &LegContext<'_>, _: &Lease) -> Bytes {
            VllmNixl.prefill_body(ctx, &())
        }

        fn decode_body(
            &self,
            ctx: &LegContext<'_>,
            prefill: &Worker,
            _: &Lease,
            answer: Option<&Value>,
        ) -> Result<Bytes, LegError> {
            VllmNixl.decode_body(ctx, prefill, &(), answer)
        }

        async fn release(&self, lease: Lease) {
            lease.end("released");
        }

        fn handed_over(&self, lease: Lease) {
            lease.end("handed over");
        }
    }

    fn params() -> Value {
        json!({"kv_transfer_params": {"remote_engine_id": "e", "remote_block_ids": [1]}})
    }

    #[tokio::test]
    async fn sequential_answer_without_params_is_a_retryable_prefill_failure_and_no_decode_leg() {
        let (prefill, _) = engine(200, json!({"choices": [{"text": "a"}]})).await;
        let (decode, decode_seen) = engine(200, json!({})).await;
        let pair = Pair::new(&prefill, &decode);
        let log = Log::default();
        let (result, done) = pair.run(&Probe(log.clone())).await;
        let e = result.err().expect("fails");
        assert_eq!((e.role, e.retryable), (Role::Prefill, true));
        assert_eq!(e.error.code, Some("prefill_failed"));
        assert!(done.is_none(), "the prefill did not finish its handoff");
        assert!(
            decode_seen.lock().is_empty(),
            "no decode leg without params"
        );
        assert_eq!(*log.lock(), ["released"]);
        // The same for the real protocols, TRT-LLM's context leg included.
        let (result, _) = pair.run(&Trtllm).await;
        let e = result.err().expect("fails");
        assert_eq!((e.role, e.retryable), (Role::Prefill, true));
        assert!(decode_seen.lock().is_empty());
    }

    #[tokio::test]
    async fn sequential_state_is_released_handed_over_or_dropped_exactly_once() {
        let (ok_prefill, _) = engine(200, params()).await;
        let (bad_prefill, _) = engine(500, json!({})).await;
        let (ok_decode, decode_seen) = engine(200, json!({"choices": []})).await;
        let (bad_decode, _) = engine(500, json!({})).await;
        for (prefill, decode, outcome, ended) in [
            (&bad_prefill, &ok_decode, Err(Role::Prefill), "released"),
            (&ok_prefill, &bad_decode, Err(Role::Decode), "dropped"),
            (&ok_prefill, &ok_decode, Ok(()), "handed over"),
        ] {
            let log = Log::default();
            let pair = Pair::new(prefill, decode);
            let (result, done) = pair.run(&Probe(log.clone())).await;
            assert_eq!(result.as_ref().map(|_| ()).map_err(|e| e.role), outcome);
            assert_eq!(*log.lock(), [ended]);
            let prefill_ms = done.flatten().map(|o| o.prefill_ms);
            assert_eq!(prefill_ms.is_some(), prefill == &ok_prefill);
        }
        let (_, body) = decode_seen.lock().pop().expect("a decode leg");
        assert_eq!(body["kv_transfer_params"], params()["kv_transfer_params"]);
        assert_eq!(
            body["max_tokens"], 4,
            "the client's body, not the prefill's"
        );
    }

    #[tokio::test]
    async fn concurrent_legs_share_one_body_and_a_failed_pair_blames_the_prefill() {
        let (prefill, prefill_seen) = engine(200, json!({"choices": []})).await;
        let (decode, decode_seen) = engine(200, json!({"choices": []})).await;
        let pair = Pair::new(&prefill, &decode);
        let (result, done) = pair.run(&Sglang).await;
        assert!(result.is_ok());
        assert!(
            matches!(done, Some(None)),
            "concurrent legs measure nothing"
        );
        // The prefill leg may still be draining in the background.
        for _ in 0..100 {
            if !prefill_seen.lock().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, p) = prefill_seen.lock()[0].clone();
        let (_, d) = decode_seen.lock()[0].clone();
        assert_eq!(p, d);
        let rid = p["rid"].as_str().expect("rid");
        assert!(rid.starts_with("req-1-"), "{rid}");

        // Both legs fail: the decode's failure is the prefill's (its partner went away).
        let (prefill, _) = engine(500, json!({})).await;
        let (decode, _) = engine(502, json!({})).await;
        let pair = Pair::new(&prefill, &decode);
        let (result, done) = pair.run(&Sglang).await;
        let e = result.err().expect("fails");
        assert_eq!((e.role, e.retryable), (Role::Prefill, true));
        assert!(done.is_none());
    }
}
