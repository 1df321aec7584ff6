//! `bench tunnel`: the edge path against baselines measured in the same run.
//!
//! - Throughput of a large stream (`head -c N /dev/zero` run through
//!   `exec`: edge → QUIC tunnel → coordinator → gRPC → client) against the same
//!   producer copied over one direct loopback TCP connection.
//! - Edge RSS when idle and after the stream.
//! - Time until a new session succeeds after a coordinator holding the edge's
//!   tunnel is SIGKILLed (the client lists every node, the killed one first).
//! - Coordinator RSS with many simulated edges (enrolled, mTLS, one resource
//!   each) connected to it.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use custody_cli::client::Client;
use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_proto::frame::{read_frame, write_frame};
use custody_proto::tunnel::v1 as t;
use custody_proto::v1 as api;

const POLICY: &str = include_str!("../../examples/policy.yaml");

/// VmRSS of a process, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// Runs `argv` on `resource` and counts stdout bytes; returns (bytes, seconds).
async fn exec_count(
    client: &Client,
    resource: &str,
    argv: &[String],
) -> anyhow::Result<(u64, f64)> {
    let t0 = Instant::now();
    let (tx, mut out) = client.exec_open(resource, argv).await?;
    tx.send(api::ExecInput {
        kind: Some(api::exec_input::Kind::StdinEof(true)),
    })
    .await
    .ok();
    let mut n = 0u64;
    loop {
        match out.message().await?.and_then(|m| m.kind) {
            Some(api::exec_output::Kind::Stdout(b)) => n += b.len() as u64,
            Some(api::exec_output::Kind::Exit(x)) => {
                if x.code != 0 {
                    bail!("remote command exited {}", x.code);
                }
                break;
            }
            Some(_) => {}
            None => bail!("session ended without an exit status"),
        }
    }
    drop(tx);
    Ok((n, t0.elapsed().as_secs_f64()))
}

/// The same producer, copied over one loopback TCP connection.
async fn direct_tcp(bytes: u64) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf).await?;
            if r == 0 {
                return anyhow::Ok(n);
            }
            n += r as u64;
        }
    });
    let mut child = tokio::process::Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    tokio::io::copy(&mut out, &mut s).await?;
    s.shutdown().await?;
    let n = reader.await??;
    child.wait().await?;
    if n != bytes {
        bail!("direct copy moved {n} of {bytes} bytes");
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn tunnel(
    bytes: u64,
    rounds: usize,
    failovers: usize,
    sim_edges: usize,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let bins = Binaries::locate()?;
    if bins.edge.is_none() {
        bail!("custody-edge is not built next to custody-coordinator");
    }
    let mut c = LocalCluster::generate(bins, tmp.path(), &GenOptions::default())?;
    c.start_all()?;
    c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    c.add_edge(&EdgeSpec::shell("bench-edge", "bench-shell"))?;
    c.enroll_edge("bench-edge").await?;
    c.wait_for_resource("bench-shell", 3, Duration::from_secs(30))
        .await?;
    let edge_pid = c.edges["bench-edge"].pid().context("edge pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let edge_idle = rss_mib(edge_pid)?;
    let alice = c.mint_token("alice").await?.token;
    let client = c.client_as(&[], Duration::from_secs(30), Some(alice.clone()))?;

    println!("== tunnel throughput: {bytes} bytes, {rounds} rounds (median) ==");
    let argv: Vec<String> = ["head", "-c", &bytes.to_string(), "/dev/zero"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (mut tun, mut dir) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (n, secs) = exec_count(&client, "bench-shell", &argv).await?;
        if n != bytes {
            bail!("exec delivered {n} of {bytes} bytes");
        }
        tun.push(bytes as f64 / secs / (1 << 20) as f64);
        dir.push(bytes as f64 / direct_tcp(bytes).await? / (1 << 20) as f64);
    }
    let (tun, dir) = (median(&mut tun), median(&mut dir));
    println!("custody exec (edge -> QUIC -> coordinator -> gRPC/TLS -> client): {tun:>8.1} MiB/s");
    println!("direct loopback TCP copy, same producer:                          {dir:>8.1} MiB/s");
    println!("ratio custody/direct: {:.2} (target >= 0.50)", tun / dir);
    let edge_after = rss_mib(edge_pid)?;
    println!("== edge RSS ==");
    println!("idle: {edge_idle:.1} MiB (target <= 20); after the streams: {edge_after:.1} MiB");

    println!("== routing after a coordinator dies ({failovers} trials) ==");
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    let mut times = Vec::new();
    let echo: Vec<String> = vec!["echo".into(), "ok".into()];
    for trial in 0..failovers {
        let victim = ids[trial % ids.len()];
        let mut order = vec![victim];
        order.extend(ids.iter().copied().filter(|i| *i != victim));
        // The client tries the victim first, as a caller pinned to it would.
        let urls: Vec<String> = order.iter().map(|i| c.nodes[i].api_url()).collect();
        let mut cfg = custody_cli::client::ClientConfig::new(&urls.join(","), c.ca_path())?;
        cfg.token = Some(alice.clone());
        cfg.deadline = Duration::from_secs(30);
        let pinned = Client::new(cfg)?;
        c.kill(victim)?;
        let t0 = Instant::now();
        exec_count(&pinned, "bench-shell", &echo).await?;
        let took = t0.elapsed().as_secs_f64() * 1000.0;
        println!("trial {trial}: killed node {victim}, new session after {took:.0} ms");
        times.push(took);
        c.start(victim)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = client
                .list_edges()
                .await
                .is_ok_and(|e| e.iter().any(|e| e.connected_nodes.len() == ids.len()));
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("edge did not reconnect to node {victim}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if !times.is_empty() {
        let max = times.iter().copied().fold(0.0, f64::max);
        println!("median {:.0} ms, max {max:.0} ms", median(&mut times));
    }

    if sim_edges > 0 {
        simulated_edges(&c, sim_edges).await?;
    }
    Ok(())
}

/// Enrolls `n` in-process edges against node 1 and keeps their tunnels open.
async fn simulated_edges(c: &LocalCluster, n: usize) -> anyhow::Result<()> {
    println!("== coordinator RSS with {n} simulated edges on node 1 ==");
    let node = c.nodes.get(&1).context("node 1")?;
    let pid = node.pid().context("node 1 pid")?;
    let before = rss_mib(pid)?;
    let addr: std::net::SocketAddr = node.tunnel_addr.parse()?;
    let ca = std::fs::read(c.ca_path())?;
    let admin = c.client(&[])?;
    let dir = tempfile::tempdir()?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let endpoint = Arc::new(endpoint);
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("sim-{i}");
        let token = admin
            .create_enroll_token_for(
                &name,
                "eu",
                Duration::from_secs(600),
                vec![custody_proto::v1::ResourceInfo {
                    name: format!("sim-shell-{i}"),
                    kind: "shell".into(),
                    ..Default::default()
                }],
            )
            .await?
            .token;
        let store = custody_edge::identity::Store::new(&dir.path().join(&name));
        let id = custody_edge::identity::enroll(&endpoint, &ca, &[addr], &token, &store).await?;
        let cfg =
            custody_edge::tls::quic_client_config(&ca, Some(&id)).map_err(anyhow::Error::msg)?;
        let conn = endpoint.connect_with(cfg, addr, "127.0.0.1")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = t::EdgeMessage {
            kind: Some(t::edge_message::Kind::Hello(t::Hello {
                agent_version: "sim".into(),
                resources: vec![t::Resource {
                    name: format!("sim-shell-{i}"),
                    kind: "shell".into(),
                    labels: Default::default(),
                }],
            })),
        };
        write_frame(&mut send, &hello).await?;
        match read_frame::<t::CoordinatorMessage, _>(&mut recv).await? {
            Some(t::CoordinatorMessage {
                kind: Some(t::coordinator_message::Kind::Welcome(_)),
            }) => {}
            other => bail!("simulated edge {i} not welcomed: {other:?}"),
        }
        conns.push((conn, send, recv));
        if (i + 1) % 250 == 0 {
            println!(
                "  {} edges connected ({:.1} s)",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let live = conns
        .iter()
        .filter(|(c, _, _)| c.close_reason().is_none())
        .count();
    let after = rss_mib(pid)?;
    println!("node 1 RSS: {before:.1} MiB before, {after:.1} MiB with {live} live simulated edges (target <= 1024)");
    drop(conns);
    Ok(())
}
