//! pdgate's gateway: the serving path only. The OpenAI-compatible endpoint, the request pipeline,
//! the PD protocol adapters and the engine client, workers, health and breakers, admin, metrics
//! and config. It wires the scheduler (decisions) and the transfer plane's registry; it never
//! links the reference engine or the load tools, which the `pdgate` binary brings in.

pub mod access;
pub mod admin;
pub mod batch;
pub mod booking;
pub mod breaker;
pub mod config;
pub mod config_check;
pub mod continuation;
pub mod discovery;
pub mod engine_metrics;
pub mod error;
pub mod fleet;
pub mod gateway;
pub mod health;
pub mod http1;
pub mod inference;
pub mod kv_events;
pub mod listener;
pub mod metrics;
pub mod migrate;
pub mod models;
pub mod openai;
pub mod pipeline;
pub mod protocol;
pub mod ratelimit;
pub mod relay;
pub mod replica_sync;
pub mod request_id;
pub mod retry;
pub mod room_line;
pub mod segments;
pub mod server;
pub mod sse;
pub mod state;
pub mod tls;
pub mod workers;

pub use gateway::Gateway;
