//! The admin API (control plane, behind the admin token): every model's fleet as the gateway
//! sees it, and workers added to a model or drained by hand. Both changes go through that
//! model's `Fleet`, as discovery's do. Worker ids are unique across models.

use crate::config::WorkerConfig;
use crate::error::ApiError;
use crate::fleet::Fleet;
use crate::models::Models;
use crate::workers::WorkerView;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pdgate_scheduler::InstanceId;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;

/// Largest `POST /admin/workers` body: one `[[workers]]` entry and its model.
const MAX_WORKER_BYTES: usize = 4096;

/// A worker as the admin API shows it: its view and the model it serves.
#[derive(Debug, Serialize)]
pub struct ModelWorkerView {
    pub model: String,
    #[serde(flatten)]
    pub worker: WorkerView,
}

pub async fn workers(State(models): State<Arc<Models>>) -> Json<Vec<ModelWorkerView>> {
    let views = models.all().iter().flat_map(|m| {
        m.fleet.views().into_iter().map(|worker| ModelWorkerView {
            model: m.name.clone(),
            worker,
        })
    });
    Json(views.collect())
}

/// `POST /admin/workers` with a `[[workers]]` entry as JSON, plus `model` (the configured name
/// of the model it serves; optional while the gateway serves one model): 201 and the worker,
/// which takes traffic once a health check passed; 409 when that role already has a worker at
/// that URL, or another model has an engine there (an engine serves one model).
pub async fn add_worker(
    State(models): State<Arc<Models>>,
    body: Bytes,
) -> Result<(StatusCode, Json<ModelWorkerView>), ApiError> {
    if body.len() > MAX_WORKER_BYTES {
        return Err(ApiError::body_too_large(MAX_WORKER_BYTES));
    }
    let mut raw: Value = serde_json::from_slice(&body).map_err(ApiError::malformed_json)?;
    let named = match raw.as_object_mut().and_then(|o| o.remove("model")) {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
    };
    let cfg: WorkerConfig = serde_json::from_value(raw).map_err(ApiError::malformed_json)?;
    check_url(&cfg.url).map_err(|m| ApiError::invalid("url", m))?;
    let model = match (&named, models.only()) {
        (Some(name), _) => models.named(name).ok_or_else(|| {
            ApiError::invalid(
                "model",
                format!("no model is configured as `{name}` (name it as /v1/models lists it)"),
            )
        })?,
        (None, Some(only)) => only,
        (None, None) => {
            return Err(ApiError::invalid(
                "model",
                "`model` is required: this gateway serves several models",
            ))
        }
    };
    if let Some(w) = model.fleet.workers.find(cfg.role, &cfg.url) {
        return Err(ApiError::conflict(
            "worker_exists",
            format!(
                "{} worker {} is already in the fleet as id {}",
                w.role, w.url, w.id
            ),
            None,
        ));
    }
    if let Some((other, w)) = models
        .holding_url(&cfg.url)
        .filter(|(m, _)| m.name != model.name)
    {
        return Err(ApiError::conflict(
            "worker_exists",
            format!(
                "{} is already an engine of model `{}` as id {} (an engine serves one model)",
                w.url, other.name, w.id
            ),
            None,
        ));
    }
    let id = model.fleet.add(&cfg).id;
    view_of(&model.fleet, id)
        .map(|worker| {
            let model = model.name.clone();
            (StatusCode::CREATED, Json(ModelWorkerView { model, worker }))
        })
        .ok_or_else(|| ApiError::not_found("the worker was removed as it was added"))
}

/// `DELETE /admin/workers/{id}`: the worker gets nothing new, its requests in flight finish; 200
/// with its last view (`state`: `draining` while requests hold it, else `removed`), 404 for an
/// unknown id.
pub async fn remove_worker(
    State(models): State<Arc<Models>>,
    Path(id): Path<String>,
) -> Result<Json<ModelWorkerView>, ApiError> {
    let id: u32 = id
        .parse()
        .map_err(|_| ApiError::invalid("id", "a worker id is the number /admin/workers lists"))?;
    let not_found = || ApiError::not_found(format!("no worker with id {id}"));
    let model = models.model_of(InstanceId(id)).ok_or_else(not_found)?;
    let fleet = &model.fleet;
    let mut view = view_of(fleet, InstanceId(id)).ok_or_else(not_found)?;
    let removed = fleet
        .remove_draining(InstanceId(id))
        .ok_or_else(not_found)?;
    // Ours is one reference; any other is a request still on it.
    view.state = match Arc::strong_count(&removed) {
        1 => "removed",
        _ => "draining",
    };
    Ok(Json(ModelWorkerView {
        model: model.name.clone(),
        worker: view,
    }))
}

fn view_of(fleet: &Fleet, id: InstanceId) -> Option<WorkerView> {
    fleet.views().into_iter().find(|v| v.id == id.0)
}

/// An engine URL the gateway can dial: `http://host:port` or `https://host:port` (a path or
/// userinfo has no meaning for the engine client; an `https` engine needs `[upstream.tls]`).
pub fn check_url(url: &str) -> Result<(), String> {
    let trimmed = url.trim_end_matches('/');
    let Some(rest) = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
    else {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("`{url}` has no port"))?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty()
        && !host.contains(['/', '@', '?', '#', ' '])
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    match (host_ok, port_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(format!("`{url}` has no valid host")),
        (_, false) => Err(format!("`{url}` has no valid port")),
    }
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn engine_urls_are_http_host_and_port() {
        for ok in [
            "http://10.0.0.7:8000",
            "http://e:1/",
            "http://[fd00::1]:8000",
            "https://e:8443",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ftp://e:8000",
            "http://e",
            "http://:8000",
            "http://e:0",
            "http://e:99999",
            "http://e:8000/v1",
            "http://u@e:8000",
            "http://fd00::1:8000",
            "e:8000",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
