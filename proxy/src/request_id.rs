//! The request id every log line of a request carries and every engine leg is sent under: the
//! client's `x-request-id` when it is a sane one, else a minted UUID.
//!
//! Why bounded: the id travels into the engines' protocol messages (the KV landing
//! notification, bootstrap rooms, `{id}-{i}` per batched prompt). An unbounded client id once
//! made a prefill's notification overflow its 4,096-byte limit, the prefill answered 502, and
//! five such requests opened every prefill's breaker: client input tripping engine breakers.

use crate::access::REQUEST_ID;
use http::{HeaderMap, HeaderValue};

/// Longest client id honoured; a UUID is 36, and an engine suffix still fits easily.
pub const MAX_LEN: usize = 128;

/// The request's id, and the header value echoed back to the client (the client's own when
/// honoured, else the minted one). A client id that is too long or not visible ASCII is
/// replaced, and the log says so.
pub fn of(headers: &HeaderMap) -> (String, HeaderValue) {
    let Some(given) = headers.get(&REQUEST_ID) else {
        return minted();
    };
    if let Some(id) = honoured(given) {
        return (id.to_string(), given.clone());
    }
    let (id, value) = minted();
    tracing::info!(
        request_id = %id,
        given_len = given.len(),
        "client x-request-id refused (longer than {MAX_LEN} bytes or not visible ASCII); using a minted id"
    );
    (id, value)
}

/// The client's id if it is 1 to [`MAX_LEN`] bytes of visible ASCII (no spaces, no controls).
fn honoured(given: &HeaderValue) -> Option<&str> {
    let bytes = given.as_bytes();
    let sane =
        !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|b| b.is_ascii_graphic());
    sane.then(|| given.to_str().ok()).flatten()
}

fn minted() -> (String, HeaderValue) {
    let id = uuid::Uuid::new_v4().to_string();
    // A UUID's text is always a valid header value; the empty fallback is unreachable.
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static(""));
    (id, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            &REQUEST_ID,
            HeaderValue::from_bytes(value).expect("header value"),
        );
        h
    }

    #[test]
    fn sane_client_ids_are_honoured_and_echoed() {
        let (id, echoed) = of(&with_id(b"mine-42"));
        assert_eq!(id, "mine-42");
        assert_eq!(echoed, "mine-42");
        let longest = "a".repeat(MAX_LEN);
        assert_eq!(of(&with_id(longest.as_bytes())).0, longest);
    }

    #[test]
    fn missing_long_or_odd_ids_are_replaced_by_a_minted_one() {
        let (minted, echoed) = of(&HeaderMap::new());
        assert_eq!(minted.len(), 36);
        assert_eq!(echoed.to_str().expect("ascii"), minted);
        let too_long = "a".repeat(MAX_LEN + 1);
        let odd: [&[u8]; 5] = [
            too_long.as_bytes(),
            b"has space",
            b"tab\there",
            b"caf\xc3\xa9",
            b"",
        ];
        for given in odd {
            let (id, echoed) = of(&with_id(given));
            assert_eq!(
                id.len(),
                36,
                "{:?} replaced",
                given.escape_ascii().to_string()
            );
            assert_eq!(echoed.to_str().expect("ascii"), id);
        }
    }
}
