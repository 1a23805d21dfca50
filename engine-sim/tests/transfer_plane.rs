//! The engine's transfer plane as `spawn` starts it: bound to the engine's own interface, and
//! keyed by the fleet secret when one is configured, so a peer without it cannot reach the KV
//! pool.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use pdgate_engine_sim::{EngineConfig, EngineHandle};
use pdgate_scheduler::Role;
use pdgate_transfer::{Batch, EngineOptions, Secret, TransferEngine, TransferError};
use std::net::SocketAddr;

fn decode(host: &str) -> EngineConfig {
    let mut cfg = EngineConfig {
        role: Role::Decode,
        host: host.into(),
        kv_blocks: 64,
        kv_bytes_per_token: 64,
        ..EngineConfig::default()
    };
    cfg.timing.time_scale = 0.0;
    cfg
}

fn kv_segment(e: &EngineHandle) -> String {
    e.engine.pool.as_ref().unwrap().segment().name().to_owned()
}

#[tokio::test]
async fn the_transfer_listener_binds_the_engines_own_interface() {
    // A name, resolved where the HTTP listener is bound; the transfer port follows it.
    let e = pdgate_engine_sim::spawn(decode("localhost")).await.unwrap();
    let transfer: SocketAddr = e.engine.transfer.endpoint().parse().unwrap();
    assert_eq!(transfer.ip(), e.addr.ip());
    assert!(transfer.ip().is_loopback());
    e.stop().await;
}

#[tokio::test]
async fn a_fleet_secret_file_keys_the_transfer_plane() {
    let dir = std::env::temp_dir().join(format!("pdgate-engine-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet-secret");
    std::fs::write(&file, "engine-sim-test-fleet-secret\n").unwrap();
    let e = pdgate_engine_sim::spawn(EngineConfig {
        fleet_secret_file: Some(file.clone()),
        ..decode("127.0.0.1")
    })
    .await
    .unwrap();
    let name = kv_segment(&e);
    let endpoint = e.engine.transfer.endpoint();

    let stranger = TransferEngine::start(EngineOptions::default())
        .await
        .unwrap();
    let refused = stranger.discover(&endpoint, &name).await;
    assert!(
        matches!(&refused, Err(TransferError::Remote(m)) if m.contains("fleet secret")),
        "{refused:?}"
    );

    // The same secret as the file holds (its last newline dropped, as FleetSecret does).
    let member = TransferEngine::start(EngineOptions {
        secret: Some(Secret::new(b"engine-sim-test-fleet-secret").unwrap()),
        ..EngineOptions::default()
    })
    .await
    .unwrap();
    let desc = member.discover(&endpoint, &name).await.unwrap();
    member
        .submit(&desc, Batch::new().read(0, 16))
        .await
        .unwrap();
    assert!(e.engine.transfer.admission_stats().refused >= 1);
    e.stop().await;

    // A configured secret file that cannot be read stops the engine from starting.
    let missing = pdgate_engine_sim::spawn(EngineConfig {
        fleet_secret_file: Some(dir.join("missing")),
        ..decode("127.0.0.1")
    })
    .await;
    assert!(missing.is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One sample's value in a Prometheus text body (0 when absent).
fn sample(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn transfer_admissions_show_on_the_engines_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = std::env::temp_dir().join(format!("pdgate-engine-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet-secret");
    std::fs::write(&file, "engine-sim-metrics-fleet-secret\n").unwrap();
    let e = pdgate_engine_sim::spawn(EngineConfig {
        fleet_secret_file: Some(file),
        ..decode("127.0.0.1")
    })
    .await
    .unwrap();
    let (name, endpoint) = (kv_segment(&e), e.engine.transfer.endpoint());
    let scrape = || async {
        reqwest::get(format!("{}/metrics", e.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let accepted = "pdgate_transfer_handshakes_total{outcome=\"accepted\"}";
    let aborted = "pdgate_transfer_handshakes_total{outcome=\"aborted\"}";
    let bad_mac = "pdgate_transfer_handshakes_total{outcome=\"bad_mac\"}";
    let before = scrape().await;
    assert!(before.contains("# TYPE pdgate_transfer_handshakes_total counter"));

    // The crate's own client with another secret: it finds the engine's proof wrong and hangs up.
    let wrong = TransferEngine::start(EngineOptions {
        secret: Some(Secret::new(b"another-fleets-secret-entirely").unwrap()),
        ..EngineOptions::default()
    })
    .await
    .unwrap();
    let refused = wrong.discover(&endpoint, &name).await;
    assert!(
        matches!(refused, Err(TransferError::Unauthenticated(_))),
        "{refused:?}"
    );
    // A client that sends a proof anyway, as an attacker would: a wrong MAC.
    let mut s = tokio::net::TcpStream::connect(&endpoint).await.unwrap();
    let mut hello = 0x5044_5441u32.to_le_bytes().to_vec();
    hello.extend_from_slice(&[1, 0, 0, 0]);
    hello.extend_from_slice(&[9; 32]);
    s.write_all(&hello).await.unwrap();
    let mut challenge = [0u8; 72];
    s.read_exact(&mut challenge).await.unwrap();
    s.write_all(&[0; 32]).await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "no verdict for a wrong proof: {rest:?}");

    // A member: admitted, and its pooled connection stays open.
    let member = TransferEngine::start(EngineOptions {
        secret: Some(Secret::new(b"engine-sim-metrics-fleet-secret").unwrap()),
        ..EngineOptions::default()
    })
    .await
    .unwrap();
    let desc = member.discover(&endpoint, &name).await.unwrap();
    member
        .submit(&desc, Batch::new().read(0, 16))
        .await
        .unwrap();

    let after = scrape().await;
    assert!(
        sample(&after, aborted) > sample(&before, aborted),
        "{after}"
    );
    assert_eq!(
        sample(&after, bad_mac),
        sample(&before, bad_mac) + 1,
        "{after}"
    );
    assert!(
        sample(&after, accepted) > sample(&before, accepted),
        "{after}"
    );
    assert!(
        sample(&after, "pdgate_transfer_connections_open") >= 1,
        "{after}"
    );
    assert!(after.contains("pdgate_transfer_connections_refused_total{reason=\"peer_cap\"} 0"));
    e.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
