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
        .policy_apply(POLICY, "yaml")
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
    spec.resources_toml = sshd.resource_toml("local-ssh", "env = \"dev\"") + &bad;
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    for r in ["local-ssh", "bad-ssh"] {
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
        let out = self
            .custody(token, &["ssh", "config"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let config = self.config_dir.join("ssh_config");
        std::fs::write(&config, &out.stdout).unwrap();
        let mut cmd = Command::new("ssh");
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

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run")
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
    let out = run(s.custody(
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
    let out = run(s.custody(
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
    let out = run(s.custody(
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

    // Forwarding of every kind is refused, with a message.
    let out = run(s.ssh(&alice, &["-W", "127.0.0.1:9", "local-ssh.custody"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("port forwarding to 127.0.0.1:9 is not allowed"),
        "{}",
        text(&out.stderr)
    );
    let out = run(s.ssh(
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
    let out = run(cmd);
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
    let out = run(cmd);
    assert!(
        text(&out.stderr).contains("X11 forwarding is refused"),
        "{}",
        text(&out.stderr)
    );

    // A target whose host key is not the pinned one is refused, and the
    // refusal is recorded with the key it presented.
    let out = run(s.custody(&alice, &["ssh", "bad-ssh", "--", "true"]));
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
    let out = run(s.custody(&audrey, &["ssh", "local-ssh", "--", "true"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("local-ssh"),
        "{}",
        text(&out.stderr)
    );
    // Past its expiry and the verifier's 30 s leeway.
    tokio::time::sleep(Duration::from_secs(33).saturating_sub(minted.elapsed())).await;
    let out = run(s.custody(&short, &["ssh", "local-ssh", "--", "true"]));
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
    for (what, conn) in [("oversized", &mut oversized), ("stalled", &mut stalled)] {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the {what} connection was not closed");
    }
    let out = run(s.custody(&alice, &["ssh", "local-ssh", "--", "echo", "still-here"]));
    assert_eq!(text(&out.stdout), "still-here\n", "{}", text(&out.stderr));

    // An interactive shell in a real terminal (tmux): a typed command, a
    // resize, exit; the replay shows the output and the resize.
    let sock = s.config_dir.join("tmux.sock");
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&sock)
            .args(args)
            .output()
            .expect("run tmux");
        text(&out.stdout)
    };
    let q = |p: &Path| format!("'{}'", p.display());
    let shell = format!(
        "env CUSTODY_COORDINATOR='{}' CUSTODY_CA={} CUSTODY_TOKEN='{}' CUSTODY_CONFIG_DIR={} HOME={} {} ssh local-ssh; sleep 30",
        c.api_urls(&[]),
        q(&c.ca_path()),
        alice,
        q(&s.config_dir),
        q(&s.config_dir),
        q(&c.bins.custody),
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        &shell,
    ]);
    let pane = || tmux(&["capture-pane", "-p", "-t", "t"]);
    eventually(Duration::from_secs(20), "a shell prompt", || {
        let p = pane();
        let ok = p.contains('$') || p.contains('#');
        async move { ok }
    })
    .await;
    tmux(&["send-keys", "-t", "t", "echo typed-$((6*7))", "Enter"]);
    eventually(
        Duration::from_secs(20),
        "the typed command's output",
        || {
            let ok = pane().contains("typed-42");
            async move { ok }
        },
    )
    .await;
    tmux(&["resize-window", "-t", "t", "-x", "80", "-y", "24"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tmux(&["send-keys", "-t", "t", "exit", "Enter"]);
    let mut shell_id = String::new();
    eventually(Duration::from_secs(20), "the shell session's end", || {
        let out = custody(
            c,
            &[],
            &admin,
            &["sessions", "list", "--resource", "local-ssh", "--json"],
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
    tmux(&["kill-server"]);
    let cast = s.config_dir.join("shell.cast");
    let out = custody(
        c,
        &[],
        &admin,
        &[
            "sessions",
            "replay",
            &shell_id,
            "--asciicast",
            &cast.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&cast)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
        (Some(100), Some(30)),
        "{:?}",
        lines[0]
    );
    let output: String = lines[1..]
        .iter()
        .filter(|l| l[1] == "o")
        .map(|l| l[2].as_str().unwrap_or_default())
        .collect();
    assert!(output.contains("typed-42"), "{output}");
    assert!(
        lines.iter().any(|l| l[1] == "r" && l[2] == "80x24"),
        "no resize in {lines:?}"
    );

    // The edge's private key appears nowhere on the coordinators.
    let key_text = std::fs::read_to_string(&s.sshd.key_file).unwrap();
    let secret_line = key_text.lines().nth(2).unwrap();
    let hits = grep_dir(&c.dir, secret_line.as_bytes());
    assert!(hits.is_empty(), "edge key found in {hits:?}");
}
