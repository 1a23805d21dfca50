//! One inference request from its raw body to its response head: the in-flight slot, the parse,
//! then one prompt through the pipeline or a batch of prompts through `batch`.

use crate::batch;
use crate::error::ApiError;
use crate::metrics;
use crate::models::Model;
use crate::openai::{self, Parsed};
use crate::pipeline::{in_flight_permit, route};
use crate::state::AppState;
use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use pdgate_wire::openai::ApiKind;
use std::sync::Arc;
use std::time::Instant;

/// One inference request, start to response head; runs inside the caller's request span (the
/// listener's, which also covers the body's relay).
pub async fn serve(
    state: Arc<AppState>,
    kind: ApiKind,
    request_id: String,
    raw: Bytes,
) -> Response {
    let started = Instant::now();
    // The model the request resolved to, for the metrics label; none when it named none served.
    let mut model = None;
    let resp = match run(&state, kind, &request_id, raw, started, &mut model).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(status = e.status.as_u16(), message = %e.message, "request failed");
            e.into_response()
        }
    };
    let model = model.as_ref().map_or("", |m: &Arc<Model>| m.name.as_str());
    metrics::request_done(
        api_label(kind),
        model,
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

async fn run(
    state: &Arc<AppState>,
    kind: ApiKind,
    request_id: &str,
    raw: Bytes,
    started: Instant,
    model: &mut Option<Arc<Model>>,
) -> Result<Response, ApiError> {
    let permit = in_flight_permit(state)?;
    let limits = openai::Limits {
        models: &state.models,
        max_batch_prompts: state.cfg.server.max_batch_prompts,
    };
    match openai::parse(kind, &raw, &limits)? {
        Parsed::One(req) => {
            *model = Some(Arc::clone(&req.model));
            route(state, &req, request_id, started, permit).await
        }
        Parsed::Batch(reqs) => {
            *model = reqs.first().map(|r| Arc::clone(&r.model));
            batch::run(state, reqs, request_id, started, permit).await
        }
    }
}

fn api_label(kind: ApiKind) -> &'static str {
    match kind {
        ApiKind::Chat => "chat",
        ApiKind::Completions => "completions",
    }
}
