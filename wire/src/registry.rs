//! The segment registry the gateway hosts for the engines' transfer endpoints.

/// `GET` lists, `POST` publishes, `GET/DELETE {path}/{name}` reads or withdraws one segment.
pub const REGISTRY_PATH: &str = "/registry/segments";
