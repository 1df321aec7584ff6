//! Routing a session to an edge: through this node's tunnel to it, or
//! through the node holding one (after committing the session's admission,
//! which the relaying node checks). Only the gateway opens edge streams.

use custody_proto::tunnel::v1 as t;

use crate::state::edges::Edge;
use crate::state::Member;
use crate::storage::Engine;
use crate::tunnel::session;
use crate::tunnel::{RouteError, Routed, Tunnels};

/// Opens a session on one of `candidates` (edges serving the resource).
/// Edges connected to this node come first; otherwise the other nodes are
/// asked, nodes in the edge's region first.
pub(super) async fn open_session<E: Engine>(
    tunnels: &Tunnels<E>,
    resource: &str,
    candidates: &[Edge],
    open: t::SessionOpen,
) -> Result<Routed, RouteError> {
    let mut last = String::from("none of them is connected to any coordinator");
    for e in candidates {
        if let Some(conn) = tunnels.registry.get(e.id) {
            match session::open_local(&conn, open.clone()).await {
                Ok(channel) => {
                    return Ok(Routed {
                        channel,
                        edge: e.clone(),
                        via_node: tunnels.node.id(),
                    })
                }
                Err(err) => {
                    tracing::warn!(edge = e.id, error = %err, "local session open failed");
                    last = err.to_string();
                }
            }
        }
    }
    let members = tunnels.other_members();
    // Ask every peer at once which edges it holds.
    let answers = futures::future::join_all(
        members
            .iter()
            .map(|m| async move { (m, tunnels.peers.live_edges(m).await) }),
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
        let admitted = match admit(tunnels, &open, e.id).await {
            Ok(i) => i,
            Err(err) => {
                last = err;
                continue;
            }
        };
        for m in holders {
            match tunnels
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
async fn admit<E: Engine>(
    tunnels: &Tunnels<E>,
    open: &t::SessionOpen,
    edge_id: u64,
) -> Result<u64, String> {
    let store = tunnels.node.store();
    if crate::state::cluster_version(store).map_err(|e| e.to_string())? < 3 {
        return Ok(0);
    }
    let a = custody_proto::cluster::v1::AdmitSession {
        session_id: open.session_id.clone(),
        edge_id,
        resource: open.resource.clone(),
        gateway_node: tunnels.node.id(),
    };
    crate::state::admissions::check(&a)?;
    let out = tunnels
        .node
        .propose_retrying(crate::state::Command::AdmitSession(a), None)
        .await
        .map_err(|e| format!("recording the admission: {e}"))?;
    match out.rejected {
        Some(why) => Err(format!("admission refused: {why}")),
        None => Ok(out.index),
    }
}
