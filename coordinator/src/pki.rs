//! The cluster CA and the certificates it issues.
//!
//! Node certificates carry the SAN `node-<id>.cluster.custody` so that a peer's
//! node id can be read from its certificate and matched against the Raft
//! messages it sends. They are valid for both server and client auth.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Errors while issuing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid name {0:?} for a certificate")]
    BadName(String),
}

/// A PEM certificate and its PEM private key.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The DNS SAN that names node `id` in its certificate.
pub fn node_dns_name(id: u64) -> String {
    format!("node-{id}.cluster.custody")
}

/// Parses a node id out of a SAN produced by [`node_dns_name`].
pub fn parse_node_dns_name(name: &str) -> Option<u64> {
    name.strip_prefix("node-")?
        .strip_suffix(".cluster.custody")?
        .parse()
        .ok()
}

/// A certificate authority able to sign node certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
    pub cert_pem: String,
}

impl ClusterCa {
    /// A new self-signed CA named `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Custody");
        dn.push(DnType::CommonName, format!("Custody cluster CA {cluster}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            key_pem: key_pem.to_owned(),
            cert_pem: cert_pem.to_owned(),
        })
    }

    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// Issues a node certificate for node `id`, valid for `hosts` (IPs or DNS names).
    pub fn issue_node(&self, id: u64, hosts: &[String]) -> Result<IssuedCert, PkiError> {
        let mut sans = vec![SanType::DnsName(
            node_dns_name(id)
                .try_into()
                .map_err(|_| PkiError::BadName(node_dns_name(id)))?,
        )];
        for h in hosts {
            if let Ok(ip) = h.parse::<IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            } else {
                sans.push(SanType::DnsName(
                    h.clone()
                        .try_into()
                        .map_err(|_| PkiError::BadName(h.clone()))?,
                ));
            }
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Custody");
        dn.push(DnType::CommonName, format!("custody node {id}"));
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip() {
        assert_eq!(parse_node_dns_name(&node_dns_name(42)), Some(42));
        assert_eq!(parse_node_dns_name("node-x.cluster.custody"), None);
        assert_eq!(parse_node_dns_name("edge-1.cluster.custody"), None);
    }

    #[test]
    fn issues_and_reloads() {
        let ca = ClusterCa::generate("t").unwrap();
        let c = ca
            .issue_node(3, &["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        assert!(c.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{c:?}").contains("PRIVATE KEY"));
        let again = ClusterCa::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
        again.issue_node(4, &[]).unwrap();
    }
}
