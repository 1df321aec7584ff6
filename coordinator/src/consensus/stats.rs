//! What the Raft driver and this node's proposers count, for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

pub struct NodeStats {
    leader_changes: AtomicU64,
    snapshots_sent: AtomicU64,
    /// Seconds from proposing on this node to the applied outcome.
    pub proposal_seconds: Histogram,
}

impl Default for NodeStats {
    fn default() -> Self {
        NodeStats {
            leader_changes: AtomicU64::new(0),
            snapshots_sent: AtomicU64::new(0),
            // 0.5 ms to about 16 s.
            proposal_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

impl NodeStats {
    /// This node saw a new leader (not: the leader became unknown).
    pub fn leader_changed(&self) {
        self.leader_changes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(Ordering::Relaxed)
    }

    pub fn snapshots_sent(&self, n: u64) {
        self.snapshots_sent.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshots(&self) -> u64 {
        self.snapshots_sent.load(Ordering::Relaxed)
    }
}
