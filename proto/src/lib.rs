//! Wire types for Custody: the client/admin gRPC API (`custody.v1`) and the
//! cluster-internal surface (`custody.cluster.v1`: Raft transport and the
//! replicated command log).
//!
//! Generated code only. Receivers convert these types into validated domain
//! types; nothing outside the receiving module should depend on them.

#![forbid(unsafe_code)]

/// Client and admin API.
pub mod v1 {
    tonic::include_proto!("custody.v1");
}

/// Cluster-internal surface.
pub mod cluster {
    pub mod v1 {
        tonic::include_proto!("custody.cluster.v1");
    }
}
