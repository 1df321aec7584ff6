//! `custody dev up|down`: a local multi-node system for trying Custody.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use custody_cli::dev::{signal, Binaries, EdgeSpec, GenOptions, LocalCluster};

/// The policy a new dev system starts with (when none was applied yet).
const DEV_POLICY: &str = include_str!("../../../examples/policy.yaml");
/// The dev system's edge and its shell resource.
const DEV_EDGE: &str = "dev-edge";
const DEV_RESOURCE: &str = "local-shell";
/// The demo PostgreSQL resource (when PostgreSQL server binaries are installed).
const DEV_PG_RESOURCE: &str = "local-postgres";
const DEV_SSH_RESOURCE: &str = "local-ssh";
/// The demo Kubernetes resource (when the tests' API server is built).
const DEV_KUBE_RESOURCE: &str = "local-kube";

/// The demo schema: customers with PII that the demo policy masks.
const DEMO_SCHEMA: &str = "
create table if not exists customers (
  id int primary key, name text not null, email text, card_number text,
  customer_ssn text, phone text, note text);
insert into customers values
  (1, 'Ada Lovelace', 'ada@example.com', '4111 1111 1111 1111', '123-45-6789', '+1 415 555 0100', 'prefers email'),
  (2, 'Alan Turing', 'alan@example.org', '5500 0000 0000 0004', '987-65-4321', '+44 20 7946 0958', 'iban GB82 WEST 1234 5698 7654 32'),
  (3, 'Grace Hopper', 'grace@example.net', '3400 0000 0000 009', '111-22-3333', '+1 202 555 0143', 'ships on fridays')
on conflict (id) do nothing;
create table if not exists orders (id serial primary key, customer_id int references customers(id), total numeric(10,2));
insert into orders (customer_id, total) select c, 10 * c from generate_series(1, 3) c where not exists (select 1 from orders);
";

#[derive(Subcommand)]
pub enum DevCmd {
    /// Start a local cluster (and, as they exist, an edge and demo identities).
    Up {
        #[arg(long, default_value = ".custody-dev")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, value_delimiter = ',', default_value = "eu,us,ap")]
        regions: Vec<String>,
        /// Return once everything is ready, leaving it running.
        #[arg(long)]
        detach: bool,
    },
    /// Stop what `dev up --detach` started.
    Down {
        #[arg(long, default_value = ".custody-dev")]
        dir: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
pub struct DevJson {
    pub coordinators: Vec<DevCoordinator>,
    pub edges: Vec<DevEdge>,
    pub identities: serde_json::Map<String, serde_json::Value>,
    pub env: DevEnv,
    /// The demo database, when PostgreSQL is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<DevPostgres>,
    /// The demo SSH host, when the OpenSSH server is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<DevService>,
    /// The demo Kubernetes API (the tests' API server), when it is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<DevService>,
}

/// Starts the tests' Kubernetes API server (`custody-kube-test-server`,
/// next to the custody binary) in `dir/kube`; its TOML resource and pid.
fn dev_kube(dir: &Path, custody: &Path) -> Option<(String, u32)> {
    use custody_cli::localkube::LocalKube;
    let Some(bin) = LocalKube::binary(custody) else {
        eprintln!(
            "skipping the {DEV_KUBE_RESOURCE} resource: custody-kube-test-server is not built next to {}",
            custody.display()
        );
        return None;
    };
    let kube = LocalKube::start(&bin, &dir.join("kube"), &dir.join("kube-api.log"))
        .inspect_err(|e| eprintln!("skipping the {DEV_KUBE_RESOURCE} resource: {e:#}"))
        .ok()?;
    Some((
        kube.resource_toml(DEV_KUBE_RESOURCE, "env = \"dev\""),
        kube.child.id(),
    ))
}

#[derive(Serialize, Deserialize)]
pub struct DevService {
    pub resource: String,
    pub hint: String,
    /// The private sshd (stopped by `dev down`).
    pub pid: u32,
}

/// Starts the demo sshd in `dir/sshd` (keys kept across restarts).
fn dev_sshd(dir: &Path) -> Option<custody_cli::localssh::LocalSshd> {
    custody_cli::localssh::LocalSshd::start(&dir.join("sshd"))
        .inspect_err(|e| eprintln!("skipping the {DEV_SSH_RESOURCE} resource: {e:#}"))
        .ok()
}

#[derive(Serialize, Deserialize)]
pub struct DevPostgres {
    pub resource: String,
    pub connect_hint: String,
    /// The private server's data directory (stopped by `dev down`).
    pub data_dir: String,
}

/// Starts (or restarts) the demo PostgreSQL cluster in `dir/postgres`.
fn dev_postgres(dir: &Path) -> anyhow::Result<Option<custody_cli::localpg::LocalPostgres>> {
    use custody_cli::localpg::{pg_bin, LocalPostgres};
    if pg_bin("initdb").is_none() {
        eprintln!("PostgreSQL server binaries not found: skipping the {DEV_PG_RESOURCE} resource");
        return Ok(None);
    }
    let pg_dir = dir.join("postgres");
    let mut pg = if pg_dir.join("data").join("PG_VERSION").exists() {
        LocalPostgres::restart(&pg_dir)?
    } else {
        // A link (to where the postgres user can reach) goes with what it
        // points at.
        if let Ok(target) = std::fs::read_link(&pg_dir) {
            let _ = std::fs::remove_dir_all(target);
            std::fs::remove_file(&pg_dir)?;
        } else if pg_dir.exists() {
            std::fs::remove_dir_all(&pg_dir)?;
        }
        LocalPostgres::start(&pg_dir)?
    };
    pg.stop_on_drop = false;
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", DEMO_SCHEMA])
        .envs(pg.direct_env())
        .output()
        .context("run psql to seed the demo schema")?;
    if !out.status.success() {
        anyhow::bail!(
            "seed the demo schema: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Some(pg))
}

#[derive(Serialize, Deserialize)]
pub struct DevCoordinator {
    pub id: u64,
    pub pid: u32,
    pub region: String,
    pub api: String,
}

#[derive(Serialize, Deserialize)]
pub struct DevEdge {
    pub name: String,
    pub pid: u32,
}

#[derive(Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct DevEnv {
    pub CUSTODY_COORDINATOR: String,
    pub CUSTODY_CA: String,
    pub CUSTODY_TOKEN: String,
}

pub async fn run(cmd: DevCmd) -> anyhow::Result<()> {
    match cmd {
        DevCmd::Up {
            dir,
            nodes,
            regions,
            detach,
        } => up(&dir, nodes, &regions, detach).await,
        DevCmd::Down { dir } => down(&dir),
    }
}

async fn up(dir: &Path, nodes: u64, regions: &[String], detach: bool) -> anyhow::Result<()> {
    let bins = Binaries::locate()?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolve {}", dir.display()))?;
    if dir.join("dev.json").exists() {
        down(&dir).context("stop the previous dev system")?;
    }
    let mut cluster = if dir.join("node-1.toml").exists() {
        eprintln!("reusing the cluster in {}", dir.display());
        LocalCluster::open(bins, &dir)?
    } else {
        let opts = GenOptions {
            nodes,
            regions: regions.to_vec(),
            ..GenOptions::default()
        };
        LocalCluster::generate(bins, &dir, &opts)?
    };
    cluster.start_all()?;
    let leader = cluster
        .wait_for_leader(&[], Duration::from_secs(30))
        .await
        .with_context(|| format!("cluster did not come up; see {}/node-*.log", dir.display()))?;
    let admin = cluster.client(&[])?;
    if admin.policy_show().await?.version == 0 {
        admin
            .policy_apply(DEV_POLICY, "yaml")
            .await
            .context("apply the demo policy")?;
    }
    let mut spec = EdgeSpec::shell(DEV_EDGE, DEV_RESOURCE);
    // Commands run in the dev dir's `work` directory.
    std::fs::create_dir_all(dir.join("work"))?;
    spec.resources_toml
        .push_str("[resources.shell]\nworkdir = \"work\"\n");
    let pg = dev_postgres(&dir)?;
    if let Some(pg) = &pg {
        spec.resources_toml
            .push_str(&pg.resource_toml(DEV_PG_RESOURCE, "env = \"dev\""));
    }
    let mut sshd = dev_sshd(&dir);
    if let Some(s) = &sshd {
        spec.resources_toml
            .push_str(&s.resource_toml(DEV_SSH_RESOURCE, "env = \"dev\""));
    }
    let kube = dev_kube(&dir, &cluster.bins.custody);
    if let Some((toml, _)) = &kube {
        spec.resources_toml.push_str(toml);
    }
    cluster.add_edge(&spec)?;
    if dir
        .join(format!("edge-{DEV_EDGE}"))
        .join("edge.json")
        .exists()
    {
        cluster.start_edge(DEV_EDGE, None)?;
    } else {
        cluster
            .enroll_edge(DEV_EDGE)
            .await
            .context("enroll the dev edge")?;
    }
    cluster
        .wait_for_resource(DEV_RESOURCE, 1, Duration::from_secs(30))
        .await
        .with_context(|| {
            format!(
                "the dev edge did not come up; see {}/edge-{DEV_EDGE}.log",
                dir.display()
            )
        })?;
    let mut identities = serde_json::Map::new();
    for who in ["admin", "alice", "bob", "carol", "agent", "audrey"] {
        let t = cluster
            .mint_token(who)
            .await
            .with_context(|| format!("mint a token for {who}"))?;
        identities.insert(
            who.into(),
            serde_json::json!({"token": t.token, "groups": t.groups}),
        );
    }
    let alice = identities["alice"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let dev = DevJson {
        coordinators: cluster
            .nodes
            .values()
            .map(|n| DevCoordinator {
                id: n.id,
                pid: n.pid().unwrap_or(0),
                region: n.region.clone(),
                api: n.api_url(),
            })
            .collect(),
        edges: cluster
            .edges
            .values()
            .map(|e| DevEdge {
                name: e.name.clone(),
                pid: e.pid().unwrap_or(0),
            })
            .collect(),
        identities,
        env: DevEnv {
            CUSTODY_COORDINATOR: cluster.api_urls(&[]),
            CUSTODY_CA: cluster.ca_path().display().to_string(),
            CUSTODY_TOKEN: alice,
        },
        postgres: pg.as_ref().map(|pg| DevPostgres {
            resource: DEV_PG_RESOURCE.into(),
            connect_hint: format!(
                "custody connect {DEV_PG_RESOURCE} --port 5433 & psql \"host=127.0.0.1 port=5433 dbname={DEV_PG_RESOURCE}\" -c 'select * from customers'"
            ),
            data_dir: pg.dir.join("data").display().to_string(),
        }),
        ssh: sshd.as_ref().map(|s| DevService {
            resource: DEV_SSH_RESOURCE.into(),
            hint: format!("custody ssh {DEV_SSH_RESOURCE} -- uname -a"),
            pid: s.pid().unwrap_or(0),
        }),
        kube: kube.as_ref().map(|(_, pid)| DevService {
            resource: DEV_KUBE_RESOURCE.into(),
            hint: format!(
                "custody kube login {DEV_KUBE_RESOURCE} && kubectl --context {DEV_KUBE_RESOURCE} get pods"
            ),
            pid: *pid,
        }),
    };
    let path = dir.join("dev.json");
    // dev.json holds tokens: owner-only.
    custody_cli::login::write_private(&path, serde_json::to_string_pretty(&dev)?.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    println!(
        "Custody dev system is up: {} coordinators (leader node {leader}), edge {DEV_EDGE} serving {DEV_RESOURCE}.",
        dev.coordinators.len()
    );
    println!(
        "Logs: {}/node-*.log, edge-*.log   State: {}",
        dir.display(),
        path.display()
    );
    println!();
    println!("Try:");
    println!(
        "  export CUSTODY_COORDINATOR={}",
        dev.env.CUSTODY_COORDINATOR
    );
    println!("  export CUSTODY_CA={}", dev.env.CUSTODY_CA);
    println!("  export CUSTODY_TOKEN=$(jq -r .identities.alice.token {})   # or admin, bob, carol, agent, audrey", path.display());
    println!("  custody whoami");
    println!("  custody resources");
    println!("  custody exec {DEV_RESOURCE} -- uname -a");
    println!("  custody exec {DEV_RESOURCE} -- rm -rf /      # refused by a guardrail");
    if let Some(p) = &dev.postgres {
        println!(
            "  custody exec {} --sql 'select * from customers'   # PII masked for alice",
            p.resource
        );
        println!("  {}", p.connect_hint);
    }
    if let Some(s) = &dev.ssh {
        println!(
            "  {}   # or `custody ssh config` for ssh {}.custody, scp, sftp",
            s.hint, s.resource
        );
    }
    if let Some(k) = &dev.kube {
        println!("  {}   # the tests' API server, not a real cluster", k.hint);
    }
    println!("  custody cluster status");
    println!("  custody policy show");
    if detach {
        println!("Stop it with: custody dev down --dir {}", dir.display());
        if let Some(s) = sshd.as_mut() {
            s.detach();
        }
        cluster.detach();
        return Ok(());
    }
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
    cluster.kill_edge(DEV_EDGE);
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for id in ids {
        cluster.stop(id)?;
    }
    if let Some(pg) = &pg {
        pg.stop();
    }
    if let Some(s) = sshd.as_mut() {
        s.stop();
    }
    if let Some((_, pid)) = &kube {
        signal(*pid, "TERM");
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("dev.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read {} (is a dev system running there?)", path.display()))?;
    let dev: DevJson =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let pids: Vec<u32> = dev
        .coordinators
        .iter()
        .map(|c| c.pid)
        .chain(dev.edges.iter().map(|e| e.pid))
        .chain(dev.ssh.iter().map(|s| s.pid))
        .chain(dev.kube.iter().map(|k| k.pid))
        .filter(|p| *p != 0)
        .collect();
    for p in &pids {
        if alive(*p) {
            signal(*p, "TERM");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &pids {
        if alive(*p) {
            signal(*p, "KILL");
        }
    }
    if let Some(p) = &dev.postgres {
        custody_cli::localpg::stop_data_dir(Path::new(&p.data_dir));
    }
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    println!("stopped {} processes", pids.len());
    Ok(())
}
