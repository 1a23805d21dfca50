//! Accepting and serving the gateway's connections: HTTP/1.1 through hyper, one task per
//! connection. The two inference routes go straight to the pipeline with the cross-cutting
//! concerns done inline (request id honoured or minted and echoed, API key, body limit);
//! everything else goes through the axum router of `server.rs`.
//!
//! Why not the router for everything: its tower stack (request-id layers, trace layer,
//! middleware, route matching, boxed futures per layer) was a tenth of the gateway's CPU per
//! inference request, the one path whose cost multiplies by the request rate.

use crate::error::ApiError;
use crate::pipeline;
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use pdgate_engine_sim::openai::ApiKind;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Serves `listener` until `shutdown` resolves, then stops accepting and waits for the open
/// connections to finish their requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Streamed tokens are small writes: they must not wait on Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let service = Conn {
            state: Arc::clone(&state),
            app: app.clone(),
        };
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One client connection's request handler.
#[derive(Clone)]
struct Conn {
    state: Arc<AppState>,
    app: Router,
}

type Served = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Conn {
    type Response = Response;
    type Error = Infallible;
    type Future = Served;

    fn call(&self, req: Request<Incoming>) -> Served {
        match inference_route(&req) {
            Some(kind) => Box::pin(inference(Arc::clone(&self.state), kind, req)),
            None => {
                let app = self.app.clone();
                Box::pin(async move { app.oneshot(req.map(Body::new)).await })
            }
        }
    }
}

fn inference_route(req: &Request<Incoming>) -> Option<ApiKind> {
    if req.method() != Method::POST {
        return None;
    }
    match req.uri().path() {
        "/v1/completions" => Some(ApiKind::Completions),
        "/v1/chat/completions" => Some(ApiKind::Chat),
        _ => None,
    }
}

async fn inference(
    state: Arc<AppState>,
    kind: ApiKind,
    req: Request<Incoming>,
) -> Result<Response, Infallible> {
    let (parts, body) = req.into_parts();
    let (request_id, echoed) = request_id(&parts.headers);
    let mut resp = if authorized(&state, &parts.headers) {
        let body = read_body(body, state.cfg.server.max_body_bytes).await;
        pipeline::serve(state, kind, request_id, body).await
    } else {
        ApiError::unauthorized().into_response()
    };
    resp.headers_mut().insert(REQUEST_ID.clone(), echoed);
    Ok(resp)
}

/// The client's `x-request-id` (echoed back as it came), or a fresh UUID.
fn request_id(headers: &HeaderMap) -> (String, HeaderValue) {
    if let Some(v) = headers.get(&REQUEST_ID) {
        return (v.to_str().unwrap_or_default().to_string(), v.clone());
    }
    let id = uuid::Uuid::new_v4().to_string();
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static(""));
    (id, value)
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    state
        .cfg
        .server
        .api_key
        .as_deref()
        .is_none_or(|key| crate::server::bearer_matches(headers, key))
}

/// The whole request body, or 413 past `limit` bytes.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::body_too_large(limit)),
        Err(e) => Err(ApiError::invalid(
            "body",
            format!("failed to read the request body: {e}"),
        )),
    }
}
