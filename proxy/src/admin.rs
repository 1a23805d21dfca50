//! The admin API (control plane, behind the admin token): the fleet as the gateway sees it, and
//! workers added or drained by hand. Both changes go through `Fleet`, as discovery's do.

use crate::config::WorkerConfig;
use crate::error::ApiError;
use crate::fleet::Fleet;
use crate::workers::WorkerView;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pdgate_scheduler::InstanceId;
use std::sync::Arc;

/// Largest `POST /admin/workers` body: one `[[workers]]` entry.
const MAX_WORKER_BYTES: usize = 4096;

pub async fn workers(State(fleet): State<Arc<Fleet>>) -> Json<Vec<WorkerView>> {
    Json(fleet.views())
}

/// `POST /admin/workers` with a `[[workers]]` entry as JSON: 201 and the worker, which takes
/// traffic once a health check passed; 409 when that role already has a worker at that URL.
pub async fn add_worker(
    State(fleet): State<Arc<Fleet>>,
    body: Bytes,
) -> Result<(StatusCode, Json<WorkerView>), ApiError> {
    if body.len() > MAX_WORKER_BYTES {
        return Err(ApiError::body_too_large(MAX_WORKER_BYTES));
    }
    let cfg: WorkerConfig = serde_json::from_slice(&body).map_err(ApiError::malformed_json)?;
    check_url(&cfg.url).map_err(|m| ApiError::invalid("url", m))?;
    if let Some(w) = fleet.workers.find(cfg.role, &cfg.url) {
        return Err(ApiError::conflict(
            "worker_exists",
            format!(
                "{} worker {} is already in the fleet as id {}",
                w.role, w.url, w.id
            ),
            None,
        ));
    }
    let id = fleet.add(&cfg).id;
    view_of(&fleet, id)
        .map(|v| (StatusCode::CREATED, Json(v)))
        .ok_or_else(|| ApiError::not_found("the worker was removed as it was added"))
}

/// `DELETE /admin/workers/{id}`: the worker gets nothing new, its requests in flight finish; 200
/// with its last view (`state`: `draining` while requests hold it, else `removed`), 404 for an
/// unknown id.
pub async fn remove_worker(
    State(fleet): State<Arc<Fleet>>,
    Path(id): Path<String>,
) -> Result<Json<WorkerView>, ApiError> {
    let id: u32 = id
        .parse()
        .map_err(|_| ApiError::invalid("id", "a worker id is the number /admin/workers lists"))?;
    let not_found = || ApiError::not_found(format!("no worker with id {id}"));
    let mut view = view_of(&fleet, InstanceId(id)).ok_or_else(not_found)?;
    let removed = fleet
        .remove_draining(InstanceId(id))
        .ok_or_else(not_found)?;
    // Ours is one reference; any other is a request still on it.
    view.state = match Arc::strong_count(&removed) {
        1 => "removed",
        _ => "draining",
    };
    Ok(Json(view))
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
