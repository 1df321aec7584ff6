//! `custody kube`: kubectl through the gateway.
//!
//! - `custody kube login RESOURCE` writes a kubeconfig context whose server
//!   is the gateway's `/k8s/RESOURCE` prefix (the cluster CA pinned) and
//!   whose credentials come from `custody kube credentials`, an exec
//!   credential plugin; plain `kubectl --context RESOURCE …` then works.
//! - `custody kube credentials` prints an ExecCredential with the current
//!   access token (refreshed as `custody login` keeps it).

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use custody_cli::client::Client;

#[derive(clap::Subcommand)]
pub enum KubeCmd {
    /// Write a kubeconfig context for a kubernetes resource.
    Login {
        resource: String,
        /// The kubeconfig to write (default: $KUBECONFIG, else ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The context's name (default: the resource's).
        #[arg(long)]
        context: Option<String>,
    },
    /// Print an ExecCredential for kubectl (the exec credential plugin).
    Credentials,
}

fn kubeconfig_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    if let Ok(k) = std::env::var("KUBECONFIG") {
        if let Some(first) = std::env::split_paths(&k).next() {
            return Ok(first);
        }
    }
    let home = std::env::var("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".kube").join("config"))
}

/// Replaces (or adds) the entry named `name` in a kubeconfig list.
fn upsert(list: &mut serde_json::Value, name: &str, entry: serde_json::Value) {
    if !list.is_array() {
        *list = serde_json::json!([]);
    }
    let items = list.as_array_mut().expect("an array");
    items.retain(|e| e["name"] != name);
    items.push(entry);
}

pub async fn run(cmd: KubeCmd) -> anyhow::Result<()> {
    match cmd {
        KubeCmd::Credentials => {
            let token = custody_cli::login::current_token()
                .context("no access token: run `custody login` or set CUSTODY_TOKEN")?;
            let cred = serde_json::json!({
                "apiVersion": "client.authentication.k8s.io/v1",
                "kind": "ExecCredential",
                "status": {"token": token},
            });
            println!("{cred}");
            Ok(())
        }
        KubeCmd::Login {
            resource,
            kubeconfig,
            context,
        } => {
            let client = Client::from_env()?;
            let st = client.cluster_status().await?;
            if st.kube_addr.is_empty() {
                bail!(
                    "coordinator {} has no Kubernetes gateway (listen.kubernetes is not set)",
                    st.node_id
                );
            }
            let addr: std::net::SocketAddr = st
                .kube_addr
                .parse()
                .with_context(|| format!("bad Kubernetes gateway address {:?}", st.kube_addr))?;
            let addr = super::connect::reachable(&client, addr);
            let ca: PathBuf = std::env::var("CUSTODY_CA")
                .context("CUSTODY_CA is not set (the cluster CA certificate)")?
                .into();
            let ca = std::fs::canonicalize(&ca).unwrap_or(ca);
            let exe = std::env::current_exe().context("locate the custody binary")?;
            let path = kubeconfig_path(kubeconfig)?;
            let name = context.unwrap_or_else(|| resource.clone());
            let mut cfg: serde_json::Value = match std::fs::read_to_string(&path) {
                Ok(text) if !text.trim().is_empty() => serde_norway::from_str(&text)
                    .with_context(|| format!("read the kubeconfig {}", path.display()))?,
                Ok(_) => serde_json::json!({}),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
                Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
            };
            if !cfg.is_object() {
                bail!("{} is not a kubeconfig (not a mapping)", path.display());
            }
            cfg["apiVersion"] = "v1".into();
            cfg["kind"] = "Config".into();
            let cluster = format!("custody-{name}");
            let user = format!("custody-{name}");
            upsert(
                &mut cfg["clusters"],
                &cluster,
                serde_json::json!({"name": cluster, "cluster": {
                    "server": format!("https://{addr}/k8s/{resource}"),
                    "certificate-authority": ca.display().to_string(),
                }}),
            );
            upsert(
                &mut cfg["users"],
                &user,
                serde_json::json!({"name": user, "user": {"exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": exe.display().to_string(),
                    "args": ["kube", "credentials"],
                    "interactiveMode": "Never",
                    "provideClusterInfo": false,
                }}}),
            );
            upsert(
                &mut cfg["contexts"],
                &name,
                serde_json::json!({"name": name, "context": {"cluster": cluster, "user": user}}),
            );
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let text = serde_norway::to_string(&cfg)?;
            // Written whole, owner-only from the start (it holds every
            // context's credentials), then renamed over the old one (or
            // over the file a symlinked kubeconfig points to).
            let target = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            let tmp = target.with_extension("custody-tmp");
            {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("write {}", tmp.display()))?;
                f.write_all(text.as_bytes())?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &target)?;
            println!(
                "wrote context {name:?} to {} (kubectl --context {name} get pods)",
                path.display()
            );
            Ok(())
        }
    }
}
