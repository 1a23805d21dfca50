//! The segment registry the gateway hosts for transfer engines: engines publish their segments
//! (KV pools, push-mode prefills' bootstrap mailboxes) here and look peers' segments up by name.
//! Backed by the transfer crate's bounded in-memory registry; this file is its HTTP face.
//!
//! Who may call it is `access`'s decision (the fleet's registry token). Here: every name and
//! body is bounded (a descriptor is a few hundred bytes; the registry must not hold megabytes
//! for anyone), a name belongs to the endpoint that published it (so a writer cannot re-point a
//! peer's segment at a server of its own: the prefill would send that peer's KV there), and
//! expired entries are purged on a timer, their memory returned. One exception to ownership: a
//! name whose owner's endpoint refuses connections (nothing listens there: the engine died) goes
//! to the next publisher at once, so an engine restarted after a crash, under a new transfer
//! port, serves again without waiting out its old entry's TTL.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pdgate_transfer::{Claim, MemoryRegistry, MetadataStore, SegmentDesc};
use pdgate_wire::registry::{self, MAX_DESC_BYTES, REGISTRY_PATH};
use serde::Deserialize;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::task::JoinHandle;

pub fn router() -> Router<Arc<MemoryRegistry>> {
    Router::new()
        .route(REGISTRY_PATH, get(list).post(publish))
        .route(
            &format!("{REGISTRY_PATH}/{{name}}"),
            get(lookup).delete(remove),
        )
        // The listener already read the body within `max_body_bytes`; `publish` answers an
        // oversized one itself, as an OpenAI error object, instead of axum's plain-text 413.
        .layer(DefaultBodyLimit::disable())
}

/// Purges stale entries every half TTL (at least every 250 ms), so an entry is gone, and its
/// memory given back, within 1.5 TTL of its last refresh whether or not the registry is full.
/// Holds the registry weakly: the task ends with the gateway's state.
pub fn spawn_purge(reg: &Arc<MemoryRegistry>, ttl: Duration) -> JoinHandle<()> {
    let weak: Weak<MemoryRegistry> = Arc::downgrade(reg);
    let every = (ttl / 2).max(Duration::from_millis(250));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(reg) = weak.upgrade() else { return };
            let purged = reg.purge_stale();
            if purged > 0 {
                tracing::info!(
                    purged,
                    "dropped registry entries their engines stopped refreshing"
                );
            }
            crate::metrics::registry_entries(reg.held());
        }
    })
}

async fn list(State(s): State<Arc<MemoryRegistry>>) -> Result<Json<Vec<SegmentDesc>>, ApiError> {
    s.list().await.map(Json).map_err(internal)
}

async fn publish(State(s): State<Arc<MemoryRegistry>>, body: Bytes) -> Result<Response, ApiError> {
    if body.len() > MAX_DESC_BYTES {
        return Err(ApiError::body_too_large(MAX_DESC_BYTES));
    }
    let desc: SegmentDesc = serde_json::from_slice(&body).map_err(ApiError::malformed_json)?;
    check_name(&desc.name)?;
    if !registry::valid_endpoint(&desc.endpoint) {
        return Err(ApiError::invalid(
            "endpoint",
            "`endpoint` must be host:port (at most 256 bytes)",
        ));
    }
    let (name, endpoint, len) = (desc.name.clone(), desc.endpoint.clone(), desc.len);
    match s.publish_owned(desc.clone()) {
        Ok(()) => {}
        Err(Claim::Held { expires_in }) => {
            take_over_from_dead_owner(&s, desc)
                .await
                .map_err(|c| refused(&name, c.unwrap_or(Claim::Held { expires_in })))?;
        }
        Err(c) => return Err(refused(&name, c)),
    }
    tracing::info!(segment = %name, endpoint = %endpoint, bytes = len, "segment registered");
    Ok(StatusCode::CREATED.into_response())
}

/// How long the probe of a holder's endpoint may take: a live owner answers a loopback or
/// in-cluster connect in well under this, and a silent one (stopped, partitioned) keeps its name.
const OWNER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Publishes `desc` over a fresh entry of another endpoint when nothing listens at that endpoint
/// any more (the connection is refused, as it is for a dead process's port). Only a refusal
/// counts: a timeout may be a stopped or partitioned owner that will be back. `Err(None)` when
/// the holder is alive, `Err(Some(_))` when the second claim failed for its own reason.
async fn take_over_from_dead_owner(
    s: &MemoryRegistry,
    desc: SegmentDesc,
) -> Result<(), Option<Claim>> {
    let Ok(Some(held)) = s.lookup(&desc.name).await else {
        // Gone or stale since: an ordinary claim decides.
        return s.publish_owned(desc).map_err(Some);
    };
    let probe = tokio::net::TcpStream::connect(held.endpoint.as_str());
    match tokio::time::timeout(OWNER_PROBE_TIMEOUT, probe).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        _ => return Err(None),
    }
    // Withdrawn in the owner's name, then claimed: if the owner re-published in between, the
    // removal is refused and so is the takeover.
    s.remove_owned(&desc.name, &held.endpoint).map_err(Some)?;
    tracing::info!(
        segment = %desc.name,
        dead_owner = %held.endpoint,
        endpoint = %desc.endpoint,
        "segment taken over from an endpoint that refuses connections"
    );
    s.publish_owned(desc).map_err(Some)
}

async fn lookup(
    State(s): State<Arc<MemoryRegistry>>,
    Path(name): Path<String>,
) -> Result<Json<SegmentDesc>, ApiError> {
    check_name(&name)?;
    s.lookup(&name)
        .await
        .map_err(internal)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("segment `{name}` is not registered")))
}

#[derive(Deserialize)]
struct Owner {
    endpoint: Option<String>,
}

/// Withdraws a segment; the call names the endpoint that owns it (`?endpoint=host:port`).
async fn remove(
    State(s): State<Arc<MemoryRegistry>>,
    Path(name): Path<String>,
    owner: Result<Query<Owner>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let Some(endpoint) = owner.ok().and_then(|Query(o)| o.endpoint) else {
        return Err(ApiError::invalid(
            registry::OWNER_PARAM,
            "name the endpoint that published the segment: ?endpoint=host:port",
        ));
    };
    s.remove_owned(&name, &endpoint)
        .map_err(|c| refused(&name, c))?;
    Ok(StatusCode::NO_CONTENT)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    match registry::valid_name(name) {
        true => Ok(()),
        false => Err(ApiError::invalid(
            "name",
            "a segment name is 1 to 256 bytes of [A-Za-z0-9._-], starting with a letter or digit",
        )),
    }
}

fn refused(name: &str, why: Claim) -> ApiError {
    match why {
        Claim::Held { expires_in } => ApiError::conflict(
            "segment_owned",
            format!(
                "segment `{name}` belongs to another endpoint; it frees up when that endpoint \
                 withdraws it or stops refreshing it"
            ),
            expires_in.map(|d| d.as_secs_f64().ceil().max(1.0) as u64),
        ),
        Claim::Full(n) => {
            ApiError::unavailable("registry_full", format!("the registry holds {n} segments"))
        }
    }
}

fn internal(e: pdgate_transfer::TransferError) -> ApiError {
    ApiError::unavailable("registry_error", e.to_string())
}
