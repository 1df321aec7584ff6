//! Edge tunnels: the QUIC listener edges dial out to, the registry of live
//! edges on this node, and session routing (locally, or through the node an
//! edge is connected to).

pub mod peer;
pub mod registry;
pub mod server;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

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
    /// What the front doors count (the guard's).
    pub stats: Arc<crate::gateway::stats::GatewayStats>,
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
    pub(crate) fn other_members(&self) -> Vec<Member> {
        crate::state::load_members(self.node.store())
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.id != self.node.id())
            .collect()
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
