//! Logging setup: structured `tracing` output, filter from `RUST_LOG` or the config.

use crate::config::LogConfig;
use tracing_subscriber::EnvFilter;

pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    // Ignored if a subscriber is already set (tests).
    let _ = if cfg.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
