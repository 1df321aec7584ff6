//! `custody-coordinator`: runs a coordinator node or writes local configs.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use custody_coordinator::config::Config;
use custody_coordinator::gen_config::{self, GenConfig};

#[derive(Parser)]
#[command(
    name = "custody-coordinator",
    version,
    about = "Custody coordinator node"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node from a TOML config.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Create a new cluster if the data dir is empty (first start of an
        /// original member only; refused when the data dir holds state).
        #[arg(long)]
        new_cluster: bool,
    },
    /// Write configs, a cluster CA and node certificates for a local cluster.
    GenConfig {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, value_delimiter = ',', default_value = "eu,us,ap")]
        regions: Vec<String>,
        #[arg(long)]
        dir: PathBuf,
        /// Addresses the nodes listen on, assigned round-robin (node 1 gets the
        /// first). With --join-id, the first is used.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        hosts: Vec<String>,
        /// Compact the Raft log every this many entries.
        #[arg(long)]
        compact_threshold: Option<u64>,
        /// Also trust this OIDC issuer (with --audience).
        #[arg(long, requires = "audience")]
        issuer: Option<String>,
        /// Audience required in tokens of --issuer.
        #[arg(long)]
        audience: Option<String>,
        /// Instead of a new cluster: write the config of node ID that will join
        /// the cluster already in --dir.
        #[arg(long, value_name = "ID")]
        join_id: Option<u64>,
    },
}

/// The log on stderr (filtered by `CUSTODY_LOG`), and the SIEM stream's
/// layer, which sees every audit event whatever the log's filter.
fn init_tracing(json: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let log = if json {
        log.json().with_filter(filter).boxed()
    } else {
        log.with_filter(filter).boxed()
    };
    tracing_subscriber::registry()
        .with(log)
        .with(custody_coordinator::siem::Layer)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            log_json,
            new_cluster,
        } => {
            init_tracing(log_json);
            let mut cfg = Config::load(&config)?;
            cfg.new_cluster = new_cluster;
            let rt = tokio::runtime::Runtime::new().context("start tokio runtime")?;
            rt.block_on(custody_coordinator::server::run(cfg, shutdown_signal()))
        }
        Cmd::GenConfig {
            nodes,
            regions,
            dir,
            hosts,
            compact_threshold,
            join_id,
            issuer,
            audience,
        } => {
            if let Some(id) = join_id {
                let region = regions.first().map(String::as_str).unwrap_or("eu");
                let host = hosts.first().map(String::as_str).unwrap_or("127.0.0.1");
                let p = gen_config::generate_joiner(&dir, id, region, host, compact_threshold)?;
                println!("{}", p.display());
            } else {
                let paths = gen_config::generate(&GenConfig {
                    dir,
                    nodes,
                    regions,
                    hosts,
                    compact_threshold,
                    issuers: issuer
                        .into_iter()
                        .map(|i| custody_coordinator::config::RawIssuer {
                            issuer: i,
                            audience: audience.clone().unwrap_or_default(),
                            discovery_url: None,
                            groups_claim: None,
                            required_typ: None,
                            jwks_min_refresh_secs: None,
                            leeway_secs: None,
                            qualify_groups: None,
                        })
                        .collect(),
                })?;
                for p in paths {
                    println!("{}", p.display());
                }
            }
            Ok(())
        }
    }
}
