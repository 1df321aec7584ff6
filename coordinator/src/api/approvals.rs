//! `custody.v1.Approvals`: listing, reviewing and cancelling approval
//! requests, and asking for time-boxed access grants. The rules themselves
//! are enforced at apply (`state::approvals`); this layer authenticates,
//! fills in the verified reviewer, and announces decisions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use custody_proto::cluster::v1 as pb;
use custody_proto::v1 as api;
use custody_proto::v1::approvals_server::Approvals;

use super::{status_from, storage_status, Guard};
use crate::auth::{ClientKind, Identity};
use crate::consensus::node::now_ms;
use crate::consensus::NodeHandle;
use crate::gateway::session::create_request;
use crate::gateway::Kind;
use crate::notify::Notifier;
use crate::policy::{Effect, Request as PolicyRequest, ResourceInfo};
use crate::state::approvals::{self, approval_get, approvals_list, ApprovalCommand, MAX_ACCESS_MS};
use crate::state::{edges, Command};
use crate::storage::Engine;

pub struct ApprovalsService<E: Engine> {
    node: NodeHandle<E>,
    guard: Arc<Guard>,
    notifier: Notifier,
}

impl<E: Engine> ApprovalsService<E> {
    pub fn new(node: NodeHandle<E>, guard: Arc<Guard>, notifier: Notifier) -> Self {
        Self {
            node,
            guard,
            notifier,
        }
    }

    /// Whether `id` sees every request (not only their own and those they review).
    async fn sees_all(&self, id: &Identity) -> Result<bool, Status> {
        let policy = self.guard.policy(&self.node).await?;
        Ok(!self.guard.roles(&policy, id).is_empty())
    }

    fn visible(r: &pb::ApprovalRequest, id: &Identity, all: bool) -> bool {
        all || r.requester == id.principal()
            || r.approver_groups.iter().any(|g| id.groups.contains(g))
    }

    /// The stored request as `id` may see it, with its effective status.
    async fn fetch(&self, id: &Identity, request: u64) -> Result<pb::ApprovalRequest, Status> {
        if request == 0 {
            return Err(Status::invalid_argument(
                "approval request ids are positive integers",
            ));
        }
        let all = self.sees_all(id).await?;
        approval_get(self.node.store(), request)
            .map_err(storage_status)?
            .filter(|r| Self::visible(r, id, all))
            .map(|r| shown(r, now_ms()))
            .ok_or_else(|| Status::not_found(format!("no approval request {request}")))
    }

    /// Proposes a change to request `request` and maps a refusal to a status.
    async fn change(
        &self,
        request: u64,
        cmd: ApprovalCommand,
        idempotency_key: Option<String>,
    ) -> Result<(), Status> {
        if request == 0 {
            return Err(Status::invalid_argument(
                "approval request ids are positive integers",
            ));
        }
        let out = self
            .node
            .propose_retrying(Command::Approval(Box::new(cmd)), idempotency_key)
            .await
            .map_err(status_from)?;
        match out.rejected {
            None => Ok(()),
            Some(why) if why.starts_with("no approval request") => Err(Status::not_found(why)),
            Some(why)
                if why.contains("own request")
                    || why.contains("machine identities")
                    || why.contains("none of the approver groups")
                    || why.contains("only the requester") =>
            {
                Err(Status::permission_denied(why))
            }
            Some(why) => Err(Status::failed_precondition(why)),
        }
    }
}

/// A stored request as the API shows it: with its effective status, and
/// without the digest of the command as sent. The command itself may be
/// masked (PostgreSQL statements under a masking profile); its digest could
/// give a masked low-entropy value (an SSN) away to anyone who tries every
/// candidate.
fn shown(r: pb::ApprovalRequest, now_ms: u64) -> pb::ApprovalRequest {
    let mut r = approvals::with_effective_status(r, now_ms);
    r.command_sha256 = Default::default();
    r
}

#[tonic::async_trait]
impl<E: Engine> Approvals for ApprovalsService<E> {
    async fn list(
        &self,
        req: Request<api::ListApprovalsRequest>,
    ) -> Result<Response<api::ListApprovalsResponse>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "approvals.list")
            .await?;
        let r = req.into_inner();
        let all = self.sees_all(&id).await?;
        let now = now_ms();
        let requests = approvals_list(self.node.store(), r.limit as usize, |a| {
            Self::visible(a, &id, all)
                && (!r.pending_only || approvals::effective_status(a, now) == approvals::PENDING)
        })
        .map_err(storage_status)?
        .into_iter()
        .map(|a| shown(a, now))
        .collect();
        Ok(Response::new(api::ListApprovalsResponse { requests }))
    }

    async fn get(
        &self,
        req: Request<api::GetApprovalRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "approvals.get")
            .await?;
        self.node.read_index().await.map_err(status_from)?;
        Ok(Response::new(self.fetch(&id, req.into_inner().id).await?))
    }

    async fn review(
        &self,
        req: Request<api::ReviewApprovalRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "approvals.review")
            .await?;
        let r = req.into_inner();
        let review = pb::ReviewApproval {
            id: r.id,
            reviewer: id.principal(),
            reviewer_label: id.label().to_owned(),
            reviewer_groups: id.groups.clone(),
            reviewer_is_machine: id.client_kind == ClientKind::Machine,
            approve: r.approve,
            reason: r.reason,
        };
        if r.idempotency_key.len() > 64 {
            return Err(Status::invalid_argument(
                "idempotency keys are at most 64 bytes",
            ));
        }
        let key = (!r.idempotency_key.is_empty())
            .then(|| super::scoped_key(&id, &format!("review/{}", r.idempotency_key)));
        let result = self
            .change(r.id, ApprovalCommand::Review(review), key)
            .await;
        let verb = if r.approve { "approve" } else { "deny" };
        if let Err(e) = &result {
            tracing::warn!(target: "audit", event = "approval_review_refused", request = r.id, reviewer = %id.label(), verb, reason = %e.message());
        }
        result?;
        let stored = approval_get(self.node.store(), r.id)
            .map_err(storage_status)?
            .ok_or_else(|| Status::internal("reviewed request vanished"))?;
        tracing::info!(target: "audit", event = "approval_reviewed", request = r.id, reviewer = %id.label(), verb, status = %stored.status);
        match stored.status.as_str() {
            approvals::APPROVED => self.notifier.approval("approval_approved", &stored),
            approvals::DENIED => self.notifier.approval("approval_denied", &stored),
            _ => {}
        }
        Ok(Response::new(shown(stored, now_ms())))
    }

    async fn cancel(
        &self,
        req: Request<api::CancelApprovalRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "approvals.cancel")
            .await?;
        let request = req.into_inner().id;
        self.change(
            request,
            ApprovalCommand::Cancel(pb::CancelApproval {
                id: request,
                by: id.principal(),
            }),
            None,
        )
        .await?;
        tracing::info!(target: "audit", event = "approval_cancelled", request, by = %id.label());
        let stored = self.fetch(&id, request).await?;
        self.notifier.approval("approval_cancelled", &stored);
        Ok(Response::new(stored))
    }

    async fn request_access(
        &self,
        req: Request<api::RequestAccessRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "approvals.request_access")
            .await?;
        let r = req.into_inner();
        if !(1..=MAX_ACCESS_MS).contains(&r.duration_ms) {
            return Err(Status::invalid_argument(format!(
                "--for must be between 1s and {} days",
                MAX_ACCESS_MS / 86_400_000
            )));
        }
        let policy = self.guard.policy(&self.node).await?;
        let serving =
            edges::edges_serving(self.node.store(), &r.resource).map_err(storage_status)?;
        let Some((_, def)) = serving.first() else {
            return Err(Status::not_found(format!(
                "no resource named {:?} (see `custody resources`)",
                r.resource
            )));
        };
        let resource = ResourceInfo {
            name: def.name.clone(),
            kind: def.kind.clone(),
            labels: def.labels.clone(),
        };
        // The grant covers what a session on this kind of resource starts
        // with: a database is connected to, a shell runs commands.
        let action = Kind::parse(&def.kind)
            .map(Kind::session_action)
            .ok_or_else(|| {
                Status::failed_precondition(format!("unknown resource kind {:?}", def.kind))
            })?;
        let d = policy.evaluate(&PolicyRequest {
            identity: &id,
            resource: &resource,
            action,
            command: None,
            dialect: Default::default(),
        });
        let rule = d.by.label();
        let doc = match d.effect {
            Effect::Deny => {
                return Err(Status::permission_denied(format!(
                    "denied by policy rule {rule}: {}",
                    d.reason
                )))
            }
            Effect::Allow => {
                return Err(Status::failed_precondition(format!(
                    "policy rule {rule} already allows you on {}; no grant is needed",
                    def.name
                )))
            }
            Effect::RequireApproval => d
                .approval
                .clone()
                .ok_or_else(|| Status::internal("require_approval without an approval block"))?,
        };
        doc.check_justification(&r.justification)
            .map_err(Status::invalid_argument)?;
        let created = create_request(
            &self.node,
            pb::ApprovalRequest {
                requester: id.principal(),
                requester_label: id.label().to_owned(),
                resource: def.name.clone(),
                kind: "access".into(),
                action: action.as_str().into(),
                justification: r.justification,
                approver_groups: doc.groups.clone(),
                required: doc.count,
                require_reason: doc.require_reason,
                rule,
                timeout_ms: doc.timeout_ms(),
                access_ms: r.duration_ms,
                webhook: doc.webhook.clone().unwrap_or_default(),
                ..Default::default()
            },
        )
        .await?;
        tracing::warn!(target: "audit", event = "access_requested", request = created.id, subject = %id.subject, resource = %def.name, duration_ms = r.duration_ms);
        self.notifier.approval("approval_requested", &created);
        Ok(Response::new(created))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_shows_no_command_digest_and_the_effective_status() {
        let r = pb::ApprovalRequest {
            id: 1,
            kind: "command".into(),
            command: "delete from t where ssn = '[us_ssn]'".into(),
            command_sha256: vec![7; 32].into(),
            status: approvals::PENDING.into(),
            expires_at_ms: 10,
            ..Default::default()
        };
        let s = shown(r.clone(), 1_000);
        assert!(s.command_sha256.is_empty());
        assert_eq!(s.command, r.command);
        assert_eq!(s.status, approvals::effective_status(&r, 1_000));
        assert_ne!(s.status, approvals::PENDING, "timed out");
    }

    #[test]
    fn requesters_and_their_reviewers_see_a_request() {
        let alice = Identity::for_test("alice", &["engineers"]);
        let bob = Identity::for_test("bob", &["approvers"]);
        let eve = Identity::for_test("eve", &["other"]);
        let r = pb::ApprovalRequest {
            requester: alice.principal(),
            approver_groups: vec!["approvers".into()],
            ..Default::default()
        };
        assert!(ApprovalsService::<crate::storage::MemEngine>::visible(
            &r, &alice, false
        ));
        assert!(ApprovalsService::<crate::storage::MemEngine>::visible(
            &r, &bob, false
        ));
        assert!(!ApprovalsService::<crate::storage::MemEngine>::visible(
            &r, &eve, false
        ));
        assert!(ApprovalsService::<crate::storage::MemEngine>::visible(
            &r, &eve, true
        ));
    }
}
