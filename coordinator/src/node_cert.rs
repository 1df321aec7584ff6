//! Node certificate renewal. Node certificates are short-lived (30 days by
//! default, `[tls] node_cert_ttl_secs`) and renewed like edge certificates:
//! at two thirds of their life a node makes a new key and has it certified,
//! by itself when it holds the CA key, otherwise by a member that does
//! (`Peer.RenewNodeCertificate`, authenticated by the current certificate,
//! refused to non-members). The new pair replaces the files on disk and the
//! one in use, without a restart.
//!
//! On disk the pair changes in three steps (both new files written as
//! `*.renew`, the key first, then the key renamed, then the certificate), and
//! [`recover_renewal`] completes or discards a renewal a crash cut short, so
//! a node never starts with a key that does not match its certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::pki::ClusterCa;
use crate::storage::Engine;
use crate::tls::{cert_hosts, cert_validity, TlsMaterial, TlsPaths};
use crate::tunnel::Tunnels;

/// Errors renewing this node's certificate.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("no node certificate in use")]
    NoCertificate,
    #[error("making the certificate request: {0}")]
    Request(String),
    #[error("no member holding the CA key signed the request: {0}")]
    NoSigner(String),
    #[error("signing: {0}")]
    Sign(String),
    #[error("{0}")]
    Io(String),
    #[error("the signed certificate does not load: {0}")]
    Load(String),
}

fn renew_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".renew");
    PathBuf::from(s)
}

/// Completes (or discards) a renewal that a crash interrupted. Call before
/// loading the TLS material.
pub fn recover_renewal(paths: &TlsPaths) -> std::io::Result<()> {
    let (cert, key) = (renew_path(&paths.cert), renew_path(&paths.key));
    if !cert.exists() {
        let _ = std::fs::remove_file(&key);
        return Ok(());
    }
    if key.exists() {
        // Stopped before the key moved: the old pair is whole.
        std::fs::remove_file(&key)?;
        std::fs::remove_file(&cert)?;
    } else {
        // The key moved, the certificate did not: move it too.
        std::fs::rename(&cert, &paths.cert)?;
    }
    Ok(())
}

fn write_synced(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Puts the new pair on disk (see the module docs for the order).
fn store_pair(paths: &TlsPaths, cert_pem: &[u8], key_pem: &[u8]) -> std::io::Result<()> {
    let (cert, key) = (renew_path(&paths.cert), renew_path(&paths.key));
    // The key's file first: a certificate's `*.renew` without the key's
    // means the key has already moved (see `recover_renewal`).
    write_synced(&key, key_pem, 0o600)?;
    write_synced(&cert, cert_pem, 0o644)?;
    std::fs::rename(&key, &paths.key)?;
    std::fs::rename(&cert, &paths.cert)?;
    if let Some(dir) = paths.cert.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// When the certificate in use should be renewed: at two thirds of its
/// life, or now if it lives much longer than `ttl` (a certificate from
/// before short lifetimes, or after the lifetime was lowered).
pub fn renew_at(validity: (SystemTime, SystemTime), ttl: Duration) -> SystemTime {
    let (from, until) = validity;
    let life = until.duration_since(from).unwrap_or_default();
    if life > ttl + ttl / 2 {
        return SystemTime::now();
    }
    from + life * 2 / 3
}

/// Renews this node's certificate once: new key, certified by this node's
/// CA key or by a member's, stored and put in use.
pub async fn renew_once<E: Engine>(
    tunnels: &Tunnels<E>,
    tls: &TlsMaterial,
    paths: &TlsPaths,
    ttl: Duration,
) -> Result<SystemTime, RenewError> {
    let leaf = tls.node.leaf_der().ok_or(RenewError::NoCertificate)?;
    let key = rcgen::KeyPair::generate().map_err(|e| RenewError::Request(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| RenewError::Request(e.to_string()))?;
    let id = tunnels.node.id();
    let cert_pem = match &tunnels.ca {
        Some(ca) => sign_locally(ca, &csr, id, &cert_hosts(leaf.as_ref()), ttl)?,
        None => {
            let mut last = String::from("no other member");
            let members = crate::state::load_members(tunnels.node.store()).unwrap_or_default();
            let mut signed = None;
            for m in members.iter().filter(|m| m.id != id) {
                match tunnels.peers.renew_node_certificate(m, csr.clone()).await {
                    Ok(pem) => {
                        signed = Some(pem);
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            signed.ok_or(RenewError::NoSigner(last))?
        }
    };
    let key_pem = key.serialize_pem();
    // Loads (and checks against the key) before anything is written.
    tls.node
        .replace(cert_pem.as_bytes(), key_pem.as_bytes())
        .map_err(|e| RenewError::Load(e.to_string()))?;
    store_pair(paths, cert_pem.as_bytes(), key_pem.as_bytes())
        .map_err(|e| RenewError::Io(format!("store the renewed certificate: {e}")))?;
    let until = tls
        .node
        .leaf_der()
        .and_then(|d| cert_validity(d.as_ref()))
        .map(|v| v.1)
        .unwrap_or_else(SystemTime::now);
    Ok(until)
}

fn sign_locally(
    ca: &ClusterCa,
    csr: &str,
    id: u64,
    hosts: &[String],
    ttl: Duration,
) -> Result<String, RenewError> {
    ca.renew_node(csr, id, hosts, ttl)
        .map_err(|e| RenewError::Sign(e.to_string()))
}

/// Renews this node's certificate for as long as the node runs.
pub async fn renewer<E: Engine>(
    tunnels: Arc<Tunnels<E>>,
    tls: TlsMaterial,
    paths: TlsPaths,
    ttl: Duration,
) {
    let retry = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let validity = tls.node.leaf_der().and_then(|d| cert_validity(d.as_ref()));
        let wait = validity
            .map(|v| {
                renew_at(v, ttl)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            })
            .unwrap_or(retry);
        tokio::time::sleep(wait).await;
        match renew_once(&tunnels, &tls, &paths, ttl).await {
            Ok(until) => {
                let secs = until
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                tracing::info!(target: "audit", event = "node_certificate_renewed", node = tunnels.node.id(), not_after = secs, "renewed this node's certificate");
            }
            Err(e) => {
                tracing::warn!(node = tunnels.node.id(), error = %e, "renewing this node's certificate failed; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_points() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86400);
        // Two thirds of a 30-day life.
        assert_eq!(renew_at((t0, t0 + 30 * day), 30 * day), t0 + 20 * day);
        // Far longer than the policy: now.
        let now = renew_at((t0, t0 + 3650 * day), 30 * day);
        assert!(now > t0 + 365 * day);
    }

    #[test]
    fn an_interrupted_renewal_is_completed_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("node.pem"),
            key: dir.path().join("node-key.pem"),
        };
        let write = |p: &Path, s: &str| std::fs::write(p, s).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        write(&paths.cert, "old cert");
        write(&paths.key, "old key");
        // Stopped before the certificate's file was written: the old pair.
        write(&renew_path(&paths.key), "new key");
        recover_renewal(&paths).unwrap();
        assert_eq!(
            (read(&paths.cert), read(&paths.key)),
            ("old cert".into(), "old key".into())
        );
        // Stopped before the key moved: the old pair stays.
        write(&renew_path(&paths.cert), "new cert");
        write(&renew_path(&paths.key), "new key");
        recover_renewal(&paths).unwrap();
        assert_eq!(
            (read(&paths.cert), read(&paths.key)),
            ("old cert".into(), "old key".into())
        );
        assert!(!renew_path(&paths.cert).exists() && !renew_path(&paths.key).exists());
        // Stopped after the key moved: the certificate follows.
        write(&renew_path(&paths.cert), "new cert");
        write(&paths.key, "new key");
        recover_renewal(&paths).unwrap();
        assert_eq!(
            (read(&paths.cert), read(&paths.key)),
            ("new cert".into(), "new key".into())
        );
        // A whole write goes through.
        store_pair(&paths, b"third cert", b"third key").unwrap();
        assert_eq!(read(&paths.cert), "third cert");
        recover_renewal(&paths).unwrap();
        assert_eq!(read(&paths.key), "third key");
    }
}
