//! The client-connection handler under generated and endless input: no panic, an end to every
//! connection, answers that are well-formed HTTP/1.1, and a bounded amount read (so buffered)
//! from a client that never stops sending.
//!
//! `PROPTEST_CASES` sets the generated cases (256 by default).

use bytes::Bytes;
use futures::future::BoxFuture;
use pdgate_gateway::http1::server::{serve, Deadlines, Handler, Head, Refusal};
use proptest::prelude::*;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Answers every request with its body's length; `/stream` with a body of unknown length.
struct Answer;

const MAX_BODY: usize = 4096;

impl Handler for Answer {
    fn call(&self, head: Head, body: Bytes) -> BoxFuture<'static, axum::response::Response> {
        let text = format!("{} bytes", body.len());
        Box::pin(async move {
            if head.uri.path() == "/stream" {
                let parts = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(text))]);
                return axum::response::Response::new(axum::body::Body::from_stream(parts));
            }
            axum::response::Response::new(axum::body::Body::from(text))
        })
    }

    fn max_body(&self) -> usize {
        MAX_BODY
    }

    fn refuse(&self, why: Refusal) -> axum::response::Response {
        let status = match why {
            Refusal::Malformed(_) => http::StatusCode::BAD_REQUEST,
            Refusal::BodyTooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::HeadTooLarge => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Timeout(_) => http::StatusCode::REQUEST_TIMEOUT,
            Refusal::NotImplemented(_) => http::StatusCode::NOT_IMPLEMENTED,
        };
        let mut r = axum::response::Response::new(axum::body::Body::from("refused"));
        *r.status_mut() = status;
        r
    }
}

/// Serves `input` on one connection; returns what the server wrote (it must end in time).
async fn serve_bytes(input: Vec<u8>) -> Vec<u8> {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move {
        serve(
            server,
            &Answer,
            &Deadlines::default(),
            &CancellationToken::new(),
        )
        .await;
    });
    let mut out = Vec::new();
    let exchange = async {
        let _ = client.write_all(&input).await;
        let _ = client.shutdown().await;
        let _ = client.read_to_end(&mut out).await;
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the connection ended");
    task.await.expect("the handler did not panic");
    out
}

/// Checks `out` is a sequence of whole HTTP/1.1 responses, each framed as it says; returns
/// how many there were.
fn responses(mut out: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(out) {
            Ok(httparse::Status::Complete(len)) => len,
            other => return Err(format!("response {n}: {other:?}")),
        };
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        out = &out[len..];
        if let Some(length) = header("content-length") {
            let length: usize = length.parse().map_err(|_| "content-length")?;
            // An answer to HEAD announces a length and sends no body.
            let head_answer = out.is_empty() || out.starts_with(b"HTTP/1.1 ");
            if !head_answer {
                out = out.get(length..).ok_or("body shorter than announced")?;
            }
        } else if header("transfer-encoding").is_some() {
            let end = out
                .windows(5)
                .position(|w| w == b"0\r\n\r\n")
                .ok_or("chunked body without its end")?;
            out = &out[end + 5..];
        } else {
            // Sent until close: the last response.
            out = &[];
        }
        n += 1;
    }
    Ok(n)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Requests that are nearly right, cut and mutated: the parser's edges, not random noise only.
fn near_request() -> impl Strategy<Value = Vec<u8>> {
    let seeds: &'static [&'static [u8]] = &[
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
        b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nt: v\r\n\r\n",
        b"POST /stream HTTP/1.0\r\ncontent-length: 2\r\n\r\nhi",
        b"GET /stream HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\nx",
        b"\r\n\r\nHEAD / HTTP/1.1\r\nconnection: close\r\n\r\n",
    ];
    (
        proptest::collection::vec(proptest::sample::select(seeds), 1..4),
        proptest::collection::vec(
            (
                any::<prop::sample::Index>(),
                prop_oneof![
                    3 => proptest::sample::select(&b"\r\n :;0aF\t,\x00\x7f\xff"[..]),
                    1 => any::<u8>(),
                ],
                0u8..3,
            ),
            0..4,
        ),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(seeds, edits, cut)| {
            let mut bytes = seeds.concat();
            for (at, byte, op) in edits {
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => {
                        bytes.remove(i);
                    }
                }
                if bytes.is_empty() {
                    bytes.push(byte);
                }
            }
            // Sometimes the connection ends early.
            let keep = cut.index(bytes.len() * 2).min(bytes.len());
            bytes.truncate(keep.max(1));
            bytes
        })
}

proptest! {
    #[test]
    fn any_bytes_end_the_connection_with_well_formed_answers(
        input in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        let out = runtime().block_on(serve_bytes(input));
        prop_assert!(responses(&out).is_ok(), "{:?}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn near_requests_end_the_connection_with_well_formed_answers(input in near_request()) {
        let out = runtime().block_on(serve_bytes(input.clone()));
        let answered = responses(&out);
        prop_assert!(
            answered.is_ok(),
            "{:?} for {:?}", answered, String::from_utf8_lossy(&input)
        );
    }
}

/// A client that sends `prefix` and then `pattern` over and over, forever, and discards what
/// it is sent; counts the bytes the server took.
struct Endless {
    prefix: Vec<u8>,
    pattern: Vec<u8>,
    at: usize,
    taken: Arc<AtomicUsize>,
}

impl AsyncRead for Endless {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while buf.remaining() > 0 {
            let byte = if this.at < this.prefix.len() {
                this.prefix[this.at]
            } else {
                this.pattern[(this.at - this.prefix.len()) % this.pattern.len()]
            };
            buf.put_slice(&[byte]);
            this.at += 1;
        }
        this.taken.store(this.at, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Endless {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A client that never stops sending is refused after a bounded read, whatever it sends: an
/// endless header line, endless header lines, an endless chunk extension, endless trailers,
/// endless chunks, endless blank lines. The client here is always ready, as one sending at
/// line rate is: no deadline may rely on a read ever having to wait. (After a refusal the server
/// drains a bounded amount so its answer is not reset away; that is counted too.)
#[test]
fn an_endless_sender_is_cut_off_after_a_bounded_read() {
    let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "header line",
            b"GET / HTTP/1.1\r\nx: ".to_vec(),
            b"a".to_vec(),
        ),
        (
            "header lines",
            b"GET / HTTP/1.1\r\n".to_vec(),
            b"x: y\r\n".to_vec(),
        ),
        (
            "chunk extension",
            [&chunked[..], b"5;"].concat(),
            b"a".to_vec(),
        ),
        (
            "trailers",
            [&chunked[..], b"0\r\n"].concat(),
            b"x: y\r\n".to_vec(),
        ),
        ("chunks", chunked.clone(), b"1\r\na\r\n".to_vec()),
        ("blank lines", Vec::new(), b"\r\n".to_vec()),
    ];
    let rt = runtime();
    for (what, prefix, pattern) in cases {
        let taken = Arc::new(AtomicUsize::new(0));
        let io = Endless {
            prefix,
            pattern,
            at: 0,
            taken: Arc::clone(&taken),
        };
        let limits = Deadlines {
            head: Duration::from_millis(500),
            ..Deadlines::default()
        };
        let ended = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                serve(io, &Answer, &limits, &CancellationToken::new()),
            )
            .await
        });
        let taken = taken.load(Ordering::SeqCst);
        assert!(ended.is_ok(), "{what}: the connection ended");
        // Head limit, trailer lines, body limit, plus one read and the bounded drain.
        let bound = 64 * 1024 + 64 * 4096 + MAX_BODY + 16 * 1024 + 256 * 1024;
        assert!(taken <= bound, "{what}: {taken} bytes read");
    }
}
