//! HTTPS for the webhook: axum over tokio-rustls, with the certificate and key read from PEM files and
//! re-read when they change (cert-manager and the chart's cert job rotate the Secret; the kubelet swaps
//! the mounted files in place), plus [`certgen`] for a self-signed certificate.
//!
//! The kube-apiserver calls admission webhooks over HTTPS only, verifying the server certificate
//! against the `caBundle` of the `MutatingWebhookConfiguration`; HTTP/1.1 is enough (the apiserver
//! speaks HTTP/2 or HTTP/1.1 and negotiates with ALPN).
//!
//! Crypto comes from rustls' `ring` provider, set per configuration (no process-wide default is
//! installed, so this module does not fight kube's client over it).

use std::{
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::AbortHandle,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::{CryptoProvider, ring},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
    server::TlsStream,
};

use crate::error::{Error, Result};

/// How often the default [`serve_tls`] looks at the certificate files for a change (at most once per
/// interval, on a TLS handshake).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// How long a client has to finish the TLS handshake before its connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// rustls' `ring` crypto provider, the one this crate is built with.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Reads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1) and checks
/// that the key belongs to the leaf certificate.
///
/// # Errors
/// [`Error::Io`] when a file cannot be read, [`Error::Pem`] when it holds no certificate or key,
/// [`Error::Tls`] when rustls cannot use the key or it does not match the certificate.
pub fn load_certified_key(cert_pem_path: &Path, key_pem_path: &Path) -> Result<CertifiedKey> {
    const CERT: &str = "TLS certificate";
    const KEY: &str = "TLS private key";
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| Error::Io {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let pem_err = |what, path: &Path, detail: String| Error::Pem {
        what,
        path: path.to_owned(),
        detail,
    };
    let cert_pem = read(CERT, cert_pem_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(CERT, cert_pem_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(CERT, cert_pem_path, "no CERTIFICATE block found".into()));
    }
    let key_pem = read(KEY, key_pem_path)?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(KEY, key_pem_path, e.to_string()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| Error::Tls {
        what: "certificate and key",
        source,
    })
}

/// What identifies one version of a file: modification time, length and inode (the kubelet replaces
/// mounted Secret files by swapping a symlink, so the inode changes even when the time does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
        })
    }
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Option<FileStamp>, Option<FileStamp>),
    checked: Instant,
}

/// A server certificate that follows its PEM files: on a handshake, at most once per `interval`, the
/// files' stamps are compared with the loaded ones and, when they changed, the pair is read again. A
/// pair that does not load (half-written during a rotation, mismatched) is logged and the previous
/// certificate kept, so a bad rotation never takes the webhook down.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    interval: Duration,
    loaded: Mutex<Loaded>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair now; later changes are picked up on handshakes at most once per `interval`.
    ///
    /// # Errors
    /// As [`load_certified_key`]: the server does not start without a usable certificate.
    pub fn new(
        cert_pem_path: impl Into<PathBuf>,
        key_pem_path: impl Into<PathBuf>,
        interval: Duration,
    ) -> Result<Self> {
        let (cert_path, key_path) = (cert_pem_path.into(), key_pem_path.into());
        let stamps = (FileStamp::of(&cert_path), FileStamp::of(&key_path));
        let key = Arc::new(load_certified_key(&cert_path, &key_path)?);
        Ok(Self {
            cert_path,
            key_path,
            interval,
            loaded: Mutex::new(Loaded {
                key,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to present now, reloading first if the files changed and the interval passed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded.checked.elapsed() >= self.interval {
            loaded.checked = Instant::now();
            let stamps = (FileStamp::of(&self.cert_path), FileStamp::of(&self.key_path));
            if stamps != loaded.stamps {
                match load_certified_key(&self.cert_path, &self.key_path) {
                    Ok(key) => {
                        tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                        loaded.key = Arc::new(key);
                        loaded.stamps = stamps;
                    }
                    // Keep the stamps old: the next check tries again (the rotation may be half done).
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the previous one")
                    }
                }
            }
        }
        Arc::clone(&loaded.key)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A rustls server configuration presenting `cert` (no client certificates; ALPN `http/1.1`).
///
/// # Errors
/// [`Error::Tls`] when the provider refuses the default protocol versions (does not happen with `ring`).
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Tls {
            what: "protocol versions",
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener of TLS connections for [`axum::serve`]: a background task accepts TCP connections and
/// runs each handshake in its own task (bounded by [`HANDSHAKE_TIMEOUT`]), so a slow or hostile client
/// never holds up the others; finished handshakes are handed to axum. Dropping the listener stops the
/// task.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: AbortHandle,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Serves TLS with `config` on `listener`. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Serve`] when the listener has no local address.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> Result<Self> {
        let local = listener.local_addr().map_err(Error::Serve)?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            // The receiver is gone only when the server stopped.
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor: task.abort_handle(),
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended (it only does when aborted): never hand out another connection.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves `router` over HTTPS on `listener` with the certificate chain and key in the PEM files,
/// re-reading them when they change (checked at most every [`DEFAULT_RELOAD_INTERVAL`]). Runs until the
/// task is dropped or aborted; for a graceful shutdown build a [`TlsListener`] and call
/// `axum::serve(listener, router).with_graceful_shutdown(…)`.
///
/// # Errors
/// As [`load_certified_key`] when the files are not a usable pair at start; [`Error::Serve`] when the
/// server fails.
pub async fn serve_tls(
    listener: TcpListener,
    router: axum::Router,
    cert_pem_path: impl Into<PathBuf>,
    key_pem_path: impl Into<PathBuf>,
) -> Result<()> {
    let cert = Arc::new(ReloadingCert::new(
        cert_pem_path,
        key_pem_path,
        DEFAULT_RELOAD_INTERVAL,
    )?);
    let listener = TlsListener::new(listener, server_config(cert)?)?;
    axum::serve(listener, router).await.map_err(Error::Serve)
}

/// Self-signed certificates for the webhook (the chart's cert job, tests, a development cluster).
pub mod certgen {
    use crate::error::Result;

    /// A self-signed certificate valid for `dns_names` (subject alternative names; an IP address
    /// literal becomes an IP SAN) and its private key (ECDSA P-256, PKCS#8), both PEM. The certificate
    /// is its own issuer, so it also serves as the `caBundle` of the `MutatingWebhookConfiguration`.
    ///
    /// For the in-cluster service the names are `<service>`, `<service>.<namespace>` and
    /// `<service>.<namespace>.svc`.
    ///
    /// # Errors
    /// [`crate::error::Error::CertGen`] for a name rcgen cannot encode.
    pub fn self_signed(dns_names: &[String]) -> Result<(String, String)> {
        let generated = rcgen::generate_simple_self_signed(dns_names.to_vec())?;
        Ok((generated.cert.pem(), generated.signing_key.serialize_pem()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap: a failure is the assertion.
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hami-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn loads_a_generated_pair_and_refuses_a_mismatch() {
        let d = temp_dir("load");
        let (cert, key) = certgen::self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let (_, other_key) = certgen::self_signed(&["localhost".into()]).unwrap();
        std::fs::write(d.join("tls.crt"), &cert).unwrap();
        std::fs::write(d.join("tls.key"), &key).unwrap();
        std::fs::write(d.join("other.key"), &other_key).unwrap();
        std::fs::write(d.join("empty"), "").unwrap();
        load_certified_key(&d.join("tls.crt"), &d.join("tls.key")).unwrap();
        let e = load_certified_key(&d.join("tls.crt"), &d.join("other.key")).unwrap_err();
        assert_eq!(e.reason(), "tls", "{e}");
        let e = load_certified_key(&d.join("empty"), &d.join("tls.key")).unwrap_err();
        assert_eq!(e.reason(), "pem", "{e}");
        assert!(e.to_string().contains("TLS certificate"), "{e}");
        let e = load_certified_key(&d.join("missing"), &d.join("tls.key")).unwrap_err();
        assert_eq!(e.reason(), "io", "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reload_keeps_the_old_pair_when_the_new_one_is_broken() {
        let d = temp_dir("reload");
        let (cert, key) = certgen::self_signed(&["a.example".into()]).unwrap();
        std::fs::write(d.join("tls.crt"), &cert).unwrap();
        std::fs::write(d.join("tls.key"), &key).unwrap();
        let r = ReloadingCert::new(d.join("tls.crt"), d.join("tls.key"), Duration::ZERO).unwrap();
        let first = r.current();
        // Half a rotation: a new certificate with the old key.
        let (cert2, key2) = certgen::self_signed(&["b.example".into()]).unwrap();
        std::fs::write(d.join("tls.crt"), &cert2).unwrap();
        assert_eq!(r.current().cert, first.cert);
        // Rotation done.
        std::fs::write(d.join("tls.key"), &key2).unwrap();
        let second = r.current();
        assert_ne!(second.cert, first.cert);
        assert_eq!(
            second.cert[0].as_ref(),
            CertificateDer::from_pem_slice(cert2.as_bytes()).unwrap().as_ref()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
