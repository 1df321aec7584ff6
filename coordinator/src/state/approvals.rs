//! Just-in-time approval requests in replicated state.
//!
//! Keys:
//! - `ap/r/<id:020>`: a [`pb::ApprovalRequest`] (id = the creating entry's index);
//! - `ap/a/<resource>|<requester>|<id:020>`: access-grant index (empty values).
//!
//! Every rule that must not bend is decided here, at apply, against the
//! proposal's timestamp: no self-review, reviewers from the approver groups
//! only, no machine reviewers, one review per reviewer, final denials and
//! expiries, and a command approval spent exactly once on the exact command
//! and resource it names.

use prost::Message as _;

use custody_proto::cluster::v1 as pb;

use super::{ApplyOutcome, StateTxn};
use crate::storage::{Engine, RaftStore, StorageError};

const REQUEST_PREFIX: &str = "ap/r/";
const ACCESS_PREFIX: &str = "ap/a/";

/// Longest access window one request may ask for.
pub const MAX_ACCESS_MS: u64 = 30 * 86_400_000;
const MAX_TEXT: usize = 4096;

pub const PENDING: &str = "pending";
pub const APPROVED: &str = "approved";
pub const DENIED: &str = "denied";
pub const EXPIRED: &str = "expired";
pub const USED: &str = "used";
pub const CANCELLED: &str = "cancelled";

/// Approval commands.
#[derive(Debug, Clone, PartialEq)]
pub enum ApprovalCommand {
    Create(Box<pb::ApprovalRequest>),
    Review(pb::ReviewApproval),
    Use(pb::UseApproval),
    Cancel(pb::CancelApproval),
}

impl Eq for ApprovalCommand {}

impl ApprovalCommand {
    pub fn to_pb(&self) -> pb::command::Kind {
        use pb::command::Kind;
        match self {
            ApprovalCommand::Create(r) => Kind::CreateApproval(pb::CreateApproval {
                request: Some((**r).clone()),
            }),
            ApprovalCommand::Review(r) => Kind::ReviewApproval(r.clone()),
            ApprovalCommand::Use(u) => Kind::UseApproval(u.clone()),
            ApprovalCommand::Cancel(c) => Kind::CancelApproval(c.clone()),
        }
    }
}

fn request_key(id: u64) -> Vec<u8> {
    format!("{REQUEST_PREFIX}{id:020}").into_bytes()
}

fn access_prefix(resource: &str, requester: &str) -> String {
    format!("{ACCESS_PREFIX}{resource}|{requester}|")
}

fn decode(b: &[u8]) -> Result<pb::ApprovalRequest, StorageError> {
    pb::ApprovalRequest::decode(b).map_err(|e| StorageError::Corrupt {
        what: "approval request",
        detail: e.to_string(),
    })
}

fn rejected(index: u64, why: impl Into<String>) -> ApplyOutcome {
    ApplyOutcome {
        rejected: Some(why.into()),
        ..ApplyOutcome::at(index)
    }
}

fn accepted(index: u64, id: u64) -> ApplyOutcome {
    ApplyOutcome {
        value: id,
        ..ApplyOutcome::at(index)
    }
}

/// Number of approving reviews.
pub fn approvals(r: &pb::ApprovalRequest) -> u32 {
    r.reviews.iter().filter(|v| v.approved).count() as u32
}

/// The status as of `now`: pending requests and unused approvals past their
/// deadline, and access grants past their window, are expired.
pub fn effective_status(r: &pb::ApprovalRequest, now_ms: u64) -> &str {
    match r.status.as_str() {
        PENDING if now_ms >= r.expires_at_ms => EXPIRED,
        APPROVED if r.kind == "command" && now_ms >= r.expires_at_ms => EXPIRED,
        APPROVED if r.kind == "access" && now_ms >= r.access_until_ms => EXPIRED,
        s => s,
    }
}

/// A copy with the effective status filled in, for readers.
pub fn with_effective_status(mut r: pb::ApprovalRequest, now_ms: u64) -> pb::ApprovalRequest {
    r.status = effective_status(&r, now_ms).to_owned();
    r
}

/// Why a new request is malformed, if it is.
/// Refuses an approval that names another action than the one it is spent
/// on (requests made before approvals named an action cover any).
pub fn covers(r: &pb::ApprovalRequest, action: crate::gateway::Action) -> Result<(), String> {
    if r.action.is_empty() || r.action == action.as_str() {
        Ok(())
    } else {
        Err(format!(
            "approval request {} covers {}, not {action}",
            r.id, r.action
        ))
    }
}

pub fn check_new(r: &pb::ApprovalRequest) -> Result<(), String> {
    if r.resource.is_empty() || r.resource.contains('|') {
        return Err("an approval request names a resource".into());
    }
    if r.requester.is_empty() {
        return Err("an approval request needs a requester".into());
    }
    if r.approver_groups.is_empty() || !(1..=10).contains(&r.required) {
        return Err("an approval request needs approver groups and a count in 1..=10".into());
    }
    if r.justification.len() > MAX_TEXT || r.command.len() > 64 * 1024 {
        return Err("approval request text is too long".into());
    }
    if r.timeout_ms == 0 {
        return Err("an approval request needs a timeout".into());
    }
    match r.kind.as_str() {
        "command" if !r.command.is_empty() && r.command_sha256.len() == 32 => Ok(()),
        "command" => Err("a command approval names the exact command".into()),
        "access" if (1..=MAX_ACCESS_MS).contains(&r.access_ms) => Ok(()),
        "access" => Err(format!(
            "an access window must be between 1 ms and {} days",
            MAX_ACCESS_MS / 86_400_000
        )),
        k => Err(format!("unknown approval kind {k:?}")),
    }
}

pub(super) fn apply<E: Engine>(
    txn: &mut StateTxn<E>,
    index: u64,
    now_ms: u64,
    cmd: &ApprovalCommand,
) -> Result<ApplyOutcome, StorageError> {
    if let ApprovalCommand::Create(r) = cmd {
        if let Err(why) = check_new(r) {
            return Ok(rejected(index, why));
        }
        let req = pb::ApprovalRequest {
            id: index,
            status: PENDING.into(),
            reviews: vec![],
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(r.timeout_ms),
            access_until_ms: 0,
            used_by_session: String::new(),
            decided_at_ms: 0,
            ..(**r).clone()
        };
        if req.kind == "access" {
            let k = format!(
                "{}{index:020}",
                access_prefix(&req.resource, &req.requester)
            );
            txn.put(k.into_bytes(), Vec::new());
        }
        txn.put(request_key(index), req.encode_to_vec());
        return Ok(accepted(index, index));
    }
    let id = match cmd {
        ApprovalCommand::Review(r) => r.id,
        ApprovalCommand::Use(u) => u.id,
        ApprovalCommand::Cancel(c) => c.id,
        ApprovalCommand::Create(_) => unreachable!("handled above"),
    };
    let Some(b) = txn.get(&request_key(id))? else {
        return Ok(rejected(index, format!("no approval request {id}")));
    };
    let mut req = decode(&b)?;
    // Expiry is final: record it the first time anyone acts after it.
    if req.status != EXPIRED && effective_status(&req, now_ms) == EXPIRED {
        req.status = EXPIRED.into();
        txn.put(request_key(id), req.encode_to_vec());
    }
    let outcome = match cmd {
        ApprovalCommand::Review(r) => review(&mut req, now_ms, r),
        ApprovalCommand::Use(u) => use_approval(&mut req, u),
        ApprovalCommand::Cancel(c) => cancel(&mut req, now_ms, c),
        ApprovalCommand::Create(_) => unreachable!("handled above"),
    };
    Ok(match outcome {
        Ok(()) => {
            txn.put(request_key(id), req.encode_to_vec());
            accepted(index, id)
        }
        Err(why) => rejected(index, why),
    })
}

fn not_open(req: &pb::ApprovalRequest) -> String {
    format!("request {} is {}; that is final", req.id, req.status)
}

fn review(
    req: &mut pb::ApprovalRequest,
    now_ms: u64,
    r: &pb::ReviewApproval,
) -> Result<(), String> {
    if req.status != PENDING {
        return Err(match req.status.as_str() {
            APPROVED | USED => format!("request {} is already approved", req.id),
            _ => not_open(req),
        });
    }
    if r.reviewer == req.requester {
        return Err(format!(
            "{} cannot review their own request {}",
            r.reviewer_label, req.id
        ));
    }
    if r.reviewer_is_machine {
        return Err("machine identities cannot review approval requests".into());
    }
    if !req
        .approver_groups
        .iter()
        .any(|g| r.reviewer_groups.contains(g))
    {
        return Err(format!(
            "{} is in none of the approver groups {:?} of request {}",
            r.reviewer_label, req.approver_groups, req.id
        ));
    }
    if req.reviews.iter().any(|v| v.reviewer == r.reviewer) {
        return Err(format!(
            "{} already reviewed request {}",
            r.reviewer_label, req.id
        ));
    }
    let reason = r.reason.trim();
    if reason.len() > MAX_TEXT {
        return Err("the reason is too long".into());
    }
    if !r.approve && reason.is_empty() {
        return Err("a denial needs a reason".into());
    }
    if r.approve && req.require_reason && reason.is_empty() {
        return Err("policy requires a reason to approve this request".into());
    }
    req.reviews.push(pb::ApprovalReview {
        reviewer: r.reviewer.clone(),
        reviewer_label: r.reviewer_label.clone(),
        approved: r.approve,
        reason: reason.to_owned(),
        at_ms: now_ms,
    });
    if !r.approve {
        req.status = DENIED.into();
        req.decided_at_ms = now_ms;
    } else if approvals(req) >= req.required {
        req.status = APPROVED.into();
        req.decided_at_ms = now_ms;
        if req.kind == "access" {
            req.access_until_ms = now_ms.saturating_add(req.access_ms);
        } else {
            req.expires_at_ms = now_ms.saturating_add(req.timeout_ms);
        }
    }
    Ok(())
}

fn use_approval(req: &mut pb::ApprovalRequest, u: &pb::UseApproval) -> Result<(), String> {
    if req.kind != "command" {
        return Err(format!(
            "request {} is an access grant; it applies by itself while active",
            req.id
        ));
    }
    if u.requester != req.requester {
        return Err(format!("request {} was made by someone else", req.id));
    }
    if u.resource != req.resource {
        return Err(format!(
            "request {} is for resource {}, not {}",
            req.id, req.resource, u.resource
        ));
    }
    if u.command_sha256 != req.command_sha256 {
        return Err(format!(
            "request {} approved a different command: {}",
            req.id, req.command
        ));
    }
    match req.status.as_str() {
        APPROVED => {
            req.status = USED.into();
            req.used_by_session = u.session_id.clone();
            Ok(())
        }
        PENDING => Err(format!(
            "request {} is still pending ({} of {} approvals)",
            req.id,
            approvals(req),
            req.required
        )),
        USED => Err(format!(
            "request {} was already used by session {}; run the command again to ask anew",
            req.id, req.used_by_session
        )),
        _ => Err(not_open(req)),
    }
}

fn cancel(
    req: &mut pb::ApprovalRequest,
    now_ms: u64,
    c: &pb::CancelApproval,
) -> Result<(), String> {
    if c.by != req.requester {
        return Err(format!("only the requester can cancel request {}", req.id));
    }
    if !(req.status == PENDING || req.status == APPROVED) {
        return Err(not_open(req));
    }
    req.status = CANCELLED.into();
    req.decided_at_ms = now_ms;
    if req.kind == "access" {
        req.access_until_ms = req.access_until_ms.min(now_ms);
    }
    Ok(())
}

pub fn approval_get<E: Engine>(
    store: &RaftStore<E>,
    id: u64,
) -> Result<Option<pb::ApprovalRequest>, StorageError> {
    store
        .state_get(&request_key(id))?
        .map(|b| decode(&b))
        .transpose()
}

/// Requests, newest first, at most `limit` (0: all).
pub fn approvals_list<E: Engine>(
    store: &RaftStore<E>,
    limit: usize,
    keep: impl Fn(&pb::ApprovalRequest) -> bool,
) -> Result<Vec<pb::ApprovalRequest>, StorageError> {
    let limit = if limit == 0 { usize::MAX } else { limit };
    let all = store.state_scan(REQUEST_PREFIX.as_bytes(), None, usize::MAX)?;
    let mut out = Vec::new();
    for (_, v) in all.into_iter().rev() {
        let r = decode(&v)?;
        if keep(&r) {
            out.push(r);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// The requester's active access grant on a resource, if any.
pub fn active_grant<E: Engine>(
    store: &RaftStore<E>,
    resource: &str,
    requester: &str,
    now_ms: u64,
) -> Result<Option<pb::ApprovalRequest>, StorageError> {
    let prefix = access_prefix(resource, requester);
    for (k, _) in store
        .state_scan(prefix.as_bytes(), None, usize::MAX)?
        .into_iter()
        .rev()
    {
        let key = String::from_utf8_lossy(&k);
        let Some(id) = key.rsplit('|').next().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(r) = approval_get(store, id)? {
            if effective_status(&r, now_ms) == APPROVED {
                return Ok(Some(r));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use crate::storage::MemEngine;

    fn run(s: &RaftStore<MemEngine>, index: u64, now: u64, c: ApprovalCommand) -> ApplyOutcome {
        crate::state::apply_for_test(s, index, now, Command::Approval(Box::new(c)))
    }

    fn new_command(required: u32) -> ApprovalCommand {
        ApprovalCommand::Create(Box::new(pb::ApprovalRequest {
            requester: "iss alice".into(),
            requester_label: "alice".into(),
            resource: "db".into(),
            kind: "command".into(),
            command: "rm -rf /tmp/x".into(),
            command_sha256: vec![7; 32].into(),
            approver_groups: vec!["approvers".into(), "engineers".into()],
            required,
            timeout_ms: 1000,
            rule: "r".into(),
            ..Default::default()
        }))
    }

    fn review(id: u64, who: &str, groups: &[&str], approve: bool, reason: &str) -> ApprovalCommand {
        ApprovalCommand::Review(pb::ReviewApproval {
            id,
            reviewer: format!("iss {who}"),
            reviewer_label: who.into(),
            reviewer_groups: groups.iter().map(|g| g.to_string()).collect(),
            reviewer_is_machine: who == "agent",
            approve,
            reason: reason.into(),
        })
    }

    fn use_it(id: u64, digest: [u8; 32]) -> ApprovalCommand {
        ApprovalCommand::Use(pb::UseApproval {
            id,
            requester: "iss alice".into(),
            resource: "db".into(),
            command_sha256: digest.to_vec().into(),
            session_id: "s1".into(),
        })
    }

    fn why(o: ApplyOutcome) -> String {
        o.rejected.unwrap_or_default()
    }

    #[test]
    fn command_approval_rules_hold() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        assert_eq!(run(&s, 2, 0, new_command(2)).value, 2);
        // Nobody approves their own request, machines never review, and only
        // the approver groups count.
        assert!(
            why(run(&s, 3, 1, review(2, "alice", &["approvers"], true, "")))
                .contains("own request")
        );
        assert!(
            why(run(&s, 4, 1, review(2, "agent", &["approvers"], true, ""))).contains("machine")
        );
        assert!(why(run(&s, 5, 1, review(2, "eve", &["other"], true, "")))
            .contains("none of the approver groups"));
        assert!(why(run(&s, 6, 1, use_it(2, [7; 32]))).contains("still pending (0 of 2"));
        assert!(run(&s, 7, 1, review(2, "bob", &["approvers"], true, ""))
            .rejected
            .is_none());
        assert!(
            why(run(&s, 8, 1, review(2, "bob", &["approvers"], true, "")))
                .contains("already reviewed")
        );
        assert!(why(run(&s, 9, 1, use_it(2, [7; 32]))).contains("1 of 2"));
        assert!(run(&s, 10, 1, review(2, "carol", &["approvers"], true, ""))
            .rejected
            .is_none());
        let r = approval_get(&s, 2).unwrap().unwrap();
        assert_eq!((r.status.as_str(), r.expires_at_ms), (APPROVED, 1001));
        // Exactly that command, exactly once.
        assert!(why(run(&s, 11, 2, use_it(2, [8; 32]))).contains("different command"));
        assert!(run(&s, 12, 2, use_it(2, [7; 32])).rejected.is_none());
        assert!(why(run(&s, 13, 2, use_it(2, [7; 32]))).contains("already used"));
        assert!(why(run(
            &s,
            14,
            2,
            review(2, "dave", &["approvers"], false, "no")
        ))
        .contains("already approved"));
        assert!(
            why(run(&s, 15, 2, review(99, "bob", &["approvers"], true, "")))
                .contains("no approval request 99")
        );
    }

    #[test]
    fn denials_and_expiry_are_final() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        run(&s, 2, 0, new_command(1));
        assert!(
            why(run(&s, 3, 1, review(2, "bob", &["approvers"], false, " ")))
                .contains("needs a reason")
        );
        assert!(run(
            &s,
            4,
            1,
            review(2, "bob", &["approvers"], false, "not today")
        )
        .rejected
        .is_none());
        assert!(
            why(run(&s, 5, 1, review(2, "carol", &["approvers"], true, ""))).contains("denied")
        );
        assert!(why(run(&s, 6, 1, use_it(2, [7; 32]))).contains("denied"));
        // A request nobody reviewed in time expires, and stays expired.
        run(&s, 7, 0, new_command(1));
        assert!(
            why(run(&s, 8, 1000, review(7, "bob", &["approvers"], true, ""))).contains("expired")
        );
        assert_eq!(approval_get(&s, 7).unwrap().unwrap().status, EXPIRED);
        // An approval unused past its deadline expires too.
        run(&s, 9, 0, new_command(1));
        run(&s, 10, 100, review(9, "bob", &["approvers"], true, ""));
        assert!(why(run(&s, 11, 1100, use_it(9, [7; 32]))).contains("expired"));
        // Only the requester cancels.
        run(&s, 12, 0, new_command(1));
        let cancel = |by: &str| {
            ApprovalCommand::Cancel(pb::CancelApproval {
                id: 12,
                by: by.into(),
            })
        };
        assert!(why(run(&s, 13, 1, cancel("iss bob"))).contains("only the requester"));
        assert!(run(&s, 14, 1, cancel("iss alice")).rejected.is_none());
        assert!(
            why(run(&s, 15, 1, review(12, "bob", &["approvers"], true, ""))).contains("cancelled")
        );
    }

    #[test]
    fn access_grants_last_their_window() {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        let mut req = match new_command(1) {
            ApprovalCommand::Create(r) => *r,
            _ => unreachable!(),
        };
        req.kind = "access".into();
        req.access_ms = 0;
        assert!(why(run(
            &s,
            2,
            0,
            ApprovalCommand::Create(Box::new(req.clone()))
        ))
        .contains("access window"));
        req.access_ms = 2000;
        run(&s, 3, 0, ApprovalCommand::Create(Box::new(req)));
        assert_eq!(active_grant(&s, "db", "iss alice", 10).unwrap(), None);
        run(&s, 4, 10, review(3, "bob", &["approvers"], true, ""));
        let g = active_grant(&s, "db", "iss alice", 11).unwrap().unwrap();
        assert_eq!(g.access_until_ms, 2010);
        assert_eq!(active_grant(&s, "db", "iss bob", 11).unwrap(), None);
        assert_eq!(active_grant(&s, "db", "iss alice", 2010).unwrap(), None);
        assert!(why(run(&s, 5, 20, use_it(3, [7; 32]))).contains("access grant"));
    }
}
