//! TLS for tunnels: ring, TLS 1.3, the cluster CA as the only root.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use crate::identity::Identity;

/// ALPN of the tunnel protocol (the coordinator's `TUNNEL_ALPN`).
pub const TUNNEL_ALPN: &[u8] = b"custody-tunnel/1";
/// Keep-alive well under the idle timeout, so a dead path shows within seconds.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Sessions a coordinator may run at once over one connection.
pub const MAX_SESSIONS_PER_CONNECTION: u32 = 1024;

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn transport() -> quinn::TransportConfig {
    let mut tc = quinn::TransportConfig::default();
    tc.keep_alive_interval(Some(KEEP_ALIVE));
    tc.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("5 s is a valid idle timeout"),
    ));
    tc.max_concurrent_bidi_streams(MAX_SESSIONS_PER_CONNECTION.into());
    tc.max_concurrent_uni_streams(0u32.into());
    tc
}

/// A QUIC client config trusting only the cluster CA; with `identity`, the
/// edge authenticates with its certificate.
pub fn quic_client_config(
    ca_pem: &[u8],
    identity: Option<&Identity>,
) -> Result<quinn::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("CA certificate: {e}"))?;
    if cas.is_empty() {
        return Err("CA file holds no certificate".into());
    }
    for c in cas {
        roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => {
            let (chain, key) = id.tls_parts()?;
            builder
                .with_client_auth_cert(chain, key.clone_key())
                .map_err(|e| format!("edge certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| e.to_string())?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(Arc::new(transport()));
    Ok(cc)
}
