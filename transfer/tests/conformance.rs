//! The transport conformance suite: one set of tests, run against every
//! transport present. `tcp` and `shm` always run; the `rdma` suite is marked
//! ignored, so a run shows it as not run rather than passed, and runs on a
//! host with a device with `cargo test -p pdgate-transfer --features rdma
//! --test conformance -- --ignored` (failing, naming the fix, if this build or
//! host cannot do RDMA). Each test asserts which transport carried the batch,
//! so a transport that silently fell back to another fails here. Engines hold
//! a fleet secret, as deployed ones do, so every connection is authenticated
//! (the suite in `tcp.rs` covers engines without one).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pdgate_transfer::{
    Batch, EngineOptions, Secret, SegmentDesc, TransferEngine, TransferError, TransportChoice,
    TransportKind,
};

/// Options of an engine of the test fleet: the shared secret, else defaults.
fn keyed() -> EngineOptions {
    EngineOptions {
        secret: Some(Secret::new(b"conformance-suite-fleet-secret").unwrap()),
        ..EngineOptions::default()
    }
}

struct Case {
    choice: TransportChoice,
    kind: TransportKind,
}

async fn engine(c: &Case, timeout: Duration) -> Arc<TransferEngine> {
    TransferEngine::start(EngineOptions {
        transport: c.choice,
        op_timeout: timeout,
        ..keyed()
    })
    .await
    .unwrap()
}

/// Cheap deterministic bytes (word-wise, so 256 MiB is fast in debug builds).
fn pattern(seed: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

async fn sizes_round_trip(c: Case) {
    let a = engine(&c, Duration::from_secs(60)).await;
    let b = engine(&c, Duration::from_secs(60)).await;
    const MAX: usize = 256 << 20;
    let seg = b.register_segment("kv", MAX + 4096).unwrap();
    let desc = b.describe(&seg);
    for (i, len) in [1usize, 4096, (1 << 20) + 7, (16 << 20) + 3, MAX]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64, len);
        let off = 4096 - (i as u64 % 3);
        let r = a
            .submit(&desc, Batch::new().write(off, data.clone()))
            .await
            .unwrap();
        assert_eq!(
            (r.bytes_written, r.transport),
            (len as u64, c.kind),
            "len {len}"
        );
        assert!(
            seg.read(off as usize, len).unwrap() == data[..],
            "write of {len} bytes"
        );
        let r = a
            .submit(&desc, Batch::new().read(off, len as u64))
            .await
            .unwrap();
        assert_eq!((r.bytes_read, r.transport), (len as u64, c.kind));
        assert!(r.reads[0] == data, "read of {len} bytes");
    }
}

async fn mixed_batch_reads_see_writes(c: Case) {
    let a = engine(&c, Duration::from_secs(10)).await;
    let b = engine(&c, Duration::from_secs(10)).await;
    let seg = b.register_segment("kv", 8 << 20).unwrap();
    let desc = b.describe(&seg);
    let big = pattern(9, 5 << 20);
    let r = a
        .submit(
            &desc,
            Batch::new()
                .read(0, 3)
                .write(0, Bytes::from_static(b"abc"))
                .write(100, big.clone())
                .read(100, big.len() as u64)
                .read(7 << 20, 0),
        )
        .await
        .unwrap();
    assert_eq!(r.transport, c.kind);
    assert_eq!(
        &r.reads[0][..],
        b"abc",
        "reads are served after the batch's writes"
    );
    assert!(r.reads[1] == big);
    assert!(r.reads[2].is_empty());
    assert_eq!(r.bytes_written, 3 + big.len() as u64);
}

async fn many_concurrent_batches(c: Case) {
    const TASKS: usize = 48;
    const REGION: usize = 256 << 10;
    let a = engine(&c, Duration::from_secs(30)).await;
    let b = engine(&c, Duration::from_secs(30)).await;
    let seg = b.register_segment("kv", TASKS * REGION).unwrap();
    let desc = b.describe(&seg);
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let (a, desc) = (a.clone(), desc.clone());
        let kind = c.kind;
        handles.push(tokio::spawn(async move {
            // Sizes vary so some batches are sliced and some are not.
            let len = REGION >> (t % 4);
            let data = pattern(t as u64 + 100, len);
            let base = (t * REGION) as u64;
            for _ in 0..3 {
                let r = a
                    .submit(&desc, Batch::new().write(base, data.clone()))
                    .await
                    .unwrap();
                assert_eq!(r.transport, kind);
                let r = a
                    .submit(&desc, Batch::new().read(base, len as u64))
                    .await
                    .unwrap();
                assert!(r.reads[0] == data, "task {t}");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

async fn notification_follows_data(c: Case) {
    let a = engine(&c, Duration::from_secs(10)).await;
    let b = engine(&c, Duration::from_secs(10)).await;
    let seg = b.register_segment("kv", 8 << 20).unwrap();
    let desc = b.describe(&seg);
    let mut rx = b.take_notifications().unwrap();
    // One batch within a slice, one cut into many slices.
    for (i, len) in [(0u8, 1000usize), (1, 8 << 20)] {
        let data = Bytes::from(vec![i + 1; len]);
        let r = a
            .submit(
                &desc,
                Batch::new().write(0, data).notify(Bytes::from(vec![i; 5])),
            )
            .await
            .unwrap();
        assert_eq!(r.transport, c.kind);
        let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((n.segment.as_str(), &n.payload[..]), ("kv", &[i; 5][..]));
        assert!(
            seg.read(0, len).unwrap().iter().all(|&x| x == i + 1),
            "data before notification"
        );
    }
    // A failed batch delivers nothing.
    assert!(a
        .submit(
            &desc,
            Batch::new()
                .write(8 << 20, Bytes::from_static(b"x"))
                .notify(Bytes::from_static(b"no"))
        )
        .await
        .is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_err());
}

/// A batch of no ops but a notification is a message to the segment's owner: delivered once,
/// acknowledged like any batch, and refused for a segment the owner does not have.
async fn a_notification_alone_is_a_message(c: Case) {
    let a = engine(&c, Duration::from_secs(10)).await;
    let b = engine(&c, Duration::from_secs(10)).await;
    let seg = b.register_segment("mailbox", 1).unwrap();
    let desc = b.describe(&seg);
    let mut rx = b.take_notifications().unwrap();
    for i in 0..3u8 {
        let r = a
            .submit(&desc, Batch::new().notify(Bytes::from(vec![i; 3])))
            .await
            .unwrap();
        assert_eq!((r.transport, r.bytes_written, r.bytes_read), (c.kind, 0, 0));
        let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.segment.as_str(), &n.payload[..]),
            ("mailbox", &[i; 3][..])
        );
    }
    assert!(b.unregister_segment("mailbox"));
    assert!(a
        .submit(&desc, Batch::new().notify(Bytes::from_static(b"gone")))
        .await
        .is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_err());
}

async fn wrong_offsets_and_names_are_rejected(c: Case) {
    let a = engine(&c, Duration::from_secs(10)).await;
    let b = engine(&c, Duration::from_secs(10)).await;
    let seg = b.register_segment("kv", 1024).unwrap();
    let desc = b.describe(&seg);
    let cases = [
        Batch::new().write(1000, Bytes::from(vec![1; 25])),
        Batch::new().read(1024, 1),
        Batch::new().read(u64::MAX, 2),
        Batch::new()
            .write(0, Bytes::from_static(b"ok"))
            .read(2000, 1),
    ];
    for batch in cases {
        match a.submit(&desc, batch).await {
            Err(TransferError::OutOfBounds {
                segment,
                segment_len,
                ..
            }) => {
                assert_eq!((segment.as_str(), segment_len), ("kv", 1024))
            }
            other => panic!("expected OutOfBounds, got {other:?}"),
        }
    }
    let ghost = SegmentDesc {
        name: "ghost".into(),
        ..desc.clone()
    };
    let err = a.submit(&ghost, Batch::new().read(0, 1)).await.unwrap_err();
    assert!(matches!(err, TransferError::UnknownSegment(_)), "{err:?}");
    // Still serving, and unregistering stops it.
    let r = a.submit(&desc, Batch::new().read(0, 2)).await.unwrap();
    assert_eq!(&r.reads[0][..], b"ok");
    assert!(b.unregister_segment("kv"));
    let err = a
        .submit(&desc, Batch::new().write(0, Bytes::from_static(b"z")))
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::UnknownSegment(_)), "{err:?}");
    assert_eq!(
        seg.read(0, 1).unwrap(),
        b"o",
        "no write lands after unregister"
    );
}

async fn peer_death_mid_transfer_is_an_error_not_a_hang(c: Case) {
    let deadline = Duration::from_secs(3);
    let a = engine(&c, deadline).await;
    let b = engine(&c, deadline).await;
    let seg = b.register_segment("kv", 64 << 20).unwrap();
    let desc = b.describe(&seg);
    let data = pattern(5, 64 << 20);
    let writer = {
        let (a, desc) = (a.clone(), desc.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                let started = Instant::now();
                match a.submit(&desc, Batch::new().write(0, data.clone())).await {
                    Ok(_) if t0.elapsed() < Duration::from_secs(20) => continue,
                    Ok(_) => panic!("peer never died"),
                    Err(e) => return (e, started.elapsed()),
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    b.shutdown();
    let (err, took) = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .unwrap()
        .unwrap();
    assert!(
        took <= deadline + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(!matches!(err, TransferError::OutOfBounds { .. }), "{err:?}");
    // Later submits fail fast too.
    let t0 = Instant::now();
    assert!(a.submit(&desc, Batch::new().read(0, 1)).await.is_err());
    assert!(t0.elapsed() < deadline);
}

async fn silent_peer_hits_the_deadline(c: Case) {
    let deadline = Duration::from_millis(300);
    let a = engine(&c, deadline).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // accept, never answer
        }
    });
    let desc = SegmentDesc {
        name: "kv".into(),
        endpoint: addr.to_string(),
        len: 1 << 20,
        transport: TransportKind::Tcp,
    };
    let t0 = Instant::now();
    let err = a
        .submit(&desc, Batch::new().write(0, Bytes::from(vec![1; 4096])))
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Timeout), "{err:?}");
    assert!(t0.elapsed() < deadline * 3);
}

async fn p2p_discovery_without_registry(c: Case) {
    let a = engine(&c, Duration::from_secs(5)).await;
    let b = engine(&c, Duration::from_secs(5)).await;
    let seg = b.register_segment("p2p", 4096).unwrap();
    let desc = a.discover(&b.endpoint(), "p2p").await.unwrap();
    assert_eq!((desc.len, desc.endpoint.clone()), (4096, b.endpoint()));
    a.submit(&desc, Batch::new().write(1, Bytes::from_static(b"hi")))
        .await
        .unwrap();
    assert_eq!(seg.read(1, 2).unwrap(), b"hi");
    assert!(matches!(
        a.discover(&b.endpoint(), "nope").await,
        Err(TransferError::UnknownSegment(_))
    ));
}

macro_rules! conformance {
    ($transport:ident, $choice:expr, $kind:expr $(, #[$attr:meta])?) => {
        mod $transport {
            use super::*;
            fn case() -> Case {
                Case { choice: $choice, kind: $kind }
            }
            conformance!(@tests [$(#[$attr])?] sizes_round_trip, mixed_batch_reads_see_writes,
                many_concurrent_batches, notification_follows_data,
                a_notification_alone_is_a_message,
                wrong_offsets_and_names_are_rejected,
                peer_death_mid_transfer_is_an_error_not_a_hang,
                silent_peer_hits_the_deadline, p2p_discovery_without_registry);
        }
    };
    (@tests $attrs:tt $($name:ident),*) => {
        $(conformance!(@test $attrs $name);)*
    };
    (@test [$(#[$attr:meta])*] $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            super::$name(case()).await
        }
    };
}

conformance!(tcp, TransportChoice::Tcp, TransportKind::Tcp);
conformance!(shm, TransportChoice::Shm, TransportKind::Shm);
conformance!(
    rdma,
    TransportChoice::Rdma,
    TransportKind::Rdma,
    #[ignore = "needs an RDMA device: run with --features rdma -- --ignored on such a host"]
);

// ------------------------------------------------- choosing per peer ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_shm_on_this_host_and_tcp_for_heap_segments() {
    let auto = TransferEngine::start(keyed()).await.unwrap();
    let shm_owner = TransferEngine::start(keyed()).await.unwrap();
    let tcp_owner = TransferEngine::start(EngineOptions {
        transport: TransportChoice::Tcp,
        ..keyed()
    })
    .await
    .unwrap();
    let s1 = shm_owner.register_segment("a", 64).unwrap();
    let d1 = shm_owner.describe(&s1);
    assert_eq!(d1.transport, TransportKind::Shm);
    let s2 = tcp_owner.register_segment("b", 64).unwrap();
    let d2 = tcp_owner.describe(&s2);
    assert_eq!(d2.transport, TransportKind::Tcp);
    let w = |d| {
        Batch::new()
            .write(0, Bytes::from_static(b"x"))
            .read(0, 1)
            .notify(d)
    };
    let r = auto.submit(&d1, w(Bytes::from_static(b"1"))).await.unwrap();
    assert_eq!(r.transport, TransportKind::Shm);
    let r = auto.submit(&d2, w(Bytes::from_static(b"2"))).await.unwrap();
    assert_eq!(r.transport, TransportKind::Tcp);
    // A descriptor that says tcp (e.g. built by hand in P2P mode) still
    // gets shm after the handshake.
    let hand = SegmentDesc {
        transport: TransportKind::Tcp,
        ..d1.clone()
    };
    assert_eq!(
        auto.submit(&hand, w(Bytes::new())).await.unwrap().transport,
        TransportKind::Shm
    );
    // Forcing shm to a heap segment is a clear error.
    let forced = TransferEngine::start(EngineOptions {
        transport: TransportChoice::Shm,
        ..keyed()
    })
    .await
    .unwrap();
    let err = forced
        .submit(&d2, Batch::new().read(0, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Unsupported(ref m) if m.contains("shm")),
        "{err:?}"
    );
}

/// Forwards the first connection to `upstream`, then closes the listener: a
/// TCP path to the owner that is gone once the handshake is done.
async fn one_connection_proxy(upstream: String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        drop(listener);
        let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
        // Only the handshake: the describe exchange, then the proxied connection closes.
        let mut head = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut client, &mut head)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut server, &head[..n])
            .await
            .unwrap();
        let n = tokio::io::AsyncReadExt::read(&mut server, &mut head)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, &head[..n])
            .await
            .unwrap();
    });
    addr
}

// Open engines: the proxy forwards exactly one request and one reply, not the
// authentication round trips before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_commits_go_to_the_owners_unix_socket_not_its_tcp_port() {
    let owner = TransferEngine::start(EngineOptions::default())
        .await
        .unwrap();
    let mut rx = owner.take_notifications().unwrap();
    let seg = owner.register_segment("kv", 4096).unwrap();
    // The submitter reaches the owner's TCP port only for the handshake.
    let desc = SegmentDesc {
        endpoint: one_connection_proxy(owner.endpoint()).await.to_string(),
        ..owner.describe(&seg)
    };
    let client = TransferEngine::start(EngineOptions {
        op_timeout: Duration::from_secs(5),
        ..EngineOptions::default()
    })
    .await
    .unwrap();
    for i in 0..3u8 {
        let r = client
            .submit(
                &desc,
                Batch::new()
                    .write(u64::from(i), Bytes::from(vec![i + 1]))
                    .notify(Bytes::from(vec![i])),
            )
            .await
            .unwrap();
        assert_eq!(r.transport, TransportKind::Shm);
        let n = rx.recv().await.unwrap();
        assert_eq!(&n.payload[..], &[i], "commit {i} reached the owner");
    }
    assert_eq!(seg.read(0, 3).unwrap(), vec![1, 2, 3]);
    // A closed owner (shutdown flips the mapping's state) is an error, not a hang or a success.
    owner.shutdown();
    let r = client
        .submit(&desc, Batch::new().notify(Bytes::from_static(b"late")))
        .await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_socket_that_went_away_falls_back_to_tcp() {
    let owner = TransferEngine::start(keyed()).await.unwrap();
    let mut rx = owner.take_notifications().unwrap();
    let seg = owner.register_segment("kv", 64).unwrap();
    let desc = owner.describe(&seg);
    let client = TransferEngine::start(keyed()).await.unwrap();
    // A cleaner removed the socket file while the owner lives on: the advert still names it,
    // the mapping is live, and each commit takes the owner's TCP port instead, delivered once.
    std::fs::remove_file(owner.control_socket().unwrap()).unwrap();
    for payload in [&b"one"[..], b"two"] {
        let b = Batch::new()
            .write(0, Bytes::copy_from_slice(payload))
            .notify(Bytes::copy_from_slice(payload));
        let r = client.submit(&desc, b).await.unwrap();
        assert_eq!(r.transport, TransportKind::Shm);
        assert_eq!(&rx.recv().await.unwrap().payload[..], payload);
        assert_eq!(seg.read(0, 3).unwrap(), payload);
    }
    assert!(rx.try_recv().is_err(), "each delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_files_are_removed_on_unregister_and_shutdown() {
    let dir = std::env::temp_dir().join(format!("pdgate-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = TransferEngine::start(EngineOptions {
        transport: TransportChoice::Shm,
        shm_dir: dir.clone(),
        ..keyed()
    })
    .await
    .unwrap();
    let count = || std::fs::read_dir(&dir).unwrap().count();
    let control = e
        .control_socket()
        .expect("an shm engine has a commit socket");
    assert!(control.starts_with(&dir));
    let _a = e.register_segment("a", 4096).unwrap();
    let _b = e.register_segment("b", 4096).unwrap();
    assert_eq!(count(), 3, "two segment files and the commit socket");
    assert!(e.unregister_segment("a"));
    assert_eq!(count(), 2);
    e.shutdown();
    assert_eq!(count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registered_segment_is_reached_not_its_stale_mapping() {
    let a = TransferEngine::start(keyed()).await.unwrap();
    let b = TransferEngine::start(keyed()).await.unwrap();
    let old = b.register_segment("kv", 64).unwrap();
    let desc = b.describe(&old);
    a.submit(&desc, Batch::new().write(0, Bytes::from_static(b"1")))
        .await
        .unwrap();
    assert!(b.unregister_segment("kv"));
    let new = b.register_segment("kv", 64).unwrap();
    let r = a
        .submit(&desc, Batch::new().write(0, Bytes::from_static(b"2")))
        .await
        .unwrap();
    assert_eq!(r.transport, TransportKind::Shm);
    assert_eq!(new.read(0, 1).unwrap(), b"2");
    assert_eq!(old.read(0, 1).unwrap(), b"1");
}

#[tokio::test]
async fn rdma_choice_fails_with_a_clear_error_when_unavailable() {
    match TransferEngine::start(EngineOptions {
        transport: TransportChoice::Rdma,
        ..EngineOptions::default()
    })
    .await
    {
        Err(TransferError::Unsupported(msg)) => assert!(msg.contains("rdma"), "{msg}"),
        Ok(_) => {} // a host with a device and the feature: fine
        Err(other) => panic!("unexpected error {other:?}"),
    }
}
