//! Opening a session, the same for every front door, once the caller is
//! cleared: open the edge stream (through the node holding the edge's
//! tunnel when need be), spend the approval, start the recorder, record the
//! opening (and the approval and the front door's first events), commit in
//! strict mode, and register the live session. Only then may the front door
//! start the target (send the command, the database login).

use std::net::SocketAddr;

use custody_proto::cluster::v1 as pb;
use custody_proto::evidence::v1 as ev;
use custody_proto::tunnel::v1 as t;

use super::live::{LiveInfo, LiveSession};
use super::session::{approval_event, new_session_id, opened_event};
use super::{Action, EvidenceMode, GatewayError};
use crate::auth::Identity;
use crate::consensus::node::now_ms;
use crate::evidence::SessionRecorder;
use crate::policy::ResourceInfo;
use crate::state::{approvals, edges, Command};
use crate::storage::Engine;
use crate::tunnel::{Routed, Tunnels};

/// How an approval lets a session open.
pub enum ApprovalUse {
    /// An approved command approval, spent once the edge stream is open.
    Spend {
        request: u64,
        command_sha256: Vec<u8>,
    },
    /// An access grant in force (the session ends when it does).
    Grant(Box<pb::ApprovalRequest>),
}

/// What the front door adds to a cleared caller to open its session.
pub struct Opening {
    /// When the caller's token expires (seconds since the epoch).
    pub token_expires_at: u64,
    pub client_addr: Option<SocketAddr>,
    /// The front door: `exec`, `postgres`.
    pub via: &'static str,
    /// The session's command as its summary shows it.
    pub command: String,
    /// The command policy re-judges while the session lives (none for a
    /// database session, whose statements are judged one by one).
    pub judged_command: Option<String>,
    /// Recorded after the opening and the approval, before a strict commit.
    pub first_events: Vec<ev::event::Kind>,
}

/// An open session: nothing has started on the target yet.
pub struct Opened {
    pub session_id: String,
    pub routed: Routed,
    pub rec: SessionRecorder,
    pub live: LiveSession,
    pub mode: EvidenceMode,
    /// The approval it opened under (spent, or the grant).
    pub approval: Option<pb::ApprovalRequest>,
}

impl Opened {
    /// The access grant the session runs under (its id, and when it ends in
    /// ms), which ends the session when it does.
    pub fn grant_until(&self) -> Option<(u64, u64)> {
        self.approval
            .as_ref()
            .filter(|a| a.kind == "access")
            .map(|a| (a.id, a.access_until_ms))
    }
}

/// Opens the session the gateway cleared. Errors leave nothing running:
/// the edge stream is abandoned (the edge starts nothing before the front
/// door's first frame), and a recorder that started is closed with the
/// reason.
pub async fn open<E: Engine>(
    tunnels: &Tunnels<E>,
    cleared: super::authorize::Cleared,
    how: Opening,
) -> Result<Opened, GatewayError> {
    let super::authorize::Cleared {
        identity,
        action,
        resource,
        candidates,
        decision,
        approval: approval_use,
        ..
    } = cleared;
    let node = &tunnels.node;
    let session_id = new_session_id();
    let request = t::SessionOpen {
        session_id: session_id.clone(),
        resource: resource.name.clone(),
        identity: identity.principal(),
    };
    let routed = super::route::open_session(tunnels, &resource.name, &candidates, request)
        .await
        .map_err(|e| GatewayError::NoEdge(e.to_string()))?;
    let approval = match approval_use {
        None => None,
        Some(ApprovalUse::Grant(g)) => Some(*g),
        Some(ApprovalUse::Spend {
            request,
            command_sha256,
        }) => Some(
            spend(
                tunnels,
                &identity,
                &resource,
                action,
                &session_id,
                request,
                command_sha256,
            )
            .await?,
        ),
    };
    let mode = EvidenceMode::of(&resource.labels);
    let summary = pb::SessionSummary {
        session_id: session_id.clone(),
        opened_at_ms: now_ms(),
        issuer: identity.issuer.clone(),
        subject: identity.subject.clone(),
        email: identity.email.clone().unwrap_or_default(),
        client_kind: identity.client_kind.as_str().into(),
        resource: resource.name.clone(),
        resource_kind: resource.kind.clone(),
        edge: routed.edge.name.clone(),
        edge_region: routed.edge.region.clone(),
        node_region: tunnels.region.clone(),
        node_id: node.id(),
        command: how.command.clone(),
        mode: mode.as_str().into(),
        via: how.via.into(),
        actor: identity.actor.clone().unwrap_or_default(),
    };
    let rec = SessionRecorder::start(node.clone(), summary);
    tunnels.stats.session_opened(how.via, mode.as_str());
    let live = tunnels.live.register(LiveInfo {
        session_id: session_id.clone(),
        identity: identity.clone(),
        resource: resource.clone(),
        via: how.via,
        action,
        command: how.judged_command.clone(),
        opened_at_ms: now_ms(),
        token_expires_at: how.token_expires_at,
        approved: approval.is_some(),
    });
    let opened = opened_event(
        &identity,
        how.client_addr,
        &resource,
        &routed,
        &tunnels.region,
        decision.effect.as_str(),
        &decision.by.label(),
        mode.as_str(),
    );
    let recorded = async {
        rec.record(opened).await?;
        if let Some(r) = &approval {
            rec.record(approval_event(r)).await?;
        }
        for e in how.first_events {
            rec.record(e).await?;
        }
        if mode == EvidenceMode::Strict {
            rec.commit().await?;
        }
        Ok::<_, crate::evidence::RecordError>(())
    }
    .await;
    if let Err(e) = recorded {
        tracing::warn!(target: "audit", event = "session_refused", session = %session_id, reason = %e);
        let _ = rec
            .close(pb::SessionEnd {
                closed_at_ms: now_ms(),
                exit_code: -1,
                signal: 0,
                reason: format!("{e}; nothing was run"),
            })
            .await;
        return Err(GatewayError::Unavailable(format!("{e}; nothing was run")));
    }
    Ok(Opened {
        session_id,
        routed,
        rec,
        live,
        mode,
        approval,
    })
}

/// Spends an approved command approval on this session.
async fn spend<E: Engine>(
    tunnels: &Tunnels<E>,
    identity: &Identity,
    resource: &ResourceInfo,
    action: Action,
    session_id: &str,
    request: u64,
    command_sha256: Vec<u8>,
) -> Result<pb::ApprovalRequest, GatewayError> {
    let node = &tunnels.node;
    if let Some(r) = approvals::approval_get(node.store(), request)? {
        approvals::covers(&r, action).map_err(GatewayError::Precondition)?;
    }
    let spent = node
        .propose_retrying(
            Command::Approval(Box::new(approvals::ApprovalCommand::Use(pb::UseApproval {
                id: request,
                requester: identity.principal(),
                resource: resource.name.clone(),
                command_sha256: command_sha256.into(),
                session_id: session_id.to_owned(),
            }))),
            None,
        )
        .await?;
    if let Some(why) = spent.rejected {
        return Err(if why.starts_with("no approval request") {
            GatewayError::NotFound(why)
        } else {
            GatewayError::Precondition(why)
        });
    }
    let r = approvals::approval_get(node.store(), request)?.ok_or_else(|| {
        GatewayError::Storage(crate::storage::StorageError::Corrupt {
            what: "approval request",
            detail: format!("request {request} vanished after it was spent"),
        })
    })?;
    tracing::info!(target: "audit", event = "approval_used", request, session = %session_id);
    Ok(r)
}

/// A stream to a resource's edge for the gateway's own use (the PostgreSQL
/// gateway's catalog lookups): no caller, so no recorder; `purpose` names it
/// to the edge.
pub async fn service_stream<E: Engine>(
    tunnels: &Tunnels<E>,
    resource: &str,
    candidates: &[edges::Edge],
    session_id: String,
    purpose: &str,
) -> Result<crate::tunnel::SessionChannel, GatewayError> {
    let request = t::SessionOpen {
        session_id,
        resource: resource.to_owned(),
        identity: format!("custody gateway ({purpose})"),
    };
    super::route::open_session(tunnels, resource, candidates, request)
        .await
        .map(|r| r.channel)
        .map_err(|e| GatewayError::NoEdge(e.to_string()))
}
