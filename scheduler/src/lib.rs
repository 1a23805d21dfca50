//! pdgate's scheduler: a pure library that turns a prompt into a prefix key and picks the
//! (prefill, decode) instance pair for a request, or rejects it against the SLOs.
//!
//! It must never do I/O, read a clock, or depend on an async runtime: time and measurements come
//! in as arguments, so the same code runs live in the gateway and in virtual time in the
//! simulator, and is deterministic for a given input and seed.

pub mod blocks;
pub mod candidate;
pub mod config;
pub mod copies;
pub mod cost;
pub mod fleet;
pub mod index;
pub mod load;
pub mod policy;
pub mod predict;
pub mod prompts;
pub mod room;
pub mod scheduler;
pub mod steps;
pub mod tokenizer;
pub mod types;

pub use blocks::{BlockHash, BlockHasher};
pub use candidate::Pull;
pub use config::{CostModel, PolicyKind, ReuseConfig, SchedulerConfig, Slo, ROOM_POLL_MS};
pub use load::{EngineReport, InstanceLoad};
pub use policy::Policy;
pub use room::{Leaving, RoomLine};
pub use scheduler::{Booking, Decision, InstanceSpec, Observed, Scheduler};
pub use tokenizer::{BuiltinTokenizer, TokenId, Tokenizer};
pub use types::{InstanceId, Rejection, RequestKey, Role, SloBreach, Ticket};
