//! Wire types for Custody: the client/admin gRPC API (`custody.v1`), the
//! cluster-internal surface (`custody.cluster.v1`: Raft transport, node-to-node
//! session relay and the replicated command log) and the edge tunnel protocol
//! (`custody.tunnel.v1`) with its framing.
//!
//! Generated code and the frame codec only. Receivers convert these types into
//! validated domain types; nothing outside the receiving module should depend
//! on them.

#![forbid(unsafe_code)]

pub mod chain;
pub mod export;
pub mod flow;
pub mod frame;
pub mod kube;
pub mod kube_pb;
pub mod ledger;
pub mod metrics;
pub mod ocsf;
pub mod pg;
pub mod pg_client;
pub mod scp;
pub mod sftp;
pub mod ssh;

/// Client and admin API.
pub mod v1 {
    tonic::include_proto!("custody.v1");
}

/// Cluster-internal surface.
pub mod cluster {
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("custody.cluster.v1");
    }
}

/// Session evidence: events and chained chunks.
pub mod evidence {
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("custody.evidence.v1");
    }
}

/// Edge ↔ coordinator tunnel protocol.
pub mod tunnel {
    pub mod v1 {
        tonic::include_proto!("custody.tunnel.v1");
    }
}
