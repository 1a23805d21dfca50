//! The segment registry the gateway hosts for transfer engines: engines publish their segments
//! (KV pools, push-mode prefills' bootstrap mailboxes) here and look peers' segments up by name. Backed by the transfer crate's bounded
//! in-memory registry; this file is only its HTTP face.

use crate::error::ApiError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pdgate_transfer::{MemoryRegistry, MetadataStore, SegmentDesc};
use pdgate_wire::registry::REGISTRY_PATH;
use std::sync::Arc;

pub fn router() -> Router<Arc<MemoryRegistry>> {
    Router::new()
        .route(REGISTRY_PATH, get(list).post(publish))
        .route(
            &format!("{REGISTRY_PATH}/{{name}}"),
            get(lookup).delete(remove),
        )
}

async fn list(State(s): State<Arc<MemoryRegistry>>) -> Result<Json<Vec<SegmentDesc>>, ApiError> {
    s.list().await.map(Json).map_err(internal)
}

async fn publish(
    State(s): State<Arc<MemoryRegistry>>,
    Json(desc): Json<SegmentDesc>,
) -> Result<Response, ApiError> {
    tracing::info!(segment = %desc.name, endpoint = %desc.endpoint, bytes = desc.len, "segment registered");
    s.publish(desc).await.map_err(internal)?;
    Ok(StatusCode::CREATED.into_response())
}

async fn lookup(
    State(s): State<Arc<MemoryRegistry>>,
    Path(name): Path<String>,
) -> Result<Json<SegmentDesc>, ApiError> {
    s.lookup(&name)
        .await
        .map_err(internal)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("segment `{name}` is not registered")))
}

async fn remove(
    State(s): State<Arc<MemoryRegistry>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.remove(&name).await.map_err(internal)?;
    Ok(StatusCode::NO_CONTENT)
}

fn internal(e: pdgate_transfer::TransferError) -> ApiError {
    ApiError::unavailable("registry_error", e.to_string())
}
