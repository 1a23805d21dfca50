//! Optional mutual TLS 1.3 on the TCP transport, for fleets whose transfer
//! traffic crosses networks nobody vouches for.
//!
//! Both ends present a certificate and verify the other's against the
//! fleet's CA: a listener accepts only clients whose certificate chains to
//! the CA, and a client accepts only servers whose certificate does and
//! names the host it dialled (the host part of the peer's endpoint, a DNS
//! name or an IP address SAN). The fleet-secret handshake (`auth`) still runs
//! inside the TLS session when a secret is set: defence in depth, so a
//! leaked certificate alone (or a CA that also signs other services) does
//! not open the plane, and the HMAC proofs, now encrypted, reveal nothing to
//! a passive observer either.
//!
//! TLS 1.3 only (X25519/P-256/P-384 key exchange, no post-quantum group), ring as the crypto provider (chosen here, not taken from
//! the process default, so another component's choice cannot change ours),
//! no session resumption (tickets would sit unread on pooled connections and
//! trip their liveness probe; connections are long-lived, so a full
//! handshake per connection costs little). The Unix commit socket of the
//! shm path stays plain: it never leaves the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::TransferError;

/// Where an engine's TLS material is: PEM files, read once at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This engine's certificate chain (leaf first). Its SANs must name the
    /// host peers dial (the advertised host), as a DNS name or IP address.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The fleet's CA certificate(s): peers in both directions must chain to
    /// one of them.
    pub ca: PathBuf,
}

/// An engine's TLS identity and trust, ready for both directions. Its
/// `Debug` shows nothing of the key.
#[derive(Clone)]
pub struct TlsIdentity {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) connector: TlsConnector,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(..)")
    }
}

impl TlsIdentity {
    /// Reads and checks the three PEM files.
    pub fn load(files: &TlsFiles) -> Result<TlsIdentity, TransferError> {
        let read = |what: &str, p: &Path| {
            std::fs::read(p)
                .map_err(|e| config(format!("reading the TLS {what} {}: {e}", p.display())))
        };
        TlsIdentity::from_pem(
            &read("certificate", &files.cert)?,
            &read("key", &files.key)?,
            &read("CA", &files.ca)?,
        )
    }

    /// From PEM text: the certificate chain, its key and the CA
    /// certificate(s).
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<TlsIdentity, TransferError> {
        let chain = certs(cert, "certificate")?;
        let roots = Arc::new(roots(&certs(ca, "CA")?)?);
        // rustls 0.23.48 deprecates this for lacking post-quantum key exchange
        // (aws-lc-rs has X25519MLKEM768); ring keeps the build free of aws-lc's
        // C toolchain. Recorded traffic is then not protected against a future
        // quantum adversary: docs/transfer.md says so.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| config(format!("TLS client verifier: {e}")))?;
        let key = || {
            PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| config(format!("TLS key: no usable private key in the PEM: {e}")))
        };
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(tls_config)?;
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key()?)
            .map_err(tls_config)?;
        client.resumption = Resumption::disabled();
        Ok(TlsIdentity {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TransferError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config(format!("TLS {what}: {e}")))?;
    if certs.is_empty() {
        return Err(config(format!("TLS {what}: no certificate in the PEM")));
    }
    Ok(certs)
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TransferError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| config(format!("TLS CA: {e}")))?;
    }
    Ok(roots)
}

/// The name a client verifies the server's certificate against: the host
/// part of `host:port` (brackets of an IPv6 literal removed).
pub(crate) fn server_name(endpoint: &str) -> Result<ServerName<'static>, TransferError> {
    let host = endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        config(format!(
            "{endpoint}: not a name a certificate can carry: {e}"
        ))
    })
}

fn config(m: String) -> TransferError {
    TransferError::Config(m)
}

fn tls_config(e: rustls::Error) -> TransferError {
    config(format!("TLS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_endpoint_host() {
        assert_eq!(
            format!("{:?}", server_name("127.0.0.1:7000").unwrap()),
            format!("{:?}", ServerName::try_from("127.0.0.1").unwrap())
        );
        assert!(server_name("[::1]:7000").is_ok());
        assert!(server_name("engine-3.fleet:7000").is_ok());
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn unusable_pem_is_a_config_error_naming_the_part() {
        let e = TlsIdentity::from_pem(b"", b"", b"").unwrap_err();
        assert!(
            matches!(&e, TransferError::Config(m) if m.contains("certificate")),
            "{e}"
        );
        let e = TlsIdentity::load(&TlsFiles {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
        })
        .unwrap_err();
        assert!(
            matches!(&e, TransferError::Config(m) if m.contains("/nonexistent/c.pem")),
            "{e}"
        );
    }
}
