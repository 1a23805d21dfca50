//! One client connection, HTTP/1.1 (RFC 9112) served by hand: request heads parsed with
//! `httparse`, bodies read whole (content-length or chunked, bounded) through the same framing
//! code the engine client uses, keep-alive and pipelining, `Expect: 100-continue`, and
//! responses written with every part that is ready in one write (head and a whole JSON answer
//! go out together; a stream goes out chunk by chunk as it comes).
//!
//! While a request is being answered the socket is still read: a client that closes it is gone,
//! and the answer is dropped, which drops the engine legs behind it (they abort). Bytes of a
//! pipelined next request are kept for later.

use super::framing::{Chunk, Framing, Step};
use axum::body::{Body, Bytes, HttpBody};
use axum::response::Response;
use bytes::{BufMut, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Most header lines a request may carry.
const MAX_HEADERS: usize = 100;
/// Longest request head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A request head must arrive whole within this, once its first byte did (slow-loris bound).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A kept-alive connection with no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const READ_CHUNK: usize = 16 * 1024;

/// A request's head, as the handler gets it.
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Why a request was refused before it reached the handler.
#[derive(Debug)]
pub enum Refusal {
    /// 400: the request is not HTTP/1.x the server can read.
    Malformed(String),
    /// 413: the body is over the limit.
    BodyTooLarge,
    /// 431: the head is over the limit.
    HeadTooLarge,
}

pub trait Handler: Send + Sync + 'static {
    fn call(&self, head: Head, body: Bytes) -> BoxFuture<'static, Response>;
    /// The largest request body accepted, in bytes (413 past it).
    fn max_body(&self) -> usize;
    /// The response to a refused request; the connection closes after it.
    fn refuse(&self, why: Refusal) -> Response;
}

/// Serves requests on `io` until the client closes, asks to close, breaks the protocol, or
/// `shutdown` fires (a request under way is answered first).
pub async fn serve<S, H>(mut io: S, handler: &H, shutdown: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let (head, body) = match read_request(&mut io, &mut buf, handler.max_body(), shutdown).await
        {
            Ok(Some(request)) => request,
            Ok(None) | Err(Failure::Io) => return,
            Err(Failure::Refused(why)) => {
                let _ = write_response(&mut io, handler.refuse(why), false, false).await;
                return;
            }
        };
        let keep_alive = keep_alive(&head);
        let head_only = head.method == Method::HEAD;
        let answer = handler.call(head, body);
        let Some(resp) = answer_unless_gone(&mut io, &mut buf, answer).await else {
            return;
        };
        match write_response(&mut io, resp, keep_alive, head_only).await {
            Ok(true) if !shutdown.is_cancelled() => {}
            _ => return,
        }
    }
}

/// The next request, head and whole body; `None` when the connection ended (or shutdown came)
/// between requests.
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    max_body: usize,
    shutdown: &CancellationToken,
) -> Result<Option<(Head, Bytes)>, Failure> {
    let Some(head) = read_head(io, buf, shutdown).await? else {
        return Ok(None);
    };
    let body = read_body(io, buf, &head, max_body).await?;
    Ok(Some((head, body)))
}

enum Failure {
    Refused(Refusal),
    /// The socket failed or closed mid-request: nobody to answer.
    Io,
}

fn malformed(msg: impl Into<String>) -> Failure {
    Failure::Refused(Refusal::Malformed(msg.into()))
}

/// Reads until `buf` holds a whole request head and parses it; `None` when the connection
/// ended (or shutdown came) between requests.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    shutdown: &CancellationToken,
) -> Result<Option<Head>, Failure> {
    loop {
        if let Some(head) = parse_head(buf)? {
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Failure::Refused(Refusal::HeadTooLarge));
        }
        let between_requests = buf.is_empty();
        let wait = if between_requests {
            IDLE_TIMEOUT
        } else {
            HEAD_TIMEOUT
        };
        buf.reserve(READ_CHUNK);
        let read = tokio::select! {
            r = tokio::time::timeout(wait, io.read_buf(buf)) => r,
            () = shutdown.cancelled(), if between_requests => return Ok(None),
        };
        match read {
            Ok(Ok(0)) if between_requests => return Ok(None),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::Io),
            Ok(Ok(_)) => {}
            Err(_) if between_requests => return Ok(None),
            Err(_) => return Err(malformed("request head not received in time")),
        }
    }
}

/// A whole head at the front of `buf` (taken out of it), or `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Failure> {
    // Blank lines before a request are allowed (RFC 9112 §2.2).
    while buf.starts_with(b"\r\n") {
        let _ = buf.split_to(2);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            return Err(Failure::Refused(Refusal::HeadTooLarge))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::Refused(Refusal::HeadTooLarge))
        }
        Err(e) => return Err(malformed(format!("malformed request head: {e}"))),
    };
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| malformed("invalid method"))?;
    let uri: Uri = req
        .path
        .unwrap_or_default()
        .parse()
        .map_err(|_| malformed("invalid request target"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| malformed("invalid header name"))?;
        let value =
            HeaderValue::from_bytes(h.value).map_err(|_| malformed("invalid header value"))?;
        map.append(name, value);
    }
    let _ = buf.split_to(len);
    Ok(Some(Head {
        method,
        uri,
        version,
        headers: map,
    }))
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 closes unless told `keep-alive`.
fn keep_alive(head: &Head) -> bool {
    let has = |token: &str| {
        head.headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    match head.version {
        Version::HTTP_10 => has("keep-alive"),
        _ => !has("close"),
    }
}

/// How the request's body is framed: chunked, a length, or none (RFC 9112 §6.3).
fn request_framing(headers: &HeaderMap) -> Result<Framing, Failure> {
    if let Some(te) = headers.get(TRANSFER_ENCODING) {
        let chunked = te
            .to_str()
            .ok()
            .and_then(|s| s.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        if !chunked || headers.get_all(TRANSFER_ENCODING).iter().count() > 1 {
            return Err(malformed("unsupported transfer-encoding"));
        }
        return Ok(Framing::Chunked(Chunk::Size));
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(Framing::Length(0));
    };
    let parse = |v: &HeaderValue| {
        v.to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
    };
    let n = parse(first).ok_or_else(|| malformed("invalid content-length"))?;
    if lengths.any(|v| parse(v) != Some(n)) {
        return Err(malformed("conflicting content-length"));
    }
    Ok(Framing::Length(n))
}

async fn read_body<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    head: &Head,
    limit: usize,
) -> Result<Bytes, Failure> {
    let mut framing = request_framing(&head.headers)?;
    if let Framing::Length(n) = framing {
        if n > limit as u64 {
            return Err(Failure::Refused(Refusal::BodyTooLarge));
        }
        if n == 0 {
            return Ok(Bytes::new());
        }
        // The usual case: the whole body arrived with the head.
        if buf.len() as u64 >= n {
            return Ok(buf.split_to(n as usize).freeze());
        }
    }
    let expects_continue = head
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && buf.is_empty() && head.version == Version::HTTP_11 {
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| Failure::Io)?;
    }
    let mut body = BytesMut::new();
    loop {
        match framing.step(buf).map_err(malformed)? {
            Step::Data(d) => {
                if body.len() + d.len() > limit {
                    return Err(Failure::Refused(Refusal::BodyTooLarge));
                }
                body.extend_from_slice(&d);
            }
            Step::End => return Ok(body.freeze()),
            Step::NeedMore => {
                // A chunk announced past the limit is refused before its bytes are waited for.
                if let Framing::Chunked(Chunk::Data(n)) = framing {
                    if body.len() as u64 + n > limit as u64 {
                        return Err(Failure::Refused(Refusal::BodyTooLarge));
                    }
                }
                buf.reserve(READ_CHUNK);
                let read = tokio::time::timeout(HEAD_TIMEOUT, io.read_buf(buf)).await;
                match read {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return Err(Failure::Io),
                    Err(_) => return Err(malformed("request body not received in time")),
                }
            }
        }
    }
}

/// The handler's answer, or `None` if the client closed the connection while waiting for it.
async fn answer_unless_gone<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    answer: BoxFuture<'static, Response>,
) -> Option<Response> {
    tokio::pin!(answer);
    let mut reading = true;
    loop {
        tokio::select! {
            biased;
            resp = &mut answer => return Some(resp),
            read = io.read_buf(buf), if reading => match read {
                Ok(0) | Err(_) => return None,
                // A pipelined next request: kept, up to one head's worth; past that, wait.
                Ok(_) => reading = buf.len() <= MAX_HEAD_BYTES,
            },
        }
    }
}

fn next_frame(
    body: &mut Body,
) -> impl std::future::Future<Output = Option<Result<http_body::Frame<Bytes>, axum::Error>>> + '_ {
    futures::future::poll_fn(move |cx| std::pin::Pin::new(&mut *body).poll_frame(cx))
}

/// Writes `resp`; returns whether the connection may carry another request.
async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    resp: Response,
    keep_alive: bool,
    head_only: bool,
) -> std::io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let bodiless = head_only
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let length = body.size_hint().exact();
    let chunked = !bodiless && length.is_none();
    let mut out = BytesMut::with_capacity(1024);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(parts.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    match length {
        Some(n) if !bodiless || head_only => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        _ if chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !keep_alive {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
    if bodiless {
        io.write_all(&out).await?;
        return Ok(keep_alive);
    }
    loop {
        // Whatever is ready now joins what is waiting to go out; only a body that has to wait
        // for its next part makes the server write first.
        let next = match next_frame(&mut body).now_or_never() {
            Some(frame) => frame,
            None => {
                io.write_all(&out).await?;
                out.clear();
                next_frame(&mut body).await
            }
        };
        match next {
            None => break,
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers: not sent
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    let _ = write!(out, "{:x}\r\n", data.len());
                    out.put_slice(&data);
                    out.put_slice(b"\r\n");
                } else {
                    out.put_slice(&data);
                }
            }
            // A body that broke after its head went out: the only honest signal left is
            // closing the connection without the terminating chunk.
            Some(Err(e)) => {
                tracing::warn!(error = %e, "response body failed mid-way; closing the connection");
                io.write_all(&out).await?;
                return Ok(false);
            }
        }
    }
    if chunked {
        out.put_slice(b"0\r\n\r\n");
    }
    io.write_all(&out).await?;
    Ok(keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Echoes method, path and body; `/stream` answers in three parts with a pause, `/hang`
    /// never answers (and counts how often it was dropped unanswered).
    #[derive(Default)]
    struct Echo {
        dropped: Arc<AtomicUsize>,
    }

    struct CountDrop(Arc<AtomicUsize>);
    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Handler for Echo {
        fn call(&self, head: Head, body: Bytes) -> BoxFuture<'static, Response> {
            let dropped = Arc::clone(&self.dropped);
            Box::pin(async move {
                match head.uri.path() {
                    "/stream" => {
                        let parts =
                            futures::stream::iter(["a", "bb", "ccc"]).then(|p| async move {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                Ok::<_, std::convert::Infallible>(Bytes::from(p))
                            });
                        Response::new(Body::from_stream(parts))
                    }
                    "/hang" => {
                        let _guard = CountDrop(dropped);
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    path => {
                        let text =
                            format!("{} {path} {}", head.method, String::from_utf8_lossy(&body));
                        Response::new(Body::from(text))
                    }
                }
            })
        }
        fn max_body(&self) -> usize {
            64
        }
        fn refuse(&self, why: Refusal) -> Response {
            let status = match why {
                Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
                Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            };
            let mut r = Response::new(Body::from("refused"));
            *r.status_mut() = status;
            r
        }
    }

    use futures::StreamExt;

    /// Serves one connection on a duplex pipe, writes `input` (then closes the write side
    /// unless `keep_open`), and returns everything the server wrote.
    async fn exchange(handler: Echo, input: &[u8], keep_open: bool) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let stop = CancellationToken::new();
        let task = tokio::spawn(async move {
            serve(server, &handler, &stop).await;
        });
        client.write_all(input).await.expect("write");
        if !keep_open {
            client.shutdown().await.expect("shutdown");
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
        task.abort();
        String::from_utf8(out).expect("utf8")
    }

    #[tokio::test]
    async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
        let input = b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n";
        let out = exchange(Echo::default(), input, false).await;
        let first = out.find("POST /a hi").expect(&out);
        let second = out.find("GET /b ").expect(&out);
        assert!(first < second, "{out}");
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(
            out.contains("content-length: 10\r\n"),
            "known lengths are sent: {out}"
        );
    }

    #[tokio::test]
    async fn chunked_request_bodies_are_decoded() {
        let input = b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let out = exchange(Echo::default(), input, false).await;
        assert!(out.contains("POST /c abcde"), "{out}");
    }

    #[tokio::test]
    async fn streamed_answers_go_out_chunked_and_end_properly() {
        let out = exchange(Echo::default(), b"GET /stream HTTP/1.1\r\n\r\n", false).await;
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(
            out.ends_with("1\r\na\r\n2\r\nbb\r\n3\r\nccc\r\n0\r\n\r\n"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn expect_continue_gets_its_interim_answer() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let stop = CancellationToken::new();
        tokio::spawn(async move { serve(server, &Echo::default(), &stop).await });
        client
            .write_all(b"POST /e HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
            .await
            .expect("write");
        let mut interim = [0u8; 25];
        client.read_exact(&mut interim).await.expect("read");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"xyz").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut rest = String::new();
        client.read_to_string(&mut rest).await.expect("read");
        assert!(rest.contains("POST /e xyz"), "{rest}");
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_their_status_and_closed() {
        let cases: [(&[u8], &str); 5] = [
            (b"POST /big HTTP/1.1\r\ncontent-length: 65\r\n\r\n", "413"),
            (
                b"POST /big HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n41\r\n",
                "413",
            ),
            (
                b"POST /x HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
                "400",
            ),
            (
                b"POST /x HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
                "400",
            ),
            (b"GET\x01 / HTTP/1.1\r\n\r\n", "400"),
        ];
        for (input, status) in cases {
            let out = exchange(Echo::default(), input, true).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status} ")),
                "{status}: {out}"
            );
            assert!(out.contains("connection: close\r\n"), "{out}");
        }
        let long = format!(
            "GET / HTTP/1.1\r\nx: {}\r\n\r\n",
            "y".repeat(MAX_HEAD_BYTES + 1)
        );
        let out = exchange(Echo::default(), long.as_bytes(), true).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[tokio::test]
    async fn connection_close_and_http10_end_the_connection() {
        let out = exchange(
            Echo::default(),
            b"GET /a HTTP/1.1\r\nconnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            true,
        )
        .await;
        assert!(out.contains("GET /a") && !out.contains("GET /b"), "{out}");
        let out = exchange(Echo::default(), b"GET /c HTTP/1.0\r\n\r\n", true).await;
        assert!(
            out.contains("connection: close\r\n") && out.contains("GET /c"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn a_client_that_leaves_drops_its_unanswered_request() {
        let handler = Echo::default();
        let dropped = Arc::clone(&handler.dropped);
        let out = exchange(handler, b"GET /hang HTTP/1.1\r\n\r\n", false).await;
        assert_eq!(out, "");
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the answer was dropped");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { serve(server, &Echo::default(), &stop).await }
        });
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = client.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).contains("GET /a"));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("idle connection closed at shutdown")
            .expect("join");
    }
}
