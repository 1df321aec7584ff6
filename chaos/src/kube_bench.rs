//! `bench kube`: Kubernetes API requests direct to the tests' API server
//! (`custody-kube-test-server`, not a real cluster) and through Custody
//! (gateway → edge → API server) in one run: `GET pods` with `--pods` pods,
//! one client after another on a kept-alive connection (requests per second
//! and latency percentiles), and a pod log of `--log-mb` MiB streamed
//! (MB/s). Custody runs also report the CPU time the coordinators and the
//! edge used per request and per MB (from `/proc`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_cli::localkube::LocalKube;

use crate::pg_bench::{clock_ticks, cpu_ticks, custody_processes};

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
rules:
  - name: engineers-kube
    identity: { groups: [engineers] }
    resource: { kinds: [kubernetes] }
    actions: ["kube:get", "kube:list", "kube:logs", "kube:create"]
    decision: allow
"#;

/// The pod whose log is the stream measured.
const BULK_POD: &str = "bulk-log";
/// The test server's annotation for a pod's log size (as
/// `custody_tests::kube_api::LOG_BYTES_ANNOTATION`).
const LOG_BYTES_ANNOTATION: &str = "custody.test/log-bytes";

struct Target {
    name: &'static str,
    base: String,
    client: reqwest::Client,
    token: String,
}

impl Target {
    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{}: GET {path}", self.name))?;
        if !r.status().is_success() {
            bail!(
                "{}: GET {path}: {} {}",
                self.name,
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(r)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `pods`: pods listed by each request; `requests`: per path;
/// `log_mb`: the streamed log's size.
pub async fn kube(pods: usize, requests: usize, log_mb: u64) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let bins = Binaries::locate()?;
    let server = LocalKube::binary(&bins.custody).context(
        "custody-kube-test-server is not built next to custody (cargo build --release --bins)",
    )?;
    let mut api = LocalKube::start(
        &server,
        &tmp.path().join("kube"),
        &tmp.path().join("kube.log"),
    )?;
    let result = run(&api, bins, tmp.path(), pods, requests, log_mb).await;
    let _ = api.child.kill();
    let _ = api.child.wait();
    result
}

async fn run(
    api: &LocalKube,
    bins: Binaries,
    dir: &std::path::Path,
    pods: usize,
    requests: usize,
    log_mb: u64,
) -> anyhow::Result<()> {
    let mut c = LocalCluster::generate(bins, &dir.join("cluster"), &GenOptions::default())?;
    c.start_all()?;
    let leader = c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    let mut spec = EdgeSpec::shell("bench-edge", "unused");
    spec.resources_toml = api.resource_toml("bench-kube", "env = \"bench\"");
    c.add_edge(&spec)?;
    c.enroll_edge("bench-edge").await?;
    c.wait_for_resource("bench-kube", 3, Duration::from_secs(30))
        .await?;
    let client = |ca: &std::path::Path| -> anyhow::Result<reqwest::Client> {
        let pem = std::fs::read(ca)?;
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .http1_only()
            .build()?)
    };
    let direct = Target {
        name: "direct",
        base: api.url.clone(),
        client: client(&api.ca_file)?,
        token: std::fs::read_to_string(&api.token_file)?.trim().to_owned(),
    };
    let node_cfg: toml::Table =
        toml::from_str(&std::fs::read_to_string(&c.nodes[&leader].config)?)?;
    let kube_addr = node_cfg["listen"]["kubernetes"]
        .as_str()
        .context("the node has no listen.kubernetes")?;
    let through = Target {
        name: "custody",
        base: format!("https://{kube_addr}/k8s/bench-kube"),
        client: client(&c.ca_path())?,
        token: c.mint_token("alice").await?.token,
    };

    // The pods, created direct.
    for i in 0..pods {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("bench-{i:04}"), "labels": {"app": "bench"}},
            "spec": {"containers": [{"name": "app", "image": "busybox:1.36"}]},
        });
        create(&direct, &pod).await?;
    }
    let mut bulk = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": BULK_POD, "annotations": {}},
        "spec": {"containers": [{"name": "app", "image": "busybox:1.36"}]},
    });
    bulk["metadata"]["annotations"][LOG_BYTES_ANNOTATION] = (log_mb << 20).to_string().into();
    create(&direct, &bulk).await?;

    let procs = custody_processes(&c);
    let tick = 1.0 / clock_ticks() as f64;
    let cpu = || -> Vec<u64> { procs.iter().map(|(_, p)| cpu_ticks(*p)).collect() };
    let used = |before: &[u64]| -> f64 {
        procs
            .iter()
            .zip(before)
            .map(|((_, p), b)| cpu_ticks(*p).saturating_sub(*b) as f64 * tick)
            .sum()
    };
    println!(
        "Kubernetes API direct to the tests' API server and through Custody (gateway -> edge -> API server); gateway on the Raft leader, node {leader}"
    );

    let list = "/api/v1/namespaces/default/pods";
    println!(
        "GET {list} ({} pods), {requests} requests one after another:",
        pods + 1
    );
    let mut rps = Vec::new();
    for t in [&direct, &through] {
        // Warm-up: the connection, and the caches on the way.
        for _ in 0..5 {
            t.get(list).await?.bytes().await?;
        }
        let before = cpu();
        let start = Instant::now();
        let mut lat = Vec::with_capacity(requests);
        for _ in 0..requests {
            let t0 = Instant::now();
            let body = t.get(list).await?.bytes().await?;
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            if body.len() < 100 {
                bail!("{}: a short list ({} bytes)", t.name, body.len());
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu_ms = used(&before) * 1000.0 / requests as f64;
        lat.sort_by(|a, b| a.total_cmp(b));
        let r = requests as f64 / secs;
        rps.push((r, percentile(&lat, 0.5)));
        println!(
            "  {:<8} {r:>8.1} req/s   p50 {:>7.2} ms   p90 {:>7.2} ms   p99 {:>7.2} ms{}",
            t.name,
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            if t.name == "custody" {
                format!("   custody CPU {cpu_ms:.2} ms/request")
            } else {
                String::new()
            }
        );
    }
    println!(
        "  custody/direct: {:.2}x the requests per second; p50 added {:+.2} ms",
        rps[1].0 / rps[0].0,
        rps[1].1 - rps[0].1
    );

    let log = format!("/api/v1/namespaces/default/pods/{BULK_POD}/log");
    println!("GET {log} ({log_mb} MiB streamed):");
    let mut speeds = Vec::new();
    for t in [&direct, &through] {
        let before = cpu();
        let start = Instant::now();
        let mut r = t.get(&log).await?;
        let mut n = 0u64;
        while let Some(chunk) = r.chunk().await? {
            n += chunk.len() as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        if n != log_mb << 20 {
            bail!(
                "{}: the log had {n} bytes, expected {}",
                t.name,
                log_mb << 20
            );
        }
        let mbs = n as f64 / (1 << 20) as f64 / secs;
        speeds.push(mbs);
        println!(
            "  {:<8} {mbs:>8.1} MB/s{}",
            t.name,
            if t.name == "custody" {
                format!(
                    "   custody CPU {:.2} ms/MB",
                    used(&before) * 1000.0 / log_mb as f64
                )
            } else {
                String::new()
            }
        );
    }
    println!("  custody/direct: {:.2}x", speeds[1] / speeds[0]);
    Ok(())
}

async fn create(t: &Target, pod: &serde_json::Value) -> anyhow::Result<()> {
    let r = t
        .client
        .post(format!("{}/api/v1/namespaces/default/pods", t.base))
        .bearer_auth(&t.token)
        .json(pod)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "create a pod: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}
