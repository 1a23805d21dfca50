//! Mutual TLS on the TCP transport, over real sockets, with certificates
//! from test CAs made here (rcgen): a transfer between two TLS engines moves
//! the bytes and the notification, and what crosses the wire is not them; a
//! peer whose certificate is from another CA is refused, whichever side it
//! is on; a plain-TCP peer, an engine or a hand-written frame, is refused by
//! a TLS listener. Every engine also holds the fleet secret, so the HMAC
//! handshake runs inside the session, as in production.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use pdgate_transfer::{
    Batch, EngineOptions, HandshakeOutcome, Secret, SegmentDesc, TlsIdentity, TransferEngine,
    TransferError, TransportChoice, TransportKind,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const FLEET: &[u8] = b"the-fleet-secret-for-these-tests";

/// A CA, able to issue engine certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// An engine identity: a certificate for 127.0.0.1 and localhost, for
    /// both server and client use, signed by this CA; trusting `trust`.
    fn identity(&self, trust: &Ca) -> TlsIdentity {
        let mut p = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        TlsIdentity::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            trust.cert.pem().as_bytes(),
        )
        .unwrap()
    }
}

async fn engine(tls: Option<TlsIdentity>) -> Arc<TransferEngine> {
    TransferEngine::start(EngineOptions {
        transport: TransportChoice::Tcp,
        secret: Some(Secret::new(FLEET).unwrap()),
        tls,
        op_timeout: Duration::from_secs(10),
        ..EngineOptions::default()
    })
    .await
    .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Forwards one listener's connections to `to`, recording every byte that
/// passes either way.
async fn recording_relay(to: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            let outbound = TcpStream::connect(&to).await.unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut r, mut w) in [
                (
                    Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(ro), Box::new(wi)),
            ] {
                let rec = rec.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        rec.lock().extend_from_slice(&buf[..n]);
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = w.shutdown().await;
                });
            }
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_transfer_between_two_engines_moves_the_bytes_encrypted() {
    let ca = Ca::new("fleet");
    let owner = engine(Some(ca.identity(&ca))).await;
    let submitter = engine(Some(ca.identity(&ca))).await;
    let seg = owner.register_segment("kv", 8 << 20).unwrap();
    let mut notes = owner.take_notifications().unwrap();
    // Through a relay that records the wire, so "encrypted" is checked, not assumed.
    let (relay, wire) = recording_relay(owner.endpoint()).await;
    let target = SegmentDesc {
        endpoint: relay,
        ..owner.describe(&seg)
    };
    // Large enough to be cut into slices over several pooled connections.
    let big = pattern(3 << 20, 7);
    let small = pattern(4096, 99);
    let r = submitter
        .submit(
            &target,
            Batch::new()
                .write(0, Bytes::from(big.clone()))
                .write(5 << 20, Bytes::from(small.clone()))
                .read(5 << 20, 4096)
                .notify(Bytes::from_static(b"landed over tls")),
        )
        .await
        .unwrap();
    assert_eq!(r.transport, TransportKind::Tcp);
    assert_eq!(r.bytes_written, (big.len() + small.len()) as u64);
    assert_eq!(&r.reads[0][..], &small[..]);
    assert_eq!(seg.read(0, big.len()).unwrap(), big);
    let n = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&n.payload[..], b"landed over tls");
    // A second batch reuses a pooled TLS connection.
    let again = submitter
        .submit(&target, Batch::new().read(0, 1 << 20))
        .await
        .unwrap();
    assert_eq!(&again.reads[0][..], &big[..1 << 20]);

    let seen = wire.lock().clone();
    assert!(seen.len() > big.len(), "the relay saw the transfer");
    let needle = &small[..64];
    assert!(
        !seen.windows(needle.len()).any(|w| w == needle),
        "payload bytes crossed the wire in clear"
    );
    for clear in [&b"PDTF"[..], b"PDTA", b"landed over tls"] {
        assert!(
            !seen.windows(clear.len()).any(|w| w == clear),
            "{:?} crossed the wire in clear",
            String::from_utf8_lossy(clear)
        );
    }
    let s = owner.admission_stats();
    assert!(s.handshakes(HandshakeOutcome::Accepted) >= 2, "{s:?}");
    assert_eq!(s.handshakes(HandshakeOutcome::Tls), 0, "{s:?}");
    owner.shutdown();
    submitter.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_is_refused_either_way() {
    let fleet = Ca::new("fleet");
    let rogue = Ca::new("rogue");
    let owner = engine(Some(fleet.identity(&fleet))).await;
    let seg = owner.register_segment("kv", 1 << 20).unwrap();
    let target = owner.describe(&seg);

    // A client whose certificate the owner does not trust (it trusts the owner's CA).
    let intruder = engine(Some(rogue.identity(&fleet))).await;
    let r = intruder
        .submit(&target, Batch::new().write(0, Bytes::from_static(b"PWND")))
        .await;
    assert!(
        matches!(&r, Err(TransferError::Unauthenticated(m)) if m.contains("TLS")),
        "{r:?}"
    );
    assert_eq!(seg.read(0, 4).unwrap(), [0; 4]);
    let s = owner.admission_stats();
    assert!(s.handshakes(HandshakeOutcome::Tls) >= 1, "{s:?}");
    assert_eq!(s.handshakes(HandshakeOutcome::Accepted), 0, "{s:?}");

    // A server whose certificate the client does not trust: the client refuses it.
    let impostor = engine(Some(rogue.identity(&fleet))).await;
    let fake = impostor.register_segment("kv", 1 << 20).unwrap();
    let honest = engine(Some(fleet.identity(&fleet))).await;
    let r = honest
        .submit(
            &impostor.describe(&fake),
            Batch::new().write(0, Bytes::from_static(b"secret kv")),
        )
        .await;
    assert!(
        matches!(&r, Err(TransferError::Unauthenticated(m)) if m.contains("TLS")),
        "{r:?}"
    );
    assert_eq!(fake.read(0, 9).unwrap(), [0; 9]);
    for e in [owner, intruder, impostor, honest] {
        e.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tcp_peer_is_refused_by_a_tls_listener() {
    let ca = Ca::new("fleet");
    let owner = engine(Some(ca.identity(&ca))).await;
    let seg = owner.register_segment("kv", 1 << 20).unwrap();

    // An engine with the fleet secret but no TLS.
    let plain = engine(None).await;
    let r = plain
        .submit(
            &owner.describe(&seg),
            Batch::new().write(0, Bytes::from_static(b"PWND")),
        )
        .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(seg.read(0, 4).unwrap(), [0; 4]);

    // A hand-written describe frame on a plain socket: no advert comes back.
    let mut s = TcpStream::connect(owner.endpoint()).await.unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(&0x5044_5446u32.to_le_bytes());
    f.extend_from_slice(&[1, 2, 0, 0]);
    f.extend_from_slice(&2u32.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(b"kv");
    s.write_all(&f).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(
        !got.windows(2).any(|w| w == b"kv"),
        "the listener answered a plain frame: {got:?}"
    );
    let stats = owner.admission_stats();
    assert!(stats.handshakes(HandshakeOutcome::Tls) >= 2, "{stats:?}");
    assert_eq!(stats.admitted, 0, "{stats:?}");
    owner.shutdown();
    plain.shutdown();
}
