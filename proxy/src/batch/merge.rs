//! Merging a batch's per-prompt answers, pure JSON in and out: choices renumbered to OpenAI's
//! order (prompt `i`'s choice `j` is `i·n + j`), usage summed, one id. No I/O here, so every rule
//! is unit-tested on its own.

use crate::sse::frame;
use serde_json::{json, Value};

/// What the merge needs to know of the whole batch.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    /// The response `id` every merged object carries (`cmpl-{request id}`, as for one prompt).
    pub id: String,
    /// Choices per prompt (OpenAI's `n`).
    pub n: u64,
    pub include_usage: bool,
}

impl BatchInfo {
    pub fn of(request_id: &str, body: &Value) -> Self {
        Self {
            id: format!("cmpl-{request_id}"),
            n: body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1),
            include_usage: body
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }
    }
}

/// Token counts summed over the prompts of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, usage: &Value) {
        let field = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
        self.prompt_tokens += field("prompt_tokens");
        self.completion_tokens += field("completion_tokens");
        self.total_tokens += field("total_tokens");
    }

    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        })
    }
}

/// Renumbers prompt `prompt`'s choices in place: choice `j` becomes `prompt·n + j`.
fn reindex(choices: &mut Value, prompt: usize, n: u64) {
    let Some(list) = choices.as_array_mut() else {
        return;
    };
    // Engine data: a choice that is not an object is left as it came, never indexed into.
    for choice in list.iter_mut().filter_map(Value::as_object_mut) {
        let own = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
        choice.insert("index".into(), Value::from(prompt as u64 * n + own));
    }
}

/// One completion object from the prompts' answers (in prompt order): the first answer's
/// envelope (`object`, `model`, `created`, …), the batch's id, every choice, the summed usage.
pub fn merge_answers(answers: Vec<Value>, info: &BatchInfo) -> Value {
    let mut merged = Value::Null;
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (i, mut answer) in answers.into_iter().enumerate() {
        let mut own = answer
            .get_mut("choices")
            .map(Value::take)
            .unwrap_or_default();
        reindex(&mut own, i, info.n);
        if let Value::Array(list) = own {
            choices.extend(list);
        }
        usage.add(answer.get("usage").unwrap_or(&Value::Null));
        if merged.is_null() {
            merged = answer;
        }
    }
    choices.sort_by_key(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0));
    if let Some(obj) = merged.as_object_mut() {
        obj.insert("id".into(), Value::from(info.id.as_str()));
        obj.insert("choices".into(), Value::Array(choices));
        obj.insert("usage".into(), usage.to_json());
    }
    merged
}

/// What to do with one SSE event of one prompt's stream.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Send this event (already framed) to the client.
    Forward(String),
    /// Nothing for the client (the prompt's `[DONE]` or usage chunk, kept for the end).
    Skip,
    /// Send this error event and end the merged stream: a prompt's stream failed.
    Fail(String),
}

/// Merges the SSE streams of a batch's prompts: chunks renumbered and carrying the batch's id,
/// `model` and `created` (the first chunk's), each prompt's `[DONE]` and usage chunk held back,
/// then one usage chunk (when asked for) and one `[DONE]` after every prompt ended.
#[derive(Debug)]
pub struct ChunkMerge {
    info: BatchInfo,
    usage: Usage,
    /// `object`, `created` and `model` of the first chunk seen.
    envelope: Option<(Value, Value, Value)>,
    done: Vec<bool>,
}

impl ChunkMerge {
    pub fn new(info: BatchInfo, prompts: usize) -> Self {
        Self {
            info,
            usage: Usage::default(),
            envelope: None,
            done: vec![false; prompts],
        }
    }

    /// One event's `data` from prompt `i`.
    pub fn event(&mut self, i: usize, data: &str) -> Step {
        if data == "[DONE]" {
            if let Some(d) = self.done.get_mut(i) {
                *d = true;
            }
            return Step::Skip;
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(data) else {
            // Not ours to judge: passed on as the engine sent it.
            return Step::Forward(frame(data));
        };
        if chunk.get("error").is_some() {
            return Step::Fail(frame(&chunk.to_string()));
        }
        let (object, created, model) = self.envelope_of(&chunk);
        if is_usage_chunk(&chunk) {
            self.usage.add(&chunk["usage"]);
            return Step::Skip;
        }
        if let Some(choices) = chunk.get_mut("choices") {
            reindex(choices, i, self.info.n);
        }
        if let Some(obj) = chunk.as_object_mut() {
            obj.insert("id".into(), Value::from(self.info.id.as_str()));
            obj.insert("object".into(), object);
            obj.insert("created".into(), created);
            obj.insert("model".into(), model);
        }
        Step::Forward(frame(&chunk.to_string()))
    }

    /// Prompt `i`'s stream ended: an error event if it ended without its `[DONE]` (cut short
    /// without an error of its own: it must not look complete).
    pub fn ended(&self, i: usize) -> Option<String> {
        if self.done.get(i).copied().unwrap_or(true) {
            return None;
        }
        let err = crate::error::ApiError::upstream(
            "decode_stream_interrupted",
            format!("prompt {i}: decode engine stream ended without [DONE]"),
        );
        Some(frame(&err.body().to_string()))
    }

    /// What closes the merged stream once every prompt ended: the summed usage chunk when the
    /// client asked for usage, then `[DONE]`.
    pub fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::with_capacity(2);
        if self.info.include_usage {
            let (object, created, model) = self.envelope_of(&Value::Null);
            let chunk = json!({
                "id": self.info.id, "object": object, "created": created, "model": model,
                "choices": [], "usage": self.usage.to_json(),
            });
            out.push(frame(&chunk.to_string()));
        }
        out.push(frame("[DONE]"));
        out
    }

    fn envelope_of(&mut self, chunk: &Value) -> (Value, Value, Value) {
        let field = |k: &str, default: Value| chunk.get(k).cloned().unwrap_or(default);
        self.envelope
            .get_or_insert_with(|| {
                (
                    field("object", Value::from("text_completion")),
                    field("created", Value::from(0)),
                    field("model", Value::Null),
                )
            })
            .clone()
    }
}

/// The engines' final `include_usage` chunk: no choices, usage filled.
fn is_usage_chunk(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(n: u64, include_usage: bool) -> BatchInfo {
        BatchInfo {
            id: "cmpl-b".into(),
            n,
            include_usage,
        }
    }

    fn answer(id: &str, texts: &[&str], usage: (u64, u64)) -> Value {
        let choices: Vec<Value> = texts
            .iter()
            .enumerate()
            .map(|(j, t)| json!({"index": j, "text": t, "finish_reason": "length"}))
            .collect();
        json!({"id": id, "object": "text_completion", "created": 7, "model": "m",
               "choices": choices,
               "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1}})
    }

    #[test]
    fn answers_merge_in_prompt_order_with_summed_usage() {
        let merged = merge_answers(
            vec![
                answer("cmpl-b-0", &["a"], (3, 2)),
                answer("cmpl-b-1", &["b"], (5, 2)),
                answer("cmpl-b-2", &["c"], (1, 2)),
            ],
            &info(1, false),
        );
        assert_eq!(merged["id"], "cmpl-b");
        assert_eq!(
            (merged["created"].clone(), merged["model"].clone()),
            (7.into(), "m".into())
        );
        let texts: Vec<_> = merged["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .map(|c| (c["index"].as_u64().unwrap_or(99), c["text"].clone()))
            .collect();
        assert_eq!(texts, [(0, "a".into()), (1, "b".into()), (2, "c".into())]);
        assert_eq!(
            merged["usage"],
            json!({"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15})
        );
    }

    #[test]
    fn with_n_choices_prompt_i_owns_indices_i_n_to_i_n_plus_n() {
        let merged = merge_answers(
            vec![
                answer("x", &["a0", "a1"], (1, 1)),
                answer("y", &["b0", "b1"], (1, 1)),
            ],
            &info(2, false),
        );
        let order: Vec<_> = merged["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .map(|c| (c["index"].as_u64().unwrap_or(99), c["text"].clone()))
            .collect();
        assert_eq!(
            order,
            [
                (0, "a0".into()),
                (1, "a1".into()),
                (2, "b0".into()),
                (3, "b1".into())
            ]
        );
    }

    fn chunk(text: &str, index: u64, created: u64) -> String {
        json!({"id": "sub", "object": "text_completion", "created": created, "model": "m",
               "choices": [{"index": index, "text": text, "finish_reason": null}], "usage": null})
        .to_string()
    }

    fn forwarded(step: Step) -> Value {
        match step {
            Step::Forward(s) => {
                serde_json::from_str(s.strip_prefix("data: ").map(str::trim).unwrap_or_default())
                    .expect("json event")
            }
            other => panic!("expected a forwarded chunk, got {other:?}"),
        }
    }

    #[test]
    fn chunks_are_renumbered_and_share_one_envelope() {
        let mut m = ChunkMerge::new(info(2, true), 2);
        let c = forwarded(m.event(1, &chunk("x", 1, 9)));
        assert_eq!(
            (c["choices"][0]["index"].clone(), c["id"].clone()),
            (3.into(), "cmpl-b".into())
        );
        let c = forwarded(m.event(0, &chunk("y", 0, 10)));
        assert_eq!(c["choices"][0]["index"], 0);
        assert_eq!(c["created"], 9, "the first chunk's `created` for all");
    }

    #[test]
    fn odd_engine_events_pass_without_panicking() {
        let mut m = ChunkMerge::new(info(1, false), 2);
        for odd in ["1", "[]", r#"{"choices":[1,"x",null]}"#, r#"{"choices":7}"#] {
            assert!(matches!(m.event(0, odd), Step::Forward(_)), "{odd}");
        }
    }

    #[test]
    fn usage_chunks_and_dones_are_held_for_one_summed_close() {
        let mut m = ChunkMerge::new(info(1, true), 2);
        let usage = |p: u64| {
            json!({"id": "s", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": p, "completion_tokens": 2, "total_tokens": p + 2}})
            .to_string()
        };
        assert_eq!(m.event(0, &usage(3)), Step::Skip);
        assert_eq!(m.event(1, &usage(4)), Step::Skip);
        assert_eq!(m.event(0, "[DONE]"), Step::Skip);
        assert_eq!(m.event(1, "[DONE]"), Step::Skip);
        assert_eq!((m.ended(0), m.ended(1)), (None, None));
        let close = m.finish();
        assert_eq!(close.len(), 2);
        assert!(close[0].contains(r#""total_tokens":11"#), "{}", close[0]);
        assert!(close[0].contains(r#""choices":[]"#), "{}", close[0]);
        assert_eq!(close[1], "data: [DONE]\n\n");
    }

    #[test]
    fn an_error_event_fails_and_a_stream_without_done_is_an_error() {
        let mut m = ChunkMerge::new(info(1, false), 2);
        let err = r#"{"error":{"message":"cut","type":"upstream_error","param":null,"code":"decode_stream_interrupted"}}"#;
        assert!(
            matches!(m.event(1, err), Step::Fail(s) if s.contains("decode_stream_interrupted"))
        );
        let _ = m.event(0, &chunk("x", 0, 1));
        let cut = m.ended(0).expect("no [DONE] seen");
        assert!(cut.contains("decode_stream_interrupted"), "{cut}");
        assert_eq!(
            m.finish(),
            vec!["data: [DONE]\n\n".to_string()],
            "no usage unless asked"
        );
    }
}
