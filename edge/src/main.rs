//! `custody-edge`: the edge agent binary.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use custody_edge::agent::Agent;
use custody_edge::config::EdgeConfig;

#[derive(Parser)]
#[command(name = "custody-edge", version, about = "Custody edge agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enroll if needed, then keep tunnels to every coordinator.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Single-use enrollment token (needed only for the first start).
        #[arg(long, env = "CUSTODY_ENROLL_TOKEN", hide_env_values = true)]
        enroll_token: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    custody_edge::tls::install_crypto_provider();
    match Cli::parse().cmd {
        Cmd::Run {
            config,
            enroll_token,
        } => {
            let cfg = EdgeConfig::load(&config)?;
            let metrics = cfg.metrics;
            let agent = Agent::start(cfg, enroll_token)
                .await
                .context("start the edge")?;
            if let Some(addr) = metrics {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("bind the metrics address {addr}"))?;
                tokio::spawn(custody_edge::health::serve(listener, agent.clone()));
            }
            let id = agent.identity();
            tracing::info!(edge = id.info.edge_id, name = %id.info.name, "edge running");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("install SIGTERM handler")?;
            tokio::select! {
                e = agent.wait() => {
                    agent.shutdown();
                    return Err(e.into());
                }
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            agent.shutdown();
            Ok(())
        }
    }
}
