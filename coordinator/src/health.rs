//! Health and metrics on `listen.metrics`: plain HTTP, meant for loopback
//! or a monitoring network (it says nothing secret, but it is not
//! authenticated).
//!
//! - `/healthz`: 200 while the process serves.
//! - `/readyz`: 200 when this node is a member of a cluster that has a
//!   leader and its applied index is within [`READY_LAG`] entries of the
//!   commit index; 503 with the reason otherwise.
//! - `/metrics`: the Prometheus text format (`prometheus-client`), read
//!   from the node at each scrape: Raft term, commit and applied index,
//!   leader, membership, leader changes, snapshots sent, proposal latency;
//!   edges connected to this node; live sessions by front door; sessions
//!   opened by front door and evidence mode; tokens refused by reason.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use custody_proto::metrics::{counter, exposition, gauge, CONTENT_TYPE};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::storage::Engine;
use crate::tunnel::Tunnels;

/// How far applied may trail commit on a ready node.
pub const READY_LAG: u64 = 64;

struct Health<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
}

pub async fn serve<E: Engine>(listener: TcpListener, tunnels: Arc<Tunnels<E>>) {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz::<E>))
        .route("/metrics", axum::routing::get(metrics::<E>))
        .with_state(Arc::new(Health { tunnels }));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics listener stopped");
    }
}

/// Why the node is not ready, if it is not.
fn not_ready(st: &crate::consensus::node::NodeStatus) -> Option<String> {
    if !st.voters.contains(&st.id) && !st.learners.contains(&st.id) {
        return Some(format!("node {} is not a member of the cluster", st.id));
    }
    if st.leader_id == 0 {
        return Some("the cluster has no leader".into());
    }
    let lag = st.commit.saturating_sub(st.applied);
    (lag > READY_LAG).then(|| {
        format!(
            "applied index {} trails the commit index {} by {lag} entries",
            st.applied, st.commit
        )
    })
}

async fn readyz<E: Engine>(State(h): State<Arc<Health<E>>>) -> Response {
    match h.tunnels.node.status().await {
        Ok(st) => match not_ready(&st) {
            None => (StatusCode::OK, "ready\n").into_response(),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
        },
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn metrics<E: Engine>(State(h): State<Arc<Health<E>>>) -> Response {
    let mut reg = Registry::with_prefix("custody");
    if let Ok(st) = h.tunnels.node.status().await {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(&mut reg, "raft_term", "The Raft term", i(st.term));
        gauge(
            &mut reg,
            "raft_commit_index",
            "The highest log index known committed",
            i(st.commit),
        );
        gauge(
            &mut reg,
            "raft_applied_index",
            "The highest log index applied here",
            i(st.applied),
        );
        gauge(
            &mut reg,
            "raft_leader_id",
            "The leader's node id (0: none known)",
            i(st.leader_id),
        );
        gauge(
            &mut reg,
            "raft_is_leader",
            "Whether this node is the leader (1) or not (0)",
            i64::from(st.leader_id == st.id),
        );
        gauge(
            &mut reg,
            "raft_voters",
            "Voting members",
            st.voters.len() as i64,
        );
        gauge(
            &mut reg,
            "ready",
            "Whether /readyz answers 200 (1) or not (0)",
            i64::from(not_ready(&st).is_none()),
        );
    }
    let node = h.tunnels.node.stats();
    counter(
        &mut reg,
        "raft_leader_changes",
        "Times this node saw a new leader",
        node.leader_changes(),
    );
    counter(
        &mut reg,
        "raft_snapshots_sent",
        "Snapshots this node sent to followers",
        node.snapshots(),
    );
    reg.register(
        "raft_proposal_seconds",
        "Seconds from proposing on this node to the applied outcome",
        node.proposal_seconds.clone(),
    );
    let gw = &h.tunnels.stats;
    reg.register(
        "sessions",
        "Sessions opened on this node, by front door and evidence mode",
        gw.sessions.clone(),
    );
    reg.register(
        "auth_failures",
        "Tokens refused on this node, by reason",
        gw.auth_failures.clone(),
    );
    gauge(
        &mut reg,
        "edges_connected",
        "Edges with a tunnel to this node",
        h.tunnels.registry.live_ids().len() as i64,
    );
    let sessions = Family::<Vec<(String, String)>, Gauge>::default();
    for via in ["exec", "postgres", "ssh", "kube", "mcp"] {
        let _ = sessions.get_or_create(&vec![("via".to_string(), via.to_string())]);
    }
    for s in h.tunnels.live.list() {
        sessions
            .get_or_create(&vec![("via".to_string(), s.via.to_string())])
            .inc();
    }
    reg.register(
        "sessions_live",
        "Sessions open on this node, by front door",
        sessions,
    );
    match exposition(&reg) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::node::NodeStatus;

    #[test]
    fn ready_needs_membership_a_leader_and_applied_close_to_commit() {
        let st = |leader, commit, applied, voters: Vec<u64>| NodeStatus {
            id: 1,
            leader_id: leader,
            term: 2,
            commit,
            applied,
            first_index: 1,
            role: raft::StateRole::Follower,
            voters,
            learners: vec![],
            members: vec![],
            progress: vec![],
            state_version: 1,
            cluster_version: 1,
            member_versions: vec![],
        };
        assert_eq!(not_ready(&st(2, 100, 100, vec![1, 2, 3])), None);
        assert_eq!(not_ready(&st(2, 100, 100 - READY_LAG, vec![1, 2, 3])), None);
        assert!(not_ready(&st(0, 100, 100, vec![1, 2, 3]))
            .unwrap()
            .contains("no leader"));
        assert!(not_ready(&st(2, 1000, 10, vec![1, 2, 3]))
            .unwrap()
            .contains("trails"));
        assert!(not_ready(&st(2, 100, 100, vec![2, 3]))
            .unwrap()
            .contains("not a member"));
    }
}
