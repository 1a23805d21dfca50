//! Who may call which route, and which request a line of log belongs to: decided once per
//! request by the listener, for every route, before the request reaches the pipeline or the
//! router.

use crate::config::ServerConfig;
use crate::error::ApiError;
use http::{header, HeaderMap};

pub static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The credential a route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Health, readiness, metrics and the engines' segment registry.
    Open,
    /// The OpenAI API (`/v1/*`): `server.api_key` when set.
    ApiKey,
    /// The control API (`/admin/*`): `server.admin_token` when set.
    Admin,
}

impl Guard {
    pub fn of(path: &str) -> Self {
        if path.starts_with("/v1/") {
            Guard::ApiKey
        } else if path.starts_with("/admin/") {
            Guard::Admin
        } else {
            Guard::Open
        }
    }

    /// `Err(401)` unless the request carries the bearer token this guard asks for.
    pub fn check(self, cfg: &ServerConfig, headers: &HeaderMap) -> Result<(), ApiError> {
        let expected = match self {
            Guard::Open => None,
            Guard::ApiKey => cfg.api_key.as_deref(),
            Guard::Admin => cfg.admin_token.as_deref(),
        };
        match expected {
            Some(token) if !bearer_matches(headers, token) => Err(ApiError::unauthorized()),
            _ => Ok(()),
        }
    }
}

fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time compare: the token must not leak through timing.
    given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cfg() -> ServerConfig {
        ServerConfig {
            api_key: Some("k".into()),
            admin_token: Some("a".into()),
            ..ServerConfig::default()
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii");
        h.insert(header::AUTHORIZATION, value);
        h
    }

    #[test]
    fn each_route_class_asks_for_its_own_token() {
        let cfg = cfg();
        assert_eq!(Guard::of("/v1/models"), Guard::ApiKey);
        assert_eq!(Guard::of("/admin/workers"), Guard::Admin);
        assert_eq!(Guard::of("/health"), Guard::Open);
        assert!(Guard::ApiKey.check(&cfg, &bearer("k")).is_ok());
        assert!(
            Guard::ApiKey.check(&cfg, &bearer("a")).is_err(),
            "admin token is not the API key"
        );
        assert!(
            Guard::Admin.check(&cfg, &bearer("k")).is_err(),
            "API key is not the admin token"
        );
        assert!(Guard::Admin.check(&cfg, &bearer("a")).is_ok());
        assert!(Guard::ApiKey.check(&cfg, &HeaderMap::new()).is_err());
        assert!(Guard::ApiKey.check(&cfg, &bearer("kk")).is_err());
        assert!(Guard::Open.check(&cfg, &HeaderMap::new()).is_ok());
        let open = ServerConfig::default();
        assert!(
            Guard::ApiKey.check(&open, &HeaderMap::new()).is_ok(),
            "no key set"
        );
    }
}
