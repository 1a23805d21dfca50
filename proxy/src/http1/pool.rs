//! Kept-alive engine connections: a bounded stack of idle ones per scheme and `host:port` (a
//! plain connection never answers for an `https://` engine, nor the other way round).

use bytes::BytesMut;
use parking_lot::Mutex;
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::error::Error;

/// Read buffer growth step: a whole small response head and body in one read.
const READ_CHUNK: usize = 16 * 1024;
/// A connection idle longer than this is checked for a close from the engine before reuse.
const RECHECK_AFTER: Duration = Duration::from_millis(500);

/// One engine connection and the bytes read from it but not consumed yet.
pub(super) struct Conn {
    stream: Stream,
    pub(super) buf: BytesMut,
}

/// A connection to an engine, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// Connects to `authority` (`host:port`), with a TLS handshake when `tls` is given, all
    /// within `timeout`.
    pub(super) async fn connect(
        authority: &str,
        tls: Option<&TlsConnector>,
        timeout: Duration,
    ) -> Result<Conn, Error> {
        let stream = match tokio::time::timeout(timeout, open(authority, tls)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Error::transport(format!("connecting to {authority}: {e}"))),
            Err(_) => {
                return Err(Error::transport(format!(
                    "connecting to {authority}: timed out after {timeout:?}"
                )))
            }
        };
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
        })
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// The request whole, then a flush: over TLS the last record may still sit in the TLS layer
    /// after `write_all` (a no-op on a plain socket).
    pub(super) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads what is there into the buffer; 0 means the engine closed the connection.
    pub(super) async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// False if the engine closed the connection (or sent something unasked) while it sat idle.
    /// Over TLS the socket itself is probed: any bytes there (a close_notify, a late record)
    /// retire the connection, which costs at most a new handshake.
    fn still_open(&self) -> bool {
        let tcp = match &self.stream {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        };
        let mut probe = [0u8; 1];
        matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

async fn open(authority: &str, tls: Option<&TlsConnector>) -> io::Result<Stream> {
    let tcp = TcpStream::connect(authority).await?;
    // Requests are written whole; Nagle would only hold the last segment back.
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    // The name the engine's certificate must carry: the URL's host (a DNS name or an IP).
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS name: {e}")))?;
    let stream = tls.connect(name, tcp).await?;
    Ok(Stream::Tls(Box::new(stream)))
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub(super) struct Pool {
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    max_per_host: usize,
}

struct Idle {
    /// Plain connections by `host:port`.
    by_host: HashMap<String, Vec<(Conn, Instant)>>,
    /// TLS connections by `host:port`: the scheme is half of the key.
    tls_by_host: HashMap<String, Vec<(Conn, Instant)>>,
    /// When expired connections were last dropped across all hosts.
    swept: Instant,
}

impl Pool {
    pub(super) fn new(idle_timeout: Duration, max_per_host: usize) -> Self {
        Self {
            idle: Mutex::new(Idle {
                by_host: HashMap::new(),
                tls_by_host: HashMap::new(),
                swept: Instant::now(),
            }),
            idle_timeout,
            max_per_host,
        }
    }

    /// Idle connections kept, over all hosts.
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        let idle = self.idle.lock();
        idle.by_host
            .values()
            .chain(idle.tls_by_host.values())
            .map(Vec::len)
            .sum()
    }

    /// The most recently used idle connection to `key`, TLS or not, that is still good.
    pub(super) fn take(&self, key: &str, tls: bool) -> Option<Conn> {
        let now = Instant::now();
        loop {
            let (conn, since) = self.idle.lock().hosts(tls).get_mut(key)?.pop()?;
            let idle_for = now.saturating_duration_since(since);
            if idle_for > self.idle_timeout {
                // The rest of the stack is older still.
                self.idle.lock().hosts(tls).remove(key);
                return None;
            }
            if idle_for < RECHECK_AFTER || conn.still_open() {
                return Some(conn);
            }
        }
    }

    pub(super) fn put(&self, key: &str, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        if now.saturating_duration_since(idle.swept) > self.idle_timeout {
            // Engines that went away are never asked for again: their connections go here.
            idle.swept = now;
            let timeout = self.idle_timeout;
            let Idle {
                by_host,
                tls_by_host,
                ..
            } = &mut *idle;
            for hosts in [by_host, tls_by_host] {
                hosts.retain(|_, stack| {
                    stack.retain(|(_, since)| now.saturating_duration_since(*since) <= timeout);
                    !stack.is_empty()
                });
            }
        }
        let hosts = idle.hosts(conn.is_tls());
        let stack = match hosts.get_mut(key) {
            Some(stack) => stack,
            None => hosts.entry(key.to_owned()).or_default(),
        };
        if stack.len() < self.max_per_host {
            stack.push((conn, now));
        }
    }
}

impl Idle {
    fn hosts(&mut self, tls: bool) -> &mut HashMap<String, Vec<(Conn, Instant)>> {
        match tls {
            true => &mut self.tls_by_host,
            false => &mut self.by_host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn conn(listener: &tokio::net::TcpListener) -> Conn {
        let addr = listener.local_addr().expect("addr").to_string();
        Conn::connect(&addr, None, Duration::from_secs(1))
            .await
            .expect("connect")
    }

    #[tokio::test]
    async fn idle_connections_are_capped_per_host_and_expire_even_for_hosts_never_asked_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let pool = Pool::new(Duration::from_millis(200), 2);
        for _ in 0..3 {
            let c = conn(&listener).await;
            pool.put("gone:1", c);
        }
        assert_eq!(pool.idle_count(), 2, "capped at max_per_host");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Only another host is used from now on; the departed host's connections still go.
        let c = conn(&listener).await;
        pool.put("live:1", c);
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.take("gone:1", false).is_none());
        assert!(
            pool.take("live:1", true).is_none(),
            "a plain connection is not a TLS one"
        );
        assert!(pool.take("live:1", false).is_some());
    }
}
