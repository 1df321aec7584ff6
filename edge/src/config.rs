//! The edge's configuration file.
//!
//! ```toml
//! data_dir = "edge-data"          # identity (key 0600, certificate, id)
//! ca = "ca.pem"                   # the cluster CA certificate
//! coordinators = ["10.0.0.5:7003"] # tunnel addresses to start from
//! # enroll_token = "cet1_..."     # used once; or --enroll-token / CUSTODY_ENROLL_TOKEN
//! # follow_membership = false     # dial only the coordinators listed above
//! # metrics = "127.0.0.1:9464"    # /healthz, /readyz, /metrics (plain HTTP)
//!
//! [[resources]]
//! name = "local-shell"
//! kind = "shell"
//! labels = { env = "dev" }
//! [resources.shell]
//! workdir = "/srv"
//! env = { PATH = "/usr/bin:/bin" }
//! # user = "deploy"              # needs the agent to run as root
//!
//! [[resources]]
//! name = "orders-db"
//! kind = "postgres"
//! labels = { env = "prod" }
//! [resources.postgres]
//! host = "127.0.0.1"
//! port = 5432
//! user = "app"
//! database = "orders"
//! password_env = "ORDERS_DB_PASSWORD"  # or password_file = "/etc/custody/orders.pw"
//! sslmode = "verify-full"         # disable | prefer (default) | require | verify-ca | verify-full
//! sslrootcert = "/etc/custody/db-ca.pem"  # needed by verify-ca and verify-full
//!
//! [[resources]]
//! name = "db-1"
//! kind = "ssh"
//! labels = { env = "prod" }
//! [resources.ssh]
//! host = "10.0.0.12"
//! port = 22
//! user = "deploy"
//! key_file = "/etc/custody/db-1.key"   # or key_env, password_env, password_file
//! known_hosts = "/etc/custody/known_hosts"  # pins: lines naming host (or [host]:port)
//! # host_keys = ["ssh-ed25519 AAAA..."]     # or the keys themselves
//! # trust_on_first_use = true      # no pins: learn the first key, record it, keep it
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: PathBuf,
    ca: PathBuf,
    coordinators: Vec<String>,
    #[serde(default)]
    enroll_token: Option<String>,
    #[serde(default = "yes")]
    follow_membership: bool,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default)]
    resources: Vec<RawResource>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: String,
    kind: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    shell: Option<ShellConfig>,
    #[serde(default)]
    postgres: Option<PostgresConfig>,
    #[serde(default)]
    ssh: Option<SshConfig>,
    #[serde(default)]
    kubernetes: Option<KubeConfig>,
}

/// Settings of the `kubernetes` connector. The cluster token stays on this
/// host.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubeConfig {
    /// The API server, `https://host:port` (a path prefix is kept).
    pub server: String,
    /// The CA that signed the API server's certificate (PEM).
    pub ca_file: PathBuf,
    /// A file holding the bearer token (a service account token).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Set `Impersonate-User` to the verified caller, so the cluster's RBAC
    /// and audit log see the real user (the token must be allowed to
    /// impersonate).
    #[serde(default)]
    pub impersonate: bool,
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("server", &self.server)
            .field("ca_file", &self.ca_file)
            .field("token_file", &self.token_file)
            .field("token_env", &self.token_env)
            .field("impersonate", &self.impersonate)
            .finish()
    }
}

impl KubeConfig {
    /// The bearer token, read for each request (rotation needs no restart).
    pub fn token(&self) -> Result<String, String> {
        if let Some(var) = &self.token_env {
            if let Ok(v) = std::env::var(var) {
                return Ok(v.trim().to_owned());
            }
        }
        match &self.token_file {
            Some(f) => std::fs::read_to_string(f)
                .map(|t| t.trim().to_owned())
                .map_err(|e| format!("read the cluster token {}: {e}", f.display())),
            None => Err("no cluster token is configured (token_file or token_env)".into()),
        }
    }
}

/// Settings of the `ssh` connector. The key and password stay on this host.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub host: String,
    #[serde(default = "ssh_port")]
    pub port: u16,
    /// The login on the target.
    pub user: String,
    /// A private key file (OpenSSH, PKCS#8 or PEM; not encrypted).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the private key text.
    #[serde(default)]
    pub key_env: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// known_hosts file whose lines for this host pin its keys.
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// Pinned host keys, as OpenSSH public key lines.
    #[serde(default)]
    pub host_keys: Vec<String>,
    /// Host certificate authorities, as OpenSSH public key lines: the
    /// target may prove itself with a host certificate they signed that
    /// names `host` among its principals (as `@cert-authority` lines in
    /// known_hosts do).
    #[serde(default)]
    pub host_cas: Vec<String>,
    /// With no pins, accept the first key the target presents, keep it in
    /// the data dir and pin it from then on. The learned key is recorded.
    #[serde(default)]
    pub trust_on_first_use: bool,
}

fn ssh_port() -> u16 {
    22
}

impl std::fmt::Debug for SshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("key_file", &self.key_file)
            .field("key_env", &self.key_env)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("known_hosts", &self.known_hosts)
            .field("host_keys", &self.host_keys.len())
            .field("host_cas", &self.host_cas.len())
            .field("trust_on_first_use", &self.trust_on_first_use)
            .finish()
    }
}

impl SshConfig {
    /// The private key text, read when needed (rotation needs no restart).
    pub fn private_key(&self) -> Result<Option<String>, String> {
        if let Some(var) = &self.key_env {
            if let Ok(v) = std::env::var(var) {
                return Ok(Some(v));
            }
        }
        match &self.key_file {
            Some(f) => std::fs::read_to_string(f)
                .map(Some)
                .map_err(|e| format!("read the SSH key {}: {e}", f.display())),
            None => Ok(None),
        }
    }

    /// The password, read when needed.
    pub fn password(&self) -> Option<String> {
        if let Some(var) = &self.password_env {
            if let Ok(v) = std::env::var(var) {
                return Some(v);
            }
        }
        let text = std::fs::read_to_string(self.password_file.as_ref()?).ok()?;
        Some(text.trim_end_matches(['\n', '\r']).to_owned())
    }
}

/// Settings of the `postgres` connector. The password stays on this host.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub host: String,
    #[serde(default = "pg_port")]
    pub port: u16,
    pub user: String,
    pub database: String,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS to the server, as libpq's `sslmode`.
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM CA certificates that verify the server (`verify-ca`,
    /// `verify-full`).
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
}

/// TLS to the database server, with libpq's meanings.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, unverified; plaintext otherwise.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not verified.
    Require,
    /// TLS with a certificate chaining to `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name `host`.
    VerifyFull,
}

fn pg_port() -> u16 {
    5432
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish()
    }
}

impl PostgresConfig {
    /// The password, read when needed (so rotation needs no restart).
    pub fn password(&self) -> Option<String> {
        if let Some(var) = &self.password_env {
            if let Ok(v) = std::env::var(var) {
                return Some(v);
            }
        }
        let f = self.password_file.as_ref()?;
        let text = std::fs::read_to_string(f).ok()?;
        Some(text.trim_end_matches(['\n', '\r']).to_owned())
    }
}

/// Settings of the `shell` connector.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShellConfig {
    /// Working directory of every command (default: the agent's own).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// The complete environment of every command; nothing is inherited. A
    /// default `PATH` is added when it is missing.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run commands as this local user (the agent must run as root).
    #[serde(default)]
    pub user: Option<String>,
}

/// A resource this edge serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub kind: String,
    pub labels: BTreeMap<String, String>,
    pub connector: Connector,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connector {
    Shell(ShellConfig),
    Postgres(PostgresConfig),
    Ssh(SshConfig),
    Kube(KubeConfig),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub data_dir: PathBuf,
    pub ca: PathBuf,
    pub coordinators: Vec<SocketAddr>,
    pub enroll_token: Option<String>,
    /// Keep a tunnel to every cluster member (default). When false, only the
    /// configured coordinators are dialed: for networks that can reach just
    /// some of them; the others relay sessions through those.
    pub follow_membership: bool,
    /// Health and metrics, plain HTTP (`/healthz`, `/readyz`, `/metrics`).
    pub metrics: Option<SocketAddr>,
    pub resources: Vec<Resource>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

impl EdgeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(|detail| {
            ConfigError::Invalid {
                path: path.to_owned(),
                detail,
            }
        })
    }

    /// Parses `text`; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        if raw.coordinators.is_empty() {
            return Err(
                "coordinators is empty: give at least one coordinator tunnel address".into(),
            );
        }
        let coordinators = raw
            .coordinators
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| format!("coordinator address {a:?} is not IP:PORT: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut resources = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for r in raw.resources {
            if !valid_name(&r.name) {
                return Err(format!(
                    "resource name {:?} is invalid: use 1-63 of a-z, 0-9, '.', '_', '-'",
                    r.name
                ));
            }
            if !seen.insert(r.name.clone()) {
                return Err(format!("resource {} is declared twice", r.name));
            }
            let connector = match r.kind.as_str() {
                "shell" => {
                    let mut sh = r.shell.unwrap_or_default();
                    sh.workdir = sh.workdir.as_deref().map(resolve);
                    Connector::Shell(sh)
                }
                "postgres" => {
                    let Some(mut pg) = r.postgres else {
                        return Err(format!(
                            "resource {}: a postgres resource needs a [resources.postgres] table",
                            r.name
                        ));
                    };
                    if pg.password_env.is_none() && pg.password_file.is_none() {
                        return Err(format!(
                            "resource {}: set password_env or password_file",
                            r.name
                        ));
                    }
                    pg.password_file = pg.password_file.as_deref().map(resolve);
                    pg.sslrootcert = pg.sslrootcert.as_deref().map(resolve);
                    let verifies = matches!(pg.sslmode, SslMode::VerifyCa | SslMode::VerifyFull);
                    if verifies && pg.sslrootcert.is_none() {
                        return Err(format!(
                            "resource {}: sslmode {:?} needs sslrootcert (the CA that signed the server's certificate)",
                            r.name, pg.sslmode
                        ));
                    }
                    if let Some(ca) = &pg.sslrootcert {
                        crate::dbtls::load_roots(ca)
                            .map_err(|e| format!("resource {}: {e}", r.name))?;
                    }
                    Connector::Postgres(pg)
                }
                "ssh" => {
                    let Some(mut ssh) = r.ssh else {
                        return Err(format!(
                            "resource {}: an ssh resource needs a [resources.ssh] table",
                            r.name
                        ));
                    };
                    if ssh.key_file.is_none()
                        && ssh.key_env.is_none()
                        && ssh.password_env.is_none()
                        && ssh.password_file.is_none()
                    {
                        return Err(format!(
                            "resource {}: set key_file, key_env, password_env or password_file",
                            r.name
                        ));
                    }
                    ssh.key_file = ssh.key_file.as_deref().map(resolve);
                    ssh.password_file = ssh.password_file.as_deref().map(resolve);
                    ssh.known_hosts = ssh.known_hosts.as_deref().map(resolve);
                    let pins = crate::ssh::pinned_keys(&ssh)
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    if pins.is_empty() && !ssh.trust_on_first_use {
                        return Err(format!(
                            "resource {}: pin the target's host key (known_hosts, host_keys or host_cas), or set trust_on_first_use = true",
                            r.name
                        ));
                    }
                    Connector::Ssh(ssh)
                }
                "kubernetes" => {
                    let Some(mut kube) = r.kubernetes else {
                        return Err(format!(
                            "resource {}: a kubernetes resource needs a [resources.kubernetes] table",
                            r.name
                        ));
                    };
                    if !kube.server.starts_with("https://") {
                        return Err(format!(
                            "resource {}: server must be an https:// URL",
                            r.name
                        ));
                    }
                    if kube.token_file.is_none() && kube.token_env.is_none() {
                        return Err(format!(
                            "resource {}: set token_file or token_env",
                            r.name
                        ));
                    }
                    kube.ca_file = resolve(&kube.ca_file);
                    kube.token_file = kube.token_file.as_deref().map(resolve);
                    crate::dbtls::load_roots(&kube.ca_file)
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    Connector::Kube(kube)
                }
                other => {
                    return Err(format!(
                        "resource {}: unknown kind {other:?} (expected shell, postgres, ssh or kubernetes)",
                        r.name
                    ))
                }
            };
            resources.push(Resource {
                name: r.name,
                kind: r.kind,
                labels: r.labels,
                connector,
            });
        }
        Ok(EdgeConfig {
            data_dir: resolve(&raw.data_dir),
            ca: resolve(&raw.ca),
            coordinators,
            enroll_token: raw.enroll_token,
            follow_membership: raw.follow_membership,
            metrics: raw
                .metrics
                .as_deref()
                .map(|a| {
                    a.parse()
                        .map_err(|e| format!("metrics: {a:?} is not an address (host:port): {e}"))
                })
                .transpose()?,
            resources,
        })
    }

    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "data"
ca = "ca.pem"
coordinators = ["127.0.0.1:7003"]
[[resources]]
name = "local-shell"
kind = "shell"
labels = { env = "dev" }
[resources.shell]
workdir = "work"
env = { FOO = "bar" }
"#;

    #[test]
    fn parses_and_resolves() {
        let c = EdgeConfig::parse(GOOD, Path::new("/etc/edge")).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/edge/data"));
        let r = c.resource("local-shell").unwrap();
        let Connector::Shell(sh) = &r.connector else {
            panic!("not a shell connector")
        };
        assert_eq!(sh.workdir.as_deref(), Some(Path::new("/etc/edge/work")));
        assert_eq!(r.labels["env"], "dev");
    }

    #[test]
    fn refuses_bad_input_clearly() {
        let base = Path::new("/");
        let e = EdgeConfig::parse(&GOOD.replace("127.0.0.1:7003", "nowhere"), base).unwrap_err();
        assert!(e.contains("not IP:PORT"), "{e}");
        let e = EdgeConfig::parse(&GOOD.replace("kind = \"shell\"", "kind = \"ftp\""), base)
            .unwrap_err();
        assert!(e.contains("unknown kind"), "{e}");
        let e = EdgeConfig::parse(&GOOD.replace("local-shell", "Local Shell"), base).unwrap_err();
        assert!(e.contains("invalid"), "{e}");
        let e = EdgeConfig::parse(&GOOD.replace("ca = ", "bogus = 1\nca = "), base).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = EdgeConfig::parse(&GOOD.replace("[\"127.0.0.1:7003\"]", "[]"), base).unwrap_err();
        assert!(e.contains("coordinators is empty"), "{e}");
    }

    #[test]
    fn postgres_resources_need_a_password_source() {
        let base = Path::new("/etc/edge");
        let pg = GOOD.split("[[resources]]").next().unwrap().to_owned()
            + "[[resources]]\nname = \"db\"\nkind = \"postgres\"\n[resources.postgres]\nhost = \"127.0.0.1\"\nuser = \"app\"\ndatabase = \"app\"\n";
        let e = EdgeConfig::parse(&pg, base).unwrap_err();
        assert!(e.contains("password_env or password_file"), "{e}");
        let c = EdgeConfig::parse(&(pg.clone() + "password_file = \"pw\"\n"), base).unwrap();
        let Connector::Postgres(p) = &c.resource("db").unwrap().connector else {
            panic!("not a postgres connector")
        };
        assert_eq!(
            (p.port, p.password_file.as_deref()),
            (5432, Some(Path::new("/etc/edge/pw")))
        );
        assert!(!format!("{p:?}").contains("secret"));
        assert_eq!(p.sslmode, SslMode::Prefer, "libpq's default");
        let pg = pg + "password_file = \"pw\"\n";
        let e = EdgeConfig::parse(&(pg.clone() + "sslmode = \"verify-full\"\n"), base).unwrap_err();
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = EdgeConfig::parse(&(pg.clone() + "sslmode = \"sometimes\"\n"), base).unwrap_err();
        assert!(e.contains("sslmode"), "{e}");
        let e = EdgeConfig::parse(
            &(pg + "sslmode = \"verify-ca\"\nsslrootcert = \"/nonexistent/ca.pem\"\n"),
            base,
        )
        .unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
    }

    #[test]
    fn ssh_resources_need_a_credential_and_a_pin() {
        let base = Path::new("/etc/edge");
        let head = GOOD.split("[[resources]]").next().unwrap().to_owned()
            + "[[resources]]\nname = \"h\"\nkind = \"ssh\"\n[resources.ssh]\nhost = \"127.0.0.1\"\nuser = \"deploy\"\n";
        let e = EdgeConfig::parse(&head, base).unwrap_err();
        assert!(e.contains("key_file, key_env"), "{e}");
        let with_key = head.clone() + "key_file = \"k\"\n";
        let e = EdgeConfig::parse(&with_key, base).unwrap_err();
        assert!(e.contains("pin the target's host key"), "{e}");
        let tofu = with_key.clone() + "trust_on_first_use = true\n";
        let c = EdgeConfig::parse(&tofu, base).unwrap();
        let Connector::Ssh(s) = &c.resource("h").unwrap().connector else {
            panic!("not an ssh connector")
        };
        assert_eq!(
            (s.port, s.key_file.as_deref()),
            (22, Some(Path::new("/etc/edge/k")))
        );
        let pinned = with_key
            + "host_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\"]\n";
        assert!(EdgeConfig::parse(&pinned, base).is_ok());
        let e = EdgeConfig::parse(&pinned.replace("AAAAC3", "garbage"), base).unwrap_err();
        assert!(e.contains("host_keys entry"), "{e}");
    }
}
