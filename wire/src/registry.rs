//! The segment registry the gateway hosts for the engines' transfer endpoints.
//!
//! Every call carries `Authorization: Bearer <FleetSecret::registry_token()>`. A name belongs to
//! the endpoint that published it until that endpoint withdraws it or stops refreshing it:
//! publishing a name another endpoint holds is answered 409 with `Retry-After` (when the held
//! entry expires), and a withdrawal names its endpoint (`?endpoint=host:port`).

/// `GET` lists, `POST` publishes, `GET/DELETE {path}/{name}` reads or withdraws one segment.
pub const REGISTRY_PATH: &str = "/registry/segments";

/// The query parameter of a `DELETE` naming the endpoint that owns the segment.
pub const OWNER_PARAM: &str = "endpoint";

/// Longest segment name.
pub const MAX_NAME_BYTES: usize = 256;

/// Longest endpoint ("host:port").
pub const MAX_ENDPOINT_BYTES: usize = 256;

/// Largest descriptor body a publish may send: a descriptor is a few hundred bytes.
pub const MAX_DESC_BYTES: usize = 64 * 1024;

/// A name one path segment can carry as it is: 1 to [`MAX_NAME_BYTES`] of `[A-Za-z0-9._-]`,
/// starting with a letter or digit (so never `.` or `..`).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_BYTES
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// "host:port" with a host of `[A-Za-z0-9._-]` or a bracketed IPv6 address, and a port.
pub fn valid_endpoint(endpoint: &str) -> bool {
    if endpoint.len() > MAX_ENDPOINT_BYTES {
        return false;
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        }
    };
    host_ok && port.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_plain_path_segment() {
        assert!(valid_name("kv-pdgate-sim-8b-8101"));
        assert!(valid_name("mailbox.v1_x"));
        assert!(valid_name(&"a".repeat(MAX_NAME_BYTES)));
        for bad in ["", ".", "..", "-x", "a/b", "a b", "é", "a%2f", "a?b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"a".repeat(MAX_NAME_BYTES + 1)));
    }

    #[test]
    fn endpoints_are_host_and_port() {
        for ok in ["127.0.0.1:9", "decode-0.svc:17000", "[::1]:80"] {
            assert!(valid_endpoint(ok), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1",
            ":80",
            "h:99999",
            "h:x",
            "[zz]:1",
            "a b:1",
            "h/p:1",
        ] {
            assert!(!valid_endpoint(bad), "{bad:?}");
        }
        let long = format!("{}:1", "h".repeat(MAX_ENDPOINT_BYTES));
        assert!(!valid_endpoint(&long));
    }
}
