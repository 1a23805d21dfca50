//! Every error that reaches a client becomes an OpenAI error object here, in one place:
//! `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    /// 400 naming the offending field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn malformed_json(detail: impl std::fmt::Display) -> Self {
        Self {
            code: Some("invalid_json"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("request body is not valid JSON: {detail}"),
            )
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist or is not served here."),
            )
        }
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self {
            code: Some("body_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("request body exceeds {limit} bytes"),
            )
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or invalid bearer token",
            )
        }
    }

    /// 403: no credential would be accepted here (e.g. registry writes with no fleet secret).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            code: Some("forbidden"),
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
        }
    }

    /// 409: the resource belongs to someone else; it may free up in `retry_after_secs`.
    pub fn conflict(
        code: &'static str,
        message: impl Into<String>,
        retry_after_secs: Option<u64>,
    ) -> Self {
        Self {
            code: Some(code),
            retry_after_secs,
            ..Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
        }
    }

    /// 503: nothing can serve the request right now (no healthy pair, gateway full).
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            retry_after_secs: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 429: admission control turned the request away (it would miss its SLO, or no KV room).
    pub fn rejected(code: &'static str, message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            code: Some(code),
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    /// 502: an engine failed the request.
    pub fn upstream(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            ..Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
        }
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self {
            code: Some("upstream_timeout"),
            ..Self::new(StatusCode::GATEWAY_TIMEOUT, "upstream_error", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_object_has_the_openai_shape() {
        let e = ApiError::invalid("messages", "`messages` is required");
        let b = e.body();
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "messages");
        assert!(b["error"]["code"].is_null());
        let resp = ApiError::unavailable("no_healthy_pair", "x").into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
