//! Authentication and authorization for every front door.
//!
//! A caller presents an access token (a gRPC bearer token, a PostgreSQL
//! password); it is verified (see [`crate::auth::Verifier`]), failures are
//! audit events on the `audit` target. Roles come from the bootstrap admin
//! groups in the node config and from the replicated policy, read after a
//! ReadIndex so a policy change applies on every node at once. The gRPC
//! wrapper (`authenticate`) lives in `api/`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::GatewayError;

use crate::auth::{Identity, Verifier};
use crate::consensus::NodeHandle;
use crate::policy::{Policy, Role};
use crate::state::{self, Command};
use crate::storage::Engine;

/// Identities recorded by this node: (issuer, subject) → groups.
type Seen = HashMap<(String, String), Vec<String>>;

/// Shared by the API services of one node.
pub struct Guard {
    verifier: Verifier,
    admin_groups: Vec<String>,
    policy: Mutex<(u64, Arc<Policy>)>,
    /// Identities this node has recorded in replicated state (issuer, subject) → groups.
    recorded: Arc<Mutex<Seen>>,
    stats: Arc<super::stats::GatewayStats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Admin => "admin",
        Role::Auditor => "auditor",
        Role::Approver => "approver",
    }
}

impl Guard {
    pub fn new(verifier: Verifier, admin_groups: Vec<String>) -> Self {
        Self {
            verifier,
            admin_groups,
            policy: Mutex::new((0, Arc::new(Policy::empty()))),
            recorded: Arc::new(Mutex::new(HashMap::new())),
            stats: Arc::new(super::stats::GatewayStats::default()),
        }
    }

    /// What the front doors count (shared with [`crate::tunnel::Tunnels`]).
    pub fn stats(&self) -> &Arc<super::stats::GatewayStats> {
        &self.stats
    }

    /// Verifies a bearer token presented outside gRPC (the PostgreSQL
    /// gateway's password); failures are audit events.
    pub async fn verify_token<E: Engine>(
        &self,
        node: &NodeHandle<E>,
        token: Option<&str>,
        method: &str,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Identity, crate::auth::AuthError> {
        self.verify_token_until(node, token, method, peer)
            .await
            .map(|(id, _)| id)
    }

    /// [`Self::verify_token`], with when the token expires.
    pub async fn verify_token_until<E: Engine>(
        &self,
        node: &NodeHandle<E>,
        token: Option<&str>,
        method: &str,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(Identity, u64), crate::auth::AuthError> {
        let result = match token {
            None | Some("") => Err(crate::auth::AuthError::Missing),
            Some(t) => self.verifier.verify_until(t).await,
        };
        match result {
            Ok((id, exp)) => {
                self.record(node, &id);
                Ok((id, exp))
            }
            Err(e) => {
                self.stats.auth_failed(e.code());
                tracing::warn!(
                    target: "audit",
                    event = "auth_rejected",
                    reason = e.code(),
                    detail = %e,
                    method,
                    peer = ?peer,
                    "rejected call"
                );
                Err(e)
            }
        }
    }

    /// Records a newly seen identity (or changed groups) in replicated state.
    fn record<E: Engine>(&self, node: &NodeHandle<E>, id: &Identity) {
        let key = (id.issuer.clone(), id.subject.clone());
        {
            let mut seen = lock(&self.recorded);
            if seen.get(&key) == Some(&id.groups) {
                return;
            }
            seen.insert(key.clone(), id.groups.clone());
        }
        tracing::info!(target: "audit", event = "auth_accepted", subject = %id.subject, issuer = %id.issuer, client_kind = id.client_kind.as_str(), "an identity signed in on this node");
        let node = node.clone();
        let recorded = self.recorded.clone();
        let Ok(json) = serde_json::to_vec(id) else {
            return;
        };
        tokio::spawn(async move {
            let cmd = Command::RecordIdentity {
                identity_json: json,
            };
            if node.propose(cmd, None).await.is_err() {
                // Try again on the identity's next call.
                lock(&recorded).remove(&key);
            }
        });
    }

    /// The current policy, after a ReadIndex (fresh on every node).
    pub async fn policy<E: Engine>(
        &self,
        node: &NodeHandle<E>,
    ) -> Result<Arc<Policy>, GatewayError> {
        node.read_index()
            .await
            .map_err(|e| GatewayError::Unavailable(e.to_string()))?;
        self.local_policy(node)
    }

    /// The policy as this node has applied it (no ReadIndex round).
    pub fn local_policy<E: Engine>(
        &self,
        node: &NodeHandle<E>,
    ) -> Result<Arc<Policy>, GatewayError> {
        let version = state::policy_version(node.store())?;
        {
            let cached = lock(&self.policy);
            if cached.0 == version {
                return Ok(cached.1.clone());
            }
        }
        // Decode the document only when the version moved.
        let rec = state::policy_get(node.store())?;
        let version = rec.as_ref().map_or(0, |r| r.version);
        let policy = match rec {
            None => Policy::empty(),
            Some(r) => Policy::compile(r.document).map_err(|e| {
                GatewayError::Storage(crate::storage::StorageError::Corrupt {
                    what: "stored policy",
                    detail: e.to_string(),
                })
            })?,
        };
        let policy = Arc::new(policy);
        *lock(&self.policy) = (version, policy.clone());
        Ok(policy)
    }

    pub fn roles(&self, policy: &Policy, id: &Identity) -> Vec<Role> {
        [Role::Admin, Role::Auditor, Role::Approver]
            .into_iter()
            .filter(|r| {
                policy.has_role(id, *r)
                    || (*r == Role::Admin
                        && id.groups.iter().any(|g| self.admin_groups.contains(g)))
            })
            .collect()
    }

    /// Fails with `PERMISSION_DENIED` (and an audit event) unless `id` holds one of `roles`.
    pub async fn require<E: Engine>(
        &self,
        node: &NodeHandle<E>,
        id: &Identity,
        roles: &[Role],
        action: &str,
    ) -> Result<(), GatewayError> {
        let policy = self.policy(node).await?;
        self.check(&policy, id, roles, action)
    }

    /// As [`Guard::require`], against the locally applied policy.
    pub fn require_local<E: Engine>(
        &self,
        node: &NodeHandle<E>,
        id: &Identity,
        roles: &[Role],
        action: &str,
    ) -> Result<(), GatewayError> {
        let policy = self.local_policy(node)?;
        self.check(&policy, id, roles, action)
    }

    fn check(
        &self,
        policy: &Policy,
        id: &Identity,
        roles: &[Role],
        action: &str,
    ) -> Result<(), GatewayError> {
        let held = self.roles(policy, id);
        if roles.iter().any(|r| held.contains(r)) {
            return Ok(());
        }
        let need: Vec<&str> = roles.iter().map(|r| role_name(*r)).collect();
        tracing::warn!(
            target: "audit",
            event = "authz_denied",
            issuer = %id.issuer,
            subject = %id.subject,
            action,
            "caller lacks the role for this action"
        );
        Err(GatewayError::Denied(format!(
            "{} may not {action}: requires role {}",
            id.label(),
            need.join(" or ")
        )))
    }
}
