//! `gen-config`: writes a working local cluster configuration.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::auth::dev_issuer::{Accounts, DevClient, DevUser};
use crate::config::{
    RawAuth, RawConfig, RawDevIssuer, RawIssuer, RawListen, RawPeer, RawRaft, RawTls,
};
use crate::pki::ClusterCa;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub dir: PathBuf,
    pub nodes: u64,
    pub regions: Vec<String>,
    /// Listen hosts, assigned to nodes round-robin (node 1 gets the first).
    pub hosts: Vec<String>,
    pub compact_threshold: Option<u64>,
    /// Real OIDC issuers trusted besides the dev issuer.
    pub issuers: Vec<RawIssuer>,
}

/// Start of the kernel's ephemeral port range (outgoing connections use it).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A port free right now on `host` (for TCP, and UDP too with `udp`).
///
/// Chosen below the ephemeral range when possible: a port handed out by
/// `bind(0)` comes from that range, where any outgoing connection may take it
/// before the node binds it.
/// How long a port handed out by `gen-config` stays reserved for it.
const RESERVATION: std::time::Duration = std::time::Duration::from_secs(600);

/// Reserves `port` against other `gen-config` runs on this machine (a free
/// port is only free until someone binds it: two clusters generated at the
/// same moment, as parallel tests do, could otherwise both pick it). A
/// reservation is a file in the temp dir, honoured for ten minutes.
fn reserve(port: u16) -> bool {
    reserve_in(
        &std::env::temp_dir().join("custody-port-reservations"),
        port,
    )
}

fn reserve_in(dir: &std::path::Path, port: u16) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return true; // no shared dir: fall back to the bind check alone
    }
    let f = dir.join(port.to_string());
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&f)
        .is_ok()
    {
        return true;
    }
    let stale = std::fs::metadata(&f)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > RESERVATION);
    // A stale reservation is taken over (rewritten, so its age restarts).
    stale && std::fs::write(&f, b"").is_ok()
}

fn pick_port(host: &str, udp: bool) -> anyhow::Result<u16> {
    let free = |port: u16| {
        TcpListener::bind((host, port)).is_ok()
            && (!udp || std::net::UdpSocket::bind((host, port)).is_ok())
            && reserve(port)
    };
    let top = ephemeral_start();
    if top > 20_001 {
        for _ in 0..200 {
            let port = 20_000 + rand::random::<u16>() % (top - 20_000);
            if free(port) {
                return Ok(port);
            }
        }
    }
    for _ in 0..100 {
        let l =
            TcpListener::bind((host, 0)).with_context(|| format!("find a free port on {host}"))?;
        let port = l.local_addr()?.port();
        drop(l);
        if free(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port on {host}")
}

fn free_port(host: &str) -> anyhow::Result<u16> {
    pick_port(host, false)
}

/// A port free for both TCP and UDP (the tunnel listens on UDP for QUIC).
fn free_port_tcp_udp(host: &str) -> anyhow::Result<u16> {
    pick_port(host, true)
}

pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

/// One node's addresses, chosen up front so every config can list its peers.
struct Slot {
    id: u64,
    region: String,
    raft: String,
    api: String,
    tunnel: String,
    postgres: String,
    ssh: String,
    kube: String,
    metrics: String,
    mcp: String,
    dev_issuer: String,
}

fn slot(id: u64, region: &str, host: &str) -> anyhow::Result<Slot> {
    let addr = |p: u16| {
        if host.contains(':') {
            format!("[{host}]:{p}")
        } else {
            format!("{host}:{p}")
        }
    };
    Ok(Slot {
        id,
        region: region.to_owned(),
        raft: addr(free_port(host)?),
        api: addr(free_port(host)?),
        tunnel: addr(free_port_tcp_udp(host)?),
        postgres: addr(free_port(host)?),
        ssh: addr(free_port(host)?),
        kube: addr(free_port(host)?),
        metrics: addr(free_port(host)?),
        mcp: addr(free_port(host)?),
        dev_issuer: addr(free_port(host)?),
    })
}

/// Issuer name of the built-in development issuer.
pub const DEV_ISSUER: &str = "https://dev-issuer.custody.local";
/// Audience of tokens for the Custody API.
pub const DEV_AUDIENCE: &str = "urn:custody";
/// Group whose members are admins from the start.
pub const ADMIN_GROUP: &str = "custody-admins";

/// `[auth]` for a node: the dev issuer, served on this node, plus any real issuers.
fn auth_section(s: &Slot, extra: &[RawIssuer]) -> RawAuth {
    let mut issuers = vec![RawIssuer {
        issuer: DEV_ISSUER.into(),
        audience: DEV_AUDIENCE.into(),
        discovery_url: Some(format!(
            "http://{}/.well-known/openid-configuration",
            s.dev_issuer
        )),
        groups_claim: None,
        required_typ: Some("at+jwt".into()),
        jwks_min_refresh_secs: None,
        leeway_secs: None,
        qualify_groups: None,
    }];
    issuers.extend(extra.iter().cloned());
    RawAuth {
        admin_groups: vec![ADMIN_GROUP.into()],
        issuers,
        dev_issuer: Some(RawDevIssuer {
            listen: s.dev_issuer.clone(),
            issuer: DEV_ISSUER.into(),
            audience: DEV_AUDIENCE.into(),
            key: "dev-issuer-key.pem".into(),
            accounts: "dev-accounts.toml".into(),
        }),
    }
}

fn secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Demo identities: admin, alice (engineers), bob and carol (approvers), audrey
/// (auditors), and the machine client `agent` (ai-agents).
fn demo_accounts() -> Accounts {
    let user = |name: &str, groups: &[&str]| DevUser {
        username: name.into(),
        password: secret(),
        email: format!("{name}@dev.custody.local"),
        name: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    Accounts {
        users: vec![
            user("admin", &[ADMIN_GROUP]),
            user("alice", &["engineers"]),
            user("bob", &["approvers"]),
            user("carol", &["approvers"]),
            user("audrey", &["auditors"]),
        ],
        clients: vec![DevClient {
            client_id: "agent".into(),
            secret: secret(),
            groups: vec!["ai-agents".into()],
        }],
    }
}

fn node_config(
    s: &Slot,
    peers: &[&Slot],
    join: bool,
    compact: Option<u64>,
    extra: &[RawIssuer],
) -> RawConfig {
    RawConfig {
        auth: auth_section(s, extra),
        id: s.id,
        region: s.region.clone(),
        data_dir: PathBuf::from(format!("node-{}", s.id)),
        listen: RawListen {
            raft: s.raft.clone(),
            api: s.api.clone(),
            tunnel: s.tunnel.clone(),
            postgres: Some(s.postgres.clone()),
            postgres_allow_plaintext: false,
            ssh: Some(s.ssh.clone()),
            ssh_host_key: Some("ssh-host-key".into()),
            kubernetes: Some(s.kube.clone()),
            metrics: Some(s.metrics.clone()),
            mcp: Some(s.mcp.clone()),
            mcp_allowed_hosts: Vec::new(),
            mcp_allowed_origins: Vec::new(),
            advertise_raft: None,
        },
        tls: RawTls {
            ca: "ca.pem".into(),
            cert: format!("node-{}.pem", s.id).into(),
            key: format!("node-{}-key.pem", s.id).into(),
            ca_key: Some("ca-key.pem".into()),
            node_cert_ttl_secs: None,
        },
        peers: peers
            .iter()
            .map(|p| RawPeer {
                id: p.id,
                region: p.region.clone(),
                raft: p.raft.clone(),
                api: p.api.clone(),
                tunnel: Some(p.tunnel.clone()),
            })
            .collect(),
        join,
        edges: Default::default(),
        evidence: crate::config::RawEvidence {
            signing_key: Some("evidence-key.b64".into()),
            retention_sweep_secs: None,
        },
        approvals: crate::config::RawApprovals {
            webhook_secret: Some("webhook-secret".into()),
        },
        api: Default::default(),
        sessions: Default::default(),
        siem: Vec::new(),
        raft: RawRaft {
            compact_threshold: compact,
            compact_bytes: None,
            tick_ms: None,
        },
    }
}

fn write_node(dir: &Path, ca: &ClusterCa, host: &str, cfg: &RawConfig) -> anyhow::Result<PathBuf> {
    let cert = ca
        .issue_node(
            cfg.id,
            &[host.to_owned(), "localhost".to_owned()],
            std::time::Duration::from_secs(crate::config::DEFAULT_NODE_CERT_TTL_SECS),
        )
        .context("issue node certificate")?;
    write_public(&dir.join(&cfg.tls.cert), &cert.cert_pem)?;
    write_private(&dir.join(&cfg.tls.key), &cert.key_pem)?;
    let path = dir.join(format!("node-{}.toml", cfg.id));
    let text = toml::to_string_pretty(cfg).context("serialize config")?;
    write_public(&path, &text)?;
    Ok(path)
}

/// Writes `ca.pem`, `ca-key.pem`, and for each node `node-<id>.toml` with its
/// certificate and key. Returns the config paths.
pub fn generate(g: &GenConfig) -> anyhow::Result<Vec<PathBuf>> {
    if g.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if g.regions.is_empty() || g.regions.iter().any(|r| r.trim().is_empty()) {
        bail!("--regions must list non-empty region names");
    }
    if g.hosts.is_empty() {
        bail!("--hosts must list at least one address");
    }
    std::fs::create_dir_all(&g.dir).with_context(|| format!("create {}", g.dir.display()))?;
    if g.dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a cluster (ca.pem exists); use another directory",
            g.dir.display()
        );
    }
    let ca = ClusterCa::generate("local").context("generate cluster CA")?;
    write_public(&g.dir.join("ca.pem"), &ca.cert_pem)?;
    write_private(&g.dir.join("ca-key.pem"), &ca.key_pem())?;
    write_private(
        &g.dir.join("evidence-key.b64"),
        &crate::evidence::export::generate_signing_key().context("generate the evidence key")?,
    )?;
    let (ssh_key, _) = crate::ssh::new_host_key().map_err(anyhow::Error::msg)?;
    write_private(&g.dir.join("ssh-host-key"), &ssh_key)?;
    write_private(
        &g.dir.join("webhook-secret"),
        &(custody_proto::export::hex(&rand::random::<[u8; 32]>()) + "\n"),
    )?;
    let dev_key = rcgen::KeyPair::generate().context("generate dev issuer key")?;
    write_private(&g.dir.join("dev-issuer-key.pem"), &dev_key.serialize_pem())?;
    write_private(
        &g.dir.join("dev-accounts.toml"),
        &toml::to_string_pretty(&demo_accounts()).context("serialize accounts")?,
    )?;
    let pick = |v: &[String], id: u64| v[((id - 1) as usize) % v.len()].clone();
    let slots = (1..=g.nodes)
        .map(|id| slot(id, &pick(&g.regions, id), &pick(&g.hosts, id)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut paths = Vec::new();
    for s in &slots {
        let peers: Vec<&Slot> = slots.iter().filter(|p| p.id != s.id).collect();
        let cfg = node_config(s, &peers, false, g.compact_threshold, &g.issuers);
        paths.push(write_node(&g.dir, &ca, &pick(&g.hosts, s.id), &cfg)?);
        // Original members may create the cluster on their first start.
        let data = g.dir.join(&cfg.data_dir);
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&data)
                .with_context(|| format!("create {}", data.display()))?;
        }
        write_private(
            &data.join(crate::config::NEW_CLUSTER_MARKER),
            "this node may create a new cluster on its first start\n",
        )?;
    }
    Ok(paths)
}

/// Writes the config of one more node that will join the cluster in `dir`
/// (signed by the CA there). Its peers are the nodes with configs in `dir`.
pub fn generate_joiner(
    dir: &Path,
    id: u64,
    region: &str,
    host: &str,
    compact_threshold: Option<u64>,
) -> anyhow::Result<PathBuf> {
    if id == 0 {
        bail!("--id must be positive");
    }
    if dir.join(format!("node-{id}.toml")).exists() {
        bail!("node-{id}.toml already exists in {}", dir.display());
    }
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).context("read ca.pem")?;
    let key_pem = std::fs::read_to_string(dir.join("ca-key.pem")).context("read ca-key.pem")?;
    let ca = ClusterCa::from_pem(&ca_pem, &key_pem).context("load cluster CA")?;
    let mut peers = Vec::new();
    let mut extra: Vec<RawIssuer> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let p = entry?.path();
        let is_node = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("node-") && n.ends_with(".toml"));
        if is_node {
            let raw: RawConfig = toml::from_str(&std::fs::read_to_string(&p)?)
                .with_context(|| format!("parse {}", p.display()))?;
            extra = raw
                .auth
                .issuers
                .iter()
                .filter(|i| i.issuer != DEV_ISSUER)
                .cloned()
                .collect();
            peers.push(Slot {
                id: raw.id,
                region: raw.region,
                raft: raw.listen.raft,
                api: raw.listen.api,
                tunnel: raw.listen.tunnel,
                postgres: raw.listen.postgres.unwrap_or_default(),
                ssh: raw.listen.ssh.unwrap_or_default(),
                kube: raw.listen.kubernetes.unwrap_or_default(),
                metrics: raw.listen.metrics.unwrap_or_default(),
                mcp: raw.listen.mcp.unwrap_or_default(),
                dev_issuer: String::new(),
            });
        }
    }
    peers.sort_by_key(|p| p.id);
    let s = slot(id, region, host)?;
    let cfg = node_config(
        &s,
        &peers.iter().collect::<Vec<_>>(),
        true,
        compact_threshold,
        &extra,
    );
    write_node(dir, &ca, host, &cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_reserved_port_is_not_handed_out_again_until_the_reservation_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        assert!(reserve_in(dir.path(), 20_123));
        assert!(!reserve_in(dir.path(), 20_123), "reserved by the first run");
        assert!(reserve_in(dir.path(), 20_124));
        let old = std::time::SystemTime::now() - RESERVATION - std::time::Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("20123"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(
            reserve_in(dir.path(), 20_123),
            "a stale reservation is taken over"
        );
        assert!(!reserve_in(dir.path(), 20_123));
    }

    #[test]
    fn generated_configs_validate() {
        let dir = tempfile::tempdir().unwrap();
        let g = GenConfig {
            dir: dir.path().to_owned(),
            nodes: 3,
            regions: vec!["eu".into(), "us".into(), "ap".into()],
            hosts: vec!["127.0.0.1".into()],
            compact_threshold: None,
            issuers: vec![],
        };
        let paths = generate(&g).unwrap();
        assert_eq!(paths.len(), 3);
        let cfgs: Vec<Config> = paths.iter().map(|p| Config::load(p).unwrap()).collect();
        assert_eq!(cfgs[2].region, "ap");
        assert_eq!(cfgs[0].members.len(), 3);
        let mode = std::fs::metadata(dir.path().join("ca-key.pem")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        // A second run refuses to overwrite the cluster.
        assert!(generate(&g).is_err());
        let j = generate_joiner(dir.path(), 4, "eu", "127.0.0.1", None).unwrap();
        let c = Config::load(&j).unwrap();
        assert!(c.join);
        assert_eq!(c.members.len(), 4);
    }
}
