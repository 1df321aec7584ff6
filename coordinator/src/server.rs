//! Wires a node together: storage, the Raft loop, the transport and the API.

use std::future::Future;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::transport::Server;

use custody_proto::cluster::v1::peer_server::PeerServer;
use custody_proto::cluster::v1::raft_transport_server::RaftTransportServer;
use custody_proto::v1::approvals_server::ApprovalsServer;
use custody_proto::v1::auth_server::AuthServer;
use custody_proto::v1::cluster_server::ClusterServer;
use custody_proto::v1::edges_server::EdgesServer;
use custody_proto::v1::evidence_server::EvidenceServer;
use custody_proto::v1::kv_server::KvServer;
use custody_proto::v1::policy_server::PolicyServer;
use custody_proto::v1::resources_server::ResourcesServer;
use custody_proto::v1::sessions_server::SessionsServer;
use custody_proto::v1::tools_server::ToolsServer;

use crate::api::{
    ApiService, ApprovalsService, EdgesService, EvidenceService, Guard, PolicyService,
    ResourcesService, SessionsService,
};
use crate::auth::{HttpJwks, Verifier};
use crate::config::Config;
use crate::consensus::transport::{GrpcTransport, RaftService, MAX_FRAME_BYTES, WINDOW_BYTES};
use crate::consensus::{self, NodeConfig};
use crate::storage::{RaftStore, RocksEngine};
use crate::tls::{install_crypto_provider, tls_incoming, TlsMaterial};
use crate::tunnel::{EdgeRegistry, PeerClients, PeerService, Tunnels};

const API_MAX_MESSAGE: usize = 16 << 20;
/// Concurrent calls (HTTP/2 streams) one API connection may hold.
const API_MAX_STREAMS: u32 = 256;
/// How long shutdown waits for open sessions to close their chains.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a node until `shutdown` resolves or a listener fails.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    install_crypto_provider();
    crate::node_cert::recover_renewal(&cfg.tls)
        .context("finish an interrupted certificate renewal")?;
    let tls = TlsMaterial::load(&cfg.tls).context("load TLS material")?;
    create_private_dir(&cfg.data_dir)?;
    let raft_listener = TcpListener::bind(cfg.raft_addr)
        .await
        .with_context(|| format!("bind raft address {}", cfg.raft_addr))?;
    let api_listener = TcpListener::bind(cfg.api_addr)
        .await
        .with_context(|| format!("bind API address {}", cfg.api_addr))?;

    let dev_issuer = match &cfg.dev_issuer {
        Some(d) => {
            let router = crate::auth::dev_issuer::router(d).context("set up the dev issuer")?;
            let l = TcpListener::bind(d.listen)
                .await
                .with_context(|| format!("bind dev issuer address {}", d.listen))?;
            tracing::warn!(listen = %d.listen, "development issuer enabled: never use it in production");
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, router).await {
                    tracing::error!(error = %e, "dev issuer stopped");
                }
            }))
        }
        None => None,
    };
    let jwks = HttpJwks::new().map_err(|e| anyhow::anyhow!("HTTP client for JWKS: {e}"))?;
    let guard = std::sync::Arc::new(Guard::new(
        Verifier::new(cfg.issuers.clone(), std::sync::Arc::new(jwks)),
        cfg.admin_groups.clone(),
    ));

    let engine = RocksEngine::open(&cfg.data_dir.join("db"))
        .with_context(|| format!("open database in {}", cfg.data_dir.display()))?;
    let store = RaftStore::open(engine).context("load raft state")?;
    let may_bootstrap = may_bootstrap(&cfg, store.is_initialized())?;
    let mut node_cfg = NodeConfig::new(cfg.id);
    node_cfg.tick = cfg.tick;
    node_cfg.compact_threshold = cfg.compact_threshold;
    node_cfg.compact_bytes = cfg.compact_bytes;
    let bootstrap = may_bootstrap.then(|| cfg.members.clone());
    let client_tls = tls.clone();
    let (id, source_ip) = (cfg.id, cfg.raft_source_ip);
    let snapshots: std::sync::Arc<dyn crate::storage::SnapshotIo> =
        std::sync::Arc::new(store.clone());
    let transport_snapshots = snapshots.clone();
    let (node, raft_thread) =
        consensus::start(node_cfg, store, bootstrap, cfg.members.clone(), |input| {
            GrpcTransport::new(id, client_tls, source_ip, input, transport_snapshots)
        })
        .context("start raft node")?;
    let marker = cfg.data_dir.join(crate::config::NEW_CLUSTER_MARKER);
    if marker.exists() {
        // Bootstrapped (now or on an earlier start that stopped before this).
        std::fs::remove_file(&marker).with_context(|| format!("remove {}", marker.display()))?;
    }
    let ticker = consensus::spawn_ticker(node.input(), cfg.tick);
    // Report this binary's state version once the cluster takes writes.
    let version_report = {
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                match node.report_version().await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "reporting the state version: retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        })
    };

    let ca = match &cfg.ca_key {
        Some(path) => {
            let key = std::fs::read_to_string(path)
                .with_context(|| format!("read CA key {}", path.display()))?;
            let cert = String::from_utf8_lossy(&tls.ca_pem).into_owned();
            Some(std::sync::Arc::new(
                crate::pki::ClusterCa::from_pem(&cert, &key).context("load the cluster CA")?,
            ))
        }
        None => {
            tracing::warn!(
                "no tls.ca_key: this node cannot enroll edges or renew their certificates; it renews its own certificate through a member that holds the key"
            );
            None
        }
    };
    let evidence_key = match &cfg.evidence_key {
        Some(p) => Some(std::sync::Arc::new(
            crate::evidence::export::SigningKey::load(p)
                .context("load the evidence signing key")?,
        )),
        None => {
            tracing::warn!("no [evidence] signing_key: this node cannot sign exports");
            None
        }
    };
    let cluster_id = crate::evidence::export::cluster_id(&tls.ca_pem);
    // The audit events' SIEM stream (best-effort; the evidence is the record).
    let siem_tasks = crate::siem::start(cfg.siem.clone(), cfg.id, cluster_id.clone());
    let public_key = evidence_key
        .as_ref()
        .map(|k| k.public_b64())
        .unwrap_or_default();
    let registry = std::sync::Arc::new(EdgeRegistry::new());
    let tunnels = std::sync::Arc::new(Tunnels {
        node: node.clone(),
        registry: registry.clone(),
        peers: PeerClients::new(tls.clone()),
        ca,
        cert_ttl: cfg.edge_cert_ttl,
        region: cfg.region.clone(),
        enroll_limiter: Default::default(),
        live: crate::gateway::live::LiveSessions::new(),
        stats: guard.stats().clone(),
    });
    let authority = tokio::spawn(crate::gateway::live::watch_authority(
        tunnels.live.clone(),
        node.clone(),
        guard.clone(),
        cfg.token_grace,
    ));
    let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(
        tls.tunnel_server_config().context("tunnel TLS config")?,
    )
    .context("tunnel QUIC config")?;
    let mut quic_cfg = quinn::ServerConfig::with_crypto(std::sync::Arc::new(quic_tls));
    quic_cfg.transport_config(std::sync::Arc::new(
        crate::tunnel::server::transport_config(),
    ));
    let endpoint = quinn::Endpoint::server(quic_cfg, cfg.tunnel_addr)
        .with_context(|| format!("bind tunnel address {} (UDP)", cfg.tunnel_addr))?;
    let tunnel_task = tokio::spawn(tunnels.clone().serve(endpoint.clone()));
    let cert_renewal = tokio::spawn(crate::node_cert::renewer(
        tunnels.clone(),
        tls.clone(),
        cfg.tls.clone(),
        cfg.node_cert_ttl,
    ));
    let revocations = tokio::spawn(tunnels.clone().watch_revocations());
    let retention = tokio::spawn(retention_sweeper(node.clone(), cfg.retention_sweep));
    let webhook_secret = match &cfg.webhook_secret {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("read the webhook secret {}", p.display()))?
                .trim()
                .as_bytes()
                .to_vec(),
        ),
        None => None,
    };
    let notifier = crate::notify::Notifier::new(webhook_secret);
    // The PostgreSQL gateway: its listener when configured; MCP tools open
    // their database sessions through it either way.
    let pg = std::sync::Arc::new(crate::pg::PgGateway::new(
        tunnels.clone(),
        guard.clone(),
        tls.pg_server_config().context("postgres TLS config")?,
        cfg.postgres_allow_plaintext,
        notifier.clone(),
    ));
    let pg_task = match cfg.postgres_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind postgres address {addr}"))?;
            Some(tokio::spawn(pg.clone().serve(listener)))
        }
        None => None,
    };
    // The Kubernetes gateway: its listener when configured; MCP tools make
    // their Kubernetes requests through it either way.
    let kube = std::sync::Arc::new(crate::kube::KubeGateway::new(
        tunnels.clone(),
        guard.clone(),
        notifier.clone(),
        tls.kube_server_config().context("kubernetes TLS config")?,
    ));
    let kube_task = match cfg.kube_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind kubernetes address {addr}"))?;
            Some(tokio::spawn(kube.clone().serve(listener)))
        }
        None => None,
    };
    // The MCP tools: the `Tools` API, and `/mcp` when configured.
    let tools = std::sync::Arc::new(crate::mcp::Tools::new(
        tunnels.clone(),
        guard.clone(),
        notifier.clone(),
        pg,
        kube,
    ));
    let mcp_task = match cfg.mcp_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind mcp address {addr}"))?;
            let app = crate::mcp::http::router(
                tools.clone(),
                crate::mcp::http::Endpoint {
                    issuers: cfg.issuers.iter().map(|i| i.issuer.clone()).collect(),
                    allowed_hosts: cfg.mcp_allowed_hosts.clone(),
                    allowed_origins: cfg.mcp_allowed_origins.clone(),
                },
            );
            let tls_cfg = tls.kube_server_config().context("mcp TLS config")?;
            Some(tokio::spawn(crate::mcp::http::serve(
                listener, tls_cfg, app,
            )))
        }
        None => None,
    };

    // The SSH gateway and the host key line clients pin.
    let (ssh_task, ssh_public) = match (cfg.ssh_addr, &cfg.ssh_host_key) {
        (Some(addr), Some(key_path)) => {
            let key = crate::ssh::load_host_key(key_path).map_err(anyhow::Error::msg)?;
            let public = key
                .public_key()
                .to_openssh()
                .context("encode the SSH host key")?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind ssh address {addr}"))?;
            let gw = std::sync::Arc::new(crate::ssh::SshGateway::new(
                tunnels.clone(),
                guard.clone(),
                tls.ssh_server_config().context("ssh TLS config")?,
                key,
                notifier.clone(),
            ));
            (Some(tokio::spawn(gw.serve(listener))), public)
        }
        _ => (None, String::new()),
    };

    // Health and metrics.
    let metrics_task = match cfg.metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind metrics address {addr}"))?;
            Some(tokio::spawn(crate::health::serve(
                listener,
                tunnels.clone(),
            )))
        }
        None => None,
    };

    let is_member = crate::consensus::transport::member_check(
        node.store().clone(),
        cfg.members.iter().map(|m| m.id).collect(),
    );
    let raft_svc = RaftTransportServer::new(RaftService::new(
        cfg.id,
        node.input(),
        snapshots,
        is_member.clone(),
    ))
    .max_decoding_message_size(MAX_FRAME_BYTES)
    .max_encoding_message_size(MAX_FRAME_BYTES);
    let raft_incoming = tls_incoming(
        raft_listener,
        tls.server_config(true).context("raft TLS config")?,
        "raft",
        crate::tls::ConnLimits::DEFAULT,
    );
    let kv_svc = KvServer::new(ApiService::new(node.clone(), guard.clone()))
        .max_decoding_message_size(API_MAX_MESSAGE);
    let cluster_svc = ClusterServer::new(
        ApiService::new(node.clone(), guard.clone())
            .with_cluster_info(cluster_id.clone(), public_key.clone())
            .with_postgres_addr(cfg.postgres_addr)
            .with_ssh(cfg.ssh_addr, ssh_public)
            .with_kube(cfg.kube_addr)
            .with_mcp(cfg.mcp_addr),
    );
    let auth_svc = AuthServer::new(PolicyService::new(node.clone(), guard.clone()));
    let policy_svc = PolicyServer::new(PolicyService::new(node.clone(), guard.clone()))
        .max_decoding_message_size(API_MAX_MESSAGE);
    let api_incoming = tls_incoming(
        api_listener,
        tls.server_config(false).context("API TLS config")?,
        "api",
        crate::tls::ConnLimits::DEFAULT,
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let raft_server = Server::builder()
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(2 * WINDOW_BYTES)
        .add_service(raft_svc)
        .add_service(PeerServer::new(PeerService::new(
            &tunnels,
            is_member,
            cfg.node_cert_ttl,
        )))
        .serve_with_incoming_shutdown(raft_incoming, stopped(stop_rx.clone()));
    let api_server = Server::builder()
        // Limits per connection; the listener limits connections. A call
        // that has not answered within the timeout (a request body that
        // never ends, say) is cancelled; streams, once answering, are not.
        .timeout(cfg.api_request_timeout)
        .max_concurrent_streams(API_MAX_STREAMS)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(2 * WINDOW_BYTES)
        .add_service(kv_svc)
        .add_service(cluster_svc)
        .add_service(auth_svc)
        .add_service(policy_svc)
        .add_service(EdgesServer::new(EdgesService::new(
            tunnels.clone(),
            guard.clone(),
        )))
        .add_service(ResourcesServer::new(ResourcesService::new(
            tunnels.clone(),
            guard.clone(),
        )))
        .add_service(SessionsServer::new(SessionsService::new(
            tunnels.clone(),
            guard.clone(),
            notifier.clone(),
        )))
        .add_service(
            ToolsServer::new(crate::api::tools::ToolsService::new(tools))
                .max_decoding_message_size(API_MAX_MESSAGE),
        )
        .add_service(ApprovalsServer::new(ApprovalsService::new(
            node.clone(),
            guard.clone(),
            notifier.clone(),
        )))
        .add_service(EvidenceServer::new(EvidenceService::new(
            node.clone(),
            guard.clone(),
            evidence_key.clone(),
            cluster_id.clone(),
        )))
        .serve_with_incoming_shutdown(api_incoming, stopped(stop_rx.clone()));
    tracing::info!(
        node = cfg.id,
        region = %cfg.region,
        raft = %cfg.raft_addr,
        api = %cfg.api_addr,
        tunnel = %cfg.tunnel_addr,
        "coordinator node running"
    );
    let raft_task = tokio::spawn(raft_server);
    let api_task = tokio::spawn(api_server);
    // The Raft loop ends early only when storage failed; the process must then
    // exit non-zero so a supervisor restarts it.
    let (loop_done_tx, loop_done) = tokio::sync::oneshot::channel();
    let raft_thread = std::thread::spawn(move || {
        let r = raft_thread
            .join()
            .unwrap_or(Err(crate::consensus::NodeError::Stopped));
        let _ = loop_done_tx.send(r.as_ref().err().map(ToString::to_string));
        r
    });
    tokio::pin!(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => Ok(()),
        r = raft_task => r.context("raft server task").and_then(|r| r.context("raft server")),
        r = api_task => r.context("API server task").and_then(|r| r.context("API server")),
        failed = loop_done => match failed {
            Ok(Some(e)) => Err(anyhow::anyhow!("the raft loop stopped: {e}; exiting")),
            _ => Err(anyhow::anyhow!("the raft loop stopped unexpectedly; exiting")),
        },
    };
    tracing::info!(node = cfg.id, "shutting down");
    // Drain: open sessions are told, and close their evidence chains while
    // the cluster still takes writes.
    let ended = tunnels.live.end_where(|_| {
        Some(crate::gateway::live::EndReason {
            by: "shutdown".into(),
            reason: "the coordinator is shutting down".into(),
        })
    });
    if ended > 0 {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        while !tunnels.live.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::info!(
            node = cfg.id,
            ended,
            left = tunnels.live.list().len(),
            "sessions drained"
        );
    }
    authority.abort();
    let _ = stop_tx.send(true);
    registry.close_all(
        crate::tunnel::registry::close_code::SHUTDOWN,
        "coordinator shutting down",
    );
    endpoint.close(0u32.into(), b"shutting down");
    tunnel_task.abort();
    cert_renewal.abort();
    revocations.abort();
    retention.abort();
    if let Some(t) = pg_task {
        t.abort();
    }
    if let Some(t) = ssh_task {
        t.abort();
    }
    if let Some(t) = kube_task {
        t.abort();
    }
    if let Some(t) = mcp_task {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    ticker.abort();
    version_report.abort();
    for t in siem_tasks {
        t.abort();
    }
    if let Some(d) = dev_issuer {
        d.abort();
    }
    node.shutdown().await;
    match tokio::task::spawn_blocking(move || raft_thread.join()).await {
        Ok(Ok(Err(e))) if result.is_ok() => {
            return Err(anyhow::anyhow!(e).context("the raft loop stopped with an error"))
        }
        _ => {}
    }
    result
}

/// Whether this node may create a new cluster now. An original member whose
/// data dir holds no state may do so only on its first start (`--new-cluster`,
/// or the marker `gen-config` leaves): bootstrapping again after its disk was
/// lost would give it a vote and no log, and could lose acknowledged writes.
fn may_bootstrap(cfg: &Config, initialized: bool) -> anyhow::Result<bool> {
    let marker = cfg
        .data_dir
        .join(crate::config::NEW_CLUSTER_MARKER)
        .exists();
    if initialized {
        if cfg.new_cluster {
            anyhow::bail!(
                "--new-cluster was given, but {} already holds the state of node {} of an existing cluster; start it without --new-cluster",
                cfg.data_dir.display(),
                cfg.id
            );
        }
        return Ok(false);
    }
    if cfg.join {
        if cfg.new_cluster {
            anyhow::bail!("--new-cluster and join = true contradict each other");
        }
        return Ok(false);
    }
    if cfg.new_cluster || marker {
        return Ok(true);
    }
    anyhow::bail!(
        "node {id}'s data dir {dir} holds no state, but node {id} is an original member of an existing cluster (join = false). \
         Starting it empty could lose acknowledged writes, so it will not start. \
         If its disk was lost, replace it: give the node a new id with join = true \
         (`custody-coordinator gen-config --join-id NEW`), start it, and run `custody cluster replace {id} NEW`. \
         If this is the first start of a new cluster, start it with --new-cluster.",
        id = cfg.id,
        dir = cfg.data_dir.display()
    )
}

/// Creates the data directory readable by this user only (0700), and
/// tightens an existing one: it holds the Raft log and every session's evidence.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create data dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("make data dir {} private (0700)", dir.display()))
}

/// On every voter, applies the policy's retention rules every `every`.
/// Purges go through Raft, so every node deletes the same evidence.
async fn retention_sweeper<E: crate::storage::Engine>(
    node: crate::consensus::NodeHandle<E>,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(st) = node.status().await else {
            return;
        };
        // Every voter sweeps: each purge also reports the proposer's clock,
        // and purges judge expiry by the median of the voters' clocks.
        if !st.voters.contains(&st.id) {
            continue;
        }
        let has_rules = crate::state::policy_get(node.store())
            .ok()
            .flatten()
            .is_some_and(|p| !p.document.retention.is_empty());
        if !has_rules {
            continue;
        }
        match crate::api::purge_expired(&node).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(target: "audit", event = "evidence_purged", by = "retention", purged = n)
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "retention sweep failed; retrying next round")
            }
        }
    }
}
