//! `custody policy apply|show|test`

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use custody_cli::client::Client;
use custody_proto::v1 as api;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Replace the policy with FILE (YAML, or TOML by extension).
    Apply { file: PathBuf },
    /// Print the current policy and who set it.
    Show,
    /// Explain the decision for a hypothetical request.
    Test {
        /// Subject, email or name of an identity that has signed in.
        #[arg(long = "as")]
        as_: Option<String>,
        /// Groups of a hypothetical identity (instead of, or for an unknown, --as).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        #[arg(long, default_value = "human")]
        client_kind: String,
        #[arg(long)]
        resource: String,
        /// Resource kind (shell, postgres, ...).
        #[arg(long, default_value = "")]
        kind: String,
        /// Resource label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        action: String,
        #[arg(long, default_value = "")]
        command: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    match cmd {
        PolicyCmd::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let format = match file.extension().and_then(|e| e.to_str()) {
                Some("toml") => "toml",
                _ => "yaml",
            };
            let r = client.policy_apply(&text, format).await?;
            println!("policy version {} applied (index {})", r.version, r.index);
        }
        PolicyCmd::Show => {
            let r = client.policy_show().await?;
            if r.version == 0 {
                println!("# no policy applied: every request is denied");
            } else {
                println!(
                    "# version {} by {} at {} ms",
                    r.version, r.author, r.applied_at_ms
                );
                print!("{}", r.yaml);
            }
        }
        PolicyCmd::Test {
            as_,
            groups,
            client_kind,
            resource,
            kind,
            labels,
            action,
            command,
            json,
        } => {
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("label {l:?} is not KEY=VALUE"))
                })
                .collect::<anyhow::Result<HashMap<_, _>>>()?;
            let r = client
                .policy_test(api::TestPolicyRequest {
                    r#as: as_.unwrap_or_default(),
                    groups,
                    client_kind,
                    resource,
                    resource_kind: kind,
                    labels,
                    action,
                    command,
                })
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "effect": r.effect, "rule": r.rule, "reason": r.reason,
                        "trace": r.trace, "approver_groups": r.approver_groups,
                        "approvals_required": r.approvals_required, "mask": r.mask,
                    }))?
                );
            } else {
                println!("{}: {}", r.effect, r.reason);
                if r.effect == "require_approval" {
                    println!(
                        "approvals: {} from {:?}",
                        r.approvals_required, r.approver_groups
                    );
                }
                if !r.mask.is_empty() {
                    println!("masking: {:?}", r.mask);
                }
                for t in &r.trace {
                    println!("  {t}");
                }
            }
        }
    }
    Ok(())
}
