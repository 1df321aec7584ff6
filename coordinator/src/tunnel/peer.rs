//! Node-to-node session routing over the cluster port: a node without a tunnel
//! to an edge relays the session through a node that has one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use custody_proto::cluster::v1 as pb;
use custody_proto::cluster::v1::peer_client::PeerClient;
use custody_proto::cluster::v1::peer_server::Peer;
use custody_proto::tunnel::v1 as t;

use super::registry::EdgeRegistry;
use super::session::{error_frame, open_local, OpenError, SessionChannel, CHANNEL_FRAMES};
use crate::consensus::NodeHandle;
use crate::gateway::live::{EndReason, LiveInfo, LiveSessions};
use crate::pki::{node_dns_name, ClusterCa};
use crate::state::{self, admissions, Member};
use crate::storage::Engine;
use crate::tls::node_id_from_cert;

/// How long to wait for a peer's answer about its live edges.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

fn require_node<T>(req: &Request<T>) -> Result<u64, Status> {
    let leaf = req
        .peer_certs()
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    node_id_from_cert(leaf.as_ref())
        .ok_or_else(|| Status::permission_denied("only cluster nodes may relay sessions"))
}

/// How long a relaying node waits to apply the entry that admitted a session.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(3);

/// Serves [`Peer`] on the cluster port.
pub struct PeerService<E: Engine> {
    node: NodeHandle<E>,
    registry: Arc<EdgeRegistry>,
    live: Arc<LiveSessions>,
    is_member: crate::consensus::transport::MemberCheck,
    /// Signs other nodes' renewed certificates (nodes with the CA key), and
    /// the lifetime of those certificates.
    signer: Option<(Arc<ClusterCa>, Duration)>,
}

impl<E: Engine> PeerService<E> {
    /// `node_cert_ttl`: the lifetime of node certificates this node signs
    /// (when it holds the CA key).
    pub fn new(
        tunnels: &super::Tunnels<E>,
        is_member: crate::consensus::transport::MemberCheck,
        node_cert_ttl: Duration,
    ) -> Self {
        Self {
            node: tunnels.node.clone(),
            registry: tunnels.registry.clone(),
            live: tunnels.live.clone(),
            is_member,
            signer: tunnels.ca.clone().map(|ca| (ca, node_cert_ttl)),
        }
    }

    /// Runs only sessions the cluster admitted: `from` recorded, at
    /// `index`, that it admitted this session for this edge. (While some
    /// voter still runs a binary without admissions, none are recorded and
    /// relays go on as before.)
    async fn check_admitted(
        &self,
        from: u64,
        edge_id: u64,
        session_id: &str,
        index: u64,
    ) -> Result<(), Status> {
        let store = self.node.store();
        if state::cluster_version(store).map_err(|e| Status::internal(e.to_string()))? < 3 {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + ADMISSION_WAIT;
        while store.applied_index() < index && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let found = admissions::admission(store, session_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .and_then(|a| a.admit);
        match found {
            Some(a) if a.edge_id == edge_id && a.gateway_node == from => Ok(()),
            _ => {
                tracing::warn!(target: "audit", event = "relay_refused", from, edge = edge_id, session = %session_id, "a relay for a session the cluster did not admit was refused");
                Err(Status::permission_denied(format!(
                    "session {session_id} was not admitted by the cluster for edge {edge_id} through node {from}"
                )))
            }
        }
    }

    /// The calling node, if it is a current member.
    fn member<T>(&self, req: &Request<T>) -> Result<u64, Status> {
        let id = require_node(req)?;
        crate::consensus::transport::require_member(&self.is_member, id)?;
        Ok(id)
    }
}

type RelayStream = Pin<Box<dyn Stream<Item = Result<pb::RelayFrame, Status>> + Send>>;

#[tonic::async_trait]
impl<E: Engine> Peer for PeerService<E> {
    async fn live_edges(
        &self,
        req: Request<pb::LiveEdgesRequest>,
    ) -> Result<Response<pb::LiveEdgesResponse>, Status> {
        self.member(&req)?;
        Ok(Response::new(pb::LiveEdgesResponse {
            edge_ids: self.registry.live_ids(),
        }))
    }

    type RelayStream = RelayStream;

    async fn live_sessions(
        &self,
        req: Request<pb::LiveSessionsRequest>,
    ) -> Result<Response<pb::LiveSessionsResponse>, Status> {
        self.member(&req)?;
        Ok(Response::new(pb::LiveSessionsResponse {
            sessions: self.live.list().iter().map(peer_live).collect(),
        }))
    }

    async fn end_session(
        &self,
        req: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let from = self.member(&req)?;
        let r = req.into_inner();
        let found = self.live.end(
            &r.session_id,
            EndReason {
                by: r.by.clone(),
                reason: r.reason,
            },
        );
        if found {
            tracing::warn!(target: "audit", event = "session_killed", session = %r.session_id, by = %r.by, via_node = from, "a session was ended on a peer's request");
        }
        Ok(Response::new(pb::EndSessionResponse { found }))
    }

    async fn renew_node_certificate(
        &self,
        req: Request<pb::RenewNodeCertificateRequest>,
    ) -> Result<Response<pb::RenewNodeCertificateResponse>, Status> {
        let from = self.member(&req)?;
        let Some((ca, ttl)) = &self.signer else {
            return Err(Status::failed_precondition(
                "this node does not hold the CA key",
            ));
        };
        let leaf = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
        let hosts = crate::tls::cert_hosts(leaf.as_ref());
        let cert_pem = ca
            .renew_node(&req.into_inner().csr_pem, from, &hosts, *ttl)
            .map_err(|e| Status::invalid_argument(format!("bad certificate request: {e}")))?;
        tracing::info!(target: "audit", event = "node_certificate_signed", node = from, "signed a renewed node certificate");
        Ok(Response::new(pb::RenewNodeCertificateResponse { cert_pem }))
    }

    async fn relay(
        &self,
        req: Request<Streaming<pb::RelayFrame>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let from = self.member(&req)?;
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("relay closed before its first frame"))?;
        let open = match t::SessionFrame::decode(first.frame) {
            Ok(t::SessionFrame {
                kind: Some(t::session_frame::Kind::Open(o)),
            }) => o,
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first relay frame must open a session",
                ))
            }
            Err(e) => return Err(Status::invalid_argument(format!("malformed frame: {e}"))),
        };
        self.check_admitted(from, first.edge_id, &open.session_id, first.admitted_index)
            .await?;
        let conn = self.registry.get(first.edge_id).ok_or_else(|| {
            Status::unavailable(format!("edge {} is not connected here", first.edge_id))
        })?;
        tracing::info!(from, edge = first.edge_id, session = %open.session_id, "relaying session for a peer");
        let ch = open_local(&conn, open)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let SessionChannel { tx, mut rx } = ch;
        tokio::spawn(async move {
            while let Some(f) = input.next().await {
                let f = match f {
                    Ok(f) => f,
                    Err(_) => return, // peer gone: dropping tx ends the input
                };
                match t::SessionFrame::decode(f.frame) {
                    Ok(frame) => {
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(from, error = %e, "malformed relay frame");
                        return;
                    }
                }
            }
        });
        let (out_tx, out_rx) = mpsc::channel(CHANNEL_FRAMES);
        tokio::spawn(async move {
            // Returning drops rx, which aborts the session at the edge.
            loop {
                let f = tokio::select! {
                    f = rx.recv() => match f {
                        Some(f) => f,
                        None => return,
                    },
                    // The calling node went away (even while the command is silent).
                    _ = out_tx.closed() => return,
                };
                let r = pb::RelayFrame {
                    edge_id: 0,
                    frame: f.encode_to_vec().into(),
                    admitted_index: 0,
                };
                if out_tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// A live session as peers report it.
pub fn peer_live(s: &LiveInfo) -> pb::PeerLiveSession {
    pb::PeerLiveSession {
        session_id: s.session_id.clone(),
        principal: s.identity.principal(),
        identity: s.identity.label().to_owned(),
        resource: s.resource.name.clone(),
        via: s.via.to_owned(),
        opened_at_ms: s.opened_at_ms,
        command: s.command.clone().unwrap_or_default(),
    }
}

/// A peer's answer to a unary call, within [`PEER_TIMEOUT`].
async fn answer<T>(
    node: u64,
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<T, OpenError> {
    match tokio::time::timeout(PEER_TIMEOUT, call).await {
        Err(_) => Err(OpenError::Relay {
            node,
            detail: "timed out".into(),
        }),
        Ok(Err(s)) => Err(OpenError::Relay {
            node,
            detail: s.message().to_owned(),
        }),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// Clients for the other nodes' [`Peer`] service.
pub struct PeerClients {
    tls: crate::tls::TlsMaterial,
    /// Per node: its address, the certificate generation used, the channel.
    channels: Mutex<HashMap<u64, (String, u64, Channel)>>,
}

impl PeerClients {
    pub fn new(tls: crate::tls::TlsMaterial) -> Self {
        Self {
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, m: &Member) -> Result<Channel, OpenError> {
        let mut g = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.tls.node.generation();
        if let Some((addr, gen, ch)) = g.get(&m.id) {
            if *addr == m.raft_addr && *gen == generation {
                return Ok(ch.clone());
            }
        }
        let relay = |detail: String| OpenError::Relay { node: m.id, detail };
        let ch = Endpoint::from_shared(format!("https://{}", m.raft_addr))
            .map_err(|e| relay(e.to_string()))?
            .tls_config(self.tls.client_config().domain_name(node_dns_name(m.id)))
            .map_err(|e| relay(e.to_string()))?
            .connect_timeout(PEER_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        g.insert(m.id, (m.raft_addr.clone(), generation, ch.clone()));
        Ok(ch)
    }

    /// Asks `m` to sign this node's renewed certificate.
    pub async fn renew_node_certificate(
        &self,
        m: &Member,
        csr_pem: String,
    ) -> Result<String, OpenError> {
        let mut c = PeerClient::new(self.channel(m)?);
        let r = answer(
            m.id,
            c.renew_node_certificate(pb::RenewNodeCertificateRequest { csr_pem }),
        )
        .await?;
        Ok(r.cert_pem)
    }

    /// Sessions live on `m`.
    pub async fn live_sessions(&self, m: &Member) -> Result<Vec<pb::PeerLiveSession>, OpenError> {
        let mut c = PeerClient::new(self.channel(m)?);
        Ok(answer(m.id, c.live_sessions(pb::LiveSessionsRequest {}))
            .await?
            .sessions)
    }

    /// Asks `m` to end a session; whether it hosted it.
    pub async fn end_session(
        &self,
        m: &Member,
        req: pb::EndSessionRequest,
    ) -> Result<bool, OpenError> {
        let mut c = PeerClient::new(self.channel(m)?);
        Ok(answer(m.id, c.end_session(req)).await?.found)
    }

    /// Edges live on `m`.
    pub async fn live_edges(&self, m: &Member) -> Result<Vec<u64>, OpenError> {
        let mut c = PeerClient::new(self.channel(m)?);
        let r = answer(m.id, c.live_edges(pb::LiveEdgesRequest {})).await?;
        Ok(r.edge_ids)
    }

    /// Opens a session on `edge_id` through node `m`; `admitted_index` is
    /// where this node recorded the session's admission (0: none).
    pub async fn open_remote(
        &self,
        m: &Member,
        edge_id: u64,
        open: t::SessionOpen,
        admitted_index: u64,
    ) -> Result<SessionChannel, OpenError> {
        let mut c = PeerClient::new(self.channel(m)?);
        let (to_peer, peer_rx) = mpsc::channel::<pb::RelayFrame>(CHANNEL_FRAMES);
        let first = pb::RelayFrame {
            edge_id,
            admitted_index,
            frame: super::session::frame(t::session_frame::Kind::Open(open))
                .encode_to_vec()
                .into(),
        };
        to_peer
            .send(first)
            .await
            .map_err(|_| OpenError::Connection("relay closed".into()))?;
        let resp = tokio::time::timeout(
            super::session::OPEN_TIMEOUT,
            c.relay(ReceiverStream::new(peer_rx)),
        )
        .await
        .map_err(|_| OpenError::Timeout(super::session::OPEN_TIMEOUT))?
        .map_err(|s| OpenError::Relay {
            node: m.id,
            detail: s.message().to_owned(),
        })?;
        let mut from_peer = resp.into_inner();
        let (to_edge, mut from_caller) = mpsc::channel::<t::SessionFrame>(CHANNEL_FRAMES);
        let (to_caller, from_edge) = mpsc::channel::<t::SessionFrame>(CHANNEL_FRAMES);
        tokio::spawn(async move {
            while let Some(f) = from_caller.recv().await {
                let r = pb::RelayFrame {
                    edge_id: 0,
                    frame: f.encode_to_vec().into(),
                    admitted_index: 0,
                };
                if to_peer.send(r).await.is_err() {
                    return;
                }
            }
        });
        let node = m.id;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    f = from_peer.next() => match f {
                        Some(Ok(f)) => match t::SessionFrame::decode(f.frame) {
                            Ok(frame) => {
                                if to_caller.send(frame).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = to_caller.send(error_frame(format!("malformed frame from node {node}: {e}"))).await;
                                return;
                            }
                        },
                        Some(Err(s)) => {
                            let _ = to_caller.send(error_frame(format!("relay through node {node} failed: {}", s.message()))).await;
                            return;
                        }
                        None => return,
                    },
                    // Caller gone: dropping the response stream cancels the relay.
                    _ = to_caller.closed() => return,
                }
            }
        });
        Ok(SessionChannel {
            tx: to_edge,
            rx: from_edge,
        })
    }
}
