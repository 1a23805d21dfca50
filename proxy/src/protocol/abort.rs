//! Aborting legs on engines that offer an abort call (SGLang's `POST /abort_request {"rid"}`):
//! at once, or when a guard is dropped armed (client gone mid-relay).

use std::time::Duration;

/// Fire-and-forget `POST {url}/abort_request {"rid"}` (SGLang's abort call), bounded in time.
pub fn abort(client: &crate::http1::Client, url: &str, rid: &str) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let req = client
        .post(format!("{url}/abort_request"))
        .json(&serde_json::json!({"rid": rid}))
        .timeout(Duration::from_secs(5));
    let (url, rid) = (url.to_string(), rid.to_string());
    rt.spawn(async move {
        match req.send().await {
            Ok(_) => tracing::debug!(engine = %url, request_id = %rid, "aborted leg"),
            Err(e) => tracing::warn!(engine = %url, request_id = %rid, error = %e, "abort failed"),
        }
    });
}

/// Aborts a request's legs on the listed engines when dropped armed (client gone mid-relay).
pub struct AbortGuard {
    client: crate::http1::Client,
    urls: Vec<String>,
    rid: String,
    armed: bool,
}

impl AbortGuard {
    pub fn new(client: &crate::http1::Client, urls: Vec<String>, rid: &str) -> Self {
        Self {
            client: client.clone(),
            urls,
            rid: rid.to_string(),
            armed: true,
        }
    }

    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if self.armed {
            for url in &self.urls {
                abort(&self.client, url, &self.rid);
            }
        }
    }
}
