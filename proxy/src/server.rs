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
        .with_state(Arc::clone(&state.models));
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

/// Every served model by its configured name; the names a model also answers to are its
/// `aliases` (not entries of their own, so the list holds one entry per model).
async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .models
        .all()
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "pdgate", "aliases": m.aliases}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Ready when some model has a healthy prefill and a healthy decode instance: one model's
/// engines being down must not take the others' traffic away (every replica would agree, so
/// no replica would stay in the Service). The body says which models can serve.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let (mut p, mut d, mut any) = (0, 0, false);
    let mut per_model = serde_json::Map::new();
    for m in state.models.all() {
        let (mp, md) = m.fleet.scheduler.lock().healthy_counts();
        (p, d) = (p + mp, d + md);
        any |= mp > 0 && md > 0;
        per_model.insert(
            m.name.clone(),
            json!({"ready": mp > 0 && md > 0, "healthy_prefill": mp, "healthy_decode": md}),
        );
    }
    let draining = state.is_draining();
    let ready = any && !draining;
    let body = Json(json!({
        "ready": ready,
        "draining": draining,
        "healthy_prefill": p,
        "healthy_decode": d,
        "models": per_model,
    }));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    for m in state.models.all() {
        crate::metrics::record_health(&m.name, &m.fleet.scheduler.lock());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
