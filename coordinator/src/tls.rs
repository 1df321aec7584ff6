//! TLS for the coordinator's listeners and its node-to-node client.
//!
//! One crypto provider (ring) everywhere. Listeners accept connections with
//! our own acceptor so that every failed handshake (garbage bytes, a peer with
//! no or a foreign certificate) is logged with the peer address, and never
//! reaches gRPC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::pki::parse_node_dns_name;

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// ALPN protocol of edge tunnels.
pub const TUNNEL_ALPN: &[u8] = b"custody-tunnel/1";

/// Installs ring as the process-wide rustls provider. Call first thing in every
/// binary and test; repeated calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Paths of the PEM files a node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// This node's certificate and key, replaceable while the node runs:
/// listeners resolve it at each handshake and node-to-node clients read it
/// for each new connection, so a renewed certificate takes effect without a
/// restart.
pub struct NodeCert {
    current: std::sync::RwLock<CurrentCert>,
    /// Bumped at each replacement, so cached clients reconnect with it.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
struct CurrentCert {
    certified: Arc<rustls::sign::CertifiedKey>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("key", &"<redacted>")
            .finish()
    }
}

fn certified(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CurrentCert, TlsError> {
    let chain = certs(cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key_path.to_owned(),
        detail: e.to_string(),
    })?;
    let signing = provider().key_provider.load_private_key(key)?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Pem {
        path: key_path.to_owned(),
        detail: format!("the key does not match the certificate: {e}"),
    })?;
    Ok(CurrentCert {
        certified: Arc::new(certified),
        cert_pem: cert_pem.to_vec(),
        key_pem: key_pem.to_vec(),
    })
}

impl NodeCert {
    fn read(&self) -> CurrentCert {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The certificate (PEM) in use.
    pub fn cert_pem(&self) -> Vec<u8> {
        self.read().cert_pem
    }

    /// The leaf certificate in use (DER).
    pub fn leaf_der(&self) -> Option<CertificateDer<'static>> {
        self.read().certified.cert.first().cloned()
    }

    /// Puts a new certificate and key in use for new connections.
    pub fn replace(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let next = certified(
            Path::new("<renewed certificate>"),
            Path::new("<renewed key>"),
            cert_pem,
            key_pem,
        )?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// How many times the certificate was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl rustls::server::ResolvesServerCert for NodeCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.read().certified)
    }
}

/// Loaded PEM material.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    ca: Vec<CertificateDer<'static>>,
    /// This node's certificate, shared by every listener and client built
    /// from this material.
    pub node: Arc<NodeCert>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

impl TlsMaterial {
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let ca_pem = read(&paths.ca)?;
        let cert_pem = read(&paths.cert)?;
        let key_pem = read(&paths.key)?;
        let ca = certs(&paths.ca, &ca_pem)?;
        let current = certified(&paths.cert, &paths.key, &cert_pem, &key_pem)?;
        Ok(Self {
            ca_pem,
            ca,
            node: Arc::new(NodeCert {
                current: std::sync::RwLock::new(current),
                generation: Default::default(),
            }),
        })
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }

    /// Server config; with `require_client_cert`, peers must present a
    /// certificate issued by the cluster CA.
    pub fn server_config(&self, require_client_cert: bool) -> Result<ServerConfig, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = if require_client_cert {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder.with_cert_resolver(self.node.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }

    /// rustls config for the PostgreSQL gateway (after SSLRequest): the node
    /// certificate, no client certificate, ALPN `postgresql` (PostgreSQL 17+).
    pub fn pg_server_config(&self) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.node.clone());
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(cfg)
    }

    /// rustls config for the Kubernetes gateway: server-authenticated TLS,
    /// HTTP/1.1 (the caller's token rides in each request).
    pub fn kube_server_config(&self) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.node.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// rustls config for the SSH gateway: server-authenticated TLS, ALPN
    /// `custody-ssh` (the caller presents its token inside).
    pub fn ssh_server_config(&self) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.node.clone());
        cfg.alpn_protocols = vec![b"custody-ssh".to_vec()];
        Ok(cfg)
    }

    /// rustls config for the tunnel listener: TLS 1.3 only (QUIC requires it),
    /// ALPN [`TUNNEL_ALPN`]. A client certificate from the cluster CA is
    /// optional at the handshake so that new edges can enroll; every other use
    /// of the connection requires an edge certificate.
    pub fn tunnel_server_config(&self) -> Result<ServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.node.clone());
        cfg.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
        Ok(cfg)
    }

    /// tonic client config for node-to-node calls: trust the cluster CA and
    /// present this node's current certificate. Read it for each new
    /// connection, so a renewed certificate is used.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        let cur = self.node.read();
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &cur.cert_pem,
                &cur.key_pem,
            ))
    }
}

/// The host names and addresses a node certificate is valid for, besides
/// its node name.
pub fn cert_hosts(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d)
                if parse_node_dns_name(d).is_none() =>
            {
                Some((*d).to_owned())
            }
            x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A certificate's validity window.
pub fn cert_validity(der: &[u8]) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = |t: i64| std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Some((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// The node id named in a peer certificate, if it is a node certificate.
pub fn node_id_from_cert(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => parse_node_dns_name(d),
        _ => None,
    })
}

/// The edge id named in a peer certificate, if it is an edge certificate.
pub fn edge_id_from_cert(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => crate::pki::parse_edge_dns_name(d),
        _ => None,
    })
}

/// How many connections a listener holds.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections still in their TLS handshake. When full, the oldest is
    /// dropped to make room: a flood of idle sockets then evicts itself,
    /// while a real client's handshake (milliseconds) completes.
    pub handshakes: usize,
    /// Connections past their handshake. When full, new ones are refused.
    pub established: usize,
}

impl ConnLimits {
    /// The API and Raft listeners' limits.
    pub const DEFAULT: ConnLimits = ConnLimits {
        handshakes: 256,
        established: 4096,
    };
}

/// A connection that holds one of its listener's places until dropped.
pub struct Limited<S> {
    inner: S,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Handshakes in flight, oldest first, so the oldest can be dropped.
type Pending = Arc<std::sync::Mutex<std::collections::VecDeque<(u64, tokio::task::AbortHandle)>>>;

/// Accepts TCP connections, performs TLS handshakes (logging each failure with
/// the peer address) and yields the established streams, within `limits`.
pub fn tls_incoming(
    listener: TcpListener,
    config: ServerConfig,
    what: &'static str,
    limits: ConnLimits,
) -> ReceiverStream<Result<Limited<TlsStream<TcpStream>>, std::io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    let places = Arc::new(tokio::sync::Semaphore::new(limits.established));
    let pending: Pending = Arc::default();
    tokio::spawn(async move {
        let mut next_id = 0u64;
        let mut evicted = 0u64;
        loop {
            let (tcp, peer): (TcpStream, SocketAddr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            let places = places.clone();
            let id = next_id;
            next_id += 1;
            let done = pending.clone();
            // Held while spawning, so the task's own removal (which takes the
            // lock) always comes after its entry is in.
            let mut p = lock(&pending);
            let task = tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                lock(&done).retain(|(i, _)| *i != id);
                match r {
                    Ok(Ok(tls)) => match places.try_acquire_owned() {
                        Ok(place) => {
                            let _ = conn_tx
                                .send(Ok(Limited {
                                    inner: tls,
                                    _place: place,
                                }))
                                .await;
                        }
                        Err(_) => {
                            tracing::warn!(listener = what, %peer, "rejected connection: connection limit reached");
                        }
                    },
                    Ok(Err(e)) => {
                        tracing::warn!(listener = what, %peer, error = %e, "rejected connection: TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::warn!(listener = what, %peer, "rejected connection: TLS handshake timed out");
                    }
                }
            });
            p.push_back((id, task.abort_handle()));
            while p.len() > limits.handshakes {
                if let Some((_, oldest)) = p.pop_front() {
                    oldest.abort();
                    evicted += 1;
                    if evicted.is_power_of_two() {
                        tracing::warn!(
                            listener = what,
                            evicted,
                            "too many connections in their TLS handshake; dropped the oldest"
                        );
                    }
                }
            }
            drop(p);
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
