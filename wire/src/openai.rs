//! The OpenAI request surface both sides read the same way: which API a request is, the prompt
//! text it renders to (the prefix key is cut from exactly this text, so gateway and engine must
//! agree byte for byte), and the logprobs it asks for.
//!
//! Validation beyond that is each side's own: the gateway is stricter than the engine.

use crate::prompt::{render_chat_ending, ChatTurn, Ending};
use serde_json::Value;

/// The model name served when none is configured.
pub const DEFAULT_MODEL: &str = "pdgate-sim-8b";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    Chat,
}

impl ApiKind {
    /// The route an engine serves this API on.
    pub fn path(self) -> &'static str {
        match self {
            ApiKind::Chat => "/v1/chat/completions",
            ApiKind::Completions => "/v1/completions",
        }
    }
}

/// A request body that does not say what it must: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub param: &'static str,
    pub message: String,
}

impl RequestError {
    fn new(param: &'static str, message: &str) -> Self {
        Self {
            param,
            message: message.to_string(),
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.param)
    }
}

impl std::error::Error for RequestError {}

/// What a completions request asked for: `logprobs: k` (an integer, 0 allowed) turns them on;
/// with `echo: true` too, the prompt's tokens are included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// The request's `logprobs` (OpenAI: how many alternatives per position).
    pub top: u32,
    /// `echo: true`: the prompt's tokens lead, with their logprobs.
    pub prompt: bool,
}

/// Flattens OpenAI message content (a string, or an array of `{type: "text", text}` parts).
pub fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// Renders the prompt text of a request body.
pub fn prompt_of(kind: ApiKind, body: &Value) -> Result<String, RequestError> {
    match kind {
        ApiKind::Completions => match body.get("prompt") {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                Ok(a[0].as_str().unwrap_or_default().to_string())
            }
            _ => Err(RequestError::new("prompt", "`prompt` must be a string")),
        },
        ApiKind::Chat => {
            let msgs = body
                .get("messages")
                .and_then(Value::as_array)
                .ok_or_else(|| RequestError::new("messages", "`messages` must be an array"))?;
            let mut owned = Vec::with_capacity(msgs.len());
            for m in msgs {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| RequestError::new("messages", "every message needs a `role`"))?;
                let content =
                    content_text(m.get("content").unwrap_or(&Value::Null)).ok_or_else(|| {
                        RequestError::new(
                            "messages",
                            "message `content` must be a string or text parts",
                        )
                    })?;
                owned.push((role.to_string(), content));
            }
            let ending = chat_ending(body)?;
            if ending == Ending::ContinueFinal
                && owned.last().is_none_or(|(role, _)| role != "assistant")
            {
                return Err(RequestError::new(
                    "continue_final_message",
                    "`continue_final_message` needs the last message to be the assistant's \
                     (the message to continue)",
                ));
            }
            let turns: Vec<_> = owned
                .iter()
                .map(|(r, c)| ChatTurn {
                    role: r,
                    content: c,
                })
                .collect();
            Ok(render_chat_ending(&turns, ending))
        }
    }
}

/// How a chat request's rendering ends: `continue_final_message: true` leaves the last
/// (assistant) message open for generation to continue; `add_generation_prompt: false` closes
/// the conversation without the assistant header. Both true contradict each other (an open
/// message cannot be followed by a new turn's header), as vLLM also refuses.
pub fn chat_ending(body: &Value) -> Result<Ending, RequestError> {
    let flag = |field: &'static str| match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RequestError::new(
            field,
            &format!("`{field}` must be a boolean"),
        )),
    };
    let generation_prompt = flag("add_generation_prompt")?;
    match (flag("continue_final_message")?, generation_prompt) {
        (Some(true), Some(true)) => Err(RequestError::new(
            "continue_final_message",
            "`continue_final_message` and `add_generation_prompt` cannot both be true",
        )),
        (Some(true), _) => Ok(Ending::ContinueFinal),
        (_, Some(false)) => Ok(Ending::Closed),
        _ => Ok(Ending::GenerationPrompt),
    }
}

/// What a completions request asks for in logprobs: `None` unless `logprobs` is an integer (0
/// included: the chosen tokens' logprobs without alternatives); the prompt's too with
/// `echo: true`. Chat requests: always `None`.
pub fn logprobs_wanted(kind: ApiKind, body: &Value) -> Result<Option<Wanted>, RequestError> {
    if kind != ApiKind::Completions {
        return Ok(None);
    }
    let top = match body.get("logprobs") {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|k| u32::try_from(k).ok())
            .ok_or_else(|| RequestError::new("logprobs", "`logprobs` must be an integer"))?,
    };
    Ok(Some(Wanted {
        top,
        prompt: echo(body),
    }))
}

/// Completions `echo`: the answer's text starts with the prompt.
pub fn echo(body: &Value) -> bool {
    body.get("echo").and_then(Value::as_bool).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_renders_every_turn_and_completions_take_the_string() {
        let chat = json!({"messages": [{"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
        assert_eq!(
            prompt_of(ApiKind::Chat, &chat).expect("renders"),
            "<|system|>\ns\n<|user|>\nab\n<|assistant|>\n"
        );
        assert_eq!(
            prompt_of(ApiKind::Completions, &json!({"prompt": ["one"]})).expect("one-element"),
            "one"
        );
        let e = prompt_of(ApiKind::Completions, &json!({"prompt": 3})).expect_err("not text");
        assert_eq!(e.param, "prompt");
        let e = prompt_of(ApiKind::Chat, &json!({"messages": [{"content": "x"}]}))
            .expect_err("no role");
        assert_eq!(e.param, "messages");
    }

    #[test]
    fn continue_final_message_leaves_the_assistant_message_open() {
        let continued = json!({"messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": " the"}],
            "continue_final_message": true, "add_generation_prompt": false});
        assert_eq!(
            prompt_of(ApiKind::Chat, &continued).expect("renders"),
            "<|user|>\nhi\n<|assistant|>\n the"
        );
        let no_assistant = json!({"messages": [{"role": "user", "content": "hi"}],
            "continue_final_message": true});
        let e = prompt_of(ApiKind::Chat, &no_assistant).expect_err("nothing to continue");
        assert_eq!(e.param, "continue_final_message");
        let both = json!({"messages": [{"role": "assistant", "content": "x"}],
            "continue_final_message": true, "add_generation_prompt": true});
        let e = prompt_of(ApiKind::Chat, &both).expect_err("contradiction");
        assert_eq!(e.param, "continue_final_message");
        let closed = json!({"messages": [{"role": "user", "content": "hi"}],
            "add_generation_prompt": false});
        assert_eq!(
            prompt_of(ApiKind::Chat, &closed).expect("renders"),
            "<|user|>\nhi\n"
        );
    }

    #[test]
    fn logprobs_are_completions_only_and_integers() {
        let body = json!({"logprobs": 2, "echo": true});
        assert_eq!(
            logprobs_wanted(ApiKind::Completions, &body).expect("valid"),
            Some(Wanted {
                top: 2,
                prompt: true
            })
        );
        assert_eq!(logprobs_wanted(ApiKind::Chat, &body).expect("chat"), None);
        let e = logprobs_wanted(ApiKind::Completions, &json!({"logprobs": true}))
            .expect_err("not an integer");
        assert_eq!(e.param, "logprobs");
    }
}
