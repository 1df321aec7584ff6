//! `bench mcp`: what an MCP `query` tool call (a one-row select) costs, in
//! one run against a local cluster and PostgreSQL: over stdio (one
//! `custody mcp` process, the call through the `Tools` API) and over HTTP (a
//! coordinator's `/mcp`, a handshake-era session), against `custody exec
//! --sql` of the same statement (a process per call, as a shell script would
//! run it) and the same statement through the PostgreSQL gateway from a
//! library client (no process start). Medians of `calls` calls each, after a
//! warm-up; each is its own governed session.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_cli::localpg::LocalPostgres;

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
rules:
  - name: agents-postgres
    identity: { groups: [ai-agents] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: allow
# Every call of the run within one minute.
mcp: { calls_per_minute: 100000 }
"#;

const SQL: &str = "select 1 as one";
const RESOURCE: &str = "bench-pg";
const WARMUP: usize = 5;

fn median_ms(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.9))
}

fn tool_call(id: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
        "name": "query",
        "arguments": {"resource": RESOURCE, "sql": SQL, "reason": "benchmark"},
    }})
}

/// Checks a `tools/call` response carries the one row.
fn check(v: &Value) -> anyhow::Result<()> {
    let rows = &v["result"]["structuredContent"]["rows"];
    if rows != &json!([["1"]]) {
        bail!("unexpected tool result: {v}");
    }
    Ok(())
}

pub async fn mcp(calls: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let bins = Binaries::locate()?;
    let pg = LocalPostgres::start(&tmp.path().join("pg"))?;
    let mut c = LocalCluster::generate(bins, &tmp.path().join("cluster"), &GenOptions::default())?;
    c.start_all()?;
    let leader = c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    let mut spec = EdgeSpec::shell("bench-edge", "unused");
    spec.resources_toml = pg.resource_toml(RESOURCE, "env = \"bench\"");
    c.add_edge(&spec)?;
    c.enroll_edge("bench-edge").await?;
    c.wait_for_resource(RESOURCE, 3, Duration::from_secs(30))
        .await?;
    let token = c.mint_token("agent").await?.token;
    let api = c.api_urls(&[leader]);
    let ca = c.ca_path();
    let node_cfg: toml::Table =
        toml::from_str(&std::fs::read_to_string(&c.nodes[&leader].config)?)?;
    let listen = |k: &str| -> anyhow::Result<String> {
        Ok(node_cfg["listen"][k]
            .as_str()
            .with_context(|| format!("the node has no listen.{k}"))?
            .to_owned())
    };
    let pg_addr: std::net::SocketAddr = listen("postgres")?.parse()?;
    let mcp_url = format!("https://{}/mcp", listen("mcp")?);
    println!(
        "MCP `query` tool calls ({SQL:?}, one row, strict evidence) against the same statement without MCP; gateway on the Raft leader, node {leader}; {calls} calls each, medians"
    );

    // `custody exec --sql`: a process per call.
    let mut exec_ms = Vec::new();
    for i in 0..WARMUP + calls {
        let t0 = Instant::now();
        let out = Command::new(&c.bins.custody)
            .args(["exec", RESOURCE, "--sql", SQL])
            .env("CUSTODY_COORDINATOR", &api)
            .env("CUSTODY_CA", &ca)
            .env("CUSTODY_TOKEN", &token)
            .env_remove("CUSTODY_TOKEN_FILE")
            .output()?;
        if !out.status.success() {
            bail!(
                "custody exec --sql: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if i >= WARMUP {
            exec_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // The same statement from a library client (no process start).
    let tls = custody_cli::pg::tls_config(&ca)?;
    let mut lib_ms = Vec::new();
    for i in 0..WARMUP + calls {
        let t0 = Instant::now();
        let r = custody_cli::pg::query(pg_addr, tls.clone(), RESOURCE, &token, SQL, &[]).await?;
        if r.rows != vec![vec![Some("1".to_string())]] {
            bail!("library query: unexpected rows {:?}", r.rows);
        }
        if i >= WARMUP {
            lib_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // stdio: one `custody mcp`, newline-delimited JSON-RPC.
    let mut child = Command::new(&c.bins.custody)
        .arg("mcp")
        .env("CUSTODY_COORDINATOR", &api)
        .env("CUSTODY_CA", &ca)
        .env("CUSTODY_TOKEN", &token)
        .env_remove("CUSTODY_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut send = |v: &Value| -> anyhow::Result<()> {
        writeln!(stdin, "{v}")?;
        stdin.flush()?;
        Ok(())
    };
    let mut answer = |id: u64| -> anyhow::Result<Value> {
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line)? == 0 {
                bail!("custody mcp closed its output");
            }
            let v: Value = serde_json::from_str(&line)?;
            if v["id"] == json!(id) {
                return Ok(v);
            }
        }
    };
    send(
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "custody-bench", "version": "1"}}}),
    )?;
    answer(0)?;
    send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
    let mut stdio_ms = Vec::new();
    for i in 0..WARMUP + calls {
        let id = i as u64 + 1;
        let t0 = Instant::now();
        send(&tool_call(id))?;
        check(&answer(id)?)?;
        if i >= WARMUP {
            stdio_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    // HTTP: a handshake-era session at /mcp.
    let pem = std::fs::read(&ca)?;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .build()?;
    let post = |body: Value, session: Option<String>| {
        let mut r = http
            .post(&mcp_url)
            .bearer_auth(&token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25")
            .json(&body);
        if let Some(s) = session {
            r = r.header("mcp-session-id", s);
        }
        r.send()
    };
    let r = post(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "custody-bench", "version": "1"}}}),
        None,
    )
    .await?;
    let session = r
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .context("no session id from /mcp")?;
    r.bytes().await?;
    post(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        Some(session.clone()),
    )
    .await?
    .bytes()
    .await?;
    let mut http_ms = Vec::new();
    for i in 0..WARMUP + calls {
        let id = i as u64 + 1;
        let t0 = Instant::now();
        let body = post(tool_call(id), Some(session.clone()))
            .await?
            .text()
            .await?;
        // JSON, or the response as a server-sent event.
        let v: Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(_) => body
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
                .find(|v| v["id"] == json!(id))
                .with_context(|| format!("no response in {body:?}"))?,
        };
        check(&v)?;
        if i >= WARMUP {
            http_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }

    let (lib, _) = median_ms(lib_ms.clone());
    let (exec, _) = median_ms(exec_ms.clone());
    println!(
        "  {:<34} {:>9} {:>9} {:>13} {:>13}",
        "path", "p50 ms", "p90 ms", "- library ms", "- exec ms"
    );
    for (name, v) in [
        ("library client (gateway only)", lib_ms),
        ("custody exec --sql (a process)", exec_ms),
        ("MCP query over stdio", stdio_ms),
        ("MCP query over HTTP (/mcp)", http_ms),
    ] {
        let (p50, p90) = median_ms(v);
        println!(
            "  {name:<34} {p50:>9.2} {p90:>9.2} {:>+13.2} {:>+13.2}",
            p50 - lib,
            p50 - exec
        );
    }
    drop(pg);
    Ok(())
}
