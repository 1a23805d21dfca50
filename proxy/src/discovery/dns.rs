//! DNS discovery: a headless Service name per role, re-resolved every `interval_secs`. SRV
//! records (`_http._tcp.<name>`, a Service port named `http`) give each engine's port; without
//! them the A/AAAA records and the configured port do. An address that disappears drains its
//! worker. A failed lookup (timeout, server failure) changes nothing: only an answer, empty or
//! not, is the new set, so a flaky resolver never empties the fleet.

use super::membership::{engine_url, Membership};
use crate::config::{DnsDiscovery, WorkerConfig};
use crate::fleet::Fleet;
use anyhow::Context;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use pdgate_scheduler::Role;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

const SOURCE: &str = "dns";
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

pub fn start(cfg: &DnsDiscovery, fleet: &Arc<Fleet>) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let resolver = resolver(&cfg.nameserver)?;
    let every = Duration::from_secs(cfg.interval_secs.max(1));
    let roles = [(Role::Prefill, &cfg.prefill), (Role::Decode, &cfg.decode)];
    anyhow::ensure!(
        roles.iter().any(|(_, n)| !n.is_empty()),
        "discovery.dns: set discovery.dns.prefill and discovery.dns.decode (Service names)"
    );
    Ok(roles
        .into_iter()
        .filter(|(_, name)| !name.is_empty())
        .map(|(role, name)| {
            let m = Membership::new(SOURCE, role, Arc::clone(fleet));
            let task = Poll {
                resolver: resolver.clone(),
                name: name.clone(),
                cfg: cfg.clone(),
            };
            tokio::spawn(task.run(every, m))
        })
        .collect())
}

/// The system resolver (`/etc/resolv.conf`), or the one name server `ip:port` given. Answers are
/// not cached: every round asks again, so a removal is seen at the next round whatever TTL the
/// records carry.
fn resolver(nameserver: &str) -> anyhow::Result<TokioResolver> {
    let mut builder = if nameserver.is_empty() {
        TokioResolver::builder_tokio().context("discovery.dns: reading the system resolver")?
    } else {
        let addr: SocketAddr = nameserver
            .parse()
            .with_context(|| format!("discovery.dns.nameserver `{nameserver}` is not ip:port"))?;
        let conns = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
            .into_iter()
            .map(|mut c| {
                c.port = addr.port();
                c
            })
            .collect();
        let ns = NameServerConfig::new(addr.ip(), true, conns);
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    // One try of a bounded length: a round that fails is retried by the next round anyway, and
    // a lookup of minutes would hold the whole role's view that long.
    opts.timeout = LOOKUP_TIMEOUT;
    opts.attempts = 1;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    builder
        .build()
        .context("discovery.dns: building the resolver")
}

struct Poll {
    resolver: TokioResolver,
    name: String,
    cfg: DnsDiscovery,
}

impl Poll {
    async fn run(self, every: Duration, mut m: Membership) {
        let role = m.role;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.addresses().await {
                Ok(addrs) => {
                    crate::metrics::discovery_event(SOURCE, "resolved");
                    let all: HashMap<String, WorkerConfig> = addrs
                        .into_iter()
                        .map(|a| (a.to_string(), self.endpoint(role, a)))
                        .collect();
                    m.replace_all(all);
                }
                Err(e) => {
                    tracing::warn!(name = %self.name, role = %role, error = %e, "dns discovery: lookup failed; keeping the current workers");
                    crate::metrics::discovery_event(SOURCE, "error");
                }
            }
        }
    }

    fn endpoint(&self, role: Role, a: SocketAddr) -> WorkerConfig {
        WorkerConfig {
            url: engine_url(a.ip(), a.port()),
            role,
            protocol: self.cfg.protocol,
            bootstrap_port: (self.cfg.bootstrap_port > 0).then_some(self.cfg.bootstrap_port),
            kv_events: None,
            kv_events_replay: None,
        }
    }

    /// Every engine address the name has now: from SRV records, else A/AAAA and the port.
    async fn addresses(&self) -> Result<Vec<SocketAddr>, NetError> {
        let srv_name = format!("_http._tcp.{}", self.name);
        let targets: Vec<(String, u16)> = match self.resolver.srv_lookup(srv_name.as_str()).await {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(s) => Some((s.target.to_ascii(), s.port)),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(e),
        };
        if targets.is_empty() {
            return self.ips(&self.name, self.cfg.port).await;
        }
        let mut out = Vec::new();
        for (target, port) in targets {
            out.extend(self.ips(&target, port).await?);
        }
        Ok(out)
    }

    async fn ips(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, NetError> {
        match self.resolver.lookup_ip(name).await {
            Ok(ips) => Ok(ips
                .iter()
                .map(|ip: IpAddr| SocketAddr::new(ip, port))
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}
