//! Edge tunnels: the QUIC listener edges dial out to, the registry of live
//! edges on this node, and session routing (locally, or through the node an
//! edge is connected to).

pub mod peer;
pub mod registry;
pub mod server;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use custody_proto::tunnel::v1 as t;

use crate::consensus::NodeHandle;
use crate::pki::ClusterCa;
use crate::state::edges::Edge;
use crate::state::Member;
use crate::storage::Engine;

pub use peer::{PeerClients, PeerService};
pub use registry::EdgeRegistry;
pub use session::{OpenError, SessionChannel};

/// Tunnel state shared by the listener, the API and the peer service.
pub struct Tunnels<E: Engine> {
    pub node: NodeHandle<E>,
    pub registry: Arc<EdgeRegistry>,
    pub peers: PeerClients,
    /// Signs edge certificates; `None` on nodes without the CA key.
    pub ca: Option<Arc<ClusterCa>>,
    pub cert_ttl: Duration,
    pub region: String,
    /// Refused enrollment attempts per source address.
    pub enroll_limiter: server::EnrollLimiter,
    /// The sessions open on this node.
    pub live: Arc<crate::gateway::live::LiveSessions>,
}

/// Where a session was opened.
pub struct Routed {
    pub channel: SessionChannel,
    pub edge: Edge,
    /// The node holding the edge's tunnel.
    pub via_node: u64,
}

/// Why no edge could take a session.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no live edge serves {resource} (edges: {edges}); last error: {last}")]
    NoLiveEdge {
        resource: String,
        edges: String,
        last: String,
    },
}

impl<E: Engine> Tunnels<E> {
    /// The cluster members other than this node.
    fn other_members(&self) -> Vec<Member> {
        crate::state::load_members(self.node.store())
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.id != self.node.id())
            .collect()
    }

    /// Opens a session on one of `candidates` (edges serving the resource).
    /// Edges connected to this node come first; otherwise the other nodes are
    /// asked, nodes in the edge's region first.
    pub async fn open_session(
        &self,
        resource: &str,
        candidates: &[Edge],
        open: t::SessionOpen,
    ) -> Result<Routed, RouteError> {
        let mut last = String::from("none of them is connected to any coordinator");
        for e in candidates {
            if let Some(conn) = self.registry.get(e.id) {
                match session::open_local(&conn, open.clone()).await {
                    Ok(channel) => {
                        return Ok(Routed {
                            channel,
                            edge: e.clone(),
                            via_node: self.node.id(),
                        })
                    }
                    Err(err) => {
                        tracing::warn!(edge = e.id, error = %err, "local session open failed");
                        last = err.to_string();
                    }
                }
            }
        }
        let members = self.other_members();
        // Ask every peer at once which edges it holds.
        let answers = futures::future::join_all(
            members
                .iter()
                .map(|m| async move { (m, self.peers.live_edges(m).await) }),
        )
        .await;
        for e in candidates {
            let mut holders: Vec<&Member> = answers
                .iter()
                .filter_map(|(m, r)| match r {
                    Ok(ids) if ids.contains(&e.id) => Some(*m),
                    _ => None,
                })
                .collect();
            holders.sort_by_key(|m| (m.region != e.region, m.id));
            if holders.is_empty() {
                continue;
            }
            let admitted = match self.admit(&open, e.id).await {
                Ok(i) => i,
                Err(err) => {
                    last = err;
                    continue;
                }
            };
            for m in holders {
                match self
                    .peers
                    .open_remote(m, e.id, open.clone(), admitted)
                    .await
                {
                    Ok(channel) => {
                        return Ok(Routed {
                            channel,
                            edge: e.clone(),
                            via_node: m.id,
                        })
                    }
                    Err(err) => {
                        tracing::warn!(edge = e.id, node = m.id, error = %err, "relayed session open failed");
                        last = err.to_string();
                    }
                }
            }
        }
        Err(RouteError::NoLiveEdge {
            resource: resource.to_owned(),
            edges: candidates
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            last,
        })
    }

    /// Records that this node admitted `open` for `edge_id`, before another
    /// node relays it: the log index of the admission (0 while some voter
    /// cannot apply admissions yet).
    async fn admit(&self, open: &t::SessionOpen, edge_id: u64) -> Result<u64, String> {
        let store = self.node.store();
        if crate::state::cluster_version(store).map_err(|e| e.to_string())? < 3 {
            return Ok(0);
        }
        let a = custody_proto::cluster::v1::AdmitSession {
            session_id: open.session_id.clone(),
            edge_id,
            resource: open.resource.clone(),
            gateway_node: self.node.id(),
        };
        crate::state::admissions::check(&a)?;
        let out = self
            .node
            .propose_retrying(crate::state::Command::AdmitSession(a), None)
            .await
            .map_err(|e| format!("recording the admission: {e}"))?;
        match out.rejected {
            Some(why) => Err(format!("admission refused: {why}")),
            None => Ok(out.index),
        }
    }

    /// Nodes holding a live tunnel to each edge, this one included. Peers that
    /// do not answer are left out.
    pub async fn connected_nodes(&self) -> std::collections::HashMap<u64, Vec<u64>> {
        let mut out: std::collections::HashMap<u64, Vec<u64>> = Default::default();
        for id in self.registry.live_ids() {
            out.entry(id).or_default().push(self.node.id());
        }
        let members = self.other_members();
        let answers = futures::future::join_all(
            members
                .iter()
                .map(|m| async move { (m.id, self.peers.live_edges(m).await) }),
        )
        .await;
        for (node, r) in answers {
            if let Ok(ids) = r {
                for id in ids {
                    out.entry(id).or_default().push(node);
                }
            }
        }
        for v in out.values_mut() {
            v.sort_unstable();
        }
        out
    }
}
