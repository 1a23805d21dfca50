//! The engine client's TLS: the CAs engines' certificates must chain to (never the system's
//! roots: engines are the operator's own) and, for engines that ask, the gateway's client
//! certificate.

use super::{pem, provider, TlsError, ALPN_HTTP1};
use crate::config::UpstreamTls;
use rustls::ClientConfig;
use std::sync::Arc;
use tokio_rustls::TlsConnector;

/// The connector for `https://` engines, or `None` when `[upstream.tls]` names no CA (then
/// such engines are refused).
pub fn connector(cfg: &UpstreamTls) -> Result<Option<TlsConnector>, TlsError> {
    let Some(ca) = &cfg.ca_file else {
        if cfg.client_cert_file.is_some() || cfg.client_key_file.is_some() {
            return Err(TlsError::Config(
                "[upstream.tls] client_cert_file/client_key_file need ca_file: engines are \
                 reached over TLS only with a CA to check them against"
                    .into(),
            ));
        }
        return Ok(None);
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::rustls("TLS versions"))?
        .with_root_certificates(pem::roots(ca)?);
    let mut config = match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(pem::certs(cert)?, pem::key(key)?)
            .map_err(TlsError::rustls(format!(
                "client key {} for certificate {}",
                key.display(),
                cert.display()
            )))?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Config(
                "[upstream.tls] client_cert_file and client_key_file go together".into(),
            ))
        }
    };
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// What an `https://` engine without `[upstream.tls] ca_file` is answered with.
pub const NO_CA: &str = "engine URL is https:// but [upstream.tls] ca_file is not set: the \
                         gateway reaches TLS engines only with a CA to verify them against";
