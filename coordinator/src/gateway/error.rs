//! The gateway's one error type. Each front door maps it once: to a gRPC
//! status in `api/`, to a SQLSTATE in `pg/`.

use crate::consensus::NodeError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed or names something impossible.
    #[error("{0}")]
    Invalid(String),
    /// Policy (or a role) refuses it.
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    /// Valid, but not in the current state (an approval that covers
    /// something else, a kind the front door does not serve).
    #[error("{0}")]
    Precondition(String),
    /// No edge serving the resource could take the session.
    #[error("{0}")]
    NoEdge(String),
    /// No quorum, evidence not committed: retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl GatewayError {
    /// The SQLSTATE a PostgreSQL client gets for it.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            GatewayError::Invalid(_) => "22023",
            GatewayError::Denied(_) => "42501",
            GatewayError::NotFound(_) => "3D000",
            GatewayError::Precondition(_) => "55000",
            GatewayError::NoEdge(_) => "08001",
            GatewayError::Unavailable(_) | GatewayError::Node(_) => "57P03",
            GatewayError::Storage(_) => "XX000",
        }
    }
}
