//! The push-mode bootstrap (SGLang, vLLM Mooncake), done the way SGLang does it: a decode
//! engine asks a prefill's bootstrap server once where its KV sender listens (`GET
//! /pd/bootstrap` on the prefill's HTTP port, which is the `bootstrap_port`), then hands each
//! request's KV destination to that prefill as a message: a pdgate-transfer notification on
//! the prefill's small "mailbox" segment, carried by the transfer engine's persistent
//! connection to that peer (SGLang uses ZMQ). The prefill gives every offer to its
//! `Rendezvous`.
//!
//! The mailbox itself and offers in parts are `mailbox`'s. A refused offer (duplicate room, too
//! many rooms) is only logged: its decode cannot be told and times out, as in SGLang. This must
//! never turn back into an HTTP call per request.

use super::mailbox;
use super::rendezvous::Offer;
use crate::engine::Engine;
use crate::openai::ApiError;
use crate::stats::Stats;
use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use pdgate_transfer::{Batch, SegmentDesc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub const BOOTSTRAP_PATH: &str = "/pd/bootstrap";

/// How long a decode may take to learn a mailbox or deliver one offer (the HTTP call this
/// replaced had the same bound).
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);

/// What `GET /pd/bootstrap` answers: where this prefill's transfer engine takes offers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mailbox {
    pub segment: String,
    /// The owner's transfer endpoint, used when no registry is configured (P2P mode).
    pub endpoint: String,
    pub len: u64,
}

fn unreachable(bootstrap: &str, err: impl std::fmt::Display) -> ApiError {
    ApiError::server(
        502,
        "bootstrap_unreachable",
        format!("bootstrap server {bootstrap} unreachable: {err}"),
    )
}

/// `GET /pd/bootstrap`: where a decode sends this prefill its offers.
pub async fn query(State(e): State<Arc<Engine>>) -> Result<Json<Mailbox>, ApiError> {
    let seg = e.bootstrap.mailbox().ok_or_else(|| {
        ApiError::server(
            404,
            "not_a_bootstrap_server",
            "this engine takes no bootstrap offers (not a push-mode prefill engine)",
        )
    })?;
    Stats::add(&e.stats.bootstrap_queries, 1);
    Ok(Json(Mailbox {
        segment: seg.name().to_string(),
        endpoint: e.transfer.endpoint(),
        len: seg.len() as u64,
    }))
}

/// Decode side: hands `offer` to the prefill whose bootstrap server is `bootstrap`
/// (`http://host:port`), learning its mailbox on first use. A remembered mailbox that fails is
/// forgotten and looked up once more (the prefill may have restarted on a new transfer port);
/// a second failure is the prefill's.
pub(crate) async fn send(e: &Engine, bootstrap: &str, offer: &Offer) -> Result<(), ApiError> {
    let parts = mailbox::encode(offer)?;
    if let Some(mailbox) = e.bootstrap.known(bootstrap) {
        match deliver(e, &mailbox, &parts).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                forget(e, bootstrap, &mailbox);
                tracing::debug!(bootstrap, error = %err, "remembered mailbox failed; asking again");
            }
        }
    }
    let mailbox = locate(e, bootstrap).await?;
    deliver(e, &mailbox, &parts).await.map_err(|err| {
        forget(e, bootstrap, &mailbox);
        unreachable(bootstrap, err)
    })
}

async fn deliver(e: &Engine, mailbox: &SegmentDesc, parts: &[Bytes]) -> Result<(), String> {
    for part in parts {
        let batch = Batch::new().notify(part.clone());
        match tokio::time::timeout(OFFER_TIMEOUT, e.transfer.submit(mailbox, batch)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => return Err(format!("no answer within {OFFER_TIMEOUT:?}")),
        }
    }
    Ok(())
}

fn forget(e: &Engine, bootstrap: &str, mailbox: &SegmentDesc) {
    e.bootstrap.forget(bootstrap);
    e.peers.lock().remove(&mailbox.name);
}

async fn locate(e: &Engine, bootstrap: &str) -> Result<SegmentDesc, ApiError> {
    if let Some(desc) = e.bootstrap.known(bootstrap) {
        return Ok(desc);
    }
    let url = format!("{bootstrap}{BOOTSTRAP_PATH}");
    let resp = e
        .client
        .get(&url)
        .timeout(OFFER_TIMEOUT)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|err| unreachable(bootstrap, err))?;
    let mailbox: Mailbox = resp
        .json()
        .await
        .map_err(|err| unreachable(bootstrap, err))?;
    let desc = crate::peers::locate(e, &mailbox.segment, &mailbox.endpoint, mailbox.len)
        .await
        .map_err(|err| unreachable(bootstrap, err))?;
    e.bootstrap.learn(bootstrap, desc.clone());
    Ok(desc)
}

/// Prefill side: one notification on the mailbox.
pub(crate) fn receive(e: &Engine, payload: &[u8]) {
    let stale = Duration::from_millis(e.cfg.bootstrap_timeout_ms);
    let Some(offer) = e.bootstrap.take_part(payload, stale) else {
        return;
    };
    Stats::add(&e.stats.bootstrap_offers, 1);
    let room = offer.room.clone();
    if let Err(err) = e.rendezvous.offer(offer, stale) {
        Stats::add(&e.stats.bootstrap_offers_refused, 1);
        tracing::warn!(room, code = ?err.code, error = %err.message,
            "refused a bootstrap offer; its decode will time out");
    }
}
