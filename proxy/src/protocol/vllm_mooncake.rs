//! vLLM MooncakeConnector: concurrent legs, prefill pushes. The prefill's engine id is learnt
//! once per instance from its bootstrap server (`GET /query` → data-parallel rank → engine id)
//! and cached; each request gets a fresh `transfer_id` shared by both legs: prefill gets
//! `{do_remote_decode: true, transfer_id}` (one token, not streamed, `X-data-parallel-rank`),
//! decode gets the client's body with `{do_remote_prefill: true, remote_bootstrap_addr,
//! remote_engine_id, transfer_id}` and is streamed as soon as its head arrives.
//!
//! vLLM has no abort call: a failed leg's partner is dropped (vLLM aborts on disconnect).

use super::legs::{self, overlay};
use super::phases::{Abort, PdProtocol, Shape};
use super::types::{LegContext, LegError};
use crate::error::ApiError;
use crate::workers::Worker;
use bytes::Bytes;
use pdgate_scheduler::Role;
use serde_json::{json, Value};
use std::time::Duration;

pub const FIELD: &str = "kv_transfer_params";

pub struct VllmMooncake;

/// One request's KV transfer: the prefill engine that pushes, under an id both legs name.
pub struct Transfer {
    engine_id: String,
    transfer_id: String,
}

impl PdProtocol for VllmMooncake {
    const SHAPE: Shape = Shape::Concurrent {
        abort: Abort::Disconnect,
    };
    type State = Transfer;
    type Answer = Value;

    async fn prepare(&self, ctx: &LegContext<'_>, prefill: &Worker) -> Result<Transfer, LegError> {
        Ok(Transfer {
            engine_id: engine_id(ctx, prefill).await?,
            transfer_id: format!("xfer-{}", uuid::Uuid::new_v4()),
        })
    }

    fn prefill_body(&self, ctx: &LegContext<'_>, t: &Transfer) -> Bytes {
        let params = json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "transfer_id": t.transfer_id,
        });
        legs::prefill_body(ctx, &[(FIELD, params)])
    }

    fn decode_body(
        &self,
        ctx: &LegContext<'_>,
        prefill: &Worker,
        t: &Transfer,
        _: Option<&Value>,
    ) -> Result<Bytes, LegError> {
        let params = json!({
            "do_remote_decode": false,
            "do_remote_prefill": true,
            "remote_bootstrap_addr": prefill.bootstrap_url,
            "remote_engine_id": t.engine_id,
            "transfer_id": t.transfer_id,
        });
        Ok(overlay(&ctx.req.body, &[(FIELD, params)], &[]))
    }
}

/// The prefill's engine id (data-parallel rank 0), remembered on the worker or asked of its
/// bootstrap server.
async fn engine_id(ctx: &LegContext<'_>, prefill: &Worker) -> Result<String, LegError> {
    if let Some(id) = prefill.engine_id.lock().as_ref() {
        return Ok(id.clone());
    }
    let bootstrap = &prefill.bootstrap_url;
    let failed = |msg: String| LegError {
        role: Role::Prefill,
        retryable: true,
        error: ApiError::upstream("bootstrap_failed", msg),
    };
    let resp = ctx
        .state
        .client
        .get(format!("{bootstrap}/query"))
        .timeout(Duration::from_millis(
            ctx.state.cfg.upstream.control_timeout_ms,
        ))
        .send()
        .await
        .map_err(|e| failed(format!("bootstrap server {bootstrap} unreachable: {e}")))?;
    let info: Value = resp
        .json()
        .await
        .map_err(|e| failed(format!("bootstrap server {bootstrap} answered badly: {e}")))?;
    let id = info
        .pointer("/0/engine_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            failed(format!(
                "bootstrap server {bootstrap} names no engine for rank 0"
            ))
        })?
        .to_string();
    *prefill.engine_id.lock() = Some(id.clone());
    Ok(id)
}
