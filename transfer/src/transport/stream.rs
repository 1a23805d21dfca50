//! The byte streams the frame protocol (`wire`) runs over: TCP to any peer,
//! and a Unix socket to a peer on this host. Shared memory moves the bytes
//! between processes of one host, but each batch still needs a commit and an
//! acknowledgement through the owner; over a Unix socket that round trip
//! skips the TCP/IP stack, which costs about twice as much CPU on loopback.
//!
//! A TCP connection may carry TLS (`tls`); then frames are read and written
//! through the session, and the server's zero-copy paths (`try_read` into
//! segment memory) give way to a copy through a buffer ([`ReadHalf::raw`]).
//!
//! Which kind of socket to open is in the type ([`Addr`]), never parsed out of
//! an endpoint string: endpoints arrive from the network (descriptors,
//! registries), and none of them may make an engine open a local socket.
//! Nothing here knows about frames or segments.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, unix, TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsStream;

use crate::error::TransferError;

/// Where a peer's transfer listener is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Addr<'a> {
    /// `host:port`.
    Tcp(&'a str),
    /// A same-host owner's commit socket, learned from its shm advert.
    Unix(&'a Path),
}

impl fmt::Display for Addr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(endpoint) => f.write_str(endpoint),
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connection to a peer's transfer listener.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: a session's buffers are large, and most streams are not TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    pub(crate) async fn connect(addr: Addr<'_>) -> Result<Stream, TransferError> {
        let unavailable = |e: io::Error| TransferError::PeerUnavailable(format!("{addr}: {e}"));
        match addr {
            Addr::Unix(path) => Ok(Stream::Unix(
                UnixStream::connect(path).await.map_err(unavailable)?,
            )),
            Addr::Tcp(endpoint) => {
                let conn = TcpStream::connect(endpoint).await.map_err(unavailable)?;
                conn.set_nodelay(true)?;
                Ok(Stream::Tcp(conn))
            }
        }
    }

    /// Non-blocking read, for probing an idle connection for a close. On a
    /// TLS connection it reads the socket under the session: any byte there
    /// (a close_notify, an alert) means the connection is done with, as the
    /// server sends nothing unasked (no session tickets).
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(buf),
            Stream::Unix(s) => s.try_read(buf),
            Stream::Tls(s) => s.get_ref().0.try_read(buf),
        }
    }

    /// The plain TCP stream under this one, for the TLS handshake.
    pub(crate) fn into_tcp(self) -> Option<TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) | Stream::Tls(_) => None,
        }
    }

    /// The peer's host, for per-host accounting: its IP, or `local` for a
    /// Unix socket.
    pub(crate) fn peer_host(&self) -> Option<String> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.ip().to_string()),
            Stream::Unix(_) => Some("local".to_owned()),
            Stream::Tls(s) => s.get_ref().0.peer_addr().ok().map(|a| a.ip().to_string()),
        }
    }

    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

/// A transfer listener: the engine's TCP port, or its Unix socket.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub(crate) async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "set_nodelay failed");
                }
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }
}

pub(crate) enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// A socket's read side as the kernel sees it: bytes read from it are the
/// peer's bytes, so they may go straight into segment memory.
pub(crate) enum RawRead<'a> {
    Tcp(&'a tcp::OwnedReadHalf),
    Unix(&'a unix::OwnedReadHalf),
}

impl ReadHalf {
    /// The socket itself, unless a TLS session sits between it and the
    /// frames (then there is no zero-copy read).
    pub(crate) fn raw(&self) -> Option<RawRead<'_>> {
        match self {
            ReadHalf::Tcp(h) => Some(RawRead::Tcp(h)),
            ReadHalf::Unix(h) => Some(RawRead::Unix(h)),
            ReadHalf::Tls(_) => None,
        }
    }
}

impl RawRead<'_> {
    pub(crate) async fn readable(&self) -> io::Result<()> {
        match self {
            RawRead::Tcp(h) => h.readable().await,
            RawRead::Unix(h) => h.readable().await,
        }
    }

    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            RawRead::Tcp(h) => h.try_read(buf),
            RawRead::Unix(h) => h.try_read(buf),
        }
    }
}

pub(crate) enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

/// A socket's write side as the kernel sees it (see [`RawRead`]).
pub(crate) enum RawWrite<'a> {
    Tcp(&'a tcp::OwnedWriteHalf),
    Unix(&'a unix::OwnedWriteHalf),
}

impl WriteHalf {
    /// The socket itself, unless a TLS session sits in between.
    pub(crate) fn raw(&self) -> Option<RawWrite<'_>> {
        match self {
            WriteHalf::Tcp(h) => Some(RawWrite::Tcp(h)),
            WriteHalf::Unix(h) => Some(RawWrite::Unix(h)),
            WriteHalf::Tls(_) => None,
        }
    }
}

impl RawWrite<'_> {
    pub(crate) async fn writable(&self) -> io::Result<()> {
        match self {
            RawWrite::Tcp(h) => h.writable().await,
            RawWrite::Unix(h) => h.writable().await,
        }
    }

    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            RawWrite::Tcp(h) => h.try_write(buf),
            RawWrite::Unix(h) => h.try_write(buf),
        }
    }
}

// The stream types are all Unpin, so each poll delegates through Pin::new.
// (`Box<TlsStream>` and tokio's split halves are Unpin too.)
macro_rules! delegate_read {
    ($ty:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Unix(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($ty:ident) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Unix(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_flush(cx),
                    $ty::Unix(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Unix(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(Stream);
delegate_write!(Stream);
delegate_read!(ReadHalf);
delegate_write!(WriteHalf);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn unix_endpoint_connects_and_carries_bytes_both_ways() {
        let dir = std::env::temp_dir().join(format!("pdgate-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.sock");
        let _ = std::fs::remove_file(&path);
        let listener = Listener::Unix(UnixListener::bind(&path).unwrap());
        let server = tokio::spawn(async move {
            let (mut rd, mut wr) = listener.accept().await.unwrap().into_split();
            let mut buf = [0u8; 4];
            rd.read_exact(&mut buf).await.unwrap();
            wr.write_all(&buf).await.unwrap();
        });
        let mut c = Stream::connect(Addr::Unix(&path)).await.unwrap();
        assert_eq!(c.peer_host().as_deref(), Some("local"));
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.await.unwrap();
        let gone = Stream::connect(Addr::Unix(&dir.join("none.sock"))).await;
        assert!(matches!(gone, Err(TransferError::PeerUnavailable(m)) if m.starts_with("unix:")));
        // An endpoint string is only ever a TCP address, whatever it looks like.
        let spoofed = format!("unix:{}", path.display());
        assert!(matches!(
            Stream::connect(Addr::Tcp(&spoofed)).await,
            Err(TransferError::PeerUnavailable(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
