//! `custody`: the Custody command-line client.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "custody",
    version,
    about = "Custody: audited access for humans and AI agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect and change the coordinator cluster.
    #[command(subcommand)]
    Cluster(commands::cluster::ClusterCmd),
    /// Read and write the generic replicated key-value namespace.
    #[command(subcommand)]
    Kv(commands::kv::KvCmd),
    /// Get a token from an OpenID provider and keep it in the token file.
    Login(commands::login::LoginArgs),
    /// Forget the stored token.
    Logout,
    /// Show the identity the coordinator verified from your token.
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// Manage the access policy.
    #[command(subcommand)]
    Policy(commands::policy::PolicyCmd),
    /// Create edge enrollment tokens.
    #[command(subcommand, name = "edge-token")]
    EdgeToken(commands::edge::EdgeTokenCmd),
    /// List and revoke edges.
    #[command(subcommand)]
    Edge(commands::edge::EdgeCmd),
    /// List resources, their bindings, edges and liveness; bind them.
    Resources {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: Option<commands::edge::ResourcesCmd>,
    },
    /// Recorded sessions: list, show, replay.
    #[command(subcommand)]
    Sessions(commands::sessions::SessionsCmd),
    /// Review and manage just-in-time approval requests.
    #[command(subcommand)]
    Approvals(commands::approvals::ApprovalsCmd),
    /// Ask for time-boxed access grants.
    #[command(subcommand)]
    Access(commands::approvals::AccessCmd),
    /// Evidence retention and legal holds.
    #[command(subcommand)]
    Evidence(commands::evidence::EvidenceCmd),
    /// Write a signed compliance export of recorded sessions.
    Export(commands::export::ExportArgs),
    /// Check an export offline: signature, digests, hash chains.
    Verify(commands::export::VerifyArgs),
    /// Run a command on a resource; exits with the remote exit code.
    Exec(commands::exec::ExecArgs),
    /// Serve a postgres resource on a local port, injecting your token.
    Connect(commands::connect::ConnectArgs),
    /// Open an SSH session on a resource through the gateway (the system
    /// ssh, with the cluster's host key pinned); `custody ssh config` prints
    /// the OpenSSH configuration for `ssh RESOURCE.custody`, scp and sftp.
    Ssh(commands::ssh::SshArgs),
    /// OpenSSH's ProxyCommand: carries SSH to the gateway with your token.
    #[command(name = "ssh-proxy")]
    SshProxy(commands::ssh::ProxyArgs),
    /// kubectl through the gateway: `custody kube login RESOURCE` writes a
    /// kubeconfig context; `custody kube credentials` is its exec plugin.
    #[command(subcommand)]
    Kube(commands::kube::KubeCmd),
    /// Run a local development system.
    #[command(subcommand)]
    Dev(commands::dev::DevCmd),
    /// Serve the governed tools to an AI agent over MCP (stdio).
    Mcp(commands::mcp::McpArgs),
}

fn main() {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            std::process::exit(1);
        }
    };
    let cmd = match cli.cmd {
        Cmd::Exec(a) => {
            let code = rt.block_on(commands::exec::run(a));
            std::process::exit(code);
        }
        Cmd::Ssh(a) => match rt.block_on(commands::ssh::run(a)) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(255);
            }
        },
        other => other,
    };
    let result = rt.block_on(async move {
        match cmd {
            Cmd::Exec(_) | Cmd::Ssh(_) => unreachable!("handled above"),
            Cmd::SshProxy(a) => commands::ssh::proxy(a).await,
            Cmd::Kube(c) => commands::kube::run(c).await,
            Cmd::Mcp(a) => commands::mcp::run(a).await,
            Cmd::EdgeToken(c) => commands::edge::token(c).await,
            Cmd::Edge(c) => commands::edge::run(c).await,
            Cmd::Resources { json, cmd: None } => commands::edge::resources(json).await,
            Cmd::Resources { cmd: Some(c), .. } => commands::edge::bind(c).await,
            Cmd::Sessions(c) => commands::sessions::run(c).await,
            Cmd::Export(a) => commands::export::export(a).await,
            Cmd::Evidence(c) => commands::evidence::run(c).await,
            Cmd::Approvals(c) => commands::approvals::run(c).await,
            Cmd::Access(c) => commands::approvals::access(c).await,
            Cmd::Verify(a) => commands::export::verify(a),
            Cmd::Cluster(c) => commands::cluster::run(c).await,
            Cmd::Kv(c) => commands::kv::run(c).await,
            Cmd::Dev(c) => commands::dev::run(c).await,
            Cmd::Connect(a) => commands::connect::run(a).await,
            Cmd::Whoami { json } => commands::whoami::run(json).await,
            Cmd::Login(a) => commands::login::run(a).await,
            Cmd::Logout => commands::login::logout(),
            Cmd::Policy(c) => commands::policy::run(c).await,
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
