//! A client of the gateway-hosted segment registry (`/registry/segments`), implementing the
//! transfer engine's `MetadataStore` over HTTP. The wire shape is `SegmentDesc` as JSON; every
//! call carries the fleet's registry token (`pdgate_wire::registry` has the contract).

use async_trait::async_trait;
use parking_lot::Mutex;
use pdgate_transfer::{MetadataStore, SegmentDesc, TransferError};
use pdgate_wire::fleet::FleetSecret;
use pdgate_wire::registry::{OWNER_PARAM, REGISTRY_PATH};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Longest this engine waits, in all, for a name another endpoint holds to expire (e.g. its
/// own entry from before a crash, under a new transfer port): longer than the gateway's
/// default TTL (30 s) plus one purge interval.
const MAX_CLAIM_WAIT: Duration = Duration::from_secs(60);

pub struct HttpRegistry {
    base: String,
    client: reqwest::Client,
    /// `Bearer <registry token>`, when the engine holds the fleet secret.
    auth: Option<String>,
    /// The endpoint each name was published with: a withdrawal must name its owner. Holds this
    /// engine's own segments only (one or two).
    published: Mutex<HashMap<String, String>>,
}

impl HttpRegistry {
    /// A client of the registry at `base_url`, presenting `secret`'s registry token (without
    /// one, only a gateway bound to loopback with no secret of its own accepts the calls).
    pub fn new(base_url: &str, secret: Option<&FleetSecret>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            client,
            auth: secret.map(|s| format!("Bearer {}", s.registry_token())),
            published: Mutex::new(HashMap::new()),
        }
    }

    fn url(&self, name: Option<&str>) -> String {
        match name {
            Some(n) => format!("{}{REGISTRY_PATH}/{n}", self.base),
            None => format!("{}{REGISTRY_PATH}", self.base),
        }
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some(a) => rb.header(reqwest::header::AUTHORIZATION, a),
            None => rb,
        }
    }

    /// The response, or an error that says what to fix when the registry refused this
    /// engine's credential.
    fn checked(&self, resp: reqwest::Response) -> Result<reqwest::Response, TransferError> {
        match resp.status() {
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                Err(unavailable(format!(
                    "{} refused this engine's credential ({}): give the engine the gateway's \
                     fleet secret (fleet_secret_file or PDGATE_FLEET_SECRET)",
                    self.base,
                    resp.status()
                )))
            }
            _ => resp.error_for_status().map_err(unavailable),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> TransferError {
    TransferError::PeerUnavailable(format!("segment registry: {e}"))
}

/// The seconds a 409's `Retry-After` names.
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let secs = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(secs))
}

#[async_trait]
impl MetadataStore for HttpRegistry {
    /// Publishes `desc`; when another endpoint still holds the name, waits (bounded) for that
    /// entry to expire, as the registry's `Retry-After` says, then tries again.
    async fn publish(&self, desc: SegmentDesc) -> Result<(), TransferError> {
        let deadline = Instant::now() + MAX_CLAIM_WAIT;
        loop {
            let req = self.client.post(self.url(None)).json(&desc);
            let resp = self.authed(req).send().await.map_err(unavailable)?;
            if resp.status() == reqwest::StatusCode::CONFLICT {
                let wait = retry_after(&resp).unwrap_or(Duration::from_secs(1));
                if Instant::now() + wait <= deadline {
                    tracing::warn!(segment = %desc.name, wait_secs = wait.as_secs(), "another endpoint holds this segment name; waiting for its entry to expire");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            self.checked(resp)?;
            self.published
                .lock()
                .insert(desc.name.clone(), desc.endpoint.clone());
            return Ok(());
        }
    }

    async fn lookup(&self, name: &str) -> Result<Option<SegmentDesc>, TransferError> {
        let req = self.client.get(self.url(Some(name)));
        let resp = self.authed(req).send().await.map_err(unavailable)?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.checked(resp)?;
        resp.json().await.map(Some).map_err(unavailable)
    }

    /// Withdraws a segment this engine published (the registry wants its owner's endpoint).
    async fn remove(&self, name: &str) -> Result<(), TransferError> {
        let Some(endpoint) = self.published.lock().get(name).cloned() else {
            return Err(unavailable(format!(
                "segment `{name}` was not published by this engine"
            )));
        };
        let req = self
            .client
            .delete(self.url(Some(name)))
            .query(&[(OWNER_PARAM, endpoint.as_str())]);
        let resp = self.authed(req).send().await.map_err(unavailable)?;
        if resp.status() != reqwest::StatusCode::NOT_FOUND {
            self.checked(resp)?;
        }
        self.published.lock().remove(name);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<SegmentDesc>, TransferError> {
        let req = self.client.get(self.url(None));
        let resp = self.authed(req).send().await.map_err(unavailable)?;
        self.checked(resp)?.json().await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{delete, post};
    use pdgate_transfer::TransportKind;
    use std::sync::Arc;

    /// What the fake registry saw: each call's method, `Authorization` and owner query.
    type Seen = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>;

    fn auth(h: &HeaderMap) -> Option<String> {
        h.get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// A registry that answers the first publish 409 (`Retry-After: 1`), then 201.
    async fn fake() -> (String, Seen) {
        let seen: Seen = Arc::default();
        let app = axum::Router::new()
            .route(
                REGISTRY_PATH,
                post(|State(s): State<Seen>, h: HeaderMap| async move {
                    let mut s = s.lock();
                    let first = s.is_empty();
                    s.push(("POST".into(), auth(&h), None));
                    match first {
                        true => (StatusCode::CONFLICT, [("retry-after", "1")]).into_response(),
                        false => StatusCode::CREATED.into_response(),
                    }
                }),
            )
            .route(
                &format!("{REGISTRY_PATH}/{{name}}"),
                delete(
                    |State(s): State<Seen>,
                     h: HeaderMap,
                     Query(q): Query<HashMap<String, String>>| async move {
                        s.lock()
                            .push(("DELETE".into(), auth(&h), q.get(OWNER_PARAM).cloned()));
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(Arc::clone(&seen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (url, seen)
    }

    #[tokio::test]
    async fn calls_carry_the_token_wait_out_a_held_name_and_withdraw_as_owner() {
        let (url, seen) = fake().await;
        let secret = FleetSecret::new(b"0123456789abcdef0123").expect("secret");
        let reg = HttpRegistry::new(&url, Some(&secret));
        let desc = SegmentDesc {
            name: "kv-m-1".into(),
            endpoint: "127.0.0.1:7000".into(),
            len: 64,
            transport: TransportKind::Tcp,
        };
        assert!(reg.remove("kv-m-1").await.is_err(), "not ours yet");
        let t0 = Instant::now();
        reg.publish(desc).await.expect("published after the wait");
        assert!(
            t0.elapsed() >= Duration::from_secs(1),
            "Retry-After honoured"
        );
        reg.remove("kv-m-1").await.expect("withdrawn");
        let bearer = Some(format!("Bearer {}", secret.registry_token()));
        let seen = seen.lock().clone();
        assert_eq!(
            seen,
            vec![
                ("POST".into(), bearer.clone(), None),
                ("POST".into(), bearer.clone(), None),
                ("DELETE".into(), bearer, Some("127.0.0.1:7000".into())),
            ]
        );
    }
}
