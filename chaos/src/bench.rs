//! `bench raft`: commit throughput and latency of a local 3-node Custody
//! cluster (fsync on) against a 3-node etcd on the same machine, same client
//! load; plus Custody's leader-failover time.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use custody_cli::client::Client;
use custody_cli::dev::{Binaries, GenOptions, LocalCluster};

/// One measured cell.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

const SIZES: [usize; 2] = [1024, 64 * 1024];
const CONCURRENCY: [usize; 2] = [1, 64];

/// Runs `concurrency` loops of `op` for `dur`; each op gets a unique key.
async fn drive<F, Fut>(dur: Duration, concurrency: usize, op: F) -> anyhow::Result<Cell>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for w in 0..concurrency {
        let op = op.clone();
        set.spawn(async move {
            let mut h = Histogram::<u64>::new(3)?;
            let mut i = 0u64;
            while start.elapsed() < dur {
                i += 1;
                let t = Instant::now();
                op(format!("bench/{w}/{i}")).await?;
                h.record(t.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(h)
        });
    }
    let mut all = Histogram::<u64>::new(3)?;
    while let Some(r) = set.join_next().await {
        all.add(r??)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Cell {
        ops_per_sec: all.len() as f64 / secs,
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Three etcd processes on loopback, killed on drop. Like Custody they use TLS
/// on every link (client and peer), so the comparison carries the same costs.
pub(crate) struct Etcd {
    children: Vec<Child>,
    pub(crate) clients: Vec<String>,
    pub(crate) ca_pem: String,
}

/// A CA and one certificate for 127.0.0.1 (etcd's client and peer ports).
fn etcd_certs(dir: &Path) -> anyhow::Result<String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("etcd-ca.pem"), ca.pem())?;
    std::fs::write(dir.join("etcd.pem"), cert.pem())?;
    std::fs::write(dir.join("etcd-key.pem"), key.serialize_pem())?;
    Ok(ca.pem())
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn start_etcd(dir: &Path) -> anyhow::Result<Etcd> {
    which("etcd")?;
    let peers: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let clients: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let ca_pem = etcd_certs(dir)?;
    let (cert, key, ca) = (
        dir.join("etcd.pem"),
        dir.join("etcd-key.pem"),
        dir.join("etcd-ca.pem"),
    );
    let cluster = (0..3)
        .map(|i| format!("n{i}=https://127.0.0.1:{}", peers[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Vec::new();
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
        children.push(
            Command::new("etcd")
                .arg("--name")
                .arg(format!("n{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-{i}")))
                .arg("--listen-peer-urls")
                .arg(format!("https://127.0.0.1:{}", peers[i]))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("https://127.0.0.1:{}", peers[i]))
                .arg("--listen-client-urls")
                .arg(format!("https://127.0.0.1:{}", clients[i]))
                .arg("--advertise-client-urls")
                .arg(format!("https://127.0.0.1:{}", clients[i]))
                .arg("--cert-file")
                .arg(&cert)
                .arg("--key-file")
                .arg(&key)
                .arg("--peer-cert-file")
                .arg(&cert)
                .arg("--peer-key-file")
                .arg(&key)
                .arg("--peer-trusted-ca-file")
                .arg(&ca)
                .arg("--peer-client-cert-auth")
                .arg("--initial-cluster")
                .arg(&cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("start etcd")?,
        );
    }
    Ok(Etcd {
        children,
        clients: clients
            .iter()
            .map(|p| format!("https://127.0.0.1:{p}"))
            .collect(),
        ca_pem,
    })
}

pub(crate) fn which(bin: &str) -> anyhow::Result<()> {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("{bin} not found; run scripts/setup (Debian package etcd-server)");
    }
    Ok(())
}

pub(crate) fn etcd_options(ca_pem: &str) -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca_pem)),
    )
}

/// The etcd member that leads, as a client URL.
pub(crate) async fn etcd_leader(urls: &[String], ca_pem: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for u in urls {
            if let Ok(mut c) =
                etcd_client::Client::connect([u.as_str()], Some(etcd_options(ca_pem))).await
            {
                if let Ok(st) = c.status().await {
                    if st.header().map(|h| h.member_id()) == Some(st.leader()) {
                        return Ok(u.clone());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("etcd elected no leader")
}

fn print_row(system: &str, size: usize, conc: usize, c: &Cell) {
    println!(
        "{system:<8} {:>6} {:>5} {:>12.0} {:>10.2} {:>10.2}",
        format!("{}K", size / 1024),
        conc,
        c.ops_per_sec,
        c.p50_ms,
        c.p99_ms
    );
}

pub async fn raft(dur: Duration, failovers: usize, with_etcd: bool) -> anyhow::Result<()> {
    let bins = Binaries::locate()?;
    let tmp = tempfile::tempdir()?;
    let mut cluster =
        LocalCluster::generate(bins, &tmp.path().join("custody"), &GenOptions::default())?;
    cluster.start_all()?;
    let leader = cluster
        .wait_for_leader(&[], Duration::from_secs(30))
        .await?;
    let client = Arc::new(cluster.client(&[leader])?);

    println!(
        "3-node clusters on loopback, fsync on, TLS on every link, {}s per cell",
        dur.as_secs()
    );
    println!(
        "{:<8} {:>6} {:>5} {:>12} {:>10} {:>10}",
        "system", "value", "conc", "commits/s", "p50 ms", "p99 ms"
    );
    let mut custody = Vec::new();
    for size in SIZES {
        for conc in CONCURRENCY {
            let value = vec![b'c'; size];
            let c = client.clone();
            let cell = drive(dur, conc, move |k| {
                let (c, v) = (c.clone(), value.clone());
                async move {
                    c.put(&k, v).await?;
                    Ok(())
                }
            })
            .await?;
            print_row("custody", size, conc, &cell);
            custody.push(((size, conc), cell));
        }
    }

    let mut etcd_cells = Vec::new();
    if with_etcd {
        let etcd = start_etcd(tmp.path())?;
        let leader_url = etcd_leader(&etcd.clients, &etcd.ca_pem).await?;
        let ec =
            etcd_client::Client::connect([leader_url.as_str()], Some(etcd_options(&etcd.ca_pem)))
                .await?;
        for size in SIZES {
            for conc in CONCURRENCY {
                let value = vec![b'e'; size];
                let kv = ec.kv_client();
                let cell = drive(dur, conc, move |k| {
                    let (mut kv, v) = (kv.clone(), value.clone());
                    async move {
                        kv.put(k, v, None).await?;
                        Ok(())
                    }
                })
                .await?;
                print_row("etcd", size, conc, &cell);
                etcd_cells.push(((size, conc), cell));
            }
        }
        drop(etcd);
        println!();
        println!(
            "{:<14} {:>5} {:>18} {:>18}",
            "value", "conc", "throughput c/e", "p99 latency c/e"
        );
        for ((k, c), (_, e)) in custody.iter().zip(&etcd_cells) {
            println!(
                "{:<14} {:>5} {:>18.2} {:>18.2}",
                format!("{}K", k.0 / 1024),
                k.1,
                c.ops_per_sec / e.ops_per_sec,
                c.p99_ms / e.p99_ms
            );
        }
    }

    if failovers > 0 {
        println!();
        let mut times = Vec::new();
        for trial in 0..failovers {
            let leader = cluster
                .wait_for_leader(&[], Duration::from_secs(30))
                .await?;
            let survivors: Vec<u64> = cluster
                .nodes
                .keys()
                .copied()
                .filter(|i| *i != leader)
                .collect();
            let writer = cluster.client_with_deadline(&survivors, Duration::from_secs(30))?;
            // Make sure the survivors' connections are warm.
            writer.put("failover/warm", b"x".to_vec()).await?;
            cluster.kill(leader)?;
            let t = Instant::now();
            writer
                .put(&format!("failover/{trial}"), b"x".to_vec())
                .await?;
            let took = t.elapsed();
            times.push(took);
            println!(
                "failover trial {trial}: {:.0} ms",
                took.as_secs_f64() * 1000.0
            );
            cluster.start(leader)?;
            cluster
                .wait_for_leader(&[], Duration::from_secs(30))
                .await?;
            // Let the restarted node catch up before the next kill.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "leader failover (SIGKILL to next acknowledged write), median of {}: {:.0} ms",
            times.len(),
            median.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// Latency of sequential API calls against an existing cluster (from
/// `CUSTODY_COORDINATOR`, `CUSTODY_CA`, `CUSTODY_TOKEN`), in consecutive rounds,
/// to show how latency evolves as the cluster takes writes.
pub async fn rpc_probe(calls: usize, rounds: usize) -> anyhow::Result<()> {
    let c = Client::from_env()?;
    let mut n = 0u64;
    for round in 1..=rounds {
        for what in ["status", "put 1K", "put 64K"] {
            let mut lat = Vec::with_capacity(calls);
            for _ in 0..calls {
                n += 1;
                let t = Instant::now();
                match what {
                    "status" => drop(c.node_status().await?),
                    "put 1K" => drop(c.put(&format!("probe/{n}"), vec![1u8; 1024]).await?),
                    _ => drop(c.put(&format!("probe/{n}"), vec![1u8; 65536]).await?),
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            lat.sort_unstable();
            println!(
                "round {round} {what:<8} p50 {:>6} us  p90 {:>6} us",
                lat[lat.len() / 2],
                lat[lat.len() * 9 / 10]
            );
        }
    }
    Ok(())
}
