//! `bench ssh`: OpenSSH direct to a private sshd and through Custody
//! (`ssh` with `custody ssh-proxy` → gateway → edge → sshd) in one run:
//! bulk output (`head -c N /dev/zero`) through an async and a strict
//! resource, an scp upload of a random file, and the time to run `true`
//! over a new connection. Each custody run also reports the CPU time the
//! coordinators and the edge used per MB (from `/proc`).

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use custody_cli::dev::{Binaries, EdgeSpec, GenOptions, LocalCluster};
use custody_cli::localssh::LocalSshd;

use crate::pg_bench::{clock_ticks, cpu_ticks, custody_processes};

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
rules:
  - name: engineers-ssh
    identity: { groups: [engineers] }
    resource: { kinds: [ssh] }
    actions: [connect, shell, exec, sftp]
    decision: allow
"#;

/// What a run costs: seconds, and CPU seconds of each custody process.
struct Measured {
    secs: f64,
    cpu: Vec<(String, f64)>,
}

/// Runs `cmd` to completion, counting its stdout bytes; the custody
/// processes' CPU over the run.
fn measure(
    mut cmd: Command,
    procs: &[(String, u32)],
    tick: f64,
) -> anyhow::Result<(u64, Measured)> {
    let before: Vec<u64> = procs.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run the OpenSSH client")?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = out.read(&mut buf)?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    let done = child.wait_with_output()?;
    let secs = t0.elapsed().as_secs_f64();
    if !done.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            done.status,
            String::from_utf8_lossy(&done.stderr)
        );
    }
    let cpu = procs
        .iter()
        .zip(before)
        .map(|((name, pid), b)| {
            (
                name.clone(),
                cpu_ticks(*pid).saturating_sub(b) as f64 * tick,
            )
        })
        .collect();
    Ok((n, Measured { secs, cpu }))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Coordinator and edge CPU per MB, in ms.
fn per_mb(m: &Measured, bytes: u64) -> String {
    let mb = bytes as f64 / (1 << 20) as f64;
    let mut nodes = 0.0;
    let mut edge = 0.0;
    for (name, secs) in &m.cpu {
        if name == "edge" {
            edge += secs;
        } else {
            nodes += secs;
        }
    }
    format!(
        "coordinators {:.2} ms/MB, edge {:.2} ms/MB",
        nodes * 1000.0 / mb,
        edge * 1000.0 / mb
    )
}

fn random_file(path: &Path, mb: u64) -> anyhow::Result<()> {
    use rand::RngCore as _;
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mb {
        rand::rng().fill_bytes(&mut block);
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

/// `mb`: MiB of output per bulk run; `scp_mb`: the uploaded file's size;
/// `connects`: new connections timed per path.
pub async fn ssh(mb: u64, scp_mb: u64, connects: usize, rounds: usize) -> anyhow::Result<()> {
    crate::bench::which("ssh")?;
    let tmp = tempfile::tempdir()?;
    let sshd = LocalSshd::start(&tmp.path().join("sshd"))?;
    let bins = Binaries::locate()?;
    let custody = bins.custody.clone();
    let mut c = LocalCluster::generate(bins, &tmp.path().join("cluster"), &GenOptions::default())?;
    c.start_all()?;
    let leader = c.wait_for_leader(&[], Duration::from_secs(30)).await?;
    c.client(&[])?.policy_apply(POLICY, "yaml").await?;
    let mut spec = EdgeSpec::shell("bench-edge", "unused");
    spec.resources_toml = sshd.resource_toml("bench-ssh", "evidence = \"async\"")
        + &sshd.resource_toml("bench-ssh-strict", "evidence = \"strict\"");
    c.add_edge(&spec)?;
    c.enroll_edge("bench-edge").await?;
    for r in ["bench-ssh", "bench-ssh-strict"] {
        c.wait_for_resource(r, 3, Duration::from_secs(30)).await?;
    }
    let token = c.mint_token("alice").await?.token;
    let config_dir = tmp.path().join("cli");
    std::fs::create_dir_all(&config_dir)?;
    let env: Vec<(String, String)> = vec![
        ("CUSTODY_COORDINATOR".into(), c.api_urls(&[])),
        ("CUSTODY_CA".into(), c.ca_path().display().to_string()),
        ("CUSTODY_TOKEN".into(), token),
        (
            "CUSTODY_CONFIG_DIR".into(),
            config_dir.display().to_string(),
        ),
        ("HOME".into(), config_dir.display().to_string()),
    ];
    let out = Command::new(&custody)
        .args(["ssh", "config"])
        .envs(env.iter().cloned())
        .output()?;
    if !out.status.success() {
        bail!(
            "custody ssh config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cfg = config_dir.join("ssh_config");
    std::fs::write(&cfg, &out.stdout)?;
    let via = |program: &str| {
        let mut cmd = Command::new(program);
        cmd.arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes"])
            .envs(env.iter().cloned())
            .env_remove("CUSTODY_TOKEN_FILE");
        cmd
    };
    let direct_ssh = || {
        let mut cmd = Command::new("ssh");
        cmd.args(sshd.direct_args()).arg("127.0.0.1");
        cmd
    };
    let procs = custody_processes(&c);
    let tick = 1.0 / clock_ticks() as f64;

    println!(
        "OpenSSH direct to a local sshd and through Custody (ssh-proxy -> gateway -> edge -> sshd); Raft leader node {leader}; {rounds} rounds, medians"
    );
    // Bulk output.
    let bulk = format!("head -c {} /dev/zero", mb << 20);
    let mut direct = Vec::new();
    let mut through: Vec<(&str, Vec<f64>, Option<Measured>)> = vec![
        ("bench-ssh", vec![], None),
        ("bench-ssh-strict", vec![], None),
    ];
    for _ in 0..rounds {
        let mut cmd = direct_ssh();
        cmd.arg(&bulk);
        let (n, m) = measure(cmd, &[], tick)?;
        if n != mb << 20 {
            bail!("direct: {n} bytes, expected {}", mb << 20);
        }
        direct.push(n as f64 / (1 << 20) as f64 / m.secs);
        for (resource, speeds, last) in through.iter_mut() {
            let mut cmd = via("ssh");
            cmd.arg(format!("{resource}.custody")).arg(&bulk);
            let (n, m) = measure(cmd, &procs, tick)?;
            if n != mb << 20 {
                bail!("{resource}: {n} bytes, expected {}", mb << 20);
            }
            speeds.push(n as f64 / (1 << 20) as f64 / m.secs);
            *last = Some(m);
        }
    }
    let d = median(direct);
    println!("bulk output, {mb} MiB (`head -c` | count):");
    println!("  direct                 {d:>8.1} MB/s");
    for (resource, speeds, last) in through {
        let s = median(speeds);
        println!(
            "  custody ({:<6})       {s:>8.1} MB/s   {:.2}x direct   {}",
            if resource.ends_with("strict") {
                "strict"
            } else {
                "async"
            },
            s / d,
            last.map(|m| per_mb(&m, mb << 20)).unwrap_or_default()
        );
    }

    // scp upload (SFTP mode, recorded as file operations).
    let file = tmp.path().join("upload.bin");
    random_file(&file, scp_mb)?;
    let remote = sshd.dir.join("uploaded.bin");
    let known = sshd.dir.join("known_hosts");
    let mut direct = Vec::new();
    let mut custody_runs = Vec::new();
    let mut last = None;
    for _ in 0..rounds {
        let mut cmd = Command::new("scp");
        cmd.args(["-P", &sshd.port.to_string(), "-i"])
            .arg(&sshd.key_file)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .arg(&file)
            .arg(format!("{}@127.0.0.1:{}", sshd.user, remote.display()));
        let (_, m) = measure(cmd, &[], tick)?;
        direct.push(scp_mb as f64 / m.secs);
        let mut cmd = via("scp");
        cmd.arg(&file)
            .arg(format!("bench-ssh.custody:{}", remote.display()));
        let (_, m) = measure(cmd, &procs, tick)?;
        custody_runs.push(scp_mb as f64 / m.secs);
        last = Some(m);
    }
    let (d, s) = (median(direct), median(custody_runs));
    println!("scp upload, {scp_mb} MiB random:");
    println!("  direct                 {d:>8.1} MB/s");
    println!(
        "  custody (async)        {s:>8.1} MB/s   {:.2}x direct   {}",
        s / d,
        last.map(|m| per_mb(&m, scp_mb << 20)).unwrap_or_default()
    );

    // `true` over a new connection.
    let mut direct = Vec::new();
    let mut custody_runs = Vec::new();
    for _ in 0..connects.max(1) {
        let mut cmd = direct_ssh();
        cmd.arg("true");
        direct.push(measure(cmd, &[], tick)?.1.secs * 1000.0);
        let mut cmd = via("ssh");
        cmd.args(["bench-ssh.custody", "true"]);
        custody_runs.push(measure(cmd, &[], tick)?.1.secs * 1000.0);
    }
    let (d, s) = (median(direct), median(custody_runs));
    println!("`true` over a new connection ({} runs):", connects.max(1));
    println!("  direct                 {d:>8.1} ms");
    println!("  custody (async)        {s:>8.1} ms   {:+.1} ms", s - d);
    Ok(())
}
