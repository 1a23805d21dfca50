//! An etcd-backed [`MetadataStore`] for deployments with several gateways:
//! every gateway and engine reads and writes the same directory of segment
//! descriptors, and entries written under a lease expire on their own when
//! their owner stops refreshing it (a process that died without cleaning up).
//!
//! It talks to etcd's v3 JSON gateway (`POST /v3/kv/put`, `/v3/kv/range`,
//! `/v3/kv/deleterange`, `/v3/lease/*`) with a deliberately tiny HTTP/1.1
//! client (one request per connection, bounded responses) instead of the
//! gRPC `etcd-client` crate, whose build needs `protoc`. This is the one
//! place in the crate that speaks HTTP, and only behind the cargo feature
//! `etcd`; the data path never touches it. It must never hold a lock across
//! a request, and never trust a response beyond `MAX_RESPONSE` bytes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::TransferError;
use crate::metadata::{MetadataStore, SegmentDesc};

/// Largest etcd response read (a full `list` of 65536 small descriptors).
const MAX_RESPONSE: usize = 64 << 20;
/// Most descriptors `list` returns, like `MemoryRegistry`'s capacity.
const MAX_LIST: usize = 65536;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Descriptors under `prefix` in the etcd cluster at `endpoint`, written
/// with a lease of `ttl` that a background task keeps alive while the store
/// is in use.
pub struct EtcdStore {
    endpoint: String,
    prefix: String,
    lease: i64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn err(msg: impl std::fmt::Display) -> TransferError {
    TransferError::PeerUnavailable(format!("etcd: {msg}"))
}

impl EtcdStore {
    /// Grants a lease of `ttl` (at least 2 s) and starts refreshing it every
    /// third of `ttl` until the returned store is dropped or `close`d.
    /// `endpoint` is "host:port" of an etcd client URL (plain http).
    pub async fn connect(
        endpoint: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<Arc<EtcdStore>, TransferError> {
        let ttl_secs = ttl.as_secs().max(2);
        let r = post(endpoint, "/v3/lease/grant", &json!({"TTL": ttl_secs})).await?;
        let lease = r["ID"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| err(format!("lease grant answered {r}")))?;
        let store = Arc::new(EtcdStore {
            endpoint: endpoint.to_owned(),
            prefix: prefix.to_owned(),
            lease,
        });
        tokio::spawn(keep_alive(
            Arc::downgrade(&store),
            Duration::from_secs(ttl_secs) / 3,
        ));
        Ok(store)
    }

    /// Revokes the lease, deleting every descriptor this store published
    /// (clean process exit).
    pub async fn close(&self) -> Result<(), TransferError> {
        post(
            &self.endpoint,
            "/v3/lease/revoke",
            &json!({"ID": self.lease.to_string()}),
        )
        .await?;
        Ok(())
    }

    fn key(&self, name: &str) -> String {
        B64.encode(format!("{}{name}", self.prefix))
    }
}

async fn keep_alive(store: Weak<EtcdStore>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = store.upgrade() else { return };
        let (endpoint, lease) = (s.endpoint.clone(), s.lease);
        drop(s);
        if let Err(e) = post(
            &endpoint,
            "/v3/lease/keepalive",
            &json!({"ID": lease.to_string()}),
        )
        .await
        {
            tracing::warn!(error = %e, "etcd lease keep-alive failed");
        }
    }
}

/// One past the last key with `prefix`, etcd's way to say "the whole prefix".
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn decode_desc(kv: &Value) -> Result<SegmentDesc, TransferError> {
    let raw = kv["value"]
        .as_str()
        .ok_or_else(|| err("kv without value"))?;
    let bytes = B64
        .decode(raw)
        .map_err(|e| err(format!("bad base64: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| err(format!("bad descriptor: {e}")))
}

#[async_trait::async_trait]
impl MetadataStore for EtcdStore {
    async fn publish(&self, desc: SegmentDesc) -> Result<(), TransferError> {
        let value = serde_json::to_vec(&desc).map_err(err)?;
        post(
            &self.endpoint,
            "/v3/kv/put",
            &json!({"key": self.key(&desc.name), "value": B64.encode(value), "lease": self.lease.to_string()}),
        )
        .await?;
        Ok(())
    }

    async fn lookup(&self, name: &str) -> Result<Option<SegmentDesc>, TransferError> {
        let r = post(
            &self.endpoint,
            "/v3/kv/range",
            &json!({"key": self.key(name)}),
        )
        .await?;
        match r["kvs"].as_array().and_then(|a| a.first()) {
            Some(kv) => decode_desc(kv).map(Some),
            None => Ok(None),
        }
    }

    async fn remove(&self, name: &str) -> Result<(), TransferError> {
        post(
            &self.endpoint,
            "/v3/kv/deleterange",
            &json!({"key": self.key(name)}),
        )
        .await?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<SegmentDesc>, TransferError> {
        let r = post(
            &self.endpoint,
            "/v3/kv/range",
            &json!({"key": B64.encode(&self.prefix), "range_end": B64.encode(prefix_end(&self.prefix)), "limit": MAX_LIST}),
        )
        .await?;
        let mut out = r["kvs"]
            .as_array()
            .map(|a| a.iter().map(decode_desc).collect::<Result<Vec<_>, _>>())
            .transpose()?
            .unwrap_or_default();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// POSTs `body` as JSON and returns the JSON answer of a 200 response.
async fn post(endpoint: &str, path: &str, body: &Value) -> Result<Value, TransferError> {
    tokio::time::timeout(REQUEST_TIMEOUT, post_inner(endpoint, path, body))
        .await
        .map_err(|_| TransferError::Timeout)?
}

async fn post_inner(endpoint: &str, path: &str, body: &Value) -> Result<Value, TransferError> {
    let body = serde_json::to_vec(body).map_err(err)?;
    let mut conn = TcpStream::connect(endpoint)
        .await
        .map_err(|e| err(format!("{endpoint}: {e}")))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&body).await?;
    let mut raw = Vec::new();
    (&mut conn)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut raw)
        .await?;
    if raw.len() > MAX_RESPONSE {
        return Err(err("response too large"));
    }
    let (status, payload) = parse_response(&raw)?;
    let v: Value = serde_json::from_slice(&payload).map_err(|e| err(format!("bad JSON: {e}")))?;
    if status != 200 {
        return Err(err(format!("{path} answered {status}: {v}")));
    }
    Ok(v)
}

/// Splits an HTTP/1.1 response into status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), TransferError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| err("truncated response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| err("bad status line"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| err("truncated chunk size"))?;
        let size_txt = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| err("bad chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size + 2 {
            return Err(err("truncated chunk"));
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, &b[..]), (200, &b"{}"[..]));
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=1\r\n\":1}\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, &b[..]), (404, &br#"{"a":1}"#[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nab")
                .is_err()
        );
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
