//! Checking a gateway config before it serves: what the types cannot say. Models that clash,
//! worker URLs, discovery settings (each model's), the files the config names (read and parsed as the gateway would), and credentials
//! that fit the address it will bind. `pdgate serve --check` reports every problem at once, and
//! `pdgate serve` refuses to start on any. It reads files and resolves `server.host`; it never
//! binds, connects to an engine or calls the Kubernetes API.

use crate::access::Access;
use crate::config::{
    Config, DiscoveryKind, DnsDiscovery, KubernetesDiscovery, ReplicaSync, ReplicasConfig,
    ServedModel, WorkerConfig,
};
use pdgate_wire::fleet::FleetSecret;
use std::net::ToSocketAddrs;

/// Every problem found in one config, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the config has {} problem(s):", self.0.len())?;
        for p in &self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// `Ok` when `cfg` can be served as it is, else every problem found.
pub fn check(cfg: &Config) -> Result<(), Problems> {
    let mut out = cfg.model_problems();
    for (i, m) in cfg.served_models().iter().enumerate() {
        // The single-model config's keys are top-level; a `[[models]]` entry's are its own.
        let at = match cfg.models.is_empty() {
            true => String::new(),
            false => format!("models[{i}]."),
        };
        check_model(&at, m, &mut out);
    }
    check_files_and_credentials(cfg, &mut out);
    check_replicas(&cfg.replicas, &mut out);
    if out.is_empty() {
        Ok(())
    } else {
        Err(Problems(out))
    }
}

/// One model's engines: listed, or found by a discovery source that is set up; its tokenizer.
fn check_model(at: &str, m: &ServedModel, out: &mut Vec<String>) {
    let before = out.len();
    for (i, w) in m.workers.iter().enumerate() {
        check_worker(i, w, out);
    }
    match m.discovery.kind {
        DiscoveryKind::Static if m.workers.is_empty() && at.is_empty() => out.push(
            "no [[workers]] configured and discovery.kind is \"static\": list the engines, or \
             discover them (discovery.kind = \"kubernetes\" or \"dns\")"
                .into(),
        ),
        DiscoveryKind::Static if m.workers.is_empty() => out.push(
            "no [[models.workers]] configured and discovery.kind is \"static\": list the \
             model's engines, or discover them ([models.discovery] kind = \"kubernetes\" or \
             \"dns\")"
                .into(),
        ),
        DiscoveryKind::Static => {}
        DiscoveryKind::Kubernetes => check_kubernetes(&m.discovery.kubernetes, out),
        DiscoveryKind::Dns => check_dns(&m.discovery.dns, out),
    }
    let tokenizer_key = match at {
        "" => "model.tokenizer",
        _ => "tokenizer",
    };
    if let Some(path) = &m.tokenizer {
        match std::fs::read(path) {
            Ok(bytes) => {
                if let Err(e) = pdgate_scheduler::Tokenizer::from_json_bytes(&bytes) {
                    out.push(format!("{tokenizer_key} {}: {e}", path.display()));
                }
            }
            Err(e) => out.push(format!("{tokenizer_key} {}: {e}", path.display())),
        }
    }
    if !at.is_empty() {
        for p in &mut out[before..] {
            *p = format!("{at}{p} (model `{}`)", m.name);
        }
    }
}

/// Engines are reached over `http://host:port`: a URL the engine client would refuse, or one
/// leaning on an implicit port 80, is caught here rather than at the first request.
fn check_worker(i: usize, w: &WorkerConfig, out: &mut Vec<String>) {
    let key = format!("workers[{i}].url {:?}", w.url);
    let uri = match w.url.parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => return out.push(format!("{key}: not a URL ({e})")),
    };
    if uri.scheme_str() != Some("http") {
        out.push(format!("{key}: engines are reached over http://host:port"));
        return;
    }
    match uri.authority() {
        Some(a) if a.host().is_empty() => out.push(format!("{key}: no host")),
        Some(a) if a.port_u16().is_none() => out.push(format!("{key}: no port")),
        Some(a) if a.port_u16() == Some(0) => out.push(format!("{key}: port 0")),
        Some(_) => {}
        None => out.push(format!("{key}: no host")),
    }
    for (key, ep) in [
        ("kv_events", &w.kv_events),
        ("kv_events_replay", &w.kv_events_replay),
    ] {
        if let Some(ep) = ep {
            if !crate::kv_events::is_tcp_endpoint(ep) {
                out.push(format!(
                    "workers[{i}].{key}: `{ep}` is not a tcp://host:port endpoint"
                ));
            }
        }
    }
    if w.kv_events.is_none() && w.kv_events_replay.is_some() {
        out.push(format!(
            "workers[{i}].kv_events_replay: set without kv_events"
        ));
    }
    if w.bootstrap_port == Some(0) {
        out.push(format!("workers[{i}].bootstrap_port: 0 is not a port"));
    }
}

fn check_kubernetes(k: &KubernetesDiscovery, out: &mut Vec<String>) {
    for (key, sel) in [
        ("prefill_selector", &k.prefill_selector),
        ("decode_selector", &k.decode_selector),
    ] {
        if let Err(e) = label_selector(sel) {
            out.push(format!(
                "discovery.kubernetes.{key} {sel:?}: {e} (discovery.kind = \"kubernetes\" needs \
                 a label selector per role, e.g. \"pdgate.io/role=prefill\")"
            ));
        }
    }
    if !k.namespace.is_empty() && !dns_label(&k.namespace) {
        out.push(format!(
            "discovery.kubernetes.namespace {:?}: not a namespace name (lowercase letters, \
             digits and '-', at most 63)",
            k.namespace
        ));
    }
    if k.resync_secs == 0 {
        out.push("discovery.kubernetes.resync_secs: must be at least 1".into());
    }
}

fn check_dns(d: &DnsDiscovery, out: &mut Vec<String>) {
    for (key, name) in [("prefill", &d.prefill), ("decode", &d.decode)] {
        if name.trim().is_empty() {
            out.push(format!(
                "discovery.dns.{key}: empty (discovery.kind = \"dns\" needs one name per role, \
                 e.g. a headless Service's)"
            ));
        } else if !name.split('.').all(dns_label_loose) {
            out.push(format!("discovery.dns.{key} {name:?}: not a DNS name"));
        }
    }
    if d.port == 0 {
        out.push("discovery.dns.port: 0 is not a port".into());
    }
    if d.interval_secs == 0 {
        out.push("discovery.dns.interval_secs: must be at least 1".into());
    }
}

/// What `Gateway::start` would read and refuse: the fleet secret, the API keys file, and
/// credentials that fit the bind address (`Access::new`, the same code).
fn check_files_and_credentials(cfg: &Config, out: &mut Vec<String>) {
    let secret = match FleetSecret::load(cfg.server.fleet_secret_file.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            out.push(format!("server.fleet_secret_file: {e}"));
            None
        }
    };
    let bound = match (cfg.server.host.as_str(), cfg.server.port).to_socket_addrs() {
        Ok(mut addrs) => addrs.next(),
        Err(e) => {
            out.push(format!("server.host {:?}: {e}", cfg.server.host));
            None
        }
    };
    if let Some(addr) = bound {
        if let Err(e) = Access::new(&cfg.server, secret.as_ref(), addr.ip()) {
            out.push(format!("{e:#}"));
        }
    }
}

/// Booking sync's broker settings, when it is on: a URL, a subject the broker takes as one plain
/// subject (no wildcards, no spaces), credential files that read, `user` with `password_file`.
fn check_replicas(r: &ReplicasConfig, out: &mut Vec<String>) {
    if r.sync == ReplicaSync::None {
        return;
    }
    if r.url.trim().is_empty() {
        out.push("replicas.url is empty (e.g. \"nats://127.0.0.1:4222\")".into());
    }
    let plain = |t: &str| !t.is_empty() && !t.contains(['*', '>', ' ', '\t']);
    if !r.subject.split('.').all(plain) {
        out.push(format!(
            "replicas.subject {:?}: dot-separated tokens without spaces or wildcards",
            r.subject
        ));
    }
    for (key, path) in [
        ("replicas.token_file", &r.token_file),
        ("replicas.password_file", &r.password_file),
    ] {
        if let Some(path) = path {
            if let Err(e) = std::fs::read_to_string(path) {
                out.push(format!("{key} {}: {e}", path.display()));
            }
        }
    }
    if r.user.is_some() != r.password_file.is_some() {
        out.push("replicas.user and replicas.password_file go together".into());
    }
}

/// A Kubernetes label selector as the API server takes it: comma-separated requirements, each
/// `key`, `!key`, `key=value`, `key==value`, `key!=value`, or `key in|notin (v1,v2)`.
fn label_selector(sel: &str) -> Result<(), String> {
    if sel.trim().is_empty() {
        return Err("empty".into());
    }
    let mut depth = 0usize;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, c) in sel.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
            ',' if depth == 0 => {
                parts.push(&sel[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&sel[start..]);
    for part in parts {
        requirement(part.trim()).map_err(|e| format!("requirement {part:?}: {e}"))?;
    }
    Ok(())
}

fn requirement(r: &str) -> Result<(), String> {
    if r.is_empty() {
        return Err("empty".into());
    }
    for op in ["!=", "==", "="] {
        if let Some((k, v)) = r.split_once(op) {
            label_key(k.trim())?;
            return label_value(v.trim());
        }
    }
    let words: Vec<&str> = r.splitn(2, char::is_whitespace).collect();
    match words.as_slice() {
        [k] => label_key(k.strip_prefix('!').unwrap_or(k)),
        [k, rest] => {
            label_key(k)?;
            let rest = rest.trim_start();
            let set = rest
                .strip_prefix("notin")
                .or_else(|| rest.strip_prefix("in"))
                .ok_or("expected =, ==, !=, in or notin")?
                .trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or("a set is written (v1,v2)")?;
            inner.split(',').try_for_each(|v| label_value(v.trim()))
        }
        _ => Err("empty".into()),
    }
}

/// `[prefix/]name`: the prefix a DNS subdomain, the name 1-63 of `[A-Za-z0-9._-]`, alphanumeric
/// at both ends.
fn label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || !p.split('.').all(dns_label) {
            return Err(format!("label key prefix {p:?} is not a DNS subdomain"));
        }
    }
    if name.is_empty() || !label_value_chars(name) {
        return Err(format!("label key {k:?} is not a label name"));
    }
    Ok(())
}

fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || label_value_chars(v) {
        Ok(())
    } else {
        Err(format!("label value {v:?} is not a label value"))
    }
}

fn label_value_chars(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// An RFC 1123 label: lowercase letters, digits and '-', 1-63, alphanumeric at both ends.
fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(|c| *c != b'-')
        && b.last().is_some_and(|c| *c != b'-')
}

/// A DNS name's label as resolvers take it (any case, `_` allowed for SRV-style names).
fn dns_label_loose(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_scheduler::Role;

    fn worker(url: &str) -> WorkerConfig {
        WorkerConfig {
            url: url.into(),
            role: Role::Prefill,
            protocol: Default::default(),
            bootstrap_port: None,
            kv_events: None,
            kv_events_replay: None,
        }
    }

    fn problems(cfg: &Config) -> Vec<String> {
        check(cfg).err().map(|p| p.0).unwrap_or_default()
    }

    #[test]
    fn worker_urls_need_http_host_and_port() {
        let mut cfg = Config::default();
        for (url, ok) in [
            ("http://10.0.0.1:8000", true),
            ("http://prefill-0.ns.svc:8100/", true),
            ("http://[::1]:8000", true),
            ("http://x", false),
            ("https://x:443", false),
            ("x:8000", false),
            ("http://:8000", false),
            ("not a url", false),
        ] {
            cfg.workers = vec![worker(url)];
            assert_eq!(problems(&cfg).is_empty(), ok, "{url}: {:?}", problems(&cfg));
        }
    }

    #[test]
    fn label_selectors_follow_the_api_grammar() {
        for ok in [
            "pdgate.io/role=prefill",
            "pdgate.io/role=prefill,pdgate.io/model=llama-3-8b,app.kubernetes.io/instance=r",
            "tier in (a,b), !legacy, env!=dev, x==y",
        ] {
            assert_eq!(label_selector(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            " ",
            "a=b,",
            "role=pre fill",
            "Bad_Prefix/x=y",
            "a in (b",
            "a b",
        ] {
            assert!(label_selector(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn each_discovery_kind_needs_its_settings() {
        let mut cfg = Config::default();
        assert!(problems(&cfg)[0].contains("no [[workers]]"));
        cfg.discovery.kind = DiscoveryKind::Kubernetes;
        assert_eq!(
            problems(&cfg),
            Vec::<String>::new(),
            "defaults select by role"
        );
        cfg.discovery.kubernetes.decode_selector.clear();
        let p = problems(&cfg);
        assert!(p.len() == 1 && p[0].contains("decode_selector"), "{p:?}");
        cfg.discovery.kind = DiscoveryKind::Dns;
        let p = problems(&cfg);
        assert!(
            p.iter().any(|m| m.contains("discovery.dns.prefill")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("discovery.dns.decode")),
            "{p:?}"
        );
        cfg.discovery.dns.prefill = "pd-prefill.ns.svc.cluster.local".into();
        cfg.discovery.dns.decode = "pd-decode.ns.svc.cluster.local".into();
        assert_eq!(problems(&cfg), Vec::<String>::new());
    }

    #[test]
    fn named_files_must_be_readable_and_credentials_fit_the_bind() {
        let mut cfg = Config {
            workers: vec![worker("http://127.0.0.1:8101")],
            ..Config::default()
        };
        cfg.model.tokenizer = Some("/nonexistent/tokenizer.json".into());
        cfg.server.fleet_secret_file = Some("/nonexistent/fleet".into());
        cfg.server.host = "0.0.0.0".into();
        let p = problems(&cfg);
        assert!(p.iter().any(|m| m.contains("model.tokenizer")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("fleet secret")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("admin_token")), "{p:?}");
    }

    #[test]
    fn every_model_is_checked_under_its_own_key() {
        use crate::config::ModelEntry;
        let model = |name: &str, urls: &[&str]| ModelEntry {
            name: name.into(),
            workers: urls.iter().map(|u| worker(u)).collect(),
            ..ModelEntry::default()
        };
        let mut cfg = Config {
            models: vec![
                model("a", &["http://127.0.0.1:8101"]),
                model("b", &["http://127.0.0.1:8201"]),
            ],
            ..Config::default()
        };
        assert_eq!(problems(&cfg), Vec::<String>::new());
        cfg.models[1].workers = vec![worker("http://x")];
        cfg.models[1].tokenizer = Some("/nonexistent/tokenizer.json".into());
        let p = problems(&cfg);
        assert!(
            p.iter()
                .any(|m| m.starts_with("models[1].workers[0].url") && m.ends_with("(model `b`)")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.starts_with("models[1].tokenizer")),
            "{p:?}"
        );
        cfg.models[1] = model("b", &[]);
        let p = problems(&cfg);
        assert!(
            p.len() == 1 && p[0].contains("no [[models.workers]]"),
            "{p:?}"
        );
        cfg.models[1] = model("a", &["http://127.0.0.1:8101"]);
        let p = problems(&cfg);
        assert!(
            p.iter().any(|m| m.contains("already names model `a`")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("an engine serves one model")),
            "{p:?}"
        );
        cfg.models[1] = model("b", &["http://127.0.0.1:8201"]);
        cfg.models[1].discovery.kind = DiscoveryKind::Dns;
        let p = problems(&cfg);
        assert!(
            p.iter()
                .any(|m| m.starts_with("models[1].discovery.dns.prefill")),
            "{p:?}"
        );
    }

    #[test]
    fn booking_sync_needs_a_plain_subject_and_readable_credentials() {
        let mut cfg = Config {
            workers: vec![worker("http://127.0.0.1:8101")],
            ..Config::default()
        };
        cfg.replicas.subject = "pdgate.*".into();
        cfg.replicas.token_file = Some("/nonexistent/token".into());
        cfg.replicas.user = Some("pdgate".into());
        assert!(problems(&cfg).is_empty(), "checked while sync is off");
        cfg.replicas.sync = ReplicaSync::Nats;
        let p = problems(&cfg);
        assert!(p.iter().any(|m| m.contains("replicas.subject")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("replicas.token_file")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("go together")), "{p:?}");
    }
}
