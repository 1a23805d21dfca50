//! Mid-stream migration, the part without I/O: which requests may be continued on another
//! decode, the continuation request itself (the prompt extended by the text the client already
//! has, `max_tokens` reduced by what was emitted), and the transcript of the client's stream,
//! which records that text and rewrites a continuation's events so the client sees one stream.
//!
//! It never decides when a stream broke or schedules anything: `migrate` does, with this.

use crate::config::Protocol;
use crate::openai::ClientRequest;
use crate::sse;
use bytes::Bytes;
use pdgate_wire::openai::{content_text, prompt_of, ApiKind};
use serde_json::{Map, Value};
use std::sync::Arc;

/// Why a request is not continued if its stream breaks: each case changes what a continuation
/// would produce, beyond which text comes after the break. `protocol`: the decode pool's.
pub fn unsafe_reason(req: &ClientRequest, protocol: Protocol) -> Option<&'static str> {
    let b = &req.body;
    let set = |f: &str| b.get(f).is_some_and(|v| !v.is_null());
    let on = |f: &str| b.get(f).and_then(Value::as_bool).unwrap_or(false);
    let nonzero = |f: &str| b.get(f).and_then(Value::as_f64).is_some_and(|x| x != 0.0);
    if !req.stream {
        // The head of a non-streamed answer arrives with its whole body, so a decode lost
        // before it is retried whole (`decode_attempts`); one lost mid-body cannot be spliced.
        return Some("not_streamed");
    }
    if on("echo") {
        return Some("echo");
    }
    if protocol == Protocol::Trtllm && req.kind == ApiKind::Chat {
        // trtllm-serve's chat API has no `continue_final_message`: the partial answer would be
        // closed as a turn of its own and answered anew.
        return Some("engine_cannot_continue_chat");
    }
    if set("logprobs") && b.get("logprobs") != Some(&Value::Bool(false)) || set("prompt_logprobs") {
        // Offsets and prompt logprobs would restart at the extended prompt.
        return Some("logprobs");
    }
    if b.get("best_of")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 1)
    {
        return Some("best_of");
    }
    if nonzero("presence_penalty") || nonzero("frequency_penalty") {
        // They count generated tokens only; continued, the text already sent becomes prompt
        // and escapes them.
        return Some("penalties");
    }
    if set("seed")
        && !b
            .get("temperature")
            .and_then(Value::as_f64)
            .is_some_and(|t| t == 0.0)
    {
        // A seed promises the same sample for the same request; a continuation samples anew.
        return Some("seeded_sampling");
    }
    let structured = [
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
    ];
    let format_constrained = b
        .pointer("/response_format/type")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "text");
    if format_constrained || structured.iter().any(|f| set(f)) {
        // The grammar would start over at the continuation's first token.
        return Some("structured_output");
    }
    let tools = b
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    if tools && b.get("tool_choice").and_then(Value::as_str) != Some("none") || set("functions") {
        // A tool call is streamed as structured deltas, not text a prompt can carry on.
        return Some("tools");
    }
    None
}

/// The request that continues `req` after the client got `text` (`emitted` tokens): chat gets
/// the text as a final assistant message to continue, completions an extended prompt;
/// `max_tokens` (and `min_tokens`) shrink by what was emitted. `None` when nothing is left to
/// generate.
pub fn request(req: &ClientRequest, text: &str, emitted: u32) -> Option<ClientRequest> {
    let remaining = req.max_tokens.checked_sub(emitted).filter(|&n| n > 0)?;
    let mut body = req.body.clone();
    let obj = body.as_object_mut()?;
    match req.kind {
        ApiKind::Completions => {
            obj.insert(
                "prompt".into(),
                Value::String(format!("{}{text}", req.prompt)),
            );
        }
        ApiKind::Chat => {
            let messages = obj.get_mut("messages")?.as_array_mut()?;
            let continuing = req.body.get("continue_final_message") == Some(&Value::Bool(true));
            match messages.last_mut() {
                // Already a continuation (a client's own, or an earlier migration's): its
                // final assistant message grows.
                Some(last) if continuing => {
                    let before = content_text(last.get("content").unwrap_or(&Value::Null))?;
                    last["content"] = Value::String(before + text);
                }
                _ => messages.push(serde_json::json!({"role": "assistant", "content": text})),
            }
            obj.insert("continue_final_message".into(), Value::Bool(true));
            obj.insert("add_generation_prompt".into(), Value::Bool(false));
        }
    }
    // Only the fields the client set: without one, the engine's own default applies again.
    for field in ["max_tokens", "max_completion_tokens"] {
        if obj.get(field).is_some_and(Value::is_u64) {
            obj.insert(field.into(), remaining.into());
        }
    }
    if let Some(min) = obj.get("min_tokens").and_then(Value::as_u64) {
        obj.insert(
            "min_tokens".into(),
            min.saturating_sub(emitted.into()).into(),
        );
    }
    let prompt = prompt_of(req.kind, &body).ok()?;
    Some(ClientRequest {
        kind: req.kind,
        model: Arc::clone(&req.model),
        body,
        prompt,
        stream: req.stream,
        max_tokens: remaining,
    })
}

/// The client's stream as it went out: its envelope, the text it carried, whether it can still
/// be continued; and, once a continuation took over, the rewriting of that continuation's
/// events into the same stream.
#[derive(Debug)]
pub struct Transcript {
    kind: ApiKind,
    /// `id`, `created`, `model` of the stream's first chunk: every chunk the client sees keeps
    /// them.
    envelope: Option<[(String, Value); 3]>,
    text: String,
    /// A chunk closed the choice: nothing is left to continue.
    finished: bool,
    /// A chunk carried something other than text (a tool call, reasoning): not continuable.
    opaque: Option<&'static str>,
    /// Tokens the client had when the current continuation began; `None` before any.
    carried: Option<u32>,
}

impl Transcript {
    pub fn new(kind: ApiKind) -> Self {
        Self {
            kind,
            envelope: None,
            text: String::new(),
            finished: false,
            opaque: None,
            carried: None,
        }
    }

    /// The text the client has been sent so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Why the stream cannot be continued as it stands, if it cannot.
    pub fn blocker(&self) -> Option<&'static str> {
        if self.finished {
            return Some("finished");
        }
        self.opaque
    }

    /// A continuation takes over; the client already has `emitted` tokens.
    pub fn continue_after(&mut self, emitted: u32) {
        self.carried = Some(emitted);
    }

    /// One whole SSE event on its way to the client: recorded, and rewritten if it comes from
    /// a continuation.
    pub fn pass(&mut self, event: Bytes) -> Bytes {
        let Some(data) = sse::data(&event) else {
            return event;
        };
        let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(&data) else {
            return event;
        };
        if chunk.contains_key("error") {
            return event;
        }
        self.record(&chunk);
        let Some(carried) = self.carried else {
            return event;
        };
        if let Some(envelope) = &self.envelope {
            for (k, v) in envelope {
                chunk.insert(k.clone(), v.clone());
            }
        }
        let delta = chunk
            .get_mut("choices")
            .and_then(|c| c.get_mut(0))
            .and_then(|c| c.get_mut("delta"));
        if let Some(Value::Object(delta)) = delta {
            // The client got its role chunk from the first decode.
            delta.remove("role");
        }
        if let Some(Value::Object(usage)) = chunk.get_mut("usage") {
            rebase_usage(usage, carried);
        }
        let data = Value::Object(chunk).to_string();
        Bytes::from(sse::frame(&data))
    }

    fn record(&mut self, chunk: &Map<String, Value>) {
        if self.envelope.is_none() {
            let field = |k: &str| (k.to_string(), chunk.get(k).cloned().unwrap_or(Value::Null));
            self.envelope = Some([field("id"), field("created"), field("model")]);
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return;
        };
        let piece = match self.kind {
            ApiKind::Completions => choice.get("text"),
            ApiKind::Chat => {
                let delta = choice.get("delta");
                let present = |k: &str| delta.and_then(|d| d.get(k)).is_some_and(|v| !v.is_null());
                if present("tool_calls") || present("function_call") {
                    self.opaque = Some("tools");
                }
                if present("reasoning_content") || present("reasoning") {
                    self.opaque = Some("reasoning");
                }
                delta.and_then(|d| d.get("content"))
            }
        };
        if let Some(p) = piece.and_then(Value::as_str) {
            self.text.push_str(p);
        }
        if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
            self.finished = true;
        }
    }
}

/// A continuation's usage counts its extended prompt, which holds the `carried` tokens the
/// client already had: they move back to the completion, so the client's usage is that of one
/// uninterrupted answer.
fn rebase_usage(usage: &mut Map<String, Value>, carried: u32) {
    let get = |k: &str| usage.get(k).and_then(Value::as_u64);
    let (Some(prompt), Some(completion)) = (get("prompt_tokens"), get("completion_tokens")) else {
        return;
    };
    let carried = u64::from(carried).min(prompt);
    let (prompt, completion) = (prompt - carried, completion + carried);
    usage.insert("prompt_tokens".into(), prompt.into());
    usage.insert("completion_tokens".into(), completion.into());
    usage.insert("total_tokens".into(), (prompt + completion).into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(kind: ApiKind, body: Value) -> ClientRequest {
        let prompt = prompt_of(kind, &body).expect("renders");
        let max_tokens = body["max_completion_tokens"]
            .as_u64()
            .or(body["max_tokens"].as_u64())
            .unwrap_or(16) as u32;
        let models =
            crate::models::Models::build(&crate::config::Config::default()).expect("models");
        ClientRequest {
            kind,
            model: Arc::clone(models.only().expect("one model")),
            stream: true,
            body,
            prompt,
            max_tokens,
        }
    }

    fn chat() -> ClientRequest {
        req(
            ApiKind::Chat,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 10, "stream": true}),
        )
    }

    #[test]
    fn chat_continues_the_partial_assistant_message() {
        let original = chat();
        let c = request(&original, " the cache", 2).expect("tokens left");
        assert_eq!(c.max_tokens, 8);
        assert_eq!(c.body["max_tokens"], 8);
        assert_eq!(c.prompt, format!("{} the cache", original.prompt));
        assert_eq!(c.body["messages"][1]["content"], " the cache");
        // A second migration extends the same message.
        let c2 = request(&c, " warm", 1).expect("tokens left");
        assert_eq!(c2.body["messages"].as_array().map(Vec::len), Some(2));
        assert_eq!(c2.prompt, format!("{} the cache warm", original.prompt));
        assert_eq!(c2.max_tokens, 7);
        assert!(request(&original, "x", 10).is_none(), "nothing left");
    }

    #[test]
    fn completions_extend_the_prompt() {
        let original = req(
            ApiKind::Completions,
            json!({"model": "m", "prompt": "once", "max_completion_tokens": 5, "stream": true}),
        );
        let c = request(&original, " upon", 1).expect("tokens left");
        assert_eq!(
            (c.prompt.as_str(), c.body["prompt"].as_str()),
            ("once upon", Some("once upon"))
        );
        assert_eq!(c.body["max_completion_tokens"], 4);
        assert!(
            c.body.get("max_tokens").is_none(),
            "only what the client set"
        );
    }

    #[test]
    fn unsafe_requests_say_why() {
        let base = chat();
        assert_eq!(unsafe_reason(&base, Protocol::Native), None);
        let with = |extra: Value| {
            let mut r = base.clone();
            for (k, v) in extra.as_object().expect("object") {
                r.body[k] = v.clone();
            }
            unsafe_reason(&r, Protocol::Native)
        };
        assert_eq!(with(json!({"echo": true})), Some("echo"));
        assert_eq!(with(json!({"logprobs": true})), Some("logprobs"));
        assert_eq!(with(json!({"logprobs": false})), None);
        assert_eq!(with(json!({"frequency_penalty": 0.5})), Some("penalties"));
        assert_eq!(
            with(json!({"seed": 1, "temperature": 0.7})),
            Some("seeded_sampling")
        );
        assert_eq!(with(json!({"seed": 1, "temperature": 0})), None);
        assert_eq!(
            with(json!({"response_format": {"type": "json_object"}})),
            Some("structured_output")
        );
        assert_eq!(with(json!({"response_format": {"type": "text"}})), None);
        assert_eq!(
            with(json!({"tools": [{"type": "function"}]})),
            Some("tools")
        );
        assert_eq!(
            with(json!({"tools": [{"type": "function"}], "tool_choice": "none"})),
            None
        );
        assert_eq!(
            unsafe_reason(&base, Protocol::Trtllm),
            Some("engine_cannot_continue_chat")
        );
        let mut unstreamed = base.clone();
        unstreamed.stream = false;
        assert_eq!(
            unsafe_reason(&unstreamed, Protocol::Native),
            Some("not_streamed")
        );
    }

    fn event(v: Value) -> Bytes {
        Bytes::from(sse::frame(&v.to_string()))
    }

    fn data(b: &Bytes) -> Value {
        serde_json::from_str(&sse::data(b).expect("data")).expect("json")
    }

    #[test]
    fn a_continuation_is_rewritten_into_the_first_stream() {
        let mut t = Transcript::new(ApiKind::Chat);
        let first = event(json!({"id": "a", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": " the"}, "finish_reason": null}]}));
        assert_eq!(t.pass(first.clone()), first, "untouched before a migration");
        t.pass(event(json!({"id": "a", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": " cache"}, "finish_reason": null}]})));
        assert_eq!((t.text(), t.blocker()), (" the cache", None));
        t.continue_after(2);
        let cont = t
            .pass(event(json!({"id": "b", "created": 9, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": " warm"}, "finish_reason": "length"}]})));
        let v = data(&cont);
        assert_eq!(
            (v["id"].clone(), v["created"].clone()),
            (json!("a"), json!(1))
        );
        assert_eq!(v["choices"][0]["delta"], json!({"content": " warm"}));
        let usage = t.pass(event(
            json!({"id": "b", "created": 9, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}}),
        ));
        assert_eq!(
            data(&usage)["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
        );
        assert_eq!(t.blocker(), Some("finished"));
        let done = Bytes::from_static(b"data: [DONE]\n\n");
        assert_eq!(t.pass(done.clone()), done);
    }

    #[test]
    fn a_tool_call_delta_blocks_continuation() {
        let mut t = Transcript::new(ApiKind::Chat);
        t.pass(event(json!({"id": "a", "choices": [{"index": 0,
            "delta": {"tool_calls": [{"index": 0}]}, "finish_reason": null}]})));
        assert_eq!(t.blocker(), Some("tools"));
    }
}
