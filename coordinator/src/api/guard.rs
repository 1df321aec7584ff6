//! The gRPC side of [`Guard`]: every API call carries `authorization:
//! Bearer <access token>`; a failure is `UNAUTHENTICATED` (and an audit
//! event).

use tonic::{Request, Status};

use crate::auth::Identity;
use crate::consensus::NodeHandle;
use crate::gateway::Guard;
use crate::storage::Engine;

impl Guard {
    /// Verifies the caller's token.
    pub async fn authenticate<E: Engine, T>(
        &self,
        node: &NodeHandle<E>,
        req: &Request<T>,
        method: &str,
    ) -> Result<Identity, Status> {
        self.authenticate_until(node, req, method)
            .await
            .map(|(id, _)| id)
    }

    /// Verifies the caller's token: the identity and when the token
    /// expires (seconds since the epoch).
    pub async fn authenticate_until<E: Engine, T>(
        &self,
        node: &NodeHandle<E>,
        req: &Request<T>,
        method: &str,
    ) -> Result<(Identity, u64), Status> {
        let peer = req.remote_addr();
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        self.verify_token_until(node, token, method, peer)
            .await
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }
}
