//! `custody evidence purge`, `custody evidence hold add|list|release`.

use clap::Subcommand;

use custody_cli::client::Client;
use custody_proto::export::fmt_time;
use custody_proto::v1 as api;

#[derive(Subcommand)]
pub enum EvidenceCmd {
    /// Apply the policy's retention rules now (admins). The leader also does
    /// this every `[evidence] retention_sweep_secs`.
    Purge,
    /// Legal holds: held sessions are never purged (admins and auditors).
    #[command(subcommand)]
    Hold(HoldCmd),
}

#[derive(Subcommand)]
pub enum HoldCmd {
    /// Place a hold on a session, a resource (`*` wildcards) or an identity.
    Add {
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        resource: Option<String>,
        /// A subject or email.
        #[arg(long)]
        identity: Option<String>,
        #[arg(long)]
        reason: String,
    },
    /// List active holds (`--all` includes released ones).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Release a hold; its sessions become subject to retention again.
    Release {
        id: u64,
        #[arg(long)]
        reason: String,
    },
}

fn hold_json(h: &custody_proto::cluster::v1::LegalHold) -> serde_json::Value {
    serde_json::json!({
        "id": h.id, "reason": h.reason, "created_by": h.created_by,
        "created_at": fmt_time(h.created_at_ms), "session_id": h.session_id,
        "resource": h.resource, "identity": h.subject,
        "released_at": (h.released_at_ms != 0).then(|| fmt_time(h.released_at_ms)),
        "released_by": h.released_by, "release_reason": h.release_reason,
    })
}

fn scope(h: &custody_proto::cluster::v1::LegalHold) -> String {
    let mut parts = Vec::new();
    if !h.session_id.is_empty() {
        parts.push(format!("session={}", h.session_id));
    }
    if !h.resource.is_empty() {
        parts.push(format!("resource={}", h.resource));
    }
    if !h.subject.is_empty() {
        parts.push(format!("identity={}", h.subject));
    }
    parts.join(" ")
}

pub async fn run(cmd: EvidenceCmd) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    match cmd {
        EvidenceCmd::Purge => {
            let n = client.purge_evidence().await?;
            println!("purged the evidence of {n} sessions");
        }
        EvidenceCmd::Hold(HoldCmd::Add {
            session,
            resource,
            identity,
            reason,
        }) => {
            let h = client
                .set_hold(api::SetHoldRequest {
                    reason,
                    session_id: session.unwrap_or_default(),
                    resource: resource.unwrap_or_default(),
                    subject: identity.unwrap_or_default(),
                })
                .await?;
            println!("legal hold {} placed on {}", h.id, scope(&h));
        }
        EvidenceCmd::Hold(HoldCmd::List { all, json }) => {
            let holds = client.list_holds(all).await?;
            if json {
                let v: Vec<_> = holds.iter().map(hold_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if holds.is_empty() {
                println!("no legal holds");
            }
            for h in &holds {
                let state = if h.released_at_ms == 0 {
                    "active".to_string()
                } else {
                    format!(
                        "released {} by {}",
                        fmt_time(h.released_at_ms),
                        h.released_by
                    )
                };
                println!(
                    "{:>6}  {}  {}  by {}  {:?}  ({state})",
                    h.id,
                    fmt_time(h.created_at_ms),
                    scope(h),
                    h.created_by,
                    h.reason
                );
            }
        }
        EvidenceCmd::Hold(HoldCmd::Release { id, reason }) => {
            client.release_hold(id, &reason).await?;
            println!("legal hold {id} released");
        }
    }
    Ok(())
}
