//! Frame layout of the TCP transport, and its encoder/decoder.
//!
//! This module defines bytes on the wire and nothing else: it never touches a
//! segment and never opens a socket. Its one safety duty is that every length
//! read from a peer is checked against the `limits` *before* anything is
//! allocated or read for it, so a hostile peer cannot make us allocate
//! unbounded memory.
//!
//! # Protocol (version 1, all integers little-endian)
//!
//! A connection carries one batch at a time: the client sends a whole
//! request, the server answers with a whole reply, then the connection is
//! reusable for the next batch. Between engines holding a fleet secret, the
//! authentication handshake (`auth`, its own fixed-size messages) comes
//! first on every connection; a server that has a secret answers a request
//! sent without it with a fatal reply and closes.
//!
//! Request:
//! ```text
//! header (20 bytes)
//!   magic      u32  = 0x5044_5446 ("PDTF")
//!   version    u8   = 1
//!   flags      u8   bit 0: a notification is present
//!                   bit 1: describe (handshake): n_ops = 0, no notification;
//!                          the reply is ok with msg_len bytes of JSON advert
//!                   bit 2: an expected segment generation (u64) follows the
//!                          notify bytes; a mismatch fails as unknown segment
//!                   bit 3: rdma connect (cargo feature `rdma` only; a build
//!                          without it rejects the flag as unknown): n_ops = 0,
//!                          bit 0 set, the notify bytes carry a JSON
//!                          `rdma::session::ConnectRequest`; the reply is ok
//!                          with msg_len bytes of JSON `ConnectReply`
//!   reserved   u16  = 0
//!   name_len   u32  <= 256       segment name, UTF-8
//!   notify_len u32  <= 4096      0 when flag bit 0 is clear
//!   n_ops      u32  <= 65536
//! name bytes, notify bytes, [generation u64]
//! n_ops times:
//!   op header (17 bytes): kind u8 (1 write, 2 read), offset u64, len u64 (<= 1 GiB)
//!   write ops only: `len` payload bytes
//! ```
//!
//! Reply:
//! ```text
//! header (40 bytes)
//!   magic    u32, version u8
//!   status   u8   0 ok, 1 unknown segment, 2 out of bounds, 3 error,
//!                 4 fatal error (server closes the connection after the reply)
//!   reserved u16
//!   n_reads  u32  ok: number of read payloads that follow
//!   msg_len  u32  error: length of the message that follows (<= 4096)
//!   a        u64  ok: total read bytes; out of bounds: offset
//!   b        u64  out of bounds: len
//!   c        u64  out of bounds: segment length
//! ok:    the read payloads back to back, in op order (lengths are those requested)
//! error: msg bytes (segment name for status 1 and 2, error text otherwise)
//! ```
//!
//! Apply semantics (see `batch`): writes in op order, stop at the first
//! failing op, reads served after all writes, notification delivered after
//! the writes and before the reply. On a non-fatal error the server still
//! drains the rest of the request so the connection stays in sync.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::batch::{Batch, Op};
use crate::error::TransferError;
use crate::limits::{
    MAX_MESSAGE_LEN, MAX_NOTIFY_LEN, MAX_OPS_PER_BATCH, MAX_OP_LEN, MAX_SEGMENT_NAME_LEN,
};

pub const MAGIC: u32 = 0x5044_5446;
pub const VERSION: u8 = 1;

pub const REQUEST_HEADER_LEN: usize = 20;
pub const OP_HEADER_LEN: usize = 17;
pub const REPLY_HEADER_LEN: usize = 40;

const FLAG_NOTIFY: u8 = 1;
const FLAG_DESCRIBE: u8 = 2;
const FLAG_GENERATION: u8 = 4;
#[cfg(feature = "rdma")]
const FLAG_RDMA_CONNECT: u8 = 8;
#[cfg(not(feature = "rdma"))]
const KNOWN_FLAGS: u8 = FLAG_NOTIFY | FLAG_DESCRIBE | FLAG_GENERATION;
#[cfg(feature = "rdma")]
const KNOWN_FLAGS: u8 = FLAG_NOTIFY | FLAG_DESCRIBE | FLAG_GENERATION | FLAG_RDMA_CONNECT;
const OP_WRITE: u8 = 1;
const OP_READ: u8 = 2;

/// Fixed part of a request; the name and notification follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub name_len: usize,
    /// `Some(len)` when the batch carries a notification (possibly empty).
    pub notify_len: Option<usize>,
    pub n_ops: usize,
    /// A handshake request instead of a batch.
    pub describe: bool,
    /// An 8-byte expected segment generation follows the notify bytes.
    pub has_generation: bool,
    /// An RDMA connect request; the notify bytes carry it.
    #[cfg(feature = "rdma")]
    pub rdma_connect: bool,
}

impl RequestHeader {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32_le(MAGIC);
        out.put_u8(VERSION);
        let mut flags = 0;
        if self.notify_len.is_some() {
            flags |= FLAG_NOTIFY;
        }
        if self.describe {
            flags |= FLAG_DESCRIBE;
        }
        if self.has_generation {
            flags |= FLAG_GENERATION;
        }
        #[cfg(feature = "rdma")]
        if self.rdma_connect {
            flags |= FLAG_RDMA_CONNECT;
        }
        out.put_u8(flags);
        out.put_u16_le(0);
        out.put_u32_le(self.name_len as u32);
        out.put_u32_le(self.notify_len.unwrap_or(0) as u32);
        out.put_u32_le(self.n_ops as u32);
    }

    pub fn decode(raw: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, TransferError> {
        check_magic_version(u32_at(raw, 0), raw[4])?;
        let flags = raw[5];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(proto(format!("unknown request flags {flags:#x}")));
        }
        let name_len = u32_at(raw, 8) as usize;
        let notify_len = u32_at(raw, 12) as usize;
        let n_ops = u32_at(raw, 16) as usize;
        if name_len > MAX_SEGMENT_NAME_LEN {
            return Err(proto(format!(
                "segment name length {name_len} exceeds {MAX_SEGMENT_NAME_LEN}"
            )));
        }
        if notify_len > MAX_NOTIFY_LEN {
            return Err(proto(format!(
                "notification length {notify_len} exceeds {MAX_NOTIFY_LEN}"
            )));
        }
        if flags & FLAG_NOTIFY == 0 && notify_len != 0 {
            return Err(proto("notification bytes without notification flag".into()));
        }
        if n_ops > MAX_OPS_PER_BATCH {
            return Err(proto(format!("{n_ops} ops exceed {MAX_OPS_PER_BATCH}")));
        }
        let describe = flags & FLAG_DESCRIBE != 0;
        if describe && (n_ops != 0 || flags & FLAG_NOTIFY != 0) {
            return Err(proto(
                "describe request carries ops or a notification".into(),
            ));
        }
        #[cfg(feature = "rdma")]
        let rdma_connect = flags & FLAG_RDMA_CONNECT != 0;
        #[cfg(feature = "rdma")]
        if rdma_connect && (n_ops != 0 || describe || flags & FLAG_NOTIFY == 0) {
            return Err(proto(
                "rdma connect request without its body, or with ops".into(),
            ));
        }
        Ok(RequestHeader {
            name_len,
            notify_len: (flags & FLAG_NOTIFY != 0).then_some(notify_len),
            n_ops,
            describe,
            has_generation: flags & FLAG_GENERATION != 0,
            #[cfg(feature = "rdma")]
            rdma_connect,
        })
    }
}

/// Request header plus the variable-length parts that precede the ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Lossy-decoded so an invalid name becomes an "unknown segment" reply
    /// instead of a dropped connection.
    pub segment: String,
    pub notify: Option<Bytes>,
    pub n_ops: usize,
    pub describe: bool,
    /// The generation the submitter expects the segment to have.
    pub generation: Option<u64>,
    /// An RDMA connect request whose JSON body is in `notify`.
    #[cfg(feature = "rdma")]
    pub rdma_connect: bool,
}

/// Reads the next request head. `Ok(None)` means the peer closed the
/// connection cleanly between batches.
pub async fn read_request_head<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<RequestHead>, TransferError> {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    if !read_exact_or_eof(r, &mut raw).await? {
        return Ok(None);
    }
    let h = RequestHeader::decode(&raw)?;
    // Both lengths were bounded by decode, so these allocations are small.
    let mut name = vec![0u8; h.name_len];
    r.read_exact(&mut name).await?;
    let notify = match h.notify_len {
        Some(n) => {
            let mut buf = vec![0u8; n];
            r.read_exact(&mut buf).await?;
            Some(Bytes::from(buf))
        }
        None => None,
    };
    let generation = if h.has_generation {
        let mut g = [0u8; 8];
        r.read_exact(&mut g).await?;
        Some(u64::from_le_bytes(g))
    } else {
        None
    };
    Ok(Some(RequestHead {
        segment: String::from_utf8_lossy(&name).into_owned(),
        notify,
        n_ops: h.n_ops,
        describe: h.describe,
        generation,
        #[cfg(feature = "rdma")]
        rdma_connect: h.rdma_connect,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Write,
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    pub kind: OpKind,
    pub offset: u64,
    pub len: u64,
}

impl OpHeader {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(match self.kind {
            OpKind::Write => OP_WRITE,
            OpKind::Read => OP_READ,
        });
        out.put_u64_le(self.offset);
        out.put_u64_le(self.len);
    }

    pub fn decode(raw: &[u8; OP_HEADER_LEN]) -> Result<Self, TransferError> {
        let kind = match raw[0] {
            OP_WRITE => OpKind::Write,
            OP_READ => OpKind::Read,
            k => return Err(proto(format!("unknown op kind {k}"))),
        };
        let offset = u64_at(raw, 1);
        let len = u64_at(raw, 9);
        if len > MAX_OP_LEN {
            return Err(proto(format!("op length {len} exceeds {MAX_OP_LEN}")));
        }
        Ok(OpHeader { kind, offset, len })
    }
}

pub async fn read_op_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<OpHeader, TransferError> {
    let mut raw = [0u8; OP_HEADER_LEN];
    r.read_exact(&mut raw).await?;
    OpHeader::decode(&raw)
}

/// Serialises a whole request as a list of buffers for a vectored write:
/// all headers share one allocation and write payloads are the caller's
/// `Bytes`, never copied.
#[cfg(test)]
pub fn encode_request(segment: &str, batch: &Batch) -> VecDeque<Bytes> {
    encode_request_at(segment, batch, None)
}

/// Like [`encode_request`], failing at the target unless the segment's
/// generation equals `generation` (the shm commit uses this so a write into a
/// stale mapping is never acknowledged).
pub fn encode_request_at(segment: &str, batch: &Batch, generation: Option<u64>) -> VecDeque<Bytes> {
    let mut head = BytesMut::with_capacity(
        REQUEST_HEADER_LEN
            + segment.len()
            + batch.notify.as_ref().map_or(0, Bytes::len)
            + 8
            + batch.ops.len() * OP_HEADER_LEN,
    );
    RequestHeader {
        name_len: segment.len(),
        notify_len: batch.notify.as_ref().map(Bytes::len),
        n_ops: batch.ops.len(),
        describe: false,
        has_generation: generation.is_some(),
        #[cfg(feature = "rdma")]
        rdma_connect: false,
    }
    .encode(&mut head);
    head.put_slice(segment.as_bytes());
    if let Some(n) = &batch.notify {
        head.put_slice(n);
    }
    if let Some(g) = generation {
        head.put_u64_le(g);
    }
    // Remember where each op header ends so consecutive read-op headers
    // coalesce into one slice instead of one iovec each.
    let mut cuts: Vec<(usize, Option<Bytes>)> = Vec::new();
    for op in &batch.ops {
        let (hdr, payload) = match op {
            Op::Write {
                remote_offset,
                data,
            } => (
                OpHeader {
                    kind: OpKind::Write,
                    offset: *remote_offset,
                    len: data.len() as u64,
                },
                Some(data.clone()),
            ),
            Op::Read { remote_offset, len } => (
                OpHeader {
                    kind: OpKind::Read,
                    offset: *remote_offset,
                    len: *len,
                },
                None,
            ),
        };
        hdr.encode(&mut head);
        if let Some(p) = payload {
            if !p.is_empty() {
                cuts.push((head.len(), Some(p)));
            }
        }
    }
    let mut head = head.freeze();
    let mut out = VecDeque::with_capacity(cuts.len() * 2 + 1);
    let mut consumed = 0;
    for (end, payload) in cuts {
        out.push_back(head.split_to(end - consumed));
        consumed = end;
        if let Some(p) = payload {
            out.push_back(p);
        }
    }
    if !head.is_empty() {
        out.push_back(head);
    }
    out
}

/// A handshake request for `segment`'s advert.
pub fn encode_describe(segment: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(REQUEST_HEADER_LEN + segment.len());
    RequestHeader {
        name_len: segment.len(),
        notify_len: None,
        n_ops: 0,
        describe: true,
        has_generation: false,
        #[cfg(feature = "rdma")]
        rdma_connect: false,
    }
    .encode(&mut out);
    out.put_slice(segment.as_bytes());
    out
}

/// An RDMA connect request for `segment` carrying `body` (a JSON
/// `ConnectRequest`, at most `MAX_NOTIFY_LEN` bytes).
#[cfg(feature = "rdma")]
pub fn encode_rdma_connect(segment: &str, body: &[u8]) -> Result<BytesMut, TransferError> {
    if body.len() > MAX_NOTIFY_LEN || segment.len() > MAX_SEGMENT_NAME_LEN {
        return Err(proto("rdma connect request too large".into()));
    }
    let mut out = BytesMut::with_capacity(REQUEST_HEADER_LEN + segment.len() + body.len());
    RequestHeader {
        name_len: segment.len(),
        notify_len: Some(body.len()),
        n_ops: 0,
        describe: false,
        has_generation: false,
        rdma_connect: true,
    }
    .encode(&mut out);
    out.put_slice(segment.as_bytes());
    out.put_slice(body);
    Ok(out)
}

/// The ok reply to a describe request: header plus the advert bytes.
pub fn encode_describe_reply(advert: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(REPLY_HEADER_LEN + advert.len());
    ReplyHeader {
        msg_len: advert.len() as u32,
        ..ReplyHeader::ok(0, 0)
    }
    .encode(&mut out);
    out.put_slice(advert);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    Ok,
    UnknownSegment,
    OutOfBounds,
    Error,
    /// Error after which the server closes the connection.
    Fatal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: ReplyStatus,
    pub n_reads: u32,
    pub msg_len: u32,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

impl ReplyHeader {
    pub fn ok(n_reads: u32, read_bytes: u64) -> Self {
        ReplyHeader {
            status: ReplyStatus::Ok,
            n_reads,
            msg_len: 0,
            a: read_bytes,
            b: 0,
            c: 0,
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32_le(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(match self.status {
            ReplyStatus::Ok => 0,
            ReplyStatus::UnknownSegment => 1,
            ReplyStatus::OutOfBounds => 2,
            ReplyStatus::Error => 3,
            ReplyStatus::Fatal => 4,
        });
        out.put_u16_le(0);
        out.put_u32_le(self.n_reads);
        out.put_u32_le(self.msg_len);
        out.put_u64_le(self.a);
        out.put_u64_le(self.b);
        out.put_u64_le(self.c);
    }

    pub fn decode(raw: &[u8; REPLY_HEADER_LEN]) -> Result<Self, TransferError> {
        check_magic_version(u32_at(raw, 0), raw[4])?;
        let status = match raw[5] {
            0 => ReplyStatus::Ok,
            1 => ReplyStatus::UnknownSegment,
            2 => ReplyStatus::OutOfBounds,
            3 => ReplyStatus::Error,
            4 => ReplyStatus::Fatal,
            s => return Err(proto(format!("unknown reply status {s}"))),
        };
        let h = ReplyHeader {
            status,
            n_reads: u32_at(raw, 8),
            msg_len: u32_at(raw, 12),
            a: u64_at(raw, 16),
            b: u64_at(raw, 24),
            c: u64_at(raw, 32),
        };
        if h.msg_len as usize > MAX_MESSAGE_LEN {
            return Err(proto(format!(
                "reply message length {} exceeds {MAX_MESSAGE_LEN}",
                h.msg_len
            )));
        }
        Ok(h)
    }

    /// Turns a non-ok reply and its message into the error the submitter
    /// sees, mirroring what the local fast path would have returned.
    pub fn into_error(self, msg: &[u8]) -> TransferError {
        let msg = String::from_utf8_lossy(msg).into_owned();
        match self.status {
            ReplyStatus::UnknownSegment => TransferError::UnknownSegment(msg),
            ReplyStatus::OutOfBounds => TransferError::OutOfBounds {
                segment: msg,
                offset: self.a,
                len: self.b,
                segment_len: self.c,
            },
            ReplyStatus::Ok | ReplyStatus::Error | ReplyStatus::Fatal => TransferError::Remote(msg),
        }
    }
}

/// Encodes the reply for a failed batch (header and message).
pub fn encode_error_reply(err: &TransferError, fatal: bool) -> BytesMut {
    let (status, msg, a, b, c) = match err {
        _ if fatal => (ReplyStatus::Fatal, err.to_string(), 0, 0, 0),
        TransferError::UnknownSegment(name) => (ReplyStatus::UnknownSegment, name.clone(), 0, 0, 0),
        TransferError::OutOfBounds {
            segment,
            offset,
            len,
            segment_len,
        } => (
            ReplyStatus::OutOfBounds,
            segment.clone(),
            *offset,
            *len,
            *segment_len,
        ),
        other => (ReplyStatus::Error, other.to_string(), 0, 0, 0),
    };
    let msg = truncate_utf8(&msg, MAX_MESSAGE_LEN);
    let mut out = BytesMut::with_capacity(REPLY_HEADER_LEN + msg.len());
    ReplyHeader {
        status,
        n_reads: 0,
        msg_len: msg.len() as u32,
        a,
        b,
        c,
    }
    .encode(&mut out);
    out.put_slice(msg.as_bytes());
    out
}

/// Fills `buf` completely; returns `false` if the stream ended before the
/// first byte, which is how a peer closes an idle connection.
pub async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn check_magic_version(magic: u32, version: u8) -> Result<(), TransferError> {
    if magic != MAGIC {
        return Err(proto(format!("bad magic {magic:#010x}")));
    }
    if version != VERSION {
        return Err(proto(format!("unsupported protocol version {version}")));
    }
    Ok(())
}

fn proto(msg: String) -> TransferError {
    TransferError::Protocol(msg)
}

fn u32_at(raw: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&raw[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(raw: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn raw_request(
        name_len: u32,
        flags: u8,
        notify_len: u32,
        n_ops: u32,
    ) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = BytesMut::new();
        b.put_u32_le(MAGIC);
        b.put_u8(VERSION);
        b.put_u8(flags);
        b.put_u16_le(0);
        b.put_u32_le(name_len);
        b.put_u32_le(notify_len);
        b.put_u32_le(n_ops);
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        raw.copy_from_slice(&b);
        raw
    }

    #[test]
    fn request_header_round_trip() {
        let h = RequestHeader {
            name_len: 5,
            notify_len: Some(0),
            n_ops: 3,
            describe: false,
            has_generation: true,
            #[cfg(feature = "rdma")]
            rdma_connect: false,
        };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        assert_eq!(b.len(), REQUEST_HEADER_LEN);
        let raw: [u8; REQUEST_HEADER_LEN] = b[..].try_into().unwrap();
        assert_eq!(RequestHeader::decode(&raw).unwrap(), h);
    }

    #[test]
    fn request_header_rejects_bad_magic_version_and_oversize() {
        let mut bad_magic = raw_request(1, 0, 0, 1);
        bad_magic[0] ^= 0xFF;
        let mut bad_version = raw_request(1, 0, 0, 1);
        bad_version[4] = 9;
        let cases = [
            bad_magic,
            bad_version,
            raw_request(MAX_SEGMENT_NAME_LEN as u32 + 1, 0, 0, 1),
            raw_request(u32::MAX, 0, 0, 1),
            raw_request(1, FLAG_NOTIFY, MAX_NOTIFY_LEN as u32 + 1, 1),
            raw_request(1, 0, 7, 1),
            raw_request(1, 0x80, 0, 1),
            raw_request(1, FLAG_DESCRIBE, 0, 1),
            raw_request(1, FLAG_DESCRIBE | FLAG_NOTIFY, 0, 0),
            raw_request(1, 0, 0, MAX_OPS_PER_BATCH as u32 + 1),
            raw_request(1, 0, 0, u32::MAX),
        ];
        for raw in cases {
            assert!(
                matches!(RequestHeader::decode(&raw), Err(TransferError::Protocol(_))),
                "accepted {raw:?}"
            );
        }
        assert!(RequestHeader::decode(&raw_request(256, 1, 4096, 65536)).is_ok());
    }

    #[cfg(feature = "rdma")]
    #[tokio::test]
    async fn rdma_connect_frame_round_trips_and_is_checked() {
        let frame = encode_rdma_connect("kv", br#"{"x":1}"#).unwrap();
        let mut r: &[u8] = &frame;
        let head = read_request_head(&mut r).await.unwrap().unwrap();
        assert!(head.rdma_connect && !head.describe && head.n_ops == 0);
        assert_eq!(head.segment, "kv");
        assert_eq!(head.notify.as_deref(), Some(&br#"{"x":1}"#[..]));
        // Without its body, or with ops: refused.
        for raw in [
            raw_request(1, FLAG_RDMA_CONNECT, 0, 0),
            raw_request(1, FLAG_RDMA_CONNECT | FLAG_NOTIFY, 0, 1),
            raw_request(1, FLAG_RDMA_CONNECT | FLAG_NOTIFY | FLAG_DESCRIBE, 0, 0),
        ] {
            assert!(RequestHeader::decode(&raw).is_err(), "accepted {raw:?}");
        }
        assert!(encode_rdma_connect("kv", &[0; MAX_NOTIFY_LEN + 1]).is_err());
    }

    #[tokio::test]
    async fn reader_rejects_before_reading_the_body() {
        // Only the 20 header bytes exist: if the decoder tried to allocate
        // and read a 4 GiB name it would fail with UnexpectedEof (or abort),
        // not with a protocol error.
        let raw = raw_request(u32::MAX, FLAG_NOTIFY, u32::MAX, u32::MAX);
        let mut r: &[u8] = &raw;
        assert!(matches!(
            read_request_head(&mut r).await,
            Err(TransferError::Protocol(_))
        ));
        let mut op = [0u8; OP_HEADER_LEN];
        op[0] = OP_WRITE;
        op[9..17].copy_from_slice(&(MAX_OP_LEN + 1).to_le_bytes());
        let mut r: &[u8] = &op;
        assert!(matches!(
            read_op_header(&mut r).await,
            Err(TransferError::Protocol(_))
        ));
        op[0] = 7;
        op[9..17].copy_from_slice(&1u64.to_le_bytes());
        let mut r: &[u8] = &op;
        assert!(matches!(
            read_op_header(&mut r).await,
            Err(TransferError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn clean_eof_between_batches_is_not_an_error() {
        let mut r: &[u8] = &[];
        assert!(read_request_head(&mut r).await.unwrap().is_none());
        let raw = raw_request(1, 0, 0, 0);
        let mut r: &[u8] = &raw[..7];
        assert!(matches!(
            read_request_head(&mut r).await,
            Err(TransferError::Io(_))
        ));
    }

    #[tokio::test]
    async fn encoded_request_decodes() {
        let batch = Batch::new()
            .read(1, 2)
            .write(100, Bytes::from_static(b"hello"))
            .write(7, Bytes::new())
            .read(3, 4)
            .notify(Bytes::from_static(b"done"));
        let parts = encode_request("seg", &batch);
        let flat: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let mut r: &[u8] = &flat;
        let head = read_request_head(&mut r).await.unwrap().unwrap();
        assert_eq!(head.segment, "seg");
        assert_eq!(head.notify.as_deref(), Some(&b"done"[..]));
        assert_eq!(head.n_ops, 4);
        let op = read_op_header(&mut r).await.unwrap();
        assert_eq!((op.kind, op.offset, op.len), (OpKind::Read, 1, 2));
        let op = read_op_header(&mut r).await.unwrap();
        assert_eq!((op.kind, op.offset, op.len), (OpKind::Write, 100, 5));
        let mut payload = [0u8; 5];
        r.read_exact(&mut payload).await.unwrap();
        assert_eq!(&payload, b"hello");
        let op = read_op_header(&mut r).await.unwrap();
        assert_eq!((op.kind, op.offset, op.len), (OpKind::Write, 7, 0));
        let op = read_op_header(&mut r).await.unwrap();
        assert_eq!((op.kind, op.offset, op.len), (OpKind::Read, 3, 4));
        assert!(r.is_empty());

        // Generation and describe requests decode to what was encoded.
        let parts = encode_request_at("s", &Batch::new(), Some(0xABCD));
        let flat: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        let mut r: &[u8] = &flat;
        let head = read_request_head(&mut r).await.unwrap().unwrap();
        assert_eq!(
            (head.generation, head.describe, head.n_ops),
            (Some(0xABCD), false, 0)
        );
        assert!(r.is_empty());
        let flat = encode_describe("seg");
        let mut r: &[u8] = &flat;
        let head = read_request_head(&mut r).await.unwrap().unwrap();
        assert!(head.describe && head.generation.is_none() && head.notify.is_none());
        assert_eq!(head.segment, "seg");
    }

    #[test]
    fn reply_round_trip_and_errors() {
        let mut b = BytesMut::new();
        ReplyHeader::ok(2, 99).encode(&mut b);
        let raw: [u8; REPLY_HEADER_LEN] = b[..].try_into().unwrap();
        assert_eq!(ReplyHeader::decode(&raw).unwrap(), ReplyHeader::ok(2, 99));

        let oob = TransferError::OutOfBounds {
            segment: "s".into(),
            offset: 10,
            len: 20,
            segment_len: 15,
        };
        let enc = encode_error_reply(&oob, false);
        let raw: [u8; REPLY_HEADER_LEN] = enc[..REPLY_HEADER_LEN].try_into().unwrap();
        let h = ReplyHeader::decode(&raw).unwrap();
        match h.into_error(&enc[REPLY_HEADER_LEN..]) {
            TransferError::OutOfBounds {
                segment,
                offset,
                len,
                segment_len,
            } => assert_eq!(
                (segment.as_str(), offset, len, segment_len),
                ("s", 10, 20, 15)
            ),
            other => panic!("{other:?}"),
        }

        let enc = encode_error_reply(&TransferError::Protocol("x".repeat(10_000)), true);
        let raw: [u8; REPLY_HEADER_LEN] = enc[..REPLY_HEADER_LEN].try_into().unwrap();
        let h = ReplyHeader::decode(&raw).unwrap();
        assert_eq!(h.status, ReplyStatus::Fatal);
        assert_eq!(h.msg_len as usize, MAX_MESSAGE_LEN);
        assert!(matches!(h.into_error(b"m"), TransferError::Remote(m) if m == "m"));

        let mut bad = raw;
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ReplyHeader::decode(&bad),
            Err(TransferError::Protocol(_))
        ));
        let mut bad = raw;
        bad[5] = 42;
        assert!(ReplyHeader::decode(&bad).is_err());
        let mut bad = raw;
        bad[1] = 0;
        assert!(ReplyHeader::decode(&bad).is_err());
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}

/// Generated inputs for the decoder (issue 14's fuzzing): any bytes, and valid requests mutated
/// and cut, read the way the server reads a connection. No panic; nothing decoded past a limit;
/// an intact request decodes to what was encoded. `PROPTEST_CASES` sets the case count (256 by
/// default; the long run's figures are in docs/benchmarks.md).
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::batch::Batch;
    use proptest::prelude::*;

    /// What the server loop does with a connection's bytes: request heads, then each op's
    /// header and (for writes) its payload, until the input ends or fails to decode.
    fn read_all(mut input: &[u8]) -> Vec<(RequestHead, Vec<OpHeader>)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut out = Vec::new();
            while let Ok(Some(head)) = read_request_head(&mut input).await {
                let mut ops = Vec::new();
                for _ in 0..head.n_ops {
                    let Ok(op) = read_op_header(&mut input).await else {
                        return out;
                    };
                    if op.kind == OpKind::Write {
                        // The server reads a payload into the segment, never into a buffer of
                        // the announced size; skipping is the same bound.
                        let Ok(n) = usize::try_from(op.len) else {
                            return out;
                        };
                        if n > input.len() {
                            return out;
                        }
                        input = &input[n..];
                    }
                    ops.push(op);
                }
                out.push((head, ops));
            }
            out
        })
    }

    fn within_limits(decoded: &[(RequestHead, Vec<OpHeader>)]) -> Result<(), TestCaseError> {
        for (head, ops) in decoded {
            prop_assert!(head.segment.len() <= MAX_SEGMENT_NAME_LEN * 3); // lossy UTF-8 may grow
            prop_assert!(head
                .notify
                .as_ref()
                .is_none_or(|n| n.len() <= MAX_NOTIFY_LEN));
            prop_assert!(head.n_ops <= MAX_OPS_PER_BATCH);
            prop_assert!(ops.iter().all(|o| o.len <= MAX_OP_LEN));
        }
        Ok(())
    }

    fn batch() -> impl Strategy<Value = (String, Batch)> {
        let op = prop_oneof![
            (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(off, d)| (
                off,
                Some(d),
                0u64
            )),
            (any::<u64>(), 0u64..4096).prop_map(|(off, len)| (off, None, len)),
        ];
        (
            "[a-z0-9/_-]{0,40}",
            prop::collection::vec(op, 0..6),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..128)),
        )
            .prop_map(|(name, ops, notify)| {
                let mut b = Batch::new();
                for (off, data, len) in ops {
                    b = match data {
                        Some(d) => b.write(off, Bytes::from(d)),
                        None => b.read(off, len),
                    };
                }
                if let Some(n) = notify {
                    b = b.notify(Bytes::from(n));
                }
                (name, b)
            })
    }

    fn flatten(parts: VecDeque<Bytes>) -> Vec<u8> {
        parts.into_iter().flat_map(|b| b.to_vec()).collect()
    }

    proptest! {
        #[test]
        fn any_bytes_decode_within_limits_or_fail(input in prop::collection::vec(any::<u8>(), 0..512)) {
            within_limits(&read_all(&input))?;
        }

        #[test]
        fn a_header_with_any_lengths_is_bounded(
            flags in any::<u8>(),
            name_len in any::<u32>(),
            notify_len in any::<u32>(),
            n_ops in any::<u32>(),
            tail in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut b = super::tests::raw_request(name_len, flags, notify_len, n_ops).to_vec();
            b.extend_from_slice(&tail);
            within_limits(&read_all(&b))?;
        }

        #[test]
        fn an_intact_request_round_trips((name, b) in batch()) {
            let bytes = flatten(encode_request(&name, &b));
            let decoded = read_all(&bytes);
            prop_assert_eq!(decoded.len(), 1);
            let (head, ops) = &decoded[0];
            prop_assert_eq!(&head.segment, &name);
            prop_assert_eq!(head.n_ops, b.ops.len());
            prop_assert_eq!(ops.len(), b.ops.len());
            prop_assert_eq!(head.notify.as_deref(), b.notify.as_deref());
        }

        #[test]
        fn a_mutated_or_cut_request_never_panics(
            (name, b) in batch(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = flatten(encode_request(&name, &b));
            if !bytes.is_empty() {
                for (at, v) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = v;
                }
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            within_limits(&read_all(&bytes))?;
        }

        #[test]
        fn any_reply_header_is_bounded(raw in prop::array::uniform32(any::<u8>()), rest in prop::array::uniform8(any::<u8>())) {
            let mut full = [0u8; REPLY_HEADER_LEN];
            full[..32].copy_from_slice(&raw);
            full[32..].copy_from_slice(&rest);
            if let Ok(h) = ReplyHeader::decode(&full) {
                prop_assert!(h.msg_len as usize <= MAX_MESSAGE_LEN);
            }
        }
    }
}
