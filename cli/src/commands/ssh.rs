//! `custody ssh`: plain OpenSSH through the gateway.
//!
//! - `custody ssh RESOURCE [-- CMD…]` runs the system `ssh` with
//!   `custody ssh-proxy` as its ProxyCommand and the cluster's host key
//!   pinned.
//! - `custody ssh-proxy RESOURCE` (what OpenSSH runs) opens TLS to the
//!   gateway, presents the token, names the resource and login, then carries
//!   the SSH bytes between its stdin/stdout and the gateway.
//! - `custody ssh config` writes the known_hosts file and prints the
//!   OpenSSH configuration block (`Host *.custody`), so `ssh db-1.custody`,
//!   `scp` and `sftp` work unchanged.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use custody_cli::client::Client;
use custody_proto::frame::{read_frame, write_frame};
use custody_proto::v1 as api;

/// The name OpenSSH knows the cluster's host key by.
const HOST_KEY_ALIAS: &str = "custody-cluster";
/// Host names `custody ssh config` routes through the gateway.
const DOMAIN: &str = ".custody";

#[derive(clap::Args)]
pub struct SshArgs {
    /// The ssh resource (see `custody resources`), or `config` to print the
    /// OpenSSH configuration block.
    resource: String,
    /// The login name on the target, recorded with the session (the edge
    /// logs in with its own configured user).
    #[arg(short = 'l', long)]
    login: Option<String>,
    /// Extra options for ssh, as `-o` gives them (repeatable).
    #[arg(short = 'o', long = "option")]
    options: Vec<String>,
    /// Allocate a terminal even for a command.
    #[arg(short = 't')]
    tty: bool,
    /// The command to run (none: an interactive shell).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// The resource, or `RESOURCE.custody` as OpenSSH's `%n` gives it.
    resource: String,
    /// The login name OpenSSH uses (`%r`).
    #[arg(long, default_value = "")]
    login: String,
}

fn config_dir() -> anyhow::Result<PathBuf> {
    if let Ok(d) = std::env::var("CUSTODY_CONFIG_DIR") {
        return Ok(d.into());
    }
    let home = std::env::var("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".config").join("custody"))
}

/// The SSH gateway's address and the cluster's host key line.
async fn gateway(client: &Client) -> anyhow::Result<(SocketAddr, String)> {
    let st = client.cluster_status().await?;
    if st.ssh_addr.is_empty() {
        bail!(
            "coordinator {} has no SSH gateway (listen.ssh is not set)",
            st.node_id
        );
    }
    let addr: SocketAddr = st
        .ssh_addr
        .parse()
        .with_context(|| format!("bad SSH gateway address {:?}", st.ssh_addr))?;
    let addr = super::connect::reachable(client, addr);
    Ok((addr, st.ssh_host_key))
}

/// Writes the cluster's host key where the generated ssh options point.
fn write_known_hosts(key_line: &str) -> anyhow::Result<PathBuf> {
    if key_line.trim().is_empty() {
        bail!("the cluster did not report its SSH host key");
    }
    let dir = config_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("known_hosts");
    std::fs::write(&path, format!("{HOST_KEY_ALIAS} {}\n", key_line.trim()))
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn exe() -> anyhow::Result<String> {
    let p = std::env::current_exe().context("find the custody executable")?;
    Ok(p.to_string_lossy().into_owned())
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=+@%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

pub async fn run(a: SshArgs) -> anyhow::Result<i32> {
    let client = Client::from_env()?;
    let (_, key) = gateway(&client).await?;
    let known = write_known_hosts(&key)?;
    if a.resource == "config" {
        println!(
            "# Custody: `ssh RESOURCE{DOMAIN}`, scp and sftp through the gateway.\n\
             # The cluster's host key is in {known}.\n\
             Host *{DOMAIN}\n  \
             ProxyCommand {} ssh-proxy %n --login %r\n  \
             HostKeyAlias {HOST_KEY_ALIAS}\n  \
             UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n  \
             ForwardAgent no\n  \
             ForwardX11 no",
            quote(&exe()?),
            quote(&known.to_string_lossy()),
            known = known.display(),
        );
        return Ok(0);
    }
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-o")
        .arg(format!(
            "ProxyCommand={} ssh-proxy {} --login %r",
            quote(&exe()?),
            quote(&a.resource)
        ))
        .arg("-o")
        .arg(format!("HostKeyAlias={HOST_KEY_ALIAS}"))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-o")
        .arg("StrictHostKeyChecking=yes")
        .arg("-o")
        .arg("ForwardAgent=no")
        .arg("-o")
        .arg("ForwardX11=no");
    for o in &a.options {
        cmd.arg("-o").arg(o);
    }
    if a.tty {
        cmd.arg("-t");
    }
    if let Some(l) = &a.login {
        cmd.arg("-l").arg(l);
    }
    // Options end at the destination; what follows is the command.
    cmd.arg(format!("{}{DOMAIN}", a.resource));
    if !a.command.is_empty() {
        // ssh joins its arguments with spaces for the remote shell; quote
        // them so the command runs as given.
        let joined: Vec<String> = a.command.iter().map(|s| quote(s)).collect();
        cmd.arg(joined.join(" "));
    }
    let status = cmd
        .status()
        .context("run ssh (install the OpenSSH client)")?;
    Ok(status.code().unwrap_or(255))
}

/// Carries SSH between stdin/stdout and the gateway.
pub async fn proxy(a: ProxyArgs) -> anyhow::Result<()> {
    let resource = a
        .resource
        .strip_suffix(DOMAIN)
        .unwrap_or(&a.resource)
        .to_owned();
    let client = Client::from_env()?;
    let token = custody_cli::login::current_token()
        .context("no access token: run `custody login` or set CUSTODY_TOKEN")?;
    let (addr, _) = gateway(&client).await?;
    let ca: PathBuf = std::env::var("CUSTODY_CA")
        .context("CUSTODY_CA is not set (the cluster CA certificate)")?
        .into();
    let tls = custody_cli::pg::tls_config_alpn(&ca, b"custody-ssh")?;
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to the SSH gateway at {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .with_context(|| format!("TLS with the SSH gateway at {addr}"))?;
    let hello = api::SshHello {
        token,
        resource: resource.clone(),
        login: a.login,
    };
    write_frame(&mut s, &hello).await.context("send hello")?;
    let welcome = read_frame::<api::SshWelcome, _>(&mut s)
        .await
        .context("read the gateway's answer")?
        .context("the gateway closed the connection")?;
    if !welcome.error.is_empty() {
        bail!("{resource}: {}", welcome.error);
    }
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    match tokio::io::copy_bidirectional(&mut stdio, &mut s).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(e).context("relay SSH"),
    }
}
