//! The edge's identity: its private key (generated here, never sent
//! anywhere), the certificate the cluster CA signed for it, and its id.
//!
//! Stored in the data dir, owner-only: `edge-key.pem`, `edge-cert.pem` and
//! `edge.json`. Files are replaced atomically (write, fsync, rename). A
//! renewal changes the key and certificate together: both new files are
//! written as `*.renew` (the key first), then the key is renamed into
//! place, then the certificate, and [`Store::load`] completes or discards a renewal that a
//! crash cut short, so an edge never starts with a key that does not match
//! its certificate.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeInfo {
    pub edge_id: u64,
    pub name: String,
    pub region: String,
}

/// A key and the certificate that goes with it.
#[derive(Clone)]
pub struct Identity {
    pub info: EdgeInfo,
    pub cert_pem: String,
    pub key_pem: String,
    /// Validity of the certificate, in seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A fresh key and a certificate request for it.
pub struct KeyRequest {
    pub key_pem: String,
    pub csr_pem: String,
}

pub fn new_key_request() -> Result<KeyRequest, IdentityError> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok(KeyRequest {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
    })
}

/// Reads the validity window of a PEM certificate.
pub fn validity(cert_pem: &str) -> Result<(i64, i64), String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Identity {
    pub fn new(info: EdgeInfo, cert_pem: String, key_pem: String) -> Result<Self, String> {
        let (not_before, not_after) = validity(&cert_pem)?;
        Ok(Self {
            info,
            cert_pem,
            key_pem,
            not_before,
            not_after,
        })
    }

    /// When to renew: two thirds into the validity window.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }

    pub fn expired(&self) -> bool {
        now_secs() >= self.not_after
    }

    /// The certificate chain and key for rustls.
    pub fn tls_parts(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>), String> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| e.to_string())?;
        Ok((chain, Arc::new(key)))
    }
}

/// Where an identity lives on disk.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// The stored identity, if this edge enrolled before.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        let info_path = self.path(INFO);
        if !info_path.exists() {
            return Ok(None);
        }
        self.recover()?;
        let read = |p: &Path| std::fs::read_to_string(p).map_err(io(p));
        let info: EdgeInfo =
            serde_json::from_str(&read(&info_path)?).map_err(|e| IdentityError::Invalid {
                path: info_path.clone(),
                detail: e.to_string(),
            })?;
        let cert_path = self.path(CERT);
        let cert = read(&cert_path)?;
        let key = read(&self.path(KEY))?;
        Identity::new(info, cert, key)
            .map(Some)
            .map_err(|detail| IdentityError::Invalid {
                path: cert_path,
                detail,
            })
    }

    /// Saves an identity: the new key, then the new certificate, as
    /// `*.renew` files; then the key renamed into place, then the
    /// certificate; the id file last, so a crash never leaves an id without
    /// its key. A certificate's `*.renew` without the key's therefore means
    /// the key has moved.
    pub fn save(&self, id: &Identity) -> Result<(), IdentityError> {
        create_private_dir(&self.dir)?;
        let (cert, key) = (self.path(CERT), self.path(KEY));
        let (new_cert, new_key) = (renew_path(&cert), renew_path(&key));
        write_private(&new_key, id.key_pem.as_bytes())?;
        write_private(&new_cert, id.cert_pem.as_bytes())?;
        std::fs::rename(&new_key, &key).map_err(io(&key))?;
        std::fs::rename(&new_cert, &cert).map_err(io(&cert))?;
        sync_dir(&self.dir);
        let info = serde_json::to_vec_pretty(&id.info).expect("edge info serializes");
        write_private(&self.path(INFO), &info)?;
        Ok(())
    }

    /// Completes or discards a renewal that a crash cut short: with both
    /// `*.renew` files present the key had not moved, so the old pair is
    /// whole; with only the certificate's, the key had moved, so the
    /// certificate follows it.
    fn recover(&self) -> Result<(), IdentityError> {
        let (cert, key) = (self.path(CERT), self.path(KEY));
        let (new_cert, new_key) = (renew_path(&cert), renew_path(&key));
        if !new_cert.exists() {
            let _ = std::fs::remove_file(&new_key);
            return Ok(());
        }
        if new_key.exists() {
            std::fs::remove_file(&new_key).map_err(io(&new_key))?;
            std::fs::remove_file(&new_cert).map_err(io(&new_cert))?;
        } else {
            std::fs::rename(&new_cert, &cert).map_err(io(&cert))?;
        }
        sync_dir(&self.dir);
        Ok(())
    }
}

const INFO: &str = "edge.json";
const CERT: &str = "edge-cert.pem";
const KEY: &str = "edge-key.pem";

fn renew_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".renew");
    PathBuf::from(s)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Writes a file readable only by its owner, atomically.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no enrollment token: set enroll_token in the config, --enroll-token or CUSTODY_ENROLL_TOKEN")]
    NoToken,
    #[error("enrollment refused by {addr}: {reason}")]
    Refused { addr: String, reason: String },
    #[error("could not reach any coordinator to enroll: {0}")]
    Unreachable(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Other(String),
}

/// Presents the token to the coordinators in turn until one answers, and
/// stores the issued identity.
pub async fn enroll(
    endpoint: &quinn::Endpoint,
    ca_pem: &[u8],
    coordinators: &[std::net::SocketAddr],
    token: &str,
    store: &Store,
) -> Result<Identity, EnrollError> {
    use custody_proto::frame::{read_frame, write_frame};
    use custody_proto::tunnel::v1 as t;

    let req = new_key_request()?;
    let client = tls::quic_client_config(ca_pem, None).map_err(EnrollError::Other)?;
    let mut last = String::new();
    for addr in coordinators {
        let attempt = async {
            let conn = endpoint
                .connect_with(client.clone(), *addr, &addr.ip().to_string())
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(
                &mut send,
                &t::EnrollRequest {
                    token: token.to_owned(),
                    csr_pem: req.csr_pem.clone(),
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            let _ = send.finish();
            let resp: Option<t::EnrollResponse> =
                read_frame(&mut recv).await.map_err(|e| e.to_string())?;
            conn.close(0u32.into(), b"enrolled");
            resp.and_then(|r| r.result)
                .ok_or_else(|| "coordinator closed the enrollment stream".to_string())
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(t::enroll_response::Result::Enrolled(c))) => {
                let info = EdgeInfo {
                    edge_id: c.edge_id,
                    name: c.name,
                    region: c.region,
                };
                let id = Identity::new(info, c.cert_pem, req.key_pem.clone())
                    .map_err(|e| EnrollError::Other(format!("certificate from {addr}: {e}")))?;
                store.save(&id)?;
                return Ok(id);
            }
            Ok(Ok(t::enroll_response::Result::Error(reason)))
                if reason.starts_with("cluster unavailable") =>
            {
                last = format!("{addr}: {reason}");
            }
            Ok(Ok(t::enroll_response::Result::Error(reason))) => {
                // A refusal is final: the token is spent, unknown or expired.
                return Err(EnrollError::Refused {
                    addr: addr.to_string(),
                    reason,
                });
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out"),
        }
    }
    Err(EnrollError::Unreachable(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(info: &EdgeInfo) -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["edge".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Identity::new(info.clone(), cert.pem(), key.serialize_pem()).unwrap()
    }

    /// Whether the stored key goes with the stored certificate (rustls
    /// refuses a client configuration otherwise).
    fn loads_whole(store: &Store) -> Identity {
        let id = store.load().unwrap().unwrap();
        tls::quic_client_config(id.cert_pem.as_bytes(), Some(&id)).unwrap();
        id
    }

    #[test]
    fn a_renewal_cut_short_at_any_step_leaves_a_matching_pair() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let info = EdgeInfo {
            edge_id: 7,
            name: "e1".into(),
            region: "eu".into(),
        };
        let old = identity(&info);
        store.save(&old).unwrap();
        assert_eq!(loads_whole(&store).cert_pem, old.cert_pem);
        let (cert, key) = (store.path(CERT), store.path(KEY));
        let new = identity(&info);
        let renew = |p: &Path, s: &str| write_private(&renew_path(p), s.as_bytes()).unwrap();
        let no_leftovers = || {
            assert!(!renew_path(&cert).exists() && !renew_path(&key).exists());
        };

        // Only the new key written: the old pair.
        renew(&key, &new.key_pem);
        assert_eq!(loads_whole(&store).cert_pem, old.cert_pem);
        no_leftovers();
        // Both written, neither moved: the old pair.
        renew(&cert, &new.cert_pem);
        renew(&key, &new.key_pem);
        assert_eq!(loads_whole(&store).cert_pem, old.cert_pem);
        no_leftovers();
        // The key moved, the certificate did not: the new pair.
        renew(&cert, &new.cert_pem);
        write_private(&key, new.key_pem.as_bytes()).unwrap();
        assert_eq!(loads_whole(&store).cert_pem, new.cert_pem);
        no_leftovers();
        // A whole save.
        let third = identity(&info);
        store.save(&third).unwrap();
        assert_eq!(loads_whole(&store).cert_pem, third.cert_pem);
        no_leftovers();
    }
}
