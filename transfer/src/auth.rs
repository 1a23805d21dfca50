//! Fleet authentication of the transfer plane: a mutual challenge–response
//! that both ends of every connection (TCP port and shm commit socket alike)
//! run before the first frame, so only holders of the fleet secret can
//! describe a segment, read or write its bytes, ask for its RDMA keys or
//! deliver a notification.
//!
//! The exchange (all fixed-size, so nothing read from a stranger is ever
//! sized by it):
//!
//! ```text
//! client → server  hello      magic "PDTA" u32, version u8, 3 zero bytes, client nonce (32)
//! server → client  challenge  magic, version, 3 zero bytes, server nonce (32),
//!                             HMAC(K, "pdgate transfer server" ‖ 0 ‖ cn ‖ sn)
//! client → server  proof      HMAC(K, "pdgate transfer client" ‖ 0 ‖ cn ‖ sn)
//! server → client  verdict    magic, version, status (0 admitted, 1 busy), 1 zero byte
//! ```
//!
//! `K` = HMAC-SHA256(fleet secret, "pdgate transfer v1"): the transfer
//! plane's own key, so a leaked key of another purpose derived from the
//! same secret opens nothing here. Fresh random nonces on both sides make
//! every proof single-use (no replay); the distinct labels stop a proof of
//! one role being reflected as the other's. The client proves itself only
//! after checking the server's proof, so a server without the key never
//! collects a client proof either. Tags are compared in constant time
//! (`Mac::verify_slice`).
//!
//! This authenticates peers; it does not encrypt or integrity-protect the
//! frames that follow, so on its own an attacker on the path between two
//! fleet members could still read or alter them. With TLS configured
//! (`tls`), this exchange runs inside the TLS session.
//! Every message is flushed before the reply is awaited: under TLS, written
//! bytes may wait in the session until a flush.
//! This module knows sockets only as byte streams and nothing of frames
//! beyond the frame magic (to recognise a peer that skipped the handshake).

use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::TransferError;
use crate::transport::gate::HandshakeOutcome;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted (the fleet secret's own minimum).
pub const MIN_SECRET_LEN: usize = 16;
/// The transfer plane's purpose label in the key derivation.
const KEY_PURPOSE: &[u8] = b"pdgate transfer v1";
const SERVER_LABEL: &[u8] = b"pdgate transfer server";
const CLIENT_LABEL: &[u8] = b"pdgate transfer client";

/// "PDTA": unlike the frame magic "PDTF", so either side can tell a
/// handshake message from a frame by its first four bytes.
const MAGIC: u32 = 0x5044_5441;
const VERSION: u8 = 1;
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
/// Magic, version and three zero bytes: the part of each message read
/// first, so a frame (whose header is longer) is recognised at once.
const PREFIX_LEN: usize = 8;
const HELLO_LEN: usize = PREFIX_LEN + NONCE_LEN;
const CHALLENGE_LEN: usize = PREFIX_LEN + NONCE_LEN + TAG_LEN;
const VERDICT_LEN: usize = 8;
const ADMITTED: u8 = 0;
const BUSY: u8 = 1;

/// The fleet secret as the transfer engine takes it (`EngineOptions::secret`).
/// Never printed: its `Debug` is redacted.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret from its bytes; at least [`MIN_SECRET_LEN`] of them.
    pub fn new(bytes: &[u8]) -> Result<Secret, TransferError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(TransferError::Unauthenticated(format!(
                "a transfer secret must be at least {MIN_SECRET_LEN} bytes (got {})",
                bytes.len()
            )));
        }
        Ok(Secret(bytes.into()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The transfer plane's key, derived once per engine from the secret, held
/// as an HMAC already keyed with it (cloned per proof, so no proof needs a
/// fallible constructor).
#[derive(Clone)]
pub(crate) struct AuthKey(HmacSha256);

impl AuthKey {
    pub(crate) fn derive(secret: &Secret) -> Result<AuthKey, TransferError> {
        let mut m = keyed(&secret.0)?;
        m.update(KEY_PURPOSE);
        Ok(AuthKey(keyed(&m.finalize().into_bytes())?))
    }

    fn mac(&self, label: &[u8], client: &[u8; NONCE_LEN], server: &[u8; NONCE_LEN]) -> HmacSha256 {
        let mut m = self.0.clone();
        for part in [label, &[0], client, server] {
            m.update(part);
        }
        m
    }

    fn proof(
        &self,
        label: &[u8],
        client: &[u8; NONCE_LEN],
        server: &[u8; NONCE_LEN],
    ) -> [u8; TAG_LEN] {
        self.mac(label, client, server)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Constant-time comparison of `got` with the expected tag.
    fn verify(
        &self,
        label: &[u8],
        client: &[u8; NONCE_LEN],
        server: &[u8; NONCE_LEN],
        got: &[u8],
    ) -> bool {
        self.mac(label, client, server).verify_slice(got).is_ok()
    }
}

fn keyed(key: &[u8]) -> Result<HmacSha256, TransferError> {
    // HMAC takes keys of every length; an error here would be a bug in the
    // hmac crate, reported rather than panicked on.
    <HmacSha256 as Mac>::new_from_slice(key)
        .map_err(|e| TransferError::Unauthenticated(format!("transfer key: {e}")))
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    // ThreadRng is a CSPRNG seeded (and periodically reseeded) from the OS.
    rand::rng().fill_bytes(&mut n);
    n
}

fn prefix() -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[..4].copy_from_slice(&MAGIC.to_le_bytes());
    p[4] = VERSION;
    p
}

/// What the first bytes of a handshake message say.
enum Prefix {
    Handshake,
    /// A transfer frame: the peer does not authenticate.
    Frame,
    Other,
}

fn classify(raw: &[u8; PREFIX_LEN]) -> Prefix {
    let magic = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    if magic == crate::wire::MAGIC {
        Prefix::Frame
    } else if magic == MAGIC && raw[4] == VERSION {
        Prefix::Handshake
    } else {
        Prefix::Other
    }
}

/// Why the server side refused a connection.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The client sent a frame: it holds no secret (or predates this).
    NoHandshake,
    /// Not a handshake message of this version.
    Malformed,
    /// The client's proof is wrong: it does not hold the fleet secret.
    BadProof,
    /// The TLS handshake before it failed (set by the caller; this module
    /// runs inside whatever stream it is given).
    Tls(std::io::Error),
    Io(std::io::Error),
}

impl Refusal {
    pub(crate) fn outcome(&self) -> HandshakeOutcome {
        match self {
            Refusal::NoHandshake => HandshakeOutcome::NoHandshake,
            Refusal::Malformed => HandshakeOutcome::Malformed,
            Refusal::BadProof => HandshakeOutcome::BadMac,
            Refusal::Tls(_) => HandshakeOutcome::Tls,
            Refusal::Io(_) => HandshakeOutcome::Aborted,
        }
    }
}

impl From<std::io::Error> for Refusal {
    fn from(e: std::io::Error) -> Self {
        Refusal::Io(e)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoHandshake => f.write_str("peer sent a frame without authenticating"),
            Refusal::Malformed => f.write_str("malformed authentication handshake"),
            Refusal::BadProof => f.write_str("peer does not hold the fleet secret"),
            Refusal::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Refusal::Io(e) => write!(f, "i/o during authentication: {e}"),
        }
    }
}

/// The server's half, up to a verified client proof. The caller then sends
/// the verdict ([`admit`] or [`busy`]); on a refusal it closes the
/// connection (after a frame error for [`Refusal::NoHandshake`], which the
/// caller writes, since frames are not this module's business).
/// Reads from `r` and writes to `w` (the two halves of one connection, so
/// the reader may be the buffered one the frames are read from next).
pub(crate) async fn server<R, W>(r: &mut R, w: &mut W, key: &AuthKey) -> Result<(), Refusal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut head = [0u8; PREFIX_LEN];
    r.read_exact(&mut head).await?;
    match classify(&head) {
        Prefix::Handshake => {}
        Prefix::Frame => return Err(Refusal::NoHandshake),
        Prefix::Other => return Err(Refusal::Malformed),
    }
    let mut client = [0u8; NONCE_LEN];
    r.read_exact(&mut client).await?;
    let server = nonce();
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge[..PREFIX_LEN].copy_from_slice(&prefix());
    challenge[PREFIX_LEN..PREFIX_LEN + NONCE_LEN].copy_from_slice(&server);
    challenge[PREFIX_LEN + NONCE_LEN..].copy_from_slice(&key.proof(SERVER_LABEL, &client, &server));
    w.write_all(&challenge).await?;
    w.flush().await?;
    let mut proof = [0u8; TAG_LEN];
    r.read_exact(&mut proof).await?;
    if !key.verify(CLIENT_LABEL, &client, &server, &proof) {
        return Err(Refusal::BadProof);
    }
    Ok(())
}

/// Tells an authenticated client it may send frames.
pub(crate) async fn admit<S: AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<()> {
    s.write_all(&verdict(ADMITTED)).await?;
    s.flush().await
}

/// Tells an authenticated client this engine has no room for another
/// connection; the caller closes it.
pub(crate) async fn busy<S: AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<()> {
    s.write_all(&verdict(BUSY)).await?;
    s.flush().await
}

fn verdict(status: u8) -> [u8; VERDICT_LEN] {
    let mut v = [0u8; VERDICT_LEN];
    v[..5].copy_from_slice(&prefix()[..5]);
    v[5] = status;
    v
}

/// The client's half: proves the server holds the key, then proves itself,
/// then waits for the verdict. The caller bounds it with a deadline.
pub(crate) async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &AuthKey,
) -> Result<(), TransferError> {
    let client = nonce();
    let mut hello = [0u8; HELLO_LEN];
    hello[..PREFIX_LEN].copy_from_slice(&prefix());
    hello[PREFIX_LEN..].copy_from_slice(&client);
    s.write_all(&hello).await?;
    s.flush().await?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    read_or_refused(s, &mut challenge[..PREFIX_LEN]).await?;
    let mut head = [0u8; PREFIX_LEN];
    head.copy_from_slice(&challenge[..PREFIX_LEN]);
    match classify(&head) {
        Prefix::Handshake => {}
        // An engine without a secret reads our hello as a bad frame and
        // answers with a frame error.
        Prefix::Frame => {
            return Err(TransferError::Unauthenticated(
                "the peer's transfer plane is open (it has no fleet secret); this engine \
                 only talks to peers that prove the fleet secret"
                    .into(),
            ))
        }
        Prefix::Other => {
            return Err(TransferError::Unauthenticated(
                "the peer does not speak the transfer handshake".into(),
            ))
        }
    }
    read_or_refused(s, &mut challenge[PREFIX_LEN..]).await?;
    let mut server = [0u8; NONCE_LEN];
    server.copy_from_slice(&challenge[PREFIX_LEN..PREFIX_LEN + NONCE_LEN]);
    if !key.verify(
        SERVER_LABEL,
        &client,
        &server,
        &challenge[PREFIX_LEN + NONCE_LEN..],
    ) {
        return Err(TransferError::Unauthenticated(
            "the peer could not prove the fleet secret (a different secret, or not a fleet \
             member)"
                .into(),
        ));
    }
    s.write_all(&key.proof(CLIENT_LABEL, &client, &server))
        .await?;
    s.flush().await?;
    let mut v = [0u8; VERDICT_LEN];
    read_or_refused(s, &mut v).await?;
    let mut head = [0u8; PREFIX_LEN];
    head.copy_from_slice(&v);
    match (classify(&head), v[5]) {
        (Prefix::Handshake, ADMITTED) => Ok(()),
        (Prefix::Handshake, BUSY) => Err(TransferError::PeerUnavailable(
            "the peer has no room for another transfer connection".into(),
        )),
        _ => Err(TransferError::Unauthenticated(
            "the peer sent an unknown handshake verdict".into(),
        )),
    }
}

/// A close in the middle of the handshake is not a verdict on our secret:
/// a server with another secret is caught by its proof, and one with ours
/// accepts our proof, so a close means it let go of the connection (evicted
/// for a newer one, at its deadline, shutting down). An i/o error, then,
/// which the caller may answer with a fresh connection: no frame was sent.
async fn read_or_refused<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
) -> Result<(), TransferError> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(std::io::Error::new(
            e.kind(),
            "the peer closed the connection during the authentication handshake",
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &[u8]) -> AuthKey {
        AuthKey::derive(&Secret::new(s).unwrap()).unwrap()
    }

    /// Runs both halves over an in-memory pipe; the server's verdict is
    /// `admit` when it accepted.
    async fn pair(c: AuthKey, s: AuthKey) -> (Result<(), TransferError>, Result<(), Refusal>) {
        let (mut a, b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(b);
            let r = server(&mut rd, &mut wr, &s).await;
            if r.is_ok() {
                admit(&mut wr).await.unwrap();
            }
            r
        });
        let c = client(&mut a, &c).await;
        drop(a);
        (c, server.await.unwrap())
    }

    #[tokio::test]
    async fn same_secret_is_admitted_both_ways() {
        let (c, s) = pair(key(b"0123456789abcdef"), key(b"0123456789abcdef")).await;
        assert!(c.is_ok(), "{c:?}");
        assert!(s.is_ok(), "{s:?}");
    }

    #[tokio::test]
    async fn a_different_secret_is_caught_by_the_client_first() {
        let (c, s) = pair(key(b"0123456789abcdef"), key(b"0123456789abcdeX")).await;
        assert!(
            matches!(c, Err(TransferError::Unauthenticated(ref m)) if m.contains("prove")),
            "{c:?}"
        );
        // The client never sent a proof: the server saw the pipe close.
        assert!(matches!(s, Err(Refusal::Io(_))), "{s:?}");
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_mid_handshake_is_a_path_failure_not_a_verdict() {
        let k = key(b"0123456789abcdef");
        let (mut a, b) = tokio::io::duplex(1024);
        drop(b);
        let r = client(&mut a, &k).await;
        assert!(matches!(r, Err(TransferError::Io(_))), "{r:?}");
    }

    #[tokio::test]
    async fn a_wrong_or_replayed_client_proof_is_refused() {
        let k = key(b"0123456789abcdef");
        let (mut a, b) = tokio::io::duplex(1024);
        let kk = k.clone();
        let server = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(b);
            server(&mut rd, &mut wr, &kk).await
        });
        let mut hello = [0u8; HELLO_LEN];
        hello[..PREFIX_LEN].copy_from_slice(&prefix());
        a.write_all(&hello).await.unwrap();
        let mut ch = [0u8; CHALLENGE_LEN];
        a.read_exact(&mut ch).await.unwrap();
        // The server's own proof sent back as the client's (reflection).
        a.write_all(&ch[PREFIX_LEN + NONCE_LEN..]).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(Refusal::BadProof)));
    }

    #[tokio::test]
    async fn a_frame_instead_of_a_hello_is_recognised() {
        let k = key(b"0123456789abcdef");
        let (mut a, b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(b);
            server(&mut rd, &mut wr, &k).await
        });
        a.write_all(&crate::wire::encode_describe("kv"))
            .await
            .unwrap();
        assert!(matches!(server.await.unwrap(), Err(Refusal::NoHandshake)));
    }

    #[test]
    fn key_is_the_fleet_secrets_transfer_derivation_and_secrets_are_not_printed() {
        let s = Secret::new(b"0123456789abcdef").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert!(Secret::new(b"short").is_err());
        // K = HMAC-SHA256(secret, "pdgate transfer v1"), as FleetSecret::derive
        // computes it (hex there, raw bytes here); proofs are keyed with K.
        let mut k = keyed(b"0123456789abcdef").unwrap();
        k.update(b"pdgate transfer v1");
        let mut by_hand = keyed(&k.finalize().into_bytes()).unwrap();
        by_hand.update(b"pdgate transfer client\0");
        by_hand.update(&[1; NONCE_LEN]);
        by_hand.update(&[2; NONCE_LEN]);
        let expect: [u8; TAG_LEN] = by_hand.finalize().into_bytes().into();
        let derived = AuthKey::derive(&s).unwrap();
        assert_eq!(
            derived.proof(CLIENT_LABEL, &[1; NONCE_LEN], &[2; NONCE_LEN]),
            expect
        );
        assert_ne!(
            key(b"0123456789abcdeX").proof(CLIENT_LABEL, &[1; NONCE_LEN], &[2; NONCE_LEN]),
            expect
        );
    }
}
