//! `bench evidence`: evidence ingest, compression and strict-mode latency on a
//! local 3-node cluster (fsync on), through real exec sessions.
//!
//! - Ingest: concurrent sessions print generated shell and SQL-client style
//!   transcripts; MB/s of raw recorded events (the session records' raw bytes)
//!   over the wall time until every session has closed its chain.
//! - Compression: raw bytes / stored (zstd) bytes, per transcript kind.
//! - Strict mode: per-command latency of `true` on a strict resource against
//!   the same resource kind in async mode, measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;

use custody_cli::client::Client;
use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_proto::v1 as api;

const POLICY: &str = include_str!("../../examples/policy.yaml");

/// A shell transcript: directory listings and process tables.
const SHELL: &str = r#"i=0; while [ $i -lt N ]; do i=$((i+1)); echo "$ ls -la /srv/app/releases/$i"; ls -la /usr/bin | sed -n "$((i%300+1)),$((i%300+12))p"; echo "$ ps aux | grep worker"; echo "app      $((1000+i))  0.$((i%10))  1.2 123456 65432 ?  Ssl  10:$((i%60)):00   0:0$((i%10)) /usr/bin/worker --queue=jobs-$((i%7))"; done"#;
/// A SQL client transcript: an aligned result table.
const SQL: &str = r#"i=0; echo " id  |   name    |          email           |       created_at        | balance "; echo "-----+-----------+--------------------------+-------------------------+---------"; while [ $i -lt N ]; do i=$((i+1)); printf " %4d | user_%-4d | user%d@example.com%*s | 2024-0%d-%02d 1%d:%02d:%02d+00 | %7d.%02d\n" $i $i $i $((6-${#i})) "" $((i%9+1)) $((i%28+1)) $((i%10)) $((i%60)) $((i*7%60)) $((i*37%100000)) $((i%100)); done; echo "($((i)) rows)""#;

pub(crate) async fn exec_wait(
    client: &Client,
    resource: &str,
    argv: &[String],
) -> anyhow::Result<String> {
    let (tx, mut out) = client.exec_open(resource, argv).await?;
    let _ = tx
        .send(api::ExecInput {
            kind: Some(api::exec_input::Kind::StdinEof(true)),
        })
        .await;
    let mut sid = String::new();
    loop {
        match out.message().await?.and_then(|m| m.kind) {
            Some(api::exec_output::Kind::Started(s)) => sid = s.session_id,
            Some(api::exec_output::Kind::Exit(x)) if x.code == 0 => return Ok(sid),
            Some(api::exec_output::Kind::Exit(x)) => bail!("exit {}", x.code),
            Some(_) => {}
            None => bail!("no exit"),
        }
    }
}

pub async fn evidence(
    sessions: usize,
    iterations: usize,
    per_session_mb: u64,
    latency_runs: usize,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut c = LocalCluster::generate(Binaries::locate()?, tmp.path(), &GenOptions::default())?;
    c.start_all()?;
    c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    let mut spec = EdgeSpec::shell("bench-edge", "shell-async");
    spec.resources_toml = "[[resources]]\nname = \"shell-async\"\nkind = \"shell\"\nlabels = { env = \"dev\" }\n\
        [[resources]]\nname = \"shell-strict\"\nkind = \"shell\"\nlabels = { env = \"dev\", evidence = \"strict\" }\n"
        .into();
    c.add_edge(&spec)?;
    c.enroll_edge("bench-edge").await?;
    c.wait_for_resource("shell-strict", 3, Duration::from_secs(30))
        .await?;
    let alice = c.mint_token("alice").await?.token;
    let client = Arc::new(c.client_as(&[], Duration::from_secs(60), Some(alice.clone()))?);
    let admin = c.client(&[])?;

    // Generate one transcript of each kind on the edge host (not timed), then
    // replay them with `cat`, so the producers are never the bottleneck.
    let mut files = Vec::new();
    for (kind, script, n) in [("shell", SHELL, iterations), ("sql", SQL, iterations * 40)] {
        let path = tmp.path().join(format!("{kind}.txt"));
        let gen = format!(
            "{{ {}; }} > {}",
            script.replace("N", &n.to_string()),
            path.display()
        );
        exec_wait(&client, "shell-async", &["sh".into(), "-c".into(), gen]).await?;
        let len = std::fs::metadata(&path)?.len().max(1);
        files.push((kind, path, len));
    }
    println!("== evidence ingest: {sessions} concurrent sessions per transcript kind, {per_session_mb} MB each ==");
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..sessions {
        for (kind, path, len) in &files {
            let client = client.clone();
            let repeats = (per_session_mb << 20) / len + 1;
            let script = format!(
                "i=0; while [ $i -lt {repeats} ]; do i=$((i+1)); cat {}; done",
                path.display()
            );
            let kind = *kind;
            tasks.push(tokio::spawn(async move {
                exec_wait(&client, "shell-async", &["sh".into(), "-c".into(), script])
                    .await
                    .map(|sid| (kind, sid, k))
            }));
        }
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await??);
    }
    let secs = t0.elapsed().as_secs_f64();
    let list = admin
        .list_sessions(api::ListSessionsRequest::default())
        .await
        .context("list sessions")?;
    let (mut raw, mut stored) = ([0u64; 2], [0u64; 2]);
    for (kind, sid, _) in &ids {
        let s = list
            .iter()
            .find(|s| s.session_id == *sid)
            .context("session missing")?;
        let i = usize::from(*kind == "sql");
        raw[i] += s.raw_bytes;
        stored[i] += s.stored_bytes;
    }
    let total_raw = (raw[0] + raw[1]) as f64;
    println!(
        "raw events recorded: {:.1} MB in {secs:.2} s = {:.1} MB/s (target >= 50)",
        total_raw / 1e6,
        total_raw / 1e6 / secs
    );
    println!(
        "compression: shell transcripts {:.1}x ({:.1} MB -> {:.2} MB), SQL result tables {:.1}x ({:.1} MB -> {:.2} MB) (target >= 5)",
        raw[0] as f64 / stored[0].max(1) as f64,
        raw[0] as f64 / 1e6,
        stored[0] as f64 / 1e6,
        raw[1] as f64 / stored[1].max(1) as f64,
        raw[1] as f64 / 1e6,
        stored[1] as f64 / 1e6,
    );

    println!("== strict-mode latency: {latency_runs} sequential `true` per mode ==");
    let argv: Vec<String> = vec!["true".into()];
    let mut h = [Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?];
    for round in 0..latency_runs {
        // Alternate so drift in the machine affects both alike.
        for (i, res) in ["shell-async", "shell-strict"].iter().enumerate() {
            let t = Instant::now();
            exec_wait(&client, res, &argv).await?;
            if round > 2 {
                h[i].record(t.elapsed().as_micros() as u64)?;
            }
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "async:  p50 {:.2} ms  p99 {:.2} ms",
        ms(&h[0], 0.5),
        ms(&h[0], 0.99)
    );
    println!(
        "strict: p50 {:.2} ms  p99 {:.2} ms",
        ms(&h[1], 0.5),
        ms(&h[1], 0.99)
    );
    println!(
        "added by strict mode: p50 {:.2} ms, p99 {:.2} ms (target p50 <= 2)",
        ms(&h[1], 0.5) - ms(&h[0], 0.5),
        ms(&h[1], 0.99) - ms(&h[0], 0.99)
    );
    Ok(())
}
