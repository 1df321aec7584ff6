//! The tunnel supervisor: one connection loop per coordinator.
//!
//! The edge starts from the configured coordinator addresses, learns the
//! whole cluster from each coordinator's `Welcome` and `Coordinators`
//! messages, and keeps a tunnel to every member, reconnecting with jittered
//! exponential backoff. Coordinators open one stream per session; the edge
//! answers it with the resource's connector.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use custody_proto::frame::{read_frame, write_frame};
use custody_proto::tunnel::v1 as t;

use crate::config::{Connector, EdgeConfig};
use crate::identity::{self, Identity, Store};
use crate::tls::quic_client_config;

/// Close code a coordinator uses for revoked edges.
const CLOSE_REVOKED: u32 = 1;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an open session may wait for its command (strict-mode evidence
/// commits take at most a few seconds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// A renewal not answered within this time may be retried.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("read CA {path}: {source}")]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Enroll(#[from] identity::EnrollError),
    #[error("the edge certificate expired at {0} (unix time); enroll again with a new token after removing the data dir")]
    Expired(i64),
    #[error("this edge was revoked: {0}")]
    Revoked(String),
    #[error("UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("{0}")]
    Tls(String),
}

enum LoopEnd {
    /// Connected, then lost: reconnect soon.
    Lost(String),
    /// Never connected.
    Failed(String),
    Revoked(String),
}

/// A running agent.
pub struct Agent {
    cfg: Arc<EdgeConfig>,
    ca_pem: Vec<u8>,
    endpoint: quinn::Endpoint,
    store: Store,
    identity: RwLock<Identity>,
    loops: Mutex<HashMap<SocketAddr, JoinHandle<()>>>,
    renewing: Mutex<Option<(String, Instant)>>,
    /// Tunnels up now, and sessions being served (for `/metrics`).
    pub tunnels_up: AtomicUsize,
    pub sessions_active: Arc<AtomicUsize>,
    fatal: watch::Sender<Option<String>>,
}

fn is_revoked(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(CLOSE_REVOKED))
}

fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + Duration::from_millis(rand::random_range(0..=half.as_millis() as u64))
}

impl Agent {
    /// Loads or creates the edge identity (enrolling with `token` if needed)
    /// and starts the connection loops.
    pub async fn start(cfg: EdgeConfig, token: Option<String>) -> Result<Arc<Self>, AgentError> {
        let ca_pem = std::fs::read(&cfg.ca).map_err(|source| AgentError::Ca {
            path: cfg.ca.clone(),
            source,
        })?;
        let bind: SocketAddr = if cfg.coordinators.iter().all(|a| a.is_ipv6()) {
            "[::]:0".parse().expect("valid address")
        } else {
            "0.0.0.0:0".parse().expect("valid address")
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(AgentError::Socket)?;
        let store = Store::new(&cfg.data_dir);
        let identity = match store.load()? {
            Some(id) => id,
            None => {
                let token = token
                    .or_else(|| cfg.enroll_token.clone())
                    .ok_or(identity::EnrollError::NoToken)?;
                let id =
                    identity::enroll(&endpoint, &ca_pem, &cfg.coordinators, &token, &store).await?;
                tracing::info!(edge = id.info.edge_id, name = %id.info.name, region = %id.info.region, "enrolled");
                id
            }
        };
        if identity.expired() {
            return Err(AgentError::Expired(identity.not_after));
        }
        // Fail now on a bad certificate rather than in every loop.
        quic_client_config(&ca_pem, Some(&identity)).map_err(AgentError::Tls)?;
        let (fatal, _) = watch::channel(None);
        let agent = Arc::new(Agent {
            cfg: Arc::new(cfg),
            ca_pem,
            endpoint,
            store,
            identity: RwLock::new(identity),
            loops: Mutex::new(HashMap::new()),
            renewing: Mutex::new(None),
            tunnels_up: AtomicUsize::new(0),
            sessions_active: Arc::new(AtomicUsize::new(0)),
            fatal,
        });
        for addr in agent.cfg.coordinators.clone() {
            agent.ensure_loop(addr);
        }
        Ok(agent)
    }

    pub fn identity(&self) -> Identity {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs until the edge is revoked.
    pub async fn wait(&self) -> AgentError {
        let mut rx = self.fatal.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return AgentError::Revoked(why);
            }
            if rx.changed().await.is_err() {
                return AgentError::Revoked("agent stopped".into());
            }
        }
    }

    /// Closes every tunnel.
    pub fn shutdown(&self) {
        for (_, h) in self.loops.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            h.abort();
        }
        self.endpoint.close(0u32.into(), b"edge shutting down");
    }

    fn ensure_loop(self: &Arc<Self>, addr: SocketAddr) {
        let mut loops = self.loops.lock().unwrap_or_else(|e| e.into_inner());
        if loops.get(&addr).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let this = self.clone();
        loops.insert(addr, tokio::spawn(async move { this.run_loop(addr).await }));
    }

    /// Tracks membership: new coordinators get a loop; loops of removed
    /// members stop (configured seeds are always kept).
    fn learn(self: &Arc<Self>, coordinators: &[t::Coordinator]) {
        if !self.cfg.follow_membership {
            return;
        }
        let addrs: Vec<SocketAddr> = coordinators
            .iter()
            .filter_map(|c| c.tunnel_addr.parse().ok())
            .collect();
        if addrs.is_empty() {
            return;
        }
        for a in &addrs {
            self.ensure_loop(*a);
        }
        let mut loops = self.loops.lock().unwrap_or_else(|e| e.into_inner());
        loops.retain(|a, h| {
            let keep = addrs.contains(a) || self.cfg.coordinators.contains(a);
            if !keep {
                tracing::info!(coordinator = %a, "coordinator left the cluster");
                h.abort();
            }
            keep
        });
    }

    async fn run_loop(self: Arc<Self>, addr: SocketAddr) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.connect_once(addr).await {
                LoopEnd::Revoked(why) => {
                    tracing::error!(coordinator = %addr, reason = %why, "edge revoked: stopping");
                    let _ = self.fatal.send(Some(why));
                    return;
                }
                LoopEnd::Lost(why) => {
                    tracing::warn!(coordinator = %addr, reason = %why, "tunnel lost; reconnecting");
                    backoff = BACKOFF_MIN;
                }
                LoopEnd::Failed(why) => {
                    tracing::debug!(coordinator = %addr, reason = %why, ?backoff, "cannot reach coordinator");
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn hello(&self) -> t::EdgeMessage {
        t::EdgeMessage {
            kind: Some(t::edge_message::Kind::Hello(t::Hello {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                resources: self
                    .cfg
                    .resources
                    .iter()
                    .map(|r| t::Resource {
                        name: r.name.clone(),
                        kind: r.kind.clone(),
                        labels: r.labels.clone().into_iter().collect(),
                    })
                    .collect(),
            })),
        }
    }

    async fn connect_once(self: &Arc<Self>, addr: SocketAddr) -> LoopEnd {
        let id = self.identity();
        let client = match quic_client_config(&self.ca_pem, Some(&id)) {
            Ok(c) => c,
            Err(e) => return LoopEnd::Failed(e),
        };
        let setup = async {
            let conn = self
                .endpoint
                .connect_with(client, addr, &addr.ip().to_string())
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, &self.hello())
                .await
                .map_err(|e| e.to_string())?;
            let first: Option<t::CoordinatorMessage> = match read_frame(&mut recv).await {
                Ok(f) => f,
                Err(e) => {
                    if let Some(reason) = conn.close_reason() {
                        if is_revoked(&reason) {
                            return Ok(Err(reason.to_string()));
                        }
                    }
                    return Err(e.to_string());
                }
            };
            match first.and_then(|m| m.kind) {
                Some(t::coordinator_message::Kind::Welcome(w)) => Ok(Ok((conn, send, recv, w))),
                Some(t::coordinator_message::Kind::Error(e)) => Err(format!("refused: {e}")),
                _ => match conn.close_reason() {
                    Some(r) if is_revoked(&r) => Ok(Err(r.to_string())),
                    Some(r) => Err(r.to_string()),
                    None => Err("no welcome from the coordinator".into()),
                },
            }
        };
        let (conn, mut send, mut recv, welcome) =
            match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
                Ok(Ok(Ok(x))) => x,
                Ok(Ok(Err(revoked))) => return LoopEnd::Revoked(revoked),
                Ok(Err(e)) => return LoopEnd::Failed(e),
                Err(_) => return LoopEnd::Failed("connect timed out".into()),
            };
        tracing::info!(coordinator = %addr, node = welcome.node_id, region = %welcome.node_region, "tunnel up");
        self.learn(&welcome.coordinators);
        self.tunnels_up.fetch_add(1, Ordering::Relaxed);
        let _up = Counted(&self.tunnels_up);

        let sessions = {
            let conn = conn.clone();
            let cfg = self.cfg.clone();
            let active = self.sessions_active.clone();
            tokio::spawn(async move {
                while let Ok((s, r)) = conn.accept_bi().await {
                    let (cfg, active) = (cfg.clone(), active.clone());
                    tokio::spawn(async move {
                        active.fetch_add(1, Ordering::Relaxed);
                        let _served = Counted(&active);
                        handle_session(cfg, s, r).await;
                    });
                }
            })
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            tokio::select! {
                f = read_frame::<t::CoordinatorMessage, _>(&mut recv) => match f {
                    Ok(Some(m)) => match m.kind {
                        Some(t::coordinator_message::Kind::Coordinators(c)) => self.learn(&c.coordinators),
                        Some(t::coordinator_message::Kind::Renewed(c)) => self.renewed(c),
                        Some(t::coordinator_message::Kind::Error(e)) => {
                            tracing::warn!(coordinator = %addr, error = %e, "coordinator reported an error");
                            *self.renewing.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        }
                        _ => {}
                    },
                    Ok(None) => break "control stream closed".to_string(),
                    Err(e) => break format!("control stream: {e}"),
                },
                _ = tick.tick() => {
                    if let Some(req) = self.renewal_request() {
                        if write_frame(&mut send, &req).await.is_err() {
                            *self.renewing.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        }
                    }
                }
                e = conn.closed() => break e.to_string(),
            }
        };
        sessions.abort();
        if let Some(r) = conn.close_reason() {
            if is_revoked(&r) {
                return LoopEnd::Revoked(r.to_string());
            }
        }
        conn.close(0u32.into(), b"reconnecting");
        LoopEnd::Lost(end)
    }

    /// A renewal request when the certificate is due and none is in flight.
    fn renewal_request(&self) -> Option<t::EdgeMessage> {
        let id = self.identity();
        if identity::now_secs() < id.renew_at() {
            return None;
        }
        let mut pending = self.renewing.lock().unwrap_or_else(|e| e.into_inner());
        if pending
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < RENEW_RETRY)
        {
            return None;
        }
        let req = match identity::new_key_request() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot generate a key for renewal");
                return None;
            }
        };
        *pending = Some((req.key_pem, Instant::now()));
        tracing::info!(not_after = id.not_after, "renewing the edge certificate");
        Some(t::EdgeMessage {
            kind: Some(t::edge_message::Kind::Renew(t::RenewRequest {
                csr_pem: req.csr_pem,
            })),
        })
    }

    fn renewed(&self, c: t::EdgeCertificate) {
        let Some((key_pem, _)) = self
            .renewing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let info = self.identity().info;
        let id = match Identity::new(info, c.cert_pem, key_pem) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "renewed certificate is unusable");
                return;
            }
        };
        if let Err(e) = quic_client_config(&self.ca_pem, Some(&id)) {
            tracing::error!(error = %e, "renewed certificate does not match the key");
            return;
        }
        if let Err(e) = self.store.save(&id) {
            tracing::error!(error = %e, "cannot store the renewed certificate");
            return;
        }
        tracing::info!(not_after = id.not_after, "edge certificate renewed");
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = id;
    }
}

/// Takes one off a count when dropped.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one session stream opened by a coordinator.
async fn handle_session(
    cfg: Arc<EdgeConfig>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let first =
        tokio::time::timeout(CONNECT_TIMEOUT, read_frame::<t::SessionFrame, _>(&mut recv)).await;
    let open = match first {
        Ok(Ok(Some(t::SessionFrame {
            kind: Some(t::session_frame::Kind::Open(o)),
        }))) => o,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "malformed session stream");
            let _ = send.reset(3u32.into());
            return;
        }
        _ => {
            tracing::warn!("session stream without an open frame");
            let _ = send.reset(3u32.into());
            return;
        }
    };
    let sh = match cfg.resource(&open.resource).map(|r| &r.connector) {
        Some(Connector::Shell(sh)) => sh,
        Some(Connector::Postgres(pg)) => {
            // Nothing connects until the coordinator has authorized the
            // caller and sends the startup parameters.
            let next =
                tokio::time::timeout(COMMAND_TIMEOUT, read_frame::<t::SessionFrame, _>(&mut recv))
                    .await;
            let Ok(Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::PgStartup(startup)),
            }))) = next
            else {
                tracing::info!(session = %open.session_id, "postgres session abandoned before startup");
                let _ = send.reset(3u32.into());
                return;
            };
            return crate::postgres::run(pg, &open, startup, send, recv).await;
        }
        Some(Connector::Ssh(ssh)) => {
            // Nothing connects until the coordinator has judged the channel
            // and committed its opening (strict mode).
            let next =
                tokio::time::timeout(COMMAND_TIMEOUT, read_frame::<t::SessionFrame, _>(&mut recv))
                    .await;
            let Ok(Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::SshChannel(req)),
            }))) = next
            else {
                tracing::info!(session = %open.session_id, "ssh session abandoned before its channel");
                let _ = send.reset(3u32.into());
                return;
            };
            return crate::ssh::run(ssh, &cfg.data_dir, &open, req, send, recv).await;
        }
        Some(Connector::Kube(kube)) => {
            // The request comes once the coordinator has judged it (and,
            // for a write in strict mode, committed it).
            let next =
                tokio::time::timeout(COMMAND_TIMEOUT, read_frame::<t::SessionFrame, _>(&mut recv))
                    .await;
            let Ok(Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::KubeRequest(req)),
            }))) = next
            else {
                tracing::info!(session = %open.session_id, "kubernetes session abandoned before its request");
                let _ = send.reset(3u32.into());
                return;
            };
            return crate::kube::run(kube, &open, req, send, recv).await;
        }
        None => {
            let msg = format!("resource {:?} is not served by this edge", open.resource);
            let _ = write_frame(&mut send, &error(msg)).await;
            let _ = send.finish();
            return;
        }
    };
    // Nothing runs until the coordinator sends the command: it first commits
    // the command's evidence (strict mode). A stream that ends instead is an
    // abandoned session.
    let next =
        tokio::time::timeout(COMMAND_TIMEOUT, read_frame::<t::SessionFrame, _>(&mut recv)).await;
    let argv = match next {
        Ok(Ok(Some(t::SessionFrame {
            kind: Some(t::session_frame::Kind::Exec(x)),
        }))) => x.argv,
        Ok(Ok(None)) | Ok(Err(_)) => {
            tracing::info!(session = %open.session_id, "session abandoned before its command");
            return;
        }
        Ok(Ok(Some(_))) | Err(_) => {
            tracing::warn!(session = %open.session_id, "no command for the session");
            let _ = send.reset(3u32.into());
            return;
        }
    };
    if argv.is_empty() || argv[0].is_empty() {
        let _ = write_frame(&mut send, &error("empty command".into())).await;
        let _ = send.finish();
        return;
    }
    crate::shell::run(sh, &open, &argv, send, recv).await
}

fn error(msg: String) -> t::SessionFrame {
    t::SessionFrame {
        kind: Some(t::session_frame::Kind::Error(msg)),
    }
}
