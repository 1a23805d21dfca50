//! Differential test of the hand-written HTTP/1.1 server against hyper's: the same generated
//! byte streams (heads with every Content-Length / Transfer-Encoding combination, chunked bodies
//! with odd sizes, extensions and trailers, pipelined requests, single-byte mutations) are
//! served by both, and they must agree on message boundaries: the requests ours hands to its
//! handler, with their bodies, are exactly the first ones hyper hands to its service. Ours may
//! stop sooner only by refusing (or closing, announced) where hyper is lenient; it must never
//! answer a request hyper did not, nor see a body differently.
//!
//! The case count follows `PROPTEST_CASES` (256 by default); a long run:
//! `PROPTEST_CASES=200000 cargo test -p pdgate-gateway --release --locked --test http1_differential`.

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use pdgate_gateway::http1::server::{serve, Deadlines, Handler, Head, Refusal};
use proptest::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// What a server did with one request: handed it over whole, or (ours) refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Request {
        method: String,
        path: String,
        body: Vec<u8>,
    },
    Refused(String),
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn push(log: &Log, seen: Seen) {
    if let Ok(mut l) = log.lock() {
        l.push(seen);
    }
}

fn taken(log: &Log) -> Vec<Seen> {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Ours: records every request it is handed, answers a short text.
struct Recorder {
    log: Log,
}

impl Handler for Recorder {
    fn call(&self, head: Head, body: Bytes) -> BoxFuture<'static, axum::response::Response> {
        push(
            &self.log,
            Seen::Request {
                method: head.method.to_string(),
                path: head.uri.to_string(),
                body: body.to_vec(),
            },
        );
        Box::pin(async { axum::response::Response::new(axum::body::Body::from("ok")) })
    }

    fn max_body(&self) -> usize {
        1 << 20
    }

    fn refuse(&self, why: Refusal) -> axum::response::Response {
        push(&self.log, Seen::Refused(format!("{why:?}")));
        let mut r = axum::response::Response::new(axum::body::Body::from("refused"));
        *r.status_mut() = http::StatusCode::BAD_REQUEST;
        r
    }
}

/// Writes `input`, half-closes, and reads everything the server writes until it closes.
async fn drive(mut client: tokio::io::DuplexStream, input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let exchange = async {
        // The server may close before reading it all: that is an answer, not an error.
        let _ = client.write_all(input).await;
        let _ = client.shutdown().await;
        let _ = client.read_to_end(&mut out).await;
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .map(|()| out)
}

async fn ours(input: &[u8]) -> (Vec<Seen>, Vec<u8>) {
    let log = Log::default();
    let handler = Recorder {
        log: Arc::clone(&log),
    };
    let (client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move {
        serve(
            server,
            &handler,
            &Deadlines::default(),
            &CancellationToken::new(),
        )
        .await;
    });
    let out = drive(client, input).await.expect("ours finished in time");
    task.abort();
    (taken(&log), out)
}

async fn hypers(input: &[u8]) -> Vec<Seen> {
    let log = Log::default();
    let (client, server) = tokio::io::duplex(1 << 16);
    let service_log = Arc::clone(&log);
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let log = Arc::clone(&service_log);
        async move {
            let (parts, body) = req.into_parts();
            // Only a body read whole to its proper end counts as a request handed over.
            if let Ok(body) = body.collect().await {
                push(
                    &log,
                    Seen::Request {
                        method: parts.method.to_string(),
                        path: parts.uri.to_string(),
                        body: body.to_bytes().to_vec(),
                    },
                );
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(hyper_util::rt::TokioIo::new(server), service);
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    drive(client, input).await.expect("hyper finished in time");
    task.abort();
    taken(&log)
}

/// Ours against hyper on one input; `Err` describes a disagreement.
async fn compare(input: &[u8]) -> Result<(), String> {
    let (ours, out) = ours(input).await;
    let theirs = hypers(input).await;
    let answered: Vec<&Seen> = ours
        .iter()
        .filter(|s| matches!(s, Seen::Request { .. }))
        .collect();
    let show = || {
        format!(
            "input {:?}\nours {ours:?}\nhyper {theirs:?}",
            input.escape_ascii().to_string()
        )
    };
    if answered.len() > theirs.len() || answered.iter().zip(&theirs).any(|(a, b)| *a != b) {
        return Err(format!("ours handed over what hyper did not\n{}", show()));
    }
    if answered.len() < theirs.len() {
        let refused = ours.iter().any(|s| matches!(s, Seen::Refused(_)));
        let out = String::from_utf8_lossy(&out);
        let closed = out
            .rsplit("HTTP/1.1 ")
            .next()
            .is_some_and(|last| last.contains("connection: close\r\n"));
        if !refused && !closed {
            return Err(format!("ours stopped early without refusing\n{}", show()));
        }
    }
    Ok(())
}

// ---- the generator ------------------------------------------------------------------------------

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(items)
}

/// Mostly the well-formed spelling, sometimes an odd one: enough valid requests to compare
/// bodies, enough odd ones to find where the parsers part.
fn mostly(good: &'static str, odd: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop_oneof![6 => Just(good), 1 => pick(odd)]
}

const TE_VALUES: &[&str] = &[
    "chunked",
    "Chunked",
    "CHUNKED",
    " chunked",
    "chunked ",
    "\tchunked",
    "gzip, chunked",
    "chunked, gzip",
    "chunked, chunked",
    "chunked,",
    ",chunked",
    "gzip",
    "identity",
    "chunked;q=1",
    "",
];

const CL_JUNK: &[&str] = &[
    "+5",
    "-1",
    "05",
    "5,5",
    "5, 6",
    "abc",
    "",
    "18446744073709551616",
    "0x5",
    "5 5",
];

#[derive(Debug, Clone)]
enum Header {
    /// The body's true length (or off by `delta`).
    Length(i8),
    LengthJunk(&'static str),
    Te(&'static str),
    Connection(&'static str),
    Other(&'static str),
}

fn header() -> impl Strategy<Value = Header> {
    prop_oneof![
        6 => Just(Header::Length(0)),
        1 => (-1i8..=1).prop_map(Header::Length),
        1 => pick(CL_JUNK).prop_map(Header::LengthJunk),
        5 => mostly("chunked", TE_VALUES).prop_map(Header::Te),
        1 => pick(&["close", "keep-alive", "Close", "upgrade"][..]).prop_map(Header::Connection),
        2 => pick(&["host: x", "x-a: b", "x-empty:", "accept: */*"][..]).prop_map(Header::Other),
    ]
}

/// One chunk of a chunked body, spelt oddly or not.
#[derive(Debug, Clone)]
struct ChunkSpec {
    data: Vec<u8>,
    size: &'static str,
    ext: &'static str,
    end: &'static str,
}

const SIZE_FORMS: &[&str] = &[
    "{x}", "{x}", "{x}", "{X}", "00{x}", "+{x}", " {x}", "{x} ", "{x}\t", "{wrong}", "",
];
const EXTS: &[&str] = &[
    "",
    "",
    "",
    ";a",
    ";a=b",
    ";a=\"b c\"",
    " ;a",
    ";a\nb",
    "; a = b",
    ";a\rb",
];
const DATA_ENDS: &[&str] = &["\r\n", "\r\n", "\r\n", "\n", "", "xx\r\n"];

fn chunk() -> impl Strategy<Value = ChunkSpec> {
    (
        proptest::collection::vec(pick(&b"abcxyz"[..]), 1..12),
        mostly("{x}", SIZE_FORMS),
        mostly("", EXTS),
        mostly("\r\n", DATA_ENDS),
    )
        .prop_map(|(data, size, ext, end)| ChunkSpec {
            data,
            size,
            ext,
            end,
        })
}

fn size_line(c: &ChunkSpec) -> String {
    let n = c.data.len();
    c.size
        .replace("{x}", &format!("{n:x}"))
        .replace("{X}", &format!("{n:X}"))
        .replace("{wrong}", &format!("{:x}", n + 1))
}

#[derive(Debug, Clone)]
enum BodySpec {
    None,
    Raw(Vec<u8>),
    Chunked {
        chunks: Vec<ChunkSpec>,
        last: &'static str,
        trailers: &'static str,
        end: &'static str,
    },
}

fn body() -> impl Strategy<Value = BodySpec> {
    prop_oneof![
        1 => Just(BodySpec::None),
        2 => proptest::collection::vec(pick(&b"abcxyz"[..]), 0..24).prop_map(BodySpec::Raw),
        4 => (
            proptest::collection::vec(chunk(), 0..4),
            mostly("0", &["00", "0;e", "0 ", ""]),
            mostly("", &["t: v\r\n", "bad line\r\n", "a:b\r\nc: d\r\n", "x y: z\r\n"]),
            mostly("\r\n", &["\n", ""]),
        )
            .prop_map(|(chunks, last, trailers, end)| BodySpec::Chunked {
                chunks,
                last,
                trailers,
                end,
            }),
    ]
}

fn body_bytes(b: &BodySpec) -> Vec<u8> {
    match b {
        BodySpec::None => Vec::new(),
        BodySpec::Raw(raw) => raw.clone(),
        BodySpec::Chunked {
            chunks,
            last,
            trailers,
            end,
        } => {
            let mut out = Vec::new();
            for c in chunks {
                out.extend_from_slice(size_line(c).as_bytes());
                out.extend_from_slice(c.ext.as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&c.data);
                out.extend_from_slice(c.end.as_bytes());
            }
            if !last.is_empty() {
                out.extend_from_slice(last.as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(trailers.as_bytes());
                out.extend_from_slice(end.as_bytes());
            }
            out
        }
    }
}

/// How a request frames its body: by length, chunked (with a stray length or not), not at all,
/// or any mix of framing headers.
#[derive(Debug, Clone)]
enum Shape {
    Length(i8),
    Chunked {
        te: &'static str,
        length_too: bool,
        length_first: bool,
    },
    Bare,
    Mixed(Vec<Header>),
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        3 => prop_oneof![6 => Just(0i8), 1 => -1i8..=1].prop_map(Shape::Length),
        4 => (mostly("chunked", TE_VALUES), any::<bool>(), any::<bool>()).prop_map(
            |(te, length_too, length_first)| Shape::Chunked { te, length_too, length_first }
        ),
        1 => Just(Shape::Bare),
        2 => proptest::collection::vec(header(), 1..4).prop_map(Shape::Mixed),
    ]
}

fn extra_header() -> impl Strategy<Value = Header> {
    prop_oneof![
        1 => pick(&["close", "keep-alive", "Close", "upgrade"][..]).prop_map(Header::Connection),
        2 => pick(&["host: x", "x-a: b", "x-empty:", "accept: */*"][..]).prop_map(Header::Other),
    ]
}

fn header_line(h: &Header, payload_len: usize) -> String {
    match h {
        Header::Length(delta) => {
            let n = (payload_len as i64 + i64::from(*delta)).max(0);
            format!("content-length: {n}")
        }
        Header::LengthJunk(v) => format!("content-length: {v}"),
        Header::Te(v) => format!("transfer-encoding: {v}"),
        Header::Connection(v) => format!("connection: {v}"),
        Header::Other(line) => line.to_string(),
    }
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    (
        pick(&["GET", "POST", "PUT"][..]),
        pick(&["/", "/a", "/v1/completions?x=1"][..]),
        prop_oneof![5 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0")],
        shape(),
        proptest::collection::vec(extra_header(), 0..2),
        body(),
    )
        .prop_map(|(method, path, version, shape, extra, body)| {
            let (mut headers, payload) = match shape {
                Shape::Length(delta) => (vec![Header::Length(delta)], body_bytes(&body)),
                Shape::Chunked {
                    te,
                    length_too,
                    length_first,
                } => {
                    let mut h = vec![Header::Te(te)];
                    if length_too {
                        h.insert(usize::from(!length_first), Header::Length(0));
                    }
                    let chunked = match body {
                        BodySpec::Chunked { .. } => body,
                        _ => BodySpec::Chunked {
                            chunks: Vec::new(),
                            last: "0",
                            trailers: "",
                            end: "\r\n",
                        },
                    };
                    (h, body_bytes(&chunked))
                }
                Shape::Bare => (Vec::new(), Vec::new()),
                Shape::Mixed(h) => (h, body_bytes(&body)),
            };
            headers.extend(extra);
            let mut out = format!("{method} {path} {version}\r\n").into_bytes();
            for h in &headers {
                out.extend_from_slice(header_line(h, payload.len()).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&payload);
            out
        })
}

/// One connection's bytes: pipelined requests, maybe one byte changed.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(request(), 1..4),
        proptest::option::weighted(
            0.15,
            (
                any::<prop::sample::Index>(),
                pick(&b"\r\n \t0a:;,\x00\x7f"[..]),
                any::<bool>(),
            ),
        ),
    )
        .prop_map(|(requests, mutation)| {
            let mut bytes = requests.concat();
            if let Some((at, byte, insert)) = mutation {
                let i = at.index(bytes.len());
                if insert {
                    bytes.insert(i, byte);
                } else {
                    bytes[i] = byte;
                }
            }
            bytes
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #[test]
    fn ours_agrees_with_hyper_on_message_boundaries_or_refuses(input in stream()) {
        let verdict = runtime().block_on(compare(&input));
        prop_assert!(verdict.is_ok(), "{}", verdict.err().unwrap_or_default());
    }
}

/// The cases the review found, and the framings both must serve alike, checked by name.
#[test]
fn known_cases_agree() {
    let rt = runtime();
    let cases: [&[u8]; 8] = [
        b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\n\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\nt: v\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
    ];
    for input in cases {
        if let Err(e) = rt.block_on(compare(input)) {
            panic!("{e}");
        }
    }
    // And ours does answer the well-formed ones as hyper does.
    let (seen, _) = rt.block_on(ours(cases[5]));
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// The generator reaches both sides of the comparison: streams both servers serve alike, and
/// streams ours refuses where hyper is lenient. (Run with `--nocapture` to see the counts.)
#[test]
fn the_generator_exercises_agreement_and_refusal() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let rt = runtime();
    let mut runner = TestRunner::deterministic();
    let (mut same, mut stricter, mut both_refuse, mut requests) = (0, 0, 0, 0);
    let total = 2_000;
    for _ in 0..total {
        let input = stream().new_tree(&mut runner).expect("a value").current();
        let (seen, _) = rt.block_on(ours(&input));
        let theirs = rt.block_on(hypers(&input));
        let answered = seen
            .iter()
            .filter(|s| matches!(s, Seen::Request { .. }))
            .count();
        requests += answered;
        match (answered == theirs.len(), theirs.is_empty()) {
            (true, true) => both_refuse += 1,
            (true, false) => same += 1,
            (false, _) => stricter += 1,
        }
    }
    eprintln!(
        "{total} streams: {same} served alike ({requests} requests handed over by ours), \
         {stricter} refused sooner by ours, {both_refuse} with no request served by either"
    );
    assert!(
        same > total / 4 && stricter > total / 50,
        "coverage too thin"
    );
}
