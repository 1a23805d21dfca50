//! The gateway's HTTP routes other than the two inference POSTs, which `listener` serves itself
//! (with the same request-id and API-key rules, done inline). Cross-cutting concerns are tower
//! layers stacked here: request ids (honoured or minted, echoed back), tracing, auth. The body
//! limit is the connection's (`listener::conn`), for every route.

use crate::error::ApiError;
use crate::listener::REQUEST_ID;
use crate::state::AppState;
use crate::{admin, segments};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub fn router(state: Arc<AppState>) -> Router {
    let data =
        Router::new()
            .route("/v1/models", get(models))
            .route_layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                require_api_key,
            ));
    let control = Router::new()
        .route("/admin/workers", get(admin::workers))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_admin_token,
        ));
    Router::new()
        .merge(data)
        .merge(control)
        .merge(segments::router())
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
                }))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone())),
        )
        .with_state(state)
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(
        json!({"object": "list", "data": [{"id": state.cfg.model.name, "object": "model", "created": 0, "owned_by": "pdgate"}]}),
    )
}

/// Ready when at least one healthy prefill and one healthy decode instance exist.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let (p, d) = state.scheduler.lock().healthy_counts();
    let body = Json(json!({"ready": p > 0 && d > 0, "healthy_prefill": p, "healthy_decode": d}));
    let status = if p > 0 && d > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    crate::metrics::record_health(&state);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time compare: the token must not leak through timing.
    given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match &state.cfg.server.api_key {
        Some(key) if !bearer_matches(req.headers(), key) => {
            ApiError::unauthorized().into_response()
        }
        _ => next.run(req).await,
    }
}

async fn require_admin_token(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match &state.cfg.server.admin_token {
        Some(token) if !bearer_matches(req.headers(), token) => {
            ApiError::unauthorized().into_response()
        }
        _ => next.run(req).await,
    }
}
