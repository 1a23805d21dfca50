//! TLS against a real fleet on loopback (issue 14): the client listener serves only over TLS with
//! its certificate, reloads it on file change and on SIGHUP (keeping the old one when the new
//! pair is broken, and leaving open connections alone), and the gateway reaches `https://`
//! engines with mutual TLS, failing cleanly when an engine refuses its certificate.

mod support;

use pdgate::config::{Config, Protocol, WorkerConfig};
use pdgate_gateway::config::{ServerTls, UpstreamTls};
use pdgate_scheduler::Role;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use support::tls::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

fn chat_body(content: &str) -> String {
    chat(content, 4).to_string()
}

/// A fleet whose listener serves `leaf` (written to `dir`); `poll_ms` 0 reloads on SIGHUP only.
fn tls_config(dir: &Scratch, leaf: &Leaf, poll_ms: u64) -> (Config, PathBuf, PathBuf) {
    let cert = dir.write("cert.pem", &leaf.cert_pem);
    let key = dir.write("key.pem", &leaf.key_pem);
    let mut cfg = config(1, 1, 0.0);
    cfg.server.tls = Some(ServerTls {
        cert_file: cert.clone(),
        key_file: key.clone(),
        client_ca_file: None,
        reload_poll_ms: poll_ms,
    });
    (cfg, cert, key)
}

/// Roots holding every CA in `cas`.
fn roots_of(cas: &[&Ca]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.extend(ca.roots().roots);
    }
    roots
}

/// The certificate a new TLS connection to `addr` is shown.
async fn cert_now(addr: SocketAddr, roots: rustls::RootCertStore) -> Option<Vec<u8>> {
    let conn = connect(addr, client_config(roots, None)).await.ok()?;
    Some(shown_cert(&conn).to_vec())
}

async fn until_cert(addr: SocketAddr, cas: &[&Ca], want: &Leaf) -> bool {
    eventually(Duration::from_secs(10), || async {
        cert_now(addr, roots_of(cas)).await.as_deref() == Some(want.der.as_ref())
    })
    .await
}

/// One chat completion on a new TLS connection trusting `cas`, until it answers 200.
async fn served_over_tls(addr: SocketAddr, cas: &[&Ca]) -> bool {
    eventually(Duration::from_secs(10), || async {
        let Ok(mut conn) = connect(addr, client_config(roots_of(cas), None)).await else {
            return false;
        };
        exchange(&mut conn, "POST", CHAT, &chat_body("over tls"))
            .await
            .0
            == 200
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_only_tls_with_its_own_certificate() {
    let ca = Ca::new("pdgate test ca");
    let dir = Scratch::new("serve");
    let (cfg, _, _) = tls_config(&dir, &ca.issue(&["127.0.0.1"]), 0);
    let fleet = fleet(cfg).await;
    let addr = fleet.gateway.addr;
    assert!(fleet.url().starts_with("https://"), "{}", fleet.url());
    assert!(served_over_tls(addr, &[&ca]).await);

    // One connection carries several requests, and the answer is the OpenAI one.
    let mut conn = connect(addr, client_config(ca.roots(), None))
        .await
        .expect("handshake with the right CA");
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    for i in 0..3 {
        let (status, body) =
            exchange(&mut conn, "POST", CHAT, &chat_body(&format!("tls {i}"))).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    }

    // A client that trusts another CA refuses the gateway's certificate.
    let other = Ca::new("another ca");
    assert!(connect(addr, client_config(other.roots(), None))
        .await
        .is_err());

    // Plain HTTP on the TLS port is never answered in HTTP.
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: g\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut out)).await;
    assert!(
        !out.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_is_served_to_new_connections_and_a_broken_one_is_not() {
    let (first_ca, second_ca) = (Ca::new("first ca"), Ca::new("second ca"));
    let (first, second) = (
        first_ca.issue(&["127.0.0.1"]),
        second_ca.issue(&["127.0.0.1"]),
    );
    let both = [&first_ca, &second_ca];
    let dir = Scratch::new("reload");
    let (cfg, _, _) = tls_config(&dir, &first, 50);
    let fleet = fleet(cfg).await;
    let addr = fleet.gateway.addr;
    assert!(served_over_tls(addr, &both).await);
    let mut old = connect(addr, client_config(roots_of(&both), None))
        .await
        .expect("handshake");
    assert_eq!(shown_cert(&old).as_ref(), first.der.as_ref());

    // A certificate manager writes the new pair: new connections get it, the open one goes on.
    dir.write("key.pem", &second.key_pem);
    dir.write("cert.pem", &second.cert_pem);
    assert!(until_cert(addr, &both, &second).await, "new pair served");
    let (status, _) = exchange(&mut old, "POST", CHAT, &chat_body("still here")).await;
    assert_eq!(status, 200, "an open connection outlives the reload");

    // A broken certificate is refused: the second pair stays in service.
    dir.write(
        "cert.pem",
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n",
    );
    let errors = eventually(Duration::from_secs(10), || async {
        let Ok(mut conn) = connect(addr, client_config(roots_of(&both), None)).await else {
            return false;
        };
        let (_, body) = exchange(&mut conn, "GET", "/metrics", "").await;
        body.contains(r#"pdgate_tls_reloads_total{outcome="error"}"#)
    })
    .await;
    assert!(errors, "the failed reload is counted");
    assert_eq!(
        cert_now(addr, roots_of(&both)).await.as_deref(),
        Some(second.der.as_ref()),
        "the pair in service stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let (first_ca, second_ca) = (Ca::new("hup first"), Ca::new("hup second"));
    let (first, second) = (
        first_ca.issue(&["127.0.0.1"]),
        second_ca.issue(&["127.0.0.1"]),
    );
    let both = [&first_ca, &second_ca];
    let dir = Scratch::new("hup");
    // No polling: only the signal can make it reload.
    let (cfg, _, _) = tls_config(&dir, &first, 0);
    let fleet = fleet(cfg).await;
    let addr = fleet.gateway.addr;
    assert!(served_over_tls(addr, &both).await);
    dir.write("key.pem", &second.key_pem);
    dir.write("cert.pem", &second.cert_pem);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cert_now(addr, roots_of(&both)).await.as_deref(),
        Some(first.der.as_ref()),
        "nothing reloads before the signal"
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(hup.success());
    assert!(until_cert(addr, &both, &second).await, "reloaded on SIGHUP");
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("engine address")
}

async fn worker_id(gateway: &str, url: &str) -> u64 {
    admin_workers(gateway)
        .await
        .iter()
        .find(|w| w["url"] == url)
        .and_then(|w| w["id"].as_u64())
        .expect("listed")
}

async fn healthy(gateway: &str, url: &str) -> bool {
    admin_workers(gateway)
        .await
        .iter()
        .any(|w| w["url"] == url && w["healthy"] == true)
}

async fn remove(gateway: &str, url: &str) {
    let id = worker_id(gateway, url).await;
    let resp = client()
        .delete(format!("{gateway}/admin/workers/{id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_behind_mutual_tls_are_reached_with_the_gateways_certificate() {
    let (engine_ca, client_ca, stranger_ca) = (
        Ca::new("engines"),
        Ca::new("gateway clients"),
        Ca::new("someone else's clients"),
    );
    let dir = Scratch::new("mtls");
    let gateway_cert = client_ca.issue(&["pdgate-gateway"]);
    let mut cfg = config(1, 1, 0.0);
    cfg.upstream.tls = UpstreamTls {
        ca_file: Some(dir.write("engines-ca.pem", &engine_ca.pem())),
        client_cert_file: Some(dir.write("client.pem", &gateway_cert.cert_pem)),
        client_key_file: Some(dir.write("client.key", &gateway_cert.key_pem)),
    };
    let protocol = cfg.up.engine.protocol;
    let fleet = fleet(cfg).await;
    let gw = fleet.url();
    let plain_prefill = engine_url(&fleet, Role::Prefill);
    let backend = addr_of(&plain_prefill);
    let engine_leaf = engine_ca.issue(&["127.0.0.1"]);

    // The same prefill engine behind two TLS front ends: one trusts the gateway's client CA,
    // the other only a stranger's.
    let trusting = terminator(backend, &engine_leaf, &client_ca).await;
    let refusing = terminator(backend, &engine_leaf, &stranger_ca).await;
    let (good, bad) = (format!("https://{trusting}"), format!("https://{refusing}"));
    for url in [&good, &bad] {
        fleet.gateway.add_worker(&WorkerConfig {
            url: url.clone(),
            role: Role::Prefill,
            protocol,
            bootstrap_port: None,
            kv_events: None,
            kv_events_replay: None,
        });
    }
    fleet.gateway.check_health().await;
    assert!(
        eventually(Duration::from_secs(10), || healthy(&gw, &good)).await,
        "health checks pass over mutual TLS"
    );
    assert!(
        !healthy(&gw, &bad).await,
        "an engine that refuses the certificate is down"
    );

    // Only the TLS prefills left: requests are served through the trusting one.
    remove(&gw, &plain_prefill).await;
    for i in 0..4 {
        let resp = post(&gw, CHAT, chat(&format!("mtls {i}"), 4)).await;
        assert_eq!(resp.status().as_u16(), 200, "request {i}");
    }

    // Only the refusing one left: a clean OpenAI error, not a hang or a crash.
    remove(&gw, &good).await;
    let resp = post(&gw, CHAT, chat("refused", 4)).await;
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.expect("json error");
    assert!(matches!(status, 502 | 503), "{status} {body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_engine_without_a_ca_is_refused_not_trusted() {
    let fleet = fleet(config(1, 1, 0.0)).await;
    let gw = fleet.url();
    let ca = Ca::new("unconfigured");
    let backend = addr_of(&engine_url(&fleet, Role::Prefill));
    let front = terminator(backend, &ca.issue(&["127.0.0.1"]), &ca).await;
    let url = format!("https://{front}");
    let resp = client()
        .post(format!("{gw}/admin/workers"))
        .json(&serde_json::json!({"url": url, "role": "prefill", "protocol": Protocol::default()}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 201);
    fleet.gateway.check_health().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.gateway.check_health().await;
    assert!(
        !healthy(&gw, &url).await,
        "never healthy without [upstream.tls] ca_file"
    );
}
