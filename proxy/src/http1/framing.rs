//! HTTP/1.1 response body framing (RFC 9112 §6): a fixed length, chunked, or until the connection
//! closes. Pure: it cuts body pieces out of a read buffer and never touches a socket, so every
//! edge of the chunked grammar is tested on bytes alone.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line or trailer line accepted; a peer sending more is broken or hostile.
const MAX_LINE: usize = 4096;
/// Most trailer lines accepted after the last chunk.
const MAX_TRAILERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// `content-length`: this many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// No length and not chunked: the body ends when the peer closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a `hex-size[;ext]\r\n` line.
    Size,
    /// Inside a chunk, this many data bytes still to come.
    Data(u64),
    /// After a chunk's data, expecting its `\r\n`.
    DataEnd,
    /// After the zero-size chunk: trailer lines until an empty one; the count so far.
    Trailer(usize),
}

/// What the buffer gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// Nothing complete in the buffer: read more.
    NeedMore,
    /// The body is over; bytes after it (if any) stay in the buffer.
    End,
}

impl Framing {
    /// Cuts the next piece of body out of `buf`.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, String> {
        match self {
            Framing::Length(0) => Ok(Step::End),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                Ok(Step::Data(buf.split_to(n).freeze()))
            }
            Framing::UntilClose => {
                if buf.is_empty() {
                    Ok(Step::NeedMore)
                } else {
                    Ok(Step::Data(buf.split().freeze()))
                }
            }
            Framing::Chunked(state) => chunked(state, buf),
        }
    }

    /// The peer closed the connection: fine only where the framing allows the body to end there.
    pub fn at_eof(&self) -> Result<(), String> {
        match self {
            Framing::UntilClose | Framing::Length(0) => Ok(()),
            Framing::Length(left) => Err(format!(
                "connection closed with {left} body bytes still to come"
            )),
            Framing::Chunked(_) => Err("connection closed inside a chunked body".into()),
        }
    }
}

fn chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, String> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Step::NeedMore);
                };
                let size = parse_size(&line)?;
                *state = if size == 0 {
                    Chunk::Trailer(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                *state = if n as u64 == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n as u64)
                };
                return Ok(Step::Data(buf.split_to(n).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailer(seen) => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Step::NeedMore);
                };
                if line.is_empty() {
                    return Ok(Step::End);
                }
                if seen + 1 >= MAX_TRAILERS {
                    return Err("too many trailer lines".into());
                }
                *state = Chunk::Trailer(seen + 1);
            }
        }
    }
}

/// A CRLF-terminated line without its CRLF, or `None` if the buffer holds no whole line yet.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => {
            let line = buf.split_to(i);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("chunk line too long".into()),
        None => Ok(None),
    }
}

fn parse_size(line: &[u8]) -> Result<u64, String> {
    let hex = line.split(|b| *b == b';').next().unwrap_or_default();
    let hex = std::str::from_utf8(hex)
        .map_err(|_| "chunk size is not text".to_string())?
        .trim();
    if hex.is_empty() || hex.len() > 15 {
        return Err(format!("bad chunk size `{hex}`"));
    }
    u64::from_str_radix(hex, 16).map_err(|_| format!("bad chunk size `{hex}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and collects the body.
    fn run(mut framing: Framing, input: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), String> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match framing.step(&mut buf)? {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::End => return Ok((body, buf.to_vec())),
                Step::NeedMore if fed >= input.len() => {
                    framing.at_eof()?;
                    return Ok((body, buf.to_vec()));
                }
                Step::NeedMore => {
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    const CHUNKED: &[u8] = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";

    #[test]
    fn chunked_body_decodes_whole_and_byte_by_byte() {
        for step in [1, 2, 3, 7, CHUNKED.len()] {
            let (body, rest) = run(Framing::Chunked(Chunk::Size), CHUNKED, step).expect("decodes");
            assert_eq!(body, b"hello, world", "step {step}");
            // What follows the body is the next response's, left for it.
            assert!(b"NEXT".starts_with(&rest), "step {step}: rest {rest:?}");
        }
    }

    #[test]
    fn length_body_stops_at_its_length() {
        let (body, rest) = run(Framing::Length(5), b"helloHTTP/1.1", 3).expect("decodes");
        assert_eq!(body, b"hello");
        assert_eq!(rest, b"H");
        let (body, _) = run(Framing::Length(0), b"", 1).expect("empty");
        assert!(body.is_empty());
    }

    #[test]
    fn until_close_takes_everything() {
        let (body, _) = run(Framing::UntilClose, b"all of it", 4).expect("decodes");
        assert_eq!(body, b"all of it");
    }

    #[test]
    fn truncated_and_malformed_bodies_are_errors() {
        let e = run(Framing::Length(10), b"short", 2).expect_err("truncated");
        assert!(e.contains("5 body bytes"), "{e}");
        let e = run(Framing::Chunked(Chunk::Size), b"5\r\nhel", 2).expect_err("cut");
        assert!(e.contains("chunked"), "{e}");
        let e = run(Framing::Chunked(Chunk::Size), b"zz\r\n", 4).expect_err("size");
        assert!(e.contains("bad chunk size"), "{e}");
        let e = run(Framing::Chunked(Chunk::Size), b"2\r\nabXY", 8).expect_err("crlf");
        assert!(e.contains("CRLF"), "{e}");
        let long = vec![b'1'; MAX_LINE + 10];
        let e = run(Framing::Chunked(Chunk::Size), &long, long.len()).expect_err("line");
        assert!(e.contains("too long"), "{e}");
        let e = run(Framing::Chunked(Chunk::Size), b"fffffffffffffffff\r\n", 64).expect_err("big");
        assert!(e.contains("bad chunk size"), "{e}");
    }
}
