//! The client listener's TLS: an acceptor whose certificate is read from `[server.tls]` and
//! swapped in place when the files change or the process gets SIGHUP. Handshakes resolve the
//! certificate per connection, so a swap touches only handshakes after it; connections already
//! open keep the session they have. A pair that fails to load (unreadable, not PEM, key not
//! matching the certificate) leaves the one in service and is logged and counted.

use super::{pem, provider, TlsError, ALPN_HTTP1};
use crate::config::ServerTls;
use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// The listener's TLS: what accepts handshakes and what reloads the certificate.
pub struct ListenerTls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
    files: ServerTls,
}

/// The certificate new handshakes get.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read()))
    }
}

impl ListenerTls {
    /// Loads the certificate, key and (if set) client CAs; any of them failing is an error, so
    /// a gateway never starts without the TLS it was configured with.
    pub fn new(files: &ServerTls) -> Result<Self, TlsError> {
        let provider = provider();
        let current = Arc::new(Current(RwLock::new(Arc::new(certified_key(files)?))));
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::rustls("TLS versions"))?;
        let builder = match &files.client_ca_file {
            Some(path) => {
                let roots = Arc::new(pem::roots(path)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| {
                        TlsError::Config(format!("client CAs in {}: {e}", path.display()))
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&current) as _);
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
            files: files.clone(),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the certificate and key again; on success new handshakes get them, on failure the
    /// pair in service stays. Either way the outcome is logged and counted.
    pub fn reload(&self, trigger: &'static str) -> Result<(), TlsError> {
        let loaded = certified_key(&self.files);
        crate::metrics::tls_reload(if loaded.is_ok() { "ok" } else { "error" });
        match loaded {
            Ok(key) => {
                *self.current.0.write() = Arc::new(key);
                tracing::info!(trigger, cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(trigger, error = %e, "TLS certificate not reloaded; the previous one stays in service");
                Err(e)
            }
        }
    }

    /// Reloads on SIGHUP, and when the certificate or key file changed (size or modification
    /// time, checked every `reload_poll_ms`). Runs until aborted. The SIGHUP handler is in
    /// place when this returns: a SIGHUP before it would have ended the process.
    pub fn spawn_reloader(self: &Arc<Self>) -> JoinHandle<()> {
        #[cfg(unix)]
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; the certificate reloads on file change only");
                None
            }
        };
        #[cfg(not(unix))]
        let hangup = None::<()>;
        let tls = Arc::clone(self);
        tokio::spawn(async move { tls.watch(hangup).await })
    }

    async fn watch(
        &self,
        #[cfg(unix)] mut hangup: Option<tokio::signal::unix::Signal>,
        #[cfg(not(unix))] _hangup: Option<()>,
    ) {
        let poll = (self.files.reload_poll_ms > 0)
            .then(|| Duration::from_millis(self.files.reload_poll_ms));
        let mut seen = self.stamps();
        loop {
            #[cfg(unix)]
            let signal = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signal = std::future::pending::<Option<()>>();
            let trigger = tokio::select! {
                Some(()) = signal => "signal",
                () = sleep_or_never(poll) => "file change",
            };
            let now = self.stamps();
            if trigger == "file change" && now == seen {
                continue;
            }
            // A failed load is not retried until the files change again (or the next SIGHUP):
            // retrying a broken pair every poll would only repeat the error.
            seen = now;
            let _ = self.reload(trigger);
        }
    }

    /// What tells a file changed: its modification time and size, for both files.
    fn stamps(&self) -> [Option<(SystemTime, u64)>; 2] {
        let stamp = |p: &std::path::Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        [stamp(&self.files.cert_file), stamp(&self.files.key_file)]
    }
}

async fn sleep_or_never(every: Option<Duration>) {
    match every {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The certificate chain and its key, checked to belong together.
fn certified_key(files: &ServerTls) -> Result<CertifiedKey, TlsError> {
    let chain = pem::certs(&files.cert_file)?;
    let key = pem::key(&files.key_file)?;
    let what = || {
        format!(
            "key {} for certificate {}",
            files.key_file.display(),
            files.cert_file.display()
        )
    };
    CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::rustls(what()))
}
