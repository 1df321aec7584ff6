//! `custody-chaos`: benchmarks (and, later, chaos scenarios) against real processes.

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "custody-chaos",
    about = "Custody benchmarks and fault injection"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a benchmark.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Fill a cluster with GiBs of evidence, replace a wiped follower, and
    /// report its catch-up by snapshot: time, elections, peak RSS.
    Snapshot {
        /// Evidence to record first, in GiB.
        #[arg(long, default_value_t = 2.0)]
        gib: f64,
        /// Concurrent recording sessions.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Where to put the cluster (default: the system temp dir).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Raft commit throughput/latency and leader failover, against etcd.
    Raft {
        /// Seconds per measured cell.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Leader-failover trials.
        #[arg(long, default_value_t = 10)]
        failovers: usize,
        /// Skip the etcd baseline.
        #[arg(long)]
        no_etcd: bool,
    },
    /// Edge tunnels: stream throughput against direct TCP, edge RSS, routing
    /// time after a coordinator dies, coordinator RSS with simulated edges.
    Tunnel {
        /// Bytes streamed per round.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 6)]
        failovers: usize,
        /// Simulated edges connected to one node (0 to skip).
        #[arg(long, default_value_t = 1000)]
        edges: usize,
    },
    /// pgbench direct, through pgbouncer and through Custody.
    Postgres {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// Run only these workloads (select, tpcb, masking); all by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Use this gateway: a node id, `leader` or `follower` (default: the
        /// first node that answers, as the CLI picks).
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Kubernetes API requests direct and through Custody: `GET pods` rate
    /// and latency, and a streamed pod log.
    Kube {
        /// Pods in the listed namespace.
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// `GET pods` requests per path.
        #[arg(long, default_value_t = 500)]
        requests: usize,
        /// MiB of pod log streamed per path.
        #[arg(long, default_value_t = 100)]
        log_mb: u64,
    },
    /// MCP `query` tool calls over stdio and HTTP against `custody exec
    /// --sql` and a library client of the same statement.
    Mcp {
        /// Calls per path (after a warm-up).
        #[arg(long, default_value_t = 200)]
        calls: usize,
    },
    /// OpenSSH direct and through Custody: bulk output, scp, new connections.
    Ssh {
        /// MiB of output per bulk run.
        #[arg(long, default_value_t = 1024)]
        mb: u64,
        /// Size of the file scp uploads, in MiB.
        #[arg(long, default_value_t = 512)]
        scp_mb: u64,
        /// New connections timed per path (`ssh HOST true`).
        #[arg(long, default_value_t = 20)]
        connects: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Evidence ingest MB/s, compression ratio, strict-mode added latency.
    Evidence {
        /// Concurrent sessions per transcript kind.
        #[arg(long, default_value_t = 4)]
        sessions: usize,
        /// Size of each transcript (loop iterations).
        #[arg(long, default_value_t = 600)]
        iterations: usize,
        /// Output per session, in MiB (recorded up to the 64 MiB cap).
        #[arg(long, default_value_t = 32)]
        mb: u64,
        #[arg(long, default_value_t = 200)]
        latency_runs: usize,
    },
    /// Sequential API call latency against a running cluster (from the
    /// CUSTODY_* environment), in consecutive rounds.
    Rpc {
        #[arg(long, default_value_t = 200)]
        calls: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Bench(BenchCmd::Raft {
            seconds,
            failovers,
            no_etcd,
        }) => custody_chaos::bench::raft(Duration::from_secs(seconds), failovers, !no_etcd).await,
        Cmd::Bench(BenchCmd::Tunnel {
            bytes,
            rounds,
            failovers,
            edges,
        }) => custody_chaos::tunnel_bench::tunnel(bytes, rounds.max(1), failovers, edges).await,
        Cmd::Bench(BenchCmd::Evidence {
            sessions,
            iterations,
            mb,
            latency_runs,
        }) => {
            custody_chaos::evidence_bench::evidence(
                sessions.max(1),
                iterations.max(1),
                mb.clamp(1, 60),
                latency_runs.max(5),
            )
            .await
        }
        Cmd::Bench(BenchCmd::Postgres {
            seconds,
            clients,
            scale,
            only,
            gateway,
        }) => {
            custody_chaos::pg_bench::postgres(
                seconds.max(1),
                clients.max(1),
                scale.max(1),
                &only,
                gateway.as_deref(),
            )
            .await
        }
        Cmd::Bench(BenchCmd::Ssh {
            mb,
            scp_mb,
            connects,
            rounds,
        }) => {
            custody_chaos::ssh_bench::ssh(mb.max(1), scp_mb.max(1), connects, rounds.max(1)).await
        }
        Cmd::Bench(BenchCmd::Mcp { calls }) => custody_chaos::mcp_bench::mcp(calls.max(1)).await,
        Cmd::Bench(BenchCmd::Kube {
            pods,
            requests,
            log_mb,
        }) => custody_chaos::kube_bench::kube(pods, requests.max(1), log_mb.max(1)).await,
        Cmd::Snapshot { gib, parallel, dir } => {
            custody_chaos::snapshot_soak::snapshot(gib.max(0.01), parallel, dir).await
        }
        Cmd::Bench(BenchCmd::Rpc { calls, rounds }) => {
            custody_chaos::bench::rpc_probe(calls.max(10), rounds.max(1)).await
        }
    }
}
