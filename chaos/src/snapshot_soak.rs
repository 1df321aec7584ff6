//! `snapshot`: issue 18's scale check for streamed snapshots. A 3-node
//! cluster with a low compaction threshold records GiBs of incompressible
//! evidence; a follower is then killed and wiped, and replaced (the
//! documented path) by a new node that can only catch up by snapshot. The
//! run reports the time to catch up, whether the leader kept its term, and
//! every node's peak RSS, sampled throughout.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_proto::v1 as api;

use crate::evidence_bench::exec_wait;
use crate::tunnel_bench::rss_mib;

const POLICY: &str = include_str!("../../examples/policy.yaml");
/// Recorded output per session: under the 64 MiB recording cap.
const SESSION_MIB: u64 = 60;
/// Log compaction for every node: low, so the new node cannot catch up
/// from the log.
const COMPACT_ENTRIES: u64 = 500;
const COMPACT_BYTES: u64 = 32 << 20;

/// Peak RSS per node id, sampled in the background.
#[derive(Clone, Default)]
struct Peaks(Arc<Mutex<BTreeMap<u64, f64>>>);

impl Peaks {
    fn record(&self, id: u64, mib: f64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(id).or_insert(0.0);
        *e = e.max(mib);
    }

    fn take(&self) -> BTreeMap<u64, f64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn sample(c: &LocalCluster, ids: &[u64], peaks: &Peaks) {
    for id in ids {
        if let Some(pid) = c.node(*id).ok().and_then(|n| n.pid()) {
            if let Ok(mib) = rss_mib(pid) {
                peaks.record(*id, mib);
            }
        }
    }
}

fn print_peaks(phase: &str, peaks: &BTreeMap<u64, f64>) -> f64 {
    let list: Vec<String> = peaks
        .iter()
        .map(|(id, mib)| format!("node {id} {mib:.0} MiB"))
        .collect();
    println!("peak RSS during {phase}: {}", list.join(", "));
    peaks.values().copied().fold(0.0, f64::max)
}

fn member(c: &LocalCluster, id: u64) -> anyhow::Result<api::NewMember> {
    let n = c.node(id)?;
    Ok(api::NewMember {
        id,
        region: n.region.clone(),
        raft_addr: n.raft_addr.clone(),
        api_addr: n.api_addr.clone(),
        tunnel_addr: n.tunnel_addr.clone(),
    })
}

pub async fn snapshot(
    gib: f64,
    parallel: usize,
    dir: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let tmp = match &dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let opts = GenOptions {
        compact_threshold: Some(COMPACT_ENTRIES),
        compact_bytes: Some(COMPACT_BYTES),
        ..GenOptions::default()
    };
    let mut c = LocalCluster::generate(Binaries::locate()?, tmp.path(), &opts)?;
    c.start_all()?;
    c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    let mut spec = EdgeSpec::shell("soak-edge", "shell-async");
    spec.resources_toml =
        "[[resources]]\nname = \"shell-async\"\nkind = \"shell\"\nlabels = { env = \"dev\" }\n"
            .into();
    c.add_edge(&spec)?;
    c.enroll_edge("soak-edge").await?;
    c.wait_for_resource("shell-async", 3, Duration::from_secs(30))
        .await?;
    let alice = c.mint_token("alice").await?.token;
    let client = Arc::new(c.client_as(&[], Duration::from_secs(120), Some(alice))?);
    let admin = c.client(&[])?;

    let peaks = Peaks::default();
    let c = Arc::new(tokio::sync::Mutex::new(c));
    let sampler = {
        let (c, peaks) = (c.clone(), peaks.clone());
        tokio::spawn(async move {
            loop {
                {
                    let c = c.lock().await;
                    sample(&c, &[1, 2, 3, 4], &peaks);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Fill: sessions that print random bytes (incompressible, so stored
    // bytes match recorded bytes).
    let sessions = ((gib * 1024.0) / SESSION_MIB as f64).ceil() as usize;
    println!("== filling: {sessions} sessions of {SESSION_MIB} MiB of random output, {parallel} at a time ==");
    let t0 = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (client, gate) = (client.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let cmd = format!("head -c {} /dev/urandom", SESSION_MIB << 20);
            exec_wait(&client, "shell-async", &["sh".into(), "-c".into(), cmd]).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let list = admin
        .list_sessions(api::ListSessionsRequest {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .context("list sessions")?;
    let stored: u64 = list.iter().map(|s| s.stored_bytes).sum();
    println!(
        "stored evidence: {:.2} GiB in {} sessions, {:.0} s",
        stored as f64 / (1u64 << 30) as f64,
        list.len(),
        t0.elapsed().as_secs_f64()
    );
    let fill_peak = print_peaks("the fill", &peaks.take());

    let before = admin.cluster_status().await?;
    let (leader, term) = (before.leader_id, before.term);
    let victim = before
        .members
        .iter()
        .map(|m| m.id)
        .find(|id| *id != leader)
        .context("no follower")?;
    println!(
        "leader {leader} at term {term}; log first index {} of commit {}; replacing wiped follower {victim} with node 4",
        before.first_index, before.commit_index
    );
    {
        let mut c = c.lock().await;
        c.kill(victim)?;
        c.wipe(victim)?;
        let region = c.node(victim)?.region.clone();
        c.add_joiner(4, &region, "127.0.0.1", Some(COMPACT_ENTRIES))?;
        c.set_node_option(
            4,
            "raft",
            "compact_bytes",
            toml::Value::Integer(COMPACT_BYTES as i64),
        )?;
        c.start(4)?;
    }
    let t1 = Instant::now();
    let new = member(&*c.lock().await, 4)?;
    let r = admin.replace_member(victim, new).await?;
    if !r.voters.contains(&4) {
        bail!("node 4 is not a voter after the replace: {r:?}");
    }
    let target = admin.cluster_status().await?.commit_index;
    let node4 = c.lock().await.client(&[4])?;
    loop {
        if t1.elapsed() > Duration::from_secs(1800) {
            bail!("node 4 did not catch up in 30 minutes");
        }
        if let Ok(st) = node4.cluster_status().await {
            if st.applied_index >= target {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let catch_up = t1.elapsed().as_secs_f64();
    let after = admin.cluster_status().await?;
    let catch_peak = print_peaks("the catch-up", &peaks.take());
    sampler.abort();

    let on_new = node4
        .list_sessions(api::ListSessionsRequest {
            limit: 100_000,
            ..Default::default()
        })
        .await?;
    let stored_new: u64 = on_new.iter().map(|s| s.stored_bytes).sum();
    let installed = std::fs::read_to_string(c.lock().await.log_path(4))
        .unwrap_or_default()
        .matches("installed snapshot")
        .count();
    println!(
        "node 4 caught up to index {target} in {catch_up:.1} s ({installed} snapshot install(s)); it lists {} sessions, {:.2} GiB",
        on_new.len(),
        stored_new as f64 / (1u64 << 30) as f64
    );
    println!(
        "leader after: {} at term {} (before: {leader} at term {term}): {}",
        after.leader_id,
        after.term,
        if after.leader_id == leader && after.term == term {
            "no election"
        } else {
            "LEADERSHIP CHANGED"
        }
    );
    println!(
        "peak RSS of any node: {:.0} MiB (fill), {:.0} MiB (catch-up); target < 1024",
        fill_peak, catch_peak
    );
    if on_new.len() != list.len() || stored_new != stored {
        bail!("node 4's evidence differs from the cluster's");
    }
    if installed == 0 {
        bail!("node 4 did not catch up by snapshot");
    }
    Ok(())
}
