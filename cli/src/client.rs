//! A coordinator API client that fails over across endpoints.
//!
//! Endpoints come from `CUSTODY_COORDINATOR` (comma-separated URLs) and the
//! cluster CA from `CUSTODY_CA`. Calls that fail with a retryable error move on
//! to the next endpoint; membership calls follow the leader redirect.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use custody_proto::cluster::v1::ApprovalRequest;
use custody_proto::v1 as api;
use custody_proto::v1::approvals_client::ApprovalsClient;
use custody_proto::v1::auth_client::AuthClient;
use custody_proto::v1::cluster_client::ClusterClient;
use custody_proto::v1::edges_client::EdgesClient;
use custody_proto::v1::evidence_client::EvidenceClient;
use custody_proto::v1::kv_client::KvClient;
use custody_proto::v1::policy_client::PolicyClient;
use custody_proto::v1::resources_client::ResourcesClient;
use custody_proto::v1::sessions_client::SessionsClient;
use custody_proto::v1::tools_client::ToolsClient;

/// Metadata key on redirects (see the coordinator's `api` module).
const LEADER_API_METADATA: &str = "x-custody-leader-api";

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CUSTODY_COORDINATOR is not set: give the coordinator API URLs, comma-separated")]
    NoEndpoints,
    #[error("CUSTODY_CA is not set: give the path of the cluster CA certificate")]
    NoCa,
    #[error("read CA {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad coordinator URL {url:?}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("{0}")]
    Status(String),
    #[error(transparent)]
    Login(#[from] crate::login::LoginError),
    #[error("no coordinator answered within {0:?}; last error: {1}")]
    Exhausted(Duration, String),
}

impl ClientError {
    fn from_status(s: &Status) -> Self {
        ClientError::Status(format!("{:?}: {}", s.code(), s.message()))
    }
}

/// How to reach the cluster.
#[derive(Clone)]
pub struct ClientConfig {
    pub endpoints: Vec<String>,
    pub ca_pem: Vec<u8>,
    /// Give up on a call after this long across all endpoints.
    pub deadline: Duration,
    /// Bearer access token sent with every call.
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoints", &self.endpoints)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ClientConfig {
    pub fn from_env() -> Result<Self, ClientError> {
        let eps = std::env::var("CUSTODY_COORDINATOR").map_err(|_| ClientError::NoEndpoints)?;
        let ca = std::env::var("CUSTODY_CA").map_err(|_| ClientError::NoCa)?;
        let mut cfg = Self::new(&eps, PathBuf::from(ca))?;
        // CUSTODY_TOKEN, else the token file `custody login` wrote.
        cfg.token = match crate::login::current_token() {
            Ok(t) => Some(t),
            // Calls then fail with the server's clear "no bearer token".
            Err(crate::login::LoginError::NoToken) => None,
            Err(e) => return Err(ClientError::Login(e)),
        };
        Ok(cfg)
    }

    pub fn new(endpoints: &str, ca: PathBuf) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(normalize_url)
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let ca_pem =
            std::fs::read(&ca).map_err(|source| ClientError::ReadCa { path: ca, source })?;
        Ok(Self {
            endpoints,
            ca_pem,
            deadline: Duration::from_secs(30),
            token: None,
        })
    }
}

fn normalize_url(s: &str) -> String {
    if s.contains("://") {
        s.to_owned()
    } else {
        format!("https://{s}")
    }
}

/// True for errors after which another endpoint (or a retry) may succeed.
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

/// A request carrying the bearer token, if any.
fn authed<T>(token: &Option<String>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = format!("Bearer {t}").parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

/// The API client.
pub struct Client {
    cfg: ClientConfig,
    channels: Vec<Channel>,
    current: AtomicUsize,
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        let channels = cfg
            .endpoints
            .iter()
            .map(|u| channel(u, &cfg.ca_pem))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cfg,
            channels,
            current: AtomicUsize::new(0),
        })
    }

    pub fn from_env() -> Result<Self, ClientError> {
        Self::new(ClientConfig::from_env()?)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.cfg.endpoints
    }

    /// Runs `f` against endpoints until it succeeds, fails with a non-retryable
    /// error, or the deadline passes. Follows leader redirects.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let start = Instant::now();
        let mut last = String::new();
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0usize;
        while start.elapsed() < self.cfg.deadline {
            let i = self.current.load(Ordering::Relaxed) % self.channels.len();
            match f(self.channels[i].clone()).await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == Code::FailedPrecondition => {
                    let leader = s
                        .metadata()
                        .get(LEADER_API_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .map(normalize_url);
                    let Some(leader) = leader else {
                        return Err(ClientError::from_status(&s));
                    };
                    if let Some(j) = self.cfg.endpoints.iter().position(|e| *e == leader) {
                        self.current.store(j, Ordering::Relaxed);
                        last = s.message().to_owned();
                    } else {
                        let ch = channel(&leader, &self.cfg.ca_pem)?;
                        return f(ch).await.map_err(|s| ClientError::from_status(&s));
                    }
                }
                Err(s) if retryable(&s) => {
                    last = format!("{}: {:?}: {}", self.cfg.endpoints[i], s.code(), s.message());
                    self.current.store(i + 1, Ordering::Relaxed);
                    attempt += 1;
                    // Pause after each full round over the endpoints.
                    if attempt.is_multiple_of(self.channels.len()) {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
                Err(s) => return Err(ClientError::from_status(&s)),
            }
        }
        Err(ClientError::Exhausted(self.cfg.deadline, last))
    }

    /// Puts a value. Retries reuse one idempotency key, so the write applies once.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<api::PutResponse, ClientError> {
        self.put_with_key(key, value, &new_idempotency_key()).await
    }

    /// Puts a value under the caller's own idempotency key.
    pub async fn put_with_key(
        &self,
        key: &str,
        value: Vec<u8>,
        idem: &str,
    ) -> Result<api::PutResponse, ClientError> {
        let idem = idem.to_owned();
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::PutRequest {
                key: key.to_owned(),
                value: value.clone(),
                idempotency_key: idem.clone(),
            };
            async move { Ok(KvClient::new(ch).put(authed(&tok, req)).await?.into_inner()) }
        })
        .await
    }

    pub async fn delete(&self, key: &str) -> Result<api::PutResponse, ClientError> {
        let idem = new_idempotency_key();
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::DeleteRequest {
                key: key.to_owned(),
                idempotency_key: idem.clone(),
            };
            async move {
                Ok(KvClient::new(ch)
                    .delete(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn get(&self, key: &str, stale: bool) -> Result<api::GetResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::GetRequest {
                key: key.to_owned(),
                stale,
            };
            async move { Ok(KvClient::new(ch).get(authed(&tok, req)).await?.into_inner()) }
        })
        .await
    }

    pub async fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: u32,
    ) -> Result<api::ListResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::ListRequest {
                prefix: prefix.to_owned(),
                limit,
                start_after: start_after.to_owned(),
                stale: false,
            };
            async move {
                Ok(KvClient::new(ch)
                    .list(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// Every key under `prefix`, paging through the API.
    pub async fn list_all(&self, prefix: &str) -> Result<Vec<api::KeyValue>, ClientError> {
        let mut out: Vec<api::KeyValue> = Vec::new();
        loop {
            let after = out.last().map(|kv| kv.key.clone()).unwrap_or_default();
            let page = self.list(prefix, &after, 10_000).await?;
            let n = page.items.len();
            out.extend(page.items);
            if n < 10_000 {
                return Ok(out);
            }
        }
    }

    /// Status as answered by the first reachable node.
    pub async fn node_status(&self) -> Result<api::ClusterStatus, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(ClusterClient::new(ch)
                    .status(authed(&tok, api::StatusRequest {}))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// Status from one specific API address.
    pub async fn status_at(&self, api_addr: &str) -> Result<api::ClusterStatus, ClientError> {
        let ch = channel(&normalize_url(api_addr), &self.cfg.ca_pem)?;
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            ClusterClient::new(ch).status(authed(&self.cfg.token, api::StatusRequest {})),
        )
        .await
        .map_err(|_| ClientError::Status(format!("{api_addr}: timed out")))?;
        r.map(|r| r.into_inner())
            .map_err(|s| ClientError::from_status(&s))
    }

    /// Cluster status from the leader when one is reachable, else from any node.
    pub async fn cluster_status(&self) -> Result<api::ClusterStatus, ClientError> {
        let st = self.node_status().await?;
        if st.role == "leader" || st.leader_id == 0 {
            return Ok(st);
        }
        let leader_api = st
            .members
            .iter()
            .find(|m| m.id == st.leader_id)
            .map(|m| m.api_addr.clone());
        match leader_api {
            Some(a) => match self.status_at(&a).await {
                Ok(l) if l.role == "leader" => Ok(l),
                _ => Ok(st),
            },
            None => Ok(st),
        }
    }

    pub async fn add_member(
        &self,
        member: api::NewMember,
        as_learner: bool,
    ) -> Result<api::MembershipResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::AddMemberRequest {
                member: Some(member.clone()),
                as_learner,
            };
            async move {
                Ok(ClusterClient::new(ch)
                    .add_member(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// Asks the leader to hand leadership to another voter.
    pub async fn step_down(&self) -> Result<api::StepDownResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(ClusterClient::new(ch)
                    .step_down(authed(&tok, api::StepDownRequest {}))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn remove_member(&self, id: u64) -> Result<api::MembershipResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(ClusterClient::new(ch)
                    .remove_member(authed(&tok, api::RemoveMemberRequest { id }))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn replace_member(
        &self,
        remove_id: u64,
        add: api::NewMember,
    ) -> Result<api::MembershipResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::ReplaceMemberRequest {
                remove_id,
                add: Some(add.clone()),
            };
            async move {
                Ok(ClusterClient::new(ch)
                    .replace_member(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }
}

impl Client {
    /// One MCP tool call, run by the cluster as this client's identity.
    pub async fn tool_call(
        &self,
        req: api::ToolCallRequest,
    ) -> Result<api::ToolCallResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = req.clone();
            async move {
                Ok(ToolsClient::new(ch)
                    .call(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn whoami(&self) -> Result<api::WhoAmIResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(AuthClient::new(ch)
                    .who_am_i(authed(&tok, api::WhoAmIRequest {}))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn policy_apply(
        &self,
        text: &str,
        format: &str,
    ) -> Result<api::ApplyPolicyResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::ApplyPolicyRequest {
                text: text.to_owned(),
                format: format.to_owned(),
            };
            async move {
                Ok(PolicyClient::new(ch)
                    .apply(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn policy_show(&self) -> Result<api::ShowPolicyResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(PolicyClient::new(ch)
                    .show(authed(&tok, api::ShowPolicyRequest {}))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn policy_test(
        &self,
        req: api::TestPolicyRequest,
    ) -> Result<api::TestPolicyResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = req.clone();
            async move {
                Ok(PolicyClient::new(ch)
                    .test(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }
}

impl Client {
    /// A token that binds no resource (the edge serves what an admin binds
    /// to it by name).
    pub async fn create_enroll_token(
        &self,
        name: &str,
        region: &str,
        ttl: Duration,
    ) -> Result<api::CreateEnrollTokenResponse, ClientError> {
        self.create_enroll_token_for(name, region, ttl, Vec::new())
            .await
    }

    /// A token that binds `resources` (name, kind, labels) to the edge.
    pub async fn create_enroll_token_for(
        &self,
        name: &str,
        region: &str,
        ttl: Duration,
        resources: Vec<api::ResourceInfo>,
    ) -> Result<api::CreateEnrollTokenResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::CreateEnrollTokenRequest {
                name: name.to_owned(),
                region: region.to_owned(),
                ttl_secs: ttl.as_secs(),
                resources: resources.clone(),
            };
            async move {
                Ok(EdgesClient::new(ch)
                    .create_enroll_token(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn revoke_edge(&self, name: &str) -> Result<api::RevokeEdgeResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::RevokeEdgeRequest {
                name: name.to_owned(),
            };
            async move {
                Ok(EdgesClient::new(ch)
                    .revoke(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn list_edges(&self) -> Result<Vec<api::EdgeInfo>, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(EdgesClient::new(ch)
                    .list(authed(&tok, api::ListEdgesRequest {}))
                    .await?
                    .into_inner()
                    .edges)
            }
        })
        .await
    }

    /// Applies the retention rules now; returns how many sessions were purged.
    pub async fn purge_evidence(&self) -> Result<u64, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(EvidenceClient::new(ch)
                    .purge(authed(&tok, api::PurgeRequest {}))
                    .await?
                    .into_inner()
                    .purged)
            }
        })
        .await
    }

    pub async fn set_hold(
        &self,
        req: api::SetHoldRequest,
    ) -> Result<custody_proto::cluster::v1::LegalHold, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = req.clone();
            async move {
                Ok(EvidenceClient::new(ch)
                    .set_hold(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn release_hold(
        &self,
        id: u64,
        reason: &str,
    ) -> Result<custody_proto::cluster::v1::LegalHold, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::ReleaseHoldRequest {
                id,
                reason: reason.to_owned(),
            };
            async move {
                Ok(EvidenceClient::new(ch)
                    .release_hold(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn list_holds(
        &self,
        all: bool,
    ) -> Result<Vec<custody_proto::cluster::v1::LegalHold>, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(EvidenceClient::new(ch)
                    .list_holds(authed(&tok, api::ListHoldsRequest { all }))
                    .await?
                    .into_inner()
                    .holds)
            }
        })
        .await
    }

    pub async fn bind_resource(&self, req: api::BindResourceRequest) -> Result<(), ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = req.clone();
            async move {
                ResourcesClient::new(ch).bind(authed(&tok, req)).await?;
                Ok(())
            }
        })
        .await
    }

    pub async fn list_resources(&self) -> Result<Vec<api::ResourceInfo>, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(ResourcesClient::new(ch)
                    .list(authed(&tok, api::ListResourcesRequest {}))
                    .await?
                    .into_inner()
                    .resources)
            }
        })
        .await
    }

    /// Opens an exec session. Send stdin on the returned sender (the start
    /// message is already queued); read output from the stream.
    pub async fn exec_open(
        &self,
        resource: &str,
        argv: &[String],
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<api::ExecInput>,
            tonic::Streaming<api::ExecOutput>,
        ),
        ClientError,
    > {
        self.exec_start(api::ExecStart {
            resource: resource.to_owned(),
            argv: argv.to_vec(),
            ..Default::default()
        })
        .await
    }

    /// Starts an exec session; the stream answers `started` (or
    /// `approval_required`) first.
    pub async fn exec_start(
        &self,
        start: api::ExecStart,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<api::ExecInput>,
            tonic::Streaming<api::ExecOutput>,
        ),
        ClientError,
    > {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let start = api::ExecInput {
                kind: Some(api::exec_input::Kind::Start(start.clone())),
            };
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel(16);
                tx.send(start)
                    .await
                    .map_err(|_| Status::internal("input channel closed"))?;
                let out = SessionsClient::new(ch)
                    .max_decoding_message_size(4 << 20)
                    .exec(authed(
                        &tok,
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                    ))
                    .await?
                    .into_inner();
                Ok((tx, out))
            }
        })
        .await
    }
}

/// Approval requests.
impl Client {
    pub async fn list_approvals(
        &self,
        pending_only: bool,
    ) -> Result<Vec<ApprovalRequest>, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::ListApprovalsRequest {
                pending_only,
                limit: 0,
            };
            async move {
                Ok(ApprovalsClient::new(ch)
                    .list(authed(&tok, req))
                    .await?
                    .into_inner()
                    .requests)
            }
        })
        .await
    }

    pub async fn get_approval(&self, id: u64) -> Result<ApprovalRequest, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(ApprovalsClient::new(ch)
                    .get(authed(&tok, api::GetApprovalRequest { id }))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// Approves or denies. Retries reuse one idempotency key, so the review applies once.
    pub async fn review_approval(
        &self,
        id: u64,
        approve: bool,
        reason: &str,
    ) -> Result<ApprovalRequest, ClientError> {
        let idem = new_idempotency_key();
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::ReviewApprovalRequest {
                id,
                approve,
                reason: reason.to_owned(),
                idempotency_key: idem.clone(),
            };
            async move {
                Ok(ApprovalsClient::new(ch)
                    .review(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn cancel_approval(&self, id: u64) -> Result<ApprovalRequest, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(ApprovalsClient::new(ch)
                    .cancel(authed(&tok, api::CancelApprovalRequest { id }))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn request_access(
        &self,
        resource: &str,
        duration: std::time::Duration,
        justification: &str,
    ) -> Result<ApprovalRequest, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::RequestAccessRequest {
                resource: resource.to_owned(),
                duration_ms: duration.as_millis() as u64,
                justification: justification.to_owned(),
            };
            async move {
                Ok(ApprovalsClient::new(ch)
                    .request_access(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }
}

impl Client {
    pub async fn list_sessions(
        &self,
        req: api::ListSessionsRequest,
    ) -> Result<Vec<api::SessionInfo>, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = req.clone();
            async move {
                Ok(SessionsClient::new(ch)
                    .list(authed(&tok, req))
                    .await?
                    .into_inner()
                    .sessions)
            }
        })
        .await
    }

    /// Sessions open now, on every node that answers.
    pub async fn list_live_sessions(&self) -> Result<api::ListLiveSessionsResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            async move {
                Ok(SessionsClient::new(ch)
                    .list_live(authed(&tok, api::ListLiveSessionsRequest {}))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// Ends a live session; the node that hosted it.
    pub async fn kill_session(&self, id: &str, reason: &str) -> Result<u64, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::KillSessionRequest {
                session_id: id.to_owned(),
                reason: reason.to_owned(),
            };
            async move {
                Ok(SessionsClient::new(ch)
                    .kill(authed(&tok, req))
                    .await?
                    .into_inner()
                    .node_id)
            }
        })
        .await
    }

    pub async fn export(
        &self,
        req: api::ExportRequest,
    ) -> Result<tonic::Streaming<api::ExportFrame>, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = req.clone();
            async move {
                Ok(EvidenceClient::new(ch)
                    .max_decoding_message_size(16 << 20)
                    .export(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// One session with all its events (read page by page).
    pub async fn get_session(&self, id: &str) -> Result<api::GetSessionResponse, ClientError> {
        let mut all = self.get_session_page(id, 0).await?;
        while all.next_seq != 0 {
            let from = all.next_seq;
            let page = self.get_session_page(id, from).await?;
            if page.events.first().map(|e| e.seq) != Some(from) {
                return Err(ClientError::Status(format!(
                    "DataLoss: session {id}: the page from event {from} does not start there"
                )));
            }
            all.events.extend(page.events);
            all.next_seq = page.next_seq;
            all.session = page.session;
        }
        Ok(all)
    }

    async fn get_session_page(
        &self,
        id: &str,
        from_seq: u64,
    ) -> Result<api::GetSessionResponse, ClientError> {
        self.call(|ch| {
            let tok = self.cfg.token.clone();
            let req = api::GetSessionRequest {
                session_id: id.to_owned(),
                from_seq,
            };
            async move {
                Ok(SessionsClient::new(ch)
                    .max_decoding_message_size(16 << 20)
                    .get(authed(&tok, req))
                    .await?
                    .into_inner())
            }
        })
        .await
    }
}

/// A fresh random idempotency key.
pub fn new_idempotency_key() -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    format!("{:016x}{:016x}", rng.random::<u64>(), rng.random::<u64>())
}

fn channel(url: &str, ca_pem: &[u8]) -> Result<Channel, ClientError> {
    let bad = |detail: String| ClientError::BadUrl {
        url: url.to_owned(),
        detail,
    };
    let ep = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(e.to_string()))?;
    let ep = if url.starts_with("https://") {
        ep.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
            .map_err(|e| bad(e.to_string()))?
    } else {
        return Err(bad("only https:// URLs are supported".into()));
    };
    Ok(ep
        .connect_timeout(Duration::from_millis(1000))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect_lazy())
}
