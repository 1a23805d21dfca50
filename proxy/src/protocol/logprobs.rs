//! Prompt logprobs computed by a prefill leg, merged in front of the decode leg's answer.
//!
//! With `echo` + `logprobs` on `/v1/completions`, only the engine that ran the prompt through the
//! model has the prompt tokens' logprobs: in SGLang PD that is the prefill, while the decode
//! (whose KV arrived from the prefill) answers with the generated tokens' logprobs only. This
//! takes the prompt's part of the prefill's `choices[i].logprobs` (its first `usage.prompt_tokens`
//! entries; the rest is the one token the prefill generated, which the decode repeats) and puts
//! it in front of the decode's: the whole body when not streamed, the first chunk of each choice
//! when streamed — where a single SGLang server puts them. Everything else in the decode's
//! answer (text, usage, finish reasons, later chunks) passes through byte for byte.
//!
//! SGLang's own router merges `meta_info.input_token_logprobs`, the native `/generate` shape; on
//! the OpenAI surface it has nothing to merge. Nothing here may drop or reorder decode bytes, or
//! hide an upstream error: errors pass through for the relay to report.

use crate::relay::Upstream;
use crate::sse;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde_json::{Map, Value};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// The four parallel arrays of an OpenAI completions logprobs object.
const FIELDS: [&str; 4] = ["tokens", "token_logprobs", "top_logprobs", "text_offset"];

/// Largest answer buffered to merge into (a prefill's answer, a non-streamed decode body).
pub const ANSWER_LIMIT: usize = 64 * 1024 * 1024;

/// The prompt's part of a prefill answer's logprobs, by choice index.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobs {
    by_choice: Vec<(u64, Map<String, Value>)>,
}

impl PromptLogprobs {
    /// Reads a prefill leg's answer (one JSON object, or SSE when the request streamed); `None`
    /// when it carries no logprobs to merge.
    pub fn from_answer(answer: &[u8]) -> Option<Self> {
        let objects: Vec<Value> = match serde_json::from_slice::<Value>(answer) {
            Ok(v) => vec![v],
            Err(_) => sse::datas(answer)
                .iter()
                .filter_map(|d| serde_json::from_str(d).ok())
                .collect(),
        };
        Self::from_objects(&objects)
    }

    /// [`Self::from_answer`] for an answer already parsed (the sequential protocols' prefill).
    pub fn from_json(answer: &Value) -> Option<Self> {
        Self::from_objects(std::slice::from_ref(answer))
    }

    fn from_objects(objects: &[Value]) -> Option<Self> {
        let prompt_tokens = objects
            .iter()
            .find_map(|o| o.pointer("/usage/prompt_tokens").and_then(Value::as_u64));
        // Streamed answers may spread a choice over several chunks: concatenate, then cut.
        let mut by_choice: Vec<(u64, Map<String, Value>)> = Vec::new();
        for choice in objects
            .iter()
            .filter_map(|o| o["choices"].as_array())
            .flatten()
        {
            let Some(lp) = choice["logprobs"].as_object() else {
                continue;
            };
            let index = choice["index"].as_u64().unwrap_or(0);
            match by_choice.iter_mut().find(|(i, _)| *i == index) {
                Some((_, acc)) => append(acc, lp),
                None => by_choice.push((index, lp.clone())),
            }
        }
        for (_, lp) in &mut by_choice {
            let len = lp
                .get("tokens")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            // Without usage (a stream without `include_usage`): all but the one generated token.
            let keep = prompt_tokens.map_or(len.saturating_sub(1), |n| n as usize);
            for field in FIELDS {
                if let Some(Value::Array(a)) = lp.get_mut(field) {
                    a.truncate(keep);
                }
            }
        }
        by_choice.retain(|(_, lp)| FIELDS.iter().any(|f| lp.get(*f).is_some()));
        (!by_choice.is_empty()).then_some(Self { by_choice })
    }

    /// Puts the prompt's logprobs in front of one decode choice's; `false` if not ours.
    fn merge_choice(&self, choice: &mut Value) -> bool {
        let Some(choice) = choice.as_object_mut() else {
            return false;
        };
        let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
        let Some((_, prompt)) = self.by_choice.iter().find(|(i, _)| *i == index) else {
            return false;
        };
        let mut merged = prompt.clone();
        if let Some(decode) = choice.get("logprobs").and_then(Value::as_object) {
            append(&mut merged, decode);
            // Fields only the decode knows (none in SGLang's layout) are kept.
            for (k, v) in decode {
                merged.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        choice.insert("logprobs".into(), Value::Object(merged));
        true
    }

    /// Merges into every choice of a whole (non-streamed) answer.
    pub fn merge_body(&self, body: &mut Value) {
        if let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) {
            for c in choices {
                self.merge_choice(c);
            }
        }
    }

    /// Wraps the decode body: `sse` merges into each choice's first chunk and then passes the
    /// rest through untouched; otherwise the body is buffered (up to [`ANSWER_LIMIT`]) and
    /// merged whole.
    pub fn wrap(self, upstream: Upstream, sse: bool) -> Upstream {
        let pending = self.by_choice.iter().map(|(i, _)| *i).collect();
        Box::pin(Merging {
            upstream,
            prompt: self,
            mode: if sse {
                Mode::Sse { pending }
            } else {
                Mode::Json
            },
            buf: BytesMut::new(),
            events: sse::Splitter::default(),
        })
    }
}

/// Appends `more`'s arrays to `acc`'s, field by field.
fn append(acc: &mut Map<String, Value>, more: &Map<String, Value>) {
    for field in FIELDS {
        let Some(Value::Array(extra)) = more.get(field) else {
            continue;
        };
        match acc.get_mut(field) {
            Some(Value::Array(a)) => a.extend(extra.iter().cloned()),
            _ => {
                acc.insert(field.to_string(), Value::Array(extra.clone()));
            }
        }
    }
}

enum Mode {
    /// Buffering a whole JSON body.
    Json,
    /// Streaming; choice indices whose first chunk has not been seen yet.
    Sse {
        pending: Vec<u64>,
    },
    /// Merged (or given up): bytes pass straight through.
    Through,
    Done,
}

struct Merging {
    upstream: Upstream,
    prompt: PromptLogprobs,
    mode: Mode,
    /// A whole JSON body being buffered, or (`Through`) bytes still to pass on.
    buf: BytesMut,
    /// SSE events being cut (`Sse`).
    events: sse::Splitter,
}

impl Merging {
    /// Whole events, merged into the first chunk of every choice still pending; once none is,
    /// the rest passes through untouched.
    fn merge_events(&mut self, events: Vec<Bytes>) -> Bytes {
        let Mode::Sse { pending } = &mut self.mode else {
            return Bytes::from(events.concat());
        };
        let mut out = BytesMut::new();
        for event in &events {
            match merge_event(&self.prompt, pending, event) {
                Some(merged) => out.extend_from_slice(merged.as_bytes()),
                None => out.extend_from_slice(event),
            }
        }
        if pending.is_empty() {
            self.pass_through();
        }
        out.freeze()
    }

    /// Stops merging: whatever was held back goes out first, as it came.
    fn pass_through(&mut self) {
        self.mode = Mode::Through;
        let rest = self.events.take_rest();
        self.buf.extend_from_slice(&rest);
    }
}

/// One SSE event with the prompt's logprobs merged into the choices still pending, or `None`
/// if it holds none of them (then it is sent as it came).
fn merge_event(prompt: &PromptLogprobs, pending: &mut Vec<u64>, event: &[u8]) -> Option<String> {
    if pending.is_empty() {
        return None;
    }
    let mut v: Value = serde_json::from_str(&sse::data(event)?).ok()?;
    let mut changed = false;
    for c in v.get_mut("choices")?.as_array_mut()? {
        let index = c["index"].as_u64().unwrap_or(0);
        if let Some(p) = pending.iter().position(|i| *i == index) {
            if prompt.merge_choice(c) {
                pending.remove(p);
                changed = true;
            }
        }
    }
    changed.then(|| sse::frame(&v.to_string()))
}

impl Stream for Merging {
    type Item = Result<Bytes, crate::http1::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.mode {
                Mode::Done => return Poll::Ready(None),
                Mode::Through if this.buf.is_empty() => return this.upstream.poll_next_unpin(cx),
                Mode::Through => return Poll::Ready(Some(Ok(this.buf.split().freeze()))),
                Mode::Json | Mode::Sse { .. } => {}
            }
            match ready!(this.upstream.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => {
                    if matches!(this.mode, Mode::Json) {
                        this.buf.extend_from_slice(&chunk);
                    } else {
                        let events = this.events.push(&chunk);
                        if !events.is_empty() {
                            return Poll::Ready(Some(Ok(this.merge_events(events))));
                        }
                    }
                    if this.buf.len().max(this.events.pending()) > ANSWER_LIMIT {
                        tracing::warn!(
                            "decode answer too large to merge prompt logprobs into; relayed as is"
                        );
                        this.pass_through();
                    }
                }
                Some(Err(e)) => {
                    // A broken body has nothing left worth merging; the relay reports the error.
                    this.buf.clear();
                    this.events.take_rest();
                    this.mode = Mode::Through;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let mut rest = this.buf.split();
                    rest.extend_from_slice(&this.events.take_rest());
                    let rest = rest.freeze();
                    let out = match std::mem::replace(&mut this.mode, Mode::Done) {
                        Mode::Json => match serde_json::from_slice::<Value>(&rest) {
                            Ok(mut body) => {
                                this.prompt.merge_body(&mut body);
                                Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
                            }
                            Err(_) => {
                                tracing::warn!(
                                    "decode answer is not JSON; prompt logprobs not merged"
                                );
                                rest
                            }
                        },
                        _ => rest,
                    };
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(out)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lp(tokens: &[&str], first_null: bool) -> Value {
        let values: Vec<Value> = (0..tokens.len())
            .map(|i| {
                if i == 0 && first_null {
                    Value::Null
                } else {
                    json!(-(i as f64) - 0.5)
                }
            })
            .collect();
        json!({"tokens": tokens, "token_logprobs": values,
               "top_logprobs": vec![Value::Null; tokens.len()], "text_offset": vec![-1; tokens.len()]})
    }

    fn prefill_answer() -> Value {
        json!({"choices": [{"index": 0, "text": "a b c X", "logprobs": lp(&["a", " b", " c", " X"], true),
               "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    }

    async fn collect(s: Upstream) -> String {
        let parts: Vec<Bytes> = s.map(|r| r.expect("ok")).collect().await;
        String::from_utf8(parts.concat()).expect("utf8")
    }

    /// An upstream body arriving in two frames, cut at byte `at`.
    fn upstream(body: &str, at: usize) -> Upstream {
        let (a, b) = body.split_at(at);
        let frames = [a, b].map(|f| Ok(Bytes::from(f.to_string())));
        Box::pin(futures::stream::iter(frames))
    }

    #[test]
    fn a_choice_that_is_not_an_object_is_left_alone() {
        let prompt = PromptLogprobs::from_json(&json!({"choices": [{"index": 0,
            "logprobs": {"tokens": ["a"], "token_logprobs": [null]}}]}))
        .expect("prompt part");
        let mut body = json!({"choices": [3, "x", null]});
        prompt.merge_body(&mut body);
        assert_eq!(body, json!({"choices": [3, "x", null]}));
    }

    #[test]
    fn prompt_part_is_cut_at_prompt_tokens_from_json_or_sse() {
        let json = serde_json::to_vec(&prefill_answer()).expect("json");
        let p = PromptLogprobs::from_answer(&json).expect("logprobs");
        assert_eq!(p.by_choice[0].1["tokens"], json!(["a", " b", " c"]));
        assert_eq!(p.by_choice[0].1["text_offset"], json!([-1, -1, -1]));
        // Streamed, no usage chunk: all but the one generated token.
        let mut chunk = prefill_answer();
        chunk.as_object_mut().expect("obj").remove("usage");
        let sse = format!("data: {chunk}\n\ndata: [DONE]\n\n");
        assert_eq!(PromptLogprobs::from_answer(sse.as_bytes()), Some(p));
        let none = json!({"choices": [{"index": 0, "text": "x", "logprobs": null}]});
        assert_eq!(
            PromptLogprobs::from_answer(none.to_string().as_bytes()),
            None
        );
    }

    #[tokio::test]
    async fn whole_body_gets_prompt_first_and_keeps_the_rest() {
        let p = PromptLogprobs::from_answer(prefill_answer().to_string().as_bytes()).expect("p");
        let decode = json!({"choices": [{"index": 0, "text": "a b c X Y", "logprobs": lp(&[" X", " Y"], false),
            "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}});
        let merged = collect(p.wrap(upstream(&decode.to_string(), 17), false)).await;
        let out: Value = serde_json::from_str(&merged).expect("json");
        let got = &out["choices"][0]["logprobs"];
        assert_eq!(got["tokens"], json!(["a", " b", " c", " X", " Y"]));
        assert_eq!(got["token_logprobs"][0], Value::Null);
        assert_eq!(got["token_logprobs"][3], json!(-0.5));
        assert_eq!(out["usage"], decode["usage"]);
        assert_eq!(out["choices"][0]["finish_reason"], "length");
    }

    #[tokio::test]
    async fn stream_merges_the_first_chunk_only_across_split_frames() {
        let p = PromptLogprobs::from_answer(prefill_answer().to_string().as_bytes()).expect("p");
        let first =
            json!({"choices": [{"index": 0, "text": "a b c X", "logprobs": lp(&[" X"], false)}]});
        let second =
            json!({"choices": [{"index": 0, "text": " Y", "logprobs": lp(&[" Y"], false)}]});
        let second = format!("data: {second}\n\n");
        let frames = format!("data: {first}\n\n{second}data: [DONE]\n\n");
        // Cut mid-event: the merger must wait for the whole first event.
        let out = collect(p.wrap(upstream(&frames, 25), true)).await;
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{out}");
        let merged: Value =
            serde_json::from_str(events[0].trim_start_matches("data: ")).expect("json");
        assert_eq!(
            merged["choices"][0]["logprobs"]["tokens"],
            json!(["a", " b", " c", " X"])
        );
        assert_eq!(
            format!("{}\n\n", events[1]),
            second,
            "later chunks untouched"
        );
        assert_eq!(events[2], "data: [DONE]");
    }
}
