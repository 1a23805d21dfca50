//! HTTP/1.1, both ways, written for the gateway's two hot paths: the server side of client
//! connections (`server`) and the client side of engine hops (`client`, with its kept-alive
//! connection `pool`), sharing one body `framing` (content-length, chunked, until close) and
//! `httparse` for heads. Why by hand: on the inference path, hyper's and a pooled client's
//! machinery (connection tasks, dispatch channels, extra wake-ups) were a fifth of the gateway's
//! CPU per request; this keeps each exchange on the request's own task.

pub mod client;
pub mod error;
pub(crate) mod framing;
mod pool;
pub mod server;

pub use client::{Client, RequestBuilder, Response};
pub use error::Error;
