//! The authenticated transfer plane, over real sockets: a peer without the
//! fleet secret, or with another one, can neither describe a segment, read
//! or write its bytes nor deliver a notification, over the TCP port or the
//! shm commit socket; idle connections cannot starve real peers; and a
//! forged shm advert cannot make an engine open an arbitrary path.
//!
//! The raw attacks use a client written here from the protocol's
//! documentation (`auth.rs`, `wire.rs`), not the crate's own, and prove it
//! right against a keyed owner first, so a refusal is never just a broken
//! test client.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use pdgate_transfer::{
    Batch, EngineOptions, Secret, SegmentDesc, TransferEngine, TransferError, TransportChoice,
    TransportKind,
};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const FLEET: &[u8] = b"the-fleet-secret-for-these-tests";
const OTHER: &[u8] = b"some-other-fleets-secret-entirely";

fn options(transport: TransportChoice, secret: Option<&[u8]>) -> EngineOptions {
    EngineOptions {
        transport,
        secret: secret.map(|s| Secret::new(s).unwrap()),
        op_timeout: Duration::from_secs(5),
        ..EngineOptions::default()
    }
}

async fn engine(transport: TransportChoice, secret: Option<&[u8]>) -> Arc<TransferEngine> {
    TransferEngine::start(options(transport, secret))
        .await
        .unwrap()
}

// ------------------------------------------ a client from the spec ---

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The client half of the handshake with `secret`; true when admitted. A
/// wrong secret is played as an attacker would: the server's proof is not
/// checked, ours is sent anyway.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, secret: &[u8]) -> bool {
    let key = hmac(secret, &[b"pdgate transfer v1"]);
    let client = [7u8; 32];
    let mut hello = Vec::new();
    hello.extend_from_slice(&0x5044_5441u32.to_le_bytes());
    hello.extend_from_slice(&[1, 0, 0, 0]);
    hello.extend_from_slice(&client);
    s.write_all(&hello).await.unwrap();
    let mut challenge = [0u8; 72];
    if s.read_exact(&mut challenge).await.is_err() {
        return false;
    }
    let server = &challenge[8..40];
    let proof = hmac(&key, &[b"pdgate transfer client", &[0], &client, server]);
    if s.write_all(&proof).await.is_err() {
        return false;
    }
    let mut verdict = [0u8; 8];
    s.read_exact(&mut verdict).await.is_ok() && verdict[5] == 0
}

const DESCRIBE: u8 = 2;
const NOTIFY: u8 = 1;

/// One request frame: `ops` are (kind 1 write / 2 read, offset, len, payload).
fn frame(segment: &str, flags: u8, notify: &[u8], ops: &[(u8, u64, &[u8])]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&0x5044_5446u32.to_le_bytes());
    f.extend_from_slice(&[1, flags, 0, 0]);
    f.extend_from_slice(&(segment.len() as u32).to_le_bytes());
    f.extend_from_slice(&(notify.len() as u32).to_le_bytes());
    f.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    f.extend_from_slice(segment.as_bytes());
    f.extend_from_slice(notify);
    for (kind, offset, data) in ops {
        f.push(*kind);
        f.extend_from_slice(&offset.to_le_bytes());
        let len = if *kind == 1 { data.len() } else { 4 };
        f.extend_from_slice(&(len as u64).to_le_bytes());
        if *kind == 1 {
            f.extend_from_slice(data);
        }
    }
    f
}

#[derive(Clone, Copy, Debug)]
enum Attack {
    Describe,
    Read,
    Write,
    Notify,
}

impl Attack {
    const ALL: [Attack; 4] = [
        Attack::Describe,
        Attack::Read,
        Attack::Write,
        Attack::Notify,
    ];

    fn frame(self) -> Vec<u8> {
        match self {
            Attack::Describe => frame("kv", DESCRIBE, b"", &[]),
            Attack::Read => frame("kv", 0, b"", &[(2, 0, b"")]),
            Attack::Write => frame("kv", 0, b"", &[(1, 0, b"PWND")]),
            Attack::Notify => frame("kv", NOTIFY, b"forged landing", &[]),
        }
    }
}

/// Sends `attack` (after a handshake with `secret`, if any) and returns every
/// byte the owner answered before closing.
async fn attempt<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    secret: Option<&[u8]>,
    attack: Attack,
) -> Vec<u8> {
    if let Some(secret) = secret {
        // A refused handshake ends here: there is no one to send frames to.
        if !handshake(&mut s, secret).await {
            return Vec::new();
        }
    }
    let _ = s.write_all(&attack.frame()).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    reply
}

/// True when `reply` starts with an ok reply header (status 0).
fn is_ok_reply(reply: &[u8]) -> bool {
    reply.len() >= 40 && reply[..4] == 0x5044_5446u32.to_le_bytes() && reply[5] == 0
}

/// The attacks against one owner listener, by a client with no secret and
/// by one with another fleet's: every one is refused and counted, and none
/// reads, writes or notifies anything.
async fn attacks_are_refused<S, F, Fut>(owner: &TransferEngine, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let seg = owner.segment("kv").unwrap();
    seg.write(0, b"SAFE").unwrap();
    let before = owner.admission_stats().refused;
    let mut tried = 0;
    for secret in [None, Some(OTHER)] {
        for attack in Attack::ALL {
            let reply = attempt(connect().await, secret, attack).await;
            tried += 1;
            assert!(
                !is_ok_reply(&reply),
                "{attack:?} with {:?} was answered ok: {:?}",
                secret.map(String::from_utf8_lossy),
                String::from_utf8_lossy(&reply)
            );
            // Nothing of the segment leaks either: no advert, no bytes.
            let text = String::from_utf8_lossy(&reply);
            assert!(
                !text.contains("generation") && !text.contains("SAFE"),
                "{text}"
            );
        }
    }
    assert_eq!(seg.read(0, 4).unwrap(), b"SAFE", "no write landed");
    assert_eq!(
        owner.admission_stats().refused - before,
        tried,
        "each refused connection is counted"
    );
}

/// The owner's answer to a keyed client written from the spec: every
/// attack works with the right secret, so the refusals above are the
/// owner's doing.
async fn the_spec_client_is_right<S, F, Fut>(owner: &TransferEngine, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    for attack in Attack::ALL {
        let mut s = connect().await;
        assert!(handshake(&mut s, FLEET).await, "{attack:?}: admitted");
        s.write_all(&attack.frame()).await.unwrap();
        let mut head = [0u8; 40];
        s.read_exact(&mut head).await.unwrap();
        assert!(is_ok_reply(&head), "{attack:?}: {head:?}");
    }
    assert_eq!(owner.segment("kv").unwrap().read(0, 4).unwrap(), b"PWND");
}

// ------------------------------------------------------------ tests ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_describe_read_write_or_notify_over_tcp() {
    let owner = engine(TransportChoice::Tcp, Some(FLEET)).await;
    let mut rx = owner.take_notifications().unwrap();
    let seg = owner.register_segment("kv", 4096).unwrap();
    let desc = owner.describe(&seg);
    let addr = owner.endpoint();
    attacks_are_refused(&owner, || async {
        TcpStream::connect(&addr).await.unwrap()
    })
    .await;

    // The crate's own client without the secret, and with another one.
    for secret in [None, Some(OTHER)] {
        let stranger = engine(TransportChoice::Tcp, secret).await;
        let d = stranger.discover(&addr, "kv").await;
        match secret {
            // Told why: this plane wants the fleet secret.
            None => assert!(
                matches!(&d, Err(TransferError::Remote(m)) if m.contains("fleet secret")),
                "{d:?}"
            ),
            // The owner cannot prove our (other) secret: we stop first.
            Some(_) => assert!(
                matches!(&d, Err(TransferError::Unauthenticated(_))),
                "{d:?}"
            ),
        }
        let batches = [
            Batch::new().read(0, 4),
            Batch::new().write(0, Bytes::from_static(b"PWND")),
            Batch::new().notify(Bytes::from_static(b"forged landing")),
        ];
        for b in batches {
            let r = stranger.submit(&desc, b).await;
            assert!(r.is_err(), "{r:?}");
        }
    }
    assert_eq!(seg.read(0, 4).unwrap(), b"SAFE");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_err(), "no forged notification delivered");

    // A fleet member works, and so does the spec client with the secret.
    let member = engine(TransportChoice::Tcp, Some(FLEET)).await;
    assert_eq!(member.discover(&addr, "kv").await.unwrap().len, 4096);
    let r = member
        .submit(
            &desc,
            Batch::new()
                .write(8, Bytes::from_static(b"ok"))
                .read(0, 4)
                .notify(Bytes::from_static(b"landed")),
        )
        .await
        .unwrap();
    assert_eq!(&r.reads[0][..], b"SAFE");
    assert_eq!(&rx.recv().await.unwrap().payload[..], b"landed");
    the_spec_client_is_right(&owner, || async {
        TcpStream::connect(&addr).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_use_the_shm_commit_socket() {
    let owner = engine(TransportChoice::Shm, Some(FLEET)).await;
    let mut rx = owner.take_notifications().unwrap();
    let seg = owner.register_segment("kv", 4096).unwrap();
    // Its name is guessable by anyone who can list /dev/shm.
    let path: PathBuf = owner.control_socket().unwrap().to_path_buf();
    attacks_are_refused(&owner, || async {
        UnixStream::connect(&path).await.unwrap()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_err(), "no forged notification delivered");

    // A fleet member maps the segment and commits over this socket.
    let member = engine(TransportChoice::Shm, Some(FLEET)).await;
    let r = member
        .submit(
            &owner.describe(&seg),
            Batch::new()
                .write(8, Bytes::from_static(b"ok"))
                .notify(Bytes::from_static(b"landed")),
        )
        .await
        .unwrap();
    assert_eq!(r.transport, TransportKind::Shm);
    assert_eq!(&rx.recv().await.unwrap().payload[..], b"landed");
    assert_eq!(seg.read(8, 2).unwrap(), b"ok");
    the_spec_client_is_right(&owner, || async {
        UnixStream::connect(&path).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_engine_and_a_keyed_one_do_not_talk() {
    // A keyed engine refuses to use an open peer: its adverts and
    // acknowledgements are unauthenticated.
    let open = engine(TransportChoice::Tcp, None).await;
    let seg = open.register_segment("kv", 64).unwrap();
    let keyed = engine(TransportChoice::Tcp, Some(FLEET)).await;
    let r = keyed
        .submit(
            &open.describe(&seg),
            Batch::new().write(0, Bytes::from_static(b"x")),
        )
        .await;
    assert!(
        matches!(&r, Err(TransferError::Unauthenticated(m)) if m.contains("open")),
        "{r:?}"
    );
    assert_eq!(seg.read(0, 1).unwrap(), b"\0");
    // Two open engines still talk, as before the fleet secret existed.
    let other = engine(TransportChoice::Tcp, None).await;
    other
        .submit(
            &open.describe(&seg),
            Batch::new().write(0, Bytes::from_static(b"y")),
        )
        .await
        .unwrap();
    assert_eq!(seg.read(0, 1).unwrap(), b"y");
}

/// Finding 9: 1,024 idle connections used to take every connection slot, so a
/// real peer's describe went unanswered.
async fn idle_connections_do_not_starve_a_real_peer(secret: Option<&[u8]>) {
    const IDLE: usize = 1024;
    let deadline = Duration::from_secs(2);
    let owner = TransferEngine::start(EngineOptions {
        handshake_timeout: deadline,
        ..options(TransportChoice::Tcp, secret)
    })
    .await
    .unwrap();
    owner.register_segment("kv", 4096).unwrap();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(owner.endpoint()).await.unwrap());
    }
    let peer = engine(TransportChoice::Tcp, secret).await;
    let t0 = Instant::now();
    let desc = tokio::time::timeout(
        Duration::from_secs(5),
        peer.discover(&owner.endpoint(), "kv"),
    )
    .await
    .expect("describe answered despite 1024 idle connections")
    .unwrap();
    assert!(t0.elapsed() < deadline, "took {:?}", t0.elapsed());
    peer.submit(&desc, Batch::new().write(0, Bytes::from_static(b"in")))
        .await
        .unwrap();
    // Every idle socket is closed: evicted by newer ones, or at the deadline.
    let t0 = Instant::now();
    for s in &mut idle {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(deadline * 2, s.read(&mut b)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "an idle socket was kept: {n:?}"
        );
    }
    assert!(t0.elapsed() < deadline * 2);
    // The gate counts a socket after closing it, so the last count may trail the close a client saw.
    let mut s = owner.admission_stats();
    for _ in 0..100 {
        if s.evicted + s.timed_out == IDLE as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = owner.admission_stats();
    }
    assert_eq!(s.evicted + s.timed_out, IDLE as u64, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_a_real_peer_keyed() {
    idle_connections_do_not_starve_a_real_peer(Some(FLEET)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_a_real_peer_open() {
    idle_connections_do_not_starve_a_real_peer(None).await;
}

// ------------------------------------------------ forged shm adverts ---

/// Answers describe requests with `advert` and acknowledges every other
/// request (the shm commit) with an empty ok: an owner that lies about where
/// its segment lives. Open plane, so the lie is all the attacker needs.
async fn lying_owner(advert: serde_json::Value) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let advert = serde_json::to_vec(&advert).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let advert = advert.clone();
            tokio::spawn(async move {
                loop {
                    let mut h = [0u8; 20];
                    if s.read_exact(&mut h).await.is_err() {
                        return;
                    }
                    let flags = h[5];
                    let len = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().unwrap());
                    let rest = len(8) + len(12) + if flags & 4 != 0 { 8 } else { 0 };
                    let mut skip = vec![0u8; rest as usize];
                    s.read_exact(&mut skip).await.unwrap();
                    let msg: &[u8] = if flags & DESCRIBE != 0 { &advert } else { b"" };
                    let mut reply = Vec::new();
                    reply.extend_from_slice(&0x5044_5446u32.to_le_bytes());
                    reply.extend_from_slice(&[1, 0, 0, 0]);
                    reply.extend_from_slice(&0u32.to_le_bytes());
                    reply.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                    reply.extend_from_slice(&[0u8; 24]);
                    reply.extend_from_slice(msg);
                    s.write_all(&reply).await.unwrap();
                }
            });
        }
    });
    addr
}

fn host_id() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap().trim().to_owned();
    format!(
        "{}/{}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

fn forged_advert(path: &Path, len: u64) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt;
    // The inode of whatever the path names (a link's target, as `open` sees it).
    let inode = std::fs::metadata(path).unwrap().ino();
    serde_json::json!({
        "name": "kv", "len": len, "generation": 1,
        "shm": {"path": path.to_str().unwrap(), "host": host_id(), "inode": inode}
    })
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pdgate-forged-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_advert_cannot_make_an_engine_open_a_fifo() {
    let dir = temp_dir("fifo");
    // Named like a segment file, so only what it is gives it away.
    let fifo = dir.join("pdgate-1-0-kv");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // A reader's open of a FIFO returns once someone opens it for writing:
    // exactly what the engine must not do.
    let opened_for_writing = Arc::new(AtomicBool::new(false));
    let reader = {
        let (fifo, flag) = (fifo.clone(), opened_for_writing.clone());
        std::thread::spawn(move || {
            let f = std::fs::File::open(&fifo);
            flag.store(true, Ordering::SeqCst);
            drop(f);
        })
    };
    let owner = lying_owner(forged_advert(&fifo, 4096)).await;
    let submitter = engine(TransportChoice::Shm, None).await;
    let desc = SegmentDesc {
        name: "kv".into(),
        endpoint: owner,
        len: 4096,
        transport: TransportKind::Shm,
    };
    let r = submitter
        .submit(&desc, Batch::new().write(0, Bytes::from_static(b"x")))
        .await;
    assert!(matches!(&r, Err(TransferError::Unsupported(_))), "{r:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !opened_for_writing.load(Ordering::SeqCst),
        "the engine opened the advert's FIFO for writing"
    );
    // Release the reader: open the FIFO for writing ourselves.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        reader.join().unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_advert_cannot_make_an_engine_write_through_a_link() {
    let dir = temp_dir("link");
    // A file that looks like a live segment (magic, state word "live")...
    let victim = dir.join("victim");
    let mut body = vec![0u8; 4096 + 64];
    body[..8].copy_from_slice(b"PDGSHM01");
    body[8..16].copy_from_slice(&1u64.to_le_bytes());
    std::fs::write(&victim, &body).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // ... reached through a link named like a segment file.
    let link = dir.join("pdgate-1-0-kv");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let owner = lying_owner(forged_advert(&link, 64)).await;
    let submitter = engine(TransportChoice::Shm, None).await;
    let desc = SegmentDesc {
        name: "kv".into(),
        endpoint: owner,
        len: 64,
        transport: TransportKind::Shm,
    };
    let r = submitter
        .submit(&desc, Batch::new().write(0, Bytes::from_static(b"PWND")))
        .await;
    assert!(matches!(&r, Err(TransferError::Unsupported(_))), "{r:?}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        body,
        "nothing written through the link"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
