//! A discovery source's share of the fleet: which worker each of its keys became. Every source
//! reports through this, and this changes the fleet only through `Fleet::add` and
//! `Fleet::remove_draining`, the admin API's path. It never touches workers it did not add.

use crate::config::WorkerConfig;
use crate::fleet::Fleet;
use pdgate_scheduler::{InstanceId, Role};
use std::collections::HashMap;
use std::sync::Arc;

/// The workers one source holds for one role, by a key that stays the same for the life of
/// what it names (a pod's UID; a DNS address). Readiness or an address is never part of the
/// key: a key whose endpoint changes replaces its worker, and a key that goes away takes its
/// worker with it, whatever the last state seen of it.
pub struct Membership {
    source: &'static str,
    pub(super) role: Role,
    fleet: Arc<Fleet>,
    held: HashMap<String, Held>,
}

struct Held {
    endpoint: WorkerConfig,
    id: InstanceId,
}

impl Membership {
    pub fn new(source: &'static str, role: Role, fleet: Arc<Fleet>) -> Self {
        Self {
            source,
            role,
            fleet,
            held: HashMap::new(),
        }
    }

    /// `key` is a worker at `endpoint`: added, replaced when its endpoint changed, or added
    /// again when someone removed it from the fleet (this source is the truth for its keys).
    pub fn upsert(&mut self, key: &str, endpoint: WorkerConfig) {
        if let Some(h) = self.held.get(key) {
            let present = self.fleet.workers.get(h.id).is_some();
            if h.endpoint == endpoint && present {
                return;
            }
            tracing::info!(
                source = self.source, key, from = %h.endpoint.url, to = %endpoint.url,
                "discovered worker changed"
            );
            self.remove(key);
        }
        tracing::info!(source = self.source, key, worker = %endpoint.url, role = %self.role, "worker discovered");
        let id = self.fleet.add(&endpoint).id;
        self.held.insert(key.to_string(), Held { endpoint, id });
        self.publish();
    }

    /// `key` is no longer a worker (gone, not ready, terminating): drained and removed.
    pub fn remove(&mut self, key: &str) {
        let Some(h) = self.held.remove(key) else {
            return;
        };
        tracing::info!(source = self.source, key, worker = %h.endpoint.url, role = %self.role, "discovered worker left");
        self.fleet.remove_draining(h.id);
        self.publish();
    }

    /// `all` is every worker of this source and role now: the rest are removed.
    pub fn replace_all(&mut self, all: HashMap<String, WorkerConfig>) {
        let gone: Vec<String> = self
            .held
            .keys()
            .filter(|k| !all.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove(&k);
        }
        for (k, e) in all {
            self.upsert(&k, e);
        }
        self.publish();
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn publish(&self) {
        crate::metrics::discovery_workers(
            self.source,
            &self.fleet.model,
            self.role,
            self.held.len(),
        );
    }
}

/// `http://ip:port`, brackets around an IPv6 address.
pub fn engine_url(ip: std::net::IpAddr, port: u16) -> String {
    format!("http://{}", std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn ep(url: &str) -> WorkerConfig {
        WorkerConfig {
            url: url.into(),
            role: Role::Decode,
            protocol: Protocol::Native,
            bootstrap_port: None,
        }
    }

    fn urls(fleet: &Fleet) -> Vec<String> {
        let mut u: Vec<String> = fleet.workers.all().iter().map(|w| w.url.clone()).collect();
        u.sort();
        u
    }

    #[test]
    fn a_key_holds_one_worker_whatever_its_endpoint_did() {
        let fleet = Arc::new(Fleet::new(Default::default()));
        let mut m = Membership::new("test", Role::Decode, Arc::clone(&fleet));
        m.upsert("uid-a", ep("http://10.0.0.1:8000"));
        m.upsert("uid-a", ep("http://10.0.0.1:8000"));
        assert_eq!(
            urls(&fleet),
            ["http://10.0.0.1:8000"],
            "same endpoint: one worker"
        );
        m.upsert("uid-a", ep("http://10.0.0.2:8000"));
        assert_eq!(
            urls(&fleet),
            ["http://10.0.0.2:8000"],
            "a new address replaces the old"
        );
        m.remove("uid-a");
        assert!(
            urls(&fleet).is_empty(),
            "removed by key, not by the last endpoint seen"
        );
        m.upsert("uid-b", ep("http://10.0.0.3:8000"));
        m.upsert("uid-c", ep("http://10.0.0.4:8000"));
        m.replace_all(HashMap::from([(
            "uid-c".to_string(),
            ep("http://10.0.0.4:8000"),
        )]));
        assert_eq!(urls(&fleet), ["http://10.0.0.4:8000"]);
        assert_eq!(m.len(), 1);
        assert_eq!(fleet.scheduler.lock().healthy_counts(), (0, 0));
    }

    #[test]
    fn a_worker_removed_by_hand_comes_back_while_its_source_still_has_it() {
        let fleet = Arc::new(Fleet::new(Default::default()));
        let mut m = Membership::new("test", Role::Decode, Arc::clone(&fleet));
        m.upsert("k", ep("http://10.0.0.1:8000"));
        let id = fleet.workers.all()[0].id;
        fleet.remove_draining(id);
        m.upsert("k", ep("http://10.0.0.1:8000"));
        assert_eq!(urls(&fleet), ["http://10.0.0.1:8000"]);
    }

    #[test]
    fn ipv6_engine_urls_are_bracketed() {
        assert_eq!(
            engine_url("fd00::1".parse().expect("ip"), 8000),
            "http://[fd00::1]:8000"
        );
        assert_eq!(
            engine_url("10.1.2.3".parse().expect("ip"), 80),
            "http://10.1.2.3:80"
        );
    }
}
