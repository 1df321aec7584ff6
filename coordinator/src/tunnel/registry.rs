//! Edges with a live tunnel to this node.

use std::collections::HashMap;
use std::sync::Mutex;

/// QUIC application error codes used when closing edge connections.
pub mod close_code {
    /// Normal shutdown of the node.
    pub const SHUTDOWN: u32 = 0;
    /// The edge was revoked.
    pub const REVOKED: u32 = 1;
    /// The peer is not allowed (unknown or malformed certificate, bad enrollment).
    pub const REFUSED: u32 = 2;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 3;
    /// The edge opened a newer connection to this node.
    pub const REPLACED: u32 = 4;
}

struct LiveConn {
    conn: quinn::Connection,
    name: String,
}

/// The connections of edges to this node, by edge id.
#[derive(Default)]
pub struct EdgeRegistry {
    inner: Mutex<HashMap<u64, Vec<LiveConn>>>,
}

impl EdgeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<LiveConn>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, edge_id: u64, name: &str, conn: quinn::Connection) {
        self.lock().entry(edge_id).or_default().push(LiveConn {
            conn,
            name: name.to_owned(),
        });
    }

    /// Forgets one connection (by its stable id).
    pub fn unregister(&self, edge_id: u64, stable_id: usize) {
        let mut g = self.lock();
        if let Some(v) = g.get_mut(&edge_id) {
            v.retain(|c| c.conn.stable_id() != stable_id);
            if v.is_empty() {
                g.remove(&edge_id);
            }
        }
    }

    /// The newest open connection of an edge.
    pub fn get(&self, edge_id: u64) -> Option<quinn::Connection> {
        self.lock()
            .get(&edge_id)?
            .iter()
            .rev()
            .find(|c| c.conn.close_reason().is_none())
            .map(|c| c.conn.clone())
    }

    /// Ids of every edge with an open connection.
    pub fn live_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .lock()
            .iter()
            .filter(|(_, v)| v.iter().any(|c| c.conn.close_reason().is_none()))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Closes every connection of an edge, ending its sessions. Returns how
    /// many were open.
    pub fn close(&self, edge_id: u64, code: u32, reason: &str) -> usize {
        let conns = self.lock().remove(&edge_id).unwrap_or_default();
        for c in &conns {
            tracing::warn!(edge = edge_id, name = %c.name, reason, "closing edge tunnel");
            c.conn.close(code.into(), reason.as_bytes());
        }
        conns.len()
    }

    pub fn close_all(&self, code: u32, reason: &str) {
        let all: Vec<_> = self.lock().drain().collect();
        for (_, conns) in all {
            for c in conns {
                c.conn.close(code.into(), reason.as_bytes());
            }
        }
    }
}
