//! Edge agents: enrollment, tunnels, routing, revocation and the shell
//! connector, with real coordinator and edge processes.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use custody_cli::dev::{EdgeSpec, GenOptions};
use custody_edge::identity::{EdgeInfo, Identity};
use custody_proto::frame::{encode_frame, read_frame, write_frame};
use custody_proto::tunnel::v1 as t;

use crate::harness::{self, eventually, TestCluster};

const POLICY: &str = include_str!("../../examples/policy.yaml");

/// A started cluster with the example policy and edge `e1` serving
/// `local-shell`, live on every node.
pub(crate) async fn system(opts: GenOptions) -> TestCluster {
    let (mut c, _) = harness::started(opts).await;
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    c.add_edge(&EdgeSpec::shell("e1", "local-shell")).unwrap();
    c.enroll_edge("e1").await.unwrap();
    let n = c.nodes.len();
    c.wait_for_resource("local-shell", n, Duration::from_secs(20))
        .await
        .unwrap();
    c
}

/// Runs the `custody` binary against `nodes` (all when empty) as `token`.
pub(crate) fn custody(c: &TestCluster, nodes: &[u64], token: &str, args: &[&str]) -> Output {
    custody_cmd(c, nodes, token, args)
        .stdin(Stdio::null())
        .output()
        .expect("run custody")
}

pub(crate) fn custody_cmd(c: &TestCluster, nodes: &[u64], token: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(&c.bins.custody);
    cmd.args(args)
        .env("CUSTODY_COORDINATOR", c.api_urls(nodes))
        .env("CUSTODY_CA", c.ca_path())
        .env("CUSTODY_TOKEN", token)
        .env_remove("CUSTODY_TOKEN_FILE");
    cmd
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn token(c: &TestCluster, who: &str) -> String {
    c.mint_token(who).await.unwrap().token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_edge_runs_commands_with_their_exit_code() {
    let c = system(GenOptions::default()).await;
    let alice = token(&c, "alice").await;
    let out = custody(
        &c,
        &[],
        &alice,
        &[
            "exec",
            "local-shell",
            "--",
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 3",
        ],
    );
    assert_eq!(text(&out.stdout), "hi\n");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("oops"), "{err}");
    assert!(err.contains("custody: session "), "{err}");
    // The command line is evidence, not logging: no coordinator or edge log
    // holds it (a denied one neither).
    let denied = custody(
        &c,
        &[],
        &alice,
        &[
            "exec",
            "local-shell",
            "--",
            "rm",
            "-rf",
            "/tmp/secret-marker-7q",
        ],
    );
    assert!(!denied.status.success());
    let logs: Vec<std::path::PathBuf> = c
        .nodes
        .keys()
        .map(|id| c.log_path(*id))
        .chain(std::iter::once(c.edges["e1"].log.clone()))
        .collect();
    for path in &logs {
        let l = std::fs::read_to_string(path).unwrap_or_default();
        for needle in ["oops >&2", "secret-marker-7q"] {
            assert!(
                !l.contains(needle),
                "{} logs a command line",
                path.display()
            );
        }
    }

    // stdin is streamed to the command.
    let mut child = custody_cmd(
        &c,
        &[],
        &alice,
        &["exec", "local-shell", "--", "tr", "a-z", "A-Z"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello edge\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "HELLO EDGE\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));

    // A missing program is a clear error, not a hang.
    let out = custody(
        &c,
        &[],
        &alice,
        &["exec", "local-shell", "--", "/no/such/program"],
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("cannot start"),
        "{}",
        text(&out.stderr)
    );

    // The edge key is private.
    use std::os::unix::fs::PermissionsExt as _;
    let key = c.edges["e1"].data_dir.join("edge-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o077,
        0
    );
    let resources = custody(&c, &[], &alice, &["resources", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&resources.stdout).unwrap();
    assert_eq!(v[0]["name"], "local-shell");
    assert_eq!(v[0]["live"], true);
    assert_eq!(
        v[0]["edges"][0]["connected_nodes"],
        serde_json::json!([1, 2, 3])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denies_with_the_rule_and_nothing_runs() {
    let c = system(GenOptions::default()).await;
    let marker = c.dir.join("marker");
    let touch = format!("touch {}", marker.display());
    // bob (approvers) matches no exec rule: default deny.
    let bob = token(&c, "bob").await;
    let out = custody(
        &c,
        &[],
        &bob,
        &["exec", "local-shell", "--", "sh", "-c", &touch],
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("denied by policy"),
        "{}",
        text(&out.stderr)
    );
    // Auditors read evidence but cannot exec.
    let audrey = token(&c, "audrey").await;
    let out = custody(
        &c,
        &[],
        &audrey,
        &["exec", "local-shell", "--", "sh", "-c", &touch],
    );
    assert!(
        text(&out.stderr).contains("denied by policy"),
        "{}",
        text(&out.stderr)
    );
    // A guardrail names its rule.
    let alice = token(&c, "alice").await;
    let out = custody(
        &c,
        &[],
        &alice,
        &[
            "exec",
            "local-shell",
            "--",
            "rm",
            "-rf",
            marker.to_str().unwrap(),
        ],
    );
    assert!(
        text(&out.stderr).contains("denied by policy rule guardrail:destructive-shell"),
        "{}",
        text(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!marker.exists(), "a denied command reached the edge");
    // Non-admins cannot enroll edges.
    let out = custody(
        &c,
        &[],
        &alice,
        &["edge-token", "create", "--name", "sneaky"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("requires role admin"),
        "{}",
        text(&out.stderr)
    );
    // Unknown resources are named.
    let out = custody(&c, &[], &alice, &["exec", "nope", "--", "true"]);
    assert!(
        text(&out.stderr).contains("no resource named"),
        "{}",
        text(&out.stderr)
    );
    // Allowed, the same command does run.
    let out = custody(
        &c,
        &[],
        &alice,
        &["exec", "local-shell", "--", "sh", "-c", &touch],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(marker.exists());
}

/// The session id `custody exec` prints on stderr.
fn session_of(out: &Output) -> String {
    let err = text(&out.stderr);
    err.lines()
        .find_map(|l| l.strip_prefix("custody: session "))
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| panic!("no session id in {err}"))
}

/// Resources belong to the cluster: a second edge that claims a bound
/// resource (and says `evidence=async` for a strict one) is refused and
/// audited, and sessions keep going to the bound edge, in strict mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_serve_only_what_the_cluster_bound_to_them() {
    let (mut c, _) = harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    let shell = |name: &str, evidence: &str| {
        format!(
            "[[resources]]\nname = \"{name}\"\nkind = \"shell\"\nlabels = {{ env = \"dev\", evidence = \"{evidence}\" }}\n"
        )
    };
    let mut e1 = EdgeSpec::shell("e1", "local-shell");
    e1.resources_toml = shell("local-shell", "strict");
    c.add_edge(&e1).unwrap();
    c.enroll_edge("e1").await.unwrap();
    // e2 is bound to its own shell only, and claims local-shell too, async.
    let mut e2 = EdgeSpec::shell("e2", "e2-shell");
    e2.resources_toml = shell("e2-shell", "async") + &shell("local-shell", "async");
    c.add_edge(&e2).unwrap();
    let own: Vec<_> = c
        .edge_resources("e2")
        .unwrap()
        .into_iter()
        .filter(|r| r.name == "e2-shell")
        .collect();
    let admin = c.client(&[]).unwrap();
    let tok = admin
        .create_enroll_token_for("e2", "", Duration::from_secs(600), own)
        .await
        .unwrap()
        .token;
    c.start_edge("e2", Some(&tok)).unwrap();
    let n = c.nodes.len();
    for r in ["local-shell", "e2-shell"] {
        c.wait_for_resource(r, n, Duration::from_secs(20))
            .await
            .unwrap();
    }
    let list = admin.list_resources().await.unwrap();
    let ls = list.iter().find(|r| r.name == "local-shell").unwrap();
    let names: Vec<&str> = ls.edges.iter().map(|e| e.edge_name.as_str()).collect();
    assert_eq!(names, ["e1"], "{ls:?}");
    assert_eq!(ls.bound_edges, ["e1"]);
    assert_eq!(ls.labels["evidence"], "strict");
    eventually(
        Duration::from_secs(10),
        "the refused claim is audited",
        || {
            let logs: String = c
                .nodes
                .keys()
                .map(|id| std::fs::read_to_string(c.log_path(*id)).unwrap_or_default())
                .collect();
            async move { logs.contains("resource_claim_refused") && logs.contains("not e2") }
        },
    )
    .await;
    // A token cannot take the name either.
    let e = admin
        .create_enroll_token_for(
            "e3",
            "",
            Duration::from_secs(60),
            c.edge_resources("e1").unwrap(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("bound to edge(s) e1"), "{e}");

    // Sessions go to e1, strictly recorded, through every node.
    let alice = token(&c, "alice").await;
    let adm = token(&c, "admin").await;
    for id in c.nodes.keys().copied().collect::<Vec<_>>() {
        let out = custody(&c, &[id], &alice, &["exec", "local-shell", "--", "true"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let sid = session_of(&out);
        let shown = custody(&c, &[], &adm, &["sessions", "show", &sid, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        assert_eq!(v["session"]["mode"], "strict", "{v}");
        assert_eq!(v["events"][0]["event"]["edge"], "e1", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_are_single_use_and_expire() {
    let (mut c, _) = harness::started(GenOptions::default()).await;
    let admin = c.client(&[]).unwrap();
    c.add_edge(&EdgeSpec::shell("e1", "shell-a")).unwrap();
    let tok = admin
        .create_enroll_token_for(
            "e1",
            "eu",
            Duration::from_secs(600),
            c.edge_resources("e1").unwrap(),
        )
        .await
        .unwrap()
        .token;
    c.start_edge("e1", Some(&tok)).unwrap();
    c.wait_for_resource("shell-a", 1, Duration::from_secs(20))
        .await
        .unwrap();

    // The same token again, for a fresh edge: refused.
    c.add_edge(&EdgeSpec::shell("e2", "shell-b")).unwrap();
    c.start_edge("e2", Some(&tok)).unwrap();
    let log = c.edges["e2"].log.clone();
    wait_exit(&mut c, "e2").await;
    let l = std::fs::read_to_string(&log).unwrap();
    assert!(l.contains("enrollment token was already used"), "{l}");
    assert!(!c.edges["e2"].data_dir.join("edge.json").exists());

    // An expired token: refused.
    let short = admin
        .create_enroll_token("e3", "eu", Duration::from_secs(1))
        .await
        .unwrap()
        .token;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.add_edge(&EdgeSpec::shell("e3", "shell-c")).unwrap();
    c.start_edge("e3", Some(&short)).unwrap();
    let log = c.edges["e3"].log.clone();
    wait_exit(&mut c, "e3").await;
    let l = std::fs::read_to_string(&log).unwrap();
    assert!(l.contains("enrollment token has expired"), "{l}");

    // A made-up token: refused.
    c.add_edge(&EdgeSpec::shell("e4", "shell-d")).unwrap();
    c.start_edge(
        "e4",
        Some("cet1_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    )
    .unwrap();
    let log = c.edges["e4"].log.clone();
    wait_exit(&mut c, "e4").await;
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("unknown enrollment token"));
    // A second token for an active name is refused up front.
    let e = admin
        .create_enroll_token("e1", "eu", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already enrolled"), "{e}");
}

async fn wait_exit(c: &mut TestCluster, edge: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = c.edge_exit(edge) {
            assert!(!s.success(), "edge {edge} exited successfully");
            return s;
        }
        assert!(Instant::now() < deadline, "edge {edge} did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cluster whose edge `e1` (serving `local-shell`) dials node 1 only.
async fn edge_on_node_1_only() -> TestCluster {
    let (mut c, _) = harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    let mut spec = EdgeSpec::shell("e1", "local-shell");
    spec.seeds = vec![1];
    spec.seeds_only = true;
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    c.wait_for_resource("local-shell", 1, Duration::from_secs(20))
        .await
        .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_route_through_the_node_holding_the_tunnel() {
    let c = edge_on_node_1_only().await;
    let alice = token(&c, "alice").await;
    let v: serde_json::Value =
        serde_json::from_slice(&custody(&c, &[], &alice, &["resources", "--json"]).stdout).unwrap();
    assert_eq!(v[0]["edges"][0]["connected_nodes"], serde_json::json!([1]));
    for caller in [2, 3] {
        let out = custody(
            &c,
            &[caller],
            &alice,
            &[
                "exec",
                "local-shell",
                "--",
                "sh",
                "-c",
                "echo routed; exit 7",
            ],
        );
        assert_eq!(text(&out.stdout), "routed\n", "{}", text(&out.stderr));
        assert_eq!(out.status.code(), Some(7));
        assert!(
            text(&out.stderr).contains("via node 1"),
            "{}",
            text(&out.stderr)
        );
    }

    // A member node asking node 1 to relay a session the cluster never
    // admitted is refused, and the refusal is audited.
    let admin = c.client(&[]).unwrap();
    let st = admin.cluster_status().await.unwrap();
    assert_eq!(st.cluster_version, 3, "{st:?}");
    let edge_id = v[0]["edges"][0]["id"].as_u64().unwrap();
    let ca = std::fs::read(c.ca_path()).unwrap();
    let cert = std::fs::read(c.dir.join("node-2.pem")).unwrap();
    let key = std::fs::read(c.dir.join("node-2-key.pem")).unwrap();
    let raft = c.node(1).unwrap().raft_addr.clone();
    for (session, index) in [
        ("never-admitted", 0),
        ("never-admitted-either", st.commit_index),
    ] {
        let e =
            crate::bad_input::relay_as((&raft, 1), &ca, &cert, &key, edge_id, session, index).await;
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains("not admitted"), "{e}");
    }
    let log = std::fs::read_to_string(c.log_path(1)).unwrap();
    assert!(log.contains("relay_refused"), "the refusal was not audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_edge_is_cut_off_everywhere() {
    let mut c = system(GenOptions::default()).await;
    let alice = token(&c, "alice").await;
    // A long session, through a node other than the one revoking.
    let mut long = custody_cmd(
        &c,
        &[2],
        &alice,
        &["exec", "local-shell", "--", "sleep", "60"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let started = Instant::now();
    let admin = c.client(&[1]).unwrap();
    admin.revoke_edge("e1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = long.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "session survived revocation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = long.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(255), "{}", text(&out.stderr));
    eprintln!("session ended {:?} after revocation", started.elapsed());
    // The agent learns it was revoked and stops; restarting it does not help.
    wait_exit(&mut c, "e1").await;
    c.start_edge("e1", None).unwrap();
    wait_exit(&mut c, "e1").await;
    let log = std::fs::read_to_string(&c.edges["e1"].log).unwrap();
    assert!(log.contains("revoked"), "{log}");
    let out = custody(&c, &[], &alice, &["exec", "local-shell", "--", "true"]);
    assert!(
        text(&out.stderr).contains("no resource named"),
        "{}",
        text(&out.stderr)
    );
    let edges = admin.list_edges().await.unwrap();
    assert!(edges[0].revoked && edges[0].connected_nodes.is_empty());
    // The name can be enrolled again with a new token (and a new identity).
    let _ = std::fs::remove_dir_all(&c.edges["e1"].data_dir);
    c.enroll_edge("e1").await.unwrap();
    c.wait_for_resource("local-shell", 3, Duration::from_secs(20))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_kill_and_edge_restart_recover_quickly() {
    let mut c = system(GenOptions::default()).await;
    let alice = token(&c, "alice").await;
    c.kill(1).unwrap();
    let t0 = Instant::now();
    let out = custody(
        &c,
        &[],
        &alice,
        &["exec", "local-shell", "--", "echo", "still here"],
    );
    let took = t0.elapsed();
    assert_eq!(text(&out.stdout), "still here\n", "{}", text(&out.stderr));
    // Reported, not asserted (machines are noisy): `custody-chaos bench
    // tunnel` measures recovery time.
    eprintln!("session after killing node 1: {took:?}");

    c.start(1).unwrap();
    let client = c.client(&[2, 3]).unwrap();
    eventually(
        Duration::from_secs(20),
        "edge reconnects to node 1",
        || async {
            client
                .list_edges()
                .await
                .is_ok_and(|e| e[0].connected_nodes == vec![1, 2, 3])
        },
    )
    .await;

    c.kill_edge("e1");
    c.start_edge("e1", None).unwrap();
    let t0 = Instant::now();
    c.wait_for_resource("local-shell", 1, Duration::from_secs(10))
        .await
        .unwrap();
    let took = t0.elapsed();
    eprintln!("edge live again after restart: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "edge took {took:?} to come back"
    );
    let out = custody(
        &c,
        &[],
        &alice,
        &["exec", "local-shell", "--", "echo", "back"],
    );
    assert_eq!(text(&out.stdout), "back\n", "{}", text(&out.stderr));
}

// ---- Hostile peers on the tunnel port ----

/// Sends one well-formed enrollment request and returns the refusal.
async fn enroll_refusal(ca: &[u8], addr: std::net::SocketAddr, token: &str) -> String {
    let ep = endpoint();
    let cfg = custody_edge::tls::quic_client_config(ca, None).unwrap();
    let conn = ep
        .connect_with(cfg, addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let kr = custody_edge::identity::new_key_request().unwrap();
    write_frame(
        &mut send,
        &t::EnrollRequest {
            token: token.into(),
            csr_pem: kr.csr_pem,
            agent_version: String::new(),
        },
    )
    .await
    .unwrap();
    let r: t::EnrollResponse = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match r.result {
        Some(t::enroll_response::Result::Error(e)) => e,
        other => panic!("made-up token {token} was not refused: {other:?}"),
    }
}

fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Connects with `identity` and says hello; Ok(()) when welcomed.
async fn hello_with(c: &TestCluster, identity: Option<&Identity>) -> Result<(), String> {
    let ca = std::fs::read(c.ca_path()).unwrap();
    let cfg = custody_edge::tls::quic_client_config(&ca, identity)?;
    let addr: std::net::SocketAddr = c.nodes[&1].tunnel_addr.parse().unwrap();
    let ep = endpoint();
    let run = async {
        let conn = ep
            .connect_with(cfg, addr, "127.0.0.1")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = t::EdgeMessage {
            // What e1 serves, so a welcome leaves its registration unchanged.
            kind: Some(t::edge_message::Kind::Hello(t::Hello {
                agent_version: "test".into(),
                resources: vec![t::Resource {
                    name: "local-shell".into(),
                    kind: "shell".into(),
                    labels: [("env".to_string(), "dev".to_string())].into(),
                }],
            })),
        };
        write_frame(&mut send, &hello)
            .await
            .map_err(|e| e.to_string())?;
        match read_frame::<t::CoordinatorMessage, _>(&mut recv).await {
            Ok(Some(t::CoordinatorMessage {
                kind: Some(t::coordinator_message::Kind::Welcome(_)),
            })) => Ok(()),
            other => Err(format!("{other:?} / {:?}", conn.close_reason())),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

fn forged_identity(cert_pem: String, key_pem: String) -> Identity {
    let info = EdgeInfo {
        edge_id: 1,
        name: "forged".into(),
        region: "eu".into(),
    };
    Identity::new(info, cert_pem, key_pem).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_certificates_and_garbage_are_refused() {
    let c = system(GenOptions::default()).await;
    // The real edge identity is welcomed (the check itself works).
    let real = custody_edge::identity::Store::new(&c.edges["e1"].data_dir)
        .load()
        .unwrap()
        .unwrap();
    hello_with(&c, Some(&real)).await.unwrap();

    // Self-signed, with the right kind of name.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(vec![format!("edge-{}.edge.custody", real.info.edge_id)])
            .unwrap();
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let self_signed = p.self_signed(&key).unwrap();
    let e = hello_with(
        &c,
        Some(&forged_identity(self_signed.pem(), key.serialize_pem())),
    )
    .await
    .unwrap_err();
    eprintln!("self-signed: {e}");

    // Signed by another CA.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = rcgen::Issuer::new(ca_params, other_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let foreign = p.signed_by(&key, &other_ca).unwrap();
    let e = hello_with(
        &c,
        Some(&forged_identity(foreign.pem(), key.serialize_pem())),
    )
    .await
    .unwrap_err();
    eprintln!("foreign CA: {e}");
    // The client may only see a lost connection; the node logs why.
    let node_log = c.log_path(1);
    eventually(
        Duration::from_secs(5),
        "both forged certificates rejected at the handshake",
        || {
            let log = std::fs::read_to_string(&node_log).unwrap_or_default();
            async move {
                log.matches("invalid peer certificate: UnknownIssuer")
                    .count()
                    >= 2
            }
        },
    )
    .await;

    // A node certificate is from the right CA but is no edge.
    let node_cert = std::fs::read_to_string(c.dir.join("node-2.pem")).unwrap();
    let node_key = std::fs::read_to_string(c.dir.join("node-2-key.pem")).unwrap();
    let e = hello_with(&c, Some(&forged_identity(node_cert, node_key)))
        .await
        .unwrap_err();
    assert!(e.contains("not an edge certificate"), "{e}");

    // No certificate: only enrollment is possible; a hello is refused.
    let e = hello_with(&c, None).await.unwrap_err();
    eprintln!("no certificate: {e}");

    // Garbage UDP datagrams at the tunnel port.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1200 + 1)).map(|_| rand::random::<u8>()).collect();
        let _ = sock.send_to(&junk, &c.nodes[&1].tunnel_addr);
    }
    // Malformed frames from a genuine edge: a huge length, then bad protobuf.
    let ca = std::fs::read(c.ca_path()).unwrap();
    let addr: std::net::SocketAddr = c.nodes[&1].tunnel_addr.parse().unwrap();
    for (junk, expect) in [
        (
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            "exceeds the 1048576-byte limit",
        ),
        (vec![0, 0, 0, 3, 0xff, 0xff, 0xff], "malformed"),
    ] {
        let ep = endpoint();
        let cfg = custody_edge::tls::quic_client_config(&ca, Some(&real)).unwrap();
        let conn = ep
            .connect_with(cfg, addr, "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut send, &junk)
            .await
            .unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("coordinator closes a connection sending garbage");
        assert!(reason.to_string().contains(expect), "{reason}");
    }
    // A garbage enrollment request.
    let ep = endpoint();
    let cfg = custody_edge::tls::quic_client_config(&ca, None).unwrap();
    let conn = ep
        .connect_with(cfg, addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut send,
        &encode_frame(&t::EnrollRequest {
            token: "cet1_x".into(),
            csr_pem: "not a csr".into(),
            agent_version: String::new(),
        }),
    )
    .await
    .unwrap();
    let _ = send.finish();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    eprintln!("garbage enrollment: {reason}");

    // Well-formed requests with made-up tokens never reach the Raft log, and
    // past the limit an address is refused without a look at its request.
    let admin = c.client(&[1]).unwrap();
    let before = admin.status_at(&c.nodes[&1].api_addr).await.unwrap();
    let mut refusals = Vec::new();
    for i in 0..12 {
        let token = format!("cet1_madeup{i:040}");
        refusals.push(enroll_refusal(&ca, addr, &token).await);
    }
    let after = admin.status_at(&c.nodes[&1].api_addr).await.unwrap();
    assert_eq!(
        after.commit_index, before.commit_index,
        "refused enrollments were proposed: {refusals:?}"
    );
    assert!(
        refusals[0].contains("unknown enrollment token"),
        "{refusals:?}"
    );
    assert!(
        refusals[11].contains("too many refused enrollment attempts"),
        "{refusals:?}"
    );

    // Everything above left the node and the real edge working.
    let alice = token(&c, "alice").await;
    let out = custody(
        &c,
        &[1],
        &alice,
        &["exec", "local-shell", "--", "echo", "fine"],
    );
    assert_eq!(text(&out.stdout), "fine\n", "{}", text(&out.stderr));
    let log = std::fs::read_to_string(c.log_path(1)).unwrap();
    assert!(!log.contains("panicked"), "a coordinator panicked");
    assert!(
        log.contains("rejected tunnel connection"),
        "handshake failures are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_certificates_are_renewed_before_expiry() {
    let mut c = harness::cluster(GenOptions::default());
    // Six-second certificates: renewed about every four seconds.
    for id in c.nodes.keys().copied().collect::<Vec<_>>() {
        let path = c.nodes[&id].config.clone();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n[edges]\n"), "{text}");
        let text = text.replace("\n[edges]\n", "\n[edges]\ncert_ttl_secs = 6\n");
        std::fs::write(&path, text).unwrap();
    }
    c.start_all().unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    c.add_edge(&EdgeSpec::shell("e1", "local-shell")).unwrap();
    c.enroll_edge("e1").await.unwrap();
    c.wait_for_resource("local-shell", 3, Duration::from_secs(20))
        .await
        .unwrap();
    let cert = c.edges["e1"].data_dir.join("edge-cert.pem");
    let first = std::fs::read_to_string(&cert).unwrap();
    let (_, first_expiry) = custody_edge::identity::validity(&first).unwrap();
    // Past the first certificate's expiry, a restarted edge still gets in:
    // it holds a renewed one.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let now = std::fs::read_to_string(&cert).unwrap();
    let (_, now_expiry) = custody_edge::identity::validity(&now).unwrap();
    assert!(now_expiry > first_expiry + 3, "certificate was not renewed");
    assert!(custody_edge::identity::now_secs() > first_expiry);
    // Restart right after a renewal, so the certificate it starts with still
    // has most of its six seconds (a restart near the end of the lifetime
    // would rightly find it expired).
    let renewed = now.clone();
    eventually(Duration::from_secs(15), "another renewal", || {
        let fresh = std::fs::read_to_string(&cert).unwrap_or_default();
        let changed = !fresh.is_empty() && fresh != renewed;
        async move { changed }
    })
    .await;
    // The killed edge's connections count as live until they time out, so
    // wait for the restarted edge's own tunnels (its log is appended to).
    let log = c.edges["e1"].log.clone();
    let tunnels = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("tunnel up")
            .count()
    };
    let before = tunnels();
    c.kill_edge("e1");
    c.start_edge("e1", None).unwrap();
    eventually(
        Duration::from_secs(20),
        "the restarted edge's tunnels to all three nodes",
        || {
            let up = tunnels() >= before + 3;
            async move { up }
        },
    )
    .await;
    c.wait_for_resource("local-shell", 3, Duration::from_secs(10))
        .await
        .unwrap();
    let alice = token(&c, "alice").await;
    let out = custody(
        &c,
        &[],
        &alice,
        &["exec", "local-shell", "--", "echo", "renewed"],
    );
    assert_eq!(text(&out.stdout), "renewed\n", "{}", text(&out.stderr));
    let log = std::fs::read_to_string(c.log_path(1)).unwrap()
        + &std::fs::read_to_string(c.log_path(2)).unwrap()
        + &std::fs::read_to_string(c.log_path(3)).unwrap();
    assert!(
        log.matches("edge_certificate_renewed").count() >= 2,
        "expected repeated renewals"
    );
}

/// Whether a `sleep` process whose command line contains `needle` runs (the
/// CLI's own command line also contains it, but its name is `custody`).
fn running(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        comm.trim() == "sleep"
            && std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_going_away_kills_the_remote_command() {
    let c = edge_on_node_1_only().await;
    let alice = token(&c, "alice").await;
    // Through the edge's own node, then relayed through another.
    for (caller, seconds) in [(1u64, "31"), (2, "32")] {
        // A silent command: only the abandoned stream can stop it.
        let mut cli = custody_cmd(
            &c,
            &[caller],
            &alice,
            &["exec", "local-shell", "--", "sleep", seconds],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let needle = format!("sleep {seconds}");
        eventually(
            Duration::from_secs(10),
            "the command starts on the edge",
            || {
                let r = running(&needle);
                async move { r }
            },
        )
        .await;
        cli.kill().unwrap();
        cli.wait().unwrap();
        eventually(
            Duration::from_secs(10),
            "the abandoned command is killed",
            || {
                let r = !running(&needle);
                async move { r }
            },
        )
        .await;
    }
}

/// The id of the live session (as `admin` sees them) whose command or
/// identity contains `needle`, once it is listed.
pub(crate) async fn live_session(c: &TestCluster, admin: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = custody(c, &[], admin, &["sessions", "list", "--live", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let found = v["sessions"].as_array().unwrap().iter().find(|s| {
            s["command"].as_str().unwrap_or("").contains(needle)
                || s["identity"].as_str().unwrap_or("").contains(needle)
        });
        if let Some(s) = found {
            return s["session_id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no live session matching {needle:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `child` to exit within `within`; its stderr and how long it took.
pub(crate) fn exited(child: &mut std::process::Child, within: Duration) -> (String, Duration) {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut err);
            }
            return (err, t0.elapsed());
        }
        assert!(t0.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The recorded end of a session, once it is closed (read through `nodes`).
pub(crate) async fn close_reason(c: &TestCluster, nodes: &[u64], admin: &str, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = custody(c, nodes, admin, &["sessions", "show", id, "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["session"]["closed"] == true {
                return v["session"]["close_reason"].as_str().unwrap().to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "session {id} not closed: {}",
            text(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until session `id`'s recorded events mention `text`.
pub(crate) async fn recorded(c: &TestCluster, admin: &str, id: &str, text_: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = custody(c, &[], admin, &["sessions", "show", id, "--json"]);
        if out.status.success() && text(&out.stdout).contains(text_) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "session {id} never recorded {text_:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Live sessions end when their authority does, and record who ended them
/// and why: an admin's kill through another node (within 2 s), the caller's
/// token expiring, a policy change (from `policy`) that denies the caller,
/// and SIGTERM of the hosting coordinator (its chain is closed before exit).
/// `start(c, via, token, n)` opens the `n`th session through node `via`;
/// `needle(n)` finds it among the live sessions; `running` is recorded once
/// its command runs.
pub(crate) async fn sessions_end_with_their_authority(
    c: &mut TestCluster,
    policy: &str,
    start: impl Fn(&TestCluster, u64, &str, u32) -> std::process::Child,
    needle: impl Fn(u32) -> String,
    running: &str,
) {
    let admin = c.token().unwrap();
    let alice = token(c, "alice").await;

    // Killed by an admin through another node.
    let mut s = start(c, 2, &alice, 1);
    let id = live_session(c, &admin, &needle(1)).await;
    let out = custody(
        c,
        &[3],
        &admin,
        &["sessions", "kill", &id, "--reason", "incident 42"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("on node 2"),
        "{}",
        text(&out.stdout)
    );
    let (err, took) = exited(&mut s, Duration::from_secs(10));
    assert!(took < Duration::from_secs(2), "the kill took {took:?}");
    assert!(err.contains("incident 42"), "{err}");
    let why = close_reason(c, &[1], &admin, &id).await;
    assert!(
        why.contains("ended by admin@dev.custody.local: incident 42"),
        "{why}"
    );
    // Only admins kill; a reason is required.
    let out = custody(c, &[], &alice, &["sessions", "kill", &id, "--reason", "x"]);
    assert!(!out.status.success());
    let out = custody(c, &[], &admin, &["sessions", "kill", &id, "--reason", " "]);
    assert!(
        text(&out.stderr).contains("reason is required"),
        "{}",
        text(&out.stderr)
    );

    // The caller's token expires.
    let short = c.mint_token_for("alice", Some(4)).await.unwrap().token;
    let mut s = start(c, 1, &short, 2);
    let id = live_session(c, &admin, &needle(2)).await;
    let (err, _) = exited(&mut s, Duration::from_secs(20));
    assert!(err.contains("token expired"), "{err}");
    let why = close_reason(c, &[], &admin, &id).await;
    assert!(why.contains("ended by token-expiry"), "{why}");

    // A policy change that denies the caller, once the session's command
    // runs (earlier, the command itself would be refused).
    let mut s = start(c, 3, &alice, 3);
    let id = live_session(c, &admin, &needle(3)).await;
    recorded(c, &admin, &id, running).await;
    let lockout = policy.replacen(
        "\nrules:\n",
        "\nrules:\n  - name: lockout\n    identity: { groups: [engineers] }\n    actions: [\"*\"]\n    decision: deny\n",
        1,
    );
    assert_ne!(lockout, policy);
    c.client(&[])
        .unwrap()
        .policy_apply(&lockout, "yaml")
        .await
        .unwrap();
    let (err, _) = exited(&mut s, Duration::from_secs(20));
    assert!(err.contains("no longer allows"), "{err}");
    let why = close_reason(c, &[], &admin, &id).await;
    assert!(why.contains("ended by policy"), "{why}");
    c.client(&[])
        .unwrap()
        .policy_apply(policy, "yaml")
        .await
        .unwrap();

    // SIGTERM of the hosting coordinator closes the session's chain.
    let mut s = start(c, 2, &alice, 4);
    let id = live_session(c, &admin, &needle(4)).await;
    c.stop(2).unwrap();
    exited(&mut s, Duration::from_secs(20));
    let why = close_reason(c, &[1, 3], &admin, &id).await;
    assert!(why.contains("ended by shutdown"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_exec_sessions_end_with_their_authority() {
    let mut c = system(GenOptions::default()).await;
    let start = |c: &TestCluster, via: u64, tok: &str, n: u32| {
        let secs = format!("6{n}");
        custody_cmd(
            c,
            &[via],
            tok,
            &["exec", "local-shell", "--", "sleep", &secs],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    sessions_end_with_their_authority(&mut c, POLICY, start, |n| format!("sleep 6{n}"), "sleep")
        .await;
}

/// A sample's value in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_tell_readiness_raft_edges_and_sessions() {
    let mut c = system(GenOptions::default()).await;
    let url = |c: &TestCluster, id: u64, path: &str| {
        let cfg: toml::Table =
            toml::from_str(&std::fs::read_to_string(&c.nodes[&id].config).unwrap()).unwrap();
        format!(
            "http://{}{path}",
            cfg["listen"]["metrics"].as_str().expect("listen.metrics")
        )
    };
    let http = reqwest::Client::new();
    let get = |u: String| {
        let http = http.clone();
        async move {
            let r = http.get(u).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    for id in [1, 2, 3] {
        assert_eq!(get(url(&c, id, "/healthz")).await, (200, "ok\n".into()));
        let (code, body) = get(url(&c, id, "/readyz")).await;
        assert_eq!(code, 200, "node {id}: {body}");
        let (code, m) = get(url(&c, id, "/metrics")).await;
        assert_eq!(code, 200);
        assert!(
            metric(&m, "custody_raft_term").is_some_and(|t| t != "0"),
            "{m}"
        );
        assert!(metric(&m, "custody_raft_applied_index").is_some(), "{m}");
        for (name, want) in [
            ("custody_raft_voters", "3"),
            ("custody_ready", "1"),
            // The edge keeps a tunnel to every node.
            ("custody_edges_connected", "1"),
            ("custody_sessions_live{via=\"exec\"}", "0"),
        ] {
            assert_eq!(
                metric(&m, name).as_deref(),
                Some(want),
                "node {id}: {name} in\n{m}"
            );
        }
    }
    let mut leaders = 0;
    for id in [1, 2, 3] {
        let m = get(url(&c, id, "/metrics")).await.1;
        leaders += usize::from(metric(&m, "custody_raft_is_leader").as_deref() == Some("1"));
    }
    assert_eq!(leaders, 1);
    // A live exec session shows on the node that serves it.
    let alice = token(&c, "alice").await;
    let mut s = custody_cmd(
        &c,
        &[1],
        &alice,
        &["exec", "local-shell", "--", "sleep", "30"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    harness::eventually(
        Duration::from_secs(20),
        "a live exec session in the metrics",
        || {
            let u = url(&c, 1, "/metrics");
            let get = get(u);
            async move {
                metric(&get.await.1, "custody_sessions_live{via=\"exec\"}").as_deref() == Some("1")
            }
        },
    )
    .await;
    // The edge's own: three tunnels, the session, its certificate.
    let edge = |path: &str| format!("http://{}{path}", c.edges["e1"].metrics);
    assert_eq!(get(edge("/healthz")).await, (200, "ok\n".into()));
    assert_eq!(get(edge("/readyz")).await.0, 200);
    let m = get(edge("/metrics")).await.1;
    assert_eq!(
        metric(&m, "custody_edge_tunnels_up").as_deref(),
        Some("3"),
        "{m}"
    );
    assert_eq!(
        metric(&m, "custody_edge_sessions_active").as_deref(),
        Some("1"),
        "{m}"
    );
    let expiry: i64 = metric(&m, "custody_edge_certificate_expiry_seconds")
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry > custody_edge::identity::now_secs(), "{m}");
    let _ = s.kill();
    let _ = s.wait();
    // Counters: the session was counted, a refused token is, and so are
    // proposals and leader changes.
    let sum = |m: &str, prefix: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let m = get(url(&c, 1, "/metrics")).await.1;
    assert!(
        sum(&m, "custody_sessions_total{via=\"exec\",") >= 1.0,
        "{m}"
    );
    assert!(sum(&m, "custody_raft_proposal_seconds_count") >= 1.0, "{m}");
    let refused = sum(&m, "custody_auth_failures_total{");
    let out = custody(&c, &[1], "not-a-token", &["whoami"]);
    assert!(!out.status.success());
    let m = get(url(&c, 1, "/metrics")).await.1;
    assert!(sum(&m, "custody_auth_failures_total{") > refused, "{m}");
    let leader = c
        .wait_for_leader(&[], Duration::from_secs(20))
        .await
        .unwrap();
    let survivor = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    let other = [1, 2, 3]
        .into_iter()
        .find(|i| *i != leader && *i != survivor)
        .unwrap();
    let changes = sum(
        &get(url(&c, survivor, "/metrics")).await.1,
        "custody_raft_leader_changes_total",
    );
    c.kill(leader).unwrap();
    harness::eventually(Duration::from_secs(30), "a new leader counted", || {
        let get = get(url(&c, survivor, "/metrics"));
        async move { sum(&get.await.1, "custody_raft_leader_changes_total") > changes }
    })
    .await;
    // Cut off from the majority, a node is live but not ready.
    c.kill(other).unwrap();
    harness::eventually(Duration::from_secs(30), "a lone node not ready", || {
        let get = get(url(&c, survivor, "/readyz"));
        async move {
            let (code, body) = get.await;
            code == 503 && body.contains("no leader")
        }
    })
    .await;
    assert_eq!(get(url(&c, survivor, "/healthz")).await.0, 200);
}
