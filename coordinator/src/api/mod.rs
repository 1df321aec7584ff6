//! The client/admin gRPC API served on each node's API port.
//!
//! Writes may go to any node: followers forward proposals to the leader through
//! Raft. Reads are linearizable (ReadIndex) unless the caller asks for stale
//! reads. Membership changes must reach the leader; other nodes answer
//! `FAILED_PRECONDITION` with the leader's API address in the
//! `x-custody-leader-api` metadata, which clients follow.

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use raft::StateRole;
use tonic::{Request, Response, Status};

use custody_proto::v1 as api;
use custody_proto::v1::cluster_server::Cluster;
use custody_proto::v1::kv_server::Kv;

mod approvals;
mod edges;
mod export;
mod guard;
mod policy;
pub mod sessions;
pub mod tools;

pub use crate::gateway::Guard;
pub use approvals::ApprovalsService;
pub use edges::{EdgesService, ResourcesService};
pub use export::{purge_expired, EvidenceService};
pub use policy::PolicyService;
pub use sessions::SessionsService;

use std::sync::Arc;

use crate::consensus::{NodeError, NodeHandle, NodeStatus};
use crate::policy::Role;
use crate::state::{self, Command, CommandError, Member};
use crate::storage::{Engine, StorageError};

/// Metadata key carrying the leader's API address on redirects.
pub const LEADER_API_METADATA: &str = "x-custody-leader-api";

const DEFAULT_LIST_LIMIT: u32 = 1000;
const MAX_LIST_LIMIT: u32 = 10_000;

/// Maps internal errors to gRPC statuses, in one place.
pub(crate) fn status_from(e: NodeError) -> Status {
    match e {
        NodeError::NoLeader
        | NodeError::LeaderChanged
        | NodeError::Timeout
        | NodeError::Stopped => Status::unavailable(e.to_string()),
        NodeError::Invalid(_) => Status::invalid_argument(e.to_string()),
        NodeError::Membership(_) | NodeError::NotUpgraded { .. } => {
            Status::failed_precondition(e.to_string())
        }
        NodeError::Storage(_) | NodeError::Apply { .. } => Status::internal(e.to_string()),
    }
}

/// The one mapping of gateway errors to gRPC statuses.
impl From<crate::gateway::GatewayError> for Status {
    fn from(e: crate::gateway::GatewayError) -> Self {
        use crate::gateway::GatewayError as G;
        match e {
            G::Invalid(m) => Status::invalid_argument(m),
            G::Denied(m) => Status::permission_denied(m),
            G::NotFound(m) => Status::not_found(m),
            G::Precondition(m) => Status::failed_precondition(m),
            G::NoEdge(m) | G::Unavailable(m) => Status::unavailable(m),
            G::Node(e) => status_from(e),
            G::Storage(e) => storage_status(e),
        }
    }
}

pub(crate) fn storage_status(e: StorageError) -> Status {
    Status::internal(e.to_string())
}

fn invalid(e: CommandError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A client's idempotency key, scoped to the caller: one identity's key
/// can never answer for another's request (the state machine scopes it to
/// the command's kind as well).
fn idem(caller: &crate::auth::Identity, key: String) -> Result<Option<String>, Status> {
    if key.len() > state::MAX_IDEMPOTENCY_KEY_LEN {
        return Err(invalid(CommandError::IdempotencyKeyTooLong(key.len())));
    }
    Ok((!key.is_empty()).then(|| scoped_key(caller, &key)))
}

/// `<16 hex digits of SHA-256 of the caller's principal>/<key>`.
pub(crate) fn scoped_key(caller: &crate::auth::Identity, key: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(caller.principal().as_bytes());
    format!("{}/{key}", custody_proto::export::hex(&d[..8]))
}

/// The API service for one node.
pub struct ApiService<E: Engine> {
    node: NodeHandle<E>,
    guard: Arc<Guard>,
    /// (cluster id, base64 evidence public key) for status answers.
    info: (String, String),
    postgres_addr: String,
    /// The SSH gateway address and the cluster's host key line.
    ssh: (String, String),
    kube_addr: String,
    mcp_addr: String,
}

impl<E: Engine> ApiService<E> {
    pub fn new(node: NodeHandle<E>, guard: Arc<Guard>) -> Self {
        Self {
            node,
            guard,
            info: Default::default(),
            postgres_addr: String::new(),
            ssh: Default::default(),
            kube_addr: String::new(),
            mcp_addr: String::new(),
        }
    }

    /// The node's Kubernetes gateway address, reported in `Cluster.Status`.
    pub fn with_kube(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.kube_addr = addr.map(|a| a.to_string()).unwrap_or_default();
        self
    }

    /// The node's MCP endpoint address, reported in `Cluster.Status`.
    pub fn with_mcp(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.mcp_addr = addr.map(|a| a.to_string()).unwrap_or_default();
        self
    }

    /// The node's SSH gateway address and the cluster's host key line,
    /// reported in `Cluster.Status`.
    pub fn with_ssh(mut self, addr: Option<std::net::SocketAddr>, host_key: String) -> Self {
        if let Some(a) = addr {
            self.ssh = (a.to_string(), host_key);
        }
        self
    }

    /// The node's PostgreSQL gateway address, reported in `Cluster.Status`.
    pub fn with_postgres_addr(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.postgres_addr = addr.map(|a| a.to_string()).unwrap_or_default();
        self
    }

    /// Adds the cluster id and evidence public key to status answers.
    pub fn with_cluster_info(mut self, cluster_id: String, evidence_public_key: String) -> Self {
        self.info = (cluster_id, evidence_public_key);
        self
    }

    /// Authenticates the caller and requires the admin role (fresh policy).
    async fn admin<T>(
        &self,
        req: &Request<T>,
        method: &str,
        action: &str,
    ) -> Result<crate::auth::Identity, Status> {
        let id = self.guard.authenticate(&self.node, req, method).await?;
        self.guard
            .require(&self.node, &id, &[Role::Admin], action)
            .await?;
        Ok(id)
    }

    /// As `admin`, against the locally applied policy: for the KV namespace,
    /// an operator tool on the hot path of benchmarks.
    async fn kv_admin<T>(
        &self,
        req: &Request<T>,
        method: &str,
    ) -> Result<crate::auth::Identity, Status> {
        let id = self.guard.authenticate(&self.node, req, method).await?;
        self.guard
            .require_local(&self.node, &id, &[Role::Admin], "use the KV namespace")?;
        Ok(id)
    }

    /// Fails with a redirect unless this node leads.
    async fn require_leader(&self) -> Result<NodeStatus, Status> {
        let st = self.node.status().await.map_err(status_from)?;
        if st.role == StateRole::Leader {
            return Ok(st);
        }
        let leader = st.members.iter().find(|m| m.id == st.leader_id);
        let mut status = Status::failed_precondition(match leader {
            Some(l) => format!(
                "node {} is not the leader; node {} at {} is",
                st.id, l.id, l.api_addr
            ),
            None => format!("node {} is not the leader and no leader is known", st.id),
        });
        if let Some(l) = leader {
            if let Ok(v) = l.api_addr.parse() {
                status.metadata_mut().insert(LEADER_API_METADATA, v);
            }
        }
        Err(status)
    }

    async fn write(
        &self,
        caller: &crate::auth::Identity,
        cmd: Command,
        idempotency_key: String,
    ) -> Result<Response<api::PutResponse>, Status> {
        let o = self
            .node
            .propose_retrying(cmd, idem(caller, idempotency_key)?)
            .await
            .map_err(status_from)?;
        Ok(Response::new(api::PutResponse {
            index: o.index,
            existed: o.existed,
        }))
    }

    async fn step_down(&self, st: &NodeStatus) -> Result<(), Status> {
        let target = st
            .progress
            .iter()
            .filter(|p| p.id != st.id && st.voters.contains(&p.id) && p.recent_active)
            .max_by_key(|p| p.match_index)
            .map(|p| p.id)
            .ok_or_else(|| {
                Status::failed_precondition("no other active voter to take over leadership")
            })?;
        self.node
            .transfer_leader(target)
            .await
            .map_err(status_from)?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            let now = self.node.status().await.map_err(status_from)?;
            if now.role != StateRole::Leader && now.leader_id != 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(Status::unavailable("leadership transfer timed out; retry"))
    }

    async fn membership(
        &self,
        changes: Vec<(ConfChangeType, u64)>,
        members: Vec<Member>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        let st = self.require_leader().await?;
        let removes_self = changes
            .iter()
            .any(|(ty, id)| *ty == ConfChangeType::RemoveNode && *id == st.id);
        if removes_self {
            // Hand leadership to the most up-to-date other voter first; the
            // client then retries on the new leader, which removes this node.
            self.step_down(&st).await?;
            return Err(self.require_leader().await.err().unwrap_or_else(|| {
                Status::unavailable("leadership transfer did not complete; retry")
            }));
        }
        for (ty, id) in &changes {
            let known = st.voters.contains(id) || st.learners.contains(id);
            match ty {
                ConfChangeType::RemoveNode if !known => {
                    return Err(Status::not_found(format!("node {id} is not a member")));
                }
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode
                    if st.voters.contains(id) =>
                {
                    return Err(Status::already_exists(format!(
                        "node {id} is already a voter"
                    )));
                }
                _ => {}
            }
        }
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.set_changes(
            changes
                .into_iter()
                .map(|(ty, id)| {
                    let mut s = ConfChangeSingle::default();
                    s.set_change_type(ty);
                    s.node_id = id;
                    s
                })
                .collect::<Vec<_>>()
                .into(),
        );
        let cs = self
            .node
            .change_membership(cc, members)
            .await
            .map_err(status_from)?;
        Ok(Response::new(api::MembershipResponse {
            voters: cs.voters,
            learners: cs.learners,
            index: self.node.store().applied_index(),
        }))
    }
}

fn new_member(m: Option<api::NewMember>) -> Result<Member, Status> {
    let m = m.ok_or_else(|| Status::invalid_argument("member is required"))?;
    if m.id == 0 {
        return Err(Status::invalid_argument("member id must be positive"));
    }
    if m.region.trim().is_empty() {
        return Err(Status::invalid_argument("member region must not be empty"));
    }
    for (what, a) in [
        ("raft", &m.raft_addr),
        ("api", &m.api_addr),
        ("tunnel", &m.tunnel_addr),
    ] {
        if what == "tunnel" && a.is_empty() {
            continue;
        }
        a.parse::<std::net::SocketAddr>().map_err(|e| {
            Status::invalid_argument(format!("member {what} address {a:?} is not HOST:PORT: {e}"))
        })?;
    }
    Ok(Member {
        id: m.id,
        region: m.region,
        raft_addr: m.raft_addr,
        api_addr: m.api_addr,
        tunnel_addr: m.tunnel_addr,
    })
}

fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre_candidate",
    }
}

/// Builds the API view of a node's status.
pub fn cluster_status(st: &NodeStatus) -> api::ClusterStatus {
    let region = st
        .members
        .iter()
        .find(|m| m.id == st.id)
        .map(|m| m.region.clone())
        .unwrap_or_default();
    let members = st
        .members
        .iter()
        .map(|m| {
            let prog = st.progress.iter().find(|p| p.id == m.id);
            let state = if st.learners.contains(&m.id) {
                "learner"
            } else if m.id == st.leader_id && st.leader_id != 0 {
                "leader"
            } else if st.role != StateRole::Leader {
                "unknown"
            } else if prog.is_some_and(|p| p.recent_active) {
                "follower"
            } else {
                "unreachable"
            };
            api::MemberStatus {
                id: m.id,
                region: m.region.clone(),
                api_addr: m.api_addr.clone(),
                raft_addr: m.raft_addr.clone(),
                tunnel_addr: m.tunnel_addr.clone(),
                state: state.into(),
                match_index: prog.map_or(0, |p| p.match_index),
                version: st
                    .member_versions
                    .iter()
                    .find(|(id, _)| *id == m.id)
                    .map_or(0, |(_, v)| *v),
            }
        })
        .collect();
    api::ClusterStatus {
        node_id: st.id,
        node_region: region,
        leader_id: st.leader_id,
        term: st.term,
        commit_index: st.commit,
        applied_index: st.applied,
        role: role_name(st.role).into(),
        members,
        first_index: st.first_index,
        cluster_version: st.cluster_version,
        node_version: st.state_version,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl<E: Engine> Cluster for ApiService<E> {
    async fn status(
        &self,
        req: Request<api::StatusRequest>,
    ) -> Result<Response<api::ClusterStatus>, Status> {
        self.guard
            .authenticate(&self.node, &req, "cluster.status")
            .await?;
        let st = self.node.status().await.map_err(status_from)?;
        let mut out = cluster_status(&st);
        out.cluster_id = self.info.0.clone();
        out.evidence_public_key = self.info.1.clone();
        out.postgres_addr = self.postgres_addr.clone();
        out.ssh_addr = self.ssh.0.clone();
        out.ssh_host_key = self.ssh.1.clone();
        out.kube_addr = self.kube_addr.clone();
        out.mcp_addr = self.mcp_addr.clone();
        Ok(Response::new(out))
    }

    async fn add_member(
        &self,
        req: Request<api::AddMemberRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        self.admin(&req, "cluster.add_member", "change membership")
            .await?;
        let req = req.into_inner();
        let m = new_member(req.member)?;
        let ty = if req.as_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        self.membership(vec![(ty, m.id)], vec![m]).await
    }

    async fn step_down(
        &self,
        req: Request<api::StepDownRequest>,
    ) -> Result<Response<api::StepDownResponse>, Status> {
        let id = self
            .admin(&req, "cluster.step_down", "move leadership")
            .await?;
        let st = self.require_leader().await?;
        ApiService::step_down(self, &st).await?;
        let now = self.node.status().await.map_err(status_from)?;
        tracing::info!(target: "audit", event = "leader_stepped_down", by = %id.label(), node = st.id, leader = now.leader_id);
        Ok(Response::new(api::StepDownResponse {
            leader_id: now.leader_id,
        }))
    }

    async fn remove_member(
        &self,
        req: Request<api::RemoveMemberRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        self.admin(&req, "cluster.remove_member", "change membership")
            .await?;
        let id = req.into_inner().id;
        self.membership(vec![(ConfChangeType::RemoveNode, id)], vec![])
            .await
    }

    async fn replace_member(
        &self,
        req: Request<api::ReplaceMemberRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        self.admin(&req, "cluster.replace_member", "change membership")
            .await?;
        let req = req.into_inner();
        let m = new_member(req.add)?;
        if m.id == req.remove_id {
            return Err(Status::invalid_argument(
                "the new node needs a new id: a wiped node must not reuse its old identity",
            ));
        }
        self.membership(
            vec![
                (ConfChangeType::AddNode, m.id),
                (ConfChangeType::RemoveNode, req.remove_id),
            ],
            vec![m],
        )
        .await
    }
}

#[tonic::async_trait]
impl<E: Engine> Kv for ApiService<E> {
    async fn put(
        &self,
        req: Request<api::PutRequest>,
    ) -> Result<Response<api::PutResponse>, Status> {
        let caller = self.kv_admin(&req, "kv.put").await?;
        let req = req.into_inner();
        let cmd = Command::put(req.key, req.value).map_err(invalid)?;
        self.write(&caller, cmd, req.idempotency_key).await
    }

    async fn delete(
        &self,
        req: Request<api::DeleteRequest>,
    ) -> Result<Response<api::PutResponse>, Status> {
        let caller = self.kv_admin(&req, "kv.delete").await?;
        let req = req.into_inner();
        let cmd = Command::delete(req.key).map_err(invalid)?;
        self.write(&caller, cmd, req.idempotency_key).await
    }

    async fn get(
        &self,
        req: Request<api::GetRequest>,
    ) -> Result<Response<api::GetResponse>, Status> {
        self.kv_admin(&req, "kv.get").await?;
        let req = req.into_inner();
        if req.key.is_empty() {
            return Err(invalid(CommandError::EmptyKey));
        }
        let read_index = if req.stale {
            self.node.store().applied_index()
        } else {
            self.node.read_index().await.map_err(status_from)?
        };
        let rec = state::kv_get(self.node.store(), &req.key).map_err(storage_status)?;
        Ok(Response::new(match rec {
            Some(r) => api::GetResponse {
                found: true,
                value: r.value,
                read_index,
                create_index: r.create_index,
                mod_index: r.mod_index,
                version: r.version,
            },
            None => api::GetResponse {
                read_index,
                ..Default::default()
            },
        }))
    }

    async fn list(
        &self,
        req: Request<api::ListRequest>,
    ) -> Result<Response<api::ListResponse>, Status> {
        self.kv_admin(&req, "kv.list").await?;
        let req = req.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            n if n > MAX_LIST_LIMIT => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} is above the maximum {MAX_LIST_LIMIT}"
                )))
            }
            n => n,
        };
        let read_index = if req.stale {
            self.node.store().applied_index()
        } else {
            self.node.read_index().await.map_err(status_from)?
        };
        let after = (!req.start_after.is_empty()).then_some(req.start_after.as_str());
        let items = state::kv_list(self.node.store(), &req.prefix, after, limit as usize)
            .map_err(storage_status)?
            .into_iter()
            .map(|(key, r)| api::KeyValue {
                key,
                value: r.value,
                mod_index: r.mod_index,
                version: r.version,
            })
            .collect();
        Ok(Response::new(api::ListResponse { items, read_index }))
    }
}
