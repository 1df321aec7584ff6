//! The Kubernetes test peer: no real kube-apiserver can be installed here,
//! so `custody_tests::kube_api` serves enough of the API for the real
//! kubectl. This checks kubectl against it directly, so that later tests
//! through the gateway rest on a peer kubectl accepts.

use std::process::{Command, Output};

use custody_tests::kube_api::KubeApi;

use crate::edge::text;

fn kubectl_as(api: &KubeApi, token: &str, args: &[&str]) -> Output {
    let ca = std::env::temp_dir().join(format!("kube-api-{}.pem", api.addr.port()));
    std::fs::write(&ca, &api.ca_pem).unwrap();
    Command::new("kubectl")
        .args(["--server", &api.url(), "--token", token])
        .arg(format!("--certificate-authority={}", ca.display()))
        .args(["--kubeconfig", "/dev/null"])
        .args(args)
        .output()
        .expect("run kubectl (preinstalled; 1.32 here)")
}

fn kubectl(api: &KubeApi, args: &[&str]) -> Output {
    kubectl_as(api, &api.token, args)
}

/// An exec that writes to both streams and exits 7.
const EXIT_7: [&str; 6] = [
    "exec",
    "web-1",
    "--",
    "sh",
    "-c",
    "echo out; echo err >&2; exit 7",
];

fn exits_7_with_both_streams(out: Output) {
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
}

/// Writes with protobuf bodies (`create configmap`, `create deployment`),
/// client-side and server-side apply, `auth can-i` (protobuf) and `auth
/// whoami`, through `run` (kubectl direct or through Custody); objects are
/// checked on the server.
fn writes_and_auth(api: &KubeApi, dir: &std::path::Path, run: impl Fn(&[&str]) -> Output) {
    let ok = |args: &[&str]| {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    ok(&["create", "configmap", "pb-cm", "--from-literal=mode=slow"]);
    assert_eq!(
        api.object("configmaps", "default", "pb-cm").unwrap()["data"]["mode"],
        "slow"
    );
    ok(&[
        "create",
        "deployment",
        "pb-web",
        "--image=nginx:1.27",
        "--replicas=2",
    ]);
    let d = api.object("deployments", "default", "pb-web").unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.27"
    );
    let manifest = dir.join(format!("applied-{}.yaml", api.addr.port()));
    let write = |mode: &str| {
        std::fs::write(
            &manifest,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: default\ndata:\n  mode: {mode}\n"),
        )
        .unwrap()
    };
    let file = manifest.display().to_string();
    write("first");
    ok(&["apply", "-f", &file, "--validate=false"]);
    write("second");
    ok(&["apply", "-f", &file, "--validate=false"]);
    assert_eq!(
        api.object("configmaps", "default", "applied").unwrap()["data"]["mode"],
        "second"
    );
    write("third");
    ok(&["apply", "--server-side", "-f", &file, "--validate=false"]);
    assert_eq!(
        api.object("configmaps", "default", "applied").unwrap()["data"]["mode"],
        "third"
    );
    assert_eq!(ok(&["auth", "can-i", "create", "pods"]).trim(), "yes");
    assert!(ok(&["auth", "whoami"]).contains("test-cluster-admin"));
    for (r, n) in [
        ("configmap", "pb-cm"),
        ("deployment", "pb-web"),
        ("configmap", "applied"),
    ] {
        ok(&["delete", r, n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_against_the_test_api_server() {
    let api = KubeApi::start().await.unwrap();

    let out = kubectl(&api, &["get", "pods"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("web-1"), "{}", text(&out.stdout));

    let out = kubectl(&api, &["get", "pods", "-n", "default", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "web-1");

    writes_and_auth(&api, std::env::temp_dir().as_path(), |args| {
        kubectl(&api, args)
    });

    // From a manifest (JSON on the wire).
    let manifest = std::env::temp_dir().join(format!("kube-cm-{}.yaml", api.addr.port()));
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: fast\n",
    )
    .unwrap();
    let file = manifest.display().to_string();
    let out = kubectl(&api, &["create", "-f", &file, "--validate=false"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        api.object("configmaps", "default", "settings").unwrap()["data"]["mode"],
        "fast"
    );
    let out = kubectl(
        &api,
        &[
            "patch",
            "configmap",
            "settings",
            "--type=merge",
            "-p",
            r#"{"data":{"mode":"slow"}}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        api.object("configmaps", "default", "settings").unwrap()["data"]["mode"],
        "slow"
    );
    let out = kubectl(&api, &["delete", "configmap", "settings"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(api.object("configmaps", "default", "settings").is_none());

    // The server's own answers: a missing object, and a bad token.
    let out = kubectl(&api, &["get", "pod", "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    let out = kubectl_as(&api, "wrong", &["get", "pods"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Unauthorized")
            || text(&out.stderr).contains("must be logged in"),
        "{}",
        text(&out.stderr)
    );

    // Exec over the v5 WebSocket: stdout, stderr and the exit code.
    exits_7_with_both_streams(kubectl(&api, &EXIT_7));

    // What kubectl sent is logged, with kubectl's own headers.
    let seen = api.seen();
    assert!(seen.iter().any(|s| s.method == "DELETE"
        && s.path.contains("/configmaps/settings")
        && s.headers.iter().any(|(k, _)| k == "kubectl-command")));
}

/// Reads `out` on a thread; the receiver gets `()` once `needle` appeared.
fn read_until(
    out: impl std::io::Read + Send + 'static,
    needle: &'static str,
) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if line.contains(needle) {
                let _ = tx.send(());
                return;
            }
        }
    });
    rx
}

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
  auditor: { groups: [auditors] }
  approver: { groups: [approvers] }
guardrails:
  - name: no-secret-reads
    kube: { verbs: [get, list, watch], resources: [secrets] }
    decision: deny
  - name: no-remote-rm
    pattern: '^exec .* -- .*rm -rf'
    decision: deny
  - name: prod-deletes-need-review
    kube: { verbs: [delete, deletecollection], namespaces: [prod] }
    decision: require_approval
    approval: { groups: [approvers], count: 1 }
rules:
  - name: engineers-kube
    identity: { groups: [engineers] }
    resource: { names: [local-kube] }
    actions: [connect, "kube:get", "kube:list", "kube:watch", "kube:create", "kube:update", "kube:patch", "kube:delete", "kube:logs", "kube:exec", "kube:attach", "kube:portforward"]
    decision: allow
    guardrails: [no-secret-reads, prod-deletes-need-review, no-remote-rm]
  - name: engineers-kube-ops
    identity: { groups: [engineers] }
    resource: { names: [ops-kube] }
    actions: [connect, "kube:get", "kube:list"]
    decision: allow
"#;

struct Through {
    c: crate::harness::TestCluster,
    api: KubeApi,
    dir: tempfile::TempDir,
}

impl Through {
    fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// `https://ADDR` of a coordinator's Kubernetes listener.
    fn kube_url(&self) -> String {
        let node = self.c.nodes.values().next().unwrap();
        let cfg: toml::Table =
            toml::from_str(&std::fs::read_to_string(&node.config).unwrap()).unwrap();
        format!("https://{}", cfg["listen"]["kubernetes"].as_str().unwrap())
    }

    /// kubectl with the context `custody kube login` wrote, as `token`.
    fn kubectl_cmd(&self, token: &str, context: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["--context", context])
            .args(args)
            .env("CUSTODY_COORDINATOR", self.c.api_urls(&[]))
            .env("CUSTODY_CA", self.c.ca_path())
            .env("CUSTODY_TOKEN", token)
            .env_remove("CUSTODY_TOKEN_FILE");
        cmd
    }

    fn kubectl(&self, token: &str, context: &str, args: &[&str]) -> Output {
        self.kubectl_cmd(token, context, args)
            .output()
            .expect("run kubectl")
    }

    /// Makes an object from `manifest` directly on the API server.
    fn create_direct(&self, name: &str, manifest: &str) {
        let file = self.dir.path().join(name);
        std::fs::write(&file, manifest).unwrap();
        let out = kubectl(
            &self.api,
            &[
                "create",
                "--validate=false",
                "-f",
                &file.display().to_string(),
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

async fn through() -> Through {
    use custody_cli::dev::{EdgeSpec, GenOptions};
    let api = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("kube-ca.pem");
    let token = dir.path().join("kube-token");
    std::fs::write(&ca, &api.ca_pem).unwrap();
    std::fs::write(&token, &api.token).unwrap();
    let (mut c, _) = crate::harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    let resource = |name: &str| {
        format!(
            "[[resources]]\nname = \"{name}\"\nkind = \"kubernetes\"\nlabels = {{ env = \"dev\" }}\n[resources.kubernetes]\nserver = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\n",
            api.url(),
            ca.display(),
            token.display()
        )
    };
    let mut spec = EdgeSpec::shell("e1", "unused");
    spec.resources_toml = resource("local-kube") + &resource("ops-kube");
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    for r in ["local-kube", "ops-kube"] {
        c.wait_for_resource(r, 3, std::time::Duration::from_secs(20))
            .await
            .unwrap();
    }
    Through { c, api, dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_goes_through_the_gateway_with_evidence_and_guardrails() {
    use crate::edge::custody;
    use crate::postgres::{grep_dir, session_events};
    let t = through().await;
    let c = &t.c;
    let alice = c.mint_token("alice").await.unwrap().token;
    let admin = c.mint_token("admin").await.unwrap().token;
    let bob = c.mint_token("bob").await.unwrap().token;
    let short = c.mint_token_for("alice", Some(1)).await.unwrap().token;
    let kubeconfig = t.kubeconfig().display().to_string();
    for r in ["local-kube", "ops-kube"] {
        let out = custody(
            c,
            &[],
            &alice,
            &["kube", "login", r, "--kubeconfig", &kubeconfig],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    // Reads, with evidence of each request.
    let out = t.kubectl(&alice, "local-kube", &["get", "pods"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("web-1"), "{}", text(&out.stdout));
    let out = t.kubectl(&alice, "local-kube", &["get", "pods", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "web-1");
    let events = session_events(c, &admin, "local-kube");
    let listed = events
        .iter()
        .find(|e| {
            e["type"] == "kube_request"
                && e["event"]["verb"] == "list"
                && e["event"]["resource"] == "pods"
        })
        .expect("a recorded list of pods");
    assert_eq!(listed["event"]["namespace"], "default");
    assert_eq!(listed["event"]["kubectl_command"], "kubectl get");
    assert!(events
        .iter()
        .any(|e| e["type"] == "kube_response" && e["event"]["status"] == 200));
    assert!(events.iter().any(|e| e["type"] == "output"
        && e["event"]["stream"] == "response"
        && e["event"]["text"].as_str().unwrap_or("").contains("web-1")));

    // Writes: create, patch, delete, each with its body recorded.
    let manifest = t.dir.path().join("cm.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: fast\n",
    )
    .unwrap();
    let file = manifest.display().to_string();
    let out = t.kubectl(
        &alice,
        "local-kube",
        &["create", "-f", &file, "--validate=false"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = t.kubectl(
        &alice,
        "local-kube",
        &[
            "patch",
            "configmap",
            "settings",
            "--type=merge",
            "-p",
            r#"{"data":{"mode":"slow"}}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        t.api.object("configmaps", "default", "settings").unwrap()["data"]["mode"],
        "slow"
    );
    let out = t.kubectl(&alice, "local-kube", &["delete", "configmap", "settings"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(t.api.object("configmaps", "default", "settings").is_none());
    let events = session_events(c, &admin, "local-kube");
    assert!(events.iter().any(|e| e["type"] == "output"
        && e["event"]["stream"] == "request"
        && e["event"]["text"].as_str().unwrap_or("").contains("slow")));
    assert!(events
        .iter()
        .any(|e| e["type"] == "command"
            && e["event"]["text"] == "delete configmaps/settings -n default"));

    // Streams: a watch sees a pod created meanwhile; logs, and logs -f as
    // the server produces them.
    let mut watch = t
        .kubectl_cmd(&alice, "local-kube", &["get", "pods", "-w", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let watched = read_until(watch.stdout.take().unwrap(), "pod/web-2");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let web2 = t.dir.path().join("web-2.yaml");
    std::fs::write(
        &web2,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-2\nspec:\n  containers: [{name: app, image: busybox}]\n",
    )
    .unwrap();
    let out = t.kubectl(
        &alice,
        "local-kube",
        &[
            "create",
            "--validate=false",
            "-f",
            &web2.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = tokio::task::spawn_blocking(move || {
        watched.recv_timeout(std::time::Duration::from_secs(20))
    })
    .await
    .unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen.is_ok(), "the watch did not show the new pod");
    let out = t.kubectl(&alice, "local-kube", &["logs", "web-1"]);
    assert_eq!(
        text(&out.stdout),
        "line 1\nline 2\nline 3\n",
        "{}",
        text(&out.stderr)
    );
    let mut follow = t
        .kubectl_cmd(&alice, "local-kube", &["logs", "-f", "web-1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let followed = read_until(follow.stdout.take().unwrap(), "line 6");
    let streamed = tokio::task::spawn_blocking(move || {
        followed.recv_timeout(std::time::Duration::from_secs(20))
    })
    .await
    .unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(streamed.is_ok(), "logs -f did not stream");
    assert!(session_events(c, &admin, "local-kube")
        .iter()
        .any(|e| e["type"] == "kube_request" && e["event"]["verb"] == "watch"));

    // A guardrail denies secret reads with a Status naming it.
    let out = t.kubectl(&alice, "local-kube", &["get", "secrets"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no-secret-reads"),
        "{}",
        text(&out.stderr)
    );
    // Where secrets may be read, their values are masked for the client
    // and in the evidence. (Objects are made directly on the API server.)
    t.create_direct("secret.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ndata:\n  password: c3VwZXItc2VjcmV0LXZhbHVl\n");
    let out = t.kubectl(&alice, "ops-kube", &["get", "secret", "db", "-o", "yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("password:"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        !text(&out.stdout).contains("c3VwZXItc2VjcmV0LXZhbHVl"),
        "{}",
        text(&out.stdout)
    );
    let recorded = session_events(c, &admin, "ops-kube");
    assert!(recorded
        .iter()
        .any(|e| e["type"] == "kube_request" && e["event"]["resource"] == "secrets"));
    assert!(recorded.iter().any(|e| e["event"]["stream"] == "response"));
    assert!(
        !serde_json::to_string(&recorded)
            .unwrap()
            .contains("c3VwZXItc2VjcmV0LXZhbHVl"),
        "the secret's value is in the evidence"
    );

    // A client's impersonation is refused.
    let out = t.kubectl(&alice, "local-kube", &["get", "pods", "--as=admin"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("impersonation"),
        "{}",
        text(&out.stderr)
    );

    // A delete in prod is held for approval, then runs once.
    t.create_direct("pod.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: api-1\n  namespace: prod\nspec:\n  containers: [{name: app, image: busybox}]\n");
    let out = t.kubectl(
        &alice,
        "local-kube",
        &["delete", "pod", "api-1", "-n", "prod"],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    let request = stderr
        .split("approval required: request ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no approval request in {stderr}"))
        .to_owned();
    assert!(
        t.api.object("pods", "prod", "api-1").is_some(),
        "deleted before approval"
    );
    let out = custody(c, &[], &bob, &["approvals", "approve", &request]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = t.kubectl(
        &alice,
        "local-kube",
        &["delete", "pod", "api-1", "-n", "prod"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(t.api.object("pods", "prod", "api-1").is_none());

    // Bad tokens, an unknown resource: Status answers.
    let kube_url = t.kube_url();
    let addr = kube_url.trim_start_matches("https://").to_owned();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(c.ca_path()).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let get = |path: &str, token: &str| {
        http.get(format!("https://{addr}{path}"))
            .bearer_auth(token)
            .send()
    };
    let r = get("/k8s/local-kube/api/v1/pods", "garbage").await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["kind"], "Status");
    garbage_closes_the_connection(&addr, &c.ca_path()).await;
    // The port still serves.
    let r = get("/k8s/local-kube/api/v1/pods", &alice).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = get("/k8s/no-such/api/v1/pods", &alice).await.unwrap();
    assert!([403, 404].contains(&r.status().as_u16()), "{}", r.status());
    let r = get("/elsewhere", &alice).await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // A path the API server would read differently is refused, not judged
    // as something else (`secrets%2Fdb` is the secret db to the server).
    let r = get(
        "/k8s/ops-kube/api/v1/namespaces/default/secrets%2Fdb",
        &alice,
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // The resource's root alone is still a path.
    let r = get("/k8s/local-kube", &alice).await.unwrap();
    assert_ne!(r.status().as_u16(), 502);

    // What reached the API server: the edge's token, never the caller's,
    // and no impersonation.
    for s in t.api.seen().iter().filter(|s| s.path.contains("/pods")) {
        let auth = s.headers.iter().find(|(k, _)| k == "authorization");
        assert_eq!(
            auth.map(|(_, v)| v.as_str()),
            Some(format!("Bearer {}", t.api.token).as_str())
        );
        assert!(!s.headers.iter().any(|(k, _)| k.starts_with("impersonate-")));
    }
    // The cluster token appears nowhere on the coordinators.
    let hits = grep_dir(&c.dir, t.api.token.as_bytes());
    assert!(hits.is_empty(), "cluster token found in {hits:?}");

    // An expired token (minted at the start; verifiers allow 30 s of clock
    // leeway): 401 with a Status saying so.
    let mut last = String::new();
    for _ in 0..90 {
        let r = get("/k8s/local-kube/api/v1/pods", &short).await.unwrap();
        if r.status().as_u16() == 401 {
            last = r.text().await.unwrap();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let body: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
    assert_eq!(body["kind"], "Status", "{last}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("expired"),
        "{body}"
    );
}

/// Garbage, and a header larger than the gateway reads, on the Kubernetes
/// port: each connection is answered with an error or closed, and nothing
/// else happens.
async fn garbage_closes_the_connection(addr: &str, ca: &std::path::Path) {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let long = format!(
        "GET /k8s/local-kube/api HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 << 10)
    );
    for junk in [
        b"\x00\xffNOT HTTP AT ALL\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9 extra\r\n\r\n".to_vec(),
        long.into_bytes(),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        // The gateway may close before reading all of it.
        let _ = s.write_all(&junk).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            s.read_to_end(&mut answer),
        )
        .await;
        assert!(read.is_ok(), "the connection stayed open after garbage");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
    }
}

/// A kube-rs client (typed `Pod`s) lists and watches through the gateway
/// with a Custody token.
async fn kube_rs_lists_and_watches(t: &Through, token: &str) {
    use futures::TryStreamExt as _;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};
    let ca = std::fs::read(t.c.ca_path()).unwrap();
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}/k8s/local-kube\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u, namespace: default}}\ncurrent-context: x\n",
        t.kube_url(),
        {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&ca)
        },
    );
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(cfg).unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert!(list
        .items
        .iter()
        .any(|p| p.metadata.name.as_deref() == Some("web-1")));
    let rv = list.metadata.resource_version.clone().unwrap_or_default();
    let mut events = Box::pin(pods.watch(&WatchParams::default(), &rv).await.unwrap());
    t.create_direct(
        "kube-rs.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: seen-by-kube-rs\nspec:\n  containers: [{name: app, image: busybox}]\n",
    );
    let seen = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(e) = events.try_next().await.unwrap() {
            if let WatchEvent::Added(p) = e {
                if p.metadata.name.as_deref() == Some("seen-by-kube-rs") {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "the watch did not show the new pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_goes_through_the_gateway_recorded_and_judged() {
    use crate::edge::custody;
    use crate::harness::eventually;
    use crate::postgres::session_events;
    use std::time::Duration;
    let t = through().await;
    let c = &t.c;
    let alice = c.mint_token("alice").await.unwrap().token;
    let admin = c.mint_token("admin").await.unwrap().token;
    let kubeconfig = t.kubeconfig().display().to_string();
    let out = custody(
        c,
        &[],
        &alice,
        &["kube", "login", "local-kube", "--kubeconfig", &kubeconfig],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Protobuf writes, apply, server-side apply and auth, through Custody;
    // the protobuf body is recorded as its JSON form.
    writes_and_auth(&t.api, t.dir.path(), |args| {
        t.kubectl(&alice, "local-kube", args)
    });
    let events = session_events(c, &admin, "local-kube");
    assert!(
        events.iter().any(|e| e["event"]["stream"] == "request"
            && e["event"]["text"]
                .as_str()
                .unwrap_or("")
                .contains("\"image\":\"nginx:1.27\"")),
        "the protobuf deployment is not recorded as JSON"
    );
    // A secret sent as protobuf: its value is masked in the evidence.
    let out = t.kubectl(
        &alice,
        "local-kube",
        &[
            "create",
            "secret",
            "generic",
            "pb-secret",
            "--from-literal=password=pb-secret-value",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let recorded = serde_json::to_string(&session_events(c, &admin, "local-kube")).unwrap();
    assert!(recorded.contains("pb-secret"));
    assert!(
        !recorded.contains("pb-secret-value") && !recorded.contains("cGItc2VjcmV0LXZhbHVl"),
        "the protobuf secret's value is in the evidence"
    );
    kube_rs_lists_and_watches(&t, &alice).await;

    // Both streams and the exit code come through, and are recorded.
    exits_7_with_both_streams(t.kubectl(&alice, "local-kube", &EXIT_7));
    let events = session_events(c, &admin, "local-kube");
    let exec = |e: &serde_json::Value| e["type"] == "kube_request" && e["event"]["verb"] == "exec";
    assert!(events.iter().any(exec), "no exec request recorded");
    assert!(events.iter().any(|e| e["type"] == "command"
        && e["event"]["text"]
            == "exec pods/web-1 -n default -- sh -c 'echo out; echo err >&2; exit 7'"));
    let stream_has = |events: &[serde_json::Value], stream: &str, needle: &str| {
        events.iter().any(|e| {
            e["type"] == "output"
                && e["event"]["stream"] == stream
                && e["event"]["text"].as_str().unwrap_or("").contains(needle)
        })
    };
    assert!(stream_has(&events, "stdout", "out"), "stdout not recorded");
    assert!(stream_has(&events, "stderr", "err"), "stderr not recorded");
    assert!(events
        .iter()
        .any(|e| e["type"] == "outcome" && e["event"]["exit_code"] == 7));

    // stdin from a file, recorded as the caller's input.
    let input = t.dir.path().join("input.txt");
    std::fs::write(&input, "from-a-file\nsecond line\n").unwrap();
    let out = t
        .kubectl_cmd(&alice, "local-kube", &["exec", "-i", "web-1", "--", "cat"])
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from-a-file\nsecond line\n");
    let events = session_events(c, &admin, "local-kube");
    assert!(
        stream_has(&events, "stdin", "from-a-file"),
        "stdin not recorded"
    );

    // A guardrail denies, on the WebSocket attempt and kubectl's SPDY retry.
    let out = t.kubectl(
        &alice,
        "local-kube",
        &[
            "exec",
            "web-1",
            "--",
            "sh",
            "-c",
            "rm -rf /tmp/custody-nothing",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no-remote-rm"),
        "{}",
        text(&out.stderr)
    );
    // SPDY alone (kubectl's fallback forced): the same denial.
    let out = t
        .kubectl_cmd(
            &alice,
            "local-kube",
            &[
                "exec",
                "web-1",
                "--",
                "sh",
                "-c",
                "rm -rf /tmp/custody-nothing",
            ],
        )
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out.stderr).contains("no-remote-rm"),
        "{}",
        text(&out.stderr)
    );
    // An allowed exec over SPDY only is refused, saying why.
    let out = t
        .kubectl_cmd(&alice, "local-kube", &["exec", "web-1", "--", "true"])
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out.stderr).contains("WebSocket only"),
        "{}",
        text(&out.stderr)
    );
    // A missing pod: the API server's answer, not the SPDY refusal.
    let out = t.kubectl(&alice, "local-kube", &["exec", "nope", "--", "true"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    // port-forward is refused, saying so.
    let out = t.kubectl(
        &alice,
        "local-kube",
        &["port-forward", "pod/web-1", "18080:80"],
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("port-forward"),
        "{}",
        text(&out.stderr)
    );

    // A terminal (tmux): typed commands, a resize the process sees, exit;
    // the replay has the terminal's size and the resize.
    let tmux = crate::harness::Tmux::new(t.dir.path());
    let shell = format!(
        "env CUSTODY_COORDINATOR='{}' CUSTODY_CA='{}' CUSTODY_TOKEN='{}' kubectl --kubeconfig '{}' --context local-kube exec -it web-1 -- sh; sleep 30",
        c.api_urls(&[]),
        c.ca_path().display(),
        alice,
        kubeconfig,
    );
    tmux.start("k", 100, 30, &shell);
    let pane = || tmux.pane("k");
    eventually(Duration::from_secs(20), "a shell prompt", || {
        let p = pane();
        let ok = p.contains('$') || p.contains('#');
        async move { ok }
    })
    .await;
    tmux.run(&[
        "send-keys",
        "-t",
        "k",
        "echo typed-$((6*7)); stty size",
        "Enter",
    ]);
    eventually(
        Duration::from_secs(20),
        "the typed command's output",
        || {
            let ok = pane().contains("typed-42");
            async move { ok }
        },
    )
    .await;
    tmux.run(&["resize-window", "-t", "k", "-x", "80", "-y", "24"]);
    eventually(Duration::from_secs(20), "the resize at the server", || {
        let ok = t
            .api
            .resizes()
            .iter()
            .any(|s| (s.width, s.height) == (80, 24));
        async move { ok }
    })
    .await;
    tmux.run(&["send-keys", "-t", "k", "stty size", "Enter"]);
    eventually(Duration::from_secs(20), "the new size inside", || {
        let ok = pane().contains("24 80");
        async move { ok }
    })
    .await;
    tmux.run(&["send-keys", "-t", "k", "exit", "Enter"]);
    let mut shell_id = String::new();
    eventually(
        Duration::from_secs(20),
        "the terminal session's end",
        || {
            let out = custody(
                c,
                &[],
                &admin,
                &["sessions", "list", "--resource", "local-kube", "--json"],
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if let Some(found) =
                v.as_array().into_iter().flatten().find(|x| {
                    x["command"] == "exec pods/web-1 -n default -- sh" && x["closed"] == true
                })
            {
                shell_id = found["session_id"].as_str().unwrap_or_default().to_owned();
            }
            let ok = !shell_id.is_empty();
            async move { ok }
        },
    )
    .await;
    drop(tmux);
    let lines = crate::harness::asciicast(c, &admin, &shell_id, &t.dir.path().join("exec.cast"));
    assert_eq!(
        (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
        (Some(100), Some(30)),
        "{lines:?}"
    );
    let output = crate::harness::cast_output(&lines);
    assert!(output.contains("typed-42"), "{output}");
    assert!(
        lines.iter().any(|l| l[1] == "r" && l[2] == "80x24"),
        "no resize in {lines:?}"
    );
}
