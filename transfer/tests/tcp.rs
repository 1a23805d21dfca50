//! End-to-end tests of two engines talking over loopback TCP (transport
//! forced to `tcp`; `conformance.rs` runs the shared suite on every transport).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pdgate_transfer::{
    Batch, EngineOptions, SegmentDesc, TransferEngine, TransferError, TransportChoice,
    TransportKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tcp_options() -> EngineOptions {
    EngineOptions {
        transport: TransportChoice::Tcp,
        ..EngineOptions::default()
    }
}

async fn engine() -> Arc<TransferEngine> {
    TransferEngine::start(tcp_options())
        .await
        .expect("engine starts")
}

async fn engine_with_timeout(t: Duration) -> Arc<TransferEngine> {
    TransferEngine::start(EngineOptions {
        op_timeout: t,
        ..tcp_options()
    })
    .await
    .expect("engine starts")
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_op_write_then_read_back_in_op_order() {
    let a = engine().await;
    let b = engine().await;
    let seg = b.register_segment("kv", 4096).unwrap();
    let desc = b.describe(&seg);
    assert_ne!(desc.endpoint, a.endpoint());

    let chunks: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(1, 100)),
        (1000, pattern(2, 1)),
        (2048, pattern(3, 2048)),
        (500, pattern(4, 300)),
    ];
    let mut batch = Batch::new();
    for (off, data) in &chunks {
        batch = batch.write(*off, Bytes::from(data.clone()));
    }
    let report = a.submit(&desc, batch).await.unwrap();
    assert_eq!(report.bytes_written, 100 + 1 + 2048 + 300);
    assert!(report.reads.is_empty());

    // Exactly those bytes, and nothing else touched.
    let mut expect = vec![0u8; 4096];
    for (off, data) in &chunks {
        expect[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    assert_eq!(seg.read(0, 4096).unwrap(), expect);

    // Reads come back one per Read op, in op order (deliberately not offset order).
    let report = a
        .submit(
            &desc,
            Batch::new()
                .read(2048, 2048)
                .read(0, 100)
                .read(4000, 0)
                .read(1000, 1)
                .read(500, 300),
        )
        .await
        .unwrap();
    assert_eq!(report.bytes_read, 2048 + 100 + 1 + 300);
    assert_eq!(report.reads.len(), 5);
    assert_eq!(&report.reads[0][..], &chunks[2].1[..]);
    assert_eq!(&report.reads[1][..], &chunks[0].1[..]);
    assert!(report.reads[2].is_empty());
    assert_eq!(&report.reads[3][..], &chunks[1].1[..]);
    assert_eq!(&report.reads[4][..], &chunks[3].1[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_arrives_after_data_is_visible() {
    let a = engine().await;
    let b = engine().await;
    let seg = b.register_segment("kv", ROUND_BYTES).unwrap();
    let desc = b.describe(&seg);
    let mut rx = b.take_notifications().unwrap();
    assert!(b.take_notifications().is_none());

    const ROUND_BYTES: usize = 8 << 20;
    let rounds = 10u64;
    let checker_seg = seg.clone();
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::channel::<()>(1);
    // The check happens on B's side at the moment the notification is
    // received, so it fails if delivery ever overtakes the data.
    let checker = tokio::spawn(async move {
        for i in 0..rounds {
            let n = rx.recv().await.unwrap();
            assert_eq!(n.segment, "kv");
            let payload = format!("request-{i} ready").into_bytes();
            assert_eq!(&n.payload[..], &payload[..]);
            let data = vec![i as u8 + 1; ROUND_BYTES];
            assert_eq!(checker_seg.read(0, data.len()).unwrap(), data, "round {i}");
            ack_tx.send(()).await.unwrap();
        }
    });
    for i in 0..rounds {
        // Large enough that the server has to wait on the socket several
        // times while applying it, so an early notification would be seen.
        let data = Bytes::from(vec![i as u8 + 1; ROUND_BYTES]);
        let half = ROUND_BYTES / 2;
        let batch = Batch::new()
            .write(0, data.slice(..half))
            .write(half as u64, data.slice(half..))
            .notify(Bytes::from(format!("request-{i} ready")));
        a.submit(&desc, batch).await.unwrap();
        // Don't overwrite the region before the checker has looked at it.
        tokio::time::timeout(Duration::from_secs(5), ack_rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), checker)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_reported_and_engine_keeps_serving() {
    let a = engine().await;
    let b = engine().await;
    let seg = b.register_segment("kv", 1024).unwrap();
    let desc = b.describe(&seg);
    let mut rx = b.take_notifications().unwrap();

    // Out of bounds: a write straddling the end, after a valid write and
    // followed by another write whose payload must be drained, not applied.
    let err = a
        .submit(
            &desc,
            Batch::new()
                .write(0, Bytes::from_static(b"first"))
                .write(1000, Bytes::from(vec![7u8; 100]))
                .write(10, Bytes::from(vec![9u8; 10]))
                .write(1024, Bytes::from(vec![9u8; 200 << 10]))
                .notify(Bytes::from_static(b"nope")),
        )
        .await
        .unwrap_err();
    match err {
        TransferError::OutOfBounds {
            segment,
            offset,
            len,
            segment_len,
        } => assert_eq!(
            (segment.as_str(), offset, len, segment_len),
            ("kv", 1000, 100, 1024)
        ),
        other => panic!("expected OutOfBounds, got {other:?}"),
    }
    assert_eq!(seg.read(0, 5).unwrap(), b"first");
    assert_eq!(seg.read(10, 10).unwrap(), vec![0u8; 10]);
    assert_eq!(seg.read(1000, 24).unwrap(), vec![0u8; 24]);

    // Read past the end, and an offset that overflows u64 arithmetic.
    assert!(matches!(
        a.submit(&desc, Batch::new().read(1020, 5)).await,
        Err(TransferError::OutOfBounds { .. })
    ));
    assert!(matches!(
        a.submit(&desc, Batch::new().read(u64::MAX, 2)).await,
        Err(TransferError::OutOfBounds { .. })
    ));

    // Unknown segment, with a write payload that must be drained.
    let ghost = SegmentDesc {
        name: "ghost".into(),
        ..desc.clone()
    };
    let err = a
        .submit(
            &ghost,
            Batch::new().write(0, Bytes::from(vec![1u8; 200 << 10])),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::UnknownSegment(ref n) if n == "ghost"),
        "{err:?}"
    );

    // A stale descriptor whose len is larger than the real segment is still
    // caught by the target.
    let stale = SegmentDesc {
        len: 1 << 20,
        ..desc.clone()
    };
    assert!(a.submit(&stale, Batch::new().read(4096, 1)).await.is_err());

    // No notification was delivered for any failed batch.
    assert!(rx.try_recv().is_err());

    // The next valid batch is served, repeatedly, over the same pool.
    for i in 0..5u8 {
        let r = a
            .submit(
                &desc,
                Batch::new()
                    .write(100, Bytes::from(vec![i; 8]))
                    .read(100, 8)
                    .notify(Bytes::from(vec![i])),
            )
            .await
            .unwrap();
        assert_eq!(&r.reads[0][..], &[i; 8]);
        assert_eq!(&rx.recv().await.unwrap().payload[..], &[i]);
    }

    // An unregistered segment stops being served.
    assert!(b.unregister_segment("kv"));
    assert!(matches!(
        a.submit(&desc, Batch::new().read(0, 1)).await,
        Err(TransferError::UnknownSegment(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_round_trips_intact() {
    const TOTAL: usize = 64 << 20;
    const OP: usize = 1 << 20;
    let a = engine().await;
    let b = engine().await;
    let seg = b.register_segment("big", TOTAL).unwrap();
    let desc = b.describe(&seg);
    let data = Bytes::from(pattern(42, TOTAL));
    let sum = fnv1a(&data);

    // Two batches of 32 ops each.
    for half in 0..2 {
        let mut batch = Batch::new();
        for i in 0..TOTAL / OP / 2 {
            let off = (half * TOTAL / 2) + i * OP;
            batch = batch.write(off as u64, data.slice(off..off + OP));
        }
        let r = a.submit(&desc, batch).await.unwrap();
        assert_eq!(r.bytes_written, (TOTAL / 2) as u64);
    }
    assert_eq!(fnv1a(&seg.read(0, TOTAL).unwrap()), sum);

    let mut batch = Batch::new();
    for i in 0..TOTAL / OP {
        batch = batch.read((i * OP) as u64, OP as u64);
    }
    let r = a.submit(&desc, batch).await.unwrap();
    assert_eq!(r.bytes_read, TOTAL as u64);
    let mut back = Vec::with_capacity(TOTAL);
    for chunk in &r.reads {
        back.extend_from_slice(chunk);
    }
    assert_eq!(fnv1a(&back), sum);
    assert!(back == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_batches_to_one_peer() {
    const TASKS: usize = 32;
    const REGION: usize = 64 << 10;
    let a = engine().await;
    let b = engine().await;
    let seg = b.register_segment("kv", TASKS * REGION).unwrap();
    let desc = b.describe(&seg);

    let mut handles = Vec::new();
    for t in 0..TASKS {
        let a = a.clone();
        let desc = desc.clone();
        handles.push(tokio::spawn(async move {
            let data = Bytes::from(pattern(t as u64 + 7, REGION));
            let base = (t * REGION) as u64;
            let half = REGION / 2;
            a.submit(
                &desc,
                Batch::new()
                    .write(base, data.slice(..half))
                    .write(base + half as u64, data.slice(half..)),
            )
            .await
            .unwrap();
            let r = a
                .submit(&desc, Batch::new().read(base, REGION as u64))
                .await
                .unwrap();
            assert_eq!(r.reads[0], data, "task {t}");
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    for t in 0..TASKS {
        assert_eq!(
            seg.read(t * REGION, REGION).unwrap(),
            pattern(t as u64 + 7, REGION),
            "region {t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_shut_down_fails_fast_then_restarted_peer_is_reached() {
    let deadline = Duration::from_secs(2);
    let a = engine_with_timeout(deadline).await;
    let b = engine().await;
    let seg = b.register_segment("kv", 16).unwrap();
    let desc = b.describe(&seg);
    a.submit(&desc, Batch::new().write(0, Bytes::from_static(b"x")))
        .await
        .unwrap();

    // A now holds a pooled connection to B; B goes away.
    b.shutdown();
    b.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let err = a
        .submit(&desc, Batch::new().write(0, Bytes::from_static(b"y")))
        .await
        .unwrap_err();
    assert!(t0.elapsed() < deadline, "took {:?}", t0.elapsed());
    assert!(
        matches!(
            err,
            TransferError::PeerUnavailable(_) | TransferError::Io(_)
        ),
        "{err:?}"
    );
    assert_eq!(seg.read(0, 1).unwrap(), b"x");

    // A dropped engine behaves the same.
    let c = engine().await;
    let cdesc = c.describe(&c.register_segment("kv", 16).unwrap());
    drop(c);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    assert!(a.submit(&cdesc, Batch::new().read(0, 1)).await.is_err());
    assert!(t0.elapsed() < deadline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_within_deadline() {
    let deadline = Duration::from_millis(300);
    let a = engine_with_timeout(deadline).await;
    // Accepts and reads, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut sink = vec![0u8; 1 << 16];
                while s.read(&mut sink).await.map(|n| n > 0).unwrap_or(false) {}
            });
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
        .submit(
            &desc,
            Batch::new().write(0, Bytes::from(vec![1u8; 1 << 20])),
        )
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, TransferError::Timeout), "{err:?}");
    assert!(took >= deadline && took < deadline * 3, "took {took:?}");

    // Nothing listening at all.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = closed.local_addr().unwrap();
    drop(closed);
    let dead = SegmentDesc {
        endpoint: dead_addr.to_string(),
        ..desc
    };
    let t0 = Instant::now();
    assert!(matches!(
        a.submit(&dead, Batch::new().read(0, 1)).await,
        Err(TransferError::PeerUnavailable(_))
    ));
    assert!(t0.elapsed() < deadline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_do_not_hurt_the_server() {
    let a = engine().await;
    let b = engine().await;
    let seg = b.register_segment("kv", 64).unwrap();
    let desc = b.describe(&seg);

    // Header claiming a 4 GiB name and 4 billion ops: the server must answer
    // with a fatal error and close, not try to allocate or wait for it.
    let mut hostile = Vec::new();
    hostile.extend_from_slice(&0x5044_5446u32.to_le_bytes());
    hostile.push(1);
    hostile.push(0);
    hostile.extend_from_slice(&0u16.to_le_bytes());
    hostile.extend_from_slice(&u32::MAX.to_le_bytes());
    hostile.extend_from_slice(&0u32.to_le_bytes());
    hostile.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut s = tokio::net::TcpStream::connect(b.endpoint()).await.unwrap();
    s.write_all(&hostile).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(reply.len() >= 40);
    assert_eq!(reply[5], 4, "fatal status");

    // Garbage and an abrupt close mid-batch.
    let mut s = tokio::net::TcpStream::connect(b.endpoint()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(s);
    let mut s = tokio::net::TcpStream::connect(b.endpoint()).await.unwrap();
    s.write_all(&hostile[..10]).await.unwrap();
    drop(s);

    a.submit(
        &desc,
        Batch::new().write(0, Bytes::from_static(b"still ok")),
    )
    .await
    .unwrap();
    assert_eq!(seg.read(0, 8).unwrap(), b"still ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_on_same_port_is_reached_through_the_pool() {
    let a = engine_with_timeout(Duration::from_secs(5)).await;
    let b = engine().await;
    let listen: std::net::SocketAddr = b.endpoint().parse().unwrap();
    let desc = b.describe(&b.register_segment("kv", 16).unwrap());
    a.submit(&desc, Batch::new().write(0, Bytes::from_static(b"1")))
        .await
        .unwrap();
    drop(b);

    // Same endpoint, new process state: the pooled connection is dead.
    let b2 = {
        let mut tries = 0;
        loop {
            match TransferEngine::start(EngineOptions {
                listen,
                ..tcp_options()
            })
            .await
            {
                Ok(e) => break e,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind failed: {e}"),
            }
        }
    };
    let seg2 = b2.register_segment("kv", 16).unwrap();
    assert_eq!(b2.describe(&seg2), desc);
    a.submit(&desc, Batch::new().write(0, Bytes::from_static(b"2")))
        .await
        .unwrap();
    assert_eq!(seg2.read(0, 1).unwrap(), b"2");
}

/// Forwards connections to `upstream`; the first `kill` of them are reset
/// after `after` bytes from the client, mid-request.
async fn flaky_proxy(upstream: String, kill: usize, after: usize) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            n += 1;
            let doomed = n <= kill;
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(upstream)
                    .await
                    .expect("upstream reachable");
                if doomed {
                    let mut buf = vec![0u8; after];
                    let _ = client.read_exact(&mut buf).await;
                    let _ = server.write_all(&buf[..after / 2]).await;
                    return; // both sockets dropped mid-frame
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_slice_is_retried_on_another_connection() {
    let a = engine().await;
    let b = engine().await;
    let seg = b.register_segment("kv", 8 << 20).unwrap();
    let mut rx = b.take_notifications().unwrap();
    let proxy = flaky_proxy(b.endpoint(), 2, 100 << 10).await;
    let desc = SegmentDesc {
        endpoint: proxy.to_string(),
        ..b.describe(&seg)
    };
    let data = Bytes::from(pattern(77, 8 << 20));
    let r = a
        .submit(
            &desc,
            Batch::new()
                .write(0, data.clone())
                .notify(Bytes::from_static(b"once")),
        )
        .await
        .unwrap();
    assert_eq!(r.bytes_written, 8 << 20);
    assert!(seg.read(0, 8 << 20).unwrap() == data[..]);
    assert_eq!(&rx.recv().await.unwrap().payload[..], b"once");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        rx.try_recv().is_err(),
        "notification delivered exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_peer_is_marked_down_and_fails_fast() {
    let a = engine_with_timeout(Duration::from_secs(5)).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let desc = SegmentDesc {
        name: "kv".into(),
        endpoint: dead.to_string(),
        len: 16,
        transport: TransportKind::Tcp,
    };
    let first = a.submit(&desc, Batch::new().read(0, 1)).await.unwrap_err();
    assert!(
        matches!(first, TransferError::PeerUnavailable(ref m) if !m.contains("marked down")),
        "{first:?}"
    );
    let second = a.submit(&desc, Batch::new().read(0, 1)).await.unwrap_err();
    assert!(
        matches!(second, TransferError::PeerUnavailable(ref m) if m.contains("marked down")),
        "{second:?}"
    );
    // After the back-off a probe goes through again (and fails on connect).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = a.submit(&desc, Batch::new().read(0, 1)).await.unwrap_err();
    assert!(
        matches!(third, TransferError::PeerUnavailable(ref m) if !m.contains("marked down")),
        "{third:?}"
    );
}
