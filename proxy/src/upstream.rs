//! The HTTP/1.1 client the gateway speaks to engines with: hyper's pooled client and little else.
//!
//! The gateway sends two or three small requests per client request, so the per-request cost of
//! a general-purpose client (URL parsing with IDNA, redirect and retry layers, boxed bodies) was
//! a tenth of its CPU. This keeps the shape of the calls (`post(url).header(..).json(..)
//! .timeout(..).send()`) and drops what an engine hop never needs: no redirects, no retries (a
//! retry is the pipeline's decision, on another instance), no compression, no TLS.

use bytes::Bytes;
use futures::Stream;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Why an upstream call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The URL or a header could not be built.
    Request,
    /// Connecting, sending or reading failed.
    Transport,
    /// The request's deadline passed.
    Timeout,
    /// The body was not the JSON expected.
    Decode,
}

#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
}

impl Error {
    fn new(kind: Kind, message: impl std::fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// `max_idle_per_host`: kept-alive connections per engine; more in flight at once are closed
    /// after use instead of pooled.
    pub fn new(connect_timeout: Duration, pool_idle: Duration, max_idle_per_host: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(pool_idle)
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { inner }
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
            .map_err(|e| Error::new(Kind::Request, format!("bad upstream URL `{url}`: {e}")));
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
    uri: Result<Uri, Error>,
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
        let uri = self.uri?;
        let mut req = http::Request::new(Full::new(self.body));
        *req.method_mut() = self.method;
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let sent = self.client.inner.request(req);
        let resp = match deadline {
            Some(at) => tokio::time::timeout_at(at, sent)
                .await
                .map_err(|_| Error::new(Kind::Timeout, "timed out waiting for the response"))?,
            None => sent.await,
        };
        let resp = resp.map_err(|e| Error::new(Kind::Transport, transport_message(&e)))?;
        Ok(Response {
            inner: resp,
            deadline,
        })
    }
}

/// hyper's top-level message is generic ("client error (Connect)"); the cause says what.
fn transport_message(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

pub struct Response {
    inner: http::Response<Incoming>,
    deadline: Option<Instant>,
}

impl Response {
    pub fn status(&self) -> StatusCode {
        self.inner.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.inner.headers()
    }

    /// The body as it arrives, frame by frame, bounded by the request's deadline.
    pub fn bytes_stream(self) -> BodyStream {
        BodyStream {
            body: self.inner.into_body(),
            deadline: self
                .deadline
                .map(|at| Box::pin(tokio::time::sleep_until(at))),
        }
    }

    pub async fn bytes(self) -> Result<Bytes, Error> {
        let mut out = bytes::BytesMut::new();
        let mut stream = self.bytes_stream();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            out.extend_from_slice(&chunk?);
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

/// A response body as a stream of data frames (trailers are skipped).
pub struct BodyStream {
    body: Incoming,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Stream for BodyStream {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(data))),
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(Error::new(Kind::Transport, e))))
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            if let Some(d) = self.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    self.deadline = None;
                    let e = Error::new(Kind::Timeout, "timed out reading the response body");
                    return Poll::Ready(Some(Err(e)));
                }
            }
            return Poll::Pending;
        }
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
}
