//! pdgate's load-test toolkit: trace formats (Mooncake JSONL, ShareGPT conversations, synthetic
//! specs), prompt synthesis that turns block ids into text with real prefix reuse, an open-loop
//! replayer against any OpenAI-compatible endpoint, `vllm bench serve`-style metrics, reports
//! (terminal, JSON, Markdown, SVG plots) and a virtual-time fleet simulator that drives the real
//! `pdgate-scheduler` over `pdgate-engine-sim`'s timing and cache model.
//!
//! It must never depend on the gateway crate (the gateway depends on it for its CLI), and the
//! replayer must never let a slow server delay dispatch: lateness is measured, not absorbed.

pub mod arrivals;
pub mod client;
pub mod error;
pub mod metrics;
pub mod replay;
pub mod report;
pub mod scrape;
pub mod sim;
pub mod synth;
pub mod tokens;
pub mod trace;

pub use error::LoadtestError;
pub use metrics::{Aggregates, RequestRecord, Slo};
pub use report::types::Report;
pub use trace::types::{Prompt, Trace, TraceRequest};
