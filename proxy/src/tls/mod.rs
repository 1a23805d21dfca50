//! TLS for the gateway's two sides, on rustls with the `ring` provider: the client listener's
//! certificate, swapped in place on reload (`listener`), and the trust and client certificate
//! the engine client uses for `https://` engines (`upstream`). Files are PEM; loading them is
//! `pem`'s. Nothing here reads a socket: the listener and the engine client own the streams.

pub mod listener;
mod pem;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

/// Why a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} from {}: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no {what}", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
    #[error("{0}")]
    Config(String),
}

impl TlsError {
    fn rustls(what: impl Into<String>) -> impl FnOnce(rustls::Error) -> Self {
        let what = what.into();
        move |source| Self::Rustls { what, source }
    }
}

/// The one crypto provider, named explicitly so that another provider enabled elsewhere in the
/// dependency tree never makes rustls' process default ambiguous. `ring` builds in seconds with
/// no C toolchain beyond `cc`; rustls deprecates it for lacking post-quantum key exchange, which
/// `aws-lc-rs` (a longer, cmake-free but heavier build) would add by changing this one line.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN: the gateway speaks HTTP/1.1 on both sides.
const ALPN_HTTP1: &[u8] = b"http/1.1";
