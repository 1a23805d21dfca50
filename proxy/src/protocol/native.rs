//! pdgate's native PD protocol with the reference engine: reserve KV on decode, prefill writes
//! every block into that reservation through pdgate-transfer, then the decode leg (the client's
//! body plus `pdgate_kv`) verifies the blocks and streams. Message types live in
//! `pdgate_engine_sim::native`, shared with the engine.
//!
//! The reservation is released here on every path where the decode leg did not take it over.

use super::legs::{unreachable, upstream_failure};
use super::types::{DecodeStart, LegContext, LegError};
use crate::metrics;
use crate::workers::Worker;
use pdgate_engine_sim::native::{self as wire, DecodeLeg, KvDescriptor, PrefillReport};
use pdgate_scheduler::Observed;
use pdgate_scheduler::Role;
use std::time::Duration;

pub async fn run(
    ctx: &LegContext<'_>,
    prefill_worker: &Worker,
    on_prefill_done: impl FnOnce(Option<Observed>),
) -> Result<DecodeStart, LegError> {
    // Armed before the reserve is sent: a request dropped while the reserve is in flight (client
    // gone, or a batch failing on another prompt) must not leave the reservation to the TTL.
    // Releasing a reservation the engine never made is a no-op there.
    let guard = ReleaseOnDrop {
        client: ctx.state.client.clone(),
        url: ctx.decode.url.clone(),
        request_id: ctx.request_id.to_string(),
        armed: true,
    };
    let kv = reserve(ctx).await?;
    let report = match prefill(ctx, prefill_worker, &kv).await {
        Ok(r) => r,
        Err(e) => {
            // Released before returning, so a retry may reserve again under the same request id.
            guard.release().await;
            return Err(e);
        }
    };
    on_prefill_done(Some(Observed {
        prefill_ms: report.prefill_ms,
        transfer_ms: report.transfer_ms,
        kv_bytes: report.bytes_sent,
    }));
    metrics::kv_handoff(
        u64::from(report.blocks_sent),
        report.bytes_sent,
        u64::from(report.cached_tokens),
        Duration::from_secs_f64(report.transfer_ms.max(0.0) / 1e3),
    );
    tracing::debug!(
        blocks = report.blocks_sent,
        bytes = report.bytes_sent,
        cached = report.cached_tokens,
        transfer_ms = report.transfer_ms,
        "KV handed off"
    );
    let response = decode(ctx, &report).await?;
    guard.disarm();
    Ok(DecodeStart::new(response))
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

async fn prefill(
    ctx: &LegContext<'_>,
    worker: &Worker,
    kv: &KvDescriptor,
) -> Result<PrefillReport, LegError> {
    let url = format!("{}{}", worker.url, wire::PREFILL_PATH);
    let body = wire::PrefillRequest {
        request_id: ctx.request_id.into(),
        prompt: ctx.req.prompt.clone(),
        target: kv.clone(),
    };
    let timeout = Duration::from_secs(ctx.state.cfg.upstream.prefill_timeout_secs);
    let send = ctx
        .state
        .client
        .post(&url)
        .header("x-request-id", ctx.request_id)
        .json(&body)
        .timeout(timeout)
        .send();
    let resp = send
        .await
        .map_err(|e| unreachable(Role::Prefill, &worker.url, &e))?;
    if !resp.status().is_success() {
        metrics::leg(Role::Prefill, "error");
        return Err(upstream_failure(Role::Prefill, resp).await);
    }
    let report = resp
        .json()
        .await
        .map_err(|e| unreachable(Role::Prefill, &worker.url, &e))?;
    metrics::leg(Role::Prefill, "ok");
    Ok(report)
}

/// The decode leg: the client's body plus `pdgate_kv`, so decode verifies the landed blocks.
async fn decode(
    ctx: &LegContext<'_>,
    report: &PrefillReport,
) -> Result<crate::upstream::Response, LegError> {
    let leg = DecodeLeg {
        request_id: ctx.request_id.into(),
        first_token: report.first_token,
    };
    let leg = serde_json::to_value(leg).unwrap_or_default();
    let body = super::legs::overlay(&ctx.req.body, &[(wire::DECODE_FIELD, leg)], &[]);
    super::legs::decode_head_raw(ctx, body, &[]).await
}

/// Frees the decode reservation unless the decode leg took it over. Runs on error paths and when
/// the request future is dropped (client disconnect), so it must not need the caller's task.
struct ReleaseOnDrop {
    client: crate::upstream::Client,
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

async fn release(client: crate::upstream::Client, url: String, request_id: String) {
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
