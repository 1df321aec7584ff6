//! Node configuration: a raw TOML shape validated into [`Config`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::Member;
use crate::tls::TlsPaths;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("invalid config {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// The file format (`node-<id>.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub id: u64,
    pub region: String,
    pub data_dir: PathBuf,
    pub listen: RawListen,
    pub tls: RawTls,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    /// Start with no state and wait to be added by a membership change.
    #[serde(default)]
    pub join: bool,
    #[serde(default)]
    pub raft: RawRaft,
    pub auth: RawAuth,
    #[serde(default)]
    pub edges: RawEdges,
    #[serde(default)]
    pub evidence: RawEvidence,
    #[serde(default)]
    pub approvals: RawApprovals,
    #[serde(default, skip_serializing_if = "RawApi::is_default")]
    pub api: RawApi,
    #[serde(default, skip_serializing_if = "RawSessions::is_default")]
    pub sessions: RawSessions,
    /// Where the audit events also go (`[[siem]]`, each a sink).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub siem: Vec<RawSiem>,
}

/// `[[siem]]`: one SIEM sink.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSiem {
    /// `file`, `syslog` or `http`.
    pub kind: String,
    /// `ocsf` (default) or `native`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// file: the path (relative to the config file's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// file: rotate past this many bytes (default 100 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// file: rotated files kept (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// syslog: `host:port` of an RFC 5424 receiver over TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// syslog: TLS to the receiver, trusting `ca_file`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// syslog with TLS, or https: the receiver's CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// http: the endpoint events are POSTed to (JSON arrays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `[sessions]`: how live sessions end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    /// A session ends this many seconds after its caller's token expires
    /// (default 0: when it expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_grace_secs: Option<u64>,
}

impl RawSessions {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `[api]`: limits of the client API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// A call that has not produced its response (for streams: its first
    /// message) within this many seconds is cancelled (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_secs: Option<u64>,
}

impl RawApi {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `[approvals]`: webhook signing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawApprovals {
    /// A file holding the HMAC key that signs approval webhooks (the same on
    /// every node). Without it, webhooks are not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<PathBuf>,
}

/// `[evidence]`: signing of compliance exports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawEvidence {
    /// Base64 PKCS#8 Ed25519 key (the same on every node) that signs exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
    /// How often the leader applies the policy's retention rules (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_sweep_secs: Option<u64>,
}

/// `[edges]`: enrollment and edge certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawEdges {
    /// Lifetime of edge certificates; edges renew at two thirds of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_ttl_secs: Option<u64>,
}

/// `[auth]`: who may call the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Groups whose members are admins even before any policy exists.
    #[serde(default)]
    pub admin_groups: Vec<String>,
    #[serde(default)]
    pub issuers: Vec<RawIssuer>,
    /// The built-in development issuer (never for production).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_issuer: Option<RawDevIssuer>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    pub issuer: String,
    pub audience: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_claim: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_min_refresh_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leeway_secs: Option<u64>,
    /// Present this issuer's groups as `<issuer>#<group>`. Default: false for
    /// the first issuer, true for every other one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qualify_groups: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawDevIssuer {
    /// Loopback address to serve discovery, JWKS and tokens on.
    pub listen: String,
    pub issuer: String,
    pub audience: String,
    /// PKCS#8 PEM EC P-256 signing key, shared by every node.
    pub key: PathBuf,
    /// TOML file with `[[users]]` and `[[clients]]`.
    pub accounts: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub raft: String,
    pub api: String,
    pub tunnel: String,
    /// The PostgreSQL gateway (clients connect with sslmode=require).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// Accept PostgreSQL clients without TLS (development only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postgres_allow_plaintext: bool,
    /// The SSH gateway (TLS, then SSH; reached through `custody ssh-proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
    /// The SSH gateway's host key (OpenSSH private key, the same on every
    /// node, so clients pin one key for the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_key: Option<PathBuf>,
    /// The Kubernetes gateway (HTTPS, `/k8s/<resource>/…`; kubectl reaches
    /// it through `custody kube login`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<String>,
    /// The MCP endpoint for AI agents (HTTPS, Streamable HTTP at `/mcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<String>,
    /// `Host` values the MCP endpoint accepts (DNS-rebinding protection);
    /// empty: loopback names only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_allowed_hosts: Vec<String>,
    /// Browser `Origin`s the MCP endpoint accepts (`scheme://host:port`);
    /// empty: requests carrying an `Origin` are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_allowed_origins: Vec<String>,
    /// Health and metrics, plain HTTP (`/healthz`, `/readyz`, `/metrics`);
    /// bind it to loopback or a monitoring network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Raft address other nodes dial, when it differs from `raft` (NAT, proxies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_raft: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA private key, needed to sign edge certificates at enrollment.
    /// Nodes without it refuse enrollments and renewals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of the node certificates this node renews to (default 30
    /// days). A node renews its certificate at two thirds of its life, and
    /// at once when it holds one that lives much longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_cert_ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub id: u64,
    pub region: String,
    pub raft: String,
    pub api: String,
    /// The peer's tunnel address, announced to edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRaft {
    pub compact_threshold: Option<u64>,
    /// Compact the log once the entries applied since the last compaction
    /// hold this many bytes (default 64 MiB).
    pub compact_bytes: Option<u64>,
    pub tick_ms: Option<u64>,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: u64,
    pub region: String,
    pub data_dir: PathBuf,
    pub raft_addr: SocketAddr,
    /// Source IP for outgoing Raft connections: the Raft listen IP unless unspecified.
    pub raft_source_ip: Option<std::net::IpAddr>,
    pub api_addr: SocketAddr,
    pub tunnel_addr: SocketAddr,
    pub postgres_addr: Option<SocketAddr>,
    pub postgres_allow_plaintext: bool,
    pub ssh_addr: Option<SocketAddr>,
    pub ssh_host_key: Option<PathBuf>,
    pub kube_addr: Option<SocketAddr>,
    /// Health and metrics (`listen.metrics`).
    pub metrics_addr: Option<SocketAddr>,
    /// The SIEM sinks (`[[siem]]`).
    pub siem: Vec<crate::siem::SinkConfig>,
    /// The MCP endpoint (`listen.mcp`) and its `Host`/`Origin` allowlists.
    pub mcp_addr: Option<SocketAddr>,
    pub mcp_allowed_hosts: Vec<String>,
    pub mcp_allowed_origins: Vec<String>,
    pub tls: TlsPaths,
    /// Every initial member, this node included.
    pub members: Vec<Member>,
    pub join: bool,
    /// Set by `run --new-cluster`: this node may create a new cluster when its
    /// data dir is empty (so may a [`NEW_CLUSTER_MARKER`] file in it).
    pub new_cluster: bool,
    pub compact_threshold: u64,
    pub compact_bytes: u64,
    pub tick: Duration,
    pub admin_groups: Vec<String>,
    pub issuers: Vec<crate::auth::IssuerConfig>,
    pub dev_issuer: Option<DevIssuerConfig>,
    pub ca_key: Option<PathBuf>,
    pub edge_cert_ttl: Duration,
    pub evidence_key: Option<PathBuf>,
    pub retention_sweep: Duration,
    pub webhook_secret: Option<PathBuf>,
    pub api_request_timeout: Duration,
    pub node_cert_ttl: Duration,
    pub token_grace: Duration,
}

/// The validated `[auth.dev_issuer]`.
#[derive(Debug, Clone)]
pub struct DevIssuerConfig {
    pub listen: SocketAddr,
    pub issuer: String,
    pub audience: String,
    pub key: PathBuf,
    pub accounts: PathBuf,
}

/// A file in a data dir that lets an original member create the cluster on
/// its first start. `gen-config` writes it; the node removes it once it has
/// bootstrapped. A wiped data dir has no marker, so the node refuses to start
/// instead of bootstrapping again with no vote and no log.
pub const NEW_CLUSTER_MARKER: &str = "NEW-CLUSTER";

const DEFAULT_COMPACT_THRESHOLD: u64 = 10_000;
const DEFAULT_COMPACT_BYTES: u64 = 64 << 20;
/// Node certificates live 30 days unless configured.
pub const DEFAULT_NODE_CERT_TTL_SECS: u64 = 30 * 86400;
const DEFAULT_TICK_MS: u64 = 100;
const DEFAULT_EDGE_CERT_TTL_SECS: u64 = 24 * 3600;

impl Config {
    /// Reads and validates a config file. Relative paths are resolved against
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::validate(raw, base).map_err(|detail| ConfigError::Invalid {
            path: path.to_owned(),
            detail,
        })
    }

    pub fn validate(raw: RawConfig, base: &Path) -> Result<Self, String> {
        if raw.id == 0 {
            return Err("id must be a positive integer".into());
        }
        if raw.region.trim().is_empty() {
            return Err("region must not be empty".into());
        }
        let addr = |what: &str, s: &str| -> Result<SocketAddr, String> {
            s.parse()
                .map_err(|e| format!("{what} address {s:?} is not HOST:PORT with an IP host: {e}"))
        };
        let raft_addr = addr("listen.raft", &raw.listen.raft)?;
        let api_addr = addr("listen.api", &raw.listen.api)?;
        let tunnel_addr = addr("listen.tunnel", &raw.listen.tunnel)?;
        let postgres_addr = raw
            .listen
            .postgres
            .as_deref()
            .map(|a| addr("listen.postgres", a))
            .transpose()?;
        let ssh_addr = raw
            .listen
            .ssh
            .as_deref()
            .map(|a| addr("listen.ssh", a))
            .transpose()?;
        let kube_addr = raw
            .listen
            .kubernetes
            .as_deref()
            .map(|a| addr("listen.kubernetes", a))
            .transpose()?;
        let mcp_addr = raw
            .listen
            .mcp
            .as_deref()
            .map(|a| addr("listen.mcp", a))
            .transpose()?;
        let metrics_addr = raw
            .listen
            .metrics
            .as_deref()
            .map(|a| addr("listen.metrics", a))
            .transpose()?;
        if ssh_addr.is_some() && raw.listen.ssh_host_key.is_none() {
            return Err("listen.ssh needs listen.ssh_host_key (the cluster's SSH host key)".into());
        }
        let advertise_raft = match &raw.listen.advertise_raft {
            Some(a) => addr("listen.advertise_raft", a)?,
            None => raft_addr,
        };
        let mut ids = BTreeSet::from([raw.id]);
        let mut members = vec![Member {
            id: raw.id,
            region: raw.region.clone(),
            raft_addr: advertise_raft.to_string(),
            api_addr: api_addr.to_string(),
            tunnel_addr: tunnel_addr.to_string(),
        }];
        for p in &raw.peers {
            if p.id == 0 {
                return Err("peer ids must be positive integers".into());
            }
            if !ids.insert(p.id) {
                return Err(format!("node id {} appears twice", p.id));
            }
            addr(&format!("peer {} raft", p.id), &p.raft)?;
            addr(&format!("peer {} api", p.id), &p.api)?;
            if let Some(t) = &p.tunnel {
                addr(&format!("peer {} tunnel", p.id), t)?;
            }
            members.push(Member {
                id: p.id,
                region: p.region.clone(),
                raft_addr: p.raft.clone(),
                api_addr: p.api.clone(),
                tunnel_addr: p.tunnel.clone().unwrap_or_default(),
            });
        }
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let tick_ms = raw.raft.tick_ms.unwrap_or(DEFAULT_TICK_MS);
        if !(10..=1000).contains(&tick_ms) {
            return Err(format!("raft.tick_ms {tick_ms} is outside 10..=1000"));
        }
        let compact_threshold = raw
            .raft
            .compact_threshold
            .unwrap_or(DEFAULT_COMPACT_THRESHOLD);
        if compact_threshold < 4 {
            return Err("raft.compact_threshold must be at least 4".into());
        }
        let compact_bytes = raw.raft.compact_bytes.unwrap_or(DEFAULT_COMPACT_BYTES);
        if compact_bytes < 1 << 20 {
            return Err("raft.compact_bytes must be at least 1048576 (1 MiB)".into());
        }
        let mut issuers = Vec::new();
        for (n, i) in raw.auth.issuers.iter().enumerate() {
            if i.issuer.trim().is_empty() || i.audience.trim().is_empty() {
                return Err("auth.issuers entries need issuer and audience".into());
            }
            let mut c = crate::auth::IssuerConfig::new(&i.issuer, &i.audience);
            c.discovery_url = i.discovery_url.clone();
            c.qualify_groups = i.qualify_groups.unwrap_or(n > 0);
            if let Some(g) = &i.groups_claim {
                c.groups_claim = g.clone();
            }
            c.required_typ = i.required_typ.clone();
            if let Some(s) = i.jwks_min_refresh_secs {
                c.jwks_min_refresh = Duration::from_secs(s);
            }
            if let Some(s) = i.leeway_secs {
                if s > 300 {
                    return Err(format!("auth leeway {s}s is above 300s"));
                }
                c.leeway = Duration::from_secs(s);
            }
            issuers.push(c);
        }
        if issuers.is_empty() {
            return Err("auth.issuers is empty: configure at least one OIDC issuer".into());
        }
        let dev_issuer = match &raw.auth.dev_issuer {
            None => None,
            Some(d) => {
                let listen = addr("auth.dev_issuer.listen", &d.listen)?;
                if !listen.ip().is_loopback() {
                    return Err("auth.dev_issuer.listen must be a loopback address".into());
                }
                Some(DevIssuerConfig {
                    listen,
                    issuer: d.issuer.clone(),
                    audience: d.audience.clone(),
                    key: resolve(&d.key),
                    accounts: resolve(&d.accounts),
                })
            }
        };
        let cert_ttl = raw
            .edges
            .cert_ttl_secs
            .unwrap_or(DEFAULT_EDGE_CERT_TTL_SECS);
        if !(5..=366 * 86400).contains(&cert_ttl) {
            return Err(format!(
                "edges.cert_ttl_secs {cert_ttl} is outside 5..={}",
                366 * 86400
            ));
        }
        let sweep = raw.evidence.retention_sweep_secs.unwrap_or(300);
        if !(1..=86400).contains(&sweep) {
            return Err(format!(
                "evidence.retention_sweep_secs {sweep} is outside 1..=86400"
            ));
        }
        let request_timeout = raw.api.request_timeout_secs.unwrap_or(60);
        if !(1..=3600).contains(&request_timeout) {
            return Err(format!(
                "api.request_timeout_secs {request_timeout} is outside 1..=3600"
            ));
        }
        let node_cert_ttl = raw
            .tls
            .node_cert_ttl_secs
            .unwrap_or(DEFAULT_NODE_CERT_TTL_SECS);
        if !(10..=366 * 86400).contains(&node_cert_ttl) {
            return Err(format!(
                "tls.node_cert_ttl_secs {node_cert_ttl} is outside 10..={}",
                366 * 86400
            ));
        }
        let token_grace = raw.sessions.token_grace_secs.unwrap_or(0);
        if token_grace > 7 * 86400 {
            return Err(format!(
                "sessions.token_grace_secs {token_grace} is above {}",
                7 * 86400
            ));
        }
        let mut siem = Vec::new();
        for (n, s) in raw.siem.iter().enumerate() {
            siem.push(siem_sink(s, &resolve).map_err(|e| format!("siem[{n}]: {e}"))?);
        }
        Ok(Config {
            siem,
            token_grace: Duration::from_secs(token_grace),
            node_cert_ttl: Duration::from_secs(node_cert_ttl),
            api_request_timeout: Duration::from_secs(request_timeout),
            retention_sweep: Duration::from_secs(sweep),
            webhook_secret: raw.approvals.webhook_secret.as_deref().map(resolve),
            ca_key: raw.tls.ca_key.as_deref().map(resolve),
            evidence_key: raw.evidence.signing_key.as_deref().map(resolve),
            edge_cert_ttl: Duration::from_secs(cert_ttl),
            admin_groups: raw.auth.admin_groups.clone(),
            issuers,
            dev_issuer,
            id: raw.id,
            region: raw.region,
            data_dir: resolve(&raw.data_dir),
            raft_addr,
            raft_source_ip: (!raft_addr.ip().is_unspecified()).then(|| raft_addr.ip()),
            api_addr,
            tunnel_addr,
            postgres_addr,
            postgres_allow_plaintext: raw.listen.postgres_allow_plaintext,
            ssh_addr,
            ssh_host_key: raw.listen.ssh_host_key.as_deref().map(resolve),
            kube_addr,
            metrics_addr,
            mcp_addr,
            mcp_allowed_hosts: raw.listen.mcp_allowed_hosts.clone(),
            mcp_allowed_origins: raw.listen.mcp_allowed_origins.clone(),
            tls: TlsPaths {
                ca: resolve(&raw.tls.ca),
                cert: resolve(&raw.tls.cert),
                key: resolve(&raw.tls.key),
            },
            members,
            join: raw.join,
            new_cluster: false,
            compact_threshold,
            compact_bytes,
            tick: Duration::from_millis(tick_ms),
        })
    }
}

/// A `[[siem]]` table, checked.
fn siem_sink(
    s: &RawSiem,
    resolve: &dyn Fn(&std::path::Path) -> PathBuf,
) -> Result<crate::siem::SinkConfig, String> {
    use crate::siem::{Format, SinkConfig, SinkKind};
    let format = match s.format.as_deref() {
        None | Some("ocsf") => Format::Ocsf,
        Some("native") => Format::Native,
        Some(other) => return Err(format!("format {other:?} is not ocsf or native")),
    };
    let kind = match s.kind.as_str() {
        "file" => SinkKind::File {
            path: resolve(s.path.as_deref().ok_or("a file sink needs path")?),
            max_bytes: s.max_bytes.unwrap_or(100 << 20).max(4096),
            keep: s.keep.unwrap_or(5),
        },
        "syslog" => {
            let address = s
                .address
                .clone()
                .ok_or("a syslog sink needs address (host:port)")?;
            if !address.contains(':') {
                return Err(format!("address {address:?} must be host:port"));
            }
            let tls = match (s.tls, &s.ca_file) {
                (false, _) => None,
                (true, Some(ca)) => Some(resolve(ca)),
                (true, None) => return Err("syslog over TLS needs ca_file".into()),
            };
            SinkKind::Syslog { address, tls }
        }
        "http" => {
            let url = s.url.clone().ok_or("an http sink needs url")?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("url {url:?} must be http:// or https://"));
            }
            SinkKind::Http {
                url,
                ca_file: s.ca_file.as_deref().map(resolve),
            }
        }
        other => return Err(format!("kind {other:?} is not file, syslog or http")),
    };
    Ok(SinkConfig { kind, format })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = 1
region = "eu"
data_dir = "node-1"
[listen]
raft = "127.0.0.1:7001"
api = "127.0.0.1:7002"
tunnel = "127.0.0.1:7003"
[tls]
ca = "ca.pem"
cert = "node-1.pem"
key = "node-1-key.pem"
[[peers]]
id = 2
region = "us"
raft = "127.0.0.1:7011"
api = "127.0.0.1:7012"
[auth]
admin_groups = ["admins"]
[[auth.issuers]]
issuer = "https://idp.example"
audience = "urn:custody"
"#;

    fn parse(s: &str) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(s).map_err(|e| e.to_string())?;
        Config::validate(raw, Path::new("/etc/custody"))
    }

    #[test]
    fn good_config_resolves_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/custody/node-1"));
        assert_eq!(c.members.len(), 2);
        assert_eq!(c.tick, Duration::from_millis(100));
    }

    #[test]
    fn siem_sinks_are_checked() {
        let c = parse(&format!(
            "{GOOD}[[siem]]\nkind = \"file\"\npath = \"audit.jsonl\"\n[[siem]]\nkind = \"syslog\"\naddress = \"127.0.0.1:6514\"\nformat = \"native\"\n"
        ))
        .unwrap();
        assert_eq!(c.siem.len(), 2);
        assert_eq!(c.siem[1].format, crate::siem::Format::Native);
        for (bad, why) in [
            ("kind = \"syslog\"\n", "needs address"),
            (
                "kind = \"syslog\"\naddress = \"h:1\"\ntls = true\n",
                "needs ca_file",
            ),
            (
                "kind = \"http\"\nurl = \"ftp://x\"\n",
                "http:// or https://",
            ),
            ("kind = \"kafka\"\n", "not file, syslog or http"),
            (
                "kind = \"file\"\npath = \"a\"\nformat = \"cef\"\n",
                "not ocsf or native",
            ),
        ] {
            let e = parse(&format!("{GOOD}[[siem]]\n{bad}")).unwrap_err();
            assert!(e.contains("siem[0]") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn issuers_after_the_first_have_qualified_groups_by_default() {
        let c = parse(&format!(
            "{GOOD}[[auth.issuers]]\nissuer = \"https://second.example\"\naudience = \"a\"\n\
             [[auth.issuers]]\nissuer = \"https://third.example\"\naudience = \"a\"\nqualify_groups = false\n"
        ))
        .unwrap();
        let q: Vec<bool> = c.issuers.iter().map(|i| i.qualify_groups).collect();
        assert_eq!(q, [false, true, false]);
    }

    #[test]
    fn bad_configs_are_refused_clearly() {
        let e = parse(&GOOD.replace("id = 2", "id = 1")).unwrap_err();
        assert!(e.contains("appears twice"), "{e}");
        let e = parse(&GOOD.replace("127.0.0.1:7001", "nowhere")).unwrap_err();
        assert!(e.contains("listen.raft"), "{e}");
        let e = parse(&GOOD.replace("region = \"eu\"", "region = \"eu\"\nbogus = 1")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("id = ").unwrap_err();
        assert!(!e.is_empty());
        let e = parse(&GOOD.replace("[[auth.issuers]]", "[auth.unused]")).unwrap_err();
        assert!(e.contains("unused") || e.contains("issuers"), "{e}");
    }
}
