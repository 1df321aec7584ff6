//! `custody approvals list|show|approve|deny|cancel`, `custody access request`.

use std::time::Duration;

use clap::Subcommand;

use custody_cli::client::Client;
use custody_proto::cluster::v1::ApprovalRequest;
use custody_proto::export::fmt_time;

use super::edge::parse_duration;

#[derive(Subcommand)]
pub enum ApprovalsCmd {
    /// Requests you made or may review (all of them for admins, auditors and approvers).
    List {
        #[arg(long)]
        pending: bool,
        #[arg(long)]
        json: bool,
    },
    /// One request with its reviews.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request (never your own).
    Approve {
        id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deny a request; final.
    Deny {
        id: u64,
        #[arg(long)]
        reason: String,
    },
    /// Withdraw your own request.
    Cancel { id: u64 },
}

#[derive(Subcommand)]
pub enum AccessCmd {
    /// Ask for a time-boxed grant on a resource whose policy requires approval.
    Request {
        resource: String,
        /// How long the grant lasts once approved: 90s, 30m, 1h, 2d.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

pub fn request_json(r: &ApprovalRequest) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "kind": r.kind, "status": r.status,
        "requester": r.requester_label, "resource": r.resource, "command": r.command,
        "justification": r.justification, "rule": r.rule,
        "approver_groups": r.approver_groups, "required": r.required,
        "approvals": r.reviews.iter().filter(|v| v.approved).count(),
        "created_at": fmt_time(r.created_at_ms), "expires_at": fmt_time(r.expires_at_ms),
        "access_seconds": r.access_ms / 1000,
        "access_until": (r.access_until_ms != 0).then(|| fmt_time(r.access_until_ms)),
        "used_by_session": r.used_by_session,
        "reviews": r.reviews.iter().map(|v| serde_json::json!({
            "reviewer": v.reviewer_label, "approved": v.approved,
            "reason": v.reason, "at": fmt_time(v.at_ms),
        })).collect::<Vec<_>>(),
    })
}

fn what(r: &ApprovalRequest) -> String {
    if r.kind == "access" {
        format!("access to {} for {}s", r.resource, r.access_ms / 1000)
    } else {
        format!("{} on {}", r.command, r.resource)
    }
}

fn print_request(r: &ApprovalRequest) {
    println!("request {}  {}  ({})", r.id, r.status, what(r));
    println!(
        "  requested by {} at {}",
        r.requester_label,
        fmt_time(r.created_at_ms)
    );
    if !r.justification.is_empty() {
        println!("  reason: {}", r.justification);
    }
    println!(
        "  needs {} approval(s) from {:?} (rule {}); expires {}",
        r.required,
        r.approver_groups,
        r.rule,
        fmt_time(r.expires_at_ms)
    );
    for v in &r.reviews {
        println!(
            "  {} {} at {}{}",
            v.reviewer_label,
            if v.approved { "approved" } else { "denied" },
            fmt_time(v.at_ms),
            if v.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", v.reason)
            }
        );
    }
    if r.access_until_ms != 0 {
        println!("  access until {}", fmt_time(r.access_until_ms));
    }
    if !r.used_by_session.is_empty() {
        println!("  used by session {}", r.used_by_session);
    }
}

pub async fn run(cmd: ApprovalsCmd) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    match cmd {
        ApprovalsCmd::List { pending, json } => {
            let list = client.list_approvals(pending).await?;
            if json {
                let v: Vec<_> = list.iter().map(request_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if list.is_empty() {
                println!("no approval requests");
            }
            for r in &list {
                println!(
                    "{:>8}  {:<9}  {}  {}  {}",
                    r.id,
                    r.status,
                    fmt_time(r.created_at_ms),
                    r.requester_label,
                    what(r)
                );
            }
        }
        ApprovalsCmd::Show { id, json } => {
            let r = client.get_approval(id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&request_json(&r))?);
            } else {
                print_request(&r);
            }
        }
        ApprovalsCmd::Approve { id, reason } => {
            let r = client.review_approval(id, true, &reason).await?;
            let n = r.reviews.iter().filter(|v| v.approved).count();
            println!(
                "approved request {id} ({n} of {} approvals; now {})",
                r.required, r.status
            );
        }
        ApprovalsCmd::Deny { id, reason } => {
            client.review_approval(id, false, &reason).await?;
            println!("denied request {id}");
        }
        ApprovalsCmd::Cancel { id } => {
            client.cancel_approval(id).await?;
            println!("cancelled request {id}");
        }
    }
    Ok(())
}

pub async fn access(cmd: AccessCmd) -> anyhow::Result<()> {
    let AccessCmd::Request {
        resource,
        duration,
        reason,
    } = cmd;
    let client = Client::from_env()?;
    let r = client.request_access(&resource, duration, &reason).await?;
    println!("{}", r.id);
    eprintln!(
        "access request {} for {resource} ({}s) is pending; it needs {} approval(s) from {:?}",
        r.id,
        duration.as_secs(),
        r.required,
        r.approver_groups
    );
    Ok(())
}
