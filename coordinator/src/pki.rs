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

/// The DNS SAN that names edge `id` in its client certificate.
pub fn edge_dns_name(id: u64) -> String {
    format!("edge-{id}.edge.custody")
}

/// Parses an edge id out of a SAN produced by [`edge_dns_name`].
pub fn parse_edge_dns_name(name: &str) -> Option<u64> {
    name.strip_prefix("edge-")?
        .strip_suffix(".edge.custody")?
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

    /// Issues a node certificate (and a new key) for node `id`, valid for
    /// `hosts` (IPs or DNS names) during `ttl`.
    pub fn issue_node(
        &self,
        id: u64,
        hosts: &[String],
        ttl: std::time::Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let cert = node_params(id, hosts, ttl)?.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's renewal request: the certificate is node `id`'s, for
    /// `hosts`, valid during `ttl`. Only the request's public key is used.
    pub fn renew_node(
        &self,
        csr_pem: &str,
        id: u64,
        hosts: &[String],
        ttl: std::time::Duration,
    ) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let signed = rcgen::CertificateSigningRequestParams {
            params: node_params(id, hosts, ttl)?,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }
}

/// A random positive serial number.
fn serial() -> rcgen::SerialNumber {
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&serial)
}

/// Validity from a little before now (clock skew, at most a tenth of the
/// window) to `ttl` from now.
fn validity(params: &mut CertificateParams, ttl: std::time::Duration) {
    let now = time::OffsetDateTime::now_utc();
    let skew = (ttl.as_secs() / 10).min(300) as i64;
    params.not_before = now - time::Duration::seconds(skew);
    params.not_after = now + time::Duration::seconds(ttl.as_secs().min(i64::MAX as u64) as i64);
}

fn node_params(
    id: u64,
    hosts: &[String],
    ttl: std::time::Duration,
) -> Result<CertificateParams, PkiError> {
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
    validity(&mut params, ttl);
    params.serial_number = Some(serial());
    Ok(params)
}

impl ClusterCa {
    /// Signs an edge's certificate request. Only the request's public key is
    /// used: the name, SAN, usage and validity are set here. The certificate
    /// is for client auth only, so an edge can never pose as a node.
    pub fn sign_edge(
        &self,
        csr_pem: &str,
        edge_id: u64,
        edge_name: &str,
        ttl: std::time::Duration,
    ) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::DnsName(
            edge_dns_name(edge_id)
                .try_into()
                .map_err(|_| PkiError::BadName(edge_dns_name(edge_id)))?,
        )];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Custody");
        dn.push(DnType::CommonName, format!("custody edge {edge_name}"));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Backdated a little for clock skew, but never so much that the
        // edge's renewal point (two thirds of the window) is behind it.
        validity(&mut params, ttl);
        params.serial_number = Some(serial());
        let signed = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject as _;

    #[test]
    fn node_names_round_trip() {
        assert_eq!(parse_node_dns_name(&node_dns_name(42)), Some(42));
        assert_eq!(parse_node_dns_name("node-x.cluster.custody"), None);
        assert_eq!(parse_node_dns_name("edge-1.cluster.custody"), None);
    }

    #[test]
    fn signs_edge_requests_with_its_own_names() {
        let ca = ClusterCa::generate("t").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["node-1.cluster.custody".to_string()]).unwrap();
        req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = req.serialize_request(&key).unwrap().pem().unwrap();
        let pem = ca
            .sign_edge(&csr, 9, "e1", std::time::Duration::from_secs(60))
            .unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, vec!["DNSName(edge-9.edge.custody)"]);
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(ca
            .sign_edge("garbage", 1, "e", std::time::Duration::from_secs(60))
            .is_err());
        assert_eq!(parse_edge_dns_name(&edge_dns_name(77)), Some(77));
        assert_eq!(parse_edge_dns_name(&node_dns_name(77)), None);
    }

    #[test]
    fn issues_and_reloads() {
        let ca = ClusterCa::generate("t").unwrap();
        let c = ca
            .issue_node(
                3,
                &["127.0.0.1".into(), "localhost".into()],
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        assert!(c.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{c:?}").contains("PRIVATE KEY"));
        let again = ClusterCa::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
        again
            .issue_node(4, &[], std::time::Duration::from_secs(60))
            .unwrap();
        // A renewal keeps the node's names and takes only the request's key.
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["node-9.cluster.custody".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let pem = ca
            .renew_node(
                &csr,
                3,
                &["127.0.0.1".into()],
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(crate::tls::node_id_from_cert(&der), Some(3));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!((60..=66).contains(&life), "{life}");
    }
}
