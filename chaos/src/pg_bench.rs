//! `bench postgres`: pgbench through three paths measured in one run —
//! direct to PostgreSQL, through pgbouncer (session mode), and through Custody
//! (`custody connect` → gateway → edge, strict evidence) — for `-S` (select
//! only) and `-M prepared` (TPC-B-like), with the custody/direct and
//! custody/pgbouncer ratios.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_cli::localpg::{self, LocalPostgres};

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
rules:
  - name: engineers-db
    identity: { groups: [engineers] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: allow
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..150 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on port {port}")
}

/// (tps, average latency ms) from pgbench's report.
fn parse(out: &str) -> anyhow::Result<(f64, f64)> {
    let num = |prefix: &str| -> Option<f64> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps = num("tps = ").context("no tps in pgbench output")?;
    let lat = num("latency average = ").unwrap_or(f64::NAN);
    Ok((tps, lat))
}

fn pgbench(env: &[(String, String)], args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("pgbench")
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .context("run pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "pgbench {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text)
}

fn with_port(env: &[(String, String)], port: u16) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| {
            if k == "PGPORT" {
                (k.clone(), port.to_string())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

/// pgbouncer in session mode in front of `pg`, if installed.
fn pgbouncer(pg: &LocalPostgres, dir: &std::path::Path) -> anyhow::Result<Option<(Killed, u16)>> {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists());
    let Some(bin) = bin else {
        return Ok(None);
    };
    let port = free_port()?;
    std::fs::create_dir_all(dir)?;
    let users = dir.join("userlist.txt");
    std::fs::write(&users, format!("\"postgres\" \"{}\"\n", localpg::PASSWORD))?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {}\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 50\nlogfile = {}\n",
            pg.port,
            users.display(),
            dir.join("pgbouncer.log").display()
        ),
    )?;
    if localpg::is_root() {
        Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(dir)
            .status()?;
    }
    let child = localpg::as_pg_user(&bin)
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start pgbouncer")?;
    let k = Killed(child);
    wait_port(port)?;
    Ok(Some((k, port)))
}

pub async fn postgres(seconds: u64, clients: usize, scale: u32) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = LocalPostgres::start(&tmp.path().join("pg"))?;
    let direct = pg.direct_env();
    let out = Command::new("pgbench")
        .args(["-i", "-q", "-s", &scale.to_string()])
        .envs(direct.iter().cloned())
        .output()?;
    if !out.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    }
    let bouncer = pgbouncer(&pg, &tmp.path().join("bouncer"))?;

    let bins = Binaries::locate()?;
    let mut c = LocalCluster::generate(bins, &tmp.path().join("cluster"), &GenOptions::default())?;
    c.start_all()?;
    c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    let mut spec = EdgeSpec::shell("bench-edge", "bench-db");
    spec.resources_toml = pg.resource_toml("bench-db", "evidence = \"strict\"");
    c.add_edge(&spec)?;
    c.enroll_edge("bench-edge").await?;
    c.wait_for_resource("bench-db", 3, Duration::from_secs(30))
        .await?;
    let alice = c.mint_token("alice").await?.token;
    let port = free_port()?;
    let connect = Killed(
        Command::new(&c.bins.custody)
            .args(["connect", "bench-db", "--port", &port.to_string()])
            .env("CUSTODY_COORDINATOR", c.api_urls(&[]))
            .env("CUSTODY_CA", c.ca_path())
            .env("CUSTODY_TOKEN", &alice)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start custody connect")?,
    );
    wait_port(port)?;
    let custody_env = with_port(&direct, port);

    println!(
        "pgbench, {clients} clients, {seconds}s per run, scale {scale}; custody = custody connect -> gateway -> edge, strict evidence"
    );
    println!(
        "{:<22} {:<10} {:>10} {:>12}",
        "workload", "path", "tps", "latency ms"
    );
    let secs = seconds.to_string();
    let c_s = clients.to_string();
    let jobs = clients.min(4).to_string();
    for (name, args) in [
        ("select-only (-S)", vec!["-S", "-n"]),
        ("tpc-b (-M prepared)", vec!["-M", "prepared", "-n"]),
    ] {
        let mut all: Vec<&str> = args.clone();
        all.extend_from_slice(&["-c", &c_s, "-j", &jobs, "-T", &secs]);
        let d = pgbench(&direct, &all)?;
        let b = match &bouncer {
            Some((_, p)) => Some(pgbench(&with_port(&direct, *p), &all)?),
            None => None,
        };
        let cu = pgbench(&custody_env, &all)?;
        println!("{name:<22} {:<10} {:>10.0} {:>12.3}", "direct", d.0, d.1);
        if let Some(b) = b {
            println!("{name:<22} {:<10} {:>10.0} {:>12.3}", "pgbouncer", b.0, b.1);
        }
        println!("{name:<22} {:<10} {:>10.0} {:>12.3}", "custody", cu.0, cu.1);
        print!("{name:<22} custody/direct {:.2}", cu.0 / d.0);
        match b {
            Some(b) => println!(", custody/pgbouncer {:.2}", cu.0 / b.0),
            None => println!(" (pgbouncer not installed: no baseline)"),
        }
    }
    drop(connect);
    drop(bouncer);
    Ok(())
}
