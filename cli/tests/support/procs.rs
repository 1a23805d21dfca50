//! Reference engines as separate `pdgate engine` processes, for tests where an engine dies,
//! hangs or restarts the way a real one does (SIGKILL, SIGSTOP, a restart on the same port).

use super::{client, eventually, metrics_text};
use pdgate::config::Protocol;
use pdgate_gateway::config::WorkerConfig;
use pdgate_scheduler::Role;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `pdgate engine` process on a fixed port, so it can be restarted where it was; killed on
/// drop.
pub struct EngineProcess {
    pub role: Role,
    pub protocol: Protocol,
    pub port: u16,
    pub url: String,
    /// `PDGATE_ENGINE_*` settings and the registry every start of it gets.
    env: Vec<(String, String)>,
    registry: Option<String>,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl EngineProcess {
    /// An engine not started yet: its URL is known, so a gateway can list it first.
    pub fn new(role: Role, protocol: Protocol) -> Self {
        let port = free_port();
        Self {
            role,
            protocol,
            port,
            url: format!("http://127.0.0.1:{port}"),
            env: vec![("PDGATE_ENGINE_TIMING__TIME_SCALE".into(), "0".into())],
            registry: None,
            child: None,
        }
    }

    /// An engine setting, as `PDGATE_ENGINE_{KEY}` (e.g. `MAX_TOKENS_LIMIT`).
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.env
            .push((format!("PDGATE_ENGINE_{key}"), value.into()));
        self
    }

    /// A raw environment variable every start of it gets (e.g. `PDGATE_FLEET_SECRET`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn registry(mut self, gateway_url: &str) -> Self {
        self.registry = Some(gateway_url.to_string());
        self
    }

    pub fn worker(&self) -> WorkerConfig {
        WorkerConfig {
            url: self.url.clone(),
            role: self.role,
            protocol: self.protocol,
            bootstrap_port: None,
            kv_events: None,
            kv_events_replay: None,
        }
    }

    /// Starts (or restarts) the process and waits until it answers `/health`.
    pub async fn start(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pdgate"));
        cmd.args(["--worker-threads", "1", "engine", "--role"])
            .arg(self.role.to_string())
            .args(["--protocol", &self.protocol.to_string()])
            .args(["--port", &self.port.to_string()])
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(r) = &self.registry {
            cmd.args(["--registry", r]);
        }
        self.child = Some(cmd.spawn().expect("engine starts"));
        let url = self.url.clone();
        let up = eventually(Duration::from_secs(30), || async {
            client()
                .get(format!("{url}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(up, "engine {} on {} came up", self.role, self.url);
    }

    /// Sends a signal (`-KILL`, `-STOP`, `-CONT`); after `-KILL` the process is reaped.
    pub fn signal(&mut self, sig: &str) {
        let child = self.child.as_mut().expect("started");
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig}");
        if sig == "-KILL" {
            let _ = child.wait();
            self.child = None;
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (a failed start exits).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub async fn metric(&self, name: &str) -> f64 {
        pdgate_wire::prometheus::sample(&metrics_text(&self.url).await, name).unwrap_or(0.0)
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `/admin/workers` of `gateway` shows the worker at `url` healthy.
pub async fn healthy(gateway: &str, url: &str) -> bool {
    super::admin_workers(gateway)
        .await
        .iter()
        .any(|w| w["url"] == url && w["healthy"] == true)
}
