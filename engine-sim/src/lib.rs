//! pdgate's reference engine: an OpenAI-compatible worker that behaves like a real inference
//! engine without a GPU: continuous batching over a modelled step time, a block-based prefix cache
//! with LRU eviction, vLLM-named metrics, and KV blocks as real bytes (a deterministic function of
//! the prefix) moved between engines through `pdgate-transfer` and verified on arrival.
//!
//! It must stay an honest stand-in: it enforces the protocol it speaks and fails loudly on a
//! missing or corrupted KV block rather than producing text anyway.

pub mod batcher;
pub mod cache;
pub mod config;
pub mod engine;
pub mod export;
pub mod generate;
pub mod import;
pub mod kv;
pub mod kv_events;
pub mod logprobs;
pub mod openai;
pub mod pd;
pub mod peers;
pub mod pool;
pub mod protocol;
pub mod push;
pub mod registry;
pub mod server;
pub mod stats;
pub mod text;
pub mod verify;

pub use config::{EngineConfig, Faults, Protocol, TimingModel};
pub use server::{spawn, Engine, EngineHandle};
