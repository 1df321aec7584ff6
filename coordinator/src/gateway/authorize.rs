//! Clearing a caller for a session, the same for every front door: resolve
//! the resource among those the cluster bound to edges, check it is the
//! front door's kind, judge the action with the current policy, and settle
//! approvals (an approved command to spend, an access grant in force, or
//! the approval the caller still needs).

use std::sync::Arc;

use super::open::ApprovalUse;
use super::{Action, GatewayError, Guard, Kind};
use crate::auth::Identity;
use crate::consensus::node::now_ms;
use crate::consensus::NodeHandle;
use crate::policy::{ApprovalDoc, Decision, Effect, Policy, Request, ResourceInfo};
use crate::state::{approvals, edges};
use crate::storage::Engine;

/// What a front door asks, in neutral terms.
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    pub identity: &'a Identity,
    pub resource: &'a str,
    /// The kind of resource the front door serves.
    pub kind: Kind,
    pub action: Action,
    /// The command or statement policy judges with the action.
    pub command: Option<&'a str>,
    /// An approved command approval the caller spends (0: none).
    pub request_id: u64,
    /// What an approval must have approved, when that is more than the
    /// command (a Kubernetes request's command and body); `None`: the
    /// command.
    pub approved_as: Option<&'a str>,
}

/// A caller the policy lets through, or would with an approval. Only
/// [`authorize`] makes one, and [`super::open::open`] takes one: a session
/// opens only for what the gateway cleared, unchanged.
pub struct Cleared {
    pub(super) identity: Identity,
    pub(super) action: Action,
    pub(super) policy: Arc<Policy>,
    pub(super) resource: ResourceInfo,
    pub(super) candidates: Vec<edges::Edge>,
    pub(super) decision: Decision,
    /// How it opens under an approval (`None`: allowed outright).
    pub(super) approval: Option<ApprovalUse>,
}

impl Cleared {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The policy the decision was made with.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn resource(&self) -> &ResourceInfo {
        &self.resource
    }

    /// The edges serving the resource.
    pub fn candidates(&self) -> &[edges::Edge] {
        &self.candidates
    }

    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The masking for a byte stream's output: the rule's profiles, when
    /// they have detectors or patterns (column rules mean nothing to text).
    pub fn output_masker(&self) -> Option<crate::policy::mask::Masker> {
        if self.decision.mask.is_empty() {
            return None;
        }
        Some(self.policy.masker(&self.decision.mask)).filter(|m| m.masks_text())
    }

    /// The access grant it opens under, if any.
    pub fn grant(&self) -> Option<&custody_proto::cluster::v1::ApprovalRequest> {
        match &self.approval {
            Some(ApprovalUse::Grant(g)) => Some(g),
            _ => None,
        }
    }
}

/// The answer to an [`Ask`].
pub enum Verdict {
    /// It may open.
    Cleared(Cleared),
    /// Policy requires an approval the caller does not hold yet: what the
    /// policy asks of it. The front door requests it (a command) or tells the
    /// caller how to (access).
    NeedsApproval(Cleared, ApprovalDoc),
}

pub async fn authorize<E: Engine>(
    node: &NodeHandle<E>,
    guard: &Guard,
    ask: Ask<'_>,
) -> Result<Verdict, GatewayError> {
    let policy = guard.policy(node).await?;
    let serving = edges::edges_serving(node.store(), ask.resource)?;
    let Some(def) = serving.first().map(|(_, d)| d.clone()) else {
        return Err(GatewayError::NotFound(format!(
            "no resource named {:?} (see `custody resources`)",
            ask.resource
        )));
    };
    if Kind::parse(&def.kind) != Some(ask.kind) {
        return Err(GatewayError::Precondition(format!(
            "resource {} is a {} resource, not {}",
            def.name, def.kind, ask.kind
        )));
    }
    let resource = ResourceInfo {
        name: def.name.clone(),
        kind: def.kind.clone(),
        labels: def.labels.clone(),
    };
    let decision = policy.evaluate(&Request {
        identity: ask.identity,
        resource: &resource,
        action: ask.action,
        command: ask.command,
        dialect: Default::default(),
    });
    let rule = decision.by.label();
    let approval = match decision.effect {
        Effect::Allow if ask.request_id != 0 => {
            return Err(GatewayError::Precondition(format!(
                "policy allows this without approval; run it without --request-id {}",
                ask.request_id
            )));
        }
        Effect::Allow => None,
        Effect::Deny => {
            let id = ask.identity;
            tracing::warn!(target: "audit", event = "session_denied", subject = %id.subject, issuer = %id.issuer, resource = %def.name, %rule, action = %ask.action, command_bytes = ask.command.map_or(0, str::len));
            return Err(GatewayError::Denied(match decision.by.name() {
                Some(r) => format!("denied by policy rule {r}: {}", decision.reason),
                None => format!("denied by policy (default deny): {}", decision.reason),
            }));
        }
        Effect::RequireApproval if ask.request_id != 0 => Some(ApprovalUse::Spend {
            request: ask.request_id,
            command_sha256: super::session::command_digest(
                ask.approved_as.or(ask.command).unwrap_or_default(),
            )
            .to_vec(),
        }),
        Effect::RequireApproval => {
            // Access grants cover policy rules; guardrails always need a
            // command approval.
            let grant = if decision.by.is_guardrail() {
                None
            } else {
                approvals::active_grant(
                    node.store(),
                    &def.name,
                    &ask.identity.principal(),
                    now_ms(),
                )?
            };
            match grant {
                Some(g) => Some(ApprovalUse::Grant(Box::new(g))),
                None => {
                    let doc = decision.approval.clone().ok_or_else(|| {
                        GatewayError::Precondition(
                            "the policy requires an approval but names no approvers".into(),
                        )
                    })?;
                    let cleared = Cleared {
                        identity: ask.identity.clone(),
                        action: ask.action,
                        policy,
                        resource,
                        candidates: serving.into_iter().map(|(e, _)| e).collect(),
                        decision,
                        approval: None,
                    };
                    return Ok(Verdict::NeedsApproval(cleared, doc));
                }
            }
        }
    };
    Ok(Verdict::Cleared(Cleared {
        identity: ask.identity.clone(),
        action: ask.action,
        policy,
        resource,
        candidates: serving.into_iter().map(|(e, _)| e).collect(),
        decision,
        approval,
    }))
}

/// A command that needs approval, for a front door that does not wait.
pub enum Hold {
    /// It may open (allowed, or approved and now spent on this session).
    Cleared(Box<Cleared>),
    /// It waits for request `request`.
    Held { request: u64, reason: String },
}

/// Authorizes a command; when policy holds it for approval, finds the
/// caller's own request for this exact command (or makes one, with
/// `justification`): an approved one is spent on this session, a pending
/// one is answered at once.
pub async fn clear_or_hold<E: Engine>(
    node: &NodeHandle<E>,
    guard: &Guard,
    notifier: &crate::notify::Notifier,
    ask: Ask<'_>,
    shown: String,
    via: &'static str,
    justification: &str,
) -> Result<Hold, GatewayError> {
    let (c, doc) = match authorize(node, guard, ask).await? {
        Verdict::Cleared(c) => return Ok(Hold::Cleared(Box::new(c))),
        Verdict::NeedsApproval(c, doc) => (c, doc),
    };
    doc.check_justification(justification)
        .map_err(GatewayError::Invalid)?;
    let request = super::session::command_request(
        node,
        notifier,
        super::session::HeldCommand {
            identity: ask.identity,
            resource: ask.resource,
            action: ask.action,
            shown,
            digest: super::session::command_digest(
                ask.approved_as.or(ask.command).unwrap_or_default(),
            ),
            rule: c.decision().by.label(),
            doc: &doc,
            via,
            justification: justification.to_owned(),
        },
    )
    .await
    .map_err(GatewayError::Unavailable)?;
    let approved = approvals::approval_get(node.store(), request)?
        .is_some_and(|r| approvals::effective_status(&r, now_ms()) == approvals::APPROVED);
    if approved {
        let spend = Ask {
            request_id: request,
            ..ask
        };
        if let Verdict::Cleared(c) = authorize(node, guard, spend).await? {
            return Ok(Hold::Cleared(Box::new(c)));
        }
    }
    Ok(Hold::Held {
        request,
        reason: c.decision().reason.clone(),
    })
}
