//! Accepting and serving the gateway's connections: one task per connection speaking HTTP/1.1
//! (`conn`). Every request gets its id and its route's credential check here (`access`), then
//! the two inference routes go straight to the pipeline and everything else to the axum router
//! of `server.rs`. The body limit is the connection's. With `[server.tls]` each connection's
//! TLS handshake comes first, within the head deadline and holding the connection's slot, so a
//! client that connects and never handshakes costs a bounded time like one that never sends.
//!
//! Why not hyper and the router for everything: on the inference path, the router's tower stack
//! (request-id and trace layers, middleware, route matching, a boxed future per layer) and
//! hyper's connection machinery were a fifth of the gateway's CPU per request, on the one path
//! whose cost multiplies by the request rate.

use crate::access::REQUEST_ID;
use crate::config::ConnLimits;
use crate::error::ApiError;
use crate::http1::server::{self as conn, Head, Refusal};
use crate::state::AppState;
use crate::tls::listener::ListenerTls;
use crate::{inference, metrics, request_id};
use axum::body::{Body, Bytes, HttpBody};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::BytesMut;
use futures::future::BoxFuture;
use http::{HeaderValue, Method, Request};
use pdgate_wire::openai::ApiKind;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::Instrument;

/// Serves `listener` (over TLS when `tls` is given) until `shutdown` resolves, then stops
/// accepting and waits for the open connections to finish the requests under way (the caller
/// bounds that wait).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    app: Router,
    tls: Option<Arc<ListenerTls>>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = &state.cfg.server.limits;
    let deadlines = deadlines(limits);
    // Each connection holds one slot for its life; past the cap a connection gets 503.
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    // Turning connections away costs a task each too, so those are capped as well.
    let refusals = Arc::new(Semaphore::new(MAX_REFUSING));
    let handler = Arc::new(Gateway {
        routes: Arc::new(Routes { state, app }),
    });
    let stop = CancellationToken::new();
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
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
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            turn_away(tcp, tls.clone(), &refusals, deadlines.write, &mut conns);
            continue;
        };
        // Streamed tokens are small writes: they must not wait on Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let (handler, stop, tls) = (Arc::clone(&handler), stop.clone(), tls.clone());
        conns.spawn(async move {
            match tls {
                None => conn::serve(tcp, &*handler, &deadlines, &stop).await,
                Some(tls) => {
                    if let Some(tls) = handshake(&tls, tcp, deadlines.head).await {
                        conn::serve(tls, &*handler, &deadlines, &stop).await;
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    stop.cancel();
    while conns.join_next().await.is_some() {}
}

/// Connections being turned away at once; past this, one over the cap is closed unanswered.
const MAX_REFUSING: usize = 256;

fn deadlines(limits: &ConnLimits) -> conn::Deadlines {
    let ms = Duration::from_millis;
    conn::Deadlines {
        head: ms(limits.head_timeout_ms),
        body: ms(limits.body_timeout_ms),
        body_pace: conn::Pace {
            grace: ms(limits.body_grace_ms),
            bytes_per_sec: limits.body_min_rate_bytes_per_sec,
        },
        idle: ms(limits.idle_timeout_ms),
        write: ms(limits.write_timeout_ms),
    }
}

/// The server side of a TLS handshake on `tcp`, by `within`; `None` (the connection closed)
/// if it failed or took longer.
async fn handshake(
    tls: &ListenerTls,
    tcp: TcpStream,
    within: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(within, tls.acceptor().accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            metrics::tls_handshake_failed("error");
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::tls_handshake_failed("timeout");
            tracing::debug!("TLS handshake not completed in time");
            None
        }
    }
}

/// A connection past `server.limits.max_connections`: answered 503 and closed, by a task of its
/// own (bounded in number) so the accept loop never waits on a client. Over TLS the handshake
/// comes first, within the write deadline: a plaintext 503 would mean nothing to the client.
fn turn_away(
    tcp: TcpStream,
    tls: Option<Arc<ListenerTls>>,
    refusals: &Arc<Semaphore>,
    write: Duration,
    conns: &mut JoinSet<()>,
) {
    metrics::rejected("connections_full");
    let Ok(refusing) = Arc::clone(refusals).try_acquire_owned() else {
        return; // dropped: closed without an answer
    };
    conns.spawn(async move {
        match tls {
            None => refuse(tcp, write).await,
            Some(tls) => {
                if let Some(stream) = handshake(&tls, tcp, write).await {
                    refuse(stream, write).await;
                }
            }
        }
        drop(refusing);
    });
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, write: Duration) {
    let resp = ApiError::unavailable(
        "too_many_connections",
        "the gateway has as many client connections as it takes; retry shortly",
    )
    .into_response();
    let mut buf = BytesMut::new();
    conn::answer_and_close(&mut io, &mut buf, resp, write).await;
}

/// What every connection's requests are handed to.
struct Gateway {
    routes: Arc<Routes>,
}

struct Routes {
    state: Arc<AppState>,
    app: Router,
}

impl conn::Handler for Gateway {
    fn call(&self, head: Head, body: Bytes) -> BoxFuture<'static, Response> {
        Box::pin(answer(Arc::clone(&self.routes), head, body))
    }

    fn max_body(&self) -> usize {
        self.routes.state.cfg.server.max_body_bytes
    }

    fn refuse(&self, why: Refusal) -> Response {
        let limit = self.max_body();
        let err = match why {
            Refusal::BodyTooLarge => ApiError::body_too_large(limit),
            Refusal::HeadTooLarge => ApiError {
                status: http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                ..ApiError::invalid("headers", "request head too large")
            },
            Refusal::Malformed(msg) => ApiError::invalid("request", msg),
            Refusal::Timeout(msg) => ApiError {
                status: http::StatusCode::REQUEST_TIMEOUT,
                ..ApiError::invalid("request", msg)
            },
            Refusal::NotImplemented(msg) => ApiError {
                status: http::StatusCode::NOT_IMPLEMENTED,
                ..ApiError::invalid("transfer-encoding", msg)
            },
        };
        err.into_response()
    }
}

/// The inference API a path names, whatever the method.
fn inference_route(head: &Head) -> Option<ApiKind> {
    match head.uri.path() {
        "/v1/completions" => Some(ApiKind::Completions),
        "/v1/chat/completions" => Some(ApiKind::Chat),
        _ => None,
    }
}

/// Any other method on an inference path.
fn post_only() -> Response {
    let err = ApiError {
        status: http::StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid("method", "this route takes POST")
    };
    let mut resp = err.into_response();
    resp.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
    resp
}

/// Every request, whatever its route: its id (honoured or minted, echoed back) and the
/// credential its route asks for, then the pipeline (the two inference POSTs) or the router.
async fn answer(routes: Arc<Routes>, head: Head, body: Bytes) -> Response {
    let (request_id, echoed) = request_id::of(&head.headers);
    // Every line of the request carries its id, the body's relay included.
    let span = tracing::info_span!("request", request_id = %request_id);
    let resp = dispatch(routes, head, body, request_id)
        .instrument(span.clone())
        .await;
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert(REQUEST_ID.clone(), echoed);
    Response::from_parts(parts, Body::new(InSpan { body, span }))
}

async fn dispatch(routes: Arc<Routes>, head: Head, body: Bytes, request_id: String) -> Response {
    let pass = match routes
        .state
        .access
        .admit(&head.method, head.uri.path(), &head.headers)
    {
        Ok(pass) => pass,
        Err(e) => return e.into_response(),
    };
    let resp = match inference_route(&head) {
        Some(kind) if head.method == Method::POST => {
            inference::serve(Arc::clone(&routes.state), kind, request_id, body).await
        }
        Some(_) => post_only(),
        None => {
            let mut req = Request::new(Body::from(body));
            *req.method_mut() = head.method;
            *req.uri_mut() = head.uri;
            *req.version_mut() = head.version;
            *req.headers_mut() = head.headers;
            match routes.app.clone().oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            }
        }
    };
    // An API key's concurrency slot is held until the answer's last byte.
    pass.keep_until_body_ends(resp)
}

/// A response body polled inside its request's span.
struct InSpan {
    body: Body,
    span: tracing::Span,
}

impl HttpBody for InSpan {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        std::pin::Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A line logged while the response body is relayed (after the handler returned) still
    /// names the request.
    #[test]
    fn lines_logged_while_the_body_is_relayed_carry_the_request_id() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "req-42");
            let parts = futures::StreamExt::map(futures::stream::iter([1, 2]), |i| {
                tracing::warn!(part = i, "relaying");
                Ok::<_, std::convert::Infallible>(Bytes::from("x"))
            });
            let mut body = InSpan {
                body: Body::from_stream(parts),
                span,
            };
            futures::executor::block_on(async {
                while futures::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx))
                    .await
                    .is_some()
                {}
            });
        });
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(text.matches("relaying").count(), 2, "{text}");
        assert_eq!(text.matches("request_id=\"req-42\"").count(), 2, "{text}");
    }
}
