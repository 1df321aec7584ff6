//! The tests' Kubernetes API server as a process, for `custody dev up`
//! (`local-kube`): no real kube-apiserver can be installed on these
//! machines. It writes `kube-ca.pem`, `kube-token` and `kube.json` (its URL)
//! into `--dir`, then serves until killed.

use anyhow::Context as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let dir = match (args.next().as_deref(), args.next()) {
        (Some("--dir"), Some(d)) => std::path::PathBuf::from(d),
        _ => anyhow::bail!("usage: custody-kube-test-server --dir DIR"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let api = custody_tests::kube_api::KubeApi::start().await?;
    std::fs::write(dir.join("kube-ca.pem"), &api.ca_pem)?;
    custody_cli::login::write_private(&dir.join("kube-token"), api.token.as_bytes())?;
    let info = serde_json::json!({"url": api.url(), "pid": std::process::id()});
    // Written last: its presence says the server is up.
    std::fs::write(dir.join("kube.json"), info.to_string())?;
    eprintln!("custody-kube-test-server: serving {}", api.url());
    std::future::pending::<()>().await;
    Ok(())
}
