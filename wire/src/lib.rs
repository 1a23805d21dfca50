//! What the gateway and the reference engine must agree on, and nothing else: both depend on
//! this crate, neither on the other. A change here is a change of the contract between them.

pub mod fleet;
pub mod kv_events;
pub mod native;
pub mod openai;
pub mod prometheus;
pub mod prompt;
pub mod protocol;
pub mod registry;

pub use protocol::Protocol;
