//! pdgate, the gateway: OpenAI-compatible endpoint, request pipeline, engine protocol adapters,
//! worker registry and health, admin API, metrics, config and the CLI. It wires the scheduler
//! (decisions), the transfer engine (KV movement) and the reference engine (the demo fleet).

pub mod admin;
pub mod batch;
pub mod booking;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod engine_metrics;
pub mod error;
pub mod gateway;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod openai;
pub mod pipeline;
pub mod protocol;
pub mod relay;
pub mod replay_cmd;
pub mod segments;
pub mod server;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod transfer_bench;
pub mod up;
pub mod upstream;
pub mod workers;

pub use gateway::Gateway;
pub use up::Fleet;
