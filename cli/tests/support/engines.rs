//! Short forms over `procs::EngineProcess` for tests that start an engine once and stop or
//! kill it (SIGSTOP, a hang; SIGKILL, a death) without restarting it.

pub use super::procs::EngineProcess;
use std::process::Command;

/// Starts an engine of `role` speaking `protocol` (their CLI names), with `time_scale` (0: no
/// modelled time; larger: slower steps), and waits until it answers `/health`.
pub async fn engine_process(role: &str, protocol: &str, time_scale: f64) -> EngineProcess {
    engine_process_with(role, protocol, time_scale, &[]).await
}

/// As [`engine_process`], with extra environment (`PDGATE_ENGINE_*` config, the fleet secret).
pub async fn engine_process_with(
    role: &str,
    protocol: &str,
    time_scale: f64,
    env: &[(&str, &str)],
) -> EngineProcess {
    let role = role.parse().expect("role");
    let protocol = protocol.parse().expect("protocol");
    let mut e =
        EngineProcess::new(role, protocol).setting("TIMING__TIME_SCALE", &time_scale.to_string());
    for (k, v) in env {
        e = e.env(k, v);
    }
    e.start().await;
    e
}

/// Sends `sig` (`-STOP`, `-CONT`, `-KILL`) to the engine's process; the process is reaped when
/// the `EngineProcess` drops.
pub fn signal(e: &EngineProcess, sig: &str) {
    let pid = e.pid().expect("started");
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig}");
}
