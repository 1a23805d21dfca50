//! The gateway's front door against hostile or broken clients, over real sockets: what a
//! security review reproduced against `pdgate up` (issue 14), one test per finding. Smuggling
//! cases go as raw bytes over a `TcpStream`; timed cases run with their deadlines set small.
//!
//! - a client-chosen request id never trips an engine's breaker (row 3);
//! - `Transfer-Encoding` with `Content-Length` is read chunked and the connection closed, so a
//!   request smuggled behind the body is not answered (row 4);
//! - `Transfer-Encoding` on HTTP/1.0 is refused (row 5);
//! - chunk sizes are bare hex digits (row 6);
//! - head, body, idle, write and decode-stall deadlines, and the connection cap (row 7);
//! - HTTP/1.0 is answered without chunked encoding (row 10).

mod support;

use pdgate_gateway::config::{Config as GatewayConfig, Protocol, WorkerConfig};
use pdgate_gateway::Gateway;
use pdgate_scheduler::Role;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a raw exchange waits for the gateway to close before giving up on it.
const READ_LIMIT: Duration = Duration::from_secs(10);

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// A small completions body, as bytes.
fn completion_bytes(stream: bool) -> Vec<u8> {
    let body = json!({"model": "pdgate-sim-8b", "prompt": "front door", "max_tokens": 3, "stream": stream});
    serde_json::to_vec(&body).expect("json")
}

/// Everything the gateway writes on one connection until it closes (or `READ_LIMIT`), and
/// whether it closed.
async fn read_until_close(tcp: &mut TcpStream) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + READ_LIMIT;
    let closed = loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Sends `bytes` on a fresh connection; returns what came back until the gateway closed.
async fn raw(url: &str, bytes: &[u8]) -> (String, bool) {
    let mut tcp = TcpStream::connect(addr_of(url)).await.expect("connect");
    tcp.write_all(bytes).await.expect("write");
    read_until_close(&mut tcp).await
}

fn statuses(out: &str) -> Vec<&str> {
    out.match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect()
}

/// `body` as one chunk whose size line is `size_line`, then the last chunk.
fn one_chunk(size_line: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = size_line.to_vec();
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n0\r\n\r\n");
    out
}

// ---- row 3: client input never trips an engine's breaker --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_client_request_id_is_replaced_and_never_opens_a_breaker() {
    // Native PD: the prefill's KV landing notification carries the request id; a 5,000-byte
    // id made it exceed the transfer engine's 4,096-byte limit (502, counted against the
    // prefill), and five such requests opened both prefill breakers.
    let fleet = fleet(config(2, 1, 0.0)).await;
    let url = fleet.url();
    let huge = "a".repeat(5_000);
    for i in 0..8 {
        let resp = client()
            .post(format!("{url}/v1/completions"))
            .header("x-request-id", &huge)
            .json(&completion(&format!("long id {i}"), 2))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200, "request {i}");
        let echoed = resp.headers()["x-request-id"].to_str().expect("ascii");
        assert_eq!(echoed.len(), 36, "a minted id replaces it: {echoed}");
    }
    for w in admin_workers(&url).await {
        assert_eq!(w["breaker"], "closed", "{w}");
    }
    // The longest id honoured still goes through as it came.
    let longest = "b".repeat(128);
    let resp = client()
        .post(format!("{url}/v1/completions"))
        .header("x-request-id", &longest)
        .json(&completion("longest id", 2))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], longest.as_str());
    fleet.stop().await;
}

// ---- rows 4, 5, 6: framing ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_with_content_length_closes_after_the_answer_so_nothing_smuggled_is_answered() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let body = completion_bytes(false);
    let mut input =
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                      content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    input.extend_from_slice(&one_chunk(format!("{:x}", body.len()).as_bytes(), &body));
    // What a front end honouring content-length would see as the next request.
    input.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n");
    let (out, closed) = raw(&fleet.url(), &input).await;
    assert_eq!(
        statuses(&out),
        ["200"],
        "one answer, the chunked body's: {out}"
    );
    assert!(out.contains("\"text_completion\""), "{out}");
    assert!(
        out.contains("connection: close\r\n"),
        "announced close: {out}"
    );
    assert!(closed, "the gateway closed the connection");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_on_http10_is_refused_and_closed() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let body = completion_bytes(false);
    let mut input = b"POST /v1/completions HTTP/1.0\r\ncontent-type: application/json\r\n\
                      transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
        .to_vec();
    input.extend_from_slice(&one_chunk(format!("{:x}", body.len()).as_bytes(), &body));
    let (out, closed) = raw(&fleet.url(), &input).await;
    assert_eq!(statuses(&out), ["400"], "{out}");
    assert!(out.contains("connection: close\r\n") && closed, "{out}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_sizes_are_bare_hex_digits() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let body = completion_bytes(false);
    let hex = format!("{:x}", body.len());
    let lenient: [Vec<u8>; 4] = [
        format!("+{hex}").into_bytes(),
        format!(" {hex}").into_bytes(),
        [hex.as_bytes(), "\u{a0}".as_bytes()].concat(),
        format!("{hex}\n").into_bytes(),
    ];
    for size in lenient {
        let mut input = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n\
                          content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
        input.extend_from_slice(&one_chunk(&size, &body));
        let (out, closed) = raw(&fleet.url(), &input).await;
        let shown = size.escape_ascii().to_string();
        assert_eq!(statuses(&out), ["400"], "size line {shown:?}: {out}");
        assert!(out.contains("bad chunk size") && closed, "{shown:?}: {out}");
    }
    // The same body with a bare size is served.
    let mut input = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
                      content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        .to_vec();
    input.extend_from_slice(&one_chunk(hex.to_uppercase().as_bytes(), &body));
    let (out, _) = raw(&fleet.url(), &input).await;
    assert_eq!(statuses(&out), ["200"], "{out}");
    fleet.stop().await;
}

// ---- row 10: HTTP/1.0 --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_streams_without_chunked_encoding_and_closes() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let body = completion_bytes(true);
    let mut input = format!(
        "POST /v1/completions HTTP/1.0\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    input.extend_from_slice(&body);
    let (out, closed) = raw(&fleet.url(), &input).await;
    assert_eq!(statuses(&out), ["200"], "{out}");
    let (head, rest) = out.split_once("\r\n\r\n").expect("a head");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(rest.starts_with("data: "), "the raw SSE body: {rest:?}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest:?}");
    assert!(closed, "the end of the body is the end of the connection");
    fleet.stop().await;
}

// ---- row 7: deadlines and the connection cap ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_byte_by_byte_is_cut_at_the_head_deadline() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.limits.head_timeout_ms = 600;
    let fleet = fleet(cfg).await;
    let mut tcp = TcpStream::connect(addr_of(&fleet.url()))
        .await
        .expect("connect");
    let head = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-slow: 0123456789\r\n\r\n";
    let started = Instant::now();
    // 100 ms a byte: every read is quick, the whole head would take 5 s.
    let trickle = async {
        for b in head {
            if tcp.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), trickle).await;
    let (out, closed) = read_until_close(&mut tcp).await;
    assert_eq!(statuses(&out), ["408"], "{out}");
    assert!(closed, "{out}");
    assert!(started.elapsed() < Duration::from_secs(3));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_byte_by_byte_is_cut_at_the_body_deadline() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.limits.body_timeout_ms = 600;
    let fleet = fleet(cfg).await;
    let body = completion_bytes(false);
    let mut tcp = TcpStream::connect(addr_of(&fleet.url()))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    let trickle = async {
        for b in &body {
            if tcp.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), trickle).await;
    let (out, closed) = read_until_close(&mut tcp).await;
    assert_eq!(statuses(&out), ["408"], "{out}");
    assert!(closed, "{out}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_at_the_idle_deadline() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.limits.idle_timeout_ms = 500;
    let fleet = fleet(cfg).await;
    let mut tcp = TcpStream::connect(addr_of(&fleet.url()))
        .await
        .expect("connect");
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let (out, closed) = read_until_close(&mut tcp).await;
    assert_eq!(statuses(&out), ["200"], "{out}");
    assert!(closed, "closed after idling");
    let idled = started.elapsed();
    assert!(
        idled >= Duration::from_millis(450) && idled < Duration::from_secs(3),
        "{idled:?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503_and_the_slot_comes_back() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.limits.max_connections = 2;
    let fleet = fleet(cfg).await;
    let addr = addr_of(&fleet.url());
    let held: Vec<TcpStream> = futures::future::join_all((0..2).map(|_| TcpStream::connect(&addr)))
        .await
        .into_iter()
        .map(|c| c.expect("connect"))
        .collect();
    let (out, closed) = raw(&fleet.url(), b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(statuses(&out), ["503"], "{out}");
    assert!(out.contains("too_many_connections") && closed, "{out}");
    drop(held);
    let served = eventually(Duration::from_secs(5), || async {
        let (out, _) = raw(
            &fleet.url(),
            b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        statuses(&out) == ["200"]
    })
    .await;
    assert!(served, "a closed connection gives its slot back");
    fleet.stop().await;
}

/// A stand-in engine for the timed decode cases: answers `/health`, and every `/v1/*` call with
/// an SSE head and then, per `mode`, one event and silence, or events as fast as it can write.
/// It counts the legs it got and the legs whose connection the gateway closed.
struct FakeEngine {
    url: String,
    legs: AtomicUsize,
    closed: AtomicUsize,
}

#[derive(Clone, Copy)]
enum Mode {
    Stall,
    Flood,
}

const EVENT: &[u8] = b"data: {\"id\":\"x\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"tok\",\"finish_reason\":null}]}\n\n";

async fn fake_engine(mode: Mode) -> Arc<FakeEngine> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let fake = Arc::new(FakeEngine {
        url: format!("http://{}", listener.local_addr().expect("addr")),
        legs: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
    });
    let state = Arc::clone(&fake);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(fake_conn(tcp, mode, Arc::clone(&state)));
        }
    });
    fake
}

async fn fake_conn(mut tcp: TcpStream, mode: Mode, fake: Arc<FakeEngine>) {
    let mut buf = Vec::new();
    loop {
        let Some((path, rest)) = fake_request(&mut tcp, &mut buf).await else {
            return;
        };
        buf = rest;
        if !path.starts_with("/v1/") {
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if tcp.write_all(ok).await.is_err() {
                return;
            }
            continue;
        }
        fake.legs.fetch_add(1, Ordering::SeqCst);
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                     transfer-encoding: chunked\r\n\r\n";
        let mut event = format!("{:x}\r\n", EVENT.len()).into_bytes();
        event.extend_from_slice(EVENT);
        event.extend_from_slice(b"\r\n");
        let _ = tcp.write_all(head).await;
        let gone = match mode {
            Mode::Stall => {
                let _ = tcp.write_all(&event).await;
                // Silence until the gateway hangs up (a read of 0) or the test ends.
                let mut sink = [0u8; 1024];
                loop {
                    match tcp.read(&mut sink).await {
                        Ok(0) | Err(_) => break true,
                        Ok(_) => {}
                    }
                }
            }
            Mode::Flood => {
                let burst = event.repeat(64);
                loop {
                    if tcp.write_all(&burst).await.is_err() {
                        break true;
                    }
                }
            }
        };
        if gone {
            fake.closed.fetch_add(1, Ordering::SeqCst);
        }
        return;
    }
}

/// One request off the connection: its path, and the bytes after it. Bodies are
/// content-length framed (the gateway's engine client sends them so).
async fn fake_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tcp.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let path = head.split_whitespace().nth(1)?.to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < end + length {
        let n = tcp.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((path, buf[end + length..].to_vec()))
}

/// A gateway in front of one fake prefill and one fake decode that prefills every prompt
/// itself (the scheduler's decode-local choice), so every request is one decode leg.
async fn gateway_on(fake: &FakeEngine, tune: impl FnOnce(&mut GatewayConfig)) -> Gateway {
    let mut cfg = GatewayConfig::default();
    cfg.server.port = 0;
    cfg.health.metrics_interval_ms = 0;
    cfg.scheduler.disagg.local_prefill_max_tokens = 1_000_000;
    cfg.workers = [Role::Prefill, Role::Decode]
        .into_iter()
        .map(|role| WorkerConfig {
            url: fake.url.clone(),
            role,
            protocol: Protocol::Native,
            bootstrap_port: None,
            kv_events: None,
            kv_events_replay: None,
        })
        .collect();
    tune(&mut cfg);
    let gateway = Gateway::start(cfg).await.expect("gateway starts");
    gateway.check_health().await;
    gateway
}

/// The decode worker's view in `/admin/workers`.
async fn decode_view(url: &str) -> Value {
    admin_workers(url)
        .await
        .into_iter()
        .find(|w| w["role"] == "decode")
        .expect("a decode worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_stream_that_stalls_is_cut_counted_and_its_leg_dropped() {
    let fake = fake_engine(Mode::Stall).await;
    let gateway = gateway_on(&fake, |cfg| {
        cfg.upstream.decode_stall_timeout_ms = 400;
        cfg.breaker.failure_threshold = 1;
    })
    .await;
    let url = gateway.url();
    let mut body = completion("stall me", 50);
    body["stream"] = json!(true);
    let started = Instant::now();
    let resp = tokio::time::timeout(READ_LIMIT, async {
        post(&url, "/v1/completions", body)
            .await
            .text()
            .await
            .expect("body")
    })
    .await
    .expect("the stream ended instead of hanging");
    assert!(started.elapsed() < Duration::from_secs(5));
    let events = sse_events(&resp);
    assert!(
        events[0].contains("\"tok\""),
        "the first event went through: {resp}"
    );
    let last = events.last().expect("an error event");
    assert!(last.contains("decode_stream_interrupted"), "{resp}");
    assert!(last.contains("sent nothing"), "{resp}");
    let dropped = eventually(Duration::from_secs(5), || async {
        fake.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        dropped,
        "the engine connection was dropped (it aborts, frees KV)"
    );
    let view = decode_view(&url).await;
    assert_eq!(
        view["breaker"], "open",
        "a stall is the decode's failure: {view}"
    );
    assert_eq!(view["load"]["in_flight"], 0, "booking released: {view}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection_and_frees_the_leg() {
    let fake = fake_engine(Mode::Flood).await;
    let gateway = gateway_on(&fake, |cfg| {
        cfg.server.limits.write_timeout_ms = 300;
        // One failure would open it: a slow client must count as none.
        cfg.breaker.failure_threshold = 1;
    })
    .await;
    let url = gateway.url();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut tcp = socket
        .connect(addr_of(&url).parse().expect("addr"))
        .await
        .expect("connect");
    let body = completion_bytes(true);
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&body).await.expect("body");
    // Never read: the gateway's writes fill the socket buffers and then wait on us.
    let dropped = eventually(Duration::from_secs(8), || async {
        fake.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        dropped,
        "the gateway gave up on the client and dropped the engine leg"
    );
    let view = decode_view(&url).await;
    assert_eq!(view["load"]["in_flight"], 0, "booking released: {view}");
    assert_eq!(
        view["breaker"], "closed",
        "a slow client is not the engine's failure: {view}"
    );
    // The client's connection is gone too: what is buffered, then the end.
    let (_, closed) = read_until_close(&mut tcp).await;
    assert!(closed);
    gateway.stop().await;
}
