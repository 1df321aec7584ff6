//! Judging one command inside an open session (a SQL statement now; a later
//! SSH exec request, a Kubernetes API request, an MCP tool call next), the
//! same for every front door: the current policy's decision for the
//! session's identity and resource, with the action and the command, read
//! against what the session started with.

use std::sync::Arc;

use super::{Action, GatewayError};
use crate::auth::Identity;
use crate::consensus::node::now_ms;
use crate::policy::sql::Dialect;
use crate::policy::{Decision, Effect, Policy, Request, ResourceInfo};
use crate::state::approvals;
use crate::storage::Engine;
use crate::storage::RaftStore;

/// What an open session stands on: who, what, and the policy and masking
/// profiles it started with.
pub struct Standing<'a> {
    pub identity: &'a Identity,
    pub resource: &'a ResourceInfo,
    pub started: &'a Arc<Policy>,
    pub mask: &'a [String],
}

/// A command's ruling, short of a refusal.
pub enum Ruling {
    /// It may run.
    Runs,
    /// A guardrail holds it for a command approval; the decision says who
    /// approves.
    Held(Box<Decision>),
}

/// Judges `command` (with `action`) in a session standing on `s`, with
/// `policy`, the policy in force now. Refused: denied by a rule or a
/// guardrail, masked otherwise than the session (the policy changed), or
/// run under an access grant that is no longer in force.
pub fn judge<E: Engine>(
    store: &RaftStore<E>,
    policy: &Arc<Policy>,
    s: &Standing<'_>,
    action: Action,
    command: Option<&str>,
    dialect: Dialect,
) -> Result<Ruling, GatewayError> {
    let d = policy.evaluate(&Request {
        identity: s.identity,
        resource: s.resource,
        action,
        command,
        dialect,
    });
    let subject = &s.identity.subject;
    let resource = &s.resource.name;
    // Output is masked by the profiles the session started with: a command
    // the policy now masks otherwise (the policy changed, or a rule for this
    // command names other profiles) does not run.
    if d.effect != Effect::Deny
        && !(Arc::ptr_eq(policy, s.started) && d.mask == s.mask)
        && policy.masking_docs(&d.mask) != s.started.masking_docs(s.mask)
    {
        tracing::warn!(target: "audit", event = "statement_denied", %subject, %resource, %action, "command refused: masking changed");
        return Err(GatewayError::Denied("the masking that applies to this statement differs from the one this session started with (the policy changed); reconnect".into()));
    }
    match d.effect {
        Effect::Allow => Ok(Ruling::Runs),
        Effect::Deny => {
            tracing::warn!(target: "audit", event = "statement_denied", %subject, %resource, %action, rule = %d.by.label(), "command refused");
            Err(GatewayError::Denied(d.reason))
        }
        // The session itself was approved through an access grant, which
        // must still be in force (it may have been cancelled); only
        // guardrails hold single commands.
        Effect::RequireApproval if !d.by.is_guardrail() => {
            match approvals::active_grant(store, resource, &s.identity.principal(), now_ms()) {
                Ok(Some(_)) => Ok(Ruling::Runs),
                Ok(None) => Err(GatewayError::Denied(format!(
                    "{}: no access grant is in force any more (`custody access request {resource}`)",
                    d.reason
                ))),
                Err(e) => Err(GatewayError::Unavailable(format!(
                    "cannot read access grants: {e}"
                ))),
            }
        }
        Effect::RequireApproval => Ok(Ruling::Held(Box::new(d))),
    }
}
