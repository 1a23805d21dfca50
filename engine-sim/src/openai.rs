//! The engine's OpenAI surface: reading a completions or chat request the way an engine does,
//! and writing responses, stream chunks and error objects.
//!
//! It never validates beyond what the engine needs; the gateway does its own, stricter checks.

pub use pdgate_wire::openai::ApiKind;
use pdgate_wire::openai::{echo, logprobs_wanted, prompt_of, RequestError, Wanted};
use serde_json::{json, Value};

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError::invalid(e.param, e.message)
    }
}

/// What the engine needs from a request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub kind: ApiKind,
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions `echo`: the answer's text starts with the prompt.
    pub echo: bool,
    /// Completions `logprobs` (chat logprobs are not emulated).
    pub logprobs: Option<Wanted>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param),
            code: None,
        }
    }

    pub fn server(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some(code),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl GenRequest {
    pub fn parse(
        kind: ApiKind,
        body: &Value,
        default_max_tokens: u32,
        limit: u32,
    ) -> Result<Self, ApiError> {
        let max_tokens = match body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
        {
            None | Some(Value::Null) => default_max_tokens,
            Some(v) => v
                .as_u64()
                .filter(|&n| n >= 1 && n <= u64::from(limit))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "max_tokens",
                        format!("`max_tokens` must be an integer in 1..={limit}"),
                    )
                })? as u32,
        };
        Ok(Self {
            kind,
            model: body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            prompt: prompt_of(kind, body)?,
            max_tokens,
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: body
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            echo: kind == ApiKind::Completions && echo(body),
            logprobs: logprobs_wanted(kind, body)?,
        })
    }
}

pub fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// Shared fields of every response object for one request.
pub struct Envelope<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub created: u64,
    pub kind: ApiKind,
}

impl Envelope<'_> {
    pub fn full_response(&self, text: &str, finish: &str, usage: Value) -> Value {
        match self.kind {
            ApiKind::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            ApiKind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        }
    }

    /// One streamed piece; `first` adds the chat role, `finish` closes the choice.
    pub fn chunk(
        &self,
        piece: &str,
        first: bool,
        finish: Option<&str>,
        with_usage_field: bool,
    ) -> Value {
        let mut v = match self.kind {
            ApiKind::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": piece, "logprobs": null, "finish_reason": finish}],
            }),
            ApiKind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": piece})
                } else {
                    json!({"content": piece})
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        };
        if with_usage_field {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The final `include_usage` chunk: empty choices, usage filled.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let object = match self.kind {
            ApiKind::Completions => "text_completion",
            ApiKind::Chat => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_with_text_parts_and_limits_max_tokens() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}});
        let r = GenRequest::parse(ApiKind::Chat, &body, 16, 100).expect("valid");
        assert_eq!(r.prompt, "<|user|>\nhi\n<|assistant|>\n");
        assert_eq!((r.max_tokens, r.stream, r.include_usage), (5, true, true));
        let too_many = json!({"prompt": "x", "max_tokens": 101});
        assert_eq!(
            GenRequest::parse(ApiKind::Completions, &too_many, 16, 100)
                .unwrap_err()
                .param,
            Some("max_tokens")
        );
    }

    #[test]
    fn missing_prompt_names_the_field() {
        let e =
            GenRequest::parse(ApiKind::Completions, &json!({"model": "m"}), 16, 100).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("prompt")));
        let e = GenRequest::parse(ApiKind::Chat, &json!({"model": "m"}), 16, 100).unwrap_err();
        assert_eq!(e.param, Some("messages"));
    }
}
