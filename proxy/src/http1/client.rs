//! The HTTP/1.1 client the gateway speaks to engines with.
//!
//! The gateway sends two or three small requests per client request. Through a general-purpose
//! pooled client each of them crossed to a connection task and back over channels, and that
//! machinery (pool checkout, dispatch channels, the connection task's polls, a second wake-up per
//! response) was about a sixth of the gateway's CPU under load. Here the request's own task owns
//! the connection for the whole exchange: it takes a kept-alive connection from a small pool,
//! writes the request with one write, parses the response head with `httparse`, and reads the
//! body itself; the connection goes back to the pool when its body has been read to the end.
//! What an engine hop never needs is left out: no redirects, no retries across instances (a
//! retry is the pipeline's decision), no compression, no HTTP/2. `https://` engines are reached
//! over TLS with the connector the client was given (`[upstream.tls]`), and refused without one.

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::uri::Authority;
use http::{HeaderMap, Method, StatusCode, Uri};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::error::{Error, Kind};
use super::framing::{Chunk, Framing, Step};
use super::pool::{Conn, Pool};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response header lines accepted.
const MAX_HEADERS: usize = 64;

/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    pool: Arc<Pool>,
    connect_timeout: Duration,
    /// For `https://` engines; without it they are refused.
    tls: Option<TlsConnector>,
}

impl Client {
    /// `pool_idle`: how long an unused connection is kept; `max_idle_per_host`: kept-alive
    /// connections per engine (more in flight at once are closed after use instead of pooled).
    pub fn new(connect_timeout: Duration, pool_idle: Duration, max_idle_per_host: usize) -> Self {
        Self {
            pool: Arc::new(Pool::new(pool_idle, max_idle_per_host)),
            connect_timeout,
            tls: None,
        }
    }

    /// Reaches `https://` engines with `tls` (their certificates checked against its roots).
    pub fn with_tls(mut self, tls: TlsConnector) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn get(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::GET, url.as_ref())
    }

    pub fn post(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::POST, url.as_ref())
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let uri = url
            .parse::<Uri>()
            .map_err(|e| Error::new(Kind::Request, format!("bad upstream URL `{url}`: {e}")))
            .and_then(|uri| match (uri.scheme_str(), uri.authority().cloned()) {
                (Some("http"), Some(authority)) => Ok((uri, authority, false)),
                (Some("https"), Some(authority)) => Ok((uri, authority, true)),
                _ => Err(Error::new(
                    Kind::Request,
                    format!(
                        "bad upstream URL `{url}`: engines are reached over http:// or \
                         https://host:port"
                    ),
                )),
            });
        RequestBuilder {
            client: self.clone(),
            method,
            uri,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            timeout: None,
            error: None,
        }
    }
}

pub struct RequestBuilder {
    client: Client,
    method: Method,
    /// The URL, its `host:port` and whether it is `https`, which together key the pool.
    uri: Result<(Uri, Authority, bool), Error>,
    headers: HeaderMap,
    body: Bytes,
    timeout: Option<Duration>,
    error: Option<Error>,
}

impl RequestBuilder {
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        V: TryInto<HeaderValue>,
    {
        match (name.try_into(), value.try_into()) {
            (Ok(k), Ok(v)) => {
                self.headers.insert(k, v);
            }
            _ => {
                self.error
                    .get_or_insert_with(|| Error::new(Kind::Request, "invalid header"));
            }
        }
        self
    }

    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(v) => {
                self.body = Bytes::from(v);
                self.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Err(e) => {
                self.error
                    .get_or_insert_with(|| Error::new(Kind::Request, e));
            }
        }
        self
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// A deadline for the whole exchange, the response body included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub async fn send(self) -> Result<Response, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let (uri, authority, tls) = self.uri?;
        let tls = match (tls, &self.client.tls) {
            (false, _) => None,
            (true, Some(connector)) => Some(connector),
            (true, None) => return Err(Error::new(Kind::Request, crate::tls::upstream::NO_CA)),
        };
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let request = encode(&self.method, &uri, &authority, &self.headers, &self.body);
        let exchange = exchange(
            &self.client,
            authority.as_str(),
            tls,
            &request,
            self.method == Method::HEAD,
        );
        let (conn, head) = match deadline {
            Some(at) => tokio::time::timeout_at(at, exchange)
                .await
                .map_err(|_| Error::new(Kind::Timeout, "timed out waiting for the response"))?,
            None => exchange.await,
        }?;
        let body = BodyReader {
            conn: Some(conn),
            framing: head.framing,
            keep_alive: head.keep_alive,
            pool: self.client.pool.clone(),
            key: authority,
            deadline,
        };
        Ok(Response {
            status: head.status,
            headers: head.headers,
            body,
        })
    }
}

/// The request's bytes, head and body, for one write.
fn encode(
    method: &Method,
    uri: &Uri,
    authority: &Authority,
    headers: &HeaderMap,
    body: &[u8],
) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let host = authority.as_str();
    let mut out = Vec::with_capacity(128 + headers.len() * 48 + body.len());
    for part in [
        method.as_str(),
        " ",
        path,
        " HTTP/1.1\r\nhost: ",
        host,
        "\r\n",
    ] {
        out.extend_from_slice(part.as_bytes());
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || !matches!(*method, Method::GET | Method::HEAD) {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// How one try of the exchange failed.
enum Failed {
    /// The connection was closed or reset before any of the response arrived: a pooled one may
    /// have been closed by the engine while idle, so the request is sent once more on a new one.
    BeforeResponse(std::io::Error),
    Other(Error),
}

async fn exchange(
    client: &Client,
    key: &str,
    tls: Option<&TlsConnector>,
    request: &[u8],
    head_only: bool,
) -> Result<(Conn, Head), Error> {
    if let Some(mut conn) = client.pool.take(key, tls.is_some()) {
        match round_trip(&mut conn, request, head_only).await {
            Ok(head) => return Ok((conn, head)),
            Err(Failed::Other(e)) => return Err(e),
            Err(Failed::BeforeResponse(_)) => {}
        }
    }
    let mut conn = Conn::connect(key, tls, client.connect_timeout).await?;
    match round_trip(&mut conn, request, head_only).await {
        Ok(head) => Ok((conn, head)),
        Err(Failed::Other(e)) => Err(e),
        Err(Failed::BeforeResponse(e)) => Err(Error::transport(format!(
            "connection to {key} closed before a response: {e}"
        ))),
    }
}

async fn round_trip(conn: &mut Conn, request: &[u8], head_only: bool) -> Result<Head, Failed> {
    conn.write_all(request)
        .await
        .map_err(Failed::BeforeResponse)?;
    let mut got_any = false;
    loop {
        // 1xx heads (100 Continue, 103 Early Hints) precede the real one and are skipped.
        match parse_head(&mut conn.buf, head_only).map_err(Failed::Other)? {
            Some(head) if head.status.is_informational() => continue,
            Some(head) => return Ok(head),
            None => {}
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(Failed::Other(Error::transport("response head too large")));
        }
        match conn.read_more().await {
            Ok(0) if !got_any => {
                return Err(Failed::BeforeResponse(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(0) => {
                return Err(Failed::Other(Error::transport(
                    "connection closed inside the response head",
                )))
            }
            Ok(_) => got_any = true,
            Err(e) if !got_any && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(Failed::BeforeResponse(e))
            }
            Err(e) => return Err(Failed::Other(Error::transport(e))),
        }
    }
}

/// Parses a complete head off the front of `buf`, or `None` if it is not all there yet.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Head>, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::transport(format!("bad response head: {e}"))),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Error::transport("bad response status"))?;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut chunked = false;
    let mut length = None;
    let mut close = parsed.version != Some(1);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::transport("bad response header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Error::transport("bad response header value"))?;
        if name == http::header::TRANSFER_ENCODING {
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == http::header::CONTENT_LENGTH {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| Error::transport("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::transport("conflicting content-length headers"));
            }
            length = Some(n);
        } else if name == http::header::CONNECTION {
            let v = value.to_str().unwrap_or_default();
            if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                close = true;
            }
        }
        headers.append(name, value);
    }
    bytes::Buf::advance(buf, len);
    let framing = if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunk::Size)
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive: !close,
    }))
}

pub struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: BodyReader,
}

impl Response {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body as it arrives, piece by piece, bounded by the request's deadline.
    pub fn bytes_stream(self) -> BodyStream {
        BodyStream {
            inner: Box::pin(futures::stream::unfold(self.body, |mut body| async move {
                body.next().await.map(|piece| (piece, body))
            })),
        }
    }

    pub async fn bytes(mut self) -> Result<Bytes, Error> {
        let mut out = BytesMut::new();
        while let Some(piece) = self.body.next().await {
            let piece = piece?;
            if out.is_empty() && self.body.conn.is_none() {
                // The whole body came in one piece: no copy.
                return Ok(piece);
            }
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    pub async fn json<T: DeserializeOwned>(self) -> Result<T, Error> {
        let bytes = self.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::new(Kind::Decode, e))
    }

    pub async fn text(self) -> Result<String, Error> {
        let bytes = self.bytes().await?;
        String::from_utf8(bytes.to_vec()).map_err(|e| Error::new(Kind::Decode, e))
    }
}

/// Reads a response body off its connection, and gives the connection back to the pool once
/// the body has been read to its end. Dropped early, it closes the connection, which is how
/// the engine learns the gateway no longer wants the answer.
struct BodyReader {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
    key: Authority,
    deadline: Option<Instant>,
}

impl BodyReader {
    async fn next(&mut self) -> Option<Result<Bytes, Error>> {
        loop {
            let conn = self.conn.as_mut()?;
            match self.framing.step(&mut conn.buf) {
                Err(e) => {
                    self.conn = None;
                    return Some(Err(Error::transport(e)));
                }
                Ok(Step::Data(piece)) => {
                    // A known length read to its end frees the connection now, not on the
                    // next poll, which a caller that stops at the last byte never makes.
                    if self.framing == Framing::Length(0) {
                        self.release();
                    }
                    return Some(Ok(piece));
                }
                Ok(Step::End) => {
                    self.release();
                    return None;
                }
                Ok(Step::NeedMore) => {}
            }
            let read = conn.read_more();
            let read = match self.deadline {
                Some(at) => match tokio::time::timeout_at(at, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.conn = None;
                        let e = Error::new(Kind::Timeout, "timed out reading the response body");
                        return Some(Err(e));
                    }
                },
                None => read.await,
            };
            match read {
                Ok(0) => {
                    self.conn = None;
                    return self
                        .framing
                        .at_eof()
                        .err()
                        .map(|e| Err(Error::transport(e)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Some(Err(Error::transport(e)));
                }
            }
        }
    }

    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Bytes past the body mean the engine broke framing: never reuse that connection.
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.put(self.key.as_str(), conn);
            }
        }
    }
}

/// A response body as a stream of pieces.
pub struct BodyStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>,
}

impl Stream for BodyStream {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_url_and_unreachable_are_errors_not_panics() {
        let c = Client::new(Duration::from_millis(200), Duration::from_secs(1), 8);
        let e = c.get("not a url").send().await.err().expect("error");
        assert!(e.to_string().contains("bad upstream URL"));
        // Port 9 (discard) on loopback: nothing listens there.
        let e = c
            .get("http://127.0.0.1:9/x")
            .send()
            .await
            .err()
            .expect("error");
        assert!(!e.is_timeout(), "{e}");
    }

    #[tokio::test]
    async fn deadline_covers_a_stalled_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            // A head promising 10 bytes, then 2 of them, then silence.
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let c = Client::new(Duration::from_millis(200), Duration::from_secs(1), 8);
        let resp = c
            .post(format!("http://{addr}/"))
            .json(&serde_json::json!({"a": 1}))
            .timeout(Duration::from_millis(150))
            .send()
            .await
            .expect("head arrives");
        assert_eq!(resp.status(), StatusCode::OK);
        let e = resp.bytes().await.expect_err("deadline");
        assert!(e.is_timeout(), "{e}");
    }

    /// A raw HTTP/1.1 server: answers every request on a connection with `reply(n)` (n counts
    /// requests across connections) and closes the connection after it if `close_after` says
    /// so. Returns its address and the number of connections it accepted so far.
    async fn raw_server(
        reply: fn(usize) -> Vec<u8>,
        close_after: fn(usize) -> bool,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let served = served.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: its head, then content-length bytes of body.
                        let mut chunk = [0u8; 4096];
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + len {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + len);
                        let n = served.fetch_add(1, Ordering::SeqCst);
                        if s.write_all(&reply(n)).await.is_err() {
                            return;
                        }
                        if close_after(n) {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn ok_json(_: usize) -> Vec<u8> {
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
            .to_vec()
    }

    fn client() -> Client {
        Client::new(Duration::from_millis(500), Duration::from_secs(30), 8)
    }

    fn accepted(n: &Arc<std::sync::atomic::AtomicUsize>) -> usize {
        n.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn kept_alive_connection_serves_the_next_requests() {
        let (addr, conns) = raw_server(ok_json, |_| false).await;
        let c = client();
        for i in 0..5 {
            let v: serde_json::Value = c
                .post(format!("http://{addr}/v1/completions"))
                .json(&serde_json::json!({ "i": i }))
                .send()
                .await
                .expect("sent")
                .json()
                .await
                .expect("json");
            assert_eq!(v["ok"], true);
        }
        assert_eq!(accepted(&conns), 1, "one connection for five requests");
    }

    #[tokio::test]
    async fn chunked_body_streams_in_pieces_then_the_connection_is_reused() {
        fn chunked(_: usize) -> Vec<u8> {
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
              b\r\ndata: one\n\n\r\nb\r\ndata: two\n\n\r\n0\r\n\r\n"
                .to_vec()
        }
        let (addr, conns) = raw_server(chunked, |_| false).await;
        let c = client();
        for _ in 0..2 {
            let resp = c
                .post(format!("http://{addr}/"))
                .send()
                .await
                .expect("sent");
            assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
            let pieces: Vec<Bytes> = futures::StreamExt::collect::<Vec<_>>(resp.bytes_stream())
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("body");
            assert_eq!(pieces.concat(), b"data: one\n\ndata: two\n\n");
        }
        assert_eq!(accepted(&conns), 1);
    }

    #[tokio::test]
    async fn a_connection_the_engine_closed_is_replaced_without_failing_the_request() {
        // The engine closes every connection right after answering, without saying so.
        let (addr, conns) = raw_server(ok_json, |_| true).await;
        let c = client();
        for _ in 0..3 {
            let resp = c.get(format!("http://{addr}/health")).send().await;
            assert_eq!(resp.expect("answered").status(), StatusCode::OK);
        }
        assert_eq!(accepted(&conns), 3);
    }

    #[tokio::test]
    async fn connection_close_and_unread_bodies_are_not_pooled() {
        fn close(_: usize) -> Vec<u8> {
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok".to_vec()
        }
        let (addr, conns) = raw_server(close, |_| true).await;
        let c = client();
        for _ in 0..2 {
            let body = c.get(format!("http://{addr}/")).send().await.expect("sent");
            assert_eq!(body.bytes().await.expect("body"), "ok");
        }
        assert_eq!(accepted(&conns), 2);
        // A response dropped before its body was read gives its connection up.
        let (addr, conns) = raw_server(ok_json, |_| false).await;
        drop(c.get(format!("http://{addr}/")).send().await.expect("sent"));
        let v = c.get(format!("http://{addr}/")).send().await.expect("sent");
        assert_eq!(v.bytes().await.expect("body"), "{\"ok\":true}");
        assert_eq!(accepted(&conns), 2);
    }

    #[tokio::test]
    async fn malformed_responses_are_errors_not_panics() {
        fn garbage(n: usize) -> Vec<u8> {
            match n {
                0 => b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
                1 => b"HTTP/1.1 200 OK\r\ncontent-length: nine\r\n\r\n".to_vec(),
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort".to_vec(),
            }
        }
        let (addr, _) = raw_server(garbage, |_| true).await;
        let c = client();
        let url = format!("http://{addr}/");
        let fails = |url: String| {
            let request = c.get(url);
            async move { request.send().await.err().expect("an error") }
        };
        let e = fails(url.clone()).await;
        assert!(e.to_string().contains("bad response head"), "{e}");
        let e = fails(url.clone()).await;
        assert!(e.to_string().contains("content-length"), "{e}");
        let resp = c.get(&url).send().await.expect("head is fine");
        let e = resp.bytes().await.expect_err("truncated body");
        assert!(e.to_string().contains("still to come"), "{e}");
        let e = fails("https://127.0.0.1:1/".into()).await;
        assert!(e.to_string().contains("ca_file is not set"), "{e}");
        let e = fails("ftp://127.0.0.1:1/".into()).await;
        assert!(e.to_string().contains("http:// or https://"), "{e}");
    }
}
