//! Reference engines as processes of their own (`pdgate engine`), for tests that stop or kill
//! one: SIGSTOP (a hang) and SIGKILL (a death) reach only a real process.

use super::{client, eventually};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `pdgate engine` process, killed on drop.
pub struct EngineProcess {
    child: Child,
    pub url: String,
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts an engine of `role` speaking `protocol` (its CLI name), with `time_scale` (0: no
/// modelled time; larger: slower steps), and waits until it answers `/health`.
pub async fn engine_process(role: &str, protocol: &str, time_scale: f64) -> EngineProcess {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_pdgate"))
        .args(["engine", "--role", role, "--protocol", protocol])
        .args(["--time-scale", &time_scale.to_string()])
        .args(["--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("engine starts");
    let url = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(20), || async {
        client()
            .get(format!("{url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(up, "engine {role} on {url} came up");
    EngineProcess { child, url }
}

/// Sends `sig` (`-STOP`, `-CONT`, `-KILL`) to the engine's process.
pub fn signal(e: &EngineProcess, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &e.child.id().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig}");
}

/// Whether the gateway at `gateway` lists the worker at `url` as healthy.
pub async fn healthy(gateway: &str, url: &str) -> bool {
    super::admin_workers(gateway)
        .await
        .iter()
        .any(|w| w["url"] == url && w["healthy"] == true)
}
