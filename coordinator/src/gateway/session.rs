//! What every front door records the same way: session ids, the opening
//! and approval events, command digests, and approval requests.

use custody_proto::cluster::v1 as pb;
use custody_proto::evidence::v1 as ev;
use custody_proto::export::hex;

use super::GatewayError;
use crate::policy::ResourceInfo;
use crate::state::{approvals, Command};
use crate::storage::Engine;

pub fn new_session_id() -> String {
    hex(&rand::random::<[u8; 16]>())
}

/// SHA-256 of a command line, as approvals store and compare it.
pub fn command_digest(command: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(command.as_bytes()).into()
}

/// The `session_opened` event.
#[allow(clippy::too_many_arguments)]
pub fn opened_event(
    id: &crate::auth::Identity,
    client_addr: Option<std::net::SocketAddr>,
    resource: &ResourceInfo,
    routed: &crate::tunnel::Routed,
    node_region: &str,
    decision: &str,
    rule: &str,
    mode: &str,
) -> ev::event::Kind {
    ev::event::Kind::Opened(ev::SessionOpened {
        identity: Some(ev::Identity {
            issuer: id.issuer.clone(),
            subject: id.subject.clone(),
            email: id.email.clone().unwrap_or_default(),
            name: id.name.clone().unwrap_or_default(),
            groups: id.groups.clone(),
            client_kind: id.client_kind.as_str().into(),
            client_id: id.client_id.clone().unwrap_or_default(),
            actor: id.actor.clone().unwrap_or_default(),
        }),
        client_addr: client_addr.map(|a| a.to_string()).unwrap_or_default(),
        resource: resource.name.clone(),
        resource_kind: resource.kind.clone(),
        labels: resource.labels.clone().into_iter().collect(),
        edge: routed.edge.name.clone(),
        edge_id: routed.edge.id,
        edge_region: routed.edge.region.clone(),
        node_region: node_region.to_owned(),
        decision: decision.to_owned(),
        rule: rule.to_owned(),
        mode: mode.to_owned(),
    })
}

/// The evidence event for an approval a session ran under.
pub fn approval_event(r: &pb::ApprovalRequest) -> ev::event::Kind {
    ev::event::Kind::Approval(ev::ApprovalRef {
        request_id: r.id.to_string(),
        kind: r.kind.clone(),
        requester: r.requester_label.clone(),
        rule: r.rule.clone(),
        justification: r.justification.clone(),
        created_at_ms: r.created_at_ms,
        decided_at_ms: r.decided_at_ms,
        reviews: r
            .reviews
            .iter()
            .map(|v| ev::ApprovalDecision {
                reviewer: v.reviewer_label.clone(),
                approved: v.approved,
                reason: v.reason.clone(),
                at_ms: v.at_ms,
            })
            .collect(),
        access_until_ms: r.access_until_ms,
    })
}

/// Proposes a new approval request and returns it as stored.
pub async fn create_request<E: Engine>(
    node: &crate::consensus::NodeHandle<E>,
    mut req: pb::ApprovalRequest,
) -> Result<pb::ApprovalRequest, GatewayError> {
    approvals::check_new(&req).map_err(GatewayError::Invalid)?;
    // Nodes before state version 3 do not keep an approval's action.
    if crate::state::cluster_version(node.store())? < 3 {
        req.action.clear();
    }
    let out = node
        .propose_retrying(
            Command::Approval(Box::new(approvals::ApprovalCommand::Create(Box::new(req)))),
            None,
        )
        .await?;
    if let Some(why) = out.rejected {
        return Err(GatewayError::Invalid(why));
    }
    approvals::approval_get(node.store(), out.value)?.ok_or_else(|| {
        GatewayError::Storage(crate::storage::StorageError::Corrupt {
            what: "approval request",
            detail: format!("request {} vanished after it was created", out.value),
        })
    })
}

/// A command held for approval, as approvers are asked about it.
pub struct HeldCommand<'a> {
    pub identity: &'a crate::auth::Identity,
    pub resource: &'a str,
    pub action: super::Action,
    /// The command as approvers see it (masked where the front door masks).
    pub shown: String,
    /// The digest of the command as it will run.
    pub digest: [u8; 32],
    pub rule: String,
    pub doc: &'a crate::policy::ApprovalDoc,
    /// The front door, for the audit log.
    pub via: &'static str,
    /// Why the caller asks (recorded on a new request).
    pub justification: String,
}

/// The request that approves this exact command: one the caller already
/// made that is pending or approved and unused (a client that did not wait,
/// a reconnect), or a new one, announced to the approvers.
pub async fn command_request<E: Engine>(
    node: &crate::consensus::NodeHandle<E>,
    notifier: &crate::notify::Notifier,
    held: HeldCommand<'_>,
) -> Result<u64, String> {
    use approvals::{approvals_list, effective_status};
    let principal = held.identity.principal();
    let now = crate::consensus::node::now_ms();
    let existing = approvals_list(node.store(), 1, |r| {
        r.kind == "command"
            && r.requester == principal
            && r.resource == held.resource
            && r.command_sha256[..] == held.digest[..]
            && matches!(
                effective_status(r, now),
                approvals::PENDING | approvals::APPROVED
            )
    })
    .map_err(|e| format!("cannot read approval requests: {e}"))?
    .pop();
    if let Some(r) = existing {
        return Ok(r.id);
    }
    let doc = held.doc;
    let req = pb::ApprovalRequest {
        requester: principal,
        requester_label: held.identity.label().to_owned(),
        resource: held.resource.to_owned(),
        kind: "command".into(),
        action: held.action.as_str().into(),
        command: held.shown,
        command_sha256: held.digest.to_vec().into(),
        justification: held.justification,
        approver_groups: doc.groups.clone(),
        required: doc.count,
        require_reason: doc.require_reason,
        rule: held.rule,
        timeout_ms: doc.timeout_ms(),
        webhook: doc.webhook.clone().unwrap_or_default(),
        ..Default::default()
    };
    let created = create_request(node, req)
        .await
        .map_err(|e| format!("cannot create an approval request: {e}"))?;
    tracing::warn!(target: "audit", event = "approval_requested", request = created.id, subject = %held.identity.subject, resource = %held.resource, via = held.via, "command held for approval");
    notifier.approval("approval_requested", &created);
    Ok(created.id)
}
