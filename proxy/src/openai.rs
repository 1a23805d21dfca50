//! Validation of client requests at the gateway: malformed JSON, missing or mistyped fields
//! (named in the error), unknown models. Unknown fields pass through untouched to the engines.

use crate::error::ApiError;
use pdgate_engine_sim::openai::{prompt_of, ApiKind};
use serde_json::Value;

/// Output length assumed for load predictions when a request names none: what the reference
/// engine generates by default.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// A request that passed validation, with the fields the gateway itself needs.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub kind: ApiKind,
    pub body: Value,
    pub prompt: String,
    pub stream: bool,
    /// Tokens the client may get at most (for decode load predictions).
    pub max_tokens: u32,
}

pub fn parse(kind: ApiKind, raw: &[u8], served_model: &str) -> Result<ClientRequest, ApiError> {
    let body: Value = serde_json::from_slice(raw).map_err(ApiError::malformed_json)?;
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "request body must be a JSON object"))?;
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
        None => return Err(ApiError::invalid("model", "`model` is required")),
    };
    match kind {
        ApiKind::Chat => check_messages(obj.get("messages"))?,
        ApiKind::Completions => check_prompt(obj.get("prompt"))?,
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(v) = obj.get(field).filter(|v| !v.is_null()) {
            if v.as_u64().is_none_or(|n| n < 1) {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` must be a positive integer"),
                ));
            }
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be a boolean")),
    };
    if let Some(n) = obj.get("n").filter(|v| !v.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(ApiError::invalid("n", "only `n: 1` is supported"));
        }
    }
    if model != served_model {
        return Err(ApiError::model_not_found(model));
    }
    let prompt = prompt_of(kind, &body)
        .map_err(|e| ApiError::invalid(e.param.unwrap_or("body"), e.message))?;
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|f| obj.get(*f).and_then(Value::as_u64))
        .map_or(DEFAULT_MAX_TOKENS, |n| u32::try_from(n).unwrap_or(u32::MAX));
    Ok(ClientRequest {
        kind,
        body,
        prompt,
        stream,
        max_tokens,
    })
}

fn check_messages(messages: Option<&Value>) -> Result<(), ApiError> {
    let list = match messages {
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ApiError::invalid("messages", "`messages` must be an array")),
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    for (i, m) in list.iter().enumerate() {
        if !m.get("role").is_some_and(Value::is_string) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                "every message needs a string `role`",
            ));
        }
        match m.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Array(_)) => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].content"),
                    "`content` must be a string or an array of parts",
                ))
            }
        }
    }
    Ok(())
}

fn check_prompt(prompt: Option<&Value>) -> Result<(), ApiError> {
    match prompt {
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(()),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "batched prompts are not supported; send one string",
        )),
        Some(_) => Err(ApiError::invalid("prompt", "`prompt` must be a string")),
        None => Err(ApiError::invalid("prompt", "`prompt` is required")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn err(kind: ApiKind, raw: &str) -> ApiError {
        parse(kind, raw.as_bytes(), "m").expect_err("should fail")
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(
            err(ApiKind::Chat, r#"{"model":"m"}"#).param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            err(
                ApiKind::Chat,
                r#"{"model":"m","messages":[{"content":"x"}]}"#
            )
            .param
            .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(ApiKind::Completions, r#"{"model":"m","prompt":3}"#)
                .param
                .as_deref(),
            Some("prompt")
        );
        assert_eq!(
            err(
                ApiKind::Completions,
                r#"{"model":"m","prompt":"x","max_tokens":0}"#
            )
            .param
            .as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            err(
                ApiKind::Completions,
                r#"{"model":"m","prompt":"x","stream":"yes"}"#
            )
            .param
            .as_deref(),
            Some("stream")
        );
        assert_eq!(
            err(ApiKind::Completions, r#"{"prompt":"x"}"#)
                .param
                .as_deref(),
            Some("model")
        );
    }

    #[test]
    fn malformed_json_and_unknown_model_statuses() {
        assert_eq!(
            err(ApiKind::Chat, "{not json").status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(err(ApiKind::Chat, "[]").status, StatusCode::BAD_REQUEST);
        let e = err(
            ApiKind::Chat,
            r#"{"model":"other","messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
    }

    #[test]
    fn valid_request_keeps_unknown_fields_and_renders_every_message() {
        let raw = r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}],"stream":true,"vendor_x":1}"#;
        let r = parse(ApiKind::Chat, raw.as_bytes(), "m").expect("valid");
        assert!(r.stream);
        assert_eq!(r.body["vendor_x"], 1);
        assert!(r.prompt.contains("<|system|>\ns\n") && r.prompt.contains("<|user|>\nu\n"));
    }
}
