//! Local clusters of real coordinator processes: used by `custody dev up`,
//! the chaos harness and the end-to-end tests.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use custody_proto::v1 as api;

use crate::client::{Client, ClientConfig};

/// Where the Custody binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub coordinator: PathBuf,
    pub custody: PathBuf,
    /// `custody-edge`, when built.
    pub edge: Option<PathBuf>,
}

impl Binaries {
    /// `CUSTODY_BIN_DIR`, else the directory of the running executable (or its
    /// parent, for test binaries under `deps/`).
    pub fn locate() -> anyhow::Result<Self> {
        let mut dirs = Vec::new();
        if let Ok(d) = std::env::var("CUSTODY_BIN_DIR") {
            dirs.push(PathBuf::from(d));
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(d) = exe.parent() {
                dirs.push(d.to_owned());
                if let Some(p) = d.parent() {
                    dirs.push(p.to_owned());
                }
            }
        }
        for d in &dirs {
            let coordinator = d.join("custody-coordinator");
            let custody = d.join("custody");
            if coordinator.is_file() && custody.is_file() {
                let edge = Some(d.join("custody-edge")).filter(|p| p.is_file());
                return Ok(Self {
                    coordinator,
                    custody,
                    edge,
                });
            }
        }
        bail!(
            "custody-coordinator and custody binaries not found in {dirs:?}; build them with \
             `cargo build --bins` or set CUSTODY_BIN_DIR"
        )
    }
}

#[derive(Debug, Deserialize)]
struct NodeToml {
    id: u64,
    region: String,
    data_dir: PathBuf,
    listen: ListenToml,
    auth: Option<AuthToml>,
}

#[derive(Debug, Deserialize)]
struct AuthToml {
    dev_issuer: Option<DevIssuerToml>,
}

#[derive(Debug, Deserialize)]
struct DevIssuerToml {
    listen: String,
}

/// The demo accounts `gen-config` writes (`dev-accounts.toml`).
#[derive(Deserialize)]
struct AccountsToml {
    #[serde(default)]
    users: Vec<UserToml>,
    #[serde(default)]
    clients: Vec<ClientToml>,
}

#[derive(Deserialize)]
struct UserToml {
    username: String,
    password: String,
    groups: Vec<String>,
}

#[derive(Deserialize)]
struct ClientToml {
    client_id: String,
    secret: String,
    groups: Vec<String>,
}

/// A token minted by the dev issuer.
#[derive(Clone)]
pub struct DevToken {
    pub token: String,
    pub groups: Vec<String>,
}

impl std::fmt::Debug for DevToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevToken")
            .field("token", &"<redacted>")
            .field("groups", &self.groups)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
struct ListenToml {
    raft: String,
    api: String,
    tunnel: String,
}

/// What `gen-config` should write.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub nodes: u64,
    pub regions: Vec<String>,
    /// Listen hosts, round-robin over nodes.
    pub hosts: Vec<String>,
    pub compact_threshold: Option<u64>,
    /// An external OIDC issuer and audience to trust besides the dev issuer.
    pub issuer: Option<(String, String)>,
    /// `[evidence] retention_sweep_secs` for every node (the default is 300).
    pub retention_sweep_secs: Option<u64>,
    /// `[raft] compact_bytes` for every node (the default is 64 MiB).
    pub compact_bytes: Option<u64>,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            regions: vec!["eu".into(), "us".into(), "ap".into()],
            hosts: vec!["127.0.0.1".into()],
            compact_threshold: None,
            issuer: None,
            retention_sweep_secs: None,
            compact_bytes: None,
        }
    }
}

/// One node of a local cluster.
#[derive(Debug)]
pub struct NodeProc {
    pub id: u64,
    pub region: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub raft_addr: String,
    pub api_addr: String,
    pub tunnel_addr: String,
    /// Where this node serves the dev issuer, if it does.
    pub dev_issuer: Option<String>,
    child: Option<Child>,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn api_url(&self) -> String {
        format!("https://{}", self.api_addr)
    }
}

/// A set of coordinator processes sharing a config directory.
pub struct LocalCluster {
    pub dir: PathBuf,
    pub bins: Binaries,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub edges: BTreeMap<String, EdgeProc>,
    /// Kill the processes when dropped (tests); off for `dev up --detach`.
    pub kill_on_drop: bool,
    /// Token used by [`LocalCluster::client`]; the dev admin's by default.
    token: std::sync::Mutex<Option<String>>,
}

impl LocalCluster {
    /// Writes configs for a new cluster into `dir` and loads them.
    pub fn generate(bins: Binaries, dir: &Path, opts: &GenOptions) -> anyhow::Result<Self> {
        let mut cmd = Command::new(&bins.coordinator);
        cmd.arg("gen-config")
            .arg("--nodes")
            .arg(opts.nodes.to_string())
            .arg("--regions")
            .arg(opts.regions.join(","))
            .arg("--hosts")
            .arg(opts.hosts.join(","))
            .arg("--dir")
            .arg(dir);
        if let Some((issuer, audience)) = &opts.issuer {
            cmd.arg("--issuer")
                .arg(issuer)
                .arg("--audience")
                .arg(audience);
        }
        run_gen_config(cmd, opts.compact_threshold)?;
        for id in 1..=opts.nodes {
            let path = dir.join(format!("node-{id}.toml"));
            let options = [
                (
                    "evidence",
                    "retention_sweep_secs",
                    opts.retention_sweep_secs,
                ),
                ("raft", "compact_bytes", opts.compact_bytes),
            ];
            for (section, key, value) in options {
                if let Some(v) = value {
                    let v = toml::Value::Integer(v.min(i64::MAX as u64) as i64);
                    set_option(&path, section, key, v)?;
                }
            }
        }
        Self::open(bins, dir)
    }

    /// Loads the node configs already in `dir`.
    pub fn open(bins: Binaries, dir: &Path) -> anyhow::Result<Self> {
        let mut nodes = BTreeMap::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.starts_with("node-") && name.ends_with(".toml")) {
                continue;
            }
            let n = load_node(&path)?;
            nodes.insert(n.id, n);
        }
        if nodes.is_empty() {
            bail!("no node-*.toml configs in {}", dir.display());
        }
        Ok(Self {
            dir: dir.to_owned(),
            bins,
            nodes,
            edges: BTreeMap::new(),
            kill_on_drop: true,
            token: std::sync::Mutex::new(None),
        })
    }

    /// Writes a config for a node that will join, and registers it (not started).
    pub fn add_joiner(
        &mut self,
        id: u64,
        region: &str,
        host: &str,
        compact_threshold: Option<u64>,
    ) -> anyhow::Result<&NodeProc> {
        let mut cmd = Command::new(&self.bins.coordinator);
        cmd.arg("gen-config")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--join-id")
            .arg(id.to_string())
            .arg("--regions")
            .arg(region)
            .arg("--hosts")
            .arg(host);
        run_gen_config(cmd, compact_threshold)?;
        let n = load_node(&self.dir.join(format!("node-{id}.toml")))?;
        self.nodes.insert(id, n);
        Ok(&self.nodes[&id])
    }

    /// Sets `[section] key = value` in node `id`'s config (for its next start).
    pub fn set_node_option(
        &self,
        id: u64,
        section: &str,
        key: &str,
        value: toml::Value,
    ) -> anyhow::Result<()> {
        set_option(&self.node(id)?.config, section, key, value)
    }

    pub fn node(&self, id: u64) -> anyhow::Result<&NodeProc> {
        self.nodes
            .get(&id)
            .with_context(|| format!("no node {id} in {}", self.dir.display()))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    /// Starts node `id`; its output is appended to `node-<id>.log`.
    pub fn start(&mut self, id: u64) -> anyhow::Result<()> {
        let log = self.log_path(id);
        let coordinator = self.bins.coordinator.clone();
        let n = self
            .nodes
            .get_mut(&id)
            .with_context(|| format!("no node {id}"))?;
        if let Some(c) = &mut n.child {
            if c.try_wait()?.is_none() {
                bail!("node {id} is already running");
            }
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = Command::new(coordinator)
            .arg("run")
            .arg("--config")
            .arg(&n.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start node {id}"))?;
        n.child = Some(child);
        Ok(())
    }

    pub fn start_all(&mut self) -> anyhow::Result<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.start(id)?;
        }
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(mut c) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGTERM, then wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(mut c) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Whether node `id`'s process is alive.
    pub fn is_running(&mut self, id: u64) -> bool {
        match self.nodes.get_mut(&id).and_then(|n| n.child.as_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Deletes node `id`'s data dir (it must be stopped).
    pub fn wipe(&mut self, id: u64) -> anyhow::Result<()> {
        let d = self.node(id)?.data_dir.clone();
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("remove {}", d.display()))?;
        }
        Ok(())
    }

    /// Comma-separated API URLs of the given nodes (all when empty).
    pub fn api_urls(&self, ids: &[u64]) -> String {
        self.nodes
            .values()
            .filter(|n| ids.is_empty() || ids.contains(&n.id))
            .map(NodeProc::api_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The token clients of this cluster use (the dev admin's once minted).
    pub fn token(&self) -> Option<String> {
        self.current_token()
    }

    fn current_token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the token clients use from now on.
    pub fn set_token(&self, token: Option<String>) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// A client for the given nodes (all when empty), with the current token.
    pub fn client(&self, ids: &[u64]) -> anyhow::Result<Client> {
        self.client_with_deadline(ids, Duration::from_secs(30))
    }

    /// A client with its own per-call deadline.
    pub fn client_with_deadline(&self, ids: &[u64], deadline: Duration) -> anyhow::Result<Client> {
        self.client_as(ids, deadline, self.current_token())
    }

    /// A client with an explicit token.
    pub fn client_as(
        &self,
        ids: &[u64],
        deadline: Duration,
        token: Option<String>,
    ) -> anyhow::Result<Client> {
        let mut cfg = ClientConfig::new(&self.api_urls(ids), self.ca_path())?;
        cfg.deadline = deadline;
        cfg.token = token;
        Ok(Client::new(cfg)?)
    }

    /// Mints a token for a demo account (`admin`, `alice`, `bob`, `carol`, `audrey`: password
    /// grant; `agent`: client credentials) from any running node's dev issuer.
    pub async fn mint_token(&self, account: &str) -> anyhow::Result<DevToken> {
        self.mint_token_for(account, None).await
    }

    /// [`Self::mint_token`], expiring after `secs` when given.
    pub async fn mint_token_for(
        &self,
        account: &str,
        secs: Option<u64>,
    ) -> anyhow::Result<DevToken> {
        let path = self.dir.join("dev-accounts.toml");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let accounts: AccountsToml =
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let (form, groups): (Vec<(&str, String)>, Vec<String>) =
            if let Some(u) = accounts.users.iter().find(|u| u.username == account) {
                (
                    vec![
                        ("grant_type", "password".into()),
                        ("username", u.username.clone()),
                        ("password", u.password.clone()),
                        ("client_id", "custody-cli".into()),
                    ],
                    u.groups.clone(),
                )
            } else if let Some(c) = accounts.clients.iter().find(|c| c.client_id == account) {
                (
                    vec![
                        ("grant_type", "client_credentials".into()),
                        ("client_id", c.client_id.clone()),
                        ("client_secret", c.secret.clone()),
                    ],
                    c.groups.clone(),
                )
            } else {
                bail!("no demo account {account:?} in {}", path.display());
            };
        let mut form = form;
        if let Some(secs) = secs {
            form.push(("expires_in", secs.to_string()));
        }
        let token = self
            .post_token(&form)
            .await
            .with_context(|| format!("mint a token for {account}"))?;
        Ok(DevToken { token, groups })
    }

    /// RFC 8693 token exchange at the dev issuer: the demo client `client`
    /// trades `subject_token` (a user's) for a token that says the client
    /// acts for that user (`act`), with the client's groups.
    pub async fn exchange_token(
        &self,
        client: &str,
        subject_token: &str,
    ) -> anyhow::Result<String> {
        let path = self.dir.join("dev-accounts.toml");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let accounts: AccountsToml =
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let c = accounts
            .clients
            .iter()
            .find(|c| c.client_id == client)
            .with_context(|| format!("no demo client {client:?} in {}", path.display()))?;
        let form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
            ),
            ("client_id", c.client_id.clone()),
            ("client_secret", c.secret.clone()),
            ("subject_token", subject_token.to_owned()),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token".into(),
            ),
        ];
        self.post_token(&form).await.context("exchange a token")
    }

    /// Posts a token request to any running node's dev issuer.
    async fn post_token(&self, form: &[(&str, String)]) -> anyhow::Result<String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut last = String::from("no node serves the dev issuer");
        for n in self.nodes.values() {
            let Some(issuer) = &n.dev_issuer else {
                continue;
            };
            match http
                .post(format!("http://{issuer}/token"))
                .form(form)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let v: serde_json::Value = r.json().await?;
                    return Ok(v["access_token"]
                        .as_str()
                        .context("token response without access_token")?
                        .to_owned());
                }
                Ok(r) => {
                    let status = r.status();
                    last = format!(
                        "{issuer}: HTTP {status}: {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                Err(e) => last = format!("{issuer}: {e}"),
            }
        }
        bail!("{last}")
    }

    /// Waits until a node among `ids` (all when empty) reports a leader that
    /// leads, and returns its id.
    ///
    /// Without a token set, first mints the dev admin's.
    pub async fn wait_for_leader(&self, ids: &[u64], timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        while self.current_token().is_none() {
            match self.mint_token("admin").await {
                Ok(t) => self.set_token(Some(t.token)),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("mint the admin token"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let client = self.client_with_deadline(ids, Duration::from_secs(2))?;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            match client.cluster_status().await {
                Ok(st) if st.role == "leader" => return Ok(st.node_id),
                Ok(st) => last = format!("node {} sees leader {}", st.node_id, st.leader_id),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no leader within {timeout:?}: {last}")
    }

    /// Forgets the child processes so they outlive this value.
    pub fn detach(&mut self) {
        self.kill_on_drop = false;
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if !self.kill_on_drop {
            return;
        }
        for e in self.edges.values_mut() {
            if let Some(mut c) = e.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// One edge agent of a local system.
#[derive(Debug)]
pub struct EdgeProc {
    pub name: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Its health and metrics address (`http://` + this).
    pub metrics: String,
    child: Option<Child>,
}

impl EdgeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// What an edge of a local system serves.
#[derive(Debug, Clone)]
pub struct EdgeSpec {
    pub name: String,
    /// Nodes whose tunnel addresses go into the config (all when empty); the
    /// edge learns the others from them.
    pub seeds: Vec<u64>,
    /// `[[resources]]` tables, as TOML.
    pub resources_toml: String,
    /// Dial only the seeds instead of every member.
    pub seeds_only: bool,
}

impl EdgeSpec {
    /// An edge serving one shell resource named `resource` in a work dir
    /// under the cluster dir.
    pub fn shell(name: &str, resource: &str) -> Self {
        Self {
            name: name.to_owned(),
            seeds: vec![],
            seeds_only: false,
            resources_toml: format!(
                "[[resources]]\nname = \"{resource}\"\nkind = \"shell\"\nlabels = {{ env = \"dev\" }}\n"
            ),
        }
    }
}

impl LocalCluster {
    /// Writes `edge-<name>.toml` and registers the edge (not started).
    pub fn add_edge(&mut self, spec: &EdgeSpec) -> anyhow::Result<&EdgeProc> {
        let seeds: Vec<String> = self
            .nodes
            .values()
            .filter(|n| spec.seeds.is_empty() || spec.seeds.contains(&n.id))
            .map(|n| format!("\"{}\"", n.tunnel_addr))
            .collect();
        let config = self.dir.join(format!("edge-{}.toml", spec.name));
        let data_dir = self.dir.join(format!("edge-{}", spec.name));
        let metrics = format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        );
        let text = format!(
            "# custody-edge config written by the local cluster harness\n\
             data_dir = \"edge-{name}\"\nca = \"ca.pem\"\ncoordinators = [{seeds}]\n\
             follow_membership = {follow}\nmetrics = \"{metrics}\"\n\n{res}",
            name = spec.name,
            follow = !spec.seeds_only,
            seeds = seeds.join(", "),
            res = spec.resources_toml
        );
        std::fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        let log = self.dir.join(format!("edge-{}.log", spec.name));
        self.edges.insert(
            spec.name.clone(),
            EdgeProc {
                name: spec.name.clone(),
                config,
                data_dir,
                log,
                metrics,
                child: None,
            },
        );
        Ok(&self.edges[&spec.name])
    }

    /// Starts edge `name`, with an enrollment token when it has none yet.
    pub fn start_edge(&mut self, name: &str, enroll_token: Option<&str>) -> anyhow::Result<()> {
        let bin = self
            .bins
            .edge
            .clone()
            .context("custody-edge is not built (cargo build --bins)")?;
        let e = self
            .edges
            .get_mut(name)
            .with_context(|| format!("no edge {name}"))?;
        if let Some(c) = &mut e.child {
            if c.try_wait()?.is_none() {
                bail!("edge {name} is already running");
            }
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&e.log)
            .with_context(|| format!("open {}", e.log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&e.config)
            .env_remove("CUSTODY_ENROLL_TOKEN")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if let Some(t) = enroll_token {
            cmd.env("CUSTODY_ENROLL_TOKEN", t);
        }
        e.child = Some(cmd.spawn().with_context(|| format!("start edge {name}"))?);
        Ok(())
    }

    /// Creates an enrollment token with the current (admin) token, binding
    /// the resources the edge's config declares, and starts the edge with it.
    pub async fn enroll_edge(&mut self, name: &str) -> anyhow::Result<()> {
        let resources = self.edge_resources(name)?;
        let token = self
            .client(&[])?
            .create_enroll_token_for(name, "", Duration::from_secs(600), resources)
            .await?
            .token;
        self.start_edge(name, Some(&token))
    }

    /// The resources (name, kind, labels) edge `name`'s config declares.
    pub fn edge_resources(&self, name: &str) -> anyhow::Result<Vec<api::ResourceInfo>> {
        let e = self
            .edges
            .get(name)
            .with_context(|| format!("no edge {name}"))?;
        let text = std::fs::read_to_string(&e.config)
            .with_context(|| format!("read {}", e.config.display()))?;
        let t: toml::Table =
            toml::from_str(&text).with_context(|| format!("parse {}", e.config.display()))?;
        let mut out = Vec::new();
        for r in t
            .get("resources")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
        {
            let field = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            let labels = r
                .get("labels")
                .and_then(|l| l.as_table())
                .map(|l| {
                    l.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default();
            out.push(api::ResourceInfo {
                name: field("name").to_owned(),
                kind: field("kind").to_owned(),
                labels,
                ..Default::default()
            });
        }
        Ok(out)
    }

    /// SIGKILL edge `name`, then reap.
    pub fn kill_edge(&mut self, name: &str) {
        if let Some(mut c) = self.edges.get_mut(name).and_then(|e| e.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The edge's exit status, if it has exited.
    pub fn edge_exit(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let c = self.edges.get_mut(name)?.child.as_mut()?;
        c.try_wait().ok().flatten()
    }

    /// Waits until `resource` is live (connected to at least `min_nodes` nodes).
    pub async fn wait_for_resource(
        &self,
        resource: &str,
        min_nodes: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let client = self.client_with_deadline(&[], Duration::from_secs(3))?;
        let mut last = String::from("not registered yet");
        while Instant::now() < deadline {
            match client.list_resources().await {
                Ok(list) => {
                    if let Some(r) = list.iter().find(|r| r.name == resource) {
                        let best = r.edges.iter().map(|e| e.connected_nodes.len()).max();
                        if best.unwrap_or(0) >= min_nodes {
                            return Ok(());
                        }
                        last = format!("connected to {} node(s)", best.unwrap_or(0));
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("resource {resource} not live on {min_nodes} node(s) within {timeout:?}: {last}")
    }
}

fn run_gen_config(mut cmd: Command, compact_threshold: Option<u64>) -> anyhow::Result<()> {
    if let Some(c) = compact_threshold {
        cmd.arg("--compact-threshold").arg(c.to_string());
    }
    let out = cmd.output().context("run custody-coordinator gen-config")?;
    if !out.status.success() {
        bail!(
            "gen-config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Sets `[evidence] KEY = VALUE` in a generated node config.
/// Sets `[section] key = value` in a node config.
fn set_option(path: &Path, section: &str, key: &str, value: toml::Value) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut t: toml::Table =
        toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let entry = t
        .entry(section)
        .or_insert_with(|| toml::Value::Table(Default::default()));
    let Some(table) = entry.as_table_mut() else {
        bail!("{}: [{section}] is not a table", path.display());
    };
    table.insert(key.to_owned(), value);
    std::fs::write(path, toml::to_string(&t)?).with_context(|| format!("write {}", path.display()))
}

fn load_node(path: &Path) -> anyhow::Result<NodeProc> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let t: NodeToml = toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let data_dir = if t.data_dir.is_absolute() {
        t.data_dir
    } else {
        base.join(t.data_dir)
    };
    Ok(NodeProc {
        id: t.id,
        region: t.region,
        config: path.to_owned(),
        data_dir,
        raft_addr: t.listen.raft,
        api_addr: t.listen.api,
        tunnel_addr: t.listen.tunnel,
        dev_issuer: t.auth.and_then(|a| a.dev_issuer).map(|d| d.listen),
        child: None,
    })
}

/// Sends a signal by name (TERM, STOP, CONT, KILL) to a process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
