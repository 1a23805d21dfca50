//! HTTP/1.1 body framing (RFC 9112 §6, §7), for request bodies (the server) and response bodies
//! (the engine client) alike: a fixed length, chunked, or until the connection
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
                check_trailer(&line)?;
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
        Some(i) if i > MAX_LINE => Err("chunk line too long".into()),
        Some(i) => {
            let line = buf.split_to(i);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("chunk line too long".into()),
        None => Ok(None),
    }
}

/// Most hex digits a chunk size may have: 15 keep every size below 2^60, far past any body
/// limit, and rule out overflow.
const MAX_SIZE_DIGITS: usize = 15;

/// `chunk-size [ chunk-ext ]` (RFC 9112 §7.1): the size is bare hex digits, nothing before them
/// and nothing after them but extensions. What lenient parsers take (`+54`, ` 54`, `54 `, a
/// non-ASCII space, a bare LF) is refused: two parsers that disagree on where a chunk ends are
/// how a request is smuggled past one of them.
fn parse_size(line: &[u8]) -> Result<u64, String> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let bad = || format!("bad chunk size `{}`", line.escape_ascii());
    if digits == 0 || digits > MAX_SIZE_DIGITS {
        return Err(bad());
    }
    check_extensions(&line[digits..]).map_err(|_| bad())?;
    line[..digits]
        .iter()
        .try_fold(0u64, |n, b| Some(n * 16 + u64::from(hex_value(*b)?)))
        .ok_or_else(bad)
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// `*( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )`, values ignored. Whitespace is allowed
/// only before a `;` or inside an extension; control bytes (a bare CR or LF above all) nowhere.
fn check_extensions(rest: &[u8]) -> Result<(), ()> {
    let after_ws = rest.trim_ascii_start();
    if after_ws.is_empty() {
        // Nothing, or whitespace with no extension after it (`54 `): not the grammar.
        return if rest.is_empty() { Ok(()) } else { Err(()) };
    }
    if after_ws.first() != Some(&b';') {
        return Err(());
    }
    let text_only = after_ws
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80);
    // `trim_ascii_start` also takes CR, LF and form feed: only spaces and tabs are whitespace here.
    let ws_ok = rest[..rest.len() - after_ws.len()]
        .iter()
        .all(|&b| b == b' ' || b == b'\t');
    if text_only && ws_ok {
        Ok(())
    } else {
        Err(())
    }
}

/// A trailer line is a header field (`name: value`, RFC 9112 §7.1.2): a token name, no
/// whitespace before the colon, no control bytes but tab in the value. Trailers are read and
/// dropped, but one that is not a field line is a peer that frames differently from us.
fn check_trailer(line: &[u8]) -> Result<(), String> {
    let colon = line.iter().position(|&b| b == b':');
    let ok = colon.is_some_and(|c| {
        let (name, value) = (&line[..c], &line[c + 1..]);
        !name.is_empty()
            && name.iter().all(|&b| is_token(b))
            && value
                .iter()
                .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80)
    });
    if ok {
        Ok(())
    } else {
        Err(format!("bad trailer line `{}`", line.escape_ascii()))
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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

    /// Sizes are bare hex digits: every lenient spelling a smuggler could use is refused, and
    /// the grammar's own forms (any case, leading zeros, extensions with whitespace) still pass.
    #[test]
    fn chunk_sizes_are_bare_hex_digits() {
        let refused: [&[u8]; 12] = [
            b"+5",
            b" 5",
            b"5 ",
            b"5\t",
            b"5\xc2\xa0",
            b"5\n",
            b"\n5",
            b"-5",
            b"0x5",
            b"",
            b"5;a\nb",
            b"5;a\rb",
        ];
        for size in refused {
            let mut input = size.to_vec();
            input.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
            let e = run(Framing::Chunked(Chunk::Size), &input, input.len())
                .expect_err(&format!("{:?} refused", size.escape_ascii().to_string()));
            assert!(e.contains("bad chunk size"), "{e}");
        }
        let accepted: [&[u8]; 6] = [
            b"5",
            b"05",
            b"000000000000005",
            b"5;ext",
            b"5 ; name = \"v;x\"",
            b"5\t;a=b;c",
        ];
        for size in accepted {
            let mut input = size.to_vec();
            input.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
            let (body, _) = run(Framing::Chunked(Chunk::Size), &input, 3)
                .unwrap_or_else(|e| panic!("{:?}: {e}", size.escape_ascii().to_string()));
            assert_eq!(body, b"hello");
        }
        let (body, _) = run(
            Framing::Chunked(Chunk::Size),
            b"A\r\n0123456789\r\n0\r\n\r\n",
            5,
        )
        .expect("upper-case hex");
        assert_eq!(body.len(), 10);
    }

    #[test]
    fn trailers_must_be_field_lines() {
        let ok = b"0\r\nx-sum: 1\r\nx-empty:\r\n\r\n";
        assert!(run(Framing::Chunked(Chunk::Size), ok, 4).is_ok());
        let bad: [&[u8]; 4] = [
            b"0\r\nno colon\r\n\r\n",
            b"0\r\nx y: 1\r\n\r\n",
            b"0\r\n: 1\r\n\r\n",
            b"0\r\nx: a\nb\r\n\r\n",
        ];
        for input in bad {
            let e = run(Framing::Chunked(Chunk::Size), input, input.len()).expect_err("refused");
            assert!(e.contains("trailer"), "{e}");
        }
    }

    #[test]
    fn a_line_past_the_limit_is_refused_even_when_whole() {
        let mut input = b"5;".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_LINE));
        input.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        let e = run(Framing::Chunked(Chunk::Size), &input, input.len()).expect_err("long");
        assert!(e.contains("too long"), "{e}");
    }

    /// Generated inputs (`PROPTEST_CASES` sets how many; 256 by default).
    mod generated {
        use super::*;
        use proptest::prelude::*;

        /// A chunk as the grammar allows it to be spelt: any case, leading zeros, extensions
        /// with whitespace before their `;`.
        fn spelt_chunk() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
            (
                proptest::collection::vec(any::<u8>(), 1..300),
                any::<bool>(),
                0usize..3,
                proptest::sample::select(&["", ";a", ";a=b", " ;x=\"y z\"", "\t;k;l=m"][..]),
            )
                .prop_map(|(data, upper, zeros, ext)| {
                    let hex = if upper {
                        format!("{:X}", data.len())
                    } else {
                        format!("{:x}", data.len())
                    };
                    let line = format!("{}{hex}{ext}\r\n", "0".repeat(zeros));
                    (data, line.into_bytes())
                })
        }

        /// Bytes a smuggler would try in a chunk-size line.
        fn size_line_bytes() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(
                prop_oneof![
                    4 => proptest::sample::select(&b"0123456789abcdefABCDEF"[..]),
                    1 => proptest::sample::select(&b"; =\t\"+-xX\r\n\x0b\x0c\xa0\xc2g"[..]),
                    1 => any::<u8>(),
                ],
                0..24,
            )
        }

        proptest! {
            #[test]
            fn chunked_bodies_round_trip_whatever_their_spelling_and_feeding(
                chunks in proptest::collection::vec(spelt_chunk(), 0..6),
                trailers in proptest::sample::select(&["", "a: b\r\n", "x:\r\ny: 1\r\n"][..]),
                step in 1usize..64,
            ) {
                let mut input = Vec::new();
                let mut want = Vec::new();
                for (data, line) in &chunks {
                    input.extend_from_slice(line);
                    input.extend_from_slice(data);
                    input.extend_from_slice(b"\r\n");
                    want.extend_from_slice(data);
                }
                input.extend_from_slice(b"0\r\n");
                input.extend_from_slice(trailers.as_bytes());
                input.extend_from_slice(b"\r\nNEXT");
                let (body, rest) = run(Framing::Chunked(Chunk::Size), &input, step)
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(body, want);
                prop_assert!(b"NEXT".starts_with(&rest), "what follows stays: {:?}", rest);
            }

            /// Whatever the bytes and however they arrive: no panic, and the buffer never holds
            /// more than one line's limit plus one read while the framing waits for more.
            #[test]
            fn any_bytes_never_panic_and_the_buffer_stays_bounded(
                input in proptest::collection::vec(
                    prop_oneof![
                        3 => proptest::sample::select(&b"0123456789abcdef\r\n;: =\"x"[..]),
                        1 => any::<u8>(),
                    ],
                    0..3000,
                ),
                step in 1usize..700,
                length in proptest::option::of(0u64..5000),
            ) {
                let mut framing = match length {
                    Some(n) => Framing::Length(n),
                    None => Framing::Chunked(Chunk::Size),
                };
                let mut buf = BytesMut::new();
                let mut fed = 0;
                loop {
                    match framing.step(&mut buf) {
                        Err(_) | Ok(Step::End) => break,
                        Ok(Step::Data(_)) => {}
                        Ok(Step::NeedMore) => {
                            prop_assert!(buf.len() <= MAX_LINE + step, "{} buffered", buf.len());
                            if fed >= input.len() {
                                let _ = framing.at_eof();
                                break;
                            }
                            let end = (fed + step).min(input.len());
                            buf.extend_from_slice(&input[fed..end]);
                            fed = end;
                        }
                    }
                }
            }

            /// Every size line we accept, httparse's chunk-size parser (the reference many
            /// servers use, and more lenient) reads the same way: we are never the lenient one.
            #[test]
            fn size_lines_we_accept_httparse_reads_alike(line in size_line_bytes()) {
                if let Ok(n) = parse_size(&line) {
                    let mut framed = line.clone();
                    framed.extend_from_slice(b"\r\n");
                    let theirs = httparse::parse_chunk_size(&framed);
                    prop_assert_eq!(theirs, Ok(httparse::Status::Complete((framed.len(), n))));
                }
            }
        }
    }
}
