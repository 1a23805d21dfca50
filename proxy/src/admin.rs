//! The admin API (control plane, behind the admin token): the fleet as the gateway sees it.

use crate::fleet::Fleet;
use crate::workers::WorkerView;
use axum::extract::State;
use axum::Json;
use std::sync::Arc;

pub async fn workers(State(fleet): State<Arc<Fleet>>) -> Json<Vec<WorkerView>> {
    Json(fleet.views())
}
