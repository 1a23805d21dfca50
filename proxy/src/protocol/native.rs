//! pdgate's native PD protocol with the reference engine: reserve KV on decode, prefill writes
//! every block into that reservation through pdgate-transfer, then the decode leg (the client's
//! body plus `pdgate_kv`) verifies the blocks and streams. Message types live in
//! `pdgate_wire::native`, shared with the engine.
//!
//! The reservation is released on every path where the decode leg did not take it over.

use super::legs::{overlay, params_missing, to_body, unreachable, upstream_failure};
use super::phases::{PdProtocol, PrefillAnswer, Shape};
use super::types::{LegContext, LegError};
use crate::metrics;
use crate::workers::Worker;
use bytes::Bytes;
use pdgate_scheduler::Observed;
use pdgate_scheduler::Role;
use pdgate_wire::native::{self as wire, DecodeLeg, KvDescriptor, PrefillReport};
use std::time::Duration;

pub struct Native;

/// KV reserved on decode for one request, freed unless the decode leg took it over.
pub struct Reservation {
    kv: KvDescriptor,
    release: ReleaseOnDrop,
}

impl PdProtocol for Native {
    const SHAPE: Shape = Shape::Sequential;
    type State = Reservation;
    type Answer = PrefillReport;

    async fn prepare(&self, ctx: &LegContext<'_>, _: &Worker) -> Result<Reservation, LegError> {
        // Armed before the reserve is sent: a request dropped while the reserve is in flight
        // (client gone, or a batch failing on another prompt) must not leave the reservation to
        // the TTL. Releasing a reservation the engine never made is a no-op there.
        let release = ReleaseOnDrop {
            client: ctx.state.client.clone(),
            url: ctx.decode.url.clone(),
            request_id: ctx.request_id.to_string(),
            armed: true,
        };
        let kv = reserve(ctx).await?;
        Ok(Reservation { kv, release })
    }

    fn prefill_body(&self, ctx: &LegContext<'_>, r: &Reservation) -> Bytes {
        to_body(&wire::PrefillRequest {
            request_id: ctx.request_id.into(),
            prompt: ctx.req.prompt.clone(),
            target: r.kv.clone(),
            pull: ctx.pull.clone(),
            evict_first: ctx.evict_first == Some(Role::Prefill),
        })
    }

    /// The client's body plus `pdgate_kv`, so decode verifies the landed blocks.
    fn decode_body(
        &self,
        ctx: &LegContext<'_>,
        prefill: &Worker,
        _: &Reservation,
        report: Option<&PrefillReport>,
    ) -> Result<Bytes, LegError> {
        let report = report.ok_or_else(|| {
            params_missing(format!("prefill engine {} sent no report", prefill.url))
        })?;
        let leg = DecodeLeg {
            request_id: ctx.request_id.into(),
            first_token: report.first_token,
            evict_first: ctx.evict_first == Some(Role::Decode),
        };
        let leg = serde_json::to_value(leg).unwrap_or_default();
        Ok(overlay(&ctx.req.body, &[(wire::DECODE_FIELD, leg)], &[]))
    }

    fn reported(&self, report: &PrefillReport, _: Duration) -> Observed {
        metrics::kv_handoff(
            u64::from(report.blocks_sent),
            report.bytes_sent,
            u64::from(report.cached_tokens),
            Duration::from_secs_f64(report.transfer_ms.max(0.0) / 1e3),
        );
        metrics::kv_pulled(u64::from(report.pulled_blocks));
        tracing::debug!(
            blocks = report.blocks_sent,
            bytes = report.bytes_sent,
            cached = report.cached_tokens,
            transfer_ms = report.transfer_ms,
            prefill_ms = report.prefill_ms,
            pulled_blocks = report.pulled_blocks,
            pull_ms = report.pull_ms,
            "KV handed off"
        );
        Observed {
            prefill_ms: report.prefill_ms,
            transfer_ms: report.transfer_ms,
            kv_bytes: report.bytes_sent,
            pulled_bytes: report.pulled_bytes,
            pull_ms: report.pull_ms,
        }
    }

    async fn release(&self, r: Reservation) {
        r.release.release().await;
    }

    fn handed_over(&self, r: Reservation) {
        r.release.disarm();
    }
}

/// The prefill leg posts a `PrefillRequest` and gets what was written where.
impl PrefillAnswer for PrefillReport {
    fn path(_: &LegContext<'_>) -> &'static str {
        wire::PREFILL_PATH
    }

    async fn read(
        _: &LegContext<'_>,
        engine: &str,
        resp: crate::http1::Response,
    ) -> Result<Self, LegError> {
        resp.json()
            .await
            .map_err(|e| unreachable(Role::Prefill, engine, &e))
    }
}

async fn reserve(ctx: &LegContext<'_>) -> Result<KvDescriptor, LegError> {
    let url = format!("{}{}", ctx.decode.url, wire::RESERVE_PATH);
    let body = wire::ReserveRequest {
        request_id: ctx.request_id.into(),
        prompt: ctx.req.prompt.clone(),
    };
    let timeout = Duration::from_millis(ctx.state.cfg.upstream.control_timeout_ms);
    let resp = ctx
        .state
        .client
        .post(&url)
        .json(&body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| unreachable(Role::Decode, &ctx.decode.url, &e))?;
    if !resp.status().is_success() {
        return Err(upstream_failure(Role::Decode, resp).await);
    }
    resp.json()
        .await
        .map_err(|e| unreachable(Role::Decode, &ctx.decode.url, &e))
}

/// Frees the decode reservation unless the decode leg took it over. Runs on error paths and when
/// the request future is dropped (client disconnect), so it must not need the caller's task.
struct ReleaseOnDrop {
    client: crate::http1::Client,
    url: String,
    request_id: String,
    armed: bool,
}

impl ReleaseOnDrop {
    fn disarm(mut self) {
        self.armed = false;
    }

    async fn release(mut self) {
        self.armed = false;
        let url = format!("{}{}", self.url, wire::RELEASE_PATH);
        release(
            self.client.clone(),
            url,
            std::mem::take(&mut self.request_id),
        )
        .await;
    }
}

async fn release(client: crate::http1::Client, url: String, request_id: String) {
    let body = wire::ReleaseRequest {
        request_id: request_id.clone(),
    };
    match client
        .post(&url)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(_) => tracing::debug!(request_id = %request_id, "released KV reservation"),
        // The engine reclaims it after its reservation TTL anyway.
        Err(e) => {
            tracing::warn!(request_id = %request_id, error = %e, "could not release KV reservation")
        }
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (client, request_id) = (self.client.clone(), std::mem::take(&mut self.request_id));
        let url = format!("{}{}", self.url, wire::RELEASE_PATH);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(release(client, url, request_id));
    }
}
