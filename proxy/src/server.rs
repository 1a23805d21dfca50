//! The gateway's HTTP routes other than the two inference POSTs, which `listener` sends to the
//! pipeline itself. Request ids, credentials (`access`) and the body limit are the listener's,
//! for every route, before a request reaches this router.

use crate::error::ApiError;
use crate::state::AppState;
use crate::{admin, segments};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

pub fn router(state: Arc<AppState>) -> Router {
    // Rooms off the serving path get only their handle.
    let admin = Router::new()
        .route(
            "/admin/workers",
            get(admin::workers).post(admin::add_worker),
        )
        .route("/admin/workers/{id}", delete(admin::remove_worker))
        .with_state(Arc::clone(&state.fleet));
    let registry = segments::router().with_state(Arc::clone(&state.segments));
    Router::new()
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(admin)
        .merge(registry)
        .fallback(|| async { ApiError::not_found("no such route") })
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(
        json!({"object": "list", "data": [{"id": state.cfg.model.name, "object": "model", "created": 0, "owned_by": "pdgate"}]}),
    )
}

/// Ready when at least one healthy prefill and one healthy decode instance exist.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let (p, d) = state.fleet.scheduler.lock().healthy_counts();
    let draining = state.is_draining();
    let ready = p > 0 && d > 0 && !draining;
    let body = Json(json!({
        "ready": ready,
        "draining": draining,
        "healthy_prefill": p,
        "healthy_decode": d,
    }));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    crate::metrics::record_health(&state.fleet.scheduler.lock());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
