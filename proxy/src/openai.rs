//! Validation of client requests at the gateway: malformed JSON, missing or mistyped fields
//! (named in the error), unknown models. Unknown fields pass through untouched to the engines.
//! A completions `prompt` array of several strings is split here into one request per prompt
//! (the batch is fanned out and merged by `batch/`); token-id prompts are refused, since the
//! prefix cache is keyed on text.

use crate::error::ApiError;
use crate::models::{Model, Models};
use pdgate_wire::openai::{prompt_of, ApiKind};
use serde_json::Value;
use std::sync::Arc;

/// Output length assumed for load predictions when a request names none: what the reference
/// engine generates by default.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// A request that passed validation, with the fields the gateway itself needs.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub kind: ApiKind,
    /// The served model the body names; the body's `model` is its configured name.
    pub model: Arc<Model>,
    pub body: Value,
    pub prompt: String,
    pub stream: bool,
    /// Tokens the client may get at most (for decode load predictions).
    pub max_tokens: u32,
}

/// A request that passed validation: one prompt, or a batch of several (each its own request,
/// in the client's order, with `prompt` set to that one string).
#[derive(Debug)]
pub enum Parsed {
    One(ClientRequest),
    Batch(Vec<ClientRequest>),
}

/// What validation needs of the gateway's config.
pub struct Limits<'a> {
    pub models: &'a Models,
    pub max_batch_prompts: usize,
}

pub fn parse(kind: ApiKind, raw: &[u8], limits: &Limits<'_>) -> Result<Parsed, ApiError> {
    let mut body: Value = serde_json::from_slice(raw).map_err(ApiError::malformed_json)?;
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
        ApiKind::Completions => check_prompt(obj.get("prompt"), limits.max_batch_prompts)?,
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
    let Some(model) = limits.models.resolve(model).map(Arc::clone) else {
        return Err(ApiError::model_not_found(model));
    };
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|f| obj.get(*f).and_then(Value::as_u64))
        .map_or(DEFAULT_MAX_TOKENS, |n| u32::try_from(n).unwrap_or(u32::MAX));
    if let Some(named) = body.get_mut("model") {
        // An alias is the gateway's: engines serve the configured name only.
        *named = Value::String(model.name.clone());
    }
    // Only completions take a prompt array: a chat body's stray `prompt` is the engine's business,
    // never a reason to send the conversation once per element.
    let batch = match kind {
        ApiKind::Completions => take_batch(&mut body),
        ApiKind::Chat => None,
    };
    let Some(prompts) = batch else {
        return request(kind, model, body, stream, max_tokens).map(Parsed::One);
    };
    // `body` no longer holds the prompt array, so each copy costs only the other fields.
    prompts
        .into_iter()
        .map(|p| {
            let mut sub = body.clone();
            sub["prompt"] = Value::String(p);
            request(kind, Arc::clone(&model), sub, stream, max_tokens)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Parsed::Batch)
}

fn request(
    kind: ApiKind,
    model: Arc<Model>,
    body: Value,
    stream: bool,
    max_tokens: u32,
) -> Result<ClientRequest, ApiError> {
    let prompt = prompt_of(kind, &body).map_err(|e| ApiError::invalid(e.param, e.message))?;
    Ok(ClientRequest {
        kind,
        model,
        body,
        prompt,
        stream,
        max_tokens,
    })
}

/// Takes a validated `prompt` array of two or more strings out of the body; a one-element array
/// stays, as it means exactly what the plain string does.
fn take_batch(body: &mut Value) -> Option<Vec<String>> {
    let obj = body.as_object_mut()?;
    let is_batch = obj
        .get("prompt")
        .and_then(Value::as_array)
        .is_some_and(|list| list.len() > 1);
    if !is_batch {
        return None;
    }
    let Some(Value::Array(list)) = obj.remove("prompt") else {
        return None;
    };
    let strings = list.into_iter().filter_map(|v| match v {
        Value::String(s) => Some(s),
        _ => None,
    });
    Some(strings.collect())
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

fn check_prompt(prompt: Option<&Value>, max_prompts: usize) -> Result<(), ApiError> {
    let list = match prompt {
        Some(Value::String(_)) => return Ok(()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be a string or an array of strings",
            ))
        }
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
    };
    if list.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    if list.iter().any(|v| v.is_number() || v.is_array()) {
        return Err(ApiError::invalid(
            "prompt",
            "token-id prompts are not supported (the gateway routes on the prompt's text); \
             send a string or an array of strings",
        ));
    }
    if let Some(i) = list.iter().position(|v| !v.is_string()) {
        return Err(ApiError::invalid(
            "prompt",
            format!("`prompt[{i}]` must be a string"),
        ));
    }
    if list.len() > max_prompts {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{} prompts in one request; at most {max_prompts} are allowed \
                 (`server.max_batch_prompts`)",
                list.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn models() -> &'static Models {
        static MODELS: std::sync::OnceLock<Models> = std::sync::OnceLock::new();
        MODELS.get_or_init(|| {
            let cfg = crate::config::Config {
                models: vec![
                    crate::config::ModelEntry {
                        name: "m".into(),
                        aliases: vec!["m-alias".into()],
                        ..Default::default()
                    },
                    crate::config::ModelEntry {
                        name: "n".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            };
            Models::build(&cfg).expect("models")
        })
    }

    fn limits() -> Limits<'static> {
        Limits {
            models: models(),
            max_batch_prompts: 3,
        }
    }

    fn err(kind: ApiKind, raw: &str) -> ApiError {
        parse(kind, raw.as_bytes(), &limits()).expect_err("should fail")
    }

    fn one(kind: ApiKind, raw: &str) -> ClientRequest {
        match parse(kind, raw.as_bytes(), &limits()) {
            Ok(Parsed::One(r)) => r,
            other => panic!("expected one request, got {other:?}"),
        }
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
    fn a_request_reaches_the_model_it_names_and_engines_see_its_name() {
        let r = one(ApiKind::Completions, r#"{"model":"n","prompt":"x"}"#);
        assert_eq!(r.model.name, "n");
        let r = one(ApiKind::Completions, r#"{"model":"m-alias","prompt":"x"}"#);
        assert_eq!(
            (r.model.name.as_str(), &r.body["model"]),
            ("m", &Value::from("m"))
        );
        let raw = r#"{"model":"m-alias","prompt":["a","b"]}"#;
        let Ok(Parsed::Batch(reqs)) = parse(ApiKind::Completions, raw.as_bytes(), &limits()) else {
            panic!("expected a batch");
        };
        assert!(reqs
            .iter()
            .all(|r| r.model.name == "m" && r.body["model"] == "m"));
    }

    #[test]
    fn valid_request_keeps_unknown_fields_and_renders_every_message() {
        let raw = r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}],"stream":true,"vendor_x":1}"#;
        let r = one(ApiKind::Chat, raw);
        assert!(r.stream);
        assert_eq!(r.body["vendor_x"], 1);
        assert!(r.prompt.contains("<|system|>\ns\n") && r.prompt.contains("<|user|>\nu\n"));
    }

    #[test]
    fn a_prompt_array_fans_out_one_request_per_string() {
        let raw = r#"{"model":"m","prompt":["a b","c"],"max_tokens":2,"x":1}"#;
        let Ok(Parsed::Batch(reqs)) = parse(ApiKind::Completions, raw.as_bytes(), &limits()) else {
            panic!("expected a batch");
        };
        let prompts: Vec<_> = reqs.iter().map(|r| r.prompt.as_str()).collect();
        assert_eq!(prompts, ["a b", "c"]);
        assert_eq!(reqs[1].body["prompt"], "c", "engines see one string");
        assert_eq!(
            (reqs[1].body["x"].clone(), reqs[1].max_tokens),
            (1.into(), 2)
        );
    }

    #[test]
    fn a_chat_body_with_a_stray_prompt_array_stays_one_request() {
        let raw = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"prompt":["a","b","c","d","e"]}"#;
        let r = one(ApiKind::Chat, raw);
        assert_eq!(r.body["prompt"].as_array().map(Vec::len), Some(5));
    }

    #[test]
    fn a_one_element_array_is_a_plain_prompt() {
        let r = one(ApiKind::Completions, r#"{"model":"m","prompt":["only"]}"#);
        assert_eq!(r.prompt, "only");
    }

    #[test]
    fn bad_prompt_arrays_name_prompt() {
        for raw in [
            r#"{"model":"m","prompt":[]}"#,
            r#"{"model":"m","prompt":["a",2]}"#,
            r#"{"model":"m","prompt":["a",null]}"#,
            r#"{"model":"m","prompt":[1,2,3]}"#,
            r#"{"model":"m","prompt":[[1,2],[3]]}"#,
            r#"{"model":"m","prompt":["a","b","c","d"]}"#,
        ] {
            let e = err(ApiKind::Completions, raw);
            assert_eq!(
                (e.status, e.param.as_deref()),
                (StatusCode::BAD_REQUEST, Some("prompt")),
                "{raw}"
            );
        }
        let e = err(ApiKind::Completions, r#"{"model":"m","prompt":[1,2,3]}"#);
        assert!(e.message.contains("token-id"), "{}", e.message);
    }
}
