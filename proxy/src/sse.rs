//! Server-sent events as the engines stream them: a byte stream cut into whole events whatever
//! its chunking, an event's data, and data framed as an event. The one SSE reader the gateway's
//! stream rewriters (prompt-logprob merging, batch merging) share.

use bytes::{Bytes, BytesMut};

/// Cuts an SSE byte stream into whole events, each with its closing blank line, bytes untouched.
/// Holds at most one partial event; its size is the caller's to bound ([`Splitter::pending`]).
#[derive(Debug, Default)]
pub struct Splitter {
    buf: BytesMut,
}

impl Splitter {
    /// Appends `chunk` and returns every event it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            out.push(self.buf.split_to(end).freeze());
        }
        out
    }

    /// Bytes of the event not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Whatever is left (an unterminated last event), emptying the splitter.
    pub fn take_rest(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// End of the first event in `b`: after a blank line, LF or CRLF framed.
fn event_end(b: &[u8]) -> Option<usize> {
    b.windows(2).enumerate().find_map(|(i, w)| match w {
        [b'\n', b'\n'] => Some(i + 2),
        [b'\n', b'\r'] if b.get(i + 2) == Some(&b'\n') => Some(i + 3),
        _ => None,
    })
}

/// An event's data: its `data:` lines joined by newlines; `None` for an event without any
/// (a comment, a keep-alive).
pub fn data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// The data of every event of a whole SSE body, in order.
pub fn datas(body: &[u8]) -> Vec<String> {
    let mut s = Splitter::default();
    let mut events = s.push(body);
    events.push(s.take_rest());
    events.iter().filter_map(|e| data(e)).collect()
}

/// One event carrying `data` (a `data:` line per line of it).
pub fn frame(data: &str) -> String {
    let mut out = String::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_whole_and_untouched_whatever_the_chunking() {
        let mut s = Splitter::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        assert_eq!(s.pending(), 10);
        let got = s.push(b":1}\n\ndata: x\r\n\r\ndata: y");
        assert_eq!(
            got,
            vec![&b"data: {\"a\":1}\n\n"[..], &b"data: x\r\n\r\n"[..]]
        );
        assert_eq!(s.take_rest(), &b"data: y"[..]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn data_joins_lines_and_frame_round_trips() {
        assert_eq!(data(b"data: a\ndata:b\n\n").as_deref(), Some("a\nb"));
        assert_eq!(data(b": keep-alive\n\n"), None);
        assert_eq!(frame("a\nb"), "data: a\ndata: b\n\n");
        assert_eq!(datas(frame("x\ny").as_bytes()), vec!["x\ny".to_string()]);
        assert_eq!(
            datas(b"data: 1\n\ndata: [DONE]\n\n"),
            vec!["1".to_string(), "[DONE]".to_string()]
        );
    }
}
