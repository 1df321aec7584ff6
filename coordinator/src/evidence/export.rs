//! Signed compliance exports.
//!
//! An export is a directory:
//! - `chunks.jsonl`: every chunk of every selected session, with its chain hash
//!   and zstd payload (base64), in session then index order;
//! - `events.jsonl`: every decoded event, in the same order;
//! - `sessions.csv`: one row per session;
//! - `manifest.json`: SHA-256 of each file, each session's chain head, chunk
//!   and event counts, the query, the cluster id and the time range;
//! - `manifest.sig`: the base64 Ed25519 signature of `manifest.json` by the
//!   cluster's evidence key.
//!
//! `custody verify` re-derives `events.jsonl` from the chunks, checks every
//! chain, digest and the signature.

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use sha2::{Digest as _, Sha256};

use custody_proto::cluster::v1 as pb;

/// v2 adds the evidence ledger (`ledger.jsonl`, the manifest's `ledger`)
/// and a `state` per session; `custody verify` still reads v1.
pub const FORMAT: &str = "custody-export-v2";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a base64 PKCS#8 Ed25519 key")]
    Invalid(std::path::PathBuf),
    #[error("generate key: {0}")]
    Generate(String),
}

/// A new key as written by `gen-config`: base64 of a PKCS#8 v2 document.
pub fn generate_signing_key() -> Result<String, KeyError> {
    let rng = ring::rand::SystemRandom::new();
    let doc =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(doc.as_ref()) + "\n")
}

/// The cluster's evidence signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public_b64())
            .field("private", &"<redacted>")
            .finish()
    }
}

impl SigningKey {
    pub fn load(path: &std::path::Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::Invalid(path.to_owned()))?;
        let pair =
            Ed25519KeyPair::from_pkcs8(&der).map_err(|_| KeyError::Invalid(path.to_owned()))?;
        Ok(Self { pair })
    }

    pub fn public_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.pair.public_key().as_ref())
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }
}

/// The cluster id: the first 16 bytes of the CA certificate's SHA-256, hex.
pub fn cluster_id(ca_pem: &[u8]) -> String {
    custody_proto::export::hex(&Sha256::digest(ca_pem)[..16])
}

/// CSV field quoting (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

pub const CSV_HEADER: &str = "session_id,issuer,subject,email,client_kind,resource,resource_kind,node_region,edge_region,edge,opened_at,closed_at,commands,approvals,exit_code,signal,close_reason\n";

/// One `sessions.csv` row.
pub fn csv_row(r: &pb::SessionRecord) -> String {
    let s = r.summary.clone().unwrap_or_default();
    let e = r.end.clone().unwrap_or_default();
    let t = |ms: u64| {
        if ms == 0 {
            String::new()
        } else {
            custody_proto::export::fmt_time(ms)
        }
    };
    let fields = [
        s.session_id,
        s.issuer,
        s.subject,
        s.email,
        s.client_kind,
        s.resource,
        s.resource_kind,
        s.node_region,
        s.edge_region,
        s.edge,
        t(s.opened_at_ms),
        t(e.closed_at_ms),
        s.command,
        String::new(),
        if r.closed {
            e.exit_code.to_string()
        } else {
            String::new()
        },
        e.signal.to_string(),
        e.reason,
    ];
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sign_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, generate_signing_key().unwrap()).unwrap();
        let k = SigningKey::load(&p).unwrap();
        let sig = k.sign(b"manifest");
        let pk = base64::engine::general_purpose::STANDARD
            .decode(k.public_b64())
            .unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
            .verify(b"manifest", &sig)
            .unwrap();
        assert!(!format!("{k:?}").contains("PRIVATE"));
        std::fs::write(&p, "garbage").unwrap();
        assert!(SigningKey::load(&p).is_err());
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
