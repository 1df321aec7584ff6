//! `custody cluster ...`

use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;

use custody_cli::client::Client;
use custody_proto::v1 as api;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Show the leader, term, indexes and every member's replication progress.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Add a node (start it first with `join = true`).
    Add {
        #[command(flatten)]
        member: MemberArgs,
        /// Add as a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Hand the leader's role to the most up-to-date other voter (before
    /// maintenance on the leader's host).
    StepDown,
    /// Remove a node.
    Remove {
        #[arg(long)]
        id: u64,
    },
    /// Replace a node by a new one (new id) in one joint-consensus change.
    Replace {
        /// The node to remove.
        #[arg(long)]
        remove: u64,
        #[command(flatten)]
        member: MemberArgs,
    },
}

#[derive(clap::Args)]
pub struct MemberArgs {
    #[arg(long)]
    id: u64,
    #[arg(long)]
    region: String,
    /// The new node's Raft address (HOST:PORT).
    #[arg(long)]
    raft: String,
    /// The new node's API address (HOST:PORT).
    #[arg(long)]
    api: String,
    /// The new node's tunnel address (HOST:PORT), announced to edges.
    #[arg(long, default_value = "")]
    tunnel: String,
}

impl MemberArgs {
    fn into_api(self) -> api::NewMember {
        api::NewMember {
            id: self.id,
            region: self.region,
            raft_addr: self.raft,
            api_addr: self.api,
            tunnel_addr: self.tunnel,
        }
    }
}

#[derive(Serialize)]
struct StatusJson {
    leader: Option<u64>,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    answered_by: u64,
    cluster_id: String,
    /// Base64 Ed25519 key that verifies signed evidence exports.
    evidence_public_key: String,
    /// The state version every voter supports, and the answering node's.
    cluster_version: u32,
    node_version: u32,
    members: Vec<MemberJson>,
}

#[derive(Serialize)]
struct MemberJson {
    id: u64,
    region: String,
    api: String,
    state: String,
    match_index: u64,
    /// The state version the member reported (0: not yet).
    version: u32,
}

fn status_json(st: &api::ClusterStatus) -> StatusJson {
    StatusJson {
        leader: (st.leader_id != 0).then_some(st.leader_id),
        term: st.term,
        commit_index: st.commit_index,
        applied_index: st.applied_index,
        answered_by: st.node_id,
        cluster_id: st.cluster_id.clone(),
        evidence_public_key: st.evidence_public_key.clone(),
        cluster_version: st.cluster_version,
        node_version: st.node_version,
        members: st
            .members
            .iter()
            .map(|m| MemberJson {
                id: m.id,
                region: m.region.clone(),
                api: m.api_addr.clone(),
                state: m.state.clone(),
                match_index: m.match_index,
                version: m.version,
            })
            .collect(),
    }
}

fn print_membership(r: &api::MembershipResponse) {
    println!(
        "voters: {:?}  learners: {:?}  (applied at index {})",
        r.voters, r.learners, r.index
    );
}

pub async fn run(cmd: ClusterCmd) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    match cmd {
        ClusterCmd::Status { json } => {
            let st = client.cluster_status().await.context("cluster status")?;
            let j = status_json(&st);
            if json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                match j.leader {
                    Some(l) => println!("leader: node {l}"),
                    None => println!("leader: none known (answered by node {})", j.answered_by),
                }
                println!(
                    "term: {}  commit: {}  applied: {}",
                    j.term, j.commit_index, j.applied_index
                );
                println!("cluster id: {}", j.cluster_id);
                println!("evidence public key: {}", j.evidence_public_key);
                println!(
                    "cluster version: {}  (this node: {})",
                    j.cluster_version, j.node_version
                );
                println!(
                    "{:<6} {:<8} {:<24} {:<12} {:>10} {:>8}",
                    "ID", "REGION", "API", "STATE", "MATCH", "VERSION"
                );
                for m in &j.members {
                    println!(
                        "{:<6} {:<8} {:<24} {:<12} {:>10} {:>8}",
                        m.id, m.region, m.api, m.state, m.match_index, m.version
                    );
                }
            }
        }
        ClusterCmd::Add { member, learner } => {
            print_membership(&client.add_member(member.into_api(), learner).await?)
        }
        ClusterCmd::StepDown => {
            let r = client.step_down().await?;
            println!("node {} leads now", r.leader_id);
        }
        ClusterCmd::Remove { id } => print_membership(&client.remove_member(id).await?),
        ClusterCmd::Replace { remove, member } => {
            print_membership(&client.replace_member(remove, member.into_api()).await?)
        }
    }
    Ok(())
}
