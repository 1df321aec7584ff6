//! The SSH gateway with the real OpenSSH client and a real sshd started
//! here: `custody ssh`, plain `ssh` through `custody ssh-proxy`, guardrails
//! and approvals on exec, refusals of forwarding, host key pins, and what
//! never reaches the coordinators.

use std::io::{Read as _, Write as _};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use custody_cli::dev::{EdgeSpec, GenOptions};
use custody_cli::localssh::LocalSshd;

use crate::edge::{custody, custody_cmd, text};
use crate::harness::{self, eventually, TestCluster};
use crate::postgres::{grep_dir, session_events};

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
  auditor: { groups: [auditors] }
  approver: { groups: [approvers] }
guardrails:
  - name: destructive-shell
    pattern: '(^|\s)rm\s+-(rf|fr)\b'
    decision: deny
  - name: touch-needs-review
    pattern: '^touch '
    decision: require_approval
    approval: { groups: [approvers], count: 1 }
rules:
  - name: engineers-ssh
    identity: { groups: [engineers] }
    resource: { kinds: [ssh] }
    actions: [connect, shell, exec, sftp]
    decision: allow
    guardrails: [destructive-shell, touch-needs-review]
  - name: engineers-tunnel
    identity: { groups: [engineers] }
    resource: { names: [local-ssh] }
    actions: [port-forward]
    decision: allow
    forward_to: ["127.0.0.1:SSHD_PORT"]
  - name: masked-output
    identity: { groups: [engineers] }
    resource: { names: [masked-ssh] }
    actions: [connect, shell, exec]
    decision: allow
    mask: [pii]
masking:
  - name: pii
    detectors: [email]
"#;

struct System {
    c: TestCluster,
    sshd: LocalSshd,
    _dir: tempfile::TempDir,
    /// `CUSTODY_CONFIG_DIR` for the CLI (its known_hosts file).
    config_dir: PathBuf,
}

async fn system() -> System {
    let dir = tempfile::tempdir().unwrap();
    let sshd = LocalSshd::start(&dir.path().join("sshd")).expect("start sshd");
    let (mut c, _) = harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(&POLICY.replace("SSHD_PORT", &sshd.port.to_string()), "yaml")
        .await
        .unwrap();
    // A second resource whose pin is some other key: the target must be
    // refused.
    let other = dir.path().join("other_key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let bad = sshd
        .resource_toml("bad-ssh", "env = \"dev\"")
        .replace(&sshd.host_key, other_pub.trim());
    let mut spec = EdgeSpec::shell("e1", "unused");
    spec.resources_toml = sshd.resource_toml("local-ssh", "env = \"dev\"")
        + &bad
        // Keystrokes and file contents recorded.
        + &sshd.resource_toml(
            "strict-ssh",
            "evidence = \"strict\", record-file-contents = \"true\"",
        )
        + &sshd.resource_toml("masked-ssh", "env = \"dev\"")
        + &sshd.resource_toml("bulk-ssh", "env = \"dev\"")
        // Pinned by the authority of its host certificate.
        + &sshd.resource_toml_ca("ca-ssh", "env = \"dev\"");
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    for r in [
        "local-ssh",
        "bad-ssh",
        "strict-ssh",
        "masked-ssh",
        "bulk-ssh",
        "ca-ssh",
    ] {
        c.wait_for_resource(r, 3, Duration::from_secs(20))
            .await
            .unwrap();
    }
    let config_dir = dir.path().join("cli");
    System {
        c,
        sshd,
        _dir: dir,
        config_dir,
    }
}

impl System {
    fn custody(&self, token: &str, args: &[&str]) -> Command {
        let mut cmd = custody_cmd(&self.c, &[], token, args);
        cmd.env("CUSTODY_CONFIG_DIR", &self.config_dir)
            .env("HOME", &self.config_dir);
        cmd
    }

    /// Plain OpenSSH through `custody ssh-proxy`, as `custody ssh config`
    /// sets it up.
    fn ssh(&self, token: &str, args: &[&str]) -> Command {
        self.openssh("ssh", token, args)
    }

    /// The ssh configuration file `custody ssh config` printed.
    fn ssh_config(&self, token: &str) -> PathBuf {
        let _ = self.ssh(token, &[]);
        self.config_dir.join("ssh_config")
    }

    /// An OpenSSH program (ssh, scp, sftp) with that configuration.
    fn openssh(&self, program: &str, token: &str, args: &[&str]) -> Command {
        let out = self
            .custody(token, &["ssh", "config"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let config = self.config_dir.join("ssh_config");
        std::fs::write(&config, &out.stdout).unwrap();
        let mut cmd = Command::new(program);
        cmd.arg("-F")
            .arg(&config)
            .args(["-o", "BatchMode=yes"])
            .args(args)
            .env("CUSTODY_COORDINATOR", self.c.api_urls(&[]))
            .env("CUSTODY_CA", self.c.ca_path())
            .env("CUSTODY_TOKEN", token)
            .env("CUSTODY_CONFIG_DIR", &self.config_dir)
            .env("HOME", &self.config_dir)
            .env_remove("CUSTODY_TOKEN_FILE")
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("DISPLAY");
        cmd
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a local forward's port answers first (empty: closed without
/// data), once something listens there.
async fn eventually_read(port: u16) -> Vec<u8> {
    for _ in 0..100 {
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf))
            .await
            .expect("the forward neither answered nor closed")
            .unwrap_or(0);
        buf.truncate(n);
        return buf;
    }
    panic!("nothing listens on forwarded port {port}")
}

/// A file of `len` pseudo-random bytes.
fn random_file(path: &Path, len: usize) {
    use rand::RngCore as _;
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(path, data).unwrap();
}

fn same_file(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// The file operations recorded on `resource`.
fn file_ops(c: &TestCluster, admin: &str, resource: &str) -> Vec<serde_json::Value> {
    session_events(c, admin, resource)
        .into_iter()
        .filter(|e| e["type"] == "file_op")
        .map(|e| e["event"].clone())
        .collect()
}

fn has_op(
    ops: &[serde_json::Value],
    protocol: &str,
    op: &str,
    path: &Path,
    bytes: Option<(u64, u64)>,
) -> bool {
    let path = path.display().to_string();
    ops.iter().any(|o| {
        o["protocol"] == protocol
            && o["op"] == op
            && o["path"] == path.as_str()
            && o["status"] == "ok"
            && bytes.is_none_or(|(r, w)| o["read"] == r && o["written"] == w)
    })
}

/// scp in both modes, sftp batches and rsync, each with evidence of the
/// files by path and size (and the contents only where the resource asks).
async fn files_and_transfers(s: &System, alice: &str, admin: &str) {
    let c = &s.c;
    let work = s.config_dir.join("files");
    let remote = s.sshd.dir.join("remote");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    let src = work.join("src.bin");
    random_file(&src, 100_000);
    let n = 100_000u64;
    let cfg = s.ssh_config(alice);
    let cfg = cfg.display().to_string();

    // sftp -b: put, get, rename, rm.
    let (a, b) = (remote.join("a.bin"), remote.join("b.bin"));
    let got = work.join("got.bin");
    let batch = work.join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\nrename {} {}\nrm {}\n",
            src.display(),
            a.display(),
            a.display(),
            got.display(),
            a.display(),
            b.display(),
            b.display()
        ),
    )
    .unwrap();
    let batch_arg = batch.display().to_string();
    let out = run(&mut s.openssh("sftp", alice, &["-b", &batch_arg, "local-ssh.custody"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(same_file(&src, &got));
    assert!(!a.exists() && !b.exists());
    let ops = file_ops(c, admin, "local-ssh");
    assert!(has_op(&ops, "sftp", "open", &a, None), "{ops:?}");
    assert!(has_op(&ops, "sftp", "close", &a, Some((0, n))), "{ops:?}");
    assert!(has_op(&ops, "sftp", "close", &a, Some((n, 0))), "{ops:?}");
    assert!(
        ops.iter().any(|o| o["op"] == "rename"
            && o["path"] == a.display().to_string().as_str()
            && o["target"] == b.display().to_string().as_str()),
        "{ops:?}"
    );
    assert!(has_op(&ops, "sftp", "remove", &b, None), "{ops:?}");

    // scp (SFTP mode) and scp -O, up and down.
    for (legacy, name) in [(false, "c.bin"), (true, "d.bin")] {
        let there = remote.join(name);
        let back = work.join(format!("back-{name}"));
        let mut args: Vec<String> = vec![
            "-F".into(),
            cfg.clone(),
            "-o".into(),
            "BatchMode=yes".into(),
        ];
        if legacy {
            args.push("-O".into());
        }
        let up: Vec<String> = args
            .iter()
            .cloned()
            .chain([
                src.display().to_string(),
                format!("local-ssh.custody:{}", there.display()),
            ])
            .collect();
        let down: Vec<String> = args
            .iter()
            .cloned()
            .chain([
                format!("local-ssh.custody:{}", there.display()),
                back.display().to_string(),
            ])
            .collect();
        for a in [up, down] {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = run(s.openssh("scp", alice, &[]).args(&a[2..]));
            assert!(out.status.success(), "scp {a:?}: {}", text(&out.stderr));
        }
        assert!(
            same_file(&src, &there) && same_file(&src, &back),
            "scp legacy={legacy}"
        );
        let ops = file_ops(c, admin, "local-ssh");
        if legacy {
            assert!(
                has_op(&ops, "scp", "upload", &there, Some((0, n))),
                "{ops:?}"
            );
            assert!(
                has_op(&ops, "scp", "download", &there, Some((n, 0))),
                "{ops:?}"
            );
        } else {
            assert!(
                has_op(&ops, "sftp", "close", &there, Some((0, n))),
                "{ops:?}"
            );
            assert!(
                has_op(&ops, "sftp", "close", &there, Some((n, 0))),
                "{ops:?}"
            );
        }
    }
    // Contents are not recorded by default...
    let marker = std::fs::read(&src).unwrap()[5000..5064].to_vec();
    assert!(!session_events(c, admin, "local-ssh").iter().any(|e| {
        e["type"] == "output"
            && e["event"]["data_b64"]
                .as_str()
                .is_some_and(|d| base64_contains(d, &marker))
    }));
    // ... and are where the resource asks for them.
    let there = remote.join("e.bin");
    let out = run(s.openssh("scp", alice, &[]).args([
        src.display().to_string(),
        format!("strict-ssh.custody:{}", there.display()),
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let strict_events = session_events(c, admin, "strict-ssh");
    assert!(has_op(
        &strict_events
            .iter()
            .filter(|e| e["type"] == "file_op")
            .map(|e| e["event"].clone())
            .collect::<Vec<_>>(),
        "sftp",
        "close",
        &there,
        Some((0, n))
    ));
    assert!(strict_events.iter().any(|e| e["type"] == "output"
        && e["event"]["stream"] == "stdin"
        && e["event"]["data_b64"]
            .as_str()
            .is_some_and(|d| base64_contains(d, &marker))));

    // rsync over ssh.
    let synced = remote.join("synced.bin");
    let out = Command::new("rsync")
        .arg("-e")
        .arg(format!("ssh -F {cfg} -o BatchMode=yes"))
        .arg(&src)
        .arg(format!("local-ssh.custody:{}", synced.display()))
        .env("CUSTODY_COORDINATOR", c.api_urls(&[]))
        .env("CUSTODY_CA", c.ca_path())
        .env("CUSTODY_TOKEN", alice)
        .env("CUSTODY_CONFIG_DIR", &s.config_dir)
        .env("HOME", &s.config_dir)
        .env_remove("CUSTODY_TOKEN_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "rsync: {}", text(&out.stderr));
    assert!(same_file(&src, &synced));
    assert!(session_events(c, admin, "local-ssh")
        .iter()
        .any(|e| e["type"] == "command"
            && e["event"]["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("rsync --server")));
}

fn base64_contains(b64: &str, needle: &[u8]) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .is_ok_and(|d| d.windows(needle.len()).any(|w| w == needle))
}

/// Exec output masked by the rule's profile; a shell under it refused; a
/// target pinned by its host certificate's authority.
fn masking_and_host_certificates(s: &System, alice: &str, admin: &str) {
    let c = &s.c;
    let out = run(&mut s.custody(
        alice,
        &[
            "ssh",
            "masked-ssh",
            "--",
            "echo",
            "mail",
            "ann@example.com",
            "now",
        ],
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.starts_with("mail ") && shown.ends_with(" now\n"),
        "{shown:?}"
    );
    assert!(!shown.contains("ann@example.com"), "{shown:?}");
    let events = session_events(c, admin, "masked-ssh");
    assert!(events.iter().any(|e| e["event"]["stream"] == "stdout"));
    assert!(!events.iter().any(|e| e["event"]["text"]
        .as_str()
        .unwrap_or("")
        .contains("ann@example.com")
        && e["type"] == "output"));
    let out = run(&mut s.ssh(alice, &["masked-ssh.custody"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("masks output"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&mut s.custody(alice, &["ssh", "ca-ssh", "--", "echo", "via-ca"]));
    assert_eq!(text(&out.stdout), "via-ca\n", "{}", text(&out.stderr));
    let events = session_events(c, admin, "ca-ssh");
    assert!(
        events.iter().any(|e| e["type"] == "target_key"
            && e["event"]["fingerprint"]
                .as_str()
                .unwrap_or("")
                .contains("host certificate")),
        "{events:?}"
    );
}

/// 200 MB up and 200 MB down through one channel at the same time.
fn bulk_both_ways(s: &System, alice: &str) {
    const MB200: usize = 200 << 20;
    let work = s.config_dir.join("bulk");
    std::fs::create_dir_all(&work).unwrap();
    let (up_src, down_src) = (work.join("up-src.bin"), work.join("down-src.bin"));
    let (up_dst, down_dst) = (work.join("up-dst.bin"), work.join("down-dst.bin"));
    random_file(&up_src, MB200);
    random_file(&down_src, MB200);
    // A background job's stdin is /dev/null in sh: it reads a copy (fd 3).
    let script = format!(
        "exec 3<&0; cat <&3 > '{}' & cat '{}'; wait",
        up_dst.display(),
        down_src.display()
    );
    let out = s
        .custody(alice, &["ssh", "bulk-ssh", "--", "sh", "-c", &script])
        .stdin(std::fs::File::open(&up_src).unwrap())
        .stdout(std::fs::File::create(&down_dst).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(same_file(&up_src, &up_dst), "the upload differs");
    assert!(same_file(&down_src, &down_dst), "the download differs");
    for f in [up_src, down_src, up_dst, down_dst] {
        let _ = std::fs::remove_file(f);
    }
}

/// TLS to the SSH gateway and an accepted preamble: what comes next is SSH.
async fn preamble(
    c: &TestCluster,
    addr: &str,
    token: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use custody_proto::frame::{read_frame, write_frame};
    use custody_proto::v1 as api;
    let tls = custody_cli::pg::tls_config_alpn(&c.ca_path(), b"custody-ssh").unwrap();
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(sa).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(rustls_pki_types::ServerName::IpAddress(sa.ip().into()), tcp)
        .await
        .unwrap();
    let hello = api::SshHello {
        token: token.into(),
        resource: "local-ssh".into(),
        login: "tester".into(),
    };
    write_frame(&mut s, &hello).await.unwrap();
    let welcome: api::SshWelcome = read_frame(&mut s).await.unwrap().unwrap();
    assert_eq!(welcome.error, "");
    s
}

async fn pending_request(c: &TestCluster, token: &str, except: &[String]) -> String {
    let mut id = String::new();
    eventually(
        Duration::from_secs(20),
        "a pending approval request",
        || {
            let out = custody(c, &[], token, &["approvals", "list", "--pending", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let found = v.as_array().into_iter().flatten().find_map(|r| {
                let rid = r["id"].to_string();
                (!except.contains(&rid)).then_some(rid)
            });
            if let Some(f) = found {
                id = f;
            }
            let done = !id.is_empty();
            async move { done }
        },
    )
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_runs_commands_through_the_gateway_with_evidence_and_guardrails() {
    let s = system().await;
    let c = &s.c;
    let alice = c.mint_token("alice").await.unwrap().token;
    let admin = c.mint_token("admin").await.unwrap().token;
    let short = c.mint_token_for("alice", Some(1)).await.unwrap().token;
    let minted = std::time::Instant::now();

    // custody ssh: the output, the exit status, and the evidence.
    let out = run(&mut s.custody(
        &alice,
        &[
            "ssh",
            "local-ssh",
            "--",
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 3",
        ],
    ));
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("oops"), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let events = session_events(c, &admin, "local-ssh");
    let command = events
        .iter()
        .find(|e| e["type"] == "command")
        .expect("a command event");
    assert_eq!(
        command["event"]["text"],
        "sh -c 'echo hi; echo oops >&2; exit 3'"
    );
    assert_eq!(command["event"]["verb"], "ssh:exec");
    let channel = events
        .iter()
        .find(|e| e["type"] == "ssh_channel")
        .expect("an ssh channel event");
    assert_eq!(channel["event"]["channel"], "exec");
    assert!(!channel["event"]["connection_id"]
        .as_str()
        .unwrap()
        .is_empty());
    let key = events
        .iter()
        .find(|e| e["type"] == "target_key")
        .expect("the target's host key");
    assert!(
        key["event"]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("SHA256:"),
        "{key}"
    );
    assert!(events.iter().any(|e| e["type"] == "output"
        && e["event"]["stream"] == "stdout"
        && e["event"]["text"] == "hi\n"));
    assert!(events
        .iter()
        .any(|e| e["type"] == "outcome" && e["event"]["exit_code"] == 3));

    // Plain ssh with the printed configuration; stdin flows to the target.
    let mut child = s
        .ssh(&alice, &["local-ssh.custody", "wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'x'; 300_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "300000", "{}", text(&out.stderr));
    assert!(out.status.success());

    // A command killed by a signal: OpenSSH exits 255, and the evidence
    // names the signal.
    let out = run(&mut s.custody(
        &alice,
        &["ssh", "local-ssh", "--", "sh", "-c", "kill -TERM $$"],
    ));
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    let events = session_events(c, &admin, "local-ssh");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "outcome" && e["event"]["signal"] == 15),
        "{events:?}"
    );

    // A guardrail denies; nothing runs.
    let marker = s.sshd.dir.join("deny-marker");
    let out = run(&mut s.custody(
        &alice,
        &[
            "ssh",
            "local-ssh",
            "--",
            "rm",
            "-rf",
            "/nonexistent",
            &marker.display().to_string(),
        ],
    ));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("destructive-shell"),
        "{}",
        text(&out.stderr)
    );

    // A command under require_approval is held, runs once approved, and a
    // second run needs a new approval.
    let bob = c.mint_token("bob").await.unwrap().token;
    let touched = s.sshd.dir.join("approved-marker");
    let touch = touched.display().to_string();
    let held = s
        .custody(&alice, &["ssh", "local-ssh", "--", "touch", &touch])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = pending_request(c, &bob, &[]).await;
    assert!(!touched.exists(), "ran before approval");
    let out = custody(c, &[], &bob, &["approvals", "approve", &first]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = held.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("approval required"),
        "{}",
        text(&out.stderr)
    );
    assert!(touched.exists());
    std::fs::remove_file(&touched).unwrap();
    let mut again = s
        .custody(&alice, &["ssh", "local-ssh", "--", "touch", &touch])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let second = pending_request(c, &bob, std::slice::from_ref(&first)).await;
    assert_ne!(first, second);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!touched.exists(), "a spent approval ran the command again");
    let _ = again.kill();
    let _ = again.wait();

    // A forward to a destination no rule names is refused with the reason;
    // one a rule names is carried, and recorded with its byte counts.
    let out = run(&mut s.ssh(&alice, &["-W", "127.0.0.1:9", "local-ssh.custody"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("open failed") && text(&out.stderr).contains("port-forward"),
        "{}",
        text(&out.stderr)
    );
    let sshd_dest = format!("127.0.0.1:{}", s.sshd.port);
    let out = run(&mut s.ssh(&alice, &["-W", &sshd_dest, "local-ssh.custody"]));
    assert!(
        text(&out.stdout).starts_with("SSH-2.0-"),
        "{:?} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let (allowed_port, refused_port) = (free_port(), free_port());
    let mut tunnel = s
        .ssh(
            &alice,
            &[
                "-N",
                "-L",
                &format!("{allowed_port}:{sshd_dest}"),
                "-L",
                &format!("{refused_port}:127.0.0.1:9"),
                "local-ssh.custody",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let banner = eventually_read(allowed_port).await;
    assert!(banner.starts_with(b"SSH-2.0-"), "{}", text(&banner));
    assert!(
        eventually_read(refused_port).await.is_empty(),
        "a refused forward carried data"
    );
    let _ = tunnel.kill();
    let out = tunnel.wait_with_output().unwrap();
    assert!(
        text(&out.stderr).contains("open failed"),
        "{}",
        text(&out.stderr)
    );
    let events = session_events(c, &admin, "local-ssh");
    let traffic: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == "traffic" && e["event"]["destination"] == sshd_dest.as_str())
        .collect();
    assert!(traffic.len() >= 2, "{events:?}");
    assert!(traffic
        .iter()
        .all(|t| t["event"]["from_target"].as_u64().unwrap() >= 8));
    assert!(events
        .iter()
        .any(|e| e["type"] == "command" && e["event"]["verb"] == "ssh:port-forward"));
    let out = run(&mut s.ssh(
        &alice,
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "0:127.0.0.1:9",
            "local-ssh.custody",
            "true",
        ],
    ));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("forwarding failed"),
        "{}",
        text(&out.stderr)
    );
    let mut agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(s.config_dir.join("agent.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(5), "the agent socket", || {
        let ok = s.config_dir.join("agent.sock").exists();
        async move { ok }
    })
    .await;
    let mut cmd = s.ssh(
        &alice,
        &[
            "-A",
            "-o",
            "ForwardAgent=yes",
            "local-ssh.custody",
            "echo agent=$SSH_AUTH_SOCK",
        ],
    );
    cmd.env("SSH_AUTH_SOCK", s.config_dir.join("agent.sock"));
    let out = run(&mut cmd);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(text(&out.stdout), "agent=\n", "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("agent forwarding is refused"),
        "{}",
        text(&out.stderr)
    );
    let mut cmd = s.ssh(
        &alice,
        &["-X", "-o", "ForwardX11=yes", "local-ssh.custody", "true"],
    );
    cmd.env("DISPLAY", ":77");
    let out = run(&mut cmd);
    assert!(
        text(&out.stderr).contains("X11 forwarding is refused"),
        "{}",
        text(&out.stderr)
    );

    // A target whose host key is not the pinned one is refused, and the
    // refusal is recorded with the key it presented.
    let out = run(&mut s.custody(&alice, &["ssh", "bad-ssh", "--", "true"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("does not match the pinned"),
        "{}",
        text(&out.stderr)
    );
    let fingerprint = text(
        &Command::new("ssh-keygen")
            .arg("-lf")
            .arg(s.sshd.dir.join("ssh_host_ed25519_key.pub"))
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .nth(1)
    .unwrap()
    .to_owned();
    let events = session_events(c, &admin, "bad-ssh");
    assert!(
        events.iter().any(|e| e["type"] == "outcome"
            && e["event"]["error"]
                .as_str()
                .unwrap_or("")
                .contains(&fingerprint)),
        "{events:?}"
    );

    // An identity without access, and an expired token, are refused before
    // anything reaches the edge.
    let before = session_events(c, &admin, "local-ssh").len();
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let out = run(&mut s.custody(&audrey, &["ssh", "local-ssh", "--", "true"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("local-ssh"),
        "{}",
        text(&out.stderr)
    );
    // Past its expiry and the verifier's 30 s leeway.
    tokio::time::sleep(Duration::from_secs(33).saturating_sub(minted.elapsed())).await;
    let out = run(&mut s.custody(&short, &["ssh", "local-ssh", "--", "true"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("expired"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(session_events(c, &admin, "local-ssh").len(), before);

    // Garbage at every stage closes that connection only.
    let node = c.nodes.values().next().unwrap();
    let cfg: toml::Table = toml::from_str(&std::fs::read_to_string(&node.config).unwrap()).unwrap();
    let addr = cfg["listen"]["ssh"].as_str().unwrap().to_owned();
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    raw.write_all(&[0x16, 3, 1, 0xff, 0xff, 1, 2, 3]).unwrap();
    // Closed (read_to_end ends) within the read timeout, after no more than
    // a TLS alert.
    let mut answer = Vec::new();
    let closed = raw.read_to_end(&mut answer);
    assert!(
        closed.is_ok(),
        "the garbage connection is still open: {closed:?}"
    );
    assert!(answer.len() < 64, "garbage got a real answer");
    // After a valid preamble: text that is not SSH (no id line) is cut at
    // the handshake timeout, and an oversized packet at once.
    let mut stalled = preamble(c, &addr, &alice).await;
    stalled.write_all(b"GET / HTTP/1.1").await.unwrap();
    let mut oversized = preamble(c, &addr, &alice).await;
    oversized
        .write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x7f\xff\xff\xf0\x0a\x14garbage")
        .await
        .unwrap();
    // A key exchange cut short: its packet announced and never finished.
    let mut truncated = preamble(c, &addr, &alice).await;
    truncated
        .write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x00\x04\x00\x0a\x14partial-kexinit")
        .await
        .unwrap();
    for (what, conn) in [
        ("oversized", &mut oversized),
        ("stalled", &mut stalled),
        ("truncated", &mut truncated),
    ] {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(45), conn.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the {what} connection was not closed");
    }
    let out = run(&mut s.custody(&alice, &["ssh", "local-ssh", "--", "echo", "still-here"]));
    assert_eq!(text(&out.stdout), "still-here\n", "{}", text(&out.stderr));

    // An interactive shell in a real terminal (tmux): a typed command, a
    // resize, exit; the replay shows the output and the resize.
    let tmux = crate::harness::Tmux::new(&s.config_dir);
    let q = |p: &Path| format!("'{}'", p.display());
    let shell = format!(
        "env CUSTODY_COORDINATOR='{}' CUSTODY_CA={} CUSTODY_TOKEN='{}' CUSTODY_CONFIG_DIR={} HOME={} {} ssh strict-ssh; sleep 30",
        c.api_urls(&[]),
        q(&c.ca_path()),
        alice,
        q(&s.config_dir),
        q(&s.config_dir),
        q(&c.bins.custody),
    );
    tmux.start("t", 100, 30, &shell);
    let pane = || tmux.pane("t");
    eventually(Duration::from_secs(20), "a shell prompt", || {
        let p = pane();
        let ok = p.contains('$') || p.contains('#');
        async move { ok }
    })
    .await;
    tmux.run(&["send-keys", "-t", "t", "echo typed-$((6*7))", "Enter"]);
    eventually(
        Duration::from_secs(20),
        "the typed command's output",
        || {
            let ok = pane().contains("typed-42");
            async move { ok }
        },
    )
    .await;
    tmux.run(&["resize-window", "-t", "t", "-x", "80", "-y", "24"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tmux.run(&["send-keys", "-t", "t", "exit", "Enter"]);
    let mut shell_id = String::new();
    eventually(Duration::from_secs(20), "the shell session's end", || {
        let out = custody(
            c,
            &[],
            &admin,
            &["sessions", "list", "--resource", "strict-ssh", "--json"],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(found) = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["command"] == "shell" && x["closed"] == true)
        {
            shell_id = found["session_id"].as_str().unwrap_or_default().to_owned();
        }
        let ok = !shell_id.is_empty();
        async move { ok }
    })
    .await;
    drop(tmux);
    let lines = crate::harness::asciicast(c, &admin, &shell_id, &s.config_dir.join("shell.cast"));
    assert_eq!(
        (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
        (Some(100), Some(30)),
        "{:?}",
        lines[0]
    );
    let output = crate::harness::cast_output(&lines);
    assert!(output.contains("typed-42"), "{output}");
    assert!(
        lines.iter().any(|l| l[1] == "r" && l[2] == "80x24"),
        "no resize in {lines:?}"
    );
    // On a strict resource the keystrokes are recorded, for auditors and
    // admins: the owner's own view has none.
    let typed: String = lines[1..]
        .iter()
        .filter(|l| l[1] == "i")
        .map(|l| l[2].as_str().unwrap_or_default())
        .collect();
    assert!(typed.contains("echo typed-$((6*7))"), "{typed:?}");
    let own = custody(c, &[], &alice, &["sessions", "show", &shell_id, "--json"]);
    assert!(own.status.success(), "{}", text(&own.stderr));
    let own: serde_json::Value = serde_json::from_slice(&own.stdout).unwrap();
    let own = own["events"].as_array().unwrap();
    assert!(own.iter().any(|e| e["event"]["stream"] == "stdout"));
    assert!(
        !own.iter().any(|e| e["event"]["stream"] == "keystrokes"),
        "the owner sees keystrokes"
    );
    // On other resources a shell's input is not recorded.
    let out = run(&mut s.custody(&alice, &["ssh", "local-ssh", "--", "cat"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!session_events(c, &admin, "local-ssh")
        .iter()
        .any(|e| e["event"]["stream"] == "keystrokes"));

    files_and_transfers(&s, &alice, &admin).await;
    masking_and_host_certificates(&s, &alice, &admin);
    bulk_both_ways(&s, &alice);

    // The edge's private key appears nowhere on the coordinators.
    let key_text = std::fs::read_to_string(&s.sshd.key_file).unwrap();
    let secret_line = key_text.lines().nth(2).unwrap();
    let hits = grep_dir(&c.dir, secret_line.as_bytes());
    assert!(hits.is_empty(), "edge key found in {hits:?}");
}
