//! Just-in-time approvals: held commands run once after review, nobody
//! reviews their own request, counts, expiry, access grants, leader kill,
//! signed webhooks, and ill-formed reviews.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Output, Stdio};
use std::time::Duration;

use custody_cli::dev::{EdgeSpec, GenOptions};

use crate::edge::{custody, custody_cmd, text};
use crate::harness::{self, eventually, TestCluster};

/// Approval block for the prod rule, replaced per test.
const DEFAULT_APPROVAL: &str = "{ groups: [approvers], count: 1 }";

fn policy(approval: &str) -> String {
    format!(
        r#"
roles:
  admin: {{ groups: [custody-admins] }}
  auditor: {{ groups: [auditors] }}
  approver: {{ groups: [approvers] }}
rules:
  - name: engineers-prod
    identity: {{ groups: [engineers, ai-agents] }}
    resource: {{ labels: {{ env: prod }} }}
    actions: [exec]
    decision: require_approval
    approval: {approval}
"#
    )
}

async fn system(approval: &str) -> TestCluster {
    let (mut c, _) = harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(&policy(approval), "yaml")
        .await
        .unwrap();
    let mut spec = EdgeSpec::shell("e1", "local-shell");
    spec.resources_toml =
        "[[resources]]\nname = \"local-shell\"\nkind = \"shell\"\nlabels = { env = \"prod\" }\n"
            .into();
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    c.wait_for_resource("local-shell", 3, Duration::from_secs(20))
        .await
        .unwrap();
    c
}

async fn tokens(c: &TestCluster, who: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for w in who {
        out.push(c.mint_token(w).await.unwrap().token);
    }
    out
}

/// A marker file in the edge's working area; each run appends one line.
fn marker(c: &TestCluster, name: &str) -> (std::path::PathBuf, String) {
    let p = c.dir.join(name);
    let script = format!("echo ran >> {}", p.display());
    (p, script)
}

fn runs(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |s| s.lines().count())
}

fn exec(c: &TestCluster, token: &str, extra: &[&str], script: &str) -> Output {
    let mut args = vec!["exec"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["local-shell", "--", "sh", "-c", script]);
    custody(c, &[], token, &args)
}

/// `exec --no-wait`: must be held; returns the request id.
fn held(c: &TestCluster, token: &str, script: &str) -> String {
    let out = exec(c, token, &["--no-wait", "--reason", "ticket 7"], script);
    assert_eq!(out.status.code(), Some(254), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("approval required: request"));
    text(&out.stdout).trim().to_owned()
}

fn approvals(c: &TestCluster, token: &str, args: &[&str]) -> Output {
    let mut a = vec!["approvals"];
    a.extend_from_slice(args);
    custody(c, &[], token, &a)
}

fn show(c: &TestCluster, token: &str, id: &str) -> serde_json::Value {
    let out = approvals(c, token, &["show", id, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn refused(out: &Output, why: &str) {
    assert!(!out.status.success(), "expected a refusal ({why})");
    assert!(
        text(&out.stderr).contains(why),
        "expected {why:?} in: {}",
        text(&out.stderr)
    );
}

/// A webhook receiver: answers 503 to the very first delivery (to prove
/// retries), then 200; hands every delivered (headers, body) to the test.
fn webhook_receiver() -> (String, std::sync::mpsc::Receiver<(String, String)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = true;
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut headers = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                headers.push_str(&line);
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            let status = if first {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = s.write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
            if !first {
                let _ = tx.send((headers, String::from_utf8_lossy(&body).into_owned()));
            }
            first = false;
        }
    });
    (url, rx)
}

fn header<'a>(headers: &'a str, name: &str) -> &'a str {
    headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_command_runs_once_after_approval() {
    let (hook, deliveries) = webhook_receiver();
    let c = system(&format!(
        "{{ groups: [approvers], count: 1, webhook: \"{hook}\" }}"
    ))
    .await;
    let [alice, bob, audrey] =
        <[String; 3]>::try_from(tokens(&c, &["alice", "bob", "audrey"]).await).unwrap();
    let (m, script) = marker(&c, "marker");

    // Waiting mode: the command is held until bob approves, then runs once.
    let waiting = custody_cmd(
        &c,
        &[],
        &alice,
        &["exec", "local-shell", "--", "sh", "-c", &script],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut pending = Vec::new();
    eventually(Duration::from_secs(15), "the request is listed", || {
        let out = approvals(&c, &bob, &["list", "--pending", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        pending = v.as_array().cloned().unwrap_or_default();
        let found = !pending.is_empty();
        async move { found }
    })
    .await;
    let id = pending[0]["id"].to_string();
    assert_eq!(pending[0]["command"], format!("sh -c '{script}'"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs(&m), 0, "nothing runs before approval");
    let out = approvals(&c, &bob, &["approve", &id, "--reason", "looks fine"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    assert!(text(&done.stderr).contains(&format!(
        "approval required: request {id} (waiting; Ctrl-C to stop waiting)"
    )));
    assert_eq!(runs(&m), 1);
    assert_eq!(show(&c, &alice, &id)["status"], "used");

    // The same command again asks again; --no-wait returns the id with 254.
    let again = held(&c, &alice, &script);
    assert_ne!(again, id);
    assert_eq!(runs(&m), 1);
    // Pending: --request-id --no-wait says so; a different command is refused.
    let out = exec(&c, &alice, &["--no-wait", "--request-id", &again], &script);
    assert_eq!(out.status.code(), Some(254), "{}", text(&out.stderr));
    let out = approvals(&c, &bob, &["approve", &again]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    refused(
        &exec(&c, &alice, &["--request-id", &again], "echo other"),
        "approved a different command",
    );
    let out = exec(&c, &alice, &["--request-id", &again], &script);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(runs(&m), 2);
    // Exactly once.
    refused(
        &exec(&c, &alice, &["--request-id", &again], &script),
        "already used",
    );
    assert_eq!(runs(&m), 2);

    // The session's evidence names the approval and its reviewer.
    let sid = text(&out.stderr)
        .split("custody: session ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    let ev = custody(&c, &[], &audrey, &["sessions", "show", &sid, "--json"]);
    let ev: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    let approval = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "approval")
        .unwrap_or_else(|| panic!("no approval event: {ev}"));
    let s = approval.to_string();
    assert!(s.contains(&again) && s.contains("bob"), "{s}");

    // Signed webhook deliveries for requests and decisions.
    let secret = std::fs::read_to_string(c.dir.join("webhook-secret")).unwrap();
    let mut events = Vec::new();
    while let Ok((headers, body)) = deliveries.recv_timeout(Duration::from_secs(10)) {
        let ts: u64 = header(&headers, "x-custody-timestamp").parse().unwrap();
        let sig = header(&headers, "x-custody-signature");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.trim().as_bytes());
        let tag = ring::hmac::sign(&key, format!("{ts}.{body}").as_bytes());
        let want: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sig, format!("sha256={want}"), "bad signature on {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["text"].is_string(), "Slack-compatible text");
        events.push(format!(
            "{} {}",
            v["custody"]["event"].as_str().unwrap(),
            v["custody"]["request"]["id"]
        ));
        if events.len() == 4 {
            break;
        }
    }
    events.sort();
    let mut want = vec![
        format!("approval_approved {id}"),
        format!("approval_approved {again}"),
        format!("approval_requested {id}"),
        format!("approval_requested {again}"),
    ];
    want.sort();
    assert_eq!(events, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_reviews_their_own_request_and_two_means_two() {
    let c = system("{ groups: [approvers, engineers, ai-agents], count: 2 }").await;
    let [alice, bob, carol, audrey, agent] =
        <[String; 5]>::try_from(tokens(&c, &["alice", "bob", "carol", "audrey", "agent"]).await)
            .unwrap();
    let (m, script) = marker(&c, "marker");
    let id = held(&c, &alice, &script);

    // alice is in an approver group, agent too: neither may approve it.
    refused(
        &approvals(&c, &alice, &["approve", &id]),
        "cannot review their own request",
    );
    refused(
        &approvals(&c, &agent, &["approve", &id]),
        "machine identities cannot review",
    );
    refused(
        &approvals(&c, &audrey, &["approve", &id]),
        "none of the approver groups",
    );
    // The agent's own requests need humans too.
    let agent_req = held(&c, &agent, "true");
    refused(
        &approvals(&c, &agent, &["approve", &agent_req]),
        "cannot review their own request",
    );
    let v = show(&c, &alice, &id);
    assert_eq!(
        (v["status"].as_str(), v["approvals"].as_u64()),
        (Some("pending"), Some(0))
    );

    // One of two is not enough.
    let out = approvals(&c, &bob, &["approve", &id]);
    assert!(
        text(&out.stdout).contains("1 of 2 approvals; now pending"),
        "{}",
        text(&out.stdout)
    );
    refused(&approvals(&c, &bob, &["approve", &id]), "already reviewed");
    let out = exec(&c, &alice, &["--no-wait", "--request-id", &id], &script);
    assert_eq!(out.status.code(), Some(254), "{}", text(&out.stderr));
    assert_eq!(runs(&m), 0);
    let out = approvals(&c, &carol, &["approve", &id]);
    assert!(
        text(&out.stdout).contains("2 of 2 approvals; now approved"),
        "{}",
        text(&out.stdout)
    );
    let out = exec(&c, &alice, &["--request-id", &id], &script);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(runs(&m), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_requests_are_final_and_access_grants_end_on_time() {
    let c =
        system("{ groups: [approvers], count: 1, timeout: 2s, require_justification: true }").await;
    let [alice, bob] = <[String; 2]>::try_from(tokens(&c, &["alice", "bob"]).await).unwrap();
    let (m, script) = marker(&c, "marker");
    // This policy demands a justification.
    refused(
        &exec(&c, &alice, &["--no-wait"], &script),
        "requires a justification",
    );
    let id = held(&c, &alice, &script);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    refused(&approvals(&c, &bob, &["approve", &id]), "expired");
    refused(
        &exec(&c, &alice, &["--request-id", &id], &script),
        "expired",
    );
    assert_eq!(show(&c, &alice, &id)["status"], "expired");
    assert_eq!(runs(&m), 0);

    // A 2-second access grant: commands run without asking until it ends,
    // and a session still running then is ended.
    let out = custody(
        &c,
        &[],
        &alice,
        &[
            "access",
            "request",
            "local-shell",
            "--for",
            "2s",
            "--reason",
            "incident 9",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let grant = text(&out.stdout).trim().to_owned();
    let out = exec(&c, &alice, &["--no-wait", "--reason", "x"], "true");
    assert_eq!(
        out.status.code(),
        Some(254),
        "not granted yet: {}",
        text(&out.stderr)
    );
    let out = approvals(&c, &bob, &["approve", &grant]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = exec(&c, &alice, &[], &script);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(runs(&m), 1);
    let long = exec(&c, &alice, &[], "sleep 20");
    refused(&long, &format!("access grant {grant} expired"));
    let out = exec(&c, &alice, &["--no-wait", "--reason", "x"], &script);
    assert_eq!(
        out.status.code(),
        Some(254),
        "after the grant: {}",
        text(&out.stderr)
    );
    assert_eq!(runs(&m), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_survives_a_leader_kill() {
    let mut c = system(DEFAULT_APPROVAL).await;
    let [alice, bob] = <[String; 2]>::try_from(tokens(&c, &["alice", "bob"]).await).unwrap();
    let (m, script) = marker(&c, "marker");
    let id = held(&c, &alice, &script);
    let leader = c
        .wait_for_leader(&[], Duration::from_secs(10))
        .await
        .unwrap();
    c.kill(leader).unwrap();
    eventually(
        Duration::from_secs(20),
        "approval after the leader kill",
        || {
            let out = approvals(&c, &bob, &["approve", &id]);
            async move { out.status.success() }
        },
    )
    .await;
    let out = exec(&c, &alice, &["--request-id", &id], &script);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    refused(
        &exec(&c, &alice, &["--request-id", &id], &script),
        "already used",
    );
    assert_eq!(runs(&m), 1, "exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ill_formed_reviews_are_refused_and_change_nothing() {
    let c = system("{ groups: [approvers], count: 2 }").await;
    let [alice, bob, carol] =
        <[String; 3]>::try_from(tokens(&c, &["alice", "bob", "carol"]).await).unwrap();
    refused(
        &approvals(&c, &bob, &["approve", "999999"]),
        "no approval request 999999",
    );
    refused(&approvals(&c, &bob, &["approve", "0"]), "positive integers");
    refused(
        &approvals(&c, &bob, &["approve", "abc"]),
        "invalid value 'abc'",
    );
    refused(
        &approvals(&c, &bob, &["show", "999999"]),
        "no approval request",
    );
    let id = held(&c, &alice, "true");
    approvals(&c, &bob, &["approve", &id]);
    let before = show(&c, &alice, &id);
    refused(&approvals(&c, &bob, &["approve", &id]), "already reviewed");
    refused(
        &approvals(&c, &carol, &["deny", &id, "--reason", " "]),
        "needs a reason",
    );
    assert_eq!(show(&c, &alice, &id), before, "refusals change nothing");
    let out = approvals(
        &c,
        &carol,
        &["deny", &id, "--reason", "not during the freeze"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let denied = show(&c, &alice, &id);
    assert_eq!(denied["status"], "denied");
    // Denials are final.
    let dave_like = c.mint_token("admin").await.unwrap().token;
    refused(
        &approvals(&c, &dave_like, &["approve", &id]),
        "denied; that is final",
    );
    refused(&exec(&c, &alice, &["--request-id", &id], "true"), "denied");
    assert_eq!(show(&c, &alice, &id), denied);
    // Others cannot cancel; the requester can, once.
    let other = held(&c, &alice, "true");
    refused(
        &approvals(&c, &bob, &["cancel", &other]),
        "only the requester",
    );
    assert!(approvals(&c, &alice, &["cancel", &other]).status.success());
    refused(
        &approvals(&c, &alice, &["cancel", &other]),
        "cancelled; that is final",
    );
}
