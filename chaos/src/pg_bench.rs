//! `bench postgres`: pgbench through several paths measured in one run —
//! direct to PostgreSQL, through pgbouncer (session mode), and through Custody
//! (`custody connect` → gateway → edge) with strict and with async evidence —
//! for `-S` (select only) and `-M prepared` (TPC-B-like), with the
//! custody/direct and custody/pgbouncer ratios; then the masking overhead: a
//! result-heavy query through two strict resources that differ only in their
//! masking profile. Each custody run also reports the CPU time custody's
//! processes used per transaction (from `/proc`).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_cli::localpg::{self, LocalPostgres};

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
guardrails:
  - name: destructive-statements
    sql: [drop, truncate, delete_without_where, update_without_where]
    decision: deny
rules:
  - name: engineers-db-guarded
    identity: { groups: [engineers] }
    resource: { names: [bench-db-guarded] }
    actions: [connect]
    decision: allow
    guardrails: [destructive-statements]
  - name: engineers-db-masked
    identity: { groups: [engineers] }
    resource: { names: [bench-db-masked, bench-db-all-masked] }
    actions: [connect]
    decision: allow
    mask: [pii]
  - name: engineers-db
    identity: { groups: [engineers] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: allow
masking:
  - name: pii
    detectors: [credit_card, email, us_ssn, iban, ip, phone]
    columns: ["*ssn*"]
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

/// The duration pgbench's `args` ask for (`-T`), in seconds.
fn duration(args: &[&str]) -> Option<u64> {
    args.iter()
        .position(|a| *a == "-T")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
}

/// Runs pgbench; a run that outlives its `-T` by a minute is killed and
/// reported (a hung path must fail the benchmark, not stall it).
fn pgbench(env: &[(String, String)], args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let secs = duration(args).unwrap_or(60);
    let mut child = Command::new("pgbench")
        .args(args)
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run pgbench")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(secs + 60);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "pgbench {args:?} did not finish within {}s: {}{}",
                secs + 60,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output()?;
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
/// A running pgbouncer: started through `runuser` when root, so the
/// process to stop is the one its pid file names.
struct Bouncer {
    wrapper: Killed,
    pidfile: std::path::PathBuf,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let _ = self.wrapper.0.kill();
    }
}

fn pgbouncer(pg: &LocalPostgres, dir: &std::path::Path) -> anyhow::Result<Option<(Bouncer, u16)>> {
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
            "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {}\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 50\nlogfile = {}\npidfile = {}\n",
            pg.port,
            users.display(),
            dir.join("pgbouncer.log").display(),
            dir.join("pgbouncer.pid").display()
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
    let b = Bouncer {
        wrapper: Killed(child),
        pidfile: dir.join("pgbouncer.pid"),
    };
    wait_port(port)?;
    Ok(Some((b, port)))
}

/// Rows of the result-heavy workload: names, emails, Luhn-valid card numbers
/// and free text, so the detectors both hit and miss.
const PEOPLE: &str =
    "CREATE TABLE bench_people (id int PRIMARY KEY, name text, email text, card text, note text); \
INSERT INTO bench_people SELECT g, 'Customer ' || g, 'user' || g || '@example.com', \
CASE WHEN g % 2 = 0 THEN '4111 1111 1111 1111' ELSE 'n/a' END, \
'order ' || g || ' shipped to warehouse ' || (g % 17) || ', signed for at the door' \
FROM generate_series(1, 10000) g";

/// Labels of the resources that record every row (caps far above a run).
const ALL_ROWS: &str =
    "evidence = \"strict\", evidence_rows = \"1000000000\", evidence_bytes = \"64g\"";

/// 200 rows of five columns per transaction.
const RESULT_HEAVY: &str =
    "\\set a random(1, 9800)\nSELECT * FROM bench_people WHERE id BETWEEN :a AND :a + 199;\n";

/// A running `custody connect` for one resource.
/// `node`: the coordinator whose gateway to use (`None`: the first that
/// answers, as the CLI picks).
fn connect(
    c: &LocalCluster,
    token: &str,
    resource: &str,
    node: Option<u64>,
) -> anyhow::Result<(Killed, u16)> {
    let port = free_port()?;
    let ids: Vec<u64> = node.into_iter().collect();
    let child = Command::new(&c.bins.custody)
        .args(["connect", resource, "--port", &port.to_string()])
        .env("CUSTODY_COORDINATOR", c.api_urls(&ids))
        .env("CUSTODY_CA", c.ca_path())
        .env("CUSTODY_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start custody connect")?;
    let k = Killed(child);
    wait_port(port)?;
    Ok((k, port))
}

/// CPU time (user + system, in clock ticks) used so far by process `pid`,
/// from `/proc/<pid>/stat`; 0 when it is gone.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The fields after the command name (which may hold spaces and
    // parentheses) start with the state; utime and stime are the 12th and
    // 13th of them.
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    tick(11) + tick(12)
}

/// The coordinators (`node N`) and the edges (`edge`) of `c`, by pid.
pub(crate) fn custody_processes(c: &LocalCluster) -> Vec<(String, u32)> {
    c.nodes
        .iter()
        .filter_map(|(id, n)| Some((format!("node {id}"), n.pid()?)))
        .chain(
            c.edges
                .values()
                .filter_map(|e| Some(("edge".to_string(), e.pid()?))),
        )
        .collect()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that fails).
pub(crate) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn row(name: &str, path: &str, r: (f64, f64)) {
    println!("{name:<22} {path:<16} {:>10.0} {:>12.3}", r.0, r.1);
}

/// The select-only statement over tokio-postgres, in `clients` loops for
/// `seconds`, each statement preceded by `before` (a no-op, or a commit to
/// etcd): (tps, average latency ms), as pgbench reports them.
async fn select_loop<F, Fut>(
    conninfo: &str,
    clients: usize,
    seconds: u64,
    accounts: u32,
    before: F,
) -> anyhow::Result<(f64, f64)>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let start = std::time::Instant::now();
    let run = Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..clients {
        let (pg, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
            .await
            .context("connect to PostgreSQL")?;
        tokio::spawn(conn);
        let before = before.clone();
        tasks.spawn(async move {
            let mut done = 0u64;
            while start.elapsed() < run {
                before(w, done).await?;
                let aid = rand::random::<u32>() % accounts + 1;
                pg.simple_query(&format!(
                    "SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
                ))
                .await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut total = 0u64;
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    let tps = total as f64 / start.elapsed().as_secs_f64();
    Ok((tps, clients as f64 / tps * 1000.0))
}

/// The floor strict evidence puts under any gateway on this machine: the
/// select-only loop direct, then with each statement first committed (a
/// 256-byte put) to a 3-node etcd with fsync and TLS, as a strict gateway
/// must commit its evidence before forwarding. `None` when etcd is not
/// installed.
async fn commit_floor(
    dir: &std::path::Path,
    conninfo: &str,
    clients: usize,
    seconds: u64,
    accounts: u32,
) -> anyhow::Result<Option<((f64, f64), (f64, f64))>> {
    if crate::bench::which("etcd").is_err() {
        return Ok(None);
    }
    let plain = select_loop(conninfo, clients, seconds, accounts, |_, _| async {
        anyhow::Ok(())
    })
    .await?;
    std::fs::create_dir_all(dir)?;
    let etcd = crate::bench::start_etcd(dir)?;
    let url = crate::bench::etcd_leader(&etcd.clients, &etcd.ca_pem).await?;
    let kv = etcd_client::Client::connect([url], Some(crate::bench::etcd_options(&etcd.ca_pem)))
        .await?
        .kv_client();
    let record = vec![b'e'; 256];
    let committed = select_loop(conninfo, clients, seconds, accounts, move |w, i| {
        let (mut kv, record) = (kv.clone(), record.clone());
        async move {
            kv.put(format!("evidence/{w}/{i}"), record, None).await?;
            anyhow::Ok(())
        }
    })
    .await?;
    drop(etcd);
    Ok(Some((plain, committed)))
}

/// `only`: the workloads to run (`select`, `tpcb`, `masking`); empty = all.
/// `gateway`: the node whose gateway the clients use — an id, `leader` or
/// `follower` (`None`: the first that answers, as the CLI picks).
pub async fn postgres(
    seconds: u64,
    clients: usize,
    scale: u32,
    only: &[String],
    gateway: Option<&str>,
) -> anyhow::Result<()> {
    for w in only {
        if !["select", "tpcb", "masking"].contains(&w.as_str()) {
            bail!("unknown workload {w:?} (select, tpcb, masking)");
        }
    }
    let wanted = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let tmp = tempfile::tempdir()?;
    let pg = LocalPostgres::start(&tmp.path().join("pg"))?;
    let direct = pg.direct_env();
    let var = |k: &str| {
        direct
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let conninfo = format!(
        "host={} port={} user={} password={} dbname={}",
        var("PGHOST"),
        var("PGPORT"),
        var("PGUSER"),
        var("PGPASSWORD"),
        var("PGDATABASE")
    );
    let out = Command::new("pgbench")
        .args(["-i", "-q", "-s", &scale.to_string()])
        .envs(direct.iter().cloned())
        .output()?;
    if !out.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-c", PEOPLE])
        .envs(direct.iter().cloned())
        .output()?;
    if !out.status.success() {
        bail!(
            "seed bench_people: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let script = tmp.path().join("result-heavy.sql");
    std::fs::write(&script, RESULT_HEAVY)?;
    let bouncer = pgbouncer(&pg, &tmp.path().join("bouncer"))?;

    let bins = Binaries::locate()?;
    let mut c = LocalCluster::generate(bins, &tmp.path().join("cluster"), &GenOptions::default())?;
    c.start_all()?;
    let leader = c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    let gateway: Option<u64> = match gateway {
        None => None,
        Some("leader") => Some(leader),
        Some("follower") => c.nodes.keys().copied().find(|id| *id != leader),
        Some(n) => Some(
            n.parse()
                .context("--gateway: a node id, leader or follower")?,
        ),
    };
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    let mut spec = EdgeSpec::shell("bench-edge", "bench-db");
    spec.resources_toml = [
        pg.resource_toml("bench-db", "evidence = \"strict\""),
        pg.resource_toml("bench-db-async", "evidence = \"async\""),
        pg.resource_toml("bench-db-masked", "evidence = \"strict\""),
        pg.resource_toml("bench-db-all", ALL_ROWS),
        pg.resource_toml("bench-db-all-masked", ALL_ROWS),
        pg.resource_toml("bench-db-guarded", "evidence = \"strict\""),
    ]
    .concat();
    c.add_edge(&spec)?;
    c.enroll_edge("bench-edge").await?;
    for r in [
        "bench-db",
        "bench-db-async",
        "bench-db-masked",
        "bench-db-all",
        "bench-db-all-masked",
        "bench-db-guarded",
    ] {
        c.wait_for_resource(r, 3, Duration::from_secs(30)).await?;
    }
    let alice = c.mint_token("alice").await?.token;
    let (strict_proc, strict_port) = connect(&c, &alice, "bench-db", gateway)?;
    let (async_proc, async_port) = connect(&c, &alice, "bench-db-async", gateway)?;
    let (masked_proc, masked_port) = connect(&c, &alice, "bench-db-masked", gateway)?;
    let (all_proc, all_port) = connect(&c, &alice, "bench-db-all", gateway)?;
    let (all_masked_proc, all_masked_port) = connect(&c, &alice, "bench-db-all-masked", gateway)?;
    let (guarded_proc, guarded_port) = connect(&c, &alice, "bench-db-guarded", gateway)?;
    // Custody's own processes: the coordinators and the edge (each run adds
    // its `custody connect`), for CPU time per statement.
    let custody_pids = custody_processes(&c);

    println!(
        "pgbench, {clients} clients, {seconds}s per run, scale {scale}; custody = custody connect -> gateway -> edge; gateway on {}, Raft leader node {leader}",
        gateway.map_or("the node the CLI picked".to_string(), |g| format!("node {g}"))
    );
    println!(
        "{:<22} {:<16} {:>10} {:>12}",
        "workload", "path", "tps", "latency ms"
    );
    let tick_us = 1e6 / clock_ticks() as f64;
    // One pgbench run on `port`, with the CPU time custody's processes (and
    // that port's `custody connect`) used per transaction, in µs: in all,
    // and per process. It includes work done per second rather than per
    // statement (heartbeats, compactions), so the slower path is charged a
    // little more of it.
    type Cpu = (f64, Vec<(String, f64)>);
    let measured =
        |port: u16, connect: &Killed, args: &[&str]| -> anyhow::Result<((f64, f64), Cpu)> {
            let mut procs = custody_pids.clone();
            procs.push(("connect".into(), connect.0.id()));
            let before: Vec<u64> = procs.iter().map(|(_, p)| cpu_ticks(*p)).collect();
            let r = pgbench(&with_port(&direct, port), args)?;
            let statements = (r.0 * duration(args).unwrap_or(1) as f64).max(1.0);
            let per: Vec<(String, f64)> = procs
                .iter()
                .zip(before)
                .map(|((name, pid), b)| {
                    let used = cpu_ticks(*pid).saturating_sub(b) as f64 * tick_us;
                    (name.clone(), used / statements)
                })
                .collect();
            Ok((r, (per.iter().map(|(_, u)| u).sum(), per)))
        };
    const ROUNDS: u64 = 5;
    let add = |sum: &mut Cpu, c: &Cpu| {
        sum.0 += c.0 / ROUNDS as f64;
        if sum.1.is_empty() {
            sum.1 = c.1.iter().map(|(n, _)| (n.clone(), 0.0)).collect();
        }
        for (s, (_, u)) in sum.1.iter_mut().zip(&c.1) {
            s.1 += u / ROUNDS as f64;
        }
    };
    let show = |c: &Cpu| -> String {
        c.1.iter()
            .map(|(n, u)| format!("{n} {u:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let secs = seconds.to_string();
    let c_s = clients.to_string();
    let jobs = clients.min(4).to_string();
    let common = ["-n", "-c", &c_s, "-j", &jobs, "-T", &secs];
    for (key, name, args) in [
        ("select", "select-only (-S)", vec!["-S"]),
        ("tpcb", "tpc-b (-M prepared)", vec!["-M", "prepared"]),
    ] {
        if !wanted(key) {
            continue;
        }
        let all: Vec<&str> = args.iter().chain(common.iter()).copied().collect();
        let d = pgbench(&direct, &all)?;
        row(name, "direct", d);
        let b = match &bouncer {
            Some((_, p)) => Some(pgbench(&with_port(&direct, *p), &all)?),
            None => None,
        };
        if let Some(b) = b {
            row(name, "pgbouncer", b);
        }
        let floor = if key == "select" {
            commit_floor(
                &tmp.path().join("etcd"),
                &conninfo,
                clients,
                seconds,
                scale * 100_000,
            )
            .await?
        } else {
            None
        };
        match floor {
            Some((plain, committed)) => {
                row(name, "loop direct", plain);
                row(name, "loop etcd+select", committed);
            }
            None if key == "select" => {
                println!("{name:<22} (etcd not installed: no commit-floor baseline)")
            }
            None => {}
        }
        let (cu, cu_cpu) = measured(strict_port, &strict_proc, &all)?;
        row(name, "custody strict", cu);
        let (ca, ca_cpu) = measured(async_port, &async_proc, &all)?;
        row(name, "custody async", ca);
        // The same statements judged by a guardrail (each parsed by
        // PostgreSQL's parser; pgbench's texts differ, so few are cached).
        let (cg, cg_cpu) = measured(guarded_port, &guarded_proc, &all)?;
        row(name, "custody guarded", cg);
        println!(
            "{name:<22} custody CPU per transaction, strict: unguarded {:.0} µs, guarded {:.0} µs ({})",
            cu_cpu.0,
            cg_cpu.0,
            show(&cg_cpu)
        );
        println!(
            "{name:<22} custody CPU per transaction: strict {:.0} µs ({}), async {:.0} µs ({})",
            cu_cpu.0,
            show(&cu_cpu),
            ca_cpu.0,
            show(&ca_cpu)
        );
        print!(
            "{name:<22} custody/direct: strict {:.2}, async {:.2}",
            cu.0 / d.0,
            ca.0 / d.0
        );
        match b {
            Some(b) => println!(
                "; custody/pgbouncer: strict {:.2}, async {:.2}",
                cu.0 / b.0,
                ca.0 / b.0
            ),
            None => println!(" (pgbouncer not installed: no baseline)"),
        }
        if let Some((plain, committed)) = floor {
            println!(
                "{name:<22} commit floor: an etcd commit before each statement leaves {:.2} of the direct loop; custody strict/that floor {:.2}",
                committed.0 / plain.0,
                cu.0 / committed.0
            );
        }
    }

    // Masking overhead: the same result-heavy query through two resources
    // that differ only in the masking profile of the deciding rule.
    if !wanted("masking") {
        return Ok(());
    }
    let name = "result-heavy (200 rows)";
    let script_arg = format!("-f{}", script.display());
    let all: Vec<&str> = std::iter::once(script_arg.as_str())
        .chain(common.iter().copied())
        .collect();
    let d = pgbench(&direct, &all)?;
    row(name, "direct", d);
    // The two paths alternate in ROUNDS short runs, so drift on this noisy
    // machine (compactions, other load) hits both alike; TPS is the mean
    // over the rounds, and the median of the per-round overheads is printed
    // too (one disturbed round moves it least).
    let short = (seconds / ROUNDS).max(5).to_string();
    let quick: Vec<&str> = std::iter::once(script_arg.as_str())
        .chain(["-n", "-c", &c_s, "-j", &jobs, "-T", &short])
        .collect();
    // Default caps: a session stops recording rows after 100 000, so most of
    // the run relays rows without recording them. Then with every row
    // recorded (caps raised on the resource).
    for (label, plain_port, plain_proc, masked_port, masked_proc) in [
        (
            "default caps",
            strict_port,
            &strict_proc,
            masked_port,
            &masked_proc,
        ),
        (
            "every row recorded",
            all_port,
            &all_proc,
            all_masked_port,
            &all_masked_proc,
        ),
    ] {
        let (mut plain, mut masked) = ((0.0, 0.0), (0.0, 0.0));
        let (mut plain_cpu, mut masked_cpu): (Cpu, Cpu) = Default::default();
        let mut overheads = Vec::new();
        for _ in 0..ROUNDS {
            let (p, pc) = measured(plain_port, plain_proc, &quick)?;
            let (m, mc) = measured(masked_port, masked_proc, &quick)?;
            add(&mut plain_cpu, &pc);
            add(&mut masked_cpu, &mc);
            overheads.push((1.0 - m.0 / p.0) * 100.0);
            plain = (plain.0 + p.0 / ROUNDS as f64, plain.1 + p.1 / ROUNDS as f64);
            masked = (
                masked.0 + m.0 / ROUNDS as f64,
                masked.1 + m.1 / ROUNDS as f64,
            );
        }
        row(name, "custody strict", plain);
        row(name, "custody masked", masked);
        let rounds: Vec<String> = overheads.iter().map(|o| format!("{o:.1}")).collect();
        overheads.sort_by(f64::total_cmp);
        println!(
            "{name:<22} {label}: masked/unmasked {:.2} (masking overhead {:.1}%; median round {:.1}%; rounds: {}%)",
            masked.0 / plain.0,
            (1.0 - masked.0 / plain.0) * 100.0,
            overheads[overheads.len() / 2],
            rounds.join("%, ")
        );
        println!(
            "{name:<22} {label}: custody CPU per statement {:.0} µs unmasked ({}), {:.0} µs masked ({}): {:+.1}%",
            plain_cpu.0,
            show(&plain_cpu),
            masked_cpu.0,
            show(&masked_cpu),
            (masked_cpu.0 / plain_cpu.0 - 1.0) * 100.0
        );
    }
    drop(bouncer);
    Ok(())
}
