//! The replicated coordinator core, against real processes.

use std::sync::Arc;
use std::time::Duration;

use custody_chaos::history::{self, History};
use custody_chaos::partition::RaftProxies;
use custody_cli::dev::GenOptions;
use custody_proto::v1 as api;
use tokio::sync::watch;

use crate::harness::{self, eventually, TestCluster};

fn others(c: &TestCluster, not: &[u64]) -> Vec<u64> {
    c.nodes
        .keys()
        .copied()
        .filter(|i| !not.contains(i))
        .collect()
}

async fn stop_writers(stop: watch::Sender<bool>, mut set: tokio::task::JoinSet<()>) {
    let _ = stop.send(true);
    while set.join_next().await.is_some() {}
}

/// Waits until every node in `ids` has applied at least `index`.
async fn wait_applied(c: &TestCluster, ids: &[u64], index: u64) {
    let client = c.client(&[]).unwrap();
    for id in ids {
        let api = c.node(*id).unwrap().api_addr.clone();
        eventually(Duration::from_secs(30), &format!("node {id} applies {index}"), || {
            let (client, api) = (&client, api.clone());
            async move {
                matches!(client.status_at(&api).await, Ok(s) if s.applied_index >= index)
            }
        })
        .await;
    }
}

/// Checks the history through each of `ids` in turn, so every node's own
/// state is read (linearizable reads are served from local state).
async fn check_on_each(c: &TestCluster, ids: &[u64], prefix: &str, h: &History) -> usize {
    let mut acked = 0;
    for id in ids {
        let r = history::check(&c.client(&[*id]).unwrap(), prefix, h)
            .await
            .unwrap_or_else(|e| panic!("node {id}: {e:#}"));
        acked = r.acked;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_a_leader_and_serves_linearizable_reads_on_every_node() {
    let (c, leader) = harness::started(GenOptions::default()).await;
    let ids = others(&c, &[]);
    // Writes through every node, followers included, are committed.
    for id in &ids {
        let r = c
            .client(&[*id])
            .unwrap()
            .put(&format!("via/{id}"), format!("v{id}").into_bytes())
            .await
            .unwrap();
        assert!(r.index > 1);
    }
    // And readable from every node.
    for reader in &ids {
        let client = c.client(&[*reader]).unwrap();
        for writer in &ids {
            let r = client.get(&format!("via/{writer}"), false).await.unwrap();
            assert!(r.found, "node {reader} misses via/{writer}");
            assert_eq!(r.value, format!("v{writer}").into_bytes());
        }
    }
    // A write acknowledged by the leader is visible at once on a follower.
    let follower = others(&c, &[leader])[0];
    let (w, r) = (c.client(&[leader]).unwrap(), c.client(&[follower]).unwrap());
    for i in 0..20 {
        let v = format!("value-{i}").into_bytes();
        w.put("linear", v.clone()).await.unwrap();
        assert_eq!(
            r.get("linear", false).await.unwrap().value,
            v,
            "stale read at {i}"
        );
    }
    // Status names the leader and every member with its region.
    let st = c
        .client(&[follower])
        .unwrap()
        .cluster_status()
        .await
        .unwrap();
    assert_eq!(st.leader_id, leader);
    let mut regions: Vec<&str> = st.members.iter().map(|m| m.region.as_str()).collect();
    regions.sort();
    assert_eq!(regions, ["ap", "eu", "us"]);
    // Data dirs hold the log and evidence: readable by the node's user only.
    for n in c.nodes.values() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&n.data_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", n.data_dir.display());
        assert!(
            !n.data_dir.join("NEW-CLUSTER").exists(),
            "the bootstrap marker is removed once used"
        );
    }
    // Every node reports its state version; the cluster version is theirs.
    let client = c.client(&[follower]).unwrap();
    eventually(
        Duration::from_secs(20),
        "every node reports its version",
        || {
            let client = &client;
            async move {
                matches!(client.cluster_status().await, Ok(st)
                if st.cluster_version == 3 && st.node_version == 3
                    && st.members.iter().all(|m| m.version == 3))
            }
        },
    )
    .await;
    assert_eq!(st.members.iter().filter(|m| m.state == "leader").count(), 1);
    assert_eq!(
        st.members.iter().filter(|m| m.state == "follower").count(),
        2
    );

    // The CLI's JSON has the documented fields.
    let out = std::process::Command::new(&c.bins.custody)
        .args(["cluster", "status", "--json"])
        .env("CUSTODY_COORDINATOR", c.api_urls(&[follower]))
        .env("CUSTODY_CA", c.ca_path())
        .env("CUSTODY_TOKEN", c.token().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["leader"], leader);
    assert!(j["term"].as_u64().unwrap() >= 2);
    assert!(j["commit_index"].as_u64().unwrap() >= 23);
    let members = j["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        for f in ["id", "region", "api", "state", "match_index"] {
            assert!(!m[f].is_null(), "member lacks {f}: {m}");
        }
        assert!(m["match_index"].as_u64().unwrap() >= 23, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_under_load_loses_and_duplicates_nothing() {
    let (mut c, leader) = harness::started(GenOptions::default()).await;
    let client = Arc::new(
        c.client_with_deadline(&[], Duration::from_secs(20))
            .unwrap(),
    );
    let h = Arc::new(History::default());
    let (stop, stop_rx) = watch::channel(false);
    let writers = history::spawn_writers(client.clone(), "hist", 8, h.clone(), stop_rx);
    eventually(Duration::from_secs(30), "50 writes before the kill", || {
        let h = h.clone();
        async move { h.acked() >= 50 }
    })
    .await;
    let before = h.acked();
    c.kill(leader).unwrap();
    let survivors = others(&c, &[leader]);
    let new_leader = c
        .wait_for_leader(&survivors, Duration::from_secs(15))
        .await
        .unwrap();
    assert_ne!(new_leader, leader);
    eventually(
        Duration::from_secs(30),
        "writes resume after the kill",
        || {
            let h = h.clone();
            async move { h.acked() >= before + 100 }
        },
    )
    .await;
    stop_writers(stop, writers).await;

    // Bring the old leader back, then kill and restart everything.
    c.start(leader).unwrap();
    c.wait_for_leader(&[], Duration::from_secs(15))
        .await
        .unwrap();
    for id in others(&c, &[]) {
        c.kill(id).unwrap();
    }
    c.start_all().unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    let all = others(&c, &[]);
    let acked = check_on_each(&c, &all, "hist", &h).await;
    assert!(acked >= before + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_recovers_everything_from_disk() {
    let (mut c, _) = harness::started(GenOptions::default()).await;
    let client = c.client(&[]).unwrap();
    for i in 0..100 {
        client
            .put(&format!("r/{i:03}"), format!("{i}").into_bytes())
            .await
            .unwrap();
    }
    drop(client);
    for id in others(&c, &[]) {
        c.kill(id).unwrap();
    }
    c.start_all().unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    for id in others(&c, &[]) {
        let items = c.client(&[id]).unwrap().list_all("r/").await.unwrap();
        assert_eq!(items.len(), 100, "node {id}");
        for (i, kv) in items.iter().enumerate() {
            assert_eq!(kv.key, format!("r/{i:03}"));
            assert_eq!(kv.value, format!("{i}").into_bytes());
            assert_eq!(kv.version, 1);
        }
    }
}

fn count_in_log(c: &TestCluster, id: u64, needle: &str) -> usize {
    std::fs::read_to_string(c.log_path(id))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_or_wiped_follower_catches_up_by_snapshot() {
    let opts = GenOptions {
        compact_threshold: Some(20),
        ..GenOptions::default()
    };
    let (mut c, leader) = harness::started(opts).await;
    let lagger = others(&c, &[leader])[0];
    c.kill(lagger).unwrap();
    let rest = others(&c, &[lagger]);
    let client = c.client(&rest).unwrap();
    for i in 0..150 {
        client
            .put(&format!("s/{i:03}"), vec![b'x'; 100])
            .await
            .unwrap();
    }
    let st = client.cluster_status().await.unwrap();
    let lag_match = st
        .members
        .iter()
        .find(|m| m.id == lagger)
        .unwrap()
        .match_index;
    assert!(
        st.first_index > lag_match + 1,
        "log was not compacted past the follower: first {} match {lag_match}",
        st.first_index
    );

    // Restarted: it catches up by snapshot.
    c.start(lagger).unwrap();
    wait_applied(&c, &[lagger], st.commit_index).await;
    assert!(count_in_log(&c, lagger, "installed snapshot") >= 1);
    let items = c.client(&[lagger]).unwrap().list_all("s/").await.unwrap();
    assert_eq!(items.len(), 150);

    // Wiped: it refuses to start as itself (it would have a vote and no
    // log). The documented path replaces it with a new id, which catches up
    // by snapshot and serves the same data.
    c.kill(lagger).unwrap();
    c.wipe(lagger).unwrap();
    for i in 150..200 {
        client
            .put(&format!("s/{i:03}"), vec![b'y'; 100])
            .await
            .unwrap();
    }
    assert_refuses_to_start(&mut c, lagger).await;
    c.add_joiner(4, "ap", "127.0.0.1", Some(20)).unwrap();
    c.start(4).unwrap();
    let r = client
        .replace_member(lagger, new_member(&c, 4))
        .await
        .unwrap();
    assert!(
        r.voters.contains(&4) && !r.voters.contains(&lagger),
        "{r:?}"
    );
    let st = client.cluster_status().await.unwrap();
    wait_applied(&c, &[4], st.commit_index).await;
    let on_new = c.client(&[4]).unwrap().list_all("s/").await.unwrap();
    let on_leader = client.list_all("s/").await.unwrap();
    assert_eq!(on_new.len(), 200);
    assert_eq!(on_new, on_leader);
    assert!(count_in_log(&c, 4, "installed snapshot") >= 1);
}

/// Starts node `id`, whose data dir was wiped, and checks that it exits with
/// the message that names the way to replace it.
async fn assert_refuses_to_start(c: &mut TestCluster, id: u64) {
    c.start(id).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.is_running(id) {
        assert!(
            std::time::Instant::now() < deadline,
            "wiped node {id} kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count_in_log(c, id, "custody cluster replace"),
        1,
        "node {id}'s log does not say how to replace it"
    );
    assert_eq!(count_in_log(c, id, "bootstrapped a new cluster"), 1);
}

/// The sequence: writes commit on two of three nodes, one of those
/// dies, the other loses its disk and is restarted. It must not bootstrap
/// again (with the third node it would form a majority without the writes):
/// it refuses to start, and once the dead node returns every acknowledged
/// write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_refuses_to_start_and_no_acknowledged_write_is_lost() {
    let (mut c, leader) = harness::started(GenOptions::default()).await;
    let down = others(&c, &[leader])[0];
    let wiped = others(&c, &[leader, down])[0];
    c.kill(down).unwrap();
    let client = Arc::new(
        c.client_with_deadline(&[leader, wiped], Duration::from_secs(20))
            .unwrap(),
    );
    let h = Arc::new(History::default());
    let (stop, stop_rx) = watch::channel(false);
    let writers = history::spawn_writers(client, "w", 4, h.clone(), stop_rx);
    eventually(
        Duration::from_secs(30),
        "writes commit on two nodes",
        || {
            let h = h.clone();
            async move { h.acked() >= 100 }
        },
    )
    .await;
    stop_writers(stop, writers).await;

    c.kill(leader).unwrap();
    c.kill(wiped).unwrap();
    c.wipe(wiped).unwrap();
    c.start(down).unwrap();
    assert_refuses_to_start(&mut c, wiped).await;
    // The node without the writes cannot lead on its own.
    let st = c
        .client_with_deadline(&[down], Duration::from_secs(3))
        .unwrap()
        .status_at(&c.node(down).unwrap().api_addr)
        .await
        .unwrap();
    assert_ne!(st.leader_id, down, "{st:?}");

    c.start(leader).unwrap();
    c.wait_for_leader(&[leader, down], Duration::from_secs(30))
        .await
        .unwrap();
    let acked = check_on_each(&c, &[leader, down], "w", &h).await;
    assert!(acked >= 100, "{acked}");
}

fn new_member(c: &TestCluster, id: u64) -> api::NewMember {
    let n = c.node(id).unwrap();
    api::NewMember {
        id,
        region: n.region.clone(),
        raft_addr: n.raft_addr.clone(),
        api_addr: n.api_addr.clone(),
        tunnel_addr: n.tunnel_addr.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_grows_to_five_and_shrinks_to_three_under_writes() {
    let (mut c, leader) = harness::started(GenOptions::default()).await;
    c.add_joiner(4, "eu", "127.0.0.1", None).unwrap();
    c.add_joiner(5, "us", "127.0.0.1", None).unwrap();
    let client = Arc::new(
        c.client_with_deadline(&[], Duration::from_secs(20))
            .unwrap(),
    );
    let h = Arc::new(History::default());
    let (stop, stop_rx) = watch::channel(false);
    let writers = history::spawn_writers(client.clone(), "m", 4, h.clone(), stop_rx);

    for id in [4, 5] {
        c.start(id).unwrap();
        let r = client.add_member(new_member(&c, id), false).await.unwrap();
        assert!(r.voters.contains(&id), "{r:?}");
    }
    let st = client.cluster_status().await.unwrap();
    assert_eq!(st.members.len(), 5);
    wait_applied(&c, &[4, 5], st.commit_index).await;

    // Shrink back to three, removing the leader and one other original node.
    let doomed = [leader, others(&c, &[leader, 4, 5])[0]];
    for id in doomed {
        let r = client.remove_member(id).await.unwrap();
        assert!(!r.voters.contains(&id), "{r:?}");
        c.kill(id).unwrap();
    }
    // A removed member's certificate no longer opens Raft or Peer calls.
    let ca = std::fs::read(c.ca_path()).unwrap();
    let cert = std::fs::read(c.dir.join(format!("node-{}.pem", doomed[0]))).unwrap();
    let key = std::fs::read(c.dir.join(format!("node-{}-key.pem", doomed[0]))).unwrap();
    let raft = c.node(4).unwrap().raft_addr.clone();
    for e in [
        crate::bad_input::raft_call_as((&raft, 4), &ca, &cert, &key).await,
        crate::bad_input::peer_call_as((&raft, 4), &ca, &cert, &key).await,
    ] {
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains("not a member"), "{e}");
    }
    let before = h.acked();
    eventually(
        Duration::from_secs(30),
        "writes continue on the new members",
        || {
            let h = h.clone();
            async move { h.acked() >= before + 20 }
        },
    )
    .await;
    stop_writers(stop, writers).await;
    let remaining = others(&c, &doomed);
    assert_eq!(remaining.len(), 3);
    let st = c
        .client(&remaining)
        .unwrap()
        .cluster_status()
        .await
        .unwrap();
    let mut ids: Vec<u64> = st.members.iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, remaining);
    check_on_each(&c, &remaining, "m", &h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_swaps_a_wiped_node_for_a_new_one() {
    let (mut c, leader) = harness::started(GenOptions::default()).await;
    let client = c.client(&[]).unwrap();
    for i in 0..30 {
        client.put(&format!("p/{i}"), b"v".to_vec()).await.unwrap();
    }
    // Node `gone` loses its disk; node 4 takes its place.
    let gone = others(&c, &[leader])[0];
    c.kill(gone).unwrap();
    c.wipe(gone).unwrap();
    c.add_joiner(4, "ap", "127.0.0.1", None).unwrap();
    c.start(4).unwrap();
    let r = c
        .client(&others(&c, &[gone]))
        .unwrap()
        .replace_member(gone, new_member(&c, 4))
        .await
        .unwrap();
    let mut voters = r.voters.clone();
    voters.sort();
    assert_eq!(voters, others(&c, &[gone]));
    let st = client.cluster_status().await.unwrap();
    wait_applied(&c, &[4], st.commit_index).await;
    assert_eq!(
        c.client(&[4]).unwrap().list_all("p/").await.unwrap().len(),
        30
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_partition_makes_no_progress_and_rejoins_without_divergence() {
    let opts = GenOptions {
        hosts: vec!["127.0.0.1".into(), "127.0.0.2".into(), "127.0.0.3".into()],
        ..GenOptions::default()
    };
    let mut c = harness::cluster(opts);
    let proxies = RaftProxies::install(&c).await.unwrap();
    c.start_all().unwrap();
    let leader = c
        .wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    let minority = others(&c, &[leader])[0];
    let majority = others(&c, &[minority]);
    let maj = c.client(&majority).unwrap();
    maj.put("before", b"1".to_vec()).await.unwrap();
    let term_before = maj.cluster_status().await.unwrap().term;

    proxies.partition(&[minority], &majority);
    let min = c
        .client_with_deadline(&[minority], Duration::from_secs(4))
        .unwrap();
    let applied_before = min
        .status_at(&c.node(minority).unwrap().api_addr)
        .await
        .unwrap()
        .applied_index;
    // The minority can neither commit nor serve linearizable reads.
    assert!(min.put("from-minority", b"x".to_vec()).await.is_err());
    assert!(min.get("before", false).await.is_err());
    // The majority goes on.
    for i in 0..50 {
        maj.put(&format!("part/{i}"), b"m".to_vec()).await.unwrap();
    }
    let st = min
        .status_at(&c.node(minority).unwrap().api_addr)
        .await
        .unwrap();
    assert_eq!(
        st.applied_index, applied_before,
        "minority applied entries while cut off"
    );

    proxies.heal();
    let commit = maj.cluster_status().await.unwrap().commit_index;
    wait_applied(&c, &[minority], commit).await;
    let on_min = c.client(&[minority]).unwrap().list_all("").await.unwrap();
    let on_maj = maj.list_all("").await.unwrap();
    assert_eq!(on_min, on_maj, "states diverged");
    assert_eq!(
        on_maj
            .iter()
            .filter(|kv| kv.key.starts_with("part/"))
            .count(),
        50
    );
    // Pre-vote kept the cut-off node from disrupting the leader on return.
    let after = maj.cluster_status().await.unwrap();
    assert_eq!(after.leader_id, leader);
    assert_eq!(after.term, term_before);
}

/// Node certificates are short-lived and renewed while the nodes run: by
/// the node itself when it holds the CA key, through a member that does
/// otherwise. A node restarted on its renewed files rejoins, and the
/// cluster keeps committing through every node after the certificates it
/// started with would have been replaced several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_are_short_lived_and_renewed() {
    let mut c = harness::cluster(GenOptions::default());
    for id in [1, 2, 3] {
        c.set_node_option(id, "tls", "node_cert_ttl_secs", toml::Value::Integer(15))
            .unwrap();
    }
    // Node 3 holds no CA key.
    let path = c.node(3).unwrap().config.clone();
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    t["tls"].as_table_mut().unwrap().remove("ca_key");
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let first_pem = std::fs::read(c.dir.join("node-3.pem")).unwrap();

    c.start_all().unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    // The generated certificates live 30 days, far longer than 15 s: each
    // node replaces its own at once, then renews every 10 s or so.
    eventually(
        Duration::from_secs(40),
        "every node renews its certificate twice",
        || {
            let n = [1, 2, 3].map(|id| count_in_log(&c, id, "node_certificate_renewed"));
            async move { n.iter().all(|n| *n >= 2) }
        },
    )
    .await;
    assert!(
        count_in_log(&c, 1, "node_certificate_signed")
            + count_in_log(&c, 2, "node_certificate_signed")
            >= 2,
        "node 3's renewals were not signed by a member holding the CA key"
    );
    assert_ne!(std::fs::read(c.dir.join("node-3.pem")).unwrap(), first_pem);

    // Restarted on its renewed files, node 2 rejoins.
    c.kill(2).unwrap();
    c.start(2).unwrap();
    let client = c.client(&[]).unwrap();
    client.put("after-restart", b"v".to_vec()).await.unwrap();
    let st = client.cluster_status().await.unwrap();
    wait_applied(&c, &[2], st.commit_index).await;

    // Long after the first certificates were replaced, every node still
    // takes writes.
    tokio::time::sleep(Duration::from_secs(16)).await;
    for id in [1, 2, 3] {
        c.client(&[id])
            .unwrap()
            .put(&format!("late/{id}"), b"v".to_vec())
            .await
            .unwrap();
    }
    let st = client.cluster_status().await.unwrap();
    assert!(
        st.members.iter().all(|m| m.state != "unreachable"),
        "{st:?}"
    );
}
