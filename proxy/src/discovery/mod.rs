//! Discovery: engines found at run time (Kubernetes pods, DNS records) kept in the fleet. Each
//! source reports what it sees per role; `Membership` turns that into the fleet's own add and
//! drain-remove (`Fleet::add`, `Fleet::remove_draining`, as the admin API uses; `membership.rs`). A source only
//! ever removes workers it added itself, and never holds more than one worker per key.

pub mod dns;
pub mod kubernetes;
pub mod membership;

use crate::config::{DiscoveryConfig, DiscoveryKind};
use crate::fleet::Fleet;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// The running discovery tasks of a gateway.
pub struct Discovery {
    tasks: Vec<JoinHandle<()>>,
}

impl Discovery {
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Starts one model's configured source, feeding that model's fleet; `None` for `static`. Errors are the source's setup (no
/// Kubernetes credentials, an unreadable resolver configuration): the gateway refuses to start
/// rather than serve a fleet it cannot see.
pub async fn start(cfg: &DiscoveryConfig, fleet: &Arc<Fleet>) -> anyhow::Result<Option<Discovery>> {
    let tasks = match cfg.kind {
        DiscoveryKind::Static => return Ok(None),
        DiscoveryKind::Kubernetes => kubernetes::start(&cfg.kubernetes, fleet).await?,
        DiscoveryKind::Dns => dns::start(&cfg.dns, fleet)?,
    };
    Ok(Some(Discovery { tasks }))
}
