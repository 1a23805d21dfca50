//! Kept-alive engine connections: a bounded stack of idle ones per `host:port`.

use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::Error;

/// Read buffer growth step: a whole small response head and body in one read.
const READ_CHUNK: usize = 16 * 1024;
/// A connection idle longer than this is checked for a close from the engine before reuse.
const RECHECK_AFTER: Duration = Duration::from_millis(500);

/// One engine connection and the bytes read from it but not consumed yet.
pub(super) struct Conn {
    stream: TcpStream,
    pub(super) buf: BytesMut,
}

impl Conn {
    pub(super) async fn connect(authority: &str, timeout: Duration) -> Result<Conn, Error> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Error::transport(format!("connecting to {authority}: {e}")));
            }
            Err(_) => {
                return Err(Error::transport(format!(
                    "connecting to {authority}: timed out after {timeout:?}"
                )))
            }
        };
        // Requests are written whole; Nagle would only hold the last segment back.
        stream.set_nodelay(true).map_err(Error::transport)?;
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
        })
    }

    pub(super) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads what is there into the buffer; 0 means the engine closed the connection.
    pub(super) async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// False if the engine closed the connection (or sent something unasked) while it sat idle.
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

pub(super) struct Pool {
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    max_per_host: usize,
}

struct Idle {
    by_host: HashMap<String, Vec<(Conn, Instant)>>,
    /// When expired connections were last dropped across all hosts.
    swept: Instant,
}

impl Pool {
    pub(super) fn new(idle_timeout: Duration, max_per_host: usize) -> Self {
        Self {
            idle: Mutex::new(Idle {
                by_host: HashMap::new(),
                swept: Instant::now(),
            }),
            idle_timeout,
            max_per_host,
        }
    }

    /// Idle connections kept, over all hosts.
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.idle.lock().by_host.values().map(Vec::len).sum()
    }

    /// The most recently used idle connection to `key` that is still good, if any.
    pub(super) fn take(&self, key: &str) -> Option<Conn> {
        let now = Instant::now();
        loop {
            let (conn, since) = self.idle.lock().by_host.get_mut(key)?.pop()?;
            let idle_for = now.saturating_duration_since(since);
            if idle_for > self.idle_timeout {
                // The rest of the stack is older still.
                self.idle.lock().by_host.remove(key);
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
            idle.by_host.retain(|_, stack| {
                stack.retain(|(_, since)| now.saturating_duration_since(*since) <= timeout);
                !stack.is_empty()
            });
        }
        let stack = match idle.by_host.get_mut(key) {
            Some(stack) => stack,
            None => idle.by_host.entry(key.to_owned()).or_default(),
        };
        if stack.len() < self.max_per_host {
            stack.push((conn, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn conn(listener: &tokio::net::TcpListener) -> Conn {
        let addr = listener.local_addr().expect("addr").to_string();
        Conn::connect(&addr, Duration::from_secs(1))
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
        assert!(pool.take("gone:1").is_none());
        assert!(pool.take("live:1").is_some());
    }
}
