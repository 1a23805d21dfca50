//! Who may call which route, and which request a line of log belongs to: decided once per
//! request by the listener, for every route, before the request reaches the pipeline or the
//! router. The credentials are fixed at start (`Access::new`), which also refuses a
//! configuration that would leave the control plane open to the network.

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::ratelimit::{self, Limits};
use anyhow::{bail, Context};
use axum::response::Response;
use http::{header, HeaderMap, Method};
use pdgate_wire::fleet::FleetSecret;
use pdgate_wire::registry::REGISTRY_PATH;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::OwnedSemaphorePermit;

pub static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Largest `api_keys_file` read.
const MAX_KEYS_FILE_BYTES: u64 = 1 << 20;

/// The credential a route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Health, readiness and metrics.
    Open,
    /// The OpenAI API (`/v1/*`): one of the API keys when any is set, then that key's limits.
    ApiKey,
    /// The control API (`/admin/*`): `server.admin_token` (always set off loopback).
    Admin,
    /// The engines' segment registry: the fleet's registry token. A read also takes the admin
    /// token (an operator looking at the registry); a write never does.
    Registry { write: bool },
}

impl Guard {
    pub fn of(method: &Method, path: &str) -> Self {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/v1") {
            Guard::ApiKey
        } else if under("/admin") {
            Guard::Admin
        } else if under("/registry") || path.starts_with(REGISTRY_PATH) {
            Guard::Registry {
                write: !matches!(*method, Method::GET | Method::HEAD),
            }
        } else {
            Guard::Open
        }
    }
}

/// What a request that passed its guard carries to the end of its response: its API key's
/// concurrency slot, when one is counted.
#[must_use]
pub struct Pass(Option<OwnedSemaphorePermit>);

impl Pass {
    /// The response, holding the slot until its body has been sent or dropped.
    pub fn keep_until_body_ends(self, resp: Response) -> Response {
        ratelimit::hold_until_body_ends(resp, self.0)
    }
}

/// The gateway's credentials and per-key limits.
pub struct Access {
    /// Empty: `/v1/*` takes no key (and everyone shares budget 0).
    api_keys: Vec<String>,
    admin_token: Option<String>,
    /// From the fleet secret; `None`: registry calls are allowed on loopback only.
    registry_token: Option<String>,
    /// The gateway is bound to a loopback address: only this host's processes reach it.
    loopback: bool,
    open_registry_warned: AtomicBool,
    limits: Limits,
}

impl Access {
    /// The credentials of `cfg` for a gateway bound to `bound`. Refuses to serve the control
    /// plane unauthenticated off loopback, and empty tokens anywhere.
    pub fn new(
        cfg: &ServerConfig,
        secret: Option<&FleetSecret>,
        bound: IpAddr,
    ) -> anyhow::Result<Self> {
        let loopback = bound.is_loopback();
        if cfg
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            bail!("server.admin_token is empty");
        }
        if !loopback && cfg.admin_token.is_none() {
            bail!(
                "the gateway binds {bound}, which is not a loopback address, and no \
                 server.admin_token is set: /admin/* would be open to the network. Set \
                 server.admin_token (e.g. PDGATE_SERVER__ADMIN_TOKEN) or bind 127.0.0.1"
            );
        }
        let api_keys = api_keys(cfg)?;
        let limits = Limits::new(&cfg.rate_limit, api_keys.len()).map_err(anyhow::Error::msg)?;
        if secret.is_none() && !loopback {
            tracing::warn!(
                "no fleet secret (server.fleet_secret_file or PDGATE_FLEET_SECRET): the segment \
                 registry refuses every engine's call on this non-loopback bind"
            );
        }
        Ok(Self {
            api_keys,
            admin_token: cfg.admin_token.clone(),
            registry_token: secret.map(FleetSecret::registry_token),
            loopback,
            open_registry_warned: AtomicBool::new(false),
            limits,
        })
    }

    /// `Err` (401, 403 or 429) unless the request carries what its route asks for and, on the
    /// data plane, its key has budget left.
    pub fn admit(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Pass, ApiError> {
        match Guard::of(method, path) {
            Guard::Open => Ok(Pass(None)),
            Guard::ApiKey => {
                // Without keys every caller shares budget 0.
                let key = if self.api_keys.is_empty() {
                    0
                } else {
                    matching_key(&self.api_keys, bearer(headers))
                        .ok_or_else(ApiError::unauthorized)?
                };
                self.limits.admit(key).map(Pass)
            }
            Guard::Admin => match &self.admin_token {
                Some(t) if !same(bearer(headers), t) => Err(ApiError::unauthorized()),
                _ => Ok(Pass(None)),
            },
            Guard::Registry { write } => self.registry(write, bearer(headers)).map(|()| Pass(None)),
        }
    }

    fn registry(&self, write: bool, given: Option<&str>) -> Result<(), ApiError> {
        if let Some(token) = &self.registry_token {
            if same(given, token) {
                return Ok(());
            }
        } else if self.loopback {
            // `pdgate up` without a secret: only this host's processes can reach the registry.
            if !self.open_registry_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the segment registry takes calls without credentials (no fleet secret, \
                     loopback bind): any local process may publish segments. Set \
                     server.fleet_secret_file or PDGATE_FLEET_SECRET"
                );
            }
            return Ok(());
        }
        let admin_reads = !write && self.admin_token.as_deref().is_some_and(|t| same(given, t));
        match (admin_reads, &self.registry_token) {
            (true, _) => Ok(()),
            (false, Some(_)) => Err(ApiError::unauthorized()),
            (false, None) => Err(ApiError::forbidden(
                "the gateway has no fleet secret, so its segment registry takes no engine calls \
                 off loopback",
            )),
        }
    }
}

/// `api_key`, then `api_keys`, then the lines of `api_keys_file`; a repeated key keeps its first
/// place (one budget).
fn api_keys(cfg: &ServerConfig) -> anyhow::Result<Vec<String>> {
    let mut keys: Vec<String> = cfg.api_key.iter().chain(&cfg.api_keys).cloned().collect();
    if let Some(path) = &cfg.api_keys_file {
        keys.extend(read_keys_file(path)?);
    }
    if keys.iter().any(|k| k.trim().is_empty()) {
        bail!("an API key (server.api_key or server.api_keys) is empty");
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    Ok(keys)
}

fn read_keys_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading server.api_keys_file {}", path.display()))?;
    if meta.len() > MAX_KEYS_FILE_BYTES {
        bail!(
            "server.api_keys_file {} is over {MAX_KEYS_FILE_BYTES} bytes",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading server.api_keys_file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The index of the key `given` is, comparing against every key so the time taken does not
/// depend on which one matched or how far a guess got.
fn matching_key(keys: &[String], given: Option<&str>) -> Option<usize> {
    let given = given?;
    keys.iter()
        .enumerate()
        .fold(None, |found, (i, k)| match same(Some(given), k) {
            true => found.or(Some(i)),
            false => found,
        })
}

/// Constant-time compare: a token must not leak through timing.
fn same(given: Option<&str>, expected: &str) -> bool {
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
    use std::net::Ipv4Addr;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

    fn cfg() -> ServerConfig {
        ServerConfig {
            api_key: Some("k".into()),
            api_keys: vec!["k2".into(), "k".into()],
            admin_token: Some("a".into()),
            ..ServerConfig::default()
        }
    }

    fn secret() -> FleetSecret {
        FleetSecret::new(b"0123456789abcdef0123").expect("long enough")
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii");
        h.insert(header::AUTHORIZATION, value);
        h
    }

    fn ok(a: &Access, method: Method, path: &str, h: &HeaderMap) -> bool {
        a.admit(&method, path, h).is_ok()
    }

    #[test]
    fn each_route_class_asks_for_its_own_token() {
        let a = Access::new(&cfg(), Some(&secret()), LOOPBACK).expect("valid");
        let get = Method::GET;
        assert_eq!(Guard::of(&get, "/v1/models"), Guard::ApiKey);
        assert_eq!(Guard::of(&get, "/admin/workers"), Guard::Admin);
        assert_eq!(Guard::of(&get, "/health"), Guard::Open);
        assert_eq!(
            Guard::of(&Method::DELETE, "/registry/segments/x"),
            Guard::Registry { write: true }
        );
        assert_eq!(
            Guard::of(&get, "/registry/segments"),
            Guard::Registry { write: false }
        );
        assert_eq!(Guard::of(&get, "/v1x"), Guard::Open, "not under /v1");
        for key in ["k", "k2"] {
            assert!(ok(&a, Method::POST, "/v1/completions", &bearer(key)));
        }
        assert_eq!(a.api_keys, ["k", "k2"], "a repeated key is one key");
        assert!(
            !ok(&a, get.clone(), "/v1/models", &bearer("a")),
            "admin token is not an API key"
        );
        assert!(
            !ok(&a, get.clone(), "/admin/workers", &bearer("k")),
            "API key is not the admin token"
        );
        assert!(ok(&a, get.clone(), "/admin/workers", &bearer("a")));
        assert!(!ok(&a, get.clone(), "/v1/models", &HeaderMap::new()));
        assert!(!ok(&a, get.clone(), "/v1/models", &bearer("kk")));
        assert!(ok(&a, get.clone(), "/health", &HeaderMap::new()));
        let open = Access::new(&ServerConfig::default(), None, LOOPBACK).expect("valid");
        assert!(
            ok(&open, get, "/v1/models", &HeaderMap::new()),
            "no key set"
        );
    }

    #[test]
    fn the_registry_takes_the_fleet_token_and_the_admin_token_only_reads() {
        let a = Access::new(&cfg(), Some(&secret()), LOOPBACK).expect("valid");
        let token = secret().registry_token();
        let path = "/registry/segments";
        assert!(ok(&a, Method::POST, path, &bearer(&token)));
        assert!(ok(&a, Method::GET, path, &bearer(&token)));
        assert!(!ok(&a, Method::POST, path, &HeaderMap::new()));
        assert!(!ok(&a, Method::GET, path, &HeaderMap::new()));
        assert!(!ok(&a, Method::POST, path, &bearer("k")));
        assert!(!ok(
            &a,
            Method::DELETE,
            "/registry/segments/x",
            &bearer("a")
        ));
        assert!(ok(&a, Method::GET, "/registry/segments/x", &bearer("a")));
    }

    #[test]
    fn without_a_secret_the_registry_is_open_on_loopback_only() {
        let on_loopback = Access::new(&ServerConfig::default(), None, LOOPBACK).expect("valid");
        assert!(ok(
            &on_loopback,
            Method::POST,
            "/registry/segments",
            &HeaderMap::new()
        ));
        let exposed = Access::new(&cfg(), None, ANY).expect("valid with an admin token");
        let refused = exposed
            .admit(&Method::POST, "/registry/segments", &bearer("anything"))
            .err()
            .map(|e| e.status);
        assert_eq!(refused, Some(http::StatusCode::FORBIDDEN));
        assert!(ok(
            &exposed,
            Method::GET,
            "/registry/segments",
            &bearer("a")
        ));
    }

    #[test]
    fn off_loopback_the_admin_token_is_required_at_start() {
        let err = Access::new(&ServerConfig::default(), Some(&secret()), ANY)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("server.admin_token"), "{err}");
        assert!(Access::new(&cfg(), None, ANY).is_ok());
        let empty = ServerConfig {
            admin_token: Some(" ".into()),
            ..ServerConfig::default()
        };
        assert!(Access::new(&empty, None, LOOPBACK).is_err());
        let empty_key = ServerConfig {
            api_keys: vec![String::new()],
            ..ServerConfig::default()
        };
        assert!(Access::new(&empty_key, None, LOOPBACK).is_err());
    }

    #[test]
    fn keys_file_lines_are_keys() {
        let dir = std::env::temp_dir().join(format!("pdgate-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys");
        std::fs::write(&path, "# ops team\nsk-one\n\n  sk-two  \n").expect("write");
        let cfg = ServerConfig {
            api_keys_file: Some(path),
            ..ServerConfig::default()
        };
        let a = Access::new(&cfg, None, LOOPBACK).expect("valid");
        assert_eq!(a.api_keys, ["sk-one", "sk-two"]);
        let missing = ServerConfig {
            api_keys_file: Some(dir.join("nope")),
            ..ServerConfig::default()
        };
        assert!(Access::new(&missing, None, LOOPBACK).is_err());
    }
}
