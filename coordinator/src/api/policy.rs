//! The `Auth` (whoami) and `Policy` services.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use custody_proto::v1 as api;
use custody_proto::v1::auth_server::Auth;
use custody_proto::v1::policy_server::Policy as PolicyApi;

use crate::auth::{ClientKind, Identity};
use crate::consensus::NodeHandle;
use crate::policy::{parse_document, DocumentFormat, Request as PolicyRequest, ResourceInfo, Role};
use crate::state::{self, Command};
use crate::storage::Engine;

use super::status_from;
use crate::gateway::guard::role_name;
use crate::gateway::Guard;

/// Serves `Auth` and `Policy` for one node.
pub struct PolicyService<E: Engine> {
    node: NodeHandle<E>,
    guard: Arc<Guard>,
}

impl<E: Engine> PolicyService<E> {
    pub fn new(node: NodeHandle<E>, guard: Arc<Guard>) -> Self {
        Self { node, guard }
    }
}

#[tonic::async_trait]
impl<E: Engine> Auth for PolicyService<E> {
    async fn who_am_i(
        &self,
        req: Request<api::WhoAmIRequest>,
    ) -> Result<Response<api::WhoAmIResponse>, Status> {
        let id = self.guard.authenticate(&self.node, &req, "whoami").await?;
        let policy = self.guard.policy(&self.node).await?;
        let roles = self.guard.roles(&policy, &id);
        Ok(Response::new(api::WhoAmIResponse {
            issuer: id.issuer,
            subject: id.subject,
            email: id.email.unwrap_or_default(),
            name: id.name.unwrap_or_default(),
            groups: id.groups,
            client_kind: id.client_kind.as_str().into(),
            client_id: id.client_id.unwrap_or_default(),
            actor: id.actor.unwrap_or_default(),
            roles: roles.into_iter().map(|r| role_name(r).to_owned()).collect(),
        }))
    }
}

#[tonic::async_trait]
impl<E: Engine> PolicyApi for PolicyService<E> {
    async fn apply(
        &self,
        req: Request<api::ApplyPolicyRequest>,
    ) -> Result<Response<api::ApplyPolicyResponse>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "policy.apply")
            .await?;
        self.guard
            .require(&self.node, &id, &[Role::Admin], "change policy")
            .await?;
        let req = req.into_inner();
        let format = match req.format.to_ascii_lowercase().as_str() {
            "yaml" | "yml" | "" => DocumentFormat::Yaml,
            "toml" => DocumentFormat::Toml,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown policy format {other:?}; use yaml or toml"
                )))
            }
        };
        let doc = parse_document(&req.text, format)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let document_json =
            serde_json::to_vec(&doc).map_err(|e| Status::internal(e.to_string()))?;
        let author = format!("{} {}", id.issuer, id.subject);
        let o = self
            .node
            .propose_retrying(
                Command::SetPolicy {
                    document_json,
                    author,
                },
                None,
            )
            .await
            .map_err(status_from)?;
        let rec = state::policy_get(self.node.store())
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::internal("policy missing after apply"))?;
        tracing::info!(target: "audit", event = "policy_applied", version = rec.version, subject = %id.subject, issuer = %id.issuer, "policy changed");
        Ok(Response::new(api::ApplyPolicyResponse {
            version: rec.version,
            index: o.index,
        }))
    }

    async fn show(
        &self,
        req: Request<api::ShowPolicyRequest>,
    ) -> Result<Response<api::ShowPolicyResponse>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "policy.show")
            .await?;
        self.guard
            .require(
                &self.node,
                &id,
                &[Role::Admin, Role::Auditor],
                "read the policy",
            )
            .await?;
        let policy = self.guard.policy(&self.node).await?;
        let admin = self.guard.roles(&policy, &id).contains(&Role::Admin);
        let rec =
            state::policy_get(self.node.store()).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match rec {
            None => api::ShowPolicyResponse::default(),
            Some(r) => {
                let mut document = r.document;
                if !admin {
                    redact_webhooks(&mut document);
                }
                api::ShowPolicyResponse {
                    version: r.version,
                    author: r.author,
                    applied_at_ms: r.applied_at_ms,
                    yaml: serde_norway::to_string(&document)
                        .map_err(|e| Status::internal(e.to_string()))?,
                }
            }
        }))
    }

    async fn test(
        &self,
        req: Request<api::TestPolicyRequest>,
    ) -> Result<Response<api::TestPolicyResponse>, Status> {
        let id = self
            .guard
            .authenticate(&self.node, &req, "policy.test")
            .await?;
        self.guard
            .require(
                &self.node,
                &id,
                &[Role::Admin, Role::Auditor],
                "test policy",
            )
            .await?;
        let policy = self.guard.policy(&self.node).await?;
        let r = req.into_inner();
        if r.resource.is_empty() || r.action.is_empty() {
            return Err(Status::invalid_argument("resource and action are required"));
        }
        let action = crate::gateway::Action::parse(&r.action).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown action {:?} (expected {})",
                r.action,
                crate::gateway::Action::list()
            ))
        })?;
        let client_kind = match r.client_kind.as_str() {
            "" | "human" => ClientKind::Human,
            "machine" => ClientKind::Machine,
            other => {
                return Err(Status::invalid_argument(format!(
                    "client kind {other:?} is not human or machine"
                )))
            }
        };
        let subject: Identity = if r.r#as.is_empty() {
            Identity {
                issuer: String::new(),
                subject: "(hypothetical)".into(),
                email: None,
                name: None,
                groups: r.groups.clone(),
                client_kind,
                client_id: None,
                actor: None,
            }
        } else {
            let found = state::identities_named(self.node.store(), &r.r#as)
                .map_err(|e| Status::internal(e.to_string()))?;
            match found.as_slice() {
                [] if !r.groups.is_empty() => Identity {
                    issuer: String::new(),
                    subject: r.r#as.clone(),
                    email: None,
                    name: None,
                    groups: r.groups.clone(),
                    client_kind,
                    client_id: None,
                    actor: None,
                },
                [] => {
                    return Err(Status::not_found(format!(
                        "no identity named {:?} has signed in yet; pass --groups to test a hypothetical one",
                        r.r#as
                    )))
                }
                [one] => one.clone(),
                many => {
                    return Err(Status::failed_precondition(format!(
                        "{} identities match {:?}; use the exact subject",
                        many.len(),
                        r.r#as
                    )))
                }
            }
        };
        let resource = ResourceInfo {
            name: r.resource.clone(),
            kind: r.resource_kind.clone(),
            labels: r.labels.clone().into_iter().collect(),
        };
        let d = policy.evaluate(&PolicyRequest {
            identity: &subject,
            resource: &resource,
            action,
            command: (!r.command.is_empty()).then_some(r.command.as_str()),
            dialect: Default::default(),
        });
        Ok(Response::new(api::TestPolicyResponse {
            effect: d.effect.as_str().into(),
            rule: d.by.name().unwrap_or_default(),
            reason: d.reason,
            trace: d.trace,
            approver_groups: d
                .approval
                .as_ref()
                .map(|a| a.groups.clone())
                .unwrap_or_default(),
            approvals_required: d.approval.as_ref().map_or(0, |a| a.count),
            mask: d.mask,
        }))
    }
}

/// What non-admins see instead of a webhook URL: URLs often carry the
/// receiver's secret (Slack's do).
pub(crate) const REDACTED_WEBHOOK: &str = "<redacted: admins only>";

/// Hides every approval webhook URL in a policy document.
fn redact_webhooks(doc: &mut crate::policy::PolicyDocument) {
    let approvals = doc
        .rules
        .iter_mut()
        .filter_map(|r| r.approval.as_mut())
        .chain(
            doc.guardrails
                .iter_mut()
                .filter_map(|g| g.approval.as_mut()),
        );
    for a in approvals {
        if a.webhook.is_some() {
            a.webhook = Some(REDACTED_WEBHOOK.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_redacted_in_rules_and_guardrails() {
        let doc = crate::policy::parse_document(
            "rules:\n- name: r\n  actions: [exec]\n  decision: require_approval\n  approval: {groups: [a], webhook: 'https://hooks.example/T0/B0/sekret'}\n\
             guardrails:\n- name: g\n  pattern: x\n  decision: require_approval\n  approval: {groups: [a], webhook: 'https://hooks.example/T1/B1/sekret'}\n",
            crate::policy::DocumentFormat::Yaml,
        )
        .unwrap();
        let mut d = doc.clone();
        redact_webhooks(&mut d);
        let yaml = serde_norway::to_string(&d).unwrap();
        assert!(!yaml.contains("sekret"), "{yaml}");
        assert_eq!(yaml.matches(REDACTED_WEBHOOK).count(), 2, "{yaml}");
        assert!(serde_norway::to_string(&doc).unwrap().contains("sekret"));
    }
}
