//! The fleet secret: what proves a process belongs to the fleet (the gateway and its engines).
//! It comes from a file or the environment, never from the command line, where any local user
//! could read it in the process list. Everything the fleet authenticates derives its key from it
//! by purpose, so one leaked derived token opens one door, not all.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

/// The environment variable holding the secret when no file is configured.
pub const SECRET_ENV: &str = "PDGATE_FLEET_SECRET";
/// Shortest secret accepted: 128 bits of a random hex or base64 string.
pub const MIN_SECRET_BYTES: usize = 16;
/// Largest secret file read.
const MAX_SECRET_BYTES: usize = 4096;

#[derive(Clone)]
pub struct FleetSecret(Vec<u8>);

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSecret(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError(pub String);

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SecretError {}

impl FleetSecret {
    /// A secret from its bytes (surrounding whitespace, e.g. a file's last newline, dropped).
    pub fn new(bytes: &[u8]) -> Result<Self, SecretError> {
        let bytes = bytes.trim_ascii();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError(format!(
                "the fleet secret must be at least {MIN_SECRET_BYTES} bytes (got {})",
                bytes.len()
            )));
        }
        if bytes.len() > MAX_SECRET_BYTES {
            return Err(SecretError(format!(
                "the fleet secret must be at most {MAX_SECRET_BYTES} bytes"
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The secret from `file` when one is configured, else from `PDGATE_FLEET_SECRET`, else none.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>, SecretError> {
        if let Some(path) = file {
            let bytes = std::fs::read(path).map_err(|e| {
                SecretError(format!("reading the fleet secret {}: {e}", path.display()))
            })?;
            return Self::new(&bytes).map(Some);
        }
        match std::env::var(SECRET_ENV) {
            Ok(v) => Self::new(v.as_bytes()).map(Some),
            Err(_) => Ok(None),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A key for one purpose (HMAC-SHA256 of the purpose under the secret), hex-encoded.
    pub fn derive(&self, purpose: &str) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(m) => m,
            // HMAC takes keys of any length; this arm cannot be reached.
            Err(_) => return String::new(),
        };
        mac.update(purpose.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The bearer token engines present to the gateway's segment registry.
    pub fn registry_token(&self) -> String {
        self.derive("pdgate registry v1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_secrets_are_refused_and_whitespace_dropped() {
        assert!(FleetSecret::new(b"short").is_err());
        let a = FleetSecret::new(b"0123456789abcdef0123\n").expect("long enough");
        let b = FleetSecret::new(b"0123456789abcdef0123").expect("long enough");
        assert_eq!(a.as_bytes(), b.as_bytes());
        assert_eq!(format!("{a:?}"), "FleetSecret(..)", "never printed");
    }

    #[test]
    fn derived_keys_differ_by_purpose_and_by_secret() {
        let a = FleetSecret::new(b"0123456789abcdef0123").expect("ok");
        let b = FleetSecret::new(b"0123456789abcdef0124").expect("ok");
        assert_eq!(a.registry_token().len(), 64);
        assert_eq!(a.registry_token(), a.derive("pdgate registry v1"));
        assert_ne!(a.registry_token(), a.derive("pdgate transfer v1"));
        assert_ne!(a.registry_token(), b.registry_token());
    }

    #[test]
    fn a_configured_file_is_read_and_a_missing_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("pdgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("secret");
        std::fs::write(&path, "0123456789abcdef0123\n").expect("write");
        let s = FleetSecret::load(Some(&path))
            .expect("loads")
            .expect("some");
        assert_eq!(s.as_bytes(), b"0123456789abcdef0123");
        assert!(FleetSecret::load(Some(&dir.join("nope"))).is_err());
    }
}
