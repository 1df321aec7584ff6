//! AI agents through MCP, driven by the real SDKs: Python's `mcp` 2.3.0 (in
//! the venv `scripts/test` makes from `tests/mcp/requirements.txt`) over
//! stdio (`custody mcp`) and over Streamable HTTP (a coordinator's `/mcp`),
//! in the handshake-era and the 2026-07-28 modes, and npm's
//! `@modelcontextprotocol/sdk` 1.32 over stdio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use custody_cli::dev::{EdgeSpec, GenOptions};
use custody_cli::localssh::LocalSshd;
use custody_tests::kube_api::KubeApi;

use crate::edge::{custody, text};
use crate::harness::{self, TestCluster};
use crate::postgres::{grep_dir, Postgres};

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
  auditor: { groups: [auditors] }
  approver: { groups: [approvers] }
guardrails:
  - name: held-commands
    pattern: 'held-marker'
    decision: require_approval
    approval: { groups: [approvers], count: 1 }
rules:
  - name: agents-postgres
    identity: { groups: [ai-agents], client_kinds: [machine] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: allow
    mask: [pii]
  - name: agents-shell
    identity: { groups: [ai-agents], client_kinds: [machine] }
    resource: { kinds: [shell] }
    actions: [exec]
    decision: allow
    guardrails: [held-commands]
  - name: agents-ssh
    identity: { groups: [ai-agents], client_kinds: [machine] }
    resource: { kinds: [ssh] }
    actions: [connect, exec]
    decision: allow
  - name: agents-kube
    identity: { groups: [ai-agents], client_kinds: [machine] }
    resource: { kinds: [kubernetes] }
    actions: ["kube:get", "kube:list", "kube:logs", "kube:patch"]
    decision: allow
masking:
  - name: pii
    detectors: [email, credit_card]
    columns: ["*ssn*"]
"#;

/// Values the masking must keep out of every result, record and log.
const EMAIL: &str = "zed.secret@example.com";
const CARD: &str = "4111 1111 1111 1111";
const SSN: &str = "987-65-4329";

fn mcp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mcp")
}

fn python() -> PathBuf {
    let p = mcp_dir().join(".venv/bin/python");
    assert!(
        p.exists(),
        "the Python MCP SDK is not installed in {}: run scripts/test (it makes the venv from tests/mcp/requirements.txt)",
        p.display()
    );
    p
}

/// The cluster, with an edge serving `local-shell`, `local-postgres`, and
/// when given `local-kube` (the tests' Kubernetes API server) and
/// `local-ssh` (a private sshd).
async fn system(
    pg: &Postgres,
    kube: Option<(&KubeApi, &Path)>,
    ssh: Option<&LocalSshd>,
) -> TestCluster {
    let (mut c, _) = harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    let mut spec = EdgeSpec::shell("e1", "local-shell");
    spec.resources_toml
        .push_str(&pg.resource_toml("local-postgres", "env = \"dev\""));
    let mut resources = vec!["local-shell", "local-postgres"];
    if let Some((api, dir)) = kube {
        let (ca, token) = (dir.join("kube-ca.pem"), dir.join("kube-token"));
        std::fs::write(&ca, &api.ca_pem).unwrap();
        std::fs::write(&token, &api.token).unwrap();
        spec.resources_toml.push_str(&format!(
            "[[resources]]\nname = \"local-kube\"\nkind = \"kubernetes\"\nlabels = {{ env = \"dev\" }}\n[resources.kubernetes]\nserver = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\n",
            api.url(),
            ca.display(),
            token.display()
        ));
        resources.push("local-kube");
    }
    if let Some(sshd) = ssh {
        spec.resources_toml
            .push_str(&sshd.resource_toml("local-ssh", "env = \"dev\""));
        resources.push("local-ssh");
    }
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    for r in resources {
        c.wait_for_resource(r, 3, Duration::from_secs(20))
            .await
            .unwrap();
    }
    c
}

fn mcp_url(c: &TestCluster, id: u64) -> String {
    let text = std::fs::read_to_string(&c.nodes[&id].config).unwrap();
    let t: toml::Table = toml::from_str(&text).unwrap();
    format!("https://{}/mcp", t["listen"]["mcp"].as_str().unwrap())
}

/// How the Python client reaches Custody.
enum Via<'a> {
    Stdio,
    Http(&'a str),
}

/// Runs the Python SDK client: lists the tools, makes `calls`.
fn py(
    c: &TestCluster,
    token: &str,
    via: Via,
    mode: &str,
    calls: &Value,
    traceparent: Option<&str>,
) -> Value {
    let calls_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(calls_file.path(), calls.to_string()).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(mcp_dir().join("client.py"))
        .args(["--mode", mode, "--calls-file"])
        .arg(calls_file.path())
        .env("CUSTODY_COORDINATOR", c.api_urls(&[]))
        .env("CUSTODY_CA", c.ca_path())
        .env("CUSTODY_TOKEN", token)
        .env_remove("CUSTODY_TOKEN_FILE");
    if let Some(t) = traceparent {
        cmd.args(["--traceparent", t]);
    }
    match via {
        Via::Stdio => {
            cmd.arg("--").arg(&c.bins.custody).arg("mcp");
        }
        Via::Http(url) => {
            cmd.args(["--url", url, "--token", token, "--ca"])
                .arg(c.ca_path());
        }
    }
    let out = cmd.output().expect("run the Python MCP client");
    assert!(
        out.status.success(),
        "python client failed: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {}", text(&out.stdout)))
}

fn tool_names(v: &Value) -> Vec<String> {
    v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

fn call(name: &str, args: Value) -> Value {
    json!({"name": name, "arguments": args})
}

fn select_all() -> Value {
    call(
        "query",
        json!({"resource": "local-postgres", "sql": "select id, name, email, card, customer_ssn from customers order by id", "reason": "checking customer records for ticket 42"}),
    )
}

fn echo(marker: &str) -> Value {
    call(
        "exec",
        json!({"resource": "local-shell", "argv": ["sh", "-c", format!("echo {marker}; echo err-{marker} >&2")], "reason": "smoke test"}),
    )
}

/// The masked first row as the query tool returns it.
fn assert_masked_rows(r: &Value) {
    assert_eq!(r["is_error"], json!(false), "{r}");
    let rows = &r["structured"]["rows"];
    assert_eq!(
        rows[0],
        json!(["1", "Zed", "[email]", "[credit_card]", "****"]),
        "{r}"
    );
    for v in [EMAIL, CARD, SSN] {
        assert!(!r["text"].as_str().unwrap().contains(v), "{v} leaked: {r}");
    }
}

fn approve(c: &TestCluster, bob: &str, request: u64) {
    let out = custody(
        c,
        &[],
        bob,
        &[
            "approvals",
            "approve",
            &request.to_string(),
            "--reason",
            "ok for the agent",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The events of the session whose tool call carries `traceparent`.
fn session_with_trace(
    c: &TestCluster,
    token: &str,
    resource: &str,
    traceparent: &str,
) -> (Value, Vec<Value>) {
    let out = custody(
        c,
        &[],
        token,
        &["sessions", "list", "--resource", resource, "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    for s in list.as_array().unwrap() {
        let id = s["session_id"].as_str().unwrap();
        let out = custody(c, &[], token, &["sessions", "show", id, "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let events = v["events"].as_array().unwrap().clone();
        if events
            .iter()
            .any(|e| e["type"] == "tool_call" && e["event"]["traceparent"] == traceparent)
        {
            return (v["session"].clone(), events);
        }
    }
    panic!("no session of {resource} carries traceparent {traceparent}");
}

fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == t).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_call_governed_tools_through_the_python_and_npm_sdks() {
    let pg = Postgres::start();
    let out = crate::postgres::psql_direct(
        &pg,
        &format!(
            "create table customers(id int, name text, email text, card text, customer_ssn text); \
             insert into customers values (1, 'Zed', '{EMAIL}', '{CARD}', '{SSN}'), (2, 'Yan', 'y@example.org', '', ''), (3, 'Xi', 'x@example.org', '', ''); \
             create table scratch(id int); insert into scratch values (1), (2)"
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let api = KubeApi::start().await.unwrap();
    let kube_dir = tempfile::tempdir().unwrap();
    let sshd = LocalSshd::start(&kube_dir.path().join("sshd")).expect("start sshd");
    let c = system(&pg, Some((&api, kube_dir.path())), Some(&sshd)).await;
    let agent = c.mint_token("agent").await.unwrap().token;
    let bob = c.mint_token("bob").await.unwrap().token;
    let admin = c.mint_token("admin").await.unwrap().token;
    let url = mcp_url(&c, 1);
    let want_tools = [
        "list_resources",
        "describe_resource",
        "query",
        "execute_sql",
        "exec",
        "kube_get",
        "kube_logs",
        "kube_apply",
        "approval_status",
    ];

    // Both transports, both protocol generations: the tools, masked rows,
    // and a command with its exit code and output.
    for (via, mode) in [
        (Via::Stdio, "legacy"),
        (Via::Stdio, "auto"),
        (Via::Http(&url), "legacy"),
        (Via::Http(&url), "auto"),
    ] {
        let label = format!(
            "{} {mode}",
            matches!(via, Via::Stdio)
                .then_some("stdio")
                .unwrap_or("http")
        );
        let marker = format!("out-{}", label.replace(' ', "-"));
        let v = py(
            &c,
            &agent,
            via,
            mode,
            &json!([select_all(), echo(&marker)]),
            None,
        );
        assert_eq!(tool_names(&v), want_tools, "{label}");
        let query = v["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "query")
            .unwrap();
        assert_eq!(
            query["annotations"]["readOnlyHint"],
            json!(true),
            "{label}: {query}"
        );
        let exec_sql = v["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "execute_sql")
            .unwrap();
        assert_eq!(
            exec_sql["annotations"]["destructiveHint"],
            json!(true),
            "{label}"
        );
        assert_masked_rows(&v["results"][0]);
        let e = &v["results"][1];
        assert_eq!(e["is_error"], json!(false), "{label}: {e}");
        assert_eq!(e["structured"]["exit_code"], json!(0), "{label}: {e}");
        assert_eq!(
            e["structured"]["stdout"],
            json!(format!("{marker}\n")),
            "{label}: {e}"
        );
        assert_eq!(
            e["structured"]["stderr"],
            json!(format!("err-{marker}\n")),
            "{label}: {e}"
        );
    }

    // What this identity may use, and the columns it may read.
    let v = py(
        &c,
        &agent,
        Via::Stdio,
        "auto",
        &json!([
            call("list_resources", json!({"reason": "what can I use"})),
            call(
                "describe_resource",
                json!({"resource": "local-postgres", "reason": "schema"})
            ),
        ]),
        None,
    );
    let names: Vec<&str> = v["results"][0]["structured"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["local-kube", "local-postgres", "local-shell", "local-ssh"],
        "{v}"
    );
    let tables = &v["results"][1]["structured"]["tables"];
    let customers = tables
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "customers")
        .unwrap_or_else(|| panic!("{v}"));
    let ssn = customers["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "customer_ssn")
        .unwrap();
    assert_eq!(ssn["masked"], json!(true));
    assert_eq!(customers["columns"][0]["masked"], json!(false));

    // `query` runs reads only, whatever the policy allows; `execute_sql`
    // runs the same statement under the policy.
    let delete = json!({"resource": "local-postgres", "sql": "delete from scratch where id = 1", "reason": "cleanup"});
    let v = py(
        &c,
        &agent,
        Via::Http(&url),
        "auto",
        &json!([
            call("query", delete.clone()),
            call("execute_sql", delete.clone()),
            call(
                "query",
                json!({"resource": "local-postgres", "sql": "select count(*) from scratch", "reason": "check"})
            )
        ]),
        None,
    );
    assert_eq!(v["results"][0]["is_error"], json!(true), "{v}");
    assert!(
        v["results"][0]["text"]
            .as_str()
            .unwrap()
            .contains("only reads run"),
        "{v}"
    );
    assert_eq!(v["results"][1]["is_error"], json!(false), "{v}");
    assert_eq!(
        v["results"][1]["structured"]["tag"],
        json!("DELETE 1"),
        "{v}"
    );
    assert_eq!(v["results"][2]["structured"]["rows"], json!([["1"]]), "{v}");

    // Rows past the cap are cut, and the agent is told.
    let v = py(
        &c,
        &agent,
        Via::Stdio,
        "legacy",
        &json!([call(
            "query",
            json!({"resource": "local-postgres", "sql": "select id from customers order by id", "max_rows": 2, "reason": "paging"})
        )]),
        None,
    );
    let r = &v["results"][0]["structured"];
    assert_eq!(r["rows"], json!([["1"], ["2"]]), "{v}");
    assert_eq!(r["truncated"], json!(true));
    assert_eq!(r["rows_total"], json!(3));
    assert!(
        r["note"].as_str().unwrap().contains("cut to 2 of 3 rows"),
        "{v}"
    );

    // A held command: "approval required" at once (a result, not an error),
    // then it runs once after bob approves.
    let held = call(
        "exec",
        json!({"resource": "local-shell", "argv": ["sh", "-c", "echo held-marker ran"], "reason": "rotate the cache"}),
    );
    let v = py(
        &c,
        &agent,
        Via::Http(&url),
        "legacy",
        &json!([held.clone()]),
        None,
    );
    let r = &v["results"][0];
    assert_eq!(r["is_error"], json!(false), "{r}");
    assert!(
        r["text"]
            .as_str()
            .unwrap()
            .starts_with("approval required: request "),
        "{r}"
    );
    let request = r["structured"]["request"].as_u64().unwrap();
    let status = call(
        "approval_status",
        json!({"request": request, "reason": "waiting"}),
    );
    let v = py(
        &c,
        &agent,
        Via::Stdio,
        "auto",
        &json!([status.clone()]),
        None,
    );
    assert_eq!(
        v["results"][0]["structured"]["status"],
        json!("pending"),
        "{v}"
    );
    let out = custody(
        &c,
        &[],
        &admin,
        &["approvals", "show", &request.to_string(), "--json"],
    );
    assert!(
        text(&out.stdout).contains("rotate the cache"),
        "the reason is the justification: {}",
        text(&out.stdout)
    );
    approve(&c, &bob, request);
    let v = py(
        &c,
        &agent,
        Via::Stdio,
        "auto",
        &json!([status, held.clone(), held]),
        None,
    );
    assert_eq!(
        v["results"][0]["structured"]["status"],
        json!("approved"),
        "{v}"
    );
    assert_eq!(
        v["results"][1]["structured"]["stdout"],
        json!("held-marker ran\n"),
        "{v}"
    );
    let again = &v["results"][2];
    assert!(
        again["text"]
            .as_str()
            .unwrap()
            .starts_with("approval required: request "),
        "an approval runs once: {again}"
    );
    assert_ne!(again["structured"]["request"].as_u64().unwrap(), request);

    // An SSH host: the command line through the target's sshd, its host
    // key recorded.
    let v = py(
        &c,
        &agent,
        Via::Stdio,
        "auto",
        &json!([call(
            "exec",
            json!({"resource": "local-ssh", "argv": ["sh", "-c", "echo via-ssh; exit 3"], "reason": "check the host"})
        )]),
        None,
    );
    let r = &v["results"][0];
    assert_eq!(r["structured"]["stdout"], json!("via-ssh\n"), "{v}");
    assert_eq!(r["structured"]["exit_code"], json!(3), "{v}");
    assert_eq!(
        r["is_error"],
        json!(true),
        "a failed command is an error result: {v}"
    );

    // Kubernetes: apply, read back (a secret masked), a pod's log; no watch.
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "agent-cm", "namespace": "default"}, "data": {"mode": "fast"}});
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "agent-secret", "namespace": "default"}, "data": {"password": "aHVudGVyMg=="}});
    let v = py(
        &c,
        &agent,
        Via::Http(&url),
        "auto",
        &json!([
            call(
                "kube_apply",
                json!({"resource": "local-kube", "manifest": cm, "reason": "tune"})
            ),
            call(
                "kube_get",
                json!({"resource": "local-kube", "path": "/api/v1/namespaces/default/configmaps/agent-cm", "reason": "check"})
            ),
            call(
                "kube_apply",
                json!({"resource": "local-kube", "manifest": secret, "reason": "store"})
            ),
            call(
                "kube_get",
                json!({"resource": "local-kube", "path": "/api/v1/namespaces/default/secrets/agent-secret", "reason": "check"})
            ),
            call(
                "kube_logs",
                json!({"resource": "local-kube", "namespace": "default", "pod": "web-1", "reason": "debug"})
            ),
            call(
                "kube_get",
                json!({"resource": "local-kube", "path": "/api/v1/namespaces/default/pods?watch=true", "reason": "watch"})
            ),
        ]),
        None,
    );
    let r = &v["results"];
    assert_eq!(r[0]["is_error"], json!(false), "{v}");
    assert_eq!(
        api.object("configmaps", "default", "agent-cm").unwrap()["data"]["mode"],
        "fast"
    );
    assert_eq!(
        r[1]["structured"]["body"]["data"]["mode"],
        json!("fast"),
        "{v}"
    );
    assert_eq!(r[2]["is_error"], json!(false), "{v}");
    assert_eq!(
        r[3]["structured"]["body"]["data"]["password"],
        json!("KioqKg=="),
        "{v}"
    );
    assert!(
        !r[3]["text"].as_str().unwrap().contains("aHVudGVyMg=="),
        "{v}"
    );
    assert_eq!(r[4]["structured"]["status"], json!(200), "{v}");
    assert_eq!(r[5]["is_error"], json!(true), "{v}");
    assert!(r[5]["text"].as_str().unwrap().contains("no watch"), "{v}");

    // npm's SDK over stdio.
    let out = Command::new("node")
        .arg(mcp_dir().join("client.mjs"))
        .arg(&c.bins.custody)
        .arg("mcp")
        .env("MCP_CALLS", json!([select_all()]).to_string())
        .env("CUSTODY_COORDINATOR", c.api_urls(&[]))
        .env("CUSTODY_CA", c.ca_path())
        .env("CUSTODY_TOKEN", &agent)
        .env_remove("CUSTODY_TOKEN_FILE")
        .output()
        .expect("run node");
    assert!(out.status.success(), "npm client: {}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tool_names(&v), want_tools);
    assert_masked_rows(&v["results"][0]);

    // The evidence of one call: the agent, the tool and its arguments, the
    // reason, the statement, the masked rows, the traceparent.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    py(
        &c,
        &agent,
        Via::Stdio,
        "legacy",
        &json!([select_all()]),
        Some(trace),
    );
    let (info, events) = session_with_trace(&c, &admin, "local-postgres", trace);
    assert_eq!(info["via"], json!("mcp"));
    assert_eq!(info["subject"], json!("agent"));
    assert_eq!(info["client_kind"], json!("machine"));
    let tc = &of_type(&events, "tool_call")[0]["event"];
    assert_eq!(tc["tool"], json!("query"));
    assert_eq!(
        tc["reason"],
        json!("checking customer records for ticket 42")
    );
    assert_eq!(tc["reason_source"], json!("arguments"));
    assert_eq!(tc["arguments"]["resource"], json!("local-postgres"));
    assert_eq!(tc["client"]["name"], json!("custody-e2e-python"));
    assert_eq!(tc["transport"], json!("stdio"));
    let statements: Vec<&Value> = of_type(&events, "command");
    assert!(
        statements.iter().any(|e| e["event"]["text"]
            .as_str()
            .unwrap()
            .starts_with("select id, name, email")),
        "{events:?}"
    );
    let rows: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "output" && e["event"]["stream"] == "row")
        .map(|e| e["event"]["text"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r.contains("[email]") && r.contains("****")),
        "{rows:?}"
    );
    let result = &of_type(&events, "tool_result")[0]["event"];
    assert!(
        result["content"]
            .as_str()
            .unwrap()
            .contains("[credit_card]"),
        "{result}"
    );
    let shown = custody(
        &c,
        &[],
        &admin,
        &["sessions", "show", info["session_id"].as_str().unwrap()],
    );
    assert!(
        text(&shown.stdout).contains("by agent (machine) via mcp on local-postgres"),
        "{}",
        text(&shown.stdout)
    );

    // A token that carries an RFC 8693 `act` claim: the agent acting for
    // alice, in whoami and in the evidence.
    let alice = c.mint_token("alice").await.unwrap().token;
    let delegated = c.exchange_token("agent", &alice).await.unwrap();
    let me = custody(&c, &[], &delegated, &["whoami", "--json"]);
    let me: Value = serde_json::from_slice(&me.stdout).unwrap();
    assert_eq!(me["subject"], json!("alice"));
    assert_eq!(me["actor"], json!("agent"));
    let trace2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let v = py(
        &c,
        &delegated,
        Via::Http(&url),
        "auto",
        &json!([select_all()]),
        Some(trace2),
    );
    assert_masked_rows(&v["results"][0]);
    let (info, events) = session_with_trace(&c, &admin, "local-postgres", trace2);
    assert_eq!(info["subject"], json!("alice"));
    assert_eq!(info["actor"], json!("agent"));
    let opened = &of_type(&events, "session_opened")[0]["event"]["identity"];
    assert_eq!(opened["actor"], json!("agent"), "{opened}");
    let shown = custody(
        &c,
        &[],
        &admin,
        &["sessions", "show", info["session_id"].as_str().unwrap()],
    );
    assert!(
        text(&shown.stdout).contains("by agent acting for alice"),
        "{}",
        text(&shown.stdout)
    );

    // No unmasked value reached any node's data or log.
    for v in [EMAIL, CARD, SSN] {
        let hits = grep_dir(&c.dir, v.as_bytes());
        assert!(hits.is_empty(), "{v} found in {hits:?}");
    }
}

async fn post(url: &str, ca: &Path, token: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_endpoint_refuses_bad_tokens_and_bad_input() {
    let pg = Postgres::start();
    let c = system(&pg, None, None).await;
    let agent = c.mint_token("agent").await.unwrap().token;
    let url = mcp_url(&c, 1);
    let ca = c.ca_path();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});

    // No token, a bad one, and one for another audience: 401 with the
    // challenge naming the resource metadata, which names the issuer.
    let wrong_aud = crate::auth::sign(
        &c,
        &json!({"iss": "https://dev-issuer.custody.local", "aud": "urn:other", "sub": "agent",
                "client_id": "agent", "exp": crate::auth::now() + 600, "iat": crate::auth::now(),
                "groups": ["ai-agents"]}),
        None,
    );
    for token in [None, Some("not-a-token"), Some(wrong_aud.as_str())] {
        let r = post(&url, &ca, token, init.to_string().into_bytes()).await;
        assert_eq!(r.status(), 401, "{token:?}");
        let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(
            challenge.starts_with("Bearer resource_metadata=\"https://")
                && challenge.contains("/.well-known/oauth-protected-resource/mcp\""),
            "{challenge}"
        );
        if token.is_some() {
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        }
    }
    let meta_url = url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp");
    let ca_cert = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca_cert)
        .build()
        .unwrap();
    let meta: Value = http
        .get(&meta_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["resource"], json!(url));
    assert_eq!(
        meta["authorization_servers"],
        json!(["https://dev-issuer.custody.local"])
    );

    // Malformed JSON-RPC: a JSON-RPC error, and the server goes on.
    let r = post(&url, &ca, Some(&agent), b"{not json".to_vec()).await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert!(status.is_client_error(), "{status} {body}");
    let err: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{status}: {body}"));
    assert_eq!(err["error"]["code"], json!(-32700), "{body}");
    let r = post(&url, &ca, Some(&agent), b"[1, 2]".to_vec()).await;
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], json!(-32600), "{err}");
    // An oversized request: refused before it is read whole.
    let big = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"pad": "x".repeat(2 << 20)}});
    let r = post(&url, &ca, Some(&agent), big.to_string().into_bytes()).await;
    assert_eq!(r.status(), 413);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], json!(-32600), "{err}");
    // An unknown tool, arguments over the limit, and a missing reason:
    // JSON-RPC errors through the SDK; then a good call still works.
    let v = py(
        &c,
        &agent,
        Via::Http(&url),
        "legacy",
        &json!([
            call("drop_everything", json!({"reason": "x"})),
            call(
                "query",
                json!({"resource": "local-postgres", "sql": format!("select '{}'", "y".repeat(300 << 10)), "reason": "big"})
            ),
            call(
                "query",
                json!({"resource": "local-postgres", "sql": "select 1"})
            ),
            call(
                "query",
                json!({"resource": "local-postgres", "sql": "select 1 as one", "reason": "still up"})
            ),
        ]),
        None,
    );
    for (i, why) in [(0, "unknown tool"), (1, "limit"), (2, "reason")] {
        let e = v["results"][i]["protocol_error"]
            .as_str()
            .unwrap_or_else(|| panic!("call {i}: {v}"));
        assert!(e.contains(why), "call {i}: {e}");
    }
    assert_eq!(v["results"][3]["structured"]["rows"], json!([["1"]]), "{v}");
    // The limits the policy states: a call's timeout ends its session, and
    // an identity past its calls per minute is refused.
    let client = c.client(&[]).unwrap();
    client
        .policy_apply(&format!("{POLICY}mcp: {{ call_timeout: 2s }}\n"), "yaml")
        .await
        .unwrap();
    let slow = call(
        "exec",
        json!({"resource": "local-shell", "argv": ["sleep", "30"], "reason": "slow"}),
    );
    let t0 = std::time::Instant::now();
    let v = py(&c, &agent, Via::Stdio, "auto", &json!([slow]), None);
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "the call was not cut"
    );
    assert_eq!(v["results"][0]["is_error"], json!(true), "{v}");
    assert!(
        v["results"][0]["text"]
            .as_str()
            .unwrap()
            .contains("timeout"),
        "{v}"
    );
    client
        .policy_apply(&format!("{POLICY}mcp: {{ calls_per_minute: 3 }}\n"), "yaml")
        .await
        .unwrap();
    let admin = c.mint_token("admin").await.unwrap().token;
    let status = call("approval_status", json!({"request": 999, "reason": "poll"}));
    let v = py(
        &c,
        &admin,
        Via::Stdio,
        "auto",
        &json!([status.clone(), status.clone(), status.clone(), status]),
        None,
    );
    for i in 0..3 {
        assert!(
            v["results"][i]["text"]
                .as_str()
                .unwrap()
                .contains("no approval request 999"),
            "{v}"
        );
    }
    assert!(
        v["results"][3]["text"]
            .as_str()
            .unwrap()
            .contains("rate limited"),
        "{v}"
    );
    client.policy_apply(POLICY, "yaml").await.unwrap();

    // A tool result for what policy refuses (no rule lets alice use the
    // shell here).
    let alice = c.mint_token("alice").await.unwrap().token;
    let v = py(&c, &alice, Via::Stdio, "auto", &json!([echo("nope")]), None);
    assert_eq!(v["results"][0]["is_error"], json!(true), "{v}");
    assert!(
        v["results"][0]["text"].as_str().unwrap().contains("denied"),
        "{v}"
    );
}
