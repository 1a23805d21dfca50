//! One client connection, HTTP/1.1 (RFC 9112) served by hand: request heads parsed with
//! `httparse`, bodies read whole (content-length or chunked, bounded) through the same framing
//! code the engine client uses, keep-alive and pipelining, `Expect: 100-continue`, and
//! responses written with every part that is ready in one write (head and a whole JSON answer
//! go out together; a stream goes out chunk by chunk as it comes).
//!
//! Strict where a lenient reading lets two parsers disagree on where a request ends (request
//! smuggling): a request with both `Transfer-Encoding` and `Content-Length` is read as chunked
//! and its connection closed after the answer (RFC 9112 §6.1); `Transfer-Encoding` on HTTP/1.0,
//! or with `chunked` anything but the one and final coding, is refused and closed; chunk sizes
//! are bare hex digits (`framing`). An HTTP/1.0 client never gets a chunked answer: a body of
//! unknown length goes out as it comes and the connection closes after it.
//!
//! Every wait on the client is bounded ([`Deadlines`]): a head must arrive whole within its
//! deadline from its first byte, a body within its own from the head's end, a kept-alive
//! connection may idle only so long, and each write must be taken by the client in time. A
//! client that misses one loses the connection; its request, if under way, is dropped.
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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most header lines a request may carry.
const MAX_HEADERS: usize = 100;
/// Longest request head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// After a refusal or a close the server chose, what the client still sends is read and dropped
/// for at most this long and this much (see [`linger`]).
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// How long each part of an exchange may take.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// A request head, from its first byte to its end.
    pub head: Duration,
    /// A request body, from the end of its head to its end.
    pub body: Duration,
    /// How fast a body must keep arriving, once its grace has passed.
    pub body_pace: Pace,
    /// A kept-alive connection between requests.
    pub idle: Duration,
    /// Each write toward the client.
    pub write: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            head: Duration::from_secs(30),
            body: Duration::from_secs(60),
            body_pace: Pace::default(),
            idle: Duration::from_secs(75),
            write: Duration::from_secs(30),
        }
    }
}

/// A minimum receive rate in the manner of Apache's `mod_reqtimeout` `MinRate`: a body may take
/// `grace` to start, and each `bytes_per_sec` bytes that arrive buy it one more second. A client
/// trickling a large body a byte at a time is cut off after `grace`, not after the whole-body
/// deadline, while a slow link that keeps moving is never refused before that deadline.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub grace: Duration,
    /// Zero turns the rate off (only the whole-body deadline remains).
    pub bytes_per_sec: u64,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            bytes_per_sec: 1024,
        }
    }
}

impl Pace {
    /// When a body that started at `start` and has `received` bytes so far must have sent more.
    fn due(&self, start: Instant, received: usize) -> Option<Instant> {
        if self.bytes_per_sec == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(received as f64 / self.bytes_per_sec as f64);
        Some(start + self.grace + earned)
    }
}

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
    /// 408: the head or the body did not arrive within its deadline.
    Timeout(String),
    /// 501: a transfer coding the server does not implement (only `chunked` is).
    NotImplemented(String),
}

pub trait Handler: Send + Sync + 'static {
    fn call(&self, head: Head, body: Bytes) -> BoxFuture<'static, Response>;
    /// The largest request body accepted, in bytes (413 past it).
    fn max_body(&self) -> usize;
    /// The response to a refused request; the connection closes after it.
    fn refuse(&self, why: Refusal) -> Response;
}

/// Serves requests on `io` until the client closes, asks to close, breaks the protocol, misses
/// a deadline, or `shutdown` fires (a request under way is answered first).
pub async fn serve<S, H>(mut io: S, handler: &H, limits: &Deadlines, shutdown: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let req = match read_request(&mut io, &mut buf, handler.max_body(), limits, shutdown).await
        {
            Ok(Some(request)) => request,
            Ok(None) | Err(Failure::Io) => return,
            Err(Failure::Refused(why)) => {
                tracing::debug!(refusal = ?why, "request refused");
                answer_and_close(&mut io, &mut buf, handler.refuse(why), limits.write).await;
                return;
            }
        };
        let reply = Reply {
            keep_alive: keep_alive(&req.head) && !req.close_after,
            head_only: req.head.method == Method::HEAD,
            version: req.head.version,
        };
        let answer = handler.call(req.head, req.body);
        let Some(resp) = answer_unless_gone(&mut io, &mut buf, answer).await else {
            return;
        };
        match write_response(&mut io, resp, reply, limits.write).await {
            Ok(true) if !shutdown.is_cancelled() => {}
            Ok(true) => return,
            Ok(false) => {
                linger(&mut io, &mut buf, limits.write).await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "response not delivered; closing the connection");
                return;
            }
        }
    }
}

/// Writes `resp` on a connection the server is closing (a refusal, or a connection past the
/// cap), then lingers so the client can read it.
pub async fn answer_and_close<S>(io: &mut S, buf: &mut BytesMut, resp: Response, write: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Not chunked whatever the client's version (it may not have said), and closed after.
    let reply = Reply {
        keep_alive: false,
        head_only: false,
        version: Version::HTTP_10,
    };
    if write_response(io, resp, reply, write).await.is_ok() {
        linger(io, buf, write).await;
    }
}

/// Closing a socket with unread bytes in it makes the kernel send a reset, which can destroy an
/// answer the client has not read yet. So the write side is shut first (the client sees the
/// end), and whatever it still sends is read and dropped, bounded in time and bytes.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    write: Duration,
) {
    if !matches!(tokio::time::timeout(write, io.shutdown()).await, Ok(Ok(()))) {
        return;
    }
    let until = Instant::now() + LINGER_TIME;
    let mut drained = 0;
    while drained < LINGER_BYTES {
        buf.clear();
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout_at(until, io.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => return,
        }
    }
}

/// A request read whole.
struct Request {
    head: Head,
    body: Bytes,
    /// Its framing asks for the connection to close after the answer (`Transfer-Encoding`
    /// with `Content-Length`: whoever sent both may frame the next request differently).
    close_after: bool,
}

/// The next request, head and whole body; `None` when the connection ended (or shutdown came,
/// or it idled past its deadline) between requests.
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    max_body: usize,
    limits: &Deadlines,
    shutdown: &CancellationToken,
) -> Result<Option<Request>, Failure> {
    let Some(head) = read_head(io, buf, limits, shutdown).await? else {
        return Ok(None);
    };
    let framing = request_framing(&head)?;
    let body = read_body(io, buf, &head, framing.framing, max_body, limits).await?;
    Ok(Some(Request {
        head,
        body,
        close_after: framing.close_after,
    }))
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
/// ended (or shutdown came, or the idle deadline passed) between requests.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    limits: &Deadlines,
    shutdown: &CancellationToken,
) -> Result<Option<Head>, Failure> {
    // The head's deadline runs from its first byte, whichever read brought it (a pipelined head
    // may already be here): a head sent a byte at a time gets no more time than a whole one.
    let mut head_until = (!buf.is_empty()).then(|| Instant::now() + limits.head);
    // Blank lines before the head count against its size: they cost reads all the same.
    let mut blank = 0;
    loop {
        blank += skip_blank_lines(buf);
        if let Some(head) = parse_head(buf)? {
            return Ok(Some(head));
        }
        if buf.len() + blank > MAX_HEAD_BYTES {
            return Err(Failure::Refused(Refusal::HeadTooLarge));
        }
        buf.reserve(READ_CHUNK);
        let Some(until) = head_until else {
            if !read_between_requests(io, buf, limits.idle, shutdown).await {
                return Ok(None);
            }
            head_until = Some(Instant::now() + limits.head);
            continue;
        };
        read_by(io, buf, until, "request head not received in time").await?;
    }
}

/// One read of at least a byte, by `until`: `Io` if the connection ended or failed, a 408
/// refusal saying `late` past the deadline. The deadline is checked after the read too: a read
/// that is always ready (a client sending as fast as it can) would otherwise never let the
/// timer fire.
async fn read_by<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    until: Instant,
    late: &str,
) -> Result<(), Failure> {
    match tokio::time::timeout_at(until, io.read_buf(buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Err(Failure::Io),
        Ok(Ok(_)) if Instant::now() <= until => Ok(()),
        Ok(Ok(_)) | Err(_) => Err(Failure::Refused(Refusal::Timeout(late.into()))),
    }
}

/// Waits for the first byte of a next request; `false` when the connection should end instead
/// (closed, failed, idle past its deadline, or shutdown).
async fn read_between_requests<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    idle: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let read = tokio::select! {
        r = tokio::time::timeout(idle, io.read_buf(buf)) => r,
        () = shutdown.cancelled() => return false,
    };
    matches!(read, Ok(Ok(n)) if n > 0)
}

/// Drops the blank lines a request may be preceded by (RFC 9112 §2.2); returns their bytes.
fn skip_blank_lines(buf: &mut BytesMut) -> usize {
    let mut n = 0;
    while buf[n..].starts_with(b"\r\n") {
        n += 2;
    }
    let _ = buf.split_to(n);
    n
}

/// A whole head at the front of `buf` (taken out of it), or `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Failure> {
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
        Version::HTTP_10 => has("keep-alive") && !has("close"),
        _ => !has("close"),
    }
}

/// How a request's body is framed, and whether that framing asks to close after the answer.
struct BodyFraming {
    framing: Framing,
    close_after: bool,
}

/// How the request's body is framed: chunked, a length, or none (RFC 9112 §6.3).
fn request_framing(head: &Head) -> Result<BodyFraming, Failure> {
    let lengths = content_length(&head.headers)?;
    if !head.headers.contains_key(TRANSFER_ENCODING) {
        return Ok(BodyFraming {
            framing: Framing::Length(lengths.unwrap_or(0)),
            close_after: false,
        });
    }
    // RFC 9112 §6.1: HTTP/1.0 has no transfer codings; a 1.0 peer would frame this by length.
    if head.version == Version::HTTP_10 {
        return Err(malformed("transfer-encoding in an HTTP/1.0 request"));
    }
    check_transfer_codings(&head.headers)?;
    Ok(BodyFraming {
        framing: Framing::Chunked(Chunk::Size),
        // §6.1: with both, the length is ignored, and the connection closed after the answer.
        close_after: lengths.is_some(),
    })
}

/// The request's `Content-Length`, if any: bare digits, every line the same value. Checked even
/// when `Transfer-Encoding` overrides it: a malformed one marks a request to refuse either way.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Failure> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(None);
    };
    let parse = |v: &HeaderValue| {
        let digits = v.as_bytes();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse::<u64>().ok()
    };
    let n = parse(first).ok_or_else(|| malformed("invalid content-length"))?;
    if lengths.any(|v| parse(v) != Some(n)) {
        return Err(malformed("conflicting content-length"));
    }
    Ok(Some(n))
}

/// `Transfer-Encoding` must name exactly one coding, `chunked` (case-insensitive). Another
/// coding before it is one this server does not implement (501); `chunked` missing, not last,
/// or twice leaves the body's end unknown (400). Empty list elements are refused too: parsers
/// disagree on them.
fn check_transfer_codings(headers: &HeaderMap) -> Result<(), Failure> {
    let mut codings = Vec::new();
    for value in headers.get_all(TRANSFER_ENCODING) {
        let text = value
            .to_str()
            .map_err(|_| malformed("invalid transfer-encoding"))?;
        codings.extend(text.split(',').map(|c| c.trim_matches([' ', '\t'])));
    }
    let is_chunked = |c: &&str| c.eq_ignore_ascii_case("chunked");
    match codings.as_slice() {
        [only] if is_chunked(only) => Ok(()),
        [before @ .., last]
            if is_chunked(last) && !before.iter().any(|c| c.is_empty() || is_chunked(c)) =>
        {
            Err(Failure::Refused(Refusal::NotImplemented(format!(
                "transfer coding `{}` is not supported; send the body chunked only",
                before.join(", ")
            ))))
        }
        _ => Err(malformed(
            "transfer-encoding must end with `chunked`, once, with no empty element",
        )),
    }
}

async fn read_body<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    head: &Head,
    mut framing: Framing,
    limit: usize,
    limits: &Deadlines,
) -> Result<Bytes, Failure> {
    let start = Instant::now();
    let until = start + limits.body;
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
        write_by(io, b"HTTP/1.1 100 Continue\r\n\r\n", limits.write)
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
                let received = body.len() + buf.len();
                match limits.body_pace.due(start, received) {
                    Some(due) if due < until => {
                        read_by(io, buf, due, "request body arrived too slowly").await?;
                    }
                    _ => read_by(io, buf, until, "request body not received in time").await?,
                }
            }
        }
    }
}

/// The handler's answer, or `None` if the client closed the connection while waiting for it.
/// The wait itself is the handler's to bound (the pipeline's deadlines).
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

/// `write_all` and `flush`, or `TimedOut` if the client does not take the bytes within
/// `limit`. The flush is free on a socket; over TLS it pushes out records the TLS layer kept
/// back when the socket was full, which would otherwise wait for the next write.
async fn write_by<S: AsyncWrite + Unpin>(
    io: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    let write = async {
        io.write_all(bytes).await?;
        io.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took no response bytes within the write deadline",
        )),
    }
}

/// How to answer one request.
#[derive(Debug, Clone, Copy)]
struct Reply {
    keep_alive: bool,
    /// A HEAD request: the head only.
    head_only: bool,
    /// The request's version: an HTTP/1.0 client gets no chunked encoding.
    version: Version,
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimit {
    /// No body (HEAD, 1xx, 204, 304), or a known `content-length`.
    None,
    Length(u64),
    Chunked,
    /// Unknown length to an HTTP/1.0 client: sent as it comes, ended by closing.
    Close,
}

/// The response head's bytes: status line, the response's headers (framing ones replaced by
/// ours) and the framing and connection headers.
fn response_head(
    parts: &http::response::Parts,
    delimit: Delimit,
    reply: Reply,
    keep_alive: bool,
) -> BytesMut {
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
    match delimit {
        Delimit::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Delimit::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Delimit::None | Delimit::Close => {}
    }
    if !keep_alive {
        out.put_slice(b"connection: close\r\n");
    } else if reply.version == Version::HTTP_10 {
        // HTTP/1.0 closes unless told otherwise.
        out.put_slice(b"connection: keep-alive\r\n");
    }
    out.put_slice(b"\r\n");
    out
}

/// Writes `resp`; returns whether the connection may carry another request.
async fn write_response<S: AsyncWrite + Unpin>(
    io: &mut S,
    resp: Response,
    reply: Reply,
    write: Duration,
) -> std::io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let bodiless = reply.head_only
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let delimit = match (body.size_hint().exact(), bodiless) {
        (Some(n), false) => Delimit::Length(n),
        // HEAD announces the length the body would have had.
        (Some(n), true) if reply.head_only => Delimit::Length(n),
        (_, true) => Delimit::None,
        (None, false) if reply.version == Version::HTTP_10 => Delimit::Close,
        (None, false) => Delimit::Chunked,
    };
    let keep_alive = reply.keep_alive && delimit != Delimit::Close;
    let mut out = response_head(&parts, delimit, reply, keep_alive);
    if bodiless {
        write_by(io, &out, write).await?;
        return Ok(keep_alive);
    }
    let chunked = delimit == Delimit::Chunked;
    loop {
        // Whatever is ready now joins what is waiting to go out; only a body that has to wait
        // for its next part makes the server write first.
        let next = match next_frame(&mut body).now_or_never() {
            Some(frame) => frame,
            None => {
                write_by(io, &out, write).await?;
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
                write_by(io, &out, write).await?;
                return Ok(false);
            }
        }
    }
    if chunked {
        out.put_slice(b"0\r\n\r\n");
    }
    write_by(io, &out, write).await?;
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
                    "/big" => Response::new(Body::from(vec![b'x'; 1 << 20])),
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
                Refusal::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
                Refusal::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
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
            serve(server, &handler, &Deadlines::default(), &stop).await;
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
        tokio::spawn(
            async move { serve(server, &Echo::default(), &Deadlines::default(), &stop).await },
        );
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
            async move { serve(server, &Echo::default(), &Deadlines::default(), &stop).await }
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

    /// Short deadlines for the timed cases (which run on tokio's paused clock).
    fn short() -> Deadlines {
        Deadlines {
            head: Duration::from_secs(1),
            body: Duration::from_secs(1),
            body_pace: Pace::default(),
            idle: Duration::from_secs(2),
            write: Duration::from_secs(1),
        }
    }

    /// Serves one connection with `limits` on a duplex pipe of `capacity` bytes.
    fn spawn_conn(
        limits: Deadlines,
        capacity: usize,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(capacity);
        let task = tokio::spawn(async move {
            let stop = CancellationToken::new();
            serve(server, &Echo::default(), &limits, &stop).await;
        });
        (client, task)
    }

    #[tokio::test]
    async fn te_with_content_length_is_read_chunked_and_the_connection_closed_after() {
        let input = b"POST /a HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
                      3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
        let out = exchange(Echo::default(), input, true).await;
        assert!(out.contains("POST /a abc"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert!(
            !out.contains("smuggled"),
            "the request behind it is not answered: {out}"
        );
    }

    #[tokio::test]
    async fn transfer_codings_other_than_one_final_chunked_are_refused() {
        let cases: [(&str, &str); 8] = [
            ("GET / HTTP/1.0\r\ntransfer-encoding: chunked", "400"),
            ("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked", "501"),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked",
                "501",
            ),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip", "400"),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked, chunked",
                "400",
            ),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked,", "400"),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: x",
                "400",
            ),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked;q=1", "400"),
        ];
        for (head, status) in cases {
            let input = format!("{head}\r\n\r\n0\r\n\r\n");
            let out = exchange(Echo::default(), input.as_bytes(), true).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status} ")),
                "{head}: {out}"
            );
            assert!(out.contains("connection: close\r\n"), "{head}: {out}");
        }
        let out = exchange(
            Echo::default(),
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: \tChunked \r\n\r\n1\r\nz\r\n0\r\n\r\n",
            false,
        )
        .await;
        assert!(
            out.contains("POST /c z"),
            "case and whitespace do not matter: {out}"
        );
    }

    #[tokio::test]
    async fn http10_gets_no_chunked_answer_and_a_close() {
        let out = exchange(Echo::default(), b"GET /stream HTTP/1.0\r\n\r\n", true).await;
        assert!(!out.contains("transfer-encoding"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert!(
            out.ends_with("\r\n\r\nabbccc"),
            "raw body until close: {out:?}"
        );
        // Asked to keep alive, with a known length it may, and says so (1.0 closes otherwise).
        let input = b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n";
        let out = exchange(Echo::default(), input, true).await;
        assert!(
            out.contains("connection: keep-alive\r\n") && out.contains("GET /b"),
            "{out}"
        );
        // A stream to a 1.0 client that asked to keep alive still ends by closing.
        let input =
            b"GET /stream HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n";
        let out = exchange(Echo::default(), input, true).await;
        assert!(
            out.contains("connection: close\r\n") && !out.contains("GET /b"),
            "{out}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_trickled_in_gets_its_deadline_from_its_first_byte() {
        let (client, task) = spawn_conn(short(), 1 << 16);
        let (mut rx, mut tx) = tokio::io::split(client);
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tx.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
            // One byte every 300 ms: each read is quick, the head as a whole is not.
            for b in b"x-slow: 0123456789".iter() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if tx.write_all(&[*b]).await.is_err() {
                    break;
                }
            }
        });
        let mut out = Vec::new();
        let _ = rx.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1400),
            "{took:?}"
        );
        task.await.expect("connection ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_trickled_in_gets_one_deadline() {
        let (mut client, task) = spawn_conn(short(), 1 << 16);
        client
            .write_all(b"POST / HTTP/1.1\r\ncontent-length: 20\r\n\r\n")
            .await
            .expect("write");
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if client.write_all(b"x").await.is_err() {
                break;
            }
        }
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408 "));
        task.await.expect("connection ends");
    }

    /// A long whole-body deadline with a rate of 10 bytes/s after one second of grace.
    fn paced() -> Deadlines {
        Deadlines {
            body: Duration::from_secs(600),
            body_pace: Pace {
                grace: Duration::from_secs(1),
                bytes_per_sec: 10,
            },
            ..short()
        }
    }

    /// Sends a 60-byte body in `pieces`, one every `every`; what the connection answered.
    async fn send_paced(pieces: usize, every: Duration) -> String {
        let (mut client, task) = spawn_conn(paced(), 1 << 16);
        client
            .write_all(b"POST /p HTTP/1.1\r\ncontent-length: 60\r\n\r\n")
            .await
            .expect("write");
        let piece = vec![b'x'; 60 / pieces];
        for _ in 0..pieces {
            tokio::time::sleep(every).await;
            if client.write_all(&piece).await.is_err() {
                break;
            }
        }
        let mut out = vec![0u8; 4096];
        let n = client.read(&mut out).await.unwrap_or(0);
        drop(client);
        task.await.expect("connection ends");
        String::from_utf8_lossy(&out[..n]).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_below_the_minimum_rate_is_refused_long_before_its_deadline() {
        // 1 byte/s against a minimum of 10: refused once the grace and the earned time run
        // out, some seconds in, not at the 600 s whole-body deadline.
        let start = Instant::now();
        let out = send_paced(60, Duration::from_secs(1)).await;
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_above_the_minimum_rate_is_served() {
        // 20 bytes/s for three seconds: slower than the 1 s grace alone would allow, but each
        // piece earns more time than it takes.
        let out = send_paced(6, Duration::from_millis(500)).await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_its_deadline() {
        let (mut client, task) = spawn_conn(short(), 1 << 16);
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        client
            .read_to_end(&mut out)
            .await
            .expect("closed by the server");
        assert!(String::from_utf8_lossy(&out).contains("GET /a"));
        let idle = started.elapsed();
        assert!(
            idle >= Duration::from_secs(2) && idle < Duration::from_secs(3),
            "{idle:?}"
        );
        task.await.expect("connection ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_loses_its_connection_at_the_write_deadline() {
        // A pipe of 4 KiB and a 1 MiB answer nobody reads.
        let (mut client, task) = spawn_conn(short(), 4096);
        client
            .write_all(b"GET /big HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the server gave up writing")
            .expect("join");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
