//! pdgate's scheduler: a pure library that turns a prompt into a prefix key and picks the
//! (prefill, decode) instance pair for a request.
//!
//! It must never do I/O, read a clock, or depend on an async runtime: time and measurements come
//! in as arguments, so the same code runs live in the gateway and in virtual time in a simulator,
//! and is deterministic for a given input and seed.

pub mod blocks;
pub mod load;
pub mod policy;
pub mod prompt;
pub mod scheduler;
pub mod tokenizer;
pub mod types;

pub use blocks::{BlockHash, BlockHasher};
pub use load::InstanceLoad;
pub use policy::{Policy, PolicyKind};
pub use scheduler::{Decision, Rejection, RequestKey, Scheduler};
pub use tokenizer::{BuiltinTokenizer, TokenId};
pub use types::{InstanceId, Role};
