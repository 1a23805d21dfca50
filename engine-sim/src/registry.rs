//! A client of the gateway-hosted segment registry (`/registry/segments`), implementing the
//! transfer engine's `MetadataStore` over HTTP. The wire shape is `SegmentDesc` as JSON.

use async_trait::async_trait;
use pdgate_transfer::{MetadataStore, SegmentDesc, TransferError};
use std::time::Duration;

use pdgate_wire::registry::REGISTRY_PATH;

pub struct HttpRegistry {
    base: String,
    client: reqwest::Client,
}

impl HttpRegistry {
    pub fn new(base_url: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            client,
        }
    }

    fn url(&self, name: Option<&str>) -> String {
        match name {
            Some(n) => format!("{}{REGISTRY_PATH}/{n}", self.base),
            None => format!("{}{REGISTRY_PATH}", self.base),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> TransferError {
    TransferError::PeerUnavailable(format!("segment registry: {e}"))
}

#[async_trait]
impl MetadataStore for HttpRegistry {
    async fn publish(&self, desc: SegmentDesc) -> Result<(), TransferError> {
        let resp = self
            .client
            .post(self.url(None))
            .json(&desc)
            .send()
            .await
            .map_err(unavailable)?;
        resp.error_for_status().map(|_| ()).map_err(unavailable)
    }

    async fn lookup(&self, name: &str) -> Result<Option<SegmentDesc>, TransferError> {
        let resp = self
            .client
            .get(self.url(Some(name)))
            .send()
            .await
            .map_err(unavailable)?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = resp.error_for_status().map_err(unavailable)?;
        resp.json().await.map(Some).map_err(unavailable)
    }

    async fn remove(&self, name: &str) -> Result<(), TransferError> {
        let resp = self
            .client
            .delete(self.url(Some(name)))
            .send()
            .await
            .map_err(unavailable)?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        resp.error_for_status().map(|_| ()).map_err(unavailable)
    }

    async fn list(&self) -> Result<Vec<SegmentDesc>, TransferError> {
        let resp = self
            .client
            .get(self.url(None))
            .send()
            .await
            .map_err(unavailable)?;
        resp.error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }
}
