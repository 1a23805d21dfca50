//! The admin API (control plane, behind the admin token): the fleet as the gateway sees it.

use crate::state::AppState;
use crate::workers::WorkerView;
use axum::extract::State;
use axum::Json;
use std::sync::Arc;

pub async fn workers(State(state): State<Arc<AppState>>) -> Json<Vec<WorkerView>> {
    Json(state.workers.views(&state.scheduler))
}
