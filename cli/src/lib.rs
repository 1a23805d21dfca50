//! The `pdgate` binary's verbs, as a library so the end-to-end tests drive them in process:
//! `up` (gateway plus an embedded reference fleet), `serve`, `engine`, `replay`, `simulate`,
//! `transfer-bench`. It wires the gateway, the reference engine, the transfer engine and the load
//! tools together and holds no serving logic of its own.

pub mod cli;
pub mod config;
pub mod replay_cmd;
pub mod serve_check;
pub mod telemetry;
pub mod transfer_bench;
pub mod up;

pub use up::Fleet;
