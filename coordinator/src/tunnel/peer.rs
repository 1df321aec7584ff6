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
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use custody_proto::cluster::v1 as pb;
use custody_proto::cluster::v1::peer_client::PeerClient;
use custody_proto::cluster::v1::peer_server::Peer;
use custody_proto::tunnel::v1 as t;

use super::registry::EdgeRegistry;
use super::session::{error_frame, open_local, OpenError, SessionChannel, CHANNEL_FRAMES};
use crate::pki::node_dns_name;
use crate::state::Member;
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

/// Serves [`Peer`] on the cluster port.
pub struct PeerService {
    registry: Arc<EdgeRegistry>,
    is_member: crate::consensus::transport::MemberCheck,
}

impl PeerService {
    pub fn new(
        registry: Arc<EdgeRegistry>,
        is_member: crate::consensus::transport::MemberCheck,
    ) -> Self {
        Self {
            registry,
            is_member,
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
impl Peer for PeerService {
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
                };
                if out_tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// Clients for the other nodes' [`Peer`] service.
pub struct PeerClients {
    tls: ClientTlsConfig,
    channels: Mutex<HashMap<u64, (String, Channel)>>,
}

impl PeerClients {
    pub fn new(tls: ClientTlsConfig) -> Self {
        Self {
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, m: &Member) -> Result<Channel, OpenError> {
        let mut g = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((addr, ch)) = g.get(&m.id) {
            if *addr == m.raft_addr {
                return Ok(ch.clone());
            }
        }
        let relay = |detail: String| OpenError::Relay { node: m.id, detail };
        let ch = Endpoint::from_shared(format!("https://{}", m.raft_addr))
            .map_err(|e| relay(e.to_string()))?
            .tls_config(self.tls.clone().domain_name(node_dns_name(m.id)))
            .map_err(|e| relay(e.to_string()))?
            .connect_timeout(PEER_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        g.insert(m.id, (m.raft_addr.clone(), ch.clone()));
        Ok(ch)
    }

    /// Edges live on `m`.
    pub async fn live_edges(&self, m: &Member) -> Result<Vec<u64>, OpenError> {
        let mut c = PeerClient::new(self.channel(m)?);
        let r = tokio::time::timeout(PEER_TIMEOUT, c.live_edges(pb::LiveEdgesRequest {}))
            .await
            .map_err(|_| OpenError::Relay {
                node: m.id,
                detail: "timed out".into(),
            })?
            .map_err(|s| OpenError::Relay {
                node: m.id,
                detail: s.message().to_owned(),
            })?;
        Ok(r.into_inner().edge_ids)
    }

    /// Opens a session on `edge_id` through node `m`.
    pub async fn open_remote(
        &self,
        m: &Member,
        edge_id: u64,
        open: t::SessionOpen,
    ) -> Result<SessionChannel, OpenError> {
        let mut c = PeerClient::new(self.channel(m)?);
        let (to_peer, peer_rx) = mpsc::channel::<pb::RelayFrame>(CHANNEL_FRAMES);
        let first = pb::RelayFrame {
            edge_id,
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
