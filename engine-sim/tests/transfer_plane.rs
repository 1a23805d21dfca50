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
